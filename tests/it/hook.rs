//! The authorization hook (docs/protocol.md §10) against a running gateway and a stand-in
//! app backend ([`HookBackend`]): Code Story's tokens carry only `sub`, so the backend
//! decides story ownership; projects without a claim ask it too. Covered: allow and deny
//! (4003 `Access denied`), lists for `/ws/user/stories` and `/ws/user` with isolation
//! between users, the cache, a failing or stalled hook closing 1013 (never a denial) and
//! counted, the hook never asked for a request the caps refused, actions on hook-granted
//! projects, the session recheck keeping hook-granted connections, and embedded mode.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::hook::{HookBackend, HookMode, HOOK_SECRET};
use crate::common::*;

fn with_hook(opts: GatewayOpts, hook: &HookBackend) -> GatewayOpts {
    opts.cfg("auth", "hook_url", &format!("{:?}", hook.url))
        .cfg("auth", "hook_secret", &format!("{HOOK_SECRET:?}"))
        .cfg("auth", "hook_timeout_ms", "500")
}

/// A Code Story token: only `sub` (and `exp`).
fn sub_only(gw: &Gateway, sub: &str) -> String {
    token_claims(&gw.secret, &json!({"sub": sub, "exp": now_secs() + 600}))
}

fn progress(story: &str, percent: u64) -> Value {
    json!({
        "story_id": story,
        "status": "generating",
        "progress_percent": percent,
        "current_step": format!("step {percent}"),
    })
}

async fn post_progress(gw: &Gateway, story: &str, body: &Value) {
    let r = gw.post_progress(story, body).await;
    assert_eq!(r.status, 202, "{}", r.text());
}

async fn story_owner_flow(gw: &Gateway, hook: &HookBackend) {
    hook.own("alice", "story", "s-alice");
    hook.own("bob", "story", "s-bob");
    let alice = sub_only(gw, "alice");
    // Her story: allowed by the backend, progress flows, ping/pong works.
    let mut c = gw
        .ws(&format!("/ws/stories/s-alice/progress?token={alice}"), &[])
        .await;
    post_progress(gw, "s-alice", &progress("s-alice", 10)).await;
    let got: Value = serde_json::from_str(&c.next_text(T).await).unwrap();
    assert_eq!(got, progress("s-alice", 10));
    c.send_text("ping").await;
    assert_eq!(c.next_text(T).await, "pong");
    // Bob's story: denied with the seed's reason.
    let mut other = gw
        .ws(&format!("/ws/stories/s-bob/progress?token={alice}"), &[])
        .await;
    let (texts, close) = close_of(&mut other).await;
    assert!(texts.is_empty(), "{texts:?}");
    assert_eq!(close, Some((4003, "Access denied".to_owned())));
    let asked = hook.asked();
    assert_eq!(
        asked[0],
        json!({"action": "subscribe", "user_id": "alice", "kind": "story", "id": "s-alice"})
    );
    assert_eq!(hook.bad_auth(), 0, "the bearer secret was sent");

    // The dashboard socket: each user gets their own stories only.
    hook.own("alice", "story", "s-alice-2");
    let bob = sub_only(gw, "bob");
    let mut dash_a = gw.ws(&format!("/ws/user/stories?token={alice}"), &[]).await;
    let mut dash_b = gw.ws(&format!("/ws/user/stories?token={bob}"), &[]).await;
    // Greeting: the current progress of s-alice (s-alice-2 has none yet).
    let first: Value = serde_json::from_str(&dash_a.next_text(T).await).unwrap();
    assert_eq!(first["story_id"], "s-alice");
    post_progress(gw, "s-bob", &progress("s-bob", 5)).await;
    post_progress(gw, "s-alice-2", &progress("s-alice-2", 7)).await;
    let b: Value = serde_json::from_str(&dash_b.next_text(T).await).unwrap();
    assert_eq!(b["story_id"], "s-bob");
    let a: Value = serde_json::from_str(&dash_a.next_text(T).await).unwrap();
    assert_eq!(a["story_id"], "s-alice-2", "alice never sees bob's story");
    dash_a.expect_silence(Duration::from_millis(300)).await;
    dash_b.expect_silence(Duration::from_millis(300)).await;
    assert!(hook
        .asked()
        .contains(&json!({"action": "list", "user_id": "bob", "kind": "story"})));
}

