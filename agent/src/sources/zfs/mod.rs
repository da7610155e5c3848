//! ZFS: kstats and pool health.
//!
//! Kstats under `<procfs>/spl/kstat/zfs` (node_exporter's zfs names):
//! `arcstats` → `node_zfs_arc_<field>` (every field: ARC and L2ARC sizes,
//! targets, hits and misses, L2 bytes, errors, evictions), `zil` →
//! `node_zfs_zil_<field>`, the other global kstats likewise, and per pool
//! `io` → `node_zfs_zpool_<field>`, `state` → `node_zfs_zpool_state`,
//! `objset-*` → `node_zfs_zpool_dataset_<field>` (dataset names may hold
//! spaces). Per interval: `node_zfs_arc_hit_ratio` and
//! `node_zfs_arc_l2_hit_ratio`.
//!
//! Pool health through the configured `zpool` and `zfs` programs, run off
//! the collection thread with a timeout (see `sources::command`): `zpool list` (size,
//! allocated, free, fragmentation, capacity, dedup, health), `zpool status`
//! (state and error counters of every vdev including log, cache and spare
//! devices, scrub/resilver progress and last result, data errors) and
//! `zfs list -t snapshot` (newest snapshot per dataset and its age; from
//! zfs-fuse, which has no `-p`, to the minute). Each
//! command reports on itself: `vitals_zfs_command_success`,
//! `vitals_zfs_command_duration_seconds`, `vitals_zfs_command_timeouts_total`
//! and `vitals_zfs_command_hung`.
//!
//! SSD-cache eligibility (`cache_datasets`): `zfs get -Hp -o
//! name,property,value` of [`cache::PROPERTIES`] for those datasets →
//! `vitals_zfs_dataset_info{zpool,dataset,primarycache,secondarycache,
//! compression,sync,logbias}` (1), `vitals_zfs_dataset_recordsize_bytes`,
//! `vitals_zfs_dataset_used_bytes`, `vitals_zfs_dataset_referenced_bytes`,
//! and `vitals_zfs_dataset_cacheable` (1/0: [`cache::verdict`] on the
//! properties and the size against the ARC's `c_max` + `l2_size`); the
//! per-dataset read volume is the objset kstats' `node_zfs_zpool_dataset_nread`.

pub mod cache;
pub mod kstat;
pub mod zpool;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use vitals_common::model::{LabelSet, Name, Sample};

use self::kstat::{KValue, metric_name, parse_kstat};
use super::command::{CommandSpec, Runner};
use super::util::{Deltas, Files, Interned, list_dir, ratio, subdirs};
use super::{Source, SourceError};
use crate::config::RawConfig;

/// Global kstat files and the metric prefix node_exporter gives each.
const KSTATS: &[(&str, &str)] = &[
    ("arcstats", "arc"),
    ("zil", "zil"),
    ("abdstats", "abd"),
    ("dbufstats", "dbuf"),
    ("dmu_tx", "dmu_tx"),
    ("dnodestats", "dnode"),
    ("fm", "fm"),
    ("vdev_cache_stats", "vdev_cache"),
    ("vdev_mirror_stats", "vdev_mirror"),
    ("xuio_stats", "xuio"),
    ("zfetchstats", "zfetch"),
];

/// Pool states, as node_exporter enumerates them for `node_zfs_zpool_state`.
pub const POOL_STATES: &[&str] = &[
    "online",
    "degraded",
    "faulted",
    "offline",
    "removed",
    "unavail",
    "suspended",
];

/// Vdev states (`AVAIL` and `INUSE` are what spares show).
pub const VDEV_STATES: &[&str] = &[
    "online", "degraded", "faulted", "offline", "removed", "unavail", "avail", "inuse",
];

const LIST: usize = 0;
const STATUS: usize = 1;
const SNAPSHOTS: usize = 2;

