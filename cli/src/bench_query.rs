//! `vitals bench query`: query latency over 24 h of 1 s samples.
//!
//! Fills a store with `--nodes` × `--gpus` GPU utilisation series at 1 s
//! for `--hours`, through the store's own write path (the writer thread,
//! WAL, chunks, a checkpoint) at simulated timestamps ending now; starts the
//! `vitals-collector` binary on it; and times `vitals.v1.Query` calls over
//! mutual TLS with an operator certificate, end to end (request, engine,
//! store reads, encoding, transfer, decoding).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use vitals_collector::store::{self, CleanBatch, SeriesKey, StoreOptions};
use vitals_common::identity::Role;
use vitals_common::model::Labels;
use vitals_proto::v1::{MatchOp, Matcher, QueryRangeRequest, query_client::QueryClient};

use crate::bench::{start_collector, tempfile_dir};
use crate::certs;

pub struct QueryBenchArgs {
    pub nodes: usize,
    pub gpus: usize,
    pub hours: u64,
    /// Timed runs of each query (after one warm-up).
    pub runs: usize,
    pub keep: Option<PathBuf>,
    pub json: bool,
}

pub const METRIC: &str = "gpu_gfx_activity";

/// A utilisation-like integer percentage: slow waves plus a per-GPU phase.
fn value(t_s: i64, series: usize) -> f64 {
    let x = t_s as f64 / 900.0 + series as f64;
    (50.0 + 40.0 * x.sin() + 5.0 * (x * 7.3).sin()).round()
}

/// Writes the samples through the store's writer; returns (start, end) ms.
async fn fill(db: &std::path::Path, a: &QueryBenchArgs) -> Result<(i64, i64, u64)> {
    let conn = store::open(db)?;
    let (writer, _reader, thread) = store::spawn_writer(conn, db, StoreOptions::default())?;
    let end_ms = vitals_common::now_ms() / 1000 * 1000;
    let seconds = (a.hours * 3600) as i64;
    let start_ms = end_ms - (seconds - 1) * 1000;
    let per_batch = 600i64;
    let mut samples = 0u64;
    for n in 0..a.nodes {
        let node = format!("gpu-{n:02}");
        writer
            .hello(&node, "bench", "bench")
            .await
            .map_err(anyhow::Error::msg)?;
        let keys: Vec<Arc<SeriesKey>> = (0..a.gpus)
            .map(|g| {
                let mut labels = Labels::new();
                labels.insert("node".into(), node.clone());
                labels.insert("gpu".into(), g.to_string());
                Arc::new(SeriesKey::new(METRIC.into(), labels))
            })
            .collect();
        let mut in_flight = std::collections::VecDeque::new();
        let mut seq = 0u64;
        let mut t0 = 0i64;
        while t0 < seconds {
            let t1 = (t0 + per_batch).min(seconds);
            let mut b = CleanBatch {
                seq: {
                    seq += 1;
                    seq
                },
                series: keys.clone(),
                series_idx: Vec::new(),
                timestamps_ms: Vec::new(),
                values: Vec::new(),
                events: Vec::new(),
            };
            for t in t0..t1 {
                let ts = start_ms + t * 1000;
                for g in 0..a.gpus {
                    b.series_idx.push(g as u32);
                    b.timestamps_ms.push(ts);
                    b.values.push(value(t, n * a.gpus + g));
                }
            }
            samples += b.values.len() as u64;
            in_flight.push_back(
                writer
                    .write(&node, "bench", b)
                    .await
                    .map_err(anyhow::Error::msg)?,
            );
            if in_flight.len() >= 16
                && let Some(rx) = in_flight.pop_front()
            {
                rx.await?.map_err(anyhow::Error::msg)?;
            }
            t0 = t1;
        }
        for rx in in_flight {
            rx.await?.map_err(anyhow::Error::msg)?;
        }
    }
    drop(writer);
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("store writer panicked"))?;
    Ok((start_ms, end_ms, samples))
}

struct Case {
    what: String,
    req: QueryRangeRequest,
}

