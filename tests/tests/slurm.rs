//! The job side of the agent against a real one-node SLURM cluster
//! (tests/src/slurm.rs) and a real collector, over mTLS on 127.0.0.1:
//! job state changes as events, job series, and (with the collector's
//! rules) the job alerts.
//!
//! Skipped without slurmctld/slurmd/munge unless `VITALS_TEST_SLURM=1`
//! (`.ci/run` sets it), which makes a missing component a failure. Every
//! test name contains `slurm`: nextest runs them one at a time
//! (`.config/nextest.toml`), and the cluster's lock keeps other processes
//! out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vitals_e2e::receivers::required;
use vitals_e2e::slurm::{Cluster, slurm_binaries};
use vitals_e2e::*;
use vitals_proto::v1::MatchOp;

const NODE: &str = "train-01";

/// Dropped in field order: the cluster stops before its directory goes.
struct Setup {
    cluster: Cluster,
    env: Env,
    port: u16,
    collector: Proc,
    reader: Reader,
    cli: PathBuf,
}

/// A cluster, and a collector with `collector_extra` in its config; None
/// when the test is skipped.
fn setup(test: &str, collector_extra: &str) -> Option<Setup> {
    required(test, "VITALS_TEST_SLURM", slurm_binaries())?;
    let env = Env::new();
    env.issue(NODE, "agent", &[]);
    let cluster = Cluster::start(&env.path().join("slurm"));
    let port = free_port();
    let collector = start_collector_with(&env, port, collector_extra);
    let reader = Reader::new(&env, port);
    let cli = env.cli_config(port);
    Some(Setup {
        env,
        port,
        collector,
        reader,
        cluster,
        cli,
    })
}

impl Setup {
    /// An agent on this cluster: the slurm source (and `extra`).
    fn agent(&self, extra: &str, vars: &[(&str, &str)]) -> Agent {
        let opts = AgentOpts {
            cert: self.env.cert(NODE),
            ca: None,
            node: None,
            interval: "500ms",
            spool_max_bytes: 64 << 20,
        };
        let cfg = agent_config(&self.env, NODE, self.port, &opts, extra);
        let mut all = vec![self.cluster.env()];
        all.extend_from_slice(vars);
        restart_agent_env(&cfg, &all)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--config", self.cli.to_str().unwrap()];
        all.extend_from_slice(args);
        serde_json::from_str(&self.env.vitals_ok(&all)).unwrap()
    }

