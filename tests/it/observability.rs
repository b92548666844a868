//! Observability (issue 5 item 1; docs/protocol.md §6 `/metrics`, §8 metric names; DESIGN
//! "Tracing"): the exposition is valid OpenMetrics text naming every metric of the contract, its
//! counters move with what happens (handshakes, events, fan-out latency, resumes, resyncs,
//! broker reconnects), and JSON logs put every line of a connection in its span and never
//! print a credential.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------
// a strict reader of the OpenMetrics text the gateway serves

#[derive(Debug, Default)]
struct Family {
    kind: Option<String>,
    help: Option<String>,
    unit: Option<String>,
}

#[derive(Debug, Clone)]
struct Sample {
    family: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

struct Exposition {
    text: String,
    families: BTreeMap<String, Family>,
    samples: Vec<Sample>,
}

fn valid_name(s: &str, colons: bool) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':'))
}

/// The sample suffixes each metric type allows (OpenMetrics 1.0).
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_sum", "_count", "_created"],
        "info" => &["_info"],
        "gauge" | "unknown" => &[""],
        other => panic!("unexpected metric type {other:?}"),
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// `name{a="x",b="y"} value` (label values unescaped).
fn parse_sample_line(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
    let name_end = line
        .find(['{', ' '])
        .ok_or("a sample needs a value after its name")?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        loop {
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if !valid_name(&key, false) {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => return Err(format!("bad escape {other:?} in label {key}")),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("label {key} is not closed")),
                }
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} repeated"));
            }
            if let Some((_, ',')) = chars.peek() {
                chars.next();
            }
        }
        let end = end.ok_or("label set is not closed")?;
        rest = &after[end + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = parse_value(value).ok_or(format!("bad value {value:?}"))?;
    Ok((name.to_owned(), labels, value))
}

/// Parses an exposition and checks it is valid: every sample belongs to the family declared
/// (with HELP and TYPE) just before it, under a name its type allows; families appear once;
/// units end the family name; histograms are cumulative and end in `+Inf` = `_count`;
/// counters are finite and non-negative; no series twice; `# EOF` last.
fn parse_exposition(text: &str) -> Exposition {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut samples = Vec::new();
    let mut current: Option<String> = None;
    let mut eof = false;
    let mut series = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}: {line:?}\n---\n{text}", i + 1);
        assert!(!eof, "content after # EOF at {at}");
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let (keyword, rest) = meta
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad metadata at {at}"));
            let (name, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(valid_name(name, true), "bad family name at {at}");
            if current.as_deref() != Some(name) {
                assert!(
                    !families.contains_key(name),
                    "family {name} declared twice (families must be contiguous) at {at}"
                );
                current = Some(name.to_owned());
            }
            let family = families.entry(name.to_owned()).or_default();
            let slot = match keyword {
                "HELP" => &mut family.help,
                "TYPE" => &mut family.kind,
                "UNIT" => &mut family.unit,
                other => panic!("unknown metadata {other:?} at {at}"),
            };
            assert!(slot.is_none(), "{keyword} repeated at {at}");
            *slot = Some(arg.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "stray comment at {at}");
        let (name, labels, value) =
            parse_sample_line(line).unwrap_or_else(|e| panic!("{e} at {at}"));
        let family_name = current
            .clone()
            .unwrap_or_else(|| panic!("sample before any family at {at}"));
        let family = &families[&family_name];
        let kind = family
            .kind
            .as_deref()
            .unwrap_or_else(|| panic!("sample of a family without # TYPE at {at}"));
        assert!(family.help.is_some(), "family without # HELP at {at}");
        assert!(
            suffixes(kind)
                .iter()
                .any(|s| name == format!("{family_name}{s}")),
            "sample {name} does not belong to {kind} family {family_name} at {at}"
        );
        assert!(
            series.insert((name.clone(), labels.clone())),
            "series repeated at {at}"
        );
        if kind == "counter" {
            assert!(
                value.is_finite() && value >= 0.0,
                "bad counter value at {at}"
            );
        }
        samples.push(Sample {
            family: family_name,
            name,
            labels,
            value,
        });
    }
    assert!(eof, "no # EOF at the end:\n{text}");
    for (name, family) in &families {
        assert!(family.kind.is_some(), "{name} has no # TYPE");
        assert!(
            samples.iter().any(|s| &s.family == name),
            "{name} has no sample"
        );
        if let Some(unit) = &family.unit {
            assert!(
                name.ends_with(&format!("_{unit}")),
                "{name} with unit {unit}"
            );
        }
    }
    let exposition = Exposition {
        text: text.to_owned(),
        families,
        samples,
    };
    exposition.check_histograms();
    exposition
}