pub struct Zfs {
    procfs: PathBuf,
    zpool: PathBuf,
    commands: Option<[Runner; 3]>,
    /// How long one cycle waits for the commands it started.
    wait: Duration,
    deltas: Deltas,
    files: Files,
    /// The last failure logged per command, so each is logged once.
    logged: HashMap<&'static str, String>,
    /// Metric names made from kstat names and label sets, kept while seen.
    names: Interned<Name>,
    labels: Interned<LabelSet>,
    key: String,
    /// `zfs get` of the configured `cache_datasets`; None without any.
    cache_get: Option<Runner>,
    /// ARC max and L2ARC size from this cycle's arcstats.
    sizes: cache::CacheSizes,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let z = &cfg.sources.zfs;
    let runner = |label, program: &PathBuf, variants: Vec<Vec<&str>>, env: &[(&str, &str)]| {
        Runner::new(
            CommandSpec {
                label,
                program: program.clone(),
                variants: variants
                    .into_iter()
                    .map(|v| v.into_iter().map(str::to_string).collect())
                    .collect(),
                fallback_on: &[],
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
            z.command_timeout,
        )
    };
    let list = zpool::LIST_COLUMNS.join(",");
    let legacy = zpool::LIST_COLUMNS_LEGACY.join(",");
    let commands = z.commands.then(|| {
        [
            runner(
                "zpool list",
                &z.zpool,
                vec![
                    vec!["list", "-Hp", "-o", &list],
                    vec!["list", "-H", "-o", &legacy],
                ],
                &[],
            ),
            runner(
                "zpool status",
                &z.zpool,
                vec![vec!["status", "-p"], vec!["status"]],
                &[],
            ),
            // zfs-fuse's `zfs` has no `-p`: its creation is a date to the
            // minute in the local time zone, made UTC by `TZ`
            // (`zpool::parse_snapshots_dated`).
            runner(
                "zfs list snapshots",
                &z.zfs,
                vec![
                    vec!["list", "-Hp", "-t", "snapshot", "-o", "name,creation"],
                    vec!["list", "-H", "-t", "snapshot", "-o", "name,creation"],
                ],
                &[("TZ", "UTC")],
            ),
        ]
    });
    let cache_get = (z.commands && !z.cache_datasets.is_empty()).then(|| {
        let mut args = vec![
            "get".to_string(),
            "-Hp".into(),
            "-o".into(),
            "name,property,value".into(),
            cache::PROPERTIES.join(","),
        ];
        args.extend(z.cache_datasets.iter().cloned());
        Runner::new(
            CommandSpec {
                label: "zfs get",
                program: z.zfs.clone(),
                variants: vec![args],
                fallback_on: &[],
                env: Vec::new(),
            },
            z.command_timeout,
        )
    });
    Box::new(Zfs {
        cache_get,
        sizes: cache::CacheSizes::default(),
        procfs: cfg.paths.procfs.clone(),
        zpool: z.zpool.clone(),
        commands,
        wait: z.command_timeout.min(cfg.interval / 2),
        deltas: Deltas::default(),
        files: Files::default(),
        logged: HashMap::new(),
        names: Interned::default(),
        labels: Interned::default(),
        key: String::new(),
    })
}

impl Source for Zfs {
    fn name(&self) -> &'static str {
        "zfs"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let now = Instant::now();
        let have_zpool = self.commands.is_some() && self.zpool.exists();
        if have_zpool && let Some(runners) = &mut self.commands {
            for r in runners.iter_mut() {
                r.start();
            }
            if let Some(r) = &mut self.cache_get {
                r.start();
            }
        }
        self.sizes = cache::CacheSizes::default();

        let kstat_dir = self.procfs.join("spl/kstat/zfs");
        let mut states_from_kstat = BTreeSet::new();
        let have_kstats = kstat_dir.is_dir();
        if have_kstats {
            let read = self.read_kstats(&kstat_dir, now, out, &mut states_from_kstat);
            self.files.end_cycle();
            self.names.end_cycle();
            self.labels.end_cycle();
            read?;
        }
        self.deltas.finish_cycle();
        if !have_kstats && !have_zpool {
            return Err(SourceError::Unavailable(format!(
                "no ZFS here: {} does not exist and {} is not installed",
                kstat_dir.display(),
                self.zpool.display()
            )));
        }
        if have_zpool {
            self.commands_samples(now, have_kstats, &states_from_kstat, out)?;
            self.cache_samples(now, out)?;
        }
        Ok(())
    }
}

