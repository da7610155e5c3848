//! The rule expression language: a small, PromQL-shaped subset.
//!
//! ```text
//! expr  := term [CMP number]            CMP: > >= < <= == !=
//! term  := selector                      latest value (within 5m)
//!        | rate(selector[d])             per-second increase, counter resets handled
//!        | increase(selector[d])         increase over d, resets handled
//!        | delta(selector[d])            last - first over d
//!        | changes(selector[d])          number of value changes over d
//!        | max_over_time(selector[d]) | min_over_time(..) | avg_over_time(..)
//!        | ratio(term, term)             left / right, joined on shared labels
//!        | diff(term, term)              left - right, joined on shared labels
//!        | anomaly(selector)             latest anomaly score of the selected series
//!        | silent(selector[d], n)        seconds since the last sample, for series
//!                                        seen in the last d that missed n of their
//!                                        own intervals
//!        | AGG by (l, ...) (term)        AGG: sum avg min max count, over the values
//!        | AGG (term) by (l, ...)        of the term with the same listed labels
//!                                        (none listed: one value for all)
//! ```
//!
//! An expression without a comparison is true where its value is non-zero.
//! A selector is a Prometheus selector (`name{label="v",other=~"re"}`).

use std::fmt;
use std::time::Duration;

use vitals_common::selector::{self, Selector};

