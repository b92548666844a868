//! Accept loop, the tower stack, and the shutdown sequence.
//!
//! ```text
//! TCP accept ─► hyper http1 (with upgrades) ─► tower stack, outermost first:
//!   SetSensitiveRequestHeaders (Authorization, Cookie never reach a log)
//!   └► RequestId + tracing span (path only: `?token=` is never logged)
//!      └► ClientIp (X-Forwarded-For/Forwarded only from server.trusted_proxies)
//!         └► HandshakeRateLimit (per client IP, /ws/ only: 429 + Retry-After)
//!            └► Auth (JWT or session → `Authentication` in request extensions)
//!               └► routes::route (HTTP API, or handshake::handle for /ws/…)
//! ```
//!
//! Before the upgrade a connection is only an HTTP connection, and a cheap one to abuse:
//! slowloris clients that never finish their headers are closed after
//! `server.header_read_timeout_secs` (idle keep-alive connections likewise), a request head
//! may hold at most [`MAX_HEADER_BYTES`], and at most `server.max_pending_connections` such
//! connections exist at once (beyond, new ones are closed at accept). Upgraded connections
//! are counted by [`crate::limits`] instead.
//!
//! Shutdown (PROTOCOL §5): mark draining (readyz 503, upgrades 503; the listener keeps
//! answering meanwhile); every session flushes its queue, then gets `container.reconnect`
//! and close 1012; then the listener closes and plain HTTP connections finish the request
//! they carry. We wait for sessions and requests at most `shutdown_grace_secs` in all, then
//! return so the process exits 0. A request is never cut by the exit while the grace lasts:
//! a publish cut after Redis ran it would leave its caller unsure whether it happened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rand::Rng;
use switchboard_middleware::{
    AuthLayer, ClientIpLayer, HandshakeRateLimitLayer, PeerAddr, RequestIdLayer,
};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceBuilder;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::app::App;
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

fn is_handshake(uri: &http::Uri) -> bool {
    uri.path().starts_with("/ws/")
}

/// Plain HTTP connections still being served (an upgraded one leaves as soon as its
/// session task has the socket): what the end of a drain waits for.
#[derive(Clone, Default)]
struct HttpConnections(Arc<AtomicUsize>);

struct HttpConnection(Arc<AtomicUsize>);

impl HttpConnections {
    fn enter(&self) -> HttpConnection {
        self.0.fetch_add(1, Ordering::AcqRel);
        HttpConnection(self.0.clone())
    }

    fn active(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
    );
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
    let route_app = app.clone();
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            header::COOKIE,
        ]))
        .layer(RequestIdLayer::new())
        .layer(ClientIpLayer::new(app.config.trusted_proxies()))
        .layer(rate_limit)
        .layer(AuthLayer::new(app.auth.clone()))
        .service_fn(move |req: http::Request<Incoming>| routes::route(route_app.clone(), req));

    let header_timeout = Duration::from_secs(app.config.server.header_read_timeout_secs);
    let pending = match app.config.server.max_pending_connections {
        0 => None,
        n => Some(Arc::new(Semaphore::new(n))),
    };
    let mut refused = Refusals::default();

    let (close_http, http_closing) = watch::channel(false);
    let http_connections = HttpConnections::default();
    // The listener keeps serving while draining, so /readyz and new upgrades can answer
    // 503 (PROTOCOL §5); it closes once the drain is over.
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
        let permit = match &pending {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    // Closing at once costs the attacker a reconnect and us nothing.
                    drop(stream);
                    refused.note(peer);
                    continue;
                }
            },
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
        let counted = http_connections.enter();
        tokio::spawn(async move {
            // Held while the connection speaks HTTP; an upgrade ends this task.
            let _permit = permit;
            let _counted = counted;
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
    // tests/faults.rs: publishes cut by the exit had been carried out by Redis, unanswered).
    // Idle keep-alive connections were told to close when the drain began.
    while http_connections.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if http_connections.active() > 0 {
        tracing::warn!(
            left = http_connections.active(),
            "grace period over; dropping HTTP connections still in a request"
        );
    }
    trim.abort();
    heartbeat.abort();
}

/// Connections closed at accept because `server.max_pending_connections` were open;
/// logged at most once per [`REFUSAL_LOG_EVERY`], with the count since the last line.
#[derive(Default)]
struct Refusals {
    since_log: u64,
    logged_at: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, peer: SocketAddr) {
        self.since_log += 1;
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            refused = self.since_log,
            last_peer = %peer,
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
        let mut rng = rand::thread_rng();
        for session in &sessions {
            // Jitter spreads the reconnect storm over the other instances.
            let after = rng.gen_range(100..2_000);
            session.close_for_restart(after);
        }
    }
    let deadline = tokio::time::Instant::now() + grace;
    while app.hub.session_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = app.hub.session_count();
    if left > 0 {
        tracing::warn!(left, "grace period over; dropping remaining connections");
        for s in app.hub.sessions() {
            s.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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
