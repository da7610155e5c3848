//! SIGHUP: re-read the config file and its TLS files, apply what can change
//! while running, and say what changed. A config that does not load is
//! refused whole with its error, and the running one is kept.
//!
//! Live: `tls.*` (new connections get the new certificate and CA; open
//! streams keep theirs; the HTTP listener's too), `query.*`,
//! `shutdown_grace`. Needs a restart (a warning names the key, the running
//! value stays): `listen`, `http.*`, `storage.*`,
//! `detect.*`, `alerting.*` (rules and receivers; a reload still checks the
//! rule files and refuses the whole config if one has an error),
//! `remote_write` (a reload still checks every endpoint — URL, credential
//! and TLS files — and refuses the whole config if one is wrong).

use std::path::{Path, PathBuf};

use tokio::sync::watch;

use crate::config::{self, Settings};
use crate::listen::TlsConfig;
use crate::promql::Limits;

/// Where a reload reads from, and what asks for it.
pub struct Reload {
    /// The config file the collector was started with.
    pub path: PathBuf,
    /// SIGHUP (`vitals_common::signal::hangup`).
    pub hangups: tokio::signal::unix::Signal,
}

/// The parts of a running collector that a reload can change.
pub(crate) struct Live<'a> {
    pub tls: &'a TlsConfig,
    pub limits: &'a watch::Sender<Limits>,
}

/// Keys a reload changed live, and keys that differ but need a restart.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub applied: Vec<&'static str>,
    pub need_restart: Vec<&'static str>,
}

fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// Re-reads `path`, applies it to `current` and `live`, logs the outcome.
pub(crate) fn reload(path: &Path, current: &mut Settings, live: Live<'_>) -> Option<Outcome> {
    let new = match config::load(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(config = %path.display(), error = %e, "reload refused: the config does not load; keeping the running config and certificates");
            return None;
        }
    };
    let out = apply(current, new, live);
    if out.applied.is_empty() {
        tracing::info!(config = %path.display(), "reloaded: nothing changed");
    } else {
        tracing::info!(config = %path.display(), changed = %out.applied.join(", "), "reloaded");
    }
    for key in &out.need_restart {
        tracing::warn!(config = %path.display(), key, "changed in the config file but needs a restart to apply; the running value stays");
    }
    Some(out)
}

fn apply(current: &mut Settings, new: Settings, live: Live<'_>) -> Outcome {
    let mut out = Outcome::default();
    let tls = new.tls.changed_files(&current.tls);
    if !tls.is_empty() {
        live.tls.replace(new.server_tls.clone());
        tracing::info!(certificate = %new.tls.describe(), "new connections get the reloaded TLS certificate and CA; open streams keep theirs");
        current.tls = new.tls;
        current.server_tls = new.server_tls;
        current.raw.tls = new.raw.tls;
        out.applied.extend(tls);
    }
    if new.max_series != current.max_series
        || new.max_points != current.max_points
        || new.max_samples != current.max_samples
    {
        current.max_series = new.max_series;
        current.max_points = new.max_points;
        current.max_samples = new.max_samples;
        current.raw.query = new.raw.query;
        live.limits.send_replace(current.query_limits());
        out.applied.push("query");
    }
    if new.shutdown_grace != current.shutdown_grace {
        current.shutdown_grace = new.shutdown_grace;
        current.raw.shutdown_grace = new.raw.shutdown_grace;
        out.applied.push("shutdown_grace");
    }
    if current.raw.listen != new.raw.listen {
        out.need_restart.push("listen");
    }
    if current.raw.http != new.raw.http {
        out.need_restart.push("http");
    }
    if differs(&current.raw.storage, &new.raw.storage) {
        out.need_restart.push("storage");
    }
    if differs(&current.raw.detect, &new.raw.detect) {
        out.need_restart.push("detect");
    }
    if differs(&current.raw.alerting, &new.raw.alerting) {
        out.need_restart.push("alerting");
    }
    if differs(&current.raw.remote_write, &new.raw.remote_write) {
        out.need_restart.push("remote_write");
    }
    out
}
