//! The Prometheus-compatible HTTP listener (`[http]` in collector.toml):
//! `/metrics` (the collector's own metrics) and a subset of Prometheus'
//! HTTP API over the same engine as the gRPC `Query` service (`promql`):
//! `/api/v1/query`, `/api/v1/query_range`, `/api/v1/series`,
//! `/api/v1/labels`, `/api/v1/label/<name>/values`, GET or POST
//! (form-encoded, as Grafana sends), answered in Prometheus' JSON envelope.
//!
//! TLS by default: the collector's `[tls]` files, client certificates
//! required, and every path needs an operator certificate (the rule of the
//! gRPC `Query` service). Each handshake takes the TLS config current at
//! that moment (`listen::TlsConfig`), so a SIGHUP's new certificates apply
//! here too. Plaintext (`tls = false`) is allowed on loopback only (the
//! config check refuses anything else) and checks no identity.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use vitals_common::identity::{self, Role};
use vitals_common::model::Labels;
use vitals_common::selector::Selector;

use crate::listen::TlsConfig;
use crate::metrics::{self, Counters};
use crate::promql::{self, EvalError, Limits, Steps};
use crate::store::{SeriesPoints, Store};

/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest form body read (a long query with many `match[]`s fits).
const MAX_BODY: usize = 4 << 20;
/// Prometheus refuses range queries with more points per series than this;
/// so does this API, with Prometheus' message (Grafana picks its step
/// below it).
const MAX_RESOLUTION: usize = 11_000;

/// What the handlers read.
pub struct State {
    pub store: Store,
    /// Current limits; a reload (SIGHUP) may change them.
    pub limits: watch::Receiver<Limits>,
    pub metrics: metrics::Sources,
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
enum Peer {
    /// Plaintext on loopback: no identity to check.
    Plain,
    /// TLS: the certificate's (name, role), or why it is not usable.
    Cert(Result<(String, Role), String>),
}

/// The rustls config for HTTP, derived from the gRPC listener's (same
/// certificates and client verifier; ALPN h2 and http/1.1) and derived
/// again whenever a reload replaced that one.
struct HttpTls {
    shared: TlsConfig,
    derived: Mutex<Option<(Arc<ServerConfig>, Arc<ServerConfig>)>>,
}

impl HttpTls {
    fn current(&self) -> Arc<ServerConfig> {
        let base = self.shared.current();
        let mut cache = match self.derived.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some((b, d)) = cache.as_ref()
            && Arc::ptr_eq(b, &base)
        {
            return d.clone();
        }
        let mut cfg = (*base).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let d = Arc::new(cfg);
        *cache = Some((base, d.clone()));
        d
    }
}

/// Serves `listener` until `stop` turns true. `tls`: None for plaintext.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsConfig>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    let tls = tls.map(|shared| {
        Arc::new(HttpTls {
            shared,
            derived: Mutex::new(None),
        })
    });
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer_addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let state = state.clone();
        let tls = tls.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let conn = async {
                match tls {
                    None => connection(TokioIo::new(tcp), Peer::Plain, state).await,
                    Some(tls) => {
                        let acceptor = TlsAcceptor::from(tls.current());
                        let stream = match tokio::time::timeout(
                            HANDSHAKE_TIMEOUT,
                            acceptor.accept(tcp),
                        )
                        .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(peer = %peer_addr, error = %e, "HTTP TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(peer = %peer_addr, "HTTP TLS handshake timed out");
                                return;
                            }
                        };
                        let who = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .ok_or_else(|| "a client certificate is required".to_string())
                            .and_then(|c| {
                                identity::identity(c.as_ref())
                                    .map_err(|e| format!("client certificate not usable: {e}"))
                            });
                        connection(TokioIo::new(stream), Peer::Cert(who), state).await
                    }
                }
            };
            tokio::select! {
                _ = conn => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn connection<I>(io: I, peer: Peer, state: Arc<State>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handle(&state, &peer, req).await) }
    });
    if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, service)
        .await
    {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

// ------------------------------------------------------------ responses --

/// An error answer in Prometheus' envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

fn bad_data(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "bad_data",
        message: message.into(),
    }
}

