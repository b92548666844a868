//! The service API (docs/protocol.md §6): publish, presence and broadcast, each behind a service
//! credential and the grant it carries.
//!
//! The publish API checks and fills every event of a batch before the broker sees any of
//! it, so a batch is all-or-nothing. A broadcast follows the global channel's routing
//! (docs/protocol.md §3): one that names a `project_id` goes to that project only and needs a grant
//! for it; one without goes to every connection and needs a grant of `["*"]`. Bodies are
//! bounded in bytes (`api.max_body_bytes`) and in time (`api.body_read_timeout_secs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use switchboard_middleware::{Authentication, Claims};

use super::{
    invalid_project_id, json_error, json_response, retry_after, valid_project_id, Response,
};
use crate::app::App;
use crate::broker::{Broker, BrokerError};
use crate::event;

/// The service credential of an API call, or the response refusing it.
#[allow(clippy::result_large_err)] // the error IS the response; it is built once per call
fn service_claims<B>(req: &Request<B>) -> Result<Arc<Claims>, Response> {
    match req.extensions().get::<Authentication>() {
        Some(Authentication::Authenticated(c)) if c.is_service() => Ok(c.clone()),
        Some(Authentication::Authenticated(_)) => Err(json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this API needs a service credential (role: service)",
        )),
        // Issue 10 item 4: the session store is down, which is not the caller's fault.
        Some(Authentication::Invalid(e)) if e.is_unavailable() => Err(retry_after(
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                e.code(),
                e.client_message(),
            ),
            2,
        )),
        Some(Authentication::Invalid(e)) => Err(json_error(
            StatusCode::UNAUTHORIZED,
            e.code(),
            e.client_message(),
        )),
        _ => Err(json_error(
            StatusCode::UNAUTHORIZED,
            "missing_credentials",
            "a service token is required",
        )),
    }
}

/// A service credential that grants `project`, or the response refusing the call.
#[allow(clippy::result_large_err)] // as above
fn project_service_claims<B>(req: &Request<B>, project: &str) -> Result<Arc<Claims>, Response> {
    let claims = service_claims(req)?;
    if !claims.grants(project) {
        return Err(json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        ));
    }
    Ok(claims)
}

/// Reads a JSON body of at most `api.max_body_bytes`.
async fn read_json(app: &App, req: Request<Incoming>) -> Result<Value, Response> {
    let limit = app.config.api.max_body_bytes;
    let too_large = || {
        json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("request body over {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // Bounded in time as well as in bytes: a body trickled a byte at a time would otherwise
    // hold this task (and a credential already checked) for as long as the client likes.
    let wait = Duration::from_secs(app.config.api.body_read_timeout_secs);
    let read = tokio::time::timeout(wait, Limited::new(req.into_body(), limit).collect());
    let body = match read.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "could not read the request body",
            ))
        }
        Err(_) => {
            let mut r = json_error(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                &format!(
                    "the request body did not arrive within {} s",
                    wait.as_secs()
                ),
            );
            // The rest of the body may still be coming: this connection cannot be reused.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(r);
        }
    };
    // A batch wraps its events in an array: one level more than an event may use.
    let depth = app.config.events.max_json_depth;
    let batch = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if crate::json_depth::exceeds(&body, depth + usize::from(batch)) {
        app.hub.metrics.rejected("too_deep");
        return Err(json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_deep",
            &format!("an event may nest JSON at most {depth} levels deep"),
        ));
    }
    serde_json::from_slice(&body).map_err(|_| {
        json_error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "body is not valid JSON",
        )
    })
}

fn broker_failure(e: BrokerError) -> Response {
    match e {
        BrokerError::Unavailable(reason) => {
            tracing::warn!(%reason, "publish refused: broker unavailable");
            retry_after(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_unavailable",
                    "the event broker is unreachable; retry shortly",
                ),
                2,
            )
        }
        BrokerError::NotReplicated { wanted, confirmed } => {
            tracing::warn!(
                wanted,
                confirmed,
                "publish not confirmed by the replicas in time"
            );
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_replicated",
                &format!(
                    "the event was published but only {confirmed} of {wanted} replicas confirmed \
                     it in time; a failover now could lose it"
                ),
            )
        }
        BrokerError::Protocol(reason) => {
            tracing::error!(%reason, "publish failed");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the event could not be published",
            )
        }
    }
}

