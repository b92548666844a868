//! What one reader can cost the gateway is bounded in bytes (issue 10 item 8,
//! docs/security.md): `status` is charged by its cost and served from the snapshot cache,
//! a snapshot frame has a size cap, and a resume replays at most `events.replay_max_bytes`
//! (further behind: `connection.resync_required`). Attacked on a running gateway.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn status_on_ws_user_is_charged_per_project_and_cached() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let names: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let t = gw.token("ann", &names);
    let mut c = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    c.skip.clear();
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    for _ in 0..20 {
        assert_eq!(c.next_json(T).await["type"], "status");
    }
    let reads_before = redis.command_calls("hgetall").await;
    // The reviewer's loop: `status` as fast as the socket takes it, for one second.
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(1) {
        c.send_text("status").await;
        sent += 1;
        if sent >= 200 {
            break;
        }
    }
    let mut statuses = 0;
    let mut limited = 0;
    let mut closed = None;
    loop {
        match c.next_frame(Duration::from_millis(700)).await {
            Some(Frame::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("status") => statuses += 1,
                    Some("error") if v["code"] == "rate_limited" => limited += 1,
                    _ => {}
                }
            }
            Some(Frame::Close(code)) => {
                closed = code;
                break;
            }
            Some(Frame::End(_)) | None => break,
            Some(_) => {}
        }
    }
    // Budget: burst 100 + 50/s over ~1 s at 20 tokens per `status` = at most ~8 rounds.
    assert!(
        statuses <= 20 * 9,
        "{statuses} status frames for {sent} requests (uncharged would be {})",
        sent * 20
    );
    assert!(
        limited > 0 || closed.is_some(),
        "never refused: {statuses} statuses"
    );
    if let Some((code, _)) = closed {
        assert_eq!(code, 4029);
    }
    // Served from the cache: nothing was published, so the snapshots are still current.
    let reads = redis.command_calls("hgetall").await - reads_before;
    assert!(
        reads <= 2 * 20,
        "{reads} snapshot reads for {statuses} status frames"
    );
}

#[tokio::test]
async fn a_snapshot_frame_is_capped_and_keeps_the_newest_entries() {
    let gw = GatewayOpts::new()
        .cfg("events", "snapshot_max_bytes", "8192")
        .start();
    let batch: Vec<Value> = (0..400)
        .map(|i| {
            json!({"type": "node.state.updated", "node_id": format!("node-{i:04}"), "state": "processing",
                   "timestamp": format!("2026-12-03T10:{:02}:{:02}.000Z", i / 60, i % 60)})
        })
        .collect();
    gw.publish("big", &json!(batch)).await;
    let mut c = gw
        .ws(&format!("/ws/big?token={}", gw.token("ann", &["big"])), &[])
        .await;
    c.skip.clear();
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    let text = c.next_text(T).await;
    assert!(text.len() <= 8192, "status frame of {} bytes", text.len());
    let status: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["type"], "status");
    assert_eq!(status["truncated"], true, "{status}");
    let nodes = status["nodes"].as_object().unwrap();
    assert!(
        nodes.len() > 10 && nodes.len() < 400,
        "{} nodes",
        nodes.len()
    );
    assert!(nodes.contains_key("node-0399"), "the newest entry is kept");
    assert!(!nodes.contains_key("node-0000"), "the oldest goes first");
    // The text `status` request gets the same bound.
    c.send_text("status").await;
    let again = c.next_text(T).await;
    assert!(again.len() <= 8192, "{} bytes", again.len());
}

/// A gateway on a private Redis whose replay budget is 64 KiB (events up to 8 KiB).
fn small_replay_budget(redis: &RedisServer) -> Gateway {
    GatewayOpts::new()
        .redis(redis.url())
        .cfg("events", "max_event_bytes", "8192")
        .cfg("events", "replay_max_bytes", "65536")
        .start()
}

/// Events `ev(from..from + n)`, each padded with `pad_bytes` bytes.
fn padded(from: u64, n: u64, pad_bytes: usize) -> Value {
    let pad = "x".repeat(pad_bytes);
    json!((from..from + n)
        .map(|i| {
            let mut e = ev(i);
            e["pad"] = json!(pad);
            e
        })
        .collect::<Vec<_>>())
}

#[tokio::test]
async fn a_resume_replays_at_most_replay_max_bytes() {
    let redis = RedisServer::start();
    let gw = small_replay_budget(&redis);
    let seqs = gw.publish("r", &padded(1, 300, 1000)).await;
    assert_eq!(seqs.len(), 300);
    let t = gw.token("ann", &["r"]);
    // ~1.1 KB each: 300 events are ~330 KB, over the 64 KiB replay budget.
    let mut far = gw.ws(&format!("/ws/r?token={t}&last_seq=0"), &[]).await;
    let est = far.next_json(T).await;
    assert_eq!(est["type"], "connection.established");
    let r = far.next_json(T).await;
    assert_eq!(r["type"], "connection.resync_required", "{r}");
    assert_eq!(r["from_seq"], 0);

    // 40 events behind (~45 KB) is within it: replayed exactly.
    let mut near = gw.ws(&format!("/ws/r?token={t}&last_seq=260"), &[]).await;
    let est = near.next_json(T).await;
    assert_eq!(est["resumed"], true, "{est}");
    let got: Vec<u64> = near
        .collect(40, T)
        .await
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (261..=300).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_resume_from_zero_does_not_load_the_whole_history() {
    let redis = RedisServer::start();
    let gw = small_replay_budget(&redis);
    // 5,000 events of ~4 KB: a 20 MB history, the reviewer's repro at half size.
    for chunk in 0..25u64 {
        gw.publish("h", &padded(chunk * 200, 200, 4000)).await;
    }
    let pid = gw.pid();
    let baseline = rss_kib(pid);
    let (stop, sampler) = rss_sampler(pid);
    let t = gw.token("ann", &["h"]);
    let mut c = gw.ws(&format!("/ws/h?token={t}&last_seq=0"), &[]).await;
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    let r = c.next_json(T).await;
    assert_eq!(r["type"], "connection.resync_required", "{r}");
    // A client just behind is still replayed from the newest part that was read.
    let mut near = gw.ws(&format!("/ws/h?token={t}&last_seq=4990"), &[]).await;
    assert_eq!(near.next_json(T).await["resumed"], true);
    let got: Vec<u64> = near
        .collect(10, T)
        .await
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (4991..=5000).collect::<Vec<_>>());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    let grew_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("RSS {baseline} KiB -> peak {peak} KiB (+{grew_mib} MiB)");
    // Reading the 20 MB history whole costs the gateway 40+ MB; the budget is 64 KiB.
    assert!(
        grew_mib < 12,
        "a resume from 0 grew the gateway by {grew_mib} MiB"
    );
}
