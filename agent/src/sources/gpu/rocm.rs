//! AMD GPUs through ROCm SMI: a safe layer over [`rocm_sys`].
//!
//! The library is searched as `librocm_smi64.so.{7,6,5,1}` and
//! `librocm_smi64.so` through the dynamic linker, then under `/opt/rocm/lib`
//! and `/usr/lib`; `[sources.gpu] library` names one file instead.
//! `rsmi_init` runs once when the backend opens and `rsmi_shut_down` when it
//! is dropped. Every `rsmi_status_t` maps to one [`RsmiError`]; "not
//! supported" (including a function the library does not export) drops that
//! one metric, quietly; any other error on a metric is logged once per GPU
//! and function, and the other metrics go on.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::c_char;
use std::path::PathBuf;

use super::rocm_sys::{self as sys, Api, Buf, ErrorCount, ProcessInfo};
use super::{
    Backend, BackendKind, CallErrors, EccCount, GpuIdentity, GpuProcess, GpuStats, OpenError,
    OpenSpec, c_string, load_library,
};

/// `rsmi_status_t`, one arm per documented value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RsmiError {
    #[error("RSMI_STATUS_INVALID_ARGS")]
    InvalidArgs,
    #[error("RSMI_STATUS_NOT_SUPPORTED")]
    NotSupported,
    #[error("RSMI_STATUS_FILE_ERROR")]
    FileError,
    #[error("RSMI_STATUS_PERMISSION")]
    Permission,
    #[error("RSMI_STATUS_OUT_OF_RESOURCES")]
    OutOfResources,
    #[error("RSMI_STATUS_INTERNAL_EXCEPTION")]
    InternalException,
    #[error("RSMI_STATUS_INPUT_OUT_OF_BOUNDS")]
    InputOutOfBounds,
    #[error("RSMI_STATUS_INIT_ERROR")]
    InitError,
    #[error("RSMI_STATUS_NOT_YET_IMPLEMENTED")]
    NotYetImplemented,
    #[error("RSMI_STATUS_NOT_FOUND")]
    NotFound,
    #[error("RSMI_STATUS_INSUFFICIENT_SIZE")]
    InsufficientSize,
    #[error("RSMI_STATUS_INTERRUPT")]
    Interrupt,
    #[error("RSMI_STATUS_UNEXPECTED_SIZE")]
    UnexpectedSize,
    #[error("RSMI_STATUS_NO_DATA")]
    NoData,
    #[error("RSMI_STATUS_UNEXPECTED_DATA")]
    UnexpectedData,
    #[error("RSMI_STATUS_BUSY")]
    Busy,
    #[error("RSMI_STATUS_REFCOUNT_OVERFLOW")]
    RefcountOverflow,
    #[error("RSMI_STATUS_SETTING_UNAVAILABLE")]
    SettingUnavailable,
    #[error("RSMI_STATUS_AMDGPU_RESTART_ERR")]
    AmdgpuRestartErr,
    #[error("RSMI_STATUS_DRM_ERROR")]
    DrmError,
    #[error("RSMI_STATUS_FAIL_LOAD_MODULE")]
    FailLoadModule,
    #[error("RSMI_STATUS_FAIL_LOAD_SYMBOL")]
    FailLoadSymbol,
    #[error("RSMI_STATUS_UNKNOWN_ERROR")]
    UnknownError,
    /// A code this version of Vitals does not know.
    #[error("rsmi status {0}")]
    Unexpected(u32),
    /// The library does not export this function.
    #[error("{0} is not in this library")]
    Missing(&'static str),
}

impl RsmiError {
    pub fn from_status(code: sys::Status) -> Result<(), RsmiError> {
        use RsmiError::*;
        Err(match code {
            0 => return Ok(()),
            1 => InvalidArgs,
            2 => NotSupported,
            3 => FileError,
            4 => Permission,
            5 => OutOfResources,
            6 => InternalException,
            7 => InputOutOfBounds,
            8 => InitError,
            9 => NotYetImplemented,
            10 => NotFound,
            11 => InsufficientSize,
            12 => Interrupt,
            13 => UnexpectedSize,
            14 => NoData,
            15 => UnexpectedData,
            16 => Busy,
            17 => RefcountOverflow,
            18 => SettingUnavailable,
            19 => AmdgpuRestartErr,
            20 => DrmError,
            21 => FailLoadModule,
            22 => FailLoadSymbol,
            0xFFFF_FFFF => UnknownError,
            other => Unexpected(other),
        })
    }