fn execution(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        kind: "execution",
        message: message.into(),
    }
}

fn internal(message: impl std::fmt::Display) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        kind: "internal",
        message: message.to_string(),
    }
}

fn eval_error(e: EvalError) -> ApiError {
    match e {
        EvalError::Invalid(m) => bad_data(m),
        EvalError::Limit(m) => execution(m),
        EvalError::Store(e) => internal(e),
        EvalError::Internal(m) => internal(m),
    }
}

/// `body` is JSON text; written by hand around `data` so that `status`
/// comes first, as in Prometheus' answers (serde_json sorts keys).
fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    json_response(
        e.status,
        format!(
            "{{\"status\":\"error\",\"errorType\":{},\"error\":{}}}",
            json!(e.kind),
            json!(e.message)
        ),
    )
}

/// A timestamp as Prometheus writes it: seconds, with the milliseconds as
/// a fraction when there are any.
fn ts_json(ms: i64) -> Value {
    if ms % 1000 == 0 {
        json!(ms / 1000)
    } else {
        json!(ms as f64 / 1000.0)
    }
}

fn point_json(ms: i64, v: f64) -> Value {
    json!([ts_json(ms), vitals_common::model::format_value(v)])
}

fn metric_json(name: &str, labels: &Labels) -> Value {
    let mut m = serde_json::Map::new();
    if !name.is_empty() {
        m.insert("__name__".into(), json!(name));
    }
    for (k, v) in labels {
        m.insert(k.clone(), json!(v));
    }
    Value::Object(m)
}

// ------------------------------------------------------------- requests --

async fn handle(state: &State, peer: &Peer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    Counters::add(&state.metrics.counters.http_requests, 1);
    let r = answer(state, peer, req).await;
    if !r.status().is_success() {
        Counters::add(&state.metrics.counters.http_errors, 1);
    }
    r
}

async fn answer(state: &State, peer: &Peer, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match peer {
        Peer::Plain => {}
        Peer::Cert(Ok((_, Role::Operator))) => {}
        Peer::Cert(Ok((name, role))) => {
            return error_response(&ApiError {
                status: StatusCode::FORBIDDEN,
                kind: "forbidden",
                message: format!(
                    "certificate of {name} has role {role}; the HTTP API needs an operator certificate"
                ),
            });
        }
        Peer::Cert(Err(why)) => {
            return error_response(&ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "unauthorized",
                message: why.clone(),
            });
        }
    }
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if method != Method::GET && method != Method::POST {
        return error_response(&ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "bad_data",
            message: format!("method {method} not allowed; use GET or POST"),
        });
    }
    if path == "/metrics" {
        let src = state.metrics.clone();
        return match tokio::task::spawn_blocking(move || metrics::render(&src)).await {
            Ok(text) => {
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Err(e) => error_response(&internal(e)),
        };
    }
    let params = match params(req).await {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let store = state.store.clone();
    let limits = *state.limits.borrow();
    let now = vitals_common::now_ms();
    let result = tokio::task::spawn_blocking(move || route(&path, &params, &store, limits, now))
        .await
        .unwrap_or_else(|e| Err(internal(e)));
    match result {
        Ok(data) => json_response(
            StatusCode::OK,
            format!("{{\"status\":\"success\",\"data\":{data}}}"),
        ),
        Err(e) => error_response(&e),
    }
}

/// Query string, then (POST, form-encoded) the body, as Go's `r.Form`
/// holds them: body values first.
async fn params(req: Request<Incoming>) -> Result<Params, ApiError> {
    let mut out = Vec::new();
    let query = req.uri().query().map(str::to_string);
    let form = req.method() == Method::POST
        && req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if form {
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| bad_data(format!("cannot read the form body: {e}")))?
            .to_bytes();
        let text =
            std::str::from_utf8(&body).map_err(|_| bad_data("the form body is not UTF-8"))?;
        out.extend(parse_form(text)?);
    }
    if let Some(q) = query {
        out.extend(parse_form(&q)?);
    }
    Ok(Params(out))
}

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `application/x-www-form-urlencoded` (also a URL's query string).
fn parse_form(text: &str) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.push((unescape(k)?, unescape(v)?));
    }
    Ok(out)
}

