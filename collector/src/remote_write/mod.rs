//! Prometheus remote write 1.0: every sample the store keeps, forwarded to
//! one or more Prometheus-compatible receivers (Prometheus, Mimir, Thanos
//! Receive, VictoriaMetrics, Cortex), one `[[remote_write]]` table each.
//!
//! The store's WAL is the queue. Each WAL row is one stored batch (its
//! accepted samples, anomaly scores and `ALERTS` included) with an id that
//! never repeats (AUTOINCREMENT); each endpoint has a cursor in the
//! database, the last row its receiver accepted. A sender reads the rows
//! after its cursor, spreads their samples over `shards` by series (so
//! one series' samples leave in order, on one shard), sends each shard's
//! requests one after the other (the shards side by side), and moves the
//! cursor — through the store writer, committed — only once every request
//! of the rows read was answered 2xx or refused for good. A checkpoint
//! keeps the rows above the lowest cursor (up to `storage.retention`), so
//! a restart of the collector or an outage of the receiver resumes at the
//! cursor and loses nothing.
//!
//! Retried: no answer (connect, TLS, timeout), 5xx, 429, 408 and 3xx (a
//! redirect is more often a wrong URL than intent; nothing is lost while
//! the config is fixed), with exponential backoff from `min_backoff` to
//! `max_backoff` (`Retry-After` respected within those bounds). Refused
//! for good: any other 4xx — the request's samples are counted as dropped
//! and logged once with the status and the head of the answer.
//!
//! Duplicates: a receiver's 2xx that arrives after the collector stopped
//! (or crashed) and before the cursor commit is not known; those rows are
//! sent again after the restart. Remote-write receivers take a repeated
//! identical sample as a no-op, or refuse it as out of order (counted as
//! dropped — the samples are there already). SIGTERM lets the rows in
//! flight finish within `shutdown_grace`, so a clean restart sends none
//! twice.

pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vitals_common::config::{ConfigError, duration};
use vitals_common::model::Labels;

use crate::notify::http::{self, ClientTls, Endpoint};
use crate::store::{Store, Writer};

/// `[[remote_write]]`: one receiver. Names follow Prometheus's own
/// `remote_write` config where it has the same setting.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteConfig {
    /// The receiver's write URL (`http://` or `https://`), e.g.
    /// "https://mimir.example/api/v1/push".
    pub url: String,
    /// Names this endpoint in metrics and logs, and owns its place in the
    /// queue (a renamed endpoint starts again from what is stored next).
    /// Default: the URL without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Basic auth user; the password is read from `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// File holding a bearer token (`Authorization: Bearer ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// PEM file of CA certificates for an https URL (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The name the receiver's certificate must have (default: the URL's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// Labels added to every series that does not have them, e.g.
    /// `{ cluster = "lab" }`.
    #[serde(default)]
    pub external_labels: BTreeMap<String, String>,
    /// One request: connect, TLS, send, answer.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Requests in flight at once; series are spread over the shards.
    #[serde(default = "default_shards")]
    pub shards: usize,
    /// Most samples in one request.
    #[serde(default = "default_max_samples_per_send")]
    pub max_samples_per_send: usize,
    /// Wait after the first failed attempt, doubled after each one...
    #[serde(default = "default_min_backoff", with = "duration")]
    pub min_backoff: Duration,
    /// ...up to this.
    #[serde(default = "default_max_backoff", with = "duration")]
    pub max_backoff: Duration,
    /// Also send the collector's `ALERTS` series (open alerts, with `alertstate`).
    #[serde(default = "default_true")]
    pub send_alerts: bool,
    /// Also send `vitals_anomaly_score` and `vitals_anomaly_alarms_total`.
    #[serde(default = "default_true")]
    pub send_anomaly_scores: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_shards() -> usize {
    4
}
fn default_max_samples_per_send() -> usize {
    2000
}
fn default_min_backoff() -> Duration {
    Duration::from_millis(30)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}
fn default_true() -> bool {
    true
}

/// Most shards one endpoint may have.
pub const MAX_SHARDS: usize = 64;

/// How a request says who sends it. The secret is never printed.
#[derive(Clone, PartialEq, Eq)]
enum Auth {
    None,
    /// The whole `Authorization` header value.
    Header(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => f.write_str("none"),
            Auth::Header(_) => f.write_str("<redacted>"),
        }
    }
}

