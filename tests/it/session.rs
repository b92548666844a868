//! One WebSocket session (docs/protocol.md §2, §4, §5): pings, every bad input of §4, rate limit,
//! subscribe/unsubscribe, `/ws/user`, commands, heartbeat, idle drop, expiry, `auth.refresh`.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn expect_error(c: &mut WsClient, code: &str) -> Value {
    let v = c.next_json(T).await;
    assert_eq!(v["type"], "error", "expected error {code}, got {v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without message: {v}"
    );
    v
}

#[tokio::test]
async fn text_ping_and_json_ping() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("p1").await;
    c.send_text("ping").await;
    assert_eq!(
        c.next_text(T).await,
        "pong",
        "text ping answers the text pong"
    );
    let v = c.call(&json!({"type": "ping"})).await;
    assert_eq!(v["type"], "pong", "{v}");
    assert_eq!(v["project_id"], "p1", "{v}");
    assert!(
        is_rfc3339_ms_utc(v["timestamp"].as_str().unwrap_or("")),
        "{v}"
    );
}

#[tokio::test]
async fn each_bad_input_gets_its_error_and_the_connection_stays() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("p1").await;

    c.send_text("{not json").await;
    expect_error(&mut c, "invalid_json").await;
    c.send_text("hello").await;
    expect_error(&mut c, "invalid_json").await;

    for not_obj in [
        "[1,2,3]",
        "42",
        "\"type\"",
        "null",
        "{}",
        r#"{"kind":"ping"}"#,
        r#"{"type":5}"#,
        r#"{"type":null}"#,
    ] {
        c.send_text(not_obj).await;
        let e = expect_error(&mut c, "invalid_message").await;
        assert!(e.is_object(), "{not_obj}");
        c.assert_alive().await; // keeps the invalid-in-a-row count low
    }

    c.send_json(&json!({"type": "does.not.exist"})).await;
    expect_error(&mut c, "unknown_type").await;

    // missing or wrong fields: invalid_message naming the field
    let cases = [
        (json!({"type": "node.execute"}), "node_id"),
        (json!({"type": "node.execute", "node_id": 5}), "node_id"),
        (
            json!({"type": "node.execute", "node_id": "n1", "parameters": "x"}),
            "parameters",
        ),
        (json!({"type": "task.cancel"}), "task_id"),
        (json!({"type": "task.cancel", "task_id": ["t"]}), "task_id"),
        (json!({"type": "subscribe"}), "project_id"),
        (
            json!({"type": "unsubscribe", "project_id": 7}),
            "project_id",
        ),
        (json!({"type": "auth.refresh"}), "token"),
    ];
    for (msg, field) in cases {
        c.send_json(&msg).await;
        let e = expect_error(&mut c, "invalid_message").await;
        assert!(
            e["message"].as_str().unwrap().contains(field),
            "{msg} -> error must name `{field}`: {e}"
        );
        c.assert_alive().await; // also resets the invalid-in-a-row counter
    }
    c.assert_alive().await;
}

#[tokio::test]
async fn ten_invalid_in_a_row_close_1008_and_a_valid_message_resets_the_count() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("p1").await;
    for _ in 0..9 {
        c.send_text("nope").await;
        expect_error(&mut c, "invalid_json").await;
    }
    c.assert_alive().await;
    for _ in 0..9 {
        c.send_json(&json!({"type": "nope.nope"})).await;
        expect_error(&mut c, "unknown_type").await;
    }
    c.assert_alive().await;

    let mut c = gw.client("p1").await;
    for _ in 0..10 {
        c.send_text_lossy("nope").await;
    }
    let frames = c.expect_close(1008, T).await;
    let errors = frames.iter().filter(|f| f["type"] == "error").count();
    assert!(
        errors >= 9,
        "each invalid message before the close is answered: {frames:?}"
    );
}

#[tokio::test]
async fn binary_frame_closes_1003() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("p1").await;
    c.send_binary(b"\x00\x01binary").await;
    c.expect_close(1003, T).await;
    // the relay for everyone else goes on
    let mut other = gw.client("p1").await;
    other.assert_alive().await;
}

#[tokio::test]
async fn oversize_frame_closes_1009() {
    let gw = GatewayOpts::new()
        .cfg("ws", "max_message_bytes", "1024")
        .start();
    let mut c = gw.client("p1").await;
    // just under the limit is fine
    let ok = json!({"type": "ping", "pad": "x".repeat(900)}).to_string();
    assert!(ok.len() < 1024);
    c.send_text(&ok).await;
    assert_eq!(c.next_json(T).await["type"], "pong");
    c.send_text_lossy(&json!({"type": "ping", "pad": "x".repeat(4000)}).to_string())
        .await;
    c.expect_close(1009, T).await;
}

