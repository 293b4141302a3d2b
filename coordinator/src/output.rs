//! Human-readable output: the plan and the final report.

use std::fmt::Write;

use crate::plan::Plan;
use crate::report::Report;
use crate::rewrite::display_ident;

pub use crate::report::size;

/// The plan as the operator reads it.
pub fn human_plan(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Plan for migration {} from {}",
        plan.migration_id, plan.source
    );
    let _ = writeln!(
        s,
        "  tables: {} (about {} in the source)",
        plan.tables.len(),
        size(plan.estimated_bytes())
    );
    for t in &plan.tables {
        let rows = if t.estimated_rows < 0 {
            "rows not yet counted".to_string()
        } else {
            format!("~{} rows", t.estimated_rows)
        };
        let _ = writeln!(
            s,
            "    {:<40} {rows}, {:>10}  -> {}{}{}",
            t.qualname().plain(),
            size(t.estimated_bytes),
            display_ident(&t.shadow),
            t.backup
                .as_ref()
                .map(|b| format!(", live table kept as {}", display_ident(b)))
                .unwrap_or_else(|| ", new table".into()),
            if t.copy_data {
                ""
            } else {
                ", without its rows"
            }
        );
    }
    if !plan.excluded.is_empty() {
        let _ = writeln!(
            s,
            "  left out by the table filters (stay as they are): {}",
            plan.excluded
                .iter()
                .map(|t| t.plain())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(
        s,
        "  shadow objects: {} types, {} sequences, {} indexes",
        plan.types.len(),
        plan.sequences.len(),
        plan.indexes.len()
    );
    let _ = writeln!(
        s,
        "  swap renames: {} to backup, {} to live",
        plan.to_backup.len(),
        plan.to_live.len()
    );
    if !plan.views.is_empty() {
        let names: Vec<String> = plan
            .views
            .iter()
            .map(|v| crate::naming::QualName::new(v.schema.clone(), v.name.clone()).display_name())
            .collect();
        let _ = writeln!(s, "  views created at the swap: {}", names.join(", "));
    }
    if !plan.dependents.is_empty() {
        let _ = writeln!(
            s,
            "  objects outside the migrated tables that depend on them: {}",
            plan.dependents.len()
        );
        for d in &plan.dependents {
            let _ = writeln!(s, "    {} (on {}): {}", d.object, d.on, d.action);
        }
    }
    if !plan.extensions_to_create.is_empty() {
        let names: Vec<&str> = plan
            .extensions_to_create
            .iter()
            .map(|(e, _)| e.as_str())
            .collect();
        let _ = writeln!(s, "  extensions to create: {}", names.join(", "));
    }
    if let Some(id) = plan.previous_backup {
        let _ = writeln!(
            s,
            "  the backup set of migration {id} will be replaced once this one is prepared"
        );
    }
    if !plan.leftovers.is_empty() {
        let _ = writeln!(
            s,
            "  interrupted runs to clean up first: {:?}",
            plan.leftovers
        );
    }
    for w in &plan.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    s
}

/// Rows and bytes copied, and the phase timings.
fn copied_and_phases(s: &mut String, r: &Report) {
    if let Some(resumed) = &r.resumed {
        let _ = writeln!(
            s,
            "Resumed migration {}: kept {} table(s) the interrupted run had copied; copied {} again",
            r.migration_id,
            resumed.kept.len(),
            resumed.redone.len()
        );
        for t in &resumed.redone {
            let _ = writeln!(s, "  copied again: {} ({})", t.table, t.reason);
        }
        for t in &resumed.rebuilt {
            let _ = writeln!(s, "  built again, rows kept: {} ({})", t.table, t.reason);
        }
    }
    let _ = writeln!(
        s,
        "Copied {} rows ({}) in {} tables",
        r.rows,
        size(r.bytes as i64),
        r.tables.len()
    );
    if let Some(t) = &r.throughput {
        let _ = writeln!(
            s,
            "  copy throughput: {:.0} rows/s, {}/s (with index builds); data landed in {} ms, {}/s",
            t.rows_per_s,
            size(t.bytes_per_s as i64),
            t.data_ms,
            size(t.data_bytes_per_s as i64)
        );
    }
    for p in &r.phases {
        let _ = writeln!(
            s,
            "  {:<22} {:>8} ms  (started {})",
            p.phase, p.duration_ms, p.started_at
        );
    }
}

/// The final report (`plan_shown`: the plan was printed already, before the copy; a swap's
/// report does not repeat the plan either).
pub fn human_report(r: &Report, plan_shown: bool) -> String {
    let mut s = if plan_shown {
        String::new()
    } else {
        human_plan(&r.plan)
    };
    if r.dry_run {
        let _ = writeln!(s, "Dry run: nothing was changed.");
        return s;
    }
    for c in &r.cleaned_up {
        let _ = writeln!(s, "cleaned up from an interrupted run: {c}");
    }
    for d in &r.dropped_backup {
        let _ = writeln!(s, "dropped from the previous backup set: {d}");
    }
    copied_and_phases(&mut s, r);
    if let Some(sw) = &r.swap {
        let _ = writeln!(
            s,
            "Swapped in {} attempt(s); locks held {:.1} ms",
            sw.attempts,
            sw.lock_held_us as f64 / 1000.0
        );
    }
    // The plan's own warnings were printed with it.
    for w in r.warnings.iter().filter(|w| !r.plan.warnings.contains(w)) {
        let _ = writeln!(s, "warning: {w}");
    }
    let _ = writeln!(
        s,
        "Migration {id} complete; the previous tables are kept as backup_*. To undo it:\n  pgzm rollback --dest \"$DEST_DATABASE_URL\" --timestamp {id}",
        id = r.migration_id
    );
    s
}

/// Output of `pgzm prepare`.
pub fn human_prepare(r: &Report, plan_shown: bool) -> String {
    let mut s = if plan_shown {
        String::new()
    } else {
        human_plan(&r.plan)
    };
    if r.dry_run {
        let _ = writeln!(s, "Dry run: nothing was changed.");
        return s;
    }
    copied_and_phases(&mut s, r);
    if !r.plan.preserved.is_empty() {
        let names: Vec<String> = r
            .plan
            .preserved
            .iter()
            .map(|p| p.qualname().display_name())
            .collect();
        let _ = writeln!(
            s,
            "Preserved tables kept in sync until the swap: {}",
            names.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "Migration {} is prepared. Swap it in with:\n  pgzm swap --dest \"$DEST_DATABASE_URL\" --timestamp {}",
        r.migration_id, r.migration_id
    );
    s
}

/// Output of `pgzm status`.
pub fn human_status(st: &crate::status::Status) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "State: {}", st.state.to_uppercase());
    if let Some(id) = st.migration_id {
        let _ = writeln!(
            s,
            "Migration {id} from {} (created {}, {:.0} s ago)",
            st.source.as_deref().unwrap_or("?"),
            st.created_at.as_deref().unwrap_or("?"),
            st.age_seconds.unwrap_or(0.0)
        );
    }
    if !st.tables.is_empty() {
        let _ = writeln!(s, "Tables: {}", st.tables.len());
    }
    if !st.preserved_tables.is_empty() {
        let _ = writeln!(s, "Preserved: {}", st.preserved_tables.join(", "));
    }
    if let Some(l) = &st.copy_limits {
        let _ = writeln!(s, "Copy limits: {}", limits_text(l));
        if let Some(p) = &l.paused {
            let _ = writeln!(s, "Copy paused: {p}");
        }
    }
    for t in &st.shadow_tables {
        let _ = writeln!(
            s,
            "  {:<40} {:<8} rows {:>10} expected {:>10}{}",
            crate::naming::QualName::new(t.schema.clone(), t.shadow.clone()).display_name(),
            if t.present { "present" } else { "MISSING" },
            t.rows.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
            t.expected_rows
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            if t.preserved { "  (preserved)" } else { "" }
        );
    }
    let healthy = st
        .sync_triggers
        .iter()
        .filter(|t| t.present && t.enabled)
        .count();
    if !st.sync_triggers.is_empty() {
        let _ = writeln!(
            s,
            "Sync triggers: {healthy}/{} present and enabled",
            st.sync_triggers.len()
        );
    }
    for e in &st.sync_errors {
        let _ = writeln!(
            s,
            "  sync error: {} on {} at {}: {}",
            e.operation, e.table, e.at, e.message
        );
    }
    if let Some(e) = &st.error {
        let _ = writeln!(s, "Error: {e}");
    }
    let waiting = matches!(st.state.as_str(), "prepared" | "swapping" | "preparing");
    for p in &st.problems {
        // "nothing prepared" is what the last line says, calmly.
        if waiting || !p.starts_with("nothing prepared") {
            let _ = writeln!(s, "  - {p}");
        }
    }
    let last = match st.state.as_str() {
        _ if st.safe_to_swap => "READY FOR SWAP".to_string(),
        "prepared" | "swapping" | "preparing" => "NOT READY FOR SWAP".to_string(),
        "swapped" => format!(
            "Swapped: the new tables are live{}",
            if st.backup_present {
                "; the previous ones are its backup set (`pgzm rollback --latest` restores them)"
            } else {
                ""
            }
        ),
        "none" => "Nothing prepared.".to_string(),
        other => format!("Nothing to swap (the newest migration is {other})."),
    };
    let _ = writeln!(s, "{last}");
    s
}

