//! Sources: one file per source, one small trait, one explicit list.
//!
//! A source reads its inputs (through the configured filesystem roots) and
//! appends samples. "Not present on this host" is `Unavailable`, logged once
//! at debug and never counted as an error; anything else is `Failed`: that
//! source skips the cycle, its error counter goes up, the others go on.

pub mod host;

use vitals_common::model::Sample;

use crate::config::RawConfig;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source's inputs do not exist on this host (no GPU, no ZFS, ...).
    #[error("not available on this host: {0}")]
    Unavailable(String),
    /// The inputs exist but could not be read or parsed this cycle.
    #[error("{0}")]
    Failed(String),
}

pub trait Source: Send {
    /// Short name, used in `--source`, config tables and self-metrics labels.
    fn name(&self) -> &'static str;
    /// Reads the inputs and appends samples (without node label or timestamp).
    fn collect(&mut self, out: &mut Vec<Sample>) -> Result<(), SourceError>;
}

/// One entry of the source list.
pub struct SourceSpec {
    pub name: &'static str,
    pub enabled_by_default: bool,
    pub help: &'static str,
    pub build: fn(&RawConfig) -> Box<dyn Source>,
}

/// Every source the agent knows, in collection order.
pub const SOURCES: &[SourceSpec] = &[SourceSpec {
    name: "host",
    enabled_by_default: true,
    help: "CPU, memory, load, filesystems and uptime (through sysinfo)",
    build: host::build,
}];

/// Whether a source is enabled by the config (or its default).
pub fn enabled(cfg: &RawConfig, spec: &SourceSpec) -> bool {
    let toggle = match spec.name {
        "host" => cfg.sources.host.enabled,
        _ => None,
    };
    toggle.unwrap_or(spec.enabled_by_default)
}
