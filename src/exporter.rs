//! `GET /metrics`: a prometheus-client [`Registry`] whose collectors read the gateway's
//! atomics at scrape time and write them with the crate's OpenMetrics text encoder.
//!
//! Collectors rather than prometheus-client's `Counter`/`Family` types, because the counts
//! already live as atomics in the structs that own the events (hub, broker) and are bumped
//! where things happen; reading them once per scrape keeps the hot path a relaxed
//! `fetch_add` with no extra indirection, and needs no lock or label lookup per event.
//! The collectors hold the hub and the broker, never the `App` (which holds the registry).
//!
//! Formats: prometheus-client writes OpenMetrics 1.0.0 only. Scrapers that ask for it
//! (`Accept: application/openmetrics-text`, as Prometheus does) get that; everyone else
//! (curl, older scrapers, anything that asks for nothing in particular) gets the Prometheus
//! text format 0.0.4, which [`to_prometheus_text`] derives from the same output, the way
//! the Prometheus client libraries negotiate ([`Format::negotiate`]).
//!
//! Names: OpenMetrics names a counter family without `_total` and its sample with it
//! (`# TYPE switchboard_handshakes counter`, then `switchboard_handshakes_total{...}`), and a
//! histogram with a unit ends in it (`switchboard_fanout_seconds_bucket`). The helpers take
//! the exposed names of docs/protocol.md §8 and derive the family names from them, so the names a
//! scraper sees are exactly those in this file.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::Broker;
use crate::hub::Hub;
use crate::metrics::histogram::DurationHistogram;
use crate::metrics::{HANDSHAKE_LABELS, HOOK_FAILURE_LABELS, KIND_LABELS, REJECT_LABELS};

/// The media type of OpenMetrics text 1.0.0 ([`Exporter::render`]).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The media type of the Prometheus text format 0.0.4.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format a scrape can be answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4: the default.
    Prometheus,
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }

    /// The format for a scrape's `Accept` header, as client_golang's negotiation does:
    /// media ranges by falling quality (ties keep their order); the first one we serve
    /// wins: OpenMetrics (version 1.0.0, 0.0.1 or none given) or text/plain (version
    /// 0.0.4 or none). Anything else, or no header, gets the 0.0.4 text.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let mut ranges: Vec<(f32, Option<Format>)> = accept
            .split(',')
            .take(32) // a header is at most 32 KiB; its first ranges are what matters
            .map(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default().to_ascii_lowercase();
                let mut q = 1.0f32;
                let mut version = None;
                for param in parts {
                    let Some((k, v)) = param.split_once('=') else {
                        continue;
                    };
                    let v = v.trim().trim_matches('"');
                    match k.trim().to_ascii_lowercase().as_str() {
                        "q" => q = v.parse().unwrap_or(0.0),
                        "version" => version = Some(v.to_owned()),
                        _ => {}
                    }
                }
                let served = match (media.as_str(), version.as_deref()) {
                    ("application/openmetrics-text", None | Some("1.0.0" | "0.0.1")) => {
                        Some(Format::OpenMetrics)
                    }
                    ("text/plain", None | Some("0.0.4")) => Some(Format::Prometheus),
                    _ => None,
                };
                (q, served)
            })
            .filter(|(q, _)| *q > 0.0)
            .collect();
        ranges.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranges
            .into_iter()
            .find_map(|(_, f)| f)
            .unwrap_or(Format::Prometheus)
    }
}

/// The instance's metrics registry.
pub struct Exporter {
    registry: Registry,
}

impl Exporter {
    pub fn new(hub: Arc<Hub>, broker: Broker) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HubCollector(hub)));
        registry.register_collector(Box::new(BrokerCollector(broker)));
        registry.register_collector(Box::new(RuntimeCollector));
        Self { registry }
    }

    /// One scrape in `format`.
    pub fn render_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.render(),
            Format::Prometheus => to_prometheus_text(&self.render()),
        }
    }

    /// One scrape in OpenMetrics: every family, then `# EOF`.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail; our collectors only fail when the writer does.
        if text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("metrics encoding failed; this scrape is incomplete");
        }
        out
    }
}

