//! Two gateways behind Debian's nginx running `deploy/nginx.conf`, end to end.
//!
//! The test renders the committed config (listen port, upstream addresses, log directory;
//! pid and temp paths added) and runs nginx with `-p` in a temp directory, `daemon off`, on
//! a free loopback port (a fresh one if another process takes it before nginx binds it),
//! stopping it by PID. Every substitution must match the committed file exactly, so a
//! change to its shape fails here instead of testing another config.
//! Three things are checked:
//! - WebSocket upgrades, the HTTP API and the health endpoints work through the proxy;
//! - `X-Forwarded-For` is believed from nginx only: per-IP limits see the real client
//!   (another loopback address per client), and a client cannot pick its address by
//!   sending its own forwarding headers;
//! - when one instance drains (SIGTERM), its clients reconnect through nginx to the other
//!   and resume with `last_seq`/`epoch`: every seq arrives once, in order.
//!
//! nginx must be installed (`scripts/test` installs it; `NGINX_BIN` overrides the path):
//! without it the tests fail saying so, they never pass silently.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use tokio::sync::{mpsc, watch};

/// The file under test, as committed.
const CONF: &str = include_str!("../../deploy/nginx.conf");

// ---------------------------------------------------------------------------------------
// nginx

fn nginx_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NGINX_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    // Debian installs it in /usr/sbin, which is not on every user's PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx not found (PATH, /usr/sbin): run `scripts/test`, which installs it, \
                 or `apt-get install -y nginx`; NGINX_BIN=/path/to/nginx overrides"
            )
        })
}

/// Replaces `from` by `to`, asserting it occurs exactly `times` times in the config.
fn substitute(conf: &mut String, from: &str, to: &str, times: usize) {
    let found = conf.matches(from).count();
    assert_eq!(
        found, times,
        "deploy/nginx.conf: expected {from:?} {times} time(s), found {found}; this test runs \
         the committed file and must be updated with it"
    );
    *conf = conf.replace(from, to);
}

/// `deploy/nginx.conf` with this test's addresses and a private directory for every file
/// nginx writes.
fn render(dir: &Path, listen: SocketAddr, upstreams: [SocketAddr; 2]) -> String {
    let mut conf = CONF.to_owned();
    let d = dir.display();
    substitute(&mut conf, "listen 80;", &format!("listen {listen};"), 1);
    for (i, up) in upstreams.iter().enumerate() {
        let name = format!("server gateway-{}:8080 ", i + 1);
        substitute(&mut conf, &name, &format!("server {up} "), 1);
    }
    substitute(&mut conf, "/var/log/nginx/", &format!("{d}/"), 2);
    // Request bodies and buffered responses, which default to /var/lib/nginx.
    let temps: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {d}/{t};\n"))
        .collect();
    substitute(&mut conf, "\nhttp {\n", &format!("\nhttp {{\n{temps}"), 1);
    conf
}

