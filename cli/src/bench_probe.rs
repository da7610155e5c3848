//! `vitals bench probe`: what probing N endpoints costs the agent.
//!
//! The agent's probe source runs in this process against a model server
//! in a child process (this binary with `--serve`, so its CPU is not
//! counted), every endpoint on its own interval; the cycle takes the
//! results once a second, as the agent's tick would. CPU time and memory
//! of this process are measured after a warm-up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use vitals_agent::config::RawConfig;
use vitals_agent::sources::probe::{EndpointConfig, ProbeConfig};

pub struct Options {
    pub endpoints: usize,
    pub interval: Duration,
    pub seconds: u64,
    pub delay_ms: u64,
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub endpoints: usize,
    pub interval_seconds: f64,
    pub measured_seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    pub failed: u64,
    /// CPU (user + system) of the probing process, per second of wall time.
    pub cpu_cores: f64,
    pub cpu_ms_per_request: f64,
    /// Resident memory before the probes started and at the end.
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub rss_per_endpoint_bytes: f64,
    /// The worst p99 any endpoint reported over the run (server delay included).
    pub worst_p99_seconds: f64,
}

/// The model server: answers every request after `delay_ms`, one thread
/// per connection. Prints its port, then serves until killed.
pub fn serve(delay_ms: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").context("listen on 127.0.0.1")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut r = BufReader::new(&mut conn);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len.min(1 << 20)];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(delay_ms));
            let answer = r#"{"label":"positive","score":0.93}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
        });
    }
    Ok(())
}

fn status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    crate::bench::cpu_seconds(std::process::id()).unwrap_or(0.0)
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn probe(opts: &Options) -> anyhow::Result<String> {
    if opts.endpoints == 0 || opts.seconds == 0 {
        bail!("--endpoints and --seconds must be at least 1");
    }
    let exe = std::env::current_exe()?;
    let mut child = Child(
        Command::new(exe)
            .args(["bench", "probe", "--serve", "--delay-ms"])
            .arg(opts.delay_ms.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .context("start the model server")?,
    );
    let mut port = String::new();
    BufReader::new(child.0.stdout.take().context("the server's stdout")?).read_line(&mut port)?;
    let port: u16 = port.trim().parse().context("the server's port")?;

    let mut cfg = RawConfig::default();
    cfg.sources.probe = ProbeConfig {
        endpoints: (0..opts.endpoints)
            .map(|i| {
                let text = format!(
                    "name = \"ep-{i}\"\nurl = \"http://127.0.0.1:{port}/score\"\nbody = '{{\"text\":\"a good film\"}}'\n"
                );
                let mut e: EndpointConfig = toml::from_str(&text)?;
                e.interval = opts.interval;
                e.timeout = Duration::from_secs(5);
                e.labels.insert("model".into(), "bench".into());
                Ok(e)
            })
            .collect::<anyhow::Result<_>>()?,
        ..Default::default()
    };
    let rss_before = status_kb("VmRSS:") * 1024;
    let mut source = vitals_agent::sources::probe::build(&cfg);
    let mut samples = Vec::new();
    let mut take = |samples: &mut Vec<_>| -> anyhow::Result<(u64, u64, f64)> {
        samples.clear();
        source
            .collect(samples)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let _ = source.events();
        let (mut req, mut failed, mut p99) = (0u64, 0u64, 0f64);
        for s in samples.iter() {
            match s.name.as_str() {
                "vitals_probe_requests_total" => req += s.value as u64,
                "vitals_probe_errors_total" => failed += s.value as u64,
                "vitals_probe_latency_seconds"
                    if s.labels.get("quantile").map(String::as_str) == Some("0.99") =>
                {
                    p99 = p99.max(s.value)
                }
                _ => {}
            }
        }
        Ok((req, failed, p99))
    };
    // Warm up: connections, the runtime, the first rounds.
    let warm = Duration::from_secs(3).max(opts.interval * 2);
    let start = Instant::now();
    while start.elapsed() < warm {
        take(&mut samples)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let (req0, failed0, _) = take(&mut samples)?;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut worst: f64 = 0.0;
    let mut last = (req0, failed0);
    while t0.elapsed() < Duration::from_secs(opts.seconds) {
        std::thread::sleep(Duration::from_secs(1));
        let (r, f, p99) = take(&mut samples)?;
        worst = worst.max(p99);
        last = (r, f);
        if !opts.json {
            eprint!(
                "\r{:>4.0}s  {} requests  {} failed",
                t0.elapsed().as_secs_f64(),
                r - req0,
                f - failed0
            );
        }
    }
    let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
    if !opts.json {
        eprintln!();
    }
    let rss_after = status_kb("VmRSS:") * 1024;
    drop(source);
    drop(child);
    let requests = last.0 - req0;
    let r = Report {
        endpoints: opts.endpoints,
        interval_seconds: opts.interval.as_secs_f64(),
        measured_seconds: wall,
        requests,
        requests_per_second: requests as f64 / wall,
        failed: last.1 - failed0,
        cpu_cores: cpu / wall,
        cpu_ms_per_request: if requests > 0 {
            cpu * 1000.0 / requests as f64
        } else {
            0.0
        },
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        rss_per_endpoint_bytes: rss_after.saturating_sub(rss_before) as f64 / opts.endpoints as f64,
        worst_p99_seconds: worst,
    };
    if opts.json {
        return Ok(serde_json::to_string(&r)?);
    }
    Ok(format!(
        "{} endpoints every {:?}: {} requests in {:.1}s ({:.1}/s), {} failed\n\
         CPU: {:.2}% of one core ({:.3} ms per request)\n\
         memory: RSS {:.1} MiB before the probes, {:.1} MiB with them ({:.1} KiB per endpoint)\n\
         worst p99 reported: {:.1} ms (server delay {} ms)",
        r.endpoints,
        opts.interval,
        r.requests,
        wall,
        r.requests_per_second,
        r.failed,
        r.cpu_cores * 100.0,
        r.cpu_ms_per_request,
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        r.rss_per_endpoint_bytes / 1024.0,
        worst * 1000.0,
        opts.delay_ms
    ))
}
