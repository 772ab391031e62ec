//! The wire layer: code generated from `proto/capstan/v1`, conversions between
//! wire and domain types, and [`status`], the one place where domain errors
//! become gRPC codes.
//!
//! Only adapters (gRPC servers and clients) use this crate; domain logic works
//! on `capstan-types`.

mod convert;
mod status;

pub use convert::*;
pub use status::{into_error, status};

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("capstan.v1");
}

/// Encoded descriptors of every Capstan service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("capstan_descriptor");
