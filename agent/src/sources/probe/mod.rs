//! Probes of inference endpoints: latency, status codes, failures by step,
//! answer size, and the correctness of answers to golden inputs.
//!
//! `[[sources.probe.endpoints]]` lists them. Each endpoint has a task on
//! the source's own thread (a single-threaded tokio runtime, started on
//! the first cycle and stopped when the source is dropped), which every
//! `interval` sends one round: each golden input once, or, without golden
//! inputs, `concurrency` copies of the configured request, at most
//! `concurrency` at a time, each on a new connection under `timeout`.
//! Results pile up per endpoint until the next cycle takes them, so the
//! tick never waits for a probe.
//!
//! Samples, labelled `endpoint` (the configured name) plus the endpoint's
//! `labels` (`model`, `deployment`, ...): `vitals_probe_requests_total`,
//! `vitals_probe_responses_total{code}`, `vitals_probe_errors_total{kind}`
//! (kind: status (a non-2xx answer), dns, connect, tls, timeout, protocol,
//! too_large, secret), and over the requests finished since the last
//! cycle `vitals_probe_latency_seconds{quantile="0.5"|"0.9"|"0.99"}` (a
//! timed-out request counts as taking the timeout), `vitals_probe_error_ratio`,
//! `vitals_probe_response_bytes` (the last answer), `vitals_probe_success`
//! (the last round: every request answered 2xx), and with golden inputs
//! `vitals_probe_correct_ratio` and `vitals_probe_golden_correct{input}`
//! (the input's last verdict). The SLOs configured for the endpoint are
//! series too (`vitals_probe_slo_latency_seconds`,
//! `vitals_probe_slo_error_ratio`, `vitals_probe_slo_correct_ratio`), so
//! the built-in rules compare each endpoint with its own; and
//! `vitals_probe_info{endpoint, url, method} 1` (the URL without its query).
//!
//! Events: `probe_wrong_answer` for every wrong answer to a golden input
//! (labels `input`, `expected`, `got`; at most `max_events` per endpoint
//! per cycle, the rest counted in the correctness series).
//!
//! Secrets (`secret_file`, `secret_env`) are read for each round, so a
//! rotated key is used at once; they are sent as one header, marked
//! sensitive, and never logged or put in a sample, event or error.

pub mod client;
pub mod golden;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use vitals_common::config;
use vitals_common::model::{LabelSet, Labels, Sample};
use vitals_proto::v1::Severity;

use self::client::{Failure, Outcome, Target};
use super::background::{Background, every};
use super::{Source, SourceError, SourceEvent};
use crate::config::RawConfig;

/// `[sources.probe]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Whether the source runs (default: yes; it does nothing without
    /// endpoints).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Most `probe_wrong_answer` events per endpoint per cycle.
    #[serde(default = "default_max_events")]
    pub max_events: usize,
    /// `[[sources.probe.endpoints]]`.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: None,
            max_events: default_max_events(),
            endpoints: Vec::new(),
        }
    }
}

fn default_max_events() -> usize {
    20
}

