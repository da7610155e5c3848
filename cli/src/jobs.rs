//! `vitals jobs`: the running SLURM jobs, each with its nodes, GPUs, their
//! utilisation, the progress its log reports and its open alerts.
//!
//! Instant queries over the same API as every other command: SLURM's view
//! (`vitals_slurm_job_*`, from whichever agents run `squeue`; a job they
//! all report is one job), the GPUs whose series carry the job's `job_id`
//! (from the agents of the nodes it runs on), the training-log series
//! (`vitals_job_*`) and the alerts with the job's `job_id`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use vitals_proto::label;
use vitals_proto::v1::{Alert, Series};

use crate::client::CliConfig;
use crate::commands::table;

/// What each query answers; `build` reads them by this key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ask {
    Info,
    Nodes,
    Gpus,
    Runtime,
    Limit,
    GpuUtil,
    GpusInUse,
    Step,
    Loss,
    Throughput,
}

/// The instant queries, each one the query engine runs.
pub fn queries() -> Vec<(Ask, &'static str)> {
    vec![
        (Ask::Info, r#"vitals_slurm_job_info{state="RUNNING"}"#),
        (Ask::Nodes, "vitals_slurm_job_node"),
        (Ask::Gpus, "max by (job_id) (vitals_slurm_job_gpus)"),
        (
            Ask::Runtime,
            "max by (job_id) (vitals_slurm_job_runtime_seconds)",
        ),
        (
            Ask::Limit,
            "max by (job_id) (vitals_slurm_job_time_limit_seconds)",
        ),
        (
            Ask::GpuUtil,
            r#"avg by (job_id) (gpu_gfx_activity{job_id!=""})"#,
        ),
        (
            Ask::GpusInUse,
            r#"count by (job_id) (gpu_gfx_activity{job_id!=""})"#,
        ),
        (Ask::Step, "max by (job_id) (vitals_job_step)"),
        (Ask::Loss, "vitals_job_loss"),
        (Ask::Throughput, "sum by (job_id) (vitals_job_throughput)"),
    ]
}

/// The answers: series per query, and the open alerts.
#[derive(Default)]
pub struct Answers {
    pub series: BTreeMap<Ask, Vec<Series>>,
    pub alerts: Vec<Alert>,
}

/// One running job.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct JobRow {
    pub job_id: String,
    pub name: String,
    pub user: String,
    pub account: String,
    pub partition: String,
    /// SLURM's node names.
    pub nodes: Vec<String>,
    /// GPUs allocated by SLURM.
    pub gpus_allocated: Option<f64>,
    /// GPUs whose series carry the job (a process of the job uses them).
    pub gpus_in_use: Option<f64>,
    /// Average GPU utilisation over those, percent.
    pub gpu_util_percent: Option<f64>,
    pub step: Option<f64>,
    pub loss: Option<f64>,
    /// Samples or tokens per second, summed over the job's nodes.
    pub throughput: Option<f64>,
    pub runtime_seconds: Option<f64>,
    pub time_limit_seconds: Option<f64>,
    /// Open alerts with this `job_id`: rule names, firing ones first.
    pub alerts: Vec<String>,
}

