//! The peer mesh: this host's paths to the other hosts that matter (the
//! NAS, the other training servers, an endpoint host), probed actively.
//!
//! `[[sources.mesh.peers]]` lists them; without peers the source does
//! nothing. Every `interval` each peer gets a round of `count` probes
//! spread evenly over the interval (so a loss of a few percent shows in
//! one round): an ICMP echo through an unprivileged ping socket (`icmp`,
//! see [`icmp`]) and a TCP connect to `port` (when set), both under
//! `timeout`. A refused connection is an answer (the peer's kernel
//! replied: the path works), counted in `vitals_peer_tcp_refused_total`.
//! Rounds run on the source's own thread (a single-threaded runtime
//! started on the first cycle, stopped when the source is dropped); a
//! cycle only takes the last finished round, so the tick never waits for
//! a probe.
//!
//! Samples, labelled `peer` (the configured name) plus the peer's
//! `labels`: from the last finished round `vitals_peer_up` (1 if any probe
//! was answered), `vitals_peer_rtt_seconds` (ICMP, mean),
//! `vitals_peer_tcp_connect_seconds` (mean), and per `method`
//! (`icmp`, `tcp`) `vitals_peer_loss_ratio` and `vitals_peer_jitter_seconds`
//! (mean absolute difference of consecutive round trips); and the counters
//! `vitals_peer_probes_total{method}`, `vitals_peer_lost_total{method}`,
//! `vitals_peer_tcp_refused_total`.

pub mod icmp;
pub mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vitals_common::config;
use vitals_common::model::{LabelSet, Labels, Sample};

use self::stats::{MethodRound, Summary};
use super::background::{Background, every};
use super::{Source, SourceError};
use crate::config::RawConfig;

/// `[sources.mesh]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// Whether the source runs (default: yes; it does nothing without
    /// peers).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Time between rounds; each round's probes are spread over it.
    #[serde(default = "default_interval", with = "config::duration")]
    pub interval: Duration,
    /// The most one probe waits for its answer; at most `interval`.
    #[serde(default = "default_timeout", with = "config::duration")]
    pub timeout: Duration,
    /// Probes per round (each an echo and a connect, where configured).
    #[serde(default = "default_count")]
    pub count: u32,
    /// `[[sources.mesh.peers]]`.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            enabled: None,
            interval: default_interval(),
            timeout: default_timeout(),
            count: default_count(),
            peers: Vec::new(),
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_count() -> u32 {
    10
}
fn default_true() -> bool {
    true
}

/// One peer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// The `peer` label; unique.
    pub name: String,
    /// Host name or address (resolved each round; the first address).
    pub host: String,
    /// TCP port to time connects to (e.g. 22, 2049, an agent's net-test
    /// port); unset: no TCP probes.
    #[serde(default)]
    pub port: Option<u16>,
    /// Whether ICMP echo is sent (skipped where the kernel refuses ping
    /// sockets, said once in the log).
    #[serde(default = "default_true")]
    pub icmp: bool,
    /// Labels on every series of this peer (`site`, `link`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Labels the source sets itself; a peer's `labels` may not use them.
const RESERVED: &[&str] = &["node", "peer", "method"];

