//! GPUs: AMD through ROCm SMI, NVIDIA through NVML, both loaded at run time
//! (`libloading`), and the amdgpu sysfs files when neither library is there.
//!
//! Every backend fills the same [`GpuStats`] per GPU and one function turns
//! them into samples, so a GPU reads the same whichever way it was read.
//! Names follow AMD's device-metrics-exporter (`gpu_gfx_activity`,
//! `gpu_used_vram`, `gpu_edge_temperature`, `gpu_clock{clock_type}`, ...) so
//! its dashboards work; units are the exporter's (VRAM and GTT in MiB, power
//! in W, clocks in MHz, energy in µJ). Labels on every per-GPU series: `gpu`
//! (the backend's index), `card`, `serial`, `model`, `pci_bus`.
//!
//! `auto` loads a vendor library only where its device file is under
//! `[paths] devfs` (`kfd` for ROCm SMI, `nvidiactl` or `nvidia0` for NVML):
//! on a host without a GPU nothing is loaded (a loaded librocm_smi64 keeps
//! its C++ runtime mapped for nothing), "no GPU device" is said once at
//! debug, and the check is repeated with the open's backoff (a driver may
//! come up later). An explicit backend or `library` loads as configured.
//!
//! The backend is opened and read on its own thread. A cycle waits for it
//! at most `[sources.gpu] timeout`; a read still running then (a driver call
//! that hangs) is reported (`vitals_gpu_read_hung`,
//! `vitals_gpu_read_timeouts_total`) and no new read is started until it
//! returns, so hung calls never pile up and the other sources never wait.

pub mod jobs;
pub mod nvml;
pub mod nvml_sys;
pub mod rocm;
pub mod rocm_sys;
pub mod sysfs;

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vitals_common::model::{LabelSet, Labels, Sample};

use super::{Source, SourceError};
use crate::config::RawConfig;

/// `[sources.gpu] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// ROCm SMI, then NVML, then amdgpu sysfs: the first that finds a GPU.
    #[default]
    Auto,
    /// AMD ROCm SMI (`librocm_smi64.so`).
    Rocm,
    /// NVIDIA NVML (`libnvidia-ml.so.1`).
    Nvml,
    /// amdgpu files under `/sys/class/drm/card*/device`.
    Sysfs,
    /// No GPU source.
    Off,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Rocm => "rocm",
            BackendKind::Nvml => "nvml",
            BackendKind::Sysfs => "sysfs",
            BackendKind::Off => "off",
        }
    }
}

/// One GPU process and the memory it holds on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuProcess {
    pub pid: u32,
    /// Bytes of GPU memory, when the backend can say.
    pub vram_bytes: Option<u64>,
}

/// ECC error counts of one block (or the whole GPU).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EccCount {
    pub correctable: u64,
    pub uncorrectable: u64,
    pub deferred: Option<u64>,
}

/// What identifies a GPU; read once when the backend opens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuIdentity {
    pub index: u32,
    pub card: String,
    /// Serial number, else the unique id, else empty.
    pub serial: String,
    pub model: String,
    /// PCI address, lower case: `0000:1e:00.0`.
    pub pci_bus: String,
}

impl GpuIdentity {
    pub fn labels(&self) -> Labels {
        let mut l = Labels::new();
        l.insert("gpu".into(), self.index.to_string());
        l.insert("card".into(), self.card.clone());
        l.insert("serial".into(), self.serial.clone());
        l.insert("model".into(), self.model.clone());
        l.insert("pci_bus".into(), self.pci_bus.clone());
        l
    }
}