/// One validated `[[remote_write]]`.
#[derive(Debug, Clone)]
pub struct RemoteWrite {
    pub name: String,
    endpoint: Endpoint,
    auth: Auth,
    /// Sorted by name.
    external_labels: Vec<(String, String)>,
    pub timeout: Duration,
    pub shards: usize,
    pub max_samples_per_send: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub send_alerts: bool,
    pub send_anomaly_scores: bool,
}

impl RemoteWrite {
    /// `scheme://host[:port]/path` (no query: it may hold a token).
    pub fn url(&self) -> String {
        format!("{}{}", self.endpoint.origin(), self.endpoint.path())
    }
}

/// Validates every `[[remote_write]]` table (`raw[i]` is the i-th one in
/// the file): URL, credentials and TLS files (read now, so a missing one
/// fails the start or the reload), limits, unique names. Relative paths
/// are relative to `base`.
pub fn settings(
    path: &Path,
    text: &str,
    base: &Path,
    raw: &[RemoteWriteConfig],
) -> Result<Vec<RemoteWrite>, ConfigError> {
    let mut out: Vec<RemoteWrite> = Vec::with_capacity(raw.len());
    for (i, c) in raw.iter().enumerate() {
        let err = |key: &str, message: String| located(path, text, i, key, message);
        let rw = one(c, base).map_err(|(key, message)| err(key, message))?;
        if let Some(other) = out.iter().position(|o| o.name == rw.name) {
            return Err(err(
                if c.name.is_some() { "name" } else { "url" },
                format!(
                    "remote_write[{other}] already has the name {:?}: give each endpoint its own `name`",
                    rw.name
                ),
            ));
        }
        out.push(rw);
    }
    Ok(out)
}

/// One endpoint checked; an error is (key within the table, message).
fn one(c: &RemoteWriteConfig, base: &Path) -> Result<RemoteWrite, (&'static str, String)> {
    let file = |p: &PathBuf| base.join(p);
    let (ca, cert, key) = (
        c.ca_file.as_ref().map(file),
        c.cert_file.as_ref().map(file),
        c.key_file.as_ref().map(file),
    );
    let identity = match (&cert, &key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        (None, None) => None,
        (Some(_), None) => {
            return Err((
                "key_file",
                "cert_file is set but key_file is not: mutual TLS needs both".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "cert_file",
                "key_file is set but cert_file is not: mutual TLS needs both".into(),
            ));
        }
    };
    let endpoint = Endpoint::parse_tls(
        &c.url,
        &ClientTls {
            ca: ca.as_deref(),
            identity,
            server_name: c.server_name.as_deref(),
        },
    )
    .map_err(|e| match e {
        http::EndpointError::Url(m) => ("url", m),
        http::EndpointError::Ca(m) => ("ca_file", m),
        http::EndpointError::Identity(m) => ("cert_file", m),
        http::EndpointError::ServerName(m) => ("server_name", m),
    })?;
    if !endpoint.is_https() {
        for (key, set) in [
            ("ca_file", c.ca_file.is_some()),
            ("cert_file", c.cert_file.is_some()),
            ("server_name", c.server_name.is_some()),
        ] {
            if set {
                return Err((
                    key,
                    format!("{:?} is http://: TLS settings need an https:// URL", c.url),
                ));
            }
        }
    }
    let auth = match (&c.username, &c.password_file, &c.bearer_token_file) {
        (None, None, None) => Auth::None,
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => {
            return Err((
                "bearer_token_file",
                "use either basic auth (username, password_file) or bearer_token_file, not both"
                    .into(),
            ));
        }
        (Some(_), None, None) => {
            return Err((
                "password_file",
                "username is set but password_file is not: basic auth needs both".into(),
            ));
        }
        (None, Some(_), None) => {
            return Err((
                "username",
                "password_file is set but username is not: basic auth needs both".into(),
            ));
        }
        (Some(user), Some(pw), None) => {
            if user.contains(':') {
                return Err((
                    "username",
                    "a basic auth user name cannot contain ':'".into(),
                ));
            }
            let pw = secret(&file(pw)).map_err(|m| ("password_file", m))?;
            Auth::Header(format!(
                "Basic {}",
                base64(format!("{user}:{pw}").as_bytes())
            ))
        }
        (None, None, Some(t)) => {
            let t = secret(&file(t)).map_err(|m| ("bearer_token_file", m))?;
            Auth::Header(format!("Bearer {t}"))
        }
    };
    if auth != Auth::None && !endpoint.is_https() && !endpoint.is_loopback() {
        return Err((
            "url",
            format!(
                "{}: credentials would cross the network in plaintext; use an https:// URL \
                 (http:// with credentials is only allowed to a loopback address)",
                endpoint.origin()
            ),
        ));
    }
    let mut external_labels = Vec::with_capacity(c.external_labels.len());
    for (k, v) in &c.external_labels {
        if !vitals_common::model::valid_label_name(k) || k.starts_with("__") {
            return Err((
                "external_labels",
                format!("{k:?} is not a label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)"),
            ));
        }
        if v.is_empty() {
            return Err((
                "external_labels",
                format!("{k:?} has an empty value (an empty label is no label)"),
            ));
        }
        external_labels.push((k.clone(), v.clone()));
    }
    if c.shards == 0 || c.shards > MAX_SHARDS {
        return Err((
            "shards",
            format!("{} is out of range: 1 to {MAX_SHARDS}", c.shards),
        ));
    }
    if c.max_samples_per_send == 0 {
        return Err(("max_samples_per_send", "must be at least 1".into()));
    }
    if c.timeout.is_zero() {
        return Err(("timeout", "must be above 0, e.g. \"30s\"".into()));
    }
    if c.min_backoff.is_zero() {
        return Err(("min_backoff", "must be above 0, e.g. \"30ms\"".into()));
    }
    if c.max_backoff < c.min_backoff {
        return Err((
            "max_backoff",
            format!(
                "{:?} is below min_backoff ({:?})",
                c.max_backoff, c.min_backoff
            ),
        ));
    }
    let name = match &c.name {
        Some(n) if n.trim().is_empty() => return Err(("name", "must not be empty".into())),
        Some(n) => n.clone(),
        None => format!("{}{}", endpoint.origin(), endpoint.path()),
    };
    Ok(RemoteWrite {
        name,
        endpoint,
        auth,
        external_labels,
        timeout: c.timeout,
        shards: c.shards,
        max_samples_per_send: c.max_samples_per_send,
        min_backoff: c.min_backoff,
        max_backoff: c.max_backoff,
        send_alerts: c.send_alerts,
        send_anomaly_scores: c.send_anomaly_scores,
    })
}

