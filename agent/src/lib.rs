//! Data plane of pg_zero_migration.
//!
//! An agent receives copy tasks (see `proto/agent.proto`), connects to the source and destination
//! databases itself and streams one table (or page range) from the coordinator's exported source
//! snapshot into its shadow table in one destination transaction that also records the task in
//! `pgzm.copy_progress`, so a retried task never duplicates rows.
//!
//! The same [`service::AgentService`] runs in-process (the coordinator's default) or behind a
//! network listener; the coordinator always talks to it through the gRPC client.

pub mod copy;
pub mod digest;
pub mod endpoint;
pub mod error;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod model;
pub mod peer;
pub mod pool;
pub mod prometheus;
pub mod relabel;
pub mod service;
pub mod stream;

// The PostgreSQL plumbing shared with the coordinator, under the names the agent's modules use.
pub use pgzm_pg::{conn as pg, libpq, sql, tls};
pub mod telemetry;
pub mod throttle;

pub use error::AgentError;

/// The async runtime of `pgzm` and `pgzm-agent`, with [`runtime_threads`] worker threads.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads())
        .enable_all()
        .build()
}

/// Worker threads of the async runtime of `pgzm` and `pgzm-agent`: `$TOKIO_WORKER_THREADS` when
/// set, else half the CPUs (at least one). The work of both binaries is moving bytes between
/// sockets; the CPUs are better left to the PostgreSQL backends on either side (on 2 cores a
/// second thread made the copy ~20 % slower: cross-thread wakeups for every message).
pub fn runtime_threads() -> usize {
    if let Some(n) = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    std::thread::available_parallelism()
        .map(|n| n.get() / 2)
        .unwrap_or(1)
        .max(1)
}