/// One reading of one GPU. `None`: the backend cannot read it here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuStats {
    pub id: GpuIdentity,
    /// Graphics engine busy, percent.
    pub gfx_activity: Option<f64>,
    /// Memory controller busy, percent.
    pub umc_activity: Option<f64>,
    pub vram_used_bytes: Option<u64>,
    pub vram_total_bytes: Option<u64>,
    /// Set aside by the driver and firmware, counted neither as used nor
    /// free (NVML's v2 memory call; elsewhere inside `used`).
    pub vram_reserved_bytes: Option<u64>,
    pub vis_vram_used_bytes: Option<u64>,
    pub vis_vram_total_bytes: Option<u64>,
    pub gtt_used_bytes: Option<u64>,
    pub gtt_total_bytes: Option<u64>,
    /// Degrees Celsius.
    pub temp_edge: Option<f64>,
    pub temp_junction: Option<f64>,
    pub temp_memory: Option<f64>,
    /// Where the GPU starts slowing itself down (NVML's slowdown threshold).
    pub temp_slowdown: Option<f64>,
    /// Per HBM stack: (index, degrees Celsius).
    pub temp_hbm: Vec<(u32, f64)>,
    /// Watts.
    pub power_watts: Option<f64>,
    pub power_cap_watts: Option<f64>,
    /// Microjoules since the driver started counting.
    pub energy_microjoules: Option<f64>,
    /// (clock_type label, MHz).
    pub clocks_mhz: Vec<(&'static str, f64)>,
    pub fan_speed_percent: Option<f64>,
    pub fan_rpm: Option<f64>,
    /// Millivolts.
    pub voltage_mv: Option<f64>,
    pub ecc_total: Option<EccCount>,
    /// Per block: (block name as in the metric, counts).
    pub ecc_blocks: Vec<(&'static str, EccCount)>,
    /// GT/s per lane.
    pub pcie_speed_gts: Option<f64>,
    pub pcie_width: Option<u32>,
    pub pcie_replay_count: Option<u64>,
    /// 0 no errors, 1 one error, 2 more than one (ROCm's XGMI status).
    pub xgmi_error_status: Option<u32>,
    /// (reason label, active).
    pub throttle: Vec<(&'static str, bool)>,
    /// NVIDIA Xid critical errors seen since the agent started, and the last.
    pub xid_errors_total: Option<u64>,
    pub last_xid: Option<u64>,
    pub processes: Option<Vec<GpuProcess>>,
}

const MIB: f64 = 1024.0 * 1024.0;

/// Appends the samples of one GPU.
pub fn push_samples(g: &GpuStats, out: &mut Vec<Sample>) {
    let base = LabelSet::from(g.id.labels());
    let mut put = |name: &'static str, v: f64| out.push(Sample::with_labels(name, &base, v));
    let opt = |v: Option<u64>| v.map(|b| b as f64 / MIB);
    for (name, v) in [
        ("gpu_gfx_activity", g.gfx_activity),
        ("gpu_umc_activity", g.umc_activity),
        ("gpu_used_vram", opt(g.vram_used_bytes)),
        ("gpu_total_vram", opt(g.vram_total_bytes)),
        (
            "gpu_free_vram",
            match (g.vram_total_bytes, g.vram_used_bytes) {
                (Some(t), Some(u)) => Some(
                    t.saturating_sub(u)
                        .saturating_sub(g.vram_reserved_bytes.unwrap_or(0))
                        as f64
                        / MIB,
                ),
                _ => None,
            },
        ),
        ("gpu_reserved_vram", opt(g.vram_reserved_bytes)),
        ("gpu_used_visible_vram", opt(g.vis_vram_used_bytes)),
        ("gpu_total_visible_vram", opt(g.vis_vram_total_bytes)),
        ("gpu_used_gtt", opt(g.gtt_used_bytes)),
        ("gpu_total_gtt", opt(g.gtt_total_bytes)),
        ("gpu_edge_temperature", g.temp_edge),
        ("gpu_junction_temperature", g.temp_junction),
        ("gpu_memory_temperature", g.temp_memory),
        ("gpu_slowdown_temperature", g.temp_slowdown),
        ("gpu_power_usage", g.power_watts),
        ("gpu_power_cap", g.power_cap_watts),
        ("gpu_energy_consumed", g.energy_microjoules),
        ("gpu_fan_speed", g.fan_speed_percent),
        ("gpu_fan_rpm", g.fan_rpm),
        ("gpu_voltage", g.voltage_mv),
        ("gpu_pcie_speed", g.pcie_speed_gts),
        ("gpu_pcie_width", g.pcie_width.map(f64::from)),
        (
            "gpu_pcie_replay_count",
            g.pcie_replay_count.map(|v| v as f64),
        ),
        ("gpu_xgmi_error_status", g.xgmi_error_status.map(f64::from)),
        ("gpu_xid_errors_total", g.xid_errors_total.map(|v| v as f64)),
        ("gpu_last_xid", g.last_xid.map(|v| v as f64)),
    ] {
        if let Some(v) = v {
            put(name, v);
        }
    }
    if let Some(e) = g.ecc_total {
        put("gpu_ecc_correct_total", e.correctable as f64);
        put("gpu_ecc_uncorrect_total", e.uncorrectable as f64);
        if let Some(d) = e.deferred {
            put("gpu_ecc_deferred_total", d as f64);
        }
    }
    // One more label (none when `key` is empty).
    let mut with = |name: String, key: &str, val: &str, v: f64| {
        let mut labels = base.clone();
        if !key.is_empty() {
            labels.insert(key.into(), val.into());
        }
        out.push(Sample {
            name: name.into(),
            labels,
            value: v,
        });
    };
    for (block, e) in &g.ecc_blocks {
        with(
            format!("gpu_ecc_correct_{block}"),
            "block",
            block,
            e.correctable as f64,
        );
        with(
            format!("gpu_ecc_uncorrect_{block}"),
            "block",
            block,
            e.uncorrectable as f64,
        );
        if let Some(d) = e.deferred {
            with(
                format!("gpu_ecc_deferred_{block}"),
                "block",
                block,
                d as f64,
            );
        }
    }
    for (hbm, t) in &g.temp_hbm {
        with(
            "gpu_hbm_temperature".into(),
            "hbm_index",
            &hbm.to_string(),
            *t,
        );
    }
    for (clock, mhz) in &g.clocks_mhz {
        with("gpu_clock".into(), "clock_type", clock, *mhz);
    }
    for (reason, on) in &g.throttle {
        with(
            "gpu_throttle".into(),
            "reason",
            reason,
            if *on { 1.0 } else { 0.0 },
        );
    }
    if let Some(procs) = &g.processes {
        with("gpu_process_count".into(), "", "", procs.len() as f64);
        for p in procs {
            if let Some(b) = p.vram_bytes {
                with(
                    "gpu_process_used_vram".into(),
                    "pid",
                    &p.pid.to_string(),
                    b as f64 / MIB,
                );
            }
        }
    }
}

/// A NUL-terminated string a vendor library wrote into `buf`, trimmed.
pub(crate) fn c_string(buf: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Loads a vendor library: the configured file, else the first name of
/// `search` that loads; `absent` says what was searched.
pub(crate) fn load_library<A>(
    configured: Option<&std::path::Path>,
    search: &[&str],
    absent: &str,
    load: impl Fn(&std::path::Path) -> Result<A, libloading::Error>,
) -> Result<(A, PathBuf), OpenError> {
    if let Some(p) = configured {
        return load(p)
            .map(|a| (a, p.to_path_buf()))
            .map_err(|e| OpenError::Failed(format!("cannot load {}: {e}", p.display())));
    }
    search
        .iter()
        .find_map(|name| {
            load(std::path::Path::new(name))
                .ok()
                .map(|a| (a, PathBuf::from(name)))
        })
        .ok_or_else(|| OpenError::Absent(absent.to_string()))
}

/// Vendor call errors, each logged once per GPU, function and error. A
/// success does not reset it: one function reads several sensors, and one
/// failing among working ones must not log every cycle.
pub(crate) struct CallErrors<E> {
    vendor: &'static str,
    seen: std::collections::HashMap<(u32, &'static str), E>,
}

impl<E: Copy + PartialEq + std::fmt::Display> CallErrors<E> {
    pub(crate) fn new(vendor: &'static str) -> Self {
        CallErrors {
            vendor,
            seen: std::collections::HashMap::new(),
        }
    }

    /// The value, or `None`: quietly when `unsupported(e)`, else logged once.
    pub(crate) fn keep<T>(
        &mut self,
        gpu: u32,
        what: &'static str,
        r: Result<T, E>,
        unsupported: impl Fn(E) -> bool,
    ) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) if unsupported(e) => None,
            Err(e) => {
                if self.seen.insert((gpu, what), e) != Some(e) {
                    tracing::warn!(gpu, function = what, error = %e, "gpu: {} call failed; that metric is skipped", self.vendor);
                }
                None
            }
        }
    }
}

/// A backend that is open and has found at least one GPU.
/// "2 GPU(s): 2× Arcturus GL-XL [Instinct MI100]" for the log.
pub fn summary<'a>(models: impl Iterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for m in models {
        match counts.iter_mut().find(|(name, _)| *name == m) {
            Some((_, n)) => *n += 1,
            None => counts.push((m, 1)),
        }
    }
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let list: Vec<String> = counts.iter().map(|(m, n)| format!("{n}× {m}")).collect();
    format!("{total} GPU(s): {}", list.join(", "))
}

