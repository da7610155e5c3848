//! End-to-end: the real binaries, real mutual TLS on 127.0.0.1, certificates
//! made by `vitals certs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio_stream::StreamExt;
use vitals_e2e::*;
use vitals_proto::v1::{
    AgentMessage, Batch, Event, Hello, Label, ListNodesRequest, MatchOp, SeriesDef, Severity,
    agent_message, collector_message, ingest_client::IngestClient, query_client::QueryClient,
};

#[path = "e2e/service.rs"]
mod service;

const SPOOL_BIG: u64 = 64 << 20;

fn opts<'a>(env: &Env, cert: &str) -> AgentOpts<'a> {
    AgentOpts {
        cert: env.cert(cert),
        ca: None,
        node: None,
        interval: "100ms",
        spool_max_bytes: SPOOL_BIG,
    }
}

fn nothing_stored(env: &Env, reader: &Reader) -> bool {
    let no_events = !env.db().exists() || stored_events(&env.db(), "1 = 1") == 0;
    reader.all().is_empty() && no_events
}

#[test]
fn refuses_agents_without_a_valid_agent_certificate_and_stores_nothing() {
    let env = Env::new();
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);

    // Another CA, an expired certificate, an operator certificate.
    let other = env.path().join("other-ca");
    env.vitals_ok(&["certs", "init", "--dir", other.to_str().unwrap()]);
    env.vitals_ok(&[
        "certs",
        "issue",
        "--dir",
        other.to_str().unwrap(),
        "--name",
        "intruder",
        "--role",
        "agent",
    ]);
    env.issue("stale", "agent", &["--not-after", "2021-01-01"]);
    env.issue("ops", "operator", &[]);
    let shown = env.vitals_ok(&["certs", "show", env.cert("stale").0.to_str().unwrap()]);
    assert!(shown.contains("EXPIRED"), "{shown}");

    let intruder = AgentOpts {
        cert: (other.join("intruder.pem"), other.join("intruder.key")),
        ..opts(&env, "unused")
    };
    let mut agents = vec![
        start_agent(&env, "intruder", port, &intruder),
        start_agent(&env, "stale", port, &opts(&env, "stale")),
        start_agent(&env, "ops", port, &opts(&env, "ops")),
    ];

    // No client certificate at all, straight through tonic.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let bare = rt.block_on(async {
        let ch = channel(port, &env.ca(), None).await?;
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node: "x".into(),
                agent_version: "t".into(),
                instance_id: "i".into(),
            })),
        };
        let mut resp = IngestClient::new(ch)
            .stream(tokio_stream::iter(vec![hello]))
            .await?
            .into_inner();
        resp.message().await?;
        Ok::<_, Box<dyn std::error::Error>>(())
    });
    assert!(bare.is_err(), "a client without a certificate got through");

    // Each agent keeps running, spools, and is refused.
    for a in &mut agents {
        let spooled = wait_until(Duration::from_secs(15), || {
            spool_batches(&a.spool).len() >= 5
        });
        assert!(
            spooled,
            "agent did not keep collecting into its spool; log:\n{}",
            a.proc.log_text()
        );
        assert!(
            a.proc.is_running(),
            "agent died; log:\n{}",
            a.proc.log_text()
        );
    }
    let ops_log = agents[2].proc.log_text();
    assert!(
        ops_log.contains("role operator"),
        "operator refusal not explained:\n{ops_log}"
    );
    for a in &agents[..2] {
        let log = a.proc.log_text();
        assert!(
            log.contains("collector unreachable"),
            "TLS refusal not reported:\n{log}"
        );
    }
    assert!(
        nothing_stored(&env, &reader),
        "something was stored from a refused agent"
    );
    assert!(
        reader.nodes().is_empty(),
        "a refused agent was registered as a node"
    );
    assert!(collector.term(Duration::from_secs(10)).success());
}

