//! The network lab: two agents in two network namespaces joined by a veth
//! pair (the link under test), each with a management veth to the root
//! namespace where the collector runs, so cutting the link does not cut
//! reporting. nftables rules make the link lose packets or drop
//! everything silently; the peer mesh must see it, the built-in rule must
//! fire and resolve.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vitals_e2e::netns::{Ns, Veth};
use vitals_e2e::*;
use vitals_proto::v1::{MatchOp, Series};

/// The mesh's round: `COUNT` probes over `MESH_INTERVAL`.
const MESH_INTERVAL_MS: i64 = 1000;
/// Long, so that a machine busy with other tests does not turn a slow
/// answer into a loss.
const MESH_TIMEOUT_MS: i64 = 900;
const COUNT: u32 = 100;
const CYCLE_MS: i64 = 500;

/// The built-in peer rules as shipped, with `for` shortened to 2s.
fn peer_rules() -> String {
    builtin_rules("Peer", 3, "2s")
}

struct Lab {
    env: Env,
    cli: std::path::PathBuf,
    reader: Reader,
    _collector: Proc,
    a: Agent,
    b: Agent,
    link: Veth,
    ns_b: Ns,
    // Dropped after the agents (their namespaces go last).
    mgmt: [Veth; 2],
    _ns_a: Ns,
}