pub trait Backend: Send {
    /// "rocm", "nvml" or "sysfs".
    fn kind(&self) -> BackendKind;
    /// One line for the log: library, version, GPUs.
    fn describe(&self) -> String;
    /// Reads every GPU. An error means this whole read failed.
    fn read(&mut self) -> Result<Vec<GpuStats>, String>;
}

/// Why a backend could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No GPU device file at all (`auto` only): no library was loaded.
    NoDevice(String),
    /// Nothing to read on this host: no library, or no GPU behind it.
    Absent(String),
    /// Something is there but broken (bad library, failing calls).
    Failed(String),
}

impl OpenError {
    fn text(&self) -> &str {
        match self {
            OpenError::NoDevice(s) | OpenError::Absent(s) | OpenError::Failed(s) => s,
        }
    }
}

/// What the worker needs to open a backend.
#[derive(Debug, Clone)]
pub struct OpenSpec {
    pub kind: BackendKind,
    pub library: Option<PathBuf>,
    pub sysfs: PathBuf,
    /// Where `auto` looks for the vendors' device files.
    pub devfs: PathBuf,
    pub processes: bool,
}

/// The device files that show a vendor's driver is loaded: ROCm SMI needs
/// the AMD KFD (`kfd`), NVML the NVIDIA control device.
fn vendor_devices(kind: BackendKind) -> &'static [&'static str] {
    match kind {
        BackendKind::Rocm => &["kfd"],
        BackendKind::Nvml => &["nvidiactl", "nvidia0"],
        _ => &[],
    }
}

