//! Routing: which receivers hear about an alert, grouped how, and when.
//!
//! Routes are tried in order; the first whose matchers match the alert's
//! labels takes it (with `continue = true` the next ones are tried too);
//! an alert no route takes goes to `default_receivers`. Per receiver, alerts
//! are grouped by the route's `group_by` labels: a group's changes wait
//! `group_wait` so that alerts firing together go out together, and a group
//! still firing is sent again every `repeat_interval`. Receivers with an
//! Alertmanager get every firing alert again each `resend_interval` (an
//! Alertmanager forgets alerts that are not re-sent), as resend-only outbox
//! rows that reach only those targets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::model::format_value;
use vitals_common::selector::{self, Selector};

use super::engine::{Alert, Phase};
use super::{Sink, opt_duration};
use crate::notify::{AlertPayload, AlertStatus, Notification, Outbox, ReceiverConfig, Target};

/// `[[alerting.routes]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Prometheus matchers over the alert's labels, e.g. `{team="ml"}`;
    /// absent: every alert.
    #[serde(default, rename = "match")]
    pub matchers: Option<String>,
    /// Receivers (names under `[alerting.receivers]`).
    pub receivers: Vec<String>,
    /// Keep trying the routes after this one.
    #[serde(default, rename = "continue")]
    pub continue_: bool,
    /// Labels that make a group (default: alertname, node).
    #[serde(default)]
    pub group_by: Option<Vec<String>>,
    #[serde(default, with = "opt_duration")]
    pub group_wait: Option<Duration>,
    #[serde(default, with = "opt_duration")]
    pub repeat_interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub selector: Option<Selector>,
    pub receivers: Vec<String>,
    pub continue_: bool,
    pub group_by: Vec<String>,
    pub group_wait: Duration,
    pub repeat_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RoutingSettings {
    pub routes: Vec<Route>,
    /// The route for alerts no route takes (its receivers may be empty).
    pub default: Route,
    /// Receiver → its targets.
    pub targets: HashMap<String, Vec<Target>>,
    /// Receiver → how often firing alerts are sent again to its Alertmanagers.
    pub resend: HashMap<String, Duration>,
    pub external_url: String,
}

