//! `agent.toml`: raw serde structs, then validated runtime settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vitals_common::config::{self, ConfigError};
use vitals_common::tls::{TlsFiles, TlsMaterial};

pub const DEFAULT_PATH: &str = "/etc/vitals/agent.toml";

/// The agent's config file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Collector URL, e.g. "https://collector.example:7443". Required to run.
    #[serde(default)]
    pub collector: Option<String>,
    /// Name the collector's certificate must carry; default: the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Node name put on every sample; default: the CN of the agent certificate.
    /// The collector rejects samples for any node but the certificate's.
    #[serde(default)]
    pub node: Option<String>,
    /// Time between collection cycles.
    #[serde(default = "default_interval", with = "config::duration")]
    pub interval: Duration,
    /// How long SIGTERM waits for the spool to be delivered before exiting.
    #[serde(default = "default_grace", with = "config::duration")]
    pub shutdown_grace: Duration,
    #[serde(default = "default_tls")]
    pub tls: TlsFiles,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub paths: PathsConfig,
    #[serde(default)]
    pub sources: SourcesConfig,
    /// `[net_test]`: the throughput-test listener and scheduled tests.
    #[serde(default)]
    pub net_test: crate::net_test::NetTestConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the on-disk spool (a SQLite file).
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Most bytes of unacknowledged batches kept; past it the oldest are dropped.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

/// Filesystem roots every source reads through (node_exporter's --path.*).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// Root of the proc filesystem (`/proc`; a fixture tree in tests).
    #[serde(default = "default_procfs")]
    pub procfs: PathBuf,
    /// Root of the sys filesystem (`/sys`; a fixture tree in tests).
    #[serde(default = "default_sysfs")]
    pub sysfs: PathBuf,
    /// Root of the device files (`/dev`): the GPU source's `auto` backend
    /// loads a vendor library only where its device is there (`kfd` for
    /// ROCm SMI, `nvidiactl` or `nvidia0` for NVML).
    #[serde(default = "default_devfs")]
    pub devfs: PathBuf,
}

/// One table per source; each has at least `enabled`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourcesConfig {
    /// `[sources.host]`: CPU, memory, load, filesystems, uptime.
    #[serde(default)]
    pub host: SourceToggle,
    /// `[sources.net]`: network devices and InfiniBand/RoCE ports.
    #[serde(default)]
    pub net: NetConfig,
    /// `[sources.nfs]`: the NFS client (mountstats, /proc/net/rpc/nfs).
    #[serde(default)]
    pub nfs: SourceToggle,
    /// `[sources.nfsd]`: the NFS server (/proc/net/rpc/nfsd).
    #[serde(default)]
    pub nfsd: SourceToggle,
    /// `[sources.zfs]`: ZFS kstats and pool health commands.
    #[serde(default)]
    pub zfs: ZfsConfig,
    /// `[sources.gpu]`: GPUs through ROCm SMI, NVML or amdgpu sysfs.
    #[serde(default)]
    pub gpu: GpuConfig,
    /// `[sources.slurm]`: SLURM jobs and nodes through squeue and sinfo.
    #[serde(default)]
    pub slurm: SlurmConfig,
    /// `[sources.joblog]`: the logs of the SLURM jobs running on this node
    /// (read by the slurm source, which knows the jobs).
    #[serde(default)]
    pub joblog: JobLogConfig,
    /// `[sources.probe]`: inference endpoint probes.
    #[serde(default)]
    pub probe: crate::sources::probe::ProbeConfig,
    /// `[sources.kmsg]`: kernel events from /dev/kmsg.
    #[serde(default)]
    pub kmsg: crate::sources::kmsg::KmsgConfig,
    /// `[sources.mesh]`: probes of peer hosts (ICMP, TCP connect).
    #[serde(default)]
    pub mesh: crate::sources::mesh::MeshConfig,
}

