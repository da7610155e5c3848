//! `vitals dev`: collector + agent for this host on embedded defaults.
//!
//! First run: a CA and certificates, `collector.toml`, `agent.toml` and
//! `cli.toml` are written into DIR. Later runs keep every file already there,
//! so a person can edit the configs; the same files work with the daemons.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::sync::{oneshot, watch};
use vitals_common::identity::Role;

use crate::certs;

const DEFAULT_PORT: u16 = 7443;
/// The HTTP API's port when free (Prometheus' exporter range).
const DEFAULT_HTTP_PORT: u16 = 9464;

fn node_name() -> String {
    let raw = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

fn free_port(preferred: u16) -> Result<u16> {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    let l = TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free port on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

fn write_new(path: &Path, text: &str) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(true)
}

/// Makes DIR ready; returns (collector.toml, agent.toml, cli.toml, node).
pub fn prepare(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let certs_dir = dir.join("certs");
    if !certs_dir.join(certs::CA_CERT).exists() {
        certs::init(&certs_dir, 3650)?;
        eprintln!("vitals dev: created a CA in {}", certs_dir.display());
    }
    let node = node_name();
    let loopback = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    let wanted: [(&str, Role, &[String], &[IpAddr]); 3] = [
        (
            "collector",
            Role::Collector,
            &["localhost".to_string()],
            &loopback,
        ),
        (&node, Role::Agent, &[], &[]),
        ("operator", Role::Operator, &[], &[]),
    ];
    for (name, role, dns, ips) in wanted {
        if !certs_dir.join(format!("{name}.pem")).exists() {
            certs::issue(
                &certs_dir,
                &certs::IssueRequest {
                    name,
                    role,
                    dns,
                    ips,
                    days: 825,
                    not_after: None,
                },
            )?;
            eprintln!("vitals dev: issued the {role} certificate {name}");
        }
    }
    let collector_toml = dir.join("collector.toml");
    let agent_toml = dir.join("agent.toml");
    let cli_toml = dir.join("cli.toml");
    let (port, http_port) = if collector_toml.exists() {
        (DEFAULT_PORT, DEFAULT_HTTP_PORT) // only used for files that are missing
    } else {
        let port = free_port(DEFAULT_PORT)?;
        // Held while the second port is picked, so the two differ.
        let _hold = TcpListener::bind(("127.0.0.1", port));
        (port, free_port(DEFAULT_HTTP_PORT)?)
    };
    write_new(
        &collector_toml,
        &format!(
            r#"# Vitals collector (written by `vitals dev`; edit freely, it is kept).
# Relative paths are relative to this file's directory.
listen = "127.0.0.1:{port}"
shutdown_grace = "10s"

[tls]
ca = "certs/ca.pem"
cert = "certs/collector.pem"
key = "certs/collector.key"

[storage]
path = "data/vitals.db"

# The Prometheus-compatible HTTP API and /metrics: TLS with client
# certificates (operator role), as the gRPC listener.
[http]
listen = "127.0.0.1:{http_port}"
"#
        ),
    )?;
    let url = collector_url(&collector_toml).unwrap_or_else(|| format!("https://127.0.0.1:{port}"));
    let http_line = http_url(&collector_toml)
        .map(|u| format!("http = \"{u}\"\n"))
        .unwrap_or_default();
    write_new(
        &agent_toml,
        &format!(
            r#"# Vitals agent (written by `vitals dev`; edit freely, it is kept).
# Relative paths are relative to this file's directory.
collector = "{url}"
interval = "5s"

[tls]
ca = "certs/ca.pem"
cert = "certs/{node}.pem"
key = "certs/{node}.key"

[spool]
dir = "spool"
max_bytes = 268435456

[sources.host]
enabled = true
"#
        ),
    )?;
    write_new(
        &cli_toml,
        &format!(
            r#"# Vitals CLI (written by `vitals dev`): vitals --config THIS_FILE ...
collector = "{url}"
{http_line}ca = "certs/ca.pem"
cert = "certs/operator.pem"
key = "certs/operator.key"
"#
        ),
    )?;
    Ok((collector_toml, agent_toml, cli_toml))
}

/// The HTTP API's base URL for the collector config at `path`, if it has
/// one (`https://` unless `[http] tls = false`).
fn http_url(path: &Path) -> Option<String> {
    let raw: vitals_collector::config::RawConfig = vitals_common::config::load(path).ok()?;
    let http = raw.http?;
    let addr: SocketAddr = http.listen.parse().ok()?;
    let host = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    let scheme = if http.tls { "https" } else { "http" };
    Some(format!("{scheme}://{}", SocketAddr::new(host, addr.port())))
}

/// The URL agents should use for the collector config at `path`.
fn collector_url(path: &Path) -> Option<String> {
    let raw: vitals_collector::config::RawConfig = vitals_common::config::load(path).ok()?;
    let addr: SocketAddr = raw.listen.parse().ok()?;
    let host = if addr.ip().is_unspecified() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    Some(format!("https://{}", SocketAddr::new(host, addr.port())))
}

pub async fn run(dir: &Path) -> Result<()> {
    let (collector_toml, agent_toml, cli_toml) = prepare(dir)?;
    let collector_settings = vitals_collector::config::load(&collector_toml)?;
    let agent_settings = vitals_agent::config::load_raw(&agent_toml)
        .and_then(|raw| vitals_agent::config::validate(&agent_toml, raw))?;

    let (stop_collector_tx, mut stop_collector_rx) = watch::channel(false);
    let (listening_tx, listening_rx) = oneshot::channel();
    let collector = tokio::spawn(vitals_collector::run(
        collector_settings,
        async move {
            let _ = stop_collector_rx.wait_for(|s| *s).await;
        },
        move |addr| {
            let _ = listening_tx.send(addr);
        },
    ));
    let addr = match listening_rx.await {
        Ok(a) => a,
        Err(_) => {
            return match collector.await {
                Ok(Err(e)) => Err(e.into()),
                _ => Err(anyhow::anyhow!("the collector stopped before it listened")),
            };
        }
    };
    let node = agent_settings.node.clone();
    let interval = agent_settings.interval;
    let (stop_agent_tx, mut stop_agent_rx) = watch::channel(false);
    let agent = tokio::spawn(vitals_agent::run(agent_settings, async move {
        let _ = stop_agent_rx.wait_for(|s| *s).await;
    }));

    let cli = cli_toml.display();
    let http = match http_url(&collector_toml) {
        Some(u) => format!(
            "\nPrometheus-compatible HTTP API (Grafana: a Prometheus data source with the operator certificate):\n  \
             curl --cacert {d}/certs/ca.pem --cert {d}/certs/operator.pem --key {d}/certs/operator.key {u}/api/v1/query -d query=node_load1\n",
            d = dir.display()
        ),
        None => String::new(),
    };
    let me = if which_vitals() {
        "vitals".to_string()
    } else {
        std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "vitals".into())
    };
    println!(
        "\nVitals is running: collector on {addr} (mutual TLS), agent for node {node} every {}.\n\n\
         Look at the data:\n  {me} --config {cli} nodes\n  {me} --config {cli} query node_load1 --since 5m\n  {me} --config {cli} query node_load1 --json\n\n\
         {http}\n\
         Configs, certificates and data live in {}; edit the configs and run `vitals dev` again.\n\
         Ctrl-C stops both.\n",
        humantime::format_duration(interval),
        dir.display()
    );

    vitals_collector::termination_signal().await;
    eprintln!("vitals dev: stopping the agent, then the collector");
    let _ = stop_agent_tx.send(true);
    match agent.await {
        Ok(Ok(s)) => eprintln!(
            "vitals dev: agent stopped after {} cycles ({} batches left in its spool)",
            s.cycles, s.spooled_left
        ),
        Ok(Err(e)) => eprintln!("vitals dev: agent failed: {e}"),
        Err(e) => eprintln!("vitals dev: agent task failed: {e}"),
    }
    let _ = stop_collector_tx.send(true);
    match collector.await {
        Ok(r) => r?,
        Err(e) => return Err(anyhow::anyhow!("collector task failed: {e}")),
    }
    eprintln!("vitals dev: stopped");
    Ok(())
}

fn which_vitals() -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join("vitals").is_file()))
        .unwrap_or(false)
}
