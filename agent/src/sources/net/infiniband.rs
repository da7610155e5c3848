//! `/sys/class/infiniband/<hca>/ports/<n>/`: InfiniBand and RoCE ports, with
//! node_exporter's infiniband names.

use std::path::Path;

use vitals_common::model::{LabelSet, Sample};

use crate::sources::util::{Files, Interned, list_dir, resolve_dir};
use crate::sources::{ParseError, SourceError};

/// `counters/` files: (file, metric, multiplier). The data counters count
/// 32-bit words (IBA spec: PortXmitData/PortRcvData are in units of 4 octets).
const COUNTERS: &[(&str, &str, f64)] = &[
    ("link_downed", "node_infiniband_link_downed_total", 1.0),
    (
        "link_error_recovery",
        "node_infiniband_link_error_recovery_total",
        1.0,
    ),
    (
        "multicast_rcv_packets",
        "node_infiniband_multicast_packets_received_total",
        1.0,
    ),
    (
        "multicast_xmit_packets",
        "node_infiniband_multicast_packets_transmitted_total",
        1.0,
    ),
    (
        "port_rcv_constraint_errors",
        "node_infiniband_port_constraint_errors_received_total",
        1.0,
    ),
    (
        "port_xmit_constraint_errors",
        "node_infiniband_port_constraint_errors_transmitted_total",
        1.0,
    ),
    (
        "port_rcv_data",
        "node_infiniband_port_data_received_bytes_total",
        4.0,
    ),
    (
        "port_xmit_data",
        "node_infiniband_port_data_transmitted_bytes_total",
        4.0,
    ),
    (
        "port_rcv_discards",
        "node_infiniband_port_discards_received_total",
        1.0,
    ),
    (
        "port_xmit_discards",
        "node_infiniband_port_discards_transmitted_total",
        1.0,
    ),
    (
        "port_rcv_errors",
        "node_infiniband_port_errors_received_total",
        1.0,
    ),
    (
        "port_rcv_packets",
        "node_infiniband_port_packets_received_total",
        1.0,
    ),
    (
        "port_xmit_packets",
        "node_infiniband_port_packets_transmitted_total",
        1.0,
    ),
    (
        "port_xmit_wait",
        "node_infiniband_port_transmit_wait_total",
        1.0,
    ),
    (
        "unicast_rcv_packets",
        "node_infiniband_unicast_packets_received_total",
        1.0,
    ),
    (
        "unicast_xmit_packets",
        "node_infiniband_unicast_packets_transmitted_total",
        1.0,
    ),
    (
        "port_rcv_remote_physical_errors",
        "node_infiniband_port_receive_remote_physical_errors_total",
        1.0,
    ),
    (
        "port_rcv_switch_relay_errors",
        "node_infiniband_port_receive_switch_relay_errors_total",
        1.0,
    ),
    ("symbol_error", "node_infiniband_symbol_error_total", 1.0),
    ("VL15_dropped", "node_infiniband_vl15_dropped_total", 1.0),
    (
        "excessive_buffer_overrun_errors",
        "node_infiniband_excessive_buffer_overrun_errors_total",
        1.0,
    ),
    (
        "local_link_integrity_errors",
        "node_infiniband_local_link_integrity_errors_total",
        1.0,
    ),
];

/// `counters_ext/` files (the 64-bit extended counters).
const COUNTERS_EXT: &[(&str, &str, f64)] = &[
    (
        "port_rcv_data_64",
        "node_infiniband_legacy_data_received_bytes_total",
        4.0,
    ),
    (
        "port_xmit_data_64",
        "node_infiniband_legacy_data_transmitted_bytes_total",
        4.0,
    ),
    (
        "port_rcv_packets_64",
        "node_infiniband_legacy_packets_received_total",
        1.0,
    ),
    (
        "port_xmit_packets_64",
        "node_infiniband_legacy_packets_transmitted_total",
        1.0,
    ),
    (
        "port_unicast_rcv_packets",
        "node_infiniband_legacy_unicast_packets_received_total",
        1.0,
    ),
    (
        "port_unicast_xmit_packets",
        "node_infiniband_legacy_unicast_packets_transmitted_total",
        1.0,
    ),
    (
        "port_multicast_rcv_packets",
        "node_infiniband_legacy_multicast_packets_received_total",
        1.0,
    ),
    (
        "port_multicast_xmit_packets",
        "node_infiniband_legacy_multicast_packets_transmitted_total",
        1.0,
    ),
];

