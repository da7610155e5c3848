//! `collector.toml`: raw serde structs, then validated runtime settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::config::{self, ConfigError};
use vitals_common::tls::{TlsFiles, TlsMaterial};

pub const DEFAULT_PATH: &str = "/etc/vitals/collector.toml";

/// The collector's config file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the gRPC listener (TLS only; client certificates required).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// How long SIGTERM waits for in-flight batches to be stored and acked.
    #[serde(default = "default_grace", with = "config::duration")]
    pub shutdown_grace: Duration,
    /// Certificates: the CA that signs agents and operators, and our own.
    #[serde(default = "default_tls")]
    pub tls: TlsFiles,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub query: QueryConfig,
    #[serde(default)]
    pub detect: DetectConfig,
    /// Rules, alert lifecycle, silences (see docs/ALERTING.md).
    #[serde(default)]
    pub alerting: crate::alert::AlertingConfig,
    /// The Prometheus-compatible HTTP listener (`/metrics`, `/api/v1/...`);
    /// off unless this table is present (docs/QUERY.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpConfig>,
    /// `[[remote_write]]`: Prometheus remote-write receivers every stored
    /// sample is forwarded to, one table each (docs/REMOTE_WRITE.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_write: Vec<crate::remote_write::RemoteWriteConfig>,
}

/// `[http]`: the Prometheus-compatible HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP listener, e.g. "127.0.0.1:9464".
    pub listen: String,
    /// TLS with client certificates (the `[tls]` files, operator role
    /// required), as the gRPC listener. `false`: plaintext and no identity
    /// check, refused unless `listen` is a loopback address.
    #[serde(default = "default_true")]
    pub tls: bool,
}

/// Validated `[http]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub tls: bool,
}

/// The anomaly detector on ingest (see docs/DETECTION.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DetectConfig {
    /// Score selected series as their samples arrive; each score is stored in
    /// `vitals_anomaly_score{...the series' labels..., metric="NAME"}`.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Which series to score: a selector. Default: all but Vitals' own.
    #[serde(default = "default_detect_series")]
    pub series: String,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            enabled: true,
            series: default_detect_series(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_detect_series() -> String {
    r#"{__name__!~"vitals_.*"}"#.into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// SQLite database file (created if missing).
    #[serde(default = "default_db")]
    pub path: PathBuf,
    /// How long samples are kept; older chunks are deleted whole.
    #[serde(default = "default_retention", with = "config::duration")]
    pub retention: Duration,
    /// Time between checkpoints (open chunks snapshot, WAL truncated).
    #[serde(default = "default_checkpoint", with = "config::duration")]
    pub checkpoint_interval: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueryConfig {
    /// Most series one query may return.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
    /// Most points one query may return (all series together).
    #[serde(default = "default_max_points")]
    pub max_points: usize,
    /// Most stored samples one query may read (an aggregation reads many
    /// more than it returns).
    #[serde(default = "default_max_samples")]
    pub max_samples: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: default_db(),
            retention: default_retention(),
            checkpoint_interval: default_checkpoint(),
        }
    }
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            max_series: default_max_series(),
            max_points: default_max_points(),
            max_samples: default_max_samples(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:7443".into()
}
fn default_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_tls() -> TlsFiles {
    TlsFiles {
        ca: "/etc/vitals/tls/ca.pem".into(),
        cert: "/etc/vitals/tls/collector.pem".into(),
        key: "/etc/vitals/tls/collector.key".into(),
    }
}
fn default_db() -> PathBuf {
    "/var/lib/vitals-collector/vitals.db".into()
}
fn default_retention() -> Duration {
    crate::store::StoreOptions::default().retention
}
fn default_checkpoint() -> Duration {
    crate::store::StoreOptions::default().checkpoint_interval
}
fn default_max_series() -> usize {
    10_000
}
fn default_max_points() -> usize {
    5_000_000
}
fn default_max_samples() -> usize {
    // 16 bytes a sample in memory: at most about 320 MB for one query.
    20_000_000
}

/// Validated settings the collector runs with.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub tls: TlsMaterial,
    pub db_path: PathBuf,
    pub store: crate::store::StoreOptions,
    pub max_series: usize,
    pub max_points: usize,
    pub max_samples: usize,
    pub alerting: crate::alert::AlertSettings,
    /// The HTTP API listener, if configured.
    pub http: Option<HttpSettings>,
    /// Remote-write endpoints (credentials read, TLS files loaded).
    pub remote_write: Vec<std::sync::Arc<crate::remote_write::RemoteWrite>>,
    /// The listener's TLS config, built from `tls` (so a key that does not
    /// match its certificate is a config error, not a failed start).
    pub server_tls: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
    /// The file as written, to tell what a reload changes.
    pub raw: RawConfig,
}

