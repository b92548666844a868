//! `status` snapshots (docs/protocol.md §2, §4, §8): built from the project's node and task events,
//! sent after `connection.established` and on request (text or JSON), the same in Redis and
//! embedded mode, finished tasks aging out, and one per project on `/ws/user`.

use crate::common::*;
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

fn ts(i: u32) -> String {
    format!("2024-05-01T12:00:{i:02}.{:03}Z", i * 7 % 1000)
}

fn with_ts(mut e: Value, i: u32) -> Value {
    e["timestamp"] = json!(ts(i));
    e
}

fn tprog(pct: u64) -> Value {
    json!({"percentage": pct, "current_step": pct / 10, "total_steps": 10, "step_description": format!("step at {pct}")})
}

/// The event sequence and, per node/task, the entry the snapshot must hold afterwards.
fn scenario() -> (Vec<Value>, Value, Value) {
    let step_info = json!({"current": 2, "total": 5, "description": "render"});
    let events = vec![
        // nodes
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n1", "state": "queued"}),
            1,
        ),
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n1", "state": "processing"}),
            2,
        ),
        with_ts(
            json!({"type": "node.progress.updated", "node_id": "n1", "progress": 40, "step": "render", "step_info": step_info}),
            3,
        ),
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n2", "state": "completed"}),
            4,
        ),
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n3", "state": "processing"}),
            5,
        ),
        with_ts(
            json!({"type": "node.progress.updated", "node_id": "n3", "progress": 10, "step": "load", "step_info": {"current": 1, "total": 10, "description": "load"}}),
            6,
        ),
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n4", "state": "idle"}),
            7,
        ),
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n4", "state": "failed"}),
            8,
        ),
        // tasks: t1 queued -> started -> progress (running)
        with_ts(
            json!({"type": "task.queued", "task_id": "t1", "node_id": "n1", "priority": 1}),
            10,
        ),
        with_ts(
            json!({"type": "task.started", "task_id": "t1", "node_id": "n1", "runner_id": "r1"}),
            11,
        ),
        with_ts(
            json!({"type": "task.progress", "task_id": "t1", "node_id": "n1", "progress": tprog(30)}),
            12,
        ),
        with_ts(
            json!({"type": "task.progress", "task_id": "t1", "node_id": "n1", "progress": tprog(50)}),
            13,
        ),
        // t2 started -> failed
        with_ts(
            json!({"type": "task.started", "task_id": "t2", "node_id": "n2", "runner_id": "r2"}),
            14,
        ),
        with_ts(
            json!({"type": "task.failed", "task_id": "t2", "node_id": "n2", "error": "boom", "traceback": null}),
            15,
        ),
        // t3 queued -> cancelled
        with_ts(
            json!({"type": "task.queued", "task_id": "t3", "node_id": "n3", "priority": 2}),
            16,
        ),
        with_ts(
            json!({"type": "task.cancelled", "task_id": "t3", "node_id": "n3"}),
            17,
        ),
        // t4 started -> progress -> success
        with_ts(
            json!({"type": "task.started", "task_id": "t4", "node_id": "n4", "runner_id": "r4"}),
            18,
        ),
        with_ts(
            json!({"type": "task.progress", "task_id": "t4", "node_id": "n4", "progress": tprog(20)}),
            19,
        ),
        with_ts(
            json!({"type": "task.success", "task_id": "t4", "node_id": "n4", "result": {"ok": true}, "execution_time": 1.5}),
            20,
        ),
        // t5 only queued, t6 only started
        with_ts(
            json!({"type": "task.queued", "task_id": "t5", "node_id": "n5", "priority": 0}),
            21,
        ),
        with_ts(
            json!({"type": "task.started", "task_id": "t6", "node_id": "n6", "runner_id": "r6"}),
            22,
        ),
        // unrelated events do not touch the state
        with_ts(json!({"type": "file.changed", "file_path": "/a"}), 23),
        // the latest state wins
        with_ts(
            json!({"type": "node.state.updated", "node_id": "n1", "state": "completed"}),
            24,
        ),
    ];
    let nodes = json!({
        "n1": {"state": "completed", "progress": 40, "step": "render", "updated_at": ts(24)},
        "n2": {"state": "completed", "updated_at": ts(4)},
        "n3": {"state": "processing", "progress": 10, "step": "load", "updated_at": ts(6)},
        "n4": {"state": "failed", "updated_at": ts(8)},
    });
    let tasks = json!({
        "t1": {"status": "running", "progress": tprog(50), "updated_at": ts(13)},
        "t2": {"status": "failed", "updated_at": ts(15)},
        "t3": {"status": "cancelled", "updated_at": ts(17)},
        "t4": {"status": "success", "progress": tprog(20), "updated_at": ts(20)},
        "t5": {"status": "queued", "updated_at": ts(21)},
        "t6": {"status": "started", "updated_at": ts(22)},
    });
    (events, nodes, tasks)
}

