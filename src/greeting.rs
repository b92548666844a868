//! The first frames of a new connection, built from its project streams' decisions.
//!
//! The handshake registers the session, holding, in the hub and joins its projects before
//! the 101; [`greet`] then asks each project's [`crate::stream::ProjectStream`] how the
//! connection starts ([`Greeting`]: a fresh snapshot, a replay from the resume tail or
//! history, or a resync), turns the answer into frames and hands them to
//! [`crate::hub::Hub::release`], which puts them first and drops the held live events the
//! greeting covered. So a resuming client gets every event after its `last_seq` exactly
//! once, then live events, with no gap, and `connection.established` is always first.
//!
//! This module only builds frames: what to replay and from which seq is the stream's
//! decision, and holding and dropping live events is the hub's.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::app::App;
use crate::broker::state::Snapshot;
use crate::broker::BrokerError;
use crate::schema::types::{ConnectionEstablished, ConnectionResyncRequired};
use crate::session::{Scope, Session};
use crate::stream::{Greeting, ResumeRequest};
use crate::ws::close_code;

/// `connection.established`; `position` is the project's (seq, epoch) on single-project
/// connections, and `positions` every project's on `/ws/user`.
fn established(
    app: &App,
    session: &Session,
    position: Option<(u64, &str)>,
    positions: Option<Map<String, Value>>,
    resumed: bool,
) -> Bytes {
    let hello = ConnectionEstablished {
        client_id: session.client_id.clone(),
        user_id: session.user_id(),
        instance_id: app.instance_id.clone(),
        seq: position.map(|(seq, _)| seq),
        epoch: position.map(|(_, epoch)| epoch.to_owned()),
        heartbeat_interval: app.config.ws.heartbeat_interval_secs,
        resumed,
        projects: None,
        positions,
    };
    session.encode(&hello, None)
}

/// Builds and queues the greeting, then releases the session's held events.
pub async fn greet(app: &App, session: &Arc<Session>, resume: Option<ResumeRequest>) {
    let result = match &session.scope {
        Scope::Project(project) => greet_project(app, session, project, resume.as_ref()).await,
        Scope::User => greet_user(app, session).await,
        Scope::Story(_) | Scope::UserStories => greet_story(app, session).await,
        // A command stream starts with the next command: nothing to send first.
        Scope::Commands(_) => {
            app.hub.release(session, Vec::new(), |_| 0);
            Ok(())
        }
    };
    if let Err(e) = result {
        session.span().in_scope(|| {
            tracing::warn!(client_id = %session.client_id, error = %e, "could not greet; closing");
        });
        app.hub.release(session, Vec::new(), |_| 0);
        session.close(close_code::INTERNAL, "broker unavailable; reconnect", true);
    }
}

/// The project's status snapshot, from its stream's cache while it is current (one broker
/// read per project and cache period in a connect storm or a `status` loop); read directly
/// for a project this instance does not follow.
pub async fn current_snapshot(app: &App, project: &str) -> Result<Arc<Snapshot>, BrokerError> {
    match app.hub.stream(project) {
        Some(stream) => stream.snapshot(&app.broker).await,
        None => Ok(Arc::new(app.broker.snapshot(project).await?)),
    }
}

fn not_followed(project: &str) -> BrokerError {
    BrokerError::Unavailable(format!("project {project} is not followed here"))
}

async fn greet_project(
    app: &App,
    session: &Arc<Session>,
    project: &str,
    resume: Option<&ResumeRequest>,
) -> Result<(), BrokerError> {
    let stream = app
        .hub
        .stream(project)
        .ok_or_else(|| not_followed(project))?;
    let greeting = stream.greet(&app.broker, resume).await?;
    let covered = greeting.covered();
    let frames: Vec<Bytes> = match greeting {
        Greeting::Fresh(snap) => vec![
            established(app, session, Some((snap.seq, &snap.epoch)), None, false),
            session.message(snap.message(project)),
        ],
        Greeting::Replay {
            upto,
            epoch,
            events,
        } => {
            app.hub
                .metrics
                .history_replays
                .fetch_add(1, Ordering::Relaxed);
            let mut frames = Vec::with_capacity(events.len() + 1);
            frames.push(established(app, session, Some((upto, &epoch)), None, true));
            frames.extend(events);
            frames
        }
        Greeting::Resync {
            snapshot,
            from_seq,
            earliest,
        } => {
            app.hub.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
            vec![
                established(
                    app,
                    session,
                    Some((snapshot.seq, &snapshot.epoch)),
                    None,
                    false,
                ),
                session.encode(
                    &ConnectionResyncRequired {
                        from_seq,
                        earliest_seq: earliest,
                        epoch: snapshot.epoch.clone(),
                    },
                    None,
                ),
                session.message(snapshot.message(project)),
            ]
        }
    };
    app.hub
        .release(session, frames, |p| if p == project { covered } else { 0 });
    Ok(())
}

/// A story socket starts with each story's latest progress, if any (the seed sends it
/// before any live frame; there is no `connection.established`).
async fn greet_story(app: &App, session: &Arc<Session>) -> Result<(), BrokerError> {
    let mut frames = Vec::new();
    // Per story, the fingerprint of the progress sent: a live copy of it that was on its
    // way meanwhile is not sent again (a story has no seq to tell).
    let mut sent = Vec::new();
    for story in session.projects() {
        if let Some(progress) = app.broker.story_progress(&story).await? {
            let frame = crate::ws::frame::text(&progress);
            sent.push((story, crate::hub::Hub::story_sent(&frame)));
            frames.push(frame);
        }
    }
    app.hub.release(session, frames, |story| {
        sent.iter().find(|(s, _)| s == story).map_or(0, |(_, h)| *h)
    });
    Ok(())
}

async fn greet_user(app: &App, session: &Arc<Session>) -> Result<(), BrokerError> {
    let mut positions = Map::new();
    let mut statuses = Vec::new();
    for project in session.projects() {
        let stream = app
            .hub
            .stream(&project)
            .ok_or_else(|| not_followed(&project))?;
        let snap = stream.fresh(&app.broker).await?;
        positions.insert(
            project.clone(),
            json!({"seq": snap.seq, "epoch": snap.epoch}),
        );
        statuses.push(session.message(snap.message(&project)));
    }
    let mut frames = vec![established(app, session, None, Some(positions), false)];
    frames.extend(statuses);
    // Seqs of different projects cannot be compared with one number: drop nothing held
    // (the snapshots are the state as of their seq; a live event after one is newer).
    app.hub.release(session, frames, |_| 0);
    Ok(())
}
