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
const REJECT_LABELS: [&str; 10] = [
    "invalid_json",
    "not_object",
    "missing_type",
    "bad_project_id",
    "project_mismatch",
    "too_large",
    "unknown_type",
    "not_publishable",
    "invalid_field",
    "other",
];

#[derive(Default)]
pub struct Metrics {
    handshakes: [AtomicU64; 8],
    rejected: [AtomicU64; 10],
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

fn counter(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders every metric of this instance.
pub fn render(app: &App) -> String {
    let m = &app.hub.metrics;
    let hub = &app.hub.stats;
    let mut out = String::new();
    counter(
        &mut out,
        "switchboard_connections",
        "Open WebSocket connections.",
        "gauge",
    );
    let _ = writeln!(out, "switchboard_connections {}", app.hub.session_count());
    counter(
        &mut out,
        "switchboard_projects",
        "Projects with at least one client here.",
        "gauge",
    );
    let _ = writeln!(out, "switchboard_projects {}", app.hub.project_count());
    counter(
        &mut out,
        "switchboard_handshakes_total",
        "WebSocket handshakes by result.",
        "counter",
    );
    for (i, label) in HANDSHAKE_LABELS.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_handshakes_total{{result=\"{label}\"}} {}",
            m.handshakes[i].load(Ordering::Relaxed)
        );
    }
    counter(
        &mut out,
        "switchboard_broker_up",
        "1 when the broker is reachable.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "switchboard_broker_up {}",
        u8::from(app.broker.is_up())
    );
    counter(
        &mut out,
        "switchboard_messages_delivered_total",
        "Frames queued to clients by fan-out.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_messages_delivered_total {}",
        hub.delivered.load(Ordering::Relaxed)
    );
    counter(
        &mut out,
        "switchboard_messages_dropped_total",
        "Queued frames dropped, by reason.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_messages_dropped_total{{reason=\"conflated\"}} {}",
        hub.conflated.load(Ordering::Relaxed)
    );
    counter(
        &mut out,
        "switchboard_events_received_total",
        "Events received, by source.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_events_received_total{{source=\"api\"}} {}\nswitchboard_events_received_total{{source=\"redis\"}} {}",
        m.events_from_api.load(Ordering::Relaxed),
        m.events_from_redis.load(Ordering::Relaxed)
    );
    counter(
        &mut out,
        "switchboard_events_rejected_total",
        "Events refused or dropped, by reason.",
        "counter",
    );
    for (i, label) in REJECT_LABELS.iter().enumerate() {
        let _ = writeln!(
            out,
            "switchboard_events_rejected_total{{reason=\"{label}\"}} {}",
            m.rejected[i].load(Ordering::Relaxed)
        );
    }
    counter(
        &mut out,
        "switchboard_commands_total",
        "Client commands relayed to workers.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_commands_total{{type=\"node.execute\"}} {}\nswitchboard_commands_total{{type=\"task.cancel\"}} {}",
        m.commands_execute.load(Ordering::Relaxed),
        m.commands_cancel.load(Ordering::Relaxed)
    );
    counter(
        &mut out,
        "switchboard_slow_consumer_closes_total",
        "Connections closed with 4500.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_slow_consumer_closes_total {}",
        hub.slow_closes.load(Ordering::Relaxed)
    );
    counter(
        &mut out,
        "switchboard_runtime_tasks",
        "Tokio tasks alive (about one per connection).",
        "gauge",
    );
    let _ = writeln!(
        out,
        "switchboard_runtime_tasks {}",
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    );
    counter(
        &mut out,
        "switchboard_history_reads_total",
        "History reads made for resuming clients.",
        "counter",
    );
    let _ = writeln!(
        out,
        "switchboard_history_reads_total {}",
        app.resumer.history_reads.load(Ordering::Relaxed)
    );
    if let crate::broker::Broker::Redis(r) = &app.broker {
        counter(
            &mut out,
            "switchboard_broker_reconnects_total",
            "Pub/sub reconnections after an outage.",
            "counter",
        );
        let _ = writeln!(
            out,
            "switchboard_broker_reconnects_total {}",
            r.stats.reconnects.load(Ordering::Relaxed)
        );
        counter(
            &mut out,
            "switchboard_pubsub_dead_detected_total",
            "Silently dead pub/sub connections detected by PING.",
            "counter",
        );
        let _ = writeln!(
            out,
            "switchboard_pubsub_dead_detected_total {}",
            r.stats.dead_pubsub_detected.load(Ordering::Relaxed)
        );
    }
    out
}
