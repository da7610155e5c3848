//! Kernel log records and what they say. Pure: tested on lines as data.
//!
//! A `/dev/kmsg` record is `PRI,SEQ,TS_USEC,FLAGS[,...];MESSAGE`, then
//! optional continuation lines that start with a space (` SUBSYSTEM=pci`,
//! ...). `PRI` is facility × 8 + level, `SEQ` the record's sequence number
//! (64 bits, counting from 0 at boot, one per record), `TS_USEC` the
//! monotonic time in microseconds, `FLAGS` `-`, `c` or `+`.
//!
//! A message is matched against patterns in order (configured ones first,
//! then the built-in ones); the first that matches names its class and
//! severity, and its named capture groups become labels (`server`, `xid`,
//! `device`, `pid`, ...). Unknown messages are ignored.

use regex::Regex;
use vitals_proto::v1::Severity;

/// One record of the kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Syslog level (0 emerg … 7 debug).
    pub level: u8,
    pub facility: u32,
    pub seq: u64,
    pub ts_usec: u64,
    pub message: &'a str,
}

/// A record line (not a continuation line), or None when it is not one.
pub fn parse_record(line: &str) -> Option<Record<'_>> {
    let (prefix, message) = line.split_once(';')?;
    let mut f = prefix.split(',');
    let pri: u32 = f.next()?.parse().ok()?;
    let seq: u64 = f.next()?.parse().ok()?;
    let ts_usec: u64 = f.next()?.parse().ok()?;
    // FLAGS (and any fields a later kernel adds) may be missing on old kernels.
    Some(Record {
        level: (pri & 7) as u8,
        facility: pri >> 3,
        seq,
        ts_usec,
        message: message.trim_end_matches(['\n', '\r']),
    })
}

/// Built-in patterns: (class, severity, regex), tried in this order.
/// Named groups become labels.
pub const DEFAULT_PATTERNS: &[(&str, &str, &str)] = &[
    // NFS client: `nfs: server nas-01 not responding, still trying`,
    // `..., timed out`; then `nfs: server nas-01 OK`.
    (
        "nfs_not_responding",
        "warning",
        r"\bnfs: server (?P<server>\S+) not responding",
    ),
    ("nfs_ok", "info", r"\bnfs: server (?P<server>\S+) OK\b"),
    // amdgpu: `amdgpu 0000:43:00.0: amdgpu: GPU reset begin!`,
    // `GPU reset(2) succeeded!`, `ring gfx timeout, signaled seq=…`.
    (
        "gpu_reset",
        "critical",
        r"^(?:amdgpu (?P<pci>[0-9a-fA-F:.]+): )?(?:amdgpu: )?GPU reset(?:\(\d+\))? (?:begin|succeeded|failed)",
    ),
    (
        "gpu_ring_timeout",
        "critical",
        r"amdgpu.*\bring (?P<ring>\S+) timeout",
    ),
    // `amdgpu 0000:43:00.0: amdgpu: 2 uncorrectable hardware errors detected in umc block`
    (
        "gpu_ras_uncorrectable",
        "critical",
        r"^(?:amdgpu (?P<pci>[0-9a-fA-F:.]+): )?amdgpu: (?P<count>\d+) uncorrectable hardware errors detected in (?:total in )?(?P<block>\w+) block",
    ),
    (
        "gpu_ras_correctable",
        "warning",
        r"^(?:amdgpu (?P<pci>[0-9a-fA-F:.]+): )?amdgpu: (?P<count>\d+) correctable hardware errors detected in (?:total in )?(?P<block>\w+) block",
    ),
    // `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.`
    (
        "nvidia_xid",
        "critical",
        r"NVRM: Xid \(PCI:(?P<pci>[0-9a-fA-F:.]+)\): (?P<xid>\d+)\b",
    ),
    // `ice 0000:17:00.0 ens1f0: NIC Link is Down`, `e1000e: eth0 NIC Link is Down`,
    // `mlx5_core 0000:3b:00.0 ens2f0: Link down`, `tg3 … eth0: Link is down.`
    (
        "link_down",
        "warning",
        r"(?i)\b(?P<device>[a-z][a-z0-9_.@-]*): (?:\S+: )?(?:NIC )?Link (?:is )?down\b",
    ),
    (
        "link_up",
        "info",
        r"(?i)\b(?P<device>[a-z][a-z0-9_.@-]*): (?:\S+: )?(?:NIC )?Link (?:is )?up\b",
    ),
    // `Out of memory: Killed process 4321 (python) total-vm:…`, and the
    // cgroup form `Memory cgroup out of memory: Killed process 4321 (python) …`.
    (
        "oom_kill",
        "critical",
        r"(?i)out of memory: Killed process (?P<pid>\d+) \((?P<comm>[^)]*)\)",
    ),
    // `mce: [Hardware Error]: Machine check events logged`, `CPU 3: Machine Check Exception: …`
    (
        "mce",
        "critical",
        r"mce: \[Hardware Error\]|Machine Check Exception",
    ),
    // `INFO: task python:4321 blocked for more than 120 seconds.`
    (
        "hung_task",
        "warning",
        r"task (?P<task>.+):(?P<pid>\d+) blocked for more than (?P<seconds>\d+) seconds",
    ),
];

