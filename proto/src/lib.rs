//! Generated types for the `vitals.v1` protocol.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("vitals.v1");
}

pub use prost::Message;
