//! Load and accounting for the fault tests (`faults.rs`, `scripts/chaos`): a paced
//! publisher, a fleet of resuming WebSocket clients, and the loss report that compares
//! what the publisher was told was accepted with what every client received.
//!
//! Invariants the accounting relies on:
//! - every publish attempt carries fresh markers (`n`, unique across the run), so an event
//!   is identified by its marker whatever seq or epoch it got, and a retried request can
//!   never be mistaken for the original;
//! - "accepted" means the publisher got the seq back (202 from the API, or the Lua
//!   script's reply); only those are owed to clients. Events whose request failed in a way
//!   that leaves the outcome unknown (a reset, a timeout) may still arrive: they are
//!   counted as unacknowledged, never as loss;
//! - every client tracks seq and epoch like a real client, checks each event against the
//!   seq it expects next (gaps and duplicates are counted as they happen), and reconnects
//!   with `?last_seq=N&epoch=E` after any close, to its own instance first and otherwise
//!   to another one;
//! - an accepted event is excused for a client only when a `connection.resync_required`
//!   told that client its history was gone: old-epoch events after `from_seq`, and
//!   new-epoch events the `status` snapshot that followed already covers.
//!
//! Sizes come from [`Scale::from_env`], so `scripts/chaos` runs the same tests longer and
//! bigger.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::common::{query_escape, redis, token, ws_connect, Gateway};

/// The gateway's publish script: the Lua publisher path runs exactly what workers run.
const PUBLISH_SCRIPT: &str = include_str!("../../../src/broker/publish.lua");

// ---------------------------------------------------------------------------------------
// scale

/// How big a fault run is. Defaults keep each test of `faults.rs` within ~15 s on a
/// loaded 2-core machine; `FAULTS_SCALE=k` multiplies clients, rate and durations, and
/// `FAULTS_CLIENTS`, `FAULTS_RATE`, `FAULTS_SECS`, `FAULTS_PROJECTS` set one each.
#[derive(Debug, Clone)]
pub struct Scale {
    /// WebSocket clients homed on each gateway instance.
    pub clients_per_instance: usize,
    pub projects: usize,
    /// Events per second the steady publisher aims at (over all projects).
    pub rate: f64,
    /// Events per publish request (the API takes arrays; keeps the request rate sane).
    pub batch: usize,
    /// Steady load before the fault.
    pub warmup: Duration,
    /// Steady load after the fault (or after the broker came back).
    pub after: Duration,
}

fn env_f64(name: &str) -> Option<f64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

impl Scale {
    pub fn from_env() -> Scale {
        let k = env_f64("FAULTS_SCALE").unwrap_or(1.0).max(0.1);
        let clients = env_f64("FAULTS_CLIENTS")
            .unwrap_or(20.0 * k)
            .round()
            .max(1.0) as usize;
        let rate = env_f64("FAULTS_RATE").unwrap_or(300.0 * k).max(1.0);
        let after = env_f64("FAULTS_SECS").unwrap_or(3.0 * k).max(1.0);
        let projects = env_f64("FAULTS_PROJECTS").unwrap_or(3.0).round().max(1.0) as usize;
        Scale {
            clients_per_instance: clients,
            projects,
            rate,
            // About 60-80 requests per second whatever the event rate.
            batch: ((rate / 75.0).ceil() as usize).max(1),
            warmup: Duration::from_secs_f64((after * 2.0 / 3.0).max(1.5)),
            after: Duration::from_secs_f64(after),
        }
    }

    pub fn project_names(&self, prefix: &str) -> Vec<String> {
        (0..self.projects)
            .map(|i| format!("{prefix}-p{i}"))
            .collect()
    }

    pub fn describe(&self) -> String {
        format!(
            "{} clients per instance on {} projects, {:.0} events/s requested in batches of {}, \
             {:.1} s before and {:.1} s after the fault",
            self.clients_per_instance,
            self.projects,
            self.rate,
            self.batch,
            self.warmup.as_secs_f64(),
            self.after.as_secs_f64()
        )
    }
}

/// Gateway options every fault test starts from: Redis mode, no handshake rate limit (all
/// test clients share 127.0.0.1 and reconnect at once, which a real fleet behind a load
/// balancer would not), history long enough for the whole run.
pub fn gateway_opts(redis_url: &str, instance: &str) -> crate::common::GatewayOpts {
    let mut opts = crate::common::GatewayOpts::new();
    // One "request completed" line per publish would push the outage lines the report
    // quotes out of the harness's 400-line log buffer.
    opts.rust_log = "info,switchboard_middleware=warn".into();
    opts.redis(redis_url)
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .instance(instance)
        .cfg("server", "handshake_rate_per_sec", "0")
        .cfg("events", "history_max_len", "200000")
        .grace(5)
}

// ---------------------------------------------------------------------------------------
// publisher

