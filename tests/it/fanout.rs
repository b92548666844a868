//! Fan-out over Redis (issue 2 item 5, docs/protocol.md §3, §5, §7): several instances on one
//! Redis, project isolation, ordering, channel lifecycle, raw PUBLISH, broadcast, slow
//! consumers and progress conflation.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn assert_seq_run(events: &[Value], project: &str, first_seq: u64, first_n: u64) {
    for (i, e) in events.iter().enumerate() {
        let i = i as u64;
        assert_eq!(e["project_id"], project, "event {i}: {e}");
        assert_eq!(
            e["seq"],
            first_seq + i,
            "event {i} out of order or with a gap: {e}"
        );
        assert_eq!(e["n"], first_n + i, "event {i}: {e}");
    }
}

#[tokio::test]
async fn two_instances_share_events_and_commands_through_redis() {
    let redis = RedisServer::start();
    let gw1 = GatewayOpts::new()
        .redis(redis.url())
        .instance("inst-one")
        .start();
    let gw2 = GatewayOpts::new()
        .redis(redis.url())
        .instance("inst-two")
        .start();
    let t = gw2.token("multi", &["px"]);
    let (mut c2, est2) = gw2.connect("px", &t).await;
    assert_eq!(est2["instance_id"], "inst-two");
    let (mut c1, est1) = gw1.connect("px", &t).await;
    assert_eq!(est1["instance_id"], "inst-one");
    assert_eq!(est1["epoch"], est2["epoch"], "one Redis, one epoch");

    // event published via instance 1's HTTP API reaches the client of instance 2
    let seq = gw1.publish("px", &ev(1)).await;
    assert_eq!(seq, vec![1]);
    let e = c2.next_json(T).await;
    assert_eq!(e["type"], "file.changed", "{e}");
    assert_eq!(e["seq"], 1, "{e}");
    assert_eq!(e["n"], 1, "{e}");
    assert_eq!(e["project_id"], "px");
    let e = c1.next_json(T).await;
    assert_eq!(e["seq"], 1, "{e}");

    // and the other way round
    assert_eq!(gw2.publish("px", &ev(2)).await, vec![2]);
    assert_eq!(c1.next_json(T).await["seq"], 2);
    assert_eq!(c2.next_json(T).await["seq"], 2);

    // a new client on either instance sees the shared seq
    let (_c3, est3) = gw1.connect("px", &t).await;
    assert_eq!(est3["seq"], 2, "{est3}");

    // a command from a client of instance 2 reaches a Redis subscriber
    let mut sub = redis.subscribe("project:px:commands").await;
    let v = c2
        .call(&json!({"type": "node.execute", "node_id": "n1", "request_id": "from-two"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["delivered_to"], 1, "{v}");
    let m = sub.next_json(T).await;
    assert_eq!(m["type"], "execute_node");
    assert_eq!(m["request_id"], "from-two");
    assert_eq!(m["client_id"], est2["client_id"]);
    assert_eq!(m["project_id"], "px");
}

#[tokio::test]
async fn project_isolation_over_hundreds_of_events() {
    let redis = RedisServer::start();
    let gw1 = GatewayOpts::new().redis(redis.url()).start();
    let gw2 = GatewayOpts::new().redis(redis.url()).start();
    let t = gw1.token("iso", &["iso-a", "iso-b", "iso-c"]);
    let (mut a1, _) = gw1.connect("iso-a", &t).await;
    let (mut b1, _) = gw1.connect("iso-b", &t).await;
    let (mut a2, _) = gw2.connect("iso-a", &t).await;
    let (mut c2, _) = gw2.connect("iso-c", &t).await;

    // 300 events interleaved over two projects, in batches alternating between them and
    // between both instances' APIs; plus raw PUBLISHes interleaved.
    let mut next = [1u64, 1u64];
    for round in 0..15 {
        for (k, project) in ["iso-a", "iso-b"].iter().enumerate() {
            let batch: Vec<Value> = (0..10).map(|i| ev(next[k] + i)).collect();
            let gw = if round % 2 == 0 { &gw1 } else { &gw2 };
            let seqs = gw.publish(project, &Value::Array(batch)).await;
            assert_eq!(seqs, (next[k]..next[k] + 10).collect::<Vec<_>>());
            next[k] += 10;
        }
    }
    for (client, project) in [(&mut a1, "iso-a"), (&mut b1, "iso-b"), (&mut a2, "iso-a")] {
        let got = client.collect(150, Duration::from_secs(20)).await;
        assert_seq_run(&got, project, 1, 1);
        client.expect_silence(Duration::from_millis(300)).await;
    }
    c2.expect_silence(Duration::from_millis(100)).await;

    // raw legacy PUBLISH keeps to its channel too
    for i in 0..50u64 {
        let project = if i % 2 == 0 { "iso-a" } else { "iso-b" };
        redis
            .publish(
                &format!("project:{project}:events"),
                &json!({"type": "file.changed", "raw": i}).to_string(),
            )
            .await;
    }
    for (client, project, parity) in [
        (&mut a1, "iso-a", 0),
        (&mut b1, "iso-b", 1),
        (&mut a2, "iso-a", 0),
    ] {
        let got = client.collect(25, Duration::from_secs(10)).await;
        for (j, e) in got.iter().enumerate() {
            assert_eq!(e["project_id"], project, "{e}");
            assert_eq!(e["raw"], (j as u64) * 2 + parity, "{e}");
        }
        client.expect_silence(Duration::from_millis(200)).await;
    }
    c2.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_arrive_in_order() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("thousand").await;
    let reader = tokio::spawn(async move {
        let got = c.collect(1000, Duration::from_secs(60)).await;
        (c, got)
    });
    for b in 0..10u64 {
        let batch: Vec<Value> = (1..=100).map(|i| ev(b * 100 + i)).collect();
        let seqs = gw.publish("thousand", &Value::Array(batch)).await;
        assert_eq!(seqs, (b * 100 + 1..=b * 100 + 100).collect::<Vec<_>>());
    }
    let (mut c, got) = reader.await.unwrap();
    assert_seq_run(&got, "thousand", 1, 1);

    // and 1000 raw PUBLISHes, pipelined, arrive in order too
    let mut con = redis.conn().await;
    let mut pipe = redis::pipe();
    for i in 1..=1000u64 {
        pipe.cmd("PUBLISH")
            .arg("project:thousand:events")
            .arg(json!({"type": "file.changed", "raw": i}).to_string());
    }
    let _: Vec<i64> = pipe.query_async(&mut con).await.unwrap();
    let got = c.collect(1000, Duration::from_secs(30)).await;
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e["raw"], i as u64 + 1, "{e}");
        assert!(e.get("seq").is_none(), "raw events carry no seq: {e}");
    }
}