/// `Err(NoDevice)` when none of `kind`'s device files is under `devfs`.
/// Loading a vendor library on a host without its GPU costs memory (Debian's
/// librocm_smi64 and its C++ runtime stay mapped) and says nothing, so
/// `auto` only loads one whose device is there.
fn device_present(kind: BackendKind, devfs: &std::path::Path) -> Result<(), OpenError> {
    let names = vendor_devices(kind);
    if names.iter().any(|n| devfs.join(n).exists()) {
        return Ok(());
    }
    let list: Vec<String> = names
        .iter()
        .map(|n| devfs.join(n).display().to_string())
        .collect();
    Err(OpenError::NoDevice(format!(
        "no {} device ({} absent); library not loaded",
        kind.as_str(),
        list.join(", ")
    )))
}

/// Opens the configured backend; `auto` tries each in turn.
pub fn open(spec: &OpenSpec) -> Result<Box<dyn Backend>, OpenError> {
    match spec.kind {
        BackendKind::Rocm => rocm::Rocm::open(spec).map(|b| Box::new(b) as Box<dyn Backend>),
        BackendKind::Nvml => nvml::Nvml::open(spec).map(|b| Box::new(b) as Box<dyn Backend>),
        BackendKind::Sysfs => sysfs::Sysfs::open(spec).map(|b| Box::new(b) as Box<dyn Backend>),
        BackendKind::Off => Err(OpenError::Absent("backend = \"off\"".into())),
        BackendKind::Auto => {
            let mut why = Vec::new();
            let mut failed = false;
            // Whether a vendor library was tried at all.
            let mut loaded = false;
            for kind in [BackendKind::Rocm, BackendKind::Nvml, BackendKind::Sysfs] {
                // A configured library belongs to whichever vendor it is
                // (and is loaded as configured); sysfs has none.
                let one = OpenSpec {
                    kind,
                    ..spec.clone()
                };
                let r = if spec.library.is_none() {
                    device_present(kind, &spec.devfs).and_then(|()| open(&one))
                } else {
                    open(&one)
                };
                match r {
                    Ok(b) => return Ok(b),
                    Err(e) => {
                        failed |= matches!(e, OpenError::Failed(_));
                        loaded |=
                            kind != BackendKind::Sysfs && !matches!(e, OpenError::NoDevice(_));
                        why.push(format!("{}: {}", kind.as_str(), e.text()));
                    }
                }
            }
            let text = why.join("; ");
            Err(if failed {
                OpenError::Failed(text)
            } else if loaded {
                OpenError::Absent(text)
            } else {
                OpenError::NoDevice(text)
            })
        }
    }
}

