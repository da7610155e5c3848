//! What the systemd units rely on: readiness notification (`Type=notify`)
//! and reload (SIGHUP re-reads config and certificates while running).

use std::os::unix::net::UnixDatagram;

use super::*;

/// The datagrams a daemon sent to `NOTIFY_SOCKET`, until `until` is among
/// them or `timeout` passes.
fn notifications(sock: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < end && !got.iter().any(|m: &String| m.contains(until)) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// Both daemons say READY=1 once they serve and STOPPING=1 on SIGTERM, as
/// `Type=notify` units need.
#[test]
fn daemons_notify_the_service_manager_when_ready_and_when_stopping() {
    let env = Env::new();
    env.issue("ready", "agent", &[]);
    let port = free_port();
    let sock_path = env.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let notify = [("NOTIFY_SOCKET", sock_path.to_str().unwrap())];

    let mut collector = start_collector_with_env(&env, port, &notify);
    let got = notifications(&sock, "READY=1", Duration::from_secs(20));
    let ready = got.iter().find(|m| m.contains("READY=1"));
    assert!(
        ready.is_some_and(|m| m.contains(&format!("STATUS=listening on 127.0.0.1:{port}"))),
        "collector sent {got:?}; log:\n{}",
        collector.log_text()
    );

    // The agent: its config from the harness, started again with the socket.
    let mut first = start_agent(&env, "ready", port, &opts(&env, "ready"));
    assert!(wait_until(Duration::from_secs(20), || first
        .proc
        .log_text()
        .contains("connected to collector")));
    stop_agent(&mut first);
    let mut agent = Proc::spawn_cmd(
        Command::new(bin("vitals-agent"))
            .args(["--config", first.config.to_str().unwrap()])
            .envs(notify),
        &env.path().join("ready-agent.log"),
    );
    let got = notifications(&sock, "READY=1", Duration::from_secs(20));
    assert!(
        got.iter().any(|m| m.starts_with("READY=1")),
        "agent sent {got:?}; log:\n{}",
        agent.log_text()
    );
    assert!(agent.term(Duration::from_secs(20)).success());
    let got = notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(
        got.iter().any(|m| m == "STOPPING=1"),
        "agent sent {got:?} on SIGTERM"
    );
    assert!(collector.term(Duration::from_secs(10)).success());
    let got = notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    assert!(
        got.iter().any(|m| m == "STOPPING=1"),
        "collector sent {got:?} on SIGTERM"
    );
}

/// An agent whose certificate is replaced and that gets a SIGHUP drops its
/// stream, connects again presenting the new certificate, and every cycle
/// it ran is stored exactly once. A broken config on a SIGHUP before that
/// is refused with its error and changes nothing.
#[test]
fn agent_sighup_reconnects_with_the_new_certificate_and_loses_no_batch() {
    let env = Env::new();
    env.issue("rot", "agent", &[]);
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);

    // The agent reads its certificate from files of its own, which the
    // rotation then replaces.
    let dir = env.path().join("rot-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("agent.pem"), dir.join("agent.key"));
    replace_file(&env.cert("rot").0, &cert);
    replace_file(&env.cert("rot").1, &key);
    let old_serial = cert_serial(&cert);
    let mut agent = start_agent(
        &env,
        "rot",
        port,
        &AgentOpts {
            cert: (cert.clone(), key.clone()),
            ..opts(&env, "rot")
        },
    );
    let stored = |n: usize| {
        wait_until(Duration::from_secs(30), || {
            cycles(&reader, "rot").len() >= n
        })
    };
    assert!(stored(5), "nothing stored; log:\n{}", agent.proc.log_text());
    assert!(
        collector
            .log_text()
            .contains(&format!("cert_serial={old_serial}")),
        "the collector did not log the first certificate"
    );

    // A config that does not parse: refused, the agent goes on as it was.
    let good = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, format!("{good}\nbogus_key = 1\n")).unwrap();
    agent.proc.hup();
    assert!(
        wait_until(Duration::from_secs(10), || agent
            .proc
            .log_text()
            .contains("reload refused")),
        "a bad config was not refused; log:\n{}",
        agent.proc.log_text()
    );
    assert!(
        agent.proc.log_text().contains("bogus_key"),
        "the refusal does not name the key"
    );
    let before = cycles(&reader, "rot").len();
    assert!(
        stored(before + 5),
        "the agent stopped delivering after a refused reload"
    );

    // Rotation: a new certificate for the same node, written over the old
    // files, then SIGHUP.
    std::fs::write(&agent.config, &good).unwrap();
    env.issue("rot", "agent", &["--days", "30"]);
    let new_serial = cert_serial(&env.cert("rot").0);
    assert_ne!(old_serial, new_serial);
    replace_file(&env.cert("rot").0, &cert);
    replace_file(&env.cert("rot").1, &key);
    agent.proc.hup();
    let reconnected = wait_until(Duration::from_secs(20), || {
        collector
            .log_text()
            .contains(&format!("cert_serial={new_serial}"))
    });
    assert!(
        reconnected,
        "the agent did not reconnect with the new certificate; agent log:\n{}\ncollector log:\n{}",
        agent.proc.log_text(),
        collector.log_text()
    );
    let log = agent.proc.log_text();
    let reloaded = log
        .lines()
        .find(|l| l.contains("reloaded") && l.contains("changed="))
        .unwrap_or_else(|| panic!("the reload was not logged:\n{log}"));
    assert!(
        reloaded.contains("tls.cert") && reloaded.contains("tls.key"),
        "{reloaded}"
    );

    // It keeps delivering on the new stream, and nothing was lost or doubled
    // across the refused reload and the reconnection.
    let before = cycles(&reader, "rot").len();
    assert!(stored(before + 5), "nothing stored after the rotation");
    let n = stop_agent(&mut agent);
    assert_complete_run(&reader, "rot", n);
    assert!(collector.term(Duration::from_secs(10)).success());
}

