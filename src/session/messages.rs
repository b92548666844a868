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

use super::{close_code, Session};
use crate::app::App;
use crate::config::WsConfig;
use crate::event;
use crate::frame;
use crate::project::valid_project_id;

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

/// Why one client message was refused; answered as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `invalid_json`, `invalid_message` or `unknown_type` (from [`parse`]), or
    /// `forbidden` (from the checks against the connection).
    pub code: &'static str,
    /// Human text for the client; quotes at most 64 bytes of the client's own input.
    pub message: String,
    /// The offending field, when there is one.
    pub field: Option<&'static str>,
}

impl Refusal {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_message",
            message: message.into(),
            field: Some(field),
        }
    }

    /// Whether the refusal counts toward the invalid-message streak (close 1008).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self.code,
            "invalid_json" | "invalid_message" | "unknown_type"
        )
    }
}

/// Which relayed command a [`ClientMessage::Command`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `node.execute`, relayed as `execute_node`.
    Execute,
    /// `task.cancel`, relayed as `cancel_task`.
    Cancel,
}

/// One client message with its fields checked for presence and JSON type (docs/protocol.md §4).
/// Whether this connection may act on it (granted, joined projects) is checked later.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Text `ping`: answered with text `pong`.
    TextPing,
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
    /// Text `status` or `{"type":"status"}`: the named project, or every project of the
    /// connection.
    Status { project_id: Option<String> },
    /// `node.execute` / `task.cancel`. `subject` is the non-empty `node_id` / `task_id`;
    /// `parameters` is `{}` when absent or null, and always `{}` for a cancel.
    Command {
        kind: Command,
        subject: String,
        parameters: Map<String, Value>,
        request_id: Option<String>,
        project_id: Option<String>,
    },
    /// `project_id` is a valid project id (`[A-Za-z0-9_.-]{1,128}`, not `user`).
    Subscribe { project_id: String },
    /// Any non-empty `project_id`: dropping a project the connection does not have is a
    /// no-op that is still answered.
    Unsubscribe { project_id: String },
    /// `token` is non-empty; it is verified when acted on.
    AuthRefresh { token: String },
}

/// Parses one complete text message. Never panics, whatever the text.
pub fn parse(text: &str, max_depth: usize) -> Result<ClientMessage, Refusal> {
    match text {
        "ping" => return Ok(ClientMessage::TextPing),
        "status" => return Ok(ClientMessage::Status { project_id: None }),
        _ => {}
    }
    // Before parsing: a deeply nested message costs the parser one recursion and one
    // allocation per level, and past its own limit it would only say "not JSON".
    if crate::json_depth::exceeds(text.as_bytes(), max_depth) {
        return Err(Refusal {
            code: "invalid_message",
            message: format!("message nests JSON deeper than {max_depth} levels"),
            field: None,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|_| Refusal {
        code: "invalid_json",
        message: "message is not valid JSON".into(),
        field: None,
    })?;
    let Value::Object(mut msg) = value else {
        return Err(Refusal {
            code: "invalid_message",
            message: "message must be a JSON object".into(),
            field: None,
        });
    };
    let kind = match msg.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err(Refusal::invalid(
                "type",
                "field `type` is required and must be a string",
            ))
        }
    };
    let owned = |s: Option<&str>| s.map(str::to_owned);
    match kind.as_str() {
        "ping" => Ok(ClientMessage::Ping),
        "status" => Ok(ClientMessage::Status {
            project_id: owned(optional_string(&msg, "project_id")?),
        }),
        "node.execute" | "task.cancel" => {
            // Checked in this order so the error names the first bad field a reader of
            // docs/protocol.md §4 would look at.
            let request_id = owned(optional_string(&msg, "request_id")?);
            let project_id = owned(optional_string(&msg, "project_id")?);
            let (kind, subject, parameters) = if kind == "node.execute" {
                let node_id = required_string(&msg, "node_id")?.to_owned();
                let parameters = match msg.remove("parameters") {
                    None | Some(Value::Null) => Map::new(),
                    Some(Value::Object(p)) => p,
                    Some(_) => {
                        return Err(Refusal::invalid(
                            "parameters",
                            "field `parameters` must be an object",
                        ))
                    }
                };
                (Command::Execute, node_id, parameters)
            } else {
                let task_id = required_string(&msg, "task_id")?.to_owned();
                (Command::Cancel, task_id, Map::new())
            };
            Ok(ClientMessage::Command {
                kind,
                subject,
                parameters,
                request_id,
                project_id,
            })
        }
        "subscribe" => {
            let project = required_string(&msg, "project_id")?;
            if !valid_project_id(project) {
                return Err(Refusal::invalid("project_id", "invalid project id"));
            }
            Ok(ClientMessage::Subscribe {
                project_id: project.to_owned(),
            })
        }
        "unsubscribe" => Ok(ClientMessage::Unsubscribe {
            project_id: required_string(&msg, "project_id")?.to_owned(),
        }),
        "auth.refresh" => Ok(ClientMessage::AuthRefresh {
            token: required_string(&msg, "token")?.to_owned(),
        }),
        other => Err(Refusal {
            code: "unknown_type",
            message: format!("unknown message type {:?}", truncate(other, 64)),
            field: Some("type"),
        }),
    }
}

