//! `vitals nodes`, `vitals series`, `vitals query`, `vitals events`.

use std::io::IsTerminal;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use vitals_common::model::{Labels, format_value, json_value, series_text};
use vitals_common::selector::Selector;
use vitals_proto::v1::{
    Event, ListEventsRequest, ListNodesRequest, ListSeriesRequest, MatchOp, Matcher,
    QueryInstantRequest, QueryRangeRequest, Series, Severity,
};

use crate::client::{self, CliConfig};

pub fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("collector answered {:?}: {}", e.code(), e.message())
}

pub fn fmt_ms(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

pub fn ago(ms: i64) -> String {
    let d = (vitals_common::now_ms() - ms).max(0) / 1000;
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// Prints an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub async fn nodes(cfg: &CliConfig, json: bool) -> Result<String> {
    let mut c = client::connect(cfg).await?;
    let resp = c
        .list_nodes(ListNodesRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let nodes: Vec<_> = resp
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name,
                    "role": n.role,
                    "connected": n.connected,
                    "last_seen_ms": n.last_seen_ms,
                    "agent_version": n.agent_version,
                    "sources": n.sources,
                })
            })
            .collect();
        return Ok(serde_json::json!({ "nodes": nodes }).to_string());
    }
    if resp.nodes.is_empty() {
        return Ok("no nodes have reported yet".into());
    }
    let rows: Vec<Vec<String>> = resp
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                if n.connected {
                    "yes".into()
                } else {
                    "no".into()
                },
                format!("{} ({})", fmt_ms(n.last_seen_ms), ago(n.last_seen_ms)),
                n.agent_version.clone(),
                n.role.clone(),
                n.sources.join(","),
            ]
        })
        .collect();
    Ok(table(
        &["NODE", "CONNECTED", "LAST SEEN", "AGENT", "ROLE", "SOURCES"],
        &rows,
    ))
}