/// `[sources.joblog]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobLogConfig {
    /// Whether the slurm source follows job logs (default: yes).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// This host's SLURM node name: the logs of running jobs with this
    /// node in their node list are followed. Default: the short host name
    /// (slurmd's own default).
    #[serde(default)]
    pub slurm_node: Option<String>,
    /// Most bytes read from one log file per cycle; the rest waits.
    #[serde(default = "default_joblog_read")]
    pub max_read_bytes: usize,
    /// Most `job_log` events per job per cycle (the error counters count
    /// every line).
    #[serde(default = "default_joblog_events")]
    pub max_events: usize,
    /// Whether the built-in patterns (PyTorch, Hugging Face Trainer,
    /// Lightning, DeepSpeed) are used after the configured ones.
    #[serde(default = "default_true")]
    pub default_patterns: bool,
    /// Error patterns, tried before the built-in ones: `{ class = "gpu_oom",
    /// regex = "..." }`. The class becomes the `class` label.
    #[serde(default)]
    pub errors: Vec<ErrorPattern>,
    /// Progress patterns: regexes with one capture group, the value. In
    /// them `NUM` stands for a number and `LOSS` for a loss value (NaN and
    /// Inf included).
    #[serde(default)]
    pub step: Vec<String>,
    #[serde(default)]
    pub epoch: Vec<String>,
    #[serde(default)]
    pub loss: Vec<String>,
    #[serde(default)]
    pub throughput: Vec<String>,
}

/// One configured error pattern.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorPattern {
    pub class: String,
    pub regex: String,
}

impl Default for JobLogConfig {
    fn default() -> Self {
        JobLogConfig {
            enabled: None,
            slurm_node: None,
            max_read_bytes: default_joblog_read(),
            max_events: default_joblog_events(),
            default_patterns: true,
            errors: Vec::new(),
            step: Vec::new(),
            epoch: Vec::new(),
            loss: Vec::new(),
            throughput: Vec::new(),
        }
    }
}

impl JobLogConfig {
    /// The compiled patterns, or why one does not compile.
    pub fn patterns(&self) -> Result<crate::sources::slurm::patterns::Patterns, String> {
        let errors: Vec<(String, String)> = self
            .errors
            .iter()
            .map(|e| (e.class.clone(), e.regex.clone()))
            .collect();
        crate::sources::slurm::patterns::Patterns::new(
            &errors,
            &crate::sources::slurm::patterns::Progress {
                step: self.step.clone(),
                epoch: self.epoch.clone(),
                loss: self.loss.clone(),
                throughput: self.throughput.clone(),
            },
            self.default_patterns,
        )
    }
}

fn default_joblog_read() -> usize {
    256 * 1024
}

fn default_joblog_events() -> usize {
    20
}

/// `[sources.slurm]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// Whether the source runs (default: yes; quiet where there is no squeue).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// The `squeue` program; default: found on `PATH`.
    #[serde(default)]
    pub squeue: Option<PathBuf>,
    /// The `sinfo` program; default: found on `PATH`.
    #[serde(default)]
    pub sinfo: Option<PathBuf>,
    /// A command still running after this long is killed and reported
    /// (`vitals_slurm_command_timeouts_total`, `vitals_slurm_command_hung`).
    /// Also the limit of one slurmrestd request.
    #[serde(default = "default_slurm_timeout", with = "config::duration")]
    pub command_timeout: Duration,
    /// slurmrestd to read jobs and nodes from instead of running squeue and
    /// sinfo: `unix:/run/slurmrestd/slurmrestd.socket`, `http://host:6820`
    /// or `https://host:6820` (default: unset, the commands).
    #[serde(default)]
    pub restd: Option<String>,
    /// A file holding the token sent as `X-SLURM-USER-TOKEN` (a JWT from
    /// `scontrol token`); read for every request, so a rotated token is
    /// used at once; never logged. Relative to the config file's folder.
    #[serde(default)]
    pub restd_token_file: Option<PathBuf>,
    /// Sent as `X-SLURM-USER-NAME` with the token.
    #[serde(default)]
    pub restd_user: Option<String>,
    /// The API version in the request paths (`/slurm/VERSION/jobs`).
    #[serde(default = "default_restd_api_version")]
    pub restd_api_version: String,
    /// CA certificates (PEM) for an `https://` restd; default: the
    /// system's store. Relative to the config file's folder.
    #[serde(default)]
    pub restd_ca_file: Option<PathBuf>,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            enabled: None,
            squeue: None,
            sinfo: None,
            command_timeout: default_slurm_timeout(),
            restd: None,
            restd_token_file: None,
            restd_user: None,
            restd_api_version: default_restd_api_version(),
            restd_ca_file: None,
        }
    }
}