/// A zfs/zpool command's own series (`vitals_zfs_command_*{command}`:
/// hung, timeouts, and for its last run the duration and success); returns
/// what the last run said (variant, output) if it succeeded and is not stuck.
fn command_samples<'r>(r: &'r Runner, out: &mut Vec<Sample>) -> Option<(usize, &'r str)> {
    let label = r.spec.label;
    let hung = r.hung();
    let sample = |name: &'static str, v: f64| Sample::new(name, v).label("command", label);
    out.push(sample("vitals_zfs_command_hung", f64::from(u8::from(hung))));
    out.push(sample(
        "vitals_zfs_command_timeouts_total",
        r.timeouts_total as f64,
    ));
    let last = r.last.as_ref()?;
    if let Some(d) = last.duration() {
        out.push(sample(
            "vitals_zfs_command_duration_seconds",
            d.as_secs_f64(),
        ));
    }
    let success = last.success().filter(|_| !hung);
    out.push(sample(
        "vitals_zfs_command_success",
        f64::from(u8::from(success.is_some())),
    ));
    success
}

impl Zfs {
    /// The configured datasets' cache properties and verdicts.
    fn cache_samples(&mut self, now: Instant, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let Some(r) = &mut self.cache_get else {
            return Ok(());
        };
        r.receive(Some(now + self.wait));
        let label = r.spec.label;
        let success = command_samples(r, out);
        let Some(last) = &r.last else { return Ok(()) };
        let Some((_, text)) = success else {
            if let Some(why) = last.failure()
                && self.logged.get(label) != Some(&why)
            {
                tracing::warn!(command = label, error = %why, "zfs command failed; the cache_datasets samples are left out");
                self.logged.insert(label, why);
            }
            return Ok(());
        };
        self.logged.remove(label);
        let datasets = cache::parse_zfs_get(text)
            .map_err(|e| SourceError::Failed(format!("`zfs get` output: {e}")))?;
        for ds in &datasets {
            let pool = ds.name.split('/').next().unwrap_or_default();
            let s = |name: &'static str, v: f64| {
                Sample::new(name, v)
                    .label("zpool", pool)
                    .label("dataset", ds.name.as_str())
            };
            let mut info = s("vitals_zfs_dataset_info", 1.0);
            for p in [
                "primarycache",
                "secondarycache",
                "compression",
                "sync",
                "logbias",
            ] {
                info = info.label(p, ds.get(p).unwrap_or(""));
            }
            out.push(info);
            for (p, name) in [
                ("recordsize", "vitals_zfs_dataset_recordsize_bytes"),
                ("used", "vitals_zfs_dataset_used_bytes"),
                ("referenced", "vitals_zfs_dataset_referenced_bytes"),
            ] {
                if let Some(v) = ds.bytes(p) {
                    out.push(s(name, v as f64));
                }
            }
            let v = cache::verdict(ds, self.sizes, cache::Reading::default());
            out.push(s(
                "vitals_zfs_dataset_cacheable",
                f64::from(u8::from(v.cacheable)),
            ));
        }
        Ok(())
    }

    fn read_kstats(
        &mut self,
        dir: &Path,
        now: Instant,
        out: &mut Vec<Sample>,
        states: &mut BTreeSet<String>,
    ) -> Result<(), SourceError> {
        for (file, prefix) in KSTATS {
            let path = dir.join(file);
            let Some(text) = self.files.read(&path)? else {
                continue;
            };
            let fields = parse_kstat(&text).map_err(|e| e.in_file(&path))?;
            for (name, value) in &fields {
                if let Some(v) = value.as_f64() {
                    let name = kstat_name(&mut self.names, &mut self.key, prefix, name);
                    out.push(Sample::new(name, v));
                }
            }
            if *file == "arcstats" {
                arc_ratios(&mut self.deltas, &fields, now, out);
                let get = |n: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == n)
                        .and_then(|(_, v)| v.as_f64())
                };
                self.sizes = cache::CacheSizes {
                    arc_max_bytes: get("c_max"),
                    l2_bytes: get("l2_size"),
                };
            }
        }
        let pools =
            subdirs(dir).map_err(|e| SourceError::Failed(format!("{}: {e}", dir.display())))?;
        let mut cache = Cache {
            names: &mut self.names,
            labels: &mut self.labels,
            key: &mut self.key,
        };
        for (pool, path) in pools {
            read_pool(&mut self.files, &mut cache, &pool, &path, out, states)?;
        }
        Ok(())
    }

    fn commands_samples(
        &mut self,
        now: Instant,
        have_kstats: bool,
        states_from_kstat: &BTreeSet<String>,
        out: &mut Vec<Sample>,
    ) -> Result<(), SourceError> {
        let Some(runners) = &mut self.commands else {
            return Ok(());
        };
        let deadline = now + self.wait;
        for r in runners.iter_mut() {
            r.receive(Some(deadline));
        }
        // What each command said, if it succeeded and is not stuck.
        let mut ok: [Option<(usize, String)>; 3] = [None, None, None];
        for (i, r) in runners.iter().enumerate() {
            let label = r.spec.label;
            let success = command_samples(r, out);
            let Some(last) = &r.last else { continue };
            if let Some((variant, text)) = success {
                ok[i] = Some((variant, text.to_string()));
                self.logged.remove(label);
            } else if let Some(why) = last.failure() {
                // Without kstats, a failing `zpool list` means there is no
                // ZFS here (no module, no daemon): unavailable, not an error.
                if !have_kstats && i == LIST {
                    return Err(SourceError::Unavailable(format!(
                        "no kstats and `{label}` failed: {why}"
                    )));
                }
                if self.logged.get(label) != Some(&why) {
                    tracing::warn!(command = label, error = %why, "zfs command failed; its samples are left out");
                    self.logged.insert(label, why);
                }
            }
        }
        if runners.iter().any(Runner::hung) && !self.logged.contains_key("hung") {
            tracing::warn!(
                "a zpool/zfs command is hung (still running after its kill); reported as vitals_zfs_command_hung"
            );
            self.logged.insert("hung", String::new());
        }

        let mut pool_states: HashMap<String, String> = HashMap::new();
        if let Some((variant, text)) = &ok[LIST] {
            let columns = if *variant == 0 {
                zpool::LIST_COLUMNS
            } else {
                zpool::LIST_COLUMNS_LEGACY
            };
            let rows = zpool::parse_zpool_list(text, columns)
                .map_err(|e| SourceError::Failed(format!("`zpool list` output: {e}")))?;
            for row in rows {
                let s = |name: &'static str, v: Option<f64>| {
                    v.map(|v| Sample::new(name, v).label("zpool", row.name.as_str()))
                };
                out.extend(
                    [
                        s("node_zfs_zpool_size_bytes", row.size_bytes),
                        s("node_zfs_zpool_allocated_bytes", row.allocated_bytes),
                        s("node_zfs_zpool_free_bytes", row.free_bytes),
                        s("node_zfs_zpool_fragmentation_ratio", row.fragmentation),
                        s("node_zfs_zpool_capacity_ratio", row.capacity),
                        s("node_zfs_zpool_dedup_ratio", row.dedup_ratio),
                    ]
                    .into_iter()
                    .flatten(),
                );
                pool_states.insert(row.name.clone(), row.health.clone());
            }
        }
        if let Some((_, text)) = &ok[STATUS] {
            let pools = zpool::parse_zpool_status(text)
                .map_err(|e| SourceError::Failed(format!("`zpool status` output: {e}")))?;
            for p in &pools {
                pool_states.insert(p.name.clone(), p.state.clone());
                status_samples(p, out);
            }
        }
        // Pools whose state no kstat gave (zfs-fuse, OpenZFS before 0.8).
        let mut names: Vec<&String> = pool_states.keys().collect();
        names.sort();
        for name in names {
            if states_from_kstat.contains(name) {
                continue;
            }
            let state = pool_states[name].to_ascii_lowercase();
            for s in POOL_STATES {
                out.push(
                    Sample::new("node_zfs_zpool_state", if state == *s { 1.0 } else { 0.0 })
                        .label("zpool", name.as_str())
                        .label("state", *s),
                );
            }
        }
        if let Some((variant, text)) = &ok[SNAPSHOTS] {
            let snaps = if *variant == 0 {
                zpool::parse_snapshots(text)
            } else {
                zpool::parse_snapshots_dated(text)
            };
            let snaps = snaps
                .map_err(|e| SourceError::Failed(format!("`zfs list -t snapshot` output: {e}")))?;
            let now_unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            for (dataset, count, newest) in snaps {
                let pool = dataset.split('/').next().unwrap_or_default().to_string();
                let s = |name: &'static str, v: f64| {
                    Sample::new(name, v)
                        .label("zpool", pool.as_str())
                        .label("dataset", dataset.as_str())
                };
                out.push(s("node_zfs_dataset_snapshots", count as f64));
                out.push(s(
                    "node_zfs_dataset_newest_snapshot_timestamp_seconds",
                    newest as f64,
                ));
                out.push(s(
                    "node_zfs_dataset_newest_snapshot_age_seconds",
                    (now_unix - newest as f64).max(0.0),
                ));
            }
        }
        Ok(())
    }
}

