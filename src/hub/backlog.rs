//! A bounded hand-off to a task: what a producer queued and the task has not finished,
//! counted in items and bytes, with the producer's wait.
//!
//! The fan-out shards and the broadcast task take work through unbounded channels (a
//! producer such as the broker's reader must never block a thread), so the bound lives
//! here: past either limit the producer awaits [`Backlog::settled`] before queueing more,
//! and goes on once the backlog is back under half of both. The wait is for CPU work on
//! this instance, never for a client socket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

pub(super) struct Backlog {
    items: AtomicUsize,
    bytes: AtomicUsize,
    max_items: usize,
    max_bytes: usize,
    /// Woken when the backlog drops under half of a bound.
    drained: Notify,
}

impl Backlog {
    pub(super) fn new(max_items: usize, max_bytes: usize) -> Self {
        Self {
            items: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_items,
            max_bytes,
            drained: Notify::new(),
        }
    }

    /// Counts one queued item of `bytes`.
    pub(super) fn add(&self, bytes: usize) {
        self.items.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one item of `bytes` finished (or never queued after all).
    pub(super) fn done(&self, bytes: usize) {
        let items = self.items.fetch_sub(1, Ordering::Relaxed) - 1;
        let left = self.bytes.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        let half_bytes = self.max_bytes / 2;
        if items == self.max_items / 2 || (left < half_bytes && left + bytes >= half_bytes) {
            self.drained.notify_waiters();
        }
    }

    /// Items queued and not finished.
    pub(super) fn items(&self) -> usize {
        self.items.load(Ordering::Relaxed)
    }

    fn over(&self, share: usize) -> bool {
        self.items.load(Ordering::Relaxed) > self.max_items / share
            || self.bytes.load(Ordering::Relaxed) > self.max_bytes / share
    }

    /// Ready at once under the bounds; past one, waits until the backlog is under half of
    /// both.
    pub(super) async fn settled(&self) {
        if !self.over(1) {
            return;
        }
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if !self.over(2) {
                return;
            }
            // A notification can fall between the check and the wait's start on another
            // thread's `done`: look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(5), drained).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_a_bound_the_producer_waits_until_under_half() {
        let backlog = Backlog::new(10, 1000);
        for _ in 0..11 {
            backlog.add(1);
        }
        let wait = backlog.settled();
        tokio::pin!(wait);
        assert!(
            futures_util::poll!(wait.as_mut()).is_pending(),
            "over the item bound"
        );
        for _ in 0..6 {
            backlog.done(1);
        }
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("settled under half");
        // Bytes bound the same way.
        backlog.add(2000);
        let wait = backlog.settled();
        tokio::pin!(wait);
        assert!(
            futures_util::poll!(wait.as_mut()).is_pending(),
            "over the byte bound"
        );
        backlog.done(2000);
        tokio::time::timeout(Duration::from_secs(1), wait)
            .await
            .expect("settled under half");
    }
}
