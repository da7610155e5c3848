//! When an alert fires: the other signals on the same node in the same
//! window, ranked, and the most likely cause among them.
//!
//! Signals are the node's other open alerts and its series whose anomaly
//! score reached [`ANOMALOUS`] in the window. Storage and network signals
//! rank before host ones, host before GPU and job ones (a training stall
//! next to an NFS latency spike is caused by the NFS side, rarely the
//! reverse); within a rank, the earliest onset first. The probable cause is
//! the first ranked signal that started no later than the alert.

use std::collections::HashMap;

use vitals_common::model::{Labels, series_text};
use vitals_common::selector::{Matcher, Op, Selector};

use super::engine::{Alert, Related};
use super::eval::Data;

/// An anomaly score at or above this marks a series as anomalous.
pub const ANOMALOUS: f64 = 0.9;
/// Most related signals kept on an alert.
pub const MAX_RELATED: usize = 10;

/// 0 storage/network, 1 host, 2 GPU/jobs/other.
pub fn rank_of_metric(metric: &str) -> u8 {
    const CAUSES: &[&str] = &[
        "node_zfs_",
        "node_mountstats_",
        "node_nfs",
        "node_network_",
        "node_infiniband_",
    ];
    if CAUSES.iter().any(|p| metric.starts_with(p)) {
        0
    } else if metric.starts_with("node_") {
        1
    } else {
        2
    }
}

fn rank_of_rule(rule: &str) -> u8 {
    if ["Zfs", "Nfs", "Nic", "Infiniband"]
        .iter()
        .any(|p| rule.starts_with(p))
    {
        0
    } else if rule == "NodeDown" {
        1
    } else {
        2
    }
}

/// Related signals for `alert` (on its node) between `since` and `now`,
/// ranked; and the probable cause, if one started no later than the alert.
pub fn related(
    alert: &Alert,
    own_metrics: &[String],
    open: &[&Alert],
    data: &dyn Data,
    since: i64,
    now: i64,
) -> (Vec<Related>, Option<String>) {
    let Some(node) = alert.labels.get("node") else {
        return (Vec::new(), None);
    };
    let mut found: Vec<(u8, Related)> = Vec::new();
    for other in open {
        if other.fingerprint == alert.fingerprint
            || other.labels.get("node") != Some(node)
            || other.rule == alert.rule
        {
            continue;
        }
        found.push((
            rank_of_rule(&other.rule),
            Related {
                kind: "alert".into(),
                what: format!(
                    "{}: {}",
                    other.rule,
                    other
                        .annotations
                        .get("summary")
                        .cloned()
                        .unwrap_or_default()
                ),
                score: 1.0,
                since_ms: other.active_since_ms,
            },
        ));
    }
    let mut scores = Selector {
        metric: "vitals_anomaly_score".into(),
        matchers: Vec::new(),
    };
    if let Ok(m) = Matcher::new("node", Op::Equal, node) {
        scores.matchers.push(m);
    }
    if let Ok(series) = data.range(&scores, since, now) {
        let mut best: HashMap<String, (u8, Related)> = HashMap::new();
        for s in series {
            let metric = s.labels.get("metric").cloned().unwrap_or_default();
            let mut labels: Labels = s.labels.clone();
            labels.remove("metric");
            // The alert's own signal is not its cause.
            if own_metrics.contains(&metric)
                && labels
                    .iter()
                    .all(|(k, v)| alert.labels.get(k).is_none_or(|w| w == v))
            {
                continue;
            }
            let Some(onset) = s.points.iter().find(|p| p.1 >= ANOMALOUS) else {
                continue;
            };
            let peak = s.points.iter().map(|p| p.1).fold(0.0, f64::max);
            let what = series_text(&metric, &labels);
            best.insert(
                what.clone(),
                (
                    rank_of_metric(&metric),
                    Related {
                        kind: "anomaly".into(),
                        what,
                        score: peak,
                        since_ms: onset.0,
                    },
                ),
            );
        }
        found.extend(best.into_values());
    }
    found.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.since_ms.cmp(&b.1.since_ms))
            .then(b.1.score.total_cmp(&a.1.score))
    });
    let start = alert.active_since_ms;
    let cause = found
        .iter()
        .find(|(_, r)| r.since_ms <= start)
        .map(|(_, r)| describe(r));
    found.truncate(MAX_RELATED);
    (found.into_iter().map(|(_, r)| r).collect(), cause)
}

