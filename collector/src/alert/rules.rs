//! Alert rules: how they are written (TOML), checked, and compiled.
//!
//! A rule is either a condition (`expr`, see [`super::expr`]) or a stall
//! (`stalled`: a series that should advance; `window`: how long it may not).
//! Either may have `while`: it only holds where this expression holds too
//! for the same labels (e.g. only while the job is RUNNING).
//! Either holds for `for` before the alert fires. Errors name the file, the
//! line and the rule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use vitals_common::config::ConfigError;
use vitals_common::model::Labels;
use vitals_common::selector::{self, Selector};

use super::expr::{self, Expr};

/// The built-in rule pack, on by default (see docs/ALERTING.md).
pub const BUILTIN: &str = include_str!("builtin.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One rule as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: Spanned<String>,
    /// The condition, e.g. `ratio(gpu_used_vram, gpu_total_vram) > 0.95`.
    #[serde(default)]
    pub expr: Option<Spanned<String>>,
    /// A stall: the selector of series that should keep advancing.
    #[serde(default)]
    pub stalled: Option<Spanned<String>>,
    /// The condition (or stall) only counts while this expression holds
    /// for the same labels.
    #[serde(default, rename = "while")]
    pub while_: Option<Spanned<String>>,
    /// How long a stalled series may stay unchanged.
    #[serde(default)]
    pub window: Option<Spanned<String>>,
    /// How long the condition must hold before the alert fires.
    #[serde(default, rename = "for")]
    pub for_: Option<Spanned<String>>,
    /// How long a firing alert stays firing after the condition clears
    /// (damps flapping). Default: two evaluation intervals.
    #[serde(default)]
    pub keep_firing_for: Option<Spanned<String>>,
    #[serde(default)]
    pub severity: Option<Severity>,
    /// Extra labels on the alert, e.g. `{ team = "ml" }` for routing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// One line; `{{label}}`, `{{value}}`, `{{value_pct}}` are filled in.
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// `false` turns the rule (or a built-in one of the same name) off.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// An action (`[alerting.actions.NAME]`) to run when an alert of this
    /// rule fires.
    #[serde(default)]
    pub action: Option<String>,
}

/// A rules file: `[[rules]]` tables.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RulesFile {
    #[serde(default)]
    pub rules: Vec<RawRule>,
}

#[derive(Debug, Clone)]
pub enum Condition {
    Expr(Expr),
    /// `expr` with `while`: only where the gate holds for the same labels.
    Gated {
        expr: Expr,
        while_: Expr,
    },
    Stall {
        series: Selector,
        window: Duration,
        while_: Option<Expr>,
    },
}

/// A checked rule, ready to evaluate.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub condition: Condition,
    pub for_: Duration,
    pub keep_firing_for: Option<Duration>,
    pub severity: Severity,
    pub labels: Labels,
    pub summary: String,
    pub description: String,
    /// Where it came from: "built-in" or "FILE:LINE".
    pub origin: String,
    /// The action it names, if any.
    pub action: Option<String>,
}

impl Rule {
    /// The metric names the rule reads.
    pub fn metrics(&self) -> Vec<String> {
        match &self.condition {
            Condition::Expr(e) => e.term.metrics(),
            Condition::Gated { expr, while_ } => {
                let mut m = expr.term.metrics();
                m.extend(while_.term.metrics());
                m
            }
            Condition::Stall { series, while_, .. } => {
                let mut m = vec![series.metric.clone()];
                if let Some(w) = while_ {
                    m.extend(w.term.metrics());
                }
                m
            }
        }
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn col_of(text: &str, offset: usize) -> usize {
    let before = &text[..offset.min(text.len())];
    offset - before.rfind('\n').map_or(0, |i| i + 1) + 1
}

fn err_at(
    path: &Path,
    text: &str,
    span: std::ops::Range<usize>,
    key: &str,
    msg: String,
) -> ConfigError {
    ConfigError::Parse {
        path: path.to_path_buf(),
        line: line_of(text, span.start),
        column: col_of(text, span.start),
        key: Some(key.to_string()),
        message: msg,
    }
}

fn duration_at(
    path: &Path,
    text: &str,
    v: &Spanned<String>,
    key: &str,
) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
        err_at(
            path,
            text,
            v.span(),
            key,
            format!("bad duration {:?} ({e}); e.g. 30s, 5m, 2h", v.get_ref()),
        )
    })
}

