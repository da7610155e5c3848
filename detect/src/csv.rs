//! NAB-format CSV files: read `timestamp,value` rows, score them with one
//! [`Detector`](crate::Detector) per file, write `timestamp,value,anomaly_score`.
//!
//! Parsing is pure (`parse`, `render`); the file shell around it writes to a
//! temporary file beside the target and renames it, so a failed run leaves
//! no half-written output behind.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::{Detector, Params};

/// Why a CSV file could not be read, scored or written.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: no .csv files under it")]
    NoFiles { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CsvError + '_ {
    move |source| CsvError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One data row: the text as read (echoed unchanged on output) and its
/// parsed form.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub timestamp: String,
    pub value_text: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// Parses a CSV text with a header naming `timestamp` and `value` columns
/// (others are ignored). Blank lines are skipped; CRLF and a UTF-8 BOM are
/// accepted. `nan`, `inf` and `-inf` are values (the detector skips them);
/// anything else that is not a number is an error naming the line.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Row>, CsvError> {
    let bad = |line: usize, message: String| CsvError::Malformed {
        path: path.to_path_buf(),
        line,
        message,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((hline, header)) = lines.next() else {
        return Err(bad(
            1,
            "empty file: expected a header 'timestamp,value'".into(),
        ));
    };
    let names: Vec<&str> = header.split(',').map(unquote).collect();
    let col = |name: &str| {
        names.iter().position(|n| *n == name).ok_or_else(|| {
            bad(
                hline,
                format!(
                    "header has no '{name}' column (columns: {})",
                    names.join(", ")
                ),
            )
        })
    };
    let (tcol, vcol) = (col("timestamp")?, col("value")?);
    let need = tcol.max(vcol) + 1;
    let mut rows = Vec::new();
    for (line, l) in lines {
        let fields: Vec<&str> = l.split(',').map(unquote).collect();
        if fields.len() < need {
            return Err(bad(
                line,
                format!("expected at least {need} columns, found {}", fields.len()),
            ));
        }
        let (t, v) = (fields[tcol], fields[vcol]);
        let ts_ms = parse_timestamp(t).ok_or_else(|| {
            bad(
                line,
                format!(
                    "bad timestamp '{t}' (expected YYYY-MM-DD HH:MM:SS[.frac], RFC 3339 or Unix seconds)"
                ),
            )
        })?;
        let value: f64 = v
            .parse()
            .map_err(|_| bad(line, format!("bad value '{v}' (expected a number)")))?;
        rows.push(Row {
            timestamp: t.to_string(),
            value_text: v.to_string(),
            ts_ms,
            value,
        });
    }
    Ok(rows)
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
}

/// Milliseconds since the Unix epoch of `YYYY-MM-DD[( |T)HH:MM[:SS[.frac]]][Z]`
/// (UTC) or of an integer number of Unix seconds.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<i64>().ok()?.checked_mul(1000);
    }
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = match s.find([' ', 'T']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut ms = days_from_civil(y, m, day) * 86_400_000;
    if let Some(time) = time {
        let (hms, frac) = match time.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (time, None),
        };
        let mut p = hms.split(':');
        let h: i64 = p.next()?.parse().ok()?;
        let mi: i64 = p.next()?.parse().ok()?;
        let sec: i64 = p.next().map_or(Some(0), |x| x.parse().ok())?;
        if p.next().is_some() || h > 23 || mi > 59 || sec > 60 {
            return None;
        }
        ms += (h * 3600 + mi * 60 + sec) * 1000;
        if let Some(frac) = frac {
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let digits: String = frac.chars().chain("000".chars()).take(3).collect();
            ms += digits.parse::<i64>().ok()?;
        }
    }
    Some(ms)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Runs one fresh detector over the rows, in order.
pub fn score_rows(rows: &[Row], params: &Params) -> Vec<f64> {
    let mut det = Detector::new(params);
    rows.iter().map(|r| det.score(r.ts_ms, r.value)).collect()
}

/// `timestamp,value,anomaly_score` text, timestamps and values as read.
pub fn render(rows: &[Row], scores: &[f64]) -> String {
    let mut out = String::with_capacity(rows.len() * 48 + 32);
    out.push_str("timestamp,value,anomaly_score\n");
    for (r, s) in rows.iter().zip(scores) {
        let _ = writeln!(out, "{},{},{}", r.timestamp, r.value_text, s);
    }
    out
}

fn read_and_score(input: &Path, params: &Params) -> Result<String, CsvError> {
    let text = fs::read_to_string(input).map_err(io_err(input))?;
    let rows = parse(&text, input)?;
    Ok(render(&rows, &score_rows(&rows, params)))
}

fn temp_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    target.with_file_name(name)
}

/// Writes `text` to a temporary file beside `target`; the caller renames it.
fn write_temp(target: &Path, text: &str) -> Result<PathBuf, CsvError> {
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = temp_path(target);
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    Ok(tmp)
}

/// Scores one file; writes `output` atomically, or returns the text when
/// `output` is `None`. Returns the number of rows and the text if asked.
pub fn detect_file(
    input: &Path,
    output: Option<&Path>,
    params: &Params,
) -> Result<String, CsvError> {
    let text = read_and_score(input, params)?;
    if let Some(out) = output {
        let tmp = write_temp(out, &text)?;
        fs::rename(&tmp, out).map_err(io_err(out))?;
    }
    Ok(text)
}

