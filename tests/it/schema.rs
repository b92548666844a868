//! Typed events (docs/protocol.md §3): generated definitions stay in sync with the Rust types, the
//! publish API refuses an invalid event of every family with 422 naming the field, and an
//! invalid event from raw Redis is dropped without stopping the relay.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

#[test]
fn checked_in_typescript_is_what_the_gateway_generates() {
    let (status, out, err) = run_cli(
        {
            let mut c = switchboard_cmd();
            c.args(["schema", "--format", "typescript"]);
            c
        },
        None,
    );
    assert!(status.success(), "{err}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript/src/events.ts");
    let checked_in = std::fs::read_to_string(&path).expect("clients/typescript/src/events.ts");
    assert!(
        checked_in == out,
        "clients/typescript/src/events.ts is stale: regenerate it with\n  cargo run -q -- schema --format typescript > clients/typescript/src/events.ts"
    );
}

#[test]
fn json_schema_output_describes_every_family() {
    let (status, out, err) = run_cli(
        {
            let mut c = switchboard_cmd();
            c.args(["schema", "--format", "json-schema"]);
            c
        },
        None,
    );
    assert!(status.success(), "{err}");
    let doc: Value = serde_json::from_str(&out).expect("valid JSON");
    for name in [
        "NodeStateUpdated",
        "TaskProgress",
        "AgentTaskAssigned",
        "TakeCreated",
        "FileChanged",
        "RunnerHeartbeat",
        "CharacterLoraStatus",
        "ProjectCreated",
        "ConnectionEstablished",
        "Status",
    ] {
        assert!(doc["$defs"][name].is_object(), "{name} missing");
    }
    assert_eq!(
        doc["$defs"]["NodeStateUpdated"]["properties"]["type"]["const"],
        "node.state.updated"
    );
}

/// One invalid event per family, with the field the 422 must name.
fn invalid_events() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"type": "node.state.updated", "node_id": "n1", "state": "sleeping"}),
            "state",
        ),
        (
            json!({"type": "node.progress.updated", "node_id": "n1", "progress": 5, "step": "s"}),
            "step_info",
        ),
        (
            json!({"type": "task.progress", "task_id": "t", "node_id": "n", "progress": {"percentage": "half", "current_step": 1, "total_steps": 2, "step_description": "x"}}),
            "progress.percentage",
        ),
        (
            json!({"type": "task.failed", "task_id": "t", "node_id": "n"}),
            "error",
        ),
        (
            json!({"type": "agent.task.assigned", "agent_type": "Director", "task_id": "t", "task_description": "d"}),
            "agent_type",
        ),
        (
            json!({"type": "take.created", "node_id": "n", "take_info": {"take_id": "k"}}),
            "take_info.take_number",
        ),
        (
            json!({"type": "file.uploaded", "file": {"name": "a", "path": "p", "size": "big", "asset_type": "img"}}),
            "file.size",
        ),
        (
            json!({"type": "runner.heartbeat", "runner_id": "r", "status": {"active_tasks": 1, "available_memory": 2}}),
            "status.cpu_usage",
        ),
        (
            json!({"type": "character.lora.status", "char_id": "c", "status": "done"}),
            "status",
        ),
        (
            json!({"type": "character.created", "character": {"assetId": "a", "name": "n", "description": "d"}}),
            "character.triggerWord",
        ),
        (json!({"type": "made.up.type"}), "type"),
        (
            json!({"type": "connection.established", "client_id": "x"}),
            "type",
        ),
    ]
}

#[tokio::test]
async fn invalid_event_of_each_family_is_refused_with_422_naming_the_field() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let svc = gw.service_token();
    for (event, field) in invalid_events() {
        let r = gw
            .post_json("/v1/projects/p1/events", Some(&svc), &event)
            .await;
        assert_eq!(r.status, 422, "{event} -> {}", r.text());
        let body = r.json();
        assert_eq!(body["error"], "invalid_event", "{body}");
        assert_eq!(body["field"], field, "{event} -> {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(field.rsplit('.').next().unwrap()),
            "{body}"
        );
    }
    // A batch with one invalid event is refused whole; nothing got a seq.
    let batch = json!([
        {"type": "node.state.updated", "node_id": "n1", "state": "idle"},
        {"type": "node.state.updated", "node_id": "n1", "state": "bogus"},
    ]);
    let r = gw
        .post_json("/v1/projects/p1/events", Some(&svc), &batch)
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["index"], 1);
    let mut conn = redis.conn().await;
    let seq: Option<u64> = redis::cmd("HGET")
        .arg("project:p1:seq")
        .arg("seq")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(seq.unwrap_or(0), 0, "refused events must not consume seqs");
}

#[tokio::test]
async fn unknown_types_pass_when_allowed() {
    let gw = GatewayOpts::new()
        .embedded()
        .cfg("events", "allow_unknown_types", "true")
        .start();
    let svc = gw.service_token();
    let r = gw
        .post_json(
            "/v1/projects/p1/events",
            Some(&svc),
            &json!({"type": "custom.thing", "x": 1}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    // Known types are still checked.
    let r = gw
        .post_json(
            "/v1/projects/p1/events",
            Some(&svc),
            &json!({"type": "node.state.updated"}),
        )
        .await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn invalid_raw_redis_events_are_dropped_and_the_relay_continues() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut c = gw.client("p1").await;
    for (event, _) in invalid_events() {
        redis.publish("project:p1:events", &event.to_string()).await;
    }
    redis.publish("project:p1:events", "not json at all").await;
    redis
        .publish("project:p1:events", &json!({"type": "node.state.updated", "node_id": "n9", "state": "completed", "extra": [1, 2]}).to_string())
        .await;
    let got = c.next_json(T).await;
    assert_eq!(
        got["type"], "node.state.updated",
        "the first frame after the invalid ones: {got}"
    );
    assert_eq!(got["node_id"], "n9");
    assert_eq!(got["extra"], json!([1, 2]), "extra fields pass through");
    assert!(got.get("seq").is_none(), "raw events carry no seq");
}
