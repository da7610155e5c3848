//! The agent's sources against real captured files (`../../shared/fixtures`,
//! beside the repository), node_exporter's expected output for the same
//! tree, recorded `zpool`/`zfs` formats, arbitrary input, and — where
//! `VITALS_TEST_ZFS_FUSE=1` — a real zfs-fuse pool.

// A test that cannot set up its input should stop right there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vitals_agent::config::RawConfig;
use vitals_agent::cycle::{Cycle, Sources};
use vitals_common::model::{Labels, Sample};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A config reading `procfs`/`sysfs` of a tree, no zpool/zfs commands.
fn config(proc: &Path, sys: &Path) -> RawConfig {
    let mut cfg = RawConfig::default();
    cfg.paths.procfs = proc.to_path_buf();
    cfg.paths.sysfs = sys.to_path_buf();
    cfg.sources.zfs.commands = false;
    cfg
}

fn tree_config(tree: &str) -> RawConfig {
    config(
        &fixture(&format!("{tree}/proc")),
        &fixture(&format!("{tree}/sys")),
    )
}

fn run(cfg: &RawConfig, sources: &[&str]) -> Cycle {
    let only: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    Sources::new(cfg, &only).unwrap().collect()
}

/// Collects once and checks every named source succeeded.
fn collect_ok(cfg: &RawConfig, sources: &[&str]) -> Vec<Sample> {
    let cycle = run(cfg, sources);
    for r in &cycle.reports {
        assert_eq!(r.status, "ok", "{}: {:?}", r.source, r.error);
    }
    cycle.samples
}

/// The value of the one series `name{labels...}` (labels must match exactly).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: Labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.labels == want)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {} matches", found.len());
    found[0].value
}

fn count(samples: &[Sample], name: &str) -> usize {
    samples.iter().filter(|s| s.name == name).count()
}

// ---------------------------------------------------------------- net

#[test]
fn net_dev_matches_node_exporters_expected_lines_for_every_device() {
    let mut cfg = tree_config("node_exporter");
    cfg.sources.net.exclude.clear();
    let ours = collect_ok(&cfg, &["net"]);
    // The file's /proc/net/dev counters (it also has two netclass lines).
    let mut expected = parse_prom(&read(&fixture(
        "node_exporter/netdev-expected-2021-a71d0bdd-parent.txt",
    )));
    expected.retain(|(name, _), _| name.ends_with("_total"));
    assert_eq!(expected.len(), 160, "10 devices × 16 counters");
    for ((name, labels), want) in &expected {
        let got = ours
            .iter()
            .find(|s| &s.name == name && &s.labels == labels)
            .unwrap_or_else(|| panic!("missing {name}{labels:?}"));
        assert_eq!(got.value, *want, "{name}{labels:?}");
    }
    let ours_netdev = ours
        .iter()
        .filter(|s| {
            s.name.starts_with("node_network_receive_")
                || s.name.starts_with("node_network_transmit_")
        })
        .filter(|s| s.name.ends_with("_total"))
        .count();
    assert_eq!(ours_netdev, 160, "no netdev series beyond node_exporter's");
}

#[test]
fn net_default_filter_sysfs_link_stub_speed_and_expected_speed() {
    let mut cfg = tree_config("node_exporter");
    cfg.sources.net.expected_speed_mbps =
        [("eth*".to_string(), 10_000), ("bond0".to_string(), 1_000)].into();
    let s = collect_ok(&cfg, &["net"]);
    // Default exclude: lo, veth*, docker*.
    for gone in ["lo", "veth4B09XN", "docker0"] {
        assert!(
            !s.iter()
                .any(|x| x.labels.get("device").map(String::as_str) == Some(gone)),
            "{gone} should be excluded by default"
        );
    }
    assert_eq!(
        value(
            &s,
            "node_network_receive_bytes_total",
            &[("device", "eth0")]
        ),
        68_210_035_552.0
    );
    assert_eq!(
        value(
            &s,
            "node_network_receive_multicast_total",
            &[("device", "💩0")]
        ),
        72.0
    );
    // eth0 is a link into sys/devices (a stub file in this tree).
    assert_eq!(
        value(&s, "node_network_speed_bytes", &[("device", "eth0")]),
        125_000_000.0
    );
    assert_eq!(
        value(&s, "node_network_speed_bytes", &[("device", "dmz")]),
        125_000_000.0
    );
    assert_eq!(
        count(&s, "node_network_speed_bytes"),
        3,
        "bond0 says -1: no speed"
    );
    assert_eq!(
        value(&s, "node_network_flags", &[("device", "bond0")]),
        4867.0
    );
    assert_eq!(
        value(
            &s,
            "node_network_carrier_changes_total",
            &[("device", "eth0")]
        ),
        2.0
    );
    assert_eq!(value(&s, "node_network_up", &[("device", "int")]), 1.0);
    assert_eq!(
        value(
            &s,
            "node_network_expected_speed_bytes",
            &[("device", "eth0")]
        ),
        1_250_000_000.0
    );
    assert_eq!(
        value(
            &s,
            "node_network_expected_speed_bytes",
            &[("device", "bond0")]
        ),
        125_000_000.0
    );
    assert_eq!(count(&s, "node_network_expected_speed_bytes"), 2);
    assert!(
        !s.iter()
            .any(|x| x.labels.get("device").map(String::as_str) == Some("bonding_masters")),
        "bonding_masters is a file, not a device"
    );
    assert_eq!(
        count(&s, "node_network_receive_utilization_ratio"),
        0,
        "no ratio on the first cycle"
    );
}

#[test]
fn infiniband_ports() {
    let s = collect_ok(&tree_config("node_exporter"), &["net"]);
    let p1 = [("device", "mlx4_0"), ("port", "1")];
    assert_eq!(value(&s, "node_infiniband_rate_bytes_per_second", &p1), 5e9);
    assert_eq!(value(&s, "node_infiniband_state_id", &p1), 4.0);
    assert_eq!(value(&s, "node_infiniband_physical_state_id", &p1), 5.0);
    assert_eq!(
        value(&s, "node_infiniband_port_data_received_bytes_total", &p1),
        4_631_917.0 * 4.0
    );
    assert_eq!(
        value(&s, "node_infiniband_port_packets_received_total", &p1),
        6_825_908_347.0
    );
    assert_eq!(
        value(&s, "node_infiniband_port_transmit_wait_total", &p1),
        4_294_967_295.0
    );
    assert_eq!(
        value(
            &s,
            "node_infiniband_legacy_data_transmitted_bytes_total",
            &p1
        ),
        3_733_440.0 * 4.0
    );
    let i40 = [("device", "i40iw0"), ("port", "1")];
    assert_eq!(
        value(&s, "node_infiniband_rate_bytes_per_second", &i40),
        1.25e9
    );
    assert!(
        !s.iter().any(|x| x.name.ends_with("_total")
            && x.labels.get("device").map(String::as_str) == Some("i40iw0")),
        "i40iw0 has no PMA: no counters"
    );
    assert_eq!(
        value(
            &s,
            "node_infiniband_info",
            &[
                ("device", "mlx4_0"),
                ("board_id", "SM_1141000001000"),
                ("firmware_version", "2.31.5050"),
                ("hca_type", "MT4099"),
            ]
        ),
        1.0
    );
}

#[test]
fn procfs_tree_net_and_hw_counters() {
    let dir = tempfile::tempdir().unwrap();
    // The procfs tree's own eth0 is a real directory; add RoCE hw_counters.
    copy_tree(&fixture("procfs/sys"), &dir.path().join("sys"));
    let port = dir.path().join("sys/class/infiniband/mlx5_0/ports/1");
    fs::create_dir_all(port.join("hw_counters")).unwrap();
    fs::write(port.join("rate"), "100 Gb/sec (4X EDR)\n").unwrap();
    fs::write(port.join("hw_counters/np_cnp_sent"), "42\n").unwrap();
    fs::write(port.join("hw_counters/lifespan"), "10\n").unwrap();
    let s = collect_ok(
        &config(&fixture("procfs/proc"), &dir.path().join("sys")),
        &["net"],
    );
    assert_eq!(
        value(
            &s,
            "node_network_transmit_bytes_total",
            &[("device", "eth0")]
        ),
        563_352_563.0
    );
    assert_eq!(
        value(&s, "node_network_speed_bytes", &[("device", "eth0")]),
        125_000_000.0
    );
    let p = [("device", "mlx5_0"), ("port", "1")];
    assert_eq!(
        value(&s, "node_infiniband_rate_bytes_per_second", &p),
        12.5e9
    );
    assert_eq!(
        value(
            &s,
            "node_infiniband_hw_counter_total",
            &[
                ("device", "mlx5_0"),
                ("port", "1"),
                ("counter", "np_cnp_sent")
            ]
        ),
        42.0
    );
    assert_eq!(
        count(&s, "node_infiniband_hw_counter_total"),
        1,
        "lifespan is a setting"
    );
}

#[test]
fn link_utilization_over_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let header = "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n";
    let dev = |rx: u64, tx: u64| format!("{header}  ens1: {rx} 1 0 0 0 0 0 0 {tx} 1 0 0 0 0 0 0\n");
    fs::create_dir_all(dir.path().join("proc/net")).unwrap();
    fs::create_dir_all(dir.path().join("sys/class/net/ens1")).unwrap();
    fs::write(dir.path().join("sys/class/net/ens1/speed"), "100000\n").unwrap();
    fs::write(dir.path().join("proc/net/dev"), dev(1_000, 0)).unwrap();
    let cfg = config(&dir.path().join("proc"), &dir.path().join("sys"));
    let mut sources = Sources::new(&cfg, &["net".to_string()]).unwrap();
    let t0 = Instant::now();
    sources.collect();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    // 1.25 GB received, 0 sent in the interval.
    fs::write(dir.path().join("proc/net/dev"), dev(1_250_001_000, 0)).unwrap();
    let t2 = Instant::now();
    let s = sources.collect().samples;
    let t3 = Instant::now();
    let speed = 12.5e9;
    let (min_secs, max_secs) = ((t2 - t1).as_secs_f64(), (t3 - t0).as_secs_f64());
    let rx = value(
        &s,
        "node_network_receive_utilization_ratio",
        &[("device", "ens1")],
    );
    assert!(
        rx <= 1.25e9 / min_secs / speed && rx >= 1.25e9 / max_secs / speed,
        "{rx} not within [{}, {}]",
        1.25e9 / max_secs / speed,
        1.25e9 / min_secs / speed
    );
    assert_eq!(
        value(
            &s,
            "node_network_transmit_utilization_ratio",
            &[("device", "ens1")]
        ),
        0.0
    );
}

// ---------------------------------------------------------------- nfs

#[test]
fn mountstats_through_the_self_link_with_duplicates_and_two_protocols() {
    let s = collect_ok(&tree_config("node_exporter"), &["nfs"]);
    let tcp = [
        ("export", "192.168.1.1:/srv/test"),
        ("mountaddr", "192.168.1.1"),
        ("protocol", "tcp"),
    ];
    let udp = [
        ("export", "192.168.1.1:/srv/test"),
        ("mountaddr", "192.168.1.1"),
        ("protocol", "udp"),
    ];
    assert_eq!(count(&s, "node_mountstats_nfs_mountpoint_info"), 3);
    assert_eq!(
        count(&s, "node_mountstats_nfs_age_seconds_total"),
        2,
        "the tcp duplicate is reported once"
    );
    assert_eq!(
        value(&s, "node_mountstats_nfs_age_seconds_total", &tcp),
        13968.0
    );
    assert_eq!(
        value(&s, "node_mountstats_nfs_read_bytes_total", &udp),
        1_207_640_230.0
    );
    assert_eq!(
        value(&s, "node_mountstats_nfs_total_read_bytes_total", &udp),
        1_210_214_218.0
    );
    assert_eq!(
        value(&s, "node_mountstats_nfs_event_vfs_access_total", &tcp),
        398.0
    );
    let with = |l: &[(&'static str, &'static str)], k: &'static str, v: &'static str| {
        let mut l = l.to_vec();
        l.push((k, v));
        l
    };
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_transport_connect_total",
            &with(&tcp, "transport", "0")
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_transport_pending_queue_total",
            &with(&udp, "transport", "0")
        ),
        5726.0
    );
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_operations_requests_total",
            &with(&tcp, "operation", "READ")
        ),
        1298.0
    );
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_operations_request_time_seconds_total",
            &with(&tcp, "operation", "READ")
        ),
        79.407
    );
    // ACCESS's queue time is a counter near 2^64 milliseconds.
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_operations_queue_time_seconds_total",
            &with(&udp, "operation", "ACCESS")
        ),
        18_446_743_919_241_604_546u64 as f64 / 1000.0
    );
}

#[test]
fn mountstats_wrapped_counter_parses_exactly() {
    use vitals_agent::sources::nfs::mountstats::parse_mountstats;
    let text = read(&fixture("procfs/proc/26231/mountstats"));
    let mounts = parse_mountstats(&text).unwrap();
    assert_eq!(mounts.len(), 5);
    let nfs = mounts[4].nfs.as_ref().unwrap();
    assert_eq!(mounts[4].mountpoint, "/mnt/nfs/test");
    assert_eq!(mounts[4].stats_version.as_deref(), Some("1.1"));
    assert_eq!(nfs.opts["mountaddr"], "192.168.1.1");
    let access = nfs.ops.iter().find(|o| o.op == "ACCESS").unwrap();
    assert_eq!(access.queue_ms, 18_446_743_919_241_604_546);
    assert_eq!(access.operations, 2_927_395_007);
    assert_eq!(access.bytes_sent, 526_931_094_212);
    assert_eq!(nfs.events.len(), 27);
    assert_eq!(
        nfs.bytes,
        vec![1_207_640_230, 0, 0, 0, 1_210_214_218, 0, 295_483, 0]
    );
    let t = &nfs.transports[0];
    assert_eq!(
        (
            t.protocol.as_str(),
            t.port,
            t.connect,
            t.idle_time_seconds,
            t.sends,
            t.max_slots
        ),
        ("tcp", 832, 1, 11, 6428, Some(24))
    );
    // Through the source, the procfs tree's `self` stub points at 26231.
    let s = collect_ok(&tree_config("procfs"), &["nfs"]);
    assert_eq!(count(&s, "node_mountstats_nfs_mountpoint_info"), 1);
}