    /// The metric cannot be read on this GPU or library: not an error.
    pub fn unsupported(self) -> bool {
        matches!(
            self,
            RsmiError::NotSupported | RsmiError::NotYetImplemented | RsmiError::Missing(_)
        )
    }
}

/// Calls `$api.$f(args...)` if the library has it.
macro_rules! call {
    ($api:expr, $f:ident ( $($arg:expr),* )) => {
        match $api.$f {
            // SAFETY: the pointer was resolved for this name with the
            // prototype of rocm_smi.h; every pointer argument points at a
            // live, writable value of the type (or buffer size) it expects.
            Some(f) => RsmiError::from_status(unsafe { f($($arg),*) }),
            None => Err(RsmiError::Missing(stringify!($f))),
        }
    };
}

/// Library names and places searched, in order.
pub const SEARCH: &[&str] = &[
    "librocm_smi64.so.7",
    "librocm_smi64.so.6",
    "librocm_smi64.so.5",
    "librocm_smi64.so.1",
    "librocm_smi64.so",
    "/opt/rocm/lib/librocm_smi64.so",
    "/opt/rocm/lib/librocm_smi64.so.1",
    "/usr/lib/x86_64-linux-gnu/librocm_smi64.so.1",
    "/usr/lib/librocm_smi64.so.1",
    "/usr/lib/librocm_smi64.so",
];

pub struct Rocm {
    api: Api,
    path: PathBuf,
    version: String,
    gpus: Vec<GpuIdentity>,
    processes: bool,
    errors: CallErrors<RsmiError>,
}

/// Formats a BDFID (`domain << 32 | bus << 8 | device << 3 | function`).
pub fn pci_address(bdfid: u64) -> String {
    format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        bdfid >> 32,
        (bdfid >> 8) & 0xff,
        (bdfid >> 3) & 0x1f,
        bdfid & 0x7
    )
}

fn usable_id(s: &str) -> bool {
    !s.is_empty() && !s.eq_ignore_ascii_case("N/A")
}

impl Rocm {
    pub fn open(spec: &OpenSpec) -> Result<Rocm, OpenError> {
        let (api, path) = load_library(
            spec.library.as_deref(),
            SEARCH,
            "librocm_smi64.so not found (searched librocm_smi64.so.{7,6,5,1}, /opt/rocm/lib, /usr/lib)",
            Api::load,
        )?;
        let mut missing = api.missing();
        call!(api, rsmi_init(0)).map_err(|e| match e {
            RsmiError::InitError | RsmiError::NotFound => OpenError::Absent(format!(
                "{}: rsmi_init: {e} (no AMD GPU or amdgpu driver here)",
                path.display()
            )),
            other => OpenError::Failed(format!("{}: rsmi_init: {other}", path.display())),
        })?;
        // From here on, dropping `rocm` shuts the library down.
        let mut rocm = Rocm {
            api,
            path,
            version: String::new(),
            gpus: Vec::new(),
            processes: spec.processes,
            errors: CallErrors::new("ROCm SMI"),
        };
        let mut v = sys::Version {
            major: 0,
            minor: 0,
            patch: 0,
            build: std::ptr::null(),
        };
        if call!(rocm.api, rsmi_version_get(&mut v)).is_ok() {
            rocm.version = format!("{}.{}.{}", v.major, v.minor, v.patch);
        }
        let mut n = 0u32;
        call!(rocm.api, rsmi_num_monitor_devices(&mut n)).map_err(|e| {
            OpenError::Failed(format!(
                "{}: rsmi_num_monitor_devices: {e}",
                rocm.path.display()
            ))
        })?;
        if n == 0 {
            return Err(OpenError::Absent(format!(
                "{}: ROCm SMI sees no GPU",
                rocm.path.display()
            )));
        }
        for i in 0..n {
            let id = rocm.identity(i);
            rocm.gpus.push(id);
        }
        missing.retain(|m| *m != "rsmi_shut_down");
        if !missing.is_empty() {
            tracing::info!(
                library = %rocm.path.display(),
                missing = ?missing,
                "gpu: this ROCm SMI lacks some functions; their metrics are not reported"
            );
        }
        Ok(rocm)
    }

