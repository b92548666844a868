//! The gateway seen from outside: CPU and RSS from /proc, /metrics and /readyz over plain
//! HTTP/1.1, and (for the resume storm) stopping and restarting it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn clk_tck() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// utime + stime of `pid` in microseconds.
pub fn cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 1_000_000 / clk_tck())
}

/// CPU time (µs) of each thread of `pid`, by thread id, with the thread's name
/// (`/proc/PID/task/*/stat`; tokio's workers are `tokio-runtime-w`, truncated by the kernel).
pub fn thread_cpu_us(pid: u32) -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = f.get(11).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        out.push((tid, name, ticks * 1_000_000 / clk_tck()));
    }
    out
}

/// VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| {
                s[i + 1..]
                    .split_whitespace()
                    .next()
                    .map(|st| st != "Z" && st != "X")
            })
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// GET `path` over one HTTP/1.1 connection; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = match text.find("\r\n\r\n") {
            Some(i) => text[i + 4..].to_string(),
            None => String::new(),
        };
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), work).await?
}

/// Sum of every sample of metric `name` (all label sets) in a Prometheus text body.
pub fn metric_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `q` quantile (upper bucket bound, seconds) of a Prometheus histogram's observations
/// between two scrapes (`name` without `_bucket`); None when nothing was observed. A body
/// may hold several gateways' scrapes one after the other ([`metrics_all`]): their buckets
/// are added up.
pub fn histogram_quantile(before: &str, after: &str, name: &str, q: f64) -> Option<f64> {
    let buckets = |body: &str| -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut sum: Vec<(f64, f64)> = Vec::new();
        for (le, count) in body.lines().filter_map(|l| {
            let rest = l.strip_prefix(prefix.as_str())?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()?))
        }) {
            match sum.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += count,
                None => sum.push((le, count)),
            }
        }
        sum
    };
    let (b0, b1) = (buckets(before), buckets(after));
    let delta: Vec<(f64, f64)> = b1
        .iter()
        .map(|(le, c)| {
            let was = b0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            (*le, c - was)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= total * q)
        .map(|(le, _)| *le)
}

pub async fn metrics(addr: SocketAddr) -> Option<String> {
    match http_get(addr, "/metrics").await {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// Every gateway's /metrics, one after the other (None if one fails): [`metric_sum`] and
/// [`histogram_quantile`] then add the gateways up.
pub async fn metrics_all(addrs: &[SocketAddr]) -> Option<String> {
    let mut all = String::new();
    for a in addrs {
        all.push_str(&metrics(*a).await?);
        all.push('\n');
    }
    Some(all)
}

/// Waits (bounded) until GET /readyz is 200.
pub async fn wait_ready(addr: SocketAddr, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok((200, _)) = http_get(addr, "/readyz").await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Sends `sig` to `pid` with kill(1) (the workspace forbids `unsafe`, so no libc::kill).
pub fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits (bounded) until `pid` has exited.
pub async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !alive(pid)
}

/// How to start a gateway again (resume storm).
#[derive(Clone, Debug)]
pub struct Launcher {
    pub bin: PathBuf,
    pub config: PathBuf,
    /// CPU to pin it to with taskset, if any.
    pub cpu: Option<String>,
    pub log: PathBuf,
    pub pid_file: Option<PathBuf>,
}

impl Launcher {
    /// Starts `switchboard serve --config ...` with this process's environment
    /// (SWITCHBOARD_LISTEN, REDIS_URL, SWITCHBOARD_JWT_SECRET).
    pub fn start(&self) -> anyhow::Result<Child> {
        let log = std::fs::File::create(&self.log)?;
        let mut cmd = match &self.cpu {
            Some(cpu) if which("taskset") => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu).arg(&self.bin);
                c
            }
            _ => Command::new(&self.bin),
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        if let Some(f) = &self.pid_file {
            std::fs::write(f, format!("{}\n", child.id()))?;
        }
        Ok(child)
    }
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| Path::new(&d).join(name).is_file()))
        .unwrap_or(false)
}

/// Stops a gateway this process started: SIGTERM, a bounded wait, then SIGKILL.
pub async fn stop_child(mut child: Child) {
    let pid = child.id();
    signal(pid, "TERM");
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    #[test]
    fn histograms_of_several_gateways_add_up() {
        let scrape = |a: u32, b: u32, inf: u32| {
            format!(
                "# TYPE h histogram\nh_bucket{{le=\"0.001\"}} {a}\nh_bucket{{le=\"0.01\"}} {b}\n\
                 h_bucket{{le=\"+Inf\"}} {inf}\nh_count {inf}\n"
            )
        };
        let before = format!("{}\n{}", scrape(0, 0, 0), scrape(0, 0, 0));
        // Gateway 1: 100 fast; gateway 2: 2 slow. Together p99 is still fast, p999 not.
        let after = format!("{}\n{}", scrape(100, 100, 100), scrape(0, 0, 2));
        assert_eq!(
            super::histogram_quantile(&before, &after, "h", 0.5),
            Some(0.001)
        );
        assert_eq!(
            super::histogram_quantile(&before, &after, "h", 0.99),
            Some(f64::INFINITY)
        );
        assert_eq!(
            super::histogram_quantile(&before, &after, "h", 0.98),
            Some(0.001)
        );
        assert_eq!(super::metric_sum(&after, "h_count"), 102.0);
    }
}
