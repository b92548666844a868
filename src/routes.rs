//! The HTTP surface (PROTOCOL §6): routing, health, the publish API, broadcast, ws-url,
//! and the console's static files (src/console.rs).
//!
//! Every error before an upgrade is a JSON `{"error", "message"}` built by [`json_error`];
//! internal errors are logged here and reported to clients without their details. The
//! publish API checks and fills every event of a batch before the broker sees any of it,
//! so a batch is all-or-nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use switchboard_middleware::{Authentication, Claims};

use crate::app::App;
use crate::broker::{Broker, BrokerError};
use crate::config::Environment;
use crate::event;

pub type Response = http::Response<Full<Bytes>>;

/// `[A-Za-z0-9_.-]{1,128}`, and not the reserved `user`.
pub fn valid_project_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "user"
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut r = http::Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The one error body shape, shared with the middleware layers.
pub use switchboard_middleware::json_error;

pub fn retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// The innermost service: everything behind the middleware stack.
pub async fn route(app: Arc<App>, req: Request<Incoming>) -> Result<Response, Infallible> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let response = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(&app),
        (&Method::GET, "/health/websocket") => health(&app),
        (&Method::GET, "/metrics") => {
            let mut r = http::Response::new(Full::new(Bytes::from(app.exporter.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        (&Method::GET | &Method::HEAD, p)
            if crate::console::is_console_path(p) && app.config.console_enabled() =>
        {
            crate::console::serve(p)
        }
        (&Method::GET, p) if p.starts_with("/ws/") => crate::handshake::handle(app, req).await,
        (&Method::GET, p) if p.starts_with("/v1/ws-url/") => {
            ws_url(&app, &p["/v1/ws-url/".len()..])
        }
        (&Method::POST, "/v1/broadcast") => broadcast(&app, req).await,
        (&Method::GET, p) if p.starts_with("/v1/projects/") && p.ends_with("/presence") => {
            let project = p["/v1/projects/".len()..p.len() - "/presence".len()].to_owned();
            presence(&app, &project, &req).await
        }
        (&Method::POST, p) if p.starts_with("/v1/projects/") && p.ends_with("/events") => {
            let project = p["/v1/projects/".len()..p.len() - "/events".len()].to_owned();
            publish(&app, &project, req).await
        }
        (_, p)
            if p == "/healthz"
                || p == "/readyz"
                || p == "/health/websocket"
                || p == "/v1/broadcast"
                || p.starts_with("/ws/")
                || p.starts_with("/v1/")
                || (crate::console::is_console_path(p) && app.config.console_enabled()) =>
        {
            json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here",
            )
        }
        _ => json_error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    Ok(response)
}

fn readyz(app: &App) -> Response {
    if app.is_ready() {
        json_response(StatusCode::OK, &json!({"status": "ready"}))
    } else {
        let why = if app.is_draining() {
            "draining"
        } else {
            "broker_unavailable"
        };
        json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": why}))
    }
}

fn health(app: &App) -> Response {
    let status = if app.is_draining() {
        "draining"
    } else if !app.broker.is_up() {
        "degraded"
    } else {
        "healthy"
    };
    let redis_connected =
        matches!(app.broker, crate::broker::Broker::Redis(_)) && app.broker.is_up();
    json_response(
        StatusCode::OK,
        &json!({
            "status": status,
            "active_connections": app.hub.session_count(),
            "projects": app.hub.project_count(),
            "redis_connected": redis_connected,
            "broker": app.broker.kind(),
            "instance_id": app.instance_id,
            "uptime_secs": app.started.elapsed().as_secs(),
            "timestamp": event::now_rfc3339(),
        }),
    )
}

fn ws_url(app: &App, project: &str) -> Response {
    if !valid_project_id(project) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_project_id",
            "project_id must match [A-Za-z0-9_.-]{1,128}",
        );
    }
    let server = &app.config.server;
    let url = match server.environment {
        Environment::Production => format!("wss://{}/ws/{project}", server.domain),
        Environment::Docker => format!(
            "ws://{}:{}/ws/{project}",
            server.backend_host,
            app.backend_port()
        ),
        Environment::Development => format!("ws://localhost:{}/ws/{project}", app.backend_port()),
    };
    json_response(StatusCode::OK, &json!({"url": url}))
}

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
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "could not read the request body",
            ))
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

async fn publish(app: &App, project: &str, req: Request<Incoming>) -> Response {
    if !valid_project_id(project) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_project_id",
            "project_id must match [A-Za-z0-9_.-]{1,128}",
        );
    }
    let claims = match service_claims(&req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !claims.grants(project) {
        return json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        );
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

/// Connected clients of a project across all instances (PROTOCOL §6).
async fn presence(app: &App, project: &str, req: &Request<Incoming>) -> Response {
    if !valid_project_id(project) {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_project_id",
            "project_id must match [A-Za-z0-9_.-]{1,128}",
        );
    }
    let claims = match service_claims(req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !claims.grants(project) {
        return json_error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "your credential does not grant this project",
        );
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

async fn broadcast(app: &App, req: Request<Incoming>) -> Response {
    if let Err(r) = service_claims(&req) {
        return r;
    }
    let body = match read_json(app, req).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let arrived = Instant::now();
    let Value::Object(mut ev): Value = body else {
        return invalid_event(0, &event::EventError::NotObject);
    };
    let Some(Value::String(kind)) = ev.get("type") else {
        return invalid_event(0, &event::EventError::MissingType);
    };
    let kind = kind.clone();
    ev.remove("project_id");
    let value = Value::Object(ev);
    if let Err(e) = app.config.event_policy().check_global_value(&kind, &value) {
        return invalid_event(0, &e.into());
    }
    let Value::Object(mut ev) = value else {
        return invalid_event(0, &event::EventError::NotObject);
    };
    ev.remove("seq");
    if !ev.contains_key("timestamp") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids() {
        assert!(valid_project_id("proj-1.a_B"));
        assert!(!valid_project_id(""));
        assert!(!valid_project_id("user"));
        assert!(!valid_project_id("a/b"));
        assert!(!valid_project_id("a b"));
        assert!(!valid_project_id(&"a".repeat(129)));
        assert!(valid_project_id(&"a".repeat(128)));
    }
}
