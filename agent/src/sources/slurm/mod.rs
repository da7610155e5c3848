//! SLURM: jobs and nodes from `squeue` and `sinfo`, or from slurmrestd.
//!
//! Both run off the collection thread with a timeout (`sources::command`),
//! as `--json` first and, where that option or its plugin is missing, as
//! the `-o` text forms of [`parse::SQUEUE_FORMAT`] and
//! [`parse::SINFO_FORMAT`] (with `SLURM_TIME_FORMAT=%s`). The programs are
//! found on `PATH` unless `[sources.slurm] squeue`/`sinfo` name them; where
//! there is no `squeue` the source is unavailable (said once, at debug).
//! With `[sources.slurm] restd` set, the same listings come from
//! slurmrestd's `/slurm/<version>/jobs` and `/nodes` instead ([`restd`]),
//! run the same way, under the same timeout, and parsed by the same code.
//!
//! Samples (SLURM's node names are in `slurm_node`; `node` is the agent's):
//! per job `vitals_slurm_job_info{job_id, array_job_id, array_task_id,
//! name, user, account, partition, state, reason} 1`,
//! `vitals_slurm_job_state{job_id, state}` (one series per state in
//! [`JOB_STATES`], 1 for the job's), `vitals_slurm_job_gpus{job_id, user}`,
//! `vitals_slurm_job_node{job_id, slurm_node} 1`,
//! `vitals_slurm_job_submit_time_seconds`,
//! `vitals_slurm_job_start_time_seconds` (once started),
//! `vitals_slurm_job_time_limit_seconds` (unless unlimited),
//! `vitals_slurm_job_runtime_seconds` (running jobs), all `{job_id}`;
//! `vitals_slurm_job_finished_runtime_seconds{job_id, user, name}` once,
//! when a job seen RUNNING is COMPLETED;
//! `vitals_slurm_jobs{state, partition}` counts; per node
//! `vitals_slurm_node_state{slurm_node, state}` (one series per state in
//! [`NODE_STATES`], 1 for the base state and each flag such as `drain`),
//! `vitals_slurm_node_info{slurm_node, partitions, reason} 1`,
//! `vitals_slurm_node_cpus`, `vitals_slurm_node_cpus_allocated`,
//! `vitals_slurm_node_gpus`. Each command reports on itself:
//! `vitals_slurm_command_{success,duration_seconds,timeouts_total,hung,
//! text_fallback}{command}`; through slurmrestd the two requests report
//! the same series (without `text_fallback`) as `command="slurmrestd jobs"`
//! and `command="slurmrestd nodes"`. An answer that does not parse fails
//! the whole cycle (`vitals_source_success{source="slurm"} 0`): both
//! answers are parsed before anything is reported.
//!
//! The logs of the jobs running on this node are followed by [`joblog`]
//! (`[sources.joblog]`), which adds its samples and `job_log` events.
//!
//! Events: `slurm_job_state` when a job seen in the last cycle is in
//! another state now (not on first sight), labelled `job_id`, `user`,
//! `name`, `partition`, `old_state`, `new_state` and `reason`.

pub mod hostlist;
pub mod joblog;
pub mod parse;
pub mod patterns;
pub mod restd;
pub mod tail;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vitals_common::model::{Labels, Sample};
use vitals_proto::v1::Severity;

use self::parse::{Job, Node};
use super::command::{CommandSpec, Outcome, Runner, Task};
use super::{Source, SourceError, SourceEvent};
use crate::config::RawConfig;

/// Job states with a `vitals_slurm_job_state` series. `COMPLETING` and
/// `CONFIGURING` are flags from 23.02 on, but a ≤ 22.05 `job_state` string
/// and the text form give them alone.
pub const JOB_STATES: &[&str] = &[
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "SUSPENDED",
    "COMPLETING",
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
];