#[tokio::test]
async fn story_owners_are_decided_by_the_backend_in_redis_mode() {
    let redis = RedisServer::start();
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new().redis(redis.url()), &hook).start();
    story_owner_flow(&gw, &hook).await;
}

#[tokio::test]
async fn story_owners_are_decided_by_the_backend_in_embedded_mode() {
    let hook = HookBackend::start().await;
    // The URL from the environment, as a deployment sets it.
    let gw = GatewayOpts::new()
        .env("SWITCHBOARD_AUTH_HOOK_URL", &hook.url)
        .env("SWITCHBOARD_AUTH_HOOK_SECRET", HOOK_SECRET)
        .start();
    story_owner_flow(&gw, &hook).await;
}

#[tokio::test]
async fn answers_are_cached_for_the_ttl_allow_and_deny_alike() {
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new(), &hook)
        .cfg("auth", "hook_cache_secs", "2")
        .start();
    hook.own("carol", "story", "mine");
    let carol = sub_only(&gw, "carol");
    for _ in 0..3 {
        let mut c = gw
            .ws(&format!("/ws/stories/mine/progress?token={carol}"), &[])
            .await;
        c.send_text("ping").await;
        assert_eq!(c.next_text(T).await, "pong");
        let mut d = gw
            .ws(&format!("/ws/stories/theirs/progress?token={carol}"), &[])
            .await;
        assert_eq!(close_of(&mut d).await.1.map(|c| c.0), Some(4003));
    }
    assert_eq!(hook.calls(), 2, "one question each, then the cache");
    // Past the TTL the backend is asked again, and its new answer counts.
    hook.disown("carol", "story", "mine");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut c = gw
        .ws(&format!("/ws/stories/mine/progress?token={carol}"), &[])
        .await;
    assert_eq!(close_of(&mut c).await.1.map(|c| c.0), Some(4003));
    assert_eq!(hook.calls(), 3);
}

#[tokio::test]
async fn a_failing_or_stalled_hook_closes_1013_never_a_denial_and_is_counted() {
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new(), &hook)
        .cfg("auth", "hook_cache_secs", "0")
        .start();
    hook.own("dan", "story", "s1");
    hook.own("dan", "project", "p1");
    let dan = sub_only(&gw, "dan");
    for mode in [HookMode::Failing, HookMode::Stalled] {
        hook.set_mode(mode);
        let mut c = gw
            .ws(&format!("/ws/stories/s1/progress?token={dan}"), &[])
            .await;
        let close = close_of(&mut c).await.1.map(|c| c.0);
        assert_eq!(close, Some(1013), "{mode:?}");
        let mut c = gw.ws(&format!("/ws/p1?token={dan}"), &[]).await;
        let seen = c.expect_closed_with(1013, T).await;
        assert_eq!(seen.last().unwrap()["reason"], "authorization_unavailable");
    }
    // Nothing listening at all.
    drop(hook);
    let mut c = gw.ws(&format!("/ws/p1?token={dan}"), &[]).await;
    c.expect_closed_with(1013, T).await;
    let failures = gw.metric("switchboard_auth_hook_failures_total").await;
    assert_eq!(failures, Some(5.0), "{}", gw.get("/metrics").await.text());
    let text = gw.get("/metrics").await.text();
    assert!(
        text.contains(r#"switchboard_auth_hook_failures_total{reason="timeout"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"switchboard_handshakes_total{result="auth_unavailable",kind="story"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn the_hook_is_not_asked_for_a_request_the_caps_refused() {
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new(), &hook)
        .cfg("server", "max_connections_per_ip", "1")
        .start();
    hook.own("erin", "project", "p1");
    let erin = sub_only(&gw, "erin");
    let mut first = gw.ws(&format!("/ws/p1?token={erin}"), &[]).await;
    first.next_of_type("connection.established", T).await;
    assert_eq!(hook.calls(), 1);
    let refused = gw.ws_try(&format!("/ws/p2?token={erin}"), &[]).await;
    assert_eq!(refused.err().map(|r| r.status), Some(503));
    // And a plain GET (no upgrade) is not worth a question either.
    let r = gw.get(&format!("/ws/p2?token={erin}")).await;
    assert_eq!(r.status, 426, "{}", r.text());
    assert_eq!(hook.calls(), 1);
}

