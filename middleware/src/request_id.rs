//! Request id and the one span every request runs in.
//!
//! Outermost layer of the stack: it names the request (a well-formed incoming `x-request-id`
//! is kept so ids line up across proxies, anything else is replaced by a UUID v4), stores the
//! id as [`RequestId`], echoes it on the response, and runs everything below it inside an
//! `info_span!("request", ...)` closed by one completion line with status and latency.
//!
//! Invariant: the span records the URI *path* only. WebSocket clients in browsers pass their
//! JWT as `?token=`, so logging the query (as a default HTTP trace layer does) would write
//! credentials to the logs.
//!
//! Why not tower-http's `SetRequestId`/`PropagateRequestId`/`Trace` layers: `SetRequestId`
//! keeps any incoming `x-request-id` unchecked (ours replaces a malformed or oversized one,
//! which would otherwise go into every log line), `TraceLayer`'s default span logs the whole
//! URI and its default failure hook logs every 5xx (readyz's 503 while draining) at ERROR,
//! and it wraps the response body, while the stack is concrete on `Full<Bytes>`. Custom
//! hooks plus a validating layer would be more code than this one service.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::client_ip::PeerAddr;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const MAX_LEN: usize = 64;

/// The id of this request, as logged and echoed in `x-request-id`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub String);

/// Assigns [`RequestId`] and opens the request span.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl RequestIdLayer {
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

/// Service of [`RequestIdLayer`].
#[derive(Clone, Debug)]
pub struct RequestIdService<S> {
    inner: S,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>>,
    S::Future: Send + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = req
            .headers()
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| is_valid_id(v))
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

        let span = tracing::info_span!(
            "request",
            request_id = %id,
            method = %req.method(),
            path = %req.uri().path(),
            // The TCP peer here; the resolved client (behind trusted proxies) is known only
            // below us: the client-ip layer records it into this span. Two fields, because a
            // field recorded twice shows up twice in the text log.
            peer = tracing::field::Empty,
            client_ip = tracing::field::Empty,
        );
        if let Some(PeerAddr(peer)) = req.extensions().get::<PeerAddr>() {
            span.record("peer", tracing::field::display(peer.ip()));
        }
        // Valid ids and UUIDs are plain ASCII, so this only fails on a bug; skip the echo then.
        let echo = HeaderValue::from_str(&id).ok();
        req.extensions_mut().insert(RequestId(id));

        let start = Instant::now();
        // Enter for the synchronous part of the inner `call` too, so layers below can record
        // into this span and their setup logs carry the request id.
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(
            async move {
                let result = fut.await;
                let latency_ms = start.elapsed().as_secs_f64() * 1000.0;
                match result {
                    Ok(mut response) => {
                        if let Some(echo) = echo {
                            response.headers_mut().insert(X_REQUEST_ID, echo);
                        }
                        let status = response.status().as_u16();
                        // WebSocket upgrades are logged by the gateway's session (at debug:
                        // a connect storm must not become a log storm).
                        if status == 101 {
                            tracing::debug!(status, latency_ms, "request completed");
                        } else {
                            tracing::info!(status, latency_ms, "request completed");
                        }
                        Ok(response)
                    }
                    Err(err) => {
                        // The error type is opaque here; whoever maps it to a response logs it.
                        tracing::info!(latency_ms, "request failed");
                        Err(err)
                    }
                }
            }
            .instrument(span),
        )
    }
}

fn is_valid_id(s: &str) -> bool {
    (1..=MAX_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt};

    type Infallible = std::convert::Infallible;

    fn echo_id_service(
    ) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
    {
        RequestIdLayer::new().layer(service_fn(|req: Request<()>| async move {
            let id = req.extensions().get::<RequestId>().unwrap().0.clone();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id))))
        }))
    }

    async fn call(req: Request<()>) -> (String, String) {
        let response = echo_id_service().oneshot(req).await.unwrap();
        let header = response.headers()[X_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_owned();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (header, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn keeps_a_valid_incoming_id() {
        let req = Request::builder()
            .header("x-request-id", "abc-123_x.y")
            .body(())
            .unwrap();
        assert_eq!(
            call(req).await,
            ("abc-123_x.y".to_owned(), "abc-123_x.y".to_owned())
        );
    }

    #[tokio::test]
    async fn replaces_invalid_ids_with_uuid() {
        let long = "a".repeat(65);
        for bad in ["", "has space", "semi;colon", "ünï", long.as_str()] {
            let req = Request::builder()
                .header("x-request-id", bad)
                .body(())
                .unwrap();
            let (header, ext) = call(req).await;
            assert_eq!(header, ext);
            assert!(
                uuid::Uuid::parse_str(&header).is_ok(),
                "{bad:?} -> {header}"
            );
        }
        let (header, _) = call(Request::new(())).await;
        assert!(uuid::Uuid::parse_str(&header).is_ok());
        assert!(is_valid_id(&"a".repeat(64)));
    }
}
