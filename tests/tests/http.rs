//! The collector's Prometheus-compatible HTTP API over real binaries: the
//! same samples go to a collector (ingest, agent certificates) and to
//! Debian's `prometheus` (remote write), the same requests go to both the
//! way Grafana's Prometheus data source sends them, and the JSON answers
//! are compared field by field. Also: who may call it (operator yes,
//! agent 403, no certificate no TLS), plaintext only on loopback,
//! `/metrics` as `promtool check metrics` reads it, and `vitals dev`.
//!
//! A known difference from Prometheus 2.42, kept out of the data on
//! purpose (Prometheus 2 versus the Prometheus 3 semantics this engine
//! follows, docs/QUERY.md): a range `[d]` at `t` is `(t - d, t]` here,
//! `[t - d, t]` in 2.42, so no sample lies on a window edge (samples at
//! 2.5 s past a 15 s tick, evaluation times on whole minutes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vitals_e2e::prometheus::{
    form, promtool_binary, remote_write, request, request_as, start_prometheus, tls_client,
};
use vitals_e2e::receivers::required;
use vitals_e2e::*;
use vitals_proto::v1::{Batch, Label, SeriesDef};

type Labels = Vec<(String, String)>;

struct Written {
    name: &'static str,
    labels: Labels,
    samples: Vec<(i64, f64)>,
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// 30 minutes of samples before `base + 30 min`: a sample every 15 s at
/// 2.5 s past the tick, so no sample sits on a window edge.
fn dataset(base: i64) -> Vec<Written> {
    let at = |k: i64| base + 2_500 + k * 15_000;
    let n = 120;
    vec![
        Written {
            name: "gpu_busy_percent",
            labels: l(&[("node", "train-01"), ("gpu", "0")]),
            samples: (0..n)
                .map(|k| (at(k), ((k * 7) % 101) as f64 + 0.25))
                .collect(),
        },
        Written {
            name: "gpu_busy_percent",
            labels: l(&[("node", "train-01"), ("gpu", "1")]),
            samples: (0..n)
                .map(|k| (at(k), (100 - (k * 3) % 100) as f64))
                .collect(),
        },
        Written {
            name: "gpu_busy_percent",
            labels: l(&[("node", "train-02"), ("gpu", "0")]),
            samples: (0..n / 2)
                .map(|k| (at(2 * k), 50.0 + (k % 5) as f64 / 3.0))
                .collect(),
        },
        // A counter with a reset in the middle.
        Written {
            name: "node_network_receive_bytes_total",
            labels: l(&[("node", "train-01"), ("device", "ib0")]),
            samples: (0..n)
                .map(|k| {
                    let v = if k < 60 {
                        50_000 + 1_000 * k + (k * k) % 7
                    } else {
                        20_000 + 1_200 * (k - 60)
                    };
                    (at(k), v as f64)
                })
                .collect(),
        },
        // Sparse: gaps longer than the 5 minute lookback.
        Written {
            name: "node_load1",
            labels: l(&[("node", "nas-01")]),
            samples: vec![(at(0), 0.5), (at(10), 0.75), (at(60), 1.5), (at(61), 2.0)],
        },
        // Only long before the range the metadata requests ask about: in
        // neither answer with start/end, in both without.
        Written {
            name: "node_boot_time_seconds",
            labels: l(&[("node", "nas-01"), ("boot", "old")]),
            samples: vec![(at(-360), 1.6e9), (at(-340), 1.6e9)],
        },
        Written {
            name: "node_memory_bytes",
            labels: l(&[("node", "nas-01"), ("kind", "used")]),
            samples: (0..n).map(|k| (at(k), 1.5e12 + k as f64 * 1e9)).collect(),
        },
    ]
}

fn write_collector(env: &Env, port: u16, data: &[Written]) {
    for node in ["train-01", "train-02", "nas-01"] {
        let mut b = Batch {
            seq: 1,
            ..Default::default()
        };
        for (id, w) in data
            .iter()
            .filter(|w| w.labels.iter().any(|(k, v)| k == "node" && v == node))
            .enumerate()
        {
            b.series.push(SeriesDef {
                id: id as u32,
                name: w.name.into(),
                labels: w
                    .labels
                    .iter()
                    .map(|(k, v)| Label {
                        name: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            });
            for &(t, v) in &w.samples {
                b.series_ids.push(id as u32);
                b.timestamps_ms.push(t);
                b.values.push(v);
            }
        }
        ingest(env, port, node, "inst-1", vec![b]).expect("batch stored");
    }
}

/// A collector with the HTTP API on TLS, the detector off (its score
/// series would be extra series Prometheus does not have).
fn start(env: &Env) -> (Proc, u16, String) {
    start_with(env, "")
}

/// [`start`] with `extra` TOML at the end of the config.
fn start_with(env: &Env, extra: &str) -> (Proc, u16, String) {
    let port = free_port();
    let http_port = free_port();
    let p = start_collector_with(
        env,
        port,
        &format!("[detect]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n{extra}"),
    );
    let addr = format!("127.0.0.1:{http_port}");
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            &addr
        )
        .is_ok()),
        "no HTTP listener; log:\n{}",
        p.log_text()
    );
    (p, port, addr)
}

