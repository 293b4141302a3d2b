//! One copy task: stream a table from the source snapshot into its shadow table.

use std::time::Instant;

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use pgzm_proto::agent::v1 as proto;
use tokio_postgres::Config;
use tracing::{debug, info_span, Instrument};

use crate::error::{AgentError, Side};
use crate::pg;
use crate::sql::{quote_ident_list, quote_literal, quote_qualified};

/// Default interval between progress reports.
pub const DEFAULT_PROGRESS_EVERY_BYTES: u64 = 8 * 1024 * 1024;

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    /// Schema (unquoted).
    pub schema: String,
    /// Relation name (unquoted).
    pub name: String,
}

impl QualifiedName {
    /// The quoted form, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }
}

impl std::fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A validated copy task (the domain form of [`proto::CopyTask`]).
///
/// `Debug` leaves the connection configs out: they may hold passwords.
#[derive(Clone)]
pub struct CopySpec {
    /// Unique id of this task attempt.
    pub task_id: String,
    /// Source connection.
    pub source: Config,
    /// Destination connection.
    pub destination: Config,
    /// application_name for both connections.
    pub application_name: String,
    /// Exported source snapshot.
    pub snapshot_id: String,
    /// Table read on the source.
    pub source_table: QualifiedName,
    /// Shadow table written on the destination.
    pub destination_table: QualifiedName,
    /// Columns, in order.
    pub columns: Vec<String>,
    /// Progress interval in bytes.
    pub progress_every_bytes: u64,
}

impl std::fmt::Debug for CopySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopySpec")
            .field("task_id", &self.task_id)
            .field("source_table", &self.source_table)
            .field("destination_table", &self.destination_table)
            .field("columns", &self.columns.len())
            .finish_non_exhaustive()
    }
}

fn table_name(side: &str, t: Option<proto::TableName>) -> Result<QualifiedName, AgentError> {
    let t = t.ok_or_else(|| AgentError::InvalidTask(format!("{side} table missing")))?;
    if t.schema.is_empty() || t.name.is_empty() {
        return Err(AgentError::InvalidTask(format!(
            "{side} table name is empty"
        )));
    }
    Ok(QualifiedName {
        schema: t.schema,
        name: t.name,
    })
}

fn endpoint(side: Side, e: Option<proto::Endpoint>) -> Result<(Config, String), AgentError> {
    let e = e.ok_or_else(|| AgentError::InvalidTask(format!("{side} endpoint missing")))?;
    let config = pg::parse_config(&e.url)
        .map_err(|message| AgentError::InvalidConnection { side, message })?;
    Ok((config, e.application_name))
}

impl TryFrom<proto::CopyTask> for CopySpec {
    type Error = AgentError;

    fn try_from(task: proto::CopyTask) -> Result<Self, Self::Error> {
        if task.task_id.is_empty() {
            return Err(AgentError::InvalidTask("task_id is empty".into()));
        }
        if task.snapshot_id.is_empty() {
            return Err(AgentError::InvalidTask("snapshot_id is empty".into()));
        }
        if task.columns.is_empty() {
            return Err(AgentError::InvalidTask("no columns to copy".into()));
        }
        let (source, application_name) = endpoint(Side::Source, task.source)?;
        let (destination, _) = endpoint(Side::Destination, task.destination)?;
        Ok(CopySpec {
            task_id: task.task_id,
            source,
            destination,
            application_name,
            snapshot_id: task.snapshot_id,
            source_table: table_name("source", task.source_table)?,
            destination_table: table_name("destination", task.destination_table)?,
            columns: task.columns,
            progress_every_bytes: if task.progress_every_bytes == 0 {
                DEFAULT_PROGRESS_EVERY_BYTES
            } else {
                task.progress_every_bytes
            },
        })
    }
}

/// What a finished copy task reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Rows the destination's COPY wrote.
    pub rows_written: u64,
    /// Rows in the source table under the snapshot.
    pub rows_in_source: u64,
    /// COPY payload bytes.
    pub bytes: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

impl From<CopyOutcome> for proto::CopyDone {
    fn from(o: CopyOutcome) -> Self {
        proto::CopyDone {
            rows_written: o.rows_written,
            rows_in_source: o.rows_in_source,
            bytes: o.bytes,
            duration_ms: o.duration_ms,
        }
    }
}

