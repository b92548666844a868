//! The greeting of a new connection: snapshot for a fresh one, replay for a resuming one.
//!
//! A session is registered and subscribed with its gate closed (live events wait), then
//! [`greet`] decides what comes first and opens the gate; live events that the greeting
//! already covered (seq <= covered) are dropped, the rest follow in order. So a resuming
//! client gets every event after its `last_seq` exactly once, then live events, with no gap.
//!
//! History reads are shared. Each project slot keeps a [`Tail`]: once a resume has read the
//! history, the slot records every live event after it, so the next resuming clients of that
//! project (a whole restart's worth of them) are served from memory. Concurrent reads of the
//! same project are single-flighted ([`Resumer`]): 1,000 clients resuming at once cause one
//! history read, not 1,000. The tail is bounded and is forgotten whenever the live stream
//! may have had a gap (broker outage, a seq that skips).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use tokio::sync::OnceCell;

use crate::app::App;
use crate::broker::{BrokerError, Position};
use crate::event::{self, Prepared};
use crate::session::{close_code, Scope, Session};

/// A client's resume request: `?last_seq=N[&epoch=E]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    pub last_seq: u64,
    pub epoch: Option<String>,
}

/// Recent events of one project, contiguous by seq (an entry is None when the stored event
/// failed validation and is skipped on replay).
#[derive(Default)]
pub struct Tail {
    recording: bool,
    epoch: Option<String>,
    events: VecDeque<(u64, Option<Prepared>)>,
    /// Highest seq covered (events up to here are known).
    upto: u64,
    capacity: usize,
    /// Frame bytes held, and their bound (`events.replay_max_bytes`): a `?last_seq=0`
    /// resume must not pin a whole 10,000-event history in memory. What falls off the
    /// front is served from the broker's history, or answered with a resync.
    bytes: usize,
    max_bytes: usize,
}

fn entry_bytes(entry: &(u64, Option<Prepared>)) -> usize {
    entry.1.as_ref().map_or(0, |p| p.frame.len())
}

impl Tail {
    /// Called by the hub for every delivered event with a seq (the hub already dropped the
    /// duplicates of an outage catch-up).
    pub fn record(&mut self, p: &Prepared) {
        if !self.recording {
            return;
        }
        let Some(seq) = p.seq else { return };
        if self.epoch.is_some() {
            if seq <= self.upto {
                // The seq went backwards: the history started over (a new epoch).
                self.reset();
                return;
            }
            if seq != self.upto + 1 {
                // A gap in the live stream: what we hold can no longer be trusted.
                self.reset();
                return;
            }
            self.upto = seq;
        }
        self.bytes += p.frame.len();
        self.events.push_back((seq, Some(p.clone())));
        self.trim();
    }

    /// Drops the oldest events until both bounds hold.
    fn trim(&mut self) {
        while self.events.len() > self.capacity.max(1) || self.bytes > self.max_bytes {
            match self.events.pop_front() {
                Some(e) => self.bytes -= entry_bytes(&e),
                None => break,
            }
        }
    }

    /// Drops what the tail holds if it belongs to another epoch than the broker's.
    fn forget_unless_epoch(&mut self, epoch: &str) {
        if self.epoch.as_deref().is_some_and(|e| e != epoch) {
            self.reset();
        }
    }

    pub fn reset(&mut self) {
        self.recording = false;
        self.epoch = None;
        self.events.clear();
        self.bytes = 0;
        self.upto = 0;
    }

    fn start_recording(&mut self, capacity: usize, max_bytes: usize) {
        if !self.recording {
            self.recording = true;
            self.capacity = capacity;
            self.max_bytes = max_bytes;
            self.epoch = None;
            self.events.clear();
            self.bytes = 0;
        }
    }

    /// The events after `after` if this tail covers them for a client in `epoch`.
    fn serve(&self, after: u64, epoch: Option<&str>) -> Option<(Vec<Prepared>, u64, String)> {
        let mine = self.epoch.as_deref()?;
        if epoch.is_some_and(|e| e != mine) || after > self.upto {
            return None;
        }
        let first = self
            .events
            .front()
            .map(|(s, _)| *s)
            .unwrap_or(self.upto + 1);
        if first > after + 1 {
            return None;
        }
        let events = self
            .events
            .iter()
            .filter(|(s, _)| *s > after)
            .filter_map(|(_, p)| p.clone())
            .collect();
        Some((events, self.upto, mine.to_owned()))
    }