/// Checks routes against the receivers; builds every target.
pub fn settings(
    path: &std::path::Path,
    routes: &[RouteConfig],
    default_receivers: &[String],
    receivers: &BTreeMap<String, ReceiverConfig>,
    external_url: &str,
    group_wait: Duration,
    repeat_interval: Duration,
) -> Result<RoutingSettings, vitals_common::config::ConfigError> {
    use vitals_common::config::ConfigError;
    let mut targets = HashMap::new();
    let mut resend = HashMap::new();
    for (name, rc) in receivers {
        let list = rc.validate(path, name)?;
        for t in &list {
            if t.is_plaintext_remote() {
                tracing::warn!(receiver = %name, target = %t.display(), "plain-HTTP receiver on another host: alerts and their evidence travel unencrypted");
            }
        }
        if let Some(every) = list.iter().filter_map(Target::resend_interval).min() {
            resend.insert(name.clone(), every);
        }
        targets.insert(name.clone(), list);
    }
    let known = |key: &str, list: &[String]| -> Result<(), ConfigError> {
        for r in list {
            if !receivers.contains_key(r) {
                let names: Vec<&str> = receivers.keys().map(String::as_str).collect();
                return Err(ConfigError::invalid(
                    path,
                    key,
                    format!(
                        "unknown receiver {r:?}; receivers: {}",
                        if names.is_empty() {
                            "(none: add [alerting.receivers.NAME])".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    };
    known("alerting.default_receivers", default_receivers)?;
    let default_group = vec!["alertname".to_string(), "node".to_string()];
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let key = format!("alerting.routes[{i}]");
        known(&format!("{key}.receivers"), &r.receivers)?;
        let selector = match &r.matchers {
            Some(m) => Some(
                selector::parse(m)
                    .map_err(|e| ConfigError::invalid(path, &format!("{key}.match"), e))?,
            ),
            None => None,
        };
        out.push(Route {
            selector,
            receivers: r.receivers.clone(),
            continue_: r.continue_,
            group_by: r.group_by.clone().unwrap_or_else(|| default_group.clone()),
            group_wait: r.group_wait.unwrap_or(group_wait),
            repeat_interval: r.repeat_interval.unwrap_or(repeat_interval),
        });
    }
    Ok(RoutingSettings {
        routes: out,
        default: Route {
            selector: None,
            receivers: default_receivers.to_vec(),
            continue_: false,
            group_by: default_group,
            group_wait,
            repeat_interval,
        },
        targets,
        resend,
        external_url: external_url.trim_end_matches('/').to_string(),
    })
}

impl RoutingSettings {
    /// The routes that take an alert with these labels.
    pub fn routes_for<'a>(
        &'a self,
        alertname: &str,
        labels: &vitals_common::model::Labels,
    ) -> Vec<&'a Route> {
        let mut out = Vec::new();
        for r in &self.routes {
            let hit = r
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(alertname, labels));
            if hit {
                out.push(r);
                if !r.continue_ {
                    return out;
                }
            }
        }
        if out.is_empty() {
            out.push(&self.default);
        }
        out
    }
}

/// An alert as receivers see it.
pub fn payload(a: &Alert, external_url: &str) -> AlertPayload {
    let mut annotations = a.annotations.clone();
    if !a.evidence.is_empty() {
        annotations.insert(
            "evidence".into(),
            a.evidence
                .iter()
                .map(|e| {
                    let pts: Vec<String> = e.points.iter().map(|p| format_value(p.1)).collect();
                    format!("{} = {}", e.series, pts.join(" "))
                })
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    AlertPayload {
        fingerprint: a.fingerprint.clone(),
        status: if a.phase == Phase::Resolved {
            AlertStatus::Resolved
        } else {
            AlertStatus::Firing
        },
        labels: a.labels.clone().into_iter().collect(),
        annotations,
        starts_at_ms: a.fired_ms.unwrap_or(a.active_since_ms),
        ends_at_ms: a.resolved_ms,
        generator_url: if external_url.is_empty() {
            String::new()
        } else {
            format!("{external_url}/alerts/{}", a.fingerprint)
        },
    }
}

struct Group {
    receiver: String,
    key: String,
    labels: BTreeMap<String, String>,
    wait: Duration,
    repeat: Duration,
    /// Changes not sent yet, by fingerprint (the latest wins).
    pending: BTreeMap<String, AlertPayload>,
    pending_since: Option<i64>,
    firing: BTreeMap<String, AlertPayload>,
    last_sent: Option<i64>,
}

pub struct Router {
    settings: RoutingSettings,
    outbox: Outbox,
    groups: HashMap<String, Group>,
    last_resend: HashMap<String, i64>,
}

impl Router {
    pub fn new(settings: RoutingSettings, outbox: Outbox) -> Router {
        Router {
            settings,
            outbox,
            groups: HashMap::new(),
            last_resend: HashMap::new(),
        }
    }

    fn enqueue(&self, receiver: &str, n: &Notification) -> bool {
        match self.outbox.enqueue(receiver, n) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(receiver, error = %e, "cannot queue a notification; trying again next evaluation");
                false
            }
        }
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Sink for Router {
    fn notify(&mut self, a: &Alert, now: i64) {
        let p = payload(a, &self.settings.external_url);
        let routes: Vec<Route> = self
            .settings
            .routes_for(&a.rule, &a.labels)
            .into_iter()
            .cloned()
            .collect();
        for route in routes {
            if route.receivers.is_empty() {
                tracing::info!(alert = %a.rule, "no receiver for this alert (set alerting.default_receivers or a route)");
            }
            let labels: BTreeMap<String, String> = route
                .group_by
                .iter()
                .map(|k| (k.clone(), a.labels.get(k).cloned().unwrap_or_default()))
                .collect();
            for receiver in &route.receivers {
                let key = format!(
                    "{receiver}:{}",
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                let g = self.groups.entry(key.clone()).or_insert_with(|| Group {
                    receiver: receiver.clone(),
                    key,
                    labels: labels.clone(),
                    wait: route.group_wait,
                    repeat: route.repeat_interval,
                    pending: BTreeMap::new(),
                    pending_since: None,
                    firing: BTreeMap::new(),
                    last_sent: None,
                });
                let fp = &p.fingerprint;
                let unsent = g
                    .pending
                    .get(fp)
                    .is_some_and(|q| q.status == AlertStatus::Firing);
                if p.status == AlertStatus::Firing {
                    // Offered again until queued: take it once.
                    if g.firing.contains_key(fp) {
                        continue;
                    }
                    g.firing.insert(fp.clone(), p.clone());
                } else {
                    let known = g.firing.remove(fp).is_some();
                    if unsent {
                        // Resolved before its firing went out: nobody heard
                        // of it; send neither.
                        g.pending.remove(fp);
                        if g.pending.is_empty() {
                            g.pending_since = None;
                        }
                        continue;
                    }
                    if !known && !a.notified {
                        continue;
                    }
                }
                g.pending.insert(fp.clone(), p.clone());
                g.pending_since.get_or_insert(now);
            }
        }
    }

    fn tick(
        &mut self,
        open: &[&Alert],
        silenced: &HashSet<String>,
        now: i64,
        flush_all: bool,
    ) -> Vec<String> {
        let mut queued = Vec::new();
        // A silence that started while a firing waited holds it back (it
        // is offered again when the silence ends).
        for g in self.groups.values_mut() {
            let held: Vec<String> = g
                .pending
                .iter()
                .filter(|(fp, p)| p.status == AlertStatus::Firing && silenced.contains(*fp))
                .map(|(fp, _)| fp.clone())
                .collect();
            for fp in held {
                g.pending.remove(&fp);
                g.firing.remove(&fp);
            }
            if g.pending.is_empty() {
                g.pending_since = None;
            }
        }
        let mut due: Vec<(String, Notification, bool)> = Vec::new();
        for g in self.groups.values() {
            let audible: Vec<AlertPayload> = g
                .firing
                .iter()
                .filter(|(fp, _)| !silenced.contains(*fp))
                .map(|(_, p)| p.clone())
                .collect();
            let send = if !g.pending.is_empty() {
                (flush_all || g.pending_since.is_some_and(|t| now - t >= ms(g.wait)))
                    .then(|| g.pending.values().cloned().collect::<Vec<_>>())
            } else if !audible.is_empty() && g.last_sent.is_some_and(|t| now - t >= ms(g.repeat)) {
                Some(audible)
            } else {
                None
            };
            if let Some(alerts) = send {
                due.push((
                    g.key.clone(),
                    Notification {
                        receiver: g.receiver.clone(),
                        group_key: g.key.clone(),
                        group_labels: g.labels.clone(),
                        alerts,
                        external_url: self.settings.external_url.clone(),
                    },
                    !g.pending.is_empty(),
                ));
            }
        }
        for (key, n, was_pending) in due {
            if self.enqueue(&n.receiver, &n)
                && let Some(g) = self.groups.get_mut(&key)
            {
                g.last_sent = Some(now);
                if was_pending {
                    queued.extend(
                        g.pending
                            .values()
                            .filter(|p| p.status == AlertStatus::Firing)
                            .map(|p| p.fingerprint.clone()),
                    );
                    g.pending.clear();
                    g.pending_since = None;
                }
            }
        }
        self.groups
            .retain(|_, g| !g.pending.is_empty() || !g.firing.is_empty());

        // Alertmanagers: every firing alert again, each resend interval.
        let resend: Vec<(String, Duration)> = self
            .settings
            .resend
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (receiver, every) in resend {
            let last = self.last_resend.get(&receiver).copied();
            if last.is_some_and(|t| now - t < ms(every)) {
                continue;
            }
            self.last_resend.insert(receiver.clone(), now);
            let alerts: Vec<AlertPayload> = open
                .iter()
                .filter(|a| {
                    a.phase == Phase::Firing && a.notified && !silenced.contains(&a.fingerprint)
                })
                .filter(|a| {
                    self.settings
                        .routes_for(&a.rule, &a.labels)
                        .iter()
                        .any(|r| r.receivers.contains(&receiver))
                })
                .map(|a| payload(a, &self.settings.external_url))
                .collect();
            if alerts.is_empty() || last.is_none() {
                // The first pass after a start only sets the clock.
                continue;
            }
            let n = Notification {
                receiver: receiver.clone(),
                group_key: format!("{receiver}:resend"),
                group_labels: BTreeMap::new(),
                alerts,
                external_url: self.settings.external_url.clone(),
            };
            if let Err(e) = self.outbox.enqueue_resend(&receiver, &n) {
                tracing::error!(receiver, error = %e, "cannot queue the Alertmanager re-send; trying next interval");
            }
        }
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> RoutingSettings {
        #[derive(Deserialize)]
        struct T {
            #[serde(default)]
            routes: Vec<RouteConfig>,
            #[serde(default)]
            default_receivers: Vec<String>,
            receivers: BTreeMap<String, ReceiverConfig>,
        }
        let t: T = toml::from_str(text).unwrap();
        settings(
            Path::new("c.toml"),
            &t.routes,
            &t.default_receivers,
            &t.receivers,
            "",
            Duration::from_secs(10),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    const RECEIVERS: &str = r#"
[receivers.ops]
webhook = { url = "http://127.0.0.1:9/ops" }
alertmanager = { url = "http://127.0.0.1:9093" }
[receivers.ml]
webhook = { url = "http://127.0.0.1:9/ml" }
[receivers.analysts]
webhook = { url = "http://127.0.0.1:9/analysts" }
"#;

    fn names(r: &[&Route]) -> Vec<String> {
        r.iter().flat_map(|r| r.receivers.clone()).collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> vitals_common::model::Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn first_match_wins_continue_goes_on_and_the_rest_go_to_the_default() {
        let s = cfg(&format!(
            r#"default_receivers = ["ops"]
[[routes]]
match = '{{severity="critical"}}'
receivers = ["ops"]
continue = true
[[routes]]
match = '{{team="ml"}}'
receivers = ["ml"]
[[routes]]
match = '{{team=~"ml|analysts"}}'
receivers = ["analysts"]
{RECEIVERS}"#
        ));
        let crit_ml = labels(&[("severity", "critical"), ("team", "ml")]);
        assert_eq!(names(&s.routes_for("JobStalled", &crit_ml)), ["ops", "ml"]);
        let warn_ml = labels(&[("severity", "warning"), ("team", "ml")]);
        assert_eq!(names(&s.routes_for("JobStalled", &warn_ml)), ["ml"]);
        let an = labels(&[("severity", "warning"), ("team", "analysts")]);
        assert_eq!(names(&s.routes_for("ModelWrong", &an)), ["analysts"]);
        let other = labels(&[("severity", "warning"), ("team", "ops")]);
        assert_eq!(names(&s.routes_for("NicErrorsRising", &other)), ["ops"]);
        // Receivers with an Alertmanager are re-sent to.
        assert_eq!(s.resend["ops"], Duration::from_secs(60));
        assert!(!s.resend.contains_key("ml"));
        assert_eq!(s.targets["ops"].len(), 2);
    }

    #[test]
    fn unknown_receivers_and_bad_matchers_are_config_errors() {
        #[derive(Deserialize)]
        struct T {
            routes: Vec<RouteConfig>,
            receivers: BTreeMap<String, ReceiverConfig>,
        }
        let t: T =
            toml::from_str(&format!("[[routes]]\nreceivers = [\"pager\"]\n{RECEIVERS}")).unwrap();
        let e = settings(
            Path::new("c.toml"),
            &t.routes,
            &[],
            &t.receivers,
            "",
            Duration::ZERO,
            Duration::ZERO,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("alerting.routes[0].receivers") && e.contains("unknown receiver \"pager\""),
            "{e}"
        );
        let t: T = toml::from_str(&format!(
            "[[routes]]\nmatch = '{{team=}}'\nreceivers = [\"ml\"]\n{RECEIVERS}"
        ))
        .unwrap();
        let e = settings(
            Path::new("c.toml"),
            &t.routes,
            &[],
            &t.receivers,
            "",
            Duration::ZERO,
            Duration::ZERO,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("alerting.routes[0].match"), "{e}");
    }

    fn alert(fp: &str, phase: Phase) -> Alert {
        Alert {
            id: None,
            fingerprint: fp.into(),
            rule: "X".into(),
            severity: "critical".into(),
            labels: labels(&[("alertname", "X"), ("node", fp)]),
            annotations: BTreeMap::new(),
            phase,
            active_since_ms: 1,
            fired_ms: Some(1),
            resolved_ms: (phase == Phase::Resolved).then_some(2),
            last_true_ms: 1,
            value: 1.0,
            evidence: Vec::new(),
            related: Vec::new(),
            notified: false,
        }
    }

    #[test]
    fn a_firing_alert_offered_again_is_queued_once_and_silences_hold_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&dir.path().join("o.db")).unwrap();
        let mut s = cfg(&format!("default_receivers = [\"ml\"]\n{RECEIVERS}"));
        s.default.group_wait = Duration::ZERO;
        let mut r = Router::new(s, outbox.clone());
        let none = HashSet::new();
        let a = alert("a", Phase::Firing);
        r.notify(&a, 10);
        r.notify(&a, 10);
        assert_eq!(r.tick(&[&a], &none, 10, false), ["a"]);
        assert_eq!(outbox.open_rows().unwrap(), 1);
        // Offered again before it was recorded as queued: not again.
        r.notify(&a, 20);
        assert!(r.tick(&[&a], &none, 20, false).is_empty());
        assert_eq!(outbox.open_rows().unwrap(), 1);
        // Resolved before its firing went out: neither is sent.
        let b = alert("b", Phase::Firing);
        let mut r2 = Router::new(
            cfg(&format!("default_receivers = [\"ml\"]\n{RECEIVERS}")),
            outbox.clone(),
        );
        r2.notify(&b, 30);
        r2.notify(&alert("b", Phase::Resolved), 31);
        assert!(r2.tick(&[], &none, 60_000, true).is_empty());
        assert_eq!(outbox.open_rows().unwrap(), 1);
        // A silence that starts while a firing waits holds it back.
        let c = alert("c", Phase::Firing);
        r2.notify(&c, 40);
        let quiet: HashSet<String> = ["c".to_string()].into();
        assert!(r2.tick(&[&c], &quiet, 60_000, true).is_empty());
        assert_eq!(outbox.open_rows().unwrap(), 1);
        // At shutdown everything waiting goes out, whatever its group_wait.
        let d = alert("d", Phase::Firing);
        r2.notify(&d, 50);
        assert!(
            r2.tick(&[&d], &none, 51, false).is_empty(),
            "group_wait 10s"
        );
        assert_eq!(r2.tick(&[&d], &none, 52, true), ["d"]);
        assert_eq!(outbox.open_rows().unwrap(), 2);
    }
}
