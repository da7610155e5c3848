//! The collector's own metrics, served on the HTTP listener's `/metrics`
//! in the Prometheus text format: counters kept here (ingest), and gauges
//! read at scrape time from the parts that own them (store, connected
//! agents, outbox).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ingest::Connected;
use crate::notify::Outbox;
use crate::store::Store;

/// Counters the ingest path bumps; cheap (relaxed atomics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Batches read from agent streams (before validation).
    pub batches_received: AtomicU64,
    /// Samples in those batches.
    pub samples_received: AtomicU64,
    /// Batches refused whole (invalid, wrong node, out of sequence).
    pub batches_rejected: AtomicU64,
    /// Ingest streams refused for their certificate (none, or not an agent).
    pub streams_rejected: AtomicU64,
    /// HTTP API requests answered, and those answered with an error.
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    /// Samples stored through the Push RPC, and requests it refused.
    pub pushed_samples: AtomicU64,
    pub push_rejected: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Everything `/metrics` reads.
#[derive(Clone)]
pub struct Sources {
    pub counters: Arc<Counters>,
    pub store: Store,
    pub connected: Connected,
    /// The notification outbox, when receivers are configured.
    pub outbox: Option<Outbox>,
    /// Whether the anomaly detector scores series on ingest.
    pub detect_enabled: bool,
    /// Whether alert rules are evaluated.
    pub alerting_enabled: bool,
    /// The rule engine, when alerting is on.
    pub alerting: Option<crate::alert::Shared>,
    /// Each remote-write endpoint's counts.
    pub remote_write: Vec<Arc<crate::remote_write::Stats>>,
}

/// One per-target outbox metric: name, help, which count.
type PerTarget = (
    &'static str,
    &'static str,
    fn(&crate::notify::TargetStats) -> u64,
);

struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let labels: vitals_common::model::Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let _ = writeln!(
            self.0,
            "{} {}",
            vitals_common::model::series_text(name, &labels),
            vitals_common::model::format_value(value)
        );
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The rule engine's health: rules (failing ones apart), open alerts by
/// phase, evaluations, their duration and recording failures.
fn alerting(t: &mut Text, shared: &crate::alert::Shared) {
    let (rules, failing, pending, firing, health) = {
        let g = match shared.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let e = &g.engine;
        let count = |phase| e.open.values().filter(|a| a.phase == phase).count();
        (
            e.rules.len(),
            e.errors.len(),
            count(crate::alert::engine::Phase::Pending),
            count(crate::alert::engine::Phase::Firing),
            g.health.clone(),
        )
    };
    t.family(
        "vitals_collector_rules",
        "gauge",
        "Enabled alert rules, by whether their last evaluation failed (the log says why).",
    );
    t.sample(
        "vitals_collector_rules",
        &[("state", "ok")],
        rules.saturating_sub(failing) as f64,
    );
    t.sample(
        "vitals_collector_rules",
        &[("state", "failing")],
        failing as f64,
    );
    t.family("vitals_collector_alerts", "gauge", "Open alerts by state.");
    t.sample(
        "vitals_collector_alerts",
        &[("state", "pending")],
        pending as f64,
    );
    t.sample(
        "vitals_collector_alerts",
        &[("state", "firing")],
        firing as f64,
    );
    t.one(
        "vitals_collector_rule_evaluations_total",
        "counter",
        "Evaluations of the whole rule set.",
        health.evaluations as f64,
    );
    t.one(
        "vitals_collector_rule_evaluation_duration_seconds",
        "gauge",
        "How long the last evaluation of the rule set took.",
        health.last_duration.as_secs_f64(),
    );
    t.one(
        "vitals_collector_rule_evaluation_timestamp_seconds",
        "gauge",
        "When the rule set was last evaluated (0: not yet).",
        health.last_ms as f64 / 1000.0,
    );
    t.one(
        "vitals_collector_rule_evaluation_record_failures_total",
        "counter",
        "Evaluations whose alert changes could not be written to alerts.db (retried next time).",
        health.record_failures as f64,
    );
}

