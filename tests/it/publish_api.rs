//! The publish path (issue 2 item 6, docs/protocol.md §3, §6, §8): `POST /v1/projects/{id}/events`,
//! seq/epoch assigned with the history append, all-or-nothing batches, refusals, and the
//! embedded broker end to end.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn events_path(p: &str) -> String {
    format!("/v1/projects/{p}/events")
}

async fn hget(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    field: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(con)
        .await
        .unwrap()
}

async fn xlen(con: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(con).await.unwrap()
}

fn assert_error_body(r: &HttpResponse) {
    let v = r.json();
    assert!(
        v["error"].is_string() && v["message"].is_string(),
        "error body {}: {v}",
        r.status
    );
}

#[tokio::test]
async fn publish_assigns_seq_with_history_and_epoch_in_redis() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let (mut c, est) = gw.connect("pub", &gw.token("u", &["pub"])).await;
    assert_eq!(est["seq"], 0);

    let r = gw
        .post_json(&events_path("pub"), Some(&gw.service_token()), &ev(1))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"seq": [1]}),
        "single event reply is still an array"
    );
    assert_eq!(gw.publish("pub", &ev(2)).await, vec![2]);
    assert_eq!(
        gw.publish("pub", &json!([ev(3), ev(4), ev(5)])).await,
        vec![3, 4, 5]
    );

    let got = c.collect(5, T).await;
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{e}");
        assert_eq!(e["n"], i as u64 + 1, "{e}");
        assert_eq!(e["project_id"], "pub");
        assert_eq!(e["type"], "file.changed");
        assert_eq!(
            e["change_type"], "modified",
            "publisher fields pass through: {e}"
        );
        assert!(
            is_rfc3339_ms_utc(e["timestamp"].as_str().unwrap_or("")),
            "{e}"
        );
    }

    let mut con = redis.conn().await;
    assert_eq!(
        hget(&mut con, "project:pub:seq", "seq").await.as_deref(),
        Some("5")
    );
    let epoch = hget(&mut con, "project:pub:seq", "epoch")
        .await
        .expect("epoch field");
    assert!(!epoch.is_empty());
    assert_eq!(
        epoch,
        est["epoch"].as_str().unwrap(),
        "connection.established epoch is the stored one"
    );
    assert_eq!(
        xlen(&mut con, "project:pub:history").await,
        5,
        "each published event is in the history stream"
    );
    let entries: Value = {
        let v: redis::Value = redis::cmd("XRANGE")
            .arg("project:pub:history")
            .arg("-")
            .arg("+")
            .query_async(&mut con)
            .await
            .unwrap();
        json!(format!("{v:?}"))
    };
    assert!(
        entries.as_str().unwrap().contains("file.changed"),
        "history holds the events: {entries}"
    );

    let (_c2, est2) = gw.connect("pub", &gw.token("u", &["pub"])).await;
    assert_eq!(est2["seq"], 5, "{est2}");
    assert_eq!(est2["epoch"], est["epoch"]);

    // projects have independent seqs
    assert_eq!(gw.publish("pub-other", &ev(1)).await, vec![1]);
}

#[tokio::test]
async fn a_batch_is_all_or_nothing() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("aon").await;
    assert_eq!(gw.publish("aon", &ev(1)).await, vec![1]);
    assert_eq!(c.next_json(T).await["seq"], 1);

    let bad_batches = [
        json!([ev(2), {"no": "type"}, ev(3)]),
        json!([ev(2), {"type": 7}]),
        json!([ev(2), "not an object"]),
        json!([ev(2), {"type": "file.changed", "project_id": "someone-else"}]),
    ];
    for batch in bad_batches {
        let r = gw
            .post_json(&events_path("aon"), Some(&gw.service_token()), &batch)
            .await;
        assert!(
            r.status == 422 || r.status == 400,
            "invalid batch {batch}: {} {}",
            r.status,
            r.text()
        );
        assert_error_body(&r);
    }
    let mut con = redis.conn().await;
    assert_eq!(
        hget(&mut con, "project:aon:seq", "seq").await.as_deref(),
        Some("1"),
        "a refused batch must not take seqs"
    );
    assert_eq!(
        xlen(&mut con, "project:aon:history").await,
        1,
        "a refused batch must not reach the history"
    );
    assert_eq!(gw.publish("aon", &ev(9)).await, vec![2]);
    let e = c.next_json(T).await;
    assert_eq!(
        (e["n"].as_u64(), e["seq"].as_u64()),
        (Some(9), Some(2)),
        "nothing of a refused batch was delivered: {e}"
    );
}