    /// Installs a history read, keeping what was recorded since recording started.
    fn merge(&mut self, position: &Position, read: Vec<(u64, Option<Prepared>)>) {
        let recorded: Vec<(u64, Option<Prepared>)> = if self.epoch.is_none() {
            self.events
                .drain(..)
                .filter(|(s, _)| *s > position.seq)
                .collect()
        } else {
            Vec::new()
        };
        let contiguous = read.windows(2).all(|w| w[1].0 == w[0].0 + 1)
            && read.last().is_none_or(|(s, _)| *s == position.seq)
            && recorded.first().is_none_or(|(s, _)| *s == position.seq + 1)
            && recorded.windows(2).all(|w| w[1].0 == w[0].0 + 1);
        if self.epoch.as_deref().is_some_and(|e| e != position.epoch) || !contiguous {
            self.reset();
            return;
        }
        if self.epoch.is_some() {
            // Already covering newer events: extend backwards with what this read adds, so
            // clients further behind are served too (the read must reach the tail's front).
            let front = self
                .events
                .front()
                .map(|(s, _)| *s)
                .unwrap_or(self.upto + 1);
            if read.last().is_some_and(|(s, _)| *s + 1 >= front) {
                let older: Vec<_> = read.into_iter().filter(|(s, _)| *s < front).collect();
                for entry in older.into_iter().rev() {
                    let size = entry_bytes(&entry);
                    if self.events.len() >= self.capacity.max(1)
                        || self.bytes + size > self.max_bytes
                    {
                        break;
                    }
                    self.bytes += size;
                    self.events.push_front(entry);
                }
            }
            return;
        }
        self.epoch = Some(position.epoch.clone());
        self.events = read.into_iter().chain(recorded).collect();
        self.bytes = self.events.iter().map(entry_bytes).sum();
        self.upto = self.events.back().map(|(s, _)| *s).unwrap_or(position.seq);
        self.trim();
    }
}

/// What a history read said about the project, besides the events.
#[derive(Debug, Clone)]
struct ReadOutcome {
    position: Position,
    earliest: Option<u64>,
    /// The events after the read's position exceeded the replay budget: only the newest
    /// ones, from `oldest_read`, were read.
    truncated: bool,
    oldest_read: Option<u64>,
}

type Flight = Arc<OnceCell<Result<ReadOutcome, String>>>;

/// Single-flight history reads per project (counted in `Metrics::history_reads`).
#[derive(Default)]
pub struct Resumer {
    flights: Mutex<HashMap<String, Flight>>,
}

impl Resumer {
    async fn read_once(&self, app: &App, project: &str, after: u64) -> Result<ReadOutcome, String> {
        let flight = self
            .flights
            .lock()
            .entry(project.to_owned())
            .or_default()
            .clone();
        let outcome = flight
            .get_or_init(|| async {
                let result = read_into_tail(app, project, after).await;
                app.hub
                    .metrics
                    .history_reads
                    .fetch_add(1, Ordering::Relaxed);
                result.map_err(|e| e.to_string())
            })
            .await
            .clone();
        let mut flights = self.flights.lock();
        if flights
            .get(project)
            .is_some_and(|f| Arc::ptr_eq(f, &flight))
        {
            flights.remove(project);
        }
        outcome
    }
}

async fn read_into_tail(app: &App, project: &str, after: u64) -> Result<ReadOutcome, BrokerError> {
    let tail = app.hub.tail(project);
    if let Some(t) = &tail {
        t.lock().start_recording(
            app.config.events.history_max_len,
            app.config.events.replay_max_bytes,
        );
    }
    let read = app.broker.history_after(project, after).await?;
    let policy = app.config.event_policy();
    let prepared: Vec<(u64, Option<Prepared>)> = read
        .events
        .iter()
        .map(|(seq, bytes)| {
            (
                *seq,
                event::prepare_project_event(project, bytes, Some(&policy)).ok(),
            )
        })
        .collect();
    if let Some(t) = &tail {
        t.lock().merge(&read.position, prepared);
    }
    Ok(ReadOutcome {
        position: read.position,
        earliest: read.earliest,
        truncated: read.truncated,
        oldest_read: read.events.first().map(|(s, _)| *s),
    })
}

fn established(app: &App, session: &Session, seq: u64, epoch: &str, resumed: bool) -> Value {
    json!({
        "type": "connection.established",
        "client_id": session.client_id,
        "user_id": session.user_id(),
        "instance_id": app.instance_id,
        "heartbeat_interval": app.config.ws.heartbeat_interval_secs,
        "resumed": resumed,
        "seq": seq,
        "epoch": epoch,
    })
}

/// Builds and queues the greeting, then opens the session's gate.
pub async fn greet(app: &App, session: &Arc<Session>, resume: Option<ResumeRequest>) {
    let result = match (&session.scope, resume) {
        (Scope::Project(project), Some(req)) => greet_resume(app, session, project, req).await,
        (Scope::Project(project), None) => greet_fresh(app, session, project).await,
        (Scope::User, _) => greet_user(app, session).await,
    };
    if let Err(e) = result {
        session.span().in_scope(|| {
            tracing::warn!(client_id = %session.client_id, error = %e, "could not greet; closing");
        });
        session.open_gate(Vec::new(), 0, &app.hub.stats);
        session.close(close_code::INTERNAL, "broker unavailable; reconnect", true);
    }
}

