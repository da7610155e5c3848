//! Runs external programs (`zpool`/`zfs`, `squeue`/`sinfo`) off the
//! collection thread, with a timeout; any other blocking [`Task`] (the
//! slurm source's slurmrestd requests) runs the same way.
//!
//! Each command runs in its own worker thread. The source starts a run when
//! none is in flight and waits for it at most until the cycle's deadline; a
//! run that is still going is picked up by a later cycle. A run that passes
//! `command_timeout` is killed (and counted); if even the kill does not end
//! it (a process stuck in the kernel, as a hung pool makes `zpool` do), it
//! stays in flight, no new run is started, and the source reports it hung
//! every cycle instead of piling up more stuck processes.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Most bytes kept of a command's stdout or stderr.
const OUTPUT_CAP: usize = 16 << 20;

/// One command and its argument variants, newest format first: when a
/// variant exits with status 2 (usage error: an option this implementation
/// does not have), or fails with one of `fallback_on` in its stderr, the
/// next is tried, and the one that worked is kept.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Label value in the self-metrics, e.g. "zpool status".
    pub label: &'static str,
    pub program: PathBuf,
    pub variants: Vec<Vec<String>>,
    /// Stderr fragments (matched case-insensitively) that, on a non-zero
    /// exit, mean "this option is not supported here": SLURM's commands
    /// exit 1, not 2, on an unknown option.
    pub fallback_on: &'static [&'static str],
    /// Environment set for the program besides `LC_ALL=C`.
    pub env: Vec<(String, String)>,
}

/// Work a [`Runner`] runs on a worker thread of its own: a command, or a
/// request that is bounded by the timeout it is given.
pub trait Task: Clone + Send + 'static {
    /// Label value in the self-metrics, e.g. "zpool status".
    fn label(&self) -> &'static str;
    /// Runs from argument variant `first` on, within `timeout`.
    fn run(&self, first: usize, timeout: Duration) -> Outcome;
}

impl Task for CommandSpec {
    fn label(&self) -> &'static str {
        self.label
    }

    fn run(&self, first: usize, timeout: Duration) -> Outcome {
        run(self, first, timeout)
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Exited {
        /// Index into `CommandSpec::variants` of the variant that ran last.
        variant: usize,
        code: Option<i32>,
        stdout: String,
        stderr: String,
        duration: Duration,
    },
    /// Killed after `command_timeout`.
    TimedOut { duration: Duration },
    /// Could not be started (missing program, permissions).
    SpawnFailed { error: String },
    /// A task other than a command that did not get its answer (a
    /// request refused, or that could not connect), after `duration`.
    Failed { error: String, duration: Duration },
}

impl Outcome {
    /// Standard output of a run that exited 0.
    pub fn success(&self) -> Option<(usize, &str)> {
        match self {
            Outcome::Exited {
                variant,
                code: Some(0),
                stdout,
                ..
            } => Some((*variant, stdout.as_str())),
            _ => None,
        }
    }

    /// A one-line reason for a run that did not succeed.
    pub fn failure(&self) -> Option<String> {
        match self {
            Outcome::Exited { code: Some(0), .. } => None,
            Outcome::Exited { code, stderr, .. } => {
                let first = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
                Some(match code {
                    Some(c) => format!("exit status {c}: {}", first.trim()),
                    None => format!("killed by a signal: {}", first.trim()),
                })
            }
            Outcome::TimedOut { duration } => Some(format!(
                "still running after {:.1}s: killed",
                duration.as_secs_f64()
            )),
            Outcome::SpawnFailed { error } | Outcome::Failed { error, .. } => Some(error.clone()),
        }
    }

    pub fn duration(&self) -> Option<Duration> {
        match self {
            Outcome::Exited { duration, .. }
            | Outcome::TimedOut { duration }
            | Outcome::Failed { duration, .. } => Some(*duration),
            Outcome::SpawnFailed { .. } => None,
        }
    }
}

struct InFlight {
    started: Instant,
    rx: mpsc::Receiver<Outcome>,
}

/// One command's (or task's) runs across cycles.
pub struct Runner<T: Task = CommandSpec> {
    pub spec: T,
    timeout: Duration,
    /// The variant that worked last (the first to try next time).
    variant: usize,
    in_flight: Option<InFlight>,
    /// The last finished run.
    pub last: Option<Outcome>,
    /// Runs killed at the timeout since the agent started.
    pub timeouts_total: u64,
}

