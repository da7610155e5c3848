//! Loading TOML config files with errors that name the file, line and key.
//!
//! Every config struct uses `#[serde(deny_unknown_fields)]`, so a misspelt
//! key is an error rather than a silently ignored setting.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A config file that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        key: Option<String>,
        message: String,
    },
    #[error("{path}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        key: Option<String>,
        message: String,
    },
}

impl ConfigError {
    /// A semantic error found after parsing (a value out of range, a missing file).
    pub fn invalid(path: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_path_buf(),
            key: Some(key.to_string()),
            message: message.into(),
        }
    }
}

impl ConfigError {
    /// This error with the line and column of its key in `text` (the
    /// file's contents), where [`locate`] finds it; otherwise unchanged.
    pub fn located(self, text: &str) -> Self {
        match self {
            ConfigError::Invalid {
                path,
                key: Some(key),
                message,
            } => match locate(text, &key) {
                Some((line, column)) => ConfigError::Parse {
                    path,
                    line,
                    column,
                    key: Some(key),
                    message,
                },
                None => ConfigError::Invalid {
                    path,
                    key: Some(key),
                    message,
                },
            },
            other => other,
        }
    }
}

/// The (line, column) in TOML `text` where the dotted `key` is set, with
/// array-of-tables indices as the checks name them
/// (`sources.mesh.peers[1].port`): the `key = ` line inside that table, else
/// the table's header. None when neither is there (a default value, or a
/// dotted or inline form this plain line scan does not follow).
pub fn locate(text: &str, key: &str) -> Option<(usize, usize)> {
    use std::collections::HashMap;
    // The table part and the last key ("" for top-level keys).
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) if !l.contains('[') => (t, Some(l)),
        Some(_) => (key, None),
        None if key.contains('[') => (key, None),
        None => ("", Some(key)),
    };
    // Arrays of tables seen so far, by their resolved path: the last index.
    let mut arrays: HashMap<String, usize> = HashMap::new();
    let resolve = |name: &str, arrays: &HashMap<String, usize>| -> String {
        // `a.b.c` inside the last `[[a.b]]` is `a.b[i].c`.
        let mut out = String::new();
        for p in name.split('.') {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(p.trim().trim_matches('"'));
            if let Some(i) = arrays.get(&out) {
                out = format!("{out}[{i}]");
            }
        }
        out
    };
    let mut current = String::new();
    let (mut key_header, mut table_header) = (None, None);
    for (n, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if let Some(inner) = l.strip_prefix("[[") {
            let name = inner.split("]]").next().unwrap_or("").trim();
            let resolved = resolve(name, &arrays);
            // `resolved` carries this array's previous index, if any.
            let base = match resolved.rsplit_once('[') {
                Some((b, _)) if resolved.ends_with(']') && arrays.contains_key(b) => b.to_string(),
                _ => resolved,
            };
            let i = arrays.get(&base).map_or(0, |i| i + 1);
            arrays.insert(base.clone(), i);
            current = format!("{base}[{i}]");
        } else if let Some(inner) = l.strip_prefix('[') {
            current = resolve(inner.split(']').next().unwrap_or("").trim(), &arrays);
        } else {
            let name = l.split('=').next().unwrap_or("").trim().trim_matches('"');
            if current == table && l.contains('=') && Some(name) == leaf {
                return Some((n + 1, raw.len() - raw.trim_start().len() + 1));
            }
            continue;
        }
        if current == key && key_header.is_none() {
            key_header = Some((n + 1, 1));
        }
        if current == table && table_header.is_none() {
            table_header = Some((n + 1, 1));
        }
    }
    key_header.or(table_header)
}

/// Reads and parses a TOML file into `T`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses TOML text (that came from `path`) into `T`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|err| {
        let offset = err.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let (line, column) = line_col(text, offset);
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            key: key_at(text, offset),
            message: err.message().trim().to_string(),
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// The dotted key (`table.key`) on the line that holds `offset`, if any.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if line.starts_with('[') {
        return Some(
            line.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let key = line.split('=').next()?.trim().trim_matches('"');
    if key.is_empty() || line == key {
        return table;
    }
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Deserializes durations written the human way: `"5s"`, `"250ms"`, `"1h 30m"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (write e.g. \"5s\", \"250ms\", \"2m\")"
            ))
        })
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// [`duration`] for an optional key: absent (or not written) is `None`.
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        humantime::parse_duration(&text).map(Some).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (write e.g. \"5s\", \"250ms\", \"2m\")"
            ))
        })
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        name: String,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        #[serde(default, with = "duration")]
        every: std::time::Duration,
    }

    fn err_of(text: &str) -> String {
        match parse::<Demo>(Path::new("demo.toml"), text) {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn keys_are_located_with_their_table_indices() {
        let text = "collector = \"x\"\n[sources.mesh]\ncount = 5\n[[sources.mesh.peers]]\nname = \"a\"\n[[sources.mesh.peers]]\nname = \"b\"\n  port = 0\nlabels = { peer = \"x\" }\n[[sources.probe.endpoints]]\nname = \"m\"\n[[sources.probe.endpoints.golden]]\nid = \"g0\"\n[[sources.probe.endpoints.golden]]\nid = \"g1\"\n[net_test]\nlisten = \"x\"\n";
        let at = |k: &str| locate(text, k);
        assert_eq!(at("collector"), Some((1, 1)));
        assert_eq!(at("sources.mesh.count"), Some((3, 1)));
        assert_eq!(at("sources.mesh.peers[1].port"), Some((8, 3)));
        assert_eq!(at("sources.mesh.peers[1].labels"), Some((9, 1)));
        assert_eq!(at("sources.mesh.peers[0].name"), Some((5, 1)));
        // Not set: the table's header.
        assert_eq!(at("sources.mesh.peers[0].port"), Some((4, 1)));
        assert_eq!(at("sources.mesh.interval"), Some((2, 1)));
        assert_eq!(at("sources.probe.endpoints[0].golden[1].id"), Some((15, 1)));
        assert_eq!(at("net_test.listen"), Some((17, 1)));
        assert_eq!(at("sources.kmsg.max_lines"), None);
        let e = ConfigError::invalid(Path::new("agent.toml"), "sources.mesh.peers[1].port", "bad")
            .located(text);
        assert_eq!(
            e.to_string(),
            "agent.toml:8:3: key `sources.mesh.peers[1].port`: bad"
        );
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err_of("name = \"a\"\n\n[inner]\nevry = \"5s\"\n");
        assert!(e.starts_with("demo.toml:4:1: key `inner.evry`:"), "{e}");
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn bad_value_names_key() {
        let e = err_of("name = \"a\"\n[inner]\nevery = \"soon\"\n");
        assert!(e.starts_with("demo.toml:3:"), "{e}");
        assert!(e.contains("key `inner.every`"), "{e}");
        assert!(e.contains("invalid duration"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err_of("name = 5\n");
        assert!(e.starts_with("demo.toml:1:"), "{e}");
        assert!(e.contains("key `name`"), "{e}");
    }

    #[test]
    fn good_config_parses() {
        let d: Demo = parse(Path::new("x"), "name = \"a\"\n[inner]\nevery = \"250ms\"\n").unwrap();
        assert_eq!(d.inner.every, std::time::Duration::from_millis(250));
    }
}
