//! The one task that owns an upgraded connection.
//!
//! After the upgrade (fastwebsockets checks the request and builds the 101) we take the raw
//! `TcpStream` back from hyper, so we can write to it without a task and read it without a
//! buffer, and run one loop:
//! - readable: read what is there into a stack buffer, parse client frames ([`super::wire`]),
//!   handle them ([`super::messages`]); only an incomplete frame's bytes are kept;
//! - writable (only while the outbox has a backlog): drain it with vectored writes;
//! - woken by the outbox: a backlog appeared, closing began, or the session was aborted.
//!
//! Nothing here is spawned per frame and no timer exists per connection except while a
//! close is in progress. Big futures (message handling, the greeting) are boxed so the
//! idle task stays small. Whatever ends the connection, the cleanup runs exactly once.

use std::io::ErrorKind;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::messages::{self, ClientState};
use super::outbox::Drained;
use super::wire::{self, Opcode, WireError};
use super::{close_code, Session, CLOSE_DEADLINE};
use crate::app::App;
use crate::frame;
use crate::limits::ConnectionGuard;

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
    resume: Option<crate::resume::ResumeRequest>,
) -> impl std::future::Future<Output = ()> {
    run(app, session, upgrade, guard, resume)
}

/// How long a closed connection waits for the client's close reply.
const CLOSE_REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs a session from the upgrade to its end.
pub async fn run(
    app: Arc<App>,
    session: Arc<Session>,
    upgrade: hyper::upgrade::OnUpgrade,
    guard: ConnectionGuard,
    resume: Option<crate::resume::ResumeRequest>,
) {
    // Runs while the 101 is on its way; live events wait behind the session's gate.
    Box::pin(crate::resume::greet(&app, &session, resume)).await;
    // Only the socket and the bytes the client already sent survive past this block: the
    // upgrade's own buffers are dropped before the long-lived loop below.
    let attached = match upgrade.await {
        Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                // `read_buf` may be a slice of hyper's whole read buffer: copy what the client
                // already sent and let that buffer go now.
                let early = parts.read_buf.to_vec();
                Some((Arc::new(parts.io.into_inner()), early))
            }
            Err(_) => {
                session.span().in_scope(|| {
                    tracing::error!("upgraded connection is not a TCP stream");
                });
                None
            }
        },
        Err(e) => {
            if tracing::enabled!(tracing::Level::DEBUG) {
                session.span().in_scope(|| {
                    tracing::debug!(error = %e, "upgrade did not complete");
                });
            }
            None
        }
    };
    if let Some((socket, early)) = attached {
        session.outbox.attach(socket.clone());
        serve(&app, &session, &socket, early).await;
    }
    session.abort();
    session.outbox.detach();
    app.hub.unregister(&session);
    // Boxed: a Redis call's future is large and would otherwise be part of every idle
    // connection's task.
    Box::pin(
        app.broker
            .delete_connection(&session.client_id, &session.projects()),
    )
    .await;
    drop(guard);
    if tracing::enabled!(tracing::Level::DEBUG) {
        session.span().in_scope(|| tracing::debug!("session ended"));
    }
}

/// What the read side decided.
enum Read {
    /// Keep going.
    More,
    /// The client closed or the socket failed: end now.
    End,
}