#[test]
fn per_operation_averages_over_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("proc/4242");
    fs::create_dir_all(&own).unwrap();
    fs::write(dir.path().join("proc/self"), "4242").unwrap();
    let write = |ops: u64, rtt: u64, exe: u64| {
        fs::write(
            own.join("mountstats"),
            format!(
                "device nas:/data mounted on /data with fstype nfs4 statvers=1.1\n\
                 \topts:\trw,vers=4.2,proto=tcp\n\
                 \txprt:\ttcp 0 0 1 0 0 1 1 0 1 0 1 0 0\n\
                 \tper-op statistics\n\
                 \t        READ: {ops} {ops} 0 0 0 0 {rtt} {exe} 0\n"
            ),
        )
        .unwrap();
    };
    write(100, 1_000, 1_500);
    let cfg = config(&dir.path().join("proc"), &dir.path().join("sys"));
    let mut sources = Sources::new(&cfg, &["nfs".to_string()]).unwrap();
    let first = sources.collect().samples;
    assert_eq!(
        count(
            &first,
            "node_mountstats_nfs_operations_response_time_average_seconds"
        ),
        0
    );
    // 50 more READs that took 400 ms RTT and 600 ms execute in all.
    write(150, 1_400, 2_100);
    let s = sources.collect().samples;
    let l = [
        ("export", "nas:/data"),
        ("mountaddr", "nas"),
        ("protocol", "tcp"),
        ("operation", "READ"),
    ];
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_operations_response_time_average_seconds",
            &l
        ),
        0.008
    );
    assert_eq!(
        value(
            &s,
            "node_mountstats_nfs_operations_request_time_average_seconds",
            &l
        ),
        0.012
    );
    assert_eq!(
        value(&s, "node_mountstats_nfs_operations_errors_total", &l),
        0.0
    );
}

#[test]
fn nfs_client_rpc_counters_in_kernel_order() {
    let s = collect_ok(&tree_config("node_exporter"), &["nfs"]);
    assert_eq!(value(&s, "node_nfs_rpcs_total", &[]), 1_218_785_755.0);
    assert_eq!(
        value(&s, "node_nfs_rpc_retransmissions_total", &[]),
        374_636.0
    );
    assert_eq!(value(&s, "node_nfs_connections_total", &[]), 45.0);
    assert_eq!(
        value(&s, "node_nfs_packets_total", &[("protocol", "udp")]),
        70.0
    );
    let req = |proto: &'static str, method: &'static str| {
        value(
            &s,
            "node_nfs_requests_total",
            &[("proto", proto), ("method", method)],
        )
    };
    assert_eq!(req("2", "WrCache"), 86.0);
    assert_eq!(req("3", "GetAttr"), 1_061_909_262.0);
    assert_eq!(req("3", "Commit"), 23_729.0);
    assert_eq!(req("4", "ReclaimComplete"), 35.0);
    // The kernel counts LAYOUTGET at index 44 and GETDEVICEINFO at 45.
    assert_eq!(req("4", "LayoutGet"), 1.0);
    assert_eq!(req("4", "GetDeviceInfo"), 90.0);
    assert_eq!(req("4", "LayoutReturn"), 0.0);
    let v4 = s
        .iter()
        .filter(|x| x.name == "node_nfs_requests_total" && x.labels["proto"] == "4")
        .count();
    assert_eq!(v4, 48, "one series per counter the kernel printed");

    let s = collect_ok(&tree_config("procfs"), &["nfs"]);
    assert_eq!(value(&s, "node_nfs_rpcs_total", &[]), 4_329_785.0);
    let v4 = s
        .iter()
        .filter(|x| x.name == "node_nfs_requests_total" && x.labels["proto"] == "4")
        .count();
    assert_eq!(v4, 61);
}

#[test]
fn nfsd_counters() {
    let s = collect_ok(&tree_config("node_exporter"), &["nfsd"]);
    assert_eq!(
        value(&s, "node_nfsd_reply_cache_nocache_total", &[]),
        18_622.0
    );
    assert_eq!(
        value(&s, "node_nfsd_disk_bytes_read_total", &[]),
        157_286_400.0
    );
    assert_eq!(
        value(&s, "node_nfsd_disk_bytes_written_total", &[]),
        72_864.0
    );
    assert_eq!(value(&s, "node_nfsd_server_threads", &[]), 8.0);
    assert_eq!(
        value(&s, "node_nfsd_read_ahead_cache_size_blocks", &[]),
        32.0
    );
    assert_eq!(
        value(&s, "node_nfsd_packets_total", &[("proto", "tcp")]),
        917.0
    );
    assert_eq!(value(&s, "node_nfsd_server_rpcs_total", &[]), 18_628.0);
    assert_eq!(
        value(&s, "node_nfsd_rpc_errors_total", &[("error", "auth")]),
        2.0
    );
    let req = |proto: &'static str, method: &'static str| {
        value(
            &s,
            "node_nfsd_requests_total",
            &[("proto", proto), ("method", method)],
        )
    };
    assert_eq!(req("2", "Lookup"), 4410.0);
    assert_eq!(req("3", "ReadDirPlus"), 216.0);
    assert_eq!(req("4", "PutFH"), 9609.0);
    assert_eq!(req("4", "Renew"), 1236.0);
    assert_eq!(req("4", "PutRootFH"), 2.0);
    assert_eq!(req("4", "WdelegGetattr"), 15.0);
    assert_eq!(
        value(
            &s,
            "node_nfsd_v4_procedures_total",
            &[("method", "Compound")]
        ),
        10_853.0
    );
}

// ---------------------------------------------------------------- zfs

#[test]
fn zfs_kstats_every_arcstats_field_and_pools() {
    let s = collect_ok(&tree_config("node_exporter"), &["zfs"]);
    let arcstats = read(&fixture("node_exporter/proc/spl/kstat/zfs/arcstats"));
    let fields = arcstats.lines().count() - 2;
    assert_eq!(
        s.iter()
            .filter(|x| x.name.starts_with("node_zfs_arc_"))
            .count(),
        fields,
        "every arcstats field, and no hit ratio on the first cycle"
    );
    assert_eq!(value(&s, "node_zfs_arc_hits", &[]), 8_772_612.0);
    assert_eq!(value(&s, "node_zfs_arc_c_max", &[]), 8_367_976_448.0);
    assert_eq!(value(&s, "node_zfs_arc_l2_size", &[]), 0.0);
    assert_eq!(
        value(&s, "node_zfs_arc_memory_available_bytes", &[]),
        -922_337_203_685_477_580.0
    );
    assert_eq!(
        value(&s, "node_zfs_zil_zil_itx_needcopy_bytes", &[]),
        18_446_744_073_709_537_686u64 as f64
    );
    assert_eq!(value(&s, "node_zfs_fm_erpt_dropped", &[]), 18.0);
    assert_eq!(
        value(&s, "node_zfs_zpool_nwritten", &[("zpool", "poolz1")]),
        2_680_501_248.0
    );
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_dataset_nwritten",
            &[("zpool", "pool3"), ("dataset", "pool3/dataset with  space")]
        ),
        12_302.0
    );
    let state = |pool: &'static str, st: &'static str| {
        value(
            &s,
            "node_zfs_zpool_state",
            &[("zpool", pool), ("state", st)],
        )
    };
    assert_eq!(state("poolz1", "degraded"), 1.0);
    assert_eq!(state("poolz1", "online"), 0.0);
    assert_eq!(state("pool2", "suspended"), 1.0);
    assert_eq!(count(&s, "node_zfs_zpool_state"), 4 * 7);
}

#[test]
fn arc_hit_ratios_over_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let kstat = dir.path().join("proc/spl/kstat/zfs");
    fs::create_dir_all(&kstat).unwrap();
    let write = |hits: u64, misses: u64, l2h: u64, l2m: u64| {
        fs::write(
            kstat.join("arcstats"),
            format!(
                "6 1 0x01 4 1 1 1\nname type data\nhits 4 {hits}\nmisses 4 {misses}\nl2_hits 4 {l2h}\nl2_misses 4 {l2m}\n"
            ),
        )
        .unwrap();
    };
    write(1000, 100, 10, 10);
    let cfg = config(&dir.path().join("proc"), &dir.path().join("sys"));
    let mut sources = Sources::new(&cfg, &["zfs".to_string()]).unwrap();
    sources.collect();
    write(1900, 200, 10, 10);
    let s = sources.collect().samples;
    assert_eq!(value(&s, "node_zfs_arc_hit_ratio", &[]), 0.9);
    assert_eq!(
        count(&s, "node_zfs_arc_l2_hit_ratio"),
        0,
        "no L2ARC lookups: no ratio"
    );
    write(2000, 200, 40, 20);
    let s = sources.collect().samples;
    assert_eq!(value(&s, "node_zfs_arc_hit_ratio", &[]), 1.0);
    assert_eq!(value(&s, "node_zfs_arc_l2_hit_ratio", &[]), 0.75);
}

fn zdata(name: &str) -> String {
    read(&Path::new(DATA).join("zpool").join(name))
}

#[test]
fn zpool_status_openzfs_resilver_with_all_vdev_classes() {
    use vitals_agent::sources::zfs::zpool::parse_zpool_status;
    let pools = parse_zpool_status(&zdata("openzfs-2.1-status-resilver.txt")).unwrap();
    assert_eq!(pools.len(), 1);
    let p = &pools[0];
    assert_eq!((p.name.as_str(), p.state.as_str()), ("tank", "DEGRADED"));
    let scan = p.scan.as_ref().unwrap();
    assert_eq!((scan.function, scan.state), ("resilver", "in_progress"));
    assert!(
        (scan.progress.unwrap() - 0.394).abs() < 1e-12,
        "{:?}",
        scan.progress
    );
    assert_eq!(scan.repaired_bytes, Some(134.0 * 1024f64.powi(3)));
    let vdev = |name: &str| p.vdevs.iter().find(|v| v.name == name).unwrap();
    let faulted = vdev("ata-ST16000NM001G-2KK103_ZL2A1B4D");
    assert_eq!(
        (faulted.state.as_str(), faulted.depth, faulted.class),
        ("FAULTED", 3, "data")
    );
    assert_eq!(faulted.read_errors, Some(12.0));
    assert_eq!(faulted.write_errors, Some(1.2 * 1024.0));
    assert_eq!(faulted.note, "too many errors");
    assert_eq!(
        vdev("ata-ST16000NM001G-2KK103_ZL2A1B5E").checksum_errors,
        Some(2.0)
    );
    assert_eq!(
        vdev("ata-ST16000NM001G-2KK103_ZL2A9Z9Z").note,
        "(resilvering)"
    );
    assert_eq!(vdev("mirror-1").class, "special");
    assert_eq!(
        vdev("nvme-INTEL_SSDPE21D280GA_PHM2913000QM280AGN").class,
        "log"
    );
    assert_eq!(
        vdev("nvme-Samsung_SSD_970_EVO_Plus_2TB_S4J4NX0R").class,
        "cache"
    );
    let spare = vdev("ata-ST16000NM001G-2KK103_ZL2A1B7G");
    assert_eq!(
        (spare.class, spare.state.as_str(), spare.read_errors),
        ("spare", "AVAIL", None)
    );
    assert_eq!(p.vdevs.len(), 14, "the pool row and 13 vdevs");
    assert_eq!(p.data_errors, Some(0.0));
}

#[test]
fn zpool_status_p_two_pools_scrubs_and_data_errors() {
    use vitals_agent::sources::zfs::zpool::parse_zpool_status;
    let pools = parse_zpool_status(&zdata("openzfs-2.2-status-p-scrub.txt")).unwrap();
    assert_eq!(pools.len(), 2);
    let backup = pools[0].scan.as_ref().unwrap();
    assert_eq!(
        (backup.function, backup.state, backup.progress),
        ("scrub", "in_progress", Some(0.1066))
    );
    assert_eq!(backup.repaired_bytes, Some(0.0));
    let tank = &pools[1];
    let scan = tank.scan.as_ref().unwrap();
    assert_eq!((scan.state, scan.errors), ("finished", Some(3.0)));
    assert_eq!(scan.repaired_bytes, Some(1.5 * 1024.0 * 1024.0));
    assert_eq!(tank.data_errors, Some(3.0));
    let sdc = tank.vdevs.iter().find(|v| v.name == "sdc").unwrap();
    assert_eq!(sdc.checksum_errors, Some(1234.0));
    assert_eq!(parse_zpool_status("no pools available\n").unwrap(), vec![]);
}

#[test]
fn zpool_status_and_list_of_zfs_fuse() {
    use vitals_agent::sources::zfs::zpool::{
        LIST_COLUMNS_LEGACY, parse_zpool_list, parse_zpool_status,
    };
    let pools = parse_zpool_status(&zdata("zfs-fuse-status-degraded.txt")).unwrap();
    let p = &pools[0];
    assert_eq!(p.state, "DEGRADED");
    let scan = p.scan.as_ref().unwrap();
    assert_eq!(
        (scan.function, scan.state, scan.errors),
        ("scrub", "finished", Some(0.0))
    );
    let states: Vec<(&str, &str, &str)> = p
        .vdevs
        .iter()
        .map(|v| (v.name.as_str(), v.state.as_str(), v.class))
        .collect();
    assert_eq!(
        states,
        vec![
            ("vtest", "DEGRADED", "pool"),
            ("raidz2-0", "DEGRADED", "data"),
            ("/var/lib/vdevs/d0", "ONLINE", "data"),
            ("/var/lib/vdevs/d1", "OFFLINE", "data"),
            ("/var/lib/vdevs/d2", "ONLINE", "data"),
            ("/var/lib/vdevs/d3", "ONLINE", "data"),
            ("/var/lib/vdevs/d4", "ONLINE", "log"),
        ]
    );
    let rows = parse_zpool_list(&zdata("zfs-fuse-list.txt"), LIST_COLUMNS_LEGACY).unwrap();
    assert_eq!(rows[0].size_bytes, Some(492.0 * 1024.0 * 1024.0));
    assert_eq!(rows[0].allocated_bytes, Some(2.52 * 1024.0 * 1024.0));
    assert_eq!(rows[0].capacity, Some(0.0));
    assert_eq!(rows[0].health, "DEGRADED");
}

#[test]
fn zpool_list_and_snapshots_exact_numbers() {
    use vitals_agent::sources::zfs::zpool::{LIST_COLUMNS, parse_snapshots, parse_zpool_list};
    let rows = parse_zpool_list(&zdata("openzfs-2.x-list-Hp.txt"), LIST_COLUMNS).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].size_bytes, Some(96_076_792_152_064.0));
    assert_eq!(rows[1].fragmentation, None);
    assert_eq!(rows[0].fragmentation, Some(0.03));
    assert_eq!(rows[1].capacity, Some(0.64));
    let snaps = parse_snapshots(&zdata("openzfs-2.x-snapshots-Hp.txt")).unwrap();
    assert_eq!(
        snaps,
        vec![
            ("backup/tank data".to_string(), 1, 1_796_256_000),
            ("tank/data".to_string(), 2, 1_796_346_000),
            ("tank/models".to_string(), 1, 1_790_000_000),
        ]
    );
}

/// Fake `zpool` and `zfs` programs: shell scripts that print recorded
/// output (or hang), in a temporary directory.
struct FakeZfs {
    dir: tempfile::TempDir,
}

