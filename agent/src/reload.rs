//! SIGHUP: re-read the config file and its TLS files, apply what can change
//! while running, and say what changed. A config that does not load is
//! refused whole with its error, and the running one is kept.
//!
//! Live: `collector`, `server_name` and `tls.*` (the shipper drops its
//! stream and connects again with them; unacked batches are still in the
//! spool and go out again, so none is lost), `interval`, `shutdown_grace`,
//! `paths` and `sources` (the sources are rebuilt). Needs a restart (a
//! warning names the key, the running value stays): `node` and `spool.*`.

use std::path::{Path, PathBuf};

use crate::config::{self, Settings};

/// Where a reload reads from, and what asks for it.
pub struct Reload {
    /// The config file the agent was started with.
    pub path: PathBuf,
    /// SIGHUP (`vitals_common::signal::hangup`).
    pub hangups: tokio::signal::unix::Signal,
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    /// Keys applied live.
    pub applied: Vec<&'static str>,
    /// Keys that differ in the file but need a restart.
    pub need_restart: Vec<&'static str>,
    /// The shipper must connect again (address or certificates changed).
    pub relink: bool,
    /// The sources must be rebuilt (`paths` or `sources` changed).
    pub rebuild_sources: bool,
}

fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// Loads `path` as the new config; `None` (logged) if it does not load.
pub fn load(path: &Path) -> Option<Settings> {
    match config::load_raw(path).and_then(|raw| config::validate(path, raw)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(config = %path.display(), error = %e, "reload refused: the config does not load; keeping the running config and certificates");
            None
        }
    }
}

/// Folds `new` into `current`: the live keys take their new values, the
/// others keep the running ones. Returns what changed.
pub fn apply(current: &mut Settings, mut new: Settings) -> Outcome {
    let mut out = Outcome::default();
    if new.node != current.node {
        out.need_restart.push("node");
    }
    if new.spool_dir != current.spool_dir || new.spool_max_bytes != current.spool_max_bytes {
        out.need_restart.push("spool");
    }
    if new.raw.net_test != current.raw.net_test {
        out.need_restart.push("net_test");
    }
    if new.collector_url != current.collector_url {
        out.applied.push("collector");
    }
    if new.server_name != current.server_name {
        out.applied.push("server_name");
    }
    out.applied.extend(new.tls.changed_files(&current.tls));
    out.relink = !out.applied.is_empty();
    if new.interval != current.interval {
        out.applied.push("interval");
    }
    if new.shutdown_grace != current.shutdown_grace {
        out.applied.push("shutdown_grace");
    }
    if differs(&new.raw.paths, &current.raw.paths) {
        out.applied.push("paths");
        out.rebuild_sources = true;
    }
    if differs(&new.raw.sources, &current.raw.sources) {
        out.applied.push("sources");
        out.rebuild_sources = true;
    }
    // What needs a restart keeps its running value.
    new.node = current.node.clone();
    new.raw.node = current.raw.node.clone();
    new.spool_dir = current.spool_dir.clone();
    new.spool_max_bytes = current.spool_max_bytes;
    new.raw.spool = current.raw.spool.clone();
    new.raw.net_test = current.raw.net_test.clone();
    *current = new;
    out
}

/// Logs an outcome.
pub fn log(path: &Path, out: &Outcome, current: &Settings) {
    if out.applied.is_empty() {
        tracing::info!(config = %path.display(), "reloaded: nothing changed");
    } else {
        tracing::info!(config = %path.display(), changed = %out.applied.join(", "), "reloaded");
    }
    if out.relink {
        tracing::info!(collector = %current.collector_url, certificate = %current.tls.describe(), "reconnecting to the collector with the reloaded settings");
    }
    for key in &out.need_restart {
        tracing::warn!(config = %path.display(), key, "changed in the config file but needs a restart to apply; the running value stays");
    }
}
