//! Checks of the files in `deploy/` that no test can run here: there is no container engine
//! on the CI machine, so the image is never built and compose never starts. What can be
//! checked without one is that the files agree with each other and with the crate:
//! compose.yaml parses and names the services nginx.conf proxies to, its addresses match
//! the trusted proxy in switchboard.toml (which `switchboard check-config` accepts with the
//! compose environment), the Dockerfile builds and copies the binary cargo produces, and
//! every metric the Grafana dashboard queries is one a running gateway exposes.
//! (deploy/nginx.conf itself runs for real in `nginx.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::common::*;
use serde_json::Value as Json;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

fn compose() -> Json {
    // serde-saphyr resolves anchors, aliases and `<<:` merge keys as compose does (an
    // explicit key wins over a merged one), so each service is what compose gives it; it
    // rejects duplicate keys. YAML scalars arrive as JSON strings, numbers or booleans.
    serde_saphyr::from_str(&read("deploy/compose.yaml"))
        .unwrap_or_else(|e| panic!("deploy/compose.yaml is not valid YAML: {e}"))
}

fn service<'a>(c: &'a Json, name: &str) -> &'a Json {
    let s = &c["services"][name];
    assert!(s.is_object(), "compose.yaml has no service {name}");
    s
}

fn str_of(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => n.to_string(),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn environment(s: &Json) -> BTreeMap<String, String> {
    s["environment"]
        .as_object()
        .expect("environment as a mapping")
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v)))
        .collect()
}

/// `./x:/y:ro` volume sources relative to deploy/, each checked to exist.
fn volume_targets(s: &Json) -> BTreeMap<String, PathBuf> {
    s["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|v| {
            let spec = str_of(v);
            let mut parts = spec.split(':');
            let (src, dst) = (parts.next().unwrap(), parts.next().expect("src:dst"));
            let src = src.trim_start_matches("./");
            let path = repo().join("deploy").join(src);
            assert!(
                path.is_file(),
                "volume source {src} does not exist ({spec})"
            );
            (dst.to_owned(), path)
        })
        .collect()
}

