//! Raw WebSocket clients on `tokio::net::TcpStream`: the HTTP upgrade by hand, server
//! frames parsed in place (they are unmasked), events recognised by byte search for
//! `"sent_ns":` and `"seq":` (no JSON parsing on the hot path). Everything runs on one
//! current-thread runtime inside a `LocalSet`, so the shared state is `Rc`/`Cell`/`RefCell`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use memchr::memmem;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::util::unix_ns;

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const READ_START: usize = 4096;
const READ_MAX: usize = 1 << 20;

/// What one client is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Reads everything, reconnects never.
    Reader,
    /// Reads everything; on close or EOF reconnects with `?last_seq=&epoch=` until the deadline.
    Resuming,
    /// Completes the upgrade, then never reads (a slow consumer).
    NeverRead,
}

/// Per-client counters and position.
#[derive(Debug, Default, Clone)]
pub struct ClientState {
    pub project: u32,
    pub connected: bool,
    pub established: bool,
    /// Seq of the project when the client first connected (from `connection.established`).
    pub baseline: Option<u64>,
    pub last_seq: u64,
    pub epoch: String,
    /// Events received in order (seq = last + 1, or the first after the baseline).
    pub received: u64,
    pub gaps: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub resyncs: u64,
    pub resumed: u64,
    pub connects: u64,
    pub close_code: Option<u16>,
    /// Since the scenario's start (ns) when the first `connection.established` arrived.
    pub established_after_ns: Option<u64>,
}

/// State shared by every client task of a scenario.
pub struct Shared {
    /// The gateways; each client connects to one of them ([`Shared::addr`]).
    pub addrs: Vec<SocketAddr>,
    pub sources: u8,
    pub start: Instant,
    pub clients: Vec<RefCell<ClientState>>,
    pub latency: RefCell<Histogram<u64>>,
    pub record_latency: Cell<bool>,
    pub established: Cell<usize>,
    pub connected: Cell<usize>,
    pub frames: Cell<u64>,
    pub bytes: Cell<u64>,
    pub events: Cell<u64>,
    pub last_event_ns: Cell<u64>,
    pub errors: RefCell<BTreeMap<String, u64>>,
    pub closes: RefCell<BTreeMap<u16, u64>>,
    /// Paths per project (`/ws/{project}?token=...`).
    pub paths: Vec<String>,
    /// Reconnects stop after this instant (Resuming mode).
    pub deadline: Cell<Option<Instant>>,
    pub handshake_timeout: Duration,
    finder_sent: memmem::Finder<'static>,
    finder_seq: memmem::FinderRev<'static>,
}

impl Shared {
    pub fn new(
        addrs: Vec<SocketAddr>,
        sources: u8,
        paths: Vec<String>,
        projects_of: impl Fn(usize) -> u32,
        n: usize,
    ) -> Rc<Self> {
        assert!(!addrs.is_empty(), "at least one gateway address");
        Rc::new(Shared {
            addrs,
            sources: sources.max(1),
            start: Instant::now(),
            clients: (0..n)
                .map(|i| {
                    RefCell::new(ClientState {
                        project: projects_of(i),
                        ..Default::default()
                    })
                })
                .collect(),
            // 1 ns .. 120 s, 3 significant figures.
            latency: RefCell::new(
                Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("histogram bounds"),
            ),
            record_latency: Cell::new(true),
            established: Cell::new(0),
            connected: Cell::new(0),
            frames: Cell::new(0),
            bytes: Cell::new(0),
            events: Cell::new(0),
            last_event_ns: Cell::new(0),
            errors: RefCell::new(BTreeMap::new()),
            closes: RefCell::new(BTreeMap::new()),
            paths,
            deadline: Cell::new(None),
            handshake_timeout: Duration::from_secs(15),
            finder_sent: memmem::Finder::new(b"\"sent_ns\":"),
            finder_seq: memmem::FinderRev::new(b"\"seq\":"),
        })
    }

    pub fn note_error(&self, what: impl Into<String>) {
        *self.errors.borrow_mut().entry(what.into()).or_insert(0) += 1;
    }

