//! One project's event stream as this instance sees it: the single owner of sequencing.
//!
//! "Each client gets each event once, in order" rests on one [`ProjectStream`] per active
//! project, and on nothing else. It alone holds:
//! - the project's epoch and the highest seq admitted (`last_seq`);
//! - the dedupe watermark after an outage catch-up or a resync (live copies of events
//!   already handed out are dropped until the first newer one);
//! - the resume [`tail::Tail`] (recent events in memory, bounded in bytes);
//! - the status snapshot cache;
//! - the decision for each greeting ([`Greeting`]: fresh, replay or resync), with history
//!   reads single-flighted (1,000 clients resuming at once cause one read) and the epoch
//!   check's position reads shared by the resumes that arrive while one runs;
//! - the catch-up after a broker outage ([`Recovery`]).
//!
//! Invariants: every live event passes [`ProjectStream::admit`] before any session sees
//! it, and the tail stays locked until the caller has offered the admitted events to every
//! session, or queued them for every fan-out shard (so queue order is admission order; a
//! copy that reaches a resuming session after its greeting covered it is dropped by the
//! hub's per-member seq filter, never delivered twice); seqs admitted only grow
//! within an epoch, and a new epoch resets the position only together with a snapshot
//! sent to the sessions.
//!
//! The stream knows the broker (it reads history, positions and snapshots) and nothing
//! above it: it decides, and the hub and the greeting apply the decision to sessions.

pub mod tail;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::OnceCell;

use crate::broker::state::Snapshot;
use crate::broker::{Broker, BrokerError, Position};
use crate::event::{self, Prepared};
use crate::metrics::Metrics;
use crate::schema::Policy;
use tail::Tail;

/// A client's resume request: `?last_seq=N[&epoch=E]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    pub last_seq: u64,
    pub epoch: Option<String>,
}

/// What every stream of an instance shares.
pub struct StreamContext {
    /// `events.history_max_len` and `events.replay_max_bytes`: the tail's bounds.
    pub tail_len: usize,
    pub tail_bytes: usize,
    /// Checks for events read back from history.
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
}

/// How a new connection of this project starts (see [`ProjectStream::greet`]).
#[derive(Debug)]
pub enum Greeting {
    /// `connection.established` (not resumed) at the snapshot's seq, then its `status`.
    Fresh(Arc<Snapshot>),
    /// `connection.established` (resumed) at `upto`, then the events the client missed.
    Replay {
        upto: u64,
        epoch: String,
        events: Vec<Bytes>,
    },
    /// The history does not cover the client (or its epoch is gone): established (not
    /// resumed), `connection.resync_required`, then the `status` snapshot.
    Resync {
        snapshot: Arc<Snapshot>,
        from_seq: u64,
        earliest: u64,
    },
}

impl Greeting {
    /// The seq this greeting covers: live copies at or below it must not follow it.
    pub fn covered(&self) -> u64 {
        match self {
            Greeting::Fresh(s) | Greeting::Resync { snapshot: s, .. } => s.seq,
            Greeting::Replay { upto, .. } => *upto,
        }
    }
}

/// What a broker outage left this project with (see [`ProjectStream::recover`]).
pub enum Recovery {
    /// The history covers the gap: deliver these, then call [`ProjectStream::recovered`].
    Replay { events: Vec<Prepared>, upto: u64 },
    /// It does not (trimmed past, or the history started over): every session of the
    /// project is told to resync from this snapshot, then [`ProjectStream::recovered`].
    Resync {
        snapshot: Arc<Snapshot>,
        from_seq: u64,
    },
    /// The broker could not be read: clients of this project may have missed events.
    Failed,
}

/// Events admitted for fan-out, with the tail held until the caller is done. Borrowed as
/// received, except one whose seq could not be trusted (owned, with its seq removed).
pub struct Admitted<'a> {
    pub events: Vec<std::borrow::Cow<'a, Prepared>>,
    _tail: MutexGuard<'a, Tail>,
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

/// A position read shared by the resumes that joined it before it started.
type PositionFlight = Arc<OnceCell<Result<Position, String>>>;

/// How long a cached snapshot may serve new connections (it is only used while no newer
/// event arrived; the age bound covers a broker that lost its data without a reconnect).
const SNAPSHOT_CACHE: Duration = Duration::from_millis(500);