/// One endpoint to probe.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// The `endpoint` label; unique.
    pub name: String,
    /// `http://` or `https://`.
    pub url: String,
    /// Default: POST with a body (or golden inputs), else GET.
    #[serde(default)]
    pub method: Option<String>,
    /// Headers sent with every request (not secrets: those go in
    /// `secret_file` or `secret_env`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The request body (without golden inputs).
    #[serde(default)]
    pub body: Option<String>,
    /// The header that carries the secret (default `Authorization`).
    #[serde(default)]
    pub secret_header: Option<String>,
    /// A file holding the secret (an API key or bearer token), read for
    /// each round; surrounding whitespace is dropped.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Put before the secret in its header, e.g. `"Bearer "`.
    #[serde(default)]
    pub secret_prefix: String,
    /// Time between rounds.
    #[serde(default = "default_interval", with = "config::duration")]
    pub interval: Duration,
    /// The most one request may take, connect to last byte.
    #[serde(default = "default_timeout", with = "config::duration")]
    pub timeout: Duration,
    /// Requests in flight at once (and, without golden inputs, per round).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// PEM file of CA certificates for https; default the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Answers larger than this are failures (`too_large`).
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// p99 latency objective (`vitals_probe_slo_latency_seconds`).
    #[serde(default, with = "config::opt_duration")]
    pub slo_latency: Option<Duration>,
    /// Highest acceptable share of failed requests, 0–1.
    #[serde(default)]
    pub slo_error_ratio: Option<f64>,
    /// Lowest acceptable share of right answers to golden inputs, 0–1.
    #[serde(default)]
    pub slo_correct_ratio: Option<f64>,
    /// Labels on every series of this endpoint: `model`, `deployment`, ...
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `[[sources.probe.endpoints.golden]]`: inputs with known answers.
    #[serde(default)]
    pub golden: Vec<GoldenConfig>,
}

fn default_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_concurrency() -> usize {
    1
}
fn default_max_response() -> usize {
    1 << 20
}

/// One golden input.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenConfig {
    /// The `input` label and the name in events.
    pub id: String,
    /// The request body.
    pub body: String,
    /// Where the answer is: `predictions[0].label`; empty: the whole answer.
    #[serde(default)]
    pub path: String,
    /// The right answer: a string, number or boolean (or any JSON value).
    pub expect: serde_json::Value,
    /// For numbers: how far off is still right (absolute).
    #[serde(default)]
    pub tolerance: Option<f64>,
}

/// Labels the source sets itself; an endpoint's `labels` may not use them.
const RESERVED: &[&str] = &[
    "node", "endpoint", "code", "kind", "quantile", "input", "url", "method",
];

/// Checks `[sources.probe]`: (key, message) of the first problem.
pub fn check(cfg: &ProbeConfig) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, e) in cfg.endpoints.iter().enumerate() {
        let key = |k: &str| format!("sources.probe.endpoints[{i}].{k}");
        let bad = |k: &str, m: String| Err((key(k), m));
        if e.name.trim().is_empty() {
            return bad("name", "must not be empty".into());
        }
        if !names.insert(e.name.as_str()) {
            return bad("name", format!("{:?} is used twice", e.name));
        }
        if let Err(m) = Target::parse(&e.url, e.ca_file.as_deref()) {
            return bad(if m.contains("CA") { "ca_file" } else { "url" }, m);
        }
        if let Some(m) = &e.method
            && hyper::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err()
        {
            return bad("method", format!("{m:?} is not an HTTP method"));
        }
        for (k, v) in &e.headers {
            if HeaderName::from_bytes(k.as_bytes()).is_err() || HeaderValue::from_str(v).is_err() {
                return bad("headers", format!("{k:?} is not a valid header"));
            }
        }
        if let Some(h) = &e.secret_header
            && HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return bad("secret_header", format!("{h:?} is not a header name"));
        }
        if e.secret_file.is_some() && e.secret_env.is_some() {
            return bad(
                "secret_env",
                "set secret_file or secret_env, not both".into(),
            );
        }
        if let Some(p) = &e.secret_file
            && let Err(m) = read_secret_file(p)
        {
            return bad("secret_file", m);
        }
        if e.interval < Duration::from_millis(100) {
            return bad("interval", "must be at least 100ms".into());
        }
        if e.timeout < Duration::from_millis(10) {
            return bad("timeout", "must be at least 10ms".into());
        }
        if e.concurrency == 0 || e.concurrency > 1000 {
            return bad("concurrency", "must be between 1 and 1000".into());
        }
        if e.max_response_bytes == 0 {
            return bad("max_response_bytes", "must be above 0".into());
        }
        for (k, v) in [
            ("slo_error_ratio", e.slo_error_ratio),
            ("slo_correct_ratio", e.slo_correct_ratio),
        ] {
            if let Some(v) = v
                && !(0.0..=1.0).contains(&v)
            {
                return bad(k, format!("{v} is not between 0 and 1"));
            }
        }
        for k in e.labels.keys() {
            if !vitals_common::model::valid_label_name(k) || RESERVED.contains(&k.as_str()) {
                return bad(
                    "labels",
                    format!(
                        "{k:?} cannot be a label here (reserved: {})",
                        RESERVED.join(", ")
                    ),
                );
            }
        }
        let mut ids = std::collections::HashSet::new();
        for (j, g) in e.golden.iter().enumerate() {
            let gkey = |k: &str| format!("sources.probe.endpoints[{i}].golden[{j}].{k}");
            if g.id.trim().is_empty() || !ids.insert(g.id.as_str()) {
                return Err((gkey("id"), format!("{:?}: empty or used twice", g.id)));
            }
            if let Err(m) = golden::parse_path(&g.path) {
                return Err((gkey("path"), m));
            }
            if let Some(t) = g.tolerance
                && !(t >= 0.0 && t.is_finite())
            {
                return Err((gkey("tolerance"), format!("{t} must be 0 or more")));
            }
        }
    }
    Ok(())
}

