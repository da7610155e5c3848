//! `vitals alerts`, `vitals silence ...`, `vitals rules check`.

use std::path::Path;

use anyhow::{Context, Result};
use vitals_collector::alert::rules::{self, RuleSet};
use vitals_common::model::format_value;
use vitals_proto::v1::{
    AddSilenceRequest, Alert, DeleteSilenceRequest, ListAlertsRequest, ListSilencesRequest,
    Silence, WatchAlertsRequest,
};

use crate::client::{self, CliConfig};
use crate::commands::{ago, fmt_ms, status_error, table};

fn label<'a>(a: &'a Alert, name: &str) -> &'a str {
    a.labels
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
        .unwrap_or("")
}

fn annotation<'a>(a: &'a Alert, name: &str) -> &'a str {
    a.annotations
        .iter()
        .find(|l| l.name == name)
        .map(|l| l.value.as_str())
        .unwrap_or("")
}

fn alert_json(a: &Alert) -> serde_json::Value {
    let map = |ls: &[vitals_proto::v1::Label]| -> serde_json::Map<String, serde_json::Value> {
        ls.iter()
            .map(|l| (l.name.clone(), serde_json::Value::String(l.value.clone())))
            .collect()
    };
    let opt = |ms: i64| (ms != 0).then_some(ms);
    serde_json::json!({
        "fingerprint": a.fingerprint,
        "rule": a.rule,
        "state": a.state,
        "severity": a.severity,
        "silenced": a.silenced,
        "labels": map(&a.labels),
        "annotations": map(&a.annotations),
        "active_since_ms": a.active_since_ms,
        "fired_ms": opt(a.fired_ms),
        "resolved_ms": opt(a.resolved_ms),
        "value": vitals_common::model::json_value(a.value),
        "evidence": a.evidence.iter().map(|e| serde_json::json!({
            "series": e.series,
            "points": e.points.iter().map(|p| serde_json::json!([p.timestamp_ms, vitals_common::model::json_value(p.value)])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "related": a.related.iter().map(|r| serde_json::json!({
            "kind": r.kind, "what": r.what, "score": r.score, "since_ms": r.since_ms,
        })).collect::<Vec<_>>(),
    })
}

/// `vitals alerts [--all] [--state S] [--json]`.
pub async fn alerts(
    cfg: &CliConfig,
    all: bool,
    state: Option<String>,
    json: bool,
) -> Result<String> {
    let mut c = client::alerts(cfg).await?;
    let resp = c
        .list_alerts(ListAlertsRequest {
            all,
            limit: 0,
            state: state.unwrap_or_default(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let list: Vec<_> = resp.alerts.iter().map(alert_json).collect();
        return Ok(serde_json::json!({ "alerts": list }).to_string());
    }
    if resp.alerts.is_empty() {
        return Ok(if all {
            "no alerts recorded".into()
        } else {
            "no alerts firing or pending".into()
        });
    }
    let rows: Vec<Vec<String>> = resp
        .alerts
        .iter()
        .map(|a| {
            let since = if a.fired_ms != 0 {
                a.fired_ms
            } else {
                a.active_since_ms
            };
            vec![
                if a.silenced {
                    format!("{} (silenced)", a.state)
                } else {
                    a.state.clone()
                },
                a.severity.clone(),
                a.rule.clone(),
                label(a, "node").to_string(),
                format!("{} ({})", fmt_ms(since), ago(since)),
                annotation(a, "summary").to_string(),
            ]
        })
        .collect();
    let mut out = table(
        &["STATE", "SEVERITY", "ALERT", "NODE", "SINCE", "SUMMARY"],
        &rows,
    );
    // The evidence and probable cause of what is firing.
    for a in resp.alerts.iter().filter(|a| a.state == "firing") {
        out.push_str(&format!("\n{} {}:\n", a.rule, a.fingerprint));
        let cause = annotation(a, "probable_cause");
        if !cause.is_empty() {
            out.push_str(&format!("  probable cause: {cause}\n"));
        }
        for e in &a.evidence {
            let pts: Vec<String> = e.points.iter().map(|p| format_value(p.value)).collect();
            out.push_str(&format!("  {}  {}\n", e.series, pts.join(" ")));
        }
        for r in a.related.iter().take(5) {
            out.push_str(&format!(
                "  related: {} {} (score {:.2}, since {})\n",
                r.kind,
                r.what,
                r.score,
                fmt_ms(r.since_ms)
            ));
        }
    }
    Ok(out.trim_end().to_string())
}

/// `vitals watch [--json]`: every alert change as it is recorded, one
/// line each (JSON lines with --json), until the stream ends or ^C.
pub async fn watch(cfg: &CliConfig, json: bool, mut out: impl std::io::Write) -> Result<()> {
    let mut c = client::alerts(cfg).await?;
    let mut stream = c
        .watch_alerts(WatchAlertsRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    loop {
        let change = match stream.message().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return Err(status_error(e)),
        };
        let Some(a) = change.alert.as_ref() else {
            continue;
        };
        let line = if json {
            let mut v = alert_json(a);
            v["change"] = serde_json::Value::String(change.kind.clone());
            v["at_ms"] = serde_json::json!(change.at_ms);
            v.to_string()
        } else {
            // A new value of an open alert is not news on a terminal.
            if change.kind == "updated" {
                continue;
            }
            format!(
                "{}  {:<9} {:<8} {}  node={}  {}{}",
                fmt_ms(change.at_ms),
                change.kind,
                a.severity,
                a.rule,
                label(a, "node"),
                annotation(a, "summary"),
                if a.silenced { "  (silenced)" } else { "" }
            )
        };
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    if !json {
        writeln!(out, "(the collector closed the stream)")?;
    }
    Ok(())
}

fn silence_json(s: &Silence) -> serde_json::Value {
    serde_json::json!({
        "id": s.id, "matchers": s.matchers, "starts_ms": s.starts_ms, "ends_ms": s.ends_ms,
        "created_by": s.created_by, "comment": s.comment,
    })
}

/// `vitals silence add MATCHERS --for D [--comment C]`.
pub async fn silence_add(
    cfg: &CliConfig,
    matchers: &str,
    duration: &str,
    comment: &str,
    json: bool,
) -> Result<String> {
    vitals_common::selector::parse(matchers)
        .map_err(|e| anyhow::anyhow!("bad matchers {matchers:?}: {e}"))?;
    let d = humantime::parse_duration(duration)
        .with_context(|| format!("bad duration {duration:?}; e.g. 30m, 2h, 1d"))?;
    let mut c = client::alerts(cfg).await?;
    let s = c
        .add_silence(AddSilenceRequest {
            matchers: matchers.into(),
            duration_ms: d.as_millis() as i64,
            comment: comment.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(if json {
        silence_json(&s).to_string()
    } else {
        format!(
            "silence {} added: {} until {}",
            s.id,
            s.matchers,
            fmt_ms(s.ends_ms)
        )
    })
}

/// `vitals silence list [--all] [--json]`.
pub async fn silence_list(cfg: &CliConfig, all: bool, json: bool) -> Result<String> {
    let mut c = client::alerts(cfg).await?;
    let resp = c
        .list_silences(ListSilencesRequest { all })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let list: Vec<_> = resp.silences.iter().map(silence_json).collect();
        return Ok(serde_json::json!({ "silences": list }).to_string());
    }
    if resp.silences.is_empty() {
        return Ok("no silences in force".into());
    }
    let rows: Vec<Vec<String>> = resp
        .silences
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.matchers.clone(),
                fmt_ms(s.ends_ms),
                s.created_by.clone(),
                s.comment.clone(),
            ]
        })
        .collect();
    Ok(table(&["ID", "MATCHERS", "UNTIL", "BY", "COMMENT"], &rows))
}

/// `vitals silence rm ID`.
pub async fn silence_rm(cfg: &CliConfig, id: i64) -> Result<String> {
    let mut c = client::alerts(cfg).await?;
    c.delete_silence(DeleteSilenceRequest { id })
        .await
        .map_err(status_error)?;
    Ok(format!("silence {id} ended"))
}

/// `vitals rules check FILE`: a rules file (`[[rules]]`) or a collector
/// config (its `[alerting]` table and the rule files it names).
pub fn check(file: &Path, json: bool) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let value: toml::Table = vitals_common::config::parse(file, &text)?;
    let is_rules_file = value.keys().all(|k| k == "rules");
    let set = if is_rules_file {
        let checked = rules::parse_file(file, &text)?;
        RuleSet::load(
            false,
            &[(
                file.to_path_buf(),
                text.clone(),
                checked.into_iter().map(|(raw, _)| raw).collect(),
            )],
        )?
    } else {
        let raw: vitals_collector::config::RawConfig = vitals_common::config::parse(file, &text)?;
        vitals_collector::alert::settings(file, &text, &raw.alerting, Path::new("vitals.db"))?.rules
    };
    if json {
        let list: Vec<_> = set
            .rules
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "severity": r.severity.as_str(), "for_seconds": r.for_.as_secs_f64(),
                    "origin": r.origin, "metrics": r.metrics(),
                })
            })
            .collect();
        return Ok(serde_json::json!({ "file": file, "ok": true, "rules": list }).to_string());
    }
    let builtin = set.rules.iter().filter(|r| r.origin == "built-in").count();
    let mut out = format!(
        "{}: ok, {} rules ({} built-in, {} from files)\n",
        file.display(),
        set.rules.len(),
        builtin,
        set.rules.len() - builtin
    );
    for r in &set.rules {
        out.push_str(&format!(
            "  {:<26} {:<8} for {:<6} {}\n",
            r.name,
            r.severity.as_str(),
            humantime::format_duration(r.for_).to_string(),
            r.origin
        ));
    }
    Ok(out.trim_end().to_string())
}
