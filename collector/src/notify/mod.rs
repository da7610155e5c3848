//! Notifiers and the notification outbox.
//!
//! The alerting engine decides *what* to say and *to whom* (a receiver
//! name and a [`Notification`]); this module says it: [`Outbox::enqueue`]
//! commits the notification to SQLite before it returns, and [`run`] delivers
//! each committed row to every [`Target`] of its receiver (a webhook, an
//! Alertmanager, a Sentry project), retrying with backoff, exactly once per
//! target as far as the outbox can tell (see `outbox.rs`).
//!
//! [`deliver`] is one attempt at one target, with no retries; it says
//! whether a failure is worth retrying.

pub mod alertmanager;
pub(crate) mod http;
pub mod outbox;
pub mod sentry;
pub mod webhook;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::config::{ConfigError, duration};

pub use outbox::{Outbox, OutboxError, OutboxOptions, TargetStats, run};

/// Firing or resolved, as receivers spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertStatus {
    Firing,
    Resolved,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Firing => "firing",
            AlertStatus::Resolved => "resolved",
        }
    }
}

/// One alert as receivers see it (Alertmanager's data model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertPayload {
    /// Stable key of rule + labels: the same alert always has the same one.
    pub fingerprint: String,
    pub status: AlertStatus,
    /// `alertname`, `severity`, `node`, `team`, ...
    pub labels: BTreeMap<String, String>,
    /// `summary`, `description`, `probable_cause`, `evidence`, ...
    pub annotations: BTreeMap<String, String>,
    pub starts_at_ms: i64,
    /// Set when resolved.
    pub ends_at_ms: Option<i64>,
    pub generator_url: String,
}

/// What one receiver gets for one alert group at one time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub receiver: String,
    pub group_key: String,
    pub group_labels: BTreeMap<String, String>,
    pub alerts: Vec<AlertPayload>,
    /// Where a person can look at the alerts (webhook `externalURL`); may be empty.
    #[serde(default)]
    pub external_url: String,
}

impl Notification {
    /// Firing if any alert is firing, else resolved.
    pub fn status(&self) -> AlertStatus {
        if self.alerts.iter().any(|a| a.status == AlertStatus::Firing) {
            AlertStatus::Firing
        } else {
            AlertStatus::Resolved
        }
    }

    /// Labels every alert has with the same value.
    pub fn common_labels(&self) -> BTreeMap<String, String> {
        common(self.alerts.iter().map(|a| &a.labels))
    }

    /// Annotations every alert has with the same value.
    pub fn common_annotations(&self) -> BTreeMap<String, String> {
        common(self.alerts.iter().map(|a| &a.annotations))
    }
}

fn common<'a>(
    mut maps: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let Some(first) = maps.next() else {
        return BTreeMap::new();
    };
    let mut out = first.clone();
    for m in maps {
        out.retain(|k, v| m.get(k) == Some(v));
    }
    out
}