enum Reply {
    /// The backend opened (described), or did not, and when the next
    /// attempt may run.
    Opened(Result<String, (OpenError, Instant)>),
    Read(Result<Vec<GpuStats>, String>),
}

enum Request {
    Read,
    Stop,
}

/// The backend's thread: opens on the first request, then reads on each.
/// Dropping the backend (on `Stop`, or when the source goes away) shuts
/// the library down.
fn worker(spec: OpenSpec, requests: Receiver<Request>, replies: SyncSender<Reply>) {
    let mut backend: Option<Box<dyn Backend>> = None;
    // (when the next attempt may run, the wait after it, the last error)
    let mut retry: Option<(Instant, Duration, OpenError)> = None;
    while let Ok(Request::Read) = requests.recv() {
        if backend.is_none() {
            // Retry opening now and then, backing off: a driver may come up
            // after the agent, but a host without a GPU should not be
            // probed (and the library's own stderr lines repeated) often.
            if let Some((at, _, e)) = &retry
                && Instant::now() < *at
            {
                let _ = replies.send(Reply::Opened(Err((e.clone(), *at))));
                continue;
            }
            match open(&spec) {
                Ok(b) => {
                    retry = None;
                    let _ = replies.send(Reply::Opened(Ok(b.describe())));
                    backend = Some(b);
                }
                Err(e) => {
                    let wait = retry
                        .as_ref()
                        .map_or(REOPEN_FIRST, |(_, w, _)| (*w * 2).min(REOPEN_MAX));
                    let at = Instant::now() + wait;
                    retry = Some((at, wait, e.clone()));
                    let _ = replies.send(Reply::Opened(Err((e, at))));
                    continue;
                }
            }
        }
        if let Some(b) = backend.as_mut() {
            let r = b.read();
            if replies.send(Reply::Read(r)).is_err() {
                break;
            }
        }
    }
    drop(backend);
}

/// A backend that could not be opened is tried again after this, then
/// after twice as long each time, up to [`REOPEN_MAX`].
const REOPEN_FIRST: Duration = Duration::from_secs(60);
const REOPEN_MAX: Duration = Duration::from_secs(3600);

enum State {
    /// No read in flight.
    Idle,
    /// A read (or open) was asked for and has not answered yet.
    Busy,
}

