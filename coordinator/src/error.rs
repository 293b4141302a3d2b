//! Errors of the coordinator. Each variant is a failure the operator can act on; its message is
//! one line saying what failed and what to do.

use pgzm_pg::conn::{ErrorClass, ErrorKind, PgError};

/// A coordinator failure.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// A connection string could not be parsed.
    #[error("invalid {side} database URL: {message}")]
    InvalidUrl {
        /// "source" or "destination".
        side: &'static str,
        /// What is wrong (never contains the URL).
        message: String,
    },
    /// A database could not be reached.
    #[error("cannot connect to the {side} database {target}: {message}")]
    Connect {
        /// "source" or "destination".
        side: &'static str,
        /// host:port/dbname, without credentials.
        target: String,
        /// One-line reason.
        message: String,
    },
    /// Reading the catalog failed.
    #[error("read the source catalog: {what}: {source}")]
    Catalog {
        /// Which query.
        what: &'static str,
        /// The server's error.
        source: PgError,
    },
    /// The plan found reasons not to start; nothing was changed.
    #[error("{}", .0.join("; "))]
    Refused(Vec<String>),
    /// Another pgzm run holds the destination.
    #[error("another pgzm run is working on this destination (advisory lock held); wait for it to finish or stop it")]
    Busy,
    /// A DDL or metadata statement on the destination failed.
    #[error("{action}: {source}")]
    Destination {
        /// What was being done, e.g. `create shadow table "Area"`.
        action: String,
        /// The server's error (its kind sets the retry policy).
        source: PgError,
    },
    /// A statement on the source failed.
    #[error("{action} on the source: {source}")]
    Source {
        /// What was being done.
        action: String,
        /// The server's error.
        source: PgError,
    },
    /// pgzm's own record of a run (in `pgzm.migrations`) cannot be read: written by another
    /// version, or edited by hand.
    #[error("{what}: {message}")]
    Metadata {
        /// Which record.
        what: String,
        /// What is wrong with it and what to do.
        message: String,
    },
    /// A copy task failed for good.
    #[error("copy table \"{table}\": {message}")]
    Copy {
        /// Table.
        table: String,
        /// One-line reason from the agent.
        message: String,
    },
    /// The agent could not be reached or is incompatible.
    #[error("agent {agent}: {message}")]
    Agent {
        /// Agent address or "in-process".
        agent: String,
        /// One-line reason.
        message: String,
    },
    /// Row counts of a shadow table do not match the source snapshot.
    #[error("validate \"{table}\": shadow table has {shadow} rows, the source snapshot {source_rows}; nothing was swapped")]
    Validation {
        /// Table.
        table: String,
        /// Rows in the shadow table.
        shadow: i64,
        /// Rows in the source snapshot.
        source_rows: i64,
    },
    /// A transaction that needs table locks (the swap, setting up or removing sync triggers)
    /// could not take them within the allowed time; it was rolled back, nothing changed.
    #[error("{action}: could not lock the tables within {waited_ms} ms ({attempts} attempts of {lock_timeout_ms} ms each); {}nothing was changed: retry later (exit status 75), end those sessions, raise --swap-timeout, or let pgzm end them with --kill-blockers-after SECS", blocked_by(.blockers))]
    SwapLockTimeout {
        /// What needed the locks ("swap", …).
        action: String,
        /// Attempts made.
        attempts: u32,
        /// lock_timeout per attempt.
        lock_timeout_ms: u64,
        /// Total time spent.
        waited_ms: u64,
        /// The sessions holding locks on the tables when it gave up.
        blockers: Vec<crate::locked::Blocker>,
    },
}

/// `blocked by …; ` naming each session, or what to look for when none was found.
fn blocked_by(blockers: &[crate::locked::Blocker]) -> String {
    if blockers.is_empty() {
        return "a transaction held a lock on one of them (it had ended when pgzm looked); "
            .to_string();
    }
    format!(
        "blocked by {}; ",
        blockers
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Exit status of a failure the operator should retry later (EX_TEMPFAIL): the locks were not
/// granted in time, or another run holds the destination.
pub const EXIT_RETRY_LATER: u8 = 75;

/// Exit status of a usage error (as for the command line's own parse errors).
pub const EXIT_USAGE: u8 = 2;

impl CoordinatorError {
    /// The process exit status for this failure: 75 to retry later, 2 for usage, 1 otherwise.
    pub fn exit_status(&self) -> u8 {
        match self {
            CoordinatorError::SwapLockTimeout { .. } | CoordinatorError::Busy => EXIT_RETRY_LATER,
            CoordinatorError::Usage(_) | CoordinatorError::InvalidUrl { .. } => EXIT_USAGE,
            _ => 1,
        }
    }

    /// A catalog query failure.
    pub fn catalog(what: &'static str, err: tokio_postgres::Error) -> Self {
        CoordinatorError::Catalog {
            what,
            source: err.into(),
        }
    }

    /// A destination statement failure while doing `action`.
    pub fn destination(action: impl Into<String>, err: tokio_postgres::Error) -> Self {
        CoordinatorError::Destination {
            action: action.into(),
            source: err.into(),
        }
    }

    /// A source statement failure while doing `action`.
    pub fn source(action: impl Into<String>, err: tokio_postgres::Error) -> Self {
        CoordinatorError::Source {
            action: action.into(),
            source: err.into(),
        }
    }

    /// The kind of the database error behind this one, if a database error is behind it.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            CoordinatorError::Catalog { source, .. }
            | CoordinatorError::Destination { source, .. }
            | CoordinatorError::Source { source, .. } => Some(source.kind()),
            CoordinatorError::SwapLockTimeout { .. } => Some(ErrorKind::LockTimeout),
            _ => None,
        }
    }

    /// The retry policy: whether trying again later (from a clean state) may succeed.
    pub fn class(&self) -> ErrorClass {
        self.kind().map_or(ErrorClass::Fatal, ErrorKind::class)
    }

    /// Whether this is a lock timeout.
    pub fn is_lock_timeout(&self) -> bool {
        self.class() == ErrorClass::LockTimeout
    }
}

/// Result alias.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
