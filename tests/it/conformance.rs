//! RFC 6455 conformance at the byte level, as the Autobahn|Testsuite fuzzing client checks
//! it (run in CI instead of Autobahn itself, which needs Python 2.7): the close group
//! (cases 7.1.x-7.13.x), then framing, reserved bits, opcodes and fragmentation sanity,
//! and the opening handshake's `Sec-WebSocket-Key`.
//!
//! Every case opens its own connection to a real gateway, writes exact bytes (each case
//! both in one write and frame by frame), and reads everything the server sends until it
//! ends the TCP stream: the server answers a Close exactly once, never echoes an invalid
//! one (1002, or 1007 for a reason that is not UTF-8), only sends valid codes, sends
//! nothing after its Close, and ends TCP promptly once both Close frames have crossed.

use std::time::Duration;

use crate::common::*;
use crate::rawws::{close_body, frame, masked, Raw, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const TEXT: u8 = 0x1;

/// How long TCP may stay open after the close exchange (before: 1 s every time).
const PROMPT_EOF: Duration = Duration::from_millis(500);

/// What a case expects back, after any number of text messages.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A Close with this code.
    Code(u16),
    /// A Close with an empty body or 1000 (the answer to an empty Close).
    EmptyOrNormal,
}

/// Runs one case: sends `frames` (all in one write, or one write per frame with a pause),
/// reads until EOF, and checks the Close, what came before it and the prompt EOF.
/// Returns the text messages the server sent before its Close.
async fn case(gw: &Gateway, name: &str, frames: &[Vec<u8>], expect: Expect) -> Vec<String> {
    let mut texts = Vec::new();
    for one_write in [true, false] {
        let mut c = Raw::open(gw, "conformance").await;
        if one_write {
            c.send(&frames.concat()).await;
        } else {
            for f in frames {
                c.send(f).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let (got, elapsed) = c.read_to_eof().await;
        let mode = if one_write {
            "one write"
        } else {
            "frame by frame"
        };
        let closes: Vec<&Server> = got
            .iter()
            .filter(|f| matches!(f, Server::Close(_)))
            .collect();
        assert_eq!(
            closes.len(),
            1,
            "{name} ({mode}): exactly one close: {got:?}"
        );
        assert!(
            matches!(got.last(), Some(Server::Close(_))),
            "{name} ({mode}): nothing after the close: {got:?}"
        );
        assert!(
            !got.iter().any(|f| matches!(f, Server::Pong(_))),
            "{name} ({mode}): no pong after a close: {got:?}"
        );
        let close = closes[0];
        match (expect, close.close_code()) {
            (Expect::Code(want), Some(code)) => {
                assert_eq!(code, want, "{name} ({mode}): {close:?}")
            }
            (Expect::EmptyOrNormal, None) | (Expect::EmptyOrNormal, Some(1000)) => {}
            (_, _) => panic!("{name} ({mode}): unexpected close {close:?}"),
        }
        if let Some(code) = close.close_code() {
            assert!(
                matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999),
                "{name} ({mode}): the server sent an invalid code {code}"
            );
        }
        assert!(
            elapsed < PROMPT_EOF,
            "{name} ({mode}): TCP stayed open {elapsed:?} after the close"
        );
        // The greeting (snapshot) and heartbeats are not answers to the case.
        texts = got
            .into_iter()
            .filter_map(|f| match f {
                Server::Text(t) if !t.contains(r#""type":"status""#) => Some(t),
                _ => None,
            })
            .filter(|t| !t.contains(r#""type":"system.heartbeat""#))
            .collect();
    }
    texts
}

fn close_frame(body: &[u8]) -> Vec<u8> {
    masked(CLOSE, body)
}

fn normal_close() -> Vec<u8> {
    close_frame(&close_body(1000, b""))
}

#[tokio::test]
async fn case_7_1_nothing_is_answered_after_a_close() {
    let gw = GatewayOpts::new().embedded().start();
    // 7.1.1: a message, then a close: the message is answered, the close echoed.
    let texts = case(
        &gw,
        "7.1.1",
        &[masked(TEXT, b"ping"), normal_close()],
        Expect::Code(1000),
    )
    .await;
    assert_eq!(texts, vec!["pong".to_string()]);
    // 7.1.2: close twice: answered once.
    case(
        &gw,
        "7.1.2",
        &[normal_close(), normal_close()],
        Expect::Code(1000),
    )
    .await;
    // 7.1.3: ping after close: no pong.
    case(
        &gw,
        "7.1.3",
        &[normal_close(), masked(PING, b"late")],
        Expect::Code(1000),
    )
    .await;
    // 7.1.4: text after close: not handled.
    let texts = case(
        &gw,
        "7.1.4",
        &[normal_close(), masked(TEXT, b"ping")],
        Expect::Code(1000),
    )
    .await;
    assert!(texts.is_empty(), "{texts:?}");
    // 7.1.5: a fragmented message with a close in the middle: never delivered.
    let texts = case(
        &gw,
        "7.1.5",
        &[
            frame(false, TEXT, b"pi", true),
            normal_close(),
            frame(true, 0x0, b"ng", true),
        ],
        Expect::Code(1000),
    )
    .await;
    assert!(texts.is_empty(), "{texts:?}");
    // 7.1.6: a big message, a close, then a ping: the message is answered (not JSON: an
    // error), no pong.
    let texts = case(
        &gw,
        "7.1.6",
        &[
            masked(TEXT, &[b'x'; 60_000]),
            normal_close(),
            masked(PING, b""),
        ],
        Expect::Code(1000),
    )
    .await;
    assert_eq!(texts.len(), 1, "{texts:?}");
}

#[tokio::test]
async fn case_7_3_close_payload_lengths() {
    let gw = GatewayOpts::new().embedded().start();
    // 7.3.1: an empty close is valid.
    case(&gw, "7.3.1", &[close_frame(b"")], Expect::EmptyOrNormal).await;
    // 7.3.2: a 1-byte body is not (it was echoed byte for byte).
    case(&gw, "7.3.2", &[close_frame(b"\x03")], Expect::Code(1002)).await;
    // 7.3.3: a code alone.
    case(
        &gw,
        "7.3.3",
        &[close_frame(&close_body(1000, b""))],
        Expect::Code(1000),
    )
    .await;
    // 7.3.4: a code and a reason.
    case(
        &gw,
        "7.3.4",
        &[close_frame(&close_body(1000, b"Hello World!"))],
        Expect::Code(1000),
    )
    .await;
    // 7.3.5: the longest reason (123 bytes).
    case(
        &gw,
        "7.3.5",
        &[close_frame(&close_body(1000, &[b'*'; 123]))],
        Expect::Code(1000),
    )
    .await;
    // 7.3.6: a 126-byte close payload is not a valid control frame.
    case(
        &gw,
        "7.3.6",
        &[close_frame(&close_body(1000, &[b'*'; 124]))],
        Expect::Code(1002),
    )
    .await;
}

#[tokio::test]
async fn case_7_5_1_a_close_reason_that_is_not_utf8_fails_with_1007() {
    let gw = GatewayOpts::new().embedded().start();
    let reason = [
        0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80, 0x65,
        0x64, 0x69, 0x74, 0x65, 0x64,
    ];
    case(
        &gw,
        "7.5.1",
        &[close_frame(&close_body(1000, &reason))],
        Expect::Code(1007),
    )
    .await;
}

#[tokio::test]
async fn case_7_7_every_valid_code_is_echoed() {
    let gw = GatewayOpts::new().embedded().start();
    for code in [
        1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000,
        4999,
    ] {
        case(
            &gw,
            &format!("7.7 code {code}"),
            &[close_frame(&close_body(code, b"bye"))],
            Expect::Code(code),
        )
        .await;
    }
}

#[tokio::test]
async fn case_7_9_and_7_13_invalid_codes_fail_with_1002() {
    let gw = GatewayOpts::new().embedded().start();
    for code in [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        case(
            &gw,
            &format!("7.9/7.13 code {code}"),
            &[close_frame(&close_body(code, b""))],
            Expect::Code(1002),
        )
        .await;
    }
}

/// The next frame that is not the greeting's snapshot or a heartbeat.
async fn next_not_status(c: &mut Raw) -> Server {
    loop {
        match c.next().await {
            Server::Text(t)
                if t.contains(r#""type":"status""#)
                    || t.contains(r#""type":"system.heartbeat""#) => {}
            other => return other,
        }
    }
}

#[tokio::test]
async fn framing_reserved_bits_opcodes_and_fragmentation() {
    let gw = GatewayOpts::new().embedded().start();
    // A ping is answered with its payload; one inside a fragmented message is allowed.
    let mut c = Raw::open(&gw, "conformance").await;
    c.send(&masked(PING, b"hello")).await;
    assert_eq!(
        next_not_status(&mut c).await,
        Server::Pong(b"hello".to_vec())
    );
    let mut bytes = frame(false, TEXT, b"pi", true);
    bytes.extend(masked(PING, b"mid"));
    bytes.extend(frame(true, 0x0, b"ng", true));
    c.send(&bytes).await;
    assert_eq!(next_not_status(&mut c).await, Server::Pong(b"mid".to_vec()));
    assert_eq!(next_not_status(&mut c).await, Server::Text("pong".into()));
    // Each of these fails the connection with the code given.
    let mut rsv = masked(TEXT, b"ping");
    rsv[0] |= 0x40;
    let mut failing: Vec<(String, Vec<Vec<u8>>, u16)> = vec![
        ("reserved bit".into(), vec![rsv], 1002),
        (
            "unmasked".into(),
            vec![frame(true, TEXT, b"ping", false)],
            1002,
        ),
        (
            "continuation without a message".into(),
            vec![frame(true, 0x0, b"x", true)],
            1002,
        ),
        (
            "text inside a fragmented message".into(),
            vec![frame(false, TEXT, b"a", true), masked(TEXT, b"b")],
            1002,
        ),
        (
            "fragmented ping".into(),
            vec![frame(false, PING, b"a", true)],
            1002,
        ),
        (
            "ping of 126 bytes".into(),
            vec![masked(PING, &[0; 126])],
            1002,
        ),
        ("binary".into(), vec![masked(0x2, b"\x00\x01")], 1003),
        (
            "invalid UTF-8".into(),
            vec![masked(TEXT, b"\xce\xba\xff")],
            1007,
        ),
        (
            "invalid UTF-8 across fragments".into(),
            vec![
                frame(false, TEXT, b"\xce", true),
                frame(true, 0x0, b"\xff", true),
            ],
            1007,
        ),
    ];
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        failing.push((format!("opcode {op}"), vec![masked(op, b"")], 1002));
    }
    for (name, frames, code) in failing {
        let mut c = Raw::open(&gw, "conformance").await;
        c.send(&frames.concat()).await;
        c.expect_close(code).await;
        // Our close is answered: the exchange completes and TCP ends at once.
        c.send(&close_frame(&close_body(1000, b""))).await;
        let (rest, elapsed) = c.read_to_eof().await;
        assert!(rest.is_empty(), "{name}: {rest:?}");
        assert!(elapsed < PROMPT_EOF, "{name}: {elapsed:?}");
    }
}

#[tokio::test]
async fn tcp_ends_right_after_the_close_exchange() {
    let gw = GatewayOpts::new().embedded().start();
    // Client first: our reply, then EOF at once (it took 1.0 s).
    let mut c = Raw::open(&gw, "closing").await;
    let sent = std::time::Instant::now();
    c.send(&normal_close()).await;
    c.expect_close(1000).await;
    let (rest, _) = c.read_to_eof().await;
    assert!(rest.is_empty(), "{rest:?}");
    let took = sent.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "EOF {took:?} after the close"
    );
    // Server first (a binary frame is refused): EOF as soon as the client answered.
    let mut c = Raw::open(&gw, "closing").await;
    c.send(&masked(0x2, b"\x01")).await;
    c.expect_close(1003).await;
    let answered = std::time::Instant::now();
    c.send(&normal_close()).await;
    let (rest, _) = c.read_to_eof().await;
    assert!(rest.is_empty(), "{rest:?}");
    let took = answered.elapsed();
    assert!(
        took < Duration::from_millis(200),
        "EOF {took:?} after the reply"
    );
}

#[tokio::test]
async fn the_close_still_goes_out_when_the_clients_close_shares_a_read() {
    // A frame that fails the connection and the client's Close in one write: the server's
    // own Close (with the failure's code) is still sent (it dropped TCP: the client saw 1006).
    let gw = GatewayOpts::new().embedded().start();
    for (name, first, code) in [
        ("binary", masked(0x2, b"\x00"), 1003),
        ("invalid UTF-8", masked(TEXT, b"\xff\xfe"), 1007),
    ] {
        let mut c = Raw::open(&gw, "together").await;
        let mut bytes = first;
        bytes.extend(normal_close());
        c.send(&bytes).await;
        let (got, elapsed) = c.read_to_eof().await;
        let close = got.iter().find(|f| matches!(f, Server::Close(_)));
        assert_eq!(
            close.and_then(Server::close_code),
            Some(code),
            "{name}: {got:?}"
        );
        assert!(elapsed < PROMPT_EOF, "{name}: {elapsed:?}");
    }
}

/// The status line the server answers an upgrade with this `Sec-WebSocket-Key` line.
async fn upgrade_status(gw: &Gateway, key_line: &str) -> String {
    let token = gw.token("key", &["keys"]);
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let req = format!(
        "GET /ws/keys?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         {key_line}Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    head.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn sec_websocket_key_must_be_base64_of_16_bytes() {
    let gw = GatewayOpts::new().embedded().start();
    for (name, line) in [
        ("empty", "Sec-WebSocket-Key: \r\n"),
        ("missing", ""),
        (
            "not base64",
            "Sec-WebSocket-Key: not a key at all!!!!!!==\r\n",
        ),
        ("short", "Sec-WebSocket-Key: abc\r\n"),
        ("unpadded", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ\r\n"),
        (
            "17 bytes",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZXg=\r\n",
        ),
        ("15 bytes", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n"),
        (
            "two keys",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        ),
    ] {
        let status = upgrade_status(&gw, line).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{name}: {status}");
    }
    let status = upgrade_status(&gw, "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n").await;
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
}