impl Exposition {
    fn check_histograms(&self) {
        for (name, family) in &self.families {
            if family.kind.as_deref() != Some("histogram") {
                continue;
            }
            let of = |suffix: &str| -> Vec<&Sample> {
                self.samples
                    .iter()
                    .filter(|s| s.name == format!("{name}{suffix}"))
                    .collect()
            };
            let (buckets, sums, counts) = (of("_bucket"), of("_sum"), of("_count"));
            assert!(
                !buckets.is_empty() && sums.len() == 1 && counts.len() == 1,
                "{name} needs _bucket, _sum and _count:\n{}",
                self.text
            );
            let mut last_le = f64::NEG_INFINITY;
            let mut last_count = 0.0;
            for b in &buckets {
                let le = b
                    .labels
                    .get("le")
                    .and_then(|l| parse_value(l))
                    .unwrap_or_else(|| panic!("{name} bucket without a numeric le: {b:?}"));
                assert!(le > last_le, "{name} buckets not ascending at le={le}");
                assert!(
                    b.value >= last_count,
                    "{name} buckets not cumulative at le={le}"
                );
                last_le = le;
                last_count = b.value;
            }
            assert_eq!(last_le, f64::INFINITY, "{name}: last bucket must be +Inf");
            assert_eq!(last_count, counts[0].value, "{name}: +Inf bucket == _count");
            assert!(sums[0].value >= 0.0, "{name}: negative _sum");
        }
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{}", self.text))
    }

    fn kind(&self, family: &str) -> Option<&str> {
        self.families.get(family).and_then(|f| f.kind.as_deref())
    }
}

/// Scrapes `/metrics` and checks the response and its exposition.
/// What Prometheus 2.x sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// Scrapes `/metrics` as Prometheus does (asking for OpenMetrics) and checks the response
/// and its exposition.
async fn scrape(gw: &Gateway) -> Exposition {
    let r = gw
        .get_with("/metrics", &[("Accept", PROMETHEUS_ACCEPT)])
        .await;
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    let ct = r.header("content-type").unwrap_or_default().to_owned();
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "content type {ct:?}"
    );
    parse_exposition(&r.text())
}

