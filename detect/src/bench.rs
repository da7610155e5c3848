//! Throughput and memory of the detector, for `vitals bench detect`.
//!
//! Feeds `series` detectors in a [`DetectorSet`] round-robin (as ingest
//! does: one sample of each series per scrape interval) with synthetic
//! samples (an hourly wave, noise, a spike every 5,000 samples), on one
//! thread.

use std::time::{Duration, Instant};

use crate::{Detector, DetectorSet, Params};

/// What one bench run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub series: usize,
    pub samples: u64,
    pub elapsed: Duration,
    /// Samples scored per second on one core.
    pub samples_per_sec: f64,
    /// `size_of::<Detector>()`: the whole state of one series.
    pub detector_bytes: usize,
    /// Bytes of the `DetectorSet<u64>` divided by the series in it (key,
    /// detector and the hash map's spare buckets).
    pub set_bytes_per_series: usize,
    /// Spikes injected after the warm-up (the first 1,000 samples).
    pub spikes: u64,
    /// Samples after the warm-up that scored at least 0.5: about `spikes`
    /// when the detector works.
    pub alarms: u64,
}

/// A small deterministic generator (64-bit LCG), so runs are comparable.
struct Lcg(u64);

impl Lcg {
    fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Scores `rounds` samples of each of `series` series, 10 s apart.
pub fn run(series: usize, rounds: u64) -> Report {
    let params = Params::default();
    let mut set: DetectorSet<u64> = DetectorSet::new(&params);
    let mut rng = Lcg(0x5eed);
    // Inputs are generated up front so that only scoring is timed.
    let noise: Vec<f64> = (0..4096).map(|_| rng.next_f64() - 0.5).collect();
    let ids: Vec<u64> = (0..series as u64).collect();
    let (mut alarms, mut spikes) = (0u64, 0u64);
    let start = Instant::now();
    for r in 0..rounds {
        let ts = 1_700_000_000_000 + r as i64 * 10_000;
        let wave = ((ts % 3_600_000) as f64 / 3_600_000.0 * std::f64::consts::TAU).sin();
        for &id in &ids {
            let spike = (r + id) % 5_000 == 4_999;
            let v = 100.0
                + id as f64
                + 10.0 * wave
                + noise[((r + id * 7) & 4095) as usize]
                + if spike { 50.0 } else { 0.0 };
            let score = set.score(id, ts, v);
            if r >= 1_000 {
                spikes += u64::from(spike);
                alarms += u64::from(score >= 0.5);
            }
        }
    }
    let elapsed = start.elapsed();
    let samples = rounds * series as u64;
    Report {
        series,
        samples,
        elapsed,
        samples_per_sec: samples as f64 / elapsed.as_secs_f64().max(1e-9),
        detector_bytes: std::mem::size_of::<Detector>(),
        set_bytes_per_series: set.heap_bytes() / series.max(1),
        spikes,
        alarms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_counts_what_it_ran() {
        let r = run(10, 12_000);
        assert_eq!(r.samples, 120_000);
        // Each series gets two spikes after the warm-up; each is an alarm,
        // and nothing else is.
        assert_eq!(r.spikes, 20);
        assert_eq!(r.alarms, r.spikes);
        assert!(r.samples_per_sec > 0.0);
        assert!(r.detector_bytes >= 256, "{}", r.detector_bytes);
        assert!(r.set_bytes_per_series > r.detector_bytes);
    }
}
