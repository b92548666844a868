//! The hub: which sessions of this instance follow which project, and fan-out. Nothing else.
//!
//! Each active project has one slot: its members (sessions) and its
//! [`ProjectStream`], which owns everything about seqs. The
//! first member of a project asks the broker to subscribe to `project:{id}:events`; when
//! the last one leaves, the subscription lingers for `redis.unsubscribe_linger_ms` (a page
//! reload must not churn SUBSCRIBE/UNSUBSCRIBE) and is then dropped. Subscription requests
//! are sent in the same critical section that changes the slot, so the broker sees
//! subscribe and unsubscribe for a channel in the order the hub decided them.
//!
//! Fan-out ([`Hub::deliver_batch`], the broker's [`Sink`]) admits a batch through the
//! project's stream and hands the prebuilt frames to every member: inline with one runtime
//! worker, through the fan-out shards (`shard`, one per worker, each writing its own
//! members' sockets) with more. It never awaits a socket; a session whose outbox overflows
//! is told to close with 4500. Global events for every session run on a broadcast task in
//! time slices past a thousand sessions (`global`).
//!
//! A member joins either open or holding. A holding member (a new connection whose
//! greeting is being prepared) keeps the project's live events, seqs and all, until
//! [`Hub::release`] gives it the seq its greeting covered: the held events at or below it
//! are dropped, the rest follow the greeting in order, and later live copies at or below it
//! are dropped until the first newer event. That per-member filter is the hub's only use of
//! seqs; what the seq means is the stream's business.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::broker::state::Snapshot;
use crate::broker::{Broker, Family, Sink, SubCommand};
use crate::event::{self, Prepared};
use crate::metrics::{DeliveryStats, Metrics};
use crate::schema::types::ConnectionResyncRequired;
use crate::schema::Policy;
use crate::session::Session;
use crate::stream::{ProjectStream, Recovery, StreamContext};
use crate::wheel::Wheel;
use member::{Holds, Member};
use shard::Shards;

mod backlog;
mod global;
mod member;
mod shard;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the broker could not subscribe to the project channel")]
    SubscribeFailed,
}

/// A registered session's key: its address, stable while it is registered (the map holds
/// a reference).
fn session_key(session: &Arc<Session>) -> usize {
    Arc::as_ptr(session) as usize
}

/// The channel family a session's ids belong to.
pub fn family_of(session: &Session) -> Family {
    if session.is_story() {
        Family::Story
    } else if session.is_commands() {
        Family::Commands
    } else {
        Family::Project
    }
}

struct Slot {
    members: Members,
    /// What the members still greeting hold (see `member`).
    holds: Holds,
    /// Bumped on every join, so a pending linger timer knows it is stale.
    generation: u64,
    /// The project's stream; None for a story (its progress has no seq: the latest is
    /// read from the broker when a connection starts).
    stream: Option<Arc<ProjectStream>>,
}

impl Slot {
    /// The member of `session`, searched from the newest: a greeting releases a member
    /// that joined moments ago (in a connect storm, one of the last few of thousands).
    fn member(&self, session: &Arc<Session>) -> Option<&Member> {
        self.members
            .shard(shard::of(session, self.members.0.len()))
            .iter()
            .rev()
            .find(|m| Arc::ptr_eq(&m.session, session))
    }
}

/// A slot's members, one list per fan-out shard (`shard`): each shard's task writes to its
/// own list's sessions.
struct Members(Vec<Vec<Member>>);

impl Members {
    fn new(shards: usize) -> Self {
        Self((0..shards.max(1)).map(|_| Vec::new()).collect())
    }

    fn push(&mut self, member: Member) {
        let k = shard::of(&member.session, self.0.len());
        self.0[k].push(member);
    }

    fn shard(&self, k: usize) -> &[Member] {
        &self.0[k]
    }

    fn iter(&self) -> impl Iterator<Item = &Member> {
        self.0.iter().flatten()
    }

    fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }

    fn remove(&mut self, session: &Arc<Session>) {
        let k = shard::of(session, self.0.len());
        self.0[k].retain(|m| !Arc::ptr_eq(&m.session, session));
    }
}

