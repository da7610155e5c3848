//! Webhook: Alertmanager's webhook JSON, version 4, so that consumers
//! written for Alertmanager read ours unchanged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::http::{self, Endpoint};
use super::{AlertPayload, AlertStatus, DeliveryError, Notification, WebhookConfig, ZERO_TIME};

#[derive(Debug, Clone)]
pub struct Webhook {
    pub(crate) endpoint: Endpoint,
    pub timeout: Duration,
    pub send_resolved: bool,
    pub max_alerts: usize,
}

impl Webhook {
    pub(crate) fn new(c: &WebhookConfig, ca: Option<PathBuf>) -> Result<Webhook, (String, String)> {
        let endpoint =
            Endpoint::parse(&c.url, ca.as_deref()).map_err(|e| e.keyed("webhook", "url"))?;
        Ok(Webhook {
            endpoint,
            timeout: c.timeout,
            send_resolved: c.send_resolved,
            max_alerts: c.max_alerts,
        })
    }

    pub(crate) async fn send(&self, n: &Notification, token: u128) -> Result<(), DeliveryError> {
        let Some(body) = body(n, self.send_resolved, self.max_alerts) else {
            return Ok(()); // only resolved alerts, and this webhook does not want them
        };
        let r = http::post(
            &self.endpoint,
            "application/json",
            &[("Idempotency-Key", format!("{token:032x}"))],
            body.into_bytes(),
            self.timeout,
        )
        .await?;
        http::check(&self.endpoint, r).map(|_| ())
    }
}

/// The message as Alertmanager's webhook notifier writes it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Message<'a> {
    version: &'static str,
    group_key: &'a str,
    truncated_alerts: usize,
    status: &'static str,
    receiver: &'a str,
    group_labels: &'a BTreeMap<String, String>,
    common_labels: BTreeMap<String, String>,
    common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    external_url: &'a str,
    alerts: Vec<Alert<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Alert<'a> {
    status: &'static str,
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: String,
    ends_at: String,
    #[serde(rename = "generatorURL")]
    generator_url: &'a str,
    fingerprint: &'a str,
}

/// The JSON body, or `None` when nothing is left to say (every alert
/// resolved and `send_resolved` off). `max_alerts` 0: no limit.
pub fn body(n: &Notification, send_resolved: bool, max_alerts: usize) -> Option<String> {
    let kept: Vec<&AlertPayload> = n
        .alerts
        .iter()
        .filter(|a| send_resolved || a.status == AlertStatus::Firing)
        .collect();
    if kept.is_empty() {
        return None;
    }
    let view = Notification {
        alerts: kept.iter().map(|a| (*a).clone()).collect(),
        ..n.clone()
    };
    let limit = if max_alerts == 0 {
        kept.len()
    } else {
        max_alerts.min(kept.len())
    };
    let msg = Message {
        version: "4",
        group_key: &n.group_key,
        truncated_alerts: kept.len() - limit,
        status: view.status().as_str(),
        receiver: &n.receiver,
        group_labels: &n.group_labels,
        common_labels: view.common_labels(),
        common_annotations: view.common_annotations(),
        external_url: &n.external_url,
        alerts: kept[..limit]
            .iter()
            .map(|a| Alert {
                status: a.status.as_str(),
                labels: &a.labels,
                annotations: &a.annotations,
                starts_at: super::rfc3339(a.starts_at_ms),
                ends_at: match (a.status, a.ends_at_ms) {
                    (AlertStatus::Resolved, Some(t)) => super::rfc3339(t),
                    // Resolved without a time is a caller's slip; the start
                    // is the only honest time we have.
                    (AlertStatus::Resolved, None) => super::rfc3339(a.starts_at_ms),
                    (AlertStatus::Firing, _) => ZERO_TIME.to_string(),
                },
                generator_url: &a.generator_url,
                fingerprint: &a.fingerprint,
            })
            .collect(),
    };
    serde_json::to_string(&msg).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Notification {
        let a = |fp: &str, node: &str, status, ends| AlertPayload {
            fingerprint: fp.into(),
            status,
            labels: BTreeMap::from([
                ("alertname".to_string(), "ZfsPoolDegraded".to_string()),
                ("node".to_string(), node.to_string()),
                ("severity".to_string(), "critical".to_string()),
            ]),
            annotations: BTreeMap::from([(
                "summary".to_string(),
                format!("pool tank on {node} is DEGRADED"),
            )]),
            starts_at_ms: 1_700_000_000_000,
            ends_at_ms: ends,
            generator_url: "vitals://alerts/ZfsPoolDegraded".into(),
        };
        Notification {
            receiver: "ops".into(),
            group_key: "{}:{alertname=\"ZfsPoolDegraded\"}".into(),
            group_labels: BTreeMap::from([("alertname".into(), "ZfsPoolDegraded".into())]),
            alerts: vec![
                a("f1", "nas-01", AlertStatus::Firing, None),
                a(
                    "f2",
                    "nas-02",
                    AlertStatus::Resolved,
                    Some(1_700_000_060_000),
                ),
            ],
            external_url: "https://vitals.example".into(),
        }
    }

    #[test]
    fn version_4_golden() {
        let got: serde_json::Value =
            serde_json::from_str(&body(&sample(), true, 0).unwrap()).unwrap();
        let want = serde_json::json!({
            "version": "4",
            "groupKey": "{}:{alertname=\"ZfsPoolDegraded\"}",
            "truncatedAlerts": 0,
            "status": "firing",
            "receiver": "ops",
            "groupLabels": {"alertname": "ZfsPoolDegraded"},
            "commonLabels": {"alertname": "ZfsPoolDegraded", "severity": "critical"},
            "commonAnnotations": {},
            "externalURL": "https://vitals.example",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "ZfsPoolDegraded", "node": "nas-01", "severity": "critical"},
                    "annotations": {"summary": "pool tank on nas-01 is DEGRADED"},
                    "startsAt": "2023-11-14T22:13:20.000Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "vitals://alerts/ZfsPoolDegraded",
                    "fingerprint": "f1"
                },
                {
                    "status": "resolved",
                    "labels": {"alertname": "ZfsPoolDegraded", "node": "nas-02", "severity": "critical"},
                    "annotations": {"summary": "pool tank on nas-02 is DEGRADED"},
                    "startsAt": "2023-11-14T22:13:20.000Z",
                    "endsAt": "2023-11-14T22:14:20.000Z",
                    "generatorURL": "vitals://alerts/ZfsPoolDegraded",
                    "fingerprint": "f2"
                }
            ]
        });
        assert_eq!(got, want);
    }

    #[test]
    fn send_resolved_off_and_truncation() {
        let n = sample();
        let v: serde_json::Value = serde_json::from_str(&body(&n, false, 0).unwrap()).unwrap();
        assert_eq!(v["alerts"].as_array().unwrap().len(), 1);
        assert_eq!(
            v["commonAnnotations"]["summary"],
            "pool tank on nas-01 is DEGRADED"
        );
        let v: serde_json::Value = serde_json::from_str(&body(&n, true, 1).unwrap()).unwrap();
        assert_eq!(v["alerts"].as_array().unwrap().len(), 1);
        assert_eq!(v["truncatedAlerts"], 1);
        let mut all_resolved = n.clone();
        all_resolved.alerts.remove(0);
        assert!(body(&all_resolved, false, 0).is_none());
        let v: serde_json::Value =
            serde_json::from_str(&body(&all_resolved, true, 0).unwrap()).unwrap();
        assert_eq!(v["status"], "resolved");
    }
}
