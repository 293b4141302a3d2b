//! The integration tests of the coordinator's library against real PostgreSQL servers, in one
//! test binary (one link of the coordinator, shared helpers compiled once). Each module is a
//! group of scenarios; `common` runs migrations through the library API with the in-process
//! agent, `checks` holds the assertions on databases, `blocking` the lock scenarios' tools.

mod blocking;
mod checks;
mod common;

mod backups;
mod failures;
mod filters;
mod hostile_names;
mod lock_budget;
mod migration_simple;
mod migration_tes;
mod naming_and_safety;
mod preserved;
mod real_schemas;
mod replication;
mod rollback_aside;
mod schema_coverage;
mod schemas;
mod statistics;
mod verification;
mod versions;