impl FakeZfs {
    fn new(zpool_body: &str, zfs_body: &str) -> FakeZfs {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("zpool", zpool_body), ("zfs", zfs_body)] {
            let path = dir.path().join(name);
            fs::write(&path, format!("#!/bin/sh\nD={DATA}/zpool\n{body}\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        FakeZfs { dir }
    }

    fn config(&self, timeout: Duration) -> RawConfig {
        let mut cfg = config(&self.dir.path().join("proc"), &self.dir.path().join("sys"));
        cfg.sources.zfs.commands = true;
        cfg.sources.zfs.zpool = self.dir.path().join("zpool");
        cfg.sources.zfs.zfs = self.dir.path().join("zfs");
        cfg.sources.zfs.command_timeout = timeout;
        cfg
    }
}

const OPENZFS_ZPOOL: &str = r#"case "$1 $2" in
  "list -Hp") cat $D/openzfs-2.x-list-Hp.txt ;;
  "status -p") cat $D/openzfs-2.1-status-resilver.txt ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac"#;

#[test]
fn pool_health_from_commands_without_kstats() {
    let fake = FakeZfs::new(OPENZFS_ZPOOL, "cat $D/openzfs-2.x-snapshots-Hp.txt");
    let cfg = fake.config(Duration::from_secs(10));
    let s = collect_ok(&cfg, &["zfs"]);
    let cmd = |c: &'static str| [("command", c)];
    for c in ["zpool list", "zpool status", "zfs list snapshots"] {
        assert_eq!(value(&s, "vitals_zfs_command_success", &cmd(c)), 1.0, "{c}");
        assert_eq!(value(&s, "vitals_zfs_command_hung", &cmd(c)), 0.0, "{c}");
    }
    assert_eq!(
        value(&s, "node_zfs_zpool_size_bytes", &[("zpool", "tank")]),
        96_076_792_152_064.0
    );
    assert_eq!(
        value(&s, "node_zfs_zpool_capacity_ratio", &[("zpool", "backup")]),
        0.44
    );
    assert_eq!(
        count(&s, "node_zfs_zpool_fragmentation_ratio"),
        1,
        "`-` is no value"
    );
    // No kstats: the pool state comes from the commands.
    let state = |pool: &'static str, st: &'static str| {
        value(
            &s,
            "node_zfs_zpool_state",
            &[("zpool", pool), ("state", st)],
        )
    };
    assert_eq!(state("tank", "degraded"), 1.0);
    assert_eq!(state("backup", "online"), 1.0);
    let vdev = |name: &'static str, class: &'static str, st: &'static str| {
        value(
            &s,
            "node_zfs_zpool_vdev_state",
            &[
                ("zpool", "tank"),
                ("vdev", name),
                ("class", class),
                ("state", st),
            ],
        )
    };
    assert_eq!(vdev("raidz2-0", "data", "degraded"), 1.0);
    assert_eq!(
        vdev("ata-ST16000NM001G-2KK103_ZL2A1B4D", "data", "faulted"),
        1.0
    );
    assert_eq!(
        vdev("ata-ST16000NM001G-2KK103_ZL2A1B7G", "spare", "avail"),
        1.0
    );
    assert_eq!(
        vdev(
            "nvme-Samsung_SSD_970_EVO_Plus_2TB_S4J4NX0R",
            "cache",
            "online"
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_vdev_write_errors_total",
            &[
                ("zpool", "tank"),
                ("vdev", "ata-ST16000NM001G-2KK103_ZL2A1B4D"),
                ("class", "data")
            ]
        ),
        1228.8
    );
    let progress = value(
        &s,
        "node_zfs_zpool_scan_progress_ratio",
        &[("zpool", "tank"), ("function", "resilver")],
    );
    assert!((progress - 0.394).abs() < 1e-12, "{progress}");
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_scan_info",
            &[
                ("zpool", "tank"),
                ("function", "resilver"),
                ("state", "in_progress")
            ]
        ),
        1.0
    );
    let ds = [("zpool", "tank"), ("dataset", "tank/data")];
    assert_eq!(value(&s, "node_zfs_dataset_snapshots", &ds), 2.0);
    assert_eq!(
        value(
            &s,
            "node_zfs_dataset_newest_snapshot_timestamp_seconds",
            &ds
        ),
        1_796_346_000.0
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let age = value(&s, "node_zfs_dataset_newest_snapshot_age_seconds", &ds);
    assert!(
        (age - (now - 1_796_346_000.0).max(0.0)).abs() < 5.0,
        "{age}"
    );
}

#[test]
fn legacy_zpool_without_p_is_asked_again_in_its_own_format() {
    // zfs-fuse: `-p` is a usage error (exit 2).
    let zpool = r#"case "$*" in
  *-Hp*|*-p*) echo "invalid option 'p'" >&2; exit 2 ;;
  "list -H -o name,size,allocated,free,capacity,dedupratio,health") cat $D/zfs-fuse-list.txt ;;
  "status") cat $D/zfs-fuse-status-degraded.txt ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac"#;
    let fake = FakeZfs::new(zpool, "echo \"invalid option 'p'\" >&2; exit 2");
    let s = collect_ok(&fake.config(Duration::from_secs(10)), &["zfs"]);
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_success",
            &[("command", "zpool list")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_success",
            &[("command", "zfs list snapshots")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_state",
            &[("zpool", "vtest"), ("state", "degraded")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_vdev_state",
            &[
                ("zpool", "vtest"),
                ("vdev", "/var/lib/vdevs/d1"),
                ("class", "data"),
                ("state", "offline")
            ]
        ),
        1.0
    );
}

#[test]
fn a_hung_zpool_is_reported_and_does_not_hold_the_cycle() {
    let fake = FakeZfs::new(
        r#"if [ "$1" = status ]; then exec sleep 60; fi
cat $D/openzfs-2.x-list-Hp.txt"#,
        "exit 0",
    );
    let mut cfg = fake.config(Duration::from_millis(600));
    cfg.interval = Duration::from_millis(400); // the cycle waits at most 200 ms
    // The zfs source with a kstat tree and the nfsd source beside it.
    let kstat = fake.dir.path().join("proc/spl/kstat/zfs");
    fs::create_dir_all(&kstat).unwrap();
    fs::write(
        kstat.join("zil"),
        "7 1 0x01 1 1 1 1\nname type data\nzil_commit_count 4 10\n",
    )
    .unwrap();
    fs::create_dir_all(fake.dir.path().join("proc/net/rpc")).unwrap();
    fs::copy(
        fixture("node_exporter/proc/net/rpc/nfsd"),
        fake.dir.path().join("proc/net/rpc/nfsd"),
    )
    .unwrap();
    let mut sources = Sources::new(&cfg, &["zfs".to_string(), "nfsd".to_string()]).unwrap();
    let t = Instant::now();
    let first = sources.collect();
    assert!(
        t.elapsed() < Duration::from_millis(550),
        "the cycle waited {:?}",
        t.elapsed()
    );
    assert!(
        first.reports.iter().all(|r| r.status == "ok"),
        "{:?}",
        first.reports
    );
    let s = &first.samples;
    assert_eq!(value(s, "node_zfs_zil_zil_commit_count", &[]), 10.0);
    assert_eq!(
        value(
            s,
            "vitals_zfs_command_success",
            &[("command", "zpool list")]
        ),
        1.0
    );
    assert_eq!(count(s, "node_zfs_zpool_size_bytes"), 2);
    assert_eq!(value(s, "node_nfsd_server_threads", &[]), 8.0);
    // Past the timeout the run is killed and counted.
    std::thread::sleep(Duration::from_millis(700));
    let s = sources.collect().samples;
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_timeouts_total",
            &[("command", "zpool status")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_success",
            &[("command", "zpool status")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_timeouts_total",
            &[("command", "zpool list")]
        ),
        0.0
    );
    assert_eq!(count(&s, "node_zfs_zpool_vdev_state"), 0);
    assert_eq!(value(&s, "node_nfsd_server_threads", &[]), 8.0);
}

#[test]
fn no_zfs_at_all_is_unavailable() {
    let fake = FakeZfs::new(
        "echo 'The ZFS modules are not loaded.' >&2; exit 1",
        "exit 1",
    );
    let cycle = run(&fake.config(Duration::from_secs(10)), &["zfs"]);
    assert_eq!(
        cycle.reports[0].status, "unavailable",
        "{:?}",
        cycle.reports[0]
    );
    assert!(
        cycle.reports[0]
            .error
            .as_deref()
            .unwrap()
            .contains("modules are not loaded")
    );
    let mut cfg = fake.config(Duration::from_secs(10));
    cfg.sources.zfs.zpool = "/nonexistent/zpool".into();
    let cycle = run(&cfg, &["zfs"]);
    assert_eq!(cycle.reports[0].status, "unavailable");
}

// ------------------------------------------------- errors and absence

#[test]
fn malformed_input_fails_that_source_only_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("proc/net/rpc")).unwrap();
    fs::write(
        dir.path().join("proc/net/dev"),
        "Inter-| Receive | Transmit\nnot the field names\n",
    )
    .unwrap();
    fs::copy(
        fixture("node_exporter/proc/net/rpc/nfsd"),
        dir.path().join("proc/net/rpc/nfsd"),
    )
    .unwrap();
    let cfg = config(&dir.path().join("proc"), &dir.path().join("sys"));
    let mut sources = Sources::new(&cfg, &["net".to_string(), "nfsd".to_string()]).unwrap();
    for cycle in 1..=2 {
        let c = sources.collect();
        let net = c.reports.iter().find(|r| r.source == "net").unwrap();
        assert_eq!(net.status, "error");
        assert!(
            net.error.as_deref().unwrap().contains("net/dev: line 2"),
            "{:?}",
            net.error
        );
        assert!(
            !c.samples
                .iter()
                .any(|s| s.name.starts_with("node_network_"))
        );
        assert_eq!(
            value(
                &c.samples,
                "vitals_source_errors_total",
                &[("source", "net")]
            ),
            cycle as f64
        );
        assert_eq!(
            value(&c.samples, "vitals_source_success", &[("source", "net")]),
            0.0
        );
        assert_eq!(
            value(&c.samples, "vitals_source_success", &[("source", "nfsd")]),
            1.0
        );
        assert_eq!(value(&c.samples, "node_nfsd_server_threads", &[]), 8.0);
    }
}

#[test]
fn an_empty_tree_has_none_of_these_sources() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("proc"), &dir.path().join("sys"));
    cfg.sources.zfs.commands = true;
    cfg.sources.zfs.zpool = dir.path().join("zpool");
    let cycle = run(&cfg, &["net", "nfs", "nfsd", "zfs"]);
    for r in &cycle.reports {
        assert_eq!(r.status, "unavailable", "{}: {:?}", r.source, r.error);
    }
    assert!(cycle.samples.is_empty(), "{:?}", cycle.samples);
}

#[test]
fn once_reads_a_whole_fixture_tree() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitals-agent"))
        .args(["--config", "/nonexistent-so-defaults-are-not-used.toml"])
        .arg("once")
        .arg("--procfs")
        .arg(fixture("node_exporter/proc"))
        .arg("--sysfs")
        .arg(fixture("node_exporter/sys"))
        .args([
            "--source", "net", "--source", "nfs", "--source", "nfsd", "--format", "json",
        ])
        .output()
        .unwrap();
    // A missing config file is a configuration error (exit 2)...
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vitals-agent"))
        .arg("once")
        .arg("--procfs")
        .arg(fixture("node_exporter/proc"))
        .arg("--sysfs")
        .arg(fixture("node_exporter/sys"))
        .args([
            "--source", "net", "--source", "nfs", "--source", "nfsd", "--format", "json",
        ])
        .env("VITALS_LOG", "error")
        .output()
        .unwrap();
    // ...without one, the defaults and the given roots are used.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sources = json["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3);
    assert!(sources.iter().all(|s| s["status"] == "ok"), "{sources:?}");
    let samples = json["samples"].as_array().unwrap();
    let find = |name: &str| {
        samples
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["value"].clone())
    };
    assert_eq!(
        find("node_nfsd_server_threads"),
        Some(serde_json::json!(8.0))
    );
    assert_eq!(
        find("node_nfs_rpcs_total"),
        Some(serde_json::json!(1_218_785_755.0))
    );
}

// ------------------------------------------- node_exporter golden output

/// Series of a Prometheus text file: (name, labels) → value.
fn parse_prom(text: &str) -> BTreeMap<(String, Labels), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Labels::new()),
            Some((name, rest)) => (
                name.to_string(),
                parse_labels(rest.strip_suffix('}').unwrap()),
            ),
        };
        out.insert((name, labels), value);
    }
    out
}

