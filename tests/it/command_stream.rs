//! Workers taking commands from the gateway (docs/protocol.md §6, issue 12): `GET
//! /v1/projects/{id}/commands` upgraded to a WebSocket with a service credential carries the
//! project's commands as published, in both broker modes, and `command.accepted`'s
//! `delivered_to` counts these streams. Before, the embedded broker answered
//! `delivered_to: 0` and dropped every command.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

pub(crate) async fn worker(gw: &Gateway, project: &str) -> WsClient {
    let bearer = format!("Bearer {}", gw.service_token());
    gw.ws(
        &format!("/v1/projects/{project}/commands"),
        &[("Authorization", bearer.as_str())],
    )
    .await
}

pub(crate) async fn execute(c: &mut WsClient, node: &str) -> Value {
    c.send_json(&json!({"type": "node.execute", "node_id": node, "request_id": node}))
        .await;
    c.next_of_type("command.accepted", T).await
}

/// Waits until a command reaches `want` receivers (a stream that just opened or closed is
/// counted once its registration landed).
pub(crate) async fn delivered_eventually(
    c: &mut WsClient,
    want: u64,
    worker_frames: &mut [&mut WsClient],
) {
    let mut last = Value::Null;
    for i in 0..50 {
        let node = format!("probe-{i}");
        last = execute(c, &node).await;
        for w in worker_frames.iter_mut() {
            // Drain what this probe sent them.
            while let Some(Frame::Text(_)) = w.next_frame(Duration::from_millis(50)).await {}
        }
        if last["delivered_to"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("delivered_to never reached {want}: {last}");
}

#[tokio::test]
async fn the_embedded_broker_hands_commands_to_command_streams() {
    let gw = GatewayOpts::new().start();
    let mut w1 = worker(&gw, "p1").await;
    let mut w2 = worker(&gw, "p1").await;
    let mut other = worker(&gw, "p2").await;
    let (mut c, _) = gw.connect("p1", &gw.token("ann", &["p1"])).await;
    let accepted = execute(&mut c, "n1").await;
    assert_eq!(accepted["delivered_to"], 2, "{accepted}");
    for w in [&mut w1, &mut w2] {
        let cmd: Value = serde_json::from_str(&w.next_text(T).await).unwrap();
        assert_eq!(
            cmd["type"], "execute_node",
            "the seed's worker format: {cmd}"
        );
        assert_eq!(cmd["node_id"], "n1");
        assert_eq!(cmd["project_id"], "p1");
        assert_eq!(cmd["user_id"], "ann");
        assert_eq!(cmd["request_id"], "n1");
    }
    other.expect_silence(Duration::from_millis(200)).await;
    // Text ping is answered; nothing else ever comes but commands.
    w1.send_text("ping").await;
    assert_eq!(w1.next_text(T).await, "pong");
    // A worker gone: counted out.
    drop(w2);
    delivered_eventually(&mut c, 1, &mut [&mut w1]).await;
    assert_eq!(
        gw.metric("switchboard_connections").await,
        Some(3.0),
        "two streams and the client"
    );
    let text = gw.get("/metrics").await.text();
    assert!(
        text.contains(r#"switchboard_connections{kind="commands"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn across_instances_delivered_to_counts_every_stream_and_raw_subscriber() {
    let redis = RedisServer::start();
    let gw1 = GatewayOpts::new().redis(redis.url()).start();
    let gw2 = GatewayOpts::new().redis(redis.url()).start();
    let mut raw = redis.subscribe("project:p1:commands").await;
    let mut a = worker(&gw2, "p1").await;
    let mut b = worker(&gw2, "p1").await;
    let mut c1 = worker(&gw1, "p1").await;
    let (mut c, _) = gw1.connect("p1", &gw1.token("bo", &["p1"])).await;
    // 1 raw subscriber + 2 streams on gw2 + 1 on gw1.
    delivered_eventually(&mut c, 4, &mut [&mut a, &mut b, &mut c1]).await;
    while raw.try_next_json(Duration::from_millis(50)).await.is_some() {}
    let accepted = execute(&mut c, "real").await;
    assert_eq!(accepted["delivered_to"], 4, "{accepted}");
    let from_redis = raw.next_json(T).await;
    for w in [&mut a, &mut b, &mut c1] {
        let cmd: Value = serde_json::from_str(&w.next_text(T).await).unwrap();
        assert_eq!(cmd, from_redis, "the same command, as published");
    }
    // gw2's streams gone: the count follows.
    drop(a);
    drop(b);
    delivered_eventually(&mut c, 2, &mut [&mut c1]).await;
}

#[tokio::test]
async fn a_command_stream_needs_a_service_credential_for_its_project() {
    let gw = GatewayOpts::new().start();
    let cases = [
        (None, 4001),
        (Some(gw.token("user", &["p1"])), 4003),
        (Some(token(&gw.secret, "svc", &["p2"], 3600, true)), 4003),
    ];
    for (credential, code) in cases {
        let bearer = credential.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("Authorization", b)])
            .unwrap_or_default();
        let mut c = gw.ws("/v1/projects/p1/commands", &headers).await;
        let (texts, close) = close_of(&mut c).await;
        assert!(texts.is_empty(), "close frame only: {texts:?}");
        assert_eq!(close.map(|c| c.0), Some(code), "{bearer:?}");
    }
    // Not an upgrade: said so (with a valid credential), and not routed elsewhere.
    let r = gw
        .get_with(
            "/v1/projects/p1/commands",
            &[("Authorization", &format!("Bearer {}", gw.service_token()))],
        )
        .await;
    assert_eq!(r.status, 426, "{}", r.text());
    let r = gw
        .post(
            "/v1/projects/p1/commands",
            &[("Authorization", &format!("Bearer {}", gw.service_token()))],
            b"{}",
        )
        .await;
    assert_eq!(r.status, 405, "{}", r.text());
}

/// A command-stream handshake costs what a `/ws/` one does: it shares the per-IP handshake
/// quota, so a client without credentials cannot make the gateway upgrade and refuse
/// without limit.
#[tokio::test]
async fn command_stream_handshakes_share_the_per_ip_rate_limit() {
    let gw = GatewayOpts::new()
        .cfg("server", "handshake_rate_per_sec", "1")
        .cfg("server", "handshake_burst", "2")
        .start();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = gw.get("/v1/projects/p1/commands").await;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [401, 401, 429], "the third is over the quota");
}
