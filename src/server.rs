//! Accept loop, the tower stack, and the shutdown sequence.
//!
//! ```text
//! TCP accept ─► hyper http1 (with upgrades) ─► tower stack, outermost first:
//!   SetSensitiveRequestHeaders (Authorization, Cookie never reach a log)
//!   └► RequestId + tracing span (path only: `?token=` is never logged)
//!      └► ClientIp (X-Forwarded-For/Forwarded only from server.trusted_proxies)
//!         └► HandshakeRateLimit (per client IP, /ws/ only: 429 + Retry-After)
//!            └► Auth, only where credentials are needed (/ws/…, /v1/… but /v1/ws-url/):
//!               JWT or session → `Authentication` in request extensions; other routes get
//!               `Missing` without a Redis round trip
//!               └► routes::route (HTTP API, or handshake::handle for /ws/…)
//! ```
//!
//! Before the upgrade a connection is only an HTTP connection, and a cheap one to abuse:
//! slowloris clients that never finish their headers are closed after
//! `server.header_read_timeout_secs` (idle keep-alive connections likewise), a request head
//! may hold at most [`MAX_HEADER_BYTES`], and at most `server.max_pending_connections` such
//! connections exist at once, of which at most `server.max_pending_per_ip` from one TCP peer
//! (IPv6: one prefix of `server.ipv6_prefix_len` bits), so one source opening silent sockets
//! cannot take every slot (beyond, new ones are closed at accept). Peers in
//! `server.trusted_proxies` are exempt from the per-source share (every client behind the
//! proxy shares its address) but not from the total. Upgraded connections are counted by
//! [`crate::limits`] instead.
//!
//! `server.admin_listen` adds a second listener ([`serve_admin`]) that serves only the
//! probes and the scrape (/healthz, /readyz, /health/websocket, /metrics): none of the
//! public port's limits or layers, so probes answer while the public port is saturated.
//!
//! Shutdown (docs/protocol.md §5): mark draining (readyz 503, upgrades 503; the listener keeps
//! answering meanwhile); every session flushes its queue, then gets `container.reconnect`
//! and close 1012; then the listener closes and plain HTTP connections finish the request
//! they carry. We wait for sessions and requests at most `shutdown_grace_secs` in all, then
//! return so the process exits 0. A request is never cut by the exit while the grace lasts:
//! a publish cut after Redis ran it would leave its caller unsure whether it happened.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rand::RngExt;
use switchboard_middleware::{
    AuthLayer, ClientIpLayer, HandshakeRateLimitLayer, PeerAddr, RequestIdLayer,
};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::app::App;
use crate::limits::{ConnectionGuard, ConnectionLimits, LimitError};
use crate::routes;

/// Largest request head (request line and headers). Four times nginx's default header
/// buffer: room for big cookies and a JWT in the query, and what bounds the read buffer of
/// a connection that is still sending its headers.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// How often the handshake limiter forgets IPs whose bucket is full again. Its map holds
/// at most the IPs seen in the last interval plus those still refilling.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(10);

/// At most one "pending connection cap reached" warning per this interval.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The WebSocket handshakes: `/ws/…` and a worker's command stream
/// (`/v1/projects/{id}/commands`), which costs the same (credential, caps, subscribe).
fn is_handshake(uri: &http::Uri) -> bool {
    let path = uri.path();
    path.starts_with("/ws/") || (path.starts_with("/v1/projects/") && path.ends_with("/commands"))
}

/// Routes that read a credential: the handshakes and the HTTP API (but the public
/// `/v1/ws-url/`). Everything else (health, readiness, metrics, console files) is answered
/// without one, so a `?session=` there must not cost a Redis GET. Unknown paths are
/// skipped too and see `Authentication::Missing`: a new route that forgets to be listed
/// here refuses, it never authorizes.
fn needs_credentials(uri: &http::Uri) -> bool {
    let path = uri.path();
    path.starts_with("/ws/") || (path.starts_with("/v1/") && !path.starts_with("/v1/ws-url/"))
}

/// Where a session credential can be of any use: WebSocket connections. The `/v1/` API
/// needs a service JWT, which a session never is, so a `?session=` there is not looked up
/// (the red-team pass counted 300 Redis GETs from 300 requests to `/v1/nope?session=…`).
fn accepts_sessions(uri: &http::Uri) -> bool {
    uri.path().starts_with("/ws/")
}

