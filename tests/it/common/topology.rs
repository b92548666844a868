//! Real distributed Redis for the topology tests (docs/protocol.md §11), started by the
//! tests on free ports and stopped by PID: a master with a replica watched by three
//! sentinels, and a 3-master + 3-replica cluster made with `redis-cli --cluster create`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, redis, temp_path, RedisServer, TcpProxy};

/// The master name the sentinels monitor.
pub const MASTER_NAME: &str = "sbmaster";

fn query(port: u16, args: &[&str]) -> Option<redis::Value> {
    query_as(port, None, args)
}

/// `query` with a password (`AUTH` as the default user).
pub fn query_as(port: u16, password: Option<&str>, args: &[&str]) -> Option<redis::Value> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/")).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut conn).ok()
}

fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The server on `port` requires `password` from now on, and uses it towards its master
/// (`masterauth`), so a replica keeps replicating.
fn require_password_on(port: u16, password: &str) {
    for (key, value) in [("masterauth", password), ("requirepass", password)] {
        let r = query(port, &["CONFIG", "SET", key, value]);
        assert!(
            matches!(r, Some(redis::Value::Okay)),
            "CONFIG SET {key} on :{port}: {r:?}"
        );
    }
}

/// Whether the replica on `port` has its link to the master up.
fn in_sync(port: u16) -> bool {
    matches!(query(port, &["INFO", "replication"]),
        Some(redis::Value::BulkString(b)) if String::from_utf8_lossy(&b).contains("master_link_status:up"))
}

