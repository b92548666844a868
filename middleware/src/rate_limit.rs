//! Per-client-IP quota on WebSocket handshakes.
//!
//! A handshake is the expensive request (credential check, broker subscribe, history replay),
//! so reconnect storms are throttled here, before auth. Requests whose URI `applies_to`
//! rejects pass untouched. Over the quota the layer answers by itself: HTTP 429 with
//! `Retry-After` in whole seconds (at least 1, rounded up) and the JSON error body.
//!
//! Keys are the [`ClientIp`] the client-ip layer resolved (falling back to the TCP peer, then
//! to 0.0.0.0 so a wiring mistake degrades to one shared bucket, never a panic). governor's
//! keyed map keeps an entry per IP it ever saw: the gateway must call
//! [`HandshakeLimiter::retain_recent`] on a timer or memory grows with every address.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::Full;
use tower::{Layer, Service};

use crate::client_ip::{limit_key, ClientIp, PeerAddr};

/// IPv6 prefix length the quota is keyed on unless the gateway says otherwise.
pub const DEFAULT_IPV6_PREFIX_LEN: u8 = 64;
use crate::json_error;

/// Cloneable handle on the shared limiter state, for housekeeping and metrics.
#[derive(Clone)]
pub struct HandshakeLimiter {
    /// `None` when the limit is disabled (`per_second == 0`).
    inner: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    /// IPv6 clients share a bucket per prefix of this many bits ([`limit_key`]).
    v6_prefix_len: u8,
}

impl HandshakeLimiter {
    /// Drops the state of IPs whose bucket is full again (indistinguishable from a new IP).
    pub fn retain_recent(&self) {
        if let Some(limiter) = &self.inner {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Number of IPs currently tracked.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether limiting is on at all.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `Err(wait)` when `ip` is over its quota.
    fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.inner else {
            return Ok(());
        };
        limiter
            .check_key(&limit_key(ip, self.v6_prefix_len))
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }
}

impl fmt::Debug for HandshakeLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeLimiter")
            .field("enabled", &self.is_enabled())
            .field("tracked_ips", &self.len())
            .finish()
    }
}

/// Limits handshakes per client IP; see the module docs.
#[derive(Clone, Debug)]
pub struct HandshakeRateLimitLayer {
    limiter: HandshakeLimiter,
    applies_to: fn(&Uri) -> bool,
}

impl HandshakeRateLimitLayer {
    /// `per_second` handshakes per IP sustained, `burst` at once (0 is taken as 1);
    /// `per_second == 0` disables the limit. `applies_to` selects the limited requests
    /// (the gateway: paths under `/ws/`).
    pub fn new(per_second: u32, burst: u32, applies_to: fn(&Uri) -> bool) -> Self {
        let inner = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        Self {
            limiter: HandshakeLimiter {
                inner,
                v6_prefix_len: DEFAULT_IPV6_PREFIX_LEN,
            },
            applies_to,
        }
    }

    /// Keys IPv6 clients on their first `len` bits (default 64: one /64, one bucket).
    pub fn with_ipv6_prefix(mut self, len: u8) -> Self {
        self.limiter.v6_prefix_len = len;
        self
    }

    pub fn limiter(&self) -> HandshakeLimiter {
        self.limiter.clone()
    }
}

impl<S> Layer<S> for HandshakeRateLimitLayer {
    type Service = HandshakeRateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HandshakeRateLimitService {
            inner,
            limiter: self.limiter.clone(),
            applies_to: self.applies_to,
        }
    }
}

