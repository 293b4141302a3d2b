//! `pgzm status`: where the newest migration of a destination stands, and whether it is safe to
//! swap. Also the shadow-set checks the swap runs before it starts.

use serde::Serialize;
use tokio_postgres::Client;

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::naming::QualName;
use crate::plan::Plan;
use crate::preserve::TRIGGERS;
use crate::records::RunStatus;
use crate::state::{self, RecordedObjects};

/// A shadow table and its rows.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ShadowTable {
    /// Schema of the table and its shadow.
    pub schema: String,
    /// Live name (in `schema`).
    pub table: String,
    /// Shadow name.
    pub shadow: String,
    /// Whether it exists (with the recorded oid).
    pub present: bool,
    /// Rows now in the shadow table.
    pub rows: Option<i64>,
    /// Rows expected: copied from the source snapshot, or (preserved) now in the live table.
    pub expected_rows: Option<i64>,
    /// Whether the table is preserved.
    pub preserved: bool,
}

/// A sync trigger on a preserved live table.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SyncTrigger {
    /// Live table.
    pub table: String,
    /// Trigger name.
    pub trigger: String,
    /// Present.
    pub present: bool,
    /// Enabled.
    pub enabled: bool,
}

/// A failed mirror of a write to a preserved table.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SyncError {
    /// Live table.
    pub table: String,
    /// INSERT, UPDATE, DELETE or TRUNCATE.
    pub operation: String,
    /// Error message.
    pub message: String,
    /// When.
    pub at: String,
}

/// The status document.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Status {
    /// none, preparing, prepared, swapping, swapped, failed, rolled_back.
    pub state: String,
    /// Migration id (ms since the epoch).
    pub migration_id: Option<i64>,
    /// Seconds since the migration was created.
    #[serde(serialize_with = "crate::document::rounded_opt")]
    pub age_seconds: Option<f64>,
    /// Source of the migration (`user@host:port/db`).
    pub source: Option<String>,
    /// Created / prepared / swapped timestamps.
    pub created_at: Option<String>,
    /// When prepared.
    pub prepared_at: Option<String>,
    /// When swapped.
    pub swapped_at: Option<String>,
    /// Migrated tables.
    pub tables: Vec<String>,
    /// Preserved tables.
    pub preserved_tables: Vec<String>,
    /// Shadow tables (while prepared).
    pub shadow_tables: Vec<ShadowTable>,
    /// Sync triggers (while prepared).
    pub sync_triggers: Vec<SyncTrigger>,
    /// Failed mirrors.
    pub sync_errors: Vec<SyncError>,
    /// Whether its backup set exists.
    pub backup_present: bool,
    /// Whether `pgzm swap` would go ahead.
    pub safe_to_swap: bool,
    /// Why not.
    pub problems: Vec<String>,
    /// Recorded error of a failed migration.
    pub error: Option<String>,
    /// While it copies: its limits (`--max-rate`, `--max-replication-lag`, as `pgzm throttle`
    /// last set them) and why it is paused, if it is.
    pub copy_limits: Option<state::CopyLimits>,
}

/// Oids of the named relations that exist, in one query.
async fn oids_of(
    client: &Client,
    names: Vec<QualName>,
) -> Result<std::collections::HashMap<QualName, u32>, CoordinatorError> {
    let schemas: Vec<&str> = names.iter().map(|n| n.schema.as_str()).collect();
    let relations: Vec<&str> = names.iter().map(|n| n.name.as_str()).collect();
    let rows = client
        .query(
            "SELECT n.nspname::text AS schema_name, c.relname::text AS name, c.oid
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = c.relname",
            &[&schemas, &relations],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect shadow tables", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let name = QualName::from_row(r);
            (name, r.get("oid"))
        })
        .collect())
}

/// Whether the shadow table of `t` exists as the run recorded it (by name and oid).
fn recorded_shadow(
    t: &crate::plan::TablePlan,
    objects: &RecordedObjects,
    existing: &std::collections::HashMap<QualName, u32>,
) -> bool {
    existing.get(&t.shadow_name()).is_some_and(|oid| {
        objects
            .tables
            .iter()
            .any(|(n, o)| n == &t.shadow && o == oid)
    })
}

async fn triggers_of(client: &Client, plan: &Plan) -> Result<Vec<SyncTrigger>, CoordinatorError> {
    let mut out = Vec::new();
    for p in &plan.preserved {
        for (name, _) in TRIGGERS {
            let row = client
                .query_opt(
                    "SELECT t.tgenabled <> 'D' AS enabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                     WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $3)
                       AND c.relname = $1 AND t.tgname = $2",
                    &[&p.table, &name, &p.schema],
                )
                .await
                .map_err(|e| CoordinatorError::destination("inspect sync triggers", e))?;
            out.push(SyncTrigger {
                table: p.qualname().display_name(),
                trigger: name.to_string(),
                present: row.is_some(),
                enabled: row.map(|r| r.get("enabled")).unwrap_or(false),
            });
        }
    }
    Ok(out)
}

