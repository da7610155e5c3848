//! Generated types for the `vitals.v1` protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vitals.v1");
}

/// The encoded `FileDescriptorSet` of `vitals.v1` (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/vitals_descriptor.bin"));

pub use prost::Message;
