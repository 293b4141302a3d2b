//! `pgzm swap` (and the second half of `start`): check the prepared shadow set, replace the
//! previous backup set, swap in one transaction, validate re-pointed keys, record the result.
//!
//! `swap` needs only the destination: everything it does comes from the migration's plan,
//! recorded in `pgzm.migrations` by `prepare` (possibly days earlier, on another machine).

use tokio_postgres::Client;
use tracing::info;

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::locked::SwapSettings;
use crate::plan::Plan;
use crate::report::{Phases, Report, TableReport};
use crate::state::{self, RecordedObjects};
use crate::status;
use crate::swap;

/// Options of `pgzm swap`.
#[derive(Debug, Clone)]
pub struct SwapOptions {
    /// Destination database.
    pub destination: DbUrl,
    /// Migration to swap (default: the newest).
    pub migration_id: Option<i64>,
    /// Check and print, change nothing.
    pub dry_run: bool,
    /// Lock behaviour.
    pub locks: SwapSettings,
    /// Backup sets kept after the swap, the new one included (at least 1).
    pub keep_backups: u32,
}

/// How a swap runs: its locks, and how many backup sets it keeps.
#[derive(Debug, Clone, Copy)]
pub struct SwapPolicy {
    /// Lock behaviour.
    pub locks: SwapSettings,
    /// Backup sets kept after the swap, the new one included (at least 1).
    pub keep_backups: u32,
}

/// Swaps a prepared migration in, on the control session that holds the run lock.
pub async fn swap_prepared(
    control: &Client,
    destination: &DbUrl,
    plan: &Plan,
    objects: &RecordedObjects,
    policy: SwapPolicy,
    phases: &mut Phases,
    report: &mut Report,
) -> Result<(), CoordinatorError> {
    crate::interrupt::set_run(plan.migration_id);
    let problems = status::shadow_problems(control, plan, objects).await?;
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    // The current backup set is not dropped before the swap: the swap transaction moves it
    // aside (to `backup_<id>_` names, recorded in the same transaction), so a swap that fails
    // leaves it exactly as it was.
    let earlier = state::earlier_runs(control).await?;
    let aside = match earlier.backup_set {
        Some((id, moves)) if id != plan.migration_id => {
            Some(state::aside_set(control, id, &moves).await?)
        }
        _ => None,
    };
    let outcome = phases
        .run(
            "swap",
            swap::swap(control, plan, aside.as_ref(), policy.locks),
        )
        .await?;
    let m = crate::metrics::get();
    m.swap_lock_held
        .record(outcome.lock_held_us as f64 / 1_000_000.0, &[]);
    m.swap_lock_wait.record(
        ((outcome.total_ms as f64 - outcome.lock_held_us as f64 / 1000.0) / 1000.0).max(0.0),
        &[],
    );
    report.swap = Some(outcome);
    // After the commit nothing may fail the run: problems become warnings.
    report
        .warnings
        .extend(swap::validate_repointed(control, plan).await);
    report
        .warnings
        .extend(swap::validate_deferred(control, plan).await);
    // Only now, with the new set in place, are sets beyond --keep-backups dropped; meanwhile the
    // new backup set's rows are counted (the two touch different sets).
    let dropping = async {
        match destination.connect("pgzm-coordinator").await {
            Ok(mut c) => {
                phases
                    .run("drop_old_backups", async {
                        Ok(state::drop_old_sets(&mut c, policy.keep_backups).await)
                    })
                    .await
            }
            Err(e) => Ok((
                Vec::new(),
                vec![format!(
                    "the swap committed, but older backup sets could not be dropped ({e}); run `pgzm cleanup` to drop them"
                )],
            )),
        }
    };
    // The backup tables are frozen from now on: their row counts are what `verify` checks.
    let counting = count_backups(control, destination, plan);
    let (dropped, (backup_rows, count_warnings)) = tokio::join!(dropping, counting);
    let (dropped, warnings) = dropped?;
    report.dropped_backup = dropped;
    report.warnings.extend(warnings);
    report.warnings.extend(count_warnings);
    let stats = serde_json::json!({
        "tables": report.tables, "rows": report.rows, "bytes": report.bytes,
        "swap": outcome, "phases": phases.0, "backup_rows": backup_rows,
        "throughput": report.throughput,
    });
    if let Err(e) = state::set_status(
        control,
        plan.migration_id,
        state::RunStatus::Swapped,
        Some(&stats.to_string()),
        None,
    )
    .await
    {
        report.warnings.push(format!(
            "the swap committed but its statistics could not be recorded: {e}"
        ));
    }
    Ok(())
}

/// Row counts of the backup tables, a few hundred per statement, on the control session and a
/// second one at once (each count is a statement to plan and a relation to open: ~0.15–0.25 ms
/// of server time per table, half a second at 3 000 tables on one session). A chunk that fails
/// is counted table by table so one unreadable table costs only its own count (and a warning).
async fn count_backups(
    control: &Client,
    destination: &DbUrl,
    plan: &Plan,
) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    let tables: Vec<&crate::plan::Move> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == crate::plan::ObjectKind::Table)
        .collect();
    let chunks: Vec<&[&crate::plan::Move]> = tables.chunks(COUNT_CHUNK).collect();
    // A second session only where there is more than one statement's worth.
    let second = if chunks.len() > 1 {
        destination.connect("pgzm-coordinator").await.ok()
    } else {
        None
    };
    let Some(second) = second else {
        return count_chunks(control, &chunks).await;
    };
    let mine: Vec<_> = chunks.iter().copied().step_by(2).collect();
    let theirs: Vec<_> = chunks.iter().copied().skip(1).step_by(2).collect();
    let ((mut out, mut warnings), (more, more_warnings)) =
        tokio::join!(count_chunks(control, &mine), count_chunks(&second, &theirs));
    out.extend(more);
    warnings.extend(more_warnings);
    (out, warnings)
}

