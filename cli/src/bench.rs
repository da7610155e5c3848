//! `vitals bench ingest`: drives a collector through the real gRPC + mTLS
//! path with simulated agents and reports what it sustained.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use vitals_common::identity::Role;
use vitals_proto::v1::{
    AgentMessage, Batch, Hello, Label, SeriesDef, agent_message, collector_message,
    ingest_client::IngestClient,
};

use crate::certs;

pub struct IngestArgs {
    pub agents: usize,
    pub series_per_agent: usize,
    pub seconds: u64,
    pub json: bool,
    pub keep: Option<PathBuf>,
    /// Batches in flight per simulated agent.
    pub window: usize,
    /// Run the collector with its anomaly detector on (as shipped).
    pub detect: bool,
    /// Drive this collector instead of starting one.
    pub remote: Option<Remote>,
}

/// A collector the bench does not start.
pub struct Remote {
    /// Its gRPC URL, e.g. `https://collector.example:7443`.
    pub url: String,
    /// The CA that signs agent certificates there (`ca.pem`, `ca.key`).
    pub ca_dir: PathBuf,
    /// Name its certificate carries; default: the URL's host.
    pub server_name: Option<String>,
    /// Its process id, when it runs on this host: peak RSS and CPU.
    pub pid: Option<u32>,
}

#[derive(Clone, Copy)]
enum Kind {
    /// Temperature-like: an integer that moves by one now and then.
    SlowInt,
    /// Utilisation-like: an integer percentage that moves often.
    Percent,
    /// A byte counter growing by a varying amount.
    Counter,
    /// A latency in seconds measured in microseconds: a noisy decimal.
    Latency,
}

pub(crate) struct SeriesGen {
    kind: Kind,
    value: f64,
    rng: u64,
}

impl SeriesGen {
    fn next_rand(&mut self) -> u64 {
        // xorshift64*: cheap and deterministic.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub(crate) fn next(&mut self) -> f64 {
        let r = self.next_rand();
        match self.kind {
            Kind::SlowInt => {
                if r.is_multiple_of(20) {
                    self.value += if r & 64 == 0 { 1.0 } else { -1.0 };
                }
            }
            Kind::Percent => {
                if r.is_multiple_of(4) {
                    self.value = (self.value + ((r >> 8) % 11) as f64 - 5.0).clamp(0.0, 100.0);
                }
            }
            Kind::Counter => self.value += (1_000_000 + (r >> 8) % 4096) as f64,
            // The value a parser makes of the text "0.002345" (or a count
            // of microseconds divided by 10^6): the double nearest to it.
            Kind::Latency => self.value = (2000 + (r >> 11) % 1000) as f64 / 1e6,
        }
        self.value
    }
}

pub(crate) fn realistic_series(agent: usize, n: usize) -> (Vec<SeriesDef>, Vec<SeriesGen>) {
    let node = format!("bench-{agent:04}");
    let mut defs = Vec::with_capacity(n);
    let mut gens = Vec::with_capacity(n);
    for i in 0..n {
        let (kind, name, extra) = match i % 10 {
            0..=3 => (
                Kind::SlowInt,
                "gpu_edge_temperature",
                ("gpu", (i % 8).to_string()),
            ),
            4 | 5 => (
                Kind::Percent,
                "gpu_gfx_activity",
                ("gpu", (i % 8).to_string()),
            ),
            6 | 7 => (
                Kind::Counter,
                "node_network_receive_bytes_total",
                ("device", format!("ens{}", i % 4)),
            ),
            _ => (
                Kind::Latency,
                "node_nfs_rtt_seconds",
                ("mount", format!("/data{}", i % 3)),
            ),
        };
        let labels = vec![
            Label {
                name: "index".into(),
                value: i.to_string(),
            },
            Label {
                name: extra.0.into(),
                value: extra.1,
            },
            Label {
                name: "node".into(),
                value: node.clone(),
            },
        ];
        defs.push(SeriesDef {
            id: i as u32,
            name: name.into(),
            labels,
        });
        let start = match kind {
            Kind::SlowInt => 50.0 + (i % 20) as f64,
            Kind::Percent => (i % 100) as f64,
            Kind::Counter => 1e12 + i as f64,
            Kind::Latency => 0.002,
        };
        gens.push(SeriesGen {
            kind,
            value: start,
            rng: 0x9e37_79b9_7f4a_7c15 ^ ((agent * 100_003 + i) as u64 + 1),
        });
    }
    (defs, gens)
}