impl<T: Task> Runner<T> {
    pub fn new(spec: T, timeout: Duration) -> Self {
        Runner {
            spec,
            timeout,
            variant: 0,
            in_flight: None,
            last: None,
            timeouts_total: 0,
        }
    }

    /// Starts a run unless one is in flight.
    pub fn start(&mut self) {
        self.receive(None);
        if self.in_flight.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let spec = self.spec.clone();
        let (first, timeout) = (self.variant, self.timeout);
        let spawned = thread::Builder::new()
            .name(format!("vitals-{}", spec.label().replace(' ', "-")))
            .spawn(move || {
                let _ = tx.send(spec.run(first, timeout));
            });
        match spawned {
            Ok(_) => {
                self.in_flight = Some(InFlight {
                    started: Instant::now(),
                    rx,
                })
            }
            Err(e) => {
                self.last = Some(Outcome::SpawnFailed {
                    error: format!("cannot start a thread: {e}"),
                })
            }
        }
    }

    /// Takes the in-flight run's outcome if it is ready, waiting until
    /// `deadline` at most.
    pub fn receive(&mut self, deadline: Option<Instant>) {
        let Some(f) = &self.in_flight else { return };
        let got = match deadline {
            Some(d) => {
                f.rx.recv_timeout(d.saturating_duration_since(Instant::now()))
            }
            None => f.rx.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
                mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
            }),
        };
        match got {
            Ok(outcome) => {
                if let Outcome::Exited { variant, .. } = &outcome {
                    self.variant = *variant;
                }
                if matches!(outcome, Outcome::TimedOut { .. }) {
                    self.timeouts_total += 1;
                }
                self.last = Some(outcome);
                self.in_flight = None;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.last = Some(Outcome::SpawnFailed {
                    error: "the command's worker thread ended without a result".into(),
                });
                self.in_flight = None;
            }
        }
    }

    /// Seconds the in-flight run has been going, if one is.
    pub fn running_for(&self) -> Option<Duration> {
        self.in_flight.as_ref().map(|f| f.started.elapsed())
    }

    /// A run in flight for longer than the timeout: the kill did not end it.
    pub fn hung(&self) -> bool {
        self.running_for()
            .is_some_and(|d| d > self.timeout + Duration::from_secs(1))
    }
}

/// Runs the spec's variants from `first` on, falling back on usage errors.
fn run(spec: &CommandSpec, first: usize, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut variant = first.min(spec.variants.len().saturating_sub(1));
    loop {
        let args = spec.variants.get(variant).cloned().unwrap_or_default();
        let left = timeout.saturating_sub(start.elapsed());
        let outcome = run_once(spec, &args, variant, left, start);
        let usage_error = match &outcome {
            Outcome::Exited { code: Some(2), .. } => true,
            Outcome::Exited {
                code: Some(c),
                stderr,
                ..
            } if *c != 0 => {
                let stderr = stderr.to_ascii_lowercase();
                spec.fallback_on
                    .iter()
                    .any(|f| stderr.contains(&f.to_ascii_lowercase()))
            }
            _ => false,
        };
        if usage_error && variant + 1 < spec.variants.len() {
            variant += 1;
            continue;
        }
        return outcome;
    }
}

fn run_once(
    spec: &CommandSpec,
    args: &[String],
    variant: usize,
    timeout: Duration,
    start: Instant,
) -> Outcome {
    let child = Command::new(&spec.program)
        .args(args)
        .env("LC_ALL", "C")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Outcome::SpawnFailed {
                error: format!("cannot run {}: {e}", spec.program.display()),
            };
        }
    };
    let stdout = reader(child.stdout.take());
    let stderr = reader(child.stderr.take());
    let mut pause = Duration::from_millis(1);
    let code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                // If the process is stuck in the kernel this waits until it
                // leaves; the source meanwhile reports the run as hung.
                let _ = child.wait();
                return Outcome::TimedOut {
                    duration: start.elapsed(),
                };
            }
            Ok(None) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(25));
            }
            Err(e) => {
                return Outcome::SpawnFailed {
                    error: format!("waiting for {}: {e}", spec.program.display()),
                };
            }
        }
    };
    // A child of the command that keeps the pipe open must not hold us.
    let collect =
        |rx: mpsc::Receiver<String>| rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    Outcome::Exited {
        variant,
        code,
        stdout: collect(stdout),
        stderr: collect(stderr),
        duration: start.elapsed(),
    }
}

