//! The Redis broker: cross-instance fan-out, command relay, history and records.
//!
//! One pub/sub connection per instance carries every subscribed channel. Its manager task
//! ([`RedisBroker::run_pubsub`]) owns that connection and applies the [`super::SubCommand`]s it
//! is sent in order, so SUBSCRIBE/UNSUBSCRIBE follow the hub's reference counts. Messages
//! are checked, framed once and handed to the [`super::Sink`] one read's batch per project
//! at a time (never awaited).
//!
//! Outages are survivable (`pubsub.rs`): when the connection drops, or stops answering PING
//! (a silently dead connection is the most reported failure of gateways like this one), `up`
//! turns false, the manager reconnects with capped, jittered backoff (`next_backoff`:
//! decorrelated jitter, so instances that lost Redis together do not all come back in the
//! same millisecond), resubscribes every
//! channel the hub still wants, and logs the outage's length. Sessions stay connected
//! throughout. Everything else (PUBLISH, EVAL, SET) uses a deadpool pool with timeouts, so
//! a dead Redis gives quick `Unavailable` errors rather than hung requests. Connection
//! records, presence and the instance registry are written in batches (`records.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_redis::redis::{self, AsyncCommands};

/// History entries per XRANGE page: a page of the largest events allowed (256 KiB) is at
/// most 8 MiB, and a history read stops at `events.replay_max_bytes`.
const HISTORY_PAGE: usize = 32;
use parking_lot::Mutex;
use switchboard_middleware::{AuthError, SessionRecord, SessionStore};

mod link;
mod pubsub;
mod records;
pub mod topology;

pub use records::RecordOp;
use tokio::sync::mpsc;

use super::state::Snapshot;
use super::{
    commands_channel, new_epoch, BrokerError, HistoryLimits, HistoryRead, Position, SinkSlot,
    COMMAND_SCRIPT, PUBLISH_SCRIPT, STORY_SCRIPT,
};
use crate::config::{RedisConfig, RedisTopology};
use crate::metrics::histogram::{self, DurationHistogram};
use crate::metrics::Metrics;
use crate::schema::Policy;
use crate::story;

pub struct RedisStats {
    pub reconnects: AtomicU64,
    pub dead_pubsub_detected: AtomicU64,
    pub dropped_events: AtomicU64,
    /// From an event's own `timestamp` to its arrival on the pub/sub connection.
    pub pubsub_lag: DurationHistogram,
}

impl Default for RedisStats {
    fn default() -> Self {
        Self {
            reconnects: AtomicU64::new(0),
            dead_pubsub_detected: AtomicU64::new(0),
            dropped_events: AtomicU64::new(0),
            pubsub_lag: DurationHistogram::new(histogram::LAG_BUCKETS),
        }
    }
}

