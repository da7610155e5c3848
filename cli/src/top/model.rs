//! `vitals top`'s view model: the queries it asks every refresh and the
//! per-node view built from their answers. Pure: no I/O here, so the
//! mapping is tested with hand-made answers.
//!
//! Metric names are the agent's (`agent/src/sources`): GPUs as AMD's
//! device-metrics-exporter names them (VRAM in MiB, power in W), NICs,
//! NFS mounts and ZFS with node_exporter's names, SLURM as
//! `vitals_slurm_*` (jobs are cluster-wide, reported by whichever agent
//! runs `squeue`; `vitals_slurm_job_node{slurm_node}` places them).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use vitals_proto::label;
use vitals_proto::v1::{Alert, NodeInfo, Series};

/// Rates are taken over this window: several agent intervals (5 s by
/// default), short enough to follow a change within a refresh or two.
pub const RATE_WINDOW: &str = "1m";

/// One instant query of a refresh and what its answer feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ask {
    /// Per-GPU gauges, a plain selector over several names (names kept).
    Gpu,
    NfsOps,
    NfsRtt,
    NicRx,
    NicTx,
    NicErrors,
    NicSpeed,
    /// ARC and L2ARC hit ratios, pool states (names kept).
    Zfs,
    Jobs,
    JobGpus,
    JobNodes,
}