/// OpenMetrics text (as prometheus-client writes it) as Prometheus text 0.0.4. Sample
/// lines stay as they are (a counter's sample keeps its `_total`); what differs is the
/// metadata: a counter family is named after its sample (`# TYPE x_total counter`, its
/// `# HELP` likewise), `unknown` is `untyped`, and there is no `# UNIT`, no `_created`
/// sample and no `# EOF`. HELP text escapes only `\\` and newlines in 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE, which decides the family's 0.0.4 name.
    let mut help: Option<(&str, String)> = None;
    let mut created: Option<String> = None;
    let flush_help = |out: &mut String, help: &mut Option<(&str, String)>, name: &str| {
        if let Some((_, text)) = help.take() {
            out.push_str(&format!("# HELP {name} {text}\n"));
        }
    };
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some((previous, _)) = help {
                flush_help(&mut out, &mut help, previous);
            }
            help = Some((name, text.replace("\\\"", "\"")));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (family, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                other => (name.to_owned(), other),
            };
            match &help {
                Some((n, _)) if *n == name => flush_help(&mut out, &mut help, &family),
                Some((n, _)) => {
                    let n = *n;
                    flush_help(&mut out, &mut help, n)
                }
                None => {}
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            created = Some(format!("{name}_created"));
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
        } else {
            let sample = line.split(['{', ' ']).next().unwrap_or_default();
            if created.as_deref() == Some(sample) {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some((name, _)) = help {
        flush_help(&mut out, &mut help, name);
    }
    out
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The family name of a counter exposed as `name` (which must end in `_total`).
fn counter_family(name: &str) -> &str {
    debug_assert!(name.ends_with("_total"), "{name}");
    name.strip_suffix("_total").unwrap_or(name)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    enc.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn labelled_counter<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    let mut family =
        enc.encode_descriptor(counter_family(name), help, None, MetricType::Counter)?;
    for (value_of_label, value) in samples {
        let labels = [(label, value_of_label)];
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

/// A histogram exposed as `name` (which must end in `_seconds`), declared with its unit.
fn seconds_histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &DurationHistogram,
) -> fmt::Result {
    debug_assert!(name.ends_with("_seconds"), "{name}");
    let family = name.strip_suffix("_seconds").unwrap_or(name);
    let (sum, count, buckets) = h.snapshot();
    enc.encode_descriptor(family, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

/// Connections, handshakes, events and fan-out: what the hub and its [`crate::metrics::Metrics`] count.
struct HubCollector(Arc<Hub>);

impl fmt::Debug for HubCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubCollector").finish_non_exhaustive()
    }
}

impl Collector for HubCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let hub = &self.0;
        let m = &hub.metrics;
        let stats = &hub.stats;
        let e = &mut enc;
        let stories = hub.story_session_count() as u64;
        let commands = hub.command_session_count() as u64;
        let all = hub.session_count() as u64;
        let mut connections = e.encode_descriptor(
            "switchboard_connections",
            "Open WebSocket connections, by kind (project, story or commands).",
            None,
            MetricType::Gauge,
        )?;
        for (kind, n) in
            KIND_LABELS
                .into_iter()
                .zip([all.saturating_sub(stories + commands), stories, commands])
        {
            connections
                .encode_family(&[("kind", kind)])?
                .encode_gauge(&n)?;
        }
        gauge(
            e,
            "switchboard_projects",
            "Projects with at least one client here.",
            hub.project_count() as u64,
        )?;
        let mut handshakes = e.encode_descriptor(
            counter_family("switchboard_handshakes_total"),
            "WebSocket handshakes by result and kind (project or story).",
            None,
            MetricType::Counter,
        )?;
        for (kind, by_result) in KIND_LABELS.into_iter().zip(&m.handshakes) {
            for (result, n) in HANDSHAKE_LABELS.into_iter().zip(by_result.iter().map(load)) {
                handshakes
                    .encode_family(&[("result", result), ("kind", kind)])?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }
        counter(
            e,
            "switchboard_messages_delivered_total",
            "Frames written or queued to clients by fan-out.",
            load(&stats.delivered),
        )?;
        labelled_counter(
            e,
            "switchboard_messages_dropped_total",
            "Queued frames dropped, by reason (conflated: replaced by a newer progress event).",
            "reason",
            [("conflated", load(&stats.conflated))],
        )?;
        labelled_counter(
            e,
            "switchboard_events_received_total",
            "Events received, by source (api: the publish API; redis: the pub/sub connection).",
            "source",
            [
                ("api", load(&m.events_from_api)),
                ("redis", load(&m.events_from_redis)),
            ],
        )?;
        labelled_counter(
            e,
            "switchboard_events_rejected_total",
            "Events refused or dropped, by reason.",
            "reason",
            REJECT_LABELS.into_iter().zip(m.rejected.iter().map(load)),
        )?;
        labelled_counter(
            e,
            "switchboard_auth_hook_failures_total",
            "Authorization-hook calls that failed (connections closed 1013, not denied), by reason.",
            "reason",
            HOOK_FAILURE_LABELS
                .into_iter()
                .zip(m.hook_failures.iter().map(load)),
        )?;
        labelled_counter(
            e,
            "switchboard_commands_total",
            "Client commands relayed to workers, by type.",
            "type",
            [
                ("node.execute", load(&m.commands_execute)),
                ("task.cancel", load(&m.commands_cancel)),
            ],
        )?;
        counter(
            e,
            "switchboard_slow_consumer_closes_total",
            "Connections closed with 4500 (outbound queue full).",
            load(&stats.slow_closes),
        )?;
        seconds_histogram(
            e,
            "switchboard_fanout_seconds",
            "Publish-to-enqueue latency: from an event's arrival at this instance (publish API \
             body read, or Redis pub/sub read) until fan-out has handed it to every local \
             session (written or queued). One observation per event.",
            &m.fanout,
        )?;
        counter(
            e,
            "switchboard_history_reads_total",
            "History reads made for resuming clients (concurrent resumes of a project share one).",
            load(&m.history_reads),
        )?;
        counter(
            e,
            "switchboard_history_replays_total",
            "Resuming connections served from history (resumed: true), missed events or not.",
            load(&m.history_replays),
        )?;
        counter(
            e,
            "switchboard_resyncs_total",
            "connection.resync_required frames sent (history did not cover a client, or its \
             epoch changed).",
            load(&m.resyncs),
        )
    }
}

/// Broker reachability, and the Redis broker's own counts.
struct BrokerCollector(Broker);

impl fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BrokerCollector")
            .field(&self.0.kind())
            .finish()
    }
}