/// `[alerting.receivers.NAME]`: where one receiver's notifications go. Any
/// of the three tables may be present; none is a receiver that drops
/// everything (like Alertmanager's null receiver).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// POST of Alertmanager's webhook JSON (version 4).
    pub webhook: Option<WebhookConfig>,
    /// An Alertmanager's API v2 (`POST /api/v2/alerts`).
    pub alertmanager: Option<AlertmanagerConfig>,
    /// A Sentry (or Sentry-compatible) project, by DSN.
    pub sentry: Option<SentryConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the JSON is POSTed to.
    pub url: String,
    /// Whole request: connect, TLS, send, response.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Also notify when alerts resolve.
    #[serde(default = "default_true")]
    pub send_resolved: bool,
    /// Most alerts in one message (0: all); the rest are counted in `truncatedAlerts`.
    #[serde(default)]
    pub max_alerts: usize,
    /// PEM file of CA certificates for an `https` URL (default: the system's).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Base URL of the Alertmanager (`/api/v2/alerts` is appended).
    pub url: String,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// How often a firing alert is sent again; each send says it ends
    /// 4 × this later, so Alertmanager resolves it by itself if we stop.
    #[serde(default = "default_resend", with = "duration")]
    pub resend_interval: Duration,
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentryConfig {
    /// `https://KEY@HOST/PROJECT_ID`, as the project's settings show it.
    pub dsn: String,
    /// Sentry's `environment` of every event.
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Send an info-level "resolved: ..." event (same issue) when an alert resolves.
    #[serde(default = "default_true")]
    pub send_resolved: bool,
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_resend() -> Duration {
    Duration::from_secs(60)
}
fn default_true() -> bool {
    true
}

impl ReceiverConfig {
    /// The receiver's targets, URLs and DSNs checked, CA files loaded
    /// (relative paths against `base`, the config file's directory).
    /// Errors name the key below the receiver (`sentry.dsn`).
    pub fn targets(&self, base: &Path) -> Result<Vec<Target>, (String, String)> {
        let ca = |c: &Option<PathBuf>| c.as_ref().map(|p| base.join(p));
        let mut out = Vec::new();
        if let Some(c) = &self.webhook {
            out.push(Target::Webhook(webhook::Webhook::new(c, ca(&c.ca))?));
        }
        if let Some(c) = &self.alertmanager {
            out.push(Target::Alertmanager(alertmanager::Alertmanager::new(
                c,
                ca(&c.ca),
            )?));
        }
        if let Some(c) = &self.sentry {
            out.push(Target::Sentry(sentry::Sentry::new(c, ca(&c.ca))?));
        }
        Ok(out)
    }

    /// [`targets`](Self::targets) with errors for the config file `path`,
    /// keyed `alerting.receivers.NAME.KEY`.
    pub fn validate(&self, path: &Path, name: &str) -> Result<Vec<Target>, ConfigError> {
        let base = path.parent().unwrap_or(Path::new("."));
        self.targets(base).map_err(|(key, message)| {
            ConfigError::invalid(path, &format!("alerting.receivers.{name}.{key}"), message)
        })
    }

    /// How often a firing alert must be sent again to this receiver (the
    /// shortest of its targets' needs), or `None` if once is enough.
    pub fn resend_interval(&self) -> Option<Duration> {
        self.alertmanager.as_ref().map(|a| a.resend_interval)
    }
}

/// One place notifications go, ready to deliver to.
#[derive(Debug, Clone)]
pub enum Target {
    Webhook(webhook::Webhook),
    Alertmanager(alertmanager::Alertmanager),
    Sentry(sentry::Sentry),
}

impl Target {
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Webhook(_) => "webhook",
            Target::Alertmanager(_) => "alertmanager",
            Target::Sentry(_) => "sentry",
        }
    }

    /// Stable identity of the target in the outbox (kind and address; no
    /// DSN key). Deliveries are recorded per (notification, key).
    pub fn key(&self) -> String {
        match self {
            Target::Webhook(w) => format!("webhook {}", w.endpoint.url()),
            Target::Alertmanager(a) => format!("alertmanager {}", a.endpoint.url()),
            Target::Sentry(s) => format!("sentry {}", s.endpoint.url()),
        }
    }

    /// For logs: kind and scheme://host:port, no path (webhook paths often
    /// hold tokens).
    pub fn display(&self) -> String {
        let ep = match self {
            Target::Webhook(w) => &w.endpoint,
            Target::Alertmanager(a) => &a.endpoint,
            Target::Sentry(s) => &s.endpoint,
        };
        format!("{} {}", self.kind(), ep.origin())
    }

    /// How often a firing alert must be sent again (Alertmanager forgets
    /// alerts whose `endsAt` passes); `None` for the others.
    pub fn resend_interval(&self) -> Option<Duration> {
        match self {
            Target::Alertmanager(a) => Some(a.resend_interval),
            _ => None,
        }
    }

    /// Only the latest state of an alert matters to this target, so an
    /// undelivered notification that a later one for the same alerts
    /// covers need not be sent.
    pub(crate) fn latest_state_only(&self) -> bool {
        matches!(self, Target::Alertmanager(_))
    }

    /// A plain-HTTP target that is not on this host (alerts carry evidence).
    pub fn is_plaintext_remote(&self) -> bool {
        let ep = match self {
            Target::Webhook(w) => &w.endpoint,
            Target::Alertmanager(a) => &a.endpoint,
            Target::Sentry(s) => &s.endpoint,
        };
        !ep.is_https() && !ep.is_loopback()
    }
}

/// A failed delivery attempt.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// Worth trying again later (connection failure, timeout, 5xx, 408,
    /// 429, 3xx); otherwise the receiver refused this notification for good.
    pub retryable: bool,
    pub message: String,
    /// The receiver asked us to wait this long (`Retry-After`).
    pub retry_after: Option<Duration>,
}

