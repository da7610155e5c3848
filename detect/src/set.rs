//! Many detectors, one per series, keyed by the caller's series id.

use std::collections::HashMap;
use std::hash::Hash;

use crate::{Detector, Params};

/// One [`Detector`] per series, created on the first sample of a series.
///
/// The collector keys it by its series id: `set.score(id, ts_ms, value)` on
/// ingest, `set.remove(&id)` when a series is dropped (retention).
///
/// Detectors are boxed: a detector is most of a kilobyte, and a map of them
/// inline would move every one each time it grows (and keep an eighth of
/// its buckets empty at that size). The map hashes with foldhash (seeded
/// per process), as the keys are the caller's own ids.
#[derive(Debug, Clone)]
pub struct DetectorSet<K> {
    params: Params,
    detectors: HashMap<K, Box<Detector>, foldhash::fast::RandomState>,
}

impl<K: Hash + Eq> DetectorSet<K> {
    pub fn new(params: &Params) -> Self {
        Self {
            params: *params,
            detectors: HashMap::default(),
        }
    }

    /// Scores one sample of series `key` (see [`Detector::score`]).
    pub fn score(&mut self, key: K, ts_ms: i64, value: f64) -> f64 {
        let params = &self.params;
        self.detectors
            .entry(key)
            .or_insert_with(|| Box::new(Detector::new(params)))
            .score(ts_ms, value)
    }

    /// The detector of a series, if it has seen a sample.
    pub fn get(&self, key: &K) -> Option<&Detector> {
        self.detectors.get(key).map(|d| &**d)
    }

    /// Forgets a series; its next sample starts a fresh detector.
    pub fn remove(&mut self, key: &K) -> Option<Detector> {
        self.detectors.remove(key).map(|d| *d)
    }

    /// Number of series with a detector.
    pub fn len(&self) -> usize {
        self.detectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.detectors.is_empty()
    }

    /// Approximate bytes held: every bucket holds a key, a pointer and one
    /// control byte (a hash map keeps its bucket count a power of two at
    /// most 7/8 full), and every detector its own allocation.
    pub fn heap_bytes(&self) -> usize {
        let buckets = (self.detectors.capacity() * 8).div_ceil(7);
        buckets * (std::mem::size_of::<(K, Box<Detector>)>() + 1)
            + self.detectors.len() * std::mem::size_of::<Detector>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_independent() {
        let p = Params::default();
        let mut set = DetectorSet::new(&p);
        let mut alone = Detector::new(&p);
        let mut last = (0.0, 0.0);
        for i in 0..2000i64 {
            let calm = (i % 7) as f64;
            let wild = if i % 100 == 0 { 1e6 } else { (i % 5) as f64 };
            let a = set.score(1u64, i * 60_000, calm);
            let _ = set.score(2u64, i * 60_000, wild);
            let b = alone.score(i * 60_000, calm);
            assert_eq!(a, b, "series 1 must not see series 2's samples");
            last = (a, b);
        }
        assert_eq!(last.0, last.1);
        assert_eq!(set.len(), 2);
        assert!(set.heap_bytes() >= 2 * std::mem::size_of::<Detector>());
        assert!(set.remove(&2).is_some());
        assert_eq!(set.len(), 1);
        assert!(set.get(&1).is_some());
    }
}