/// Node states and flags with a `vitals_slurm_node_state` series.
pub const NODE_STATES: &[&str] = &[
    "idle",
    "mixed",
    "allocated",
    "completing",
    "down",
    "drain",
    "fail",
    "maintenance",
    "reserved",
    "planned",
    "not_responding",
    "power_down",
    "future",
    "unknown",
    "error",
];

/// End states worth a warning when a job enters them.
const BAD_ENDS: &[&str] = &[
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "TIMEOUT",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
];

/// Stderr of a SLURM command that does not have `--json` (or its plugin).
const NO_JSON: &[&str] = &["unrecognized option", "invalid option", "plugin"];

const SQUEUE: usize = 0;
const SINFO: usize = 1;

/// How the source asks SLURM: a command or a slurmrestd request.
#[derive(Clone)]
enum Fetch {
    Command(CommandSpec),
    Restd(restd::Request),
}

impl Task for Fetch {
    fn label(&self) -> &'static str {
        match self {
            Fetch::Command(c) => c.label,
            Fetch::Restd(r) => r.label,
        }
    }

    fn run(&self, first: usize, timeout: Duration) -> Outcome {
        match self {
            Fetch::Command(c) => c.run(first, timeout),
            Fetch::Restd(r) => r.run(first, timeout),
        }
    }
}

/// `[sources.slurm] restd` and its keys, checked.
struct RestdSettings {
    addr: Arc<restd::Addr>,
    version: String,
    token_file: Option<PathBuf>,
    user: Option<String>,
}

pub struct Slurm {
    squeue: Option<PathBuf>,
    sinfo: Option<PathBuf>,
    timeout: Duration,
    /// How long one cycle waits for the commands it started.
    wait: Duration,
    /// slurmrestd instead of the commands; Err: why it cannot be used
    /// (checked when the config was validated, so only seen if that changed).
    restd: Option<Result<RestdSettings, String>>,
    runners: Option<[Runner<Fetch>; 2]>,
    /// Why the programs were not found, and when to look again (a host
    /// without SLURM is not searched every cycle).
    missing: Option<(Instant, String)>,
    /// Each job's state in the last cycle; None before the first.
    states: Option<HashMap<u64, String>>,
    events: Vec<SourceEvent>,
    /// The last failure logged per command, so each is logged once.
    logged: HashMap<&'static str, String>,
    /// The logs of this node's running jobs, read on their own thread;
    /// None when turned off.
    logs: Option<joblog::Worker>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let s = &cfg.sources.slurm;
    let jl = &cfg.sources.joblog;
    let logs = if jl.enabled.unwrap_or(true) {
        // Checked when the config was validated.
        match jl.patterns() {
            Ok(p) => {
                // Beside a configured squeue, else on PATH.
                let scontrol = s
                    .squeue
                    .as_ref()
                    .and_then(|q| q.parent())
                    .map(|d| d.join("scontrol"))
                    .filter(|p| p.is_file())
                    .or_else(|| on_path("scontrol"));
                let logs = joblog::JobLogs::new(
                    p,
                    jl.slurm_node.clone().unwrap_or_else(joblog::short_hostname),
                    jl.max_read_bytes,
                    jl.max_events,
                )
                .with_scontrol(scontrol, s.command_timeout);
                match joblog::Worker::start(logs) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the job log thread; job logs are not followed");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sources.joblog: bad pattern; job logs are not followed");
                None
            }
        }
    } else {
        None
    };
    let restd = s.restd.as_ref().map(|url| {
        let addr = restd::Addr::parse(url, s.restd_ca_file.as_deref())
            .map_err(|e| format!("sources.slurm.restd: {e}"))?;
        if addr.plaintext_off_host() && s.restd_token_file.is_some() {
            tracing::warn!(restd = %addr, "sources.slurm: the slurmrestd token goes over plain http to another host; use https:// or a unix socket");
        }
        Ok(RestdSettings {
            addr: Arc::new(addr),
            version: s.restd_api_version.clone(),
            token_file: s.restd_token_file.clone(),
            user: s.restd_user.clone(),
        })
    });
    Box::new(Slurm {
        logs,
        restd,
        squeue: s.squeue.clone(),
        sinfo: s.sinfo.clone(),
        timeout: s.command_timeout,
        wait: s.command_timeout.min(cfg.interval / 2),
        runners: None,
        missing: None,
        states: None,
        events: Vec::new(),
        logged: HashMap::new(),
    })
}

