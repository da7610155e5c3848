//! Remote write from a real collector: to Debian's `prometheus` (its
//! remote-write receiver on), through a Prometheus outage and a collector
//! restart, every sample read back with Prometheus's own `query_range`;
//! and to a recording HTTP receiver for what Prometheus cannot be told to
//! answer (400: dropped and counted, not retried; 503 and 429: retried
//! with backoff, then delivered).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use vitals_collector::remote_write::wire;
use vitals_e2e::prometheus::{
    PrometheusTls, form, prometheus_binary, promtool_binary, request, request_as,
    start_prometheus_on, start_prometheus_tls, tls_client,
};
use vitals_e2e::receivers::{WebhookReceiver, required};
use vitals_e2e::*;
use vitals_proto::v1::{Batch, Label, SeriesDef};

/// Series `rw_test_value{node="train-01", k="0".."2"}`, one sample per
/// second: second `s` of series `k` holds `s * 0.1 + k`.
const SERIES: u32 = 3;

/// (timestamp ms, value) in time order.
type Points = Vec<(i64, f64)>;
/// Series by their labels.
type ByLabels = BTreeMap<BTreeMap<String, String>, Points>;
/// How to reach Prometheus: plaintext, or TLS with a client certificate
/// and the name on its certificate.
type Tls<'a> = Option<(&'a Arc<rustls::ClientConfig>, &'a str)>;

fn value_at(k: u32, s: i64) -> f64 {
    s as f64 * 0.1 + f64::from(k)
}

/// One batch per 10 seconds of [from, to) (seconds after `base_ms`),
/// numbered from `seq`.
fn batches(base_ms: i64, from: i64, to: i64, seq: &mut u64) -> Vec<Batch> {
    let mut out = Vec::new();
    let mut s = from;
    while s < to {
        *seq += 1;
        let mut b = Batch {
            seq: *seq,
            ..Default::default()
        };
        for k in 0..SERIES {
            b.series.push(SeriesDef {
                id: k,
                name: "rw_test_value".into(),
                labels: vec![
                    Label {
                        name: "node".into(),
                        value: "train-01".into(),
                    },
                    Label {
                        name: "k".into(),
                        value: k.to_string(),
                    },
                ],
            });
        }
        for t in s..(s + 10).min(to) {
            for k in 0..SERIES {
                b.series_ids.push(k);
                b.timestamps_ms.push(base_ms + t * 1000);
                b.values.push(value_at(k, t));
            }
        }
        out.push(b);
        s += 10;
    }
    out
}

/// The collector's /metrics (plaintext HTTP on loopback).
fn metrics(addr: &str) -> String {
    let (status, text) = request(addr, None, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200, "{text}");
    text
}

/// The value of `name` with (at least) `labels`, if exposed.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every series `rw_test_value` Prometheus returns over [from, to]
/// seconds after `base_ms`, at 1 s steps (the samples lie on the steps, so
/// each step's value is that second's sample): labels -> (ts ms, value).
fn prometheus_series(addr: &str, tls: Tls<'_>, base_ms: i64, from: i64, to: i64) -> ByLabels {
    let start = format!("{}", (base_ms + from * 1000) / 1000);
    let end = format!("{}", (base_ms + to * 1000) / 1000);
    let body = form(&[
        ("query", "rw_test_value"),
        ("start", &start),
        ("end", &end),
        ("step", "1"),
    ]);
    let (status, text) = match tls {
        None => request(addr, None, "POST", "/api/v1/query_range", Some(&body)),
        Some((cfg, name)) => request_as(
            addr,
            Some(cfg),
            name,
            "POST",
            "/api/v1/query_range",
            Some(&body),
        ),
    }
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut out = BTreeMap::new();
    for s in v["data"]["result"].as_array().unwrap() {
        let labels: BTreeMap<String, String> = s["metric"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let points = s["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let t = (p[0].as_f64().unwrap() * 1000.0).round() as i64;
                let v: f64 = p[1].as_str().unwrap().parse().unwrap();
                (t, v)
            })
            .collect();
        out.insert(labels, points);
    }
    out
}

/// What Prometheus must hold for seconds [0, to): every sample, exactly,
/// under the series' labels plus the external label.
fn expected(base_ms: i64, to: i64) -> ByLabels {
    (0..SERIES)
        .map(|k| {
            let labels = [
                ("__name__", "rw_test_value".to_string()),
                ("cluster", "lab".to_string()),
                ("k", k.to_string()),
                ("node", "train-01".to_string()),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b))
            .collect();
            let points = (0..to)
                .map(|s| (base_ms + s * 1000, value_at(k, s)))
                .collect();
            (labels, points)
        })
        .collect()
}

