//! The GPU source inside the running agent, over real mTLS to a real
//! collector: GPU series from the fake ROCm SMI arrive with their labels;
//! a library whose init fails (and Debian's real librocm_smi64 on this
//! GPU-less machine) is reported once while the agent keeps shipping its
//! other samples cycle after cycle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use vitals_e2e::*;
use vitals_proto::v1::MatchOp;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");

fn opts<'a>(env: &Env) -> AgentOpts<'a> {
    AgentOpts {
        cert: env.cert("gpu-node"),
        ca: None,
        node: None,
        interval: "200ms",
        spool_max_bytes: 64 << 20,
    }
}

fn setup() -> (Env, u16, Proc, Reader) {
    let env = Env::new();
    env.issue("gpu-node", "agent", &[]);
    let port = free_port();
    let collector = start_collector(&env, port);
    let reader = Reader::new(&env, port);
    (env, port, collector, reader)
}

fn fake_rocm() -> PathBuf {
    bin("libfake_rocm_smi.so")
}

fn capture() -> PathBuf {
    Path::new(FIXTURES).join("rocm-smi/mi100_rocm571.json")
}

/// Cycles stored for the node so far.
fn stored_cycles(reader: &Reader) -> usize {
    reader
        .samples("vitals_agent_cycles_total", "gpu-node")
        .len()
}

#[test]
fn gpu_series_from_the_fake_rocm_smi_reach_the_collector_with_their_labels() {
    let (env, port, _collector, reader) = setup();
    let lib = fake_rocm();
    let cfg = agent_config(
        &env,
        "gpu-node",
        port,
        &opts(&env),
        &format!("[sources.gpu]\nbackend = \"rocm\"\nlibrary = {lib:?}\n"),
    );
    let mut agent = restart_agent_env(
        &cfg,
        &[("VITALS_FAKE_ROCM_SMI_JSON", capture().to_str().unwrap())],
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            reader.series("gpu_used_vram", &[]).len() == 6
        }),
        "six GPUs' VRAM series; agent log:\n{}",
        agent.proc.log_text()
    );
    let used = reader.series("gpu_total_vram", &[("gpu", MatchOp::Equal, "3")]);
    assert_eq!(used.len(), 1);
    let l = labels(&used[0]);
    assert_eq!(l["node"], "gpu-node");
    assert_eq!(l["card"], "card3");
    assert_eq!(l["model"], "Arcturus GL-XL [Instinct MI100]");
    assert_eq!(l["pci_bus"], "0000:43:00.0");
    assert_eq!(used[0].points[0].value, 34342961152.0 / (1024.0 * 1024.0));
    agent.proc.term(Duration::from_secs(20));
}

/// Runs an agent whose GPU backend cannot open until `cycles` cycles are
/// stored; returns its log.
fn run_without_gpu(extra: &str, vars: &[(&str, &str)], cycles: usize) -> String {
    let (env, port, _collector, reader) = setup();
    let cfg = agent_config(&env, "gpu-node", port, &opts(&env), extra);
    let mut agent = restart_agent_env(&cfg, vars);
    assert!(
        wait_until(Duration::from_secs(60), || stored_cycles(&reader) >= cycles),
        "the agent keeps shipping; log:\n{}",
        agent.proc.log_text()
    );
    // The host source is unaffected.
    assert!(!reader.samples("node_load1", "gpu-node").is_empty());
    assert!(
        reader
            .series("", &[("__name__", MatchOp::Regex, "gpu_.*")])
            .is_empty(),
        "no GPU series"
    );
    let st = agent.proc.term(Duration::from_secs(20));
    assert!(st.success());
    agent.proc.log_text()
}

#[test]
fn a_gpu_library_whose_init_fails_is_reported_once_while_the_agent_runs_on() {
    let lib = fake_rocm();
    let log = run_without_gpu(
        &format!("[sources.gpu]\nbackend = \"rocm\"\nlibrary = {lib:?}\n"),
        &[
            ("VITALS_FAKE_ROCM_SMI_JSON", capture().to_str().unwrap()),
            ("VITALS_FAKE_ROCM_SMI_INIT_STATUS", "4"),
        ],
        10,
    );
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("gpu:")).collect();
    assert_eq!(lines.len(), 1, "one message in ten cycles:\n{log}");
    assert!(lines[0].contains("RSMI_STATUS_PERMISSION"), "{}", lines[0]);
}

#[test]
fn debian_rocm_smi_on_a_host_without_a_gpu_is_one_message_not_a_storm() {
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
    // `auto` loads ROCm SMI only where the AMD KFD device is: give it one.
    let dev = tempfile::tempdir().unwrap();
    std::fs::write(dev.path().join("kfd"), "").unwrap();
    let log = run_without_gpu(
        &format!(
            "[paths]\ndevfs = {:?}\n[sources.gpu]\nbackend = \"auto\"\n",
            dev.path()
        ),
        &[],
        10,
    );
    let ours: Vec<&str> = log.lines().filter(|l| l.contains("gpu:")).collect();
    assert_eq!(ours.len(), 1, "one message in ten cycles:\n{log}");
    assert!(ours[0].contains("no GPU found"), "{}", ours[0]);
    assert!(ours[0].contains("RSMI_STATUS_INIT_ERROR"), "{}", ours[0]);
    // The library prints its own complaint on each rsmi_init: once here.
    let lib_lines = log.lines().filter(|l| l.contains("rsmi_init")).count();
    assert!(lib_lines <= 2, "rsmi_init tried more than once:\n{log}");
    assert!(!log.contains(" WARN ") && !log.contains(" ERROR "), "{log}");
}

#[test]
fn a_bad_gpu_config_is_refused_with_the_key_and_the_reason() {
    let (env, port, _collector, _reader) = setup();
    for (extra, key, reason) in [
        (
            "[sources.gpu]\nlibrary = \"/nonexistent/librocm_smi64.so\"\n",
            "sources.gpu.library",
            "/nonexistent/librocm_smi64.so: no such file",
        ),
        (
            "[sources.gpu]\nbackend = \"cuda\"\n",
            "sources.gpu.backend",
            "unknown variant `cuda`",
        ),
        (
            "[sources.gpu]\ntimeout = \"1ms\"\n",
            "sources.gpu.timeout",
            "at least 10ms",
        ),
    ] {
        let cfg = agent_config(&env, "gpu-node", port, &opts(&env), extra);
        let out = std::process::Command::new(bin("vitals-agent"))
            .args(["check-config", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {err}");
        assert!(err.contains(key) && err.contains(reason), "{extra}: {err}");
    }
}
