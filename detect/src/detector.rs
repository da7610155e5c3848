//! The per-series detector: envelopes over a few derived series, a fading
//! refractory memory, and a squashing to `[0, 1]`.

const DAY_MS: i64 = 86_400_000;
const WEEK_MS: i64 = 7 * DAY_MS;
/// Buckets of the daily profile (30 minutes each).
const DAY_BUCKETS: usize = 48;
/// Buckets of the weekly profile (2 hours each).
const WEEK_BUCKETS: usize = 84;
/// Larger magnitudes are skipped like infinities: the state's arithmetic
/// (differences of extremes) must not overflow.
pub const MAX_ABS: f64 = 1e150;
/// Number of derived series watched (see [`Channel`]).
pub const CHANNELS: usize = 4;

/// The derived series a detector watches, each against its own envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The value itself: spikes and jumps to a level not seen before.
    Value = 0,
    /// A moving average of the value: a level shift or drift that the
    /// noise of single samples hides.
    Level = 1,
    /// A moving average of the value minus its daily profile: a day that
    /// does not look like the days before it.
    Season = 2,
    /// A moving average of the value minus its weekly profile: a day that
    /// does not look like the same weekday before it.
    Week = 3,
}

/// The detector's parameters: one set for every series.
///
/// Rates are per sample unless they say otherwise. The defaults are the
/// measured configuration (see `docs/DETECTION.md`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Samples a channel learns before it may score.
    pub warmup: u32,
    /// Smoothing of the [`Channel::Level`] moving average.
    pub level_alpha: f64,
    /// Smoothing of the [`Channel::Season`] and [`Channel::Week`] moving
    /// averages.
    pub season_smooth_alpha: f64,
    /// Memory of the centre each envelope relaxes towards.
    pub center_alpha: f64,
    /// How fast an envelope relaxes towards its centre: the gap shrinks by
    /// this fraction per sample (0.00005: half-life of ~14,000 samples).
    pub relax: f64,
    /// Memory of each bucket of the daily and weekly profiles, per visit.
    pub season_alpha: f64,
    /// Periods (days for [`Channel::Season`], weeks for [`Channel::Week`])
    /// of data before a seasonal channel scores, so that its envelope has
    /// seen every phase several times.
    pub season_warmup_periods: i64,
    /// Weight of each channel's exceedance (indexed by [`Channel`]).
    pub weights: [f64; CHANNELS],
    /// Per sample, the memory of the last alarm is multiplied by this.
    pub refractory_decay: f64,
    /// Weighted exceedance that maps to a score of 0.5.
    pub half_score: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            warmup: 100,
            level_alpha: 0.05,
            season_smooth_alpha: 0.2,
            center_alpha: 0.003,
            relax: 0.00005,
            season_alpha: 0.2,
            season_warmup_periods: 4,
            weights: [4.0, 1.0, 1.0, 1.0],
            refractory_decay: 0.98,
            half_score: 0.08,
        }
    }
}

/// What the detector saw in one sample: each channel's exceedance of its
/// envelope (in envelope widths, 0 inside it), the weighted surprise before
/// the refractory step, and the score.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Channels {
    pub exceed: [f64; CHANNELS],
    pub surprise: f64,
    pub score: f64,
}

/// The remembered range of one derived series: it widens at once to take
/// in a new extreme and relaxes slowly towards the series' centre.
#[derive(Debug, Clone, Copy)]
struct Envelope {
    hi: f64,
    lo: f64,
    center: f64,
    n: u32,
}

impl Envelope {
    const fn new() -> Self {
        Self {
            hi: 0.0,
            lo: 0.0,
            center: 0.0,
            n: 0,
        }
    }

    /// How far `x` lies outside the envelope, in envelope widths (0 inside).
    /// A series that never moved has a width of ~0, so any change is large.
    fn exceed(&self, x: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let width = (self.hi - self.lo).max(1e-9 * self.center.abs()).max(1e-12);
        ((x - self.hi).max(self.lo - x) / width).max(0.0)
    }