impl Collector for BrokerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let e = &mut enc;
        gauge(
            e,
            "switchboard_broker_up",
            "1 when the broker is reachable (always 1 for the embedded broker).",
            u64::from(self.0.is_up()),
        )?;
        let Broker::Redis(redis) = &self.0 else {
            return Ok(());
        };
        let stats = &redis.stats;
        counter(
            e,
            "switchboard_broker_reconnects_total",
            "Pub/sub reconnections after an outage (each followed by resubscribe and catch-up).",
            load(&stats.reconnects),
        )?;
        counter(
            e,
            "switchboard_pubsub_dead_detected_total",
            "Silently dead pub/sub connections detected by PING.",
            load(&stats.dead_pubsub_detected),
        )?;
        counter(
            e,
            "switchboard_redis_master_changes_total",
            "Sentinel failovers followed: times the master the sentinels name moved (0 on one \
             Redis and on a cluster, whose failovers show as reconnects).",
            redis.master_changes(),
        )?;
        seconds_histogram(
            e,
            "switchboard_pubsub_lag_seconds",
            "From an event's own timestamp to its arrival on this instance's Redis pub/sub \
             connection, for events whose timestamp is RFC 3339. The publish API stamps events \
             that have none, so for those this is API accept to pub/sub read (plus any clock \
             difference between instances); a publisher's own timestamp also includes the \
             publisher's delay. A timestamp in the future counts as 0.",
            &stats.pubsub_lag,
        )
    }
}

/// The tokio runtime of the process.
#[derive(Debug)]
struct RuntimeCollector;

