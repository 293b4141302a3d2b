//! Errors of the agent's data plane.

use crate::pg::{describe, ErrorClass, ErrorKind};

/// Which database a connection or statement went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source database (read under the exported snapshot).
    Source,
    /// The destination database (shadow tables).
    Destination,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// A failure of one copy task. Every variant leaves the destination as it was before the task
/// (its transaction is rolled back), so the task can be retried from scratch.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The task message is incomplete or contradictory.
    #[error("invalid copy task: {0}")]
    InvalidTask(String),
    /// A message broke the protocol (see [`crate::model`]): a required field missing or
    /// empty, an impossible page range, a malformed digest.
    #[error("invalid copy task: {0}")]
    Invalid(#[from] crate::model::ModelError),
    /// A connection string could not be parsed.
    #[error("invalid {side} connection string: {message}")]
    InvalidConnection {
        /// Which database.
        side: Side,
        /// Parser message (never contains the connection string).
        message: String,
    },
    /// The caller asked for something this agent never does: a connection string when it holds
    /// named databases, or a write outside the shadow tables of a recorded, unfinished
    /// migration. Logged by the agent; never retried.
    #[error("refused: {0}")]
    Refused(String),
    /// The database could not be reached.
    #[error("connect to the {side} database: {message}")]
    Connect {
        /// Which database.
        side: Side,
        /// One-line reason.
        message: String,
        /// What went wrong (sets the retry policy).
        kind: ErrorKind,
    },
    /// The source-side agent a task reads from could not be reached (its address refuses
    /// connections, or the link to it is down): retried, for a while even beyond the retry
    /// count (see [`CONNECT_KEY`]).
    #[error("cannot reach the source-side agent {url}: {message}")]
    PeerUnreachable {
        /// The agent's URL.
        url: String,
        /// One-line reason (the transport error and its causes).
        message: String,
    },
    /// The exported snapshot is gone (the coordinator's snapshot transaction ended).
    #[error("import source snapshot {snapshot}: {message}; the coordinator's snapshot transaction has ended, restart the migration")]
    Snapshot {
        /// Snapshot id.
        snapshot: String,
        /// One-line reason.
        message: String,
    },
    /// A statement of the copy failed.
    #[error("copy {table}: {step} on the {side}: {message}")]
    Copy {
        /// Table being copied (destination name).
        table: String,
        /// What was being done.
        step: &'static str,
        /// Which database.
        side: Side,
        /// One-line reason.
        message: String,
        /// What went wrong (sets the retry policy).
        kind: ErrorKind,
    },
    /// The destination received another number of rows than the source snapshot holds.
    #[error("copy {table}: wrote {written} rows but the source snapshot holds {in_source}; nothing was committed")]
    RowCountMismatch {
        /// Table being copied.
        table: String,
        /// Rows written by COPY.
        written: u64,
        /// Rows counted in the source.
        in_source: u64,
    },
    /// The rows handed to the destination differ from the rows read from the source (the row
    /// digests disagree): data changed on its way. Retried; nothing was committed.
    #[error("copy {table}: the rows written ({destination}) differ from the rows read from the source ({source_digest}); nothing was committed")]
    DigestMismatch {
        /// Table being copied.
        table: String,
        /// Source-side digest (rows and hash).
        source_digest: String,
        /// Destination-side digest.
        destination: String,
    },
}

impl AgentError {
    /// Wraps a PostgreSQL error raised during `step` of copying `table`.
    pub fn copy(table: &str, step: &'static str, side: Side, err: &tokio_postgres::Error) -> Self {
        AgentError::Copy {
            table: table.to_string(),
            step,
            side,
            message: describe(err),
            kind: ErrorKind::of(err),
        }
    }

    /// Whether retrying the task from a clean state may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Connect { kind, .. } | AgentError::Copy { kind, .. } => {
                kind.class() != ErrorClass::Fatal
            }
            AgentError::InvalidTask(_)
            | AgentError::Invalid(_)
            | AgentError::Refused(_)
            | AgentError::InvalidConnection { .. }
            | AgentError::Snapshot { .. }
            | AgentError::RowCountMismatch { .. } => false,
            AgentError::DigestMismatch { .. } | AgentError::PeerUnreachable { .. } => true,
        }
    }
}

/// Metadata key on every error status an agent returns about a task: `1` when a retry may
/// succeed, `0` when not. A status without it comes from the transport (the agent is gone or
/// unreachable), not from the task.
pub const RETRYABLE_KEY: &str = "pgzm-retryable";

/// Metadata key on an error status whose task could not connect to a database or to the
/// source-side agent (`1`): the server may be restarting, or the link be down for a while, and
/// the coordinator keeps retrying for a while.
pub const CONNECT_KEY: &str = "pgzm-connect-failed";

/// Metadata key on an error status from a database: the [`ErrorKind`]'s name.
pub const KIND_KEY: &str = "pgzm-error-kind";

impl AgentError {
    /// The kind of a database failure (None for the agent's own refusals and checks).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            AgentError::Connect { kind, .. } | AgentError::Copy { kind, .. } => Some(*kind),
            AgentError::PeerUnreachable { .. } => Some(ErrorKind::Connection),
            _ => None,
        }
    }
}

impl From<AgentError> for tonic::Status {
    fn from(err: AgentError) -> Self {
        let message = err.to_string();
        let retryable = err.is_retryable();
        let connect = matches!(
            err,
            AgentError::Connect { .. } | AgentError::PeerUnreachable { .. }
        );
        let kind = err.kind();
        let mut status = match err {
            AgentError::InvalidTask(_)
            | AgentError::Invalid(_)
            | AgentError::InvalidConnection { .. } => tonic::Status::invalid_argument(message),
            AgentError::Snapshot { .. } => tonic::Status::failed_precondition(message),
            AgentError::Refused(_) => tonic::Status::permission_denied(message),
            AgentError::RowCountMismatch { .. } | AgentError::DigestMismatch { .. } => {
                tonic::Status::data_loss(message)
            }
            AgentError::Connect { .. }
            | AgentError::Copy { .. }
            | AgentError::PeerUnreachable { .. } => tonic::Status::aborted(message),
        };
        status.metadata_mut().insert(
            RETRYABLE_KEY,
            tonic::metadata::MetadataValue::from_static(if retryable { "1" } else { "0" }),
        );
        if connect {
            status.metadata_mut().insert(
                CONNECT_KEY,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        if let Some(kind) = kind {
            status.metadata_mut().insert(
                KIND_KEY,
                tonic::metadata::MetadataValue::from_static(kind.as_str()),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source-side agent out of reach is a connection failure the coordinator retries for a
    /// while (like a database that restarts), named by its URL.
    #[test]
    fn an_unreachable_peer_is_retried_like_a_failed_connection() {
        let status = tonic::Status::from(AgentError::PeerUnreachable {
            url: "http://10.0.0.1:50051".into(),
            message: "transport error: tcp connect error: deadline has elapsed".into(),
        });
        let meta = |key| status.metadata().get(key).and_then(|v| v.to_str().ok());
        assert_eq!(meta(RETRYABLE_KEY), Some("1"));
        assert_eq!(meta(CONNECT_KEY), Some("1"));
        assert_eq!(meta(KIND_KEY), Some(ErrorKind::Connection.as_str()));
        assert_eq!(
            status.message(),
            "cannot reach the source-side agent http://10.0.0.1:50051: transport error: tcp connect error: deadline has elapsed"
        );
    }
}
