//! Fault tests (issue 5): each kills, restarts, freezes or drains a piece of a running
//! deployment under load, then prints a loss report and asserts that no event the
//! publisher was told was accepted is missing for any client whose history covers it.
//!
//! The setup is always two gateway instances on one private Redis, a paced publisher
//! (API or the workers' Lua script path) spread over a few projects, and a fleet of
//! clients homed on both instances that track seq/epoch and reconnect with
//! `?last_seq&epoch` after any close (see `common/chaos.rs` for the accounting rules).
//! Faults:
//! - kill -9 of one instance: the other's clients see nothing; the killed one's resume
//!   on the survivor with no loss;
//! - Redis restarted with its data (AOF): the gap is replayed, recovery within 10 s;
//! - Redis restarted empty: every client gets `connection.resync_required`, then nothing
//!   published in the new epoch is lost;
//! - Redis frozen with SIGSTOP: the dead pub/sub link is detected within the configured
//!   ping interval + command timeout, and recovered after SIGCONT with no loss;
//! - SIGTERM during a publish burst: nothing the draining instance accepted is lost to its
//!   resuming clients, and it exits 0.
//!
//! The tests take the machine one at a time (a shared lock): their timing assertions
//! (detection, recovery) are about the gateway, not about CPU contention between them.
//! The lock orders these tests only: a test of another module of the `it` binary may run
//! beside one (libtest starts tests in name order, so mostly beside the last).
//! Sizes scale with `FAULTS_SCALE` and friends (`scripts/chaos` runs them bigger).

use crate::common::chaos::*;
use crate::common::*;
use std::time::{Duration, Instant};

pub(crate) static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Issue 5's bound for getting back to live events after a fault (Redis back, an instance
/// gone).
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// Slack over a configured detection bound: the gateway's timer and our 25 ms `/readyz`
/// poll both run on a loaded 2-core machine.
const TIMER_SLACK: Duration = Duration::from_millis(1000);

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

pub(crate) fn assert_recovered_within(report: &Report, bound: Duration) {
    for g in &report.groups {
        let r = g.recovery.unwrap_or_else(|| {
            panic!("{}: {} never got a live event again", report.title, g.label)
        });
        assert!(
            r <= bound,
            "{}: {} recovered after {}, bound {}",
            report.title,
            g.label,
            secs(r),
            secs(bound)
        );
    }
}

