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
    published_and_received(&gw, &mut c).await;
    // The event is on the replica too: the publish waited for it (publish_wait_replicas 1).
    let mut replica = set.replica.conn().await;
    let len: u64 = redis::cmd("XLEN")
        .arg("project:p1:history")
        .query_async(&mut replica)
        .await
        .unwrap();
    assert_eq!(len, 1, "the acknowledged event is on the replica");
    // So is an acknowledged story progress (stored: it waits for the replica too).
    let progress = json!({"story_id": "s1", "status": "generating", "progress_percent": 10,
        "current_step": "one", "updated_at": "2026-12-04T10:00:00Z"});
    assert_eq!(gw.post_progress("s1", &progress).await.status, 202);
    let stored: Option<String> = redis::cmd("GET")
        .arg("story:s1:progress")
        .query_async(&mut replica)
        .await
        .unwrap();
    assert!(
        stored.is_some(),
        "the acknowledged progress is on the replica"
    );

    // A planned failover (SENTINEL FAILOVER): the old master stays up, demoted to a
    // replica (it would answer READONLY); the gateway follows the new one, the client stays.
    let mut sentinel = redis::Client::open(format!("redis://127.0.0.1:{}/", set.sentinels[0].port))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER_NAME)
        .query_async(&mut sentinel)
        .await
        .unwrap();
    let want = format!("127.0.0.1:{}", set.replica.port());
    let followed = eventually(Duration::from_secs(20), || async {
        topology_of(&gw).await["master"] == want && gw.get("/readyz").await.status == 200
    })
    .await;
    assert!(
        followed,
        "did not follow: {}\n{}",
        topology_of(&gw).await,
        gw.logs()
    );
    assert_eq!(
        gw.metric("switchboard_redis_master_changes_total").await,
        Some(1.0),
        "one failover followed"
    );
    // The new master needs its replica back before a publish can be confirmed.
    let synced = eventually(Duration::from_secs(20), || async {
        role(set.master.port()).as_deref() == Some("slave")
    })
    .await;
    assert!(synced, "the old master did not become a replica");
    let mut last = None;
    for _ in 0..40 {
        let r = gw
            .post_json(
                "/v1/projects/p1/events",
                Some(&gw.service_token()),
                &json!({"type": "file.changed", "data": {"path": "b"}}),
            )
            .await;
        if r.status == 202 {
            last = Some(r.json());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let accepted =
        last.unwrap_or_else(|| panic!("no publish accepted after the failover\n{}", gw.logs()));
    let ev = c.next_of_type("file.changed", T).await;
    assert_eq!(ev["seq"], 2, "{ev} after {accepted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_load_loses_no_acknowledged_event() {
    let report = sentinel_failover(1).await;
    report.assert_no_loss();
    assert_clients_stayed(&report);
}

/// The same failover with `publish_wait_replicas = 0`: what it can lose is measured and
/// reported (docs/operations.md "Failover"); what a client is never shown is a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_without_wait_reports_what_it_loses() {
    let report = sentinel_failover(0).await;
    assert_clients_stayed(&report);
    for home in 0..2 {
        for (l, _) in report.clients_of(home) {
            assert_eq!(l.gaps, 0, "a gap shown to a client: {:?}", l.anomalies);
        }
    }
}

/// A replica that fell behind (its replication link frozen for a second, while the master
/// and the link look healthy), then the master killed: with `publish_wait_replicas = 0`
/// what the master acknowledged meanwhile is gone (measured, docs/operations.md); with 1
/// those publishes were refused instead and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_after_a_lagging_replica_loses_only_without_wait() {
    let with_wait = sentinel_failover_with(1, true).await;
    with_wait.assert_no_loss();
    assert_clients_stayed(&with_wait);
    let without = sentinel_failover_with(0, true).await;
    assert_clients_stayed(&without);
    assert!(
        without
            .notes
            .iter()
            .any(|n| n.contains("acknowledged but not in the new master")),
        "the loss was measured"
    );
    // Whatever is lost, a client is told: it resyncs rather than seeing a silent gap.
    for home in 0..2 {
        for (l, _) in without.clients_of(home) {
            assert_eq!(l.gaps, 0, "a gap shown to a client: {:?}", l.anomalies);
        }
    }
}

async fn sentinel_failover(wait_replicas: u32) -> Report {
    sentinel_failover_with(wait_replicas, false).await
}