struct Nginx {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// nginx on a free loopback port, on a fresh one if another process takes the port
    /// between [`free_port`]'s probe and nginx's bind.
    fn start(upstreams: [SocketAddr; 2]) -> Nginx {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-nginx-{}-{}",
            std::process::id(),
            unique("n")
        ));
        std::fs::create_dir_all(&dir).expect("create nginx temp dir");
        let mut nginx = Nginx {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        for _ in 0..PORT_ATTEMPTS {
            nginx.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            if nginx.spawn(upstreams).is_ok() {
                return nginx;
            }
        }
        panic!("nginx: {PORT_ATTEMPTS} free ports in a row were taken before it bound them");
    }

    /// Starts nginx on `self.addr` and waits until it serves there; Err when another
    /// process took the port first (nginx is stopped then).
    fn spawn(&mut self, upstreams: [SocketAddr; 2]) -> Result<(), PortTaken> {
        let dir = &self.dir;
        for log in ["stderr.log", "error.log", "nginx.pid"] {
            let _ = std::fs::remove_file(dir.join(log));
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, render(dir, self.addr, upstreams)).expect("write nginx.conf");
        let output = std::fs::File::create(dir.join("stderr.log")).expect("create stderr.log");
        let bin = nginx_bin();
        let child = Command::new(&bin)
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {}/nginx.pid;", dir.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
        self.wait_listening()
    }

    /// Until this nginx answers its own health location (10 s). It is this one when the
    /// pid file names our child: nginx writes it only after binding its listener. A bind
    /// failure (nginx retries for 2.5 s before it gives up) stops it and returns Err; any
    /// other failure panics with its error log.
    fn wait_listening(&mut self) -> Result<(), PortTaken> {
        let pid = self.child.as_ref().unwrap().id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ours = self.file("nginx.pid").trim() == pid.to_string();
            if ours && self.health_ok() {
                return Ok(());
            }
            let logs = format!("{}\n{}", self.file("stderr.log"), self.file("error.log"));
            if logs.contains("Address already in use") {
                self.stop();
                return Err(PortTaken);
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "nginx did not come up on {} (exit: {exited:?})\n{logs}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn health_ok(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /nginx-health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.starts_with(b"HTTP/1.1 200")
    }

    fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        self.file("access.log")
    }

    /// SIGTERM to the master by PID (it stops its workers; SIGKILL would orphan them),
    /// then SIGKILL if it is still there after 5 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().unwrap().is_none() {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------
// the stack

struct Stack {
    gws: [Gateway; 2],
    nginx: Nginx,
    // Dropped last: the gateways and nginx go first.
    _redis: RedisServer,
}

/// Redis, two gateways on it (each configured by `opts`), nginx in front of both.
fn stack(opts: impl Fn(GatewayOpts) -> GatewayOpts) -> Stack {
    let redis = RedisServer::start();
    let start = |name: &str| {
        opts(
            GatewayOpts::new()
                .redis(redis.url())
                .instance(&unique(name)),
        )
        .start()
    };
    let gws = [start("gw-a"), start("gw-b")];
    let nginx = Nginx::start([gws[0].addr(), gws[1].addr()]);
    Stack {
        gws,
        nginx,
        _redis: redis,
    }
}

impl Stack {
    async fn ws_from(
        &self,
        local: Option<IpAddr>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, Refused> {
        ws_connect_from(local, self.nginx.addr, path, headers, None).await
    }

    /// A fresh connection through nginx; returns it and its `connection.established`.
    async fn connect_from(&self, local: Option<IpAddr>, project: &str) -> (WsClient, Value) {
        let token = self.gws[0].token("alice", &[project]);
        let path = format!("/ws/{project}?token={token}");
        let mut c = match self.ws_from(local, &path, &[]).await {
            Ok(c) => c,
            Err(r) => panic!(
                "upgrade through nginx from {local:?} refused: {r:?}\n{}",
                self.nginx.access_log()
            ),
        };
        let est = c.next_json(T).await;
        assert_eq!(est["type"], "connection.established", "{est}");
        (c, est)
    }

    async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        http_request(self.nginx.addr, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} through nginx: {e}"))
    }

    fn logs(&self) -> String {
        format!(
            "--- {}\n{}\n--- {}\n{}\n--- nginx access.log\n{}\n--- nginx error.log\n{}",
            self.gws[0].instance_id,
            self.gws[0].logs(),
            self.gws[1].instance_id,
            self.gws[1].logs(),
            self.nginx.access_log(),
            self.nginx.file("error.log")
        )
    }
}

fn instance_of(est: &Value) -> String {
    est["instance_id"].as_str().expect("instance_id").to_owned()
}

