//! The sample model: a series is a metric name plus labels; a sample is
//! (series, timestamp in ms, f64). Batches on the wire are columnar.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use vitals_proto::v1::{Batch, Event, Label, SeriesDef};

/// Labels of a series, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// One value of one series as a source reports it (no node, no timestamp yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Labels,
    pub value: f64,
}

impl Sample {
    pub fn new(name: impl Into<String>, value: f64) -> Self {
        Sample {
            name: name.into(),
            labels: Labels::new(),
            value,
        }
    }

    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }
}

/// Whether `name` is a valid Prometheus metric name.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid Prometheus label name.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Builds one self-contained columnar batch, defining each series once.
#[derive(Default)]
pub struct BatchBuilder {
    ids: HashMap<(String, Labels), u32>,
    batch: Batch,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, name: &str, labels: &Labels, timestamp_ms: i64, value: f64) {
        let next = self.ids.len() as u32;
        let id = *self
            .ids
            .entry((name.to_string(), labels.clone()))
            .or_insert_with(|| {
                self.batch.series.push(SeriesDef {
                    id: next,
                    name: name.to_string(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| Label {
                            name: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                });
                next
            });
        self.batch.series_ids.push(id);
        self.batch.timestamps_ms.push(timestamp_ms);
        self.batch.values.push(value);
    }

    pub fn push_event(&mut self, event: Event) {
        self.batch.events.push(event);
    }

    pub fn len(&self) -> usize {
        self.batch.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.values.is_empty() && self.batch.events.is_empty()
    }

    pub fn finish(self) -> Batch {
        self.batch
    }
}

/// Labels of a wire series definition as a sorted map.
pub fn labels_of(def: &SeriesDef) -> Labels {
    def.labels
        .iter()
        .map(|l| (l.name.clone(), l.value.clone()))
        .collect()
}

fn escape_label_value(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `name{a="b",c="d"}` in Prometheus exposition syntax.
pub fn series_text(name: &str, labels: &Labels) -> String {
    let mut out = name.to_string();
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape_label_value(v, &mut out);
            out.push('"');
        }
        out.push('}');
    }
    out
}

/// Formats a value the way Prometheus does (`+Inf`, `-Inf`, `NaN`).
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// A value as JSON: a number, or the string Prometheus writes for NaN and
/// infinities (JSON has none).
pub fn json_value(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::Value::String(format_value(v))
    }
}

/// Samples in the Prometheus text exposition format, grouped by metric name.
pub fn prometheus_text(samples: &[Sample], timestamp_ms: Option<i64>) -> String {
    let mut sorted: Vec<&Sample> = samples.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.labels.cmp(&b.labels)));
    let mut out = String::new();
    let mut last_name = "";
    for s in sorted {
        if s.name != last_name {
            let kind = if s.name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# TYPE {} {kind}", s.name);
            last_name = &s.name;
        }
        let _ = write!(
            out,
            "{} {}",
            series_text(&s.name, &s.labels),
            format_value(s.value)
        );
        if let Some(ts) = timestamp_ms {
            let _ = write!(out, " {ts}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_defines_each_series_once() {
        let mut b = BatchBuilder::new();
        let mut l = Labels::new();
        l.insert("node".into(), "a".into());
        b.push("x", &l, 1, 1.0);
        b.push("y", &l, 1, 2.0);
        b.push("x", &l, 2, 3.0);
        let batch = b.finish();
        assert_eq!(batch.series.len(), 2);
        assert_eq!(batch.series_ids, vec![0, 1, 0]);
        assert_eq!(batch.timestamps_ms, vec![1, 1, 2]);
        assert_eq!(batch.values, vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn names_are_checked() {
        assert!(valid_metric_name("node_load1"));
        assert!(valid_metric_name("a:b_c"));
        assert!(!valid_metric_name("1abc"));
        assert!(!valid_metric_name(""));
        assert!(valid_label_name("__name__"));
        assert!(!valid_label_name("a-b"));
    }

    #[test]
    fn text_format_escapes() {
        let s = Sample::new("m_total", 1.5).label("path", "a\"b\\c\nd");
        let text = prometheus_text(&[s], None);
        assert_eq!(
            text,
            "# TYPE m_total counter\nm_total{path=\"a\\\"b\\\\c\\nd\"} 1.5\n"
        );
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
    }
}