fn read_secret_file(p: &std::path::Path) -> Result<String, String> {
    let s = std::fs::read_to_string(p)
        .map_err(|e| format!("cannot read the secret file {}: {e}", p.display()))?;
    let s = s.trim();
    if s.is_empty() {
        return Err(format!("the secret file {} is empty", p.display()));
    }
    Ok(s.to_string())
}

/// What one endpoint's task has seen since the last cycle (and counters
/// since the start).
#[derive(Default)]
struct Acc {
    requests: u64,
    responses: BTreeMap<u16, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// Since the last cycle.
    latencies: Vec<f64>,
    window_requests: u64,
    window_errors: u64,
    golden_answered: u64,
    golden_correct: u64,
    /// Last verdict per golden input.
    golden_last: BTreeMap<String, bool>,
    wrong: Vec<SourceEvent>,
    last_bytes: Option<u64>,
    last_round_ok: Option<bool>,
}

/// An endpoint ready to probe.
struct Endpoint {
    cfg: EndpointConfig,
    target: Target,
    method: hyper::Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    golden: Vec<(GoldenConfig, Vec<golden::Step>)>,
    labels: LabelSet,
    acc: Mutex<Acc>,
}

impl Endpoint {
    fn new(cfg: &EndpointConfig) -> Result<Endpoint, String> {
        let target = Target::parse(&cfg.url, cfg.ca_file.as_deref())
            .map_err(|m| format!("endpoint {:?}: {m}", cfg.name))?;
        let has_body = cfg.body.is_some() || !cfg.golden.is_empty();
        let method = match &cfg.method {
            Some(m) => hyper::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("endpoint {:?}: bad method {m:?}", cfg.name))?,
            None if has_body => hyper::Method::POST,
            None => hyper::Method::GET,
        };
        let mut headers = Vec::new();
        let mut typed = false;
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("endpoint {:?}: bad header {k:?}", cfg.name))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("endpoint {:?}: bad header {k:?}", cfg.name))?;
            typed |= name == hyper::header::CONTENT_TYPE;
            headers.push((name, value));
        }
        if has_body && !typed {
            headers.push((
                hyper::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ));
        }
        let mut gold = Vec::new();
        for g in &cfg.golden {
            let steps = golden::parse_path(&g.path)
                .map_err(|m| format!("endpoint {:?}: golden {:?}: {m}", cfg.name, g.id))?;
            gold.push((g.clone(), steps));
        }
        let mut labels: Labels = cfg.labels.clone().into_iter().collect();
        labels.insert("endpoint".into(), cfg.name.clone());
        Ok(Endpoint {
            cfg: cfg.clone(),
            target,
            method,
            headers,
            golden: gold,
            labels: LabelSet::new(labels),
            acc: Mutex::new(Acc::default()),
        })
    }

    /// The secret header for this round, if one is configured.
    fn secret(&self) -> Result<Option<(HeaderName, HeaderValue)>, String> {
        let secret = match (&self.cfg.secret_file, &self.cfg.secret_env) {
            (Some(p), _) => read_secret_file(p)?,
            (None, Some(var)) => std::env::var(var)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("the environment variable {var} is not set"))?,
            (None, None) => return Ok(None),
        };
        let name = match &self.cfg.secret_header {
            Some(h) => HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("bad secret_header {h:?}"))?,
            None => hyper::header::AUTHORIZATION,
        };
        let mut value = HeaderValue::from_str(&format!("{}{secret}", self.cfg.secret_prefix))
            .map_err(|_| "the secret has characters a header cannot carry".to_string())?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Acc> {
        match self.acc.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// One round: every golden input, or `concurrency` plain requests.
    async fn round(self: &Arc<Self>, max_events: usize) {
        let secret = self.secret();
        let mut headers = self.headers.clone();
        match secret {
            Ok(Some(h)) => headers.push(h),
            Ok(None) => {}
            Err(m) => {
                let mut acc = self.lock();
                acc.requests += 1;
                acc.window_requests += 1;
                acc.window_errors += 1;
                *acc.errors.entry(Failure::Secret.as_str()).or_default() += 1;
                acc.last_round_ok = Some(false);
                drop(acc);
                tracing::warn!(endpoint = %self.cfg.name, "probe not sent: {m}");
                return;
            }
        }
        let headers = Arc::new(headers);
        let jobs: Vec<Option<usize>> = if self.golden.is_empty() {
            vec![None; self.cfg.concurrency]
        } else {
            (0..self.golden.len()).map(Some).collect()
        };
        let limit = Arc::new(tokio::sync::Semaphore::new(self.cfg.concurrency));
        let mut set = tokio::task::JoinSet::new();
        for job in jobs {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let (ep, headers) = (self.clone(), headers.clone());
            set.spawn(async move {
                let body = match job {
                    Some(i) => Bytes::from(ep.golden[i].0.body.clone()),
                    None => Bytes::from(ep.cfg.body.clone().unwrap_or_default()),
                };
                let out = client::send(
                    &ep.target,
                    client::Request {
                        method: &ep.method,
                        headers: &headers,
                        body,
                    },
                    ep.cfg.timeout,
                    ep.cfg.max_response_bytes,
                )
                .await;
                drop(permit);
                (job, out)
            });
        }
        let mut all_ok = true;
        while let Some(done) = set.join_next().await {
            let Ok((job, out)) = done else {
                all_ok = false;
                continue;
            };
            all_ok &= self.record(job, out, max_events);
        }
        self.lock().last_round_ok = Some(all_ok);
    }

    /// Adds one request's outcome; true if it was answered 2xx.
    fn record(&self, job: Option<usize>, out: Outcome, max_events: usize) -> bool {
        let mut acc = self.lock();
        acc.requests += 1;
        acc.window_requests += 1;
        match out.result {
            Ok(answer) => {
                acc.latencies.push(out.elapsed.as_secs_f64());
                *acc.responses.entry(answer.status).or_default() += 1;
                acc.last_bytes = Some(answer.body.len() as u64);
                if !(200..300).contains(&answer.status) {
                    acc.window_errors += 1;
                    *acc.errors.entry("status").or_default() += 1;
                    return false;
                }
                if let Some(i) = job {
                    let (g, steps) = &self.golden[i];
                    let (right, got) = golden::judge(&answer.body, steps, &g.expect, g.tolerance);
                    acc.golden_answered += 1;
                    acc.golden_correct += u64::from(right);
                    acc.golden_last.insert(g.id.clone(), right);
                    if !right && acc.wrong.len() < max_events {
                        let expected = golden::show(Some(&g.expect));
                        let mut labels: Labels = self
                            .labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        labels.insert("input".into(), g.id.clone());
                        labels.insert("expected".into(), expected.clone());
                        labels.insert("got".into(), got.clone());
                        acc.wrong.push(SourceEvent {
                            kind: "probe_wrong_answer".into(),
                            severity: Severity::Warning,
                            message: format!(
                                "{}: golden input {}: expected {expected}, got {got}",
                                self.cfg.name, g.id
                            ),
                            labels,
                        });
                    }
                }
                true
            }
            Err((failure, message)) => {
                if failure == Failure::Timeout {
                    acc.latencies.push(out.elapsed.as_secs_f64());
                }
                acc.window_errors += 1;
                *acc.errors.entry(failure.as_str()).or_default() += 1;
                tracing::debug!(endpoint = %self.cfg.name, kind = failure.as_str(), "probe failed: {message}");
                false
            }
        }
    }

    /// This cycle's samples; resets the per-cycle part.
    fn take(&self, out: &mut Vec<Sample>, events: &mut Vec<SourceEvent>) {
        let l = &self.labels;
        let s = |name: &'static str, v: f64| Sample::with_labels(name, l, v);
        let mut acc = self.lock();
        out.push(s("vitals_probe_requests_total", acc.requests as f64));
        for (code, n) in &acc.responses {
            out.push(s("vitals_probe_responses_total", *n as f64).label("code", code.to_string()));
        }
        for kind in std::iter::once("status").chain(Failure::ALL.iter().map(|f| f.as_str())) {
            let n = acc.errors.get(kind).copied().unwrap_or(0);
            out.push(s("vitals_probe_errors_total", n as f64).label("kind", kind));
        }
        let mut lat = std::mem::take(&mut acc.latencies);
        if !lat.is_empty() {
            lat.sort_by(f64::total_cmp);
            for (q, name) in [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99")] {
                out.push(
                    s("vitals_probe_latency_seconds", quantile(&lat, q)).label("quantile", name),
                );
            }
        }
        if acc.window_requests > 0 {
            out.push(s(
                "vitals_probe_error_ratio",
                acc.window_errors as f64 / acc.window_requests as f64,
            ));
        }
        if acc.golden_answered > 0 {
            out.push(s(
                "vitals_probe_correct_ratio",
                acc.golden_correct as f64 / acc.golden_answered as f64,
            ));
        }
        for (id, right) in &acc.golden_last {
            out.push(
                s("vitals_probe_golden_correct", f64::from(u8::from(*right)))
                    .label("input", id.as_str()),
            );
        }
        if let Some(b) = acc.last_bytes {
            out.push(s("vitals_probe_response_bytes", b as f64));
        }
        if let Some(ok) = acc.last_round_ok {
            out.push(s("vitals_probe_success", f64::from(u8::from(ok))));
        }
        acc.window_requests = 0;
        acc.window_errors = 0;
        acc.golden_answered = 0;
        acc.golden_correct = 0;
        events.append(&mut acc.wrong);
        drop(acc);
        if let Some(d) = self.cfg.slo_latency {
            out.push(s("vitals_probe_slo_latency_seconds", d.as_secs_f64()));
        }
        if let Some(r) = self.cfg.slo_error_ratio {
            out.push(s("vitals_probe_slo_error_ratio", r));
        }
        if let Some(r) = self.cfg.slo_correct_ratio {
            out.push(s("vitals_probe_slo_correct_ratio", r));
        }
        out.push(
            s("vitals_probe_info", 1.0)
                .label("url", client::redact(&self.cfg.url))
                .label("method", self.method.as_str()),
        );
        out.push(s(
            "vitals_probe_interval_seconds",
            self.cfg.interval.as_secs_f64(),
        ));
    }
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub struct Probe {
    endpoints: Vec<Arc<Endpoint>>,
    max_events: usize,
    /// Why the endpoints could not be set up (checked at load, so only a
    /// CA file that vanished since).
    broken: Option<String>,
    /// The probing thread, once started.
    background: Option<Background>,
    events: Vec<SourceEvent>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let c = &cfg.sources.probe;
    let mut endpoints = Vec::new();
    let mut broken = None;
    for e in &c.endpoints {
        match Endpoint::new(e) {
            Ok(ep) => endpoints.push(Arc::new(ep)),
            Err(m) => broken = Some(m),
        }
    }
    Box::new(Probe {
        endpoints,
        max_events: c.max_events,
        broken,
        background: None,
        events: Vec::new(),
    })
}

impl Probe {
    /// Starts the probing thread and its runtime: one task per endpoint.
    fn start(&mut self) -> Result<(), SourceError> {
        let max_events = self.max_events;
        let tasks = self.endpoints.iter().map(|ep| {
            let ep = ep.clone();
            async move {
                every(ep.cfg.interval, || ep.round(max_events)).await;
            }
        });
        let rt = Background::runtime("probe")?;
        self.background = Some(Background::start("probe", "vitals-probes", rt, tasks)?);
        Ok(())
    }
}

impl Source for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        if let Some(m) = &self.broken {
            return Err(SourceError::Failed(m.clone()));
        }
        if self.endpoints.is_empty() {
            return Err(SourceError::Unavailable(
                "no [[sources.probe.endpoints]] configured".into(),
            ));
        }
        if self.background.is_none() {
            self.start()?;
        }
        for ep in &self.endpoints {
            ep.take(out, &mut self.events);
        }
        Ok(())
    }

    fn events(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.9), 90.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[1.0, 9.0], 0.5), 1.0);
        assert_eq!(quantile(&[1.0, 9.0], 0.99), 9.0);
    }

    fn endpoint(extra: &str) -> Result<(), (String, String)> {
        let text = format!("name = \"m\"\nurl = \"http://127.0.0.1:1/\"\n{extra}");
        let e: EndpointConfig =
            toml::from_str(&text).map_err(|e| ("parse".into(), e.to_string()))?;
        check(&ProbeConfig {
            endpoints: vec![e],
            ..Default::default()
        })
    }

    #[test]
    fn config_checks_name_the_key() {
        assert!(endpoint("").is_ok());
        let key = |extra: &str| endpoint(extra).unwrap_err().0;
        assert_eq!(
            key("labels = { endpoint = \"x\" }"),
            "sources.probe.endpoints[0].labels"
        );
        assert_eq!(
            key("concurrency = 0"),
            "sources.probe.endpoints[0].concurrency"
        );
        assert_eq!(
            key("slo_error_ratio = 2.0"),
            "sources.probe.endpoints[0].slo_error_ratio"
        );
        assert_eq!(
            key("secret_file = \"/nonexistent/key\""),
            "sources.probe.endpoints[0].secret_file"
        );
        assert_eq!(
            key("method = \"NOT A METHOD\""),
            "sources.probe.endpoints[0].method"
        );
        assert_eq!(
            key("[[golden]]\nid = \"a\"\nbody = \"{}\"\npath = \"a[\"\nexpect = 1"),
            "sources.probe.endpoints[0].golden[0].path"
        );
        assert_eq!(
            key(
                "[[golden]]\nid = \"a\"\nbody = \"{}\"\nexpect = 1\n[[golden]]\nid = \"a\"\nbody = \"{}\"\nexpect = 2"
            ),
            "sources.probe.endpoints[0].golden[1].id"
        );
        let dup = check(&ProbeConfig {
            endpoints: vec![
                toml::from_str("name = \"m\"\nurl = \"http://h/\"").unwrap(),
                toml::from_str("name = \"m\"\nurl = \"http://h/\"").unwrap(),
            ],
            ..Default::default()
        });
        assert_eq!(dup.unwrap_err().0, "sources.probe.endpoints[1].name");
    }
}