/// Waits until Prometheus holds exactly seconds [0, to) of every series.
fn wait_for_all(prom: &str, tls: Tls<'_>, base_ms: i64, to: i64, collector: &Proc, what: &str) {
    let want = expected(base_ms, to);
    let mut got = BTreeMap::new();
    let ok = wait_until(Duration::from_secs(60), || {
        got = prometheus_series(prom, tls, base_ms, 0, to - 1);
        got == want
    });
    if !ok {
        let summary: Vec<String> = got
            .iter()
            .map(|(l, p)| {
                format!(
                    "{l:?}: {} points, first {:?}, last {:?}",
                    p.len(),
                    p.first(),
                    p.last()
                )
            })
            .collect();
        panic!(
            "{what}: Prometheus does not hold seconds 0..{to} of every series exactly; it has\n{}\ncollector log:\n{}",
            summary.join("\n"),
            collector.log_text()
        );
    }
}

fn collector_config(prom_port: u16, http_port: u16) -> String {
    format!(
        "[http]\nlisten = \"127.0.0.1:{http_port}\"\ntls = false\n\
         [[remote_write]]\nname = \"prom\"\nurl = \"http://127.0.0.1:{prom_port}/api/v1/write\"\n\
         external_labels = {{ cluster = \"lab\" }}\nshards = 2\nmax_samples_per_send = 100\n\
         min_backoff = \"50ms\"\nmax_backoff = \"500ms\"\nsend_anomaly_scores = false\n"
    )
}