/// Where the publisher sends events.
#[derive(Clone)]
pub enum Via {
    /// `POST /v1/projects/{id}/events` on these instances. `prefer: None` round-robins
    /// requests over them; `Some(i)` sends to instance `i` while it answers. A request that
    /// fails goes to the next instance at once (with fresh markers).
    Api {
        targets: Vec<SocketAddr>,
        prefer: Option<usize>,
        token: String,
    },
    /// The publish Lua script straight on Redis (what the worker libraries do).
    Lua { url: String },
}

impl Via {
    pub fn api(gateways: &[&Gateway], prefer: Option<usize>) -> Via {
        Via::Api {
            targets: gateways.iter().map(|g| g.addr()).collect(),
            prefer,
            token: gateways[0].service_token(),
        }
    }
}

/// What came of one publish request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Accepted,
    /// A clear refusal (HTTP 503 and the like): the events were not published...
    /// unless a broker timeout hid that they were (the report counts those).
    Refused,
    /// Nothing was sent (connection refused, Redis unreachable).
    Unreachable,
    /// Sent, then no answer (reset, EOF, timeout): the events may or may not exist.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub project: usize,
    pub sent_at: Instant,
    pub outcome: Outcome,
    /// Which API instance (None for the Lua path).
    pub target: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct Accepted {
    pub n: u64,
    pub project: usize,
    pub seq: u64,
    /// Known on the Lua path (the script returns it); None through the API.
    pub epoch: Option<String>,
    pub sent_at: Instant,
}

#[derive(Default)]
pub struct PubLog {
    /// Marker -> its attempt (every marker ever sent).
    pub attempts: HashMap<u64, Attempt>,
    pub accepted: Vec<Accepted>,
    pub requests: HashMap<Outcome, u64>,
    pub other_statuses: Vec<String>,
}

impl PubLog {
    pub fn accepted_of(&self, project: usize) -> impl Iterator<Item = &Accepted> {
        self.accepted.iter().filter(move |a| a.project == project)
    }

    pub fn accepted_sent_after(&self, t: Instant) -> usize {
        self.accepted.iter().filter(|a| a.sent_at >= t).count()
    }
}

struct PubShared {
    via: Via,
    projects: Vec<String>,
    batch: usize,
    next_n: AtomicU64,
    next_project: AtomicUsize,
    next_target: AtomicUsize,
    log: Mutex<PubLog>,
}

pub struct Publisher {
    shared: Arc<PubShared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// RFC 3339 UTC with milliseconds, as the publisher libraries write it.
fn now_rfc3339() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc().format(&fmt).unwrap()
}

impl Publisher {
    /// Starts one paced publishing loop at `scale.rate` events per second.
    pub fn start(via: Via, projects: &[String], scale: &Scale) -> Publisher {
        let shared = Arc::new(PubShared {
            via,
            projects: projects.to_vec(),
            batch: scale.batch,
            next_n: AtomicU64::new(1),
            next_project: AtomicUsize::new(0),
            next_target: AtomicUsize::new(0),
            log: Mutex::new(PubLog::default()),
        });
        let (stop, _) = watch::channel(false);
        let mut p = Publisher {
            shared,
            stop,
            tasks: Vec::new(),
        };
        let period = Duration::from_secs_f64(scale.batch as f64 / scale.rate);
        p.spawn_loop(Some(period), None);
        p
    }

    /// Adds `loops` unpaced loops (as fast as the target answers) for `dur`: a burst.
    pub fn burst(&mut self, loops: usize, dur: Duration) {
        let until = Instant::now() + dur;
        for _ in 0..loops {
            self.spawn_loop(None, Some(until));
        }
    }

