//! False alarms: a day of healthy samples from a training server and the
//! storage box — jobs starting and stopping, diurnal load, noise, hourly
//! snapshots — stored through the real store (anomaly detection on, as
//! shipped) and replayed through the built-in rule pack every two minutes
//! of data time. Nothing may fire. Then one real failure on the same data
//! (VRAM full) must.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vitals_collector::alert::engine::{Change, Engine};
use vitals_collector::alert::eval::{self, Data};
use vitals_collector::alert::rules::{self, Condition};
use vitals_collector::store::{self, StoreOptions};

mod common;
use common::{Samples, fired_between, labels};

const STEP_MS: i64 = 15_000;
const DAY_MS: i64 = 24 * 3600 * 1000;

/// xorshift: the same "random" day every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
    fn noise(&mut self, scale: f64) -> f64 {
        (self.next() - 0.5) * 2.0 * scale
    }
}

/// Is a training job running on GPU `g` at `t` (jobs of 2–5 h, gaps).
fn job_running(g: usize, t: i64) -> bool {
    let h = t as f64 / 3_600_000.0 + g as f64 * 1.3;
    (h % 6.0) < 4.5
}

fn diurnal(t: i64) -> f64 {
    (t as f64 / DAY_MS as f64 * std::f64::consts::TAU).sin()
}