/// Runs one copy task.
///
/// The source side reads in a `REPEATABLE READ READ ONLY` transaction that imports the
/// coordinator's snapshot; the destination side truncates the shadow table and copies into it
/// (`FREEZE`) in one transaction, which commits only when the row count written equals the
/// source's count under the same snapshot. `progress` is called with the byte count so far about
/// every `progress_every_bytes`.
pub async fn run_copy(
    spec: &CopySpec,
    mut progress: impl FnMut(u64) + Send,
) -> Result<CopyOutcome, AgentError> {
    let span = info_span!("copy_task", task = %spec.task_id, table = %spec.destination_table);
    async move {
        let started = Instant::now();
        let table = spec.destination_table.to_string();
        let src = pg::connect(spec.source.clone(), &spec.application_name)
            .await
            .map_err(|e| connect_error(Side::Source, &e))?;
        let dst = pg::connect(spec.destination.clone(), &spec.application_name)
            .await
            .map_err(|e| connect_error(Side::Destination, &e))?;

        src.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|e| {
                AgentError::copy(&table, "begin snapshot transaction", Side::Source, &e)
            })?;
        src.batch_execute(&format!(
            "SET TRANSACTION SNAPSHOT {}",
            quote_literal(&spec.snapshot_id)
        ))
        .await
        .map_err(|e| AgentError::Snapshot {
            snapshot: spec.snapshot_id.clone(),
            message: pg::describe(&e),
        })?;

        let columns = quote_ident_list(spec.columns.iter().map(String::as_str));
        let target = spec.destination_table.quoted();
        dst.batch_execute(&format!("BEGIN; TRUNCATE {target}"))
            .await
            .map_err(|e| {
                AgentError::copy(&table, "truncate shadow table", Side::Destination, &e)
            })?;

        let out = src
            .copy_out(&format!(
                "COPY {} ({columns}) TO STDOUT (FORMAT binary)",
                spec.source_table.quoted()
            ))
            .await
            .map_err(|e| AgentError::copy(&table, "start COPY TO", Side::Source, &e))?;
        let sink = dst
            .copy_in::<_, bytes::Bytes>(&format!(
                "COPY {target} ({columns}) FROM STDIN (FORMAT binary, FREEZE)"
            ))
            .await
            .map_err(|e| AgentError::copy(&table, "start COPY FROM", Side::Destination, &e))?;
        futures_util::pin_mut!(sink);

        let mut bytes = 0u64;
        let mut next_report = spec.progress_every_bytes;
        let chunks = out.map_err(|e| AgentError::copy(&table, "read COPY data", Side::Source, &e));
        futures_util::pin_mut!(chunks);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            bytes += chunk.len() as u64;
            sink.feed(chunk)
                .await
                .map_err(|e| AgentError::copy(&table, "write COPY data", Side::Destination, &e))?;
            if bytes >= next_report {
                progress(bytes);
                next_report = bytes + spec.progress_every_bytes;
            }
        }
        let rows_written = sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| AgentError::copy(&table, "finish COPY", Side::Destination, &e))?;
        progress(bytes);

        let row = src
            .query_one(
                &format!("SELECT count(*) FROM {}", spec.source_table.quoted()),
                &[],
            )
            .await
            .map_err(|e| AgentError::copy(&table, "count source rows", Side::Source, &e))?;
        let rows_in_source = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        // The source transaction only read: ending it cannot fail in a way that matters.
        let _ = src.batch_execute("COMMIT").await;
        if rows_in_source != rows_written {
            let _ = dst.batch_execute("ROLLBACK").await;
            return Err(AgentError::RowCountMismatch {
                table,
                written: rows_written,
                in_source: rows_in_source,
            });
        }
        dst.batch_execute("COMMIT")
            .await
            .map_err(|e| AgentError::copy(&table, "commit", Side::Destination, &e))?;
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        debug!(rows = rows_written, bytes, duration_ms, "copy task done");
        Ok(CopyOutcome {
            rows_written,
            rows_in_source,
            bytes,
            duration_ms,
        })
    }
    .instrument(span)
    .await
}

fn connect_error(side: Side, err: &tokio_postgres::Error) -> AgentError {
    AgentError::Connect {
        side,
        message: pg::describe(err),
        class: pg::classify(err),
    }
}