/// A password or token file: its first line, trimmed. The error names the
/// file, never what is in it.
fn secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let s = text.lines().next().unwrap_or("").trim();
    if s.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if text.lines().skip(1).any(|l| !l.trim().is_empty()) {
        return Err(format!(
            "{} has more than one line: put only the secret in it",
            path.display()
        ));
    }
    Ok(s.to_string())
}

/// Standard base64 with padding (RFC 4648), for basic auth.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(A[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// An error at the line of `key` in the `index`-th `[[remote_write]]`
/// table of `text` (file:line:key), or without a line if it is not there.
fn located(path: &Path, text: &str, index: usize, key: &str, message: String) -> ConfigError {
    let dotted = format!("remote_write[{index}].{key}");
    let mut seen: Option<usize> = None;
    let mut table_line = None;
    for (n, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            let inner = l.trim_start_matches('[').trim_end_matches(']').trim();
            if l.starts_with("[[") && inner == "remote_write" {
                seen = Some(seen.map_or(0, |s| s + 1));
                if seen == Some(index) {
                    table_line = Some(n);
                }
            } else if seen == Some(index) && !inner.starts_with("remote_write.") {
                break;
            }
            continue;
        }
        if seen != Some(index) {
            continue;
        }
        let name = l.split('=').next().unwrap_or("").trim().trim_matches('"');
        if l.contains('=') && name == key {
            return ConfigError::Parse {
                path: path.to_path_buf(),
                line: n + 1,
                column: line.len() - line.trim_start().len() + 1,
                key: Some(dotted),
                message,
            };
        }
    }
    match table_line {
        Some(n) => ConfigError::Parse {
            path: path.to_path_buf(),
            line: n + 1,
            column: 1,
            key: Some(dotted),
            message,
        },
        None => ConfigError::invalid(path, &dotted, message),
    }
}

// ------------------------------------------------------------- metrics --

