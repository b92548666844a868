//! `loadgen`: the Switchboard load generator (issue 4). See loadtest/README.md.
//!
//! Every client runs on one current-thread runtime (the load generator shares a core with
//! Redis); the publisher has its own thread. Traffic goes to 127.0.0.0/8 only.

mod gateway;
mod publisher;
mod report;
mod scenarios;
mod util;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "Switchboard load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Common {
    /// Gateway address (host:port, loopback only).
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Several gateways instead of --addr (host:port,host:port,..., loopback only): the
    /// clients are spread over them round-robin, every project on every gateway.
    #[arg(long, value_delimiter = ',')]
    gateways: Vec<SocketAddr>,
    /// Redis the gateway uses (the publisher EVALSHAs the publish script there).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// A Redis Cluster instead (seed nodes host:port,..., loopback only; the gateway's own
    /// variable): the publisher then uses hash-tagged keys and the cluster client.
    #[arg(long, env = "REDIS_CLUSTER_NODES", value_delimiter = ',')]
    redis_cluster_nodes: Vec<String>,
    /// HS256 secret of the gateway (tokens are minted with it).
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// The gateway's pid, for CPU and RSS from /proc (and the resume storm's restart); with
    /// several gateways, their pids (comma-separated), summed.
    #[arg(long, value_delimiter = ',')]
    gateway_pid: Vec<u32>,
    /// Source addresses 127.0.0.1..127.0.0.N the clients are spread over.
    #[arg(long, default_value_t = 50)]
    sources: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 512)]
    concurrency: usize,
    /// Where to write the JSON result.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// N idle connections over P projects: gateway RSS per connection.
    Idle {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        projects: usize,
        /// Seconds to hold the connections before the second RSS reading.
        #[arg(long, default_value_t = 3.0)]
        hold: f64,
    },
    /// N clients in one project, R events/s for D s: throughput, loss, latency, CPU.
    Fanout {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Extra padding bytes per event.
        #[arg(long, default_value_t = 0)]
        pad: usize,
    },
    /// N clients over P projects, R events/s in total spread over the projects.
    Spread {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 5000)]
        clients: usize,
        #[arg(long, default_value_t = 500)]
        projects: usize,
        #[arg(long, default_value_t = 2000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Time from the first connect until N clients have `connection.established`.
    ConnectStorm {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        projects: usize,
    },
    /// N clients on one project; the gateway is restarted while events are published;
    /// time until every client has resumed and has every event.
    ResumeStorm {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 2000)]
        clients: usize,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds of publishing in total (the restart happens during it).
        #[arg(long, default_value_t = 8.0)]
        duration: f64,
        /// Seconds after publishing starts when the gateway is restarted.
        #[arg(long, default_value_t = 2.0)]
        restart_after: f64,
        /// The switchboard binary to start again.
        #[arg(long, default_value = "target/release/switchboard")]
        gateway_bin: PathBuf,
        #[arg(long, default_value = "config/loadtest.toml")]
        gateway_config: PathBuf,
        /// CPU list for `taskset -c` of the restarted gateway (empty: no pinning).
        #[arg(long, default_value = "0")]
        gateway_cpu: String,
        #[arg(long, default_value = "gateway-restarted.log")]
        gateway_log: PathBuf,
        /// The restarted gateway's pid is written here (so a wrapper can stop it).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// K never-reading clients among N: gateway RSS stays bounded, readers lose nothing.
    Slow {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        slow: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Padding per event: large events fill the gateway's socket buffer (up to 4 MiB
        /// with Linux autotuning) and then its queue within the run.
        #[arg(long, default_value_t = 1024)]
        pad: usize,
        /// The gateway's ws.outbound_queue_bytes (the bound checked).
        #[arg(long, default_value_t = 1_048_576)]
        queue_bytes: u64,
        #[arg(long, default_value_t = 1024)]
        queue_messages: u64,
    },
    /// Writes report.md and latency.svg from the JSON results in DIR.
    Report {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prints a free TCP port on 127.0.0.1.
    FreePort,
    /// Waits until the gateway's /readyz is 200 (exit 1 after the timeout).
    WaitReady {
        #[arg(long, env = "SWITCHBOARD_LISTEN")]
        addr: SocketAddr,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// Waits until Redis answers PING (exit 1 after the timeout).
    WaitRedis {
        #[arg(long, env = "REDIS_URL")]
        redis_url: String,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
}

/// True for `localhost` and 127.0.0.0/8.
fn loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn loopback_only(c: &Common) -> anyhow::Result<()> {
    anyhow::ensure!(
        c.addr.ip().is_loopback() && c.gateways.iter().all(|a| a.ip().is_loopback()),
        "the gateway addresses must be on 127.0.0.0/8"
    );
    let rest = c.redis_url.split("://").nth(1).unwrap_or("");
    let hostport = rest.split('/').next().unwrap_or("");
    let hostport = hostport.rsplit('@').next().unwrap_or("");
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    anyhow::ensure!(
        loopback_host(host),
        "REDIS_URL must point to 127.0.0.0/8 or localhost"
    );
    for node in cluster_nodes(c) {
        let ok = node
            .rsplit_once(':')
            .is_some_and(|(h, p)| loopback_host(h) && p.parse::<u16>().is_ok());
        anyhow::ensure!(
            ok,
            "REDIS_CLUSTER_NODES: {node:?} is not host:port on 127.0.0.0/8 or localhost"
        );
    }
    anyhow::ensure!(
        c.sources >= 1 && c.sources <= 250,
        "--sources must be 1..250"
    );
    Ok(())
}

/// The cluster's seed nodes, without empty entries (an empty REDIS_CLUSTER_NODES = none).
fn cluster_nodes(c: &Common) -> Vec<String> {
    c.redis_cluster_nodes
        .iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect()
}

fn ctx(c: &Common) -> anyhow::Result<scenarios::Ctx> {
    loopback_only(c)?;
    let addrs = if c.gateways.is_empty() {
        vec![c.addr]
    } else {
        c.gateways.clone()
    };
    Ok(scenarios::Ctx {
        addr: addrs[0],
        addrs,
        redis_url: c.redis_url.clone(),
        cluster_nodes: cluster_nodes(c),
        secret: c.jwt_secret.clone(),
        gateway_pids: c.gateway_pid.clone(),
        sources: c.sources,
        concurrency: c.concurrency.max(1),
        tag: util::run_tag(),
    })
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 600.0))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every client is a file descriptor: raise the soft limit to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            if n < 4096 {
                eprintln!("loadgen: RLIMIT_NOFILE is only {n}");
            }
        }
        Err(e) => eprintln!("loadgen: could not raise RLIMIT_NOFILE: {e}"),
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&rt, run(cli.cmd));
    // Client tasks still hold sockets; dropping the runtime closes them.
    drop(local);
    drop(rt);
    result
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let (out, value) = match cmd {
        Cmd::Idle {
            c,
            clients,
            projects,
            hold,
        } => (
            c.out.clone(),
            scenarios::idle(&ctx(&c)?, clients, projects, secs(hold)).await?,
        ),
        Cmd::Fanout {
            c,
            clients,
            rate,
            duration,
            pad,
        } => {
            let t = scenarios::Traffic {
                name: "fanout".into(),
                clients,
                projects: 1,
                rate,
                duration: secs(duration),
                slow: 0,
                pad,
                history_max_len: 10_000,
                queue_bytes: 1_048_576,
                queue_messages: 1024,
            };
            (c.out.clone(), scenarios::traffic(&ctx(&c)?, &t).await?)
        }
        Cmd::Spread {
            c,
            clients,
            projects,
            rate,
            duration,
        } => {
            let t = scenarios::Traffic {
                name: "spread".into(),
                clients,
                projects,
                rate,
                duration: secs(duration),
                slow: 0,
                pad: 0,
                history_max_len: 10_000,
                queue_bytes: 1_048_576,
                queue_messages: 1024,
            };
            (c.out.clone(), scenarios::traffic(&ctx(&c)?, &t).await?)
        }
        Cmd::Slow {
            c,
            clients,
            slow,
            rate,
            duration,
            pad,
            queue_bytes,
            queue_messages,
        } => {
            let t = scenarios::Traffic {
                name: "slow".into(),
                clients,
                projects: 1,
                rate,
                duration: secs(duration),
                slow: slow.min(clients),
                pad,
                history_max_len: 10_000,
                queue_bytes,
                queue_messages,
            };
            (c.out.clone(), scenarios::traffic(&ctx(&c)?, &t).await?)
        }
        Cmd::ConnectStorm {
            c,
            clients,
            projects,
        } => (
            c.out.clone(),
            scenarios::connect_storm(&ctx(&c)?, clients, projects).await?,
        ),
        Cmd::ResumeStorm {
            c,
            clients,
            rate,
            duration,
            restart_after,
            gateway_bin,
            gateway_config,
            gateway_cpu,
            gateway_log,
            pid_file,
        } => {
            let r = scenarios::Resume {
                clients,
                rate,
                duration: secs(duration),
                restart_after: secs(restart_after.min(duration)),
                launcher: gateway::Launcher {
                    bin: gateway_bin,
                    config: gateway_config,
                    cpu: (!gateway_cpu.is_empty()).then_some(gateway_cpu),
                    log: gateway_log,
                    pid_file,
                },
                history_max_len: 10_000,
            };
            (c.out.clone(), scenarios::resume_storm(&ctx(&c)?, &r).await?)
        }
        Cmd::Report { dir } => {
            report::write(&dir)
                .with_context(|| format!("writing the report in {}", dir.display()))?;
            println!("{}", dir.join("report.md").display());
            return Ok(());
        }
        Cmd::FreePort => {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", l.local_addr()?.port());
            return Ok(());
        }
        Cmd::WaitReady { addr, timeout } => {
            anyhow::ensure!(addr.ip().is_loopback(), "loopback only");
            anyhow::ensure!(
                gateway::wait_ready(addr, secs(timeout)).await,
                "gateway at {addr} not ready after {timeout}s"
            );
            return Ok(());
        }
        Cmd::WaitRedis { redis_url, timeout } => {
            let end = std::time::Instant::now() + secs(timeout);
            loop {
                let ok = async {
                    let client = redis::Client::open(redis_url.as_str())?;
                    let mut con = client.get_multiplexed_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut con).await
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ok).await {
                    return Ok(());
                }
                anyhow::ensure!(
                    std::time::Instant::now() < end,
                    "redis at {redis_url} not answering after {timeout}s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    if let Some(path) = out {
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
