//! The scenarios. Each one is bounded in time, prints a one-line summary and returns a
//! JSON result (written by main to `--out`).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::gateway;
use crate::publisher::{self, PubProgress, PubSpec};
use crate::util::{bar, mint_token, wait_until};
use crate::ws::{client_task, Mode, Shared};

/// What every scenario needs.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// The first (usually the only) gateway: readiness, the resume storm's restart.
    pub addr: SocketAddr,
    /// Every gateway the clients are spread over (`addr` first).
    pub addrs: Vec<SocketAddr>,
    pub redis_url: String,
    /// Redis Cluster seed nodes; empty: the single Redis at `redis_url`.
    pub cluster_nodes: Vec<String>,
    pub secret: String,
    /// The gateways' pids (CPU and RSS are summed over them); the first is the one the
    /// resume storm restarts.
    pub gateway_pids: Vec<u32>,
    pub sources: u8,
    pub concurrency: usize,
    pub tag: String,
}

impl Ctx {
    fn projects(&self, scenario: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("lt-{}-{scenario}-{i}", self.tag))
            .collect()
    }

    /// `/ws/{p}?token=...` per project; each token grants only its project.
    fn paths(&self, projects: &[String]) -> anyhow::Result<Vec<String>> {
        projects
            .iter()
            .map(|p| {
                let tok = mint_token(&self.secret, "loadgen", std::slice::from_ref(p), 3600)?;
                Ok(format!("/ws/{p}?token={tok}"))
            })
            .collect()
    }

    /// Summed over the gateways; None without a pid or when one cannot be read.
    fn sum(&self, read: impl Fn(u32) -> Option<u64>) -> Option<u64> {
        if self.gateway_pids.is_empty() {
            return None;
        }
        self.gateway_pids.iter().map(|p| read(*p)).sum()
    }

    fn rss(&self) -> Option<u64> {
        self.sum(gateway::rss_bytes)
    }

    fn cpu(&self) -> Option<u64> {
        self.sum(gateway::cpu_us)
    }

    /// CPU µs of each gateway.
    fn cpu_each(&self) -> Vec<Option<u64>> {
        self.gateway_pids
            .iter()
            .map(|p| gateway::cpu_us(*p))
            .collect()
    }

    fn threads(&self) -> Vec<(u32, String, u64)> {
        self.gateway_pids
            .iter()
            .flat_map(|p| gateway::thread_cpu_us(*p))
            .collect()
    }

    /// The Redis the gateways use, for the JSON.
    async fn redis_json(&self) -> Value {
        if self.cluster_nodes.is_empty() {
            json!({ "kind": "single" })
        } else {
            json!({
                "kind": "cluster",
                "seed_nodes": self.cluster_nodes,
                "masters": publisher::cluster_masters(&self.cluster_nodes).await,
            })
        }
    }
}

/// The gateway's CPU by thread between two readings: each thread's seconds, and the share
/// of the busiest runtime worker among the workers (issue 13: fan-out on every core).
fn thread_split(before: &[(u32, String, u64)], after: &[(u32, String, u64)]) -> Value {
    let mut threads: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, name, us)| {
            let was = before
                .iter()
                .find(|(t, _, _)| t == tid)
                .map_or(0, |(_, _, u)| *u);
            (format!("{name}:{tid}"), us.saturating_sub(was) as f64 / 1e6)
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let workers: Vec<f64> = threads
        .iter()
        .filter(|(n, _)| n.starts_with("tokio-r") || n.starts_with("switchboard"))
        .map(|(_, s)| *s)
        .collect();
    let total: f64 = workers.iter().sum();
    let busiest = workers.first().copied().unwrap_or(0.0);
    json!({
        "threads": threads.iter().map(|(n, s)| json!({"thread": n, "cpu_s": s})).collect::<Vec<_>>(),
        "workers": workers.len(),
        "busiest_worker_share": if total > 0.0 { busiest / total } else { 0.0 },
    })
}