/// The embedded broker fans events out inside `publish_*` (under the project's lock), so
/// its return is the end of fan-out. With Redis, events are fanned out, and timed, when they
/// come back on the pub/sub connection; observing here too would count them twice.
fn observe_inline_fanout(app: &App, arrived: Instant, events: u64) {
    if let Broker::Memory(_) = app.broker {
        app.hub.metrics.fanout.observe_n(arrived.elapsed(), events);
    }
}

fn invalid_event(index: usize, e: &event::EventError) -> Response {
    // Counted where refused; see the callers.
    let mut body =
        json!({"error": "invalid_event", "message": format!("event {index}: {e}"), "index": index});
    if let Some(field) = e.field() {
        body["field"] = json!(field);
    }
    json_response(StatusCode::UNPROCESSABLE_ENTITY, &body)
}

pub(super) async fn publish(app: &App, project: &str, req: Request<Incoming>) -> Response {
    if !valid_project_id(project) {
        return invalid_project_id();
    }
    if let Err(r) = project_service_claims(&req, project) {
        return r;
    }
    let body = match read_json(app, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let arrived = Instant::now();
    let items = match body {
        Value::Array(items) if items.is_empty() => {
            return json_error(
                StatusCode::BAD_REQUEST,
                "empty_batch",
                "the array holds no event",
            )
        }
        Value::Array(items) => items,
        other => vec![other],
    };
    let limit = app.config.events.max_event_bytes;
    let policy = app.config.event_policy();
    let mut encoded = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let refuse = |e: event::EventError| {
            app.hub.metrics.rejected(e.reason());
            invalid_event(index, &e)
        };
        let Value::Object(mut ev) = item else {
            return refuse(event::EventError::NotObject);
        };
        if let Err(e) = event::check_envelope(project, &ev) {
            return refuse(e);
        }
        ev.remove("seq"); // seq is the gateway's to assign
        let kind = ev
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let value = Value::Object(ev);
        if let Err(e) = policy.check_project_value(&kind, &value) {
            return refuse(e.into());
        }
        let Value::Object(mut ev) = value else {
            return invalid_event(index, &event::EventError::NotObject);
        };
        event::fill_envelope(&mut ev, project);
        let bytes = serde_json::to_vec(&ev).unwrap_or_default();
        if bytes.len() > limit {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("event {index} is over {limit} bytes"),
            );
        }
        encoded.push(bytes);
    }
    if !app.broker.is_up() {
        return broker_failure(BrokerError::Unavailable("pub/sub down".into()));
    }
    let n = encoded.len() as u64;
    match app.broker.publish_events(project, encoded).await {
        Ok(seqs) => {
            app.hub
                .metrics
                .events_from_api
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            observe_inline_fanout(app, arrived, n);
            json_response(StatusCode::ACCEPTED, &json!({"seq": seqs}))
        }
        Err(e) => broker_failure(e),
    }
}

/// Connected clients of a project across all instances (docs/protocol.md §6).
pub(super) async fn presence(app: &App, project: &str, req: &Request<Incoming>) -> Response {
    if !valid_project_id(project) {
        return invalid_project_id();
    }
    if let Err(r) = project_service_claims(req, project) {
        return r;
    }
    let entry = |client_id: &Value, user_id: &Value, instance_id: &Value, connected_at: &Value| json!({"client_id": client_id, "user_id": user_id, "instance_id": instance_id, "connected_at": connected_at});
    let clients: Vec<Value> = match app.broker.presence(project).await {
        Ok(Some(records)) => records
            .iter()
            .map(|r| {
                entry(
                    &r["client_id"],
                    &r["user_id"],
                    &r["instance_id"],
                    &r["connected_at"],
                )
            })
            .collect(),
        Ok(None) => app
            .hub
            .project_sessions(project)
            .iter()
            .map(|s| {
                entry(
                    &json!(s.client_id),
                    &json!(s.user_id()),
                    &json!(app.instance_id),
                    &json!(s.connected_at()),
                )
            })
            .collect(),
        Err(e) => return broker_failure(e),
    };
    json_response(
        StatusCode::OK,
        &json!({"project_id": project, "clients": clients}),
    )
}