/// Checks one raw rule. `text` is the file it came from (for line numbers).
pub fn compile(path: &Path, text: &str, raw: &RawRule, builtin: bool) -> Result<Rule, ConfigError> {
    let name = raw.name.get_ref().trim().to_string();
    let key = |k: &str| format!("rules.{name}.{k}");
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(err_at(
            path,
            text,
            raw.name.span(),
            "rules.name",
            format!(
                "{name:?}: a rule name is letters, digits and _ (it becomes the alertname label)"
            ),
        ));
    }
    let condition = match (&raw.expr, &raw.stalled) {
        (Some(e), None) => {
            if raw.window.is_some() {
                return Err(err_at(
                    path,
                    text,
                    e.span(),
                    &key("expr"),
                    "`window` belongs to stall rules (`stalled = ...`), not to `expr` rules".into(),
                ));
            }
            let expr = expr::parse(e.get_ref())
                .map_err(|m| err_at(path, text, e.span(), &key("expr"), m))?;
            match &raw.while_ {
                Some(w) => Condition::Gated {
                    expr,
                    while_: expr::parse(w.get_ref())
                        .map_err(|m| err_at(path, text, w.span(), &key("while"), m))?,
                },
                None => Condition::Expr(expr),
            }
        }
        (None, Some(s)) => {
            let series = selector::parse(s.get_ref()).map_err(|m| {
                err_at(
                    path,
                    text,
                    s.span(),
                    &key("stalled"),
                    format!("bad selector: {m}"),
                )
            })?;
            let window = match &raw.window {
                Some(w) => duration_at(path, text, w, &key("window"))?,
                None => {
                    return Err(err_at(
                        path,
                        text,
                        s.span(),
                        &key("window"),
                        "a stall rule needs `window` (how long the series may stay unchanged)"
                            .into(),
                    ));
                }
            };
            if window.is_zero() {
                let w = raw.window.as_ref().map(|w| w.span()).unwrap_or(s.span());
                return Err(err_at(
                    path,
                    text,
                    w,
                    &key("window"),
                    "must be above zero".into(),
                ));
            }
            let while_ = match &raw.while_ {
                Some(w) => Some(
                    expr::parse(w.get_ref())
                        .map_err(|m| err_at(path, text, w.span(), &key("while"), m))?,
                ),
                None => None,
            };
            Condition::Stall {
                series,
                window,
                while_,
            }
        }
        (Some(e), Some(_)) => {
            return Err(err_at(
                path,
                text,
                e.span(),
                &key("expr"),
                "give either `expr` or `stalled`, not both".into(),
            ));
        }
        (None, None) => {
            return Err(err_at(
                path,
                text,
                raw.name.span(),
                &name,
                "a rule needs `expr = \"...\"` (a condition) or `stalled = \"...\"` (a series that should advance)".into(),
            ));
        }
    };
    let for_ = match &raw.for_ {
        Some(f) => duration_at(path, text, f, &key("for"))?,
        None => Duration::ZERO,
    };
    let keep_firing_for = match &raw.keep_firing_for {
        Some(f) => Some(duration_at(path, text, f, &key("keep_firing_for"))?),
        None => None,
    };
    for k in raw.labels.keys() {
        if !vitals_common::model::valid_label_name(k) || k == "alertname" || k == "severity" {
            return Err(err_at(
                path,
                text,
                raw.name.span(),
                &key("labels"),
                format!(
                    "{k:?} cannot be a label here (alertname and severity are set by the rule)"
                ),
            ));
        }
    }
    let labels: Labels = raw.labels.clone().into_iter().collect();
    Ok(Rule {
        summary: raw
            .summary
            .clone()
            .unwrap_or_else(|| format!("{name} on {{{{node}}}}")),
        description: raw.description.clone().unwrap_or_default(),
        name,
        condition,
        for_,
        keep_firing_for,
        severity: raw.severity.unwrap_or(Severity::Warning),
        labels,
        action: raw.action.clone().filter(|a| !a.trim().is_empty()),
        origin: if builtin {
            "built-in".into()
        } else {
            format!(
                "{}:{}",
                path.display(),
                line_of(text, raw.name.span().start)
            )
        },
    })
}

