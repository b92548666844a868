//! The event envelope: the checks every event passes before fan-out, and its encoding.
//!
//! Every event, whatever its source (publish API, Lua script, raw `PUBLISH` from a legacy
//! worker, broadcast), is a JSON object with a string `type`; its own `project_id`, when it
//! has one, must equal the project of the channel or URL it arrived on (routing is by
//! channel only). The gateway fills in `project_id` and `timestamp` where missing and
//! otherwise passes the publisher's bytes through untouched, so an event that needs no
//! filling is never re-encoded. [`Prepared`] holds the one WebSocket frame shared by every
//! recipient; its payload is always UTF-8 JSON (an event that is not is refused, since a
//! browser drops a connection on a text frame that is not UTF-8). The per-type schema check
//! ([`Policy`]) runs on the same bytes.

use std::borrow::Cow;
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::schema::{Policy, SchemaError};
use crate::ws::frame;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not valid JSON")]
    NotJson,
    #[error("an event must be a JSON object")]
    NotObject,
    #[error("field `type` is required and must be a string")]
    MissingType,
    #[error("field `project_id` must be a string")]
    BadProjectId,
    #[error("event project_id {found:?} does not match project {expected:?}")]
    ProjectMismatch { expected: String, found: String },
    #[error("event is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("event nests JSON deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("field `timestamp` must be an ISO 8601 date-time")]
    BadTimestamp,
    #[error("{0}")]
    Schema(#[from] SchemaError),
}

impl EventError {
    /// Stable reason label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::NotJson => "invalid_json",
            EventError::NotObject => "not_object",
            EventError::MissingType => "missing_type",
            EventError::BadProjectId => "bad_project_id",
            EventError::ProjectMismatch { .. } => "project_mismatch",
            EventError::TooLarge { .. } => "too_large",
            EventError::TooDeep { .. } => "too_deep",
            EventError::BadTimestamp => "invalid_field",
            EventError::Schema(e) => e.reason(),
        }
    }

    /// The offending field, for client-facing errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            EventError::MissingType => Some("type"),
            EventError::BadProjectId | EventError::ProjectMismatch { .. } => Some("project_id"),
            EventError::BadTimestamp => Some("timestamp"),
            EventError::Schema(e) => e.field(),
            _ => None,
        }
    }
}

/// Event types whose newer instance supersedes an older queued one for the same subject,
/// so a slow client's queue can drop the stale one (docs/protocol.md §5).
const PROGRESS_TYPES: [&str; 4] = [
    "task.progress",
    "node.progress.updated",
    "agent.task.progress",
    "character.lora.status",
];

/// An event ready for fan-out: its frame, encoded once, and what conflation needs.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub frame: Bytes,
    /// Set for progress events: equal keys mean "the newer one replaces the older".
    pub conflate: Option<u64>,
    pub seq: Option<u64>,
    /// For an event received from pub/sub: [`epoch_hash`] of the epoch its publish-path
    /// mark named (docs/protocol.md §3). Its `seq` counts only within that epoch: the
    /// project's stream strips it when the epoch is not the one it knows. None: the seq
    /// (if any) was assigned here (embedded broker, history).
    pub epoch: Option<u64>,
}

/// A compact stand-in for an epoch string, compared on the fan-out path (never 0).
pub fn epoch_hash(epoch: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    epoch.hash(&mut h);
    h.finish().max(1)
}

/// The mark the publish script appends to the copy it PUBLISHes (not to history):
/// `...,"seq":N,"epoch":"E"}`. Returns the event as history holds it (`...,"seq":N}`),
/// N and E; None when `payload` does not end that way.
fn publish_mark(payload: &[u8]) -> Option<(Vec<u8>, u64, &str)> {
    const EPOCH: &[u8] = b",\"epoch\":\"";
    const SEQ: &[u8] = b",\"seq\":";
    let rest = payload.strip_suffix(b"\"}")?;
    // The mark is the end: look for it only where an epoch of at most 64 bytes can start.
    let from = rest.len().saturating_sub(64 + EPOCH.len());
    let at = from + memchr::memmem::rfind(&rest[from..], EPOCH)?;
    let epoch = std::str::from_utf8(&rest[at + EPOCH.len()..]).ok()?;
    if epoch.is_empty()
        || epoch.len() > 64
        || !epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    let body = &rest[..at];
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let seq_at = body.len() - digits;
    if digits == 0 || digits > 19 || !body[..seq_at].ends_with(SEQ) {
        return None;
    }
    let seq = std::str::from_utf8(&body[seq_at..]).ok()?.parse().ok()?;
    let mut history = Vec::with_capacity(body.len() + 1);
    history.extend_from_slice(body);
    history.push(b'}');
    Some((history, seq, epoch))
}