pub async fn query(a: QueryBenchArgs) -> Result<String> {
    if a.nodes == 0 || a.gpus == 0 || a.hours == 0 || a.runs == 0 {
        bail!("--nodes, --gpus, --hours and --runs must be above 0");
    }
    let tmp = tempfile_dir(&a.keep)?;
    let dir = tmp.as_path();
    let db = dir.join("data/vitals.db");
    let started = Instant::now();
    eprintln!(
        "vitals bench: writing {} series x {} h at 1 s through the store",
        a.nodes * a.gpus,
        a.hours
    );
    let (start_ms, end_ms, samples) = fill(&db, &a).await?;
    let fill_s = started.elapsed().as_secs_f64();

    let certs_dir = dir.join("certs");
    certs::init(&certs_dir, 2)?;
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    for (name, role) in [("collector", Role::Collector), ("operator", Role::Operator)] {
        certs::issue(
            &certs_dir,
            &certs::IssueRequest {
                name,
                role,
                dns: &["localhost".into()],
                ips: &loopback,
                days: 2,
                not_after: None,
            },
        )?;
    }
    // Alerting and detection off: the figures are the query path alone.
    let (url, _collector) = start_collector(
        dir,
        "[detect]\nenabled = false\n[alerting]\nenabled = false\n",
    )
    .await?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(
            certs_dir.join("ca.pem"),
        )?))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            std::fs::read(certs_dir.join("operator.pem"))?,
            std::fs::read(certs_dir.join("operator.key"))?,
        ));
    let channel = Endpoint::from_shared(url)?
        .tls_config(tls)?
        .initial_stream_window_size(vitals_common::H2_STREAM_WINDOW)
        .initial_connection_window_size(vitals_common::H2_CONNECTION_WINDOW)
        .connect()
        .await?;
    let mut client = QueryClient::new(channel).max_decoding_message_size(1 << 30);

    // Packed answers, as `vitals query` asks for them.
    let range = |query: &str, step_ms: i64| QueryRangeRequest {
        query: query.into(),
        start_ms,
        end_ms,
        step_ms,
        packed: true,
        ..Default::default()
    };
    let one = format!("{METRIC}{{node=\"gpu-00\",gpu=\"0\"}}");
    let cases = vec![
        Case {
            what: format!("1 series, {} h, every stored sample", a.hours),
            req: QueryRangeRequest {
                metric: METRIC.into(),
                matchers: vec![
                    Matcher {
                        name: "node".into(),
                        op: MatchOp::Equal as i32,
                        value: "gpu-00".into(),
                    },
                    Matcher {
                        name: "gpu".into(),
                        op: MatchOp::Equal as i32,
                        value: "0".into(),
                    },
                ],
                start_ms,
                end_ms,
                packed: true,
                ..Default::default()
            },
        },
        Case {
            what: format!("1 series, {} h, step 1 s: {one}", a.hours),
            req: range(&one, 1000),
        },
        Case {
            what: format!(
                "{} series, {} h, step 1 s: avg by (node) ({METRIC})",
                a.nodes * a.gpus,
                a.hours
            ),
            req: range(&format!("avg by (node) ({METRIC})"), 1000),
        },
        Case {
            what: format!(
                "{} series, {} h, step 1 s: avg({METRIC})",
                a.nodes * a.gpus,
                a.hours
            ),
            req: range(&format!("avg({METRIC})"), 1000),
        },
    ];
    let mut results = Vec::new();
    for case in &cases {
        let mut times = Vec::with_capacity(a.runs);
        let mut points = 0usize;
        for run in 0..=a.runs {
            let t = Instant::now();
            let resp = client
                .query_range(case.req.clone())
                .await
                .map_err(crate::commands::status_error)?
                .into_inner();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            points = resp
                .series
                .iter()
                .map(|s| s.points.len() + s.values.len())
                .sum();
            if run > 0 {
                times.push(ms);
            }
        }
        times.sort_by(f64::total_cmp);
        let p50 = times[times.len() / 2];
        let max = times[times.len() - 1];
        results.push((case.what.clone(), points, p50, max));
    }
    if a.json {
        let list: Vec<_> = results
            .iter()
            .map(|(what, points, p50, max)| {
                serde_json::json!({"query": what, "points": points, "p50_ms": p50, "max_ms": max})
            })
            .collect();
        return Ok(serde_json::json!({
            "series": a.nodes * a.gpus,
            "hours": a.hours,
            "stored_samples": samples,
            "fill_seconds": fill_s,
            "runs": a.runs,
            "results": list,
        })
        .to_string());
    }
    let mut out = format!(
        "{} samples stored in {fill_s:.1} s; {} timed runs each (after one warm-up)\n",
        samples, a.runs
    );
    for (what, points, p50, max) in results {
        out.push_str(&format!(
            "{what}\n  {points} points  p50 {p50:.1} ms  max {max:.1} ms\n"
        ));
    }
    Ok(out.trim_end().to_string())
}
