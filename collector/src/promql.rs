//! The query engine: a PromQL subset evaluated over the store, shared by
//! the gRPC `Query` service (and meant for an HTTP API the same way).
//!
//! ```text
//! query := AGG [by (label, ...)] (inner) [by (label, ...)]   AGG: sum avg min max count
//!        | inner
//! inner := selector                              latest sample within 5m (lookback)
//!        | F(selector[d])                        F: rate increase delta changes
//!                                                   avg_over_time max_over_time min_over_time
//!        | quantile_over_time(q, selector[d])
//! ```
//!
//! Selectors, durations and numbers are read by the alert rule language's
//! lexer (`alert::expr`), so a selector means the same in a rule and a query.
//!
//! Semantics follow Prometheus 3 (see docs/QUERY.md): a range `[d]` at time
//! `t` holds the samples in `(t - d, t]`; `rate`, `increase` and `delta`
//! extrapolate to the window's edges as Prometheus' `extrapolatedRate` does
//! (counter resets add the value before the reset; no extrapolation below
//! zero for counters; an edge further than 1.1 average intervals from the
//! first/last sample is extrapolated by half an interval only); functions
//! and aggregations drop the metric name; `by` keeps only the listed labels.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use vitals_common::model::Labels;
use vitals_common::selector::Selector;

use crate::alert::expr::{INSTANT_LOOKBACK, P, RangeFn};
use crate::store::{QueryError, QueryLimits, SeriesPoints, Store, StoreError};

/// An aggregation operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
}

impl AggOp {
    pub(crate) fn by_name(name: &str) -> Option<AggOp> {
        Some(match name {
            "sum" => AggOp::Sum,
            "avg" => AggOp::Avg,
            "min" => AggOp::Min,
            "max" => AggOp::Max,
            "count" => AggOp::Count,
            _ => return None,
        })
    }
}

/// A function over the samples of a range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Func {
    /// `rate`, `increase`, `delta`, `changes`, `*_over_time` (the names the
    /// rule language knows).
    Range(RangeFn),
    /// `quantile_over_time(q, ...)`.
    Quantile(f64),
}

/// What is evaluated per series.
#[derive(Debug, Clone)]
pub enum Inner {
    /// The latest sample within the lookback.
    Selector(Selector),
    Range {
        func: Func,
        sel: Selector,
        window_ms: i64,
    },
}

impl Inner {
    pub fn selector(&self) -> &Selector {
        match self {
            Inner::Selector(s) | Inner::Range { sel: s, .. } => s,
        }
    }

    /// How far before an evaluation time samples are read.
    fn reach_ms(&self) -> i64 {
        match self {
            Inner::Selector(_) => INSTANT_LOOKBACK.as_millis() as i64,
            Inner::Range { window_ms, .. } => *window_ms,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Aggregation {
    pub op: AggOp,
    /// Group by these labels (empty: one group).
    pub by: Vec<String>,
}

/// A parsed query.
#[derive(Debug, Clone)]
pub struct Query {
    pub agg: Option<Aggregation>,
    pub inner: Inner,
}

const AGGREGATIONS: &str = "sum, avg, min, max, count";
const FUNCTIONS: &str = "rate, increase, delta, changes, avg_over_time, max_over_time, min_over_time, quantile_over_time";

/// Parses a query; the error says where and what was expected.
pub fn parse(text: &str) -> Result<Query, String> {
    if text.trim().is_empty() {
        return Err("empty query: give a selector, e.g. node_load1{node=\"a\"}".into());
    }
    let mut p = P::new(text);
    p.ws();
    let save = p.i;
    let name = p.ident();
    let agg = match AggOp::by_name(&name) {
        Some(op) => {
            let mut by = by_clause(&mut p)?;
            p.expect(b'(')?;
            let inner = inner(&mut p)?;
            p.expect(b')')?;
            if by.is_none() {
                by = by_clause(&mut p)?;
            }
            p.ws();
            if p.i != p.s.len() {
                return Err(p.err("unexpected text after the query"));
            }
            return Ok(Query {
                agg: Some(Aggregation {
                    op,
                    by: by.unwrap_or_default(),
                }),
                inner,
            });
        }
        None => {
            p.i = save;
            None
        }
    };
    let inner = inner(&mut p)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the query"));
    }
    Ok(Query { agg, inner })
}

/// `by (a, b)`, if there.
pub(crate) fn by_clause(p: &mut P<'_>) -> Result<Option<Vec<String>>, String> {
    p.ws();
    let save = p.i;
    let word = p.ident();
    if word == "without" {
        return Err("`without` is not supported; list the labels to keep with `by (...)`".into());
    }
    if word != "by" {
        p.i = save;
        return Ok(None);
    }
    p.expect(b'(')?;
    let mut labels = Vec::new();
    loop {
        p.ws();
        if p.peek() == Some(b')') {
            p.i += 1;
            break;
        }
        let l = p.ident();
        if !vitals_common::model::valid_label_name(&l) {
            return Err(p.err("expected a label name in by (...)"));
        }
        labels.push(l);
        p.ws();
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b')') => {}
            _ => return Err(p.err("expected `,` or `)` in by (...)")),
        }
    }
    Ok(Some(labels))
}