/// Every `*.csv` under `dir`, as paths relative to it, sorted.
pub fn csv_files(dir: &Path) -> Result<Vec<PathBuf>, CsvError> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), CsvError> {
        let here = root.join(rel);
        for entry in fs::read_dir(&here).map_err(io_err(&here))? {
            let entry = entry.map_err(io_err(&here))?;
            let name = rel.join(entry.file_name());
            let ty = entry.file_type().map_err(io_err(&root.join(&name)))?;
            if ty.is_dir() {
                walk(root, &name, out)?;
            } else if name.extension().is_some_and(|e| e == "csv") {
                out.push(name);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out)?;
    out.sort();
    Ok(out)
}

/// Scores every `*.csv` under `data` into the same relative path under
/// `out` (the layout NAB's scorer expects). All files are scored into
/// temporary files first; only when every one succeeded are they renamed
/// into place, so an error leaves `out` as it was. Returns the relative
/// paths written.
pub fn detect_dir(data: &Path, out: &Path, params: &Params) -> Result<Vec<PathBuf>, CsvError> {
    let files = csv_files(data)?;
    if files.is_empty() {
        return Err(CsvError::NoFiles {
            path: data.to_path_buf(),
        });
    }
    let mut temps: Vec<(PathBuf, PathBuf)> = Vec::with_capacity(files.len());
    let cleanup = |temps: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in temps {
            let _ = fs::remove_file(tmp);
        }
    };
    for rel in &files {
        let target = out.join(rel);
        match read_and_score(&data.join(rel), params).and_then(|t| write_temp(&target, &t)) {
            Ok(tmp) => temps.push((tmp, target)),
            Err(e) => {
                cleanup(&temps);
                return Err(e);
            }
        }
    }
    for (i, (tmp, target)) in temps.iter().enumerate() {
        if let Err(e) = fs::rename(tmp, target) {
            cleanup(&temps[i..]);
            return Err(io_err(target)(e));
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("t.csv")
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("1970-01-02"), Some(86_400_000));
        assert_eq!(
            parse_timestamp("2014-04-01 00:05:00"),
            Some(1_396_310_700_000)
        );
        assert_eq!(
            parse_timestamp("2014-04-01T00:05:00.250Z"),
            Some(1_396_310_700_250)
        );
        assert_eq!(
            parse_timestamp("2011-07-01 00:00:01.000000"),
            Some(1_309_478_401_000)
        );
        assert_eq!(parse_timestamp("1396310700"), Some(1_396_310_700_000));
        for bad in [
            "",
            "2014-13-01",
            "2014-04-01 25:00:00",
            "yesterday",
            "2014-04-01 00:00:00.",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_nab_rows_with_crlf_and_extra_columns() {
        let text = "\u{feff}timestamp,value,label\r\n2014-04-01 00:00:00,20.5,0\r\n\r\n2014-04-01 00:05:00,nan,1\r\n";
        let rows = parse(text, p()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].timestamp, "2014-04-01 00:00:00");
        assert_eq!(rows[0].value, 20.5);
        assert_eq!(rows[1].ts_ms - rows[0].ts_ms, 300_000);
        assert!(rows[1].value.is_nan());
        let out = render(&rows, &[0.0, 0.25]);
        assert_eq!(
            out,
            "timestamp,value,anomaly_score\n2014-04-01 00:00:00,20.5,0\n2014-04-01 00:05:00,nan,0.25\n"
        );
    }

    #[test]
    fn malformed_rows_name_the_line() {
        let cases = [
            ("", 1, "empty file"),
            ("time,value\n", 1, "no 'timestamp' column"),
            (
                "timestamp,value\n2014-04-01 00:00:00,1\n2014-04-01 00:05:00,x\n",
                3,
                "bad value 'x'",
            ),
            (
                "timestamp,value\n\n2014-04-01 00:00:00\n",
                3,
                "at least 2 columns",
            ),
            ("timestamp,value\nnoon,1\n", 2, "bad timestamp 'noon'"),
        ];
        for (text, line, what) in cases {
            match parse(text, p()) {
                Err(CsvError::Malformed {
                    line: l, message, ..
                }) => {
                    assert_eq!(l, line, "{text:?}");
                    assert!(message.contains(what), "{message} / {what}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn dir_mirrors_paths_and_writes_nothing_on_error() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let out = tmp.path().join("out");
        fs::create_dir_all(data.join("a")).unwrap();
        let good: String = std::iter::once("timestamp,value\n".to_string())
            .chain((0..50).map(|i| format!("2014-04-01 00:{:02}:00,{}\n", i, i % 3)))
            .collect();
        fs::write(data.join("a/x.csv"), &good).unwrap();
        fs::write(data.join("y.csv"), &good).unwrap();
        fs::write(data.join("notes.txt"), "ignored").unwrap();

        let written = detect_dir(&data, &out, &Params::default()).unwrap();
        assert_eq!(
            written,
            vec![PathBuf::from("a/x.csv"), PathBuf::from("y.csv")]
        );
        let text = fs::read_to_string(out.join("a/x.csv")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 51);
        assert_eq!(lines[0], "timestamp,value,anomaly_score");
        assert!(lines[1].starts_with("2014-04-01 00:00:00,0,"));

        // A malformed second file: the first is not replaced, nothing new appears.
        fs::write(
            data.join("y.csv"),
            "timestamp,value\n2014-04-01 00:00:00,oops\n",
        )
        .unwrap();
        fs::write(data.join("a/z.csv"), &good).unwrap();
        let before = fs::read_to_string(out.join("a/x.csv")).unwrap();
        fs::write(out.join("a/x.csv"), "old").unwrap();
        let err = detect_dir(&data, &out, &Params::default()).unwrap_err();
        assert!(
            err.to_string().contains("y.csv:2: bad value 'oops'"),
            "{err}"
        );
        assert_eq!(fs::read_to_string(out.join("a/x.csv")).unwrap(), "old");
        assert!(!out.join("a/z.csv").exists());
        let leftovers: Vec<_> = fs::read_dir(out.join("a")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files removed");
        assert_ne!(before, "old");
    }
}
