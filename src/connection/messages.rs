//! Client-to-server messages (docs/protocol.md §4): parse, check, act, answer.
//!
//! [`parse`] turns one text message into a typed [`ClientMessage`] or a [`Refusal`] and
//! touches no state (the `client_message` fuzz target drives it with arbitrary text); the
//! rest checks the message against the connection (granted and joined projects) and acts.
//! Bad input is answered with an `error` frame and never ends anyone else's relay; only
//! the offender's own connection may be closed (1008 after too many invalid messages in a
//! row, 4029 for persistent rate abuse). Commands are relayed to `project:{id}:commands`
//! and acknowledged with `command.accepted` carrying how many workers received them; a
//! command is never reported accepted when the broker did not take it. What one message
//! can cost is bounded before it is parsed (`ws.max_json_depth`) and what one connection
//! can subscribe to is capped (`ws.max_subscriptions_per_connection`).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{json, Map, Value};

pub use super::parse::{parse, ClientMessage, Command, Refusal};
use crate::app::App;
use crate::authz::Kind;
use crate::config::WsConfig;
use crate::event;
use crate::schema::types;
use crate::session::Session;
use crate::ws::close_code;
use crate::ws::frame;

/// A `status` reply costs one message of the connection's budget per project, plus one per
/// this many bytes of snapshot beyond the first: what one connection can make the gateway
/// read and send is bounded by its message rate, in bytes as well as in requests.
const STATUS_BYTES_PER_TOKEN: usize = 16 * 1024;

/// Window in which rate-limit refusals are counted toward a 4029 close.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Per-connection reader state: message rate and the invalid-message streak.
pub struct ClientState {
    limiter: Option<DefaultDirectRateLimiter>,
    /// The limiter's burst: a cost above it could never be admitted, so it is capped there.
    burst: u32,
    refusals: u32,
    window_start: Instant,
    close_after_refusals: u32,
    invalid_in_row: u32,
    max_invalid_in_row: u32,
}

impl ClientState {
    pub fn new(ws: &WsConfig) -> Self {
        let mut burst = 1;
        let limiter = NonZeroU32::new(ws.client_messages_per_sec).map(|rate| {
            let b = NonZeroU32::new(ws.client_messages_burst).unwrap_or(rate);
            burst = b.get();
            RateLimiter::direct(Quota::per_second(rate).allow_burst(b))
        });
        Self {
            limiter,
            burst,
            refusals: 0,
            window_start: Instant::now(),
            close_after_refusals: ws.rate_limit_close_after.max(1),
            invalid_in_row: 0,
            max_invalid_in_row: ws.max_invalid_in_row.max(1),
        }
    }

    /// Ok if the message may be processed; Err(true) if the connection must close (4029).
    /// The connection's reader also charges control and continuation frames here.
    pub fn admit(&mut self) -> Result<(), bool> {
        self.admit_n(1)
    }

    /// Like [`Self::admit`] for something that costs `n` messages (a `status` reply per
    /// project and per [`STATUS_BYTES_PER_TOKEN`] of snapshot).
    fn admit_n(&mut self, n: u32) -> Result<(), bool> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let admitted = match NonZeroU32::new(n.min(self.burst)) {
            None => true,
            Some(n) => matches!(limiter.check_n(n), Ok(Ok(()))),
        };
        if admitted {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(self.window_start) > REFUSAL_WINDOW {
            self.window_start = now;
            self.refusals = 0;
        }
        self.refusals += 1;
        Err(self.refusals >= self.close_after_refusals)
    }
}

fn error_frame(
    code: &str,
    message: &str,
    field: Option<&str>,
    request_id: Option<&str>,
) -> types::ServerError {
    types::ServerError {
        code: code.to_owned(),
        message: message.to_owned(),
        field: field.map(str::to_owned),
        request_id: request_id.map(str::to_owned),
    }
}