#[tokio::test]
async fn default_max_message_is_64k() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("p1").await;
    c.send_text(&json!({"type": "ping", "pad": "x".repeat(60_000)}).to_string())
        .await;
    assert_eq!(c.next_json(T).await["type"], "pong");
    c.send_text_lossy(&json!({"type": "ping", "pad": "x".repeat(70_000)}).to_string())
        .await;
    c.expect_close(1009, T).await;
}

#[tokio::test]
async fn message_rate_limit_then_4029() {
    let gw = GatewayOpts::new()
        .cfg("ws", "client_messages_per_sec", "1")
        .cfg("ws", "client_messages_burst", "3")
        .cfg("ws", "rate_limit_close_after", "5")
        .start();
    let mut c = gw.client("p1").await;
    for _ in 0..3 {
        c.send_json(&json!({"type": "ping"})).await;
    }
    for _ in 0..3 {
        assert_eq!(c.next_json(T).await["type"], "pong");
    }
    c.send_json(&json!({"type": "ping"})).await;
    expect_error(&mut c, "rate_limited").await;
    for _ in 0..20 {
        c.send_text_lossy(r#"{"type":"ping"}"#).await;
    }
    let frames = c.expect_close(4029, T).await;
    assert!(
        frames.iter().any(|f| f["code"] == "rate_limited"),
        "{frames:?}"
    );
    // another connection from the same IP is unaffected
    let mut other = gw.client("p1").await;
    other.assert_alive().await;
}

#[tokio::test]
async fn subscribe_unsubscribe_and_forbidden() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("sam", &["pa", "pb"]);
    let (mut c, _) = gw.connect("pa", &t).await;

    let v = c
        .call(&json!({"type": "subscribe", "project_id": "pb"}))
        .await;
    assert_eq!(v["type"], "subscribed", "{v}");
    assert_eq!(v["project_id"], "pb", "{v}");
    gw.publish("pb", &ev(1)).await;
    let e = c.next_json(T).await;
    assert_eq!(
        (e["project_id"].as_str(), e["n"].as_u64()),
        (Some("pb"), Some(1)),
        "{e}"
    );
    gw.publish("pa", &ev(2)).await;
    let e = c.next_json(T).await;
    assert_eq!(
        (e["project_id"].as_str(), e["n"].as_u64()),
        (Some("pa"), Some(2)),
        "{e}"
    );

    let v = c
        .call(&json!({"type": "unsubscribe", "project_id": "pb"}))
        .await;
    assert_eq!(v["type"], "unsubscribed", "{v}");
    assert_eq!(v["project_id"], "pb", "{v}");
    gw.publish("pb", &ev(3)).await;
    gw.publish("pa", &ev(4)).await;
    let e = c.next_json(T).await;
    assert_eq!(
        (e["project_id"].as_str(), e["n"].as_u64()),
        (Some("pa"), Some(4)),
        "no event of pb after unsubscribe: {e}"
    );

    let v = c
        .call(&json!({"type": "subscribe", "project_id": "pc"}))
        .await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "forbidden", "{v}");
    gw.publish("pc", &ev(5)).await;
    gw.publish("pa", &ev(6)).await;
    let e = c.next_json(T).await;
    assert_eq!(e["n"], 6, "forbidden project's events must not arrive: {e}");
    c.assert_alive().await;
}