/// Scrapes until `ok` holds (counters are bumped right after the work they count, so a
/// client may see the work a moment before the scrape does).
async fn scrape_until(gw: &Gateway, what: &str, ok: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(gw).await;
        if ok(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within 10 s; last scrape:\n{}\n{}",
            m.text,
            gw.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A docs/protocol.md §8 metric: family, type, one of its samples and that sample's labels.
type Named = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const PROTOCOL_METRICS: &[Named] = &[
    (
        "switchboard_connections",
        "gauge",
        "switchboard_connections",
        &[("kind", "project")],
    ),
    (
        "switchboard_handshakes",
        "counter",
        "switchboard_handshakes_total",
        &[("result", "accepted"), ("kind", "project")],
    ),
    (
        "switchboard_broker_up",
        "gauge",
        "switchboard_broker_up",
        &[],
    ),
    (
        "switchboard_messages_delivered",
        "counter",
        "switchboard_messages_delivered_total",
        &[],
    ),
    (
        "switchboard_messages_dropped",
        "counter",
        "switchboard_messages_dropped_total",
        &[("reason", "conflated")],
    ),
    (
        "switchboard_events_received",
        "counter",
        "switchboard_events_received_total",
        &[("source", "api")],
    ),
    (
        "switchboard_events_rejected",
        "counter",
        "switchboard_events_rejected_total",
        &[("reason", "invalid_field")],
    ),
    (
        "switchboard_commands",
        "counter",
        "switchboard_commands_total",
        &[("type", "node.execute")],
    ),
    (
        "switchboard_slow_consumer_closes",
        "counter",
        "switchboard_slow_consumer_closes_total",
        &[],
    ),
    (
        "switchboard_fanout_seconds",
        "histogram",
        "switchboard_fanout_seconds_count",
        &[],
    ),
    (
        "switchboard_history_reads",
        "counter",
        "switchboard_history_reads_total",
        &[],
    ),
    (
        "switchboard_history_replays",
        "counter",
        "switchboard_history_replays_total",
        &[],
    ),
    (
        "switchboard_resyncs",
        "counter",
        "switchboard_resyncs_total",
        &[],
    ),
];

fn assert_protocol_names(m: &Exposition) {
    for (family, kind, sample, labels) in PROTOCOL_METRICS {
        assert_eq!(m.kind(family), Some(*kind), "type of {family}:\n{}", m.text);
        m.value(sample, labels);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        assert!(
            m.samples
                .iter()
                .any(|s| s.name == format!("switchboard_fanout_seconds{suffix}")),
            "switchboard_fanout_seconds{suffix} missing:\n{}",
            m.text
        );
    }
}

#[test]
fn the_reader_refuses_what_is_not_openmetrics() {
    let ok = "# HELP a_x help\n# TYPE a_x counter\na_x_total{k=\"v\\\"w\"} 1\n# EOF\n";
    assert_eq!(
        parse_exposition(ok).value("a_x_total", &[("k", "v\"w")]),
        1.0
    );
    for bad in [
        "# HELP a help\n# TYPE a counter\na_total 1\n",                     // no EOF
        "# HELP a help\n# TYPE a counter\na 1\n# EOF\n",                    // wrong suffix
        "a_total 1\n# EOF\n",                                               // no family
        "# HELP a help\n# TYPE a gauge\na 1\nb 2\n# EOF\n",                 // other family
        "# HELP a help\n# TYPE a gauge\na 1\na 2\n# EOF\n",                 // repeated
        "# HELP a help\n# TYPE a histogram\na_bucket{le=\"+Inf\"} 2\na_sum 1\na_count 3\n# EOF\n",
        "# HELP a help\n# TYPE a histogram\na_bucket{le=\"1\"} 2\na_bucket{le=\"+Inf\"} 1\na_sum 1\na_count 1\n# EOF\n",
        "# HELP a_s help\n# TYPE a_s gauge\n# UNIT a_s seconds\na_s 1\n# EOF\n", // unit
        "# HELP a help\n# TYPE a gauge\n# TYPE a gauge\na 1\n# EOF\n",     // TYPE twice
    ] {
        let refused = std::panic::catch_unwind(|| parse_exposition(bad)).is_err();
        assert!(refused, "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_is_valid_and_moves_with_inline_fan_out() {
    let gw = GatewayOpts::new().embedded().start();
    let before = scrape(&gw).await;
    assert_protocol_names(&before);
    assert_eq!(before.value("switchboard_fanout_seconds_count", &[]), 0.0);
    assert!(
        before
            .get("switchboard_broker_reconnects_total", &[])
            .is_none()
            && before.kind("switchboard_pubsub_lag_seconds").is_none(),
        "Redis-only metrics without Redis:\n{}",
        before.text
    );

    let (mut c, _) = gw.connect("obs", &gw.token("u", &["obs"])).await;
    gw.publish("obs", &json!([ev(1), ev(2)])).await;
    assert_eq!(c.next_json(T).await["n"], 1);
    assert_eq!(c.next_json(T).await["n"], 2);
    let r = gw
        .post_json(
            "/v1/broadcast",
            Some(&gw.service_token()),
            &json!({"type": "system.heartbeat"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    c.skip.retain(|s| s != "system.heartbeat"); // the gateway's own beat is 30 s away
    assert_eq!(
        c.next_of_type("system.heartbeat", T).await["project_id"],
        "obs"
    );

    // The embedded broker fans out before the publish call returns: exact counts.
    let m = scrape(&gw).await;
    assert_eq!(
        m.value("switchboard_connections", &[("kind", "project")]),
        1.0
    );
    assert_eq!(
        m.value(
            "switchboard_handshakes_total",
            &[("result", "accepted"), ("kind", "project")],
        ),
        1.0
    );
    assert_eq!(
        m.value("switchboard_events_received_total", &[("source", "api")]),
        2.0
    );
    assert_eq!(m.value("switchboard_messages_delivered_total", &[]), 3.0);
    assert_eq!(
        m.value("switchboard_fanout_seconds_count", &[]),
        3.0,
        "one observation per event (2 published, 1 broadcast)"
    );
    let sum = m.value("switchboard_fanout_seconds_sum", &[]);
    assert!(sum > 0.0 && sum < 5.0, "fan-out took {sum} s in all");
    assert_eq!(
        m.families["switchboard_fanout_seconds"].unit.as_deref(),
        Some("seconds")
    );
}

/// `/metrics` answers in the format the scraper asks for: Prometheus text 0.0.4 by default
/// (curl, older scrapers), OpenMetrics when `Accept` asks for it (Prometheus itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_negotiate_prometheus_text_or_openmetrics() {
    let gw = GatewayOpts::new().start();
    let plain = gw.get("/metrics").await;
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = plain.text();
    for line in [
        "# TYPE switchboard_handshakes_total counter",
        "# TYPE switchboard_events_received_total counter",
        "switchboard_events_received_total{source=\"api\"} 0",
        "# TYPE switchboard_connections gauge",
        "# TYPE switchboard_fanout_seconds histogram",
        "switchboard_fanout_seconds_bucket{le=\"+Inf\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for absent in [
        "# EOF",
        "# UNIT ",
        "_created",
        "# TYPE switchboard_handshakes counter",
    ] {
        assert!(!text.contains(absent), "{absent:?} in 0.0.4 text:\n{text}");
    }
    for accept in [
        "*/*",
        "text/plain",
        "text/plain;version=0.0.4",
        "application/json",
    ] {
        let r = gw.get_with("/metrics", &[("Accept", accept)]).await;
        assert!(
            r.header("content-type")
                .unwrap_or_default()
                .starts_with("text/plain; version=0.0.4"),
            "{accept}: {:?}",
            r.header("content-type")
        );
    }
    for accept in [PROMETHEUS_ACCEPT, "application/openmetrics-text"] {
        let r = gw.get_with("/metrics", &[("Accept", accept)]).await;
        assert_eq!(
            r.header("content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "{accept}"
        );
        let m = parse_exposition(&r.text());
        assert!(r.text().ends_with("# EOF\n"));
        assert_eq!(m.kind("switchboard_handshakes"), Some("counter"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_with_redis_events_resumes_resyncs_and_reconnects() {
    let mut redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let m0 = scrape(&gw).await;
    assert_protocol_names(&m0);
    for name in [
        "switchboard_broker_reconnects_total",
        "switchboard_history_replays_total",
        "switchboard_resyncs_total",
        "switchboard_pubsub_lag_seconds_count",
    ] {
        assert_eq!(m0.value(name, &[]), 0.0, "{name} at start");
    }
    assert_eq!(m0.value("switchboard_broker_up", &[]), 1.0);

    let t = gw.token("u", &["obs"]);
    let (mut c1, est) = gw.connect("obs", &t).await;
    let epoch = est["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        gw.publish("obs", &json!([ev(1), ev(2), ev(3)])).await,
        [1, 2, 3]
    );
    for n in 1..=3 {
        assert_eq!(c1.next_json(T).await["n"], n);
    }
    let m1 = scrape_until(&gw, "fan-out of the 3 events observed", |m| {
        m.value("switchboard_fanout_seconds_count", &[]) == 3.0
    })
    .await;
    assert_eq!(
        m1.value(
            "switchboard_handshakes_total",
            &[("result", "accepted"), ("kind", "project")],
        ),
        1.0
    );
    assert_eq!(
        m1.value("switchboard_events_received_total", &[("source", "api")]),
        3.0
    );
    assert_eq!(
        m1.value("switchboard_events_received_total", &[("source", "redis")]),
        0.0,
        "events of the publish path come back on pub/sub: counted once, as api"
    );
    assert!(m1.value("switchboard_messages_delivered_total", &[]) >= 3.0);
    assert_eq!(
        m1.value("switchboard_pubsub_lag_seconds_count", &[]),
        3.0,
        "the publish API stamped all 3 events, so all have a lag"
    );
    let lag = m1.value("switchboard_pubsub_lag_seconds_sum", &[]);
    assert!(
        (0.0..15.0).contains(&lag),
        "pub/sub lag {lag} s for 3 events"
    );

    // A raw PUBLISH (a legacy worker) is what source="redis" counts.
    redis
        .publish(
            "project:obs:events",
            &json!({"type": "file.changed", "n": 4}).to_string(),
        )
        .await;
    assert_eq!(c1.next_json(T).await["n"], 4);
    let m1 = scrape_until(&gw, "the raw event counted", |m| {
        m.value("switchboard_events_received_total", &[("source", "redis")]) == 1.0
    })
    .await;
    assert_eq!(
        m1.value("switchboard_events_received_total", &[("source", "api")]),
        3.0
    );

    // A resume the history covers: replayed, not resynced.
    let mut c2 = gw
        .ws(&format!("/ws/obs?token={t}&last_seq=1&epoch={epoch}"), &[])
        .await;
    let est2 = c2.next_json(T).await;
    assert_eq!(est2["resumed"], true, "{est2}");
    assert_eq!(c2.next_json(T).await["n"], 2);
    assert_eq!(c2.next_json(T).await["n"], 3);
    let m2 = scrape_until(&gw, "the replay counted", |m| {
        m.value("switchboard_history_replays_total", &[]) == 1.0
    })
    .await;
    assert!(m2.value("switchboard_history_reads_total", &[]) >= 1.0);
    assert_eq!(m2.value("switchboard_resyncs_total", &[]), 0.0);

    // A resume from another epoch: resynced, not replayed.
    let mut c3 = gw
        .ws(&format!("/ws/obs?token={t}&last_seq=1&epoch=gone0000"), &[])
        .await;
    c3.skip.retain(|s| s != "status");
    c3.next_of_type("connection.resync_required", T).await;
    let m3 = scrape_until(&gw, "the resync counted", |m| {
        m.value("switchboard_resyncs_total", &[]) == 1.0
    })
    .await;
    assert_eq!(m3.value("switchboard_history_replays_total", &[]), 1.0);

    // Redis dies and comes back empty: one reconnect, and every connected client of the
    // project is told to resync (a new epoch).
    redis.kill();
    scrape_until(&gw, "broker_up 0 after Redis died", |m| {
        m.value("switchboard_broker_up", &[]) == 0.0
    })
    .await;
    redis.restart();
    let m4 = scrape_until(&gw, "a counted reconnect", |m| {
        m.value("switchboard_broker_reconnects_total", &[]) >= 1.0
            && m.value("switchboard_broker_up", &[]) == 1.0
    })
    .await;
    assert_eq!(m4.value("switchboard_broker_reconnects_total", &[]), 1.0);
    for c in [&mut c1, &mut c2, &mut c3] {
        let r = c
            .next_of_type("connection.resync_required", Duration::from_secs(10))
            .await;
        assert_eq!(r["from_seq"], 3, "{r}");
    }
    scrape_until(&gw, "3 more resyncs after the empty Redis", |m| {
        m.value("switchboard_resyncs_total", &[]) == 4.0
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// logs

/// Every stderr line, parsed; each must be one JSON tracing event.
fn json_lines(stderr: &[String]) -> Vec<Value> {
    stderr
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string() && v["fields"].is_object(),
                "not a tracing JSON line: {l}"
            );
            v
        })
        .collect()
}

/// Checks a line is in the span of connection `client_id` (as its current span and in its
/// span list) and returns that span.
fn conn_span<'a>(line: &'a Value, client_id: &str) -> &'a Value {
    let span = &line["span"];
    assert_eq!(
        span["name"], "conn",
        "a line about {client_id} outside its span: {line}"
    );
    assert_eq!(span["client_id"], client_id, "{line}");
    assert_eq!(
        line["spans"].as_array().and_then(|s| s.last()),
        Some(span),
        "span list and span disagree: {line}"
    );
    span
}

/// The line about `client_id` whose message is `message`.
fn said<'a>(lines: &'a [Value], client_id: &str, message: &str) -> &'a Value {
    lines
        .iter()
        .find(|v| v["fields"]["message"] == message && v["span"]["client_id"] == client_id)
        .unwrap_or_else(|| panic!("no {message:?} in the span of {client_id}"))
}

/// The JWT itself and its signature alone: neither may be printed.
fn secrets_of(token: &str) -> [String; 2] {
    let signature = token.rsplit('.').next().unwrap().to_owned();
    assert!(signature.len() >= 40, "an HS256 signature: {token}");
    [token.to_owned(), signature]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_put_connections_in_their_span_and_print_no_credential() {
    let redis = RedisServer::start();
    let mut gw = GatewayOpts::new()
        .redis(redis.url())
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .keep_output()
        .start();
    let in_query = gw.token("query-user", &["obs"]);
    let in_header = gw.token("header-user", &["obs"]);
    let refreshed = gw.token("query-user", &["obs"]);
    let for_user = gw.token("multi-user", &["obs", "other"]);
    let bad = token(
        "not-the-secret-but-long-enough-0123456789",
        "x",
        &["obs"],
        60,
        false,
    );
    let service = gw.service_token();
    let (cookie_session, query_session) = (unique("sess-cookie"), unique("sess-query"));
    let mut r = redis.conn().await;
    for id in [&cookie_session, &query_session] {
        let record = json!({"user_id": "session-user", "projects": ["obs"]}).to_string();
        let _: () = redis::cmd("SET")
            .arg(format!("session:{id}"))
            .arg(record)
            .query_async(&mut r)
            .await
            .unwrap();
    }

    // (client_id, local address of its socket, span scope field, its value)
    let mut connections: Vec<(String, SocketAddr, &str, &str)> = Vec::new();
    let mut open = |c: WsClient, est: &Value, field: &'static str, value: &'static str| {
        let local = c.ws.get_ref().local_addr().unwrap();
        let id = est["client_id"].as_str().unwrap().to_owned();
        connections.push((id, local, field, value));
        c
    };

    let (c, est) = gw.connect("obs", &in_query).await;
    let mut c = open(c, &est, "project_id", "obs");
    assert_eq!(c.call(&json!({"type": "ping"})).await["type"], "pong");
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n1", "parameters": {"k": 1}}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    let v = c
        .call(&json!({"type": "auth.refresh", "token": refreshed}))
        .await;
    assert_eq!(v["type"], "auth.refreshed", "{v}");
    c.close().await;

    let auth = format!("Bearer {in_header}");
    let cookie = format!("session={cookie_session}");
    for (path, headers) in [
        ("/ws/obs".to_owned(), vec![("Authorization", auth.as_str())]),
        ("/ws/obs".to_owned(), vec![("Cookie", cookie.as_str())]),
        (format!("/ws/obs?session={query_session}"), vec![]),
    ] {
        let mut c = gw.ws(&path, &headers).await;
        let est = c.next_json(T).await;
        assert_eq!(est["type"], "connection.established", "{est}");
        let mut c = open(c, &est, "project_id", "obs");
        c.assert_alive().await;
        c.close().await;
    }
    let mut u = gw.ws(&format!("/ws/user?token={for_user}"), &[]).await;
    let est = u.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    open(u, &est, "projects", "obs,other").close().await;

    let mut refused = gw.ws(&format!("/ws/obs?token={bad}"), &[]).await;
    refused.expect_closed_with(4001, T).await;
    gw.publish("obs", &ev(1)).await;

    gw.wait_connections(0, T).await;
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    let (stdout, stderr) = gw.output_after_exit(Duration::from_secs(5));

    let mut secrets: Vec<String> = [&in_query, &in_header, &refreshed, &for_user, &bad, &service]
        .into_iter()
        .flat_map(|t| secrets_of(t))
        .collect();
    secrets.extend([cookie_session, query_session]);
    for line in stdout.iter().chain(&stderr) {
        for secret in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "credential {secret:?} printed: {line}"
            );
        }
    }

    let lines = json_lines(&stderr);
    assert!(
        lines.len() > 10,
        "RUST_LOG=debug logged only {} lines",
        lines.len()
    );

    for (client_id, local, field, value) in &connections {
        let mine = lines
            .iter()
            .filter(|v| v.to_string().contains(client_id.as_str()));
        for v in mine {
            let span = conn_span(v, client_id);
            assert_eq!(span[*field], *value, "{v}");
            assert_eq!(
                span["peer"],
                local.to_string(),
                "peer is the client's socket: {v}"
            );
        }
        let connected = said(&lines, client_id, "websocket connected");
        // Logged by the connection's own task: the task runs in the span.
        said(&lines, client_id, "session ended");
        // The connect line links the connection to its handshake's request line.
        let request_id = connected["fields"]["request_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no request_id: {connected}"));
        let upgraded = lines.iter().any(|v| {
            v["fields"]["message"] == "request completed"
                && v["fields"]["status"] == 101
                && v["span"]["request_id"] == request_id
        });
        assert!(upgraded, "no 101 request line with request_id {request_id}");
    }
    assert_eq!(connections.len(), 5);
}

/// What other tasks log about a connection (the fan-out closing a slow consumer, the
/// heartbeat sweep dropping an idle one) is in that connection's span too, at the default
/// level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_logged_for_a_connection_by_other_tasks_are_in_its_span() {
    let mut gw = GatewayOpts::new()
        .embedded()
        .heartbeat(1)
        .idle(2)
        .cfg("ws", "outbound_queue_messages", "8")
        .env("SWITCHBOARD_LOG_FORMAT", "json")
        .keep_output()
        .start();
    let t = gw.token("u", &["busy", "quiet"]);
    // Neither reads after its greeting: one gets more than it can queue, the other nothing.
    let mut slow = ws_connect(gw.addr(), &format!("/ws/busy?token={t}"), &[], Some(4096))
        .await
        .expect("slow client");
    let slow_id = slow.next_json(T).await["client_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (quiet, est) = gw.connect("quiet", &t).await;
    let quiet_id = est["client_id"].as_str().unwrap().to_owned();

    let mut published = 0;
    loop {
        let batch: Vec<Value> = (0..10)
            .map(|i| {
                let mut e = ev(published + i);
                e["pad"] = json!("x".repeat(64 * 1024));
                e
            })
            .collect();
        gw.publish("busy", &Value::Array(batch)).await;
        published += 10;
        let m = scrape(&gw).await;
        if m.value("switchboard_slow_consumer_closes_total", &[]) == 1.0 {
            break;
        }
        assert!(
            published < 2000,
            "no slow-consumer close after {published} events"
        );
    }
    // Still reading nothing (reading would answer the pings): the quiet client is dropped
    // as idle after 2 s, the slow one when its close deadline passes.
    gw.wait_connections(0, Duration::from_secs(15)).await;
    drop((slow, quiet));
    gw.sigterm();
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    let (_, stderr) = gw.output_after_exit(Duration::from_secs(5));
    let lines = json_lines(&stderr);

    let closed = said(&lines, &slow_id, "slow consumer closed (4500)");
    assert_eq!(closed["level"], "WARN", "{closed}");
    assert_eq!(conn_span(closed, &slow_id)["project_id"], "busy");
    let idle = said(&lines, &quiet_id, "idle timeout: dropping connection");
    assert_eq!(conn_span(idle, &quiet_id)["project_id"], "quiet");
}