/// Handles one complete text message from the client.
pub async fn handle_text(app: &App, session: &Arc<Session>, state: &mut ClientState, text: &str) {
    if session.is_story() {
        story_text(app, session, state, text).await;
        return;
    }
    if session.is_commands() {
        // A worker's command stream is one-way: text `ping` is answered (`pong`), anything
        // else ignored; each message costs a unit of the budget, as on story sockets.
        if let Err(close) = state.admit_n(1) {
            if close {
                session.close(close_code::RATE_LIMITED, "rate limited", false);
            }
            return;
        }
        if text == "ping" {
            session.send_control(frame::text(b"pong"));
        }
        return;
    }
    if !charge(session, state, 1) {
        return;
    }
    let outcome = dispatch(app, session, state, text).await;
    match outcome {
        Ok(()) => state.invalid_in_row = 0,
        Err(refusal) => {
            let counts = refusal.is_invalid_input();
            session.send(
                &error_frame(refusal.code, &refusal.message, refusal.field, None),
                None,
            );
            if counts {
                state.invalid_in_row += 1;
                if state.invalid_in_row >= state.max_invalid_in_row {
                    session.close(close_code::POLICY, "too many invalid messages", false);
                }
            } else {
                state.invalid_in_row = 0;
            }
        }
    }
}

async fn dispatch(
    app: &App,
    session: &Arc<Session>,
    state: &mut ClientState,
    text: &str,
) -> Result<(), Refusal> {
    match parse(text, app.config.ws.max_json_depth)? {
        ClientMessage::TextPing => {
            session.send_control(frame::text(b"pong"));
            Ok(())
        }
        ClientMessage::Ping => {
            session.send(&types::Pong { projects: None }, None);
            Ok(())
        }
        ClientMessage::Status { project_id } => {
            status(app, session, state, project_id.as_deref()).await
        }
        ClientMessage::Command {
            kind,
            subject,
            parameters,
            request_id,
            project_id,
        } => {
            let project = target_project(session, project_id.as_deref())?;
            if !authorize_now(app, session, &project, request_id.as_deref()).await? {
                return Ok(());
            }
            command(app, session, project, kind, subject, parameters, request_id).await;
            Ok(())
        }
        ClientMessage::Subscribe { project_id } => subscribe(app, session, &project_id).await,
        ClientMessage::Unsubscribe { project_id } => {
            unsubscribe(app, session, &project_id).await;
            Ok(())
        }
        ClientMessage::AuthRefresh { token } => {
            refresh(app, session, &token).await;
            Ok(())
        }
    }
}

/// A story socket's client text, as seed 003 reads it: `ping` → `pong`, `status` → each
/// story's latest progress (nothing when there is none); anything else is ignored, with no
/// error frame (the seed's frontend does not expect one). Each message still costs one
/// unit of the connection's budget; over it, messages are dropped, and persistent abuse
/// closes 4029.
async fn story_text(app: &App, session: &Arc<Session>, state: &mut ClientState, text: &str) {
    session.note_text(crate::event::unix_millis());
    if let Err(close) = state.admit_n(1) {
        if close {
            session.close(close_code::RATE_LIMITED, "rate limited", false);
        }
        return;
    }
    match text {
        "ping" => session.send_control(frame::text(b"pong")),
        "status" => {
            // A read of a story's state, so authorized like the project `status`: against
            // the credential as it is now (a session is read again; a revoked or narrowed
            // one is closed by `revocation::apply`). No error frame on failure (the seed's
            // frontend expects none): nothing is sent.
            if !matches!(recheck_session(app, session).await, Ok(true)) {
                return;
            }
            if session
                .expires_at()
                .is_some_and(|exp| exp <= crate::event::unix_millis() / 1000)
            {
                session.close(close_code::EXPIRED, "credential expired", false);
                return;
            }
            let claims = session.claims();
            for (i, story) in session.projects().into_iter().enumerate() {
                // One read per story: each one past the first costs a unit of the budget,
                // as a project `status` does per project.
                if i > 0 && state.admit_n(1).is_err() {
                    return;
                }
                // The credential's grant, else the hook's (cached) answer; a hook failure
                // sends nothing for that story (not a denial, and no error frame).
                if !matches!(
                    app.authz.allows(&claims, Kind::Story, &story).await,
                    Ok(true)
                ) {
                    continue;
                }
                match app.broker.story_progress(&story).await {
                    Ok(Some(progress)) => session.send_frame(frame::text(&progress)),
                    Ok(None) => {}
                    Err(e) => session.span().in_scope(
                        || tracing::warn!(error = %e, story, "story progress read failed"),
                    ),
                }
            }
        }
        _ => {}
    }
}

