//! NVIDIA GPUs through NVML: a safe layer over [`nvml_sys`].
//!
//! `libnvidia-ml.so.1` is found through the dynamic linker (or
//! `[sources.gpu] library`). `nvmlInit_v2` once, `nvmlShutdown` on drop.
//! Xid critical errors are taken from an NVML event set without waiting
//! (`nvmlEventSetWait_v2` with a 0 ms timeout, drained each read) and
//! counted per GPU.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_ulonglong};
use std::path::PathBuf;

use super::nvml_sys::{
    self as sys, Api, Device, EventData, EventSet, Memory, MemoryV2, PciInfo, Utilization,
};
use super::{
    Backend, BackendKind, CallErrors, EccCount, GpuIdentity, GpuProcess, GpuStats, OpenError,
    OpenSpec, c_string, load_library,
};

/// `nvmlReturn_t`, one arm per documented value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NvmlError {
    #[error("NVML_ERROR_UNINITIALIZED")]
    Uninitialized,
    #[error("NVML_ERROR_INVALID_ARGUMENT")]
    InvalidArgument,
    #[error("NVML_ERROR_NOT_SUPPORTED")]
    NotSupported,
    #[error("NVML_ERROR_NO_PERMISSION")]
    NoPermission,
    #[error("NVML_ERROR_ALREADY_INITIALIZED")]
    AlreadyInitialized,
    #[error("NVML_ERROR_NOT_FOUND")]
    NotFound,
    #[error("NVML_ERROR_INSUFFICIENT_SIZE")]
    InsufficientSize,
    #[error("NVML_ERROR_INSUFFICIENT_POWER")]
    InsufficientPower,
    #[error("NVML_ERROR_DRIVER_NOT_LOADED")]
    DriverNotLoaded,
    #[error("NVML_ERROR_TIMEOUT")]
    Timeout,
    #[error("NVML_ERROR_IRQ_ISSUE")]
    IrqIssue,
    #[error("NVML_ERROR_LIBRARY_NOT_FOUND")]
    LibraryNotFound,
    #[error("NVML_ERROR_FUNCTION_NOT_FOUND")]
    FunctionNotFound,
    #[error("NVML_ERROR_CORRUPTED_INFOROM")]
    CorruptedInforom,
    #[error("NVML_ERROR_GPU_IS_LOST")]
    GpuIsLost,
    #[error("NVML_ERROR_RESET_REQUIRED")]
    ResetRequired,
    #[error("NVML_ERROR_OPERATING_SYSTEM")]
    OperatingSystem,
    #[error("NVML_ERROR_LIB_RM_VERSION_MISMATCH")]
    LibRmVersionMismatch,
    #[error("NVML_ERROR_IN_USE")]
    InUse,
    #[error("NVML_ERROR_MEMORY")]
    Memory,
    #[error("NVML_ERROR_NO_DATA")]
    NoData,
    #[error("NVML_ERROR_VGPU_ECC_NOT_SUPPORTED")]
    VgpuEccNotSupported,
    #[error("NVML_ERROR_INSUFFICIENT_RESOURCES")]
    InsufficientResources,
    #[error("NVML_ERROR_FREQ_NOT_SUPPORTED")]
    FreqNotSupported,
    #[error("NVML_ERROR_ARGUMENT_VERSION_MISMATCH")]
    ArgumentVersionMismatch,
    #[error("NVML_ERROR_DEPRECATED")]
    Deprecated,
    #[error("NVML_ERROR_NOT_READY")]
    NotReady,
    #[error("NVML_ERROR_GPU_NOT_FOUND")]
    GpuNotFound,
    #[error("NVML_ERROR_INVALID_STATE")]
    InvalidState,
    #[error("NVML_ERROR_RESET_TYPE_NOT_SUPPORTED")]
    ResetTypeNotSupported,
    #[error("NVML_ERROR_UNKNOWN")]
    Unknown,
    /// A code this version of Vitals does not know.
    #[error("nvml return {0}")]
    Unexpected(u32),
    /// The library does not export this function.
    #[error("{0} is not in this library")]
    Missing(&'static str),
}