fn spawn_clients(
    sh: &Rc<Shared>,
    sem: &Arc<Semaphore>,
    range: std::ops::Range<usize>,
    mode: Mode,
    rcvbuf: Option<u32>,
) {
    for i in range {
        tokio::task::spawn_local(client_task(sh.clone(), i, mode, Some(sem.clone()), rcvbuf));
    }
}

/// Waits (bounded) until `n` clients are established; the time it took.
async fn connect_phase(
    sh: &Rc<Shared>,
    n: usize,
    timeout: Duration,
    label: &str,
) -> (bool, Duration) {
    let t0 = Instant::now();
    let pb = bar(n as u64, label);
    let ok = wait_until(timeout, Duration::from_millis(20), || {
        pb.set_position(sh.established.get() as u64);
        sh.established.get() >= n
    })
    .await;
    pb.finish_and_clear();
    (ok, t0.elapsed())
}

fn connect_timeout(n: usize) -> Duration {
    Duration::from_secs(30 + (n / 200) as u64)
}

fn errors_json(sh: &Shared) -> Value {
    let errs: serde_json::Map<String, Value> = sh
        .errors
        .borrow()
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let closes: serde_json::Map<String, Value> = sh
        .closes
        .borrow()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({ "errors": errs, "close_codes": closes })
}

/// p50/p90/p99/p999/max (µs) and a CDF (quantile, µs) for the plot.
fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!(null);
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let mut cdf = Vec::new();
    for i in 0..=160 {
        let q = 1.0 - 10f64.powf(-4.0 * i as f64 / 160.0);
        cdf.push(json!([q, us(h.value_at_quantile(q))]));
    }
    cdf.push(json!([1.0, us(h.max())]));
    json!({
        "samples": h.len(),
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
        "mean_us": h.mean() / 1000.0,
        "cdf": cdf,
    })
}

fn ms(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1}ms", us / 1000.0)
    } else {
        format!("{:.0}µs", us)
    }
}

// ---------------------------------------------------------------- idle

pub async fn idle(
    ctx: &Ctx,
    clients: usize,
    projects: usize,
    hold: Duration,
) -> anyhow::Result<Value> {
    let projects = projects.clamp(1, clients.max(1));
    let names = ctx.projects("idle", projects);
    let sh = Shared::new(
        ctx.addrs.clone(),
        ctx.sources,
        ctx.paths(&names)?,
        |i| (i % projects) as u32,
        clients,
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = ctx.rss();
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    spawn_clients(&sh, &sem, 0..clients, Mode::Reader, None);
    let (all, took) = connect_phase(&sh, clients, connect_timeout(clients), "idle connect").await;
    let rss_connected = ctx.rss();
    tokio::time::sleep(hold).await;
    let rss_after = ctx.rss();
    let established = sh.established.get();
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if established > 0 => Some((a as f64 - b as f64) / established as f64),
        _ => None,
    };
    println!(
        "idle: {established}/{clients} connections over {projects} projects in {:.2}s; gateway RSS {} -> {} MiB; {} bytes/connection",
        took.as_secs_f64(),
        rss_before.map_or("?".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
        rss_after.map_or("?".into(), |b| format!("{:.1}", b as f64 / 1048576.0)),
        per_conn.map_or("?".into(), |b| format!("{b:.0}")),
    );
    Ok(json!({
        "scenario": "idle",
        "params": { "clients": clients, "projects": projects, "hold_s": hold.as_secs_f64() },
        "all_established": all,
        "established": established,
        "connect_s": took.as_secs_f64(),
        "rss_before_bytes": rss_before,
        "rss_connected_bytes": rss_connected,
        "rss_after_bytes": rss_after,
        "rss_per_connection_bytes": per_conn,
        "target": { "rss_per_connection_bytes_max": 2048 },
        "met": per_conn.map(|b| b <= 2048.0 && all),
        "client": errors_json(&sh),
    }))
}

// ---------------------------------------------------------------- connect storm

pub async fn connect_storm(ctx: &Ctx, clients: usize, projects: usize) -> anyhow::Result<Value> {
    let projects = projects.clamp(1, clients.max(1));
    let names = ctx.projects("storm", projects);
    let sh = Shared::new(
        ctx.addrs.clone(),
        ctx.sources,
        ctx.paths(&names)?,
        |i| (i % projects) as u32,
        clients,
    );
    let cpu0 = ctx.cpu();
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    let start = sh.start;
    spawn_clients(&sh, &sem, 0..clients, Mode::Reader, None);
    let (all, _) = connect_phase(&sh, clients, connect_timeout(clients), "connect storm").await;
    let cpu1 = ctx.cpu();
    let last = sh
        .clients
        .iter()
        .filter_map(|c| c.borrow().established_after_ns)
        .max()
        .unwrap_or(0);
    let secs = last as f64 / 1e9;
    let established = sh.established.get();
    let rate = if secs > 0.0 {
        established as f64 / secs
    } else {
        0.0
    };
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / established.max(1) as f64),
        _ => None,
    };
    let _ = start;
    println!(
        "connect-storm: {established}/{clients} established in {secs:.3}s ({rate:.0} connects/s, concurrency {}); gateway CPU {} µs/connect",
        ctx.concurrency,
        cpu_us.map_or("?".into(), |c| format!("{c:.0}")),
    );
    Ok(json!({
        "scenario": "connect-storm",
        "params": { "clients": clients, "projects": projects, "concurrency": ctx.concurrency },
        "all_established": all,
        "established": established,
        "seconds": secs,
        "connects_per_sec": rate,
        "gateway_cpu_us_per_connect": cpu_us,
        "rss_after_bytes": ctx.rss(),
        "target": { "seconds_max_at_10k": 0.6 },
        "met": Some(all && secs <= 0.6 * clients as f64 / 10_000.0),
        "client": errors_json(&sh),
    }))
}

