//! The resume tail of one project: its recent events, contiguous by seq, in memory.
//!
//! Once a resume has read the history, the stream records every live event after it here,
//! so the next resuming clients of that project (a whole restart's worth of them) are
//! served from memory. Invariants: the events held are contiguous by seq and of one epoch
//! (a gap, a seq going backwards or another epoch forgets them all); they are bounded in
//! count (`events.history_max_len`) and in frame bytes (`events.replay_max_bytes`), oldest
//! dropped first; a client is served only when the tail reaches back to its `last_seq`.

use std::collections::VecDeque;

use crate::broker::Position;
use crate::event::Prepared;

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
    /// Called by the stream for every admitted event with a seq (the outage catch-up's
    /// duplicates were already dropped).
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
    pub(super) fn forget_unless_epoch(&mut self, epoch: &str) {
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

    pub(super) fn start_recording(&mut self, capacity: usize, max_bytes: usize) {
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
    pub(super) fn serve(
        &self,
        after: u64,
        epoch: Option<&str>,
    ) -> Option<(Vec<Prepared>, u64, String)> {
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
    pub(super) fn merge(&mut self, position: &Position, read: Vec<(u64, Option<Prepared>)>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(seq: u64) -> Prepared {
        crate::event::prepare_project_event(
            "p",
            format!(r#"{{"type":"file.changed","project_id":"p","timestamp":"2026-01-01T00:00:00Z","seq":{seq}}}"#)
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
