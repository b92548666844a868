//! docs/protocol.md §8 (issue 12): an event's `timestamp` is a date-time or the gateway's
//! own. A null or non-string one is replaced; a string that is not a date-time is refused
//! like any invalid field: 422 from the API, dropped (and counted) from raw pub/sub and from
//! the global channel. A date-time string (with or without an offset, as the seed's Python
//! sends it) passes through as given.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const T: Duration = Duration::from_secs(5);

fn stamped_here(e: &Value) -> bool {
    e["timestamp"]
        .as_str()
        .is_some_and(|t| t.starts_with("20") && t.ends_with('Z') && t.len() >= 20)
}

#[tokio::test]
async fn api_refuses_a_non_date_and_replaces_non_strings() {
    let gw = GatewayOpts::new().start();
    let svc = gw.service_token();
    let mut c = gw.client("ts").await;
    let path = "/v1/projects/ts/events";
    let r = gw
        .post_json(
            path,
            Some(&svc),
            &json!({"type": "file.changed", "timestamp": "not-a-date"}),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("timestamp"),
        "names the field: {}",
        r.text()
    );
    for odd in [json!(null), json!(1_700_000_000), json!({"at": 1})] {
        let r = gw
            .post_json(
                path,
                Some(&svc),
                &json!({"type": "file.changed", "timestamp": odd}),
            )
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
        let e = c.next_of_type("file.changed", T).await;
        assert!(stamped_here(&e), "{odd} replaced by the gateway's own: {e}");
    }
    let naive = "2026-12-03T10:00:00.123456";
    let r = gw
        .post_json(
            path,
            Some(&svc),
            &json!({"type": "file.changed", "timestamp": naive}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(c.next_of_type("file.changed", T).await["timestamp"], naive);
}

#[tokio::test]
async fn raw_and_global_messages_follow_the_same_rule() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("tsr").await;
    let ch = "project:tsr:events";
    redis
        .publish(
            ch,
            r#"{"type":"file.changed","timestamp":"not-a-date","n":1}"#,
        )
        .await;
    redis
        .publish(
            ch,
            r#"{"type":"file.changed","timestamp":1700000000,"n":2}"#,
        )
        .await;
    let e = c.next_of_type("file.changed", T).await;
    assert_eq!(e["n"], 2, "the non-date one was dropped: {e}");
    assert!(stamped_here(&e), "{e}");
    redis
        .publish(
            "websocket:broadcast",
            r#"{"type":"container.reconnect","timestamp":"soon"}"#,
        )
        .await;
    redis
        .publish(
            "websocket:broadcast",
            r#"{"type":"container.reconnect","timestamp":null,"k":3}"#,
        )
        .await;
    let e = c.next_of_type("container.reconnect", T).await;
    assert_eq!(e["k"], 3, "the non-date one was dropped: {e}");
    assert!(stamped_here(&e), "{e}");
}