fn unescape(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| bad_data(format!("invalid URL escape in {s:?}")))?;
                out.push(hex);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad_data(format!("{s:?} is not UTF-8 once unescaped")))
}

fn route(
    path: &str,
    p: &Params,
    store: &Store,
    limits: Limits,
    now: i64,
) -> Result<Value, ApiError> {
    match path {
        "/api/v1/query" => instant(p, store, limits, now),
        "/api/v1/query_range" => range(p, store, limits),
        "/api/v1/series" => series(p, store, limits),
        "/api/v1/labels" => label_names(p, store, limits),
        _ => match path
            .strip_prefix("/api/v1/label/")
            .and_then(|r| r.strip_suffix("/values"))
        {
            Some(name) => label_values(&unescape(name)?, p, store, limits),
            None => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "not_found",
                message: format!(
                    "no such endpoint {path}; this API serves /metrics, /api/v1/query, /api/v1/query_range, /api/v1/series, /api/v1/labels and /api/v1/label/<name>/values"
                ),
            }),
        },
    }
}

// ------------------------------------------------------------ endpoints --

fn query_param(p: &Params) -> Result<&str, ApiError> {
    match p.get("query") {
        Some(q) if !q.trim().is_empty() => Ok(q),
        _ => Err(bad_data("invalid parameter \"query\": no expression given")),
    }
}

fn parse_query(text: &str) -> Result<promql::Query, ApiError> {
    promql::parse(text).map_err(|e| bad_data(format!("invalid parameter \"query\": {e}")))
}

fn instant(p: &Params, store: &Store, limits: Limits, now: i64) -> Result<Value, ApiError> {
    let text = query_param(p)?;
    let t = match p.get("time") {
        Some(s) if !s.is_empty() => parse_time("time", s)?,
        _ => now,
    };
    // A number alone is a scalar (Grafana's data source test sends one).
    if let Some(v) = scalar(text) {
        return Ok(json!({"resultType": "scalar", "result": point_json(t, v)}));
    }
    let query = parse_query(text)?;
    let steps = Steps::new(t, t, 1).map_err(eval_error)?;
    let found = promql::eval_range(store, &query, steps, limits).map_err(eval_error)?;
    let result: Vec<Value> = found
        .into_iter()
        .filter_map(|s| {
            let (ts, v) = *s.points.last()?;
            Some(json!({"metric": metric_json(&s.name, &s.labels), "value": point_json(ts, v)}))
        })
        .collect();
    Ok(json!({"resultType": "vector", "result": result}))
}

/// A query that is one number literal (`1`, `-2.5`, `1e3`, `Inf`, `NaN`).
fn scalar(text: &str) -> Option<f64> {
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let named = matches!(
        lower.trim_start_matches(['+', '-']),
        "inf" | "nan" | "infinity"
    );
    let numeric = t
        .trim_start_matches(['+', '-'])
        .starts_with(|c: char| c.is_ascii_digit() || c == '.');
    if !(named || numeric) {
        return None;
    }
    t.parse::<f64>().ok()
}

fn range(p: &Params, store: &Store, limits: Limits) -> Result<Value, ApiError> {
    let text = query_param(p)?;
    let start = parse_time("start", p.get("start").unwrap_or(""))?;
    let end = parse_time("end", p.get("end").unwrap_or(""))?;
    if end < start {
        return Err(bad_data("end timestamp must not be before start time"));
    }
    let step = parse_duration("step", p.get("step").unwrap_or(""))?;
    if step <= 0 {
        return Err(bad_data(
            "zero or negative query resolution step widths are not accepted. Try a positive integer",
        ));
    }
    let steps = Steps::new(start, end, step).map_err(eval_error)?;
    if steps.count() > MAX_RESOLUTION {
        return Err(bad_data(
            "exceeded maximum resolution of 11,000 points per timeseries. Try decreasing the query resolution (?step=XX)",
        ));
    }
    let result: Vec<Value> = match scalar(text) {
        // A scalar over a range is a matrix of one series without labels.
        Some(v) => vec![json!({
            "metric": {},
            "values": (0..steps.count())
                .map(|i| point_json(start + i as i64 * step, v))
                .collect::<Vec<_>>(),
        })],
        None => {
            let query = parse_query(text)?;
            promql::eval_range(store, &query, steps, limits)
                .map_err(eval_error)?
                .into_iter()
                .map(|s: SeriesPoints| {
                    json!({
                        "metric": metric_json(&s.name, &s.labels),
                        "values": s.points.iter().map(|&(t, v)| point_json(t, v)).collect::<Vec<_>>(),
                    })
                })
                .collect()
        }
    };
    Ok(json!({"resultType": "matrix", "result": result}))
}