/// `rate`, e.g. `40 Gb/sec (4X QDR)` or `2.5 Gb/sec (1X SDR)`, in bytes/s.
pub fn parse_rate(text: &str) -> Result<f64, ParseError> {
    let t = text.trim();
    let (num, rest) = t
        .split_once(' ')
        .ok_or_else(|| ParseError::new(1, format!("rate {t:?}: expected \"N Gb/sec ...\"")))?;
    if !rest.starts_with("Gb/sec") {
        return Err(ParseError::new(1, format!("rate {t:?}: expected Gb/sec")));
    }
    let gbit: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| ParseError::new(1, format!("rate {t:?}: {num:?} is not a number")))?;
    Ok(gbit * 1e9 / 8.0)
}

/// `state` / `phys_state`, e.g. `4: ACTIVE`, `5: LinkUp`: (id, name).
pub fn parse_state(text: &str) -> Result<(u64, String), ParseError> {
    let t = text.trim();
    let (id, name) = t
        .split_once(':')
        .ok_or_else(|| ParseError::new(1, format!("state {t:?}: expected \"N: NAME\"")))?;
    let id = id
        .trim()
        .parse::<u64>()
        .map_err(|_| ParseError::new(1, format!("state {t:?}: {id:?} is not a number")))?;
    Ok((id, name.trim().to_string()))
}

/// A counter file: `None` for drivers without a performance management agent
/// (`N/A (no PMA)`).
fn counter(text: &str) -> Result<Option<u64>, ParseError> {
    let t = text.trim();
    if t.starts_with("N/A") {
        return Ok(None);
    }
    t.parse::<u64>()
        .map(Some)
        .map_err(|_| ParseError::new(1, format!("{t:?} is not a counter")))
}

/// The label sets of the HCAs, ports and counters seen (kept while seen).
#[derive(Debug, Default)]
pub struct Cache {
    labels: Interned<LabelSet>,
    key: String,
}

impl Cache {
    pub fn end_cycle(&mut self) {
        self.labels.end_cycle();
    }