/// Task entries are `{status, progress?, updated_at}` (docs/protocol.md §8); a `node_id` naming
/// the task's node is tolerated as an extra and removed before comparing.
fn strip_task_node_ids(tasks: &Value, expect_node: bool) -> Value {
    let mut out = Map::new();
    for (id, entry) in tasks.as_object().expect("tasks is an object") {
        let mut e = entry.as_object().expect("task entry is an object").clone();
        if let Some(n) = e.remove("node_id") {
            if expect_node {
                assert!(n.is_string(), "task {id} node_id: {entry}");
            }
        }
        out.insert(id.clone(), Value::Object(e));
    }
    Value::Object(out)
}

fn check_snapshot(s: &Value, project: &str, nodes: &Value, tasks: &Value) {
    assert_eq!(s["type"], "status", "{s}");
    assert_eq!(s["project_id"], project, "{s}");
    assert!(s["seq"].is_u64(), "{s}");
    assert!(s["epoch"].is_string(), "{s}");
    assert!(
        s["timestamp"].as_str().is_some_and(is_rfc3339_ms_utc),
        "status timestamp: {s}"
    );
    assert_eq!(&s["nodes"], nodes, "nodes of {project}");
    assert_eq!(
        &strip_task_node_ids(&s["tasks"], true),
        tasks,
        "tasks of {project}"
    );
}

/// Publishes the scenario (one event per request, like workers do), then checks the
/// snapshot after connect and on both kinds of request; returns the snapshot.
async fn scenario_snapshot(gw: &Gateway, project: &str) -> Value {
    let (events, nodes, tasks) = scenario();
    for (i, e) in events.iter().enumerate() {
        let s = gw.publish(project, e).await;
        assert_eq!(s, vec![i as u64 + 1], "{e}");
    }
    let n = events.len() as u64;
    let (mut c, est) = gw.connect(project, &gw.token("st", &[project])).await;
    c.skip = vec!["system.heartbeat".into()];
    assert_eq!(est["seq"], n, "{est}");
    // Gateway::connect already read the status after connection.established: ask again
    // with a fresh connection read by hand to check its content.
    drop(c);
    let mut c = gw
        .ws(
            &format!("/ws/{project}?token={}", gw.token("st", &[project])),
            &[],
        )
        .await;
    c.skip = vec!["system.heartbeat".into()];
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    let snap = c.next_json(T).await;
    check_snapshot(&snap, project, &nodes, &tasks);
    assert_eq!(snap["seq"], n, "{snap}");
    assert_eq!(snap["epoch"], est["epoch"], "{snap}");

    // text request
    c.send_text("status").await;
    let s = c.next_json(T).await;
    check_snapshot(&s, project, &nodes, &tasks);
    assert_eq!(s["seq"], n, "{s}");
    // JSON request
    let s = c.call(&json!({"type": "status"})).await;
    check_snapshot(&s, project, &nodes, &tasks);
    assert_eq!(s["seq"], n, "{s}");
    c.expect_silence(Duration::from_millis(200)).await;

    // a live update shows in the next snapshot
    let seq = gw
        .publish(
            project,
            &with_ts(json!({"type": "task.success", "task_id": "t1", "node_id": "n1", "result": {}, "execution_time": 2}), 30),
        )
        .await;
    assert_eq!(seq, vec![n + 1]);
    let e = c.next_json(T).await;
    assert_eq!(e["type"], "task.success", "{e}");
    assert_eq!(
        e["timestamp"],
        ts(30),
        "publisher timestamp passed through: {e}"
    );
    let s = c.call(&json!({"type": "status"})).await;
    assert_eq!(s["seq"], n + 1, "{s}");
    let t1 = strip_task_node_ids(&s["tasks"], true)["t1"].clone();
    assert_eq!(
        t1,
        json!({"status": "success", "progress": tprog(50), "updated_at": ts(30)}),
        "{s}"
    );
    snap
}

#[tokio::test]
async fn status_reflects_the_latest_node_and_task_states_redis() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    scenario_snapshot(&gw, "st-redis").await;
}

