//! amdgpu through sysfs, for hosts without ROCm SMI: the files under
//! `<sysfs>/class/drm/card*/device/` (`gpu_busy_percent`,
//! `mem_busy_percent`, `mem_info_*`, `pp_dpm_sclk`/`pp_dpm_mclk`, PCIe link
//! files, `ras/*_err_count`, `hwmon/hwmon*/` temperatures, power, fan and
//! energy). Cards whose driver is not amdgpu (i915, nouveau, ...) and the
//! `card0-DP-1` style connector entries are skipped.

use std::fs;
use std::path::{Path, PathBuf};

use super::{Backend, BackendKind, EccCount, GpuIdentity, GpuStats, OpenError, OpenSpec};

pub struct Sysfs {
    cards: Vec<Card>,
    root: PathBuf,
}

struct Card {
    id: GpuIdentity,
    device: PathBuf,
    hwmon: Option<PathBuf>,
}

/// RAS blocks whose `ras/<block>_err_count` files are read.
const RAS_BLOCKS: &[&str] = &[
    "umc",
    "sdma",
    "gfx",
    "mmhub",
    "athub",
    "pcie_bif",
    "hdp",
    "xgmi_wafl",
    "df",
    "smn",
    "sem",
    "mp0",
    "mp1",
    "fuse",
];

fn read(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    read(path)?.parse().ok()
}

fn read_f64(path: &Path) -> Option<f64> {
    read(path)?.parse().ok()
}

/// The key's value in a `uevent` file.
fn uevent(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// The current level of a `pp_dpm_*` file (`1: 991Mhz *`), in MHz.
pub fn current_dpm_mhz(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_end().ends_with('*'))?;
    let (_, rest) = line.split_once(':')?;
    let value = rest.trim().trim_end_matches('*').trim();
    let number = value
        .strip_suffix("Mhz")
        .or_else(|| value.strip_suffix("MHz"))?;
    number.trim().parse().ok()
}

/// `8.0 GT/s PCIe` → 8.0.
pub fn link_speed_gts(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// `ue: 0\nce: 3` (and `de:` where the kernel has it).
pub fn ras_count(text: &str) -> Option<EccCount> {
    let mut c = EccCount::default();
    let (mut ue, mut ce) = (false, false);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let Ok(v) = v.trim().parse::<u64>() else {
            continue;
        };
        match k.trim() {
            "ue" => {
                c.uncorrectable = v;
                ue = true;
            }
            "ce" => {
                c.correctable = v;
                ce = true;
            }
            "de" => c.deferred = Some(v),
            _ => {}
        }
    }
    (ue && ce).then_some(c)
}