/// `payload` without its `seq` field, when it has one (None otherwise or when it is not a
/// JSON object).
fn without_seq_field(payload: &[u8]) -> Option<Vec<u8>> {
    memchr::memmem::find(payload, b"\"seq\"")?;
    let mut map: Map<String, Value> = serde_json::from_slice(payload).ok()?;
    map.remove("seq")?;
    serde_json::to_vec(&map).ok()
}

/// The event with its seq removed, frame and all: what clients get when the seq cannot be
/// trusted. Rare (a forged or stale mark), so it pays a parse.
pub fn strip_seq(prepared: &Prepared) -> Prepared {
    let payload = frame::payload(&prepared.frame);
    let frame = match without_seq_field(payload) {
        Some(body) => frame::text(&body),
        None => prepared.frame.clone(),
    };
    Prepared {
        frame,
        conflate: prepared.conflate,
        seq: None,
        epoch: None,
    }
}

/// The fields the envelope check needs, borrowed from the payload where possible.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    project_id: Option<Cow<'a, str>>,
    /// Kept raw: only the pub/sub lag metric reads it ([`prepare_received`]).
    #[serde(default, borrow)]
    timestamp: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    task_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    node_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    char_id: Option<Cow<'a, str>>,
}

fn first_non_ws(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !b.is_ascii_whitespace())
}

fn conflation_key(kind: &str, head: &Head<'_>) -> Option<u64> {
    if !PROGRESS_TYPES.contains(&kind) {
        return None;
    }
    let subject = head
        .task_id
        .as_deref()
        .or(head.char_id.as_deref())
        .or(head.node_id.as_deref())?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    kind.hash(&mut h);
    subject.hash(&mut h);
    Some(h.finish())
}

/// Refuses `payload` when it nests deeper than the policy allows, before any parse.
pub fn check_depth(payload: &[u8], policy: &Policy) -> Result<(), EventError> {
    if crate::json_depth::exceeds(payload, policy.max_json_depth) {
        return Err(EventError::TooDeep {
            limit: policy.max_json_depth,
        });
    }
    Ok(())
}

/// Checks a project event from any source and frames it once.
///
/// `payload` is the publisher's JSON. `policy` is the typed schema check and depth limit
/// (None for events the gateway itself already validated, e.g. on the publish API). The
/// returned frame carries the same bytes unless `project_id` or `timestamp` had to be
/// filled in.
pub fn prepare_project_event(
    project: &str,
    payload: &[u8],
    policy: Option<&Policy>,
) -> Result<Prepared, EventError> {
    prepare(project, payload, policy, false).map(|(prepared, _)| prepared)
}

/// [`prepare_project_event`] for an event received from the broker, also returning the
/// publisher's own `timestamp` when it is RFC 3339 (None when the event had none and the
/// gateway stamped it here, or it is not RFC 3339). Feeds the pub/sub lag metric.
///
/// Only the publish path's seq may count (docs/protocol.md §3): a message carrying the
/// publish script's mark (`,"seq":N,"epoch":"E"}` at its end) is framed as history holds
/// it (the mark removed) with seq N claimed for epoch E, which the project's stream checks
/// against the epoch it knows. Any other message's `seq` field is removed before framing,
/// so a legacy publisher's `"seq": 999` moves nobody's position.
pub fn prepare_received(
    project: &str,
    payload: &[u8],
    policy: Option<&Policy>,
) -> Result<(Prepared, Option<SystemTime>), EventError> {
    if let Some((history, seq, epoch)) = publish_mark(payload) {
        let (mut prepared, published) = prepare(project, &history, policy, true)?;
        prepared.seq = Some(seq);
        prepared.epoch = Some(epoch_hash(epoch));
        return Ok((prepared, published));
    }
    match without_seq_field(payload) {
        Some(stripped) => prepare(project, &stripped, policy, true),
        None => prepare(project, payload, policy, true),
    }
    .map(|(mut prepared, published)| {
        prepared.seq = None;
        (prepared, published)
    })
}

/// Parses an RFC 3339 timestamp.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// A raw JSON value holding an RFC 3339 string. A valid timestamp has nothing to escape,
/// so the quoted text is the string itself.
fn raw_timestamp(raw: &serde_json::value::RawValue) -> Option<SystemTime> {
    let inner = raw.get().strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        return None;
    }
    parse_rfc3339(inner)
}

