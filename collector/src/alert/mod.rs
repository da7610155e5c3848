//! Alerting: rules over the stored samples, the alert lifecycle, its
//! evidence and correlation, silences, and hand-off to the notifiers.
//!
//! One task owns the engine: every `eval_interval` it evaluates the rules
//! against the store (on a blocking thread), attaches the related signals to
//! alerts that fire, writes the changes to `alerts.db` in one transaction,
//! and only then hands firing and resolved alerts to the [`Sink`] (routing
//! and the notification outbox). Silences hold notifications back, never
//! the lifecycle.

pub mod action;
pub mod api;
pub mod correlate;
pub mod db;
pub mod engine;
pub mod eval;
pub mod expr;
pub mod route;
pub mod rules;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vitals_common::config::{self, ConfigError};

use self::db::AlertDb;
use self::engine::{Alert, Change, Engine, Phase};
use self::rules::{RawRule, RuleSet};
use crate::store::Store;

/// `[alerting]` in collector.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlertingConfig {
    /// Whether rules are evaluated at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Time between evaluations of every rule.
    #[serde(default = "default_eval", with = "config::duration")]
    pub eval_interval: Duration,
    /// The built-in rule pack (each rule can be replaced or disabled by name).
    #[serde(default = "default_true")]
    pub builtin: bool,
    /// Rules files (`[[rules]]`), relative to this config's directory.
    #[serde(default)]
    pub rule_files: Vec<PathBuf>,
    /// Rules written here, after the files.
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// How long a firing alert stays firing after its condition clears,
    /// unless a rule says otherwise. Default: two evaluation intervals.
    #[serde(default, with = "opt_duration")]
    pub keep_firing_for: Option<Duration>,
    /// Window before an alert's start searched for related signals.
    #[serde(default = "default_window", with = "config::duration")]
    pub correlation_window: Duration,
    /// Alerts and silences database; default `alerts.db` beside the store.
    #[serde(default)]
    pub state: Option<PathBuf>,
    /// Notification outbox database; default `outbox.db` beside the store.
    #[serde(default)]
    pub outbox: Option<PathBuf>,
    /// Where receivers of a notification can look at it (generatorURL).
    #[serde(default)]
    pub external_url: String,
    /// Receivers for alerts no route takes.
    #[serde(default)]
    pub default_receivers: Vec<String>,
    /// How long a group's first alerts wait for others (default 10s).
    #[serde(default, with = "opt_duration")]
    pub group_wait: Option<Duration>,
    /// How often a group still firing is sent again (default 4h).
    #[serde(default, with = "opt_duration")]
    pub repeat_interval: Option<Duration>,
    /// How long an undelivered notification is retried (default 24h).
    #[serde(default, with = "opt_duration")]
    pub give_up_after: Option<Duration>,
    /// Routes, tried in order: `[[alerting.routes]]`.
    #[serde(default)]
    pub routes: Vec<route::RouteConfig>,
    /// `[alerting.receivers.NAME]`: `webhook`, `alertmanager`, `sentry`.
    #[serde(default)]
    pub receivers: std::collections::BTreeMap<String, crate::notify::ReceiverConfig>,
    /// `[alerting.actions.NAME]`: commands or requests run when an alert
    /// fires (see [`action`]). None: nothing runs.
    #[serde(default)]
    pub actions: BTreeMap<String, action::ActionConfig>,
}

pub(crate) use vitals_common::config::opt_duration;

