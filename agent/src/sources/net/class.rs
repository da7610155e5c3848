//! `/sys/class/net/<dev>/`: link state, speed, MTU and the like, with
//! node_exporter's netclass names.

use std::collections::BTreeMap;
use std::path::Path;

use vitals_common::model::{LabelSet, Name, Sample};

use crate::sources::ParseError;
use crate::sources::util::Files;

/// Attributes read from each device directory.
pub const ATTRS: &[&str] = &[
    "addr_assign_type",
    "address",
    "broadcast",
    "carrier",
    "carrier_changes",
    "carrier_up_count",
    "carrier_down_count",
    "dev_id",
    "dormant",
    "duplex",
    "flags",
    "ifalias",
    "ifindex",
    "iflink",
    "link_mode",
    "mtu",
    "name_assign_type",
    "netdev_group",
    "operstate",
    "speed",
    "tx_queue_len",
    "type",
];

/// The keys of `EXTRA_STATISTICS` in [`IfaceAttrs::get`] and the attribute
/// lookups of [`push_iface_samples`].
const STATISTICS_KEYS: [&str; 8] = [
    "statistics/rx_crc_errors",
    "statistics/rx_length_errors",
    "statistics/rx_missed_errors",
    "statistics/rx_over_errors",
    "statistics/rx_nohandler",
    "statistics/tx_aborted_errors",
    "statistics/tx_heartbeat_errors",
    "statistics/tx_window_errors",
];

/// `statistics/` files that `/proc/net/dev` does not already carry, and the
/// names they are exported under.
pub const EXTRA_STATISTICS: &[(&str, &str)] = &[
    ("rx_crc_errors", "node_network_receive_crc_errors_total"),
    (
        "rx_length_errors",
        "node_network_receive_length_errors_total",
    ),
    (
        "rx_missed_errors",
        "node_network_receive_missed_errors_total",
    ),
    ("rx_over_errors", "node_network_receive_over_errors_total"),
    ("rx_nohandler", "node_network_receive_nohandler_total"),
    (
        "tx_aborted_errors",
        "node_network_transmit_aborted_errors_total",
    ),
    (
        "tx_heartbeat_errors",
        "node_network_transmit_heartbeat_errors_total",
    ),
    (
        "tx_window_errors",
        "node_network_transmit_window_errors_total",
    ),
];

/// The attributes of one device as read: `ATTRS`, then `statistics/` files
/// of `EXTRA_STATISTICS`, each `None` when unreadable. Reused from device
/// to device and cycle to cycle, so reading allocates nothing once warm.
#[derive(Debug, Default)]
pub struct IfaceAttrs {
    values: Vec<Option<String>>,
}

impl IfaceAttrs {
    fn set(&mut self, i: usize, v: Option<&str>) {
        if self.values.len() <= i {
            self.values.resize(i + 1, None);
        }
        match (v, &mut self.values[i]) {
            (Some(v), Some(slot)) => {
                slot.clear();
                slot.push_str(v);
            }
            (Some(v), slot) => *slot = Some(v.to_string()),
            (None, slot) => *slot = None,
        }
    }

    /// An attribute by name (`statistics/rx_crc_errors` for a statistic).
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = match name.strip_prefix("statistics/") {
            Some(file) => ATTRS.len() + EXTRA_STATISTICS.iter().position(|(f, _)| *f == file)?,
            None => ATTRS.iter().position(|a| *a == name)?,
        };
        self.values.get(i)?.as_deref()
    }
}

/// Reads the attributes of one device directory; unreadable ones are left
/// out (a link that is down refuses `speed`, some drivers refuse `duplex`).
pub fn read_iface(files: &mut Files, dir: &Path, attrs: &mut IfaceAttrs) {
    for (i, name) in ATTRS.iter().enumerate() {
        let v = files.attr_in(dir, name);
        attrs.set(i, v.as_deref());
    }
    let stats = dir.join("statistics");
    let have_stats = stats.is_dir();
    for (i, (file, _)) in EXTRA_STATISTICS.iter().enumerate() {
        let v = if have_stats {
            files.attr_in(&stats, file)
        } else {
            None
        };
        attrs.set(ATTRS.len() + i, v.as_deref());
    }
}

/// An integer attribute, decimal or `0x` hex (`dev_id`, `flags`).
fn int<'a>(
    attrs: &impl Fn(&str) -> Option<&'a str>,
    name: &str,
) -> Result<Option<i64>, ParseError> {
    let Some(v) = attrs(name) else {
        return Ok(None);
    };
    if v.is_empty() {
        return Ok(None);
    }
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None => v.parse::<i64>().ok(),
    };
    parsed
        .map(Some)
        .ok_or_else(|| ParseError::new(1, format!("{name}: {v:?} is not an integer")))
}

/// The samples for one device, from its attributes. Pure: tested as data.
pub fn iface_samples(
    device: &str,
    attrs: &BTreeMap<String, String>,
) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    let labels = LabelSet::default().with("device", device);
    push_iface_samples(
        &labels,
        &|name| attrs.get(name).map(String::as_str),
        &mut |info| info.into_iter().collect(),
        &mut out,
    )?;
    Ok(out)
}

/// `node_network_info`'s labels: (name, value) in order.
pub type InfoLabels<'a> = [(&'static str, &'a str); 7];

