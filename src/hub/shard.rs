//! Fan-out shards: the sessions of this instance split across the runtime's worker threads,
//! each shard writing its own sockets.
//!
//! With one worker thread there is one shard and fan-out stays inline on the task that
//! admitted the events (the broker's reader): no hand-off, no wake-up, nothing changes.
//! With N workers every project's members are split into N lists by session (a hash of the
//! session's address, so nothing is stored per connection), and a batch admitted by the
//! project's stream is handed to one task per shard that has members there: the events'
//! frames (encoded once, shared by reference count) and their joined buffer, never a copy.
//! The shard tasks run on whatever worker is free, so the kernel's send cost, which is most
//! of delivery, spreads over the cores.
//!
//! Invariants:
//! - per-project order: jobs are queued while the stream's tail lock is held (admission
//!   order is queue order), and each shard runs its queue in order; a session is in exactly
//!   one shard, so it sees its projects' events in admission order;
//! - the slow-consumer rules are the session's own ([`super::member::Member::offer`]), the
//!   same on every shard;
//! - the queues are bounded in jobs and bytes (`backlog`): past either bound the producer
//!   waits ([`Shards::settled`], the broker's reader awaits it between reads, so Redis
//!   buffers rather than us) until the shards are back under half of it. The wait is for
//!   CPU work, never for a client socket.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::backlog::Backlog;
use super::Hub;
use crate::event::Prepared;
use crate::session::Session;
use crate::wheel::Slice;

/// Jobs a shard may have queued before producers wait.
const MAX_JOBS: usize = 8192;
/// Frame bytes a shard may have queued before producers wait.
const MAX_BYTES: usize = 32 << 20;
/// Longest run of a shard between two yields to the other tasks of its worker.
const SLICE: std::time::Duration = std::time::Duration::from_micros(200);

/// One admitted batch for one shard's members of one project.
pub(super) struct Job {
    pub id: Arc<str>,
    pub events: Arc<[Prepared]>,
    /// The events' frames joined (several events), shared by every shard.
    pub joined: Option<Bytes>,
    bytes: usize,
}

struct Queue {
    tx: mpsc::UnboundedSender<Job>,
    backlog: Backlog,
}

pub(super) struct Shards {
    /// Empty with one shard (inline fan-out).
    queues: Vec<Queue>,
}

/// The shard of `session` among `n`: a hash of its address (stable for its life, nothing
/// stored per connection).
pub(super) fn of(session: &Arc<Session>, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let addr = Arc::as_ptr(session) as usize as u64;
    // Fibonacci hashing: allocation addresses share their low bits.
    ((addr.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % n as u64) as usize
}

impl Shards {
    /// One shard per worker thread of the current runtime (one, outside a runtime).
    /// Returns the shards and the receivers for [`run`] (empty with one shard).
    pub(super) fn for_runtime() -> (Self, Vec<mpsc::UnboundedReceiver<Job>>) {
        let n = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1);
        Self::new(n)
    }

    pub(super) fn new(n: usize) -> (Self, Vec<mpsc::UnboundedReceiver<Job>>) {
        let mut queues = Vec::new();
        let mut receivers = Vec::new();
        if n > 1 {
            for _ in 0..n {
                let (tx, rx) = mpsc::unbounded_channel();
                queues.push(Queue {
                    tx,
                    backlog: Backlog::new(MAX_JOBS, MAX_BYTES),
                });
                receivers.push(rx);
            }
        }
        (Self { queues }, receivers)
    }

    /// Number of shards (1: inline).
    pub(super) fn count(&self) -> usize {
        self.queues.len().max(1)
    }

    pub(super) fn inline(&self) -> bool {
        self.queues.is_empty()
    }

    /// Queues a batch for shard `k`.
    pub(super) fn send(
        &self,
        k: usize,
        id: &Arc<str>,
        events: &Arc<[Prepared]>,
        joined: Option<&Bytes>,
    ) {
        let bytes = events.iter().map(|p| p.frame.len()).sum();
        let queue = &self.queues[k];
        queue.backlog.add(bytes);
        let job = Job {
            id: id.clone(),
            events: events.clone(),
            joined: joined.cloned(),
            bytes,
        };
        if queue.tx.send(job).is_err() {
            // The shard's task is gone (runtime shutting down): nothing will deliver.
            queue.backlog.done(bytes);
        }
    }

    /// Records that shard `k` ran `job`.
    fn done(&self, k: usize, job: &Job) {
        self.queues[k].backlog.done(job.bytes);
    }

    /// Waits while a shard is past its bounds, until every shard is back under half.
    pub(super) async fn settled(&self) {
        for queue in &self.queues {
            queue.backlog.settled().await;
        }
    }

    /// Jobs queued over every shard (tests, metrics).
    pub(super) fn queued(&self) -> usize {
        self.queues.iter().map(|q| q.backlog.items()).sum()
    }
}

/// Shard `k`'s task: runs its jobs in order ([`Hub::offer_shard`]), yielding when a run
/// has taken [`SLICE`]. Ends when the hub is gone.
pub(super) async fn run(hub: Weak<Hub>, k: usize, mut rx: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = rx.recv().await {
        let Some(hub) = hub.upgrade() else { return };
        let mut slice = Slice::new(SLICE);
        let mut next = Some(job);
        let mut spent = false;
        while let Some(job) = next.take() {
            hub.offer_shard(k, &job);
            hub.shards.done(k, &job);
            spent = slice.over();
            if !spent {
                next = rx.try_recv().ok();
            }
        }
        drop(hub);
        if spent {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_spread_over_the_shards() {
        let n = 4;
        let mut per = [0usize; 4];
        let sessions: Vec<_> = (0..4000)
            .map(|_| {
                Session::new_for_test(
                    "p",
                    crate::session::outbox::Limits {
                        messages: 1,
                        bytes: 1,
                    },
                )
            })
            .collect();
        for s in &sessions {
            per[of(s, n)] += 1;
        }
        assert!(per.iter().all(|c| (800..=1200).contains(c)), "{per:?}");
    }

    /// The hand-off is bounded: past `MAX_JOBS` queued on a shard the producer's
    /// `settled` waits, and it ends once the shard is back under half of it.
    #[tokio::test]
    async fn a_full_shard_holds_the_producer_until_it_drains_to_half() {
        let (shards, mut receivers) = Shards::new(2);
        let events: Arc<[Prepared]> =
            vec![
                crate::event::prepare_project_event("p", br#"{"type":"file.changed"}"#, None)
                    .unwrap(),
            ]
            .into();
        let id: Arc<str> = Arc::from("p");
        for _ in 0..MAX_JOBS + 1 {
            shards.send(1, &id, &events, None);
        }
        assert_eq!(shards.queued(), MAX_JOBS + 1);
        let wait = shards.settled();
        tokio::pin!(wait);
        assert!(
            futures_util::poll!(wait.as_mut()).is_pending(),
            "over the bound: the producer waits"
        );
        // The shard runs half of its queue: the producer may go on.
        let rx = &mut receivers[1];
        for _ in 0..=MAX_JOBS / 2 {
            let job = rx.recv().await.unwrap();
            shards.done(1, &job);
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), wait)
            .await
            .expect("settled once the shard is under half its bound");
        // Under the bound, settled is ready at once.
        tokio::time::timeout(std::time::Duration::from_millis(10), shards.settled())
            .await
            .unwrap();
    }

    #[test]
    fn one_shard_is_inline() {
        let (shards, receivers) = Shards::new(1);
        assert!(shards.inline());
        assert_eq!(shards.count(), 1);
        assert!(receivers.is_empty());
    }
}
