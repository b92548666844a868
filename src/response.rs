//! HTTP answers before an upgrade: the one response type and the JSON bodies every route
//! and the handshake share (`{"error", "message"}` for refusals, built by the middleware
//! crate's `json_error` so its layers answer the same way). A leaf below the router and
//! the handshake: it imports nothing from the crate.

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::Full;
use serde_json::Value;

pub type Response = http::Response<Full<Bytes>>;

/// The one error body shape, shared with the middleware layers.
pub use switchboard_middleware::json_error;

pub fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut r = http::Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}