#[tokio::test]
async fn project_channel_lifecycle_in_pubsub_channels() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let ch = "project:life:events";
    assert!(redis.pubsub_channels(ch).await.is_empty());
    let has = |want: bool| {
        let redis = &redis;
        async move { redis.pubsub_channels(ch).await.is_empty() != want }
    };
    assert!(
        redis.pubsub_channels("websocket:broadcast").await.len() == 1,
        "each instance subscribes to websocket:broadcast"
    );

    let c1 = gw.client("life").await;
    assert!(
        eventually(Duration::from_secs(1), || has(true)).await,
        "channel subscribed while a client is connected"
    );
    // Asserts the channel stays subscribed for all of `window` (polled): a deliberate
    // stretch, longer than the 1 s unsubscribe linger, in which nothing must happen.
    let stays_subscribed = |window: Duration, why: &'static str| {
        let has = &has;
        async move {
            let end = Instant::now() + window;
            while Instant::now() < end {
                assert!(has(true).await, "{why}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let c2 = gw.client("life").await;
    c1.close().await;
    // c1 has left the project (and its linger begun) once the gateway counts one session.
    gw.wait_connections(1, T).await;
    stays_subscribed(
        Duration::from_millis(2500),
        "channel dropped while a client is still connected",
    )
    .await;

    c2.close().await;
    let left = Instant::now();
    assert!(
        eventually(Duration::from_millis(2500), || has(false)).await,
        "channel still subscribed 2.5 s after the last client left"
    );
    assert!(left.elapsed() <= Duration::from_millis(2500));
    // one subscription per instance, not per client
    let mut cs = Vec::new();
    for _ in 0..5 {
        cs.push(gw.client("life").await);
    }
    let mut con = redis.conn().await;
    let numsub: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(ch)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(
        numsub.1, 1,
        "one Redis subscription per instance per project"
    );

    // an abrupt drop of all of them releases it too
    for c in cs {
        c.drop_abruptly();
    }
    assert!(
        eventually(Duration::from_millis(2500), || has(false)).await,
        "channel kept after abrupt disconnects"
    );

    // leaving and coming back quickly (within the linger) still receives events
    let c = gw.client("life").await;
    c.close().await;
    let mut c = gw.client("life").await;
    // The first one has left once one session is counted; past its linger the rejoin must
    // have kept the channel.
    gw.wait_connections(1, T).await;
    stays_subscribed(
        Duration::from_millis(1500),
        "a rejoin within the linger did not keep the channel",
    )
    .await;
    gw.publish("life", &ev(1)).await;
    assert_eq!(c.next_json(T).await["n"], 1);
}

#[tokio::test]
async fn raw_publish_is_relayed_without_seq_and_bad_messages_are_dropped() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("raw").await;
    let ch = "project:raw:events";
    for bad in [
        "not json at all".to_string(),
        "[1,2,3]".into(),
        "\"file.changed\"".into(),
        r#"{"no":"type"}"#.into(),
        r#"{"type":5}"#.into(),
        json!({"type": "file.changed", "project_id": "someone-else", "bad": true}).to_string(),
    ] {
        redis.publish(ch, &bad).await;
    }
    redis.publish(ch, &json!({"type": "task.started", "task_id": "t1", "node_id": "n1", "runner_id": "r1", "extra": {"k": [1, 2]}}).to_string()).await;
    let e = c.next_json(T).await;
    assert_eq!(
        e["type"], "task.started",
        "bad raw messages must be dropped, not relayed: {e}"
    );
    assert_eq!(e["project_id"], "raw", "project_id filled in: {e}");
    assert!(
        is_rfc3339_ms_utc(e["timestamp"].as_str().unwrap_or("")),
        "timestamp filled in: {e}"
    );
    assert!(e.get("seq").is_none(), "raw events carry no seq: {e}");
    assert_eq!(
        e["extra"],
        json!({"k": [1, 2]}),
        "extra fields pass through: {e}"
    );

    // a publisher's own timestamp and a matching project_id pass through unchanged
    let ts = "2020-01-02T03:04:05.678Z";
    redis
        .publish(
            ch,
            &json!({"type": "file.changed", "project_id": "raw", "timestamp": ts, "n": 2})
                .to_string(),
        )
        .await;
    let e = c.next_json(T).await;
    assert_eq!(e["timestamp"], ts, "{e}");
    assert_eq!(e["n"], 2);
    c.expect_silence(Duration::from_millis(300)).await;

    // the relay survived all of that: HTTP-published events still flow with seq
    assert_eq!(gw.publish("raw", &ev(3)).await, vec![1]);
    let e = c.next_json(T).await;
    assert_eq!(
        (e["n"].as_u64(), e["seq"].as_u64()),
        (Some(3), Some(1)),
        "{e}"
    );
}

#[tokio::test]
async fn broadcast_reaches_every_project_with_its_own_project_id() {
    let redis = RedisServer::start();
    let gw1 = GatewayOpts::new().redis(redis.url()).start();
    let gw2 = GatewayOpts::new().redis(redis.url()).start();
    let mut a = gw1.client("bc-a").await;
    let mut b = gw1.client("bc-b").await;
    let mut c = gw2.client("bc-c").await;

    let r = gw1
        .post_json(
            "/v1/broadcast",
            Some(&gw1.service_token()),
            &json!({"type": "file.changed", "n": 1}),
        )
        .await;
    assert!(
        (200..=202).contains(&r.status),
        "broadcast: {} {}",
        r.status,
        r.text()
    );
    for (cl, p) in [(&mut a, "bc-a"), (&mut b, "bc-b"), (&mut c, "bc-c")] {
        let e = cl.next_json(T).await;
        assert_eq!(e["type"], "file.changed", "{e}");
        assert_eq!(e["n"], 1, "{e}");
        assert_eq!(
            e["project_id"], p,
            "global events carry the receiving connection's project: {e}"
        );
        assert!(
            is_rfc3339_ms_utc(e["timestamp"].as_str().unwrap_or("")),
            "{e}"
        );
    }
    // raw PUBLISH on websocket:broadcast
    redis
        .publish(
            "websocket:broadcast",
            &json!({"type": "file.changed", "n": 2}).to_string(),
        )
        .await;
    for (cl, p) in [(&mut a, "bc-a"), (&mut b, "bc-b"), (&mut c, "bc-c")] {
        let e = cl.next_json(T).await;
        assert_eq!(
            (e["n"].as_u64(), e["project_id"].as_str()),
            (Some(2), Some(p)),
            "{e}"
        );
    }
    // service credential required
    let r = gw1
        .post_json("/v1/broadcast", None, &json!({"type": "file.changed"}))
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = gw1
        .post_json(
            "/v1/broadcast",
            Some(&gw1.token("u", &["*"])),
            &json!({"type": "file.changed"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    a.expect_silence(Duration::from_millis(200)).await;
}

fn big(n: u64, pad: usize) -> Value {
    let mut e = ev(n);
    e["pad"] = json!("x".repeat(pad));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_client_is_closed_4500_and_a_reader_loses_nothing() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("ws", "outbound_queue_messages", "64")
        .cfg("ws", "outbound_queue_bytes", "8388608")
        .cfg("api", "max_body_bytes", "4194304")
        .start();
    let t = gw.token("slow", &["slow"]);
    let mut slow = ws_connect(gw.addr(), &format!("/ws/slow?token={t}"), &[], Some(4096))
        .await
        .expect("slow client");
    assert_eq!(slow.next_json(T).await["type"], "connection.established");
    let (mut fast, _) = gw.connect("slow", &t).await;
    gw.wait_connections(2, T).await;

    // a reader absorbs a burst of one batch (10 x 64 KiB) in its queue; the never-reading
    // client holds at most ~4 MiB of kernel buffers + 8 MiB of queue, far below 30 MiB
    const N: u64 = 480;
    let reader = tokio::spawn(async move {
        let got = fast.collect(N as usize, Duration::from_secs(90)).await;
        (fast, got)
    });
    for b in 0..N / 10 {
        let batch: Vec<Value> = (1..=10).map(|i| big(b * 10 + i, 64 * 1024)).collect();
        gw.publish("slow", &Value::Array(batch)).await;
    }
    let (mut fast, got) = reader.await.unwrap();
    assert_seq_run(&got, "slow", 1, 1);
    fast.assert_alive().await;

    // the server dropped the slow one, not the reader
    gw.wait_connections(1, Duration::from_secs(10)).await;
    // whatever it got is a gap-free prefix, then (if readable) connection.closed 4500 and close 4500
    let (frames, code) = slow.read_to_end(Duration::from_secs(30)).await;
    let events: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "file.changed")
        .collect();
    assert!(
        (events.len() as u64) < N,
        "the slow client cannot have received everything"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"],
            i as u64 + 1,
            "slow client's frames must be a gap-free prefix: {}",
            e["seq"]
        );
    }
    if let Some(code) = code {
        assert_eq!(code, 4500, "slow consumer close code");
    }
    if let Some(closed) = frames.iter().find(|f| f["type"] == "connection.closed") {
        assert_eq!(closed["code"], 4500, "{closed}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_events_are_conflated_for_a_slow_client() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("ws", "outbound_queue_messages", "16")
        .cfg("ws", "outbound_queue_bytes", "2097152")
        .cfg("api", "max_body_bytes", "4194304")
        .start();
    let t = gw.token("conf", &["conf"]);
    let mut slow = ws_connect(gw.addr(), &format!("/ws/conf?token={t}"), &[], Some(4096))
        .await
        .expect("slow client");
    assert_eq!(slow.next_json(T).await["type"], "connection.established");
    const N: u64 = 400;
    for b in 0..N / 20 {
        let batch: Vec<Value> = (1..=20)
            .map(|i| {
                let n = b * 20 + i;
                let mut e = task_progress("t-conf", n * 100 / N);
                e["n"] = json!(n);
                e["pad"] = json!("x".repeat(64 * 1024));
                e
            })
            .collect();
        gw.publish("conf", &Value::Array(batch)).await;
    }
    // the progress of one task never overflows the queue: the client is still connected
    // (a deliberate window for a slow-consumer close that must not come; reading all of
    // them below checks it again)
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.wait_connections(1, T).await;
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while last < N && Instant::now() < deadline {
        let e = slow.next_json(T).await;
        assert_eq!(e["type"], "task.progress", "{}", e["type"]);
        let n = e["n"].as_u64().unwrap();
        assert!(n > last, "progress went backwards: {n} after {last}");
        last = n;
    }
    assert_eq!(last, N, "the newest progress must survive conflation");
    slow.assert_alive().await;
}

/// The seed's global events (`EventBroadcaster.project_created` / `workspace_changed`, sent
/// with `broadcast_all`): every connection gets them, with the seed's fields, and
/// `project.created` keeps the new project's id (its followers do not exist yet). From the
/// API (a grant of ["*"]: it reaches everyone) and from a raw PUBLISH alike; never through a
/// project's publish path.
#[tokio::test]
async fn the_seeds_global_events_reach_every_connection() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut a = gw.client("g-a").await;
    let mut b = gw.client("g-b").await;
    let created =
        json!({"type": "project.created", "project_id": "g-new", "data": {"name": "New"}});
    let r = gw
        .post_json("/v1/broadcast", Some(&gw.service_token()), &created)
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let changed =
        json!({"type": "workspace.changed", "workspace_id": "w1", "changes": {"added": ["a.txt"]}});
    redis
        .publish("websocket:broadcast", &changed.to_string())
        .await;
    for c in [&mut a, &mut b] {
        let e = c.next_json(T).await;
        assert_eq!(e["type"], "project.created", "{e}");
        assert_eq!(e["project_id"], "g-new", "{e}");
        assert_eq!(e["data"], json!({"name": "New"}), "{e}");
        let e = c.next_json(T).await;
        assert_eq!(e["type"], "workspace.changed", "{e}");
        assert_eq!(e["workspace_id"], "w1", "{e}");
        assert_eq!(e["changes"], json!({"added": ["a.txt"]}), "{e}");
    }
    // Reaching everyone needs a grant of everything, whatever project it names.
    let scoped = token(&gw.secret, "svc", &["g-new"], 3600, true);
    let r = gw.post_json("/v1/broadcast", Some(&scoped), &created).await;
    assert_eq!(r.status, 403, "{}", r.text());
    // The seed's fields are checked: workspace.changed without changes is refused.
    let r = gw
        .post_json(
            "/v1/broadcast",
            Some(&gw.service_token()),
            &json!({"type": "workspace.changed", "workspace_id": "w1"}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    // Not a project event: the publish path refuses it.
    let r = gw
        .post_json(
            "/v1/projects/g-a/events",
            Some(&gw.service_token()),
            &created,
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    a.expect_silence(Duration::from_millis(200)).await;
}

/// Issue 13: a global event for more than a thousand connections is offered on the hub's
/// broadcast task in time slices rather than in one loop; against a running gateway every
/// connection still gets each global event once, in publish order, and live project
/// events keep flowing.
#[tokio::test]
async fn global_events_for_over_a_thousand_connections_reach_each_once_in_order() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("server", "handshake_rate_per_sec", "0")
        .start();
    let token = gw.token("many", &["many"]);
    let mut clients = Vec::with_capacity(1100);
    for _ in 0..1100 {
        clients.push(gw.connect("many", &token).await.0);
    }
    for n in 1..=2 {
        let changed = json!({"type": "workspace.changed", "workspace_id": format!("w{n}"),
            "changes": {"added": [format!("f{n}.txt")]}});
        redis
            .publish("websocket:broadcast", &changed.to_string())
            .await;
    }
    assert_eq!(
        gw.publish(
            "many",
            &json!({"type": "file.changed", "file_path": "/a",
            "change_type": "modified"})
        )
        .await,
        [1]
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 3 {
            let text = match c.next_frame(T).await {
                Some(Frame::Text(t)) => t,
                Some(Frame::Ping) | Some(Frame::Pong) => continue,
                other => panic!("client {i}: {other:?} after {got:?}\n{}", gw.logs()),
            };
            let e: Value = serde_json::from_str(&text).unwrap();
            if e["type"] != "system.heartbeat" {
                got.push(e);
            }
        }
        let globals: Vec<&Value> = got
            .iter()
            .filter(|e| e["type"] == "workspace.changed")
            .map(|e| &e["workspace_id"])
            .collect();
        assert_eq!(globals, [&json!("w1"), &json!("w2")], "{got:?}");
        assert!(
            got.iter()
                .any(|e| e["type"] == "file.changed" && e["seq"] == 1),
            "{got:?}"
        );
    }
}