/// The rows, by job id (numeric ids in numeric order).
pub fn build(a: &Answers) -> Vec<JobRow> {
    let mut jobs: BTreeMap<(usize, String), JobRow> = BTreeMap::new();
    let key = |id: &str| (id.len(), id.to_string());
    for s in a.series.get(&Ask::Info).into_iter().flatten() {
        let id = label(&s.labels, "job_id");
        if id.is_empty() {
            continue;
        }
        let row = jobs.entry(key(id)).or_default();
        row.job_id = id.to_string();
        for (field, l) in [
            (&mut row.name, "name"),
            (&mut row.user, "user"),
            (&mut row.account, "account"),
            (&mut row.partition, "partition"),
        ] {
            if field.is_empty() {
                *field = label(&s.labels, l).to_string();
            }
        }
    }
    let mut nodes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in a.series.get(&Ask::Nodes).into_iter().flatten() {
        nodes
            .entry(label(&s.labels, "job_id").to_string())
            .or_default()
            .insert(label(&s.labels, "slurm_node").to_string());
    }
    let per_job = |ask: Ask| -> BTreeMap<String, f64> {
        a.series
            .get(&ask)
            .into_iter()
            .flatten()
            .filter_map(|s| Some((label(&s.labels, "job_id").to_string(), s.last_value()?)))
            .collect()
    };
    let (gpus, runtime, limit) = (
        per_job(Ask::Gpus),
        per_job(Ask::Runtime),
        per_job(Ask::Limit),
    );
    let (util, in_use, step, loss, tput) = (
        per_job(Ask::GpuUtil),
        per_job(Ask::GpusInUse),
        per_job(Ask::Step),
        per_job(Ask::Loss),
        per_job(Ask::Throughput),
    );
    for row in jobs.values_mut() {
        let id = &row.job_id;
        row.nodes = nodes
            .get(id)
            .map(|n| n.iter().filter(|n| !n.is_empty()).cloned().collect())
            .unwrap_or_default();
        row.gpus_allocated = gpus.get(id).copied();
        row.runtime_seconds = runtime.get(id).copied();
        row.time_limit_seconds = limit.get(id).copied();
        row.gpu_util_percent = util.get(id).copied();
        row.gpus_in_use = in_use.get(id).copied();
        row.step = step.get(id).copied();
        row.loss = loss.get(id).copied();
        row.throughput = tput.get(id).copied();
        let mut alerts: Vec<(bool, String)> = a
            .alerts
            .iter()
            .filter(|al| label(&al.labels, "job_id") == id)
            .map(|al| (al.state != "firing", al.rule.clone()))
            .collect();
        alerts.sort();
        alerts.dedup();
        row.alerts = alerts.into_iter().map(|(_, r)| r).collect();
    }
    jobs.into_values().collect()
}

fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        Some(v) => v.to_string(),
        None => "-".into(),
    }
}

fn hms(secs: Option<f64>) -> String {
    match secs {
        Some(s) if s.is_finite() && s >= 0.0 => {
            let s = s as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
        _ => "-".into(),
    }
}

/// The table, or `{"jobs": [...]}` with `--json`.
pub fn render(rows: &[JobRow], json: bool) -> String {
    if json {
        return serde_json::json!({ "jobs": rows }).to_string();
    }
    if rows.is_empty() {
        return "no running jobs".into();
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.job_id.clone(),
                r.name.clone(),
                r.user.clone(),
                r.partition.clone(),
                if r.nodes.is_empty() {
                    "-".into()
                } else {
                    r.nodes.join(",")
                },
                format!("{}/{}", num(r.gpus_in_use, 0), num(r.gpus_allocated, 0)),
                r.gpu_util_percent
                    .map_or("-".into(), |u| format!("{u:.0}%")),
                num(r.step, 0),
                num(r.loss, 4),
                num(r.throughput, 1),
                format!("{} / {}", hms(r.runtime_seconds), hms(r.time_limit_seconds)),
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
            "JOB",
            "NAME",
            "USER",
            "PARTITION",
            "NODES",
            "GPUS USED/ALLOC",
            "GPU UTIL",
            "STEP",
            "LOSS",
            "THROUGHPUT",
            "RUNTIME / LIMIT",
            "ALERTS",
        ],
        &body,
    )
}

