//! `agent.toml`: raw serde structs, then validated runtime settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::config::{self, ConfigError};
use vitals_common::tls::{TlsFiles, TlsMaterial};

pub const DEFAULT_PATH: &str = "/etc/vitals/agent.toml";

/// The agent's config file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Collector URL, e.g. "https://collector.example:7443". Required to run.
    #[serde(default)]
    pub collector: Option<String>,
    /// Name the collector's certificate must carry; default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Node name put on every sample; default: the CN of the agent certificate.
    /// The collector rejects samples for any node but the certificate's.
    #[serde(default)]
    pub node: Option<String>,
    /// Time between collection cycles.
    #[serde(default = "default_interval", with = "config::duration")]
    pub interval: Duration,
    /// How long SIGTERM waits for the spool to be delivered before exiting.
    #[serde(default = "default_grace", with = "config::duration")]
    pub shutdown_grace: Duration,
    #[serde(default = "default_tls")]
    pub tls: TlsFiles,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub paths: PathsConfig,
    #[serde(default)]
    pub sources: SourcesConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the on-disk spool (a SQLite file).
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Most bytes of unacknowledged batches kept; past it the oldest are dropped.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

/// Filesystem roots every source reads through (node_exporter's --path.*).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    #[serde(default = "default_procfs")]
    pub procfs: PathBuf,
    #[serde(default = "default_sysfs")]
    pub sysfs: PathBuf,
}

/// One table per source; each has at least `enabled`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    #[serde(default)]
    pub host: SourceToggle,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceToggle {
    /// Whether the source runs (default: its enabled-by-default bit).
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: default_spool_dir(),
            max_bytes: default_spool_bytes(),
        }
    }
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            procfs: default_procfs(),
            sysfs: default_sysfs(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            collector: None,
            server_name: None,
            node: None,
            interval: default_interval(),
            shutdown_grace: default_grace(),
            tls: default_tls(),
            spool: SpoolConfig::default(),
            paths: PathsConfig::default(),
            sources: SourcesConfig::default(),
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_tls() -> TlsFiles {
    TlsFiles {
        ca: "/etc/vitals/tls/ca.pem".into(),
        cert: "/etc/vitals/tls/agent.pem".into(),
        key: "/etc/vitals/tls/agent.key".into(),
    }
}
fn default_spool_dir() -> PathBuf {
    "/var/lib/vitals-agent".into()
}
fn default_spool_bytes() -> u64 {
    256 << 20
}
fn default_procfs() -> PathBuf {
    "/proc".into()
}
fn default_sysfs() -> PathBuf {
    "/sys".into()
}

/// Validated settings the agent runs with.
#[derive(Clone)]
pub struct Settings {
    pub collector_url: String,
    pub server_name: String,
    pub node: String,
    pub interval: Duration,
    pub shutdown_grace: Duration,
    pub tls: TlsMaterial,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub raw: RawConfig,
}

/// Reads the file and parses it; the raw form is enough for `once`.
pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let mut raw: RawConfig = config::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    raw.tls = raw.tls.relative_to(base);
    raw.spool.dir = base.join(&raw.spool.dir);
    Ok(raw)
}

/// Everything `run` needs, checked: URL, TLS files, node name, limits.
pub fn validate(path: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
    let collector_url = raw.collector.clone().ok_or_else(|| {
        ConfigError::invalid(
            path,
            "collector",
            "missing: set the collector URL, e.g. collector = \"https://collector.example:7443\"",
        )
    })?;
    if !collector_url.starts_with("https://") {
        return Err(ConfigError::invalid(
            path,
            "collector",
            format!("{collector_url:?} must start with https:// (the agent only speaks TLS)"),
        ));
    }
    let server_name = match &raw.server_name {
        Some(s) => s.clone(),
        None => vitals_common::tls::host_of(&collector_url).ok_or_else(|| {
            ConfigError::invalid(path, "collector", format!("no host in {collector_url:?}"))
        })?,
    };
    if raw.interval < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            path,
            "interval",
            "must be at least 10ms",
        ));
    }
    let tls = raw
        .tls
        .load()
        .map_err(|e| ConfigError::invalid(path, "tls", e.to_string()))?;
    let node = match &raw.node {
        Some(n) => n.clone(),
        None => {
            tls.own_identity()
                .map_err(|e| ConfigError::invalid(path, "tls.cert", e.to_string()))?
                .0
        }
    };
    if !vitals_common::identity::valid_node_name(&node) {
        return Err(ConfigError::invalid(
            path,
            "node",
            format!("{node:?} is not a valid node name"),
        ));
    }
    if raw.spool.max_bytes < 1024 {
        return Err(ConfigError::invalid(
            path,
            "spool.max_bytes",
            "must be at least 1024",
        ));
    }
    Ok(Settings {
        collector_url,
        server_name,
        node,
        interval: raw.interval,
        shutdown_grace: raw.shutdown_grace,
        tls,
        spool_dir: raw.spool.dir.clone(),
        spool_max_bytes: raw.spool.max_bytes,
        raw,
    })
}
