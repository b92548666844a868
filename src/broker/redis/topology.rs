//! Where the broker's Redis is (docs/protocol.md §11): one server, a master found through
//! Sentinel, or a Redis Cluster; and the key names each one needs.
//!
//! `Backend` hands out pooled connections as one `Conn` type whatever the topology, so
//! the rest of the broker runs the same commands on all three. Invariants:
//! - a Sentinel master is always one the sentinels named *and* that says `ROLE master`
//!   itself (a sentinel's answer can be stale for the seconds of a failover); it is looked
//!   for again when a command fails the way a failover makes it fail (connection lost,
//!   `READONLY`), at most one lookup at a time, and each lookup is bounded by
//!   `redis.failover_timeout_ms`;
//! - in cluster mode every key of one project shares a hash slot ([`Keys`]), so the publish
//!   script and the atomic pipelines stay on one node; slot moves and node loss are
//!   followed by the cluster client (MOVED/ASK, topology refresh).

use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, aio::ConnectionLike, Cmd, Pipeline, RedisFuture, Value};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use parking_lot::RwLock;

use crate::broker::BrokerError;
use crate::config::{RedisCredentials, RedisTopology};

/// Key and channel names: the seed's on one Redis and behind Sentinel, hash-tagged per
/// project (and per story) on a cluster, so one project's keys share a slot.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keys {
    pub tagged: bool,
}

impl Keys {
    /// `project:<id>:<suffix>`, or `project:{<id>}:<suffix>` on a cluster.
    pub fn project(&self, id: &str, suffix: &str) -> String {
        if self.tagged {
            format!("project:{{{id}}}:{suffix}")
        } else {
            format!("project:{id}:{suffix}")
        }
    }

    /// `story:<id>:progress`, or `story:{<id>}:progress` on a cluster.
    pub fn story_progress(&self, id: &str) -> String {
        if self.tagged {
            format!("story:{{{id}}}:progress")
        } else {
            crate::story::progress_key(id)
        }
    }
}

/// A pooled connection of any topology.
pub(super) enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

impl Conn {
    /// Runs a pipeline of independent writes. On a cluster one pipeline may only touch one
    /// slot, so its commands are sent one by one, concurrently (clones of the cluster
    /// connection share its node connections, which pipeline them per node).
    pub(super) async fn exec_independent(self, pipe: Pipeline) -> redis::RedisResult<()> {
        match self {
            Conn::Cluster(c) => {
                let shared: redis::cluster_async::ClusterConnection = (*c).clone();
                let results = futures_util::future::join_all(pipe.cmd_iter().map(|cmd| {
                    let mut conn = shared.clone();
                    async move { cmd.query_async::<Value>(&mut conn).await }
                }))
                .await;
                results.into_iter().try_for_each(|r| r.map(drop))
            }
            mut single => pipe.exec_async(&mut single).await,
        }
    }
}

/// Whether `e` says the cluster is moving under us: a redirection (MOVED/ASK), a slot
/// whose keys are being migrated (TRYAGAIN), or no owner right now (CLUSTERDOWN), also when
/// a transaction was aborted for one of them.
pub(super) fn is_cluster_in_motion(e: &redis::RedisError) -> bool {
    is_moving(e)
}

/// A demoted master (`READONLY`: it became a replica in a failover) or a cluster in
/// motion: retryable, and a reason to look for the master again (Sentinel).
pub(super) fn is_failover_like(e: &redis::RedisError) -> bool {
    e.to_string().contains("READONLY") || is_moving(e)
}

fn is_moving(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    [
        "MOVED",
        "Moved",
        "ASK",
        "TRYAGAIN",
        "TryAgain",
        "CLUSTERDOWN",
        "ClusterDown",
    ]
    .iter()
    .any(|w| text.contains(w))
}

impl Conn {
    /// An atomic (MULTI/EXEC) pipeline on one project's keys. On a cluster whose slot map
    /// this connection holds is stale, the transaction is aborted with MOVED (the client
    /// does not follow redirections inside one): one plain command on `probe_key` makes it
    /// follow the redirection and update its map, and the pipeline is sent once more.
    pub(super) async fn query_atomic<T: redis::FromRedisValue>(
        &mut self,
        pipe: &Pipeline,
        probe_key: &str,
    ) -> redis::RedisResult<T> {
        match pipe.query_async(self).await {
            Err(e) if matches!(self, Conn::Cluster(_)) && is_cluster_in_motion(&e) => {
                let _: redis::RedisResult<bool> =
                    redis::cmd("EXISTS").arg(probe_key).query_async(self).await;
                pipe.query_async(self).await
            }
            other => other,
        }
    }