fn default_restd_api_version() -> String {
    crate::sources::slurm::restd::DEFAULT_API_VERSION.to_string()
}

fn default_slurm_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[sources.gpu]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// Whether the source runs (default: yes; quiet where there is no GPU).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// "auto" (ROCm SMI, then NVML, then amdgpu sysfs), "rocm", "nvml",
    /// "sysfs" or "off".
    #[serde(default)]
    pub backend: crate::sources::gpu::BackendKind,
    /// The vendor library to load instead of searching the usual places.
    #[serde(default)]
    pub library: Option<PathBuf>,
    /// Longest a cycle waits for the GPU reads; a read still running then
    /// is reported hung (`vitals_gpu_read_hung`) and the cycle goes on.
    #[serde(default = "default_gpu_timeout", with = "config::duration")]
    pub timeout: Duration,
    /// Whether the processes using each GPU (PID, memory) are reported.
    #[serde(default = "default_true")]
    pub processes: bool,
    /// Whether a GPU's series carry `job_id` and `user` while a SLURM
    /// job's process uses it (from the process's cgroup or environment
    /// under `paths.procfs`; needs `processes`).
    #[serde(default = "default_true")]
    pub job_labels: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: None,
            backend: Default::default(),
            library: None,
            timeout: default_gpu_timeout(),
            processes: true,
            job_labels: true,
        }
    }
}

fn default_gpu_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `[sources.net]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Whether the source runs (default: yes).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Device name patterns (`*`, `?`) to report; empty: every device.
    #[serde(default)]
    pub include: Vec<String>,
    /// Device name patterns never reported (applied after `include`).
    #[serde(default = "default_net_exclude")]
    pub exclude: Vec<String>,
    /// Link speed each device should have negotiated, in Mbit/s, by device
    /// pattern, e.g. `{ "ens*" = 100000 }`. Exported as
    /// `node_network_expected_speed_bytes` beside `node_network_speed_bytes`.
    /// An exact name wins over a pattern; among patterns the longest wins.
    #[serde(default)]
    pub expected_speed_mbps: BTreeMap<String, u64>,
    /// Whether InfiniBand/RoCE ports under /sys/class/infiniband are read.
    #[serde(default = "default_true")]
    pub infiniband: bool,
}

/// `[sources.zfs]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZfsConfig {
    /// Whether the source runs (default: yes; quiet where there is no ZFS).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Whether pool health comes from running `zpool` and `zfs` (kstats are
    /// always read).
    #[serde(default = "default_true")]
    pub commands: bool,
    /// The `zpool` program.
    #[serde(default = "default_zpool")]
    pub zpool: PathBuf,
    /// The `zfs` program.
    #[serde(default = "default_zfs")]
    pub zfs: PathBuf,
    /// A command still running after this long is killed and reported as
    /// hung (`vitals_zfs_command_timeouts_total`, `vitals_zfs_command_hung`).
    #[serde(default = "default_command_timeout", with = "config::duration")]
    pub command_timeout: Duration,
    /// Datasets whose SSD-cache eligibility is reported (`zfs get` of
    /// their cache properties, size against ARC + L2ARC), e.g.
    /// `["tank/train"]`; `vitals cache check` prints the verdicts.
    #[serde(default)]
    pub cache_datasets: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceToggle {
    /// Whether the source runs (default: its enabled-by-default bit).
    #[serde(default)]
    pub enabled: Option<bool>,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            enabled: None,
            include: Vec::new(),
            exclude: default_net_exclude(),
            expected_speed_mbps: BTreeMap::new(),
            infiniband: true,
        }
    }
}