fn parse_labels(mut s: &str) -> Labels {
    let mut labels = Labels::new();
    while !s.is_empty() {
        let (name, rest) = s.split_once("=\"").unwrap();
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().unwrap() {
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_string(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// How a listed difference shows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Diff {
    /// Both have the series; the values differ.
    Value,
    /// Only node_exporter has the series.
    OnlyTheirs,
    /// Only the agent has the series.
    OnlyOurs,
}

/// A difference the agent keeps on purpose, and why.
struct Known {
    name: &'static str,
    /// Label values the series must have (a subset of its labels);
    /// `*` before a value negates it.
    labels: &'static [(&'static str, &'static str)],
    diff: Diff,
    reason: &'static str,
}

const KNOWN: &[Known] = &[
    Known {
        name: "node_nfs_requests_total",
        labels: &[("proto", "4"), ("method", "LayoutGet")],
        diff: Diff::Value,
        reason: "NFSv4 op-order quirk: the kernel counts LAYOUTGET at index 44 and GETDEVICEINFO \
                 at 45 (include/linux/nfs4.h); prometheus/procfs names them the other way round",
    },
    Known {
        name: "node_nfs_requests_total",
        labels: &[("proto", "4"), ("method", "GetDeviceInfo")],
        diff: Diff::Value,
        reason: "the same NFSv4 op-order quirk, other side",
    },
    Known {
        name: "node_nfs_requests_total",
        labels: &[("proto", "4")],
        diff: Diff::OnlyTheirs,
        reason: "this kernel's proc4 line has 48 counters; node_exporter pads the operations it \
                 knows beyond them with 0, the agent reports only what the kernel counted",
    },
    Known {
        name: "node_nfsd_requests_total",
        labels: &[("method", "Null")],
        diff: Diff::OnlyOurs,
        reason: "node_exporter leaves out the NULL procedure of NFSv2/v3",
    },
    Known {
        name: "node_nfsd_requests_total",
        labels: &[("proto", "4")],
        diff: Diff::OnlyOurs,
        reason: "node_exporter reports NFSv4 server operations 3-39 without PUTPUBFH/PUTROOTFH; \
                 the agent reports every operation the kernel counts (up to NFSv4.2)",
    },
    Known {
        name: "node_mountstats_nfs_operations_queue_time_seconds_total",
        labels: &[("operation", "ACCESS")],
        diff: Diff::Value,
        reason: "a counter near 2^64 ms: node_exporter takes such counters modulo 2^53 \
                 (float64's mantissa) before dividing; the agent keeps the nearest f64 of the \
                 whole u64",
    },
    Known {
        name: "node_network_*",
        labels: &[("device", "*lo")],
        diff: Diff::OnlyOurs,
        reason: "node_exporter's end-to-end run limits netdev to lo \
                 (--collector.netdev.device-include=lo); the agent reports every device",
    },
];

fn matches(k: &Known, name: &str, labels: &Labels) -> bool {
    let name_ok = match k.name.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => k.name == name,
    };
    name_ok
        && k.labels.iter().all(|(l, v)| match v.strip_prefix('*') {
            Some(not) => labels.get(*l).map(String::as_str) != Some(not),
            None => labels.get(*l).map(String::as_str) == Some(*v),
        })
}

/// Sources keep names, label sets and open files from cycle to cycle: a
/// later cycle over the same unchanged tree must report exactly what the
/// first did (the per-interval ratios, which need two cycles, aside), and
/// what leaves the tree must leave the samples.
#[test]
fn later_cycles_report_what_the_first_did_and_forget_what_went_away() {
    let names = ["net", "nfs", "nfsd", "zfs"];
    let only: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let key = |s: &Sample| (s.name.to_string(), Labels::from(s.labels.clone()));
    let set = |c: &Cycle| -> BTreeMap<(String, Labels), u64> {
        c.samples
            .iter()
            .filter(|s| s.name != "vitals_source_duration_seconds")
            .map(|s| (key(s), s.value.to_bits()))
            .collect()
    };
    let mut sources = Sources::new(&tree_config("node_exporter"), &only).unwrap();
    let first = sources.collect();
    let second = sources.collect();
    let third = sources.collect();
    let (first, second, third) = (set(&first), set(&second), set(&third));
    assert!(first.len() > 900, "{}", first.len());
    let mut added = BTreeSet::new();
    for (k, v) in &second {
        match first.get(k) {
            Some(w) => assert_eq!(v, w, "{k:?} changed between cycles"),
            None => {
                added.insert(k.0.as_str());
            }
        }
    }
    assert!(
        first.keys().all(|k| second.contains_key(k)),
        "a series went missing in the second cycle"
    );
    assert_eq!(
        added,
        BTreeSet::from([
            "node_network_receive_utilization_ratio",
            "node_network_transmit_utilization_ratio"
        ]),
        "only the per-interval ratios are new in the second cycle"
    );
    assert_eq!(second, third, "the third cycle repeats the second");

    // A tree that loses a device, a mount's operations and a pool.
    let dir = tempfile::tempdir().unwrap();
    let proc = dir.path().join("proc");
    fs::create_dir_all(proc.join("net")).unwrap();
    fs::create_dir_all(proc.join("spl/kstat/zfs/tank")).unwrap();
    let dev = proc.join("net/dev");
    let netdev = read(&fixture("node_exporter/proc/net/dev"));
    fs::write(&dev, &netdev).unwrap();
    fs::write(proc.join("spl/kstat/zfs/tank/state"), "ONLINE\n").unwrap();
    let cfg = config(&proc, &dir.path().join("sys"));
    let mut sources = Sources::new(&cfg, &["net".to_string(), "zfs".to_string()]).unwrap();
    let before = sources.collect();
    let has = |c: &Cycle, name: &str, label: (&str, &str)| {
        c.samples
            .iter()
            .any(|s| s.name == name && s.labels.get(label.0).map(String::as_str) == Some(label.1))
    };
    assert!(has(
        &before,
        "node_network_receive_bytes_total",
        ("device", "eth0")
    ));
    assert!(has(&before, "node_zfs_zpool_state", ("zpool", "tank")));
    // Rewritten in place (the source keeps the file open) without eth0.
    let without: String = netdev
        .lines()
        .filter(|l| !l.trim_start().starts_with("eth0:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, netdev);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&dev)
        .unwrap();
    std::io::Write::write_all(&mut f, without.as_bytes()).unwrap();
    drop(f);
    fs::remove_dir_all(proc.join("spl/kstat/zfs/tank")).unwrap();
    for _ in 0..2 {
        let after = sources.collect();
        assert!(!has(
            &after,
            "node_network_receive_bytes_total",
            ("device", "eth0")
        ));
        assert!(has(
            &after,
            "node_network_receive_bytes_total",
            ("device", "tun0")
        ));
        assert!(!has(&after, "node_zfs_zpool_state", ("zpool", "tank")));
    }
}

#[test]
fn golden_node_exporter_e2e_output() {
    let mut cfg = tree_config("node_exporter");
    // node_exporter's end-to-end flags: --collector.netclass.ignored-devices=(dmz|int).
    cfg.sources.net.exclude = vec!["dmz".into(), "int".into()];
    let ours: BTreeMap<(String, Labels), f64> = collect_ok(&cfg, &["net", "nfs", "nfsd", "zfs"])
        .into_iter()
        .filter(|s| !s.name.starts_with("vitals_"))
        .map(|s| ((s.name.into(), s.labels.into()), s.value))
        .collect();
    let theirs = parse_prom(&read(&fixture("node_exporter/e2e-output.txt")));
    let our_names: BTreeSet<&String> = ours.keys().map(|(n, _)| n).collect();
    let their_names: BTreeSet<&String> = theirs.keys().map(|(n, _)| n).collect();
    let shared: BTreeSet<&String> = our_names.intersection(&their_names).copied().collect();
    assert!(
        shared.len() > 300,
        "only {} shared metric names",
        shared.len()
    );

    let mut unexplained = Vec::new();
    let mut used = vec![0usize; KNOWN.len()];
    let mut compared = 0;
    let mut note = |name: &str, labels: &Labels, diff: Diff, detail: String| match KNOWN
        .iter()
        .position(|k| k.diff == diff && matches(k, name, labels))
    {
        Some(i) => used[i] += 1,
        None => unexplained.push(format!("{diff:?} {name}{labels:?}: {detail}")),
    };
    for name in &shared {
        for ((n, labels), want) in theirs.range(((*name).clone(), Labels::new())..) {
            if n != *name {
                break;
            }
            match ours.get(&(n.clone(), labels.clone())) {
                Some(got) if got == want => compared += 1,
                Some(got) => note(
                    n,
                    labels,
                    Diff::Value,
                    format!("ours {got}, node_exporter {want}"),
                ),
                None => note(n, labels, Diff::OnlyTheirs, format!("node_exporter {want}")),
            }
        }
        for ((n, labels), got) in ours.range(((*name).clone(), Labels::new())..) {
            if n != *name {
                break;
            }
            if !theirs.contains_key(&(n.clone(), labels.clone())) {
                note(n, labels, Diff::OnlyOurs, format!("ours {got}"));
            }
        }
    }
    assert!(
        unexplained.is_empty(),
        "{} unexplained differences:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
    for (k, n) in KNOWN.iter().zip(&used) {
        assert!(
            *n > 0,
            "listed difference no longer happens: {} {:?} ({})",
            k.name,
            k.labels,
            k.reason
        );
    }
    assert!(compared > 500, "only {compared} samples compared equal");
    // For the record (`--no-capture`): what was compared, what differs on
    // purpose, and the names only one side has in the families both cover.
    eprintln!(
        "{compared} samples equal across {} shared metric names",
        shared.len()
    );
    for (k, n) in KNOWN.iter().zip(&used) {
        eprintln!(
            "  {n:3} × {:?} {} {:?}: {}",
            k.diff, k.name, k.labels, k.reason
        );
    }
    let families = [
        "node_network_",
        "node_infiniband_",
        "node_mountstats_",
        "node_nfs_",
        "node_nfsd_",
        "node_zfs_",
    ];
    let in_family = |n: &&&String| families.iter().any(|f| n.starts_with(f));
    let only_theirs: Vec<&&String> = their_names
        .difference(&our_names)
        .filter(in_family)
        .collect();
    let only_ours: Vec<&&String> = our_names
        .difference(&their_names)
        .filter(in_family)
        .collect();
    eprintln!("names only node_exporter emits: {only_theirs:?}");
    eprintln!("names only the agent emits: {only_ours:?}");
}

// ------------------------------------------------- arbitrary input

mod arbitrary {
    use proptest::prelude::*;
    use vitals_agent::sources::net::netdev::parse_net_dev;
    use vitals_agent::sources::nfs::mountstats::parse_mountstats;
    use vitals_agent::sources::nfsd::parse_nfsd;
    use vitals_agent::sources::zfs::kstat::parse_kstat;
    use vitals_agent::sources::zfs::zpool::{
        LIST_COLUMNS, parse_snapshots, parse_zpool_list, parse_zpool_status,
    };

    use super::{DATA, fixture, read};

    /// Every parser, on one input: none may panic; each answers Ok or Err.
    fn all_parsers(text: &str) {
        let _ = parse_mountstats(text);
        let _ = parse_kstat(text);
        let _ = parse_net_dev(text);
        let _ = parse_nfsd(text);
        let _ = parse_zpool_status(text);
        let _ = parse_zpool_list(text, LIST_COLUMNS);
        let _ = parse_snapshots(text);
        let _ = vitals_agent::sources::nfs::rpc::parse_client_rpc(text);
        let _ = vitals_agent::sources::nfs::mountstats::parse_mountinfo_addrs(text);
        let _ = vitals_agent::sources::zfs::zpool::parse_scan(text);
    }

    fn seeds() -> Vec<String> {
        [
            "node_exporter/proc/10/mountstats",
            "procfs/proc/26231/mountstats",
            "node_exporter/proc/spl/kstat/zfs/arcstats",
            "node_exporter/proc/spl/kstat/zfs/poolz1/io",
            "node_exporter/proc/spl/kstat/zfs/pool3/objset-2",
            "node_exporter/proc/net/dev",
            "node_exporter/proc/net/rpc/nfsd",
            "node_exporter/proc/net/rpc/nfs",
        ]
        .iter()
        .map(|p| read(&fixture(p)))
        .chain(
            [
                "openzfs-2.1-status-resilver.txt",
                "openzfs-2.2-status-p-scrub.txt",
                "zfs-fuse-status-degraded.txt",
            ]
            .iter()
            .map(|f| read(&std::path::Path::new(DATA).join("zpool").join(f))),
        )
        .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            all_parsers(&String::from_utf8_lossy(&bytes));
        }

    }

    proptest! {
        // Generating printable Unicode is slow; fewer, shorter cases.
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
        #[test]
        fn arbitrary_strings_never_panic(text in "\\PC{0,800}") {
            all_parsers(&text);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// Real files with bytes overwritten, lines cut and duplicated:
        /// close to valid, which is where parsers break.
        #[test]
        fn damaged_real_files_never_panic(
            seed in 0usize..11,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..24),
        ) {
            let seeds = seeds();
            let mut bytes = seeds[seed % seeds.len()].clone().into_bytes();
            for (at, byte, kind) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match kind {
                    0 => bytes[i] = byte,
                    1 => bytes.truncate(i),
                    2 => { let tail = bytes[i..].to_vec(); bytes.extend_from_slice(&tail[..tail.len().min(200)]); }
                    _ => { bytes.insert(i, b"\t\n :0123456789-"[usize::from(byte) % 15]); }
                }
            }
            all_parsers(&String::from_utf8_lossy(&bytes));
        }
    }
}

/// Copies a directory tree (regular files and directories only).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            copy_tree(&entry.path(), &target);
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

// ------------------------------------------------- a real zfs-fuse pool

/// The first of `candidates` that exists.
fn program(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

fn sh(program: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()))
}

/// A zfs-fuse daemon (started here unless one already runs, and then
/// stopped by its PID) and a pool of file vdevs, destroyed on drop.
struct ZfsFusePool {
    zpool: PathBuf,
    name: String,
    dir: tempfile::TempDir,
    daemon_pid: Option<String>,
}

impl ZfsFusePool {
    fn start() -> ZfsFusePool {
        let zpool = program(&["/usr/sbin/zpool", "/sbin/zpool"])
            .expect("VITALS_TEST_ZFS_FUSE=1 but no zpool program: apt-get install zfs-fuse");
        let daemon = program(&["/usr/sbin/zfs-fuse", "/sbin/zfs-fuse"])
            .expect("VITALS_TEST_ZFS_FUSE=1 but no zfs-fuse daemon: apt-get install zfs-fuse");
        let dir = tempfile::tempdir().unwrap();
        let mut daemon_pid = None;
        if !sh(&zpool, &["list"]).status.success() {
            let pidfile = dir.path().join("zfs-fuse.pid");
            let out = std::process::Command::new(&daemon)
                .arg("--pidfile")
                .arg(&pidfile)
                .arg("--no-kstat-mount")
                .output()
                .unwrap();
            assert!(out.status.success(), "zfs-fuse did not start: {out:?}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !sh(&zpool, &["list"]).status.success() {
                assert!(
                    Instant::now() < deadline,
                    "zfs-fuse does not answer zpool list"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            daemon_pid = fs::read_to_string(&pidfile)
                .ok()
                .map(|p| p.trim().to_string());
        }
        let name = format!("vitalstest{}", std::process::id());
        let mut args = vec![
            "create".to_string(),
            "-m".into(),
            "none".into(),
            name.clone(),
            "raidz2".into(),
        ];
        for i in 0..5 {
            let f = dir.path().join(format!("vdev{i}"));
            fs::File::create(&f).unwrap().set_len(64 << 20).unwrap();
            if i == 4 {
                args.push("log".into());
            }
            args.push(f.display().to_string());
        }
        let pool = ZfsFusePool {
            zpool,
            name,
            dir,
            daemon_pid,
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = sh(&pool.zpool, &args);
        assert!(out.status.success(), "zpool create: {out:?}");
        pool
    }

    fn vdev(&self, i: usize) -> String {
        self.dir
            .path()
            .join(format!("vdev{i}"))
            .display()
            .to_string()
    }
}

impl Drop for ZfsFusePool {
    fn drop(&mut self) {
        let _ = sh(&self.zpool, &["destroy", "-f", &self.name]);
        if let Some(pid) = &self.daemon_pid {
            let _ = std::process::Command::new("kill").arg(pid).status();
            // It takes a moment to unmount and exit; the next run may start another.
            let deadline = Instant::now() + Duration::from_secs(15);
            while Path::new("/proc").join(pid).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Collects until `ready` holds for the samples (zfs-fuse applies a change
/// within a moment), or fails after ten seconds.
fn collect_until(
    sources: &mut Sources,
    what: &str,
    ready: impl Fn(&[Sample]) -> bool,
) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cycle = sources.collect();
        assert_eq!(cycle.reports[0].status, "ok", "{:?}", cycle.reports[0]);
        if ready(&cycle.samples) {
            return cycle.samples;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {what}: {:#?}",
            cycle.samples
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn zfs_fuse_raidz2_pool_goes_degraded_when_a_vdev_is_offline() {
    if std::env::var("VITALS_TEST_ZFS_FUSE").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED zfs_fuse_raidz2_pool_goes_degraded_when_a_vdev_is_offline: needs root and \
             zfs-fuse; set VITALS_TEST_ZFS_FUSE=1 to run it (.ci/run does, and there it must pass)"
        );
        return;
    }
    let pool = ZfsFusePool::start();
    let empty = tempfile::tempdir().unwrap();
    let mut cfg = config(&empty.path().join("proc"), &empty.path().join("sys"));
    cfg.sources.zfs.commands = true;
    cfg.sources.zfs.zpool = pool.zpool.clone();
    cfg.sources.zfs.zfs = pool.zpool.with_file_name("zfs");
    let mut sources = Sources::new(&cfg, &["zfs".to_string()]).unwrap();
    let name = pool.name.clone();
    let name2 = pool.name.clone();
    let state = move |s: &[Sample], st: &str| {
        s.iter()
            .find(|x| {
                x.name == "node_zfs_zpool_state"
                    && x.labels.get("zpool") == Some(&name)
                    && x.labels.get("state").map(String::as_str) == Some(st)
            })
            .map(|x| x.value)
    };
    let vdev_state = |s: &[Sample], vdev: &str, st: &str| {
        value(
            s,
            "node_zfs_zpool_vdev_state",
            &[
                ("zpool", pool.name.as_str()),
                ("vdev", vdev),
                ("class", "data"),
                ("state", st),
            ],
        )
    };

    let s = collect_until(&mut sources, "the pool ONLINE", |s| {
        state(s, "online") == Some(1.0)
    });
    assert_eq!(state(&s, "degraded"), Some(0.0));
    assert_eq!(vdev_state(&s, "raidz2-0", "online"), 1.0);
    assert_eq!(vdev_state(&s, &pool.vdev(1), "online"), 1.0);
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_vdev_state",
            &[
                ("zpool", pool.name.as_str()),
                ("vdev", &pool.vdev(4)),
                ("class", "log"),
                ("state", "online")
            ]
        ),
        1.0
    );
    let size = value(
        &s,
        "node_zfs_zpool_size_bytes",
        &[("zpool", pool.name.as_str())],
    );
    assert!(
        size > 200.0 * 1024.0 * 1024.0,
        "raidz2 over 4 × 64 MiB: {size}"
    );
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_success",
            &[("command", "zpool status")]
        ),
        1.0
    );

    // A snapshot: zfs-fuse's `zfs` has no `-p`, so its age comes from the
    // dated form (to the minute).
    let zfs = pool.zpool.with_file_name("zfs");
    let snapshot = format!("{}@vitals", pool.name);
    let out = sh(&zfs, &["snapshot", &snapshot]);
    assert!(out.status.success(), "zfs snapshot: {out:?}");
    let ds = [
        ("zpool", pool.name.as_str()),
        ("dataset", pool.name.as_str()),
    ];
    let s = collect_until(&mut sources, "the snapshot", |s| {
        s.iter().any(|x| {
            x.name == "node_zfs_dataset_snapshots" && x.labels.get("zpool") == Some(&name2)
        })
    });
    assert_eq!(
        value(
            &s,
            "vitals_zfs_command_success",
            &[("command", "zfs list snapshots")]
        ),
        1.0
    );
    assert_eq!(value(&s, "node_zfs_dataset_snapshots", &ds), 1.0);
    let age = value(&s, "node_zfs_dataset_newest_snapshot_age_seconds", &ds);
    assert!(
        (0.0..180.0).contains(&age),
        "a snapshot taken just now is at most a few minutes old: {age}"
    );
    let taken = value(
        &s,
        "node_zfs_dataset_newest_snapshot_timestamp_seconds",
        &ds,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        taken <= now && now - taken < 180.0 && taken % 60.0 == 0.0,
        "to the minute, just before now ({now}): {taken}"
    );

    let out = sh(&pool.zpool, &["offline", &pool.name, &pool.vdev(1)]);
    assert!(out.status.success(), "zpool offline: {out:?}");
    let s = collect_until(&mut sources, "the pool DEGRADED", |s| {
        state(s, "degraded") == Some(1.0)
    });
    assert_eq!(state(&s, "online"), Some(0.0));
    assert_eq!(vdev_state(&s, "raidz2-0", "degraded"), 1.0);
    assert_eq!(vdev_state(&s, &pool.vdev(1), "offline"), 1.0);
    assert_eq!(vdev_state(&s, &pool.vdev(0), "online"), 1.0);

    let out = sh(&pool.zpool, &["scrub", &pool.name]);
    assert!(out.status.success(), "zpool scrub: {out:?}");
    let scrubbed = |s: &[Sample]| {
        s.iter().any(|x| {
            x.name == "node_zfs_zpool_scan_info"
                && x.labels.get("zpool") == Some(&pool.name)
                && x.labels.get("function").map(String::as_str) == Some("scrub")
                && x.labels.get("state").map(String::as_str) == Some("finished")
        })
    };
    let s = collect_until(&mut sources, "a finished scrub", scrubbed);
    assert_eq!(
        value(
            &s,
            "node_zfs_zpool_scan_errors",
            &[("zpool", pool.name.as_str()), ("function", "scrub")]
        ),
        0.0
    );
}

#[test]
fn the_readme_agent_config_parses_with_every_source_table() {
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"));
    let start = readme
        .find("`/etc/vitals/agent.toml`:\n\n```toml\n")
        .unwrap();
    let body = &readme[start..];
    let body = &body[body.find("```toml\n").unwrap() + 8..];
    let toml = &body[..body.find("```").unwrap()];
    let cfg: RawConfig = vitals_common::config::parse(Path::new("README.md"), toml)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.sources.net.exclude, ["lo", "veth*", "docker*"]);
    assert_eq!(cfg.sources.net.expected_speed_mbps["ens*"], 100_000);
    assert_eq!(cfg.sources.zfs.command_timeout, Duration::from_secs(5));
    assert_eq!(cfg.sources.zfs.zpool, Path::new("/usr/sbin/zpool"));
    assert!(cfg.sources.zfs.commands);
    assert_eq!(
        cfg.sources.gpu.backend,
        vitals_agent::sources::gpu::BackendKind::Auto
    );
    assert_eq!(cfg.sources.gpu.timeout, Duration::from_secs(2));
    assert_eq!(cfg.sources.gpu.library, None);
    // And the defaults are what it shows.
    assert_eq!(
        RawConfig::default().sources.gpu.timeout,
        cfg.sources.gpu.timeout
    );
    assert!(RawConfig::default().sources.gpu.processes && cfg.sources.gpu.processes);
    let d = RawConfig::default();
    assert_eq!(d.sources.net.exclude, cfg.sources.net.exclude);
    assert_eq!(d.sources.zfs.zfs, cfg.sources.zfs.zfs);
    assert_eq!(cfg.sources.slurm.squeue, None);
    assert_eq!(
        d.sources.slurm.command_timeout,
        cfg.sources.slurm.command_timeout
    );
    assert_eq!(cfg.sources.kmsg.start, d.sources.kmsg.start);
    assert_eq!(cfg.sources.kmsg.max_lines, d.sources.kmsg.max_lines);
    assert_eq!(cfg.sources.kmsg.max_bytes, d.sources.kmsg.max_bytes);
    assert!(cfg.sources.kmsg.default_patterns && cfg.sources.kmsg.patterns.is_empty());
    // The mesh and net-test tables show their defaults too.
    assert_eq!(cfg.sources.mesh.interval, d.sources.mesh.interval);
    assert_eq!(cfg.sources.mesh.timeout, d.sources.mesh.timeout);
    assert_eq!(cfg.sources.mesh.count, d.sources.mesh.count);
    assert_eq!(cfg.sources.mesh.peers[0].port, Some(2049));
    assert_eq!(cfg.net_test.max_bytes, d.net_test.max_bytes);
    assert_eq!(cfg.net_test.max_duration, d.net_test.max_duration);
    assert_eq!(cfg.net_test.listen, None);
}

// ---------------------------------------------------------------- slurm

mod slurm {
    use super::*;
    use vitals_agent::sources::slurm::hostlist;
    use vitals_agent::sources::slurm::parse::{
        Job, Node, parse_duration, parse_sinfo_json, parse_sinfo_text, parse_squeue_json,
        parse_squeue_text,
    };

    fn slurm(path: &str) -> String {
        read(&fixture(&format!("slurm/{path}")))
    }

    fn job(jobs: &[Job], id: u64) -> &Job {
        jobs.iter()
            .find(|j| j.id == id)
            .unwrap_or_else(|| panic!("no job {id}"))
    }

    fn node<'a>(nodes: &'a [Node], name: &str) -> &'a Node {
        nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    #[test]
    fn squeue_json_21_08_plain_values_and_state_string() {
        let jobs = parse_squeue_json(&slurm("slurm-21.08-cli/squeue_out.json")).unwrap();
        assert_eq!(jobs.len(), 2);
        let j = job(&jobs, 26515966);
        assert_eq!(
            (j.name.as_str(), j.user.as_str(), j.account.as_str()),
            ("job_name", "bkd", "account1")
        );
        assert_eq!(
            (j.partition.as_str(), j.state.as_str()),
            ("hw-l", "RUNNING")
        );
        assert_eq!(j.reason, None);
        assert_eq!(j.nodes, ["cs75"]);
        assert_eq!(j.gpus, 0);
        assert_eq!((j.array_job_id, j.array_task_id), (None, None));
        assert_eq!(j.submit_time, Some(1684114900));
        assert_eq!(j.start_time, Some(1684114921));
        assert_eq!(j.time_limit_seconds, Some(30240 * 60));
        assert_eq!(j.stdout.as_deref(), Some("/nfs/user/stdout.log"));
        assert_eq!(j.stderr.as_deref(), Some("/nfs/user/stderr.log"));
        // The second job mixes in the newer number objects.
        let j = job(&jobs, 58948420);
        assert_eq!(
            (j.state.as_str(), j.reason.as_deref()),
            ("PENDING", Some("Dependency"))
        );
        assert_eq!((j.array_job_id, j.array_task_id), (Some(58948420), None));
        assert_eq!(j.start_time, None);
        assert_eq!(j.time_limit_seconds, Some(1439 * 60));
        assert!(j.nodes.is_empty());
    }

    #[test]
    fn squeue_json_24_05_objects_state_lists_and_gpus() {
        let jobs = parse_squeue_json(&slurm("slurm-24.05-rest/slurm-jobs.json")).unwrap();
        assert_eq!(jobs.len(), 14);
        let j = job(&jobs, 649717);
        assert_eq!((j.user.as_str(), j.state.as_str()), ("ksoto", "TIMEOUT"));
        assert_eq!(j.reason.as_deref(), Some("TimeLimit"));
        assert_eq!(
            (j.submit_time, j.start_time),
            (Some(1747754465), Some(1747754466))
        );
        assert_eq!(j.time_limit_seconds, Some(60));
        assert_eq!(j.stdout.as_deref(), Some("/home/ksoto/slurm-649717.out"));
        let j = job(&jobs, 649728);
        assert_eq!((j.user.as_str(), j.state.as_str()), ("crich", "RUNNING"));
        assert_eq!(j.nodes, ["cn004", "cn005", "cn006"]);
        assert_eq!(job(&jobs, 649719).state, "FAILED");
        let states: Vec<&str> = jobs.iter().map(|j| j.state.as_str()).collect();
        assert_eq!(states.iter().filter(|s| **s == "COMPLETED").count(), 8);
        assert_eq!(states.iter().filter(|s| **s == "RUNNING").count(), 3);

        let j = &parse_squeue_json(&slurm("slurm-24.05-rest/slurm-job-gpus-multi-nodes.json"))
            .unwrap()[0];
        assert_eq!(
            (j.id, j.user.as_str(), j.partition.as_str()),
            (11, "jthomas", "gpu")
        );
        assert_eq!(j.nodes, ["gpu1", "gpu2"]);
        assert_eq!(j.gpus, 8, "4 H100 on each of the two nodes (gres_detail)");
        let j =
            &parse_squeue_json(&slurm("slurm-24.05-rest/slurm-job-gpus-running.json")).unwrap()[0];
        assert_eq!(
            (j.id, j.gpus, j.nodes.as_slice()),
            (9, 4, &["gpu1".to_string()][..])
        );
        let j = &parse_squeue_json(&slurm("slurm-24.05-rest/slurm-job-pending.json")).unwrap()[0];
        assert_eq!((j.id, j.state.as_str()), (649730, "PENDING"));
        assert_eq!((j.reason.as_deref(), j.gpus), (Some("BeginTime"), 0));
        assert!(j.nodes.is_empty());
        for (file, id, state) in [
            ("slurm-job-running.json", 649722, "RUNNING"),
            ("slurm-job-completed.json", 649718, "COMPLETED"),
        ] {
            let j = &parse_squeue_json(&slurm(&format!("slurm-24.05-rest/{file}"))).unwrap()[0];
            assert_eq!(
                (j.id, j.state.as_str(), j.nodes.as_slice()),
                (id, state, &["cn001".to_string()][..])
            );
        }
    }

    #[test]
    fn slurmdbd_accounting_records_are_refused_by_name() {
        for file in [
            "slurmdb-job-completed.json",
            "slurmdb-job-failed.json",
            "slurmdb-job-gpus-completed.json",
            "slurmdb-job-running.json",
        ] {
            let e = parse_squeue_json(&slurm(&format!("slurm-24.05-rest/{file}"))).unwrap_err();
            assert!(
                e.message.contains("slurmdbd accounting record"),
                "{file}: {e}"
            );
        }
    }

    #[test]
    fn sinfo_json_both_shapes() {
        let nodes = parse_sinfo_json(&slurm("slurm-21.08-cli/sinfo_out.json")).unwrap();
        assert_eq!(nodes.len(), 4);
        let n = node(&nodes, "cs2.example.company.com");
        assert_eq!(n.states, ["mixed"]);
        assert_eq!(
            (n.cpus, n.cpus_allocated, n.gpus),
            (Some(64), Some(4), None)
        );
        assert_eq!(n.partitions, ["hw"]);
        assert_eq!(node(&nodes, "cs3.example.company.com").states, ["idle"]);
        assert_eq!(
            node(&nodes, "cs4.example.company.com").states,
            ["allocated"]
        );
        assert_eq!(node(&nodes, "cs5.example.company.com").states, ["down"]);

        let nodes = parse_sinfo_json(&slurm("slurm-24.05-rest/slurm-nodes.json")).unwrap();
        assert_eq!(nodes.len(), 100);
        assert!(nodes.iter().all(|n| n.states == ["idle"]));
        let n = node(&nodes, "cn001");
        assert_eq!(
            (n.cpus, n.cpus_allocated, n.reason.as_deref()),
            (Some(64), Some(0), None)
        );
        assert_eq!(node(&nodes, "cn100").partitions, ["interactive"]);
    }

    #[test]
    fn node_flags_gres_and_reasons_in_both_shapes() {
        let old = r#"{"nodes": [{"name": "gpu01", "state": "mixed", "state_flags": ["DRAIN"],
            "reason": "bad DIMM", "cpus": 128, "alloc_cpus": 64, "gres": "gpu:mi100:8(S:0-1)"}]}"#;
        let new = r#"{"nodes": [{"name": "gpu01", "state": ["MIXED", "DRAIN"],
            "reason": "bad DIMM", "cpus": 128, "alloc_cpus": 64,
            "gres": "gpu:mi100:4(S:0),gpu:mi100:4(S:1),shard:8"}]}"#;
        for doc in [old, new] {
            let n = &parse_sinfo_json(doc).unwrap()[0];
            assert_eq!(n.states, ["mixed", "drain"]);
            assert_eq!((n.reason.as_deref(), n.gpus), (Some("bad DIMM"), Some(8)));
        }
    }

    #[test]
    fn squeue_text_in_the_sources_format() {
        let text = "\
123|123|N/A|alice|ml|gpu|RUNNING|None|gpu[01-02]|gres/gpu:4|1700000000|1700000100|1-00:00:00|train llama | 7b
124|120|3|bob|ml|gpu|PENDING|Resources||gpu:mi100:2|1700000200|N/A|UNLIMITED|sweep
";
        let jobs = parse_squeue_text(text).unwrap();
        let j = job(&jobs, 123);
        assert_eq!(
            j.name, "train llama | 7b",
            "the name is last and may hold the separator"
        );
        assert_eq!(
            (j.user.as_str(), j.account.as_str(), j.state.as_str()),
            ("alice", "ml", "RUNNING")
        );
        assert_eq!(j.nodes, ["gpu01", "gpu02"]);
        assert_eq!(j.gpus, 8, "4 per node on two nodes");
        assert_eq!(
            (j.submit_time, j.start_time),
            (Some(1700000000), Some(1700000100))
        );
        assert_eq!(j.time_limit_seconds, Some(86_400));
        assert_eq!(
            (j.array_job_id, j.array_task_id, j.reason.as_deref()),
            (None, None, None)
        );
        // %A is numeric for every array task; `%i`'s "124_3" form is refused.
        let e = parse_squeue_text("124_3|120|3|bob|ml|gpu|PENDING|Resources||N/A|1|N/A|5|x\n")
            .unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("job id"), "{e}");

        let j = job(&jobs, 124);
        assert_eq!((j.array_job_id, j.array_task_id), (Some(120), Some(3)));
        assert_eq!(
            (j.gpus, j.time_limit_seconds, j.start_time),
            (0, None, None)
        );
        assert_eq!(j.reason.as_deref(), Some("Resources"));
    }

    #[test]
    fn squeue_text_fixture_one_json_object_per_line() {
        let text = slurm("slurm-21.08-cli/squeue_fallback.txt");
        // The capture ends with two deliberately broken lines (`"cpu": xx`).
        let e = parse_squeue_text(&text).unwrap_err();
        assert_eq!(e.line, 8, "{e}");
        assert!(e.message.contains("not valid JSON"), "{e}");
        let good: String = text.lines().take(6).map(|l| format!("{l}\n")).collect();
        let jobs = parse_squeue_text(&good).unwrap();
        assert_eq!(jobs.len(), 6);
        let j = job(&jobs, 26515966);
        assert_eq!(
            (j.account.as_str(), j.partition.as_str(), j.state.as_str()),
            ("account1", "hw-h", "RUNNING")
        );
        assert_eq!(j.nodes, ["cs10"]);
        let j = job(&jobs, 51447052);
        assert_eq!(j.state, "PENDING");
        assert_eq!(
            j.reason.as_deref(),
            Some("(ReqNodeNotAvail, UnavailableNodes:cs[100,101,102])")
        );
        assert_eq!(job(&jobs, 18804).reason.as_deref(), Some("Priority"));
    }

    #[test]
    fn sinfo_text_fixture_and_the_sources_format() {
        let nodes = parse_sinfo_text(&slurm("slurm-21.08-cli/sinfo_fallback.txt")).unwrap();
        assert_eq!(nodes.len(), 4, "cs25 is listed once per partition");
        let n = node(&nodes, "cs25");
        assert_eq!(n.states, ["allocated"]);
        assert_eq!(n.partitions, ["hw", "hw-l", "hw-m", "hw-h", "cdn"]);
        assert_eq!((n.cpus_allocated, n.cpus), (Some(64), Some(64)));
        assert_eq!(node(&nodes, "cs156").states, ["completing"]);
        assert_eq!(node(&nodes, "cs53").cpus_allocated, Some(52));

        let text = "\
gpu01|mixed+drain|64/64/0/128|gpu:mi100:8(S:0-1)|gpu*|bad DIMM | replaced
gpu02|down*|0/0/128/128|gpu:mi100:8|gpu|Not responding
gpu02|down*|0/0/128/128|gpu:mi100:8|debug|Not responding
cpu01|drained|0/32/0/32|(null)|cpu|maint
";
        let nodes = parse_sinfo_text(text).unwrap();
        let n = node(&nodes, "gpu01");
        assert_eq!(n.states, ["mixed", "drain"]);
        assert_eq!(
            (n.gpus, n.reason.as_deref()),
            (Some(8), Some("bad DIMM | replaced"))
        );
        assert_eq!(
            n.partitions,
            ["gpu"],
            "the default partition's `*` is dropped"
        );
        let n = node(&nodes, "gpu02");
        assert_eq!(n.states, ["down", "not_responding"]);
        assert_eq!(n.partitions, ["gpu", "debug"]);
        let n = node(&nodes, "cpu01");
        assert_eq!(
            (n.states.as_slice(), n.gpus),
            (&["drain".to_string()][..], None)
        );
        let e = parse_sinfo_text("gpu01|idle\n").unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("2 fields"), "{e}");
    }

    #[test]
    fn durations_and_hostlists() {
        for (s, want) in [
            ("UNLIMITED", None),
            ("30", Some(1800)),
            ("30:05", Some(1805)),
            ("1:00:00", Some(3600)),
            ("2-00:00:00", Some(172_800)),
            ("2-3", Some(2 * 86_400 + 3 * 3600)),
        ] {
            assert_eq!(parse_duration(s).unwrap(), want, "{s}");
        }
        assert!(parse_duration("soon").unwrap_err().contains("soon"));
        assert_eq!(
            hostlist::expand("gpu[01-03,07]").unwrap(),
            ["gpu01", "gpu02", "gpu03", "gpu07"]
        );
    }

    #[test]
    fn broken_json_says_where_and_what() {
        let full = slurm("slurm-24.05-rest/slurm-jobs.json");
        for cut in [0, 1, 100, full.len() / 2, full.len() - 2] {
            let e = parse_squeue_json(&full[..cut]).unwrap_err();
            assert!(
                e.message.contains("JSON") || e.message.contains("jobs"),
                "{cut}: {e}"
            );
            if cut > 1 {
                assert!(e.line >= 1, "{cut}: {e}");
            }
        }
        let e = parse_sinfo_json(r#"{"nodes": [{"name": "a"}]}"#).unwrap_err();
        assert!(e.message.contains("nodes[0] (a): no state"), "{e}");
        let e = parse_squeue_json(r#"{"jobs": [{"job_id": 5}]}"#).unwrap_err();
        assert!(e.message.contains("job 5: no job_state"), "{e}");
        let e = parse_squeue_json(
            r#"{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("Unable to contact"), "{e}");
        let e = parse_squeue_json(
            r#"{"jobs": [{"job_id": 5, "job_state": "RUNNING", "nodes": "n[1-"}]}"#,
        )
        .unwrap_err();
        assert!(e.message.contains("without `]`"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = parse_squeue_json(&text);
            let _ = parse_sinfo_json(&text);
            let _ = parse_squeue_text(&text);
            let _ = parse_sinfo_text(&text);
            let _ = hostlist::expand(&text);
            let _ = parse_duration(&text);
        }

        #[test]
        fn truncated_fixtures_never_panic(cut in 0usize..20_000, which in 0usize..4) {
            let file = ["slurm-21.08-cli/squeue_out.json", "slurm-21.08-cli/sinfo_out.json",
                "slurm-24.05-rest/slurm-job-gpus-multi-nodes.json", "slurm-21.08-cli/squeue_fallback.txt"][which];
            let full = slurm(file);
            let mut cut = cut.min(full.len());
            while !full.is_char_boundary(cut) { cut -= 1; }
            let _ = parse_squeue_json(&full[..cut]);
            let _ = parse_sinfo_json(&full[..cut]);
            let _ = parse_squeue_text(&full[..cut]);
            let _ = parse_sinfo_text(&full[..cut]);
        }
    }

    /// Fake `squeue` and `sinfo`: shell scripts printing what `squeue.out`
    /// and `sinfo.out` in their directory hold, as the JSON form, or (with
    /// `json = false`) refusing `--json` as an old SLURM does.
    struct FakeSlurm {
        dir: tempfile::TempDir,
    }

    impl FakeSlurm {
        fn new(json: bool) -> FakeSlurm {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            for name in ["squeue", "sinfo"] {
                let path = dir.path().join(name);
                let refuse = if json {
                    String::new()
                } else {
                    format!(
                        "[ \"$1\" = --json ] && {{ echo \"{name}: unrecognized option '--json'\" >&2; exit 2; }}\n"
                    )
                };
                fs::write(
                    &path,
                    format!(
                        "#!/bin/sh\n{refuse}[ \"$SLURM_TIME_FORMAT\" = %s ] || exit 9\necho \"$@\" > {d}/{name}.args\ncat {d}/{name}.out\n",
                        d = dir.path().display()
                    ),
                )
                .unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
            }
            FakeSlurm { dir }
        }

        fn put(&self, name: &str, body: &str) {
            fs::write(self.dir.path().join(format!("{name}.out")), body).unwrap();
        }

        fn args(&self, name: &str) -> String {
            read(&self.dir.path().join(format!("{name}.args")))
        }

        fn config(&self) -> RawConfig {
            let mut cfg = config(&self.dir.path().join("proc"), &self.dir.path().join("sys"));
            cfg.sources.slurm.squeue = Some(self.dir.path().join("squeue"));
            cfg.sources.slurm.sinfo = Some(self.dir.path().join("sinfo"));
            cfg.sources.slurm.command_timeout = Duration::from_secs(20);
            cfg.interval = Duration::from_secs(40);
            cfg
        }
    }

    #[test]
    fn source_runs_squeue_and_sinfo_json_and_reports_state_changes_as_events() {
        let fake = FakeSlurm::new(true);
        let jobs = slurm("slurm-24.05-rest/slurm-jobs.json");
        fake.put("squeue", &jobs);
        fake.put("sinfo", &slurm("slurm-21.08-cli/sinfo_out.json"));
        let mut sources = Sources::new(&fake.config(), &["slurm".to_string()]).unwrap();
        let cycle = sources.collect();
        assert_eq!(
            cycle.reports[0].status, "ok",
            "{:?}",
            cycle.reports[0].error
        );
        assert!(cycle.events.is_empty(), "no events on first sight");
        assert_eq!(fake.args("squeue").trim(), "--json");
        let s = &cycle.samples;
        let info: Vec<&Sample> = s
            .iter()
            .filter(|s| s.name == "vitals_slurm_job_info")
            .collect();
        assert_eq!(info.len(), 14);
        let l = &info
            .iter()
            .find(|s| s.labels["job_id"] == "649728")
            .unwrap()
            .labels;
        assert_eq!(
            (
                l["user"].as_str(),
                l["account"].as_str(),
                l["partition"].as_str(),
                l["state"].as_str()
            ),
            ("crich", "biology", "batch", "RUNNING")
        );
        assert!(
            !l.contains_key("node"),
            "the agent adds `node`; SLURM's are `slurm_node`"
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_state",
                &[("job_id", "649717"), ("state", "TIMEOUT")]
            ),
            1.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_state",
                &[("job_id", "649717"), ("state", "RUNNING")]
            ),
            0.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_node",
                &[("job_id", "649728"), ("slurm_node", "cn005")]
            ),
            1.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_start_time_seconds",
                &[("job_id", "649728")]
            ),
            1747754493.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_time_limit_seconds",
                &[("job_id", "649728")]
            ),
            120.0
        );
        assert!(
            value(
                s,
                "vitals_slurm_job_runtime_seconds",
                &[("job_id", "649728")]
            ) > 1.0e7
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_jobs",
                &[("state", "COMPLETED"), ("partition", "batch")]
            ),
            8.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_job_gpus",
                &[("job_id", "649728"), ("user", "crich")]
            ),
            0.0
        );
        assert_eq!(count(s, "vitals_slurm_job_runtime_seconds"), 3);
        let cs5 = [("slurm_node", "cs5.example.company.com")];
        assert_eq!(
            value(s, "vitals_slurm_node_state", &[cs5[0], ("state", "down")]),
            1.0
        );
        assert_eq!(
            value(s, "vitals_slurm_node_state", &[cs5[0], ("state", "idle")]),
            0.0
        );
        assert_eq!(value(s, "vitals_slurm_node_cpus", &cs5), 64.0);
        assert_eq!(
            value(s, "vitals_slurm_command_success", &[("command", "squeue")]),
            1.0
        );
        assert_eq!(
            value(
                s,
                "vitals_slurm_command_text_fallback",
                &[("command", "sinfo")]
            ),
            0.0
        );

        // 649722 finishes, 649730 starts: two events, one per change.
        let mut doc: serde_json::Value = serde_json::from_str(&jobs).unwrap();
        for j in doc["jobs"].as_array_mut().unwrap() {
            match j["job_id"].as_u64() {
                Some(649722) => j["job_state"] = serde_json::json!(["FAILED"]),
                Some(649730) => j["job_state"] = serde_json::json!(["RUNNING", "CONFIGURING"]),
                _ => {}
            }
        }
        fake.put("squeue", &doc.to_string());
        let cycle = sources.collect();
        assert_eq!(
            cycle.reports[0].status, "ok",
            "{:?}",
            cycle.reports[0].error
        );
        let mut ev: Vec<(String, String, String, String)> = cycle
            .events
            .iter()
            .map(|e| {
                assert_eq!(e.kind, "slurm_job_state");
                let l = &e.labels;
                (
                    l["job_id"].clone(),
                    l["user"].clone(),
                    l["old_state"].clone(),
                    l["new_state"].clone(),
                )
            })
            .collect();
        ev.sort();
        assert_eq!(
            ev,
            [
                (
                    "649722".into(),
                    "ksoto".into(),
                    "RUNNING".into(),
                    "FAILED".into()
                ),
                (
                    "649730".into(),
                    "tmcgrath".into(),
                    "PENDING".into(),
                    "RUNNING".into()
                ),
            ]
        );
        let failed = cycle
            .events
            .iter()
            .find(|e| e.labels["job_id"] == "649722")
            .unwrap();
        assert_eq!(failed.severity, vitals_proto::v1::Severity::Warning);
        let batch = vitals_agent::cycle::to_batch("head1", 42, &cycle.samples, &cycle.events);
        assert_eq!(batch.events.len(), 2);
        assert!(
            batch
                .events
                .iter()
                .all(|e| e.node == "head1" && e.timestamp_ms == 42)
        );
        // Nothing changed since: no more events.
        assert!(sources.collect().events.is_empty());
    }

    #[test]
    fn source_falls_back_to_the_text_forms_when_json_is_refused() {
        let fake = FakeSlurm::new(false);
        fake.put(
            "squeue",
            "123|123|N/A|alice|ml|gpu|RUNNING|None|gpu[01-02]|gres/gpu:4|1700000000|1700000100|1-00:00:00|train\n",
        );
        fake.put(
            "sinfo",
            "gpu01|mixed+drain|64/64/0/128|gpu:mi100:8|gpu*|bad DIMM\n",
        );
        let s = collect_ok(&fake.config(), &["slurm"]);
        assert_eq!(
            fake.args("squeue").trim(),
            "--noheader --states=all -o %A|%F|%K|%u|%a|%P|%T|%r|%N|%b|%V|%S|%l|%j"
        );
        assert_eq!(
            fake.args("sinfo").trim(),
            "--noheader --Node -o %N|%T|%C|%G|%P|%E"
        );
        assert_eq!(
            value(
                &s,
                "vitals_slurm_command_text_fallback",
                &[("command", "squeue")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                "vitals_slurm_job_gpus",
                &[("job_id", "123"), ("user", "alice")]
            ),
            8.0
        );
        assert_eq!(
            value(
                &s,
                "vitals_slurm_job_time_limit_seconds",
                &[("job_id", "123")]
            ),
            86_400.0
        );
        let g = ("slurm_node", "gpu01");
        assert_eq!(
            value(&s, "vitals_slurm_node_state", &[g, ("state", "drain")]),
            1.0
        );
        assert_eq!(
            value(&s, "vitals_slurm_node_state", &[g, ("state", "mixed")]),
            1.0
        );
        assert_eq!(value(&s, "vitals_slurm_node_gpus", &[g]), 8.0);
        assert_eq!(
            value(
                &s,
                "vitals_slurm_node_info",
                &[g, ("partitions", "gpu"), ("reason", "bad DIMM")]
            ),
            1.0
        );
    }

    #[test]
    fn no_squeue_is_unavailable_and_bad_output_is_an_error() {
        let mut cfg = RawConfig::default();
        cfg.sources.slurm.squeue = Some("/nonexistent/squeue".into());
        let cycle = run(&cfg, &["slurm"]);
        assert_eq!(cycle.reports[0].status, "unavailable");
        assert!(
            cycle.reports[0]
                .error
                .as_ref()
                .unwrap()
                .contains("/nonexistent/squeue")
        );
        assert!(cycle.samples.is_empty());

        let fake = FakeSlurm::new(true);
        fake.put("squeue", "{\"jobs\": [");
        fake.put("sinfo", "{\"nodes\": []}");
        let cycle = run(&fake.config(), &["slurm"]);
        assert_eq!(cycle.reports[0].status, "error");
        let e = cycle.reports[0].error.as_ref().unwrap();
        assert!(e.contains("`squeue` output: line 1: not valid JSON"), "{e}");
    }

    /// slurmrestd's part on a unix socket: answers per request path,
    /// changed between cycles; the jobs answer in chunks, as a server that
    /// streams its JSON sends it.
    struct FakeRestd {
        dir: tempfile::TempDir,
        answers: std::sync::Arc<std::sync::Mutex<BTreeMap<String, (u16, String)>>>,
        heads: std::sync::mpsc::Receiver<String>,
    }

    impl FakeRestd {
        fn start() -> FakeRestd {
            use std::io::{BufRead, BufReader, Write};
            let dir = tempfile::tempdir().unwrap();
            let listener =
                std::os::unix::net::UnixListener::bind(dir.path().join("restd.socket")).unwrap();
            let answers = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::new()));
            let (tx, heads) = std::sync::mpsc::channel();
            let served = answers.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut s) = conn else { return };
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        head.push_str(&line);
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (status, body): (u16, String) = served
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or((404, "no such path".into()));
                    let _ = tx.send(head);
                    let answer = if path.ends_with("/jobs") {
                        let (a, b) = body.split_at(body.len() / 2);
                        format!(
                            "HTTP/1.1 {status} X\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            a.len(),
                            b.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let _ = s.write_all(answer.as_bytes());
                }
            });
            FakeRestd {
                dir,
                answers,
                heads,
            }
        }

        fn put(&self, what: &str, status: u16, body: &str) {
            self.answers
                .lock()
                .unwrap()
                .insert(format!("/slurm/v0.0.40/{what}"), (status, body.to_string()));
        }

        fn config(&self) -> RawConfig {
            let mut cfg = config(&self.dir.path().join("proc"), &self.dir.path().join("sys"));
            let s = &mut cfg.sources.slurm;
            s.restd = Some(format!(
                "unix:{}",
                self.dir.path().join("restd.socket").display()
            ));
            s.restd_api_version = "v0.0.40".into();
            // Never run: the listings come from slurmrestd.
            s.squeue = Some("/nonexistent/squeue".into());
            s.command_timeout = Duration::from_secs(20);
            let token = self.dir.path().join("jwt");
            fs::write(&token, "SLURM_JWT=header.payload.sig\n").unwrap();
            s.restd_token_file = Some(token);
            s.restd_user = Some("vitals".into());
            cfg.sources.joblog.enabled = Some(false);
            cfg.interval = Duration::from_secs(40);
            cfg
        }
    }

    #[test]
    fn source_reads_slurmrestd_and_reports_each_request_and_a_bad_answer() {
        let fake = FakeRestd::start();
        fake.put("jobs", 200, &slurm("slurm-24.05-rest/slurm-jobs.json"));
        fake.put("nodes", 200, &slurm("slurm-24.05-rest/slurm-nodes.json"));
        let mut sources = Sources::new(&fake.config(), &["slurm".to_string()]).unwrap();
        let cycle = sources.collect();
        assert_eq!(
            cycle.reports[0].status, "ok",
            "{:?}",
            cycle.reports[0].error
        );
        let s = &cycle.samples;
        assert_eq!(count(s, "vitals_slurm_job_info"), 14);
        assert!(count(s, "vitals_slurm_node_info") > 0);
        for command in ["slurmrestd jobs", "slurmrestd nodes"] {
            assert_eq!(
                value(s, "vitals_slurm_command_success", &[("command", command)]),
                1.0
            );
        }
        assert_eq!(
            count(s, "vitals_slurm_command_text_fallback"),
            0,
            "commands only"
        );
        let heads: Vec<String> = fake
            .heads
            .try_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        assert_eq!(heads.len(), 2, "{heads:?}");
        for h in &heads {
            assert!(
                h.contains("x-slurm-user-token: header.payload.sig\r\n"),
                "{h}"
            );
            assert!(h.contains("x-slurm-user-name: vitals\r\n"), "{h}");
        }

        // Nodes refused: the jobs still count, the nodes are left out and
        // their request says it failed.
        fake.put("nodes", 403, "Authentication failure");
        let cycle = sources.collect();
        assert_eq!(
            cycle.reports[0].status, "ok",
            "{:?}",
            cycle.reports[0].error
        );
        let s = &cycle.samples;
        assert_eq!(count(s, "vitals_slurm_job_info"), 14);
        assert_eq!(count(s, "vitals_slurm_node_info"), 0);
        assert_eq!(
            value(
                s,
                "vitals_slurm_command_success",
                &[("command", "slurmrestd nodes")]
            ),
            0.0
        );

        // A jobs answer that is not JSON fails the cycle whole: nothing of
        // it, nor of the good nodes answer, is reported.
        fake.put("nodes", 200, &slurm("slurm-24.05-rest/slurm-nodes.json"));
        fake.put("jobs", 200, "{\"jobs\": [");
        let cycle = sources.collect();
        assert_eq!(cycle.reports[0].status, "error");
        let e = cycle.reports[0].error.as_ref().unwrap();
        assert!(
            e.contains("the slurmrestd jobs answer: line 1: not valid JSON"),
            "{e}"
        );
        assert!(
            cycle
                .samples
                .iter()
                .all(|s| !s.name.starts_with("vitals_slurm_")),
            "{:?}",
            cycle.samples
        );
        assert!(cycle.events.is_empty());
    }
}

