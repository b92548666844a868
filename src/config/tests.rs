//! Config sources, precedence, validation and redaction, checked on real files and env.

use super::*;

#[test]
fn the_default_event_policy_is_the_schema_default() {
    assert_eq!(
        Config::default().event_policy(),
        crate::schema::Policy::default()
    );
}
use std::collections::HashMap;

fn load(env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::load_with(None, &move |k: &str| map.get(k).cloned())
}

#[test]
fn production_example_is_valid_and_sets_the_admin_listener() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/production.example.toml");
    let env = |k: &str| (k == "SWITCHBOARD_JWT_SECRET").then(|| "x".repeat(32));
    let c = Config::load_with(Some(&path), &env).unwrap();
    assert_eq!(c.server.environment, Environment::Production);
    assert_eq!(
        c.admin_listen_addr().map(|a| a.unwrap()),
        Some("10.0.0.5:9090".parse().unwrap())
    );
    assert_eq!(c.server.max_pending_per_ip, 256);
}

#[test]
fn admin_listen_and_ipv6_prefix_are_checked() {
    assert!(load(&[]).unwrap().admin_listen_addr().is_none());
    let c = load(&[("SWITCHBOARD_ADMIN_LISTEN", "127.0.0.1:0")]).unwrap();
    assert!(c.admin_listen_addr().is_some_and(|a| a.is_ok()));
    assert!(load(&[("SWITCHBOARD_ADMIN_LISTEN", "")])
        .unwrap()
        .admin_listen_addr()
        .is_none());
    assert!(load(&[("SWITCHBOARD_ADMIN_LISTEN", "not an address")]).is_err());
    let mut c = Config::default();
    c.server.ipv6_prefix_len = 0;
    assert!(c.validate().is_err());
    c.server.ipv6_prefix_len = 129;
    assert!(c.validate().is_err());
}

#[test]
fn shipped_default_toml_matches_built_in_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let file = Config::load_with(Some(&path), &|_: &str| None).unwrap();
    assert_eq!(
        toml::to_string(&file).unwrap(),
        toml::to_string(&Config::default()).unwrap()
    );
}

#[test]
fn env_overrides_defaults() {
    let c = load(&[
        ("SWITCHBOARD_LISTEN", "127.0.0.1:0"),
        ("WS_HEARTBEAT_INTERVAL", "5"),
        ("CONTAINER_ID", "gw-1"),
    ])
    .unwrap();
    assert_eq!(c.server.listen, "127.0.0.1:0");
    assert_eq!(c.ws.heartbeat_interval_secs, 5);
    assert_eq!(c.server.instance_id.as_deref(), Some("gw-1"));
}

#[test]
fn unknown_environment_is_an_error() {
    assert!(load(&[("ENVIRONMENT", "staging")]).is_err());
}

#[test]
fn production_needs_a_secret() {
    let err = load(&[("ENVIRONMENT", "production")]).unwrap_err();
    assert!(err.to_string().contains("SWITCHBOARD_JWT_SECRET"));
    assert!(load(&[
        ("ENVIRONMENT", "production"),
        ("SWITCHBOARD_JWT_SECRET", "0123456789abcdef0123456789abcdef")
    ])
    .is_ok());
}

#[test]
fn redaction_hides_passwords() {
    assert_eq!(
        redact_url_password("redis://:hunter2@host:6379/0"),
        "redis://:<redacted>@host:6379/0"
    );
    assert_eq!(
        redact_url_password("redis://u:p@h"),
        "redis://u:<redacted>@h"
    );
    assert_eq!(redact_url_password("redis://h:1"), "redis://h:1");
    assert_eq!(
        redact_url_password("unix:///tmp/r.sock?db=1&pass=s3cret&user=u"),
        "unix:///tmp/r.sock?db=1&pass=<redacted>&user=u"
    );
    assert_eq!(
        redact_url_password("redis://u:p@h/0?password=x"),
        "redis://u:<redacted>@h/0?password=<redacted>"
    );
    let c = load(&[
        ("REDIS_URL", "redis://:hunter2@127.0.0.1:1"),
        ("SWITCHBOARD_JWT_SECRET", "topsecret"),
    ])
    .unwrap();
    let text = c.redacted_toml();
    assert!(
        !text.contains("hunter2") && !text.contains("topsecret"),
        "{text}"
    );
}

