//! `/proc/<pid>/mountstats`: per-mount NFS client statistics.
//!
//! ```text
//! (lines after the device line start with a tab)
//! device 192.168.1.1:/srv/test mounted on /mnt/nfs/test with fstype nfs4 statvers=1.1
//!     opts:    rw,vers=4.0,...,proto=tcp,...
//!     age:    13968
//!     events:    52 226 0 ...                 (27 counters in statvers 1.1)
//!     bytes:    1207640230 0 0 0 ...          (8 counters)
//!     xprt:    tcp 832 0 1 0 11 6428 ...     (one line per transport; nconnect gives several)
//!     per-op statistics
//!             READ: 1298 1298 0 207680 1210292152 6 79386 79407 [errors]
//! ```

use std::collections::BTreeMap;

use crate::sources::ParseError;
use crate::sources::util::{parse_u64, parse_u64_fields, unescape_octal};

#[derive(Debug, Clone, PartialEq)]
pub struct Mount {
    pub device: String,
    pub mountpoint: String,
    pub fstype: String,
    /// `statvers=` of the device line; only mounts with statistics have one.
    pub stats_version: Option<String>,
    pub nfs: Option<NfsStats>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NfsStats {
    /// `opts:` as key → value (`""` for flags such as `rw`).
    pub opts: BTreeMap<String, String>,
    pub age_seconds: u64,
    /// `events:` in kernel order (see `EVENTS`).
    pub events: Vec<u64>,
    /// `bytes:` in kernel order (see `BYTES`).
    pub bytes: Vec<u64>,
    pub transports: Vec<Transport>,
    pub ops: Vec<OpStats>,
}

/// One `xprt:` line. Fields a protocol does not print are 0 (udp has no
/// connect counters) or `None` (statvers 1.0 lacks the queue gauges).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transport {
    pub protocol: String,
    pub port: u64,
    pub bind: u64,
    pub connect: u64,
    pub connect_time: u64,
    pub idle_time_seconds: u64,
    pub sends: u64,
    pub receives: u64,
    pub bad_xids: u64,
    pub cumulative_active_requests: u64,
    pub cumulative_backlog: u64,
    pub max_slots: Option<u64>,
    pub cumulative_sending_queue: Option<u64>,
    pub cumulative_pending_queue: Option<u64>,
    /// rdma only: the counters after the common ones, in kernel order (see
    /// `RDMA_FIELDS`).
    pub rdma: Vec<u64>,
}

/// One line of `per-op statistics`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpStats {
    pub op: String,
    pub operations: u64,
    pub transmissions: u64,
    pub major_timeouts: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub queue_ms: u64,
    pub rtt_ms: u64,
    pub execute_ms: u64,
    /// Operations that completed with an error (newer kernels print a 9th field).
    pub errors: Option<u64>,
}

/// `events:` counters in the kernel's order (`enum nfs_stat_eventcounters`).
pub const EVENTS: &[&str] = &[
    "inode_revalidate",
    "dnode_revalidate",
    "data_invalidate",
    "attribute_invalidate",
    "vfs_open",
    "vfs_lookup",
    "vfs_access",
    "vfs_update_page",
    "vfs_read_page",
    "vfs_read_pages",
    "vfs_write_page",
    "vfs_write_pages",
    "vfs_getdents",
    "vfs_setattr",
    "vfs_flush",
    "vfs_fsync",
    "vfs_lock",
    "vfs_file_release",
    "congestion_wait",
    "truncation",
    "write_extension",
    "silly_rename",
    "short_read",
    "short_write",
    "jukebox_delay",
    "pnfs_read",
    "pnfs_write",
];

/// `bytes:` counters in the kernel's order, with node_exporter's names.
pub const BYTES: &[&str] = &[
    "read_bytes",
    "write_bytes",
    "direct_read_bytes",
    "direct_write_bytes",
    "total_read_bytes",
    "total_write_bytes",
    "read_pages",
    "write_pages",
];