/// A CA and a collector certificate for localhost / 127.0.0.1 in `dir`,
/// for a collector the bench starts.
pub(crate) fn local_certs(dir: &Path) -> Result<()> {
    certs::init(dir, 2)?;
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    certs::issue(
        dir,
        &certs::IssueRequest {
            name: "collector",
            role: Role::Collector,
            dns: &["localhost".into()],
            ips: &loopback,
            days: 2,
            not_after: None,
        },
    )?;
    Ok(())
}

pub(crate) fn find_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent().map(|d| d.join(name));
    match here.filter(|p| p.exists()) {
        Some(p) => Ok(p),
        None => bail!(
            "{name} not found next to {}; build it (cargo build --release --workspace --bins)",
            exe.display()
        ),
    }
}

fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system) a process has used so far, all threads, from
/// /proc/PID/stat (in clock ticks of 1/100 s, Linux's USER_HZ).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Shared {
    acked_samples: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

pub async fn ingest(args: IngestArgs) -> Result<String> {
    if args.agents == 0 || args.series_per_agent == 0 || args.seconds == 0 {
        bail!("--agents, --series-per-agent and --seconds must be above 0");
    }
    let tmp = tempfile_dir(&args.keep)?;
    let dir = tmp.as_path();
    let certs_dir = dir.join("certs");
    match &args.remote {
        None => local_certs(&certs_dir)?,
        Some(r) => {
            // Agent certificates are issued here, from a copy of the CA, so
            // the operator's CA directory gains no bench certificates.
            std::fs::create_dir_all(&certs_dir)?;
            for f in [certs::CA_CERT, certs::CA_KEY] {
                let from = r.ca_dir.join(f);
                let data = std::fs::read_to_string(&from).with_context(|| {
                    format!(
                        "cannot read {}: --ca-dir must hold the CA that signs the collector's agents ({} and {})",
                        from.display(),
                        certs::CA_CERT,
                        certs::CA_KEY
                    )
                })?;
                certs::write_private(&certs_dir.join(f), &data)?;
            }
        }
    }
    eprintln!("vitals bench: issuing {} agent certificates", args.agents);
    for a in 0..args.agents {
        let name = format!("bench-{a:04}");
        certs::issue(
            &certs_dir,
            &certs::IssueRequest {
                name: &name,
                role: Role::Agent,
                dns: &[],
                ips: &[],
                days: 2,
                not_after: None,
            },
        )?;
    }
    let (url, domain, mut collector, pid) = match &args.remote {
        Some(r) => {
            let domain = match &r.server_name {
                Some(s) => s.clone(),
                None => vitals_common::tls::host_of(&r.url)
                    .with_context(|| format!("no host in collector URL {:?}", r.url))?,
            };
            (r.url.clone(), domain, None, r.pid)
        }
        None => {
            let detect = format!("[detect]\nenabled = {}\n", args.detect);
            let (url, proc) = start_collector(dir, &detect).await?;
            let pid = proc.0.id();
            (url, "localhost".to_string(), Some(proc), Some(pid))
        }
    };
    eprintln!(
        "vitals bench: {} agents x {} series against {url}{} for {} s",
        args.agents,
        args.series_per_agent,
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        args.seconds
    );

    let ca = std::fs::read(certs_dir.join("ca.pem"))?;
    let shared = Arc::new(Shared {
        acked_samples: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let mut tasks = Vec::new();
    for a in 0..args.agents {
        let name = format!("bench-{a:04}");
        let cert = std::fs::read(certs_dir.join(format!("{name}.pem")))?;
        let key = std::fs::read(certs_dir.join(format!("{name}.key")))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(domain.clone());
        let endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("bad collector URL {url:?}"))?
            .tls_config(tls)?;
        let shared = shared.clone();
        let m = args.series_per_agent;
        let window = args.window.max(1);
        tasks.push(tokio::spawn(async move {
            run_agent(a, name, endpoint, m, window, shared).await
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shared.stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(f) = failures.first() {
        bail!("{} simulated agents failed; first: {f}", failures.len());
    }
    let acked = shared.acked_samples.load(Ordering::SeqCst);
    let rss = pid.and_then(peak_rss);
    let collector_cpu = pid.and_then(cpu_seconds);
    let bench_cpu = cpu_seconds(std::process::id()).unwrap_or(0.0);
    // SIGTERM: the collector drains and checkpoints (head flushed, WAL
    // emptied). A collector the bench did not start keeps running, and its
    // disk is not measured.
    let disk = match collector.take() {
        Some(mut proc) => {
            let _ = Command::new("kill")
                .args(["-TERM", &proc.0.id().to_string()])
                .status();
            let status = proc.0.wait()?;
            if !status.success() {
                bail!("collector exited with {status}");
            }
            Some(dir_bytes(&dir.join("data")))
        }
        None => None,
    };
    let mut lat = shared.latencies_us.lock().await;
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i] as f64 / 1000.0
    };
    let samples_per_sec = acked as f64 / elapsed;
    let bytes_per_sample = disk.filter(|_| acked > 0).map(|d| d as f64 / acked as f64);
    let (p50, p99) = (pct(0.5), pct(0.99));
    if args.json {
        return Ok(serde_json::json!({
            "samples_per_sec": samples_per_sec,
            "ack_p50_ms": p50,
            "ack_p99_ms": p99,
            "bytes_per_sample": bytes_per_sample,
            "peak_rss_bytes": rss,
            "acked_samples": acked,
            "seconds": elapsed,
            "agents": args.agents,
            "series_per_agent": args.series_per_agent,
            "window": args.window,
            "detect": args.detect,
            "collector": url,
            "disk_bytes": disk,
            "collector_cpu_seconds": collector_cpu,
            "bench_cpu_seconds": bench_cpu,
        })
        .to_string());
    }
    let not_measured = "not measured (a collector the bench did not start)";
    let disk_line = match (disk, bytes_per_sample) {
        (Some(d), Some(b)) => {
            format!("{d} bytes, {b:.3} bytes/sample (after the head was flushed)")
        }
        _ => not_measured.to_string(),
    };
    let rss_line = rss.map_or(not_measured.to_string(), |r| {
        format!("{:.1} MiB", r as f64 / (1 << 20) as f64)
    });
    let cpu_line = collector_cpu.map_or(not_measured.to_string(), |c| {
        format!(
            "{c:.1} s ({:.0} samples per collector CPU second)",
            acked as f64 / c.max(1e-9)
        )
    });
    Ok(format!(
        "acked samples:      {acked} in {elapsed:.1} s\nsamples/s:          {samples_per_sec:.0}\nack latency:        p50 {p50:.1} ms, p99 {p99:.1} ms\non disk:            {disk_line}\ncollector peak RSS: {rss_line}\nCPU:                collector {cpu_line}, simulated agents {bench_cpu:.1} s"
    ))
}

/// Runs a bench that may start its own collector. SIGTERM or Ctrl-C ends it
/// early with an error; the bench is dropped, which stops the collector it
/// started and removes its scratch directory (a signal's default action
/// would leave that collector running). `vitals bench fleet` handles the
/// signal itself, to report what it measured so far.
pub(crate) async fn interruptible<T>(
    what: &str,
    bench: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let stop = vitals_common::signal::termination();
    tokio::select! {
        r = bench => r,
        () = stop => bail!("vitals bench {what}: interrupted by a signal; a collector it started was stopped"),
    }
}

/// Starts the `vitals-collector` beside this binary on a free loopback
/// port with the certificates in `dir/certs` and its database in
/// `dir/data`, `extra` appended to its config; returns its URL once it
/// listens.
pub(crate) async fn start_collector(dir: &Path, extra: &str) -> Result<(String, CollectorProc)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let cfg = dir.join("collector.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nca = \"certs/ca.pem\"\ncert = \"certs/collector.pem\"\nkey = \"certs/collector.key\"\n[storage]\npath = \"data/vitals.db\"\n{extra}"
        ),
    )?;
    let collector = CollectorProc(
        Command::new(find_binary("vitals-collector")?)
            .args(["--config", cfg.to_str().unwrap_or_default()])
            .env("VITALS_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start vitals-collector")?,
    );
    // A large database takes a while to load its head.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("collector did not listen within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((format!("https://127.0.0.1:{port}"), collector))
}

pub(crate) struct CollectorProc(pub(crate) Child);

impl Drop for CollectorProc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A scratch directory, removed at the end unless `keep` names one.
pub(crate) enum Scratch {
    Temp(PathBuf),
    Kept(PathBuf),
}

impl Scratch {
    pub(crate) fn as_path(&self) -> &Path {
        match self {
            Scratch::Temp(p) | Scratch::Kept(p) => p,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Scratch::Temp(p) = self {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

pub(crate) fn tempfile_dir(keep: &Option<PathBuf>) -> Result<Scratch> {
    if let Some(k) = keep {
        std::fs::create_dir_all(k)?;
        return Ok(Scratch::Kept(k.clone()));
    }
    let p = std::env::temp_dir().join(format!(
        "vitals-bench-{}-{}",
        std::process::id(),
        vitals_common::now_ms()
    ));
    std::fs::create_dir_all(&p)?;
    Ok(Scratch::Temp(p))
}

/// A simulated agent's ingest stream: connected, hello sent, welcome read.
/// Returns where to send batches and where acks come from.
pub(crate) async fn open_stream(
    endpoint: &Endpoint,
    node: &str,
    version: &str,
    index: usize,
    capacity: usize,
) -> Result<(
    mpsc::Sender<AgentMessage>,
    tonic::Streaming<vitals_proto::v1::CollectorMessage>,
)> {
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("agent {node} cannot connect"))?;
    let mut client = IngestClient::new(channel).max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<AgentMessage>(capacity);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            node: node.to_string(),
            agent_version: version.into(),
            instance_id: format!("{version}-{index}-{}", vitals_common::now_ms()),
        })),
    })
    .await?;
    let mut inbound = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    match inbound.message().await?.and_then(|m| m.msg) {
        Some(collector_message::Msg::Welcome(_)) => {}
        _ => bail!("no welcome for {node}"),
    }
    Ok((tx, inbound))
}

