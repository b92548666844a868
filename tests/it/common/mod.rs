//! Black-box test harness: starts the real `switchboard` binary on `127.0.0.1:0` and, for
//! Redis mode, a private `redis-server` on a free port (started again on another one if a
//! process takes it first; killed by PID), and gives tests small HTTP, WebSocket, Redis
//! and token helpers.
//!
//! Everything here has a timeout: a broken server makes a test fail, never hang.
//! `SWITCHBOARD_BIN` overrides the binary under test (default: this crate's `switchboard`).

pub mod chaos;
pub mod hook;
pub mod topology;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use deadpool_redis::redis;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// Default wait for one expected frame or reply.
pub const T: Duration = Duration::from_secs(5);
/// The secret every gateway of the suite uses unless a test says otherwise.
pub const SECRET: &str = "switchboard-integration-test-secret-0123456789";

// ---------------------------------------------------------------------------------------
// small utilities

/// A loopback port nobody was listening on a moment ago, for a server that cannot bind
/// port 0 and report it (redis-server, nginx).
///
/// Releasing the probe before the server binds leaves a window in which another process
/// can take the port, so every caller retries with a fresh port (or, for a restart that
/// must keep its port, the same one) when its server fails with "Address already in use".
/// The window is also made small: the port comes from below the kernel's ephemeral range,
/// which the outgoing connections of the tests running in parallel (and `bind(0)`) draw
/// from, so only another explicit pick like this one can collide.
pub fn free_port() -> u16 {
    let (low, _) = ephemeral_range();
    let base = low.saturating_sub(10_000).max(1024);
    if low.saturating_sub(base) >= 1000 {
        for _ in 0..100 {
            let pick = base + (uuid::Uuid::new_v4().as_u128() % u128::from(low - base)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", pick)).is_ok() {
                return pick;
            }
        }
    }
    // No room below the ephemeral range (or all taken): any free port the kernel picks.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The kernel's range for ephemeral ports (Linux defaults when it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// How many times a server that lost its port to another process is started again on a
/// fresh one before the test gives up.
pub const PORT_ATTEMPTS: usize = 5;

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "switchboard-tests-{}-{}",
        std::process::id(),
        unique(name)
    ))
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes; returns the last result.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many connections wait in the accept queue of the TCP listener on `addr` (IPv4, read
/// from /proc/net/tcp); None if there is no such listener. A server that takes connections
/// off in order, as the gateway's accept loop does, has seen every connection made so far
/// once this is 0.
pub fn accept_queue_len(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    // The kernel prints the address as the u32 it holds in network order, in host order.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx_queue:rx_queue ...; st 0A is LISTEN, whose
        // rx_queue is the accept queue's length.
        if f.len() < 5 || f[1] != local || f[3] != "0A" {
            return None;
        }
        let rx = f[4].split(':').nth(1)?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// `s` percent-encoded for a URL query value (unreserved characters kept).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `2024-05-01T12:00:00.123Z`: RFC 3339, UTC, millisecond precision.
pub fn is_rfc3339_ms_utc(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 24 {
        return false;
    }
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    digits.iter().all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = match chunk.len() {
            3 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32,
            2 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8,
            _ => (chunk[0] as u32) << 16,
        };
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// tokens

/// HS256 token: `sub`, `exp = now + ttl`, `projects`, and `role: "service"` when `service`.
pub fn token(secret: &str, sub: &str, projects: &[&str], ttl: i64, service: bool) -> String {
    let mut claims = json!({
        "sub": sub,
        "iat": now_secs(),
        "exp": now_secs() + ttl,
        "projects": projects,
    });
    if service {
        claims["role"] = json!("service");
    }
    token_claims(secret, &claims)
}

/// HS256 token with arbitrary claims.
pub fn token_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode token")
}

/// Unsigned `alg: none` token.
pub fn token_alg_none(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

pub fn service_token(secret: &str) -> String {
    token(secret, "worker", &["*"], 3600, true)
}

/// The resident memory of process `pid` (KiB; 0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples the RSS of `pid` every 50 ms until stopped; returns the peak (KiB).
pub fn rss_sampler(
    pid: u32,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<u64>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak.max(rss_kib(pid))
    });
    (stop, task)
}

// ---------------------------------------------------------------------------------------
// events

/// A schema-valid event with a sequence marker `n` (file events have no required fields).
pub fn ev(n: u64) -> Value {
    json!({"type": "file.changed", "file_path": format!("/w/{n}.txt"), "change_type": "modified", "n": n})
}

pub fn task_progress(task: &str, pct: u64) -> Value {
    json!({"type": "task.progress", "task_id": task, "node_id": "n1",
           "progress": {"percentage": pct, "current_step": pct, "total_steps": 100, "step_description": "working"}})
}

// ---------------------------------------------------------------------------------------
// redis-server

/// A server failed to start because another process bound its port first.
#[derive(Debug)]
pub struct PortTaken;

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// Append-only file fsynced on every write: a restart (even after SIGKILL) comes back
    /// with every write it acknowledged.
    persistent: bool,
    /// More redis-server arguments (a replica's `--replicaof`, a cluster node's options).
    extra: Vec<String>,
}

