//! What the store tests share: label sets and batches built sample by
//! sample.
#![allow(dead_code)]

use std::sync::Arc;

use vitals_collector::store::{CleanBatch, SeriesKey};
use vitals_common::model::Labels;

pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Samples of one node, series by series as they are put, for one batch.
#[derive(Default)]
pub struct Samples {
    keys: Vec<Arc<SeriesKey>>,
    idx: Vec<u32>,
    ts: Vec<i64>,
    vals: Vec<f64>,
}

impl Samples {
    pub fn put(&mut self, name: &str, l: &Labels, t: i64, v: f64) {
        let pos = match self
            .keys
            .iter()
            .position(|k| &*k.name == name && *k.labels == *l)
        {
            Some(p) => p,
            None => {
                self.keys
                    .push(Arc::new(SeriesKey::new(name.to_string(), l.clone())));
                self.keys.len() - 1
            }
        };
        self.idx.push(pos as u32);
        self.ts.push(t);
        self.vals.push(v);
    }

    pub fn batch(self, seq: u64) -> CleanBatch {
        CleanBatch {
            seq,
            series: self.keys,
            series_idx: self.idx,
            timestamps_ms: self.ts,
            values: self.vals,
            events: Vec::new(),
        }
    }
}

/// Steps `engine` over the store at `from`, `from + step`, ... up to `to`
/// (off the async threads) and returns every change, with when.
pub async fn changes_between(
    mut engine: vitals_collector::alert::engine::Engine,
    store: &vitals_collector::store::Store,
    from: i64,
    to: i64,
    step: i64,
) -> Vec<(i64, vitals_collector::alert::engine::Change)> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut t = from;
        while t <= to {
            out.extend(engine.step(&store, t).into_iter().map(|c| (t, c)));
            t += step;
        }
        out
    })
    .await
    .expect("the engine stepped without panicking")
}

/// [`changes_between`], only what fired.
pub async fn fired_between(
    engine: vitals_collector::alert::engine::Engine,
    store: &vitals_collector::store::Store,
    from: i64,
    to: i64,
    step: i64,
) -> Vec<(i64, vitals_collector::alert::engine::Alert)> {
    changes_between(engine, store, from, to, step)
        .await
        .into_iter()
        .filter_map(|(t, c)| match c {
            vitals_collector::alert::engine::Change::Fired(a) => Some((t, a)),
            _ => None,
        })
        .collect()
}
