//! Output of `zpool list`, `zpool status` and `zfs list -t snapshot`.
//!
//! OpenZFS 2.x is asked for exact numbers (`-p`); older implementations
//! (zfs-fuse, pool version 23) have no `-p` and print sizes such as `1.63M`
//! and counts such as `1.2K`, which are read too (1024-based, as zpool
//! prints them).

use crate::sources::ParseError;

/// Columns asked of `zpool list -Hp -o ...` (OpenZFS).
pub const LIST_COLUMNS: &[&str] = &[
    "name",
    "size",
    "allocated",
    "free",
    "fragmentation",
    "capacity",
    "dedupratio",
    "health",
];

/// Columns asked of `zpool list -H -o ...` where `-p` and `fragmentation`
/// do not exist (zfs-fuse).
pub const LIST_COLUMNS_LEGACY: &[&str] = &[
    "name",
    "size",
    "allocated",
    "free",
    "capacity",
    "dedupratio",
    "health",
];

/// One row of `zpool list`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoolRow {
    pub name: String,
    pub size_bytes: Option<f64>,
    pub allocated_bytes: Option<f64>,
    pub free_bytes: Option<f64>,
    /// 0..1 (zpool prints a percentage).
    pub fragmentation: Option<f64>,
    /// 0..1 (zpool prints a percentage).
    pub capacity: Option<f64>,
    pub dedup_ratio: Option<f64>,
    pub health: String,
}

/// A size or count: exact (`123456`), with a 1024-based suffix (`1.63M`,
/// `1.2K`, `512B`), or `-` (none).
pub fn parse_number(field: &str) -> Option<Option<f64>> {
    let f = field.trim();
    if f == "-" || f.is_empty() {
        return Some(None);
    }
    let (num, mult) = match f.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let exp = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 1,
                'M' => 2,
                'G' => 3,
                'T' => 4,
                'P' => 5,
                'E' => 6,
                'Z' => 7,
                _ => return None,
            };
            (&f[..i], 1024f64.powi(exp))
        }
        _ => (f, 1.0),
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(Some(v * mult))
}

/// A percentage (`12`, `12%`, `-`) as a ratio.
fn parse_percent(field: &str) -> Option<Option<f64>> {
    let f = field.trim().trim_end_matches('%');
    if f == "-" {
        return Some(None);
    }
    let v: f64 = f.parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(Some(v / 100.0))
}

/// Parses `zpool list -H` output whose columns are `columns`.
pub fn parse_zpool_list(text: &str, columns: &[&str]) -> Result<Vec<PoolRow>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != columns.len() {
            return Err(ParseError::new(
                n,
                format!(
                    "{} tab-separated fields, expected {}",
                    fields.len(),
                    columns.len()
                ),
            ));
        }
        let mut row = PoolRow::default();
        for (col, field) in columns.iter().zip(fields) {
            let bad = || ParseError::new(n, format!("{col}: {field:?} is not a number"));
            match *col {
                "name" => row.name = field.to_string(),
                "health" => row.health = field.trim().to_string(),
                "size" => row.size_bytes = parse_number(field).ok_or_else(bad)?,
                "allocated" => row.allocated_bytes = parse_number(field).ok_or_else(bad)?,
                "free" => row.free_bytes = parse_number(field).ok_or_else(bad)?,
                "fragmentation" => row.fragmentation = parse_percent(field).ok_or_else(bad)?,
                "capacity" => row.capacity = parse_percent(field).ok_or_else(bad)?,
                "dedupratio" => {
                    row.dedup_ratio =
                        parse_number(field.trim().trim_end_matches('x')).ok_or_else(bad)?
                }
                _ => {}
            }
        }
        if row.name.is_empty() {
            return Err(ParseError::new(n, "empty pool name"));
        }
        out.push(row);
    }
    Ok(out)
}

/// What a vdev is for.
pub const CLASSES: &[(&str, &str)] = &[
    ("logs", "log"),
    ("cache", "cache"),
    ("spares", "spare"),
    ("special", "special"),
    ("dedup", "dedup"),
];

/// One line of the `config:` tree (the pool itself is depth 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Vdev {
    pub name: String,
    /// data, log, cache, spare, special or dedup.
    pub class: &'static str,
    pub depth: usize,
    pub state: String,
    pub read_errors: Option<f64>,
    pub write_errors: Option<f64>,
    pub checksum_errors: Option<f64>,
    /// Whatever follows the counters (`(resilvering)`, `was /dev/sdc`, ...).
    pub note: String,
}

