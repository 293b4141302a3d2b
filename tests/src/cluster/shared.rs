//! Clusters shared by all tests of one test binary, stopped at process exit.

use std::sync::{Once, OnceLock};

use super::PgCluster;

/// The source-side (and default) shared cluster.
static PRIMARY: OnceLock<Result<PgCluster, String>> = OnceLock::new();
/// The destination-side shared cluster of [`PgCluster::shared_pair`].
static SECONDARY: OnceLock<Result<PgCluster, String>> = OnceLock::new();
/// Guards the one-time `atexit` registration.
static AT_EXIT: Once = Once::new();

impl PgCluster {
    /// The cluster shared by every test in this test binary, started on first use.
    ///
    /// Tests share it by creating their own database ([`crate::TestDb::create`]). It is the
    /// same server as the first of [`PgCluster::shared_pair`]. It is stopped and its directory
    /// removed when the process exits (an `atexit` handler; the parent-death signal covers
    /// aborts).
    ///
    /// # Panics
    /// If the cluster cannot be started (a test that needs PostgreSQL must fail, not skip);
    /// the message is the [`crate::HarnessError`] text. Later calls panic with the same text.
    pub fn shared() -> &'static PgCluster {
        get(&PRIMARY, "source")
    }

    /// Two distinct shared clusters: (source server, destination server), with the same
    /// lifetime rules as [`PgCluster::shared`]; the first one *is* [`PgCluster::shared`].
    ///
    /// # Panics
    /// If either cluster cannot be started.
    pub fn shared_pair() -> (&'static PgCluster, &'static PgCluster) {
        (get(&PRIMARY, "source"), get(&SECONDARY, "destination"))
    }
}

/// The server binaries of one side: `$PGZM_SOURCE_BINDIR` or `$PGZM_DEST_BINDIR` when set
/// (cross-version pairs: `dev/test-versions` sets them), else the default ones.
fn bindir_of(role: &str) -> Result<std::path::PathBuf, crate::HarnessError> {
    let var = if role == "destination" {
        "PGZM_DEST_BINDIR"
    } else {
        "PGZM_SOURCE_BINDIR"
    };
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(dir) => {
            let dir = std::path::PathBuf::from(dir);
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                Ok(dir)
            } else {
                Err(crate::HarnessError::BinariesNotFound {
                    searched: format!("{var}={} lacks initdb or postgres", dir.display()),
                })
            }
        }
        None => super::binaries::find_bindir(),
    }
}

/// Starts the cluster in `cell` once, or panics with the stored start-up error.
fn get(cell: &'static OnceLock<Result<PgCluster, String>>, role: &str) -> &'static PgCluster {
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain `extern "C"` function has no preconditions. If
        // registration fails, the parent-death signal still stops the servers.
        unsafe {
            libc::atexit(stop_shared_clusters);
        }
    });
    let start = || bindir_of(role).and_then(PgCluster::start_with);
    match cell.get_or_init(|| start().map_err(|e| e.to_string())) {
        Ok(cluster) => cluster,
        Err(message) => panic!("start the {role} PostgreSQL test cluster: {message}"),
    }
}

/// `atexit` handler: stops the shared clusters and deletes their directories.
extern "C" fn stop_shared_clusters() {
    // A panic must not unwind into libc.
    let _ = std::panic::catch_unwind(|| {
        for cell in [&PRIMARY, &SECONDARY] {
            if let Some(Ok(cluster)) = cell.get() {
                cluster.shutdown();
            }
        }
    });
}