    fn identity(&mut self, i: u32) -> GpuIdentity {
        let mut name = [0 as c_char; 256];
        let model = match call!(
            self.api,
            rsmi_dev_name_get(i, name.as_mut_ptr(), name.len())
        ) {
            Ok(()) => c_string(&name),
            Err(_) => String::new(),
        };
        let mut serial = [0 as c_char; 64];
        let serial = match call!(
            self.api,
            rsmi_dev_serial_number_get(i, serial.as_mut_ptr(), serial.len() as u32)
        ) {
            Ok(()) => c_string(&serial),
            Err(_) => String::new(),
        };
        let serial = if usable_id(&serial) {
            serial
        } else {
            let mut uid = 0u64;
            match call!(self.api, rsmi_dev_unique_id_get(i, &mut uid)) {
                Ok(()) => format!("{uid:#x}"),
                Err(_) => String::new(),
            }
        };
        let mut bdf = 0u64;
        let pci_bus = match call!(self.api, rsmi_dev_pci_id_get(i, &mut bdf)) {
            Ok(()) => pci_address(bdf),
            Err(_) => String::new(),
        };
        GpuIdentity {
            index: i,
            card: format!("card{i}"),
            serial,
            model: if model.is_empty() {
                "AMD GPU".into()
            } else {
                model
            },
            pci_bus,
        }
    }

    fn keep<T>(&mut self, gpu: u32, what: &'static str, r: Result<T, RsmiError>) -> Option<T> {
        self.errors.keep(gpu, what, r, RsmiError::unsupported)
    }

    fn u64_of(
        &mut self,
        gpu: u32,
        what: &'static str,
        f: impl FnOnce(&Api, &mut u64) -> Result<(), RsmiError>,
    ) -> Option<u64> {
        let mut v = 0u64;
        let r = f(&self.api, &mut v).map(|()| v);
        self.keep(gpu, what, r)
    }

