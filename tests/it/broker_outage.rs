//! Broker outage (issue 2 item 10, docs/protocol.md §5): Redis killed and restarted under connected
//! clients, and a pub/sub connection killed behind the gateway's back.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn readyz(gw: &Gateway) -> u16 {
    gw.get("/readyz").await.status
}

/// Publishes raw markers until one reaches `c` (the subscription is back), up to `timeout`.
async fn wait_relay(
    redis: &RedisServer,
    c: &mut WsClient,
    project: &str,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    let mut k = 0u64;
    while Instant::now() < deadline {
        k += 1;
        let mut con = match tokio::time::timeout(
            Duration::from_secs(1),
            redis.client().get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(c)) => c,
            _ => continue,
        };
        let marker = json!({"type": "file.changed", "probe": k}).to_string();
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(format!("project:{project}:events"))
            .arg(marker)
            .query_async(&mut con)
            .await;
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            match c.next_frame(Duration::from_millis(100)).await {
                Some(Frame::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["probe"].is_u64() {
                        return true;
                    }
                }
                Some(Frame::Close(c)) => panic!("client closed during the outage: {c:?}"),
                Some(Frame::End(e)) => panic!("client dropped during the outage: {e}"),
                _ => {}
            }
        }
    }
    false
}

/// Reads frames until one has `n == want`, ignoring probes and connection-level frames.
async fn next_with_n(c: &mut WsClient, want: u64) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no event n={want}");
        let v = c.next_json(left).await;
        if v["n"] == want {
            return v;
        }
        assert!(
            v["probe"].is_u64()
                || v["type"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("connection.")),
            "unexpected {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_connected_clients() {
    let mut redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let t = gw.token("out", &["out"]);
    let (mut c, _) = gw.connect("out", &t).await;
    let (mut c2, _) = gw.connect("out", &t).await;
    assert_eq!(readyz(&gw).await, 200);
    let h = gw.health().await;
    assert_eq!(h["redis_connected"], true, "{h}");
    assert_eq!(h["broker"], "redis", "{h}");
    assert_eq!(h["status"], "healthy", "{h}");
    assert_eq!(gw.publish("out", &ev(1)).await, vec![1]);
    assert_eq!(c.next_json(T).await["n"], 1);
    assert_eq!(c2.next_json(T).await["n"], 1);

    redis.kill();
    let down = eventually(Duration::from_secs(10), || async {
        readyz(&gw).await == 503
    })
    .await;
    assert!(
        down,
        "/readyz still 200 10 s after Redis died\n{}",
        gw.logs()
    );
    let h = gw.health().await;
    assert_eq!(h["redis_connected"], false, "{h}");
    assert_eq!(h["status"], "degraded", "{h}");

    // clients stay connected
    c.assert_alive().await;
    c2.assert_alive().await;
    // commands are refused, not lost silently
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n1", "request_id": "during"}))
        .await;
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], "broker_unavailable", "{v}");
    // the publish API is 503
    let r = gw
        .post_json("/v1/projects/out/events", Some(&gw.service_token()), &ev(2))
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    // new upgrades are 503 with Retry-After
    match gw.ws_try(&format!("/ws/out?token={t}"), &[]).await {
        Ok(_) => panic!("upgrade accepted during the broker outage"),
        Err(r) => {
            assert_eq!(r.status, 503, "{r:?}");
            assert!(r.header("retry-after").is_some(), "{r:?}");
        }
    }

    redis.restart();
    let up = eventually(Duration::from_secs(20), || async {
        readyz(&gw).await == 200
    })
    .await;
    assert!(
        up,
        "/readyz not 200 20 s after Redis came back\n{}",
        gw.logs()
    );
    assert_eq!(gw.health().await["redis_connected"], true);

    // the gateway resubscribed the active channel: events flow again to both clients
    assert!(
        wait_relay(&redis, &mut c, "out", Duration::from_secs(10)).await,
        "no live events after the restart\n{}",
        gw.logs()
    );
    let seqs = gw.publish("out", &ev(3)).await;
    assert_eq!(seqs, vec![1], "empty Redis: seq starts again");
    assert_eq!(next_with_n(&mut c, 3).await["seq"], 1);
    assert_eq!(next_with_n(&mut c2, 3).await["seq"], 1);

    // commands reach workers again
    let mut sub = redis.subscribe("project:out:commands").await;
    let v = loop {
        let v = c
            .call(&json!({"type": "node.execute", "node_id": "n1", "request_id": "after"}))
            .await;
        if v["probe"].is_u64() {
            continue;
        }
        break v;
    };
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["delivered_to"], 1, "{v}");
    assert_eq!(sub.next_json(T).await["request_id"], "after");

    // and new clients are welcome
    let (_c3, est) = gw.connect("out", &t).await;
    assert_eq!(est["seq"], 1);
}

#[tokio::test]
async fn killed_pubsub_connection_is_detected_and_resubscribed() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("zombie").await;
    assert!(wait_relay(&redis, &mut c, "zombie", T).await);
    redis.kill_pubsub_clients().await;
    assert!(
        wait_relay(&redis, &mut c, "zombie", Duration::from_secs(15)).await,
        "never resubscribed\n{}",
        gw.logs()
    );
    assert_eq!(
        redis.pubsub_channels("project:zombie:events").await.len(),
        1,
        "channel resubscribed after the pub/sub connection died"
    );
    assert_eq!(
        redis.pubsub_channels("websocket:broadcast").await.len(),
        1,
        "broadcast channel resubscribed"
    );
    c.assert_alive().await;
}

