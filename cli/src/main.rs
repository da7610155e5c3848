//! `vitals`: the operator's command line.

mod alloc_count;
mod bench;
mod certs;
mod client;
mod commands;
mod dev;

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
/// Machine-readable output:       add --json to nodes and query
/// Make certificates:             vitals certs init --dir /etc/vitals/tls
///                                vitals certs issue --dir /etc/vitals/tls --name train-01 --role agent
/// Cost of the agent's collection: vitals bench agent [--procfs DIR] [--sysfs DIR] [--cycles N] [--json]
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
    /// List the nodes that have reported, whether connected, when last seen.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Query a series selector over a time range.
    ///
    /// Examples:
    ///   vitals query node_load1
    ///   vitals query 'node_filesystem_avail_bytes{mountpoint=~"/data.*"}' --since 2h
    ///   vitals query 'node_load1{node!="nas-01"}' --start 2026-11-29T10:00:00Z --end now --json
    #[command(verbatim_doc_comment)]
    Query {
        /// Selector: name{label="v", other=~"regex", x!="v", y!~"regex"}.
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
        /// Print {"series":[{"name","labels","points":[[ts_ms, value],...]}]}.
        #[arg(long)]
        json: bool,
    },
    /// Create and inspect certificates (the role is stored in the subject OU).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Measure what Vitals costs on this machine.
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
enum BenchCommand {
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
        } => bench::agent(&bench::Options {
            procfs,
            sysfs,
            cycles,
            sources,
            json,
        })
        .map(|text| print_out(&text)),
        Command::Dev { dir } => runtime()
            .and_then(|rt| rt.block_on(dev::run(&dir)))
            .map(|_| ()),
        Command::Nodes { json } => with_client(cli.config, |cfg| async move {
            commands::nodes(&cfg, json).await
        }),
        Command::Query {
            selector,
            since,
            start,
            end,
            json,
        } => with_client(cli.config, |cfg| async move {
            commands::query(
                &cfg,
                &selector,
                &commands::Range { since, start, end },
                json,
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