    fn read_gpu(&mut self, id: &GpuIdentity) -> GpuStats {
        let i = id.index;
        let mut g = GpuStats {
            id: id.clone(),
            ..GpuStats::default()
        };
        let mut pct = 0u32;
        let r = call!(self.api, rsmi_dev_busy_percent_get(i, &mut pct)).map(|()| pct);
        g.gfx_activity = self.keep(i, "rsmi_dev_busy_percent_get", r).map(f64::from);
        let r = call!(self.api, rsmi_dev_memory_busy_percent_get(i, &mut pct)).map(|()| pct);
        g.umc_activity = self
            .keep(i, "rsmi_dev_memory_busy_percent_get", r)
            .map(f64::from);

        let mem = |s: &mut Self, kind: u32| {
            let total = s.u64_of(i, "rsmi_dev_memory_total_get", |a, v| {
                call!(a, rsmi_dev_memory_total_get(i, kind, v))
            });
            let used = s.u64_of(i, "rsmi_dev_memory_usage_get", |a, v| {
                call!(a, rsmi_dev_memory_usage_get(i, kind, v))
            });
            (used, total)
        };
        (g.vram_used_bytes, g.vram_total_bytes) = mem(self, sys::MEM_VRAM);
        (g.vis_vram_used_bytes, g.vis_vram_total_bytes) = mem(self, sys::MEM_VIS_VRAM);
        (g.gtt_used_bytes, g.gtt_total_bytes) = mem(self, sys::MEM_GTT);

        let temp = |s: &mut Self, sensor: u32| {
            let mut t = 0i64;
            let r = call!(
                s.api,
                rsmi_dev_temp_metric_get(i, sensor, sys::TEMP_CURRENT, &mut t)
            )
            .map(|()| t as f64 / 1000.0);
            s.keep(i, "rsmi_dev_temp_metric_get", r)
        };
        g.temp_edge = temp(self, sys::TEMP_EDGE);
        g.temp_junction = temp(self, sys::TEMP_JUNCTION);
        g.temp_memory = temp(self, sys::TEMP_MEMORY);
        for hbm in 0..4 {
            if let Some(t) = temp(self, sys::TEMP_HBM_0 + hbm) {
                g.temp_hbm.push((hbm, t));
            }
        }

        let uw = self.u64_of(i, "rsmi_dev_power_ave_get", |a, v| {
            call!(a, rsmi_dev_power_ave_get(i, 0, v))
        });
        let uw = match uw {
            Some(v) => Some(v),
            None => self.u64_of(i, "rsmi_dev_current_socket_power_get", |a, v| {
                call!(a, rsmi_dev_current_socket_power_get(i, v))
            }),
        };
        g.power_watts = uw.map(|v| v as f64 / 1e6);
        g.power_cap_watts = self
            .u64_of(i, "rsmi_dev_power_cap_get", |a, v| {
                call!(a, rsmi_dev_power_cap_get(i, 0, v))
            })
            .map(|v| v as f64 / 1e6);
        let (mut count, mut res, mut ts) = (0u64, 0f32, 0u64);
        let r = call!(
            self.api,
            rsmi_dev_energy_count_get(i, &mut count, &mut res, &mut ts)
        )
        .map(|()| count as f64 * f64::from(res));
        g.energy_microjoules = self.keep(i, "rsmi_dev_energy_count_get", r);

        let layout = self.api.layout;
        for &(kind, label) in sys::CLOCKS {
            let mut b = Buf::new();
            let r = call!(self.api, rsmi_dev_gpu_clk_freq_get(i, kind, &mut b));
            if let Some(()) = self.keep(i, "rsmi_dev_gpu_clk_freq_get", r)
                && let Some(hz) = layout.current_frequency(&b)
            {
                g.clocks_mhz.push((label, hz as f64 / 1e6));
            }
        }
        let mut b = Buf::new();
        let r = call!(self.api, rsmi_dev_pci_bandwidth_get(i, &mut b));
        if let Some(()) = self.keep(i, "rsmi_dev_pci_bandwidth_get", r)
            && let Some((rate, lanes)) = layout.current_pcie(&b)
        {
            g.pcie_speed_gts = Some(rate as f64 / 1e9);
            g.pcie_width = Some(lanes);
        }
        g.pcie_replay_count = self.u64_of(i, "rsmi_dev_pci_replay_counter_get", |a, v| {
            call!(a, rsmi_dev_pci_replay_counter_get(i, v))
        });

        let mut speed = 0i64;
        let r = call!(self.api, rsmi_dev_fan_speed_get(i, 0, &mut speed))
            .map(|()| speed as f64 * 100.0 / sys::MAX_FAN_SPEED);
        g.fan_speed_percent = self.keep(i, "rsmi_dev_fan_speed_get", r);
        let r = call!(self.api, rsmi_dev_fan_rpms_get(i, 0, &mut speed)).map(|()| speed as f64);
        g.fan_rpm = self.keep(i, "rsmi_dev_fan_rpms_get", r);
        let mut mv = 0i64;
        let r = call!(
            self.api,
            rsmi_dev_volt_metric_get(i, sys::VOLT_VDDGFX, sys::VOLT_CURRENT, &mut mv)
        )
        .map(|()| mv as f64);
        g.voltage_mv = self.keep(i, "rsmi_dev_volt_metric_get", r);

        let enabled = self.u64_of(i, "rsmi_dev_ecc_enabled_get", |a, v| {
            call!(a, rsmi_dev_ecc_enabled_get(i, v))
        });
        if let Some(mask) = enabled {
            let mut total = EccCount::default();
            let mut complete = true;
            for &(bit, block) in sys::BLOCKS {
                if mask & bit == 0 {
                    continue;
                }
                let mut ec = ErrorCount::default();
                let r = call!(self.api, rsmi_dev_ecc_count_get(i, bit, &mut ec));
                if let Some(()) = self.keep(i, "rsmi_dev_ecc_count_get", r) {
                    let c = EccCount {
                        correctable: ec.correctable_err,
                        uncorrectable: ec.uncorrectable_err,
                        deferred: None,
                    };
                    total.correctable += c.correctable;
                    total.uncorrectable += c.uncorrectable;
                    g.ecc_blocks.push((block, c));
                } else {
                    complete = false;
                }
            }
            // A total over some blocks only would dip and jump back: a
            // counter reset and a false increase to rules. Only whole.
            if complete {
                g.ecc_total = Some(total);
            }
        }

        let mut xgmi = 0u32;
        let r = call!(self.api, rsmi_dev_xgmi_error_status(i, &mut xgmi)).map(|()| xgmi);
        g.xgmi_error_status = self.keep(i, "rsmi_dev_xgmi_error_status", r);
        g
    }

