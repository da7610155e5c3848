//! `/proc/net/dev`: per-device receive and transmit counters.

use std::sync::Arc;

use crate::sources::ParseError;
use crate::sources::util::parse_u64;

/// One device's line: the counters in header order.
#[derive(Debug, Clone, PartialEq)]
pub struct NetDev {
    pub device: String,
    /// (field, value), fields as `receive_bytes`, `transmit_colls`, ...
    /// (shared by every device of the file).
    pub counters: Vec<(Arc<str>, u64)>,
}

impl NetDev {
    pub fn get(&self, field: &str) -> Option<u64> {
        self.counters
            .iter()
            .find(|(f, _)| &**f == field)
            .map(|(_, v)| *v)
    }
}

/// Parses the whole file. Field names come from the second header line
/// (`face |bytes packets ...|bytes packets ...`), so a kernel that adds a
/// column is read correctly; each device line must have one value per field.
/// The device name is everything before the last `:` (names such as
/// `ibr10:30` contain colons; the counters never do).
pub fn parse_net_dev(text: &str) -> Result<Vec<NetDev>, ParseError> {
    let mut lines = text.lines().enumerate();
    let header_ok = lines.next().is_some_and(|(_, l)| l.contains('|'));
    let fields = match lines.next() {
        Some((_, l)) if header_ok => header_fields(l)?,
        _ => {
            return Err(ParseError::new(
                1,
                "missing the two header lines (Inter-| Receive | Transmit)",
            ));
        }
    };
    let mut out = Vec::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (name, values) = line
            .rsplit_once(':')
            .ok_or_else(|| ParseError::new(n, "no ':' after the device name"))?;
        let device = name.trim();
        if device.is_empty() {
            return Err(ParseError::new(n, "empty device name"));
        }
        let values: Vec<&str> = values.split_whitespace().collect();
        if values.len() != fields.len() {
            return Err(ParseError::new(
                n,
                format!(
                    "{device}: {} values for {} header fields",
                    values.len(),
                    fields.len()
                ),
            ));
        }
        let mut counters = Vec::with_capacity(fields.len());
        for (field, v) in fields.iter().zip(values) {
            counters.push((Arc::clone(field), parse_u64(v, n, field)?));
        }
        out.push(NetDev {
            device: device.to_string(),
            counters,
        });
    }
    Ok(out)
}

fn header_fields(line: &str) -> Result<Vec<Arc<str>>, ParseError> {
    let parts: Vec<&str> = line.split('|').collect();
    if parts.len() != 3 {
        return Err(ParseError::new(
            2,
            "header must have three '|'-separated parts (face, receive, transmit)",
        ));
    }
    let mut fields = Vec::new();
    for (prefix, part) in [("receive", parts[1]), ("transmit", parts[2])] {
        for name in part.split_whitespace() {
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ParseError::new(2, format!("odd header field {name:?}")));
            }
            fields.push(format!("{prefix}_{name}").into());
        }
    }
    if fields.is_empty() {
        return Err(ParseError::new(2, "no header fields"));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n";

    #[test]
    fn names_with_colons_and_big_counters() {
        let text = format!(
            "{HEADER}ibr10:30: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n  eth0:18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        );
        let devs = parse_net_dev(&text).unwrap();
        assert_eq!(devs.len(), 2);
        assert_eq!(devs[0].device, "ibr10:30");
        assert_eq!(devs[0].get("receive_bytes"), Some(1));
        assert_eq!(devs[0].get("receive_multicast"), Some(8));
        assert_eq!(devs[0].get("transmit_colls"), Some(14));
        assert_eq!(devs[0].get("transmit_compressed"), Some(16));
        assert_eq!(devs[1].get("receive_bytes"), Some(u64::MAX));
    }

    #[test]
    fn malformed_input_is_an_error_with_its_line() {
        for (text, line) in [
            (String::new(), 1),
            ("garbage\n".to_string(), 1),
            (format!("{HEADER}eth0 1 2 3\n"), 3),
            (format!("{HEADER}eth0: 1 2 3\n"), 3),
            (
                format!("{HEADER}eth0: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n"),
                3,
            ),
            (
                format!("{HEADER}  : 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"),
                3,
            ),
        ] {
            let err = parse_net_dev(&text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }
}