impl Default for ZfsConfig {
    fn default() -> Self {
        ZfsConfig {
            enabled: None,
            commands: true,
            zpool: default_zpool(),
            zfs: default_zfs(),
            command_timeout: default_command_timeout(),
            cache_datasets: Vec::new(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: default_spool_dir(),
            max_bytes: default_spool_bytes(),
        }
    }
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            procfs: default_procfs(),
            sysfs: default_sysfs(),
            devfs: default_devfs(),
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            collector: None,
            server_name: None,
            node: None,
            interval: default_interval(),
            shutdown_grace: default_grace(),
            tls: default_tls(),
            spool: SpoolConfig::default(),
            paths: PathsConfig::default(),
            sources: SourcesConfig::default(),
            net_test: Default::default(),
        }
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_tls() -> TlsFiles {
    TlsFiles {
        ca: "/etc/vitals/tls/ca.pem".into(),
        cert: "/etc/vitals/tls/agent.pem".into(),
        key: "/etc/vitals/tls/agent.key".into(),
    }
}
fn default_spool_dir() -> PathBuf {
    "/var/lib/vitals-agent".into()
}
fn default_spool_bytes() -> u64 {
    256 << 20
}
fn default_true() -> bool {
    true
}
fn default_net_exclude() -> Vec<String> {
    vec!["lo".into(), "veth*".into(), "docker*".into()]
}
fn default_zpool() -> PathBuf {
    "/usr/sbin/zpool".into()
}
fn default_zfs() -> PathBuf {
    "/usr/sbin/zfs".into()
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_procfs() -> PathBuf {
    "/proc".into()
}
fn default_sysfs() -> PathBuf {
    "/sys".into()
}
fn default_devfs() -> PathBuf {
    "/dev".into()
}

/// Validated settings the agent runs with.
#[derive(Clone)]
pub struct Settings {
    pub collector_url: String,
    pub server_name: String,
    pub node: String,
    pub interval: Duration,
    pub shutdown_grace: Duration,
    pub tls: TlsMaterial,
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub raw: RawConfig,
}

/// Reads the file and parses it; the raw form is enough for `once`.
pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
    let mut raw: RawConfig = config::load(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    raw.tls = raw.tls.relative_to(base);
    raw.spool.dir = base.join(&raw.spool.dir);
    if let Some(lib) = &raw.sources.gpu.library {
        raw.sources.gpu.library = Some(base.join(lib));
    }
    if let Some(p) = &raw.sources.kmsg.path {
        raw.sources.kmsg.path = Some(base.join(p));
    }
    let slurm = &mut raw.sources.slurm;
    for p in [&mut slurm.restd_token_file, &mut slurm.restd_ca_file]
        .into_iter()
        .flatten()
    {
        *p = base.join(&*p);
    }
    Ok(raw)
}

/// `[sources.slurm] restd*`: the address parses (and its CA file loads),
/// the token file is readable, and nothing is set that would be ignored.
fn check_restd(path: &Path, s: &SlurmConfig) -> Result<(), ConfigError> {
    use crate::sources::slurm::restd;
    let Some(url) = &s.restd else {
        for (key, set) in [
            ("restd_token_file", s.restd_token_file.is_some()),
            ("restd_user", s.restd_user.is_some()),
            ("restd_ca_file", s.restd_ca_file.is_some()),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    path,
                    &format!("sources.slurm.{key}"),
                    "only used with restd: set restd (e.g. \"unix:/run/slurmrestd/slurmrestd.socket\") or remove this key",
                ));
            }
        }
        return Ok(());
    };
    restd::Addr::parse(url, s.restd_ca_file.as_deref()).map_err(|e| {
        let key = if e.contains("CA") || e.contains("restd_ca_file") {
            "sources.slurm.restd_ca_file"
        } else {
            "sources.slurm.restd"
        };
        ConfigError::invalid(path, key, e)
    })?;
    let v = &s.restd_api_version;
    let well_formed = v.strip_prefix('v').is_some_and(|n| {
        n.split('.').count() == 3
            && n.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    });
    if !well_formed {
        return Err(ConfigError::invalid(
            path,
            "sources.slurm.restd_api_version",
            format!("{v:?} is not an API version like \"v0.0.38\""),
        ));
    }
    if let Some(file) = &s.restd_token_file {
        restd::read_token(file)
            .map_err(|e| ConfigError::invalid(path, "sources.slurm.restd_token_file", e))?;
    }
    if let Some(user) = &s.restd_user {
        if s.restd_token_file.is_none() {
            return Err(ConfigError::invalid(
                path,
                "sources.slurm.restd_user",
                "is sent with the token: set restd_token_file too",
            ));
        }
        if user.is_empty() || hyper::header::HeaderValue::from_str(user).is_err() {
            return Err(ConfigError::invalid(
                path,
                "sources.slurm.restd_user",
                format!("{user:?} is not a user name that can be sent"),
            ));
        }
    }
    Ok(())
}

