//! The built-in training-job rules over synthetic samples stored through
//! the real store: a two-node job whose second node straggles, a job
//! whose GPUs went idle, a job whose throughput fell, a job near its time
//! limit whose step stopped — and, next to each, a healthy job that must
//! not fire. Also the kernel-event rules over the kmsg source's
//! counters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use vitals_collector::alert::engine::{Alert, Change, Engine};
use vitals_collector::alert::rules;
use vitals_collector::store::{self, StoreOptions};

mod common;
use common::{Samples, changes_between, fired_between, labels};

const STEP_MS: i64 = 15_000;

/// GPU utilisation of `gpus` GPUs of `node` used by a job.
fn gpus(b: &mut Samples, node: &str, job: &str, user: &str, n: usize, t: i64, util: f64) {
    for g in 0..n {
        let gs = g.to_string();
        let l = labels(&[
            ("node", node),
            ("gpu", &gs),
            ("card", &format!("card{g}")),
            ("job_id", job),
            ("user", user),
        ]);
        // A little spread between GPUs, as real ones have.
        b.put("gpu_gfx_activity", &l, t, util - g as f64);
    }
}

/// A job whose GPUs sit idle fires `JobGpusIdle` after 10 minutes; when
/// the job ends (its GPUs' series stop carrying it, the GPUs report on
/// without the job's labels) the alert resolves within three minutes, not
/// when the idle samples leave the 10-minute window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_gpus_idle_resolves_soon_after_the_job_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let (w, store, handle) =
        store::spawn_writer(store::open(&path).unwrap(), &path, StoreOptions::default()).unwrap();
    w.hello("gpu-03", "i", "test").await.unwrap();
    let t0 = (vitals_common::now_ms() - 3_600_000) / STEP_MS * STEP_MS;
    // Busy for 5 minutes, idle from then on, ended after 30.
    let idle = t0 + 5 * 60_000;
    let job_end = t0 + 30 * 60_000;
    let end = t0 + 45 * 60_000;
    let mut b = Samples::default();
    let mut t = t0;
    while t <= end {
        if t < job_end {
            let util = if t < idle { 88.0 } else { 1.5 };
            gpus(&mut b, "gpu-03", "4300", "carol", 2, t, util);
        } else {
            let l = labels(&[("node", "gpu-03"), ("gpu", "0"), ("card", "card0")]);
            b.put("gpu_gfx_activity", &l, t, 0.0);
        }
        t += STEP_MS;
    }
    let r = w.write("gpu-03", "i", b.batch(1)).await.unwrap();
    r.await.unwrap().unwrap();

    let mut rules = rules::builtin().unwrap();
    rules.retain(|r| r.name == "JobGpusIdle");
    assert_eq!(rules.len(), 1);
    let engine = Engine::new(rules, Duration::from_secs(60), Vec::new());
    let changes: Vec<(i64, &str, Alert)> = changes_between(engine, &store, t0, end, STEP_MS)
        .await
        .into_iter()
        .filter_map(|(t, c)| match c {
            Change::Fired(a) => Some((t, "fired", a)),
            Change::Resolved(a) => Some((t, "resolved", a)),
            _ => None,
        })
        .collect();
    let show: Vec<String> = changes
        .iter()
        .map(|(t, what, a)| format!("+{}s {what} {:?}", (t - t0) / 1000, a.labels))
        .collect();
    assert_eq!(changes.len(), 2, "{show:?}");
    let (fired, _, a) = &changes[0];
    assert_eq!(changes[0].1, "fired", "{show:?}");
    assert_eq!(a.labels["job_id"], "4300");
    assert!(
        (10 * 60_000..=11 * 60_000).contains(&(fired - idle)),
        "{show:?}"
    );
    let (resolved, what, _) = &changes[1];
    assert_eq!(*what, "resolved", "{show:?}");
    assert!(
        *resolved > job_end && *resolved - job_end <= 3 * 60_000,
        "resolved {} s after the job ended: {show:?}",
        (*resolved - job_end) / 1000
    );
    drop(w);
    handle.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_rules_name_the_straggler_the_idle_job_the_slow_pipeline_and_the_doomed_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let (w, store, handle) =
        store::spawn_writer(store::open(&path).unwrap(), &path, StoreOptions::default()).unwrap();
    let nodes = ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "slurm-ctl"];
    for n in nodes {
        w.hello(n, "i", "test").await.unwrap();
    }
    let now = vitals_common::now_ms();
    // Two hours of history, then 20 minutes in which things go wrong.
    let t0 = (now - 3 * 3_600_000) / STEP_MS * STEP_MS;
    let trouble = t0 + 2 * 3_600_000;
    let end = trouble + 25 * 60_000;
    let mut per_node: Vec<Samples> = nodes.iter().map(|_| Samples::default()).collect();
    let mut t = t0;
    let mut step = 0.0;
    while t <= end {
        let bad = t >= trouble;
        step += 1.0;
        // Job 4242 (bob) on gpu-01 and gpu-02: gpu-02 falls to 30% while
        // gpu-01 stays at 95%.
        gpus(&mut per_node[0], "gpu-01", "4242", "bob", 4, t, 95.0);
        gpus(
            &mut per_node[1],
            "gpu-02",
            "4242",
            "bob",
            4,
            t,
            if bad { 30.0 } else { 94.0 },
        );
        // Job 4300 (carol) on gpu-03, two GPUs: both go idle. One GPU of
        // job 4301 (dave) on the same node idles on purpose next to a busy
        // one: one node, so no straggler, and not all its GPUs are idle.
        gpus(
            &mut per_node[2],
            "gpu-03",
            "4300",
            "carol",
            2,
            t,
            if bad { 1.5 } else { 88.0 },
        );
        for (g, util) in [("2", 90.0), ("3", 0.0)] {
            let l = labels(&[
                ("node", "gpu-03"),
                ("gpu", g),
                ("card", "card9"),
                ("job_id", "4301"),
                ("user", "dave"),
            ]);
            per_node[2].put("gpu_gfx_activity", &l, t, util);
        }
        // Job 4400 (erin) on gpu-04: throughput falls to a third, and its
        // step counter stops near the end of its time limit.
        let j = labels(&[
            ("node", "gpu-04"),
            ("job_id", "4400"),
            ("user", "erin"),
            ("name", "llama-ft"),
        ]);
        let tput = if bad { 400.0 } else { 1200.0 } + (step % 7.0);
        per_node[3].put("vitals_job_throughput", &j, t, tput);
        let frozen = t >= trouble + 5 * 60_000;
        per_node[3].put(
            "vitals_job_step",
            &j,
            t,
            if frozen {
                ((trouble + 5 * 60_000 - t0) / STEP_MS) as f64
            } else {
                step
            },
        );
        gpus(&mut per_node[3], "gpu-04", "4400", "erin", 1, t, 80.0);
        // Job 4500 (frank), healthy, also on gpu-04: steady throughput,
        // advancing step, far from its limit.
        let k = labels(&[
            ("node", "gpu-04"),
            ("job_id", "4500"),
            ("user", "frank"),
            ("name", "vit"),
        ]);
        per_node[3].put("vitals_job_throughput", &k, t, 900.0 + (step % 5.0));
        per_node[3].put("vitals_job_step", &k, t, step * 3.0);
        // 4400's loss falls, then climbs from +0 (4x in 20 minutes): its
        // last 10 minutes pass 1.5x its last 2 hours at +9m45s; 4500's
        // keeps falling, with noise.
        let base = 1.0 + 1.0 / (1.0 + step / 50.0);
        let climb = if bad {
            1.0 + 3.0 * ((t - trouble) as f64 / (20.0 * 60_000.0))
        } else {
            1.0
        };
        per_node[3].put("vitals_job_loss", &j, t, base * climb);
        per_node[3].put(
            "vitals_job_loss",
            &k,
            t,
            base * (1.0 + 0.05 * ((step * 0.7).sin())),
        );
        // Job 4600 (gina) on gpu-04: a binary loss stuck at ln 2.
        let g = labels(&[
            ("node", "gpu-04"),
            ("job_id", "4600"),
            ("user", "gina"),
            ("name", "bert"),
        ]);
        per_node[3].put("vitals_job_loss", &g, t, std::f64::consts::LN_2);
        // The controller's view: runtime and limit of 4400 and 4500.
        let c = |id| labels(&[("node", "slurm-ctl"), ("job_id", id)]);
        let run_s = ((t - t0) / 1000) as f64;
        for (id, user, name) in [("4400", "erin", "llama-ft"), ("4500", "frank", "vit")] {
            let mut l = c(id);
            for (k, v) in [("user", user), ("name", name), ("state", "RUNNING")] {
                l.insert(k.into(), v.into());
            }
            per_node[4].put("vitals_slurm_job_info", &l, t, 1.0);
        }
        if t == t0 {
            // Erin's earlier llama-ft runs finished in 50 minutes at most;
            // Frank's vit runs took 4 hours.
            for (id, user, name, secs) in [
                ("4100", "erin", "llama-ft", 2400.0),
                ("4101", "erin", "llama-ft", 3000.0),
                ("4200", "frank", "vit", 14400.0),
            ] {
                let l = labels(&[
                    ("node", "slurm-ctl"),
                    ("job_id", id),
                    ("user", user),
                    ("name", name),
                ]);
                per_node[4].put(
                    "vitals_slurm_job_finished_runtime_seconds",
                    &l,
                    t - 3_600_000,
                    secs,
                );
            }
        }
        per_node[4].put("vitals_slurm_job_runtime_seconds", &c("4400"), t, run_s);
        per_node[4].put(
            "vitals_slurm_job_time_limit_seconds",
            &c("4400"),
            t,
            2.4 * 3600.0,
        );
        per_node[4].put("vitals_slurm_job_runtime_seconds", &c("4500"), t, run_s);
        per_node[4].put(
            "vitals_slurm_job_time_limit_seconds",
            &c("4500"),
            t,
            48.0 * 3600.0,
        );
        t += STEP_MS;
    }
    for (seq, (node, b)) in nodes.iter().zip(per_node).enumerate() {
        let r = w.write(node, "i", b.batch(seq as u64 + 1)).await.unwrap();
        r.await.unwrap().unwrap();
    }

    let wanted = [
        "JobStraggler",
        "JobGpusIdle",
        "JobThroughputDrop",
        "JobLossRising",
        "JobLossFlat",
        "JobRunningLong",
        "JobNoProgressNearTimeLimit",
    ];
    let mut rules = rules::builtin().unwrap();
    rules.retain(|r| wanted.contains(&r.name.as_str()));
    assert_eq!(rules.len(), wanted.len(), "job rules missing from the pack");
    let engine = Engine::new(rules, Duration::from_secs(60), Vec::new());
    // From an hour in (the throughput rule compares with the last hour).
    let fired = fired_between(engine, &store, t0 + 3_600_000, end, STEP_MS).await;
    let show = |f: &[(i64, Alert)]| {
        f.iter()
            .map(|(t, a)| format!("+{}s {} {:?}", (t - trouble) / 1000, a.rule, a.labels))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let by_rule = |name: &str| -> Vec<&(i64, Alert)> {
        fired.iter().filter(|(_, a)| a.rule == name).collect()
    };
    for name in wanted {
        assert_eq!(by_rule(name).len(), 1, "{name}:\n{}", show(&fired));
    }
    assert_eq!(fired.len(), wanted.len(), "{}", show(&fired));

    // The straggler: gpu-02 of job 4242, owner and team on the alert,
    // after its 10 minutes.
    let (at, a) = by_rule("JobStraggler")[0];
    assert_eq!(a.labels["node"], "gpu-02");
    assert_eq!(a.labels["job_id"], "4242");
    assert_eq!(a.labels["user"], "bob");
    assert_eq!(a.labels["team"], "ml");
    assert!(
        (10 * 60_000..=11 * 60_000).contains(&(at - trouble)),
        "fired {} s in",
        (at - trouble) / 1000
    );
    let summary = &a.annotations["summary"];
    assert!(summary.contains("gpu-02 is a straggler"), "{summary}");
    // Its GPUs averaged 28.5 against gpu-01's 93.5.
    assert!((a.value + 65.0).abs() < 1e-9, "{}", a.value);
    assert!(
        a.evidence.iter().any(|e| e.series.contains("gpu-02"))
            && a.evidence.iter().any(|e| e.series.contains("gpu-01")),
        "{:?}",
        a.evidence
    );

    // Idle: job 4300 only (4301 keeps one busy GPU).
    let (at, a) = by_rule("JobGpusIdle")[0];
    assert_eq!(
        (a.labels["job_id"].as_str(), a.labels["user"].as_str()),
        ("4300", "carol")
    );
    assert!(
        (10 * 60_000..=11 * 60_000).contains(&(at - trouble)),
        "fired {} s in",
        (at - trouble) / 1000
    );

    // Throughput: 4400 on gpu-04, at about a third of its hour (after 5m
    // of the 5m average under half, and the `for` of 5m).
    let (_, a) = by_rule("JobThroughputDrop")[0];
    assert_eq!(a.labels["job_id"], "4400");
    assert_eq!(a.labels["node"], "gpu-04");
    assert!(a.value < 0.5 && a.value > 0.3, "{}", a.value);

    // Flat: 4600 only (4400's and 4500's losses move); true from the first
    // evaluation (an hour in), so it fires after its 30 minutes.
    let (at, a) = by_rule("JobLossFlat")[0];
    assert_eq!(
        (a.labels["job_id"].as_str(), a.labels["user"].as_str()),
        ("4600", "gina")
    );
    assert_eq!(at - t0, 3_600_000 + 30 * 60_000);

    // Running long: 4400 passed twice erin's longest llama-ft run (6000 s)
    // at 1 h 40 m, so it fires 10 minutes later; frank's vit is far from
    // his 4 hours.
    let (at, a) = by_rule("JobRunningLong")[0];
    assert_eq!(
        (
            a.labels["job_id"].as_str(),
            a.labels["user"].as_str(),
            a.labels["name"].as_str()
        ),
        ("4400", "erin", "llama-ft")
    );
    let since_start = at - t0;
    assert!(
        (6_600_000..=6_615_000).contains(&since_start),
        "fired {} s after the job started",
        since_start / 1000
    );

    // Loss rising: 4400 only, once its last 10 minutes average 1.5x its
    // last 2 hours, for 10 minutes.
    let (at, a) = by_rule("JobLossRising")[0];
    assert_eq!(a.labels["job_id"], "4400");
    assert!(a.value > 1.5, "{}", a.value);
    assert!(
        (1_185_000..=1_200_000).contains(&(at - trouble)),
        "fired {} s in",
        (at - trouble) / 1000
    );

    // Near the limit without progress: 4400's step last advanced at
    // +4m45s, and its runtime (2 h at +0) passed 90% of its 2.4 h limit at
    // +9.6m: 10 minutes without a step, at +14m45s.
    let (at, a) = by_rule("JobNoProgressNearTimeLimit")[0];
    assert_eq!(a.labels["job_id"], "4400");
    assert_eq!(a.labels["name"], "llama-ft");
    assert!(
        (885_000..=900_000).contains(&(at - trouble)),
        "fired {} s in",
        (at - trouble) / 1000
    );
    assert!(
        a.evidence
            .iter()
            .any(|e| e.series.contains("vitals_slurm_job_runtime_seconds")),
        "{:?}",
        a.evidence
    );
    drop(w);
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
}

