//! Kernel events: `/dev/kmsg` (under `paths.devfs`), or a file of
//! recorded kmsg lines (`[sources.kmsg] path`), turned into `kernel`
//! events by [`parse::Patterns`].
//!
//! Events: kind `kernel`, the pattern's severity, the message as the
//! event's message (cut at 1000 bytes), labels `class` and the pattern's
//! named groups (`server`, `pci`, `xid`, `ring`, `device`, `pid`, `comm`,
//! ...). An `oom_kill` also gets `job_id` when the victim belonged to a
//! SLURM job: from the `oom-kill:` line the kernel prints just before
//! (its `task_memcg` names the job's cgroup), else from the process's
//! cgroup or environment under `paths.procfs` if it is still there.
//!
//! Samples: `vitals_kernel_events_total{class}` (every class from 0),
//! `vitals_kernel_records_read_total`, `vitals_kernel_records_lost_total`
//! (records the kernel overwrote before they were read: sequence gaps,
//! while the agent ran or was stopped).
//!
//! Position: the sequence number of the last record read is kept in
//! `kmsg.state` in the spool folder (with the boot id and the path), so a
//! restart neither replays nor misses records; after a reboot the new
//! boot's records are read from its start. Without that file (the first
//! start) `start = "end"` (the default) reads past the records already in
//! the buffer without events, `start = "beginning"` turns them into events.
//!
//! Bounded: at most `max_lines` records and `max_bytes` bytes per cycle;
//! the rest waits for the next. Non-blocking: `/dev/kmsg` is opened with
//! `O_NONBLOCK`, and "nothing new" (EAGAIN) ends the cycle's reading; a
//! record overwritten while it waited (EPIPE) is counted as lost.

pub mod parse;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vitals_common::model::{Labels, Sample};

use super::{Source, SourceError, SourceEvent};
use crate::config::RawConfig;
use parse::{OomContext, Patterns};

/// Longest message kept in an event.
const MAX_MESSAGE: usize = 1000;
/// A line longer than this without an end (not a kmsg record) is dropped.
const MAX_LINE: usize = 64 * 1024;
/// The state file's name in the spool folder.
pub const STATE_FILE: &str = "kmsg.state";

/// `[sources.kmsg]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsgConfig {
    /// Whether the source runs (default: yes; quiet where there is no
    /// `/dev/kmsg` or it may not be read).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// A file of kmsg records to read instead of `<paths.devfs>/kmsg`
    /// (recorded lines, for tests). Relative to the config file's folder.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Where the first start begins: "end" (the records already in the
    /// buffer make no events) or "beginning". Later starts go on from the
    /// position kept in the spool folder.
    #[serde(default)]
    pub start: Start,
    /// Most records read per cycle.
    #[serde(default = "default_max_lines")]
    pub max_lines: usize,
    /// Most bytes read per cycle.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Whether the built-in patterns are used after the configured ones.
    #[serde(default = "default_true")]
    pub default_patterns: bool,
    /// Patterns tried before the built-in ones: `{ class = "...", severity
    /// = "info|warning|error|critical", regex = "..." }`; named groups
    /// (`(?P<name>...)`) become labels.
    #[serde(default)]
    pub patterns: Vec<KmsgPattern>,
    /// Whether the position is read from and saved in the spool folder
    /// (not a config key: `vitals-agent once` turns it off, so a one-off
    /// run never moves the daemon's position).
    #[serde(skip, default = "default_true")]
    pub keep_position: bool,
}

/// One configured pattern.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsgPattern {
    pub class: String,
    pub severity: String,
    pub regex: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    #[default]
    End,
    Beginning,
}

impl Default for KmsgConfig {
    fn default() -> Self {
        KmsgConfig {
            enabled: None,
            path: None,
            start: Start::End,
            max_lines: default_max_lines(),
            max_bytes: default_max_bytes(),
            default_patterns: true,
            patterns: Vec::new(),
            keep_position: true,
        }
    }
}

fn default_max_lines() -> usize {
    1000
}
fn default_max_bytes() -> usize {
    1 << 20
}
fn default_true() -> bool {
    true
}

impl KmsgConfig {
    /// The compiled patterns, or why one does not compile.
    pub fn compile(&self) -> Result<Patterns, String> {
        let list: Vec<(String, String, String)> = self
            .patterns
            .iter()
            .map(|p| (p.class.clone(), p.severity.clone(), p.regex.clone()))
            .collect();
        Patterns::new(&list, self.default_patterns)
    }
}

/// Config errors as (key, message).
pub fn check(cfg: &KmsgConfig) -> Result<(), (String, String)> {
    cfg.compile()
        .map_err(|e| ("sources.kmsg.patterns".to_string(), e))?;
    if cfg.max_lines == 0 {
        return Err(("sources.kmsg.max_lines".into(), "must be at least 1".into()));
    }
    if cfg.max_bytes < 4096 {
        return Err((
            "sources.kmsg.max_bytes".into(),
            "must be at least 4096 (a kernel record can be that long)".into(),
        ));
    }
    Ok(())
}

