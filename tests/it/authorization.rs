//! Authorization holds on every path (issue 10, docs/protocol.md §2 and §4): a command is checked
//! against the credential as it is when it is sent, not as it was at connect nor by what
//! the connection follows; `/ws/user` obeys the project-id rule and the subscription cap.
//! Each test attacks a running gateway the way the reviewer's repro did.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn expect_error(c: &mut WsClient, code: &str) -> Value {
    let v = c.next_of_type("error", T).await;
    assert_eq!(v["code"], code, "{v}");
    v
}

/// A worker listening on `project:{p}:commands` must hear nothing.
async fn assert_no_command(worker: &mut Subscriber, what: &str) {
    if let Some(v) = worker.try_next_json(Duration::from_millis(400)).await {
        panic!("{what}: the worker received {v}");
    }
}

#[tokio::test]
async fn a_command_after_unsubscribe_and_refresh_to_another_grant_is_refused() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut worker = redis.subscribe("project:demo:commands").await;
    let (mut c, _) = gw.connect("demo", &gw.token("ann", &["demo"])).await;

    // Still granted and followed: relayed.
    c.send_json(&json!({"type": "node.execute", "node_id": "n0"}))
        .await;
    assert_eq!(
        c.next_of_type("command.accepted", T).await["delivered_to"],
        1
    );
    assert_eq!(worker.next_json(T).await["node_id"], "n0");

    c.send_json(&json!({"type": "unsubscribe", "project_id": "demo"}))
        .await;
    c.next_of_type("unsubscribed", T).await;
    // Unsubscribed from its own project: no command reaches it any more, named or not.
    c.send_json(&json!({"type": "node.execute", "node_id": "n1"}))
        .await;
    expect_error(&mut c, "forbidden").await;
    c.send_json(&json!({"type": "task.cancel", "task_id": "t1", "project_id": "demo"}))
        .await;
    expect_error(&mut c, "forbidden").await;

    // The reviewer's repro: refresh to a token for another project, then command.
    let other = gw.token("ann", &["other"]);
    c.send_json(&json!({"type": "auth.refresh", "token": other}))
        .await;
    c.next_of_type("auth.refreshed", T).await;
    c.send_json(&json!({"type": "node.execute", "node_id": "n2"}))
        .await;
    expect_error(&mut c, "forbidden").await;
    // And it cannot follow demo again with the new grant.
    c.send_json(&json!({"type": "subscribe", "project_id": "demo"}))
        .await;
    expect_error(&mut c, "forbidden").await;
    c.send_json(&json!({"type": "node.execute", "node_id": "n3", "project_id": "demo"}))
        .await;
    expect_error(&mut c, "forbidden").await;
    assert_no_command(&mut worker, "after the grant was gone").await;
}