impl Collector for RuntimeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        // Scrapes run on the runtime; anything else (a test encoding by hand) skips this one.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Ok(());
        };
        gauge(
            &mut enc,
            "switchboard_runtime_tasks",
            "Tokio tasks alive (about one per connection).",
            runtime.metrics().num_alive_tasks() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Policy;
    use std::time::Duration;

    fn exporter() -> (Arc<Hub>, Exporter) {
        let hub = Hub::standalone(Policy {
            allow_unknown_types: true,
            ..Policy::default()
        });
        let broker = Broker::Memory(crate::broker::memory::MemoryBroker::new(
            crate::broker::HistoryLimits {
                max_len: 10,
                ttl: Duration::from_secs(60),
                terminal_task_ttl: Duration::from_secs(60),
                snapshot_max_bytes: 1 << 20,
                replay_max_bytes: 1 << 20,
                story_ttl: Duration::from_secs(60),
            },
        ));
        let exporter = Exporter::new(hub.clone(), broker);
        (hub, exporter)
    }

    #[test]
    fn accept_headers_negotiate_like_the_client_libraries() {
        use Format::*;
        for (accept, want) in [
            (None, Prometheus),
            (Some(""), Prometheus),
            (Some("*/*"), Prometheus),
            (Some("text/plain"), Prometheus),
            (Some("application/json"), Prometheus),
            (Some("application/openmetrics-text"), OpenMetrics),
            // Prometheus 2.x
            (Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"), OpenMetrics),
            // Prometheus 3.x
            (Some("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"), OpenMetrics),
            // scrape_protocols = [PrometheusText0.0.4] first
            (Some("text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4"), Prometheus),
            (Some("application/openmetrics-text; version=2.0.0"), Prometheus),
            (Some("application/openmetrics-text;q=0"), Prometheus),
            (Some("text/plain;q=0.1, Application/OpenMetrics-Text;q=0.9"), OpenMetrics),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }

    #[tokio::test]
    async fn the_default_format_is_prometheus_text_0_0_4() {
        let (hub, exporter) = exporter();
        hub.metrics.handshake(crate::metrics::Handshake::Accepted);
        hub.metrics.fanout.observe(Duration::from_micros(30));
        let text = exporter.render_as(Format::Prometheus);
        for line in [
            "# HELP switchboard_handshakes_total WebSocket handshakes by result and kind (project or story).",
            "# TYPE switchboard_handshakes_total counter",
            "switchboard_handshakes_total{result=\"accepted\",kind=\"project\"} 1",
            "# TYPE switchboard_connections gauge",
            "# TYPE switchboard_fanout_seconds histogram",
            "switchboard_fanout_seconds_count 1",
            "# TYPE switchboard_resyncs_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        for absent in [
            "# EOF",
            "# UNIT",
            "_created",
            "# TYPE switchboard_handshakes counter",
        ] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
        // Every sample line of the OpenMetrics output is there, unchanged.
        let om = exporter.render();
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
    }

    #[test]
    fn conversion_drops_created_and_unit_lines() {
        let om = "# HELP a_x A \\\"quoted\\\" help.\n# TYPE a_x counter\na_x_total 3\na_x_created 1.7e9\n# HELP b_seconds B.\n# TYPE b_seconds gauge\n# UNIT b_seconds seconds\nb_seconds 1\n# HELP c C.\n# TYPE c unknown\nc 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_x_total A \"quoted\" help.\n# TYPE a_x_total counter\na_x_total 3\n# HELP b_seconds B.\n# TYPE b_seconds gauge\nb_seconds 1\n# HELP c C.\n# TYPE c untyped\nc 2\n"
        );
    }

    #[tokio::test]
    async fn samples_carry_the_protocol_names() {
        let (hub, exporter) = exporter();
        hub.metrics.handshake(crate::metrics::Handshake::Accepted);
        hub.metrics.rejected("invalid_field");
        hub.metrics.fanout.observe_n(Duration::from_micros(30), 2);
        let text = exporter.render();
        for line in [
            "# TYPE switchboard_connections gauge",
            "switchboard_connections{kind=\"project\"} 0",
            "switchboard_connections{kind=\"story\"} 0",
            "# TYPE switchboard_handshakes counter",
            "switchboard_handshakes_total{result=\"accepted\",kind=\"project\"} 1",
            "switchboard_handshakes_total{result=\"forbidden\",kind=\"project\"} 0",
            "switchboard_handshakes_total{result=\"accepted\",kind=\"story\"} 0",
            "switchboard_broker_up 1",
            "switchboard_messages_delivered_total 0",
            "switchboard_messages_dropped_total{reason=\"conflated\"} 0",
            "switchboard_events_received_total{source=\"api\"} 0",
            "switchboard_events_rejected_total{reason=\"invalid_field\"} 1",
            "switchboard_commands_total{type=\"node.execute\"} 0",
            "switchboard_slow_consumer_closes_total 0",
            "# TYPE switchboard_fanout_seconds histogram",
            "# UNIT switchboard_fanout_seconds seconds",
            "switchboard_fanout_seconds_count 2",
            "switchboard_fanout_seconds_bucket{le=\"0.000025\"} 0",
            "switchboard_fanout_seconds_bucket{le=\"0.00005\"} 2",
            "switchboard_fanout_seconds_bucket{le=\"+Inf\"} 2",
            "switchboard_history_reads_total 0",
            "switchboard_history_replays_total 0",
            "switchboard_resyncs_total 0",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("_total_total"), "{text}");
        assert!(
            !text.contains("switchboard_pubsub_lag"),
            "Redis-only families stay out of the embedded broker's output"
        );
    }
}
