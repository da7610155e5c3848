//! `/proc/net/rpc/nfs` (client RPC counters) and the procedure-name tables
//! shared with the server side.

use crate::sources::ParseError;
use crate::sources::util::parse_u64_fields;

/// NFSv2 procedures, in protocol order (node_exporter's names).
pub const V2_PROCS: &[&str] = &[
    "Null", "GetAttr", "SetAttr", "Root", "Lookup", "ReadLink", "Read", "WrCache", "Write",
    "Create", "Remove", "Rename", "Link", "SymLink", "MkDir", "RmDir", "ReadDir", "FsStat",
];

/// NFSv3 procedures, in protocol order (node_exporter's names).
pub const V3_PROCS: &[&str] = &[
    "Null",
    "GetAttr",
    "SetAttr",
    "Lookup",
    "Access",
    "ReadLink",
    "Read",
    "Write",
    "Create",
    "MkDir",
    "SymLink",
    "MkNod",
    "Remove",
    "RmDir",
    "Rename",
    "Link",
    "ReadDir",
    "ReadDirPlus",
    "FsStat",
    "FsInfo",
    "PathConf",
    "Commit",
];

/// NFSv4 client operations as the `proc4` line counts them: indexed by the
/// kernel's `NFSPROC4_CLNT_*` enum in `include/linux/nfs4.h` (the layout
/// since Linux 3.13, which added FSID_PRESENT). Names are node_exporter's
/// where it has one.
///
/// Entries 44 and 45 follow the kernel: LAYOUTGET comes before GETDEVICEINFO.
/// prometheus/procfs (and so node_exporter) label these two the other way
/// round, which swaps their values; this table does not.
pub const V4_CLIENT_OPS: &[&str] = &[
    "Null",
    "Read",
    "Write",
    "Commit",
    "Open",
    "OpenConfirm",
    "OpenNoattr",
    "OpenDowngrade",
    "Close",
    "Setattr",
    "FsInfo",
    "Renew",
    "SetClientID",
    "SetClientIDConfirm",
    "Lock",
    "Lockt",
    "Locku",
    "Access",
    "Getattr",
    "Lookup",
    "LookupRoot",
    "Remove",
    "Rename",
    "Link",
    "Symlink",
    "Create",
    "Pathconf",
    "StatFs",
    "ReadLink",
    "ReadDir",
    "ServerCaps",
    "DelegReturn",
    "GetACL",
    "SetACL",
    "FsLocations",
    "ReleaseLockowner",
    "Secinfo",
    "FsidPresent",
    "ExchangeID",
    "CreateSession",
    "DestroySession",
    "Sequence",
    "GetLeaseTime",
    "ReclaimComplete",
    "LayoutGet",     // 44: NFSPROC4_CLNT_LAYOUTGET
    "GetDeviceInfo", // 45: NFSPROC4_CLNT_GETDEVICEINFO
    "LayoutCommit",
    "LayoutReturn",
    "SecinfoNoName",
    "TestStateID",
    "FreeStateID",
    "GetDeviceList",
    "BindConnToSession",
    "DestroyClientID",
    "Seek",
    "Allocate",
    "DeAllocate",
    "LayoutStats",
    "Clone",
    "Copy",
    "OffloadCancel",
    "LookupP",
    "LayoutError",
    "CopyNotify",
    "GetXattr",
    "SetXattr",
    "ListXattrs",
    "RemoveXattr",
    "ReadPlus",
];

/// Counters of `/proc/net/rpc/nfs`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClientRpc {
    /// `net`: packets, udp packets, tcp packets, tcp connections.
    pub net: Option<[u64; 4]>,
    /// `rpc`: calls, retransmissions, authentication refreshes.
    pub rpc: Option<[u64; 3]>,
    /// `procN`: (N, counts in procedure order).
    pub procs: Vec<(u8, Vec<u64>)>,
}

/// A `procN` line after its name: a count, then that many counters.
pub fn parse_counted(rest: &str, n: usize, what: &str) -> Result<Vec<u64>, ParseError> {
    let v = parse_u64_fields(rest, n, what)?;
    let Some((&count, values)) = v.split_first() else {
        return Err(ParseError::new(n, format!("{what}: empty")));
    };
    if count as usize != values.len() {
        return Err(ParseError::new(
            n,
            format!("{what}: says {count} counters, has {}", values.len()),
        ));
    }
    Ok(values.to_vec())
}

/// `N` fixed counters after a line's name.
pub fn parse_fixed<const N: usize>(
    rest: &str,
    n: usize,
    what: &str,
) -> Result<[u64; N], ParseError> {
    let v = parse_u64_fields(rest, n, what)?;
    if v.len() < N {
        return Err(ParseError::new(
            n,
            format!("{what}: {} counters, need {N}", v.len()),
        ));
    }
    let mut out = [0u64; N];
    out.copy_from_slice(&v[..N]);
    Ok(out)
}

/// Parses `/proc/net/rpc/nfs`. Lines it does not know are skipped.
pub fn parse_client_rpc(text: &str) -> Result<ClientRpc, ParseError> {
    let mut out = ClientRpc::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let Some((name, rest)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        match name {
            "net" => out.net = Some(parse_fixed::<4>(rest, n, "net")?),
            "rpc" => out.rpc = Some(parse_fixed::<3>(rest, n, "rpc")?),
            _ => {
                if let Some(version) = name.strip_prefix("proc")
                    && let Ok(version) = version.parse::<u8>()
                {
                    out.procs.push((version, parse_counted(rest, n, name)?));
                }
            }
        }
    }
    if out.net.is_none() && out.rpc.is_none() && out.procs.is_empty() {
        return Err(ParseError::new(1, "no net, rpc or proc lines"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lengths_match_the_protocols() {
        assert_eq!(V2_PROCS.len(), 18);
        assert_eq!(V3_PROCS.len(), 22);
        assert_eq!(V4_CLIENT_OPS[44], "LayoutGet");
        assert_eq!(V4_CLIENT_OPS[45], "GetDeviceInfo");
        assert_eq!(V4_CLIENT_OPS.len(), 69);
    }

    #[test]
    fn counted_lines_must_agree_with_their_count() {
        assert_eq!(parse_counted("3 1 2 3", 1, "p").unwrap(), vec![1, 2, 3]);
        assert!(parse_counted("4 1 2 3", 1, "p").is_err());
        assert!(parse_counted("", 1, "p").is_err());
        let err = parse_client_rpc("net 1 2 3 4\nproc3 2 1 x\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(parse_client_rpc("").is_err());
        assert!(parse_client_rpc("rpc 1 2\n").is_err());
    }
}
