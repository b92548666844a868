//! A raw `seq` is never trusted (docs/protocol.md §3, issue 12): the reviewer's repro. A
//! legacy worker's `PUBLISH project:p1:events` of an event carrying `"seq": 999` used to be
//! delivered with that seq; the TypeScript client then dropped the next real events (seq
//! 2 and 3), and after a pub/sub reconnect the gateway sent a spurious
//! `connection.resync_required` (`from_seq: 999`). Now the raw event arrives without a
//! seq, the real ones keep theirs, a reconnect replays nothing and resyncs nobody, and a
//! forged publish mark of another epoch is treated like a raw seq.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

/// Non-heartbeat frames until `n` events (frames with a `type` that is not a gateway
/// message) have arrived.
async fn events(c: &mut WsClient, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let v = c.next_json(T).await;
        let ty = v["type"].as_str().unwrap_or("");
        if ty == "system.heartbeat" || ty == "status" {
            continue;
        }
        got.push(v);
    }
    got
}

#[tokio::test]
async fn a_legacy_publishers_seq_moves_nobody() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let token = gw.token("u", &["p1"]);
    let (mut c, est) = gw.connect("p1", &token).await;
    let epoch = est["epoch"].as_str().unwrap().to_owned();
    assert_eq!(gw.publish("p1", &ev(1)).await, [1]);
    assert_eq!(events(&mut c, 1).await[0]["seq"], 1);

    // The legacy worker, and a forger who copies the mark's shape with another epoch.
    let raw = json!({"type": "file.changed", "project_id": "p1", "file_path": "/raw",
        "change_type": "modified", "timestamp": "2026-12-03T10:00:00Z", "seq": 999});
    assert_eq!(
        redis.publish("project:p1:events", &raw.to_string()).await,
        1
    );
    let forged = r#"{"type":"file.changed","project_id":"p1","file_path":"/forged","change_type":"modified","timestamp":"2026-12-03T10:00:00Z","seq":998,"epoch":"not-the-epoch"}"#;
    assert_eq!(redis.publish("project:p1:events", forged).await, 1);
    assert_eq!(gw.publish("p1", &ev(2)).await, [2]);
    assert_eq!(gw.publish("p1", &ev(3)).await, [3]);

    let got = events(&mut c, 4).await;
    assert_eq!(got[0]["file_path"], "/raw");
    assert!(got[0].get("seq").is_none(), "raw seq removed: {}", got[0]);
    assert_eq!(got[1]["file_path"], "/forged");
    assert!(got[1].get("seq").is_none(), "forged mark: {}", got[1]);
    assert!(got[1].get("epoch").is_none(), "{}", got[1]);
    let seqs: Vec<_> = got[2..].iter().map(|e| e["seq"].clone()).collect();
    assert_eq!(
        seqs,
        [json!(2), json!(3)],
        "the real events keep their seqs"
    );
    assert!(
        got[2].get("epoch").is_none(),
        "the publish mark never reaches clients: {}",
        got[2]
    );

    // The gateway's own position did not move: a new client starts at 3, and a pub/sub
    // reconnect replays nothing and resyncs nobody.
    let (_d, est) = gw.connect("p1", &token).await;
    assert_eq!(est["seq"], 3);
    assert_eq!(est["epoch"], epoch.as_str());
    redis.kill_pubsub_clients().await;
    // Resubscribed, and the catch-up done (ready again: the publish API refuses with 503
    // until it is; the subscription alone shows up in Redis a moment earlier).
    assert!(
        eventually(Duration::from_secs(15), || async {
            redis.pubsub_channels("project:p1:events").await.len() == 1
                && gw.get("/readyz").await.status == 200
        })
        .await,
        "never resubscribed\n{}",
        gw.logs()
    );
    assert_eq!(gw.publish("p1", &ev(4)).await, [4]);
    let next = events(&mut c, 1).await;
    assert_eq!(next[0]["seq"], 4, "no resync, no replay: {next:?}");
    assert_eq!(gw.metric("switchboard_resyncs_total").await, Some(0.0));

    // A client resuming from where it really is gets exactly what it missed.
    let mut r = gw
        .ws(
            &format!("/ws/p1?token={token}&last_seq=2&epoch={epoch}"),
            &[],
        )
        .await;
    let est = r.next_of_type("connection.established", T).await;
    assert_eq!(est["resumed"], true, "{est}");
    let replay = events(&mut r, 2).await;
    let seqs: Vec<_> = replay.iter().map(|e| e["seq"].clone()).collect();
    assert_eq!(seqs, [json!(3), json!(4)]);
}
