//! A timing wheel of one-second slots: when each connection next needs the shared timer.
//!
//! The heartbeat module ([`crate::heartbeat`]) used to walk every session every second to
//! find the few whose beat, idle limit or expiry had come; at 100k connections that walk
//! alone was a stall per second (issue 13). Here each connection has one *main* entry, in
//! the slot of the second it is next due; a tick takes only the entries of its second,
//! handles them and puts each back at its own next second. Work per tick is therefore
//! proportional to the connections due then, not to all of them.
//!
//! Invariants: an entry holds a [`Weak`] reference (the wheel never keeps a connection
//! alive; an ended one is dropped when its entry comes up); entries are taken only when
//! their second has come, in slot order, and an entry due further out than the wheel's
//! span waits in its slot for another turn; a main entry is put back only by whoever took
//! it, so each connection has at most one (plus *one-shot* entries, for a deadline that
//! moved earlier, e.g. a refreshed credential with a shorter expiry: those are never put
//! back). 16 bytes per connection.

use std::sync::{Arc, Weak};

use parking_lot::Mutex;

/// Seconds the wheel spans (slots): deadlines further out go round again.
const SPAN: u64 = 128;

/// Marks a one-shot entry (`since` of a main entry is the second it was last handled).
const ONE_SHOT: u32 = u32::MAX;

/// One scheduled item.
pub struct Entry<T> {
    pub item: Weak<T>,
    /// Due second, relative to the wheel's origin.
    at: u32,
    /// Main entry: the second it was last handled (or registered), relative to the origin.
    since: u32,
}

impl<T> Entry<T> {
    /// The second (UNIX) a main entry was last handled at; None for a one-shot entry.
    pub fn since(&self, origin: u64) -> Option<u64> {
        (self.since != ONE_SHOT).then(|| origin + u64::from(self.since))
    }
}

pub struct Wheel<T> {
    /// UNIX second of slot 0's first turn; entries store seconds relative to it (u32: 136
    /// years).
    origin: u64,
    slots: Mutex<Vec<Vec<Entry<T>>>>,
    /// The longest a main entry waits between two turns (its owner's promise, see
    /// [`Wheel::set_max_gap`]): a one-shot entry later than that is not needed.
    max_gap: std::sync::atomic::AtomicU64,
}

