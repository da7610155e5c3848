//! SPL kstat files under `/proc/spl/kstat/zfs`.
//!
//! Named kstats (`arcstats`, `zil`, `objset-*`, ...):
//! ```text
//! 6 1 0x01 91 4368 5266997922 97951858082072      <- kid type flags ndata size crtime snaptime
//! name                            type data
//! hits                            4    8772612
//! dataset_name                    7    pool3/dataset with  space
//! ```
//! I/O kstats (per-pool `io`): a header line, a line of column names, a line
//! of values.

use crate::sources::ParseError;

/// One kstat value, typed as the kstat says (`KSTAT_DATA_*`).
#[derive(Debug, Clone, PartialEq)]
pub enum KValue<'a> {
    /// INT32, INT64, LONG (types 1, 3, 5).
    Int(i64),
    /// UINT32, UINT64, ULONG (types 2, 4, 6).
    Uint(u64),
    /// CHAR, STRING (types 0, 7): the rest of the line, spaces kept.
    Str(&'a str),
}

impl KValue<'_> {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            KValue::Int(v) => Some(*v as f64),
            KValue::Uint(v) => Some(*v as f64),
            KValue::Str(_) => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            KValue::Uint(v) => Some(*v),
            KValue::Int(v) => u64::try_from(*v).ok(),
            KValue::Str(_) => None,
        }
    }
}

/// Parses a named or I/O kstat into (name, value) pairs in file order.
/// Names are kept as written (`fm` has `erpt-dropped`); see `metric_name`.
/// Names and strings are borrowed from `text`.
pub fn parse_kstat(text: &str) -> Result<Vec<(&str, KValue<'_>)>, ParseError> {
    let mut lines = text.lines();
    let header = lines
        .next()
        .ok_or_else(|| ParseError::new(1, "empty kstat"))?;
    let h: Vec<&str> = header.split_whitespace().collect();
    if h.len() < 2 || h.iter().take(2).any(|f| f.parse::<u64>().is_err()) {
        return Err(ParseError::new(
            1,
            "kstat header must start with the kstat id and type",
        ));
    }
    let columns = lines
        .next()
        .ok_or_else(|| ParseError::new(2, "kstat without a column line"))?;
    let cols: Vec<&str> = columns.split_whitespace().collect();
    if cols == ["name", "type", "data"] {
        parse_named(lines)
    } else if h[1] == "3" {
        parse_io(&cols, lines)
    } else {
        Err(ParseError::new(
            2,
            format!("unknown kstat layout (type {}, columns {columns:?})", h[1]),
        ))
    }
}

fn parse_named<'a>(
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(&'a str, KValue<'a>)>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let n = i + 3;
        if line.trim().is_empty() {
            continue;
        }
        let (name, rest) = split_field(line);
        let (kind, data) = split_field(rest);
        if name.is_empty() || kind.is_empty() {
            return Err(ParseError::new(
                n,
                format!("need name, type and data: {line:?}"),
            ));
        }
        let value = match kind {
            "0" | "7" => KValue::Str(data.trim_end_matches(['\n', '\r'])),
            "1" | "3" | "5" => KValue::Int(data.trim().parse().map_err(|_| {
                ParseError::new(
                    n,
                    format!("{name}: {:?} is not a signed integer", data.trim()),
                )
            })?),
            "2" | "4" | "6" => KValue::Uint(data.trim().parse().map_err(|_| {
                ParseError::new(
                    n,
                    format!("{name}: {:?} is not an unsigned integer", data.trim()),
                )
            })?),
            other => {
                return Err(ParseError::new(
                    n,
                    format!("{name}: unknown kstat type {other}"),
                ));
            }
        };
        out.push((name, value));
    }
    Ok(out)
}

/// The first whitespace-separated field and the rest after the whitespace
/// that follows it.
fn split_field(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim_start()),
        None => (s, ""),
    }
}

fn parse_io<'a>(
    cols: &[&'a str],
    mut lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(&'a str, KValue<'a>)>, ParseError> {
    let values = lines
        .next()
        .ok_or_else(|| ParseError::new(3, "I/O kstat without a values line"))?;
    let values: Vec<&str> = values.split_whitespace().collect();
    if values.len() != cols.len() {
        return Err(ParseError::new(
            3,
            format!("{} values for {} columns", values.len(), cols.len()),
        ));
    }
    let mut out = Vec::with_capacity(cols.len());
    for (c, v) in cols.iter().zip(values) {
        let v = v
            .parse::<u64>()
            .map_err(|_| ParseError::new(3, format!("{c}: {v:?} is not an unsigned integer")))?;
        out.push((*c, KValue::Uint(v)));
    }
    Ok(out)
}

/// A kstat name as a metric name part: anything but `[A-Za-z0-9_]` becomes
/// `_` (node_exporter's `erpt-dropped` → `erpt_dropped`).
pub fn metric_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return std::borrow::Cow::Borrowed(name);
    }
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    clean.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names() {
        assert_eq!(metric_name("erpt-dropped"), "erpt_dropped");
        assert_eq!(metric_name("hits"), "hits");
        assert_eq!(metric_name("a.b c"), "a_b_c");
    }

    #[test]
    fn named_types_and_strings_with_spaces() {
        let text = "1 1 0x01 4 0 1 2\nname type data\nneg 3 -922337203685477580\nbig 4 18446744073709537686\nds 7 a/b with  space\nsmall 2 7\n";
        let k = parse_kstat(text).unwrap();
        assert_eq!(k[0], ("neg", KValue::Int(-922337203685477580)));
        assert_eq!(k[1].1.as_u64(), Some(18446744073709537686));
        assert_eq!(k[2].1, KValue::Str("a/b with  space"));
        assert_eq!(k[3].1, KValue::Uint(7));
    }

    #[test]
    fn io_layout() {
        let text = "12 3 0x00 1 80 1 2\nnread nwritten\n10 20\n";
        let k = parse_kstat(text).unwrap();
        assert_eq!(
            k,
            vec![("nread", KValue::Uint(10)), ("nwritten", KValue::Uint(20))]
        );
    }

    #[test]
    fn malformed() {
        for (text, line) in [
            ("", 1),
            ("x y\n", 1),
            ("1 1 0 0 0 0 0\n", 2),
            ("1 1 0 0 0 0 0\nname type data\nhits 4 lots\n", 3),
            ("1 1 0 0 0 0 0\nname type data\nhits 9 1\n", 3),
            ("1 1 0 0 0 0 0\nname type data\nhits\n", 3),
            ("1 3 0 0 0 0 0\na b\n1\n", 3),
            ("1 3 0 0 0 0 0\na b\n", 3),
            ("1 2 0 0 0 0 0\na b\n1 2\n", 2),
            ("1 1 0 0 0 0 0\nname type data\nhits 4 1 2\n", 3),
        ] {
            assert_eq!(parse_kstat(text).unwrap_err().line, line, "{text:?}");
        }
    }
}
