//! The copy protocol as domain types, apart from their prost messages (after neon's
//! `pageserver/page_api/src/model.rs`): a copy task, the export a destination-side agent asks of
//! a source-side one, the chunks of that export, and a task's result.
//!
//! Each is validated once where it is received (`TryFrom<proto::…>`, failing with a
//! [`ModelError`], which the agent answers with INVALID_ARGUMENT) and built where it is sent
//! (`From<…> for proto::…`). Past the boundary the agent and the coordinator work on these types
//! only: a missing table, an empty task key, a backwards page range or a malformed row digest
//! never gets further than the conversion.
//!
//! The types live in the agent crate, which both binaries link: `pgzm-proto` stays the wire
//! contract only, and the layering stays proto ← pg ← agent ← coordinator.

use std::num::NonZeroU64;

use bytes::Bytes;
use pgzm_proto::agent::v1 as proto;

use crate::digest::{Digest, DigestError, RowHash};
use crate::sql::QualifiedName;

/// A message that breaks the protocol: a required field missing or empty, an impossible value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A required field is absent.
    #[error("{0} missing")]
    Missing(&'static str),
    /// A required field is empty.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A page range that ends where or before it starts (other than 0: to the end).
    #[error("empty page range [{start}, {end})")]
    EmptyRange {
        /// First page.
        start: u64,
        /// Page after the last.
        end: u64,
    },
    /// A share of the byte-rate budget above the whole.
    #[error("rate_share_ppm {0} is more than the whole budget (1000000)")]
    RateShare(u32),
    /// A row digest that is not 32 hex digits.
    #[error("{field}: {source}")]
    Digest {
        /// The field that carried it.
        field: &'static str,
        /// What is wrong with it.
        source: DigestError,
    },
}

/// Identifies a migration (the destination's `pgzm.migrations.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigrationId(pub i64);

impl std::fmt::Display for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A string identifier that the protocol requires to be non-empty.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub String);

        impl $name {
            /// The identifier as sent.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// Unique per task attempt within a migration, e.g. `m1700000000000/t3/r0/a1`.
    TaskId
);
id_type!(
    /// Identifies a task across attempts: recorded in `pgzm.copy_progress` in the copy's own
    /// transaction, so a task that committed is never copied again.
    TaskKey
);
id_type!(
    /// A snapshot the coordinator exported with `pg_export_snapshot()`.
    SnapshotId
);

impl TaskId {
    /// The id of attempt `attempt` of task `key` of migration `migration`.
    pub fn attempt(migration: MigrationId, key: &TaskKey, attempt: u32) -> TaskId {
        TaskId(format!("m{migration}/{key}/a{attempt}"))
    }
}

/// A non-empty string field, as `T`.
fn required<T>(what: &'static str, value: String, wrap: fn(String) -> T) -> Result<T, ModelError> {
    if value.is_empty() {
        Err(ModelError::Empty(what))
    } else {
        Ok(wrap(value))
    }
}

/// Heap pages `[start, end)` of a table, read with a TID range scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// First page.
    pub start: u64,
    /// Page after the last, greater than `start`; `None`: to the end of the table.
    pub end: Option<u64>,
}

impl PageRange {
    /// The TID-range predicate selecting the range.
    pub fn predicate(&self) -> String {
        let mut p = format!("ctid >= '({},0)'::tid", self.start);
        if let Some(end) = self.end {
            p.push_str(&format!(" AND ctid < '({end},0)'::tid"));
        }
        p
    }
}

/// `start..end`, `end` 0 when open (as the wire has it): the span field of a task's range.
impl std::fmt::Display for PageRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end.unwrap_or(0))
    }
}

impl TryFrom<proto::PageRange> for PageRange {
    type Error = ModelError;

    fn try_from(r: proto::PageRange) -> Result<Self, ModelError> {
        match r.end_page {
            0 => Ok(PageRange {
                start: r.start_page,
                end: None,
            }),
            end if end <= r.start_page => Err(ModelError::EmptyRange {
                start: r.start_page,
                end,
            }),
            end => Ok(PageRange {
                start: r.start_page,
                end: Some(end),
            }),
        }
    }
}

impl From<PageRange> for proto::PageRange {
    fn from(r: PageRange) -> Self {
        proto::PageRange {
            start_page: r.start,
            end_page: r.end.unwrap_or(0),
        }
    }
}

