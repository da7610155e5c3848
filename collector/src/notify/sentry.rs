//! Sentry by DSN: one event per alert, POSTed as an envelope to
//! `{scheme}://{host}/api/{project_id}/envelope/` (what Sentry's SDKs do;
//! no SDK needed for one kind of message).
//!
//! - `level` from the `severity` label: critical → fatal, error → error,
//!   warning → warning, info → info (anything else: error).
//! - `fingerprint` = `[alert fingerprint]`, so every event of one alert
//!   (each firing, each repeat) lands in one issue.
//! - `tags` = the alert's labels (+ `alert_status`); annotations (summary,
//!   description, probable cause, evidence) in `extra`; times, generator
//!   URL and group in `contexts.alert`.
//! - A resolved alert sends an info-level "resolved: ..." event to the same
//!   issue (`send_resolved`, default on): the history then shows when
//!   it ended. Sentry cannot resolve an issue from an event (that needs an
//!   API token, not a DSN); if someone resolved the issue by hand first, the
//!   "resolved" event reopens it as a regression — turn `send_resolved`
//!   off for projects worked that way.
//! - Event ids derive from the outbox row's token, so a retry after an
//!   unanswered attempt repeats ids and the server drops the duplicate
//!   (Sentry answers 200; Bugsink 400 "Event already exists", which counts
//!   as delivered here).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::http::{self, Endpoint};
use super::{AlertPayload, AlertStatus, DeliveryError, Notification, SentryConfig};

#[derive(Clone)]
pub struct Sentry {
    pub(crate) endpoint: Endpoint,
    public_key: String,
    secret_key: Option<String>,
    pub environment: Option<String>,
    pub timeout: Duration,
    pub send_resolved: bool,
}

impl std::fmt::Debug for Sentry {
    // No keys in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentry")
            .field("endpoint", &self.endpoint.url())
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

/// The parts of a DSN: `{scheme}://{public_key}[:{secret}]@{host}[:{port}]{/prefix}/{project_id}`.
#[derive(Debug, PartialEq)]
pub struct Dsn {
    pub scheme: String,
    pub public_key: String,
    pub secret_key: Option<String>,
    pub host_port: String,
    pub prefix: String,
    pub project_id: String,
}

impl Dsn {
    pub fn parse(dsn: &str) -> Result<Dsn, String> {
        let dsn = dsn.trim();
        let (scheme, rest) = dsn
            .split_once("://")
            .ok_or_else(|| "a DSN looks like https://KEY@HOST/PROJECT_ID".to_string())?;
        if scheme != "http" && scheme != "https" {
            return Err(format!("scheme {scheme:?}: a DSN is http:// or https://"));
        }
        let (auth, rest) = rest
            .split_once('@')
            .ok_or_else(|| "no public key (KEY@ before the host)".to_string())?;
        let (public_key, secret_key) = match auth.split_once(':') {
            Some((k, s)) => (k, Some(s.to_string())),
            None => (auth, None),
        };
        if public_key.is_empty() {
            return Err("no public key (KEY@ before the host)".into());
        }
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        let (host_port, path) = rest.split_once('/').unwrap_or((rest, ""));
        let path = path.trim_end_matches('/');
        let (prefix, project_id) = match path.rsplit_once('/') {
            Some((p, id)) => (format!("/{p}"), id),
            None => (String::new(), path),
        };
        if host_port.is_empty() {
            return Err("no host".into());
        }
        if project_id.is_empty() || !project_id.chars().all(|c| c.is_ascii_digit()) {
            return Err("the DSN must end in the numeric project id (…/PROJECT_ID)".into());
        }
        Ok(Dsn {
            scheme: scheme.into(),
            public_key: public_key.into(),
            secret_key,
            host_port: host_port.into(),
            prefix,
            project_id: project_id.into(),
        })
    }

    /// Where envelopes go.
    pub fn envelope_url(&self) -> String {
        format!(
            "{}://{}{}/api/{}/envelope/",
            self.scheme, self.host_port, self.prefix, self.project_id
        )
    }
}

impl Sentry {
    pub(crate) fn new(c: &SentryConfig, ca: Option<PathBuf>) -> Result<Sentry, (String, String)> {
        let dsn = Dsn::parse(&c.dsn).map_err(|e| ("sentry.dsn".to_string(), e))?;
        let endpoint = Endpoint::parse(&dsn.envelope_url(), ca.as_deref())
            .map_err(|e| e.keyed("sentry", "dsn"))?;
        Ok(Sentry {
            endpoint,
            public_key: dsn.public_key,
            secret_key: dsn.secret_key,
            environment: c.environment.clone(),
            timeout: c.timeout,
            send_resolved: c.send_resolved,
        })
    }

