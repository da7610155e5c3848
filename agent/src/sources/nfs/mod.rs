//! The NFS client: every NFS mount in `<procfs>/self/mountstats` and the
//! client RPC counters in `<procfs>/net/rpc/nfs`, with node_exporter's
//! mountstats and nfs names.
//!
//! Mounts are labelled like node_exporter's: `export`, `protocol` (of the
//! first transport) and `mountaddr`; several mounts of one export over one
//! protocol share their statistics in the kernel and are reported once.
//! `node_mountstats_nfs_mountpoint_info` names each mount point.
//!
//! Per interval: `node_mountstats_nfs_operations_response_time_average_seconds`
//! (RTT) and `..._request_time_average_seconds` (execute time) per operation.

pub mod mountstats;
pub mod rpc;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use vitals_common::model::{LabelSet, Name, Sample};

use self::mountstats::{BYTES, EVENTS, Mount, NfsStats, RDMA_FIELDS};
use super::util::{Deltas, Files, Interned, f, resolve_dir};
use super::{Source, SourceError};
use crate::config::RawConfig;

pub struct Nfs {
    procfs: PathBuf,
    deltas: Deltas,
    files: Files,
    cache: Cache,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    Box::new(Nfs {
        procfs: cfg.paths.procfs.clone(),
        deltas: Deltas::default(),
        files: Files::default(),
        cache: Cache::default(),
    })
}

impl Source for Nfs {
    fn name(&self) -> &'static str {
        "nfs"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let result = self.read(out);
        self.files.end_cycle();
        self.cache.end_cycle();
        result
    }
}

impl Nfs {
    fn read(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let now = Instant::now();
        let mut found = false;
        // `self` is this process's directory; through a link stub in a
        // copied fixture tree.
        let own = resolve_dir(&self.procfs.join("self"));
        if let Some(own) = &own {
            let path = own.join("mountstats");
            if let Some(text) = self.files.read(&path)? {
                let mounts = mountstats::parse_mountstats(&text).map_err(|e| e.in_file(&path))?;
                if mounts.iter().any(|m| m.nfs.is_some()) {
                    found = true;
                    let addrs = mount_addrs(&mut self.files, own)?;
                    self.emit_mounts(&mounts, &addrs, now, out);
                }
            }
        }
        self.deltas.finish_cycle();

        let rpc_path = self.procfs.join("net/rpc/nfs");
        if let Some(text) = self.files.read(&rpc_path)? {
            found = true;
            let stats = rpc::parse_client_rpc(&text).map_err(|e| e.in_file(&rpc_path))?;
            emit_client_rpc(&stats, &mut self.cache, out);
        }
        if !found {
            return Err(SourceError::Unavailable(format!(
                "no NFS mounts in {}/self/mountstats and no {}",
                self.procfs.display(),
                rpc_path.display()
            )));
        }
        Ok(())
    }
}

/// `addr=` of each mount from `mountinfo`, when the tree has one.
fn mount_addrs(
    files: &mut Files,
    own: &Path,
) -> Result<BTreeMap<(String, String), String>, SourceError> {
    let path = own.join("mountinfo");
    match files.read(&path)? {
        Some(text) => mountstats::parse_mountinfo_addrs(&text).map_err(|e| e.in_file(&path)),
        None => Ok(BTreeMap::new()),
    }
}

