//! The broker: where events come from and commands go to.
//!
//! Two implementations behind one enum (static dispatch, no boxed futures on the hot path):
//! - [`memory::MemoryBroker`], the embedded default: one instance, seq/epoch/history kept
//!   in-process, publishing hands the events straight to the sink;
//! - [`redis::RedisBroker`]: one shared pub/sub connection per instance (reference-counted
//!   subscriptions driven by [`SubCommand`]s), pooled connections for PUBLISH/EVAL/SET, the
//!   publish Lua script ([`PUBLISH_SCRIPT`]) assigning seq atomically with the history
//!   append.
//!
//! Both give every published event a per-project `seq` and the project an `epoch`, assign
//! them in one atomic step with the history append and the delivery, and never block the
//! fan-out path.
//!
//! The broker is the bottom of the flow: it imports no module that handles sessions. What
//! it receives goes to a [`Sink`] (the hub, attached once at start), one broker read's
//! batch per project at a time; everything else is narrow calls (publish, history,
//! snapshot, position, subscribe).

pub mod memory;
pub mod redis;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use switchboard_middleware::SessionStore;
use tokio::sync::oneshot;

use crate::event::{EventError, Prepared};
use crate::story;

/// The one Lua script that publishes events (seq, epoch, history, PUBLISH).
pub const PUBLISH_SCRIPT: &str = include_str!("publish.lua");

/// The script that stores a story's latest progress, and publishes it (docs/protocol.md §9).
pub const STORY_SCRIPT: &str = include_str!("story.lua");

/// The script that relays a command and counts its receivers, command streams included.
pub const COMMAND_SCRIPT: &str = include_str!("command.lua");

/// A count read when it is needed (not when it was queued).
#[derive(Clone)]
pub struct LiveCount(pub Arc<dyn Fn() -> usize + Send + Sync>);

impl std::fmt::Debug for LiveCount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LiveCount({})", (self.0)())
    }
}

/// The channel families the gateway serves: a project's events (seed 000), a story's
/// progress (seed 003, docs/protocol.md §9), and a project's commands for workers that take
/// them from the gateway (docs/protocol.md §6). Each id lives in its family's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Project,
    Story,
    Commands,
}

impl Family {
    /// The Redis channel of `id` in this family.
    pub fn channel(self, id: &str) -> String {
        match self {
            Family::Project => project_channel(id),
            Family::Story => story::channel(id),
            Family::Commands => commands_channel(id),
        }
    }

    /// The `kind` label of metrics and of the authorization hook.
    pub fn kind(self) -> &'static str {
        match self {
            Family::Project => "project",
            Family::Story => "story",
            Family::Commands => "commands",
        }
    }
}

/// Redis channel carrying a project's live events.
pub fn project_channel(project: &str) -> String {
    format!("project:{project}:events")
}

/// The project of a `project:{id}:events` channel, classic or (Redis Cluster) sharded with
/// the id hash-tagged: `project:{<id>}:events`.
pub fn channel_project(channel: &str) -> Option<&str> {
    channel
        .strip_prefix("project:")
        .and_then(|rest| rest.strip_suffix(":events"))
        .map(untag)
        .filter(|p| !p.is_empty())
}

/// `{id}` → `id` (a hash tag; project ids never contain braces).
fn untag(id: &str) -> &str {
    id.strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(id)
}

/// Capacity of the hub → subscription manager queue. Each entry is one channel name
/// (≤ ~150 B with the project id capped at 128) and a oneshot: at most ~2 MiB queued.
/// In practice it holds one entry per handshake or `subscribe` in flight (each waits for its
/// confirmation), plus one per lingering project; when it is full (the manager is stuck in
/// a reconnect or a catch-up) a join fails at once with "broker unavailable" instead of
/// growing a queue, and an unsubscribe is retried after another linger period.
pub const SUB_QUEUE: usize = 8192;

/// Requests to the broker's subscription manager, applied in the order they were sent.
#[derive(Debug)]
pub enum SubCommand {
    /// Subscribe (idempotent); `done` is answered once the broker confirmed it.
    Subscribe {
        channel: String,
        done: oneshot::Sender<bool>,
    },
    Unsubscribe {
        channel: String,
    },
}