/// `POST /v1/broadcast`: a global event (docs/protocol.md §3 routing, §6).
pub(super) async fn broadcast(app: &App, req: Request<Incoming>) -> Response {
    let claims = match service_claims(&req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    // A credential that could never broadcast anything is refused before its body is read.
    if claims.projects.is_empty() {
        return forbidden("your credential grants no project");
    }
    let body = match read_json(app, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let arrived = Instant::now();
    let Value::Object(mut ev): Value = body else {
        return refuse_broadcast(app, &event::EventError::NotObject);
    };
    let Some(Value::String(kind)) = ev.get("type") else {
        return refuse_broadcast(app, &event::EventError::MissingType);
    };
    let kind = kind.clone();
    if ev.get("project_id").is_some_and(Value::is_null) {
        ev.remove("project_id");
    }
    // The protocol's global types go to every connection whatever project they name.
    let everyone = crate::schema::is_global(&kind);
    match ev.get("project_id") {
        None if !claims.grants_all() => {
            return forbidden(
                "an event without project_id goes to every project: it needs a grant of [\"*\"]",
            )
        }
        Some(_) if everyone && !claims.grants_all() => {
            return forbidden(&format!(
            "{kind} is a global event that goes to every connection: it needs a grant of [\"*\"]"
        ))
        }
        None => {}
        Some(Value::String(p)) if !valid_project_id(p) => {
            return refuse_broadcast(app, &event::EventError::BadProjectId)
        }
        Some(Value::String(p)) if !claims.grants(p) => {
            return forbidden("your credential does not grant this project")
        }
        Some(Value::String(_)) => {}
        Some(_) => return refuse_broadcast(app, &event::EventError::BadProjectId),
    }
    let value = Value::Object(ev);
    if let Err(e) = app.config.event_policy().check_global_value(&kind, &value) {
        return refuse_broadcast(app, &e.into());
    }
    let Value::Object(mut ev) = value else {
        return refuse_broadcast(app, &event::EventError::NotObject);
    };
    ev.remove("seq"); // only the publish path assigns seq
    if !matches!(ev.get("timestamp"), Some(Value::String(_))) {
        ev.insert("timestamp".into(), Value::String(event::now_rfc3339()));
    }
    let bytes = serde_json::to_vec(&Value::Object(ev)).unwrap_or_default();
    if bytes.len() > app.config.events.max_event_bytes {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "event too large",
        );
    }
    if !app.broker.is_up() {
        return broker_failure(BrokerError::Unavailable("pub/sub down".into()));
    }
    match app.broker.publish_broadcast(bytes).await {
        Ok(()) => {
            observe_inline_fanout(app, arrived, 1);
            json_response(StatusCode::ACCEPTED, &json!({"status": "accepted"}))
        }
        Err(e) => broker_failure(e),
    }
}

fn refuse_broadcast(app: &App, e: &event::EventError) -> Response {
    app.hub.metrics.rejected(e.reason());
    invalid_event(0, e)
}

fn forbidden(message: &str) -> Response {
    json_error(StatusCode::FORBIDDEN, "forbidden", message)
}

/// `POST /v1/stories/{id}/progress` (docs/protocol.md §9): a service credential whose
/// `stories` or `projects` claim lists the story (or is `["*"]`) stores the progress as the
/// story's latest and publishes it on `story:{id}`, in one atomic step, so a socket that
/// connects afterwards starts from it. Invalid progress is 400 naming the field.
pub async fn story_progress(app: &App, story: &str, req: Request<Incoming>) -> Response {
    if !valid_project_id(story) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_story_id",
            "story_id must match [A-Za-z0-9_.-]{1,128}",
        );
    }
    let claims = match service_claims(&req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !(claims.grants_story(story) || claims.grants(story)) {
        return forbidden("your credential does not grant this story");
    }
    let value = match read_json(app, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let depth = app.config.events.max_json_depth;
    if let Err(e) = crate::story::check(&bytes, app.config.events.max_event_bytes, depth) {
        app.hub.metrics.rejected(e.reason());
        let mut body = json!({"error": "invalid_progress", "message": e.to_string()});
        if let Some(field) = e.field() {
            body["field"] = json!(field);
        }
        return json_response(StatusCode::BAD_REQUEST, &body);
    }
    if !app.broker.is_up() {
        return broker_failure(BrokerError::Unavailable("pub/sub down".into()));
    }
    match app.broker.publish_story(story, bytes).await {
        Ok(delivered_to) => json_response(
            StatusCode::ACCEPTED,
            &json!({"status": "accepted", "delivered_to": delivered_to}),
        ),
        Err(e) => broker_failure(e),
    }
}
