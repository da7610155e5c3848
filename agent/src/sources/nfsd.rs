//! The NFS server: `<procfs>/net/rpc/nfsd`, with node_exporter's nfsd names.
//!
//! Reply cache, file handles, disk bytes, threads, read-ahead cache, network
//! and RPC errors, per-version procedure counts and NFSv4 per-operation
//! counts (`proc4ops`, indexed by the operation number of RFC 7530/8881/7862).

use std::path::PathBuf;

use vitals_common::model::{LabelSet, Sample};

use super::nfs::rpc::{V2_PROCS, V3_PROCS, parse_counted, parse_fixed};
use super::util::{Files, Interned, f, parse_u64_fields};
use super::{ParseError, Source, SourceError};
use crate::config::RawConfig;

/// NFSv4 operations by number (index = operation number; 0–2 are unused).
/// Names are node_exporter's where it has one (it calls LOOKUPP
/// "LookupRoot" and OPEN_DOWNGRADE "OpenDgrd"); node_exporter reports 3–39
/// without PUTPUBFH and PUTROOTFH, this table goes on to the NFSv4.2
/// extended attribute operations.
pub const V4_SERVER_OPS: &[&str] = &[
    "",
    "",
    "",
    "Access",
    "Close",
    "Commit",
    "Create",
    "DelegPurge",
    "DelegReturn",
    "GetAttr",
    "GetFH",
    "Link",
    "Lock",
    "Lockt",
    "Locku",
    "Lookup",
    "LookupRoot",
    "Nverify",
    "Open",
    "OpenAttr",
    "OpenConfirm",
    "OpenDgrd",
    "PutFH",
    "PutPubFH",
    "PutRootFH",
    "Read",
    "ReadDir",
    "ReadLink",
    "Remove",
    "Rename",
    "Renew",
    "RestoreFH",
    "SaveFH",
    "SecInfo",
    "SetAttr",
    "SetClientID",
    "SetClientIDConfirm",
    "Verify",
    "Write",
    "RelLockOwner",
    "BackchannelCtl",
    "BindConnToSession",
    "ExchangeID",
    "CreateSession",
    "DestroySession",
    "FreeStateID",
    "GetDirDelegation",
    "GetDeviceInfo",
    "GetDeviceList",
    "LayoutCommit",
    "LayoutGet",
    "LayoutReturn",
    "SecInfoNoName",
    "Sequence",
    "SetSSV",
    "TestStateID",
    "WantDelegation",
    "DestroyClientID",
    "ReclaimComplete",
    "Allocate",
    "Copy",
    "CopyNotify",
    "DeAllocate",
    "IOAdvise",
    "LayoutError",
    "LayoutStats",
    "OffloadCancel",
    "OffloadStatus",
    "ReadPlus",
    "Seek",
    "WriteSame",
    "Clone",
    "GetXattr",
    "SetXattr",
    "ListXattrs",
    "RemoveXattr",
];

/// Counters of `/proc/net/rpc/nfsd`; `None` for lines the kernel did not print.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerRpc {
    /// `rc`: hits, misses, nocache.
    pub reply_cache: Option<[u64; 3]>,
    /// `fh`: stale (the other four are always 0 on current kernels).
    pub file_handles_stale: Option<u64>,
    /// `io`: bytes read, bytes written.
    pub io: Option<[u64; 2]>,
    /// `th`: threads.
    pub threads: Option<u64>,
    /// `ra`: cache size, then ten depth buckets, then not-found.
    pub read_ahead: Option<(u64, u64)>,
    /// `net`: packets, udp, tcp, tcp connections.
    pub net: Option<[u64; 4]>,
    /// `rpc`: calls, bad total, bad format, bad auth, bad client.
    pub rpc: Option<[u64; 5]>,
    /// `proc2`, `proc3`, `proc4` (NULL, COMPOUND): counts by procedure.
    pub procs: Vec<(u8, Vec<u64>)>,
    /// `proc4ops`: counts by NFSv4 operation number.
    pub v4_ops: Vec<u64>,
    /// `wdeleg_getattr`: GETATTRs answered from a write delegation.
    pub wdeleg_getattr: Option<u64>,
}

