//! All of the WebSocket protocol (RFC 6455) the gateway speaks, and nothing else.
//!
//! - [`frame`]: server frames (text, ping, pong, close) built once as shared bytes;
//! - [`wire`]: client frames parsed from raw socket bytes (masking, fragmentation, control
//!   frames, the Close handshake's payload rules);
//! - [`close_code`]: every close code the gateway sends, by name;
//! - [`upgrade`]: the glue around fastwebsockets' handshake check: the key rule, taking
//!   the raw `TcpStream` back from hyper, and the refusal that completes an upgrade only
//!   to say why the connection cannot stay.
//!
//! Invariants: server frames are never masked, so one event's frame bytes are identical
//! for every recipient and are encoded exactly once; a close code is sent only if RFC 6455
//! allows a server to send it (anything else becomes 1011); a client frame is parsed from
//! bytes already read, never by awaiting the socket, so a slow or hostile client cannot hold
//! a task in the middle of a frame; the only writer of a connection's bytes after the
//! upgrade is its outbox (`session::outbox`), except [`upgrade::refuse`], which owns a
//! connection that never became a session.

pub mod close_code;
pub mod frame;
pub mod upgrade;
pub mod wire;