    /// `slurm_job_state` events of one job as (old, new) states.
    fn state_events(&self, job: u64) -> Vec<(String, String)> {
        let j = self.json(&["events", "--kind", "slurm_job_state", "--json"]);
        let mut out: Vec<(i64, String, String)> = j["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["labels"]["job_id"] == job.to_string().as_str())
            .map(|e| {
                (
                    e["timestamp_ms"].as_i64().unwrap(),
                    e["labels"]["old_state"].as_str().unwrap().to_string(),
                    e["labels"]["new_state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out.into_iter().map(|(_, a, b)| (a, b)).collect()
    }

    fn events(&self, kind: &str) -> Vec<serde_json::Value> {
        let j = self.json(&["events", "--kind", kind, "--json"]);
        j["events"].as_array().unwrap().clone()
    }

    #[allow(dead_code)]
    fn alerts(&self) -> Vec<serde_json::Value> {
        let j = self.json(&["alerts", "--json"]);
        j["alerts"].as_array().unwrap().clone()
    }
}

/// A job script in `dir` that runs `body` (bash).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(format!("{name}.sh"));
    std::fs::write(&p, format!("#!/bin/bash\n{body}\n")).unwrap();
    p
}

#[test]
fn slurm_job_state_changes_arrive_as_events_and_job_series_are_queryable() {
    let Some(s) = setup("slurm job states", "") else {
        return;
    };
    let mut agent = s.agent("", &[]);
    let dir = s.env.path().to_path_buf();
    let job = script(&dir, "short", "echo started; sleep 3; echo done");
    // Held, so the agent sees it PENDING before it runs.
    let out = dir.join("short-%j.out");
    let id = s.cluster.sbatch(
        &job,
        &["--hold", "-J", "short", "-o", out.to_str().unwrap()],
    );
    let job_id = id.to_string();
    let pending = || {
        s.reader
            .series(
                "vitals_slurm_job_state",
                &[
                    ("job_id", MatchOp::Equal, &job_id),
                    ("state", MatchOp::Equal, "PENDING"),
                ],
            )
            .iter()
            .any(|x| x.points.last().is_some_and(|p| p.value == 1.0))
    };
    assert!(
        wait_until(Duration::from_secs(30), pending),
        "the held job is stored as PENDING; agent log:\n{}",
        agent.proc.log_text()
    );
    s.cluster.run("scontrol", &["release", &job_id]);
    let want = [
        ("PENDING".to_string(), "RUNNING".to_string()),
        ("RUNNING".to_string(), "COMPLETED".to_string()),
    ];
    let seen = wait_until(Duration::from_secs(60), || {
        let ev = s.state_events(id);
        want.iter().all(|w| ev.contains(w))
    });
    assert!(
        seen,
        "PENDING -> RUNNING -> COMPLETED events; got {:?}\nagent log:\n{}\n{}",
        s.state_events(id),
        agent.proc.log_text(),
        s.cluster.logs()
    );
    let ev = s.events("slurm_job_state");
    let e = ev
        .iter()
        .find(|e| e["labels"]["job_id"] == job_id.as_str())
        .unwrap();
    assert_eq!(e["node"], NODE);
    assert_eq!(e["labels"]["name"], "short");
    assert_eq!(e["labels"]["user"], "root");
    assert_eq!(e["labels"]["partition"], "debug");

    let info = s.reader.series(
        "vitals_slurm_job_info",
        &[("job_id", MatchOp::Equal, &job_id)],
    );
    assert!(!info.is_empty());
    let l = labels(&info[0]);
    assert_eq!(l["name"], "short");
    assert_eq!(l["user"], "root");
    let node = s.reader.series(
        "vitals_slurm_job_node",
        &[("job_id", MatchOp::Equal, &job_id)],
    );
    assert_eq!(labels(&node[0])["slurm_node"], s.cluster.node);
    assert!(
        !s.reader
            .series(
                "vitals_slurm_job_start_time_seconds",
                &[("job_id", MatchOp::Equal, &job_id)]
            )
            .is_empty()
    );
    let _ = &s.collector;
    agent.proc.term(Duration::from_secs(20));
}

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");

/// The MI100 capture with one more process: `pid` using GPU 0 (1 GiB).
fn capture_with_process(dir: &Path, pid: u32) -> PathBuf {
    let text =
        std::fs::read_to_string(Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["system"][format!("PID{pid}")] = "python, 1, 1073741824, 0, 50".into();
    let p = dir.join("capture.json");
    std::fs::write(&p, j.to_string()).unwrap();
    p
}

#[test]
fn slurm_job_processes_label_their_gpus_series_with_job_and_user() {
    let Some(s) = setup("slurm job <-> gpu", "") else {
        return;
    };
    let dir = s.env.path().to_path_buf();
    let job = script(&dir, "gpujob", "sleep 300");
    let out = dir.join("gpujob-%j.out");
    let id = s
        .cluster
        .sbatch(&job, &["-J", "gpujob", "-o", out.to_str().unwrap()]);
    let job_id = id.to_string();
    assert!(
        wait_until(Duration::from_secs(30), || !s.cluster.pids(id).is_empty()),
        "the job runs: {}",
        s.cluster.logs()
    );
    let pid = s.cluster.pids(id)[0];
    let capture = capture_with_process(&dir, pid);
    let lib = bin("libfake_rocm_smi.so");
    let mut agent = s.agent(
        &format!("[sources.gpu]\nbackend = \"rocm\"\nlibrary = {lib:?}\n"),
        &[("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap())],
    );
    let labelled = || {
        s.reader.series(
            "gpu_used_vram",
            &[
                ("job_id", MatchOp::Equal, &job_id),
                ("user", MatchOp::Equal, "root"),
            ],
        )
    };
    assert!(
        wait_until(Duration::from_secs(30), || !labelled().is_empty()),
        "GPU 0's series carry the job; agent log:\n{}",
        agent.proc.log_text()
    );
    let l = labelled();
    assert_eq!(l.len(), 1, "only the GPU the process uses");
    assert_eq!(labels(&l[0])["gpu"], "0");
    assert_eq!(labels(&l[0])["node"], NODE);
    assert!(
        !s.reader
            .series(
                "gpu_junction_temperature",
                &[
                    ("gpu", MatchOp::Equal, "0"),
                    ("job_id", MatchOp::Equal, &job_id)
                ]
            )
            .is_empty(),
        "every series of that GPU"
    );
    let gpu1 = s
        .reader
        .series("gpu_used_vram", &[("gpu", MatchOp::Equal, "1")]);
    assert!(gpu1.iter().all(|x| !labels(x).contains_key("job_id")));

    // The job ends: GPU 0's series go on without the job's labels.
    s.cluster.scancel(id);
    let unlabelled_now = || {
        s.reader
            .series("gpu_used_vram", &[("gpu", MatchOp::Equal, "0")])
            .iter()
            .any(|x| !labels(x).contains_key("job_id") && !x.points.is_empty())
    };
    assert!(
        wait_until(Duration::from_secs(30), unlabelled_now),
        "after the job, GPU 0 without job labels; agent log:\n{}",
        agent.proc.log_text()
    );
    agent.proc.term(Duration::from_secs(20));
}
