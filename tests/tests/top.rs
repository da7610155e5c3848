//! `vitals top` in a real terminal: a collector on 127.0.0.1 is given three
//! nodes' samples over the ingest API (one GPU hot enough for a rule to
//! fire), then `vitals top` runs inside a tmux session; the test reads the
//! screen with `capture-pane`, types with `send-keys` (select, sort, quit)
//! and checks what each key changed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vitals_e2e::receivers::required;
use vitals_e2e::*;
use vitals_proto::v1::{Batch, Label, SeriesDef};

const RULE: &str = "[alerting]\neval_interval = \"200ms\"\nbuiltin = false\n[[alerting.rules]]\nname = \"GpuHot\"\nexpr = \"gpu_gfx_activity > 90\"\nseverity = \"critical\"\nsummary = \"{{node}} gpu {{gpu}} above 90%\"\n";

fn tmux_binary() -> Result<PathBuf, String> {
    ["/usr/bin/tmux", "/usr/local/bin/tmux"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| "tmux is not installed (apt-get install tmux)".into())
}

/// A tmux server of the test's own (`-L`), killed when dropped.
struct Tmux {
    bin: PathBuf,
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let out = self.cmd(&["send-keys", "-t", "top", keys]);
        assert!(out.status.success(), "send-keys {keys}: {out:?}");
    }

    /// Waits until `ok` holds for the screen; fails with the last screen.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let seen = wait_until(Duration::from_secs(20), || {
            last = self.screen();
            ok(&last)
        });
        assert!(seen, "{what}: not on the screen within 20 s:\n{last}");
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// A series and its samples, as one node's agent would send them.
struct W {
    name: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    samples: Vec<(i64, f64)>,
}

fn write_node(env: &Env, port: u16, node: &str, data: &[W]) {
    let mut b = Batch {
        seq: 1,
        ..Default::default()
    };
    for (id, w) in data.iter().enumerate() {
        let mut labels = vec![Label {
            name: "node".into(),
            value: node.into(),
        }];
        labels.extend(w.labels.iter().map(|(k, v)| Label {
            name: k.to_string(),
            value: v.to_string(),
        }));
        b.series.push(SeriesDef {
            id: id as u32,
            name: w.name.into(),
            labels,
        });
        for &(t, v) in &w.samples {
            b.series_ids.push(id as u32);
            b.timestamps_ms.push(t);
            b.values.push(v);
        }
    }
    ingest(env, port, node, "inst-1", vec![b]).expect("batch stored");
}

/// The node table is the left 54 columns: the rows that name a node, in order.
fn node_rows(screen: &str) -> Vec<String> {
    screen
        .lines()
        .map(|l| l.chars().take(54).collect::<String>())
        .filter_map(|l| {
            ["nas-01", "train-01", "train-02"]
                .into_iter()
                .find(|n| l.contains(n))
                .map(|n| {
                    if l.contains(">> ") {
                        format!(">{n}")
                    } else {
                        n.to_string()
                    }
                })
        })
        .collect()
}

/// The screen's line for GPU `gpu` of the selected node.
fn gpu_line<'a>(screen: &'a str, gpu: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(&format!("│gpu{gpu} ")) || l.contains(&format!(" gpu{gpu} ")))
        .unwrap_or("")
}

/// `full` of 20 cells full, as `vitals top` draws a utilisation bar.
fn util_bar(full: usize, pct: u32) -> String {
    format!("{}{} {pct:>3}%", "█".repeat(full), "░".repeat(20 - full))
}