/// Reasons the prepared shadow set cannot be swapped: a shadow table missing or replaced, a
/// sync trigger missing or disabled, a failed mirror.
pub async fn shadow_problems(
    client: &Client,
    plan: &Plan,
    objects: &RecordedObjects,
) -> Result<Vec<String>, CoordinatorError> {
    let mut problems = Vec::new();
    let present = oids_of(
        client,
        plan.tables.iter().map(|t| t.shadow_name()).collect(),
    )
    .await?;
    for t in &plan.tables {
        if !recorded_shadow(t, objects, &present) {
            problems.push(format!(
                "shadow table {} is missing or was replaced",
                t.shadow_name().plain()
            ));
        }
    }
    for tg in triggers_of(client, plan).await? {
        if !tg.present || !tg.enabled {
            problems.push(format!(
                "sync trigger \"{}\" on \"{}\" is {}",
                tg.trigger,
                tg.table,
                if tg.present { "disabled" } else { "missing" }
            ));
        }
    }
    if !plan.preserved.is_empty() {
        let errors = state::sync_errors(client, plan.migration_id).await?;
        if let Some((table, op, message, at)) = errors.first() {
            problems.push(format!(
                "{} write(s) to preserved tables could not be mirrored (first: {op} on \"{table}\" at {at}: {message})",
                errors.len()
            ));
        }
    }
    if !problems.is_empty() {
        problems.push(format!(
            "the prepared migration {} is damaged; nothing was changed: run `pgzm prepare --force` again",
            plan.migration_id
        ));
    }
    Ok(problems)
}

async fn count(client: &Client, table: &QualName) -> Result<i64, CoordinatorError> {
    let sql = format!("SELECT count(*) AS row_count FROM ONLY {table}");
    let row = client.query_one(&sql, &[]).await.map_err(|e| {
        CoordinatorError::destination(format!("count rows of {}", table.plain()), e)
    })?;
    Ok(row.get("row_count"))
}

/// Row counts of a shadow table and its live table, read in one statement (one snapshot).
async fn count_pair(
    client: &Client,
    shadow: &QualName,
    live: &QualName,
) -> Result<(i64, i64), CoordinatorError> {
    let sql = format!(
        "SELECT (SELECT count(*) FROM ONLY {shadow}) AS shadow_rows, (SELECT count(*) FROM ONLY {live}) AS live_rows"
    );
    let row = client.query_one(&sql, &[]).await.map_err(|e| {
        CoordinatorError::destination(
            format!("count rows of {} and {}", shadow.plain(), live.plain()),
            e,
        )
    })?;
    Ok((row.get("shadow_rows"), row.get("live_rows")))
}

/// Whether a pgzm run holds the destination's run lock.
async fn run_lock_held(client: &Client) -> Result<bool, CoordinatorError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted
                             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND ((classid::int8 << 32) | objid::int8) = $1) AS held",
            &[&state::LOCK_KEY],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect pg_locks", e))?
        .get("held"))
}

/// Each shadow table of the run: present (by recorded oid), its rows and the rows it should
/// have (what the copy recorded; a preserved table's live rows). A count that differs is a
/// problem.
async fn shadow_tables(
    client: &Client,
    row: &state::MigrationRow,
    copied: &[crate::report::TableReport],
    problems: &mut Vec<String>,
) -> Result<Vec<ShadowTable>, CoordinatorError> {
    let existing = oids_of(
        client,
        row.plan.tables.iter().map(|t| t.shadow_name()).collect(),
    )
    .await?;
    let mut out = Vec::new();
    for t in &row.plan.tables {
        let present = recorded_shadow(t, &row.objects, &existing);
        let preserved = row.plan.is_preserved(&t.qualname());
        let (rows, expected_rows) = match (present, preserved) {
            // One statement, hence one snapshot: a write committing in between (mirrored into
            // the shadow in the same transaction) cannot make the two counts differ.
            (true, true) => {
                let (shadow, live) = count_pair(client, &t.shadow_name(), &t.qualname()).await?;
                (Some(shadow), Some(live))
            }
            (true, false) => (Some(count(client, &t.shadow_name()).await?), None),
            (false, true) => (None, Some(count(client, &t.qualname()).await?)),
            (false, false) => (None, None),
        };
        let expected_rows = if preserved {
            expected_rows
        } else if !t.copy_data {
            Some(0)
        } else {
            copied
                .iter()
                .find(|c| c.table == t.qualname().display_name())
                .map(|c| c.rows as i64)
        };
        // A partitioned table has no rows of its own: its partitions' are checked each.
        if present && !t.partitioned && rows != expected_rows {
            problems.push(format!(
                "shadow table {} has {} rows, expected {}",
                t.shadow_name().plain(),
                rows.unwrap_or(0),
                expected_rows
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "?".into())
            ));
        }
        out.push(ShadowTable {
            schema: t.schema.to_string(),
            table: t.name.to_string(),
            shadow: t.shadow.to_string(),
            present,
            rows,
            expected_rows,
            preserved,
        });
    }
    Ok(out)
}

