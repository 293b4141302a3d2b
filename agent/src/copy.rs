//! One copy task: stream a table (or a page range of it) from the source snapshot into its
//! shadow table, exactly once.

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::pg::PgTarget;
use crate::pool::Sessions;
use tracing::{debug, info_span, Instrument};

use crate::endpoint::Databases;
use crate::error::{AgentError, Side};
pub use crate::model::PageRange;
use crate::model::{CopyDone, CopyTask, ExportTask, SourceRead};
use crate::pg;
pub use crate::sql::QualifiedName;
use crate::sql::{quote_ident_list, quote_literal};
pub use crate::stream::{SourceItem, SourceStream};

/// Default interval between progress reports.
pub const DEFAULT_PROGRESS_EVERY_BYTES: u64 = 8 * 1024 * 1024;

/// Size of the CopyData messages sent to the destination.
const FLUSH_BYTES: usize = 64 * 1024;

/// Longest time between two progress reports (a heartbeat for the coordinator).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Where the source data comes from.
#[derive(Clone)]
pub enum SourceSpec {
    /// The agent connects to the source itself.
    Direct(PgTarget),
    /// A source-side agent streams it (`ExportRange`).
    Peer {
        /// The peer's URL.
        url: String,
        /// The export to ask of the peer.
        request: ExportTask,
    },
}

/// A validated copy task resolved against the databases this agent holds: where it connects,
/// and the settings the agent derives from it.
///
/// `Debug` leaves the connection configs out: they may hold passwords.
#[derive(Clone)]
pub struct CopySpec {
    /// The task as received.
    pub task: CopyTask,
    /// Source data.
    pub source: SourceSpec,
    /// Destination connection.
    pub destination: PgTarget,
    /// Session-reuse key of the source (includes the snapshot).
    pub source_key: String,
    /// Session-reuse key of the destination.
    pub destination_key: String,
    /// application_name for the connections.
    pub application_name: String,
    /// Truncate first and load with `COPY FREEZE`: the task asks, and it is a whole table.
    pub freeze: bool,
    /// Progress interval in bytes.
    pub progress_every_bytes: u64,
}

impl std::fmt::Debug for CopySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopySpec")
            .field("task_id", &self.task.task_id)
            .field("source_table", &self.task.read.table)
            .field("destination_table", &self.task.destination_table)
            .field("range", &self.task.read.range)
            .finish_non_exhaustive()
    }
}

impl CopySpec {
    /// Resolves a task's endpoints against the databases this agent holds.
    pub fn resolve(task: CopyTask, databases: &Databases) -> Result<Self, AgentError> {
        let (destination, application_name) =
            databases.resolve(Side::Destination, &task.destination)?;
        let source_key = format!("{}\u{0}{}", task.source.session_key(), task.read.snapshot);
        let destination_key = task.destination.session_key();
        let source = match &task.peer_url {
            None => SourceSpec::Direct(databases.resolve(Side::Source, &task.source)?.0),
            Some(url) => SourceSpec::Peer {
                url: url.clone(),
                request: task.export(),
            },
        };
        Ok(CopySpec {
            freeze: task.freeze && task.read.range.is_none(),
            progress_every_bytes: task
                .progress_every_bytes
                .map_or(DEFAULT_PROGRESS_EVERY_BYTES, NonZeroU64::get),
            task,
            source,
            destination,
            source_key,
            destination_key,
            application_name,
        })
    }
}

/// Counts and digests the rows of a binary COPY stream as PostgreSQL sends it: one row per
/// CopyData message, the header with the first row, the trailer in a message of its own. The
/// count is checked against the destination's, the digest against the destination side's.
#[derive(Debug, Default)]
pub struct RowCounter {
    digest: crate::digest::Digest,
    header: bool,
    trailer: bool,
    hash: bool,
}

use crate::digest::BINARY_SIGNATURE;
/// Signature, flags field and header-extension length (PostgreSQL writes no extension).
const HEADER_LEN: usize = 19;

impl RowCounter {
    /// A counter that also digests the rows when `hash`.
    pub fn new(hash: bool) -> Self {
        RowCounter {
            hash,
            ..RowCounter::default()
        }
    }

