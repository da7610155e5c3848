//! SSD-cache eligibility of a dataset: whether its data can be served from
//! the ARC (RAM) and the L2ARC (the NVMe cache device), and if not, why
//! and what to run. Pure: `zfs get` output and numbers in, a verdict out;
//! the zfs source reports it as series, `vitals cache check` prints it.

use std::collections::BTreeMap;

use super::super::ParseError;

/// The properties asked of `zfs get -Hp -o name,property,value`.
pub const PROPERTIES: &[&str] = &[
    "primarycache",
    "secondarycache",
    "recordsize",
    "compression",
    "sync",
    "logbias",
    "used",
    "referenced",
];

/// One dataset's properties as `zfs get` printed them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    pub name: String,
    /// Property → value (`-` where the dataset has none).
    pub props: BTreeMap<String, String>,
}

impl Dataset {
    pub fn get(&self, p: &str) -> Option<&str> {
        self.props.get(p).map(String::as_str).filter(|v| *v != "-")
    }

    /// A numeric property (`-p`: exact bytes).
    pub fn bytes(&self, p: &str) -> Option<u64> {
        self.get(p)?.parse().ok()
    }
}

/// `zfs get -Hp -o name,property,value ...`: tab-separated lines; dataset
/// names may hold spaces, so only tabs split. Datasets in first-seen order.
pub fn parse_zfs_get(text: &str) -> Result<Vec<Dataset>, ParseError> {
    let mut out: Vec<Dataset> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut f = line.split('\t');
        let (Some(name), Some(prop), Some(value), None) = (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(ParseError::new(
                i + 1,
                format!("expected NAME<tab>PROPERTY<tab>VALUE, got {line:?}"),
            ));
        };
        if name.is_empty() || prop.is_empty() {
            return Err(ParseError::new(i + 1, "empty name or property"));
        }
        let ds = match out.iter_mut().position(|d| d.name == name) {
            Some(p) => &mut out[p],
            None => {
                out.push(Dataset {
                    name: name.to_string(),
                    props: BTreeMap::new(),
                });
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        ds.props.insert(prop.to_string(), value.to_string());
    }
    Ok(out)
}

/// What the host's caches hold, from arcstats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheSizes {
    /// The ARC's most (`c_max`).
    pub arc_max_bytes: Option<f64>,
    /// What the L2ARC holds (`l2_size`); 0 or None: no L2ARC.
    pub l2_bytes: Option<f64>,
}

/// How the dataset is being read (from the collector's series).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reading {
    /// Bytes per second read from the dataset (objset `nread`).
    pub read_bytes_per_second: Option<f64>,
    pub arc_hit_ratio: Option<f64>,
    pub l2_hit_ratio: Option<f64>,
}

/// Above this many times ARC + L2ARC, a dataset is "far larger than the cache".
pub const FAR_LARGER: f64 = 2.0;
/// A dataset read faster than this (bytes/s) counts as being read.
pub const BUSY_READ: f64 = 1024.0 * 1024.0;
/// Below this hit ratio in both ARC and L2ARC, reads come mostly from disk.
pub const LOW_HIT: f64 = 0.5;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    pub dataset: String,
    /// Whether its data can be served from the NVMe cache (L2ARC) and RAM.
    pub cacheable: bool,
    /// Why not, or what else is worth knowing; each with its fix, if any.
    pub reasons: Vec<Reason>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Reason {
    pub problem: String,
    /// A command that mends it, where one does.
    pub fix: Option<String>,
    /// Whether this alone makes the dataset not cacheable.
    pub blocking: bool,
}

fn gib(b: f64) -> String {
    format!("{:.1} GiB", b / (1u64 << 30) as f64)
}

/// The verdict for one dataset.
pub fn verdict(ds: &Dataset, sizes: CacheSizes, reading: Reading) -> Verdict {
    let mut reasons = Vec::new();
    let name = &ds.name;
    if let Some(v @ ("none" | "metadata")) = ds.get("primarycache") {
        reasons.push(Reason {
            problem: format!(
                "primarycache={v}: its data is not kept in the ARC (RAM), and the L2ARC (NVMe) is filled only from the ARC"
            ),
            fix: Some(format!("zfs set primarycache=all {name}")),
            blocking: true,
        });
    }
    if let Some(v @ ("none" | "metadata")) = ds.get("secondarycache") {
        reasons.push(Reason {
            problem: format!("secondarycache={v}: not cacheable on the L2ARC (NVMe)"),
            fix: Some(format!("zfs set secondarycache=all {name}")),
            blocking: true,
        });
    }
    let size = ds.bytes("referenced").or_else(|| ds.bytes("used"));
    let l2 = sizes.l2_bytes.unwrap_or(0.0);
    if sizes.l2_bytes.is_some() && l2 <= 0.0 {
        reasons.push(Reason {
            problem: "no L2ARC on this host (no cache device, or it holds nothing yet)".into(),
            fix: Some("zpool add POOL cache NVME_DEVICE".into()),
            blocking: false,
        });
    }
    if let (Some(size), Some(arc)) = (size, sizes.arc_max_bytes) {
        let cache = arc + l2;
        let size = size as f64;
        if cache > 0.0 && size > FAR_LARGER * cache {
            reasons.push(Reason {
                problem: format!(
                    "far larger than the cache: {} of data, {} of ARC + L2ARC; most reads will go to disk",
                    gib(size),
                    gib(cache)
                ),
                fix: Some(
                    "a larger NVMe cache device, or train from a subset that fits".into(),
                ),
                blocking: true,
            });
        } else if cache > 0.0 && size > cache {
            reasons.push(Reason {
                problem: format!(
                    "larger than the cache: {} of data, {} of ARC + L2ARC; part of each epoch is read from disk",
                    gib(size),
                    gib(cache)
                ),
                fix: None,
                blocking: false,
            });
        }
    }
    if let (Some(rate), Some(arc), Some(l2h)) = (
        reading.read_bytes_per_second,
        reading.arc_hit_ratio,
        reading.l2_hit_ratio,
    ) && rate > BUSY_READ
        && arc < LOW_HIT
        && l2h < LOW_HIT
    {
        reasons.push(Reason {
            problem: format!(
                "read mostly from disk: {:.1} MiB/s read with {:.0}% ARC and {:.0}% L2ARC hits",
                rate / (1024.0 * 1024.0),
                arc * 100.0,
                l2h * 100.0
            ),
            fix: None,
            blocking: false,
        });
    }
    Verdict {
        dataset: name.clone(),
        cacheable: !reasons.iter().any(|r| r.blocking),
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tabs_only_split_and_bad_lines_say_where() {
        let d = parse_zfs_get("tank/a b\tsecondarycache\tall\ntank/a b\tused\t10\n").unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "tank/a b");
        assert_eq!(d[0].bytes("used"), Some(10));
        let e = parse_zfs_get("tank\tused\t1\nbroken line\n").unwrap_err();
        assert_eq!(e.line, 2);
    }
}
