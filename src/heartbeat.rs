//! One shared timer for every connection: heartbeats, idle drop, credential expiry, the
//! revoked-session recheck ([`crate::revocation`]), and the TTLs of this instance's Redis
//! records.
//!
//! No connection owns a timer (DESIGN "Small connections"): a sweep runs every second over
//! the sessions, in chunks of `CHUNK` sessions with a yield between them so fan-out interleaves.
//! Each connection beats once per `WS_HEARTBEAT_INTERVAL` in its own second of the
//! interval (`Session::beat_phase`): `system.heartbeat` plus a WebSocket ping, the frame
//! encoded once per project per tick; a beat therefore costs 1/interval of the connections
//! per second, not all of them at once (issue 13: 18,000 connections beating together held
//! fan-out for over 100 ms). Each tick also refreshes, in a task of its own,
//! `ws:instance:{id}` and the `ws:connection:*` records (with their presence entries) of
//! the connections whose beat it was, in pipelined round trips: Redis, which also carries
//! the pub/sub traffic, gets the refresh spread over the interval too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;

use crate::app::App;
use crate::event::unix_millis;
use crate::revocation::SessionRecheck;
use crate::schema::types::SystemHeartbeat;
use crate::session::Scope;
use crate::ws::close_code;
use crate::ws::frame;

const SWEEP: Duration = Duration::from_secs(1);

/// Sessions handled between two yields of the sweep: fan-out runs in between, so no
/// tick holds the thread for work that grows with the number of connections (at 100k
/// connections one chunk is ~1% of them; issue 13).
const CHUNK: usize = 1024;

pub async fn run(app: Arc<App>) {
    let interval_secs = app.config.ws.heartbeat_interval_secs.max(1);
    let idle_limit = Duration::from_secs(app.config.ws.idle_timeout_secs);
    let keepalive = app.config.stories.keepalive_secs.max(1);
    let max_age = Duration::from_secs(app.config.ws.max_connection_secs);
    let mut ticker = tokio::time::interval(SWEEP);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut recheck = SessionRecheck::new(&app);
    let everyone: Vec<_> = app
        .hub
        .sessions()
        .iter()
        .map(|s| (s.client_id.clone(), s.presence_projects()))
        .collect();
    refresh_records(&app, everyone).await;
    // The beat slots (seconds of the interval) handled so far: each session beats in its
    // own slot (`Session::beat_phase`), once per interval, so a beat costs 1/interval of
    // the connections per second instead of all of them at once; a late tick catches up
    // the slots it skipped.
    let mut done_upto = unix_millis() / 1000;
    loop {
        ticker.tick().await;
        if app.is_draining() {
            return;
        }
        let now_ms = unix_millis();
        let now_secs = now_ms / 1000;
        // Slots due this tick: every second since the last tick, at most one interval.
        let first = done_upto.max(now_secs.saturating_sub(interval_secs - 1).saturating_sub(1)) + 1;
        let due = |phase: u64| (first..=now_secs).any(|s| s % interval_secs == phase);
        done_upto = now_secs.max(done_upto);
        let ping = frame::ping(b"sb");
        let story_ping = frame::text(b"ping");
        let mut frames: HashMap<String, Bytes> = HashMap::new();
        // The records whose refresh is due: each connection's record TTL is refreshed on its
        // beat, so Redis gets 1/interval of them per second instead of all at once.
        let mut due_records = Vec::new();
        let sessions = app.hub.sessions();
        for (i, session) in sessions.iter().enumerate() {
            if i > 0 && i % CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            if session.outbox.is_closing() || session.is_held() {
                continue;
            }
            if session.expires_at().is_some_and(|at| at <= now_secs) {
                session.close(close_code::EXPIRED, "credential expired", false);
                continue;
            }
            if !max_age.is_zero() && session.age(now_ms) >= max_age {
                // The seed's WS_CONNECTION_TIMEOUT: a connection's longest life. 1001:
                // clients reconnect (and resume) as after any going-away.
                session.close(close_code::GOING_AWAY, "connection timeout", false);
                continue;
            }
            if session.idle_for(now_ms) >= idle_limit {
                // From the sweep's task, in the connection's span; client_id is repeated for
                // filters that leave the span out.
                session.span().in_scope(|| {
                    tracing::info!(client_id = %session.client_id, "idle timeout: dropping connection");
                });
                session.close(close_code::GOING_AWAY, "idle timeout", true);
                continue;
            }
            let beat = due(session.beat_phase(interval_secs));
            if beat {
                due_records.push((session.client_id.clone(), session.presence_projects()));
            }
            if session.is_commands() {
                // A worker's command stream: WebSocket pings on its beat, nothing else.
                if beat {
                    session.send_control(ping.clone());
                }
                continue;
            }
            if session.is_story() {
                // The seed's keepalive: its text `ping` once per `stories.keepalive_secs`
                // without a text message from the client (pongs do not count, as in the
                // seed; the sweep runs every second: one window, one ping), and WebSocket
                // pings on its beat; never a gateway message.
                let idle = session.text_silence(now_ms).as_secs();
                if idle >= keepalive && idle % keepalive == 0 {
                    session.send_control(story_ping.clone());
                }
                if beat {
                    session.send_control(ping.clone());
                }
                continue;
            }
            if beat {
                let key = match &session.scope {
                    Scope::Project(p) => p.clone(),
                    Scope::User | Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => {
                        format!("\0{}", session.client_id)
                    }
                };
                // The heartbeat and the ping in one buffer: one write, not two, per beat.
                let beat_frames = frames
                    .entry(key)
                    .or_insert_with(|| {
                        let hb = session.encode(&SystemHeartbeat { projects: None }, None);
                        let mut both = bytes::BytesMut::with_capacity(hb.len() + ping.len());
                        both.extend_from_slice(&hb);
                        both.extend_from_slice(&ping);
                        both.freeze()
                    })
                    .clone();
                session.send_control(beat_frames);
            }
        }
        drop(sessions);
        if let Some(recheck) = recheck.as_mut() {
            // Runs in the background: a slow Redis never delays the sweep.
            recheck.tick(&app, Instant::now());
        }
        // Never let a slow Redis delay the sweep.
        let app = app.clone();
        tokio::spawn(async move { refresh_records(&app, due_records).await });
    }
}

/// Refreshes the instance's registry entry and command-stream counts (a few keys, every
/// tick) and the TTLs of the records of `ids` (the connections whose beat it is).
async fn refresh_records(app: &App, ids: Vec<(String, Vec<String>)>) {
    let info = json!({
        "instance_id": app.instance_id,
        "connections": app.hub.session_count(),
        "started_secs_ago": app.started.elapsed().as_secs(),
    });
    let command_streams = app.hub.command_stream_counts();
    app.broker
        .refresh_instance(
            &app.instance_id,
            &info,
            &ids,
            &command_streams,
            app.record_ttl(),
        )
        .await;
}
