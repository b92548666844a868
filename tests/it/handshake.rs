//! Handshake outcomes (docs/protocol.md §2): credentials, 401/403/426 before the upgrade,
//! 4001/4003 after it, project id validation, rate limit, connection caps, Origin,
//! trusted proxies, key types and algorithm confusion.

use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;

async fn expect_refused(
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
    status: u16,
) -> Refused {
    match gw.ws_try(path, headers).await {
        Ok(mut c) => {
            let f = c.next_frame(Duration::from_millis(500)).await;
            panic!("upgrade {path} succeeded, expected HTTP {status}; first frame {f:?}")
        }
        Err(r) => {
            assert_eq!(r.status, status, "upgrade {path}: {r:?}");
            r
        }
    }
}

/// The upgrade completes, then `connection.closed` with `code` and a close frame with `code`.
async fn expect_upgrade_then_close(gw: &Gateway, path: &str, headers: &[(&str, &str)], code: u16) {
    let mut c = gw.ws(path, headers).await;
    let frames = c.expect_closed_with(code, T).await;
    assert!(
        frames.iter().all(|f| f["type"] != "connection.established"),
        "{path}: established before close {code}: {frames:?}"
    );
}

fn retry_after_ok(v: Option<&str>) {
    let v = v.expect("Retry-After header missing");
    let n: u64 = v
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not delta-seconds: {v:?}"));
    assert!(n >= 1, "Retry-After {n}");
}

#[tokio::test]
async fn established_frame_carries_the_contract_fields() {
    let gw = GatewayOpts::new()
        .instance("inst-hs-1")
        .heartbeat(7)
        .start();
    let t = gw.token("user-42", &["proj-a"]);
    let (_c, est) = gw.connect("proj-a", &t).await;
    let client_id = est["client_id"].as_str().expect("client_id string");
    uuid::Uuid::parse_str(client_id).expect("client_id is a UUID");
    assert_eq!(est["project_id"], "proj-a");
    assert_eq!(est["user_id"], "user-42");
    assert_eq!(est["instance_id"], "inst-hs-1");
    assert_eq!(est["seq"], 0, "fresh project has seq 0: {est}");
    assert!(
        est["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "epoch: {est}"
    );
    assert_eq!(est["heartbeat_interval"], 7);
    assert_eq!(est["resumed"], false);
    assert!(
        is_rfc3339_ms_utc(est["timestamp"].as_str().unwrap_or("")),
        "timestamp: {est}"
    );

    // each connection gets its own id
    let (_c2, est2) = gw.connect("proj-a", &t).await;
    assert_ne!(est2["client_id"], est["client_id"]);
    assert_eq!(est2["epoch"], est["epoch"], "same project, same epoch");
}

#[tokio::test]
async fn credentials_bearer_header_and_query_token() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("bob", &["p1"]);
    let auth = format!("Bearer {t}");
    let mut c = gw.ws("/ws/p1", &[("Authorization", &auth)]).await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    assert_eq!(est["user_id"], "bob");

    let mut c = gw.ws(&format!("/ws/p1?token={t}"), &[]).await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");

    // the header wins over the query: a good header with a garbage query token succeeds
    let mut c = gw
        .ws("/ws/p1?token=garbage", &[("Authorization", &auth)])
        .await;
    let est = c.next_json(T).await;
    assert_eq!(
        est["type"], "connection.established",
        "Authorization header must win: {est}"
    );
}

#[tokio::test]
async fn bad_credentials_after_upgrade_close_4001() {
    let gw = GatewayOpts::new().start();
    // none at all
    expect_upgrade_then_close(&gw, "/ws/p1", &[], 4001).await;
    // garbage
    expect_upgrade_then_close(&gw, "/ws/p1?token=not.a.jwt", &[], 4001).await;
    // wrong secret
    let t = token(
        "some-other-secret-entirely-0123456789",
        "eve",
        &["p1"],
        3600,
        false,
    );
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    // expired (leeway 0)
    let t = token(SECRET, "eve", &["p1"], -5, false);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    // alg none
    let t = token_alg_none(&json!({"sub": "eve", "exp": now_secs() + 3600, "projects": ["p1"]}));
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    // no exp
    let t = token_claims(SECRET, &json!({"sub": "eve", "projects": ["p1"]}));
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    // no sub
    let t = token_claims(
        SECRET,
        &json!({"exp": now_secs() + 3600, "projects": ["p1"]}),
    );
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    // bad bearer header
    expect_upgrade_then_close(&gw, "/ws/p1", &[("Authorization", "Bearer nope")], 4001).await;
}