fn prepare(
    project: &str,
    payload: &[u8],
    policy: Option<&Policy>,
    want_time: bool,
) -> Result<(Prepared, Option<SystemTime>), EventError> {
    if let Some(policy) = policy {
        check_depth(payload, policy)?;
    }
    // JSON is UTF-8 (RFC 8259 §8.1) and a text frame must be (RFC 6455 §5.6), but serde_json
    // skips the strings it ignores (extra fields) without checking them: a stray byte there
    // would be passed through, and every browser of the project would drop the connection
    // (1007) on it, and again on each replay from history. Checked once, up front.
    let Ok(text) = std::str::from_utf8(payload) else {
        return Err(EventError::NotJson);
    };
    if first_non_ws(payload) != Some(b'{') {
        return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Err(EventError::NotObject),
            Err(_) => Err(EventError::NotJson),
        };
    }
    let head: Head<'_> = match serde_json::from_str(text) {
        Ok(head) => head,
        // Valid JSON whose fields have unexpected JSON types: take the slow path, which
        // names the offending field or accepts what the fast path was too strict about.
        Err(e) if e.is_data() => return prepare_slow(project, payload, policy, want_time),
        Err(_) => return Err(EventError::NotJson),
    };
    let Some(kind) = head.kind.as_deref() else {
        return Err(EventError::MissingType);
    };
    if let Some(found) = head.project_id.as_deref() {
        if found != project {
            return Err(EventError::ProjectMismatch {
                expected: project.to_owned(),
                found: found.to_owned(),
            });
        }
    }
    if let Some(policy) = policy {
        policy.check_project_bytes(kind, payload)?;
    }
    let conflate = conflation_key(kind, &head);
    if let (Some(_), Some(raw)) = (
        &head.project_id,
        head.timestamp.filter(|r| raw_is_date_time(r)),
    ) {
        let published = if want_time { raw_timestamp(raw) } else { None };
        let prepared = Prepared {
            frame: frame::text(payload),
            conflate,
            seq: head.seq,
            epoch: None,
        };
        return Ok((prepared, published));
    }
    // Already schema-checked above: the slow path only fills in.
    let (mut prepared, published) = prepare_slow(project, payload, None, want_time)?;
    prepared.conflate = conflate;
    Ok((prepared, published))
}

fn prepare_slow(
    project: &str,
    payload: &[u8],
    policy: Option<&Policy>,
    want_time: bool,
) -> Result<(Prepared, Option<SystemTime>), EventError> {
    let mut map: Map<String, Value> =
        serde_json::from_slice(payload).map_err(|_| EventError::NotJson)?;
    check_envelope(project, &map)?;
    if let (Some(policy), Some(Value::String(kind))) = (policy, map.get("type")) {
        let kind = kind.clone();
        let value = Value::Object(map);
        policy.check_project_value(&kind, &value)?;
        let Value::Object(back) = value else {
            return Err(EventError::NotObject);
        };
        map = back;
    }
    // Before filling in: a timestamp the gateway sets now says nothing about the publisher.
    let published = match map.get("timestamp") {
        Some(Value::String(t)) if want_time => parse_rfc3339(t),
        _ => None,
    };
    fill_envelope(&mut map, project);
    let seq = map.get("seq").and_then(Value::as_u64);
    let bytes = serde_json::to_vec(&map).map_err(|_| EventError::NotJson)?;
    let prepared = Prepared {
        frame: frame::text(&bytes),
        conflate: None,
        seq,
        epoch: None,
    };
    Ok((prepared, published))
}

/// A raw JSON value that is a string holding a date-time (see [`is_date_time`]).
fn raw_is_date_time(raw: &serde_json::value::RawValue) -> bool {
    raw.get()
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .is_some_and(|s| !s.contains('\\') && is_date_time(s))
}

