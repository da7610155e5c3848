//! The alert lifecycle: pending → firing → resolved, one open alert per
//! rule + label set (its fingerprint), flapping damped by `keep_firing_for`.
//!
//! `step` is pure over a [`Data`] and a time, so the same engine runs live
//! (every `eval_interval`, now = the wall clock) and over recorded history.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::model::Labels;

use super::eval::{self, Data, Evidence};
use super::rules::{Rule, render};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Firing,
    Resolved,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Resolved => "resolved",
        }
    }
    pub fn parse(s: &str) -> Option<Phase> {
        Some(match s {
            "pending" => Phase::Pending,
            "firing" => Phase::Firing,
            "resolved" => Phase::Resolved,
            _ => return None,
        })
    }
}

/// Another signal on the same node near the alert's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Related {
    /// "alert", "anomaly" or "log" (a job's log line; `what` is the line).
    pub kind: String,
    pub what: String,
    pub score: f64,
    pub since_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub id: Option<i64>,
    pub fingerprint: String,
    pub rule: String,
    pub severity: String,
    /// The series' labels, the rule's labels, `alertname` and `severity`.
    pub labels: Labels,
    pub annotations: BTreeMap<String, String>,
    pub phase: Phase,
    pub active_since_ms: i64,
    pub fired_ms: Option<i64>,
    pub resolved_ms: Option<i64>,
    pub last_true_ms: i64,
    pub value: f64,
    pub evidence: Vec<Evidence>,
    pub related: Vec<Related>,
    /// Its firing was sent to receivers (so its resolution will be too).
    pub notified: bool,
}

/// What one step changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new pending alert (not notified).
    Pending(Alert),
    /// Pending → firing: notify.
    Fired(Alert),
    /// Still pending or firing, with a new value (stored, not notified).
    Updated(Alert),
    /// Firing → resolved: notify.
    Resolved(Alert),
    /// Pending, then the condition cleared before `for`: forgotten.
    Dropped(Alert),
}

impl Change {
    pub fn alert(&self) -> &Alert {
        match self {
            Change::Pending(a)
            | Change::Fired(a)
            | Change::Updated(a)
            | Change::Resolved(a)
            | Change::Dropped(a) => a,
        }
    }
}

/// Names a template can use besides labels and `value`: `last` (the last
/// value of the alert's first series: a stalled counter's value) and, for
/// an alert with a `job_id` label, `last_step` (the job's latest
/// `vitals_job_step` on the same node, else `unknown`).
fn template_vars(
    data: &dyn Data,
    labels: &Labels,
    v: &eval::Value,
    now: i64,
) -> BTreeMap<&'static str, String> {
    use vitals_common::selector::{Matcher, Op, Selector};
    let fmt = |x: f64| vitals_common::model::format_value((x * 1000.0).round() / 1000.0);
    let mut vars = BTreeMap::new();
    if let Some(last) = v.evidence.first().and_then(|e| e.points.last()) {
        vars.insert("last", fmt(last.1));
    }
    if let Some(job) = labels.get("job_id") {
        let mut sel = Selector {
            metric: "vitals_job_step".into(),
            matchers: Vec::new(),
        };
        for (k, val) in [("job_id", Some(job)), ("node", labels.get("node"))] {
            if let Some(val) = val
                && let Ok(m) = Matcher::new(k, Op::Equal, val)
            {
                sel.matchers.push(m);
            }
        }
        let lookback = super::expr::INSTANT_LOOKBACK.as_millis() as i64;
        let step = data
            .range(&sel, now - lookback, now)
            .ok()
            .and_then(|series| {
                series
                    .iter()
                    .filter_map(|s| s.points.last())
                    .max_by_key(|p| p.0)
                    .map(|p| fmt(p.1))
            });
        vars.insert("last_step", step.unwrap_or_else(|| "unknown".into()));
    }
    vars
}

/// The stable key of an alert: FNV-1a over its sorted labels, in hex.
pub fn fingerprint(labels: &Labels) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

pub struct Engine {
    pub rules: Vec<Rule>,
    /// Open (pending or firing) alerts by fingerprint.
    pub open: HashMap<String, Alert>,
    /// Used when a rule has no `keep_firing_for`.
    pub default_keep_firing_for: Duration,
    /// Rules whose last evaluation failed, and why (logged once).
    pub errors: HashMap<String, String>,
    /// When this engine began evaluating (silence is counted from here).
    pub started_ms: i64,
}

