//! Alertmanager API v2: `POST {url}/api/v2/alerts` with the alerts as
//! Prometheus sends them. A firing alert says it ends `4 × resend_interval`
//! from now, so it stays active while we keep re-sending it (the alerting
//! engine re-enqueues firing alerts every [`Target::resend_interval`]) and
//! Alertmanager resolves it by itself if the collector goes away; a
//! resolved alert ends at its resolve time.
//!
//! [`Target::resend_interval`]: super::Target::resend_interval

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use super::http::{self, Endpoint};
use super::{AlertStatus, AlertmanagerConfig, DeliveryError, Notification};

#[derive(Debug, Clone)]
pub struct Alertmanager {
    pub(crate) endpoint: Endpoint,
    pub timeout: Duration,
    pub resend_interval: Duration,
}

/// How far past "now" a firing alert's `endsAt` is set, in resend
/// intervals (Prometheus: 4 × max(evaluation interval, resend delay)).
pub const ENDS_AT_RESENDS: u32 = 4;

impl Alertmanager {
    pub(crate) fn new(
        c: &AlertmanagerConfig,
        ca: Option<PathBuf>,
    ) -> Result<Alertmanager, (String, String)> {
        let base =
            Endpoint::parse(&c.url, ca.as_deref()).map_err(|e| e.keyed("alertmanager", "url"))?;
        if base.has_query() {
            return Err((
                "alertmanager.url".into(),
                format!("{:?}: a base URL without a query string", c.url),
            ));
        }
        if c.resend_interval.is_zero() {
            return Err((
                "alertmanager.resend_interval".into(),
                "must be above 0".into(),
            ));
        }
        let path = format!("{}/api/v2/alerts", base.path().trim_end_matches('/'));
        Ok(Alertmanager {
            endpoint: base.with_path(&path),
            timeout: c.timeout,
            resend_interval: c.resend_interval,
        })
    }

    pub(crate) async fn send(&self, n: &Notification, now_ms: i64) -> Result<(), DeliveryError> {
        let body = body(n, now_ms, self.resend_interval);
        let r = http::post(
            &self.endpoint,
            "application/json",
            &[],
            body.into_bytes(),
            self.timeout,
        )
        .await?;
        http::check(&self.endpoint, r).map(|_| ())
    }
}

/// One `postableAlert`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Postable<'a> {
    labels: &'a BTreeMap<String, String>,
    annotations: &'a BTreeMap<String, String>,
    starts_at: String,
    ends_at: String,
    #[serde(rename = "generatorURL")]
    generator_url: &'a str,
}

/// The JSON array POSTed for `n` at `now_ms`.
pub fn body(n: &Notification, now_ms: i64, resend_interval: Duration) -> String {
    let ahead = (resend_interval * ENDS_AT_RESENDS).as_millis() as i64;
    let alerts: Vec<Postable<'_>> = n
        .alerts
        .iter()
        .map(|a| Postable {
            labels: &a.labels,
            annotations: &a.annotations,
            starts_at: super::rfc3339(a.starts_at_ms),
            ends_at: super::rfc3339(match a.status {
                AlertStatus::Firing => now_ms + ahead,
                // Alertmanager wants an end after the start.
                AlertStatus::Resolved => a.ends_at_ms.unwrap_or(now_ms).max(a.starts_at_ms + 1),
            }),
            generator_url: &a.generator_url,
        })
        .collect();
    serde_json::to_string(&alerts).unwrap_or_else(|_| "[]".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::webhook::tests::sample;

    #[test]
    fn firing_ends_ahead_resolved_ends_at_resolve_time() {
        let now = 1_700_000_100_000;
        let v: serde_json::Value =
            serde_json::from_str(&body(&sample(), now, Duration::from_secs(60))).unwrap();
        let want = serde_json::json!([
            {
                "labels": {"alertname": "ZfsPoolDegraded", "node": "nas-01", "severity": "critical"},
                "annotations": {"summary": "pool tank on nas-01 is DEGRADED"},
                "startsAt": "2023-11-14T22:13:20.000Z",
                "endsAt": "2023-11-14T22:19:00.000Z",
                "generatorURL": "vitals://alerts/ZfsPoolDegraded"
            },
            {
                "labels": {"alertname": "ZfsPoolDegraded", "node": "nas-02", "severity": "critical"},
                "annotations": {"summary": "pool tank on nas-02 is DEGRADED"},
                "startsAt": "2023-11-14T22:13:20.000Z",
                "endsAt": "2023-11-14T22:14:20.000Z",
                "generatorURL": "vitals://alerts/ZfsPoolDegraded"
            }
        ]);
        assert_eq!(v, want);
    }

    #[test]
    fn url_gets_the_api_path() {
        let c = |url: &str| AlertmanagerConfig {
            url: url.into(),
            timeout: Duration::from_secs(1),
            resend_interval: Duration::from_secs(60),
            ca: None,
        };
        let a = Alertmanager::new(&c("http://127.0.0.1:9093"), None).unwrap();
        assert_eq!(a.endpoint.url(), "http://127.0.0.1:9093/api/v2/alerts");
        let a = Alertmanager::new(&c("http://127.0.0.1:9093/am/"), None).unwrap();
        assert_eq!(a.endpoint.url(), "http://127.0.0.1:9093/am/api/v2/alerts");
        assert!(Alertmanager::new(&c("http://h/?x=1"), None).is_err());
    }
}