pub struct ProjectStream {
    project: Box<str>,
    ctx: Arc<StreamContext>,
    /// Highest seq admitted: where to catch up from after a broker outage.
    last_seq: AtomicU64,
    /// Live events up to this seq are dropped (0 = none); cleared by the first newer event,
    /// so a restarted seq (new epoch) is never suppressed for long.
    dedupe_upto: AtomicU64,
    tail: Mutex<Tail>,
    /// The history epoch this instance last saw for the project.
    epoch: Mutex<Option<String>>,
    /// [`event::epoch_hash`] of `epoch` (0 while unknown): what a received event's
    /// publish-path mark must name for its seq to count.
    epoch_hash: AtomicU64,
    /// Unix seconds of the last warning about an untrusted seq (one a minute).
    warned_at: AtomicU64,
    /// The last status snapshot read, with when; valid while no newer event arrived.
    snapshot: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// The history read in flight, shared by every resume that needs one.
    flight: Mutex<Option<Flight>>,
    /// The position read resumes are joining (not started yet), and the lock one read at a
    /// time holds (see [`ProjectStream::fresh_position`]).
    position_next: Mutex<Option<PositionFlight>>,
    position_read: tokio::sync::Mutex<()>,
}

impl ProjectStream {
    pub fn new(project: &str, ctx: Arc<StreamContext>) -> Self {
        Self {
            project: project.into(),
            ctx,
            last_seq: AtomicU64::new(0),
            dedupe_upto: AtomicU64::new(0),
            tail: Mutex::new(Tail::default()),
            epoch: Mutex::new(None),
            epoch_hash: AtomicU64::new(0),
            warned_at: AtomicU64::new(0),
            snapshot: Mutex::new(None),
            flight: Mutex::new(None),
            position_next: Mutex::new(None),
            position_read: tokio::sync::Mutex::new(()),
        }
    }

