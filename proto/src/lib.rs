//! Generated types for the `vitals.v1` protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vitals.v1");
}

/// The encoded `FileDescriptorSet` of `vitals.v1` (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vitals_descriptor.bin"));

pub use prost::Message;

impl v1::Series {
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