    fn source(&self, idx: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, 1 + (idx % self.sources as usize) as u8)
    }

    /// The gateway of client `idx`: round-robin over the gateways, shifted by one at each
    /// pass over the projects (clients are `i % projects`), so that every project has
    /// clients on every gateway and each gateway subscribes to every project.
    pub fn addr(&self, idx: usize) -> SocketAddr {
        let g = self.addrs.len();
        if g == 1 {
            return self.addrs[0];
        }
        let projects = self.paths.len().max(1);
        let project = self.clients[idx].borrow().project as usize;
        self.addrs[(idx / projects + project) % g]
    }

    fn path(&self, idx: usize, resume: bool) -> String {
        let st = self.clients[idx].borrow();
        let base = &self.paths[st.project as usize];
        if resume && st.established {
            format!("{base}&last_seq={}&epoch={}", st.last_seq, st.epoch)
        } else {
            base.clone()
        }
    }
}

/// Opens a TCP connection from `src` and performs the WebSocket upgrade. Returns the
/// stream and whatever bytes followed the 101 response.
pub async fn open(
    addr: SocketAddr,
    src: Ipv4Addr,
    path: &str,
    rcvbuf: Option<u32>,
) -> io::Result<(TcpStream, Vec<u8>)> {
    let sock = TcpSocket::new_v4()?;
    if let Some(b) = rcvbuf {
        sock.set_recv_buffer_size(b)?;
    }
    sock.bind(SocketAddr::new(src.into(), 0))?;
    let mut s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = vec![0u8; 2048];
    let mut n = 0;
    loop {
        if n == buf.len() {
            return Err(io::Error::other("handshake response too large"));
        }
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "eof during handshake",
            ));
        }
        n += r;
        if let Some(end) = memmem::find(&buf[..n], b"\r\n\r\n") {
            let status = buf.get(9..12).unwrap_or(b"???");
            if status != b"101" {
                return Err(io::Error::other(format!(
                    "http {}",
                    String::from_utf8_lossy(status)
                )));
            }
            buf.copy_within(end + 4..n, 0);
            buf.truncate(n - end - 4);
            return Ok((s, buf));
        }
    }
}

/// Why a connection ended.
enum End {
    Close(Option<u16>),
    Eof,
    Error(io::Error),
}

/// One client: connect (bounded by the handshake semaphore), read until the end, and in
/// Resuming mode reconnect with its position until the shared deadline.
pub async fn client_task(
    sh: Rc<Shared>,
    idx: usize,
    mode: Mode,
    sem: Option<Arc<Semaphore>>,
    rcvbuf: Option<u32>,
) {
    let mut attempts: u32 = 0;
    loop {
        attempts += 1;
        // At most `concurrency` handshakes in flight (the listen backlog is finite); the
        // permit is released at `connection.established`.
        let mut permit = match &sem {
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let path = sh.path(idx, mode == Mode::Resuming);
        let src = sh.source(idx);
        let opened =
            tokio::time::timeout(sh.handshake_timeout, open(sh.addr(idx), src, &path, rcvbuf))
                .await;
        let (stream, leftover) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                sh.note_error(format!("connect: {e}"));
                if !retry_allowed(&sh, mode, attempts) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50 + (idx % 50) as u64)).await;
                continue;
            }
            Err(_) => {
                sh.note_error("connect: handshake timeout");
                if !retry_allowed(&sh, mode, attempts) {
                    return;
                }
                continue;
            }
        };
        {
            let mut st = sh.clients[idx].borrow_mut();
            st.connects += 1;
            st.connected = true;
        }
        sh.connected.set(sh.connected.get() + 1);
        if mode == Mode::NeverRead {
            // The upgrade succeeded: count it as established and never read again.
            mark_established(&sh, idx);
            drop(permit.take());
            let _hold = stream;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        let end = read_loop(&sh, idx, stream, leftover, &mut permit).await;
        {
            let mut st = sh.clients[idx].borrow_mut();
            st.connected = false;
            if let End::Close(c) = &end {
                st.close_code = *c;
            }
        }
        sh.connected.set(sh.connected.get() - 1);
        match end {
            End::Close(c) => *sh.closes.borrow_mut().entry(c.unwrap_or(0)).or_insert(0) += 1,
            End::Eof => sh.note_error("eof"),
            End::Error(e) => sh.note_error(format!("read: {}", e.kind())),
        }
        if mode != Mode::Resuming || !retry_allowed(&sh, mode, 0) {
            return;
        }
        attempts = 0;
        tokio::time::sleep(Duration::from_millis(5 + (idx % 20) as u64)).await;
    }
}