impl Settings {
    /// The query limits these settings give.
    pub fn query_limits(&self) -> crate::promql::Limits {
        crate::promql::Limits {
            max_series: self.max_series,
            max_points: self.max_points,
            max_samples: self.max_samples,
        }
    }
}

/// Reads, parses and validates a collector config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let raw: RawConfig = config::parse(path, &text)?;
    validate_text(path, &text, raw)
}

/// Validates a parsed config (line numbers of inline rules need the text:
/// see [`validate_text`]).
pub fn validate(path: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
    validate_text(path, "", raw)
}

/// Validates a parsed config whose file text is `text`.
pub fn validate_text(path: &Path, text: &str, raw: RawConfig) -> Result<Settings, ConfigError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let listen: SocketAddr = raw.listen.parse().map_err(|e| {
        ConfigError::invalid(
            path,
            "listen",
            format!(
                "{:?} is not an address:port ({e}), e.g. \"0.0.0.0:7443\"",
                raw.listen
            ),
        )
    })?;
    let tls = raw
        .tls
        .relative_to(base)
        .load()
        .map_err(|e| ConfigError::invalid(path, "tls", e.to_string()))?;
    let server_tls = tls
        .rustls_server_config()
        .map_err(|e| ConfigError::invalid(path, "tls", e.to_string()))?;
    let detect = if raw.detect.enabled {
        Some(
            vitals_common::selector::parse(&raw.detect.series)
                .map_err(|e| ConfigError::invalid(path, "detect.series", e))?,
        )
    } else {
        None
    };
    if raw.query.max_series == 0 || raw.query.max_points == 0 || raw.query.max_samples == 0 {
        return Err(ConfigError::invalid(
            path,
            "query",
            "limits must be above 0",
        ));
    }
    let http = match &raw.http {
        None => None,
        Some(h) => Some(http_settings(path, text, h)?),
    };
    let db_path = base.join(&raw.storage.path);
    let alerting = crate::alert::settings(path, text, &raw.alerting, &db_path)?;
    let remote_write: Vec<_> = crate::remote_write::settings(path, text, base, &raw.remote_write)?
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    Ok(Settings {
        alerting,
        http,
        listen,
        shutdown_grace: raw.shutdown_grace,
        tls,
        db_path,
        store: crate::store::StoreOptions {
            detect,
            retention: raw.storage.retention,
            checkpoint_interval: raw.storage.checkpoint_interval,
            remote_write: remote_write.iter().map(|r| r.name.clone()).collect(),
            ..Default::default()
        },
        remote_write,
        max_series: raw.query.max_series,
        max_points: raw.query.max_points,
        max_samples: raw.query.max_samples,
        server_tls,
        raw,
    })
}

/// `[http]` checked: an address, and plaintext only on loopback.
fn http_settings(path: &Path, text: &str, h: &HttpConfig) -> Result<HttpSettings, ConfigError> {
    let listen: SocketAddr = h.listen.parse().map_err(|e| {
        located(
            path,
            text,
            "http",
            "listen",
            format!(
                "{:?} is not an address:port ({e}), e.g. \"127.0.0.1:9464\"",
                h.listen
            ),
        )
    })?;
    if !h.tls && !listen.ip().is_loopback() {
        return Err(located(
            path,
            text,
            "http",
            "tls",
            format!(
                "plaintext HTTP (tls = false) is only allowed on a loopback address, not {listen}: \
                 anyone who reaches it could read every series; use tls = true (client \
                 certificates, operator role) or listen on 127.0.0.1 / [::1]"
            ),
        ));
    }
    Ok(HttpSettings { listen, tls: h.tls })
}