/// A collector whose certificate is replaced and that gets a SIGHUP presents
/// the new one to new connections. A config that does not load, or a key
/// that does not go with its certificate, is refused and the running
/// certificate stays.
#[test]
fn collector_sighup_serves_the_new_certificate_and_refuses_a_bad_one() {
    let env = Env::new();
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let (op_cert, op_key) = env.cert("operator");
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Whether an operator can list nodes when the collector must be `name`.
    let serves_as = |name: &str| {
        rt.block_on(async {
            let ch = channel_as(port, &env.ca(), Some((&op_cert, &op_key)), name).await?;
            QueryClient::new(ch)
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
            Ok::<_, Box<dyn std::error::Error>>(())
        })
        .is_ok()
    };
    assert!(serves_as("localhost"));
    assert!(
        !serves_as("rotated.test"),
        "the first certificate names rotated.test"
    );

    // The next certificate names the collector differently.
    env.issue(
        "collector-next",
        "collector",
        &["--dns", "rotated.test", "--ip", "127.0.0.1"],
    );
    let (cert, key) = env.cert("collector");
    let (next_cert, next_key) = env.cert("collector-next");
    let reloads = |log: &str| log.matches("reloaded").count();

    // A key that does not go with the certificate: refused.
    replace_file(&next_cert, &cert);
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || collector
            .log_text()
            .contains("reload refused")),
        "a mismatched key was not refused; log:\n{}",
        collector.log_text()
    );
    assert!(
        serves_as("localhost"),
        "the running certificate was dropped"
    );
    assert!(!serves_as("rotated.test"));

    // Certificate and key together: new connections get the new certificate.
    replace_file(&next_key, &key);
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || reloads(&collector.log_text())
            >= 1),
        "no reload logged; log:\n{}",
        collector.log_text()
    );
    assert!(
        serves_as("rotated.test"),
        "the new certificate is not served"
    );
    assert!(
        !serves_as("localhost"),
        "the old certificate is still served"
    );
    let log = collector.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reloaded") && l.contains("changed="))
        .unwrap();
    assert!(
        line.contains("tls.cert") && line.contains("tls.key"),
        "{line}"
    );

    // A config that does not parse: refused, the new certificate stays.
    let cfg = env.path().join("collector/collector.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("listen =", "listen = = ")).unwrap();
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || collector
            .log_text()
            .matches("reload refused")
            .count()
            >= 2),
        "a broken config was not refused; log:\n{}",
        collector.log_text()
    );
    assert!(serves_as("rotated.test"));
    assert!(collector.is_running());

    // A key that needs a restart is named, and the rest applies.
    std::fs::write(
        &cfg,
        good.replace(
            "shutdown_grace = \"5s\"",
            "shutdown_grace = \"6s\"\n[query]\nmax_series = 7",
        )
        .replace(&format!("127.0.0.1:{port}"), "127.0.0.1:1"),
    )
    .unwrap();
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || collector
            .log_text()
            .contains("needs a restart")),
        "log:\n{}",
        collector.log_text()
    );
    let log = collector.log_text();
    assert!(
        log.contains("key=\"listen\"") || log.contains("key=listen"),
        "{log}"
    );
    assert!(log.contains("changed=query, shutdown_grace"), "{log}");
    assert!(serves_as("rotated.test"), "the listener moved on a reload");
    assert!(collector.term(Duration::from_secs(10)).success());
}
