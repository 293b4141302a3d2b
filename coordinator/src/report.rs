//! What a run reports, and its options: shared by `prepare`, the swap, `status`, the output
//! and the log file (so none of them depends on the `start` orchestrator).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{info, info_span, Instrument};

use crate::build::BuildSettings;
use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::locked::SwapSettings;
use crate::plan::Plan;
use crate::swap::SwapOutcome;

/// Options of a `start` or `prepare` run.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Source database.
    pub source: DbUrl,
    /// Destination database.
    pub destination: DbUrl,
    /// Copy and build tasks at once.
    pub jobs: usize,
    /// Plan only.
    pub dry_run: bool,
    /// Swap lock behaviour.
    pub swap: SwapSettings,
    /// Retries of a failed copy task.
    pub copy_retries: u32,
    /// Index build settings.
    pub build: BuildSettings,
    /// Print the plan on stdout as soon as it is made (before the copy), for a person reading
    /// the run; the final report then does not repeat it.
    pub show_plan: bool,
    /// Schemas migrated (each into the destination schema of the same name).
    pub schemas: Vec<String>,
    /// Tables whose destination rows survive the migration (kept in sync until the swap), as
    /// given: `name` (looked up in the migrated schemas) or `schema.name`.
    pub preserved: Vec<String>,
    /// Which tables are migrated, and which without their rows.
    pub tables: crate::filter::TableFilter,
    /// Replace a prepared migration that is waiting for its swap.
    pub force: bool,
    /// Continue the interrupted run instead of starting over (`--resume`).
    pub resume: bool,
    /// Split tables larger than this (heap + TOAST bytes) into page ranges copied in parallel.
    pub range_bytes: i64,
    /// Digest every row on both sides of the copy and compare (on by default).
    pub verify: bool,
    /// Backup sets kept after the swap, the new one included (at least 1).
    pub keep_backups: u32,
    /// A copy task whose agent sends no word for this long is given to another agent (after
    /// its sessions are ended).
    pub stall_timeout: std::time::Duration,
    /// The copy's byte-rate budget, bytes per second over all tasks and agents (`None`:
    /// unlimited); `pgzm throttle` changes it while the run copies.
    pub max_rate: Option<u64>,
    /// Pause the copy while a standby of the destination lags more than this (`None`: never);
    /// `pgzm throttle` changes it while the run copies.
    pub max_replication_lag: Option<std::time::Duration>,
}

impl StartOptions {
    /// The options `pgzm start` uses when only the two databases are given: as many jobs as
    /// CPUs, the default lock behaviour, 2 retries, 256 MB ranges, verification on.
    pub fn new(source: DbUrl, destination: DbUrl) -> StartOptions {
        StartOptions {
            source,
            destination,
            jobs: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            dry_run: false,
            swap: SwapSettings::default(),
            copy_retries: 2,
            build: BuildSettings::default(),
            show_plan: false,
            schemas: vec![crate::naming::public_schema()],
            preserved: Vec::new(),
            tables: crate::filter::TableFilter::default(),
            force: false,
            resume: false,
            range_bytes: DEFAULT_RANGE_BYTES,
            stall_timeout: crate::copy::STALL,
            verify: true,
            keep_backups: 1,
            max_rate: None,
            max_replication_lag: None,
        }
    }
}

/// Default size of a copy task's page range: 256 MB.
pub const DEFAULT_RANGE_BYTES: i64 = 256 << 20;

/// Duration of one phase.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct PhaseTiming {
    /// Phase name.
    pub phase: &'static str,
    /// Start, RFC 3339 UTC.
    pub started_at: String,
    /// Milliseconds.
    pub duration_ms: u64,
}

/// Per-table result.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TableReport {
    /// Table: its name in `public`, `schema.name` elsewhere.
    pub table: String,
    /// Rows copied.
    pub rows: u64,
    /// Bytes of COPY data.
    pub bytes: u64,
    /// Copy time in ms.
    pub copy_ms: u64,
    /// Attempts.
    pub attempts: u32,
    /// Order-independent digest of the table's rows (32 hex digits), equal on the source and
    /// destination sides of the copy; absent when the copy was not verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl Report {
    /// An empty report for `plan`, without the plan itself: the command moves its plan in
    /// when it ends (`report.plan = plan`), rather than the report holding a second copy of it
    /// for the whole run (10 MB at 10 000 tables).
    pub fn new(plan: &Plan, dry_run: bool) -> Report {
        Report {
            migration_id: plan.migration_id,
            dry_run,
            plan: Plan::default(),
            tables: Vec::new(),
            phases: Vec::new(),
            swap: None,
            rows: 0,
            bytes: 0,
            cleaned_up: Vec::new(),
            dropped_backup: Vec::new(),
            warnings: plan.warnings.clone(),
            throughput: None,
            resumed: None,
        }
    }
}