fn inner(p: &mut P<'_>) -> Result<Inner, String> {
    p.ws();
    let save = p.i;
    let name = p.ident();
    p.ws();
    if p.peek() != Some(b'(') {
        p.i = save;
        let sel = p.selector()?;
        p.ws();
        if p.peek() == Some(b'[') {
            return Err(p.err(
                "a range selector needs a function around it, e.g. rate(x[5m]) or avg_over_time(x[5m])",
            ));
        }
        return Ok(Inner::Selector(sel));
    }
    p.i += 1;
    if AggOp::by_name(&name).is_some() {
        return Err(format!(
            "aggregations do not nest: {name}(...) inside another aggregation"
        ));
    }
    let func = if name == "quantile_over_time" {
        let q = p.number()?;
        p.expect(b',')?;
        Func::Quantile(q)
    } else {
        match RangeFn::by_name(&name) {
            Some(f) => Func::Range(f),
            None => {
                return Err(format!(
                    "unknown function {name:?}; known: {FUNCTIONS}; aggregations: {AGGREGATIONS}"
                ));
            }
        }
    };
    let sel = p.selector()?;
    let window: Duration = p.duration()?;
    p.expect(b')')?;
    Ok(Inner::Range {
        func,
        sel,
        window_ms: window.as_millis().min(i64::MAX as u128) as i64,
    })
}

// ------------------------------------------------------------- functions --

/// Prometheus' `extrapolatedRate` over the samples of `(range_start,
/// range_end]`: `increase` (is_rate false), `rate` (true) for counters,
/// `delta` for gauges (is_counter false).
pub fn extrapolated_rate(
    points: &[(i64, f64)],
    range_start: i64,
    range_end: i64,
    is_counter: bool,
    is_rate: bool,
) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let (first_t, first_v) = points[0];
    let (last_t, last_v) = points[points.len() - 1];
    let mut result = last_v - first_v;
    if is_counter {
        let mut prev = 0.0;
        for &(_, v) in points {
            if v < prev {
                result += prev;
            }
            prev = v;
        }
    }
    // In f64: the differences of extreme i64 times do not overflow.
    let ms = |a: i64, b: i64| (a as f64 - b as f64) / 1000.0;
    let mut to_start = ms(first_t, range_start);
    let mut to_end = ms(range_end, last_t);
    let sampled = ms(last_t, first_t);
    if sampled <= 0.0 {
        return None;
    }
    let avg_step = sampled / (points.len() - 1) as f64;
    let threshold = avg_step * 1.1;
    if to_start >= threshold {
        to_start = avg_step / 2.0;
    }
    if is_counter && result > 0.0 && first_v >= 0.0 {
        // A counter does not go below zero: extrapolate at most to where
        // it would have been zero.
        let to_zero = sampled * (first_v / result);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    if to_end >= threshold {
        to_end = avg_step / 2.0;
    }
    let mut factor = (sampled + to_start + to_end) / sampled;
    if is_rate {
        factor /= ms(range_end, range_start);
    }
    Some(result * factor)
}

/// Prometheus' `quantile`: linear interpolation between the closest ranks;
/// q < 0 is -Inf, q > 1 is +Inf.
pub fn quantile(q: f64, values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    if q.is_nan() {
        return Some(f64::NAN);
    }
    if q < 0.0 {
        return Some(f64::NEG_INFINITY);
    }
    if q > 1.0 {
        return Some(f64::INFINITY);
    }
    values.sort_by(f64::total_cmp);
    let n = values.len() as f64;
    let rank = q * (n - 1.0);
    let lower = rank.floor().max(0.0);
    let upper = (lower + 1.0).min(n - 1.0);
    let weight = rank - rank.floor();
    Some(values[lower as usize] * (1.0 - weight) + values[upper as usize] * weight)
}