/// Each remote-write endpoint (label `endpoint`, its name): the queue,
/// what was sent, refused and retried, requests by answer, lag.
fn remote_write(t: &mut Text, all: &[Arc<crate::remote_write::Stats>]) {
    let now = vitals_common::now_ms();
    type Count = fn(&crate::remote_write::Stats) -> f64;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let simple: [(&str, &str, &str, Count); 4] = [
        (
            "vitals_remote_write_samples_pending",
            "gauge",
            "Samples stored and not yet accepted by the receiver: its queue in the WAL (counted before the send_alerts / send_anomaly_scores filters).",
            |s| s.pending.load(Ordering::Relaxed) as f64,
        ),
        (
            "vitals_remote_write_samples_sent_total",
            "counter",
            "Samples the receiver accepted (2xx).",
            |s| s.sent.load(Ordering::Relaxed) as f64,
        ),
        (
            "vitals_remote_write_samples_retried_total",
            "counter",
            "Samples in requests that failed (no answer, 5xx, 429) and were sent again.",
            |s| s.retried.load(Ordering::Relaxed) as f64,
        ),
        (
            "vitals_remote_write_last_success_timestamp_seconds",
            "gauge",
            "When the receiver last accepted a request (0: not since the start).",
            |s| s.last_success_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        ),
    ];
    for (name, kind, help, f) in simple {
        t.family(name, kind, help);
        for s in all {
            t.sample(name, &[("endpoint", &s.name)], f(s));
        }
    }
    let name = "vitals_remote_write_samples_dropped_total";
    t.family(
        name,
        "counter",
        "Samples never delivered: refused for good by the receiver (4xx), or in a corrupt WAL row.",
    );
    for s in all {
        t.sample(
            name,
            &[("endpoint", &s.name), ("reason", "refused")],
            get(&s.refused),
        );
        t.sample(
            name,
            &[("endpoint", &s.name), ("reason", "corrupt")],
            get(&s.corrupt),
        );
    }
    let name = "vitals_remote_write_lag_seconds";
    t.family(
        name,
        "gauge",
        "Age of the oldest stored batch not yet delivered (0: nothing waits).",
    );
    for s in all {
        t.sample(name, &[("endpoint", &s.name)], s.lag_seconds(now));
    }
    let name = "vitals_remote_write_requests_total";
    t.family(
        name,
        "counter",
        "Requests sent, by the receiver's HTTP status (\"error\": no answer: connect, TLS, timeout).",
    );
    for s in all {
        let m = match s.requests.lock() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        };
        for (code, n) in m {
            t.sample(name, &[("endpoint", &s.name), ("code", &code)], n as f64);
        }
    }
}

