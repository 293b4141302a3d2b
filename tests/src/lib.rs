//! Test harness for pg_zero_migration: throwaway PostgreSQL clusters, a database per test,
//! SQL fixtures, and catalog/content inspection for asserting on real server state.
//!
//! # Server binaries
//! [`PgCluster::start`] looks for `initdb` and `postgres` in `$PG_BINDIR` first (an error if
//! set but incomplete), then in `pg_config --bindir`, then in the highest-numbered
//! `/usr/lib/postgresql/*/bin`. When none has them, the error says what to install. Tests
//! that need PostgreSQL fail rather than skip, so CI cannot pass vacuously.
//!
//! # Running as root
//! initdb refuses to run as root. When the effective uid is 0, the harness runs `initdb` and
//! `postgres` as the OS user `postgres` (or `nobody` if that does not exist): the cluster's
//! temp directory (`$TMPDIR/pgzm-<pid>-<id>`, mode 0700) is chowned to that user and the
//! children switch uid/gid before exec. Otherwise they run as the current user.
//!
//! # Lifetime
//! Each cluster listens on 127.0.0.1 on a free port with its unix socket in its temp dir, and
//! is tuned for tests (`fsync=off`, `synchronous_commit=off`, `full_page_writes=off`,
//! `max_connections=200`). Dropping a [`PgCluster`] stops the server and deletes the
//! directory; the shared clusters ([`PgCluster::shared`], [`PgCluster::shared_pair`]) are
//! stopped by an `atexit` handler. If the test process dies without running either, the
//! postmaster gets SIGQUIT through `PR_SET_PDEATHSIG` (it is spawned from a dedicated
//! long-lived thread, since the signal follows the spawning thread), and the next run sweeps
//! leftover directories of dead processes.
//!
//! # Example
//! ```no_run
//! # async fn example() -> Result<(), pgzm_tests::HarnessError> {
//! use pgzm_tests::{inspect, PgCluster, TestDb};
//! let db = TestDb::create(PgCluster::shared(), "my_test").await?;
//! db.batch("CREATE TABLE t (id int PRIMARY KEY)").await?;
//! let client = db.connect().await?;
//! assert_eq!(inspect::tables(&client).await?, vec!["t".to_string()]);
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod db;
pub mod error;
pub mod inspect;
pub mod netns;
pub mod sql;

pub use cluster::PgCluster;
pub use db::{fixture_pair, fixture_pair_on, fixtures_dir, TestDb};
pub use error::HarnessError;
pub use sql::quote_ident;