async fn serve(app: &App, session: &Arc<Session>, socket: &TcpStream, mut pending: Vec<u8>) {
    let mut reader = Reader::new(app);
    // Boxed and only while closing: a timer inline would cost every idle connection.
    let mut deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    if !pending.is_empty() {
        if let Read::End = Box::pin(reader.process(app, session, &mut pending)).await {
            return;
        }
    }
    loop {
        if session.is_ended() {
            return;
        }
        match session.outbox.drain() {
            Drained::Finished => {
                // Our close frame is out; give the client a moment to answer it, reading
                // (and dropping) whatever it still sends meanwhile: a socket closed with
                // unread bytes sends a reset, and a reset can destroy our close frame in the
                // client's receive queue before it reads it (a flooding client would never
                // learn why it was closed).
                let _ = Box::pin(tokio::time::timeout(
                    CLOSE_REPLY_WAIT,
                    read_until_close(app, session, socket, &mut reader, &mut pending),
                ))
                .await;
                return;
            }
            Drained::Broken => return,
            Drained::Empty | Drained::Blocked => {}
        }
        if deadline.is_none() && session.outbox.is_closing() {
            deadline = Some(Box::pin(tokio::time::sleep(CLOSE_DEADLINE)));
        }
        let backlog = session.outbox.has_pending();
        tokio::select! {
            ready = readable(socket) => {
                if ready.is_err() {
                    return;
                }
                match read_some(socket, &mut pending) {
                    Ok(0) => return,
                    Ok(_) => {
                        session.touch();
                        if let Read::End = Box::pin(reader.process(app, session, &mut pending)).await {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
            ready = writable(socket), if backlog => {
                if ready.is_err() {
                    return;
                }
            }
            _ = session.outbox.ready() => {}
            _ = async {
                match deadline.as_mut() {
                    Some(d) => d.await,
                    None => std::future::pending().await,
                }
            }, if deadline.is_some() => return,
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
    loop {
        if readable(socket).await.is_err() {
            return;
        }
        match read_some(socket, pending) {
            Ok(0) => return,
            Ok(_) => {
                if let Read::End = reader.process(app, session, pending).await {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
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
/// holds no read buffer at all.
fn read_some(socket: &TcpStream, pending: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut buf = [0u8; READ_CHUNK];
    let n = socket.try_read(&mut buf)?;
    pending.extend_from_slice(&buf[..n]);
    Ok(n)
}

/// Reassembly of client messages across frames and reads.
struct Reader {
    /// A text message split over continuation frames, bounded by `max`.
    partial: Option<Vec<u8>>,
    max: usize,
    /// Created on the first message: idle connections never pay for it.
    state: Option<Box<ClientState>>,
    /// A frame was malformed or too big: the rest of the stream cannot be parsed and is
    /// discarded while the close drains.
    dead: bool,
}

impl Reader {
    fn new(app: &App) -> Self {
        Self {
            partial: None,
            max: app.config.ws.max_message_bytes,
            state: None,
            dead: false,
        }
    }

    async fn process(&mut self, app: &App, session: &Arc<Session>, pending: &mut Vec<u8>) -> Read {
        if self.dead {
            *pending = Vec::new();
            return Read::More;
        }
        let mut used = 0;
        let outcome = loop {
            let buf = &pending[used..];
            if let Some(len) = wire::declared_len(buf) {
                if len > self.max as u64 {
                    break self.fail(session, WireError::TooBig);
                }
            }
            let (frame, n) = match wire::parse(buf, self.max) {
                Ok(Some(pair)) => pair,
                Ok(None) => break Read::More,
                Err(e) => break self.fail(session, e),
            };
            used += n;
            if session.outbox.is_closing() {
                // We are closing: only the client's close reply matters now.
                if frame.opcode == Opcode::Close {
                    break Read::End;
                }
                continue;
            }
            match frame.opcode {
                Opcode::Text | Opcode::Continuation => {
                    let complete = match (frame.opcode, self.partial.take()) {
                        (Opcode::Text, None) if frame.fin => frame.payload,
                        (Opcode::Text, None) => {
                            self.partial = Some(frame.payload);
                            continue;
                        }
                        (Opcode::Continuation, Some(mut buf)) => {
                            if buf.len() + frame.payload.len() > self.max {
                                break self.fail(session, WireError::TooBig);
                            }
                            buf.extend_from_slice(&frame.payload);
                            if !frame.fin {
                                self.partial = Some(buf);
                                continue;
                            }
                            buf
                        }
                        _ => {
                            break self
                                .fail(session, WireError::Protocol("unexpected continuation"))
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
                            session.close(1007, "text frame is not UTF-8", false);
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
                Opcode::Close => {
                    session.close_echo(&frame.payload);
                    break Read::More;
                }
                Opcode::Ping => session.send_control(frame::pong(&frame.payload)),
                Opcode::Pong => {}
            }
        };
        if self.dead {
            *pending = Vec::new();
            return outcome;
        }
        pending.drain(..used.min(pending.len()));
        if pending.is_empty() && pending.capacity() > READ_CHUNK {
            // A big message passed: give the memory back.
            *pending = Vec::new();
        }
        outcome
    }

    fn fail(&mut self, session: &Session, e: WireError) -> Read {
        match e {
            WireError::TooBig => session.close(close_code::TOO_BIG, "message too big", false),
            WireError::Protocol(_) => session.close(1002, "protocol error", false),
        };
        // Nothing after a broken frame can be parsed: discard the rest, let the close drain.
        self.dead = true;
        Read::More
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
        let fut = task(app.clone(), session, upgrade, guard, None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= 1024, "task() future is {size} bytes");
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