/// Output of `pgzm list` (the original tool's columns).
pub fn human_list(sets: &[crate::backup::BackupSet]) -> String {
    let mut s = String::new();
    if sets.is_empty() {
        let _ = writeln!(s, "No backup sets found.");
        return s;
    }
    let _ = writeln!(
        s,
        "{:<15}  {:<24}  {:>6}  {:>10}",
        "TIMESTAMP", "SWAPPED AT (UTC)", "TABLES", "SIZE"
    );
    for b in sets {
        let _ = writeln!(
            s,
            "{:<15}  {:<24}  {:>6}  {:>10}",
            b.timestamp, b.created, b.table_count, b.size
        );
    }
    for b in sets {
        let names: Vec<String> = b
            .tables
            .iter()
            .map(|t| {
                crate::naming::QualName::new(t.schema.clone(), t.backup.clone()).display_name()
            })
            .collect();
        let width = names
            .iter()
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .max(12);
        let _ = writeln!(s, "\nBackup set {}:", b.timestamp);
        let _ = writeln!(
            s,
            "  {:<width$}  {:>12}  {:>10}",
            "BACKUP TABLE", "ROWS", "SIZE"
        );
        for (t, name) in b.tables.iter().zip(&names) {
            let _ = writeln!(
                s,
                "  {:<width$}  {:>12}  {:>10}",
                name,
                t.rows
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "missing".into()),
                t.bytes.map(size).unwrap_or_default()
            );
        }
    }
    s
}

