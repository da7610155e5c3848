//! The raw ROCm SMI C API (`rocm_smi.h`), resolved at run time.
//!
//! Every function is an `Option`: a symbol this library version lacks is
//! `None`, which the safe layer reads as "not supported here". Structs that
//! changed layout between versions (`rsmi_frequencies_t` and
//! `rsmi_pcie_bandwidth_t` gained a `has_deep_sleep` flag and a 33rd entry
//! in ROCm 6.0) are read into a buffer large enough for either layout and
//! decoded by [`Layout`], chosen by a symbol only 6.0+ libraries export
//! (the version number cannot tell: distributions ship 5.x as 1.0.0).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_float};
use std::path::Path;

use libloading::Library;

pub type Status = u32;

/// `rsmi_version_t`.
#[repr(C)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub build: *const c_char,
}

/// `rsmi_error_count_t` (the same in every version).
#[repr(C)]
#[derive(Default)]
pub struct ErrorCount {
    pub correctable_err: u64,
    pub uncorrectable_err: u64,
}

/// `rsmi_process_info_t` (the same in every version).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct ProcessInfo {
    pub process_id: u32,
    pub pasid: u32,
    pub vram_usage: u64,
    pub sdma_usage: u64,
    pub cu_occupancy: u32,
}

/// Room for `rsmi_frequencies_t` or `rsmi_pcie_bandwidth_t` of any version
/// (largest: 416 bytes), zeroed, 8-byte aligned.
#[repr(C, align(8))]
pub struct Buf(pub [u8; 512]);

impl Buf {
    pub fn new() -> Buf {
        Buf([0; 512])
    }
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_ne_bytes(b)
    }
}

impl Default for Buf {
    fn default() -> Self {
        Buf::new()
    }
}

/// Which `rsmi_frequencies_t` layout the library uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// ROCm ≤ 5.x: `{u32 num_supported; u32 current; u64 frequency[32]}`.
    V5,
    /// ROCm ≥ 6.0: `{bool has_deep_sleep; u32 num_supported; u32 current; u64 frequency[33]}`.
    V6,
}

impl Layout {
    fn max(self) -> usize {
        match self {
            Layout::V5 => 32,
            Layout::V6 => 33,
        }
    }
    /// (offset of num_supported, of current, of frequency[0]).
    fn offsets(self) -> (usize, usize, usize) {
        match self {
            Layout::V5 => (0, 4, 8),
            Layout::V6 => (4, 8, 16),
        }
    }
    fn freq_size(self) -> usize {
        self.offsets().2 + 8 * self.max()
    }

    /// The current entry of a `rsmi_frequencies_t` at the start of `b`.
    pub fn current_frequency(self, b: &Buf) -> Option<u64> {
        let (n_off, c_off, f_off) = self.offsets();
        let n = b.u32_at(n_off) as usize;
        let cur = b.u32_at(c_off) as usize;
        (n <= self.max() && cur < n).then(|| b.u64_at(f_off + 8 * cur))
    }

    /// (transfer rate in T/s, lanes) of the current entry of a
    /// `rsmi_pcie_bandwidth_t` in `b`.
    pub fn current_pcie(self, b: &Buf) -> Option<(u64, u32)> {
        let (n_off, c_off, _) = self.offsets();
        let n = b.u32_at(n_off) as usize;
        let cur = b.u32_at(c_off) as usize;
        if n > self.max() || cur >= n {
            return None;
        }
        let rate = self.current_frequency(b)?;
        let lanes = b.u32_at(self.freq_size() + 4 * cur);
        Some((rate, lanes))
    }
}

