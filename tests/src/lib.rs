//! Harness for end-to-end tests: starts the real `vitals`, `vitals-agent`
//! and `vitals-collector` binaries on 127.0.0.1 with certificates made by
//! `vitals certs`, and reads what they stored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod model;
pub mod netns;
pub mod prometheus;
pub mod receivers;
pub mod slurm;

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use rusqlite::{Connection, OpenFlags};
use vitals_proto::v1::query_client::QueryClient;
use vitals_proto::v1::{Batch, MatchOp, Matcher, QueryRangeRequest, Series};

/// Path of a workspace binary, next to the test executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run the tests with `cargo nextest run --workspace` (or cargo test --workspace)",
        p.display()
    );
    p
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
/// The built-in rules whose names start with `prefix`, as shipped but with
/// `for` set to `for_` (so a test sees them fire in seconds), as a rules
/// file. Panics unless exactly `count` rules match, so a rule added to or
/// dropped from the pack is noticed by the tests that cover its family.
pub fn builtin_rules(prefix: &str, count: usize, for_: &str) -> String {
    let pack: toml::Table =
        toml::from_str(include_str!("../../collector/src/alert/builtin.toml")).unwrap();
    let rules: Vec<toml::Value> = pack["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"].as_str().unwrap().starts_with(prefix))
        .map(|r| {
            let mut r = r.as_table().unwrap().clone();
            r.insert("for".into(), for_.into());
            toml::Value::Table(r)
        })
        .collect();
    assert_eq!(rules.len(), count, "the pack's {prefix}* rules");
    let mut t = toml::Table::new();
    t.insert("rules".into(), toml::Value::Array(rules));
    toml::to_string(&t).unwrap()
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A temporary deployment: a CA, a collector certificate, an operator certificate.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let env = Env {
            dir: tempfile::tempdir().unwrap(),
        };
        env.vitals_ok(&["certs", "init", "--dir", env.certs().to_str().unwrap()]);
        env.issue(
            "collector",
            "collector",
            &["--dns", "localhost", "--ip", "127.0.0.1"],
        );
        env.issue("operator", "operator", &[]);
        env
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn certs(&self) -> PathBuf {
        self.path().join("certs")
    }

    pub fn vitals(&self, args: &[&str]) -> Output {
        Command::new(bin("vitals")).args(args).output().unwrap()
    }

    pub fn vitals_ok(&self, args: &[&str]) -> String {
        let out = self.vitals(args);
        assert!(
            out.status.success(),
            "vitals {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Issues `NAME.pem`/`NAME.key` in the env's CA directory.
    pub fn issue(&self, name: &str, role: &str, extra: &[&str]) {
        let certs = self.certs();
        let mut args = vec![
            "certs",
            "issue",
            "--dir",
            certs.to_str().unwrap(),
            "--name",
            name,
            "--role",
            role,
        ];
        args.extend_from_slice(extra);
        self.vitals_ok(&args);
    }

    /// Issues the collector's certificate again, valid also for `ips`
    /// (addresses agents in other network namespaces dial).
    pub fn reissue_collector(&self, ips: &[&str]) {
        let mut args = vec!["--dns", "localhost", "--ip", "127.0.0.1"];
        for ip in ips {
            args.extend(["--ip", ip]);
        }
        for ext in ["pem", "key"] {
            let _ = std::fs::remove_file(self.certs().join(format!("collector.{ext}")));
        }
        self.issue("collector", "collector", &args);
    }

    pub fn cert(&self, name: &str) -> (PathBuf, PathBuf) {
        (
            self.certs().join(format!("{name}.pem")),
            self.certs().join(format!("{name}.key")),
        )
    }

    pub fn ca(&self) -> PathBuf {
        self.certs().join("ca.pem")
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("collector/vitals.db")
    }

    /// Writes cli.toml for the operator certificate.
    pub fn cli_config(&self, port: u16) -> PathBuf {
        let (cert, key) = self.cert("operator");
        let p = self.path().join("cli.toml");
        std::fs::write(
            &p,
            format!(
                "collector = \"https://127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                self.ca(),
                cert,
                key
            ),
        )
        .unwrap();
        p
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// A running child process with its log file; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    /// Leads its own process group, killed whole (servers that fork workers).
    group: bool,
}

impl Proc {
    /// [`spawn_cmd`](Self::spawn_cmd) in a new process group, so that
    /// `kill` (and drop) also ends the children it forked.
    pub fn spawn_group(cmd: &mut Command, log: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        let mut p = Proc::spawn_cmd(cmd.process_group(0), log);
        p.group = true;
        p
    }

    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn_cmd(cmd: &mut Command, log: &Path) -> Proc {
        let file = File::options().create(true).append(true).open(log).unwrap();
        let child = cmd
            .env("VITALS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
            group: false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if self.group {
            let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit.
    pub fn term(&mut self, timeout: Duration) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                self.kill();
                panic!(
                    "process did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGHUP: the daemons re-read their config and certificates.
    pub fn hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}

/// Starts a collector on `port` with the env's certificates and database.
pub fn start_collector(env: &Env, port: u16) -> Proc {
    start_collector_full(env, port, "", &[])
}

/// [`start_collector`] with `extra` TOML appended to its config (e.g. an
/// `[alerting]` table); the config is `env/collector/collector.toml`.
pub fn start_collector_with(env: &Env, port: u16, extra: &str) -> Proc {
    start_collector_full(env, port, extra, &[])
}

/// `start_collector` with extra environment variables.
pub fn start_collector_with_env(env: &Env, port: u16, vars: &[(&str, &str)]) -> Proc {
    start_collector_full(env, port, "", vars)
}

/// `start_collector` with extra TOML and environment variables.
pub fn start_collector_full(env: &Env, port: u16, extra: &str, vars: &[(&str, &str)]) -> Proc {
    start_collector_at(env, "127.0.0.1", port, extra, vars)
}

/// `start_collector_full` listening on `host:port` (e.g. `0.0.0.0` for
/// agents in other network namespaces; see [`Env::reissue_collector`]).
/// It is waited for on 127.0.0.1, so `host` must include loopback.
pub fn start_collector_at(
    env: &Env,
    host: &str,
    port: u16,
    extra: &str,
    vars: &[(&str, &str)],
) -> Proc {
    let dir = env.path().join("collector");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = env.cert("collector");
    let cfg = dir.join("collector.toml");
    // `extra` may bring its own `[storage]` (a store elsewhere).
    let storage = if extra.contains("[storage]") {
        String::new()
    } else {
        format!("[storage]\npath = {:?}\n", env.db())
    };
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{host}:{port}\"\nshutdown_grace = \"5s\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{storage}{extra}",
            env.ca(),
            cert,
            key,
        ),
    )
    .unwrap();
    let p = Proc::spawn_cmd(
        Command::new(bin("vitals-collector"))
            .args(["--config", cfg.to_str().unwrap()])
            .envs(vars.iter().copied()),
        &dir.join("collector.log"),
    );
    let up = wait_until(Duration::from_secs(20), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(
        up,
        "collector did not listen on {port}; log:\n{}",
        p.log_text()
    );
    p
}

/// How to start one agent.
pub struct AgentOpts<'a> {
    /// Certificate (and key) file stem to use; CA defaults to the env's.
    pub cert: (PathBuf, PathBuf),
    pub ca: Option<PathBuf>,
    pub node: Option<&'a str>,
    pub interval: &'a str,
    pub spool_max_bytes: u64,
}

pub struct Agent {
    pub proc: Proc,
    pub spool: PathBuf,
    pub config: PathBuf,
}

/// Writes an agent config under `env/agents/NAME/` and starts the agent.
pub fn start_agent(env: &Env, name: &str, port: u16, opts: &AgentOpts<'_>) -> Agent {
    restart_agent(&agent_config(env, name, port, opts, ""))
}

/// Writes an agent config under `env/agents/NAME/`: only the host source
/// runs, plus whatever `extra` (TOML appended at the end) turns on.
pub fn agent_config(
    env: &Env,
    name: &str,
    port: u16,
    opts: &AgentOpts<'_>,
    extra: &str,
) -> PathBuf {
    let dir = env.path().join("agents").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.toml");
    // These tests are about delivery, and size their spools for small
    // batches: only the host source runs, whatever this machine has (a
    // SLURM client without a cluster, say), unless `extra` has the table.
    let only_host = format!(
        "[sources.net]\nenabled = false\n[sources.nfs]\nenabled = false\n[sources.nfsd]\nenabled = false\n[sources.zfs]\nenabled = false\n{}{}{}{extra}",
        if extra.contains("[sources.gpu]") {
            ""
        } else {
            "[sources.gpu]\nenabled = false\n"
        },
        if extra.contains("[sources.slurm]") {
            ""
        } else {
            "[sources.slurm]\nenabled = false\n"
        },
        // The machine's own kernel log would add events of its own.
        if extra.contains("[sources.kmsg]") {
            ""
        } else {
            "[sources.kmsg]\nenabled = false\n"
        }
    );
    let node = opts
        .node
        .map(|n| format!("node = {n:?}\n"))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "collector = \"https://127.0.0.1:{port}\"\n{node}interval = {:?}\nshutdown_grace = \"10s\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[spool]\ndir = {:?}\nmax_bytes = {}\n{only_host}",
            opts.interval,
            opts.ca.clone().unwrap_or_else(|| env.ca()),
            opts.cert.0,
            opts.cert.1,
            dir.join("spool"),
            opts.spool_max_bytes
        ),
    )
    .unwrap();
    cfg
}

/// Starts an agent from an existing config (same spool).
pub fn restart_agent(cfg: &Path) -> Agent {
    restart_agent_env(cfg, &[])
}

/// Starts an agent from an existing config with extra environment variables.
pub fn restart_agent_env(cfg: &Path, vars: &[(&str, &str)]) -> Agent {
    let dir = cfg.parent().unwrap();
    let mut cmd = Command::new(bin("vitals-agent"));
    cmd.args(["--config", cfg.to_str().unwrap()]);
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let proc = Proc::spawn_cmd(&mut cmd, &dir.join("agent.log"));
    Agent {
        proc,
        spool: dir.join("spool"),
        config: cfg.to_path_buf(),
    }
}

/// Starts an agent from an existing config inside network namespace `ns`
/// (`ip netns exec`); point its `collector` at an address reachable from
/// there with [`set_collector`].
pub fn restart_agent_in(cfg: &Path, ns: &netns::Ns) -> Agent {
    let dir = cfg.parent().unwrap();
    let mut cmd = Command::new(bin("vitals-agent"));
    cmd.args(["--config", cfg.to_str().unwrap()]);
    let proc = Proc::spawn_cmd(&mut ns.command(&cmd), &dir.join("agent.log"));
    Agent {
        proc,
        spool: dir.join("spool"),
        config: cfg.to_path_buf(),
    }
}

/// Rewrites an agent config's `collector = "https://…"` to `url`.
pub fn set_collector(cfg: &Path, url: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let out: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("collector = ") {
                format!("collector = {url:?}")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(cfg, out.join("\n") + "\n").unwrap();
}

/// The batches in an agent's spool (read-only), oldest first.
pub fn spool_batches(spool_dir: &Path) -> Vec<(u64, Batch)> {
    let path = spool_dir.join("spool.db");
    if !path.exists() {
        return Vec::new();
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    // The agent may be creating the file right now: no table yet is empty.
    let Ok(mut stmt) = conn.prepare("SELECT seq, data FROM batches ORDER BY seq") else {
        return Vec::new();
    };
    stmt.query_map([], |r| {
        let seq: i64 = r.get(0)?;
        let data: Vec<u8> = r.get(1)?;
        Ok((
            seq as u64,
            Batch::decode(data.as_slice()).expect("spooled batch decodes"),
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Series the collector derives from what it stores (anomaly scores,
/// alarms) and its open alerts (`ALERTS`).
pub const DERIVED: &str = "vitals_anomaly_.*|ALERTS";

/// Reads what the collector stored through its query API (operator certificate).
pub struct Reader {
    rt: tokio::runtime::Runtime,
    client: QueryClient<tonic::transport::Channel>,
}

impl Reader {
    pub fn new(env: &Env, port: u16) -> Reader {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (cert, key) = env.cert("operator");
        let ch = rt
            .block_on(channel(port, &env.ca(), Some((&cert, &key))))
            .expect("operator connects to the collector");
        Reader {
            rt,
            client: QueryClient::new(ch).max_decoding_message_size(256 << 20),
        }
    }

    /// Every stored series matching `metric` (may be empty) and `matchers`.
    pub fn series(&self, metric: &str, matchers: &[(&str, MatchOp, &str)]) -> Vec<Series> {
        let req = QueryRangeRequest {
            metric: metric.into(),
            matchers: matchers
                .iter()
                .map(|(n, op, v)| Matcher {
                    name: n.to_string(),
                    op: *op as i32,
                    value: v.to_string(),
                })
                .collect(),
            start_ms: 0,
            end_ms: i64::MAX,
            ..Default::default()
        };
        let mut c = self.client.clone();
        self.rt
            .block_on(c.query_range(req))
            .expect("query_range")
            .into_inner()
            .series
    }

    /// Every series of one node, as sent (not the collector's derived
    /// `vitals_anomaly_*` series).
    pub fn node_series(&self, node: &str) -> Vec<Series> {
        self.series(
            "",
            &[
                ("node", MatchOp::Equal, node),
                ("__name__", MatchOp::NotRegex, DERIVED),
            ],
        )
    }

    /// Everything stored as sent, all nodes.
    pub fn all(&self) -> Vec<Series> {
        self.series("", &[("__name__", MatchOp::NotRegex, DERIVED)])
    }

    /// Everything stored, the collector's derived series too.
    pub fn everything(&self) -> Vec<Series> {
        self.series("", &[("__name__", MatchOp::Regex, ".+")])
    }

    /// (timestamp, value) of every stored sample of `metric` for `node`.
    pub fn samples(&self, metric: &str, node: &str) -> Vec<(i64, f64)> {
        self.series(metric, &[("node", MatchOp::Equal, node)])
            .into_iter()
            .flat_map(|s| s.points.into_iter().map(|p| (p.timestamp_ms, p.value)))
            .collect()
    }

    /// How many samples `node` has at timestamp `ts`, all series together.
    pub fn samples_at(series: &[Series], ts: i64) -> usize {
        series
            .iter()
            .map(|s| s.points.iter().filter(|p| p.timestamp_ms == ts).count())
            .sum()
    }

    /// (series, timestamp) pairs that appear more than once.
    pub fn duplicates(series: &[Series]) -> usize {
        series
            .iter()
            .map(|s| {
                s.points
                    .windows(2)
                    .filter(|w| w[0].timestamp_ms >= w[1].timestamp_ms)
                    .count()
            })
            .sum()
    }

    pub fn nodes(&self) -> Vec<vitals_proto::v1::NodeInfo> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.list_nodes(vitals_proto::v1::ListNodesRequest {}))
            .expect("list_nodes")
            .into_inner()
            .nodes
    }
}

/// Replaces `dst` with a copy of `src` the way an operator rotating a file
/// should: write beside it, then rename over it.
pub fn replace_file(src: &Path, dst: &Path) {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// The serial number of the first certificate in a PEM file.
pub fn cert_serial(pem: &Path) -> String {
    let der = vitals_common::identity::first_pem_cert(&std::fs::read(pem).unwrap()).unwrap();
    vitals_common::identity::cert_info(&der).unwrap().serial
}

/// Labels of a query result as a map.
pub fn labels(s: &Series) -> std::collections::BTreeMap<String, String> {
    s.labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect()
}

/// Events stored by the collector (read straight from its database).
pub fn stored_events(db: &Path, sql_where: &str) -> i64 {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        &format!("SELECT count(*) FROM events WHERE {sql_where}"),
        [],
        |r| r.get(0),
    )
    .unwrap()
}

/// The `cycles=N` figure from an agent's "agent stopped" log line.
pub fn stopped_cycles(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("agent stopped"))?;
    let rest = line.split("cycles=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A tonic client channel presenting the given certificate (or none).
pub async fn channel(
    port: u16,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    channel_as(port, ca, cert, "localhost").await
}

/// `channel`, expecting the collector's certificate to name `server_name`.
pub async fn channel_as(
    port: u16,
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    server_name: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name(server_name);
    if let Some((c, k)) = cert {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Sends `batches` as agent `node` (its certificate `node.pem`, which the
/// env must have issued) on one ingest stream, instance `instance`, and
/// waits until the last one is acked. Returns the error status if the
/// collector refused the stream.
pub fn ingest(
    env: &Env,
    port: u16,
    node: &str,
    instance: &str,
    batches: Vec<Batch>,
) -> Result<u64, tonic::Status> {
    use tokio_stream::StreamExt;
    use vitals_proto::v1::ingest_client::IngestClient;
    use vitals_proto::v1::{AgentMessage, Hello, agent_message, collector_message};
    let (cert, key) = env.cert(node);
    let last = batches.last().map(|b| b.seq).unwrap_or(0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let ch = channel(port, &env.ca(), Some((&cert, &key))).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(batches.len() + 1);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node: node.into(),
                agent_version: "test-1".into(),
                instance_id: instance.into(),
            })),
        })
        .await
        .unwrap();
        for b in batches {
            tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Batch(b)),
            })
            .await
            .unwrap();
        }
        let mut resp = IngestClient::new(ch)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), resp.next()).await {
                Ok(Some(Ok(m))) => {
                    if let Some(collector_message::Msg::Ack(a)) = m.msg
                        && a.seq >= last
                    {
                        drop(tx);
                        return Ok(a.seq);
                    }
                }
                Ok(Some(Err(status))) => return Err(status),
                Ok(None) => return Err(tonic::Status::aborted("stream ended before the ack")),
                Err(_) => return Err(tonic::Status::deadline_exceeded("no ack within 20 s")),
            }
        }
    })
}