async fn run_agent(
    index: usize,
    node: String,
    endpoint: Endpoint,
    m: usize,
    window: usize,
    shared: Arc<Shared>,
) -> Result<()> {
    let (tx, mut inbound) = open_stream(&endpoint, &node, "bench", index, window + 2).await?;
    let (defs, mut gens) = realistic_series(index, m);
    // Simulated time: one tick of 1 s per batch, starting a day ago.
    let mut ts = vitals_common::now_ms() - 86_400_000;
    let mut seq = 0u64;
    let mut inflight: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut latencies = Vec::new();
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        while !stopping && inflight.len() < window {
            seq += 1;
            ts += 1000;
            let values: Vec<f64> = gens.iter_mut().map(SeriesGen::next).collect();
            // Definitions go once per stream; later batches use the ids.
            let batch = Batch {
                seq,
                series: if seq == 1 { defs.clone() } else { Vec::new() },
                series_ids: (0..m as u32).collect(),
                timestamps_ms: vec![ts; m],
                values,
                events: vec![],
            };
            tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Batch(batch)),
            })
            .await?;
            inflight.push_back((seq, Instant::now()));
        }
        if inflight.is_empty() {
            break;
        }
        match inbound.message().await? {
            Some(m2) => {
                if let Some(collector_message::Msg::Ack(a)) = m2.msg {
                    while let Some((s, at)) = inflight.front().copied() {
                        if s > a.seq {
                            break;
                        }
                        inflight.pop_front();
                        latencies.push(at.elapsed().as_micros() as u64);
                        shared.acked_samples.fetch_add(m as u64, Ordering::Relaxed);
                    }
                }
            }
            None => bail!("collector closed the stream of {node}"),
        }
    }
    drop(tx);
    shared.latencies_us.lock().await.extend(latencies);
    Ok(())
}