/// The `scan:` (or, on old implementations, `scrub:`) paragraph.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    /// scrub, resilver, or none.
    pub function: &'static str,
    /// none, in_progress, paused, finished, canceled or unknown.
    pub state: &'static str,
    /// Done so far, 0..1, while in progress or paused.
    pub progress: Option<f64>,
    /// Bytes repaired (scrub) or resilvered (resilver), so far or in total.
    pub repaired_bytes: Option<f64>,
    /// Errors found by a finished scan.
    pub errors: Option<f64>,
}

/// One pool of `zpool status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolStatus {
    pub name: String,
    pub state: String,
    pub scan: Option<Scan>,
    pub vdevs: Vec<Vdev>,
    /// From `errors:` — 0 for "No known data errors".
    pub data_errors: Option<f64>,
}

/// Parses `zpool status [-p]` for every pool in it. "no pools available"
/// is an empty list.
pub fn parse_zpool_status(text: &str) -> Result<Vec<PoolStatus>, ParseError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut pools: Vec<PoolStatus> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let n = i + 1;
        let Some((key, value)) = key_value(line) else {
            i += 1;
            continue;
        };
        match key {
            "pool" => {
                pools.push(PoolStatus {
                    name: value.to_string(),
                    state: String::new(),
                    scan: None,
                    vdevs: Vec::new(),
                    data_errors: None,
                });
                i += 1;
            }
            _ if pools.is_empty() => {
                return Err(ParseError::new(n, format!("{key}: before any pool: line")));
            }
            "state" => {
                if let Some(p) = pools.last_mut() {
                    p.state = value.to_string();
                }
                i += 1;
            }
            "scan" | "scrub" => {
                // The paragraph goes on over indented lines without a key.
                let mut text = value.to_string();
                i += 1;
                while i < lines.len()
                    && key_value(lines[i]).is_none()
                    && !lines[i].trim().is_empty()
                {
                    text.push(' ');
                    text.push_str(lines[i].trim());
                    i += 1;
                }
                if let Some(p) = pools.last_mut() {
                    p.scan = Some(parse_scan(&text));
                }
            }
            "config" => {
                let (vdevs, next) = parse_config(&lines, i + 1)?;
                if let Some(p) = pools.last_mut() {
                    p.vdevs = vdevs;
                }
                i = next;
            }
            "errors" => {
                let v = if value.starts_with("No known data errors") {
                    Some(0.0)
                } else {
                    value
                        .split_whitespace()
                        .next()
                        .and_then(|c| parse_number(c).flatten())
                };
                if let Some(p) = pools.last_mut() {
                    p.data_errors = v;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    for p in &pools {
        if p.state.is_empty() {
            return Err(ParseError::new(
                1,
                format!("pool {}: no state: line", p.name),
            ));
        }
    }
    Ok(pools)
}

/// ` state: ONLINE` → ("state", "ONLINE"); only the paragraph keys zpool
/// prints (an indented vdev line is never one).
fn key_value(line: &str) -> Option<(&str, &str)> {
    const KEYS: &[&str] = &[
        "pool",
        "id",
        "state",
        "status",
        "action",
        "see",
        "scan",
        "scrub",
        "remove",
        "checkpoint",
        "config",
        "errors",
        "prune",
        "expand",
    ];
    let t = line.trim_start();
    let (key, value) = t.split_once(':')?;
    if !KEYS.contains(&key) {
        return None;
    }
    // "config:" stands alone; other keys are followed by a space.
    if !(value.is_empty() || value.starts_with(' ') || value.starts_with('\t')) {
        return None;
    }
    Some((key, value.trim()))
}

/// Reads the vdev tree after `config:`; returns it and the index of the
/// first line after it.
fn parse_config(lines: &[&str], start: usize) -> Result<(Vec<Vdev>, usize), ParseError> {
    let mut i = start;
    while i < lines.len() && lines[i].trim().is_empty() {
        i += 1;
    }
    let Some(header) = lines.get(i) else {
        return Ok((Vec::new(), i));
    };
    let h: Vec<&str> = header.split_whitespace().collect();
    if h.first() != Some(&"NAME") || h.get(1) != Some(&"STATE") {
        return Err(ParseError::new(
            i + 1,
            "config: without a NAME STATE header",
        ));
    }
    let base = indent(header);
    i += 1;
    let mut vdevs = Vec::new();
    let mut class: &'static str = "data";
    while i < lines.len() {
        let line = lines[i];
        let n = i + 1;
        if line.trim().is_empty() {
            break;
        }
        let depth = indent(line).saturating_sub(base) / 2;
        let f: Vec<&str> = line.split_whitespace().collect();
        if depth == 0
            && f.len() == 1
            && let Some((_, c)) = CLASSES.iter().find(|(h, _)| *h == f[0])
        {
            class = c;
            i += 1;
            continue;
        }
        if f.len() < 2 {
            return Err(ParseError::new(
                n,
                format!("vdev line without a state: {line:?}"),
            ));
        }
        let count = |k: usize| -> Result<Option<f64>, ParseError> {
            match f.get(k) {
                None => Ok(None),
                Some(c) => parse_number(c)
                    .flatten()
                    .map(Some)
                    .ok_or_else(|| ParseError::new(n, format!("{:?} is not an error count", c))),
            }
        };
        // Spares print a state and no counters ("AVAIL", "INUSE  currently in use").
        let has_counts = f.len() >= 5 && parse_number(f[2]).flatten().is_some();
        let (read_errors, write_errors, checksum_errors, note_from) = if has_counts {
            (count(2)?, count(3)?, count(4)?, 5)
        } else {
            (None, None, None, 2)
        };
        vdevs.push(Vdev {
            name: f[0].to_string(),
            class: if depth == 0 { "pool" } else { class },
            depth,
            state: f[1].to_string(),
            read_errors,
            write_errors,
            checksum_errors,
            note: f[note_from.min(f.len())..].join(" "),
        });
        i += 1;
    }
    Ok((vdevs, i))
}

/// Leading whitespace width; a tab counts as 8 (zpool indents with one tab
/// and then spaces, two per level).
fn indent(line: &str) -> usize {
    let mut w = 0;
    for c in line.chars() {
        match c {
            ' ' => w += 1,
            '\t' => w += 8,
            _ => break,
        }
    }
    w
}

/// The scan paragraph, continuation lines joined with spaces.
pub fn parse_scan(text: &str) -> Scan {
    let t = text.trim();
    let mut scan = Scan {
        function: "none",
        state: "unknown",
        progress: None,
        repaired_bytes: None,
        errors: None,
    };
    let words: Vec<&str> = t.split_whitespace().collect();
    if t.starts_with("none requested") {
        scan.state = "none";
        return scan;
    }
    scan.function = if t.starts_with("scrub") {
        "scrub"
    } else if t.starts_with("resilver") {
        "resilver"
    } else {
        "none"
    };
    scan.state = if t.contains(" in progress ") {
        "in_progress"
    } else if t.contains(" paused ") {
        "paused"
    } else if t.contains(" canceled ") {
        "canceled"
    } else if t.starts_with("scrub repaired")
        || t.starts_with("resilvered")
        || t.contains(" completed after ")
    {
        "finished"
    } else {
        "unknown"
    };
    // "... 39.40% done ..."
    scan.progress = words
        .windows(2)
        .find(|w| w[1].starts_with("done"))
        .and_then(|w| w[0].strip_suffix('%'))
        .and_then(|p| p.parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p >= 0.0)
        .map(|p| p / 100.0);
    // Finished: "scrub repaired 0B in ..." / "resilvered 1.03T in ...";
    // in progress: "... 0B repaired, ..." / "... 320G resilvered, ...".
    scan.repaired_bytes = words.windows(2).find_map(|w| match w {
        [a, b] if (*a == "repaired" || *a == "resilvered") && !b.starts_with('(') => {
            parse_number(b).flatten()
        }
        [a, b] if b.starts_with("repaired,") || b.starts_with("resilvered,") => {
            parse_number(a).flatten()
        }
        _ => None,
    });
    // "... with 2 errors on ..."
    if scan.state == "finished" {
        scan.errors = words
            .windows(3)
            .find(|w| w[0] == "with" && w[2].starts_with("error"))
            .and_then(|w| parse_number(w[1]).flatten());
    }
    scan
}

/// `zfs list -Hp -t snapshot -o name,creation`: (dataset, snapshot count,
/// newest creation time in Unix seconds), sorted by dataset.
pub fn parse_snapshots(text: &str) -> Result<Vec<(String, u64, u64)>, ParseError> {
    snapshots_by(
        text,
        |c| c.trim().parse().ok(),
        "Unix seconds (was -p given?)",
    )
}

/// `zfs list -H -t snapshot -o name,creation` of a `zfs` without `-p`
/// (zfs-fuse): the creation is a date such as `Sun Nov 29 20:54 2026`
/// (`%a %b %e %k:%M %Y`, so to the minute only) in the time zone `zfs`
/// ran in. The source runs it with `TZ=UTC`, so it is read as UTC here;
/// the newest snapshot's time and age are then exact to the minute (a
/// snapshot taken at 20:54:59 reads as 20:54:00).
pub fn parse_snapshots_dated(text: &str) -> Result<Vec<(String, u64, u64)>, ParseError> {
    snapshots_by(
        text,
        parse_date_utc,
        "a date like \"Sun Nov 29 20:54 2026\"",
    )
}

fn snapshots_by(
    text: &str,
    creation_of: impl Fn(&str) -> Option<u64>,
    expected: &str,
) -> Result<Vec<(String, u64, u64)>, ParseError> {
    let mut by_dataset: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let (name, creation) = line
            .split_once('\t')
            .ok_or_else(|| ParseError::new(n, "expected name<TAB>creation"))?;
        let (dataset, _) = name
            .split_once('@')
            .ok_or_else(|| ParseError::new(n, format!("{name:?} is not a snapshot name")))?;
        let created = creation_of(creation).ok_or_else(|| {
            ParseError::new(n, format!("creation {creation:?} is not {expected}"))
        })?;
        let e = by_dataset.entry(dataset.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(created);
    }
    Ok(by_dataset
        .into_iter()
        .map(|(d, (count, newest))| (d, count, newest))
        .collect())
}

/// `Sun Nov 29 20:54 2026` (weekday, month, day, hour:minute, year; days
/// and hours may be space-padded) read as UTC, in Unix seconds. `None` for
/// anything else, including a weekday that does not go with the date.
pub fn parse_date_utc(text: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let f: Vec<&str> = text.split_whitespace().collect();
    let [weekday, month, day, time, year] = f[..] else {
        return None;
    };
    let month = MONTHS.iter().position(|m| *m == month)? as u32 + 1;
    let day: u32 = day.parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let (hour, minute) = time.split_once(':')?;
    let (hour, minute): (u64, u64) = (hour.parse().ok()?, minute.parse().ok()?);
    if !(1..=days_in_month(year, month)).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let days = u64::try_from(days_from_civil(year, month, day)).ok()?;
    // 1970-01-01 was a Thursday.
    if WEEKDAYS[(days % 7) as usize] != weekday {
        return None;
    }
    Some(days * 86_400 + hour * 3600 + minute * 60)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar
/// (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_exact_and_human() {
        assert_eq!(parse_number("123456"), Some(Some(123456.0)));
        assert_eq!(parse_number("1.5K"), Some(Some(1536.0)));
        assert_eq!(parse_number("492M"), Some(Some(492.0 * 1048576.0)));
        assert_eq!(parse_number("0B"), Some(Some(0.0)));
        assert_eq!(parse_number("-"), Some(None));
        assert_eq!(parse_number("1.2Q"), None);
        assert_eq!(parse_number("x"), None);
        assert_eq!(parse_number("-5"), None);
    }

    #[test]
    fn scan_paragraphs() {
        let s =
            parse_scan("scrub repaired 0B in 04:12:33 with 2 errors on Sun Aug  3 04:12:33 2025");
        assert_eq!((s.function, s.state), ("scrub", "finished"));
        assert_eq!((s.repaired_bytes, s.errors), (Some(0.0), Some(2.0)));
        let s = parse_scan(
            "resilver in progress since Thu May 22 09:24:20 2025 6.25T / 34.4T scanned at 3.44G/s, 3.66T / 34.4T issued at 2.01G/s 807G resilvered, 10.66% done, 04:20:07 to go",
        );
        assert_eq!((s.function, s.state), ("resilver", "in_progress"));
        assert_eq!(s.progress, Some(0.1066));
        assert_eq!(s.repaired_bytes, Some(807.0 * 1024f64.powi(3)));
        assert_eq!(s.errors, None);
        let s = parse_scan("none requested");
        assert_eq!((s.function, s.state), ("none", "none"));
        let s = parse_scan("scrub canceled on Mon Aug 11 09:00:00 2025");
        assert_eq!((s.function, s.state), ("scrub", "canceled"));
        let s =
            parse_scan("resilvered 1.03T in 04:08:00 with 0 errors on Sat Jan 12 15:38:26 2019");
        assert_eq!(
            (s.function, s.state, s.errors),
            ("resilver", "finished", Some(0.0))
        );
        // zfs-fuse / pool version 23 wording.
        let s = parse_scan("scrub completed after 0h0m with 0 errors on Sun Nov 29 15:54:01 2026");
        assert_eq!(
            (s.function, s.state, s.errors),
            ("scrub", "finished", Some(0.0))
        );
        let s = parse_scan("scrub in progress for 0h0m, 12.50% done, 0h1m to go");
        assert_eq!((s.state, s.progress), ("in_progress", Some(0.125)));
        let s = parse_scan("something new");
        assert_eq!(s.state, "unknown");
    }

    #[test]
    fn snapshots_newest_per_dataset() {
        let text = "tank/a@1\t100\ntank/a@2\t300\ntank/b c@x\t200\n";
        assert_eq!(
            parse_snapshots(text).unwrap(),
            vec![("tank/a".into(), 2, 300), ("tank/b c".into(), 1, 200)]
        );
        assert_eq!(
            parse_snapshots("tank/a@1\tSun Nov 29 15:54 2026\n")
                .unwrap_err()
                .line,
            1
        );
        assert_eq!(parse_snapshots("x\n").unwrap_err().line, 1);
        assert_eq!(parse_snapshots("tank/a\t1\n").unwrap_err().line, 1);
    }

    #[test]
    fn snapshots_without_p_read_the_date_as_utc() {
        // As zfs-fuse 0.7.0 prints them (`zfs list -H -t snapshot -o
        // name,creation`; the second line is the same snapshot under
        // TZ=Asia/Tokyo: `%e` and `%k` pad with a space).
        let text = "a4probe@s1\tSun Nov 29 21:02 2026\na4probe@s2\tMon Nov 30  6:02 2026\n\
                    tank/b c@x\tSun Nov  1 00:00 2026\n";
        assert_eq!(
            parse_snapshots_dated(text).unwrap(),
            vec![
                ("a4probe".into(), 2, 1_796_018_520),
                ("tank/b c".into(), 1, 1_793_491_200)
            ]
        );
        assert_eq!(parse_date_utc("Sun Nov 29 21:02 2026"), Some(1_795_986_120));
        assert_eq!(parse_date_utc("Thu Jan  1 00:00 1970"), Some(0));
        assert_eq!(parse_date_utc("Tue Feb 29 23:59 2028"), Some(1_835_481_540));
        assert_eq!(
            parse_date_utc("Wed Feb 29 23:59 2028"),
            None,
            "wrong weekday"
        );
        assert_eq!(parse_date_utc("Thu Feb 29 12:00 2027"), None, "no such day");
        assert_eq!(parse_date_utc("Sun Nov 29 24:00 2026"), None);
        assert_eq!(parse_date_utc("1796029500"), None);
        assert_eq!(
            parse_snapshots_dated("tank/a@1\t1796029500\n")
                .unwrap_err()
                .line,
            1
        );
    }

    #[test]
    fn list_rows() {
        let rows = parse_zpool_list(
            "tank\t107374182400\t53687091200\t53687091200\t12\t50\t1.00\tONLINE\n",
            LIST_COLUMNS,
        )
        .unwrap();
        assert_eq!(rows[0].fragmentation, Some(0.12));
        assert_eq!(rows[0].capacity, Some(0.5));
        assert_eq!(rows[0].dedup_ratio, Some(1.0));
        assert!(parse_zpool_list("tank\t1\n", LIST_COLUMNS).is_err());
        assert!(parse_zpool_list("tank\tbig\t1\t1\t1\t1\t1\tONLINE\n", LIST_COLUMNS).is_err());
    }
}