impl DeliveryError {
    pub(crate) fn retry(message: impl Into<String>) -> Self {
        DeliveryError {
            retryable: true,
            message: message.into(),
            retry_after: None,
        }
    }
    pub(crate) fn fatal(message: impl Into<String>) -> Self {
        DeliveryError {
            retryable: false,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// One attempt to deliver `n` to `target`; no retries.
pub async fn deliver(target: &Target, n: &Notification) -> Result<(), DeliveryError> {
    deliver_keyed(target, n, rand::random()).await
}

/// [`deliver`] with the notification's idempotency token: every attempt for
/// one outbox row sends the same token (Sentry event ids, the webhook's
/// `Idempotency-Key`), so a receiver can drop a repeat of an attempt whose
/// answer we never saw.
pub(crate) async fn deliver_keyed(
    target: &Target,
    n: &Notification,
    token: u128,
) -> Result<(), DeliveryError> {
    match target {
        Target::Webhook(w) => w.send(n, token).await,
        Target::Alertmanager(a) => a.send(n, now_ms()).await,
        Target::Sentry(s) => s.send(n, token).await,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 in UTC with milliseconds, as Alertmanager and Sentry read it.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// What Alertmanager writes for "no end yet" (Go's zero time).
pub(crate) const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(fp: &str, status: AlertStatus, labels: &[(&str, &str)]) -> AlertPayload {
        AlertPayload {
            fingerprint: fp.into(),
            status,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: BTreeMap::new(),
            starts_at_ms: 0,
            ends_at_ms: None,
            generator_url: String::new(),
        }
    }

    #[test]
    fn common_labels_and_status() {
        let n = Notification {
            receiver: "ops".into(),
            group_key: "g".into(),
            group_labels: BTreeMap::new(),
            alerts: vec![
                alert(
                    "a",
                    AlertStatus::Resolved,
                    &[("alertname", "X"), ("node", "n1")],
                ),
                alert(
                    "b",
                    AlertStatus::Firing,
                    &[("alertname", "X"), ("node", "n2")],
                ),
            ],
            external_url: String::new(),
        };
        assert_eq!(n.status(), AlertStatus::Firing);
        assert_eq!(
            n.common_labels(),
            BTreeMap::from([("alertname".to_string(), "X".to_string())])
        );
        let mut resolved = n.clone();
        resolved.alerts[1].status = AlertStatus::Resolved;
        assert_eq!(resolved.status(), AlertStatus::Resolved);
    }

    #[test]
    fn rfc3339_has_millis_and_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn the_readmes_receiver_example_parses_and_validates() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n[alerting.receivers.ops]")
            .expect("README has the receiver example")
            + "```toml\n".len();
        let end = start + readme[start..].find("```").unwrap();
        let table: toml::Table = toml::from_str(&readme[start..end]).unwrap();
        let ops = table["alerting"]["receivers"]["ops"].clone();
        let c: ReceiverConfig = ops.try_into().unwrap();
        let t = c.targets(Path::new("/etc/vitals")).unwrap();
        let kinds: Vec<_> = t.iter().map(Target::kind).collect();
        assert_eq!(kinds, ["webhook", "alertmanager", "sentry"]);
        assert_eq!(c.resend_interval(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn receiver_config_parses_and_validates() {
        let text = r#"
            webhook = { url = "http://127.0.0.1:9/hook", timeout = "2s" }
            alertmanager = { url = "http://127.0.0.1:9093", resend_interval = "30s" }
            sentry = { dsn = "http://abc@127.0.0.1:8000/3", environment = "prod" }
        "#;
        let c: ReceiverConfig = toml::from_str(text).unwrap();
        assert_eq!(c.webhook.as_ref().unwrap().timeout, Duration::from_secs(2));
        assert_eq!(c.resend_interval(), Some(Duration::from_secs(30)));
        let t = c.targets(Path::new(".")).unwrap();
        let kinds: Vec<_> = t.iter().map(Target::kind).collect();
        assert_eq!(kinds, ["webhook", "alertmanager", "sentry"]);
        assert_eq!(t[2].key(), "sentry http://127.0.0.1:8000/api/3/envelope/");
        assert_eq!(t[0].display(), "webhook http://127.0.0.1:9");
        assert!(!t[0].is_plaintext_remote());

        let bad: Result<ReceiverConfig, _> = toml::from_str("webhook = { url = \"x\", nope = 1 }");
        assert!(bad.is_err(), "unknown keys are errors");
        let c: ReceiverConfig =
            toml::from_str("sentry = { dsn = \"http://127.0.0.1/1\" }").unwrap();
        let err = c
            .validate(Path::new("/etc/vitals/collector.toml"), "ops")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("alerting.receivers.ops.sentry.dsn") && err.contains("public key"),
            "{err}"
        );
        let c: ReceiverConfig =
            toml::from_str("webhook = { url = \"ftp://127.0.0.1/x\" }").unwrap();
        let (key, msg) = c.targets(Path::new(".")).unwrap_err();
        assert_eq!(key, "webhook.url");
        assert!(msg.contains("http"), "{msg}");
    }
}