fn retry_allowed(sh: &Shared, mode: Mode, attempts: u32) -> bool {
    match mode {
        Mode::Resuming => attempts < 400 && sh.deadline.get().is_none_or(|d| Instant::now() < d),
        _ => attempts < 3,
    }
}

fn mark_established(sh: &Shared, idx: usize) {
    let mut st = sh.clients[idx].borrow_mut();
    if !st.established {
        st.established = true;
        st.established_after_ns = Some(sh.start.elapsed().as_nanos() as u64);
        sh.established.set(sh.established.get() + 1);
    }
}

async fn read_loop(
    sh: &Shared,
    idx: usize,
    mut stream: TcpStream,
    leftover: Vec<u8>,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> End {
    let mut buf = leftover;
    let mut filled = buf.len();
    buf.resize(READ_START.max(filled * 2), 0);
    let mut pongs: Vec<u8> = Vec::new();
    let mut now = unix_ns();
    loop {
        // Parse every complete frame in buf[..filled].
        let mut pos = 0;
        let mut ended = None;
        {
            let mut st = sh.clients[idx].borrow_mut();
            let mut hist = sh.latency.borrow_mut();
            let record = sh.record_latency.get();
            let mut frames = 0u64;
            let mut events = 0u64;
            while let Some((op, start, end)) = parse_header(&buf[pos..filled]) {
                let payload = &buf[pos + start..pos + end];
                frames += 1;
                match op {
                    0x1 => {
                        if let Some(i) = sh.finder_sent.find(payload) {
                            let sent = parse_u64(&payload[i + 10..]);
                            if let Some(j) = sh.finder_seq.rfind(payload) {
                                let seq = parse_u64(&payload[j + 6..]);
                                on_event(&mut st, seq);
                                events += 1;
                            }
                            if record {
                                let _ = hist.record(now.saturating_sub(sent).max(1));
                            }
                        } else {
                            let was = st.established;
                            let is_established = cold_frame(&mut st, payload);
                            if is_established {
                                drop(st);
                                if !was {
                                    mark_established(sh, idx);
                                }
                                drop(permit.take());
                                st = sh.clients[idx].borrow_mut();
                            }
                        }
                    }
                    0x8 => {
                        let code = (payload.len() >= 2)
                            .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                        ended = Some(End::Close(code.or(st.close_code)));
                    }
                    0x9 => {
                        // Pong with the same payload, masked with a zero key.
                        pongs.push(0x8A);
                        pongs.push(0x80 | payload.len().min(125) as u8);
                        pongs.extend_from_slice(&[0, 0, 0, 0]);
                        pongs.extend_from_slice(&payload[..payload.len().min(125)]);
                    }
                    _ => {}
                }
                pos += end;
                if ended.is_some() {
                    break;
                }
            }
            sh.frames.set(sh.frames.get() + frames);
            if events > 0 {
                sh.events.set(sh.events.get() + events);
                sh.last_event_ns.set(now);
            }
        }
        if let Some(e) = ended {
            return e;
        }
        if !pongs.is_empty() {
            if let Err(e) = stream.write_all(&pongs).await {
                return End::Error(e);
            }
            pongs.clear();
        }
        if pos > 0 {
            buf.copy_within(pos..filled, 0);
            filled -= pos;
        }
        if filled == buf.len() {
            if buf.len() >= READ_MAX {
                return End::Error(io::Error::other("frame larger than the read buffer"));
            }
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[filled..]).await {
            Ok(0) => return End::Eof,
            Ok(n) => {
                filled += n;
                sh.bytes.set(sh.bytes.get() + n as u64);
                now = unix_ns();
            }
            Err(e) => return End::Error(e),
        }
    }
}

#[inline]
fn on_event(st: &mut ClientState, seq: u64) {
    if st.baseline.is_none() {
        // An event before connection.established: should not happen; count from here.
        st.baseline = Some(seq.saturating_sub(1));
        st.last_seq = seq.saturating_sub(1);
    }
    let next = st.last_seq + 1;
    if seq == next {
        st.received += 1;
        st.last_seq = seq;
    } else if seq > next {
        st.gaps += 1;
        st.missing += seq - next;
        st.received += 1;
        st.last_seq = seq;
    } else if seq == st.last_seq {
        st.duplicates += 1;
    } else {
        st.out_of_order += 1;
    }
}

/// A non-event text frame: parse it (rare). True for `connection.established`.
fn cold_frame(st: &mut ClientState, payload: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return false;
    };
    match v.get("type").and_then(|t| t.as_str()).unwrap_or("") {
        "connection.established" => {
            let seq = v.get("seq").and_then(|s| s.as_u64()).unwrap_or(0);
            let epoch = v
                .get("epoch")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_string();
            let resumed = v.get("resumed").and_then(|s| s.as_bool()).unwrap_or(false);
            if resumed {
                st.resumed += 1;
            }
            if st.baseline.is_none() {
                st.baseline = Some(seq);
                st.last_seq = seq;
            }
            st.epoch = epoch;
            true
        }
        "connection.resync_required" => {
            st.resyncs += 1;
            // A few samples on stderr: a resync is a finding worth seeing verbatim.
            static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 3 {
                eprintln!(
                    "loadgen: client at seq {} epoch {} got {}",
                    st.last_seq,
                    st.epoch,
                    String::from_utf8_lossy(payload)
                );
            }
            false
        }
        "connection.closed" => {
            let code = v.get("code").and_then(|c| c.as_u64()).unwrap_or(0) as u16;
            st.close_code = Some(code);
            false
        }
        _ => false,
    }
}

