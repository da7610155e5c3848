//! Training logs: for each RUNNING job on this node, its stdout and
//! stderr files are followed ([`super::tail`]) and each new line matched
//! against [`super::patterns`].
//!
//! Samples per followed job, every cycle while it runs (labels `job_id`,
//! `user`, `name`): `vitals_job_step`, `vitals_job_epoch`,
//! `vitals_job_loss` (NaN and ±Inf stored as such),
//! `vitals_job_throughput` (samples, tokens or iterations per second, as
//! the log says) once the log has said them; `vitals_job_loss_nonfinite`
//! (1 while the last loss is NaN or infinite) once a loss was seen;
//! `vitals_job_log_lines_total`; and `vitals_job_log_errors_total{job_id,
//! user, class}` for every error class, from 0.
//!
//! Events: `job_log` for each error line (at most `max_events` per job and
//! cycle), labelled `job_id`, `user`, `name`, `class`, `file` and `line`
//! (the matched line, cut at 1000 bytes).
//!
//! A job that started after the source did is read from the start of its
//! files; one already running when the agent started, from their end.
//! Where squeue does not say where a job writes (its text form), the
//! paths come from `scontrol -o show job <id>` (`StdOut=`, `StdErr=`),
//! run once per job off the collection thread like squeue itself.
//!
//! The files are read on a thread of their own ([`Worker`]): a log on a
//! hung NFS mount must not hold up the cycle. A cycle waits for that
//! thread at most as long as for squeue; a read still running then is
//! reported (`vitals_job_log_read_hung 1`), later cycles do not wait for
//! it, and what it read is sent when it returns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use vitals_common::model::{Labels, Sample};
use vitals_proto::v1::Severity;

use super::parse::Job;
use super::patterns::{Patterns, Values};
use super::tail::Tail;
use crate::sources::SourceEvent;
use crate::sources::command::{CommandSpec, Runner};

/// Longest matched line kept in an event.
const MAX_EVENT_LINE: usize = 1000;

pub struct JobLogs {
    patterns: Patterns,
    /// This host's SLURM node name.
    node: String,
    max_read: usize,
    max_events: usize,
    /// Unix seconds when the source started.
    started: i64,
    jobs: HashMap<u64, Followed>,
    /// Read errors already logged, per file.
    logged: HashSet<PathBuf>,
    /// `scontrol`, for jobs whose paths squeue does not give; None: such
    /// jobs' logs are not followed.
    scontrol: Option<PathBuf>,
    timeout: std::time::Duration,
    /// `scontrol show job` runs in flight, per job.
    lookups: HashMap<u64, Runner>,
}

struct Followed {
    user: String,
    name: String,
    tails: Vec<Tail>,
    values: Values,
    lines: u64,
    errors: BTreeMap<String, u64>,
}

/// The short host name: slurmd's default node name.
pub fn short_hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Expands sbatch's filename patterns for the batch step of `job`:
/// `%%`, `%A` (array job id, else job id), `%a` (array task id), `%j`/`%J`
/// (job id), `%N` (first node), `%n`/`%t` (0), `%s` (`batch`), `%u`
/// (user), `%x` (name); a number after `%` pads with zeros.
pub fn expand(pattern: &str, job: &Job) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut width = String::new();
        while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
            width.push(*d);
            chars.next();
        }
        let Some(k) = chars.next() else {
            out.push('%');
            out.push_str(&width);
            break;
        };
        let num = |n: u64| {
            let w: usize = width.parse().unwrap_or(0);
            format!("{n:0w$}")
        };
        match k {
            '%' => out.push('%'),
            'A' => out.push_str(&num(job.array_job_id.unwrap_or(job.id))),
            'a' => out.push_str(&num(job.array_task_id.unwrap_or(0))),
            'j' | 'J' => out.push_str(&num(job.id)),
            'N' => out.push_str(job.nodes.first().map(String::as_str).unwrap_or("")),
            'n' | 't' => out.push_str(&num(0)),
            's' => out.push_str("batch"),
            'u' => out.push_str(&job.user),
            'x' => out.push_str(&job.name),
            other => {
                out.push('%');
                out.push_str(&width);
                out.push(other);
            }
        }
    }
    out
}