#[tokio::test]
async fn ws_user_streams_every_granted_project() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("uma", &["ua", "ub"]);
    let mut c = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    let mut projects: Vec<String> = est["projects"]
        .as_array()
        .expect("projects array")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    projects.sort();
    assert_eq!(projects, ["ua", "ub"]);
    assert!(
        est.get("project_id").is_none(),
        "/ws/user frames carry projects instead of project_id: {est}"
    );
    assert_eq!(est["user_id"], "uma");

    gw.publish("ua", &ev(1)).await;
    gw.publish("uc", &ev(2)).await;
    gw.publish("ub", &ev(3)).await;
    let a = c.next_json(T).await;
    let b = c.next_json(T).await;
    assert_eq!(
        (a["project_id"].as_str(), a["n"].as_u64()),
        (Some("ua"), Some(1)),
        "{a}"
    );
    assert_eq!(
        (b["project_id"].as_str(), b["n"].as_u64()),
        (Some("ub"), Some(3)),
        "{b}"
    );

    let p = c.call(&json!({"type": "ping"})).await;
    assert_eq!(p["type"], "pong");
    assert!(
        p["projects"].is_array(),
        "pong on /ws/user carries projects: {p}"
    );
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn commands_are_relayed_to_redis_with_accepted_and_delivered_to() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let t = gw.token("cmd-user", &["pcmd"]);
    let (mut c, est) = gw.connect("pcmd", &t).await;
    let client_id = est["client_id"].clone();

    // nobody listening yet
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n0", "request_id": "r0"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["delivered_to"], 0, "{v}");

    let mut sub = redis.subscribe("project:pcmd:commands").await;
    let mut sub2 = redis.subscribe("project:pcmd:commands").await;
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n1", "parameters": {"seed": 7}, "request_id": "req-1"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["command"], "node.execute", "{v}");
    assert_eq!(v["request_id"], "req-1", "{v}");
    assert_eq!(v["delivered_to"], 2, "{v}");
    for s in [&mut sub, &mut sub2] {
        let m = s.next_json(T).await;
        assert_eq!(m["type"], "execute_node", "{m}");
        assert_eq!(m["node_id"], "n1");
        assert_eq!(m["parameters"], json!({"seed": 7}));
        assert_eq!(m["client_id"], client_id);
        assert_eq!(m["user_id"], "cmd-user");
        assert_eq!(m["project_id"], "pcmd");
        assert_eq!(m["request_id"], "req-1");
        assert!(
            is_rfc3339_ms_utc(m["timestamp"].as_str().unwrap_or("")),
            "{m}"
        );
    }
    drop(sub2);

    // defaults: parameters {} and a generated request_id
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n2"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    let rid = v["request_id"]
        .as_str()
        .expect("generated request_id")
        .to_string();
    assert!(!rid.is_empty());
    let m = sub.next_json(T).await;
    assert_eq!(m["parameters"], json!({}), "{m}");
    assert_eq!(m["request_id"], rid.as_str(), "{m}");

    let v = c
        .call(&json!({"type": "task.cancel", "task_id": "t9", "request_id": "req-2"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["command"], "task.cancel", "{v}");
    assert_eq!(v["request_id"], "req-2");
    assert!(v["delivered_to"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let m = sub.next_json(T).await;
    assert_eq!(m["type"], "cancel_task", "{m}");
    assert_eq!(m["task_id"], "t9");
    assert_eq!(m["client_id"], client_id);
    assert_eq!(m["user_id"], "cmd-user");
    assert_eq!(m["project_id"], "pcmd");
    assert_eq!(m["request_id"], "req-2");
}

#[tokio::test]
async fn heartbeat_sends_system_heartbeat_and_websocket_ping() {
    let gw = GatewayOpts::new().heartbeat(1).idle(10).start();
    let t = gw.token("hb", &["p1"]);
    let (mut c, est) = gw.connect("p1", &t).await;
    assert_eq!(est["heartbeat_interval"], 1);
    c.skip.clear();
    let (mut beats, mut pings) = (0, 0);
    // a 1 s interval gives at least 3 of each in any 3.5 s window (2 s would give at most 2)
    let deadline = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < deadline {
        match c
            .next_frame(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Some(Frame::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "system.heartbeat" {
                    assert_eq!(v["project_id"], "p1", "{v}");
                    assert!(
                        is_rfc3339_ms_utc(v["timestamp"].as_str().unwrap_or("")),
                        "{v}"
                    );
                    beats += 1;
                }
            }
            Some(Frame::Ping) => pings += 1,
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    assert!(
        beats >= 3,
        "{beats} system.heartbeat in 3.5 s at a 1 s interval"
    );
    assert!(
        pings >= 3,
        "{pings} WebSocket pings in 3.5 s at a 1 s interval"
    );
}

#[tokio::test]
async fn idle_connection_is_dropped_and_pongs_keep_it_alive() {
    let gw = GatewayOpts::new().heartbeat(1).idle(3).start();
    let t = gw.token("idle", &["p1"]);
    let (mut silent, _) = gw.connect("p1", &t).await;
    let (mut live, _) = gw.connect("p1", &t).await;
    // `live` keeps reading: tungstenite answers each ping with a pong, which counts
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(5500) {
        match live.next_frame(Duration::from_millis(200)).await {
            Some(Frame::Text(t)) if t.contains("connection.closed") => {
                panic!(
                    "a client answering every ping was dropped as idle after {:?}: {t}",
                    start.elapsed()
                )
            }
            Some(f @ (Frame::Close(_) | Frame::End(_))) => panic!("live client closed: {f:?}"),
            _ => {}
        }
    }
    gw.wait_connections(1, Duration::from_secs(3)).await;
    live.assert_alive().await;
    // `silent` never read nor answered: the server dropped it
    let _ = silent.read_to_end(Duration::from_secs(3)).await;
}

#[tokio::test]
async fn credential_expiry_closes_4004() {
    let gw = GatewayOpts::new().start();
    let t = token(SECRET, "exp", &["p1"], 2, false);
    let (mut c, _) = gw.connect("p1", &t).await;
    let start = Instant::now();
    c.expect_closed_with(4004, Duration::from_secs(6)).await;
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "closed too early: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn auth_refresh_extends_the_session() {
    let gw = GatewayOpts::new().start();
    let t = token(SECRET, "ref", &["p1"], 2, false);
    let (mut c, _) = gw.connect("p1", &t).await;
    let exp = now_secs() + 120;
    let fresh = token_claims(
        SECRET,
        &json!({"sub": "ref", "exp": exp, "projects": ["p1", "p2"]}),
    );
    let v = c
        .call(&json!({"type": "auth.refresh", "token": fresh}))
        .await;
    assert_eq!(v["type"], "auth.refreshed", "{v}");
    assert_eq!(v["expires_at"], exp, "{v}");
    c.expect_silence(Duration::from_millis(3500)).await;
    c.assert_alive().await;
}

/// The shared timer looks at a connection at the deadlines it knew (issue 13: no walk over
/// every connection each second); a refresh to a credential that expires sooner must still
/// close it at that time, not at the old expiry.
#[tokio::test]
async fn auth_refresh_to_a_sooner_expiry_closes_4004_then() {
    let gw = GatewayOpts::new().start();
    let t = token(SECRET, "soon", &["p1"], 600, false);
    let (mut c, _) = gw.connect("p1", &t).await;
    // After the timer's first look at the connection (a second after it registered), which
    // scheduled it by the 600 s credential.
    c.expect_silence(Duration::from_millis(2100)).await;
    let exp = now_secs() + 2;
    let sooner = token_claims(
        SECRET,
        &json!({"sub": "soon", "exp": exp, "projects": ["p1"]}),
    );
    let v = c
        .call(&json!({"type": "auth.refresh", "token": sooner}))
        .await;
    assert_eq!(v["type"], "auth.refreshed", "{v}");
    let start = Instant::now();
    c.expect_closed_with(4004, Duration::from_secs(5)).await;
    assert!(
        start.elapsed() >= Duration::from_millis(500),
        "closed too early: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn auth_refresh_with_a_bad_token_closes_4001() {
    let gw = GatewayOpts::new().start();
    let (mut c, _) = gw.connect("p1", &gw.token("ref", &["p1"])).await;
    let bad = token(
        "wrong-secret-wrong-secret-wrong-secret",
        "ref",
        &["p1"],
        600,
        false,
    );
    c.send_json(&json!({"type": "auth.refresh", "token": bad}))
        .await;
    c.expect_close(4001, T).await;

    let (mut c, _) = gw.connect("p1", &gw.token("ref", &["p1"])).await;
    let expired = token(SECRET, "ref", &["p1"], -10, false);
    c.send_json(&json!({"type": "auth.refresh", "token": expired}))
        .await;
    c.expect_close(4001, T).await;
}

#[tokio::test]
async fn auth_refresh_not_granting_the_project_closes_4003() {
    let gw = GatewayOpts::new().start();
    let (mut c, _) = gw.connect("p1", &gw.token("ref", &["p1"])).await;
    let other = gw.token("ref", &["p2"]);
    c.send_json(&json!({"type": "auth.refresh", "token": other}))
        .await;
    c.expect_close(4003, T).await;

    // a refresh must cover subscribed projects too
    let (mut c, _) = gw.connect("p1", &gw.token("ref", &["p1", "p2"])).await;
    let v = c
        .call(&json!({"type": "subscribe", "project_id": "p2"}))
        .await;
    assert_eq!(v["type"], "subscribed", "{v}");
    c.send_json(&json!({"type": "auth.refresh", "token": gw.token("ref", &["p1"])}))
        .await;
    c.expect_close(4003, T).await;
}