/// How often a host without the SLURM commands is searched again.
const LOOK_AGAIN: Duration = Duration::from_secs(60);

/// `name` in a directory of `PATH`, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn program(configured: &Option<PathBuf>, name: &str) -> Result<PathBuf, String> {
    match configured {
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => Err(format!("{}: no such file", p.display())),
        None => on_path(name).ok_or_else(|| format!("no {name} on PATH")),
    }
}

impl Slurm {
    /// The runners, made once both programs are found (or at once for
    /// slurmrestd).
    fn runners(&mut self) -> Result<&mut [Runner<Fetch>; 2], SourceError> {
        if self.runners.is_none()
            && let Some(restd) = &self.restd
        {
            let r = restd.as_ref().map_err(|e| SourceError::Failed(e.clone()))?;
            let request = |label, what| {
                Runner::new(
                    Fetch::Restd(restd::Request::new(
                        label,
                        r.addr.clone(),
                        &r.version,
                        what,
                        r.token_file.clone(),
                        r.user.clone(),
                    )),
                    self.timeout,
                )
            };
            self.runners = Some([
                request("slurmrestd jobs", "jobs"),
                request("slurmrestd nodes", "nodes"),
            ]);
        }
        if self.runners.is_none() {
            if let Some((again, why)) = &self.missing
                && Instant::now() < *again
            {
                return Err(SourceError::Unavailable(why.clone()));
            }
            let found = program(&self.squeue, "squeue")
                .and_then(|q| Ok((q, program(&self.sinfo, "sinfo")?)));
            let (squeue, sinfo) = match found {
                Ok(p) => p,
                Err(why) => {
                    self.missing = Some((Instant::now() + LOOK_AGAIN, why.clone()));
                    return Err(SourceError::Unavailable(why));
                }
            };
            let spec = |label, program, text: Vec<&str>| {
                Runner::new(
                    Fetch::Command(CommandSpec {
                        label,
                        program,
                        variants: vec![
                            vec!["--json".to_string()],
                            text.into_iter().map(str::to_string).collect(),
                        ],
                        fallback_on: NO_JSON,
                        env: vec![("SLURM_TIME_FORMAT".into(), "%s".into())],
                    }),
                    self.timeout,
                )
            };
            self.runners = Some([
                spec(
                    "squeue",
                    squeue,
                    vec!["--noheader", "--states=all", "-o", parse::SQUEUE_FORMAT],
                ),
                spec(
                    "sinfo",
                    sinfo,
                    vec!["--noheader", "--Node", "-o", parse::SINFO_FORMAT],
                ),
            ]);
        }
        self.runners
            .as_mut()
            .ok_or_else(|| SourceError::Failed("SLURM commands not set up".into()))
    }
}

