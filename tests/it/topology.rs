//! Past one Redis (issue 14, docs/protocol.md §11): the gateway on a Sentinel-managed
//! master and on a Redis Cluster, against real servers the tests start themselves
//! (`common/topology.rs`), with faults under load reported as the fault suite does
//! (`common/chaos.rs`): nothing the publisher was told was accepted may be missing.

use crate::common::chaos::*;
use crate::common::topology::*;
use crate::common::*;
use crate::faults::{assert_clients_stayed, ONE_AT_A_TIME};
use serde_json::json;
use std::time::{Duration, Instant};

fn sentinel_opts(set: &SentinelSet, instance: &str) -> GatewayOpts {
    gateway_opts("redis://unused", instance)
        .embedded()
        .env("REDIS_SENTINELS", &set.addrs())
        .env("REDIS_SENTINEL_MASTER", MASTER_NAME)
        .cfg("redis", "publish_wait_replicas", "1")
        .cfg("redis", "publish_wait_timeout_ms", "500")
        .cfg("redis", "command_timeout_ms", "1000")
        .cfg("redis", "pubsub_ping_interval_ms", "500")
        .cfg("redis", "reconnect_max_backoff_ms", "1000")
}

async fn topology_of(gw: &Gateway) -> serde_json::Value {
    gw.get("/health/websocket").await.json()["broker_topology"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_master_is_found_and_served_like_one_redis() {
    let set = SentinelSet::start();
    let gw = sentinel_opts(&set, "gw-s").start();
    let topo = topology_of(&gw).await;
    assert_eq!(topo["mode"], "sentinel", "{topo}");
    assert_eq!(
        topo["master"],
        format!("127.0.0.1:{}", set.master.port()),
        "{topo}"
    );
    let mut c = gw.client("p1").await;
    let seqs = gw
        .publish(
            "p1",
            &json!({"type": "file.changed", "data": {"path": "a"}}),
        )
        .await;
    let ev = c.next_of_type("file.changed", T).await;
    assert_eq!(ev["seq"], seqs[0]);
    // The event is on the replica too: the publish waited for it (publish_wait_replicas 1).
    let mut replica = set.replica.conn().await;
    let len: u64 = redis::cmd("XLEN")
        .arg("project:p1:history")
        .query_async(&mut replica)
        .await
        .unwrap();
    assert_eq!(len, 1, "the acknowledged event is on the replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_load_loses_no_acknowledged_event() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let mut set = SentinelSet::start();
    let a = sentinel_opts(&set, "gw-a").start();
    let b = sentinel_opts(&set, "gw-b").start();
    let projects = scale.project_names("sentinel");
    let fleet = Fleet::start(
        &[a.addr(), b.addr()],
        scale.clients_per_instance,
        &projects,
        &a.secret,
    )
    .await;
    let publisher = Publisher::start(Via::api(&[&a, &b], None), &projects, &scale);
    tokio::time::sleep(scale.warmup).await;

    let old = set.master.port();
    let t_kill = Instant::now();
    set.master.kill();
    // Sentinel: down after 1 s, then the election and the promotion.
    let promoted = eventually(Duration::from_secs(30), || async {
        set.named_master() == Some(set.replica.port())
            && role(set.replica.port()).as_deref() == Some("master")
    })
    .await;
    assert!(
        promoted,
        "the sentinels did not promote the replica in 30 s"
    );
    let t_promoted = Instant::now();
    let want = format!("127.0.0.1:{}", set.replica.port());
    for gw in [&a, &b] {
        let followed = eventually(Duration::from_secs(20), || async {
            topology_of(gw).await["master"] == want && gw.get("/readyz").await.status == 200
        })
        .await;
        assert!(
            followed,
            "{} did not follow the failover to {want}: {}\n{}",
            gw.instance_id,
            topology_of(gw).await,
            gw.logs()
        );
    }
    let t_followed = Instant::now();
    tokio::time::sleep(scale.after).await;

    let log = publisher.stop().await;
    let caught_up = fleet.wait_caught_up(&log, Duration::from_secs(30)).await;
    let clients = fleet.stop().await;
    let mut report = Report::build(
        "Sentinel failover (master killed)",
        clients,
        &["gw-a", "gw-b"],
        &log,
        Some(t_promoted),
        caught_up.is_some(),
    );
    report.note(scale.describe());
    report.note(format!(
        "master :{old} SIGKILLed; replica promoted after {}; both gateways on it {} after the \
         kill; publish_wait_replicas = 1",
        secs_str(t_promoted - t_kill),
        secs_str(t_followed - t_kill),
    ));
    report.print();
    report.assert_no_loss();
    assert_clients_stayed(&report);
}

fn secs_str(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn cluster_opts(cluster: &Cluster, instance: &str) -> GatewayOpts {
    gateway_opts("redis://unused", instance)
        .embedded()
        .env("REDIS_CLUSTER_NODES", &cluster.addrs())
        .cfg("redis", "command_timeout_ms", "2000")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_publish_keeps_each_project_in_one_slot() {
    let cluster = Cluster::start();
    let gw = cluster_opts(&cluster, "gw-c").start();
    assert_eq!(topology_of(&gw).await["mode"], "cluster");
    for project in ["p1", "p2", "p3", "p4"] {
        let seqs = gw
            .publish(
                project,
                &json!({"type": "node.state.updated", "node_id": "n1", "state": "queued"}),
            )
            .await;
        assert_eq!(seqs, vec![1]);
        // Every key of the project is on the master of its hash tag's slot.
        let owner = &cluster.nodes[cluster.master_of(&format!("{{{project}}}"))];
        let mut conn = owner.conn().await;
        for suffix in ["seq", "history", "state"] {
            let key = format!("project:{{{project}}}:{suffix}");
            let n: u64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(n, 1, "{key} on its slot's master");
        }
    }
}