impl Engine {
    pub fn new(rules: Vec<Rule>, default_keep_firing_for: Duration, open: Vec<Alert>) -> Engine {
        Engine {
            rules,
            open: open
                .into_iter()
                .map(|a| (a.fingerprint.clone(), a))
                .collect(),
            default_keep_firing_for,
            errors: HashMap::new(),
            started_ms: i64::MIN,
        }
    }

    /// Evaluates every rule at `now` and moves alerts along.
    pub fn step(&mut self, data: &dyn Data, now: i64) -> Vec<Change> {
        let mut changes = Vec::new();
        let rules = std::mem::take(&mut self.rules);
        for rule in &rules {
            let values = match eval::condition(&rule.condition, data, now, self.started_ms) {
                Ok(v) => {
                    if self.errors.remove(&rule.name).is_some() {
                        tracing::info!(rule = %rule.name, "alert rule evaluates again");
                    }
                    v
                }
                Err(e) => {
                    if self.errors.get(&rule.name) != Some(&e) {
                        tracing::warn!(rule = %rule.name, error = %e, "alert rule cannot be evaluated; its alerts keep their state");
                        self.errors.insert(rule.name.clone(), e);
                    }
                    // Unknown is not false: keep the rule's alerts as they are.
                    continue;
                }
            };
            let mut seen = std::collections::HashSet::new();
            for v in values {
                let mut labels = v.labels.clone();
                for (k, val) in &rule.labels {
                    labels.insert(k.clone(), val.clone());
                }
                labels.insert("alertname".into(), rule.name.clone());
                labels.insert("severity".into(), rule.severity.as_str().into());
                let fp = fingerprint(&labels);
                seen.insert(fp.clone());
                let mut annotations = BTreeMap::new();
                let vars = template_vars(data, &labels, &v, now);
                annotations.insert(
                    "summary".into(),
                    render(&rule.summary, &labels, v.value, &vars),
                );
                if !rule.description.is_empty() {
                    annotations.insert(
                        "description".into(),
                        render(&rule.description, &labels, v.value, &vars),
                    );
                }
                if let Some(step) = vars.get("last_step").filter(|s| *s != "unknown") {
                    annotations.insert("last_step".into(), step.clone());
                }
                match self.open.get_mut(&fp) {
                    Some(a) => {
                        a.last_true_ms = now;
                        a.value = v.value;
                        a.evidence = v.evidence;
                        // What was attached when it fired stays.
                        let kept: Vec<(String, String)> = ["related", "probable_cause", "log"]
                            .iter()
                            .filter_map(|k| Some((k.to_string(), a.annotations.get(*k)?.clone())))
                            .collect();
                        a.annotations = annotations;
                        a.annotations.extend(kept);
                        if a.phase == Phase::Pending && now - a.active_since_ms >= ms(rule.for_) {
                            a.phase = Phase::Firing;
                            a.fired_ms = Some(now);
                            changes.push(Change::Fired(a.clone()));
                        } else {
                            changes.push(Change::Updated(a.clone()));
                        }
                    }
                    None => {
                        let mut a = Alert {
                            id: None,
                            fingerprint: fp.clone(),
                            rule: rule.name.clone(),
                            severity: rule.severity.as_str().into(),
                            labels,
                            annotations,
                            phase: Phase::Pending,
                            active_since_ms: now,
                            fired_ms: None,
                            resolved_ms: None,
                            last_true_ms: now,
                            value: v.value,
                            evidence: v.evidence,
                            related: Vec::new(),
                            notified: false,
                        };
                        if rule.for_.is_zero() {
                            a.phase = Phase::Firing;
                            a.fired_ms = Some(now);
                            changes.push(Change::Fired(a.clone()));
                        } else {
                            changes.push(Change::Pending(a.clone()));
                        }
                        self.open.insert(fp, a);
                    }
                }
            }
            // This rule's open alerts whose condition no longer holds.
            let keep = ms(rule.keep_firing_for.unwrap_or(self.default_keep_firing_for));
            let gone: Vec<String> = self
                .open
                .values()
                .filter(|a| a.rule == rule.name && !seen.contains(&a.fingerprint))
                .map(|a| a.fingerprint.clone())
                .collect();
            for fp in gone {
                let Some(a) = self.open.get(&fp) else {
                    continue;
                };
                match a.phase {
                    Phase::Pending => {
                        if let Some(a) = self.open.remove(&fp) {
                            changes.push(Change::Dropped(a));
                        }
                    }
                    Phase::Firing if now - a.last_true_ms >= keep => {
                        if let Some(mut a) = self.open.remove(&fp) {
                            a.phase = Phase::Resolved;
                            a.resolved_ms = Some(now);
                            changes.push(Change::Resolved(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        // Alerts of rules that no longer exist resolve.
        let names: std::collections::HashSet<&str> =
            rules.iter().map(|r| r.name.as_str()).collect();
        let orphans: Vec<String> = self
            .open
            .values()
            .filter(|a| !names.contains(a.rule.as_str()))
            .map(|a| a.fingerprint.clone())
            .collect();
        for fp in orphans {
            if let Some(mut a) = self.open.remove(&fp) {
                if a.phase == Phase::Firing {
                    a.phase = Phase::Resolved;
                    a.resolved_ms = Some(now);
                    changes.push(Change::Resolved(a));
                } else {
                    changes.push(Change::Dropped(a));
                }
            }
        }
        self.rules = rules;
        changes
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::eval::tests::{Mem, series};
    use crate::alert::rules::{self, RulesFile};
    use std::path::Path;

    fn rules(text: &str) -> Vec<Rule> {
        let f: RulesFile = vitals_common::config::parse(Path::new("t.toml"), text).unwrap();
        f.rules
            .iter()
            .map(|r| rules::compile(Path::new("t.toml"), text, r, false).unwrap())
            .collect()
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved_after_keep() {
        let r = rules(
            "[[rules]]\nname = \"Hot\"\nexpr = \"t > 90\"\nfor = \"10s\"\nkeep_firing_for = \"5s\"\nlabels = { team = \"ops\" }\n",
        );
        let mut e = Engine::new(r, Duration::ZERO, Vec::new());
        let hot = |until: i64| {
            Mem(vec![series(
                "t",
                &[("node", "a")],
                &(0..100)
                    .map(|i| (i * 1000, if i * 1000 <= until { 95.0 } else { 20.0 }))
                    .collect::<Vec<_>>(),
            )])
        };
        let d = hot(30_000);
        assert!(matches!(e.step(&d, 1_000)[..], [Change::Pending(_)]));
        assert!(matches!(e.step(&d, 6_000)[..], [Change::Updated(_)]));
        let c = e.step(&d, 11_000);
        let [Change::Fired(a)] = &c[..] else {
            panic!("{c:?}")
        };
        assert_eq!(a.labels["alertname"], "Hot");
        assert_eq!(a.labels["team"], "ops");
        assert_eq!(a.labels["severity"], "warning");
        assert_eq!(a.fired_ms, Some(11_000));
        assert!(matches!(e.step(&d, 30_000)[..], [Change::Updated(_)]));
        // Cleared at 31 s; kept firing for 5 s after it was last true.
        assert!(matches!(e.step(&d, 31_000)[..], []));
        assert!(matches!(e.step(&d, 34_000)[..], []));
        let c = e.step(&d, 36_500);
        let [Change::Resolved(a)] = &c[..] else {
            panic!("{c:?}")
        };
        assert_eq!(a.resolved_ms, Some(36_500));
        assert_eq!(a.phase, Phase::Resolved);
        assert!(e.open.is_empty());
    }

    #[test]
    fn a_blip_shorter_than_for_is_dropped_and_a_flap_within_keep_stays_one_alert() {
        let r = rules(
            "[[rules]]\nname = \"Hot\"\nexpr = \"t > 90\"\nfor = \"10s\"\nkeep_firing_for = \"20s\"\n",
        );
        let mut e = Engine::new(r, Duration::ZERO, Vec::new());
        let pts = |hot: &dyn Fn(i64) -> bool| {
            Mem(vec![series(
                "t",
                &[("node", "a")],
                &(0..200)
                    .map(|i| (i * 1000, if hot(i) { 95.0 } else { 20.0 }))
                    .collect::<Vec<_>>(),
            )])
        };
        let blip = pts(&|i| (5..8).contains(&i));
        assert!(matches!(e.step(&blip, 6_000)[..], [Change::Pending(_)]));
        assert!(matches!(e.step(&blip, 9_000)[..], [Change::Dropped(_)]));
        // Hot 10..40, cool 41..50, hot again 51..: one alert throughout.
        let flap = pts(&|i| (10..=40).contains(&i) || i >= 51);
        let mut fired = 0;
        let mut resolved = 0;
        for t in (10..100).map(|s| s * 1000) {
            for c in e.step(&flap, t) {
                match c {
                    Change::Fired(_) => fired += 1,
                    Change::Resolved(_) => resolved += 1,
                    _ => {}
                }
            }
        }
        assert_eq!((fired, resolved), (1, 0));
    }

    #[test]
    fn fingerprints_are_stable_and_label_sensitive() {
        let mut a = Labels::new();
        a.insert("alertname".into(), "X".into());
        a.insert("node".into(), "n1".into());
        let mut b = a.clone();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b.insert("node".into(), "n2".into());
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
    }
}