/// Everything `run` needs, checked: URL, TLS files, node name, limits.
/// An error names the line of its key where the file sets it.
pub fn validate(path: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
    validate_raw(path, raw).map_err(|e| match std::fs::read_to_string(path) {
        Ok(text) => e.located(&text),
        Err(_) => e,
    })
}

fn validate_raw(path: &Path, raw: RawConfig) -> Result<Settings, ConfigError> {
    let collector_url = raw.collector.clone().ok_or_else(|| {
        ConfigError::invalid(
            path,
            "collector",
            "missing: set the collector URL, e.g. collector = \"https://collector.example:7443\"",
        )
    })?;
    if !collector_url.starts_with("https://") {
        return Err(ConfigError::invalid(
            path,
            "collector",
            format!("{collector_url:?} must start with https:// (the agent only speaks TLS)"),
        ));
    }
    let server_name = match &raw.server_name {
        Some(s) => s.clone(),
        None => vitals_common::tls::host_of(&collector_url).ok_or_else(|| {
            ConfigError::invalid(path, "collector", format!("no host in {collector_url:?}"))
        })?,
    };
    if raw.interval < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            path,
            "interval",
            "must be at least 10ms",
        ));
    }
    if let Err((key, message)) = crate::sources::kmsg::check(&raw.sources.kmsg) {
        return Err(ConfigError::invalid(path, &key, message));
    }
    if let Err((key, message)) = crate::sources::mesh::check(&raw.sources.mesh) {
        return Err(ConfigError::invalid(path, &key, message));
    }
    if let Err((key, message)) = crate::net_test::check(&raw.net_test) {
        return Err(ConfigError::invalid(path, &key, message));
    }
    let tls = raw
        .tls
        .load()
        .map_err(|e| ConfigError::invalid(path, "tls", e.to_string()))?;
    let node = match &raw.node {
        Some(n) => n.clone(),
        None => {
            tls.own_identity()
                .map_err(|e| ConfigError::invalid(path, "tls.cert", e.to_string()))?
                .0
        }
    };
    if !vitals_common::identity::valid_node_name(&node) {
        return Err(ConfigError::invalid(
            path,
            "node",
            format!("{node:?} is not a valid node name"),
        ));
    }
    if raw.sources.zfs.command_timeout < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            path,
            "sources.zfs.command_timeout",
            "must be at least 10ms",
        ));
    }
    if raw.sources.slurm.command_timeout < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            path,
            "sources.slurm.command_timeout",
            "must be at least 10ms",
        ));
    }
    for ds in &raw.sources.zfs.cache_datasets {
        if ds.is_empty() || ds.starts_with('-') || ds.contains(['\t', '\n', '@']) {
            return Err(ConfigError::invalid(
                path,
                "sources.zfs.cache_datasets",
                format!("{ds:?} is not a dataset name like \"tank/train\""),
            ));
        }
    }
    if !raw.sources.zfs.cache_datasets.is_empty() && !raw.sources.zfs.commands {
        return Err(ConfigError::invalid(
            path,
            "sources.zfs.cache_datasets",
            "needs `zfs get`: set commands = true or remove cache_datasets",
        ));
    }
    check_restd(path, &raw.sources.slurm)?;
    if let Err(e) = raw.sources.joblog.patterns() {
        return Err(ConfigError::invalid(
            path,
            "sources.joblog",
            format!("bad pattern {e}"),
        ));
    }
    if let Some(c) = raw
        .sources
        .joblog
        .errors
        .iter()
        .find(|e| e.class.trim().is_empty())
    {
        return Err(ConfigError::invalid(
            path,
            "sources.joblog.errors",
            format!("class {:?} must not be empty", c.class),
        ));
    }
    if let Err((key, message)) = crate::sources::probe::check(&raw.sources.probe) {
        return Err(ConfigError::invalid(path, &key, message));
    }
    if raw.sources.joblog.max_read_bytes < 1024 {
        return Err(ConfigError::invalid(
            path,
            "sources.joblog.max_read_bytes",
            "must be at least 1024",
        ));
    }
    if let Some(lib) = &raw.sources.gpu.library
        && !lib.exists()
    {
        return Err(ConfigError::invalid(
            path,
            "sources.gpu.library",
            format!(
                "{}: no such file (install the vendor library, or remove `library` to search the usual places)",
                lib.display()
            ),
        ));
    }
    if raw.sources.gpu.timeout < Duration::from_millis(10) {
        return Err(ConfigError::invalid(
            path,
            "sources.gpu.timeout",
            "must be at least 10ms",
        ));
    }
    for (pattern, mbps) in &raw.sources.net.expected_speed_mbps {
        if *mbps == 0 {
            return Err(ConfigError::invalid(
                path,
                "sources.net.expected_speed_mbps",
                format!("{pattern:?}: the speed must be above 0 Mbit/s"),
            ));
        }
    }
    if raw.spool.max_bytes < 1024 {
        return Err(ConfigError::invalid(
            path,
            "spool.max_bytes",
            "must be at least 1024",
        ));
    }
    Ok(Settings {
        collector_url,
        server_name,
        node,
        interval: raw.interval,
        shutdown_grace: raw.shutdown_grace,
        tls,
        spool_dir: raw.spool.dir.clone(),
        spool_max_bytes: raw.spool.max_bytes,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restd_error(f: impl FnOnce(&mut SlurmConfig)) -> Option<String> {
        let mut s = SlurmConfig::default();
        f(&mut s);
        check_restd(Path::new("agent.toml"), &s)
            .err()
            .map(|e| e.to_string())
    }

    #[test]
    fn restd_keys_are_checked_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("slurm.jwt");
        std::fs::write(&token, "SLURM_JWT=a.b.c\n").unwrap();
        assert_eq!(restd_error(|_| {}), None);
        let ok = |s: &mut SlurmConfig| {
            s.restd = Some("unix:/run/slurmrestd/slurmrestd.socket".into());
            s.restd_token_file = Some(token.clone());
            s.restd_user = Some("root".into());
        };
        assert_eq!(restd_error(ok), None);
        assert_eq!(
            restd_error(|s| s.restd = Some("http://head-01:6820".into())),
            None
        );
        type Change<'a> = Box<dyn Fn(&mut SlurmConfig) + 'a>;
        let cases: Vec<(Change, &str, &str)> = vec![
            (
                Box::new(|s| s.restd_token_file = Some(token.clone())),
                "sources.slurm.restd_token_file",
                "only used with restd",
            ),
            (
                Box::new(|s| s.restd = Some("head-01:6820".into())),
                "sources.slurm.restd",
                "must start with unix:, http:// or https://",
            ),
            (
                Box::new(|s| {
                    ok(s);
                    s.restd_api_version = "0.0.38".into();
                }),
                "sources.slurm.restd_api_version",
                "not an API version",
            ),
            (
                Box::new(|s| {
                    ok(s);
                    s.restd_token_file = None;
                }),
                "sources.slurm.restd_user",
                "set restd_token_file too",
            ),
            (
                Box::new(|s| {
                    ok(s);
                    s.restd_token_file = Some(dir.path().join("missing.jwt"));
                }),
                "sources.slurm.restd_token_file",
                "missing.jwt",
            ),
            (
                Box::new(|s| {
                    s.restd = Some("https://head-01:6820".into());
                    s.restd_ca_file = Some(dir.path().join("missing-ca.pem"));
                }),
                "sources.slurm.restd_ca_file",
                "missing-ca.pem",
            ),
        ];
        for (set, key, says) in cases {
            let e = restd_error(set).expect("an error");
            assert!(e.contains(key) && e.contains(says), "{e}");
            assert!(!e.contains("a.b.c"), "never the token: {e}");
        }
    }
}