pub use crate::promql::AggOp;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl Cmp {
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeFn {
    Rate,
    Increase,
    Delta,
    Changes,
    MaxOverTime,
    MinOverTime,
    AvgOverTime,
}

impl RangeFn {
    pub fn by_name(name: &str) -> Option<RangeFn> {
        Some(match name {
            "rate" => RangeFn::Rate,
            "increase" => RangeFn::Increase,
            "delta" => RangeFn::Delta,
            "changes" => RangeFn::Changes,
            "max_over_time" => RangeFn::MaxOverTime,
            "min_over_time" => RangeFn::MinOverTime,
            "avg_over_time" => RangeFn::AvgOverTime,
            _ => return None,
        })
    }

    /// Applies the function to the points of one series in its window.
    pub fn apply(self, points: &[(i64, f64)]) -> Option<f64> {
        let first = points.first()?;
        let last = points.last()?;
        match self {
            RangeFn::Rate | RangeFn::Increase => {
                if points.len() < 2 {
                    return None;
                }
                let mut inc = 0.0;
                for w in points.windows(2) {
                    let d = w[1].1 - w[0].1;
                    // A counter that went down was reset: count from zero.
                    inc += if d >= 0.0 { d } else { w[1].1 };
                }
                if self == RangeFn::Increase {
                    return Some(inc);
                }
                let secs = (last.0 - first.0) as f64 / 1000.0;
                (secs > 0.0).then(|| inc / secs)
            }
            RangeFn::Delta => (points.len() >= 2).then_some(last.1 - first.1),
            RangeFn::Changes => Some(
                points
                    .windows(2)
                    .filter(|w| w[0].1.to_bits() != w[1].1.to_bits())
                    .count() as f64,
            ),
            RangeFn::MaxOverTime => points.iter().map(|p| p.1).reduce(f64::max),
            RangeFn::MinOverTime => points.iter().map(|p| p.1).reduce(f64::min),
            RangeFn::AvgOverTime => {
                Some(points.iter().map(|p| p.1).sum::<f64>() / points.len() as f64)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum Term {
    /// Latest value within [`INSTANT_LOOKBACK`].
    Instant(Selector),
    Range {
        func: RangeFn,
        sel: Selector,
        window: Duration,
    },
    Ratio(Box<Term>, Box<Term>),
    Diff(Box<Term>, Box<Term>),
    Anomaly(Selector),
    Silent {
        sel: Selector,
        lookback: Duration,
        intervals: f64,
    },
    /// `sum|avg|min|max|count by (labels) (term)`.
    Agg {
        op: AggOp,
        by: Vec<String>,
        term: Box<Term>,
    },
}

/// How far back an instant selector looks for its latest sample.
pub const INSTANT_LOOKBACK: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct Expr {
    pub term: Term,
    pub cmp: Option<(Cmp, f64)>,
    /// As written, for messages.
    pub text: String,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Term {
    /// Every selector the term reads, with how far back it reads.
    pub fn reads(&self, out: &mut Vec<(Selector, Duration)>) {
        match self {
            Term::Instant(s) | Term::Anomaly(s) => out.push((s.clone(), INSTANT_LOOKBACK)),
            Term::Range { sel, window, .. } => out.push((sel.clone(), *window)),
            Term::Silent { sel, lookback, .. } => out.push((sel.clone(), *lookback)),
            Term::Ratio(a, b) | Term::Diff(a, b) => {
                a.reads(out);
                b.reads(out);
            }
            Term::Agg { term, .. } => term.reads(out),
        }
    }

    /// The metric names this term reads (for correlation and `rules check`).
    pub fn metrics(&self) -> Vec<String> {
        let mut v = Vec::new();
        self.reads(&mut v);
        v.into_iter()
            .map(|(s, _)| s.metric)
            .filter(|m| !m.is_empty())
            .collect()
    }
}

/// Parses an expression; the error says where and what was expected.
pub fn parse(text: &str) -> Result<Expr, String> {
    let mut p = P {
        s: text.as_bytes(),
        i: 0,
    };
    let term = p.term()?;
    p.ws();
    let cmp = if p.i < p.s.len() {
        let op = p.cmp()?;
        p.ws();
        let n = p.number()?;
        Some((op, n))
    } else {
        None
    };
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the expression"));
    }
    Ok(Expr {
        term,
        cmp,
        text: text.trim().to_string(),
    })
}

/// The lexer and term helpers, shared with the query language
/// (`crate::promql`), so both read selectors, durations and numbers alike.
pub(crate) struct P<'a> {
    pub(crate) s: &'a [u8],
    pub(crate) i: usize,
}

const FUNCTIONS: &str = "rate, increase, delta, changes, max_over_time, min_over_time, avg_over_time, ratio, diff, anomaly, silent; aggregations sum, avg, min, max, count";

impl<'a> P<'a> {
    pub(crate) fn new(text: &'a str) -> P<'a> {
        P {
            s: text.as_bytes(),
            i: 0,
        }
    }

    pub(crate) fn err(&self, what: &str) -> String {
        let rest = String::from_utf8_lossy(&self.s[self.i.min(self.s.len())..]);
        if rest.is_empty() {
            format!("{what} at the end")
        } else {
            format!("{what} at column {}: {rest:?}", self.i + 1)
        }
    }

    pub(crate) fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    pub(crate) fn ident(&mut self) -> String {
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == b'_' || c == b':' {
                self.i += 1;
            } else {
                break;
            }
        }
        String::from_utf8_lossy(&self.s[start..self.i]).to_string()
    }

    pub(crate) fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected `{}`", c as char)))
        }
    }

    /// A selector: optional name, optional `{...}` (quotes respected).
    pub(crate) fn selector(&mut self) -> Result<Selector, String> {
        self.ws();
        let start = self.i;
        let _ = self.ident();
        self.ws();
        if self.peek() == Some(b'{') {
            let mut quote = None::<u8>;
            while let Some(c) = self.peek() {
                self.i += 1;
                match (quote, c) {
                    (Some(_), b'\\') => self.i = (self.i + 1).min(self.s.len()),
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, b'"') | (None, b'\'') | (None, b'`') => quote = Some(c),
                    (None, b'}') => break,
                    _ => {}
                }
            }
        }
        let text = String::from_utf8_lossy(&self.s[start..self.i]).to_string();
        if text.trim().is_empty() {
            return Err(self.err("expected a selector"));
        }
        selector::parse(&text).map_err(|e| format!("bad selector {:?}: {e}", text.trim()))
    }

    pub(crate) fn duration(&mut self) -> Result<Duration, String> {
        self.expect(b'[')?;
        let start = self.i;
        while self.peek().is_some_and(|c| c != b']') {
            self.i += 1;
        }
        let text = String::from_utf8_lossy(&self.s[start..self.i])
            .trim()
            .to_string();
        self.expect(b']')?;
        let d = humantime::parse_duration(&text)
            .map_err(|e| format!("bad duration {text:?} ({e}); e.g. 30s, 5m, 1h"))?;
        if d.is_zero() {
            return Err(format!("duration {text:?} must be above zero"));
        }
        Ok(d)
    }

    pub(crate) fn number(&mut self) -> Result<f64, String> {
        self.ws();
        let start = self.i;
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+') {
                self.i += 1;
            } else {
                break;
            }
        }
        let text = String::from_utf8_lossy(&self.s[start..self.i]).to_string();
        text.parse::<f64>()
            .ok()
            .filter(|n| !n.is_nan())
            .ok_or_else(|| format!("expected a number, found {text:?}"))
    }

    fn cmp(&mut self) -> Result<Cmp, String> {
        self.ws();
        let two = (self.peek(), self.s.get(self.i + 1).copied());
        let (op, len) = match two {
            (Some(b'>'), Some(b'=')) => (Cmp::Ge, 2),
            (Some(b'<'), Some(b'=')) => (Cmp::Le, 2),
            (Some(b'='), Some(b'=')) => (Cmp::Eq, 2),
            (Some(b'!'), Some(b'=')) => (Cmp::Ne, 2),
            (Some(b'>'), _) => (Cmp::Gt, 1),
            (Some(b'<'), _) => (Cmp::Lt, 1),
            _ => return Err(self.err("expected a comparison (>, >=, <, <=, ==, !=)")),
        };
        self.i += len;
        Ok(op)
    }

    fn term(&mut self) -> Result<Term, String> {
        self.ws();
        let save = self.i;
        let name = self.ident();
        if let Some(op) = AggOp::by_name(&name) {
            let after = self.i;
            let mut by = crate::promql::by_clause(self)?;
            self.ws();
            if self.peek() == Some(b'(') {
                self.i += 1;
                let term = self.term()?;
                self.expect(b')')?;
                if by.is_none() {
                    by = crate::promql::by_clause(self)?;
                }
                return Ok(Term::Agg {
                    op,
                    by: by.unwrap_or_default(),
                    term: Box::new(term),
                });
            }
            // A metric that happens to be named like an aggregation.
            self.i = after;
        }
        self.ws();
        if self.peek() != Some(b'(') {
            // A plain selector.
            self.i = save;
            return Ok(Term::Instant(self.selector()?));
        }
        self.i += 1;
        let t = if let Some(func) = RangeFn::by_name(&name) {
            let sel = self.selector()?;
            let window = self.duration()?;
            Term::Range { func, sel, window }
        } else {
            match name.as_str() {
                "ratio" | "diff" => {
                    let a = self.term()?;
                    self.expect(b',')?;
                    let b = self.term()?;
                    if name == "ratio" {
                        Term::Ratio(Box::new(a), Box::new(b))
                    } else {
                        Term::Diff(Box::new(a), Box::new(b))
                    }
                }
                "anomaly" => Term::Anomaly(self.selector()?),
                "silent" => {
                    let sel = self.selector()?;
                    let lookback = self.duration()?;
                    self.expect(b',')?;
                    let intervals = self.number()?;
                    if intervals <= 0.0 {
                        return Err("silent(): the number of intervals must be above 0".into());
                    }
                    Term::Silent {
                        sel,
                        lookback,
                        intervals,
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown function {name:?}; known functions: {FUNCTIONS}"
                    ));
                }
            }
        };
        self.expect(b')')?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_the_rule_pack_uses() {
        let e = parse("ratio(gpu_used_vram, gpu_total_vram) > 0.95").unwrap();
        assert!(matches!(e.term, Term::Ratio(_, _)));
        assert_eq!(e.cmp, Some((Cmp::Gt, 0.95)));
        let e = parse(r#"rate(node_zfs_zpool_vdev_errors_total{type!="x"}[5m]) > 0"#).unwrap();
        match e.term {
            Term::Range { func, sel, window } => {
                assert_eq!(func, RangeFn::Rate);
                assert_eq!(sel.metric, "node_zfs_zpool_vdev_errors_total");
                assert_eq!(window, Duration::from_secs(300));
            }
            other => panic!("{other:?}"),
        }
        let e = parse("silent(vitals_agent_cycles_total[1h], 3)").unwrap();
        assert!(e.cmp.is_none());
        let e = parse(r#"node_zfs_zpool_state{state!="online"} == 1"#).unwrap();
        assert!(matches!(e.term, Term::Instant(_)));
        let e = parse(r#"anomaly(node_mountstats_nfs_operations_response_time_average_seconds{operation="READ"}) >= 0.9"#)
            .unwrap();
        assert_eq!(
            e.term.metrics(),
            ["node_mountstats_nfs_operations_response_time_average_seconds"]
        );
        // Braces inside quoted values do not end the selector.
        parse(r#"x{a=~"b{2}"} > 1"#).unwrap();
        // An escape at the very end is an error, not a panic.
        assert!(parse("x{a=\"\\").is_err());
    }

    #[test]
    fn aggregations_take_by_before_or_after_and_nest() {
        let e = parse(
            r#"diff(avg by (job_id, node) (gpu_gfx_activity{job_id!=""}), max by (job_id) (avg(gpu_gfx_activity{job_id!=""}) by (job_id, node))) < -40"#,
        )
        .unwrap();
        let Term::Diff(a, b) = &e.term else {
            panic!("{:?}", e.term)
        };
        match &**a {
            Term::Agg { op, by, term } => {
                assert_eq!(*op, AggOp::Avg);
                assert_eq!(by, &["job_id", "node"]);
                assert!(matches!(**term, Term::Instant(_)));
            }
            other => panic!("{other:?}"),
        }
        match &**b {
            Term::Agg { op, by, term } => {
                assert_eq!(*op, AggOp::Max);
                assert_eq!(by, &["job_id"]);
                assert!(
                    matches!(&**term, Term::Agg { op: AggOp::Avg, by, .. } if by == &["job_id", "node"])
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(e.term.metrics(), ["gpu_gfx_activity", "gpu_gfx_activity"]);
        let e = parse("count(rate(x[5m])) > 2").unwrap();
        assert!(matches!(&e.term, Term::Agg { op: AggOp::Count, by, .. } if by.is_empty()));
        // A metric named like an aggregation is still a selector.
        assert!(matches!(parse("sum > 1").unwrap().term, Term::Instant(_)));
        assert!(parse("sum by (a (x)").is_err());
        assert!(parse("avg without (a) (x)").is_err());
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = parse("percentile(x[5m]) > 1").unwrap_err();
        assert!(e.contains("unknown function \"percentile\""), "{e}");
        let e = parse("rate(x[5 parsecs]) > 1").unwrap_err();
        assert!(e.contains("bad duration"), "{e}");
        let e = parse("rate(x{a=b}[5m]) > 1").unwrap_err();
        assert!(e.contains("bad selector"), "{e}");
        let e = parse("x > high").unwrap_err();
        assert!(e.contains("expected a number"), "{e}");
        let e = parse("x >").unwrap_err();
        assert!(e.contains("expected a number"), "{e}");
        let e = parse("x ~ 3").unwrap_err();
        assert!(e.contains("expected a comparison"), "{e}");
        let e = parse("rate(x[5m] > 1").unwrap_err();
        assert!(e.contains("expected `)`"), "{e}");
        assert!(parse("").is_err());
        assert!(parse("rate(x[0s])").is_err());
    }

    #[test]
    fn range_functions_handle_resets_and_short_windows() {
        let pts = [(0, 10.0), (1000, 15.0), (2000, 3.0), (3000, 5.0)];
        assert_eq!(RangeFn::Increase.apply(&pts), Some(5.0 + 3.0 + 2.0));
        assert_eq!(RangeFn::Rate.apply(&pts), Some(10.0 / 3.0));
        assert_eq!(RangeFn::Delta.apply(&pts), Some(-5.0));
        assert_eq!(RangeFn::Changes.apply(&pts), Some(3.0));
        assert_eq!(RangeFn::MaxOverTime.apply(&pts), Some(15.0));
        assert_eq!(RangeFn::Rate.apply(&pts[..1]), None);
        assert_eq!(RangeFn::AvgOverTime.apply(&[]), None);
    }
}
