//! One connection's bounded outbound queue.
//!
//! Fan-out and the connection's own reader push prebuilt frames here with [`Outbox::offer`],
//! which never blocks and never awaits: it either queues, conflates, or reports overflow.
//! The connection's writer task drains everything queued in one go ([`Outbox::drain`]) and
//! writes it with one vectored write. Invariants:
//! - the queue never exceeds its message and byte bounds (control frames the gateway must
//!   send on the way out — close, `container.reconnect` — may exceed them by those frames);
//! - when full, queued progress events with the same subject as a newer one are dropped
//!   first (they are superseded); only then is the connection declared a slow consumer;
//! - once closing, nothing but the closing frames is accepted, and they are the last bytes
//!   the writer sends.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub messages: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Queued after dropping superseded progress events.
    Conflated,
    /// No room even after conflation: the caller must close the connection (4500).
    Overflow,
    /// The connection is closing; the frame was discarded.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Closing frames are queued; the writer sends the rest and then stops.
    Closing,
}

struct Entry {
    frame: Bytes,
    conflate: Option<u64>,
}

struct Inner {
    queue: VecDeque<Entry>,
    bytes: usize,
    state: State,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    limits: Limits,
}

/// What the writer should do after writing a drained batch.
pub struct Batch {
    pub frames: Vec<Bytes>,
    /// The batch ends with the closing frames: write them, then stop.
    pub last: bool,
}

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                state: State::Open,
            }),
            notify: Notify::new(),
            limits,
        }
    }

    /// Queues one frame without waiting. `conflate` marks a progress event that a newer
    /// one with the same key supersedes.
    pub fn offer(&self, frame: Bytes, conflate: Option<u64>) -> Offer {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return Offer::Closed;
        }
        let len = frame.len();
        let fits =
            |i: &Inner| i.queue.len() < self.limits.messages && i.bytes + len <= self.limits.bytes;
        let mut outcome = Offer::Queued;
        if !fits(&inner) {
            compact(&mut inner, conflate);
            if !fits(&inner) {
                return Offer::Overflow;
            }
            outcome = Offer::Conflated;
        }
        let was_empty = inner.queue.is_empty();
        inner.bytes += len;
        inner.queue.push_back(Entry { frame, conflate });
        drop(inner);
        if was_empty {
            self.notify.notify_one();
        }
        outcome
    }

    /// Queues a frame in front of everything else (the greeting a session must send
    /// before any event queued while its handshake was completing).
    pub fn push_front(&self, frame: Bytes) {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return;
        }
        inner.bytes += frame.len();
        inner.queue.push_front(Entry {
            frame,
            conflate: None,
        });
        drop(inner);
        self.notify.notify_one();
    }

    /// Ends the queue: `discard_pending` drops what is queued (a slow consumer will
    /// resume from history anyway), otherwise it is flushed first; then `frames` are sent
    /// and the writer stops. Returns false if the outbox was already closing.
    pub fn close(&self, frames: &[Bytes], discard_pending: bool) -> bool {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return false;
        }
        if discard_pending {
            inner.queue.clear();
            inner.bytes = 0;
        }
        for f in frames {
            inner.bytes += f.len();
            inner.queue.push_back(Entry {
                frame: f.clone(),
                conflate: None,
            });
        }
        inner.state = State::Closing;
        drop(inner);
        self.notify.notify_one();
        true
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_closing(&self) -> bool {
        self.inner.lock().state != State::Open
    }

    /// Queued messages and bytes, for tests and health reporting.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.queue.len(), inner.bytes)
    }

    /// Takes everything queued. An empty batch with `last == false` means "wait".
    pub fn drain(&self) -> Batch {
        let mut inner = self.inner.lock();
        let frames: Vec<Bytes> = inner.queue.drain(..).map(|e| e.frame).collect();
        inner.bytes = 0;
        Batch {
            frames,
            last: inner.state == State::Closing,
        }
    }

    /// Waits until something is queued (or closing begins).
    pub async fn ready(&self) {
        self.notify.notified().await
    }
}

/// Drops every queued progress event superseded by a newer one with the same key
/// (including the incoming one, `incoming`). Order of the survivors is kept.
fn compact(inner: &mut Inner, incoming: Option<u64>) {
    let mut seen: HashSet<u64> = HashSet::new();
    if let Some(k) = incoming {
        seen.insert(k);
    }
    let mut kept: VecDeque<Entry> = VecDeque::with_capacity(inner.queue.len());
    let mut bytes = 0;
    while let Some(entry) = inner.queue.pop_back() {
        if let Some(k) = entry.conflate {
            if !seen.insert(k) {
                continue;
            }
        }
        bytes += entry.frame.len();
        kept.push_front(entry);
    }
    inner.queue = kept;
    inner.bytes = bytes;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(messages: usize) -> Outbox {
        Outbox::new(Limits {
            messages,
            bytes: 1 << 20,
        })
    }

    #[test]
    fn bounded_by_messages_and_bytes() {
        let o = outbox(2);
        assert_eq!(o.offer(Bytes::from_static(b"a"), None), Offer::Queued);
        assert_eq!(o.offer(Bytes::from_static(b"b"), None), Offer::Queued);
        assert_eq!(o.offer(Bytes::from_static(b"c"), None), Offer::Overflow);
        let o = Outbox::new(Limits {
            messages: 100,
            bytes: 3,
        });
        assert_eq!(o.offer(Bytes::from_static(b"ab"), None), Offer::Queued);
        assert_eq!(o.offer(Bytes::from_static(b"cd"), None), Offer::Overflow);
    }

    #[test]
    fn progress_is_conflated_before_overflow() {
        let o = outbox(3);
        o.offer(Bytes::from_static(b"p1-old"), Some(1));
        o.offer(Bytes::from_static(b"other"), None);
        o.offer(Bytes::from_static(b"p2"), Some(2));
        assert_eq!(
            o.offer(Bytes::from_static(b"p1-new"), Some(1)),
            Offer::Conflated
        );
        let b = o.drain();
        assert_eq!(b.frames, vec!["other", "p2", "p1-new"]);
    }

    #[test]
    fn close_flushes_or_discards_and_then_refuses() {
        let o = outbox(10);
        o.offer(Bytes::from_static(b"e1"), None);
        assert!(o.close(&[Bytes::from_static(b"bye")], false));
        assert_eq!(o.offer(Bytes::from_static(b"late"), None), Offer::Closed);
        let b = o.drain();
        assert!(b.last);
        assert_eq!(b.frames, vec!["e1", "bye"]);

        let o = outbox(10);
        o.offer(Bytes::from_static(b"e1"), None);
        o.close(&[Bytes::from_static(b"bye")], true);
        assert_eq!(o.drain().frames, vec!["bye"]);
    }

    #[test]
    fn greeting_goes_first() {
        let o = outbox(10);
        o.offer(Bytes::from_static(b"event"), None);
        o.push_front(Bytes::from_static(b"hello"));
        assert_eq!(o.drain().frames, vec!["hello", "event"]);
    }
}