#[test]
fn console_default_follows_the_environment() {
    let secret = ("SWITCHBOARD_JWT_SECRET", "0123456789abcdef0123456789abcdef");
    assert!(load(&[]).unwrap().console_enabled());
    assert!(load(&[("ENVIRONMENT", "docker")])
        .unwrap()
        .console_enabled());
    assert!(!load(&[("ENVIRONMENT", "production"), secret])
        .unwrap()
        .console_enabled());
    assert!(load(&[
        ("ENVIRONMENT", "production"),
        secret,
        ("SWITCHBOARD_CONSOLE", "on")
    ])
    .unwrap()
    .console_enabled());
    assert!(!load(&[("SWITCHBOARD_CONSOLE", "0")])
        .unwrap()
        .console_enabled());
    assert!(load(&[("SWITCHBOARD_CONSOLE", "maybe")]).is_err());

    let mut c = Config::default();
    c.server.environment = Environment::Production;
    assert!(
        c.redacted_toml().contains("[console]\nenabled = false\n"),
        "check-config shows the effective value:\n{}",
        c.redacted_toml()
    );
    c.console.enabled = Some(true);
    assert!(
        c.console_enabled(),
        "an explicit key wins over the environment"
    );
}

#[test]
fn production_origin_default_is_the_domain() {
    let c = load(&[
        ("ENVIRONMENT", "production"),
        ("DOMAIN", "app.example.com"),
        ("SWITCHBOARD_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
    ])
    .unwrap();
    assert_eq!(c.allowed_origins(), vec!["https://app.example.com"]);
}

#[test]
fn the_seeds_other_settings_are_honoured_or_refused_with_a_reason() {
    let c = load(&[
        ("WS_CONNECTION_TIMEOUT", "3600"),
        ("REDIS_CHANNEL", "app:broadcast"),
        ("CONTAINER_RESTART", "true"),
    ])
    .unwrap();
    assert_eq!(c.ws.max_connection_secs, 3600);
    assert_eq!(c.redis.broadcast_channel, "app:broadcast");
    assert!(c.server.container_restart);
    let d = load(&[]).unwrap();
    assert_eq!(
        (
            d.ws.max_connection_secs,
            d.redis.broadcast_channel.as_str(),
            d.server.container_restart
        ),
        (0, "websocket:broadcast", false)
    );
    for (k, v) in [
        ("WS_CONNECTION_TIMEOUT", "an hour"),
        ("CONTAINER_RESTART", "maybe"),
        ("REDIS_CHANNEL", "project:p:events"),
        ("REDIS_CHANNEL", "story:s"),
    ] {
        let err = load(&[(k, v)]).unwrap_err().to_string();
        assert!(
            err.contains(k) || err.contains("REDIS_CHANNEL"),
            "{k}={v}: {err}"
        );
    }
}

#[test]
fn the_authorization_hook_is_read_from_the_environment_checked_and_redacted() {
    let c = load(&[
        (
            "SWITCHBOARD_AUTH_HOOK_URL",
            "http://app:8000/internal/ws-authz",
        ),
        ("SWITCHBOARD_AUTH_HOOK_SECRET", "hook-s3cret"),
    ])
    .unwrap();
    c.validate().unwrap();
    assert_eq!(
        c.auth.hook_url.as_deref(),
        Some("http://app:8000/internal/ws-authz")
    );
    assert_eq!(c.auth.hook_secret.as_deref(), Some("hook-s3cret"));
    assert_eq!(
        (
            c.auth.hook_timeout_ms,
            c.auth.hook_cache_secs,
            c.auth.hook_concurrency
        ),
        (1000, 30, 64)
    );
    assert!(!c.redacted_toml().contains("hook-s3cret"));
    for (url, why) in [
        ("https://app/authz", "https is not supported"),
        ("ftp://app/authz", "must start with http://"),
        ("http://user:pw@app/authz", "credentials in the URL"),
        ("not a url", "is not a URL"),
    ] {
        let err = load(&[("SWITCHBOARD_AUTH_HOOK_URL", url)])
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{url}: {err}");
    }
    let mut c = load(&[]).unwrap();
    c.auth.hook_concurrency = 0;
    assert!(c.validate().is_err());
}

#[test]
fn one_redis_topology_is_chosen_and_checked() {
    // Cluster and Sentinel from the environment.
    let c = load(&[("REDIS_CLUSTER_NODES", "10.0.0.1:7000, 10.0.0.2:7000,")]).unwrap();
    assert_eq!(
        c.redis.topology(),
        Some(RedisTopology::Cluster {
            nodes: vec!["10.0.0.1:7000".into(), "10.0.0.2:7000".into()]
        })
    );
    assert!(c.redis.describe_topology().starts_with("cluster"));
    let c = load(&[
        ("REDIS_SENTINELS", "s1:26379,s2:26379"),
        ("REDIS_SENTINEL_MASTER", "mymaster"),
    ])
    .unwrap();
    assert_eq!(
        c.redis.topology(),
        Some(RedisTopology::Sentinel {
            sentinels: vec!["s1:26379".into(), "s2:26379".into()],
            master: "mymaster".into()
        })
    );
    assert_eq!(
        load(&[("REDIS_URL", "redis://h:1")])
            .unwrap()
            .redis
            .topology(),
        Some(RedisTopology::Single {
            url: "redis://h:1".into()
        })
    );
    assert_eq!(load(&[]).unwrap().redis.topology(), None);
    // Refused, each with its reason.
    for (env, why) in [
        (
            vec![
                ("REDIS_URL", "redis://h:1"),
                ("REDIS_CLUSTER_NODES", "h:7000"),
            ],
            "choose one Redis",
        ),
        (
            vec![("REDIS_SENTINELS", "s1:26379")],
            "needs redis.sentinel_master",
        ),
        (vec![("REDIS_CLUSTER_NODES", "h")], "is not host:port"),
        (vec![("REDIS_CLUSTER_NODES", "h:0")], "is not host:port"),
        (
            vec![
                ("REDIS_SENTINELS", "s:99999"),
                ("REDIS_SENTINEL_MASTER", "m"),
            ],
            "is not host:port",
        ),
    ] {
        let e = load(&env).and_then(|c| c.validate().map(|_| c));
        let text = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains(why), "{env:?}: {text:?}");
    }
    // The WAIT must end before the command's own timeout.
    let mut c = load(&[("REDIS_URL", "redis://h:1")]).unwrap();
    c.redis.publish_wait_replicas = 1;
    c.redis.publish_wait_timeout_ms = c.redis.command_timeout_ms;
    let text = c
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        text.contains("must be below redis.command_timeout_ms"),
        "{text}"
    );
    c.redis.publish_wait_timeout_ms = c.redis.command_timeout_ms - 1;
    c.validate().unwrap();
}

