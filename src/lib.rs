//! Switchboard: a WebSocket edge gateway that fans worker events out to browsers.
//!
//! Follow one event and one connection (docs/architecture.md). Modules are listed from the
//! top of the flow down; each imports only modules below it (`tests/it/module_deps.rs`):
//!
//! ```text
//! server.rs     accept loop, tower stack (middleware crate), shutdown/drain
//! routes/       HTTP API (matchit table, catch-panic): health, readiness, publish, broadcast, ws-url
//! handshake.rs  GET /ws/{project}|/ws/user -> checks -> upgrade -> session, holding, joined
//! connection/   task (the one task owning a socket) and messages (client -> server: ping,
//!               commands, subscribe, status, auth.refresh)
//! heartbeat.rs  one shared timer: heartbeats, idle drop, expiry, record TTLs
//! greeting.rs   first frames of a connection, from its streams' decisions; releases it
//! revocation.rs revoked sessions: batched recheck of session:{id}, close 4001
//! app.rs        the per-instance state, built once and passed up
//! exporter.rs   /metrics collectors over the hub and broker
//! hub.rs        project -> members; reference-counted subscriptions; fan-out (the broker's sink)
//! stream/       ProjectStream: the one owner of seqs (epoch, last_seq, dedupe, resume tail,
//!               snapshot cache, greeting decision, outage recovery)
//! authz/        who may follow what: the credential's grants, then the app backend's hook
//!               (cached, bounded, timed out; a failure is "try again", never "no")
//! session/      one connection's state: identity, projects, credential, outbox (bounded)
//! broker/       memory.rs (embedded default) | redis.rs (pub/sub + pool + publish.lua)
//! event.rs      envelope checks, fill-in, encode-once framing
//! story.rs      story progress (seed 003): channel and key names, checks, frames
//! config.rs     the one config struct; cli.rs the commands
//! ws/           RFC 6455: server frames, client frame parsing, close codes, upgrade glue
//! schema/       typed events: registry, validation, TypeScript/JSON Schema generation
//! metrics/      counters and histograms (atomics); limits.rs connection caps
//! wheel.rs      the timing wheel of one-second slots behind the shared timer
//! console.rs    the event console page at /console (embedded files, CSP)
//! json_depth.rs, project.rs, response.rs   small leaves: JSON depth, the project-id rule,
//!               HTTP response helpers
//! ```
//!
//! Invariants kept throughout: fan-out never awaits a socket; every queue is bounded; an
//! event is encoded once and its frame bytes are shared by every recipient; only the
//! project's stream decides anything about seqs.

pub mod app;
pub mod authz;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connection;
pub mod console;
pub mod event;
pub mod exporter;
pub mod greeting;
pub mod handshake;
pub mod heartbeat;
pub mod hub;
pub mod json_depth;
pub mod limits;
pub mod metrics;
pub mod project;
pub mod response;
pub mod revocation;
pub mod routes;
pub mod schema;
pub mod server;
pub mod session;
pub mod story;
pub mod stream;
pub mod wheel;
pub mod ws;