fn operator(env: &Env) -> Arc<rustls::ClientConfig> {
    let (c, k) = env.cert("operator");
    tls_client(&env.ca(), Some((&c, &k)))
}

fn json(status_body: (u16, String)) -> (u16, Value) {
    let (s, b) = status_body;
    let v = serde_json::from_str(&b).unwrap_or_else(|e| panic!("not JSON ({e}): {b}"));
    (s, v)
}

/// Values as Prometheus writes them: a string holding a float.
fn value_of(v: &Value, what: &str) -> f64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("{what}: value {v} is not a string"));
    match s {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        _ => s
            .parse()
            .unwrap_or_else(|e| panic!("{what}: {s:?} is not a float: {e}")),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// `[ts, "v"]`: a number and a string holding a float.
fn compare_point(what: &str, ours: &Value, theirs: &Value) {
    let (o, t) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
    assert_eq!(o.len(), 2, "{what}: {ours}");
    assert_eq!(t.len(), 2, "{what}: {theirs}");
    assert!(
        o[0].is_number() && t[0].is_number(),
        "{what}: {ours} / {theirs}"
    );
    assert_eq!(
        o[0].as_f64(),
        t[0].as_f64(),
        "{what}: timestamp {ours} / {theirs}"
    );
    // The same text for the same instant (integral seconds have no fraction).
    assert_eq!(o[0].to_string(), t[0].to_string(), "{what}: timestamp text");
    let (a, b) = (value_of(&o[1], what), value_of(&t[1], what));
    assert!(close(a, b), "{what}: value {a} here, {b} in Prometheus");
}

fn sorted_by_metric(result: &Value) -> Vec<Value> {
    let mut r = result.as_array().unwrap().clone();
    r.sort_by_key(|x| x["metric"].to_string());
    r
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Compares two successful answers field by field.
fn compare(what: &str, ours: &Value, theirs: &Value) {
    assert_eq!(
        theirs["status"], "success",
        "{what}: Prometheus said {theirs}"
    );
    assert_eq!(ours["status"], "success", "{what}: we said {ours}");
    assert_eq!(keys(ours), keys(theirs), "{what}: top-level fields");
    let (od, td) = (&ours["data"], &theirs["data"]);
    if td.is_array() {
        // series, labels, label values: lists, compared as sets.
        let sort = |v: &Value| {
            let mut a: Vec<String> = v
                .as_array()
                .unwrap_or_else(|| panic!("{what}: not a list: {v}"))
                .iter()
                .map(|x| x.to_string())
                .collect();
            a.sort();
            a
        };
        assert_eq!(sort(od), sort(td), "{what}");
        assert!(!td.as_array().unwrap().is_empty(), "{what}: empty in both");
        return;
    }
    assert_eq!(keys(od), keys(td), "{what}: data fields");
    assert_eq!(od["resultType"], td["resultType"], "{what}: resultType");
    match td["resultType"].as_str().unwrap() {
        "scalar" => compare_point(what, &od["result"], &td["result"]),
        kind @ ("vector" | "matrix") => {
            let (o, t) = (
                sorted_by_metric(&od["result"]),
                sorted_by_metric(&td["result"]),
            );
            let metrics = |r: &[Value]| r.iter().map(|x| x["metric"].clone()).collect::<Vec<_>>();
            assert_eq!(metrics(&o), metrics(&t), "{what}: label sets");
            for (a, b) in o.iter().zip(&t) {
                let w = format!("{what} {}", b["metric"]);
                assert_eq!(keys(a), keys(b), "{w}: series fields");
                if kind == "vector" {
                    compare_point(&w, &a["value"], &b["value"]);
                } else {
                    let (av, bv) = (
                        a["values"].as_array().unwrap(),
                        b["values"].as_array().unwrap(),
                    );
                    let ts = |v: &[Value]| v.iter().map(|p| p[0].to_string()).collect::<Vec<_>>();
                    assert_eq!(ts(av), ts(bv), "{w}: timestamps");
                    for (p, q) in av.iter().zip(bv) {
                        compare_point(&w, p, q);
                    }
                }
            }
        }
        other => panic!("{what}: unexpected resultType {other}"),
    }
}

/// Prometheus 2.42 answers label names and values by TSDB block: with
/// `start`/`end` inside its head block (which holds every sample here) it
/// also lists the labels of a series whose samples all lie outside the
/// range (`/api/v1/series` does leave that series out). This API judges
/// each series by its own samples, for the label endpoints too. So the
/// old series' names and values are taken out of Prometheus' answer, and
/// checked to have been in it.
fn only_in_range(theirs: &Value) -> Value {
    let old = ["boot", "node_boot_time_seconds", "old"];
    let mut v = theirs.clone();
    if let Some(list) = v["data"].as_array_mut() {
        list.retain(|x| !x.as_str().is_some_and(|s| old.contains(&s)));
    }
    v
}

const EXPRS: &[&str] = &[
    "gpu_busy_percent",
    "gpu_busy_percent{node=\"train-01\",gpu=~\"0|1\"}",
    "gpu_busy_percent{node!=\"train-01\"}",
    "node_load1",
    "node_memory_bytes",
    "rate(node_network_receive_bytes_total[2m])",
    "increase(node_network_receive_bytes_total[5m])",
    "delta(gpu_busy_percent[5m])",
    "changes(gpu_busy_percent{gpu=\"0\"}[3m])",
    "avg_over_time(gpu_busy_percent[5m])",
    "max_over_time(gpu_busy_percent[2m])",
    "min_over_time(node_load1[10m])",
    "quantile_over_time(0.9, gpu_busy_percent[5m])",
    "sum by (node) (gpu_busy_percent)",
    "avg by (node) (rate(node_network_receive_bytes_total[5m]))",
    "count by (node) (gpu_busy_percent)",
    "max(gpu_busy_percent)",
    "min by (gpu) (gpu_busy_percent)",
    "sum(gpu_busy_percent)",
    "avg by (gpu) (avg_over_time(gpu_busy_percent[5m]))",
    "42",
];

#[test]
fn http_api_answers_as_prometheus_does() {
    let Some(_) = required(
        "http_api_answers_as_prometheus_does",
        "VITALS_TEST_PROMETHEUS",
        vitals_e2e::prometheus::prometheus_binary(),
    ) else {
        return;
    };
    let env = Env::new();
    for n in ["train-01", "train-02", "nas-01"] {
        env.issue(n, "agent", &[]);
    }
    let (_collector, port, ours) = start(&env);
    let (_prom, theirs) = start_prometheus(&env.path().join("prometheus"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let base = now / 60_000 * 60_000 - 40 * 60_000;
    let data = dataset(base);
    write_collector(&env, port, &data);
    let rw: Vec<_> = data
        .iter()
        .map(|w| (w.name, w.labels.as_slice(), w.samples.as_slice()))
        .collect();
    remote_write(&theirs, &rw);
    let tls = operator(&env);

    let secs = |ms: i64| format!("{}", ms / 1000);
    let rfc3339 = |ms: i64| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms as u64))
            .to_string()
    };
    let ask = |method: &str, path: &str, body: Option<&str>| -> ((u16, Value), (u16, Value)) {
        let a = json(request(&ours, Some(&tls), method, path, body).unwrap());
        let b = json(request(&theirs, None, method, path, body).unwrap());
        (a, b)
    };
    let mut compared = 0;
    // Answers with at least one series (an empty one in a node_load1 gap
    // is compared too, but says less).
    let mut nonempty = 0;
    let is_empty = |v: &Value| v["data"]["result"].as_array().is_some_and(|r| r.is_empty());
    // Instant queries at several times (one inside a node_load1 gap), as
    // POST forms with unix seconds, and one GET with RFC 3339.
    for expr in EXPRS {
        for minute in [7, 12, 25, 29] {
            let t = base + minute * 60_000;
            let body = form(&[("query", expr), ("time", &secs(t))]);
            let ((sa, a), (sb, b)) = ask("POST", "/api/v1/query", Some(&body));
            assert_eq!((sa, sb), (200, 200), "{expr} at +{minute}m: {a} / {b}");
            compare(&format!("query {expr} at +{minute}m"), &a, &b);
            nonempty += usize::from(!is_empty(&b));
            compared += 1;
        }
        // Range queries: the whole data set at 1 m, and a window at 30 s
        // with a fractional step given as a duration.
        for (start, end, step) in [
            (base, base + 32 * 60_000, "60".to_string()),
            (base + 5 * 60_000, base + 15 * 60_000, "30s".to_string()),
            (base + 10 * 60_000, base + 11 * 60_000, "7.5".to_string()),
        ] {
            let body = form(&[
                ("query", expr),
                ("start", &secs(start)),
                ("end", &secs(end)),
                ("step", &step),
            ]);
            let ((sa, a), (sb, b)) = ask("POST", "/api/v1/query_range", Some(&body));
            assert_eq!((sa, sb), (200, 200), "range {expr}: {a} / {b}");
            compare(&format!("query_range {expr} step {step}"), &a, &b);
            compared += 1;
            nonempty += usize::from(!is_empty(&b));
        }
    }
    let path = format!(
        "/api/v1/query?query={}&time={}",
        form(&[("", "sum by (node) (gpu_busy_percent)")]).trim_start_matches('='),
        form(&[("", &rfc3339(base + 20 * 60_000 + 500))]).trim_start_matches('=')
    );
    let ((_, a), (_, b)) = ask("GET", &path, None);
    compare("GET query with an RFC 3339 time", &a, &b);
    assert_eq!(
        b["data"]["result"][0]["value"][0].to_string(),
        format!("{}.5", (base + 20 * 60_000) / 1000),
        "a fractional time is written with its fraction"
    );

    // Metadata, as Grafana asks for it (start/end of its time picker).
    let range = [("start", secs(base)), ("end", secs(base + 40 * 60_000))];
    let with_range = |extra: &[(&str, &str)]| {
        let mut v: Vec<(&str, &str)> = extra.to_vec();
        v.extend(range.iter().map(|(k, v)| (*k, v.as_str())));
        form(&v)
    };
    for matchers in [
        vec!["gpu_busy_percent"],
        vec!["{node=\"nas-01\"}", "gpu_busy_percent{gpu=\"1\"}"],
        vec!["{__name__=~\"node_.*\"}"],
    ] {
        let pairs: Vec<(&str, &str)> = matchers.iter().map(|m| ("match[]", *m)).collect();
        let body = with_range(&pairs);
        let ((sa, a), (sb, b)) = ask("POST", "/api/v1/series", Some(&body));
        assert_eq!((sa, sb), (200, 200), "series {matchers:?}: {a} / {b}");
        compare(&format!("series {matchers:?}"), &a, &b);
        let ((_, a), (_, b)) = ask("GET", &format!("/api/v1/series?{body}"), None);
        compare(&format!("GET series {matchers:?}"), &a, &b);
        let ((_, a), (_, b)) = ask("POST", "/api/v1/labels", Some(&body));
        compare(&format!("labels {matchers:?}"), &a, &only_in_range(&b));
        let ((_, a), (_, b)) = ask("GET", &format!("/api/v1/label/node/values?{body}"), None);
        compare(
            &format!("label node values {matchers:?}"),
            &a,
            &only_in_range(&b),
        );
        compared += 4;
    }
    // Without start/end: every series, the old one too.
    for path in [
        "/api/v1/labels",
        "/api/v1/label/__name__/values",
        "/api/v1/label/boot/values",
        "/api/v1/series?match[]=%7Bnode%3D%22nas-01%22%7D",
    ] {
        let ((_, a), (_, b)) = ask("GET", path, None);
        compare(&format!("{path} without a range"), &a, &b);
        let text = a.to_string();
        assert!(
            text.contains("boot") || text.contains("\"old\""),
            "{path}: {a}"
        );
        compared += 1;
    }
    let body = with_range(&[]);
    for path in [
        "/api/v1/labels",
        "/api/v1/label/__name__/values",
        "/api/v1/label/gpu/values",
    ] {
        let ((_, a), (_, b)) = ask("GET", &format!("{path}?{body}"), None);
        compare(path, &a, &only_in_range(&b));
        compared += 1;
    }
    let ((_, a), (_, b)) = ask("POST", "/api/v1/labels", Some(&body));
    compare("POST labels", &a, &only_in_range(&b));
    assert!(
        b["data"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("boot")),
        "Prometheus no longer lists labels of series outside the range: {b}; only_in_range can go"
    );
    let names: Vec<&str> = a["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(names, ["__name__", "device", "gpu", "kind", "node"]);

    // Bad input: the same status and errorType as Prometheus, never a crash.
    let t = secs(base + 20 * 60_000);
    let bad: Vec<(&str, String)> = vec![
        (
            "/api/v1/query",
            form(&[("query", "gpu_busy_percent{"), ("time", &t)]),
        ),
        (
            "/api/v1/query",
            form(&[("query", "nosuchfunction(gpu_busy_percent)"), ("time", &t)]),
        ),
        (
            "/api/v1/query",
            form(&[("query", "gpu_busy_percent"), ("time", "yesterday")]),
        ),
        ("/api/v1/query", form(&[("time", &t)])),
        (
            "/api/v1/query_range",
            form(&[
                ("query", "gpu_busy_percent"),
                ("start", &t),
                ("end", &secs(base)),
                ("step", "60"),
            ]),
        ),
        (
            "/api/v1/query_range",
            form(&[
                ("query", "gpu_busy_percent"),
                ("start", &secs(base)),
                ("end", &t),
                ("step", "0"),
            ]),
        ),
        (
            "/api/v1/query_range",
            form(&[
                ("query", "gpu_busy_percent"),
                ("start", &secs(base)),
                ("end", &t),
                ("step", "1x"),
            ]),
        ),
        (
            "/api/v1/query_range",
            form(&[
                ("query", "gpu_busy_percent"),
                ("start", &secs(base)),
                ("end", &t),
            ]),
        ),
        (
            "/api/v1/query_range",
            form(&[
                ("query", "gpu_busy_percent"),
                ("start", &secs(base)),
                ("end", &t),
                ("step", "0.01"),
            ]),
        ),
        ("/api/v1/series", form(&[("start", &t)])),
        (
            "/api/v1/series",
            form(&[("match[]", "sum(gpu_busy_percent)")]),
        ),
        (
            "/api/v1/series",
            form(&[("match[]", "gpu_busy_percent"), ("start", "then")]),
        ),
        ("/api/v1/label/not-a-label/values", String::new()),
    ];
    for (path, body) in &bad {
        // Prometheus takes label values by GET only.
        let ((sa, a), (sb, b)) = if path.starts_with("/api/v1/label/") {
            ask("GET", path, None)
        } else {
            ask("POST", path, Some(body))
        };
        assert_eq!(sb, 400, "Prometheus on {path} {body}: {b}");
        assert_eq!(sa, sb, "{path} {body}: {a} (Prometheus: {b})");
        assert_eq!(a["status"], "error");
        assert_eq!(a["errorType"], b["errorType"], "{path} {body}: {a} / {b}");
        assert!(a["error"].as_str().is_some_and(|e| !e.is_empty()), "{a}");
        assert_eq!(keys(&a), keys(&b), "{path}: error fields");
    }
    assert!(compared > 100, "only {compared} comparisons");
    assert!(
        nonempty * 10 > compared * 8,
        "only {nonempty} of {compared} answers had series"
    );
}

#[test]
fn http_api_needs_an_operator_certificate_and_serves_metrics() {
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    // A receiver (that nothing is sent to), for the outbox's metrics; one
    // rule, evaluated often, for the rule engine's.
    std::fs::create_dir_all(env.path().join("collector")).unwrap();
    std::fs::write(
        env.path().join("collector/rules.toml"),
        "[[rules]]\nname = \"NeverThere\"\nexpr = \"vitals_no_such_series > 0\"\n",
    )
    .unwrap();
    let (collector, port, addr) = start_with(
        &env,
        "[alerting]\nbuiltin = false\neval_interval = \"200ms\"\nrule_files = [\"rules.toml\"]\ndefault_receivers = [\"hook\"]\n[alerting.receivers.hook]\nwebhook = { url = \"http://127.0.0.1:9/hook\" }\n",
    );
    let data = dataset(1_700_000_000_000);
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        vec![{
            let w = &data[0];
            Batch {
                seq: 1,
                series: vec![SeriesDef {
                    id: 0,
                    name: w.name.into(),
                    labels: w
                        .labels
                        .iter()
                        .map(|(k, v)| Label {
                            name: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                }],
                series_ids: vec![0; w.samples.len()],
                timestamps_ms: w.samples.iter().map(|s| s.0).collect(),
                values: w.samples.iter().map(|s| s.1).collect(),
                ..Default::default()
            }
        }],
    )
    .expect("stored");
    // A batch from another node's certificate is refused and counted.
    let wrong = Batch {
        seq: 2,
        series: vec![SeriesDef {
            id: 0,
            name: "x".into(),
            labels: vec![Label {
                name: "node".into(),
                value: "someone-else".into(),
            }],
        }],
        series_ids: vec![0],
        timestamps_ms: vec![1_700_000_000_000],
        values: vec![1.0],
        ..Default::default()
    };
    assert!(ingest(&env, port, "train-01", "inst-1", vec![wrong]).is_err());

    // Operator: 200.
    let op = operator(&env);
    let (s, v) = json(request(&addr, Some(&op), "POST", "/api/v1/labels", Some("")).unwrap());
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"], serde_json::json!(["__name__", "gpu", "node"]));
    // Agent: 403 in Prometheus' error envelope.
    let (c, k) = env.cert("train-01");
    let agent = tls_client(&env.ca(), Some((&c, &k)));
    for path in [
        "/api/v1/labels",
        "/metrics",
        "/api/v1/query?query=gpu_busy_percent",
    ] {
        let (s, v) = json(request(&addr, Some(&agent), "GET", path, None).unwrap());
        assert_eq!(s, 403, "{path}: {v}");
        assert_eq!(v["status"], "error");
        assert_eq!(v["errorType"], "forbidden");
        assert!(v["error"].as_str().unwrap().contains("operator"), "{v}");
    }
    // No client certificate: the handshake is refused, no HTTP answer.
    let anon = tls_client(&env.ca(), None);
    let r = request(&addr, Some(&anon), "GET", "/api/v1/labels", None);
    assert!(r.is_err(), "answered without a client certificate: {r:?}");
    // Plain HTTP to the TLS port: no HTTP answer either.
    let r = request(&addr, None, "GET", "/api/v1/labels", None);
    assert!(!matches!(r, Ok((200, _))), "plaintext answered: {r:?}");
    // Unknown path and method.
    let (s, v) = json(request(&addr, Some(&op), "GET", "/api/v1/nothing", None).unwrap());
    assert_eq!((s, v["errorType"].as_str()), (404, Some("not_found")));
    let (s, _) = request(&addr, Some(&op), "DELETE", "/api/v1/labels", None).unwrap();
    assert_eq!(s, 405);

    // /metrics: the text format, with the ingest just done in it (and
    // the receiver's target once the dispatcher has registered it).
    let mut text = String::new();
    let registered = wait_until(Duration::from_secs(10), || {
        let (s, t) = request(&addr, Some(&op), "GET", "/metrics", None).unwrap();
        assert_eq!(s, 200, "{t}");
        text = t;
        text.contains("vitals_collector_notifications_delivered_total{receiver=\"hook\"")
            && !text.contains("vitals_collector_rule_evaluations_total 0\n")
            && !text.contains("vitals_collector_rule_evaluations_total 1\n")
    });
    assert!(registered, "no per-target outbox metrics:\n{text}");
    let text = text;
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(value("vitals_collector_ingest_batches_received_total"), 2.0);
    assert_eq!(
        value("vitals_collector_ingest_samples_received_total"),
        121.0
    );
    assert_eq!(value("vitals_collector_ingest_batches_rejected_total"), 1.0);
    assert_eq!(value("vitals_collector_store_series"), 1.0);
    assert_eq!(value("vitals_collector_agents_connected"), 0.0);
    // The detector is off in these collectors: present, and zero.
    assert_eq!(value("vitals_collector_detect_enabled"), 0.0);
    assert_eq!(value("vitals_collector_detect_scored_samples_total"), 0.0);
    assert!(value("vitals_collector_store_disk_bytes") > 0.0);
    assert_eq!(value("vitals_collector_outbox_open"), 0.0);
    assert_eq!(value("vitals_collector_notifications_delivered_total"), 0.0);
    assert!(value("vitals_collector_http_requests_total") >= 4.0);
    assert!(value("vitals_collector_http_request_errors_total") >= 3.0);
    // The rule engine: one rule, healthy, nothing open, evaluating.
    let sample = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    assert_eq!(sample("vitals_collector_rules{state=\"ok\"}"), 1.0);
    assert_eq!(sample("vitals_collector_rules{state=\"failing\"}"), 0.0);
    assert_eq!(sample("vitals_collector_alerts{state=\"firing\"}"), 0.0);
    assert_eq!(sample("vitals_collector_alerts{state=\"pending\"}"), 0.0);
    assert!(value("vitals_collector_rule_evaluations_total") >= 2.0);
    let last = value("vitals_collector_rule_evaluation_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(now - last < 30.0 && last <= now + 1.0, "{last} vs {now}");
    let took = value("vitals_collector_rule_evaluation_duration_seconds");
    assert!(took > 0.0 && took < 5.0, "{took}");
    assert_eq!(
        value("vitals_collector_rule_evaluation_record_failures_total"),
        0.0
    );
    if let Some(promtool) = required(
        "http_api_needs_an_operator_certificate_and_serves_metrics (promtool)",
        "VITALS_TEST_PROMETHEUS",
        promtool_binary(),
    ) {
        use std::io::Write;
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(collector);
}

#[test]
fn plaintext_http_only_on_loopback() {
    let env = Env::new();
    let port = free_port();
    let http_port = free_port();
    // Off loopback: the config is refused, naming file, line and key.
    let mut c = start_collector_with(&env, port, "");
    c.kill();
    let cfg = env.path().join("collector/collector.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let bad = format!("{good}[http]\nlisten = \"0.0.0.0:{http_port}\"\ntls = false\n");
    std::fs::write(&cfg, &bad).unwrap();
    let line = bad.lines().count();
    for sub in [&["check-config"][..], &[][..]] {
        let out = Command::new(bin("vitals-collector"))
            .args(sub)
            .args(["--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub:?}: {err}");
        assert!(
            err.contains(&format!("{}:{line}:1: key `http.tls`", cfg.display())),
            "{sub:?}: {err}"
        );
        assert!(err.contains("loopback"), "{err}");
    }
    // On loopback: plaintext, answered without a certificate.
    let mut c = start_collector_with(
        &env,
        port,
        &format!("[http]\nlisten = \"127.0.0.1:{http_port}\"\ntls = false\n"),
    );
    let addr = format!("127.0.0.1:{http_port}");
    assert!(wait_until(Duration::from_secs(10), || request(
        &addr,
        None,
        "GET",
        "/api/v1/labels",
        None
    )
    .is_ok()));
    let (s, raw) = request(&addr, None, "GET", "/api/v1/labels", None).unwrap();
    // Field order as Prometheus writes it, for clients that read it as text.
    assert!(
        raw.starts_with("{\"status\":\"success\",\"data\":"),
        "{raw}"
    );
    let (s, raw_err) = (
        s,
        request(&addr, None, "GET", "/api/v1/query?time=x", None).unwrap(),
    );
    assert_eq!(raw_err.0, 400, "{raw_err:?}");
    assert!(
        raw_err
            .1
            .starts_with("{\"status\":\"error\",\"errorType\":\"bad_data\",\"error\":"),
        "{raw_err:?}"
    );
    let (s, v) = json((s, raw));
    assert_eq!(
        (s, &v["status"]),
        (200, &serde_json::json!("success")),
        "{v}"
    );
    let (s, v) = json(
        request(
            &addr,
            None,
            "POST",
            "/api/v1/query",
            Some(&form(&[("query", "1.5"), ("time", "1700000000.25")])),
        )
        .unwrap(),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["resultType"], "scalar");
    assert_eq!(
        v["data"]["result"],
        serde_json::json!([1700000000.25, "1.5"])
    );
    assert!(c.log_text().contains("plaintext"), "{}", c.log_text());
    c.term(Duration::from_secs(10));
}

#[test]
fn dev_mode_records_and_serves_the_http_api() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("vitals-dev");
    // Held so that this dev and another test's dev running at the same
    // time do not both pick the preferred ports (7443, 9464): whoever
    // cannot have them takes free ones.
    let _held = [7443, 9464].map(|p| std::net::TcpListener::bind(("127.0.0.1", p)).ok());
    let mut dev = Proc::spawn_cmd(
        Command::new(bin("vitals")).args(["dev", "--dir", dir.to_str().unwrap()]),
        &tmp.path().join("dev.log"),
    );
    let cli = dir.join("cli.toml");
    assert!(
        wait_until(Duration::from_secs(20), || dev
            .log_text()
            .contains("agent started")),
        "{}",
        dev.log_text()
    );
    let cfg: BTreeMap<String, toml::Value> =
        toml::from_str(&std::fs::read_to_string(&cli).unwrap()).unwrap();
    let url = cfg["http"].as_str().unwrap().to_string();
    let addr = url
        .strip_prefix("https://127.0.0.1:")
        .map(|p| format!("127.0.0.1:{p}"));
    let addr = addr.unwrap_or_else(|| panic!("http = {url:?} is not https://127.0.0.1:PORT"));
    assert_ne!(cfg["collector"].as_str().unwrap(), url);
    let tls = tls_client(
        &dir.join("certs/ca.pem"),
        Some((
            &dir.join("certs/operator.pem"),
            &dir.join("certs/operator.key"),
        )),
    );
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(20), || {
        let Ok(r) = request(
            &addr,
            Some(&tls),
            "POST",
            "/api/v1/query",
            Some("query=node_load1"),
        ) else {
            return false;
        };
        last = json(r).1;
        last["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    });
    assert!(
        ok,
        "no node_load1 over the HTTP API: {last}\n{}",
        dev.log_text()
    );
    assert_eq!(
        last["data"]["result"][0]["metric"]["__name__"],
        "node_load1"
    );
    let st = dev.term(Duration::from_secs(20));
    assert!(st.success(), "{}", dev.log_text());
}

/// A SIGHUP's new collector certificate is what new HTTP connections get,
/// as on the gRPC listener (both take the TLS config current at each
/// handshake).
#[test]
fn http_listener_serves_the_certificate_a_reload_brought() {
    let env = Env::new();
    let (collector, _port, addr) = start(&env);
    let op = operator(&env);
    let serves_as = |name: &str| {
        matches!(
            request_as(&addr, Some(&op), name, "GET", "/api/v1/labels", None),
            Ok((200, _))
        )
    };
    assert!(serves_as("localhost"));
    assert!(!serves_as("rotated.test"));
    env.issue(
        "collector-next",
        "collector",
        &["--dns", "rotated.test", "--ip", "127.0.0.1"],
    );
    let (cert, key) = env.cert("collector");
    let (next_cert, next_key) = env.cert("collector-next");
    replace_file(&next_cert, &cert);
    replace_file(&next_key, &key);
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || serves_as("rotated.test")),
        "the new certificate is not served over HTTP; log:\n{}",
        collector.log_text()
    );
    assert!(
        !serves_as("localhost"),
        "the old certificate is still served"
    );
}

/// Every target of every panel of the shipped dashboard, with its title.
fn dashboard_targets(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.is_empty(),
                    "panel {:?} has a target without expr",
                    p["title"]
                );
                out.push((p["title"].as_str().unwrap_or("").to_string(), expr.into()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// What Grafana puts in place of the dashboard's variables: `$node` as
/// "All" (`allValue`) or as a multi-value regex.
fn substitute(expr: &str, node: &str) -> String {
    let out = expr
        .replace("${node}", node)
        .replace("$node", node)
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "1h");
    assert!(!out.contains('$'), "a variable left in {out:?}");
    out
}

#[test]
fn grafana_dashboard_expressions_all_run_on_the_http_api() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/vitals-fleet.json"
    );
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(
        dash["schemaVersion"].as_u64().unwrap() >= 36,
        "schemaVersion"
    );
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).unwrap().clone();
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let node_var = var("node");
    assert_eq!(node_var["allValue"], ".*");
    // Every panel and target reads the data source variable.
    for p in dash["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let targets = dashboard_targets(&dash);
    assert!(targets.len() >= 30, "only {} targets", targets.len());

    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    // A rule the samples below fire, for the alerts panels (ALERTS).
    let (_collector, port, addr) = start_with(
        &env,
        "[alerting]\nbuiltin = false\neval_interval = \"200ms\"\n[[alerting.rules]]\nname = \"GpuBusy\"\nexpr = \"gpu_gfx_activity > 40\"\nseverity = \"warning\"\n",
    );
    // A little of what the panels chart, so some answers are not empty.
    let now = vitals_common::now_ms() / 1000 * 1000;
    let series = [
        ("vitals_agent_cycles_total", vec![], 1.0),
        ("gpu_gfx_activity", vec![("gpu", "0")], 0.0),
        (
            "node_network_receive_bytes_total",
            vec![("device", "ib0")],
            1e6,
        ),
        ("node_zfs_zil_zil_itx_metaslab_slog_bytes", vec![], 65536.0),
    ];
    let mut b = Batch {
        seq: 1,
        ..Default::default()
    };
    for (id, (name, extra, step)) in series.iter().enumerate() {
        let mut labels = vec![Label {
            name: "node".into(),
            value: "train-01".into(),
        }];
        labels.extend(extra.iter().map(|(k, v)| Label {
            name: k.to_string(),
            value: v.to_string(),
        }));
        b.series.push(SeriesDef {
            id: id as u32,
            name: name.to_string(),
            labels,
        });
        for k in 0..60i64 {
            b.series_ids.push(id as u32);
            b.timestamps_ms.push(now - (60 - k) * 15_000);
            b.values
                .push(if *step == 0.0 { 42.0 } else { k as f64 * step });
        }
    }
    ingest(&env, port, "train-01", "inst-1", vec![b]).expect("stored");

    let op = operator(&env);
    // The node variable's query: label_values(METRIC, node).
    let def = node_var["definition"].as_str().unwrap();
    let metric = def
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(", node)"))
        .unwrap();
    let (s, v) = json(
        request(
            &addr,
            Some(&op),
            "GET",
            &format!("/api/v1/label/node/values?{}", form(&[("match[]", metric)])),
            None,
        )
        .unwrap(),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"], serde_json::json!(["train-01"]), "{v}");

    // The rule has fired and been stored as ALERTS.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let (_, v) = json(
                request(
                    &addr,
                    Some(&op),
                    "GET",
                    &format!("/api/v1/query?{}", form(&[("query", "ALERTS")])),
                    None,
                )
                .unwrap(),
            );
            v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        }),
        "no ALERTS series"
    );
    let start = (now / 1000 - 3600).to_string();
    // A step (60 s) past the alert, so the last evaluation sees it.
    let end = (vitals_common::now_ms() / 1000 + 60).to_string();
    let mut failed = Vec::new();
    let mut with_data = Vec::new();
    for node in [".*", "(train-01|nas-01)"] {
        for (title, expr) in &targets {
            let q = substitute(expr, node);
            let body = form(&[
                ("query", &q),
                ("start", &start),
                ("end", &end),
                ("step", "60"),
            ]);
            let (s, v) = json(
                request(&addr, Some(&op), "POST", "/api/v1/query_range", Some(&body)).unwrap(),
            );
            if s != 200 || v["status"] != "success" {
                failed.push(format!("{title}: {q}: {s} {v}"));
            } else if v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                with_data.push(q);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "expressions the engine refused:\n{}",
        failed.join("\n")
    );
    for want in [
        r#"gpu_gfx_activity{node=~".*"}"#,
        r#"avg by (node) (gpu_gfx_activity{node=~"(train-01|nas-01)"})"#,
        r#"sum by (node, device) (rate(node_network_receive_bytes_total{node=~".*"}[1m]))"#,
        r#"sum by (node) (rate(node_zfs_zil_zil_itx_metaslab_slog_bytes{node=~".*"}[1m]))"#,
        r#"ALERTS{alertstate="firing", node=~".*"}"#,
        r#"count by (alertname, severity) (ALERTS{alertstate="firing", node=~"(train-01|nas-01)"})"#,
    ] {
        assert!(
            with_data.iter().any(|q| q == want),
            "no data for {want}: {with_data:?}"
        );
    }
}