/// How long a cached snapshot may serve new connections (it is only used while no newer
/// event arrived; the age bound covers a broker that lost its data without a reconnect).
const SNAPSHOT_CACHE: std::time::Duration = std::time::Duration::from_millis(500);

/// The project's status snapshot, from the hub's cache while it is current: a connect
/// storm, or a client asking `status` in a loop, costs one broker read per project and
/// [`SNAPSHOT_CACHE`], not one per request.
pub async fn current_snapshot(
    app: &App,
    project: &str,
) -> Result<Arc<crate::broker::state::Snapshot>, BrokerError> {
    if let Some(snap) = app.hub.cached_snapshot(project, SNAPSHOT_CACHE) {
        return Ok(snap);
    }
    let snap = Arc::new(app.broker.snapshot(project).await?);
    app.hub.cache_snapshot(project, snap.clone());
    Ok(snap)
}

async fn greet_fresh(app: &App, session: &Arc<Session>, project: &str) -> Result<(), BrokerError> {
    let snap = current_snapshot(app, project).await?;
    app.hub.note_epoch(project, &snap.epoch);
    let frames = vec![
        session.message(established(app, session, snap.seq, &snap.epoch, false)),
        session.message(snap.message(project)),
    ];
    session.open_gate(frames, snap.seq, &app.hub.stats);
    Ok(())
}

async fn greet_user(app: &App, session: &Arc<Session>) -> Result<(), BrokerError> {
    let mut positions = Map::new();
    let mut statuses = Vec::new();
    for project in session.projects() {
        let snap = current_snapshot(app, &project).await?;
        app.hub.note_epoch(&project, &snap.epoch);
        positions.insert(
            project.clone(),
            json!({"seq": snap.seq, "epoch": snap.epoch}),
        );
        statuses.push(session.message(snap.message(&project)));
    }
    let hello = json!({
        "type": "connection.established",
        "client_id": session.client_id,
        "user_id": session.user_id(),
        "instance_id": app.instance_id,
        "heartbeat_interval": app.config.ws.heartbeat_interval_secs,
        "resumed": false,
        "positions": positions,
    });
    let mut frames = vec![session.message(hello)];
    frames.extend(statuses);
    // Seqs of different projects cannot be compared: hold nothing back.
    session.open_gate(frames, 0, &app.hub.stats);
    Ok(())
}