/// A severity by its config name.
pub fn severity(name: &str) -> Option<Severity> {
    match name {
        "info" => Some(Severity::Info),
        "warning" => Some(Severity::Warning),
        "error" => Some(Severity::Error),
        "critical" => Some(Severity::Critical),
        _ => None,
    }
}

/// One compiled pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    pub class: String,
    pub severity: Severity,
    pub regex: Regex,
}

/// What a message is.
#[derive(Debug, Clone, PartialEq)]
pub struct Match<'p> {
    pub class: &'p str,
    pub severity: Severity,
    /// The named groups that matched, by name.
    pub labels: Vec<(&'p str, String)>,
}

/// The configured patterns, then (if `defaults`) the built-in ones.
#[derive(Debug, Clone)]
pub struct Patterns {
    list: Vec<Pattern>,
}

impl Patterns {
    /// Compiles `configured` ((class, severity, regex)) and the defaults;
    /// Err names the pattern and what is wrong with it.
    pub fn new(configured: &[(String, String, String)], defaults: bool) -> Result<Self, String> {
        let mut list = Vec::new();
        let builtin = DEFAULT_PATTERNS
            .iter()
            .filter(|_| defaults)
            .map(|(c, s, r)| (c.to_string(), s.to_string(), r.to_string()));
        for (i, (class, sev, regex)) in configured.iter().cloned().chain(builtin).enumerate() {
            if class.is_empty()
                || !class
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!(
                    "patterns[{i}]: class {class:?} must be letters, digits and _ (it becomes the `class` label)"
                ));
            }
            let severity = severity(&sev).ok_or_else(|| {
                format!(
                    "patterns[{i}] ({class}): severity {sev:?} is not one of info, warning, error, critical"
                )
            })?;
            let regex = Regex::new(&regex)
                .map_err(|e| format!("patterns[{i}] ({class}): bad regex: {e}"))?;
            for name in regex.capture_names().flatten() {
                if !vitals_common::model::valid_label_name(name) || name == "class" {
                    return Err(format!(
                        "patterns[{i}] ({class}): group name {name:?} cannot be a label"
                    ));
                }
            }
            list.push(Pattern {
                class,
                severity,
                regex,
            });
        }
        Ok(Patterns { list })
    }

    /// Every class, in order, each once.
    pub fn classes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for p in &self.list {
            if !out.contains(&p.class.as_str()) {
                out.push(&p.class);
            }
        }
        out
    }

    /// The first pattern the message matches.
    pub fn classify(&self, message: &str) -> Option<Match<'_>> {
        self.list.iter().find_map(|p| {
            let caps = p.regex.captures(message)?;
            let labels = p
                .regex
                .capture_names()
                .flatten()
                .filter_map(|n| Some((n, caps.name(n)?.as_str().to_string())))
                .collect();
            Some(Match {
                class: &p.class,
                severity: p.severity,
                labels,
            })
        })
    }
}

