//! Client frames at the byte level (RFC 6455 as PROTOCOL §4 relies on it): messages split
//! over continuation frames are reassembled, the size limit applies to the whole message
//! (1009), and frames a client must not send (unmasked) close the connection (1002).
//! The gateway parses client frames itself, so these go over a raw socket.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);

/// A masked client frame.
fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
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

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

enum Server {
    Text(String),
    Close(u16),
}

impl Raw {
    async fn connect(gw: &Gateway, project: &str) -> Raw {
        let token = gw.token("wire", &[project]);
        let mut s = TcpStream::connect(gw.addr()).await.unwrap();
        let req = format!(
            "GET /ws/{project}?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new() };
        loop {
            if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                raw.buf.drain(..end + 4);
                break;
            }
            raw.fill().await;
        }
        raw
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(T, self.s.read(&mut chunk))
            .await
            .expect("read timed out")
            .unwrap();
        assert!(n > 0, "connection closed without a close frame");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Next server frame (server frames are unmasked; pings skipped).
    async fn next(&mut self) -> Server {
        loop {
            if self.buf.len() >= 2 {
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut n = [0u8; 8];
                        n.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(n) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload: Vec<u8> = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    match opcode {
                        0x1 => return Server::Text(String::from_utf8(payload).unwrap()),
                        0x8 => return Server::Close(u16::from_be_bytes([payload[0], payload[1]])),
                        _ => continue,
                    }
                }
            }
            self.fill().await;
        }
    }

    async fn next_json(&mut self) -> Value {
        loop {
            match self.next().await {
                Server::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::String(t));
                    if v["type"] == "status" || v["type"] == "system.heartbeat" {
                        continue;
                    }
                    return v;
                }
                Server::Close(c) => panic!("closed with {c}"),
            }
        }
    }

    async fn expect_close(&mut self, code: u16) {
        loop {
            match self.next().await {
                Server::Close(c) => {
                    assert_eq!(c, code);
                    return;
                }
                Server::Text(_) => continue,
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }
}

#[tokio::test]
async fn fragmented_message_is_reassembled_and_frames_may_straddle_reads() {
    let gw = GatewayOpts::new().embedded().start();
    let mut c = Raw::connect(&gw, "w1").await;
    assert_eq!(c.next_json().await["type"], "connection.established");
    // {"type":"ping"} in three fragments, with a WebSocket ping between them (allowed).
    let mut bytes = frame(false, 0x1, br#"{"type""#, true);
    bytes.extend(frame(false, 0x0, br#":"pi"#, true));
    bytes.extend(frame(true, 0x9, b"hb", true));
    bytes.extend(frame(true, 0x0, br#"ng"}"#, true));
    // Byte by byte: the parser must keep partial frames across reads.
    for b in bytes {
        c.send(&[b]).await;
    }
    assert_eq!(c.next_json().await["type"], "pong");
    // Two messages in one write.
    let mut two = frame(true, 0x1, b"ping", true);
    two.extend(frame(true, 0x1, b"ping", true));
    c.send(&two).await;
    assert_eq!(c.next_json().await, Value::String("pong".into()));
    assert_eq!(c.next_json().await, Value::String("pong".into()));
}

#[tokio::test]
async fn the_size_limit_applies_to_the_whole_fragmented_message() {
    let gw = GatewayOpts::new()
        .embedded()
        .cfg("ws", "max_message_bytes", "1024")
        .start();
    let mut c = Raw::connect(&gw, "w2").await;
    assert_eq!(c.next_json().await["type"], "connection.established");
    let mut bytes = frame(false, 0x1, &[b' '; 600], true);
    bytes.extend(frame(true, 0x0, &[b' '; 600], true));
    c.send(&bytes).await;
    c.expect_close(1009).await;
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_with_1002_and_others_are_unaffected() {
    let gw = GatewayOpts::new().embedded().start();
    let mut other = Raw::connect(&gw, "w3").await;
    assert_eq!(other.next_json().await["type"], "connection.established");
    let mut c = Raw::connect(&gw, "w3").await;
    assert_eq!(c.next_json().await["type"], "connection.established");
    c.send(&frame(true, 0x1, b"ping", false)).await;
    c.expect_close(1002).await;
    other.send(&frame(true, 0x1, b"ping", true)).await;
    assert_eq!(other.next_json().await, Value::String("pong".into()));
}