/// Checks `[sources.mesh]`: (key, message) of the first problem.
pub fn check(cfg: &MeshConfig) -> Result<(), (String, String)> {
    let top = |k: &str, m: &str| Err((format!("sources.mesh.{k}"), m.to_string()));
    if cfg.interval < Duration::from_millis(100) {
        return top("interval", "must be at least 100ms");
    }
    if cfg.timeout < Duration::from_millis(1) || cfg.timeout > cfg.interval {
        return top(
            "timeout",
            "must be at least 1ms and at most the interval (a probe answered later is lost anyway)",
        );
    }
    if cfg.count == 0 || cfg.count > 1000 {
        return top("count", "must be between 1 and 1000");
    }
    if cfg.interval / cfg.count < Duration::from_millis(1) {
        return top(
            "count",
            "more than one probe per millisecond: lower count or raise interval",
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, p) in cfg.peers.iter().enumerate() {
        let bad = |k: &str, m: String| Err((format!("sources.mesh.peers[{i}].{k}"), m));
        if p.name.trim().is_empty() {
            return bad("name", "must not be empty".into());
        }
        if !names.insert(p.name.as_str()) {
            return bad("name", format!("{:?} is used twice", p.name));
        }
        if p.host.trim().is_empty() || p.host.contains(['/', ' ']) {
            return bad(
                "host",
                format!("{:?} is not a host name or address", p.host),
            );
        }
        if p.port == Some(0) {
            return bad("port", "must be between 1 and 65535".into());
        }
        if !p.icmp && p.port.is_none() {
            return bad(
                "port",
                "nothing to probe: set a TCP port, or icmp = true".into(),
            );
        }
        for k in p.labels.keys() {
            if !vitals_common::model::valid_label_name(k) || RESERVED.contains(&k.as_str()) {
                return bad(
                    "labels",
                    format!(
                        "{k:?} cannot be a label here (reserved: {})",
                        RESERVED.join(", ")
                    ),
                );
            }
        }
    }
    Ok(())
}

/// What the peer's probes added up to.
#[derive(Default)]
struct Acc {
    /// The last finished round: its number, then per method.
    last: Option<(u64, Option<Summary>, Option<Summary>)>,
    icmp_probes: u64,
    icmp_lost: u64,
    tcp_probes: u64,
    tcp_lost: u64,
    tcp_refused: u64,
}

/// Shared by every peer's rounds.
struct Shared {
    interval: Duration,
    timeout: Duration,
    count: u32,
    /// The kernel refused a ping socket: ICMP is off for good (said once).
    icmp_refused: AtomicBool,
}

struct Peer {
    cfg: PeerConfig,
    labels: LabelSet,
    seq: AtomicU16,
    rounds: AtomicU64,
    acc: Mutex<Acc>,
}

/// One probe's answers: (ICMP, TCP); outer None = not sent, inner None =
/// lost; TCP also says whether it was refused.
type ProbeResult = (Option<Option<f64>>, Option<(Option<f64>, bool)>);

impl Peer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Acc> {
        match self.acc.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// One round: `count` probes spread over the interval, then the summary.
    async fn round(self: Arc<Self>, shared: Arc<Shared>) {
        let round = self.rounds.fetch_add(1, Ordering::Relaxed);
        let port = self.cfg.port.unwrap_or(0);
        let addr: Option<SocketAddr> = match tokio::time::timeout(
            shared.timeout,
            tokio::net::lookup_host((self.cfg.host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(mut addrs)) => addrs.next(),
            Ok(Err(e)) => {
                tracing::debug!(peer = %self.cfg.name, "cannot resolve {}: {e}", self.cfg.host);
                None
            }
            Err(_) => None,
        };
        let spacing = shared.interval / shared.count;
        let mut set = tokio::task::JoinSet::new();
        let start = tokio::time::Instant::now();
        for i in 0..shared.count {
            tokio::time::sleep_until(start + spacing * i).await;
            let (peer, shared) = (self.clone(), shared.clone());
            set.spawn(async move { (i, peer.probe(addr, &shared).await) });
        }
        let mut results: Vec<(u32, ProbeResult)> = Vec::with_capacity(shared.count as usize);
        while let Some(done) = set.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        results.sort_by_key(|r| r.0);
        let (mut icmp, mut tcp, mut refused) = (MethodRound::default(), MethodRound::default(), 0);
        for (_, (i, t)) in results {
            if let Some(i) = i {
                icmp.rtts.push(i);
            }
            if let Some((t, r)) = t {
                tcp.rtts.push(t);
                refused += u64::from(r);
            }
        }
        let (icmp, tcp) = (icmp.summary(), tcp.summary());
        let mut acc = self.lock();
        if let Some(s) = icmp {
            acc.icmp_probes += s.sent;
            acc.icmp_lost += s.lost;
        }
        if let Some(s) = tcp {
            acc.tcp_probes += s.sent;
            acc.tcp_lost += s.lost;
        }
        acc.tcp_refused += refused;
        if acc.last.as_ref().is_none_or(|l| l.0 < round) {
            acc.last = Some((round, icmp, tcp));
        }
    }

    /// One probe: the echo and the connect at the same time.
    async fn probe(&self, addr: Option<SocketAddr>, shared: &Shared) -> ProbeResult {
        let icmp = async {
            if !self.cfg.icmp || shared.icmp_refused.load(Ordering::Relaxed) {
                return None;
            }
            let Some(addr) = addr else {
                return Some(None);
            };
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            match icmp::echo(addr.ip(), seq, shared.timeout).await {
                Ok(rtt) => Some(rtt.map(|d| d.as_secs_f64())),
                Err(icmp::EchoError::Refused(m)) => {
                    if !shared.icmp_refused.swap(true, Ordering::Relaxed) {
                        tracing::warn!("mesh: ICMP skipped for every peer, TCP probes go on: {m}");
                    }
                    None
                }
            }
        };
        let tcp = async {
            self.cfg.port?;
            let Some(addr) = addr else {
                return Some((None, false));
            };
            let t = Instant::now();
            match tokio::time::timeout(shared.timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_stream)) => Some((Some(t.elapsed().as_secs_f64()), false)),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    Some((Some(t.elapsed().as_secs_f64()), true))
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.cfg.name, "connect to {addr}: {e}");
                    Some((None, false))
                }
                Err(_) => Some((None, false)),
            }
        };
        tokio::join!(icmp, tcp)
    }

    /// This cycle's samples; without ICMP counters once the kernel
    /// refused ping sockets (`icmp_refused`).
    fn take(&self, out: &mut Vec<Sample>, icmp_refused: bool) {
        let l = &self.labels;
        let s = |name: &'static str, v: f64| Sample::with_labels(name, l, v);
        let acc = self.lock();
        if let Some((_, icmp, tcp)) = &acc.last {
            let answered = [icmp, tcp]
                .iter()
                .any(|m| m.is_some_and(|m| m.lost < m.sent));
            if icmp.is_some() || tcp.is_some() {
                out.push(s("vitals_peer_up", f64::from(u8::from(answered))));
            }
            for (method, m, mean_name) in [
                ("icmp", icmp, "vitals_peer_rtt_seconds"),
                ("tcp", tcp, "vitals_peer_tcp_connect_seconds"),
            ] {
                let Some(m) = m else { continue };
                out.push(s("vitals_peer_loss_ratio", m.loss_ratio).label("method", method));
                if let Some(j) = m.jitter {
                    out.push(s("vitals_peer_jitter_seconds", j).label("method", method));
                }
                if let Some(mean) = m.mean {
                    out.push(s(mean_name, mean));
                }
            }
        }
        for (method, probes, lost, used) in [
            (
                "icmp",
                acc.icmp_probes,
                acc.icmp_lost,
                self.cfg.icmp && !icmp_refused,
            ),
            ("tcp", acc.tcp_probes, acc.tcp_lost, self.cfg.port.is_some()),
        ] {
            if used {
                out.push(s("vitals_peer_probes_total", probes as f64).label("method", method));
                out.push(s("vitals_peer_lost_total", lost as f64).label("method", method));
            }
        }
        if self.cfg.port.is_some() {
            out.push(s("vitals_peer_tcp_refused_total", acc.tcp_refused as f64));
        }
    }
}