macro_rules! api {
    ($( $(#[$doc:meta])* $name:ident ( $($arg:ty),* ); )*) => {
        /// The library and every function it exports that Vitals uses.
        #[allow(non_snake_case)]
        pub struct Api {
            $( $(#[$doc])* pub $name: Option<unsafe extern "C" fn($($arg),*) -> Status>, )*
            pub layout: Layout,
            // Last: the function pointers above are only valid while the
            // library stays loaded.
            _lib: Library,
        }

        impl Api {
            /// Loads the library at `path` (a file, or a name the dynamic
            /// linker searches for) and resolves every function.
            pub fn load(path: &Path) -> Result<Api, libloading::Error> {
                // SAFETY: loading runs the library's initialisers; ROCm SMI's
                // only set up its own state. The path is the operator's choice
                // or one of the known install locations.
                let lib = unsafe { Library::new(path) }?;
                $(
                    // SAFETY: the type is the prototype in rocm_smi.h for this name.
                    let $name = unsafe {
                        lib.get::<unsafe extern "C" fn($($arg),*) -> Status>(
                            concat!(stringify!($name), "\0").as_bytes(),
                        )
                    }
                    .ok()
                    .map(|s| *s);
                )*
                // SAFETY: only asks whether the symbol exists.
                let v6 = ["rsmi_dev_activity_metric_get", "rsmi_dev_power_get"]
                    .iter()
                    .any(|n| unsafe { lib.get::<*const ()>(n.as_bytes()) }.is_ok());
                Ok(Api {
                    $( $name, )*
                    layout: if v6 { Layout::V6 } else { Layout::V5 },
                    _lib: lib,
                })
            }

            /// The functions this library does not export.
            pub fn missing(&self) -> Vec<&'static str> {
                let mut m = Vec::new();
                $( if self.$name.is_none() { m.push(stringify!($name)); } )*
                m
            }
        }
    };
}

api! {
    rsmi_init(u64);
    rsmi_shut_down();
    rsmi_version_get(*mut Version);
    rsmi_status_string(Status, *mut *const c_char);
    rsmi_num_monitor_devices(*mut u32);
    rsmi_dev_name_get(u32, *mut c_char, usize);
    rsmi_dev_serial_number_get(u32, *mut c_char, u32);
    rsmi_dev_unique_id_get(u32, *mut u64);
    rsmi_dev_pci_id_get(u32, *mut u64);
    rsmi_dev_busy_percent_get(u32, *mut u32);
    rsmi_dev_memory_busy_percent_get(u32, *mut u32);
    rsmi_dev_memory_total_get(u32, u32, *mut u64);
    rsmi_dev_memory_usage_get(u32, u32, *mut u64);
    rsmi_dev_temp_metric_get(u32, u32, u32, *mut i64);
    rsmi_dev_power_ave_get(u32, u32, *mut u64);
    rsmi_dev_current_socket_power_get(u32, *mut u64);
    rsmi_dev_power_cap_get(u32, u32, *mut u64);
    rsmi_dev_energy_count_get(u32, *mut u64, *mut c_float, *mut u64);
    rsmi_dev_gpu_clk_freq_get(u32, u32, *mut Buf);
    rsmi_dev_fan_speed_get(u32, u32, *mut i64);
    rsmi_dev_fan_rpms_get(u32, u32, *mut i64);
    rsmi_dev_volt_metric_get(u32, u32, u32, *mut i64);
    rsmi_dev_ecc_enabled_get(u32, *mut u64);
    rsmi_dev_ecc_count_get(u32, u64, *mut ErrorCount);
    rsmi_dev_pci_bandwidth_get(u32, *mut Buf);
    rsmi_dev_pci_replay_counter_get(u32, *mut u64);
    rsmi_dev_xgmi_error_status(u32, *mut u32);
    rsmi_compute_process_info_get(*mut ProcessInfo, *mut u32);
    rsmi_compute_process_gpus_get(u32, *mut u32, *mut u32);
    rsmi_compute_process_info_by_device_get(u32, u32, *mut ProcessInfo);
}

pub const MEM_VRAM: u32 = 0;
pub const MEM_VIS_VRAM: u32 = 1;
pub const MEM_GTT: u32 = 2;

pub const TEMP_EDGE: u32 = 0;
pub const TEMP_JUNCTION: u32 = 1;
pub const TEMP_MEMORY: u32 = 2;
pub const TEMP_HBM_0: u32 = 3;
pub const TEMP_CURRENT: u32 = 0;

pub const VOLT_VDDGFX: u32 = 0;
pub const VOLT_CURRENT: u32 = 0;

pub const MAX_FAN_SPEED: f64 = 255.0;

/// `rsmi_clk_type_t` values and the clock_type label each gets.
pub const CLOCKS: &[(u32, &str)] = &[
    (0, "GPU_CLOCK_TYPE_SYSTEM"),
    (1, "GPU_CLOCK_TYPE_FABRIC"),
    (2, "GPU_CLOCK_TYPE_DCE"),
    (3, "GPU_CLOCK_TYPE_SOC"),
    (4, "GPU_CLOCK_TYPE_MEMORY"),
];

/// `rsmi_gpu_block_t` bits and the block name in the metric.
pub const BLOCKS: &[(u64, &str)] = &[
    (0x1, "umc"),
    (0x2, "sdma"),
    (0x4, "gfx"),
    (0x8, "mmhub"),
    (0x10, "athub"),
    (0x20, "pcie_bif"),
    (0x40, "hdp"),
    (0x80, "xgmi_wafl"),
    (0x100, "df"),
    (0x200, "smn"),
    (0x400, "sem"),
    (0x800, "mp0"),
    (0x1000, "mp1"),
    (0x2000, "fuse"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn put_u32(b: &mut Buf, off: usize, v: u32) {
        b.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(b: &mut Buf, off: usize, v: u64) {
        b.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }

    #[test]
    fn both_frequency_layouts_decode() {
        let mut b = Buf::new();
        put_u32(&mut b, 0, 3);
        put_u32(&mut b, 4, 2);
        put_u64(&mut b, 8 + 16, 1_500_000_000);
        assert_eq!(Layout::V5.current_frequency(&b), Some(1_500_000_000));

        let mut b = Buf::new();
        b.0[0] = 1;
        put_u32(&mut b, 4, 3);
        put_u32(&mut b, 8, 1);
        put_u64(&mut b, 16 + 8, 900_000_000);
        assert_eq!(Layout::V6.current_frequency(&b), Some(900_000_000));
        // Lanes sit after the whole frequencies struct.
        put_u32(&mut b, 280 + 4, 16);
        assert_eq!(Layout::V6.current_pcie(&b), Some((900_000_000, 16)));
    }

    #[test]
    fn out_of_range_current_is_none() {
        let mut b = Buf::new();
        put_u32(&mut b, 0, 2);
        put_u32(&mut b, 4, 2);
        assert_eq!(Layout::V5.current_frequency(&b), None);
        put_u32(&mut b, 0, 40);
        put_u32(&mut b, 4, 0);
        assert_eq!(Layout::V5.current_frequency(&b), None);
        assert_eq!(Layout::V5.current_pcie(&Buf::new()), None);
    }
}