impl NvmlError {
    pub fn from_return(code: sys::Return) -> Result<(), NvmlError> {
        use NvmlError::*;
        Err(match code {
            0 => return Ok(()),
            1 => Uninitialized,
            2 => InvalidArgument,
            3 => NotSupported,
            4 => NoPermission,
            5 => AlreadyInitialized,
            6 => NotFound,
            7 => InsufficientSize,
            8 => InsufficientPower,
            9 => DriverNotLoaded,
            10 => Timeout,
            11 => IrqIssue,
            12 => LibraryNotFound,
            13 => FunctionNotFound,
            14 => CorruptedInforom,
            15 => GpuIsLost,
            16 => ResetRequired,
            17 => OperatingSystem,
            18 => LibRmVersionMismatch,
            19 => InUse,
            20 => Memory,
            21 => NoData,
            22 => VgpuEccNotSupported,
            23 => InsufficientResources,
            24 => FreqNotSupported,
            25 => ArgumentVersionMismatch,
            26 => Deprecated,
            27 => NotReady,
            28 => GpuNotFound,
            29 => InvalidState,
            30 => ResetTypeNotSupported,
            999 => Unknown,
            other => Unexpected(other),
        })
    }

    pub fn unsupported(self) -> bool {
        matches!(
            self,
            NvmlError::NotSupported | NvmlError::FunctionNotFound | NvmlError::Missing(_)
        )
    }
}

macro_rules! call {
    ($api:expr, $f:ident ( $($arg:expr),* )) => {
        match $api.$f {
            // SAFETY: resolved for this name with the prototype of nvml.h;
            // every pointer argument points at a live, writable value of the
            // type (or buffer length) it expects; device handles come from
            // nvmlDeviceGetHandleByIndex_v2 of this initialised library.
            Some(f) => NvmlError::from_return(unsafe { f($($arg),*) }),
            None => Err(NvmlError::Missing(stringify!($f))),
        }
    };
}

pub struct Nvml {
    api: Api,
    path: PathBuf,
    driver: String,
    devices: Vec<(Device, GpuIdentity)>,
    events: Option<EventSet>,
    xids: HashMap<u32, (u64, u64)>,
    processes: bool,
    errors: CallErrors<NvmlError>,
}

// SAFETY: NVML is thread-safe; the handles are opaque pointers the library
// owns, used only by the one thread that owns this backend.
unsafe impl Send for Nvml {}