#[test]
fn remote_write_reaches_prometheus_through_its_outage_and_a_collector_restart() {
    let Some(_) = required(
        "remote_write_reaches_prometheus_through_its_outage_and_a_collector_restart",
        "VITALS_TEST_PROMETHEUS",
        prometheus_binary(),
    ) else {
        return;
    };
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    let prom_dir = env.path().join("prometheus");
    let prom_port = free_port();
    let (mut prom, paddr) = start_prometheus_on(&prom_dir, prom_port);
    let (port, http_port) = (free_port(), free_port());
    let extra = collector_config(prom_port, http_port);
    let mut collector = start_collector_with(&env, port, &extra);
    let maddr = format!("127.0.0.1:{http_port}");
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&maddr).is_ok()
    }));
    // Whole seconds, 600 s back: every sample is in the past and within
    // the hour before the first one a fresh Prometheus accepts.
    let base_ms = (vitals_common::now_ms() / 1000 - 600) * 1000;
    let mut seq = 0u64;

    // 1. Streaming to a running Prometheus.
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 0, 100, &mut seq),
    )
    .unwrap();
    wait_for_all(
        &paddr,
        None,
        base_ms,
        100,
        &collector,
        "while Prometheus runs",
    );
    let m = metrics(&maddr);
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_sent_total",
            &[("endpoint", "prom")]
        ),
        Some(300.0),
        "{m}"
    );

    // 2. Prometheus killed; samples keep coming; they queue, and arrive
    // once it is back on the same port and data.
    prom.kill();
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 100, 200, &mut seq),
    )
    .unwrap();
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(20), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_requests_total",
                &[("endpoint", "prom"), ("code", "error")],
            )
            .is_some_and(|n| n >= 2.0)
                && metric(
                    &m,
                    "vitals_remote_write_samples_pending",
                    &[("endpoint", "prom")],
                )
                .is_some_and(|n| n >= 300.0)
        }),
        "no failed attempts or no queue while Prometheus is down:\n{m}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let m = metrics(&maddr);
    let lag = metric(
        &m,
        "vitals_remote_write_lag_seconds",
        &[("endpoint", "prom")],
    )
    .unwrap();
    assert!(lag >= 1.0, "lag {lag} while the receiver is down:\n{m}");
    assert!(
        metric(
            &m,
            "vitals_remote_write_samples_retried_total",
            &[("endpoint", "prom")]
        )
        .unwrap()
            >= 100.0,
        "{m}"
    );
    let (p, _) = start_prometheus_on(&prom_dir, prom_port);
    prom = p;
    wait_for_all(
        &paddr,
        None,
        base_ms,
        200,
        &collector,
        "after Prometheus came back",
    );

    // 3. Prometheus down again with a backlog, and the collector stopped
    // (SIGTERM) meanwhile: the new collector resumes from its cursor.
    // (Every request answered first: one in flight when Prometheus dies
    // may have been stored there, and its resend would be refused.)
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_sent_total",
                &[("endpoint", "prom")],
            ) == Some(600.0)
        }),
        "{m}"
    );
    prom.kill();
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 200, 300, &mut seq),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        metric(
            &metrics(&maddr),
            "vitals_remote_write_samples_pending",
            &[("endpoint", "prom")],
        )
        .is_some_and(|n| n >= 300.0)
    }));
    assert!(collector.term(Duration::from_secs(20)).success());
    let (p, _) = start_prometheus_on(&prom_dir, prom_port);
    prom = p;
    collector = start_collector_with(&env, port, &extra);
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&maddr).is_ok()
    }));
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 300, 400, &mut seq),
    )
    .unwrap();
    wait_for_all(
        &paddr,
        None,
        base_ms,
        400,
        &collector,
        "after the collector restarted",
    );
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_pending",
                &[("endpoint", "prom")],
            ) == Some(0.0)
        }),
        "{m}"
    );
    // Nothing was sent twice (Prometheus refuses a repeated older sample
    // as out of order: that would be counted here), nothing lost.
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_dropped_total",
            &[("endpoint", "prom"), ("reason", "refused")]
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_sent_total",
            &[("endpoint", "prom")]
        ),
        Some(600.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_lag_seconds",
            &[("endpoint", "prom")]
        ),
        Some(0.0),
        "{m}"
    );
    let last = metric(
        &m,
        "vitals_remote_write_last_success_timestamp_seconds",
        &[("endpoint", "prom")],
    )
    .unwrap();
    assert!(
        (vitals_common::now_ms() as f64 / 1000.0 - last).abs() < 60.0,
        "{last}"
    );
    assert!(
        !collector.log_text().contains("refused a request"),
        "{}",
        collector.log_text()
    );

    // 4. The collector killed (SIGKILL) with a backlog while Prometheus
    // is down: no drain, no final checkpoint. The WAL rows and the cursor
    // on disk are all the next one needs.
    prom.kill();
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 400, 500, &mut seq),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        metric(
            &metrics(&maddr),
            "vitals_remote_write_samples_pending",
            &[("endpoint", "prom")],
        )
        .is_some_and(|n| n >= 300.0)
    }));
    collector.kill();
    let (p, _) = start_prometheus_on(&prom_dir, prom_port);
    prom = p;
    collector = start_collector_with(&env, port, &extra);
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&maddr).is_ok()
    }));
    wait_for_all(
        &paddr,
        None,
        base_ms,
        500,
        &collector,
        "after the collector was killed",
    );
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_sent_total",
                &[("endpoint", "prom")],
            ) == Some(300.0)
        }),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_dropped_total",
            &[("endpoint", "prom"), ("reason", "refused")]
        ),
        Some(0.0),
        "{m}"
    );

    // The detector scored the series (the collector stores the scores)
    // but send_anomaly_scores = false kept them from Prometheus.
    let reader = Reader::new(&env, port);
    assert!(!reader.series("vitals_anomaly_score", &[]).is_empty());
    let body = form(&[("query", "count({__name__=~\"vitals_anomaly.*\"})")]);
    let (status, text) = request(&paddr, None, "POST", "/api/v1/query", Some(&body)).unwrap();
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["data"]["result"], Value::Array(vec![]), "{text}");

    // The metrics pass promtool.
    if let Some(promtool) = required(
        "remote_write metrics (promtool)",
        "VITALS_TEST_PROMETHEUS",
        promtool_binary(),
    ) {
        promtool_check(&promtool, &metrics(&maddr));
    }
    drop(prom);
}