/// Concurrent connections the admin listener serves (its own bound, separate from the
/// public port's: probes and scrapers are a handful of clients). Past it the oldest is
/// closed ([`serve_admin`]).
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Header read timeout on the admin listener (or `server.header_read_timeout_secs` if
/// shorter).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The only paths the admin listener serves.
fn is_admin_path(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/health/websocket" | "/metrics"
    )
}

/// Serves until `shutdown` resolves, then drains. Returns when every connection is gone
/// or the grace period is over.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let rate_limit = HandshakeRateLimitLayer::new(
        app.config.server.handshake_rate_per_sec,
        app.config.server.handshake_burst,
        is_handshake,
    )
    .with_ipv6_prefix(app.config.server.ipv6_prefix_len);
    let limiter = rate_limit.limiter();
    // governor's keyed map grows with every IP seen: trim it periodically.
    let trim = tokio::spawn(async move {
        let mut tick = tokio::time::interval(LIMITER_PRUNE_EVERY);
        loop {
            tick.tick().await;
            limiter.retain_recent();
        }
    });
    let heartbeat = tokio::spawn(crate::heartbeat::run(app.clone()));
    if app.config.server.container_restart {
        tokio::spawn(announce_restart(app.clone()));
    }
    let route_app = app.clone();
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .layer(RequestIdLayer::new())
        .layer(ClientIpLayer::new(app.config.trusted_proxies()))
        .layer(rate_limit)
        .layer(
            AuthLayer::new(app.auth.clone())
                .only_for(needs_credentials)
                .sessions_only_for(accepts_sessions),
        )
        .service_fn(move |req: http::Request<Incoming>| routes::route(route_app.clone(), req));

    let header_timeout = Duration::from_secs(app.config.server.header_read_timeout_secs);
    let pending = pending_limits(&app);
    let trusted_proxies = app.config.trusted_proxies();
    let mut refused = Refusals::default();

    let (close_http, http_closing) = watch::channel(false);
    // Plain HTTP connections still being served (an upgraded one leaves as soon as its
    // session task has the socket): what the end of a drain waits for.
    let http_connections = TaskTracker::new();
    // The listener keeps serving while draining, so /readyz and new upgrades can answer
    // 503 (docs/protocol.md §5); it closes once the drain is over.
    let drain_app = app.clone();
    let drained = async move {
        shutdown.await;
        drain(&drain_app, close_http).await
    };
    tokio::pin!(drained);
    let deadline = loop {
        let (stream, peer) = tokio::select! {
            deadline = &mut drained => break deadline,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match pending.acquire(&trusted_proxies, peer) {
            Ok(permit) => permit,
            Err(why) => {
                // Closing at once costs the attacker a reconnect and us nothing.
                drop(stream);
                refused.note(peer, why);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let svc = ServiceBuilder::new()
            .map_request(move |mut req: http::Request<Incoming>| {
                req.extensions_mut().insert(PeerAddr(peer));
                req
            })
            .service(stack.clone());
        let draining = app.is_draining();
        let mut closing = http_closing.clone();
        // The task ends when the connection stops speaking HTTP, an upgrade included.
        http_connections.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_header_size(MAX_HEADER_BYTES)
                // Accepted while draining: answer (503 or health) and close.
                .keep_alive(!draining)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .with_upgrades();
            tokio::pin!(conn);
            if draining {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, %peer, "http connection error");
                }
                return;
            }
            let shut_down = tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res { tracing::debug!(error = %e, %peer, "http connection error"); }
                    false
                }
                _ = closing.wait_for(|c| *c) => true,
            };
            if shut_down {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    };
    drop(listener);
    // Requests accepted before the listener closed get their answer (found by
    // tests/it/faults.rs: publishes cut by the exit had been carried out by Redis, unanswered).
    // Idle keep-alive connections were told to close when the drain began.
    http_connections.close();
    if tokio::time::timeout_at(deadline, http_connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = http_connections.len(),
            "grace period over; dropping HTTP connections still in a request"
        );
    }
    trim.abort();
    heartbeat.abort();
}

/// The pending-connection caps: the total and each source's share (`None`: neither).
struct PendingLimits(Option<Arc<ConnectionLimits>>);

