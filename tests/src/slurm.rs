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
//!
//! [`Cluster::restd_unix`] and [`Cluster::restd_jwt`] run Debian's
//! `slurmrestd` against the cluster (optional like the cluster, required
//! where `VITALS_TEST_SLURMRESTD=1`: see [`slurmrestd_binary`]). It refuses
//! to run as root, so it runs as the `slurm` user the package made, from a
//! folder of its own that user can reach (the cluster's is the test's
//! private temporary folder): a copy of `slurm.conf`, the unix socket, its
//! log. Only the `openapi/v0.0.38` plugin is loaded (the `dbv0.0.38` one
//! needs a slurmdbd). For TCP the cluster must be started with
//! [`Cluster::start_jwt`]: `AuthAltTypes=auth/jwt` and a key, so that
//! `scontrol token` issues tokens slurmctld accepts.

use std::fs::File;
use std::io::{Read, Write};
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

/// `slurmrestd`, or what is missing.
pub fn slurmrestd_binary() -> Result<PathBuf, String> {
    find("slurmrestd").ok_or_else(|| "slurmrestd not installed (apt-get install slurmrestd)".into())
}

/// The JWT plugin `Cluster::start_jwt` needs, or what is missing.
pub fn jwt_plugin() -> Result<(), String> {
    let found = [
        "/usr/lib/x86_64-linux-gnu/slurm-wlm",
        "/usr/lib/aarch64-linux-gnu/slurm-wlm",
        "/usr/lib/slurm-wlm",
        "/usr/lib64/slurm",
    ]
    .iter()
    .any(|d| Path::new(d).join("auth_jwt.so").is_file());
    if found {
        Ok(())
    } else {
        Err(
            "SLURM's auth/jwt plugin is not installed (apt-get install slurm-wlm-jwt-plugin)"
                .into(),
        )
    }
}

/// A running slurmrestd; stopped when dropped (before its folder goes).
pub struct Restd {
    proc: Proc,
    /// What the agent's `restd` key takes: `unix:/...` or `http://...`.
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Restd {
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// One GET (HTTP/1.0, read to the end): (status, body).
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
        let mut req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut answer = String::new();
        if let Some(sock) = self.url.strip_prefix("unix:") {
            let mut s = std::os::unix::net::UnixStream::connect(sock)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            s.read_to_string(&mut answer)?;
        } else {
            let hostport = self.url.trim_start_matches("http://");
            let mut s = std::net::TcpStream::connect(hostport)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(req.as_bytes())?;
            s.read_to_string(&mut answer)?;
        }
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no status in {answer:?}")))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }
}

/// (uid, gid) of a user, from `id`.
fn ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("no user {user:?} (the slurm packages make it)"))
    };
    (id("-u"), id("-g"))
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
        Cluster::start_with(dir, false)
    }

    /// [`start`](Self::start) with `auth/jwt` as an alternative
    /// authentication (a key in `dir`): `scontrol token` works, and
    /// slurmrestd can pass tokens through ([`restd_jwt`](Self::restd_jwt)).
    pub fn start_jwt(dir: &Path) -> Cluster {
        Cluster::start_with(dir, true)
    }

    fn start_with(dir: &Path, jwt: bool) -> Cluster {
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
        let mut auth_alt = String::new();
        if jwt {
            use std::os::unix::fs::OpenOptionsExt;
            let key = dir.join("jwt.key");
            let mut f = File::options()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&key)
                .unwrap();
            let mut bytes = [0u8; 32];
            File::open("/dev/urandom")
                .unwrap()
                .read_exact(&mut bytes)
                .unwrap();
            f.write_all(&bytes).unwrap();
            auth_alt = format!(
                "AuthAltTypes=auth/jwt\nAuthAltParameters=jwt_key={}\n",
                key.display()
            );
        }
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
{auth_alt}CredType=cred/munge
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

    /// Starts slurmrestd (`rest_auth/local`) on a unix socket in a folder
    /// of its own; returns once it answers.
    pub fn restd_unix(&self) -> Restd {
        let dir = self.restd_dir();
        let sock = dir.path().join("slurmrestd.socket");
        self.restd(
            dir,
            &format!("unix:{}", sock.display()),
            "rest_auth/local",
            &[],
        )
    }

    /// Starts slurmrestd (`rest_auth/jwt`) on a free port of 127.0.0.1;
    /// the cluster must have been started with
    /// [`start_jwt`](Self::start_jwt).
    pub fn restd_jwt(&self) -> Restd {
        let dir = self.restd_dir();
        let url = format!("127.0.0.1:{}", free_port());
        self.restd(dir, &url, "rest_auth/jwt", &[("SLURM_JWT", "daemon")])
    }

    /// `scontrol token` for `user`, as printed (`SLURM_JWT=...`).
    pub fn token(&self, user: &str) -> String {
        let out = self.run(
            "scontrol",
            &["token", &format!("username={user}"), "lifespan=3600"],
        );
        assert!(out.starts_with("SLURM_JWT="), "scontrol token: {out}");
        out
    }

    /// A folder the `slurm` user owns, with a copy of `slurm.conf`.
    fn restd_dir(&self) -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("vitals-restd-")
            .tempdir()
            .unwrap();
        let (uid, gid) = ids("slurm");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let conf = dir.path().join("slurm.conf");
        std::fs::copy(&self.conf, &conf).unwrap();
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
        dir
    }

    fn restd(
        &self,
        dir: tempfile::TempDir,
        listen: &str,
        auth: &str,
        env: &[(&str, &str)],
    ) -> Restd {
        use std::os::unix::process::CommandExt;
        let (uid, gid) = ids("slurm");
        let program = slurmrestd_binary().unwrap();
        let mut cmd = Command::new(program);
        cmd.args(["-s", "openapi/v0.0.38", "-a", auth, listen])
            .env("SLURM_CONF", dir.path().join("slurm.conf"))
            .envs(env.iter().copied())
            .uid(uid)
            .gid(gid);
        let proc = Proc::spawn_group(&mut cmd, &dir.path().join("slurmrestd.log"));
        let url = if listen.starts_with("unix:") {
            listen.to_string()
        } else {
            format!("http://{listen}")
        };
        let mut r = Restd { proc, url, dir };
        // Any HTTP answer means it listens (401 without a token on TCP).
        let up = wait_until(Duration::from_secs(30), || {
            r.get("/slurm/v0.0.38/diag", &[]).is_ok()
        });
        if !up || !r.proc.is_running() {
            panic!("slurmrestd did not start:\n{}", r.log_text());
        }
        r
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
