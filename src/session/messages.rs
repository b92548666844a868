//! Client-to-server messages (PROTOCOL §4): parse, check, act, answer.
//!
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
use crate::routes::valid_project_id;

/// Window in which rate-limit refusals are counted toward a 4029 close.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);

/// Per-connection reader state: message rate and the invalid-message streak.
pub struct ClientState {
    limiter: Option<DefaultDirectRateLimiter>,
    refusals: u32,
    window_start: Instant,
    close_after_refusals: u32,
    invalid_in_row: u32,
    max_invalid_in_row: u32,
}

impl ClientState {
    pub fn new(ws: &WsConfig) -> Self {
        let limiter = NonZeroU32::new(ws.client_messages_per_sec).map(|rate| {
            let burst = NonZeroU32::new(ws.client_messages_burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        Self {
            limiter,
            refusals: 0,
            window_start: Instant::now(),
            close_after_refusals: ws.rate_limit_close_after.max(1),
            invalid_in_row: 0,
            max_invalid_in_row: ws.max_invalid_in_row.max(1),
        }
    }

    /// Ok if the message may be processed; Err(true) if the connection must close (4029).
    fn admit(&mut self) -> Result<(), bool> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.check().is_ok() {
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

/// A refusal of one client message.
struct Refusal {
    code: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl Refusal {
    fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_message",
            message: message.into(),
            field: Some(field),
        }
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
    if let Err(close) = state.admit() {
        session.reply(error_frame(
            "rate_limited",
            "too many messages; slow down",
            None,
            None,
        ));
        if close {
            session.close(close_code::RATE_LIMITED, "rate limited", false);
        }
        return;
    }
    let outcome = dispatch(app, session, text).await;
    match outcome {
        Ok(()) => state.invalid_in_row = 0,
        Err(refusal) => {
            let counts = matches!(
                refusal.code,
                "invalid_json" | "invalid_message" | "unknown_type"
            );
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

async fn dispatch(app: &App, session: &Arc<Session>, text: &str) -> Result<(), Refusal> {
    match text {
        "ping" => {
            session.send_control(frame::text(b"pong"));
            return Ok(());
        }
        "status" => return status(app, session, None).await,
        _ => {}
    }
    // Before parsing: a deeply nested message costs the parser one recursion and one
    // allocation per level, and past its own limit it would only say "not JSON".
    let max_depth = app.config.ws.max_json_depth;
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
    let Value::Object(msg) = value else {
        return Err(Refusal {
            code: "invalid_message",
            message: "message must be a JSON object".into(),
            field: None,
        });
    };
    let Some(Value::String(kind)) = msg.get("type") else {
        return Err(Refusal::invalid(
            "type",
            "field `type` is required and must be a string",
        ));
    };
    match kind.as_str() {
        "ping" => {
            session.reply(json!({"type": "pong"}));
            Ok(())
        }
        "node.execute" => command(app, session, &msg, Command::Execute).await,
        "task.cancel" => command(app, session, &msg, Command::Cancel).await,
        "subscribe" => subscribe(app, session, &msg).await,
        "unsubscribe" => unsubscribe(app, session, &msg).await,
        "auth.refresh" => refresh(app, session, &msg),
        "status" => status(app, session, Some(&msg)).await,
        other => Err(Refusal {
            code: "unknown_type",
            message: format!("unknown message type {:?}", truncate(other, 64)),
            field: Some("type"),
        }),
    }
}

/// Replies with the status snapshot of the connection's project(s), or of the one named.
async fn status(
    app: &App,
    session: &Arc<Session>,
    msg: Option<&Map<String, Value>>,
) -> Result<(), Refusal> {
    let named = match msg {
        Some(m) => optional_string(m, "project_id")?,
        None => None,
    };
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
    for project in projects {
        match app.broker.snapshot(&project).await {
            Ok(snap) => session.reply(snap.message(&project)),
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

/// The project a message refers to: its `project_id` (which must be one of this
/// connection's projects) or the connection's own project.
fn target_project(session: &Session, msg: &Map<String, Value>) -> Result<String, Refusal> {
    match optional_string(msg, "project_id")? {
        Some(p) if session.has_project(p) => Ok(p.to_owned()),
        Some(_) => Err(Refusal {
            code: "forbidden",
            message: "this connection is not subscribed to that project".into(),
            field: Some("project_id"),
        }),
        None => session.primary_project().ok_or_else(|| {
            Refusal::invalid("project_id", "field `project_id` is required on /ws/user")
        }),
    }
}

#[derive(Clone, Copy)]
enum Command {
    Execute,
    Cancel,
}

async fn command(
    app: &App,
    session: &Arc<Session>,
    msg: &Map<String, Value>,
    kind: Command,
) -> Result<(), Refusal> {
    let request_id = optional_string(msg, "request_id")?
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let project = target_project(session, msg)?;
    let (name, mut payload) = match kind {
        Command::Execute => {
            let node_id = required_string(msg, "node_id")?;
            let parameters = match msg.get("parameters") {
                None | Some(Value::Null) => Value::Object(Map::new()),
                Some(v @ Value::Object(_)) => v.clone(),
                Some(_) => {
                    return Err(Refusal::invalid(
                        "parameters",
                        "field `parameters` must be an object",
                    ))
                }
            };
            (
                "node.execute",
                json!({"type": "execute_node", "node_id": node_id, "parameters": parameters}),
            )
        }
        Command::Cancel => {
            let task_id = required_string(msg, "task_id")?;
            (
                "task.cancel",
                json!({"type": "cancel_task", "task_id": task_id}),
            )
        }
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
        return Ok(());
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
    Ok(())
}

async fn subscribe(
    app: &App,
    session: &Arc<Session>,
    msg: &Map<String, Value>,
) -> Result<(), Refusal> {
    let project = required_string(msg, "project_id")?;
    if !valid_project_id(project) {
        return Err(Refusal::invalid("project_id", "invalid project id"));
    }
    if !session.claims().grants(project) {
        return Err(Refusal {
            code: "forbidden",
            message: "your credential does not grant this project".into(),
            field: Some("project_id"),
        });
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
    if added && app.hub.join(project, session).await.is_err() {
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

async fn unsubscribe(
    app: &App,
    session: &Arc<Session>,
    msg: &Map<String, Value>,
) -> Result<(), Refusal> {
    let project = required_string(msg, "project_id")?;
    if session.remove_project(project) {
        app.hub.leave(project, session);
        app.broker
            .presence_update(project, &session.client_id, None)
            .await;
    }
    session.reply(json!({"type": "unsubscribed", "project_id": project}));
    Ok(())
}

fn refresh(app: &App, session: &Arc<Session>, msg: &Map<String, Value>) -> Result<(), Refusal> {
    let token = required_string(msg, "token")?;
    let verified = match app.auth.jwt() {
        Some(jwt) => jwt.verify(token),
        None => Err(switchboard_middleware::AuthError::NotConfigured),
    };
    let claims = match verified {
        Ok(c) => c,
        Err(e) => {
            session.close(close_code::UNAUTHENTICATED, e.code(), false);
            return Ok(());
        }
    };
    if claims.sub != session.user_id() {
        session.close(
            close_code::UNAUTHENTICATED,
            "token is for another user",
            false,
        );
        return Ok(());
    }
    if !session.projects().iter().all(|p| claims.grants(p)) {
        session.close(
            close_code::FORBIDDEN,
            "token does not grant this connection's projects",
            false,
        );
        return Ok(());
    }
    let expires_at = claims.expires_at();
    session.set_claims(Arc::new(claims));
    session.reply(json!({"type": "auth.refreshed", "expires_at": expires_at}));
    Ok(())
}
