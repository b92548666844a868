//! The publisher: EVALSHA of the gateway's publish script (src/broker/publish.lua, the one
//! place where an event gets its seq) in a Redis pipeline, paced to a target rate on its
//! own thread (so the client tasks' load does not delay publishing). Each event carries
//! `"sent_ns"`, the unix time in ns just before its pipeline was sent.
//!
//! On a Redis Cluster (`cluster_nodes`) the keys are hash-tagged per project
//! (`project:{<id>}:seq`, ..., docs/protocol.md §11; the script then SPUBLISHes) and a
//! pipeline may not span slots: each tick's EVALSHAs (one per project) are sent
//! concurrently over one cluster connection, each routed to its slot's primary.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::util::{rfc3339_ms, unix_ns};

pub const PUBLISH_SCRIPT: &str = include_str!("../../src/broker/publish.lua");

#[derive(Clone, Debug)]
pub struct PubSpec {
    /// The single Redis (ignored when `cluster_nodes` is not empty).
    pub redis_url: String,
    /// Redis Cluster seed nodes (`host:port`); empty: the single Redis at `redis_url`.
    pub cluster_nodes: Vec<String>,
    pub projects: Vec<String>,
    /// Events per second in total, spread round-robin over the projects.
    pub rate: f64,
    pub duration: Duration,
    /// Extra bytes of padding per event (a `"pad"` string field).
    pub pad: usize,
    pub history_max_len: u64,
}

#[derive(Clone, Debug, Default)]
pub struct PubReport {
    pub published: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Highest seq per project returned by the script (0 = nothing published there).
    pub last_seq: Vec<u64>,
    /// Largest delay of a pipeline behind its schedule.
    pub max_behind: Duration,
    pub first_error: Option<String>,
}

/// Live progress shared with the scenario.
#[derive(Default)]
pub struct PubProgress {
    pub published: AtomicU64,
    pub stop: AtomicBool,
    pub started_ns: AtomicU64,
}

pub fn spawn(
    spec: PubSpec,
    progress: Arc<PubProgress>,
) -> std::thread::JoinHandle<anyhow::Result<PubReport>> {
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(spec, progress))
        })
        .expect("spawn publisher thread")
}

/// The number of masters serving slots (`cluster_size` of CLUSTER INFO, asked of the
/// first seed node that answers); None if none does.
pub async fn cluster_masters(nodes: &[String]) -> Option<u64> {
    for n in nodes {
        let info = async {
            let client = redis::Client::open(format!("redis://{n}"))?;
            let mut con = client.get_multiplexed_async_connection().await?;
            redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async::<String>(&mut con)
                .await
        };
        if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), info).await {
            return info
                .lines()
                .find_map(|l| l.strip_prefix("cluster_size:")?.trim().parse().ok());
        }
    }
    None
}

/// Where the EVALSHAs go.
enum Con {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The script's reply: `{ epoch, { seq, ... }, last_seq }`.
type Reply = (String, Vec<u64>, u64);

impl Con {
    async fn open(spec: &PubSpec) -> anyhow::Result<Self> {
        if spec.cluster_nodes.is_empty() {
            let client = redis::Client::open(spec.redis_url.as_str())?;
            Ok(Con::Single(
                client.get_multiplexed_async_connection().await?,
            ))
        } else {
            let nodes: Vec<String> = spec
                .cluster_nodes
                .iter()
                .map(|n| format!("redis://{n}"))
                .collect();
            let client = redis::cluster::ClusterClient::new(nodes)?;
            Ok(Con::Cluster(client.get_async_connection().await?))
        }
    }

    /// SCRIPT LOAD; on a cluster the client sends it to every node, so every primary has
    /// the script whichever slot an EVALSHA is routed to.
    async fn load(&mut self) -> redis::RedisResult<String> {
        let mut c = redis::cmd("SCRIPT");
        c.arg("LOAD").arg(PUBLISH_SCRIPT);
        match self {
            Con::Single(con) => c.query_async(con).await,
            Con::Cluster(con) => c.query_async(con).await,
        }
    }