    /// Every compute process and the GPUs (with VRAM) it uses.
    fn processes(&mut self) -> Option<HashMap<u32, Vec<GpuProcess>>> {
        let mut n = 0u32;
        let r = call!(
            self.api,
            rsmi_compute_process_info_get(std::ptr::null_mut(), &mut n)
        );
        self.keep(u32::MAX, "rsmi_compute_process_info_get", r)?;
        let mut list = vec![ProcessInfo::default(); n as usize];
        if n > 0 {
            let r = call!(
                self.api,
                rsmi_compute_process_info_get(list.as_mut_ptr(), &mut n)
            );
            self.keep(u32::MAX, "rsmi_compute_process_info_get", r)?;
            list.truncate(n as usize);
        }
        let mut by_gpu: HashMap<u32, Vec<GpuProcess>> = HashMap::new();
        let ngpus = self.gpus.len();
        for p in list {
            let mut idx = vec![0u32; ngpus.max(1)];
            let mut k = idx.len() as u32;
            let r = call!(
                self.api,
                rsmi_compute_process_gpus_get(p.process_id, idx.as_mut_ptr(), &mut k)
            );
            let Some(()) = self.keep(u32::MAX, "rsmi_compute_process_gpus_get", r) else {
                continue;
            };
            for &gpu in idx.iter().take((k as usize).min(idx.len())) {
                let mut one = ProcessInfo::default();
                let r = call!(
                    self.api,
                    rsmi_compute_process_info_by_device_get(p.process_id, gpu, &mut one)
                );
                let vram = match r {
                    Ok(()) => Some(one.vram_usage),
                    // Older libraries: only the total over all GPUs, which
                    // is this GPU's when the process uses one.
                    Err(_) if k == 1 => Some(p.vram_usage),
                    Err(_) => None,
                };
                by_gpu.entry(gpu).or_default().push(GpuProcess {
                    pid: p.process_id,
                    vram_bytes: vram,
                });
            }
        }
        Some(by_gpu)
    }
}

impl Backend for Rocm {
    fn kind(&self) -> BackendKind {
        BackendKind::Rocm
    }

    fn describe(&self) -> String {
        format!(
            "ROCm SMI {} ({}), {}",
            if self.version.is_empty() {
                "(version unknown)"
            } else {
                &self.version
            },
            self.path.display(),
            super::summary(self.gpus.iter().map(|g| g.model.as_str()))
        )
    }

    fn read(&mut self) -> Result<Vec<GpuStats>, String> {
        let ids = self.gpus.clone();
        let mut out: Vec<GpuStats> = ids.iter().map(|id| self.read_gpu(id)).collect();
        if self.processes
            && let Some(mut by_gpu) = self.processes()
        {
            for g in &mut out {
                g.processes = Some(by_gpu.remove(&g.id.index).unwrap_or_default());
            }
        }
        Ok(out)
    }
}

impl Drop for Rocm {
    fn drop(&mut self) {
        let _ = call!(self.api, rsmi_shut_down());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_maps_and_unknown_codes_are_kept() {
        assert_eq!(RsmiError::from_status(0), Ok(()));
        assert_eq!(RsmiError::from_status(2), Err(RsmiError::NotSupported));
        assert_eq!(RsmiError::from_status(8), Err(RsmiError::InitError));
        assert_eq!(RsmiError::from_status(22), Err(RsmiError::FailLoadSymbol));
        assert_eq!(
            RsmiError::from_status(0xFFFF_FFFF),
            Err(RsmiError::UnknownError)
        );
        assert_eq!(RsmiError::from_status(77), Err(RsmiError::Unexpected(77)));
        for code in 1..=22 {
            assert!(
                !matches!(
                    RsmiError::from_status(code),
                    Err(RsmiError::Unexpected(_)) | Ok(())
                ),
                "code {code} has no arm"
            );
        }
        assert!(RsmiError::Missing("x").unsupported());
        assert!(!RsmiError::Permission.unsupported());
    }

    #[test]
    fn bdfid_formats_like_sysfs() {
        // Domain 0, bus 0x1e, device 0, function 0.
        assert_eq!(pci_address(0x1e << 8), "0000:1e:00.0");
        assert_eq!(
            pci_address((1u64 << 32) | (0x49 << 8) | (3 << 3) | 1),
            "0001:49:03.1"
        );
    }
}