/// The kernel-event rules (the agent's kmsg source counts kernel log lines
/// per class): each fires once on the node whose counter of its class
/// went up, and not for other classes or on a node where nothing happened;
/// and the dataset rule on the one dataset that cannot be cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_event_and_dataset_cache_rules_fire_on_their_series_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let (w, store, handle) =
        store::spawn_writer(store::open(&path).unwrap(), &path, StoreOptions::default()).unwrap();
    let nodes = ["gpu-01", "gpu-02"];
    for n in nodes {
        w.hello(n, "i", "test").await.unwrap();
    }
    let now = vitals_common::now_ms();
    let t0 = (now - 3_600_000) / STEP_MS * STEP_MS;
    let trouble = t0 + 20 * 60_000;
    let end = t0 + 40 * 60_000;
    let classes = [
        "nfs_not_responding",
        "nfs_ok",
        "gpu_reset",
        "gpu_ring_timeout",
        "oom_kill",
        "mce",
        "link_up",
        "hung_task",
    ];
    for (seq, node) in nodes.iter().enumerate() {
        let mut b = Samples::default();
        let mut t = t0;
        while t <= end {
            for class in classes {
                let l = labels(&[("node", node), ("class", class)]);
                // gpu-01: one of each class at `trouble`; gpu-02: only
                // the harmless ones (link up, NFS OK), every few minutes.
                let n = match (*node, class) {
                    ("gpu-01", _) if t >= trouble => 1.0,
                    ("gpu-02", "link_up" | "nfs_ok") => ((t - t0) / 300_000) as f64,
                    _ => 0.0,
                };
                b.put("vitals_kernel_events_total", &l, t, n);
            }
            t += STEP_MS;
        }
        if *node == "gpu-02" {
            // The NAS side: one training dataset whose L2ARC takes only
            // metadata from `trouble` on, one that stays cacheable.
            let mut t = t0;
            while t <= end {
                for (ds, ok) in [("tank/train", t < trouble), ("tank/models", true)] {
                    let l = labels(&[("node", node), ("zpool", "tank"), ("dataset", ds)]);
                    b.put(
                        "vitals_zfs_dataset_cacheable",
                        &l,
                        t,
                        f64::from(u8::from(ok)),
                    );
                    // tank/train read at 200 MiB/s, tank/models at 1 MiB/s.
                    let rate = if ds == "tank/train" { 200.0 } else { 1.0 };
                    b.put(
                        "node_zfs_zpool_dataset_nread",
                        &l,
                        t,
                        ((t - t0) / 1000) as f64 * rate * 1024.0 * 1024.0,
                    );
                }
                // Both caches serve most lookups until `trouble`, then
                // under a third.
                let n = labels(&[("node", node)]);
                let (arc, l2) = if t < trouble { (0.95, 0.7) } else { (0.3, 0.2) };
                b.put("node_zfs_arc_hit_ratio", &n, t, arc);
                b.put("node_zfs_arc_l2_hit_ratio", &n, t, l2);
                t += STEP_MS;
            }
        }
        let r = w.write(node, "i", b.batch(seq as u64 + 1)).await.unwrap();
        r.await.unwrap().unwrap();
    }
    let wanted = [
        "ZfsDatasetNotCacheable",
        "ZfsDatasetReadFromDisk",
        "KernelNfsServerNotResponding",
        "KernelGpuReset",
        "KernelOomKill",
        "KernelMachineCheck",
    ];
    let mut rules = rules::builtin().unwrap();
    rules.retain(|r| wanted.contains(&r.name.as_str()));
    assert_eq!(
        rules.len(),
        wanted.len(),
        "kernel rules missing from the pack"
    );
    let engine = Engine::new(rules, Duration::from_secs(60), Vec::new());
    let fired = fired_between(engine, &store, t0 + 60_000, end, STEP_MS).await;
    let show = fired
        .iter()
        .map(|(t, a)| format!("+{}s {} {:?}", (t - trouble) / 1000, a.rule, a.labels))
        .collect::<Vec<_>>()
        .join("\n");
    for name in wanted {
        let f: Vec<_> = fired.iter().filter(|(_, a)| a.rule == name).collect();
        assert_eq!(f.len(), 1, "{name}:\n{show}");
        let (at, a) = f[0];
        if name == "ZfsDatasetNotCacheable" {
            assert_eq!(a.labels["dataset"], "tank/train");
            // After its 10 minutes.
            assert!(
                *at >= trouble + 10 * 60_000 && *at <= trouble + 11 * 60_000,
                "{name} at {at}"
            );
            continue;
        }
        if name == "ZfsDatasetReadFromDisk" {
            // Not tank/models (read slowly); once the caches' 5-minute
            // averages are under half (~3.5 min), after its 10 minutes.
            assert_eq!(a.labels["dataset"], "tank/train");
            assert!(
                *at >= trouble + 13 * 60_000 && *at <= trouble + 16 * 60_000,
                "{name} at +{} s",
                (at - trouble) / 1000
            );
            continue;
        }
        assert_eq!(a.labels["node"], "gpu-01", "{name}");
        assert!(
            *at >= trouble && *at <= trouble + 2 * STEP_MS,
            "{name} at {at}"
        );
    }
    assert_eq!(fired.len(), wanted.len(), "{show}");
    drop(w);
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
}

