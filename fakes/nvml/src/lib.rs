//! A stand-in `libnvidia-ml.so.1` for tests on machines without an NVIDIA
//! GPU. It exports the `nvml*` functions the agent uses, with the same C
//! prototypes, and answers them from a JSON file (an absent field answers
//! `NVML_ERROR_NOT_SUPPORTED`):
//!
//! ```json
//! {"driver_version": "550.54.15",
//!  "devices": [{"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-…", "serial": "…",
//!    "minor": 0, "pci": {"domain": 0, "bus": 24, "device": 0},
//!    "utilization": {"gpu": 87, "memory": 41},
//!    "memory": {"total": 85520809984, "used": 61203283968, "reserved": 644874240},
//!    "temperature": 61, "slowdown_temperature": 87, "power_mw": 512345, "power_limit_mw": 700000,
//!    "energy_mj": 123456789, "fan_percent": 40,
//!    "clocks_mhz": {"graphics": 1980, "sm": 1980, "memory": 2619, "video": 1755},
//!    "ecc_aggregate": {"corrected": 12, "uncorrected": 0},
//!    "pcie": {"generation": 5, "width": 16, "replay": 3},
//!    "clock_event_reasons": 4,
//!    "processes": [{"pid": 4242, "used_memory": 61000000000}],
//!    "xid": [79]}]}
//! ```
//!
//! `memory.used` is what the v2 memory call gives (without `reserved`, which
//! is optional); the v1 call counts `reserved` as used, as a driver does.
//! `xid` lists Xid critical errors delivered once each through the event
//! set. Environment: `VITALS_FAKE_NVML_JSON` (the file; unset: `nvmlInit_v2`
//! fails with `NVML_ERROR_DRIVER_NOT_LOADED`), `VITALS_FAKE_NVML_INIT_STATUS`
//! (a return code `nvmlInit_v2` gives instead), `VITALS_FAKE_NVML_CALLS` (a
//! file `nvmlInit_v2` and `nvmlShutdown` append their names to).
// C entry points: the caller is C, passing the pointers the header names.
#![allow(unsafe_code, non_snake_case, clippy::not_unsafe_ptr_arg_deref)]

use std::collections::VecDeque;
use std::ffi::{c_char, c_uint, c_ulonglong, c_void};
use std::io::Write;
use std::sync::Mutex;

use serde_json::Value;

type Return = u32;
const SUCCESS: Return = 0;
const UNINITIALIZED: Return = 1;
const INVALID_ARGUMENT: Return = 2;
const NOT_SUPPORTED: Return = 3;
const INSUFFICIENT_SIZE: Return = 7;
const ARGUMENT_VERSION_MISMATCH: Return = 25;
const DRIVER_NOT_LOADED: Return = 9;
const TIMEOUT: Return = 10;

type Device = *mut c_void;
type EventSet = *mut c_void;

/// Device handles are these addresses plus the index; never dereferenced.
const HANDLE_BASE: usize = 0x5ead_0000;
const EVENT_SET: usize = 0x5e7_0000;

#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