/// The files a job writes to: stdout, and stderr where it is another file.
pub fn log_files(job: &Job) -> Vec<PathBuf> {
    let cwd = job.cwd.as_deref().map(Path::new);
    let resolve = |p: &str| {
        let p = PathBuf::from(expand(p, job));
        match cwd {
            Some(c) if p.is_relative() => c.join(p),
            _ => p,
        }
    };
    let mut out = Vec::new();
    for p in [job.stdout.as_deref(), job.stderr.as_deref()]
        .into_iter()
        .flatten()
    {
        let p = resolve(p);
        if p.as_os_str() != "/dev/null" && !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

type Found = (Vec<Sample>, Vec<SourceEvent>);

/// [`JobLogs`] on its own thread.
pub struct Worker {
    jobs: Option<std::sync::mpsc::SyncSender<Vec<Job>>>,
    found: std::sync::mpsc::Receiver<Found>,
    /// A job list was sent and its answer has not come back.
    busy: bool,
    /// The last answer did not come back in time.
    hung: bool,
}

impl Worker {
    pub fn start(mut logs: JobLogs) -> std::io::Result<Worker> {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Vec<Job>>(1);
        let (found_tx, found_rx) = std::sync::mpsc::sync_channel::<Found>(1);
        std::thread::Builder::new()
            .name("vitals-joblog".into())
            .spawn(move || {
                while let Ok(jobs) = jobs_rx.recv() {
                    let (mut out, mut events) = (Vec::new(), Vec::new());
                    logs.update(&jobs, &mut out, &mut events);
                    if found_tx.send((out, events)).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs_tx),
            found: found_rx,
            busy: false,
            hung: false,
        })
    }

    /// Hands this cycle's jobs to the thread (unless it is still on the
    /// last ones) and appends what it found, waiting until `deadline` at
    /// most (not at all while a read is hung).
    pub fn cycle(
        &mut self,
        jobs: Vec<Job>,
        deadline: std::time::Instant,
        out: &mut Vec<Sample>,
        events: &mut Vec<SourceEvent>,
    ) {
        use std::sync::mpsc::RecvTimeoutError;
        if !self.busy {
            match self.jobs.as_ref().map(|tx| tx.try_send(jobs)) {
                Some(Ok(())) => self.busy = true,
                _ => {
                    tracing::warn!("the job log thread has stopped; job logs are not followed");
                    self.jobs = None;
                }
            }
        }
        if self.busy {
            let wait = if self.hung {
                std::time::Duration::ZERO
            } else {
                deadline.saturating_duration_since(std::time::Instant::now())
            };
            match self.found.recv_timeout(wait) {
                Ok((o, e)) => {
                    out.extend(o);
                    events.extend(e);
                    if std::mem::take(&mut self.hung) {
                        tracing::info!("job logs: the hung read returned");
                    }
                    self.busy = false;
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !self.hung {
                        tracing::warn!(
                            "job logs: a read has not returned in time (a hung NFS mount?); cycles go on without waiting for it"
                        );
                    }
                    self.hung = true;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.busy = false;
                    self.jobs = None;
                }
            }
        }
        out.push(Sample::new(
            "vitals_job_log_read_hung",
            if self.hung { 1.0 } else { 0.0 },
        ));
    }
}

/// `StdOut=`, `StdErr=` and `WorkDir=` of `scontrol -o show job` (one
/// line of `Key=Value` fields; a value runs to the next ` Key=`).
pub fn parse_scontrol_job(text: &str) -> (Option<String>, Option<String>, Option<String>) {
    let line = text.lines().next().unwrap_or("");
    let field = |key: &str| -> Option<String> {
        let start = line
            .match_indices(&format!("{key}="))
            .find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')
            .map(|(i, _)| i + key.len() + 1)?;
        let rest = &line[start..];
        // The value ends where the next ` Word=` begins.
        let end = rest
            .match_indices(' ')
            .map(|(i, _)| i)
            .find(|&i| {
                let next = &rest[i + 1..];
                let word: String = next
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == ':' || *c == '/')
                    .collect();
                !word.is_empty() && next[word.len()..].starts_with('=')
            })
            .unwrap_or(rest.len());
        let v = rest[..end].trim();
        (!v.is_empty() && v != "(null)").then(|| v.to_string())
    };
    (field("StdOut"), field("StdErr"), field("WorkDir"))
}

impl JobLogs {
    pub fn new(patterns: Patterns, node: String, max_read: usize, max_events: usize) -> JobLogs {
        JobLogs {
            patterns,
            node,
            max_read,
            max_events,
            started: super::unix_now(),
            jobs: HashMap::new(),
            logged: HashSet::new(),
            scontrol: None,
            timeout: std::time::Duration::from_secs(10),
            lookups: HashMap::new(),
        }
    }

    /// Where `scontrol` is, for jobs without paths in squeue's output.
    pub fn with_scontrol(
        mut self,
        scontrol: Option<PathBuf>,
        timeout: std::time::Duration,
    ) -> Self {
        self.scontrol = scontrol;
        self.timeout = timeout;
        self
    }

    /// The files of a job squeue gave no paths for: None until `scontrol`
    /// answered (it runs on its own thread; each cycle only looks).
    fn files_from_scontrol(&mut self, j: &Job) -> Option<Vec<PathBuf>> {
        let Some(program) = self.scontrol.clone() else {
            return Some(Vec::new());
        };
        let timeout = self.timeout;
        let r = self.lookups.entry(j.id).or_insert_with(|| {
            let mut r = Runner::new(
                CommandSpec {
                    label: "scontrol",
                    program,
                    variants: vec![vec![
                        "-o".into(),
                        "show".into(),
                        "job".into(),
                        j.id.to_string(),
                    ]],
                    fallback_on: &[],
                    env: Vec::new(),
                },
                timeout,
            );
            r.start();
            r
        });
        r.receive(None);
        let outcome = r.last.take()?;
        self.lookups.remove(&j.id);
        match outcome.success() {
            Some((_, text)) => {
                let (stdout, stderr, cwd) = parse_scontrol_job(text);
                let mut with = j.clone();
                with.stdout = stdout;
                with.stderr = stderr;
                with.cwd = cwd.or(with.cwd);
                Some(log_files(&with))
            }
            None => {
                tracing::warn!(job_id = j.id, error = %outcome.failure().unwrap_or_default(), "scontrol show job failed; this job's log is not followed");
                Some(Vec::new())
            }
        }
    }

    /// Follows the running jobs of this node in `jobs`, forgets the rest,
    /// and appends their samples and events.
    pub fn update(&mut self, jobs: &[Job], out: &mut Vec<Sample>, events: &mut Vec<SourceEvent>) {
        let running: Vec<&Job> = jobs
            .iter()
            .filter(|j| j.state == "RUNNING" && j.nodes.contains(&self.node))
            .collect();
        let ids: HashSet<u64> = running.iter().map(|j| j.id).collect();
        self.jobs.retain(|id, _| ids.contains(id));
        self.lookups.retain(|id, _| ids.contains(id));
        for j in running {
            if !self.jobs.contains_key(&j.id) {
                let files = if j.stdout.is_some() || j.stderr.is_some() {
                    log_files(j)
                } else {
                    match self.files_from_scontrol(j) {
                        Some(f) => f,
                        None => continue,
                    }
                };
                let from_start = j.start_time.is_some_and(|t| t >= self.started);
                self.jobs.insert(
                    j.id,
                    Followed {
                        user: j.user.clone(),
                        name: j.name.clone(),
                        tails: files.iter().map(|p| Tail::new(p, from_start)).collect(),
                        values: Values::default(),
                        lines: 0,
                        errors: BTreeMap::new(),
                    },
                );
            }
            let Some(f) = self.jobs.get_mut(&j.id) else {
                continue;
            };
            let mut sent = 0;
            for t in f.tails.iter_mut() {
                let polled = match t.poll(self.max_read) {
                    Ok(p) => {
                        self.logged.remove(t.path());
                        p
                    }
                    Err(e) => {
                        if self.logged.insert(t.path().to_path_buf()) {
                            tracing::warn!(job_id = j.id, file = %t.path().display(), error = %e, "cannot read a job's log");
                        }
                        continue;
                    }
                };
                for line in polled.lines {
                    f.lines += 1;
                    self.patterns.progress(&line, &mut f.values);
                    let Some(class) = self.patterns.error(&line) else {
                        continue;
                    };
                    *f.errors.entry(class.to_string()).or_default() += 1;
                    if sent >= self.max_events {
                        continue;
                    }
                    sent += 1;
                    let mut cut = line.trim_end().to_string();
                    if cut.len() > MAX_EVENT_LINE {
                        let mut end = MAX_EVENT_LINE;
                        while !cut.is_char_boundary(end) {
                            end -= 1;
                        }
                        cut.truncate(end);
                    }
                    let mut labels = Labels::new();
                    for (k, v) in [
                        ("job_id", j.id.to_string()),
                        ("user", f.user.clone()),
                        ("name", f.name.clone()),
                        ("class", class.to_string()),
                        ("file", t.path().display().to_string()),
                        ("line", cut.clone()),
                    ] {
                        labels.insert(k.into(), v);
                    }
                    events.push(SourceEvent {
                        kind: "job_log".into(),
                        severity: Severity::Warning,
                        message: format!("job {} ({}) of {}: {class}: {cut}", j.id, f.name, f.user),
                        labels,
                    });
                }
            }
            let id = j.id.to_string();
            let job = |name: &'static str, v: f64| {
                Sample::new(name, v)
                    .label("job_id", id.as_str())
                    .label("user", f.user.as_str())
                    .label("name", f.name.as_str())
            };
            for (name, v) in [
                ("vitals_job_step", f.values.step),
                ("vitals_job_epoch", f.values.epoch),
                ("vitals_job_loss", f.values.loss),
                ("vitals_job_throughput", f.values.throughput),
            ] {
                if let Some(v) = v {
                    out.push(job(name, v));
                }
            }
            if let Some(l) = f.values.loss {
                out.push(job(
                    "vitals_job_loss_nonfinite",
                    if l.is_finite() { 0.0 } else { 1.0 },
                ));
            }
            out.push(job("vitals_job_log_lines_total", f.lines as f64));
            for class in self.patterns.classes() {
                out.push(
                    Sample::new(
                        "vitals_job_log_errors_total",
                        f.errors.get(class).copied().unwrap_or(0) as f64,
                    )
                    .label("job_id", id.as_str())
                    .label("user", f.user.as_str())
                    .label("class", class),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn job(id: u64, stdout: &str) -> Job {
        Job {
            id,
            name: "train".into(),
            user: "alice".into(),
            state: "RUNNING".into(),
            nodes: vec!["gpu01".into()],
            start_time: Some(i64::MAX / 2),
            stdout: Some(stdout.into()),
            cwd: Some("/home/alice/run".into()),
            ..Default::default()
        }
    }

    #[test]
    fn scontrol_show_job_gives_the_paths() {
        let text = "JobId=12 JobName=train run UserId=root(0) GroupId=root(0) JobState=RUNNING Reason=None WorkDir=/home/a b/run StdErr=/tmp/x/err-12.log StdIn=/dev/null StdOut=/tmp/x/out 12.log Power=\n";
        assert_eq!(
            parse_scontrol_job(text),
            (
                Some("/tmp/x/out 12.log".into()),
                Some("/tmp/x/err-12.log".into()),
                Some("/home/a b/run".into())
            )
        );
        assert_eq!(parse_scontrol_job("JobId=1 StdOut=(null)\n").0, None);
    }

    #[test]
    fn sbatch_patterns_expand_like_sbatch() {
        let mut j = job(4242, "slurm-%j.out");
        j.array_job_id = Some(4240);
        j.array_task_id = Some(2);
        assert_eq!(expand("slurm-%j.out", &j), "slurm-4242.out");
        assert_eq!(expand("%x-%A_%a.%u.log", &j), "train-4240_2.alice.log");
        assert_eq!(expand("%N/%5j-%%-%s", &j), "gpu01/04242-%-batch");
        assert_eq!(expand("odd-%q-%", &j), "odd-%q-%");
        j.stderr = Some("/abs/err-%j".into());
        assert_eq!(
            log_files(&j),
            [
                PathBuf::from("/home/alice/run/slurm-4242.out"),
                PathBuf::from("/abs/err-4242")
            ]
        );
        j.stderr = Some("slurm-%j.out".into());
        assert_eq!(log_files(&j).len(), 1, "stderr into stdout");
    }

    fn value(out: &[Sample], name: &str) -> Option<f64> {
        out.iter()
            .rev()
            .find(|s| s.name.as_str() == name)
            .map(|s| s.value)
    }

    #[test]
    fn running_jobs_of_this_node_are_followed_and_errors_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("job-%j.out");
        let file = dir.path().join("job-7.out");
        let mut logs = JobLogs::new(Patterns::defaults(), "gpu01".into(), 1 << 20, 2);
        let mut jobs = vec![job(7, log.to_str().unwrap())];
        let mut other = job(8, log.to_str().unwrap());
        other.nodes = vec!["gpu02".into()];
        jobs.push(other);
        let mut f = std::fs::File::create(&file).unwrap();
        writeln!(f, "step 10 loss 0.52 samples/s 123").unwrap();
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        logs.update(&jobs, &mut out, &mut ev);
        assert_eq!(value(&out, "vitals_job_step"), Some(10.0));
        assert_eq!(value(&out, "vitals_job_loss"), Some(0.52));
        assert_eq!(value(&out, "vitals_job_throughput"), Some(123.0));
        assert_eq!(value(&out, "vitals_job_loss_nonfinite"), Some(0.0));
        assert!(ev.is_empty());
        let step = out
            .iter()
            .find(|s| s.name.as_str() == "vitals_job_step")
            .unwrap();
        assert_eq!(step.labels.get("job_id").map(String::as_str), Some("7"));
        assert_eq!(step.labels.get("user").map(String::as_str), Some("alice"));
        assert_eq!(step.labels.get("name").map(String::as_str), Some("train"));
        assert!(
            !out.iter()
                .any(|s| s.labels.get("job_id").map(String::as_str) == Some("8")),
            "job 8 runs elsewhere"
        );

        for _ in 0..3 {
            writeln!(
                f,
                "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB"
            )
            .unwrap();
        }
        writeln!(f, "step 11 loss nan").unwrap();
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        logs.update(&jobs, &mut out, &mut ev);
        assert_eq!(ev.len(), 2, "max_events per cycle");
        assert_eq!(ev[0].kind, "job_log");
        assert_eq!(ev[0].labels["class"], "gpu_oom");
        assert!(ev[0].labels["line"].starts_with("torch.OutOfMemoryError"));
        let oom = out
            .iter()
            .find(|s| {
                s.name.as_str() == "vitals_job_log_errors_total"
                    && s.labels.get("class").map(String::as_str) == Some("gpu_oom")
            })
            .unwrap();
        assert_eq!(oom.value, 3.0, "every line counted");
        assert!(value(&out, "vitals_job_loss").unwrap().is_nan());
        assert_eq!(value(&out, "vitals_job_loss_nonfinite"), Some(1.0));
        assert_eq!(value(&out, "vitals_job_step"), Some(11.0));
        assert_eq!(value(&out, "vitals_job_log_lines_total"), Some(5.0));

        // Ended: no longer followed, no more samples.
        jobs[0].state = "COMPLETED".into();
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        logs.update(&jobs, &mut out, &mut ev);
        assert!(out.is_empty());
    }

    #[test]
    fn the_worker_thread_answers_within_the_cycle() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.out");
        let j = job(3, file.to_str().unwrap());
        let mut w = Worker::start(JobLogs::new(
            Patterns::defaults(),
            "gpu01".into(),
            1 << 20,
            20,
        ))
        .unwrap();
        std::fs::write(&file, "step 5 loss 0.1\n").unwrap();
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        w.cycle(vec![j], deadline, &mut out, &mut ev);
        assert_eq!(value(&out, "vitals_job_step"), Some(5.0));
        assert_eq!(value(&out, "vitals_job_log_read_hung"), Some(0.0));
    }

    #[test]
    fn a_read_that_hangs_holds_up_one_cycle_at_most() {
        let dir = tempfile::tempdir().unwrap();
        // Opening a FIFO without a writer blocks, as a hung NFS read does.
        let fifo = dir.path().join("hung.out");
        let st = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(st.success());
        let mut w = Worker::start(JobLogs::new(
            Patterns::defaults(),
            "gpu01".into(),
            1 << 20,
            20,
        ))
        .unwrap();
        let j = job(4, fifo.to_str().unwrap());
        let wait = std::time::Duration::from_millis(300);
        let cycle = |w: &mut Worker| {
            let (mut out, mut ev) = (Vec::new(), Vec::new());
            let t = std::time::Instant::now();
            w.cycle(vec![j.clone()], t + wait, &mut out, &mut ev);
            (t.elapsed(), value(&out, "vitals_job_log_read_hung"))
        };
        let (took, hung) = cycle(&mut w);
        assert!(took >= wait && took < wait * 3, "{took:?}");
        assert_eq!(hung, Some(1.0));
        let (took, hung) = cycle(&mut w);
        assert!(took < wait, "no second wait: {took:?}");
        assert_eq!(hung, Some(1.0));
        // A writer appears: the read returns, and the next cycle says so.
        let _writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        let back = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            cycle(&mut w).1 == Some(0.0)
        });
        assert!(back, "the hung read came back");
    }

    #[test]
    fn a_job_running_before_the_agent_is_read_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("old.out");
        std::fs::write(
            &file,
            "step 99 loss 1.0\nTraceback (most recent call last):\n",
        )
        .unwrap();
        let mut j = job(9, file.to_str().unwrap());
        j.start_time = Some(1);
        let mut logs = JobLogs::new(Patterns::defaults(), "gpu01".into(), 1 << 20, 20);
        let (mut out, mut ev) = (Vec::new(), Vec::new());
        logs.update(std::slice::from_ref(&j), &mut out, &mut ev);
        assert!(ev.is_empty());
        assert_eq!(value(&out, "vitals_job_step"), None);
        assert_eq!(value(&out, "vitals_job_log_lines_total"), Some(0.0));
    }
}