/// A placeholder for a rule that is only turned off.
fn disabled(name: &str) -> Rule {
    Rule {
        name: name.trim().to_string(),
        condition: Condition::Expr(Expr {
            term: super::expr::Term::Instant(Selector::default()),
            cmp: None,
            text: String::new(),
        }),
        for_: Duration::ZERO,
        keep_firing_for: None,
        severity: Severity::Info,
        labels: Labels::new(),
        summary: String::new(),
        description: String::new(),
        origin: "disabled".into(),
        action: None,
    }
}

/// Parses and checks a rules file's text.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(RawRule, Rule)>, ConfigError> {
    let file: RulesFile = vitals_common::config::parse(path, text)?;
    compile_all(path, text, &file.rules, false)
}

fn compile_all(
    path: &Path,
    text: &str,
    raws: &[RawRule],
    builtin: bool,
) -> Result<Vec<(RawRule, Rule)>, ConfigError> {
    let mut out: Vec<(RawRule, Rule)> = Vec::new();
    for raw in raws {
        let rule = if raw.enabled == Some(false) && raw.expr.is_none() && raw.stalled.is_none() {
            // `name = "X"` + `enabled = false` turns a rule off: nothing to compile.
            disabled(raw.name.get_ref())
        } else {
            compile(path, text, raw, builtin)?
        };
        if let Some((_, prev)) = out.iter().find(|(_, r)| r.name == rule.name) {
            return Err(err_at(
                path,
                text,
                raw.name.span(),
                "rules.name",
                format!(
                    "rule {} is defined twice (first at {})",
                    rule.name, prev.origin
                ),
            ));
        }
        out.push((raw.clone(), rule));
    }
    Ok(out)
}

/// The built-in pack, compiled.
pub fn builtin() -> Result<Vec<Rule>, ConfigError> {
    let path = Path::new("<built-in rules>");
    let file: RulesFile = vitals_common::config::parse(path, BUILTIN)?;
    Ok(compile_all(path, BUILTIN, &file.rules, true)?
        .into_iter()
        .map(|(_, r)| r)
        .collect())
}

/// Where rules come from, and the result: built-ins first, then each file in
/// order; a later rule of the same name replaces an earlier one, and
/// `enabled = false` removes it.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
}

impl RuleSet {
    pub fn load(
        builtin_on: bool,
        sources: &[(PathBuf, String, Vec<RawRule>)],
    ) -> Result<RuleSet, ConfigError> {
        let mut rules: Vec<Rule> = if builtin_on { builtin()? } else { Vec::new() };
        for (path, text, raws) in sources {
            for (raw, rule) in compile_all(path, text, raws, false)? {
                rules.retain(|r| r.name != rule.name);
                if raw.enabled != Some(false) {
                    rules.push(rule);
                }
            }
        }
        Ok(RuleSet { rules })
    }
}

/// Reads a rules file (`[[rules]]`) and checks every rule.
pub fn load_file(path: &Path) -> Result<(String, Vec<RawRule>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let checked = parse_file(path, &text)?;
    Ok((text, checked.into_iter().map(|(raw, _)| raw).collect()))
}

