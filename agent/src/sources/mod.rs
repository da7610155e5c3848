//! Sources: one file per source, one small trait, one explicit list.
//!
//! A source reads its inputs (through the configured filesystem roots) and
//! appends samples. "Not present on this host" is `Unavailable`, logged once
//! at debug and never counted as an error; anything else is `Failed`: that
//! source skips the cycle, its error counter goes up, the others go on.

pub mod background;
pub mod command;
pub mod gpu;
pub mod host;
pub mod kmsg;
pub mod mesh;
pub mod net;
pub mod net_test;
pub mod nfs;
pub mod nfsd;
pub mod probe;
pub mod slurm;
pub mod util;
pub mod zfs;

use vitals_common::model::{Labels, Sample};
use vitals_proto::v1::Severity;

use crate::config::RawConfig;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's inputs do not exist on this host (no GPU, no ZFS, ...).
    #[error("not available on this host: {0}")]
    Unavailable(String),
    /// The inputs exist but could not be read or parsed this cycle.
    #[error("{0}")]
    Failed(String),
}

/// What a pure parser says about input it cannot read: the line (1-based)
/// and why. The source adds the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl ParseError {
    pub fn new(line: usize, message: impl Into<String>) -> Self {
        ParseError {
            line,
            message: message.into(),
        }
    }

    /// The error as a source failure naming the file it came from.
    pub fn in_file(self, path: &std::path::Path) -> SourceError {
        SourceError::Failed(format!("{}: {self}", path.display()))
    }
}

pub trait Source: Send {
    /// Short name, used in `--source`, config tables and self-metrics labels.
    fn name(&self) -> &'static str;
    /// Reads the inputs and appends samples (without node label or timestamp).
    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError>;
    /// Events noticed since the last call (a job changing state...), taken
    /// by the cycle after `collect` and sent in the same batch.
    fn events(&mut self) -> Vec<SourceEvent> {
        Vec::new()
    }
}

/// An event as a source reports it; the cycle adds the node and the time.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    pub kind: String,
    pub severity: Severity,
    pub message: String,
    pub labels: Labels,
}

/// One entry of the source list.
pub struct SourceSpec {
    pub name: &'static str,
    pub enabled_by_default: bool,
    pub help: &'static str,
    pub build: fn(&RawConfig) -> Box<dyn Source>,
}

/// Every source the agent knows, in collection order.
pub const SOURCES: &[SourceSpec] = &[
    SourceSpec {
        name: "host",
        enabled_by_default: true,
        help: "CPU, memory, load, filesystems and uptime (through sysinfo)",
        build: host::build,
    },
    SourceSpec {
        name: "net",
        enabled_by_default: true,
        help: "network devices (/proc/net/dev, /sys/class/net) and InfiniBand/RoCE ports (/sys/class/infiniband)",
        build: net::build,
    },
    SourceSpec {
        name: "nfs",
        enabled_by_default: true,
        help: "NFS client: per-mount operations and transports (/proc/self/mountstats) and /proc/net/rpc/nfs",
        build: nfs::build,
    },
    SourceSpec {
        name: "nfsd",
        enabled_by_default: true,
        help: "NFS server (/proc/net/rpc/nfsd)",
        build: nfsd::build,
    },
    SourceSpec {
        name: "zfs",
        enabled_by_default: true,
        help: "ZFS kstats (ARC, L2ARC, ZIL, per-pool I/O, state and datasets) and pool health from zpool/zfs",
        build: zfs::build,
    },
    SourceSpec {
        name: "gpu",
        enabled_by_default: true,
        help: "GPUs: AMD through ROCm SMI, NVIDIA through NVML (both loaded at run time), else amdgpu sysfs",
        build: gpu::build,
    },
    SourceSpec {
        name: "slurm",
        enabled_by_default: true,
        help: "SLURM jobs and nodes from squeue and sinfo (--json, else their text forms); unavailable without squeue",
        build: slurm::build,
    },
    SourceSpec {
        name: "probe",
        enabled_by_default: true,
        help: "inference endpoint probes: latency, status, failures by step, golden-input correctness ([[sources.probe.endpoints]])",
        build: probe::build,
    },
    SourceSpec {
        name: "kmsg",
        enabled_by_default: true,
        help: "kernel events from /dev/kmsg: NFS server not responding, GPU resets and RAS errors, NVIDIA Xid, link up/down, OOM kills (with the SLURM job), MCE, hung tasks",
        build: kmsg::build,
    },
    SourceSpec {
        name: "mesh",
        enabled_by_default: true,
        help: "peer mesh: ICMP echo and TCP connect times, loss and jitter to each configured peer ([[sources.mesh.peers]])",
        build: mesh::build,
    },
    SourceSpec {
        name: "net_test",
        enabled_by_default: true,
        help: "scheduled throughput tests to other agents' net-test listeners ([[net_test.schedule]])",
        build: net_test::build,
    },
];

/// Whether a source is enabled by the config (or its default).
pub fn enabled(cfg: &RawConfig, spec: &SourceSpec) -> bool {
    let toggle = match spec.name {
        "host" => cfg.sources.host.enabled,
        "net" => cfg.sources.net.enabled,
        "nfs" => cfg.sources.nfs.enabled,
        "nfsd" => cfg.sources.nfsd.enabled,
        "zfs" => cfg.sources.zfs.enabled,
        "gpu" => cfg.sources.gpu.enabled,
        "slurm" => cfg.sources.slurm.enabled,
        "probe" => cfg.sources.probe.enabled,
        "kmsg" => cfg.sources.kmsg.enabled,
        "mesh" => cfg.sources.mesh.enabled,
        "net_test" => None,
        _ => None,
    };
    toggle.unwrap_or(spec.enabled_by_default)
}