impl<T> Wheel<T> {
    /// A wheel whose seconds count from `origin` (UNIX seconds; nothing earlier is due).
    pub fn new(origin: u64) -> Self {
        Self {
            origin,
            slots: Mutex::new((0..SPAN).map(|_| Vec::new()).collect()),
            max_gap: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    /// Declares that every main entry is put back at most `secs` after it was taken (the
    /// heartbeat: every connection beats once per interval), so [`Wheel::once`] can skip
    /// a check further out than that: the main entry comes first and sees the new
    /// deadline. This also bounds what one-shot entries a client can cause.
    pub fn set_max_gap(&self, secs: u64) {
        self.max_gap
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn origin(&self) -> u64 {
        self.origin
    }

    fn rel(&self, secs: u64) -> u32 {
        u32::try_from(secs.saturating_sub(self.origin)).unwrap_or(ONE_SHOT - 1)
    }

    /// Schedules `item`'s main entry at second `at`, last handled at `since`.
    pub fn schedule(&self, item: &Arc<T>, at: u64, since: u64) {
        self.put(Entry {
            item: Arc::downgrade(item),
            at: self.rel(at),
            since: self.rel(since),
        });
    }

    /// Schedules a one-shot check of `item` at second `at` (`now`: the current second),
    /// unless its main entry comes up before then anyway (see [`Wheel::set_max_gap`]).
    pub fn once(&self, item: &Arc<T>, at: u64, now: u64) {
        let gap = self.max_gap.load(std::sync::atomic::Ordering::Relaxed);
        if at.saturating_sub(now) > gap {
            return;
        }
        self.put(Entry {
            item: Arc::downgrade(item),
            at: self.rel(at),
            since: ONE_SHOT,
        });
    }

    /// Puts back a main entry taken by [`Wheel::take`], due at `at`, handled at `now`.
    pub fn reschedule(&self, entries: impl IntoIterator<Item = (Weak<T>, u64, u64)>) {
        let mut slots = self.slots.lock();
        for (item, at, now) in entries {
            let at = self.rel(at);
            slots[(u64::from(at) % SPAN) as usize].push(Entry {
                item,
                at,
                since: self.rel(now),
            });
        }
    }

    fn put(&self, entry: Entry<T>) {
        let slot = (u64::from(entry.at) % SPAN) as usize;
        self.slots.lock()[slot].push(entry);
    }

    /// Takes the entries due at `second` (UNIX) from its slot; those due on a later turn
    /// stay. Entries whose item is gone are dropped here.
    pub fn take(&self, second: u64) -> Vec<Entry<T>> {
        let rel = self.rel(second);
        let mut slots = self.slots.lock();
        let slot = &mut slots[(u64::from(rel) % SPAN) as usize];
        let all = std::mem::take(slot);
        let mut due = Vec::with_capacity(all.len());
        for entry in all {
            if entry.item.strong_count() == 0 {
                continue;
            }
            if entry.at <= rel {
                due.push(entry);
            } else {
                slot.push(entry);
            }
        }
        due
    }

    /// Entries in the wheel (tests, metrics).
    pub fn len(&self) -> usize {
        self.slots.lock().iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bounds work done in one go by time: a loop over many items asks [`Slice::over`] after
/// each item and yields to the runtime when it says so (issue 13: a beat is a socket write,
/// ~15 µs on loopback, so 1,000 of them in a row held fan-out for 15 ms; a count of items
/// cannot bound that, a clock can).
pub struct Slice {
    started: std::time::Instant,
    budget: std::time::Duration,
}

impl Slice {
    pub fn new(budget: std::time::Duration) -> Self {
        Self {
            started: std::time::Instant::now(),
            budget,
        }
    }

    /// Called after each item (the clock read is ~25 ns, an item here is a socket write or
    /// more); true when the slice's time is spent: the caller yields, and the next slice
    /// starts.
    pub fn over(&mut self) -> bool {
        if self.started.elapsed() < self.budget {
            return false;
        }
        self.started = std::time::Instant::now();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_comes_up_at_its_second_only() {
        let wheel = Wheel::new(1_000);
        let a = Arc::new(1);
        wheel.schedule(&a, 1_005, 1_000);
        assert!(wheel.take(1_004).is_empty());
        let due = wheel.take(1_005);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].since(1_000), Some(1_000));
        assert!(wheel.take(1_005).is_empty(), "taken once");
    }

    #[test]
    fn a_deadline_past_the_span_waits_for_its_turn() {
        let wheel = Wheel::new(0);
        let a = Arc::new(1);
        wheel.schedule(&a, 10 + SPAN, 0);
        assert!(wheel.take(10).is_empty(), "same slot, next turn");
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.take(10 + SPAN).len(), 1);
    }

    #[test]
    fn a_dropped_item_leaves_the_wheel_when_its_slot_comes_up() {
        let wheel = Wheel::new(0);
        let a = Arc::new(1);
        wheel.schedule(&a, 3, 0);
        drop(a);
        assert!(wheel.take(3).is_empty());
        assert!(wheel.is_empty());
    }

    #[test]
    fn one_shot_entries_are_marked() {
        let wheel = Wheel::new(0);
        let a = Arc::new(1);
        wheel.once(&a, 2, 0);
        let due = wheel.take(2);
        assert_eq!(due[0].since(0), None);
        wheel.reschedule([(Arc::downgrade(&a), 9, 2)]);
        assert_eq!(wheel.take(9)[0].since(0), Some(2));
    }

    #[test]
    fn a_one_shot_beyond_the_main_entries_gap_is_not_kept() {
        let wheel = Wheel::new(0);
        let a = Arc::new(1);
        wheel.set_max_gap(30);
        wheel.once(&a, 100, 50);
        assert!(wheel.is_empty(), "the main entry comes up first");
        wheel.once(&a, 70, 50);
        assert_eq!(wheel.len(), 1);
    }
}
