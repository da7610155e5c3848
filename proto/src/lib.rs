//! Generated types for the `vitals.v1` protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vitals.v1");
}

/// The encoded `FileDescriptorSet` of `vitals.v1` (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vitals_descriptor.bin"));

pub use prost::Message;

/// The value of label `name` in `labels` ("" when absent, as Prometheus
/// reads a missing label).
pub fn label<'a>(labels: &'a [v1::Label], name: &str) -> &'a str {
    labels
        .iter()
        .find(|l| l.name == name)
        .map_or("", |l| l.value.as_str())
}

impl v1::Series {
    /// The last sample's value (an instant answer's one value).
    pub fn last_value(&self) -> Option<f64> {
        self.points
            .last()
            .map(|p| p.value)
            .or_else(|| self.values.last().copied())
    }

    /// Moves a `packed` answer's samples into `points` (a no-op for an
    /// answer that is not packed), so readers see one form.
    pub fn unpack(&mut self) {
        let ts = std::mem::take(&mut self.timestamps_ms);
        let vs = std::mem::take(&mut self.values);
        self.points.extend(
            ts.into_iter()
                .zip(vs)
                .map(|(timestamp_ms, value)| v1::Point {
                    timestamp_ms,
                    value,
                }),
        );
    }
}
