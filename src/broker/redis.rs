//! The Redis broker: cross-instance fan-out, command relay, history and records.
//!
//! One pub/sub connection per instance carries every subscribed channel. Its manager task
//! ([`RedisBroker::run_pubsub`]) owns that connection and applies the [`SubCommand`]s it
//! is sent in order, so SUBSCRIBE/UNSUBSCRIBE follow the hub's reference counts. Messages
//! are checked, framed once and handed to the [`super::Sink`] one read's batch per project
//! at a time (never awaited).
//!
//! Outages are survivable: when the connection drops, or stops answering PING (a silently
//! dead connection is the most reported failure of gateways like this one), `up` turns
//! false, the manager reconnects with capped, jittered backoff ([`next_backoff`]:
//! decorrelated jitter, so instances that lost Redis together do not all come back in the
//! same millisecond), resubscribes every
//! channel the hub still wants, and logs the outage's length. Sessions stay connected
//! throughout. Everything else (PUBLISH, EVAL, SET) uses a deadpool pool with timeouts, so
//! a dead Redis gives quick `Unavailable` errors rather than hung requests.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_redis::redis::{self, AsyncCommands};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use futures_util::{FutureExt, StreamExt};

/// Most pub/sub messages handled as one batch.
const MAX_READ_BATCH: usize = 512;

/// History entries per XRANGE page: a page of the largest events allowed (256 KiB) is at
/// most 8 MiB, and a history read stops at `events.replay_max_bytes`.
const HISTORY_PAGE: usize = 32;
use parking_lot::Mutex;
use switchboard_middleware::{AuthError, SessionRecord, SessionStore};
use tokio::sync::mpsc;

use super::state::Snapshot;
use super::{
    channel_project, commands_channel, connection_key, instance_key, new_epoch, presence_key,
    project_channel, Broker, BrokerError, ConnectionRecord, HistoryLimits, HistoryRead, Position,
    SinkSlot, SubCommand, BROADCAST_CHANNEL, PUBLISH_SCRIPT,
};
use crate::config::RedisConfig;
use crate::metrics::histogram::{self, DurationHistogram};
use crate::metrics::Metrics;
use crate::schema::Policy;

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

/// A queued change to the connection records.
#[derive(Debug)]
pub enum RecordOp {
    Put(ConnectionRecord, Duration),
    Delete(String, Vec<String>),
}

