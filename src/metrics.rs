//! Counters for `GET /metrics` (Prometheus text format, PROTOCOL §8 names).
//!
//! Plain atomics bumped where things happen; nothing on the fan-out path takes a lock.
//! Labelled counters have a fixed set of labels so the output (and memory) is bounded.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::app::App;

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
}

const HANDSHAKE_LABELS: [&str; 8] = [
    "accepted",
    "unauthenticated",
    "forbidden",
    "bad_request",
    "origin_refused",
    "draining",
    "broker_unavailable",
    "too_many_connections",
];

/// Reasons an incoming event is rejected (label `reason`).
const REJECT_LABELS: [&str; 11] = [
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

#[derive(Default)]
pub struct Metrics {
    handshakes: [AtomicU64; 8],
    rejected: [AtomicU64; 11],
    pub events_from_api: AtomicU64,
    pub events_from_redis: AtomicU64,
    pub commands_execute: AtomicU64,
    pub commands_cancel: AtomicU64,
}

impl Metrics {
    pub fn handshake(&self, result: Handshake) {
        self.handshakes[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: &str) {
        let i = REJECT_LABELS
            .iter()
            .position(|l| *l == reason)
            .unwrap_or(REJECT_LABELS.len() - 1);
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// One metric family: HELP/TYPE header, then `(labels, value)` samples.
fn family(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

fn labelled(key: &str, labels: &[&str], values: &[AtomicU64]) -> Vec<(String, u64)> {
    labels
        .iter()
        .zip(values)
        .map(|(l, v)| (format!("{key}=\"{l}\""), v.load(Ordering::Relaxed)))
        .collect()
}

fn as_samples(v: &[(String, u64)]) -> Vec<(&str, u64)> {
    v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}

/// Renders every metric of this instance.
pub fn render(app: &App) -> String {
    let m = &app.hub.metrics;
    let hub = &app.hub.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let o = &mut out;
    family(
        o,
        "switchboard_connections",
        "Open WebSocket connections.",
        "gauge",
        &[("", app.hub.session_count() as u64)],
    );
    family(
        o,
        "switchboard_projects",
        "Projects with at least one client here.",
        "gauge",
        &[("", app.hub.project_count() as u64)],
    );
    let handshakes = labelled("result", &HANDSHAKE_LABELS, &m.handshakes);
    family(
        o,
        "switchboard_handshakes_total",
        "WebSocket handshakes by result.",
        "counter",
        &as_samples(&handshakes),
    );
    family(
        o,
        "switchboard_broker_up",
        "1 when the broker is reachable.",
        "gauge",
        &[("", u64::from(app.broker.is_up()))],
    );
    family(
        o,
        "switchboard_messages_delivered_total",
        "Frames queued or written to clients by fan-out.",
        "counter",
        &[("", get(&hub.delivered))],
    );
    family(
        o,
        "switchboard_messages_dropped_total",
        "Queued frames dropped, by reason.",
        "counter",
        &[("reason=\"conflated\"", get(&hub.conflated))],
    );
    family(
        o,
        "switchboard_events_received_total",
        "Events received, by source.",
        "counter",
        &[
            ("source=\"api\"", get(&m.events_from_api)),
            ("source=\"redis\"", get(&m.events_from_redis)),
        ],
    );
    let rejected = labelled("reason", &REJECT_LABELS, &m.rejected);
    family(
        o,
        "switchboard_events_rejected_total",
        "Events refused or dropped, by reason.",
        "counter",
        &as_samples(&rejected),
    );
    family(
        o,
        "switchboard_commands_total",
        "Client commands relayed to workers.",
        "counter",
        &[
            ("type=\"node.execute\"", get(&m.commands_execute)),
            ("type=\"task.cancel\"", get(&m.commands_cancel)),
        ],
    );
    family(
        o,
        "switchboard_slow_consumer_closes_total",
        "Connections closed with 4500.",
        "counter",
        &[("", get(&hub.slow_closes))],
    );
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks() as u64;
    family(
        o,
        "switchboard_runtime_tasks",
        "Tokio tasks alive (about one per connection).",
        "gauge",
        &[("", tasks)],
    );
    family(
        o,
        "switchboard_history_reads_total",
        "History reads made for resuming clients.",
        "counter",
        &[("", get(&app.resumer.history_reads))],
    );
    if let crate::broker::Broker::Redis(r) = &app.broker {
        family(
            o,
            "switchboard_broker_reconnects_total",
            "Pub/sub reconnections after an outage.",
            "counter",
            &[("", get(&r.stats.reconnects))],
        );
        family(
            o,
            "switchboard_pubsub_dead_detected_total",
            "Silently dead pub/sub connections detected by PING.",
            "counter",
            &[("", get(&r.stats.dead_pubsub_detected))],
        );
    }
    out
}
