//! `vitals-agent`: the daemon, `once` and `check-config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vitals_agent::{AgentError, config};
use vitals_common::{EXIT_CONFIG, EXIT_FAILURE};

/// Vitals agent: collects this host's samples, spools them on disk and
/// streams them to the collector over mutual TLS.
///
/// Examples:
///   vitals-agent --config /etc/vitals/agent.toml
///   vitals-agent check-config --config ./agent.toml
///   vitals-agent once                       # one cycle, Prometheus text
///   vitals-agent once --source host --format json
///   vitals-agent once --procfs ./fixtures/proc --sysfs ./fixtures/sys
///   vitals-agent once --source gpu --gpu-backend rocm --gpu-library /opt/rocm/lib/librocm_smi64.so
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Prom,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Parse and validate the config (and its TLS files), then exit: 0 if good, 2 if not.
    CheckConfig,
    /// Run one collection cycle, print it, and exit. Needs no collector and no certificates.
    Once {
        /// Root of the proc filesystem to read (default: from the config, else /proc).
        #[arg(long)]
        procfs: Option<PathBuf>,
        /// Root of the sys filesystem to read (default: from the config, else /sys).
        #[arg(long)]
        sysfs: Option<PathBuf>,
        /// Root of the device files to look in (default: from the config, else /dev).
        #[arg(long)]
        devfs: Option<PathBuf>,
        /// Run only this source (repeatable); default: every enabled source.
        #[arg(long = "source", value_name = "NAME")]
        sources: Vec<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "prom")]
        format: Format,
        /// GPU backend for this cycle (default: from the config, else auto).
        #[arg(long, value_enum, value_name = "BACKEND")]
        gpu_backend: Option<vitals_agent::sources::gpu::BackendKind>,
        /// GPU vendor library to load (ROCm SMI or NVML) instead of searching.
        #[arg(long, value_name = "PATH")]
        gpu_library: Option<PathBuf>,
    },
}

fn config_path(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vitals_common::logging::init("info");
    match cli.command.unwrap_or(Command::Run) {
        Command::Once {
            procfs,
            sysfs,
            devfs,
            sources,
            format,
            gpu_backend,
            gpu_library,
        } => once(
            cli.config.as_deref(),
            OnceOverrides {
                procfs,
                sysfs,
                devfs,
                gpu_backend,
                gpu_library,
            },
            &sources,
            format,
        ),
        cmd @ (Command::Run | Command::CheckConfig) => {
            let path = config_path(&cli.config);
            let settings =
                match config::load_raw(&path).and_then(|raw| config::validate(&path, raw)) {
                    Ok(s) => s,
                    Err(e) => {
                        vitals_common::report_error("vitals-agent", &e);
                        return ExitCode::from(EXIT_CONFIG);
                    }
                };
            if matches!(cmd, Command::CheckConfig) {
                println!(
                    "{}: ok (node {}, collector {}, spool {})",
                    path.display(),
                    settings.node,
                    settings.collector_url,
                    settings.spool_dir.display()
                );
                return ExitCode::SUCCESS;
            }
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    vitals_common::report_error("vitals-agent", &e);
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            let result = rt.block_on(async move {
                // SIGHUP re-reads the config and certificates; its default
                // action would end the process, so take it over first.
                let hangups = vitals_common::signal::hangup().map_err(AgentError::Signal)?;
                let reload = vitals_agent::reload::Reload { path, hangups };
                vitals_agent::run_reloadable(
                    settings,
                    vitals_common::signal::termination(),
                    Some(reload),
                )
                .await
            });
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    vitals_common::report_error("vitals-agent", &e);
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}

/// What `once` flags change in the config.
struct OnceOverrides {
    procfs: Option<PathBuf>,
    sysfs: Option<PathBuf>,
    devfs: Option<PathBuf>,
    gpu_backend: Option<vitals_agent::sources::gpu::BackendKind>,
    gpu_library: Option<PathBuf>,
}

fn once(
    config_file: Option<&Path>,
    over: OnceOverrides,
    only: &[String],
    format: Format,
) -> ExitCode {
    let default = Path::new(config::DEFAULT_PATH);
    let raw = match config_file {
        Some(p) => config::load_raw(p),
        None if default.exists() => config::load_raw(default),
        None => Ok(config::RawConfig::default()),
    };
    let mut raw = match raw {
        Ok(r) => r,
        Err(e) => {
            vitals_common::report_error("vitals-agent", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(p) = over.procfs {
        raw.paths.procfs = p;
    }
    if let Some(s) = over.sysfs {
        raw.paths.sysfs = s;
    }
    if let Some(d) = over.devfs {
        raw.paths.devfs = d;
    }
    if let Some(b) = over.gpu_backend {
        raw.sources.gpu.backend = b;
    }
    // A one-off cycle must not move the daemon's kernel log position.
    raw.sources.kmsg.keep_position = false;
    if let Some(l) = over.gpu_library {
        raw.sources.gpu.library = Some(l);
    }
    let mut sources = match vitals_agent::cycle::Sources::new(&raw, only) {
        Ok(s) => s,
        Err(e) => {
            vitals_common::report_error("vitals-agent", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cycle = sources.collect();
    match format {
        Format::Prom => {
            for r in &cycle.reports {
                if let Some(e) = &r.error {
                    eprintln!("vitals-agent: source {} {}: {e}", r.source, r.status);
                }
            }
            print!(
                "{}",
                vitals_common::model::prometheus_text(&cycle.samples, None)
            );
        }
        Format::Json => {
            let samples: Vec<serde_json::Value> = cycle
                .samples
                .iter()
                .map(|s| serde_json::json!({"name": s.name.as_str(), "labels": &*s.labels, "value": vitals_common::model::json_value(s.value)}))
                .collect();
            let events: Vec<serde_json::Value> = cycle
                .events
                .iter()
                .map(|e| serde_json::json!({"kind": e.kind, "severity": e.severity.as_str_name(), "message": e.message, "labels": e.labels}))
                .collect();
            let out =
                serde_json::json!({"samples": samples, "events": events, "sources": cycle.reports});
            println!("{out}");
        }
    }
    ExitCode::SUCCESS
}