/// Parses `/proc/net/rpc/nfsd`. Lines it does not know are skipped.
pub fn parse_nfsd(text: &str) -> Result<ServerRpc, ParseError> {
    let mut out = ServerRpc::default();
    let mut any = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((name, rest)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        any = true;
        match name {
            "rc" => out.reply_cache = Some(parse_fixed::<3>(rest, n, "rc")?),
            "fh" => out.file_handles_stale = Some(parse_fixed::<1>(rest, n, "fh")?[0]),
            "io" => out.io = Some(parse_fixed::<2>(rest, n, "io")?),
            "th" => {
                // Older kernels follow the thread count with a "full" count
                // and a histogram of decimals: only the first field is used.
                let first = rest.split_whitespace().next().unwrap_or("");
                out.threads =
                    Some(first.parse().map_err(|_| {
                        ParseError::new(n, format!("th: {first:?} is not a count"))
                    })?);
            }
            "ra" => {
                let v = parse_u64_fields(rest, n, "ra")?;
                let (Some(size), Some(not_found)) = (v.first(), v.last()) else {
                    return Err(ParseError::new(n, "ra: empty"));
                };
                if v.len() < 2 {
                    return Err(ParseError::new(n, "ra: need size and not-found"));
                }
                out.read_ahead = Some((*size, *not_found));
            }
            "net" => out.net = Some(parse_fixed::<4>(rest, n, "net")?),
            "rpc" => out.rpc = Some(parse_fixed::<5>(rest, n, "rpc")?),
            "proc4ops" => out.v4_ops = parse_counted(rest, n, "proc4ops")?,
            "wdeleg_getattr" => {
                out.wdeleg_getattr = Some(parse_fixed::<1>(rest, n, "wdeleg_getattr")?[0])
            }
            _ => {
                if let Some(version) = name.strip_prefix("proc")
                    && let Ok(version) = version.parse::<u8>()
                {
                    out.procs.push((version, parse_counted(rest, n, name)?));
                }
            }
        }
    }
    if !any {
        return Err(ParseError::new(1, "empty"));
    }
    Ok(out)
}

pub struct Nfsd {
    procfs: PathBuf,
    files: Files,
    labels: Interned<LabelSet>,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    Box::new(Nfsd {
        procfs: cfg.paths.procfs.clone(),
        files: Files::default(),
        labels: Interned::default(),
    })
}

impl Source for Nfsd {
    fn name(&self) -> &'static str {
        "nfsd"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let result = self.read(out);
        self.files.end_cycle();
        self.labels.end_cycle();
        result
    }
}

impl Nfsd {
    fn read(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        let path = self.procfs.join("net/rpc/nfsd");
        let Some(text) = self.files.read(&path)? else {
            return Err(SourceError::Unavailable(format!(
                "{} does not exist (no NFS server here)",
                path.display()
            )));
        };
        let s = parse_nfsd(&text).map_err(|e| e.in_file(&path))?;
        emit(&s, &mut self.labels, out);
        Ok(())
    }
}

/// `{proto, method}` sets, made once per pair and kept while seen.
fn method_labels(
    cache: &mut Interned<LabelSet>,
    key: &mut String,
    proto: &str,
    method: &str,
) -> LabelSet {
    key.clear();
    key.push_str(proto);
    key.push('\0');
    key.push_str(method);
    cache.get(key, || {
        if proto.is_empty() {
            LabelSet::default().with("method", method)
        } else {
            LabelSet::default()
                .with("proto", proto)
                .with("method", method)
        }
    })
}