impl RedisServer {
    /// A Redis without persistence: `restart` gives an empty one.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// A Redis with `appendonly yes` and `appendfsync always`: `restart` (after a SIGKILL)
    /// reloads everything it acknowledged, like a production Redis with AOF.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        Self::start_args(persistent, &[])
    }

    /// A redis-server with more arguments (see `topology.rs`: replicas, cluster nodes).
    pub fn start_args(persistent: bool, extra: &[&str]) -> RedisServer {
        let dir = temp_path("redis");
        std::fs::create_dir_all(&dir).expect("create redis temp dir");
        let mut r = RedisServer {
            child: None,
            port: 0,
            dir,
            persistent,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for _ in 0..PORT_ATTEMPTS {
            r.port = free_port();
            if r.spawn().is_ok() {
                return r;
            }
        }
        panic!("redis-server: {PORT_ATTEMPTS} free ports in a row were taken before it bound them");
    }

    /// Starts redis-server on `self.port` and waits (10 s) until it answers as itself. The
    /// error is the one a caller can retry: another process took the port first. Any other
    /// failure panics with redis-server's log.
    fn spawn(&mut self) -> Result<(), PortTaken> {
        let aof: &[&str] = if self.persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let log = self.dir.join("redis.log");
        let _ = std::fs::remove_file(&log);
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(aof)
            .args(&self.extra)
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(["--logfile", log.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on PATH: run `scripts/test`, which installs it \
                 (or `apt-get install -y redis-server`)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.answers_as(pid) {
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                if log.contains("Address already in use") {
                    return Err(PortTaken);
                }
                panic!(
                    "redis-server on port {} exited at start: {st}\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        panic!(
            "redis-server on port {} did not answer within 10 s\n{}",
            self.port,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Whether the redis-server with process id `pid` answers on our port: not merely a
    /// server, which could be another test's that took the port first.
    fn answers_as(&self, pid: u32) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"INFO server\r\n").is_err() {
            return false;
        }
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        while reply.len() < 1 << 16 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&reply);
            if let Some(at) = text.find("\r\nprocess_id:") {
                let line = &text[at + 2..];
                if let Some(end) = line.find("\r\n") {
                    return line[..end] == format!("process_id:{pid}");
                }
            }
        }
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL by PID, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal by PID (`STOP` freezes it: connections stay open, nothing answers;
    /// `CONT` resumes it). `kill` and drop still work on a stopped server (SIGKILL).
    pub fn signal(&self, sig: &str) {
        let pid = self.pid().expect("redis-server is not running");
        let st = Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {sig} {pid} failed");
    }

    /// A new redis-server on the same port: empty, or with its data for `start_persistent`.
    pub fn restart(&mut self) {
        self.kill();
        // The gateway under test knows this port, so it must be this one again. What can
        // hold it meanwhile is another test's `free_port` probe (for an instant: try again)
        // or a server started there (then this test cannot go on).
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.spawn().is_err() {
            assert!(
                Instant::now() < deadline,
                "port {} stayed taken by another process while redis-server restarted",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        tokio::time::timeout(T, self.client().get_multiplexed_async_connection())
            .await
            .expect("redis connect timed out")
            .expect("redis connect")
    }

    pub async fn subscribe(&self, channel: &str) -> Subscriber {
        let mut ps = tokio::time::timeout(T, self.client().get_async_pubsub())
            .await
            .expect("redis pubsub connect timed out")
            .expect("redis pubsub connect");
        ps.subscribe(channel).await.expect("SUBSCRIBE");
        Subscriber {
            stream: ps.into_on_message(),
        }
    }

    pub async fn pubsub_channels(&self, pattern: &str) -> Vec<String> {
        let mut c = self.conn().await;
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query_async(&mut c)
            .await
            .expect("PUBSUB CHANNELS")
    }

    /// Raw `PUBLISH` (what a legacy worker does); returns the receiver count.
    /// How many times Redis ran `command` so far (`INFO commandstats`; 0 before the first).
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut con = self.conn().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut con)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Writes `session:{id}` as the web backend would.
    /// `CLIENT KILL TYPE pubsub`: drops every pub/sub connection (the gateways' shared
    /// one included, as a network fault would); asserts there was one.
    pub async fn kill_pubsub_clients(&self) {
        let mut con = self.conn().await;
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut con)
            .await
            .unwrap();
        assert!(killed >= 1, "a gateway holds a pub/sub connection");
    }

    pub async fn set_session(&self, id: &str, record: &Value) {
        let mut con = self.conn().await;
        let _: () = redis::cmd("SET")
            .arg(format!("session:{id}"))
            .arg(record.to_string())
            .query_async(&mut con)
            .await
            .unwrap();
    }

    pub async fn publish(&self, channel: &str, payload: &str) -> i64 {
        let mut c = self.conn().await;
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut c)
            .await
            .expect("PUBLISH")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Subscriber {
    stream: redis::aio::PubSubStream,
}

impl Subscriber {
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        let msg = tokio::time::timeout(timeout, self.stream.next())
            .await
            .expect("no message on the Redis subscription in time")
            .expect("Redis subscription ended");
        let payload: String = msg.get_payload().expect("payload");
        serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("non-JSON on Redis channel: {e}: {payload}"))
    }

    pub async fn try_next_json(&mut self, timeout: Duration) -> Option<Value> {
        let msg = tokio::time::timeout(timeout, self.stream.next())
            .await
            .ok()??;
        let payload: String = msg.get_payload().ok()?;
        serde_json::from_str(&payload).ok()
    }
}

// ---------------------------------------------------------------------------------------
// the gateway process

pub fn switchboard_bin() -> PathBuf {
    match std::env::var_os("SWITCHBOARD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_switchboard")),
    }
}