#[tokio::test]
async fn gateway_started_while_redis_is_down_is_not_ready_then_recovers() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    redis.kill();
    let gw = GatewayOpts::new().redis(url).no_wait_ready().start();
    assert_eq!(readyz(&gw).await, 503);
    assert_eq!(
        gw.get("/healthz").await.status,
        200,
        "alive even without a broker"
    );
    redis.restart();
    let up = eventually(Duration::from_secs(20), || async {
        readyz(&gw).await == 200
    })
    .await;
    assert!(up, "never became ready\n{}", gw.logs());
    let mut c = gw.client("late").await;
    assert_eq!(gw.publish("late", &ev(1)).await, vec![1]);
    assert_eq!(c.next_json(T).await["seq"], 1);
}

#[tokio::test]
async fn silently_dead_pubsub_connection_is_detected() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let gw = GatewayOpts::new().redis(proxy.url()).start();
    let mut c = gw.client("silent").await;
    assert!(wait_relay(&redis, &mut c, "silent", T).await);
    // every connection the gateway holds now goes silent: no FIN, no RST, no replies
    proxy.freeze_existing();
    let start = Instant::now();
    assert!(
        wait_relay(&redis, &mut c, "silent", Duration::from_secs(30)).await,
        "live events never resumed after the pub/sub connection went silent\n{}",
        gw.logs()
    );
    eprintln!(
        "silent pub/sub death detected and recovered after {:?}",
        start.elapsed()
    );
    // Probes published while the old connection was dying may still arrive (live events
    // are not lost, only late): let them through before the ping.
    while let Some(Frame::Text(t)) = c.next_frame(Duration::from_millis(700)).await {
        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
        assert!(
            v["probe"].is_u64() || v["type"] == "status",
            "unexpected frame {t}"
        );
    }
    c.assert_alive().await;
}

/// Issue 10 item 4: a session recheck whose MGET times out (Redis frozen with SIGSTOP, so
/// connections stay open and nothing answers) closes nobody as revoked; once Redis answers
/// again the recheck goes on, and a session deleted then still ends its connection (4001).
#[tokio::test]
async fn session_recheck_against_a_frozen_redis_closes_nobody() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("auth", "session_recheck_secs", "1")
        .cfg("redis", "command_timeout_ms", "300")
        .start();
    let mut con = redis.conn().await;
    let record = json!({"user_id": "una", "projects": ["p1"]}).to_string();
    let _: () = redis::cmd("SET")
        .arg("session:s-frozen")
        .arg(&record)
        .query_async(&mut con)
        .await
        .unwrap();
    let mut c = gw.ws("/ws/p1?session=s-frozen", &[]).await;
    assert_eq!(c.next_json(T).await["type"], "connection.established");

    redis.signal("STOP");
    // Several rechecks time out meanwhile.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    c.assert_alive().await;
    assert!(
        gw.logs().contains("session recheck cannot reach Redis"),
        "no recheck ran during the freeze:\n{}",
        gw.logs()
    );
    assert!(!gw.logs().contains("session revoked"), "{}", gw.logs());
    redis.signal("CONT");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.assert_alive().await;

    // The recheck still works: deleting the session now is a logout.
    let mut con = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg("session:s-frozen")
        .query_async(&mut con)
        .await
        .unwrap();
    c.expect_closed_with(4001, Duration::from_secs(10)).await;
}

/// Clients that joined after a project's last event (so no live event has passed since):
/// after Redis comes back empty, `connection.resync_required.from_seq` is where they are
/// (3), not 0; after Redis comes back with its data, nothing they already have is replayed.
#[tokio::test]
async fn an_outage_catches_up_from_where_the_clients_joined() {
    for persistent in [false, true] {
        let mut redis = if persistent {
            RedisServer::start_persistent()
        } else {
            RedisServer::start()
        };
        let gw = GatewayOpts::new().redis(redis.url()).start();
        let project = "joined-late";
        for n in 1..=3 {
            gw.publish(project, &ev(n)).await;
        }
        let t = gw.token("u", &[project]);
        let (mut c, est) = gw.connect(project, &t).await;
        assert_eq!(est["seq"], 3, "{est}");
        redis.restart();
        assert!(
            eventually(Duration::from_secs(20), || async {
                gw.metric("switchboard_broker_reconnects_total")
                    .await
                    .unwrap_or(0.0)
                    >= 1.0
                    && readyz(&gw).await == 200
            })
            .await,
            "{}",
            gw.logs()
        );
        if persistent {
            // Same history: nothing replayed (next_with_n fails on any other event); the
            // next event is the next seq, once.
            let seqs = loop {
                let r = gw
                    .post_json(
                        &format!("/v1/projects/{project}/events"),
                        Some(&gw.service_token()),
                        &ev(4),
                    )
                    .await;
                if r.status == 202 {
                    break r.json()["seq"].clone();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(seqs, json!([4]));
            let next = next_with_n(&mut c, 4).await;
            assert_eq!(next["seq"], 4, "{next}");
            assert_eq!(gw.metric("switchboard_resyncs_total").await, Some(0.0));
        } else {
            let r = c.next_of_type("connection.resync_required", T).await;
            assert_eq!(r["from_seq"], 3, "the clients' position, not 0: {r}");
        }
    }
}