/// One function over the samples of `(t - window, t]`.
pub fn apply(func: Func, points: &[(i64, f64)], t: i64, window_ms: i64) -> Option<f64> {
    let from = t.saturating_sub(window_ms);
    match func {
        Func::Range(RangeFn::Rate) => extrapolated_rate(points, from, t, true, true),
        Func::Range(RangeFn::Increase) => extrapolated_rate(points, from, t, true, false),
        Func::Range(RangeFn::Delta) => extrapolated_rate(points, from, t, false, false),
        Func::Range(f) => f.apply(points),
        Func::Quantile(q) => {
            let mut v: Vec<f64> = points.iter().map(|p| p.1).collect();
            quantile(q, &mut v)
        }
    }
}

// ------------------------------------------------------------ evaluation --

/// Limits a query must respect (collector.toml `[query]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Series one selector may match.
    pub max_series: usize,
    /// Points one answer may hold (all series together).
    pub max_points: usize,
    /// Samples one query may read from the store.
    pub max_samples: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad input: INVALID_ARGUMENT.
    #[error("{0}")]
    Invalid(String),
    /// Over a limit: RESOURCE_EXHAUSTED.
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A fault of the engine itself: INTERNAL.
    #[error("{0}")]
    Internal(String),
}

/// The evaluation times start, start + step, ..., up to end.
#[derive(Debug, Clone, Copy)]
pub struct Steps {
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl Steps {
    pub fn new(start: i64, end: i64, step: i64) -> Result<Steps, EvalError> {
        if step <= 0 {
            return Err(EvalError::Invalid(format!(
                "step must be above 0 (got {step} ms)"
            )));
        }
        if end < start {
            return Err(EvalError::Invalid(format!(
                "end ({end}) is before start ({start})"
            )));
        }
        Ok(Steps { start, end, step })
    }

    pub fn count(&self) -> usize {
        // In i128: any two i64 times (end >= start, step > 0).
        let n = (i128::from(self.end) - i128::from(self.start)) / i128::from(self.step);
        usize::try_from(n).unwrap_or(usize::MAX).saturating_add(1)
    }

    fn at(&self, i: usize) -> i64 {
        self.start + i as i64 * self.step
    }
}

/// Evaluates `query` at every step. Series come sorted by name and labels;
/// series with no point in the range are left out.
pub fn eval_range(
    store: &Store,
    query: &Query,
    steps: Steps,
    limits: Limits,
) -> Result<Vec<SeriesPoints>, EvalError> {
    let n = steps.count();
    if n > limits.max_points {
        return Err(EvalError::Limit(format!(
            "{n} steps from start to end at step {} ms is above max_points = {} (collector.toml [query]); use a larger step or a shorter range",
            steps.step, limits.max_points
        )));
    }
    let reach = query.inner.reach_ms();
    let sel = query.inner.selector();
    let read_from = steps.start.saturating_sub(reach).saturating_add(1);
    let read_limits = QueryLimits {
        max_series: limits.max_series,
        max_points: limits.max_samples,
    };
    let read_error = |e| match e {
        QueryError::TooManySeries(m) => EvalError::Limit(format!(
            "the selector matches more than max_series = {m} series (collector.toml [query]); narrow it with label matchers, e.g. {{node=\"...\"}}"
        )),
        QueryError::TooManyPoints(m) => EvalError::Limit(format!(
            "the query reads more than max_samples = {m} stored samples (collector.toml [query]); shorten the range or narrow the selector"
        )),
        QueryError::Store(e) => EvalError::Store(e),
    };
    let out = match &query.agg {
        None => {
            let data = store
                .query_range(sel, read_from, steps.end, read_limits)
                .map_err(read_error)?;
            let mut out = Vec::with_capacity(data.len());
            let mut total = 0usize;
            for s in data {
                let mut points = Vec::new();
                eval_series(&query.inner, &s.points, steps, |i, v| {
                    points.push((steps.at(i), v))
                });
                if points.is_empty() {
                    continue;
                }
                total += points.len();
                if total > limits.max_points {
                    return Err(too_many_points(limits));
                }
                let name = match query.inner {
                    Inner::Selector(_) => s.name,
                    Inner::Range { .. } => String::new(),
                };
                out.push(SeriesPoints {
                    name,
                    labels: s.labels,
                    points,
                });
            }
            out
        }
        Some(agg) => {
            // Series by series as the store reads them, so an aggregation
            // over many series never holds all their samples; reading and
            // decoding (this thread) overlap with evaluating (a second
            // one), a few series in flight between them.
            let (tx, rx) = mpsc::sync_channel::<(String, Labels, Vec<(i64, f64)>)>(4);
            let (spare_tx, spare_rx) = mpsc::channel::<Vec<(i64, f64)>>();
            let inner = &query.inner;
            let (read, acc) = std::thread::scope(|s| {
                let worker = s.spawn(move || {
                    let mut acc = Aggregator::new(agg, inner, steps, limits);
                    for (name, labels, points) in rx {
                        acc.add(&name, &labels, &points);
                        // Err: the reader is done; the buffer just goes.
                        let _ = spare_tx.send(points);
                    }
                    acc
                });
                let read = store.each_series_points(
                    sel,
                    read_from,
                    steps.end,
                    read_limits,
                    |name, labels, p| {
                        let mut buf = spare_rx.try_recv().unwrap_or_default();
                        buf.clear();
                        buf.extend_from_slice(p);
                        // Err: the worker is gone (it panicked); join says so.
                        let _ = tx.send((name.to_string(), labels.clone(), buf));
                    },
                );
                drop(tx);
                (read, worker.join())
            });
            read.map_err(read_error)?;
            acc.map_err(|_| EvalError::Internal("the aggregation thread panicked".into()))?
                .finish()?
        }
    };
    Ok(out)
}

fn too_many_points(limits: Limits) -> EvalError {
    EvalError::Limit(format!(
        "the answer holds more than max_points = {} points (collector.toml [query]); use a larger step, a shorter range, fewer series (label matchers) or an aggregation",
        limits.max_points
    ))
}

/// The inner expression of one series at every step: `emit(step, value)`.
fn eval_series(
    inner: &Inner,
    points: &[(i64, f64)],
    steps: Steps,
    mut emit: impl FnMut(usize, f64),
) {
    let reach = inner.reach_ms();
    // points[lo..hi] are the samples in (t - reach, t].
    let (mut lo, mut hi) = (0usize, 0usize);
    for i in 0..steps.count() {
        let t = steps.at(i);
        while hi < points.len() && points[hi].0 <= t {
            hi += 1;
        }
        while lo < hi && points[lo].0 <= t.saturating_sub(reach) {
            lo += 1;
        }
        if lo == hi {
            continue;
        }
        let window = &points[lo..hi];
        let v = match inner {
            Inner::Selector(_) => Some(window[window.len() - 1].1),
            Inner::Range {
                func, window_ms, ..
            } => apply(*func, window, t, *window_ms),
        };
        if let Some(v) = v {
            emit(i, v);
        }
    }
}

/// Per group and step: how many values, and the one running figure the
/// operator needs (sum for sum and avg, min, max; none for count).
struct Acc {
    count: Vec<u32>,
    val: Vec<f64>,
}

/// An aggregation fed one series at a time.
struct Aggregator<'a> {
    agg: &'a Aggregation,
    inner: &'a Inner,
    steps: Steps,
    limits: Limits,
    groups: BTreeMap<Labels, Acc>,
    /// Set by the first series over the limit; later series are skipped.
    over: bool,
}