/// [`iface_samples`] for the collect path: `labels` is the device's set,
/// `info` makes (or finds) the label set of `node_network_info`.
pub fn push_iface_samples<'a>(
    labels: &LabelSet,
    attrs: &impl Fn(&str) -> Option<&'a str>,
    info: &mut impl FnMut(InfoLabels<'_>) -> LabelSet,
    out: &mut Vec<Sample>,
) -> Result<(), ParseError> {
    let mut push = |name: &'static str, v: f64| out.push(Sample::with_labels(name, labels, v));
    const GAUGES: &[(&str, &str)] = &[
        ("addr_assign_type", "node_network_address_assign_type"),
        ("carrier", "node_network_carrier"),
        ("carrier_changes", "node_network_carrier_changes_total"),
        ("carrier_up_count", "node_network_carrier_up_changes_total"),
        (
            "carrier_down_count",
            "node_network_carrier_down_changes_total",
        ),
        ("dev_id", "node_network_device_id"),
        ("dormant", "node_network_dormant"),
        ("flags", "node_network_flags"),
        ("ifindex", "node_network_iface_id"),
        ("iflink", "node_network_iface_link"),
        ("link_mode", "node_network_iface_link_mode"),
        ("mtu", "node_network_mtu_bytes"),
        ("name_assign_type", "node_network_name_assign_type"),
        ("netdev_group", "node_network_net_dev_group"),
        ("type", "node_network_protocol_type"),
        ("tx_queue_len", "node_network_transmit_queue_length"),
    ];
    for (attr, name) in GAUGES {
        if let Some(v) = int(attrs, attr)? {
            push(name, v as f64);
        }
    }
    // The kernel reports -1 (or nothing) when the speed is unknown.
    if let Some(mbps) = int(attrs, "speed")?
        && mbps >= 0
    {
        push("node_network_speed_bytes", mbps as f64 * 125_000.0);
    }
    for (key, name) in STATISTICS_KEYS.iter().zip(EXTRA_STATISTICS) {
        if let Some(v) = attrs(key) {
            let v = v
                .parse::<u64>()
                .map_err(|_| ParseError::new(1, format!("{key}: {v:?} is not a counter")))?;
            push(name.1, v as f64);
        }
    }
    let operstate = attrs("operstate").unwrap_or_default();
    push("node_network_up", if operstate == "up" { 1.0 } else { 0.0 });
    let adminstate = match int(attrs, "flags")? {
        Some(flags) if flags & 1 == 1 => "up",
        Some(_) => "down",
        None => "unknown",
    };
    let text = |k: &str| attrs(k).unwrap_or_default();
    let device = labels.get("device").map(String::as_str).unwrap_or_default();
    let info = info([
        ("device", device),
        ("address", text("address")),
        ("broadcast", text("broadcast")),
        ("duplex", text("duplex")),
        ("ifalias", text("ifalias")),
        ("operstate", operstate),
        ("adminstate", adminstate),
    ]);
    out.push(Sample::with_labels(
        Name::literal("node_network_info"),
        &info,
        1.0,
    ));
    Ok(())
}

/// The expected speed for `device` from `{pattern: mbps}`: an exact name
/// wins, then the longest matching pattern.
pub fn expected_speed_mbps(patterns: &BTreeMap<String, u64>, device: &str) -> Option<u64> {
    if let Some(v) = patterns.get(device) {
        return Some(*v);
    }
    patterns
        .iter()
        .filter(|(p, _)| crate::sources::util::glob_match(p, device))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn value(samples: &[Sample], name: &str) -> Option<f64> {
        samples.iter().find(|s| s.name == name).map(|s| s.value)
    }

    #[test]
    fn statistics_keys_follow_the_table() {
        for (key, (file, _)) in STATISTICS_KEYS.iter().zip(EXTRA_STATISTICS) {
            assert_eq!(key.strip_prefix("statistics/"), Some(*file));
        }
        assert_eq!(STATISTICS_KEYS.len(), EXTRA_STATISTICS.len());
    }

    #[test]
    fn hex_flags_speed_and_state() {
        let s = iface_samples(
            "ens1f0",
            &attrs(&[
                ("flags", "0x1303"),
                ("dev_id", "0x20"),
                ("speed", "100000"),
                ("operstate", "up"),
                ("mtu", "9000"),
                ("statistics/rx_crc_errors", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(value(&s, "node_network_flags"), Some(4867.0));
        assert_eq!(value(&s, "node_network_device_id"), Some(32.0));
        assert_eq!(
            value(&s, "node_network_speed_bytes"),
            Some(12_500_000_000.0)
        );
        assert_eq!(value(&s, "node_network_up"), Some(1.0));
        assert_eq!(value(&s, "node_network_mtu_bytes"), Some(9000.0));
        assert_eq!(
            value(&s, "node_network_receive_crc_errors_total"),
            Some(7.0)
        );
        let info = s.iter().find(|s| s.name == "node_network_info").unwrap();
        assert_eq!(info.labels["adminstate"], "up");
        assert_eq!(info.labels["operstate"], "up");
    }

    #[test]
    fn unknown_speed_is_left_out_and_garbage_is_an_error() {
        let s = iface_samples("bond0", &attrs(&[("speed", "-1"), ("operstate", "down")])).unwrap();
        assert_eq!(value(&s, "node_network_speed_bytes"), None);
        assert_eq!(value(&s, "node_network_up"), Some(0.0));
        let err = iface_samples("x", &attrs(&[("mtu", "lots")])).unwrap_err();
        assert!(err.message.contains("mtu"), "{err}");
    }

    #[test]
    fn expected_speed_prefers_exact_then_longest_pattern() {
        let p: BTreeMap<String, u64> = [
            ("ens*".to_string(), 100_000),
            ("ens1f*".to_string(), 25_000),
            ("ens9".to_string(), 10_000),
        ]
        .into();
        assert_eq!(expected_speed_mbps(&p, "ens2f0"), Some(100_000));
        assert_eq!(expected_speed_mbps(&p, "ens1f0"), Some(25_000));
        assert_eq!(expected_speed_mbps(&p, "ens9"), Some(10_000));
        assert_eq!(expected_speed_mbps(&p, "eth0"), None);
    }
}