/// `vitals jobs`.
pub async fn jobs(cfg: &CliConfig, json: bool) -> Result<String> {
    let (series, alerts) = crate::commands::instant_with_alerts(cfg, queries()).await?;
    Ok(render(&build(&Answers { series, alerts }), json))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use vitals_proto::v1::Label;

    use super::*;

    use crate::commands::test_series as s;

    #[test]
    fn answers_become_one_row_per_running_job() {
        let mut a = Answers::default();
        let info = |node: &str, id: &str, user: &str| {
            s(
                "vitals_slurm_job_info",
                &[
                    ("node", node),
                    ("job_id", id),
                    ("name", "train"),
                    ("user", user),
                    ("partition", "gpu"),
                    ("state", "RUNNING"),
                ],
                1.0,
            )
        };
        // Two agents report job 42: one job.
        a.series.insert(
            Ask::Info,
            vec![
                info("ctl", "42", "bob"),
                info("gpu-01", "42", "bob"),
                info("ctl", "7", "amy"),
            ],
        );
        a.series.insert(
            Ask::Nodes,
            vec![
                s("n", &[("job_id", "42"), ("slurm_node", "gpu-02")], 1.0),
                s("n", &[("job_id", "42"), ("slurm_node", "gpu-01")], 1.0),
            ],
        );
        a.series
            .insert(Ask::Gpus, vec![s("", &[("job_id", "42")], 8.0)]);
        a.series
            .insert(Ask::GpuUtil, vec![s("", &[("job_id", "42")], 61.25)]);
        a.series
            .insert(Ask::GpusInUse, vec![s("", &[("job_id", "42")], 8.0)]);
        a.series
            .insert(Ask::Step, vec![s("", &[("job_id", "42")], 1200.0)]);
        a.series
            .insert(Ask::Loss, vec![s("", &[("job_id", "42")], f64::NAN)]);
        a.series
            .insert(Ask::Runtime, vec![s("", &[("job_id", "42")], 3725.0)]);
        a.alerts = vec![
            Alert {
                rule: "JobStraggler".into(),
                state: "pending".into(),
                labels: vec![Label {
                    name: "job_id".into(),
                    value: "42".into(),
                }],
                ..Default::default()
            },
            Alert {
                rule: "JobLossNotFinite".into(),
                state: "firing".into(),
                labels: vec![Label {
                    name: "job_id".into(),
                    value: "42".into(),
                }],
                ..Default::default()
            },
        ];
        let rows = build(&a);
        assert_eq!(rows.len(), 2);
        // Numeric order: 7 before 42.
        assert_eq!(rows[0].job_id, "7");
        assert_eq!(rows[0].user, "amy");
        assert!(rows[0].nodes.is_empty() && rows[0].step.is_none());
        let r = &rows[1];
        assert_eq!(r.nodes, ["gpu-01", "gpu-02"]);
        assert_eq!(r.gpus_allocated, Some(8.0));
        assert_eq!(r.gpu_util_percent, Some(61.25));
        assert_eq!(r.step, Some(1200.0));
        assert!(r.loss.unwrap().is_nan());
        assert_eq!(r.alerts, ["JobLossNotFinite", "JobStraggler"]);
        let text = render(&rows, false);
        let line = text.lines().find(|l| l.starts_with("42")).unwrap();
        for want in [
            "gpu-01,gpu-02",
            "8/8",
            "61%",
            "1200",
            "NaN",
            "1:02:05 / -",
            "JobLossNotFinite,JobStraggler",
        ] {
            assert!(line.contains(want), "{want:?} not in {line:?}");
        }
        let v: serde_json::Value = serde_json::from_str(&render(&rows, true)).unwrap();
        assert_eq!(
            v["jobs"][1]["nodes"],
            serde_json::json!(["gpu-01", "gpu-02"])
        );
        assert_eq!(v["jobs"][1]["gpu_util_percent"], 61.25);
        // NaN is not JSON: null.
        assert!(v["jobs"][1]["loss"].is_null());
        assert_eq!(render(&[], false), "no running jobs");
    }

    #[test]
    fn every_query_parses_in_the_engine() {
        for (_, q) in queries() {
            vitals_collector::promql::parse(q).unwrap();
        }
    }
}
