//! Control plane of pg_zero_migration.
//!
//! The coordinator reads the source catalog, plans every name it will create and move, builds
//! the shadow tables in the destination, hands per-table copy tasks to an agent (in-process by
//! default, over the gRPC contract of `pgzm-proto`), finishes the shadow tables, and swaps them
//! in with one short transaction. See `ARCHITECTURE.md` for the map.

pub mod agents;
pub mod backup;
pub mod build;
pub mod catalog;
pub mod cli;
pub mod compat;
pub mod conninfo;
pub mod copy;
pub mod cutover;
pub mod ddl;
pub mod dependents;
pub mod destination;
pub mod document;
pub mod error;
pub mod filter;
pub mod grants;
pub mod interrupt;
pub mod locked;
pub mod logfile;
pub mod matview;
pub mod metrics;
pub mod migrate;
pub mod name;
pub mod naming;
pub mod output;
pub mod plan;
pub mod prepare;
pub mod preserve;
pub mod progress;
pub mod records;
pub mod rehearsal;
pub mod replication;
pub mod report;
pub mod resume;
pub mod rewrite;
pub mod rollback;
pub mod shadow;
pub mod state;
pub mod status;
pub mod swap;

pub use error::CoordinatorError;