impl Source for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let deadline = Instant::now() + self.wait;
        let runners = self.runners()?;
        for r in runners.iter_mut() {
            r.start();
        }
        for r in runners.iter_mut() {
            r.receive(Some(deadline));
        }
        let labels = [runners[SQUEUE].spec.label(), runners[SINFO].spec.label()];
        let mut ok: [Option<(usize, String)>; 2] = [None, None];
        let mut failures = Vec::new();
        for (i, r) in runners.iter().enumerate() {
            let label = r.spec.label();
            let hung = r.hung();
            let sample = |name: &'static str, v: f64| Sample::new(name, v).label("command", label);
            out.push(sample("vitals_slurm_command_hung", f(hung)));
            out.push(sample(
                "vitals_slurm_command_timeouts_total",
                r.timeouts_total as f64,
            ));
            let Some(last) = &r.last else { continue };
            if let Some(d) = last.duration() {
                out.push(sample(
                    "vitals_slurm_command_duration_seconds",
                    d.as_secs_f64(),
                ));
            }
            let success = last.success().filter(|_| !hung);
            out.push(sample("vitals_slurm_command_success", f(success.is_some())));
            if let (Outcome::Exited { variant, .. }, Fetch::Command(_)) = (last, &r.spec) {
                out.push(sample(
                    "vitals_slurm_command_text_fallback",
                    f(*variant > 0),
                ));
            }
            match success {
                Some((variant, text)) => ok[i] = Some((variant, text.to_string())),
                None => {
                    if let Some(why) = last.failure() {
                        failures.push((label, why));
                    }
                }
            }
        }
        for (label, why) in failures {
            if self.logged.get(label) != Some(&why) {
                tracing::warn!(command = label, error = %why, "SLURM command or slurmrestd request failed; its samples are left out");
                self.logged.insert(label, why);
            }
        }
        for (got, label) in ok.iter().zip(labels) {
            if got.is_some() {
                self.logged.remove(label);
            }
        }
        let what = |label: &str| {
            if label.starts_with("slurmrestd") {
                format!("the {label} answer")
            } else {
                format!("`{label}` output")
            }
        };

        // Both parsed before anything is reported: one that does not parse
        // fails the cycle whole.
        let jobs = match &ok[SQUEUE] {
            Some((variant, text)) => Some(
                if *variant == 0 {
                    parse::parse_squeue_json(text)
                } else {
                    parse::parse_squeue_text(text)
                }
                .map_err(|e| SourceError::Failed(format!("{}: {e}", what(labels[SQUEUE]))))?,
            ),
            None => None,
        };
        let nodes = match &ok[SINFO] {
            Some((variant, text)) => Some(
                if *variant == 0 {
                    parse::parse_sinfo_json(text)
                } else {
                    parse::parse_sinfo_text(text)
                }
                .map_err(|e| SourceError::Failed(format!("{}: {e}", what(labels[SINFO]))))?,
            ),
            None => None,
        };
        if let Some(jobs) = jobs {
            let now = unix_now();
            job_samples(&jobs, now, out);
            self.job_events(&jobs, now, out);
            if let Some(logs) = self.logs.as_mut() {
                // As long again as the commands could take, from now.
                logs.cycle(jobs, Instant::now() + self.wait, out, &mut self.events);
            }
        }
        if let Some(nodes) = nodes {
            node_samples(&nodes, out);
        }
        Ok(())
    }

    fn events(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.events)
    }
}

impl Slurm {
    /// Queues an event for each job whose state changed since the last
    /// cycle, and remembers this cycle's states. A job seen RUNNING that
    /// is COMPLETED now also gives its runtime as
    /// `vitals_slurm_job_finished_runtime_seconds{job_id, user, name}`
    /// (one sample: the history "abnormally long" compares with).
    fn job_events(&mut self, jobs: &[Job], now_s: i64, out: &mut Vec<Sample>) {
        let now: HashMap<u64, String> = jobs.iter().map(|j| (j.id, j.state.clone())).collect();
        if let Some(before) = &self.states {
            for j in jobs {
                let Some(old) = before.get(&j.id) else {
                    continue;
                };
                if *old == j.state {
                    continue;
                }
                if old == "RUNNING"
                    && j.state == "COMPLETED"
                    && let Some(start) = j.start_time
                {
                    out.push(
                        Sample::new(
                            "vitals_slurm_job_finished_runtime_seconds",
                            now_s.saturating_sub(start).max(0) as f64,
                        )
                        .label("job_id", j.id.to_string())
                        .label("user", j.user.as_str())
                        .label("name", j.name.as_str()),
                    );
                }
                let mut labels = Labels::new();
                for (k, v) in [
                    ("job_id", j.id.to_string()),
                    ("user", j.user.clone()),
                    ("name", j.name.clone()),
                    ("partition", j.partition.clone()),
                    ("old_state", old.clone()),
                    ("new_state", j.state.clone()),
                    ("reason", j.reason.clone().unwrap_or_default()),
                ] {
                    labels.insert(k.into(), v);
                }
                let reason = j
                    .reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                self.events.push(SourceEvent {
                    kind: "slurm_job_state".into(),
                    severity: if BAD_ENDS.contains(&j.state.as_str()) {
                        Severity::Warning
                    } else {
                        Severity::Info
                    },
                    message: format!(
                        "job {} ({}) of {}: {old} -> {}{reason}",
                        j.id, j.name, j.user, j.state
                    ),
                    labels,
                });
            }
        }
        self.states = Some(now);
    }
}