impl Default for AlertingConfig {
    fn default() -> Self {
        AlertingConfig {
            enabled: true,
            eval_interval: default_eval(),
            builtin: true,
            rule_files: Vec::new(),
            rules: Vec::new(),
            keep_firing_for: None,
            correlation_window: default_window(),
            state: None,
            outbox: None,
            external_url: String::new(),
            default_receivers: Vec::new(),
            group_wait: None,
            repeat_interval: None,
            give_up_after: None,
            routes: Vec::new(),
            receivers: Default::default(),
            actions: BTreeMap::new(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_eval() -> Duration {
    Duration::from_secs(15)
}
fn default_window() -> Duration {
    Duration::from_secs(15 * 60)
}

/// Checked alerting settings.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub enabled: bool,
    pub eval_interval: Duration,
    pub keep_firing_for: Duration,
    pub correlation_window: Duration,
    pub rules: RuleSet,
    pub state_path: PathBuf,
    pub outbox_path: PathBuf,
    pub outbox: crate::notify::OutboxOptions,
    pub routing: route::RoutingSettings,
    pub actions: action::Actions,
}

/// Loads the rule files and checks every rule. `text` is the config file's
/// own text (for the line numbers of inline rules).
pub fn settings(
    path: &Path,
    text: &str,
    cfg: &AlertingConfig,
    db_path: &Path,
) -> Result<AlertSettings, ConfigError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut sources = Vec::new();
    for f in &cfg.rule_files {
        let file = base.join(f);
        let (ftext, raws) = rules::load_file(&file)?;
        sources.push((file, ftext, raws));
    }
    sources.push((path.to_path_buf(), text.to_string(), cfg.rules.clone()));
    let rules = RuleSet::load(cfg.builtin, &sources)?;
    if cfg.eval_interval < Duration::from_millis(100) {
        return Err(ConfigError::invalid(
            path,
            "alerting.eval_interval",
            "must be at least 100ms",
        ));
    }
    let routing = route::settings(
        path,
        &cfg.routes,
        &cfg.default_receivers,
        &cfg.receivers,
        &cfg.external_url,
        cfg.group_wait.unwrap_or(Duration::from_secs(10)),
        cfg.repeat_interval.unwrap_or(Duration::from_secs(4 * 3600)),
    )?;
    let named: Vec<(String, Option<String>, String)> = rules
        .rules
        .iter()
        .map(|r| (r.name.clone(), r.action.clone(), r.origin.clone()))
        .collect();
    let actions = action::settings(path, &cfg.actions, &named)?;
    let beside = |name: &str| db_path.parent().unwrap_or(Path::new(".")).join(name);
    Ok(AlertSettings {
        routing,
        actions,
        outbox_path: match &cfg.outbox {
            Some(p) => base.join(p),
            None => beside("outbox.db"),
        },
        outbox: crate::notify::OutboxOptions {
            max_age: cfg
                .give_up_after
                .unwrap_or(crate::notify::OutboxOptions::default().max_age),
            ..Default::default()
        },
        enabled: cfg.enabled,
        eval_interval: cfg.eval_interval,
        keep_firing_for: cfg.keep_firing_for.unwrap_or(cfg.eval_interval * 2),
        correlation_window: cfg.correlation_window,
        rules,
        state_path: match &cfg.state {
            Some(p) => base.join(p),
            None => beside("alerts.db"),
        },
    })
}

/// Where firing and resolved alerts go (routing and the outbox).
///
/// A firing alert is offered to `notify` on every evaluation until `tick`
/// reports it durably queued (then it is recorded as notified): a crash in
/// between sends it again rather than never. A sink must therefore take
/// each firing alert once however often it is offered.
pub trait Sink: Send {
    /// An alert to send: firing, or resolved (`phase == Resolved`; sent only
    /// if its firing was, or is queued to be).
    fn notify(&mut self, alert: &Alert, now: i64);
    /// After each evaluation: flush groups whose wait passed (all of them
    /// with `flush_all`, at shutdown), repeat and re-send what must be,
    /// leaving out silenced alerts. Returns the fingerprints of firing
    /// alerts now durably queued.
    fn tick(
        &mut self,
        open: &[&Alert],
        silenced: &HashSet<String>,
        now: i64,
        flush_all: bool,
    ) -> Vec<String>;
}

/// A sink that only logs (no receivers configured).
#[derive(Default)]
pub struct LogSink {
    logged: Vec<String>,
}

impl Sink for LogSink {
    fn notify(&mut self, a: &Alert, _now: i64) {
        tracing::info!(
            alert = %a.rule,
            state = a.phase.as_str(),
            summary = a.annotations.get("summary").map(String::as_str).unwrap_or(""),
            "alert (no receivers configured)"
        );
        if a.phase == Phase::Firing {
            self.logged.push(a.fingerprint.clone());
        }
    }
    fn tick(
        &mut self,
        _open: &[&Alert],
        _silenced: &HashSet<String>,
        _now: i64,
        _flush_all: bool,
    ) -> Vec<String> {
        std::mem::take(&mut self.logged)
    }
}

/// The engine and its database, shared with the Alerts API.
pub struct Alerting {
    pub engine: Engine,
    pub db: AlertDb,
    pub correlation_window: Duration,
    /// Every recorded change, for `WatchAlerts` streams (none listening:
    /// sending costs nothing and is dropped).
    pub changes: tokio::sync::broadcast::Sender<Recorded>,
    /// How evaluation goes, for the collector's `/metrics`.
    pub health: Health,
    /// What runs when alerts fire.
    pub actions: action::Actions,
}

/// The evaluation loop's own health.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Evaluations of the whole rule set done.
    pub evaluations: u64,
    /// How long the last one took (rules, correlation, recording).
    pub last_duration: Duration,
    /// When the last one ran (ms since the epoch; 0: none yet).
    pub last_ms: i64,
    /// Evaluations whose changes could not be recorded in alerts.db.
    pub record_failures: u64,
}

/// A change as recorded: what happened ("pending", "firing", "updated",
/// "resolved", "dropped"), the alert after it, and when.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub kind: &'static str,
    pub alert: Alert,
    pub at_ms: i64,
    /// A silence in force covers it.
    pub silenced: bool,
}

