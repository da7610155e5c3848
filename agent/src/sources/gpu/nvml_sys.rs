//! The raw NVML C API (`nvml.h`), resolved at run time; every function is
//! an `Option` (a symbol this driver lacks is `None`).
#![allow(unsafe_code, non_snake_case)]

use std::ffi::{c_char, c_uint, c_ulonglong, c_void};
use std::path::Path;

use libloading::Library;

pub type Return = u32;
/// `nvmlDevice_t`: an opaque pointer.
pub type Device = *mut c_void;
/// `nvmlEventSet_t`: an opaque pointer.
pub type EventSet = *mut c_void;

/// `nvmlPciInfo_t` (68 bytes).
#[repr(C)]
pub struct PciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

/// `nvmlUtilization_t`.
#[repr(C)]
#[derive(Default)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Default)]
pub struct Memory {
    pub total: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2_t`: `used` without the memory the driver and firmware
/// reserve, which `reserved` gives apart (as `nvidia-smi` shows them).
#[repr(C)]
#[derive(Default)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

/// `nvmlMemory_v2`: `NVML_STRUCT_VERSION(Memory, 2)`, the struct's size
/// with the version in the top byte.
pub const MEMORY_V2: c_uint = std::mem::size_of::<MemoryV2>() as c_uint | (2 << 24);

/// `nvmlProcessInfo_t` as the `_v2` and `_v3` functions fill it.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct ProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// `nvmlEventData_t` as `nvmlEventSetWait_v2` fills it.
#[repr(C)]
pub struct EventData {
    pub device: Device,
    pub event_type: c_ulonglong,
    pub event_data: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

macro_rules! api {
    ($( $name:ident ( $($arg:ty),* ); )*) => {
        /// The library and every function it exports that Vitals uses.
        #[allow(non_snake_case)]
        pub struct Api {
            $( pub $name: Option<unsafe extern "C" fn($($arg),*) -> Return>, )*
            /// `nvmlErrorString` (returns a string, not a status).
            pub nvmlErrorString: Option<unsafe extern "C" fn(Return) -> *const c_char>,
            // Last: the function pointers above are only valid while the
            // library stays loaded.
            _lib: Library,
        }

        impl Api {
            pub fn load(path: &Path) -> Result<Api, libloading::Error> {
                // SAFETY: loading runs the library's initialisers; NVML's only
                // set up its own state.
                let lib = unsafe { Library::new(path) }?;
                $(
                    // SAFETY: the type is the prototype in nvml.h for this name.
                    let $name = unsafe {
                        lib.get::<unsafe extern "C" fn($($arg),*) -> Return>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .ok()
                    .map(|s| *s);
                )*
                // SAFETY: `const char* nvmlErrorString(nvmlReturn_t)`.
                let nvmlErrorString = unsafe {
                    lib.get::<unsafe extern "C" fn(Return) -> *const c_char>(b"nvmlErrorString\0")
                }
                .ok()
                .map(|s| *s);
                Ok(Api { $( $name, )* nvmlErrorString, _lib: lib })
            }

            pub fn missing(&self) -> Vec<&'static str> {
                let mut m = Vec::new();
                $( if self.$name.is_none() { m.push(stringify!($name)); } )*
                m
            }
        }
    };
}

api! {
    nvmlInit_v2();
    nvmlShutdown();
    nvmlSystemGetDriverVersion(*mut c_char, c_uint);
    nvmlDeviceGetCount_v2(*mut c_uint);
    nvmlDeviceGetHandleByIndex_v2(c_uint, *mut Device);
    nvmlDeviceGetName(Device, *mut c_char, c_uint);
    nvmlDeviceGetUUID(Device, *mut c_char, c_uint);
    nvmlDeviceGetSerial(Device, *mut c_char, c_uint);
    nvmlDeviceGetMinorNumber(Device, *mut c_uint);
    nvmlDeviceGetPciInfo_v3(Device, *mut PciInfo);
    nvmlDeviceGetUtilizationRates(Device, *mut Utilization);
    nvmlDeviceGetMemoryInfo(Device, *mut Memory);
    nvmlDeviceGetMemoryInfo_v2(Device, *mut MemoryV2);
    nvmlDeviceGetTemperature(Device, c_uint, *mut c_uint);
    nvmlDeviceGetTemperatureThreshold(Device, c_uint, *mut c_uint);
    nvmlDeviceGetPowerUsage(Device, *mut c_uint);
    nvmlDeviceGetEnforcedPowerLimit(Device, *mut c_uint);
    nvmlDeviceGetTotalEnergyConsumption(Device, *mut c_ulonglong);
    nvmlDeviceGetClockInfo(Device, c_uint, *mut c_uint);
    nvmlDeviceGetFanSpeed(Device, *mut c_uint);
    nvmlDeviceGetTotalEccErrors(Device, c_uint, c_uint, *mut c_ulonglong);
    nvmlDeviceGetCurrPcieLinkGeneration(Device, *mut c_uint);
    nvmlDeviceGetCurrPcieLinkWidth(Device, *mut c_uint);
    nvmlDeviceGetPcieReplayCounter(Device, *mut c_uint);
    nvmlDeviceGetCurrentClocksEventReasons(Device, *mut c_ulonglong);
    nvmlDeviceGetCurrentClocksThrottleReasons(Device, *mut c_ulonglong);
    nvmlDeviceGetComputeRunningProcesses_v3(Device, *mut c_uint, *mut ProcessInfo);
    nvmlDeviceGetComputeRunningProcesses_v2(Device, *mut c_uint, *mut ProcessInfo);
    nvmlEventSetCreate(*mut EventSet);
    nvmlDeviceRegisterEvents(Device, c_ulonglong, EventSet);
    nvmlEventSetWait_v2(EventSet, *mut EventData, c_uint);
    nvmlEventSetFree(EventSet);
}

pub const TEMPERATURE_GPU: c_uint = 0;
/// `NVML_TEMPERATURE_THRESHOLD_SLOWDOWN`.
pub const TEMPERATURE_THRESHOLD_SLOWDOWN: c_uint = 1;
pub const ECC_CORRECTED: c_uint = 0;
pub const ECC_UNCORRECTED: c_uint = 1;
pub const ECC_AGGREGATE: c_uint = 1;
pub const EVENT_XID_CRITICAL: c_ulonglong = 0x8;

/// `nvmlClockType_t` values and the clock_type label each gets.
pub const CLOCKS: &[(c_uint, &str)] = &[
    (0, "GPU_CLOCK_TYPE_SYSTEM"),
    (1, "GPU_CLOCK_TYPE_SM"),
    (2, "GPU_CLOCK_TYPE_MEMORY"),
    (3, "GPU_CLOCK_TYPE_VIDEO"),
];

/// Clock event (throttle) reason bits and their `reason` label.
pub const THROTTLE_REASONS: &[(c_ulonglong, &str)] = &[
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_v2_version_is_the_one_nvml_h_gives() {
        // nvml.h: a 4-byte version padded to 8, then four 8-byte counters;
        // NVML_STRUCT_VERSION(Memory, 2) = sizeof | 2 << 24.
        assert_eq!(std::mem::size_of::<MemoryV2>(), 40);
        assert_eq!(MEMORY_V2, 0x0200_0028);
    }
}
