//! Inference endpoint probes end to end: an agent probes a real HTTP model
//! server on 127.0.0.1 (tests/src/model.rs) and ships to a real collector
//! over mTLS, whose built-in probe rules (with short `for`) fire, run the
//! configured rollback action once, and resolve.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use vitals_e2e::model::{Behaviour, ModelServer};
use vitals_e2e::*;
use vitals_proto::v1::MatchOp;

const NODE: &str = "probe-01";
const SECRET: &str = "sk-test-9f8e7d6c5b4a-never-print-me";

/// The built-in probe rules as shipped, with `for` shortened to 2s.
fn probe_rules() -> String {
    builtin_rules("Probe", 6, "2s")
}

struct Setup {
    env: Env,
    cli: std::path::PathBuf,
    reader: Reader,
}

impl Setup {
    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.text(args)).unwrap()
    }
    fn text(&self, args: &[&str]) -> String {
        let mut all = vec!["--config", self.cli.to_str().unwrap()];
        all.extend_from_slice(args);
        self.env.vitals_ok(&all)
    }
    fn alerts(&self) -> Vec<serde_json::Value> {
        self.json(&["alerts", "--all", "--json"])["alerts"]
            .as_array()
            .unwrap()
            .clone()
    }
    fn alert(&self, rule: &str, state: &str) -> Option<serde_json::Value> {
        self.alerts()
            .into_iter()
            .find(|a| a["rule"] == rule && a["state"] == state)
    }
    fn last(&self, metric: &str, m: &[(&str, MatchOp, &str)]) -> Option<f64> {
        self.reader
            .series(metric, m)
            .first()
            .and_then(|s| s.points.last())
            .map(|p| p.value)
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn probes_measure_endpoints_and_slo_alerts_run_the_rollback_once_and_resolve() {
    let env = Env::new();
    env.issue(NODE, "agent", &[]);
    let model = ModelServer::start();
    let marker = env.path().join("rollback.marker");
    let secret_file = env.path().join("model.key");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    // A port nothing listens on: connection refused.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };

    std::fs::create_dir_all(env.path().join("collector")).unwrap();
    std::fs::write(env.path().join("collector/rules.toml"), probe_rules()).unwrap();
    let port = free_port();
    let rollback = format!(
        "echo \"$VITALS_ALERT_NAME {{{{endpoint}}}} {{{{deployment}}}}\" >> {}; echo switched traffic to green",
        marker.display()
    );
    let mut collector = start_collector_with(
        &env,
        port,
        &format!(
            "[alerting]\neval_interval = \"500ms\"\nkeep_firing_for = \"1s\"\nrule_files = [\"rules.toml\"]\n\
             [alerting.actions.rollback]\ncommand = [\"/bin/sh\", \"-c\", {rollback:?}]\nrules = [\"ProbeLatencyAboveSlo\"]\ncooldown = \"1h\"\ntimeout = \"10s\"\n"
        ),
    );
    let s = Setup {
        cli: env.cli_config(port),
        reader: Reader::new(&env, port),
        env,
    };
    // An https endpoint with this test's CA, and the same one with the
    // system's roots (which do not know the test CA): a TLS failure.
    let (cert, key) = s.env.cert("collector");
    let tls_server = vitals_e2e::receivers::WebhookReceiver::start_tls(0, &cert, &key);
    let probe = format!(
        r#"
[[sources.probe.endpoints]]
name = "tls-ok"
url = "{tls_url}"
interval = "250ms"
ca_file = {ca:?}

[[sources.probe.endpoints]]
name = "tls-untrusted"
url = "{tls_url}"
interval = "250ms"
[[sources.probe.endpoints]]
name = "sentiment"
url = "{url}"
interval = "250ms"
timeout = "2s"
concurrency = 2
secret_file = {secret_file:?}
secret_prefix = "Bearer "
slo_latency = "400ms"
slo_correct_ratio = 0.9
labels = {{ model = "sentiment-v3", deployment = "blue" }}

[[sources.probe.endpoints.golden]]
id = "good-review"
body = '{{"text": "a good film"}}'
path = "label"
expect = "positive"

[[sources.probe.endpoints.golden]]
id = "bad-review"
body = '{{"text": "a bad film"}}'
path = "label"
expect = "negative"

[[sources.probe.endpoints]]
name = "refused"
url = "http://127.0.0.1:{closed}/score"
interval = "250ms"
timeout = "1s"
labels = {{ model = "none" }}

[[sources.probe.endpoints]]
name = "keyless"
url = "{url}"
interval = "250ms"
secret_env = "VITALS_TEST_UNSET_PROBE_KEY"
"#,
        url = model.url(),
        tls_url = tls_server.url(),
        ca = s.env.ca(),
    );
    let opts = AgentOpts {
        cert: s.env.cert(NODE),
        ca: None,
        node: None,
        interval: "500ms",
        spool_max_bytes: 64 << 20,
    };
    let mut agent = restart_agent(&agent_config(&s.env, NODE, port, &opts, &probe));
    let sentiment = [("endpoint", MatchOp::Equal, "sentiment")];

    // Healthy: every golden input right, latency measured, key sent.
    assert!(
        wait_until(Duration::from_secs(30), || {
            s.last("vitals_probe_correct_ratio", &sentiment) == Some(1.0)
                && s.last(
                    "vitals_probe_latency_seconds",
                    &[
                        ("endpoint", MatchOp::Equal, "sentiment"),
                        ("quantile", MatchOp::Equal, "0.99"),
                    ],
                )
                .is_some()
        }),
        "healthy probe series arrive; agent log:\n{}",
        agent.proc.log_text()
    );
    assert_eq!(
        model.authorization().as_deref(),
        Some(format!("Bearer {SECRET}").as_str()),
        "the secret from the file is sent"
    );
    let info = s.reader.series("vitals_probe_info", &sentiment);
    let l = labels(&info[0]);
    assert_eq!(
        (
            l["model"].as_str(),
            l["deployment"].as_str(),
            l["method"].as_str()
        ),
        ("sentiment-v3", "blue", "POST")
    );
    assert_eq!(
        s.last("vitals_probe_slo_latency_seconds", &sentiment),
        Some(0.4)
    );
    let p = s.json(&["probes", "--json"]);
    let row = p["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["endpoint"] == "sentiment")
        .unwrap()
        .clone();
    assert_eq!(row["node"], NODE);
    assert_eq!(row["correct_ratio"], 1.0);
    assert_eq!(row["up"], true);
    assert!(row["p50_seconds"].as_f64().unwrap() < 0.4, "{row}");
    assert!(s.alert("ProbeLatencyAboveSlo", "firing").is_none());
    assert!(lines(&marker).is_empty(), "no rollback while healthy");

    // https: the configured CA is trusted, the system's roots are not enough.
    assert!(
        wait_until(Duration::from_secs(20), || {
            s.last(
                "vitals_probe_responses_total",
                &[
                    ("endpoint", MatchOp::Equal, "tls-ok"),
                    ("code", MatchOp::Equal, "200"),
                ],
            )
            .is_some_and(|n| n >= 2.0)
        }),
        "https with ca_file answers"
    );
    assert!(tls_server.received().iter().all(|r| r.method == "GET"));

    // Connection refused and a missing key are counted, not crashes.
    let errors = |ep: &str, kind: &str| {
        s.last(
            "vitals_probe_errors_total",
            &[
                ("endpoint", MatchOp::Equal, ep),
                ("kind", MatchOp::Equal, kind),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(
        wait_until(Duration::from_secs(20), || errors("refused", "connect")
            >= 3.0
            && errors("keyless", "secret") >= 3.0
            && errors("tls-untrusted", "tls") >= 3.0),
        "connect, secret and TLS failures counted"
    );
    assert_eq!(errors("tls-ok", "tls"), 0.0);
    assert!(
        wait_until(Duration::from_secs(20), || s.alerts().iter().any(
            |a| a["rule"] == "ProbeEndpointDown"
                && a["state"] == "firing"
                && a["labels"]["endpoint"] == "refused"
        )),
        "an endpoint that refuses every connection is down; alerts {:?}\nerror ratio {:?}\ncollector log:\n{}",
        s.alerts(),
        s.reader.series("vitals_probe_error_ratio", &[]),
        collector.log_text()
    );

    // Slow: p99 above the 400ms SLO → the alert fires, the rollback runs once.
    model.set(Behaviour {
        delay: Duration::from_millis(900),
        ..Default::default()
    });
    assert!(
        wait_until(Duration::from_secs(30), || s
            .alert("ProbeLatencyAboveSlo", "firing")
            .is_some()),
        "latency over the SLO fires; alerts: {:?}",
        s.alerts()
    );
    let a = s.alert("ProbeLatencyAboveSlo", "firing").unwrap();
    assert_eq!(a["labels"]["endpoint"], "sentiment");
    assert_eq!(a["labels"]["model"], "sentiment-v3");
    assert_eq!(a["labels"]["deployment"], "blue");
    assert_eq!(a["labels"]["team"], "ml");
    assert!(
        wait_until(Duration::from_secs(15), || lines(&marker).len() == 1),
        "the rollback ran; collector log:\n{}",
        collector.log_text()
    );
    assert_eq!(
        lines(&marker),
        vec!["ProbeLatencyAboveSlo sentiment blue".to_string()]
    );
    let runs = || {
        s.json(&["actions", "--json"])["actions"]
            .as_array()
            .unwrap()
            .clone()
    };
    assert!(
        wait_until(Duration::from_secs(15), || runs()
            .first()
            .is_some_and(|r| r["outcome"] == "ok")),
        "the audit record says how it ended: {:?}",
        runs()
    );
    let r = &runs()[0];
    assert_eq!(r["action"], "rollback");
    assert_eq!(r["rule"], "ProbeLatencyAboveSlo");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["dry_run"], false);
    assert_eq!(r["fingerprint"], a["fingerprint"]);
    assert!(r["what"].as_str().unwrap().contains("/bin/sh -c"), "{r}");
    assert!(
        r["who"].as_str().unwrap().contains("ProbeLatencyAboveSlo"),
        "{r}"
    );
    assert!(
        r["output"]
            .as_str()
            .unwrap()
            .contains("switched traffic to green"),
        "{r}"
    );
    assert!(r["ended_ms"].as_i64().unwrap() >= r["started_ms"].as_i64().unwrap());
    // Still firing over more evaluations: still one run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lines(&marker).len(), 1, "one run per alert");
    assert_eq!(runs().len(), 1);
    let table = s.text(&["actions"]);
    assert!(
        table.contains("rollback") && table.contains("ok"),
        "{table}"
    );

    // Recovered → resolved, and no further run.
    model.set(Behaviour::default());
    assert!(
        wait_until(Duration::from_secs(30), || s
            .alert("ProbeLatencyAboveSlo", "firing")
            .is_none()
            && s.alert("ProbeLatencyAboveSlo", "resolved").is_some()),
        "the alert resolves once latency is back; alerts: {:?}",
        s.alerts()
    );
    assert_eq!(lines(&marker).len(), 1);

    // Wrong answers on one golden input → correctness alerts naming it.
    model.set(Behaviour {
        wrong_for: Some("bad".into()),
        ..Default::default()
    });
    assert!(
        wait_until(Duration::from_secs(30), || s
            .alert("ProbeWrongAnswer", "firing")
            .is_some()
            && s.alert("ProbeCorrectnessLow", "firing").is_some()),
        "wrong answers fire; alerts: {:?}",
        s.alerts()
    );
    let w = s.alert("ProbeWrongAnswer", "firing").unwrap();
    assert_eq!(w["labels"]["input"], "bad-review");
    assert!(
        w["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("bad-review")
    );
    assert!(
        s.alerts()
            .iter()
            .all(|a| !(a["rule"] == "ProbeWrongAnswer" && a["labels"]["input"] == "good-review")),
        "the right input is not blamed"
    );
    // Each input's own verdict; the cycle's ratio is over the golden answers
    // that cycle saw, so a cycle can hold one round and a half: wait for one
    // that holds exactly one (one right, one wrong).
    for (input, right) in [("good-review", 1.0), ("bad-review", 0.0)] {
        let mut m = sentiment.to_vec();
        m.push(("input", MatchOp::Equal, input));
        assert_eq!(
            s.last("vitals_probe_golden_correct", &m),
            Some(right),
            "{input}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || s
            .last("vitals_probe_correct_ratio", &sentiment)
            == Some(0.5)),
        "correct ratio {:?}",
        s.last("vitals_probe_correct_ratio", &sentiment)
    );
    let ev = s.json(&["events", "--kind", "probe_wrong_answer", "--json"]);
    let e = &ev["events"].as_array().unwrap()[0];
    assert_eq!(e["labels"]["input"], "bad-review");
    assert_eq!(e["labels"]["expected"], "negative");
    assert_eq!(e["labels"]["got"], "positive");
    assert_eq!(e["labels"]["endpoint"], "sentiment");

    // Timeouts: answers slower than the 2s timeout are counted as such.
    let before = errors("sentiment", "timeout");
    model.set(Behaviour {
        delay: Duration::from_millis(2500),
        ..Default::default()
    });
    assert!(
        wait_until(Duration::from_secs(20), || errors("sentiment", "timeout")
            >= before + 2.0),
        "timeouts counted"
    );
    assert!(agent.proc.is_running(), "the agent keeps going");
    model.set(Behaviour::default());

    // The secret appears nowhere: logs, events, alerts, CLI output, series.
    let mut seen = vec![
        ("agent log", agent.proc.log_text()),
        ("collector log", collector.log_text()),
        ("probes", s.text(&["probes", "--json"])),
        ("actions", s.text(&["actions", "--json"])),
        ("alerts", s.text(&["alerts", "--all", "--json"])),
        ("events", s.text(&["events", "--json"])),
        (
            "series",
            s.text(&["series", "{__name__=~\"vitals_probe_.*\"}", "--json"]),
        ),
    ];
    agent.proc.term(Duration::from_secs(10));
    seen.push(("agent log after exit", agent.proc.log_text()));
    for (what, text) in &seen {
        assert!(!text.is_empty() || what.contains("log"), "{what} is empty");
        assert!(!text.contains(SECRET), "the secret leaked into {what}");
        assert!(
            !text.contains("9f8e7d6c5b4a"),
            "part of the secret leaked into {what}"
        );
    }
    assert!(model.requests() > 20);
    collector.term(Duration::from_secs(10));
}

/// Passive inference metrics: a model server's own series pushed with an
/// agent or operator certificate are stored under that name, whole or not
/// at all, and a rule over them fires like any other.
#[test]
fn pushed_inference_metrics_are_stored_whole_and_alert() {
    let env = Env::new();
    env.issue("model-server-1", "agent", &[]);
    std::fs::create_dir_all(env.path().join("collector")).unwrap();
    std::fs::write(
        env.path().join("collector/rules.toml"),
        r#"
[[rules]]
name = "InferenceAccuracyLow"
expr = 'model_accuracy < 0.9'
labels = { team = "analysts" }
summary = "{{model}}: accuracy on labelled feedback {{value}}"
"#,
    )
    .unwrap();
    let port = free_port();
    let mut collector = start_collector_with(
        &env,
        port,
        "[alerting]\neval_interval = \"300ms\"\nrule_files = [\"rules.toml\"]\n",
    );
    let s = Setup {
        cli: env.cli_config(port),
        reader: Reader::new(&env, port),
        env,
    };
    let cli = s.cli.to_str().unwrap().to_string();
    // The operator's CLI: two samples of one series and one of another.
    let now = vitals_common::now_ms();
    let lines = format!(
        "# pushed by an evaluation job\ninference_requests_total{{model=\"sentiment-v3\",code=\"200\"}} 120 {}\ninference_requests_total{{model=\"sentiment-v3\",code=\"200\"}} 180 {}\nmodel_accuracy{{model=\"sentiment-v3\"}} 0.87\n",
        now - 2000,
        now - 1000
    );
    let file = s.env.path().join("samples.prom");
    std::fs::write(&file, &lines).unwrap();
    let out = s.env.vitals_ok(&[
        "--config",
        &cli,
        "push",
        "--file",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["accepted"],
        3
    );
    let stored = s.reader.samples("inference_requests_total", "operator");
    assert_eq!(stored, vec![(now - 2000, 120.0), (now - 1000, 180.0)]);
    assert!(
        wait_until(Duration::from_secs(15), || s
            .alert("InferenceAccuracyLow", "firing")
            .is_some_and(
                |a| a["labels"]["model"] == "sentiment-v3" && a["labels"]["node"] == "operator"
            )),
        "a rule over pushed series fires; alerts: {:?}",
        s.alerts()
    );

    // One bad line refuses the request: nothing of it is stored.
    let out = s.env.vitals(&[
        "--config",
        &cli,
        "push",
        "good_metric 1",
        "model_accuracy{model=\"other\",node=\"someone-else\"} 0.5",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") && err.contains("someone-else"),
        "{err}"
    );
    assert!(s.reader.samples("good_metric", "operator").is_empty());
    let out = s.env.vitals(&["--config", &cli, "push", "broken{ 1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line"));

    // An agent certificate pushes too, under its own name.
    let (cert, key) = s.env.cert("model-server-1");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let accepted = rt.block_on(async {
        let ch = channel(port, &s.env.ca(), Some((&cert, &key)))
            .await
            .unwrap();
        vitals_proto::v1::push_client::PushClient::new(ch)
            .push(vitals_proto::v1::PushRequest {
                samples: vec![vitals_proto::v1::PushedSample {
                    name: "inference_latency_seconds".into(),
                    labels: vec![vitals_proto::v1::Label {
                        name: "quantile".into(),
                        value: "0.99".into(),
                    }],
                    value: 0.412,
                    timestamp_ms: 0,
                }],
            })
            .await
            .map(|r| r.into_inner().accepted)
    });
    assert_eq!(accepted.unwrap(), 1);
    let l = s.reader.series("inference_latency_seconds", &[]);
    assert_eq!(labels(&l[0])["node"], "model-server-1");
    collector.term(Duration::from_secs(10));
}

/// Actions beyond the command: an HTTP request, dry-run, a timeout, the
/// cooldown, and a restart that runs nothing again. Alerts come from
/// pushed samples, so each fires at once.
#[test]
fn alert_actions_post_dry_run_time_out_cool_down_and_survive_a_restart() {
    let env = Env::new();
    std::fs::create_dir_all(env.path().join("collector")).unwrap();
    let hook = vitals_e2e::receivers::WebhookReceiver::start();
    let marker = env.path().join("dry.marker");
    std::fs::write(
        env.path().join("collector/rules.toml"),
        r#"
[[rules]]
name = "HookRule"
expr = 'hook_signal > 0'
action = "notify-deploy"
[[rules]]
name = "DryRule"
expr = 'dry_signal > 0'
action = "drain"
[[rules]]
name = "SlowRule"
expr = 'slow_signal > 0'
action = "slow"
[[rules]]
name = "CoolRule"
expr = 'cool_signal > 0'
action = "once-an-hour"
"#,
    )
    .unwrap();
    let collector_cfg = format!(
        r#"[alerting]
eval_interval = "300ms"
rule_files = ["rules.toml"]
[alerting.actions.notify-deploy]
url = "{hook}"
body = '{{"rollback": "{{{{model}}}}"}}'
[alerting.actions.drain]
command = ["/bin/sh", "-c", "touch {marker}"]
dry_run = true
[alerting.actions.slow]
command = ["/bin/sleep", "30"]
timeout = "500ms"
[alerting.actions.once-an-hour]
command = ["/bin/true"]
cooldown = "1h"
"#,
        hook = hook.url(),
        marker = marker.display()
    );
    let port = free_port();
    let mut collector = start_collector_with(&env, port, &collector_cfg);
    let s = Setup {
        cli: env.cli_config(port),
        reader: Reader::new(&env, port),
        env,
    };
    let cli = s.cli.to_str().unwrap().to_string();
    s.env.vitals_ok(&[
        "--config",
        &cli,
        "push",
        "hook_signal{model=\"sentiment-v3\"} 1",
        "dry_signal 1",
        "slow_signal 1",
        "cool_signal{gpu=\"0\"} 1",
        "cool_signal{gpu=\"1\"} 1",
    ]);
    let runs = || -> Vec<serde_json::Value> {
        s.json(&["actions", "--json"])["actions"]
            .as_array()
            .unwrap()
            .clone()
    };
    let by = |action: &str| -> Vec<serde_json::Value> {
        runs()
            .into_iter()
            .filter(|r| r["action"] == action)
            .collect()
    };
    let settled = || {
        let r = runs();
        r.len() == 5 && r.iter().all(|r| r["outcome"] != "running")
    };
    assert!(
        wait_until(Duration::from_secs(20), settled),
        "five records, none running: {:?}\ncollector log:\n{}",
        runs(),
        collector.log_text()
    );
    // The HTTP action: one POST with the body filled in; 200 → ok.
    let h = &by("notify-deploy")[0];
    assert_eq!(
        (h["outcome"].as_str(), h["exit_code"].as_i64()),
        (Some("ok"), Some(200))
    );
    assert!(
        h["what"]
            .as_str()
            .unwrap()
            .starts_with("POST http://127.0.0.1:")
    );
    let got = hook.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["rollback"], "sentiment-v3");
    // Dry run: recorded with what would run, nothing ran.
    let d = &by("drain")[0];
    assert_eq!(d["outcome"], "dry_run");
    assert_eq!(d["dry_run"], true);
    assert!(d["what"].as_str().unwrap().contains("dry.marker"), "{d}");
    assert!(!marker.exists(), "a dry run runs nothing");
    // Timeout: killed, recorded.
    let t = &by("slow")[0];
    assert_eq!(t["outcome"], "timeout");
    assert!(t["ended_ms"].as_i64().unwrap() - t["started_ms"].as_i64().unwrap() < 10_000);
    // Cooldown: two alerts of one rule, the second within the hour.
    let mut c: Vec<String> = by("once-an-hour")
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    c.sort();
    assert_eq!(c, vec!["cooldown", "ok"]);

    // A restart while all of them still fire: nothing runs again.
    collector.term(Duration::from_secs(10));
    let mut collector = start_collector_with(&s.env, port, &collector_cfg);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        s.alert("HookRule", "firing").is_some(),
        "still firing after the restart"
    );
    assert_eq!(runs().len(), 5, "{:?}", runs());
    assert_eq!(hook.received().len(), 1);
    collector.term(Duration::from_secs(10));
}
