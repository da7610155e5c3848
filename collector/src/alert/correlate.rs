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

/// Most log lines attached to a job alert.
pub const MAX_LOG_LINES: usize = 5;

/// For an alert on a job (a `job_id` label): the job's recent `job_log`
/// events on the alert's node between `since` and `now`, of the alert's
/// `class` if it has one, oldest first, as related signals of kind `log`
/// (`what` is the matched line).
pub fn job_log(alert: &Alert, data: &dyn Data, since: i64, now: i64) -> Vec<Related> {
    let (Some(node), Some(job)) = (alert.labels.get("node"), alert.labels.get("job_id")) else {
        return Vec::new();
    };
    let class = alert.labels.get("class");
    let Ok(events) = data.events(node, "job_log", since, now, 1000) else {
        return Vec::new();
    };
    let mut out: Vec<Related> = events
        .into_iter()
        .filter(|e| e.labels.get("job_id") == Some(job))
        .filter(|e| class.is_none_or(|c| e.labels.get("class") == Some(c)))
        .take(MAX_LOG_LINES)
        .map(|e| Related {
            kind: "log".into(),
            what: e
                .labels
                .get("line")
                .cloned()
                .unwrap_or_else(|| e.message.clone()),
            score: 1.0,
            since_ms: e.timestamp_ms,
        })
        .collect();
    out.reverse();
    out
}

/// One line for a related signal.
pub fn describe(r: &Related) -> String {
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.since_ms.max(0) as u64),
    );
    match r.kind.as_str() {
        "log" => format!("log at {when}: {}", r.what),
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

    /// Samples and events in memory.
    struct WithEvents(Mem, Vec<crate::store::EventRow>);

    impl Data for WithEvents {
        fn range(
            &self,
            sel: &Selector,
            start: i64,
            end: i64,
        ) -> Result<Vec<crate::store::SeriesPoints>, String> {
            self.0.range(sel, start, end)
        }
        fn events(
            &self,
            node: &str,
            kind: &str,
            start: i64,
            end: i64,
            limit: usize,
        ) -> Result<Vec<crate::store::EventRow>, String> {
            let mut v: Vec<_> = self
                .1
                .iter()
                .filter(|e| e.node == node && e.kind == kind)
                .filter(|e| e.timestamp_ms >= start && e.timestamp_ms <= end)
                .cloned()
                .collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.timestamp_ms));
            v.truncate(limit);
            Ok(v)
        }
    }

    fn log_event(
        ts: i64,
        node: &str,
        job: &str,
        class: &str,
        line: &str,
    ) -> crate::store::EventRow {
        crate::store::EventRow {
            timestamp_ms: ts,
            node: node.into(),
            kind: "job_log".into(),
            severity: 2,
            message: format!("job {job}: {class}: {line}"),
            labels: [("job_id", job), ("class", class), ("line", line)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn a_hung_nfs_mount_is_the_probable_cause_of_unreadable_training_data() {
        let data = Mem(Vec::new());
        let mut a = alert("JobDataUnreadable", "gpu-01", 5_000);
        a.labels.insert("job_id".into(), "7".into());
        let nfs = alert("NfsMountHung", "gpu-01", 2_000);
        let gpu = alert("GpuTemperatureHigh", "gpu-01", 1_000);
        let (rel, cause) = related(&a, &[], &[&a, &gpu, &nfs], &data, 0, 6_000);
        assert!(rel[0].what.starts_with("NfsMountHung"), "{rel:?}");
        assert!(cause.unwrap().contains("NfsMountHung"));
    }

    #[test]
    fn a_job_alert_carries_that_jobs_log_lines_of_its_class() {
        let data = WithEvents(
            Mem(Vec::new()),
            vec![
                log_event(1_000, "n", "7", "gpu_oom", "HIP out of memory (first)"),
                log_event(
                    2_000,
                    "n",
                    "7",
                    "traceback",
                    "Traceback (most recent call last):",
                ),
                log_event(3_000, "n", "8", "gpu_oom", "another job's OOM"),
                log_event(3_500, "other", "7", "gpu_oom", "another node"),
                log_event(4_000, "n", "7", "gpu_oom", "HIP out of memory (second)"),
            ],
        );
        let mut a = alert("JobGpuOutOfMemory", "n", 4_500);
        a.labels.insert("job_id".into(), "7".into());
        a.labels.insert("class".into(), "gpu_oom".into());
        let log = job_log(&a, &data, 0, 5_000);
        let lines: Vec<&str> = log.iter().map(|r| r.what.as_str()).collect();
        assert_eq!(
            lines,
            ["HIP out of memory (first)", "HIP out of memory (second)"]
        );
        assert!(
            describe(&log[0]).starts_with("log at "),
            "{}",
            describe(&log[0])
        );
        a.labels.remove("class");
        assert_eq!(job_log(&a, &data, 0, 5_000).len(), 3, "every class");
        let b = alert("NodeDown", "n", 4_500);
        assert!(job_log(&b, &data, 0, 5_000).is_empty(), "not a job's alert");
    }
}
