//! Evaluating rule conditions against stored samples at a time `now`.
//!
//! Every result is one label set (the series' labels, no metric name), a
//! value, and the evidence: the series read and their recent points.

use std::collections::BTreeMap;
use std::time::Duration;

use vitals_common::model::{Labels, series_text};
use vitals_common::selector::{Matcher, Op, Selector};

use super::expr::{AggOp, Expr, INSTANT_LOOKBACK, Term};
use super::rules::Condition;
use crate::store::{QueryLimits, SeriesPoints, Store};

/// Where evaluation reads samples: the store, or anything else in tests.
pub trait Data {
    fn range(
        &self,
        sel: &Selector,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<SeriesPoints>, String>;

    /// Events of `node` and `kind` in [start, end], newest first, at most
    /// `limit`. Sources without events have none.
    fn events(
        &self,
        _node: &str,
        _kind: &str,
        _start_ms: i64,
        _end_ms: i64,
        _limit: usize,
    ) -> Result<Vec<crate::store::EventRow>, String> {
        Ok(Vec::new())
    }
}

impl Data for Store {
    fn range(
        &self,
        sel: &Selector,
        start_ms: i64,
        end_ms: i64,
    ) -> Result<Vec<SeriesPoints>, String> {
        self.query_range(
            sel,
            start_ms,
            end_ms,
            QueryLimits {
                max_series: 100_000,
                max_points: 20_000_000,
            },
        )
        .map_err(|e| e.to_string())
    }

