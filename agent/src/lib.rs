//! Data plane of pg_zero_migration.
//!
//! An agent receives copy tasks (see `proto/agent.proto`), connects to the source and destination
//! databases itself and streams one table from the coordinator's exported source snapshot into
//! its shadow table, atomically: `TRUNCATE` + `COPY … FREEZE` in one destination transaction, so
//! a retried task never duplicates rows.
//!
//! The same [`service::AgentService`] runs in-process (the coordinator's default) or behind a
//! network listener; the coordinator always talks to it through the gRPC client.

pub mod copy;
pub mod endpoint;
pub mod error;
pub mod peer;
pub mod pg;
pub mod pool;
pub mod service;
pub mod sql;
pub mod telemetry;
pub mod tls;

pub use error::AgentError;