#[test]
fn the_packaged_agent_config_parses_and_uses_the_package_paths() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent.toml");
    let cfg: RawConfig =
        vitals_common::config::parse(&path, &read(&path)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.spool.dir, Path::new("/var/lib/vitals-agent"));
    assert_eq!(cfg.tls.cert, Path::new("/etc/vitals/tls/agent.pem"));
    assert_eq!(cfg.tls.key, Path::new("/etc/vitals/tls/agent.key"));
    assert_eq!(cfg.tls.ca, Path::new("/etc/vitals/tls/ca.pem"));
    assert!(cfg.collector.is_some_and(|c| c.starts_with("https://")));
}

// ---------------------------------------------------------------- kmsg

mod kmsg {
    use super::*;
    use vitals_agent::sources::SourceEvent;
    use vitals_agent::sources::kmsg::Start;
    use vitals_proto::v1::Severity;

    const RECORDED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/kmsg/train-01.kmsg");

    /// A kmsg source reading `path`, its position in `spool`, PIDs in `proc`.
    fn cfg(path: &Path, spool: &Path, proc: &Path, start: Start) -> RawConfig {
        let mut cfg = RawConfig::default();
        cfg.paths.procfs = proc.to_path_buf();
        cfg.spool.dir = spool.to_path_buf();
        cfg.sources.kmsg.path = Some(path.to_path_buf());
        cfg.sources.kmsg.start = start;
        cfg
    }

