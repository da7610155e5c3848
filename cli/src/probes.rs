//! `vitals probes`: each probed inference endpoint now — latency
//! quantiles against its SLO, error ratio, correctness on golden inputs,
//! and its open alerts — and `vitals actions`: the audit records of the
//! actions alerts ran.
//!
//! Instant queries over the probe source's series (`vitals_probe_*`, one
//! set per agent that probes the endpoint: a row per (node, endpoint)).

use std::collections::BTreeMap;

use anyhow::Result;
use vitals_proto::label;
use vitals_proto::v1::{ActionRun, Alert, ListActionsRequest, Series};

use crate::client::{self, CliConfig};
use crate::commands::{status_error, table};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ask {
    Info,
    Latency,
    Slo,
    Errors,
    Correct,
    Requests,
    Success,
}

pub fn queries() -> Vec<(Ask, &'static str)> {
    vec![
        (Ask::Info, "vitals_probe_info"),
        (Ask::Latency, "vitals_probe_latency_seconds"),
        (Ask::Slo, "vitals_probe_slo_latency_seconds"),
        (Ask::Errors, "vitals_probe_error_ratio"),
        (Ask::Correct, "vitals_probe_correct_ratio"),
        (Ask::Requests, "vitals_probe_requests_total"),
        (Ask::Success, "vitals_probe_success"),
    ]
}

#[derive(Default)]
pub struct Answers {
    pub series: BTreeMap<Ask, Vec<Series>>,
    pub alerts: Vec<Alert>,
}

/// One endpoint as one agent probes it.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct ProbeRow {
    pub node: String,
    pub endpoint: String,
    pub model: String,
    pub deployment: String,
    pub url: String,
    pub p50_seconds: Option<f64>,
    pub p90_seconds: Option<f64>,
    pub p99_seconds: Option<f64>,
    pub slo_latency_seconds: Option<f64>,
    pub error_ratio: Option<f64>,
    pub correct_ratio: Option<f64>,
    pub requests_total: Option<f64>,
    /// The last round: every request answered 2xx.
    pub up: Option<bool>,
    /// Open alerts with this endpoint (firing first).
    pub alerts: Vec<String>,
}

fn last(s: &Series) -> Option<f64> {
    s.points.last().map(|p| p.value)
}

pub fn build(a: &Answers) -> Vec<ProbeRow> {
    let mut rows: BTreeMap<(String, String), ProbeRow> = BTreeMap::new();
    let key = |s: &Series| {
        (
            label(&s.labels, "node").to_string(),
            label(&s.labels, "endpoint").to_string(),
        )
    };
    for s in a.series.get(&Ask::Info).into_iter().flatten() {
        let r = rows.entry(key(s)).or_default();
        r.node = label(&s.labels, "node").into();
        r.endpoint = label(&s.labels, "endpoint").into();
        r.model = label(&s.labels, "model").into();
        r.deployment = label(&s.labels, "deployment").into();
        r.url = label(&s.labels, "url").into();
    }
    for (ask, list) in &a.series {
        for s in list {
            let Some(r) = rows.get_mut(&key(s)) else {
                continue;
            };
            let v = last(s);
            match ask {
                Ask::Latency => match label(&s.labels, "quantile") {
                    "0.5" => r.p50_seconds = v,
                    "0.9" => r.p90_seconds = v,
                    "0.99" => r.p99_seconds = v,
                    _ => {}
                },
                Ask::Slo => r.slo_latency_seconds = v,
                Ask::Errors => r.error_ratio = v,
                Ask::Correct => r.correct_ratio = v,
                Ask::Requests => r.requests_total = v,
                Ask::Success => r.up = v.map(|v| v >= 1.0),
                Ask::Info => {}
            }
        }
    }
    let mut alerts: Vec<&Alert> = a.alerts.iter().collect();
    alerts.sort_by_key(|al| (al.state != "firing", al.rule.clone()));
    for al in alerts {
        let (node, ep) = (label(&al.labels, "node"), label(&al.labels, "endpoint"));
        if let Some(r) = rows.get_mut(&(node.to_string(), ep.to_string()))
            && !r.alerts.contains(&al.rule)
        {
            r.alerts.push(al.rule.clone());
        }
    }
    rows.into_values().collect()
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.0}ms", s * 1000.0))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

pub fn render(rows: &[ProbeRow], json: bool) -> String {
    if json {
        return serde_json::json!({ "probes": rows }).to_string();
    }
    if rows.is_empty() {
        return "no probed endpoints (configure [[sources.probe.endpoints]] on an agent)".into();
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    s.to_string()
                }
            };
            vec![
                r.endpoint.clone(),
                or_dash(&r.model),
                or_dash(&r.deployment),
                r.node.clone(),
                match r.up {
                    Some(true) => "up".into(),
                    Some(false) => "FAILING".into(),
                    None => "-".into(),
                },
                ms(r.p50_seconds),
                ms(r.p99_seconds),
                ms(r.slo_latency_seconds),
                pct(r.error_ratio),
                pct(r.correct_ratio),
                if r.alerts.is_empty() {
                    "-".into()
                } else {
                    r.alerts.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "ENDPOINT",
            "MODEL",
            "DEPLOYMENT",
            "FROM",
            "STATE",
            "P50",
            "P99",
            "SLO",
            "ERRORS",
            "CORRECT",
            "ALERTS",
        ],
        &body,
    )
}

/// `vitals probes`.
pub async fn probes(cfg: &CliConfig, json: bool) -> Result<String> {
    let (series, alerts) = crate::commands::instant_with_alerts(cfg, queries()).await?;
    Ok(render(&build(&Answers { series, alerts }), json))
}

