//! Presence (docs/protocol.md §6) across instances, from the connection records, and /metrics.

use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn client_ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("no clients array: {v}"))
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn presence_spans_instances_and_forgets_dead_ones() {
    let redis = RedisServer::start();
    let a = GatewayOpts::new()
        .redis(redis.url())
        .instance("gw-a")
        .heartbeat(1)
        .cfg("redis", "connection_ttl_secs", "2")
        .start();
    let mut b = GatewayOpts::new()
        .redis(redis.url())
        .instance("gw-b")
        .heartbeat(1)
        .cfg("redis", "connection_ttl_secs", "2")
        .start();
    let (ca, ea) = a.connect("team", &a.token("ann", &["team"])).await;
    let (_cb, eb) = b.connect("team", &b.token("bob", &["team"])).await;
    let (_other, _) = a
        .connect("elsewhere", &a.token("cid", &["elsewhere"]))
        .await;
    let svc = a.service_token();

    let want = {
        let mut v = vec![
            ea["client_id"].as_str().unwrap().to_owned(),
            eb["client_id"].as_str().unwrap().to_owned(),
        ];
        v.sort();
        v
    };
    let ok = eventually(Duration::from_secs(5), || async {
        let r = a
            .get_with(
                "/v1/projects/team/presence",
                &[("authorization", &format!("Bearer {svc}"))],
            )
            .await;
        r.status == 200 && client_ids(&r.json()) == want
    })
    .await;
    assert!(ok, "presence should list both instances' clients");
    let r = a
        .get_with(
            "/v1/projects/team/presence",
            &[("authorization", &format!("Bearer {svc}"))],
        )
        .await;
    let body = r.json();
    assert_eq!(body["project_id"], "team");
    for c in body["clients"].as_array().unwrap() {
        assert!(
            c["user_id"].is_string() && c["connected_at"].is_string(),
            "{c}"
        );
        assert!(
            c["instance_id"] == "gw-a" || c["instance_id"] == "gw-b",
            "{c}"
        );
    }

    // A clean disconnect leaves at once.
    ca.close().await;
    let only_b = vec![eb["client_id"].as_str().unwrap().to_owned()];
    let ok = eventually(Duration::from_secs(5), || async {
        let r = a
            .get_with(
                "/v1/projects/team/presence",
                &[("authorization", &format!("Bearer {svc}"))],
            )
            .await;
        client_ids(&r.json()) == only_b
    })
    .await;
    assert!(ok, "a closed client must leave presence");

    // An instance that dies without cleaning up drops out when its records expire.
    b.kill();
    let ok = eventually(Duration::from_secs(8), || async {
        let r = a
            .get_with(
                "/v1/projects/team/presence",
                &[("authorization", &format!("Bearer {svc}"))],
            )
            .await;
        client_ids(&r.json()).is_empty()
    })
    .await;
    assert!(ok, "a dead instance's clients must expire from presence");
}

#[tokio::test]
async fn presence_needs_a_service_credential_and_works_embedded() {
    let gw = GatewayOpts::new().embedded().start();
    let (_c, est) = gw.connect("p1", &gw.token("u", &["p1"])).await;
    let user = gw.token("u", &["p1"]);
    let r = gw.get("/v1/projects/p1/presence").await;
    assert_eq!(r.status, 401);
    let r = gw
        .get_with(
            "/v1/projects/p1/presence",
            &[("authorization", &format!("Bearer {user}"))],
        )
        .await;
    assert_eq!(r.status, 403);
    let svc = gw.service_token();
    let r = gw
        .get_with(
            "/v1/projects/p1/presence",
            &[("authorization", &format!("Bearer {svc}"))],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        client_ids(&r.json()),
        vec![est["client_id"].as_str().unwrap().to_owned()]
    );
}

#[tokio::test]
async fn metrics_count_what_happens() {
    let gw = GatewayOpts::new().embedded().start();
    let (_c, _) = gw.connect("p1", &gw.token("u", &["p1"])).await;
    gw.publish(
        "p1",
        &serde_json::json!({"type": "file.changed", "file_path": "a"}),
    )
    .await;
    let svc = gw.service_token();
    let bad = gw
        .post_json(
            "/v1/projects/p1/events",
            Some(&svc),
            &serde_json::json!({"type": "node.state.updated"}),
        )
        .await;
    assert_eq!(bad.status, 422);
    let m = gw.get("/metrics").await;
    assert_eq!(m.status, 200);
    let text = m.text();
    for line in [
        "switchboard_connections{kind=\"project\"} 1",
        "switchboard_connections{kind=\"story\"} 0",
        "switchboard_handshakes_total{result=\"accepted\",kind=\"project\"} 1",
        "switchboard_broker_up 1",
        "switchboard_events_received_total{source=\"api\"} 1",
        "switchboard_events_rejected_total{reason=\"invalid_field\"} 1",
        "switchboard_history_reads_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains("switchboard_messages_delivered_total "));
    assert!(text.contains("switchboard_slow_consumer_closes_total 0"));
}