    fn auth(&self) -> String {
        let mut a = format!(
            "Sentry sentry_version=7, sentry_key={}, sentry_client=vitals/{}",
            self.public_key,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(s) = &self.secret_key {
            a.push_str(&format!(", sentry_secret={s}"));
        }
        a
    }

    pub(crate) async fn send(&self, n: &Notification, token: u128) -> Result<(), DeliveryError> {
        // One event per envelope (the envelope format allows no more).
        for (i, a) in n.alerts.iter().enumerate() {
            if a.status == AlertStatus::Resolved && !self.send_resolved {
                continue;
            }
            let id = event_id(token, i);
            let body = envelope(&id, &event(n, a, &id, self.environment.as_deref()));
            let r = http::post(
                &self.endpoint,
                "application/x-sentry-envelope",
                &[("X-Sentry-Auth", self.auth())],
                body,
                self.timeout,
            )
            .await?;
            match http::check(&self.endpoint, r) {
                Ok(_) => {}
                // A repeat of an attempt whose answer was lost.
                Err(e) if !e.retryable && e.message.contains("already exists") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A UUID (version 4 bits set) from the row token and the alert's index.
pub(crate) fn event_id(token: u128, index: usize) -> String {
    let v = token.wrapping_add(index as u128);
    let v = (v & !(0xf << 76)) | (0x4 << 76);
    let v = (v & !(0x3 << 62)) | (0x2 << 62);
    format!("{v:032x}")
}

/// Sentry levels: fatal, error, warning, info, debug.
pub fn level(severity: Option<&str>, status: AlertStatus) -> &'static str {
    if status == AlertStatus::Resolved {
        return "info";
    }
    match severity.map(str::to_ascii_lowercase).as_deref() {
        Some("critical" | "fatal" | "page" | "emergency") => "fatal",
        Some("warning" | "warn") => "warning",
        Some("info" | "informational" | "notice" | "none") => "info",
        Some("debug") => "debug",
        _ => "error",
    }
}

/// Sentry keeps tag keys to 32 characters and values to 200, one line.
fn tag(k: &str, v: &str) -> (String, Value) {
    let k: String = k.chars().take(32).collect();
    let v: String = v
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    (k, Value::String(v))
}

/// The event for one alert.
pub fn event(n: &Notification, a: &AlertPayload, event_id: &str, env: Option<&str>) -> Value {
    let name = a
        .labels
        .get("alertname")
        .map(String::as_str)
        .unwrap_or("alert");
    let headline = a.annotations.get("summary").cloned().unwrap_or_else(|| {
        let rest: Vec<String> = a
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "alertname")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{name} {{{}}}", rest.join(", "))
    });
    let mut message = match a.status {
        AlertStatus::Firing => headline,
        AlertStatus::Resolved => format!("resolved: {headline}"),
    };
    for (key, title) in [("description", ""), ("probable_cause", "Probable cause: ")] {
        if let Some(v) = a.annotations.get(key) {
            message.push_str(&format!("\n\n{title}{v}"));
        }
    }
    let mut tags: Map<String, Value> = a.labels.iter().map(|(k, v)| tag(k, v)).collect();
    tags.extend([tag("alert_status", a.status.as_str())]);
    let extra: Map<String, Value> = a
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let time = match (a.status, a.ends_at_ms) {
        (AlertStatus::Resolved, Some(t)) => t,
        _ => a.starts_at_ms,
    };
    let mut e = json!({
        "event_id": event_id,
        "timestamp": super::rfc3339(time),
        "platform": "other",
        "level": level(a.labels.get("severity").map(String::as_str), a.status),
        "logger": "vitals.alerting",
        "logentry": { "formatted": message },
        "tags": tags,
        "fingerprint": [a.fingerprint],
        "extra": extra,
        "contexts": {
            "alert": {
                "type": "default",
                "status": a.status.as_str(),
                "fingerprint": a.fingerprint,
                "starts_at": super::rfc3339(a.starts_at_ms),
                "ends_at": a.ends_at_ms.map(super::rfc3339),
                "generator_url": a.generator_url,
                "group_key": n.group_key,
                "receiver": n.receiver,
                "labels": a.labels.iter().collect::<BTreeMap<_, _>>(),
            }
        },
    });
    if let Some(node) = a.labels.get("node") {
        e["server_name"] = Value::String(node.clone());
    }
    if let Some(env) = env {
        e["environment"] = Value::String(env.to_string());
    }
    e
}

/// Envelope: header line, item header line, the event.
pub fn envelope(event_id: &str, event: &Value) -> Vec<u8> {
    let payload = event.to_string();
    let mut out =
        json!({ "event_id": event_id, "sent_at": super::rfc3339(super::now_ms()) }).to_string();
    out.push('\n');
    out.push_str(&json!({ "type": "event", "length": payload.len() }).to_string());
    out.push('\n');
    out.push_str(&payload);
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::webhook::tests::sample;

    #[test]
    fn dsn_forms() {
        let d = Dsn::parse("https://abc123@o1.ingest.sentry.io/4501").unwrap();
        assert_eq!(d.public_key, "abc123");
        assert_eq!(
            d.envelope_url(),
            "https://o1.ingest.sentry.io/api/4501/envelope/"
        );
        let d = Dsn::parse("http://k:s@127.0.0.1:8000/sentry/7").unwrap();
        assert_eq!(d.secret_key.as_deref(), Some("s"));
        assert_eq!(
            d.envelope_url(),
            "http://127.0.0.1:8000/sentry/api/7/envelope/"
        );
        for bad in [
            "127.0.0.1/1",
            "ftp://k@h/1",
            "http://h/1",
            "http://k@h/",
            "http://k@h/abc",
            "http://k@/1",
        ] {
            assert!(Dsn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn levels() {
        let f = AlertStatus::Firing;
        assert_eq!(level(Some("critical"), f), "fatal");
        assert_eq!(level(Some("Warning"), f), "warning");
        assert_eq!(level(Some("info"), f), "info");
        assert_eq!(level(None, f), "error");
        assert_eq!(level(Some("critical"), AlertStatus::Resolved), "info");
    }

    #[test]
    fn event_ids_are_uuids_stable_per_token() {
        let a = event_id(u128::MAX, 0);
        assert_eq!(a.len(), 32);
        assert_eq!(&a[12..13], "4");
        assert_eq!(event_id(42, 1), event_id(42, 1));
        assert_ne!(event_id(42, 1), event_id(42, 2));
    }

    #[test]
    fn event_and_envelope() {
        let mut n = sample();
        n.alerts[0]
            .annotations
            .insert("probable_cause".into(), "disk sdb failed".into());
        n.alerts[0].labels.insert("long".into(), "x\n".repeat(300));
        let e = event(&n, &n.alerts[0], "id", Some("prod"));
        assert_eq!(e["level"], "fatal");
        assert_eq!(e["fingerprint"], json!(["f1"]));
        assert_eq!(e["tags"]["node"], "nas-01");
        assert_eq!(e["tags"]["alert_status"], "firing");
        assert_eq!(e["tags"]["long"].as_str().unwrap().len(), 200);
        assert!(!e["tags"]["long"].as_str().unwrap().contains('\n'));
        assert_eq!(e["server_name"], "nas-01");
        assert_eq!(e["environment"], "prod");
        assert_eq!(
            e["logentry"]["formatted"],
            "pool tank on nas-01 is DEGRADED\n\nProbable cause: disk sdb failed"
        );
        assert_eq!(e["extra"]["probable_cause"], "disk sdb failed");
        let r = event(&n, &n.alerts[1], "id", None);
        assert_eq!(r["level"], "info");
        assert_eq!(r["fingerprint"], json!(["f2"]));
        assert!(
            r["logentry"]["formatted"]
                .as_str()
                .unwrap()
                .starts_with("resolved: pool tank on nas-02")
        );
        assert_eq!(r["timestamp"], "2023-11-14T22:14:20.000Z");

        let env = String::from_utf8(envelope("id", &e)).unwrap();
        let lines: Vec<&str> = env.lines().collect();
        assert_eq!(lines.len(), 3);
        let item: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(item["type"], "event");
        assert_eq!(item["length"], lines[2].len());
        let back: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(back, e);
    }
}