    fn update(&mut self, x: f64, p: &Params) {
        if self.n == 0 {
            *self = Self {
                hi: x,
                lo: x,
                center: x,
                n: 1,
            };
            return;
        }
        self.n = self.n.saturating_add(1);
        let a = p.center_alpha.max(1.0 / f64::from(self.n));
        self.center += a * (x - self.center);
        self.hi = x.max(self.hi - p.relax * (self.hi - self.center));
        self.lo = x.min(self.lo + p.relax * (self.center - self.lo));
    }
}

/// Online detector for one series: `size_of::<Detector>()` bytes, no heap,
/// O(1) work per sample.
#[derive(Debug, Clone)]
pub struct Detector {
    p: Params,
    n: u32,
    first_ts: i64,
    level: f64,
    season_level: f64,
    week_level: f64,
    peak: f64,
    env: [Envelope; CHANNELS],
    daily: Profile<DAY_BUCKETS>,
    weekly: Profile<WEEK_BUCKETS>,
}

impl Detector {
    pub fn new(p: &Params) -> Self {
        Self {
            p: *p,
            n: 0,
            first_ts: 0,
            level: 0.0,
            season_level: 0.0,
            week_level: 0.0,
            peak: 0.0,
            env: [Envelope::new(); CHANNELS],
            daily: Profile::new(),
            weekly: Profile::new(),
        }
    }

    /// Finite samples seen.
    pub fn samples(&self) -> u32 {
        self.n
    }

    /// Scores one sample in `[0, 1]`. NaN, infinities and magnitudes beyond
    /// [`MAX_ABS`] score 0 and leave the state untouched.
    pub fn score(&mut self, ts_ms: i64, value: f64) -> f64 {
        self.observe(ts_ms, value).score
    }

    /// Like [`score`](Self::score), with what each channel saw (evidence
    /// for an alert: which kind of change it was).
    pub fn observe(&mut self, ts_ms: i64, x: f64) -> Channels {
        if x.is_nan() || x.abs() > MAX_ABS {
            return Channels::default();
        }
        let p = self.p;
        if self.n == 0 {
            self.first_ts = ts_ms;
            self.level = x;
        }
        self.n = self.n.saturating_add(1);
        self.level += p.level_alpha * (x - self.level);

        let age = ts_ms.saturating_sub(self.first_ts);
        // A profile predicts once it has seen a period and a half; the
        // residual's envelope needs several whole periods before it has
        // seen every phase.
        let season = match self.daily.predict(ts_ms, DAY_MS) {
            Some(pred) if age >= DAY_MS * 3 / 2 => {
                self.season_level += p.season_smooth_alpha * (x - pred - self.season_level);
                Some(self.season_level)
            }
            _ => None,
        };
        let week = match self.weekly.predict(ts_ms, WEEK_MS) {
            Some(pred) if age >= WEEK_MS * 3 / 2 => {
                self.week_level += p.season_smooth_alpha * (x - pred - self.week_level);
                Some(self.week_level)
            }
            _ => None,
        };
        let season_scores = age >= p.season_warmup_periods.saturating_mul(DAY_MS);
        let week_scores = age >= p.season_warmup_periods.saturating_mul(WEEK_MS);
        let derived = [Some(x), Some(self.level), season, week];

        let mut ch = Channels::default();
        for (k, d) in derived.into_iter().enumerate() {
            let Some(v) = d else { continue };
            let env = &mut self.env[k];
            let may_score = match k {
                k if k == Channel::Season as usize => season_scores,
                k if k == Channel::Week as usize => week_scores,
                _ => true,
            };
            if env.n >= p.warmup && may_score {
                ch.exceed[k] = env.exceed(v);
                ch.surprise = ch.surprise.max(p.weights[k] * ch.exceed[k]);
            }
            env.update(v, &p);
        }
        self.daily.update(ts_ms, DAY_MS, x, p.season_alpha);
        self.weekly.update(ts_ms, WEEK_MS, x, p.season_alpha);

        // Refractory: while the surprise stays below the last alarm (which
        // fades), it is not reported again; only a larger one scores.
        let s = ch.surprise;
        let out = if s > self.peak { s } else { 0.0 };
        self.peak = (self.peak * p.refractory_decay).max(s);
        // Squashed so that a score of 0.5 is `half_score`; squared so that
        // the tiny exceedances of a noisy series stay near 0.
        let q = (out / p.half_score).powi(2);
        ch.score = if q.is_finite() { q / (1.0 + q) } else { 1.0 };
        ch
    }
}

