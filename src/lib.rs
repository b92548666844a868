//! Switchboard: a WebSocket edge gateway that fans worker events out to browsers.
//!
//! Follow one event and one connection (DESIGN "Data flow"):
//!
//! ```text
//! server.rs     accept loop, tower stack (middleware crate), shutdown/drain
//! handshake.rs  GET /ws/{project}|/ws/user -> checks -> fastwebsockets upgrade -> session
//! session/      one connection: outbox (bounded queue), conn (reader + writer tasks),
//!               messages (client -> server: ping, commands, subscribe, auth.refresh)
//! hub.rs        project -> sessions; reference-counted broker subscriptions; fan-out
//! broker/       memory.rs (embedded default) | redis.rs (pub/sub + pool + publish.lua)
//! event.rs      envelope checks, fill-in, encode-once framing
//! frame.rs      server WebSocket frames as shared bytes
//! heartbeat.rs  one shared timer: heartbeats, idle drop, expiry, record TTLs
//! revocation.rs revoked sessions: batched recheck of session:{id}, close 4001
//! resume.rs     greeting: snapshot or replay from history (shared reads), then live
//! schema/       typed events: registry, validation, TypeScript/JSON Schema generation
//! routes/       HTTP API (matchit table, catch-panic): health, readiness, publish, broadcast, ws-url
//! console.rs    the event console page at /console (embedded files, CSP)
//! limits.rs     connection caps (global, per IP)
//! json_depth.rs nesting depth of JSON text, measured flat before any parse
//! project.rs    the project-id rule; response.rs the HTTP response helpers (both leaves)
//! config.rs     the one config struct; app.rs the per-instance state; cli.rs the commands
//! ```
//!
//! Invariants kept throughout: fan-out never awaits a socket; every queue is bounded; an
//! event is encoded once and its frame bytes are shared by every recipient. Module
//! dependencies are moving to one direction (server -> handshake -> session/hub -> stream
//! -> broker); `tests/module_deps.rs` lists the cycles left and fails on any new one.

pub mod app;
pub mod broker;
pub mod cli;
pub mod config;
pub mod console;
pub mod event;
pub mod frame;
pub mod handshake;
pub mod heartbeat;
pub mod hub;
pub mod json_depth;
pub mod limits;
pub mod metrics;
pub mod project;
pub mod response;
pub mod resume;
pub mod revocation;
pub mod routes;
pub mod schema;
pub mod server;
pub mod session;