impl Change {
    /// The change's name on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Pending(_) => "pending",
            Change::Fired(_) => "firing",
            Change::Updated(_) => "updated",
            Change::Resolved(_) => "resolved",
            Change::Dropped(_) => "dropped",
        }
    }
}

pub type Shared = Arc<Mutex<Alerting>>;

/// Opens `alerts.db` and resumes the open alerts in it.
pub fn open(settings: &AlertSettings) -> Result<Shared, db::DbError> {
    let mut db = AlertDb::open(&settings.state_path)?;
    let open = db.load_open()?;
    let cut = db.interrupt_running(vitals_common::now_ms())?;
    if cut > 0 {
        tracing::warn!(
            runs = cut,
            "actions the last run of the collector started did not finish; recorded as interrupted, not run again"
        );
    }
    if !open.is_empty() {
        tracing::info!(
            open = open.len(),
            "alerts resumed from {}",
            settings.state_path.display()
        );
    }
    let mut engine = Engine::new(settings.rules.rules.clone(), settings.keep_firing_for, open);
    engine.started_ms = vitals_common::now_ms();
    Ok(Arc::new(Mutex::new(Alerting {
        engine,
        db,
        correlation_window: settings.correlation_window,
        changes: tokio::sync::broadcast::channel(1024).0,
        health: Health::default(),
        actions: settings.actions.clone(),
    })))
}

/// Whether a silence in force covers the alert.
fn silenced(silences: &[db::Silence], a: &Alert) -> bool {
    silences.iter().any(|s| {
        s.selector()
            .is_some_and(|sel| sel.matches(&a.rule, &a.labels))
    })
}

/// One evaluation at `now`: step, correlate, notify decisions, persist.
/// Returns the alerts to hand to the sink (fired or resolved), after the
/// transaction that records them committed. `silences`: those in force now.
pub fn evaluate(
    shared: &Shared,
    data: &dyn eval::Data,
    now: i64,
    silences: &[db::Silence],
) -> Vec<Alert> {
    let mut guard = match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let st = &mut *guard;
    let began = std::time::Instant::now();
    st.health.evaluations += 1;
    st.health.last_ms = now;
    let send = evaluate_locked(st, data, now, silences);
    st.health.last_duration = began.elapsed();
    send
}