/// One endpoint's counts, read by `/metrics`.
#[derive(Debug)]
pub struct Stats {
    pub name: String,
    /// Samples stored after the cursor (as of the last count, every
    /// second; before the `send_*` filters).
    pub pending: AtomicU64,
    /// Samples a receiver accepted (2xx).
    pub sent: AtomicU64,
    /// Samples a receiver refused for good (4xx), not sent again.
    pub refused: AtomicU64,
    /// Samples in WAL rows that failed their checksum, skipped.
    pub corrupt: AtomicU64,
    /// Samples in attempts that failed and were retried.
    pub retried: AtomicU64,
    /// Receive time (ms) of the oldest stored batch not yet sent; 0: none.
    pub oldest_unsent_ms: AtomicI64,
    /// When a receiver last answered 2xx (ms); 0: never since start.
    pub last_success_ms: AtomicI64,
    /// The cursor: the last WAL id delivered.
    pub cursor: AtomicI64,
    /// Requests by answer: the HTTP status, or "error" when none came
    /// (connect, TLS, timeout).
    pub requests: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn new(name: &str) -> Stats {
        Stats {
            name: name.to_string(),
            pending: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            oldest_unsent_ms: AtomicI64::new(0),
            last_success_ms: AtomicI64::new(0),
            cursor: AtomicI64::new(0),
            requests: Mutex::new(BTreeMap::new()),
        }
    }

    fn request(&self, code: &str) {
        let mut m = match self.requests.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        *m.entry(code.to_string()).or_default() += 1;
    }

    /// Seconds since the oldest unsent batch was stored (0: none waits).
    pub fn lag_seconds(&self, now_ms: i64) -> f64 {
        match self.oldest_unsent_ms.load(Ordering::Relaxed) {
            0 => 0.0,
            t => (now_ms - t).max(0) as f64 / 1000.0,
        }
    }
}

// -------------------------------------------------------------- sending --

/// How many WAL rows one read takes at most.
const MAX_ROWS_PER_READ: usize = 10_000;
/// How long a caught-up sender waits before looking at the WAL again.
const POLL: Duration = Duration::from_millis(500);
/// How often the queue's size is counted for `/metrics`.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

/// One series as sent: its labels, or None when this endpoint leaves it
/// out (`send_alerts`, `send_anomaly_scores`).
type SeriesLabels = Option<Arc<Vec<wire::Label>>>;

/// Forwards the store to one endpoint until `stop` turns true; then lets
/// the rows in flight finish for at most `grace`.
pub async fn run(
    rw: Arc<RemoteWrite>,
    store: Store,
    writer: Writer,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let name = rw.name.clone();
    let mut cursor = match blocking(&store, {
        let name = name.clone();
        move |s| s.remote_write_cursor(&name)
    })
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(endpoint = %name, error = %e, "remote write: cannot read the endpoint's cursor; nothing is sent to it until a restart");
            return;
        }
    };
    stats.cursor.store(cursor, Ordering::Relaxed);
    tracing::info!(endpoint = %name, url = %rw.url(), shards = rw.shards, cursor, "remote write: sending");
    // The queue is counted beside the sending, which may wait long on
    // a receiver that is down.
    let backlog = tokio::spawn(count_backlog(store.clone(), stats.clone(), stop.clone()));
    let mut labels: HashMap<i64, SeriesLabels> = HashMap::new();
    loop {
        if *stop.borrow() {
            break;
        }
        let want = rw.shards * rw.max_samples_per_send;
        let rows = blocking(&store, move |s| {
            s.wal_after(cursor, want, MAX_ROWS_PER_READ)
        })
        .await;
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e, "remote write: cannot read the WAL; trying again");
                if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
        };
        let Some(last_id) = rows.last().map(|r| r.id) else {
            if sleep_or_stop(&mut stop, POLL).await {
                break;
            }
            continue;
        };
        let shards = split(&rw, &store, &stats, &mut labels, rows);
        let mut send = std::pin::pin!(send_all(rw.clone(), stats.clone(), shards));
        let done = tokio::select! {
            () = &mut send => true,
            r = stop.wait_for(|s| *s) => {
                drop(r);
                false
            }
        };
        // Stopping: the rows in flight get the grace period to finish.
        let finished = done || tokio::time::timeout(grace, &mut send).await.is_ok();
        if !finished {
            tracing::warn!(endpoint = %name, grace = ?grace, "remote write: samples still unsent when the shutdown grace ran out; they are sent after the restart");
            break;
        }
        // Recorded before anything further is read; a failed commit (a
        // full disk, say) is tried again, since what it records was sent.
        let mut recorded = false;
        while !recorded {
            match writer.remote_write_cursor(&name, last_id).await {
                Ok(()) => recorded = true,
                Err(e) => {
                    tracing::error!(endpoint = %name, error = %e, "remote write: cannot record what was sent; trying again (if the collector stops first, it is sent again after the restart)");
                    if sleep_or_stop(&mut stop, Duration::from_secs(1)).await {
                        break;
                    }
                }
            }
        }
        if !recorded {
            break;
        }
        cursor = last_id;
        stats.cursor.store(cursor, Ordering::Relaxed);
    }
    backlog.abort();
    tracing::debug!(endpoint = %name, cursor, "remote write stopped");
}

