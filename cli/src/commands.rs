//! `vitals nodes` and `vitals query`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use vitals_common::model::{Labels, format_value, json_value, series_text};
use vitals_proto::v1::{ListNodesRequest, MatchOp, Matcher, QueryRangeRequest};

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
                    "connected": n.connected,
                    "last_seen_ms": n.last_seen_ms,
                    "agent_version": n.agent_version,
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
            ]
        })
        .collect();
    Ok(table(&["NODE", "CONNECTED", "LAST SEEN", "AGENT"], &rows))
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
        let end = match &self.end {
            Some(e) => parse_time(e)?,
            None => vitals_common::now_ms(),
        };
        let start = match (&self.start, &self.since) {
            (Some(_), Some(_)) => bail!("give --since or --start, not both"),
            (Some(s), None) => parse_time(s)?,
            (None, since) => {
                let d = humantime::parse_duration(since.as_deref().unwrap_or("15m")).with_context(
                    || format!("--since {:?} is not a duration (e.g. 15m, 2h)", since),
                )?;
                end - d.as_millis() as i64
            }
        };
        if end < start {
            bail!("the range ends before it starts");
        }
        Ok((start, end))
    }
}

pub async fn query(cfg: &CliConfig, selector: &str, range: &Range, json: bool) -> Result<String> {
    let sel = vitals_common::selector::parse(selector).map_err(anyhow::Error::msg)?;
    let (start_ms, end_ms) = range.resolve()?;
    let matchers = sel
        .matchers
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
        .collect();
    let mut c = client::connect(cfg).await?;
    let resp = c
        .query_range(QueryRangeRequest {
            metric: sel.metric.clone(),
            matchers,
            start_ms,
            end_ms,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let series: Vec<_> = resp
            .series
            .iter()
            .map(|s| {
                let labels: serde_json::Map<String, serde_json::Value> = s
                    .labels
                    .iter()
                    .map(|l| (l.name.clone(), serde_json::Value::String(l.value.clone())))
                    .collect();
                let points: Vec<_> = s
                    .points
                    .iter()
                    .map(|p| serde_json::json!([p.timestamp_ms, json_value(p.value)]))
                    .collect();
                serde_json::json!({"name": s.name, "labels": labels, "points": points})
            })
            .collect();
        return Ok(serde_json::json!({ "series": series }).to_string());
    }
    if resp.series.is_empty() {
        return Ok(format!(
            "no samples for {selector} between {} and {}",
            fmt_ms(start_ms),
            fmt_ms(end_ms)
        ));
    }
    let rows: Vec<Vec<String>> = resp
        .series
        .iter()
        .map(|s| {
            let labels: Labels = s
                .labels
                .iter()
                .map(|l| (l.name.clone(), l.value.clone()))
                .collect();
            let vals: Vec<f64> = s.points.iter().map(|p| p.value).collect();
            let min = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let last = s.points.last();
            vec![
                series_text(&s.name, &labels),
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