fn f(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// The job samples of one squeue listing, with runtimes as of `now`.
pub fn job_samples(jobs: &[Job], now: i64, out: &mut Vec<Sample>) {
    let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for j in jobs {
        let id = j.id.to_string();
        let job = |name: &'static str, v: f64| Sample::new(name, v).label("job_id", id.as_str());
        out.push(
            job("vitals_slurm_job_info", 1.0)
                .label("array_job_id", opt(j.array_job_id))
                .label("array_task_id", opt(j.array_task_id))
                .label("name", j.name.as_str())
                .label("user", j.user.as_str())
                .label("account", j.account.as_str())
                .label("partition", j.partition.as_str())
                .label("state", j.state.as_str())
                .label("reason", j.reason.as_deref().unwrap_or("")),
        );
        for s in JOB_STATES {
            out.push(job("vitals_slurm_job_state", f(j.state == *s)).label("state", *s));
        }
        out.push(job("vitals_slurm_job_gpus", j.gpus as f64).label("user", j.user.as_str()));
        for n in &j.nodes {
            out.push(job("vitals_slurm_job_node", 1.0).label("slurm_node", n.as_str()));
        }
        if let Some(t) = j.submit_time {
            out.push(job("vitals_slurm_job_submit_time_seconds", t as f64));
        }
        let started = j.state != "PENDING";
        if let Some(t) = j.start_time.filter(|_| started) {
            out.push(job("vitals_slurm_job_start_time_seconds", t as f64));
            if j.state == "RUNNING" {
                out.push(job(
                    "vitals_slurm_job_runtime_seconds",
                    now.saturating_sub(t).max(0) as f64,
                ));
            }
        }
        if let Some(l) = j.time_limit_seconds {
            out.push(job("vitals_slurm_job_time_limit_seconds", l as f64));
        }
        *counts
            .entry((j.state.as_str(), j.partition.as_str()))
            .or_default() += 1;
    }
    for ((state, partition), n) in counts {
        out.push(
            Sample::new("vitals_slurm_jobs", n as f64)
                .label("state", state)
                .label("partition", partition),
        );
    }
}

/// The node samples of one sinfo listing.
pub fn node_samples(nodes: &[Node], out: &mut Vec<Sample>) {
    for n in nodes {
        let node =
            |name: &'static str, v: f64| Sample::new(name, v).label("slurm_node", n.name.as_str());
        for s in NODE_STATES {
            out.push(
                node(
                    "vitals_slurm_node_state",
                    f(n.states.iter().any(|x| x == s)),
                )
                .label("state", *s),
            );
        }
        out.push(
            node("vitals_slurm_node_info", 1.0)
                .label("partitions", n.partitions.join(","))
                .label("reason", n.reason.as_deref().unwrap_or("")),
        );
        for (name, v) in [
            ("vitals_slurm_node_cpus", n.cpus),
            ("vitals_slurm_node_cpus_allocated", n.cpus_allocated),
            ("vitals_slurm_node_gpus", n.gpus),
        ] {
            if let Some(v) = v {
                out.push(node(name, v as f64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_lookup_says_what_is_missing() {
        let e = program(
            &Some(std::path::Path::new("/nonexistent/squeue").into()),
            "squeue",
        )
        .unwrap_err();
        assert!(e.contains("/nonexistent/squeue"), "{e}");
        assert!(program(&Some("/bin/sh".into()), "squeue").is_ok());
    }
}