/// Whether `s` is an ISO 8601 date-time: `YYYY-MM-DDTHH:MM:SS`, optionally with a fraction
/// of a second, and `Z` or an offset. The seed's publishers send Python's
/// `datetime.utcnow().isoformat()`, which has no offset; RFC 3339 times have one; both are
/// date-times (docs/protocol.md §8). A space may stand for the `T` (Python's `str()`).
pub fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let fields = (|| {
        let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
        let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
        let seps = [b.get(4), b.get(7), b.get(13), b.get(16)];
        if seps != [Some(&b'-'), Some(&b'-'), Some(&b':'), Some(&b':')] {
            return None;
        }
        if !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
            return None;
        }
        let month = time::Month::try_from(u8::try_from(month).ok()?).ok()?;
        time::Date::from_calendar_date(i32::try_from(year).ok()?, month, u8::try_from(day).ok()?)
            .ok()?;
        // 60: a leap second.
        (hour < 24 && minute < 60 && second <= 60).then_some(())
    })();
    if fields.is_none() {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &fraction[n..];
    }
    match rest.as_bytes() {
        [] | [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        [b'+' | b'-', h1, h2, m1, m2] => [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// Checks an already-parsed event object for publishing into `project`: its `type`, its
/// `project_id`, and a `timestamp` string that must be a date-time (a null or non-string
/// one is replaced by [`fill_envelope`], docs/protocol.md §8).
pub fn check_envelope(project: &str, event: &Map<String, Value>) -> Result<(), EventError> {
    match event.get("type") {
        Some(Value::String(_)) => {}
        _ => return Err(EventError::MissingType),
    }
    if let Some(Value::String(t)) = event.get("timestamp") {
        if !is_date_time(t) {
            return Err(EventError::BadTimestamp);
        }
    }
    match event.get("project_id") {
        None => {}
        Some(Value::String(p)) if p == project => {}
        Some(Value::String(p)) => {
            return Err(EventError::ProjectMismatch {
                expected: project.to_owned(),
                found: p.clone(),
            })
        }
        Some(_) => return Err(EventError::BadProjectId),
    }
    Ok(())
}

/// Sets `project_id` where the publisher gave none, and `timestamp` where it gave none, or
/// a null or non-string one (docs/protocol.md §8: a publisher's date-time string is passed
/// through as given; [`check_envelope`] refuses any other string).
pub fn fill_envelope(event: &mut Map<String, Value>, project: &str) {
    if !event.contains_key("project_id") {
        event.insert("project_id".into(), Value::String(project.to_owned()));
    }
    // Null or any other non-string: the gateway's own (docs/protocol.md §8).
    if !matches!(event.get("timestamp"), Some(Value::String(_))) {
        event.insert("timestamp".into(), Value::String(now_rfc3339()));
    }
}

/// Current time as RFC 3339 UTC with millisecond precision, e.g. `2026-11-23T12:53:37.123Z`.
/// Milliseconds since the UNIX epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn now_rfc3339() -> String {
    format_rfc3339(time::OffsetDateTime::now_utc())
}

/// `unix_ms` (milliseconds since the UNIX epoch) as RFC 3339, UTC, milliseconds.
pub fn rfc3339_from_millis(unix_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format_rfc3339(t)
}

fn format_rfc3339(now: time::OffsetDateTime) -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    now.format(&fmt)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".into())
}

/// Encodes a server-originated message (replies, heartbeats) as one text frame.
pub fn server_frame(value: &Value) -> Bytes {
    // Serializing a `Value` cannot fail: keys are strings and numbers are finite.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    frame::text(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_must_be_date_times_and_non_strings_are_replaced() {
        for ok in [
            "2026-12-03T10:00:00Z",
            "2026-12-03T10:00:00.123456",
            "2026-12-03 10:00:00",
            "2026-12-03T10:00:00+01:00",
            "2026-12-03T10:00:00.5-0530",
            "2016-12-31T23:59:60Z",
        ] {
            assert!(is_date_time(ok), "{ok}");
        }
        for bad in [
            "not-a-date",
            "2026-13-03T10:00:00",
            "2026-02-30T10:00:00",
            "2026-12-03",
            "2026-12-03T25:00:00",
            "2026-12-03T10:00:00.",
            "2026-12-03T10:00:00+1",
            "1700000000",
            "",
        ] {
            assert!(!is_date_time(bad), "{bad}");
        }
        let ev =
            |ts: &str| format!(r#"{{"type":"file.changed","project_id":"p","timestamp":{ts}}}"#);
        for replaced in ["null", "1700000000", "{}", "[]", "true"] {
            let (p, _) = prepare_received("p", ev(replaced).as_bytes(), None).unwrap();
            let text = std::str::from_utf8(&p.frame[2..]).unwrap();
            let v: Value = serde_json::from_str(text).unwrap();
            assert!(
                v["timestamp"].as_str().is_some_and(is_date_time),
                "{replaced} -> {v}"
            );
        }
        assert_eq!(
            prepare_received("p", ev("\"not-a-date\"").as_bytes(), None).unwrap_err(),
            EventError::BadTimestamp
        );
        let kept = ev("\"2026-12-03T10:00:00.123456\"");
        let (p, _) = prepare_received("p", kept.as_bytes(), None).unwrap();
        assert!(
            p.frame.ends_with(kept.as_bytes()),
            "a date-time is passed through as given"
        );
    }

    fn payload_of(p: &Prepared) -> Value {
        let f = &p.frame;
        let start = match f[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&f[start..]).unwrap()
    }

    #[test]
    fn complete_event_passes_through_byte_for_byte() {
        let raw = br#"{"type":"file.changed","project_id":"p1","timestamp":"2026-01-01T00:00:00Z","x":1.5e300}"#;
        let p = prepare_project_event("p1", raw, None).unwrap();
        assert_eq!(&p.frame[2..], &raw[..]);
    }

    #[test]
    fn missing_fields_are_filled() {
        let p = prepare_project_event("p1", br#"{"type":"file.changed"}"#, None).unwrap();
        let v = payload_of(&p);
        assert_eq!(v["project_id"], "p1");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn bad_envelopes_are_refused() {
        assert_eq!(
            prepare_project_event("p", b"nope", None).unwrap_err(),
            EventError::NotJson
        );
        assert_eq!(
            prepare_project_event("p", b"[1]", None).unwrap_err(),
            EventError::NotObject
        );
        assert_eq!(
            prepare_project_event("p", br#"{"a":1}"#, None).unwrap_err(),
            EventError::MissingType
        );
        assert_eq!(
            prepare_project_event("p", br#"{"type":3}"#, None).unwrap_err(),
            EventError::MissingType
        );
        assert!(matches!(
            prepare_project_event("p", br#"{"type":"x","project_id":"q"}"#, None).unwrap_err(),
            EventError::ProjectMismatch { .. }
        ));
        assert_eq!(
            prepare_project_event("p", br#"{"type":"x","project_id":7}"#, None).unwrap_err(),
            EventError::BadProjectId
        );
    }

    /// Found by the `event_validate` fuzz target: a non-UTF-8 byte in an extra field (here a
    /// nested key, and a string value) was passed through into a text frame.
    #[test]
    fn invalid_utf8_anywhere_is_refused_not_passed_through() {
        let nested_key = b"{\"type\":\"file.changed\",\"file_path\":\"a\",\"project_id\":\"p\",\"timestamp\":\"t\",\"extra\":{\"n\":[1,{\"\x84\":null}]}}";
        let value = b"{\"type\":\"x\",\"note\":\"caf\xe9\"}";
        let strict = Policy {
            allow_unknown_types: false,
            ..Policy::default()
        };
        for payload in [&nested_key[..], &value[..]] {
            for policy in [None, Some(&strict)] {
                let e = prepare_project_event("p", payload, policy).unwrap_err();
                assert_eq!(e, EventError::NotJson);
                assert_eq!(e.reason(), "invalid_json");
            }
        }
        // Escaped non-ASCII is fine: the frame stays UTF-8.
        let ok = prepare_project_event("p", br#"{"type":"x","note":"caf\u00e9"}"#, None).unwrap();
        assert!(std::str::from_utf8(&ok.frame[2..]).is_ok());
    }

    #[test]
    fn progress_events_conflate_per_subject() {
        let a = prepare_project_event("p", br#"{"type":"task.progress","task_id":"t1"}"#, None)
            .unwrap();
        let b = prepare_project_event("p", br#"{"type":"task.progress","task_id":"t1"}"#, None)
            .unwrap();
        let c = prepare_project_event("p", br#"{"type":"task.progress","task_id":"t2"}"#, None)
            .unwrap();
        let d =
            prepare_project_event("p", br#"{"type":"task.success","task_id":"t1"}"#, None).unwrap();
        assert_eq!(a.conflate, b.conflate);
        assert_ne!(a.conflate, c.conflate);
        assert!(a.conflate.is_some() && d.conflate.is_none());
    }

    #[test]
    fn events_nested_too_deep_are_refused_before_parsing() {
        let policy = Policy {
            allow_unknown_types: true,
            max_json_depth: 8,
        };
        let nest = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let ok = format!(r#"{{"type":"x","data":{}}}"#, nest(7));
        assert!(prepare_project_event("p", ok.as_bytes(), Some(&policy)).is_ok());
        let deep = format!(r#"{{"type":"x","data":{}}}"#, nest(8));
        let err = prepare_project_event("p", deep.as_bytes(), Some(&policy)).unwrap_err();
        assert_eq!(err, EventError::TooDeep { limit: 8 });
        assert_eq!(err.reason(), "too_deep");
        // Far past serde_json's own limit, and unterminated: still our answer, not NotJson.
        let bomb = format!(r#"{{"type":"x","data":{}"#, "[".repeat(200_000));
        assert_eq!(
            prepare_project_event("p", bomb.as_bytes(), Some(&policy)).unwrap_err(),
            EventError::TooDeep { limit: 8 }
        );
    }

    #[test]
    fn a_received_seq_counts_only_with_the_publish_mark_which_is_removed() {
        let marked = br#"{"type":"x","project_id":"p","timestamp":"2026-12-03T10:00:00Z","seq":7,"epoch":"e-1"}"#;
        let (p, _) = prepare_received("p", marked, None).unwrap();
        assert_eq!(p.seq, Some(7));
        assert_eq!(p.epoch, Some(epoch_hash("e-1")));
        assert_eq!(
            frame::payload(&p.frame),
            br#"{"type":"x","project_id":"p","timestamp":"2026-12-03T10:00:00Z","seq":7}"#,
            "framed as history holds it"
        );
        // A legacy publisher's own seq: removed, whatever its place or spelling.
        for raw in [
            &br#"{"type":"x","project_id":"p","timestamp":"2026-12-03T10:00:00Z","seq":999}"#[..],
            br#"{"seq": 999, "type": "x"}"#,
            br#"{"type":"x","seq":"nine"}"#,
            br#"{"type":"x","seq":5,"epoch":"has space"}"#,
            br#"{"type":"x","seq":5,"epoch":"e","z":1}"#,
        ] {
            let (p, _) = prepare_received("p", raw, None).unwrap();
            assert_eq!(p.seq, None, "{}", String::from_utf8_lossy(raw));
            let v: Value = serde_json::from_slice(frame::payload(&p.frame)).unwrap();
            assert!(v.get("seq").is_none(), "{v}");
        }
        // No seq at all: the bytes pass through untouched.
        let plain = br#"{"type":"x","project_id":"p","timestamp":"2026-12-03T10:00:00Z"}"#;
        let (p, _) = prepare_received("p", plain, None).unwrap();
        assert_eq!(frame::payload(&p.frame), plain);
    }

    #[test]
    fn strip_seq_removes_the_field_from_the_frame() {
        let (p, _) = prepare_received("p", br#"{"type":"x","seq":3,"epoch":"e"}"#, None).unwrap();
        let s = strip_seq(&p);
        assert_eq!(s.seq, None);
        let v: Value = serde_json::from_slice(frame::payload(&s.frame)).unwrap();
        assert!(v.get("seq").is_none() && v.get("epoch").is_none(), "{v}");
        assert_eq!(v["type"], "x");
    }

    #[test]
    fn seq_is_read() {
        let p = prepare_project_event("p", br#"{"type":"x","seq":42}"#, None).unwrap();
        assert_eq!(p.seq, Some(42));
    }

    #[test]
    fn received_events_report_the_publishers_timestamp_only() {
        let at = |raw: &[u8]| prepare_received("p", raw, None).unwrap().1;
        let want = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_435_200_123);
        let fast = br#"{"type":"x","project_id":"p","timestamp":"2026-11-23T12:00:00.123Z"}"#;
        assert_eq!(at(fast), Some(want));
        let offset =
            br#"{"type":"x","project_id":"p","timestamp":"2026-11-23T13:00:00.123+01:00"}"#;
        assert_eq!(at(offset), Some(want));
        // The slow path (no project_id) reads it before filling in.
        assert_eq!(
            at(br#"{"type":"x","timestamp":"2026-11-23T12:00:00.123Z"}"#),
            Some(want)
        );
        assert_eq!(
            at(br#"{"type":"x","project_id":"p"}"#),
            None,
            "stamped here"
        );
        assert_eq!(
            // A date-time without an offset (the seed's Python) is valid but has no instant.
            at(br#"{"type":"x","project_id":"p","timestamp":"2026-11-23T12:00:00"}"#),
            None
        );
        assert_eq!(at(br#"{"type":"x","project_id":"p","timestamp":17}"#), None);
        let p = prepare_project_event("p", fast, None).unwrap();
        assert_eq!(&p.frame[2..], &fast[..], "still passed through untouched");
    }

    #[test]
    fn timestamp_has_millisecond_precision() {
        let t = now_rfc3339();
        assert_eq!(t.len(), "2026-11-23T12:53:37.123Z".len(), "{t}");
    }
}
