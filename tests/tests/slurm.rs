//! The job side of the agent against a real one-node SLURM cluster
//! (tests/src/slurm.rs) and a real collector, over mTLS on 127.0.0.1:
//! job state changes as events, job series, and (with the collector's
//! rules) the job alerts.
//!
//! Skipped without slurmctld/slurmd/munge unless `VITALS_TEST_SLURM=1`
//! (`.ci/run` sets it), which makes a missing component a failure; the
//! slurmrestd tests likewise without slurmrestd (and SLURM's jwt plugin)
//! unless `VITALS_TEST_SLURMRESTD=1`.
//! nextest runs this binary's tests one at a time (`.config/nextest.toml`),
//! and the cluster's lock keeps other processes out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vitals_e2e::receivers::required;
use vitals_e2e::slurm::{Cluster, jwt_plugin, slurm_binaries, slurmrestd_binary};
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

/// A cluster, and a collector with `collector_extra` in its config and
/// `rules` as its `rules.toml`; None when the test is skipped.
fn setup(test: &str, collector_extra: &str, rules: &str) -> Option<Setup> {
    setup_cluster(test, collector_extra, rules, Cluster::start)
}

/// [`setup`] with the cluster started by `start`.
fn setup_cluster(
    test: &str,
    collector_extra: &str,
    rules: &str,
    start: fn(&Path) -> Cluster,
) -> Option<Setup> {
    required(test, "VITALS_TEST_SLURM", slurm_binaries())?;
    let env = Env::new();
    std::fs::create_dir_all(env.path().join("collector")).unwrap();
    std::fs::write(env.path().join("collector/rules.toml"), rules).unwrap();
    env.issue(NODE, "agent", &[]);
    let cluster = start(&env.path().join("slurm"));
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
        let extra = if extra.contains("[sources.slurm]") {
            extra.to_string()
        } else {
            format!("[sources.slurm]\n{extra}")
        };
        let opts = AgentOpts {
            cert: self.env.cert(NODE),
            ca: None,
            node: None,
            interval: "500ms",
            spool_max_bytes: 64 << 20,
        };
        let cfg = agent_config(&self.env, NODE, self.port, &opts, &extra);
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

    fn alerts(&self) -> Vec<serde_json::Value> {
        let j = self.json(&["alerts", "--all", "--json"]);
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
    let Some(s) = setup("slurm job states", "", "") else {
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
    // Completed: its runtime once, by user and name, for later runs of the
    // same name to be compared with (the job sleeps 3 s; the agent looks
    // every 0.5 s).
    let finished = s.reader.series(
        "vitals_slurm_job_finished_runtime_seconds",
        &[("job_id", MatchOp::Equal, &job_id)],
    );
    assert_eq!(finished.len(), 1, "{finished:?}");
    let l = labels(&finished[0]);
    assert_eq!((l["user"].as_str(), l["name"].as_str()), ("root", "short"));
    let secs = finished[0].points.last().unwrap().value;
    assert!((3.0..=10.0).contains(&secs), "finished after {secs} s");
    assert_eq!(finished[0].points.len(), 1);
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
    let Some(s) = setup("slurm job <-> gpu", "", "") else {
        return;
    };
    let dir = s.env.path().to_path_buf();
    let job = script(&dir, "gpujob", "sleep 300");
    let out = dir.join("gpujob-%j.out");
    let id = s
        .cluster
        .sbatch(&job, &["-J", "gpujob", "-o", out.to_str().unwrap()]);
    let job_id = id.to_string();
    // `scontrol listpids` can list a process of the job's start that is gone
    // a moment later: take a PID that two listings in a row agree on.
    let mut pid = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let first = s.cluster.pids(id);
            let again = s.cluster.pids(id);
            pid = first.into_iter().find(|p| again.contains(p));
            pid.is_some()
        }),
        "the job runs: {}",
        s.cluster.logs()
    );
    let pid = pid.unwrap_or_default();
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

    // `vitals jobs`: the job, SLURM's fields, its one GPU in use and that
    // GPU's utilisation as stored.
    let util = s
        .reader
        .series("gpu_gfx_activity", &[("job_id", MatchOp::Equal, &job_id)]);
    assert_eq!(util.len(), 1);
    let util = util[0].points.last().unwrap().value;
    let j = s.json(&["jobs", "--json"]);
    let row = j["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["job_id"] == job_id.as_str())
        .unwrap_or_else(|| panic!("job {job_id} not in {j}"))
        .clone();
    assert_eq!(row["user"], "root", "{row}");
    assert_eq!(row["name"], "gpujob", "{row}");
    assert_eq!(row["gpus_in_use"], 1.0, "{row}");
    assert_eq!(row["gpu_util_percent"].as_f64(), Some(util), "{row}");
    assert_eq!(row["nodes"].as_array().map(Vec::len), Some(1), "{row}");
    assert!(row["runtime_seconds"].as_f64().is_some(), "{row}");
    let table = s
        .env
        .vitals_ok(&["--config", s.cli.to_str().unwrap(), "jobs"]);
    let line = table
        .lines()
        .find(|l| l.starts_with(&job_id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("gpujob") && line.contains("root") && line.contains("1/"),
        "{line}"
    );

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

/// The job stall window of the test (the pack's is 15 minutes); the other
/// job rules run as shipped.
const STALL_WINDOW_MS: i64 = 4000;
const JOB_RULES: &str = r#"
[[rules]]
name = "JobStalled"
stalled = "vitals_job_step"
while = 'vitals_slurm_job_state{state="RUNNING"} == 1'
window = "4s"
severity = "warning"
labels = { team = "ml" }
summary = "Job {{job_id}} ({{name}}) of {{user}} on {{node}} is stalled at step {{last}} ({{value}} s without progress)"
"#;
const EVAL_MS: i64 = 500;
const AGENT_MS: i64 = 500;

/// The alert of `rule` for `job`, if any (newest first).
fn alert_of(alerts: &[serde_json::Value], rule: &str, job: &str) -> Option<serde_json::Value> {
    alerts
        .iter()
        .find(|a| a["rule"] == rule && a["labels"]["job_id"] == job)
        .cloned()
}

#[test]
fn slurm_training_jobs_that_stall_run_out_of_memory_or_diverge_alert_and_resolve_when_cancelled() {
    let collector_extra = format!(
        "[alerting]\neval_interval = \"{EVAL_MS}ms\"\nkeep_firing_for = \"1s\"\nrule_files = [\"rules.toml\"]\n"
    );
    let Some(s) = setup("slurm job alerts", &collector_extra, JOB_RULES) else {
        return;
    };
    let dir = s.env.path().to_path_buf();
    let mut agent = s.agent(
        &format!("[sources.joblog]\nslurm_node = {:?}\n", s.cluster.node),
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(30), || !s
            .reader
            .samples("vitals_agent_cycles_total", NODE)
            .is_empty()),
        "the agent ships; log:\n{}",
        agent.proc.log_text()
    );
    // A: progress, then stuck while still running.
    let stall = script(
        &dir,
        "stall",
        "sleep 1\nfor i in 1 2 3 4 5 6; do echo \"step $((i*10)) loss 0.$((60-i)) samples/s 123\"; sleep 0.5; done\necho 'waiting for an all-reduce that never completes'\nsleep 600",
    );
    // B: progress, a HIP OOM on stderr, then a NaN loss while stepping on.
    let oom = script(
        &dir,
        "diverge",
        "sleep 1\nfor i in 1 2 3; do echo \"step $i loss 0.9 samples/s 100\"; sleep 0.5; done\necho 'torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 31.98 GiB' >&2\ni=4; while true; do echo \"step $i loss nan samples/s 100\"; i=$((i+1)); sleep 0.5; done",
    );
    let out = |name: &str, ext: &str| dir.join(format!("{name}-%j.{ext}"));
    let a = s.cluster.sbatch(
        &stall,
        &["-J", "stall", "-o", out("stall", "out").to_str().unwrap()],
    );
    let b = s.cluster.sbatch(
        &oom,
        &[
            "-J",
            "diverge",
            "-o",
            out("diverge", "out").to_str().unwrap(),
            "-e",
            out("diverge", "err").to_str().unwrap(),
        ],
    );
    let (ja, jb) = (a.to_string(), b.to_string());
    let firing =
        |rule: &str, job: &str| alert_of(&s.alerts(), rule, job).filter(|a| a["state"] == "firing");
    let all_fired = wait_until(Duration::from_secs(60), || {
        firing("JobStalled", &ja).is_some()
            && firing("JobGpuOutOfMemory", &jb).is_some()
            && firing("JobLossNotFinite", &jb).is_some()
    });
    assert!(
        all_fired,
        "alerts: {:#?}\nagent log:\n{}\n{}",
        s.alerts(),
        agent.proc.log_text(),
        s.cluster.logs()
    );

    // Stalled: within the window plus one interval of the last step.
    let stalled = firing("JobStalled", &ja).unwrap();
    let steps = s
        .reader
        .series("vitals_job_step", &[("job_id", MatchOp::Equal, &ja)]);
    assert_eq!(steps.len(), 1);
    assert_eq!(labels(&steps[0])["user"], "root");
    assert_eq!(labels(&steps[0])["name"], "stall");
    let last_step_at = steps[0]
        .points
        .iter()
        .find(|p| p.value == 60.0)
        .expect("step 60 stored")
        .timestamp_ms;
    let fired = stalled["fired_ms"].as_i64().unwrap();
    let late = fired - last_step_at;
    assert!(
        (STALL_WINDOW_MS..=STALL_WINDOW_MS + AGENT_MS + EVAL_MS + 1000).contains(&late),
        "fired {late} ms after the last step"
    );
    let summary = stalled["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("Job {ja} (stall) of root"))
            && summary.contains("stalled at step 60"),
        "{summary}"
    );
    assert_eq!(stalled["labels"]["team"], "ml");
    assert!(
        firing("JobStalled", &jb).is_none(),
        "the diverging job still steps"
    );

    // Out of memory, with the line as evidence.
    let oom_alert = firing("JobGpuOutOfMemory", &jb).unwrap();
    let line = "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB";
    assert!(
        oom_alert["annotations"]["log"]
            .as_str()
            .is_some_and(|l| l.contains(line)),
        "{oom_alert:#}"
    );
    assert!(
        oom_alert["related"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["kind"] == "log" && r["what"].as_str().unwrap().contains(line)),
        "{oom_alert:#}"
    );
    assert_eq!(oom_alert["labels"]["user"], "root");
    assert_eq!(oom_alert["labels"]["class"], "gpu_oom");
    let summary = oom_alert["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("Job {jb} of root")) && !summary.contains("last step unknown"),
        "{summary}"
    );
    let ev = s.events("job_log");
    let e = ev
        .iter()
        .find(|e| e["labels"]["job_id"] == jb.as_str())
        .expect("a job_log event");
    assert_eq!(e["labels"]["class"], "gpu_oom");
    assert!(e["labels"]["line"].as_str().unwrap().starts_with(line));
    assert!(
        e["labels"]["file"]
            .as_str()
            .unwrap()
            .ends_with(&format!("diverge-{jb}.err"))
    );

    // NaN loss: stored as NaN, and the convergence alert.
    let loss = s
        .reader
        .series("vitals_job_loss", &[("job_id", MatchOp::Equal, &jb)]);
    assert!(loss[0].points.last().unwrap().value.is_nan());
    let nan = firing("JobLossNotFinite", &jb).unwrap();
    let summary = nan["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("Job {jb} (diverge) of root"))
            && summary.contains("NaN/Inf at step "),
        "{summary}"
    );

    // The jobs end: every one of their alerts resolves.
    s.cluster.scancel(a);
    s.cluster.scancel(b);
    let resolved = wait_until(Duration::from_secs(30), || {
        let list = s.alerts();
        [
            ("JobStalled", &ja),
            ("JobGpuOutOfMemory", &jb),
            ("JobLossNotFinite", &jb),
        ]
        .iter()
        .all(|(rule, job)| alert_of(&list, rule, job).is_some_and(|a| a["state"] == "resolved"))
    });
    assert!(
        resolved,
        "alerts after scancel: {:#?}\n{}",
        s.alerts(),
        s.collector.log_text()
    );
    agent.proc.term(Duration::from_secs(20));
}

#[test]
fn slurm_without_json_finds_job_logs_through_scontrol() {
    let Some(s) = setup("slurm text fallback", "", "") else {
        return;
    };
    let dir = s.env.path().to_path_buf();
    // An squeue without the JSON plugin.
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let squeue = bin_dir.join("squeue");
    std::fs::write(
        &squeue,
        "#!/bin/bash\nfor a in \"$@\"; do if [ \"$a\" = --json ]; then echo \"squeue: unrecognized option '--json'\" >&2; exit 1; fi; done\nexec squeue \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&squeue, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut agent = s.agent(
        &format!(
            "[sources.slurm]\nsqueue = {squeue:?}\n[sources.joblog]\nslurm_node = {:?}\n",
            s.cluster.node
        ),
        &[],
    );
    let job = script(
        &dir,
        "textjob",
        "i=1; while true; do echo \"step $i loss 0.5\"; i=$((i+1)); sleep 0.3; done",
    );
    let out = dir.join("text-%x-%j.log");
    let id = s
        .cluster
        .sbatch(&job, &["-J", "textjob", "-o", out.to_str().unwrap()]);
    let job_id = id.to_string();
    let stepping = || {
        s.reader
            .series("vitals_job_step", &[("job_id", MatchOp::Equal, &job_id)])
            .first()
            .is_some_and(|x| x.points.len() >= 2 && x.points.last().unwrap().value > 1.0)
    };
    assert!(
        wait_until(Duration::from_secs(30), stepping),
        "the job's steps through scontrol's StdOut=; agent log:\n{}",
        agent.proc.log_text()
    );
    let fallback = s.reader.series(
        "vitals_slurm_command_text_fallback",
        &[("command", MatchOp::Equal, "squeue")],
    );
    assert_eq!(fallback[0].points.last().unwrap().value, 1.0);
    s.cluster.scancel(id);
    agent.proc.term(Duration::from_secs(20));
}

impl Setup {
    /// The last value of `vitals_slurm_command_success{command}`, if stored.
    fn command_success(&self, command: &str) -> Option<f64> {
        self.reader
            .series(
                "vitals_slurm_command_success",
                &[("command", MatchOp::Equal, command)],
            )
            .first()
            .and_then(|x| x.points.last())
            .map(|p| p.value)
    }

    fn job_info(&self, job_id: &str) -> Vec<vitals_proto::v1::Series> {
        self.reader.series(
            "vitals_slurm_job_info",
            &[("job_id", MatchOp::Equal, job_id)],
        )
    }
}

/// Squeue and sinfo that would fail the test if they were run: through
/// slurmrestd the agent must not need them.
const NO_COMMANDS: &str = "squeue = \"/nonexistent/squeue\"\nsinfo = \"/nonexistent/sinfo\"\n";

#[test]
fn slurmrestd_on_a_unix_socket_reports_jobs_nodes_state_changes_and_job_logs() {
    unix_socket();
}

fn unix_socket() -> Option<()> {
    let test = "slurmrestd unix socket";
    required(test, "VITALS_TEST_SLURMRESTD", slurmrestd_binary())?;
    let s = setup(test, "", "")?;
    let dir = s.env.path().to_path_buf();
    // A job that prints progress, held so that it is seen PENDING first.
    let job = script(
        &dir,
        "restjob",
        "i=1; while [ $i -le 8 ]; do echo \"step $i loss 0.5\"; i=$((i+1)); sleep 0.3; done",
    );
    let out = dir.join("restjob-%j.out");
    let id = s.cluster.sbatch(
        &job,
        &["--hold", "-J", "restjob", "-o", out.to_str().unwrap()],
    );
    let job_id = id.to_string();

    // The agent first, pointed at a socket where no slurmrestd listens yet:
    // a clear failure, counted, and no job samples.
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("slurmrestd.socket");
    let mut agent = s.agent(
        &format!(
            "[sources.slurm]\nrestd = \"unix:{}\"\n{NO_COMMANDS}[sources.joblog]\nslurm_node = {:?}\n",
            socket.display(),
            s.cluster.node
        ),
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            s.command_success("slurmrestd jobs") == Some(0.0)
                && s.command_success("slurmrestd nodes") == Some(0.0)
        }),
        "both requests fail while nothing listens; agent log:\n{}",
        agent.proc.log_text()
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains("cannot connect to slurmrestd at unix:") && log.contains("slurmrestd.socket"),
        "the agent says what it could not reach:\n{log}"
    );
    assert!(
        s.job_info(&job_id).is_empty(),
        "no job samples without slurmrestd"
    );
    assert!(
        s.reader.series("vitals_slurm_node_state", &[]).is_empty(),
        "no node samples without slurmrestd"
    );

    // Now a real slurmrestd on a socket of its own; the agent is pointed
    // at it through a link where it already looks.
    let restd = s.cluster.restd_unix();
    std::os::unix::fs::symlink(restd.url.trim_start_matches("unix:"), &socket).unwrap();
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
        "the held job is stored as PENDING; agent log:\n{}\nslurmrestd log:\n{}",
        agent.proc.log_text(),
        restd.log_text()
    );
    assert_eq!(s.command_success("slurmrestd jobs"), Some(1.0));
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
        "PENDING -> RUNNING -> COMPLETED events; got {:?}\nagent log:\n{}",
        s.state_events(id),
        agent.proc.log_text()
    );
    let ev = s.events("slurm_job_state");
    let e = ev
        .iter()
        .find(|e| e["labels"]["job_id"] == job_id.as_str())
        .unwrap();
    assert_eq!(e["node"], NODE);
    assert_eq!(e["labels"]["name"], "restjob");
    assert_eq!(e["labels"]["user"], "root");

    let info = s.job_info(&job_id);
    assert!(!info.is_empty());
    let l = labels(&info[0]);
    assert_eq!(
        (
            l["name"].as_str(),
            l["user"].as_str(),
            l["partition"].as_str()
        ),
        ("restjob", "root", "debug")
    );
    let node = s.reader.series(
        "vitals_slurm_job_node",
        &[("job_id", MatchOp::Equal, &job_id)],
    );
    assert_eq!(labels(&node[0])["slurm_node"], s.cluster.node);
    // Its log followed through the path slurmrestd gave.
    let steps = s
        .reader
        .series("vitals_job_step", &[("job_id", MatchOp::Equal, &job_id)]);
    assert!(
        steps
            .first()
            .and_then(|x| x.points.iter().map(|p| p.value).reduce(f64::max))
            .is_some_and(|v| v >= 2.0),
        "job steps from its log: {steps:?}"
    );
    // The node, idle again after the job.
    let idle = || {
        s.reader
            .series(
                "vitals_slurm_node_state",
                &[
                    ("slurm_node", MatchOp::Equal, &s.cluster.node),
                    ("state", MatchOp::Equal, "idle"),
                ],
            )
            .first()
            .and_then(|x| x.points.last())
            .is_some_and(|p| p.value == 1.0)
    };
    assert!(wait_until(Duration::from_secs(30), idle), "node idle");
    assert_eq!(s.command_success("slurmrestd nodes"), Some(1.0));
    // The commands were never run (they do not exist).
    assert!(
        s.reader
            .series(
                "vitals_slurm_command_success",
                &[("command", MatchOp::Equal, "squeue")]
            )
            .is_empty()
    );
    agent.proc.term(Duration::from_secs(20));
    Some(())
}