/// Replies with the status snapshot of the connection's project(s), or of the one named,
/// charged by cost ([`STATUS_BYTES_PER_TOKEN`]) and served from the hub's snapshot cache.
async fn status(
    app: &App,
    session: &Arc<Session>,
    state: &mut ClientState,
    named: Option<&str>,
) -> Result<(), Refusal> {
    let projects = match named {
        Some(p) if session.has_project(p) => vec![p.to_owned()],
        Some(_) => {
            return Err(Refusal {
                code: "forbidden",
                message: "this connection is not subscribed to that project".into(),
                field: Some("project_id"),
            })
        }
        None => session.projects(),
    };
    // A read of project state, so authorized like an action: against the credential now.
    let Some(claims) = current_claims(app, session, None).await else {
        return Ok(());
    };
    for p in &projects {
        match app.authz.allows(&claims, Kind::Project, p).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(Refusal {
                    code: "forbidden",
                    message: format!("your credential does not grant project {p:?}"),
                    field: Some("project_id"),
                })
            }
            Err(e) => {
                hook_unavailable(session, e, None);
                return Ok(());
            }
        }
    }
    for (i, project) in projects.iter().enumerate() {
        // The message itself paid for the first project.
        if i > 0 && !charge(session, state, 1) {
            return Ok(());
        }
        match crate::greeting::current_snapshot(app, project).await {
            Ok(snap) => {
                let frame = session.message(snap.message(project));
                let extra = (frame.len() / STATUS_BYTES_PER_TOKEN) as u32;
                if !charge(session, state, extra) {
                    return Ok(());
                }
                session.send_frame(frame);
            }
            Err(e) => {
                session
                    .span()
                    .in_scope(|| tracing::warn!(error = %e, project, "status snapshot failed"));
                session.send(
                    &error_frame(
                        "broker_unavailable",
                        "the status snapshot is not available right now; retry later",
                        None,
                        None,
                    ),
                    None,
                );
            }
        }
    }
    Ok(())
}

/// Takes `n` more messages from the connection's budget; on refusal answers `rate_limited`
/// (closing 4029 on persistent abuse) and returns false.
fn charge(session: &Session, state: &mut ClientState, n: u32) -> bool {
    match state.admit_n(n) {
        Ok(()) => true,
        Err(close) => {
            session.send(
                &error_frame("rate_limited", "too many messages; slow down", None, None),
                None,
            );
            if close {
                session.close(close_code::RATE_LIMITED, "rate limited", false);
            }
            false
        }
    }
}

/// The project a command refers to: its `project_id` or, when it names none, the
/// connection's own project. Either way the connection must follow it now: a connection
/// that unsubscribed from its own project cannot act on it any more (refresh and the
/// session recheck only look at the projects a connection follows, so acting on any other
/// would dodge them).
fn target_project(session: &Session, named: Option<&str>) -> Result<String, Refusal> {
    let not_followed = || Refusal {
        code: "forbidden",
        message: "this connection is not subscribed to that project".into(),
        field: Some("project_id"),
    };
    match named {
        Some(p) if session.has_project(p) => Ok(p.to_owned()),
        Some(_) => Err(not_followed()),
        None => match session.primary_project() {
            Some(p) if session.has_project(&p) => Ok(p),
            Some(_) => Err(not_followed()),
            None => Err(Refusal::invalid(
                "project_id",
                "field `project_id` is required on /ws/user",
            )),
        },
    }
}

