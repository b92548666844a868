//! One connection's outbound path: inline non-blocking writes, then a bounded queue.
//!
//! Fan-out and the connection's own replies call [`Outbox::offer`], which never blocks and
//! never awaits. When nothing is queued it writes the frame to the socket right away with
//! one non-blocking `send` (no task wake-up, no copy); only what the kernel does not take
//! (a partial write or EAGAIN) is queued, and the connection task drains the queue with
//! vectored writes when the socket is writable again. Invariants:
//! - bytes leave in offer order: an inline write happens only when the queue is empty, and
//!   both inline writes and drains happen under the outbox lock;
//! - the queue never exceeds its message and byte bounds (the closing frames the gateway
//!   must send on the way out may exceed them by those frames);
//! - when full, queued progress events superseded by a newer one for the same subject are
//!   dropped first; only then is the connection declared a slow consumer;
//! - a frame that was partly written is never dropped or conflated (that would corrupt the
//!   stream); once closing, nothing but the closing frames is accepted.

use std::collections::{HashSet, VecDeque};
use std::io::{ErrorKind, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Bounds of one outbox.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub messages: usize,
    pub bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Written to the socket at once.
    Written,
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
    /// Closing frames are queued; the task sends the rest and then ends the connection.
    Closing,
}

struct Entry {
    frame: Bytes,
    conflate: Option<u64>,
    /// Part of this frame is already on the wire.
    started: bool,
    /// A greeting or replay frame: bounded by the history, not by the live queue limits
    /// (a client resuming after a 4500 has by definition missed more than a queue's worth).
    exempt: bool,
}

struct Inner {
    queue: VecDeque<Entry>,
    bytes: usize,
    /// How many of `queue` / `bytes` are exempt entries (always at the front).
    exempt_len: usize,
    exempt_bytes: usize,
    state: State,
    /// The socket once the upgrade completed (None before, and after the end).
    socket: Option<Arc<TcpStream>>,
    /// A write failed: the connection is dead, stop writing.
    broken: bool,
}

pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    limits: Limits,
}

/// What [`Outbox::drain`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Everything queued is written.
    Empty,
    /// The socket is full; wait until it is writable.
    Blocked,
    /// The closing frames are written: end the connection.
    Finished,
    /// The socket failed.
    Broken,
}

/// Maximum frames per vectored write (well under IOV_MAX).
const MAX_IOV: usize = 64;

impl Outbox {
    pub fn new(limits: Limits) -> Self {
        Self {
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                exempt_len: 0,
                exempt_bytes: 0,
                state: State::Open,
                socket: None,
                broken: false,
            }),
            notify: Notify::new(),
            limits,
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Attaches the upgraded socket; what was queued before is drained by the task.
    pub fn attach(&self, socket: Arc<TcpStream>) {
        self.inner.lock().socket = Some(socket);
        self.notify.notify_one();
    }

    /// Detaches the socket (the connection ended), so its file descriptor can close.
    pub fn detach(&self) {
        let mut inner = self.inner.lock();
        inner.socket = None;
        inner.broken = true;
        inner.queue.clear();
        inner.bytes = 0;
    }

    /// Writes or queues one frame without waiting. `conflate` marks a progress event that a
    /// newer one with the same key supersedes.
    pub fn offer(&self, frame: Bytes, conflate: Option<u64>) -> Offer {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return Offer::Closed;
        }
        if inner.queue.is_empty() && !inner.broken {
            if let Some(socket) = &inner.socket {
                match socket.try_write(&frame) {
                    Ok(n) if n == frame.len() => return Offer::Written,
                    Ok(n) => {
                        // The kernel took part of it: the rest waits for writability.
                        let rest = frame.slice(n..);
                        inner.bytes += rest.len();
                        inner.queue.push_back(Entry {
                            frame: rest,
                            conflate: None,
                            started: n > 0,
                            exempt: false,
                        });
                        drop(inner);
                        self.notify.notify_one();
                        return Offer::Queued;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => {
                        inner.broken = true;
                        drop(inner);
                        self.notify.notify_one();
                        return Offer::Closed;
                    }
                }
            }
        }
        let len = frame.len();
        // Greeting/replay entries at the front do not count against the live limits.
        let fits = |i: &Inner| {
            i.queue.len() - i.exempt_len < self.limits.messages
                && i.bytes - i.exempt_bytes + len <= self.limits.bytes
        };
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
        inner.queue.push_back(Entry {
            frame,
            conflate,
            started: false,
            exempt: false,
        });
        drop(inner);
        if was_empty {
            self.notify.notify_one();
        }
        outcome
    }