fn gpu_node(day: &mut Samples, rng: &mut Rng, t: i64, cycle: f64, counters: &mut [f64]) {
    let node = "gpu-01";
    day.put(
        "vitals_agent_cycles_total",
        &labels(&[("node", node)]),
        t,
        cycle,
    );
    // The kernel log of a healthy day: links came up once at boot, the NFS
    // server answered; nothing else.
    for (class, n) in [
        ("link_up", 2.0),
        ("nfs_ok", 1.0),
        ("nfs_not_responding", 0.0),
        ("gpu_reset", 0.0),
        ("gpu_ring_timeout", 0.0),
        ("oom_kill", 0.0),
        ("mce", 0.0),
    ] {
        let l = labels(&[("node", node), ("class", class)]);
        day.put("vitals_kernel_events_total", &l, t, n);
    }
    if cycle == 1.0 {
        // Alice's earlier `train` runs: 4.5 hours each.
        let fl = labels(&[
            ("node", node),
            ("job_id", "999"),
            ("user", "alice"),
            ("name", "train"),
        ]);
        day.put(
            "vitals_slurm_job_finished_runtime_seconds",
            &fl,
            t,
            16_200.0,
        );
    }
    for g in 0..4 {
        let gs = g.to_string();
        let mut l = labels(&[("node", node), ("gpu", &gs), ("card", &format!("card{g}"))]);
        let run = job_running(g, t);
        if run {
            // While a job's process uses the GPU its series carry the job.
            let h = t as f64 / 3_600_000.0 + g as f64 * 1.3;
            l.insert(
                "job_id".into(),
                format!("{}", 1000 + 100 * g + (h / 6.0) as usize),
            );
            l.insert("user".into(), "alice".into());
        }
        let used = if run {
            32752.0 * (0.78 + rng.noise(0.08))
        } else {
            6.5
        };
        day.put("gpu_used_vram", &l, t, used);
        day.put("gpu_total_vram", &l, t, 32752.0);
        day.put(
            "gpu_gfx_activity",
            &l,
            t,
            if run {
                (92.0 + rng.noise(8.0)).min(100.0)
            } else {
                0.0
            },
        );
        day.put(
            "gpu_junction_temperature",
            &l,
            t,
            if run {
                78.0 + rng.noise(6.0)
            } else {
                36.0 + rng.noise(2.0)
            },
        );
        day.put("gpu_ecc_uncorrect_total", &l, t, 0.0);
        if run {
            // The job's SLURM state and its log's progress, as the
            // agent's slurm source reports them.
            let h = t as f64 / 3_600_000.0 + g as f64 * 1.3;
            let job = format!("{}", 1000 + 100 * g + (h / 6.0) as usize);
            let jl = labels(&[("node", node), ("job_id", &job), ("state", "RUNNING")]);
            day.put("vitals_slurm_job_state", &jl, t, 1.0);
            let jl = labels(&[
                ("node", node),
                ("job_id", &job),
                ("user", "alice"),
                ("name", "train"),
            ]);
            let step = ((h % 6.0) * 3600.0 * 2.0).floor();
            day.put("vitals_job_step", &jl, t, step);
            day.put("vitals_job_loss", &jl, t, 2.0 / (1.0 + step / 1000.0));
            day.put("vitals_job_loss_nonfinite", &jl, t, 0.0);
            day.put(
                "vitals_job_throughput",
                &jl,
                t,
                1500.0 * (1.0 + 0.05 * diurnal(t)) + rng.noise(120.0),
            );
            let il = labels(&[
                ("node", node),
                ("job_id", &job),
                ("user", "alice"),
                ("name", "train"),
                ("state", "RUNNING"),
            ]);
            day.put("vitals_slurm_job_info", &il, t, 1.0);
            let sl = labels(&[("node", node), ("job_id", &job)]);
            day.put(
                "vitals_slurm_job_runtime_seconds",
                &sl,
                t,
                ((h % 6.0) * 3600.0).floor(),
            );
            day.put("vitals_slurm_job_time_limit_seconds", &sl, t, 6.0 * 3600.0);
            for class in ["gpu_oom", "data_io"] {
                let el = labels(&[
                    ("node", node),
                    ("job_id", &job),
                    ("user", "alice"),
                    ("class", class),
                ]);
                day.put("vitals_job_log_errors_total", &el, t, 0.0);
            }
        }
    }
    // 100GbE to the storage box, at its expected speed.
    let nic = labels(&[("node", node), ("device", "ens1f0")]);
    day.put("node_network_speed_bytes", &nic, t, 12.5e9);
    day.put("node_network_expected_speed_bytes", &nic, t, 12.5e9);
    day.put("node_network_carrier", &nic, t, 1.0);
    day.put("node_network_carrier_changes_total", &nic, t, 2.0);
    counters[0] += rng.next() * 0.2; // a rare receive error
    day.put(
        "node_network_receive_errs_total",
        &nic,
        t,
        counters[0].floor(),
    );
    counters[1] += rng.next() * 10.0;
    day.put(
        "node_network_receive_drop_total",
        &nic,
        t,
        counters[1].floor(),
    );
    let ib = labels(&[("node", node), ("device", "mlx5_0"), ("port", "1")]);
    day.put("node_infiniband_state_id", &ib, t, 4.0);
    // The NFS mount with the training data: busy while jobs run.
    let load = 0.5 + 0.5 * (0..4).filter(|&g| job_running(g, t)).count() as f64 / 4.0;
    let ops = (2000.0 * load * (1.0 + 0.2 * diurnal(t)) + rng.noise(200.0)).max(0.0);
    counters[2] += ops * 15.0;
    let outstanding = (rng.next() * 3.0).floor();
    let m = labels(&[
        ("node", node),
        ("export", "nas-01:/tank/datasets"),
        ("mountpoint", "/data"),
        ("protocol", "tcp"),
        ("transport", "0"),
    ]);
    day.put(
        "node_mountstats_nfs_transport_sends_total",
        &m,
        t,
        counters[2] + outstanding,
    );
    day.put(
        "node_mountstats_nfs_transport_receives_total",
        &m,
        t,
        counters[2],
    );
    for op in ["READ", "GETATTR"] {
        let mut ol = m.clone();
        ol.remove("transport");
        ol.insert("operation".into(), op.into());
        let base = if op == "READ" { 0.0025 } else { 0.0004 };
        day.put(
            "node_mountstats_nfs_operations_response_time_average_seconds",
            &ol,
            t,
            (base * (1.0 + 0.3 * load + rng.noise(0.25))).max(0.0),
        );
        day.put(
            "node_mountstats_nfs_operations_major_timeouts_total",
            &ol,
            t,
            0.0,
        );
    }
}

