//! Tower layers that sit in front of the Switchboard WebSocket upgrade.
//!
//! Each layer does one thing before the router sees a request, and passes the result down as
//! a request extension rather than rejecting on the router's behalf (the rate limiter is the
//! only layer that answers by itself). The gateway composes them in this order, outermost first:
//!
//! ```text
//! RequestIdLayer          request_id.rs  id + one span per request (path only, never the query)
//!   ClientIpLayer         client_ip.rs   PeerAddr + trusted proxies -> ClientIp
//!     (gateway limits)                   connection limits, load shedding
//!       HandshakeRateLimitLayer  rate_limit.rs  per-client-IP handshake quota -> 429
//!         AuthLayer       auth/          JWT or session -> Authentication (never rejects)
//!           router
//! ```
//!
//! Every layer is generic over the request body and passes the inner service's error through;
//! the ones that can answer on their own produce `http::Response<Full<Bytes>>`, the one body
//! type of the gateway, through [`json_error`], so every error body has the same shape and
//! never carries internal detail.

pub mod auth;
pub mod client_ip;
pub mod rate_limit;
pub mod request_id;

pub use auth::{
    mint_hs256, AuthConfigError, AuthError, AuthLayer, AuthService, Authentication, Authenticator,
    Claims, CredentialKind, JwtConfig, JwtVerifier, MemorySessionStore, SessionRecord,
    SessionStore,
};
pub use client_ip::{ClientIp, ClientIpLayer, ClientIpService, PeerAddr};
pub use rate_limit::{HandshakeLimiter, HandshakeRateLimitLayer, HandshakeRateLimitService};
pub use request_id::{RequestId, RequestIdLayer, RequestIdService};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

/// The gateway's error body: `{"error": "<code>", "message": "<human text>"}`.
///
/// `code` is a stable machine-readable string; `message` is for humans and must already be
/// safe to show a client (callers pass fixed texts, never an internal error's `Display`).
pub fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": code, "message": message });
    // Serialising a map of two strings cannot fail; an empty body is still a valid fallback.
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn json_error_shape() {
        let response = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "slow \"down\"",
        );
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"error": "rate_limited", "message": "slow \"down\""})
        );
    }

    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The whole stack in the gateway's order: extensions flow down, the span gets the
    /// resolved client, and the token stays out of the logs.
    #[tokio::test]
    async fn full_stack() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let secret = b"stack-secret".to_vec();
        let verifier = JwtVerifier::new(JwtConfig {
            hs256_secret: Some(secret.clone()),
            ..JwtConfig::default()
        })
        .unwrap();
        let authenticator = Arc::new(Authenticator::new(Some(verifier), None));
        let svc = ServiceBuilder::new()
            .layer(RequestIdLayer::new())
            .layer(ClientIpLayer::new(vec!["10.0.0.0/8".parse().unwrap()]))
            .layer(HandshakeRateLimitLayer::new(10, 10, |uri| {
                uri.path().starts_with("/ws/")
            }))
            .layer(AuthLayer::new(authenticator))
            .service(service_fn(|req: Request<()>| async move {
                let ext = req.extensions();
                assert!(ext.get::<RequestId>().is_some());
                assert_eq!(ext.get::<ClientIp>().unwrap().0.to_string(), "198.51.100.7");
                let claims = ext.get::<Authentication>().unwrap().claims().unwrap();
                assert!(claims.grants("p"));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }));

        let token = mint_hs256(&secret, "alice", &["p".to_owned()], 60, false).unwrap();
        let mut req = Request::builder()
            .uri(format!("/ws/p?token={token}"))
            .header("x-forwarded-for", "198.51.100.7")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert(PeerAddr("10.0.0.5:3333".parse().unwrap()));
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().contains_key("x-request-id"));

        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("client_ip=198.51.100.7"), "{logs}");
        assert!(logs.contains("authenticated"), "{logs}");
        assert!(!logs.contains(&token), "{logs}");
        assert!(!logs.contains("token="), "{logs}");
    }
}