    /// Queues a greeting or replay frame outside the live limits. Only valid before any
    /// live frame is queued (the session's gate guarantees it).
    pub fn offer_exempt(&self, frame: Bytes) {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return;
        }
        debug_assert_eq!(inner.queue.len(), inner.exempt_len);
        inner.bytes += frame.len();
        inner.exempt_bytes += frame.len();
        inner.exempt_len += 1;
        inner.queue.push_back(Entry {
            frame,
            conflate: None,
            started: false,
            exempt: true,
        });
        drop(inner);
        self.notify.notify_one();
    }

    /// Ends the queue: `discard_pending` drops what is queued (a slow consumer will resume
    /// from history anyway; a frame already started is kept whole), otherwise it is
    /// flushed first; then `frames` are sent and the connection ends. Returns false if the
    /// outbox was already closing.
    pub fn close(&self, frames: &[Bytes], discard_pending: bool) -> bool {
        let mut inner = self.inner.lock();
        if inner.state != State::Open {
            return false;
        }
        if discard_pending {
            inner.queue.retain(|e| e.started);
            inner.bytes = inner.queue.iter().map(|e| e.frame.len()).sum();
            inner.exempt_len = inner.queue.iter().filter(|e| e.exempt).count();
            inner.exempt_bytes = inner
                .queue
                .iter()
                .filter(|e| e.exempt)
                .map(|e| e.frame.len())
                .sum();
        }
        for f in frames {
            inner.bytes += f.len();
            inner.queue.push_back(Entry {
                frame: f.clone(),
                conflate: None,
                started: false,
                exempt: false,
            });
        }
        inner.state = State::Closing;
        drop(inner);
        self.notify.notify_one();
        true
    }

    pub fn is_closing(&self) -> bool {
        self.inner.lock().state != State::Open
    }

    /// Something is waiting to be written (the task should wait for writability).
    pub fn has_pending(&self) -> bool {
        let inner = self.inner.lock();
        !inner.queue.is_empty() && inner.socket.is_some() && !inner.broken
    }

    /// Nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.lock().queue.is_empty()
    }

    pub fn is_broken(&self) -> bool {
        self.inner.lock().broken
    }

    /// Queued messages and bytes.
    pub fn len(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        (inner.queue.len(), inner.bytes)
    }

    /// Writes as much of the queue as the socket takes, with vectored writes.
    pub fn drain(&self) -> Drained {
        let mut inner = self.inner.lock();
        if inner.broken {
            return Drained::Broken;
        }
        let Some(socket) = inner.socket.clone() else {
            return Drained::Blocked;
        };
        loop {
            if inner.queue.is_empty() {
                if inner.queue.capacity() > 0 {
                    // A backlog (or the greeting) passed: an idle connection keeps no queue
                    // memory. Even the greeting's 4 slots were 224 B of every connection.
                    inner.queue = VecDeque::new();
                }
                return if inner.state == State::Closing {
                    Drained::Finished
                } else {
                    Drained::Empty
                };
            }
            let written = {
                let slices: Vec<IoSlice<'_>> = inner
                    .queue
                    .iter()
                    .take(MAX_IOV)
                    .map(|e| IoSlice::new(&e.frame))
                    .collect();
                socket.try_write_vectored(&slices)
            };
            let mut n = match written {
                Ok(0) => {
                    inner.broken = true;
                    return Drained::Broken;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Drained::Blocked,
                Err(_) => {
                    inner.broken = true;
                    return Drained::Broken;
                }
            };
            inner.bytes = inner.bytes.saturating_sub(n);
            while n > 0 {
                let Some(front) = inner.queue.front_mut() else {
                    break;
                };
                let exempt = front.exempt;
                let taken = n.min(front.frame.len());
                if n >= front.frame.len() {
                    n -= front.frame.len();
                    inner.queue.pop_front();
                    if exempt {
                        inner.exempt_len -= 1;
                    }
                } else {
                    front.frame = front.frame.slice(n..);
                    front.started = true;
                    front.conflate = None;
                    n = 0;
                }
                if exempt {
                    inner.exempt_bytes -= taken;
                }
            }
        }
    }

    /// Waits until something is queued, the socket is attached, or closing begins.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Wakes the connection task (e.g. to notice an abort).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Takes everything queued (tests; the live path uses [`Outbox::drain`]).
    #[cfg(test)]
    pub fn take_all(&self) -> (Vec<Bytes>, bool) {
        let mut inner = self.inner.lock();
        let frames = inner.queue.drain(..).map(|e| e.frame).collect();
        inner.bytes = 0;
        inner.exempt_len = 0;
        inner.exempt_bytes = 0;
        (frames, inner.state == State::Closing)
    }
}