    fn cycle(sources: &mut Sources) -> Cycle {
        let c = sources.collect();
        let r = c.reports.iter().find(|r| r.source == "kmsg").unwrap();
        assert_eq!(r.status, "ok", "{:?}", r.error);
        c
    }

    fn class(e: &SourceEvent) -> &str {
        e.labels["class"].as_str()
    }

    fn of<'a>(events: &'a [SourceEvent], c: &str) -> Vec<&'a SourceEvent> {
        events.iter().filter(|e| class(e) == c).collect()
    }

    /// A /proc tree holding PID 9911 in SLURM job 77 of user carol.
    fn proc_tree(dir: &Path) -> PathBuf {
        let p = dir.join("proc/9911");
        fs::create_dir_all(&p).unwrap();
        fs::write(
            p.join("cgroup"),
            "0::/system.slice/slurmstepd.scope/job_77/step_0/user/task_0\n",
        )
        .unwrap();
        fs::write(
            p.join("environ"),
            b"SLURM_JOB_USER=carol\0SLURM_JOB_ID=77\0",
        )
        .unwrap();
        dir.join("proc")
    }

    #[test]
    fn recorded_lines_become_events_with_severities_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let proc = proc_tree(dir.path());
        let mut s = Sources::new(
            &cfg(Path::new(RECORDED), dir.path(), &proc, Start::Beginning),
            &["kmsg".into()],
        )
        .unwrap();
        let c = cycle(&mut s);
        let ev = &c.events;
        let classes: Vec<&str> = ev.iter().map(class).collect();
        assert_eq!(
            classes,
            [
                "link_up",
                "nfs_not_responding",
                "nfs_not_responding",
                "nfs_ok",
                "gpu_ring_timeout",
                "gpu_reset",
                "gpu_reset",
                "gpu_ras_uncorrectable",
                "gpu_ras_correctable",
                "nvidia_xid",
                "link_down",
                "oom_kill",
                "oom_kill",
                "mce",
                "hung_task",
            ],
            "garbage, chatter, continuation and oom-kill context lines make no events"
        );
        assert!(ev.iter().all(|e| e.kind == "kernel"));
        let one = |c: &str| {
            let v = of(ev, c);
            assert_eq!(v.len(), 1, "{c}");
            v[0]
        };
        let nfs = of(ev, "nfs_not_responding");
        assert_eq!(nfs[0].labels["server"], "nas-01");
        assert_eq!(nfs[0].severity, Severity::Warning);
        assert_eq!(
            nfs[0].message,
            "nfs: server nas-01 not responding, still trying"
        );
        assert_eq!(one("nfs_ok").severity, Severity::Info);
        let xid = one("nvidia_xid");
        assert_eq!(xid.labels["xid"], "79");
        assert_eq!(xid.labels["pci"], "0000:3b:00");
        assert_eq!(xid.severity, Severity::Critical);
        assert_eq!(one("gpu_ring_timeout").labels["ring"], "gfx_0.0.0");
        assert_eq!(of(ev, "gpu_reset")[0].labels["pci"], "0000:43:00.0");
        let ras = one("gpu_ras_uncorrectable");
        assert_eq!(
            (ras.labels["count"].as_str(), ras.labels["block"].as_str()),
            ("2", "umc")
        );
        assert_eq!(ras.severity, Severity::Critical);
        assert_eq!(one("gpu_ras_correctable").severity, Severity::Warning);
        assert_eq!(one("link_up").labels["device"], "ens1f0");
        let down = one("link_down");
        assert_eq!(down.labels["device"], "ens1f0");
        assert_eq!(down.severity, Severity::Warning);
        let oom = of(ev, "oom_kill");
        // From the oom-kill line's task_memcg: the victim is already gone.
        assert_eq!(oom[0].labels["pid"], "7788");
        assert_eq!(oom[0].labels["comm"], "python");
        assert_eq!(oom[0].labels["job_id"], "4242");
        // No oom-kill line for it: its cgroup under paths.procfs.
        assert_eq!(oom[1].labels["pid"], "9911");
        assert_eq!(oom[1].labels["job_id"], "77");
        assert_eq!(oom[1].labels["user"], "carol");
        assert_eq!(oom[1].severity, Severity::Critical);
        assert_eq!(one("mce").severity, Severity::Critical);
        let hung = one("hung_task");
        assert_eq!(
            (
                hung.labels["task"].as_str(),
                hung.labels["pid"].as_str(),
                hung.labels["seconds"].as_str()
            ),
            ("python", "6001", "122")
        );
        let v = |name: &str, l: &[(&str, &str)]| value(&c.samples, name, l);
        assert_eq!(
            v(
                "vitals_kernel_events_total",
                &[("class", "nfs_not_responding")]
            ),
            2.0
        );
        assert_eq!(
            v("vitals_kernel_events_total", &[("class", "oom_kill")]),
            2.0
        );
        assert_eq!(
            v("vitals_kernel_events_total", &[("class", "nvidia_xid")]),
            1.0
        );
        assert_eq!(v("vitals_kernel_records_read_total", &[]), 19.0);
        assert_eq!(v("vitals_kernel_records_lost_total", &[]), 0.0);
        assert_eq!(
            count(&c.samples, "vitals_kernel_events_total"),
            vitals_agent::sources::kmsg::parse::DEFAULT_PATTERNS.len(),
            "every class from 0"
        );
    }

    #[test]
    fn bounded_reads_and_a_restart_neither_replays_nor_misses() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let mut all = Vec::new();
        {
            let mut c = cfg(Path::new(RECORDED), dir.path(), &proc, Start::Beginning);
            c.sources.kmsg.max_lines = 6;
            let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
            let first = cycle(&mut s);
            assert_eq!(
                value(&first.samples, "vitals_kernel_records_read_total", &[]),
                6.0,
                "at most max_lines records per cycle"
            );
            assert_eq!(first.events.len(), 5, "records 1201-1206");
            all.extend(first.events);
            let second = cycle(&mut s);
            assert_eq!(
                value(&second.samples, "vitals_kernel_records_read_total", &[]),
                11.0,
                "1207-1211 and a garbage line: lines that are not records count against the limit too"
            );
            all.extend(second.events);
        }
        // A new agent on the same spool goes on after record 1211.
        let c = cfg(Path::new(RECORDED), dir.path(), &proc, Start::Beginning);
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        let third = cycle(&mut s);
        assert_eq!(
            value(&third.samples, "vitals_kernel_records_read_total", &[]),
            8.0,
            "1212-1219 only"
        );
        assert_eq!(
            value(&third.samples, "vitals_kernel_records_lost_total", &[]),
            0.0
        );
        all.extend(third.events);
        let mut once = Sources::new(
            &cfg(
                Path::new(RECORDED),
                &dir.path().join("other"),
                &proc,
                Start::Beginning,
            ),
            &["kmsg".into()],
        )
        .unwrap();
        fs::create_dir_all(dir.path().join("other")).unwrap();
        let whole = cycle(&mut once).events;
        assert_eq!(all.len(), whole.len());
        for (a, b) in all.iter().zip(&whole) {
            assert_eq!(a.message, b.message);
        }
        // The byte limit holds too: 400 records of 100 bytes, 4 KiB a cycle.
        let spool = dir.path().join("bytes");
        fs::create_dir_all(&spool).unwrap();
        let file = spool.join("kmsg");
        let body: String = (0..400)
            .map(|i| format!("6,{i:03},{i:03}000,-;{:<84}\n", "nfs: server nas-01 OK"))
            .collect();
        assert_eq!(body.len(), 400 * 100);
        fs::write(&file, body).unwrap();
        let mut c = cfg(&file, &spool, &proc, Start::Beginning);
        c.sources.kmsg.max_bytes = 4096;
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        let first = cycle(&mut s);
        assert_eq!(
            value(&first.samples, "vitals_kernel_records_read_total", &[]),
            41.0
        );
        assert_eq!(first.events.len(), 41);
        let second = cycle(&mut s);
        assert_eq!(
            value(&second.samples, "vitals_kernel_records_read_total", &[]),
            82.0
        );
    }

    #[test]
    fn first_start_at_the_end_then_new_records_and_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let file = dir.path().join("kmsg");
        fs::copy(RECORDED, &file).unwrap();
        let append = |line: &str| {
            use std::io::Write;
            let mut f = fs::OpenOptions::new().append(true).open(&file).unwrap();
            writeln!(f, "{line}").unwrap();
        };
        let c = cfg(&file, dir.path(), &proc, Start::End);
        {
            let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
            let first = cycle(&mut s);
            assert!(first.events.is_empty(), "what was there before: no events");
            append("3,1220,990000000,-;nfs: server nas-02 not responding, still trying");
            let second = cycle(&mut s);
            assert_eq!(second.events.len(), 1);
            assert_eq!(second.events[0].labels["server"], "nas-02");
        }
        // Written while the agent was stopped, after a gap of 9 overwritten records.
        append("5,1230,995000000,-;nfs: server nas-02 OK");
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        let third = cycle(&mut s);
        let classes: Vec<&str> = third.events.iter().map(class).collect();
        assert_eq!(classes, ["nfs_ok"]);
        assert_eq!(
            value(&third.samples, "vitals_kernel_records_lost_total", &[]),
            9.0
        );
        assert!(vitals_agent::sources::kmsg::state_file(dir.path()).exists());
    }

    /// `vitals-agent once` neither reads nor saves the position.
    #[test]
    fn without_keep_position_nothing_is_saved_or_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let proc = dir.path().join("proc");
        let mut c = cfg(Path::new(RECORDED), dir.path(), &proc, Start::Beginning);
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        assert_eq!(cycle(&mut s).events.len(), 15);
        drop(s);
        assert!(vitals_agent::sources::kmsg::state_file(dir.path()).exists());
        c.sources.kmsg.keep_position = false;
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        assert_eq!(
            cycle(&mut s).events.len(),
            15,
            "the saved position is not used"
        );
        let other = dir.path().join("other");
        fs::create_dir_all(&other).unwrap();
        c.spool.dir = other.clone();
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        cycle(&mut s);
        assert!(!vitals_agent::sources::kmsg::state_file(&other).exists());
    }

    #[test]
    fn configured_patterns_come_first_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