pub struct Gpu {
    spec: OpenSpec,
    timeout: Duration,
    requests: Option<SyncSender<Request>>,
    replies: Option<Receiver<Reply>>,
    thread: Option<thread::JoinHandle<()>>,
    state: State,
    /// The read in flight has passed its timeout (and was reported).
    hung: bool,
    timeouts_total: u64,
    /// What the last open said, so each change is logged once.
    open_logged: Option<Result<String, String>>,
    /// After a failed open: until when the thread will not try again, and
    /// why. Cycles before then answer at once, without asking the thread.
    closed_until: Option<(Instant, String)>,
    /// The last read error logged.
    read_logged: Option<String>,
    /// Where each GPU's processes are looked up (`/proc`); None: GPU
    /// series carry no job labels.
    job_procfs: Option<PathBuf>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let g = &cfg.sources.gpu;
    Box::new(Gpu {
        spec: OpenSpec {
            kind: g.backend,
            library: g.library.clone(),
            sysfs: cfg.paths.sysfs.clone(),
            devfs: cfg.paths.devfs.clone(),
            processes: g.processes,
        },
        timeout: g.timeout,
        requests: None,
        replies: None,
        thread: None,
        state: State::Idle,
        hung: false,
        timeouts_total: 0,
        open_logged: None,
        closed_until: None,
        read_logged: None,
        job_procfs: (g.processes && g.job_labels).then(|| cfg.paths.procfs.clone()),
    })
}

/// Adds `job_id` and `user` to the samples of each GPU that runs a job's
/// process (labels `gpu` of `samples`, keyed by GPU index).
pub fn label_jobs(samples: &mut [Sample], jobs: &std::collections::BTreeMap<u32, jobs::JobOf>) {
    if jobs.is_empty() {
        return;
    }
    for s in samples {
        let Some(j) = s
            .labels
            .get("gpu")
            .and_then(|g| g.parse::<u32>().ok())
            .and_then(|g| jobs.get(&g))
        else {
            continue;
        };
        s.labels.insert("job_id".into(), j.job_id.clone());
        s.labels.insert("user".into(), j.user.clone());
    }
}

impl Gpu {
    fn start(&mut self) -> Result<(), SourceError> {
        if self.requests.is_some() {
            return Ok(());
        }
        let (req_tx, req_rx) = mpsc::sync_channel(1);
        let (rep_tx, rep_rx) = mpsc::sync_channel(2);
        let spec = self.spec.clone();
        let handle = thread::Builder::new()
            .name("vitals-gpu".into())
            .spawn(move || worker(spec, req_rx, rep_tx))
            .map_err(|e| SourceError::Failed(format!("cannot start the GPU thread: {e}")))?;
        self.requests = Some(req_tx);
        self.replies = Some(rep_rx);
        self.thread = Some(handle);
        Ok(())
    }

    fn self_metrics(&self, hung: bool, out: &mut Vec<Sample>) {
        out.push(Sample::new(
            "vitals_gpu_read_hung",
            if hung { 1.0 } else { 0.0 },
        ));
        out.push(Sample::new(
            "vitals_gpu_read_timeouts_total",
            self.timeouts_total as f64,
        ));
    }

    fn log_open(&mut self, r: &Result<String, OpenError>) {
        let key = r.clone().map_err(|e| e.text().to_string());
        if self.open_logged.as_ref() == Some(&key) {
            return;
        }
        match r {
            Ok(desc) => tracing::info!(backend = self.spec.kind.as_str(), "gpu: using {desc}"),
            Err(OpenError::NoDevice(why)) => tracing::debug!(
                reason = %why,
                "gpu: no GPU device; no vendor library loaded; looking again after {}s, backing off to {}s",
                REOPEN_FIRST.as_secs(),
                REOPEN_MAX.as_secs()
            ),
            Err(OpenError::Absent(why)) if self.spec.kind == BackendKind::Auto => {
                tracing::info!(reason = %why, "gpu: no GPU found; the gpu source stays quiet")
            }
            Err(OpenError::Absent(why)) => tracing::info!(
                backend = self.spec.kind.as_str(),
                reason = %why,
                "gpu: no GPU found through the configured backend; trying again later (after {}s, backing off to {}s)",
                REOPEN_FIRST.as_secs(),
                REOPEN_MAX.as_secs()
            ),
            Err(OpenError::Failed(why)) => tracing::warn!(
                backend = self.spec.kind.as_str(),
                error = %why,
                "gpu: cannot open the GPU library; GPUs are not read (other sources go on); trying again after {}s, backing off to {}s",
                REOPEN_FIRST.as_secs(),
                REOPEN_MAX.as_secs()
            ),
        }
        self.open_logged = Some(key);
    }
}