pub struct Mesh {
    peers: Vec<Arc<Peer>>,
    shared: Arc<Shared>,
    /// The probing thread, once started.
    background: Option<Background>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let c = &cfg.sources.mesh;
    let peers = c
        .peers
        .iter()
        .map(|p| {
            let mut labels: Labels = p.labels.clone();
            labels.insert("peer".into(), p.name.clone());
            Arc::new(Peer {
                cfg: p.clone(),
                labels: LabelSet::new(labels),
                seq: AtomicU16::new(rand::random()),
                rounds: AtomicU64::new(0),
                acc: Mutex::new(Acc::default()),
            })
        })
        .collect();
    Box::new(Mesh {
        peers,
        shared: Arc::new(Shared {
            interval: c.interval,
            timeout: c.timeout,
            count: c.count.max(1),
            icmp_refused: AtomicBool::new(false),
        }),
        background: None,
    })
}

impl Mesh {
    /// Starts the probing thread and its runtime.
    fn start(&mut self) -> Result<(), SourceError> {
        let tasks = self.peers.iter().map(|peer| {
            let (peer, shared) = (peer.clone(), self.shared.clone());
            async move {
                // Rounds may overlap by up to `timeout`: each is a task of
                // its own (aborted with this one).
                let mut rounds = tokio::task::JoinSet::new();
                every(shared.interval, || {
                    while rounds.try_join_next().is_some() {}
                    rounds.spawn(peer.clone().round(shared.clone()));
                    async {}
                })
                .await;
            }
        });
        let rt = Background::runtime("mesh")?;
        self.background = Some(Background::start("mesh", "vitals-mesh", rt, tasks)?);
        Ok(())
    }
}