#[test]
fn samples_for_another_node_are_permission_denied_whole() {
    let env = Env::new();
    env.issue("node-a", "agent", &[]);
    let port = free_port();
    let _collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);
    let (cert, key) = env.cert("node-a");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let series = |id: u32, node: &str| SeriesDef {
        id,
        name: "test_metric".into(),
        labels: vec![Label {
            name: "node".into(),
            value: node.into(),
        }],
    };
    let send = |batch: Batch| {
        let (cert, key, ca) = (cert.clone(), key.clone(), env.ca());
        rt.block_on(async move {
            let ch = channel(port, &ca, Some((&cert, &key))).await.unwrap();
            let msgs = vec![
                AgentMessage {
                    msg: Some(agent_message::Msg::Hello(Hello {
                        node: "node-a".into(),
                        agent_version: "test".into(),
                        instance_id: "inst-1".into(),
                    })),
                },
                AgentMessage {
                    msg: Some(agent_message::Msg::Batch(batch)),
                },
            ];
            // Keep the request stream open until the answers are in.
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            for m in msgs {
                tx.send(m).await.unwrap();
            }
            let mut resp = IngestClient::new(ch)
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), resp.next()).await {
                    Ok(Some(Ok(m))) => {
                        let is_ack = matches!(m.msg, Some(collector_message::Msg::Ack(_)));
                        got.push(Ok(m));
                        if is_ack {
                            break;
                        }
                    }
                    Ok(Some(Err(status))) => {
                        got.push(Err(status));
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            drop(tx);
            got
        })
    };

    // One batch: a sample for node-a and one for node-b.
    let mixed = Batch {
        seq: 1,
        series: vec![series(0, "node-a"), series(1, "node-b")],
        series_ids: vec![0, 1],
        timestamps_ms: vec![1000, 1000],
        values: vec![1.0, 2.0],
        events: vec![],
    };
    let got = send(mixed);
    let status = got
        .iter()
        .find_map(|r| r.as_ref().err())
        .unwrap_or_else(|| panic!("no error status; got {got:?}"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        nothing_stored(&env, &reader),
        "part of a rejected batch was stored"
    );

    // An event for another node is refused the same way.
    let event = |node: &str| Event {
        timestamp_ms: 1500,
        node: node.into(),
        kind: "oom".into(),
        severity: Severity::Error as i32,
        message: "out of memory".into(),
        labels: vec![],
    };
    let foreign_event = Batch {
        seq: 1,
        series: vec![series(0, "node-a")],
        series_ids: vec![0],
        timestamps_ms: vec![1000],
        values: vec![1.0],
        events: vec![event("node-b")],
    };
    let got = send(foreign_event);
    let status = got
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("an error status");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        nothing_stored(&env, &reader),
        "part of a rejected batch was stored"
    );

    // The same identity with an honest batch is stored and acked.
    let honest = Batch {
        seq: 1,
        series: vec![series(0, "node-a")],
        series_ids: vec![0, 0],
        timestamps_ms: vec![1000, 2000],
        values: vec![1.0, 2.0],
        events: vec![event("")],
    };
    let got = send(honest);
    assert!(
        got.iter().any(|r| matches!(r, Ok(m) if matches!(m.msg, Some(collector_message::Msg::Ack(ref a)) if a.seq == 1))),
        "honest batch not acked: {got:?}"
    );
    assert_eq!(
        reader.samples("test_metric", "node-a"),
        vec![(1000, 1.0), (2000, 2.0)]
    );
    assert!(reader.node_series("node-b").is_empty());
    assert_eq!(
        stored_events(&env.db(), "node = 'node-a' AND kind = 'oom' AND ts = 1500"),
        1,
        "the event travelled with the batch and took the certificate's node"
    );

    // The real agent, certified as node-a but configured as node-b.
    let liar = AgentOpts {
        node: Some("node-b"),
        ..opts(&env, "node-a")
    };
    let mut agent = start_agent(&env, "liar", port, &liar);
    let refused = wait_until(Duration::from_secs(15), || {
        agent.proc.log_text().contains("PermissionDenied")
    });
    assert!(
        refused,
        "agent did not report the refusal:\n{}",
        agent.proc.log_text()
    );
    assert!(agent.proc.is_running());
    assert!(reader.node_series("node-b").is_empty());
    let total: usize = reader.all().iter().map(|s| s.points.len()).sum();
    assert_eq!(total, 2);

    // An agent certificate may not query.
    let denied = rt.block_on(async {
        let ch = channel(port, &env.ca(), Some((&cert, &key))).await.unwrap();
        QueryClient::new(ch).list_nodes(ListNodesRequest {}).await
    });
    assert_eq!(denied.unwrap_err().code(), tonic::Code::PermissionDenied);
}

