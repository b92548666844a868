//! HTTP endpoints (issue 2 item 8, docs/protocol.md §6) and Redis records (item 7, §7):
//! health, readiness, ws-url by environment, `ws:connection:*`, `ws:instance:*`.

use crate::common::*;
use serde_json::Value;
use std::time::Duration;

#[tokio::test]
async fn health_counts_connections_not_projects() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .instance("health-inst")
        .start();
    assert_eq!(gw.get("/healthz").await.status, 200);
    assert_eq!(gw.get("/readyz").await.status, 200);
    let h = gw.health().await;
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(h["active_connections"], 0, "{h}");
    assert_eq!(h["projects"], 0, "{h}");
    assert_eq!(h["redis_connected"], true, "{h}");
    assert_eq!(h["broker"], "redis", "{h}");
    assert_eq!(h["instance_id"], "health-inst", "{h}");
    assert!(
        is_rfc3339_ms_utc(h["timestamp"].as_str().unwrap_or("")),
        "{h}"
    );

    let a = gw.client("h1").await;
    let b = gw.client("h1").await;
    let c = gw.client("h2").await;
    let h = gw.health().await;
    assert_eq!(
        h["active_connections"], 3,
        "three connections over two projects: {h}"
    );
    assert_eq!(h["projects"], 2, "{h}");
    a.close().await;
    b.drop_abruptly();
    c.close().await;
    gw.wait_connections(0, Duration::from_secs(3)).await;
    assert_eq!(gw.health().await["projects"], 0);
}

#[tokio::test]
async fn unknown_route_is_404() {
    let gw = GatewayOpts::new().start();
    let r = gw.get("/nope").await;
    assert_eq!(r.status, 404);
}

async fn ws_url(gw: &Gateway, project: &str) -> String {
    let r = gw.get(&format!("/v1/ws-url/{project}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["url"].as_str().expect("url string").to_string()
}

#[tokio::test]
async fn ws_url_by_environment() {
    let gw = GatewayOpts::new()
        .environment("development")
        .env("BACKEND_PORT", "9123")
        .start();
    assert_eq!(ws_url(&gw, "pa").await, "ws://localhost:9123/ws/pa");
    assert_eq!(gw.get("/v1/ws-url/bad$id").await.status, 400);
    drop(gw);

    let gw = GatewayOpts::new()
        .environment("docker")
        .env("BACKEND_HOST", "switchboard-svc")
        .env("BACKEND_PORT", "8088")
        .start();
    assert_eq!(ws_url(&gw, "pb").await, "ws://switchboard-svc:8088/ws/pb");
    drop(gw);

    let gw = GatewayOpts::new()
        .environment("production")
        .env("DOMAIN", "app.example.com")
        .start();
    assert_eq!(ws_url(&gw, "pc").await, "wss://app.example.com/ws/pc");
}

#[tokio::test]
async fn ws_url_backend_port_defaults_to_the_listen_port() {
    let gw = GatewayOpts::new().environment("development").start();
    let url = ws_url(&gw, "pa").await;
    assert_eq!(
        url,
        format!("ws://localhost:{}/ws/pa", gw.addr().port()),
        "BACKEND_PORT defaults to the listen port"
    );
}

/// The record as text, whatever its Redis type (hash or JSON string).
async fn record_text(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<String> {
    let ty: String = redis::cmd("TYPE").arg(key).query_async(con).await.unwrap();
    match ty.as_str() {
        "none" => None,
        "hash" => {
            let m: Vec<(String, String)> = redis::cmd("HGETALL")
                .arg(key)
                .query_async(con)
                .await
                .unwrap();
            Some(format!("{m:?}"))
        }
        "string" => Some(redis::cmd("GET").arg(key).query_async(con).await.unwrap()),
        other => panic!("{key} has unexpected Redis type {other}"),
    }
}

async fn pttl(con: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(con).await.unwrap()
}

async fn gone(redis: &RedisServer, key: &str, within: Duration) -> bool {
    eventually(within, || async {
        let mut con = redis.conn().await;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        n == 0
    })
    .await
}

/// The record is written right after the upgrade (asynchronously): allow 2 s.
async fn present(redis: &RedisServer, key: &str) -> bool {
    eventually(Duration::from_secs(2), || async {
        let mut con = redis.conn().await;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        n == 1
    })
    .await
}

#[tokio::test]
async fn connection_records_live_with_ttl_and_go_on_disconnect() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .instance("rec-inst")
        .heartbeat(1)
        .idle(30)
        .start();
    let mut con = redis.conn().await;
    let t = gw.token("rec-user", &["rec"]);

    let (c, est) = gw.connect("rec", &t).await;
    let key = format!("ws:connection:{}", est["client_id"].as_str().unwrap());
    assert!(present(&redis, &key).await, "{key} missing while connected");
    let text = record_text(&mut con, &key)
        .await
        .unwrap_or_else(|| panic!("{key} missing while connected"));
    for want in ["rec-user", "rec", "rec-inst"] {
        assert!(text.contains(want), "{key} lacks {want}: {text}");
    }
    let ttl0 = pttl(&mut con, &key).await;
    assert!(ttl0 > 0, "{key} has no TTL ({ttl0})");
    // the heartbeat (1 s) refreshes it: PTTL goes up at least once in 3.5 s (without a
    // refresh it only ever goes down)
    let mut samples = vec![ttl0];
    for _ in 0..14 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push(pttl(&mut con, &key).await);
    }
    assert!(
        samples.iter().all(|&t| t > 0),
        "record expired while connected: {samples:?}"
    );
    assert!(
        samples.windows(2).any(|w| w[1] > w[0]),
        "TTL never refreshed by the heartbeat: {samples:?}"
    );

    c.close().await;
    assert!(
        gone(&redis, &key, Duration::from_secs(3)).await,
        "{key} left after a clean close"
    );

    // an abrupt TCP reset removes it too
    let (c, est) = gw.connect("rec", &t).await;
    let key = format!("ws:connection:{}", est["client_id"].as_str().unwrap());
    assert!(present(&redis, &key).await, "{key} missing while connected");
    c.drop_abruptly();
    assert!(
        gone(&redis, &key, Duration::from_secs(3)).await,
        "{key} left after an abrupt disconnect"
    );

    // so does a server-side close (bad input)
    let (mut c, est) = gw.connect("rec", &t).await;
    let key = format!("ws:connection:{}", est["client_id"].as_str().unwrap());
    assert!(present(&redis, &key).await, "{key} missing while connected");
    c.send_binary(b"x").await;
    c.expect_close(1003, T).await;
    assert!(
        gone(&redis, &key, Duration::from_secs(3)).await,
        "{key} left after a server close"
    );
}

#[tokio::test]
async fn instance_registry_key_with_ttl() {
    let redis = RedisServer::start();
    let _gw = GatewayOpts::new()
        .redis(redis.url())
        .instance("registry-inst")
        .start();
    let mut con = redis.conn().await;
    let key = "ws:instance:registry-inst";
    let present = eventually(Duration::from_secs(3), || async {
        let mut con = redis.conn().await;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        n == 1
    })
    .await;
    assert!(present, "{key} missing");
    let ttl = pttl(&mut con, key).await;
    assert!(ttl > 0, "{key} has no TTL ({ttl})");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("ws:instance:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(keys, vec![key.to_string()]);
    let _: Value = Value::Null;
}