/// Hit ratios over the last interval (nothing on the first cycle, or
/// when nothing was looked up).
fn arc_ratios(
    deltas: &mut Deltas,
    fields: &[(&str, KValue<'_>)],
    now: Instant,
    out: &mut Vec<Sample>,
) {
    let get = |n: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == n)
            .and_then(|(_, v)| v.as_u64())
    };
    for (hits, misses, metric) in [
        ("hits", "misses", "node_zfs_arc_hit_ratio"),
        ("l2_hits", "l2_misses", "node_zfs_arc_l2_hit_ratio"),
    ] {
        let (Some(h), Some(m)) = (get(hits), get(misses)) else {
            continue;
        };
        let dh = deltas.update(hits, h, now);
        let dm = deltas.update(misses, m, now);
        if let (Some((dh, _)), Some((dm, _))) = (dh, dm)
            && let Some(r) = ratio(dh, dh.saturating_add(dm))
        {
            out.push(Sample::new(metric, r));
        }
    }
}

/// `node_zfs_{prefix}_{kstat name}`, made once per name.
fn kstat_name(names: &mut Interned<Name>, key: &mut String, prefix: &str, name: &str) -> Name {
    key.clear();
    key.push_str(prefix);
    key.push('\0');
    key.push_str(name);
    names.get(key, || {
        format!("node_zfs_{prefix}_{}", metric_name(name)).into()
    })
}

