//! Fuzz target `client_message`: what a client can send after the upgrade.
//!
//! Two parsers see attacker bytes before anything else: the client frame parser
//! (`ws::wire`) and the client message parser (`connection::parse::parse`). This target
//! feeds the input to both: the first byte picks the frame size limit and the rest is parsed
//! frame after frame as the connection task does; every complete text frame, and the whole
//! input when it is UTF-8, goes through the message parser. Neither may panic, and each
//! result must be consistent with the input:
//! - a parsed frame uses at most the bytes given, its payload is within the limit and is the
//!   unmasked payload bytes, its declared length is what `declared_len` says, every strict
//!   prefix of it is "need more", and control frames are final and at most 125 bytes;
//! - "need more" is only said when the header or the payload is incomplete, and "too big"
//!   only when the declared length is over the limit;
//! - an accepted message is the JSON object it came from (same `type`, same fields), and a
//!   refusal is an input refusal with a known code that quotes a bounded amount of input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use switchboard::routes::valid_project_id;
use switchboard::connection::parse::{parse, ClientMessage, Command};
use switchboard::ws::wire::{self, Opcode, WireError};

/// Frame limits worth exploring: around the length encodings' boundaries and the default.
const LIMITS: [usize; 8] = [0, 1, 125, 126, 65_535, 65_536, 64 * 1024 + 1, 1 << 20];

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check_message(text);
    }
    let Some((&pick, stream)) = data.split_first() else {
        return;
    };
    check_frames(stream, LIMITS[pick as usize % LIMITS.len()]);
});

/// Header length implied by the second byte (before the 4-byte mask).
fn header_len(b1: u8) -> usize {
    match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    }
}

fn check_frames(mut rest: &[u8], max: usize) {
    loop {
        let declared = wire::declared_len(rest);
        match wire::parse(rest, max) {
            Ok(None) => {
                // Only an incomplete header or payload may ask for more.
                match declared {
                    None => assert!(rest.len() < header_len(rest.get(1).copied().unwrap_or(0))),
                    Some(len) => assert!(
                        (rest.len() as u64) < header_len(rest[1]) as u64 + 4 + len,
                        "need-more with a complete frame of {len} bytes in {} bytes",
                        rest.len()
                    ),
                }
                return;
            }
            Ok(Some((frame, used))) => {
                let header = header_len(rest[1]);
                let len = frame.payload.len();
                assert!(used <= rest.len(), "used {used} of {} bytes", rest.len());
                assert_eq!(used, header + 4 + len, "frame size accounting");
                assert!(len <= max, "payload {len} over the limit {max}");
                assert_eq!(declared, Some(len as u64));
                assert_eq!(rest[0] & 0x70, 0, "reserved bits accepted");
                assert_ne!(rest[1] & 0x80, 0, "unmasked client frame accepted");
                if matches!(frame.opcode, Opcode::Close | Opcode::Ping | Opcode::Pong) {
                    assert!(frame.fin && len <= 125, "bad control frame accepted");
                }
                let mask = &rest[header..header + 4];
                for (i, b) in frame.payload.iter().enumerate() {
                    assert_eq!(*b, rest[header + 4 + i] ^ mask[i & 3], "unmasking");
                }
                // Every strict prefix is "need more" (bounded so long payloads stay cheap).
                for k in (0..used.min(16)).chain([used - 1]) {
                    assert!(
                        matches!(wire::parse(&rest[..k], max), Ok(None)),
                        "prefix of {k} bytes of a valid {used}-byte frame not need-more"
                    );
                }
                if frame.opcode == Opcode::Text && frame.fin {
                    if let Ok(text) = std::str::from_utf8(&frame.payload) {
                        check_message(text);
                    }
                }
                rest = &rest[used..];
            }
            Err(WireError::TooBig) => {
                assert!(
                    declared.is_some_and(|len| len > max as u64),
                    "too-big with declared length {declared:?} and limit {max}"
                );
                return;
            }
            Err(WireError::Protocol(_)) => return,
        }
    }
}

fn string<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    obj.get(field).and_then(Value::as_str)
}

/// `ws.max_json_depth`'s default.
const MAX_DEPTH: usize = 32;

fn check_message(text: &str) {
    let msg = match parse(text, MAX_DEPTH) {
        Ok(msg) => msg,
        Err(refusal) => {
            assert!(
                refusal.is_invalid_input(),
                "parse refused with {}, a code that needs the connection",
                refusal.code
            );
            // Nesting is refused before parsing, JSON or not.
            if switchboard::json_depth::exceeds(text.as_bytes(), MAX_DEPTH) {
                assert_eq!(refusal.code, "invalid_message", "{refusal:?}");
                return;
            }
            // "JSON" as the gateway reads it: numbers must fit an f64, so `4e2022` (valid
            // JSON syntax) is answered invalid_json, and so it is here.
            let is_json = serde_json::from_str::<Value>(text).is_ok();
            assert_eq!(refusal.code == "invalid_json", !is_json, "{refusal:?}");
            // The quoted part of the input is bounded (at most 64 bytes, Debug-escaped).
            assert!(
                refusal.message.len() <= 64 * 10 + 64,
                "{}",
                refusal.message.len()
            );
            return;
        }
    };
    let obj = match &msg {
        ClientMessage::TextPing => return assert_eq!(text, "ping"),
        ClientMessage::Status { project_id: None } if text == "status" => return,
        _ => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(obj)) => obj,
            other => panic!("accepted a message that is not a JSON object: {other:?}"),
        },
    };
    let kind = string(&obj, "type").expect("accepted message without a string type");
    match msg {
        ClientMessage::TextPing => unreachable!("handled above"),
        ClientMessage::Ping => assert_eq!(kind, "ping"),
        ClientMessage::Status { project_id } => {
            assert_eq!(kind, "status");
            assert_eq!(project_id.as_deref(), string(&obj, "project_id"));
        }
        ClientMessage::Command {
            kind: command,
            subject,
            parameters,
            request_id,
            project_id,
        } => {
            let (expected, subject_field) = match command {
                Command::Execute => ("node.execute", "node_id"),
                Command::Cancel => ("task.cancel", "task_id"),
            };
            assert_eq!(kind, expected);
            assert!(!subject.is_empty());
            assert_eq!(Some(subject.as_str()), string(&obj, subject_field));
            assert_eq!(request_id.as_deref(), string(&obj, "request_id"));
            assert_eq!(project_id.as_deref(), string(&obj, "project_id"));
            match (command, obj.get("parameters")) {
                (Command::Execute, Some(Value::Object(given))) => assert_eq!(&parameters, given),
                _ => assert!(parameters.is_empty()),
            }
        }
        ClientMessage::Subscribe { project_id } => {
            assert_eq!(kind, "subscribe");
            assert!(valid_project_id(&project_id), "{project_id:?}");
            assert_eq!(Some(project_id.as_str()), string(&obj, "project_id"));
        }
        ClientMessage::Unsubscribe { project_id } => {
            assert_eq!(kind, "unsubscribe");
            assert!(!project_id.is_empty());
            assert_eq!(Some(project_id.as_str()), string(&obj, "project_id"));
        }
        ClientMessage::AuthRefresh { token } => {
            assert_eq!(kind, "auth.refresh");
            assert!(!token.is_empty());
            assert_eq!(Some(token.as_str()), string(&obj, "token"));
        }
    }
}