async fn sentinel_failover_with(wait_replicas: u32, lagging: bool) -> Report {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let mut set = if lagging {
        SentinelSet::start_partitionable()
    } else {
        SentinelSet::start()
    };
    let opts = |name: &str| {
        sentinel_opts(&set, name).cfg("redis", "publish_wait_replicas", &wait_replicas.to_string())
    };
    let (a, b) = (opts("gw-a").start(), opts("gw-b").start());
    let load = Load::start(&a, &b, &scale, "sentinel").await;
    let projects = load.projects.clone();

    let old = set.master.port();
    let lag = Duration::from_secs(1);
    if let Some(link) = &set.link {
        link.freeze_existing();
        tokio::time::sleep(lag).await;
    }
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

    let log = load.publisher.stop().await;
    // What an acknowledgement was worth: acknowledged events (by marker) that the new
    // master's history does not hold.
    let mut kept = std::collections::HashSet::new();
    let mut conn = set.replica.conn().await;
    for project in &projects {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(format!("project:{project}:history"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        for (_, fields) in entries {
            for (_, event) in fields {
                let v: serde_json::Value = serde_json::from_str(&event).unwrap_or_default();
                if let Some(n) = v["n"].as_u64() {
                    kept.insert(n);
                }
            }
        }
    }
    let acked_lost = log.accepted.iter().filter(|a| !kept.contains(&a.n)).count();
    let mut report = load
        .fleet
        .report(
            "Sentinel failover (master killed)",
            &log,
            t_promoted,
            &scale,
        )
        .await;
    report.note(format!(
        "{}master :{old} SIGKILLed; replica promoted after {}; both gateways on it {} after the \
         kill; publish_wait_replicas = {wait_replicas}",
        if lagging {
            format!("replication frozen for {} first; ", secs_str(lag))
        } else {
            String::new()
        },
        secs_str(t_promoted - t_kill),
        secs_str(t_followed - t_kill),
    ));
    report.note(format!(
        "{acked_lost} of {} acknowledged events acknowledged but not in the new master's history",
        log.accepted.len()
    ));
    report.print();
    if wait_replicas > 0 {
        assert_eq!(
            acked_lost, 0,
            "acknowledged events lost with publish_wait_replicas > 0"
        );
    }
    report
}

/// Two gateways, a fleet of clients homed on both, and the paced API publisher, warmed up
/// (the fault suite's load, `common/chaos.rs`).
struct Load {
    projects: Vec<String>,
    fleet: Fleet,
    publisher: Publisher,
}

impl Load {
    async fn start(a: &Gateway, b: &Gateway, scale: &Scale, prefix: &str) -> Load {
        let projects = scale.project_names(prefix);
        let fleet = Fleet::start(
            &[a.addr(), b.addr()],
            scale.clients_per_instance,
            &projects,
            &a.secret,
        )
        .await;
        let publisher = Publisher::start(Via::api(&[a, b], None), &projects, scale);
        tokio::time::sleep(scale.warmup).await;
        Load {
            projects,
            fleet,
            publisher,
        }
    }
}

trait FleetReport {
    /// Waits for the clients to catch up with what was accepted, stops them and builds the
    /// loss report (recovery measured from `fault`).
    async fn report(self, title: &str, log: &PubLog, fault: Instant, scale: &Scale) -> Report;
}

impl FleetReport for Fleet {
    async fn report(self, title: &str, log: &PubLog, fault: Instant, scale: &Scale) -> Report {
        let caught_up = self.wait_caught_up(log, Duration::from_secs(30)).await;
        let clients = self.stop().await;
        let mut report = Report::build(
            title,
            clients,
            &["gw-a", "gw-b"],
            log,
            Some(fault),
            caught_up.is_some(),
        );
        report.note(scale.describe());
        report
    }
}

/// One event published through `gw`'s API reaches `c` (a client of p1) with its seq.
async fn published_and_received(gw: &Gateway, c: &mut WsClient) {
    let seqs = gw
        .publish(
            "p1",
            &json!({"type": "file.changed", "data": {"path": "a"}}),
        )
        .await;
    let ev = c.next_of_type("file.changed", T).await;
    assert_eq!(ev["seq"], seqs[0], "{ev}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_serves_everything_one_redis_does() {
    let cluster = Cluster::start();
    let a = cluster_opts(&cluster, "gw-a").start();
    let b = cluster_opts(&cluster, "gw-b").start();
    let topo = topology_of(&a).await;
    assert_eq!(topo["mode"], "cluster", "{topo}");
    let masters_known = eventually(T, || async {
        topology_of(&a).await["masters"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    })
    .await;
    assert!(masters_known, "three masters: {}", topology_of(&a).await);

    let (mut ca, _) = a.connect("p1", &a.token("ann", &["p1"])).await;
    let (mut cb, _) = b.connect("p1", &b.token("bo", &["p1"])).await;
    // The publish path (sharded channel), across instances, in order.
    let seqs = b
        .publish(
            "p1",
            &json!([
                {"type": "file.changed", "data": {"path": "a"}},
                {"type": "file.changed", "data": {"path": "b"}},
            ]),
        )
        .await;
    assert_eq!(seqs, vec![1, 2]);
    for c in [&mut ca, &mut cb] {
        for want in &seqs {
            let ev = c.next_of_type("file.changed", T).await;
            assert_eq!(ev["seq"], *want, "{ev}");
            assert!(ev.get("epoch").is_none(), "the mark is removed: {ev}");
        }
    }
    // A seed worker's plain PUBLISH on the classic channel, to a node that does not own
    // the project's slot: a cluster relays classic messages to every node.
    let owner = cluster.master_of("{p1}");
    let other = (0..cluster.nodes.len())
        .find(|i| *i != owner && role(cluster.nodes[*i].port()).as_deref() == Some("master"))
        .unwrap();
    cluster.nodes[other]
        .publish(
            "project:p1:events",
            r#"{"type":"file.changed","project_id":"p1","data":{"path":"raw"}}"#,
        )
        .await;
    for c in [&mut ca, &mut cb] {
        let ev = c.next_of_type("file.changed", T).await;
        assert_eq!(ev["data"]["path"], "raw", "{ev}");
    }
    // A global event on the classic broadcast channel.
    cluster.nodes[other]
        .publish(
            "websocket:broadcast",
            r#"{"type":"project.created","project_id":"newp","data":{"name":"n"}}"#,
        )
        .await;
    for c in [&mut ca, &mut cb] {
        c.next_of_type("project.created", T).await;
    }
    // Resume after the events: replayed from the project's history in its slot.
    let mut r = b
        .ws(
            &format!("/ws/p1?token={}&last_seq=0", b.token("cy", &["p1"])),
            &[],
        )
        .await;
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let ev = r.next_json(T).await;
        if ev["type"] == "file.changed" {
            replayed.push(ev["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(replayed, vec![1, 2]);
    // Status and presence.
    ca.send_json(&json!({"type": "status"})).await;
    let status: serde_json::Value = match ca.next_frame(T).await {
        Some(Frame::Text(t)) => serde_json::from_str(&t).unwrap(),
        other => panic!("no status answer: {other:?}\n{}", a.logs()),
    };
    assert_eq!(status["seq"], 2, "{status}");
    let present = eventually(T, || async {
        let r = a
            .get_with(
                "/v1/projects/p1/presence",
                &[("authorization", &format!("Bearer {}", a.service_token()))],
            )
            .await;
        r.status == 200 && r.json()["clients"].as_array().is_some_and(|c| c.len() == 3)
    })
    .await;
    assert!(present, "presence across instances on the cluster");

    // Commands: two command streams on b, and a seed worker.
    // A seed worker subscribed on another node than the slot's: counted too (PUBSUB NUMSUB
    // on every node).
    let mut raw = cluster.nodes[other].subscribe("project:p1:commands").await;
    let mut w1 = crate::command_stream::worker(&b, "p1").await;
    let mut w2 = crate::command_stream::worker(&b, "p1").await;
    crate::command_stream::delivered_eventually(&mut ca, 3, &mut [&mut w1, &mut w2]).await;
    while raw
        .try_next_json(std::time::Duration::from_millis(50))
        .await
        .is_some()
    {}
    let accepted = crate::command_stream::execute(&mut ca, "real").await;
    assert_eq!(accepted["delivered_to"], 3, "{accepted}");
    let from_redis = raw.next_json(T).await;
    for w in [&mut w1, &mut w2] {
        let cmd: serde_json::Value = serde_json::from_str(&w.next_text(T).await).unwrap();
        assert_eq!(cmd, from_redis, "the same command, as published");
    }
    w1.expect_silence(std::time::Duration::from_millis(300))
        .await;

    // Story progress: the seed-003 gate, on the cluster.
    crate::stories::the_seed_gate(&a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_then_restarted_under_load_loses_no_acknowledged_event() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let mut cluster = Cluster::start();
    let opts = |name: &str| {
        cluster_opts(&cluster, name)
            .cfg("redis", "publish_wait_replicas", "1")
            .cfg("redis", "publish_wait_timeout_ms", "500")
            .cfg("redis", "command_timeout_ms", "1000")
            .cfg("redis", "pubsub_ping_interval_ms", "500")
            .cfg("redis", "reconnect_max_backoff_ms", "1000")
    };
    let (a, b) = (opts("gw-a").start(), opts("gw-b").start());
    let load = Load::start(&a, &b, &scale, "cluster").await;
    let projects = load.projects.clone();

    // The master of the busiest project's slot (every project is equally busy: the first).
    let victim = cluster.master_of(&format!("{{{}}}", projects[0]));
    let port = cluster.nodes[victim].port();
    let t_kill = Instant::now();
    cluster.nodes[victim].kill();
    let promoted = eventually(Duration::from_secs(30), || async {
        cluster
            .owner_of(&format!("{{{}}}", projects[0]))
            .is_some_and(|owner| owner != victim)
    })
    .await;
    assert!(
        promoted,
        "no replica took over the slot in 30 s:\n{}",
        cluster.describe()
    );
    let t_promoted = Instant::now();
    for gw in [&a, &b] {
        let ready = eventually(Duration::from_secs(20), || async {
            gw.get("/readyz").await.status == 200
        })
        .await;
        assert!(
            ready,
            "{} not ready after the failover\n{}",
            gw.instance_id,
            gw.logs()
        );
    }
    let t_ready = Instant::now();
    tokio::time::sleep(scale.after).await;
    // The old master comes back (empty: it rejoins as a replica of the new one).
    cluster.nodes[victim].restart();
    let rejoined = eventually(Duration::from_secs(20), || async {
        role(port).as_deref() == Some("slave")
    })
    .await;
    tokio::time::sleep(scale.after).await;

    let log = load.publisher.stop().await;
    let mut report = load
        .fleet
        .report(
            "Cluster master killed, then restarted",
            &log,
            t_promoted,
            &scale,
        )
        .await;
    report.note(format!(
        "master :{port} of {}'s slot SIGKILLed; a replica owned the slot {} later; both \
         gateways ready {} after the kill; the old master restarted and rejoined as a replica: \
         {rejoined}; publish_wait_replicas = 1",
        projects[0],
        secs_str(t_promoted - t_kill),
        secs_str(t_ready - t_kill),
    ));
    report.print();
    report.assert_no_loss();
    assert_clients_stayed(&report);
    assert!(rejoined, "the restarted node did not rejoin as a replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_moved_under_load_loses_no_event() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let cluster = Cluster::start();
    let opts = |name: &str| {
        cluster_opts(&cluster, name)
            .cfg("redis", "pubsub_ping_interval_ms", "500")
            .cfg("redis", "reconnect_max_backoff_ms", "1000")
    };
    let (a, b) = (opts("gw-a").start(), opts("gw-b").start());
    let load = Load::start(&a, &b, &scale, "moved").await;
    let projects = load.projects.clone();

    let tag = format!("{{{}}}", projects[0]);
    let from = cluster.master_of(&tag);
    let to = (0..cluster.nodes.len())
        .find(|i| *i != from && role(cluster.nodes[*i].port()).as_deref() == Some("master"))
        .unwrap();
    let t_move = Instant::now();
    cluster.migrate_slot(&tag, to);
    let moved_in = t_move.elapsed();
    assert_eq!(cluster.master_of(&tag), to);
    tokio::time::sleep(scale.after).await;

    let log = load.publisher.stop().await;
    let mut report = load
        .fleet
        .report("Cluster slot moved (resharding)", &log, t_move, &scale)
        .await;
    report.note(format!(
        "the slot of {} moved with its keys from :{} to :{} in {}; publish_wait_replicas = 0",
        projects[0],
        cluster.nodes[from].port(),
        cluster.nodes[to].port(),
        secs_str(moved_in),
    ));
    report.print();
    report.assert_no_loss();
    assert_clients_stayed(&report);
    for gw in [&a, &b] {
        assert!(
            gw.logs().contains("moved to another shard"),
            "{} did not see its shard channel move\n{}",
            gw.instance_id,
            gw.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sessions_authenticate_and_are_rechecked_across_slots() {
    let cluster = Cluster::start();
    let gw = cluster_opts(&cluster, "gw-s")
        .cfg("auth", "session_recheck_secs", "1")
        .start();
    let client = redis::cluster::ClusterClient::new(
        cluster
            .addrs()
            .split(',')
            .map(|a| format!("redis://{a}/"))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    // Session ids in different slots: the recheck reads them all at once (MGET, split by
    // slot by the cluster client).
    let ids: Vec<String> = (0..6).map(|i| format!("sess-{i}")).collect();
    for id in &ids {
        let _: () = redis::cmd("SET")
            .arg(format!("session:{id}"))
            .arg(json!({"user_id": id, "projects": ["p1"]}).to_string())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut clients = Vec::new();
    for id in &ids {
        let mut c = gw.ws(&format!("/ws/p1?session={id}"), &[]).await;
        assert_eq!(c.next_json(T).await["type"], "connection.established");
        clients.push(c);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for c in &mut clients {
        c.assert_alive().await;
    }
    let _: () = redis::cmd("DEL")
        .arg("session:sess-3")
        .query_async(&mut conn)
        .await
        .unwrap();
    let frames = clients[3]
        .expect_closed_with(4001, Duration::from_secs(4))
        .await;
    assert!(
        frames.iter().any(|f| f["reason"] == "session revoked"),
        "{frames:?}"
    );
    for (i, c) in clients.iter_mut().enumerate() {
        if i != 3 {
            c.assert_alive().await;
        }
    }
}

/// Sentinels are only asked, never in the path: with every sentinel gone and the master
/// fine, a lost pub/sub connection comes back to the master last found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sentinels_the_gateway_keeps_the_master_it_found() {
    let mut set = SentinelSet::start();
    let gw = sentinel_opts(&set, "gw-ns").start();
    let mut c = gw.client("p1").await;
    set.sentinels.clear();
    set.master.kill_pubsub_clients().await;
    let back = eventually(Duration::from_secs(15), || async {
        gw.metric("switchboard_broker_reconnects_total")
            .await
            .is_some_and(|n| n >= 1.0)
            && gw.get("/readyz").await.status == 200
    })
    .await;
    assert!(back, "pub/sub not back without sentinels\n{}", gw.logs());
    published_and_received(&gw, &mut c).await;
}

/// Clusters and Sentinel deployments with `requirepass`: `REDIS_PASSWORD` is used for every
/// node (the master found through Sentinel included), never shown, and without it the
/// gateway is not ready rather than half working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_protected_cluster_and_sentinel_are_served_with_redis_password() {
    const PASSWORD: &str = "s3cret:with@odd/chars";
    let cluster = Cluster::start();
    cluster.require_password(PASSWORD);
    let set = SentinelSet::start();
    set.require_password(PASSWORD);
    for gw in [
        cluster_opts(&cluster, "gw-pc")
            .env("REDIS_PASSWORD", PASSWORD)
            .start(),
        sentinel_opts(&set, "gw-ps")
            .env("REDIS_PASSWORD", PASSWORD)
            .start(),
    ] {
        let mut c = gw.client("p1").await;
        published_and_received(&gw, &mut c).await;
        assert!(!gw.logs().contains("s3cret"), "{}", gw.logs());
        let health = gw.get("/health/websocket").await.text();
        assert!(!health.contains("s3cret"), "{health}");
    }
    // Without the password: not ready, and clients are refused (nothing half works).
    let gw = cluster_opts(&cluster, "gw-np").no_wait_ready().start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gw.get("/readyz").await.status, 503, "{}", gw.logs());
}

#[tokio::test]
async fn broker_topology_is_shown_for_one_redis_and_for_none() {
    let redis = RedisServer::start();
    let single = GatewayOpts::new().redis(redis.url()).start();
    assert_eq!(topology_of(&single).await, json!({"mode": "single"}));
    let embedded = GatewayOpts::new().start();
    assert_eq!(topology_of(&embedded).await, json!({"mode": "embedded"}));
}

/// With publish_wait_replicas and a replica that stopped taking writes (its link frozen),
/// a publish is answered 503 `not_replicated`, saying it was published; the client got it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfirmed_publish_is_answered_503_not_replicated() {
    let set = SentinelSet::start_partitionable();
    let gw = sentinel_opts(&set, "gw-nr").start();
    let mut c = gw.client("p1").await;
    published_and_received(&gw, &mut c).await;
    set.link.as_ref().unwrap().freeze_existing();
    let r = gw
        .post_json(
            "/v1/projects/p1/events",
            Some(&gw.service_token()),
            &json!({"type": "file.changed", "data": {"path": "b"}}),
        )
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "not_replicated", "{body}\n{}", gw.logs());
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("was published"),
        "{body}"
    );
    let ev = c.next_of_type("file.changed", T).await;
    assert_eq!(ev["data"]["path"], "b", "delivered all the same: {ev}");
}