/// rdma `xprt:` counters after the common ten (`xprt_rdma_print_stats`).
pub const RDMA_FIELDS: &[&str] = &[
    "read_chunks",
    "write_chunks",
    "reply_chunks",
    "request_bytes",
    "reply_bytes",
    "pullup_copies",
    "fixup_copies",
    "hardway_registers",
    "failed_marshals",
    "bad_replies",
];

/// Parses the whole file: every mount, with NFS statistics where present.
pub fn parse_mountstats(text: &str) -> Result<Vec<Mount>, ParseError> {
    let mut mounts: Vec<Mount> = Vec::new();
    let mut in_ops = false;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        if raw.trim().is_empty() {
            in_ops = false;
            continue;
        }
        if let Some(rest) = raw.strip_prefix("device ") {
            mounts.push(parse_device_line(rest, n)?);
            in_ops = false;
            continue;
        }
        if !raw.starts_with(char::is_whitespace) {
            return Err(ParseError::new(n, format!("unexpected line {raw:?}")));
        }
        let Some(mount) = mounts.last_mut() else {
            return Err(ParseError::new(n, "statistics before any device line"));
        };
        let Some(stats) = mount.nfs.as_mut() else {
            // Statistics of a filesystem other than NFS: not ours to read.
            continue;
        };
        let line = raw.trim();
        if line == "per-op statistics" {
            in_ops = true;
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            return Err(ParseError::new(n, format!("no ':' in {line:?}")));
        };
        if in_ops {
            stats.ops.push(parse_op(key, value, n)?);
            continue;
        }
        match key {
            "opts" => {
                for opt in value.trim().split(',').filter(|o| !o.is_empty()) {
                    let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
                    stats.opts.insert(k.to_string(), v.to_string());
                }
            }
            "age" => stats.age_seconds = parse_u64(value.trim(), n, "age")?,
            "events" => stats.events = parse_u64_fields(value, n, "events")?,
            "bytes" => stats.bytes = parse_u64_fields(value, n, "bytes")?,
            "xprt" => {
                if let Some(t) = parse_transport(value, n)? {
                    stats.transports.push(t);
                }
            }
            // caps, nfsv4, sec, fsc, "RPC iostats version", ...: not used.
            _ => {}
        }
    }
    Ok(mounts)
}

fn parse_device_line(rest: &str, n: usize) -> Result<Mount, ParseError> {
    // "<dev> mounted on <path> with fstype <type> [statvers=<v>]"; the kernel
    // escapes whitespace in names as \040, so fields split on whitespace.
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() < 6 || f[1] != "mounted" || f[2] != "on" || f[4] != "with" || f[5] != "fstype" {
        return Err(ParseError::new(
            n,
            "device line is not \"device D mounted on P with fstype T\"",
        ));
    }
    let fstype = f
        .get(6)
        .ok_or_else(|| ParseError::new(n, "device line without a filesystem type"))?;
    let stats_version = f
        .get(7)
        .and_then(|s| s.strip_prefix("statvers="))
        .map(str::to_string);
    let is_nfs = fstype.starts_with("nfs");
    Ok(Mount {
        device: unescape_octal(f[0]),
        mountpoint: unescape_octal(f[3]),
        fstype: (*fstype).to_string(),
        nfs: (is_nfs && stats_version.is_some()).then(NfsStats::default),
        stats_version,
    })
}

fn parse_op(name: &str, value: &str, n: usize) -> Result<OpStats, ParseError> {
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ParseError::new(n, format!("odd operation name {name:?}")));
    }
    let v = parse_u64_fields(value, n, name)?;
    if v.len() < 8 {
        return Err(ParseError::new(
            n,
            format!("{name}: {} counters, need at least 8", v.len()),
        ));
    }
    Ok(OpStats {
        op: name.to_string(),
        operations: v[0],
        transmissions: v[1],
        major_timeouts: v[2],
        bytes_sent: v[3],
        bytes_received: v[4],
        queue_ms: v[5],
        rtt_ms: v[6],
        execute_ms: v[7],
        errors: v.get(8).copied(),
    })
}