/// Where the broker hands what it receives. Implemented by the hub; called on the broker's
/// own task (the pub/sub reader, or the publisher for the embedded broker), so it must
/// never await a client and never block.
pub trait Sink: Send + Sync {
    /// Events of one project that arrived together (one broker read), in order. Returns
    /// how many deliveries were made.
    fn deliver(&self, project: &str, batch: &[Prepared]) -> usize;
    /// One checked progress message of a story (its frame: the published bytes).
    fn deliver_story(&self, story: &str, frame: &bytes::Bytes) -> usize;
    /// A payload of the global channel (`redis.broadcast_channel`), unchecked.
    fn broadcast(&self, payload: &[u8]) -> Result<usize, EventError>;
    /// A command for `project`'s workers, as published (to this instance's command
    /// streams). Returns how many streams it was handed to.
    fn deliver_command(&self, project: &str, payload: &[u8]) -> usize;
    /// Waits while deliveries handed over are queued past the sink's bounds (the fan-out
    /// shards'): the producer (the pub/sub reader) awaits it before reading more, so a
    /// burst backs up in Redis, not in our memory. Ready at once when under them.
    fn settled(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
    /// After an outage, with the pub/sub connection back and live messages held: bring
    /// every project this instance follows back in step (replay from history or resync).
    fn recover<'a>(
        &'a self,
        broker: &'a Broker,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
}

/// The sink slot of a broker: set once when the instance is assembled (the hub is built
/// after the broker it subscribes through).
#[derive(Default)]
pub struct SinkSlot(std::sync::OnceLock<Arc<dyn Sink>>);

impl SinkSlot {
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        if self.0.set(sink).is_err() {
            tracing::warn!("a broker sink was attached twice; the first one stays");
        }
    }

    /// The sink, if attached (nothing is subscribed before it is).
    pub fn get(&self) -> Option<&Arc<dyn Sink>> {
        self.0.get()
    }

    /// [`Sink::settled`] of the attached sink: what a producer awaits after handing it
    /// work.
    pub async fn settled(&self) {
        if let Some(sink) = self.get() {
            sink.settled().await;
        }
    }
}

pub fn commands_channel(project: &str) -> String {
    format!("project:{project}:commands")
}

/// The project of a `project:{id}:commands` channel (classic or hash-tagged sharded).
pub fn commands_channel_project(channel: &str) -> Option<&str> {
    channel
        .strip_prefix("project:")
        .and_then(|rest| rest.strip_suffix(":commands"))
        .map(untag)
        .filter(|p| !p.is_empty())
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached right now; the caller may retry.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered with something we did not expect.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// Published, but `WAIT` did not confirm `wanted` replicas in time
    /// (`redis.publish_wait_replicas`): a failover now could lose it.
    #[error("published but confirmed by {confirmed} of {wanted} replicas")]
    NotReplicated { wanted: u32, confirmed: u32 },
}

/// A project's position in its history: last assigned seq and the history epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
}

/// One read of a project's history: where the project is, the oldest seq the history
/// still holds, and the events after the requested seq (oldest first, JSON with seq).
#[derive(Debug, Clone)]
pub struct HistoryRead {
    pub position: Position,
    pub earliest: Option<u64>,
    pub events: Vec<(u64, bytes::Bytes)>,
    /// The events after `after` were more than `HistoryLimits::replay_max_bytes`: `events`
    /// holds only the first of them (contiguous from `after + 1`), and a reader that needs
    /// them all must resync instead.
    pub truncated: bool,
}

/// `ws:connection:{client_id}` (docs/protocol.md §7).
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    pub client_id: String,
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    pub projects: Vec<String>,
    pub instance_id: String,
    pub connected_at: String,
}

pub fn connection_key(client_id: &str) -> String {
    format!("ws:connection:{client_id}")
}

pub fn instance_key(instance_id: &str) -> String {
    format!("ws:instance:{instance_id}")
}

