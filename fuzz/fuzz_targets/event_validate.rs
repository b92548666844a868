//! Fuzz target `event_validate`: an event from a publisher, checked, filled and framed.
//!
//! Raw `PUBLISH project:{id}:events` payloads (legacy workers), the Lua script's output and
//! history replays all go through `event::prepare_project_event` with the typed schema
//! policy (`schema::Policy`); the publish API checks parsed values with the same policy.
//! The first input byte picks the URL project and the policy (strict or
//! `allow_unknown_types`); the rest is the payload. Nothing may panic, and:
//! - an accepted event's frame is one unfragmented text frame whose payload is UTF-8 (RFC
//!   6455 §5.6: browsers drop the connection otherwise), parses back as a JSON object with
//!   the `type` of the input, the URL's `project_id` and a `timestamp`, and its `seq` is
//!   the one reported;
//! - the typed check only narrows: accepted with the policy implies accepted without it,
//!   and the bytes path (Redis) never accepts what the value path (HTTP API) refuses;
//! - a refusal has a reason from the known set (they are metric labels).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use switchboard::event::{check_envelope, prepare_project_event, EventError, Prepared};
use switchboard::schema::Policy;

const PROJECTS: [&str; 4] = ["p", "demo-1", "a.b_c", "P"];

/// Every `EventError::reason()`: the `reason` label of `switchboard_events_rejected_total`.
const REASONS: [&str; 10] = [
    "invalid_json",
    "too_deep",
    "not_object",
    "missing_type",
    "bad_project_id",
    "project_mismatch",
    "too_large",
    "unknown_type",
    "not_publishable",
    "invalid_field",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let project = PROJECTS[pick as usize % PROJECTS.len()];
    let policy = Policy {
        allow_unknown_types: pick & 0x80 != 0,
        ..Policy::default()
    };
    let input: Option<Map<String, Value>> = serde_json::from_slice(payload).ok();

    let checked = prepare_project_event(project, payload, Some(&policy));
    let unchecked = prepare_project_event(project, payload, None);
    for outcome in [&checked, &unchecked] {
        match outcome {
            Ok(prepared) => check_accepted(project, input.as_ref(), payload, prepared),
            Err(e) => check_refused(e),
        }
    }
    if checked.is_ok() {
        assert!(unchecked.is_ok(), "the schema check widened: {unchecked:?}");
        // What Redis delivers must also pass the publish API's value checks.
        if let Some(map) = &input {
            check_envelope(project, map).expect("bytes path accepted, envelope refuses");
            let kind = map["type"]
                .as_str()
                .expect("accepted without a string type");
            policy
                .check_project_value(kind, &Value::Object(map.clone()))
                .expect("bytes path accepted, value path refuses");
        }
    }
});

fn check_refused(e: &EventError) {
    assert!(
        REASONS.contains(&e.reason()),
        "unknown reason {}",
        e.reason()
    );
    assert!(!e.to_string().is_empty());
}

/// The payload of one server text frame (frame.rs layout), checked whole.
fn frame_payload(frame: &[u8]) -> &[u8] {
    assert!(frame.len() >= 2);
    assert_eq!(frame[0], 0x81, "not one final text frame");
    let (header, len) = match frame[1] {
        126 => (4, u16::from_be_bytes([frame[2], frame[3]]) as usize),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&frame[2..10]);
            (10, u64::from_be_bytes(n) as usize)
        }
        n => {
            assert!(n < 126, "server frames are never masked");
            (2, n as usize)
        }
    };
    assert_eq!(
        frame.len(),
        header + len,
        "frame length disagrees with its header"
    );
    &frame[header..]
}

fn check_accepted(
    project: &str,
    input: Option<&Map<String, Value>>,
    payload: &[u8],
    prepared: &Prepared,
) {
    let body = frame_payload(&prepared.frame);
    assert!(
        std::str::from_utf8(body).is_ok(),
        "accepted event framed as text is not UTF-8"
    );
    let output: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(map) => map,
        // Only what serde_json cannot represent (a lone surrogate escape, which JSON allows)
        // may fail to parse back, and then only because the input did too: passed through.
        Err(_) => {
            assert!(input.is_none(), "a parseable event was framed unparseable");
            assert_eq!(body, payload, "an unparseable event was re-encoded");
            return;
        }
    };
    let kind = output.get("type").and_then(Value::as_str);
    assert!(kind.is_some(), "delivered without a string type");
    if let Some(input) = input {
        assert_eq!(input.get("type"), output.get("type"), "type changed");
    }
    assert_eq!(
        output.get("project_id").and_then(Value::as_str),
        Some(project),
        "delivered under another project"
    );
    assert!(
        output.contains_key("timestamp"),
        "delivered without a timestamp"
    );
    if let Some(seq) = prepared.seq {
        assert_eq!(output.get("seq").and_then(Value::as_u64), Some(seq));
    }
    if prepared.conflate.is_some() {
        assert!(matches!(
            kind,
            Some(
                "task.progress"
                    | "node.progress.updated"
                    | "agent.task.progress"
                    | "character.lora.status"
            )
        ));
    }
}