/// One `xprt:` line; `None` for a transport this parser does not know.
fn parse_transport(value: &str, n: usize) -> Result<Option<Transport>, ParseError> {
    let mut fields = value.split_whitespace();
    let protocol = fields
        .next()
        .ok_or_else(|| ParseError::new(n, "empty xprt line"))?;
    let v = fields
        .map(|x| parse_u64(x, n, "xprt"))
        .collect::<Result<Vec<u64>, _>>()?;
    let need = |count: usize| {
        if v.len() < count {
            Err(ParseError::new(
                n,
                format!(
                    "xprt {protocol}: {} counters, need at least {count}",
                    v.len()
                ),
            ))
        } else {
            Ok(())
        }
    };
    let queues = |at: usize| {
        (
            v.get(at).copied(),
            v.get(at + 1).copied(),
            v.get(at + 2).copied(),
        )
    };
    let t = match protocol {
        "tcp" | "rdma" => {
            need(10)?;
            let (max_slots, sending, pending) = if protocol == "tcp" {
                queues(10)
            } else {
                (None, None, None)
            };
            Transport {
                protocol: protocol.to_string(),
                port: v[0],
                bind: v[1],
                connect: v[2],
                connect_time: v[3],
                idle_time_seconds: v[4],
                sends: v[5],
                receives: v[6],
                bad_xids: v[7],
                cumulative_active_requests: v[8],
                cumulative_backlog: v[9],
                max_slots,
                cumulative_sending_queue: sending,
                cumulative_pending_queue: pending,
                rdma: if protocol == "rdma" {
                    v[10..].to_vec()
                } else {
                    Vec::new()
                },
            }
        }
        "local" => {
            need(9)?;
            let (max_slots, sending, pending) = queues(9);
            Transport {
                protocol: protocol.to_string(),
                port: 0,
                bind: v[0],
                connect: v[1],
                connect_time: v[2],
                idle_time_seconds: v[3],
                sends: v[4],
                receives: v[5],
                bad_xids: v[6],
                cumulative_active_requests: v[7],
                cumulative_backlog: v[8],
                max_slots,
                cumulative_sending_queue: sending,
                cumulative_pending_queue: pending,
                rdma: Vec::new(),
            }
        }
        "udp" => {
            need(7)?;
            let (max_slots, sending, pending) = queues(7);
            Transport {
                protocol: protocol.to_string(),
                port: v[0],
                bind: v[1],
                sends: v[2],
                receives: v[3],
                bad_xids: v[4],
                cumulative_active_requests: v[5],
                cumulative_backlog: v[6],
                max_slots,
                cumulative_sending_queue: sending,
                cumulative_pending_queue: pending,
                ..Transport::default()
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(t))
}

/// `/proc/<pid>/mountinfo`: the `addr=` super option of each mount, by
/// (source, mount point). Lines without one are skipped.
pub fn parse_mountinfo_addrs(text: &str) -> Result<BTreeMap<(String, String), String>, ParseError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (left, right) = line
            .split_once(" - ")
            .ok_or_else(|| ParseError::new(i + 1, "no \" - \" separator"))?;
        let mountpoint = left
            .split_whitespace()
            .nth(4)
            .ok_or_else(|| ParseError::new(i + 1, "fewer than 5 fields before \" - \""))?;
        let mut r = right.split_whitespace();
        let (_fstype, source, options) = (r.next(), r.next(), r.next());
        let (Some(source), Some(options)) = (source, options) else {
            return Err(ParseError::new(
                i + 1,
                "need filesystem type, source and options after \" - \"",
            ));
        };
        if let Some(addr) = options.split(',').find_map(|o| o.strip_prefix("addr=")) {
            out.insert(
                (unescape_octal(source), unescape_octal(mountpoint)),
                addr.to_string(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_transports_rdma_and_errors_field() {
        let text = "device srv:/a mounted on /mnt/my\\040data with fstype nfs4 statvers=1.1\n\
            \topts:\trw,vers=4.2,proto=rdma,nconnect=2\n\
            \tage:\t10\n\
            \txprt:\trdma 0 0 1 0 3 100 100 0 200 0 1 2 3 4 5 6 7 8 9 10 11 12\n\
            \txprt:\ttcp 875 0 1 0 0 5 5 0 10 0 4 6 8\n\
            \txprt:\tlocal 1 1 0 0 2 2 0 4 0 1 2 3\n\
            \txprt:\tquic 1 2 3\n\
            \tper-op statistics\n\
            \t        READ: 10 10 0 1000 2000 5 40 50 2\n\
            \n";
        let m = parse_mountstats(text).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mountpoint, "/mnt/my data");
        let s = m[0].nfs.as_ref().unwrap();
        assert_eq!(s.opts["proto"], "rdma");
        assert_eq!(s.opts["rw"], "");
        assert_eq!(s.transports.len(), 3, "unknown transports are skipped");
        let rdma = &s.transports[0];
        assert_eq!((rdma.sends, rdma.cumulative_active_requests), (100, 200));
        assert_eq!(rdma.max_slots, None);
        assert_eq!(rdma.rdma[..3], [1, 2, 3]);
        let tcp = &s.transports[1];
        assert_eq!(
            (tcp.port, tcp.max_slots, tcp.cumulative_pending_queue),
            (875, Some(4), Some(8))
        );
        let local = &s.transports[2];
        assert_eq!((local.bind, local.sends, local.max_slots), (1, 2, Some(1)));
        assert_eq!(s.ops[0].errors, Some(2));
        assert_eq!(s.ops[0].rtt_ms, 40);
    }

    #[test]
    fn statvers_1_0_udp_without_queue_gauges() {
        let text =
            "device h:/x mounted on /x with fstype nfs statvers=1.0\n\txprt:\tudp 1 2 3 4 5 6 7\n";
        let m = parse_mountstats(text).unwrap();
        let t = &m[0].nfs.as_ref().unwrap().transports[0];
        assert_eq!((t.port, t.bind, t.sends, t.receives), (1, 2, 3, 4));
        assert_eq!(t.cumulative_backlog, 7);
        assert_eq!(t.max_slots, None);
    }

    #[test]
    fn non_nfs_mounts_have_no_stats() {
        let text = "device proc mounted on /proc with fstype proc\ndevice fuse mounted on /f with fstype fuse statvers=1.0\n\tsomething: 1\n";
        let m = parse_mountstats(text).unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.iter().all(|m| m.nfs.is_none()));
    }

    #[test]
    fn malformed_input_names_the_line() {
        for (text, line) in [
            ("\tage: 1\n", 1),
            ("device x mounted at /y with fstype nfs\n", 1),
            ("device x mounted on /y with fstype\n", 1),
            ("hello\n", 1),
            (
                "device a mounted on /a with fstype nfs statvers=1.1\n\tage: old\n",
                2,
            ),
            (
                "device a mounted on /a with fstype nfs statvers=1.1\n\tper-op statistics\n\tREAD: 1 2 3\n",
                3,
            ),
            (
                "device a mounted on /a with fstype nfs statvers=1.1\n\txprt: tcp 1 2\n",
                2,
            ),
            (
                "device a mounted on /a with fstype nfs statvers=1.1\n\tbytes: 1 -2\n",
                2,
            ),
            (
                "device a mounted on /a with fstype nfs statvers=1.1\n\tnonsense\n",
                2,
            ),
        ] {
            let err = parse_mountstats(text).unwrap_err();
            assert_eq!(err.line, line, "{text:?}: {err}");
        }
    }

    #[test]
    fn mountinfo_addr() {
        let text = "36 35 0:52 / /mnt/nfs/test rw,relatime shared:1 - nfs4 192.168.1.1:/srv/test rw,vers=4.0,addr=192.168.1.1,clientaddr=192.168.1.5\n\
                    37 35 8:1 / / rw - ext4 /dev/sda1 rw\n";
        let m = parse_mountinfo_addrs(text).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            m[&(
                "192.168.1.1:/srv/test".to_string(),
                "/mnt/nfs/test".to_string()
            )],
            "192.168.1.1"
        );
        assert!(parse_mountinfo_addrs("garbage line\n").is_err());
    }
}