/// Environment names the gateway reads; removed from the inherited environment so a
/// developer's shell never leaks into a test.
const GATEWAY_ENV: &[&str] = &[
    "REDIS_URL",
    "SWITCHBOARD_LISTEN",
    "SWITCHBOARD_JWT_SECRET",
    "SWITCHBOARD_JWT_PUBLIC_KEY_FILE",
    "WS_HEARTBEAT_INTERVAL",
    "WS_IDLE_TIMEOUT",
    "ENVIRONMENT",
    "DOMAIN",
    "BACKEND_HOST",
    "BACKEND_PORT",
    "CONTAINER_ID",
    "SWITCHBOARD_SHUTDOWN_GRACE",
    "RUST_LOG",
    "SWITCHBOARD_CONSOLE",
];

/// A `switchboard` command with a scrubbed environment (for the CLI tests).
pub fn switchboard_cmd() -> Command {
    let mut c = Command::new(switchboard_bin());
    for k in GATEWAY_ENV {
        c.env_remove(k);
    }
    c.stdin(Stdio::null());
    c
}

/// Runs a `switchboard` command to completion (20 s limit); returns (status, stdout, stderr).
pub fn run_cli(mut cmd: Command, stdin: Option<&str>) -> (ExitStatus, String, String) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn switchboard");
    if let Some(input) = stdin {
        let mut si = child.stdin.take().unwrap();
        si.write_all(input.as_bytes()).unwrap();
        drop(si);
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("switchboard command did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, to.join().unwrap(), te.join().unwrap())
}

#[derive(Clone, Debug)]
pub struct GatewayOpts {
    pub redis_url: Option<String>,
    pub secret: Option<String>,
    pub instance_id: String,
    pub environment: String,
    pub heartbeat: Option<u64>,
    pub idle: Option<u64>,
    pub grace: Option<u64>,
    pub rust_log: String,
    /// section -> key -> TOML literal
    pub toml: BTreeMap<String, BTreeMap<String, String>>,
    pub env: Vec<(String, String)>,
    pub subcommand: Option<String>,
    /// Wait for `/readyz` 200 before `start` returns (the listening line may come before the
    /// broker is connected, as a load balancer would see it). Default: on.
    pub wait_ready: bool,
    /// Keep every line of stdout and stderr (not only the last ones), for
    /// [`Gateway::output_after_exit`]. Default: off.
    pub keep_output: bool,
}

impl Default for GatewayOpts {
    fn default() -> Self {
        GatewayOpts {
            redis_url: None,
            secret: Some(SECRET.to_string()),
            instance_id: unique("gw"),
            environment: "development".into(),
            heartbeat: None,
            idle: None,
            grace: Some(5),
            rust_log: "info".into(),
            toml: BTreeMap::new(),
            env: Vec::new(),
            subcommand: Some("serve".into()),
            wait_ready: true,
            keep_output: false,
        }
    }
}

impl GatewayOpts {
    pub fn new() -> Self {
        Self::default()
    }
    /// Redis mode against this URL.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis_url = Some(url.into());
        self
    }
    /// Embedded in-memory broker (no `REDIS_URL`); the default.
    pub fn embedded(mut self) -> Self {
        self.redis_url = None;
        self
    }
    pub fn secret(mut self, s: Option<&str>) -> Self {
        self.secret = s.map(str::to_string);
        self
    }
    pub fn instance(mut self, id: &str) -> Self {
        self.instance_id = id.to_string();
        self
    }
    pub fn environment(mut self, e: &str) -> Self {
        self.environment = e.to_string();
        self
    }
    pub fn heartbeat(mut self, secs: u64) -> Self {
        self.heartbeat = Some(secs);
        self
    }
    pub fn idle(mut self, secs: u64) -> Self {
        self.idle = Some(secs);
        self
    }
    pub fn grace(mut self, secs: u64) -> Self {
        self.grace = Some(secs);
        self
    }
    /// One config key, as a TOML literal: `.cfg("ws", "max_message_bytes", "1024")`.
    pub fn cfg(mut self, section: &str, key: &str, toml_literal: &str) -> Self {
        self.toml
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), toml_literal.to_string());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    /// Return as soon as the listening line is printed, without waiting for `/readyz`.
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }
    pub fn subcommand(mut self, s: Option<&str>) -> Self {
        self.subcommand = s.map(str::to_string);
        self
    }
    /// Keep all of stdout and stderr for [`Gateway::output_after_exit`].
    pub fn keep_output(mut self) -> Self {
        self.keep_output = true;
        self
    }

    fn render_toml(&self) -> String {
        let mut s = String::new();
        for (section, kv) in &self.toml {
            s.push_str(&format!("[{section}]\n"));
            for (k, v) in kv {
                s.push_str(&format!("{k} = {v}\n"));
            }
            s.push('\n');
        }
        s
    }

    pub fn start(self) -> Gateway {
        Gateway::start(self)
    }
}