/// What the kernel's `oom-kill:` line says about the victim just before
/// the `Killed process` line: its PID and, where its memory cgroup is a
/// SLURM job's (`task_memcg=/system.slice/slurmstepd.scope/job_123/…`,
/// or cgroup v1's `/slurm/uid_1000/job_123/…`), the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomContext {
    pub pid: u32,
    pub job_id: Option<String>,
    pub uid: Option<u32>,
}

/// `oom-kill:constraint=…,task_memcg=…,task=python,pid=4321,uid=1000`.
pub fn parse_oom_context(message: &str) -> Option<OomContext> {
    let body = message.strip_prefix("oom-kill:")?;
    let mut pid = None;
    let mut uid = None;
    let mut job_id = None;
    for field in body.split(',') {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        match k {
            "pid" => pid = v.parse().ok(),
            "uid" => uid = v.parse().ok(),
            "task_memcg" | "oom_memcg" if job_id.is_none() => {
                job_id =
                    crate::sources::gpu::jobs::parse_cgroup(&format!("0::{v}")).map(|(job, _)| job);
            }
            _ => {}
        }
    }
    Some(OomContext {
        pid: pid?,
        job_id,
        uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_continuations() {
        let r = parse_record("6,339,5140900,-;NET: Registered protocol family 10").unwrap();
        assert_eq!(
            (r.level, r.facility, r.seq, r.ts_usec),
            (6, 0, 339, 5140900)
        );
        assert_eq!(r.message, "NET: Registered protocol family 10");
        let r = parse_record("12,340,5140901,c,more;user msg; with ; semicolons\n").unwrap();
        assert_eq!((r.level, r.facility), (4, 1));
        assert_eq!(r.message, "user msg; with ; semicolons");
        assert_eq!(parse_record(" SUBSYSTEM=pci"), None);
        assert_eq!(parse_record("x,1,2,-;m"), None);
        assert_eq!(parse_record("no separator"), None);
    }

    #[test]
    fn every_builtin_compiles_and_classifies() {
        let p = Patterns::new(&[], true).unwrap();
        let class = |m: &str| p.classify(m).map(|m| m.class.to_string());
        assert_eq!(
            class("nfs: server nas-01 not responding, still trying").as_deref(),
            Some("nfs_not_responding")
        );
        assert_eq!(class("nfs: server nas-01 OK").as_deref(), Some("nfs_ok"));
        let m = p
            .classify("NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.")
            .unwrap();
        assert_eq!(m.class, "nvidia_xid");
        assert!(m.labels.contains(&("xid", "79".into())));
        assert_eq!(class("random noise"), None);
        assert_eq!(p.classes().len(), DEFAULT_PATTERNS.len());
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        let one = |c: &str, s: &str, r: &str| {
            Patterns::new(&[(c.into(), s.into(), r.into())], false).unwrap_err()
        };
        assert!(one("x", "loud", "a").contains("severity \"loud\""));
        assert!(one("x", "info", "(").contains("bad regex"));
        assert!(one("a b", "info", "a").contains("class"));
        assert!(one("x", "info", "(?P<class>a)").contains("group name"));
    }

    #[test]
    fn oom_context_names_the_job() {
        let c = parse_oom_context("oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/system.slice/slurmstepd.scope/job_123,task_memcg=/system.slice/slurmstepd.scope/job_123/step_0/user/task_0,task=python,pid=4321,uid=1000").unwrap();
        assert_eq!(
            c,
            OomContext {
                pid: 4321,
                job_id: Some("123".into()),
                uid: Some(1000)
            }
        );
        let c = parse_oom_context("oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,global_oom,task_memcg=/user.slice,task=stress,pid=77,uid=0").unwrap();
        assert_eq!(c.job_id, None);
        assert_eq!(parse_oom_context("oom-kill:task=x"), None);
    }
}