#[tokio::test]
async fn invalid_events_are_422_naming_the_problem_and_bad_json_400() {
    let gw = GatewayOpts::new().start();
    let svc = gw.service_token();
    let auth = format!("Bearer {svc}");
    let h = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];

    let r = gw.post(&events_path("val"), &h, b"{not json").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_error_body(&r);

    let r = gw
        .post_json(&events_path("val"), Some(&svc), &json!({"no": "type"}))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("type"),
        "422 names the field: {}",
        r.text()
    );

    // routing is by URL: a different project_id inside the event is refused
    let r = gw
        .post_json(
            &events_path("val"),
            Some(&svc),
            &json!({"type": "file.changed", "project_id": "other"}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("project_id"), "{}", r.text());
    // a matching one is fine
    let r = gw
        .post_json(
            &events_path("val"),
            Some(&svc),
            &json!({"type": "file.changed", "project_id": "val"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());

    let r = gw
        .post_json(&events_path("bad$id"), Some(&svc), &ev(1))
        .await;
    assert_eq!(r.status, 400, "bad project id: {}", r.text());
}

#[tokio::test]
async fn publish_needs_a_service_credential_for_the_project() {
    let gw = GatewayOpts::new().start();
    let p = events_path("auth");
    let r = gw.post_json(&p, None, &ev(1)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_error_body(&r);
    let r = gw.post_json(&p, Some("garbage"), &ev(1)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let wrong = token(
        "another-secret-another-secret-another",
        "w",
        &["*"],
        600,
        true,
    );
    let r = gw.post_json(&p, Some(&wrong), &ev(1)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let expired = token(SECRET, "w", &["*"], -10, true);
    let r = gw.post_json(&p, Some(&expired), &ev(1)).await;
    assert_eq!(r.status, 401, "{}", r.text());

    // a browser (non-service) credential, even one granting the project
    let r = gw
        .post_json(&p, Some(&gw.token("u", &["auth"])), &ev(1))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_error_body(&r);
    // a service credential for other projects
    let r = gw
        .post_json(&p, Some(&token(SECRET, "w", &["other"], 600, true)), &ev(1))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // a service credential for this project
    let r = gw
        .post_json(&p, Some(&token(SECRET, "w", &["auth"], 600, true)), &ev(1))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json(), json!({"seq": [1]}));
}

#[tokio::test]
async fn oversize_body_or_event_is_413() {
    let gw = GatewayOpts::new()
        .cfg("api", "max_body_bytes", "4096")
        .cfg("events", "max_event_bytes", "1024")
        .start();
    let svc = gw.service_token();
    let mut c = gw.client("big").await;
    let with_pad = |n: u64, pad: usize| {
        let mut e = ev(n);
        e["pad"] = json!("x".repeat(pad));
        e
    };
    // one event over max_event_bytes
    let r = gw
        .post_json(&events_path("big"), Some(&svc), &with_pad(1, 2000))
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    // a batch of small events whose body is over max_body_bytes
    let batch: Vec<Value> = (0..8).map(|i| with_pad(i, 700)).collect();
    let r = gw
        .post_json(&events_path("big"), Some(&svc), &Value::Array(batch))
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    // under both limits
    assert_eq!(
        gw.publish("big", &with_pad(5, 500)).await,
        vec![1],
        "nothing oversize took a seq"
    );
    assert_eq!(c.next_json(T).await["n"], 5);
}

#[tokio::test]
async fn default_body_limit_is_one_mebibyte() {
    let gw = GatewayOpts::new().start();
    let svc = gw.service_token();
    let batch: Vec<Value> = (0..6)
        .map(|i| {
            let mut e = ev(i);
            e["pad"] = json!("x".repeat(200 * 1024));
            e
        })
        .collect();
    let r = gw
        .post_json(&events_path("big"), Some(&svc), &Value::Array(batch))
        .await;
    assert_eq!(r.status, 413, "1.2 MiB body: {}", r.status);
    let mut e = ev(1);
    e["pad"] = json!("x".repeat(300 * 1024));
    let r = gw.post_json(&events_path("big"), Some(&svc), &e).await;
    assert_eq!(
        r.status, 413,
        "300 KiB event over the 256 KiB default: {}",
        r.status
    );
}

#[tokio::test]
async fn publisher_timestamp_is_kept_and_missing_one_is_set() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("ts").await;
    let mut e = ev(1);
    e["timestamp"] = json!("2021-06-07T08:09:10.111Z");
    gw.publish("ts", &json!([e, ev(2)])).await;
    let a = c.next_json(T).await;
    assert_eq!(a["timestamp"], "2021-06-07T08:09:10.111Z", "{a}");
    let b = c.next_json(T).await;
    assert!(
        is_rfc3339_ms_utc(b["timestamp"].as_str().unwrap_or("")),
        "{b}"
    );
}

#[tokio::test]
async fn a_flushed_redis_gives_a_new_epoch_and_seq_restarts() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    assert_eq!(gw.publish("ep", &json!([ev(1), ev(2)])).await, vec![1, 2]);
    let mut con = redis.conn().await;
    let e1 = hget(&mut con, "project:ep:seq", "epoch")
        .await
        .expect("epoch");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    assert_eq!(
        gw.publish("ep", &ev(3)).await,
        vec![1],
        "seq starts again after a flush"
    );
    let e2 = hget(&mut con, "project:ep:seq", "epoch")
        .await
        .expect("epoch after flush");
    assert_ne!(e1, e2, "a new seq run needs a new epoch");
    let (_c, est) = gw.connect("ep", &gw.token("u", &["ep"])).await;
    assert_eq!(est["seq"], 1);
    assert_eq!(est["epoch"], e2.as_str());
}

#[tokio::test]
async fn embedded_mode_end_to_end() {
    let gw = GatewayOpts::new().embedded().instance("solo").start();
    let h = gw.health().await;
    assert_eq!(h["broker"], "memory", "{h}");
    assert_eq!(h["redis_connected"], false, "{h}");
    assert_eq!(gw.get("/readyz").await.status, 200);

    let t = gw.token("emb", &["emb"]);
    let (mut c, est) = gw.connect("emb", &t).await;
    assert_eq!(est["seq"], 0);
    let epoch = est["epoch"]
        .as_str()
        .expect("embedded broker has an epoch too")
        .to_string();
    assert!(!epoch.is_empty());
    let (mut other, _) = gw.connect("emb-2", &gw.token("emb", &["emb-2"])).await;

    assert_eq!(gw.publish("emb", &ev(1)).await, vec![1]);
    assert_eq!(gw.publish("emb", &json!([ev(2), ev(3)])).await, vec![2, 3]);
    let got = c.collect(3, T).await;
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "{e}");
        assert_eq!(e["project_id"], "emb");
    }
    other.expect_silence(Duration::from_millis(200)).await;
    let (_c2, est2) = gw.connect("emb", &t).await;
    assert_eq!(est2["seq"], 3);
    assert_eq!(est2["epoch"], epoch.as_str());

    // commands are accepted (nobody listens in-process)
    let v = c
        .call(&json!({"type": "node.execute", "node_id": "n1", "request_id": "e1"}))
        .await;
    assert_eq!(v["type"], "command.accepted", "{v}");
    assert_eq!(v["request_id"], "e1");
    assert!(v["delivered_to"].is_u64(), "{v}");
}
