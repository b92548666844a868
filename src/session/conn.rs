//! The two tasks that own an upgraded socket: reader and writer.
//!
//! The reader parses client frames with fastwebsockets (auto-pong and auto-close off: we
//! answer through the outbox, so every byte to the client goes through one ordered queue)
//! and hands text messages to [`super::messages`]. The writer drains the outbox and writes
//! each batch with one vectored write of the prebuilt frames. `read_frame` is not
//! cancel-safe, so it is only ever cancelled when the whole connection is being torn down.
//! Whatever ends the connection, the cleanup at the end of [`run`] runs exactly once.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::messages::{self, ClientState};
use super::{close_code, Session};
use crate::app::App;
use crate::frame;
use crate::limits::ConnectionGuard;

/// Runs a session from the completed upgrade to its end.
pub async fn run(
    app: Arc<App>,
    session: Arc<Session>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    guard: ConnectionGuard,
    resume: Option<crate::resume::ResumeRequest>,
) {
    // Runs while the 101 is on its way; live events wait behind the session's gate.
    crate::resume::greet(&app, &session, resume).await;
    match upgrade.await {
        Ok(ws) => {
            let io = ws.into_inner();
            let (rd, wr) = tokio::io::split(io);
            let (mut reader, _) =
                fastwebsockets::after_handshake_split(rd, tokio::io::sink(), Role::Server);
            reader.set_auto_close(false);
            reader.set_auto_pong(false);
            // fastwebsockets refuses frames of `>= max`; ours is inclusive.
            reader.set_max_message_size(app.config.ws.max_message_bytes + 1);
            let writer = tokio::spawn(write_loop(session.clone(), wr));
            tokio::select! {
                _ = read_loop(&app, &session, &mut reader) => {}
                _ = session.cancel.cancelled() => {}
            }
            if !session.outbox.is_closing() {
                // The client went away without a close handshake.
                session.abort();
            }
            let _ = writer.await;
        }
        Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
    }
    session.abort();
    app.hub.unregister(&session);
    app.broker
        .delete_connection(&session.client_id, &session.projects())
        .await;
    drop(guard);
    tracing::debug!(client_id = %session.client_id, "session ended");
}

async fn read_loop<S>(
    app: &App,
    session: &Arc<Session>,
    reader: &mut fastwebsockets::WebSocketRead<S>,
) where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut state = ClientState::new(&app.config.ws);
    let max = app.config.ws.max_message_bytes;
    // A message split over continuation frames is reassembled here, bounded by `max`.
    let mut partial: Option<Vec<u8>> = None;
    let mut no_send = |_frame| std::future::ready(Ok::<(), std::io::Error>(()));
    loop {
        let frame = match reader.read_frame(&mut no_send).await {
            Ok(frame) => frame,
            Err(WebSocketError::FrameTooLarge) => {
                session.close(close_code::TOO_BIG, "message too big", false);
                return;
            }
            Err(WebSocketError::ConnectionClosed | WebSocketError::UnexpectedEOF) => return,
            Err(WebSocketError::IoError(_)) => return,
            Err(e) => {
                tracing::debug!(error = %e, "protocol error from client");
                session.close(1002, "protocol error", false);
                return;
            }
        };
        session.touch();
        if session.outbox.is_closing() {
            // We are closing: only the client's close reply matters now.
            if frame.opcode == OpCode::Close {
                return;
            }
            continue;
        }
        match frame.opcode {
            OpCode::Text | OpCode::Continuation => {
                let complete = match (frame.opcode, partial.take()) {
                    (OpCode::Text, None) if frame.fin => frame.payload.to_vec(),
                    (OpCode::Text, None) => {
                        partial = Some(frame.payload.to_vec());
                        continue;
                    }
                    (OpCode::Continuation, Some(mut buf)) => {
                        if buf.len() + frame.payload.len() > max {
                            session.close(close_code::TOO_BIG, "message too big", false);
                            return;
                        }
                        buf.extend_from_slice(&frame.payload);
                        if !frame.fin {
                            partial = Some(buf);
                            continue;
                        }
                        buf
                    }
                    _ => {
                        session.close(1002, "unexpected continuation frame", false);
                        return;
                    }
                };
                match std::str::from_utf8(&complete) {
                    Ok(text) => messages::handle_text(app, session, &mut state, text).await,
                    Err(_) => {
                        session.close(1007, "text frame is not UTF-8", false);
                        return;
                    }
                }
            }
            OpCode::Binary => {
                session.close(
                    close_code::UNSUPPORTED,
                    "binary frames are not supported",
                    false,
                );
            }
            OpCode::Close => {
                session.close_echo(&frame.payload);
                return;
            }
            OpCode::Ping => session.send_control(frame::pong(&frame.payload)),
            OpCode::Pong => {}
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(session: Arc<Session>, mut wr: W) {
    loop {
        let batch = session.outbox.drain();
        if !batch.frames.is_empty() {
            let written = tokio::select! {
                r = write_all_vectored(&mut wr, &batch.frames) => r,
                _ = session.cancel.cancelled() => return,
            };
            if written.is_err() {
                session.abort();
                return;
            }
        }
        if batch.last {
            tokio::select! {
                _ = wr.shutdown() => {}
                _ = session.cancel.cancelled() => {}
            }
            return;
        }
        if batch.frames.is_empty() {
            tokio::select! {
                _ = session.outbox.ready() => {}
                _ = session.cancel.cancelled() => return,
            }
        }
    }
}

/// Writes every frame, using vectored writes so a batch costs as few syscalls as possible.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Bytes],
) -> std::io::Result<()> {
    if let [single] = frames {
        return w.write_all(single).await;
    }
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let mut bufs = &mut slices[..];
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}