    /// Accounts for one CopyData message.
    ///
    /// The 19-byte header is buffered by the server and arrives in the first message, together
    /// with the first row — or with the trailer when the table is empty.
    pub fn message(&mut self, data: &[u8]) {
        let mut data = data;
        if !self.header && data.starts_with(BINARY_SIGNATURE) && data.len() >= HEADER_LEN {
            self.header = true;
            data = &data[HEADER_LEN..];
            if data.is_empty() {
                return;
            }
        }
        if data == [0xff, 0xff] {
            self.trailer = true;
            return;
        }
        if self.hash {
            self.digest.add_row(data);
        } else {
            self.digest.rows += 1;
        }
    }

    /// Rows seen.
    pub fn rows(&self) -> u64 {
        self.digest.rows
    }

    /// The rows' digest, when hashing.
    pub fn digest(&self) -> Option<crate::digest::Digest> {
        self.hash.then_some(self.digest)
    }
}

/// ` (a, b, …)` for COPY, or nothing for a table without copied columns (no columns at all, or
/// only generated ones): COPY without a column list then moves rows of zero fields, and the
/// destination computes its generated columns.
fn column_list(columns: &[String]) -> String {
    if columns.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            quote_ident_list(columns.iter().map(String::as_str))
        )
    }
}

/// Opens the source side: a snapshot transaction and a COPY TO stream of the table or range.
/// `reuse` is a session of an earlier task that is already inside this snapshot's transaction.
pub async fn open_source(
    config: PgTarget,
    application_name: &str,
    read: &SourceRead,
    reuse: Option<Client>,
) -> Result<(Client, tokio_postgres::CopyOutStream), AgentError> {
    let SourceRead {
        snapshot,
        table,
        columns,
        range,
    } = read;
    let (snapshot_id, range) = (snapshot.as_str(), *range);
    let name = table.to_string();
    let src = match reuse {
        Some(c) => c,
        None => {
            let src = pg::connect(config, application_name)
                .await
                .map_err(|e| connect_error(Side::Source, &e))?;
            src.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(|e| {
                    AgentError::copy(&name, "begin snapshot transaction", Side::Source, &e)
                })?;
            src.batch_execute(&format!(
                "SET TRANSACTION SNAPSHOT {}",
                quote_literal(snapshot_id)
            ))
            .await
            .map_err(|e| AgentError::Snapshot {
                snapshot: snapshot_id.to_string(),
                message: pg::describe(&e),
            })?;
            src
        }
    };
    let list = column_list(columns);
    let columns = quote_ident_list(columns.iter().map(String::as_str));
    let sql = match range {
        None => format!("COPY {}{list} TO STDOUT (FORMAT binary)", table.quoted()),
        Some(r) => format!(
            "COPY (SELECT {columns} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT binary)",
            table.quoted(),
            r.predicate()
        ),
    };
    let out = src
        .copy_out(&sql)
        .await
        .map_err(|e| AgentError::copy(&name, "start COPY TO", Side::Source, &e))?;
    Ok((src, out))
}

async fn source_stream(
    spec: &CopySpec,
    peers: &crate::peer::PeerConnector,
    sessions: &Sessions,
) -> Result<SourceStream, AgentError> {
    let table = spec.task.destination_table.to_string();
    match &spec.source {
        SourceSpec::Direct(config) => {
            let (client, out) = open_source(
                config.clone(),
                &spec.application_name,
                &spec.task.read,
                sessions.source.take(&spec.source_key),
            )
            .await?;
            let pool = std::sync::Arc::clone(&sessions.source);
            let key = spec.source_key.clone();
            Ok(direct_stream(
                client,
                out,
                table,
                spec.task.verify,
                move |c| pool.put(key, c),
            ))
        }
        SourceSpec::Peer { url, request } => peers.export(url, request.clone(), &table).await,
    }
}

