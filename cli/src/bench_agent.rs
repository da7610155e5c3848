//! `vitals bench agent`: runs the agent's collection cycles in this process
//! over a tree and reports what one cycle costs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use vitals_agent::config::RawConfig;
use vitals_agent::cycle::Sources;

use crate::alloc_count;

pub struct Options {
    pub procfs: Option<PathBuf>,
    pub sysfs: Option<PathBuf>,
    pub cycles: u32,
    pub sources: Vec<String>,
    pub json: bool,
}

/// What the run measured.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub cycles: u32,
    pub sources: Vec<&'static str>,
    pub samples_per_cycle: f64,
    /// CPU time of the collecting thread per cycle (user + system).
    pub cpu_per_cycle_ms: f64,
    pub wall_per_cycle_ms: f64,
    /// Heap allocations (and reallocations) per cycle.
    pub allocs_per_cycle: f64,
    pub alloc_bytes_per_cycle: f64,
    /// Highest resident set size of this process (VmHWM).
    pub peak_rss_bytes: u64,
    pub procfs: PathBuf,
    pub sysfs: PathBuf,
}

pub fn agent(opts: &Options) -> anyhow::Result<String> {
    if opts.cycles == 0 {
        bail!("--cycles must be at least 1");
    }
    let mut cfg = RawConfig::default();
    if let Some(p) = &opts.procfs {
        cfg.paths.procfs = p.clone();
    }
    if let Some(s) = &opts.sysfs {
        cfg.paths.sysfs = s.clone();
    }
    // `zpool`/`zfs` would measure ZFS, not the agent (and run on threads
    // this measurement does not see).
    cfg.sources.zfs.commands = false;
    // The kernel log is this host's, not the tree's, and its position
    // would be saved in the default spool folder: only when asked for.
    if !opts.sources.iter().any(|s| s == "kmsg") {
        cfg.sources.kmsg.enabled = Some(false);
    }
    let mut sources = Sources::new(&cfg, &opts.sources)?;
    // One cycle first: the first one sets up caches that later ones reuse.
    let warm = sources.collect();
    for r in &warm.reports {
        if r.status == "error" {
            bail!(
                "source {} fails on this tree: {}",
                r.source,
                r.error.as_deref().unwrap_or("")
            );
        }
    }

    let (allocs0, bytes0) = alloc_count::counts();
    let cpu0 = thread_cpu_ns()?;
    let start = Instant::now();
    let mut samples = 0usize;
    for _ in 0..opts.cycles {
        let cycle = sources.collect();
        samples += cycle.samples.len();
    }
    let wall = start.elapsed();
    let cpu = thread_cpu_ns()?.saturating_sub(cpu0);
    let (allocs1, bytes1) = alloc_count::counts();
    let n = f64::from(opts.cycles);
    let report = Report {
        cycles: opts.cycles,
        sources: sources.names(),
        samples_per_cycle: samples as f64 / n,
        cpu_per_cycle_ms: cpu as f64 / 1e6 / n,
        wall_per_cycle_ms: wall.as_secs_f64() * 1e3 / n,
        allocs_per_cycle: (allocs1 - allocs0) as f64 / n,
        alloc_bytes_per_cycle: (bytes1 - bytes0) as f64 / n,
        peak_rss_bytes: peak_rss_bytes()?,
        procfs: cfg.paths.procfs.clone(),
        sysfs: cfg.paths.sysfs.clone(),
    };
    if opts.json {
        return Ok(serde_json::to_string(&report)?);
    }
    Ok(format!(
        "{} cycles over {} and {} (sources: {})\n\
         samples per cycle   {:.0}\n\
         CPU per cycle       {:.3} ms\n\
         wall per cycle      {:.3} ms\n\
         allocs per cycle    {:.0} ({:.0} bytes)\n\
         peak RSS            {:.1} MiB",
        report.cycles,
        report.procfs.display(),
        report.sysfs.display(),
        report.sources.join(", "),
        report.samples_per_cycle,
        report.cpu_per_cycle_ms,
        report.wall_per_cycle_ms,
        report.allocs_per_cycle,
        report.alloc_bytes_per_cycle,
        report.peak_rss_bytes as f64 / 1048576.0,
    ))
}

/// Nanoseconds this thread has run on a CPU (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let path = Path::new("/proc/thread-self/schedstat");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{}: unexpected content {text:?}", path.display()))
}

/// `VmHWM` of `/proc/self/status`, in bytes.
fn peak_rss_bytes() -> anyhow::Result<u64> {
    let path = Path::new("/proc/self/status");
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_vm_hwm(&text).with_context(|| format!("{}: no VmHWM line", path.display()))
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm() {
        assert_eq!(
            parse_vm_hwm("Name:\tx\nVmHWM:\t   20480 kB\nVmRSS:\t 1 kB\n"),
            Some(20_971_520)
        );
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
    }

    #[test]
    fn measures_cycles_over_a_fixture_tree() {
        let tree =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/node_exporter");
        let out = agent(&Options {
            procfs: Some(tree.join("proc")),
            sysfs: Some(tree.join("sys")),
            cycles: 20,
            sources: vec!["net".into(), "nfs".into(), "nfsd".into(), "zfs".into()],
            json: true,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cycles"], 20);
        assert!(v["samples_per_cycle"].as_f64().unwrap() > 900.0, "{v}");
        assert!(v["cpu_per_cycle_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["allocs_per_cycle"].as_f64().unwrap() > 100.0, "{v}");
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
    }

    #[test]
    fn a_failing_source_is_an_error_not_a_figure() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("net")).unwrap();
        std::fs::write(dir.path().join("net/dev"), "garbage\n").unwrap();
        let err = agent(&Options {
            procfs: Some(dir.path().to_path_buf()),
            sysfs: Some(dir.path().join("sys")),
            cycles: 1,
            sources: vec!["net".into()],
            json: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("net/dev"), "{err}");
    }
}