fn error_frame(code: &str, message: &str, field: Option<&str>, request_id: Option<&str>) -> Value {
    let mut v = json!({"type": "error", "code": code, "message": message});
    if let Some(f) = field {
        v["field"] = json!(f);
    }
    if let Some(r) = request_id {
        v["request_id"] = json!(r);
    }
    v
}

/// Handles one complete text message from the client.
pub async fn handle_text(app: &App, session: &Arc<Session>, state: &mut ClientState, text: &str) {
    if !charge(session, state, 1) {
        return;
    }
    let outcome = dispatch(app, session, state, text).await;
    match outcome {
        Ok(()) => state.invalid_in_row = 0,
        Err(refusal) => {
            let counts = refusal.is_invalid_input();
            session.reply(error_frame(
                refusal.code,
                &refusal.message,
                refusal.field,
                None,
            ));
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
            session.reply(json!({"type": "pong"}));
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
            refresh(app, session, &token);
            Ok(())
        }
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
    if let Some(p) = projects.iter().find(|p| !claims.grants(p)) {
        return Err(Refusal {
            code: "forbidden",
            message: format!("your credential does not grant project {p:?}"),
            field: Some("project_id"),
        });
    }
    for (i, project) in projects.iter().enumerate() {
        // The message itself paid for the first project.
        if i > 0 && !charge(session, state, 1) {
            return Ok(());
        }
        match crate::resume::current_snapshot(app, project).await {
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
                session.reply(error_frame(
                    "broker_unavailable",
                    "the status snapshot is not available right now; retry later",
                    None,
                    None,
                ));
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
            session.reply(error_frame(
                "rate_limited",
                "too many messages; slow down",
                None,
                None,
            ));
            if close {
                session.close(close_code::RATE_LIMITED, "rate limited", false);
            }
            false
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

fn optional_string<'a>(
    msg: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Refusal> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Refusal::invalid(
            field,
            format!("field `{field}` must be a string"),
        )),
    }
}

fn required_string<'a>(
    msg: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, Refusal> {
    match optional_string(msg, field)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Refusal::invalid(
            field,
            format!("field `{field}` is required and must be a non-empty string"),
        )),
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
    if !claims.grants(project) {
        return Err(Refusal {
            code: "forbidden",
            message: "your credential does not grant this project".into(),
            field: Some("project_id"),
        });
    }
    Ok(true)
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
    if let Some(id) = session.recheck_session_id().map(str::to_owned) {
        match app.broker.session_values(&[id.as_str()]).await {
            Ok(values) => {
                let value = values.into_iter().next().flatten();
                if !crate::revocation::apply(session, value.as_deref()) {
                    return None;
                }
            }
            Err(e) => {
                session.span().in_scope(|| {
                    tracing::warn!(error = %e, "session lookup for an action failed");
                });
                session.reply(error_frame(
                    "broker_unavailable",
                    "your session could not be checked right now; nothing was done, retry later",
                    None,
                    request_id,
                ));
                return None;
            }
        }
    }
    let claims = session.claims();
    if claims
        .expires_at()
        .is_some_and(|exp| exp <= crate::session::unix_millis() / 1000)
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
        session.reply(error_frame(
            "broker_unavailable",
            "the command could not be relayed right now; it was not sent, retry later",
            None,
            Some(&request_id),
        ));
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
            session.reply(json!({
                "type": "command.accepted",
                "command": name,
                "request_id": request_id,
                "project_id": project,
                "delivered_to": delivered_to,
            }));
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
    if added && app.join_project(project, session).await.is_err() {
        session.remove_project(project);
        session.reply(error_frame(
            "broker_unavailable",
            "cannot subscribe right now; retry later",
            None,
            None,
        ));
        return Ok(());
    }
    app.broker
        .presence_update(project, &session.client_id, Some(app.record_ttl()))
        .await;
    let position = app.broker.position(project).await.ok();
    let mut reply = json!({"type": "subscribed", "project_id": project});
    if let Some(p) = position {
        reply["seq"] = json!(p.seq);
        reply["epoch"] = json!(p.epoch);
    }
    session.reply(reply);
    Ok(())
}