/// An NVIDIA training server: an edge sensor and a slowdown threshold
/// instead of a junction sensor, Xid errors counted.
fn nvidia_node(day: &mut Samples, rng: &mut Rng, t: i64, cycle: f64) {
    let node = "gpu-02";
    day.put(
        "vitals_agent_cycles_total",
        &labels(&[("node", node)]),
        t,
        cycle,
    );
    for g in 0..2 {
        let gs = g.to_string();
        let l = labels(&[
            ("node", node),
            ("gpu", &gs),
            ("card", &format!("nvidia{g}")),
        ]);
        let run = job_running(g + 2, t);
        day.put(
            "gpu_used_vram",
            &l,
            t,
            if run {
                81559.0 * (0.7 + rng.noise(0.1))
            } else {
                0.0
            },
        );
        day.put("gpu_total_vram", &l, t, 81559.0);
        day.put(
            "gpu_edge_temperature",
            &l,
            t,
            if run {
                (71.0 + rng.noise(5.0)).round()
            } else {
                (33.0 + rng.noise(2.0)).round()
            },
        );
        day.put("gpu_slowdown_temperature", &l, t, 87.0);
        day.put("gpu_ecc_uncorrect_total", &l, t, 0.0);
        day.put("gpu_xid_errors_total", &l, t, 0.0);
    }
    // This host probes the model in production: latency follows the
    // day's traffic, well within its SLO; every answer right.
    let ep = [
        ("node", node),
        ("endpoint", "sentiment"),
        ("model", "sentiment-v3"),
        ("deployment", "blue"),
    ];
    let p50 = 0.08 * (1.0 + 0.3 * diurnal(t)) + rng.noise(0.004);
    for (q, f) in [("0.5", 1.0), ("0.9", 1.6), ("0.99", 2.5)] {
        let mut l = ep.to_vec();
        l.push(("quantile", q));
        day.put("vitals_probe_latency_seconds", &labels(&l), t, p50 * f);
    }
    let l = labels(&ep);
    day.put("vitals_probe_slo_latency_seconds", &l, t, 0.5);
    day.put("vitals_probe_error_ratio", &l, t, 0.0);
    day.put("vitals_probe_slo_error_ratio", &l, t, 0.01);
    day.put("vitals_probe_correct_ratio", &l, t, 1.0);
    day.put("vitals_probe_slo_correct_ratio", &l, t, 0.95);
    let mut g = ep.to_vec();
    g.push(("input", "good-review"));
    day.put("vitals_probe_golden_correct", &labels(&g), t, 1.0);
    // The peer mesh to the NAS: answered, a lost probe now and then
    // (one of ten in a round, about once an hour), round trips with noise
    // and a little more at the day's peak.
    let peer = [("node", node), ("peer", "nas-01")];
    day.put("vitals_peer_up", &labels(&peer), t, 1.0);
    let rtt = 0.00025 * (1.0 + 0.2 * diurnal(t)) + rng.noise(0.00004);
    day.put("vitals_peer_rtt_seconds", &labels(&peer), t, rtt);
    day.put(
        "vitals_peer_tcp_connect_seconds",
        &labels(&peer),
        t,
        rtt * 1.3,
    );
    for method in ["icmp", "tcp"] {
        let mut l = peer.to_vec();
        l.push(("method", method));
        let lost = if rng.next() < 1.0 / 240.0 { 0.1 } else { 0.0 };
        day.put("vitals_peer_loss_ratio", &labels(&l), t, lost);
        day.put(
            "vitals_peer_jitter_seconds",
            &labels(&l),
            t,
            0.00003 + rng.noise(0.00001),
        );
    }
    // The hourly throughput test to the NAS: 80-90 % of the 100GbE link.
    let nt = labels(&[("node", node), ("peer", "nas-01:7444")]);
    day.put("vitals_net_test_success", &nt, t, 1.0);
    day.put("vitals_net_test_link_ratio", &nt, t, 0.85 + rng.noise(0.05));
}

