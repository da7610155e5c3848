//! Network devices and InfiniBand/RoCE ports.
//!
//! - `<procfs>/net/dev`: receive/transmit counters per device
//!   (`node_network_{receive,transmit}_*_total`).
//! - `<sysfs>/class/net/<dev>/`: speed, operstate, carrier and its changes,
//!   MTU, duplex, `statistics/*` (node_exporter's netclass names).
//! - `[sources.net] expected_speed_mbps`: `node_network_expected_speed_bytes`
//!   so a rule can compare it with `node_network_speed_bytes` (a 100GbE port
//!   that came up at 25G).
//! - Per interval: `node_network_{receive,transmit}_utilization_ratio`, the
//!   throughput of the last interval as a fraction of the link speed.
//! - `<sysfs>/class/infiniband/<hca>/ports/<n>/` (see `infiniband`).

pub mod class;
pub mod infiniband;
pub mod netdev;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use vitals_common::model::{LabelSet, Name, Sample};

use super::util::{Deltas, Files, Interned, NameFilter, list_dir, resolve_dir};
use super::{Source, SourceError};
use crate::config::RawConfig;

pub struct Net {
    procfs: PathBuf,
    sysfs: PathBuf,
    filter: NameFilter,
    expected_speed_mbps: BTreeMap<String, u64>,
    infiniband: bool,
    deltas: Deltas,
    files: Files,
    /// `{device}` per device, `node_network_info`'s set per distinct
    /// labelling, and the `node_network_<field>_total` names.
    devices: Interned<LabelSet>,
    infos: Interned<LabelSet>,
    names: Interned<Name>,
    /// A key or a path being built.
    key: String,
    attrs: class::IfaceAttrs,
    ib: infiniband::Cache,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let net = &cfg.sources.net;
    Box::new(Net {
        procfs: cfg.paths.procfs.clone(),
        sysfs: cfg.paths.sysfs.clone(),
        filter: NameFilter::new(&net.include, &net.exclude),
        expected_speed_mbps: net.expected_speed_mbps.clone(),
        infiniband: net.infiniband,
        deltas: Deltas::default(),
        files: Files::default(),
        devices: Interned::default(),
        infos: Interned::default(),
        names: Interned::default(),
        key: String::new(),
        attrs: class::IfaceAttrs::default(),
        ib: infiniband::Cache::default(),
    })
}

impl Source for Net {
    fn name(&self) -> &'static str {
        "net"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let result = self.read(out);
        self.files.end_cycle();
        self.devices.end_cycle();
        self.infos.end_cycle();
        self.names.end_cycle();
        self.ib.end_cycle();
        result
    }
}

impl Net {
    fn read(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let now = Instant::now();
        let mut found = false;
        // Bytes moved in the last interval and the seconds it lasted.
        let mut moved: HashMap<(String, &'static str), (u64, f64)> = HashMap::new();

        let dev_path = self.procfs.join("net/dev");
        if let Some(text) = self.files.read(&dev_path)? {
            found = true;
            let devs = netdev::parse_net_dev(&text).map_err(|e| e.in_file(&dev_path))?;
            for dev in devs.iter().filter(|d| self.filter.allows(&d.device)) {
                let labels = device_labels(&mut self.devices, &dev.device);
                for (field, v) in &dev.counters {
                    let name = self
                        .names
                        .get(field, || format!("node_network_{field}_total").into());
                    out.push(Sample::with_labels(name, &labels, *v as f64));
                }
                for (field, dir) in [("receive_bytes", "receive"), ("transmit_bytes", "transmit")] {
                    if let Some(v) = dev.get(field) {
                        self.key.clear();
                        self.key.push_str(&dev.device);
                        self.key.push('/');
                        self.key.push_str(field);
                        if let Some(d) = self.deltas.update(&self.key, v, now) {
                            moved.insert((dev.device.clone(), dir), d);
                        }
                    }
                }
            }
        }

        let class_dir = self.sysfs.join("class/net");
        let mut speeds: HashMap<String, f64> = HashMap::new();
        match list_dir(&class_dir) {
            Ok(entries) => {
                found = true;
                for (device, path) in entries {
                    if device == "bonding_masters" || !self.filter.allows(&device) {
                        continue;
                    }
                    let Some(dir) = resolve_dir(&path) else {
                        continue;
                    };
                    class::read_iface(&mut self.files, &dir, &mut self.attrs);
                    let labels = device_labels(&mut self.devices, &device);
                    let first = out.len();
                    let (infos, key) = (&mut self.infos, &mut self.key);
                    class::push_iface_samples(
                        &labels,
                        &|name| self.attrs.get(name),
                        &mut |info| {
                            // One set per distinct labelling, kept while seen.
                            key.clear();
                            for (_, v) in &info {
                                key.push_str(v);
                                key.push('\0');
                            }
                            infos.get(key, || info.into_iter().collect())
                        },
                        out,
                    )
                    .map_err(|e| e.in_file(&dir))?;
                    if let Some(s) = out[first..]
                        .iter()
                        .find(|s| s.name == "node_network_speed_bytes")
                    {
                        speeds.insert(device.clone(), s.value);
                    }
                    if let Some(mbps) =
                        class::expected_speed_mbps(&self.expected_speed_mbps, &device)
                    {
                        out.push(Sample::with_labels(
                            "node_network_expected_speed_bytes",
                            &labels,
                            mbps as f64 * 125_000.0,
                        ));
                    }
                }
            }
            Err(e) if super::util::is_absent(&e) => {}
            Err(e) => {
                return Err(SourceError::Failed(format!("{}: {e}", class_dir.display())));
            }
        }
        self.deltas.finish_cycle();

        let mut moved: Vec<_> = moved.into_iter().collect();
        moved.sort_by(|a, b| a.0.cmp(&b.0));
        for ((device, dir), (bytes, secs)) in moved {
            if let Some(speed) = speeds.get(&device).copied().filter(|s| *s > 0.0)
                && secs > 0.0
            {
                let name = if dir == "receive" {
                    "node_network_receive_utilization_ratio"
                } else {
                    "node_network_transmit_utilization_ratio"
                };
                let labels = device_labels(&mut self.devices, &device);
                out.push(Sample::with_labels(
                    name,
                    &labels,
                    bytes as f64 / secs / speed,
                ));
            }
        }

        if self.infiniband
            && infiniband::collect(
                &mut self.files,
                &mut self.ib,
                &self.sysfs.join("class/infiniband"),
                out,
            )?
        {
            found = true;
        }
        if !found {
            return Err(SourceError::Unavailable(format!(
                "neither {} nor {} exists",
                dev_path.display(),
                class_dir.display()
            )));
        }
        Ok(())
    }
}

/// `{device="NAME"}`, made once per device.
fn device_labels(devices: &mut Interned<LabelSet>, device: &str) -> LabelSet {
    devices.get(device, || LabelSet::default().with("device", device))
}