// ---------------------------------------------------------------- fanout, spread, slow

pub struct Traffic {
    pub name: String,
    pub clients: usize,
    pub projects: usize,
    pub rate: f64,
    pub duration: Duration,
    pub slow: usize,
    pub pad: usize,
    pub history_max_len: u64,
    pub queue_bytes: u64,
    pub queue_messages: u64,
}

pub async fn traffic(ctx: &Ctx, t: &Traffic) -> anyhow::Result<Value> {
    let projects = t.projects.clamp(1, t.clients.max(1));
    let names = ctx.projects(&t.name, projects);
    let readers = t.clients.saturating_sub(t.slow);
    let sh = Shared::new(
        ctx.addrs.clone(),
        ctx.sources,
        ctx.paths(&names)?,
        |i| (i % projects) as u32,
        t.clients,
    );
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    // Readers first, then the never-reading clients (small receive buffer, so the gateway
    // queue fills rather than the kernel's).
    spawn_clients(&sh, &sem, 0..readers, Mode::Reader, None);
    spawn_clients(&sh, &sem, readers..t.clients, Mode::NeverRead, Some(4096));
    let (all, took) = connect_phase(&sh, t.clients, connect_timeout(t.clients), "connect").await;
    if !all {
        eprintln!(
            "{}: only {}/{} clients established after {:.1}s; measuring those",
            t.name,
            sh.established.get(),
            t.clients,
            took.as_secs_f64()
        );
    }
    // Let the snapshots (`status`) settle, then measure from a clean state.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sh.latency.borrow_mut().reset();
    let m0 = gateway::metrics_all(&ctx.addrs).await;
    let rss0 = ctx.rss();
    let cpu0 = ctx.cpu();
    let cpu_each0 = ctx.cpu_each();
    let threads0 = ctx.threads();
    let events0 = sh.events.get();
    let t0 = Instant::now();

    let progress = Arc::new(PubProgress::default());
    let handle = publisher::spawn(
        PubSpec {
            redis_url: ctx.redis_url.clone(),
            cluster_nodes: ctx.cluster_nodes.clone(),
            projects: names.clone(),
            rate: t.rate,
            duration: t.duration,
            pad: t.pad,
            history_max_len: t.history_max_len,
        },
        progress.clone(),
    );
    let total = (t.rate * t.duration.as_secs_f64()).round() as u64;
    let pb = bar(total, &t.name);
    let mut rss_timeline: Vec<(f64, u64)> = Vec::new();
    let mut rss_peak = rss0.unwrap_or(0);
    let pub_deadline = Instant::now() + t.duration + Duration::from_secs(40);
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    while !handle.is_finished() && Instant::now() < pub_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pb.set_position(progress.published.load(Ordering::Relaxed));
        if last_sample.elapsed() >= Duration::from_millis(250) {
            last_sample = Instant::now();
            if let Some(r) = ctx.rss() {
                rss_peak = rss_peak.max(r);
                rss_timeline.push((t0.elapsed().as_secs_f64(), r));
            }
        }
    }
    progress.stop.store(true, Ordering::Relaxed);
    pb.finish_and_clear();
    let report = handle
        .join()
        .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
    let pub_end = Instant::now();

    // Drain: until every reader has every event of its project, or no progress for 2 s.
    let expected_of = |i: usize| -> u64 {
        let st = sh.clients[i].borrow();
        let last = report.last_seq[st.project as usize];
        st.baseline.map_or(0, |b| last.saturating_sub(b))
    };
    let expected: u64 = (0..readers).map(expected_of).sum();
    let received = || -> u64 { (0..readers).map(|i| sh.clients[i].borrow().received).sum() };
    let mut last_progress = (received(), Instant::now());
    let drain_end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < drain_end {
        let r = received();
        if r >= expected {
            break;
        }
        if r != last_progress.0 {
            last_progress = (r, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(2) {
            break;
        }
        if let Some(x) = ctx.rss() {
            rss_peak = rss_peak.max(x);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drained = Instant::now();
    let cpu1 = ctx.cpu();
    let cpu_each1 = ctx.cpu_each();
    let threads = thread_split(&threads0, &ctx.threads());
    let m1 = gateway::metrics_all(&ctx.addrs).await;
    let redis = ctx.redis_json().await;
    let rss1 = ctx.rss();
    if let Some(r) = rss1 {
        rss_peak = rss_peak.max(r);
        rss_timeline.push((t0.elapsed().as_secs_f64(), r));
    }
    let window = drained - t0;
    let delivered = sh.events.get() - events0;
    let reader_received = received();
    let (mut gaps, mut missing, mut dups, mut ooo, mut lossy_clients) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for i in 0..readers {
        let st = sh.clients[i].borrow();
        gaps += st.gaps;
        missing += st.missing;
        dups += st.duplicates;
        ooo += st.out_of_order;
        if st.received < expected_of(i) {
            lossy_clients += 1;
        }
    }
    let loss = expected.saturating_sub(reader_received);
    let started = progress.started_ns.load(Ordering::Relaxed);
    let active_s = (sh.last_event_ns.get().saturating_sub(started)) as f64 / 1e9;
    let delivered_per_s = if active_s > 0.0 {
        delivered as f64 / active_s
    } else {
        0.0
    };
    let cpu_us = match (cpu0, cpu1) {
        (Some(a), Some(b)) if delivered > 0 => Some((b - a) as f64 / delivered as f64),
        _ => None,
    };
    let cpu_util = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some((b - a) as f64 / window.as_micros().max(1) as f64),
        _ => None,
    };
    let metric_delta = |name: &str| -> Option<f64> {
        Some(gateway::metric_sum(m1.as_deref()?, name) - gateway::metric_sum(m0.as_deref()?, name))
    };
    let hist = sh.latency.borrow();
    let lat = latency_json(&hist);
    // Inside the gateway, from its own histograms: read from pub/sub -> handed to every
    // socket (fan-out), and publish -> read (pub/sub lag, through Redis). Set against the
    // end-to-end latency they say how much of a tail is the gateway's.
    let gateway_q = |name: &str, q: f64| -> Option<f64> {
        gateway::histogram_quantile(m0.as_deref()?, m1.as_deref()?, name, q).map(|s| s * 1e6)
    };
    let inside = json!({
        "fanout_p99_us_le": gateway_q("switchboard_fanout_seconds", 0.99),
        "fanout_p999_us_le": gateway_q("switchboard_fanout_seconds", 0.999),
        "pubsub_lag_p99_us_le": gateway_q("switchboard_pubsub_lag_seconds", 0.99),
    });
    let slow_closes = metric_delta("switchboard_slow_consumer_closes_total");
    let growth = rss_peak as f64 - rss0.unwrap_or(0) as f64;

    // Several gateways and/or a Redis Cluster (run.sh's `cluster`): not issue 4's setup,
    // so no target; the CPU is the gateways' sum.
    let multi = ctx.addrs.len() > 1 || !ctx.cluster_nodes.is_empty();
    let setup = if multi {
        format!(
            " ({} gateways on {})",
            ctx.addrs.len(),
            if ctx.cluster_nodes.is_empty() {
                "one Redis"
            } else {
                "a Redis Cluster"
            }
        )
    } else {
        String::new()
    };
    let cpu_each: Vec<Option<f64>> = cpu_each0
        .iter()
        .zip(&cpu_each1)
        .map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?) as f64 / 1e6))
        .collect();
    let mut per_gateway = vec![0usize; ctx.addrs.len()];
    for i in 0..t.clients {
        if let Some(g) = ctx.addrs.iter().position(|a| *a == sh.addr(i)) {
            per_gateway[g] += 1;
        }
    }
    let mut summary = format!(
        "{}{setup}: {} clients ({} slow) over {} projects, {:.0} ev/s for {:.0}s: published {}, delivered {} ({:.0}/s), loss {} (gaps {}, dup {}, ooo {}), latency p50 {} p90 {} p99 {} p999 {} max {}, gateway CPU {} µs/delivery ({}% of a core)",
        t.name,
        t.clients,
        t.slow,
        projects,
        t.rate,
        t.duration.as_secs_f64(),
        report.published,
        delivered,
        delivered_per_s,
        loss,
        gaps,
        dups,
        ooo,
        ms(lat["p50_us"].as_f64().unwrap_or(0.0)),
        ms(lat["p90_us"].as_f64().unwrap_or(0.0)),
        ms(lat["p99_us"].as_f64().unwrap_or(0.0)),
        ms(lat["p999_us"].as_f64().unwrap_or(0.0)),
        ms(lat["max_us"].as_f64().unwrap_or(0.0)),
        cpu_us.map_or("?".into(), |c| format!("{c:.2}")),
        cpu_util.map_or("?".into(), |c| format!("{:.0}", c * 100.0)),
    );
    if threads["workers"].as_u64().unwrap_or(0) > 1 {
        summary.push_str(&format!(
            ", busiest worker {:.0}% of the workers' CPU",
            threads["busiest_worker_share"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
    if t.slow > 0 {
        summary.push_str(&format!(
            "; RSS {:.1} -> peak {:.1} MiB (+{:.0} KiB per slow client, bound {} KiB); 4500 closes {}",
            rss0.unwrap_or(0) as f64 / 1048576.0,
            rss_peak as f64 / 1048576.0,
            growth / t.slow as f64 / 1024.0,
            t.queue_bytes / 1024,
            slow_closes.map_or("?".into(), |c| format!("{c:.0}")),
        ));
    }
    println!("{summary}");

    let targets = match (t.name.as_str(), t.rate as u64) {
        _ if multi => json!({}),
        ("fanout", 100) => json!({ "cpu_us_per_delivery_max": 4.6 }),
        ("fanout", 1000) => json!({ "cpu_us_per_delivery_max": 1.2, "loss": 0 }),
        ("spread", _) => json!({ "p99_us_max": 300 }),
        ("slow", _) => {
            json!({ "reader_loss": 0, "rss_growth_per_slow_client_max_bytes": t.queue_bytes })
        }
        _ => json!({}),
    };
    let met = match t.name.as_str() {
        _ if multi => None,
        "fanout" if t.rate as u64 == 100 => cpu_us.map(|c| c <= 4.6),
        "fanout" if t.rate as u64 == 1000 => cpu_us.map(|c| c <= 1.2 && loss == 0),
        "spread" => lat["p99_us"].as_f64().map(|p| p <= 300.0),
        "slow" => Some(loss == 0 && growth <= (t.slow as u64 * t.queue_bytes) as f64),
        _ => None,
    };
    Ok(json!({
        "scenario": t.name,
        "params": {
            "clients": t.clients, "projects": projects, "rate": t.rate,
            "duration_s": t.duration.as_secs_f64(), "slow": t.slow, "pad_bytes": t.pad,
            "outbound_queue_messages": t.queue_messages, "outbound_queue_bytes": t.queue_bytes,
            "gateways": ctx.addrs.len(), "redis": redis,
        },
        "clients_per_gateway": per_gateway,
        "gateway_cpu_s_each": cpu_each,
        "all_established": all,
        "established": sh.established.get(),
        "published": report.published,
        "publish_errors": report.errors,
        "publish_first_error": report.first_error,
        "publisher_max_behind_ms": report.max_behind.as_secs_f64() * 1000.0,
        "publish_s": (pub_end - t0).as_secs_f64(),
        "window_s": window.as_secs_f64(),
        "expected": expected,
        "delivered": delivered,
        "delivered_per_s": delivered_per_s,
        "loss": loss,
        "clients_with_loss": lossy_clients,
        "gaps": gaps,
        "missing_in_gaps": missing,
        "duplicates": dups,
        "out_of_order": ooo,
        "latency": lat,
        "gateway_cpu_us_per_delivery": cpu_us,
        "gateway_cpu_core_fraction": cpu_util,
        "gateway_threads": threads,
        "gateway_latency_inside": inside,
        "gateway_metrics_delta": {
            "messages_delivered": metric_delta("switchboard_messages_delivered_total"),
            "messages_dropped": metric_delta("switchboard_messages_dropped_total"),
            "slow_consumer_closes": slow_closes,
        },
        "rss_before_bytes": rss0,
        "rss_peak_bytes": rss_peak,
        "rss_after_bytes": rss1,
        "rss_growth_per_slow_client_bytes": (t.slow > 0).then(|| growth / t.slow as f64),
        "rss_timeline": rss_timeline,
        "client_frames": sh.frames.get(),
        "client_bytes": sh.bytes.get(),
        "target": targets,
        "met": met,
        "client": errors_json(&sh),
    }))
}

// ---------------------------------------------------------------- resume storm

pub struct Resume {
    pub clients: usize,
    pub rate: f64,
    pub duration: Duration,
    pub restart_after: Duration,
    pub launcher: gateway::Launcher,
    pub history_max_len: u64,
}

pub async fn resume_storm(ctx: &Ctx, r: &Resume) -> anyhow::Result<Value> {
    let old_pid = ctx.gateway_pids.first().copied().ok_or_else(|| {
        anyhow::anyhow!("resume-storm needs --gateway-pid (the gateway to restart)")
    })?;
    let names = ctx.projects("resume", 1);
    let sh = Shared::new(
        vec![ctx.addr],
        ctx.sources,
        ctx.paths(&names)?,
        |_| 0,
        r.clients,
    );
    sh.deadline
        .set(Some(Instant::now() + r.duration + Duration::from_secs(120)));
    let sem = Arc::new(Semaphore::new(ctx.concurrency));
    spawn_clients(&sh, &sem, 0..r.clients, Mode::Resuming, None);
    let (all, took) = connect_phase(&sh, r.clients, connect_timeout(r.clients), "connect").await;
    if !all {
        eprintln!(
            "resume-storm: only {}/{} established after {:.1}s",
            sh.established.get(),
            r.clients,
            took.as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    sh.latency.borrow_mut().reset();
    let progress = Arc::new(PubProgress::default());
    let handle = publisher::spawn(
        PubSpec {
            redis_url: ctx.redis_url.clone(),
            cluster_nodes: ctx.cluster_nodes.clone(),
            projects: names.clone(),
            rate: r.rate,
            duration: r.duration,
            pad: 0,
            history_max_len: r.history_max_len,
        },
        progress.clone(),
    );
    let total = (r.rate * r.duration.as_secs_f64()).round() as u64;
    let pb = bar(total, "resume-storm");
    tokio::time::sleep(r.restart_after).await;

    // Restart: SIGTERM the running gateway, wait until it is gone, start a new one.
    let t_restart = Instant::now();
    gateway::signal(old_pid, "TERM");
    let exited = gateway::wait_exit(old_pid, Duration::from_secs(20)).await;
    let t_exited = Instant::now();
    let child = r.launcher.start()?;
    let new_pid = child.id();
    let ready = gateway::wait_ready(ctx.addr, Duration::from_secs(30)).await;
    let t_ready = Instant::now();

    // Everything published (acknowledged by Redis) up to the moment the new gateway was
    // ready is what the clients missed or may have missed: time until every client has
    // resumed and holds all of it (while publishing goes on).
    let seq_at_ready = progress.published.load(Ordering::Relaxed);
    let holds = |upto: u64| {
        sh.clients
            .iter()
            .filter(|c| {
                let c = c.borrow();
                c.connected && c.connects >= 2 && c.last_seq >= upto
            })
            .count()
    };
    let mut t_resumed: Option<Instant> = None;
    // When each client first held everything published by the ready moment: the spread
    // of these says whether a storm is slow as a whole or a few clients lag.
    let mut caught_at: Vec<Option<f64>> = vec![None; r.clients];
    let note_caught = |caught_at: &mut [Option<f64>]| {
        for (i, c) in sh.clients.iter().enumerate() {
            if caught_at[i].is_none() {
                let c = c.borrow();
                if c.connected && c.connects >= 2 && c.last_seq >= seq_at_ready {
                    caught_at[i] = Some(t_ready.elapsed().as_secs_f64());
                }
            }
        }
    };
    let pub_deadline = Instant::now() + r.duration + Duration::from_secs(40);
    while !handle.is_finished() && Instant::now() < pub_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        pb.set_position(progress.published.load(Ordering::Relaxed));
        note_caught(&mut caught_at);
        if t_resumed.is_none() && holds(seq_at_ready) >= r.clients {
            t_resumed = Some(Instant::now());
        }
    }
    note_caught(&mut caught_at);
    let late: Vec<Value> = caught_at
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_none_or(|t| t > 3.0))
        .take(5)
        .map(|(i, t)| {
            let c = sh.clients[i].borrow();
            json!({"client": i, "caught_up_after_ready_s": t, "connected": c.connected,
                   "connects": c.connects, "last_seq": c.last_seq, "resumed": c.resumed,
                   "resyncs": c.resyncs})
        })
        .collect();
    let mut times: Vec<f64> = caught_at
        .iter()
        .map(|t| t.unwrap_or(f64::INFINITY))
        .collect();
    times.sort_by(f64::total_cmp);
    let pct = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    let caught_spread = json!({
        "p50_s": pct(0.5), "p90_s": pct(0.9), "p99_s": pct(0.99), "max_s": pct(1.0),
        "later_than_3s": times.iter().filter(|t| **t > 3.0).count(),
        "first_late_clients": late,
    });
    progress.stop.store(true, Ordering::Relaxed);
    pb.finish_and_clear();
    let report = handle
        .join()
        .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
    let final_seq = report.last_seq[0];
    let t_pub_end = Instant::now();
    let pb = bar(r.clients as u64, "catch-up");
    let all_caught = wait_until(Duration::from_secs(60), Duration::from_millis(5), || {
        if t_resumed.is_none() && holds(seq_at_ready) >= r.clients {
            t_resumed = Some(Instant::now());
        }
        let n = holds(final_seq);
        pb.set_position(n as u64);
        n >= r.clients
    })
    .await;
    pb.finish_and_clear();
    let caught_up = || holds(final_seq);
    let t_done = Instant::now();
    let n_caught = caught_up();
    let (mut gaps, mut missing, mut dups, mut ooo, mut resyncs, mut resumed, mut connects) =
        (0, 0, 0, 0, 0, 0, 0);
    let mut loss = 0u64;
    for c in &sh.clients {
        let c = c.borrow();
        gaps += c.gaps;
        missing += c.missing;
        dups += c.duplicates;
        ooo += c.out_of_order;
        resyncs += c.resyncs;
        resumed += c.resumed;
        connects += c.connects;
        let expected = c.baseline.map_or(0, |b| final_seq.saturating_sub(b));
        loss += expected.saturating_sub(c.received);
    }
    let lat = latency_json(&sh.latency.borrow());
    sh.deadline.set(Some(Instant::now()));
    // Stop the gateway this process started (run.sh starts a fresh one per scenario).
    gateway::stop_child(child).await;
    let resumed_s = t_resumed.map(|t| (t - t_restart).as_secs_f64());
    let resumed_after_ready_s = t_resumed.map(|t| (t - t_ready).as_secs_f64());
    println!(
        "resume-storm: {} clients, {:.0} ev/s, restart after {:.1}s: old gateway gone in {:.2}s, new one ready after {:.2}s; every client resumed and caught up (seq {}) {} after the restart ({} after ready); at the end {}/{} hold every event (seq {}); {} resumed, {} resyncs, gaps {} (missing {}), dup {}, ooo {}, loss {}",
        r.clients,
        r.rate,
        r.restart_after.as_secs_f64(),
        (t_exited - t_restart).as_secs_f64(),
        (t_ready - t_restart).as_secs_f64(),
        seq_at_ready,
        resumed_s.map_or("never".into(), |s| format!("{s:.2}s")),
        resumed_after_ready_s.map_or("-".into(), |s| format!("{s:.2}s")),
        n_caught,
        r.clients,
        final_seq,
        resumed,
        resyncs,
        gaps,
        missing,
        dups,
        ooo,
        loss,
    );
    Ok(json!({
        "scenario": "resume-storm",
        "params": {
            "clients": r.clients, "rate": r.rate, "duration_s": r.duration.as_secs_f64(),
            "restart_after_s": r.restart_after.as_secs_f64(),
        },
        "all_established": all,
        "old_gateway_exited": exited,
        "new_gateway_ready": ready,
        "new_gateway_pid": new_pid,
        "published": report.published,
        "final_seq": final_seq,
        "old_exit_s": (t_exited - t_restart).as_secs_f64(),
        "ready_after_restart_s": (t_ready - t_restart).as_secs_f64(),
        "all_caught_up": all_caught,
        "caught_up_clients": n_caught,
        "seq_at_ready": seq_at_ready,
        "caught_up_after_restart_s": resumed_s,
        "caught_up_after_ready_s": resumed_after_ready_s,
        "caught_up_per_client_after_ready": caught_spread,
        "all_final_after_publish_end_s": (t_done - t_pub_end).as_secs_f64(),
        "connects": connects,
        "resumed": resumed,
        "resyncs": resyncs,
        "gaps": gaps,
        "missing_in_gaps": missing,
        "duplicates": dups,
        "out_of_order": ooo,
        "loss": loss,
        "latency": lat,
        "target": { "all_caught_up": true, "gaps": 0, "duplicates": 0 },
        "met": Some(all_caught && t_resumed.is_some() && gaps == 0 && dups == 0 && loss == 0 && resyncs == 0),
        "client": errors_json(&sh),
    }))
}