    /// The set for the labels `pairs`, made the first time they are seen.
    fn get(&mut self, pairs: &[(&'static str, &str)]) -> LabelSet {
        self.labels.of_pairs(&mut self.key, pairs.iter())
    }
}

/// Reads every HCA and port under `class_dir` (`<sysfs>/class/infiniband`).
/// `Ok(false)` when the directory does not exist.
pub fn collect(
    files: &mut Files,
    cache: &mut Cache,
    class_dir: &Path,
    out: &mut Vec<Sample>,
) -> Result<bool, SourceError> {
    let hcas = match list_dir(class_dir) {
        Ok(h) => h,
        Err(e) if crate::sources::util::is_absent(&e) => return Ok(false),
        Err(e) => {
            return Err(SourceError::Failed(format!("{}: {e}", class_dir.display())));
        }
    };
    for (hca, path) in hcas {
        let Some(dir) = resolve_dir(&path) else {
            continue;
        };
        let board_id = files
            .attr_in(&dir, "board_id")
            .unwrap_or_default()
            .into_owned();
        let firmware = files
            .attr_in(&dir, "fw_ver")
            .unwrap_or_default()
            .into_owned();
        let hca_type = files.attr_in(&dir, "hca_type").unwrap_or_default();
        let info = cache.get(&[
            ("device", hca.as_str()),
            ("board_id", &board_id),
            ("firmware_version", &firmware),
            ("hca_type", &hca_type),
        ]);
        out.push(Sample::with_labels("node_infiniband_info", &info, 1.0));
        let ports = list_dir(&dir.join("ports")).unwrap_or_default();
        for (port, port_dir) in ports {
            collect_port(files, cache, &hca, &port, &port_dir, out)?;
        }
    }
    Ok(true)
}

fn collect_port(
    files: &mut Files,
    cache: &mut Cache,
    hca: &str,
    port: &str,
    dir: &Path,
    out: &mut Vec<Sample>,
) -> Result<(), SourceError> {
    let labels = cache.get(&[("device", hca), ("port", port)]);
    let sample = |name: &'static str, v: f64| Sample::with_labels(name, &labels, v);
    let fail = |file: &Path, e: ParseError| e.in_file(file);
    if let Some(text) = files.attr(&dir.join("state")) {
        let (id, _) = parse_state(&text).map_err(|e| fail(&dir.join("state"), e))?;
        out.push(sample("node_infiniband_state_id", id as f64));
    }
    if let Some(text) = files.attr(&dir.join("phys_state")) {
        let (id, _) = parse_state(&text).map_err(|e| fail(&dir.join("phys_state"), e))?;
        out.push(sample("node_infiniband_physical_state_id", id as f64));
    }
    if let Some(text) = files.attr(&dir.join("rate")) {
        let rate = parse_rate(&text).map_err(|e| fail(&dir.join("rate"), e))?;
        out.push(sample("node_infiniband_rate_bytes_per_second", rate));
    }
    // Which counters a port has depends on the driver: read the ones listed
    // (in the table's order; a listing costs no path or name per entry).
    for (sub, table) in [("counters", COUNTERS), ("counters_ext", COUNTERS_EXT)] {
        let sub_dir = dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&sub_dir) else {
            continue;
        };
        let mut present = [false; 32];
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(i) = table.iter().position(|(f, _, _)| name == *f) {
                present[i] = true;
            }
        }
        for ((file, name, mult), _) in table.iter().zip(present).filter(|(_, p)| *p) {
            if let Some(text) = files.attr_in(&sub_dir, file)
                && let Some(v) = counter(&text).map_err(|e| fail(&sub_dir.join(file), e))?
            {
                out.push(sample(name, v as f64 * mult));
            }
        }
    }
    // Driver-specific counters (RoCE congestion, retransmissions, ...):
    // one series per file, the file name as the `counter` label.
    if let Ok(entries) = list_dir(&dir.join("hw_counters")) {
        for (name, path) in entries {
            // `lifespan` is a setting (ms between counter refreshes), not a count.
            if name == "lifespan" {
                continue;
            }
            if let Some(text) = files.attr(&path)
                && let Some(v) = counter(&text).map_err(|e| fail(&path, e))?
            {
                let labels = cache.get(&[("device", hca), ("port", port), ("counter", &name)]);
                out.push(Sample::with_labels(
                    "node_infiniband_hw_counter_total",
                    &labels,
                    v as f64,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_tables_fit_the_presence_set() {
        assert!(COUNTERS.len() <= 32 && COUNTERS_EXT.len() <= 32);
    }

    #[test]
    fn rates() {
        for (text, want) in [
            ("40 Gb/sec (4X QDR)", 5e9),
            ("10 Gb/sec (4X)", 1.25e9),
            ("2.5 Gb/sec (1X SDR)", 312_500_000.0),
            ("100 Gb/sec (4X EDR)", 12.5e9),
            ("200 Gb/sec (4X HDR)\n", 25e9),
        ] {
            assert_eq!(parse_rate(text).unwrap(), want, "{text}");
        }
        for bad in ["", "fast", "40 Mb/sec", "x Gb/sec", "NaN Gb/sec"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn states() {
        assert_eq!(parse_state("4: ACTIVE").unwrap(), (4, "ACTIVE".into()));
        assert_eq!(parse_state("5: LinkUp\n").unwrap(), (5, "LinkUp".into()));
        assert!(parse_state("ACTIVE").is_err());
        assert!(parse_state("x: ACTIVE").is_err());
    }

    #[test]
    fn counters_without_pma_are_skipped() {
        assert_eq!(counter("N/A (no PMA)").unwrap(), None);
        assert_eq!(counter("4294967295\n").unwrap(), Some(4294967295));
        assert!(counter("-3").is_err());
    }
}