/// Every query of a refresh: each a subset our engine runs (no binary
/// operators, so an average RTT is divided here, not in PromQL).
pub fn queries() -> Vec<(Ask, String)> {
    let w = RATE_WINDOW;
    vec![
        (
            Ask::Gpu,
            r#"{__name__=~"gpu_(gfx_activity|used_vram|total_vram|junction_temperature|edge_temperature|power_usage|power_cap)"}"#.into(),
        ),
        (
            Ask::NfsOps,
            format!("sum by (node, export) (rate(node_mountstats_nfs_operations_requests_total[{w}]))"),
        ),
        (
            Ask::NfsRtt,
            format!("sum by (node, export) (rate(node_mountstats_nfs_operations_response_time_seconds_total[{w}]))"),
        ),
        (
            Ask::NicRx,
            format!("sum by (node, device) (rate(node_network_receive_bytes_total[{w}]))"),
        ),
        (
            Ask::NicTx,
            format!("sum by (node, device) (rate(node_network_transmit_bytes_total[{w}]))"),
        ),
        (
            Ask::NicErrors,
            format!(
                r#"sum by (node, device) (rate({{__name__=~"node_network_(receive|transmit)_errs_total"}}[{w}]))"#
            ),
        ),
        (Ask::NicSpeed, "node_network_speed_bytes".into()),
        (
            Ask::Zfs,
            r#"{__name__=~"node_zfs_arc_hit_ratio|node_zfs_arc_l2_hit_ratio|node_zfs_zpool_state"}"#.into(),
        ),
        (Ask::Jobs, r#"vitals_slurm_job_info{state="RUNNING"}"#.into()),
        (Ask::JobGpus, "vitals_slurm_job_gpus".into()),
        (Ask::JobNodes, "vitals_slurm_job_node".into()),
    ]
}

/// What one refresh brought back.
#[derive(Debug, Default, Clone)]
pub struct Answers {
    pub nodes: Vec<NodeInfo>,
    pub series: HashMap<Ask, Vec<Series>>,
    /// Firing alerts.
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gpu {
    pub id: String,
    pub model: String,
    /// Percent.
    pub util: Option<f64>,
    /// MiB.
    pub vram_used: Option<f64>,
    pub vram_total: Option<f64>,
    /// Degrees Celsius: junction, else edge.
    pub temp: Option<f64>,
    /// Watts.
    pub power: Option<f64>,
    pub power_cap: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NfsMount {
    pub export: String,
    pub ops_per_sec: Option<f64>,
    /// Average round trip per operation over the window, seconds.
    pub rtt: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Nic {
    pub device: String,
    /// Bytes per second.
    pub rx: Option<f64>,
    pub tx: Option<f64>,
    /// Link speed, bytes per second.
    pub speed: Option<f64>,
    /// Receive and transmit errors per second.
    pub errors: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Zfs {
    pub arc_hit: Option<f64>,
    pub l2_hit: Option<f64>,
    /// (pool, state) with the state whose series is 1.
    pub pools: Vec<(String, String)>,
}

impl Zfs {
    fn is_empty(&self) -> bool {
        self.arc_hit.is_none() && self.l2_hit.is_none() && self.pools.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub user: String,
    pub partition: String,
    pub gpus: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AlertView {
    pub rule: String,
    pub severity: String,
    pub summary: String,
    /// The alert's `node` label; empty for a fleet-wide alert.
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeView {
    pub name: String,
    pub role: String,
    pub connected: bool,
    pub last_seen_ms: i64,
    pub gpus: Vec<Gpu>,
    pub nfs: Vec<NfsMount>,
    pub nics: Vec<Nic>,
    pub zfs: Option<Zfs>,
    pub jobs: Vec<Job>,
    pub alerts: Vec<AlertView>,
}

impl NodeView {
    /// Mean utilisation of the GPUs that report one.
    pub fn gpu_util(&self) -> Option<f64> {
        let v: Vec<f64> = self.gpus.iter().filter_map(|g| g.util).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// The whole fleet at one refresh.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Fleet {
    pub nodes: Vec<NodeView>,
    /// Firing alerts with no `node` label.
    pub fleet_alerts: Vec<AlertView>,
}

impl Fleet {
    pub fn firing(&self) -> usize {
        self.fleet_alerts.len() + self.nodes.iter().map(|n| n.alerts.len()).sum::<usize>()
    }
}

/// The sort orders `s` cycles through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Name,
    /// Busiest first; nodes without a GPU last.
    GpuUtil,
    /// Most firing alerts first.
    Alerts,
}

impl SortKey {
    pub fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::GpuUtil,
            SortKey::GpuUtil => SortKey::Alerts,
            SortKey::Alerts => SortKey::Name,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::GpuUtil => "GPU util",
            SortKey::Alerts => "alerts",
        }
    }
}

/// Sorts nodes by `key`; ties by name.
pub fn sort(nodes: &mut [NodeView], key: SortKey) {
    nodes.sort_by(|a, b| {
        let by = match key {
            SortKey::Name => std::cmp::Ordering::Equal,
            SortKey::GpuUtil => {
                let ua = a.gpu_util().unwrap_or(-1.0);
                let ub = b.gpu_util().unwrap_or(-1.0);
                ub.total_cmp(&ua)
            }
            SortKey::Alerts => b.alerts.len().cmp(&a.alerts.len()),
        };
        by.then_with(|| a.name.cmp(&b.name))
    });
}

/// The newest value of an instant answer's series.
fn value(s: &Series) -> Option<f64> {
    s.last_value().filter(|v| v.is_finite())
}

/// Builds the fleet from one refresh's answers, nodes by name.
pub fn build(a: &Answers) -> Fleet {
    let mut nodes: BTreeMap<String, NodeView> = a
        .nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                NodeView {
                    name: n.name.clone(),
                    role: n.role.clone(),
                    connected: n.connected,
                    last_seen_ms: n.last_seen_ms,
                    ..Default::default()
                },
            )
        })
        .collect();
    let empty = Vec::new();
    let answer = |ask: Ask| a.series.get(&ask).unwrap_or(&empty);
    // A series names its node; one ListNodes did not know still gets a row.
    fn node<'a>(nodes: &'a mut BTreeMap<String, NodeView>, name: &str) -> &'a mut NodeView {
        nodes.entry(name.to_string()).or_insert_with(|| NodeView {
            name: name.to_string(),
            ..Default::default()
        })
    }

    // GPUs, keyed by (node, gpu index).
    let mut gpus: BTreeMap<(String, String), Gpu> = BTreeMap::new();
    for s in answer(Ask::Gpu) {
        let n = label(&s.labels, "node");
        if n.is_empty() {
            continue;
        }
        let id = label(&s.labels, "gpu").to_string();
        let g = gpus
            .entry((n.to_string(), id.clone()))
            .or_insert_with(|| Gpu {
                id,
                model: label(&s.labels, "model").to_string(),
                ..Default::default()
            });
        let v = value(s);
        match s.name.as_str() {
            "gpu_gfx_activity" => g.util = v,
            "gpu_used_vram" => g.vram_used = v,
            "gpu_total_vram" => g.vram_total = v,
            "gpu_junction_temperature" => g.temp = v.or(g.temp),
            "gpu_edge_temperature" => g.temp = g.temp.or(v),
            "gpu_power_usage" => g.power = v,
            "gpu_power_cap" => g.power_cap = v,
            _ => {}
        }
    }
    for ((n, _), g) in gpus {
        node(&mut nodes, &n).gpus.push(g);
    }
    for v in nodes.values_mut() {
        // Numeric order: gpu 2 before gpu 10.
        v.gpus.sort_by(|a, b| {
            (a.id.parse::<u64>().ok(), &a.id).cmp(&(b.id.parse::<u64>().ok(), &b.id))
        });
    }

    // NFS mounts by (node, export).
    let mut nfs: BTreeMap<(String, String), (Option<f64>, Option<f64>)> = BTreeMap::new();
    for (ask, which) in [(Ask::NfsOps, 0), (Ask::NfsRtt, 1)] {
        for s in answer(ask) {
            let key = (
                label(&s.labels, "node").to_string(),
                label(&s.labels, "export").to_string(),
            );
            let e = nfs.entry(key).or_default();
            if which == 0 {
                e.0 = value(s);
            } else {
                e.1 = value(s);
            }
        }
    }
    for ((n, export), (ops, rtt_sum)) in nfs {
        if n.is_empty() {
            continue;
        }
        // seconds of round trips per second / operations per second.
        let rtt = match (ops, rtt_sum) {
            (Some(o), Some(r)) if o > 0.0 => Some(r / o),
            _ => None,
        };
        node(&mut nodes, &n).nfs.push(NfsMount {
            export,
            ops_per_sec: ops,
            rtt,
        });
    }

    // NICs by (node, device).
    let mut nics: BTreeMap<(String, String), Nic> = BTreeMap::new();
    for ask in [Ask::NicRx, Ask::NicTx, Ask::NicErrors, Ask::NicSpeed] {
        for s in answer(ask) {
            let n = label(&s.labels, "node");
            let d = label(&s.labels, "device");
            if n.is_empty() || d.is_empty() {
                continue;
            }
            let nic = nics
                .entry((n.to_string(), d.to_string()))
                .or_insert_with(|| Nic {
                    device: d.to_string(),
                    ..Default::default()
                });
            let v = value(s);
            match ask {
                Ask::NicRx => nic.rx = v,
                Ask::NicTx => nic.tx = v,
                Ask::NicErrors => nic.errors = v,
                _ => nic.speed = v.filter(|s| *s > 0.0),
            }
        }
    }
    for ((n, _), nic) in nics {
        // A link with no traffic counters (only a speed) is not worth a row.
        if nic.rx.is_some() || nic.tx.is_some() {
            node(&mut nodes, &n).nics.push(nic);
        }
    }

    // ZFS.
    let mut zfs: BTreeMap<String, Zfs> = BTreeMap::new();
    let mut pools: BTreeMap<(String, String), String> = BTreeMap::new();
    for s in answer(Ask::Zfs) {
        let n = label(&s.labels, "node");
        if n.is_empty() {
            continue;
        }
        let z = zfs.entry(n.to_string()).or_default();
        match s.name.as_str() {
            "node_zfs_arc_hit_ratio" => z.arc_hit = value(s),
            "node_zfs_arc_l2_hit_ratio" => z.l2_hit = value(s),
            "node_zfs_zpool_state" if value(s) == Some(1.0) => {
                pools.insert(
                    (n.to_string(), label(&s.labels, "zpool").to_string()),
                    label(&s.labels, "state").to_string(),
                );
            }
            _ => {}
        }
    }
    for ((n, pool), state) in pools {
        zfs.entry(n).or_default().pools.push((pool, state));
    }
    for (n, z) in zfs {
        if !z.is_empty() {
            node(&mut nodes, &n).zfs = Some(z);
        }
    }

    // SLURM: running jobs, once each (several agents may run squeue),
    // placed on the Vitals nodes named by their SLURM nodes, else on the
    // agent that reported them.
    let mut gpus_of: HashMap<&str, f64> = HashMap::new();
    for s in answer(Ask::JobGpus) {
        if let Some(v) = value(s) {
            gpus_of.insert(label(&s.labels, "job_id"), v);
        }
    }
    let mut placed: HashMap<&str, BTreeSet<String>> = HashMap::new();
    for s in answer(Ask::JobNodes) {
        let sn = label(&s.labels, "slurm_node");
        if value(s) == Some(1.0) && nodes.contains_key(sn) {
            placed
                .entry(label(&s.labels, "job_id"))
                .or_default()
                .insert(sn.to_string());
        }
    }
    let mut seen = BTreeSet::new();
    for s in answer(Ask::Jobs) {
        let id = label(&s.labels, "job_id");
        if id.is_empty() || !seen.insert(id.to_string()) {
            continue;
        }
        let job = Job {
            id: id.to_string(),
            name: label(&s.labels, "name").to_string(),
            user: label(&s.labels, "user").to_string(),
            partition: label(&s.labels, "partition").to_string(),
            gpus: gpus_of.get(id).copied(),
        };
        let targets: Vec<String> = match placed.get(id) {
            Some(set) => set.iter().cloned().collect(),
            None => vec![label(&s.labels, "node").to_string()],
        };
        for t in targets.iter().filter(|t| !t.is_empty()) {
            node(&mut nodes, t).jobs.push(job.clone());
        }
    }
    for v in nodes.values_mut() {
        v.jobs.sort_by(|a, b| {
            (a.id.parse::<u64>().ok(), &a.id).cmp(&(b.id.parse::<u64>().ok(), &b.id))
        });
    }

    // Firing alerts.
    let mut fleet_alerts = Vec::new();
    for al in &a.alerts {
        let view = AlertView {
            rule: al.rule.clone(),
            severity: al.severity.clone(),
            summary: label(&al.annotations, "summary").to_string(),
            node: label(&al.labels, "node").to_string(),
        };
        if view.node.is_empty() {
            fleet_alerts.push(view);
        } else {
            node(&mut nodes, &view.node.clone()).alerts.push(view);
        }
    }

    Fleet {
        nodes: nodes.into_values().collect(),
        fleet_alerts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_proto::v1::Label;

    use crate::commands::test_series as s;

    fn info(name: &str, role: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            role: role.into(),
            connected: true,
            ..Default::default()
        }
    }

    fn answers() -> Answers {
        let mut series = HashMap::new();
        let g = |gpu: &'static str| [("node", "train-01"), ("gpu", gpu), ("model", "MI100")];
        series.insert(
            Ask::Gpu,
            vec![
                s("gpu_gfx_activity", &g("10"), 30.0),
                s("gpu_gfx_activity", &g("2"), 90.0),
                s("gpu_used_vram", &g("2"), 16384.0),
                s("gpu_total_vram", &g("2"), 32768.0),
                s("gpu_edge_temperature", &g("2"), 40.0),
                s("gpu_junction_temperature", &g("2"), 70.0),
                s("gpu_edge_temperature", &g("10"), 45.0),
                s("gpu_power_usage", &g("2"), 250.0),
                s("gpu_power_cap", &g("2"), 300.0),
            ],
        );
        let nfs = [("node", "train-01"), ("export", "nas:/data")];
        series.insert(Ask::NfsOps, vec![s("", &nfs, 200.0)]);
        series.insert(Ask::NfsRtt, vec![s("", &nfs, 0.5)]);
        let ib = [("node", "train-01"), ("device", "ib0")];
        series.insert(Ask::NicRx, vec![s("", &ib, 1e9)]);
        series.insert(Ask::NicTx, vec![s("", &ib, 2e9)]);
        series.insert(Ask::NicErrors, vec![s("", &ib, 0.0)]);
        series.insert(
            Ask::NicSpeed,
            vec![
                s("node_network_speed_bytes", &ib, 12.5e9),
                s(
                    "node_network_speed_bytes",
                    &[("node", "train-01"), ("device", "eno1")],
                    1.25e8,
                ),
            ],
        );
        let pool = |state: &'static str, v: f64| {
            s(
                "node_zfs_zpool_state",
                &[("node", "nas-01"), ("zpool", "tank"), ("state", state)],
                v,
            )
        };
        series.insert(
            Ask::Zfs,
            vec![
                s("node_zfs_arc_hit_ratio", &[("node", "nas-01")], 0.97),
                pool("online", 0.0),
                pool("degraded", 1.0),
            ],
        );
        let job = |id: &'static str, reporter: &'static str| {
            s(
                "vitals_slurm_job_info",
                &[
                    ("node", reporter),
                    ("job_id", id),
                    ("name", "train"),
                    ("user", "ml"),
                    ("partition", "gpu"),
                    ("state", "RUNNING"),
                ],
                1.0,
            )
        };
        // Job 7 is reported by two agents and runs on train-01; job 8 runs
        // on a SLURM node Vitals does not know, so it stays with its reporter.
        series.insert(
            Ask::Jobs,
            vec![job("7", "nas-01"), job("7", "train-01"), job("8", "nas-01")],
        );
        series.insert(
            Ask::JobNodes,
            vec![
                s(
                    "vitals_slurm_job_node",
                    &[
                        ("node", "nas-01"),
                        ("job_id", "7"),
                        ("slurm_node", "train-01"),
                    ],
                    1.0,
                ),
                s(
                    "vitals_slurm_job_node",
                    &[("node", "nas-01"), ("job_id", "8"), ("slurm_node", "gpu99")],
                    1.0,
                ),
            ],
        );
        series.insert(
            Ask::JobGpus,
            vec![s(
                "vitals_slurm_job_gpus",
                &[("node", "nas-01"), ("job_id", "7"), ("user", "ml")],
                4.0,
            )],
        );
        let alert = |rule: &str, node: Option<&str>| Alert {
            rule: rule.into(),
            state: "firing".into(),
            severity: "critical".into(),
            labels: node
                .map(|n| {
                    vec![Label {
                        name: "node".into(),
                        value: n.into(),
                    }]
                })
                .unwrap_or_default(),
            annotations: vec![Label {
                name: "summary".into(),
                value: format!("{rule} here"),
            }],
            ..Default::default()
        };
        Answers {
            nodes: vec![info("train-01", "training"), info("nas-01", "storage")],
            series,
            alerts: vec![
                alert("ZfsPoolNotOnline", Some("nas-01")),
                alert("CollectorDiskFull", None),
            ],
        }
    }

    #[test]
    fn answers_become_one_view_per_node() {
        let f = build(&answers());
        let names: Vec<&str> = f.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["nas-01", "train-01"]);
        let train = &f.nodes[1];
        assert_eq!(train.role, "training");
        assert_eq!(
            train.gpus,
            vec![
                Gpu {
                    id: "2".into(),
                    model: "MI100".into(),
                    util: Some(90.0),
                    vram_used: Some(16384.0),
                    vram_total: Some(32768.0),
                    temp: Some(70.0),
                    power: Some(250.0),
                    power_cap: Some(300.0),
                },
                Gpu {
                    id: "10".into(),
                    model: "MI100".into(),
                    util: Some(30.0),
                    temp: Some(45.0),
                    ..Default::default()
                },
            ]
        );
        assert_eq!(train.gpu_util(), Some(60.0));
        assert_eq!(
            train.nfs,
            vec![NfsMount {
                export: "nas:/data".into(),
                ops_per_sec: Some(200.0),
                rtt: Some(0.0025),
            }]
        );
        // eno1 has a speed but no traffic counters: no row.
        assert_eq!(
            train.nics,
            vec![Nic {
                device: "ib0".into(),
                rx: Some(1e9),
                tx: Some(2e9),
                speed: Some(12.5e9),
                errors: Some(0.0),
            }]
        );
        assert_eq!(train.jobs.len(), 1);
        assert_eq!(train.jobs[0].id, "7");
        assert_eq!(train.jobs[0].gpus, Some(4.0));
        assert!(train.zfs.is_none());

        let nas = &f.nodes[0];
        assert_eq!(
            nas.zfs,
            Some(Zfs {
                arc_hit: Some(0.97),
                l2_hit: None,
                pools: vec![("tank".into(), "degraded".into())],
            })
        );
        let jobs: Vec<&str> = nas.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(jobs, ["8"]);
        assert_eq!(nas.alerts.len(), 1);
        assert_eq!(nas.alerts[0].rule, "ZfsPoolNotOnline");
        assert_eq!(nas.alerts[0].summary, "ZfsPoolNotOnline here");
        assert_eq!(f.fleet_alerts.len(), 1);
        assert_eq!(f.firing(), 2);
    }

    #[test]
    fn sort_keys_cycle_and_order_nodes() {
        let mut f = build(&answers());
        let mut idle = NodeView {
            name: "a-idle".into(),
            ..Default::default()
        };
        idle.gpus.push(Gpu {
            util: Some(5.0),
            ..Default::default()
        });
        f.nodes.push(idle);
        let order =
            |nodes: &[NodeView]| -> Vec<String> { nodes.iter().map(|n| n.name.clone()).collect() };
        sort(&mut f.nodes, SortKey::Name);
        assert_eq!(order(&f.nodes), ["a-idle", "nas-01", "train-01"]);
        sort(&mut f.nodes, SortKey::GpuUtil);
        assert_eq!(order(&f.nodes), ["train-01", "a-idle", "nas-01"]);
        sort(&mut f.nodes, SortKey::Alerts);
        assert_eq!(order(&f.nodes), ["nas-01", "a-idle", "train-01"]);
        let mut k = SortKey::Name;
        for want in [SortKey::GpuUtil, SortKey::Alerts, SortKey::Name] {
            k = k.next();
            assert_eq!(k, want);
        }
    }

    #[test]
    fn every_query_parses_in_the_engine() {
        for (ask, q) in queries() {
            assert!(
                vitals_collector::promql::parse(&q).is_ok(),
                "{ask:?}: {q} does not parse: {:?}",
                vitals_collector::promql::parse(&q).err()
            );
        }
    }
}