fn emit(s: &ServerRpc, cache: &mut Interned<LabelSet>, out: &mut Vec<Sample>) {
    let mut key = String::new();
    if let Some([hits, misses, nocache]) = s.reply_cache {
        out.push(Sample::new("node_nfsd_reply_cache_hits_total", f(hits)));
        out.push(Sample::new("node_nfsd_reply_cache_misses_total", f(misses)));
        out.push(Sample::new(
            "node_nfsd_reply_cache_nocache_total",
            f(nocache),
        ));
    }
    if let Some(stale) = s.file_handles_stale {
        out.push(Sample::new("node_nfsd_file_handles_stale_total", f(stale)));
    }
    if let Some([read, written]) = s.io {
        out.push(Sample::new("node_nfsd_disk_bytes_read_total", f(read)));
        out.push(Sample::new(
            "node_nfsd_disk_bytes_written_total",
            f(written),
        ));
    }
    if let Some(t) = s.threads {
        out.push(Sample::new("node_nfsd_server_threads", f(t)));
    }
    if let Some((size, not_found)) = s.read_ahead {
        out.push(Sample::new(
            "node_nfsd_read_ahead_cache_size_blocks",
            f(size),
        ));
        out.push(Sample::new(
            "node_nfsd_read_ahead_cache_not_found_total",
            f(not_found),
        ));
    }
    if let Some([_, udp, tcp, conns]) = s.net {
        out.push(Sample::new("node_nfsd_packets_total", f(udp)).label("proto", "udp"));
        out.push(Sample::new("node_nfsd_packets_total", f(tcp)).label("proto", "tcp"));
        out.push(Sample::new("node_nfsd_connections_total", f(conns)));
    }
    if let Some([calls, _bad, fmt, auth, client]) = s.rpc {
        out.push(Sample::new("node_nfsd_server_rpcs_total", f(calls)));
        for (error, v) in [("fmt", fmt), ("auth", auth), ("cInt", client)] {
            out.push(Sample::new("node_nfsd_rpc_errors_total", f(v)).label("error", error));
        }
    }
    for (version, counts) in &s.procs {
        let names: &[&str] = match version {
            2 => V2_PROCS,
            3 => V3_PROCS,
            // NFSv4 has two procedures: NULL and COMPOUND (whose operations
            // are counted in proc4ops).
            4 => &["Null", "Compound"],
            _ => continue,
        };
        let metric = if *version == 4 {
            "node_nfsd_v4_procedures_total"
        } else {
            "node_nfsd_requests_total"
        };
        // NFSv4's procedures have no `proto` label.
        let proto = if *version == 4 {
            String::new()
        } else {
            version.to_string()
        };
        for (name, v) in names.iter().zip(counts) {
            let labels = method_labels(cache, &mut key, &proto, name);
            out.push(Sample::with_labels(metric, &labels, f(*v)));
        }
    }
    for (name, v) in V4_SERVER_OPS.iter().zip(&s.v4_ops) {
        if !name.is_empty() {
            let labels = method_labels(cache, &mut key, "4", name);
            out.push(Sample::with_labels(
                "node_nfsd_requests_total",
                &labels,
                f(*v),
            ));
        }
    }
    if let Some(v) = s.wdeleg_getattr {
        out.push(
            Sample::new("node_nfsd_requests_total", f(v))
                .label("proto", "4")
                .label("method", "WdelegGetattr"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_numbers_match_the_rfcs() {
        assert_eq!(V4_SERVER_OPS[3], "Access");
        assert_eq!(V4_SERVER_OPS[9], "GetAttr");
        assert_eq!(V4_SERVER_OPS[22], "PutFH");
        assert_eq!(V4_SERVER_OPS[38], "Write");
        assert_eq!(V4_SERVER_OPS[39], "RelLockOwner");
        assert_eq!(V4_SERVER_OPS[53], "Sequence");
        assert_eq!(V4_SERVER_OPS[71], "Clone");
        assert_eq!(V4_SERVER_OPS[75], "RemoveXattr");
    }

    #[test]
    fn newer_kernels_without_ra_and_with_short_th() {
        let s = parse_nfsd("rc 1 2 3\nth 16\nnet 1 0 1 1\nproc4ops 4 0 0 0 9\n").unwrap();
        assert_eq!(s.threads, Some(16));
        assert_eq!(s.read_ahead, None);
        assert_eq!(s.v4_ops, vec![0, 0, 0, 9]);
        let mut out = Vec::new();
        emit(&s, &mut Interned::default(), &mut out);
        let access = out
            .iter()
            .find(|x| x.labels.get("method").map(String::as_str) == Some("Access"))
            .unwrap();
        assert_eq!(access.value, 9.0);
    }

    #[test]
    fn malformed_lines_are_errors() {
        for (text, line) in [
            ("rc 1 2\n", 1),
            ("rc 1 2 3\nio x 1\n", 2),
            ("th many\n", 1),
            ("proc3 3 1 2\n", 1),
            ("rpc 1 2 3 4\n", 1),
            ("", 1),
        ] {
            assert_eq!(parse_nfsd(text).unwrap_err().line, line, "{text:?}");
        }
    }
}
