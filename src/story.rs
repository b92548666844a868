//! Story progress (docs/protocol.md §9, seed 003): the second channel family's wire rules.
//!
//! Code Story's workers `PUBLISH` progress JSON on `story:{id}` and its frontend reads the
//! very same objects, with no envelope. This module holds what is particular to that
//! family: the channel and key names, the check of a progress message, and its frame (the
//! published bytes, unchanged, framed once). Everything else (routes, subscriptions,
//! fan-out, limits, drain, heartbeat timer) is the shared core's.
//!
//! Invariants: a message is relayed only if it is a JSON object whose `status` is one of
//! [`STATUSES`] and whose `progress_percent` is a number from 0 to 100 (anything else is
//! dropped and counted, like an invalid project event); its bytes are never rewritten.

use bytes::Bytes;
use serde_json::Value;

use crate::ws::frame;

/// The statuses of seed 003's progress messages.
pub const STATUSES: [&str; 5] = [
    "analyzing",
    "generating",
    "synthesizing",
    "complete",
    "failed",
];

/// Redis channel of a story's progress.
pub fn channel(story: &str) -> String {
    format!("story:{story}")
}

/// The story of a `story:{id}` channel (not `story:{id}:progress` or any other key).
pub fn channel_story(channel: &str) -> Option<&str> {
    channel
        .strip_prefix("story:")
        .filter(|s| !s.is_empty() && !s.contains(':'))
}

/// Where a story's latest progress is kept (a string, JSON, with a TTL).
pub fn progress_key(story: &str) -> String {
    format!("story:{story}:progress")
}

/// Why a progress message is not relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgressError {
    #[error("not valid JSON")]
    NotJson,
    #[error("a progress message must be a JSON object")]
    NotObject,
    #[error("field `status` must be one of analyzing, generating, synthesizing, complete, failed")]
    BadStatus,
    #[error("field `progress_percent` must be a number from 0 to 100")]
    BadPercent,
    #[error("progress message is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("progress message nests JSON too deep")]
    TooDeep,
}

impl ProgressError {
    /// The `reason` label of `switchboard_events_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProgressError::NotJson => "invalid_json",
            ProgressError::NotObject => "not_object",
            ProgressError::BadStatus | ProgressError::BadPercent => "invalid_field",
            ProgressError::TooLarge(_) => "too_large",
            ProgressError::TooDeep => "too_deep",
        }
    }

    /// The offending field, for API errors.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ProgressError::BadStatus => Some("status"),
            ProgressError::BadPercent => Some("progress_percent"),
            _ => None,
        }
    }
}

/// A checked progress message: its frame, and its `updated_at` (which orders stored
/// progress against a relayed one).
#[derive(Debug, Clone)]
pub struct Progress {
    pub frame: Bytes,
    pub updated_at: Option<String>,
}

/// Checks one progress message (`max_bytes`, `max_depth`: the event limits) and frames it.
pub fn check(
    payload: &[u8],
    max_bytes: usize,
    max_depth: usize,
) -> Result<Progress, ProgressError> {
    if payload.len() > max_bytes {
        return Err(ProgressError::TooLarge(payload.len()));
    }
    if crate::json_depth::exceeds(payload, max_depth) {
        return Err(ProgressError::TooDeep);
    }
    let value: Value = serde_json::from_slice(payload).map_err(|_| ProgressError::NotJson)?;
    let Value::Object(map) = value else {
        return Err(ProgressError::NotObject);
    };
    match map.get("status") {
        Some(Value::String(s)) if STATUSES.contains(&s.as_str()) => {}
        _ => return Err(ProgressError::BadStatus),
    }
    match map.get("progress_percent").and_then(Value::as_f64) {
        Some(p) if (0.0..=100.0).contains(&p) => {}
        _ => return Err(ProgressError::BadPercent),
    }
    let updated_at = match map.get("updated_at") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Progress {
        frame: frame::text(payload),
        updated_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> bool {
        check(s.as_bytes(), 1 << 16, 32).is_ok()
    }

    #[test]
    fn progress_messages_are_checked_and_framed_unchanged() {
        let msg = r#"{"story_id":"s1","status":"generating","progress_percent":40,"current_step":"Writing","updated_at":"2026-12-03T10:00:00Z"}"#;
        let p = check(msg.as_bytes(), 1 << 16, 32).unwrap();
        assert!(
            p.frame.ends_with(msg.as_bytes()),
            "the published bytes, unchanged"
        );
        assert_eq!(p.updated_at.as_deref(), Some("2026-12-03T10:00:00Z"));
        assert!(ok(r#"{"status":"complete","progress_percent":100}"#));
        assert!(ok(r#"{"status":"analyzing","progress_percent":0.5}"#));
        for bad in [
            "not json",
            "[1]",
            r#"{"status":"done","progress_percent":10}"#,
            r#"{"progress_percent":10}"#,
            r#"{"status":"failed","progress_percent":101}"#,
            r#"{"status":"failed","progress_percent":-1}"#,
            r#"{"status":"failed","progress_percent":"50"}"#,
        ] {
            assert!(!ok(bad), "{bad}");
        }
        assert_eq!(
            check(&[b' '; 100], 10, 32).unwrap_err(),
            ProgressError::TooLarge(100)
        );
    }

    #[test]
    fn channel_names() {
        assert_eq!(channel_story(&channel("abc-1")), Some("abc-1"));
        assert_eq!(channel_story("story:abc:progress"), None);
        assert_eq!(channel_story("story:"), None);
        assert_eq!(channel_story("project:p:events"), None);
        assert_eq!(progress_key("s"), "story:s:progress");
    }
}
