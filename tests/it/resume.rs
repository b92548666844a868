//! Resuming connections (docs/protocol.md §2 "After a successful upgrade", §5 broker outage
//! and slow consumers, §8): `?last_seq=N&epoch=E` gets every event with seq > N exactly once and in
//! order, then live events; otherwise `connection.resync_required` + `status`. Also the
//! gateway's own catch-up after a pub/sub outage, and the shared history read of many
//! clients resuming one project at once.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Frames of these types are never skipped here: a resume must not send a `status`.
fn only_heartbeats_skipped(c: &mut WsClient) {
    c.skip = vec!["system.heartbeat".into()];
}

fn resume_path(project: &str, token: &str, last_seq: u64, epoch: Option<&str>) -> String {
    let mut q = format!("/ws/{project}?token={token}&last_seq={last_seq}");
    if let Some(e) = epoch {
        q.push_str(&format!("&epoch={}", query_escape(e)));
    }
    q
}

/// Opens a resuming connection and returns it with its `connection.established`.
async fn resume(
    gw: &Gateway,
    project: &str,
    token: &str,
    last_seq: u64,
    epoch: Option<&str>,
) -> (WsClient, Value) {
    let mut c = gw
        .ws(&resume_path(project, token, last_seq, epoch), &[])
        .await;
    only_heartbeats_skipped(&mut c);
    let est = c.next_json(T).await;
    assert_eq!(
        est["type"],
        "connection.established",
        "first frame of a resume: {est}\n{}",
        gw.logs()
    );
    assert_eq!(est["project_id"], project, "{est}");
    (c, est)
}

/// Fresh connection; returns the client (status frames no longer skipped) and the epoch.
async fn fresh(gw: &Gateway, project: &str, token: &str) -> (WsClient, Value) {
    let (mut c, est) = gw.connect(project, token).await;
    assert_eq!(est["resumed"], false, "{est}");
    assert!(
        est["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{est}"
    );
    only_heartbeats_skipped(&mut c);
    (c, est)
}

fn epoch_of(est: &Value) -> String {
    est["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch: {est}"))
        .to_string()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            e["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("frame without seq: {e}"))
        })
        .collect()
}

fn range(a: u64, b: u64) -> Vec<u64> {
    (a..=b).collect()
}

/// Publishes `ev(a..=b)` in one batch and checks the seqs given back equal the markers.
async fn publish_range(gw: &Gateway, project: &str, a: u64, b: u64) {
    let batch: Vec<Value> = (a..=b).map(ev).collect();
    let got = gw.publish(project, &Value::Array(batch)).await;
    assert_eq!(got, range(a, b), "seqs assigned to ev({a}..={b})");
}

/// `n` frames that must all be published events with the given seqs (and markers n == seq).
async fn expect_events(c: &mut WsClient, want: &[u64], timeout: Duration) {
    let got = c.collect(want.len(), timeout).await;
    for e in &got {
        assert_eq!(
            e["type"], "file.changed",
            "expected only replayed/live events: {e}"
        );
    }
    assert_eq!(seqs(&got), want, "seq list");
    let ns: Vec<u64> = got.iter().map(|e| e["n"].as_u64().unwrap_or(0)).collect();
    assert_eq!(ns, want, "event markers follow the seqs");
}

async fn wait_readyz(gw: &Gateway, want: u16, timeout: Duration) -> bool {
    eventually(timeout, || async { gw.get("/readyz").await.status == want }).await
}

// ---------------------------------------------------------------------------------------

/// The common scenario: 3 seen, 5 missed, resume, exactly those 5, then live.
async fn five_missed_then_live(gw: &Gateway, project: &str) -> (String, u64) {
    let t = gw.token("res", &[project]);
    let (mut c, est) = fresh(gw, project, &t).await;
    assert_eq!(est["seq"], 0, "{est}");
    let epoch = epoch_of(&est);
    publish_range(gw, project, 1, 3).await;
    expect_events(&mut c, &range(1, 3), T).await;
    c.close().await;

    publish_range(gw, project, 4, 8).await;
    let (mut c, est) = resume(gw, project, &t, 3, Some(&epoch)).await;
    assert_eq!(est["resumed"], true, "{est}");
    assert_eq!(
        est["seq"], 8,
        "established carries the project's current seq: {est}"
    );
    assert_eq!(est["epoch"], epoch.as_str(), "{est}");
    // exactly the 5 missed ones, in order, no status in between
    expect_events(&mut c, &range(4, 8), T).await;
    publish_range(gw, project, 9, 9).await;
    expect_events(&mut c, &[9], T).await;
    c.expect_silence(Duration::from_millis(300)).await;
    (epoch, 9)
}

