//! The command line (issue 2 item 2, docs/protocol.md §1, §6, §8): `serve` output, `check-config`,
//! `token`, `publish`, development conveniences and production safety.

use crate::common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn first_stdout_line_is_the_listening_address() {
    let gw = GatewayOpts::new().start();
    assert_eq!(
        gw.first_stdout_line,
        format!("switchboard listening on {}", gw.addr())
    );
    assert_ne!(gw.addr().port(), 0);
    assert_eq!(gw.get("/healthz").await.status, 200);
}

#[tokio::test]
async fn serve_is_the_default_subcommand() {
    let gw = GatewayOpts::new().subcommand(None).start();
    assert_eq!(gw.get("/healthz").await.status, 200);
}

fn write_temp(name: &str, contents: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "switchboard-cli-{}-{}",
        std::process::id(),
        unique(name)
    ));
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let cfg = write_temp(
        "cfg.toml",
        r#"
[server]
max_connections = 4321

[redis]
url = "redis://:hunter2pass@127.0.0.1:6390/0"

[auth]
jwt_secret = "toml-secret-value-1234567890"
"#,
    );
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "check-config failed: {st:?}\n{out}\n{err}");
    let all = format!("{out}{err}");
    assert!(
        !all.contains("toml-secret-value-1234567890"),
        "secret printed:\n{all}"
    );
    assert!(
        !all.contains("hunter2pass"),
        "Redis password printed:\n{all}"
    );
    assert!(
        out.contains("127.0.0.1:6390"),
        "effective Redis address missing:\n{out}"
    );
    assert!(
        out.contains("4321"),
        "effective max_connections missing:\n{out}"
    );

    // environment variables win over the file, and are redacted too
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .env("ENVIRONMENT", "development")
        .env("SWITCHBOARD_JWT_SECRET", "env-secret-value-abcdefghijkl")
        .env(
            "REDIS_URL",
            "redis://someuser:pw-in-env-xyz@127.0.0.1:6391/2",
        )
        .env("WS_HEARTBEAT_INTERVAL", "17");
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "{st:?}\n{out}\n{err}");
    let all = format!("{out}{err}");
    assert!(
        !all.contains("env-secret-value-abcdefghijkl"),
        "secret printed:\n{all}"
    );
    assert!(
        !all.contains("pw-in-env-xyz"),
        "Redis password printed:\n{all}"
    );
    assert!(
        out.contains("127.0.0.1:6391"),
        "REDIS_URL not applied:\n{out}"
    );
    assert!(
        out.contains("17"),
        "WS_HEARTBEAT_INTERVAL not applied:\n{out}"
    );
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn check_config_fails_on_invalid_config() {
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .env("ENVIRONMENT", "staging-ish")
        .env("SWITCHBOARD_JWT_SECRET", SECRET);
    let (st, out, err) = run_cli(cmd, None);
    assert!(!st.success(), "unknown ENVIRONMENT accepted:\n{out}\n{err}");

    let bad = write_temp("bad.toml", "[server\nmax_connections = ");
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&bad)
        .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(!st.success(), "invalid TOML accepted:\n{out}\n{err}");
    let _ = std::fs::remove_file(bad);

    let typed = write_temp("typed.toml", "[ws]\nheartbeat_interval_secs = \"often\"\n");
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(&typed)
        .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(!st.success(), "ill-typed value accepted:\n{out}\n{err}");
    let _ = std::fs::remove_file(typed);

    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .env("ENVIRONMENT", "development")
        .env("SWITCHBOARD_JWT_SECRET", SECRET);
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "defaults are valid:\n{out}\n{err}");
}

fn decode(secret: &str, token: &str) -> Value {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.validate_aud = false;
    v.set_required_spec_claims(&["exp", "sub"]);
    jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &v,
    )
    .unwrap_or_else(|e| panic!("token does not verify with the configured secret: {e}: {token}"))
    .claims
}

fn minted(out: &str) -> String {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .expect("token output")
        .to_string()
}

#[tokio::test]
async fn token_subcommand_mints_a_verifiable_token() {
    let mut cmd = switchboard_cmd();
    cmd.args([
        "token",
        "--sub",
        "alice",
        "--project",
        "tp1",
        "--project",
        "tp2",
        "--ttl",
        "120",
    ])
    .env("SWITCHBOARD_JWT_SECRET", SECRET)
    .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "{st:?}\n{out}\n{err}");
    let tok = minted(&out);
    let claims = decode(SECRET, &tok);
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["projects"], json!(["tp1", "tp2"]));
    let exp = claims["exp"].as_i64().unwrap();
    assert!((exp - now_secs() - 120).abs() <= 5, "exp {exp} vs ttl 120");
    assert!(
        claims.get("role").is_none() || claims["role"] != "service",
        "{claims}"
    );

    // the token opens a session on a gateway with the same secret
    let gw = GatewayOpts::new().start();
    let (_c, est) = gw.connect("tp2", &tok).await;
    assert_eq!(est["user_id"], "alice");

    let mut cmd = switchboard_cmd();
    cmd.args([
        "token",
        "--sub",
        "worker-1",
        "--project",
        "tp1",
        "--service",
    ])
    .env("SWITCHBOARD_JWT_SECRET", SECRET)
    .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "{st:?}\n{out}\n{err}");
    let svc = minted(&out);
    assert_eq!(decode(SECRET, &svc)["role"], "service");
    let r = gw
        .post_json("/v1/projects/tp1/events", Some(&svc), &ev(1))
        .await;
    assert_eq!(r.status, 202, "a --service token publishes: {}", r.text());
}