    /// The script's reply per command, in order. A single Redis gets them in one
    /// pipeline (an error fails them all); a cluster gets them concurrently, each on its
    /// slot's primary.
    async fn eval_all(&mut self, cmds: &[redis::Cmd]) -> Vec<redis::RedisResult<Reply>> {
        match self {
            Con::Single(con) => {
                let mut pipe = redis::pipe();
                for c in cmds {
                    pipe.add_command(c.clone());
                }
                match pipe.query_async::<Vec<Reply>>(con).await {
                    Ok(replies) => replies.into_iter().map(Ok).collect(),
                    Err(e) => cmds.iter().map(|_| Err(e.clone())).collect(),
                }
            }
            Con::Cluster(con) => {
                // One task per command, all in flight at once; replies collected in order.
                let tasks: Vec<_> = cmds
                    .iter()
                    .map(|c| {
                        let (c, mut con) = (c.clone(), con.clone());
                        tokio::spawn(async move { c.query_async::<Reply>(&mut con).await })
                    })
                    .collect();
                let mut out = Vec::with_capacity(tasks.len());
                for t in tasks {
                    out.push(t.await.unwrap_or_else(|e| {
                        Err(redis::RedisError::from((
                            redis::ErrorKind::Io,
                            "publisher task",
                            e.to_string(),
                        )))
                    }));
                }
                out
            }
        }
    }
}

async fn run(spec: PubSpec, progress: Arc<PubProgress>) -> anyhow::Result<PubReport> {
    let mut con = Con::open(&spec).await?;
    let sha = con.load().await?;
    let np = spec.projects.len().max(1);
    let cluster = !spec.cluster_nodes.is_empty();
    let keys: Vec<[String; 5]> = spec
        .projects
        .iter()
        .map(|p| {
            // On a cluster the id is hash-tagged: every key of a project in one slot.
            let p = if cluster {
                format!("{{{p}}}")
            } else {
                p.clone()
            };
            [
                format!("project:{p}:seq"),
                format!("project:{p}:history"),
                format!("project:{p}:events"),
                format!("project:{p}:state"),
                format!("project:{p}:state:terminal"),
            ]
        })
        .collect();
    let pad = if spec.pad > 0 {
        format!(",\"pad\":\"{}\"", "x".repeat(spec.pad))
    } else {
        String::new()
    };
    let epoch = format!("lt-{}", crate::util::run_tag());
    let mut report = PubReport {
        last_seq: vec![0; np],
        ..Default::default()
    };
    let total = (spec.rate * spec.duration.as_secs_f64()).round() as u64;
    let max_batch = ((spec.rate / 100.0).ceil() as u64).clamp(1, 5000);
    let start = Instant::now();
    progress.started_ns.store(unix_ns(), Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_project = 0usize;
    let mut per_project: Vec<Vec<String>> = vec![Vec::new(); np];
    let hard_end = start + spec.duration + Duration::from_secs(30);
    while report.published < total
        && !progress.stop.load(Ordering::Relaxed)
        && Instant::now() < hard_end
    {
        tick.tick().await;
        let elapsed = start.elapsed();
        let due = ((spec.rate * elapsed.as_secs_f64()) as u64).min(total);
        if due <= report.published {
            continue;
        }
        let n = (due - report.published).min(max_batch);
        let sched = Duration::from_secs_f64((report.published + n) as f64 / spec.rate);
        report.max_behind = report.max_behind.max(elapsed.saturating_sub(sched));
        let now = unix_ns();
        let ts = rfc3339_ms(now);
        for b in per_project.iter_mut() {
            b.clear();
        }
        for k in 0..n {
            let p = next_project;
            next_project = (next_project + 1) % np;
            per_project[p].push(format!(
                "{{\"type\":\"file.changed\",\"project_id\":\"{}\",\"timestamp\":\"{ts}\",\"file_path\":\"/lt/{}\",\"sent_ns\":{now}{pad}}}",
                spec.projects[p],
                report.published + k
            ));
        }
        let mut cmds = Vec::new();
        let mut order = Vec::new();
        for (p, evs) in per_project.iter().enumerate() {
            if evs.is_empty() {
                continue;
            }
            order.push(p);
            let mut c = redis::cmd("EVALSHA");
            c.arg(&sha).arg(5);
            for k in &keys[p] {
                c.arg(k);
            }
            c.arg(&epoch)
                .arg(spec.history_max_len)
                .arg(3600)
                .arg(now / 1_000_000)
                .arg(3_600_000);
            for e in evs {
                c.arg(e.as_bytes());
            }
            cmds.push(c);
        }
        let replies = con.eval_all(&cmds).await;
        let mut failed = None;
        for (p, res) in order.iter().zip(replies) {
            match res {
                Ok((_, seqs, last)) => {
                    report.last_seq[*p] = report.last_seq[*p].max(last);
                    report.published += seqs.len() as u64;
                }
                Err(e) => {
                    // Count them as published attempts so the loop stays bounded.
                    report.published += per_project[*p].len() as u64;
                    failed = Some(e);
                }
            }
        }
        if let Some(e) = failed {
            report.errors += 1;
            if report.first_error.is_none() {
                report.first_error = Some(e.to_string());
            }
            if report.errors > 100 {
                anyhow::bail!("publisher: too many Redis errors: {e}");
            }
            // A node that lost the script (restarted, or a replica promoted since): load
            // it again.
            if e.code() == Some("NOSCRIPT") {
                let _ = con.load().await;
            }
        }
        progress
            .published
            .store(report.published, Ordering::Relaxed);
    }
    report.elapsed = start.elapsed();
    Ok(report)
}