/// The COPY TO stream of a direct source, rows counted (and digested when `hash`) as they pass,
/// ending with the count and digest. `done` receives the session back when the whole stream was
/// read without error (it is still inside the snapshot transaction and can serve the next task
/// of the same snapshot).
pub fn direct_stream(
    client: Client,
    out: tokio_postgres::CopyOutStream,
    table: String,
    hash: bool,
    done: impl FnOnce(Client) + Send + 'static,
) -> SourceStream {
    struct State<D> {
        out: std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
        counter: RowCounter,
        // Lives as long as the stream, so the snapshot transaction stays open.
        client: Option<Client>,
        done: Option<D>,
        table: String,
        ended: bool,
    }
    let state = State {
        out: Box::pin(out),
        counter: RowCounter::new(hash),
        client: Some(client),
        done: Some(done),
        table,
        ended: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        match st.out.next().await {
            Some(Ok(bytes)) => {
                st.counter.message(&bytes);
                Some((Ok(SourceItem::Data(bytes)), st))
            }
            Some(Err(e)) => {
                st.ended = true;
                st.client = None;
                let err = AgentError::copy(&st.table, "read COPY data", Side::Source, &e);
                Some((Err(err), st))
            }
            None => {
                st.ended = true;
                if let (Some(client), Some(done)) = (st.client.take(), st.done.take()) {
                    done(client);
                }
                let end = SourceItem::End {
                    rows: st.counter.rows(),
                    digest: st.counter.digest(),
                };
                Some((Ok(end), st))
            }
        }
    }))
}

/// Runs one copy task.
///
/// If the task already committed in an earlier attempt (recorded in `pgzm.copy_progress`),
/// nothing is copied. Otherwise one destination transaction truncates the shadow table and
/// copies with `FREEZE` when the task asks (large whole tables), or just copies, checks the row count against
/// what the source sent, records the task in `pgzm.copy_progress`, and commits. `progress` is
/// called with the byte count about every `progress_every_bytes` and at least every
/// [`HEARTBEAT`].
pub async fn run_copy(
    spec: &CopySpec,
    peers: &crate::peer::PeerConnector,
    sessions: &Sessions,
    mut progress: impl FnMut(u64) + Send,
) -> Result<CopyDone, AgentError> {
    // Writes into the destination (OpenTelemetry's database conventions); `table` is the live
    // (source) name, `shadow` the table written.
    let span = info_span!(
        "copy_task",
        task = %spec.task.task_id,
        table = %spec.task.read.table,
        shadow = %spec.task.destination_table,
        db.system.name = "postgresql",
        db.namespace = tracing::field::Empty,
        db.operation.name = "COPY",
        db.collection.name = %spec.task.destination_table,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
    );
    crate::telemetry::record_db_server(&span, &spec.destination.server());
    async move {
        let started = Instant::now();
        let table = spec.task.destination_table.to_string();
        let dst = match sessions.destination.take(&spec.destination_key) {
            Some(c) => c,
            None => pg::connect(spec.destination.clone(), &spec.application_name)
                .await
                .map_err(|e| connect_error(Side::Destination, &e))?,
        };
        if let Some(earlier) = begin_checked(spec, sessions, &dst).await? {
            let _ = dst.batch_execute("ROLLBACK").await;
            sessions.destination.put(spec.destination_key.clone(), dst);
            return Ok(earlier);
        }
        let relabel = relabel_for(spec, &dst, &table).await;
        let relabel = match relabel {
            Ok(r) => r,
            Err(e) => {
                let _ = dst.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        // The run's byte-rate budget (`--max-rate`), this task's share of it.
        let bucket = if spec.task.rate_share_ppm > 0 {
            let watch = crate::throttle::watch(
                &spec.destination,
                &spec.application_name,
                &spec.destination_key,
                spec.task.migration_id.0,
            )
            .await;
            Some(crate::throttle::Bucket::new(
                watch,
                spec.task.rate_share_ppm,
            ))
        } else {
            None
        };
        let mut source = source_stream(spec, peers, sessions).await?;

        let columns = column_list(&spec.task.read.columns);
        let target = spec.task.destination_table.quoted();
        let copy = if spec.freeze {
            dst.batch_execute(&format!("TRUNCATE {target}"))
                .await
                .map_err(|e| {
                    AgentError::copy(&table, "truncate the shadow table", Side::Destination, &e)
                })?;
            format!("COPY {target}{columns} FROM STDIN (FORMAT binary, FREEZE)")
        } else {
            format!("COPY {target}{columns} FROM STDIN (FORMAT binary)")
        };
        let sink = dst
            .copy_in::<_, Bytes>(&copy)
            .await
            .map_err(|e| AgentError::copy(&table, "start COPY FROM", Side::Destination, &e))?;
        futures_util::pin_mut!(sink);
        let pumped = pump(
            spec,
            &table,
            &mut source,
            sink.as_mut(),
            &mut progress,
            relabel.as_ref(),
            bucket,
        )
        .await?;
        let rows_written = sink
            .as_mut()
            .finish()
            .await
            .map_err(|e| AgentError::copy(&table, "finish COPY", Side::Destination, &e))?;
        progress(pumped.bytes);
        let checked = if pumped.rows_in_source == rows_written {
            check_digest(&table, pumped.written, pumped.read_digest)
        } else {
            Err(AgentError::RowCountMismatch {
                table: table.clone(),
                written: rows_written,
                in_source: pumped.rows_in_source,
            })
        };
        let digest = match checked {
            Ok(d) => d,
            Err(e) => {
                let _ = dst.batch_execute("ROLLBACK").await;
                return Err(e);
            }
        };
        if let Some(earlier) =
            record_and_commit(spec, &dst, &table, rows_written, pumped.bytes, digest).await?
        {
            sessions.destination.put(spec.destination_key.clone(), dst);
            return Ok(earlier);
        }
        sessions.destination.put(spec.destination_key.clone(), dst);
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        debug!(
            rows = rows_written,
            bytes = pumped.bytes,
            duration_ms,
            "copy task done"
        );
        Ok(CopyDone {
            rows_written,
            rows_in_source: pumped.rows_in_source,
            bytes: pumped.bytes,
            duration_ms,
            already_done: false,
            digest,
        })
    }
    .instrument(span)
    .await
}

/// The destinations' `server_version_num`, by session key (asked once per destination).
fn known_versions() -> &'static std::sync::Mutex<std::collections::HashMap<String, i32>> {
    static VERSIONS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, i32>>> =
        std::sync::OnceLock::new();
    VERSIONS.get_or_init(Default::default)
}

/// What the task's COPY data needs rewritten for the destination (see `crate::relabel`):
/// nothing on PostgreSQL 14 and later.
async fn relabel_for(
    spec: &CopySpec,
    dst: &Client,
    table: &str,
) -> Result<Option<crate::relabel::Relabel>, AgentError> {
    let err = |e: tokio_postgres::Error| {
        AgentError::copy(table, "read the destination's types", Side::Destination, &e)
    };
    let cached = known_versions()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&spec.destination_key)
        .copied();
    let version = match cached {
        Some(v) => v,
        None => {
            let v: i32 = dst
                .query_one(
                    "SELECT current_setting('server_version_num')::int4 AS version",
                    &[],
                )
                .await
                .map_err(err)?
                .get("version");
            known_versions()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.destination_key.clone(), v);
            v
        }
    };
    crate::relabel::Relabel::for_destination(
        dst,
        version,
        &spec.task.destination_table.quoted(),
        &spec.task.read.columns,
    )
    .await
    .map_err(err)
}