#[test]
fn collector_sigkill_while_two_agents_stream_loses_and_duplicates_nothing() {
    let env = Env::new();
    env.issue("a1", "agent", &[]);
    env.issue("a2", "agent", &[]);
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let mut a1 = start_agent(&env, "a1", port, &opts(&env, "a1"));
    let mut a2 = start_agent(&env, "a2", port, &opts(&env, "a2"));

    let stored = |r: &Reader, n: usize| cycles(r, "a1").len() >= n && cycles(r, "a2").len() >= n;
    let reader = Reader::new(&env, port);
    assert!(
        wait_until(Duration::from_secs(20), || stored(&reader, 10)),
        "agents did not start storing"
    );
    collector.kill();
    std::thread::sleep(Duration::from_millis(800));
    let mut collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);
    assert!(
        wait_until(Duration::from_secs(20), || stored(&reader, 30)),
        "agents did not resume"
    );
    std::thread::sleep(Duration::from_millis(500));

    let n1 = stop_agent(&mut a1);
    let n2 = stop_agent(&mut a2);
    assert_complete_run(&reader, "a1", n1);
    assert_complete_run(&reader, "a2", n2);
    assert!(collector.term(Duration::from_secs(10)).success());
}

#[test]
fn collector_down_backlog_arrives_in_order_and_a_full_spool_drops_oldest() {
    let env = Env::new();
    env.issue("big", "agent", &[]);
    env.issue("tiny", "agent", &[]);
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let mut big = start_agent(&env, "big", port, &opts(&env, "big"));
    // Room for a few batches only.
    let tiny_opts = AgentOpts {
        spool_max_bytes: 6000,
        ..opts(&env, "tiny")
    };
    let mut tiny = start_agent(&env, "tiny", port, &tiny_opts);
    let reader = Reader::new(&env, port);
    let stored = |node: &str, n: usize| cycles(&reader, node).len() >= n;
    assert!(wait_until(Duration::from_secs(20), || stored("big", 5)
        && stored("tiny", 5)));

    assert!(
        collector.term(Duration::from_secs(10)).success(),
        "collector did not drain and exit cleanly"
    );
    // The agents keep collecting into their spools.
    assert!(
        wait_until(Duration::from_secs(20), || spool_batches(&big.spool).len()
            >= 25),
        "backlog did not build up; log:\n{}",
        big.proc.log_text()
    );
    let tiny_spool = spool_batches(&tiny.spool).len();
    assert!(tiny_spool < 10, "tiny spool holds {tiny_spool} batches");
    assert!(wait_until(Duration::from_secs(10), || tiny
        .proc
        .log_text()
        .contains("spool full")));

    let mut collector = start_collector(&env, port);
    assert!(
        wait_until(Duration::from_secs(30), || spool_batches(&big.spool).len()
            <= 1
            && spool_batches(&tiny.spool).len() <= 1),
        "backlog not delivered; log:\n{}",
        big.proc.log_text()
    );
    std::thread::sleep(Duration::from_millis(800));
    let n_big = stop_agent(&mut big);
    let n_tiny = stop_agent(&mut tiny);
    let reader = Reader::new(&env, port);
    assert_complete_run(&reader, "big", n_big);

    // The tiny spool lost a contiguous run of its oldest unsent batches, and
    // its drop counter says exactly how many.
    let mut got: Vec<u64> = cycles(&reader, "tiny").into_iter().map(|c| c.1).collect();
    got.sort();
    let missing: Vec<u64> = (1..=n_tiny).filter(|c| !got.contains(c)).collect();
    assert!(!missing.is_empty(), "nothing was dropped from a tiny spool");
    assert_eq!(
        missing.last().unwrap() - missing.first().unwrap() + 1,
        missing.len() as u64,
        "dropped batches are not one contiguous run of the oldest: {missing:?}"
    );
    let dropped = reader
        .samples("vitals_agent_spool_dropped_batches_total", "tiny")
        .into_iter()
        .map(|(_, v)| v as u64)
        .max()
        .unwrap();
    // The counter counts batches dropped from the spool. A batch in flight
    // when the collector stopped can be stored while its ack is lost; if the
    // spool later drops it, the counter counts one batch that is not missing.
    // So the counter never says less than what is missing, and at most the
    // few batches in flight at the stop more.
    let missing_n = missing.len() as u64;
    assert!(
        dropped >= missing_n && dropped <= missing_n + 2,
        "drop counter {dropped} vs {missing_n} batches missing"
    );
    assert_eq!(Reader::duplicates(&reader.node_series("tiny")), 0);
    assert!(collector.term(Duration::from_secs(10)).success());
}