/// `ROLE`'s first word on `port` ("master", "slave", "sentinel").
pub fn role(port: u16) -> Option<String> {
    match query(port, &["ROLE"])? {
        redis::Value::Array(items) => match items.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

pub struct Sentinel {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master, one replica and three sentinels (quorum 2, down after 1 s).
pub struct SentinelSet {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<Sentinel>,
    /// With `start_partitionable`: the replication link runs through it, so a test can
    /// freeze it (the replica falls behind while it and the master look healthy).
    pub link: Option<TcpProxy>,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        Self::start_with(false)
    }

    /// The replica replicates through a proxy the test can freeze.
    pub fn start_partitionable() -> SentinelSet {
        Self::start_with(true)
    }

    fn start_with(partitionable: bool) -> SentinelSet {
        let master = RedisServer::start();
        let link = partitionable.then(|| TcpProxy::start(master.port()));
        let upstream = link.as_ref().map_or(master.port(), |l| l.port);
        let replica =
            RedisServer::start_args(false, &["--replicaof", "127.0.0.1", &upstream.to_string()]);
        let mut m = master.client().get_connection().expect("master");
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("repl-diskless-sync-delay")
            .arg("0")
            .query(&mut m)
            .expect("CONFIG SET");
        let sentinels = (0..3).map(|_| start_sentinel(master.port())).collect();
        let set = SentinelSet {
            master,
            replica,
            sentinels,
            link,
        };
        // Ready for a failover: the replica is in sync and every sentinel knows the replica
        // and the two other sentinels.
        until("the replica to sync", Duration::from_secs(15), || {
            in_sync(set.replica.port())
        });
        for s in &set.sentinels {
            until(
                "the sentinels to know each other",
                Duration::from_secs(20),
                || {
                    let n = |args: &[&str]| match query(s.port, args) {
                        Some(redis::Value::Array(items)) => items.len(),
                        _ => 0,
                    };
                    n(&["SENTINEL", "replicas", MASTER_NAME]) >= 1
                        && n(&["SENTINEL", "sentinels", MASTER_NAME]) >= 2
                },
            );
        }
        set
    }

    /// The master and the replica require `password`; the sentinels are told it
    /// (`auth-pass`), so they keep monitoring and can fail over.
    pub fn require_password(&self, password: &str) {
        for s in &self.sentinels {
            let r = query(
                s.port,
                &["SENTINEL", "SET", MASTER_NAME, "auth-pass", password],
            );
            assert!(matches!(r, Some(redis::Value::Okay)), "SENTINEL SET: {r:?}");
        }
        for port in [self.master.port(), self.replica.port()] {
            require_password_on(port, password);
        }
    }

    /// `host:port,...` for `REDIS_SENTINELS`.
    pub fn addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The master's port as the first sentinel names it.
    pub fn named_master(&self) -> Option<u16> {
        match query(
            self.sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", MASTER_NAME],
        )? {
            redis::Value::Array(items) => match items.get(1)? {
                redis::Value::BulkString(b) => String::from_utf8_lossy(b).parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }
}

fn start_sentinel(master_port: u16) -> Sentinel {
    let dir = temp_path("sentinel");
    std::fs::create_dir_all(&dir).expect("create sentinel dir");
    for _ in 0..10 {
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {dir}/sentinel.log\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 4000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let mut s = Sentinel {
            child: Some(child),
            port,
            dir: dir.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if role(port).as_deref() == Some("sentinel") {
                return s;
            }
            if let Some(Ok(Some(_))) = s.child.as_mut().map(|c| c.try_wait()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut c) = s.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    panic!("could not start a sentinel");
}

/// Three masters with a replica each, in cluster mode.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..6)
            .map(|_| {
                // The bus port is chosen too: the default (port + 10000) can be past 65535
                // for a free port in the ephemeral range.
                let bus = free_port().to_string();
                RedisServer::start_args(
                    false,
                    &[
                        "--cluster-port",
                        &bus,
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1500",
                        // A replica must be in sync before a fault: no 5 s wait for more
                        // replicas before the first full sync.
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes };
        until("the cluster to be ok", Duration::from_secs(30), || {
            cluster.nodes.iter().all(|n| {
                matches!(query(n.port(), &["CLUSTER", "INFO"]),
                    Some(redis::Value::BulkString(b)) if String::from_utf8_lossy(&b).contains("cluster_state:ok"))
            })
        });
        // Every replica in sync with its master (a replica that never synced cannot take
        // over, and the fault tests kill masters).
        until("every replica to sync", Duration::from_secs(30), || {
            cluster
                .nodes
                .iter()
                .all(|n| role(n.port()).as_deref() != Some("slave") || in_sync(n.port()))
        });
        cluster
    }

    /// Every node requires `password` from now on (`requirepass`, and `masterauth` so the
    /// replicas keep replicating); the cluster bus needs none. Queries through this
    /// helper's own methods are not authenticated: call it last.
    pub fn require_password(&self, password: &str) {
        for n in &self.nodes {
            require_password_on(n.port(), password);
        }
    }

    /// `host:port,...` for `REDIS_CLUSTER_NODES` (every node: any of them is a seed).
    pub fn addrs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `CLUSTER NODES` as each live node sees it, and the tail of each node's log.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out += &format!("--- :{} ({:?})\n", n.port(), role(n.port()));
            if let Some(redis::Value::BulkString(b)) = query(n.port(), &["CLUSTER", "NODES"]) {
                out += &String::from_utf8_lossy(&b);
            }
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            for l in tail.into_iter().rev() {
                out += &format!("  log: {l}\n");
            }
        }
        out
    }

    /// Moves `key`'s slot, with its keys, to the master `to` (the steps of a resharding:
    /// IMPORTING/MIGRATING, MIGRATE in batches, then SETSLOT NODE on every master).
    pub fn migrate_slot(&self, key: &str, to: usize) {
        let from = self.master_of(key);
        assert_ne!(from, to, "the slot is already there");
        let port = |i: usize| self.nodes[i].port();
        let id = |i: usize| match query(port(i), &["CLUSTER", "MYID"]) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
            other => panic!("CLUSTER MYID: {other:?}"),
        };
        let slot = match query(port(from), &["CLUSTER", "KEYSLOT", key]) {
            Some(redis::Value::Int(v)) => v.to_string(),
            other => panic!("CLUSTER KEYSLOT: {other:?}"),
        };
        let (from_id, to_id) = (id(from), id(to));
        let ok = |p: u16, args: &[&str]| {
            let r = query(p, args);
            assert!(
                matches!(
                    r,
                    Some(redis::Value::Okay) | Some(redis::Value::SimpleString(_))
                ),
                "{args:?} on :{p}: {r:?}"
            );
        };
        ok(
            port(to),
            &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id],
        );
        ok(
            port(from),
            &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id],
        );
        loop {
            let keys: Vec<String> =
                match query(port(from), &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]) {
                    Some(redis::Value::Array(items)) => items
                        .iter()
                        .filter_map(|v| match v {
                            redis::Value::BulkString(b) => {
                                Some(String::from_utf8_lossy(b).into_owned())
                            }
                            _ => None,
                        })
                        .collect(),
                    other => panic!("GETKEYSINSLOT: {other:?}"),
                };
            if keys.is_empty() {
                break;
            }
            let to_port = port(to).to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            ok(port(from), &args);
        }
        // The new owner first, then the old one (which then answers MOVED), then the rest.
        ok(port(to), &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        ok(port(from), &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        for i in 0..self.nodes.len() {
            if i != to && i != from && role(port(i)).as_deref() == Some("master") {
                let _ = query(port(i), &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
            }
        }
    }

    /// The node (index into `nodes`) that is master of `key`'s slot now.
    pub fn master_of(&self, key: &str) -> usize {
        self.owner_of(key)
            .unwrap_or_else(|| panic!("no master owns the slot of {key}"))
    }

    /// The node that is master of `key`'s slot now, if one is (none during a failover).
    pub fn owner_of(&self, key: &str) -> Option<usize> {
        let slot = self.nodes.iter().find_map(|n| {
            match query(n.port(), &["CLUSTER", "KEYSLOT", key]) {
                Some(redis::Value::Int(v)) => u16::try_from(v).ok(),
                _ => None,
            }
        })?;
        for (i, n) in self.nodes.iter().enumerate() {
            if role(n.port()).as_deref() != Some("master") {
                continue;
            }
            if let Some(redis::Value::BulkString(b)) = query(n.port(), &["CLUSTER", "NODES"]) {
                let text = String::from_utf8_lossy(&b).into_owned();
                for line in text.lines() {
                    if !line.contains("myself") {
                        continue;
                    }
                    for range in line.split(' ').skip(8) {
                        let (lo, hi) = match range.split_once('-') {
                            Some((lo, hi)) => (lo.parse().unwrap_or(1), hi.parse().unwrap_or(0)),
                            None => {
                                let v: u16 = range.parse().unwrap_or(u16::MAX);
                                (v, v)
                            }
                        };
                        if (lo..=hi).contains(&slot) {
                            return Some(i);
                        }
                    }
                }
            }
        }
        None
    }
}
