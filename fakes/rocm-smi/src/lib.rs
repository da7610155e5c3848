//! A stand-in `librocm_smi64.so` for tests on machines without an AMD GPU.
//!
//! It exports the `rsmi_*` functions of ROCm SMI 5.7 that the agent uses,
//! with the same C prototypes, and answers them from a `rocm-smi --json`
//! capture (the format of `shared/fixtures/rocm-smi/`): card N of the
//! capture is device N. Values the capture lacks, or gives as `N/A`, answer
//! `RSMI_STATUS_NOT_SUPPORTED`, as the real library does. Like ROCm 5.x it
//! does not export the 6.0-only functions (`rsmi_dev_power_get`,
//! `rsmi_dev_current_socket_power_get`,
//! `rsmi_compute_process_info_by_device_get`), so its structs use the 5.x
//! layout.
//!
//! Environment:
//! - `VITALS_FAKE_ROCM_SMI_JSON`: the capture. Unset or unreadable:
//!   `rsmi_init` fails with `RSMI_STATUS_INIT_ERROR`, like the real library
//!   on a machine without a GPU. A capture rewritten while loaded is read
//!   again (tests drive a GPU's values over time this way).
//! - `VITALS_FAKE_ROCM_SMI_INIT_STATUS`: a status `rsmi_init` returns instead.
//! - `VITALS_FAKE_ROCM_SMI_HANG_MS`: `rsmi_dev_busy_percent_get` sleeps this
//!   long first (a hung driver call).
//! - `VITALS_FAKE_ROCM_SMI_CALLS`: a file each `rsmi_init` and
//!   `rsmi_shut_down` call appends its name to.
//!
//! ECC counts come from a card's `"ECC <block> correctable"` and
//! `"ECC <block> uncorrectable"` entries (block names as in
//! `rsmi_gpu_block_t`: `umc`, `sdma`, `gfx`, ...; this fake's own keys, which
//! a test adds to a capture); without them ECC is not supported.
//!
//! Processes come from the capture's `system` entries `PID<n>`:
//! `"name, gpus, vram bytes, sdma, cu occupancy"`; a process with `gpus` = k
//! uses devices 0..k.
// C entry points: the caller is C, passing the pointers the header names.
#![allow(unsafe_code, clippy::not_unsafe_ptr_arg_deref)]

use std::collections::BTreeMap;
use std::ffi::{c_char, c_float};
use std::io::Write;
use std::sync::Mutex;

type Status = u32;
const SUCCESS: Status = 0;
const INVALID_ARGS: Status = 1;
const NOT_SUPPORTED: Status = 2;
const INIT_ERROR: Status = 8;
const NOT_FOUND: Status = 10;
const INSUFFICIENT_SIZE: Status = 11;

const MAX_FREQ: usize = 32;

#[repr(C)]
pub struct Version {
    major: u32,
    minor: u32,
    patch: u32,
    build: *const c_char,
}

#[repr(C)]
pub struct Frequencies {
    num_supported: u32,
    current: u32,
    frequency: [u64; MAX_FREQ],
}

#[repr(C)]
pub struct PcieBandwidth {
    transfer_rate: Frequencies,
    lanes: [u32; MAX_FREQ],
}

#[repr(C)]
pub struct ErrorCount {
    correctable_err: u64,
    uncorrectable_err: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    process_id: u32,
    pasid: u32,
    vram_usage: u64,
    sdma_usage: u64,
    cu_occupancy: u32,
}

type Card = BTreeMap<String, String>;

struct Proc {
    pid: u32,
    gpus: u32,
    vram: u64,
    sdma: u64,
    cu: u32,
}

struct State {
    cards: Vec<Card>,
    procs: Vec<Proc>,
    /// The capture's modification time when read: a test that rewrites
    /// the file changes what the next call answers.
    mtime: Option<std::time::SystemTime>,
}

fn capture_mtime() -> Option<std::time::SystemTime> {
    let path = std::env::var("VITALS_FAKE_ROCM_SMI_JSON").ok()?;
    std::fs::metadata(path).ok()?.modified().ok()
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn log_call(name: &str) {
    if let Ok(path) = std::env::var("VITALS_FAKE_ROCM_SMI_CALLS")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{name}");
    }
}