/// An optional page range (absent: the whole table).
fn page_range(r: Option<proto::PageRange>) -> Result<Option<PageRange>, ModelError> {
    r.map(PageRange::try_from).transpose()
}

/// A table name: both parts present and non-empty. `what` names it in errors ("source table").
fn table_name(
    what: &'static str,
    name_empty: &'static str,
    t: Option<proto::TableName>,
) -> Result<QualifiedName, ModelError> {
    let t = t.ok_or(ModelError::Missing(what))?;
    if t.schema.is_empty() || t.name.is_empty() {
        return Err(ModelError::Empty(name_empty));
    }
    Ok(QualifiedName {
        schema: t.schema,
        name: t.name,
    })
}

/// The wire form of a table name.
fn table_message(t: QualifiedName) -> proto::TableName {
    proto::TableName {
        schema: t.schema,
        name: t.name,
    }
}

/// Where an endpoint connects.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A connection string (may carry a password: never printed).
    Url(String),
    /// The name of a connection string the agent holds (`pgzm-agent --database NAME=URL`).
    Database(String),
}

/// A PostgreSQL connection target and the `application_name` of its sessions.
///
/// `Debug` leaves connection strings out: they may hold passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where it connects.
    pub target: Target,
    /// `application_name` of the sessions (empty: the agent's default).
    pub application_name: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = match &self.target {
            Target::Url(_) => "url (redacted)".to_string(),
            Target::Database(name) => format!("database {name:?}"),
        };
        f.debug_struct("Endpoint")
            .field("target", &target)
            .field("application_name", &self.application_name)
            .finish()
    }
}

impl Endpoint {
    /// A key identifying where the endpoint connects (for session reuse; kept in memory only).
    pub fn session_key(&self) -> String {
        match &self.target {
            Target::Url(u) => format!("url\u{0}{u}\u{0}{}", self.application_name),
            Target::Database(d) => format!("db\u{0}{d}\u{0}{}", self.application_name),
        }
    }
}

impl TryFrom<proto::Endpoint> for Endpoint {
    type Error = ModelError;

    fn try_from(e: proto::Endpoint) -> Result<Self, ModelError> {
        endpoint("endpoint", "endpoint", Some(e))
    }
}

impl From<Endpoint> for proto::Endpoint {
    fn from(e: Endpoint) -> Self {
        proto::Endpoint {
            target: Some(match e.target {
                Target::Url(u) => proto::endpoint::Target::Url(u),
                Target::Database(d) => proto::endpoint::Target::Database(d),
            }),
            application_name: e.application_name,
        }
    }
}

/// An endpoint field: present, with a target. `missing`/`empty` name it in errors.
pub fn endpoint(
    missing: &'static str,
    empty: &'static str,
    e: Option<proto::Endpoint>,
) -> Result<Endpoint, ModelError> {
    let e = e.ok_or(ModelError::Missing(missing))?;
    let target = match e.target.ok_or(ModelError::Empty(empty))? {
        proto::endpoint::Target::Url(u) => Target::Url(u),
        proto::endpoint::Target::Database(d) => Target::Database(d),
    };
    Ok(Endpoint {
        target,
        application_name: e.application_name,
    })
}

/// What a copy reads on the source: columns of a table, or of a page range of it, under the
/// migration's snapshot. A copy task and the export its source-side peer streams read the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRead {
    /// The snapshot every task of the migration reads under.
    pub snapshot: SnapshotId,
    /// The table.
    pub table: QualifiedName,
    /// Columns, in order.
    pub columns: Vec<String>,
    /// The part of the table (`None`: all of it).
    pub range: Option<PageRange>,
}