impl Nvml {
    pub fn open(spec: &OpenSpec) -> Result<Nvml, OpenError> {
        let (api, path) = load_library(
            spec.library.as_deref(),
            &["libnvidia-ml.so.1", "libnvidia-ml.so"],
            "libnvidia-ml.so.1 not found",
            Api::load,
        )?;
        call!(api, nvmlInit_v2()).map_err(|e| match e {
            NvmlError::DriverNotLoaded | NvmlError::GpuNotFound | NvmlError::LibraryNotFound => {
                OpenError::Absent(format!(
                    "{}: nvmlInit_v2: {e} (no NVIDIA GPU or driver here)",
                    path.display()
                ))
            }
            other => OpenError::Failed(format!("{}: nvmlInit_v2: {other}", path.display())),
        })?;
        let mut nv = Nvml {
            api,
            path,
            driver: String::new(),
            devices: Vec::new(),
            events: None,
            xids: HashMap::new(),
            processes: spec.processes,
            errors: CallErrors::new("NVML"),
        };
        let mut buf = [0 as c_char; 80];
        if call!(nv.api, nvmlSystemGetDriverVersion(buf.as_mut_ptr(), 80)).is_ok() {
            nv.driver = c_string(&buf);
        }
        let mut n: c_uint = 0;
        call!(nv.api, nvmlDeviceGetCount_v2(&mut n)).map_err(|e| {
            OpenError::Failed(format!("{}: nvmlDeviceGetCount_v2: {e}", nv.path.display()))
        })?;
        let mut set: EventSet = std::ptr::null_mut();
        if call!(nv.api, nvmlEventSetCreate(&mut set)).is_ok() && !set.is_null() {
            nv.events = Some(set);
        }
        for i in 0..n {
            let mut dev: Device = std::ptr::null_mut();
            match call!(nv.api, nvmlDeviceGetHandleByIndex_v2(i, &mut dev)) {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(gpu = i, error = %e, "gpu: NVML cannot open this GPU; it is skipped");
                    continue;
                }
            }
            let id = nv.identity(i, dev);
            if let Some(set) = nv.events {
                // Not supported on this GPU: no Xid counts for it.
                let _ = call!(
                    nv.api,
                    nvmlDeviceRegisterEvents(dev, sys::EVENT_XID_CRITICAL, set)
                );
            }
            nv.devices.push((dev, id));
        }
        if nv.devices.is_empty() {
            return Err(OpenError::Absent(format!(
                "{}: NVML sees no GPU",
                nv.path.display()
            )));
        }
        let missing = nv.api.missing();
        if !missing.is_empty() {
            tracing::info!(
                library = %nv.path.display(),
                missing = ?missing,
                "gpu: this NVML lacks some functions; their metrics are not reported"
            );
        }
        Ok(nv)
    }

    fn identity(&self, i: u32, dev: Device) -> GpuIdentity {
        let mut name = [0 as c_char; 96];
        let model = match call!(self.api, nvmlDeviceGetName(dev, name.as_mut_ptr(), 96)) {
            Ok(()) => c_string(&name),
            Err(_) => "NVIDIA GPU".into(),
        };
        let mut serial = [0 as c_char; 30];
        let serial = match call!(self.api, nvmlDeviceGetSerial(dev, serial.as_mut_ptr(), 30)) {
            Ok(()) => c_string(&serial),
            Err(_) => String::new(),
        };
        let serial = if serial.is_empty() {
            let mut uuid = [0 as c_char; 96];
            match call!(self.api, nvmlDeviceGetUUID(dev, uuid.as_mut_ptr(), 96)) {
                Ok(()) => c_string(&uuid),
                Err(_) => String::new(),
            }
        } else {
            serial
        };
        let mut pci = PciInfo {
            bus_id_legacy: [0; 16],
            domain: 0,
            bus: 0,
            device: 0,
            pci_device_id: 0,
            pci_sub_system_id: 0,
            bus_id: [0; 32],
        };
        let pci_bus = match call!(self.api, nvmlDeviceGetPciInfo_v3(dev, &mut pci)) {
            Ok(()) => format!("{:04x}:{:02x}:{:02x}.0", pci.domain, pci.bus, pci.device),
            Err(_) => String::new(),
        };
        let mut minor: c_uint = 0;
        let card = match call!(self.api, nvmlDeviceGetMinorNumber(dev, &mut minor)) {
            Ok(()) => format!("nvidia{minor}"),
            Err(_) => format!("nvidia{i}"),
        };
        GpuIdentity {
            index: i,
            card,
            serial,
            model,
            pci_bus,
        }
    }

    fn keep<T>(&mut self, gpu: u32, what: &'static str, r: Result<T, NvmlError>) -> Option<T> {
        self.errors.keep(gpu, what, r, NvmlError::unsupported)
    }

    fn uint(
        &mut self,
        gpu: u32,
        what: &'static str,
        r: impl FnOnce(&Api, &mut c_uint) -> Result<(), NvmlError>,
    ) -> Option<u32> {
        let mut v: c_uint = 0;
        let r = r(&self.api, &mut v).map(|()| v);
        self.keep(gpu, what, r)
    }

    fn read_gpu(&mut self, dev: Device, id: &GpuIdentity) -> GpuStats {
        let i = id.index;
        let mut g = GpuStats {
            id: id.clone(),
            ..GpuStats::default()
        };
        let mut u = Utilization::default();
        let r = call!(self.api, nvmlDeviceGetUtilizationRates(dev, &mut u));
        if self.keep(i, "nvmlDeviceGetUtilizationRates", r).is_some() {
            g.gfx_activity = Some(f64::from(u.gpu));
            g.umc_activity = Some(f64::from(u.memory));
        }
        // The v2 call splits the driver's reservation from `used` (as
        // nvidia-smi shows it); the v1 call, all a driver before r510 has,
        // counts it as used.
        let mut m2 = MemoryV2 {
            version: sys::MEMORY_V2,
            ..MemoryV2::default()
        };
        match call!(self.api, nvmlDeviceGetMemoryInfo_v2(dev, &mut m2)) {
            Ok(()) => {
                g.vram_used_bytes = Some(m2.used);
                g.vram_total_bytes = Some(m2.total);
                g.vram_reserved_bytes = Some(m2.reserved);
            }
            Err(
                NvmlError::Missing(_)
                | NvmlError::NotSupported
                | NvmlError::FunctionNotFound
                | NvmlError::ArgumentVersionMismatch,
            ) => {
                let mut m = Memory::default();
                let r = call!(self.api, nvmlDeviceGetMemoryInfo(dev, &mut m));
                if self.keep(i, "nvmlDeviceGetMemoryInfo", r).is_some() {
                    g.vram_used_bytes = Some(m.used);
                    g.vram_total_bytes = Some(m.total);
                }
            }
            r => {
                self.keep(i, "nvmlDeviceGetMemoryInfo_v2", r);
            }
        }
        g.temp_edge = self
            .uint(i, "nvmlDeviceGetTemperature", |a, v| {
                call!(a, nvmlDeviceGetTemperature(dev, sys::TEMPERATURE_GPU, v))
            })
            .map(f64::from);
        g.temp_slowdown = self
            .uint(i, "nvmlDeviceGetTemperatureThreshold", |a, v| {
                call!(
                    a,
                    nvmlDeviceGetTemperatureThreshold(dev, sys::TEMPERATURE_THRESHOLD_SLOWDOWN, v)
                )
            })
            .map(f64::from);
        g.power_watts = self
            .uint(i, "nvmlDeviceGetPowerUsage", |a, v| {
                call!(a, nvmlDeviceGetPowerUsage(dev, v))
            })
            .map(|mw| f64::from(mw) / 1000.0);
        g.power_cap_watts = self
            .uint(i, "nvmlDeviceGetEnforcedPowerLimit", |a, v| {
                call!(a, nvmlDeviceGetEnforcedPowerLimit(dev, v))
            })
            .map(|mw| f64::from(mw) / 1000.0);
        let mut mj: c_ulonglong = 0;
        let r = call!(self.api, nvmlDeviceGetTotalEnergyConsumption(dev, &mut mj));
        g.energy_microjoules = self
            .keep(i, "nvmlDeviceGetTotalEnergyConsumption", r)
            .map(|()| mj as f64 * 1000.0);
        for &(kind, label) in sys::CLOCKS {
            if let Some(mhz) = self.uint(i, "nvmlDeviceGetClockInfo", |a, v| {
                call!(a, nvmlDeviceGetClockInfo(dev, kind, v))
            }) {
                g.clocks_mhz.push((label, f64::from(mhz)));
            }
        }
        g.fan_speed_percent = self
            .uint(i, "nvmlDeviceGetFanSpeed", |a, v| {
                call!(a, nvmlDeviceGetFanSpeed(dev, v))
            })
            .map(f64::from);
        let ecc = |s: &mut Self, kind: c_uint| {
            let mut n: c_ulonglong = 0;
            let r = call!(
                s.api,
                nvmlDeviceGetTotalEccErrors(dev, kind, sys::ECC_AGGREGATE, &mut n)
            )
            .map(|()| n);
            s.keep(i, "nvmlDeviceGetTotalEccErrors", r)
        };
        if let (Some(c), Some(u)) = (
            ecc(self, sys::ECC_CORRECTED),
            ecc(self, sys::ECC_UNCORRECTED),
        ) {
            g.ecc_total = Some(EccCount {
                correctable: c,
                uncorrectable: u,
                deferred: None,
            });
        }
        g.pcie_speed_gts = self
            .uint(i, "nvmlDeviceGetCurrPcieLinkGeneration", |a, v| {
                call!(a, nvmlDeviceGetCurrPcieLinkGeneration(dev, v))
            })
            .and_then(pcie_gen_gts);
        g.pcie_width = self.uint(i, "nvmlDeviceGetCurrPcieLinkWidth", |a, v| {
            call!(a, nvmlDeviceGetCurrPcieLinkWidth(dev, v))
        });
        g.pcie_replay_count = self
            .uint(i, "nvmlDeviceGetPcieReplayCounter", |a, v| {
                call!(a, nvmlDeviceGetPcieReplayCounter(dev, v))
            })
            .map(u64::from);
        let mut reasons: c_ulonglong = 0;
        let r = match call!(
            self.api,
            nvmlDeviceGetCurrentClocksEventReasons(dev, &mut reasons)
        ) {
            Err(NvmlError::Missing(_)) => call!(
                self.api,
                nvmlDeviceGetCurrentClocksThrottleReasons(dev, &mut reasons)
            ),
            r => r,
        };
        if self
            .keep(i, "nvmlDeviceGetCurrentClocksEventReasons", r)
            .is_some()
        {
            for &(bit, reason) in sys::THROTTLE_REASONS {
                g.throttle.push((reason, reasons & bit != 0));
            }
        }
        if self.processes {
            g.processes = self.processes_of(i, dev);
        }
        g
    }

    fn processes_of(&mut self, i: u32, dev: Device) -> Option<Vec<GpuProcess>> {
        let mut list = vec![sys::ProcessInfo::default(); 64];
        for _ in 0..3 {
            let mut n = list.len() as c_uint;
            let r = match call!(
                self.api,
                nvmlDeviceGetComputeRunningProcesses_v3(dev, &mut n, list.as_mut_ptr())
            ) {
                Err(NvmlError::Missing(_)) => call!(
                    self.api,
                    nvmlDeviceGetComputeRunningProcesses_v2(dev, &mut n, list.as_mut_ptr())
                ),
                r => r,
            };
            match r {
                Ok(()) => {
                    list.truncate((n as usize).min(list.len()));
                    return Some(
                        list.iter()
                            .map(|p| GpuProcess {
                                pid: p.pid,
                                // NVML_VALUE_NOT_AVAILABLE: unknown.
                                vram_bytes: (p.used_gpu_memory != u64::MAX)
                                    .then_some(p.used_gpu_memory),
                            })
                            .collect(),
                    );
                }
                Err(NvmlError::InsufficientSize) => {
                    list = vec![sys::ProcessInfo::default(); (n as usize).max(list.len() * 2)];
                }
                Err(e) => return self.keep(i, "nvmlDeviceGetComputeRunningProcesses", Err(e)),
            }
        }
        None
    }

    /// Takes every Xid event waiting, without blocking.
    fn drain_xids(&mut self) {
        let Some(set) = self.events else {
            return;
        };
        for _ in 0..1024 {
            let mut ev = EventData {
                device: std::ptr::null_mut(),
                event_type: 0,
                event_data: 0,
                gpu_instance_id: 0,
                compute_instance_id: 0,
            };
            if call!(self.api, nvmlEventSetWait_v2(set, &mut ev, 0)).is_err() {
                return;
            }
            if ev.event_type & sys::EVENT_XID_CRITICAL == 0 {
                continue;
            }
            if let Some((_, id)) = self.devices.iter().find(|(d, _)| *d == ev.device) {
                let e = self.xids.entry(id.index).or_insert((0, 0));
                e.0 += 1;
                e.1 = ev.event_data;
                tracing::warn!(
                    gpu = id.index,
                    xid = ev.event_data,
                    "gpu: NVIDIA Xid critical error"
                );
            }
        }
    }
}

