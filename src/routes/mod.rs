//! The HTTP surface (docs/protocol.md §6): routing, and the helpers every handler shares.
//!
//! Routing is a [`matchit`] table (the router axum uses): a path either matches one route
//! whole, with its parameters as borrowed segments, or it does not; no handler ever slices
//! a path by hand (the string router it replaced panicked on `/v1/projects/events`). A
//! matching path with a method the route does not serve is 405, anything else 404, both as
//! JSON. Handlers live in `api.rs` (publish, presence, broadcast) and `health.rs` (probes,
//! metrics, ws-url); `/ws/…` goes to [`crate::handshake`] and `/console` to
//! [`crate::console`].
//!
//! Every request runs under `catch_panics`: a panic in a handler becomes a 500
//! `{"error": "internal"}` (logged with the path, never shown to the client) instead of a
//! dropped connection, and the connection's task lives on.
//!
//! Every error before an upgrade is a JSON `{"error", "message"}` built by [`json_error`];
//! internal errors are logged here and reported to clients without their details.

mod api;
mod health;

use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use http::{Method, Request, StatusCode};

use hyper::body::Incoming;

use crate::app::App;

pub use crate::project::valid_project_id;
pub use crate::response::{json_error, json_response, retry_after, Response};

/// The routes of the table; parameters are read from the match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    HealthWebsocket,
    Metrics,
    /// `/ws/` and `/ws/{*target}`: the handshake parses and checks the target itself.
    WebSocket,
    WsUrl,
    Broadcast,
    ProjectEvents,
    ProjectPresence,
    /// `GET /v1/projects/{id}/commands`: a worker's command stream, a WebSocket upgrade
    /// handled by the handshake (docs/protocol.md §6).
    ProjectCommands,
    StoryProgress,
}

impl Route {
    fn allows(self, method: &Method) -> bool {
        match self {
            Route::Broadcast | Route::ProjectEvents | Route::StoryProgress => {
                method == Method::POST
            }
            _ => method == Method::GET,
        }
    }
}

fn table() -> &'static matchit::Router<Route> {
    static TABLE: OnceLock<matchit::Router<Route>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = matchit::Router::new();
        for (path, route) in [
            ("/healthz", Route::Healthz),
            ("/readyz", Route::Readyz),
            ("/health/websocket", Route::HealthWebsocket),
            ("/metrics", Route::Metrics),
            ("/ws/", Route::WebSocket),
            ("/ws/{*target}", Route::WebSocket),
            ("/v1/ws-url/{project}", Route::WsUrl),
            ("/v1/broadcast", Route::Broadcast),
            ("/v1/projects/{project}/events", Route::ProjectEvents),
            ("/v1/projects/{project}/presence", Route::ProjectPresence),
            ("/v1/projects/{project}/commands", Route::ProjectCommands),
            ("/v1/stories/{story}/progress", Route::StoryProgress),
        ] {
            // A fixed table: a conflict here is a programming error caught by the tests.
            if let Err(e) = t.insert(path, route) {
                tracing::error!(path, error = %e, "route table conflict");
            }
        }
        t
    })
}

/// The innermost service: everything behind the middleware stack.
pub async fn route(app: Arc<App>, req: Request<Incoming>) -> Result<Response, Infallible> {
    let path = req.uri().path().to_owned();
    Ok(catch_panics(&path, dispatch(app, req)).await)
}

