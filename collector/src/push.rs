//! The `Push` service: samples a model server, batch job or script reports
//! about itself (real traffic's request counts and latencies, a model's
//! accuracy on labelled feedback), with an agent or operator certificate.
//!
//! Stored under the certificate's name as `node`, like an agent's batch
//! (answered after the commit, scored by the detector), but not counted
//! as that node's activity. A request is checked whole before anything is
//! stored: one bad sample refuses all of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};
use vitals_common::identity::Role;
use vitals_common::model::{Labels, valid_label_name, valid_metric_name};
use vitals_proto::v1::{PushRequest, PushResponse, push_server::Push};

use crate::metrics::Counters;
use crate::store::{CleanBatch, SeriesKey, Writer};
use vitals_common::identity::peer_identity;

/// Most samples in one request.
pub const MAX_SAMPLES: usize = 10_000;
/// Most labels on one sample.
const MAX_LABELS: usize = 64;
/// Oldest and newest timestamps accepted, relative to now.
const MAX_AGE_MS: i64 = 3_600_000;
const MAX_AHEAD_MS: i64 = 300_000;

/// Where pushed samples are written from (the store's source name).
const SOURCE: &str = "vitals-collector/push";

pub struct PushService {
    pub writer: Writer,
    /// Sequence numbers in the order batches reach the writer: taken and
    /// sent under this lock, so a later number is never queued first.
    order: tokio::sync::Mutex<()>,
    seq: AtomicU64,
    counters: Arc<Counters>,
}

impl PushService {
    pub fn new(writer: Writer, counters: Arc<Counters>) -> PushService {
        PushService {
            writer,
            order: tokio::sync::Mutex::new(()),
            seq: AtomicU64::new(0),
            counters,
        }
    }
}

/// Checks a request and builds the batch: everything or an error naming
/// the first bad sample.
pub fn batch(node: &str, req: &PushRequest, now: i64) -> Result<CleanBatch, String> {
    if req.samples.is_empty() {
        return Err("no samples".into());
    }
    if req.samples.len() > MAX_SAMPLES {
        return Err(format!(
            "{} samples; at most {MAX_SAMPLES} per request (split it)",
            req.samples.len()
        ));
    }
    let mut b = CleanBatch {
        seq: 0,
        series: Vec::new(),
        series_idx: Vec::new(),
        timestamps_ms: Vec::new(),
        values: Vec::new(),
        events: Vec::new(),
    };
    let mut index: HashMap<Arc<str>, u32> = HashMap::new();
    let mut last_ts: HashMap<u32, i64> = HashMap::new();
    for (i, s) in req.samples.iter().enumerate() {
        let at = |m: String| format!("sample {i} ({}): {m}", s.name);
        if !valid_metric_name(&s.name) {
            return Err(at("not a valid metric name".into()));
        }
        if s.labels.len() > MAX_LABELS {
            return Err(at(format!("more than {MAX_LABELS} labels")));
        }
        let mut labels = Labels::new();
        for l in &s.labels {
            if !valid_label_name(&l.name) || l.name.starts_with("__") {
                return Err(at(format!("{:?} is not a valid label name", l.name)));
            }
            if l.name == "node" && l.value != node {
                return Err(at(format!(
                    "node {:?}: pushed samples are stored under the certificate's name ({node:?}); leave `node` out",
                    l.value
                )));
            }
            if labels.insert(l.name.clone(), l.value.clone()).is_some() {
                return Err(at(format!("label {:?} given twice", l.name)));
            }
        }
        labels.insert("node".into(), node.to_string());
        let ts = if s.timestamp_ms == 0 {
            now
        } else {
            s.timestamp_ms
        };
        if ts < now - MAX_AGE_MS || ts > now + MAX_AHEAD_MS {
            return Err(at(format!(
                "timestamp {ts} is more than 1 h old or 5 min ahead of the collector's clock ({now})"
            )));
        }
        let key = SeriesKey::new(s.name.clone(), labels);
        let idx = match index.get(&*key.key) {
            Some(i) => *i,
            None => {
                let i = b.series.len() as u32;
                index.insert(key.key.clone(), i);
                b.series.push(Arc::new(key));
                i
            }
        };
        if last_ts.get(&idx).is_some_and(|t| *t >= ts) {
            return Err(at(
                "timestamps of one series must increase within a request".into(),
            ));
        }
        last_ts.insert(idx, ts);
        b.series_idx.push(idx);
        b.timestamps_ms.push(ts);
        b.values.push(s.value);
    }
    Ok(b)
}

