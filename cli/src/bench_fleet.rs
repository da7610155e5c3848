//! `vitals bench fleet`: a fleet of agents at their real pace against one
//! collector. Each simulated agent is a real gRPC + mutual-TLS client with
//! its own certificate and stream, sending one batch of its series every
//! interval (phases spread over the interval, as agents started at
//! different times are), with the current time. Reports connected agents,
//! acked samples/s, ack latency, collector CPU and RSS, and the memory
//! each connected agent costs the collector.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::Mutex;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use vitals_common::identity::Role;
use vitals_proto::v1::{AgentMessage, Batch, agent_message, collector_message};

use crate::bench::{SeriesGen, cpu_seconds, realistic_series, start_collector, tempfile_dir};
use crate::certs;

pub struct FleetArgs {
    pub agents: usize,
    pub series_per_agent: usize,
    pub interval: Duration,
    pub duration: Duration,
    pub json: bool,
    pub keep: Option<PathBuf>,
    /// Acks within this long of the start are also reported apart.
    pub warmup: Duration,
}

#[derive(Default)]
struct Shared {
    connected: AtomicU64,
    acked_samples: AtomicU64,
    batches: AtomicU64,
    /// Ack latencies in µs since the last report, and all of them.
    window_us: Mutex<Vec<u64>>,
    all_us: Mutex<Vec<u64>>,
    errors: AtomicU64,
    stop: AtomicBool,
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Open files this process may have (soft limit).
fn max_open_files() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/limits").ok()?;
    s.lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

pub async fn fleet(args: FleetArgs) -> Result<String> {
    if args.agents == 0 || args.series_per_agent == 0 || args.duration.is_zero() {
        bail!("--agents, --series-per-agent and --minutes must be above 0");
    }
    if args.interval < Duration::from_millis(100) {
        bail!("--interval must be at least 100ms");
    }
    let need = args.agents as u64 * 2 + 256;
    if let Some(max) = max_open_files()
        && max < need
    {
        bail!(
            "this shell allows {max} open files; {} agents and the collector's side of their connections need about {need}: raise it (ulimit -n {need}) and run again",
            args.agents
        );
    }
    let tmp = tempfile_dir(&args.keep)?;
    let dir = tmp.as_path();
    let certs_dir = dir.join("certs");
    crate::bench::local_certs(&certs_dir)?;
    eprintln!(
        "vitals bench fleet: issuing {} agent certificates",
        args.agents
    );
    for a in 0..args.agents {
        certs::issue(
            &certs_dir,
            &certs::IssueRequest {
                name: &format!("bench-{a:04}"),
                role: Role::Agent,
                dns: &[],
                ips: &[],
                days: 2,
                not_after: None,
            },
        )?;
    }
    let (url, collector) = start_collector(dir, "").await?;
    let pid = collector.0.id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle_kb = status_kb(pid, "VmRSS:").unwrap_or(0);
    let cpu_start = cpu_seconds(pid).unwrap_or(0.0);
    eprintln!(
        "vitals bench fleet: {} agents x {} series every {:?} against {url} (pid {pid}, idle RSS {:.1} MiB) for {:?}",
        args.agents,
        args.series_per_agent,
        args.interval,
        rss_idle_kb as f64 / 1024.0,
        args.duration
    );
    let ca = std::fs::read(certs_dir.join("ca.pem"))?;
    let shared = Arc::new(Shared::default());
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for a in 0..args.agents {
        let name = format!("bench-{a:04}");
        let cert = std::fs::read(certs_dir.join(format!("{name}.pem")))?;
        let key = std::fs::read(certs_dir.join(format!("{name}.key")))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name("localhost");
        let endpoint = Endpoint::from_shared(url.clone())?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(30));
        // Phases spread over one interval.
        let phase = args.interval.mul_f64(a as f64 / args.agents as f64);
        let (shared, m, every) = (shared.clone(), args.series_per_agent, args.interval);
        tasks.push(tokio::spawn(async move {
            let r = agent(a, name, endpoint, m, start + phase, every, shared.clone()).await;
            if r.is_err() {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        }));
    }

    // Reports every 10 s; memory per agent once all are connected and
    // have sent a couple of batches.
    let began = Instant::now();
    let mut rss_full_kb = None;
    let mut last = (0u64, Instant::now(), cpu_start);
    let mut peak_connected = 0;
    let mut lines = Vec::new();
    // Ack latencies of the windows that began after the warm-up.
    let mut steady: Vec<u64> = Vec::new();
    // SIGTERM or Ctrl-C: stop early, report what was measured, and stop
    // the collector (a signal would otherwise leave it running).
    let stop = vitals_common::signal::termination();
    tokio::pin!(stop);
    let mut interrupted = false;
    while began.elapsed() < args.duration {
        let window_start = began.elapsed();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10).min(args.duration)) => {}
            _ = &mut stop => {
                interrupted = true;
                if !args.json {
                    eprintln!("vitals bench fleet: interrupted after {:.0} s; stopping the collector", began.elapsed().as_secs_f64());
                }
                break;
            }
        }
        let connected = shared.connected.load(Ordering::Relaxed);
        peak_connected = peak_connected.max(connected);
        if rss_full_kb.is_none()
            && connected == args.agents as u64
            && began.elapsed() > args.interval * 3
        {
            rss_full_kb = status_kb(pid, "VmRSS:");
        }
        let acked = shared.acked_samples.load(Ordering::Relaxed);
        let cpu = cpu_seconds(pid).unwrap_or(0.0);
        let mut w = std::mem::take(&mut *shared.window_us.lock().await);
        w.sort_unstable();
        if window_start >= args.warmup {
            steady.extend_from_slice(&w);
        }
        let secs = last.1.elapsed().as_secs_f64();
        let line = format!(
            "[{:>5.0}s] {connected} agents connected, {:.0} samples/s acked, ack p50 {:.1} ms p99 {:.1} ms, collector CPU {:.0}% RSS {:.1} MiB, errors {}",
            began.elapsed().as_secs_f64(),
            (acked - last.0) as f64 / secs,
            quantile(&w, 0.5),
            quantile(&w, 0.99),
            (cpu - last.2) / secs * 100.0,
            status_kb(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
            shared.errors.load(Ordering::Relaxed)
        );
        if !args.json {
            eprintln!("{line}");
        }
        lines.push(line);
        last = (acked, Instant::now(), cpu);
    }
    shared.stop.store(true, Ordering::SeqCst);
    let elapsed = began.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu_start;
    let peak_kb = status_kb(pid, "VmHWM:").unwrap_or(0);
    let rss_end_kb = status_kb(pid, "VmRSS:").unwrap_or(0);
    drop(collector);
    let mut all = std::mem::take(&mut *shared.all_us.lock().await);
    all.sort_unstable();
    steady.sort_unstable();
    let acked = shared.acked_samples.load(Ordering::Relaxed);
    let per_agent =
        rss_full_kb.map(|f| f.saturating_sub(rss_idle_kb) as f64 * 1024.0 / args.agents as f64);
    let report = serde_json::json!({
        "agents": args.agents,
        "connected_agents": peak_connected,
        "series_per_agent": args.series_per_agent,
        "interval_seconds": args.interval.as_secs_f64(),
        "seconds": elapsed,
        "acked_samples": acked,
        "acked_samples_per_sec": acked as f64 / elapsed,
        "batches": shared.batches.load(Ordering::Relaxed),
        "ack_p50_ms": quantile(&all, 0.5),
        "ack_p99_ms": quantile(&all, 0.99),
        "ack_max_ms": all.last().map(|u| *u as f64 / 1000.0),
        "warmup_seconds": args.warmup.as_secs_f64(),
        "ack_p50_after_warmup_ms": (!steady.is_empty()).then(|| quantile(&steady, 0.5)),
        "ack_p99_after_warmup_ms": (!steady.is_empty()).then(|| quantile(&steady, 0.99)),
        "ack_max_after_warmup_ms": steady.last().map(|u| *u as f64 / 1000.0),
        "collector_cpu_cores": cpu / elapsed,
        "collector_rss_idle_bytes": rss_idle_kb * 1024,
        "collector_rss_end_bytes": rss_end_kb * 1024,
        "collector_peak_rss_bytes": peak_kb * 1024,
        "rss_per_agent_bytes": per_agent,
        "failed_agents": failures.len(),
        "interrupted": interrupted,
        "first_failure": failures.first(),
    });
    if args.json {
        return Ok(report.to_string());
    }
    Ok(format!(
        "agents:             {} connected of {} ({} failed{})\nacked samples:      {acked} in {elapsed:.0} s ({:.0}/s)\nack latency:        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\nafter warm-up:      {}\ncollector CPU:      {:.1}% of one core\ncollector RSS:      idle {:.1} MiB, end {:.1} MiB, peak {:.1} MiB\nper connected agent: {}",
        peak_connected,
        args.agents,
        failures.len(),
        failures
            .first()
            .map(|f| format!(": {f}"))
            .unwrap_or_default(),
        acked as f64 / elapsed,
        quantile(&all, 0.5),
        quantile(&all, 0.99),
        all.last().map_or(0.0, |u| *u as f64 / 1000.0),
        if steady.is_empty() {
            format!(
                "none (the run was not longer than --warmup {:?})",
                args.warmup
            )
        } else {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (acks after the first {:?})",
                quantile(&steady, 0.5),
                quantile(&steady, 0.99),
                steady.last().map_or(0.0, |u| *u as f64 / 1000.0),
                args.warmup
            )
        },
        cpu / elapsed * 100.0,
        rss_idle_kb as f64 / 1024.0,
        rss_end_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0,
        per_agent.map_or(
            "not measured (not every agent connected)".into(),
            |b| format!("{:.1} KiB of collector RSS", b / 1024.0)
        ),
    ))
}