/// The hwmon directory of a device, if it has one.
fn hwmon_of(device: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(device.join("hwmon"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    dirs.into_iter().next()
}

impl Sysfs {
    pub fn open(spec: &OpenSpec) -> Result<Sysfs, OpenError> {
        let root = spec.sysfs.join("class/drm");
        let entries = fs::read_dir(&root)
            .map_err(|e| OpenError::Absent(format!("{}: {e}", root.display())))?;
        let mut names: Vec<(u32, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n = name.strip_prefix("card")?.parse::<u32>().ok()?;
                Some((n, name))
            })
            .collect();
        names.sort();
        let mut cards = Vec::new();
        for (_, name) in names {
            let device = root.join(&name).join("device");
            let Some(ev) = read(&device.join("uevent")) else {
                continue;
            };
            if uevent(&ev, "DRIVER").as_deref() != Some("amdgpu") {
                continue;
            }
            let serial = read(&device.join("serial_number"))
                .filter(|s| !s.is_empty())
                .or_else(|| read(&device.join("unique_id")).filter(|s| !s.is_empty()))
                .unwrap_or_default();
            let model = read(&device.join("product_name"))
                .filter(|s| !s.is_empty())
                .or_else(|| uevent(&ev, "PCI_ID").map(|id| format!("amdgpu {id}")))
                .unwrap_or_else(|| "amdgpu".into());
            let id = GpuIdentity {
                index: cards.len() as u32,
                card: name,
                serial,
                model,
                pci_bus: uevent(&ev, "PCI_SLOT_NAME")
                    .unwrap_or_default()
                    .to_lowercase(),
            };
            let hwmon = hwmon_of(&device);
            cards.push(Card { id, device, hwmon });
        }
        if cards.is_empty() {
            return Err(OpenError::Absent(format!(
                "no amdgpu card under {}",
                root.display()
            )));
        }
        Ok(Sysfs { cards, root })
    }
}

impl Backend for Sysfs {
    fn kind(&self) -> BackendKind {
        BackendKind::Sysfs
    }

    fn describe(&self) -> String {
        format!(
            "amdgpu sysfs ({}), {}",
            self.root.display(),
            super::summary(self.cards.iter().map(|c| c.id.model.as_str()))
        )
    }

    fn read(&mut self) -> Result<Vec<GpuStats>, String> {
        let mut out = Vec::with_capacity(self.cards.len());
        for c in &self.cards {
            let d = &c.device;
            let mut g = GpuStats {
                id: c.id.clone(),
                gfx_activity: read_f64(&d.join("gpu_busy_percent")),
                umc_activity: read_f64(&d.join("mem_busy_percent")),
                vram_used_bytes: read_u64(&d.join("mem_info_vram_used")),
                vram_total_bytes: read_u64(&d.join("mem_info_vram_total")),
                vis_vram_used_bytes: read_u64(&d.join("mem_info_vis_vram_used")),
                vis_vram_total_bytes: read_u64(&d.join("mem_info_vis_vram_total")),
                gtt_used_bytes: read_u64(&d.join("mem_info_gtt_used")),
                gtt_total_bytes: read_u64(&d.join("mem_info_gtt_total")),
                pcie_speed_gts: read(&d.join("current_link_speed"))
                    .as_deref()
                    .and_then(link_speed_gts),
                pcie_width: read(&d.join("current_link_width")).and_then(|s| s.parse().ok()),
                pcie_replay_count: read_u64(&d.join("pcie_replay_count")),
                ..GpuStats::default()
            };
            for (file, clock) in [
                ("pp_dpm_sclk", "GPU_CLOCK_TYPE_SYSTEM"),
                ("pp_dpm_mclk", "GPU_CLOCK_TYPE_MEMORY"),
                ("pp_dpm_fclk", "GPU_CLOCK_TYPE_FABRIC"),
                ("pp_dpm_socclk", "GPU_CLOCK_TYPE_SOC"),
                ("pp_dpm_dcefclk", "GPU_CLOCK_TYPE_DCE"),
            ] {
                if let Some(mhz) = read(&d.join(file)).as_deref().and_then(current_dpm_mhz) {
                    g.clocks_mhz.push((clock, mhz));
                }
            }
            let mut total = EccCount::default();
            for block in RAS_BLOCKS {
                if let Some(e) = read(&d.join(format!("ras/{block}_err_count")))
                    .as_deref()
                    .and_then(ras_count)
                {
                    total.correctable += e.correctable;
                    total.uncorrectable += e.uncorrectable;
                    if let Some(de) = e.deferred {
                        total.deferred = Some(total.deferred.unwrap_or(0) + de);
                    }
                    g.ecc_blocks.push((block, e));
                }
            }
            if !g.ecc_blocks.is_empty() {
                g.ecc_total = Some(total);
            }
            if let Some(h) = &c.hwmon {
                read_hwmon(h, &mut g);
            }
            out.push(g);
        }
        Ok(out)
    }
}

/// amdgpu's hwmon: `tempN_input` (m°C) named by `tempN_label` (edge,
/// junction, mem), `power1_average` or `power1_input` and `power1_cap`
/// (µW), `fan1_input` (RPM), `pwm1` (0–255), `in0_input` (mV, vddgfx),
/// `energy1_input` (µJ).
fn read_hwmon(h: &Path, g: &mut GpuStats) {
    for n in 1..=8 {
        let Some(milli) = read_f64(&h.join(format!("temp{n}_input"))) else {
            continue;
        };
        let c = milli / 1000.0;
        match read(&h.join(format!("temp{n}_label"))).as_deref() {
            Some("edge") => g.temp_edge = Some(c),
            Some("junction") => g.temp_junction = Some(c),
            Some("mem") => g.temp_memory = Some(c),
            None if n == 1 => g.temp_edge = Some(c),
            _ => {}
        }
    }
    g.power_watts = read_f64(&h.join("power1_average"))
        .or_else(|| read_f64(&h.join("power1_input")))
        .map(|uw| uw / 1e6);
    g.power_cap_watts = read_f64(&h.join("power1_cap")).map(|uw| uw / 1e6);
    g.fan_rpm = read_f64(&h.join("fan1_input"));
    g.fan_speed_percent = read_f64(&h.join("pwm1")).map(|p| p * 100.0 / 255.0);
    g.voltage_mv = read_f64(&h.join("in0_input"));
    g.energy_microjoules = read_f64(&h.join("energy1_input"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_dpm_level() {
        assert_eq!(
            current_dpm_mhz("0: 852Mhz *\n1: 991Mhz \n2: 1084Mhz \n"),
            Some(852.0)
        );
        assert_eq!(current_dpm_mhz("0: 500Mhz \n1: 1000Mhz *\n"), Some(1000.0));
        assert_eq!(current_dpm_mhz("0: 500Mhz\n1: 1000Mhz\n"), None);
        assert_eq!(current_dpm_mhz(""), None);
        assert_eq!(current_dpm_mhz("garbage *"), None);
    }

    #[test]
    fn link_speed_and_ras() {
        assert_eq!(link_speed_gts("8.0 GT/s PCIe"), Some(8.0));
        assert_eq!(link_speed_gts("16.0 GT/s PCIe"), Some(16.0));
        assert_eq!(link_speed_gts("Unknown"), None);
        assert_eq!(
            ras_count("ue: 2\nce: 5\n"),
            Some(EccCount {
                correctable: 5,
                uncorrectable: 2,
                deferred: None
            })
        );
        assert_eq!(
            ras_count("ue: 0\nce: 1\nde: 4\n").and_then(|c| c.deferred),
            Some(4)
        );
        assert_eq!(ras_count("ue: x\nce: 1\n"), None);
    }
}