impl Source for Gpu {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        if self.spec.kind == BackendKind::Off {
            return Err(SourceError::Unavailable("backend = \"off\"".into()));
        }
        if let Some((until, why)) = &self.closed_until {
            if Instant::now() < *until {
                return Err(SourceError::Unavailable(why.clone()));
            }
            self.closed_until = None;
        }
        self.start()?;
        let deadline = Instant::now() + self.timeout;
        if let State::Idle = self.state {
            let sent = self
                .requests
                .as_ref()
                .map(|tx| tx.try_send(Request::Read).is_ok())
                .unwrap_or(false);
            if !sent {
                return Err(SourceError::Failed("the GPU thread has stopped".into()));
            }
            self.state = State::Busy;
        }
        loop {
            let Some(rx) = self.replies.as_ref() else {
                return Err(SourceError::Failed("the GPU thread has stopped".into()));
            };
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Reply::Opened(r)) => {
                    let r = r.map_err(|(e, until)| {
                        self.closed_until = Some((until, e.text().to_string()));
                        e
                    });
                    self.log_open(&r);
                    if let Err(e) = r {
                        // Logged once above; every cycle after is quiet
                        // (and does not ask the thread) until the next
                        // attempt says something new.
                        self.state = State::Idle;
                        self.hung = false;
                        return Err(SourceError::Unavailable(e.text().to_string()));
                    }
                    // Opened: the read follows on the same request.
                }
                Ok(Reply::Read(r)) => {
                    self.state = State::Idle;
                    if std::mem::take(&mut self.hung) {
                        // The answer to a read that hung: stale, drop it;
                        // the next cycle starts a fresh one.
                        tracing::info!("gpu: the hung read returned; reading again next cycle");
                        self.self_metrics(false, out);
                        return Ok(());
                    }
                    return match r {
                        Ok(gpus) => {
                            self.read_logged = None;
                            let first = out.len();
                            for g in &gpus {
                                push_samples(g, out);
                            }
                            if let Some(procfs) = &self.job_procfs {
                                let by_gpu = jobs::jobs_by_gpu(
                                    procfs,
                                    gpus.iter().filter_map(|g| {
                                        Some((g.id.index, g.processes.as_deref()?))
                                    }),
                                );
                                label_jobs(&mut out[first..], &by_gpu);
                            }
                            out.push(Sample::new("gpu_count", gpus.len() as f64));
                            self.self_metrics(false, out);
                            Ok(())
                        }
                        Err(e) => {
                            if self.read_logged.as_ref() != Some(&e) {
                                tracing::warn!(error = %e, "gpu: reading the GPUs failed");
                                self.read_logged = Some(e.clone());
                            }
                            Err(SourceError::Failed(e))
                        }
                    };
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !self.hung {
                        self.hung = true;
                        self.timeouts_total += 1;
                        tracing::warn!(
                            timeout = ?self.timeout,
                            "gpu: a GPU read has not returned in time (a hung driver call?); no new read starts until it does"
                        );
                    }
                    self.self_metrics(true, out);
                    return Ok(());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.requests = None;
                    self.replies = None;
                    self.state = State::Idle;
                    self.hung = false;
                    return Err(SourceError::Failed(
                        "the GPU thread has stopped; restarting it next cycle".into(),
                    ));
                }
            }
        }
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // Ask the thread to shut the library down, and give it a moment;
        // a thread stuck in a driver call is left behind.
        if let Some(tx) = self.requests.take() {
            let _ = tx.try_send(Request::Stop);
        }
        self.replies = None;
        if let Some(h) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < until {
                thread::sleep(Duration::from_millis(5));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}