#[tokio::test]
async fn a_narrowed_session_stops_commands_at_once_without_waiting_for_the_recheck() {
    let redis = RedisServer::start();
    // The periodic recheck is far away: only the per-command check can stop these.
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("auth", "session_recheck_secs", "3600")
        .start();
    redis
        .set_session("s1", &json!({"user_id": "ann", "projects": ["demo"]}))
        .await;
    let mut worker = redis.subscribe("project:demo:commands").await;
    let mut c = gw.ws("/ws/demo?session=s1", &[]).await;
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    c.send_json(&json!({"type": "node.execute", "node_id": "n0"}))
        .await;
    assert_eq!(
        c.next_of_type("command.accepted", T).await["delivered_to"],
        1
    );
    assert_eq!(worker.next_json(T).await["node_id"], "n0");

    // Narrowed while the connection still follows demo: the command closes it (4003).
    redis
        .set_session("s1", &json!({"user_id": "ann", "projects": ["other"]}))
        .await;
    c.send_json(&json!({"type": "node.execute", "node_id": "n1"}))
        .await;
    c.expect_closed_with(4003, T).await;
    assert_no_command(&mut worker, "narrowed session").await;

    // The reviewer's repro: unsubscribe first, then narrow, then command.
    redis
        .set_session("s2", &json!({"user_id": "bob", "projects": ["demo"]}))
        .await;
    let mut d = gw.ws("/ws/demo?session=s2", &[]).await;
    assert_eq!(d.next_json(T).await["type"], "connection.established");
    d.send_json(&json!({"type": "unsubscribe", "project_id": "demo"}))
        .await;
    d.next_of_type("unsubscribed", T).await;
    redis
        .set_session("s2", &json!({"user_id": "bob", "projects": ["other"]}))
        .await;
    // Following again is an action too: checked against the session as it is now (the
    // connection's copy of the grant still says demo).
    d.send_json(&json!({"type": "subscribe", "project_id": "demo"}))
        .await;
    expect_error(&mut d, "forbidden").await;
    d.send_json(&json!({"type": "node.execute", "node_id": "n2", "project_id": "demo"}))
        .await;
    expect_error(&mut d, "forbidden").await;
    d.send_json(&json!({"type": "node.execute", "node_id": "n3"}))
        .await;
    expect_error(&mut d, "forbidden").await;
    assert_no_command(&mut worker, "unsubscribed, then narrowed").await;

    d.send_json(&json!({"type": "subscribe", "project_id": "other"}))
        .await;
    assert_eq!(d.next_of_type("subscribed", T).await["project_id"], "other");

    // Reading the project's state is checked the same way (red-team finding: `status`
    // was served from a narrowed or deleted session until the periodic recheck).
    redis
        .set_session("s4", &json!({"user_id": "di", "projects": ["demo"]}))
        .await;
    let mut f = gw.ws("/ws/demo?session=s4", &[]).await;
    assert_eq!(f.next_json(T).await["type"], "connection.established");
    redis
        .set_session("s4", &json!({"user_id": "di", "projects": ["other"]}))
        .await;
    f.skip.clear();
    f.send_text("status").await;
    let frames = f.expect_closed_with(4003, T).await;
    assert!(
        frames.iter().filter(|v| v["type"] == "status").count() <= 1,
        "only the greeting's status: {frames:?}"
    );

    // Revoked: the next command closes with 4001 and is not sent.
    redis
        .set_session("s3", &json!({"user_id": "cy", "projects": ["demo"]}))
        .await;
    let mut e = gw.ws("/ws/demo?session=s3", &[]).await;
    assert_eq!(e.next_json(T).await["type"], "connection.established");
    let mut con = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg("session:s3")
        .query_async(&mut con)
        .await
        .unwrap();
    e.send_json(&json!({"type": "task.cancel", "task_id": "t"}))
        .await;
    e.expect_closed_with(4001, T).await;
    assert_no_command(&mut worker, "revoked session").await;
}

#[tokio::test]
async fn ws_user_joins_only_valid_project_ids() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let names = [
        "good",
        "a:events",
        "x:commands",
        "../../etc",
        "a b\nX",
        "..",
        ".",
        "user",
        "*",
        "good",
    ];
    let t = gw.token("ann", &names);
    let mut c = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    assert_eq!(est["projects"], json!(["good"]), "{est}");
    // Only project:good:events is subscribed for it.
    let mut joined = Vec::new();
    for _ in 0..50 {
        joined = redis.pubsub_channels("*").await;
        if joined.iter().any(|c| c == "project:good:events") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    joined.retain(|c| c != "websocket:broadcast");
    assert_eq!(joined, vec!["project:good:events".to_owned()]);
    // Commands to the names it could not join are refused and reach no channel.
    let mut bad = redis.subscribe("project:x:commands:commands").await;
    for name in ["x:commands", "../../etc", "a:events"] {
        c.send_json(&json!({"type": "node.execute", "node_id": "n", "project_id": name}))
            .await;
        expect_error(&mut c, "forbidden").await;
    }
    assert_no_command(&mut bad, "invalid project id").await;

    // Nothing valid left: 4003 after the upgrade.
    let t = gw.token("ann", &["a:events", "../x"]);
    let mut d = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    d.expect_closed_with(4003, T).await;
}

#[tokio::test]
async fn ws_user_obeys_the_subscription_cap() {
    let gw = GatewayOpts::new()
        .cfg("ws", "max_subscriptions_per_connection", "5")
        .start();
    let five: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    let five: Vec<&str> = five.iter().map(String::as_str).collect();
    let t = gw.token("ann", &five);
    let mut ok = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    let est = ok.next_json(T).await;
    assert_eq!(est["projects"].as_array().map(Vec::len), Some(5), "{est}");

    let many: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let t = gw.token("ann", &many);
    let mut c = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    let frames = c.expect_closed_with(4003, T).await;
    let notice = frames
        .iter()
        .find(|f| f["type"] == "connection.closed")
        .expect("connection.closed notice");
    assert_eq!(notice["reason"], "too_many_projects", "{notice}");
    assert_eq!(gw.health().await["projects"], 5);
}