#[tonic::async_trait]
impl Push for PushService {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let r = self.store(request).await;
        if r.is_err() {
            Counters::add(&self.counters.push_rejected, 1);
        }
        r
    }
}

impl PushService {
    async fn store(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let (node, role) = peer_identity(&request)?;
        if role != Role::Agent && role != Role::Operator {
            return Err(Status::permission_denied(format!(
                "certificate of {node} has role {role}; pushing needs an agent or operator certificate"
            )));
        }
        let req = request.into_inner();
        let mut b =
            batch(&node, &req, vitals_common::now_ms()).map_err(Status::invalid_argument)?;
        let n = b.values.len() as u64;
        let rx = {
            let _order = self.order.lock().await;
            b.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            self.writer
                .write_pushed(&node, SOURCE, b)
                .await
                .map_err(Status::unavailable)?
        };
        match rx.await {
            Ok(Ok(_)) => {
                Counters::add(&self.counters.pushed_samples, n);
                Ok(Response::new(PushResponse { accepted: n as u32 }))
            }
            Ok(Err(e)) => Err(Status::unavailable(format!("not stored: {e}"))),
            Err(_) => Err(Status::unavailable("the store closed; not stored")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_proto::v1::{Label, PushedSample};

    fn sample(name: &str, labels: &[(&str, &str)], value: f64, ts: i64) -> PushedSample {
        PushedSample {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(n, v)| Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            value,
            timestamp_ms: ts,
        }
    }

    #[test]
    fn requests_are_checked_whole() {
        let now = 1_800_000_000_000;
        let ok = PushRequest {
            samples: vec![
                sample("inference_requests_total", &[("model", "m")], 10.0, 0),
                sample("inference_requests_total", &[("model", "m")], 11.0, now + 1),
                sample(
                    "model_accuracy",
                    &[("model", "m"), ("node", "srv")],
                    0.93,
                    now - 5000,
                ),
            ],
        };
        let b = batch("srv", &ok, now).unwrap();
        assert_eq!(b.series.len(), 2);
        assert_eq!(b.series_idx, vec![0, 0, 1]);
        assert_eq!(b.timestamps_ms, vec![now, now + 1, now - 5000]);
        assert_eq!(
            b.series[0].labels.get("node").map(String::as_str),
            Some("srv")
        );

        let bad =
            |samples: Vec<PushedSample>| batch("srv", &PushRequest { samples }, now).unwrap_err();
        assert!(bad(vec![]).contains("no samples"));
        assert!(bad(vec![sample("9bad", &[], 1.0, 0)]).contains("metric name"));
        assert!(bad(vec![sample("m", &[("node", "other")], 1.0, 0)]).contains("certificate"));
        assert!(bad(vec![sample("m", &[("__name__", "x")], 1.0, 0)]).contains("label name"));
        assert!(bad(vec![sample("m", &[], 1.0, now - 2 * 3_600_000)]).contains("1 h old"));
        assert!(bad(vec![sample("m", &[], 1.0, now + 600_000)]).contains("ahead"));
        let e = bad(vec![sample("m", &[], 1.0, now), sample("m", &[], 2.0, now)]);
        assert!(
            e.starts_with("sample 1 (m)") && e.contains("increase"),
            "{e}"
        );
        let many = (0..=MAX_SAMPLES)
            .map(|i| sample("m", &[], 1.0, now - i as i64))
            .collect();
        assert!(bad(many).contains("at most"));
    }
}