fn nas_node(day: &mut Samples, rng: &mut Rng, t: i64, cycle: f64, t0: i64) {
    let node = "nas-01";
    day.put(
        "vitals_agent_cycles_total",
        &labels(&[("node", node)]),
        t,
        cycle,
    );
    // The training data's dataset, cacheable all day.
    day.put(
        "vitals_zfs_dataset_cacheable",
        &labels(&[
            ("node", node),
            ("zpool", "tank"),
            ("dataset", "tank/datasets"),
        ]),
        t,
        1.0,
    );
    for st in [
        "online",
        "degraded",
        "faulted",
        "offline",
        "removed",
        "unavail",
        "suspended",
    ] {
        let l = labels(&[("node", node), ("zpool", "tank"), ("state", st)]);
        day.put(
            "node_zfs_zpool_state",
            &l,
            t,
            if st == "online" { 1.0 } else { 0.0 },
        );
    }
    let n = labels(&[("node", node)]);
    day.put(
        "node_zfs_arc_hit_ratio",
        &n,
        t,
        (0.93 + 0.03 * diurnal(t) + rng.noise(0.02)).min(1.0),
    );
    day.put(
        "node_zfs_arc_l2_hit_ratio",
        &n,
        t,
        (0.35 + 0.1 * diurnal(t) + rng.noise(0.08)).clamp(0.0, 1.0),
    );
    // The training data read at 100 MiB/s all day (mostly from the ARC).
    day.put(
        "node_zfs_zpool_dataset_nread",
        &labels(&[
            ("node", node),
            ("zpool", "tank"),
            ("dataset", "tank/datasets"),
        ]),
        t,
        ((t - t0) / 1000) as f64 * 100.0 * 1024.0 * 1024.0,
    );
    let vdev = labels(&[("node", node), ("zpool", "tank"), ("vdev", "sda")]);
    day.put("node_zfs_zpool_vdev_checksum_errors_total", &vdev, t, 0.0);
    day.put("node_zfs_zpool_vdev_read_errors_total", &vdev, t, 0.0);
    let scan = labels(&[("node", node), ("zpool", "tank")]);
    day.put("node_zfs_zpool_scan_errors", &scan, t, 0.0);
    // Hourly snapshots.
    let ds = labels(&[("node", node), ("dataset", "tank/datasets")]);
    day.put(
        "node_zfs_dataset_newest_snapshot_age_seconds",
        &ds,
        t,
        ((t - t0) % 3_600_000) as f64 / 1000.0 + 5.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_day_fires_nothing_and_a_real_failure_fires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let opts = StoreOptions {
        detect: Some(vitals_common::selector::parse(r#"{__name__!~"vitals_.*"}"#).unwrap()),
        ..StoreOptions::default()
    };
    let (w, store, handle) = store::spawn_writer(store::open(&path).unwrap(), &path, opts).unwrap();
    let now = vitals_common::now_ms();
    let t0 = (now - DAY_MS - 3_600_000) / STEP_MS * STEP_MS;
    let end = t0 + DAY_MS;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut counters = [0.0f64; 3];
    for node in ["gpu-01", "gpu-02", "nas-01"] {
        w.hello(node, "i", "test").await.unwrap();
    }
    // One batch per node per hour of data.
    let mut seq = 0;
    let mut t = t0;
    let mut cycle = 0.0;
    while t < end {
        let hour_end = (t + 3_600_000).min(end);
        let (mut g, mut v, mut n) = (Samples::default(), Samples::default(), Samples::default());
        while t < hour_end {
            cycle += 1.0;
            gpu_node(&mut g, &mut rng, t, cycle, &mut counters);
            nvidia_node(&mut v, &mut rng, t, cycle);
            nas_node(&mut n, &mut rng, t, cycle, t0);
            t += STEP_MS;
        }
        seq += 1;
        for (node, day) in [("gpu-01", g), ("gpu-02", v), ("nas-01", n)] {
            let r = w.write(node, "i", day.batch(seq)).await.unwrap();
            r.await.unwrap().unwrap();
        }
    }

    let mut rules = rules::builtin().unwrap();
    let names: Vec<String> = rules.iter().map(|r| r.name.clone()).collect();
    let mut engine = Engine::new(rules.clone(), Duration::from_secs(60), Vec::new());
    let store2 = store.clone();
    let (fired, pending) = tokio::task::spawn_blocking(move || {
        let mut fired = Vec::new();
        let mut pending = 0;
        // Skip the first hour: rate() and the anomaly detector need history.
        let mut t = t0 + 3_600_000;
        while t <= end {
            for c in engine.step(&store2, t) {
                match c {
                    Change::Fired(a) => fired.push(format!(
                        "{} at +{}m: {:?}",
                        a.rule,
                        (t - t0) / 60_000,
                        a.annotations.get("summary")
                    )),
                    Change::Pending(_) => pending += 1,
                    _ => {}
                }
            }
            t += 120_000;
        }
        (fired, pending)
    })
    .await
    .unwrap();
    eprintln!("rules: {names:?}; pending blips: {pending}");
    assert!(
        fired.is_empty(),
        "false alarms on a healthy day:\n{}",
        fired.join("\n")
    );

    // Not silent for want of data: every rule read series of this day
    // (except NodeDown, which only yields silent nodes), anomaly scores
    // included.
    for r in &rules {
        let values = match &r.condition {
            Condition::Expr(e) | Condition::Gated { expr: e, .. } => {
                eval::term(&e.term, &store, end, i64::MIN).unwrap()
            }
            Condition::Stall { series, .. } => store
                .range(series, end - 60_000, end)
                .unwrap()
                .into_iter()
                .map(|s| eval::Value {
                    labels: s.labels,
                    value: 0.0,
                    evidence: Vec::new(),
                })
                .collect(),
        };
        let exempt = r.name == "NodeDown";
        assert_eq!(
            values.is_empty(),
            exempt,
            "{}: {} values",
            r.name,
            values.len()
        );
    }
    let scores = store
        .range(
            &vitals_common::selector::parse("vitals_anomaly_score").unwrap(),
            t0,
            end,
        )
        .unwrap();
    let peak = scores
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    eprintln!("{} anomaly score series, peak {peak:.3}", scores.len());
    assert!(scores.len() >= 10);

    // The same rules do see a real failure in the same store: GPU 2's VRAM
    // full for 3 minutes right after the day.
    let full = labels(&[("node", "gpu-01"), ("gpu", "2"), ("card", "card2")]);
    let mut d = Samples::default();
    let mut t = end;
    while t <= end + 180_000 {
        d.put("gpu_used_vram", &full, t, 32752.0 * 0.985);
        d.put("gpu_total_vram", &full, t, 32752.0);
        t += STEP_MS;
    }
    let r = w.write("gpu-01", "i", d.batch(seq + 1)).await.unwrap();
    r.await.unwrap().unwrap();
    // And an NVIDIA GPU 3 °C under its slowdown threshold for 6 minutes.
    let hot = labels(&[("node", "gpu-02"), ("gpu", "1"), ("card", "nvidia1")]);
    let mut d = Samples::default();
    let mut t = end;
    while t <= end + 360_000 {
        d.put("gpu_edge_temperature", &hot, t, 84.0);
        d.put("gpu_slowdown_temperature", &hot, t, 87.0);
        t += STEP_MS;
    }
    let r = w.write("gpu-02", "i", d.batch(seq + 2)).await.unwrap();
    r.await.unwrap().unwrap();
    rules.retain(|r| r.name == "GpuMemoryOverload" || r.name == "GpuNearSlowdown");
    let engine = Engine::new(rules, Duration::from_secs(60), Vec::new());
    let fired = fired_between(engine, &store, end, end + 360_000, STEP_MS).await;
    assert_eq!(fired.len(), 2, "{fired:?}");
    let (at, a) = &fired[1];
    assert_eq!(a.rule, "GpuNearSlowdown");
    assert_eq!(
        (a.labels["node"].as_str(), a.labels["gpu"].as_str()),
        ("gpu-02", "1")
    );
    assert!(
        *at - end >= 300_000 && *at - end <= 300_000 + STEP_MS,
        "fired {} ms in",
        at - end
    );
    assert!(
        a.annotations["summary"].contains("-3 °C"),
        "{:?}",
        a.annotations
    );
    let (at, a) = &fired[0];
    assert_eq!(a.rule, "GpuMemoryOverload");
    assert_eq!(a.labels["gpu"], "2");
    assert!(
        *at - end >= 120_000 && *at - end <= 120_000 + STEP_MS,
        "fired {} ms in",
        at - end
    );
    assert!(
        a.annotations["summary"].contains("98.5%"),
        "{:?}",
        a.annotations
    );
    assert_eq!(a.evidence.len(), 2);
    drop(w);
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
}