/// Reads the status of the newest migration of the destination.
pub async fn status(destination: &DbUrl) -> Result<Status, CoordinatorError> {
    let client = destination.connect("pgzm-status").await?;
    let mut s = Status {
        state: "none".into(),
        migration_id: None,
        age_seconds: None,
        source: None,
        created_at: None,
        prepared_at: None,
        swapped_at: None,
        tables: Vec::new(),
        preserved_tables: Vec::new(),
        shadow_tables: Vec::new(),
        sync_triggers: Vec::new(),
        sync_errors: Vec::new(),
        copy_limits: None,
        backup_present: false,
        safe_to_swap: false,
        problems: Vec::new(),
        error: None,
    };
    let Some(mut row) = state::load(&client, None).await? else {
        s.problems.push("nothing prepared".into());
        return Ok(s);
    };
    let mut run_active = run_lock_held(&client).await?;
    if run_active && row.status == RunStatus::Prepared {
        // A run that just ended (a failed `swap`, a refused `prepare`) holds the lock until the
        // server notices its closed connection, a moment later: look again for as long as
        // `try_lock` would wait before calling the destination busy, then read the outcome.
        let since = std::time::Instant::now();
        while run_active && since.elapsed() < state::LOCK_GRACE {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            run_active = run_lock_held(&client).await?;
        }
        if !run_active {
            if let Some(newer) = state::load(&client, None).await? {
                row = newer;
            }
        }
    }
    s.state = match row.status {
        RunStatus::Prepared if run_active => "swapping".into(),
        other => other.as_str().to_string(),
    };
    s.migration_id = Some(row.id);
    s.age_seconds = Some(row.age_seconds);
    s.source = Some(row.source.clone());
    s.created_at = Some(row.created_at.clone());
    s.prepared_at = row.prepared_at.clone();
    s.swapped_at = row.swapped_at.clone();
    s.tables = row
        .plan
        .tables
        .iter()
        .map(|t| t.qualname().display_name())
        .collect();
    s.preserved_tables = row
        .plan
        .preserved
        .iter()
        .map(|p| p.qualname().display_name())
        .collect();
    s.backup_present = row.backup_present;
    s.error = row.error.clone();
    if row.status == RunStatus::Preparing && !run_active {
        s.problems.push("this run was interrupted: `pgzm abort` removes its shadow objects and sync triggers now (the next `pgzm prepare` or `pgzm start` would too)".into());
    }
    if row.status == RunStatus::Preparing {
        let limits = client
            .query_one(
                "SELECT max_rate, max_lag_ms, paused FROM pgzm.migrations WHERE id = $1",
                &[&row.id],
            )
            .await
            .map_err(|e| CoordinatorError::destination("read the copy's limits", e))?;
        s.copy_limits = Some(state::CopyLimits::from_row(&limits));
    }
    // What an interrupted rollback left to drop (it does not stand in a swap's way).
    let aside = state::rolled_back_objects(&client, None).await?;
    let aside_left = aside.first().map(|first| format!(
        "the rollback of migration {} moved {} object(s) aside that are not dropped yet (it was interrupted after its commit; they are recorded in pgzm.rolled_back_objects): `pgzm cleanup` drops them",
        first.migration_id,
        aside.len()
    ));
    if row.status != RunStatus::Prepared {
        s.problems.extend(aside_left);
        // Whatever the metadata says, report the mirroring triggers that exist.
        let present = state::sync_triggers_present(&client).await?;
        if !present.is_empty() {
            s.problems.push(format!(
                "{} sync trigger(s) of an unfinished run are still mirroring writes on live tables: run `pgzm abort`",
                present.len()
            ));
        }
        s.sync_triggers = present
            .into_iter()
            .map(|(table, trigger, enabled)| SyncTrigger {
                table,
                trigger,
                present: true,
                enabled,
            })
            .collect();
        if row.status != RunStatus::Preparing {
            s.problems.push(format!(
                "nothing prepared (the newest migration is {})",
                row.status
            ));
        }
        return Ok(s);
    }
    let copied: Vec<crate::report::TableReport> = row
        .stats
        .as_ref()
        .and_then(|st| st.get("tables"))
        .and_then(|t| serde_json::from_value(t.clone()).ok())
        .unwrap_or_default();
    s.shadow_tables = shadow_tables(&client, &row, &copied, &mut s.problems).await?;
    s.sync_triggers = triggers_of(&client, &row.plan).await?;
    s.sync_errors = state::sync_errors(&client, row.id)
        .await?
        .into_iter()
        .map(|(table, operation, message, at)| SyncError {
            table,
            operation,
            message,
            at,
        })
        .collect();
    s.problems
        .extend(shadow_problems(&client, &row.plan, &row.objects).await?);
    s.safe_to_swap = s.problems.is_empty() && s.state == RunStatus::Prepared.as_str();
    s.problems.extend(aside_left);
    if s.state == "swapping" {
        s.problems
            .push("a pgzm run holds this destination right now".into());
    }
    Ok(s)
}
