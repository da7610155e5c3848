//! `vitals`: the operator's command line.

mod alerts;
mod alloc_count;
mod bench;
mod bench_agent;
mod bench_fleet;
mod bench_probe;
mod bench_query;
mod cache;
mod certs;
mod chart;
mod client;
mod commands;
mod detect;
mod dev;
mod jobs;
mod net;
mod probes;
mod push;
mod top;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vitals_common::identity::Role;
use vitals_common::{EXIT_CONFIG, EXIT_FAILURE};

/// Counts allocations for `vitals bench agent`; otherwise the system allocator.
#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

/// Vitals: monitoring for ML training clusters, storage and inference.
///
/// Start everything locally:      vitals dev
/// List nodes:                    vitals --config vitals-dev/cli.toml nodes
/// Query a series:                vitals --config vitals-dev/cli.toml query 'node_load1{node="train-01"}' --since 1h
/// Functions and aggregations:    vitals query 'avg by (node) (rate(node_cpu_seconds_total{mode="user"}[5m]))' --since 6h
/// Series, events, alerts:        vitals series 'gpu_gfx_activity{node=~"train-.*"}'; vitals events --since 1d; vitals watch
/// The fleet, live:               vitals top [--interval 5s]
/// Machine-readable output:       add --json to any command
/// Make certificates:             vitals certs init --dir /etc/vitals/tls
///                                vitals certs issue --dir /etc/vitals/tls --name train-01 --role agent
/// Cost of the agent's collection: vitals bench agent [--procfs DIR] [--sysfs DIR] [--cycles N] [--json]
/// Ingest throughput:             vitals bench ingest [--agents N] [--series-per-agent M] [--seconds S] [--collector URL --ca-dir DIR] [--json]
/// Query latency:                 vitals bench query [--nodes N] [--gpus G] [--hours H] [--json]
/// Score a CSV for anomalies:     vitals detect data.csv --out scored.csv
///
/// The collector address and TLS files come from --config FILE, else
/// ~/.config/vitals/cli.toml, else VITALS_COLLECTOR, VITALS_CA, VITALS_CERT, VITALS_KEY.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// CLI config file (TOML with collector, ca, cert, key).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the nodes that have reported: whether connected, when last seen,
    /// agent version, role (training: gpu/slurm; storage: zfs/nfsd; other)
    /// and the sources each reports.
    ///
    /// Examples:
    ///   vitals nodes
    ///   vitals nodes --json | jq '.nodes[] | select(.role == "training") | .name'
    #[command(verbatim_doc_comment)]
    Nodes {
        /// Print {"nodes":[{"name","role","connected","last_seen_ms","agent_version","sources"}]}.
        #[arg(long)]
        json: bool,
    },
    /// List the series a selector matches (names and labels, no samples).
    ///
    /// Examples:
    ///   vitals series 'gpu_gfx_activity'
    ///   vitals series '{node="train-01"}' --limit 50
    ///   vitals series '{__name__=~"node_nfs.*", node!="nas-01"}' --json
    #[command(verbatim_doc_comment)]
    Series {
        /// Selector: name{label="v", other=~"regex", x!="v", y!~"regex"}.
        selector: String,
        /// Most series listed (0: the collector's max_series).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Print {"series":[{"name","labels"}],"truncated":bool}.
        #[arg(long)]
        json: bool,
    },
    /// Query a selector or an expression over a time range, or at one time.
    ///
    /// A plain selector without --step lists every stored sample in the
    /// range. An expression (or --step) is evaluated every step:
    ///   selector                          latest sample within 5 min
    ///   rate|increase|delta|changes(selector[5m])
    ///   avg_over_time|max_over_time|min_over_time(selector[5m])
    ///   quantile_over_time(0.99, selector[5m])
    ///   sum|avg|min|max|count [by (label, ...)] (one of the above)
    /// One series is drawn as a text chart in a terminal (--chart: always);
    /// otherwise a table. See docs/QUERY.md.
    ///
    /// Examples:
    ///   vitals query node_load1
    ///   vitals query 'node_filesystem_avail_bytes{mountpoint=~"/data.*"}' --since 2h
    ///   vitals query 'rate(node_network_receive_bytes_total{node="train-01",device="ib0"}[1m])' --since 1h --step 30s
    ///   vitals query 'avg by (node) (gpu_gfx_activity)' --since 24h --json
    ///   vitals query 'max by (node) (gpu_temperature_celsius)' --instant
    ///   vitals query 'node_load1{node!="nas-01"}' --start 2026-11-29T10:00:00Z --end now --json
    #[command(verbatim_doc_comment)]
    Query {
        /// Selector or expression.
        #[arg(value_name = "EXPR")]
        selector: String,
        /// Range ending now (default 15m).
        #[arg(long, conflicts_with = "start")]
        since: Option<String>,
        /// Range start: RFC 3339, Unix seconds, or now.
        #[arg(long)]
        start: Option<String>,
        /// Range end (default: now).
        #[arg(long)]
        end: Option<String>,
        /// Time between evaluations, e.g. 15s (default: the range / 240, at least 1s).
        #[arg(long)]
        step: Option<String>,
        /// Evaluate once, now.
        #[arg(long, conflicts_with_all = ["since", "start", "end", "step"])]
        instant: bool,
        /// Evaluate once, at this time (RFC 3339, Unix seconds).
        #[arg(long, conflicts_with_all = ["since", "start", "end", "step"])]
        at: Option<String>,
        /// Draw a single series as a chart even when not on a terminal.
        #[arg(long)]
        chart: bool,
        /// Print {"series":[{"name","labels","points":[[ts_ms, value],...]}]}.
        #[arg(long)]
        json: bool,
    },
    /// Events agents reported (SLURM job state changes: slurm_job_state, ...), newest first.
    ///
    /// Examples:
    ///   vitals events
    ///   vitals events --node train-01 --kind slurm_job_state --since 2h
    ///   vitals events --start 2026-11-29T00:00:00Z --end 2026-11-30T00:00:00Z --json
    #[command(verbatim_doc_comment)]
    Events {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// Range ending now (default 24h).
        #[arg(long, conflicts_with = "start")]
        since: Option<String>,
        #[arg(long)]
        start: Option<String>,
        #[arg(long)]
        end: Option<String>,
        /// Most events listed (0: 1000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Print {"events":[{"timestamp_ms","node","kind","severity","message","labels"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Follow alerts as they change: the open ones first ("snapshot"), then
    /// each change (pending, firing, resolved, dropped) as the collector
    /// records it, until interrupted.
    ///
    /// Examples:
    ///   vitals watch
    ///   vitals watch --json | jq -c 'select(.change == "firing")'
    #[command(verbatim_doc_comment)]
    Watch {
        /// One JSON object per line: the alert (as in `alerts --json`) with "change" and "at_ms"; new values of open alerts ("updated") too.
        #[arg(long)]
        json: bool,
    },
    /// Alerts firing or pending (with --all, resolved ones too), their evidence
    /// and probable cause.
    ///
    /// Examples:
    ///   vitals alerts
    ///   vitals alerts --state firing
    ///   vitals alerts --all --json
    #[command(verbatim_doc_comment)]
    Alerts {
        /// Resolved alerts too (newest first).
        #[arg(long)]
        all: bool,
        /// Only alerts in this state: pending, firing or resolved.
        #[arg(long)]
        state: Option<String>,
        /// Print {"alerts":[{"rule","state","severity","labels","annotations","evidence","related",...}]}.
        #[arg(long)]
        json: bool,
    },
    /// The running SLURM jobs: nodes, GPUs in use of those allocated, their
    /// average utilisation, the step, loss and throughput the job's log
    /// reports, runtime against the time limit, and the job's open alerts.
    ///
    /// Examples:
    ///   vitals jobs
    ///   vitals jobs --json | jq '.jobs[] | select(.alerts != []) | .job_id'
    #[command(verbatim_doc_comment)]
    Jobs {
        /// Print {"jobs":[{"job_id","name","user","account","partition","nodes",
        /// "gpus_allocated","gpus_in_use","gpu_util_percent","step","loss",
        /// "throughput","runtime_seconds","time_limit_seconds","alerts"}]}.
        #[arg(long)]
        json: bool,
    },
    /// The probed inference endpoints now: latency (p50, p99) against each
    /// one's SLO, the share of failed requests and of right answers to
    /// golden inputs, whether the last round succeeded, and open alerts.
    /// One row per agent probing an endpoint.
    ///
    /// Examples:
    ///   vitals probes
    ///   vitals probes --json | jq '.probes[] | select(.p99_seconds > .slo_latency_seconds)'
    #[command(verbatim_doc_comment)]
    Probes {
        /// Print {"probes":[{"node","endpoint","model","deployment","url","p50_seconds",
        /// "p90_seconds","p99_seconds","slo_latency_seconds","error_ratio","correct_ratio",
        /// "requests_total","up","alerts"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Send samples to the collector: what a model server, batch job or
    /// script reports about itself (real traffic's requests and latencies,
    /// accuracy on labelled feedback). Prometheus' text format, one sample a
    /// line: name{label="value"} VALUE [TIMESTAMP_MS]; stored under this
    /// certificate's name as `node` (an agent or operator certificate).
    ///
    /// Examples:
    ///   vitals push 'model_accuracy{model="sentiment-v3"} 0.931'
    ///   my-eval-job | vitals push --file -
    #[command(verbatim_doc_comment)]
    Push {
        /// Samples, one per argument.
        samples: Vec<String>,
        /// Read lines from this file (`-`: stdin).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print {"accepted": N}.
        #[arg(long)]
        json: bool,
    },
    /// What the collector's actions did (rollbacks, drains...): the audit
    /// record of every action an alert started, newest first — who (rule,
    /// collector), what (command line or request), when, the outcome (ok,
    /// failed, timeout, dry_run, cooldown, interrupted), exit code, output.
    ///
    /// Examples:
    ///   vitals actions
    ///   vitals actions --json | jq '.actions[] | select(.outcome != "ok")'
    #[command(verbatim_doc_comment)]
    Actions {
        /// Most records shown.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print {"actions":[{"id","action","rule","fingerprint","alert_since_ms","labels",
        /// "what","who","dry_run","outcome","started_ms","ended_ms","exit_code","output"}]}.
        #[arg(long)]
        json: bool,
    },
    /// A live full-screen view of the fleet, refreshed every interval: per
    /// node its GPUs (utilisation, VRAM, temperature, power) as bars, NICs
    /// (throughput of link speed, errors), NFS mounts (ops/s, round trip per
    /// operation), ZFS (ARC/L2ARC hit ratio, pool state), running SLURM jobs
    /// and firing alerts. Reads the Query and Alerts services with the
    /// operator certificate, as the other commands do.
    ///
    /// Keys: up/down or j/k select a node, s cycles the sort (name, GPU
    /// utilisation, firing alerts), q (or Esc, Ctrl-C) quits.
    ///
    /// Examples:
    ///   vitals top
    ///   vitals --config vitals-dev/cli.toml top --interval 5s
    #[command(verbatim_doc_comment)]
    Top {
        /// Time between refreshes, e.g. 2s, 500ms (at least 200ms).
        #[arg(long, default_value = "2s", value_parser = top::parse_interval)]
        interval: std::time::Duration,
    },
    /// Hold back notifications for alerts that match, for a while.
    Silence {
        #[command(subcommand)]
        command: SilenceCommand,
    },
    /// Alert rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// SSD-cache eligibility of the datasets NAS agents report
    /// ([sources.zfs] cache_datasets).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Throughput tests between agents ([net_test] listen in their agent.toml).
    Net {
        #[command(subcommand)]
        command: NetCommand,
    },
    /// Create and inspect certificates (the role is stored in the subject OU).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Score timestamp,value CSV files with the anomaly detector, offline.
    ///
    /// Reads `timestamp,value` rows (NAB format; other columns are ignored)
    /// and writes `timestamp,value,anomaly_score` rows in the same order,
    /// each score in [0, 1] from the same detector the collector runs.
    /// Output is written to a temporary file and renamed: an error (it names
    /// the file and line) leaves nothing half-written.
    ///
    /// Examples:
    ///   vitals detect latency.csv                      # to stdout
    ///   vitals detect latency.csv --out scored.csv
    ///   vitals detect --dir NAB/data --out results/    # mirrors relative paths
    #[command(verbatim_doc_comment)]
    Detect {
        /// One CSV file to score.
        #[arg(required_unless_present = "dir", conflicts_with = "dir")]
        file: Option<PathBuf>,
        /// Score every *.csv under this directory instead (needs --out).
        #[arg(long, requires = "out")]
        dir: Option<PathBuf>,
        /// Output CSV (with FILE; default stdout) or results directory (with --dir).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks (figures, not tests; see docs/PERFORMANCE.md and docs/DETECTION.md).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run a local collector and an agent for this host, on embedded defaults.
    Dev {
        /// Directory for configs, certificates and data (kept between runs).
        #[arg(long, default_value = "vitals-dev")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SilenceCommand {
    /// Silence alerts matching a selector, e.g. '{alertname="NodeDown",node="gpu-07"}'.
    ///
    /// Examples:
    ///   vitals silence add '{node="gpu-07"}' --for 2h --comment "replacing a GPU"
    ///   vitals silence add '{alertname=~"Nfs.*"}' --for 30m
    #[command(verbatim_doc_comment)]
    Add {
        /// Prometheus matchers over the alert's labels (alertname, node, severity, team, ...).
        matchers: String,
        /// How long, e.g. 30m, 2h, 1d.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[arg(long)]
        json: bool,
    },
    /// Silences in force (with --all, expired ones too).
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// End a silence now.
    Rm { id: i64 },
}

#[derive(Subcommand)]
enum NetCommand {
    /// Asks the agent at FROM to send N bytes over K TCP streams to the
    /// agent at TO, and prints the throughput the receiver measured, the
    /// sender's TCP retransmits and the share of the sending interface's
    /// negotiated speed ("unknown" where the kernel reports none). FROM and
    /// TO are HOST:PORT of the agents' net-test listeners; the CLI's
    /// operator certificate (from its config) authenticates the request.
    ///
    /// Examples:
    ///   vitals net test gpu-01:7444 nas-01:7444
    ///   vitals net test gpu-01:7444 nas-01:7444 --bytes 4GiB --streams 8 --json
    #[command(verbatim_doc_comment)]
    Test {
        from: String,
        to: String,
        /// Bytes to send: a number or a size like 256MiB, 4GiB, 10GB.
        #[arg(long, default_value = "1GiB")]
        bytes: String,
        /// Parallel TCP streams (1-64).
        #[arg(long, default_value_t = 4)]
        streams: u32,
        /// Print {"from","to","bytes","seconds","bits_per_second","gbit_per_second",
        /// "retransmits","interface","link_speed_mbps","link_ratio","complete"}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Whether each dataset can be served from the NVMe cache (L2ARC) and
    /// RAM (ARC): the verdict, the reasons (secondarycache/primarycache
    /// none or metadata, far larger than ARC + L2ARC, read mostly from disk
    /// in the last 15 minutes) and the fix.
    ///
    /// Examples:
    ///   vitals cache check
    ///   vitals cache check tank/train --json
    #[command(verbatim_doc_comment)]
    Check {
        /// One dataset (default: every reported one).
        dataset: Option<String>,
        /// Print {"datasets":[{"node","dataset","cacheable","reasons":[{"problem","fix","blocking"}],
        /// "properties","referenced_bytes","cache_bytes","read_bytes_per_second","arc_hit_ratio","l2_hit_ratio"}]}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Check a rules file ([[rules]]) or a collector config ([alerting] and
    /// the rule files it names): every error with its file, line and reason;
    /// exit 2 if any.
    ///
    /// Examples:
    ///   vitals rules check /etc/vitals/rules.d/training.toml
    ///   vitals rules check /etc/vitals/collector.toml --json
    #[command(verbatim_doc_comment)]
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// A fleet at its real pace against one collector (the vitals-collector
    /// binary beside this one): N simulated agents, each a real gRPC +
    /// mutual-TLS client with its own certificate, sending its series every
    /// --interval with the current time. Reports connected agents, acked
    /// samples/s, ack latency, collector CPU and RSS every 10 s, and the
    /// collector memory each connected agent costs.
    ///
    /// Needs about 2 open files per agent (ulimit -n).
    ///
    /// Examples:
    ///   vitals bench fleet --agents 1000 --series-per-agent 300 --interval 5s --minutes 10
    ///   vitals bench fleet --agents 100 --seconds 30 --json
    #[command(verbatim_doc_comment)]
    Fleet {
        /// Simulated agents, each with its own certificate and stream.
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// Series per agent (GPU temperatures and utilisation, byte counters, NFS latencies).
        #[arg(long, default_value_t = 300)]
        series_per_agent: usize,
        /// Time between an agent's batches.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// How long to run.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// How long to run, in seconds (instead of --minutes).
        #[arg(long)]
        seconds: Option<u64>,
        /// Keep the collector's directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Acks in the first part of the run (every agent connecting and
        /// creating its series at once) are reported apart, as warm-up.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        warmup: std::time::Duration,
        /// Print {"connected_agents","acked_samples_per_sec","ack_p50_ms","ack_p99_ms",
        /// "ack_p99_after_warmup_ms","collector_cpu_cores","collector_peak_rss_bytes",
        /// "rss_per_agent_bytes",...}.
        #[arg(long)]
        json: bool,
    },
    /// Probe N endpoints of a local model server (a child process, not
    /// measured) with the agent's probe source in this process, each every
    /// --interval, and report the CPU and memory probing costs.
    ///
    /// Examples:
    ///   vitals bench probe --endpoints 100 --interval 1s --seconds 60
    ///   vitals bench probe --endpoints 100 --delay-ms 50 --json
    #[command(verbatim_doc_comment)]
    Probe {
        /// Endpoints probed (one request per round each).
        #[arg(long, default_value_t = 100)]
        endpoints: usize,
        /// Time between rounds of each endpoint.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// How long to measure (after a warm-up of two intervals, at least 3 s).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The model server's answer delay.
        #[arg(long, default_value_t = 5)]
        delay_ms: u64,
        /// Run as the model server (used by the benchmark itself).
        #[arg(long, hide = true)]
        serve: bool,
        /// Print {"endpoints","requests_per_second","failed","cpu_cores","cpu_ms_per_request",
        /// "rss_before_bytes","rss_after_bytes","rss_per_endpoint_bytes","worst_p99_seconds",...}.
        #[arg(long)]
        json: bool,
    },
    /// Run N collection cycles of the agent in this process over a tree and
    /// report CPU time and allocations per cycle and peak RSS.
    ///
    /// `zpool`/`zfs` are not run (they would measure ZFS, not the agent).
    ///
    /// Examples:
    ///   vitals bench agent
    ///   vitals bench agent --procfs shared/fixtures/node_exporter/proc --sysfs shared/fixtures/node_exporter/sys --cycles 2000 --json
    #[command(verbatim_doc_comment)]
    Agent {
        /// Root of the proc filesystem to read (default /proc).
        #[arg(long)]
        procfs: Option<PathBuf>,
        /// Root of the sys filesystem to read (default /sys).
        #[arg(long)]
        sysfs: Option<PathBuf>,
        /// Collection cycles to measure (after one warm-up cycle).
        #[arg(long, default_value_t = 1000)]
        cycles: u32,
        /// Run only this source (repeatable); default: every source enabled by default.
        #[arg(long = "source", value_name = "NAME")]
        sources: Vec<String>,
        /// Print {"cpu_per_cycle_ms","allocs_per_cycle","peak_rss_bytes",...}.
        #[arg(long)]
        json: bool,
    },
    /// Start a collector (the vitals-collector binary beside this one) and
    /// drive it with simulated agents over real gRPC + mutual TLS; report
    /// acked samples/s, ack latency, bytes on disk per sample and peak RSS.
    ///
    /// With --collector URL it drives a running collector instead; agent
    /// certificates come from the CA in --ca-dir (copied, not written to).
    /// Bytes on disk are then not measured, and peak RSS and CPU only with
    /// --collector-pid.
    ///
    /// Examples:
    ///   vitals bench ingest --agents 100 --series-per-agent 1000 --seconds 30 --json
    ///   vitals bench ingest --collector https://127.0.0.1:7443 --ca-dir vitals-dev/certs --agents 10 --seconds 10
    Ingest {
        /// Simulated agents, each with its own certificate and stream.
        #[arg(long, default_value_t = 100)]
        agents: usize,
        /// Series per agent (GPU temperatures and utilisation, byte counters, NFS latencies).
        #[arg(long, default_value_t = 1000)]
        series_per_agent: usize,
        /// How long to send.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Keep the collector's directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Batches each simulated agent may have unacked (more: more throughput, more latency).
        #[arg(long, default_value_t = 2)]
        window: usize,
        /// Run the collector with its anomaly detector on, as shipped
        /// (default: off, to measure the storage path alone).
        #[arg(long, conflicts_with = "collector")]
        detect: bool,
        /// Drive this running collector (gRPC URL) instead of starting one.
        #[arg(long, value_name = "URL", requires = "ca_dir", conflicts_with = "keep")]
        collector: Option<String>,
        /// With --collector: the directory holding the CA (ca.pem, ca.key)
        /// that signs that collector's agent certificates.
        #[arg(long, value_name = "DIR", requires = "collector")]
        ca_dir: Option<PathBuf>,
        /// With --collector: the name its certificate carries (default: the URL's host).
        #[arg(long, requires = "collector")]
        server_name: Option<String>,
        /// With --collector on this host: its process id, for peak RSS and CPU.
        #[arg(long, value_name = "PID", requires = "collector")]
        collector_pid: Option<u32>,
        /// One JSON object: samples_per_sec, ack_p50_ms, ack_p99_ms, bytes_per_sample, peak_rss_bytes
        /// (null when not measured).
        #[arg(long)]
        json: bool,
    },
    /// Query latency: fill a store with GPU utilisation series at 1 s
    /// through its write path, start the vitals-collector binary on it and
    /// time Query calls over mutual TLS (raw 24 h of one series; 1 s steps
    /// of one series; `avg by (node)` and `avg` over all of them).
    ///
    /// Examples:
    ///   vitals bench query
    ///   vitals bench query --nodes 8 --gpus 8 --hours 24 --runs 20 --json
    #[command(verbatim_doc_comment)]
    Query {
        /// Simulated nodes.
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// GPU series per node.
        #[arg(long, default_value_t = 8)]
        gpus: usize,
        /// Hours of 1 s samples per series.
        #[arg(long, default_value_t = 24)]
        hours: u64,
        /// Timed runs per query (after one warm-up).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Keep the collector's directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// One JSON object: stored_samples, fill_seconds, results[{query, points, p50_ms, max_ms}].
        #[arg(long)]
        json: bool,
    },
    /// Anomaly detector: samples per second on one core, bytes per series.
    Detect {
        /// Series scored round-robin, one detector each.
        #[arg(long, default_value_t = 100_000)]
        series: usize,
        /// Samples per series.
        #[arg(long, default_value_t = 100)]
        rounds: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) for one deployment.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the CA in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a key and certificate (DIR/NAME.pem, DIR/NAME.key) signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// Holder's name: the node name for agents (certificate CN).
        #[arg(long)]
        name: String,
        /// agent, operator or collector (certificate OU).
        #[arg(long)]
        role: Role,
        /// DNS name to put in the certificate (repeatable); default: NAME.
        #[arg(long)]
        dns: Vec<String>,
        /// IP address to put in the certificate (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
        /// End of validity instead of --days (YYYY-MM-DD or RFC 3339; may be in the past, for tests).
        #[arg(long)]
        not_after: Option<String>,
    },
    /// Print subject, role, SANs and expiry of a certificate.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vitals_common::logging::init("info");
    let result = match cli.command {
        Command::Certs { command } => certs_cmd(command),
        Command::Bench {
            command:
                BenchCommand::Agent {
                    procfs,
                    sysfs,
                    cycles,
                    sources,
                    json,
                },
        } => bench_agent::agent(&bench_agent::Options {
            procfs,
            sysfs,
            cycles,
            sources,
            json,
        })
        .map(|text| print_out(&text)),
        Command::Bench {
            command:
                BenchCommand::Fleet {
                    agents,
                    series_per_agent,
                    interval,
                    minutes,
                    seconds,
                    keep,
                    warmup,
                    json,
                },
        } => runtime().and_then(|rt| {
            let text = rt.block_on(bench_fleet::fleet(bench_fleet::FleetArgs {
                agents,
                series_per_agent,
                interval,
                duration: std::time::Duration::from_secs(seconds.unwrap_or(minutes * 60)),
                json,
                keep,
                warmup,
            }))?;
            print_out(&text);
            Ok(())
        }),
        Command::Bench {
            command:
                BenchCommand::Ingest {
                    agents,
                    series_per_agent,
                    seconds,
                    keep,
                    json,
                    window,
                    detect,
                    collector,
                    ca_dir,
                    server_name,
                    collector_pid,
                },
        } => runtime().and_then(|rt| {
            let remote = match (collector, ca_dir) {
                (Some(url), Some(ca_dir)) => Some(bench::Remote {
                    url,
                    ca_dir,
                    server_name,
                    pid: collector_pid,
                }),
                _ => None,
            };
            let text = rt.block_on(bench::interruptible(
                "ingest",
                bench::ingest(bench::IngestArgs {
                    agents,
                    series_per_agent,
                    seconds,
                    json,
                    keep,
                    window,
                    detect,
                    remote,
                }),
            ))?;
            print_out(&text);
            Ok(())
        }),
        Command::Bench {
            command:
                BenchCommand::Query {
                    nodes,
                    gpus,
                    hours,
                    runs,
                    keep,
                    json,
                },
        } => runtime().and_then(|rt| {
            let text = rt.block_on(bench::interruptible(
                "query",
                bench_query::query(bench_query::QueryBenchArgs {
                    nodes,
                    gpus,
                    hours,
                    runs,
                    keep,
                    json,
                }),
            ))?;
            print_out(&text);
            Ok(())
        }),
        Command::Detect { file, dir, out } => detect::run(file, dir, out),
        Command::Bench {
            command:
                BenchCommand::Detect {
                    series,
                    rounds,
                    json,
                },
        } => {
            print_out(&detect::bench(series, rounds, json));
            Ok(())
        }
        Command::Bench {
            command:
                BenchCommand::Probe {
                    endpoints,
                    interval,
                    seconds,
                    delay_ms,
                    serve,
                    json,
                },
        } => {
            if serve {
                bench_probe::serve(delay_ms)
            } else {
                bench_probe::probe(&bench_probe::Options {
                    endpoints,
                    interval,
                    seconds,
                    delay_ms,
                    json,
                })
                .map(|text| print_out(&text))
            }
        }
        Command::Dev { dir } => runtime()
            .and_then(|rt| rt.block_on(dev::run(&dir)))
            .map(|_| ()),
        Command::Alerts { all, state, json } => with_client(cli.config, |cfg| async move {
            alerts::alerts(&cfg, all, state, json).await
        }),
        Command::Jobs { json } => {
            with_client(
                cli.config,
                |cfg| async move { jobs::jobs(&cfg, json).await },
            )
        }
        Command::Probes { json } => {
            with_client(
                cli.config,
                |cfg| async move { probes::probes(&cfg, json).await },
            )
        }
        Command::Push {
            samples,
            file,
            json,
        } => {
            let text = match &file {
                Some(f) if f.as_os_str() == "-" => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
                }
                Some(f) => std::fs::read_to_string(f),
                None => Ok(String::new()),
            };
            match text {
                Ok(mut text) => {
                    for s in &samples {
                        text.push('\n');
                        text.push_str(s);
                    }
                    with_client(cli.config, |cfg| async move {
                        push::push(&cfg, &text, json).await
                    })
                }
                Err(e) => Err(anyhow::anyhow!(
                    "cannot read {}: {e}",
                    file.as_deref()
                        .unwrap_or(std::path::Path::new("-"))
                        .display()
                )),
            }
        }
        Command::Actions { limit, json } => with_client(cli.config, |cfg| async move {
            probes::actions(&cfg, limit, json).await
        }),
        Command::Top { interval } => client::load(cli.config.as_deref())
            .and_then(|cfg| runtime()?.block_on(top::run(&cfg, interval))),
        Command::Watch { json } => client::load(cli.config.as_deref())
            .and_then(|cfg| runtime()?.block_on(alerts::watch(&cfg, json, std::io::stdout()))),
        Command::Series {
            selector,
            limit,
            json,
        } => with_client(cli.config, |cfg| async move {
            commands::series(&cfg, &selector, limit, json).await
        }),
        Command::Events {
            node,
            kind,
            since,
            start,
            end,
            limit,
            json,
        } => with_client(cli.config, |cfg| async move {
            commands::events(
                &cfg,
                node,
                kind,
                &commands::Range { since, start, end },
                limit,
                json,
            )
            .await
        }),
        Command::Silence { command } => match command {
            SilenceCommand::Add {
                matchers,
                duration,
                comment,
                json,
            } => with_client(cli.config, |cfg| async move {
                alerts::silence_add(&cfg, &matchers, &duration, &comment, json).await
            }),
            SilenceCommand::List { all, json } => with_client(cli.config, |cfg| async move {
                alerts::silence_list(&cfg, all, json).await
            }),
            SilenceCommand::Rm { id } => with_client(cli.config, |cfg| async move {
                alerts::silence_rm(&cfg, id).await
            }),
        },
        Command::Rules {
            command: RulesCommand::Check { file, json },
        } => alerts::check(&file, json).map(|text| print_out(&text)),
        Command::Net {
            command:
                NetCommand::Test {
                    from,
                    to,
                    bytes,
                    streams,
                    json,
                },
        } => with_client(cli.config, |cfg| async move {
            net::test(&cfg, &from, &to, &bytes, streams, json).await
        }),
        Command::Cache {
            command: CacheCommand::Check { dataset, json },
        } => with_client(cli.config, |cfg| async move {
            cache::check(&cfg, dataset, json).await
        }),
        Command::Nodes { json } => with_client(cli.config, |cfg| async move {
            commands::nodes(&cfg, json).await
        }),
        Command::Query {
            selector,
            since,
            start,
            end,
            step,
            instant,
            at,
            chart,
            json,
        } => with_client(cli.config, |cfg| async move {
            commands::query(
                &cfg,
                &commands::QueryArgs {
                    expr: selector,
                    range: commands::Range { since, start, end },
                    step,
                    at,
                    instant,
                    chart,
                    json,
                },
            )
            .await
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let config_error = e
                .chain()
                .any(|c| c.is::<vitals_common::config::ConfigError>());
            let mut msg = format!("vitals: {e}");
            for cause in e.chain().skip(1) {
                let text = cause.to_string();
                if !msg.contains(&text) {
                    msg.push_str(&format!("\n  caused by: {text}"));
                }
            }
            eprintln!("{msg}");
            ExitCode::from(if config_error {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            })
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

fn with_client<F, Fut>(config: Option<PathBuf>, f: F) -> anyhow::Result<()>
where
    F: FnOnce(client::CliConfig) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    let cfg = client::load(config.as_deref())?;
    let text = runtime()?.block_on(f(cfg))?;
    print_out(&text);
    Ok(())
}

fn certs_cmd(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init { dir, days } => {
            let path = certs::init(&dir, days)?;
            print_out(&format!(
                "created CA {} (key {}, mode 0600)\nnext: vitals certs issue --dir {} --name NAME --role agent|operator|collector",
                path.display(),
                dir.join(certs::CA_KEY).display(),
                dir.display()
            ));
        }
        CertsCommand::Issue {
            dir,
            name,
            role,
            dns,
            ip,
            days,
            not_after,
        } => {
            let not_after = not_after.as_deref().map(certs::parse_date).transpose()?;
            let (cert, key) = certs::issue(
                &dir,
                &certs::IssueRequest {
                    name: &name,
                    role,
                    dns: &dns,
                    ips: &ip,
                    days,
                    not_after,
                },
            )?;
            print_out(&format!(
                "issued {role} certificate for {name}: {} (key {}, mode 0600)",
                cert.display(),
                key.display()
            ));
        }
        CertsCommand::Show { file, json } => print_out(&certs::show(&file, json)?),
    }
    Ok(())
}