#[tokio::test]
async fn resume_after_five_missed_events_gets_exactly_those_then_live() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    five_missed_then_live(&gw, "res5").await;
}

#[tokio::test]
async fn resume_with_last_seq_equal_to_current_replays_nothing() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let t = gw.token("cur", &["cur"]);
    let (c, est) = fresh(&gw, "cur", &t).await;
    let epoch = epoch_of(&est);
    drop(c);
    publish_range(&gw, "cur", 1, 3).await;
    let (mut c, est) = resume(&gw, "cur", &t, 3, Some(&epoch)).await;
    assert_eq!(est["resumed"], true, "{est}");
    assert_eq!(est["seq"], 3, "{est}");
    // nothing replayed, no status, no resync
    c.expect_silence(Duration::from_millis(400)).await;
    publish_range(&gw, "cur", 4, 4).await;
    expect_events(&mut c, &[4], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_gateway_restart() {
    let redis = RedisServer::start();
    let mut gw1 = GatewayOpts::new().redis(redis.url()).grace(3).start();
    let t = gw1.token("rst", &["rst"]);
    let (mut c, est) = fresh(&gw1, "rst", &t).await;
    let epoch = epoch_of(&est);
    publish_range(&gw1, "rst", 1, 2).await;
    expect_events(&mut c, &range(1, 2), T).await;

    gw1.sigterm();
    let (frames, code) = c.read_to_end(Duration::from_secs(10)).await;
    assert!(
        frames.iter().any(|f| f["type"] == "container.reconnect"),
        "container.reconnect before the restart close: {frames:?}"
    );
    assert_eq!(
        code,
        Some(1012),
        "close code on shutdown; frames {frames:?}"
    );
    drop(c);
    let st = gw1.wait_exit(Duration::from_secs(15));
    assert!(
        st.success(),
        "first gateway exit status {st:?}\n{}",
        gw1.logs()
    );

    // a new process on the same Redis; events go on while the client is away
    let gw2 = GatewayOpts::new().redis(redis.url()).start();
    publish_range(&gw2, "rst", 3, 6).await;
    let (mut c, est) = resume(&gw2, "rst", &t, 2, Some(&epoch)).await;
    assert_eq!(est["resumed"], true, "{est}\n{}", gw2.logs());
    assert_eq!(est["seq"], 6, "{est}");
    assert_eq!(
        est["epoch"],
        epoch.as_str(),
        "same Redis, same epoch: {est}"
    );
    expect_events(&mut c, &range(3, 6), T).await;
    publish_range(&gw2, "rst", 7, 7).await;
    expect_events(&mut c, &[7], T).await;
    c.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn resume_on_another_instance() {
    let redis = RedisServer::start();
    let gw1 = GatewayOpts::new()
        .redis(redis.url())
        .instance("res-one")
        .start();
    let gw2 = GatewayOpts::new()
        .redis(redis.url())
        .instance("res-two")
        .start();
    let t = gw1.token("mv", &["mv"]);
    let (mut c, est) = fresh(&gw1, "mv", &t).await;
    let epoch = epoch_of(&est);
    publish_range(&gw1, "mv", 1, 2).await;
    expect_events(&mut c, &range(1, 2), T).await;
    c.drop_abruptly();
    publish_range(&gw1, "mv", 3, 5).await;

    let (mut c, est) = resume(&gw2, "mv", &t, 2, Some(&epoch)).await;
    assert_eq!(est["instance_id"], "res-two", "{est}");
    assert_eq!(est["resumed"], true, "{est}");
    assert_eq!(est["seq"], 5, "{est}");
    expect_events(&mut c, &range(3, 5), T).await;
    // live, published through the other instance
    publish_range(&gw1, "mv", 6, 6).await;
    expect_events(&mut c, &[6], T).await;
    c.expect_silence(Duration::from_millis(200)).await;
}

/// `connection.resync_required` with these fields, then `status` at `seq`.
async fn expect_resync(
    c: &mut WsClient,
    from_seq: u64,
    earliest_seq: u64,
    epoch: &str,
    seq: u64,
) -> Value {
    let r = c.next_json(T).await;
    assert_eq!(r["type"], "connection.resync_required", "{r}");
    assert_eq!(r["from_seq"], from_seq, "from_seq: {r}");
    assert_eq!(r["earliest_seq"], earliest_seq, "earliest_seq: {r}");
    assert_eq!(r["epoch"], epoch, "epoch in resync_required: {r}");
    let s = c.next_json(T).await;
    assert_eq!(
        s["type"], "status",
        "status right after resync_required: {s}"
    );
    assert_eq!(s["seq"], seq, "status seq: {s}");
    assert!(s["nodes"].is_object() && s["tasks"].is_object(), "{s}");
    s
}

#[tokio::test]
async fn resync_when_history_was_trimmed() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut rc = redis.conn().await;
    for (project, how) in [("trim", "xtrim"), ("gone", "del")] {
        let t = gw.token("tr", &[project]);
        let (mut c, est) = fresh(&gw, project, &t).await;
        let epoch = epoch_of(&est);
        publish_range(&gw, project, 1, 2).await;
        expect_events(&mut c, &range(1, 2), T).await;
        c.close().await;
        publish_range(&gw, project, 3, 6).await;
        let key = format!("project:{project}:history");
        let earliest = if how == "xtrim" {
            // exact trim: only seqs 5 and 6 remain
            let _: i64 = redis::cmd("XTRIM")
                .arg(&key)
                .arg("MAXLEN")
                .arg(2)
                .query_async(&mut rc)
                .await
                .unwrap();
            5
        } else {
            let _: i64 = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut rc)
                .await
                .unwrap();
            // nothing held: the first seq the client can get is the next one
            7
        };
        let (mut c, est) = resume(&gw, project, &t, 2, Some(&epoch)).await;
        assert_eq!(est["resumed"], false, "{how}: {est}");
        assert_eq!(est["seq"], 6, "{how}: {est}");
        expect_resync(&mut c, 2, earliest, &epoch, 6).await;
        publish_range(&gw, project, 7, 7).await;
        expect_events(&mut c, &[7], T).await;
        c.expect_silence(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn resync_on_a_wrong_epoch_parameter() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let t = gw.token("ep", &["ep"]);
    let (c, est) = fresh(&gw, "ep", &t).await;
    let epoch = epoch_of(&est);
    drop(c);
    publish_range(&gw, "ep", 1, 3).await;
    let (mut c, est) = resume(&gw, "ep", &t, 1, Some("not-the-epoch")).await;
    assert_eq!(est["resumed"], false, "{est}");
    assert_eq!(est["epoch"], epoch.as_str(), "{est}");
    expect_resync(&mut c, 1, 1, &epoch, 3).await;
    publish_range(&gw, "ep", 4, 4).await;
    expect_events(&mut c, &[4], T).await;

    // and a resume that the gateway already serves from memory is checked the same way
    let (mut ok, est) = resume(&gw, "ep", &t, 2, Some(&epoch)).await;
    assert_eq!(est["resumed"], true, "{est}");
    expect_events(&mut ok, &range(3, 4), T).await;
    let (mut c, est) = resume(&gw, "ep", &t, 2, Some("still-not-the-epoch")).await;
    assert_eq!(est["resumed"], false, "{est}");
    expect_resync(&mut c, 2, 1, &epoch, 4).await;
}

#[tokio::test]
async fn resync_after_flushall_gives_a_new_epoch() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut rc = redis.conn().await;
    // "fa": a client resumed before the flush (the gateway keeps a resume tail for it);
    // "fb": plain fresh clients only.
    let mut keep = Vec::new();
    let mut epochs = Vec::new();
    for project in ["fb", "fa"] {
        let t = gw.token("fl", &[project]);
        let (mut c, est) = fresh(&gw, project, &t).await;
        let epoch = epoch_of(&est);
        publish_range(&gw, project, 1, 3).await;
        expect_events(&mut c, &range(1, 3), T).await;
        if project == "fa" {
            drop(c);
            let (mut c, est) = resume(&gw, project, &t, 3, Some(&epoch)).await;
            assert_eq!(est["resumed"], true, "{est}");
            c.expect_silence(Duration::from_millis(200)).await;
            keep.push(c);
        } else {
            keep.push(c);
        }
        epochs.push(epoch);
    }
    let _: () = redis::cmd("FLUSHALL").query_async(&mut rc).await.unwrap();
    for (i, project) in ["fb", "fa"].into_iter().enumerate() {
        let old = &epochs[i];
        let t = gw.token("fl", &[project]);
        let s = gw.publish(project, &ev(1)).await;
        assert_eq!(s, vec![1], "{project}: seq starts again after FLUSHALL");
        let (mut c, est) = resume(&gw, project, &t, 3, Some(old)).await;
        assert_eq!(
            est["resumed"], false,
            "{project}: old epoch must not resume: {est}"
        );
        let new = epoch_of(&est);
        assert_ne!(&new, old, "{project}: FLUSHALL gives a new epoch: {est}");
        assert_eq!(est["seq"], 1, "{project}: {est}");
        expect_resync(&mut c, 3, 1, &new, 1).await;
        let s = gw.publish(project, &ev(2)).await;
        assert_eq!(s, vec![2]);
        expect_events(&mut c, &[2], T).await;
        c.expect_silence(Duration::from_millis(200)).await;
    }
    drop(keep);
}

#[tokio::test]
async fn resync_after_flushall_with_no_event_since() {
    // The gateway served a resume from memory before; Redis then loses its data and nobody
    // publishes: the old epoch must still be refused.
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let t = gw.token("fz", &["fz"]);
    let (mut c, est) = fresh(&gw, "fz", &t).await;
    let old = epoch_of(&est);
    publish_range(&gw, "fz", 1, 3).await;
    expect_events(&mut c, &range(1, 3), T).await;
    drop(c);
    let (c, est) = resume(&gw, "fz", &t, 3, Some(&old)).await;
    assert_eq!(est["resumed"], true, "{est}");
    let mut rc = redis.conn().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut rc).await.unwrap();
    let (mut c2, est) = resume(&gw, "fz", &t, 3, Some(&old)).await;
    assert_eq!(est["resumed"], false, "old epoch must not resume: {est}");
    let new = epoch_of(&est);
    assert_ne!(new, old);
    expect_resync(&mut c2, 3, 1, &new, 0).await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_events_keep_coming_is_gap_and_duplicate_free() {
    let redis = RedisServer::start();
    let gw = std::sync::Arc::new(GatewayOpts::new().redis(redis.url()).start());
    let t = gw.token("flow", &["flow"]);
    let (mut c, est) = fresh(&gw, "flow", &t).await;
    let epoch = epoch_of(&est);
    const K: u64 = 400;
    let g = gw.clone();
    let publisher = tokio::spawn(async move {
        for n in 1..=K {
            let s = g.publish("flow", &ev(n)).await;
            assert_eq!(s, vec![n]);
            if n % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let mut seen: Vec<u64> = Vec::new();
    let mut resumes = 0;
    let cut_at = [40u64, 110, 190, 280, 350];
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.last().copied().unwrap_or(0) < K {
        assert!(Instant::now() < deadline, "stuck at {:?}", seen.last());
        let e = c.next_json(Duration::from_secs(10)).await;
        assert_eq!(e["type"], "file.changed", "after {:?}: {e}", seen.last());
        let s = e["seq"].as_u64().expect("seq");
        assert_eq!(e["n"], s, "{e}");
        seen.push(s);
        if resumes < cut_at.len() && s >= cut_at[resumes] {
            resumes += 1;
            // alternate a clean close and a reset
            if resumes % 2 == 0 {
                c.close().await;
            } else {
                c.drop_abruptly();
            }
            let (c2, est) = resume(&gw, "flow", &t, s, Some(&epoch)).await;
            assert_eq!(est["resumed"], true, "{est}");
            assert!(est["seq"].as_u64().unwrap() >= s, "{est}");
            c = c2;
        }
    }
    tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("publisher finished")
        .unwrap();
    assert_eq!(resumes, cut_at.len(), "every planned reconnect happened");
    assert_eq!(
        seen,
        range(1, K),
        "union of all connections: gap-free, duplicate-free"
    );
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_resume_one_project_with_one_history_read() {
    let redis = RedisServer::start();
    let gw = std::sync::Arc::new(
        GatewayOpts::new()
            .redis(redis.url())
            .cfg("server", "handshake_rate_per_sec", "0")
            .start(),
    );
    let t = gw.token("herd", &["herd"]);
    let (first, est) = fresh(&gw, "herd", &t).await;
    let epoch = epoch_of(&est);
    drop(first);
    publish_range(&gw, "herd", 1, 30).await;
    let before = gw
        .metric("switchboard_history_reads_total")
        .await
        .expect("switchboard_history_reads_total in /metrics");
    // Every script call: the publishes above are done, so what follows is the resumes'
    // position reads (and history reads).
    let scripts_before = redis.command_calls("evalsha").await + redis.command_calls("eval").await;

    const TASKS: usize = 4;
    const PER: usize = 250;
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (gw, t, epoch) = (gw.clone(), t.clone(), epoch.clone());
        handles.push(tokio::spawn(async move {
            let path = resume_path("herd", &t, 10, Some(&epoch));
            let mut clients = Vec::with_capacity(PER);
            for _ in 0..PER {
                let mut c = gw.ws(&path, &[]).await;
                only_heartbeats_skipped(&mut c);
                clients.push(c);
            }
            for c in clients.iter_mut() {
                let est = c.next_json(Duration::from_secs(20)).await;
                assert_eq!(est["type"], "connection.established", "{est}");
                assert_eq!(est["resumed"], true, "{est}");
                assert_eq!(est["seq"], 30, "{est}");
                expect_events(c, &range(11, 30), Duration::from_secs(20)).await;
            }
            clients
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(
            tokio::time::timeout(Duration::from_secs(40), h)
                .await
                .expect("resuming clients did not finish in 40 s")
                .unwrap(),
        );
    }
    eprintln!("1000 resumes caught up in {:?}", started.elapsed());
    assert_eq!(all.len(), TASKS * PER);
    gw.wait_connections((TASKS * PER) as u64, T).await;
    // and all of them go on with the same live event
    publish_range(&gw, "herd", 31, 31).await;
    for c in all.iter_mut() {
        expect_events(c, &[31], Duration::from_secs(10)).await;
    }
    let after = gw.metric("switchboard_history_reads_total").await.unwrap();
    eprintln!("history reads for 1000 resumes: {}", after - before);
    assert!(
        after - before >= 1.0,
        "the resumes read history at least once"
    );
    assert!(
        after - before <= 3.0,
        "1,000 concurrent resumes of one project must share the history read: {} reads",
        after - before
    );
    // Each resume checks the epoch with a position read that began after it arrived; the
    // resumes arriving during one read share the next (issue 13: one round trip per
    // resume held a 10,000-client storm to ~1,750 resumes/s).
    let scripts =
        redis.command_calls("evalsha").await + redis.command_calls("eval").await - scripts_before;
    eprintln!("script calls for 1000 resumes: {scripts}");
    assert!(
        scripts < 800,
        "1,000 concurrent resumes must share position reads: {scripts} script calls"
    );
}

fn big(n: u64, pad: usize) -> Value {
    let mut e = ev(n);
    e["pad"] = json!("x".repeat(pad));
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closed_4500_resumes_with_its_last_seq_and_loses_nothing() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("ws", "outbound_queue_messages", "16")
        .cfg("ws", "outbound_queue_bytes", "1048576")
        .cfg("api", "max_body_bytes", "4194304")
        .start();
    let t = gw.token("slow", &["slow4500"]);
    let mut slow = ws_connect(
        gw.addr(),
        &format!("/ws/slow4500?token={t}"),
        &[],
        Some(4096),
    )
    .await
    .expect("slow client");
    let est = slow.next_json(T).await;
    assert_eq!(est["type"], "connection.established");
    let epoch = epoch_of(&est);
    gw.wait_connections(1, T).await;

    // publish 16 KiB events until the never-reading client is dropped
    let mut total = 0u64;
    let mut closed = false;
    for _ in 0..100 {
        let batch: Vec<Value> = (total + 1..=total + 20)
            .map(|n| big(n, 16 * 1024))
            .collect();
        let s = gw.publish("slow4500", &Value::Array(batch)).await;
        assert_eq!(s, range(total + 1, total + 20));
        total += 20;
        if gw.logs().contains("slow consumer closed") {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a never-reading client was not closed after {total} events"
    );
    eprintln!("slow client closed after {total} events");
    gw.wait_connections(0, Duration::from_secs(15)).await;
    // and a few more while it is away
    publish_range(&gw, "slow4500", total + 1, total + 5).await;
    total += 5;

    let (frames, code) = slow.read_to_end(Duration::from_secs(30)).await;
    let got: Vec<u64> = frames
        .iter()
        .filter(|f| f["type"] == "file.changed")
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    let last = got.len() as u64;
    assert_eq!(
        got,
        range(1, last),
        "the slow client's frames are a gap-free prefix"
    );
    assert!(last < total, "it cannot have received everything");
    if let Some(code) = code {
        assert_eq!(code, 4500, "slow consumer close code");
    }
    if let Some(c) = frames.iter().find(|f| f["type"] == "connection.closed") {
        assert_eq!(c["code"], 4500, "{c}");
    }
    drop(slow);

    // resume from the last seq it saw: everything after it, then live
    let mut c = gw
        .ws(&resume_path("slow4500", &t, last, Some(&epoch)), &[])
        .await;
    only_heartbeats_skipped(&mut c);
    let est = c.next_json(T).await;
    assert_eq!(
        est["type"],
        "connection.established",
        "resuming after a 4500 close with last_seq={last} ({} events missed, outbound queue \
         16 messages): the replay must not overflow the queue; first frame: {est}",
        total - last
    );
    assert_eq!(est["resumed"], true, "{est}");
    assert_eq!(est["seq"], total, "{est}");
    let want = range(last + 1, total);
    let mut rest = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rest.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_frame(left).await {
            Some(Frame::Text(txt)) => {
                let v: Value = serde_json::from_str(&txt).unwrap();
                if v["type"] == "system.heartbeat" {
                    continue;
                }
                assert_eq!(
                    v["type"],
                    "file.changed",
                    "resumed client after {} of {} replayed events got {v}",
                    rest.len(),
                    want.len()
                );
                rest.push(v["seq"].as_u64().unwrap());
            }
            Some(Frame::Ping) | Some(Frame::Pong) => {}
            other => panic!(
                "resumed client (last_seq={last}) got {other:?} after {} of {} replayed events \
                 (seqs {}..={total}); the replay must not overflow the outbound queue",
                rest.len(),
                want.len(),
                last + 1
            ),
        }
    }
    assert_eq!(rest, want, "replay after a 4500 close");
    publish_range(&gw, "slow4500", total + 1, total + 1).await;
    expect_events(&mut c, &[total + 1], T).await;
}

/// Gateway 1 reaches Redis through a proxy whose existing connections go silent; gateway 2
/// publishes meanwhile. Gateway 1's client gets the missed events from history, in order,
/// then live ones, on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_missed_events_are_replayed_to_connected_clients() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let gw1 = GatewayOpts::new()
        .redis(proxy.url())
        .cfg("redis", "pubsub_ping_interval_ms", "500")
        .cfg("redis", "command_timeout_ms", "1000")
        .cfg("redis", "reconnect_max_backoff_ms", "1000")
        .start();
    let gw2 = GatewayOpts::new().redis(redis.url()).start();
    let t = gw1.token("out", &["outage"]);
    let (mut c, _) = fresh(&gw1, "outage", &t).await;
    publish_range(&gw2, "outage", 1, 2).await;
    expect_events(&mut c, &range(1, 2), T).await;

    proxy.freeze_existing();
    // published through the other instance while gateway 1's pub/sub is silently dead
    publish_range(&gw2, "outage", 3, 7).await;
    let start = Instant::now();
    let got = c.collect(5, Duration::from_secs(30)).await;
    eprintln!("caught up after {:?}", start.elapsed());
    assert!(
        got.iter().all(|e| e["type"] == "file.changed"),
        "only the missed events, no resync: {got:?}\n{}",
        gw1.logs()
    );
    assert_eq!(
        seqs(&got),
        range(3, 7),
        "missed events in seq order\n{}",
        gw1.logs()
    );
    // live again (the replay came after the resubscription), and nothing replayed twice
    publish_range(&gw2, "outage", 8, 8).await;
    expect_events(&mut c, &[8], T).await;
    c.expect_silence(Duration::from_millis(500)).await;
    c.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_under_a_connected_client_sends_resync_then_status() {
    let mut redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("redis", "pubsub_ping_interval_ms", "500")
        .cfg("redis", "reconnect_max_backoff_ms", "500")
        .start();
    let t = gw.token("empty", &["empty"]);
    let (mut c, est) = fresh(&gw, "empty", &t).await;
    let old = epoch_of(&est);
    gw.publish(
        "empty",
        &json!({"type": "node.state.updated", "node_id": "n1", "state": "processing"}),
    )
    .await;
    publish_range(&gw, "empty", 2, 3).await;
    let e = c.next_json(T).await;
    assert_eq!(e["seq"], 1, "{e}");
    expect_events(&mut c, &range(2, 3), T).await;

    redis.kill();
    assert!(
        wait_readyz(&gw, 503, Duration::from_secs(10)).await,
        "{}",
        gw.logs()
    );
    redis.restart();
    assert!(
        wait_readyz(&gw, 200, Duration::from_secs(20)).await,
        "{}",
        gw.logs()
    );
    // once the broker is back, the open connection learns its history is gone
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_frame(left).await {
            Some(Frame::Text(txt)) => {
                let v: Value = serde_json::from_str(&txt).unwrap();
                if v["type"] == "system.heartbeat" {
                    continue;
                }
                break v;
            }
            Some(Frame::Ping) | Some(Frame::Pong) => {}
            other => panic!(
                "no connection.resync_required within 10 s of Redis coming back empty: {other:?}\n{}",
                gw.logs()
            ),
        }
    };
    assert_eq!(r["type"], "connection.resync_required", "{r}");
    assert_eq!(r["from_seq"], 3, "{r}");
    let new = r["epoch"].as_str().expect("epoch").to_string();
    assert_ne!(new, old, "an empty Redis has a new epoch: {r}");
    let s = c.next_json(T).await;
    assert_eq!(s["type"], "status", "{s}");
    assert_eq!(s["seq"], 0, "{s}");
    assert_eq!(s["nodes"], json!({}), "the old state is gone: {s}");
    assert_eq!(s["tasks"], json!({}), "{s}");
    // live events with the new seqs follow on the same connection
    let seq = gw.publish("empty", &ev(1)).await;
    assert_eq!(seq, vec![1]);
    expect_events(&mut c, &[1], T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_resume_works_and_a_restarted_embedded_gateway_resyncs_an_old_epoch() {
    let mut gw1 = GatewayOpts::new().embedded().grace(2).start();
    let (epoch1, last) = five_missed_then_live(&gw1, "emb").await;
    gw1.sigterm();
    assert!(gw1.wait_exit(Duration::from_secs(10)).success());

    let gw2 = GatewayOpts::new().embedded().start();
    let t = gw2.token("res", &["emb"]);
    let (mut c, est) = resume(&gw2, "emb", &t, last, Some(&epoch1)).await;
    assert_eq!(est["resumed"], false, "{est}");
    let epoch2 = epoch_of(&est);
    assert_ne!(epoch2, epoch1, "a new embedded process has a new epoch");
    assert_eq!(est["seq"], 0, "{est}");
    expect_resync(&mut c, last, 1, &epoch2, 0).await;
    // without an epoch, the coverage check alone: seq 9 is beyond this history
    let (mut c2, est) = resume(&gw2, "emb", &t, last, None).await;
    assert_eq!(est["resumed"], false, "{est}");
    expect_resync(&mut c2, last, 1, &epoch2, 0).await;
    publish_range(&gw2, "emb", 1, 1).await;
    expect_events(&mut c, &[1], T).await;
    expect_events(&mut c2, &[1], T).await;
}
