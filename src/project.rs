//! Project ids (docs/protocol.md §2): what may name a project in a URL, a channel, a
//! message or a credential. Every path that takes a project id from the network checks it
//! here, so a name like `x:commands` can never become part of a Redis key or channel.
//! A leaf: it imports nothing from the crate.

/// `[A-Za-z0-9_.-]{1,128}`, and not the reserved `user`, `.` or `..` (path segments with a
/// meaning of their own: a proxy or client that normalises URLs would turn `/ws/..` into
/// another route, and a key or log line naming `..` reads like a path traversal).
pub fn valid_project_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "user"
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