    fn spawn_loop(&mut self, period: Option<Duration>, until: Option<Instant>) {
        let shared = self.shared.clone();
        let mut stop = self.stop.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let mut lua: Option<redis::aio::MultiplexedConnection> = None;
            let mut tick = period.map(|p| {
                let mut i = tokio::time::interval(p);
                // Behind schedule after an outage: carry on at the rate, no catch-up burst.
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            });
            loop {
                if let Some(t) = tick.as_mut() {
                    tokio::select! {
                        _ = t.tick() => {}
                        _ = stop.changed() => return,
                    }
                }
                if *stop.borrow() || until.is_some_and(|u| Instant::now() >= u) {
                    return;
                }
                let project =
                    shared.next_project.fetch_add(1, Ordering::Relaxed) % shared.projects.len();
                // Never abandoned half way: a request cut by us would make an event whose
                // fate only the gateway knows, and blur what the report says about it.
                if !shared.publish_once(project, &mut lua).await {
                    // Nobody took it: do not spin against a dead target.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    /// Accepted events so far.
    pub fn accepted(&self) -> usize {
        self.shared.log.lock().unwrap().accepted.len()
    }

    /// Stops every loop (each finishes the request it is in) and returns the log.
    pub async fn stop(self) -> PubLog {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }
}

impl PubShared {
    fn events(&self, project: usize, lua: bool) -> (Vec<u64>, Vec<Value>) {
        let first = self.next_n.fetch_add(self.batch as u64, Ordering::Relaxed);
        let ns: Vec<u64> = (first..first + self.batch as u64).collect();
        let pid = &self.projects[project];
        let events = ns
            .iter()
            .map(|n| {
                let mut e = json!({"type": "file.changed", "file_path": format!("/chaos/{n}"),
                                   "change_type": "modified", "n": n});
                if lua {
                    // The script wants the envelope filled (the gateway does it on the API path).
                    e["project_id"] = json!(pid);
                    e["timestamp"] = json!(now_rfc3339());
                }
                e
            })
            .collect();
        (ns, events)
    }

    /// Notes the attempt before it is sent: a request abandoned when the publisher stops
    /// may still be carried out, and its events must be recognised as ours (outcome
    /// unknown) rather than as foreign.
    fn begin(&self, project: usize, ns: &[u64], target: Option<usize>) -> Instant {
        let sent_at = Instant::now();
        let mut log = self.log.lock().unwrap();
        for n in ns {
            log.attempts.insert(
                *n,
                Attempt {
                    project,
                    sent_at,
                    outcome: Outcome::Unknown,
                    target,
                },
            );
        }
        sent_at
    }

    fn record(
        &self,
        project: usize,
        ns: &[u64],
        sent_at: Instant,
        outcome: Outcome,
        target: Option<usize>,
        accepted: Option<(Vec<u64>, Option<String>)>,
    ) {
        let mut log = self.log.lock().unwrap();
        for n in ns {
            log.attempts.insert(
                *n,
                Attempt {
                    project,
                    sent_at,
                    outcome,
                    target,
                },
            );
        }
        *log.requests.entry(outcome).or_default() += 1;
        if let Some((seqs, epoch)) = accepted {
            assert_eq!(seqs.len(), ns.len(), "one seq per event");
            for (n, seq) in ns.iter().zip(seqs) {
                log.accepted.push(Accepted {
                    n: *n,
                    project,
                    seq,
                    epoch: epoch.clone(),
                    sent_at,
                });
            }
        }
    }

    /// One request (with failover over the API targets). True if some target took it.
    async fn publish_once(
        &self,
        project: usize,
        lua: &mut Option<redis::aio::MultiplexedConnection>,
    ) -> bool {
        match &self.via {
            Via::Api {
                targets,
                prefer,
                token,
            } => {
                let start = match prefer {
                    Some(i) => *i,
                    None => self.next_target.fetch_add(1, Ordering::Relaxed),
                };
                for k in 0..targets.len() {
                    let idx = (start + k) % targets.len();
                    if self.publish_api(project, idx, targets[idx], token).await {
                        return true;
                    }
                }
                false
            }
            Via::Lua { url } => self.publish_lua(project, url, lua).await,
        }
    }

    async fn publish_api(&self, project: usize, idx: usize, addr: SocketAddr, token: &str) -> bool {
        let (ns, events) = self.events(project, false);
        let body = Value::Array(events).to_string();
        let auth = format!("Bearer {token}");
        let path = format!("/v1/projects/{}/events", self.projects[project]);
        let sent_at = self.begin(project, &ns, Some(idx));
        let r = crate::common::http_request(
            addr,
            "POST",
            &path,
            &[
                ("Content-Type", "application/json"),
                ("Authorization", &auth),
            ],
            Some(body.as_bytes()),
        )
        .await;
        match r {
            Ok(resp) if resp.status == 202 => {
                let v = resp.json();
                let seqs: Vec<u64> = v["seq"]
                    .as_array()
                    .unwrap_or_else(|| panic!("202 without a seq array: {v}"))
                    .iter()
                    .map(|s| s.as_u64().expect("seq is an integer"))
                    .collect();
                self.record(
                    project,
                    &ns,
                    sent_at,
                    Outcome::Accepted,
                    Some(idx),
                    Some((seqs, None)),
                );
                true
            }
            Ok(resp) => {
                if resp.status != 503 {
                    self.log.lock().unwrap().other_statuses.push(format!(
                        "{} {}",
                        resp.status,
                        resp.text()
                    ));
                }
                self.record(project, &ns, sent_at, Outcome::Refused, Some(idx), None);
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                self.record(project, &ns, sent_at, Outcome::Unreachable, Some(idx), None);
                false
            }
            Err(_) => {
                self.record(project, &ns, sent_at, Outcome::Unknown, Some(idx), None);
                false
            }
        }
    }

    async fn publish_lua(
        &self,
        project: usize,
        url: &str,
        conn: &mut Option<redis::aio::MultiplexedConnection>,
    ) -> bool {
        let (ns, events) = self.events(project, true);
        let sent_at = self.begin(project, &ns, None);
        if conn.is_none() {
            let client = redis::Client::open(url).expect("redis url");
            match tokio::time::timeout(
                Duration::from_secs(1),
                client.get_multiplexed_async_connection(),
            )
            .await
            {
                Ok(Ok(c)) => *conn = Some(c),
                _ => {
                    self.record(project, &ns, sent_at, Outcome::Unreachable, None, None);
                    return false;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let pid = &self.projects[project];
        let script = redis::Script::new(PUBLISH_SCRIPT);
        let mut inv = script.prepare_invoke();
        inv.key(format!("project:{pid}:seq"))
            .key(format!("project:{pid}:history"))
            .key(format!("project:{pid}:events"))
            .key(format!("project:{pid}:state"))
            .key(format!("project:{pid}:state:terminal"))
            .arg(&uuid::Uuid::new_v4().simple().to_string()[..16])
            .arg(200_000)
            .arg(86_400)
            .arg(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as u64,
            )
            .arg(3_600_000);
        for e in &events {
            inv.arg(e.to_string());
        }
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            inv.invoke_async::<(String, Vec<u64>, u64)>(c),
        )
        .await;
        match r {
            Ok(Ok((epoch, seqs, _))) => {
                self.record(
                    project,
                    &ns,
                    sent_at,
                    Outcome::Accepted,
                    None,
                    Some((seqs, Some(epoch))),
                );
                true
            }
            Ok(Err(e)) => {
                // A connection that failed stays failed: reconnect next time.
                *conn = None;
                let outcome = if e.is_connection_refusal() {
                    Outcome::Unreachable
                } else {
                    Outcome::Unknown
                };
                self.record(project, &ns, sent_at, outcome, None, None);
                false
            }
            Err(_) => {
                *conn = None;
                self.record(project, &ns, sent_at, Outcome::Unknown, None, None);
                false
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// clients

/// One event frame a client received.
#[derive(Debug, Clone)]
pub struct Recv {
    pub n: u64,
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct Connect {
    pub instance: usize,
    pub resumed: bool,
}

#[derive(Debug, Clone)]
pub struct Resync {
    pub from_seq: u64,
    pub old_epoch: Option<String>,
    pub new_epoch: String,
    /// The seq of the `status` that followed (None until it arrived).
    pub status_seq: Option<u64>,
}

#[derive(Debug, Default)]
pub struct ClientLog {
    pub events: Vec<Recv>,
    pub epochs: Vec<String>,
    pub connects: Vec<Connect>,
    pub resyncs: Vec<Resync>,
    /// Close code of each ended connection (None: EOF or reset without a close frame).
    pub closes: Vec<Option<u16>>,
    pub reconnect_notices: u64,
    /// Upgrades refused (503/429) or not reachable, while reconnecting.
    pub refusals: u64,
    pub gaps: u64,
    pub dups: u64,
    /// Anything a correct gateway would not send (first 20 kept).
    pub anomalies: Vec<String>,
    pub last_seq: u64,
    pub established: bool,
}

impl ClientLog {
    fn anomaly(&mut self, what: String) {
        if self.anomalies.len() < 20 {
            self.anomalies.push(what);
        }
    }

    fn enter_epoch(&mut self, epoch: &str) {
        if self.current_epoch() != Some(epoch) {
            self.epochs.push(epoch.to_owned());
        }
    }

    fn current_epoch(&self) -> Option<&str> {
        self.epochs.last().map(String::as_str)
    }
}

pub struct ClientHandle {
    pub home: usize,
    pub project: usize,
    pub log: Arc<Mutex<ClientLog>>,
    task: JoinHandle<()>,
}

/// A client after the fleet stopped.
pub struct Finished {
    pub home: usize,
    pub project: usize,
    pub log: ClientLog,
}

/// The clients of one fault run.
pub struct Fleet {
    pub clients: Vec<ClientHandle>,
    stop: watch::Sender<bool>,
    projects: Vec<String>,
}

/// What one connection's reading decided.
struct Ended {
    reconnect_after: Duration,
}

impl Fleet {
    /// `per_instance` clients homed on each target, projects assigned round-robin; returns
    /// once every client is established (panics after 30 s).
    pub async fn start(
        targets: &[SocketAddr],
        per_instance: usize,
        projects: &[String],
        secret: &str,
    ) -> Fleet {
        let (stop, _) = watch::channel(false);
        let targets: Arc<Vec<SocketAddr>> = Arc::new(targets.to_vec());
        let mut clients = Vec::new();
        for home in 0..targets.len() {
            for j in 0..per_instance {
                let project = j % projects.len();
                let tok = token(
                    secret,
                    &format!("chaos-{home}-{j}"),
                    &[projects[project].as_str()],
                    3600,
                    false,
                );
                let log = Arc::new(Mutex::new(ClientLog::default()));
                let task = tokio::spawn(run_client(
                    targets.clone(),
                    home,
                    projects[project].clone(),
                    tok,
                    log.clone(),
                    stop.subscribe(),
                ));
                clients.push(ClientHandle {
                    home,
                    project,
                    log,
                    task,
                });
            }
        }
        let fleet = Fleet {
            clients,
            stop,
            projects: projects.to_vec(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = fleet
                .clients
                .iter()
                .filter(|c| c.log.lock().unwrap().established)
                .count();
            if ready == fleet.clients.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {ready} of {} clients established within 30 s",
                fleet.clients.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        fleet
    }

    /// Waits until every client received the last accepted event of its project (events
    /// arrive in seq order, so nothing before it is still on its way), or `timeout`.
    /// Returns how long that took, or None on timeout.
    pub async fn wait_caught_up(&self, log: &PubLog, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let last: Vec<Option<u64>> = (0..self.projects.len())
            .map(|p| log.accepted_of(p).map(|a| a.n).max())
            .collect();
        loop {
            let behind = self
                .clients
                .iter()
                .filter(|c| match last[c.project] {
                    None => false,
                    Some(n) => !c.log.lock().unwrap().events.iter().rev().any(|r| r.n == n),
                })
                .count();
            if behind == 0 {
                return Some(start.elapsed());
            }
            if start.elapsed() > timeout {
                eprintln!("{behind} clients still behind after {timeout:?}");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every client and returns their logs.
    pub async fn stop(self) -> Vec<Finished> {
        let _ = self.stop.send(true);
        let mut out = Vec::with_capacity(self.clients.len());
        for c in self.clients {
            c.task.abort();
            let _ = c.task.await;
            let log = std::mem::take(&mut *c.log.lock().unwrap());
            out.push(Finished {
                home: c.home,
                project: c.project,
                log,
            });
        }
        out
    }
}

async fn run_client(
    targets: Arc<Vec<SocketAddr>>,
    home: usize,
    project: String,
    tok: String,
    log: Arc<Mutex<ClientLog>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let (path, asked_resume) = {
            let l = log.lock().unwrap();
            match l.current_epoch() {
                Some(e) if l.established => (
                    format!(
                        "/ws/{project}?token={tok}&last_seq={}&epoch={}",
                        l.last_seq,
                        query_escape(e)
                    ),
                    true,
                ),
                _ => (format!("/ws/{project}?token={tok}"), false),
            }
        };
        // Own instance first, then the others: what a client behind a load balancer sees
        // when its instance is gone.
        let mut conn = None;
        for k in 0..targets.len() {
            let idx = (home + k) % targets.len();
            match ws_connect(targets[idx], &path, &[], None).await {
                Ok(c) => {
                    conn = Some((idx, c));
                    break;
                }
                Err(_) => log.lock().unwrap().refusals += 1,
            }
        }
        let Some((idx, c)) = conn else {
            let jitter = rand::random::<u64>() % 100;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100 + jitter)) => continue,
                _ = stop.changed() => return,
            }
        };
        let ended = tokio::select! {
            e = read_connection(c, idx, asked_resume, &project, &log) => e,
            _ = stop.changed() => return,
        };
        let wait = ended.reconnect_after.min(Duration::from_secs(3));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reads one connection to its end, checking and recording every frame.
async fn read_connection(
    mut c: crate::common::WsClient,
    instance: usize,
    asked_resume: bool,
    project: &str,
    log: &Mutex<ClientLog>,
) -> Ended {
    let mut ended = Ended {
        reconnect_after: Duration::ZERO,
    };
    // Set between a greeting or resync and the `status` that must follow it.
    let mut awaiting_status = false;
    let mut greeted = false;
    loop {
        let msg = c.ws.next().await;
        let at = Instant::now();
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(cf))) => {
                log.lock()
                    .unwrap()
                    .closes
                    .push(Some(cf.map(|f| u16::from(f.code)).unwrap_or(1005)));
                return ended;
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => {
                log.lock().unwrap().closes.push(None);
                return ended;
            }
        };
        let v: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(_) => {
                log.lock()
                    .unwrap()
                    .anomaly(format!("non-JSON frame {text:?}"));
                continue;
            }
        };
        let ty = v["type"].as_str().unwrap_or("");
        let mut l = log.lock().unwrap();
        if !greeted && ty != "connection.established" {
            l.anomaly(format!("first frame is not connection.established: {v}"));
        }
        match ty {
            "connection.established" => {
                greeted = true;
                let resumed = v["resumed"] == true;
                let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                l.connects.push(Connect { instance, resumed });
                if resumed {
                    if l.current_epoch() != Some(epoch.as_str()) {
                        l.anomaly(format!("resumed into another epoch: {v}"));
                    }
                } else if asked_resume {
                    // A refused resume: resync_required and a status must follow.
                } else {
                    l.enter_epoch(&epoch);
                    awaiting_status = true;
                }
                l.established = true;
            }
            "connection.resync_required" => {
                let new_epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                let old_epoch = l.current_epoch().map(str::to_owned);
                let from_seq = v["from_seq"].as_u64().unwrap_or(0);
                let at_seq = l.last_seq;
                if from_seq != at_seq {
                    l.anomaly(format!("resync from_seq {from_seq}, client at {at_seq}"));
                }
                l.resyncs.push(Resync {
                    from_seq,
                    old_epoch,
                    new_epoch: new_epoch.clone(),
                    status_seq: None,
                });
                l.enter_epoch(&new_epoch);
                awaiting_status = true;
            }
            "status" => {
                if !awaiting_status {
                    l.anomaly(format!("status without a greeting or resync: {v}"));
                    continue;
                }
                awaiting_status = false;
                let seq = v["seq"].as_u64().unwrap_or(0);
                l.last_seq = seq;
                if let Some(r) = l.resyncs.last_mut() {
                    if r.status_seq.is_none() {
                        r.status_seq = Some(seq);
                    }
                }
            }
            "file.changed" => {
                if awaiting_status {
                    l.anomaly(format!("event before the status snapshot: {v}"));
                }
                if v["project_id"] != project {
                    l.anomaly(format!("event of another project: {v}"));
                }
                let (Some(n), Some(seq)) = (v["n"].as_u64(), v["seq"].as_u64()) else {
                    l.anomaly(format!("event without marker or seq: {v}"));
                    continue;
                };
                let expect = l.last_seq + 1;
                if seq < expect {
                    l.dups += 1;
                    l.anomaly(format!(
                        "seq {seq} again or out of order (expected {expect})"
                    ));
                } else {
                    if seq > expect {
                        l.gaps += 1;
                        l.anomaly(format!("gap: seq {seq}, expected {expect}"));
                    }
                    l.last_seq = seq;
                }
                l.events.push(Recv { n, at });
            }
            "container.reconnect" => {
                l.reconnect_notices += 1;
                ended.reconnect_after =
                    Duration::from_millis(v["reconnect_after_ms"].as_u64().unwrap_or(0));
            }
            "connection.closed" | "system.heartbeat" | "pong" => {}
            _ => l.anomaly(format!("unexpected frame {v}")),
        }
    }
}

// ---------------------------------------------------------------------------------------
// the loss report

#[derive(Debug, Default, Clone)]
pub struct ClientFigures {
    pub owed: usize,
    pub received: usize,
    pub lost: Vec<u64>,
    pub excused: usize,
    pub unacked: usize,
    pub dup_markers: usize,
    pub foreign: usize,
    pub max_delay: Duration,
    /// From the reference instant to the first event sent after it that reached this client.
    pub recovery: Option<Duration>,
}

pub struct GroupFigures {
    pub label: String,
    pub clients: usize,
    pub reconnected: usize,
    pub resumed: usize,
    pub resynced: usize,
    pub closes: HashMap<String, usize>,
    pub received: usize,
    pub owed: usize,
    pub lost: usize,
    pub gaps: u64,
    pub dups: u64,
    pub excused: usize,
    pub unacked: usize,
    pub foreign: usize,
    pub max_delay: Duration,
    pub recovery: Option<Duration>,
    pub anomalies: Vec<String>,
    pub lost_sample: Vec<u64>,
}

pub struct Report {
    pub title: String,
    pub groups: Vec<GroupFigures>,
    pub clients: Vec<(Finished, ClientFigures)>,
    pub accepted: usize,
    /// Events published although their request was not answered 202, by what the
    /// publisher was told instead.
    pub unacked_published: usize,
    pub unacked_after_refusal: usize,
    pub requests: HashMap<Outcome, u64>,
    pub other_statuses: Vec<String>,
    pub notes: Vec<String>,
    /// True when every client received the last accepted event in time.
    pub caught_up: bool,
}

fn excused_by_resync(l: &ClientLog, a: &Accepted) -> bool {
    let Some(epoch) = a.epoch.as_deref() else {
        return false;
    };
    l.resyncs.iter().any(|r| {
        (r.old_epoch.as_deref() == Some(epoch) && a.seq > r.from_seq)
            || (r.new_epoch == epoch && r.status_seq.is_some_and(|s| a.seq <= s))
    })
}

fn figures(l: &ClientLog, project: usize, log: &PubLog, t_ref: Option<Instant>) -> ClientFigures {
    let mut f = ClientFigures::default();
    let mut seen: HashMap<u64, (usize, Instant)> = HashMap::with_capacity(l.events.len());
    for r in &l.events {
        let e = seen.entry(r.n).or_insert((0, r.at));
        e.0 += 1;
    }
    f.received = l.events.len();
    f.dup_markers = seen.values().filter(|(k, _)| *k > 1).count();
    for a in log.accepted_of(project) {
        match seen.get(&a.n) {
            Some((_, at)) => {
                f.owed += 1;
                f.max_delay = f.max_delay.max(at.saturating_duration_since(a.sent_at));
            }
            None if excused_by_resync(l, a) => f.excused += 1,
            None => {
                f.owed += 1;
                f.lost.push(a.n);
            }
        }
    }
    let accepted: std::collections::HashSet<u64> = log.accepted_of(project).map(|a| a.n).collect();
    for r in &l.events {
        match log.attempts.get(&r.n) {
            Some(att) if att.project != project => f.foreign += 1,
            Some(_) if !accepted.contains(&r.n) => f.unacked += 1,
            Some(_) => {}
            None => f.foreign += 1,
        }
    }
    if let Some(t) = t_ref {
        f.recovery = l
            .events
            .iter()
            .find(|r| log.attempts.get(&r.n).is_some_and(|a| a.sent_at >= t))
            .map(|r| r.at.saturating_duration_since(t));
    }
    f
}

impl Report {
    /// Builds the report. `labels[i]` names the clients homed on instance `i`; `t_ref` is
    /// the instant recovery is measured from.
    pub fn build(
        title: &str,
        clients: Vec<Finished>,
        labels: &[&str],
        log: &PubLog,
        t_ref: Option<Instant>,
        caught_up: bool,
    ) -> Report {
        let mut per: Vec<(Finished, ClientFigures)> = clients
            .into_iter()
            .map(|c| {
                let f = figures(&c.log, c.project, log, t_ref);
                (c, f)
            })
            .collect();
        per.sort_by_key(|(c, _)| c.home);
        let mut groups = Vec::new();
        for (home, label) in labels.iter().enumerate() {
            let mine: Vec<&(Finished, ClientFigures)> =
                per.iter().filter(|(c, _)| c.home == home).collect();
            let mut g = GroupFigures {
                label: label.to_string(),
                clients: mine.len(),
                reconnected: 0,
                resumed: 0,
                resynced: 0,
                closes: HashMap::new(),
                received: 0,
                owed: 0,
                lost: 0,
                gaps: 0,
                dups: 0,
                excused: 0,
                unacked: 0,
                foreign: 0,
                max_delay: Duration::ZERO,
                recovery: None,
                anomalies: Vec::new(),
                lost_sample: Vec::new(),
            };
            for (c, f) in mine {
                let l = &c.log;
                if l.connects.len() > 1 {
                    g.reconnected += 1;
                }
                if l.connects.iter().any(|c| c.resumed) {
                    g.resumed += 1;
                }
                if !l.resyncs.is_empty() {
                    g.resynced += 1;
                }
                for code in &l.closes {
                    let k = code.map_or("EOF/reset".to_string(), |c| c.to_string());
                    *g.closes.entry(k).or_default() += 1;
                }
                g.received += f.received;
                g.owed += f.owed;
                g.lost += f.lost.len();
                g.gaps += l.gaps;
                g.dups += l.dups + f.dup_markers as u64;
                g.excused += f.excused;
                g.unacked += f.unacked;
                g.foreign += f.foreign;
                g.max_delay = g.max_delay.max(f.max_delay);
                g.recovery = match (g.recovery, f.recovery) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                for a in &l.anomalies {
                    if g.anomalies.len() < 10 {
                        g.anomalies.push(a.clone());
                    }
                }
                for n in &f.lost {
                    if g.lost_sample.len() < 10 {
                        g.lost_sample.push(*n);
                    }
                }
            }
            groups.push(g);
        }
        // Published although the publisher never heard so (reset, timeout, or a 503 after
        // a broker timeout): seen by at least one client.
        let accepted: std::collections::HashSet<u64> = log.accepted.iter().map(|a| a.n).collect();
        let mut unacked: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for (c, _) in &per {
            for r in &c.log.events {
                if !accepted.contains(&r.n) {
                    unacked.insert(r.n);
                }
            }
        }
        let unacked_after_refusal = unacked
            .iter()
            .filter(|n| {
                log.attempts
                    .get(n)
                    .is_some_and(|a| a.outcome == Outcome::Refused)
            })
            .count();
        Report {
            title: title.to_string(),
            groups,
            clients: per,
            accepted: log.accepted.len(),
            unacked_published: unacked.len(),
            unacked_after_refusal,
            requests: log.requests.clone(),
            other_statuses: log.other_statuses.iter().take(5).cloned().collect(),
            notes: Vec::new(),
            caught_up,
        }
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Clients homed on instance `home`, with their figures.
    pub fn clients_of(&self, home: usize) -> impl Iterator<Item = (&ClientLog, &ClientFigures)> {
        self.clients
            .iter()
            .filter(move |(c, _)| c.home == home)
            .map(|(c, f)| (&c.log, f))
    }

    pub fn total_lost(&self) -> usize {
        self.groups.iter().map(|g| g.lost).sum()
    }

    pub fn print(&self) {
        let ms = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let mut o = String::new();
        o.push_str(&format!("\n=== fault report: {} ===\n", self.title));
        for n in &self.notes {
            o.push_str(&format!("  {n}\n"));
        }
        let req = |k| self.requests.get(&k).copied().unwrap_or(0);
        o.push_str(&format!(
            "  publisher: {} events accepted; requests: {} accepted, {} refused, {} unreachable, \
             {} outcome unknown; {} unacknowledged events were published anyway ({} of them \
             after a refusal)\n",
            self.accepted,
            req(Outcome::Accepted),
            req(Outcome::Refused),
            req(Outcome::Unreachable),
            req(Outcome::Unknown),
            self.unacked_published,
            self.unacked_after_refusal,
        ));
        if !self.other_statuses.is_empty() {
            o.push_str(&format!(
                "  unexpected publish replies: {:?}\n",
                self.other_statuses
            ));
        }
        if !self.caught_up {
            o.push_str("  NOT CAUGHT UP: some clients never received the last accepted event\n");
        }
        o.push_str(&format!(
            "  {:<22} {:>7} {:>6} {:>7} {:>7} {:>9} {:>9} {:>5} {:>5} {:>5} {:>7} {:>9} {:>9}\n",
            "clients homed on",
            "clients",
            "recon",
            "resumed",
            "resyncs",
            "owed",
            "received",
            "LOST",
            "gaps",
            "dups",
            "excused",
            "max delay",
            "recovery"
        ));
        for g in &self.groups {
            o.push_str(&format!(
                "  {:<22} {:>7} {:>6} {:>7} {:>7} {:>9} {:>9} {:>5} {:>5} {:>5} {:>7} {:>9} {:>9}\n",
                g.label,
                g.clients,
                g.reconnected,
                g.resumed,
                g.resynced,
                g.owed,
                g.received,
                g.lost,
                g.gaps,
                g.dups,
                g.excused,
                ms(g.max_delay),
                g.recovery.map(ms).unwrap_or_else(|| "-".into()),
            ));
            let mut closes: Vec<_> = g.closes.iter().collect();
            closes.sort();
            if !closes.is_empty() {
                o.push_str(&format!("  {:<22} closes seen: {closes:?}\n", ""));
            }
            if g.foreign > 0 {
                o.push_str(&format!("  {:<22} FOREIGN events: {}\n", "", g.foreign));
            }
            if !g.lost_sample.is_empty() {
                o.push_str(&format!(
                    "  {:<22} lost markers (sample): {:?}\n",
                    "", g.lost_sample
                ));
            }
            for a in &g.anomalies {
                o.push_str(&format!("  {:<22} anomaly: {a}\n", ""));
            }
        }
        // Per client: every client with a problem, or all of them with FAULTS_VERBOSE=1.
        let verbose = std::env::var_os("FAULTS_VERBOSE").is_some_and(|v| v != "0");
        let mut shown = 0;
        for (i, (c, f)) in self.clients.iter().enumerate() {
            let troubled = !f.lost.is_empty() || !c.log.anomalies.is_empty() || f.foreign > 0;
            if !(verbose || (troubled && shown < 10)) {
                continue;
            }
            shown += 1;
            o.push_str(&format!(
                "  client {i:>3} of {:<14} project {} owed {} received {} lost {} excused {} \
                 unacked {} connects {:?} resyncs {} closes {:?}{}\n",
                self.groups[c.home].label,
                c.project,
                f.owed,
                f.received,
                f.lost.len(),
                f.excused,
                f.unacked,
                c.log
                    .connects
                    .iter()
                    .map(|k| format!("{}{}", k.instance, if k.resumed { "r" } else { "" }))
                    .collect::<Vec<_>>(),
                c.log.resyncs.len(),
                c.log.closes,
                if troubled {
                    format!(
                        " lost {:?} anomalies {:?}",
                        &f.lost[..f.lost.len().min(5)],
                        c.log.anomalies
                    )
                } else {
                    String::new()
                },
            ));
        }
        o.push_str(&format!(
            "  => {} events lost where history covers them\n",
            self.total_lost()
        ));
        eprintln!("{o}");
    }

    /// The assertions every fault shares: nothing owed was lost, no gap, no duplicate, no
    /// event of another project, nothing a correct gateway would not send.
    pub fn assert_no_loss(&self) {
        for g in &self.groups {
            assert_eq!(
                g.lost, 0,
                "{}: clients homed on {} lost {} events (markers {:?})",
                self.title, g.label, g.lost, g.lost_sample
            );
            assert_eq!(
                g.gaps, 0,
                "{}: {}: seq gaps: {:?}",
                self.title, g.label, g.anomalies
            );
            assert_eq!(
                g.dups, 0,
                "{}: {}: duplicates: {:?}",
                self.title, g.label, g.anomalies
            );
            assert_eq!(g.foreign, 0, "{}: {}: foreign events", self.title, g.label);
            assert!(
                g.anomalies.is_empty(),
                "{}: {}: anomalies: {:?}",
                self.title,
                g.label,
                g.anomalies
            );
            assert!(g.owed > 0, "{}: {}: no event was owed", self.title, g.label);
        }
        assert!(self.caught_up, "{}: clients did not catch up", self.title);
    }
}

// ---------------------------------------------------------------------------------------
// gateway probes that do not block the runtime

/// Polls `/readyz` every 25 ms until it answers `want`; how long that took, None on timeout.
pub async fn time_until_readyz(gw: &Gateway, want: u16, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let r = crate::common::http_request(gw.addr(), "GET", "/readyz", &[], None).await;
        if r.is_ok_and(|r| r.status == want) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Waits for the gateway process to exit without blocking a runtime thread.
pub async fn wait_exit(gw: &mut Gateway, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = gw.try_status() {
            return st;
        }
        assert!(
            start.elapsed() < timeout,
            "gateway did not exit within {timeout:?}\n{}",
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sum of the numeric field `key` over the gateway's log events whose message contains
/// `needle` (e.g. `replayed` of "replayed events missed during the outage"); the fault
/// gateways log JSON for this.
pub fn logged_sum(gw: &Gateway, needle: &str, key: &str) -> u64 {
    gw.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(&l[l.find('{')?..]).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(needle))
        })
        .filter_map(|v| v["fields"][key].as_u64())
        .sum()
}