#[test]
fn agent_sigkill_then_restart_sends_its_unacked_spool() {
    let env = Env::new();
    env.issue("k1", "agent", &[]);
    let port = free_port();
    // No collector yet: everything stays unacked in the spool.
    let mut agent = start_agent(&env, "k1", port, &opts(&env, "k1"));
    assert!(wait_until(Duration::from_secs(20), || spool_batches(
        &agent.spool
    )
    .len()
        >= 10));
    agent.proc.kill();
    let before = spool_batches(&agent.spool);
    assert!(before.len() >= 10);

    let mut collector = start_collector(&env, port);
    let mut agent = restart_agent(&agent.config);
    let reader = Reader::new(&env, port);
    let delivered = || {
        let all = reader.node_series("k1");
        before
            .iter()
            .all(|(_, b)| Reader::samples_at(&all, b.timestamps_ms[0]) > 0)
    };
    assert!(
        wait_until(Duration::from_secs(30), delivered),
        "spool of the killed agent not delivered; log:\n{}",
        agent.proc.log_text()
    );
    let n2 = stop_agent(&mut agent);

    // Every sample of every batch that was in the spool at the kill is stored
    // exactly once, with its value.
    let all = reader.node_series("k1");
    for (seq, b) in &before {
        for i in 0..b.values.len() {
            let def = b.series.iter().find(|d| d.id == b.series_ids[i]).unwrap();
            let want: BTreeMap<String, String> = def
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            let ts = b.timestamps_ms[i];
            let found: Vec<f64> = all
                .iter()
                .filter(|s| s.name == def.name && labels(s) == want)
                .flat_map(|s| {
                    s.points
                        .iter()
                        .filter(|p| p.timestamp_ms == ts)
                        .map(|p| p.value)
                })
                .collect();
            assert_eq!(found.len(), 1, "batch {seq}: {} {want:?} at {ts}", def.name);
            let v = b.values[i];
            assert!(
                found[0] == v || (found[0].is_nan() && v.is_nan()),
                "{} at {ts}",
                def.name
            );
        }
    }
    // Both runs are complete: the first up to the kill, the second to the stop.
    let values: Vec<u64> = cycles(&reader, "k1").into_iter().map(|c| c.1).collect();
    let restart = values
        .iter()
        .skip(1)
        .position(|v| *v == 1)
        .map(|p| p + 1)
        .unwrap();
    let first_run: Vec<u64> = (1..=restart as u64).collect();
    let second_run: Vec<u64> = (1..=n2).collect();
    assert_eq!(values[..restart], first_run[..]);
    assert_eq!(values[restart..], second_run[..]);
    assert!(restart >= before.len());
    assert_eq!(Reader::duplicates(&all), 0);
    assert!(collector.term(Duration::from_secs(10)).success());
}