type Logs = Arc<Mutex<VecDeque<String>>>;

/// Every line of one output stream, and whether it reached its end.
#[derive(Default)]
struct Captured {
    lines: Vec<String>,
    closed: bool,
}

type Capture = Arc<Mutex<Captured>>;

fn drain<R: Read + Send + 'static>(
    r: R,
    tag: &'static str,
    logs: Logs,
    first: Option<mpsc::Sender<Result<String, String>>>,
    capture: Option<Capture>,
) {
    std::thread::spawn(move || {
        let mut first = first;
        let mut first_line: Option<String> = None;
        let reader = BufReader::new(r);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            {
                let mut l = logs.lock().unwrap();
                if l.len() >= 400 {
                    l.pop_front();
                }
                l.push_back(format!("[{tag}] {line}"));
            }
            if let Some(c) = &capture {
                c.lock().unwrap().lines.push(line.clone());
            }
            if first_line.is_none() {
                first_line = Some(line.clone());
            }
            if let Some(tx) = &first {
                if line.starts_with("switchboard listening on ") {
                    let _ = tx.send(Ok(format!("{}\n{}", first_line.clone().unwrap(), line)));
                    first = None;
                }
            }
        }
        if let Some(c) = &capture {
            c.lock().unwrap().closed = true;
        }
        if let Some(tx) = first {
            let _ = tx.send(Err(
                "stdout closed before the `switchboard listening on` line".into(),
            ));
        }
    });
}

pub struct Gateway {
    child: Option<Child>,
    addr: SocketAddr,
    logs: Logs,
    /// (stdout, stderr) in full, with `GatewayOpts::keep_output`.
    captured: Option<(Capture, Capture)>,
    pub secret: String,
    pub instance_id: String,
    pub first_stdout_line: String,
    config_path: Option<PathBuf>,
}