pub struct RedisBroker {
    records: mpsc::Sender<RecordOp>,
    client: redis::Client,
    pool: Pool,
    script: redis::Script,
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

impl RedisBroker {
    /// Creates the broker; attach a sink ([`Broker::attach_sink`]), then call
    /// [`RedisBroker::run_pubsub`] to start the subscription manager with the receiver of
    /// the subscription requests.
    pub fn new(
        url: &str,
        config: &RedisConfig,
        history: HistoryLimits,
        records: mpsc::Sender<RecordOp>,
        policy: Policy,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, BrokerError> {
        let client = redis::Client::open(url).map_err(|e| BrokerError::Protocol(e.to_string()))?;
        let timeout = Duration::from_millis(config.command_timeout_ms.max(100));
        let mut pool_config = PoolConfig::new(config.pool_size.max(1));
        pool_config.timeouts = Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        let mut cfg = deadpool_redis::Config::from_url(url);
        cfg.pool = Some(pool_config);
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| BrokerError::Protocol(e.to_string()))?;
        Ok(Arc::new(Self {
            records,
            client,
            pool,
            script: redis::Script::new(PUBLISH_SCRIPT),
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

    /// Runs a pooled command with the command timeout.
    async fn with_conn<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let conn = self.pool.get().await.map_err(unavailable)?;
            f(conn).await.map_err(|e| {
                if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    unavailable(e)
                } else {
                    BrokerError::Protocol(e.to_string())
                }
            })
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| unavailable("timed out"))?
    }

    async fn run_script(
        &self,
        project: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<(String, Vec<u64>, u64), BrokerError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("project:{project}:seq"))
            .key(format!("project:{project}:history"))
            .key(project_channel(project))
            .key(format!("project:{project}:state"))
            .key(format!("project:{project}:state:terminal"))
            .arg(new_epoch())
            .arg(self.history.max_len)
            .arg(self.history.ttl.as_secs())
            .arg(crate::event::unix_millis())
            .arg(self.history.terminal_task_ttl.as_millis() as u64);
        for ev in events {
            invocation.arg(ev);
        }
        self.with_conn(|mut conn| async move {
            invocation
                .invoke_async::<(String, Vec<u64>, u64)>(&mut conn)
                .await
        })
        .await
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
            let seq_key = format!("project:{project}:seq");
            let state_key = format!("project:{project}:state");
            let (seq, epoch, fields): (Option<u64>, Option<String>, Vec<(String, String)>) = self
                .with_conn(|mut conn| async move {
                    redis::pipe()
                        .atomic()
                        .hget(&seq_key, "seq")
                        .hget(&seq_key, "epoch")
                        .hgetall(&state_key)
                        .query_async(&mut conn)
                        .await
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
            let seq_key = format!("project:{project}:seq");
            let history_key = format!("project:{project}:history");
            let page_key = history_key.clone();
            let start = format!("{}-0", after.saturating_add(1));
            let first_start = start.clone();
            type Entries = Vec<(String, Vec<Vec<u8>>)>;
            let (seq, epoch, first, entries): (Option<u64>, Option<String>, Entries, Entries) =
                self.with_conn(|mut conn| async move {
                    redis::pipe()
                        .atomic()
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
                        .arg(HISTORY_PAGE)
                        .query_async(&mut conn)
                        .await
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

    pub async fn publish_broadcast(&self, payload: Vec<u8>) -> Result<(), BrokerError> {
        self.with_conn(|mut conn| async move {
            conn.publish::<_, _, i64>(BROADCAST_CHANNEL, payload).await
        })
        .await
        .map(|_| ())
    }

    pub async fn publish_command(
        &self,
        project: &str,
        payload: Vec<u8>,
    ) -> Result<u64, BrokerError> {
        let channel = commands_channel(project);
        let n = self
            .with_conn(|mut conn| async move { conn.publish::<_, _, i64>(channel, payload).await })
            .await?;
        Ok(n.max(0) as u64)
    }

    /// Queues a connection record write; records are written in batches, in order with
    /// their deletions, by [`RedisBroker::run_records`] (one pipeline per batch instead of
    /// a round trip per connection: connect storms).
    pub async fn put_connection(&self, record: &ConnectionRecord, ttl: Duration) {
        self.record_op(RecordOp::Put(record.clone(), ttl)).await;
    }

    pub async fn delete_connection(&self, client_id: &str, projects: &[String]) {
        self.record_op(RecordOp::Delete(client_id.to_owned(), projects.to_vec()))
            .await;
    }

    /// Queues a record write. Bounded in time as well as size: when the writer is stuck
    /// behind an unreachable Redis, the handshake that queues a put must not hang (the
    /// record is skipped; the heartbeat's refresh writes it again, and a skipped delete
    /// expires with its TTL).
    async fn record_op(&self, op: RecordOp) {
        match tokio::time::timeout(self.timeout, self.records.send(op)).await {
            Ok(Ok(())) => {}
            // The writer is gone (shutting down): write this one directly.
            Ok(Err(e)) => self.write_records(vec![e.0]).await,
            Err(_) => tracing::debug!("connection record queue stuck: record skipped"),
        }
    }

    /// The record writer: drains queued puts/deletes and writes each batch as one pipeline.
    pub async fn run_records(self: Arc<Self>, mut ops: mpsc::Receiver<RecordOp>) {
        while let Some(op) = ops.recv().await {
            let mut batch = vec![op];
            while batch.len() < 1000 {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.write_records(batch).await;
        }
    }

    async fn write_records(&self, batch: Vec<RecordOp>) {
        let mut pipe = redis::pipe();
        let now = crate::event::unix_millis();
        for op in &batch {
            match op {
                RecordOp::Put(record, ttl) => {
                    let secs = ttl.as_secs().max(1);
                    let value = serde_json::to_string(record).unwrap_or_default();
                    pipe.set_ex(connection_key(&record.client_id), value, secs)
                        .ignore();
                    for project in &record.projects {
                        pipe.zadd(presence_key(project), &record.client_id, now + secs * 1000)
                            .ignore();
                        pipe.expire(presence_key(project), secs as i64 * 2).ignore();
                    }
                }
                RecordOp::Delete(client_id, projects) => {
                    pipe.del(connection_key(client_id)).ignore();
                    for project in projects {
                        pipe.zrem(presence_key(project), client_id).ignore();
                    }
                }
            }
        }
        if let Err(e) = self
            .with_conn(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
        {
            tracing::warn!(error = %e, ops = batch.len(), "could not write connection records");
        }
    }

    pub async fn presence_update(&self, project: &str, client_id: &str, ttl: Option<Duration>) {
        let key = presence_key(project);
        let client_id = client_id.to_owned();
        let result = self
            .with_conn(|mut conn| async move {
                match ttl {
                    Some(ttl) => {
                        let until = crate::event::unix_millis() + ttl.as_millis() as u64;
                        conn.zadd::<_, _, _, ()>(key, client_id, until).await
                    }
                    None => conn.zrem::<_, _, ()>(key, client_id).await,
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, project, "could not update presence");
        }
    }

    pub async fn refresh_instance(
        &self,
        instance_id: &str,
        info: &serde_json::Value,
        connections: &[(String, Vec<String>)],
        ttl: Duration,
    ) {
        let secs = ttl.as_secs().max(1);
        let until = crate::event::unix_millis() + secs * 1000;
        let info = info.to_string();
        let key = instance_key(instance_id);
        // One round trip per chunk of records, whatever the number of connections.
        let mut chunks: Vec<&[(String, Vec<String>)]> = connections.chunks(500).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut pipe = redis::pipe();
            if i == 0 {
                pipe.set_ex(&key, &info, secs).ignore();
            }
            for (id, projects) in chunk {
                pipe.expire(connection_key(id), secs as i64).ignore();
                for project in projects {
                    pipe.zadd(presence_key(project), id, until).ignore();
                    pipe.expire(presence_key(project), secs as i64 * 2).ignore();
                }
            }
            if let Err(e) = self
                .with_conn(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
                .await
            {
                tracing::warn!(error = %e, "could not refresh instance registry");
                return;
            }
        }
    }

    /// Live connection records of `project` across all instances.
    pub async fn presence(&self, project: &str) -> Result<Vec<serde_json::Value>, BrokerError> {
        let key = presence_key(project);
        let now = crate::event::unix_millis();
        let (_, ids): ((), Vec<String>) = self
            .with_conn(|mut conn| async move {
                redis::pipe()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore()
                    .cmd("ZRANGEBYSCORE")
                    .arg(&key)
                    .arg(now)
                    .arg("+inf")
                    .query_async(&mut conn)
                    .await
                    .map(|(ids,): (Vec<String>,)| ((), ids))
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| connection_key(id)).collect();
        let raw: Vec<Option<String>> = self
            .with_conn(|mut conn| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut conn).await
            })
            .await?;
        Ok(raw
            .into_iter()
            .flatten()
            .filter_map(|r| serde_json::from_str(&r).ok())
            .collect())
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

    pub async fn deregister_instance(&self, instance_id: &str) {
        let key = instance_key(instance_id);
        let _ = self
            .with_conn(|mut conn| async move { conn.del::<_, ()>(key).await })
            .await;
    }

    /// Logs a dropped event at most once per reason per minute; always counts it.
    fn note_dropped(&self, channel: &str, reason: &'static str, detail: &str) {
        self.stats.dropped_events.fetch_add(1, Ordering::Relaxed);
        self.metrics.rejected(reason);
        let mut log = self.drop_log.lock();
        let now = Instant::now();
        match log.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, last)) if now.duration_since(*last) < Duration::from_secs(60) => return,
            Some((_, last)) => *last = now,
            None => log.push((reason, now)),
        }
        drop(log);
        tracing::warn!(
            channel,
            reason,
            detail,
            "dropped an invalid event from Redis (logged once a minute per reason)"
        );
    }

    /// Handles the messages of one read from the pub/sub connection, read at `read_at`.
    /// Consecutive events of a project are checked one by one and fanned out together (one
    /// write per session); each run's fan-out time is observed once, for all its events.
    fn on_messages(&self, msgs: &[redis::Msg], read_at: Instant) {
        let metrics = &self.metrics;
        let Some(sink) = self.sink.get() else { return };
        // `source="redis"` counts what only pub/sub brought: raw publishes (and broadcasts).
        // An event with a seq came through a publish path, which counted it where it came
        // in (`source="api"` for ours); counting its pub/sub copy too counted it twice.
        let mut raw = 0u64;
        let received = SystemTime::now();
        let fan_out = |project: &str, run: &[crate::event::Prepared]| {
            sink.deliver(project, run);
            metrics
                .fanout
                .observe_n(read_at.elapsed(), run.len() as u64);
        };
        let mut run: Vec<crate::event::Prepared> = Vec::new();
        let mut run_project: Option<&str> = None;
        let policy = self.policy;
        for msg in msgs {
            let channel = msg.get_channel_name();
            let payload = msg.get_payload_bytes();
            let project = channel_project(channel);
            if run_project.is_some() && project != run_project {
                if let Some(p) = run_project {
                    fan_out(p, &run);
                }
                run.clear();
                run_project = None;
            }
            if channel == BROADCAST_CHANNEL {
                raw += 1;
                match sink.broadcast(payload) {
                    Ok(_) => metrics.fanout.observe(read_at.elapsed()),
                    Err(e) => self.note_dropped(channel, e.reason(), &e.to_string()),
                }
                continue;
            }
            let Some(project) = project else { continue };
            match crate::event::prepare_received(project, payload, Some(&policy)) {
                Ok((p, published)) => {
                    raw += u64::from(p.seq.is_none());
                    if let Some(at) = published {
                        // A timestamp ahead of our clock (skew) counts as no lag.
                        let lag = received.duration_since(at).unwrap_or(Duration::ZERO);
                        self.stats.pubsub_lag.observe(lag);
                    }
                    run_project = Some(project);
                    run.push(p);
                }
                Err(e) => {
                    raw += 1;
                    self.note_dropped(channel, e.reason(), &e.to_string());
                }
            }
        }
        if let Some(p) = run_project {
            fan_out(p, &run);
        }
        metrics.events_from_redis.fetch_add(raw, Ordering::Relaxed);
    }

    /// The subscription manager: owns the pub/sub connection for the life of the process.
    pub async fn run_pubsub(self: Arc<Self>, mut commands: mpsc::Receiver<SubCommand>) {
        // What the sink reads history through while it catches up after an outage.
        let broker = Broker::Redis(self.clone());
        let mut wanted: HashSet<String> = HashSet::from([BROADCAST_CHANNEL.to_owned()]);
        let mut backoff =
            next_backoff(BACKOFF_BASE, BACKOFF_BASE, self.max_backoff, rand::random());
        let mut down_since: Option<Instant> = None;
        loop {
            match self
                .connect_and_serve(&broker, &mut wanted, &mut commands, &mut down_since)
                .await
            {
                Serve::Stop => return,
                Serve::Lost(reason) => {
                    if self.up.swap(false, Ordering::Relaxed) {
                        // It was serving: start the next attempt from the shortest backoff.
                        backoff = next_backoff(
                            BACKOFF_BASE,
                            BACKOFF_BASE,
                            self.max_backoff,
                            rand::random(),
                        );
                        down_since = Some(Instant::now());
                        tracing::error!(%reason, "broker connection lost; clients stay connected, reconnecting");
                    } else {
                        tracing::debug!(%reason, "broker still unreachable");
                    }
                }
            }
            // Back off, still answering the hub so nobody waits on a dead connection.
            let wake = tokio::time::sleep(backoff);
            tokio::pin!(wake);
            loop {
                tokio::select! {
                    _ = &mut wake => break,
                    cmd = commands.recv() => match cmd {
                        None => return,
                        Some(SubCommand::Subscribe { channel, done }) => {
                            wanted.insert(channel);
                            let _ = done.send(false);
                        }
                        Some(SubCommand::Unsubscribe { channel }) => {
                            wanted.remove(&channel);
                        }
                    },
                }
            }
            backoff = next_backoff(backoff, BACKOFF_BASE, self.max_backoff, rand::random());
        }
    }

    /// After an outage: the sink brings every project back in step (replay from history,
    /// or a resync where the history no longer covers the gap).
    fn catch_up<'a>(&'a self, broker: &'a Broker) -> CatchUp<'a> {
        match self.sink.get() {
            Some(sink) => sink.recover(broker),
            None => Box::pin(async {}),
        }
    }

    async fn connect_and_serve<'a>(
        &'a self,
        broker: &'a Broker,
        wanted: &mut HashSet<String>,
        commands: &mut mpsc::Receiver<SubCommand>,
        down_since: &mut Option<Instant>,
    ) -> Serve {
        let connect = async {
            let pubsub = self.client.get_async_pubsub().await?;
            let (mut sink, stream) = pubsub.split();
            let channels: Vec<&String> = wanted.iter().collect();
            sink.subscribe(channels).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        };
        let (mut sink, mut stream) = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Serve::Lost(e.to_string()),
            Err(_) => return Serve::Lost("connect timed out".into()),
        };
        // After an outage, every connected client first gets what it missed (catch-up from
        // history), and only then live messages. The catch-up runs inside this loop, so the
        // pub/sub stream is still read meanwhile (into `held`, bounded in bytes: the
        // client library's own queue is unbounded) and subscriptions are still answered.
        // `down_since` is cleared only once a catch-up completed, so a connection lost
        // during one leads to another.
        let since = *down_since;
        let mut catch_up: Option<CatchUp<'a>> = since.map(|_| self.catch_up(broker));
        let mut held = Held::default();
        let mut rounds = 1;
        if since.is_none() {
            tracing::info!(channels = wanted.len(), "broker pub/sub connected");
            self.up.store(true, Ordering::Relaxed);
        }
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = async {
                    match catch_up.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if catch_up.is_some() => {
                    if held.overflowed {
                        // Live messages were dropped while catching up; those with a seq
                        // are in the history, so one more round from where we got to
                        // delivers them (messages without one cannot be replayed).
                        if rounds >= CATCH_UP_ROUNDS {
                            return Serve::Lost("catch-up cannot keep up with the live stream".into());
                        }
                        rounds += 1;
                        held = Held::default();
                        catch_up = Some(self.catch_up(broker));
                        continue;
                    }
                    catch_up = None;
                    let backlog = std::mem::take(&mut held.msgs);
                    if !backlog.is_empty() {
                        self.on_messages(&backlog, Instant::now());
                    }
                    *down_since = None;
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        outage_ms = since.map_or(0, |s| s.elapsed().as_millis() as u64),
                        channels = wanted.len(),
                        rounds,
                        "broker reconnected and resubscribed"
                    );
                    self.up.store(true, Ordering::Relaxed);
                }
                msg = stream.next() => match msg {
                    Some(msg) if catch_up.is_some() => held.push(msg),
                    Some(msg) => {
                        let read_at = Instant::now();
                        // Take everything already received: under load, batches grow and
                        // each session gets fewer, larger writes.
                        let mut batch = vec![msg];
                        while batch.len() < MAX_READ_BATCH {
                            match stream.next().now_or_never() {
                                Some(Some(m)) => batch.push(m),
                                Some(None) => {
                                    self.on_messages(&batch, read_at);
                                    return Serve::Lost("pub/sub connection closed".into());
                                }
                                None => break,
                            }
                        }
                        self.on_messages(&batch, read_at);
                    }
                    None => return Serve::Lost("pub/sub connection closed".into()),
                },
                cmd = commands.recv() => match cmd {
                    None => return Serve::Stop,
                    Some(SubCommand::Subscribe { channel, done }) => {
                        let fresh = wanted.insert(channel.clone());
                        if !fresh {
                            let _ = done.send(true);
                            continue;
                        }
                        match tokio::time::timeout(self.timeout, sink.subscribe(&channel)).await {
                            Ok(Ok(())) => { let _ = done.send(true); }
                            Ok(Err(e)) => { let _ = done.send(false); return Serve::Lost(e.to_string()); }
                            Err(_) => { let _ = done.send(false); return Serve::Lost("SUBSCRIBE timed out".into()); }
                        }
                    }
                    Some(SubCommand::Unsubscribe { channel }) => {
                        if wanted.remove(&channel) {
                            match tokio::time::timeout(self.timeout, sink.unsubscribe(&channel)).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => return Serve::Lost(e.to_string()),
                                Err(_) => return Serve::Lost("UNSUBSCRIBE timed out".into()),
                            }
                        }
                    }
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(self.timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Serve::Lost(format!("PING failed: {e}")),
                        Err(_) => {
                            self.stats.dead_pubsub_detected.fetch_add(1, Ordering::Relaxed);
                            return Serve::Lost("pub/sub connection silently dead (PING unanswered)".into());
                        }
                    }
                }
            }
        }
    }
}

enum Serve {
    Stop,
    Lost(String),
}

/// A catch-up in progress (see `connect_and_serve`).
type CatchUp<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Live pub/sub bytes held while a catch-up runs. Past it, held messages are dropped and
/// the catch-up goes one more round (events with a seq are in the history).
const CATCH_UP_HOLD_BYTES: usize = 32 * 1024 * 1024;

/// Catch-up rounds before giving up on this connection (and reconnecting).
const CATCH_UP_ROUNDS: u32 = 4;

/// Live messages received during a catch-up, delivered after it in arrival order.
#[derive(Default)]
struct Held {
    msgs: Vec<redis::Msg>,
    bytes: usize,
    overflowed: bool,
}

impl Held {
    fn push(&mut self, msg: redis::Msg) {
        if self.overflowed {
            return;
        }
        let size = msg.get_payload_bytes().len() + msg.get_channel_name().len() + 64;
        if self.bytes + size > CATCH_UP_HOLD_BYTES {
            self.overflowed = true;
            self.msgs = Vec::new();
            self.bytes = 0;
            return;
        }
        self.bytes += size;
        self.msgs.push(msg);
    }
}

/// Shortest wait before a reconnect attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// The wait after `prev`: decorrelated jitter, uniform in `[base, 3 × prev]` and capped at
/// `cap` (`unit` is a uniform random number in `[0, 1)`). It grows about threefold per
/// attempt like an exponential backoff, but every instance draws its own: a fleet that lost
/// Redis at the same moment spreads its reconnects instead of arriving in lockstep.
pub(crate) fn next_backoff(prev: Duration, base: Duration, cap: Duration, unit: f64) -> Duration {
    let low = base.min(cap).as_secs_f64();
    let high = (prev.as_secs_f64() * 3.0).max(low);
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    };
    Duration::from_secs_f64(low + (high - low) * unit).min(cap)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_bounded_and_grows() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        // Bounds: [base, 3 × prev], capped.
        assert_eq!(next_backoff(base, base, cap, 0.0), base);
        assert_eq!(next_backoff(base, base, cap, 0.999_999).as_millis(), 299);
        assert_eq!(next_backoff(Duration::from_secs(4), base, cap, 0.9), cap);
        assert_eq!(next_backoff(base, base, cap, f64::NAN), base);
        // Jitter: different draws give different waits (lockstep is what this prevents).
        let a = next_backoff(Duration::from_secs(1), base, cap, 0.1);
        let b = next_backoff(Duration::from_secs(1), base, cap, 0.7);
        assert_ne!(a, b);
        // A run of real random draws stays in bounds and never exceeds the cap.
        let mut prev = base;
        let mut longest = Duration::ZERO;
        for _ in 0..200 {
            let next = next_backoff(prev, base, cap, rand::random());
            assert!(
                next >= base && next <= cap && next <= prev * 3,
                "{prev:?} -> {next:?}"
            );
            longest = longest.max(next);
            prev = next;
        }
        assert!(longest >= cap / 2, "never grew: {longest:?}");
        // 200 draws with identical waits would mean no jitter at all.
        let draws: HashSet<u128> = (0..200)
            .map(|_| next_backoff(Duration::from_secs(1), base, cap, rand::random()).as_micros())
            .collect();
        assert!(draws.len() > 150);
    }
}
