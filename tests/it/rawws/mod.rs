//! A raw WebSocket client for byte-level tests (`wire.rs`, `conformance.rs`).
//!
//! The gateway parses client frames itself, so these tests write exact bytes (frames a
//! library client would refuse to send, several frames in one write, frames split across
//! writes) and read the server's frames and the end of the TCP stream as they arrive. The
//! socket is split so a test can write a flood while it reads the answers.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::common::Gateway;

/// How long any single read may wait.
pub const READ_WAIT: Duration = Duration::from_secs(10);

/// A client frame: masked unless `masked` is false (which the server must refuse).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n < 65_536 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        let mask = [7u8, 1, 9, 3];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// A masked, final client frame.
pub fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, opcode, payload, true)
}

/// A Close frame body: the code, then the reason bytes (which need not be UTF-8).
pub fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(reason);
    b
}

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    Text(String),
    Close(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Any other opcode (the server never sends one).
    Other(u8, Vec<u8>),
}

impl Server {
    /// The code of a Close frame with a body.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Server::Close(b) if b.len() >= 2 => Some(u16::from_be_bytes([b[0], b[1]])),
            _ => None,
        }
    }
}

/// The reading half: the server's frames in order, then EOF.
pub struct RawRead {
    rd: OwnedReadHalf,
    buf: Vec<u8>,
}

impl RawRead {
    /// Reads more; false on EOF (or a reset, which a test asserting on frames reports).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(READ_WAIT, self.rd.read(&mut chunk))
            .await
            .expect("read timed out")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next frame of any kind; None at EOF.
    pub async fn next_any(&mut self) -> Option<Server> {
        loop {
            if let Some(f) = self.take_frame() {
                return Some(f);
            }
            if !self.fill().await {
                assert!(self.buf.is_empty(), "EOF inside a frame");
                return None;
            }
        }
    }

    fn take_frame(&mut self) -> Option<Server> {
        let b1 = *self.buf.get(1)?;
        let (len, at) = match b1 & 0x7f {
            126 => (
                u16::from_be_bytes([*self.buf.get(2)?, *self.buf.get(3)?]) as usize,
                4,
            ),
            127 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(self.buf.get(2..10)?);
                (u64::from_be_bytes(n) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let payload = self.buf.get(at..at + len)?.to_vec();
        let opcode = self.buf[0] & 0x0f;
        self.buf.drain(..at + len);
        Some(match opcode {
            0x1 => Server::Text(String::from_utf8(payload).expect("server text is UTF-8")),
            0x8 => Server::Close(payload),
            0x9 => Server::Ping(payload),
            0xA => Server::Pong(payload),
            op => Server::Other(op, payload),
        })
    }

    /// The next frame, skipping the heartbeat's pings; panics at EOF.
    pub async fn next(&mut self) -> Server {
        loop {
            match self.next_any().await {
                Some(Server::Ping(_)) => continue,
                Some(f) => return f,
                None => panic!("connection closed without a close frame"),
            }
        }
    }

    /// The next JSON (or plain text) message, skipping snapshots and heartbeats.
    pub async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Server::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::String(t));
                    if v["type"] == "status" || v["type"] == "system.heartbeat" {
                        continue;
                    }
                    return v;
                }
                Server::Pong(_) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// Skips messages up to the server's Close frame and returns its body.
    pub async fn expect_close_body(&mut self) -> Vec<u8> {
        loop {
            match self.next().await {
                Server::Close(body) => return body,
                Server::Text(_) | Server::Pong(_) => continue,
                other => panic!("expected close, got {other:?}"),
            }
        }
    }

    /// Skips messages up to the server's Close frame and checks its code.
    pub async fn expect_close(&mut self, code: u16) {
        let body = self.expect_close_body().await;
        assert_eq!(
            Server::Close(body.clone()).close_code(),
            Some(code),
            "close body {body:?}"
        );
    }

    /// Everything the server sends until it ends the TCP stream, and how long that took.
    pub async fn read_to_eof(&mut self) -> (Vec<Server>, Duration) {
        let start = Instant::now();
        let mut frames = Vec::new();
        while let Some(f) = self.next_any().await {
            frames.push(f);
        }
        (frames, start.elapsed())
    }
}

/// A raw client connected and upgraded.
pub struct Raw {
    pub r: RawRead,
    pub w: OwnedWriteHalf,
}

impl Raw {
    /// Connects to `/ws/{project}` and completes the upgrade (the greeting is not read).
    pub async fn connect(gw: &Gateway, project: &str) -> Raw {
        let token = gw.token("wire", &[project]);
        let s = TcpStream::connect(gw.addr()).await.unwrap();
        let (rd, mut w) = s.into_split();
        let req = format!(
            "GET /ws/{project}?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        w.write_all(req.as_bytes()).await.unwrap();
        let mut r = RawRead {
            rd,
            buf: Vec::new(),
        };
        loop {
            if let Some(end) = r.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&r.buf[..end]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                r.buf.drain(..end + 4);
                break;
            }
            assert!(r.fill().await, "closed during the handshake");
        }
        Raw { r, w }
    }

    /// Connects and reads `connection.established`.
    pub async fn open(gw: &Gateway, project: &str) -> Raw {
        let mut c = Raw::connect(gw, project).await;
        assert_eq!(c.next_json().await["type"], "connection.established");
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).await.unwrap();
    }

    pub async fn next(&mut self) -> Server {
        self.r.next().await
    }

    pub async fn next_json(&mut self) -> Value {
        self.r.next_json().await
    }

    pub async fn expect_close(&mut self, code: u16) {
        self.r.expect_close(code).await
    }

    pub async fn read_to_eof(&mut self) -> (Vec<Server>, Duration) {
        self.r.read_to_eof().await
    }
}
