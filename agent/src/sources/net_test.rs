//! Scheduled throughput tests (`[[net_test.schedule]]`): this agent sends
//! to another agent's net-test listener every `every` (see
//! `crate::net_test`) on the source's own runtime (four threads, so that a
//! test's streams go out in parallel), and each cycle reports
//! the last result per configured receiver (label `peer`: the `to`
//! address): `vitals_net_test_bits_per_second`, `vitals_net_test_seconds`,
//! `vitals_net_test_bytes`, `vitals_net_test_retransmits` (where
//! readable), `vitals_net_test_link_speed_bytes` and
//! `vitals_net_test_link_ratio` (where the sending interface has a
//! negotiated speed), and `vitals_net_test_success` (0 after a failed or
//! incomplete test, which is logged and tried again within a minute).

use std::sync::{Arc, Mutex};

use vitals_common::model::{LabelSet, Labels, Sample};
use vitals_proto::v1::NetTestResult;

use super::background::Background;
use super::{Source, SourceError};
use crate::config::RawConfig;
use crate::net_test::{self, ScheduleConfig, Shared};

/// The longest wait before a failed scheduled test is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(60);

struct Entry {
    cfg: ScheduleConfig,
    labels: LabelSet,
    last: Mutex<Option<Result<NetTestResult, String>>>,
}

pub struct NetTest {
    entries: Vec<Arc<Entry>>,
    raw: RawConfig,
    /// The sending thread, once started.
    background: Option<Background>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let entries = cfg
        .net_test
        .schedule
        .iter()
        .map(|s| {
            Arc::new(Entry {
                cfg: s.clone(),
                labels: LabelSet::new(Labels::from([("peer".to_string(), s.to.clone())])),
                last: Mutex::new(None),
            })
        })
        .collect();
    Box::new(NetTest {
        entries,
        raw: cfg.clone(),
        background: None,
    })
}

impl NetTest {
    fn start(&mut self) -> Result<(), SourceError> {
        let tls = self
            .raw
            .tls
            .load()
            .map_err(|e| SourceError::Failed(format!("net test: {e}")))?;
        let node = match &self.raw.node {
            Some(n) => n.clone(),
            None => {
                tls.own_identity()
                    .map_err(|e| SourceError::Failed(format!("net test: {e}")))?
                    .0
            }
        };
        let shared = Arc::new(Shared {
            node,
            tls,
            max_bytes: self.raw.net_test.max_bytes,
            max_duration: self.raw.net_test.max_duration,
            procfs: self.raw.paths.procfs.clone(),
            sysfs: self.raw.paths.sysfs.clone(),
        });
        // Several threads: a test's streams are sent in parallel, as a
        // fast link needs.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .thread_name("vitals-net-test")
            .enable_all()
            .build()
            .map_err(|e| SourceError::Failed(format!("cannot start the net test runtime: {e}")))?;
        let tasks = self.entries.iter().map(|e| {
            let (e, shared) = (e.clone(), shared.clone());
            async move {
                loop {
                    let started = tokio::time::Instant::now();
                    let r = net_test::send(&shared, &e.cfg.to, e.cfg.bytes, e.cfg.streams).await;
                    // A failed test is tried again within a minute, not
                    // only at the next `every`.
                    let next = if r.as_ref().is_ok_and(|r| r.complete) {
                        e.cfg.every
                    } else {
                        e.cfg.every.min(RETRY)
                    };
                    match &r {
                        Ok(r) if !r.complete => tracing::warn!(to = %e.cfg.to, bytes = r.bytes, "scheduled net test incomplete: the receiver's limit ended it"),
                        Ok(_) => {}
                        Err(m) => tracing::warn!(to = %e.cfg.to, "scheduled net test failed: {m}"),
                    }
                    *lock(&e.last) = Some(r);
                    tokio::time::sleep_until(started + next).await;
                }
            }
        });
        self.background = Some(Background::start("net test", "vitals-net-test", rt, tasks)?);
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The samples of one result.
pub fn samples(labels: &LabelSet, last: &Result<NetTestResult, String>, out: &mut Vec<Sample>) {
    let s = |name: &'static str, v: f64| Sample::with_labels(name, labels, v);
    match last {
        Ok(r) => {
            out.push(s(
                "vitals_net_test_success",
                f64::from(u8::from(r.complete)),
            ));
            out.push(s("vitals_net_test_bits_per_second", r.bits_per_second));
            out.push(s("vitals_net_test_seconds", r.seconds));
            out.push(s("vitals_net_test_bytes", r.bytes as f64));
            if let Some(n) = r.retransmits {
                out.push(s("vitals_net_test_retransmits", n as f64));
            }
            if let Some(mbps) = r.link_speed_mbps {
                let bps = mbps as f64 * 1e6;
                out.push(s("vitals_net_test_link_speed_bytes", bps / 8.0));
                out.push(s("vitals_net_test_link_ratio", r.bits_per_second / bps));
            }
        }
        Err(_) => out.push(s("vitals_net_test_success", 0.0)),
    }
}

impl Source for NetTest {
    fn name(&self) -> &'static str {
        "net_test"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        if self.entries.is_empty() {
            return Err(SourceError::Unavailable(
                "no [[net_test.schedule]] configured".into(),
            ));
        }
        if self.background.is_none() {
            self.start()?;
        }
        for e in &self.entries {
            if let Some(last) = &*lock(&e.last) {
                samples(&e.labels, last, out);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_becomes_samples() {
        let labels = LabelSet::new(Labels::from([("peer".to_string(), "nas:7444".to_string())]));
        let mut out = Vec::new();
        let r = NetTestResult {
            bits_per_second: 30e9,
            bytes: 1 << 30,
            seconds: 0.286,
            retransmits: Some(12),
            link_speed_mbps: Some(100_000),
            complete: true,
            ..Default::default()
        };
        samples(&labels, &Ok(r), &mut out);
        let get =
            |out: &[Sample], n: &str| out.iter().find(|s| s.name.as_str() == n).map(|s| s.value);
        assert_eq!(get(&out, "vitals_net_test_link_ratio"), Some(0.3));
        assert_eq!(get(&out, "vitals_net_test_retransmits"), Some(12.0));
        assert_eq!(get(&out, "vitals_net_test_success"), Some(1.0));
        out.clear();
        let r = NetTestResult {
            complete: true,
            ..Default::default()
        };
        samples(&labels, &Ok(r), &mut out);
        assert_eq!(
            get(&out, "vitals_net_test_link_ratio"),
            None,
            "speed unknown: no ratio"
        );
        out.clear();
        samples(&labels, &Err("refused".into()), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].value, 0.0);
    }
}
