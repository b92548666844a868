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
//!         AuthLayer       auth/          JWT or session -> Authentication (never rejects;
//!                                        `only_for`: routes without credentials get Missing)
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
    Claims, CredentialKind, JwtConfig, JwtVerifier, MemorySessionStore, SessionId, SessionRecord,
    SessionStore,
};
pub use client_ip::{limit_key, ClientIp, ClientIpLayer, ClientIpService, PeerAddr};
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
    use http_body_util::BodyExt;

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
}
