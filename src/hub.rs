//! The hub: which sessions of this instance listen to which project, and fan-out.
//!
//! Each active project has one slot holding its sessions. The first session of a project
//! asks the broker to subscribe to `project:{id}:events`; when the last one leaves, the
//! subscription lingers for `redis.unsubscribe_linger_ms` (a page reload must not churn
//! SUBSCRIBE/UNSUBSCRIBE) and is then dropped. Subscription requests are sent to the broker
//! in the same critical section that changes the slot, so the broker sees subscribe and
//! unsubscribe for a channel in the order the hub decided them.
//!
//! Fan-out ([`Hub::deliver`]) takes the slot under a read lock and hands the one prebuilt
//! frame to every session's bounded outbox. It never awaits and never touches a socket; a
//! session whose outbox overflows is told to close with 4500.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};

use crate::broker::state::Snapshot;
use crate::event::{self, Prepared};
use crate::resume::Tail;
use crate::schema::Policy;
use crate::session::{Scope, Session};

/// Redis channel carrying a project's live events.
pub fn project_channel(project: &str) -> String {
    format!("project:{project}:events")
}

/// The project of a `project:{id}:events` channel.
pub fn channel_project(channel: &str) -> Option<&str> {
    channel
        .strip_prefix("project:")
        .and_then(|rest| rest.strip_suffix(":events"))
        .filter(|p| !p.is_empty())
}

/// Capacity of the hub → subscription manager queue. Each entry is one channel name
/// (≤ ~150 B with the project id capped at 128) and a oneshot: at most ~2 MiB queued.
/// In practice it holds one entry per handshake or `subscribe` in flight (each waits for its
/// confirmation), plus one per lingering project; when it is full (the manager is stuck in
/// a reconnect or a catch-up) a join fails at once with "broker unavailable" instead of
/// growing a queue, and an unsubscribe is retried after another linger period.
pub const SUB_QUEUE: usize = 8192;

/// Requests from the hub to the broker's subscription manager, in decision order.
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

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the broker could not subscribe to the project channel")]
    SubscribeFailed,
}

#[derive(Default)]
struct Slot {
    sessions: Vec<Arc<Session>>,
    /// Bumped on every join, so a pending linger timer knows it is stale.
    generation: u64,
    /// Highest seq delivered here: where to catch up from after a broker outage.
    last_seq: AtomicU64,
    /// After a catch-up, live duplicates up to this seq are dropped (0 = none); cleared by
    /// the first newer event so a restarted seq (new epoch) is never suppressed.
    dedupe_upto: AtomicU64,
    /// Recent events kept for resuming clients (see `resume.rs`).
    tail: Arc<parking_lot::Mutex<Tail>>,
    /// The history epoch this instance last saw for the project.
    epoch: parking_lot::Mutex<Option<String>>,
    /// The last status snapshot read, with when; valid while no newer event arrived.
    snapshot: parking_lot::Mutex<Option<(std::time::Instant, Arc<Snapshot>)>>,
}

#[derive(Default)]
pub struct HubStats {
    pub delivered: AtomicU64,
    pub conflated: AtomicU64,
    pub slow_closes: AtomicU64,
}

pub struct Hub {
    projects: RwLock<HashMap<String, Slot>>,
    sessions: RwLock<HashMap<String, Arc<Session>>>,
    subs: Option<mpsc::Sender<SubCommand>>,
    linger: Duration,
    /// Typed checks for events arriving from the broker.
    policy: Policy,
    pub stats: HubStats,
    pub metrics: crate::metrics::Metrics,
}

impl Hub {
    /// `subs` is the broker's subscription manager (None for the in-memory broker, which
    /// delivers straight into the hub).
    pub fn new(
        subs: Option<mpsc::Sender<SubCommand>>,
        linger: Duration,
        policy: Policy,
    ) -> Arc<Self> {
        Arc::new(Self {
            projects: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            subs,
            linger,
            policy,
            stats: HubStats::default(),
            metrics: Default::default(),
        })
    }