/// Output of `pgzm verify`.
pub fn human_verify(v: &crate::backup::Verification) -> String {
    let mut s = String::new();
    for c in &v.checks {
        let _ = writeln!(
            s,
            "  [{}] {}{}",
            if c.ok { "ok" } else { "FAILED" },
            c.check,
            c.detail
                .as_ref()
                .map(|d| format!(": {d}"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        s,
        "Backup set {} is {}",
        v.timestamp,
        if v.valid { "VALID" } else { "NOT VALID" }
    );
    s
}

/// Output of `pgzm rollback`.
pub fn human_rollback(r: &crate::rollback::RollbackReport) -> String {
    let mut s = String::new();
    if r.dry_run {
        let _ = writeln!(
            s,
            "Dry run: the rollback to backup set {} would run this transaction:",
            r.timestamp
        );
        for st in &r.statements {
            let _ = writeln!(s, "  {st};");
        }
        return s;
    }
    let _ = writeln!(
        s,
        "Rolled back to backup set {} ({} lock attempt(s)).",
        r.timestamp, r.attempts
    );
    let _ = writeln!(s, "  restored: {}", r.restored.join(", "));
    if !r.kept.is_empty() {
        let _ = writeln!(s, "  kept with their current data: {}", r.kept.join(", "));
    }
    if !r.dropped.is_empty() {
        let _ = writeln!(
            s,
            "  dropped (added by the migration): {}",
            r.dropped.join(", ")
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

/// Output of `pgzm throttle`.
pub fn human_throttle(t: &crate::state::Throttled) -> String {
    format!(
        "Migration {}: copy limits now {} (applied within a second)\n",
        t.migration_id,
        limits_text(&t.limits)
    )
}

/// `rate 50.0 MiB/s, replication lag 10 s` (or `unlimited`, `none`).
fn limits_text(l: &crate::state::CopyLimits) -> String {
    let rate = l.max_rate_bytes_per_s.map_or("unlimited".to_string(), |r| {
        format!(
            "{}/s",
            crate::report::size(i64::try_from(r).unwrap_or(i64::MAX))
        )
    });
    let lag = l
        .max_replication_lag_s
        .map_or("none".to_string(), |s| format!("{s} s"));
    format!("rate {rate}, replication lag {lag}")
}

/// Output of `pgzm cleanup`.
/// `pgzm abort`, for a terminal.
pub fn human_abort(a: &crate::state::Aborted) -> String {
    let mut s = String::new();
    if a.migrations.is_empty() {
        let _ = writeln!(s, "Nothing to abort: no interrupted or prepared run.");
        return s;
    }
    let verb = if a.dry_run { "Would remove" } else { "Removed" };
    let _ = writeln!(s, "{verb} run(s) {:?}:", a.migrations);
    for o in &a.removed {
        let _ = writeln!(s, "  {o}");
    }
    if !a.dry_run {
        let _ = writeln!(s, "The live tables and the backup sets are unchanged.");
    }
    s
}

/// `pgzm cleanup`, for a terminal.
pub fn human_cleanup(c: &crate::backup::Cleanup) -> String {
    let mut s = String::new();
    let verb = if c.dry_run { "Would drop" } else { "Dropped" };
    if c.backup_sets.is_empty() {
        let _ = writeln!(
            s,
            "No backup set older than {}.",
            crate::report::rfc3339(c.before)
        );
        return s;
    }
    let _ = writeln!(
        s,
        "{verb} {} backup set(s): {:?}",
        c.backup_sets.len(),
        c.backup_sets
    );
    for o in &c.objects {
        let _ = writeln!(s, "  {o}");
    }
    s
}