/// The text exposition (format 0.0.4). Blocking: reads SQLite (outbox) and
/// file sizes, so call it off the async threads.
pub fn render(src: &Sources) -> String {
    let c = &src.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut t = Text(String::new());
    t.family(
        "vitals_collector_build_info",
        "gauge",
        "Always 1; the collector's version as a label.",
    );
    t.sample(
        "vitals_collector_build_info",
        &[("version", vitals_common::VERSION)],
        1.0,
    );
    t.one(
        "vitals_collector_ingest_batches_received_total",
        "counter",
        "Batches read from agent streams.",
        get(&c.batches_received),
    );
    t.one(
        "vitals_collector_ingest_samples_received_total",
        "counter",
        "Samples in the batches read from agent streams.",
        get(&c.samples_received),
    );
    t.one(
        "vitals_collector_ingest_batches_rejected_total",
        "counter",
        "Batches refused whole (invalid, another node's series, out of sequence).",
        get(&c.batches_rejected),
    );
    t.one(
        "vitals_collector_ingest_streams_rejected_total",
        "counter",
        "Ingest streams refused for their certificate (none usable, or not an agent one).",
        get(&c.streams_rejected),
    );
    t.one(
        "vitals_collector_push_samples_total",
        "counter",
        "Samples stored through the Push RPC (model servers, jobs).",
        get(&c.pushed_samples),
    );
    t.one(
        "vitals_collector_push_requests_rejected_total",
        "counter",
        "Push requests refused whole (a bad sample, a wrong certificate).",
        get(&c.push_rejected),
    );
    t.one(
        "vitals_collector_ingest_samples_out_of_order_total",
        "counter",
        "Samples dropped for not being newer than the newest stored sample of their series.",
        src.store.out_of_order_total() as f64,
    );
    t.one(
        "vitals_collector_agents_connected",
        "gauge",
        "Nodes with an ingest stream open now.",
        src.connected.count() as f64,
    );
    t.one(
        "vitals_collector_store_series",
        "gauge",
        "Series the store knows.",
        src.store.series_count() as f64,
    );
    t.one(
        "vitals_collector_store_disk_bytes",
        "gauge",
        "Bytes of the database file and its SQLite WAL.",
        src.store.disk_bytes() as f64,
    );
    t.one(
        "vitals_collector_detect_enabled",
        "gauge",
        "1 if the anomaly detector scores series on ingest.",
        f64::from(u8::from(src.detect_enabled)),
    );
    let d = src.store.detect_stats();
    t.one(
        "vitals_collector_detect_scored_samples_total",
        "counter",
        "Samples the anomaly detector scored.",
        get(&d.scored),
    );
    t.one(
        "vitals_collector_detect_alarms_total",
        "counter",
        "Scores at or above the alarm threshold.",
        get(&d.alarms),
    );
    t.one(
        "vitals_collector_detect_series",
        "gauge",
        "Series with a detector now.",
        get(&d.series),
    );
    t.one(
        "vitals_collector_alerting_enabled",
        "gauge",
        "1 if alert rules are evaluated.",
        f64::from(u8::from(src.alerting_enabled)),
    );
    if let Some(shared) = src.alerting.as_ref().filter(|_| src.alerting_enabled) {
        alerting(&mut t, shared);
    }
    t.one(
        "vitals_collector_http_requests_total",
        "counter",
        "HTTP API requests answered.",
        get(&c.http_requests),
    );
    t.one(
        "vitals_collector_http_request_errors_total",
        "counter",
        "HTTP API requests answered with an error status.",
        get(&c.http_errors),
    );
    if !src.remote_write.is_empty() {
        remote_write(&mut t, &src.remote_write);
    }
    if let Some(outbox) = &src.outbox {
        match (outbox.open_rows(), outbox.stats()) {
            (Ok(open), Ok(stats)) => {
                t.one(
                    "vitals_collector_outbox_open",
                    "gauge",
                    "Notifications in the outbox not yet final for every target.",
                    open as f64,
                );
                let per_target: [PerTarget; 5] = [
                    (
                        "vitals_collector_notifications_delivered_total",
                        "Notifications a receiver accepted.",
                        |s| s.delivered,
                    ),
                    (
                        "vitals_collector_notification_attempts_failed_total",
                        "Delivery attempts that failed and are retried.",
                        |s| s.failed_attempts,
                    ),
                    (
                        "vitals_collector_notifications_dropped_total",
                        "Notifications a receiver refused for good (4xx).",
                        |s| s.dropped,
                    ),
                    (
                        "vitals_collector_notifications_expired_total",
                        "Notifications given up after max_age.",
                        |s| s.expired,
                    ),
                    (
                        "vitals_collector_notifications_pending",
                        "Notifications waiting for a target now.",
                        |s| s.pending,
                    ),
                ];
                for (name, help, f) in per_target {
                    let kind = if name.ends_with("_total") {
                        "counter"
                    } else {
                        "gauge"
                    };
                    t.family(name, kind, help);
                    for s in &stats {
                        t.sample(
                            name,
                            &[("receiver", &s.receiver), ("target", &s.target)],
                            f(s) as f64,
                        );
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot read the outbox for /metrics");
            }
        }
    }
    t.0
}