#[test]
fn compose_names_the_services_nginx_proxies_to_and_trusts_its_address() {
    let c = compose();
    let names: BTreeSet<String> = c["services"]
        .as_object()
        .expect("services")
        .keys()
        .cloned()
        .collect();
    let want: BTreeSet<String> = ["redis", "gateway-1", "gateway-2", "nginx"]
        .map(String::from)
        .into();
    assert_eq!(names, want);

    // nginx runs deploy/nginx.conf, whose upstreams are the gateway services on the port
    // the image listens on.
    let nginx = service(&c, "nginx");
    let mounts = volume_targets(nginx);
    assert_eq!(
        mounts.get("/etc/nginx/nginx.conf"),
        Some(&repo().join("deploy/nginx.conf")),
        "{mounts:?}"
    );
    let conf = read("deploy/nginx.conf");
    let dockerfile = read("deploy/Dockerfile");
    let port = dockerfile
        .split("SWITCHBOARD_LISTEN=0.0.0.0:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("Dockerfile sets SWITCHBOARD_LISTEN=0.0.0.0:PORT")
        .to_owned();
    assert!(dockerfile.contains(&format!("EXPOSE {port}")));
    for gw in ["gateway-1", "gateway-2"] {
        assert!(
            conf.contains(&format!("server {gw}:{port} ")),
            "nginx.conf does not proxy to {gw}:{port}"
        );
        let s = service(&c, gw);
        let env = environment(s);
        assert_eq!(
            env["CONTAINER_ID"], gw,
            "instance ids tell the instances apart"
        );
        assert_eq!(env["REDIS_URL"], "redis://redis:6379");
        assert!(
            env["SWITCHBOARD_JWT_SECRET"].starts_with("${SWITCHBOARD_JWT_SECRET:?"),
            "one secret for both instances, required: {env:?}"
        );
        let mounts = volume_targets(s);
        assert!(mounts.contains_key("/etc/switchboard/switchboard.toml"));
        let cmd: Vec<String> = s["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(str_of)
            .collect();
        assert_eq!(
            cmd,
            ["serve", "--config", "/etc/switchboard/switchboard.toml"]
        );
        // The drain must fit in the container's stop timeout.
        let stop = str_of(&s["stop_grace_period"]);
        let stop: u64 = stop.trim_end_matches('s').parse().expect("seconds");
        let toml: toml::Value = toml::from_str(&read("deploy/switchboard.toml")).unwrap();
        let grace = toml["server"]["shutdown_grace_secs"].as_integer().unwrap() as u64;
        assert!(
            stop > grace,
            "stop_grace_period {stop} s <= shutdown grace {grace} s"
        );
    }

    // X-Forwarded-For is trusted from nginx's fixed address, which is in the network.
    let ip: IpAddr = str_of(&nginx["networks"]["edge"]["ipv4_address"])
        .parse()
        .unwrap();
    let subnet: ipnet::IpNet = str_of(&c["networks"]["edge"]["ipam"]["config"][0]["subnet"])
        .parse()
        .unwrap();
    assert!(subnet.contains(&ip), "{ip} not in {subnet}");
    let toml: toml::Value = toml::from_str(&read("deploy/switchboard.toml")).unwrap();
    let trusted: Vec<&str> = toml["server"]["trusted_proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(trusted, [ip.to_string()]);
}

#[test]
fn the_compose_gateway_config_is_valid() {
    let c = compose();
    let env = environment(service(&c, "gateway-1"));
    let mut cmd = switchboard_cmd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(repo().join("deploy/switchboard.toml"));
    for (k, v) in &env {
        let v = if k == "SWITCHBOARD_JWT_SECRET" {
            "a-secret-exported-by-the-operator-0123456789"
        } else {
            v
        };
        cmd.env(k, v);
    }
    // What the Dockerfile sets.
    cmd.env("SWITCHBOARD_LISTEN", "0.0.0.0:8080")
        .env("ENVIRONMENT", "docker");
    let (status, out, err) = run_cli(cmd, None);
    assert!(status.success(), "check-config failed:\n{out}\n{err}");
    assert!(
        out.contains("172.28.0.10"),
        "trusted proxy in effect:\n{out}"
    );
    assert!(
        !out.contains("a-secret-exported"),
        "secret redacted:\n{out}"
    );
}

#[test]
fn the_dockerfile_builds_and_copies_the_binary_cargo_makes() {
    let d = read("deploy/Dockerfile");
    let bin = Path::new(env!("CARGO_BIN_EXE_switchboard"))
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        d.contains(&format!("cargo build --release --locked --bin {bin}")),
        "the build step names the binary {bin}"
    );
    assert!(
        d.contains(&format!("target/release/{bin} /out/{bin}")),
        "copied from cargo's release directory"
    );
    assert!(d.contains(&format!(
        "COPY --from=build /out/{bin} /usr/local/bin/{bin}"
    )));
    assert!(d.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")));
    assert!(
        repo().join("Cargo.lock").is_file(),
        "--locked needs Cargo.lock"
    );

    // Not root at run time.
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(!["0", "root"].contains(&user.trim()), "runs as {user}");

    // The build image's toolchain is at least the crate's rust-version.
    let version = |s: &str| -> (u32, u32) {
        let mut it = s.split('.').map(|p| p.parse::<u32>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    let tag = d
        .lines()
        .find_map(|l| l.strip_prefix("FROM rust:"))
        .and_then(|l| l.split('-').next())
        .expect("FROM rust:X.Y-...");
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let msrv = manifest["workspace"]["package"]["rust-version"]
        .as_str()
        .unwrap();
    assert!(
        version(tag) >= version(msrv),
        "rust:{tag} < rust-version {msrv}"
    );

    // The build context keeps build output out.
    let ignore = read(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "target"), "{ignore}");
}

/// Metric names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("switchboard_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_metrics_the_gateway_exposes() {
    let dash: Json = serde_json::from_str(&read("deploy/grafana-dashboard.json"))
        .expect("deploy/grafana-dashboard.json is JSON");
    // Redis mode: the pub/sub metrics exist only there.
    let redis = RedisServer::start();
    let gw = GatewayOpts::new().redis(redis.url()).start();
    let exposition = gw.get("/metrics").await.text();
    let exposed: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();

    let panels = dash["panels"].as_array().expect("panels");
    let mut queried = BTreeSet::new();
    let mut area = 0;
    for p in panels {
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24, "panel {} wider than the grid", p["title"]);
        area += w * g["h"].as_u64().unwrap();
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            queried.extend(names);
        }
    }
    assert!(area > 0);
    for name in &queried {
        assert!(
            exposed.contains(name),
            "the dashboard queries {name}, which /metrics does not expose:\n{exposition}"
        );
    }
    // Every family the gateway exposes is on the dashboard.
    let families: BTreeSet<String> = exposed
        .iter()
        .map(|n| {
            ["_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_owned()
        })
        .collect();
    let on_dashboard: BTreeSet<String> = queried
        .iter()
        .map(|n| n.strip_suffix("_bucket").unwrap_or(n).to_owned())
        .collect();
    let missing: Vec<_> = families.difference(&on_dashboard).collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");
}
