//! Chaos: a real agent in its own network namespace streams to a real
//! collector in the root namespace over a veth pair, and the link, the
//! collector's disk or the collector itself fail while it does. Each test
//! then checks the agent's whole run: every cycle stored exactly once, no
//! gap, no duplicate (`assert_complete_run`), the spool empty.
//!
//! Needs root, iproute2 and nftables (`VITALS_TEST_NETNS=1` in CI makes a
//! missing one a failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vitals_e2e::netns::{Ns, Veth};
use vitals_e2e::*;

/// A collector on 0.0.0.0 and an agent in a namespace joined to the root
/// namespace by a veth pair, dialing the collector's address on it.
struct Lab {
    env: Env,
    port: u16,
    ns: Ns,
    veth: Veth,
    collector: Proc,
    agent: Agent,
    /// Extra collector config (a store elsewhere), kept for restarts.
    collector_extra: String,
}

impl Lab {
    fn new(tag: &str, collector_extra: &str) -> Lab {
        let env = Env::new();
        let ns = Ns::new(tag);
        let veth = Veth::new(None, Some(&ns));
        env.reissue_collector(&[&veth.a.ip]);
        env.issue("edge", "agent", &[]);
        let port = free_port();
        let collector = start_collector_at(&env, "0.0.0.0", port, collector_extra, &[]);
        let opts = AgentOpts {
            cert: env.cert("edge"),
            ca: None,
            node: None,
            interval: "200ms",
            spool_max_bytes: 256 << 20,
        };
        let cfg = agent_config(&env, "edge", port, &opts, "");
        set_collector(&cfg, &format!("https://{}:{port}", veth.a.ip));
        let agent = restart_agent_in(&cfg, &ns);
        let lab = Lab {
            env,
            port,
            ns,
            veth,
            collector,
            agent,
            collector_extra: collector_extra.to_string(),
        };
        lab.wait_stored(
            10,
            Duration::from_secs(30),
            "the agent did not start storing",
        );
        lab
    }

    fn reader(&self) -> Reader {
        Reader::new(&self.env, self.port)
    }

    /// Cycles stored so far (0 when the collector cannot answer).
    fn stored(&self) -> usize {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cycles(&self.reader(), "edge").len()
        }))
        .unwrap_or(0)
    }

    fn wait_stored(&self, n: usize, within: Duration, what: &str) {
        assert!(
            wait_until(within, || self.stored() >= n),
            "{what}: {} cycles stored; agent log:\n{}\ncollector log:\n{}",
            self.stored(),
            self.agent.proc.log_text(),
            self.collector.log_text()
        );
    }

    /// Lines of the agent's log saying it cannot ship.
    fn unreachable_lines(&self) -> usize {
        self.agent
            .proc
            .log_text()
            .lines()
            .filter(|l| l.contains("collector unreachable"))
            .count()
    }

    /// After a fault: waits until the agent reports it cannot ship (at
    /// most `bound` after the fault began at `since`), and its spool holds
    /// what it collects meanwhile.
    fn assert_detected(&self, before: usize, since: Instant, bound: Duration, fault: &str) {
        let seen = wait_until(bound.saturating_sub(since.elapsed()), || {
            self.unreachable_lines() > before
        });
        assert!(
            seen,
            "{fault}: the agent did not notice within {bound:?}; agent log:\n{}",
            self.agent.proc.log_text()
        );
        eprintln!("{fault}: noticed after {:?}", since.elapsed());
        assert!(
            wait_until(Duration::from_secs(10), || spool_batches(&self.agent.spool)
                .len()
                >= 5),
            "{fault}: the agent is not spooling"
        );
    }

    /// Once the fault is gone: the spool drains by itself (reconnect
    /// backoff is at most 30 s) and the whole run is stored exactly once.
    fn assert_recovers_complete(mut self, fault: &str) {
        let start = Instant::now();
        let drained = wait_until(Duration::from_secs(90), || {
            spool_batches(&self.agent.spool).len() <= 1
        });
        assert!(
            drained,
            "{fault}: the spool did not drain after recovery ({} batches); agent log:\n{}\ncollector log:\n{}",
            spool_batches(&self.agent.spool).len(),
            self.agent.proc.log_text(),
            self.collector.log_text()
        );
        eprintln!(
            "{fault}: spool drained {:?} after recovery",
            start.elapsed()
        );
        let n = stop_agent(&mut self.agent);
        assert!(n > 50, "{fault}: only {n} cycles ran");
        assert_complete_run(&self.reader(), "edge", n);
        assert!(self.collector.term(Duration::from_secs(20)).success());
        // The namespace and veth go on drop.
        drop(self.ns);
    }
}

/// A hard cut: the agent's end of the link goes down for 60 s (the kernel
/// drops what the agent sends; nothing comes back). The agent notices
/// (a failed send, or HTTP/2 keepalive: 10 s pings, 10 s timeout), spools,
/// reconnects once the link is up, and every cycle arrives once.
#[test]
fn link_down_for_a_minute_loses_and_duplicates_nothing() {
    if !netns::available("link_down_for_a_minute_loses_and_duplicates_nothing") {
        return;
    }
    let lab = Lab::new("down", "");
    let before = lab.unreachable_lines();
    let cut = Instant::now();
    lab.veth.b.set_up(false);
    lab.assert_detected(before, cut, Duration::from_secs(30), "link down");
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));
    lab.veth.b.set_up(true);
    lab.assert_recovers_complete("link down");
}