/// Runs a handler; a panic in it becomes a 500 JSON answer instead of a dropped connection.
/// The handler's state is per request and dropped with it, so nothing half-updated is seen
/// again (hence `AssertUnwindSafe`); shared state is behind locks that do not poison
/// (parking_lot) or atomics.
async fn catch_panics(path: &str, handler: impl Future<Output = Response>) -> Response {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            // The path only (a query may hold a token), truncated: it is attacker-chosen.
            let path: String = path.chars().take(256).collect();
            tracing::error!(%path, panic = %what, "request handler panicked; answered 500");
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

async fn dispatch(app: Arc<App>, req: Request<Incoming>) -> Response {
    let method = req.method().clone();
    let path = req.uri().path();
    if crate::console::is_console_path(path) && app.config.console_enabled() {
        return if method == Method::GET || method == Method::HEAD {
            crate::console::serve(path)
        } else {
            method_not_allowed()
        };
    }
    let Ok(matched) = table().at(path) else {
        return json_error(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let route = *matched.value;
    if !route.allows(&method) {
        return method_not_allowed();
    }
    // Owned before `req` moves into a handler.
    let project = matched
        .params
        .get("project")
        .or_else(|| matched.params.get("story"))
        .map(str::to_owned);
    let project = project.as_deref().unwrap_or_default();
    match route {
        Route::Healthz => health::healthz(),
        Route::Readyz => health::readyz(&app),
        Route::HealthWebsocket => health::health(&app),
        Route::Metrics => health::metrics(&app, &req),
        Route::WebSocket | Route::ProjectCommands => crate::handshake::handle(app, req).await,
        Route::WsUrl => health::ws_url(&app, project),
        Route::Broadcast => api::broadcast(&app, req).await,
        Route::ProjectEvents => api::publish(&app, project, req).await,
        Route::ProjectPresence => api::presence(&app, project, &req).await,
        Route::StoryProgress => api::story_progress(&app, project, req).await,
    }
}

fn method_not_allowed() -> Response {
    json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
}

fn invalid_project_id() -> Response {
    json_error(
        StatusCode::BAD_REQUEST,
        "invalid_project_id",
        "project_id must match [A-Za-z0-9_.-]{1,128} (and not be user, . or ..)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn project_ids() {
        assert!(valid_project_id("proj-1.a_B"));
        assert!(valid_project_id("..."));
        assert!(valid_project_id(".a"));
        assert!(!valid_project_id(""));
        assert!(!valid_project_id("user"));
        assert!(!valid_project_id("."));
        assert!(!valid_project_id(".."));
        assert!(!valid_project_id("a/b"));
        assert!(!valid_project_id("a b"));
        assert!(!valid_project_id("%2E%2E"));
        assert!(!valid_project_id(&"a".repeat(129)));
        assert!(valid_project_id(&"a".repeat(128)));
    }

    #[test]
    fn the_table_matches_whole_paths_only() {
        let at = |p: &str| table().at(p).ok().map(|m| *m.value);
        assert_eq!(at("/healthz"), Some(Route::Healthz));
        assert_eq!(at("/ws/"), Some(Route::WebSocket));
        assert_eq!(at("/ws/a/b"), Some(Route::WebSocket));
        assert_eq!(at("/v1/projects/p/events"), Some(Route::ProjectEvents));
        assert_eq!(at("/v1/projects/p/presence"), Some(Route::ProjectPresence));
        for p in [
            "/v1/projects/events",
            "/v1/projects/presence",
            "/v1/projects/",
            "/v1/projects//events",
            "/v1/projects/a/b/events",
            "/v1/ws-url/",
            "/v1/ws-url/a/b",
            "/healthz/",
            "/ws",
            "",
        ] {
            assert_eq!(at(p), None, "{p}");
        }
        let m = table().at("/v1/projects/p.1/presence").unwrap();
        assert_eq!(m.params.get("project"), Some("p.1"));
    }

    /// The catch-panic wrapper, proven without a panicking route in the build.
    #[tokio::test]
    async fn a_panicking_handler_is_a_500_without_internals() {
        let r = catch_panics("/x", async {
            if std::hint::black_box(true) {
                panic!("secret detail 42");
            }
            json_response(StatusCode::OK, &serde_json::json!({}))
        })
        .await;
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        use http_body_util::BodyExt;
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "internal", "{v}");
        assert!(!v.to_string().contains("secret"), "{v}");
        let ok = catch_panics("/x", async { json_response(StatusCode::OK, &Value::Null) }).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }
}