#[tokio::test]
async fn publish_subcommand_end_to_end() {
    let gw = GatewayOpts::new().start();
    let mut c = gw.client("clipub").await;
    let url = format!("http://{}", gw.addr());

    let mut cmd = switchboard_cmd();
    cmd.args(["publish", "--url", &url, "--project", "clipub", "--event"])
        .arg(
            json!({"type": "task.started", "task_id": "t1", "node_id": "n1", "runner_id": "r1"})
                .to_string(),
        )
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(st.success(), "{st:?}\n{out}\n{err}");
    let e = c.next_json(T).await;
    assert_eq!(e["type"], "task.started", "{e}");
    assert_eq!(e["seq"], 1, "{e}");
    assert_eq!(e["project_id"], "clipub");

    // one JSON object per stdin line
    let lines = format!("{}\n{}\n", ev(2), ev(3));
    let mut cmd = switchboard_cmd();
    cmd.args(["publish", "--url", &url, "--project", "clipub"])
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, Some(&lines));
    assert!(st.success(), "{st:?}\n{out}\n{err}");
    let got = c.collect(2, T).await;
    assert_eq!(
        (got[0]["n"].as_u64(), got[0]["seq"].as_u64()),
        (Some(2), Some(2)),
        "{}",
        got[0]
    );
    assert_eq!(
        (got[1]["n"].as_u64(), got[1]["seq"].as_u64()),
        (Some(3), Some(3)),
        "{}",
        got[1]
    );

    // a refused event makes the command fail
    let mut cmd = switchboard_cmd();
    cmd.args([
        "publish",
        "--url",
        &url,
        "--project",
        "clipub",
        "--event",
        r#"{"no":"type"}"#,
    ])
    .env("SWITCHBOARD_JWT_SECRET", SECRET)
    .env("ENVIRONMENT", "development");
    let (st, out, err) = run_cli(cmd, None);
    assert!(
        !st.success(),
        "invalid event reported success:\n{out}\n{err}"
    );
}

#[test]
fn production_refuses_to_start_without_a_secret() {
    let mut cmd = switchboard_cmd();
    cmd.arg("serve")
        .env("ENVIRONMENT", "production")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("DOMAIN", "app.example.com");
    let (st, out, err) = run_cli(cmd, None);
    assert!(
        !st.success(),
        "started in production without a secret:\n{out}\n{err}"
    );
    assert!(!out.contains("switchboard listening on"), "{out}");
    let all = format!("{out}{err}").to_lowercase();
    assert!(
        all.contains("secret") || all.contains("key"),
        "the refusal must say why:\n{out}\n{err}"
    );
}

#[tokio::test]
async fn production_starts_with_a_secret() {
    let gw = GatewayOpts::new()
        .environment("production")
        .env("DOMAIN", "app.example.com")
        .start();
    assert_eq!(gw.get("/healthz").await.status, 200);
    // production origin default: only https://{DOMAIN}
    let t = gw.token("prod", &["p1"]);
    let ok = gw
        .ws_try(
            &format!("/ws/p1?token={t}"),
            &[("Origin", "https://app.example.com")],
        )
        .await;
    assert!(ok.is_ok(), "{:?}", ok.err());
    let bad = gw
        .ws_try(
            &format!("/ws/p1?token={t}"),
            &[("Origin", "http://localhost:3000")],
        )
        .await;
    assert_eq!(bad.err().map(|r| r.status), Some(403));
}

#[test]
fn serve_refuses_an_unknown_environment() {
    let mut cmd = switchboard_cmd();
    cmd.arg("serve")
        .env("ENVIRONMENT", "moon")
        .env("SWITCHBOARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_JWT_SECRET", SECRET);
    let (st, out, err) = run_cli(cmd, None);
    assert!(
        !st.success(),
        "started with ENVIRONMENT=moon:\n{out}\n{err}"
    );
}

