//! HTTP API hardening (issue 10 items 2, 3, 7 and 9), attacked the way the repros
//! did, against the real gateway (and a private Redis where Redis is involved):
//! broadcast grants and routing, `.`/`..` as project ids, panicking paths, trickled bodies.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn broadcast(gw: &Gateway, token: &str, body: &Value) -> HttpResponse {
    gw.post_json("/v1/broadcast", Some(token), body).await
}

/// Item 2: a service token broadcasts only where its grant reaches; a global event that names
/// a project goes to that project only and keeps its project_id, from the API and from a raw
/// PUBLISH on `websocket:broadcast` alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_needs_a_grant_for_every_project_it_reaches() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let mut a = gw.client("tenantA").await;
    let mut b = gw.client("tenantB").await;
    // A multi-project connection that follows tenantA (and tenantC), not tenantB.
    let user_token = gw.token("carol", &["tenantA", "tenantC"]);
    let mut u = gw.ws(&format!("/ws/user?token={user_token}"), &[]).await;
    let est = u.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");

    let scoped_a = token(&gw.secret, "svc-a", &["tenantA"], 3600, true);
    let scoped_none = token(&gw.secret, "svc-none", &[], 3600, true);
    let no_claim = token_claims(
        &gw.secret,
        &json!({"sub": "svc", "exp": now_secs() + 3600, "role": "service"}),
    );
    let reconnect = json!({"type": "container.reconnect", "reconnect_after_ms": 0});

    // The repro: a tenantA-scoped (or unscoped) service token reaching everyone.
    for t in [&scoped_a, &scoped_none, &no_claim] {
        let r = broadcast(&gw, t, &reconnect).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert_eq!(r.json()["error"], "forbidden");
    }
    // Naming another tenant's project does not help.
    let mut named_b = reconnect.clone();
    named_b["project_id"] = json!("tenantB");
    let r = broadcast(&gw, &scoped_a, &named_b).await;
    assert_eq!(r.status, 403, "{}", r.text());
    // Nor does a project id that is not one.
    for bad in [json!(".."), json!("a/b"), json!(7), json!("")] {
        let mut ev = reconnect.clone();
        ev["project_id"] = bad;
        let r = broadcast(&gw, &gw.service_token(), &ev).await;
        assert_eq!(r.status, 422, "{ev}: {}", r.text());
        assert_eq!(r.json()["field"], "project_id");
    }

    // Its own project: 202, and only tenantA's followers get it, labelled tenantA.
    let mut named_a =
        json!({"type": "project.deleted", "project_id": "tenantA", "seq": 77, "n": 1});
    let r = broadcast(&gw, &scoped_a, &named_a).await;
    assert_eq!(r.status, 202, "{}", r.text());
    for c in [&mut a, &mut u] {
        let e = c.next_json(T).await;
        assert_eq!(
            (e["type"].as_str(), e["n"].as_u64()),
            (Some("project.deleted"), Some(1))
        );
        assert_eq!(e["project_id"], "tenantA", "{e}");
        assert!(e.get("seq").is_none(), "a broadcast carries no seq: {e}");
    }

    // ["*"]: everyone, each with its own project.
    let r = broadcast(
        &gw,
        &gw.service_token(),
        &json!({"type": "file.changed", "n": 2}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    for (c, p) in [(&mut a, "tenantA"), (&mut b, "tenantB")] {
        let e = c.next_json(T).await;
        assert_eq!(
            (e["n"].as_u64(), e["project_id"].as_str()),
            (Some(2), Some(p)),
            "{e}"
        );
    }
    let e = u.next_json(T).await;
    assert_eq!(e["n"], 2, "{e}");

    // A raw PUBLISH naming tenantB: tenantB's connections only, not relabelled.
    named_a["project_id"] = json!("tenantB");
    named_a["n"] = json!(3);
    assert_eq!(
        redis
            .publish("websocket:broadcast", &named_a.to_string())
            .await,
        1
    );
    let e = b.next_json(T).await;
    assert_eq!(
        (e["n"].as_u64(), e["project_id"].as_str()),
        (Some(3), Some("tenantB")),
        "{e}"
    );
    assert!(e.get("seq").is_none(), "a raw seq is never passed on: {e}");
    a.expect_silence(Duration::from_millis(300)).await;
    u.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(100)).await;
}