/// A periodic profile: `N` buckets over `period_ms`, predicting by linear
/// interpolation between the two buckets around the phase.
#[derive(Debug, Clone, Copy)]
struct Profile<const N: usize> {
    buckets: [f32; N],
}

impl<const N: usize> Profile<N> {
    const fn new() -> Self {
        Self {
            buckets: [f32::NAN; N],
        }
    }

    /// Bucket pair around the phase of `ts_ms` and the weight of the second.
    fn pos(ts_ms: i64, period_ms: i64) -> (usize, usize, f64) {
        let u = ts_ms.rem_euclid(period_ms) as f64 / period_ms as f64 * N as f64 - 0.5;
        let u = if u < 0.0 { u + N as f64 } else { u };
        let i = (u.floor() as usize).min(N - 1);
        (i, (i + 1) % N, u - u.floor())
    }

    fn predict(&self, ts_ms: i64, period_ms: i64) -> Option<f64> {
        let (i, j, w) = Self::pos(ts_ms, period_ms);
        let (a, b) = (f64::from(self.buckets[i]), f64::from(self.buckets[j]));
        match (a.is_nan(), b.is_nan()) {
            (false, false) => Some(a * (1.0 - w) + b * w),
            (false, true) => Some(a),
            (true, false) => Some(b),
            (true, true) => None,
        }
    }

