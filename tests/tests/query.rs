//! The read side end to end: a real collector on 127.0.0.1 is given known
//! samples and events over the ingest API (agent certificates), and every
//! `vitals.v1.Query` RPC, the `vitals` CLI commands over it, the limits,
//! the role check, health checking, reflection and `WatchAlerts` are
//! checked against expectations computed here from the samples written.
//! (Debian has no grpcurl package; the reflection check uses tonic's
//! reflection client, the protocol grpcurl speaks.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use tonic::Code;
use vitals_e2e::*;
use vitals_proto::v1::alerts_client::AlertsClient;
use vitals_proto::v1::query_client::QueryClient;
use vitals_proto::v1::*;

type Labels = BTreeMap<String, String>;
type Result = BTreeMap<Labels, Vec<(i64, f64)>>;

/// One series as written: name, labels (node included), samples.
#[derive(Clone)]
struct Written {
    name: &'static str,
    labels: Labels,
    samples: Vec<(i64, f64)>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The data set: samples from `base` for 20 minutes.
fn dataset(base: i64) -> Vec<Written> {
    let s = 1000;
    let mut out = vec![
        Written {
            name: "gpu_busy_percent",
            labels: labels(&[("node", "train-01"), ("gpu", "0")]),
            samples: (0..120)
                .map(|k| (base + k * 10 * s, ((k * 7) % 101) as f64))
                .collect(),
        },
        Written {
            name: "gpu_busy_percent",
            labels: labels(&[("node", "train-01"), ("gpu", "1")]),
            samples: (0..120)
                .map(|k| (base + 5 * s + k * 10 * s, (100 - (k * 3) % 100) as f64))
                .collect(),
        },
        Written {
            name: "gpu_busy_percent",
            labels: labels(&[("node", "train-02"), ("gpu", "0")]),
            samples: (0..60)
                .map(|k| (base + k * 20 * s, (50 + k % 5) as f64))
                .collect(),
        },
        // A counter growing 10/s, reset to 0 between k = 59 and 60 (and
        // 100 again 10 s later): every window's true rate is 10/s.
        Written {
            name: "node_network_receive_bytes_total",
            labels: labels(&[("node", "train-01"), ("device", "ib0")]),
            samples: (0..120)
                .map(|k| {
                    let v = if k < 60 {
                        1000 + 100 * k
                    } else {
                        100 * (k - 60) + 100
                    };
                    (base + k * 10 * s, v as f64)
                })
                .collect(),
        },
        Written {
            name: "vitals_source_success",
            labels: labels(&[("node", "train-01"), ("source", "host")]),
            samples: vec![(base, 1.0)],
        },
        Written {
            name: "vitals_slurm_jobs",
            labels: labels(&[
                ("node", "train-02"),
                ("state", "running"),
                ("partition", "gpu"),
            ]),
            samples: vec![(base, 3.0)],
        },
        Written {
            name: "node_zfs_arc_hits_total",
            labels: labels(&[("node", "nas-01")]),
            samples: (0..1500).map(|k| (base + k * s, (k * 10) as f64)).collect(),
        },
        Written {
            name: "node_load1",
            labels: labels(&[("node", "nas-01")]),
            samples: vec![(base, 0.5), (base + 600 * s, 0.75)],
        },
    ];
    for src in ["zfs", "host"] {
        out.push(Written {
            name: "vitals_source_success",
            labels: labels(&[("node", "nas-01"), ("source", src)]),
            samples: vec![(base, 1.0)],
        });
    }
    out
}

fn event(ts: i64, node: &str, kind: &str, sev: Severity, msg: &str) -> Event {
    Event {
        timestamp_ms: ts,
        node: node.into(),
        kind: kind.into(),
        severity: sev as i32,
        message: msg.into(),
        labels: vec![Label {
            name: "job".into(),
            value: "17".into(),
        }],
    }
}

/// Writes the series of `node` (and `events`) in one batch.
fn write_node(env: &Env, port: u16, node: &str, data: &[Written], events: Vec<Event>, seq: u64) {
    let mut b = Batch {
        seq,
        events,
        ..Default::default()
    };
    for (id, w) in data.iter().filter(|w| w.labels["node"] == node).enumerate() {
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

// ---------------------------------------------- expectations, from scratch --

const LOOKBACK: i64 = 300_000;

fn latest(samples: &[(i64, f64)], t: i64) -> Option<f64> {
    samples
        .iter()
        .rev()
        .find(|(ts, _)| *ts <= t && *ts > t - LOOKBACK)
        .map(|p| p.1)
}

fn window(samples: &[(i64, f64)], t: i64, d: i64) -> Vec<f64> {
    samples
        .iter()
        .filter(|(ts, _)| *ts <= t && *ts > t - d)
        .map(|p| p.1)
        .collect()
}

fn steps(start: i64, end: i64, step: i64) -> Vec<i64> {
    (0..)
        .map(|i| start + i * step)
        .take_while(|t| *t <= end)
        .collect()
}

/// Per series of `name` matching `keep`, `f` at every step (None: no point).
fn expect_each(
    data: &[Written],
    name: &str,
    keep: impl Fn(&Labels) -> bool,
    keep_name: bool,
    ts: &[i64],
    f: impl Fn(&[(i64, f64)], i64) -> Option<f64>,
) -> Result {
    let mut out = Result::new();
    for w in data.iter().filter(|w| w.name == name && keep(&w.labels)) {
        let pts: Vec<(i64, f64)> = ts
            .iter()
            .filter_map(|&t| f(&w.samples, t).map(|v| (t, v)))
            .collect();
        if !pts.is_empty() {
            let mut l = w.labels.clone();
            if keep_name {
                l.insert("__name__".into(), name.into());
            }
            out.insert(l, pts);
        }
    }
    out
}

/// Groups `per_series` by `by` and folds each step with `agg`.
fn expect_agg(per_series: &Result, by: &[&str], agg: fn(&[f64]) -> f64) -> Result {
    let mut groups: BTreeMap<Labels, BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
    for (l, pts) in per_series {
        let key: Labels = by
            .iter()
            .filter_map(|k| l.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        for &(t, v) in pts {
            groups
                .entry(key.clone())
                .or_default()
                .entry(t)
                .or_default()
                .push(v);
        }
    }
    groups
        .into_iter()
        .map(|(k, m)| (k, m.into_iter().map(|(t, vs)| (t, agg(&vs))).collect()))
        .collect()
}

fn sum(v: &[f64]) -> f64 {
    v.iter().sum()
}
fn avg(v: &[f64]) -> f64 {
    sum(v) / v.len() as f64
}
fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}
fn count(v: &[f64]) -> f64 {
    v.len() as f64
}

/// The q-quantile of `v` with linear interpolation between ranks.
fn quantile(q: f64, v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q * (s.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    let j = (i + 1).min(s.len() - 1);
    s[i] + (s[j] - s[i]) * frac
}

fn assert_same(what: &str, got: &Result, want: &Result) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{what}: series differ"
    );
    for (l, w) in want {
        let g = &got[l];
        assert_eq!(
            g.iter().map(|p| p.0).collect::<Vec<_>>(),
            w.iter().map(|p| p.0).collect::<Vec<_>>(),
            "{what} {l:?}: timestamps differ"
        );
        for (a, b) in g.iter().zip(w) {
            assert!(
                (a.1 - b.1).abs() <= 1e-9 * b.1.abs().max(1.0),
                "{what} {l:?} at {}: got {}, want {}",
                a.0,
                a.1,
                b.1
            );
        }
    }
    assert!(
        !want.is_empty(),
        "{what}: an empty expectation proves nothing"
    );
}

fn to_result(series: Vec<Series>) -> Result {
    series
        .into_iter()
        .map(|s| {
            let mut l = labels(&[]);
            for lb in &s.labels {
                l.insert(lb.name.clone(), lb.value.clone());
            }
            if !s.name.is_empty() {
                l.insert("__name__".into(), s.name.clone());
            }
            (
                l,
                s.points.iter().map(|p| (p.timestamp_ms, p.value)).collect(),
            )
        })
        .collect()
}

struct Client {
    rt: tokio::runtime::Runtime,
    q: QueryClient<tonic::transport::Channel>,
    a: AlertsClient<tonic::transport::Channel>,
}

impl Client {
    fn new(env: &Env, port: u16, cert: &str) -> Client {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (c, k) = env.cert(cert);
        let ch = rt
            .block_on(channel(port, &env.ca(), Some((&c, &k))))
            .unwrap();
        Client {
            rt,
            q: QueryClient::new(ch.clone()),
            a: AlertsClient::new(ch),
        }
    }

    fn range(
        &self,
        query: &str,
        start: i64,
        end: i64,
        step: i64,
    ) -> std::result::Result<Result, tonic::Status> {
        let mut q = self.q.clone();
        let req = QueryRangeRequest {
            query: query.into(),
            start_ms: start,
            end_ms: end,
            step_ms: step,
            ..Default::default()
        };
        let r = self.rt.block_on(q.query_range(req.clone()))?;
        let plain = r.into_inner().series;
        // Every answer is asked for twice: packed, it holds the same
        // series and samples in two arrays each, and no points.
        let packed = self
            .rt
            .block_on(q.query_range(QueryRangeRequest {
                packed: true,
                ..req
            }))?
            .into_inner()
            .series;
        assert_eq!(packed.len(), plain.len(), "{query}");
        let mut unpacked = Vec::new();
        for (mut p, s) in packed.into_iter().zip(&plain) {
            assert!(p.points.is_empty(), "{query}: points in a packed answer");
            assert_eq!(p.timestamps_ms.len(), s.points.len(), "{query}");
            assert_eq!(p.values.len(), s.points.len(), "{query}");
            assert!(s.timestamps_ms.is_empty() && s.values.is_empty());
            p.unpack();
            unpacked.push(p);
        }
        assert_eq!(
            &unpacked, &plain,
            "{query}: packed and plain answers differ"
        );
        Ok(to_result(plain))
    }

    fn instant(&self, query: &str, t: i64) -> std::result::Result<Result, tonic::Status> {
        let mut q = self.q.clone();
        let r = self.rt.block_on(q.query_instant(QueryInstantRequest {
            query: query.into(),
            time_ms: t,
        }))?;
        Ok(to_result(r.into_inner().series))
    }
}

fn base_ms() -> i64 {
    // 40 minutes ago, on a minute.
    (vitals_common::now_ms() / 60_000) * 60_000 - 40 * 60_000
}

fn start_with_data(env: &Env, extra: &str) -> (Proc, u16, i64, Vec<Written>) {
    for n in ["train-01", "train-02", "nas-01"] {
        env.issue(n, "agent", &[]);
    }
    let port = free_port();
    let collector = start_collector_with(env, port, extra);
    let base = base_ms();
    let data = dataset(base);
    let events = vec![
        event(
            base + 60_000,
            "train-01",
            "slurm_job",
            Severity::Info,
            "job 17 started",
        ),
        event(
            base + 300_000,
            "train-01",
            "gpu_xid",
            Severity::Error,
            "Xid 79 on gpu 1",
        ),
        event(
            base + 600_000,
            "train-01",
            "slurm_job",
            Severity::Info,
            "job 17 completed",
        ),
    ];
    write_node(env, port, "train-01", &data, events, 1);
    write_node(env, port, "train-02", &data, Vec::new(), 1);
    write_node(
        env,
        port,
        "nas-01",
        &data,
        vec![event(
            base + 120_000,
            "nas-01",
            "slurm_job",
            Severity::Info,
            "not a job node",
        )],
        1,
    );
    (collector, port, base, data)
}

#[test]
fn query_rpcs_answer_what_was_written() {
    let env = Env::new();
    let (_collector, port, base, data) = start_with_data(&env, "");
    let c = Client::new(&env, port, "operator");
    let (start, end, step) = (base, base + 1_200_000, 15_000);
    let ts = steps(start, end, step);
    let all = |_: &Labels| true;

    // ListNodes: roles from what each node reports.
    let mut q = c.q.clone();
    let nodes =
        c.rt.block_on(q.list_nodes(ListNodesRequest {}))
            .unwrap()
            .into_inner()
            .nodes;
    let by_name: BTreeMap<_, _> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    assert_eq!(by_name.len(), 3, "{nodes:?}");
    assert_eq!(by_name["train-01"].role, "training");
    assert_eq!(by_name["train-01"].sources, ["gpu", "host"]);
    assert_eq!(by_name["nas-01"].role, "storage");
    assert_eq!(by_name["nas-01"].sources, ["host", "zfs"]);
    assert_eq!(by_name["train-02"].agent_version, "test-1");
    assert_eq!(by_name["train-02"].sources, ["gpu", "slurm"]);
    assert!(by_name["nas-01"].last_seen_ms > 0);

    // ListSeries: matchers and limit.
    let list = |metric: &str, m: Vec<Matcher>, limit: u32| {
        let mut q = c.q.clone();
        c.rt.block_on(q.list_series(ListSeriesRequest {
            metric: metric.into(),
            matchers: m,
            limit,
        }))
    };
    let m = |name: &str, op: MatchOp, value: &str| Matcher {
        name: name.into(),
        op: op as i32,
        value: value.into(),
    };
    let r = list("gpu_busy_percent", vec![], 0).unwrap().into_inner();
    assert_eq!(r.series.len(), 3);
    assert!(!r.truncated);
    let r = list(
        "gpu_busy_percent",
        vec![m("gpu", MatchOp::NotEqual, "0")],
        0,
    )
    .unwrap()
    .into_inner();
    assert_eq!(r.series.len(), 1);
    assert!(
        r.series[0]
            .labels
            .iter()
            .any(|l| l.name == "gpu" && l.value == "1")
    );
    let r = list(
        "",
        vec![
            m("__name__", MatchOp::Regex, "gpu_.*|node_load1"),
            m("node", MatchOp::NotRegex, "train-0[2-9]"),
        ],
        0,
    )
    .unwrap()
    .into_inner();
    assert_eq!(r.series.len(), 3, "{:?}", r.series);
    let r = list("gpu_busy_percent", vec![], 2).unwrap().into_inner();
    assert_eq!(r.series.len(), 2);
    assert!(r.truncated);
    let e = list("", vec![], 0).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // QueryRange without a query: the raw samples, as before.
    let mut q = c.q.clone();
    let raw =
        c.rt.block_on(q.query_range(QueryRangeRequest {
            metric: "gpu_busy_percent".into(),
            matchers: vec![
                m("node", MatchOp::Regex, "train-0[12]"),
                m("gpu", MatchOp::Equal, "0"),
            ],
            start_ms: 0,
            end_ms: i64::MAX,
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let want: Result = data
        .iter()
        .filter(|w| w.name == "gpu_busy_percent" && w.labels["gpu"] == "0")
        .map(|w| {
            let mut l = w.labels.clone();
            l.insert("__name__".into(), w.name.into());
            (l, w.samples.clone())
        })
        .collect();
    assert_same("raw", &to_result(raw.series), &want);

    // A selector at each step: the latest sample within 5 minutes.
    let want = expect_each(
        &data,
        "gpu_busy_percent",
        |l| l["gpu"] == "0",
        true,
        &ts,
        latest,
    );
    let got = c
        .range(r#"gpu_busy_percent{gpu="0"}"#, start, end, step)
        .unwrap();
    assert_same("selector", &got, &want);

    // Functions over ranges (name dropped).
    for (func, d, f) in [
        ("avg_over_time", 60_000, avg as fn(&[f64]) -> f64),
        ("max_over_time", 60_000, max),
        ("min_over_time", 120_000, min),
    ] {
        let want = expect_each(&data, "gpu_busy_percent", all, false, &ts, |s, t| {
            let w = window(s, t, d);
            (!w.is_empty()).then(|| f(&w))
        });
        let query = format!("{func}(gpu_busy_percent[{}s])", d / 1000);
        assert_same(&query, &c.range(&query, start, end, step).unwrap(), &want);
    }
    let want = expect_each(&data, "gpu_busy_percent", all, false, &ts, |s, t| {
        let w = window(s, t, 120_000);
        (!w.is_empty()).then(|| quantile(0.75, &w))
    });
    let got = c
        .range(
            "quantile_over_time(0.75, gpu_busy_percent[2m])",
            start,
            end,
            step,
        )
        .unwrap();
    assert_same("quantile_over_time", &got, &want);

    // rate / increase over a counter with a reset: 10/s and 600 per minute
    // wherever the window lies inside the series (steps off the samples).
    let counter = &data
        .iter()
        .find(|w| w.name == "node_network_receive_bytes_total")
        .unwrap()
        .samples;
    let last = counter.last().unwrap().0;
    let inner = steps(base + 60_000, last, step);
    let device = labels(&[("node", "train-01"), ("device", "ib0")]);
    let want: Result = [(device.clone(), inner.iter().map(|&t| (t, 10.0)).collect())].into();
    let got = c
        .range(
            "rate(node_network_receive_bytes_total[1m])",
            base + 60_000,
            last,
            step,
        )
        .unwrap();
    assert_same("rate across a reset", &got, &want);
    let want: Result = [(device.clone(), inner.iter().map(|&t| (t, 600.0)).collect())].into();
    let got = c
        .range(
            r#"increase(node_network_receive_bytes_total{device="ib0"}[1m])"#,
            base + 60_000,
            last,
            step,
        )
        .unwrap();
    assert_same("increase across a reset", &got, &want);
    // At the series' start the window is mostly empty: two samples 10 s
    // apart, the start 45 s before the first (extrapolated by half an
    // interval, 5 s), the end 5 s after the last: 100 × 20 / 10.
    let got = c
        .instant(
            "increase(node_network_receive_bytes_total[1m])",
            base + 15_000,
        )
        .unwrap();
    assert_same(
        "increase at the start",
        &got,
        &[(device.clone(), vec![(base + 15_000, 200.0)])].into(),
    );
    let got = c
        .instant("rate(node_network_receive_bytes_total[1m])", base + 15_000)
        .unwrap();
    assert_same(
        "rate at the start",
        &got,
        &[(device, vec![(base + 15_000, 200.0 / 60.0)])].into(),
    );

    // Aggregations: sum|avg|min|max|count by (labels), and without by.
    let each = expect_each(&data, "gpu_busy_percent", all, false, &ts, latest);
    for (op, f) in [
        ("sum", sum as fn(&[f64]) -> f64),
        ("avg", avg),
        ("min", min),
        ("max", max),
        ("count", count),
    ] {
        let query = format!("{op} by (node) (gpu_busy_percent)");
        assert_same(
            &query,
            &c.range(&query, start, end, step).unwrap(),
            &expect_agg(&each, &["node"], f),
        );
        let query = format!("{op}(gpu_busy_percent)");
        assert_same(
            &query,
            &c.range(&query, start, end, step).unwrap(),
            &expect_agg(&each, &[], f),
        );
    }
    let over = expect_each(
        &data,
        "gpu_busy_percent",
        |l| l["node"] != "train-02",
        false,
        &ts,
        |s, t| {
            let w = window(s, t, 60_000);
            (!w.is_empty()).then(|| max(&w))
        },
    );
    let query = r#"avg(max_over_time(gpu_busy_percent{node!="train-02"}[1m])) by (gpu)"#;
    assert_same(
        query,
        &c.range(query, start, end, step).unwrap(),
        &expect_agg(&over, &["gpu"], avg),
    );

    // QueryInstant.
    let t = base + 300_000;
    let got = c.instant("max by (node) (gpu_busy_percent)", t).unwrap();
    let want = expect_agg(
        &expect_each(&data, "gpu_busy_percent", all, false, &[t], latest),
        &["node"],
        max,
    );
    assert_same("instant", &got, &want);

    // ListEvents: node, kind, time range; newest first.
    let events = |node: &str, kind: &str, s: i64, e: i64| {
        let mut q = c.q.clone();
        c.rt.block_on(q.list_events(ListEventsRequest {
            node: node.into(),
            kind: kind.into(),
            start_ms: s,
            end_ms: e,
            limit: 0,
        }))
        .unwrap()
        .into_inner()
        .events
    };
    let ev = events("train-01", "slurm_job", base, base + 3_600_000);
    assert_eq!(
        ev.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        ["job 17 completed", "job 17 started"]
    );
    assert_eq!(ev[0].labels[0].value, "17");
    assert_eq!(events("", "slurm_job", base, base + 3_600_000).len(), 3);
    assert_eq!(events("train-01", "", base, base + 3_600_000).len(), 3);
    let ev = events("train-01", "", base + 200_000, base + 400_000);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].kind, "gpu_xid");
    assert_eq!(ev[0].severity, Severity::Error as i32);

    // Bad input: INVALID_ARGUMENT naming what is wrong.
    for (query, s, e, st, says) in [
        ("gpu_busy_percent{gpu=}", start, end, step, "bad query"),
        ("rate(gpu_busy_percent)", start, end, step, "expected `[`"),
        (
            "topk(2, gpu_busy_percent)",
            start,
            end,
            step,
            "unknown function",
        ),
        ("gpu_busy_percent", start, end, 0, "step_ms"),
        ("gpu_busy_percent", end, start, step, "before"),
        ("gpu_busy_percent", start, end, -5, "step_ms"),
    ] {
        let e = c.range(query, s, e, st).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{query}: {e:?}");
        assert!(e.message().contains(says), "{query}: {}", e.message());
    }
    let e = c.instant("sum(", t).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[test]
fn query_cli_commands_print_what_the_rpcs_answer() {
    let env = Env::new();
    let (_collector, port, base, data) = start_with_data(&env, "");
    let cli = env.cli_config(port);
    let cli = cli.to_str().unwrap();
    let (start, end) = (base / 1000, base / 1000 + 1200);
    let (s, e) = (start.to_string(), end.to_string());
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["--config", cli];
        all.extend_from_slice(args);
        serde_json::from_str(&env.vitals_ok(&all)).unwrap()
    };

    let nodes = json(&["nodes", "--json"]);
    let roles: BTreeMap<String, String> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().into(),
                n["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(roles["train-01"], "training");
    assert_eq!(roles["nas-01"], "storage");

    let series = json(&[
        "series",
        r#"{__name__="gpu_busy_percent",node="train-01"}"#,
        "--json",
    ]);
    assert_eq!(series["series"].as_array().unwrap().len(), 2);
    assert_eq!(series["truncated"], false);

    // An aggregation at 30 s steps, compared with the expectation.
    let v = json(&[
        "query",
        "sum by (node) (gpu_busy_percent)",
        "--start",
        &s,
        "--end",
        &e,
        "--step",
        "30s",
        "--json",
    ]);
    let mut got = Result::new();
    for sr in v["series"].as_array().unwrap() {
        let l: Labels = sr["labels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let pts = sr["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
            .collect();
        got.insert(l, pts);
    }
    let ts = steps(base, base + 1_200_000, 30_000);
    let each = expect_each(&data, "gpu_busy_percent", |_| true, false, &ts, latest);
    assert_same("cli sum by", &got, &expect_agg(&each, &["node"], sum));

    // A plain selector: raw samples, as the CLI always listed them.
    let v = json(&[
        "query",
        r#"node_load1{node="nas-01"}"#,
        "--start",
        &s,
        "--end",
        &e,
        "--json",
    ]);
    assert_eq!(
        v["series"][0]["points"],
        serde_json::json!([[base, 0.5], [base + 600_000, 0.75]])
    );

    // Instant.
    let at = (base / 1000 + 300).to_string();
    let v = json(&["query", "count(gpu_busy_percent)", "--at", &at, "--json"]);
    assert_eq!(v["series"][0]["points"][0][1], 3.0);

    // One series: a chart with --chart; several: a table.
    let text = env.vitals_ok(&[
        "--config",
        cli,
        "query",
        r#"gpu_busy_percent{node="train-01",gpu="0"}"#,
        "--start",
        &s,
        "--end",
        &e,
        "--chart",
    ]);
    assert!(text.contains("┤") && text.contains("└"), "{text}");
    assert!(
        text.contains(r#"gpu_busy_percent{gpu="0",node="train-01"}"#),
        "{text}"
    );
    assert!(
        text.contains("100 ┤") && text.contains("  0 ┤"),
        "axis from 0 to 100:\n{text}"
    );
    let text = env.vitals_ok(&[
        "--config",
        cli,
        "query",
        "gpu_busy_percent",
        "--start",
        &s,
        "--end",
        &e,
    ]);
    assert!(text.starts_with("SERIES"), "{text}");
    assert_eq!(text.lines().count(), 4, "{text}");

    let v = json(&[
        "events",
        "--node",
        "train-01",
        "--kind",
        "slurm_job",
        "--start",
        &s,
        "--end",
        &e,
        "--json",
    ]);
    let msgs: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, ["job 17 completed", "job 17 started"]);
    assert_eq!(v["events"][0]["severity"], "info");
    let text = env.vitals_ok(&["--config", cli, "events", "--start", &s, "--end", &e]);
    assert!(
        text.contains("Xid 79 on gpu 1") && text.contains("nas-01"),
        "{text}"
    );

    // A bad query: exit 1 and the collector's reason.
    let out = env.vitals(&[
        "--config",
        cli,
        "query",
        "rate(gpu_busy_percent)",
        "--since",
        "1h",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("expected `[`"),
        "{err}"
    );

    // Help has examples.
    let help = env.vitals_ok(&["query", "--help"]);
    assert!(
        help.contains("Examples:") && help.contains("avg by (node)"),
        "{help}"
    );
}

#[test]
fn query_limits_answer_resource_exhausted_and_agents_are_refused() {
    let env = Env::new();
    let (_collector, port, base, _data) = start_with_data(
        &env,
        "[query]\nmax_series = 2\nmax_points = 100\nmax_samples = 1000\n",
    );
    let c = Client::new(&env, port, "operator");
    let end = base + 1_200_000;
    let limit = |r: std::result::Result<Result, tonic::Status>, says: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    };
    limit(
        c.range("gpu_busy_percent", base, end, 60_000),
        "max_series = 2",
    );
    limit(
        c.range(
            r#"gpu_busy_percent{node="train-01",gpu="0"}"#,
            base,
            end,
            1000,
        ),
        "max_points = 100",
    );
    limit(
        c.instant(
            "max_over_time(node_zfs_arc_hits_total[30m])",
            base + 1_499_000,
        ),
        "max_samples = 1000",
    );
    // The widest range there is: too many steps, not an overflow.
    limit(
        c.range("gpu_busy_percent", i64::MIN, i64::MAX, 1),
        "max_points = 100",
    );
    // Under the limits the same data answers.
    let got = c
        .instant(
            "max_over_time(node_zfs_arc_hits_total[5m])",
            base + 1_499_000,
        )
        .unwrap();
    assert_eq!(got.values().next().unwrap()[0].1, 14_990.0);
    // Raw queries keep their limits too.
    let mut q = c.q.clone();
    let e =
        c.rt.block_on(q.query_range(QueryRangeRequest {
            metric: "node_zfs_arc_hits_total".into(),
            start_ms: 0,
            end_ms: i64::MAX,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("max_points"), "{}", e.message());
    let out = env.vitals(&[
        "--config",
        env.cli_config(port).to_str().unwrap(),
        "query",
        "gpu_busy_percent",
        "--since",
        "2h",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("ResourceExhausted") && err.contains("max_series"),
        "{err}"
    );

    // An agent certificate is refused on every Query RPC and on WatchAlerts.
    let agent = Client::new(&env, port, "train-01");
    let denied = |r: std::result::Result<(), tonic::Status>, what: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("operator"), "{what}: {}", e.message());
    };
    let mut q = agent.q.clone();
    denied(
        agent
            .rt
            .block_on(q.list_nodes(ListNodesRequest {}))
            .map(drop),
        "ListNodes",
    );
    denied(
        agent.range("gpu_busy_percent", base, end, 60_000).map(drop),
        "QueryRange",
    );
    denied(
        agent.instant("gpu_busy_percent", end).map(drop),
        "QueryInstant",
    );
    denied(
        agent
            .rt
            .block_on(q.list_series(ListSeriesRequest {
                metric: "gpu_busy_percent".into(),
                ..Default::default()
            }))
            .map(drop),
        "ListSeries",
    );
    denied(
        agent
            .rt
            .block_on(q.list_events(ListEventsRequest::default()))
            .map(drop),
        "ListEvents",
    );
    let mut a = agent.a.clone();
    denied(
        agent
            .rt
            .block_on(a.watch_alerts(WatchAlertsRequest {}))
            .map(drop),
        "WatchAlerts",
    );
    denied(
        agent
            .rt
            .block_on(a.list_alerts(ListAlertsRequest::default()))
            .map(drop),
        "ListAlerts",
    );
}

#[test]
fn query_reflection_lists_the_services_and_health_says_serving() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let env = Env::new();
    let port = free_port();
    let _collector = start_collector(&env, port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cert, key) = env.cert("operator");
    let ch = rt
        .block_on(channel(port, &env.ca(), Some((&cert, &key))))
        .unwrap();
    let ask = |req: MessageRequest| -> MessageResponse {
        let mut client = ServerReflectionClient::new(ch.clone());
        rt.block_on(async move {
            use tokio_stream::StreamExt;
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(req),
            };
            let mut resp = client
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await
                .unwrap()
                .into_inner();
            resp.next()
                .await
                .unwrap()
                .unwrap()
                .message_response
                .unwrap()
        })
    };
    let MessageResponse::ListServicesResponse(list) =
        ask(MessageRequest::ListServices(String::new()))
    else {
        panic!("not a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "vitals.v1.Query",
        "vitals.v1.Alerts",
        "vitals.v1.Ingest",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    // The agents' service is in the same proto file, but not served here.
    assert!(!names.iter().any(|n| n == "vitals.v1.NetTest"), "{names:?}");
    // The descriptor of the Query service carries its methods.
    let MessageResponse::FileDescriptorResponse(fd) = ask(MessageRequest::FileContainingSymbol(
        "vitals.v1.Query".into(),
    )) else {
        panic!("no file descriptor");
    };
    let bytes: Vec<u8> = fd.file_descriptor_proto.concat();
    for method in [
        "QueryRange",
        "QueryInstant",
        "ListSeries",
        "ListEvents",
        "WatchAlerts",
    ] {
        assert!(
            bytes.windows(method.len()).any(|w| w == method.as_bytes()),
            "{method} missing from the descriptor"
        );
    }
    let mut health = HealthClient::new(ch.clone());
    for service in [
        "vitals.v1.Query",
        "vitals.v1.Ingest",
        "vitals.v1.Alerts",
        "",
    ] {
        let r = rt
            .block_on(health.check(HealthCheckRequest {
                service: service.into(),
            }))
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let e = rt
        .block_on(health.check(HealthCheckRequest {
            service: "vitals.v1.Nope".into(),
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

const HOT_RULE: &str = "[alerting]\neval_interval = \"200ms\"\nbuiltin = false\n[[alerting.rules]]\nname = \"GpuBusy\"\nexpr = \"gpu_busy_percent > 90\"\nseverity = \"warning\"\nsummary = \"{{node}} gpu {{gpu}} busy\"\n";

#[test]
fn query_watch_follows_alerts_as_they_change() {
    let env = Env::new();
    env.issue("train-01", "agent", &[]);
    let port = free_port();
    let _collector = start_collector_with(&env, port, HOT_RULE);
    let cli = env.cli_config(port);
    let watch_log = env.path().join("watch.log");
    let watch = Proc::spawn_cmd(
        Command::new(bin("vitals")).args(["--config", cli.to_str().unwrap(), "watch", "--json"]),
        &watch_log,
    );
    let sample = |seq: u64, v: f64| Batch {
        seq,
        series: vec![SeriesDef {
            id: 0,
            name: "gpu_busy_percent".into(),
            labels: vec![
                Label {
                    name: "gpu".into(),
                    value: "3".into(),
                },
                Label {
                    name: "node".into(),
                    value: "train-01".into(),
                },
            ],
        }],
        series_ids: vec![0],
        timestamps_ms: vec![vitals_common::now_ms()],
        values: vec![v],
        events: Vec::new(),
    };
    let changes = |log: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["rule"] == "GpuBusy")
            .collect()
    };
    // Let the watch connect before anything fires.
    std::thread::sleep(Duration::from_millis(700));
    ingest(&env, port, "train-01", "i", vec![sample(1, 97.0)]).unwrap();
    let fired = wait_until(Duration::from_secs(15), || {
        changes(watch_log.to_str().unwrap())
            .iter()
            .any(|c| c["change"] == "firing")
    });
    assert!(fired, "no firing change; watch log:\n{}", watch.log_text());
    let c = changes(watch_log.to_str().unwrap());
    let firing = c.iter().find(|c| c["change"] == "firing").unwrap();
    assert_eq!(firing["labels"]["gpu"], "3");
    assert_eq!(firing["annotations"]["summary"], "train-01 gpu 3 busy");
    assert_eq!(firing["value"], 97.0);

    // ListAlerts' state filter.
    let cli_s = cli.to_str().unwrap();
    let v: serde_json::Value = serde_json::from_str(
        &env.vitals_ok(&["--config", cli_s, "alerts", "--state", "firing", "--json"]),
    )
    .unwrap();
    assert_eq!(v["alerts"][0]["rule"], "GpuBusy");
    let v: serde_json::Value = serde_json::from_str(
        &env.vitals_ok(&["--config", cli_s, "alerts", "--state", "resolved", "--json"]),
    )
    .unwrap();
    assert!(v["alerts"].as_array().unwrap().is_empty(), "{v}");
    let out = env.vitals(&["--config", cli_s, "alerts", "--state", "burning"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown alert state"));

    // A watch started now begins with the open alert as a snapshot.
    let late_log = env.path().join("late.log");
    let _late = Proc::spawn_cmd(
        Command::new(bin("vitals")).args(["--config", cli_s, "watch", "--json"]),
        &late_log,
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            changes(late_log.to_str().unwrap())
                .first()
                .is_some_and(|c| c["change"] == "snapshot" && c["state"] == "firing")
        }),
        "no snapshot: {}",
        std::fs::read_to_string(&late_log).unwrap_or_default()
    );

    // Cooler: the alert resolves, and the first watch sees it.
    ingest(&env, port, "train-01", "i", vec![sample(2, 10.0)]).unwrap();
    let resolved = wait_until(Duration::from_secs(15), || {
        changes(watch_log.to_str().unwrap())
            .iter()
            .any(|c| c["change"] == "resolved")
    });
    assert!(
        resolved,
        "no resolved change; watch log:\n{}",
        watch.log_text()
    );
    let order: Vec<String> = changes(watch_log.to_str().unwrap())
        .iter()
        .map(|c| c["change"].as_str().unwrap().to_string())
        .filter(|k| k != "updated")
        .collect();
    let fire_at = order.iter().position(|k| k == "firing").unwrap();
    let resolve_at = order.iter().position(|k| k == "resolved").unwrap();
    assert!(fire_at < resolve_at, "{order:?}");
}
