//! Seed 003's story-progress sockets against a running gateway (docs/protocol.md §9), in
//! both broker modes: the seed's own validation gate (connect with `?token=`, receive JSON
//! with `status`, `progress_percent`, `current_step`, send `ping` and get `pong`), the
//! current progress on connect and on `status`, raw `PUBLISH story:{id}` relayed unchanged,
//! invalid progress dropped, the seed's close reasons, the keepalive text `ping`, and the
//! isolation of story sockets from project traffic.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const T: Duration = Duration::from_secs(5);

fn story_token(gw: &Gateway, sub: &str, stories: &[&str]) -> String {
    token_claims(
        &gw.secret,
        &json!({"sub": sub, "exp": now_secs() + 600, "stories": stories}),
    )
}

fn progress(story: &str, status: &str, percent: u64, step: &str) -> Value {
    json!({
        "story_id": story,
        "status": status,
        "progress_percent": percent,
        "current_step": step,
        "updated_at": format!("2026-12-03T10:00:{:02}Z", percent % 60),
    })
}

pub(crate) async fn the_seed_gate(gw: &Gateway) {
    let story = "4f1c2a9e-story";
    // Progress published before anyone connects is what a new socket starts from.
    let first = progress(story, "generating", 40, "Writing chapter 2");
    let r = gw.post_progress(story, &first).await;
    assert_eq!(r.status, 202, "{}", r.text());
    let token = story_token(gw, "user-1", &[story]);
    let mut c = gw
        .ws(&format!("/ws/stories/{story}/progress?token={token}"), &[])
        .await;
    let got: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
    assert_eq!(
        got, first,
        "the current progress, unchanged, with no envelope"
    );
    for field in ["status", "progress_percent", "current_step"] {
        assert!(got.get(field).is_some(), "{field} in {got}");
    }
    c.send_text("ping").await;
    assert_eq!(c.next_text(T).await, "pong");
    // Live progress, then `status` answers the latest.
    let next = progress(story, "synthesizing", 80, "Narration");
    assert_eq!(gw.post_progress(story, &next).await.status, 202);
    let live: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
    assert_eq!(live, next);
    c.send_text("status").await;
    let status: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
    assert_eq!(status, next);
    // Anything else is ignored: no error frame (the next frame is the pong).
    c.send_text(r#"{"type":"node.execute","node_id":"n"}"#)
        .await;
    c.send_text("ping").await;
    assert_eq!(c.next_text(T).await, "pong");
}

#[tokio::test]
async fn seed_gate_embedded() {
    let gw = GatewayOpts::new().start();
    the_seed_gate(&gw).await;
}

#[tokio::test]
async fn seed_gate_redis_and_raw_publish_is_relayed_unchanged() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    the_seed_gate(&gw).await;

    // A Celery worker publishes on story:{id} itself, as the seed's tasks do.
    let story = "raw-story";
    let token = story_token(&gw, "user-1", &[story]);
    let mut c = gw
        .ws(&format!("/ws/stories/{story}/progress?token={token}"), &[])
        .await;
    // One subscription per story on the instance, no pattern subscription.
    assert!(
        eventually(T, || async {
            redis.pubsub_channels("story:*").await == ["story:raw-story"]
        })
        .await,
        "one story:{{id}} subscription"
    );
    assert_eq!(
        redis.command_calls("psubscribe").await,
        0,
        "no pattern subscription"
    );
    let raw = r#"{"story_id": "raw-story", "status": "analyzing", "progress_percent": 5, "current_step": "Reading", "updated_at": "2026-12-03T11:00:00Z"}"#;
    redis.publish("story:raw-story", raw).await;
    assert_eq!(c.next_text(T).await, raw, "byte for byte");
    // Invalid progress is dropped (not relayed); the next valid one arrives.
    for bad in [
        "not json",
        r#"{"status":"done","progress_percent":5}"#,
        r#"{"status":"failed","progress_percent":150}"#,
    ] {
        redis.publish("story:raw-story", bad).await;
    }
    let ok = r#"{"status":"complete","progress_percent":100,"updated_at":"2026-12-03T11:00:09Z"}"#;
    redis.publish("story:raw-story", ok).await;
    assert_eq!(c.next_text(T).await, ok);
    // The relayed progress is stored: a new socket starts from it.
    let mut late = gw
        .ws(&format!("/ws/stories/{story}/progress?token={token}"), &[])
        .await;
    assert!(
        eventually(T, || async {
            let stored: Option<String> = redis::cmd("GET")
                .arg("story:raw-story:progress")
                .query_async(&mut redis.conn().await)
                .await
                .unwrap();
            stored.as_deref() == Some(ok)
        })
        .await,
        "the relayed progress is stored"
    );
    late.send_text("status").await;
    let mut texts = Vec::new();
    while texts.last().map(String::as_str) != Some(ok) {
        texts.push(late.next_text(T).await);
    }
}