/// What `kmsg.state` holds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
struct State {
    /// The file read.
    path: PathBuf,
    /// The boot the sequence numbers belong to (`/dev/kmsg` only).
    boot_id: Option<String>,
    /// The last record read; None: none yet (read from the beginning).
    seq: Option<u64>,
}

pub struct Kmsg {
    path: PathBuf,
    procfs: PathBuf,
    state_path: PathBuf,
    patterns: Option<Patterns>,
    start: Start,
    max_lines: usize,
    max_bytes: usize,
    file: Option<File>,
    device: bool,
    boot_id: Option<String>,
    /// Bytes of a file read but not yet a whole line.
    pending: Vec<u8>,
    /// The last record read (or skipped).
    last_seq: Option<u64>,
    /// Records at or below this were read before a restart.
    resume_after: Option<u64>,
    /// First start at the end: records are read without events until the
    /// end of what is there.
    skipping: bool,
    /// Whether the position changed since it was saved.
    dirty: bool,
    /// Whether the last save failed (logged once per run of failures).
    save_failing: bool,
    keep_position: bool,
    counts: BTreeMap<String, u64>,
    read_total: u64,
    lost_total: u64,
    oom: Option<OomContext>,
    events: Vec<SourceEvent>,
    warned: bool,
}

pub fn build(cfg: &RawConfig) -> Box<dyn Source> {
    let k = &cfg.sources.kmsg;
    // Checked when the config was validated.
    let patterns = match k.compile() {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "sources.kmsg: bad pattern; kernel events are not read");
            None
        }
    };
    let counts = patterns
        .iter()
        .flat_map(|p| p.classes())
        .map(|c| (c.to_string(), 0))
        .collect();
    Box::new(Kmsg {
        path: k
            .path
            .clone()
            .unwrap_or_else(|| cfg.paths.devfs.join("kmsg")),
        procfs: cfg.paths.procfs.clone(),
        state_path: cfg.spool.dir.join(STATE_FILE),
        patterns,
        start: k.start,
        max_lines: k.max_lines.max(1),
        max_bytes: k.max_bytes.max(4096),
        file: None,
        device: false,
        boot_id: None,
        pending: Vec::new(),
        last_seq: None,
        resume_after: None,
        skipping: false,
        dirty: false,
        save_failing: false,
        keep_position: k.keep_position,
        counts,
        read_total: 0,
        lost_total: 0,
        oom: None,
        events: Vec::new(),
        warned: false,
    })
}