/// Backup tables counted per statement.
const COUNT_CHUNK: usize = 200;

async fn count_chunks(
    session: &Client,
    chunks: &[&[&crate::plan::Move]],
) -> (serde_json::Map<String, serde_json::Value>, Vec<String>) {
    use pgzm_pg::sql::{quote_literal, quote_qualified};
    let count_sql = |chunk: &[&crate::plan::Move]| {
        chunk
            .iter()
            .map(|m| {
                format!(
                    "SELECT {}::text AS table_name, count(*) AS row_count FROM ONLY {}",
                    quote_literal(&m.stats_key()),
                    quote_qualified(&m.schema, &m.to)
                )
            })
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    let count_of = |r: &tokio_postgres::Row| {
        (
            r.get::<_, String>("table_name"),
            serde_json::json!(r.get::<_, i64>("row_count")),
        )
    };
    let mut out = serde_json::Map::new();
    let mut warnings = Vec::new();
    for chunk in chunks {
        if let Ok(rows) = session.query(&count_sql(chunk), &[]).await {
            out.extend(rows.iter().map(count_of));
            continue;
        }
        for m in chunk.iter() {
            match session.query_one(&count_sql(&[*m]), &[]).await {
                Ok(r) => {
                    let (table, rows) = count_of(&r);
                    out.insert(table, rows);
                }
                Err(e) => warnings.push(format!(
                    "could not count the rows of backup table \"{}\": {}",
                    m.to,
                    pgzm_pg::conn::describe(&e)
                )),
            }
        }
    }
    (out, warnings)
}

/// `pgzm swap`: swaps the prepared migration recorded in the destination.
pub async fn swap_command(opts: SwapOptions) -> Result<Report, CoordinatorError> {
    let mut phases = Phases(Vec::new());
    let control = opts.destination.connect("pgzm-coordinator").await?;
    if !state::try_lock(&control).await? {
        return Err(CoordinatorError::Busy);
    }
    let result = swap_locked(&control, opts, &mut phases).await;
    // Release the run lock now rather than when the server notices the closed connection, so a
    // `status` or another run started right after does not find this one still holding it.
    state::unlock(&control).await;
    result
}

async fn swap_locked(
    control: &Client,
    opts: SwapOptions,
    phases: &mut Phases,
) -> Result<Report, CoordinatorError> {
    control
        .batch_execute(crate::state::CATALOG_SESSION)
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", e))?;
    // Read on a session of its own: a session keeps the buffer of its largest response (the
    // plan: ~12 MB at 10 000 tables) for as long as it lives, and the control session lives
    // through the swap.
    let loaded = {
        let reader = opts.destination.connect("pgzm-coordinator").await?;
        reader
            .batch_execute(crate::state::CATALOG_SESSION)
            .await
            .map_err(|e| CoordinatorError::destination("set search_path", e))?;
        state::load(&reader, opts.migration_id).await?
    };
    let mut row = match (loaded, opts.migration_id) {
        (Some(row), _) => row,
        (None, Some(id)) => {
            return Err(CoordinatorError::Refused(vec![format!(
                "no migration {id} in this destination: see `pgzm status`"
            )]))
        }
        (None, None) => {
            return Err(CoordinatorError::Refused(vec![
                "nothing prepared in this destination (no shadow tables): run `pgzm prepare` first"
                    .into(),
            ]))
        }
    };
    match row.status {
        state::RunStatus::Prepared => {}
        state::RunStatus::Swapped => {
            return Err(CoordinatorError::Refused(vec![format!(
                "migration {} is already swapped; nothing prepared: run `pgzm prepare` for a new one",
                row.id
            )]))
        }
        state::RunStatus::Preparing => {
            return Err(CoordinatorError::Refused(vec![format!(
                "migration {} is still preparing (or was interrupted): wait for `pgzm prepare` to finish, or run it again",
                row.id
            )]))
        }
        other => {
            return Err(CoordinatorError::Refused(vec![format!(
                "nothing prepared: the newest migration ({}) is {other}; run `pgzm prepare` first",
                row.id
            )]))
        }
    }
    let mut report = Report::new(&row.plan, opts.dry_run);
    if let Some(tables) = row.stats.as_mut().and_then(|s| s.get_mut("tables")) {
        report.tables =
            serde_json::from_value::<Vec<TableReport>>(tables.take()).unwrap_or_default();
        report.rows = report.tables.iter().map(|t| t.rows).sum();
        report.bytes = report.tables.iter().map(|t| t.bytes).sum();
    }
    // The copy ran in the prepare run: its throughput is in the recorded statistics.
    report.throughput = row
        .stats
        .as_ref()
        .and_then(|s| s.get("throughput"))
        .and_then(|t| serde_json::from_value(t.clone()).ok());
    if opts.dry_run {
        let problems = status::shadow_problems(control, &row.plan, &row.objects).await?;
        if !problems.is_empty() {
            return Err(CoordinatorError::Refused(problems));
        }
        report.plan = row.plan;
        return Ok(report);
    }
    swap_prepared(
        control,
        &opts.destination,
        &row.plan,
        &row.objects,
        SwapPolicy {
            locks: opts.locks,
            keep_backups: opts.keep_backups,
        },
        phases,
        &mut report,
    )
    .await?;
    info!(migration = row.id, "swapped");
    report.phases = std::mem::take(&mut phases.0);
    report.plan = row.plan;
    Ok(report)
}