fn load() -> Option<State> {
    let path = std::env::var("VITALS_FAKE_ROCM_SMI_JSON").ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let obj = json.as_object()?;
    let mut cards: Vec<(u32, Card)> = Vec::new();
    let mut procs = Vec::new();
    for (k, v) in obj {
        let Some(fields) = v.as_object() else {
            continue;
        };
        let card: Card = fields
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        if let Some(n) = k.strip_prefix("card").and_then(|n| n.parse().ok()) {
            cards.push((n, card));
        } else if k == "system" {
            for (key, val) in &card {
                let Some(pid) = key.strip_prefix("PID").and_then(|p| p.parse().ok()) else {
                    continue;
                };
                let parts: Vec<&str> = val.split(',').map(str::trim).collect();
                let num = |i: usize| {
                    parts
                        .get(i)
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                procs.push(Proc {
                    pid,
                    gpus: num(1) as u32,
                    vram: num(2),
                    sdma: num(3),
                    cu: num(4) as u32,
                });
            }
        }
    }
    cards.sort_by_key(|(n, _)| *n);
    Some(State {
        cards: cards.into_iter().map(|(_, c)| c).collect(),
        procs,
        mtime: capture_mtime(),
    })
}

/// Runs `f` on the initialised state.
fn with_state(f: impl FnOnce(&State) -> Status) -> Status {
    match STATE.lock() {
        Ok(mut g) => {
            // Re-read a capture that changed (same number of cards: the
            // devices stay what rsmi_num_monitor_devices said).
            if let Some(s) = g.as_ref()
                && capture_mtime() != s.mtime
                && let Some(fresh) = load()
                && fresh.cards.len() == s.cards.len()
            {
                *g = Some(fresh);
            }
            match g.as_ref() {
                Some(s) => f(s),
                None => INIT_ERROR,
            }
        }
        Err(_) => INIT_ERROR,
    }
}

/// Runs `f` on device `dv`'s capture.
fn with_card(dv: u32, f: impl FnOnce(&Card) -> Status) -> Status {
    with_state(|s| match s.cards.get(dv as usize) {
        Some(c) => f(c),
        None => INVALID_ARGS,
    })
}

/// A number out of a capture value: `31.0`, `(300Mhz)`, `0x738c`.
fn number(card: &Card, key: &str) -> Option<f64> {
    let v = card.get(key)?.trim();
    if let Some(hex) = v.strip_prefix("0x") {
        return u64::from_str_radix(hex, 16).ok().map(|n| n as f64);
    }
    let v = v.trim_start_matches('(').trim_end_matches(')');
    let v = v.trim_end_matches("Mhz").trim_end_matches("MHz");
    v.parse().ok()
}

/// An integer capture value, exactly: `34342961152`, `0x2150e7d042a1124`.
fn integer(card: &Card, key: &str) -> Option<u64> {
    let v = card.get(key)?.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Writes `value` through `out`, or says what went wrong.
fn put<T>(out: *mut T, value: Option<T>) -> Status {
    if out.is_null() {
        return INVALID_ARGS;
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

/// Copies `s` into a C buffer of `len` bytes, NUL-terminated.
fn put_str(buf: *mut c_char, len: usize, s: Option<&str>) -> Status {
    if buf.is_null() || len == 0 {
        return INVALID_ARGS;
    }
    let Some(s) = s.filter(|s| !s.eq_ignore_ascii_case("N/A")) else {
        return NOT_SUPPORTED;
    };
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller's buffer holds `len` bytes; we write at most that.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_init(_flags: u64) -> Status {
    log_call("rsmi_init");
    if let Some(code) = std::env::var("VITALS_FAKE_ROCM_SMI_INIT_STATUS")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        && code != SUCCESS
    {
        return code;
    }
    let Some(state) = load() else {
        return INIT_ERROR;
    };
    match STATE.lock() {
        Ok(mut g) => {
            *g = Some(state);
            SUCCESS
        }
        Err(_) => INIT_ERROR,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_shut_down() -> Status {
    log_call("rsmi_shut_down");
    if let Ok(mut g) = STATE.lock() {
        *g = None;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_version_get(v: *mut Version) -> Status {
    put(
        v,
        Some(Version {
            major: 5,
            minor: 7,
            patch: 1,
            build: c"fake".as_ptr(),
        }),
    )
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_status_string(_status: Status, out: *mut *const c_char) -> Status {
    put(out, Some(c"fake status".as_ptr()))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_num_monitor_devices(n: *mut u32) -> Status {
    with_state(|s| put(n, Some(s.cards.len() as u32)))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_name_get(dv: u32, name: *mut c_char, len: usize) -> Status {
    with_card(dv, |c| {
        put_str(name, len, c.get("Card series").map(String::as_str))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_serial_number_get(dv: u32, serial: *mut c_char, len: u32) -> Status {
    with_card(dv, |c| {
        put_str(
            serial,
            len as usize,
            c.get("Serial Number").map(String::as_str),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_unique_id_get(dv: u32, id: *mut u64) -> Status {
    with_card(dv, |c| put(id, integer(c, "Unique ID")))
}

/// `0000:1E:00.0` → BDFID.
fn bdfid(s: &str) -> Option<u64> {
    let (domain, rest) = s.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let h = |x: &str| u64::from_str_radix(x, 16).ok();
    Some((h(domain)? << 32) | (h(bus)? << 8) | (h(dev)? << 3) | h(func)?)
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_pci_id_get(dv: u32, id: *mut u64) -> Status {
    with_card(dv, |c| put(id, c.get("PCI Bus").and_then(|s| bdfid(s))))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_busy_percent_get(dv: u32, pct: *mut u32) -> Status {
    if let Some(ms) = std::env::var("VITALS_FAKE_ROCM_SMI_HANG_MS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    with_card(dv, |c| put(pct, number(c, "GPU use (%)").map(|n| n as u32)))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_memory_busy_percent_get(dv: u32, pct: *mut u32) -> Status {
    with_card(dv, |c| {
        put(pct, number(c, "GPU memory use (%)").map(|n| n as u32))
    })
}

fn mem_key(kind: u32, used: bool) -> Option<&'static str> {
    Some(match (kind, used) {
        (0, false) => "VRAM Total Memory (B)",
        (0, true) => "VRAM Total Used Memory (B)",
        (1, false) => "VIS_VRAM Total Memory (B)",
        (1, true) => "VIS_VRAM Total Used Memory (B)",
        (2, false) => "GTT Total Memory (B)",
        (2, true) => "GTT Total Used Memory (B)",
        _ => return None,
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_memory_total_get(dv: u32, kind: u32, total: *mut u64) -> Status {
    let Some(key) = mem_key(kind, false) else {
        return INVALID_ARGS;
    };
    with_card(dv, |c| put(total, integer(c, key)))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_memory_usage_get(dv: u32, kind: u32, used: *mut u64) -> Status {
    let Some(key) = mem_key(kind, true) else {
        return INVALID_ARGS;
    };
    with_card(dv, |c| put(used, integer(c, key)))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_temp_metric_get(
    dv: u32,
    sensor: u32,
    metric: u32,
    t: *mut i64,
) -> Status {
    let key = match sensor {
        0 => "Temperature (Sensor edge) (C)",
        1 => "Temperature (Sensor junction) (C)",
        2 => "Temperature (Sensor memory) (C)",
        3..=6 => return NOT_SUPPORTED,
        _ => return INVALID_ARGS,
    };
    if metric != 0 {
        return NOT_SUPPORTED;
    }
    with_card(dv, |c| {
        put(t, number(c, key).map(|deg| (deg * 1000.0).round() as i64))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_power_ave_get(dv: u32, sensor: u32, uw: *mut u64) -> Status {
    if sensor != 0 {
        return INVALID_ARGS;
    }
    with_card(dv, |c| {
        put(
            uw,
            number(c, "Average Graphics Package Power (W)").map(|w| (w * 1e6).round() as u64),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_power_cap_get(dv: u32, sensor: u32, uw: *mut u64) -> Status {
    if sensor != 0 {
        return INVALID_ARGS;
    }
    with_card(dv, |c| {
        put(
            uw,
            number(c, "Max Graphics Package Power (W)").map(|w| (w * 1e6).round() as u64),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_energy_count_get(
    dv: u32,
    count: *mut u64,
    resolution: *mut c_float,
    ts: *mut u64,
) -> Status {
    with_card(dv, |c| {
        let (Some(n), Some(uj)) = (
            number(c, "Energy counter"),
            number(c, "Accumulated Energy (uJ)"),
        ) else {
            return NOT_SUPPORTED;
        };
        if n <= 0.0 {
            return NOT_SUPPORTED;
        }
        let r = put(count, Some(n as u64));
        if r != SUCCESS {
            return r;
        }
        let r = put(resolution, Some((uj / n) as c_float));
        if r != SUCCESS {
            return r;
        }
        put(ts, Some(0))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_gpu_clk_freq_get(dv: u32, kind: u32, f: *mut Frequencies) -> Status {
    let name = match kind {
        0 => "sclk",
        1 => "fclk",
        2 => "dcefclk",
        3 => "socclk",
        4 => "mclk",
        _ => return INVALID_ARGS,
    };
    with_card(dv, |c| {
        let (Some(mhz), Some(level)) = (
            number(c, &format!("{name} clock speed:")),
            number(c, &format!("{name} clock level:")),
        ) else {
            return NOT_SUPPORTED;
        };
        let level = level as usize;
        if level >= MAX_FREQ {
            return NOT_SUPPORTED;
        }
        let mut freq = [0u64; MAX_FREQ];
        freq[level] = (mhz * 1e6).round() as u64;
        put(
            f,
            Some(Frequencies {
                num_supported: level as u32 + 1,
                current: level as u32,
                frequency: freq,
            }),
        )
    })
}

/// `0 (8.0GT/s x16)` → (level, T/s, lanes).
fn pcie_level(s: &str) -> Option<(usize, u64, u32)> {
    let (level, rest) = s.trim().split_once(' ')?;
    let rest = rest.trim().trim_start_matches('(').trim_end_matches(')');
    let (rate, lanes) = rest.split_once(" x")?;
    let gts: f64 = rate.trim_end_matches("GT/s").parse().ok()?;
    Some((
        level.parse().ok()?,
        (gts * 1e9).round() as u64,
        lanes.parse().ok()?,
    ))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_pci_bandwidth_get(dv: u32, b: *mut PcieBandwidth) -> Status {
    with_card(dv, |c| {
        let Some((level, rate, lanes)) = c.get("pcie clock level").and_then(|s| pcie_level(s))
        else {
            return NOT_SUPPORTED;
        };
        if level >= MAX_FREQ {
            return NOT_SUPPORTED;
        }
        let mut freq = [0u64; MAX_FREQ];
        let mut l = [0u32; MAX_FREQ];
        freq[level] = rate;
        l[level] = lanes;
        put(
            b,
            Some(PcieBandwidth {
                transfer_rate: Frequencies {
                    num_supported: level as u32 + 1,
                    current: level as u32,
                    frequency: freq,
                },
                lanes: l,
            }),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_pci_replay_counter_get(dv: u32, n: *mut u64) -> Status {
    with_card(dv, |c| put(n, integer(c, "PCIe Replay Count")))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_fan_speed_get(dv: u32, sensor: u32, speed: *mut i64) -> Status {
    if sensor != 0 {
        return INVALID_ARGS;
    }
    with_card(dv, |c| {
        put(speed, number(c, "Fan speed (level)").map(|v| v as i64))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_fan_rpms_get(dv: u32, sensor: u32, rpm: *mut i64) -> Status {
    if sensor != 0 {
        return INVALID_ARGS;
    }
    with_card(dv, |c| put(rpm, number(c, "Fan RPM").map(|v| v as i64)))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_volt_metric_get(
    dv: u32,
    kind: u32,
    metric: u32,
    mv: *mut i64,
) -> Status {
    if kind != 0 || metric != 0 {
        return NOT_SUPPORTED;
    }
    with_card(dv, |c| put(mv, number(c, "Voltage (mV)").map(|v| v as i64)))
}

/// `rsmi_gpu_block_t` bits by block name, as ROCm SMI 5.x numbers them.
const ECC_BLOCKS: &[(u64, &str)] = &[
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

/// A block's (correctable, uncorrectable) counts from the capture's
/// `"ECC <block> correctable"` / `"ECC <block> uncorrectable"` keys (this
/// fake's own: `rocm-smi --json` has no per-block ECC counts); None when
/// the capture has neither.
fn ecc_of(card: &Card, block: &str) -> Option<(u64, u64)> {
    let c = number(card, &format!("ECC {block} correctable"));
    let u = number(card, &format!("ECC {block} uncorrectable"));
    if c.is_none() && u.is_none() {
        return None;
    }
    Some((c.unwrap_or(0.0) as u64, u.unwrap_or(0.0) as u64))
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_ecc_enabled_get(dv: u32, mask: *mut u64) -> Status {
    with_card(dv, |c| {
        let m = ECC_BLOCKS
            .iter()
            .filter(|(_, b)| ecc_of(c, b).is_some())
            .fold(0u64, |m, (bit, _)| m | bit);
        put(mask, (m != 0).then_some(m))
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_ecc_count_get(dv: u32, block: u64, ec: *mut ErrorCount) -> Status {
    with_card(dv, |c| {
        let counts = ECC_BLOCKS
            .iter()
            .find(|(bit, _)| *bit == block)
            .and_then(|(_, b)| ecc_of(c, b));
        put(
            ec,
            counts.map(|(correctable_err, uncorrectable_err)| ErrorCount {
                correctable_err,
                uncorrectable_err,
            }),
        )
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_dev_xgmi_error_status(dv: u32, _status: *mut u32) -> Status {
    with_card(dv, |_| NOT_SUPPORTED)
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_compute_process_info_get(
    procs: *mut ProcessInfo,
    num_items: *mut u32,
) -> Status {
    if num_items.is_null() {
        return INVALID_ARGS;
    }
    with_state(|s| {
        let n = s.procs.len();
        if procs.is_null() {
            return put(num_items, Some(n as u32));
        }
        // SAFETY: checked non-null above; the caller says how many fit.
        let room = unsafe { num_items.read() } as usize;
        let take = n.min(room);
        for (i, p) in s.procs.iter().take(take).enumerate() {
            // SAFETY: `i < room`, the caller's array length.
            unsafe {
                procs.add(i).write(ProcessInfo {
                    process_id: p.pid,
                    pasid: 0,
                    vram_usage: p.vram,
                    sdma_usage: p.sdma,
                    cu_occupancy: p.cu,
                })
            };
        }
        let r = put(num_items, Some(take as u32));
        if r == SUCCESS && take < n {
            INSUFFICIENT_SIZE
        } else {
            r
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_compute_process_gpus_get(
    pid: u32,
    indices: *mut u32,
    num_devices: *mut u32,
) -> Status {
    if num_devices.is_null() || indices.is_null() {
        return INVALID_ARGS;
    }
    with_state(|s| {
        let Some(p) = s.procs.iter().find(|p| p.pid == pid) else {
            return NOT_FOUND;
        };
        // SAFETY: checked non-null above.
        let room = unsafe { num_devices.read() } as usize;
        let n = (p.gpus as usize).min(s.cards.len());
        for i in 0..n.min(room) {
            // SAFETY: `i < room`, the caller's array length.
            unsafe { indices.add(i).write(i as u32) };
        }
        let r = put(num_devices, Some(n.min(room) as u32));
        if r == SUCCESS && n > room {
            INSUFFICIENT_SIZE
        } else {
            r
        }
    })
}

#[unsafe(no_mangle)]
pub extern "C" fn rsmi_compute_process_info_by_pid_get(pid: u32, out: *mut ProcessInfo) -> Status {
    with_state(|s| match s.procs.iter().find(|p| p.pid == pid) {
        Some(p) => put(
            out,
            Some(ProcessInfo {
                process_id: p.pid,
                pasid: 0,
                vram_usage: p.vram,
                sdma_usage: p.sdma,
                cu_occupancy: p.cu,
            }),
        ),
        None => NOT_FOUND,
    })
}