/// An audit record as `--json` prints it.
#[derive(Debug, serde::Serialize)]
struct RunJson<'a> {
    id: i64,
    action: &'a str,
    rule: &'a str,
    fingerprint: &'a str,
    alert_since_ms: i64,
    labels: BTreeMap<&'a str, &'a str>,
    what: &'a str,
    who: &'a str,
    dry_run: bool,
    outcome: &'a str,
    started_ms: i64,
    ended_ms: Option<i64>,
    exit_code: Option<i64>,
    output: &'a str,
}

pub fn render_actions(runs: &[ActionRun], json: bool) -> String {
    if json {
        let rows: Vec<RunJson> = runs
            .iter()
            .map(|r| RunJson {
                id: r.id,
                action: &r.action,
                rule: &r.rule,
                fingerprint: &r.fingerprint,
                alert_since_ms: r.alert_since_ms,
                labels: r
                    .labels
                    .iter()
                    .map(|l| (l.name.as_str(), l.value.as_str()))
                    .collect(),
                what: &r.what,
                who: &r.who,
                dry_run: r.dry_run,
                outcome: &r.outcome,
                started_ms: r.started_ms,
                ended_ms: (r.ended_ms != 0).then_some(r.ended_ms),
                exit_code: r.exit_code,
                output: &r.output,
            })
            .collect();
        return serde_json::json!({ "actions": rows }).to_string();
    }
    if runs.is_empty() {
        return "no actions recorded (configure [alerting.actions.NAME] on the collector)".into();
    }
    let body: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let first_line = r
                .output
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            vec![
                crate::commands::fmt_ms(r.started_ms),
                r.action.clone(),
                r.rule.clone(),
                label(&r.labels, "node").to_string(),
                if r.dry_run && r.outcome == "dry_run" {
                    "dry-run".into()
                } else {
                    r.outcome.clone()
                },
                r.exit_code.map_or("-".into(), |c| c.to_string()),
                r.what.clone(),
                first_line.chars().take(60).collect(),
            ]
        })
        .collect();
    table(
        &[
            "WHEN", "ACTION", "RULE", "NODE", "OUTCOME", "EXIT", "WHAT", "OUTPUT",
        ],
        &body,
    )
}

/// `vitals actions`.
pub async fn actions(cfg: &CliConfig, limit: u32, json: bool) -> Result<String> {
    let channel = client::channel(cfg).await?;
    let runs = client::alerts_client(channel)
        .list_actions(ListActionsRequest { limit })
        .await
        .map_err(status_error)?
        .into_inner()
        .runs;
    Ok(render_actions(&runs, json))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use vitals_proto::v1::Label;

    use super::*;

    use crate::commands::test_series as s;

    #[test]
    fn rows_per_node_and_endpoint() {
        let ep = [("node", "a"), ("endpoint", "blue"), ("model", "m1")];
        let mut a = Answers::default();
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut l = ep.to_vec();
            l.extend_from_slice(extra);
            l
        };
        a.series.insert(
            Ask::Info,
            vec![
                s(
                    "vitals_probe_info",
                    &with(&[("url", "http://h/score")]),
                    1.0,
                ),
                s(
                    "vitals_probe_info",
                    &[("node", "b"), ("endpoint", "blue"), ("url", "u")],
                    1.0,
                ),
            ],
        );
        a.series.insert(
            Ask::Latency,
            vec![
                s(
                    "vitals_probe_latency_seconds",
                    &with(&[("quantile", "0.5")]),
                    0.02,
                ),
                s(
                    "vitals_probe_latency_seconds",
                    &with(&[("quantile", "0.99")]),
                    0.8,
                ),
                // An endpoint without info (another agent's leftovers): no row.
                s(
                    "vitals_probe_latency_seconds",
                    &[("node", "c"), ("endpoint", "x"), ("quantile", "0.5")],
                    1.0,
                ),
            ],
        );
        a.series.insert(
            Ask::Slo,
            vec![s("vitals_probe_slo_latency_seconds", &ep, 0.5)],
        );
        a.series.insert(
            Ask::Correct,
            vec![s("vitals_probe_correct_ratio", &ep, 0.75)],
        );
        a.series
            .insert(Ask::Success, vec![s("vitals_probe_success", &ep, 0.0)]);
        a.alerts = vec![Alert {
            rule: "ProbeLatencyAboveSlo".into(),
            state: "firing".into(),
            labels: vec![
                Label {
                    name: "node".into(),
                    value: "a".into(),
                },
                Label {
                    name: "endpoint".into(),
                    value: "blue".into(),
                },
            ],
            ..Default::default()
        }];
        let rows = build(&a);
        assert_eq!(rows.len(), 2);
        let r = &rows[0];
        assert_eq!(
            (r.node.as_str(), r.model.as_str(), r.url.as_str()),
            ("a", "m1", "http://h/score")
        );
        assert_eq!(
            (r.p50_seconds, r.p90_seconds, r.p99_seconds),
            (Some(0.02), None, Some(0.8))
        );
        assert_eq!(
            (r.slo_latency_seconds, r.correct_ratio, r.up),
            (Some(0.5), Some(0.75), Some(false))
        );
        assert_eq!(r.alerts, vec!["ProbeLatencyAboveSlo"]);
        assert!(rows[1].alerts.is_empty() && rows[1].p50_seconds.is_none());
        let text = render(&rows, false);
        assert!(
            text.contains("800ms") && text.contains("FAILING") && text.contains("75.0%"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&render(&rows, true)).unwrap();
        assert_eq!(json["probes"][0]["p99_seconds"], 0.8);
    }
}