    /// Moves the two buckets around the phase towards `x`, by `alpha`
    /// weighted by closeness; an empty bucket takes `x`.
    fn update(&mut self, ts_ms: i64, period_ms: i64, x: f64, alpha: f64) {
        let (i, j, w) = Self::pos(ts_ms, period_ms);
        for (k, wk) in [(i, 1.0 - w), (j, w)] {
            let old = f64::from(self.buckets[k]);
            self.buckets[k] = if old.is_nan() {
                x as f32
            } else {
                (old + alpha * wk * (x - old)) as f32
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    /// Deterministic noise in [-0.5, 0.5).
    fn noise(i: u64) -> f64 {
        let x = i
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    fn run(det: &mut Detector, from: i64, step: i64, values: &[f64]) -> Vec<f64> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| det.score(from + i as i64 * step, v))
            .collect()
    }

    fn max(xs: &[f64]) -> f64 {
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }

    #[test]
    fn constant_series_never_scores_after_warmup() {
        for c in [0.0, 45.0, -3.5e9, 1e-12] {
            let mut d = Detector::new(&Params::default());
            let scores = run(&mut d, 0, 5 * MIN, &vec![c; 10_000]);
            assert_eq!(max(&scores), 0.0, "constant {c}");
        }
    }

    #[test]
    fn steady_noisy_daily_wave_stays_low() {
        let mut d = Detector::new(&Params::default());
        let values: Vec<f64> = (0..20_000u64)
            .map(|i| {
                let day = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
                50.0 + 20.0 * day.sin() + 4.0 * noise(i)
            })
            .collect();
        let scores = run(&mut d, 0, 5 * MIN, &values);
        // Past the first days nothing new happens: the small new extremes
        // of the noise stay under 0.5, the score NAB's threshold lands on.
        assert!(max(&scores[3000..]) < 0.5, "{}", max(&scores[3000..]));
    }

    #[test]
    fn spike_after_long_stable_period_scores_near_one() {
        let mut d = Detector::new(&Params::default());
        let calm: Vec<f64> = (0..5000u64).map(|i| 10.0 + 0.2 * noise(i)).collect();
        let before = run(&mut d, 0, MIN, &calm);
        let spike = d.score(5000 * MIN, 20.0);
        assert!(spike > 0.95, "spike scored {spike}");
        assert!(
            max(&before[1000..]) < 0.5,
            "calm scored {}",
            max(&before[1000..])
        );
        assert!(spike > max(&before[1000..]) + 0.4);
        // The same spike in the other direction.
        let mut d = Detector::new(&Params::default());
        run(&mut d, 0, MIN, &calm);
        assert!(d.score(5000 * MIN, 0.0) > 0.95);
    }

    #[test]
    fn level_shift_scores_high_then_settles() {
        let mut d = Detector::new(&Params::default());
        let step = 5 * MIN;
        let low: Vec<f64> = (0..3000u64).map(|i| 10.0 + noise(i)).collect();
        let high: Vec<f64> = (3000..6000u64).map(|i| 20.0 + noise(i)).collect();
        let before = run(&mut d, 0, step, &low);
        let after = run(&mut d, 3000 * step, step, &high);
        assert!(after[0] > 0.9, "shift scored {}", after[0]);
        assert!(max(&before[500..]) < 0.5);
        // A day later the new level is normal: nothing scores high.
        let settled = &after[300..];
        assert!(max(settled) < 0.3, "after the shift: {}", max(settled));
    }

    #[test]
    fn nan_and_infinities_are_skipped_without_poisoning() {
        let p = Params::default();
        let (mut clean, mut dirty) = (Detector::new(&p), Detector::new(&p));
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300, -f64::MAX];
        for i in 0..6000u64 {
            let ts = i as i64 * MIN;
            let v = 5.0 + noise(i) + if i == 5000 { 30.0 } else { 0.0 };
            if i % 10 == 3 {
                let junk = bad[(i / 10) as usize % bad.len()];
                assert_eq!(dirty.score(ts, junk), 0.0, "non-finite scores 0");
            }
            let (a, b) = (clean.score(ts, v), dirty.score(ts, v));
            assert_eq!(a, b, "sample {i}: state poisoned");
            assert!((0.0..=1.0).contains(&a));
            if i == 5000 {
                assert!(b > 0.95, "spike after junk scored {b}");
            }
        }
        assert_eq!(clean.samples(), dirty.samples());
    }

    #[test]
    fn scores_stay_in_range_on_wild_input() {
        let mut d = Detector::new(&Params::default());
        for i in 0..5000u64 {
            let v = match i % 7 {
                0 => 1e149 * noise(i),
                1 => -1e-300,
                2 => 0.0,
                _ => noise(i) * 1e6,
            };
            let s = d.score(i as i64 * 1000, v);
            assert!((0.0..=1.0).contains(&s), "sample {i}: {s}");
        }
    }

    #[test]
    fn a_day_without_its_usual_peak_is_caught_by_the_daily_profile() {
        // High during the day, low at night, every day; then one day stays
        // low: every value of it lies inside the usual range.
        let mut d = Detector::new(&Params::default());
        let per_day = 288u64;
        let mut during_missing_day: f64 = 0.0;
        let mut season_fired = false;
        let mut before: f64 = 0.0;
        for i in 0..(12 * per_day) {
            let (day, slot) = (i / per_day, i % per_day);
            let peak = day != 9 && (96..216).contains(&slot);
            let v = if peak { 80.0 } else { 20.0 } + 2.0 * noise(i);
            let c = d.observe(i as i64 * 5 * MIN, v);
            match day {
                5..=8 => before = before.max(c.score),
                9 => {
                    during_missing_day = during_missing_day.max(c.score);
                    season_fired |= c.score > 0.5 && c.exceed[Channel::Season as usize] > 0.0;
                }
                _ => {}
            }
        }
        assert!(before < 0.5, "ordinary days scored {before}");
        assert!(
            during_missing_day > 0.5,
            "missing peak scored {during_missing_day}"
        );
        assert!(
            season_fired,
            "the alarm did not come from the daily profile"
        );
    }

    #[test]
    fn state_is_small() {
        // 100,000 series must fit comfortably in memory: see docs/DETECTION.md.
        assert!(
            std::mem::size_of::<Detector>() <= 1024,
            "{}",
            std::mem::size_of::<Detector>()
        );
    }
}
