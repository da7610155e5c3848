//! Online, causal anomaly detection: one small [`Detector`] per series.
//!
//! `Detector::score(ts_ms, value)` returns a score in `[0, 1]` that depends
//! only on that sample and the ones before it. State is a fixed-size struct
//! (no allocation after `new`), so memory and CPU per series are bounded.
//! See `docs/DETECTION.md` for how it works and what it scores on NAB.

pub mod bench;
pub mod csv;
mod detector;
mod set;

pub use detector::{CHANNELS, Channel, Channels, Detector, Params};
pub use set::DetectorSet;
