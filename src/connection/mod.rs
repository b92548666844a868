//! A client connection after the upgrade: the one task that owns its socket ([`task`]) and
//! what it does with each message the client sends ([`parse`], then [`messages`]).
//!
//! This is the top of the per-connection flow: it drives a [`crate::session::Session`]
//! (identity, projects, outbox), greets it ([`crate::greeting`]), joins and leaves projects
//! through the hub and relays commands to the broker. Nothing below imports it: the hub,
//! the streams and the broker only ever see the session, never the connection's task.

pub mod messages;
pub mod parse;
pub mod task;
