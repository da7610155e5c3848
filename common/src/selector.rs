//! Prometheus-style series selectors: `name{label="v", other=~"re.*"}`.

use regex::Regex;

use crate::model::{Labels, valid_label_name, valid_metric_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Equal => "=",
            Op::NotEqual => "!=",
            Op::Regex => "=~",
            Op::NotRegex => "!~",
        }
    }
}

/// One label matcher; regexes are anchored at both ends, as in Prometheus.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
    regex: Option<Regex>,
}

impl Matcher {
    pub fn new(name: &str, op: Op, value: &str) -> Result<Matcher, String> {
        let regex = match op {
            Op::Regex | Op::NotRegex => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("invalid regex for label {name}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Matcher {
            name: name.to_string(),
            op,
            value: value.to_string(),
            regex,
        })
    }

    /// Whether `value` (empty when the label is absent) satisfies the matcher.
    pub fn matches(&self, value: &str) -> bool {
        match (self.op, &self.regex) {
            (Op::Equal, _) => value == self.value,
            (Op::NotEqual, _) => value != self.value,
            (Op::Regex, Some(r)) => r.is_match(value),
            (Op::NotRegex, Some(r)) => !r.is_match(value),
            _ => false,
        }
    }
}

/// A metric name (possibly empty) and label matchers.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<Matcher>,
}

impl Selector {
    /// Whether a series with this name and labels is selected.
    pub fn matches(&self, name: &str, labels: &Labels) -> bool {
        (self.metric.is_empty() || self.metric == name)
            && self.matchers.iter().all(|m| {
                let v = if m.name == "__name__" {
                    name
                } else {
                    labels.get(&m.name).map(String::as_str).unwrap_or("")
                };
                m.matches(v)
            })
    }
}

/// Parses `name{a="b",c!~"d.*"}`; either part may be absent, not both.
pub fn parse(input: &str) -> Result<Selector, String> {
    let mut p = Parser {
        s: input.trim().as_bytes(),
        i: 0,
        text: input.trim(),
    };
    let metric = p.ident(true);
    if !metric.is_empty() && !valid_metric_name(&metric) {
        return Err(format!("invalid metric name {metric:?}"));
    }
    let mut matchers = Vec::new();
    p.ws();
    if p.peek() == Some(b'{') {
        p.i += 1;
        loop {
            p.ws();
            if p.peek() == Some(b'}') {
                p.i += 1;
                break;
            }
            let name = p.ident(false);
            if !valid_label_name(&name) {
                return Err(p.err("expected a label name"));
            }
            p.ws();
            let op = match (p.peek(), p.s.get(p.i + 1).copied()) {
                (Some(b'='), Some(b'~')) => Op::Regex,
                (Some(b'!'), Some(b'=')) => Op::NotEqual,
                (Some(b'!'), Some(b'~')) => Op::NotRegex,
                (Some(b'='), _) => Op::Equal,
                _ => return Err(p.err("expected one of =, !=, =~, !~")),
            };
            p.i += if op == Op::Equal { 1 } else { 2 };
            p.ws();
            let value = p.string()?;
            matchers.push(Matcher::new(&name, op, &value)?);
            p.ws();
            match p.peek() {
                Some(b',') => p.i += 1,
                Some(b'}') => {}
                _ => return Err(p.err("expected , or }")),
            }
        }
    }
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the selector"));
    }
    if metric.is_empty() && matchers.is_empty() {
        return Err("empty selector: give a metric name, label matchers, or both".into());
    }
    Ok(Selector { metric, matchers })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(c) if c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn ident(&mut self, colon: bool) -> String {
        let start = self.i;
        while matches!(self.peek(), Some(c) if c.is_ascii_alphanumeric() || c == b'_' || (colon && c == b':'))
        {
            self.i += 1;
        }
        self.text[start..self.i].to_string()
    }
    fn err(&self, what: &str) -> String {
        format!("bad selector {:?} at offset {}: {what}", self.text, self.i)
    }
    fn string(&mut self) -> Result<String, String> {
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'' | b'`')) => q,
            _ => return Err(self.err("expected a quoted value")),
        };
        self.i += 1;
        let mut out = String::new();
        let rest = &self.text[self.i..];
        let mut chars = rest.char_indices();
        while let Some((off, c)) = chars.next() {
            if c as u32 == quote as u32 {
                self.i += off + 1;
                return Ok(out);
            }
            if c == '\\' && quote != b'`' {
                match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, c)) => out.push(c),
                    None => break,
                }
            } else {
                out.push(c);
            }
        }
        self.i = self.s.len();
        Err(self.err("unterminated string"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_and_matches() {
        let s = parse(r#"node_load1{node="a", mount=~"/d.*",op!="READ",x!~"y"}"#).unwrap();
        assert_eq!(s.metric, "node_load1");
        assert_eq!(s.matchers.len(), 4);
        assert!(s.matches("node_load1", &labels(&[("node", "a"), ("mount", "/data")])));
        assert!(!s.matches("node_load1", &labels(&[("node", "a"), ("mount", "x/data")])));
        assert!(!s.matches("node_load5", &labels(&[("node", "a"), ("mount", "/data")])));
        assert!(!s.matches(
            "node_load1",
            &labels(&[("node", "a"), ("mount", "/d"), ("op", "READ")])
        ));
    }

    #[test]
    fn bare_name_and_bare_matchers() {
        assert!(parse("up").unwrap().matchers.is_empty());
        let s = parse(r#"{__name__=~"node_.*"}"#).unwrap();
        assert!(s.matches("node_x", &Labels::new()));
        assert!(!s.matches("vitals_x", &Labels::new()));
    }

    #[test]
    fn escapes_in_values() {
        let s = parse(r#"m{path="a\"b\\c"}"#).unwrap();
        assert_eq!(s.matchers[0].value, "a\"b\\c");
    }

    #[test]
    fn errors_are_clear() {
        for bad in [
            "",
            "m{",
            "m{a}",
            "m{a=b}",
            "m{a=\"b\"",
            "m{a=~\"(\"}",
            "1m",
            "m{a=\"b\"} x",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