#[test]
fn slurmrestd_over_tcp_takes_a_jwt_from_a_file_and_a_rotated_one_at_once() {
    tcp_jwt();
}

fn tcp_jwt() -> Option<()> {
    let test = "slurmrestd jwt";
    required(
        test,
        "VITALS_TEST_SLURMRESTD",
        slurmrestd_binary().and_then(|_| jwt_plugin()),
    )?;
    let s = setup_cluster(test, "", "", Cluster::start_jwt)?;
    let restd = s.cluster.restd_jwt();
    let dir = s.env.path().to_path_buf();
    let job = script(&dir, "jwtjob", "sleep 300");
    let out = dir.join("jwtjob-%j.out");
    let id = s
        .cluster
        .sbatch(&job, &["-J", "jwtjob", "-o", out.to_str().unwrap()]);
    let job_id = id.to_string();
    // A token slurmctld did not issue: refused, counted, nothing stored.
    let bad = "SLURM_JWT=eyJhbGciOiJIUzI1NiJ9.eyJzdW4iOiJyb290In0.bm90LXNpZ25lZC1ieS1zbHVybQ";
    let token_file = dir.join("slurm.jwt");
    std::fs::write(&token_file, format!("{bad}\n")).unwrap();
    let mut agent = s.agent(
        &format!(
            "[sources.slurm]\nrestd = {:?}\nrestd_token_file = {token_file:?}\nrestd_user = \"root\"\n{NO_COMMANDS}",
            restd.url
        ),
        &[],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            s.command_success("slurmrestd jobs") == Some(0.0)
        }),
        "a bad token fails the request; agent log:\n{}\nslurmrestd log:\n{}",
        agent.proc.log_text(),
        restd.log_text()
    );
    let log = agent.proc.log_text();
    assert!(
        log.contains("slurmrestd answered HTTP"),
        "says what slurmrestd answered:\n{log}"
    );
    assert!(
        !log.contains("bm90LXNpZ25lZC1ieS1zbHVybQ"),
        "never the token:\n{log}"
    );
    assert!(
        s.job_info(&job_id).is_empty(),
        "no job samples with a bad token"
    );

    // A rotated token is used without a restart.
    std::fs::write(&token_file, s.cluster.token("root")).unwrap();
    let reported = || {
        s.job_info(&job_id)
            .iter()
            .any(|x| labels(x)["state"] == "RUNNING")
    };
    assert!(
        wait_until(Duration::from_secs(30), reported),
        "the job through slurmrestd with the new token; agent log:\n{}\nslurmrestd log:\n{}",
        agent.proc.log_text(),
        restd.log_text()
    );
    for x in s.job_info(&job_id) {
        let l = labels(&x);
        assert_eq!((l["name"].as_str(), l["user"].as_str()), ("jwtjob", "root"));
    }
    assert!(wait_until(Duration::from_secs(10), || {
        s.command_success("slurmrestd nodes") == Some(1.0)
    }));
    s.cluster.scancel(id);
    let cancelled = wait_until(Duration::from_secs(30), || {
        s.state_events(id)
            .contains(&("RUNNING".to_string(), "CANCELLED".to_string()))
    });
    assert!(
        cancelled,
        "RUNNING -> CANCELLED event: {:?}",
        s.state_events(id)
    );
    agent.proc.term(Duration::from_secs(20));
    Some(())
}

