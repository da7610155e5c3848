//! One collection cycle: run every enabled source, report on each, and
//! turn the result into one batch.

use std::collections::HashMap;
use std::time::Instant;

use vitals_common::model::{BatchBuilder, LabelSet, Labels, Sample};
use vitals_proto::v1::{Batch, Event, Label};

use crate::config::RawConfig;
use crate::sources::{self, Source, SourceError, SourceEvent};

/// How one source did in one cycle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    pub source: &'static str,
    /// "ok", "unavailable" or "error".
    pub status: &'static str,
    pub duration_seconds: f64,
    pub samples: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Cycle {
    pub samples: Vec<Sample>,
    /// Events the sources noticed this cycle (those of a failed source too:
    /// what it saw happen did happen).
    pub events: Vec<SourceEvent>,
    pub reports: Vec<SourceReport>,
}

/// The enabled sources and what the agent remembers about them.
pub struct Sources {
    sources: Vec<Box<dyn Source>>,
    /// `{source="NAME"}` of each source's self-metrics, made once.
    self_labels: Vec<LabelSet>,
    /// One source's samples while it runs (kept for its capacity).
    scratch: Vec<Sample>,
    /// Samples in the last cycle: the next one reserves as many at once.
    last_len: usize,
    unavailable_logged: HashMap<&'static str, bool>,
    errors_total: HashMap<&'static str, u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown source {0:?}; known sources: {1}")]
pub struct UnknownSource(pub String, pub String);

impl Sources {
    /// The sources the config enables, or exactly those in `only` if given.
    pub fn new(cfg: &RawConfig, only: &[String]) -> Result<Sources, UnknownSource> {
        for name in only {
            if !sources::SOURCES.iter().any(|s| s.name == name) {
                let known: Vec<&str> = sources::SOURCES.iter().map(|s| s.name).collect();
                return Err(UnknownSource(name.clone(), known.join(", ")));
            }
        }
        let list: Vec<Box<dyn Source>> = sources::SOURCES
            .iter()
            .filter(|spec| {
                if only.is_empty() {
                    sources::enabled(cfg, spec)
                } else {
                    only.iter().any(|n| n == spec.name)
                }
            })
            .map(|spec| (spec.build)(cfg))
            .collect();
        let self_labels = list
            .iter()
            .map(|s| LabelSet::default().with("source", s.name()))
            .collect();
        Ok(Sources {
            sources: list,
            self_labels,
            scratch: Vec::new(),
            last_len: 0,
            unavailable_logged: HashMap::new(),
            errors_total: HashMap::new(),
        })
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.sources.iter().map(|s| s.name()).collect()
    }

    /// Runs every source once. Source self-metrics are appended.
    pub fn collect(&mut self) -> Cycle {
        let mut samples = Vec::with_capacity(self.last_len);
        let mut events = Vec::new();
        let mut reports = Vec::with_capacity(self.sources.len());
        for (src, self_labels) in self.sources.iter_mut().zip(&self.self_labels) {
            let name = src.name();
            let start = Instant::now();
            let out = &mut self.scratch;
            out.clear();
            let result = src.collect(out);
            events.append(&mut src.events());
            let duration = start.elapsed().as_secs_f64();
            let (status, error) = match result {
                Ok(()) => ("ok", None),
                Err(SourceError::Unavailable(why)) => {
                    if !self.unavailable_logged.insert(name, true).unwrap_or(false) {
                        tracing::debug!(source = name, reason = %why, "source not available on this host; staying quiet");
                    }
                    out.clear();
                    ("unavailable", Some(why))
                }
                Err(SourceError::Failed(why)) => {
                    *self.errors_total.entry(name).or_default() += 1;
                    tracing::warn!(source = name, error = %why, "source failed this cycle; its samples are skipped");
                    out.clear();
                    ("error", Some(why))
                }
            };
            reports.push(SourceReport {
                source: name,
                status,
                duration_seconds: duration,
                samples: out.len(),
                error,
            });
            samples.append(out);
            if status != "unavailable" {
                samples.push(Sample::with_labels(
                    "vitals_source_duration_seconds",
                    self_labels,
                    duration,
                ));
                samples.push(Sample::with_labels(
                    "vitals_source_success",
                    self_labels,
                    if status == "ok" { 1.0 } else { 0.0 },
                ));
                samples.push(Sample::with_labels(
                    "vitals_source_errors_total",
                    self_labels,
                    self.errors_total.get(name).copied().unwrap_or(0) as f64,
                ));
            }
        }
        self.last_len = samples.len();
        Cycle {
            samples,
            events,
            reports,
        }
    }
}

/// Builds the batch for one cycle: every sample and event gets the node and
/// the cycle's timestamp. Duplicate series within a cycle keep the first
/// value.
pub fn to_batch(
    node: &str,
    timestamp_ms: i64,
    samples: &[Sample],
    events: &[SourceEvent],
) -> Batch {
    let mut b = BatchBuilder::new();
    let mut seen = std::collections::HashSet::new();
    for s in samples {
        let mut labels: Labels = (*s.labels).clone();
        labels.insert("node".into(), node.into());
        if seen.insert((s.name.clone(), labels.clone())) {
            b.push(&s.name, &labels, timestamp_ms, s.value);
        }
    }
    for e in events {
        b.push_event(Event {
            timestamp_ms,
            node: node.into(),
            kind: e.kind.clone(),
            severity: e.severity as i32,
            message: e.message.clone(),
            labels: e
                .labels
                .iter()
                .map(|(k, v)| Label {
                    name: k.clone(),
                    value: v.clone(),
                })
                .collect(),
        });
    }
    b.finish()
}