/// Item 3 (part): `.` and `..` are not project ids, on every route that takes one.
#[tokio::test]
async fn dot_and_dotdot_are_not_project_ids() {
    let gw = GatewayOpts::new().start();
    let svc = gw.service_token();
    for id in [".", ".."] {
        let t = gw.token("u", &[id]);
        match gw.ws_try(&format!("/ws/{id}?token={t}"), &[]).await {
            Ok(_) => panic!("/ws/{id} connected"),
            Err(r) => assert_eq!(r.status, 400, "/ws/{id}: {r:?}"),
        }
        let r = gw
            .post_json(&format!("/v1/projects/{id}/events"), Some(&svc), &ev(1))
            .await;
        assert_eq!(r.status, 400, "POST /v1/projects/{id}/events: {}", r.text());
        assert_eq!(r.json()["error"], "invalid_project_id");
        let auth = format!("Bearer {svc}");
        let r = gw
            .get_with(
                &format!("/v1/projects/{id}/presence"),
                &[("Authorization", &auth)],
            )
            .await;
        assert_eq!(r.status, 400, "presence {id}: {}", r.text());
        let r = gw.get(&format!("/v1/ws-url/{id}")).await;
        assert_eq!(r.status, 400, "ws-url {id}: {}", r.text());
    }
    // Dots inside a name stay fine.
    assert_eq!(gw.publish("a..b", &ev(1)).await, [1]);
}

/// Item 7: paths that used to panic the handler (string slicing), and a fuzz-ish list of
/// odd ones, get a 4xx JSON answer on a connection that is answered, and the gateway stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_paths_answer_4xx_json_and_never_panic() {
    let gw = GatewayOpts::new().start();
    let long = format!("/v1/projects/{}/events", "a".repeat(8_000));
    let long_ws = format!("/ws/{}", "b".repeat(8_000));
    let cases: Vec<(&str, &str)> = vec![
        ("GET", "/v1/projects/presence"),
        ("POST", "/v1/projects/events"),
        ("GET", "/v1/projects/events"),
        ("POST", "/v1/projects/presence"),
        ("POST", "/v1/projects/"),
        ("GET", "/v1/projects/"),
        ("POST", "/v1/projects//events"),
        ("GET", "/v1/projects//presence"),
        ("POST", "/v1/projects/a/b/events"),
        ("POST", "/v1/projects/%2E%2E/events"),
        ("POST", "/v1/projects/a%2Fb/events"),
        ("POST", "/v1/projects/%/events"),
        ("GET", "/v1/ws-url/"),
        ("GET", "/v1/ws-url/a/b"),
        ("GET", "/v1/ws-url/%00"),
        ("GET", "/v1/"),
        ("GET", "/v1"),
        ("POST", "/v1//broadcast"),
        ("GET", "/v1/broadcast"),
        ("GET", "/ws/"),
        ("GET", "/ws//"),
        ("GET", "/ws/%2E%2E"),
        ("GET", "/ws/a/b"),
        ("POST", "/ws/p"),
        ("GET", "/ws"),
        ("GET", "//"),
        ("DELETE", "/healthz"),
        ("GET", "/healthz/"),
        ("GET", "/%ff%fe"),
        ("GET", "/metrics/x"),
        ("POST", long.as_str()),
        ("GET", long_ws.as_str()),
    ];
    for (method, path) in &cases {
        let body = (*method == "POST").then_some(&b"{\"type\":\"file.changed\"}"[..]);
        let r = http_request(gw.addr(), method, path, &[], body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: no answer ({e})\n{}", gw.logs()));
        let shown: String = path.chars().take(60).collect();
        assert!(
            (400..500).contains(&r.status),
            "{method} {shown}: {} {}",
            r.status,
            r.text()
        );
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {shown}"
        );
        assert!(
            r.json()["error"].is_string(),
            "{method} {shown}: {}",
            r.text()
        );
    }
    assert_eq!(gw.get("/healthz").await.status, 200);
    assert!(
        !gw.logs().contains("panicked"),
        "a handler panicked:\n{}",
        gw.logs()
    );
}

/// Sends the head of a POST with a valid service token, then the body one byte every
/// `every`; returns the status of the answer and when it came.
async fn trickle(gw: &Gateway, path: &str, every: Duration) -> (u16, Value, Duration) {
    let body = ev(1).to_string();
    let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        gw.service_token(),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for b in body.bytes() {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    writer.abort();
    assert!(
        answered.is_ok(),
        "no answer within 20 s to a trickled body on {path}"
    );
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json, took)
}

/// Item 9 (part): a body trickled after valid headers is cut at `api.body_read_timeout_secs`
/// with 408, on the publish API and on broadcast alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_408_at_the_read_timeout() {
    let gw = GatewayOpts::new()
        .cfg("api", "body_read_timeout_secs", "2")
        .start();
    // The whole body would take ~30 s at this pace.
    let every = Duration::from_millis(500);
    let (publish, broadcast) = tokio::join!(
        trickle(&gw, "/v1/projects/p/events", every),
        trickle(&gw, "/v1/broadcast", every)
    );
    for (status, json, took) in [publish, broadcast] {
        assert_eq!(status, 408, "{json}");
        assert_eq!(json["error"], "body_timeout", "{json}");
        assert!(
            took >= Duration::from_millis(1_800) && took < Duration::from_secs(6),
            "answered after {took:?}"
        );
    }
    // A body that arrives in time is unaffected.
    let (status, _, _) = trickle(&gw, "/v1/projects/p/events", Duration::ZERO).await;
    assert_eq!(status, 202);
    assert_eq!(gw.get("/healthz").await.status, 200);
}