    /// Highest seq admitted (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> Option<String> {
        self.epoch.lock().clone()
    }

    /// Admits one broker read's events of this project, in order: drops the live copies a
    /// catch-up or resync already covered, advances `last_seq` and records the tail. The
    /// tail stays locked until the returned value is dropped: offer the events to every
    /// session first.
    ///
    /// A received event's seq counts only if its publish-path mark names the epoch this
    /// stream knows (docs/protocol.md §3); otherwise (a forged or stale mark) it is
    /// delivered live without its seq, like any raw publish, and moves no position. While
    /// the epoch is not known yet (before the first greeting's read) a mark is believed.
    pub fn admit<'a>(&'a self, batch: &'a [Prepared]) -> Admitted<'a> {
        use std::borrow::Cow;
        let mut tail = self.tail.lock();
        let mut events = Vec::with_capacity(batch.len());
        let known = self.epoch_hash.load(Ordering::Acquire);
        for prepared in batch {
            if let (Some(seq), Some(claimed)) = (prepared.seq, prepared.epoch) {
                if known != 0 && claimed != known {
                    self.warn_untrusted(seq);
                    events.push(Cow::Owned(event::strip_seq(prepared)));
                    continue;
                }
            }
            if let Some(seq) = prepared.seq {
                let upto = self.dedupe_upto.load(Ordering::Acquire);
                if upto > 0 {
                    if seq <= upto {
                        continue;
                    }
                    self.dedupe_upto.store(0, Ordering::Release);
                }
                self.last_seq.fetch_max(seq, Ordering::AcqRel);
                tail.record(prepared);
            }
            events.push(Cow::Borrowed(prepared));
        }
        Admitted {
            events,
            _tail: tail,
        }
    }

    fn warn_untrusted(&self, seq: u64) {
        let now = event::unix_millis() / 1000;
        let last = self.warned_at.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                project = %self.project,
                seq,
                "an event's publish mark names another epoch: delivered without its seq \
                 (logged once a minute)"
            );
        }
    }

    /// Records the position a greeting starts a connection at: its members are at least
    /// there, so an outage's catch-up (and a resync's `from_seq`) starts from it even when
    /// no live event was admitted since (before, a project whose clients had all joined
    /// after its last event caught up from 0: a replay of everything they had, or a resync
    /// saying `from_seq: 0`). The latest epoch read wins: a different one means the broker
    /// lost its data (FLUSHALL) without dropping our pub/sub connection; the publish marks
    /// of the new epoch are the ones to believe from now on, and the old position means
    /// nothing in it.
    fn note_position(&self, epoch: &str, seq: u64) {
        let mut known = self.epoch.lock();
        if known.as_deref() != Some(epoch) {
            let changed = known.is_some();
            *known = Some(epoch.to_owned());
            self.epoch_hash
                .store(event::epoch_hash(epoch), Ordering::Release);
            if changed {
                self.last_seq.store(seq, Ordering::Release);
                return;
            }
        }
        self.last_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// The project's status snapshot, from the cache while it is current (no event with a
    /// newer seq admitted since it was read, and younger than `SNAPSHOT_CACHE`): a connect
    /// storm, or a client asking `status` in a loop, costs one broker read per project and
    /// period, not one per request.
    pub async fn snapshot(&self, broker: &Broker) -> Result<Arc<Snapshot>, BrokerError> {
        if let Some((at, snap)) = self.snapshot.lock().as_ref() {
            if self.last_seq() <= snap.seq && at.elapsed() < SNAPSHOT_CACHE {
                return Ok(snap.clone());
            }
        }
        let snap = Arc::new(broker.snapshot(&self.project).await?);
        *self.snapshot.lock() = Some((Instant::now(), snap.clone()));
        Ok(snap)
    }

    /// The snapshot a connection that does not resume starts from.
    pub async fn fresh(&self, broker: &Broker) -> Result<Arc<Snapshot>, BrokerError> {
        let snap = self.snapshot(broker).await?;
        self.note_position(&snap.epoch, snap.seq);
        Ok(snap)
    }

    /// Decides how a new connection starts. The session must already receive this
    /// project's live events into its hold: what the greeting covers is then dropped from
    /// the hold (see [`Greeting::covered`]), and nothing between is missed.
    pub async fn greet(
        &self,
        broker: &Broker,
        resume: Option<&ResumeRequest>,
    ) -> Result<Greeting, BrokerError> {
        let Some(req) = resume else {
            return Ok(Greeting::Fresh(self.fresh(broker).await?));
        };
        // The tail is only as good as its epoch: a broker that lost its data without
        // dropping our pub/sub connection (FLUSHALL) changes the epoch with no event to
        // tell us. A position read that began after this resume arrived catches it (shared
        // with the resumes arriving alongside, see `fresh_position`).
        let current = self.fresh_position(broker).await?;
        self.tail.lock().forget_unless_epoch(&current.epoch);
        let mut outcome = None;
        for _ in 0..3 {
            let served = self.tail.lock().serve(req.last_seq, req.epoch.as_deref());
            if let Some((events, upto, epoch)) = served {
                self.note_position(&epoch, upto);
                return Ok(Greeting::Replay {
                    upto,
                    epoch,
                    events: events.into_iter().map(|p| p.frame).collect(),
                });
            }
            let o = self
                .read_once(broker, req.last_seq)
                .await
                .map_err(BrokerError::Unavailable)?;
            let resync = req.epoch.as_deref().is_some_and(|e| e != o.position.epoch)
                || req.last_seq > o.position.seq
                // Further behind than the replay budget reaches (the read may have been
                // another client's: one nearer is still served from the tail).
                || (o.truncated && o.oldest_read.is_none_or(|s| s > req.last_seq + 1));
            outcome = Some(o);
            if resync {
                break;
            }
        }
        let snapshot = Arc::new(broker.snapshot(&self.project).await?);
        self.note_position(&snapshot.epoch, snapshot.seq);
        let earliest = outcome.and_then(|o| o.earliest).unwrap_or(snapshot.seq + 1);
        Ok(Greeting::Resync {
            snapshot,
            from_seq: req.last_seq,
            earliest,
        })
    }

    /// The project's position as read after this call began: the resumes that arrive while
    /// a read is running share the next one, which starts when it ends (so it began after
    /// each of them arrived, and still sees a FLUSHALL that happened before). A storm of
    /// 10,000 resumes makes one read per Redis round trip, not one per resume (issue 13:
    /// one round trip each held a 10k storm to ~1,750 resumes/s).
    async fn fresh_position(&self, broker: &Broker) -> Result<Position, BrokerError> {
        let flight = self
            .position_next
            .lock()
            .get_or_insert_with(Default::default)
            .clone();
        flight
            .get_or_init(|| async {
                let _one = self.position_read.lock().await;
                // Started from here: later arrivals wait for the next read.
                {
                    let mut next = self.position_next.lock();
                    if next.as_ref().is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                        *next = None;
                    }
                }
                broker
                    .position(&self.project)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .clone()
            .map_err(BrokerError::Unavailable)
    }

    /// One history read after `after` into the tail, shared by every resume that asks
    /// while it is in flight (counted in `Metrics::history_reads`).
    async fn read_once(&self, broker: &Broker, after: u64) -> Result<ReadOutcome, String> {
        let flight = self
            .flight
            .lock()
            .get_or_insert_with(Default::default)
            .clone();
        let outcome = flight
            .get_or_init(|| async {
                let result = self.read_into_tail(broker, after).await;
                self.ctx
                    .metrics
                    .history_reads
                    .fetch_add(1, Ordering::Relaxed);
                result.map_err(|e| e.to_string())
            })
            .await
            .clone();
        let mut current = self.flight.lock();
        if current.as_ref().is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            *current = None;
        }
        outcome
    }

    async fn read_into_tail(
        &self,
        broker: &Broker,
        after: u64,
    ) -> Result<ReadOutcome, BrokerError> {
        self.tail
            .lock()
            .start_recording(self.ctx.tail_len, self.ctx.tail_bytes);
        let read = broker.history_after(&self.project, after).await?;
        let prepared: Vec<(u64, Option<Prepared>)> = read
            .events
            .iter()
            .map(|(seq, bytes)| {
                let p = event::prepare_project_event(&self.project, bytes, Some(&self.ctx.policy));
                (*seq, p.ok())
            })
            .collect();
        self.tail.lock().merge(&read.position, prepared);
        Ok(ReadOutcome {
            position: read.position,
            earliest: read.earliest,
            truncated: read.truncated,
            oldest_read: read.events.first().map(|(s, _)| *s),
        })
    }

    /// Forgets the tail: the live stream may have had a gap (a broker outage).
    pub fn invalidate_tail(&self) {
        self.tail.lock().reset();
    }

    /// After a broker outage: what this project missed, read from history after
    /// `last_seq`, or a resync when the history no longer covers the gap or started over
    /// (a new epoch: Redis came back empty). Live messages arriving meanwhile are held by
    /// the broker and admitted afterwards, deduplicated by seq.
    pub async fn recover(&self, broker: &Broker) -> Recovery {
        self.invalidate_tail();
        let last = self.last_seq();
        let known = self.epoch();
        // Pooled connections may have died with the pub/sub one, or a cluster slot may be
        // moving or failing over: a few tries, spaced (0.1, 0.2, 0.4, 0.8 s) so a slot that
        // needs a moment to get its owner back still gets its catch-up.
        let mut read = Err(BrokerError::Unavailable("not tried".into()));
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(100 << (attempt - 1))).await;
            }
            read = broker.history_after(&self.project, last).await;
            if !matches!(read, Err(BrokerError::Unavailable(_))) {
                break;
            }
        }
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(project = %self.project, error = %e, "catch-up read failed: clients of this project may have missed events");
                return Recovery::Failed;
            }
        };
        let covered =
            read.position.seq == last || read.events.first().map(|(s, _)| *s) == Some(last + 1);
        let same_epoch = known.as_deref().is_none_or(|e| e == read.position.epoch);
        if same_epoch && covered && !read.truncated && last <= read.position.seq {
            let events = read
                .events
                .iter()
                .filter_map(|(_, bytes)| {
                    event::prepare_project_event(&self.project, bytes, Some(&self.ctx.policy)).ok()
                })
                .collect::<Vec<_>>();
            if !events.is_empty() {
                tracing::info!(project = %self.project, replayed = events.len(), "replayed events missed during the outage");
            }
            return Recovery::Replay {
                events,
                upto: read.position.seq,
            };
        }
        match broker.snapshot(&self.project).await {
            Ok(snap) => {
                tracing::warn!(project = %self.project, from_seq = last, epoch = %snap.epoch, "history does not cover the outage: clients must resync");
                Recovery::Resync {
                    snapshot: Arc::new(snap),
                    from_seq: last,
                }
            }
            Err(e) => {
                tracing::warn!(project = %self.project, error = %e, "resync snapshot failed");
                Recovery::Failed
            }
        }
    }

    /// The recovery was applied (its events delivered, or its resync sent): drop live
    /// copies of what it covered until the first newer event.
    pub fn recovered(&self, recovery: &Recovery) {
        match recovery {
            Recovery::Replay { upto, .. } => {
                self.dedupe_upto.store(*upto, Ordering::Release);
                self.last_seq.fetch_max(*upto, Ordering::AcqRel);
            }
            Recovery::Resync { snapshot, .. } => {
                self.last_seq.store(snapshot.seq, Ordering::Release);
                // Live events of the new epoch published between our resubscription and
                // the snapshot read are still waiting in the pub/sub stream; the snapshot
                // already reflects them, so delivering them after it would show those
                // clients seqs at or below the snapshot's (found by tests/it/faults.rs, Redis
                // restarted empty). Dropped like the duplicates of a catch-up.
                self.dedupe_upto.store(snapshot.seq, Ordering::Release);
                *self.epoch.lock() = Some(snapshot.epoch.clone());
                self.epoch_hash
                    .store(event::epoch_hash(&snapshot.epoch), Ordering::Release);
            }
            Recovery::Failed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> ProjectStream {
        ProjectStream::new(
            "p",
            Arc::new(StreamContext {
                tail_len: 100,
                tail_bytes: 1 << 20,
                policy: Policy::default(),
                metrics: Default::default(),
            }),
        )
    }

    fn ev(seq: u64) -> Prepared {
        let raw = format!(r#"{{"type":"file.changed","project_id":"p","seq":{seq}}}"#);
        event::prepare_project_event("p", raw.as_bytes(), None).unwrap()
    }

    fn seqs(a: &Admitted<'_>) -> Vec<u64> {
        a.events.iter().filter_map(|p| p.seq).collect()
    }

    #[test]
    fn a_resync_drops_live_events_its_snapshot_covers() {
        let s = stream();
        let snapshot = Arc::new(Snapshot::from_fields(5, "e2".into(), Vec::new()));
        s.recovered(&Recovery::Resync {
            snapshot,
            from_seq: 9,
        });
        let batch = [ev(4), ev(5), ev(6), ev(7)];
        assert_eq!(seqs(&s.admit(&batch)), [6, 7]);
        assert_eq!(s.last_seq(), 7);
        assert_eq!(s.epoch().as_deref(), Some("e2"));
        // The first newer event ended the check: a restarted seq is not suppressed.
        assert_eq!(seqs(&s.admit(&[ev(1)])), [1]);
    }

    /// As received from pub/sub, with the publish mark of `epoch`.
    fn marked(seq: u64, epoch: &str) -> Prepared {
        let raw =
            format!(r#"{{"type":"file.changed","project_id":"p","seq":{seq},"epoch":"{epoch}"}}"#);
        event::prepare_received("p", raw.as_bytes(), None)
            .unwrap()
            .0
    }

    #[test]
    fn a_seq_counts_only_when_its_mark_names_the_known_epoch() {
        let s = stream();
        // Epoch not known yet: the mark is believed.
        assert_eq!(seqs(&s.admit(&[marked(1, "e1")])), [1]);
        s.recovered(&Recovery::Resync {
            snapshot: Arc::new(Snapshot::from_fields(1, "e1".into(), Vec::new())),
            from_seq: 0,
        });
        let batch = [marked(2, "e1"), marked(999, "forged"), marked(3, "e1")];
        let admitted = s.admit(&batch);
        assert_eq!(seqs(&admitted), [2, 3]);
        assert_eq!(
            admitted.events.len(),
            3,
            "the untrusted event is still delivered"
        );
        let stripped =
            String::from_utf8_lossy(crate::ws::frame::payload(&admitted.events[1].frame))
                .into_owned();
        assert!(!stripped.contains("seq"), "{stripped}");
        drop(admitted);
        assert_eq!(s.last_seq(), 3, "the forged seq moved nothing");
    }

    #[test]
    fn a_replay_drops_its_late_live_copies_only() {
        let s = stream();
        s.recovered(&Recovery::Replay {
            events: Vec::new(),
            upto: 8,
        });
        assert_eq!(s.last_seq(), 8);
        let batch = [ev(7), ev(8), ev(9), ev(10)];
        assert_eq!(seqs(&s.admit(&batch)), [9, 10]);
    }
}