fn evaluate_locked(
    st: &mut Alerting,
    data: &dyn eval::Data,
    now: i64,
    silences: &[db::Silence],
) -> Vec<Alert> {
    let mut changes = st.engine.step(data, now);
    let window = st.correlation_window.as_millis() as i64;
    let mut send = Vec::new();
    // Correlate what fired.
    for c in changes.iter_mut() {
        if let Change::Fired(a) = c {
            let own = st
                .engine
                .rules
                .iter()
                .find(|r| r.name == a.rule)
                .map(|r| r.metrics())
                .unwrap_or_default();
            let open: Vec<&Alert> = st.engine.open.values().collect();
            let (mut related, cause) =
                correlate::related(a, &own, &open, data, a.active_since_ms - window, now);
            // A job's alert carries the log lines behind it (the OOM line).
            let log = correlate::job_log(a, data, a.active_since_ms - window, now);
            if !log.is_empty() {
                a.annotations.insert(
                    "log".into(),
                    log.iter()
                        .map(|r| r.what.clone())
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
                related.splice(0..0, log);
            }
            if !related.is_empty() {
                a.annotations.insert(
                    "related".into(),
                    related
                        .iter()
                        .map(correlate::describe)
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            if let Some(cause) = cause {
                a.annotations.insert("probable_cause".into(), cause);
            }
            a.related = related;
        }
    }
    for c in &changes {
        if let Some(open) = st.engine.open.get_mut(&c.alert().fingerprint) {
            *open = c.alert().clone();
        }
    }
    if let Err(e) = st.db.apply(&changes) {
        // Not recorded: put back what this step closed, so the next step
        // closes (and notifies) it again; send nothing now.
        tracing::error!(error = %e, "cannot record alert changes; notifications wait for the next evaluation");
        st.health.record_failures += 1;
        for c in changes {
            match c {
                Change::Resolved(mut a) => {
                    a.phase = Phase::Firing;
                    a.resolved_ms = None;
                    st.engine.open.insert(a.fingerprint.clone(), a);
                }
                Change::Dropped(a) => {
                    st.engine.open.insert(a.fingerprint.clone(), a);
                }
                _ => {}
            }
        }
        return Vec::new();
    }
    for c in &changes {
        // Err: nobody is watching.
        let a = c.alert();
        let _ = st.changes.send(Recorded {
            kind: c.kind(),
            silenced: a.phase != Phase::Resolved && silenced(silences, a),
            alert: a.clone(),
            at_ms: now,
        });
    }
    // What to offer the sink: every firing alert not yet queued and not
    // silenced (new ones, ones whose silence just ended, ones a crash left
    // unqueued), and resolutions that are not silenced.
    for a in st.engine.open.values() {
        if a.phase == Phase::Firing && !a.notified && !silenced(silences, a) {
            send.push(a.clone());
        }
    }
    for c in &changes {
        if let Change::Resolved(a) = c
            && !silenced(silences, a)
        {
            send.push(a.clone());
        }
    }
    for c in &changes {
        match c {
            Change::Fired(a) => tracing::warn!(
                alert = %a.rule,
                fingerprint = %a.fingerprint,
                summary = a.annotations.get("summary").map(String::as_str).unwrap_or(""),
                cause = a.annotations.get("probable_cause").map(String::as_str).unwrap_or(""),
                "alert firing"
            ),
            Change::Resolved(a) => tracing::info!(
                alert = %a.rule,
                fingerprint = %a.fingerprint,
                "alert resolved"
            ),
            _ => {}
        }
    }
    send
}

/// The metric of the open alerts, one series per alert as in Prometheus:
/// the alert's labels (`alertname`, `severity`, the series' and the rule's)
/// plus `alertstate` = "pending" or "firing", value 1 at each evaluation.
pub const ALERTS_METRIC: &str = "ALERTS";

/// Where `ALERTS` samples are written from (the store's source name).
const ALERTS_SOURCE: &str = "vitals-collector/alerts";

/// One batch per node of `ALERTS` samples for the open alerts at `now`
/// (alerts without a `node` label are left out: every series has one).
pub fn alerts_batches(open: &[Alert], now: i64) -> Vec<(String, crate::store::CleanBatch)> {
    let mut by_node: BTreeMap<String, crate::store::CleanBatch> = BTreeMap::new();
    for a in open {
        let state = match a.phase {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Resolved => continue,
        };
        let Some(node) = a.labels.get("node").filter(|n| !n.is_empty()) else {
            continue;
        };
        let mut labels = a.labels.clone();
        labels.insert("alertstate".into(), state.into());
        labels.insert("alertname".into(), a.rule.clone());
        let b = by_node
            .entry(node.clone())
            .or_insert_with(|| crate::store::CleanBatch {
                seq: u64::try_from(now).unwrap_or(0),
                series: Vec::new(),
                series_idx: Vec::new(),
                timestamps_ms: Vec::new(),
                values: Vec::new(),
                events: Vec::new(),
            });
        b.series_idx.push(b.series.len() as u32);
        b.series
            .push(std::sync::Arc::new(crate::store::SeriesKey::new(
                ALERTS_METRIC.to_string(),
                labels,
            )));
        b.timestamps_ms.push(now);
        b.values.push(1.0);
    }
    by_node.into_iter().collect()
}

/// Writes the open alerts as `ALERTS` samples (logged, not fatal, when the
/// store refuses: alerting goes on without them).
async fn write_alerts(writer: &crate::store::Writer, open: &[Alert], now: i64) {
    for (node, batch) in alerts_batches(open, now) {
        let r = match writer.write_own(&node, ALERTS_SOURCE, batch).await {
            Ok(rx) => rx
                .await
                .map_err(|_| "the store closed".to_string())
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(node = %node, error = %e, "cannot store the ALERTS series of this evaluation");
        }
    }
}

/// Runs the evaluation loop until `stop` turns true. With `own`, the open
/// alerts are also stored as `ALERTS` series after each evaluation.
pub async fn run(
    shared: Shared,
    store: Store,
    interval: Duration,
    mut sink: Box<dyn Sink>,
    mut stop: watch::Receiver<bool>,
    own: Option<crate::store::Writer>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        let now = vitals_common::now_ms();
        let (s2, st2) = (shared.clone(), store.clone());
        // Evaluate (unless stopping), offer to the sink, flush, and record
        // what is now queued: all off the async threads (SQLite commits).
        let step = tokio::task::spawn_blocking(move || {
            let silences = silences_now(&s2, now);
            let sent = if stopping {
                Vec::new()
            } else {
                evaluate(&s2, &st2, now, &silences)
            };
            for a in &sent {
                sink.notify(a, now);
            }
            let (open, silenced) = snapshot(&s2, &silences);
            let refs: Vec<&Alert> = open.iter().collect();
            let queued = sink.tick(&refs, &silenced, now, stopping);
            mark_notified(&s2, &queued);
            let (due, skipped) = if stopping {
                (Vec::new(), Vec::new())
            } else {
                plan_actions(&s2, now)
            };
            (sink, open, due, skipped)
        })
        .await;
        sink = match step {
            Ok((s, open, due, skipped)) => {
                spawn_actions(&shared, due, own.clone());
                if let (Some(w), false) = (&own, stopping) {
                    write_alerts(w, &open, now).await;
                    write_action_events(w, &skipped, now).await;
                }
                s
            }
            Err(e) => {
                tracing::error!(error = %e, "alert evaluation panicked; alerting stops until restart");
                return;
            }
        };
        if stopping {
            return;
        }
    }
}

/// Who runs actions, for the audit record.
fn who(rule: &str) -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    format!("rule {rule}, collector on {host}")
}

/// Records the actions due for firing alerts (one row per action and
/// alert, committed before anything runs) and returns those to run now.
pub fn plan_actions(shared: &Shared, now: i64) -> (Vec<action::Planned>, Vec<ActionEvent>) {
    let mut g = match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let st = &mut *g;
    if st.actions.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let mut due = Vec::new();
    let mut skipped = Vec::new();
    let mut firing: Vec<&Alert> = st
        .engine
        .open
        .values()
        .filter(|a| a.phase == Phase::Firing && st.actions.by_rule.contains_key(&a.rule))
        .collect();
    firing.sort_by_key(|a| (a.fired_ms, a.fingerprint.clone()));
    for a in firing {
        for name in &st.actions.by_rule[&a.rule] {
            let Some(act) = st.actions.actions.get(name) else {
                continue;
            };
            match st.db.action_taken(name, a) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    tracing::error!(action = %name, error = %e, "cannot read the action audit; not running it now");
                    continue;
                }
            }
            let cooling = st
                .db
                .action_last_run(name)
                .ok()
                .flatten()
                .is_some_and(|t| now - t < act.cooldown.as_millis() as i64);
            let outcome = if cooling {
                "cooldown"
            } else if act.dry_run {
                "dry_run"
            } else {
                "running"
            };
            let what = act.describe(&a.labels);
            match st
                .db
                .begin_action(name, a, &what, &who(&a.rule), act.dry_run, outcome, now)
            {
                Ok(Some(id)) => match outcome {
                    "running" => {
                        tracing::warn!(action = %name, alert = %a.rule, fingerprint = %a.fingerprint, "running action: {what}");
                        due.push(action::Planned {
                            run_id: id,
                            action: act.clone(),
                            alert: a.clone(),
                        });
                    }
                    "dry_run" => {
                        tracing::warn!(action = %name, alert = %a.rule, "dry run: would run {what}");
                        skipped.push(ActionEvent::new(name, a, "dry_run", None, &what));
                    }
                    _ => {
                        tracing::info!(action = %name, alert = %a.rule, cooldown = ?act.cooldown, "action not run: it ran within its cooldown");
                        skipped.push(ActionEvent::new(name, a, outcome, None, &what));
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(action = %name, error = %e, "cannot record the action; not running it")
                }
            }
        }
    }
    (due, skipped)
}