/// PCIe generation → GT/s per lane.
pub fn pcie_gen_gts(generation: u32) -> Option<f64> {
    Some(match generation {
        1 => 2.5,
        2 => 5.0,
        3 => 8.0,
        4 => 16.0,
        5 => 32.0,
        6 => 64.0,
        _ => return None,
    })
}

impl Backend for Nvml {
    fn kind(&self) -> BackendKind {
        BackendKind::Nvml
    }

    fn describe(&self) -> String {
        format!(
            "NVML, driver {} ({}), {}",
            if self.driver.is_empty() {
                "(unknown)"
            } else {
                &self.driver
            },
            self.path.display(),
            super::summary(self.devices.iter().map(|(_, g)| g.model.as_str()))
        )
    }

    fn read(&mut self) -> Result<Vec<GpuStats>, String> {
        self.drain_xids();
        let devices = self.devices.clone();
        let events = self.events.is_some();
        Ok(devices
            .iter()
            .map(|(dev, id)| {
                let mut g = self.read_gpu(*dev, id);
                if events {
                    let (n, last) = self.xids.get(&id.index).copied().unwrap_or((0, 0));
                    g.xid_errors_total = Some(n);
                    g.last_xid = (n > 0).then_some(last);
                }
                g
            })
            .collect())
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        if let Some(set) = self.events.take() {
            let _ = call!(self.api, nvmlEventSetFree(set));
        }
        let _ = call!(self.api, nvmlShutdown());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_return_maps() {
        assert_eq!(NvmlError::from_return(0), Ok(()));
        for code in 1..=30 {
            assert!(
                !matches!(
                    NvmlError::from_return(code),
                    Err(NvmlError::Unexpected(_)) | Ok(())
                ),
                "code {code} has no arm"
            );
        }
        assert_eq!(NvmlError::from_return(999), Err(NvmlError::Unknown));
        assert_eq!(NvmlError::from_return(31), Err(NvmlError::Unexpected(31)));
        assert!(NvmlError::NotSupported.unsupported());
        assert!(!NvmlError::GpuIsLost.unsupported());
    }

    #[test]
    fn pcie_generations() {
        assert_eq!(pcie_gen_gts(4), Some(16.0));
        assert_eq!(pcie_gen_gts(0), None);
    }
}