#[tokio::test]
async fn bad_credentials_and_other_stories_close_with_the_seeds_reasons() {
    let gw = GatewayOpts::new().start();
    for path in [
        "/ws/stories/s1/progress".to_owned(),
        "/ws/stories/s1/progress?token=not.a.jwt".to_owned(),
    ] {
        let mut c = gw.ws(&path, &[]).await;
        let (texts, close) = close_of(&mut c).await;
        assert!(
            texts.is_empty(),
            "no JSON notice on a story socket: {texts:?}"
        );
        assert_eq!(close, Some((4001, "Invalid token".to_owned())), "{path}");
    }
    let token = story_token(&gw, "user-1", &["s2"]);
    let mut c = gw
        .ws(&format!("/ws/stories/s1/progress?token={token}"), &[])
        .await;
    let (texts, close) = close_of(&mut c).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(close, Some((4003, "Access denied".to_owned())));
    // A project grant is not a story grant (but `projects: ["*"]` is everything).
    let project_only = gw.token("user-1", &["s1"]);
    let mut c = gw
        .ws(
            &format!("/ws/stories/s1/progress?token={project_only}"),
            &[],
        )
        .await;
    assert_eq!(close_of(&mut c).await.1.map(|c| c.0), Some(4003));
    // The API: a user token may not publish progress, a service token must grant the story.
    let user = gw.token("user-1", &["*"]);
    let r = gw
        .post_json(
            "/v1/stories/s1/progress",
            Some(&user),
            &progress("s1", "failed", 1, "x"),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = gw
        .post_progress("s1", &json!({"status": "nope", "progress_percent": 1}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("status"), "{}", r.text());
}

#[tokio::test]
async fn story_sockets_carry_progress_only_and_get_the_keepalive_ping() {
    let gw = GatewayOpts::new()
        .cfg("stories", "keepalive_secs", "1")
        .cfg("ws", "heartbeat_interval_secs", "60")
        .start();
    let token = story_token(&gw, "user-1", &["s1"]);
    let mut c = gw
        .ws(&format!("/ws/stories/s1/progress?token={token}"), &[])
        .await;
    // Project traffic and global events never reach a story socket.
    let project = gw.client("p1").await;
    drop(project);
    let r = gw
        .post_json(
            "/v1/broadcast",
            Some(&gw.service_token()),
            &json!({"type": "system.heartbeat"}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    // After a second of client silence: the seed's text ping, and nothing else.
    assert_eq!(c.next_text(T).await, "ping");
    c.send_text("pong").await;
    assert_eq!(c.next_text(T).await, "ping");
}

/// The seed counts text silence: a client whose only frames are WebSocket control frames
/// (what a browser's automatic pong is) still gets the text `ping`, and its text resets
/// the count.
#[tokio::test]
async fn the_keepalive_counts_text_silence_not_control_frames() {
    let gw = GatewayOpts::new()
        .cfg("stories", "keepalive_secs", "2")
        .start();
    let token = story_token(&gw, "user-1", &["s1"]);
    let mut c = gw
        .ws(&format!("/ws/stories/s1/progress?token={token}"), &[])
        .await;
    let started = std::time::Instant::now();
    let text = loop {
        c.send_ping().await;
        match c.next_frame(Duration::from_millis(300)).await {
            Some(Frame::Text(t)) => break t,
            Some(Frame::Pong) | None => {}
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5), "no text ping");
    };
    assert_eq!(text, "ping");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    // Text from the client: silence starts again.
    c.send_text("status").await;
    let quiet_from = std::time::Instant::now();
    assert_eq!(c.next_text(T).await, "ping");
    assert!(
        quiet_from.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        quiet_from.elapsed()
    );
}

#[tokio::test]
async fn the_user_stories_socket_follows_every_granted_story() {
    let gw = GatewayOpts::new().start();
    let token = story_token(&gw, "user-1", &["a1", "b2"]);
    let mut c = gw.ws(&format!("/ws/user/stories?token={token}"), &[]).await;
    for story in ["a1", "b2", "c3"] {
        let r = gw
            .post_progress(story, &progress(story, "generating", 10, "s"))
            .await;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let mut got = Vec::new();
    for _ in 0..2 {
        let v: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
        got.push(v["story_id"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["a1", "b2"]);
    c.send_text("ping").await;
    assert_eq!(c.next_text(T).await, "pong", "c3 is not this user's story");
}

#[tokio::test]
async fn status_is_authorized_against_the_session_as_it_is_now() {
    let redis = RedisServer::start();
    // The periodic recheck is far away: only the status-time check can stop the read.
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("auth", "session_recheck_secs", "3600")
        .start();
    redis
        .set_session("s1", &json!({"user_id": "ann", "stories": ["st"]}))
        .await;
    let p = progress("st", "generating", 20, "Draft");
    assert_eq!(gw.post_progress("st", &p).await.status, 202);
    let mut c = gw.ws("/ws/stories/st/progress?session=s1", &[]).await;
    let first: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
    assert_eq!(first, p);
    // Narrowed to another story: `status` reads nothing and the socket is closed 4003.
    redis
        .set_session("s1", &json!({"user_id": "ann", "stories": ["other"]}))
        .await;
    c.send_text("status").await;
    let (texts, close) = close_of(&mut c).await;
    assert!(
        texts.is_empty(),
        "no progress after the grant is gone: {texts:?}"
    );
    assert_eq!(close.map(|c| c.0), Some(4003));
}

/// The progress a socket gets on connect is the stored latest one, which a live copy still
/// on its way may equal (a worker's publish stored just before the greeting read it): the
/// socket gets it once, not twice (docs/protocol.md §9, "current progress"; found as a
/// duplicate on `/ws/user/stories`). Here the copy is made deterministic: the progress is
/// stored, the socket connects and gets it, and the same bytes are then published.
#[tokio::test]
async fn the_progress_sent_on_connect_is_not_sent_again_by_its_live_copy() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let story = "copy-story";
    let latest = r#"{"story_id": "copy-story", "status": "analyzing", "progress_percent": 40, "current_step": "Reading", "updated_at": "2026-12-03T11:00:40Z"}"#;
    let _: () = redis::cmd("SET")
        .arg("story:copy-story:progress")
        .arg(latest)
        .query_async(&mut redis.conn().await)
        .await
        .unwrap();
    let token = story_token(&gw, "user-1", &[story]);
    let mut c = gw
        .ws(&format!("/ws/stories/{story}/progress?token={token}"), &[])
        .await;
    assert_eq!(
        c.next_text(T).await,
        latest,
        "the stored progress on connect"
    );
    assert!(
        eventually(T, || async {
            redis.pubsub_channels("story:copy-story").await.len() == 1
        })
        .await
    );
    redis.publish("story:copy-story", latest).await;
    c.expect_silence(Duration::from_millis(500)).await;
    // Only that one copy: the next progress, and a repeat of it, both arrive.
    let next = r#"{"story_id": "copy-story", "status": "analyzing", "progress_percent": 50, "current_step": "Reading", "updated_at": "2026-12-03T11:00:50Z"}"#;
    redis.publish("story:copy-story", next).await;
    assert_eq!(c.next_text(T).await, next);
    redis.publish("story:copy-story", next).await;
    assert_eq!(c.next_text(T).await, next);
}
