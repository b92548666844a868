//! What `GET /metrics` reports, and where it is counted (docs/protocol.md §6, §8 names).
//!
//! Counting is plain atomics bumped where things happen: [`Metrics`] here (one per
//! instance, shared by the hub, the streams and the broker), [`DeliveryStats`] (the hub's
//! fan-out) and the Redis broker's stats. Nothing on the fan-out path takes a lock;
//! latencies go into [`histogram::DurationHistogram`], atomics too. A scrape reads them all
//! through prometheus-client collectors ([`crate::exporter`]), which write the Prometheus
//! text format 0.0.4, or OpenMetrics for scrapers that ask for it. Labelled counters have a
//! fixed set of labels, so the output (and memory) is bounded whatever clients send.

pub mod histogram;

use std::sync::atomic::{AtomicU64, Ordering};

use histogram::DurationHistogram;

/// Handshake results (label `result`).
#[derive(Debug, Clone, Copy)]
pub enum Handshake {
    Accepted,
    Unauthenticated,
    Forbidden,
    BadRequest,
    OriginRefused,
    Draining,
    BrokerUnavailable,
    TooManyConnections,
    /// The session store or the authorization hook could not answer: closed 1013.
    AuthUnavailable,
}

pub(crate) const HANDSHAKE_LABELS: [&str; 9] = [
    "accepted",
    "unauthenticated",
    "forbidden",
    "bad_request",
    "origin_refused",
    "draining",
    "broker_unavailable",
    "too_many_connections",
    "auth_unavailable",
];

/// Connection kinds (label `kind`, docs/protocol.md §9): the project service (seed 000),
/// story progress (seed 003) and workers' command streams (§6).
pub(crate) const KIND_LABELS: [&str; 3] = ["project", "story", "commands"];

/// A connection's kind, the index into `KIND_LABELS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Project = 0,
    Story = 1,
    Commands = 2,
}

/// Reasons an incoming event is rejected (label `reason`).
pub(crate) const REJECT_LABELS: [&str; 11] = [
    "invalid_json",
    "not_object",
    "missing_type",
    "bad_project_id",
    "project_mismatch",
    "too_large",
    "too_deep",
    "unknown_type",
    "not_publishable",
    "invalid_field",
    "other",
];

/// Why an authorization-hook call failed (label `reason` of
/// `switchboard_auth_hook_failures_total`, docs/protocol.md §10). Indexed by
/// `authz::HookError::label`'s position here.
pub(crate) const HOOK_FAILURE_LABELS: [&str; 5] =
    ["timeout", "unreachable", "status", "bad_response", "busy"];

/// What fan-out did with the frames it was handed, bumped by the sessions' outboxes.
#[derive(Default)]
pub struct DeliveryStats {
    /// Frames handed to sessions (one per event per session).
    pub delivered: AtomicU64,
    /// Queued progress events dropped because a newer one superseded them.
    pub conflated: AtomicU64,
    /// Connections closed with 4500 because their outbound queue was full.
    pub slow_closes: AtomicU64,
}

pub struct Metrics {
    /// By kind ([`KIND_LABELS`]), then result ([`HANDSHAKE_LABELS`]).
    pub(crate) handshakes: [[AtomicU64; 9]; 3],
    pub(crate) rejected: [AtomicU64; 11],
    /// Authorization-hook failures by [`HOOK_FAILURE_LABELS`] reason.
    pub(crate) hook_failures: [AtomicU64; 5],
    pub events_from_api: AtomicU64,
    pub events_from_redis: AtomicU64,
    pub commands_execute: AtomicU64,
    pub commands_cancel: AtomicU64,
    /// History reads made for resuming clients (shared reads count once).
    pub history_reads: AtomicU64,
    /// Resuming connections answered from history (`resumed: true`).
    pub history_replays: AtomicU64,
    /// `connection.resync_required` frames sent (one per connection told).
    pub resyncs: AtomicU64,
    /// From an event's arrival here to the end of its hand-over to every local session.
    pub fanout: DurationHistogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            handshakes: Default::default(),
            rejected: Default::default(),
            hook_failures: Default::default(),
            events_from_api: AtomicU64::new(0),
            events_from_redis: AtomicU64::new(0),
            commands_execute: AtomicU64::new(0),
            commands_cancel: AtomicU64::new(0),
            history_reads: AtomicU64::new(0),
            history_replays: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            fanout: DurationHistogram::new(histogram::FANOUT_BUCKETS),
        }
    }
}

impl Metrics {
    /// A handshake of a project connection.
    pub fn handshake(&self, result: Handshake) {
        self.handshake_of(Kind::Project, result);
    }

    /// A handshake of a connection of `kind`.
    pub fn handshake_of(&self, kind: Kind, result: Handshake) {
        self.handshakes[kind as usize][result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An authorization-hook call failed for `reason` (one of `HOOK_FAILURE_LABELS`).
    pub fn hook_failed(&self, reason: &str) {
        let i = HOOK_FAILURE_LABELS
            .iter()
            .position(|l| *l == reason)
            .unwrap_or(HOOK_FAILURE_LABELS.len() - 1);
        self.hook_failures[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Authorization-hook failures so far, all reasons.
    pub fn hook_failures(&self) -> u64 {
        self.hook_failures
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    pub fn rejected(&self, reason: &str) {
        let i = REJECT_LABELS
            .iter()
            .position(|l| *l == reason)
            .unwrap_or(REJECT_LABELS.len() - 1);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }
}
