//! The seed's settings that used to be ignored (docs/protocol.md §1, issue 12): each is
//! honoured, against running gateways and a private Redis. `REDIS_CHANNEL` names the global
//! channel, `WS_CONNECTION_TIMEOUT` bounds a connection's life (closed 1001, clients
//! reconnect), and `CONTAINER_RESTART=true` broadcasts `container.reconnect` at start to
//! every connection of every instance.

use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn redis_channel_names_the_global_channel() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .env("REDIS_CHANNEL", "app:global")
        .start();
    let mut c = gw.client("sc").await;
    redis
        .publish(
            "websocket:broadcast",
            r#"{"type":"container.reconnect","n":1}"#,
        )
        .await;
    redis
        .publish("app:global", r#"{"type":"container.reconnect","n":2}"#)
        .await;
    let e = c.next_of_type("container.reconnect", T).await;
    assert_eq!(e["n"], 2, "only the configured channel is global: {e}");
    assert_eq!(
        redis.pubsub_channels("websocket:*").await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn ws_connection_timeout_bounds_a_connections_life() {
    let gw = GatewayOpts::new().env("WS_CONNECTION_TIMEOUT", "2").start();
    let mut c = gw.client("life").await;
    let started = std::time::Instant::now();
    c.expect_closed_with(1001, Duration::from_secs(6)).await;
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1500),
        "closed after {lived:?}, before its 2 s"
    );
}

#[tokio::test]
async fn container_restart_tells_every_instance_to_reconnect() {
    let redis = RedisServer::start();
    let a = GatewayOpts::new().redis(redis.url()).start();
    let mut c = a.client("cr").await;
    let _b = GatewayOpts::new()
        .redis(redis.url())
        .env("CONTAINER_RESTART", "true")
        .start();
    let e = c.next_of_type("container.reconnect", T).await;
    assert_eq!(e["message"], "Server restarted, please reconnect", "{e}");
    assert_eq!(e["project_id"], "cr", "{e}");
}