/// Authorizes an action (a command, a `subscribe`) on `project` against the credential as
/// it is now, not as it was at connect: the claims in force (replaced by `auth.refresh`
/// and the session recheck) must grant the project and must not have expired, and a
/// server-side session is read again (`session:{id}`, one GET with the broker's timeout)
/// so a revoked or narrowed session stops at once rather than at the next recheck.
/// Ok(false): the connection is closing or the credential could not be checked (already
/// answered); the action is not taken.
async fn authorize_now(
    app: &App,
    session: &Arc<Session>,
    project: &str,
    request_id: Option<&str>,
) -> Result<bool, Refusal> {
    let Some(claims) = current_claims(app, session, request_id).await else {
        return Ok(false);
    };
    match app.authz.allows(&claims, Kind::Project, project).await {
        Ok(true) => Ok(true),
        Ok(false) => Err(Refusal {
            code: "forbidden",
            message: "your credential does not grant this project".into(),
            field: Some("project_id"),
        }),
        Err(e) => {
            hook_unavailable(session, e, request_id);
            Ok(false)
        }
    }
}

/// The authorization hook could not answer (docs/protocol.md §10): not a denial. The
/// action is not taken and the client is told to retry; the connection stays.
fn hook_unavailable(session: &Session, e: crate::authz::HookError, request_id: Option<&str>) {
    session.span().in_scope(|| {
        tracing::warn!(error = %e, "authorization hook failed for an action");
    });
    session.send(
        &error_frame(
            "authorization_unavailable",
            "your access could not be checked right now; nothing was done, retry later",
            None,
            request_id,
        ),
        None,
    );
}

/// Reads the connection's session again, when a session is the credential in force, and
/// applies it (`revocation::apply`): Ok(false) when that closed the connection (revoked,
/// narrowed), Err when the store could not be read (nothing was decided).
async fn recheck_session(
    app: &App,
    session: &Arc<Session>,
) -> Result<bool, crate::broker::BrokerError> {
    let Some(id) = session.recheck_session_id().map(str::to_owned) else {
        return Ok(true);
    };
    let values = app.broker.session_values(&[id.as_str()]).await?;
    let value = values.into_iter().next().flatten();
    Ok(crate::revocation::apply(&app.authz, &app.hub, session, value.as_deref()).await)
}

/// The credential in force now: a session is read again (its revocation or narrowing
/// closes the connection, 4001/4003), an expired credential closes 4004. None: the
/// connection is closing, or the session could not be read (already answered with
/// `broker_unavailable`).
async fn current_claims(
    app: &App,
    session: &Arc<Session>,
    request_id: Option<&str>,
) -> Option<Arc<switchboard_middleware::Claims>> {
    match recheck_session(app, session).await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            session.span().in_scope(|| {
                tracing::warn!(error = %e, "session lookup for an action failed");
            });
            session.send(
                &error_frame(
                    "broker_unavailable",
                    "your session could not be checked right now; nothing was done, retry later",
                    None,
                    request_id,
                ),
                None,
            );
            return None;
        }
    }
    let claims = session.claims();
    if claims
        .expires_at()
        .is_some_and(|exp| exp <= crate::event::unix_millis() / 1000)
    {
        session.close(close_code::EXPIRED, "credential expired", false);
        return None;
    }
    Some(claims)
}