collector = "https://c.example:7443"
node = "train-01"
[tls]
ca = "{RECORDED}"
cert = "{RECORDED}"
key = "{RECORDED}"
[sources.kmsg]
path = "{RECORDED}"
start = "beginning"
default_patterns = false
patterns = [{{ class = "pf_inet6", severity = "error", regex = 'Registered (?P<family>PF_\w+)' }}]
"#
        );
        let cfg: RawConfig = vitals_common::config::parse(Path::new("agent.toml"), &toml).unwrap();
        let mut cfg = cfg;
        cfg.spool.dir = dir.path().to_path_buf();
        let mut s = Sources::new(&cfg, &["kmsg".into()]).unwrap();
        let c = cycle(&mut s);
        assert_eq!(c.events.len(), 1);
        assert_eq!(c.events[0].labels["family"], "PF_INET6");
        assert_eq!(c.events[0].severity, Severity::Error);
        let bad = toml.replace("\"error\"", "\"loud\"");
        let path = dir.path().join("agent.toml");
        fs::write(&path, bad).unwrap();
        let raw = vitals_agent::config::load_raw(&path).unwrap();
        let e = vitals_agent::config::validate(&path, raw)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("sources.kmsg.patterns") && e.contains("loud"),
            "{e}"
        );
    }

    /// The real /dev/kmsg (through `paths.devfs`): records are read, the
    /// read ends when there is nothing new instead of blocking.
    #[test]
    fn real_dev_kmsg_does_not_block() {
        let readable = fs::File::open("/dev/kmsg").is_ok();
        if !readable {
            assert_ne!(
                std::env::var("VITALS_TEST_KMSG").as_deref(),
                Ok("1"),
                "VITALS_TEST_KMSG=1 but /dev/kmsg cannot be read (run as root)"
            );
            eprintln!(
                "skipped: /dev/kmsg cannot be read here (VITALS_TEST_KMSG=1 makes this fail)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut c = RawConfig::default();
        c.spool.dir = dir.path().to_path_buf();
        c.sources.kmsg.start = Start::Beginning;
        c.sources.kmsg.max_lines = 100_000;
        c.sources.kmsg.max_bytes = 64 << 20;
        let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
        let t = Instant::now();
        let first = cycle(&mut s);
        let second = cycle(&mut s);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(value(&first.samples, "vitals_kernel_records_read_total", &[]) > 0.0);
        let state =
            fs::read_to_string(vitals_agent::sources::kmsg::state_file(dir.path())).unwrap();
        assert!(state.contains("boot_id"), "{state}");
        assert!(
            value(&second.samples, "vitals_kernel_records_read_total", &[])
                >= value(&first.samples, "vitals_kernel_records_read_total", &[])
        );
    }

    mod arbitrary {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
            /// Any bytes as a kmsg file: no panic, the source answers ok,
            /// every event it makes is a kernel event with a class.
            #[test]
            fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                    prefix in proptest::collection::vec(any::<u8>(), 0..64)) {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("kmsg");
                let mut body = b"3,1,2,-;".to_vec();
                body.extend_from_slice(&prefix);
                body.extend_from_slice(b"nfs: server x not responding\n");
                body.extend_from_slice(&bytes);
                fs::write(&file, &body).unwrap();
                let c = cfg(&file, dir.path(), &dir.path().join("proc"), Start::Beginning);
                let mut s = Sources::new(&c, &["kmsg".into()]).unwrap();
                let out = s.collect();
                prop_assert_eq!(out.reports[0].status, "ok");
                prop_assert!(out.events.iter().all(|e| e.kind == "kernel" && e.labels.contains_key("class")));
                let line = String::from_utf8_lossy(&bytes);
                let _ = vitals_agent::sources::kmsg::parse::parse_record(&line);
                let _ = vitals_agent::sources::kmsg::parse::parse_oom_context(&line);
            }
        }
    }
}