pub struct Hub {
    projects: RwLock<HashMap<String, Slot>>,
    /// Story progress slots (docs/protocol.md §9): the same registry, another family.
    stories: RwLock<HashMap<String, Slot>>,
    /// Registered sessions that are story connections (for the `kind` metric label).
    /// Sessions by kind past the project service's: story sockets, command streams.
    story_sessions: std::sync::atomic::AtomicUsize,
    command_sessions: std::sync::atomic::AtomicUsize,
    /// Command streams by project (docs/protocol.md §6).
    commands: RwLock<HashMap<String, Slot>>,
    /// Registered sessions by address (`session_key`): no copy of the client id per
    /// connection (issue 13, memory per connection).
    sessions: RwLock<HashMap<usize, Arc<Session>>>,
    /// When each registered session next needs the shared timer (`crate::heartbeat`).
    timers: Wheel<Session>,
    /// Fan-out shards, one per worker thread (`shard`).
    shards: Shards,
    /// The broadcast task's queue (`global`; None outside a runtime).
    broadcasts: Option<global::Broadcasts>,
    subs: Option<mpsc::Sender<SubCommand>>,
    linger: Duration,
    /// Typed checks for global events.
    policy: Policy,
    /// What every project stream shares (bounds, policy, metrics).
    streams: Arc<StreamContext>,
    pub stats: DeliveryStats,
    pub metrics: Arc<Metrics>,
}

impl Hub {
    /// `subs` is the broker's subscription manager (None for the in-memory broker, which
    /// delivers every project's events without subscriptions).
    pub fn new(
        subs: Option<mpsc::Sender<SubCommand>>,
        linger: Duration,
        streams: StreamContext,
    ) -> Arc<Self> {
        let (shards, receivers) = Shards::for_runtime();
        let hub = Arc::new_cyclic(|weak| Self {
            broadcasts: global::Broadcasts::start(weak.clone()),
            projects: RwLock::new(HashMap::new()),
            stories: RwLock::new(HashMap::new()),
            story_sessions: std::sync::atomic::AtomicUsize::new(0),
            command_sessions: std::sync::atomic::AtomicUsize::new(0),
            commands: RwLock::new(HashMap::new()),
            sessions: RwLock::new(HashMap::new()),
            timers: Wheel::new(event::unix_millis() / 1000),
            shards,
            subs,
            linger,
            policy: streams.policy,
            metrics: streams.metrics.clone(),
            streams: Arc::new(streams),
            stats: DeliveryStats::default(),
        });
        for (k, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(shard::run(Arc::downgrade(&hub), k, rx));
        }
        hub
    }

    /// A hub with default stream bounds and its own metrics (tests, benches).
    pub fn standalone(policy: Policy) -> Arc<Self> {
        Self::new(
            None,
            Duration::from_millis(10),
            StreamContext {
                tail_len: 10_000,
                tail_bytes: 16 << 20,
                policy,
                metrics: Default::default(),
            },
        )
    }

    /// Registers a session (for heartbeats, broadcast and shutdown).
    pub fn register(&self, session: &Arc<Session>) {
        let fresh = self
            .sessions
            .write()
            .insert(session_key(session), session.clone())
            .is_none();
        if fresh && session.is_story() {
            self.story_sessions.fetch_add(1, Ordering::Relaxed);
        }
        if fresh && session.is_commands() {
            self.command_sessions.fetch_add(1, Ordering::Relaxed);
        }
        if fresh {
            // First looked at by the shared timer next second; it then decides when next.
            let now = event::unix_millis() / 1000;
            self.timers.schedule(session, now + 1, now);
        }
    }

    /// The shared timer's wheel: when each registered session is next due.
    pub fn timers(&self) -> &Wheel<Session> {
        &self.timers
    }

    /// Asks the shared timer to look at `session` at second `at` (UNIX) as well: for a
    /// deadline that moved earlier than the one it is scheduled for (a refreshed
    /// credential expiring sooner).
    pub fn check_at(&self, session: &Arc<Session>, at: u64) {
        // A second the timer may have handled already would wait a whole turn of the wheel.
        let now = event::unix_millis() / 1000;
        self.timers.once(session, at.max(now + 1), now);
    }

    /// The slots of one channel family (each family has its own id namespace).
    fn slots(&self, family: Family) -> &RwLock<HashMap<String, Slot>> {
        match family {
            Family::Project => &self.projects,
            Family::Story => &self.stories,
            Family::Commands => &self.commands,
        }
    }

    /// Adds `session` to `project` (see [`Hub::join_in`]).
    pub async fn join(
        self: &Arc<Self>,
        project: &str,
        session: &Arc<Session>,
        holding: bool,
    ) -> Result<(), HubError> {
        self.join_in(Family::Project, project, session, holding)
            .await
    }

