//! A real one-node SLURM cluster (Debian's `slurmctld`, `slurmd` and
//! client, authenticated by `munge`) on 127.0.0.1, in a temporary
//! directory, for the tests of the agent's job sources.
//!
//! Optional on a developer's machine, required where CI says so
//! (`VITALS_TEST_SLURM=1`, set by `.ci/run`): see [`slurm_binaries`] and
//! [`crate::receivers::required`]. One cluster runs at a time on a machine:
//! [`Cluster::start`] takes an exclusive lock on [`LOCK`] (nextest runs
//! tests in parallel processes, and other checkouts may test too) and
//! holds it until the cluster is dropped, which cancels its jobs and
//! stops both daemons by PID. The machine's one `munged` is shared: it is
//! started (with a key made if `/etc/munge/munge.key` is missing) when
//! none runs, and left running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Proc, free_port, wait_until};

/// The lock file that keeps clusters one at a time on this machine.
pub const LOCK: &str = "/tmp/vitals-test-slurm.lock";

const MUNGE_KEY: &str = "/etc/munge/munge.key";
const MUNGE_PID: &str = "/run/munge/munged.pid";

fn find(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// The programs a cluster needs, or what is missing.
pub fn slurm_binaries() -> Result<(), String> {
    let missing: Vec<&str> = [
        "slurmctld",
        "slurmd",
        "sbatch",
        "squeue",
        "sinfo",
        "scancel",
        "scontrol",
        "munged",
    ]
    .into_iter()
    .filter(|n| find(n).is_none())
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not installed (apt-get install slurmctld slurmd slurm-client munge)",
            missing.join(", ")
        ))
    }
}

/// A running one-node cluster; stopped when dropped.
pub struct Cluster {
    pub dir: PathBuf,
    /// `slurm.conf`: pass it as `SLURM_CONF` to every SLURM command.
    pub conf: PathBuf,
    /// The one node's SLURM name.
    pub node: String,
    ctld: Proc,
    slurmd: Proc,
    _lock: nix::fcntl::Flock<File>,
}

fn munge_running() -> bool {
    Command::new("sh")
        .args(["-c", "munge -n | unmunge >/dev/null 2>&1"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the machine's `munged` if none answers.
fn ensure_munge() {
    if munge_running() {
        return;
    }
    if !Path::new(MUNGE_KEY).exists() {
        let st = Command::new("mungekey")
            .args(["--create", "--keyfile", MUNGE_KEY])
            .status()
            .unwrap();
        assert!(st.success(), "mungekey --create failed");
        let st = Command::new("chown")
            .args(["munge:munge", MUNGE_KEY])
            .status()
            .unwrap();
        assert!(st.success());
    }
    let st = Command::new("install")
        .args([
            "-d",
            "-o",
            "munge",
            "-g",
            "munge",
            "-m",
            "0755",
            "/run/munge",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "cannot make /run/munge");
    let out = Command::new("runuser")
        .args(["-u", "munge", "--", "/usr/sbin/munged"])
        .arg(format!("--pid-file={MUNGE_PID}"))
        .output()
        .unwrap();
    assert!(
        out.status.success() || munge_running(),
        "munged did not start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), munge_running),
        "munge does not answer"
    );
}

/// This machine's `NodeName=` line from `slurmd -C` (CPUs, sockets, cores,
/// threads, memory), renamed to `node` on 127.0.0.1.
fn node_line(node: &str) -> String {
    let out = Command::new("slurmd").arg("-C").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("NodeName="))
        .unwrap_or_else(|| panic!("slurmd -C printed no NodeName line: {text}"));
    let fields: Vec<&str> = line
        .split_whitespace()
        .filter(|f| !f.starts_with("NodeName="))
        .collect();
    format!(
        "NodeName={node} NodeAddr=127.0.0.1 {} State=UNKNOWN",
        fields.join(" ")
    )
}

impl Cluster {
    /// Waits for the machine's lock, then starts slurmctld and slurmd in
    /// `dir` and waits until the node is idle.
    pub fn start(dir: &Path) -> Cluster {
        std::fs::create_dir_all(dir).unwrap();
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap();
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .expect("lock the SLURM test lock");
        ensure_munge();
        let node = "localhost".to_string();
        let d = dir.display();
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=vitalstest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/filetxt
JobCompLoc={d}/jobcomp.txt
AccountingStorageType=accounting_storage/none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ReturnToService=2
MinJobAge=300
KillWait=2
{}
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
",
                node_line(&node),
                ctld_port = free_port(),
                slurmd_port = free_port(),
            ),
        )
        .unwrap();
        let ctld = Proc::spawn_group(
            Command::new("slurmctld").arg("-D").env("SLURM_CONF", &conf),
            &dir.join("slurmctld.out"),
        );
        let slurmd = Proc::spawn_group(
            Command::new("slurmd")
                .args(["-D", "-N", &node])
                .env("SLURM_CONF", &conf),
            &dir.join("slurmd.out"),
        );
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            conf,
            node,
            ctld,
            slurmd,
            _lock: lock,
        };
        let idle = wait_until(Duration::from_secs(60), || {
            c.run("sinfo", &["-h", "-o", "%T"]).trim() == "idle"
        });
        if !idle {
            let logs = c.logs();
            c.stop();
            panic!("the SLURM node did not become idle:\n{logs}");
        }
        c
    }

    /// `SLURM_CONF` for the agent and for commands.
    pub fn env(&self) -> (&'static str, &str) {
        ("SLURM_CONF", self.conf.to_str().unwrap())
    }

    /// Runs a SLURM client command (for at most 15 s: a client waits long
    /// for a controller that does not answer); its stdout (stderr too on
    /// failure).
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args(["15", program])
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .output()
            .unwrap();
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            s.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        s
    }

    /// Submits `script` with `sbatch` and extra arguments; the job id.
    pub fn sbatch(&self, script: &Path, args: &[&str]) -> u64 {
        let mut all = vec!["--parsable"];
        all.extend_from_slice(args);
        let script = script.to_str().unwrap();
        all.push(script);
        let out = self.run("sbatch", &all);
        out.trim()
            .split(';')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("sbatch: {out}\n{}", self.logs()))
    }

    /// The job's state as `squeue` says it, if it still lists the job.
    pub fn state(&self, job: u64) -> Option<String> {
        let out = self.run(
            "squeue",
            &["-h", "--states=all", "-j", &job.to_string(), "-o", "%T"],
        );
        let s = out.trim();
        (!s.is_empty() && !s.contains("error")).then(|| s.to_string())
    }

    pub fn scancel(&self, job: u64) {
        self.run("scancel", &[&job.to_string()]);
    }

    /// PIDs of a job's processes on the node (`scontrol listpids`).
    pub fn pids(&self, job: u64) -> Vec<u32> {
        self.run("scontrol", &["listpids", &job.to_string()])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    }

    /// Both daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s.push_str(&format!("--- {f}\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Cancels every job, then stops both daemons.
    fn stop(&mut self) {
        self.run("scancel", &["--partition", "debug"]);
        wait_until(Duration::from_secs(5), || {
            self.run("squeue", &["-h", "-t", "running,completing", "-o", "%i"])
                .trim()
                .is_empty()
        });
        for p in [&mut self.slurmd, &mut self.ctld] {
            if p.is_running() {
                let pid = nix::unistd::Pid::from_raw(p.child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                if !wait_until(Duration::from_secs(10), || !p.is_running()) {
                    p.kill();
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