/// One line for a related signal.
pub fn describe(r: &Related) -> String {
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.since_ms.max(0) as u64),
    );
    match r.kind.as_str() {
        "anomaly" => format!("{} anomalous (score {:.2}) since {when}", r.what, r.score),
        _ => format!("alert {} since {when}", r.what),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::engine::Phase;
    use crate::alert::eval::tests::{Mem, series};
    use std::collections::BTreeMap;

    fn alert(rule: &str, node: &str, since: i64) -> Alert {
        let mut labels = Labels::new();
        labels.insert("alertname".into(), rule.into());
        labels.insert("node".into(), node.into());
        Alert {
            id: None,
            fingerprint: format!("{rule}-{node}"),
            rule: rule.into(),
            severity: "critical".into(),
            labels,
            annotations: BTreeMap::from([("summary".to_string(), format!("{rule} summary"))]),
            phase: Phase::Firing,
            active_since_ms: since,
            fired_ms: Some(since),
            resolved_ms: None,
            last_true_ms: since,
            value: 1.0,
            evidence: Vec::new(),
            related: Vec::new(),
            notified: false,
        }
    }

    #[test]
    fn an_earlier_nfs_anomaly_is_the_probable_cause_of_a_gpu_alert() {
        let data = Mem(vec![
            series(
                "vitals_anomaly_score",
                &[
                    ("node", "gpu-01"),
                    (
                        "metric",
                        "node_mountstats_nfs_operations_response_time_average_seconds",
                    ),
                    ("operation", "READ"),
                ],
                &[(1_000, 0.2), (2_000, 0.95), (3_000, 0.99)],
            ),
            series(
                "vitals_anomaly_score",
                &[
                    ("node", "gpu-01"),
                    ("metric", "gpu_gfx_activity"),
                    ("gpu", "0"),
                ],
                &[(2_500, 0.97)],
            ),
            series(
                "vitals_anomaly_score",
                &[("node", "other"), ("metric", "node_load1")],
                &[(1_000, 0.99)],
            ),
        ]);
        let a = alert("GpuMemoryOverload", "gpu-01", 4_000);
        let other = alert("NodeDown", "other", 1_000);
        let same_node = alert("GpuTemperatureHigh", "gpu-01", 3_500);
        let (rel, cause) = related(&a, &[], &[&a, &other, &same_node], &data, 0, 5_000);
        assert_eq!(rel.len(), 3, "{rel:?}");
        assert!(rel[0].what.starts_with("node_mountstats_nfs"), "{rel:?}");
        assert_eq!(rel[0].since_ms, 2_000);
        assert_eq!(rel[0].score, 0.99);
        let cause = cause.unwrap();
        assert!(
            cause.contains("operation=\"READ\"") && cause.contains("0.99"),
            "{cause}"
        );
        assert!(!rel.iter().any(|r| r.what.contains("other")));
    }

    #[test]
    fn the_alerts_own_signal_is_not_its_cause_and_later_signals_are_not_causes() {
        let data = Mem(vec![series(
            "vitals_anomaly_score",
            &[("node", "n"), ("metric", "node_zfs_arc_hit_ratio")],
            &[(1_000, 0.95)],
        )]);
        let a = alert("ZfsArcHitRatioLow", "n", 2_000);
        let (rel, _) = related(&a, &["node_zfs_arc_hit_ratio".into()], &[], &data, 0, 3_000);
        assert!(rel.is_empty());
        let b = alert("GpuMemoryOverload", "n", 500);
        let (rel, cause) = related(&b, &[], &[], &data, 0, 3_000);
        assert_eq!(rel.len(), 1);
        assert_eq!(cause, None, "it started after the alert");
    }
}