impl Source for Mesh {
    fn name(&self) -> &'static str {
        "mesh"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        if self.peers.is_empty() {
            return Err(SourceError::Unavailable(
                "no [[sources.mesh.peers]] configured".into(),
            ));
        }
        if self.background.is_none() {
            self.start()?;
        }
        let icmp_refused = self.shared.icmp_refused.load(Ordering::Relaxed);
        for p in &self.peers {
            p.take(out, icmp_refused);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(text: &str) -> Result<(), (String, String)> {
        let c: MeshConfig = toml::from_str(text).map_err(|e| ("parse".into(), e.to_string()))?;
        check(&c)
    }

    #[test]
    fn config_checks_name_the_key() {
        let peer = "[[peers]]\nname = \"nas\"\nhost = \"10.0.0.2\"\nport = 2049\n";
        assert!(mesh("").is_ok());
        assert!(mesh(peer).is_ok());
        let key = |text: &str| mesh(text).unwrap_err().0;
        assert_eq!(
            key(&format!("interval = \"10ms\"\n{peer}")),
            "sources.mesh.interval"
        );
        assert_eq!(
            key(&format!("interval = \"1s\"\ntimeout = \"2s\"\n{peer}")),
            "sources.mesh.timeout"
        );
        assert_eq!(key(&format!("count = 0\n{peer}")), "sources.mesh.count");
        assert_eq!(
            key(&format!(
                "interval = \"100ms\"\ntimeout = \"50ms\"\ncount = 500\n{peer}"
            )),
            "sources.mesh.count"
        );
        assert_eq!(
            key(&format!("{peer}[[peers]]\nname = \"nas\"\nhost = \"h\"\n")),
            "sources.mesh.peers[1].name"
        );
        assert_eq!(
            key("[[peers]]\nname = \"x\"\nhost = \"h\"\nicmp = false\n"),
            "sources.mesh.peers[0].port"
        );
        assert_eq!(
            key("[[peers]]\nname = \"x\"\nhost = \"h\"\nport = 0\n"),
            "sources.mesh.peers[0].port"
        );
        assert_eq!(
            key("[[peers]]\nname = \"x\"\nhost = \"\"\n"),
            "sources.mesh.peers[0].host"
        );
        assert_eq!(
            key("[[peers]]\nname = \"x\"\nhost = \"h\"\nlabels = { peer = \"y\" }\n"),
            "sources.mesh.peers[0].labels"
        );
        assert!(mesh("[[peers]]\nname = \"x\"\nhost = \"h\"\nbogus = 1\n").is_err());
    }

    /// A real round against a listener on loopback: every connect
    /// answered, and a closed port answers too (refused).
    #[tokio::test]
    async fn a_round_on_loopback_answers_every_connect() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accept = tokio::spawn(async move {
            loop {
                if l.accept().await.is_err() {
                    break;
                }
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let shared = Arc::new(Shared {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(200),
            count: 5,
            icmp_refused: AtomicBool::new(false),
        });
        for (p, refused) in [(port, 0), (closed, 5)] {
            let peer = Arc::new(Peer {
                cfg: toml::from_str(&format!(
                    "name = \"lo\"\nhost = \"127.0.0.1\"\nport = {p}\nicmp = false\n"
                ))
                .unwrap(),
                labels: LabelSet::new(Labels::from([("peer".into(), "lo".into())])),
                seq: AtomicU16::new(0),
                rounds: AtomicU64::new(0),
                acc: Mutex::new(Acc::default()),
            });
            peer.clone().round(shared.clone()).await;
            let mut out = Vec::new();
            peer.take(&mut out, false);
            let get = |name: &str| {
                out.iter()
                    .find(|s| s.name.as_str() == name)
                    .map(|s| s.value)
            };
            assert_eq!(get("vitals_peer_up"), Some(1.0));
            assert_eq!(get("vitals_peer_loss_ratio"), Some(0.0));
            assert_eq!(get("vitals_peer_probes_total"), Some(5.0));
            assert_eq!(
                get("vitals_peer_tcp_refused_total"),
                Some(f64::from(refused))
            );
            assert!(get("vitals_peer_tcp_connect_seconds").is_some_and(|v| v > 0.0 && v < 0.2));
            assert!(get("vitals_peer_rtt_seconds").is_none(), "no ICMP asked");
        }
        accept.abort();
    }
}
