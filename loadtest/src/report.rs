//! `loadgen report --dir DIR`: report.md (a table of every scenario JSON in DIR, with the
//! issue's targets next to the figures) and latency.svg (latency by percentile of the
//! fanout/spread runs, drawn with plotters' SVG backend and its built-in font estimate, so
//! no system fonts are needed).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(|x| x.as_f64())
}

fn lat(v: &Value, key: &str) -> String {
    match v
        .get("latency")
        .and_then(|l| l.get(key))
        .and_then(|x| x.as_f64())
    {
        Some(us) if us >= 1000.0 => format!("{:.2} ms", us / 1000.0),
        Some(us) => format!("{us:.0} µs"),
        None => "?".into(),
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("?".into(), |x| format!("{x:.digits$}"))
}

/// "3 gateways on a 3-master cluster" / "3 gateways on one Redis" for the runs of run.sh's
/// `cluster` (several gateways or a Redis Cluster); None for the others.
fn setup(v: &Value) -> Option<String> {
    let p = &v["params"];
    let gateways = p["gateways"].as_u64().unwrap_or(1);
    let cluster = p["redis"]["kind"].as_str() == Some("cluster");
    if gateways <= 1 && !cluster {
        return None;
    }
    let redis = if cluster {
        match p["redis"]["masters"].as_u64() {
            Some(m) => format!("a {m}-master cluster"),
            None => "a Redis Cluster".into(),
        }
    } else {
        "one Redis".into()
    };
    Some(format!(
        "{gateways} gateway{} on {redis}",
        if gateways == 1 { "" } else { "s" }
    ))
}

fn row(v: &Value) -> (String, String, String, String, String) {
    let p = &v["params"];
    let name = v["scenario"].as_str().unwrap_or("?").to_string();
    let met = match v.get("met").and_then(|m| m.as_bool()) {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "–",
    }
    .to_string();
    let params: String;
    let measured: String;
    let target: String;
    match name.as_str() {
        "idle" => {
            params = format!("{} clients, {} projects", p["clients"], p["projects"]);
            measured = format!(
                "{} bytes/connection (RSS {:.1} → {:.1} MiB), {} established",
                opt(f(v, "rss_per_connection_bytes"), 0),
                f(v, "rss_before_bytes").unwrap_or(0.0) / 1048576.0,
                f(v, "rss_after_bytes").unwrap_or(0.0) / 1048576.0,
                v["established"]
            );
            target = "≤ 2 KB/connection at 10k".into();
        }
        "connect-storm" => {
            params = format!("{} clients, concurrency {}", p["clients"], p["concurrency"]);
            measured = format!(
                "{} s ({} connects/s), {} µs gateway CPU/connect",
                opt(f(v, "seconds"), 3),
                opt(f(v, "connects_per_sec"), 0),
                opt(f(v, "gateway_cpu_us_per_connect"), 0)
            );
            target = "10k in ≤ 0.6 s".into();
        }
        "resume-storm" => {
            params = format!(
                "{} clients, {} ev/s, restart at {} s",
                p["clients"], p["rate"], p["restart_after_s"]
            );
            measured = format!(
                "all caught up {} s after restart ({} s after ready); {} resyncs, {} gaps, {} dup, loss {}",
                opt(f(v, "caught_up_after_restart_s"), 2),
                opt(f(v, "caught_up_after_ready_s"), 2),
                v["resyncs"],
                v["gaps"],
                v["duplicates"],
                v["loss"]
            );
            target = "every client caught up, no gap".into();
        }
        _ => {
            params = format!(
                "{}{} clients{}, {} projects, {} ev/s, {} s",
                setup(v).map_or(String::new(), |s| format!("{s}: ")),
                p["clients"],
                if p["slow"].as_u64().unwrap_or(0) > 0 {
                    format!(" ({} never read)", p["slow"])
                } else {
                    String::new()
                },
                p["projects"],
                p["rate"],
                p["duration_s"]
            );
            let mut m = format!(
                "{} deliveries/s, loss {} (gaps {}, dup {}, ooo {}), p50 {} p90 {} p99 {} p999 {} max {}, {} µs CPU/delivery ({}% core)",
                opt(f(v, "delivered_per_s"), 0),
                v["loss"],
                v["gaps"],
                v["duplicates"],
                v["out_of_order"],
                lat(v, "p50_us"),
                lat(v, "p90_us"),
                lat(v, "p99_us"),
                lat(v, "p999_us"),
                lat(v, "max_us"),
                opt(f(v, "gateway_cpu_us_per_delivery"), 2),
                opt(f(v, "gateway_cpu_core_fraction").map(|x| x * 100.0), 0),
            );
            if p["slow"].as_u64().unwrap_or(0) > 0 {
                let _ = write!(
                    m,
                    "; RSS peak +{} KiB per slow client, {} 4500-closes",
                    opt(
                        f(v, "rss_growth_per_slow_client_bytes").map(|x| x / 1024.0),
                        0
                    ),
                    opt(
                        v["gateway_metrics_delta"]["slow_consumer_closes"].as_f64(),
                        0
                    )
                );
            }
            measured = m;
            target = match (name.as_str(), p["rate"].as_f64().unwrap_or(0.0) as u64) {
                _ if setup(v).is_some() => "–".into(),
                ("fanout", 100) => "≤ 4.6 µs CPU/delivery".into(),
                ("fanout", 1000) => "≤ 1.2 µs CPU/delivery, no loss".into(),
                ("spread", _) => "p99 ≤ 0.3 ms".into(),
                ("slow", _) => format!(
                    "readers lose nothing; ≤ {} KiB (queue) per slow client",
                    p["outbound_queue_bytes"].as_u64().unwrap_or(0) / 1024
                ),
                _ => "–".into(),
            };
        }
    }
    (name, params, measured, target, met)
}

pub fn write(dir: &Path) -> anyhow::Result<()> {
    let mut runs: Vec<(String, Value)> = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "json") {
            let v: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            runs.push((stem, v));
        }
    }
    let order = [
        "idle",
        "connect-storm",
        "fanout",
        "spread",
        "resume-storm",
        "slow",
    ];
    runs.sort_by_key(|(stem, v)| {
        let name = v["scenario"].as_str().unwrap_or("");
        (
            order.iter().position(|o| *o == name).unwrap_or(99),
            stem.clone(),
        )
    });
    let mut md = String::new();
    let _ = writeln!(md, "# Switchboard load test\n");
    if let Ok(meta) = std::fs::read_to_string(dir.join("meta.txt")) {
        let _ = writeln!(md, "```\n{}\n```\n", meta.trim());
    }
    let _ = writeln!(
        md,
        "Gateway pinned to CPU 0; Redis and the load generator share CPU 1. Targets are those of issue 4.\n"
    );
    let _ = writeln!(md, "| scenario | parameters | measured | target | met |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    for (stem, v) in &runs {
        let (name, params, measured, target, met) = row(v);
        let label = if stem == &name {
            name
        } else {
            format!("{name} (`{stem}`)")
        };
        let _ = writeln!(md, "| {label} | {params} | {measured} | {target} | {met} |");
    }
    let _ = writeln!(
        md,
        "\nLatency by percentile: `latency.svg`. Raw figures: one JSON per scenario."
    );
    let scale = scale_points(&runs);
    if !scale.is_empty() {
        let _ = writeln!(
            md,
            "\nLatency against connections (`scale-*`, heartbeat every 5 s unless BEAT_INTERVAL \
             said otherwise): `scale.svg`.\n\n| connections | p50 | p99 | max | CPU/delivery |\n\
             | --- | --- | --- | --- | --- |"
        );
        for p in &scale {
            let _ = writeln!(
                md,
                "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {} µs |",
                p.clients,
                p.p50_us / 1000.0,
                p.p99_us / 1000.0,
                p.max_us / 1000.0,
                opt(p.cpu_us, 2)
            );
        }
    }
    let mut multi: Vec<&(String, Value)> =
        runs.iter().filter(|(_, v)| setup(v).is_some()).collect();
    multi.sort_by_key(|(stem, v)| {
        (
            v["params"]["redis"]["kind"].as_str() == Some("cluster"),
            stem.clone(),
        )
    });
    if !multi.is_empty() {
        let _ = writeln!(
            md,
            "\nSeveral gateways (`cluster`, issue 14): the same load on one Redis and on a Redis \
             Cluster. All gateways share CPU 0; Redis (every node of the cluster) and the load \
             generator share CPU 1. CPU/delivery is the gateways' sum.\n\n\
             | setup | load | deliveries/s | p50 | p99 | max | lost | publish errors | gateway CPU/delivery |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for (stem, v) in multi {
            let p = &v["params"];
            let _ = writeln!(
                md,
                "| {} (`{stem}`) | {} clients, {} projects, {} ev/s, {} s | {} | {} | {} | {} | {} | {} | {} µs |",
                setup(v).unwrap_or_default(),
                p["clients"],
                p["projects"],
                p["rate"],
                p["duration_s"],
                opt(f(v, "delivered_per_s"), 0),
                lat(v, "p50_us"),
                lat(v, "p99_us"),
                lat(v, "max_us"),
                v["loss"],
                v["publish_errors"],
                opt(f(v, "gateway_cpu_us_per_delivery"), 2),
            );
        }
    }
    std::fs::write(dir.join("report.md"), md)?;
    plot(dir, &runs)?;
    if !scale.is_empty() {
        plot_scale(dir, &scale)?;
    }
    Ok(())
}

