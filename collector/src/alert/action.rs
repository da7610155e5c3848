//! Actions: a command or an HTTP request run by the collector when an
//! alert fires (a rollback to the last stable model, a node drain).
//!
//! `[alerting.actions.NAME]` defines one; a rule names it with
//! `action = "NAME"`, or the action lists rules with `rules = [...]` (so a
//! built-in rule needs no copy). Off unless configured; only the collector
//! runs them, never an agent.
//!
//! At most one run per alert: before anything runs, a row keyed by
//! (action, alert fingerprint, alert start) is committed to `alerts.db`
//! (a unique index), so neither a later evaluation nor a restart runs it
//! again; a run the collector did not see end is marked `interrupted` at
//! the next start, not retried. `cooldown`: an action that ran (or would
//! have, in dry-run) less than this long ago is not run for a newer alert;
//! that alert's row says `cooldown`. `dry_run`: the row says what would
//! have run (`dry_run`), nothing runs. Every row is the audit record: who
//! (the rule and alert), what (the command line or request), when, the
//! outcome, the exit code or HTTP status, and the first 16 KiB of output.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::config::{self, ConfigError};
use vitals_common::model::Labels;

use super::engine::Alert;
use crate::notify::http::Endpoint;

/// `[alerting.actions.NAME]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// A program and its arguments (no shell). `{{label}}` in an argument
    /// is the alert's label (`{{node}}`, `{{endpoint}}`, `{{alertname}}`).
    #[serde(default)]
    pub command: Vec<String>,
    /// Or: POST to this URL (the alert as JSON, or `body`).
    #[serde(default)]
    pub url: Option<String>,
    /// The POST body (`{{label}}` filled in); default: the alert as JSON.
    #[serde(default)]
    pub body: Option<String>,
    /// CA certificates for an https `url`; default the system's.
    #[serde(default)]
    pub ca: Option<std::path::PathBuf>,
    /// Rules that run this action, besides those that name it.
    #[serde(default)]
    pub rules: Vec<String>,
    /// Record what would run; run nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// After a run, newer alerts do not run it again for this long.
    #[serde(default = "default_cooldown", with = "config::duration")]
    pub cooldown: Duration,
    /// A run still going after this long is killed (`timeout`).
    #[serde(default = "default_timeout", with = "config::duration")]
    pub timeout: Duration,
}

fn default_cooldown() -> Duration {
    Duration::from_secs(600)
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

/// What an action does.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Command(Vec<String>),
    Http {
        endpoint: Endpoint,
        body: Option<String>,
    },
}

/// A checked action.
#[derive(Debug, Clone)]
pub struct Action {
    pub name: String,
    pub(crate) kind: Kind,
    pub dry_run: bool,
    pub cooldown: Duration,
    pub timeout: Duration,
}

/// The actions, and which rules run which.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    pub actions: BTreeMap<String, Action>,
    /// Rule name → action names.
    pub by_rule: BTreeMap<String, Vec<String>>,
}

impl Actions {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Checks `[alerting.actions]` against the rules (`(name, its action)`).
pub fn settings(
    path: &Path,
    cfg: &BTreeMap<String, ActionConfig>,
    rules: &[(String, Option<String>, String)],
) -> Result<Actions, ConfigError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Actions::default();
    for (name, a) in cfg {
        let key = |k: &str| format!("alerting.actions.{name}.{k}");
        let kind = match (a.command.is_empty(), &a.url) {
            (false, None) => {
                if a.command[0].trim().is_empty() {
                    return Err(ConfigError::invalid(
                        path,
                        &key("command"),
                        "the program (first element) is empty",
                    ));
                }
                Kind::Command(a.command.clone())
            }
            (true, Some(url)) => {
                let ca = a.ca.as_ref().map(|c| base.join(c));
                let endpoint = Endpoint::parse(url, ca.as_deref()).map_err(|e| {
                    let (k, m) = e.keyed(&format!("alerting.actions.{name}"), "url");
                    ConfigError::invalid(path, &k, m)
                })?;
                Kind::Http {
                    endpoint,
                    body: a.body.clone(),
                }
            }
            _ => {
                return Err(ConfigError::invalid(
                    path,
                    &format!("alerting.actions.{name}"),
                    "give `command = [\"program\", \"arg\", ...]` or `url = \"...\"` (one of them)",
                ));
            }
        };
        if a.timeout < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                path,
                &key("timeout"),
                "must be at least 10ms",
            ));
        }
        for r in &a.rules {
            if !rules.iter().any(|(n, _, _)| n == r) {
                return Err(ConfigError::invalid(
                    path,
                    &key("rules"),
                    format!("no rule is named {r:?} (`vitals rules check` lists them)"),
                ));
            }
            out.by_rule.entry(r.clone()).or_default().push(name.clone());
        }
        out.actions.insert(
            name.clone(),
            Action {
                name: name.clone(),
                kind,
                dry_run: a.dry_run,
                cooldown: a.cooldown,
                timeout: a.timeout,
            },
        );
    }
    for (rule, action, origin) in rules {
        let Some(action) = action else { continue };
        if !out.actions.contains_key(action) {
            return Err(ConfigError::invalid(
                path,
                "alerting.actions",
                format!(
                    "rule {rule} ({origin}) names action {action:?}, which no [alerting.actions.{action}] defines"
                ),
            ));
        }
        let list = out.by_rule.entry(rule.clone()).or_default();
        if !list.contains(action) {
            list.push(action.clone());
        }
    }
    Ok(out)
}