impl Lab {
    /// The namespaces, the collector, and the agents `lab-a` (probing
    /// `lab-b` across the link with `mesh`) and `lab-b`.
    fn start(a_extra: impl Fn(&Veth) -> String, b_extra: impl Fn(&Veth) -> String) -> Lab {
        let env = Env::new();
        let (ns_a, ns_b) = (Ns::new("a"), Ns::new("b"));
        let link = Veth::new(Some(&ns_a), Some(&ns_b));
        let mgmt = [Veth::new(Some(&ns_a), None), Veth::new(Some(&ns_b), None)];
        // Unprivileged ICMP echo in lab-a's namespace only; lab-b's keeps
        // the kernel's default (no group may), as does the root namespace.
        // (Written to /proc/sys, which shows the namespace of the writer:
        // no procps needed.)
        ns_a.sh(
            "sh",
            &[
                "-c",
                "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range",
            ],
        );
        assert_eq!(
            ns_a.sh("cat", &["/proc/sys/net/ipv4/ping_group_range"])
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["0", "2147483647"]
        );
        env.reissue_collector(&[&mgmt[0].b.ip, &mgmt[1].b.ip]);
        // Valid for the link (agents dial each other there) and the
        // management address (the CLI dials lab-a there).
        env.issue(
            "lab-a",
            "agent",
            &["--ip", &link.a.ip, "--ip", &mgmt[0].a.ip],
        );
        env.issue(
            "lab-b",
            "agent",
            &["--ip", &link.b.ip, "--ip", &mgmt[1].a.ip],
        );
        std::fs::create_dir_all(env.path().join("collector")).unwrap();
        std::fs::write(env.path().join("collector/rules.toml"), peer_rules()).unwrap();
        let port = free_port();
        let collector = start_collector_at(
            &env,
            "0.0.0.0",
            port,
            "[alerting]\neval_interval = \"500ms\"\nkeep_firing_for = \"1s\"\nrule_files = [\"rules.toml\"]\n",
            &[],
        );
        let start = |name: &str, ns: &Ns, mgmt: &Veth, extra: &str| {
            let opts = AgentOpts {
                cert: env.cert(name),
                ca: None,
                node: None,
                interval: "500ms",
                spool_max_bytes: 64 << 20,
            };
            let cfg = agent_config(&env, name, port, &opts, extra);
            set_collector(&cfg, &format!("https://{}:{port}", mgmt.b.ip));
            restart_agent_in(&cfg, ns)
        };
        // lab-b first: lab-a's scheduled test finds its listener.
        let b = start("lab-b", &ns_b, &mgmt[1], &b_extra(&link));
        assert!(
            wait_until(Duration::from_secs(10), || b
                .proc
                .log_text()
                .contains("agent started")),
            "lab-b starts: {}",
            b.proc.log_text()
        );
        let a = start("lab-a", &ns_a, &mgmt[0], &a_extra(&link));
        Lab {
            cli: env.cli_config(port),
            reader: Reader::new(&env, port),
            env,
            _collector: collector,
            a,
            b,
            link,
            ns_b,
            mgmt,
            _ns_a: ns_a,
        }
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.text(args)).unwrap()
    }

    fn text(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vitals {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["--config", self.cli.to_str().unwrap()];
        all.extend_from_slice(args);
        self.env.vitals(&all)
    }

    /// lab-a's alert of `rule` in `state`.
    fn alert(&self, rule: &str, state: &str) -> Option<serde_json::Value> {
        self.json(&["alerts", "--all", "--json"])["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["rule"] == rule && a["state"] == state && a["labels"]["node"] == "lab-a")
            .cloned()
    }

    /// lab-a's series `metric` about peer `lab-b`, `method` if given.
    fn peer(&self, metric: &str, method: Option<&str>) -> Vec<(i64, f64)> {
        let mut m = vec![
            ("node", MatchOp::Equal, "lab-a"),
            ("peer", MatchOp::Equal, "lab-b"),
        ];
        if let Some(method) = method {
            m.push(("method", MatchOp::Equal, method));
        }
        let series: Vec<Series> = self.reader.series(metric, &m);
        assert!(series.len() <= 1, "{metric}: one series, got {series:?}");
        series
            .into_iter()
            .flat_map(|s| s.points)
            .map(|p| (p.timestamp_ms, p.value))
            .collect()
    }

    fn last(&self, metric: &str, method: Option<&str>) -> Option<f64> {
        self.peer(metric, method).last().map(|p| p.1)
    }

    fn logs(&self) -> String {
        format!(
            "lab-a log:\n{}\nlab-b log:\n{}",
            self.a.proc.log_text(),
            self.b.proc.log_text()
        )
    }
}

/// A mesh config probing `peer` at `ip` over the link (ICMP, and TCP to
/// `port`), `count` probes a round.
fn mesh(peer: &str, ip: &str, port: u16, count: u32) -> String {
    format!(
        "[sources.mesh]\ninterval = \"{MESH_INTERVAL_MS}ms\"\ntimeout = \"{MESH_TIMEOUT_MS}ms\"\ncount = {count}\n\
         [[sources.mesh.peers]]\nname = \"{peer}\"\nhost = \"{ip}\"\nport = {port}\nlabels = {{ link = \"lab\" }}\n"
    )
}

/// The first sample at or after `ts`, and the last at or before `end`.
fn span(points: &[(i64, f64)], ts: i64, end: i64) -> Option<(f64, f64)> {
    let first = points.iter().find(|p| p.0 >= ts)?.1;
    let last = points.iter().rev().find(|p| p.0 <= end)?.1;
    Some((first, last))
}

#[test]
fn the_mesh_sees_loss_and_a_silent_cut_and_the_rule_fires_and_resolves() {
    if !netns::available("the_mesh_sees_loss_and_a_silent_cut_and_the_rule_fires_and_resolves") {
        return;
    }
    // TCP probes go to the other agent's net-test listener. lab-b probes
    // lab-a too, but may not send ICMP echo in its namespace.
    let lab = Lab::start(
        |link| mesh("lab-b", &link.b.ip, NET_TEST_PORT, COUNT) + &net_test(""),
        |link| mesh("lab-a", &link.a.ip, NET_TEST_PORT, 10) + &net_test(""),
    );
    let link_dev = lab.link.b.dev.clone();

    // Healthy: ICMP (the lab allows ping sockets) and TCP both answered,
    // nothing lost.
    assert!(
        wait_until(Duration::from_secs(30), || {
            lab.last("vitals_peer_up", None) == Some(1.0)
                && lab.last("vitals_peer_rtt_seconds", None).is_some()
                && lab.last("vitals_peer_tcp_connect_seconds", None).is_some()
        }),
        "the mesh reports lab-b up over ICMP and TCP; {}",
        lab.logs()
    );
    let rtt = lab.last("vitals_peer_rtt_seconds", None).unwrap();
    assert!(rtt > 0.0 && rtt < 0.1, "a veth round trip: {rtt}");
    for method in ["icmp", "tcp"] {
        let loss = lab.last("vitals_peer_loss_ratio", Some(method)).unwrap();
        // A healthy veth loses nothing; a probe may still miss its timeout
        // on a machine busy with other tests, hence not exactly 0.
        assert!(loss < 0.05, "{method}: no loss on a healthy link: {loss}");
    }
    assert_eq!(
        lab.last("vitals_peer_tcp_refused_total", None),
        Some(0.0),
        "connects reach the listener"
    );
    assert!(
        !lab.a.proc.log_text().contains("ICMP skipped"),
        "ping sockets are allowed in the lab; {}",
        lab.logs()
    );

    // Where the kernel refuses ping sockets, ICMP is skipped with one
    // message and TCP goes on.
    assert!(
        wait_until(Duration::from_secs(20), || {
            lab.reader
                .series(
                    "vitals_peer_up",
                    &[
                        ("node", MatchOp::Equal, "lab-b"),
                        ("peer", MatchOp::Equal, "lab-a"),
                    ],
                )
                .first()
                .and_then(|s| s.points.last())
                .is_some_and(|p| p.value == 1.0)
        }),
        "lab-b reaches lab-a by TCP; {}",
        lab.logs()
    );
    let b_log = lab.b.proc.log_text();
    assert_eq!(
        b_log.matches("ICMP skipped").count(),
        1,
        "one message: {b_log}"
    );
    assert!(
        b_log.contains("ping_group_range"),
        "says how to allow it: {b_log}"
    );
    let b_methods: Vec<String> = lab
        .reader
        .series(
            "vitals_peer_loss_ratio",
            &[("node", MatchOp::Equal, "lab-b")],
        )
        .iter()
        .map(|s| labels(s)["method"].clone())
        .collect();
    assert_eq!(b_methods, ["tcp"], "lab-b measures TCP only");
    assert!(
        lab.reader
            .series(
                "vitals_peer_probes_total",
                &[
                    ("node", MatchOp::Equal, "lab-b"),
                    ("method", MatchOp::Equal, "icmp")
                ],
            )
            .iter()
            .all(|s| s.points.iter().all(|p| p.value == 0.0)),
        "no ICMP probe counted where none can be sent"
    );

    // 20 % random loss on everything lab-b receives over the link.
    lab.ns_b.filter(
        &format!("iifname \"{link_dev}\" numgen random mod 100 < 20 drop"),
        "",
    );
    let t0 = vitals_common::now_ms();
    // Seen within two intervals: the first round that starts after the
    // rule ends by t0 + interval + interval·(count−1)/count + timeout, and
    // the next cycle takes it. Each method's round of 100 probes loses
    // more than 3 with probability 1 − 5.8e-7 (binomial, p = 0.2).
    let deadline = t0 + 2 * MESH_INTERVAL_MS + MESH_TIMEOUT_MS + CYCLE_MS;
    for method in ["icmp", "tcp"] {
        assert!(
            wait_until(Duration::from_secs(20), || {
                lab.peer("vitals_peer_loss_ratio", Some(method))
                    .iter()
                    .any(|p| p.0 > t0 && p.0 <= deadline && p.1 > 0.03)
            }),
            "{method}: loss reported within two intervals: {:?}",
            lab.peer("vitals_peer_loss_ratio", Some(method))
                .iter()
                .filter(|p| p.0 > t0)
                .collect::<Vec<_>>()
        );
    }
    // The loss measured: every round counted from `from` on started after
    // the rule (a round lasts at most interval + timeout). Over at least
    // 400 probes per method the share lost is within [0.1, 0.3] but with
    // probability 7.6e-7 (binomial, p = 0.2: ±5 standard deviations).
    let from = t0 + MESH_INTERVAL_MS + MESH_TIMEOUT_MS + CYCLE_MS;
    let counted = |method: &str| {
        let probes = lab.peer("vitals_peer_probes_total", Some(method));
        let lost = lab.peer("vitals_peer_lost_total", Some(method));
        let now = i64::MAX;
        let (p0, p1) = span(&probes, from, now)?;
        let (l0, l1) = span(&lost, from, now)?;
        Some((p1 - p0, l1 - l0))
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            ["icmp", "tcp"]
                .iter()
                .all(|m| counted(m).is_some_and(|(p, _)| p >= 400.0))
        }),
        "400 probes per method under loss; {}",
        lab.logs()
    );
    for method in ["icmp", "tcp"] {
        let (probes, lost) = counted(method).unwrap();
        let share = lost / probes;
        assert!(
            (0.1..=0.3).contains(&share),
            "{method}: {lost} of {probes} probes lost under a 20 % drop rule"
        );
    }

    // A silent cut: lab-b drops everything from the link, answers nothing.
    lab.ns_b.filter(&format!("iifname \"{link_dev}\" drop"), "");
    assert!(
        wait_until(Duration::from_secs(20), || lab.last("vitals_peer_up", None)
            == Some(0.0)),
        "a silent cut makes the peer down: up = {:?}",
        lab.last("vitals_peer_up", None)
    );
    for method in ["icmp", "tcp"] {
        assert_eq!(
            lab.last("vitals_peer_loss_ratio", Some(method)),
            Some(1.0),
            "{method}: every probe lost"
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || lab
            .alert("PeerUnreachable", "firing")
            .is_some()),
        "PeerUnreachable fires; alerts: {}",
        lab.json(&["alerts", "--all", "--json"])
    );
    let alert = lab.alert("PeerUnreachable", "firing").unwrap();
    assert_eq!(alert["labels"]["peer"], "lab-b", "{alert}");
    assert_eq!(alert["labels"]["node"], "lab-a", "{alert}");
    // lab-b kept reporting through its own management link.
    let b_cycles = lab
        .reader
        .samples("vitals_agent_cycles_total", "lab-b")
        .len();

    // The rule removed: up again, the alert resolves.
    lab.ns_b.clear_filter();
    assert!(
        wait_until(Duration::from_secs(20), || lab.last("vitals_peer_up", None)
            == Some(1.0)),
        "the peer is back up"
    );
    assert!(
        wait_until(Duration::from_secs(20), || lab
            .alert("PeerUnreachable", "resolved")
            .is_some()),
        "PeerUnreachable resolves; alerts: {}",
        lab.json(&["alerts", "--all", "--json"])
    );
    assert!(
        lab.reader
            .samples("vitals_agent_cycles_total", "lab-b")
            .len()
            > b_cycles,
        "lab-b reports throughout"
    );
}