/// Header of the frame at the start of `b`: (opcode, payload start, payload end), or None
/// when the frame is not complete yet.
#[inline]
fn parse_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let op = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut hdr): (usize, usize) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
        }
        127 => {
            if b.len() < 10 {
                return None;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(a) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        // Servers never mask; skip the key (the payload would be garbled, which only
        // makes it unrecognised).
        hdr += 4;
    }
    let end = hdr.checked_add(len)?;
    (b.len() >= end).then_some((op, hdr, end))
}

#[inline]
fn parse_u64(b: &[u8]) -> u64 {
    let mut v = 0u64;
    for &c in b.iter().skip_while(|c| **c == b' ') {
        if c.is_ascii_digit() {
            v = v.wrapping_mul(10).wrapping_add((c - b'0') as u64);
        } else {
            break;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header(&[0x81, 2, b'h', b'i']), Some((1, 2, 4)));
        assert_eq!(parse_header(&[0x81, 3, b'h', b'i']), None);
        let mut f = vec![0x81, 126, 0x01, 0x00];
        f.extend(vec![b'x'; 256]);
        assert_eq!(parse_header(&f), Some((1, 4, 260)));
        assert_eq!(parse_u64(b"123,\"x\""), 123);
        assert_eq!(parse_u64(b" 7}"), 7);
    }

    #[test]
    fn every_project_on_every_gateway() {
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], 8000 + p)))
            .collect();
        for projects in [1usize, 2, 3, 4, 5, 6, 300] {
            let n = projects * 9;
            let paths = vec![String::new(); projects];
            let sh = Shared::new(addrs.clone(), 1, paths, |i| (i % projects) as u32, n);
            let mut seen = vec![[0usize; 3]; projects];
            for i in 0..n {
                let g = addrs.iter().position(|a| *a == sh.addr(i)).unwrap();
                seen[i % projects][g] += 1;
            }
            // Each project: 3 clients on each gateway; so 1/3 of all clients per gateway.
            assert!(seen.iter().all(|s| *s == [3, 3, 3]), "{projects}: {seen:?}");
        }
    }

    #[test]
    fn sequence_accounting() {
        let mut st = ClientState {
            baseline: Some(10),
            last_seq: 10,
            ..Default::default()
        };
        for s in [11, 12, 14, 14, 13, 15] {
            on_event(&mut st, s);
        }
        assert_eq!(
            (
                st.received,
                st.gaps,
                st.missing,
                st.duplicates,
                st.out_of_order
            ),
            (4, 1, 1, 1, 1)
        );
    }
}