    /// Adds `session` to `id` of `family` and waits until this instance receives its
    /// channel. A `holding` member keeps what arrives until [`Hub::release`]. On error the
    /// session is not in it. Callers bound the wait (`App::join_project`): the manager may
    /// be busy reconnecting.
    pub async fn join_in(
        self: &Arc<Self>,
        family: Family,
        project: &str,
        session: &Arc<Session>,
        holding: bool,
    ) -> Result<(), HubError> {
        let confirmed = {
            let mut projects = self.slots(family).write();
            let slot = projects.entry(project.to_owned()).or_insert_with(|| Slot {
                members: Members::new(self.shards.count()),
                holds: Holds::default(),
                generation: 0,
                stream: (family == Family::Project)
                    .then(|| Arc::new(ProjectStream::new(project, self.streams.clone()))),
            });
            // Callers join a session to a project once: the session's own project list is
            // the guard (the handshake joins distinct projects, `subscribe` only a project
            // it added). No scan here: in a connect storm it made every join O(members).
            debug_assert!(slot.member(session).is_none(), "joined {project} twice");
            slot.members.push(Member::new(session.clone(), holding));
            slot.generation += 1;
            match &self.subs {
                None => None,
                Some(tx) => {
                    let (done, rx) = oneshot::channel();
                    // try_send under the lock keeps the manager's view in decision order;
                    // a full queue fails this join now (dropping `done` answers "no").
                    let _ = tx.try_send(SubCommand::Subscribe {
                        channel: family.channel(project),
                        done,
                    });
                    Some(rx)
                }
            }
        };
        if let Some(rx) = confirmed {
            if !rx.await.unwrap_or(false) {
                self.leave_in(family, project, session);
                return Err(HubError::SubscribeFailed);
            }
        }
        Ok(())
    }

    /// Ends the holds of `session`'s memberships after its greeting: `front` (the
    /// greeting's frames) goes out first, then each project's held events except those at
    /// or below `covered(project)`. For a story socket `covered(story)` is instead the
    /// `member::frame_hash` of the progress frame the greeting sent for it (0: none): its
    /// copies are dropped (see `Member::release_story`); use [`Hub::story_sent`].
    pub fn release(
        &self,
        session: &Arc<Session>,
        front: Vec<Bytes>,
        covered: impl Fn(&str) -> u64,
    ) {
        // Nothing of a holding membership reaches the outbox before its release, so the
        // greeting is first whatever fan-out does meanwhile.
        session.greet(front, &self.stats);
        let story = session.is_story();
        let projects = self.slots(family_of(session)).read();
        for project in session.projects() {
            if let Some(slot) = projects.get(&project) {
                if let Some(member) = slot.member(session) {
                    if story {
                        member.release_story(covered(&project), &slot.holds, &self.stats);
                    } else {
                        member.release(covered(&project), &slot.holds, &self.stats);
                    }
                }
            }
        }
    }

    /// What a story greeting passes as `covered` to [`Hub::release`] for a story whose
    /// progress frame it sent.
    pub fn story_sent(frame: &[u8]) -> u64 {
        member::frame_hash(frame)
    }

    /// Removes `session` from `project` (see [`Hub::leave_in`]).
    pub fn leave(self: &Arc<Self>, project: &str, session: &Arc<Session>) {
        self.leave_in(Family::Project, project, session)
    }