/// Fills `{{name}}` from the labels, `{{value}}` and `{{value_pct}}`.
/// Fills `{{value}}`, `{{value_pct}}`, the names in `vars` (e.g.
/// `{{last}}`, `{{last_step}}`) and labels into a template; an unknown
/// name stays as written.
pub fn render(
    template: &str,
    labels: &Labels,
    value: f64,
    vars: &BTreeMap<&str, String>,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let key = rest[start + 2..start + end].trim();
        match key {
            "value" => out.push_str(&vitals_common::model::format_value(
                (value * 1000.0).round() / 1000.0,
            )),
            "value_pct" => out.push_str(&format!("{:.1}%", value * 100.0)),
            k if vars.contains_key(k) => out.push_str(&vars[k]),
            k => match labels.get(k) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[start..start + end + 2]),
            },
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_pack_compiles() {
        let rules = builtin().unwrap();
        assert!(rules.len() >= 15, "{}", rules.len());
        for name in [
            "GpuMemoryOverload",
            "ZfsPoolNotOnline",
            "NfsMountHung",
            "NicSpeedBelowExpected",
            "NodeDown",
            "ZfsSnapshotTooOld",
        ] {
            assert!(rules.iter().any(|r| r.name == name), "{name} missing");
        }
        // The job rules go to ML creators and end with the job.
        for name in [
            "JobStalled",
            "JobGpuOutOfMemory",
            "JobDataUnreadable",
            "JobLossNotFinite",
        ] {
            let r = rules.iter().find(|r| r.name == name).unwrap();
            assert_eq!(r.labels["team"], "ml", "{name}");
            assert!(
                r.metrics().contains(&"vitals_slurm_job_state".to_string()),
                "{name} is gated on the job running"
            );
            assert!(r.summary.contains("{{job_id}}") && r.summary.contains("{{user}}"));
            assert!(r.summary.contains("step {{last"), "{name}: the last step");
        }
    }

    #[test]
    fn while_gates_expr_rules_and_window_stays_with_stalls() {
        let ok = "[[rules]]\nname = \"A\"\nexpr = \"x > 1\"\nwhile = \"y == 1\"\n";
        let rules = parse_file(Path::new("r.toml"), ok).unwrap();
        let r = &rules[0].1;
        assert!(matches!(r.condition, Condition::Gated { .. }));
        assert_eq!(r.metrics(), ["x", "y"]);
        let bad = "[[rules]]\nname = \"A\"\nexpr = \"x > 1\"\nwindow = \"1m\"\n";
        let e = parse_file(Path::new("r.toml"), bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`window` belongs to stall rules"), "{e}");
    }

    #[test]
    fn errors_name_the_line_the_rule_and_the_reason() {
        let text = "[[rules]]\nname = \"A\"\nexpr = \"x > 1\"\n\n[[rules]]\nname = \"B\"\nexpr = \"frobnicate(x[5m]) > 1\"\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("r.toml:7:"), "{e}");
        assert!(
            e.contains("rules.B.expr") && e.contains("unknown function \"frobnicate\""),
            "{e}"
        );

        let text = "[[rules]]\nname = \"C\"\nexpr = 'y{a=b} > 1'\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml:3:") && e.contains("bad selector"), "{e}");

        let text = "[[rules]]\nname = \"D\"\nexpr = \"x > 1\"\nfor = \"two minutes\"\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("r.toml:4:") && e.contains("rules.D.for") && e.contains("bad duration"),
            "{e}"
        );

        let text = "[[rules]]\nname = \"E\"\nstalled = \"x\"\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `window`"), "{e}");

        let text = "[[rules]]\nname = \"F\"\nexpr = \"x > 1\"\n[[rules]]\nname = \"F\"\nexpr = \"x > 2\"\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("defined twice"), "{e}");

        let text = "[[rules]]\nname = \"G\"\nexpr = \"x > 1\"\nsevertiy = \"critical\"\n";
        let e = parse_file(Path::new("r.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml:4:") && e.contains("severtiy"), "{e}");
    }

    #[test]
    fn a_file_overrides_or_disables_builtin_rules() {
        let text = "[[rules]]\nname = \"GpuMemoryOverload\"\nexpr = \"ratio(gpu_used_vram, gpu_total_vram) > 0.9\"\n[[rules]]\nname = \"NodeDown\"\nenabled = false\n";
        let (_, raws) = {
            let file: RulesFile = vitals_common::config::parse(Path::new("o.toml"), text).unwrap();
            (text.to_string(), file.rules)
        };
        let set =
            RuleSet::load(true, &[(PathBuf::from("o.toml"), text.to_string(), raws)]).unwrap();
        let gpu = set
            .rules
            .iter()
            .find(|r| r.name == "GpuMemoryOverload")
            .unwrap();
        assert_eq!(gpu.origin, "o.toml:2");
        assert!(!set.rules.iter().any(|r| r.name == "NodeDown"));
        assert!(set.rules.iter().any(|r| r.name == "ZfsPoolNotOnline"));
    }

    #[test]
    fn templates_fill_labels_and_values() {
        let mut l = Labels::new();
        l.insert("node".into(), "gpu-01".into());
        l.insert("gpu".into(), "3".into());
        assert_eq!(
            render(
                "GPU {{gpu}} on {{node}} at {{value_pct}} ({{value}}), {{nope}}, {{last}}",
                &l,
                0.9712,
                &BTreeMap::from([("last", "42".to_string())])
            ),
            "GPU 3 on gpu-01 at 97.1% (0.971), {{nope}}, 42"
        );
    }
}
