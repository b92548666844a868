//! What the handshake limiter's per-IP map costs, measured (docs/security.md quotes it).
//!
//! Its own test binary with a single test, so nothing else allocates while the process RSS
//! is read. governor keeps one entry per IP it has seen until the gateway prunes it (every
//! 10 s); this is the per-entry figure behind the "many IPs" memory bound.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use switchboard_middleware::{ClientIp, HandshakeRateLimitLayer};
use tower::{service_fn, Layer, Service};

/// The bound the docs state per tracked IP; the measured figure is printed.
const MAX_BYTES_PER_IP: u64 = 100;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

#[tokio::test]
async fn one_tracked_ip_costs_little_and_pruning_forgets_them_all() {
    const N: u32 = 200_000;
    let layer = HandshakeRateLimitLayer::new(1000, 1, |_| true);
    let limiter = layer.limiter();
    let mut svc = layer.layer(service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));
    let mut handshake = |i: u32| {
        let mut req = Request::new(());
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        req.extensions_mut().insert(ClientIp(ip));
        svc.call(req)
    };
    // Warm up the allocator and the runtime before the baseline.
    for i in 0..1_000 {
        handshake(N + i).await.unwrap();
    }
    let before = rss_bytes();
    for i in 0..N {
        handshake(i).await.unwrap();
    }
    let after = rss_bytes();
    assert_eq!(limiter.len(), (N + 1_000) as usize);
    let per_ip = after.saturating_sub(before) / u64::from(N);
    eprintln!(
        "handshake limiter: {N} IPs took {} KiB of RSS, {per_ip} bytes per IP",
        after.saturating_sub(before) / 1024
    );
    assert!(
        per_ip <= MAX_BYTES_PER_IP,
        "{per_ip} bytes per tracked IP, over the documented {MAX_BYTES_PER_IP}"
    );

    // At 1000/s a one-token bucket is full again after 1 ms: all of them are forgotten.
    std::thread::sleep(Duration::from_millis(20));
    limiter.retain_recent();
    assert_eq!(limiter.len(), 0);
}