/// One `scale-N` run: latency at N connections.
struct ScalePoint {
    clients: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    cpu_us: Option<f64>,
}

fn scale_points(runs: &[(String, Value)]) -> Vec<ScalePoint> {
    let mut points: Vec<ScalePoint> = runs
        .iter()
        .filter(|(stem, _)| stem.starts_with("scale-"))
        .filter_map(|(_, v)| {
            Some(ScalePoint {
                clients: v["params"]["clients"].as_f64()?,
                p50_us: v["latency"]["p50_us"].as_f64()?,
                p99_us: v["latency"]["p99_us"].as_f64()?,
                max_us: v["latency"]["max_us"].as_f64()?,
                cpu_us: v["gateway_cpu_us_per_delivery"].as_f64(),
            })
        })
        .collect();
    points.sort_by(|a, b| a.clients.total_cmp(&b.clients));
    points
}

/// p99 and max latency against the number of connections (issue 13).
fn plot_scale(dir: &Path, points: &[ScalePoint]) -> anyhow::Result<()> {
    let path = dir.join("scale.svg");
    let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xmax = points.iter().map(|p| p.clients).fold(1.0, f64::max) * 1.1;
    let ymax = points.iter().map(|p| p.max_us).fold(1000.0, f64::max) / 1000.0 * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Delivery latency against connections (500 projects, 2,000 ev/s)",
            ("sans-serif", 24),
        )
        .margin(24)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_desc("connections")
        .y_desc("latency (ms)")
        .draw()?;
    type Pick = fn(&ScalePoint) -> f64;
    let lines: [(&str, Pick, RGBColor); 3] = [
        ("p50", |p| p.p50_us, GREEN),
        ("p99", |p| p.p99_us, BLUE),
        ("max", |p| p.max_us, RED),
    ];
    for (name, pick, color) in lines {
        let pts: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.clients, pick(p) / 1000.0))
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            pts.iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
    }
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// x: percentile as "nines" (-log10(1-q)); y: latency in µs, log scale.
fn plot(dir: &Path, runs: &[(String, Value)]) -> anyhow::Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .filter(|(_, v)| matches!(v["scenario"].as_str(), Some("fanout" | "spread")))
        .filter_map(|(stem, v)| {
            let cdf = v.get("latency")?.get("cdf")?.as_array()?;
            let pts: Vec<(f64, f64)> = cdf
                .iter()
                .filter_map(|p| {
                    let q = p.get(0)?.as_f64()?;
                    let us = p.get(1)?.as_f64()?;
                    (q < 0.99995).then(|| (-(1.0 - q).log10(), us.max(1.0)))
                })
                .collect();
            (!pts.is_empty()).then(|| (stem.clone(), pts))
        })
        .collect();
    let path = dir.join("latency.svg");
    let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(10.0f64, f64::max)
        * 1.5;
    let ymin = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(f64::MAX, f64::min)
        .clamp(1.0, 1e9)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Switchboard delivery latency by percentile (publish -> client read)",
            ("sans-serif", 24),
        )
        .margin(24)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..4f64, (ymin.max(1.0)..ymax).log_scale())?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_labels(5)
        .x_label_formatter(&|x| {
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            let decimals = (x.round() - 2.0).max(0.0) as usize;
            format!("{q:.decimals$}%")
        })
        .y_label_formatter(&|y| {
            if *y >= 1000.0 {
                format!("{:.0} ms", y / 1000.0)
            } else {
                format!("{y:.0}")
            }
        })
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        legend(&mut chart)?;
    }
    root.present()?;
    Ok(())
}

/// The series legend of both charts, upper left.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    Ok(())
}
