//! Probes, metrics and ws-url: the routes that need no credential (docs/protocol.md §6).

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;

use super::{invalid_project_id, json_response, valid_project_id, Response};
use crate::app::App;
use crate::config::Environment;
use crate::event;

pub(super) fn healthz() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

pub(super) fn readyz(app: &App) -> Response {
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

pub(super) fn health(app: &App) -> Response {
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
            "broker_topology": app.broker.topology(),
            "instance_id": app.instance_id,
            "uptime_secs": app.started.elapsed().as_secs(),
            "timestamp": event::now_rfc3339(),
        }),
    )
}

/// One scrape, in the format the scraper's `Accept` asks for (Prometheus text 0.0.4 unless
/// it asks for OpenMetrics).
pub(super) fn metrics<B>(app: &App, req: &Request<B>) -> Response {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = crate::exporter::Format::negotiate(accept);
    let mut r = http::Response::new(Full::new(Bytes::from(app.exporter.render_as(format))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    r.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    r
}

pub(super) fn ws_url(app: &App, project: &str) -> Response {
    if !valid_project_id(project) {
        return invalid_project_id();
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