impl<'a> Aggregator<'a> {
    fn new(agg: &'a Aggregation, inner: &'a Inner, steps: Steps, limits: Limits) -> Self {
        Aggregator {
            agg,
            inner,
            steps,
            limits,
            groups: BTreeMap::new(),
            over: false,
        }
    }

    fn add(&mut self, name: &str, labels: &Labels, points: &[(i64, f64)]) {
        if self.over {
            return;
        }
        let n = self.steps.count();
        let key: Labels = self
            .agg
            .by
            .iter()
            .filter_map(|l| {
                let v = if l == "__name__" {
                    Some(name)
                } else {
                    labels.get(l).map(String::as_str)
                };
                v.filter(|v| !v.is_empty())
                    .map(|v| (l.clone(), v.to_string()))
            })
            .collect();
        if !self.groups.contains_key(&key) {
            if (self.groups.len() + 1).saturating_mul(n) > self.limits.max_points {
                self.over = true;
                return;
            }
            let val = match self.agg.op {
                AggOp::Sum | AggOp::Avg => vec![0.0; n],
                AggOp::Min | AggOp::Max => vec![f64::NAN; n],
                AggOp::Count => Vec::new(),
            };
            self.groups.insert(
                key.clone(),
                Acc {
                    count: vec![0; n],
                    val,
                },
            );
        }
        let Some(acc) = self.groups.get_mut(&key) else {
            return;
        };
        // One loop per operator, each touching only what it needs.
        let (count, val) = (&mut acc.count[..], &mut acc.val[..]);
        match self.agg.op {
            AggOp::Sum | AggOp::Avg => eval_series(self.inner, points, self.steps, |i, v| {
                count[i] += 1;
                val[i] += v;
            }),
            // f64::min/max skip NaN, as Prometheus' min/max do.
            AggOp::Min => eval_series(self.inner, points, self.steps, |i, v| {
                count[i] += 1;
                val[i] = val[i].min(v);
            }),
            AggOp::Max => eval_series(self.inner, points, self.steps, |i, v| {
                count[i] += 1;
                val[i] = val[i].max(v);
            }),
            AggOp::Count => eval_series(self.inner, points, self.steps, |i, _| count[i] += 1),
        }
    }

