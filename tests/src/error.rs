//! The one error type of the harness.
//!
//! Every variant renders as a single line that says what failed and what to do about it, so a
//! failing test prints an actionable message.

use std::path::PathBuf;

/// Everything that can go wrong while starting clusters, creating databases or reading catalogs.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// No directory with both `initdb` and `postgres` was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found ({searched}): install the server \
         package (e.g. `apt-get install postgresql`) or set PG_BINDIR to its bin directory"
    )]
    BinariesNotFound {
        /// Where the harness looked, in order.
        searched: String,
    },

    /// Running as root, but no OS user exists that initdb and postgres can run as.
    #[error(
        "running as root but neither OS user `postgres` nor `nobody` exists to run initdb and \
         postgres: create one (e.g. `useradd --system postgres`)"
    )]
    NoUnprivilegedUser,

    /// A file-system or process operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What the harness was doing, e.g. "create temp dir /tmp/pgzm-1-ab".
        action: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// `initdb` exited unsuccessfully.
    #[error(
        "initdb failed ({status}) for {data_dir}: {output}; check the server binaries and that the \
         temp dir is writable by the server user"
    )]
    Initdb {
        /// The data directory initdb was asked to create.
        data_dir: PathBuf,
        /// The exit status as text.
        status: String,
        /// initdb's stdout and stderr, joined into one line.
        output: String,
    },

    /// The postmaster exited before it accepted connections.
    #[error("postgres exited during startup ({status}); server log {log} ends with: {tail}")]
    ServerExited {
        /// The exit status as text.
        status: String,
        /// Path of the server log.
        log: PathBuf,
        /// The last lines of the server log, joined into one line.
        tail: String,
    },

    /// The postmaster did not accept connections in time.
    #[error(
        "postgres on port {port} did not accept connections within {seconds} s; server log {log} \
         ends with: {tail}"
    )]
    ServerNotReady {
        /// The TCP port the server was started on.
        port: u16,
        /// How long the harness waited.
        seconds: u64,
        /// Path of the server log.
        log: PathBuf,
        /// The last lines of the server log, joined into one line.
        tail: String,
    },

    /// Opening a client connection failed.
    #[error("connect to {url}: {message}; check that the test cluster is still running")]
    Connect {
        /// The connection URL (the harness never uses passwords).
        url: String,
        /// The server or network error.
        message: String,
    },

    /// A SQL statement issued by the harness failed.
    #[error("{action}: {message}")]
    Sql {
        /// What the harness was doing, e.g. "create database t_x_123".
        action: String,
        /// The server error, with detail and hint when present.
        message: String,
    },

    /// A SQL file could not be read.
    #[error("read SQL file {path}: {source}; check the path (fixtures live under tests/fixtures)")]
    ReadFile {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A SQL file was read but the server rejected it.
    #[error("load SQL file {path} into database {database}: {message}; fix the SQL in that file")]
    LoadFile {
        /// The file that was loaded.
        path: PathBuf,
        /// The target database.
        database: String,
        /// The server error, with detail, hint and line number when known.
        message: String,
    },
}

impl HarnessError {
    /// Builds an [`HarnessError::Io`] from an action description.
    pub(crate) fn io(action: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            action: action.into(),
            source,
        }
    }

    /// Builds an [`HarnessError::Sql`] from an action description and a driver error.
    pub(crate) fn sql(action: impl Into<String>, error: &tokio_postgres::Error) -> Self {
        HarnessError::Sql {
            action: action.into(),
            message: describe_pg_error(error, None),
        }
    }
}

/// Renders a driver error as one line: severity, SQLSTATE, message, detail, hint, and, when
/// `source_text` is the statement text the error refers to, the line the error position falls on.
pub(crate) fn describe_pg_error(
    error: &tokio_postgres::Error,
    source_text: Option<&str>,
) -> String {
    let Some(db) = error.as_db_error() else {
        return one_line(&error.to_string());
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        text.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = db.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    if let Some(where_) = db.where_() {
        text.push_str(&format!("; where: {where_}"));
    }
    if let (Some(tokio_postgres::error::ErrorPosition::Original(pos)), Some(src)) =
        (db.position(), source_text)
    {
        // The position is 1-based and counts characters, not bytes.
        let before: String = src
            .chars()
            .take((*pos as usize).saturating_sub(1))
            .collect();
        let line = before.matches('\n').count() + 1;
        text.push_str(&format!(" (at line {line})"));
    }
    one_line(&text)
}

/// Joins multi-line text into one line so error messages stay single-line.
pub(crate) fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
