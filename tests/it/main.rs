//! The integration tests, as one test crate (`it`) with a module per area. Each file
//! directly under `tests/` is a test binary of its own: with one per area, the harness
//! (`common`, `rawws`) was compiled once per file and every binary linked the whole
//! switchboard library again, some 25 times per build. As modules of one crate they are
//! compiled and linked once.
//!
//! A module is what a file was: `cargo test --test it faults::` runs the tests of
//! `faults.rs`, `cargo test --test it faults::kill_9` one of them. They also share one
//! libtest run, so `--test-threads` bounds the tests in flight across every module, not
//! per file. New tests go in a module here (a new file directly under `tests/` would be
//! another binary linking everything again); `tests/fixtures/` stays where it is, read
//! through `CARGO_MANIFEST_DIR`.

mod common;
mod rawws;

mod abuse;
mod api_hardening;
mod authorization;
mod broker_outage;
mod cli;
mod command_stream;
mod conformance;
mod console;
mod costs;
mod deploy;
mod fanout;
mod faults;
mod handshake;
mod heartbeat;
mod hook;
mod http_api;
mod isolation_prop;
mod module_deps;
mod nginx;
mod observability;
mod presence;
mod publish_api;
mod raw_seq;
mod resume;
mod schema;
mod seed_settings;
mod session;
mod shutdown;
mod status;
mod stories;
mod timestamps;
mod topology;
mod wire;