/// Drops every queued progress event superseded by a newer one with the same key
/// (including the incoming one). Order of the survivors is kept; started frames stay.
fn compact(inner: &mut Inner, incoming: Option<u64>) {
    let mut seen: HashSet<u64> = HashSet::new();
    if let Some(k) = incoming {
        seen.insert(k);
    }
    let mut kept: VecDeque<Entry> = VecDeque::with_capacity(inner.queue.len());
    let mut bytes = 0;
    while let Some(entry) = inner.queue.pop_back() {
        if let (Some(k), false, false) = (entry.conflate, entry.started, entry.exempt) {
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
        assert_eq!(o.take_all().0, vec!["other", "p2", "p1-new"]);
    }

    #[test]
    fn replay_frames_do_not_count_against_live_limits() {
        let o = outbox(2);
        for i in 0..10u8 {
            o.offer_exempt(Bytes::from(vec![i]));
        }
        assert_eq!(o.offer(Bytes::from_static(b"live1"), None), Offer::Queued);
        assert_eq!(o.offer(Bytes::from_static(b"live2"), None), Offer::Queued);
        assert_eq!(o.offer(Bytes::from_static(b"live3"), None), Offer::Overflow);
        assert_eq!(o.take_all().0.len(), 12);
    }

    #[test]
    fn close_flushes_or_discards_and_then_refuses() {
        let o = outbox(10);
        o.offer(Bytes::from_static(b"e1"), None);
        assert!(o.close(&[Bytes::from_static(b"bye")], false));
        assert_eq!(o.offer(Bytes::from_static(b"late"), None), Offer::Closed);
        let (frames, closing) = o.take_all();
        assert!(closing);
        assert_eq!(frames, vec!["e1", "bye"]);

        let o = outbox(10);
        o.offer(Bytes::from_static(b"e1"), None);
        o.close(&[Bytes::from_static(b"bye")], true);
        assert_eq!(o.take_all().0, vec!["bye"]);
    }

    /// Frame `i`: its number, then 64 KiB of a pattern of its own, so a lost, repeated,
    /// cut or reordered frame shows in the bytes the peer reads.
    fn numbered(i: u32) -> Bytes {
        let mut f = i.to_be_bytes().to_vec();
        f.extend((0..64 * 1024u32).map(|j| (i.wrapping_mul(31).wrapping_add(j) % 251) as u8));
        Bytes::from(f)
    }

    #[tokio::test]
    async fn writes_inline_when_the_socket_takes_it_and_queues_when_full() {
        use std::time::Duration;
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client =
            tokio::spawn(async move { tokio::net::TcpStream::connect(addr).await.unwrap() });
        let (server, _) = listener.accept().await.unwrap();
        let mut client = client.await.unwrap();
        let o = Outbox::new(Limits {
            messages: 100_000,
            bytes: 1 << 30,
        });
        o.attach(Arc::new(server));
        assert_eq!(o.offer(Bytes::from_static(b"hello"), None), Offer::Written);
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        // Everything offered from here on, in offer order: what the client must read.
        let mut expected = Vec::new();
        let mut next = 0u32;
        let mut offer = |o: &Outbox| {
            let frame = numbered(next);
            next += 1;
            expected.extend_from_slice(&frame);
            o.offer(frame, None)
        };
        // Fill the socket: the client does not read, so frames end up queued.
        let mut queued = false;
        for _ in 0..1000 {
            if offer(&o) == Offer::Queued {
                queued = true;
                break;
            }
        }
        assert!(queued, "a full socket must make frames queue");
        assert!(o.has_pending());
        // More while the queue is not empty: queued behind it, never written past it.
        for _ in 0..8 {
            assert_eq!(offer(&o), Offer::Queued);
        }
        // Reading on the client side lets drain() make progress; offers keep coming in
        // between drains, while the socket has room again and the queue is not empty.
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(n) = client.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            let mut interleaved = 0;
            loop {
                if interleaved < 8 && !o.is_empty() {
                    interleaved += 1;
                    assert_eq!(offer(&o), Offer::Queued, "written past the queue");
                }
                match o.drain() {
                    Drained::Empty => break,
                    Drained::Blocked => tokio::time::sleep(Duration::from_millis(1)).await,
                    other => panic!("{other:?}"),
                }
            }
            // Queue empty again: the next frame goes inline (or queues if the socket is
            // still full), after everything before it.
            offer(&o);
            loop {
                match o.drain() {
                    Drained::Empty => break,
                    Drained::Blocked => tokio::time::sleep(Duration::from_millis(1)).await,
                    other => panic!("{other:?}"),
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "the queue did not drain within 20 s");
        o.detach();
        drop(o);
        let got = tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the client did not read to the end within 20 s")
            .unwrap();
        let frame_len = numbered(0).len();
        if let Some(at) = got.iter().zip(&expected).position(|(g, e)| g != e) {
            let start = at - at % frame_len;
            let header = |b: &[u8]| {
                b.get(start..start + 4)
                    .map(|h| u32::from_be_bytes(h.try_into().unwrap()))
            };
            panic!(
                "byte {at} differs: offset {} of frame {}; the client read a frame starting \
                 with number {:?} there",
                at - start,
                at / frame_len,
                header(&got)
            );
        }
        assert_eq!(
            got.len(),
            expected.len(),
            "the client read {} of the {} bytes of {next} frames",
            got.len(),
            expected.len()
        );
    }
}