/// An action's run, or its skip (dry run, cooldown), as an event of kind
/// `action` on the alert's node (labels `action`, `rule`, `outcome`).
#[derive(Debug, Clone, PartialEq)]
pub struct ActionEvent {
    /// The alert's `node` label; None: no node, no event.
    pub node: Option<String>,
    pub action: String,
    pub rule: String,
    pub outcome: String,
    pub code: Option<i64>,
    pub what: String,
}

impl ActionEvent {
    pub fn new(action: &str, alert: &Alert, outcome: &str, code: Option<i64>, what: &str) -> Self {
        ActionEvent {
            node: alert.labels.get("node").filter(|n| !n.is_empty()).cloned(),
            action: action.to_string(),
            rule: alert.rule.clone(),
            outcome: outcome.to_string(),
            code,
            what: what.to_string(),
        }
    }

    /// The event, as a batch of its node; None without a node.
    pub fn batch(&self, now: i64) -> Option<(String, crate::store::CleanBatch)> {
        let node = self.node.clone()?;
        let severity = match self.outcome.as_str() {
            "ok" | "dry_run" | "cooldown" => vitals_proto::v1::Severity::Info,
            _ => vitals_proto::v1::Severity::Warning,
        };
        let code = self
            .code
            .map(|c| format!(" (exit {c})"))
            .unwrap_or_default();
        let verb = match self.outcome.as_str() {
            "dry_run" => "would run",
            "cooldown" => "not run (cooldown)",
            _ => "ran",
        };
        let message = format!(
            "action {} for {}: {verb} {}: {}{code}",
            self.action, self.rule, self.what, self.outcome
        );
        let labels = [
            ("action", &self.action),
            ("rule", &self.rule),
            ("outcome", &self.outcome),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
        Some((
            node,
            crate::store::CleanBatch {
                seq: u64::try_from(now).unwrap_or(0),
                series: Vec::new(),
                series_idx: Vec::new(),
                timestamps_ms: Vec::new(),
                values: Vec::new(),
                events: vec![crate::store::CleanEvent {
                    timestamp_ms: now,
                    kind: "action".into(),
                    severity: severity as i32,
                    message,
                    labels,
                }],
            },
        ))
    }
}

/// Stores action events (logged, not fatal, when the store refuses).
async fn write_action_events(writer: &crate::store::Writer, events: &[ActionEvent], now: i64) {
    for e in events {
        let Some((node, batch)) = e.batch(now) else {
            continue;
        };
        let r = match writer.write_own(&node, ACTIONS_SOURCE, batch).await {
            Ok(rx) => rx
                .await
                .map_err(|_| "the store closed".to_string())
                .and_then(|r| r),
            Err(e) => Err(e),
        };
        if let Err(err) = r {
            tracing::warn!(node = %node, action = %e.action, error = %err, "cannot store the action's event");
        }
    }
}

const ACTIONS_SOURCE: &str = "vitals-collector/actions";

/// Runs planned actions, each on its own task, and records how they end
/// (in the audit, and as an event through `own`).
fn spawn_actions(shared: &Shared, due: Vec<action::Planned>, own: Option<crate::store::Writer>) {
    for p in due {
        let shared = shared.clone();
        let own = own.clone();
        tokio::spawn(async move {
            let ended = action::execute(&p).await;
            tracing::warn!(
                action = %p.action.name,
                outcome = ended.0,
                code = ?ended.1,
                "action ended"
            );
            let event = ActionEvent::new(
                &p.action.name,
                &p.alert,
                ended.0,
                ended.1,
                &p.action.describe(&p.alert.labels),
            );
            let _ = tokio::task::spawn_blocking(move || {
                let mut g = match shared.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                if let Err(e) = g.db.finish_action(p.run_id, &ended, vitals_common::now_ms()) {
                    tracing::error!(action = %p.action.name, error = %e, "cannot record how the action ended");
                }
            })
            .await;
            if let Some(w) = own {
                write_action_events(&w, &[event], vitals_common::now_ms()).await;
            }
        });
    }
}

/// The silences in force at `now` (read once per evaluation).
fn silences_now(shared: &Shared, now: i64) -> Vec<db::Silence> {
    let g = match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    g.db.silences(false, now).unwrap_or_default()
}

/// The open alerts, and the fingerprints of those a silence covers.
fn snapshot(shared: &Shared, silences: &[db::Silence]) -> (Vec<Alert>, HashSet<String>) {
    let g = match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let open: Vec<Alert> = g.engine.open.values().cloned().collect();
    let silenced = open
        .iter()
        .filter(|a| silenced(silences, a))
        .map(|a| a.fingerprint.clone())
        .collect();
    (open, silenced)
}

/// Records that these firing alerts are queued for their receivers.
fn mark_notified(shared: &Shared, fingerprints: &[String]) {
    if fingerprints.is_empty() {
        return;
    }
    let mut g = match shared.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let st = &mut *g;
    let mut changes = Vec::new();
    for fp in fingerprints {
        if let Some(a) = st.engine.open.get_mut(fp)
            && !a.notified
        {
            a.notified = true;
            changes.push(Change::Updated(a.clone()));
        }
    }
    if let Err(e) = st.db.apply(&changes) {
        // Kept in memory; a restart may send these again (at least once).
        tracing::error!(error = %e, "cannot record that alerts were queued");
    }
}