#[repr(C)]
pub struct Memory {
    total: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// `nvmlMemory_v2` as nvml.h defines it: size, version 2 in the top byte.
const MEMORY_V2: c_uint = std::mem::size_of::<MemoryV2>() as c_uint | (2 << 24);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

#[repr(C)]
pub struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

struct State {
    json: Value,
    /// (device index, xid) not yet delivered.
    xids: VecDeque<(usize, u64)>,
    registered: Vec<usize>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn log_call(name: &str) {
    if let Ok(path) = std::env::var("VITALS_FAKE_NVML_CALLS")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{name}");
    }
}

fn with_state(f: impl FnOnce(&mut State) -> Return) -> Return {
    match STATE.lock() {
        Ok(mut g) => match g.as_mut() {
            Some(s) => f(s),
            None => UNINITIALIZED,
        },
        Err(_) => UNINITIALIZED,
    }
}

fn index_of(dev: Device) -> Option<usize> {
    (dev as usize).checked_sub(HANDLE_BASE)
}

fn with_device(dev: Device, f: impl FnOnce(&Value) -> Return) -> Return {
    with_state(|s| {
        let Some(d) = index_of(dev).and_then(|i| s.json["devices"].get(i)) else {
            return INVALID_ARGUMENT;
        };
        f(d)
    })
}

fn put<T>(out: *mut T, value: Option<T>) -> Return {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    match value {
        // SAFETY: the caller passes a writable pointer of this type.
        Some(v) => unsafe {
            out.write(v);
            SUCCESS
        },
        None => NOT_SUPPORTED,
    }
}

fn put_str(buf: *mut c_char, len: c_uint, s: Option<&str>) -> Return {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let Some(s) = s else {
        return NOT_SUPPORTED;
    };
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `len` bytes; we write at most that.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

fn u(v: &Value, path: &[&str]) -> Option<u64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_u64()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Return {
    log_call("nvmlInit_v2");
    if let Some(code) = std::env::var("VITALS_FAKE_NVML_INIT_STATUS")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        && code != SUCCESS
    {
        return code;
    }
    let Some(json) = std::env::var("VITALS_FAKE_NVML_JSON")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    else {
        return DRIVER_NOT_LOADED;
    };
    let mut xids = VecDeque::new();
    if let Some(devs) = json["devices"].as_array() {
        for (i, d) in devs.iter().enumerate() {
            for x in d["xid"].as_array().into_iter().flatten() {
                if let Some(x) = x.as_u64() {
                    xids.push_back((i, x));
                }
            }
        }
    }
    match STATE.lock() {
        Ok(mut g) => {
            *g = Some(State {
                json,
                xids,
                registered: Vec::new(),
            });
            SUCCESS
        }
        Err(_) => DRIVER_NOT_LOADED,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Return {
    log_call("nvmlShutdown");
    if let Ok(mut g) = STATE.lock() {
        *g = None;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(_r: Return) -> *const c_char {
    c"fake NVML error".as_ptr()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> Return {
    with_state(|s| put_str(buf, len, s.json["driver_version"].as_str()))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCount_v2(n: *mut c_uint) -> Return {
    with_state(|s| {
        put(
            n,
            Some(s.json["devices"].as_array().map_or(0, |a| a.len()) as c_uint),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetHandleByIndex_v2(i: c_uint, dev: *mut Device) -> Return {
    with_state(|s| {
        if s.json["devices"].get(i as usize).is_none() {
            return INVALID_ARGUMENT;
        }
        put(dev, Some((HANDLE_BASE + i as usize) as Device))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetName(dev: Device, buf: *mut c_char, len: c_uint) -> Return {
    with_device(dev, |d| put_str(buf, len, d["name"].as_str()))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetUUID(dev: Device, buf: *mut c_char, len: c_uint) -> Return {
    with_device(dev, |d| put_str(buf, len, d["uuid"].as_str()))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetSerial(dev: Device, buf: *mut c_char, len: c_uint) -> Return {
    with_device(dev, |d| put_str(buf, len, d["serial"].as_str()))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMinorNumber(dev: Device, n: *mut c_uint) -> Return {
    with_device(dev, |d| put(n, u(d, &["minor"]).map(|v| v as c_uint)))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPciInfo_v3(dev: Device, pci: *mut PciInfo) -> Return {
    with_device(dev, |d| {
        let (Some(domain), Some(bus), Some(device)) = (
            u(d, &["pci", "domain"]),
            u(d, &["pci", "bus"]),
            u(d, &["pci", "device"]),
        ) else {
            return NOT_SUPPORTED;
        };
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain: domain as c_uint,
            bus: bus as c_uint,
            device: device as c_uint,
            pci_device_id: 0,
            pci_sub_system_id: 0,
            bus_id: [0; 32],
        };
        let id = format!("{domain:08X}:{bus:02X}:{device:02X}.0");
        for (dst, src) in info.bus_id.iter_mut().zip(id.bytes()) {
            *dst = src as c_char;
        }
        put(pci, Some(info))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetUtilizationRates(dev: Device, out: *mut Utilization) -> Return {
    with_device(dev, |d| {
        let v = match (
            u(d, &["utilization", "gpu"]),
            u(d, &["utilization", "memory"]),
        ) {
            (Some(g), Some(m)) => Some(Utilization {
                gpu: g as c_uint,
                memory: m as c_uint,
            }),
            _ => None,
        };
        put(out, v)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMemoryInfo(dev: Device, out: *mut Memory) -> Return {
    with_device(dev, |d| {
        let reserved = u(d, &["memory", "reserved"]).unwrap_or(0);
        let v = match (u(d, &["memory", "total"]), u(d, &["memory", "used"])) {
            (Some(t), Some(used)) => Some(Memory {
                total: t,
                free: t.saturating_sub(used + reserved),
                used: used + reserved,
            }),
            _ => None,
        };
        put(out, v)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetMemoryInfo_v2(dev: Device, out: *mut MemoryV2) -> Return {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a writable nvmlMemory_v2_t with its version set.
    if unsafe { (*out).version } != MEMORY_V2 {
        return ARGUMENT_VERSION_MISMATCH;
    }
    with_device(dev, |d| {
        let reserved = u(d, &["memory", "reserved"]).unwrap_or(0);
        let v = match (u(d, &["memory", "total"]), u(d, &["memory", "used"])) {
            (Some(t), Some(used)) => Some(MemoryV2 {
                version: MEMORY_V2,
                total: t,
                reserved,
                free: t.saturating_sub(used + reserved),
                used,
            }),
            _ => None,
        };
        put(out, v)
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTemperatureThreshold(
    dev: Device,
    threshold: c_uint,
    t: *mut c_uint,
) -> Return {
    // Only NVML_TEMPERATURE_THRESHOLD_SLOWDOWN is in the file.
    if threshold != 1 {
        return NOT_SUPPORTED;
    }
    with_device(dev, |d| {
        put(t, u(d, &["slowdown_temperature"]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTemperature(dev: Device, sensor: c_uint, t: *mut c_uint) -> Return {
    if sensor != 0 {
        return INVALID_ARGUMENT;
    }
    with_device(dev, |d| put(t, u(d, &["temperature"]).map(|v| v as c_uint)))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPowerUsage(dev: Device, mw: *mut c_uint) -> Return {
    with_device(dev, |d| put(mw, u(d, &["power_mw"]).map(|v| v as c_uint)))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetEnforcedPowerLimit(dev: Device, mw: *mut c_uint) -> Return {
    with_device(dev, |d| {
        put(mw, u(d, &["power_limit_mw"]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTotalEnergyConsumption(dev: Device, mj: *mut c_ulonglong) -> Return {
    with_device(dev, |d| put(mj, u(d, &["energy_mj"])))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetClockInfo(dev: Device, kind: c_uint, mhz: *mut c_uint) -> Return {
    let key = match kind {
        0 => "graphics",
        1 => "sm",
        2 => "memory",
        3 => "video",
        _ => return INVALID_ARGUMENT,
    };
    with_device(dev, |d| {
        put(mhz, u(d, &["clocks_mhz", key]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetFanSpeed(dev: Device, pct: *mut c_uint) -> Return {
    with_device(dev, |d| {
        put(pct, u(d, &["fan_percent"]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetTotalEccErrors(
    dev: Device,
    kind: c_uint,
    counter: c_uint,
    n: *mut c_ulonglong,
) -> Return {
    let key = match kind {
        0 => "corrected",
        1 => "uncorrected",
        _ => return INVALID_ARGUMENT,
    };
    if counter != 1 {
        return NOT_SUPPORTED;
    }
    with_device(dev, |d| put(n, u(d, &["ecc_aggregate", key])))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCurrPcieLinkGeneration(dev: Device, g: *mut c_uint) -> Return {
    with_device(dev, |d| {
        put(g, u(d, &["pcie", "generation"]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCurrPcieLinkWidth(dev: Device, w: *mut c_uint) -> Return {
    with_device(dev, |d| {
        put(w, u(d, &["pcie", "width"]).map(|v| v as c_uint))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetPcieReplayCounter(dev: Device, n: *mut c_uint) -> Return {
    with_device(dev, |d| {
        put(n, u(d, &["pcie", "replay"]).map(|v| v as c_uint))
    })
}

// Both names through one internal function: an exported function calling
// another exported one would bind to it by name, and a test copy without
// that name would not load.
fn clock_event_reasons(dev: Device, r: *mut c_ulonglong) -> Return {
    with_device(dev, |d| put(r, u(d, &["clock_event_reasons"])))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    dev: Device,
    r: *mut c_ulonglong,
) -> Return {
    clock_event_reasons(dev, r)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    dev: Device,
    r: *mut c_ulonglong,
) -> Return {
    clock_event_reasons(dev, r)
}

fn running_processes(dev: Device, count: *mut c_uint, infos: *mut ProcessInfo) -> Return {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    with_device(dev, |d| {
        let Some(list) = d["processes"].as_array() else {
            return NOT_SUPPORTED;
        };
        // SAFETY: checked non-null above.
        let room = unsafe { count.read() } as usize;
        let r = put(count, Some(list.len() as c_uint));
        if r != SUCCESS {
            return r;
        }
        if list.len() > room || (infos.is_null() && !list.is_empty()) {
            return INSUFFICIENT_SIZE;
        }
        for (i, p) in list.iter().enumerate() {
            let info = ProcessInfo {
                pid: u(p, &["pid"]).unwrap_or(0) as c_uint,
                used_gpu_memory: u(p, &["used_memory"]).unwrap_or(u64::MAX),
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
            // SAFETY: `i < room`, the caller's array length.
            unsafe { infos.add(i).write(info) };
        }
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    dev: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Return {
    running_processes(dev, count, infos)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    dev: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Return {
    running_processes(dev, count, infos)
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetCreate(set: *mut EventSet) -> Return {
    with_state(|_| put(set, Some(EVENT_SET as EventSet)))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    dev: Device,
    types: c_ulonglong,
    set: EventSet,
) -> Return {
    if set as usize != EVENT_SET {
        return INVALID_ARGUMENT;
    }
    let Some(i) = index_of(dev) else {
        return INVALID_ARGUMENT;
    };
    with_state(|s| {
        if types & 0x8 != 0 && !s.registered.contains(&i) {
            s.registered.push(i);
        }
        SUCCESS
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetWait_v2(set: EventSet, data: *mut EventData, _ms: c_uint) -> Return {
    if set as usize != EVENT_SET {
        return INVALID_ARGUMENT;
    }
    with_state(|s| {
        let Some(pos) = s.xids.iter().position(|(i, _)| s.registered.contains(i)) else {
            return TIMEOUT;
        };
        let Some((i, xid)) = s.xids.remove(pos) else {
            return TIMEOUT;
        };
        put(
            data,
            Some(EventData {
                device: (HANDLE_BASE + i) as Device,
                event_type: 0x8,
                event_data: xid,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            }),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: EventSet) -> Return {
    if set as usize != EVENT_SET {
        return INVALID_ARGUMENT;
    }
    SUCCESS
}
