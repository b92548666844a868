//! The hub against sessions with real outboxes and a recording subscription manager.

use super::*;
use crate::broker::SUB_QUEUE;
use crate::session::outbox::Limits;
use serde_json::Value;

const STRICT: Policy = Policy {
    allow_unknown_types: false,
    max_json_depth: 64,
};

fn hub(subs: Option<mpsc::Sender<SubCommand>>, linger: Duration) -> Arc<Hub> {
    Hub::new(
        subs,
        linger,
        StreamContext {
            tail_len: 100,
            tail_bytes: 1 << 20,
            policy: STRICT,
            metrics: Default::default(),
        },
    )
}

fn session(project: &str) -> Arc<Session> {
    Session::new_for_test(
        project,
        Limits {
            messages: 8,
            bytes: 1 << 16,
        },
    )
}

#[tokio::test]
async fn events_reach_only_their_project() {
    let hub = hub(None, Duration::from_millis(10));
    let a = session("a");
    let b = session("b");
    hub.register(&a);
    hub.register(&b);
    hub.join("a", &a, false).await.unwrap();
    hub.join("b", &b, false).await.unwrap();
    let n = hub.deliver_raw("a", br#"{"type":"file.changed"}"#).unwrap();
    assert!(hub
        .deliver_raw("a", br#"{"type":"node.state.updated","node_id":"n"}"#)
        .is_err());
    assert_eq!(n, 1);
    assert_eq!(a.outbox.len().0, 1);
    assert_eq!(b.outbox.len().0, 0);
    assert!(hub
        .deliver_raw("a", br#"{"type":"x","project_id":"b"}"#)
        .is_err());
    assert_eq!(b.outbox.len().0, 0);
}

/// The JSON payloads queued for `s` (frames are unmasked text frames).
fn queued(s: &Session) -> Vec<Value> {
    let (frames, _) = s.outbox.take_all();
    frames
        .iter()
        .map(|f| {
            let start = match f[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            serde_json::from_slice(&f[start..]).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn global_events_naming_a_project_reach_only_its_followers() {
    let hub = hub(None, Duration::from_millis(10));
    let a = session("a");
    let b = session("b");
    for (s, p) in [(&a, "a"), (&b, "b")] {
        hub.register(s);
        hub.join(p, s, false).await.unwrap();
    }
    // `a` also follows `b` (subscribe): it gets b's event once, labelled b.
    a.add_project("b", 8).unwrap();
    hub.join("b", &a, false).await.unwrap();
    let n = hub
        .broadcast_raw(br#"{"type":"file.changed","project_id":"b","seq":99}"#)
        .unwrap();
    assert_eq!(n, 2);
    for s in [&a, &b] {
        let got = queued(s);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["project_id"], "b");
        assert!(got[0].get("seq").is_none(), "raw seq is never passed on");
    }
    let c = session("c");
    hub.register(&c);
    hub.join("c", &c, false).await.unwrap();
    assert_eq!(
        hub.broadcast_raw(br#"{"type":"file.changed","project_id":"a"}"#)
            .unwrap(),
        1
    );
    assert!(queued(&c).is_empty() && queued(&b).is_empty());
    assert_eq!(queued(&a)[0]["project_id"], "a");
    // Without project_id: everyone, each with its own project.
    assert_eq!(hub.broadcast_raw(br#"{"type":"file.changed"}"#).unwrap(), 3);
    assert_eq!(queued(&c)[0]["project_id"], "c");
    for bad in [
        &br#"{"type":"file.changed","project_id":".."}"#[..],
        br#"{"type":"file.changed","project_id":7}"#,
        br#"{"type":"file.changed","project_id":"a/b"}"#,
    ] {
        assert_eq!(
            hub.broadcast_raw(bad).unwrap_err(),
            event::EventError::BadProjectId
        );
    }
}

#[tokio::test]
async fn a_full_subscription_queue_fails_a_join_at_once() {
    // A manager that never reads (stuck reconnecting): the queue holds one request.
    let (tx, _rx) = mpsc::channel(1);
    let hub = hub(Some(tx), Duration::from_millis(10));
    let (a, b) = (session("p"), session("q"));
    let waiting = tokio::time::timeout(Duration::from_millis(100), hub.join("p", &a, false)).await;
    assert!(
        waiting.is_err(),
        "the first join waits for its confirmation"
    );
    let failed = tokio::time::timeout(Duration::from_millis(100), hub.join("q", &b, false)).await;
    assert!(matches!(failed, Ok(Err(HubError::SubscribeFailed))));
    assert!(hub.project_sessions("q").is_empty());
}

/// The hub's whole conversation with the subscription manager, in order: every join
/// asks (Subscribe is idempotent: the manager's `wanted` set makes it one Redis
/// SUBSCRIBE, and each join waits for its own confirmation), and the last leave
/// unsubscribes exactly once, after the linger, unless someone rejoined meanwhile.
#[tokio::test]
async fn subscription_is_reference_counted_with_linger() {
    const LINGER: Duration = Duration::from_millis(300);
    const SUB: &str = "+project:p:events";
    const UNSUB: &str = "-project:p:events";
    let (tx, mut rx) = mpsc::channel(SUB_QUEUE);
    let hub = hub(Some(tx), LINGER);
    let log = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let recorder = log.clone();
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                SubCommand::Subscribe { channel, done } => {
                    recorder.lock().push(format!("+{channel}"));
                    let _ = done.send(true);
                }
                SubCommand::Unsubscribe { channel } => {
                    recorder.lock().push(format!("-{channel}"));
                }
            }
        }
    });
    let commands = || log.lock().clone();
    // Past a linger: long enough for a wrong unsubscribe to show.
    let window = || tokio::time::sleep(LINGER * 3 / 2);

    let a = session("p");
    let b = session("p");
    hub.join("p", &a, false).await.unwrap();
    hub.join("p", &b, false).await.unwrap();
    assert_eq!(commands(), [SUB, SUB]);

    // One of two leaves: no unsubscribe, however long we wait.
    hub.leave("p", &a);
    window().await;
    assert_eq!(commands(), [SUB, SUB], "unsubscribed while b remains");
    assert_eq!(hub.project_count(), 1);

    // The last one leaves and a session rejoins within the linger: nothing is dropped.
    hub.leave("p", &b);
    hub.join("p", &a, false).await.unwrap();
    window().await;
    assert_eq!(
        commands(),
        [SUB, SUB, SUB],
        "a rejoin within the linger must cancel the unsubscribe"
    );
    assert_eq!(hub.project_count(), 1);

    // The last one leaves, comes back and leaves again: the linger counts from the last
    // leave (the first one's timer must not fire for it), and exactly one unsubscribe
    // follows.
    hub.leave("p", &a);
    tokio::time::sleep(LINGER / 10).await;
    hub.join("p", &a, false).await.unwrap();
    let left = std::time::Instant::now();
    hub.leave("p", &a);
    let deadline = left + Duration::from_secs(5);
    while commands().len() < 5 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        left.elapsed() >= LINGER,
        "unsubscribed {:?} after the last leave, before the linger",
        left.elapsed()
    );
    window().await;
    assert_eq!(commands(), [SUB, SUB, SUB, SUB, UNSUB]);
    assert_eq!(hub.project_count(), 0);
    assert!(hub.active_projects().is_empty());
}

#[tokio::test]
async fn a_holding_member_gets_the_greeting_first_and_no_covered_copies() {
    let hub = hub(None, Duration::from_millis(10));
    let s = session("p");
    s.hold();
    hub.join("p", &s, true).await.unwrap();
    s.add_project("q", usize::MAX).unwrap();
    hub.join("q", &s, true).await.unwrap();
    let ev = |p: &str, seq: u64| {
        let raw = format!(r#"{{"type":"file.changed","project_id":"{p}","seq":{seq}}}"#);
        event::prepare_project_event(p, raw.as_bytes(), Some(&STRICT)).unwrap()
    };
    // Live events while the greeting is prepared: held, nothing reaches the outbox.
    hub.deliver_batch("p", &[ev("p", 6), ev("p", 7)]);
    hub.deliver("q", &ev("q", 2));
    assert_eq!(s.outbox.len().0, 0);
    // The greeting covered p up to 8 (a replay): p's held events are dropped, q's kept.
    let hello = event::server_frame(&serde_json::json!({"type": "connection.established"}));
    hub.release(&s, vec![hello], |p| if p == "p" { 8 } else { 0 });
    let got = queued(&s);
    assert_eq!(got[0]["type"], "connection.established", "{got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[1]["project_id"].as_str(), got[1]["seq"].as_u64()),
        (Some("q"), Some(2))
    );
    // Late live copies of covered events are dropped, one by one, until a newer one.
    hub.deliver_batch("p", &[ev("p", 7), ev("p", 8), ev("p", 9), ev("p", 10)]);
    let seqs: Vec<_> = queued(&s).iter().map(|v| v["seq"].as_u64()).collect();
    assert_eq!(seqs, [Some(9), Some(10)]);
    // The check ended with seq 9: a restarted seq (new epoch) is not suppressed.
    hub.deliver("p", &ev("p", 1));
    assert_eq!(queued(&s).len(), 1);
}

#[tokio::test]
async fn overflow_closes_the_slow_session_only() {
    let hub = hub(None, Duration::from_millis(10));
    let slow = session("p");
    let ok = Session::new_for_test(
        "p",
        Limits {
            messages: 1000,
            bytes: 1 << 20,
        },
    );
    hub.join("p", &slow, false).await.unwrap();
    hub.join("p", &ok, false).await.unwrap();
    for i in 0..20 {
        let ev = format!(r#"{{"type":"file.changed","n":{i}}}"#);
        hub.deliver_raw("p", ev.as_bytes()).unwrap();
    }
    assert!(slow.outbox.is_closing());
    assert!(!ok.outbox.is_closing());
    assert_eq!(ok.outbox.len().0, 20);
    assert_eq!(hub.stats.slow_closes.load(Ordering::Relaxed), 1);
}

/// With two worker threads the hub runs two fan-out shards (issue 13): every member still
/// gets every event once, in admission order, and the frames are the same bytes (encoded
/// once, shared by both shards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_deliver_every_event_once_in_order() {
    let hub = hub(None, Duration::from_millis(10));
    assert_eq!(hub.shards.count(), 2);
    let members: Vec<_> = (0..64)
        .map(|_| {
            Session::new_for_test(
                "a",
                Limits {
                    messages: 10_000,
                    bytes: 16 << 20,
                },
            )
        })
        .collect();
    for m in &members {
        hub.register(m);
        hub.join("a", m, false).await.unwrap();
    }
    let on_shard = |k| members.iter().filter(|m| shard::of(m, 2) == k).count();
    assert!(
        on_shard(0) > 0 && on_shard(1) > 0,
        "both shards have members"
    );
    let mut seq = 0u64;
    for batch in 0..100 {
        let events: Vec<Prepared> = (0..1 + batch % 3)
            .map(|_| {
                seq += 1;
                let body = format!(r#"{{"type":"file.changed","seq":{seq}}}"#);
                event::prepare_project_event("a", body.as_bytes(), Some(&STRICT)).unwrap()
            })
            .collect();
        assert_eq!(
            hub.deliver_batch("a", &events),
            members.len() * events.len()
        );
    }
    hub.settled().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while hub.shard_backlog() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(hub.shard_backlog(), 0);
    for m in &members {
        let seqs: Vec<u64> = queued(m)
            .iter()
            .map(|v| v["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=seq).collect::<Vec<_>>());
    }
}

/// A global event for more than `INLINE_MAX` sessions is offered on the broadcast task in
/// slices, not in one go (issue 13); a later small one waits behind it, so every session
/// gets global events in their order.
#[tokio::test]
async fn a_large_broadcast_runs_in_slices_and_keeps_global_order() {
    let hub = hub(None, Duration::from_millis(10));
    let sessions: Vec<_> = (0..1500)
        .map(|i| {
            let s = session(&format!("p{}", i % 7));
            hub.register(&s);
            s
        })
        .collect();
    let event = |kind: &str| {
        serde_json::from_str::<serde_json::Map<String, Value>>(&format!(
            r#"{{"type":"container.reconnect","reason":"{kind}"}}"#
        ))
        .unwrap()
    };
    assert_eq!(hub.broadcast(&event("first")), 1500);
    // Queued, not offered inline: nothing is in any outbox before the task runs.
    assert!(sessions.iter().all(|s| s.outbox.len().0 == 0));
    assert_eq!(hub.broadcast(&event("second")), 1500);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sessions.iter().any(|s| s.outbox.len().0 < 2) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for s in &sessions {
        let reasons: Vec<Value> = queued(s).iter().map(|v| v["reason"].clone()).collect();
        assert_eq!(reasons, vec![Value::from("first"), Value::from("second")]);
    }
}

/// A story has no seq: its greeting sends the stored latest progress, which a live copy
/// still on its way may equal. That copy is dropped, held or arriving after the release,
/// once; a different frame ends the check (found as a duplicate frame on
/// `/ws/user/stories` in tests/it/hook.rs).
#[tokio::test]
async fn a_story_greeting_is_not_followed_by_a_copy_of_its_progress() {
    let hub = hub(None, Duration::from_millis(10));
    let claims = switchboard_middleware::Claims {
        sub: "u".into(),
        projects: Vec::new(),
        stories: vec!["s1".into()].into_boxed_slice(),
        role: None,
        exp: None,
        kind: switchboard_middleware::CredentialKind::Jwt,
    };
    let story = |holding: bool| {
        let s = Session::new(
            uuid::Uuid::new_v4().to_string(),
            Arc::new(claims.clone()),
            crate::session::Scope::UserStories,
            vec!["s1".into()],
            std::net::IpAddr::from([127, 0, 0, 1]),
            None,
            Limits {
                messages: 8,
                bytes: 1 << 16,
            },
        );
        if holding {
            s.hold();
        }
        s
    };
    let frame = |p: u64| {
        crate::ws::frame::text(format!(r#"{{"story_id":"s1","progress_percent":{p}}}"#).as_bytes())
    };
    let percents = |s: &Session| -> Vec<Value> {
        queued(s)
            .iter()
            .map(|v| v["progress_percent"].clone())
            .collect()
    };

    // The copy was held while the greeting read the stored progress.
    let a = story(true);
    hub.register(&a);
    hub.join_in(Family::Story, "s1", &a, true).await.unwrap();
    hub.deliver_story("s1", &frame(5));
    hub.release(&a, vec![frame(5)], |_| Hub::story_sent(&frame(5)));
    hub.deliver_story("s1", &frame(6));
    hub.deliver_story("s1", &frame(6));
    assert_eq!(percents(&a), [5, 6, 6]);

    // The copy arrives after the release.
    let b = story(true);
    hub.register(&b);
    hub.join_in(Family::Story, "s1", &b, true).await.unwrap();
    hub.release(&b, vec![frame(7)], |_| Hub::story_sent(&frame(7)));
    hub.deliver_story("s1", &frame(7));
    hub.deliver_story("s1", &frame(8));
    assert_eq!(percents(&b), [7, 8]);

    // No progress in the greeting: nothing is dropped.
    let c = story(true);
    hub.register(&c);
    hub.join_in(Family::Story, "s1", &c, true).await.unwrap();
    hub.deliver_story("s1", &frame(9));
    hub.release(&c, Vec::new(), |_| 0);
    hub.deliver_story("s1", &frame(9));
    assert_eq!(percents(&c), [9, 9]);
}

/// The broadcast task's queue is bounded: a flood of global events for many sessions (a
/// publisher on `websocket:broadcast`) makes the producer wait in `settled` (the broker's
/// reader awaits it) instead of queueing session snapshots without end.
#[tokio::test]
async fn a_flood_of_large_broadcasts_holds_the_producer() {
    let hub = hub(None, Duration::from_millis(10));
    let sessions: Vec<_> = (0..1100)
        .map(|_| {
            let s = Session::new_for_test(
                "p",
                Limits {
                    messages: 1000,
                    bytes: 1 << 20,
                },
            );
            hub.register(&s);
            s
        })
        .collect();
    let event: serde_json::Map<String, Value> =
        serde_json::from_str(r#"{"type":"container.reconnect"}"#).unwrap();
    for _ in 0..=global::MAX_QUEUED {
        hub.broadcast(&event);
    }
    let wait = hub.settled();
    tokio::pin!(wait);
    assert!(
        futures_util::poll!(wait.as_mut()).is_pending(),
        "past the queue's bound the producer waits"
    );
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("settled once the task worked the queue down");
    assert!(sessions
        .iter()
        .all(|s| s.outbox.len().0 >= global::MAX_QUEUED / 2));
}