/// Throughput of a run's copy phase.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Throughput {
    /// Wall time of the copy phase (copies and per-table index builds), ms.
    pub copy_ms: u64,
    /// Rows copied per second of that time.
    #[serde(serialize_with = "crate::document::rounded")]
    pub rows_per_s: f64,
    /// COPY bytes moved per second of that time.
    #[serde(serialize_with = "crate::document::rounded")]
    pub bytes_per_s: f64,
    /// From the start of the copy phase until the last copy task landed, ms: the data movement
    /// alone (index builds of tables that landed earlier overlap it; the last table's follow).
    #[serde(default)]
    pub data_ms: u64,
    /// COPY bytes moved per second of `data_ms`.
    #[serde(default, serialize_with = "crate::document::rounded")]
    pub data_bytes_per_s: f64,
}

impl Throughput {
    /// `rows` and `bytes` moved in the copy phase among `phases` (none without one), the data
    /// movement having taken `data_ms` of it.
    pub fn of(rows: u64, bytes: u64, phases: &[PhaseTiming], data_ms: u64) -> Option<Throughput> {
        let copy_ms = phases.iter().find(|p| p.phase == "copy")?.duration_ms;
        let secs = (copy_ms.max(1)) as f64 / 1000.0;
        Some(Throughput {
            copy_ms,
            rows_per_s: rows as f64 / secs,
            bytes_per_s: bytes as f64 / secs,
            data_ms,
            data_bytes_per_s: bytes as f64 / (data_ms.max(1) as f64 / 1000.0),
        })
    }
}

/// What a resumed run kept and redid.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Resumed {
    /// Tables the interrupted run had finished (copied and built, unchanged in the source
    /// since; for a preserved table, kept current by its sync triggers): kept as they are.
    pub kept: Vec<String>,
    /// Tables copied again, each with the reason.
    pub redone: Vec<RedoneTable>,
    /// Tables whose rows were kept (or that have none to copy) but whose keys, indexes and
    /// triggers were built again, each with the reason: a build that had not finished, or a
    /// partitioned table built again over a partition copied again.
    #[serde(default)]
    pub rebuilt: Vec<RedoneTable>,
}

impl Resumed {
    /// Whether the resumed run keeps `table` as the interrupted run left it.
    pub fn keeps(&self, table: &crate::naming::QualName) -> bool {
        let name = table.display_name();
        self.kept.contains(&name)
    }

    /// Whether the resumed run copies `table`'s rows again.
    pub fn copies(&self, table: &crate::naming::QualName) -> bool {
        let name = table.display_name();
        self.redone.iter().any(|t| t.table == name)
    }
}

/// A table a resumed run copied (or built) again.
#[derive(Debug, Clone, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct RedoneTable {
    /// The table.
    pub table: String,
    /// Why: its copy or build had not finished, it changed in the source, or its partitioned
    /// table is built again.
    pub reason: String,
}

/// What a run did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Report {
    /// Migration id (backup set timestamp).
    pub migration_id: i64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The plan.
    pub plan: Plan,
    /// Per-table copy results.
    pub tables: Vec<TableReport>,
    /// Phase timings.
    pub phases: Vec<PhaseTiming>,
    /// Swap measurements.
    pub swap: Option<SwapOutcome>,
    /// Total rows copied.
    pub rows: u64,
    /// Total bytes copied.
    pub bytes: u64,
    /// Interrupted runs cleaned up first (what was dropped).
    pub cleaned_up: Vec<String>,
    /// Previous backup set objects dropped.
    pub dropped_backup: Vec<String>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Copy throughput (none for a dry run).
    pub throughput: Option<Throughput>,
    /// What a `--resume` kept of the interrupted run, and what it copied again and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
}

/// Timings of the phases run so far.
pub struct Phases(pub Vec<PhaseTiming>);

impl Phases {
    /// Runs `f` as the named phase: a span, a timing, a log line.
    pub async fn run<T, F: std::future::Future<Output = Result<T, CoordinatorError>>>(
        &mut self,
        phase: &'static str,
        f: F,
    ) -> Result<T, CoordinatorError> {
        let started_at = now_rfc3339();
        let t = Instant::now();
        let span = info_span!(
            "phase",
            phase,
            otel.status_description = tracing::field::Empty
        );
        let r = f.instrument(span.clone()).await;
        if let Err(e) = &r {
            // The failed phase is marked in the trace, with the (password-free) message.
            span.record("otel.status_description", e.to_string().as_str());
        }
        let duration_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(phase, duration_ms, ok = r.is_ok(), "phase finished");
        self.0.push(PhaseTiming {
            phase,
            started_at,
            duration_ms,
        });
        r
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Current time as RFC 3339 UTC with milliseconds (no date crate needed).
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_millis() as i64)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Bytes as a human-readable size.
pub fn size(bytes: i64) -> String {
    // One unit style everywhere (and the progress display's): binary, IEC names.
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes.max(0) as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
