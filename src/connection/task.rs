//! The one task that owns an upgraded connection.
//!
//! After the upgrade (fastwebsockets checks the request and builds the 101) we take the raw
//! `TcpStream` back from hyper, so we can write to it without a task and read it without a
//! buffer, and run one loop:
//! - readable: read what is there into a stack buffer, parse client frames ([`crate::ws::wire`]),
//!   handle them ([`super::messages`]); only an incomplete frame's bytes are kept;
//! - writable (only while the outbox has a backlog): drain it with vectored writes;
//! - woken by the outbox: a backlog appeared, closing began, or the session was aborted.
//!
//! Every frame the client sends costs one unit of the connection's message budget (text
//! messages through [`messages::handle_text`], pings, pongs and fragments here); a client's
//! partial message and incomplete frame together stay within `ws.max_message_bytes` plus
//! one frame header (and one control frame interleaved). Close follows RFC 6455 §7.1.1:
//! an invalid Close is never echoed, and once both Close frames have crossed the TCP
//! connection ends at once, the server's side first.
//!
//! Nothing here is spawned per frame and no timer exists per connection except while a
//! close is in progress. Big futures (message handling, the greeting) are boxed so the
//! idle task stays small. Whatever ends the connection, the cleanup runs exactly once.

use std::io::ErrorKind;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::messages::{self, ClientState};
use crate::app::App;
use crate::event::unix_millis;
use crate::limits::ConnectionGuard;
use crate::session::outbox::Drained;
use crate::session::{Session, CLOSE_DEADLINE};
use crate::ws::close_code;
use crate::ws::frame;
use crate::ws::wire::{self, Opcode, WireError};

/// Bytes read per readiness event (on the stack, copied out only if a frame is incomplete).
const READ_CHUNK: usize = 4096;

/// The connection's task as spawned. What it logs is in the connection's span
/// ([`Session::span`], built per log line: a span held for the connection's life would cost
/// every idle connection ~0.5 KB of subscriber state).
pub fn task(
    app: Arc<App>,
    session: Arc<Session>,
    upgrade: hyper::upgrade::OnUpgrade,
    guard: ConnectionGuard,
    resume: Option<crate::stream::ResumeRequest>,
    tracked: TaskTrackerToken,
) -> impl std::future::Future<Output = ()> {
    run(app, session, upgrade, guard, resume, tracked)
}

/// How long a connection that sent its close frame first waits for the client's reply.
/// Only a client that does not answer waits this long: its reply ends the wait.
const CLOSE_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// After a complete close exchange our side of the TCP connection is shut at once (the
/// client sees the end immediately); the socket then reads and drops what the client may
/// still send for at most this long and this many bytes before it closes: closing a socket
/// with unread bytes sends a reset, which can destroy our close frame in the client's
/// receive queue before it reads it.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_millis(250);
const CLOSE_LINGER_BYTES: usize = 64 * 1024;

/// Runs a session from the upgrade to its end.
pub async fn run(
    app: Arc<App>,
    session: Arc<Session>,
    upgrade: hyper::upgrade::OnUpgrade,
    guard: ConnectionGuard,
    resume: Option<crate::stream::ResumeRequest>,
    tracked: TaskTrackerToken,
) {
    // Runs while the 101 is on its way; live events wait behind the session's gate.
    Box::pin(crate::greeting::greet(&app, &session, resume)).await;
    // Only the socket and the bytes the client already sent survive past this block: the
    // upgrade's own buffers are dropped before the long-lived loop below.
    let attached = match crate::ws::upgrade::into_tcp(upgrade).await {
        Ok((socket, early)) => Some((Arc::new(socket), early)),
        Err(e) => {
            if tracing::enabled!(tracing::Level::DEBUG) {
                session.span().in_scope(|| {
                    tracing::debug!(error = %e, "upgrade did not complete");
                });
            }
            None
        }
    };
    let mut clean = None;
    if let Some((socket, early)) = attached {
        session.outbox.attach(socket.clone());
        if serve(&app, &session, &socket, early).await == Exit::Clean {
            clean = Some(socket);
        }
    }
    session.abort();
    session.outbox.detach();
    if let Some(socket) = clean {
        // The outbox let go of its handle: the socket is ours alone now.
        if let Ok(socket) = Arc::try_unwrap(socket) {
            Box::pin(linger(socket)).await;
        }
    }
    app.hub.unregister(&session);
    // Boxed: a Redis call's future is large and would otherwise be part of every idle
    // connection's task. This only queues the deletion for the record writer (bounded by
    // the command timeout); it is queued before the drain stops waiting for this session,
    // so the drain's flush of the writer covers it (a clean shutdown left records behind).
    Box::pin(
        app.broker
            .delete_connection(&session.client_id, &session.presence_projects()),
    )
    .await;
    drop(tracked);
    if let crate::session::Scope::Commands(project) = &session.scope {
        Box::pin(app.note_command_streams(project)).await;
    }
    drop(guard);
    if tracing::enabled!(tracing::Level::DEBUG) {
        session.span().in_scope(|| tracing::debug!("session ended"));
    }
}

