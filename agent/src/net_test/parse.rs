//! The pure parts of the throughput test: byte sizes, `/proc/net/route`
//! (which interface a destination leaves by), `/proc/net/snmp` (TCP
//! retransmitted segments), `/sys/class/net/DEV/speed`.

use std::net::Ipv4Addr;

/// `"256MiB"`, `"1GiB"`, `"100MB"`, `"4096"`: bytes. Units: B, kB/KB, MB,
/// GB, TB (powers of 1000), KiB, MiB, GiB, TiB (powers of 1024).
pub fn bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"256MiB\" or \"1GB\""))?;
    let mul: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" | "K" | "k" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let v = n * mul as f64;
    if !v.is_finite() || v < 1.0 || v > u64::MAX as f64 {
        return Err(format!("{text:?} is not a size of at least one byte"));
    }
    Ok(v.round() as u64)
}

/// A byte size in config: a number of bytes or a string with a unit.
pub mod serde_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        N(u64),
        S(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(n),
            Raw::S(s) => super::bytes(&s).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*n)
    }
}

/// The interface `/proc/net/route` sends `dst` by: the longest matching
/// prefix, then the lowest metric. None: no route (or a file that does
/// not parse).
pub fn route_interface(route: &str, dst: Ipv4Addr) -> Option<String> {
    // The file prints each address as the kernel stores it (network
    // order) read as a host-order number: "0000400A" is 10.64.0.0 on a
    // little-endian host. Its native bytes are the address's.
    let ip = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| u32::from_be_bytes(v.to_ne_bytes()))
    };
    let dst = u32::from(dst);
    let mut best: Option<(u32, u32, String)> = None;
    for line in route.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(net), Some(mask), Ok(metric)) = (ip(f[1]), ip(f[7]), f[6].parse::<u32>()) else {
            continue;
        };
        if dst & mask != net & mask {
            continue;
        }
        let better = match &best {
            None => true,
            Some((m, met, _)) => {
                mask.count_ones() > m.count_ones() || (mask == *m && metric < *met)
            }
        };
        if better {
            best = Some((mask, metric, f[0].to_string()));
        }
    }
    best.map(|b| b.2)
}

/// `Tcp: … RetransSegs …` from `/proc/net/snmp`.
pub fn retrans_segs(snmp: &str) -> Option<u64> {
    let mut lines = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// `/sys/class/net/DEV/speed`: Mbit/s, None where the kernel has none
/// (-1, unreadable, a device without a negotiated speed).
pub fn speed_mbps(text: &str) -> Option<u64> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|s| *s > 0)
        .map(|s| s as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("1 GiB"), Ok(1 << 30));
        assert_eq!(bytes("100MB"), Ok(100_000_000));
        assert_eq!(bytes("1.5GB"), Ok(1_500_000_000));
        assert!(bytes("12 parsecs").unwrap_err().contains("unknown unit"));
        assert!(bytes("MiB").is_err());
        assert!(bytes("0").is_err());
        assert!(bytes("-3MB").is_err());
    }

    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
ens1f0\t0000400A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
ens1f1\t0000400A\t00000000\t0001\t0\t0\t50\t0000FFFF\t0\t0\t0\n\
ib0\t0004400A\t00000000\t0001\t0\t0\t0\t00FCFFFF\t0\t0\t0\n";

    #[test]
    fn routes_longest_prefix_then_metric() {
        let r = |ip: &str| route_interface(ROUTE, ip.parse().unwrap());
        assert_eq!(r("192.168.2.7").as_deref(), Some("eth0"));
        assert_eq!(r("10.64.9.9").as_deref(), Some("ens1f0"), "lower metric");
        assert_eq!(r("10.64.5.1").as_deref(), Some("ib0"), "longer prefix");
        assert_eq!(r("8.8.8.8").as_deref(), Some("eth0"), "default route");
        assert_eq!(route_interface("Iface\n", "8.8.8.8".parse().unwrap()), None);
    }

    #[test]
    fn snmp_and_speed() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin ActiveOpens RetransSegs InErrs\nTcp: 1 200 35 417 0\nUdp: InDatagrams\nUdp: 5\n";
        assert_eq!(retrans_segs(snmp), Some(417));
        assert_eq!(retrans_segs("Tcp: A B\nTcp: 1 2\n"), None);
        assert_eq!(speed_mbps("100000\n"), Some(100_000));
        assert_eq!(speed_mbps("-1\n"), None);
        assert_eq!(speed_mbps(""), None);
    }
}