#[test]
fn top_shows_the_fleet_in_tmux_and_follows_keys() {
    let Some(tmux_bin) = required("vitals top under tmux", "VITALS_TEST_TMUX", tmux_binary())
    else {
        return;
    };
    let env = Env::new();
    for n in ["train-01", "train-02", "nas-01"] {
        env.issue(n, "agent", &[]);
    }
    let port = free_port();
    let collector = start_collector_with(&env, port, &format!("[detect]\nenabled = false\n{RULE}"));
    let now = vitals_common::now_ms();
    // Six samples 10 s apart ending now; counters grow by `inc` a step.
    let gauge = |v: f64| {
        (0..6)
            .map(|k| (now - (5 - k) * 10_000, v))
            .collect::<Vec<_>>()
    };
    let counter = |inc: f64| {
        (0..6)
            .map(|k| (now - (5 - k) * 10_000, 1000.0 + k as f64 * inc))
            .collect::<Vec<_>>()
    };
    let gpu = |name, gpu, v| W {
        name,
        labels: vec![("gpu", gpu), ("model", "MI100")],
        samples: gauge(v),
    };
    write_node(
        &env,
        port,
        "train-01",
        &[
            gpu("gpu_gfx_activity", "0", 20.0),
            gpu("gpu_gfx_activity", "1", 40.0),
            gpu("gpu_used_vram", "0", 8192.0),
            gpu("gpu_total_vram", "0", 32768.0),
            gpu("gpu_junction_temperature", "0", 64.0),
            gpu("gpu_power_usage", "0", 210.0),
            W {
                name: "node_network_receive_bytes_total",
                labels: vec![("device", "ib0")],
                samples: counter(1e9),
            },
            W {
                name: "node_network_transmit_bytes_total",
                labels: vec![("device", "ib0")],
                samples: counter(2e9),
            },
            W {
                name: "node_network_speed_bytes",
                labels: vec![("device", "ib0")],
                samples: gauge(12.5e9),
            },
            W {
                name: "node_mountstats_nfs_operations_requests_total",
                labels: vec![("export", "nas-01:/data"), ("operation", "READ")],
                samples: counter(100.0),
            },
            W {
                name: "node_mountstats_nfs_operations_response_time_seconds_total",
                labels: vec![("export", "nas-01:/data"), ("operation", "READ")],
                samples: counter(0.05),
            },
        ],
    );
    write_node(
        &env,
        port,
        "train-02",
        &[gpu("gpu_gfx_activity", "0", 91.0)],
    );
    let pool = |state, v| W {
        name: "node_zfs_zpool_state",
        labels: vec![("zpool", "tank"), ("state", state)],
        samples: gauge(v),
    };
    write_node(
        &env,
        port,
        "nas-01",
        &[
            pool("online", 0.0),
            pool("degraded", 1.0),
            W {
                name: "node_zfs_arc_hit_ratio",
                labels: vec![],
                samples: gauge(0.975),
            },
        ],
    );

    let cli = env.cli_config(port);
    // Not on a terminal: a plain error, nothing drawn.
    let out = env.vitals(&["--config", cli.to_str().unwrap(), "top"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("vitals top needs a terminal"), "{err}");
    assert!(out.stdout.is_empty(), "drew on a pipe: {:?}", out.stdout);
    let tmux = Tmux {
        bin: tmux_bin,
        socket: format!("vitals-top-{}", std::process::id()),
    };
    let command = format!(
        "{} --config {} top --interval 1s; echo top-exited-$?; sleep 600",
        bin_arg(&bin("vitals")),
        bin_arg(&cli)
    );
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "50",
        "-s",
        "top",
        &command,
    ]);
    assert!(out.status.success(), "tmux new-session: {out:?}");

    // Sorted by name, the first node selected: the storage node's ZFS.
    let s = tmux.wait_for(
        "the fleet, the storage node selected, one alert firing",
        |s| {
            s.contains("vitals top · 3 nodes · 1 firing · sort: name")
                && s.contains("pool tank: DEGRADED")
                && s.contains("ARC hit 97.5%")
        },
    );
    assert_eq!(node_rows(&s), [">nas-01", "train-01", "train-02"], "{s}");
    assert!(s.contains("s: sort"), "no help line:\n{s}");

    // j: the next node, with its GPU bars, NIC and NFS mount.
    tmux.keys("j");
    let s = tmux.wait_for("train-01 selected", |s| {
        node_rows(s).first().map(String::as_str) == Some("nas-01")
            && node_rows(s).get(1).map(String::as_str) == Some(">train-01")
            && s.contains(" GPUs (2)")
    });
    let g0 = gpu_line(&s, "0");
    assert!(g0.contains(&util_bar(4, 20)), "gpu0 bar:\n{s}");
    assert!(g0.contains("8.0/32.0 GiB") && g0.contains("64 °C"), "{g0}");
    assert!(
        gpu_line(&s, "1").contains(&util_bar(8, 40)),
        "gpu1 bar:\n{s}"
    );
    assert!(s.contains("ib0"), "no NIC:\n{s}");
    let nfs = s.lines().find(|l| l.contains("nas-01:/data")).unwrap_or("");
    assert!(nfs.contains("0.50 ms"), "NFS RTT per op:\n{s}");
    assert!(s.contains("no firing alerts"), "{s}");

    // s: busiest GPUs first; the selection stays on train-01.
    tmux.keys("s");
    let s = tmux.wait_for("sorted by GPU util", |s| s.contains("sort: GPU util"));
    assert_eq!(node_rows(&s), ["train-02", ">train-01", "nas-01"], "{s}");

    // k: up to the hot node: its bar and the firing alert.
    tmux.keys("k");
    let s = tmux.wait_for("train-02 selected with its alert", |s| {
        node_rows(s).first().map(String::as_str) == Some(">train-02") && s.contains("GpuHot")
    });
    assert!(
        gpu_line(&s, "0").contains(&util_bar(18, 91)),
        "gpu0 bar:\n{s}"
    );
    let alert = s.lines().find(|l| l.contains("GpuHot")).unwrap_or("");
    assert!(
        alert.contains("critical") && alert.contains("train-02 gpu 0 above 90%"),
        "{alert}"
    );

    // s again: most alerts first, then by name.
    tmux.keys("s");
    let s = tmux.wait_for("sorted by alerts", |s| s.contains("sort: alerts"));
    assert_eq!(node_rows(&s), [">train-02", "nas-01", "train-01"], "{s}");

    // q: exits 0 and gives the terminal back (the alternate screen is gone).
    tmux.keys("q");
    let s = tmux.wait_for("exit", |s| s.contains("top-exited-0"));
    assert!(
        !s.contains("vitals top ·"),
        "the TUI is still on screen:\n{s}"
    );
    drop(collector);
}

/// A path as one shell word.
fn bin_arg(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}