/// The net-test listener's port, the same in both namespaces.
const NET_TEST_PORT: u16 = 7444;

fn net_test(extra: &str) -> String {
    format!(
        "[net_test]\nlisten = \"0.0.0.0:{NET_TEST_PORT}\"\nmax_bytes = \"200MB\"\nmax_duration = \"20s\"\n{extra}"
    )
}

#[test]
fn net_test_measures_a_rate_limited_link_and_refuses_what_is_over_its_limits() {
    if !netns::available(
        "net_test_measures_a_rate_limited_link_and_refuses_what_is_over_its_limits",
    ) {
        return;
    }
    // lab-a also tests the link to lab-b by itself, once at its start
    // (then hourly): the scheduled series.
    let lab = Lab::start(
        |link| {
            net_test(&format!(
                "[[net_test.schedule]]\nto = \"{}:{NET_TEST_PORT}\"\nevery = \"1h\"\nbytes = \"4MiB\"\nstreams = 2\n",
                link.b.ip
            ))
        },
        |_| net_test(""),
    );
    let from = format!("{}:{NET_TEST_PORT}", lab.mgmt[0].a.ip);
    let to = format!("{}:{NET_TEST_PORT}", lab.link.b.ip);
    let peer = [
        ("node", MatchOp::Equal, "lab-a"),
        ("peer", MatchOp::Equal, to.as_str()),
    ];
    let last = |metric: &str| {
        lab.reader
            .series(metric, &peer)
            .first()
            .and_then(|s| s.points.last())
            .map(|p| p.value)
    };
    assert!(
        wait_until(Duration::from_secs(30), || last("vitals_net_test_success")
            == Some(1.0)),
        "the scheduled test ran; success = {:?}; {}",
        last("vitals_net_test_success"),
        lab.logs()
    );
    assert_eq!(last("vitals_net_test_bytes"), Some(f64::from(4 << 20)));
    assert!(last("vitals_net_test_bits_per_second").is_some_and(|b| b > 0.0));
    assert!(last("vitals_net_test_retransmits").is_some());

    // 200 Mbit/s on lab-a's end of the link: what the receiver counts
    // (payload, so a little under the limit, which counts frames) must be
    // within 20 % of it.
    lab.link.a.rate_limit("200mbit");
    let r = lab.json(&[
        "net",
        "test",
        &from,
        &to,
        "--bytes",
        "40MB",
        "--streams",
        "4",
        "--json",
    ]);
    eprintln!("net test through a 200 Mbit/s tbf: {r}");
    let gbit = r["gbit_per_second"].as_f64().unwrap();
    assert!(
        (0.16..=0.24).contains(&gbit),
        "200 Mbit/s limit, measured {gbit} Gbit/s: {r}"
    );
    assert_eq!(r["from"], "lab-a", "{r}");
    assert_eq!(r["to"], "lab-b", "{r}");
    assert_eq!(r["bytes"], 40_000_000, "{r}");
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(
        r["interface"],
        lab.link.a.dev.as_str(),
        "the sending interface: {r}"
    );
    assert!(r["retransmits"].is_u64(), "{r}");
    // A veth reports a speed (10 Gbit/s) or none; the ratio follows it.
    match r["link_speed_mbps"].as_f64() {
        Some(mbps) => {
            let ratio = r["link_ratio"].as_f64().unwrap();
            assert!((ratio - gbit * 1000.0 / mbps).abs() < 1e-9, "{r}");
        }
        None => assert!(r["link_ratio"].is_null(), "{r}"),
    }
    // The human form says the same.
    let text = lab.text(&["net", "test", &from, &to, "--bytes", "10MB"]);
    assert!(
        text.starts_with("lab-a → lab-b: 0.") && text.contains("Gbit/s"),
        "{text}"
    );
    assert!(text.contains("retransmits: "), "{text}");
    assert!(text.contains("link"), "{text}");

    // Refusals, each a clear error: more than the receiver allows, a
    // listener that is not there, an agent certificate asking to run.
    let over = lab.run(&["net", "test", &from, &to, "--bytes", "1GB"]);
    let err = String::from_utf8_lossy(&over.stderr);
    assert!(!over.status.success() && err.contains("max_bytes"), "{err}");
    let nobody = format!("{}:1", lab.link.b.ip);
    let out = lab.run(&["net", "test", &from, &nobody, "--bytes", "1MB"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot reach the net-test listener"),
        "{err}"
    );
    let agent_cli = lab.env.path().join("agent-cli.toml");
    let (cert, key) = lab.env.cert("lab-b");
    std::fs::write(
        &agent_cli,
        format!(
            "collector = \"https://127.0.0.1:1\"\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
            lab.env.ca()
        ),
    )
    .unwrap();
    let out = lab.env.vitals(&[
        "--config",
        agent_cli.to_str().unwrap(),
        "net",
        "test",
        &from,
        &to,
        "--bytes",
        "1MB",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs an operator certificate"),
        "{err}"
    );
}

/// Bad `[sources.mesh]` and `[net_test]` tables stop the agent before it
/// starts (exit 2), naming the file, the line, the key and what to do.
#[test]
fn bad_mesh_and_net_test_config_names_file_and_key_and_exits_2() {
    let env = Env::new();
    let head = "collector = \"https://127.0.0.1:1\"\n";
    // (table after the `collector` line, key, line, what it says)
    let cases = [
        (
            "[sources.mesh]\n[[sources.mesh.peers]]\nname = \"nas\"\nhost = \"10.0.0.2\"\n[[sources.mesh.peers]]\nname = \"b\"\nhost = \"10.0.0.3\"\nicmp = false\n",
            "sources.mesh.peers[1].port",
            ":6:",
            "set a TCP port, or icmp = true",
        ),
        (
            "[sources.mesh]\ninterval = \"1s\"\ntimeout = \"5s\"\n",
            "sources.mesh.timeout",
            ":4:",
            "at most the interval",
        ),
        (
            "[sources.mesh]\n[[sources.mesh.peers]]\nname = \"nas\"\nhost = \"10.0.0.2\"\nlabels = { peer = \"x\" }\n",
            "sources.mesh.peers[0].labels",
            ":6:",
            "reserved",
        ),
        (
            "[net_test]\nlisten = \"nas-01:7444\"\n",
            "net_test.listen",
            ":3:",
            "not ADDRESS:PORT",
        ),
        (
            "[net_test]\n[[net_test.schedule]]\nto = \"nas-01\"\nevery = \"1h\"\n",
            "net_test.schedule[0].to",
            ":4:",
            "is not HOST:PORT",
        ),
        (
            "[net_test]\nmax_bytes = \"1MiB\"\n[[net_test.schedule]]\nto = \"nas-01:7444\"\nevery = \"1h\"\nbytes = \"2MiB\"\n",
            "net_test.schedule[0].bytes",
            ":7:",
            "above net_test.max_bytes",
        ),
        (
            "\n[net_test]\nmax_bytes = \"12 parsecs\"\n",
            "net_test.max_bytes",
            ":4:",
            "unknown unit",
        ),
    ];
    for (i, (table, key, line, says)) in cases.iter().enumerate() {
        let file = env.path().join(format!("agent{i}.toml"));
        std::fs::write(&file, format!("{head}{table}")).unwrap();
        let out = std::process::Command::new(bin("vitals-agent"))
            .args(["check-config", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{table}: {err}");
        let file_line = format!("{}{line}", file.display());
        assert!(
            err.contains(&file_line) && err.contains(key) && err.contains(says),
            "{table}: want {file_line}, {key} and {says:?} in: {err}"
        );
    }
}
