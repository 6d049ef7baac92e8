//! Generated wire types for `adaptivenet.v1`. The only crate that knows prost/tonic types.
//! Besides them, [`shutdown`]: the one shutdown signal of both binaries.
#![allow(clippy::all)]
pub mod codec;
pub mod shutdown;
pub mod v1 {
    tonic::include_proto!("adaptivenet.v1");
}
/// Encoded `FileDescriptorSet` for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("adaptivenet_descriptor");