/// `match[]` selectors (a plain selector each, as Prometheus requires).
fn matchers(p: &Params) -> Result<Vec<Selector>, ApiError> {
    p.all("match[]")
        .into_iter()
        .map(|m| {
            let q = promql::parse(m)
                .map_err(|e| bad_data(format!("invalid parameter \"match[]\": {e}")))?;
            match (q.agg, q.inner) {
                (None, promql::Inner::Selector(sel)) => Ok(sel),
                _ => Err(bad_data(format!(
                    "invalid parameter \"match[]\": {m:?} is not a series selector"
                ))),
            }
        })
        .collect()
}

/// `start` and `end` (either may be left out): only series with a sample
/// in that range are answered, as Prometheus does. Neither: every series
/// the store knows.
fn time_range(p: &Params) -> Result<Option<(i64, i64)>, ApiError> {
    let get = |name: &str| -> Result<Option<i64>, ApiError> {
        match p.get(name).filter(|s| !s.is_empty()) {
            Some(s) => parse_time(name, s).map(Some),
            None => Ok(None),
        }
    };
    let (start, end) = (get("start")?, get("end")?);
    if start.is_none() && end.is_none() {
        return Ok(None);
    }
    let (start, end) = (start.unwrap_or(i64::MIN), end.unwrap_or(i64::MAX));
    if end < start {
        return Err(bad_data("end timestamp must not be before start time"));
    }
    Ok(Some((start, end)))
}

/// Series (name, labels) matching `sel` (in `range`), at most `limit`; the
/// flag says whether more matched.
fn select(
    sel: &Selector,
    range: Option<(i64, i64)>,
    store: &Store,
    limit: usize,
) -> Result<(Vec<(String, Labels)>, bool), ApiError> {
    match range {
        None => Ok(store.list_series(sel, limit)),
        Some((start, end)) => store
            .list_series_in(sel, start, end, limit)
            .map_err(internal),
    }
}

/// Series (name, labels) matching any of `sels`, each once, sorted.
fn matching(
    sels: &[Selector],
    range: Option<(i64, i64)>,
    store: &Store,
    limits: Limits,
) -> Result<BTreeSet<(String, Labels)>, ApiError> {
    let mut out = BTreeSet::new();
    for sel in sels {
        let (found, more) = select(sel, range, store, limits.max_series)?;
        if more {
            return Err(execution(format!(
                "the selector matches more than max_series = {} series (collector.toml [query]); narrow it with label matchers",
                limits.max_series
            )));
        }
        out.extend(found);
        if out.len() > limits.max_series {
            return Err(execution(format!(
                "the selectors match more than max_series = {} series (collector.toml [query]); narrow them with label matchers",
                limits.max_series
            )));
        }
    }
    Ok(out)
}

fn series(p: &Params, store: &Store, limits: Limits) -> Result<Value, ApiError> {
    let range = time_range(p)?;
    let sels = matchers(p)?;
    if sels.is_empty() {
        return Err(bad_data("no match[] parameter provided"));
    }
    let found = matching(&sels, range, store, limits)?;
    Ok(Value::Array(
        found
            .iter()
            .map(|(name, labels)| metric_json(name, labels))
            .collect(),
    ))
}

/// Calls `f(name, labels)` for every series matching `match[]`, or for
/// every series without it.
fn each_series(
    p: &Params,
    store: &Store,
    limits: Limits,
    mut f: impl FnMut(&str, &Labels),
) -> Result<(), ApiError> {
    let range = time_range(p)?;
    let sels = matchers(p)?;
    match (sels.is_empty(), range) {
        (true, None) => store.for_each_series(f),
        // Names and values of every series: no max_series here (they
        // come from the index; Grafana asks for them on every editor).
        (true, Some(_)) => {
            let (all, _) = select(&Selector::default(), range, store, usize::MAX)?;
            for (name, labels) in all {
                f(&name, &labels);
            }
        }
        (false, _) => {
            for (name, labels) in matching(&sels, range, store, limits)? {
                f(&name, &labels);
            }
        }
    }
    Ok(())
}