fn loopback(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

// ---------------------------------------------------------------------------------------
// 1. WebSocket, API and health through the proxy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_api_and_health_go_through_nginx() {
    let s = stack(|o| o.heartbeat(1));
    let project = unique("via-nginx");

    // Round robin over both upstreams: four clients land on both instances.
    let mut clients = Vec::new();
    let mut instances = BTreeSet::new();
    for _ in 0..4 {
        let (c, est) = s.connect_from(None, &project).await;
        instances.insert(instance_of(&est));
        clients.push(c);
    }
    let ids: BTreeSet<String> = s.gws.iter().map(|g| g.instance_id.clone()).collect();
    assert_eq!(
        instances,
        ids,
        "clients spread over both upstreams\n{}",
        s.logs()
    );

    // nginx's request id reaches the gateway, which echoes it on the 101.
    let rid = clients[0]
        .response_header("x-request-id")
        .expect("x-request-id on the 101")
        .to_owned();
    assert!(
        rid.len() == 32 && rid.bytes().all(|b| b.is_ascii_hexdigit()),
        "nginx's $request_id, not the gateway's own UUID: {rid}"
    );

    // A publish through nginx reaches every client, on both instances (Redis fan-out).
    let auth = format!("Bearer {}", s.gws[0].service_token());
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    let r = s
        .http(
            "POST",
            &format!("/v1/projects/{project}/events"),
            &headers,
            Some(ev(1).to_string().as_bytes()),
        )
        .await;
    assert_eq!(r.status, 202, "publish through nginx: {}", r.text());
    assert_eq!(r.json()["seq"], serde_json::json!([1]));
    for c in &mut clients {
        let v = c.next_json(T).await;
        assert_eq!(
            (v["type"].as_str(), v["seq"].as_u64()),
            (Some("file.changed"), Some(1)),
            "{v}"
        );
    }

    // Client messages go up, heartbeats come down (the proxy keeps the connection open
    // across them).
    clients[0].assert_alive().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match clients[1].next_frame(left).await {
            Some(Frame::Text(t)) if t.contains("\"system.heartbeat\"") => break,
            Some(Frame::Text(_)) | Some(Frame::Ping) | Some(Frame::Pong) => {}
            other => panic!("no heartbeat through nginx: {other:?}"),
        }
    }

    // Health endpoints answer through nginx; /metrics does not (scraped per instance).
    for path in ["/healthz", "/readyz", "/health/websocket", "/nginx-health"] {
        let r = s.http("GET", path, &[], None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let h = s.http("GET", "/health/websocket", &[], None).await.json();
    assert!(ids.contains(h["instance_id"].as_str().unwrap()), "{h}");
    assert_eq!(s.http("GET", "/metrics", &[], None).await.status, 404);
    assert_eq!(s.gws[0].get("/metrics").await.status, 200);

    // Without an upgrade the gateway's own answer (426) comes back.
    let token = s.gws[0].token("alice", &[&project]);
    let r = s
        .http("GET", &format!("/ws/{project}?token={token}"), &[], None)
        .await;
    assert_eq!(r.status, 426, "{}", r.text());

    for c in clients {
        c.close().await;
    }
    // The access log names the upgrade and its request id, and never the token.
    let log = s.nginx.access_log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"GET /ws/") && l.contains(" 101 ") && l.contains(&rid)),
        "no 101 line with rid {rid} in the access log:\n{log}"
    );
    assert!(
        !log.contains(&token) && !log.contains("token="),
        "token in the access log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------
// 2. X-Forwarded-For from the proxy only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limits_see_the_real_client_behind_nginx() {
    // One connection per client IP per instance: with two instances, the third
    // connection from one address is refused (nginx tries both, both say 503).
    let s = stack(|o| {
        o.cfg("server", "trusted_proxies", r#"["127.0.0.1"]"#)
            .cfg("server", "max_connections_per_ip", "1")
            .env("SWITCHBOARD_LOG_FORMAT", "json")
            // `websocket connected` is a debug line
            .env("RUST_LOG", "info,switchboard=debug")
    });
    let project = unique("xff");
    let (a, b, spoofed) = (loopback(2), loopback(3), "127.0.0.9");

    let (a1, est1) = s.connect_from(a, &project).await;
    let (a2, est2) = s.connect_from(a, &project).await;
    assert_ne!(
        instance_of(&est1),
        instance_of(&est2),
        "the second connection of 127.0.0.2 goes to the instance where it has none"
    );
    let token = s.gws[0].token("alice", &[&project]);
    let path = format!("/ws/{project}?token={token}");
    match s.ws_from(a, &path, &[]).await {
        Err(r) => {
            assert_eq!(
                r.status, 503,
                "127.0.0.2 is at its cap on both instances: {r:?}"
            );
            assert!(
                r.header("retry-after").is_some(),
                "Retry-After passed through: {r:?}"
            );
        }
        Ok(_) => panic!(
            "a third connection from 127.0.0.2 was accepted\n{}",
            s.logs()
        ),
    }
    // Its own forwarding headers do not make it someone else: nginx replaces them.
    let spoof = [
        ("X-Forwarded-For", spoofed),
        ("Forwarded", "for=127.0.0.9"),
        ("X-Real-IP", spoofed),
    ];
    match s.ws_from(a, &path, &spoof).await {
        Err(r) => assert_eq!(r.status, 503, "{r:?}"),
        Ok(_) => panic!(
            "127.0.0.2 chose its address with forwarding headers\n{}",
            s.logs()
        ),
    }

    // Another client behind the same proxy is not affected by 127.0.0.2's limit.
    let (b1, est_b1) = s.connect_from(b, &project).await;
    let (b2, est_b2) = s.connect_from(b, &project).await;
    assert_ne!(instance_of(&est_b1), instance_of(&est_b2));

    // The logs carry the real client (the TCP peer is nginx). Lines are written a moment
    // after the handshake: wait for them.
    let logs = || format!("{}\n{}", s.gws[0].logs(), s.gws[1].logs());
    let both = eventually(Duration::from_secs(5), || async {
        let l = logs();
        ["127.0.0.2", "127.0.0.3"].iter().all(|ip| {
            l.lines().any(|line| {
                line.contains("websocket connected")
                    && line.contains(&format!("\"client_ip\":\"{ip}\""))
            })
        })
    })
    .await;
    let logs = logs();
    assert!(
        both,
        "client_ip 127.0.0.2 and 127.0.0.3 not both logged\n{logs}"
    );
    assert!(
        !logs.contains(spoofed),
        "the spoofed address was believed:\n{logs}"
    );

    for c in [a1, a2, b1, b2] {
        c.close().await;
    }
}

// ---------------------------------------------------------------------------------------
// 3. drain one instance: its clients resume on the other through nginx

/// What one client saw over its whole life (all its connections).
#[derive(Debug, Default)]
struct Trace {
    /// `instance_id` and `resumed` of each connection, in order.
    connections: Vec<(String, bool)>,
    /// Per connection: the `last_seq` it asked for, and how many events came before it.
    starts: Vec<(Option<u64>, usize)>,
    /// seq of every event received, in arrival order.
    seqs: Vec<u64>,
    reconnect_frames: usize,
    closes: Vec<u16>,
    resyncs: usize,
}

/// A client as a browser app would run it: on `container.reconnect` + 1012 it waits
/// `reconnect_after_ms` and reconnects through nginx with `last_seq` and `epoch`. Any
/// refused reconnect fails the test: behind a correct proxy it never needs a retry.
/// Returns once it has seen `final_seq`.
async fn follow(
    nginx: SocketAddr,
    project: String,
    token: String,
    connected: mpsc::UnboundedSender<String>,
    reconnected: Arc<AtomicUsize>,
    mut final_seq: watch::Receiver<Option<u64>>,
) -> Trace {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut t = Trace::default();
    let mut position: Option<(u64, String)> = None;
    loop {
        let path = match &position {
            None => format!("/ws/{project}?token={token}"),
            Some((seq, epoch)) => {
                format!("/ws/{project}?token={token}&last_seq={seq}&epoch={epoch}")
            }
        };
        t.starts
            .push((position.as_ref().map(|p| p.0), t.seqs.len()));
        let mut c = ws_connect(nginx, &path, &[], None)
            .await
            .unwrap_or_else(|r| panic!("connect through nginx ({path}) refused: {r:?}"));
        let est = c.next_json(T).await;
        assert_eq!(est["type"], "connection.established", "{est}");
        t.connections
            .push((instance_of(&est), est["resumed"].as_bool().unwrap_or(false)));
        if position.is_none() {
            let seq = est["seq"].as_u64().expect("seq");
            position = Some((seq, est["epoch"].as_str().expect("epoch").to_owned()));
            let _ = connected.send(instance_of(&est));
        } else {
            reconnected.fetch_add(1, Ordering::SeqCst);
        }
        let mut wait_ms = 0;
        loop {
            let done = final_seq
                .borrow_and_update()
                .is_some_and(|f| position.as_ref().is_some_and(|p| p.0 >= f));
            if done {
                c.close().await;
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "client still waiting after 30 s: {t:?}"
            );
            let frame = tokio::select! {
                f = c.next_frame(Duration::from_millis(200)) => f,
                _ = final_seq.changed() => continue,
            };
            match frame {
                None | Some(Frame::Ping) | Some(Frame::Pong) => {}
                Some(Frame::Text(text)) => {
                    let v: Value = serde_json::from_str(&text).expect("JSON frame");
                    match v["type"].as_str() {
                        Some("file.changed") => {
                            let seq = v["seq"].as_u64().expect("event with a seq");
                            t.seqs.push(seq);
                            position.as_mut().unwrap().0 = seq;
                        }
                        Some("container.reconnect") => {
                            t.reconnect_frames += 1;
                            wait_ms = v["reconnect_after_ms"]
                                .as_u64()
                                .expect("reconnect_after_ms");
                        }
                        Some("connection.resync_required") => t.resyncs += 1,
                        _ => {}
                    }
                }
                Some(Frame::Close(Some((code, _)))) => {
                    t.closes.push(code);
                    assert_eq!(code, 1012, "only a restart close is expected: {t:?}");
                    break;
                }
                Some(other) => panic!("unexpected {other:?}; so far {t:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_instance_hands_its_clients_to_the_other_through_nginx() {
    let started = Instant::now();
    // Every test client is 127.0.0.1: no handshake rate limit for this reconnect storm.
    let mut s = stack(|o| o.cfg("server", "handshake_rate_per_sec", "0").grace(5));
    let project = unique("drain");
    let token = s.gws[0].token("alice", &[&project]);
    let (victim_id, survivor_id) = (s.gws[0].instance_id.clone(), s.gws[1].instance_id.clone());

    const CLIENTS: usize = 10;
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    let reconnected = Arc::new(AtomicUsize::new(0));
    let (final_tx, final_rx) = watch::channel(None);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(follow(
                s.nginx.addr,
                project.clone(),
                token.clone(),
                connected_tx.clone(),
                reconnected.clone(),
                final_rx.clone(),
            ))
        })
        .collect();
    let mut first = Vec::new();
    for _ in 0..CLIENTS {
        let id = tokio::time::timeout(Duration::from_secs(10), connected_rx.recv())
            .await
            .expect("clients connect through nginx")
            .unwrap();
        first.push(id);
    }
    let victims = first.iter().filter(|id| **id == victim_id).count();
    assert!(
        victims > 0 && victims < CLIENTS,
        "clients on both instances: {first:?}\n{}",
        s.logs()
    );

    // Publish continuously through nginx. A 502/503 is retried after a pause, as a worker
    // would; the count is reported.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, failures) = (stop.clone(), failures.clone());
        let (addr, project) = (s.nginx.addr, project.clone());
        let auth = format!("Bearer {}", s.gws[0].service_token());
        tokio::spawn(async move {
            let headers = [
                ("Authorization", auth.as_str()),
                ("Content-Type", "application/json"),
            ];
            let path = format!("/v1/projects/{project}/events");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let body = ev(n).to_string();
                match http_request(addr, "POST", &path, &headers, Some(body.as_bytes())).await {
                    Ok(r) if r.status == 202 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let publishing = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;

    // A client of the victim that never reads: its close reply never comes, which keeps
    // the victim draining (readyz 503, upgrades 503) for a moment after SIGTERM.
    let lingerer = s.gws[0].client(&project).await;
    s.gws[0].sigterm();
    let draining = eventually(Duration::from_secs(3), || async {
        readyz(s.gws[0].addr()).await == Some(503)
    })
    .await;
    assert!(draining, "the victim never reported draining\n{}", s.logs());

    // New connections during the drain: nginx retries the 503 on the other instance.
    for _ in 0..4 {
        let (c, est) = s.connect_from(None, &project).await;
        assert_eq!(instance_of(&est), survivor_id, "{est}");
        drop(c);
    }
    let retried = s
        .nginx
        .access_log()
        .lines()
        .filter(|l| l.contains("\"GET /ws/") && l.contains("(503, 101)"))
        .count();
    assert!(
        retried > 0,
        "no upgrade was retried after a 503 from the draining instance\n{}",
        s.logs()
    );

    let status = s.gws[0].wait_exit(Duration::from_secs(10));
    assert!(status.success(), "victim exit: {status:?}");
    drop(lingerer);
    let all_back = eventually(Duration::from_secs(8), || async {
        reconnected.load(Ordering::SeqCst) == victims
    })
    .await;
    assert!(
        all_back,
        "{} of {victims} clients reconnected\n{}",
        reconnected.load(Ordering::SeqCst),
        s.logs()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    let published_for = publishing.elapsed().as_secs_f64();

    // The last seq, from one more publish: everything up to it must have arrived.
    let last = s.gws[1].publish(&project, &ev(0)).await[0];
    final_tx.send(Some(last)).unwrap();
    let mut traces = Vec::new();
    for c in clients {
        traces.push(
            tokio::time::timeout(Duration::from_secs(15), c)
                .await
                .expect("client finished")
                .expect("client task"),
        );
    }

    let want: Vec<u64> = (1..=last).collect();
    let lost: usize = traces
        .iter()
        .map(|t| {
            let received: BTreeSet<u64> = t.seqs.iter().copied().collect();
            want.iter().filter(|s| !received.contains(s)).count()
        })
        .sum();
    eprintln!(
        "nginx drain: {CLIENTS} clients ({victims} on the drained instance), {last} events \
         ({:.0}/s), {lost} deliveries lost, {} publishes failed and retried, {retried} upgrades \
         retried after a 503, {:.1} s",
        last as f64 / published_for,
        failures.load(Ordering::SeqCst),
        started.elapsed().as_secs_f64()
    );
    for t in &traces {
        assert_eq!(t.seqs, want, "every seq once, in order: {t:?}");
        assert_eq!(t.resyncs, 0, "{t:?}");
        let (first_instance, _) = &t.connections[0];
        if *first_instance == victim_id {
            assert_eq!(
                t.reconnect_frames, 1,
                "container.reconnect before 1012: {t:?}"
            );
            assert_eq!(t.closes, [1012], "{t:?}");
            assert_eq!(t.connections.len(), 2, "{t:?}");
            assert_eq!(
                t.connections[1],
                (survivor_id.clone(), true),
                "resumed on the survivor: {t:?}"
            );
        } else {
            assert_eq!(
                t.connections.len(),
                1,
                "survivor's clients stay connected: {t:?}"
            );
            assert!(t.closes.is_empty(), "{t:?}");
        }
    }
    s.nginx.stop();
}

/// `GET /readyz` directly on an instance; None if it does not answer.
async fn readyz(addr: SocketAddr) -> Option<u16> {
    http_request(addr, "GET", "/readyz", &[], None)
        .await
        .ok()
        .map(|r| r.status)
}