/// History bounds passed to the publish path.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub max_len: usize,
    pub ttl: Duration,
    /// How long finished tasks stay in the status snapshot.
    pub terminal_task_ttl: Duration,
    /// Largest `status` frame a snapshot may become ([`state::Snapshot::bounded`]).
    pub snapshot_max_bytes: usize,
    /// How long a story's latest progress is kept (`stories.progress_ttl_secs`).
    pub story_ttl: Duration,
    /// Most event bytes one history read returns (`events.replay_max_bytes`): a `?last_seq=0`
    /// resume of a 10,000-event history must not load all of it (it is answered with a
    /// resync anyway).
    pub replay_max_bytes: usize,
}

pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

#[derive(Clone)]
pub enum Broker {
    Memory(Arc<memory::MemoryBroker>),
    Redis(Arc<redis::RedisBroker>),
}

impl Broker {
    /// Attaches where received events go (see [`Sink`]); call once, before any subscribe.
    pub fn attach_sink(&self, sink: Arc<dyn Sink>) {
        match self {
            Broker::Memory(m) => m.sink.attach(sink),
            Broker::Redis(r) => r.sink.attach(sink),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }

    /// The Redis topology in use (docs/protocol.md §11): `single`, `sentinel` with its
    /// current master, `cluster` with its masters; `embedded` without Redis.
    pub fn topology(&self) -> serde_json::Value {
        match self {
            Broker::Memory(_) => serde_json::json!({"mode": "embedded"}),
            Broker::Redis(r) => r.topology(),
        }
    }

    /// Whether the broker is reachable (always true for the embedded one).
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(r) => r.is_up(),
        }
    }

    /// Publishes events of one project, all or nothing. Each event is a JSON object with
    /// `project_id` and `timestamp` already set and no `seq`. Returns the assigned seqs.
    pub async fn publish_events(
        &self,
        project: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, BrokerError> {
        match self {
            Broker::Memory(m) => {
                let seqs = m.publish_events(project, events)?;
                // The publisher is the producer here: it waits for the fan-out shards as
                // the Redis reader does.
                m.sink.settled().await;
                Ok(seqs)
            }
            Broker::Redis(r) => r.publish_events(project, events).await,
        }
    }

    /// Publishes a global event to every connection of every instance.
    pub async fn publish_broadcast(&self, payload: Vec<u8>) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(m) => {
                m.publish_broadcast(&payload)?;
                // As for events: the publisher waits while the broadcast queue is full.
                m.sink.settled().await;
                Ok(())
            }
            Broker::Redis(r) => r.publish_broadcast(payload).await,
        }
    }

    /// Relays a client command to the workers; returns how many received it.
    pub async fn publish_command(
        &self,
        project: &str,
        payload: Vec<u8>,
    ) -> Result<u64, BrokerError> {
        match self {
            Broker::Memory(m) => m.publish_command(project, payload),
            Broker::Redis(r) => r.publish_command(project, payload).await,
        }
    }

    /// The latest progress of a story (the published JSON), if any is kept.
    pub async fn story_progress(&self, story: &str) -> Result<Option<bytes::Bytes>, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.story_progress(story)),
            Broker::Redis(r) => r.story_progress(story).await,
        }
    }

    /// Stores a checked progress message as the story's latest and publishes it, in one
    /// atomic step; returns how many received it (instances, or local sessions embedded).
    pub async fn publish_story(&self, story: &str, payload: Vec<u8>) -> Result<u64, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.publish_story(story, payload)),
            Broker::Redis(r) => r.publish_story(story, payload).await,
        }
    }

    /// The project's current seq and epoch (creating the epoch if it has none).
    pub async fn position(&self, project: &str) -> Result<Position, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.position(project)),
            Broker::Redis(r) => r.position(project).await,
        }
    }

    /// The project's status snapshot (creating the epoch if it has none).
    pub async fn snapshot(&self, project: &str) -> Result<state::Snapshot, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.snapshot(project)),
            Broker::Redis(r) => r.snapshot(project).await,
        }
    }

    /// Reads the history after `after` together with the project's position.
    pub async fn history_after(
        &self,
        project: &str,
        after: u64,
    ) -> Result<HistoryRead, BrokerError> {
        match self {
            Broker::Memory(m) => Ok(m.history_after(project, after)),
            Broker::Redis(r) => r.history_after(project, after).await,
        }
    }

    pub async fn put_connection(&self, record: &ConnectionRecord, ttl: Duration) {
        if let Broker::Redis(r) = self {
            r.put_connection(record, ttl).await
        }
    }

    pub async fn delete_connection(&self, client_id: &str, projects: &[String]) {
        if let Broker::Redis(r) = self {
            r.delete_connection(client_id, projects).await
        }
    }

    /// Adds or removes a connection from a project's presence index (subscribe/unsubscribe).
    pub async fn presence_update(&self, project: &str, client_id: &str, ttl: Option<Duration>) {
        if let Broker::Redis(r) = self {
            r.presence_update(project, client_id, ttl).await
        }
    }

    /// Refreshes the TTL of this instance's connection records (with their projects'
    /// presence entries), its registry entry, and its command-stream counts.
    pub async fn refresh_instance(
        &self,
        instance_id: &str,
        info: &serde_json::Value,
        connections: &[(String, Vec<String>)],
        command_streams: &[(String, usize)],
        ttl: Duration,
    ) {
        if let Broker::Redis(r) = self {
            r.refresh_instance(instance_id, info, connections, command_streams, ttl)
                .await
        }
    }

    /// Records how many command streams of `project` this instance holds now (what
    /// `delivered_to` counts across instances). `count` is read when the write happens, so
    /// writes queued by joins and leaves racing each other still leave the latest count.
    /// The embedded broker counts its own streams and needs nothing.
    pub async fn note_command_streams(
        &self,
        project: &str,
        instance_id: &str,
        count: LiveCount,
        ttl: Duration,
    ) {
        if let Broker::Redis(r) = self {
            r.note_command_streams(project, instance_id, count, ttl)
                .await
        }
    }

    /// Connection records of every client of `project`, on every instance (Redis only;
    /// None for the embedded broker, whose hub knows its own clients).
    pub async fn presence(
        &self,
        project: &str,
    ) -> Result<Option<Vec<serde_json::Value>>, BrokerError> {
        match self {
            Broker::Memory(_) => Ok(None),
            Broker::Redis(r) => r.presence(project).await.map(Some),
        }
    }

    /// Removes this instance's registry entry, after writing the connection records (and
    /// their deletions) still queued: the drain's last step.
    pub async fn deregister_instance(&self, instance_id: &str) {
        if let Broker::Redis(r) = self {
            r.flush_records().await;
            r.deregister_instance(instance_id).await
        }
    }

    /// The stored `session:{id}` values of `ids`, in order (None: gone), in one round trip,
    /// for the revoked-session recheck. The embedded broker has no sessions: it answers
    /// `Unavailable`, which the recheck treats as "cannot tell" and closes nobody.
    pub async fn session_values(&self, ids: &[&str]) -> Result<Vec<Option<String>>, BrokerError> {
        match self {
            Broker::Memory(_) => Err(BrokerError::Unavailable(
                "the embedded broker holds no sessions".into(),
            )),
            Broker::Redis(r) => r.session_values(ids).await,
        }
    }

    /// Where `session=` credentials are looked up (Redis only, docs/protocol.md §1).
    pub fn session_store(&self) -> Option<Arc<dyn SessionStore>> {
        match self {
            Broker::Memory(_) => None,
            Broker::Redis(r) => Some(r.clone() as Arc<dyn SessionStore>),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_round_trip() {
        assert_eq!(channel_project(&project_channel("a.b-c")), Some("a.b-c"));
        assert_eq!(channel_project("websocket:broadcast"), None);
        assert_eq!(channel_project("project::events"), None);
        assert_eq!(channel_project("project:{a.b-c}:events"), Some("a.b-c"));
        assert_eq!(channel_project("project:{}:events"), None);
        assert_eq!(commands_channel_project("project:{p}:commands"), Some("p"));
    }
}