    fn finish(self) -> Result<Vec<SeriesPoints>, EvalError> {
        if self.over {
            return Err(too_many_points(self.limits));
        }
        Ok(finish_groups(self.agg, self.steps, self.groups))
    }
}

fn finish_groups(
    agg: &Aggregation,
    steps: Steps,
    groups: BTreeMap<Labels, Acc>,
) -> Vec<SeriesPoints> {
    let n = steps.count();
    let mut out = Vec::with_capacity(groups.len());
    for (labels, acc) in groups {
        let points: Vec<(i64, f64)> = (0..n)
            .filter(|&i| acc.count[i] > 0)
            .map(|i| {
                let v = match agg.op {
                    AggOp::Avg => acc.val[i] / f64::from(acc.count[i]),
                    AggOp::Sum | AggOp::Min | AggOp::Max => acc.val[i],
                    AggOp::Count => f64::from(acc.count[i]),
                };
                (steps.at(i), v)
            })
            .collect();
        if !points.is_empty() {
            out.push(SeriesPoints {
                name: String::new(),
                labels,
                points,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn parses_functions_aggregations_and_both_by_positions() {
        let q =
            parse(r#"sum by (node) (rate(node_network_receive_bytes_total{device!~"lo"}[5m]))"#)
                .unwrap();
        let agg = q.agg.unwrap();
        assert_eq!(agg.op, AggOp::Sum);
        assert_eq!(agg.by, ["node"]);
        match q.inner {
            Inner::Range {
                func,
                sel,
                window_ms,
            } => {
                assert_eq!(func, Func::Range(RangeFn::Rate));
                assert_eq!(sel.metric, "node_network_receive_bytes_total");
                assert_eq!(window_ms, 300_000);
            }
            other => panic!("{other:?}"),
        }
        let q = parse("avg(gpu_busy_percent) by (node, gpu)").unwrap();
        assert_eq!(q.agg.unwrap().by, ["node", "gpu"]);
        let q = parse("quantile_over_time(0.9, x{a=\"b\"}[1h])").unwrap();
        assert!(matches!(
            q.inner,
            Inner::Range {
                func: Func::Quantile(q),
                ..
            } if q == 0.9
        ));
        let q = parse("count(up)").unwrap();
        assert!(q.agg.unwrap().by.is_empty());
        assert!(matches!(parse("x").unwrap().inner, Inner::Selector(_)));
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let e = parse("").unwrap_err();
        assert!(e.contains("empty query"), "{e}");
        let e = parse("topk(3, x)").unwrap_err();
        assert!(e.contains("unknown function \"topk\""), "{e}");
        let e = parse("x[5m]").unwrap_err();
        assert!(e.contains("needs a function"), "{e}");
        let e = parse("rate(x)").unwrap_err();
        assert!(e.contains("expected `[`"), "{e}");
        let e = parse("sum(avg(x))").unwrap_err();
        assert!(e.contains("do not nest"), "{e}");
        let e = parse("sum without (a) (x)").unwrap_err();
        assert!(e.contains("without"), "{e}");
        let e = parse("sum by (a (x)").unwrap_err();
        assert!(e.contains("by (...)"), "{e}");
        let e = parse("x{a=~\"(\"}").unwrap_err();
        assert!(e.contains("bad selector"), "{e}");
        let e = parse("rate(x[0s])").unwrap_err();
        assert!(e.contains("above zero"), "{e}");
        let e = parse("x y").unwrap_err();
        assert!(e.contains("unexpected text"), "{e}");
    }

    #[test]
    fn rate_and_increase_handle_a_counter_reset_and_extrapolate_like_prometheus() {
        // Samples every 10 s from t=10 s to t=50 s; the counter resets
        // between 30 s and 40 s. Window (0, 60 s].
        let pts = [
            (10_000, 100.0),
            (20_000, 110.0),
            (30_000, 130.0),
            (40_000, 5.0),
            (50_000, 25.0),
        ];
        // Raw increase: 10 + 20 + 5 (from 0 after the reset) + 20 = 55.
        // Sampled interval 40 s, average step 10 s, 10 s to each edge
        // (< 11 s: extrapolate all the way); zero point 40 * 100/55 s
        // before the first sample is further than 10 s: no clamp.
        let inc = apply(Func::Range(RangeFn::Increase), &pts, 60_000, 60_000).unwrap();
        assert!(close(inc, 55.0 * 60.0 / 40.0), "{inc}");
        let rate = apply(Func::Range(RangeFn::Rate), &pts, 60_000, 60_000).unwrap();
        assert!(close(rate, 55.0 * 60.0 / 40.0 / 60.0), "{rate}");
        // A window whose start is far before the first sample: half an
        // interval only (5 s); the end 10 s after: all the way.
        let inc = apply(Func::Range(RangeFn::Increase), &pts, 60_000, 120_000).unwrap();
        assert!(close(inc, 55.0 * (40.0 + 5.0 + 10.0) / 40.0), "{inc}");
        // A counter starting near zero is not extrapolated below zero:
        // 2 → 12 → 22 over 20 s; zero point 4 s before the first sample.
        let low = [(10_000, 2.0), (20_000, 12.0), (30_000, 22.0)];
        let inc = apply(Func::Range(RangeFn::Increase), &low, 30_000, 30_000).unwrap();
        assert!(close(inc, 20.0 * (20.0 + 2.0) / 20.0), "{inc}");
        // One sample: no rate.
        assert_eq!(
            apply(Func::Range(RangeFn::Rate), &pts[..1], 60_000, 60_000),
            None
        );
        // delta is not a counter: the drop counts as a drop.
        let d = apply(Func::Range(RangeFn::Delta), &pts, 50_000, 40_000).unwrap();
        assert!(close(d, (25.0 - 100.0) * 40.0 / 40.0), "{d}");
    }

    #[test]
    fn quantile_interpolates_between_ranks() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(0.5, &mut v), Some(2.5));
        assert_eq!(quantile(0.0, &mut v), Some(1.0));
        assert_eq!(quantile(1.0, &mut v), Some(4.0));
        assert!(close(quantile(0.9, &mut v).unwrap(), 3.0 + 0.7));
        assert_eq!(quantile(-1.0, &mut v), Some(f64::NEG_INFINITY));
        assert_eq!(quantile(2.0, &mut v), Some(f64::INFINITY));
        assert_eq!(quantile(0.5, &mut []), None);
    }

    #[test]
    fn series_windows_are_left_open_and_lookback_is_five_minutes() {
        let pts = [(1_000, 1.0), (2_000, 2.0), (3_000, 3.0)];
        let inner = Inner::Range {
            func: Func::Range(RangeFn::MaxOverTime),
            sel: Selector::default(),
            window_ms: 1_000,
        };
        let mut got = Vec::new();
        eval_series(
            &inner,
            &pts,
            Steps::new(1_000, 4_000, 1_000).unwrap(),
            |i, v| got.push((i, v)),
        );
        // (t - 1 s, t]: the sample at t - 1 s is out.
        assert_eq!(got, [(0, 1.0), (1, 2.0), (2, 3.0)]);
        let mut got = Vec::new();
        let sel = Inner::Selector(Selector::default());
        eval_series(
            &sel,
            &pts,
            Steps::new(0, 400_000, 100_000).unwrap(),
            |i, v| got.push((i, v)),
        );
        // At 0 nothing yet; at 100 s .. 300 s the 3 s sample; at 400 s it
        // is more than 5 minutes old.
        assert_eq!(got, [(1, 3.0), (2, 3.0), (3, 3.0)]);
    }

    /// The aggregation as `eval_range` drives it, series by series.
    fn aggregate(
        agg: &Aggregation,
        inner: &Inner,
        data: Vec<SeriesPoints>,
        steps: Steps,
        limits: Limits,
    ) -> Result<Vec<SeriesPoints>, EvalError> {
        let mut a = Aggregator::new(agg, inner, steps, limits);
        for s in &data {
            a.add(&s.name, &s.labels, &s.points);
        }
        a.finish()
    }

    fn series(name: &str, labels: &[(&str, &str)], points: Vec<(i64, f64)>) -> SeriesPoints {
        SeriesPoints {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            points,
        }
    }

    #[test]
    fn aggregation_groups_by_the_listed_labels_only() {
        let data = vec![
            series(
                "g",
                &[("node", "a"), ("gpu", "0")],
                vec![(0, 1.0), (1000, 2.0)],
            ),
            series(
                "g",
                &[("node", "a"), ("gpu", "1")],
                vec![(0, 3.0), (1000, 6.0)],
            ),
            series("g", &[("node", "b"), ("gpu", "0")], vec![(1000, 10.0)]),
            series("g", &[("gpu", "9")], vec![(0, 7.0)]),
        ];
        let steps = Steps::new(0, 1000, 1000).unwrap();
        let limits = Limits {
            max_series: 100,
            max_points: 100,
            max_samples: 100,
        };
        let inner = Inner::Selector(Selector::default());
        let run = |op, by: &[&str]| {
            let agg = Aggregation {
                op,
                by: by.iter().map(|s| s.to_string()).collect(),
            };
            aggregate(&agg, &inner, data.clone(), steps, limits).unwrap()
        };
        let sum = run(AggOp::Sum, &["node"]);
        // The series without a node label is its own group, with no labels.
        assert_eq!(sum.len(), 3);
        assert!(sum[0].labels.is_empty());
        assert_eq!(sum[0].points, [(0, 7.0), (1000, 7.0)]);
        assert_eq!(sum[1].labels.get("node").unwrap(), "a");
        assert_eq!(sum[1].labels.len(), 1);
        assert_eq!(sum[1].points, [(0, 4.0), (1000, 8.0)]);
        // b has nothing at 0 (the lookback is 5 min, and 1 s is after 0).
        assert_eq!(sum[2].points, [(1000, 10.0)]);
        let avg = run(AggOp::Avg, &["node"]);
        assert_eq!(avg[1].points, [(0, 2.0), (1000, 4.0)]);
        let all = run(AggOp::Count, &[]);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].points, [(0, 3.0), (1000, 4.0)]);
        assert_eq!(run(AggOp::Max, &[])[0].points, [(0, 7.0), (1000, 10.0)]);
        assert_eq!(run(AggOp::Min, &[])[0].points, [(0, 1.0), (1000, 2.0)]);
        // Over the points limit: refused, not truncated.
        let tight = Limits {
            max_points: 3,
            ..limits
        };
        let agg = Aggregation {
            op: AggOp::Sum,
            by: vec!["node".into()],
        };
        assert!(matches!(
            aggregate(&agg, &inner, data.clone(), steps, tight),
            Err(EvalError::Limit(_))
        ));
    }

    #[test]
    fn steps_refuse_zero_and_backwards_ranges() {
        assert!(matches!(Steps::new(0, 10, 0), Err(EvalError::Invalid(m)) if m.contains("step")));
        assert!(matches!(Steps::new(0, 10, -5), Err(EvalError::Invalid(_))));
        assert!(matches!(Steps::new(10, 0, 1), Err(EvalError::Invalid(m)) if m.contains("before")));
        assert_eq!(Steps::new(0, 10, 3).unwrap().count(), 4);
        // The widest range does not overflow; it is simply too many steps.
        assert_eq!(
            Steps::new(i64::MIN, i64::MAX, 1).unwrap().count(),
            usize::MAX
        );
        let e = apply(
            Func::Range(RangeFn::Rate),
            &[(i64::MIN + 1, 1.0), (0, 2.0)],
            0,
            i64::MAX,
        );
        assert!(e.is_some_and(f64::is_finite));
    }
}