/// Stored (timestamp, value) of `vitals_agent_cycles_total` for `node`.
pub fn cycles(reader: &Reader, node: &str) -> Vec<(i64, u64)> {
    reader
        .samples("vitals_agent_cycles_total", node)
        .into_iter()
        .map(|(ts, v)| (ts, v as u64))
        .collect()
}

/// Every cycle the agent ran is stored exactly once and complete: cycle
/// numbers 1..=N without gap or repeat, and at each cycle's timestamp exactly
/// as many samples as the cycle reported carrying. The store drops a sample
/// that is not newer than its series' newest, so a backlog delivered out of
/// order would show up here as a gap.
pub fn assert_complete_run(reader: &Reader, node: &str, expected_cycles: u64) {
    let all = reader.node_series(node);
    let points = |name: &str| -> Vec<(i64, f64)> {
        all.iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.points.iter().map(|p| (p.timestamp_ms, p.value)))
            .collect()
    };
    let cycles: Vec<(i64, f64)> = points("vitals_agent_cycles_total");
    let values: Vec<u64> = cycles.iter().map(|c| c.1 as u64).collect();
    let want: Vec<u64> = (1..=expected_cycles).collect();
    assert_eq!(values, want, "node {node}: stored cycle numbers");
    let sizes: std::collections::HashMap<i64, f64> =
        points("vitals_agent_cycle_samples").into_iter().collect();
    for (ts, n) in &cycles {
        let want = sizes.get(ts).copied().unwrap_or(-1.0) as usize;
        assert_eq!(
            Reader::samples_at(&all, *ts),
            want,
            "node {node}: samples stored for cycle {n} at {ts}"
        );
    }
    assert_eq!(
        Reader::duplicates(&all),
        0,
        "a (series, timestamp) pair is stored twice"
    );
}

/// SIGTERM; asserts a clean exit with an empty spool; returns the cycles it
/// logged having run.
pub fn stop_agent(agent: &mut Agent) -> u64 {
    let st = agent.proc.term(Duration::from_secs(20));
    assert!(
        st.success(),
        "agent exit {st:?}; log:\n{}",
        agent.proc.log_text()
    );
    assert!(
        spool_batches(&agent.spool).is_empty(),
        "agent spool not empty after a clean stop"
    );
    let log = agent.proc.log_text();
    stopped_cycles(&log).unwrap_or_else(|| panic!("agent did not log its cycle count:\n{log}"))
}
