//! How the CLI finds and reaches the collector.
//!
//! Order: `--config FILE`, else `~/.config/vitals/cli.toml`, else the
//! environment (`VITALS_COLLECTOR`, `VITALS_CA`, `VITALS_CERT`, `VITALS_KEY`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use vitals_common::tls::TlsFiles;
use vitals_proto::v1::alerts_client::AlertsClient;
use vitals_proto::v1::query_client::QueryClient;

/// `cli.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// Collector gRPC URL, e.g. "https://collector.example:7443".
    pub collector: String,
    /// Name the collector's certificate must carry; default: the URL's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Collector HTTP API base URL (Prometheus-compatible), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Operator certificate (PEM).
    pub cert: PathBuf,
    /// Operator key (PEM).
    pub key: PathBuf,
}

pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/vitals/cli.toml"))
}

/// Finds the CLI settings the documented way.
pub fn load(explicit: Option<&Path>) -> Result<CliConfig> {
    let from_file = |p: &Path| -> Result<CliConfig> {
        let mut c: CliConfig = vitals_common::config::load(p)?;
        let base = p.parent().unwrap_or(Path::new("."));
        c.ca = base.join(&c.ca);
        c.cert = base.join(&c.cert);
        c.key = base.join(&c.key);
        Ok(c)
    };
    if let Some(p) = explicit {
        return from_file(p);
    }
    if let Some(p) = default_path().filter(|p| p.exists()) {
        return from_file(&p);
    }
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    match (
        var("VITALS_COLLECTOR"),
        var("VITALS_CA"),
        var("VITALS_CERT"),
        var("VITALS_KEY"),
    ) {
        (Some(collector), Some(ca), Some(cert), Some(key)) => Ok(CliConfig {
            collector,
            server_name: var("VITALS_SERVER_NAME"),
            http: None,
            ca: ca.into(),
            cert: cert.into(),
            key: key.into(),
        }),
        _ => bail!(
            "no collector configured: pass --config FILE (e.g. vitals-dev/cli.toml), \
             create ~/.config/vitals/cli.toml, or set VITALS_COLLECTOR, VITALS_CA, VITALS_CERT and VITALS_KEY"
        ),
    }
}

/// Connects with the operator certificate (the Query service).
pub async fn connect(cfg: &CliConfig) -> Result<QueryClient<Channel>> {
    Ok(query_client(channel(cfg).await?))
}

/// Connects with the operator certificate (the Alerts service).
pub async fn alerts(cfg: &CliConfig) -> Result<AlertsClient<Channel>> {
    Ok(alerts_client(channel(cfg).await?))
}

/// A Query client over a [`channel`], taking answers as large as a query may give.
pub fn query_client(channel: Channel) -> QueryClient<Channel> {
    QueryClient::new(channel).max_decoding_message_size(256 << 20)
}

/// An Alerts client over a [`channel`] (one channel can carry both).
pub fn alerts_client(channel: Channel) -> AlertsClient<Channel> {
    AlertsClient::new(channel).max_decoding_message_size(256 << 20)
}

/// A mutual-TLS channel to the collector.
pub async fn channel(cfg: &CliConfig) -> Result<Channel> {
    let tls = TlsFiles {
        ca: cfg.ca.clone(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    }
    .load()?;
    let server_name = match &cfg.server_name {
        Some(s) => s.clone(),
        None => vitals_common::tls::host_of(&cfg.collector)
            .with_context(|| format!("no host in collector URL {:?}", cfg.collector))?,
    };
    let channel = Endpoint::from_shared(cfg.collector.clone())
        .with_context(|| format!("bad collector URL {:?}", cfg.collector))?
        .tls_config(tls.client_config(&server_name))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .initial_stream_window_size(vitals_common::H2_STREAM_WINDOW)
        .initial_connection_window_size(vitals_common::H2_CONNECTION_WINDOW)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the collector at {}", cfg.collector))?;
    Ok(channel)
}
