//! `vitals-collector`: the daemon and its `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vitals_common::{EXIT_CONFIG, EXIT_FAILURE};

/// Vitals collector: receives samples from agents over mutual-TLS gRPC,
/// stores them in SQLite and answers queries.
///
/// Examples:
///   vitals-collector --config /etc/vitals/collector.toml
///   vitals-collector check-config --config ./collector.toml
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, default_value = vitals_collector::config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector (the default).
    Run,
    /// Parse and validate the config (and its TLS files), then exit: 0 if good, 2 if not.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    vitals_common::logging::init("info");
    let settings = match vitals_collector::config::load(&cli.config) {
        Ok(s) => s,
        Err(e) => {
            vitals_common::report_error("vitals-collector", &e);
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            let http = match settings.http {
                Some(h) if h.tls => format!(", HTTP API on {} (TLS)", h.listen),
                Some(h) => format!(", HTTP API on {} (plaintext, loopback)", h.listen),
                None => String::new(),
            };
            println!(
                "{}: ok (listen {}, database {}{http})",
                cli.config.display(),
                settings.listen,
                settings.db_path.display()
            );
            ExitCode::SUCCESS
        }
        Command::Run => {
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    vitals_common::report_error("vitals-collector", &e);
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            let path = cli.config.clone();
            let result = rt.block_on(async move {
                // SIGHUP re-reads the config and certificates; its default
                // action would end the process, so take it over first.
                let hangups =
                    vitals_common::signal::hangup().map_err(vitals_collector::RunError::Signal)?;
                let reload = vitals_collector::reload::Reload { path, hangups };
                vitals_collector::run_reloadable(
                    settings,
                    vitals_collector::termination_signal(),
                    |_| {},
                    Some(reload),
                )
                .await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    vitals_common::report_error("vitals-collector", &e);
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
    }
}