impl Gateway {
    pub fn start(opts: GatewayOpts) -> Gateway {
        let mut cmd = switchboard_cmd();
        if let Some(s) = &opts.subcommand {
            cmd.arg(s);
        }
        let toml = opts.render_toml();
        let config_path = if toml.trim().is_empty() {
            None
        } else {
            let p = temp_path("config").with_extension("toml");
            std::fs::write(&p, &toml).expect("write config");
            cmd.arg("--config").arg(&p);
            Some(p)
        };
        cmd.env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
            .env("ENVIRONMENT", &opts.environment)
            .env("CONTAINER_ID", &opts.instance_id)
            .env("RUST_LOG", &opts.rust_log);
        if let Some(url) = &opts.redis_url {
            cmd.env("REDIS_URL", url);
        }
        if let Some(s) = &opts.secret {
            cmd.env("SWITCHBOARD_JWT_SECRET", s);
        }
        if let Some(h) = opts.heartbeat {
            cmd.env("WS_HEARTBEAT_INTERVAL", h.to_string());
        }
        if let Some(i) = opts.idle {
            cmd.env("WS_IDLE_TIMEOUT", i.to_string());
        }
        if let Some(g) = opts.grace {
            cmd.env("SWITCHBOARD_SHUTDOWN_GRACE", g.to_string());
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", switchboard_bin().display()));
        let logs: Logs = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let captured = opts
            .keep_output
            .then(|| (Capture::default(), Capture::default()));
        drain(
            child.stdout.take().unwrap(),
            "out",
            logs.clone(),
            Some(tx),
            captured.as_ref().map(|c| c.0.clone()),
        );
        drain(
            child.stderr.take().unwrap(),
            "err",
            logs.clone(),
            None,
            captured.as_ref().map(|c| c.1.clone()),
        );

        let fail = |child: &mut Child, why: String, logs: &Logs| -> ! {
            let _ = child.kill();
            let status = child.wait().ok();
            std::thread::sleep(Duration::from_millis(100));
            let l: Vec<String> = logs.lock().unwrap().iter().cloned().collect();
            panic!(
                "gateway {} did not start: {why} (exit: {status:?})\nconfig:\n{toml}\nlast output:\n{}",
                switchboard_bin().display(),
                l.join("\n")
            )
        };
        let lines = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => fail(&mut child, e, &logs),
            Err(_) => fail(
                &mut child,
                "no `switchboard listening on` line within 20 s".into(),
                &logs,
            ),
        };
        let (first, listen) = lines.split_once('\n').unwrap();
        let addr_s = listen
            .trim_start_matches("switchboard listening on ")
            .trim();
        let addr: SocketAddr = match addr_s.parse() {
            Ok(a) => a,
            Err(e) => fail(
                &mut child,
                format!("bad listening address {addr_s:?}: {e}"),
                &logs,
            ),
        };
        if opts.wait_ready {
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut last = None;
            loop {
                last = readyz_sync(addr).or(last);
                if last == Some(200) {
                    break;
                }
                if Instant::now() > deadline {
                    fail(
                        &mut child,
                        format!("/readyz not 200 within 15 s of listening (last: {last:?})"),
                        &logs,
                    );
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        Gateway {
            child: Some(child),
            addr,
            logs,
            captured,
            secret: opts.secret.clone().unwrap_or_default(),
            instance_id: opts.instance_id.clone(),
            first_stdout_line: first.to_string(),
            config_path,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("gateway already reaped").id()
    }

    /// The last lines the process printed (stdout and stderr), for failure messages.
    pub fn logs(&self) -> String {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Every line the process printed, `(stdout, stderr)`, once both streams are closed:
    /// call after it exited (or was killed). Needs `GatewayOpts::keep_output`.
    pub fn output_after_exit(&self, timeout: Duration) -> (Vec<String>, Vec<String>) {
        let (out, err) = self
            .captured
            .as_ref()
            .expect("output_after_exit needs GatewayOpts::keep_output()");
        let deadline = Instant::now() + timeout;
        while !(out.lock().unwrap().closed && err.lock().unwrap().closed) {
            assert!(
                Instant::now() < deadline,
                "the gateway's output did not close within {timeout:?}: is it still running?"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines = |c: &Capture| c.lock().unwrap().lines.clone();
        (lines(out), lines(err))
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -s {sig} failed");
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sigint(&self) {
        self.signal("INT");
    }

    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits for the process to exit; panics (with the logs) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status() {
                return st;
            }
            if Instant::now() > deadline {
                panic!("gateway did not exit within {timeout:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().unwrap().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    // ---- tokens

    pub fn token(&self, sub: &str, projects: &[&str]) -> String {
        token(&self.secret, sub, projects, 3600, false)
    }

    pub fn service_token(&self) -> String {
        service_token(&self.secret)
    }

    // ---- HTTP

    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request("GET", path, &[], None).await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        self.request("GET", path, headers, None).await
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
        self.request("POST", path, headers, Some(body)).await
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a.as_str()));
        }
        self.post(path, &h, body.to_string().as_bytes()).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> HttpResponse {
        http_request(self.addr, method, path, headers, body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.logs()))
    }

    /// `POST /v1/stories/{story}/progress` with a service token (docs/protocol.md §9).
    pub async fn post_progress(&self, story: &str, body: &Value) -> HttpResponse {
        self.post_json(
            &format!("/v1/stories/{story}/progress"),
            Some(&self.service_token()),
            body,
        )
        .await
    }

    /// Publishes through the HTTP API with a service token; asserts 202 and returns the seqs.
    pub async fn publish(&self, project: &str, body: &Value) -> Vec<u64> {
        let r = self
            .post_json(
                &format!("/v1/projects/{project}/events"),
                Some(&self.service_token()),
                body,
            )
            .await;
        assert_eq!(
            r.status,
            202,
            "publish to {project}: {} {}\n{}",
            r.status,
            r.text(),
            self.logs()
        );
        let v = r.json();
        v["seq"]
            .as_array()
            .unwrap_or_else(|| panic!("publish reply without seq array: {v}"))
            .iter()
            .map(|s| s.as_u64().expect("seq is an integer"))
            .collect()
    }

    pub async fn health(&self) -> Value {
        let r = self.get("/health/websocket").await;
        assert_eq!(r.status, 200, "/health/websocket: {}", r.text());
        r.json()
    }

    /// The sum of a metric's samples in `/metrics` (all label sets), None if absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let r = self.get("/metrics").await;
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        let mut sum = None;
        for line in r.text().lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let base = key.split('{').next().unwrap();
            if base == name {
                let v: f64 = value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad metric line {line}"));
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum
    }

    /// Polls `/health/websocket` until `active_connections == n`.
    pub async fn wait_connections(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last;
        let ok = loop {
            last = self.health().await;
            if last["active_connections"].as_u64() == Some(n) {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            ok,
            "active_connections never became {n}: last {last}\n{}",
            self.logs()
        );
    }

    // ---- WebSocket

    /// Opens a WebSocket; Err carries the HTTP refusal.
    pub async fn ws_try(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, Refused> {
        ws_connect(self.addr, path_and_query, headers, None).await
    }

    /// Opens a WebSocket, panicking if the handshake is refused.
    pub async fn ws(&self, path_and_query: &str, headers: &[(&str, &str)]) -> WsClient {
        match self.ws_try(path_and_query, headers).await {
            Ok(c) => c,
            Err(r) => panic!("upgrade {path_and_query} refused: {r:?}\n{}", self.logs()),
        }
    }

    /// Connects to `/ws/{project}?token=...` and returns the client and its
    /// `connection.established` frame; the `status` snapshot that must follow it on a fresh
    /// connection (docs/protocol.md §2) is read and checked too.
    pub async fn connect(&self, project: &str, token: &str) -> (WsClient, Value) {
        let mut c = self.ws(&format!("/ws/{project}?token={token}"), &[]).await;
        let est = c.next_json(T).await;
        assert_eq!(
            est["type"],
            "connection.established",
            "first frame: {est}\n{}",
            self.logs()
        );
        let status: Value = serde_json::from_str(&c.next_text(T).await).expect("JSON status");
        assert_eq!(status["type"], "status", "second frame: {status}");
        assert_eq!(
            status["seq"], est["seq"],
            "snapshot and greeting agree: {status}"
        );
        (c, est)
    }

    /// A client of `project` for user `sub` granted exactly that project.
    pub async fn client(&self, project: &str) -> WsClient {
        let t = self.token("alice", &[project]);
        self.connect(project, &t).await.0
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if let Some(p) = &self.config_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------------------
// raw HTTP/1.1 client

/// Status of `GET /readyz`, blocking, 2 s limit (used while starting a gateway).
fn readyz_sync(addr: SocketAddr) -> Option<u16> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(
        format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf).ok().map(|r| r.status)
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<HttpResponse> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        // A server may answer (413) and close before reading a large body: ignore write errors
        // and read whatever reply came.
        let _ = s.write_all(&bytes).await;
        let mut buf = Vec::new();
        let rd = s.read_to_end(&mut buf).await;
        if buf.is_empty() {
            rd?;
        }
        parse_response(&buf)
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "HTTP request timed out"))?
}

fn parse_response(buf: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{m}: {:?}", String::from_utf8_lossy(buf)),
        )
    };
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("non-UTF-8 header"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(p) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_s = std::str::from_utf8(&rest[..p]).unwrap_or("0");
            let size =
                usize::from_str_radix(size_s.split(';').next().unwrap().trim(), 16).unwrap_or(0);
            if size == 0 || rest.len() < p + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[p + 2..p + 2 + size]);
            rest = &rest[(p + 2 + size + 2).min(rest.len())..];
        }
        body = out;
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

// ---------------------------------------------------------------------------------------
// WebSocket client

/// An HTTP refusal of an upgrade (or a transport error, with status 0).
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Refused {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("refusal body is not JSON ({e}): {:?}", self.body))
    }
}

pub async fn ws_connect(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
    recv_buffer: Option<u32>,
) -> Result<WsClient, Refused> {
    ws_connect_from(None, addr, path_and_query, headers, recv_buffer).await
}

/// [`ws_connect`] from a chosen local address: on loopback any `127.0.0.x` is a distinct
/// client IP (what a proxy must forward, and per-IP limits must see).
pub async fn ws_connect_from(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
    recv_buffer: Option<u32>,
) -> Result<WsClient, Refused> {
    let url = format!("ws://{addr}{path_and_query}");
    let mut req = url.into_client_request().expect("client request");
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let transport = |e: String| Refused {
        status: 0,
        headers: vec![],
        body: e,
    };
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| transport(e.to_string()))?;
    if let Some(n) = recv_buffer {
        sock.set_recv_buffer_size(n)
            .map_err(|e| transport(e.to_string()))?;
    }
    if let Some(ip) = local {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| transport(format!("bind {ip}: {e}")))?;
    }
    let fut = async {
        let stream = sock
            .connect(addr)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let cfg = WebSocketConfig::default();
        match tokio_tungstenite::client_async_with_config(req, stream, Some(cfg)).await {
            Ok((ws, resp)) => Ok(WsClient {
                ws,
                response_headers: resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                skip: vec!["status".into(), "system.heartbeat".into()],
            }),
            Err(tungstenite::Error::Http(resp)) => Err(Refused {
                status: resp.status().as_u16(),
                headers: resp
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default(),
            }),
            Err(e) => Err(transport(e.to_string())),
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => r,
        Err(_) => Err(transport("WebSocket handshake timed out".into())),
    }
}

#[derive(Debug)]
pub enum Frame {
    Text(String),
    // Read only through Debug: a test that expected text prints what came instead.
    Binary(#[allow(dead_code)] Vec<u8>),
    Ping,
    Pong,
    Close(Option<(u16, String)>),
    /// The stream ended without a close frame (EOF or error, e.g. a reset).
    End(String),
}

pub struct WsClient {
    pub ws: WebSocketStream<TcpStream>,
    pub response_headers: Vec<(String, String)>,
    /// JSON `type`s that `next_json` skips (by default `status` snapshots and heartbeats,
    /// which later issues or short heartbeat settings may interleave).
    pub skip: Vec<String>,
}

impl WsClient {
    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Next frame of any kind; None on timeout.
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let r = tokio::time::timeout(timeout, self.ws.next()).await.ok()?;
        Some(match r {
            None => Frame::End("stream ended".into()),
            Some(Err(e)) => Frame::End(e.to_string()),
            Some(Ok(Message::Text(t))) => Frame::Text(t.to_string()),
            Some(Ok(Message::Binary(b))) => Frame::Binary(b.to_vec()),
            Some(Ok(Message::Ping(_))) => Frame::Ping,
            Some(Ok(Message::Pong(_))) => Frame::Pong,
            Some(Ok(Message::Close(c))) => {
                Frame::Close(c.map(|f| (u16::from(f.code), f.reason.to_string())))
            }
            Some(Ok(Message::Frame(_))) => return None,
        })
    }

    /// Next text frame (WebSocket pings/pongs skipped); panics on close, end or timeout.
    pub async fn next_text(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Text(t)) => return t,
                Some(Frame::Ping) | Some(Frame::Pong) => continue,
                Some(other) => panic!("expected a text frame, got {other:?}"),
                None => panic!("no text frame within {timeout:?}"),
            }
        }
    }

    /// Next JSON object, skipping the types in `self.skip`.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let t = self.next_text(left).await;
            let v: Value = serde_json::from_str(&t)
                .unwrap_or_else(|e| panic!("server sent non-JSON text ({e}): {t:?}"));
            assert!(v.is_object(), "server frame is not a JSON object: {t}");
            if let Some(ty) = v["type"].as_str() {
                if self.skip.iter().any(|s| s == ty) {
                    continue;
                }
            }
            return v;
        }
    }

    /// Next JSON frame of type `ty`, skipping any other.
    pub async fn next_of_type(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("no {ty} frame within {timeout:?}");
            }
            let v = self.next_json(left).await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// `n` JSON frames (skip types skipped).
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Text(t)) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("non-JSON ({e}): {t:?}"));
                    if v["type"]
                        .as_str()
                        .is_some_and(|ty| self.skip.iter().any(|s| s == ty))
                    {
                        continue;
                    }
                    out.push(v);
                }
                Some(Frame::Ping) | Some(Frame::Pong) => {}
                Some(other) => panic!("after {} of {n} frames: {other:?}", out.len()),
                None => panic!(
                    "only {} of {n} frames within {timeout:?}; last: {:?}",
                    out.len(),
                    out.last()
                ),
            }
        }
        out
    }

    /// Asserts that no JSON frame (other than skipped types) arrives within `within`.
    pub async fn expect_silence(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.next_frame(left).await {
                None => return,
                Some(Frame::Ping) | Some(Frame::Pong) => {}
                Some(Frame::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["type"]
                        .as_str()
                        .is_some_and(|ty| self.skip.iter().any(|s| s == ty))
                    {
                        continue;
                    }
                    panic!("expected no frame, got {t}");
                }
                Some(other) => panic!("expected no frame, got {other:?}"),
            }
        }
    }

    /// Reads until a close frame; asserts its code; returns the JSON frames seen before it.
    pub async fn expect_close(&mut self, code: u16, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Text(t)) => seen.push(serde_json::from_str(&t).unwrap_or(Value::String(t))),
                Some(Frame::Ping) | Some(Frame::Pong) | Some(Frame::Binary(_)) => {}
                Some(Frame::Close(Some((c, reason)))) => {
                    assert_eq!(c, code, "close code (reason {reason:?}); frames before: {seen:?}");
                    return seen;
                }
                Some(Frame::Close(None)) => panic!("close frame without a code, expected {code}; frames: {seen:?}"),
                Some(Frame::End(e)) => panic!("connection ended without a close frame ({e}), expected {code}; frames: {seen:?}"),
                None => panic!("no close {code} within {timeout:?}; frames: {seen:?}"),
            }
        }
    }

    /// Like `expect_close`, and also asserts the `connection.closed` frame with the same code
    /// came right before it.
    pub async fn expect_closed_with(&mut self, code: u16, timeout: Duration) -> Vec<Value> {
        let seen = self.expect_close(code, timeout).await;
        let last = seen.iter().rev().find(|v| v["type"] != "system.heartbeat");
        let last = last.unwrap_or_else(|| panic!("no connection.closed frame before close {code}"));
        assert_eq!(
            last["type"], "connection.closed",
            "frame before close {code}: {last}"
        );
        assert_eq!(last["code"], code, "connection.closed code: {last}");
        assert!(
            last.get("reason").is_some(),
            "connection.closed without reason: {last}"
        );
        seen
    }

    /// Reads until the connection ends in any way (close frame, EOF, reset); returns the
    /// frames seen and the close code if a close frame was read. Panics on timeout.
    pub async fn read_to_end(&mut self, timeout: Duration) -> (Vec<Value>, Option<u16>) {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Some(Frame::Text(t)) => {
                    seen.push(serde_json::from_str(&t).unwrap_or(Value::String(t)))
                }
                Some(Frame::Ping) | Some(Frame::Pong) | Some(Frame::Binary(_)) => {}
                Some(Frame::Close(c)) => return (seen, c.map(|c| c.0)),
                Some(Frame::End(_)) => return (seen, None),
                None => panic!(
                    "connection still open after {timeout:?}; {} frames read",
                    seen.len()
                ),
            }
        }
    }

    pub async fn send_text(&mut self, t: &str) {
        tokio::time::timeout(T, self.ws.send(Message::text(t)))
            .await
            .expect("send timed out")
            .expect("send text");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends and ignores errors (the server may already be closing).
    pub async fn send_text_lossy(&mut self, t: &str) {
        let _ = tokio::time::timeout(T, self.ws.send(Message::text(t))).await;
    }

    /// A WebSocket ping frame (the server answers with a pong; it counts as activity).
    pub async fn send_ping(&mut self) {
        tokio::time::timeout(T, self.ws.send(Message::Ping(Vec::new().into())))
            .await
            .expect("send timed out")
            .expect("send ping");
    }

    pub async fn send_binary(&mut self, b: &[u8]) {
        tokio::time::timeout(T, self.ws.send(Message::binary(b.to_vec())))
            .await
            .expect("send timed out")
            .expect("send binary");
    }

    /// Request/reply: sends `v` and returns the next JSON frame.
    pub async fn call(&mut self, v: &Value) -> Value {
        self.send_json(v).await;
        self.next_json(T).await
    }

    /// Asserts the connection is alive with a text ping.
    pub async fn assert_alive(&mut self) {
        self.send_text("ping").await;
        loop {
            let t = self.next_text(T).await;
            if t == "pong" {
                return;
            }
            let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
            assert!(
                v["type"]
                    .as_str()
                    .is_some_and(|ty| self.skip.iter().any(|s| s == ty)),
                "expected text pong, got {t}"
            );
        }
    }

    /// Clean close from the client side.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(T, self.ws.close(None)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    /// Drops the TCP connection with a reset (SO_LINGER 0), no close frame.
    pub fn drop_abruptly(self) {
        #[allow(deprecated)] // linger 0 means an immediate reset, not a blocking close
        let _ = self.ws.get_ref().set_linger(Some(Duration::ZERO));
        drop(self);
    }
}