fn pending_limits(app: &App) -> PendingLimits {
    let server = &app.config.server;
    let total = match server.max_pending_connections {
        0 => usize::MAX,
        n => n,
    };
    let per_ip = match server.max_pending_per_ip {
        0 => usize::MAX,
        n => n.min(total),
    };
    if total == usize::MAX && per_ip == usize::MAX {
        return PendingLimits(None);
    }
    PendingLimits(Some(ConnectionLimits::keyed(
        total,
        per_ip,
        server.ipv6_prefix_len,
    )))
}

impl PendingLimits {
    /// A slot for a connection from `peer`, or why not. A trusted proxy counts in the total
    /// only: every client behind it shares its address, so the per-source share would cap
    /// them all at once (the proxy limits its own clients).
    fn acquire(
        &self,
        trusted: &[ipnet::IpNet],
        peer: SocketAddr,
    ) -> Result<Option<ConnectionGuard>, LimitError> {
        let Some(limits) = &self.0 else {
            return Ok(None);
        };
        let ip = peer.ip().to_canonical();
        if trusted.iter().any(|net| net.contains(&ip)) {
            limits.acquire_total_only().map(Some)
        } else {
            limits.acquire(ip).map(Some)
        }
    }
}

/// Connections closed at accept because of the pending caps; logged at most once per
/// [`REFUSAL_LOG_EVERY`], with the count since the last line.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr, why: LimitError) {
        self.since_log += 1;
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        let cap = match why {
            LimitError::Global => "server.max_pending_connections",
            LimitError::PerIp => "server.max_pending_per_ip",
        };
        tracing::warn!(
            refused = self.since_log,
            last_peer = %peer,
            cap,
            "pending HTTP connection cap reached: closing new connections at accept"
        );
        self.since_log = 0;
        self.logged_at = Some(now);
    }
}

/// Sends every session away and waits for them within the grace period; returns the
/// grace deadline, which also bounds what is left of the shutdown.
async fn drain(app: &Arc<App>, close_http: watch::Sender<bool>) -> tokio::time::Instant {
    app.start_draining();
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    let sessions = app.hub.sessions();
    tracing::info!(
        connections = sessions.len(),
        grace_secs = grace.as_secs(),
        "draining"
    );
    let _ = close_http.send(true);
    {
        // In time slices: fan-out goes on for the sessions not closed yet (issue 13: no work
        // that grows with the connections in one go).
        let mut slice = crate::wheel::Slice::new(Duration::from_micros(200));
        for session in &sessions {
            // Jitter spreads the reconnect storm over the other instances.
            let after = rand::rng().random_range(100..2_000);
            session.close_for_restart(after);
            if slice.over() {
                tokio::task::yield_now().await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    // Closed, the tracker's wait ends once no session is left in the hub (sessions still
    // registering hold a token already and are waited for too).
    app.sessions.close();
    if tokio::time::timeout_at(deadline, app.sessions.wait())
        .await
        .is_err()
    {
        let left = app.sessions.len();
        tracing::warn!(left, "grace period over; dropping remaining connections");
        for s in app.hub.sessions() {
            s.abort();
        }
        // Aborted sessions leave at their next poll; give them at most this long.
        let _ = tokio::time::timeout(Duration::from_millis(50), app.sessions.wait()).await;
    }
    app.broker.deregister_instance(&app.instance_id).await;
    tracing::info!("drained");
    deadline
}

/// Binds the configured address.
pub async fn bind(app: &App) -> std::io::Result<(TcpListener, SocketAddr)> {
    let addr = app
        .config
        .listen_addr()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // Not `TcpListener::bind`: its backlog (128 here) overflowed in a 512-way connect
    // storm and the dropped SYNs came back a second later.
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(app.config.server.listen_backlog.max(1))?;
    let local = listener.local_addr()?;
    app.set_listen_port(local.port());
    Ok((listener, local))
}

/// Binds `server.admin_listen`, if configured.
pub async fn bind_admin(app: &App) -> std::io::Result<Option<(TcpListener, SocketAddr)>> {
    let Some(addr) = app.config.admin_listen_addr() else {
        return Ok(None);
    };
    let addr = addr.map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok(Some((listener, local)))
}

/// The admin listener: /healthz, /readyz, /health/websocket and /metrics, nothing else
/// (404), with none of the public port's layers or caps but its own small connection bound
/// and the same header timeout and size. Runs until its task is aborted; while the gateway
/// drains it keeps answering (/readyz says 503).
pub async fn serve_admin(app: Arc<App>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    // A probe sends its request at once: anything slower is not a probe.
    let header_timeout =
        Duration::from_secs(app.config.server.header_read_timeout_secs).min(ADMIN_HEADER_TIMEOUT);
    // Live connections, oldest first. At the bound the OLDEST is closed to make room,
    // rather than the newcomer refused: silent sockets (anyone who can reach the port) can
    // then never lock the probes out, and a probe is done long before 64 newer
    // connections arrive (the red-team pass locked the port with 100 silent sockets).
    let live: AdminConnections = Default::default();
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = {
                    let mut live = live.lock();
                    live.retain(|(_, task)| !task.is_finished());
                    live.pop_front()
                };
                if let Some((_, task)) = oldest {
                    task.abort();
                }
                // The aborted task gives its slot back when it is dropped, right away.
                let wait = slots.clone().acquire_owned();
                match tokio::time::timeout(Duration::from_millis(100), wait).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        tracing::debug!(%peer, "admin listener at its connection bound");
                        continue;
                    }
                }
            }
        };
        let app = app.clone();
        let id = next_id;
        next_id += 1;
        let registry = live.clone();
        let task = tokio::spawn(async move {
            let _permit = permit;
            let _forget = Forget(registry, id);
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                admin_route(app.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_header_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "admin connection error");
            }
        });
        let mut live = live.lock();
        // A connection that ended before it was listed leaves a finished entry behind (its
        // own removal ran first): sweep those now and then, so a connect-and-close loop
        // cannot grow the list past twice the bound.
        if live.len() >= 2 * ADMIN_MAX_CONNECTIONS {
            live.retain(|(_, task)| !task.is_finished());
        }
        live.push_back((id, task.abort_handle()));
    }
}

