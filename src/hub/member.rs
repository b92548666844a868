//! One session's membership in one project: the hold before its greeting and the filter
//! of covered seqs after it.
//!
//! A member joins either open or holding. Holding, it keeps the project's live events
//! (seqs and all) until [`Member::release`] gives it the seq its greeting covered: held
//! events at or below it are dropped, the rest are offered in order, and later live copies
//! at or below it are dropped until the first newer event. Invariants: nothing of a holding
//! member reaches its session's outbox before the release; the release and a concurrent
//! fan-out are ordered by the project's [`Holds`] lock; a hold is bounded by the session's
//! outbound message limit (past it the session is closed as a slow consumer, like a full
//! queue).
//!
//! Every connection carries one member per project it follows for its whole life, so a
//! member is two words; what only a greeting needs (the held events) lives in the
//! project's [`Holds`], keyed by session, for the few members holding at any moment.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::event::Prepared;
use crate::metrics::DeliveryStats;
use crate::session::Session;

/// `Member::state` while the member holds live events for its greeting.
pub(super) const HOLDING: u64 = u64::MAX;

/// The live events held for the members of one project that are holding, by session.
pub(super) type Holds = Mutex<HashMap<usize, Vec<Prepared>>>;

/// One session in one project.
pub(super) struct Member {
    pub(super) session: Arc<Session>,
    /// [`HOLDING`]; or the seq its greeting covered, until the first newer live event
    /// (live copies of covered events can still be on their way when the greeting is out:
    /// the resume tail records an event before the hub fans it out, and a history or
    /// snapshot read can get ahead of this instance's pub/sub stream; found by
    /// tests/it/faults.rs, a client resuming during a publish burst); 0 = nothing to drop.
    state: AtomicU64,
}

impl Member {
    pub(super) fn new(session: Arc<Session>, holding: bool) -> Self {
        Self {
            session,
            state: AtomicU64::new(if holding { HOLDING } else { 0 }),
        }
    }

    /// This member's key in the project's [`Holds`].
    pub(super) fn key(&self) -> usize {
        Arc::as_ptr(&self.session) as usize
    }

    /// False for a live copy of an event the greeting covered. The live stream of a
    /// project is in seq order, so the first newer event ends the check for good (and a
    /// history that started over cannot be held back for long).
    fn past_cover(&self, seq: u64) -> bool {
        let covered = self.state.load(Ordering::Acquire);
        if covered == 0 {
            return true;
        }
        if seq <= covered {
            return false;
        }
        let _ = self
            .state
            .compare_exchange(covered, 0, Ordering::AcqRel, Ordering::Relaxed);
        true
    }

    /// Offers one batch's admitted events (and their frames joined, when several).
    pub(super) fn offer(
        &self,
        events: &[&Prepared],
        joined: Option<&Bytes>,
        holds: &Holds,
        stats: &DeliveryStats,
    ) {
        if self.state.load(Ordering::Acquire) == HOLDING {
            let mut holds = holds.lock();
            // Again under the lock: the release changes the state while holding it.
            if self.state.load(Ordering::Acquire) == HOLDING {
                let held = holds.entry(self.key()).or_default();
                if held.len() + events.len() <= self.session.outbox.limits().messages {
                    held.extend(events.iter().map(|p| (*p).clone()));
                } else {
                    // Too much arrived before the greeting was ready: like a full queue.
                    holds.remove(&self.key());
                    self.state.store(0, Ordering::Release);
                    drop(holds);
                    self.session.close_slow(stats);
                }
                return;
            }
        }
        // Joined frames only go to a member with nothing to filter and a session with
        // nothing queued (they will most likely be written at once); otherwise one by one,
        // so progress events stay conflatable and covered copies can be dropped.
        let direct = self.state.load(Ordering::Acquire) == 0 && self.session.outbox.is_empty();
        match (joined, direct) {
            (Some(frames), true) => self.session.offer_event(frames.clone(), None, stats),
            _ => {
                for p in events {
                    if p.seq.is_some_and(|s| !self.past_cover(s)) {
                        continue;
                    }
                    self.session.offer_event(p.frame.clone(), p.conflate, stats);
                }
            }
        }
    }

    /// Offers one story progress frame: as [`Member::offer`], except that right after the
    /// greeting a live copy of the progress the greeting sent is dropped (a story has no
    /// seq: the greeting reads the stored latest progress, which a copy still on its way
    /// may equal; seen as a duplicate frame on `/ws/user/stories`).
    pub(super) fn offer_story(&self, progress: &Prepared, holds: &Holds, stats: &DeliveryStats) {
        if self.state.load(Ordering::Acquire) != HOLDING && self.sent_copy(progress) {
            return;
        }
        self.offer(&[progress], None, holds, stats);
    }

    /// Ends a story member's hold: `sent` is [`frame_hash`] of the progress frame its
    /// greeting sent (0: none); held or live copies of that frame are dropped, once, until
    /// another frame arrives.
    pub(super) fn release_story(&self, sent: u64, holds: &Holds, stats: &DeliveryStats) {
        let mut holds = holds.lock();
        let held = holds.remove(&self.key()).unwrap_or_default();
        self.state.store(sent, Ordering::Release);
        for p in held {
            if self.sent_copy(&p) {
                continue;
            }
            self.session.offer_event(p.frame, p.conflate, stats);
        }
    }

    /// True for the live copy of the frame a story greeting sent; the first frame after
    /// the greeting ends the check either way.
    fn sent_copy(&self, p: &Prepared) -> bool {
        let sent = self.state.load(Ordering::Acquire);
        if sent == 0 || sent == HOLDING {
            return false;
        }
        let _ = self
            .state
            .compare_exchange(sent, 0, Ordering::AcqRel, Ordering::Relaxed);
        frame_hash(&p.frame) == sent
    }

    /// Ends the hold: drops what `covered` includes and offers the rest, in order.
    pub(super) fn release(&self, covered: u64, holds: &Holds, stats: &DeliveryStats) {
        let mut holds = holds.lock();
        let held = holds.remove(&self.key()).unwrap_or_default();
        // Under the holds lock: a fan-out that saw HOLDING waits for it, then finds the
        // state changed and offers directly, after these.
        self.state.store(covered, Ordering::Release);
        for p in held {
            if p.seq.is_some_and(|s| !self.past_cover(s)) {
                continue;
            }
            self.session.offer_event(p.frame, p.conflate, stats);
        }
    }
}

/// A story greeting frame's fingerprint for [`Member::release_story`]: never 0 (none) nor
/// [`HOLDING`].
pub(super) fn frame_hash(frame: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    frame.hash(&mut h);
    h.finish().clamp(1, HOLDING - 1)
}

#[cfg(test)]
mod tests {
    /// Every connection carries one member per project it follows: keep it small.
    #[test]
    fn a_member_is_two_words() {
        assert_eq!(std::mem::size_of::<super::Member>(), 16);
    }
}