/// The statement reading an earlier attempt's record of the task.
fn progress_sql(spec: &CopySpec) -> String {
    format!(
        "SELECT rows, bytes, digest FROM pgzm.copy_progress WHERE migration_id = {} AND task_key = {}",
        spec.task.migration_id.0,
        quote_literal(spec.task.task_key.as_str())
    )
}

/// Opens the copy's transaction on `dst`, checks that the task may write its table (see
/// `guard`) and looks for an earlier attempt's commit, in one round trip. `Some` outcome: the
/// task is done already (the transaction is left open, for the caller to roll back).
async fn begin_checked(
    spec: &CopySpec,
    sessions: &Sessions,
    dst: &Client,
) -> Result<Option<CopyDone>, AgentError> {
    let status = crate::guard::status_sql(spec.task.migration_id.0, &spec.task.destination_table);
    let found = match dst
        .simple_query(&format!("BEGIN; {status}; {}", progress_sql(spec)))
        .await
    {
        Ok(found) => found,
        Err(e) => {
            let _ = dst.batch_execute("ROLLBACK").await;
            return Err(crate::guard::first_statement_error(
                &spec.task.destination_table,
                &e,
            ));
        }
    };
    let answers = crate::guard::statements(&found);
    let checked = sessions
        .guard
        .check(
            dst,
            &spec.destination_key,
            spec.task.migration_id.0,
            &spec.task.destination_table,
            answers.get(1).map(Vec::as_slice).unwrap_or_default(),
        )
        .await;
    if let Err(e) = checked {
        let _ = dst.batch_execute("ROLLBACK").await;
        return Err(e);
    }
    Ok(answers.get(2).and_then(|rows| progress_of(rows)))
}