#[tokio::test]
async fn not_granted_after_upgrade_closes_4003() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("carol", &["other"]);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4003).await;
    // a credential without a `projects` claim authenticates but grants nothing
    let t = token_claims(SECRET, &json!({"sub": "carol", "exp": now_secs() + 3600}));
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4003).await;
    let t = gw.token("carol", &[]);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4003).await;
    // the wildcard grants every project
    let t = gw.token("carol", &["*"]);
    let (_c, est) = gw.connect("anything-goes", &t).await;
    assert_eq!(est["project_id"], "anything-goes");
}

#[tokio::test]
async fn plain_get_is_401_403_or_426() {
    let gw = GatewayOpts::new().start();
    let r = gw.get("/ws/p1").await;
    assert_eq!(r.status, 401, "{}", r.text());
    let v = r.json();
    assert!(
        v["error"].is_string() && v["message"].is_string(),
        "401 body: {v}"
    );

    let r = gw.get("/ws/p1?token=garbage").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.json()["error"].is_string());

    let t = gw.token("dave", &["other"]);
    let r = gw.get(&format!("/ws/p1?token={t}")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let v = r.json();
    assert!(
        v["error"].is_string() && v["message"].is_string(),
        "403 body: {v}"
    );

    let t = gw.token("dave", &["p1"]);
    let r = gw.get(&format!("/ws/p1?token={t}")).await;
    assert_eq!(
        r.status,
        426,
        "plain GET with valid credentials: {}",
        r.text()
    );
    let auth = format!("Bearer {t}");
    let r = gw.get_with("/ws/p1", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 426, "{}", r.text());
}

#[tokio::test]
async fn bad_project_id_is_400_before_any_upgrade() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("erin", &["*"]);
    let long = "a".repeat(129);
    for bad in [
        "bad$id",
        "a%20b",
        "semi;colon",
        "quote%22",
        long.as_str(),
        "%C3%A9t%C3%A9",
    ] {
        let path = format!("/ws/{bad}?token={t}");
        let r = expect_refused(&gw, &path, &[], 400).await;
        assert!(!r.body.contains(&t), "400 body echoes the token");
        let r = gw.get(&path).await;
        assert_eq!(r.status, 400, "plain GET {bad}: {}", r.text());
    }
    // the longest and the most varied valid ids pass
    let ok = "A".repeat(128);
    let (_c, est) = gw.connect(&ok, &t).await;
    assert_eq!(est["project_id"], ok.as_str());
    let (_c, est) = gw.connect("Proj_1.2-x", &t).await;
    assert_eq!(est["project_id"], "Proj_1.2-x");
}

#[tokio::test]
async fn handshake_rate_limit_is_429_with_retry_after() {
    let gw = GatewayOpts::new()
        .cfg("server", "handshake_rate_per_sec", "1")
        .cfg("server", "handshake_burst", "3")
        .start();
    let t = gw.token("frank", &["p1"]);
    let mut ok = Vec::new();
    for _ in 0..3 {
        ok.push(gw.connect("p1", &t).await.0);
    }
    let r = expect_refused(&gw, &format!("/ws/p1?token={t}"), &[], 429).await;
    retry_after_ok(r.header("retry-after"));
    // the connections already open are not affected
    for c in ok.iter_mut() {
        c.assert_alive().await;
    }
    // and the bucket refills
    let refilled = eventually(Duration::from_secs(4), || async {
        gw.ws_try(&format!("/ws/p1?token={t}"), &[]).await.is_ok()
    })
    .await;
    assert!(refilled, "handshake bucket never refilled");
}