// ------------------------------------------------- SSD-cache eligibility

mod zfs_cache {
    use super::*;
    use vitals_agent::sources::zfs::cache::{CacheSizes, Reading, parse_zfs_get, verdict};

    const GIB: f64 = (1u64 << 30) as f64;

    fn recorded() -> Vec<vitals_agent::sources::zfs::cache::Dataset> {
        parse_zfs_get(&zdata("openzfs-2.x-get-cache-Hp.txt")).unwrap()
    }

    /// 256 GiB of ARC, 3.5 TiB in the L2ARC.
    fn nas() -> CacheSizes {
        CacheSizes {
            arc_max_bytes: Some(256.0 * GIB),
            l2_bytes: Some(3584.0 * GIB),
        }
    }

    #[test]
    fn secondarycache_metadata_is_not_cacheable_on_the_nvme_with_the_fix() {
        let ds = recorded();
        let names: Vec<&str> = ds.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["tank/train", "tank/models", "tank/archive"]);
        let train = verdict(&ds[0], nas(), Reading::default());
        assert!(!train.cacheable);
        assert_eq!(train.reasons.len(), 1, "{train:?}");
        assert!(
            train.reasons[0]
                .problem
                .contains("secondarycache=metadata: not cacheable on the L2ARC (NVMe)"),
            "{train:?}"
        );
        assert_eq!(
            train.reasons[0].fix.as_deref(),
            Some("zfs set secondarycache=all tank/train")
        );
        let models = verdict(&ds[1], nas(), Reading::default());
        assert!(models.cacheable && models.reasons.is_empty(), "{models:?}");
        let archive = verdict(&ds[2], nas(), Reading::default());
        assert!(!archive.cacheable);
        assert!(
            archive.reasons[0]
                .problem
                .starts_with("far larger than the cache: 51200.0 GiB of data, 3840.0 GiB"),
            "{archive:?}"
        );
        // Read hard with few hits: said, but the properties are right.
        let busy = verdict(
            &ds[1],
            nas(),
            Reading {
                read_bytes_per_second: Some(800.0 * 1024.0 * 1024.0),
                arc_hit_ratio: Some(0.2),
                l2_hit_ratio: Some(0.1),
            },
        );
        assert!(busy.cacheable);
        assert!(
            busy.reasons[0]
                .problem
                .starts_with("read mostly from disk: 800.0 MiB/s"),
            "{busy:?}"
        );
        // primarycache=none starves both caches.
        let mut d = ds[1].clone();
        d.props.insert("primarycache".into(), "none".into());
        let v = verdict(&d, nas(), Reading::default());
        assert!(!v.cacheable);
        assert_eq!(
            v.reasons[0].fix.as_deref(),
            Some("zfs set primarycache=all tank/models")
        );
        // No L2ARC: worth saying, not blocking by itself.
        let v = verdict(
            &ds[1],
            CacheSizes {
                arc_max_bytes: Some(256.0 * GIB),
                l2_bytes: Some(0.0),
            },
            Reading::default(),
        );
        assert!(
            v.cacheable && v.reasons[0].problem.starts_with("no L2ARC"),
            "{v:?}"
        );
    }

    #[test]
    fn the_zfs_source_reports_properties_and_verdicts_as_series() {
        let fake = FakeZfs::new(
            OPENZFS_ZPOOL,
            r#"case "$1" in
  get) [ "$5" = "primarycache,secondarycache,recordsize,compression,sync,logbias,used,referenced" ] && [ "$6" = "tank/train" ] && [ "$8" = "tank/archive" ] && cat $D/openzfs-2.x-get-cache-Hp.txt ;;
  list) cat $D/openzfs-2.x-snapshots-Hp.txt ;;
  *) exit 1 ;;
esac"#,
        );
        let mut cfg = fake.config(Duration::from_secs(10));
        cfg.sources.zfs.cache_datasets = vec![
            "tank/train".into(),
            "tank/models".into(),
            "tank/archive".into(),
        ];
        // arcstats with a 256 GiB ARC and 3.5 TiB of L2ARC.
        let kstat = fake.dir.path().join("proc/spl/kstat/zfs");
        fs::create_dir_all(&kstat).unwrap();
        let arc = read(&fixture("node_exporter/proc/spl/kstat/zfs/arcstats"))
            .replace(
                "c_max                           4    8367976448",
                "c_max                           4    274877906944",
            )
            .replace(
                "l2_size                         4    0",
                "l2_size                         4    3848290697216",
            );
        fs::write(kstat.join("arcstats"), arc).unwrap();
        let s = collect_ok(&cfg, &["zfs"]);
        fn ds(d: &str) -> [(&str, &str); 2] {
            [("zpool", "tank"), ("dataset", d)]
        }
        assert_eq!(
            value(&s, "vitals_zfs_dataset_cacheable", &ds("tank/train")),
            0.0
        );
        assert_eq!(
            value(&s, "vitals_zfs_dataset_cacheable", &ds("tank/models")),
            1.0
        );
        assert_eq!(
            value(&s, "vitals_zfs_dataset_cacheable", &ds("tank/archive")),
            0.0
        );
        assert_eq!(
            value(&s, "vitals_zfs_dataset_recordsize_bytes", &ds("tank/train")),
            1048576.0
        );
        assert_eq!(
            value(
                &s,
                "vitals_zfs_dataset_referenced_bytes",
                &ds("tank/models")
            ),
            96636764160.0
        );
        assert_eq!(
            value(
                &s,
                "vitals_zfs_dataset_info",
                &[
                    ("zpool", "tank"),
                    ("dataset", "tank/train"),
                    ("primarycache", "all"),
                    ("secondarycache", "metadata"),
                    ("compression", "lz4"),
                    ("sync", "standard"),
                    ("logbias", "throughput"),
                ]
            ),
            1.0
        );
        assert_eq!(
            value(&s, "vitals_zfs_command_success", &[("command", "zfs get")]),
            1.0
        );
    }
}
