//! `vitals push`: send samples to the collector's Push service — what a
//! model server, batch job or script reports about itself (real traffic's
//! request counts and latencies, accuracy on labelled feedback).
//!
//! Input is Prometheus' text format, one sample per line:
//! `name{label="value",...} VALUE [TIMESTAMP_MS]`; `#` lines and blank
//! lines are skipped. Every line is checked before anything is sent.

use anyhow::{Result, bail};
use vitals_common::selector::{self, Op};
use vitals_proto::v1::{Label, PushRequest, PushedSample, push_client::PushClient};

use crate::client::{self, CliConfig};
use crate::commands::status_error;

/// Where the selector part of a line ends (after its `}` or its name).
fn split(line: &str) -> Option<(&str, &str)> {
    let bytes = line.as_bytes();
    let open = line.find(['{', ' ', '\t'])?;
    if bytes[open] != b'{' {
        return Some((&line[..open], &line[open..]));
    }
    let mut in_quote = false;
    let mut escaped = false;
    for (i, &c) in bytes.iter().enumerate().skip(open + 1) {
        match c {
            _ if escaped => escaped = false,
            b'\\' if in_quote => escaped = true,
            b'"' => in_quote = !in_quote,
            b'}' if !in_quote => return Some((&line[..=i], &line[i + 1..])),
            _ => {}
        }
    }
    None
}

fn value(s: &str) -> Option<f64> {
    match s {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

/// Parses the lines; errors name the line.
pub fn parse(text: &str) -> Result<Vec<PushedSample>> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |m: &str| anyhow::anyhow!("line {}: {m}: {line:?}", n + 1);
        let (sel, rest) = split(line).ok_or_else(|| at("expected `name{labels} value`"))?;
        let sel = selector::parse(sel).map_err(|e| at(&e))?;
        if sel.metric.is_empty() {
            return Err(at("no metric name"));
        }
        let mut labels = Vec::new();
        for m in &sel.matchers {
            if m.op != Op::Equal {
                return Err(at("labels are written name=\"value\""));
            }
            labels.push(Label {
                name: m.name.clone(),
                value: m.value.clone(),
            });
        }
        let mut parts = rest.split_whitespace();
        let v = parts
            .next()
            .and_then(value)
            .ok_or_else(|| at("no value after the name"))?;
        let ts = match parts.next() {
            Some(t) => t
                .parse::<i64>()
                .map_err(|_| at("the timestamp is milliseconds since the epoch"))?,
            None => 0,
        };
        if parts.next().is_some() {
            return Err(at("more than a value and a timestamp"));
        }
        out.push(PushedSample {
            name: sel.metric,
            labels,
            value: v,
            timestamp_ms: ts,
        });
    }
    Ok(out)
}

/// `vitals push [SAMPLE...]`, or lines from `--file` / stdin.
pub async fn push(cfg: &CliConfig, text: &str, json: bool) -> Result<String> {
    let samples = parse(text)?;
    if samples.is_empty() {
        bail!("no samples given (arguments, --file, or lines on stdin)");
    }
    let channel = client::channel(cfg).await?;
    let mut c = PushClient::new(channel);
    let mut accepted = 0u64;
    for chunk in samples.chunks(10_000) {
        accepted += u64::from(
            c.push(PushRequest {
                samples: chunk.to_vec(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .accepted,
        );
    }
    Ok(if json {
        serde_json::json!({ "accepted": accepted }).to_string()
    } else {
        format!("{accepted} samples stored")
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn text_lines() {
        let s = parse(
            "# a comment\n\nmodel_accuracy{model=\"m\",split=\"a}b\"} 0.93\nreq_total 12 1800000000000\nlat{q=\"0.99\"} NaN\n",
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "model_accuracy");
        assert_eq!(s[0].labels[1].value, "a}b");
        assert_eq!((s[0].value, s[0].timestamp_ms), (0.93, 0));
        assert_eq!((s[1].value, s[1].timestamp_ms), (12.0, 1_800_000_000_000));
        assert!(s[2].value.is_nan());
        for bad in [
            "m",
            "m{a=\"b\"}",
            "m{a=~\"b\"} 1",
            "m x",
            "m 1 2 3",
            "m{a=\"b\" 1",
            "m 1 1.5",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.starts_with("line 1:"), "{bad}: {e}");
        }
    }
}