    /// Removes `session` from `id` of `family`; the channel is dropped after the linger
    /// time if nobody rejoined.
    pub fn leave_in(self: &Arc<Self>, family: Family, project: &str, session: &Arc<Session>) {
        let generation = {
            let mut projects = self.slots(family).write();
            let Some(slot) = projects.get_mut(project) else {
                return;
            };
            slot.members.remove(session);
            // Left before its greeting was out (a failed handshake): nothing to keep.
            slot.holds.lock().remove(&(Arc::as_ptr(session) as usize));
            if !slot.members.is_empty() {
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
                if hub.reap(family, &project, generation) {
                    break;
                }
            }
        });
    }

    /// Drops an idle project's slot and channel. Returns false when the unsubscribe could
    /// not be queued (queue full): the slot stays, and the caller tries again later.
    fn reap(&self, family: Family, project: &str, generation: u64) -> bool {
        let mut projects = self.slots(family).write();
        let idle = projects
            .get(project)
            .is_some_and(|s| s.members.is_empty() && s.generation == generation);
        if !idle {
            return true;
        }
        if let Some(tx) = &self.subs {
            let queued = tx.try_send(SubCommand::Unsubscribe {
                channel: family.channel(project),
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
        let family = family_of(session);
        for id in session.projects() {
            self.leave_in(family, &id, session);
        }
        let removed = self
            .sessions
            .write()
            .remove(&session_key(session))
            .is_some();
        if removed && session.is_story() {
            self.story_sessions.fetch_sub(1, Ordering::Relaxed);
        }
        if removed && session.is_commands() {
            self.command_sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The stream of a project this instance follows.
    pub fn stream(&self, project: &str) -> Option<Arc<ProjectStream>> {
        self.projects
            .read()
            .get(project)
            .and_then(|s| s.stream.clone())
    }

    /// Highest seq delivered for `project` (0 if none).
    pub fn last_seq(&self, project: &str) -> u64 {
        self.stream(project).map_or(0, |s| s.last_seq())
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Sessions currently in `project`.
    pub fn project_sessions(&self, project: &str) -> Vec<Arc<Session>> {
        self.projects
            .read()
            .get(project)
            .map(|s| s.members.iter().map(|m| m.session.clone()).collect())
            .unwrap_or_default()
    }

    /// Projects this instance is subscribed to, with their streams.
    fn streams(&self) -> Vec<(String, Arc<ProjectStream>)> {
        self.projects
            .read()
            .iter()
            .filter_map(|(p, s)| Some((p.clone(), s.stream.clone()?)))
            .collect()
    }

    /// Projects this instance is subscribed to.
    pub fn active_projects(&self) -> Vec<String> {
        self.projects.read().keys().cloned().collect()
    }

    /// Projects with at least one connected client.
    pub fn project_count(&self) -> usize {
        self.projects
            .read()
            .values()
            .filter(|s| !s.members.is_empty())
            .count()
    }

    /// Story progress connections among [`Hub::session_count`] (the `kind` label).
    pub fn story_session_count(&self) -> usize {
        self.story_sessions.load(Ordering::Relaxed)
    }

    /// Workers' command streams among [`Hub::session_count`] (the `kind` label).
    pub fn command_session_count(&self) -> usize {
        self.command_sessions.load(Ordering::Relaxed)
    }

    /// This instance's command streams of `project`.
    pub fn command_streams(&self, project: &str) -> usize {
        self.commands
            .read()
            .get(project)
            .map_or(0, |s| s.members.len())
    }

    /// Every project with command streams here, with their number (for the registry the
    /// Redis broker counts `delivered_to` from).
    pub fn command_stream_counts(&self) -> Vec<(String, usize)> {
        self.commands
            .read()
            .iter()
            .filter(|(_, s)| !s.members.is_empty())
            .map(|(p, s)| (p.clone(), s.members.len()))
            .collect()
    }

    /// Hands one command, as published, to `project`'s command streams here: one frame
    /// for all, never awaited. Returns how many streams got it.
    pub fn deliver_command(&self, project: &str, payload: &[u8]) -> usize {
        let commands = self.commands.read();
        let Some(slot) = commands.get(project) else {
            return 0;
        };
        let command = Prepared {
            frame: crate::ws::frame::text(payload),
            conflate: None,
            seq: None,
            epoch: None,
        };
        for member in slot.members.iter() {
            member.offer(&[&command], None, &slot.holds, &self.stats);
        }
        self.stats
            .delivered
            .fetch_add(slot.members.len() as u64, Ordering::Relaxed);
        slot.members.len()
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
    /// syscall) for the whole batch rather than one per event.
    pub fn deliver_batch(&self, project: &str, batch: &[Prepared]) -> usize {
        let projects = self.projects.read();
        let Some((slot, stream)) = projects
            .get(project)
            .and_then(|slot| Some((slot, slot.stream.as_ref()?)))
        else {
            return 0;
        };
        // Holds the stream's tail until every member has been offered the batch, or (with
        // shards) until it is queued for every shard, so queue order is admission order
        // (see `stream`, `shard`).
        let admitted = stream.admit(batch);
        let joined = match admitted.events.as_slice() {
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
        let n = slot.members.len() * admitted.events.len();
        if self.shards.inline() {
            let events: Vec<&Prepared> = admitted.events.iter().map(|e| e.as_ref()).collect();
            for member in slot.members.iter() {
                member.offer(&events, joined.as_ref(), &slot.holds, &self.stats);
            }
        } else {
            // Shared by every shard: the frames are reference-counted, not copied.
            let events: Arc<[Prepared]> =
                admitted.events.iter().map(|e| e.as_ref().clone()).collect();
            let id: Arc<str> = Arc::from(project);
            for k in 0..self.shards.count() {
                if !slot.members.shard(k).is_empty() {
                    self.shards.send(k, &id, &events, joined.as_ref());
                }
            }
        }
        drop(admitted);
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Runs one shard's part of a batch: offers it to the shard's members of the project,
    /// if it is still followed here (members that joined since are offered it too; a
    /// greeting's seq filter drops what it covered).
    fn offer_shard(&self, k: usize, job: &shard::Job) {
        let slots = self.projects.read();
        let Some(slot) = slots.get(&*job.id) else {
            return;
        };
        let events: Vec<&Prepared> = job.events.iter().collect();
        for member in slot.members.shard(k) {
            member.offer(&events, job.joined.as_ref(), &slot.holds, &self.stats);
        }
    }

    /// Waits while the fan-out shards or the broadcast task have more queued than their
    /// bounds (the broker's reader awaits this between reads; see `shard`, `backlog`).
    pub async fn settled(&self) {
        self.shards.settled().await;
        if let Some(broadcasts) = &self.broadcasts {
            broadcasts.backlog.settled().await;
        }
    }

    /// Batches queued for the fan-out shards and not yet run (tests).
    pub fn shard_backlog(&self) -> usize {
        self.shards.queued()
    }

    /// Fans one story progress frame out to the story's members (no seq, no stream: the
    /// published bytes, framed once). Never awaits.
    pub fn deliver_story(&self, story: &str, frame: &Bytes) -> usize {
        let stories = self.stories.read();
        let Some(slot) = stories.get(story) else {
            return 0;
        };
        let progress = Prepared {
            frame: frame.clone(),
            conflate: None,
            seq: None,
            epoch: None,
        };
        for member in slot.members.iter() {
            member.offer_story(&progress, &slot.holds, &self.stats);
        }
        self.stats
            .delivered
            .fetch_add(slot.members.len() as u64, Ordering::Relaxed);
        slot.members.len()
    }

    /// Checks and fans out a raw payload from a project channel.
    pub fn deliver_raw(&self, project: &str, payload: &[u8]) -> Result<usize, event::EventError> {
        let prepared = event::prepare_project_event(project, payload, Some(&self.policy))?;
        Ok(self.deliver(project, &prepared))
    }

    /// Tells every session of `project` to resync: `connection.resync_required` and a
    /// fresh `status` (its history started over, or was trimmed past, while they were
    /// connected).
    fn resync(&self, project: &str, from_seq: u64, snap: &Snapshot) {
        let sessions = self.project_sessions(project);
        for session in &sessions {
            let resync = ConnectionResyncRequired {
                from_seq,
                earliest_seq: snap.seq + 1,
                epoch: snap.epoch.clone(),
            };
            session.send(&resync, Some(project));
            session.reply(snap.message(project));
        }
        self.metrics
            .resyncs
            .fetch_add(sessions.len() as u64, Ordering::Relaxed);
    }

    /// After a broker outage: each stream decides what its project missed; the hub
    /// delivers the replay, or tells the sessions to resync.
    async fn recover_all(&self, broker: &Broker) {
        for (_, stream) in self.streams() {
            stream.invalidate_tail();
        }
        for (project, stream) in self.streams() {
            let recovery = stream.recover(broker).await;
            match &recovery {
                Recovery::Replay { events, .. } => {
                    if !events.is_empty() {
                        self.deliver_batch(&project, events);
                    }
                }
                Recovery::Resync { snapshot, from_seq } => {
                    self.resync(&project, *from_seq, snapshot)
                }
                Recovery::Failed => {}
            }
            stream.recovered(&recovery);
        }
    }
}

impl Sink for Hub {
    fn deliver(&self, project: &str, batch: &[Prepared]) -> usize {
        self.deliver_batch(project, batch)
    }

    fn deliver_story(&self, story: &str, frame: &Bytes) -> usize {
        Hub::deliver_story(self, story, frame)
    }

    fn deliver_command(&self, project: &str, payload: &[u8]) -> usize {
        Hub::deliver_command(self, project, payload)
    }

    fn broadcast(&self, payload: &[u8]) -> Result<usize, event::EventError> {
        self.broadcast_raw(payload)
    }

    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(Hub::settled(self))
    }

    fn recover<'a>(&'a self, broker: &'a Broker) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.recover_all(broker))
    }
}

#[cfg(test)]
mod tests;