/// Clients stay connected through a broker outage (docs/protocol.md §5). The one close allowed is
/// the slow-consumer 4500 (a replay burst bigger than the outbound queue, possible at
/// `scripts/chaos` sizes), and then only with a resume.
pub(crate) fn assert_clients_stayed(report: &Report) {
    for home in 0..report.groups.len() {
        for (l, _) in report.clients_of(home) {
            assert!(
                l.closes.iter().all(|c| *c == Some(4500)),
                "{}: a client of {} was disconnected: closes {:?}, anomalies {:?}",
                report.title,
                report.groups[home].label,
                l.closes,
                l.anomalies
            );
            assert!(
                l.connects[1..].iter().all(|c| c.resumed),
                "{}: a client of {} reconnected without a resume: {:?}",
                report.title,
                report.groups[home].label,
                l.connects
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_one_of_two_instances_under_load() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let redis = RedisServer::start();
    let mut a = gateway_opts(&redis.url(), "gw-a").start();
    let b = gateway_opts(&redis.url(), "gw-b").start();
    let projects = scale.project_names("kill");
    let fleet = Fleet::start(
        &[a.addr(), b.addr()],
        scale.clients_per_instance,
        &projects,
        &a.secret,
    )
    .await;
    let publisher = Publisher::start(Via::api(&[&a, &b], None), &projects, &scale);
    tokio::time::sleep(scale.warmup).await;

    let before = publisher.accepted();
    let pid = a.pid();
    let t_kill = Instant::now();
    a.kill();
    tokio::time::sleep(scale.after).await;

    let log = publisher.stop().await;
    let caught_up = fleet.wait_caught_up(&log, Duration::from_secs(30)).await;
    let clients = fleet.stop().await;
    let mut report = Report::build(
        "kill -9 one of two instances",
        clients,
        &["gw-a (killed)", "gw-b"],
        &log,
        Some(t_kill),
        caught_up.is_some(),
    );
    report.note(scale.describe());
    report.note(format!(
        "kill -9 gw-a (pid {pid}) with {before} events accepted; {} accepted after it \
         (through gw-b); recovery = kill to first post-kill event at each client",
        log.accepted_sent_after(t_kill)
    ));
    report.print();

    report.assert_no_loss();
    assert!(
        log.accepted_sent_after(t_kill) > 0,
        "nothing was published after the kill: the survivor must keep accepting"
    );
    for (l, _) in report.clients_of(1) {
        assert_eq!(
            l.connects.len(),
            1,
            "a client of the survivor reconnected: {l:?}"
        );
        assert!(
            l.closes.is_empty(),
            "a client of the survivor was closed: {:?}",
            l.closes
        );
        assert!(
            l.resyncs.is_empty(),
            "a client of the survivor was resynced"
        );
    }
    for (l, _) in report.clients_of(0) {
        assert!(
            l.connects.len() >= 2,
            "a client of the killed instance never reconnected: {:?}",
            l.closes
        );
        for c in &l.connects[1..] {
            assert_eq!(c.instance, 1, "reconnected to the dead instance?");
            assert!(c.resumed, "reconnection not resumed: {:?}", l.anomalies);
        }
        assert!(l.resyncs.is_empty(), "history covers a kill: no resync");
    }
    assert_recovered_within(&report, RECOVERY_BOUND);
}

/// Redis is killed and restarted under load; `persistent` decides whether it comes back
/// with its data (AOF, fsync always) or empty.
async fn redis_restarted_under_load(persistent: bool) {
    let scale = Scale::from_env();
    let mut redis = if persistent {
        RedisServer::start_persistent()
    } else {
        RedisServer::start()
    };
    let a = gateway_opts(&redis.url(), "gw-a").start();
    let b = gateway_opts(&redis.url(), "gw-b").start();
    let projects = scale.project_names(if persistent { "aof" } else { "empty" });
    let fleet = Fleet::start(
        &[a.addr(), b.addr()],
        scale.clients_per_instance,
        &projects,
        &a.secret,
    )
    .await;
    // Workers publish straight to Redis: they resume as soon as Redis is back, while the
    // gateways are still in their reconnect backoff, which is the gap to replay.
    let publisher = Publisher::start(Via::Lua { url: redis.url() }, &projects, &scale);
    tokio::time::sleep(scale.warmup).await;

    let t_down = Instant::now();
    redis.kill();
    for gw in [&a, &b] {
        assert!(
            time_until_readyz(gw, 503, Duration::from_secs(10))
                .await
                .is_some(),
            "{} still ready 10 s after Redis died\n{}",
            gw.instance_id,
            gw.logs()
        );
    }
    // The gateways retry after 0.1, 0.3, 0.7, 1.5, 3.1 s (backoff doubling from 100 ms):
    // Redis back after ~2 s leaves them about a second behind the workers, who publish
    // again at once. That second is the gap they must replay (or resync) when they return.
    let outage = Duration::from_millis(2000);
    tokio::time::sleep(outage.saturating_sub(t_down.elapsed())).await;
    redis.restart();
    let t_back = Instant::now();
    let (ra, rb) = tokio::join!(
        time_until_readyz(&a, 200, Duration::from_secs(20)),
        time_until_readyz(&b, 200, Duration::from_secs(20)),
    );
    let mut ready = Vec::new();
    for (gw, r) in [(&a, ra), (&b, rb)] {
        ready.push(r.unwrap_or_else(|| {
            panic!(
                "{} not ready 20 s after Redis came back\n{}",
                gw.instance_id,
                gw.logs()
            )
        }));
    }
    tokio::time::sleep(scale.after).await;

    let log = publisher.stop().await;
    let caught_up = fleet.wait_caught_up(&log, Duration::from_secs(30)).await;
    let clients = fleet.stop().await;
    let title = if persistent {
        "Redis restarted with its data (AOF)"
    } else {
        "Redis restarted empty"
    };
    let mut report = Report::build(
        title,
        clients,
        &["gw-a", "gw-b"],
        &log,
        Some(t_back),
        caught_up.is_some(),
    );
    report.note(scale.describe());
    let replayed = logged_sum(&a, "replayed events missed", "replayed")
        + logged_sum(&b, "replayed events missed", "replayed");
    report.note(format!(
        "Redis down for {} (SIGKILL, restart {}); gateways ready again {} / {} after it was back; \
         gap replayed from history by the gateways: {replayed} events; recovery = Redis back to \
         first event published after it, at each client",
        secs(t_back - t_down),
        if persistent { "with its AOF" } else { "empty" },
        secs(ready[0]),
        secs(ready[1]),
    ));
    report.print();

    report.assert_no_loss();
    assert_clients_stayed(&report);
    assert_recovered_within(&report, RECOVERY_BOUND);
    if persistent {
        assert!(
            replayed > 0,
            "the workers published while the gateways were reconnecting, yet no gateway logged \
             a replay from history: the gap was not exercised"
        );
    }
    for home in 0..2 {
        for (l, _) in report.clients_of(home) {
            if persistent {
                assert!(
                    l.resyncs.is_empty(),
                    "Redis kept its data: the gap must be replayed, not resynced: {:?}",
                    l.resyncs
                );
            } else {
                assert_eq!(
                    l.resyncs.len(),
                    1,
                    "Redis came back empty: each client needs one connection.resync_required"
                );
                let r = &l.resyncs[0];
                assert_ne!(
                    r.old_epoch.as_deref(),
                    Some(r.new_epoch.as_str()),
                    "the resync names a new epoch"
                );
                assert!(r.status_seq.is_some(), "a status followed the resync");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_under_load_replays_the_gap() {
    let _machine = ONE_AT_A_TIME.lock().await;
    redis_restarted_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_under_load_resyncs_every_client() {
    let _machine = ONE_AT_A_TIME.lock().await;
    redis_restarted_under_load(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_with_sigstop_is_detected_and_recovered() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    const PING_MS: u64 = 500;
    const TIMEOUT_MS: u64 = 1000;
    const BACKOFF_MS: u64 = 1000;
    let redis = RedisServer::start();
    let opts = |name: &str| {
        gateway_opts(&redis.url(), name)
            .cfg("redis", "pubsub_ping_interval_ms", &PING_MS.to_string())
            .cfg("redis", "command_timeout_ms", &TIMEOUT_MS.to_string())
            .cfg("redis", "reconnect_max_backoff_ms", &BACKOFF_MS.to_string())
    };
    let a = opts("gw-a").start();
    let b = opts("gw-b").start();
    let projects = scale.project_names("frozen");
    let fleet = Fleet::start(
        &[a.addr(), b.addr()],
        scale.clients_per_instance,
        &projects,
        &a.secret,
    )
    .await;
    let publisher = Publisher::start(Via::api(&[&a, &b], None), &projects, &scale);
    tokio::time::sleep(scale.warmup).await;

    redis.signal("STOP");
    let t_stop = Instant::now();
    // A frozen Redis keeps its sockets open: only the PING can tell.
    let bound = Duration::from_millis(PING_MS + TIMEOUT_MS);
    let (da, db) = tokio::join!(
        time_until_readyz(&a, 503, Duration::from_secs(15)),
        time_until_readyz(&b, 503, Duration::from_secs(15)),
    );
    let freeze = Duration::from_secs(3);
    tokio::time::sleep(freeze.saturating_sub(t_stop.elapsed())).await;
    redis.signal("CONT");
    let t_cont = Instant::now();
    let (ra, rb) = tokio::join!(
        time_until_readyz(&a, 200, Duration::from_secs(20)),
        time_until_readyz(&b, 200, Duration::from_secs(20)),
    );
    let mut dead_detected = Vec::new();
    for gw in [&a, &b] {
        dead_detected.push(
            gw.metric("switchboard_pubsub_dead_detected_total")
                .await
                .unwrap_or(0.0),
        );
    }
    tokio::time::sleep(scale.after).await;

    let log = publisher.stop().await;
    let caught_up = fleet.wait_caught_up(&log, Duration::from_secs(30)).await;
    let clients = fleet.stop().await;
    let mut report = Report::build(
        "Redis frozen with SIGSTOP",
        clients,
        &["gw-a", "gw-b"],
        &log,
        Some(t_cont),
        caught_up.is_some(),
    );
    let opt = |d: Option<Duration>| d.map(secs).unwrap_or_else(|| "never".into());
    report.note(scale.describe());
    report.note(format!(
        "SIGSTOP for {}; pubsub_ping_interval_ms={PING_MS}, command_timeout_ms={TIMEOUT_MS}: \
         detection bound {} (+{} slack); detected after {} / {} (dead-pubsub metric {:?}); \
         ready again {} / {} after SIGCONT; recovery = SIGCONT to first event published \
         after it, at each client",
        secs(t_cont - t_stop),
        secs(bound),
        secs(TIMER_SLACK),
        opt(da),
        opt(db),
        dead_detected,
        opt(ra),
        opt(rb),
    ));
    report.print();

    for (gw, d) in [(&a, da), (&b, db)] {
        let d = d.unwrap_or_else(|| {
            panic!(
                "{}: frozen Redis never detected\n{}",
                gw.instance_id,
                gw.logs()
            )
        });
        assert!(
            d <= bound + TIMER_SLACK,
            "{}: frozen Redis detected after {}, configured bound {}",
            gw.instance_id,
            secs(d),
            secs(bound)
        );
    }
    for (gw, n) in [&a, &b].iter().zip(&dead_detected) {
        assert!(
            *n >= 1.0,
            "{}: detected, but not by the pub/sub PING (switchboard_pubsub_dead_detected_total \
             = {n})\n{}",
            gw.instance_id,
            gw.logs()
        );
    }
    assert!(
        ra.is_some() && rb.is_some(),
        "not ready again after SIGCONT"
    );
    report.assert_no_loss();
    assert_clients_stayed(&report);
    for home in 0..2 {
        for (l, _) in report.clients_of(home) {
            assert!(l.resyncs.is_empty(), "Redis kept its data: no resync");
        }
    }
    assert_recovered_within(&report, RECOVERY_BOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_publish_burst_loses_nothing_accepted() {
    let _machine = ONE_AT_A_TIME.lock().await;
    let scale = Scale::from_env();
    let redis = RedisServer::start();
    let mut a = gateway_opts(&redis.url(), "gw-a").grace(5).start();
    let b = gateway_opts(&redis.url(), "gw-b").start();
    let projects = scale.project_names("term");
    let fleet = Fleet::start(
        &[a.addr(), b.addr()],
        scale.clients_per_instance,
        &projects,
        &a.secret,
    )
    .await;
    // Everything goes through gw-a while it answers, then through gw-b.
    let mut publisher = Publisher::start(Via::api(&[&a, &b], Some(0)), &projects, &scale);
    tokio::time::sleep(scale.warmup).await;

    let burst = Duration::from_millis(1500);
    publisher.burst(4, burst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = publisher.accepted();
    let t_term = Instant::now();
    a.sigterm();
    let st = wait_exit(&mut a, Duration::from_secs(15)).await;
    let exited = t_term.elapsed();
    tokio::time::sleep(scale.after.saturating_sub(exited)).await;

    let log = publisher.stop().await;
    let caught_up = fleet.wait_caught_up(&log, Duration::from_secs(30)).await;
    let clients = fleet.stop().await;
    let via_a_after: usize = log
        .accepted
        .iter()
        .filter(|e| e.sent_at >= t_term)
        .filter(|e| log.attempts[&e.n].target == Some(0))
        .count();
    let mut report = Report::build(
        "SIGTERM during a publish burst",
        clients,
        &["gw-a (SIGTERM)", "gw-b"],
        &log,
        Some(t_term),
        caught_up.is_some(),
    );
    report.note(scale.describe());
    report.note(format!(
        "burst: 4 unpaced publishers for {} through gw-a; SIGTERM {} into it with {before} \
         events accepted; gw-a accepted {via_a_after} more while draining and exited ({st}) \
         after {}; recovery = SIGTERM to first post-SIGTERM event at each client",
        secs(burst),
        secs(Duration::from_millis(300)),
        secs(exited),
    ));
    report.print();

    assert!(st.success(), "gw-a exit status {st}\n{}", a.logs());
    report.assert_no_loss();
    for (l, _) in report.clients_of(1) {
        assert_eq!(
            l.connects.len(),
            1,
            "a client of gw-b reconnected: {:?}",
            l.closes
        );
        assert!(l.closes.is_empty());
    }
    for (l, _) in report.clients_of(0) {
        assert_eq!(
            l.closes.first(),
            Some(&Some(1012)),
            "a drained client gets close 1012: {:?}",
            l.closes
        );
        assert!(
            l.reconnect_notices >= 1,
            "container.reconnect before the 1012"
        );
        assert!(l.connects.len() >= 2, "never reconnected");
        assert!(
            l.connects[1..].iter().all(|c| c.resumed && c.instance == 1),
            "resumed on gw-b: {:?}",
            l.connects
        );
        assert!(l.resyncs.is_empty());
    }
    assert_eq!(
        report.unacked_published, 0,
        "events were published without the publisher hearing so: a draining instance must \
         answer every request it carried out"
    );
    assert_recovered_within(&report, RECOVERY_BOUND);
}
