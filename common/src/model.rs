//! The sample model: a series is a metric name plus labels; a sample is
//! (series, timestamp in ms, f64). Batches on the wire are columnar.

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use vitals_proto::v1::{Batch, Event, Label, SeriesDef};

/// Labels of a series, sorted by name.
pub type Labels = BTreeMap<String, String>;

/// A metric name that clones without allocating: a literal, or one string
/// shared by every sample of that name. Sources build the names they make
/// at run time once and hand out clones, so a cycle of a thousand samples
/// does not allocate a thousand names.
#[derive(Clone)]
pub struct Name(NameRepr);

#[derive(Clone)]
enum NameRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Name {
    pub const fn literal(s: &'static str) -> Name {
        Name(NameRepr::Static(s))
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            NameRepr::Static(s) => s,
            NameRepr::Shared(s) => s,
        }
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.as_str().hash(h)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl From<&'static str> for Name {
    fn from(s: &'static str) -> Name {
        Name::literal(s)
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(NameRepr::Shared(s.into()))
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.as_str().to_string()
    }
}

/// The labels of a sample, shared: cloning one is a reference count, so
/// the samples of one device, mount or pool share one set. Reads like a
/// [`Labels`] map.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(Option<Arc<Labels>>);

static NO_LABELS: Labels = BTreeMap::new();

impl LabelSet {
    pub fn new(labels: Labels) -> LabelSet {
        if labels.is_empty() {
            LabelSet(None)
        } else {
            LabelSet(Some(Arc::new(labels)))
        }
    }

    /// Sets one label (copying the set first if it is shared).
    pub fn insert(&mut self, name: String, value: String) {
        match &mut self.0 {
            Some(l) => {
                Arc::make_mut(l).insert(name, value);
            }
            None => *self = LabelSet::new(Labels::from([(name, value)])),
        }
    }

    /// This set plus one label.
    pub fn with(&self, name: impl Into<String>, value: impl Into<String>) -> LabelSet {
        let mut l = self.clone();
        l.insert(name.into(), value.into());
        l
    }
}

impl std::ops::Deref for LabelSet {
    type Target = Labels;
    fn deref(&self) -> &Labels {
        self.0.as_deref().unwrap_or(&NO_LABELS)
    }
}

impl fmt::Debug for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq<Labels> for LabelSet {
    fn eq(&self, other: &Labels) -> bool {
        **self == *other
    }
}

impl From<Labels> for LabelSet {
    fn from(l: Labels) -> LabelSet {
        LabelSet::new(l)
    }
}

impl From<LabelSet> for Labels {
    fn from(l: LabelSet) -> Labels {
        match l.0 {
            Some(a) => Arc::unwrap_or_clone(a),
            None => Labels::new(),
        }
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for LabelSet {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> LabelSet {
        LabelSet::new(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

/// One value of one series as a source reports it (no node, no timestamp
/// yet). Name and labels are shared (see [`Name`], [`LabelSet`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: Name,
    pub labels: LabelSet,
    pub value: f64,
}

impl Sample {
    pub fn new(name: impl Into<Name>, value: f64) -> Self {
        Sample {
            name: name.into(),
            labels: LabelSet::default(),
            value,
        }
    }

    /// A sample with a label set shared with other samples.
    pub fn with_labels(name: impl Into<Name>, labels: &LabelSet, value: f64) -> Self {
        Sample {
            name: name.into(),
            labels: labels.clone(),
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