/// Relays a command to the project's workers and answers `command.accepted`, or
/// `broker_unavailable` when it was not sent.
async fn command(
    app: &App,
    session: &Arc<Session>,
    project: String,
    kind: Command,
    subject: String,
    parameters: Map<String, Value>,
    request_id: Option<String>,
) {
    let request_id = request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (name, mut payload) = match kind {
        Command::Execute => (
            "node.execute",
            json!({"type": "execute_node", "node_id": subject, "parameters": parameters}),
        ),
        Command::Cancel => (
            "task.cancel",
            json!({"type": "cancel_task", "task_id": subject}),
        ),
    };
    payload["client_id"] = json!(session.client_id);
    payload["user_id"] = json!(session.user_id());
    payload["project_id"] = json!(project);
    payload["request_id"] = json!(request_id);
    payload["timestamp"] = json!(event::now_rfc3339());
    let unavailable = || {
        session.send(
            &error_frame(
                "broker_unavailable",
                "the command could not be relayed right now; it was not sent, retry later",
                None,
                Some(&request_id),
            ),
            None,
        );
    };
    if !app.broker.is_up() {
        unavailable();
        return;
    }
    let bytes = serde_json::to_vec(&payload).unwrap_or_default();
    match app.broker.publish_command(&project, bytes).await {
        Ok(delivered_to) => {
            let counter = match kind {
                Command::Execute => &app.hub.metrics.commands_execute,
                Command::Cancel => &app.hub.metrics.commands_cancel,
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let accepted = types::CommandAccepted {
                command: name.to_owned(),
                request_id,
                delivered_to,
            };
            session.send(&accepted, Some(&project));
        }
        Err(e) => {
            session
                .span()
                .in_scope(|| tracing::warn!(error = %e, project, "command relay failed"));
            unavailable();
        }
    }
}

/// Adds a project the credential grants (`project` is already a valid id, see [`parse`]).
async fn subscribe(app: &App, session: &Arc<Session>, project: &str) -> Result<(), Refusal> {
    if !authorize_now(app, session, project, None).await? {
        return Ok(());
    }
    let max = app.config.ws.max_subscriptions_per_connection;
    let Ok(added) = session.add_project(project, max) else {
        return Err(Refusal {
            code: "too_many_subscriptions",
            message: format!(
                "a connection may follow at most {max} projects; unsubscribe from one first"
            ),
            field: Some("project_id"),
        });
    };
    if added && app.join_project(project, session, false).await.is_err() {
        session.remove_project(project);
        session.send(
            &error_frame(
                "broker_unavailable",
                "cannot subscribe right now; retry later",
                None,
                None,
            ),
            None,
        );
        return Ok(());
    }
    app.broker
        .presence_update(project, &session.client_id, Some(app.record_ttl()))
        .await;
    let position = app.broker.position(project).await.ok();
    let reply = types::Subscribed {
        seq: position.as_ref().map(|p| p.seq),
        epoch: position.map(|p| p.epoch),
    };
    session.send(&reply, Some(project));
    Ok(())
}

async fn unsubscribe(app: &App, session: &Arc<Session>, project: &str) {
    if session.remove_project(project) {
        app.hub.leave(project, session);
        app.broker
            .presence_update(project, &session.client_id, None)
            .await;
    }
    session.send(&types::Unsubscribed {}, Some(project));
}

/// Replaces the connection's credential; a bad one ends the connection (4001/4003). What
/// the new token does not grant, the authorization hook may; a hook that cannot answer
/// keeps the credential in force and says so (`authorization_unavailable`).
async fn refresh(app: &App, session: &Arc<Session>, token: &str) {
    let verified = match app.auth.jwt() {
        Some(jwt) => jwt.verify(token),
        None => Err(switchboard_middleware::AuthError::NotConfigured),
    };
    let claims = match verified {
        Ok(c) => c,
        Err(e) => {
            session.close(close_code::UNAUTHENTICATED, e.code(), false);
            return;
        }
    };
    if claims.sub != session.user_id() {
        session.close(
            close_code::UNAUTHENTICATED,
            "token is for another user",
            false,
        );
        return;
    }
    match app
        .authz
        .allows_all(&claims, Kind::Project, &session.projects())
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            session.close(
                close_code::FORBIDDEN,
                "token does not grant this connection's projects",
                false,
            );
            return;
        }
        Err(e) => {
            hook_unavailable(session, e, None);
            return;
        }
    }
    let expires_at = claims.expires_at();
    if let Some(sooner) = session.set_claims(Arc::new(claims)) {
        app.hub.check_at(session, sooner);
    }
    session.send(&types::AuthRefreshed { expires_at }, None);
}