/// Runs a blocking read of the store off the async threads.
async fn blocking<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, String> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// True if `stop` turned true (or its sender is gone) before `d` passed.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let stopped = tokio::select! {
        () = tokio::time::sleep(d) => false,
        r = stop.wait_for(|s| *s) => {
            drop(r);
            true
        }
    };
    stopped || *stop.borrow()
}

/// Counts what waits after the cursor every `BACKLOG_EVERY`, for
/// `/metrics`, until `stop`.
async fn count_backlog(store: Store, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) {
    let mut warned = false;
    loop {
        let cursor = stats.cursor.load(Ordering::Relaxed);
        match blocking(&store, move |s| s.wal_backlog(cursor)).await {
            Ok((samples, oldest)) => {
                stats.pending.store(samples, Ordering::Relaxed);
                stats
                    .oldest_unsent_ms
                    .store(oldest.unwrap_or(0), Ordering::Relaxed);
                warned = false;
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(endpoint = %stats.name, error = %e, "remote write: cannot count the queue");
            }
            Err(_) => {}
        }
        if sleep_or_stop(&mut stop, BACKLOG_EVERY).await {
            return;
        }
    }
}

/// One shard's samples in WAL order: (series labels, timestamp, value).
type ShardSamples = Vec<(Arc<Vec<wire::Label>>, i64, i64, f64)>;