/// What a copy's data pump moved: payload bytes, the source's row count and digest, and the
/// digest of what was written (verified tasks).
struct Pumped {
    bytes: u64,
    rows_in_source: u64,
    read_digest: Option<crate::digest::Digest>,
    written: Option<crate::digest::StreamDigester>,
}

/// Streams the source into the COPY FROM `sink`. Rows arrive one CopyData message each; they
/// go out in messages of about FLUSH_BYTES (fewer wakeups, channel sends and writes per byte
/// than one message per row). `progress` hears about every `progress_every_bytes`, and at
/// least every [`HEARTBEAT`].
async fn pump(
    spec: &CopySpec,
    table: &str,
    source: &mut SourceStream,
    mut sink: std::pin::Pin<&mut tokio_postgres::CopyInSink<Bytes>>,
    progress: &mut (impl FnMut(u64) + Send),
    relabel: Option<&crate::relabel::Relabel>,
    mut bucket: Option<crate::throttle::Bucket>,
) -> Result<Pumped, AgentError> {
    let write_error = |e: tokio_postgres::Error| {
        AgentError::copy(table, "write COPY data", Side::Destination, &e)
    };
    let mut pending = bytes::BytesMut::with_capacity(FLUSH_BYTES * 2);
    let mut bytes = 0u64;
    let mut next_report = spec.progress_every_bytes;
    let mut last_report = Instant::now();
    let mut end = None;
    let mut written = spec
        .task
        .verify
        .then(crate::digest::StreamDigester::default);
    while let Some(item) = source.next().await {
        match item? {
            SourceItem::Data(chunk) => {
                bytes += chunk.len() as u64;
                if let Some(w) = written.as_mut() {
                    w.feed(&chunk);
                }
                // The destination's type OIDs (PostgreSQL 13), after the digest of what was read.
                let chunk = match relabel {
                    Some(r) => r.apply(chunk).map_err(|why| AgentError::Copy {
                        table: table.to_string(),
                        step: "rewrite type OIDs for the destination",
                        side: Side::Source,
                        message: format!("the COPY data does not parse: {why}"),
                        kind: pg::ErrorKind::Other,
                    })?,
                    None => chunk,
                };
                // Within the run's byte-rate budget; the coordinator still hears from the task.
                if let Some(b) = bucket.as_mut() {
                    while let Some(wait) = b.wait_for(chunk.len()) {
                        tokio::time::sleep(wait).await;
                        if last_report.elapsed() >= HEARTBEAT {
                            progress(bytes);
                            last_report = Instant::now();
                        }
                    }
                }
                if pending.is_empty() && chunk.len() >= FLUSH_BYTES {
                    sink.feed(chunk).await
                } else {
                    pending.extend_from_slice(&chunk);
                    if pending.len() < FLUSH_BYTES {
                        continue;
                    }
                    sink.feed(pending.split().freeze()).await
                }
                .map_err(write_error)?;
                if bytes >= next_report || last_report.elapsed() >= HEARTBEAT {
                    progress(bytes);
                    next_report = bytes + spec.progress_every_bytes;
                    last_report = Instant::now();
                }
            }
            SourceItem::End { rows, digest } => end = Some((rows, digest)),
        }
    }
    if !pending.is_empty() {
        sink.feed(pending.split().freeze())
            .await
            .map_err(write_error)?;
    }
    let (rows_in_source, read_digest) = end.ok_or_else(|| AgentError::Copy {
        table: table.to_string(),
        step: "read COPY data",
        side: Side::Source,
        message: "the source stream ended without its row count".into(),
        kind: pg::ErrorKind::Connection,
    })?;
    Ok(Pumped {
        bytes,
        rows_in_source,
        read_digest,
        written,
    })
}