// ---------------------------------------------------------------------------------------
// a TCP proxy that can silently black-hole its existing connections

/// Forwards `127.0.0.1:port` to a target port (plain threads, so it keeps forwarding while
/// a test blocks). `freeze_existing` makes every connection open at that moment silently
/// drop all data in both directions without closing: a pub/sub connection that died
/// without a FIN or RST. Connections opened later forward normally.
pub struct TcpProxy {
    pub port: u16,
    next_gen: Arc<std::sync::atomic::AtomicU64>,
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TcpProxy {
    pub fn start(target_port: u16) -> TcpProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let next_gen = Arc::new(AtomicU64::new(0));
        let frozen_below = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, f, s) = (next_gen.clone(), frozen_below.clone(), stop.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = inbound else { continue };
                let Ok(outbound) = std::net::TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let gen = g.fetch_add(1, Ordering::SeqCst);
                for (from, to) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || pump(from, to, gen, f));
                }
            }
        });
        TcpProxy {
            port,
            next_gen,
            frozen_below,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn freeze_existing(&self) {
        use std::sync::atomic::Ordering;
        self.frozen_below
            .store(self.next_gen.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    gen: u64,
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                if gen >= frozen_below.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
        };
        if gen < frozen_below.load(std::sync::atomic::Ordering::SeqCst) {
            continue; // black hole: swallow, never answer, never close
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The close code and reason of the next close frame, with the text frames before it (None
/// when the connection ended without one).
pub async fn close_of(c: &mut WsClient) -> (Vec<String>, Option<(u16, String)>) {
    let mut texts = Vec::new();
    loop {
        match c.next_frame(T).await {
            Some(Frame::Text(t)) => texts.push(t),
            Some(Frame::Close(c)) => return (texts, c),
            Some(Frame::Ping) | Some(Frame::Pong) | Some(Frame::Binary(_)) => {}
            Some(Frame::End(_)) | None => return (texts, None),
        }
    }
}