fn promtool_check(promtool: &std::path::Path, text: &str) {
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

/// (timestamp, value) of every sample in a request body, by series labels.
fn decoded(body: &[u8]) -> BTreeMap<Vec<(String, String)>, Points> {
    let req = wire::decode(body).unwrap();
    req.timeseries
        .into_iter()
        .map(|ts| {
            (
                ts.labels.into_iter().map(|l| (l.name, l.value)).collect(),
                ts.samples
                    .into_iter()
                    .map(|s| (s.timestamp, s.value))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn remote_write_drops_what_a_receiver_refuses_and_retries_what_it_cannot_take_yet() {
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    let rx = WebhookReceiver::start();
    rx.set_status(400);
    let token = env.path().join("token");
    std::fs::write(&token, "t0ken-abc\n").unwrap();
    let (port, http_port) = (free_port(), free_port());
    let extra = format!(
        "[detect]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{http_port}\"\ntls = false\n\
         [[remote_write]]\nname = \"rx\"\nurl = {:?}\nbearer_token_file = {:?}\n\
         external_labels = {{ cluster = \"lab\" }}\nshards = 1\nmin_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n",
        rx.url(),
        token
    );
    let mut collector = start_collector_with(&env, port, &extra);
    let maddr = format!("127.0.0.1:{http_port}");
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&maddr).is_ok()
    }));
    let base_ms = (vitals_common::now_ms() / 1000 - 100) * 1000;
    let mut seq = 0;

    // 400: dropped and counted after one attempt; the queue moves on.
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 0, 10, &mut seq),
    )
    .unwrap();
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_dropped_total",
                &[("endpoint", "rx"), ("reason", "refused")],
            ) == Some(30.0)
        }),
        "{m}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let got = rx.received();
    assert_eq!(got.len(), 1, "a 400 is not retried");
    let r = &got[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(r.header("content-encoding"), Some("snappy"));
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(r.header("x-prometheus-remote-write-version"), Some("0.1.0"));
    assert!(
        r.header("user-agent")
            .is_some_and(|u| u.starts_with("vitals/")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("authorization"), Some("Bearer t0ken-abc"));
    let m = metrics(&maddr);
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_requests_total",
            &[("endpoint", "rx"), ("code", "400")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_sent_total",
            &[("endpoint", "rx")]
        ),
        Some(0.0),
        "{m}"
    );
    let log = collector.log_text();
    assert!(
        log.contains("refused a request") && log.contains("400"),
        "{log}"
    );
    assert!(
        !log.contains("t0ken-abc"),
        "the token is in the log:\n{log}"
    );

    // 503, then 429: retried with backoff (not in a hot loop), then
    // delivered once the receiver takes it; every attempt the same request.
    rx.set_status(503);
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 10, 20, &mut seq),
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(10), || rx.received().len() >= 3));
    std::thread::sleep(Duration::from_millis(1500));
    let attempts = rx.received().len() - 1;
    // 50, 100, 200, 200, ... ms apart: about 8 in 1.5 s, not hundreds.
    assert!((3..=20).contains(&attempts), "{attempts} attempts");
    rx.set_status(429);
    let before = rx.received().len();
    assert!(wait_until(Duration::from_secs(10), || rx.received().len()
        >= before + 2));
    rx.set_status(200);
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_sent_total",
                &[("endpoint", "rx")],
            ) == Some(30.0)
        }),
        "{m}"
    );
    let got = rx.received();
    let bodies: Vec<&[u8]> = got[1..].iter().map(|r| r.body.as_slice()).collect();
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "a retry sends the same request"
    );
    let series = decoded(bodies[0]);
    assert_eq!(series.len(), SERIES as usize);
    for k in 0..SERIES {
        let labels: Vec<(String, String)> = [
            ("__name__", "rw_test_value".to_string()),
            ("cluster", "lab".to_string()),
            ("k", k.to_string()),
            ("node", "train-01".to_string()),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b))
        .collect();
        let want: Vec<(i64, f64)> = (10..20)
            .map(|s| (base_ms + s * 1000, value_at(k, s)))
            .collect();
        assert_eq!(series.get(&labels), Some(&want), "{series:?}");
    }
    for code in ["503", "429"] {
        assert!(
            metric(
                &m,
                "vitals_remote_write_requests_total",
                &[("endpoint", "rx"), ("code", code)]
            )
            .unwrap()
                >= 2.0,
            "{m}"
        );
    }
    assert!(
        metric(
            &m,
            "vitals_remote_write_samples_retried_total",
            &[("endpoint", "rx")]
        )
        .unwrap()
            >= 120.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "vitals_remote_write_samples_dropped_total",
            &[("endpoint", "rx"), ("reason", "refused")]
        ),
        Some(30.0),
        "{m}"
    );

    // A restart sends nothing again: the cursor is past all of it.
    assert!(collector.term(Duration::from_secs(20)).success());
    let n = rx.received().len();
    collector = start_collector_with(&env, port, &extra);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rx.received().len(), n, "resent after a restart");
    assert!(collector.is_running());

    // A reload checks the tables too: a bad one is refused whole (file,
    // line, key in the log) and the running config stays; a good change
    // says it needs a restart.
    let cfg = env.path().join("collector/collector.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{good}[[remote_write]]\nurl = \"ftp://nowhere/\"\n"),
    )
    .unwrap();
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let log = collector.log_text();
            log.contains("reload refused") && log.contains("remote_write[1].url")
        }),
        "{}",
        collector.log_text()
    );
    std::fs::write(&cfg, good.replace("shards = 1", "shards = 2")).unwrap();
    collector.hup();
    assert!(
        wait_until(Duration::from_secs(10), || {
            collector
                .log_text()
                .lines()
                .any(|l| l.contains("needs a restart") && l.contains("remote_write"))
        }),
        "{}",
        collector.log_text()
    );
    assert!(collector.is_running());
}