/// A semantic error at the line of `table.key` in `text` (file:line:key,
/// like a parse error), or without a line if the key is not written there.
fn located(path: &Path, text: &str, table: &str, key: &str, message: String) -> ConfigError {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            current = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        let name = l.split('=').next().unwrap_or("").trim().trim_matches('"');
        let dotted = format!("{table}.{key}");
        if l.contains('=')
            && ((current == table && name == key) || (current.is_empty() && name == dotted))
        {
            return ConfigError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                column: line.len() - line.trim_start().len() + 1,
                key: Some(dotted),
                message,
            };
        }
    }
    ConfigError::invalid(path, &format!("{table}.{key}"), message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The collector.toml shown in the README parses, and its alerting
    /// section loads the built-in pack.
    #[test]
    fn the_readme_collector_config_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("`/etc/vitals/collector.toml`:\n\n```toml\n")
            .expect("README shows collector.toml");
        let body = &readme[start..];
        let body = &body[body.find("```toml\n").map(|i| i + 8).unwrap_or(0)..];
        let text = &body[..body.find("```").unwrap_or(body.len())];
        let path = Path::new("README.md");
        let raw: RawConfig = config::parse(path, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.alerting.eval_interval, Duration::from_secs(15));
        let a = crate::alert::settings(
            path,
            text,
            &raw.alerting,
            Path::new("/var/lib/vitals/vitals.db"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.rules.rules.len() >= 15);
        assert_eq!(a.state_path, Path::new("/var/lib/vitals/alerts.db"));
    }

    fn http_of(text: &str) -> Result<Option<HttpSettings>, String> {
        let path = Path::new("/etc/vitals/collector.toml");
        let raw: RawConfig = config::parse(path, text).map_err(|e| e.to_string())?;
        match &raw.http {
            None => Ok(None),
            Some(h) => http_settings(path, text, h)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    #[test]
    fn http_is_off_unless_configured_and_tls_by_default() {
        assert_eq!(http_of("listen = \"0.0.0.0:7443\"\n").unwrap(), None);
        let h = http_of("[http]\nlisten = \"0.0.0.0:9464\"\n")
            .unwrap()
            .unwrap();
        assert!(h.tls);
        assert_eq!(h.listen.port(), 9464);
        let h = http_of("[http]\nlisten = \"127.0.0.1:9464\"\ntls = false\n")
            .unwrap()
            .unwrap();
        assert!(!h.tls);
        assert!(http_of("[http]\nlisten = \"[::1]:9464\"\ntls = false\n").is_ok());
    }

    #[test]
    fn plaintext_http_off_loopback_is_refused_with_file_and_line() {
        let e = http_of(
            "listen = \"0.0.0.0:7443\"\n\n[http]\nlisten = \"0.0.0.0:9464\"\ntls = false\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("/etc/vitals/collector.toml:5:1: key `http.tls`: plaintext"),
            "{e}"
        );
        assert!(e.contains("0.0.0.0:9464"), "{e}");
        let e = http_of("[http]\nlisten = \"localhost:9464\"\n").unwrap_err();
        assert!(
            e.starts_with("/etc/vitals/collector.toml:2:1: key `http.listen`"),
            "{e}"
        );
        let e = http_of("[http]\nlisten = \"127.0.0.1:9464\"\nport = 1\n").unwrap_err();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn the_packaged_config_parses_and_uses_the_package_paths() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/collector.toml");
        let raw: RawConfig = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.storage.path, default_db());
        assert_eq!(
            raw.storage.path,
            Path::new("/var/lib/vitals-collector/vitals.db")
        );
        assert_eq!(raw.tls, default_tls());
        assert_eq!(raw.listen, default_listen());
    }
}