/// The admin listener's hold on one connection for which it may be evicted; removed when
/// the connection ends, however it ends.
type AdminConnections = Arc<parking_lot::Mutex<VecDeque<(u64, tokio::task::AbortHandle)>>>;

struct Forget(AdminConnections, u64);

impl Drop for Forget {
    fn drop(&mut self) {
        self.0.lock().retain(|(id, _)| *id != self.1);
    }
}

async fn admin_route(
    app: Arc<App>,
    req: http::Request<Incoming>,
) -> Result<routes::Response, std::convert::Infallible> {
    if req.method() == http::Method::GET && is_admin_path(req.uri().path()) {
        routes::route(app, req).await
    } else {
        Ok(routes::json_error(
            http::StatusCode::NOT_FOUND,
            "not_found",
            "the admin listener serves /healthz, /readyz, /health/websocket and /metrics only",
        ))
    }
}

/// The seed's `CONTAINER_RESTART=true`: once the broker is up (at most 30 s after start),
/// broadcast `container.reconnect` on the global channel, so every connection of every
/// instance is told to reconnect, as the seed's startup hook does. Once per start.
async fn announce_restart(app: Arc<App>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !app.broker.is_up() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!("CONTAINER_RESTART: the broker never came up; no reconnect broadcast");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let notice = serde_json::json!({
        "type": "container.reconnect",
        "message": "Server restarted, please reconnect",
        "timestamp": crate::event::now_rfc3339(),
    });
    match app
        .broker
        .publish_broadcast(notice.to_string().into_bytes())
        .await
    {
        Ok(()) => tracing::info!("CONTAINER_RESTART: container.reconnect broadcast"),
        Err(e) => tracing::warn!(error = %e, "CONTAINER_RESTART: broadcast failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_only_where_needed() {
        let needs = |p: &str| needs_credentials(&p.parse().unwrap());
        for p in [
            "/ws/demo",
            "/ws/user",
            "/v1/broadcast",
            "/v1/projects/p/events",
        ] {
            assert!(needs(p), "{p}");
        }
        for p in [
            "/healthz",
            "/readyz",
            "/health/websocket",
            "/metrics",
            "/console/",
            "/console/app.js",
            "/v1/ws-url/demo",
            "/",
        ] {
            assert!(!needs(p), "{p}");
        }
    }

    #[test]
    fn admin_paths() {
        for p in ["/healthz", "/readyz", "/health/websocket", "/metrics"] {
            assert!(is_admin_path(p));
        }
        for p in ["/ws/demo", "/v1/broadcast", "/console/", "/healthz/", "/"] {
            assert!(!is_admin_path(p));
        }
    }
}
