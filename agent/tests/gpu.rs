//! The GPU source through the same libloading path as on a real host:
//! the fake ROCm SMI and NVML libraries built by this workspace
//! (`fakes/`), copies of them with symbols removed, Debian's real
//! `librocm_smi64.so.1` on this GPU-less machine, and the amdgpu sysfs
//! fallback on a captured tree. `real_gpu_prints_every_metric_when_one_is_present`
//! (ignored unless asked for with `--run-ignored`) reads the GPUs of the
//! machine the test runs on and prints every metric.

// A test that cannot set up its input should stop right there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
const AGENT: &str = env!("CARGO_BIN_EXE_vitals-agent");
const MIB: f64 = 1024.0 * 1024.0;

/// A fake vendor library built beside the agent (`cargo build --workspace`).
fn fake(stem: &str) -> PathBuf {
    let dir = Path::new(AGENT).parent().unwrap();
    let p = dir.join(format!("lib{stem}.so"));
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace` (scripts/test does) before the tests",
        p.display()
    );
    p
}

/// A copy of `lib` in which the dynamic linker cannot find `names`: each
/// name's entry in the dynamic string table is renamed (same length,
/// first letter changed), as if the library were a version without them.
fn without_symbols(lib: &Path, names: &[&str], dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(lib).unwrap();
    for name in names {
        let needle: Vec<u8> = [&[0u8][..], name.as_bytes(), &[0u8][..]].concat();
        let mut found = 0;
        let mut i = 0;
        while i + needle.len() <= bytes.len() {
            if bytes[i..i + needle.len()] == needle[..] {
                bytes[i + 1] = b'X';
                found += 1;
                i += needle.len();
            } else {
                i += 1;
            }
        }
        assert!(found > 0, "{name} not found in {}", lib.display());
    }
    let out = dir.join(format!(
        "partial-{}",
        lib.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&out, bytes).unwrap();
    out
}

struct Once {
    /// (name, labels, value)
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    sources: Vec<Value>,
    stderr: String,
}

impl Once {
    fn report(&self, source: &str) -> &Value {
        self.sources
            .iter()
            .find(|r| r["source"] == source)
            .unwrap_or_else(|| panic!("no report for {source}: {:?}", self.sources))
    }

    /// Every `gpu_*` sample of one GPU: (name + extra label) → value.
    fn gpu(&self, index: u32) -> BTreeMap<String, f64> {
        let base = ["gpu", "card", "serial", "model", "pci_bus"];
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n.starts_with("gpu_")
                    && l.get("gpu").map(String::as_str) == Some(&index.to_string())
            })
            .map(|(n, l, v)| {
                let extra: Vec<String> = l
                    .iter()
                    .filter(|(k, _)| !base.contains(&k.as_str()))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let key = if extra.is_empty() {
                    n.clone()
                } else {
                    format!("{n}{{{}}}", extra.join(","))
                };
                (key, *v)
            })
            .collect()
    }

    fn labels_of(&self, index: u32) -> BTreeMap<String, String> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == "gpu_gfx_activity" && l["gpu"] == index.to_string())
            .map(|(_, l, _)| l.clone())
            .unwrap_or_else(|| panic!("no gpu_gfx_activity for GPU {index}"))
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| *v)
    }
}

fn once(args: &[&str], env: &[(&str, &str)]) -> Once {
    let mut cmd = Command::new(AGENT);
    cmd.arg("once").args(args).arg("--format").arg("json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("VITALS_LOG");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "vitals-agent once failed: {stderr}");
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let samples = json["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels: BTreeMap<String, String> =
                serde_json::from_value(s["labels"].clone()).unwrap();
            (
                s["name"].as_str().unwrap().to_string(),
                labels,
                s["value"].as_f64().unwrap(),
            )
        })
        .collect();
    Once {
        samples,
        sources: json["sources"].as_array().unwrap().clone(),
        stderr,
    }
}

fn rocm_once(capture: &Path, lib: &Path, extra_env: &[(&str, &str)]) -> Once {
    let mut env = vec![("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap())];
    env.extend_from_slice(extra_env);
    once(
        &[
            "--source",
            "gpu",
            "--gpu-backend",
            "rocm",
            "--gpu-library",
            lib.to_str().unwrap(),
        ],
        &env,
    )
}

/// What the agent must report for each card of a `rocm-smi --json`
/// capture, worked out from the capture's own fields.
fn expected_from_capture(
    capture: &Value,
) -> Vec<(BTreeMap<String, String>, BTreeMap<String, f64>)> {
    let obj = capture.as_object().unwrap();
    let mut cards: Vec<(u32, &serde_json::Map<String, Value>)> = obj
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("card")?.parse().ok()?, v.as_object()?)))
        .collect();
    cards.sort_by_key(|(n, _)| *n);
    // PID<n>: "name, gpus, vram, sdma, cu": a process on k GPUs uses 0..k.
    let procs: Vec<u64> = obj
        .get("system")
        .and_then(Value::as_object)
        .map(|s| {
            s.iter()
                .filter(|(k, _)| k.starts_with("PID"))
                .map(|(_, v)| {
                    v.as_str()
                        .unwrap()
                        .split(',')
                        .nth(1)
                        .unwrap()
                        .trim()
                        .parse()
                        .unwrap()
                })
                .collect()
        })
        .unwrap_or_default();
    let num = |c: &serde_json::Map<String, Value>, k: &str| -> Option<f64> {
        let s = c.get(k)?.as_str()?.trim();
        s.trim_start_matches('(')
            .trim_end_matches(')')
            .trim_end_matches("Mhz")
            .parse()
            .ok()
    };
    let text = |c: &serde_json::Map<String, Value>, k: &str| -> Option<String> {
        c.get(k)
            .and_then(Value::as_str)
            .filter(|s| *s != "N/A")
            .map(str::to_string)
    };
    let mut out = Vec::new();
    for (i, (_, c)) in cards.into_iter().enumerate() {
        let mut labels = BTreeMap::new();
        labels.insert("gpu".to_string(), i.to_string());
        labels.insert("card".to_string(), format!("card{i}"));
        labels.insert(
            "serial".to_string(),
            text(c, "Serial Number")
                .or_else(|| text(c, "Unique ID"))
                .unwrap_or_default(),
        );
        labels.insert(
            "model".to_string(),
            text(c, "Card series").unwrap_or_else(|| "AMD GPU".into()),
        );
        labels.insert(
            "pci_bus".to_string(),
            text(c, "PCI Bus").unwrap().to_lowercase(),
        );
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("gpu_gfx_activity", num(c, "GPU use (%)"));
        put("gpu_umc_activity", num(c, "GPU memory use (%)"));
        for (kind, total, used) in [
            (
                "vram",
                "VRAM Total Memory (B)",
                "VRAM Total Used Memory (B)",
            ),
            (
                "visible_vram",
                "VIS_VRAM Total Memory (B)",
                "VIS_VRAM Total Used Memory (B)",
            ),
            ("gtt", "GTT Total Memory (B)", "GTT Total Used Memory (B)"),
        ] {
            put(&format!("gpu_total_{kind}"), num(c, total).map(|b| b / MIB));
            put(&format!("gpu_used_{kind}"), num(c, used).map(|b| b / MIB));
        }
        if let (Some(t), Some(u)) = (
            num(c, "VRAM Total Memory (B)"),
            num(c, "VRAM Total Used Memory (B)"),
        ) {
            put("gpu_free_vram", Some((t - u) / MIB));
        }
        put(
            "gpu_edge_temperature",
            num(c, "Temperature (Sensor edge) (C)"),
        );
        put(
            "gpu_junction_temperature",
            num(c, "Temperature (Sensor junction) (C)"),
        );
        put(
            "gpu_memory_temperature",
            num(c, "Temperature (Sensor memory) (C)"),
        );
        put(
            "gpu_power_usage",
            num(c, "Average Graphics Package Power (W)"),
        );
        put("gpu_power_cap", num(c, "Max Graphics Package Power (W)"));
        for (clk, label) in [
            ("sclk", "GPU_CLOCK_TYPE_SYSTEM"),
            ("fclk", "GPU_CLOCK_TYPE_FABRIC"),
            ("dcefclk", "GPU_CLOCK_TYPE_DCE"),
            ("socclk", "GPU_CLOCK_TYPE_SOC"),
            ("mclk", "GPU_CLOCK_TYPE_MEMORY"),
        ] {
            put(
                &format!("gpu_clock{{clock_type={label}}}"),
                num(c, &format!("{clk} clock speed:")),
            );
        }
        if let Some(pcie) = text(c, "pcie clock level") {
            // "1 (8.0GT/s x16)"
            let inner = pcie.split_once('(').unwrap().1.trim_end_matches(')');
            let (rate, lanes) = inner.split_once(" x").unwrap();
            put(
                "gpu_pcie_speed",
                Some(rate.trim_end_matches("GT/s").parse().unwrap()),
            );
            put("gpu_pcie_width", Some(lanes.parse().unwrap()));
        }
        put("gpu_pcie_replay_count", num(c, "PCIe Replay Count"));
        put("gpu_voltage", num(c, "Voltage (mV)"));
        put(
            "gpu_fan_speed",
            num(c, "Fan speed (level)").map(|l| l * 100.0 / 255.0),
        );
        put("gpu_fan_rpm", num(c, "Fan RPM"));
        put(
            "gpu_process_count",
            Some(procs.iter().filter(|&&k| k > i as u64).count() as f64),
        );
        out.push((labels, m));
    }
    out
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-6 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

fn assert_gpu_equals(run: &Once, index: u32, want: &BTreeMap<String, f64>, ctx: &str) {
    let got = run.gpu(index);
    let got_names: BTreeSet<&String> = got.keys().collect();
    let want_names: BTreeSet<&String> = want.keys().collect();
    assert_eq!(
        got_names, want_names,
        "{ctx}: GPU {index} reports a different set of metrics"
    );
    for (k, v) in want {
        assert_close(&format!("{ctx}: GPU {index} {k}"), got[k], *v);
    }
}

#[test]
fn fake_rocm_smi_serves_each_capture_and_the_agent_reports_it_gpu_by_gpu() {
    let lib = fake("fake_rocm_smi");
    for name in [
        "mi100_rocm571.json",
        "rx6700xt_rocm602.json",
        "vega-10-XT.json",
    ] {
        let capture_path = Path::new(FIXTURES).join("rocm-smi").join(name);
        let capture: Value =
            serde_json::from_str(&std::fs::read_to_string(&capture_path).unwrap()).unwrap();
        let expected = expected_from_capture(&capture);
        let run = rocm_once(&capture_path, &lib, &[]);
        assert_eq!(
            run.report("gpu")["status"],
            "ok",
            "{name}: {:?}",
            run.sources
        );
        assert_eq!(
            run.value("gpu_count"),
            Some(expected.len() as f64),
            "{name}"
        );
        for (i, (labels, metrics)) in expected.iter().enumerate() {
            assert_eq!(
                &run.labels_of(i as u32),
                labels,
                "{name}: labels of GPU {i}"
            );
            assert_gpu_equals(&run, i as u32, metrics, name);
        }
        assert!(
            run.stderr.contains("using ROCm SMI 5.7.1"),
            "{name}: the backend in use is said once: {}",
            run.stderr
        );
    }
    // The MI100 capture: six GPUs, 32 GiB each, nothing on them.
    let mi100 = rocm_once(
        &Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json"),
        &lib,
        &[],
    );
    assert_eq!(mi100.gpu(5)["gpu_total_vram"], 34342961152.0 / MIB);
    assert_eq!(mi100.gpu(0)["gpu_edge_temperature"], 31.0);
    assert_eq!(
        mi100.labels_of(0)["model"],
        "Arcturus GL-XL [Instinct MI100]"
    );
}

#[test]
fn rocm_smi_without_some_symbols_still_yields_every_other_metric() {
    let lib = fake("fake_rocm_smi");
    let dir = tempfile::tempdir().unwrap();
    let removed = [
        "rsmi_dev_temp_metric_get",
        "rsmi_dev_gpu_clk_freq_get",
        "rsmi_dev_power_ave_get",
    ];
    let partial = without_symbols(&lib, &removed, dir.path());
    let capture = Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json");
    let full = rocm_once(&capture, &lib, &[]);
    let part = rocm_once(&capture, &partial, &[]);
    assert_eq!(part.report("gpu")["status"], "ok", "{:?}", part.sources);
    for m in removed {
        assert!(
            part.stderr.contains(m),
            "the missing {m} is named: {}",
            part.stderr
        );
    }
    let gone = |k: &str| {
        k.ends_with("_temperature") || k.starts_with("gpu_clock{") || k == "gpu_power_usage"
    };
    for i in 0..6 {
        let want: BTreeMap<String, f64> =
            full.gpu(i).into_iter().filter(|(k, _)| !gone(k)).collect();
        assert!(want.len() >= 10, "the full run has the other metrics");
        assert!(
            full.gpu(i).keys().any(|k| gone(k)),
            "the full run has the removed ones"
        );
        assert_gpu_equals(&part, i, &want, "partial library");
    }
}

#[test]
fn rocm_smi_whose_init_fails_is_reported_once_and_other_sources_go_on() {
    let lib = fake("fake_rocm_smi");
    let capture = Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json");
    let sys = Path::new(FIXTURES).join("procfs/sys");
    let proc = Path::new(FIXTURES).join("procfs/proc");
    for (status, text) in [
        ("8", "RSMI_STATUS_INIT_ERROR"),
        ("4", "RSMI_STATUS_PERMISSION"),
    ] {
        let run = once(
            &[
                "--source",
                "gpu",
                "--source",
                "net",
                "--procfs",
                proc.to_str().unwrap(),
                "--sysfs",
                sys.to_str().unwrap(),
                "--gpu-backend",
                "rocm",
                "--gpu-library",
                lib.to_str().unwrap(),
            ],
            &[
                ("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap()),
                ("VITALS_FAKE_ROCM_SMI_INIT_STATUS", status),
            ],
        );
        let gpu = run.report("gpu");
        assert_eq!(gpu["status"], "unavailable", "{gpu:?}");
        assert!(gpu["error"].as_str().unwrap().contains(text), "{gpu:?}");
        assert_eq!(run.report("net")["status"], "ok");
        assert!(
            run.samples
                .iter()
                .any(|(n, _, _)| n.starts_with("node_network_")),
            "the other source still reports"
        );
        assert!(!run.samples.iter().any(|(n, _, _)| n.starts_with("gpu_")));
        let lines = run.stderr.lines().filter(|l| l.contains("gpu:")).count();
        assert_eq!(lines, 1, "one message: {}", run.stderr);
    }
}

#[test]
fn rocm_smi_is_initialised_once_and_shut_down_on_exit() {
    let lib = fake("fake_rocm_smi");
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let run = rocm_once(
        &Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json"),
        &lib,
        &[("VITALS_FAKE_ROCM_SMI_CALLS", calls.to_str().unwrap())],
    );
    assert_eq!(run.report("gpu")["status"], "ok");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "rsmi_init\nrsmi_shut_down\n"
    );
}

#[test]
fn a_hung_gpu_read_is_reported_and_does_not_hold_the_cycle() {
    let lib = fake("fake_rocm_smi");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[sources.gpu]\nbackend = \"rocm\"\ntimeout = \"300ms\"\n",
    )
    .unwrap();
    let capture = Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json");
    let start = Instant::now();
    let run = once(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--source",
            "gpu",
            "--gpu-library",
            lib.to_str().unwrap(),
        ],
        &[
            ("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap()),
            ("VITALS_FAKE_ROCM_SMI_HANG_MS", "60000"),
        ],
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the cycle waited for the hung call ({took:?})"
    );
    assert_eq!(run.value("vitals_gpu_read_hung"), Some(1.0));
    assert_eq!(run.value("vitals_gpu_read_timeouts_total"), Some(1.0));
    assert!(!run.samples.iter().any(|(n, _, _)| n.starts_with("gpu_")));
    assert!(
        run.stderr.contains("has not returned in time"),
        "{}",
        run.stderr
    );
}

fn nvml_once(lib: &Path, extra_env: &[(&str, &str)]) -> Once {
    let json = Path::new(DATA).join("nvml/h100x2.json");
    let mut env = vec![("VITALS_FAKE_NVML_JSON", json.to_str().unwrap())];
    env.extend_from_slice(extra_env);
    once(
        &[
            "--source",
            "gpu",
            "--gpu-backend",
            "nvml",
            "--gpu-library",
            lib.to_str().unwrap(),
        ],
        &env,
    )
}

/// What the agent must report for each device of the fake NVML's file.
fn expected_from_nvml(json: &Value) -> Vec<(BTreeMap<String, String>, BTreeMap<String, f64>)> {
    let mut out = Vec::new();
    for (i, d) in json["devices"].as_array().unwrap().iter().enumerate() {
        let f = |v: &Value| v.as_f64();
        let mut labels = BTreeMap::new();
        labels.insert("gpu".to_string(), i.to_string());
        labels.insert("card".to_string(), format!("nvidia{}", d["minor"]));
        labels.insert(
            "serial".to_string(),
            d["serial"]
                .as_str()
                .or(d["uuid"].as_str())
                .unwrap()
                .to_string(),
        );
        labels.insert("model".to_string(), d["name"].as_str().unwrap().to_string());
        labels.insert(
            "pci_bus".to_string(),
            format!(
                "{:04x}:{:02x}:{:02x}.0",
                d["pci"]["domain"].as_u64().unwrap(),
                d["pci"]["bus"].as_u64().unwrap(),
                d["pci"]["device"].as_u64().unwrap()
            ),
        );
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<f64>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("gpu_gfx_activity", f(&d["utilization"]["gpu"]));
        put("gpu_umc_activity", f(&d["utilization"]["memory"]));
        let total = f(&d["memory"]["total"]).unwrap();
        let used = f(&d["memory"]["used"]).unwrap();
        put("gpu_total_vram", Some(total / MIB));
        let reserved = f(&d["memory"]["reserved"]).unwrap_or(0.0);
        put("gpu_used_vram", Some(used / MIB));
        put("gpu_free_vram", Some((total - used - reserved) / MIB));
        put("gpu_reserved_vram", Some(reserved / MIB));
        put("gpu_edge_temperature", f(&d["temperature"]));
        put("gpu_slowdown_temperature", f(&d["slowdown_temperature"]));
        put("gpu_power_usage", f(&d["power_mw"]).map(|v| v / 1000.0));
        put("gpu_power_cap", f(&d["power_limit_mw"]).map(|v| v / 1000.0));
        put(
            "gpu_energy_consumed",
            f(&d["energy_mj"]).map(|v| v * 1000.0),
        );
        put("gpu_fan_speed", f(&d["fan_percent"]));
        for (k, label) in [
            ("graphics", "GPU_CLOCK_TYPE_SYSTEM"),
            ("sm", "GPU_CLOCK_TYPE_SM"),
            ("memory", "GPU_CLOCK_TYPE_MEMORY"),
            ("video", "GPU_CLOCK_TYPE_VIDEO"),
        ] {
            put(
                &format!("gpu_clock{{clock_type={label}}}"),
                f(&d["clocks_mhz"][k]),
            );
        }
        put("gpu_ecc_correct_total", f(&d["ecc_aggregate"]["corrected"]));
        put(
            "gpu_ecc_uncorrect_total",
            f(&d["ecc_aggregate"]["uncorrected"]),
        );
        let gts = [0.0, 2.5, 5.0, 8.0, 16.0, 32.0, 64.0];
        put(
            "gpu_pcie_speed",
            Some(gts[d["pcie"]["generation"].as_u64().unwrap() as usize]),
        );
        put("gpu_pcie_width", f(&d["pcie"]["width"]));
        put("gpu_pcie_replay_count", f(&d["pcie"]["replay"]));
        let reasons = d["clock_event_reasons"].as_u64().unwrap();
        for (bit, r) in [
            (0x1, "gpu_idle"),
            (0x2, "applications_clocks_setting"),
            (0x4, "sw_power_cap"),
            (0x8, "hw_slowdown"),
            (0x10, "sync_boost"),
            (0x20, "sw_thermal_slowdown"),
            (0x40, "hw_thermal_slowdown"),
            (0x80, "hw_power_brake_slowdown"),
            (0x100, "display_clock_setting"),
        ] {
            put(
                &format!("gpu_throttle{{reason={r}}}"),
                Some(if reasons & bit != 0 { 1.0 } else { 0.0 }),
            );
        }
        let procs = d["processes"].as_array().unwrap();
        put("gpu_process_count", Some(procs.len() as f64));
        for p in procs {
            put(
                &format!("gpu_process_used_vram{{pid={}}}", p["pid"]),
                f(&p["used_memory"]).map(|b| b / MIB),
            );
        }
        let xids = d["xid"].as_array().cloned().unwrap_or_default();
        put("gpu_xid_errors_total", Some(xids.len() as f64));
        put("gpu_last_xid", xids.last().and_then(Value::as_f64));
        out.push((labels, m));
    }
    out
}

#[test]
fn fake_nvml_serves_its_values_and_the_agent_reports_them_gpu_by_gpu() {
    let lib = fake("fake_nvml");
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(DATA).join("nvml/h100x2.json")).unwrap(),
    )
    .unwrap();
    let expected = expected_from_nvml(&json);
    let run = nvml_once(&lib, &[]);
    assert_eq!(run.report("gpu")["status"], "ok", "{:?}", run.sources);
    assert_eq!(run.value("gpu_count"), Some(2.0));
    for (i, (labels, metrics)) in expected.iter().enumerate() {
        assert_eq!(&run.labels_of(i as u32), labels, "labels of GPU {i}");
        assert_gpu_equals(&run, i as u32, metrics, "fake NVML");
    }
    // Spelled out once, so the derivation above cannot hide a mistake.
    assert_eq!(run.gpu(1)["gpu_xid_errors_total"], 2.0);
    assert_eq!(run.gpu(1)["gpu_last_xid"], 48.0);
    assert_eq!(run.gpu(0)["gpu_throttle{reason=sw_power_cap}"], 1.0);
    assert_eq!(run.gpu(0)["gpu_power_usage"], 512.345);
    assert!(
        run.stderr.contains("using NVML, driver 550.54.15"),
        "{}",
        run.stderr
    );
}

#[test]
fn nvml_without_some_symbols_falls_back_or_drops_only_those_metrics() {
    let lib = fake("fake_nvml");
    let dir = tempfile::tempdir().unwrap();
    let full = nvml_once(&lib, &[]);
    // Newer names with an older fallback: nothing is lost.
    let older = without_symbols(
        &lib,
        &[
            "nvmlDeviceGetCurrentClocksEventReasons",
            "nvmlDeviceGetComputeRunningProcesses_v3",
        ],
        dir.path(),
    );
    let run = nvml_once(&older, &[]);
    for i in 0..2 {
        assert_gpu_equals(&run, i, &full.gpu(i), "older NVML");
    }
    // A driver before the v2 memory call: the reservation counts as used,
    // free stays free.
    let dir3 = tempfile::tempdir().unwrap();
    let v1 = without_symbols(&lib, &["nvmlDeviceGetMemoryInfo_v2"], dir3.path());
    let run = nvml_once(&v1, &[]);
    for i in 0..2 {
        let mut want = full.gpu(i);
        let reserved = want.remove("gpu_reserved_vram").unwrap();
        *want.get_mut("gpu_used_vram").unwrap() += reserved;
        assert_gpu_equals(&run, i, &want, "NVML without the v2 memory call");
        assert!(!run.gpu(i).contains_key("gpu_reserved_vram"));
    }
    assert_eq!(full.gpu(0)["gpu_reserved_vram"], 615.0);
    assert_eq!(full.gpu(0)["gpu_slowdown_temperature"], 87.0);
    assert!(!full.gpu(1).contains_key("gpu_slowdown_temperature"));
    // No fallback: only those metrics go.
    let dir2 = tempfile::tempdir().unwrap();
    let partial = without_symbols(
        &lib,
        &["nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage"],
        dir2.path(),
    );
    let run = nvml_once(&partial, &[]);
    assert_eq!(run.report("gpu")["status"], "ok");
    for i in 0..2 {
        let want: BTreeMap<String, f64> = full
            .gpu(i)
            .into_iter()
            .filter(|(k, _)| k != "gpu_edge_temperature" && k != "gpu_power_usage")
            .collect();
        assert!(full.gpu(i).contains_key("gpu_power_usage"));
        assert_gpu_equals(&run, i, &want, "partial NVML");
    }
}

#[test]
fn nvml_whose_init_fails_is_reported_once_and_other_sources_go_on() {
    let lib = fake("fake_nvml");
    let proc = Path::new(FIXTURES).join("procfs/proc");
    let json = Path::new(DATA).join("nvml/h100x2.json");
    for (status, text) in [
        ("9", "NVML_ERROR_DRIVER_NOT_LOADED"),
        ("18", "NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
    ] {
        let run = once(
            &[
                "--source",
                "gpu",
                "--source",
                "nfs",
                "--procfs",
                proc.to_str().unwrap(),
                "--gpu-backend",
                "nvml",
                "--gpu-library",
                lib.to_str().unwrap(),
            ],
            &[
                ("VITALS_FAKE_NVML_JSON", json.to_str().unwrap()),
                ("VITALS_FAKE_NVML_INIT_STATUS", status),
            ],
        );
        let gpu = run.report("gpu");
        assert_eq!(gpu["status"], "unavailable", "{gpu:?}");
        assert!(gpu["error"].as_str().unwrap().contains(text), "{gpu:?}");
        assert_eq!(run.report("nfs")["status"], "ok");
        assert!(run.samples.iter().any(|(n, _, _)| n.starts_with("node_")));
        let lines = run.stderr.lines().filter(|l| l.contains("gpu:")).count();
        assert_eq!(lines, 1, "one message: {}", run.stderr);
    }
}

#[test]
fn nvml_is_initialised_once_and_shut_down_on_exit() {
    let lib = fake("fake_nvml");
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let run = nvml_once(&lib, &[("VITALS_FAKE_NVML_CALLS", calls.to_str().unwrap())]);
    assert_eq!(run.report("gpu")["status"], "ok");
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "nvmlInit_v2\nnvmlShutdown\n"
    );
}

#[test]
fn amdgpu_sysfs_fallback_reads_card0_and_skips_the_i915_card() {
    let sys = Path::new(FIXTURES).join("procfs/sys");
    let dev = sys.join("class/drm/card0/device");
    let read = |f: &str| -> f64 {
        std::fs::read_to_string(dev.join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let run = once(
        &[
            "--source",
            "gpu",
            "--gpu-backend",
            "sysfs",
            "--sysfs",
            sys.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(run.report("gpu")["status"], "ok", "{:?}", run.sources);
    assert_eq!(run.value("gpu_count"), Some(1.0), "card1 (i915) is skipped");
    let labels = run.labels_of(0);
    assert_eq!(labels["card"], "card0");
    assert_eq!(labels["pci_bus"], "0000:09:00.0");
    assert_eq!(labels["serial"], "0123456789abcdef");
    let g = run.gpu(0);
    assert_eq!(g["gpu_gfx_activity"], read("gpu_busy_percent"));
    assert_eq!(g["gpu_used_vram"], read("mem_info_vram_used") / MIB);
    assert_eq!(g["gpu_total_vram"], read("mem_info_vram_total") / MIB);
    assert_eq!(g["gpu_used_gtt"], read("mem_info_gtt_used") / MIB);
    assert_eq!(
        g["gpu_total_visible_vram"],
        read("mem_info_vis_vram_total") / MIB
    );
    assert_eq!(g["gpu_pcie_width"], read("current_link_width"));
    assert_eq!(g["gpu_pcie_speed"], 8.0);
    assert_eq!(g["gpu_pcie_replay_count"], read("pcie_replay_count"));
    // pp_dpm_sclk marks "0: 852Mhz *", pp_dpm_mclk "0: 167Mhz *".
    assert_eq!(g["gpu_clock{clock_type=GPU_CLOCK_TYPE_SYSTEM}"], 852.0);
    assert_eq!(g["gpu_clock{clock_type=GPU_CLOCK_TYPE_MEMORY}"], 167.0);
    assert!(
        !g.contains_key("gpu_umc_activity"),
        "no mem_busy_percent in this tree"
    );
    assert!(
        !run.samples
            .iter()
            .any(|(_, l, _)| l.get("card").map(String::as_str) == Some("card1")),
        "nothing from the i915 card"
    );
}

/// `auto` loads a vendor library only where its device file is. The
/// library search finds the fakes (copied under the vendors' sonames into a
/// directory on `LD_LIBRARY_PATH`); under a device root without `kfd` /
/// `nvidiactl` / `nvidia0` neither is initialised (their call logs stay
/// empty) and nothing is said above debug; under one with the device the
/// same search loads and reads it.
#[test]
fn auto_loads_a_vendor_library_only_where_its_device_is() {
    let dir = tempfile::tempdir().unwrap();
    let libs = dir.path().join("lib");
    std::fs::create_dir(&libs).unwrap();
    std::fs::copy(fake("fake_rocm_smi"), libs.join("librocm_smi64.so.7")).unwrap();
    std::fs::copy(fake("fake_nvml"), libs.join("libnvidia-ml.so.1")).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let devfs = |files: &[&str]| {
        let d = dir.path().join(format!("dev-{}", files.join("-")));
        std::fs::create_dir(&d).unwrap();
        for f in files {
            std::fs::write(d.join(f), "").unwrap();
        }
        d
    };
    let capture = Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json");
    let nvml_json = Path::new(DATA).join("nvml/h100x2.json");
    let rocm_calls = dir.path().join("rocm-calls");
    let nvml_calls = dir.path().join("nvml-calls");
    let run = |dev: &Path| {
        let _ = std::fs::remove_file(&rocm_calls);
        let _ = std::fs::remove_file(&nvml_calls);
        once(
            &[
                "--source",
                "gpu",
                "--gpu-backend",
                "auto",
                "--devfs",
                dev.to_str().unwrap(),
                // No amdgpu cards for the sysfs fallback either.
                "--sysfs",
                empty.to_str().unwrap(),
            ],
            &[
                ("LD_LIBRARY_PATH", libs.to_str().unwrap()),
                ("VITALS_FAKE_ROCM_SMI_JSON", capture.to_str().unwrap()),
                ("VITALS_FAKE_ROCM_SMI_CALLS", rocm_calls.to_str().unwrap()),
                ("VITALS_FAKE_NVML_JSON", nvml_json.to_str().unwrap()),
                ("VITALS_FAKE_NVML_CALLS", nvml_calls.to_str().unwrap()),
            ],
        )
    };
    let calls = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let none = run(&devfs(&[]));
    let gpu = none.report("gpu");
    assert_eq!(gpu["status"], "unavailable", "{gpu:?}");
    let why = gpu["error"].as_str().unwrap();
    assert!(
        why.contains("no rocm device") && why.contains("kfd") && why.contains("nvidiactl"),
        "{why}"
    );
    assert_eq!(calls(&rocm_calls), "", "ROCm SMI was not initialised");
    assert_eq!(calls(&nvml_calls), "", "NVML was not initialised");
    assert!(
        !none.stderr.contains("gpu:"),
        "no GPU device is said at debug only: {}",
        none.stderr
    );

    let amd = run(&devfs(&["kfd"]));
    assert_eq!(amd.report("gpu")["status"], "ok", "{:?}", amd.sources);
    assert_eq!(calls(&rocm_calls), "rsmi_init\nrsmi_shut_down\n");
    assert_eq!(calls(&nvml_calls), "");
    assert!(amd.value("gpu_count").unwrap() >= 1.0);

    for dev in ["nvidiactl", "nvidia0"] {
        let nv = run(&devfs(&[dev]));
        assert_eq!(nv.report("gpu")["status"], "ok", "{dev}: {:?}", nv.sources);
        assert_eq!(calls(&rocm_calls), "", "{dev}: no kfd, no ROCm SMI");
        assert_eq!(calls(&nvml_calls), "nvmlInit_v2\nnvmlShutdown\n", "{dev}");
        assert_eq!(nv.value("gpu_count"), Some(2.0), "{dev}");
    }
}

/// Debian's `librocm-smi64-1` on a machine without an AMD GPU: the library
/// loads, `rsmi_init` fails, the source says so once and stays quiet.
#[test]
fn debian_rocm_smi_without_a_gpu_takes_the_clean_no_gpu_path() {
    let real = Path::new("/usr/lib/librocm_smi64.so.1");
    if !real.exists() {
        assert!(
            std::env::var("VITALS_TEST_ROCM_SMI").as_deref() != Ok("1"),
            "VITALS_TEST_ROCM_SMI=1 but {} is missing: apt-get install librocm-smi64-1",
            real.display()
        );
        eprintln!(
            "SKIPPED: {} is not installed (apt-get install librocm-smi64-1; .ci/run does)",
            real.display()
        );
        return;
    }
    let proc = Path::new(FIXTURES).join("procfs/proc");
    // Found by the search, as on a real host.
    let run = once(
        &[
            "--source",
            "gpu",
            "--source",
            "nfs",
            "--procfs",
            proc.to_str().unwrap(),
            "--gpu-backend",
            "rocm",
        ],
        &[],
    );
    let gpu = run.report("gpu");
    assert_eq!(gpu["status"], "unavailable", "{gpu:?}");
    assert!(
        gpu["error"].as_str().unwrap().contains("librocm_smi64.so")
            && gpu["error"].as_str().unwrap().contains("rsmi_init"),
        "{gpu:?}"
    );
    assert_eq!(run.report("nfs")["status"], "ok");
    let ours = run.stderr.lines().filter(|l| l.contains("gpu:")).count();
    assert_eq!(ours, 1, "one message: {}", run.stderr);
    assert!(
        !run.stderr.contains(" WARN ") && !run.stderr.contains(" ERROR "),
        "no warning or error for a host without a GPU: {}",
        run.stderr
    );
}

/// On a machine with a GPU: `cargo nextest run -p vitals-agent --run-ignored
/// only real_gpu` prints every metric the backend read (ignored elsewhere,
/// and reported as skipped, not passed).
#[test]
#[ignore = "needs a real AMD or NVIDIA GPU: cargo nextest run -p vitals-agent --run-ignored only real_gpu"]
fn real_gpu_prints_every_metric_when_one_is_present() {
    let backend = std::env::var("VITALS_TEST_GPU_BACKEND").unwrap_or_else(|_| "auto".into());
    let run = once(&["--source", "gpu", "--gpu-backend", &backend], &[]);
    eprintln!("{}", run.stderr);
    assert_eq!(run.report("gpu")["status"], "ok", "{:?}", run.sources);
    let mut n = 0;
    for (name, labels, value) in &run.samples {
        println!("{name} {labels:?} {value}");
        n += 1;
    }
    assert!(run.value("gpu_count").unwrap_or(0.0) >= 1.0);
    assert!(n > 5, "only {n} samples");
}