#[tokio::test]
async fn development_without_a_secret_prints_a_ready_url_with_a_working_token() {
    let gw = GatewayOpts::new().secret(None).start();
    let deadline = Instant::now() + Duration::from_secs(3);
    let url = loop {
        let logs = gw.logs();
        let found = logs
            .split_whitespace()
            .find(|w| w.starts_with("ws://") && w.contains("token="))
            .map(str::to_string);
        if let Some(u) = found {
            break u;
        }
        assert!(
            Instant::now() < deadline,
            "no ws:// URL with a token in the startup output:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let url = url.trim_matches(|c: char| c == '"' || c == '\'' || c == ',' || c == ')' || c == '(');
    let path = &url[url
        .find("/ws/")
        .unwrap_or_else(|| panic!("no /ws/ in {url}"))..];
    let mut c = gw.ws(path, &[]).await;
    let est = c.next_json(T).await;
    assert_eq!(
        est["type"], "connection.established",
        "the printed URL works: {est}"
    );
    // the log never prints a token elsewhere than in that one ready URL line
    assert_eq!(
        gw.logs().matches("token=").count(),
        1,
        "token logged more than once:\n{}",
        gw.logs()
    );
}

/// Issue 10: `unix://` Redis URLs carry the password as a query parameter (`pass=`), which
/// check-config printed as is.
#[test]
fn check_config_redacts_the_password_of_unix_socket_urls() {
    for url in [
        "unix:///tmp/redis.sock?pass=sock-secret-1",
        "unix:///tmp/redis.sock?db=2&pass=sock-secret-1",
        "unix:///tmp/redis.sock?user=alice&pass=sock-secret-1&db=3",
        "redis+unix:///tmp/redis.sock?password=sock-secret-1",
    ] {
        let mut cmd = switchboard_cmd();
        cmd.arg("check-config")
            .env("ENVIRONMENT", "development")
            .env("REDIS_URL", url);
        let (st, out, err) = run_cli(cmd, None);
        let all = format!("{out}{err}");
        assert!(
            !all.contains("sock-secret-1"),
            "password of {url} printed:\n{all}"
        );
        if st.success() {
            assert!(
                out.contains("/tmp/redis.sock"),
                "socket path missing:\n{out}"
            );
            assert!(out.contains("<redacted>"), "no redaction marker:\n{out}");
        }
    }
}

/// Issue 10: a configured secret is the deployment's real key; the `ready:` line's 24-hour
/// token is printed only when the secret was generated for this process.
#[tokio::test]
async fn ready_line_is_printed_only_for_a_generated_secret() {
    let gw = GatewayOpts::new().environment("development").start();
    assert_eq!(gw.get("/healthz").await.status, 200);
    std::thread::sleep(Duration::from_millis(200));
    let logs = gw.logs();
    assert!(
        !logs.contains("token="),
        "a token signed with the configured secret was printed:\n{logs}"
    );
    assert!(!logs.contains("ready: "), "ready line printed:\n{logs}");

    let generated = GatewayOpts::new().secret(None).start();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !generated.logs().contains("ready: ws://") {
        assert!(
            Instant::now() < deadline,
            "no ready line:\n{}",
            generated.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn tokens_never_appear_in_request_logs() {
    let gw = GatewayOpts::new().env("RUST_LOG", "debug").start();
    let t = gw.token("secretive", &["p1"]);
    let (c, _) = gw.connect("p1", &t).await;
    c.close().await;
    let _ = gw.get(&format!("/ws/p1?token={t}")).await;
    let svc = gw.service_token();
    let _ = gw
        .post_json("/v1/projects/p1/events", Some(&svc), &ev(1))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = gw.logs();
    let sig = t.rsplit('.').next().unwrap();
    assert!(!logs.contains(sig), "a token was logged:\n{logs}");
    assert!(
        !logs.contains(svc.rsplit('.').next().unwrap()),
        "a service token was logged:\n{logs}"
    );
}

#[test]
fn check_config_names_the_redis_topology() {
    for (env, want) in [
        (vec![], "# broker_topology = embedded"),
        (
            vec![("REDIS_URL", "redis://127.0.0.1:6390")],
            "# broker_topology = single",
        ),
        (
            vec![
                ("REDIS_SENTINELS", "127.0.0.1:26379,127.0.0.1:26380"),
                ("REDIS_SENTINEL_MASTER", "mymaster"),
            ],
            "# broker_topology = sentinel (master \"mymaster\", sentinels 127.0.0.1:26379,127.0.0.1:26380)",
        ),
        (
            vec![("REDIS_CLUSTER_NODES", "127.0.0.1:7000,127.0.0.1:7001")],
            "# broker_topology = cluster (seed nodes 127.0.0.1:7000,127.0.0.1:7001)",
        ),
    ] {
        let mut cmd = switchboard_cmd();
        cmd.arg("check-config").env("ENVIRONMENT", "development");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let (st, out, err) = run_cli(cmd, None);
        assert!(st.success(), "{env:?}: {st:?}\n{out}\n{err}");
        assert!(out.contains(want), "{env:?}: no {want:?} in\n{out}");
    }
    // Two at once is refused, saying why.
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .env("ENVIRONMENT", "development")
        .env("REDIS_URL", "redis://127.0.0.1:6390")
        .env("REDIS_CLUSTER_NODES", "127.0.0.1:7000");
    let (st, out, err) = run_cli(cmd, None);
    assert!(!st.success(), "{out}");
    assert!(err.contains("choose one Redis"), "{err}");
}