async fn greet_resume(
    app: &App,
    session: &Arc<Session>,
    project: &str,
    req: ResumeRequest,
) -> Result<(), BrokerError> {
    let mut outcome = None;
    // The tail is only as good as its epoch: a broker that lost its data without dropping
    // our pub/sub connection (FLUSHALL) changes the epoch with no event to tell us. One
    // cheap position read per resume catches it.
    let current = app.broker.position(project).await?;
    if let Some(tail) = app.hub.tail(project) {
        tail.lock().forget_unless_epoch(&current.epoch);
    }
    for _ in 0..3 {
        if let Some(tail) = app.hub.tail(project) {
            let served = tail.lock().serve(req.last_seq, req.epoch.as_deref());
            if let Some((events, upto, epoch)) = served {
                app.hub.note_epoch(project, &epoch);
                let mut frames = Vec::with_capacity(events.len() + 1);
                frames.push(session.message(established(app, session, upto, &epoch, true)));
                frames.extend(events.into_iter().map(|p| p.frame));
                session.open_gate(frames, upto, &app.hub.stats);
                app.hub
                    .metrics
                    .history_replays
                    .fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        match app.resumer.read_once(app, project, req.last_seq).await {
            Ok(o) => {
                let resync = req.epoch.as_deref().is_some_and(|e| e != o.position.epoch)
                    || req.last_seq > o.position.seq
                    // Further behind than the replay budget reaches (the read may have
                    // been another client's: one nearer is still served from the tail).
                    || (o.truncated && o.oldest_read.is_none_or(|s| s > req.last_seq + 1));
                outcome = Some(o);
                if resync {
                    break;
                }
            }
            Err(e) => return Err(BrokerError::Unavailable(e)),
        }
    }
    // History does not cover the client (or its epoch is gone): start it over.
    let snap = app.broker.snapshot(project).await?;
    app.hub.note_epoch(project, &snap.epoch);
    let earliest = outcome.and_then(|o| o.earliest).unwrap_or(snap.seq + 1);
    let frames = vec![
        session.message(established(app, session, snap.seq, &snap.epoch, false)),
        session.message(json!({
            "type": "connection.resync_required",
            "from_seq": req.last_seq,
            "earliest_seq": earliest,
            "epoch": snap.epoch,
        })),
        session.message(snap.message(project)),
    ];
    session.open_gate(frames, snap.seq, &app.hub.stats);
    app.hub.metrics.resyncs.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends `connection.resync_required` and a fresh `status` to every session of `project`
/// (its history started over, or was trimmed past, while they were connected).
pub fn resync_sessions(
    hub: &crate::hub::Hub,
    project: &str,
    from_seq: u64,
    snap: &crate::broker::state::Snapshot,
) {
    let sessions = hub.project_sessions(project);
    for session in &sessions {
        session.reply(json!({
            "type": "connection.resync_required",
            "project_id": project,
            "from_seq": from_seq,
            "earliest_seq": snap.seq + 1,
            "epoch": snap.epoch,
        }));
        session.reply(snap.message(project));
    }
    hub.metrics
        .resyncs
        .fetch_add(sessions.len() as u64, Ordering::Relaxed);
    hub.reset_position(project, snap.seq, &snap.epoch);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(seq: u64) -> Prepared {
        event::prepare_project_event(
            "p",
            format!(r#"{{"type":"file.changed","project_id":"p","timestamp":"t","seq":{seq}}}"#)
                .as_bytes(),
            None,
        )
        .unwrap()
    }

    fn pos(seq: u64) -> Position {
        Position {
            seq,
            epoch: "e1".into(),
        }
    }

    #[test]
    fn tail_serves_after_a_merge_and_keeps_recording() {
        let mut t = Tail::default();
        t.start_recording(100, usize::MAX);
        t.record(&prepared(4)); // recorded while the read was in flight
        t.merge(&pos(3), (2..=3).map(|s| (s, Some(prepared(s)))).collect());
        t.record(&prepared(5));
        let (events, upto, epoch) = t.serve(1, Some("e1")).unwrap();
        assert_eq!(
            events.iter().map(|p| p.seq.unwrap()).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        assert_eq!((upto, epoch.as_str()), (5, "e1"));
        assert!(t.serve(0, None).is_none(), "seq 1 is not held");
        assert!(t.serve(3, Some("other")).is_none(), "another epoch");
        assert!(t.serve(9, None).is_none(), "ahead of what we know");
        assert_eq!(t.serve(5, None).unwrap().0.len(), 0);
    }

    #[test]
    fn a_later_read_extends_the_tail_backwards() {
        let mut t = Tail::default();
        t.start_recording(100, usize::MAX);
        t.merge(&pos(5), (4..=5).map(|s| (s, Some(prepared(s)))).collect());
        assert!(t.serve(1, None).is_none());
        t.merge(&pos(5), (2..=5).map(|s| (s, Some(prepared(s)))).collect());
        let (events, upto, _) = t.serve(1, None).unwrap();
        assert_eq!(
            events.iter().map(|p| p.seq.unwrap()).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        assert_eq!(upto, 5);
    }

    #[test]
    fn a_gap_in_the_live_stream_forgets_the_tail() {
        let mut t = Tail::default();
        t.start_recording(100, usize::MAX);
        t.merge(&pos(3), (1..=3).map(|s| (s, Some(prepared(s)))).collect());
        t.record(&prepared(5));
        assert!(t.serve(0, None).is_none());
    }

    #[test]
    fn a_seq_going_backwards_forgets_the_tail() {
        let mut t = Tail::default();
        t.start_recording(100, usize::MAX);
        t.merge(&pos(3), (1..=3).map(|s| (s, Some(prepared(s)))).collect());
        t.record(&prepared(1));
        assert!(t.serve(2, Some("e1")).is_none());
    }

    #[test]
    fn capacity_bounds_the_tail() {
        let mut t = Tail::default();
        t.start_recording(3, usize::MAX);
        t.merge(&pos(0), Vec::new());
        for s in 1..=10 {
            t.record(&prepared(s));
        }
        assert!(t.serve(6, None).is_none());
        assert_eq!(t.serve(7, None).unwrap().0.len(), 3);
    }

    #[test]
    fn bytes_bound_the_tail_however_few_the_events() {
        let one = prepared(10).frame.len();
        let mut t = Tail::default();
        t.start_recording(1000, one * 3);
        t.merge(&pos(0), Vec::new());
        for s in 1..=10 {
            t.record(&prepared(s));
        }
        assert!(t.bytes <= one * 3, "{} bytes held", t.bytes);
        assert_eq!(t.serve(7, None).unwrap().0.len(), 3);
        assert!(t.serve(6, None).is_none());
        // A read reaching further back extends it only within the budget.
        t.merge(&pos(10), (1..=10).map(|s| (s, Some(prepared(s)))).collect());
        assert!(t.serve(6, None).is_none());
        assert!(t.bytes <= one * 3);
    }
}