/// How a connection's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Our close frame is out and nothing more from the client matters: both Close frames
    /// have crossed, or the client sent a broken frame, after which its close reply could
    /// not be recognised anyway. The server closes the TCP connection now (§7.1.1).
    Clean,
    /// EOF, a socket error, an abort, the close deadline, or no close reply in time.
    Dropped,
}

async fn serve(
    app: &App,
    session: &Arc<Session>,
    socket: &TcpStream,
    mut pending: Vec<u8>,
) -> Exit {
    let mut reader = Reader::new(app);
    // Boxed and only while closing: a timer inline would cost every idle connection.
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    if !pending.is_empty() {
        Box::pin(reader.process(app, session, &mut pending)).await;
    }
    loop {
        if session.is_ended() {
            return Exit::Dropped;
        }
        match session.outbox.drain() {
            Drained::Finished => {
                // Our close frame is out. If the client's close is already in (it closed
                // first, or its reply crossed ours), the exchange is complete: end now; so
                // too after a broken frame, when its reply could not be parsed anyway.
                // Otherwise give it a moment to answer, reading (and dropping) whatever it
                // still sends meanwhile (see CLOSE_LINGER for why unread bytes matter).
                if reader.dead {
                    return Exit::Clean;
                }
                if !reader.peer_closed {
                    let _ = Box::pin(tokio::time::timeout(
                        CLOSE_REPLY_WAIT,
                        read_until_close(app, session, socket, &mut reader, &mut pending),
                    ))
                    .await;
                }
                return if reader.peer_closed {
                    Exit::Clean
                } else {
                    Exit::Dropped
                };
            }
            Drained::Broken => return Exit::Dropped,
            Drained::Empty | Drained::Blocked => {}
        }
        if deadline.is_none() && session.outbox.is_closing() {
            deadline = Some(Box::pin(tokio::time::sleep(CLOSE_DEADLINE)));
        }
        let backlog = session.outbox.has_pending();
        // After the client's close nothing it sends matters: only our closing frames do.
        let reading = !reader.peer_closed;
        tokio::select! {
            ready = readable(socket), if reading => {
                if ready.is_err() {
                    return Exit::Dropped;
                }
                match read_some(socket, &mut pending) {
                    Ok(0) => return Exit::Dropped,
                    Ok(_) => {
                        session.touch();
                        Box::pin(reader.process(app, session, &mut pending)).await;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return Exit::Dropped,
                }
            }
            ready = writable(socket), if backlog => {
                if ready.is_err() {
                    return Exit::Dropped;
                }
            }
            _ = session.outbox.ready() => {}
            _ = async {
                match deadline.as_mut() {
                    Some(d) => d.await,
                    None => std::future::pending().await,
                }
            }, if deadline.is_some() => return Exit::Dropped,
        }
    }
}

/// After our close frame: reads until the client's close reply or EOF. While closing, the
/// reader skips every other frame, and a frame over the size limit discards the rest, so
/// this keeps at most one incomplete frame (bounded by `ws.max_message_bytes`).
async fn read_until_close(
    app: &App,
    session: &Arc<Session>,
    socket: &TcpStream,
    reader: &mut Reader,
    pending: &mut Vec<u8>,
) {
    while !reader.peer_closed {
        if readable(socket).await.is_err() {
            return;
        }
        match read_some(socket, pending) {
            Ok(0) => return,
            Ok(_) => reader.process(app, session, pending).await,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// The close exchange is complete: shut our side (the client sees EOF at once, as a
/// browser's `close` event and a client's `close()` wait for it), then read and drop what
/// is still in flight, bounded by [`CLOSE_LINGER`] and [`CLOSE_LINGER_BYTES`], before the
/// socket closes.
async fn linger(mut socket: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if socket.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        let mut buf = [0u8; 1024];
        let mut left = CLOSE_LINGER_BYTES;
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Read readiness through the socket's single reader slot (`poll_read_ready`) rather than
/// `readable()`: the slot still holds the waker of hyper's connection task, which polled
/// this socket before the upgrade, and that waker keeps the finished task's memory (~1 KB)
/// alive until the slot is overwritten. Only this task polls the socket afterwards.
fn readable(socket: &TcpStream) -> impl std::future::Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| socket.poll_read_ready(cx))
}

/// Write readiness through the writer slot, for the same reason as [`readable`].
fn writable(socket: &TcpStream) -> impl std::future::Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| socket.poll_write_ready(cx))
}

/// Reads what the socket has into `pending`, through a stack buffer, so an idle connection
/// holds no read buffer at all. While a frame is incomplete it reads only what that frame
/// still needs: `pending` was sized for exactly that frame ([`Reader::process`]).
fn read_some(socket: &TcpStream, pending: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut buf = [0u8; READ_CHUNK];
    let want = match wire::peek(pending) {
        Some(head) => usize::try_from(head.total)
            .unwrap_or(usize::MAX)
            .saturating_sub(pending.len())
            .clamp(1, READ_CHUNK),
        None => READ_CHUNK,
    };
    let n = socket.try_read(&mut buf[..want])?;
    pending.extend_from_slice(&buf[..n]);
    Ok(n)
}

/// Reassembly of client messages across frames and reads.
struct Reader {
    /// A text message split over continuation frames, bounded by `max` (its capacity
    /// included: it grows exactly, never by doubling).
    partial: Option<Vec<u8>>,
    max: usize,
    /// Created on the first charged frame: idle connections never pay for it.
    state: Option<Box<ClientState>>,
    /// A frame was malformed or too big: the rest of the stream cannot be parsed and is
    /// discarded while the close drains.
    dead: bool,
    /// The client's Close frame arrived: nothing after it is read.
    peer_closed: bool,
    /// UNIX milliseconds of the last pong let through free (see [`Reader::free_pong`]).
    free_pong_at: u64,
}

impl Reader {
    fn new(app: &App) -> Self {
        Self {
            partial: None,
            max: app.config.ws.max_message_bytes,
            state: None,
            dead: false,
            peer_closed: false,
            free_pong_at: 0,
        }
    }

    /// Parses and handles every complete frame in `pending`, and leaves in it only the
    /// incomplete frame that follows, in a buffer sized for exactly that frame.
    async fn process(&mut self, app: &App, session: &Arc<Session>, pending: &mut Vec<u8>) {
        if self.dead || self.peer_closed {
            *pending = Vec::new();
            return;
        }
        let mut used = 0;
        loop {
            let buf = pending.get(used..).unwrap_or_default();
            // Before buffering a frame: would it make the message too big?
            if let Some(head) = wire::peek(buf) {
                if head.len > self.room(head.opcode) as u64 {
                    self.fail(session, WireError::TooBig);
                    break;
                }
            }
            let (frame, n) = match wire::parse(buf, self.max) {
                Ok(Some(pair)) => pair,
                Ok(None) => break,
                Err(e) => {
                    self.fail(session, e);
                    break;
                }
            };
            used += n;
            if frame.opcode == Opcode::Close {
                // The client is done. If we are closing already, this is its reply;
                // otherwise answer it. Either way nothing after it is read: whatever else
                // came in the same read is dropped, but the close frames still go out.
                if !session.outbox.is_closing() {
                    session.close_echo(&frame.payload);
                }
                self.peer_closed = true;
                break;
            }
            if session.outbox.is_closing() {
                // We are closing: only the client's close reply matters now.
                continue;
            }
            match frame.opcode {
                Opcode::Text | Opcode::Continuation => {
                    if !frame.fin {
                        // Each fragment costs like a message (an empty-continuation flood
                        // would otherwise be free); the last one is charged with the message
                        // by handle_text. A refused fragment is still kept (dropping it would
                        // corrupt the message): refusals add up to 4029 like refused texts.
                        self.charge(app, session);
                        if session.outbox.is_closing() {
                            continue;
                        }
                    }
                    let complete = match (frame.opcode, self.partial.take()) {
                        (Opcode::Text, None) if frame.fin => frame.payload,
                        (Opcode::Text, None) => {
                            self.partial = Some(frame.payload);
                            continue;
                        }
                        (Opcode::Continuation, Some(mut buf)) => {
                            if buf.len() + frame.payload.len() > self.max {
                                self.fail(session, WireError::TooBig);
                                break;
                            }
                            // Exact growth: doubling could hold twice the limit.
                            buf.reserve_exact(frame.payload.len());
                            buf.extend_from_slice(&frame.payload);
                            if !frame.fin {
                                self.partial = Some(buf);
                                continue;
                            }
                            buf
                        }
                        _ => {
                            self.fail(session, WireError::Protocol("unexpected data frame"));
                            break;
                        }
                    };
                    match String::from_utf8(complete) {
                        Ok(text) => {
                            let state = self
                                .state
                                .get_or_insert_with(|| Box::new(ClientState::new(&app.config.ws)));
                            messages::handle_text(app, session, state, &text).await;
                        }
                        Err(_) => {
                            session.close(
                                close_code::INVALID_PAYLOAD,
                                "text frame is not UTF-8",
                                false,
                            );
                        }
                    }
                }
                Opcode::Binary => {
                    session.close(
                        close_code::UNSUPPORTED,
                        "binary frames are not supported",
                        false,
                    );
                }
                Opcode::Close => {}
                Opcode::Ping => {
                    // A refused ping gets no pong: a flood cannot make us write.
                    if self.charge(app, session) {
                        session.send_control(frame::pong(&frame.payload));
                    }
                }
                Opcode::Pong => {
                    if !self.free_pong(app) {
                        self.charge(app, session);
                    }
                }
            }
        }
        if self.dead || self.peer_closed {
            *pending = Vec::new();
            return;
        }
        pending.drain(..used.min(pending.len()));
        if pending.is_empty() {
            if pending.capacity() > READ_CHUNK {
                // A big message passed: give the memory back.
                *pending = Vec::new();
            }
            return;
        }
        // An incomplete frame remains: size the buffer for exactly it (its length was
        // checked against the room above), or for the longest header while even that is
        // incomplete, so a read chunk's slack is not kept beside a partial message.
        let want = match wire::peek(pending) {
            Some(head) => usize::try_from(head.total).unwrap_or(usize::MAX),
            None => wire::MAX_HEADER,
        };
        if pending.capacity() > want {
            pending.shrink_to(want);
        }
        pending.reserve_exact(want.saturating_sub(pending.len()));
    }

    /// How long the next frame with this opcode may be: a data frame only what is left of
    /// the message limit after the partial message (a frame that could never fit is refused
    /// before it is buffered). Control frames and unknown opcodes are the parser's to refuse
    /// (1002) as soon as their header is in.
    fn room(&self, opcode: u8) -> usize {
        match opcode {
            wire::OP_CONTINUATION | wire::OP_TEXT | wire::OP_BINARY => self
                .max
                .saturating_sub(self.partial.as_ref().map_or(0, Vec::len)),
            _ => usize::MAX,
        }
    }

    /// Charges one frame to the connection's message budget, the limiter text messages use
    /// (`ws.client_messages_per_sec` / `ws.client_messages_burst`). False when refused;
    /// persistent refusals close with 4029 exactly as for text.
    fn charge(&mut self, app: &App, session: &Session) -> bool {
        let state = self
            .state
            .get_or_insert_with(|| Box::new(ClientState::new(&app.config.ws)));
        match state.admit() {
            Ok(()) => true,
            Err(close) => {
                if close {
                    session.close(close_code::RATE_LIMITED, "rate limited", false);
                }
                false
            }
        }
    }

    /// One pong per half heartbeat interval is free: a client answering our heartbeat ping
    /// is never charged for it, and an idle connection never builds its budget state.
    fn free_pong(&mut self, app: &App) -> bool {
        let now = unix_millis();
        let every = app
            .config
            .ws
            .heartbeat_interval_secs
            .saturating_mul(500)
            .max(1);
        if now.saturating_sub(self.free_pong_at) >= every {
            self.free_pong_at = now;
            true
        } else {
            false
        }
    }

    fn fail(&mut self, session: &Session, e: WireError) {
        match e {
            WireError::TooBig => session.close(close_code::TOO_BIG, "message too big", false),
            WireError::Protocol(_) => {
                session.close(close_code::PROTOCOL_ERROR, "protocol error", false)
            }
        };
        // Nothing after a broken frame can be parsed: discard the rest, let the close drain.
        self.dead = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole connection task as spawned: what every idle connection
    /// pays for.
    #[tokio::test]
    async fn connection_task_stays_small() {
        let app = App::build(crate::config::Config::default()).unwrap();
        let session = Session::new_for_test("p", app.outbox_limits());
        let mut req = http::Request::builder().body(()).unwrap();
        let upgrade = hyper::upgrade::on(&mut req);
        let guard = app.limits.acquire([127, 0, 0, 1].into()).unwrap();
        let tracked = app.sessions.token();
        let fut = task(app.clone(), session, upgrade, guard, None, tracked);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 1024, "task() future is {size} bytes");
    }

    fn test_app(tune: impl FnOnce(&mut crate::config::WsConfig)) -> Arc<App> {
        let mut config = crate::config::Config::default();
        tune(&mut config.ws);
        App::build(config).unwrap()
    }

    /// The close code of the close frame among `frames`, if any.
    fn close_of(frames: &[bytes::Bytes]) -> Option<u16> {
        frames
            .iter()
            .find(|f| f.first() == Some(&0x88))
            .and_then(|f| Some(u16::from_be_bytes([*f.get(2)?, *f.get(3)?])))
    }

    #[tokio::test]
    async fn partial_message_and_incomplete_frame_stay_within_the_limit() {
        let app = test_app(|ws| ws.max_message_bytes = 65_536);
        let session = Session::new_for_test("p", app.outbox_limits());
        let mut reader = Reader::new(&app);
        // 60,000 bytes of a message, then the start of a continuation of 5,000 more.
        let mut pending = wire::masked(0x1, false, &[b' '; 60_000]);
        let cont = wire::masked(0x0, true, &[b' '; 5_000]);
        pending.extend_from_slice(&cont[..108]);
        reader.process(&app, &session, &mut pending).await;
        assert!(!session.outbox.is_closing());
        let held = reader.partial.as_ref().map_or(0, Vec::capacity) + pending.capacity();
        assert!(held <= 65_536 + wire::MAX_HEADER, "holds {held} bytes");
        // The rest of the frame completes the message (not JSON: an error reply).
        pending.extend_from_slice(&cont[108..]);
        reader.process(&app, &session, &mut pending).await;
        assert!(reader.partial.is_none() && pending.is_empty());
        assert!(!session.outbox.is_closing());

        // A continuation that could never fit is refused from its header alone.
        let session = Session::new_for_test("p", app.outbox_limits());
        let mut reader = Reader::new(&app);
        let mut pending = wire::masked(0x1, false, &[b' '; 60_000]);
        pending.extend_from_slice(&wire::masked(0x0, true, &[b' '; 6_000])[..8]);
        reader.process(&app, &session, &mut pending).await;
        assert_eq!(
            close_of(&session.outbox.take_all().0),
            Some(close_code::TOO_BIG)
        );
        assert_eq!(pending.capacity(), 0);
    }

    #[tokio::test]
    async fn control_frames_are_charged_but_a_heartbeat_pong_is_free() {
        let app = test_app(|ws| {
            ws.client_messages_per_sec = 1;
            ws.client_messages_burst = 1;
            ws.rate_limit_close_after = 1;
        });
        let session = Session::new_for_test("p", app.outbox_limits());
        let mut reader = Reader::new(&app);
        // The text message takes the whole budget; the pong answering our heartbeat is free.
        let mut pending = wire::masked(0x1, true, b"ping");
        pending.extend(wire::masked(0xA, true, b"sb"));
        reader.process(&app, &session, &mut pending).await;
        assert!(!session.outbox.is_closing());
        // A ping now is over budget: no pong, and (one refusal allowed here) 4029.
        let mut pending = wire::masked(0x9, true, b"x");
        reader.process(&app, &session, &mut pending).await;
        let (frames, closing) = session.outbox.take_all();
        assert!(closing);
        assert_eq!(close_of(&frames), Some(close_code::RATE_LIMITED));
        assert!(frames.iter().all(|f| f.first() != Some(&0x8A)), "no pong");
        assert_eq!(&frames[0][..], b"\x81\x04pong");
    }

    /// Every idle connection pays for its task's future: keep it small (big parts boxed).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let app = App::build(crate::config::Config::default()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let socket = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let session = Session::new_for_test("p", app.outbox_limits());
        let fut = serve(&app, &session, &socket, Vec::new());
        let size = std::mem::size_of_val(&fut);
        eprintln!("serve future: {size} bytes");
        assert!(size <= 1024, "serve() future is {size} bytes");
        drop(fut);
    }
}