fn label_names(p: &Params, store: &Store, limits: Limits) -> Result<Value, ApiError> {
    let mut names = BTreeSet::new();
    each_series(p, store, limits, |_, labels| {
        names.insert("__name__".to_string());
        for (k, v) in labels {
            if !v.is_empty() && !names.contains(k) {
                names.insert(k.clone());
            }
        }
    })?;
    Ok(json!(names))
}

fn label_values(name: &str, p: &Params, store: &Store, limits: Limits) -> Result<Value, ApiError> {
    if name != "__name__" && !vitals_common::model::valid_label_name(name) {
        return Err(bad_data(format!("invalid label name: {name:?}")));
    }
    let mut values = BTreeSet::new();
    each_series(p, store, limits, |metric, labels| {
        let v = if name == "__name__" {
            Some(metric)
        } else {
            labels.get(name).map(String::as_str)
        };
        if let Some(v) = v.filter(|v| !v.is_empty())
            && !values.contains(v)
        {
            values.insert(v.to_string());
        }
    })?;
    Ok(json!(values))
}

// ---------------------------------------------------------- time, step --

/// A time as Prometheus takes it: unix seconds (a float) or RFC 3339.
pub fn parse_time(name: &str, s: &str) -> Result<i64, ApiError> {
    let bad = || {
        bad_data(format!(
            "invalid parameter \"{name}\": cannot parse {s:?} to a valid timestamp"
        ))
    };
    if let Ok(f) = s.parse::<f64>() {
        // Inside i64 milliseconds, as Prometheus' own bounds are.
        if !f.is_finite() || f.abs() > 9.2e15 {
            return Err(bad());
        }
        let secs = f.trunc();
        let ms = ((f - secs) * 1000.0).round();
        return Ok(secs as i64 * 1000 + ms as i64);
    }
    rfc3339_ms(s).ok_or_else(bad)
}

/// `2025-01-02T03:04:05.678Z` or with an offset `+02:00`, to unix ms
/// (fractions below a millisecond are cut, as Prometheus does).
fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let t = s.get(from..to)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d < 1
        || d > month_days[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || sec > 59
    {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let from = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == from {
            return None;
        }
        let digits = format!("{:0<3}", &s[from..i.min(from + 3)]);
        ms = digits.parse().ok()?;
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60;
            if rest.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset) * 1000 + ms)
}