async fn agent(
    index: usize,
    node: String,
    endpoint: Endpoint,
    m: usize,
    first: tokio::time::Instant,
    every: Duration,
    shared: Arc<Shared>,
) -> Result<()> {
    tokio::time::sleep_until(first).await;
    let (tx, mut inbound) =
        crate::bench::open_stream(&endpoint, &node, "bench-fleet", index, 4).await?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let (defs, mut gens) = realistic_series(index, m);
    // Ticks on its own planned phase (`first` + k × every), not from when
    // its connection came up: a thousand TLS handshakes at the start finish
    // in clumps, and agents ticking from then would send in bursts for the
    // whole run. Skip, not Delay: after a stall each agent keeps its phase,
    // as real agents (which do not wait for acks to collect) do; Delay
    // would line every agent up on the moment the stall ended.
    let mut tick = tokio::time::interval_at(first, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let (mut seq, mut last_ts) = (0u64, 0i64);
    let r: Result<()> = async {
        while !shared.stop.load(Ordering::Relaxed) {
            tick.tick().await;
            seq += 1;
            let ts = vitals_common::now_ms().max(last_ts + 1);
            last_ts = ts;
            let values: Vec<f64> = gens.iter_mut().map(SeriesGen::next).collect();
            let sent = Instant::now();
            tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Batch(Batch {
                    seq,
                    series: if seq == 1 { defs.clone() } else { Vec::new() },
                    series_ids: (0..m as u32).collect(),
                    timestamps_ms: vec![ts; m],
                    values,
                    events: vec![],
                })),
            })
            .await?;
            loop {
                match inbound.message().await? {
                    Some(msg) => {
                        if let Some(collector_message::Msg::Ack(a)) = msg.msg
                            && a.seq >= seq
                        {
                            break;
                        }
                    }
                    None => bail!("collector closed the stream of {node}"),
                }
            }
            let us = sent.elapsed().as_micros() as u64;
            shared.window_us.lock().await.push(us);
            shared.all_us.lock().await.push(us);
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.acked_samples.fetch_add(m as u64, Ordering::Relaxed);
        }
        Ok(())
    }
    .await;
    shared.connected.fetch_sub(1, Ordering::Relaxed);
    r
}