pub struct RedisBroker {
    records: mpsc::Sender<RecordOp>,
    /// Where connections come from: one server, Sentinel's master, or a cluster.
    backend: topology::Backend,
    /// Key names for that topology (hash-tagged on a cluster).
    keys: topology::Keys,
    /// `redis.publish_wait_replicas` and its timeout (ms).
    wait_replicas: u32,
    wait_timeout_ms: u64,
    script: redis::Script,
    story_script: redis::Script,
    command_script: redis::Script,
    /// The global channel (`redis.broadcast_channel`, the seed's `REDIS_CHANNEL`).
    broadcast_channel: String,
    pub(super) sink: SinkSlot,
    /// Checks for events arriving on the pub/sub connection.
    policy: Policy,
    metrics: Arc<Metrics>,
    up: AtomicBool,
    timeout: Duration,
    ping_interval: Duration,
    max_backoff: Duration,
    history: HistoryLimits,
    pub stats: RedisStats,
    /// Rate limit for "dropped event" logs: reason -> last time logged.
    drop_log: Mutex<Vec<(&'static str, Instant)>>,
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A Redis error as the broker reports it: lost connections, timeouts, a demoted master
/// (`READONLY`) and a cluster in motion (MOVED/ASK/TRYAGAIN/CLUSTERDOWN, also inside an
/// aborted transaction) are retryable (`Unavailable`: 503 to API callers).
fn classify(e: redis::RedisError) -> BrokerError {
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_connection_refusal()
        || topology::is_failover_like(&e)
    {
        unavailable(e)
    } else {
        BrokerError::Protocol(e.to_string())
    }
}

impl RedisBroker {
    /// Creates the broker; attach a sink ([`super::Broker::attach_sink`]), then call
    /// [`RedisBroker::run_pubsub`] to start the subscription manager with the receiver of
    /// the subscription requests.
    pub fn new(
        topology: &RedisTopology,
        config: &RedisConfig,
        history: HistoryLimits,
        records: mpsc::Sender<RecordOp>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, BrokerError> {
        let timeout = Duration::from_millis(config.command_timeout_ms.max(100));
        let backend = topology::Backend::new(
            topology,
            &config.credentials(),
            config.pool_size,
            timeout,
            Duration::from_millis(config.failover_timeout_ms.max(1)),
        )?;
        Ok(Arc::new(Self {
            records,
            keys: backend.keys(),
            backend,
            wait_replicas: config.publish_wait_replicas,
            wait_timeout_ms: config.publish_wait_timeout_ms,
            script: redis::Script::new(PUBLISH_SCRIPT),
            story_script: redis::Script::new(STORY_SCRIPT),
            command_script: redis::Script::new(COMMAND_SCRIPT),
            broadcast_channel: config.broadcast_channel.clone(),
            sink: SinkSlot::default(),
            policy,
            metrics,
            up: AtomicBool::new(false),
            timeout,
            ping_interval: Duration::from_millis(config.pubsub_ping_interval_ms.max(100)),
            max_backoff: Duration::from_millis(config.reconnect_max_backoff_ms.max(100)),
            history,
            stats: RedisStats::default(),
            drop_log: Mutex::new(Vec::new()),
        }))
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// What `/health/websocket` and `check-config` show as `broker_topology`.
    pub fn topology(&self) -> serde_json::Value {
        self.backend.describe()
    }

    /// Sentinel failovers followed (the master moved); 0 for one Redis and a cluster.
    pub fn master_changes(&self) -> u64 {
        self.backend.master_changes()
    }

    /// Runs a pooled command with the command timeout. A failure that looks like a failover
    /// makes the backend look for the master again (Sentinel), in the background.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(topology::Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.backend.get().await?;
            f(conn).await.map_err(classify)
        };
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| unavailable("timed out"))
            .and_then(|r| r);
        if let Err(e) = &result {
            self.backend.on_error(e);
        }
        result
    }

    async fn run_script(
        &self,
        project: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<(String, Vec<u64>, u64), BrokerError> {
        let k = self.keys;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(k.project(project, "seq"))
            .key(k.project(project, "history"))
            // On a cluster, the sharded channel (the script SPUBLISHes a hash-tagged one).
            .key(k.project(project, "events"))
            .key(k.project(project, "state"))
            .key(k.project(project, "state:terminal"))
            .arg(new_epoch())
            .arg(self.history.max_len)
            .arg(self.history.ttl.as_secs())
            .arg(crate::event::unix_millis())
            .arg(self.history.terminal_task_ttl.as_millis() as u64);
        let publishing = !events.is_empty();
        for ev in events {
            invocation.arg(ev);
        }
        let seq_key = k.project(project, "seq");
        self.invoke_acknowledged(invocation, publishing, &seq_key)
            .await
    }

    /// Runs a script that writes what an API publish acknowledges; with
    /// `redis.publish_wait_replicas` > 0 (and `wait`), answers only once `WAIT` confirmed
    /// that many replicas have it, and `NotReplicated` otherwise. `WAIT` counts the writes of
    /// the connection it is sent on: the same one, and on a cluster routed to the node that
    /// ran the script (the slot of `key`, one of the script's keys).
    async fn invoke_acknowledged<T: redis::FromRedisValue + Send>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
        wait: bool,
        key: &str,
    ) -> Result<T, BrokerError> {
        let wait = (wait && self.wait_replicas > 0).then(|| {
            let mut cmd = redis::cmd("WAIT");
            cmd.arg(self.wait_replicas).arg(self.wait_timeout_ms);
            cmd
        });
        let (result, confirmed) = self
            .with_conn(|mut conn| async move {
                let result = invocation.invoke_async::<T>(&mut conn).await?;
                let confirmed = match wait {
                    Some(cmd) => Some(conn.wait_on_key(cmd, key).await?),
                    None => None,
                };
                Ok((result, confirmed))
            })
            .await?;
        if let Some(confirmed) = confirmed {
            if confirmed < u64::from(self.wait_replicas) {
                self.metrics.rejected("not_replicated");
                return Err(BrokerError::NotReplicated {
                    wanted: self.wait_replicas,
                    confirmed: confirmed.min(u64::from(u32::MAX)) as u32,
                });
            }
        }
        Ok(result)
    }

    pub async fn publish_events(
        &self,
        project: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, BrokerError> {
        let (_, seqs, _) = self.run_script(project, events).await?;
        Ok(seqs)
    }

    pub async fn position(&self, project: &str) -> Result<Position, BrokerError> {
        let (epoch, _, seq) = self.run_script(project, Vec::new()).await?;
        Ok(Position { seq, epoch })
    }

    pub async fn snapshot(&self, project: &str) -> Result<Snapshot, BrokerError> {
        for _ in 0..2 {
            let seq_key = self.keys.project(project, "seq");
            let state_key = self.keys.project(project, "state");
            let (seq, epoch, fields): (Option<u64>, Option<String>, Vec<(String, String)>) = self
                .with_conn(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .hget(&seq_key, "seq")
                        .hget(&seq_key, "epoch")
                        .hgetall(&state_key);
                    conn.query_atomic(&pipe, &seq_key).await
                })
                .await?;
            match epoch {
                Some(epoch) => {
                    return Ok(Snapshot::from_fields(seq.unwrap_or(0), epoch, fields)
                        .bounded(self.history.snapshot_max_bytes))
                }
                // A project nobody published to yet: give it an epoch, then read again.
                None => {
                    self.position(project).await?;
                }
            }
        }
        Err(BrokerError::Protocol(
            "project epoch vanished while reading".into(),
        ))
    }

    pub async fn history_after(
        &self,
        project: &str,
        after: u64,
    ) -> Result<HistoryRead, BrokerError> {
        for _ in 0..2 {
            let seq_key = self.keys.project(project, "seq");
            let history_key = self.keys.project(project, "history");
            let page_key = history_key.clone();
            let start = format!("{}-0", after.saturating_add(1));
            let first_start = start.clone();
            type Entries = Vec<(String, Vec<Vec<u8>>)>;
            let (seq, epoch, first, entries): (Option<u64>, Option<String>, Entries, Entries) =
                self.with_conn(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    pipe.atomic()
                        .hget(&seq_key, "seq")
                        .hget(&seq_key, "epoch")
                        .cmd("XRANGE")
                        .arg(&history_key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .cmd("XREVRANGE")
                        .arg(&history_key)
                        .arg("+")
                        .arg(&first_start)
                        .arg("COUNT")
                        .arg(HISTORY_PAGE);
                    conn.query_atomic(&pipe, &seq_key).await
                })
                .await?;
            let Some(epoch) = epoch else {
                self.position(project).await?;
                continue;
            };
            let parse = |(id, fields): (String, Vec<Vec<u8>>)| -> Option<(u64, bytes::Bytes)> {
                let seq = id.split('-').next()?.parse().ok()?;
                let mut it = fields.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if k == b"event" {
                        return Some((seq, bytes::Bytes::from(v)));
                    }
                }
                None
            };
            let position = Position {
                seq: seq.unwrap_or(0),
                epoch,
            };
            let earliest = first
                .into_iter()
                .next()
                .and_then(|e| parse(e).map(|(s, _)| s));
            // Newest first, page by page down to `after + 1`, and never more than the replay
            // budget in bytes: what is kept is the newest contiguous run, the part a resume
            // tail serves. The first page was read with the position (atomically); later
            // pages only go older, so nothing past the position is ever included.
            let mut events = Vec::new();
            let mut bytes = 0;
            let mut truncated = false;
            let mut page = entries;
            loop {
                let full = page.len() >= HISTORY_PAGE;
                let mut last_id = None;
                for entry in page {
                    last_id = Some(entry.0.clone());
                    let Some((s, event)) = parse(entry) else {
                        continue;
                    };
                    if s > position.seq {
                        continue;
                    }
                    bytes += event.len();
                    if bytes > self.history.replay_max_bytes {
                        truncated = true;
                        break;
                    }
                    events.push((s, event));
                }
                let (Some(last_id), true, false) = (last_id, full, truncated) else {
                    break;
                };
                let (history_key, start) = (page_key.clone(), start.clone());
                page = self
                    .with_conn(|mut conn| async move {
                        redis::cmd("XREVRANGE")
                            .arg(&history_key)
                            .arg(format!("({last_id}"))
                            .arg(&start)
                            .arg("COUNT")
                            .arg(HISTORY_PAGE)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?;
            }
            events.reverse();
            return Ok(HistoryRead {
                position,
                earliest,
                events,
                truncated,
            });
        }
        Err(BrokerError::Protocol(
            "project epoch vanished while reading".into(),
        ))
    }

    /// The story's latest progress (`story:{id}:progress`), if kept.
    pub async fn story_progress(&self, story: &str) -> Result<Option<bytes::Bytes>, BrokerError> {
        let key = self.keys.story_progress(story);
        let raw: Option<Vec<u8>> = self
            .with_conn(|mut conn| async move { conn.get(key).await })
            .await?;
        Ok(raw.map(bytes::Bytes::from))
    }

    /// Runs the story script: `publish` stores and PUBLISHes (returns the receivers),
    /// `relay` stores what a raw PUBLISH carried unless the stored one is newer.
    async fn story_script(
        &self,
        story: &str,
        payload: Vec<u8>,
        mode: &str,
        updated_at: &str,
    ) -> Result<i64, BrokerError> {
        let mut invocation = self.story_script.prepare_invoke();
        invocation
            .key(self.keys.story_progress(story))
            .arg(payload)
            .arg(self.history.story_ttl.as_secs().max(1))
            .arg(mode)
            .arg(updated_at)
            // An argument, not a key: on a cluster the seed's channel `story:<id>` is in
            // another slot than the progress key, and a classic PUBLISH needs none.
            .arg(story::channel(story));
        // A published progress is what the API acknowledges (it is stored): it waits for
        // the replicas like an event; a relayed raw PUBLISH acknowledges nobody.
        let key = self.keys.story_progress(story);
        self.invoke_acknowledged(invocation, mode == "publish", &key)
            .await
    }

    pub async fn publish_story(&self, story: &str, payload: Vec<u8>) -> Result<u64, BrokerError> {
        let n = self.story_script(story, payload, "publish", "").await?;
        Ok(n.max(0) as u64)
    }

    pub async fn publish_broadcast(&self, payload: Vec<u8>) -> Result<(), BrokerError> {
        self.with_conn(|mut conn| async move {
            conn.publish::<_, _, i64>(&self.broadcast_channel, payload)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Relays a client command to the project's workers: those subscribed to
    /// `project:{id}:commands` themselves and those on gateways' command streams, counted
    /// by [`COMMAND_SCRIPT`].
    pub async fn publish_command(
        &self,
        project: &str,
        payload: Vec<u8>,
    ) -> Result<u64, BrokerError> {
        let mut invocation = self.command_script.prepare_invoke();
        let classic = commands_channel(project);
        let tagged = self.keys.project(project, "commands");
        // On a cluster the script SPUBLISHes the sharded channel (KEYS[1], the project's
        // slot) and PUBLISHes the seed's classic one too (ARGV[3]); elsewhere they are one.
        let also = if tagged == classic {
            String::new()
        } else {
            classic.clone()
        };
        let cluster = !also.is_empty();
        invocation
            .key(tagged)
            .key(self.keys.project(project, "command_streams"))
            .arg(payload)
            .arg(crate::event::unix_millis())
            .arg(also);
        let (n, classic_here) = self
            .with_conn(
                |mut conn| async move { invocation.invoke_async::<(i64, i64)>(&mut conn).await },
            )
            .await?;
        let mut n = n.max(0) as u64 + classic_here.max(0) as u64;
        if cluster {
            // A cluster's PUBLISH answers with the subscribers of the node it ran on only;
            // the seed's workers may be subscribed on any node (the message reaches them
            // all): count them everywhere. Best effort: on failure the node's count stays.
            match self
                .with_conn(|mut conn| async move { conn.subscribers_everywhere(&classic).await })
                .await
            {
                Ok(everywhere) => {
                    n = n - classic_here.max(0) as u64 + everywhere.max(classic_here.max(0) as u64)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not count classic command subscribers")
                }
            }
        }
        Ok(n)
    }

    /// The raw `session:{id}` values of `ids`, in order, in one MGET (None: no such key).
    pub async fn session_values(&self, ids: &[&str]) -> Result<Vec<Option<String>>, BrokerError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| format!("session:{id}")).collect();
        let values: Vec<Option<String>> = self
            .with_conn(|mut conn| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await
            })
            .await?;
        if values.len() != ids.len() {
            return Err(BrokerError::Protocol(format!(
                "MGET of {} keys answered {} values",
                ids.len(),
                values.len()
            )));
        }
        Ok(values)
    }
}

impl SessionStore for RedisBroker {
    fn load<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<SessionRecord>, AuthError>> + Send + 'a>> {
        Box::pin(async move {
            let key = format!("session:{id}");
            let raw: Option<String> = self
                .with_conn(|mut conn| async move { conn.get(key).await })
                .await
                .map_err(|_| AuthError::SessionStoreUnavailable)?;
            match raw {
                None => Ok(None),
                Some(text) => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|_| AuthError::SessionNotFound),
            }
        })
    }
}