#[tokio::test]
async fn status_reflects_the_latest_node_and_task_states_embedded() {
    let gw = GatewayOpts::new().embedded().start();
    scenario_snapshot(&gw, "st-emb").await;
}

#[tokio::test]
async fn redis_and_embedded_give_the_same_snapshot_for_the_same_events() {
    let redis = RedisServer::start();
    let gr = GatewayOpts::new().redis(redis.url()).start();
    let ge = GatewayOpts::new().embedded().start();
    let (mut events, _, _) = scenario();
    // plus events without a timestamp, odd transitions and re-queues
    events.extend([
        json!({"type": "node.progress.updated", "node_id": "n9", "progress": 5, "step": "s", "step_info": {"current": 1, "total": 2, "description": "d"}}),
        json!({"type": "task.progress", "task_id": "t9", "node_id": "n9", "progress": tprog(70)}),
        json!({"type": "task.queued", "task_id": "t9", "node_id": "n9", "priority": 3}),
        json!({"type": "task.failed", "task_id": "t4", "node_id": "n4", "error": "late"}),
        json!({"type": "node.state.updated", "node_id": "n3", "state": "idle", "metadata": {"k": 1}}),
    ]);
    let mut snaps = Vec::new();
    for gw in [&gr, &ge] {
        for e in &events {
            gw.publish("same", e).await;
        }
        let mut c = gw
            .ws(
                &format!("/ws/same?token={}", gw.token("st", &["same"])),
                &[],
            )
            .await;
        c.skip = vec!["system.heartbeat".into()];
        assert_eq!(c.next_json(T).await["type"], "connection.established");
        let s = c.next_json(T).await;
        assert_eq!(s["type"], "status", "{s}");
        assert_eq!(s["seq"], events.len() as u64, "{s}");
        snaps.push(s);
    }
    // gateway-set timestamps differ between the two runs: compare the entries without the
    // updated_at of events published without one, which must still be well-formed
    let norm = |s: &Value| -> (Value, Value) {
        let mut nodes = s["nodes"].clone();
        let mut tasks = s["tasks"].clone();
        for (id, field) in [("n9", &mut nodes), ("t9", &mut tasks)] {
            let at = field[id]["updated_at"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(
                is_rfc3339_ms_utc(&at),
                "{id} updated_at set by the gateway: {s}"
            );
            field[id]["updated_at"] = json!("gateway-time");
        }
        let at = nodes["n3"]["updated_at"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(is_rfc3339_ms_utc(&at), "{s}");
        nodes["n3"]["updated_at"] = json!("gateway-time");
        let at = tasks["t4"]["updated_at"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(is_rfc3339_ms_utc(&at), "{s}");
        tasks["t4"]["updated_at"] = json!("gateway-time");
        (nodes, tasks)
    };
    let (rn, rt) = norm(&snaps[0]);
    let (en, et) = norm(&snaps[1]);
    assert_eq!(rn, en, "nodes: redis {}\nembedded {}", snaps[0], snaps[1]);
    assert_eq!(rt, et, "tasks: redis {}\nembedded {}", snaps[0], snaps[1]);
    // and a few spot checks of the odd transitions
    assert_eq!(rt["t9"]["status"], "queued", "{}", snaps[0]);
    assert_eq!(rt["t4"]["status"], "failed", "{}", snaps[0]);
    assert_eq!(rn["n3"]["state"], "idle", "{}", snaps[0]);
}

async fn terminal_tasks_age_out(gw: &Gateway, project: &str) {
    gw.publish(
        project,
        &json!({"type": "task.started", "task_id": "run", "node_id": "n", "runner_id": "r"}),
    )
    .await;
    gw.publish(
        project,
        &json!({"type": "task.started", "task_id": "done", "node_id": "n", "runner_id": "r"}),
    )
    .await;
    // Before the first task finishes: nothing may age out sooner than the TTL after this.
    let finishing = Instant::now();
    gw.publish(project, &json!({"type": "task.success", "task_id": "done", "node_id": "n", "result": {}, "execution_time": 1}))
        .await;
    gw.publish(
        project,
        &json!({"type": "task.cancelled", "task_id": "gone", "node_id": "n"}),
    )
    .await;
    let mut c = gw.client(project).await;
    c.skip = vec!["system.heartbeat".into()];
    let s = c.call(&json!({"type": "status"})).await;
    assert_eq!(s["type"], "status", "{s}");
    assert_eq!(s["tasks"]["done"]["status"], "success", "{s}");
    assert_eq!(s["tasks"]["gone"]["status"], "cancelled", "{s}");
    assert_eq!(s["tasks"]["run"]["status"], "started", "{s}");
    // Ageing happens when the project's state is next written: publish until the finished
    // tasks are gone (the TTL is 1 s), then look at the status that showed it.
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let s = loop {
        n += 1;
        gw.publish(project, &ev(n)).await;
        let e = c.next_json(T).await;
        assert_eq!(e["type"], "file.changed", "{e}");
        assert_eq!(e["n"], n, "{e}");
        let s = c.call(&json!({"type": "status"})).await;
        assert_eq!(s["type"], "status", "{s}");
        let finished = ["done", "gone"].iter().any(|t| s["tasks"].get(t).is_some());
        if !finished || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tasks = s["tasks"].as_object().unwrap();
    let mut ids: Vec<&String> = tasks.keys().collect();
    ids.sort();
    assert_eq!(
        ids,
        vec!["run"],
        "finished tasks aged out, the running one stays: {s}"
    );
    // (50 ms of slack: the gateway stamps the finish in wall-clock milliseconds.)
    assert!(
        finishing.elapsed() >= Duration::from_millis(950),
        "finished tasks aged out {:?} after finishing, with a 1 s TTL",
        finishing.elapsed()
    );
    assert_eq!(s["tasks"]["run"]["status"], "started", "{s}");
    // a new connection's snapshot agrees
    let mut c2 = gw
        .ws(
            &format!("/ws/{project}?token={}", gw.token("st", &[project])),
            &[],
        )
        .await;
    c2.skip = vec!["system.heartbeat".into()];
    assert_eq!(c2.next_json(T).await["type"], "connection.established");
    let s2 = c2.next_json(T).await;
    assert_eq!(s2["type"], "status", "{s2}");
    assert_eq!(s2["tasks"], s["tasks"], "{s2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_age_out_redis() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("events", "terminal_task_ttl_secs", "1")
        .start();
    terminal_tasks_age_out(&gw, "age-r").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_age_out_embedded() {
    let gw = GatewayOpts::new()
        .embedded()
        .cfg("events", "terminal_task_ttl_secs", "1")
        .start();
    terminal_tasks_age_out(&gw, "age-e").await;
}

#[tokio::test]
async fn user_stream_gets_one_status_per_project() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    gw.publish(
        "ua",
        &with_ts(
            json!({"type": "node.state.updated", "node_id": "na", "state": "processing"}),
            1,
        ),
    )
    .await;
    gw.publish(
        "ub",
        &with_ts(
            json!({"type": "task.queued", "task_id": "tb", "node_id": "nb", "priority": 1}),
            2,
        ),
    )
    .await;
    gw.publish("ub", &ev(2)).await;
    let t = gw.token("multi", &["ua", "ub", "uc"]);
    let mut c = gw.ws(&format!("/ws/user?token={t}"), &[]).await;
    c.skip = vec!["system.heartbeat".into()];
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    assert!(est["projects"].is_array(), "{est}");
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let s = c.next_json(T).await;
        assert_eq!(s["type"], "status", "{s}");
        let p = s["project_id"]
            .as_str()
            .expect("status project_id")
            .to_string();
        assert!(
            seen.insert(p.clone(), s).is_none(),
            "two status frames for {p}"
        );
    }
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        vec!["ua", "ub", "uc"],
        "one status per project"
    );
    assert_eq!(seen["ua"]["seq"], 1);
    assert_eq!(
        seen["ua"]["nodes"],
        json!({"na": {"state": "processing", "updated_at": ts(1)}})
    );
    assert_eq!(seen["ua"]["tasks"], json!({}));
    assert_eq!(seen["ub"]["seq"], 2);
    assert_eq!(seen["ub"]["nodes"], json!({}));
    assert_eq!(
        strip_task_node_ids(&seen["ub"]["tasks"], true),
        json!({"tb": {"status": "queued", "updated_at": ts(2)}})
    );
    assert_eq!(seen["uc"]["seq"], 0);
    assert_eq!(seen["uc"]["nodes"], json!({}));
    assert_eq!(seen["uc"]["tasks"], json!({}));
    // no more status frames; live events follow with their project
    c.expect_silence(Duration::from_millis(300)).await;
    gw.publish("uc", &ev(7)).await;
    let e = c.next_json(T).await;
    assert_eq!(e["type"], "file.changed", "{e}");
    assert_eq!(e["project_id"], "uc", "{e}");
    assert_eq!(e["seq"], 1, "{e}");
}