/// One copy task: a table, or a page range of it, from the source snapshot into its shadow
/// table (the domain form of [`proto::CopyTask`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTask {
    /// Unique id of this attempt.
    pub task_id: TaskId,
    /// Identity across attempts.
    pub task_key: TaskKey,
    /// The migration the task belongs to.
    pub migration_id: MigrationId,
    /// The source database.
    pub source: Endpoint,
    /// The destination database.
    pub destination: Endpoint,
    /// What is read on the source (columns may be none: rows of zero fields).
    pub read: SourceRead,
    /// Shadow table written on the destination.
    pub destination_table: QualifiedName,
    /// Progress reports about every this many bytes (`None`: the agent's default).
    pub progress_every_bytes: Option<NonZeroU64>,
    /// Read the data from this source-side agent's `ExportRange` instead of the source.
    pub peer_url: Option<String>,
    /// Truncate the shadow table first and load it with `COPY FREEZE` (whole tables only; the
    /// agent ignores it for a range).
    pub freeze: bool,
    /// Digest the rows on both sides and fail the task when the digests differ.
    pub verify: bool,
    /// Its share (parts per million) of the run's byte-rate budget (0: not throttled).
    pub rate_share_ppm: u32,
}

impl CopyTask {
    /// The export a destination-side agent asks of its source-side peer for this task.
    pub fn export(&self) -> ExportTask {
        ExportTask {
            task_id: self.task_id.0.clone(),
            source: self.source.clone(),
            read: self.read.clone(),
            verify: self.verify,
        }
    }
}

impl TryFrom<proto::CopyTask> for CopyTask {
    type Error = ModelError;

    fn try_from(t: proto::CopyTask) -> Result<Self, ModelError> {
        // Checked in a fixed order (the first problem is the one reported).
        let task_id = required("task_id", t.task_id, TaskId)?;
        let task_key = required("task_key", t.task_key, TaskKey)?;
        let snapshot = required("snapshot_id", t.snapshot_id, SnapshotId)?;
        let destination = endpoint(
            "destination endpoint",
            "destination endpoint",
            t.destination,
        )?;
        let source = endpoint("source endpoint", "source endpoint", t.source)?;
        let source_table = table_name("source table", "source table name", t.source_table)?;
        let destination_table = table_name(
            "destination table",
            "destination table name",
            t.destination_table,
        )?;
        Ok(CopyTask {
            task_id,
            task_key,
            migration_id: MigrationId(t.migration_id),
            read: SourceRead {
                snapshot,
                table: source_table,
                columns: t.columns,
                range: page_range(t.range)?,
            },
            destination,
            source,
            destination_table,
            progress_every_bytes: NonZeroU64::new(t.progress_every_bytes),
            peer_url: Some(t.peer_url).filter(|u| !u.is_empty()),
            freeze: t.freeze,
            verify: t.verify,
            rate_share_ppm: if t.rate_share_ppm <= 1_000_000 {
                t.rate_share_ppm
            } else {
                return Err(ModelError::RateShare(t.rate_share_ppm));
            },
        })
    }
}

impl From<CopyTask> for proto::CopyTask {
    fn from(t: CopyTask) -> Self {
        proto::CopyTask {
            task_id: t.task_id.0,
            source: Some(t.source.into()),
            destination: Some(t.destination.into()),
            snapshot_id: t.read.snapshot.0,
            source_table: Some(table_message(t.read.table)),
            destination_table: Some(table_message(t.destination_table)),
            columns: t.read.columns,
            progress_every_bytes: t.progress_every_bytes.map_or(0, NonZeroU64::get),
            range: t.read.range.map(Into::into),
            task_key: t.task_key.0,
            migration_id: t.migration_id.0,
            peer_url: t.peer_url.unwrap_or_default(),
            freeze: t.freeze,
            verify: t.verify,
            rate_share_ppm: t.rate_share_ppm,
        }
    }
}

/// The source side of a split task: what a source-side agent streams (the domain form of
/// [`proto::ExportRequest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTask {
    /// The copy task's attempt id (for logs and traces).
    pub task_id: String,
    /// The source database.
    pub source: Endpoint,
    /// What is read (at least one column).
    pub read: SourceRead,
    /// Digest the rows (sent before the row count).
    pub verify: bool,
}

impl TryFrom<proto::ExportRequest> for ExportTask {
    type Error = ModelError;

    fn try_from(r: proto::ExportRequest) -> Result<Self, ModelError> {
        if r.columns.is_empty() {
            return Err(ModelError::Empty("columns"));
        }
        // Checked in a fixed order (the first problem is the one reported).
        let snapshot = required("snapshot_id", r.snapshot_id, SnapshotId)?;
        let source = endpoint("source endpoint", "source endpoint", r.source)?;
        Ok(ExportTask {
            read: SourceRead {
                snapshot,
                table: table_name("table", "table name", r.table)?,
                columns: r.columns,
                range: page_range(r.range)?,
            },
            source,
            task_id: r.task_id,
            verify: r.verify,
        })
    }
}