/// The source's name and label caches, lent to `read_pool`.
struct Cache<'a> {
    names: &'a mut Interned<Name>,
    labels: &'a mut Interned<LabelSet>,
    key: &'a mut String,
}

impl Cache<'_> {
    fn labels(&mut self, pairs: &[(&'static str, &str)]) -> LabelSet {
        self.labels.of_pairs(self.key, pairs.iter())
    }
}

/// One pool's kstat directory: `io`, `state`, `objset-*`.
fn read_pool(
    files: &mut Files,
    cache: &mut Cache<'_>,
    pool: &str,
    dir: &Path,
    out: &mut Vec<Sample>,
    states: &mut BTreeSet<String>,
) -> Result<(), SourceError> {
    let pool_labels = cache.labels(&[("zpool", pool)]);
    let io = dir.join("io");
    if let Some(text) = files.read(&io)? {
        for (name, v) in parse_kstat(&text).map_err(|e| e.in_file(&io))? {
            if let Some(v) = v.as_f64() {
                let name = kstat_name(cache.names, cache.key, "zpool", name);
                out.push(Sample::with_labels(name, &pool_labels, v));
            }
        }
    }
    let state_path = dir.join("state");
    if let Some(text) = files.read(&state_path)? {
        let state = text.trim().to_ascii_lowercase();
        if state.is_empty() {
            return Err(SourceError::Failed(format!(
                "{}: empty",
                state_path.display()
            )));
        }
        states.insert(pool.to_string());
        for s in POOL_STATES {
            let labels = cache.labels(&[("zpool", pool), ("state", s)]);
            out.push(Sample::with_labels(
                "node_zfs_zpool_state",
                &labels,
                if state == *s { 1.0 } else { 0.0 },
            ));
        }
    }
    let entries =
        list_dir(dir).map_err(|e| SourceError::Failed(format!("{}: {e}", dir.display())))?;
    for (name, path) in entries {
        if !name.starts_with("objset-") {
            continue;
        }
        let Some(text) = files.read(&path)? else {
            continue;
        };
        let fields = parse_kstat(&text).map_err(|e| e.in_file(&path))?;
        let dataset = fields.iter().find_map(|(k, v)| match (*k, v) {
            ("dataset_name", KValue::Str(s)) => Some(*s),
            _ => None,
        });
        let Some(dataset) = dataset else {
            return Err(SourceError::Failed(format!(
                "{}: no dataset_name",
                path.display()
            )));
        };
        let labels = cache.labels(&[("zpool", pool), ("dataset", dataset)]);
        for (k, v) in &fields {
            if let Some(v) = v.as_f64() {
                let name = kstat_name(cache.names, cache.key, "zpool_dataset", k);
                out.push(Sample::with_labels(name, &labels, v));
            }
        }
    }
    Ok(())
}

/// Vdev states and error counters, scan progress and result, data errors.
fn status_samples(p: &zpool::PoolStatus, out: &mut Vec<Sample>) {
    let pool = p.name.as_str();
    for v in p.vdevs.iter().filter(|v| v.depth > 0) {
        let state = v.state.to_ascii_lowercase();
        let s = |name: &'static str, value: f64| {
            Sample::new(name, value)
                .label("zpool", pool)
                .label("vdev", v.name.as_str())
                .label("class", v.class)
        };
        for st in VDEV_STATES {
            out.push(
                s(
                    "node_zfs_zpool_vdev_state",
                    if state == *st { 1.0 } else { 0.0 },
                )
                .label("state", *st),
            );
        }
        for (name, value) in [
            ("node_zfs_zpool_vdev_read_errors_total", v.read_errors),
            ("node_zfs_zpool_vdev_write_errors_total", v.write_errors),
            (
                "node_zfs_zpool_vdev_checksum_errors_total",
                v.checksum_errors,
            ),
        ] {
            if let Some(value) = value {
                out.push(s(name, value));
            }
        }
    }
    if let Some(scan) = &p.scan {
        let s = |name: &'static str, value: f64| {
            Sample::new(name, value)
                .label("zpool", pool)
                .label("function", scan.function)
        };
        out.push(s("node_zfs_zpool_scan_info", 1.0).label("state", scan.state));
        if let Some(v) = scan.progress {
            out.push(s("node_zfs_zpool_scan_progress_ratio", v));
        }
        if let Some(v) = scan.repaired_bytes {
            out.push(s("node_zfs_zpool_scan_repaired_bytes", v));
        }
        if let Some(v) = scan.errors {
            out.push(s("node_zfs_zpool_scan_errors", v));
        }
    }
    if let Some(v) = p.data_errors {
        out.push(Sample::new("node_zfs_zpool_data_errors", v).label("zpool", pool));
    }
}
