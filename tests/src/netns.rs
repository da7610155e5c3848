//! Network namespaces joined by veth pairs, for tests of what a bad link
//! does: a hard cut (`ip link set … down`), a silent cut or random loss
//! (nftables rules), a rate limit (`tc … tbf`). Needs root, `iproute2` and
//! `nftables`; tests using it call [`available`] first.
//!
//! Everything made here is removed on drop: deleting a namespace deletes the
//! veth ends inside it, and a pair with one end in the root namespace goes
//! with its peer.
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether namespaces, veth pairs and nftables can be used here (root,
/// `ip`, `nft`); if not, the test is skipped with the reason, or fails
/// when `VITALS_TEST_NETNS=1` says they must be here (CI).
pub fn available(test: &str) -> bool {
    let found = (|| {
        let ok = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| format!("cannot run {prog}: {e}"))
                .and_then(|s| {
                    s.success()
                        .then_some(())
                        .ok_or_else(|| format!("{prog} {args:?} failed (not root?)"))
                })
        };
        ok("nft", &["--version"])?;
        let probe = format!("vt-check-{}", std::process::id());
        ok("ip", &["netns", "add", &probe])?;
        ok("ip", &["netns", "del", &probe])
    })();
    crate::receivers::required(test, "VITALS_TEST_NETNS", found).is_some()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A number for names and subnets that no other test process uses now:
/// this process' id and a counter within it.
fn unique() -> (u32, u32) {
    (
        std::process::id() % 16_000,
        NEXT.fetch_add(1, Ordering::Relaxed),
    )
}

/// Runs `ip`/`nft`/`tc` (optionally inside `ns`) and panics with its
/// output when it fails.
pub fn sh(ns: Option<&str>, prog: &str, args: &[&str]) -> String {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, prog]);
            c
        }
        None => Command::new(prog),
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{prog} {args:?} in {ns:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Feeds `script` to `nft -f -` inside `ns` (or the root namespace).
pub fn nft(ns: Option<&str>, script: &str) {
    use std::io::Write;
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "nft", "-f", "-"]);
            c
        }
        None => {
            let mut c = Command::new("nft");
            c.args(["-f", "-"]);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (apt install nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft -f - in {ns:?} failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted on drop.
pub struct Ns {
    pub name: String,
}

impl Ns {
    /// A new namespace with its loopback up.
    pub fn new(tag: &str) -> Ns {
        let (pid, n) = unique();
        let name = format!("vt-{tag}-{pid}-{n}");
        sh(None, "ip", &["netns", "add", &name]);
        let ns = Ns { name };
        ns.sh("ip", &["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `prog args` inside the namespace (see [`sh`]).
    pub fn sh(&self, prog: &str, args: &[&str]) -> String {
        sh(Some(&self.name), prog, args)
    }

    /// `cmd`'s program run inside this namespace: `ip netns exec NAME prog
    /// args…` (which execs, so the child's pid is the program's).
    pub fn command(&self, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        c.arg(cmd.get_program());
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// Replaces this namespace's `inet vitals_test` table with `rules`
    /// (nft statements for a `filter` chain hooked on input and one on
    /// output), e.g. `"tcp dport 4000 drop"` or
    /// `"numgen random mod 100 < 10 drop"`.
    pub fn filter(&self, input: &str, output: &str) {
        self.clear_filter();
        nft(
            Some(&self.name),
            &format!(
                "table inet vitals_test {{\n chain input {{ type filter hook input priority 0; policy accept;\n {input}\n }}\n chain output {{ type filter hook output priority 0; policy accept;\n {output}\n }}\n}}\n"
            ),
        );
    }

    /// Packets the `counter` statements of the [`filter`](Self::filter)
    /// table matched, summed.
    pub fn filter_packets(&self) -> u64 {
        let listing = self.sh("nft", &["list", "table", "inet", "vitals_test"]);
        let words: Vec<&str> = listing.split_whitespace().collect();
        words
            .windows(2)
            .filter(|w| w[0] == "packets")
            .filter_map(|w| w[1].parse::<u64>().ok())
            .sum()
    }

    /// Removes the table [`filter`](Self::filter) made (if any).
    pub fn clear_filter(&self) {
        nft(
            Some(&self.name),
            "table inet vitals_test\ndelete table inet vitals_test\n",
        );
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One end of a veth pair: its interface name, the namespace it is in
/// (`None` = the root namespace) and its IPv4 address.
#[derive(Clone, Debug)]
pub struct End {
    pub ns: Option<String>,
    pub dev: String,
    pub ip: String,
}

impl End {
    fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    /// `ip link set DEV up|down` on this end: a hard cut the kernel reports
    /// (carrier lost on the peer too).
    pub fn set_up(&self, up: bool) {
        sh(
            self.ns(),
            "ip",
            &["link", "set", &self.dev, if up { "up" } else { "down" }],
        );
    }

    /// A token bucket on this end's egress: `rate` like `"200mbit"`.
    pub fn rate_limit(&self, rate: &str) {
        sh(
            self.ns(),
            "tc",
            &[
                "qdisc", "replace", "dev", &self.dev, "root", "tbf", "rate", rate, "burst",
                "256kb", "latency", "50ms",
            ],
        );
    }
}

/// A veth pair with a /30 between its two ends; removed with its
/// namespaces (or on drop, for one in the root namespace).
pub struct Veth {
    pub a: End,
    pub b: End,
}

impl Veth {
    /// Joins `a` and `b` (`None`: the root namespace) with a new veth pair;
    /// addresses from 10.64.0.0/10, unique to this process and pair.
    pub fn new(a: Option<&Ns>, b: Option<&Ns>) -> Veth {
        let (pid, n) = unique();
        assert!(n < 64, "at most 64 veth pairs per test process");
        let (hi, lo) = (64 + pid / 256, pid % 256);
        let base = n * 4;
        let dev_a = format!("vta{pid}x{n}");
        let dev_b = format!("vtb{pid}x{n}");
        sh(
            None,
            "ip",
            &[
                "link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b,
            ],
        );
        let ends = [(a, &dev_a, base + 1), (b, &dev_b, base + 2)].map(|(ns, dev, host)| {
            if let Some(ns) = ns {
                sh(None, "ip", &["link", "set", dev, "netns", &ns.name]);
            }
            let end = End {
                ns: ns.map(|n| n.name.clone()),
                dev: dev.clone(),
                ip: format!("10.{hi}.{lo}.{host}"),
            };
            sh(
                end.ns(),
                "ip",
                &["addr", "add", &format!("{}/30", end.ip), "dev", dev],
            );
            end.set_up(true);
            end
        });
        let [a, b] = ends;
        Veth { a, b }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // An end in the root namespace outlives the namespaces; deleting
        // either end deletes the pair (an error if a namespace took it).
        for end in [&self.a, &self.b] {
            if end.ns.is_none() {
                let _ = Command::new("ip")
                    .args(["link", "del", &end.dev])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}