    fn events(
        &self,
        node: &str,
        kind: &str,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<Vec<crate::store::EventRow>, String> {
        self.list_events(&crate::store::EventFilter {
            node: node.into(),
            kind: kind.into(),
            start_ms,
            end_ms,
            limit,
        })
        .map_err(|e| e.to_string())
    }
}

/// One series and its last few points, as shown in an alert.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    pub series: String,
    /// (timestamp ms, value), oldest first; at most [`EVIDENCE_POINTS`].
    pub points: Vec<(i64, f64)>,
}

pub const EVIDENCE_POINTS: usize = 5;

#[derive(Debug, Clone)]
pub struct Value {
    pub labels: Labels,
    pub value: f64,
    pub evidence: Vec<Evidence>,
}

fn evidence(s: &SeriesPoints) -> Evidence {
    let n = s.points.len();
    Evidence {
        series: series_text(&s.name, &s.labels),
        points: s.points[n.saturating_sub(EVIDENCE_POINTS)..].to_vec(),
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Labels equal on every name both have.
pub fn compatible(a: &Labels, b: &Labels) -> bool {
    a.iter().all(|(k, v)| b.get(k).is_none_or(|w| w == v))
}

/// Joins two result sets: each left value with the right value whose labels
/// are the same, else the first compatible one.
fn join(left: Vec<Value>, right: &[Value], f: impl Fn(f64, f64) -> Option<f64>) -> Vec<Value> {
    let mut out = Vec::new();
    for a in left {
        let b = right
            .iter()
            .find(|b| b.labels == a.labels)
            .or_else(|| right.iter().find(|b| compatible(&a.labels, &b.labels)));
        let Some(b) = b else {
            continue;
        };
        let Some(v) = f(a.value, b.value) else {
            continue;
        };
        let mut labels = a.labels.clone();
        for (k, v) in &b.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let mut evidence = a.evidence;
        evidence.extend(b.evidence.iter().cloned());
        out.push(Value {
            labels,
            value: v,
            evidence,
        });
    }
    out
}

/// Most evidence series one aggregated value keeps.
pub const AGG_EVIDENCE: usize = 8;

/// One value per group of values with the same `by` labels (an absent or
/// empty label is left out of the group's labels, as in PromQL).
fn aggregate(op: AggOp, by: &[String], values: Vec<Value>) -> Vec<Value> {
    let mut groups: BTreeMap<Labels, (Vec<f64>, Vec<Evidence>)> = BTreeMap::new();
    for v in values {
        let key: Labels = by
            .iter()
            .filter_map(|l| {
                v.labels
                    .get(l)
                    .filter(|x| !x.is_empty())
                    .map(|x| (l.clone(), x.clone()))
            })
            .collect();
        let g = groups.entry(key).or_default();
        g.0.push(v.value);
        for e in v.evidence {
            if g.1.len() < AGG_EVIDENCE && !g.1.contains(&e) {
                g.1.push(e);
            }
        }
    }
    groups
        .into_iter()
        .filter_map(|(labels, (vals, evidence))| {
            let n = vals.len() as f64;
            let value = match op {
                AggOp::Sum => vals.iter().sum(),
                AggOp::Avg => vals.iter().sum::<f64>() / n,
                // f64::min/max skip NaN, as PromQL's min/max do.
                AggOp::Min => vals.iter().copied().reduce(f64::min)?,
                AggOp::Max => vals.iter().copied().reduce(f64::max)?,
                AggOp::Count => n,
            };
            Some(Value {
                labels,
                value,
                evidence,
            })
        })
        .collect()
}

/// Values of a term at `now`. `started_ms`: when evaluation began (this
/// process); a series is not silent for longer than we have been looking.
pub fn term(t: &Term, data: &dyn Data, now: i64, started_ms: i64) -> Result<Vec<Value>, String> {
    Ok(match t {
        Term::Instant(sel) => data
            .range(sel, now - ms(INSTANT_LOOKBACK), now)?
            .into_iter()
            .filter_map(|s| {
                let v = s.points.last()?.1;
                Some(Value {
                    evidence: vec![evidence(&s)],
                    labels: s.labels,
                    value: v,
                })
            })
            .collect(),
        Term::Range { func, sel, window } => data
            .range(sel, now - ms(*window), now)?
            .into_iter()
            .filter_map(|s| {
                let v = func.apply(&s.points)?;
                Some(Value {
                    evidence: vec![evidence(&s)],
                    labels: s.labels,
                    value: v,
                })
            })
            .collect(),
        Term::Ratio(a, b) => {
            let right = term(b, data, now, started_ms)?;
            join(term(a, data, now, started_ms)?, &right, |x, y| {
                (y != 0.0).then_some(x / y)
            })
        }
        Term::Diff(a, b) => {
            let right = term(b, data, now, started_ms)?;
            join(term(a, data, now, started_ms)?, &right, |x, y| Some(x - y))
        }
        Term::Agg { op, by, term: t } => aggregate(*op, by, term(t, data, now, started_ms)?),
        Term::Anomaly(sel) => {
            let mut matchers: Vec<Matcher> = sel
                .matchers
                .iter()
                .filter(|m| m.name != "__name__")
                .cloned()
                .collect();
            if !sel.metric.is_empty() {
                matchers.push(Matcher::new("metric", Op::Equal, &sel.metric)?);
            }
            let scores = Selector {
                metric: "vitals_anomaly_score".into(),
                matchers,
            };
            data.range(&scores, now - ms(INSTANT_LOOKBACK), now)?
                .into_iter()
                .filter_map(|s| {
                    let v = s.points.last()?.1;
                    let mut labels = s.labels.clone();
                    labels.remove("metric");
                    Some(Value {
                        evidence: vec![evidence(&s)],
                        labels,
                        value: v,
                    })
                })
                .collect()
        }
        Term::Silent {
            sel,
            lookback,
            intervals,
        } => data
            .range(sel, now - ms(*lookback), now)?
            .into_iter()
            .filter_map(|s| {
                let interval = typical_interval(&s.points)?;
                let last = s.points.last()?.0;
                let silent_ms = now - last;
                // After a collector restart, agents need a moment to come
                // back: count silence from when we started looking.
                let counted = now - last.max(started_ms);
                (counted as f64 > intervals * interval as f64).then(|| Value {
                    evidence: vec![evidence(&s)],
                    labels: s.labels,
                    value: silent_ms as f64 / 1000.0,
                })
            })
            .collect(),
    })
}

/// The median spacing of the last few points; `None` under two points.
pub fn typical_interval(points: &[(i64, f64)]) -> Option<i64> {
    let tail = &points[points.len().saturating_sub(9)..];
    let mut gaps: Vec<i64> = tail.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_unstable();
    Some(gaps[gaps.len() / 2].max(1))
}

/// The label sets for which the expression holds now.
pub fn expr(e: &Expr, data: &dyn Data, now: i64, started_ms: i64) -> Result<Vec<Value>, String> {
    Ok(term(&e.term, data, now, started_ms)?
        .into_iter()
        .filter(|v| match e.cmp {
            Some((op, n)) => op.holds(v.value, n),
            None => v.value != 0.0 && !v.value.is_nan(),
        })
        .collect())
}

/// The label sets for which a rule's condition holds now.
pub fn condition(
    c: &Condition,
    data: &dyn Data,
    now: i64,
    started_ms: i64,
) -> Result<Vec<Value>, String> {
    match c {
        Condition::Expr(e) => expr(e, data, now, started_ms),
        Condition::Gated { expr: e, while_ } => {
            let gate = expr(while_, data, now, started_ms)?;
            Ok(expr(e, data, now, started_ms)?
                .into_iter()
                .filter_map(|mut v| {
                    let g = gate.iter().find(|g| compatible(&v.labels, &g.labels))?;
                    v.evidence.extend(g.evidence.iter().cloned());
                    Some(v)
                })
                .collect())
        }
        Condition::Stall {
            series,
            window,
            while_,
        } => {
            let w = ms(*window);
            let gate = match while_ {
                Some(e) => Some(expr(e, data, now, started_ms)?),
                None => None,
            };
            let mut out = Vec::new();
            for s in data.range(series, now - 2 * w, now)? {
                // The value a window ago, and nothing different since.
                let Some(base) = s.points.iter().rev().find(|p| p.0 <= now - w) else {
                    continue;
                };
                let Some(last) = s.points.last() else {
                    continue;
                };
                // Still reported (a silent agent is another alert).
                if now - last.0 > w / 2 {
                    continue;
                }
                let advanced = s
                    .points
                    .iter()
                    .filter(|p| p.0 >= base.0)
                    .any(|p| p.1.to_bits() != base.1.to_bits());
                if advanced {
                    continue;
                }
                let mut ev = vec![evidence(&s)];
                if let Some(gate) = &gate {
                    let Some(g) = gate.iter().find(|g| compatible(&s.labels, &g.labels)) else {
                        continue;
                    };
                    ev.extend(g.evidence.iter().cloned());
                }
                out.push(Value {
                    labels: s.labels.clone(),
                    value: (now - base.0) as f64 / 1000.0,
                    evidence: ev,
                });
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::alert::expr;

    /// Samples in memory: (name, labels, points).
    pub struct Mem(pub Vec<SeriesPoints>);

    impl Data for Mem {
        fn range(&self, sel: &Selector, start: i64, end: i64) -> Result<Vec<SeriesPoints>, String> {
            Ok(self
                .0
                .iter()
                .filter(|s| sel.matches(&s.name, &s.labels))
                .map(|s| SeriesPoints {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    points: s
                        .points
                        .iter()
                        .copied()
                        .filter(|p| p.0 >= start && p.0 <= end)
                        .collect(),
                })
                .filter(|s| !s.points.is_empty())
                .collect())
        }
    }

    pub fn series(name: &str, labels: &[(&str, &str)], points: &[(i64, f64)]) -> SeriesPoints {
        SeriesPoints {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn ratio_joins_on_labels_and_compares() {
        let data = Mem(vec![
            series(
                "gpu_used_vram",
                &[("node", "a"), ("gpu", "0")],
                &[(1000, 96.0)],
            ),
            series(
                "gpu_used_vram",
                &[("node", "a"), ("gpu", "1")],
                &[(1000, 10.0)],
            ),
            series(
                "gpu_total_vram",
                &[("node", "a"), ("gpu", "0")],
                &[(1000, 100.0)],
            ),
            series(
                "gpu_total_vram",
                &[("node", "a"), ("gpu", "1")],
                &[(1000, 100.0)],
            ),
        ]);
        let e = expr::parse("ratio(gpu_used_vram, gpu_total_vram) > 0.95").unwrap();
        let v = expr(&e, &data, 2000, i64::MIN).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].labels["gpu"], "0");
        assert_eq!(v[0].value, 0.96);
        assert_eq!(v[0].evidence.len(), 2);
    }

    #[test]
    fn a_gate_keeps_only_the_label_sets_where_it_holds() {
        let data = Mem(vec![
            series(
                "errs",
                &[("node", "a"), ("job_id", "1"), ("class", "gpu_oom")],
                &[(1000, 0.0), (2000, 2.0)],
            ),
            series(
                "errs",
                &[("node", "a"), ("job_id", "2"), ("class", "gpu_oom")],
                &[(1000, 0.0), (2000, 1.0)],
            ),
            series(
                "state",
                &[("node", "a"), ("job_id", "1"), ("state", "RUNNING")],
                &[(2000, 1.0)],
            ),
            series(
                "state",
                &[("node", "a"), ("job_id", "2"), ("state", "RUNNING")],
                &[(2000, 0.0)],
            ),
        ]);
        let c = Condition::Gated {
            expr: expr::parse("increase(errs[10s]) > 0").unwrap(),
            while_: expr::parse(r#"state{state="RUNNING"} == 1"#).unwrap(),
        };
        let v = condition(&c, &data, 2500, i64::MIN).unwrap();
        assert_eq!(v.len(), 1, "job 2 no longer runs");
        assert_eq!(v[0].labels["job_id"], "1");
        assert_eq!(v[0].value, 2.0);
        assert_eq!(v[0].evidence.len(), 2, "the gate's series too");
    }

    #[test]
    fn silent_counts_missed_intervals() {
        let pts: Vec<(i64, f64)> = (0..10).map(|i| (i * 1000, i as f64)).collect();
        let data = Mem(vec![series("c", &[("node", "a")], &pts)]);
        let e = expr::parse("silent(c[1h], 3)").unwrap();
        assert!(expr(&e, &data, 9000 + 2500, i64::MIN).unwrap().is_empty());
        let v = expr(&e, &data, 9000 + 3500, i64::MIN).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].value, 3.5);
        // A collector that started 1 s ago has not yet seen 3 intervals.
        assert!(expr(&e, &data, 12_500, 11_500).unwrap().is_empty());
        assert_eq!(expr(&e, &data, 15_000, 11_500).unwrap()[0].value, 6.0);
    }

    #[test]
    fn stall_needs_a_full_window_unchanged_and_the_gate() {
        let rx: Vec<(i64, f64)> = (0..=60)
            .map(|i| (i * 1000, if i < 20 { i as f64 } else { 20.0 }))
            .collect();
        let tx: Vec<(i64, f64)> = (0..=60).map(|i| (i * 1000, i as f64 + 1.0)).collect();
        let l = [("node", "a"), ("mountpoint", "/data")];
        let data = Mem(vec![series("rx", &l, &rx), series("tx", &l, &tx)]);
        let c = Condition::Stall {
            series: vitals_common::selector::parse("rx").unwrap(),
            window: Duration::from_secs(30),
            while_: Some(expr::parse("diff(tx, rx) > 0").unwrap()),
        };
        // Unchanged since t=20s: at t=45s only 25 s, at t=55s 35 s.
        assert!(condition(&c, &data, 45_000, i64::MIN).unwrap().is_empty());
        assert_eq!(condition(&c, &data, 55_000, i64::MIN).unwrap().len(), 1);
        // Without outstanding requests, an idle mount is not hung.
        let idle = Mem(vec![series("rx", &l, &rx), series("tx", &l, &rx)]);
        assert!(condition(&c, &idle, 55_000, i64::MIN).unwrap().is_empty());
    }
}