/// `{{label}}` → the alert's label (unknown ones become empty);
/// `{{a or b}}` → the first of those labels the alert has, non-empty
/// (e.g. `{{slurm_node or node}}`: SLURM's node name where the alert
/// carries one, else the agent's).
pub fn fill(template: &str, labels: &Labels) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) => {
                let value = after[..j]
                    .split(" or ")
                    .filter_map(|name| labels.get(name.trim()))
                    .find(|v| !v.is_empty());
                out.push_str(value.map(String::as_str).unwrap_or(""));
                rest = &after[j + 2..];
            }
            None => {
                out.push_str(&rest[i..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Run {
    pub id: i64,
    pub action: String,
    pub rule: String,
    pub fingerprint: String,
    pub alert_since_ms: i64,
    pub labels: Labels,
    /// The command line, or `POST url`.
    pub what: String,
    /// What ran it: the rule and this collector.
    pub who: String,
    pub dry_run: bool,
    /// running, ok, failed, timeout, dry_run, cooldown, interrupted.
    pub outcome: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// The exit code, or the HTTP status.
    pub exit_code: Option<i64>,
    pub output: String,
}

/// What an action will do for an alert, ready to run.
#[derive(Debug, Clone)]
pub struct Planned {
    pub run_id: i64,
    pub action: Action,
    pub alert: Alert,
}

impl Action {
    /// The command line or request, as recorded.
    pub fn describe(&self, labels: &Labels) -> String {
        match &self.kind {
            Kind::Command(argv) => argv
                .iter()
                .map(|a| {
                    let a = fill(a, labels);
                    if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '"') {
                        format!("{a:?}")
                    } else {
                        a
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            Kind::Http { endpoint, .. } => format!("POST {}", endpoint.url()),
        }
    }
}

/// Output kept per run.
const OUTPUT_LIMIT: usize = 16 << 10;

fn clip(mut s: String) -> String {
    if s.len() > OUTPUT_LIMIT {
        let mut end = OUTPUT_LIMIT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("\n[output cut at 16 KiB]");
    }
    s
}

/// How a run ended: (outcome, exit code or status, output).
pub type Ended = (&'static str, Option<i64>, String);

/// Runs a planned action (not a dry run: those are recorded as planned).
pub async fn execute(p: &Planned) -> Ended {
    match &p.action.kind {
        Kind::Command(argv) => run_command(argv, &p.alert, p.action.timeout).await,
        Kind::Http { endpoint, body } => {
            let body = match body {
                Some(b) => fill(b, &p.alert.labels),
                None => serde_json::json!({
                    "alertname": p.alert.rule,
                    "fingerprint": p.alert.fingerprint,
                    "labels": p.alert.labels,
                    "annotations": p.alert.annotations,
                    "startsAt": p.alert.active_since_ms,
                    "value": p.alert.value,
                })
                .to_string(),
            };
            let headers = [("Idempotency-Key", format!("{}-{}", p.action.name, p.run_id))];
            match crate::notify::http::post(
                endpoint,
                "application/json",
                &headers,
                body.into_bytes(),
                p.action.timeout,
            )
            .await
            {
                Ok(r) => {
                    let outcome = if (200..300).contains(&r.status) {
                        "ok"
                    } else {
                        "failed"
                    };
                    (outcome, Some(i64::from(r.status)), clip(r.body))
                }
                Err(e) => (
                    if e.message.contains("no answer within") {
                        "timeout"
                    } else {
                        "failed"
                    },
                    None,
                    e.message,
                ),
            }
        }
    }
}

async fn run_command(argv: &[String], alert: &Alert, timeout: Duration) -> Ended {
    let args: Vec<String> = argv.iter().map(|a| fill(a, &alert.labels)).collect();
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .env("VITALS_ALERT_NAME", &alert.rule)
        .env("VITALS_ALERT_FINGERPRINT", &alert.fingerprint)
        .env(
            "VITALS_ALERT_LABELS",
            serde_json::to_string(&alert.labels).unwrap_or_default(),
        )
        .env(
            "VITALS_ALERT_SUMMARY",
            alert
                .annotations
                .get("summary")
                .map(String::as_str)
                .unwrap_or(""),
        );
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ("failed", None, format!("cannot start {:?}: {e}", args[0])),
    };
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let code = out.status.code().map(i64::from);
            let outcome = if out.status.success() { "ok" } else { "failed" };
            let text = if code.is_none() {
                format!("{text}[ended by a signal: {}]", out.status)
            } else {
                text
            };
            (outcome, code, clip(text))
        }
        Ok(Err(e)) => ("failed", None, format!("waiting for {:?}: {e}", args[0])),
        // Dropping the future drops the child: kill_on_drop kills it.
        Err(_) => (
            "timeout",
            None,
            format!("still running after {timeout:?}: killed"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn templates_fill_labels() {
        let l = labels(&[("node", "gpu01"), ("endpoint", "blue")]);
        assert_eq!(
            fill("drain {{node}} for {{ endpoint }}", &l),
            "drain gpu01 for blue"
        );
        assert_eq!(fill("{{missing}}x", &l), "x");
        assert_eq!(
            fill("nodename={{slurm_node or node}}", &l),
            "nodename=gpu01"
        );
        assert_eq!(fill("{{ endpoint or node }}", &l), "blue");
        assert_eq!(fill("open {{ without end", &l), "open {{ without end");
    }

    fn cfg(text: &str) -> BTreeMap<String, ActionConfig> {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn settings_check_actions_and_their_rules() {
        let p = Path::new("/etc/vitals/collector.toml");
        let rules = vec![
            (
                "Slow".to_string(),
                Some("rollback".to_string()),
                "f:3".to_string(),
            ),
            ("Down".to_string(), None, "built-in".to_string()),
        ];
        let ok = settings(
            p,
            &cfg("[rollback]\ncommand = [\"az\", \"ml\", \"{{endpoint}}\"]\nrules = [\"Down\"]\n"),
            &rules,
        )
        .unwrap();
        assert_eq!(ok.by_rule["Slow"], vec!["rollback"]);
        assert_eq!(ok.by_rule["Down"], vec!["rollback"]);
        let a = &ok.actions["rollback"];
        assert_eq!(a.cooldown, Duration::from_secs(600));
        assert_eq!(
            a.describe(&labels(&[("endpoint", "my ep")])),
            "az ml \"my ep\""
        );

        let err = |text: &str| settings(p, &cfg(text), &rules).unwrap_err().to_string();
        assert!(
            err("[rollback]\n").contains("`command"),
            "{}",
            err("[rollback]\n")
        );
        let e = err("[rollback]\ncommand = [\"x\"]\nurl = \"http://h/\"\n");
        assert!(e.contains("one of them"), "{e}");
        let e = err("[rollback]\ncommand = [\"x\"]\nrules = [\"Nope\"]\n");
        assert!(
            e.contains("alerting.actions.rollback.rules") && e.contains("Nope"),
            "{e}"
        );
        let e = err("[other]\ncommand = [\"x\"]\n");
        assert!(
            e.contains("names action \"rollback\"") && e.contains("f:3"),
            "{e}"
        );
        let e = err("[rollback]\nurl = \"ftp://h/\"\n");
        assert!(e.contains("alerting.actions.rollback.url"), "{e}");
    }
}