/// A step as Prometheus takes it: seconds (a float) or a duration such
/// as `1m30s` (units y w d h m s ms, largest first). In milliseconds.
pub fn parse_duration(name: &str, s: &str) -> Result<i64, ApiError> {
    let bad = || {
        bad_data(format!(
            "invalid parameter \"{name}\": cannot parse {s:?} to a valid duration"
        ))
    };
    if let Ok(f) = s.parse::<f64>() {
        if !f.is_finite() || f.abs() > 9.2e15 {
            return Err(bad());
        }
        return Ok((f * 1000.0).round() as i64);
    }
    if s.is_empty() {
        return Err(bad());
    }
    const UNITS: [(&str, i64); 7] = [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1000),
    ];
    let order = |u: &str| {
        ["y", "w", "d", "h", "m", "s", "ms"]
            .iter()
            .position(|x| *x == u)
    };
    let mut rest = s;
    let mut total: i64 = 0;
    let mut last: Option<usize> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, ms) = UNITS
            .iter()
            .find(|(u, _)| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")))
            .ok_or_else(bad)?;
        let pos = order(unit).ok_or_else(bad)?;
        if last.is_some_and(|l| pos <= l) {
            return Err(bad());
        }
        last = Some(pos);
        rest = &rest[unit.len()..];
        total = n
            .checked_mul(*ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    proptest::proptest! {
        /// Whatever a client sends, parsing answers Ok or bad_data (400),
        /// never a panic.
        #[test]
        fn arbitrary_parameters_never_panic(
            s in ".{0,40}",
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            date in "[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?(Z|[+-][0-9]{2}:[0-9]{2}|.{0,3})",
            dur in "([0-9]{0,20}(y|w|d|h|m|s|ms|x)?){0,4}",
        ) {
            let bytes = String::from_utf8_lossy(&b).into_owned();
            for input in [s.as_str(), bytes.as_str(), date.as_str(), dur.as_str()] {
                for r in [parse_time("t", input), parse_duration("d", input)] {
                    if let Err(e) = r {
                        proptest::prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    }
                }
                if let Err(e) = parse_form(input) {
                    proptest::prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                }
                let _ = scalar(input);
            }
        }
    }

    #[test]
    fn times_as_prometheus_reads_them() {
        assert_eq!(parse_time("t", "1700000000").unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_time("t", "1700000000.123").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(parse_time("t", "-1.5").unwrap(), -1500);
        assert_eq!(
            parse_time("t", "2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_time("t", "2023-11-14T22:13:20.5Z").unwrap(),
            1_700_000_000_500
        );
        assert_eq!(
            parse_time("t", "2023-11-15T00:13:20.123456+02:00").unwrap(),
            1_700_000_000_123
        );
        assert_eq!(parse_time("t", "1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_time("t", "2024-02-29T00:00:00Z").unwrap(),
            1_709_164_800_000
        );
        for bad in [
            "",
            "now",
            "NaN",
            "inf",
            "2023-02-29T00:00:00Z",
            "2023-11-14 22:13:20Z",
            "2023-11-14T22:13:20",
            "1e300",
        ] {
            let e = parse_time("start", bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(
                e.message,
                format!("invalid parameter \"start\": cannot parse {bad:?} to a valid timestamp")
            );
        }
    }

    #[test]
    fn steps_as_prometheus_reads_them() {
        assert_eq!(parse_duration("step", "15").unwrap(), 15_000);
        assert_eq!(parse_duration("step", "0.5").unwrap(), 500);
        assert_eq!(parse_duration("step", "1m30s").unwrap(), 90_000);
        assert_eq!(parse_duration("step", "1h").unwrap(), 3_600_000);
        assert_eq!(parse_duration("step", "2d").unwrap(), 172_800_000);
        assert_eq!(parse_duration("step", "250ms").unwrap(), 250);
        assert_eq!(parse_duration("step", "1m500ms").unwrap(), 60_500);
        for bad in ["", "1x", "s", "30s1m", "1m1m", "abc", "inf"] {
            assert_eq!(
                parse_duration("step", bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn forms_and_timestamps_and_values_as_prometheus_writes_them() {
        let f = parse_form("query=sum+by+(node)+(x%7Bgpu%3D%220%22%7D)&match%5B%5D=a&match[]=b&e=")
            .unwrap();
        assert_eq!(
            f[0],
            ("query".into(), "sum by (node) (x{gpu=\"0\"})".into())
        );
        assert_eq!(f[1], ("match[]".into(), "a".into()));
        assert_eq!(f[2], ("match[]".into(), "b".into()));
        assert_eq!(f[3], ("e".into(), String::new()));
        assert!(parse_form("a=%zz").is_err());
        assert!(parse_form("a=%").is_err());
        assert_eq!(ts_json(1_700_000_000_000).to_string(), "1700000000");
        assert_eq!(ts_json(1_700_000_000_123).to_string(), "1700000000.123");
        assert_eq!(
            point_json(1_500, f64::INFINITY).to_string(),
            "[1.5,\"+Inf\"]"
        );
        assert_eq!(
            point_json(0, 1e21).to_string(),
            "[0,\"1000000000000000000000\"]"
        );
        assert_eq!(point_json(0, 0.1).to_string(), "[0,\"0.1\"]");
        assert_eq!(scalar(" 2 "), Some(2.0));
        assert_eq!(scalar("-1e3"), Some(-1000.0));
        assert!(scalar("NaN").unwrap().is_nan());
        assert_eq!(scalar("node_load1"), None);
        assert_eq!(scalar("inf_metric"), None);
    }
}