    /// Registers a session (for heartbeats, broadcast and shutdown).
    pub fn register(&self, session: &Arc<Session>) {
        self.sessions
            .write()
            .insert(session.client_id.clone(), session.clone());
    }

    /// Adds `session` to `project` and waits until this instance receives the project's
    /// events. On error the session is not in the project. Callers bound the wait
    /// ([`crate::app::App::join_project`]): the manager may be busy reconnecting.
    pub async fn join(
        self: &Arc<Self>,
        project: &str,
        session: &Arc<Session>,
    ) -> Result<(), HubError> {
        let confirmed = {
            let mut projects = self.projects.write();
            let slot = projects.entry(project.to_owned()).or_default();
            if !slot.sessions.iter().any(|s| Arc::ptr_eq(s, session)) {
                slot.sessions.push(session.clone());
            }
            slot.generation += 1;
            match &self.subs {
                None => None,
                Some(tx) => {
                    let (done, rx) = oneshot::channel();
                    // try_send under the lock keeps the manager's view in decision order;
                    // a full queue fails this join now (dropping `done` answers "no").
                    let _ = tx.try_send(SubCommand::Subscribe {
                        channel: project_channel(project),
                        done,
                    });
                    Some(rx)
                }
            }
        };
        if let Some(rx) = confirmed {
            if !rx.await.unwrap_or(false) {
                self.leave(project, session);
                return Err(HubError::SubscribeFailed);
            }
        }
        Ok(())
    }