#[tokio::test]
async fn projects_without_a_claim_ask_the_hook_for_connections_and_actions() {
    let redis = RedisServer::start();
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new().redis(redis.url()), &hook).start();
    hook.own("fay", "project", "p1");
    hook.own("fay", "project", "p2");
    let fay = sub_only(&gw, "fay");
    let mut worker = redis.subscribe("project:p1:commands").await;
    let (mut c, _) = gw.connect("p1", &fay).await;
    c.send_json(&json!({"type": "node.execute", "node_id": "n1"}))
        .await;
    assert_eq!(
        c.next_of_type("command.accepted", T).await["delivered_to"],
        1
    );
    assert_eq!(worker.next_json(T).await["node_id"], "n1");
    c.send_json(&json!({"type": "subscribe", "project_id": "p2"}))
        .await;
    c.next_of_type("subscribed", T).await;
    c.send_json(&json!({"type": "subscribe", "project_id": "p3"}))
        .await;
    let e = c.next_of_type("error", T).await;
    assert_eq!(e["code"], "forbidden", "{e}");
    // A claim that names other projects still lets the hook decide this one.
    let claimed = gw.token("fay", &["elsewhere"]);
    let (mut d, _) = gw.connect("p1", &claimed).await;
    d.send_json(&json!({"type": "ping"})).await;
    d.next_of_type("pong", T).await;
    // Not hers: 4003.
    let mut x = gw.ws(&format!("/ws/p9?token={fay}"), &[]).await;
    x.expect_closed_with(4003, T).await;
    // /ws/user follows the hook's list when the credential names no project.
    let mut u = gw.ws(&format!("/ws/user?token={fay}"), &[]).await;
    let est = u.next_of_type("connection.established", T).await;
    assert_eq!(est["projects"], json!(["p1", "p2"]), "{est}");
    // The hook failing for an action: the action is not taken, the connection stays.
    hook.set_mode(HookMode::Failing);
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.send_json(&json!({"type": "subscribe", "project_id": "p4"}))
        .await;
    let e = c.next_of_type("error", T).await;
    assert_eq!(e["code"], "authorization_unavailable", "{e}");
    c.send_json(&json!({"type": "ping"})).await;
    c.next_of_type("pong", T).await;
}

#[tokio::test]
async fn the_session_recheck_keeps_what_the_hook_granted_and_drops_what_it_no_longer_does() {
    let redis = RedisServer::start();
    let hook = HookBackend::start().await;
    let gw = with_hook(GatewayOpts::new().redis(redis.url()), &hook)
        .cfg("auth", "session_recheck_secs", "1")
        .cfg("auth", "hook_cache_secs", "1")
        .start();
    hook.own("gus", "project", "p1");
    redis
        .set_session("sess-gus", &json!({"user_id": "gus", "projects": []}))
        .await;
    let mut c = gw.ws("/ws/p1?session=sess-gus", &[]).await;
    c.next_of_type("connection.established", T).await;
    // Several rechecks pass: a session that never named p1 does not narrow a hook grant.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    c.send_json(&json!({"type": "ping"})).await;
    c.next_of_type("pong", T).await;
    // The backend takes p1 away: the next recheck (after the cache) closes 4003.
    hook.disown("gus", "project", "p1");
    c.expect_closed_with(4003, Duration::from_secs(5)).await;
}