#[test]
fn cluster_and_sentinel_credentials_are_encoded_checked_and_redacted() {
    let c = load(&[
        ("REDIS_CLUSTER_NODES", "h1:7000"),
        ("REDIS_USERNAME", "gw"),
        ("REDIS_PASSWORD", "p@ss:w/rd"),
    ])
    .unwrap();
    c.validate().unwrap();
    let creds = c.redis.credentials();
    assert_eq!(
        creds.node_url("h1:7000"),
        "redis://gw:p%40ss%3Aw%2Frd@h1:7000/"
    );
    assert_eq!(creds.sentinel_url("s:26379"), "redis://s:26379/");
    assert!(!format!("{creds:?}").contains("p@ss"), "{creds:?}");
    let shown = c.redacted_toml();
    assert!(!shown.contains("p@ss"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    // With REDIS_URL the credentials belong in the URL; a user needs a password.
    for env in [
        vec![("REDIS_URL", "redis://h:1"), ("REDIS_PASSWORD", "x")],
        vec![("REDIS_CLUSTER_NODES", "h:1"), ("REDIS_USERNAME", "u")],
    ] {
        let e = load(&env).and_then(|c| c.validate().map(|_| c));
        assert!(e.is_err(), "{env:?} accepted");
    }
}

#[test]
fn a_tls_redis_url_is_refused_with_its_reason() {
    let text = load(&[("REDIS_URL", "rediss://h:6380")])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(text.contains("rediss:// (TLS) is not supported"), "{text}");
}