#[tokio::test]
async fn x_forwarded_for_is_honoured_only_from_trusted_proxies() {
    // trusted: each forwarded client has its own bucket
    let gw = GatewayOpts::new()
        .cfg("server", "handshake_rate_per_sec", "1")
        .cfg("server", "handshake_burst", "1")
        .cfg("server", "trusted_proxies", r#"["127.0.0.1/32"]"#)
        .start();
    let t = gw.token("gina", &["p1"]);
    let path = format!("/ws/p1?token={t}");
    let _a = gw.ws(&path, &[("X-Forwarded-For", "10.0.0.1")]).await;
    let _b = gw.ws(&path, &[("X-Forwarded-For", "10.0.0.2")]).await;
    expect_refused(&gw, &path, &[("X-Forwarded-For", "10.0.0.1")], 429).await;
    drop(gw);

    // untrusted: the header is ignored, everyone is 127.0.0.1
    let gw = GatewayOpts::new()
        .cfg("server", "handshake_rate_per_sec", "1")
        .cfg("server", "handshake_burst", "1")
        .start();
    let _a = gw.ws(&path, &[("X-Forwarded-For", "10.0.0.1")]).await;
    expect_refused(&gw, &path, &[("X-Forwarded-For", "10.0.0.2")], 429).await;
}

#[tokio::test]
async fn global_connection_cap_is_503_with_retry_after() {
    let gw = GatewayOpts::new()
        .cfg("server", "max_connections", "2")
        .start();
    let t = gw.token("hank", &["p1"]);
    let (a, _) = gw.connect("p1", &t).await;
    let (_b, _) = gw.connect("p1", &t).await;
    let r = expect_refused(&gw, &format!("/ws/p1?token={t}"), &[], 503).await;
    retry_after_ok(r.header("retry-after"));
    // a freed slot can be reused
    a.close().await;
    let freed = eventually(Duration::from_secs(3), || async {
        gw.ws_try(&format!("/ws/p1?token={t}"), &[]).await.is_ok()
    })
    .await;
    assert!(freed, "slot not freed after a client left\n{}", gw.logs());
}

#[tokio::test]
async fn per_ip_connection_cap_is_503() {
    let gw = GatewayOpts::new()
        .cfg("server", "max_connections_per_ip", "1")
        .cfg("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
        .start();
    let t = gw.token("ivy", &["p1"]);
    let path = format!("/ws/p1?token={t}");
    let mut a = gw.ws(&path, &[("X-Forwarded-For", "10.1.1.1")]).await;
    assert_eq!(a.next_json(T).await["type"], "connection.established");
    let mut b = gw.ws(&path, &[("X-Forwarded-For", "10.1.1.2")]).await;
    assert_eq!(b.next_json(T).await["type"], "connection.established");
    let r = expect_refused(&gw, &path, &[("X-Forwarded-For", "10.1.1.1")], 503).await;
    retry_after_ok(r.header("retry-after"));
}

#[tokio::test]
async fn origin_must_match_allowed_origins() {
    let gw = GatewayOpts::new()
        .cfg(
            "server",
            "allowed_origins",
            r#"["https://app.example.com"]"#,
        )
        .start();
    let t = gw.token("jack", &["p1"]);
    let path = format!("/ws/p1?token={t}");
    let r = expect_refused(&gw, &path, &[("Origin", "https://evil.example.com")], 403).await;
    assert!(r.status == 403);
    let mut ok = gw.ws(&path, &[("Origin", "https://app.example.com")]).await;
    assert_eq!(ok.next_json(T).await["type"], "connection.established");
    // non-browser clients send no Origin
    let mut ok = gw.ws(&path, &[]).await;
    assert_eq!(ok.next_json(T).await["type"], "connection.established");
}

#[tokio::test]
async fn development_default_allows_any_origin() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("jack", &["p1"]);
    let mut ok = gw
        .ws(
            &format!("/ws/p1?token={t}"),
            &[("Origin", "http://localhost:5173")],
        )
        .await;
    assert_eq!(ok.next_json(T).await["type"], "connection.established");
}

#[tokio::test]
async fn permessage_deflate_is_declined() {
    let gw = GatewayOpts::new().start();
    let t = gw.token("kim", &["p1"]);
    let mut c = gw
        .ws(
            &format!("/ws/p1?token={t}"),
            &[(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            )],
        )
        .await;
    assert!(
        c.response_header("sec-websocket-extensions").is_none(),
        "extension negotiated: {:?}",
        c.response_headers
    );
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    c.assert_alive().await;
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn asym_token(
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    projects: &[&str],
) -> String {
    let claims = json!({"sub": "asym", "exp": now_secs() + 3600, "projects": projects});
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, key).unwrap()
}

#[tokio::test]
async fn rs256_public_key_and_algorithm_confusion_refused() {
    let gw = GatewayOpts::new()
        .secret(None)
        .env(
            "SWITCHBOARD_JWT_PUBLIC_KEY_FILE",
            &fixture("rsa_public.pem"),
        )
        .start();
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap();
    let t = asym_token(jsonwebtoken::Algorithm::RS256, &key, &["p1"]);
    let (_c, est) = gw.connect("p1", &t).await;
    assert_eq!(est["user_id"], "asym");

    // HS256 signed with the public key's bytes as the HMAC secret
    let public = std::fs::read_to_string(fixture("rsa_public.pem")).unwrap();
    let claims = json!({"sub": "asym", "exp": now_secs() + 3600, "projects": ["p1"]});
    let forged = token_claims(&public, &claims);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={forged}"), &[], 4001).await;
    let forged = token_claims(public.trim(), &claims);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={forged}"), &[], 4001).await;
    let none = token_alg_none(&claims);
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={none}"), &[], 4001).await;
}

#[tokio::test]
async fn es256_public_key_accepted() {
    let gw = GatewayOpts::new()
        .secret(None)
        .env("SWITCHBOARD_JWT_PUBLIC_KEY_FILE", &fixture("ec_public.pem"))
        .start();
    let pem = std::fs::read(fixture("ec_private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let t = asym_token(jsonwebtoken::Algorithm::ES256, &key, &["p1"]);
    let (_c, est) = gw.connect("p1", &t).await;
    assert_eq!(est["user_id"], "asym");
    // an RS256 token from another key is refused
    let rsa = std::fs::read(fixture("rsa_private.pem")).unwrap();
    let t = asym_token(
        jsonwebtoken::Algorithm::RS256,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&rsa).unwrap(),
        &["p1"],
    );
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
}

#[tokio::test]
async fn issuer_and_audience_checked_when_configured() {
    let gw = GatewayOpts::new()
        .cfg("auth", "issuer", r#""https://auth.example.com""#)
        .cfg("auth", "audience", r#""switchboard""#)
        .start();
    let base = |iss: &str, aud: &str| {
        token_claims(
            SECRET,
            &json!({"sub": "u", "exp": now_secs() + 3600, "projects": ["p1"], "iss": iss, "aud": aud}),
        )
    };
    let good = base("https://auth.example.com", "switchboard");
    let (_c, _) = gw.connect("p1", &good).await;
    let t = base("https://evil.example.com", "switchboard");
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    let t = base("https://auth.example.com", "other");
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
    let t = gw.token("u", &["p1"]); // neither claim
    expect_upgrade_then_close(&gw, &format!("/ws/p1?token={t}"), &[], 4001).await;
}

#[tokio::test]
async fn redis_sessions_by_cookie_and_query() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let con = redis.conn().await;
    let set = |id: &str, v: Value| {
        let mut con = con.clone();
        let key = format!("session:{id}");
        async move {
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(v.to_string())
                .query_async(&mut con)
                .await
                .unwrap();
        }
    };
    set(
        "s-good",
        json!({"user_id": "sess-user", "projects": ["p1"], "expires_at": now_secs() + 3600}),
    )
    .await;
    set(
        "s-noexp",
        json!({"user_id": "sess-user2", "projects": ["*"]}),
    )
    .await;
    set(
        "s-expired",
        json!({"user_id": "sess-user", "projects": ["p1"], "expires_at": now_secs() - 10}),
    )
    .await;
    set(
        "s-other",
        json!({"user_id": "sess-user", "projects": ["p2"]}),
    )
    .await;

    let mut c = gw.ws("/ws/p1?session=s-good", &[]).await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    assert_eq!(est["user_id"], "sess-user");
    let mut c = gw
        .ws("/ws/p1", &[("Cookie", "theme=dark; session=s-noexp")])
        .await;
    let est = c.next_json(T).await;
    assert_eq!(est["type"], "connection.established", "{est}");
    assert_eq!(est["user_id"], "sess-user2");

    expect_upgrade_then_close(&gw, "/ws/p1?session=s-expired", &[], 4001).await;
    expect_upgrade_then_close(&gw, "/ws/p1?session=s-missing", &[], 4001).await;
    expect_upgrade_then_close(&gw, "/ws/p1?session=s-other", &[], 4003).await;
    // a JWT comes first
    let t = gw.token("jwt-user", &["p1"]);
    let mut c = gw
        .ws(&format!("/ws/p1?token={t}&session=s-good"), &[])
        .await;
    assert_eq!(c.next_json(T).await["user_id"], "jwt-user");

    // a session's expires_at ends the connection with 4004
    set(
        "s-short",
        json!({"user_id": "sess-user", "projects": ["p1"], "expires_at": now_secs() + 2}),
    )
    .await;
    let mut c = gw.ws("/ws/p1?session=s-short", &[]).await;
    assert_eq!(c.next_json(T).await["type"], "connection.established");
    c.expect_closed_with(4004, Duration::from_secs(6)).await;
}

/// Issue 10 item 4: a session store that does not answer (Redis frozen with SIGSTOP, so
/// every GET times out) is not a logout. Before the upgrade: 503 + Retry-After; after the
/// upgrade: `connection.closed` and close 1013 (try again later), never 4001.
#[tokio::test]
async fn session_store_outage_is_503_or_1013_never_4001() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new()
        .redis(redis.url())
        .cfg("redis", "command_timeout_ms", "300")
        // The pub/sub liveness check would turn the broker "down" and answer 503 for every
        // handshake: keep it quiet so the session lookup itself is what fails.
        .cfg("redis", "pubsub_ping_interval_ms", "60000")
        .start();
    redis
        .set_session("s-1", &json!({"user_id": "una", "projects": ["p1"]}))
        .await;
    let mut c = gw.ws("/ws/p1?session=s-1", &[]).await;
    assert_eq!(c.next_json(T).await["type"], "connection.established");

    redis.signal("STOP");
    // A plain request to the handshake route: 503 with Retry-After, not 401.
    let r = gw.get("/ws/p1?session=s-1").await;
    assert_eq!(r.status, 503, "{}", r.text());
    retry_after_ok(r.header("retry-after"));
    assert_eq!(r.json()["error"], "auth_unavailable", "{}", r.text());
    // Likewise by cookie.
    let r = gw.get_with("/ws/p1", &[("Cookie", "session=s-1")]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    // The HTTP API needs a service JWT, which a session never is: a session there is not
    // looked up at all (outage or not), so the answer is 401 at once, not a Redis wait.
    let r = gw
        .post(
            "/v1/projects/p1/events",
            &[
                ("Cookie", "session=s-1"),
                ("Content-Type", "application/json"),
            ],
            json!({"type": "project.updated"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "missing_credentials", "{}", r.text());
    // An upgrade: it completes, then connection.closed and close 1013.
    let mut c2 = gw.ws("/ws/p1?session=s-1", &[]).await;
    let frames = c2.expect_closed_with(1013, T).await;
    assert!(
        frames.iter().all(|f| f["type"] != "connection.established"),
        "{frames:?}"
    );
    let mut c3 = gw.ws("/ws/user", &[("Cookie", "session=s-1")]).await;
    c3.expect_closed_with(1013, T).await;
    // The connection that was already open is not logged out either.
    redis.signal("CONT");
    c.assert_alive().await;
    // And once Redis answers again, the same session connects.
    let mut c4 = gw.ws("/ws/p1?session=s-1", &[]).await;
    assert_eq!(c4.next_json(T).await["type"], "connection.established");
}

/// Issue 10 item 4: routes that need no credential never look one up. `GET
/// /healthz?session=x` cost a Redis GET, with no rate limit.
#[tokio::test]
async fn routes_without_credentials_do_no_session_lookup() {
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let before = redis.command_calls("get").await;
    for path in [
        "/healthz?session=x",
        "/readyz?session=x",
        "/health/websocket?session=x",
        "/metrics?session=x",
        "/console/?session=x",
        "/v1/ws-url/p1?session=x",
        // The API needs a service JWT, which a session never is (red-team finding).
        "/v1/nope?session=x",
        "/v1/projects/p1/presence?session=x",
        "/v1/broadcast?session=x",
    ] {
        for _ in 0..20 {
            let r = gw.get(path).await;
            assert!(r.status < 500, "{path}: {}", r.status);
        }
        let r = gw.get_with(path, &[("Cookie", "session=y")]).await;
        assert!(r.status < 500, "{path}: {}", r.status);
    }
    let r = gw
        .post_json("/v1/projects/p1/events?session=x", None, &ev(1))
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    let after = redis.command_calls("get").await;
    assert_eq!(after, before, "session lookups for routes that need none");
    // The measurement sees a lookup where one is needed.
    let r = gw.get("/ws/p1?session=x").await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(redis.command_calls("get").await, before + 1);
}

/// Unpadded base64url (what JWS uses), for test input only.
fn b64url_decode(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = A.iter().position(|&a| a == c).expect("base64url") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

/// `n - s` for a 32-byte big-endian `s`, with n the order of P-256.
fn p256_negate(s: &[u8]) -> Vec<u8> {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

/// Issue 10: an ES256 signature `(R, S)` and its twin `(R, n - S)` both verify. By default
/// the twin is normalised (the same credential; genuine signers emit high-S half the time,
/// so refusing would refuse them); with `auth.es256_require_low_s` the high-S form is
/// refused: 4001 after the upgrade, 401 before it.
#[tokio::test]
async fn es256_high_s_twin_is_normalised_or_refused_when_required() {
    let pem = std::fs::read(fixture("ec_private.pem")).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let pair = || {
        let t = asym_token(jsonwebtoken::Algorithm::ES256, &key, &["p1"]);
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let sig = b64url_decode(sig);
        assert_eq!(sig.len(), 64);
        let mut twin = sig[..32].to_vec();
        twin.extend(p256_negate(&sig[32..]));
        let twin = format!("{signed}.{}", b64url(&twin));
        // S > n/2 exactly when S > n - S.
        if sig[32..] < p256_negate(&sig[32..])[..] {
            (t, twin)
        } else {
            (twin, t)
        }
    };

    let gw = GatewayOpts::new()
        .secret(None)
        .env("SWITCHBOARD_JWT_PUBLIC_KEY_FILE", &fixture("ec_public.pem"))
        .start();
    let (low, high) = pair();
    for t in [&low, &high] {
        let (_c, est) = gw.connect("p1", t).await;
        assert_eq!(est["user_id"], "asym");
    }
    drop(gw);

    let gw = GatewayOpts::new()
        .secret(None)
        .env("SWITCHBOARD_JWT_PUBLIC_KEY_FILE", &fixture("ec_public.pem"))
        .cfg("auth", "es256_require_low_s", "true")
        .start();
    for _ in 0..4 {
        let (low, high) = pair();
        let (_c, est) = gw.connect("p1", &low).await;
        assert_eq!(est["user_id"], "asym");
        expect_upgrade_then_close(&gw, &format!("/ws/p1?token={high}"), &[], 4001).await;
        let r = gw.get(&format!("/ws/p1?token={high}")).await;
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "invalid_token");
    }
}

/// Issue 10: one malformed X-Forwarded-For entry made the whole chain fall back to the
/// proxy's address, so two clients behind it shared one per-IP quota. Now only that entry
/// is skipped.
#[tokio::test]
async fn malformed_x_forwarded_for_entry_is_skipped_alone() {
    let gw = GatewayOpts::new()
        .cfg("server", "max_connections_per_ip", "1")
        .cfg("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
        .start();
    let t = gw.token("xff", &["p1"]);
    let path = format!("/ws/p1?token={t}");
    let mut a = gw
        .ws(&path, &[("X-Forwarded-For", "garbage, 198.51.100.7")])
        .await;
    assert_eq!(a.next_json(T).await["type"], "connection.established");
    // The entry that was read is the client: its own second connection is refused.
    expect_refused(
        &gw,
        &path,
        &[("X-Forwarded-For", "other-garbage, 198.51.100.7")],
        503,
    )
    .await;
    // A malformed entry written by the proxy itself ends the walk (red-team finding):
    // the client-written address left of it is not a key of its own, the proxy is.
    let mut b = gw
        .ws(&path, &[("X-Forwarded-For", "198.51.100.8, unknown")])
        .await;
    assert_eq!(b.next_json(T).await["type"], "connection.established");
    expect_refused(
        &gw,
        &path,
        &[("X-Forwarded-For", "198.51.100.9, unknown")],
        503,
    )
    .await;
}

/// Issue 10: IPv6 clients are keyed on their /64 (`server.ipv6_prefix_len`) for the
/// handshake rate limit and the per-IP connection cap; with the full address one host had
/// 2^64 quotas. (Forwarded through a trusted proxy: loopback has a single IPv6 address.)
#[tokio::test]
async fn ipv6_clients_share_their_64s_limits() {
    let gw = GatewayOpts::new()
        .cfg("server", "max_connections_per_ip", "1")
        .cfg("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
        .start();
    let t = gw.token("v6", &["p1"]);
    let path = format!("/ws/p1?token={t}");
    let mut a = gw
        .ws(&path, &[("X-Forwarded-For", "2001:db8:1:2::1")])
        .await;
    assert_eq!(a.next_json(T).await["type"], "connection.established");
    let r = expect_refused(
        &gw,
        &path,
        &[("X-Forwarded-For", "2001:db8:1:2:ffff::9")],
        503,
    )
    .await;
    assert_eq!(r.json()["error"], "too_many_connections");
    let mut b = gw
        .ws(&path, &[("X-Forwarded-For", "2001:db8:1:3::1")])
        .await;
    assert_eq!(b.next_json(T).await["type"], "connection.established");
    drop(gw);

    let gw = GatewayOpts::new()
        .cfg("server", "handshake_rate_per_sec", "1")
        .cfg("server", "handshake_burst", "1")
        .cfg("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
        .start();
    let _a = gw.ws(&path, &[("X-Forwarded-For", "2001:db8:9::1")]).await;
    expect_refused(&gw, &path, &[("X-Forwarded-For", "2001:db8:9::2")], 429).await;
    drop(gw);

    // Configurable: /128 keys on the full address again.
    let gw = GatewayOpts::new()
        .cfg("server", "max_connections_per_ip", "1")
        .cfg("server", "ipv6_prefix_len", "128")
        .cfg("server", "trusted_proxies", r#"["127.0.0.0/8"]"#)
        .start();
    let mut a = gw
        .ws(&path, &[("X-Forwarded-For", "2001:db8:1:2::1")])
        .await;
    assert_eq!(a.next_json(T).await["type"], "connection.established");
    let mut b = gw
        .ws(&path, &[("X-Forwarded-For", "2001:db8:1:2::2")])
        .await;
    assert_eq!(b.next_json(T).await["type"], "connection.established");
}