#[test]
fn a_bad_remote_write_table_stops_the_start_with_file_line_and_key() {
    let env = Env::new();
    let port = free_port();
    let dir = env.path().join("collector");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = env.cert("collector");
    let cfg = dir.join("collector.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[storage]\npath = {:?}\n\
             [[remote_write]]\nurl = \"https://prom.example/api/v1/write\"\nbearer_token_file = \"missing-token\"\n",
            env.ca(),
            cert,
            key,
            env.db()
        ),
    )
    .unwrap();
    let out = Command::new(bin("vitals-collector"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collector.toml:10:1: key `remote_write[0].bearer_token_file`")
            && err.contains("missing-token"),
        "{err}"
    );
    assert!(!env.db().exists(), "nothing stored on a bad config");
}

#[test]
fn remote_write_over_mutual_tls_with_a_server_name() {
    let Some(_) = required(
        "remote_write_over_mutual_tls_with_a_server_name",
        "VITALS_TEST_PROMETHEUS",
        prometheus_binary(),
    ) else {
        return;
    };
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    // Prometheus' certificate names prom.internal only (no IP): the
    // collector must be told the name to reach it on 127.0.0.1.
    env.issue("prom", "collector", &["--dns", "prom.internal"]);
    env.issue("rw-client", "agent", &[]);
    let (pcert, pkey) = env.cert("prom");
    let (ccert, ckey) = env.cert("rw-client");
    let client = tls_client(&env.ca(), Some((&ccert, &ckey)));
    let (_prom, paddr) = start_prometheus_tls(
        &env.path().join("prometheus"),
        &PrometheusTls {
            cert: &pcert,
            key: &pkey,
            client_ca: &env.ca(),
            client: &client,
            server_name: "prom.internal",
        },
    );
    let (port, http_port) = (free_port(), free_port());
    let url = format!("https://{paddr}/api/v1/write");
    let extra = format!(
        "[detect]\nenabled = false\n[http]\nlisten = \"127.0.0.1:{http_port}\"\ntls = false\n\
         [[remote_write]]\nname = \"mtls\"\nurl = {url:?}\nca_file = {ca:?}\ncert_file = {ccert:?}\nkey_file = {ckey:?}\n\
         server_name = \"prom.internal\"\nexternal_labels = {{ cluster = \"lab\" }}\n\
         [[remote_write]]\nname = \"no-client-cert\"\nurl = {url:?}\nca_file = {ca:?}\nserver_name = \"prom.internal\"\n\
         [[remote_write]]\nname = \"no-server-name\"\nurl = {url:?}\nca_file = {ca:?}\ncert_file = {ccert:?}\nkey_file = {ckey:?}\n",
        ca = env.ca(),
    );
    let collector = start_collector_with(&env, port, &extra);
    let maddr = format!("127.0.0.1:{http_port}");
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&maddr).is_ok()
    }));
    let base_ms = (vitals_common::now_ms() / 1000 - 100) * 1000;
    let mut seq = 0;
    ingest(
        &env,
        port,
        "train-01",
        "inst-1",
        batches(base_ms, 0, 30, &mut seq),
    )
    .unwrap();
    wait_for_all(
        &paddr,
        Some((&client, "prom.internal")),
        base_ms,
        30,
        &collector,
        "over mutual TLS",
    );
    let mut m = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            m = metrics(&maddr);
            metric(
                &m,
                "vitals_remote_write_samples_sent_total",
                &[("endpoint", "mtls")],
            ) == Some(90.0)
                && ["no-client-cert", "no-server-name"].iter().all(|e| {
                    metric(
                        &m,
                        "vitals_remote_write_requests_total",
                        &[("endpoint", e), ("code", "error")],
                    )
                    .is_some_and(|n| n >= 2.0)
                        && metric(
                            &m,
                            "vitals_remote_write_samples_pending",
                            &[("endpoint", e)],
                        )
                        .is_some_and(|n| n >= 90.0)
                })
        }),
        "{m}"
    );
    // Without its certificate, or checking the wrong name, nothing goes
    // through: retried, kept, never counted as sent.
    for e in ["no-client-cert", "no-server-name"] {
        assert_eq!(
            metric(
                &m,
                "vitals_remote_write_samples_sent_total",
                &[("endpoint", e)]
            ),
            Some(0.0),
            "{m}"
        );
    }
    let log = collector.log_text();
    assert!(!log.contains("BEGIN"), "key material in the log:\n{log}");
}