/// Service of [`HandshakeRateLimitLayer`].
#[derive(Clone, Debug)]
pub struct HandshakeRateLimitService<S> {
    inner: S,
    limiter: HandshakeLimiter,
    applies_to: fn(&Uri) -> bool,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for HandshakeRateLimitService<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.limiter.is_enabled() && (self.applies_to)(req.uri()) {
            let ip = key_for(&req);
            if let Err(wait) = self.limiter.check(ip) {
                tracing::debug!(client_ip = %ip, "handshake rate limited");
                let response = too_many(wait);
                return Box::pin(async move { Ok(response) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

fn key_for<B>(req: &Request<B>) -> IpAddr {
    let ext = req.extensions();
    ext.get::<ClientIp>()
        .map(|c| c.0)
        .or_else(|| ext.get::<PeerAddr>().map(|p| p.0.ip()))
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

fn too_many(wait: Duration) -> Response<Full<Bytes>> {
    let mut response = json_error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many connection attempts; retry later",
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
    response
}

/// Whole seconds, rounded up, never 0 (a client told "0" would retry in a tight loop).
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn ws_only(uri: &Uri) -> bool {
        uri.path().starts_with("/ws/")
    }

    fn service(
        layer: &HandshakeRateLimitLayer,
    ) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
    {
        layer.layer(service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }))
    }

    fn request(path: &str, ip: &str) -> Request<()> {
        let mut req = Request::builder().uri(path).body(()).unwrap();
        req.extensions_mut().insert(ClientIp(ip.parse().unwrap()));
        req
    }

    #[tokio::test]
    async fn burst_then_429_with_retry_after() {
        let layer = HandshakeRateLimitLayer::new(1, 3, ws_only);
        let svc = service(&layer);
        for _ in 0..3 {
            let res = svc.clone().oneshot(request("/ws/p", "198.51.100.1")).await;
            assert_eq!(res.unwrap().status(), StatusCode::OK);
        }
        let res = svc
            .clone()
            .oneshot(request("/ws/p", "198.51.100.1"))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[RETRY_AFTER], "1");
        assert_eq!(res.headers()["content-type"], "application/json");
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "rate_limited");

        // Another client is unaffected.
        let res = svc.oneshot(request("/ws/p", "198.51.100.2")).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(layer.limiter().len(), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[tokio::test]
    async fn other_paths_are_never_limited() {
        let layer = HandshakeRateLimitLayer::new(1, 1, ws_only);
        let svc = service(&layer);
        for _ in 0..10 {
            let res = svc
                .clone()
                .oneshot(request("/healthz", "198.51.100.1"))
                .await;
            assert_eq!(res.unwrap().status(), StatusCode::OK);
        }
        assert!(layer.limiter().is_empty());
    }

    #[tokio::test]
    async fn ipv6_clients_share_a_bucket_per_prefix() {
        // Issue 10: one host with a /64 had 2^64 quotas.
        let layer = HandshakeRateLimitLayer::new(1, 1, ws_only);
        let svc = service(&layer);
        let first = svc
            .clone()
            .oneshot(request("/ws/p", "2001:db8:1:2::1"))
            .await;
        assert_eq!(first.unwrap().status(), StatusCode::OK);
        let same_64 = svc
            .clone()
            .oneshot(request("/ws/p", "2001:db8:1:2:ffff::9"))
            .await;
        assert_eq!(same_64.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
        let other_64 = svc
            .clone()
            .oneshot(request("/ws/p", "2001:db8:1:3::1"))
            .await;
        assert_eq!(other_64.unwrap().status(), StatusCode::OK);

        // Configurable: /128 keys on the full address again.
        let layer = HandshakeRateLimitLayer::new(1, 1, ws_only).with_ipv6_prefix(128);
        let svc = service(&layer);
        for ip in ["2001:db8:1:2::1", "2001:db8:1:2::2"] {
            let res = svc.clone().oneshot(request("/ws/p", ip)).await;
            assert_eq!(res.unwrap().status(), StatusCode::OK, "{ip}");
        }
    }

    #[tokio::test]
    async fn zero_rate_disables() {
        let layer = HandshakeRateLimitLayer::new(0, 1, ws_only);
        let svc = service(&layer);
        for _ in 0..10 {
            let res = svc.clone().oneshot(request("/ws/p", "198.51.100.1")).await;
            assert_eq!(res.unwrap().status(), StatusCode::OK);
        }
        assert!(!layer.limiter().is_enabled());
        layer.limiter().retain_recent();
    }

    #[tokio::test]
    async fn falls_back_to_peer_then_unspecified() {
        let layer = HandshakeRateLimitLayer::new(1, 1, ws_only);
        let svc = service(&layer);
        let mut req = Request::builder().uri("/ws/p").body(()).unwrap();
        req.extensions_mut()
            .insert(PeerAddr("192.0.2.9:1234".parse().unwrap()));
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
        let req = Request::builder().uri("/ws/p").body(()).unwrap();
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
        let req = Request::builder().uri("/ws/p").body(()).unwrap();
        assert_eq!(svc.oneshot(req).await.unwrap().status(), 429);
        assert_eq!(layer.limiter().len(), 2);
    }

    /// Many IPs (a botnet, or a proxy forwarding many clients): every one leaves an entry,
    /// and pruning forgets all of them once their buckets are full again, so the map is
    /// bounded by the IPs of one prune interval, not by every IP ever seen.
    #[test]
    fn pruning_forgets_many_distinct_ips_but_not_a_limited_one() {
        const N: u32 = 50_000;
        let layer = HandshakeRateLimitLayer::new(1000, 1, ws_only);
        let limiter = layer.limiter();
        for i in 0..N {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limiter.check(ip).is_ok(), "first handshake of {ip}");
        }
        assert_eq!(limiter.len(), N as usize);
        std::thread::sleep(Duration::from_millis(20));
        limiter.retain_recent();
        assert_eq!(limiter.len(), 0);

        // An IP still over its quota is kept: pruning never forgives an abuser early.
        let slow = HandshakeRateLimitLayer::new(1, 1, ws_only).limiter();
        let abuser: IpAddr = "198.51.100.66".parse().unwrap();
        assert!(slow.check(abuser).is_ok());
        assert!(slow.check(abuser).is_err());
        slow.retain_recent();
        assert_eq!(slow.len(), 1);
        assert!(slow.check(abuser).is_err());
    }

    #[tokio::test]
    async fn retain_recent_forgets_refilled_buckets() {
        let layer = HandshakeRateLimitLayer::new(1000, 1, ws_only);
        let svc = service(&layer);
        let res = svc.oneshot(request("/ws/p", "198.51.100.1")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(layer.limiter().len(), 1);
        // At 1000/s a single-token bucket is full again after 1 ms.
        std::thread::sleep(Duration::from_millis(20));
        layer.limiter().retain_recent();
        assert_eq!(layer.limiter().len(), 0);
    }
}