    /// Subscribers of a classic channel on every node of a cluster (`PUBSUB NUMSUB` on each,
    /// summed); on one server, its own count.
    pub(super) async fn subscribers_everywhere(
        &mut self,
        channel: &str,
    ) -> redis::RedisResult<u64> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(channel);
        let count = |v: &Value| -> u64 {
            match v {
                Value::Array(items) => match items.get(1) {
                    Some(Value::Int(n)) => (*n).max(0) as u64,
                    _ => 0,
                },
                _ => 0,
            }
        };
        match self {
            Conn::Single(c) => Ok(count(&cmd.query_async::<Value>(c).await?)),
            Conn::Cluster(c) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllNodes, None));
                match c.route_command(cmd, routing).await? {
                    Value::Map(per_node) => Ok(per_node.iter().map(|(_, v)| count(v)).sum()),
                    other => Ok(count(&other)),
                }
            }
        }
    }

    /// `WAIT`, on the connection that wrote `key` (on a cluster: its slot's master).
    /// Returns how many replicas confirmed.
    pub(super) async fn wait_on_key(&mut self, wait: Cmd, key: &str) -> redis::RedisResult<u64> {
        use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
        match self {
            Conn::Single(c) => wait.query_async(c).await,
            Conn::Cluster(c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let value = c
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(value).map_err(redis::RedisError::from)
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A pool to one server. Its connections wait for an answer as long as the command timeout
/// (`with_conn` bounds each command by it): the client's own default of 500 ms answered a
/// `WAIT` of `publish_wait_timeout_ms` (1 s by default) "timed out", and cut any slower
/// command short of the configured timeout.
fn pool_for(url: &str, size: usize, timeout: Duration) -> Result<Pool, BrokerError> {
    let protocol = |e: &dyn std::fmt::Display| BrokerError::Protocol(e.to_string());
    let connection = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager =
        deadpool_redis::Manager::new_with_config(url, connection).map_err(|e| protocol(&e))?;
    Pool::builder(manager)
        .config(pool_config(size, timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| protocol(&e))
}

fn pool_config(size: usize, timeout: Duration) -> PoolConfig {
    let mut config = PoolConfig::new(size.max(1));
    config.timeouts = Timeouts {
        wait: Some(timeout),
        create: Some(timeout),
        recycle: Some(timeout),
    };
    config
}

/// The master a Sentinel deployment currently names, with a pool to it.
struct Master {
    addr: String,
    url: String,
    pool: Pool,
}

pub(super) struct Sentinel {
    sentinels: Vec<String>,
    creds: RedisCredentials,
    name: String,
    current: RwLock<Option<Master>>,
    /// One lookup at a time; holds when the last one ended, so a burst of failing commands
    /// asks the sentinels once.
    lookup: tokio::sync::Mutex<Option<Instant>>,
    /// A background lookup (after a failing command) is running: no second one is spawned.
    looking: std::sync::atomic::AtomicBool,
    /// Times the master moved (a failover followed), for `/metrics`.
    changes: std::sync::atomic::AtomicU64,
    pool_size: usize,
    timeout: Duration,
    failover_timeout: Duration,
}

/// Failing commands within this long of a lookup reuse its answer.
const LOOKUP_REUSE: Duration = Duration::from_millis(250);

impl Sentinel {
    /// Asks each sentinel in turn for the master's address, then the master itself whether
    /// it is one; retries until the failover timeout (a failover in progress).
    async fn find_master(&self) -> Result<String, BrokerError> {
        let deadline = Instant::now() + self.failover_timeout;
        let mut last = String::from("no sentinel answered");
        loop {
            for sentinel in &self.sentinels {
                match self.ask(sentinel).await {
                    Ok(addr) => match self.confirm(&addr).await {
                        Ok(()) => return Ok(addr),
                        Err(why) => last = format!("{addr} named by {sentinel}: {why}"),
                    },
                    Err(why) => last = format!("sentinel {sentinel}: {why}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(unavailable(format!("no master found: {last}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ask(&self, sentinel: &str) -> Result<String, String> {
        let name = self.name.clone();
        let work = async {
            let client = redis::Client::open(self.creds.sentinel_url(sentinel))?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&name)
                .query_async::<Option<(String, String)>>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(Some((host, port)))) => Ok(format!("{host}:{port}")),
            Ok(Ok(None)) => Err(format!("does not monitor {:?}", self.name)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    async fn confirm(&self, addr: &str) -> Result<(), String> {
        let work = async {
            let client = redis::Client::open(self.creds.node_url(addr))?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("ROLE")
                .query_async::<Vec<Value>>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(role)) => match role.first() {
                Some(Value::BulkString(b)) if b == b"master" => Ok(()),
                Some(Value::SimpleString(s)) if s == "master" => Ok(()),
                _ => Err("not (yet) a master".into()),
            },
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Looks the master up again (unless a lookup just ended) and switches the pool when it
    /// moved.
    async fn refresh(&self, force: bool) -> Result<(), BrokerError> {
        let mut last = self.lookup.lock().await;
        if !force && last.is_some_and(|at| at.elapsed() < LOOKUP_REUSE) && self.has_master() {
            return Ok(());
        }
        let found = self.find_master().await;
        *last = Some(Instant::now());
        let addr = found?;
        let moved = self.current.read().as_ref().map(|m| m.addr.as_str()) != Some(&addr);
        if moved {
            let url = self.creds.node_url(&addr);
            let pool = pool_for(&url, self.pool_size, self.timeout)?;
            let previous = self
                .current
                .write()
                .replace(Master {
                    addr: addr.clone(),
                    url,
                    pool,
                })
                .map(|m| m.addr);
            match previous {
                Some(from) => {
                    self.changes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%from, to = %addr, "Redis master moved (Sentinel failover)")
                }
                None => tracing::info!(master = %addr, "Redis master found through Sentinel"),
            }
        }
        Ok(())
    }

    fn has_master(&self) -> bool {
        self.current.read().is_some()
    }

    fn pool(&self) -> Option<Pool> {
        self.current.read().as_ref().map(|m| m.pool.clone())
    }
}

/// Where connections come from.
pub(super) enum Backend {
    Single {
        url: String,
        pool: Pool,
    },
    Sentinel(std::sync::Arc<Sentinel>),
    Cluster {
        nodes: Vec<String>,
        /// The seed nodes' URLs, with the credentials.
        urls: Vec<String>,
        pool: deadpool_redis::cluster::Pool,
        /// The masters as last read from `CLUSTER NODES` (by the pub/sub link).
        masters: RwLock<Vec<String>>,
    },
}

impl Backend {
    pub(super) fn new(
        topology: &RedisTopology,
        creds: &RedisCredentials,
        pool_size: usize,
        timeout: Duration,
        failover_timeout: Duration,
    ) -> Result<Self, BrokerError> {
        Ok(match topology {
            RedisTopology::Single { url } => {
                redis::Client::open(url.as_str())
                    .map_err(|e| BrokerError::Protocol(e.to_string()))?;
                Backend::Single {
                    url: url.clone(),
                    pool: pool_for(url, pool_size, timeout)?,
                }
            }
            RedisTopology::Sentinel { sentinels, master } => {
                Backend::Sentinel(std::sync::Arc::new(Sentinel {
                    sentinels: sentinels.clone(),
                    creds: creds.clone(),
                    name: master.clone(),
                    current: RwLock::new(None),
                    lookup: tokio::sync::Mutex::new(None),
                    looking: std::sync::atomic::AtomicBool::new(false),
                    changes: std::sync::atomic::AtomicU64::new(0),
                    pool_size,
                    timeout,
                    failover_timeout,
                }))
            }
            RedisTopology::Cluster { nodes } => {
                let urls: Vec<String> = nodes.iter().map(|n| creds.node_url(n)).collect();
                let mut cfg = deadpool_redis::cluster::Config::from_urls(urls.clone());
                cfg.pool = Some(pool_config(pool_size, timeout));
                let pool = cfg
                    .create_pool(Some(Runtime::Tokio1))
                    .map_err(|e| BrokerError::Protocol(e.to_string()))?;
                Backend::Cluster {
                    nodes: nodes.clone(),
                    urls,
                    pool,
                    masters: RwLock::new(Vec::new()),
                }
            }
        })
    }

    pub(super) fn keys(&self) -> Keys {
        Keys {
            tagged: matches!(self, Backend::Cluster { .. }),
        }
    }

    /// Notes the cluster's masters from a `CLUSTER NODES` answer (for `describe`).
    pub(super) fn note_cluster_nodes(&self, text: &str) {
        if let Backend::Cluster { masters, .. } = self {
            let mut found: Vec<String> = text
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split(' ').collect();
                    let flags = fields.get(2)?;
                    let is_master = flags.split(',').any(|f| f == "master")
                        && !flags.split(',').any(|f| f == "fail" || f == "noaddr");
                    // `ip:port@cport[,hostname]`
                    let addr = fields.get(1)?.split('@').next()?;
                    is_master.then(|| addr.to_owned())
                })
                .collect();
            found.sort();
            *masters.write() = found;
        }
    }

    /// The seed nodes' URLs (with the credentials), on a cluster.
    pub(super) fn cluster_urls(&self) -> Option<&[String]> {
        match self {
            Backend::Cluster { urls, .. } => Some(urls),
            _ => None,
        }
    }

    /// A pooled connection (Sentinel: to the master as last found; found first if none).
    pub(super) async fn get(&self) -> Result<Conn, BrokerError> {
        match self {
            Backend::Single { pool, .. } => pool.get().await.map(Conn::Single).map_err(unavailable),
            Backend::Sentinel(s) => {
                if !s.has_master() {
                    s.refresh(false).await?;
                }
                let pool = s.pool().ok_or_else(|| unavailable("no master found yet"))?;
                pool.get().await.map(Conn::Single).map_err(unavailable)
            }
            Backend::Cluster { pool, .. } => {
                pool.get().await.map(Conn::Cluster).map_err(unavailable)
            }
        }
    }

    /// A command failed with `e`: when it is how a failover shows (connection lost or
    /// refused, or a demoted master's `READONLY`, both `Unavailable`), look the master up
    /// again, in the background (the failed request is answered at once; a lookup may take
    /// up to the failover timeout), so later commands go to the new one. Other topologies
    /// need nothing (the cluster client follows MOVED/ASK itself).
    pub(super) fn on_error(&self, e: &BrokerError) {
        use std::sync::atomic::Ordering;
        let Backend::Sentinel(s) = self else { return };
        if !matches!(e, BrokerError::Unavailable(_)) || s.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        let s = s.clone();
        tokio::spawn(async move {
            if let Err(e) = s.refresh(false).await {
                tracing::warn!(error = %e, "Sentinel lookup failed");
            }
            s.looking.store(false, Ordering::Release);
        });
    }

    /// The URL the pub/sub connection should use now (single and Sentinel; Sentinel asks
    /// the sentinels afresh: this is called on every reconnect).
    pub(super) async fn pubsub_url(&self) -> Result<String, BrokerError> {
        match self {
            Backend::Single { url, .. } => Ok(url.clone()),
            Backend::Sentinel(s) => {
                // Half the connect budget for the lookup: when every sentinel is down but
                // the master is not, the master last found is used rather than nothing.
                let looked = tokio::time::timeout(s.timeout / 2, s.refresh(true)).await;
                let current = s.current.read().as_ref().map(|m| m.url.clone());
                match (looked, current) {
                    (Ok(Ok(())), Some(url)) => Ok(url),
                    (why, Some(url)) => {
                        let why = match why {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        tracing::warn!(%why, "Sentinel lookup failed: reconnecting to the master last found");
                        Ok(url)
                    }
                    (Ok(Err(e)), None) => Err(e),
                    (_, None) => Err(unavailable("no master found yet")),
                }
            }
            Backend::Cluster { urls, .. } => urls
                .first()
                .cloned()
                .ok_or_else(|| unavailable("no cluster node configured")),
        }
    }

    /// How many times the master moved (Sentinel failovers followed); 0 elsewhere.
    pub(super) fn master_changes(&self) -> u64 {
        match self {
            Backend::Sentinel(s) => s.changes.load(std::sync::atomic::Ordering::Relaxed),
            _ => 0,
        }
    }

    /// What `/health/websocket` and `check-config` show as `broker_topology`.
    pub(super) fn describe(&self) -> serde_json::Value {
        match self {
            Backend::Single { .. } => serde_json::json!({"mode": "single"}),
            Backend::Sentinel(s) => serde_json::json!({
                "mode": "sentinel",
                "master_name": s.name,
                "master": s.current.read().as_ref().map(|m| m.addr.clone()),
            }),
            Backend::Cluster { nodes, masters, .. } => serde_json::json!({
                "mode": "cluster",
                "masters": *masters.read(),
                "seed_nodes": nodes,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_keys_share_one_hash_tag_per_project() {
        let plain = Keys { tagged: false };
        let tagged = Keys { tagged: true };
        assert_eq!(plain.project("p1", "seq"), "project:p1:seq");
        assert_eq!(tagged.project("p1", "seq"), "project:{p1}:seq");
        assert_eq!(
            tagged.project("p1", "state:terminal"),
            "project:{p1}:state:terminal"
        );
        assert_eq!(plain.story_progress("s"), "story:s:progress");
        assert_eq!(tagged.story_progress("s"), "story:{s}:progress");
        // One slot for all of a project's keys and its sharded channel.
        let slot = |k: &str| redis::cluster_routing::Slot::for_key(k);
        let seq = slot(&tagged.project("p1", "seq"));
        for suffix in ["history", "state", "state:terminal", "events", "commands"] {
            assert_eq!(slot(&tagged.project("p1", suffix)), seq, "{suffix}");
        }
    }
}