/// A silent cut: nftables drops every packet between the agent and the
/// collector for 60 s, with no error to see. HTTP/2 keepalive must find
/// the dead connection (bound: 10 s interval + 10 s timeout, plus a
/// cycle), then everything arrives once after the rule goes.
#[test]
fn silent_drop_for_a_minute_is_detected_and_loses_nothing() {
    if !netns::available("silent_drop_for_a_minute_is_detected_and_loses_nothing") {
        return;
    }
    let lab = Lab::new("drop", "");
    let port = lab.port;
    let before = lab.unreachable_lines();
    let cut = Instant::now();
    lab.ns.filter(
        &format!("tcp sport {port} drop"),
        &format!("tcp dport {port} drop"),
    );
    lab.assert_detected(before, cut, Duration::from_secs(30), "silent drop");
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));
    lab.ns.clear_filter();
    lab.assert_recovers_complete("silent drop");
}

/// 10 % of packets both ways dropped at random for 2 minutes of
/// streaming: TCP retransmits, streams may break and reconnect, and still
/// nothing is lost or stored twice.
#[test]
fn ten_percent_packet_loss_for_two_minutes_loses_and_duplicates_nothing() {
    if !netns::available("ten_percent_packet_loss_for_two_minutes_loses_and_duplicates_nothing") {
        return;
    }
    let lab = Lab::new("loss", "");
    let start_cycles = lab.stored();
    lab.ns.filter(
        "numgen random mod 100 < 10 counter drop",
        "numgen random mod 100 < 10 counter drop",
    );
    std::thread::sleep(Duration::from_secs(120));
    let during = lab.stored();
    let dropped = lab.ns.filter_packets();
    lab.ns.clear_filter();
    eprintln!("10 % loss: {dropped} packets dropped, {start_cycles} → {during} cycles stored");
    assert!(dropped > 20, "the rule dropped only {dropped} packets");
    assert!(
        during > start_cycles + 100,
        "under 10 % loss the agent should still deliver: {start_cycles} → {during} cycles stored"
    );
    lab.assert_recovers_complete("10 % loss");
}

/// A tmpfs of `mib` MiB mounted on `dir` (unmounted on drop).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(dir: &Path, mib: u32) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        netns::sh(
            None,
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }

    /// Writes a file until the filesystem is full; returns its size.
    fn fill(&self) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        let mut n = 0u64;
        while let Ok(k) = f.write(&block) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        let _ = f.flush();
        n
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l", self.0.to_str().unwrap()])
            .status();
    }
}

/// The collector's store on a small filesystem that fills up: ingest
/// answers UNAVAILABLE (never an ack for what was not committed), the
/// agent spools, and when space returns the collector takes the backlog
/// by itself, without a restart; every cycle once.
#[test]
fn collector_disk_full_answers_unavailable_and_recovers_by_itself() {
    if !netns::available("collector_disk_full_answers_unavailable_and_recovers_by_itself") {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(store.path(), 24);
    let extra = format!("[storage]\npath = {:?}\n", store.path().join("vitals.db"));
    let lab = Lab::new("disk", &extra);
    let before = lab.unreachable_lines();
    let full = Instant::now();
    let filled = fs.fill();
    eprintln!("filled {filled} bytes");
    // The store's SQLite WAL reuses its file after each checkpoint, so the
    // first write that needs a new page may take a few seconds of ingest.
    lab.assert_detected(before, full, Duration::from_secs(120), "disk full");
    let log = lab.agent.proc.log_text();
    assert!(
        log.contains("Unavailable") || log.contains("unavailable"),
        "the collector should answer UNAVAILABLE; agent log:\n{log}"
    );
    let collector_log = lab.collector.log_text();
    assert!(
        collector_log.contains("disk is full"),
        "the collector should say the disk is full; log:\n{collector_log}"
    );
    std::thread::sleep(Duration::from_secs(10));
    fs.free();
    lab.assert_recovers_complete("disk full");
    drop(fs);
}

/// The collector restarted 10 times while the agent streams (SIGKILL and
/// SIGTERM in turn, back within a moment): no loss, no duplicate.
#[test]
fn collector_restarted_ten_times_loses_and_duplicates_nothing() {
    if !netns::available("collector_restarted_ten_times_loses_and_duplicates_nothing") {
        return;
    }
    let mut lab = Lab::new("restart", "");
    for round in 0..10 {
        let had = lab.stored();
        if round % 2 == 0 {
            lab.collector.kill();
        } else {
            assert!(
                lab.collector.term(Duration::from_secs(20)).success(),
                "collector exit after SIGTERM; log:\n{}",
                lab.collector.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(300 + 200 * (round % 3)));
        lab.collector =
            start_collector_at(&lab.env, "0.0.0.0", lab.port, &lab.collector_extra, &[]);
        lab.wait_stored(
            had + 5,
            Duration::from_secs(60),
            &format!("restart {}: the agent did not resume", round + 1),
        );
    }
    lab.assert_recovers_complete("10 restarts");
}