async fn unsubscribe(app: &App, session: &Arc<Session>, project: &str) {
    if session.remove_project(project) {
        app.hub.leave(project, session);
        app.broker
            .presence_update(project, &session.client_id, None)
            .await;
    }
    session.reply(json!({"type": "unsubscribed", "project_id": project}));
}

/// Replaces the connection's credential; a bad one ends the connection (4001/4003).
fn refresh(app: &App, session: &Arc<Session>, token: &str) {
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
    if !session.projects().iter().all(|p| claims.grants(p)) {
        session.close(
            close_code::FORBIDDEN,
            "token does not grant this connection's projects",
            false,
        );
        return;
    }
    let expires_at = claims.expires_at();
    session.set_claims(Arc::new(claims));
    session.reply(json!({"type": "auth.refreshed", "expires_at": expires_at}));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`super::parse`] with the default depth limit.
    fn parse(text: &str) -> Result<ClientMessage, Refusal> {
        super::parse(text, 32)
    }

    fn refused(text: &str) -> Refusal {
        parse(text).expect_err(text)
    }

    #[test]
    fn text_shortcuts_and_typed_messages() {
        assert_eq!(parse("ping").unwrap(), ClientMessage::TextPing);
        assert_eq!(
            parse("status").unwrap(),
            ClientMessage::Status { project_id: None }
        );
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientMessage::Ping);
        assert_eq!(
            parse(r#"{"type":"node.execute","node_id":"n","request_id":"r"}"#).unwrap(),
            ClientMessage::Command {
                kind: Command::Execute,
                subject: "n".into(),
                parameters: Map::new(),
                request_id: Some("r".into()),
                project_id: None,
            }
        );
        let ClientMessage::Command { parameters, .. } =
            parse(r#"{"type":"node.execute","node_id":"n","parameters":{"a":1}}"#).unwrap()
        else {
            panic!("not a command")
        };
        assert_eq!(Value::Object(parameters), json!({"a": 1}));
        assert_eq!(
            parse(r#"{"type":"task.cancel","task_id":"t","project_id":"p"}"#).unwrap(),
            ClientMessage::Command {
                kind: Command::Cancel,
                subject: "t".into(),
                parameters: Map::new(),
                request_id: None,
                project_id: Some("p".into()),
            }
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","project_id":"a.b-c"}"#).unwrap(),
            ClientMessage::Subscribe {
                project_id: "a.b-c".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"auth.refresh","token":"x.y.z"}"#).unwrap(),
            ClientMessage::AuthRefresh {
                token: "x.y.z".into()
            }
        );
    }

    #[test]
    fn refusals_name_code_and_field() {
        assert_eq!(refused("pong").code, "invalid_json");
        assert_eq!(refused("[1]").code, "invalid_message");
        assert_eq!(refused(r#"{"type":1}"#).field, Some("type"));
        let r = refused(r#"{"type":"node.execute","node_id":"n","parameters":[]}"#);
        assert_eq!((r.code, r.field), ("invalid_message", Some("parameters")));
        assert_eq!(
            refused(r#"{"type":"task.cancel","task_id":""}"#).field,
            Some("task_id")
        );
        assert_eq!(
            refused(r#"{"type":"subscribe","project_id":"user"}"#).field,
            Some("project_id")
        );
        assert_eq!(
            refused(r#"{"type":"auth.refresh","token":7}"#).field,
            Some("token")
        );
        for r in [refused("pong"), refused(r#"{"type":"made.up"}"#)] {
            assert!(r.is_invalid_input());
        }
    }

    #[test]
    fn an_unknown_type_is_quoted_at_most_64_bytes_on_a_char_boundary() {
        // 63 ASCII bytes then a 2-byte character straddling the cut.
        let kind = format!("{}é{}", "a".repeat(63), "b".repeat(500));
        let r = refused(&json!({ "type": kind }).to_string());
        assert_eq!(r.code, "unknown_type");
        assert!(r.message.contains(&"a".repeat(63)) && !r.message.contains('é'));
        assert!(r.message.len() < 100, "{}", r.message);
    }
}