impl Kmsg {
    fn open(&mut self) -> Result<(), SourceError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    SourceError::Unavailable(format!("{}: no such file", self.path.display()))
                }
                io::ErrorKind::PermissionDenied => {
                    if !self.warned {
                        self.warned = true;
                        tracing::warn!(path = %self.path.display(), "kernel events: permission denied; reading the kernel log needs CAP_SYSLOG where kernel.dmesg_restrict=1 (see the agent's unit file)");
                    }
                    SourceError::Unavailable(format!("{}: permission denied", self.path.display()))
                }
                _ => SourceError::Failed(format!("{}: {e}", self.path.display())),
            })?;
        self.device = file
            .metadata()
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        self.boot_id = if self.device {
            std::fs::read_to_string(self.procfs.join("sys/kernel/random/boot_id"))
                .ok()
                .map(|s| s.trim().to_string())
        } else {
            None
        };
        let state = std::fs::read_to_string(&self.state_path)
            .ok()
            .filter(|_| self.keep_position)
            .and_then(|s| serde_json::from_str::<State>(&s).ok())
            .filter(|s| s.path == self.path);
        match state {
            Some(s) if s.boot_id == self.boot_id => {
                self.resume_after = s.seq;
                self.last_seq = s.seq;
            }
            // Another boot: its records are all new.
            Some(_) => self.dirty = true,
            None => {
                self.skipping = self.start == Start::End;
                self.dirty = true;
            }
        }
        self.pending.clear();
        self.file = Some(file);
        Ok(())
    }

    fn save(&mut self) {
        if !self.dirty || self.skipping || !self.keep_position {
            return;
        }
        let state = State {
            path: self.path.clone(),
            boot_id: self.boot_id.clone(),
            seq: self.last_seq,
        };
        let write = || -> io::Result<()> {
            let tmp = self.state_path.with_extension("state.tmp");
            let body = serde_json::to_vec(&state).map_err(io::Error::other)?;
            {
                use std::io::Write;
                let mut f = File::create(&tmp)?;
                f.write_all(&body)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &self.state_path)
        };
        match write() {
            Ok(()) => {
                self.dirty = false;
                self.save_failing = false;
            }
            Err(e) => {
                if !self.save_failing {
                    self.save_failing = true;
                    tracing::warn!(file = %self.state_path.display(), error = %e, "kernel events: cannot save the position; a restart may read records again");
                }
            }
        }
    }

    /// One whole line (a record or a continuation line).
    fn line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let Some(rec) = parse::parse_record(&line) else {
            return;
        };
        if let Some(after) = self.resume_after {
            if rec.seq <= after {
                return;
            }
            self.resume_after = None;
        }
        self.read_total += 1;
        if let Some(last) = self.last_seq
            && rec.seq > last + 1
        {
            self.lost_total += rec.seq - last - 1;
        }
        self.last_seq = Some(rec.seq);
        self.dirty = true;
        if self.skipping {
            return;
        }
        if let Some(ctx) = parse::parse_oom_context(rec.message) {
            self.oom = Some(ctx);
        }
        let Some(patterns) = &self.patterns else {
            return;
        };
        let Some(m) = patterns.classify(rec.message) else {
            return;
        };
        let mut labels = Labels::new();
        labels.insert("class".into(), m.class.to_string());
        for (k, v) in m.labels {
            labels.insert(k.to_string(), v);
        }
        if m.class == "oom_kill"
            && let Some(pid) = labels.get("pid").and_then(|p| p.parse::<u32>().ok())
        {
            let from_line = self
                .oom
                .take()
                .filter(|c| c.pid == pid)
                .and_then(|c| c.job_id);
            if let Some(job) = from_line {
                labels.insert("job_id".into(), job);
            } else if let Some(j) = crate::sources::gpu::jobs::job_of(&self.procfs, pid) {
                labels.insert("job_id".into(), j.job_id);
                if !j.user.is_empty() {
                    labels.insert("user".into(), j.user);
                }
            }
        }
        *self.counts.entry(m.class.to_string()).or_default() += 1;
        let mut message = rec.message.to_string();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        self.events.push(SourceEvent {
            kind: "kernel".into(),
            severity: m.severity,
            message,
            labels,
        });
    }

    /// Reads up to the cycle's limits; Ok(true) at the end of what is there.
    fn read(&mut self) -> Result<bool, SourceError> {
        let mut lines = 0usize;
        let mut bytes = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Whole lines first.
            while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
                if lines >= self.max_lines || bytes >= self.max_bytes {
                    return Ok(false);
                }
                let line: Vec<u8> = self.pending.drain(..=nl).collect();
                bytes += line.len();
                if line.first() != Some(&b' ') {
                    lines += 1;
                }
                self.line(&line[..line.len() - 1]);
            }
            if self.pending.len() > MAX_LINE {
                self.pending.clear();
            }
            if lines >= self.max_lines || bytes >= self.max_bytes {
                return Ok(false);
            }
            let Some(file) = self.file.as_mut() else {
                return Ok(true);
            };
            // A kmsg read returns one record and needs room for all of it;
            // a file is read no further than the byte budget.
            let want = if self.device {
                buf.len()
            } else {
                (self.max_bytes - bytes).clamp(1, buf.len())
            };
            match file.read(&mut buf[..want]) {
                Ok(0) => return Ok(true),
                Ok(n) => {
                    self.pending.extend_from_slice(&buf[..n]);
                    if self.device && self.pending.last() != Some(&b'\n') {
                        self.pending.push(b'\n');
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                // Overwritten before it was read: the kernel goes on with
                // the oldest record left; the sequence gap counts them.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.file = None;
                    return Err(SourceError::Failed(format!("{}: {e}", self.path.display())));
                }
            }
        }
    }
}

impl Source for Kmsg {
    fn name(&self) -> &'static str {
        "kmsg"
    }

    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError> {
        if self.patterns.is_none() {
            return Err(SourceError::Failed(
                "sources.kmsg: a pattern does not compile (see the agent's start)".into(),
            ));
        }
        if self.file.is_none() {
            self.open()?;
        }
        let result = self.read();
        if let Ok(true) = result
            && self.skipping
        {
            self.skipping = false;
            self.dirty = true;
        }
        self.save();
        result?;
        for (class, n) in &self.counts {
            out.push(
                Sample::new("vitals_kernel_events_total", *n as f64).label("class", class.as_str()),
            );
        }
        out.push(Sample::new(
            "vitals_kernel_records_read_total",
            self.read_total as f64,
        ));
        out.push(Sample::new(
            "vitals_kernel_records_lost_total",
            self.lost_total as f64,
        ));
        Ok(())
    }

    fn events(&mut self) -> Vec<SourceEvent> {
        std::mem::take(&mut self.events)
    }
}

/// The state file of a spool folder (for tests and operators).
pub fn state_file(spool_dir: &Path) -> PathBuf {
    spool_dir.join(STATE_FILE)
}