/// Spreads the rows' samples over the shards by series.
fn split(
    rw: &RemoteWrite,
    store: &Store,
    stats: &Stats,
    labels: &mut HashMap<i64, SeriesLabels>,
    rows: Vec<crate::store::WalRow>,
) -> Vec<ShardSamples> {
    let unknown: Vec<i64> = {
        let mut ids: Vec<i64> = rows
            .iter()
            .flat_map(|r| r.samples.iter().flatten().map(|s| s.0))
            .filter(|id| !labels.contains_key(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    if !unknown.is_empty() {
        for (id, found) in unknown.iter().zip(store.series_identities(&unknown)) {
            let l = found.and_then(|(name, l)| series_labels(rw, &name, &l));
            labels.insert(*id, l.map(Arc::new));
        }
    }
    let mut shards: Vec<ShardSamples> = vec![Vec::new(); rw.shards];
    for row in rows {
        let Some(samples) = row.samples else {
            tracing::error!(endpoint = %rw.name, wal_row = row.id, "remote write: a WAL row is corrupt; its samples are skipped");
            stats.corrupt.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        for (id, ts, v) in samples {
            if let Some(Some(l)) = labels.get(&id) {
                shards[shard_of(id, rw.shards)].push((l.clone(), id, ts, v));
            }
        }
    }
    shards
}

/// The shard of a series: a multiplicative hash of its id.
fn shard_of(id: i64, shards: usize) -> usize {
    ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % shards
}

/// The labels a series is sent with (`__name__`, its own, the external
/// ones it does not have), sorted by name; None if this endpoint leaves
/// it out.
fn series_labels(rw: &RemoteWrite, name: &str, labels: &Labels) -> Option<Vec<wire::Label>> {
    if !rw.send_alerts && name == crate::alert::ALERTS_METRIC {
        return None;
    }
    if !rw.send_anomaly_scores
        && (name == crate::store::SCORE_METRIC || name == crate::store::ALARMS_METRIC)
    {
        return None;
    }
    let mut out: Vec<wire::Label> = Vec::with_capacity(labels.len() + 1 + rw.external_labels.len());
    out.push(wire::Label {
        name: "__name__".into(),
        value: name.to_string(),
    });
    for (k, v) in labels {
        out.push(wire::Label {
            name: k.clone(),
            value: v.clone(),
        });
    }
    for (k, v) in &rw.external_labels {
        if !labels.contains_key(k) {
            out.push(wire::Label {
                name: k.clone(),
                value: v.clone(),
            });
        }
    }
    out.sort();
    Some(out)
}

/// Sends every shard's samples, the shards side by side; returns when each
/// request was accepted or refused for good.
async fn send_all(rw: Arc<RemoteWrite>, stats: Arc<Stats>, shards: Vec<ShardSamples>) {
    let mut set = tokio::task::JoinSet::new();
    for samples in shards.into_iter().filter(|s| !s.is_empty()) {
        let (rw, stats) = (rw.clone(), stats.clone());
        set.spawn(async move {
            for part in samples.chunks(rw.max_samples_per_send) {
                send_one(&rw, &stats, request(part)).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// One request from a run of one shard's samples: a series per distinct
/// id, its samples in the order given.
pub(crate) fn request(
    part: &[(Arc<Vec<wire::Label>>, i64, i64, f64)],
) -> (wire::WriteRequest, u64) {
    let mut index: HashMap<i64, usize> = HashMap::new();
    let mut req = wire::WriteRequest::default();
    for (labels, id, ts, v) in part {
        let i = *index.entry(*id).or_insert_with(|| {
            req.timeseries.push(wire::TimeSeries {
                labels: labels.as_ref().clone(),
                samples: Vec::new(),
            });
            req.timeseries.len() - 1
        });
        req.timeseries[i].samples.push(wire::Sample {
            value: *v,
            timestamp: *ts,
        });
    }
    (req, part.len() as u64)
}

/// Sends one request until the receiver accepts it (2xx) or refuses it
/// for good (other 4xx); retries everything else with backoff.
async fn send_one(rw: &RemoteWrite, stats: &Stats, (req, n): (wire::WriteRequest, u64)) {
    let body = match wire::encode(&req) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(endpoint = %rw.name, samples = n, error = %e, "remote write: cannot encode a request; its samples are dropped");
            stats.refused.fetch_add(n, Ordering::Relaxed);
            return;
        }
    };
    let mut headers: Vec<(&str, String)> = vec![
        ("Content-Encoding", "snappy".into()),
        ("X-Prometheus-Remote-Write-Version", "0.1.0".into()),
    ];
    if let Auth::Header(h) = &rw.auth {
        headers.push(("Authorization", h.clone()));
    }
    let mut backoff = rw.min_backoff;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let r = http::post(
            &rw.endpoint,
            "application/x-protobuf",
            &headers,
            body.clone(),
            rw.timeout,
        )
        .await;
        let (message, retry_after) = match r {
            Ok(resp) => {
                stats.request(&resp.status.to_string());
                if (200..300).contains(&resp.status) {
                    stats.sent.fetch_add(n, Ordering::Relaxed);
                    stats
                        .last_success_ms
                        .store(vitals_common::now_ms(), Ordering::Relaxed);
                    if attempts > 1 {
                        tracing::info!(endpoint = %rw.name, samples = n, attempts, "remote write: delivered after retries");
                    }
                    return;
                }
                let retry_after = resp.retry_after;
                let status = resp.status;
                match http::check(&rw.endpoint, resp) {
                    Err(e) if !e.retryable => {
                        stats.refused.fetch_add(n, Ordering::Relaxed);
                        tracing::error!(endpoint = %rw.name, samples = n, status, answer = %e.message, "remote write: the receiver refused a request; its samples are dropped, not retried");
                        return;
                    }
                    Err(e) => (e.message, retry_after),
                    Ok(_) => (format!("status {status}"), retry_after),
                }
            }
            Err(e) => {
                stats.request("error");
                (e.message, None)
            }
        };
        stats.retried.fetch_add(n, Ordering::Relaxed);
        let wait = retry_after
            .unwrap_or(backoff)
            .clamp(rw.min_backoff, rw.max_backoff);
        if attempts == 1 {
            tracing::warn!(endpoint = %rw.name, samples = n, error = %message, retry_in = ?wait, "remote write: request failed; retrying with backoff (the samples stay queued)");
        } else {
            tracing::debug!(endpoint = %rw.name, samples = n, attempts, error = %message, retry_in = ?wait, "remote write: request failed again");
        }
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(rw.max_backoff);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<Vec<RemoteWrite>, String> {
        parse_in(Path::new("/etc/vitals"), text)
    }

    fn parse_in(dir: &Path, text: &str) -> Result<Vec<RemoteWrite>, String> {
        let path = dir.join("collector.toml");
        let raw: crate::config::RawConfig =
            vitals_common::config::parse(&path, text).map_err(|e| e.to_string())?;
        settings(&path, text, dir, &raw.remote_write).map_err(|e| e.to_string())
    }

    /// The tables shown in docs/REMOTE_WRITE.md parse: every key there is
    /// a real one, with the documented defaults.
    #[test]
    fn the_documented_tables_parse() {
        let doc = include_str!("../../../docs/REMOTE_WRITE.md");
        let start = doc.find("```toml\n").unwrap() + 8;
        let text = &doc[start..];
        let text = &text[..text.find("```").unwrap()];
        let path = Path::new("docs/REMOTE_WRITE.md");
        let raw: crate::config::RawConfig =
            vitals_common::config::parse(path, text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(raw.remote_write.len(), 2);
        let (a, b) = (&raw.remote_write[0], &raw.remote_write[1]);
        assert_eq!(a.shards, default_shards());
        assert_eq!(b.shards, 4);
        assert_eq!(b.max_samples_per_send, default_max_samples_per_send());
        assert_eq!(
            (b.min_backoff, b.max_backoff, b.timeout),
            (
                default_min_backoff(),
                default_max_backoff(),
                default_timeout()
            )
        );
        assert_eq!(
            b.external_labels.get("cluster").map(String::as_str),
            Some("lab")
        );
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
    }

    #[test]
    fn minimal_and_full_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("token"), "tok\n").unwrap();
        let rws = parse_in(
            dir.path(),
            r#"
[[remote_write]]
url = "http://127.0.0.1:9090/api/v1/write"

[[remote_write]]
name = "mimir"
url = "http://localhost:9009/api/v1/push?tenant=x"
username = "vitals"
password_file = "pw"
external_labels = { cluster = "lab", zone = "b" }
timeout = "10s"
shards = 8
max_samples_per_send = 500
min_backoff = "100ms"
max_backoff = "10s"
send_alerts = false
send_anomaly_scores = false

[[remote_write]]
name = "vm"
url = "http://[::1]:8428/api/v1/write"
bearer_token_file = "token"
"#,
        )
        .unwrap();
        assert_eq!(rws.len(), 3);
        let a = &rws[0];
        assert_eq!(a.name, "http://127.0.0.1:9090/api/v1/write");
        assert_eq!(a.auth, Auth::None);
        assert_eq!(
            (a.shards, a.max_samples_per_send, a.timeout),
            (4, 2000, Duration::from_secs(30))
        );
        assert!(a.send_alerts && a.send_anomaly_scores);
        let b = &rws[1];
        assert_eq!(b.name, "mimir");
        assert_eq!(b.url(), "http://localhost:9009/api/v1/push");
        assert_eq!(
            b.auth,
            Auth::Header(format!("Basic {}", base64(b"vitals:s3cret")))
        );
        assert_eq!(
            b.external_labels,
            vec![
                ("cluster".into(), "lab".into()),
                ("zone".into(), "b".into())
            ]
        );
        assert_eq!((b.shards, b.max_samples_per_send), (8, 500));
        assert!(!b.send_alerts && !b.send_anomaly_scores);
        assert_eq!(rws[2].auth, Auth::Header("Bearer tok".into()));
        // Secrets stay out of debug output.
        let dbg = format!("{rws:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("tok\"") && !dbg.contains("Bearer"));
        assert!(dbg.contains("<redacted>"));
    }

    #[test]
    fn bad_tables_name_the_line_and_what_to_do() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[[remote_write]]\nurl = \"ftp://x/\"\n",
                ":2:1: key `remote_write[0].url`",
                "http:// or https://",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\n[[remote_write]]\nurl = \"http://b/\"\nshards = 0\n",
                ":5:1: key `remote_write[1].shards`",
                "1 to 64",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\n[[remote_write]]\nurl = \"http://a/\"\n",
                ":4:1: key `remote_write[1].url`",
                "own `name`",
            ),
            (
                "[[remote_write]]\nurl = \"https://a/\"\nca_file = \"/nonexistent/ca.pem\"\n",
                ":3:1: key `remote_write[0].ca_file`",
                "/nonexistent/ca.pem",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nca_file = \"ca.pem\"\n",
                "key `remote_write[0].ca_file`",
                "need an https:// URL",
            ),
            (
                "[[remote_write]]\nurl = \"https://a/\"\ncert_file = \"c.pem\"\n",
                "key `remote_write[0].key_file`",
                "needs both",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nusername = \"u\"\n",
                "key `remote_write[0].password_file`",
                "needs both",
            ),
            (
                "[[remote_write]]\nurl = \"http://localhost/\"\nbearer_token_file = \"/nonexistent/token\"\n",
                ":3:1: key `remote_write[0].bearer_token_file`",
                "cannot read /nonexistent/token",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nexternal_labels = { \"__x\" = \"1\" }\n",
                "key `remote_write[0].external_labels`",
                "not a label name",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nmin_backoff = \"2s\"\nmax_backoff = \"1s\"\n",
                ":4:1: key `remote_write[0].max_backoff`",
                "below min_backoff",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nmax_samples_per_send = 0\n",
                "key `remote_write[0].max_samples_per_send`",
                "at least 1",
            ),
            (
                "[[remote_write]]\nurl = \"http://a/\"\nurll = \"x\"\n",
                "remote_write.urll",
                "unknown field",
            ),
            (
                "[[remote_write]]\nname = \"x\"\n",
                "remote_write",
                "missing field `url`",
            ),
        ];
        for (text, at, what) in cases {
            let e = parse(text)
                .err()
                .unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(e.contains(at), "{text}\n=> {e}\n(expected {at})");
            assert!(e.contains(what), "{text}\n=> {e}\n(expected {what})");
        }
    }

    #[test]
    fn secrets_are_read_not_echoed_and_plaintext_only_to_loopback() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hunter2\n").unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        std::fs::write(dir.path().join("two"), "a\nb\n").unwrap();
        let e = parse_in(
            dir.path(),
            "[[remote_write]]\nurl = \"http://mimir.example/push\"\nbearer_token_file = \"token\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("key `remote_write[0].url`") && e.contains("plaintext"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        for (file, what) in [("empty", "is empty"), ("two", "more than one line")] {
            let e = parse_in(
                dir.path(),
                &format!("[[remote_write]]\nurl = \"http://127.0.0.1/\"\nbearer_token_file = \"{file}\"\n"),
            )
            .unwrap_err();
            assert!(e.contains(what), "{e}");
        }
        let e = parse_in(
            dir.path(),
            "[[remote_write]]\nurl = \"http://127.0.0.1/\"\nbearer_token_file = \"token\"\nusername = \"u\"\npassword_file = \"token\"\n",
        )
        .unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn labels_external_ones_added_unless_present_and_flags_filter() {
        let rw = parse(
            "[[remote_write]]\nurl = \"http://a/\"\nexternal_labels = { cluster = \"lab\", node = \"x\" }\nsend_alerts = false\nsend_anomaly_scores = false\n",
        )
        .unwrap()
        .remove(0);
        let mut l = Labels::new();
        l.insert("node".into(), "train-01".into());
        l.insert("gpu".into(), "0".into());
        let got: Vec<(String, String)> = series_labels(&rw, "gpu_temp", &l)
            .unwrap()
            .into_iter()
            .map(|l| (l.name, l.value))
            .collect();
        let want: Vec<(String, String)> = [
            ("__name__", "gpu_temp"),
            ("cluster", "lab"),
            ("gpu", "0"),
            ("node", "train-01"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(series_labels(&rw, "ALERTS", &l).is_none());
        assert!(series_labels(&rw, "vitals_anomaly_score", &l).is_none());
        assert!(series_labels(&rw, "vitals_anomaly_alarms_total", &l).is_none());
    }

    #[test]
    fn requests_group_samples_by_series_in_order_and_shards_are_stable() {
        let a = Arc::new(vec![wire::Label {
            name: "__name__".into(),
            value: "a".into(),
        }]);
        let b = Arc::new(vec![wire::Label {
            name: "__name__".into(),
            value: "b".into(),
        }]);
        let part = vec![
            (a.clone(), 1, 10, 1.0),
            (b.clone(), 2, 10, 5.0),
            (a.clone(), 1, 20, 2.0),
            (b.clone(), 2, 20, 6.0),
            (a.clone(), 1, 30, 3.0),
        ];
        let (req, n) = request(&part);
        assert_eq!(n, 5);
        assert_eq!(req.timeseries.len(), 2);
        let ts = |i: usize| -> Vec<(i64, f64)> {
            req.timeseries[i]
                .samples
                .iter()
                .map(|s| (s.timestamp, s.value))
                .collect()
        };
        assert_eq!(req.timeseries[0].labels, *a);
        assert_eq!(ts(0), vec![(10, 1.0), (20, 2.0), (30, 3.0)]);
        assert_eq!(ts(1), vec![(10, 5.0), (20, 6.0)]);
        // Every shard gets series, and a series always the same shard.
        let mut seen = [0usize; 4];
        for id in 1..1000 {
            let s = shard_of(id, 4);
            assert_eq!(s, shard_of(id, 4));
            seen[s] += 1;
        }
        assert!(seen.iter().all(|n| *n > 150), "{seen:?}");
    }
}