impl From<ExportTask> for proto::ExportRequest {
    fn from(t: ExportTask) -> Self {
        proto::ExportRequest {
            task_id: t.task_id,
            source: Some(t.source.into()),
            snapshot_id: t.read.snapshot.0,
            table: Some(table_message(t.read.table)),
            columns: t.read.columns,
            range: t.read.range.map(Into::into),
            verify: t.verify,
        }
    }
}

/// One message of an export stream (the domain form of [`proto::CopyChunk`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportChunk {
    /// COPY binary data (an empty message counts as no data).
    Data(Bytes),
    /// Just before the last message: the rows' hash (verified exports).
    SourceDigest(RowHash),
    /// Last message: the rows in the table (range) under the snapshot.
    RowsInSource(u64),
}

impl TryFrom<proto::CopyChunk> for ExportChunk {
    type Error = ModelError;

    fn try_from(c: proto::CopyChunk) -> Result<Self, ModelError> {
        Ok(match c.chunk {
            Some(proto::copy_chunk::Chunk::Data(d)) => ExportChunk::Data(d),
            Some(proto::copy_chunk::Chunk::SourceDigest(hex)) => {
                ExportChunk::SourceDigest(hex.parse().map_err(|source| ModelError::Digest {
                    field: "source_digest",
                    source,
                })?)
            }
            Some(proto::copy_chunk::Chunk::RowsInSource(n)) => ExportChunk::RowsInSource(n),
            None => ExportChunk::Data(Bytes::new()),
        })
    }
}

impl From<ExportChunk> for proto::CopyChunk {
    fn from(c: ExportChunk) -> Self {
        proto::CopyChunk {
            chunk: Some(match c {
                ExportChunk::Data(d) => proto::copy_chunk::Chunk::Data(d),
                ExportChunk::SourceDigest(h) => {
                    proto::copy_chunk::Chunk::SourceDigest(h.to_string())
                }
                ExportChunk::RowsInSource(n) => proto::copy_chunk::Chunk::RowsInSource(n),
            }),
        }
    }
}

/// What a finished copy task reports (the domain form of [`proto::CopyDone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyDone {
    /// Rows the destination's COPY wrote.
    pub rows_written: u64,
    /// Rows the source sent under the snapshot.
    pub rows_in_source: u64,
    /// COPY payload bytes.
    pub bytes: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// Committed by an earlier attempt; nothing copied now.
    pub already_done: bool,
    /// The rows' digest, when verified (its row count is `rows_written`).
    pub digest: Option<Digest>,
}

impl TryFrom<proto::CopyDone> for CopyDone {
    type Error = ModelError;

    fn try_from(d: proto::CopyDone) -> Result<Self, ModelError> {
        let digest = match d.digest.as_str() {
            "" => None,
            hex => Some(Digest {
                rows: d.rows_written,
                sum: hex.parse().map_err(|source| ModelError::Digest {
                    field: "digest",
                    source,
                })?,
            }),
        };
        Ok(CopyDone {
            rows_written: d.rows_written,
            rows_in_source: d.rows_in_source,
            bytes: d.bytes,
            duration_ms: d.duration_ms,
            already_done: d.already_done,
            digest,
        })
    }
}

