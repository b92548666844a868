//! Nesting depth of JSON text, measured before anything parses it.
//!
//! serde_json refuses input nested deeper than 128 levels, but only as a syntax error
//! ("not valid JSON") found partway through a recursive parse, and every level it does
//! accept costs a recursive call and, for a `Value`, an allocation. Client messages and
//! events are therefore checked here first, with a flat scan over the bytes that counts
//! `{`/`[` outside strings: no recursion, no allocation, one pass that stops at the first
//! level over the limit. Malformed text is not this module's business: it only answers
//! "deeper than `max`?", and the parser afterwards says whether the text is JSON at all.

/// The deepest nesting serde_json accepts (its recursion limit is 128 calls, the last of
/// which fails); configured limits must not exceed it, or the parser's own generic error
/// would answer before ours.
pub const PARSER_LIMIT: usize = 127;

/// True when `text` opens more than `max` nested arrays/objects at some point.
///
/// `{}` and `[]` are depth 1, `{"a":[1]}` depth 2, a bare scalar depth 0. Brackets inside
/// strings (escapes included) do not count; stray closing brackets never go below zero.
pub fn exceeds(text: &[u8], max: usize) -> bool {
    // Every level takes at least one byte: short text cannot be too deep.
    if text.len() <= max {
        return false;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> String {
        "[".repeat(n) + &"]".repeat(n)
    }

    #[test]
    fn counts_arrays_and_objects() {
        assert!(!exceeds(b"42", 0));
        assert!(exceeds(b"{}", 0));
        assert!(!exceeds(b"{}", 1));
        assert!(!exceeds(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(exceeds(br#"{"a":[1,{"b":2}]}"#, 2));
        // Siblings do not add up: depth is the deepest point, not the bracket count.
        assert!(!exceeds(br#"{"a":{},"b":{},"c":{},"d":{}}"#, 2));
        assert!(!exceeds(nested(32).as_bytes(), 32));
        assert!(exceeds(nested(33).as_bytes(), 32));
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, "[{".repeat(500));
        assert!(!exceeds(text.as_bytes(), 1));
        // An escaped quote does not end the string; an escaped backslash does not escape it.
        assert!(!exceeds(br#"{"a":"\"[[[[","b":1}"#, 1));
        assert!(exceeds(br#"{"a":"\\","b":[[1]]}"#, 2));
    }

    #[test]
    fn malformed_text_never_panics() {
        assert!(!exceeds(b"]]]]}}}}", 1));
        assert!(exceeds(b"]]][[[", 2));
        assert!(!exceeds(b"\"unterminated [[[[[[", 1));
        assert!(!exceeds(b"", 0));
    }

    /// The case the scan exists for: far beyond serde_json's limit, answered without
    /// recursion (a recursive check would overflow the test thread's stack here).
    #[test]
    fn a_million_levels_are_refused_flat() {
        let deep = "[".repeat(1_000_000);
        assert!(exceeds(deep.as_bytes(), 32));
        assert!(exceeds(deep.as_bytes(), PARSER_LIMIT));
    }

    /// What happens without the scan: serde_json stops at its own limit with a syntax
    /// error, so the scan's limit must stay at or below it to be the one that answers.
    #[test]
    fn serde_json_alone_refuses_at_its_limit_as_a_syntax_error() {
        let ok = nested(PARSER_LIMIT);
        assert!(serde_json::from_str::<serde_json::Value>(&ok).is_ok());
        let over = nested(PARSER_LIMIT + 1);
        assert!(serde_json::from_str::<serde_json::Value>(&over).is_err());
        let deep = nested(100_000);
        let err = serde_json::from_str::<serde_json::Value>(&deep).unwrap_err();
        assert!(err.is_syntax(), "{err}");
        assert!(err.to_string().contains("recursion limit"), "{err}");
    }
}
