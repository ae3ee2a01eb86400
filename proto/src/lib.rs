//! The wire contract of the federation, generated from `proto/federation.proto`.
//!
//! Only generated code lives here. Conversions into domain types (with validation) live in
//! `aln_common::wire` and friends, so that a malformed message is rejected at the edge.

/// Version string of the contract; both sides compare it at `Join`.
pub const PROTO_VERSION: &str = "aln.federation.v1";

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("aln.federation.v1");
}

pub use v1::*;