/// Parses a time: RFC 3339, Unix seconds (or milliseconds), or `now`.
pub fn parse_time(s: &str) -> Result<i64> {
    if s == "now" {
        return Ok(vitals_common::now_ms());
    }
    if let Ok(n) = s.parse::<f64>() {
        return Ok(if n > 1e12 {
            n as i64
        } else {
            (n * 1000.0) as i64
        });
    }
    let t = humantime::parse_rfc3339_weak(s).with_context(|| {
        format!("{s:?} is not a time: use RFC 3339 (2026-01-02T15:04:05Z), Unix seconds, or now")
    })?;
    Ok(t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

pub struct Range {
    pub since: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
}

impl Range {
    pub fn resolve(&self) -> Result<(i64, i64)> {
        self.resolve_default("15m")
    }

    /// `resolve`, with this range ending now when neither --since nor
    /// --start is given.
    pub fn resolve_default(&self, default: &str) -> Result<(i64, i64)> {
        let end = match &self.end {
            Some(e) => parse_time(e)?,
            None => vitals_common::now_ms(),
        };
        let start = match (&self.start, &self.since) {
            (Some(_), Some(_)) => bail!("give --since or --start, not both"),
            (Some(s), None) => parse_time(s)?,
            (None, since) => {
                let d = humantime::parse_duration(since.as_deref().unwrap_or(default))
                    .with_context(|| {
                        format!("--since {:?} is not a duration (e.g. 15m, 2h)", since)
                    })?;
                end - d.as_millis() as i64
            }
        };
        if end < start {
            bail!("the range ends before it starts");
        }
        Ok((start, end))
    }
}

fn matchers_pb(sel: &Selector) -> Vec<Matcher> {
    sel.matchers
        .iter()
        .map(|m| Matcher {
            name: m.name.clone(),
            op: match m.op {
                vitals_common::selector::Op::Equal => MatchOp::Equal,
                vitals_common::selector::Op::NotEqual => MatchOp::NotEqual,
                vitals_common::selector::Op::Regex => MatchOp::Regex,
                vitals_common::selector::Op::NotRegex => MatchOp::NotRegex,
            } as i32,
            value: m.value.clone(),
        })
        .collect()
}

fn labels_of(s: &Series) -> Labels {
    s.labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect()
}

fn labels_json(ls: &[vitals_proto::v1::Label]) -> serde_json::Map<String, serde_json::Value> {
    ls.iter()
        .map(|l| (l.name.clone(), serde_json::Value::String(l.value.clone())))
        .collect()
}

/// What `vitals query` asks for.
pub struct QueryArgs {
    pub expr: String,
    pub range: Range,
    /// Evaluation step (a duration); default: about 240 points over the range.
    pub step: Option<String>,
    /// Evaluate once, at this time (or now).
    pub at: Option<String>,
    pub instant: bool,
    /// Chart a single series even when stdout is not a terminal.
    pub chart: bool,
    pub json: bool,
}

/// The default step: the range in about 240 steps, whole seconds.
pub fn default_step_ms(start_ms: i64, end_ms: i64) -> i64 {
    let raw = (end_ms - start_ms) / 240;
    ((raw + 999) / 1000 * 1000).max(1000)
}

pub async fn query(cfg: &CliConfig, a: &QueryArgs) -> Result<String> {
    // A plain selector without --step: every stored sample (raw).
    let plain = vitals_common::selector::parse(&a.expr).ok();
    let mut c = client::connect(cfg).await?;
    let (series, range) = if a.instant || a.at.is_some() {
        let t = match &a.at {
            Some(t) => parse_time(t)?,
            None => vitals_common::now_ms(),
        };
        let resp = c
            .query_instant(QueryInstantRequest {
                query: a.expr.clone(),
                time_ms: t,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        (resp.series, (t, t))
    } else {
        let (start_ms, end_ms) = a.range.resolve()?;
        let req = match (&plain, &a.step) {
            (Some(sel), None) => QueryRangeRequest {
                metric: sel.metric.clone(),
                matchers: matchers_pb(sel),
                start_ms,
                end_ms,
                ..Default::default()
            },
            (_, step) => {
                let step_ms = match step {
                    Some(s) => {
                        let d = humantime::parse_duration(s).with_context(|| {
                            format!("--step {s:?} is not a duration (e.g. 15s, 1m)")
                        })?;
                        if d.is_zero() {
                            bail!("--step must be above zero");
                        }
                        d.as_millis() as i64
                    }
                    None => default_step_ms(start_ms, end_ms),
                };
                QueryRangeRequest {
                    query: a.expr.clone(),
                    start_ms,
                    end_ms,
                    step_ms,
                    ..Default::default()
                }
            }
        };
        let req = QueryRangeRequest {
            packed: true,
            ..req
        };
        let mut resp = c.query_range(req).await.map_err(status_error)?.into_inner();
        resp.series.iter_mut().for_each(|s| s.unpack());
        (resp.series, (start_ms, end_ms))
    };
    if a.json {
        let list: Vec<_> = series
            .iter()
            .map(|s| {
                let points: Vec<_> = s
                    .points
                    .iter()
                    .map(|p| serde_json::json!([p.timestamp_ms, json_value(p.value)]))
                    .collect();
                serde_json::json!({"name": s.name, "labels": labels_json(&s.labels), "points": points})
            })
            .collect();
        return Ok(serde_json::json!({ "series": list }).to_string());
    }
    if series.is_empty() {
        return Ok(if range.0 == range.1 {
            format!("no value for {} at {}", a.expr, fmt_ms(range.0))
        } else {
            format!(
                "no samples for {} between {} and {}",
                a.expr,
                fmt_ms(range.0),
                fmt_ms(range.1)
            )
        });
    }
    let one = series.len() == 1 && series[0].points.len() > 1;
    if one && (a.chart || std::io::stdout().is_terminal()) {
        let s = &series[0];
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(80usize);
        let pts: Vec<(i64, f64)> = s.points.iter().map(|p| (p.timestamp_ms, p.value)).collect();
        let last = s
            .points
            .last()
            .map(|p| format_value(p.value))
            .unwrap_or_default();
        return Ok(format!(
            "{}  ({} points, last {last})\n{}",
            series_text(&s.name, &labels_of(s)),
            s.points.len(),
            crate::chart::render(&pts, width, 10)
        ));
    }
    if range.0 == range.1 {
        let rows: Vec<Vec<String>> = series
            .iter()
            .map(|s| {
                vec![
                    series_text(&s.name, &labels_of(s)),
                    s.points
                        .first()
                        .map(|p| format_value(p.value))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        return Ok(table(&["SERIES", "VALUE"], &rows));
    }
    let rows: Vec<Vec<String>> = series
        .iter()
        .map(|s| {
            let vals: Vec<f64> = s.points.iter().map(|p| p.value).collect();
            let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let last = s.points.last();
            vec![
                series_text(&s.name, &labels_of(s)),
                s.points.len().to_string(),
                format_value(min),
                format_value(max),
                last.map(|p| format_value(p.value)).unwrap_or_default(),
                last.map(|p| fmt_ms(p.timestamp_ms)).unwrap_or_default(),
            ]
        })
        .collect();
    Ok(table(
        &["SERIES", "POINTS", "MIN", "MAX", "LAST", "AT"],
        &rows,
    ))
}

/// `vitals series SELECTOR [--limit N]`.
pub async fn series(cfg: &CliConfig, selector: &str, limit: u32, json: bool) -> Result<String> {
    let sel = vitals_common::selector::parse(selector).map_err(anyhow::Error::msg)?;
    let mut c = client::connect(cfg).await?;
    let resp = c
        .list_series(ListSeriesRequest {
            metric: sel.metric.clone(),
            matchers: matchers_pb(&sel),
            limit,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let list: Vec<_> = resp
            .series
            .iter()
            .map(|s| serde_json::json!({"name": s.name, "labels": labels_json(&s.labels)}))
            .collect();
        return Ok(serde_json::json!({ "series": list, "truncated": resp.truncated }).to_string());
    }
    if resp.series.is_empty() {
        return Ok(format!("no series match {selector}"));
    }
    let mut out: Vec<String> = resp
        .series
        .iter()
        .map(|s| {
            let labels: Labels = s
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            series_text(&s.name, &labels)
        })
        .collect();
    if resp.truncated {
        out.push(format!(
            "(more series match; showing the first {}: raise --limit or narrow the selector)",
            resp.series.len()
        ));
    }
    Ok(out.join("\n"))
}

fn severity_name(s: i32) -> &'static str {
    match Severity::try_from(s) {
        Ok(Severity::Info) => "info",
        Ok(Severity::Warning) => "warning",
        Ok(Severity::Error) => "error",
        Ok(Severity::Critical) => "critical",
        _ => "unspecified",
    }
}

fn event_json(e: &Event) -> serde_json::Value {
    serde_json::json!({
        "timestamp_ms": e.timestamp_ms,
        "node": e.node,
        "kind": e.kind,
        "severity": severity_name(e.severity),
        "message": e.message,
        "labels": labels_json(&e.labels),
    })
}

/// `vitals events [--node N] [--kind K] [--since D]`.
pub async fn events(
    cfg: &CliConfig,
    node: Option<String>,
    kind: Option<String>,
    range: &Range,
    limit: u32,
    json: bool,
) -> Result<String> {
    let (start_ms, end_ms) = range.resolve_default("24h")?;
    let mut c = client::connect(cfg).await?;
    let resp = c
        .list_events(ListEventsRequest {
            node: node.unwrap_or_default(),
            kind: kind.unwrap_or_default(),
            start_ms,
            end_ms,
            limit,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let list: Vec<_> = resp.events.iter().map(event_json).collect();
        return Ok(serde_json::json!({ "events": list }).to_string());
    }
    if resp.events.is_empty() {
        return Ok(format!(
            "no events between {} and {}",
            fmt_ms(start_ms),
            fmt_ms(end_ms)
        ));
    }
    let rows: Vec<Vec<String>> = resp
        .events
        .iter()
        .map(|e| {
            vec![
                fmt_ms(e.timestamp_ms),
                e.node.clone(),
                e.kind.clone(),
                severity_name(e.severity).to_string(),
                e.message.clone(),
            ]
        })
        .collect();
    Ok(table(&["AT", "NODE", "KIND", "SEVERITY", "MESSAGE"], &rows))
}

/// Instant queries at the same moment, each answer under its key, and the
/// open (pending or firing) alerts: what `vitals jobs` and `vitals probes`
/// join into their rows.
pub async fn instant_with_alerts<K: Ord + Copy>(
    cfg: &crate::client::CliConfig,
    queries: Vec<(K, &'static str)>,
) -> Result<(
    std::collections::BTreeMap<K, Vec<vitals_proto::v1::Series>>,
    Vec<vitals_proto::v1::Alert>,
)> {
    let channel = crate::client::channel(cfg).await?;
    let mut q = crate::client::query_client(channel.clone());
    let mut al = crate::client::alerts_client(channel);
    let mut series = std::collections::BTreeMap::new();
    let now = vitals_common::now_ms();
    for (key, query) in queries {
        let resp = q
            .query_instant(vitals_proto::v1::QueryInstantRequest {
                query: query.into(),
                time_ms: now,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        series.insert(key, resp.series);
    }
    let alerts = al
        .list_alerts(vitals_proto::v1::ListAlertsRequest::default())
        .await
        .map_err(status_error)?
        .into_inner()
        .alerts
        .into_iter()
        .filter(|a| a.state == "firing" || a.state == "pending")
        .collect();
    Ok((series, alerts))
}

/// One series with one point (time 1) of `v`: for the tests of commands
/// that build rows from query answers.
#[cfg(test)]
pub fn test_series(name: &str, labels: &[(&str, &str)], v: f64) -> vitals_proto::v1::Series {
    vitals_proto::v1::Series {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(n, v)| vitals_proto::v1::Label {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        points: vec![vitals_proto::v1::Point {
            timestamp_ms: 1,
            value: v,
        }],
        ..Default::default()
    }
}