impl From<CopyDone> for proto::CopyDone {
    fn from(d: CopyDone) -> Self {
        proto::CopyDone {
            rows_written: d.rows_written,
            rows_in_source: d.rows_in_source,
            bytes: d.bytes,
            duration_ms: d.duration_ms,
            already_done: d.already_done,
            digest: d.digest.map(|d| d.sum.to_string()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(schema: &str, name: &str) -> QualifiedName {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    fn task() -> CopyTask {
        CopyTask {
            task_id: TaskId("m7/t3/p100/a2".into()),
            task_key: TaskKey("t3/p100".into()),
            migration_id: MigrationId(7),
            source: Endpoint {
                target: Target::Url("postgres://u:secret@h/db".into()),
                application_name: "pgzm-agent m7 a0".into(),
            },
            destination: Endpoint {
                target: Target::Database("dest".into()),
                application_name: "pgzm-agent m7 a0".into(),
            },
            read: SourceRead {
                snapshot: SnapshotId("00000003-0000001B-1".into()),
                table: name("public", "Area"),
                columns: vec!["id".into(), "name".into()],
                range: Some(PageRange {
                    start: 100,
                    end: Some(200),
                }),
            },
            destination_table: name("public", "shadow_Area"),
            progress_every_bytes: NonZeroU64::new(1 << 20),
            peer_url: Some("https://source-agent:7000".into()),
            freeze: false,
            verify: true,
            rate_share_ppm: 250_000,
        }
    }

    fn message() -> proto::CopyTask {
        task().into()
    }

    fn invalid(change: impl FnOnce(&mut proto::CopyTask)) -> ModelError {
        let mut m = message();
        change(&mut m);
        CopyTask::try_from(m).expect_err("the task is invalid")
    }

    #[test]
    fn a_copy_task_round_trips() {
        let t = task();
        assert_eq!(CopyTask::try_from(proto::CopyTask::from(t.clone())), Ok(t));
        let whole = CopyTask {
            read: SourceRead {
                range: None,
                columns: vec![],
                ..task().read
            },
            progress_every_bytes: None,
            peer_url: None,
            freeze: true,
            verify: false,
            ..task()
        };
        let m = proto::CopyTask::from(whole.clone());
        assert_eq!(
            (m.range, m.progress_every_bytes, m.peer_url.as_str()),
            (None, 0, "")
        );
        assert_eq!(CopyTask::try_from(m), Ok(whole));
    }

    #[test]
    fn copy_task_validation_failures() {
        assert_eq!(invalid(|m| m.task_id.clear()), ModelError::Empty("task_id"));
        assert_eq!(
            invalid(|m| m.task_key.clear()),
            ModelError::Empty("task_key")
        );
        assert_eq!(
            invalid(|m| m.snapshot_id.clear()),
            ModelError::Empty("snapshot_id")
        );
        assert_eq!(
            invalid(|m| m.source = None),
            ModelError::Missing("source endpoint")
        );
        assert_eq!(
            invalid(|m| m.destination.as_mut().unwrap().target = None),
            ModelError::Empty("destination endpoint")
        );
        assert_eq!(
            invalid(|m| m.source_table = None),
            ModelError::Missing("source table")
        );
        assert_eq!(
            invalid(|m| m.destination_table = None),
            ModelError::Missing("destination table")
        );
        assert_eq!(
            invalid(|m| m.source_table.as_mut().unwrap().schema.clear()),
            ModelError::Empty("source table name")
        );
        assert_eq!(
            invalid(|m| m.destination_table.as_mut().unwrap().name.clear()),
            ModelError::Empty("destination table name")
        );
        assert_eq!(
            invalid(|m| m.range = Some(proto::PageRange {
                start_page: 10,
                end_page: 5
            })),
            ModelError::EmptyRange { start: 10, end: 5 }
        );
        assert_eq!(
            invalid(|m| m.range = Some(proto::PageRange {
                start_page: 10,
                end_page: 10
            })),
            ModelError::EmptyRange { start: 10, end: 10 }
        );
        assert_eq!(
            invalid(|m| m.task_key.clear()).to_string(),
            "task_key is empty"
        );
    }

    #[test]
    fn page_ranges() {
        let open = proto::PageRange {
            start_page: 10,
            end_page: 0,
        };
        let r = PageRange::try_from(open).unwrap();
        assert_eq!(
            r,
            PageRange {
                start: 10,
                end: None
            }
        );
        assert_eq!(proto::PageRange::from(r), open);
        assert_eq!(r.to_string(), "10..0");
        let bounded = PageRange {
            start: 0,
            end: Some(1),
        };
        assert_eq!(
            PageRange::try_from(proto::PageRange::from(bounded)),
            Ok(bounded)
        );
        assert_eq!(
            PageRange {
                start: 0,
                end: Some(10)
            }
            .predicate(),
            "ctid >= '(0,0)'::tid AND ctid < '(10,0)'::tid"
        );
        assert_eq!(r.predicate(), "ctid >= '(10,0)'::tid");
        assert_eq!(
            ModelError::EmptyRange { start: 3, end: 2 }.to_string(),
            "empty page range [3, 2)"
        );
    }

    #[test]
    fn an_export_round_trips_and_is_validated() {
        let e = task().export();
        assert_eq!(e.read.table, name("public", "Area"));
        assert_eq!(
            ExportTask::try_from(proto::ExportRequest::from(e.clone())),
            Ok(e.clone())
        );
        let broken = |change: fn(&mut proto::ExportRequest)| {
            let mut m = proto::ExportRequest::from(task().export());
            change(&mut m);
            ExportTask::try_from(m).expect_err("the export is invalid")
        };
        assert_eq!(broken(|m| m.columns.clear()), ModelError::Empty("columns"));
        assert_eq!(
            broken(|m| m.snapshot_id.clear()),
            ModelError::Empty("snapshot_id")
        );
        assert_eq!(broken(|m| m.table = None), ModelError::Missing("table"));
        assert_eq!(
            broken(|m| m.source = None),
            ModelError::Missing("source endpoint")
        );
        assert_eq!(
            broken(|m| m.range = Some(proto::PageRange {
                start_page: 2,
                end_page: 1
            })),
            ModelError::EmptyRange { start: 2, end: 1 }
        );
    }

    #[test]
    fn endpoints_round_trip_and_hide_urls() {
        let t = task();
        for e in [t.source, t.destination] {
            assert_eq!(Endpoint::try_from(proto::Endpoint::from(e.clone())), Ok(e));
        }
        let debug = format!("{:?}", task());
        assert!(!debug.contains("secret"), "{debug}");
        assert_eq!(
            Endpoint::try_from(proto::Endpoint::default()),
            Err(ModelError::Empty("endpoint"))
        );
    }

    fn digest() -> Digest {
        Digest {
            rows: 42,
            sum: RowHash(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
        }
    }

    #[test]
    fn copy_done_round_trips_with_and_without_digest() {
        let done = CopyDone {
            rows_written: 42,
            rows_in_source: 42,
            bytes: 4096,
            duration_ms: 12,
            already_done: false,
            digest: Some(digest()),
        };
        let m = proto::CopyDone::from(done);
        assert_eq!(m.digest, "0123456789abcdef0011223344556677");
        assert_eq!(CopyDone::try_from(m), Ok(done));
        let unverified = CopyDone {
            digest: None,
            already_done: true,
            ..done
        };
        let m = proto::CopyDone::from(unverified);
        assert_eq!(m.digest, "");
        assert_eq!(CopyDone::try_from(m), Ok(unverified));
    }

    #[test]
    fn a_malformed_digest_is_a_protocol_error() {
        for bad in [
            "abc",
            "0123456789abcdef0011223344556677ff",
            "+123456789abcdef0011223344556677",
            "0123456789abcdef001122334455667g",
        ] {
            let m = proto::CopyDone {
                rows_written: 1,
                rows_in_source: 1,
                digest: bad.into(),
                ..proto::CopyDone::default()
            };
            let err = CopyDone::try_from(m).expect_err(bad);
            assert!(
                matches!(
                    err,
                    ModelError::Digest {
                        field: "digest",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            let chunk = proto::CopyChunk {
                chunk: Some(proto::copy_chunk::Chunk::SourceDigest(bad.into())),
            };
            assert!(matches!(
                ExportChunk::try_from(chunk),
                Err(ModelError::Digest {
                    field: "source_digest",
                    ..
                })
            ));
        }
    }

    #[test]
    fn export_chunks_round_trip() {
        for c in [
            ExportChunk::Data(Bytes::from_static(b"PGCOPY")),
            ExportChunk::SourceDigest(digest().sum),
            ExportChunk::RowsInSource(42),
        ] {
            assert_eq!(
                ExportChunk::try_from(proto::CopyChunk::from(c.clone())),
                Ok(c)
            );
        }
        assert_eq!(
            ExportChunk::try_from(proto::CopyChunk { chunk: None }),
            Ok(ExportChunk::Data(Bytes::new()))
        );
    }

    #[test]
    fn task_ids_name_the_attempt() {
        assert_eq!(
            TaskId::attempt(MigrationId(5), &TaskKey("t1/p0".into()), 3).as_str(),
            "m5/t1/p0/a3"
        );
    }
}
