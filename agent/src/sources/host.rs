//! Host basics through sysinfo: CPU usage, memory, load, filesystems, uptime.
//! Names follow node_exporter where it has the same quantity.

use std::collections::HashSet;

use sysinfo::{DiskRefreshKind, Disks, System};
use vitals_common::model::Sample;

use super::{Source, SourceError};
use crate::config::RawConfig;

pub struct Host {
    system: System,
    disks: Disks,
    cpu_primed: bool,
}

pub fn build(_cfg: &RawConfig) -> Box<dyn Source> {
    Box::new(Host {
        system: System::new(),
        disks: Disks::new(),
        cpu_primed: false,
    })
}

/// Filesystems that say nothing about storage capacity.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "mqueue",
    "hugetlbfs",
    "autofs",
    "binfmt_misc",
    "nsfs",
    "rpc_pipefs",
    "overlay",
    "squashfs",
];

impl Source for Host {
    fn name(&self) -> &'static str {
        "host"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        self.system.refresh_memory();
        self.system.refresh_cpu_usage();
        let load = System::load_average();
        out.push(Sample::new("node_load1", load.one));
        out.push(Sample::new("node_load5", load.five));
        out.push(Sample::new("node_load15", load.fifteen));

        let total = self.system.total_memory();
        if total == 0 {
            return Err(SourceError::Failed(
                "memory totals could not be read".into(),
            ));
        }
        out.push(Sample::new("node_memory_MemTotal_bytes", total as f64));
        out.push(Sample::new(
            "node_memory_MemFree_bytes",
            self.system.free_memory() as f64,
        ));
        out.push(Sample::new(
            "node_memory_MemAvailable_bytes",
            self.system.available_memory() as f64,
        ));
        out.push(Sample::new(
            "node_memory_SwapTotal_bytes",
            self.system.total_swap() as f64,
        ));
        out.push(Sample::new(
            "node_memory_SwapFree_bytes",
            self.system.free_swap() as f64,
        ));

        // sysinfo measures CPU usage between two refreshes: the first cycle has none.
        if self.cpu_primed {
            out.push(
                Sample::new(
                    "node_cpu_usage_ratio",
                    f64::from(self.system.global_cpu_usage()) / 100.0,
                )
                .label("cpu", "all"),
            );
            for (i, cpu) in self.system.cpus().iter().enumerate() {
                out.push(
                    Sample::new("node_cpu_usage_ratio", f64::from(cpu.cpu_usage()) / 100.0)
                        .label("cpu", i.to_string()),
                );
            }
        }
        self.cpu_primed = true;
        out.push(Sample::new("node_cpus", self.system.cpus().len() as f64));
        out.push(Sample::new(
            "node_boot_time_seconds",
            System::boot_time() as f64,
        ));
        out.push(Sample::new("node_uptime_seconds", System::uptime() as f64));

        // Sizes and the read-only flag only: no /proc/diskstats (I/O
        // counters) and no disk kind, which nothing here reports.
        self.disks
            .refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        let mut seen = HashSet::new();
        for disk in self.disks.list() {
            let fstype = disk.file_system().to_string_lossy().to_string();
            let mountpoint = disk.mount_point().to_string_lossy().to_string();
            if PSEUDO_FS.contains(&fstype.as_str()) || !seen.insert(mountpoint.clone()) {
                continue;
            }
            let device = disk.name().to_string_lossy().to_string();
            let fs = |name: &'static str, v: f64| {
                Sample::new(name, v)
                    .label("device", device.clone())
                    .label("fstype", fstype.clone())
                    .label("mountpoint", mountpoint.clone())
            };
            out.push(fs("node_filesystem_size_bytes", disk.total_space() as f64));
            out.push(fs(
                "node_filesystem_avail_bytes",
                disk.available_space() as f64,
            ));
            out.push(fs(
                "node_filesystem_readonly",
                if disk.is_read_only() { 1.0 } else { 0.0 },
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let mut src = build(&RawConfig::default());
        let mut out = Vec::new();
        src.collect(&mut out).unwrap();
        let get = |n: &str| out.iter().find(|s| s.name == n).map(|s| s.value);
        let total = get("node_memory_MemTotal_bytes").unwrap();
        let avail = get("node_memory_MemAvailable_bytes").unwrap();
        assert!(total > 0.0 && avail <= total, "{total} {avail}");
        assert!(get("node_load1").unwrap() >= 0.0);
        assert!(get("node_cpus").unwrap() >= 1.0);
        assert!(
            get("node_cpu_usage_ratio").is_none(),
            "no CPU usage before a second refresh"
        );
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        out.clear();
        src.collect(&mut out).unwrap();
        let usage = out
            .iter()
            .find(|s| {
                s.name == "node_cpu_usage_ratio"
                    && s.labels.get("cpu").map(String::as_str) == Some("all")
            })
            .unwrap()
            .value;
        assert!((0.0..=1.0).contains(&usage), "{usage}");
    }
}