    /// Removes `session` from `project`; the channel is dropped after the linger time if
    /// nobody rejoined.
    pub fn leave(self: &Arc<Self>, project: &str, session: &Arc<Session>) {
        let generation = {
            let mut projects = self.projects.write();
            let Some(slot) = projects.get_mut(project) else {
                return;
            };
            slot.sessions.retain(|s| !Arc::ptr_eq(s, session));
            if !slot.sessions.is_empty() {
                return;
            }
            slot.generation
        };
        let hub = self.clone();
        let project = project.to_owned();
        let linger = self.linger;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(linger).await;
                if hub.reap(&project, generation) {
                    break;
                }
            }
        });
    }

    /// Drops an idle project's slot and channel. Returns false when the unsubscribe could
    /// not be queued (queue full): the slot stays, and the caller tries again later.
    fn reap(&self, project: &str, generation: u64) -> bool {
        let mut projects = self.projects.write();
        let idle = projects
            .get(project)
            .is_some_and(|s| s.sessions.is_empty() && s.generation == generation);
        if !idle {
            return true;
        }
        if let Some(tx) = &self.subs {
            let queued = tx.try_send(SubCommand::Unsubscribe {
                channel: project_channel(project),
            });
            if let Err(mpsc::error::TrySendError::Full(_)) = queued {
                return false;
            }
        }
        projects.remove(project);
        true
    }

    /// Forgets a session entirely (after it ended).
    pub fn unregister(self: &Arc<Self>, session: &Arc<Session>) {
        for project in session.projects() {
            self.leave(&project, session);
        }
        self.sessions.write().remove(&session.client_id);
    }

    /// The resume tail of a project this instance listens to.
    pub fn tail(&self, project: &str) -> Option<Arc<parking_lot::Mutex<Tail>>> {
        self.projects.read().get(project).map(|s| s.tail.clone())
    }

    /// Highest seq delivered for `project` (0 if none).
    pub fn last_seq(&self, project: &str) -> u64 {
        self.projects
            .read()
            .get(project)
            .map(|s| s.last_seq.load(Ordering::Acquire))
            .unwrap_or(0)
    }

    /// After a catch-up delivered everything up to `upto`, drop live copies of those.
    pub fn dedupe_until(&self, project: &str, upto: u64) {
        if let Some(slot) = self.projects.read().get(project) {
            slot.dedupe_upto.store(upto, Ordering::Release);
            slot.last_seq.fetch_max(upto, Ordering::AcqRel);
        }
    }

    /// Resets a project's position after its history started again (new epoch), once its
    /// sessions were sent a `status` snapshot at `seq`.
    pub fn reset_position(&self, project: &str, seq: u64, epoch: &str) {
        if let Some(slot) = self.projects.read().get(project) {
            slot.last_seq.store(seq, Ordering::Release);
            // Live events of the new epoch published between our resubscription and the
            // snapshot read are still waiting in the pub/sub stream; the snapshot already
            // reflects them, so delivering them after it would show those clients seqs at
            // or below the snapshot's (found by tests/faults.rs, Redis restarted empty).
            // Drop them like the duplicates of a catch-up: the first newer event ends it.
            slot.dedupe_upto.store(seq, Ordering::Release);
            *slot.epoch.lock() = Some(epoch.to_owned());
        }
    }

    /// Records the project's epoch as seen by a greeting (first one wins).
    pub fn note_epoch(&self, project: &str, epoch: &str) {
        if let Some(slot) = self.projects.read().get(project) {
            let mut known = slot.epoch.lock();
            if known.is_none() {
                *known = Some(epoch.to_owned());
            }
        }
    }

    pub fn epoch(&self, project: &str) -> Option<String> {
        self.projects
            .read()
            .get(project)
            .and_then(|s| s.epoch.lock().clone())
    }

    /// A recent snapshot of `project` still current here: no event with a newer seq was
    /// delivered since it was read (state only changes through seq'd events). Saves one
    /// broker read per connect in a connect storm.
    pub fn cached_snapshot(&self, project: &str, max_age: Duration) -> Option<Arc<Snapshot>> {
        let projects = self.projects.read();
        let slot = projects.get(project)?;
        let cached = slot.snapshot.lock();
        let (at, snap) = cached.as_ref()?;
        let current = slot.last_seq.load(Ordering::Acquire) <= snap.seq;
        (current && at.elapsed() < max_age).then(|| snap.clone())
    }

    pub fn cache_snapshot(&self, project: &str, snap: Arc<Snapshot>) {
        if let Some(slot) = self.projects.read().get(project) {
            *slot.snapshot.lock() = Some((std::time::Instant::now(), snap));
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sessions currently in `project`.
    pub fn project_sessions(&self, project: &str) -> Vec<Arc<Session>> {
        self.projects
            .read()
            .get(project)
            .map(|s| s.sessions.clone())
            .unwrap_or_default()
    }

    /// Forgets every tail (the live stream may have had a gap, e.g. a broker outage).
    pub fn invalidate_tails(&self) {
        for slot in self.projects.read().values() {
            slot.tail.lock().reset();
        }
    }

    /// Projects this instance is subscribed to (for resubscription after a reconnect).
    pub fn active_projects(&self) -> Vec<String> {
        self.projects.read().keys().cloned().collect()
    }

    /// Projects with at least one connected client.
    pub fn project_count(&self) -> usize {
        self.projects
            .read()
            .values()
            .filter(|s| !s.sessions.is_empty())
            .count()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.read().len()
    }

    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.read().values().cloned().collect()
    }

    /// Fans one prepared event out to every session of `project`. Never awaits.
    pub fn deliver(&self, project: &str, prepared: &Prepared) -> usize {
        self.deliver_batch(project, std::slice::from_ref(prepared))
    }

    /// Fans out events of one project that arrived together (one broker read), in order.
    /// Their frames are joined into one buffer, so each session gets one write (one
    /// syscall) for the whole batch rather than one per event. Sessions still preparing
    /// their greeting get the events one by one (their gate deduplicates by seq).
    pub fn deliver_batch(&self, project: &str, batch: &[Prepared]) -> usize {
        let projects = self.projects.read();
        let Some(slot) = projects.get(project) else {
            return 0;
        };
        let mut events: Vec<&Prepared> = Vec::with_capacity(batch.len());
        // Held until every session has been offered the batch: a resuming session served
        // from the tail (`resume::greet_resume`) must not see an event there before the
        // event reached its gate, or the event would arrive once in the replay and once
        // more, live, after the gate opened (a duplicate seen behind nginx when one
        // instance drained into the other while events flowed).
        let mut tail = slot.tail.lock();
        for prepared in batch {
            if let Some(seq) = prepared.seq {
                let upto = slot.dedupe_upto.load(Ordering::Acquire);
                if upto > 0 {
                    if seq <= upto {
                        continue;
                    }
                    slot.dedupe_upto.store(0, Ordering::Release);
                }
                slot.last_seq.fetch_max(seq, Ordering::AcqRel);
                tail.record(prepared);
            }
            events.push(prepared);
        }
        let joined = match events.as_slice() {
            [] => return 0,
            [_] => None,
            many => {
                let mut buf =
                    bytes::BytesMut::with_capacity(many.iter().map(|p| p.frame.len()).sum());
                for p in many {
                    buf.extend_from_slice(&p.frame);
                }
                Some(buf.freeze())
            }
        };
        for session in &slot.sessions {
            // Joined frames only go to a session with nothing queued (they will most likely
            // be written at once); one with a backlog gets them one by one so its progress
            // events stay conflatable, and one still greeting (or just greeted) gets them one
            // by one so it can drop those its greeting covered.
            let direct =
                !session.is_gated() && !session.greeting_pending() && session.outbox.is_empty();
            match (&joined, direct) {
                (Some(frames), true) => {
                    session.offer_event(frames.clone(), None, None, &self.stats)
                }
                _ => {
                    let own = session.greeted_project(project);
                    for p in &events {
                        let seq = p.seq.filter(|_| own);
                        session.offer_event(p.frame.clone(), p.conflate, seq, &self.stats);
                    }
                }
            }
        }
        drop(tail);
        let n = slot.sessions.len() * events.len();
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Checks and fans out a raw payload from the broker's project channel.
    pub fn deliver_raw(&self, project: &str, payload: &[u8]) -> Result<usize, event::EventError> {
        let prepared = event::prepare_project_event(project, payload, Some(&self.policy))?;
        Ok(self.deliver(project, &prepared))
    }

    /// Sends a global event to every session, with each session's own project filled in.
    /// The frame is encoded once per distinct scope, not once per session.
    pub fn broadcast(&self, event: &Map<String, Value>) -> usize {
        let sessions = self.sessions();
        let mut frames: HashMap<String, Bytes> = HashMap::new();
        for session in &sessions {
            let key = session.scope_key();
            let frame = frames
                .entry(key)
                .or_insert_with(|| {
                    let mut ev = event.clone();
                    session.fill_scope(&mut ev);
                    fill_timestamp(&mut ev);
                    event::server_frame(&Value::Object(ev))
                })
                .clone();
            session.offer_event(frame, None, None, &self.stats);
        }
        self.stats
            .delivered
            .fetch_add(sessions.len() as u64, Ordering::Relaxed);
        sessions.len()
    }

    /// Parses a payload from `websocket:broadcast` and routes it as the seed's
    /// `_handle_redis_event` does (docs/protocol.md §3): an event naming a `project_id` goes to the
    /// connections following that project only (once each, `/ws/user` ones included) and
    /// keeps its `project_id`; one without goes to every connection, each with its own.
    pub fn broadcast_raw(&self, payload: &[u8]) -> Result<usize, event::EventError> {
        let (target, map) = self.check_global(payload)?;
        Ok(match target {
            None => self.broadcast(&map),
            Some(project) => {
                let prepared = Prepared {
                    frame: event::server_frame(&Value::Object(map)),
                    conflate: None,
                    seq: None,
                };
                self.deliver(&project, &prepared)
            }
        })
    }

    /// The checks of a global event: its project (None: every project) and its fields,
    /// with `seq` removed (only the publish path assigns one, docs/protocol.md §3) and a
    /// `timestamp` set where it had none.
    fn check_global(
        &self,
        payload: &[u8],
    ) -> Result<(Option<String>, Map<String, Value>), event::EventError> {
        event::check_depth(payload, &self.policy)?;
        let value: Value =
            serde_json::from_slice(payload).map_err(|_| event::EventError::NotJson)?;
        let Value::Object(mut map) = value else {
            return Err(event::EventError::NotObject);
        };
        let Some(Value::String(kind)) = map.get("type") else {
            return Err(event::EventError::MissingType);
        };
        let kind = kind.clone();
        let target = match map.get("project_id") {
            None => None,
            Some(Value::Null) => {
                map.remove("project_id");
                None
            }
            Some(Value::String(p)) if crate::project::valid_project_id(p) => Some(p.clone()),
            Some(_) => return Err(event::EventError::BadProjectId),
        };
        map.remove("seq");
        let value = Value::Object(map);
        self.policy.check_global_value(&kind, &value)?;
        let Value::Object(mut map) = value else {
            return Err(event::EventError::NotObject);
        };
        fill_timestamp(&mut map);
        Ok((target, map))
    }
}

/// The gateway's own timestamp where a global event has none, or a null or any other
/// non-string one (docs/protocol.md §8).
fn fill_timestamp(map: &mut Map<String, Value>) {
    if !matches!(map.get("timestamp"), Some(Value::String(_))) {
        map.insert("timestamp".into(), Value::String(event::now_rfc3339()));
    }
}

impl Scope {
    fn key(&self) -> String {
        match self {
            Scope::Project(p) => p.clone(),
            Scope::User => String::from("\0user"),
        }
    }
}

impl Session {
    fn scope_key(&self) -> String {
        match &self.scope {
            Scope::User => format!("\0user:{}", self.projects().join(",")),
            s => s.key(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::Limits;

    const STRICT: Policy = Policy {
        allow_unknown_types: false,
        max_json_depth: 64,
    };

    fn session(project: &str) -> Arc<Session> {
        Session::new_for_test(
            project,
            Limits {
                messages: 8,
                bytes: 1 << 16,
            },
        )
    }

    #[test]
    fn channel_names_round_trip() {
        assert_eq!(channel_project(&project_channel("a.b-c")), Some("a.b-c"));
        assert_eq!(channel_project("websocket:broadcast"), None);
    }

    #[tokio::test]
    async fn events_reach_only_their_project() {
        let hub = Hub::new(None, Duration::from_millis(10), STRICT);
        let a = session("a");
        let b = session("b");
        hub.register(&a);
        hub.register(&b);
        hub.join("a", &a).await.unwrap();
        hub.join("b", &b).await.unwrap();
        let n = hub.deliver_raw("a", br#"{"type":"file.changed"}"#).unwrap();
        assert!(hub
            .deliver_raw("a", br#"{"type":"node.state.updated","node_id":"n"}"#)
            .is_err());
        assert_eq!(n, 1);
        assert_eq!(a.outbox.len().0, 1);
        assert_eq!(b.outbox.len().0, 0);
        assert!(hub
            .deliver_raw("a", br#"{"type":"x","project_id":"b"}"#)
            .is_err());
        assert_eq!(b.outbox.len().0, 0);
    }

    /// The JSON payloads queued for `s` (frames are unmasked text frames).
    fn queued(s: &Session) -> Vec<Value> {
        let (frames, _) = s.outbox.take_all();
        frames
            .iter()
            .map(|f| {
                let start = match f[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                serde_json::from_slice(&f[start..]).unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn global_events_naming_a_project_reach_only_its_followers() {
        let hub = Hub::new(None, Duration::from_millis(10), STRICT);
        let a = session("a");
        let b = session("b");
        for (s, p) in [(&a, "a"), (&b, "b")] {
            hub.register(s);
            hub.join(p, s).await.unwrap();
        }
        // `a` also follows `b` (subscribe): it gets b's event once, labelled b.
        a.add_project("b", 8).unwrap();
        hub.join("b", &a).await.unwrap();
        let n = hub
            .broadcast_raw(br#"{"type":"file.changed","project_id":"b","seq":99}"#)
            .unwrap();
        assert_eq!(n, 2);
        for s in [&a, &b] {
            let got = queued(s);
            assert_eq!(got.len(), 1, "{got:?}");
            assert_eq!(got[0]["project_id"], "b");
            assert!(got[0].get("seq").is_none(), "raw seq is never passed on");
        }
        let c = session("c");
        hub.register(&c);
        hub.join("c", &c).await.unwrap();
        assert_eq!(
            hub.broadcast_raw(br#"{"type":"file.changed","project_id":"a"}"#)
                .unwrap(),
            1
        );
        assert!(queued(&c).is_empty() && queued(&b).is_empty());
        assert_eq!(queued(&a)[0]["project_id"], "a");
        // Without project_id: everyone, each with its own project.
        assert_eq!(hub.broadcast_raw(br#"{"type":"file.changed"}"#).unwrap(), 3);
        assert_eq!(queued(&c)[0]["project_id"], "c");
        for bad in [
            &br#"{"type":"file.changed","project_id":".."}"#[..],
            br#"{"type":"file.changed","project_id":7}"#,
            br#"{"type":"file.changed","project_id":"a/b"}"#,
        ] {
            assert_eq!(
                hub.broadcast_raw(bad).unwrap_err(),
                event::EventError::BadProjectId
            );
        }
    }

    #[tokio::test]
    async fn a_full_subscription_queue_fails_a_join_at_once() {
        // A manager that never reads (stuck reconnecting): the queue holds one request.
        let (tx, _rx) = mpsc::channel(1);
        let hub = Hub::new(Some(tx), Duration::from_millis(10), STRICT);
        let (a, b) = (session("p"), session("q"));
        let waiting = tokio::time::timeout(Duration::from_millis(100), hub.join("p", &a)).await;
        assert!(
            waiting.is_err(),
            "the first join waits for its confirmation"
        );
        let failed = tokio::time::timeout(Duration::from_millis(100), hub.join("q", &b)).await;
        assert!(matches!(failed, Ok(Err(HubError::SubscribeFailed))));
        assert!(hub.project_sessions("q").is_empty());
    }

    /// The hub's whole conversation with the subscription manager, in order: every join
    /// asks (Subscribe is idempotent: the manager's `wanted` set makes it one Redis
    /// SUBSCRIBE, and each join waits for its own confirmation), and the last leave
    /// unsubscribes exactly once, after the linger, unless someone rejoined meanwhile.
    #[tokio::test]
    async fn subscription_is_reference_counted_with_linger() {
        const LINGER: Duration = Duration::from_millis(300);
        const SUB: &str = "+project:p:events";
        const UNSUB: &str = "-project:p:events";
        let (tx, mut rx) = mpsc::channel(SUB_QUEUE);
        let hub = Hub::new(Some(tx), LINGER, STRICT);
        let log = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
        let recorder = log.clone();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    SubCommand::Subscribe { channel, done } => {
                        recorder.lock().push(format!("+{channel}"));
                        let _ = done.send(true);
                    }
                    SubCommand::Unsubscribe { channel } => {
                        recorder.lock().push(format!("-{channel}"));
                    }
                }
            }
        });
        let commands = || log.lock().clone();
        // Past a linger: long enough for a wrong unsubscribe to show.
        let window = || tokio::time::sleep(LINGER * 3 / 2);

        let a = session("p");
        let b = session("p");
        hub.join("p", &a).await.unwrap();
        hub.join("p", &b).await.unwrap();
        assert_eq!(commands(), [SUB, SUB]);

        // One of two leaves: no unsubscribe, however long we wait.
        hub.leave("p", &a);
        window().await;
        assert_eq!(commands(), [SUB, SUB], "unsubscribed while b remains");
        assert_eq!(hub.project_count(), 1);

        // The last one leaves and a session rejoins within the linger: nothing is dropped.
        hub.leave("p", &b);
        hub.join("p", &a).await.unwrap();
        window().await;
        assert_eq!(
            commands(),
            [SUB, SUB, SUB],
            "a rejoin within the linger must cancel the unsubscribe"
        );
        assert_eq!(hub.project_count(), 1);

        // The last one leaves, comes back and leaves again: the linger counts from the last
        // leave (the first one's timer must not fire for it), and exactly one unsubscribe
        // follows.
        hub.leave("p", &a);
        tokio::time::sleep(LINGER / 10).await;
        hub.join("p", &a).await.unwrap();
        let left = std::time::Instant::now();
        hub.leave("p", &a);
        let deadline = left + Duration::from_secs(5);
        while commands().len() < 5 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            left.elapsed() >= LINGER,
            "unsubscribed {:?} after the last leave, before the linger",
            left.elapsed()
        );
        window().await;
        assert_eq!(commands(), [SUB, SUB, SUB, SUB, UNSUB]);
        assert_eq!(hub.project_count(), 0);
        assert!(hub.active_projects().is_empty());
    }

    #[tokio::test]
    async fn live_events_covered_by_a_resync_snapshot_are_dropped() {
        let hub = Hub::new(None, Duration::from_millis(10), STRICT);
        let s = session("p");
        hub.join("p", &s).await.unwrap();
        // The sessions were just sent a snapshot at seq 5 of a new epoch.
        hub.reset_position("p", 5, "e2");
        for seq in [4, 5, 6, 7] {
            let ev = format!(r#"{{"type":"file.changed","seq":{seq}}}"#);
            hub.deliver_raw("p", ev.as_bytes()).unwrap();
        }
        assert_eq!(s.outbox.len().0, 2, "only seqs 6 and 7 follow the snapshot");
        assert_eq!(hub.last_seq("p"), 7);
    }

    #[tokio::test]
    async fn late_live_copies_of_greeted_events_are_dropped() {
        let hub = Hub::new(None, Duration::from_millis(10), STRICT);
        let s = session("p");
        s.close_gate();
        hub.join("p", &s).await.unwrap();
        s.add_project("q", usize::MAX).unwrap();
        hub.join("q", &s).await.unwrap();
        // A replay covered seqs up to 8; their live copies may still come through the hub.
        s.open_gate(Vec::new(), 8, &hub.stats);
        let ev = |p: &str, seq: u64| {
            let raw = format!(r#"{{"type":"file.changed","project_id":"{p}","seq":{seq}}}"#);
            event::prepare_project_event(p, raw.as_bytes(), Some(&STRICT)).unwrap()
        };
        // another project's seqs are not what the greeting covered
        hub.deliver("q", &ev("q", 3));
        assert_eq!(s.outbox.len().0, 1);
        // one broker read with late copies and new events: only the new ones, one by one
        hub.deliver_batch("p", &[ev("p", 7), ev("p", 8), ev("p", 9), ev("p", 10)]);
        assert_eq!(s.outbox.len().0, 3);
        assert!(
            !s.greeting_pending(),
            "the first newer event ends the check"
        );
    }

    #[tokio::test]
    async fn overflow_closes_the_slow_session_only() {
        let hub = Hub::new(None, Duration::from_millis(10), STRICT);
        let slow = session("p");
        let ok = Session::new_for_test(
            "p",
            Limits {
                messages: 1000,
                bytes: 1 << 20,
            },
        );
        hub.join("p", &slow).await.unwrap();
        hub.join("p", &ok).await.unwrap();
        for i in 0..20 {
            let ev = format!(r#"{{"type":"file.changed","n":{i}}}"#);
            hub.deliver_raw("p", ev.as_bytes()).unwrap();
        }
        assert!(slow.outbox.is_closing());
        assert!(!ok.outbox.is_closing());
        assert_eq!(ok.outbox.len().0, 20);
        assert_eq!(hub.stats.slow_closes.load(Ordering::Relaxed), 1);
    }
}