/// The fake ROCm library's capture with uncorrectable ECC errors on GPU 0's
/// UMC block (the fake's own `ECC <block> ...` keys).
fn capture_with_ecc(path: &Path, uncorrectable: u64) {
    let text =
        std::fs::read_to_string(Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json")).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["card0"]["ECC umc correctable"] = "0".into();
    j["card0"]["ECC umc uncorrectable"] = uncorrectable.to_string().into();
    // Written whole and renamed: the library never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, j.to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The drain action against the real cluster: uncorrectable ECC errors
/// from the fake ROCm library fire `GpuEccUncorrectable`, whose action runs
/// `scontrol update ... state=drain` once on the collector (or, dry, only
/// says what it would run). Returns the audit records, `sinfo`'s
/// `state|reason` of the node afterwards, the alerts and the `action`
/// events; None when skipped.
#[allow(clippy::type_complexity)]
fn drain_on_ecc(
    test: &str,
    dry_run: bool,
) -> Option<(
    Vec<serde_json::Value>,
    String,
    String,
    Vec<serde_json::Value>,
)> {
    required(test, "VITALS_TEST_SLURM", slurm_binaries())?;
    let env = Env::new();
    let cluster = Cluster::start(&env.path().join("slurm"));
    // The agent's node name is the SLURM node's, as on a real cluster.
    let node = cluster.node.clone();
    env.issue(&node, "agent", &[]);
    let port = free_port();
    let extra = format!(
        "[alerting]\neval_interval = \"500ms\"\n\
         [alerting.actions.drain]\n\
         command = [\"scontrol\", \"update\", \"nodename={{{{slurm_node or node}}}}\", \"state=drain\", \"reason=vitals: uncorrectable ECC on GPU {{{{gpu}}}}\"]\n\
         rules = [\"GpuEccUncorrectable\"]\ndry_run = {dry_run}\ntimeout = \"20s\"\n"
    );
    let _collector = start_collector_full(&env, port, &extra, &[cluster.env()]);
    let cli = env.cli_config(port);
    let capture = env.path().join("capture.json");
    capture_with_ecc(&capture, 0);
    let lib = bin("libfake_rocm_smi.so");
    let opts = AgentOpts {
        cert: env.cert(&node),
        ca: None,
        node: None,
        interval: "300ms",
        spool_max_bytes: 64 << 20,
    };
    let cfg = agent_config(
        &env,
        &node,
        port,
        &opts,
        &format!("[sources.gpu]\nbackend = \"rocm\"\nlibrary = {lib:?}\n"),
    );
    let mut agent = restart_agent_env(
        &cfg,
        &[("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap())],
    );
    let reader = Reader::new(&env, port);
    let ecc = || {
        reader.series(
            "gpu_ecc_uncorrect_total",
            &[
                ("gpu", MatchOp::Equal, "0"),
                ("node", MatchOp::Equal, &node),
            ],
        )
    };
    assert!(
        wait_until(Duration::from_secs(30), || ecc()
            .first()
            .is_some_and(|s| s.points.len() >= 2)),
        "ECC counters arrive at 0 first; agent log:\n{}",
        agent.proc.log_text()
    );
    assert_eq!(cluster.run("sinfo", &["-h", "-o", "%T"]).trim(), "idle");
    capture_with_ecc(&capture, 2);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--config", cli.to_str().unwrap()];
        all.extend_from_slice(args);
        serde_json::from_str(&env.vitals_ok(&all)).unwrap()
    };
    let runs = || {
        json(&["actions", "--json"])["actions"]
            .as_array()
            .unwrap()
            .clone()
    };
    let done = |r: &serde_json::Value| r["outcome"] == "ok" || r["outcome"] == "dry_run";
    assert!(
        wait_until(Duration::from_secs(60), || runs().iter().any(done)),
        "the action ran; actions: {:?}; alerts: {}",
        runs(),
        json(&["alerts", "--all", "--json"])
    );
    // More evaluations of the same firing alert run nothing more.
    std::thread::sleep(Duration::from_secs(3));
    let all = runs();
    let state = cluster.run("sinfo", &["-h", "-N", "-o", "%T|%E"]);
    let alerts = json(&["alerts", "--all", "--json"]).to_string();
    let events = json(&["events", "--kind", "action", "--json"])["events"]
        .as_array()
        .unwrap()
        .clone();
    agent.proc.term(Duration::from_secs(20));
    Some((all, state.trim().to_string(), alerts, events))
}

#[test]
fn slurm_uncorrectable_ecc_drains_the_node_once_with_the_reason_and_an_audit_record() {
    let Some((runs, state, alerts, events)) = drain_on_ecc("slurm drain action", false) else {
        return;
    };
    // The run is an event on the node too.
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["labels"]["action"], "drain");
    assert_eq!(events[0]["labels"]["rule"], "GpuEccUncorrectable");
    assert_eq!(events[0]["labels"]["outcome"], "ok");
    assert_eq!(events[0]["severity"], "info");
    assert!(
        events[0]["message"]
            .as_str()
            .unwrap()
            .contains("state=drain"),
        "{events:?}"
    );
    assert_eq!(runs.len(), 1, "one run per alert: {runs:?}");
    let r = &runs[0];
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(r["action"], "drain");
    assert_eq!(r["rule"], "GpuEccUncorrectable");
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["exit_code"], 0);
    let what = r["what"].as_str().unwrap();
    assert!(what.contains("state=drain"), "{what}");
    assert!(
        what.contains("reason=vitals: uncorrectable ECC on GPU 0"),
        "{what}"
    );
    // sinfo: drained (no job was running), with the reason.
    let (st, reason) = state.split_once('|').unwrap();
    assert!(st.starts_with("drain"), "{state}");
    assert_eq!(reason, "vitals: uncorrectable ECC on GPU 0", "{state}");
    assert!(alerts.contains("GpuEccUncorrectable"), "{alerts}");
}

#[test]
fn slurm_drain_action_in_dry_run_runs_nothing_and_says_what_it_would_run() {
    let Some((runs, state, _, events)) = drain_on_ecc("slurm drain action, dry run", true) else {
        return;
    };
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["labels"]["outcome"], "dry_run");
    assert!(
        events[0]["message"].as_str().unwrap().contains("would run"),
        "{events:?}"
    );
    assert_eq!(runs.len(), 1, "{runs:?}");
    let r = &runs[0];
    assert_eq!(r["outcome"], "dry_run", "{r}");
    assert_eq!(r["dry_run"], true);
    let what = r["what"].as_str().unwrap();
    assert!(
        what.contains("scontrol") && what.contains("state=drain"),
        "the record says what would have run: {what}"
    );
    assert_eq!(state, "idle|none", "nothing ran: the node is not drained");
}