#[test]
fn malformed_config_names_file_line_and_key_and_exits_2() {
    let env = Env::new();
    let bad_agent = env.path().join("agent.toml");
    std::fs::write(
        &bad_agent,
        "collector = \"https://127.0.0.1:1\"\n\n[spool]\nmax_bytes = \"lots\"\n",
    )
    .unwrap();
    let unknown = env.path().join("agent2.toml");
    std::fs::write(
        &unknown,
        "collector = \"https://127.0.0.1:1\"\nintreval = \"5s\"\n",
    )
    .unwrap();
    let bad_collector = env.path().join("collector.toml");
    std::fs::write(
        &bad_collector,
        "listen = \"127.0.0.1:7443\"\n[storage]\npath = 5\n",
    )
    .unwrap();
    let syntax = env.path().join("collector2.toml");
    std::fs::write(&syntax, "listen = \"127.0.0.1:7443\"\nshutdown_grace = \n").unwrap();

    let cases: [(&str, &[&str], &Path, &str, &str); 6] = [
        (
            "vitals-agent",
            &["check-config"],
            &bad_agent,
            ":4:",
            "spool.max_bytes",
        ),
        ("vitals-agent", &[], &bad_agent, ":4:", "spool.max_bytes"),
        (
            "vitals-agent",
            &["check-config"],
            &unknown,
            ":2:",
            "intreval",
        ),
        (
            "vitals-collector",
            &["check-config"],
            &bad_collector,
            ":3:",
            "storage.path",
        ),
        (
            "vitals-collector",
            &[],
            &bad_collector,
            ":3:",
            "storage.path",
        ),
        (
            "vitals-collector",
            &["check-config"],
            &syntax,
            ":2:",
            "shutdown_grace",
        ),
    ];
    for (program, sub, file, line, key) in cases {
        let out = Command::new(bin(program))
            .args(sub)
            .arg("--config")
            .arg(file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{program} {sub:?}: {err}");
        let file_line = format!("{}{line}", file.display());
        assert!(
            err.contains(&file_line),
            "{program}: no {file_line} in: {err}"
        );
        assert!(err.contains(key), "{program}: no key {key} in: {err}");
    }
    // A missing config file is also a config error.
    let out = Command::new(bin("vitals-agent"))
        .args(["check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

#[test]
fn dev_mode_serves_this_hosts_samples_and_keeps_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vitals-dev");
    let start = || {
        Proc::spawn_cmd(
            Command::new(bin("vitals")).args(["dev", "--dir", dir.to_str().unwrap()]),
            &tmp.path().join("dev.log"),
        )
    };
    let mut dev = start();
    let cli = dir.join("cli.toml");
    let query = || {
        Command::new(bin("vitals"))
            .args([
                "--config",
                cli.to_str().unwrap(),
                "query",
                "node_load1",
                "--json",
            ])
            .output()
            .unwrap()
    };
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(15), || {
        if !cli.exists() {
            return false;
        }
        let out = query();
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.status.success() && {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            v["series"][0]["points"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
        }
    });
    assert!(
        ok,
        "no node_load1 samples within 15 s: {last}\nlog:\n{}",
        dev.log_text()
    );
    let v: serde_json::Value = serde_json::from_slice(&query().stdout).unwrap();
    let s = &v["series"][0];
    assert_eq!(s["name"], "node_load1");
    assert!(s["labels"]["node"].as_str().is_some_and(|n| !n.is_empty()));
    assert!(s["points"][0][0].as_i64().is_some() && s["points"][0][1].as_f64().is_some());
    let nodes = Command::new(bin("vitals"))
        .args(["--config", cli.to_str().unwrap(), "nodes", "--json"])
        .output()
        .unwrap();
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(nodes["nodes"][0]["connected"], true);
    assert!(
        dev.log_text().contains("--config"),
        "dev did not print how to query"
    );

    let st = dev.term(Duration::from_secs(20));
    assert!(st.success(), "dev exit {st:?}; log:\n{}", dev.log_text());

    // A second run keeps edited configs and existing certificates.
    let agent_toml = dir.join("agent.toml");
    let edited = std::fs::read_to_string(&agent_toml)
        .unwrap()
        .replace("interval = \"5s\"", "interval = \"1s\"");
    std::fs::write(&agent_toml, &edited).unwrap();
    let ca_before = std::fs::read(dir.join("certs/ca.pem")).unwrap();
    let mut dev = start();
    assert!(wait_until(Duration::from_secs(15), || dev
        .log_text()
        .matches("agent started")
        .count()
        >= 2));
    assert!(
        dev.log_text().contains("interval=1s"),
        "edited interval not used:\n{}",
        dev.log_text()
    );
    assert_eq!(std::fs::read(dir.join("certs/ca.pem")).unwrap(), ca_before);
    assert_eq!(std::fs::read_to_string(&agent_toml).unwrap(), edited);
    let st = dev.term(Duration::from_secs(20));
    assert!(st.success());

    // The files work with the daemons as they are.
    for (program, file) in [
        ("vitals-collector", "collector.toml"),
        ("vitals-agent", "agent.toml"),
    ] {
        let out = Command::new(bin(program))
            .args(["check-config", "--config", dir.join(file).to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn collector_sigkill_under_load_loses_no_acked_sample() {
    let env = Env::new();
    env.issue("load-1", "agent", &[]);
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let (cert, key) = env.cert("load-1");
    const SERIES: u32 = 500;
    let t0 = 1_700_000_000_000i64;
    let value = |k: i64, i: u32| (k * 7 + i as i64) as f64 * 0.25;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = env.ca();
    // One client streams numbered batches as fast as acks come, eight in
    // flight, and records every acknowledged batch until the stream breaks.
    let sender = rt.spawn(async move {
        let ch = channel(port, &ca, Some((&cert, &key))).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node: "load-1".into(),
                agent_version: "test".into(),
                instance_id: "load".into(),
            })),
        })
        .await
        .unwrap();
        let mut resp = IngestClient::new(ch)
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut acked: Vec<u64> = Vec::new();
        let mut sent = 0u64;
        let mut inflight = 0usize;
        loop {
            while inflight < 8 && sent < 100_000 {
                sent += 1;
                let k = sent as i64;
                let batch = Batch {
                    seq: sent,
                    series: if sent == 1 {
                        (0..SERIES)
                            .map(|i| SeriesDef {
                                id: i,
                                name: "load_metric".into(),
                                labels: vec![Label {
                                    name: "idx".into(),
                                    value: i.to_string(),
                                }],
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    series_ids: (0..SERIES).collect(),
                    timestamps_ms: vec![t0 + k * 1000; SERIES as usize],
                    values: (0..SERIES).map(|i| value(k, i)).collect(),
                    events: vec![],
                };
                let msg = AgentMessage {
                    msg: Some(agent_message::Msg::Batch(batch)),
                };
                if tx.send(msg).await.is_err() {
                    return acked;
                }
                inflight += 1;
            }
            match resp.next().await {
                Some(Ok(m)) => {
                    if let Some(collector_message::Msg::Ack(a)) = m.msg {
                        while acked.last().copied().unwrap_or(0) < a.seq {
                            acked.push(acked.last().copied().unwrap_or(0) + 1);
                            inflight -= 1;
                        }
                    }
                }
                _ => return acked,
            }
        }
    });
    std::thread::sleep(Duration::from_millis(2500));
    collector.kill();
    let acked = rt.block_on(sender).unwrap();
    assert!(
        acked.len() >= 20,
        "only {} batches acked before the kill",
        acked.len()
    );

    let mut collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);
    let all = reader.node_series("load-1");
    assert_eq!(all.len(), SERIES as usize);
    let mut checked = 0usize;
    for s in &all {
        let i: u32 = labels(s)["idx"].parse().unwrap();
        let got: HashMap<i64, f64> = s.points.iter().map(|p| (p.timestamp_ms, p.value)).collect();
        assert_eq!(
            got.len(),
            s.points.len(),
            "duplicate timestamps in series {i}"
        );
        for seq in &acked {
            let k = *seq as i64;
            assert_eq!(
                got.get(&(t0 + k * 1000)),
                Some(&value(k, i)),
                "acked batch {seq}: sample of series {i} lost"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, acked.len() * SERIES as usize);
    assert!(collector.term(Duration::from_secs(10)).success());
}

/// `vitals bench ingest --collector URL`: simulated agents against a
/// collector the bench did not start; every sample it counts as acked is
/// stored once, and still there after a restart (the head flushed in its
/// compact form at shutdown and read back).
#[test]
fn bench_ingest_drives_a_running_collector_and_every_acked_sample_is_stored() {
    let env = Env::new();
    let port = free_port();
    let mut collector = start_collector(&env, port);
    let url = format!("https://127.0.0.1:{port}");
    let pid = collector.child.id().to_string();
    let certs = env.certs();
    let out = env.vitals_ok(&[
        "bench",
        "ingest",
        "--collector",
        &url,
        "--ca-dir",
        certs.to_str().unwrap(),
        "--collector-pid",
        &pid,
        "--agents",
        "3",
        "--series-per-agent",
        "40",
        "--seconds",
        "2",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let acked = r["acked_samples"].as_u64().unwrap();
    assert!(acked >= 3 * 40 * 5, "only {acked} samples acked: {r}");
    assert!(r["samples_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["bytes_per_sample"].is_null(), "disk not measured: {r}");
    // The operator's CA directory gained no bench certificates.
    assert!(!certs.join("bench-0000.pem").exists());

    let check = |when: &str| {
        let reader = Reader::new(&env, port);
        let mut stored = 0u64;
        for a in 0..3 {
            let series = reader.node_series(&format!("bench-{a:04}"));
            assert_eq!(series.len(), 40, "{when}: series of agent {a}");
            assert_eq!(Reader::duplicates(&series), 0, "{when}");
            let n = series[0].points.len();
            for s in &series {
                // One point per simulated second, the same ticks for all.
                assert_eq!(s.points.len(), n, "{when}: {}", s.name);
                assert!(
                    s.points
                        .windows(2)
                        .all(|w| w[1].timestamp_ms - w[0].timestamp_ms == 1000)
                );
                assert_eq!(s.points[0].timestamp_ms, series[0].points[0].timestamp_ms);
            }
            stored += series.iter().map(|s| s.points.len() as u64).sum::<u64>();
        }
        assert_eq!(stored, acked, "{when}: stored samples against acked");
    };
    check("running");
    collector.term(Duration::from_secs(30));
    let _collector = start_collector(&env, port);
    check("after a restart");
}

/// The child processes of `pid` (from every thread's `children` list).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            list.split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    out
}

/// Kills a process (if it still runs) when dropped.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if running(self.0) {
            let pid = nix::unistd::Pid::from_raw(self.0 as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// SIGTERM ends each bench that starts its own collector early and stops
/// that collector (the signal's default action would leave it running):
/// `fleet` reports what it measured so far and exits 0, `ingest` and
/// `query` fail saying they were interrupted; none leaves its scratch
/// directory behind.
#[test]
fn benches_ended_by_sigterm_stop_their_collector() {
    let env = Env::new();
    let runs: [(&str, &[&str]); 3] = [
        (
            "fleet",
            &[
                "--agents",
                "3",
                "--series-per-agent",
                "10",
                "--interval",
                "1s",
                "--seconds",
                "300",
            ],
        ),
        (
            "ingest",
            &[
                "--agents",
                "2",
                "--series-per-agent",
                "10",
                "--seconds",
                "300",
            ],
        ),
        (
            "query",
            &[
                "--nodes", "1", "--gpus", "2", "--hours", "1", "--runs", "1000000",
            ],
        ),
    ];
    for (name, args) in runs {
        let tmp = env.path().join(format!("tmp-{name}"));
        std::fs::create_dir_all(&tmp).unwrap();
        let log = env.path().join(format!("bench-{name}.log"));
        let mut cmd = std::process::Command::new(bin("vitals"));
        cmd.args(["bench", name]).args(args).env("TMPDIR", &tmp);
        let mut bench = Proc::spawn_cmd(&mut cmd, &log);
        let mut collector = None;
        assert!(
            wait_until(Duration::from_secs(120), || {
                collector = children(bench.child.id()).into_iter().find(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/cmdline"))
                        .is_ok_and(|l| l.contains("vitals-collector"))
                });
                collector.is_some()
            }),
            "{name}: no collector started; log:\n{}",
            bench.log_text()
        );
        let collector = collector.unwrap();
        // Should the test fail, the collector does not outlive it.
        let _guard = KillOnDrop(collector);
        // Under way: the collector listens and the bench talks to it.
        std::thread::sleep(Duration::from_secs(3));
        let status = bench.term(Duration::from_secs(30));
        let text = bench.log_text();
        assert!(
            wait_until(Duration::from_secs(10), || !running(collector)),
            "{name}: its collector (pid {collector}) still runs; log:\n{text}"
        );
        if name == "fleet" {
            assert!(status.success(), "{name}: {status}; log:\n{text}");
            assert!(text.contains("interrupted after"), "{text}");
            assert!(
                text.contains("acked samples:"),
                "the figures so far: {text}"
            );
        } else {
            assert!(!status.success(), "{name}: {status}; log:\n{text}");
            assert!(text.contains("interrupted"), "{text}");
        }
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{name} left {left:?}");
    }
}

/// Recorded kernel log records (the kmsg source's `path`) through a real
/// agent and collector: the kernel events arrive with their classes,
/// severities and labels (the NVIDIA Xid number, the OOM victim's SLURM
/// job), the per-class counters are stored, and a restarted agent sends
/// none of them again.
#[test]
fn kernel_events_from_recorded_kmsg_arrive_once_with_their_labels() {
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    let port = free_port();
    let _collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);
    let recorded =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/data/kmsg/train-01.kmsg");
    let cfg = agent_config(
        &env,
        "train-01",
        port,
        &opts(&env, "train-01"),
        &format!("[sources.kmsg]\npath = {recorded:?}\nstart = \"beginning\"\nmax_lines = 4\n"),
    );
    let mut agent = restart_agent(&cfg);
    let cli = env.cli_config(port);
    let events = || -> Vec<serde_json::Value> {
        let out = env.vitals_ok(&[
            "--config",
            cli.to_str().unwrap(),
            "events",
            "--kind",
            "kernel",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["events"].as_array().unwrap().clone()
    };
    assert!(
        wait_until(Duration::from_secs(30), || events().len() >= 15),
        "{:?}\n{}",
        events(),
        agent.proc.log_text()
    );
    let ev = events();
    assert_eq!(ev.len(), 15);
    let class = |c: &str| -> Vec<&serde_json::Value> {
        ev.iter().filter(|e| e["labels"]["class"] == c).collect()
    };
    let xid = class("nvidia_xid");
    assert_eq!(xid.len(), 1);
    assert_eq!(xid[0]["labels"]["xid"], "79");
    assert_eq!(xid[0]["severity"], "critical");
    assert_eq!(xid[0]["node"], "train-01");
    let oom = class("oom_kill");
    assert_eq!(oom.len(), 2);
    assert!(
        oom.iter()
            .any(|e| e["labels"]["pid"] == "7788" && e["labels"]["job_id"] == "4242"),
        "{oom:?}"
    );
    let nfs = class("nfs_not_responding");
    assert_eq!(nfs.len(), 2);
    assert!(
        nfs.iter()
            .all(|e| e["labels"]["server"] == "nas-01" && e["severity"] == "warning")
    );
    let counter = |c: &str| {
        reader.series(
            "vitals_kernel_events_total",
            &[
                ("class", MatchOp::Equal, c),
                ("node", MatchOp::Equal, "train-01"),
            ],
        )
    };
    assert!(wait_until(Duration::from_secs(10), || counter("oom_kill")
        .first()
        .and_then(|s| s.points.last())
        .is_some_and(|p| p.value == 2.0)));

    // A restart reads on from the kept position: nothing again.
    stop_agent(&mut agent);
    let mut agent = restart_agent(&cfg);
    let before = reader
        .samples("vitals_agent_cycles_total", "train-01")
        .len();
    assert!(wait_until(Duration::from_secs(20), || {
        reader
            .samples("vitals_agent_cycles_total", "train-01")
            .len()
            >= before + 5
    }));
    assert_eq!(events().len(), 15, "a restart replayed kernel events");
    stop_agent(&mut agent);
}