/// Verification: the digest of the rows read from the source against the digest of the bytes
/// handed to COPY FROM (parsed into rows); the row counts are compared before. The digest to
/// record, if any.
fn check_digest(
    table: &str,
    written: Option<crate::digest::StreamDigester>,
    read: Option<crate::digest::Digest>,
) -> Result<Option<crate::digest::Digest>, AgentError> {
    match (written, read) {
        (Some(w), Some(read)) => {
            let source_digest = format!("{} rows, {}", read.rows, read.hex());
            match w.finish() {
                Ok(wrote) if wrote == read => Ok(Some(wrote)),
                Ok(wrote) => Err(AgentError::DigestMismatch {
                    table: table.to_string(),
                    source_digest,
                    destination: format!("{} rows, {}", wrote.rows, wrote.hex()),
                }),
                Err(m) => Err(AgentError::DigestMismatch {
                    table: table.to_string(),
                    source_digest,
                    destination: format!("unreadable: {m}"),
                }),
            }
        }
        (Some(_), None) => {
            tracing::warn!("the source side sent no row digest (an older agent?): this task is checked by row count only");
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// Records the task in `pgzm.copy_progress` in the copy's own transaction and commits, in one
/// round trip, after checking the migration's status again now that the copy holds its lock on
/// the table (a swap cannot commit meanwhile, and one that did is seen). Another attempt of
/// this task that committed first (an agent that stalled, then recovered) holds the key: this
/// attempt then rolls back and returns that one's outcome (`Some`).
async fn record_and_commit(
    spec: &CopySpec,
    dst: &Client,
    table: &str,
    rows_written: u64,
    bytes: u64,
    digest: Option<crate::digest::Digest>,
) -> Result<Option<CopyDone>, AgentError> {
    let record = format!(
        "{}; INSERT INTO pgzm.copy_progress (migration_id, task_key, rows, bytes, digest) VALUES ({}, {}, {}, {}, {}); COMMIT",
        crate::guard::commit_check(spec.task.migration_id.0),
        spec.task.migration_id.0,
        quote_literal(spec.task.task_key.as_str()),
        rows_written,
        bytes,
        digest.map(|d| quote_literal(&d.hex())).unwrap_or_else(|| "NULL".into())
    );
    let Err(e) = dst.batch_execute(&record).await else {
        return Ok(None);
    };
    let _ = dst.batch_execute("ROLLBACK").await;
    if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return Err(AgentError::Refused(format!(
            "copy into {table}: {}",
            pg::describe(&e)
        )));
    }
    if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
        if let Ok(found) = dst.simple_query(&progress_sql(spec)).await {
            let answers = crate::guard::statements(&found);
            if let Some(earlier) = answers.first().and_then(|rows| progress_of(rows)) {
                return Ok(Some(earlier));
            }
        }
    }
    Err(AgentError::copy(
        table,
        "record the task in pgzm.copy_progress",
        Side::Destination,
        &e,
    ))
}

/// The outcome recorded in a `pgzm.copy_progress` row (rows, bytes, digest) of a simple-query
/// answer: a task an earlier attempt committed.
fn progress_of(answer: &[&tokio_postgres::SimpleQueryRow]) -> Option<CopyDone> {
    answer.first().and_then(|r| {
        let rows: u64 = r.get(0)?.parse().ok()?;
        Some(CopyDone {
            rows_written: rows,
            rows_in_source: rows,
            bytes: r.get(1)?.parse().ok()?,
            duration_ms: 0,
            already_done: true,
            digest: r.get(2).and_then(|h| {
                Some(crate::digest::Digest {
                    rows,
                    sum: h.parse().ok()?,
                })
            }),
        })
    })
}

pub(crate) fn connect_error(side: Side, err: &tokio_postgres::Error) -> AgentError {
    AgentError::Connect {
        side,
        message: pg::describe(err),
        kind: pg::ErrorKind::of(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let mut h = BINARY_SIGNATURE.to_vec();
        h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        h
    }

    #[test]
    fn counts_rows_between_header_and_trailer() {
        let mut c = RowCounter::default();
        let mut first = header();
        first.extend_from_slice(&[0, 1, 0, 0, 0, 1, b'x']);
        c.message(&first);
        c.message(&[0, 1, 0xff, 0xff, 0xff, 0xff]);
        c.message(&[0xff, 0xff]);
        assert_eq!(c.rows(), 2);
    }

    #[test]
    fn an_empty_table_is_header_and_trailer_in_one_message() {
        let mut c = RowCounter::default();
        let mut only = header();
        only.extend_from_slice(&[0xff, 0xff]);
        c.message(&only);
        assert_eq!(c.rows(), 0);
        let mut c = RowCounter::default();
        c.message(&header());
        c.message(&[0xff, 0xff]);
        assert_eq!(c.rows(), 0);
    }
}
