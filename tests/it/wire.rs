//! Client frames at the byte level (RFC 6455 as docs/protocol.md §4 relies on it): messages split
//! over continuation frames are reassembled, the size limit applies to the whole message
//! (1009), and frames a client must not send (unmasked) close the connection (1002).
//! Every frame costs one unit of the per-connection message budget, control frames and
//! fragments included, so floods of them end in 4029 like text floods (while a client
//! answering our heartbeat pings is never charged for it). The gateway parses client
//! frames itself, so these go over a raw socket.

use std::time::Duration;

use crate::common::*;
use crate::rawws::{frame, masked, Raw, Server};
use serde_json::Value;

#[tokio::test]
async fn fragmented_message_is_reassembled_and_frames_may_straddle_reads() {
    let gw = GatewayOpts::new().embedded().start();
    let mut c = Raw::open(&gw, "w1").await;
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
    let mut c = Raw::open(&gw, "w2").await;
    let mut bytes = frame(false, 0x1, &[b' '; 600], true);
    bytes.extend(frame(true, 0x0, &[b' '; 600], true));
    c.send(&bytes).await;
    c.expect_close(1009).await;
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_with_1002_and_others_are_unaffected() {
    let gw = GatewayOpts::new().embedded().start();
    let mut other = Raw::open(&gw, "w3").await;
    let mut c = Raw::open(&gw, "w3").await;
    c.send(&frame(true, 0x1, b"ping", false)).await;
    c.expect_close(1002).await;
    other.send(&frame(true, 0x1, b"ping", true)).await;
    assert_eq!(other.next_json().await, Value::String("pong".into()));
}

/// Writes `frames` copies of `one` as fast as the socket takes them while reading what the
/// server sends: the server's close code (None if it never closed) and how many pongs the
/// flood got.
async fn flood(c: &mut Raw, prefix: &[u8], one: &[u8], frames: usize) -> (Option<u16>, usize) {
    let mut bytes = prefix.to_vec();
    for _ in 0..frames {
        bytes.extend_from_slice(one);
    }
    let Raw { r, w } = c;
    let write = async {
        use tokio::io::AsyncWriteExt;
        // The server stops reading once it closed: a failed write is expected then.
        for chunk in bytes.chunks(16 * 1024) {
            if w.write_all(chunk).await.is_err() {
                break;
            }
        }
    };
    let read = async {
        let mut pongs = 0;
        loop {
            match r.next_any().await {
                Some(Server::Pong(_)) => pongs += 1,
                Some(Server::Close(body)) => return (Server::Close(body).close_code(), pongs),
                Some(_) => {}
                None => return (None, pongs),
            }
        }
    };
    let ((), outcome) = tokio::join!(write, read);
    outcome
}

#[tokio::test]
async fn ping_pong_and_continuation_floods_are_charged_and_closed_with_4029() {
    let gw = GatewayOpts::new().embedded().start();
    let budget = 100 + 50; // default burst, then the refusals that close
                           // 20,000 pings: a bounded number of pongs, then 4029 (before: 20,000 pongs, no close).
    let mut c = Raw::open(&gw, "flood").await;
    let (code, pongs) = flood(&mut c, b"", &masked(0x9, b"hi"), 20_000).await;
    assert_eq!(code, Some(4029), "ping flood");
    assert!(pongs <= budget + 50, "{pongs} pongs for a ping flood");
    // Unsolicited pongs.
    let mut c = Raw::open(&gw, "flood").await;
    let (code, _) = flood(&mut c, b"", &masked(0xA, b""), 20_000).await;
    assert_eq!(code, Some(4029), "pong flood");
    // Empty continuation frames inside a message that never ends.
    let mut c = Raw::open(&gw, "flood").await;
    let start = frame(false, 0x1, b"{", true);
    let (code, _) = flood(&mut c, &start, &frame(false, 0x0, b"", true), 20_000).await;
    assert_eq!(code, Some(4029), "empty continuation flood");
    // Others are unaffected.
    let mut other = Raw::open(&gw, "flood").await;
    other.send(&masked(0x1, b"ping")).await;
    assert_eq!(other.next_json().await, Value::String("pong".into()));
}

#[tokio::test]
async fn a_client_answering_heartbeat_pings_is_never_charged_for_its_pongs() {
    // A budget of one message a second, closing at the first refusal: a charged pong next
    // to the client's own messages would close it at once.
    let gw = GatewayOpts::new()
        .embedded()
        .heartbeat(1)
        .cfg("ws", "client_messages_per_sec", "1")
        .cfg("ws", "client_messages_burst", "1")
        .cfg("ws", "rate_limit_close_after", "1")
        .start();
    let mut c = Raw::open(&gw, "beats").await;
    let until = std::time::Instant::now() + Duration::from_millis(5_500);
    let mut next_text = std::time::Instant::now();
    let (mut answered, mut texts) = (0, 0);
    while std::time::Instant::now() < until {
        if std::time::Instant::now() >= next_text {
            c.send(&masked(0x1, b"ping")).await;
            next_text += Duration::from_millis(2_000);
        }
        let wait = next_text
            .min(until)
            .saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(wait, c.r.next_any()).await {
            Err(_) => continue,
            Ok(Some(Server::Ping(p))) => {
                c.send(&masked(0xA, &p)).await;
                answered += 1;
            }
            Ok(Some(Server::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::String(t));
                assert_ne!(v["type"], "error", "{v}");
                if v == Value::String("pong".into()) {
                    texts += 1;
                }
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(answered >= 3, "only {answered} heartbeat pings");
    assert!(texts >= 3, "only {texts} text pongs");
}

#[tokio::test]
async fn a_fragment_that_cannot_fit_the_message_is_refused_before_it_is_buffered() {
    // The partial message plus the incomplete frame stay within ws.max_message_bytes (plus
    // one header): 60,000 bytes held, then a continuation announcing 10,000 more is refused
    // from its header, without waiting for (and buffering) its payload.
    let gw = GatewayOpts::new().embedded().start();
    let mut c = Raw::open(&gw, "partial").await;
    c.send(&frame(false, 0x1, &[b' '; 60_000], true)).await;
    let next = frame(true, 0x0, &[b' '; 10_000], true);
    c.send(&next[..108]).await;
    tokio::time::timeout(Duration::from_secs(3), c.expect_close(1009))
        .await
        .expect("no 1009 before the oversized fragment's payload arrived");
    // A fragment that fits is still fine.
    let mut c = Raw::open(&gw, "partial").await;
    let mut bytes = frame(false, 0x1, br#"{"type":"#, true);
    bytes.extend(frame(false, 0x0, &[b' '; 60_000], true));
    bytes.extend(frame(true, 0x0, br#""ping"}"#, true));
    c.send(&bytes).await;
    assert_eq!(c.next_json().await["type"], "pong");
}