/// The peer-mesh and throughput-test rules: each fires once, on the peer
/// that degraded, and on nothing healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_and_net_test_rules_fire_on_their_series_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.db");
    let (w, store, handle) =
        store::spawn_writer(store::open(&path).unwrap(), &path, StoreOptions::default()).unwrap();
    let node = "gpu-01";
    w.hello(node, "i", "test").await.unwrap();
    let now = vitals_common::now_ms();
    let t0 = (now - 3 * 3_600_000) / STEP_MS * STEP_MS;
    // Two healthy hours (the baselines), then trouble for 40 minutes.
    let trouble = t0 + 2 * 3_600_000;
    let end = trouble + 40 * 60_000;
    let mut b = Samples::default();
    let mut t = t0;
    while t <= end {
        let bad = t >= trouble;
        // nas-01 loses 20 % of the probes; gpu-02 stops answering;
        // gpu-03 answers ten times slower; gpu-04 stays healthy.
        for peer in ["nas-01", "gpu-02", "gpu-03", "gpu-04"] {
            let l = labels(&[("node", node), ("peer", peer)]);
            let up = !(bad && peer == "gpu-02");
            b.put("vitals_peer_up", &l, t, f64::from(u8::from(up)));
            let rtt = if bad && peer == "gpu-03" {
                0.002
            } else {
                0.0002
            };
            if up {
                b.put("vitals_peer_rtt_seconds", &l, t, rtt);
            }
            for method in ["icmp", "tcp"] {
                let l = labels(&[("node", node), ("peer", peer), ("method", method)]);
                let loss = match (bad, peer) {
                    (true, "nas-01") => 0.2,
                    (true, "gpu-02") => 1.0,
                    _ => 0.0,
                };
                b.put("vitals_peer_loss_ratio", &l, t, loss);
            }
        }
        // Hourly tests: nas-01 falls to 30 % of the link, gpu-02's fail.
        let l = labels(&[("node", node), ("peer", "nas-01:7444")]);
        b.put(
            "vitals_net_test_link_ratio",
            &l,
            t,
            if bad { 0.3 } else { 0.9 },
        );
        b.put("vitals_net_test_success", &l, t, 1.0);
        let l = labels(&[("node", node), ("peer", "gpu-02:7444")]);
        b.put(
            "vitals_net_test_success",
            &l,
            t,
            if bad { 0.0 } else { 1.0 },
        );
        if !bad {
            b.put("vitals_net_test_link_ratio", &l, t, 0.8);
        }
        t += STEP_MS;
    }
    let r = w.write(node, "i", b.batch(1)).await.unwrap();
    r.await.unwrap().unwrap();

    // (rule, peer, method if any, earliest and latest firing after `trouble`)
    let wanted: [(&str, &str, Option<&str>, i64, i64); 7] = [
        (
            "PeerUnreachable",
            "gpu-02",
            None,
            60_000,
            60_000 + 2 * STEP_MS,
        ),
        // Loss: the 5-minute average passes 5 % within 2 minutes, then 5m.
        (
            "PeerPacketLoss",
            "nas-01",
            Some("icmp"),
            5 * 60_000,
            7 * 60_000,
        ),
        (
            "PeerPacketLoss",
            "nas-01",
            Some("tcp"),
            5 * 60_000,
            7 * 60_000,
        ),
        (
            "PeerPacketLoss",
            "gpu-02",
            Some("icmp"),
            5 * 60_000,
            7 * 60_000,
        ),
        (
            "PeerPacketLoss",
            "gpu-02",
            Some("tcp"),
            5 * 60_000,
            7 * 60_000,
        ),
        // Latency: over 3x the day's average within a few minutes, then 10m.
        (
            "PeerLatencyAboveBaseline",
            "gpu-03",
            None,
            10 * 60_000,
            20 * 60_000,
        ),
        ("NetTestBelowLinkSpeed", "nas-01:7444", None, 0, 2 * STEP_MS),
    ];
    let names = [
        "PeerUnreachable",
        "PeerPacketLoss",
        "PeerLatencyAboveBaseline",
        "NetTestBelowLinkSpeed",
        "NetTestFailing",
    ];
    let mut rules = rules::builtin().unwrap();
    rules.retain(|r| names.contains(&r.name.as_str()));
    assert_eq!(rules.len(), names.len(), "peer rules missing from the pack");
    let engine = Engine::new(rules, Duration::from_secs(60), Vec::new());
    let fired = fired_between(engine, &store, t0 + 60_000, end, STEP_MS).await;
    let show = fired
        .iter()
        .map(|(t, a)| format!("+{}s {} {:?}", (t - trouble) / 1000, a.rule, a.labels))
        .collect::<Vec<_>>()
        .join("\n");
    for (rule, peer, method, from, to) in wanted {
        let f: Vec<_> = fired
            .iter()
            .filter(|(_, a)| {
                a.rule == rule
                    && a.labels.get("peer").map(String::as_str) == Some(peer)
                    && a.labels.get("method").map(String::as_str) == method
            })
            .collect();
        assert_eq!(f.len(), 1, "{rule} {peer} {method:?}:\n{show}");
        let at = f[0].0 - trouble;
        assert!(
            (from..=to).contains(&at),
            "{rule} {peer}: at +{}s, not within +{}..{}s:\n{show}",
            at / 1000,
            from / 1000,
            to / 1000
        );
        assert_eq!(f[0].1.labels["node"], node);
    }
    // The failing test fires after its 5 minutes too.
    let f: Vec<_> = fired
        .iter()
        .filter(|(_, a)| a.rule == "NetTestFailing")
        .collect();
    assert_eq!(f.len(), 1, "{show}");
    assert_eq!(f[0].1.labels["peer"], "gpu-02:7444");
    assert!(
        (5 * 60_000..=5 * 60_000 + 2 * STEP_MS).contains(&(f[0].0 - trouble)),
        "{show}"
    );
    assert_eq!(fired.len(), wanted.len() + 1, "nothing else fires:\n{show}");
    drop(w);
    let _ = tokio::task::spawn_blocking(move || handle.join()).await;
}