/// Reads a pipe to its end on a thread of its own, keeping at most
/// `OUTPUT_CAP` bytes (the rest is drained so the writer never blocks).
fn reader(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let Some(mut pipe) = pipe else {
        let _ = tx.send(String::new());
        return rx;
    };
    // Without a thread the closure (and `tx`) is dropped: the output reads
    // as empty and the command still runs to its end.
    let _ = thread::Builder::new()
        .name("vitals-cmd-pipe".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = OUTPUT_CAP.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&kept).into_owned());
        });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(label: &'static str, variants: &[&str]) -> CommandSpec {
        CommandSpec {
            label,
            program: "/bin/sh".into(),
            variants: variants
                .iter()
                .map(|v| vec!["-c".to_string(), v.to_string()])
                .collect(),
            fallback_on: &["unrecognized option"],
            env: vec![("VITALS_TEST".into(), "set".into())],
        }
    }

    #[test]
    fn output_of_a_quick_command() {
        let mut r = Runner::new(
            sh("echo", &["echo hello; echo oops >&2"]),
            Duration::from_secs(5),
        );
        r.start();
        r.receive(Some(Instant::now() + Duration::from_secs(5)));
        let last = r.last.as_ref().unwrap();
        assert_eq!(last.success(), Some((0, "hello\n")));
        assert!(r.running_for().is_none());
    }

    #[test]
    fn usage_error_falls_back_to_the_next_variant_and_sticks() {
        let mut r = Runner::new(
            sh("fallback", &["exit 2", "echo legacy"]),
            Duration::from_secs(5),
        );
        r.start();
        r.receive(Some(Instant::now() + Duration::from_secs(5)));
        assert_eq!(r.last.as_ref().unwrap().success(), Some((1, "legacy\n")));
        assert_eq!(r.variant, 1);
        let mut r = Runner::new(
            sh("fails", &["echo no >&2; exit 1", "echo never"]),
            Duration::from_secs(5),
        );
        r.start();
        r.receive(Some(Instant::now() + Duration::from_secs(5)));
        let failure = r.last.as_ref().unwrap().failure().unwrap();
        assert_eq!(failure, "exit status 1: no");
        // Exit 1 with a known complaint also falls back; the env is passed.
        let mut r = Runner::new(
            sh(
                "stderr",
                &[
                    "echo \"squeue: Unrecognized option '--json'\" >&2; exit 1",
                    "echo $VITALS_TEST",
                ],
            ),
            Duration::from_secs(5),
        );
        r.start();
        r.receive(Some(Instant::now() + Duration::from_secs(5)));
        assert_eq!(r.last.as_ref().unwrap().success(), Some((1, "set\n")));
    }

    #[test]
    fn a_slow_command_does_not_block_and_is_killed_at_the_timeout() {
        let mut r = Runner::new(sh("slow", &["sleep 30"]), Duration::from_millis(300));
        let t = Instant::now();
        r.start();
        r.receive(Some(Instant::now() + Duration::from_millis(50)));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(r.last.is_none(), "nothing finished yet");
        assert!(r.running_for().is_some());
        r.start(); // still in flight: no second process
        r.receive(Some(Instant::now() + Duration::from_secs(5)));
        assert!(
            matches!(r.last, Some(Outcome::TimedOut { .. })),
            "{:?}",
            r.last
        );
        assert_eq!(r.timeouts_total, 1);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_program_is_reported() {
        let mut r = Runner::new(
            CommandSpec {
                label: "missing",
                program: "/nonexistent/zpool".into(),
                variants: vec![vec![]],
                fallback_on: &[],
                env: Vec::new(),
            },
            Duration::from_secs(1),
        );
        r.start();
        r.receive(Some(Instant::now() + Duration::from_secs(2)));
        assert!(
            r.last
                .as_ref()
                .unwrap()
                .failure()
                .unwrap()
                .contains("/nonexistent/zpool")
        );
    }
}