/// The server address of a mount: mountinfo's `addr=`, else the `mountaddr=`
/// option (NFSv3), else the host part of `host:/path`.
fn mount_addr(m: &Mount, stats: &NfsStats, addrs: &BTreeMap<(String, String), String>) -> String {
    if let Some(a) = addrs.get(&(m.device.clone(), m.mountpoint.clone())) {
        return a.clone();
    }
    if let Some(a) = stats.opts.get("mountaddr").filter(|a| !a.is_empty()) {
        return a.clone();
    }
    let host = m.device.rsplit_once(":/").map_or("", |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

impl Nfs {
    fn emit_mounts(
        &mut self,
        mounts: &[Mount],
        addrs: &BTreeMap<(String, String), String>,
        now: Instant,
        out: &mut Vec<Sample>,
    ) {
        let mut seen_mountpoints = HashSet::new();
        let mut seen_devices = HashSet::new();
        let cache = &mut self.cache;
        for m in mounts {
            let Some(stats) = &m.nfs else { continue };
            let protocol = stats
                .transports
                .first()
                .map(|t| t.protocol.as_str())
                .or_else(|| stats.opts.get("proto").map(String::as_str))
                .unwrap_or_default();
            let addr = mount_addr(m, stats, addrs);
            let mount = [
                ("export", m.device.as_str()),
                ("protocol", protocol),
                ("mountaddr", addr.as_str()),
            ];
            if seen_mountpoints.insert((
                m.device.as_str(),
                protocol,
                addr.clone(),
                m.mountpoint.as_str(),
            )) {
                let labels = cache.labels(&mount, &[("mountpoint", m.mountpoint.as_str())]);
                out.push(Sample::with_labels(
                    "node_mountstats_nfs_mountpoint_info",
                    &labels,
                    1.0,
                ));
            }
            if !seen_devices.insert((m.device.as_str(), protocol, addr.clone())) {
                continue;
            }
            let labels = cache.labels(&mount, &[]);
            out.push(Sample::with_labels(
                "node_mountstats_nfs_age_seconds_total",
                &labels,
                f(stats.age_seconds),
            ));
            for (name, v) in BYTES.iter().zip(&stats.bytes) {
                let name = cache.name("", name, || format!("node_mountstats_nfs_{name}_total"));
                out.push(Sample::with_labels(name, &labels, f(*v)));
            }
            for (name, v) in EVENTS.iter().zip(&stats.events) {
                let name = cache.name("event", name, || {
                    format!("node_mountstats_nfs_event_{name}_total")
                });
                out.push(Sample::with_labels(name, &labels, f(*v)));
            }
            for (i, t) in stats.transports.iter().enumerate() {
                let index = TRANSPORT_INDEX
                    .get(i)
                    .copied()
                    .map_or_else(|| i.to_string().into(), std::borrow::Cow::Borrowed);
                let labels = cache.labels(&mount, &[("transport", &index)]);
                let tl = |name: &'static str, v: u64| Sample::with_labels(name, &labels, f(v));
                out.push(tl("node_mountstats_nfs_transport_bind_total", t.bind));
                out.push(tl("node_mountstats_nfs_transport_connect_total", t.connect));
                out.push(tl(
                    "node_mountstats_nfs_transport_idle_time_seconds",
                    t.idle_time_seconds,
                ));
                out.push(tl("node_mountstats_nfs_transport_sends_total", t.sends));
                out.push(tl(
                    "node_mountstats_nfs_transport_receives_total",
                    t.receives,
                ));
                out.push(tl(
                    "node_mountstats_nfs_transport_bad_transaction_ids_total",
                    t.bad_xids,
                ));
                out.push(tl(
                    "node_mountstats_nfs_transport_backlog_queue_total",
                    t.cumulative_backlog,
                ));
                out.push(tl(
                    "node_mountstats_nfs_transport_cumulative_active_requests_total",
                    t.cumulative_active_requests,
                ));
                if let Some(v) = t.max_slots {
                    out.push(tl("node_mountstats_nfs_transport_maximum_rpc_slots", v));
                }
                if let Some(v) = t.cumulative_sending_queue {
                    out.push(tl("node_mountstats_nfs_transport_sending_queue_total", v));
                }
                if let Some(v) = t.cumulative_pending_queue {
                    out.push(tl("node_mountstats_nfs_transport_pending_queue_total", v));
                }
                for (name, v) in RDMA_FIELDS.iter().zip(&t.rdma) {
                    let name = cache.name("rdma", name, || {
                        format!("node_mountstats_nfs_transport_rdma_{name}_total")
                    });
                    out.push(Sample::with_labels(name, &labels, f(*v)));
                }
            }
            for op in &stats.ops {
                let labels = cache.labels(&mount, &[("operation", op.op.as_str())]);
                let ol = |name: &'static str, v: f64| Sample::with_labels(name, &labels, v);
                out.push(ol(
                    "node_mountstats_nfs_operations_requests_total",
                    f(op.operations),
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_transmissions_total",
                    f(op.transmissions),
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_major_timeouts_total",
                    f(op.major_timeouts),
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_sent_bytes_total",
                    f(op.bytes_sent),
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_received_bytes_total",
                    f(op.bytes_received),
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_queue_time_seconds_total",
                    f(op.queue_ms) / 1000.0,
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_response_time_seconds_total",
                    f(op.rtt_ms) / 1000.0,
                ));
                out.push(ol(
                    "node_mountstats_nfs_operations_request_time_seconds_total",
                    f(op.execute_ms) / 1000.0,
                ));
                if let Some(e) = op.errors {
                    out.push(ol("node_mountstats_nfs_operations_errors_total", f(e)));
                }
                // Averages over the last interval: time per operation.
                let key = &mut cache.key;
                key.clear();
                for part in [m.device.as_str(), protocol, addr.as_str(), op.op.as_str()] {
                    key.push_str(part);
                    key.push('|');
                }
                let base = key.len();
                let mut update = |what: &str, v: u64| {
                    key.truncate(base);
                    key.push_str(what);
                    self.deltas.update(key, v, now)
                };
                let ops = update("ops", op.operations);
                let rtt = update("rtt", op.rtt_ms);
                let exe = update("exe", op.execute_ms);
                if let (Some((d_ops, _)), Some((d_rtt, _)), Some((d_exe, _))) = (ops, rtt, exe)
                    && d_ops > 0
                {
                    out.push(ol(
                        "node_mountstats_nfs_operations_response_time_average_seconds",
                        d_rtt as f64 / d_ops as f64 / 1000.0,
                    ));
                    out.push(ol(
                        "node_mountstats_nfs_operations_request_time_average_seconds",
                        d_exe as f64 / d_ops as f64 / 1000.0,
                    ));
                }
            }
        }
    }
}

/// Transport indices as label values without formatting each time.
const TRANSPORT_INDEX: [&str; 8] = ["0", "1", "2", "3", "4", "5", "6", "7"];

/// Metric names and label sets made once and kept while seen.
#[derive(Default)]
struct Cache {
    names: Interned<Name>,
    labels: Interned<LabelSet>,
    key: String,
}

impl Cache {
    fn end_cycle(&mut self) {
        self.names.end_cycle();
        self.labels.end_cycle();
    }

    /// The name `make` gives for `field` of the table `table`.
    fn name(&mut self, table: &str, field: &str, make: impl FnOnce() -> String) -> Name {
        self.key.clear();
        self.key.push_str(table);
        self.key.push('\0');
        self.key.push_str(field);
        self.names.get(&self.key, || make().into())
    }

    /// The set of `base` plus `more`.
    fn labels(&mut self, base: &[(&'static str, &str)], more: &[(&'static str, &str)]) -> LabelSet {
        self.labels.of_pairs(&mut self.key, base.iter().chain(more))
    }
}

fn emit_client_rpc(stats: &rpc::ClientRpc, cache: &mut Cache, out: &mut Vec<Sample>) {
    if let Some([_, udp, tcp, conns]) = stats.net {
        out.push(Sample::new("node_nfs_packets_total", f(udp)).label("protocol", "udp"));
        out.push(Sample::new("node_nfs_packets_total", f(tcp)).label("protocol", "tcp"));
        out.push(Sample::new("node_nfs_connections_total", f(conns)));
    }
    if let Some([calls, retrans, authrefresh]) = stats.rpc {
        out.push(Sample::new("node_nfs_rpcs_total", f(calls)));
        out.push(Sample::new(
            "node_nfs_rpc_retransmissions_total",
            f(retrans),
        ));
        out.push(Sample::new(
            "node_nfs_rpc_authentication_refreshes_total",
            f(authrefresh),
        ));
    }
    for (version, counts) in &stats.procs {
        let names = match version {
            2 => rpc::V2_PROCS,
            3 => rpc::V3_PROCS,
            4 => rpc::V4_CLIENT_OPS,
            _ => continue,
        };
        // Counters past the end of a table belong to operations newer than
        // this agent: left out rather than guessed.
        let proto = version.to_string();
        for (name, v) in names.iter().zip(counts) {
            let labels = cache.labels(&[("proto", &proto), ("method", name)], &[]);
            out.push(Sample::with_labels(
                "node_nfs_requests_total",
                &labels,
                f(*v),
            ));
        }
    }
}
