//! The gRPC contract between the pgzm coordinator and its agents.
//!
//! This crate holds only generated wire types; domain types live in the `agent` and
//! `coordinator` crates and convert at the boundary.

#![allow(clippy::all, missing_docs)]

/// Generated types and services of package `pgzm.agent.v1`.
pub mod agent {
    /// Version 1 of the agent protocol.
    pub mod v1 {
        tonic::include_proto!("pgzm.agent.v1");
    }
}

/// The encoded `FileDescriptorSet` of `agent.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/agent_descriptor.bin"));

/// Protocol version spoken by this build; agents refuse coordinators with another one.
/// 4: agents divide the byte-rate budget by `pgzm.migrations.copy_tasks_left`, which only a
/// coordinator of this version creates and keeps.
pub const PROTOCOL_VERSION: u32 = 4;
