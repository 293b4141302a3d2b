//! `pgzm rollback`: put a backup set back in place, in one transaction with the swap's lock
//! strategy.
//!
//! Inside the transaction: the tables the migration brought in are dropped (except those named
//! in `--keep-tables`, which keep their current data), the backup tables — with their indexes,
//! sequences and types — take their live names again, foreign keys of other tables are
//! re-pointed at the restored tables, views are recreated, and the backup set is marked consumed.
//! The rolled-back tables are dropped, not kept: after a rollback nothing `backup_` or
//! `rolledback_` remains. A kept table's columns typed with a migration type that a restored type
//! of the same name replaces are converted to the restored type in the same transaction (one
//! rewrite of the kept table; views reading it are recreated), so kept and restored tables share
//! one type again; this fails — changing nothing — if a kept row holds a value the restored type
//! lacks. Only a type the migration introduced (no restored counterpart) that a kept table still
//! uses stays, renamed `rolledback_…`.

use std::collections::{BTreeMap, BTreeSet};

use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified, quote_qualified_list};
use serde::Serialize;
use tokio_postgres::Client;

use crate::backup;
use crate::catalog::{topological_order, Oid};
use crate::conninfo::DbUrl;
use crate::destination::{self, LiveView};
use crate::error::CoordinatorError;
use crate::locked::{run_with_lock_retry, SwapSettings};
use crate::naming::prefixed;
use crate::plan::ObjectKind;
use crate::rewrite::Renames;
use crate::state;

/// Prefix of objects moved aside by a rollback because something still uses them.
pub const ROLLEDBACK: &str = "rolledback_";

/// Options of `pgzm rollback`.
#[derive(Debug, Clone)]
pub struct RollbackOptions {
    /// Destination.
    pub destination: DbUrl,
    /// Backup set to restore (None: the newest).
    pub migration_id: Option<i64>,
    /// Tables that keep their current live data.
    pub keep_tables: Vec<String>,
    /// Print the statements, change nothing.
    pub dry_run: bool,
    /// Lock behaviour.
    pub locks: SwapSettings,
}

/// What a rollback did (or would do).
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    /// Backup set restored.
    pub timestamp: i64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Tables restored from the backup set.
    pub restored: Vec<String>,
    /// Tables that kept their current data.
    pub kept: Vec<String>,
    /// Tables the migration had added, dropped.
    pub dropped: Vec<String>,
    /// The transaction's statements.
    pub statements: Vec<String>,
    /// Lock attempts.
    pub attempts: u32,
    /// Problems found after the commit.
    pub warnings: Vec<String>,
}

fn public(name: &str) -> String {
    quote_qualified("public", name)
}

async fn oids(
    client: &Client,
    names: &[String],
) -> Result<BTreeMap<String, Oid>, CoordinatorError> {
    let rows = client
        .query(
            "SELECT relname::text, oid FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relname = ANY($1)",
            &[&names],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect tables for the rollback", &e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Names of the sequences owned by (serial or identity columns of) the given tables.
async fn owned_sequences(
    client: &Client,
    tables: &[Oid],
) -> Result<BTreeSet<String>, CoordinatorError> {
    const OWNED_SEQUENCES: &str = "
        SELECT s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        WHERE d.refobjid = ANY($1) AND d.refclassid = 'pg_class'::regclass
          AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')";
    Ok(client
        .query(OWNED_SEQUENCES, &[&tables])
        .await
        .map_err(|e| CoordinatorError::destination("inspect owned sequences", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

struct ForeignKey {
    schema: String,
    table: String,
    name: String,
    definition: String,
}

async fn foreign_keys(
    client: &Client,
    sql: &str,
    a: &[Oid],
    b: &[Oid],
) -> Result<Vec<ForeignKey>, CoordinatorError> {
    let rows = client
        .query(sql, &[&a, &b])
        .await
        .map_err(|e| CoordinatorError::destination("inspect foreign keys for the rollback", &e))?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            schema: r.get(0),
            table: r.get(1),
            name: r.get(2),
            definition: r.get(3),
        })
        .collect())
}

const FKS_INTO: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace), c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'f' AND k.confrelid = ANY($1) AND NOT (k.conrelid = ANY($2))";

const FKS_FROM: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace), c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'f' AND k.conrelid = ANY($1) AND k.confrelid = ANY($2)";

/// `pgzm rollback`.
pub async fn rollback(opts: RollbackOptions) -> Result<RollbackReport, CoordinatorError> {
    let control = opts.destination.connect("pgzm-coordinator").await?;
    if !state::try_lock(&control).await? {
        return Err(CoordinatorError::Busy);
    }
    control
        .batch_execute("SET search_path = pg_catalog")
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", &e))?;
    let row = backup::find(&control, opts.migration_id).await?;
    let plan = &row.plan;
    let migrated: BTreeSet<&str> = plan.tables.iter().map(|t| t.name.as_str()).collect();
    let keep: BTreeSet<String> = crate::naming::table_list(&opts.keep_tables)
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    for k in &keep {
        if !migrated.contains(k.as_str()) {
            problems.push(format!(
                "--keep-tables: \"{k}\" is not a table of migration {}",
                row.id
            ));
        }
    }
    let backups: Vec<(String, String)> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::Table)
        .map(|m| (m.from.clone(), m.to.clone()))
        .collect();
    let restored: Vec<(String, String)> = backups
        .iter()
        .filter(|(l, _)| !keep.contains(l))
        .cloned()
        .collect();
    let kept_backups: Vec<String> = backups
        .iter()
        .filter(|(l, _)| keep.contains(l))
        .map(|(_, b)| b.clone())
        .collect();
    let current_drop: Vec<String> = plan
        .tables
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !keep.contains(n))
        .collect();

    let all_names: Vec<String> = backups
        .iter()
        .flat_map(|(l, b)| [l.clone(), b.clone()])
        .chain(current_drop.iter().cloned())
        .chain(keep.iter().cloned())
        .collect();
    let oid_of = oids(&control, &all_names).await?;
    for (_, b) in &backups {
        if !oid_of.contains_key(b) {
            problems.push(format!(
                "backup table \"{b}\" is missing: the backup set is incomplete (see `pgzm verify`)"
            ));
        }
    }
    for k in &keep {
        if !oid_of.contains_key(k) {
            problems.push(format!("--keep-tables: live table \"{k}\" does not exist"));
        }
    }
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    let current_oids: Vec<Oid> = current_drop
        .iter()
        .filter_map(|n| oid_of.get(n).copied())
        .collect();
    let kept_backup_oids: Vec<Oid> = kept_backups
        .iter()
        .filter_map(|n| oid_of.get(n).copied())
        .collect();
    let restored_oids: Vec<Oid> = restored
        .iter()
        .filter_map(|(_, b)| oid_of.get(b).copied())
        .collect();
    let gone: Vec<Oid> = current_oids
        .iter()
        .chain(&kept_backup_oids)
        .copied()
        .collect();

    // Names after the rollback, for rewriting definitions read now.
    let mut back = Renames::new();
    for m in &plan.to_backup {
        back.insert(&m.to, &m.from);
    }

    let fks_in = foreign_keys(&control, FKS_INTO, &current_oids, &gone).await?;
    let kept_oids: Vec<Oid> = keep.iter().filter_map(|k| oid_of.get(k).copied()).collect();
    let conversions = type_conversions(&control, plan, &kept_oids).await?;
    let converted_oids: BTreeSet<Oid> = conversions.iter().map(|c| c.table_oid).collect();
    let fks_kept = foreign_keys(&control, FKS_FROM, &restored_oids, &kept_backup_oids).await?;

    // Views. A backup view comes back by renaming it (it reads the restored tables by oid),
    // unless it reads a kept table's backup, which is dropped. Current views that read something
    // dropped (or whose name a restored view takes) are dropped; those the migration did not
    // create are recreated from their current definition, which names the tables by their live
    // names — the restored tables after the renames.
    let dest = destination::read(&control).await?;
    // Views by (schema, live name, backup name).
    let backup_view_moves: Vec<(&str, &str, &str)> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::View)
        .map(|m| (m.schema.as_str(), m.from.as_str(), m.to.as_str()))
        .collect();
    let kept_set: BTreeSet<Oid> = kept_backup_oids.iter().copied().collect();
    let restorable: BTreeSet<(&str, &str)> = backup_view_moves
        .iter()
        .filter(|(s, _, b)| {
            dest.views
                .get(&(s.to_string(), b.to_string()))
                .is_some_and(|v| v.depends_on.is_disjoint(&kept_set))
        })
        .map(|(s, live, _)| (*s, *live))
        .collect();
    let gone_set: BTreeSet<Oid> = gone.iter().copied().collect();
    // Views that read (transitively) one of `seeds`, or whose name a restored view takes.
    let views_reading = |seeds: &BTreeSet<Oid>| {
        let mut dropped: BTreeMap<Oid, &LiveView> = BTreeMap::new();
        loop {
            let before = dropped.len();
            for v in dest.views.values() {
                if dropped.contains_key(&v.oid) {
                    continue;
                }
                let restorable_backup = backup_view_moves.iter().any(|(s, l, b)| {
                    *s == v.schema && *b == v.name && restorable.contains(&(*s, *l))
                });
                if restorable_backup {
                    continue;
                }
                if restorable.contains(&(v.schema.as_str(), v.name.as_str()))
                    || v.depends_on
                        .iter()
                        .any(|d| seeds.contains(d) || dropped.contains_key(d))
                {
                    dropped.insert(v.oid, v);
                }
            }
            if dropped.len() == before {
                break dropped;
            }
        }
    };
    let dropped_for_gone = views_reading(&gone_set);
    // Views reading a kept table whose columns change type are dropped too (ALTER COLUMN TYPE
    // refuses columns a view reads), and always recreated: nothing they read goes away.
    let dropped_views = views_reading(&gone_set.union(&converted_oids).copied().collect());
    let created_by_migration: BTreeSet<(&str, &str)> = plan
        .views
        .iter()
        .filter(|v| {
            !backup_view_moves
                .iter()
                .any(|(s, l, _)| *s == v.schema && *l == v.name)
        })
        .map(|v| (v.schema.as_str(), v.name.as_str()))
        .collect();
    let backup_view_names: BTreeSet<(&str, &str)> =
        backup_view_moves.iter().map(|(s, _, b)| (*s, *b)).collect();
    let deps: BTreeMap<Oid, BTreeSet<Oid>> = dropped_views
        .values()
        .map(|v| (v.oid, v.depends_on.clone()))
        .collect();
    let recreate: Vec<&LiveView> =
        topological_order(dropped_views.keys().copied().collect(), &deps)
            .iter()
            .map(|o| dropped_views[o])
            .filter(|v| {
                // A view the migration created is not recreated when it read a dropped table.
                let key = (v.schema.as_str(), v.name.as_str());
                let migration_view_of_gone =
                    created_by_migration.contains(&key) && dropped_for_gone.contains_key(&v.oid);
                !restorable.contains(&key)
                    && !backup_view_names.contains(&key)
                    && !migration_view_of_gone
            })
            .collect();
    let restore_views: Vec<(&str, &str, &str)> = backup_view_moves
        .iter()
        .filter(|(s, l, _)| restorable.contains(&(*s, *l)))
        .copied()
        .collect();

    let mut sql: Vec<String> = vec![
        "BEGIN".into(),
        format!(
            "SET LOCAL lock_timeout = '{}ms'",
            opts.locks.lock_timeout.as_millis().max(1)
        ),
    ];
    let mut lock: BTreeSet<String> = BTreeSet::new();
    lock.extend(
        current_drop
            .iter()
            .filter(|n| oid_of.contains_key(*n))
            .map(|n| public(n)),
    );
    lock.extend(backups.iter().map(|(_, b)| public(b)));
    lock.extend(fks_in.iter().map(|f| quote_qualified(&f.schema, &f.table)));
    lock.extend(
        dropped_views
            .values()
            .map(|v| quote_qualified(&v.schema, &v.name)),
    );
    lock.extend(restore_views.iter().map(|(s, _, b)| quote_qualified(s, b)));
    lock.extend(conversions.iter().map(|c| public(&c.table)));
    lock.extend(
        plan.repoints
            .iter()
            .map(|r| quote_qualified(&r.schema, &r.table)),
    );
    sql.push(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        lock.iter().cloned().collect::<Vec<_>>().join(", ")
    ));
    if !dropped_views.is_empty() {
        sql.push(format!(
            "DROP VIEW {}",
            dropped_views
                .values()
                .map(|v| quote_qualified(&v.schema, &v.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Functions the swap recreated over the migration's objects go before those objects; their
    // backup (the original) takes the name back below.
    for f in &plan.functions {
        sql.push(format!("DROP ROUTINE IF EXISTS {}", f.signature));
    }
    // The migration's materialized views read its tables: they go first, dependents first.
    for mv in plan.matviews.iter().rev() {
        sql.push(format!(
            "DROP MATERIALIZED VIEW IF EXISTS {}",
            quote_qualified(&mv.matview.schema, &mv.matview.name)
        ));
    }
    for r in &plan.repoints {
        sql.extend(r.detach.iter().cloned());
    }
    for fk in fks_in.iter().chain(&fks_kept) {
        sql.push(format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name)
        ));
    }
    let dropping: Vec<String> = current_drop
        .iter()
        .filter(|n| oid_of.contains_key(*n))
        .cloned()
        .collect();
    if !dropping.is_empty() {
        sql.push(format!(
            "DROP TABLE {}",
            quote_qualified_list("public", dropping.iter().map(String::as_str))
        ));
    }
    if !kept_backups.is_empty() {
        sql.push(format!(
            "DROP TABLE {}",
            quote_qualified_list("public", kept_backups.iter().map(String::as_str))
        ));
    }
    // Types and free-standing sequences the migration brought in: dropped, or moved aside when a
    // kept table still uses them.
    let kept_sequences = owned_sequences(&control, &kept_oids).await?;
    for m in plan.to_live.iter().filter(|m| {
        matches!(m.kind, ObjectKind::Type | ObjectKind::Sequence) && !kept_sequences.contains(&m.to)
    }) {
        let kw = m.kind.keyword();
        let aside = quote_ident(&prefixed(ROLLEDBACK, &m.to));
        sql.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.{cat} WHERE {col} = {name} AND {ns} = 'public'::regnamespace) THEN \
             BEGIN EXECUTE {drop}; EXCEPTION WHEN dependent_objects_still_exist THEN EXECUTE {rename}; END; END IF; END",
            cat = if m.kind == ObjectKind::Type { "pg_type" } else { "pg_class" },
            col = if m.kind == ObjectKind::Type { "typname" } else { "relname" },
            ns = if m.kind == ObjectKind::Type { "typnamespace" } else { "relnamespace" },
            name = quote_literal(&m.to),
            drop = quote_literal(&format!("DROP {kw} {}", public(&m.to))),
            rename = quote_literal(&format!("ALTER {kw} {} RENAME TO {aside}", public(&m.to))),
        )));
    }
    // Backups take their names back: tables, then their indexes and sequences, types, sequences.
    let restored_backup_names: BTreeSet<&str> = restored.iter().map(|(_, b)| b.as_str()).collect();
    let children = control
        .query(
            "SELECT c.relname::text, x.relname::text FROM pg_class c
             JOIN pg_index i ON i.indrelid = c.oid JOIN pg_class x ON x.oid = i.indexrelid
             WHERE c.oid = ANY($1)
             UNION ALL
             SELECT c.relname::text, s.relname::text FROM pg_class c
             JOIN pg_depend d ON d.refobjid = c.oid AND d.refclassid = 'pg_class'::regclass
                              AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE c.oid = ANY($1)",
            &[&restored_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect backup indexes and sequences", &e))?;
    let mut child_names: BTreeSet<String> =
        children.iter().map(|r| r.get::<_, String>(1)).collect();
    // Indexes of the backup materialized views come back with them.
    let backup_matviews: Vec<String> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::MaterializedView)
        .map(|m| quote_qualified(&m.schema, &m.to))
        .collect();
    if !backup_matviews.is_empty() {
        let rows = control
            .query(
                "SELECT x.relname::text FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
                 WHERE i.indrelid IN (SELECT to_regclass(n) FROM unnest($1::text[]) n)",
                &[&backup_matviews],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect backup materialized views", &e))?;
        child_names.extend(rows.iter().map(|r| r.get::<_, String>(0)));
    }
    let kept_children = owned_sequences(&control, &kept_backup_oids).await?;
    for m in &plan.to_backup {
        let rename = match m.kind {
            ObjectKind::Table => restored_backup_names.contains(m.to.as_str()),
            ObjectKind::Index => child_names.contains(&m.to),
            // Owned by a restored table, or free-standing (a kept backup's went with it).
            ObjectKind::Sequence => child_names.contains(&m.to) || !kept_children.contains(&m.to),
            ObjectKind::Type | ObjectKind::Function | ObjectKind::MaterializedView => true,
            ObjectKind::View => restorable.contains(&(m.schema.as_str(), m.from.as_str())),
        };
        if rename {
            sql.push(m.rename_sql(true));
        }
    }
    for fk in &fks_in {
        sql.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name),
            fk.definition.trim_end_matches(" NOT VALID")
        ));
    }
    for fk in &fks_kept {
        let table = back.get(&fk.table).unwrap_or(&fk.table).to_string();
        sql.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
            public(&table),
            quote_ident(&fk.name),
            back.apply(fk.definition.trim_end_matches(" NOT VALID"))
        ));
    }
    sql.extend(conversion_sql(&conversions));
    for r in &plan.repoints {
        sql.extend(r.attach.iter().cloned());
    }
    for v in &recreate {
        sql.extend(crate::swap::view_sql(&crate::plan::ViewPlan::recreating(v)));
    }
    sql.push(format!(
        "UPDATE pgzm.migrations SET status = 'rolled_back', backup_present = false WHERE id = {}",
        row.id
    ));
    sql.push("COMMIT".into());

    let mut report = RollbackReport {
        timestamp: row.id,
        dry_run: opts.dry_run,
        restored: restored.iter().map(|(l, _)| l.clone()).collect(),
        kept: keep.iter().cloned().collect(),
        dropped: current_drop
            .iter()
            .filter(|n| !backups.iter().any(|(l, _)| l == *n))
            .cloned()
            .collect(),
        statements: sql.clone(),
        attempts: 0,
        warnings: pending_prepares(&control, row.id, &current_drop).await?,
    };
    if opts.dry_run {
        return Ok(report);
    }
    let (attempts, _) = run_with_lock_retry(
        &control,
        &sql.join(";\n"),
        opts.locks,
        "rollback",
        &format!(
            "rollback to backup set {} (rolled back, nothing changed)",
            row.id
        ),
    )
    .await?;
    report.attempts = attempts;
    for fk in fks_in.iter().chain(&fks_kept) {
        let table = if fk.schema == crate::naming::PUBLIC {
            back.get(&fk.table).unwrap_or(&fk.table).to_string()
        } else {
            fk.table.clone()
        };
        let validate = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            quote_qualified(&fk.schema, &table),
            quote_ident(&fk.name)
        );
        if let Err(e) = control.batch_execute(&validate).await {
            report.warnings.push(format!(
                "foreign key \"{}\" on \"{table}\" does not validate after the rollback: {}; it stays NOT VALID until the rows are fixed and you run: {validate}",
                fk.name,
                pgzm_pg::conn::describe(&e)
            ));
        }
    }
    Ok(report)
}

/// Warnings about migrations prepared (or being prepared) against the live tables this rollback
/// replaces: their sync triggers go with the dropped tables, and their plan describes tables that
/// are no longer live, so they must be prepared again before a swap.
async fn pending_prepares(
    control: &Client,
    rolled_back: i64,
    replaced: &[String],
) -> Result<Vec<String>, CoordinatorError> {
    let ids: Vec<i64> = control
        .query(
            "SELECT id FROM pgzm.migrations
             WHERE shadow_present AND status IN ('preparing', 'prepared') AND id <> $1 ORDER BY id",
            &[&rolled_back],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut warnings = Vec::new();
    for id in ids {
        let Some(pending) = state::load(control, Some(id)).await? else {
            continue;
        };
        let synced: Vec<String> = pending
            .plan
            .preserved
            .iter()
            .filter(|p| replaced.contains(&p.table))
            .map(|p| format!("\"{}\"", p.table))
            .collect();
        warnings.push(if synced.is_empty() {
            format!(
                "migration {id} is {} against the tables this rollback replaces: run `pgzm prepare --force` again before swapping it",
                pending.status
            )
        } else {
            format!(
                "migration {id} is {} and keeps {} in sync with triggers on the tables this rollback replaces; those triggers go with them, so its swap will be refused: run `pgzm prepare --force` again",
                pending.status,
                synced.join(", ")
            )
        });
    }
    Ok(warnings)
}

/// A column of a kept table whose type is one the migration brought in and the rollback
/// replaces by the restored type of the same name.
struct Conversion {
    table_oid: Oid,
    table: String,
    column: String,
    /// The type's live name (the restored type's, after the rollback).
    type_name: String,
    /// Whether the column is an array of the type.
    array: bool,
    /// The column default, as read now (schema-qualified, so it names the restored type after
    /// the renames).
    default: Option<String>,
}

/// Columns of the kept tables typed with a migration type that a restored (backup) type
/// replaces. Left alone, they would keep the migration's type under a `rolledback_` name, and
/// values of the kept table would no longer compare with the restored tables' (no operator
/// between two distinct enums).
async fn type_conversions(
    control: &Client,
    plan: &crate::plan::Plan,
    kept_oids: &[Oid],
) -> Result<Vec<Conversion>, CoordinatorError> {
    let replaced: Vec<String> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::Type)
        .filter(|m| {
            plan.to_live
                .iter()
                .any(|l| l.kind == ObjectKind::Type && l.to == m.from)
        })
        .map(|m| m.from.clone())
        .collect();
    if replaced.is_empty() || kept_oids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = control
        .query(
            "SELECT c.oid, c.relname::text, a.attname::text, t.typname::text, a.atttypid = t.typarray,
                    pg_get_expr(d.adbin, d.adrelid)
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_type t ON (t.oid = a.atttypid OR t.typarray = a.atttypid)
                           AND t.typnamespace = 'public'::regnamespace
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = '' AND t.typname = ANY($2)
             ORDER BY c.relname, a.attnum",
            &[&kept_oids, &replaced],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect kept tables' column types", &e))?;
    Ok(rows
        .iter()
        .map(|r| Conversion {
            table_oid: r.get(0),
            table: r.get(1),
            column: r.get(2),
            type_name: r.get(3),
            array: r.get(4),
            default: r.get(5),
        })
        .collect())
}

/// Statements converting kept tables' columns to the restored types (run after the renames):
/// per table, defaults dropped, one ALTER TABLE changing every column (one rewrite), defaults
/// set again; then the migration's types, now unused, are dropped.
fn conversion_sql(conversions: &[Conversion]) -> Vec<String> {
    let mut sql = Vec::new();
    let mut by_table: BTreeMap<&str, Vec<&Conversion>> = BTreeMap::new();
    for c in conversions {
        by_table.entry(&c.table).or_default().push(c);
    }
    for (table, cols) in &by_table {
        let with_default: Vec<&&Conversion> = cols.iter().filter(|c| c.default.is_some()).collect();
        if !with_default.is_empty() {
            sql.push(format!(
                "ALTER TABLE {} {}",
                public(table),
                with_default
                    .iter()
                    .map(|c| format!("ALTER COLUMN {} DROP DEFAULT", quote_ident(&c.column)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        sql.push(format!(
            "ALTER TABLE {} {}",
            public(table),
            cols.iter()
                .map(|c| {
                    let (text, target) = if c.array {
                        ("text[]", format!("{}[]", public(&c.type_name)))
                    } else {
                        ("text", public(&c.type_name))
                    };
                    format!(
                        "ALTER COLUMN {col} TYPE {target} USING {col}::{text}::{target}",
                        col = quote_ident(&c.column)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if !with_default.is_empty() {
            sql.push(format!(
                "ALTER TABLE {} {}",
                public(table),
                with_default
                    .iter()
                    .map(|c| format!(
                        "ALTER COLUMN {} SET DEFAULT {}",
                        quote_ident(&c.column),
                        c.default.as_deref().unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let types: BTreeSet<&str> = conversions.iter().map(|c| c.type_name.as_str()).collect();
    for t in types {
        let aside = prefixed(ROLLEDBACK, t);
        sql.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_type WHERE typname = {name} AND typnamespace = 'public'::regnamespace) THEN \
             BEGIN EXECUTE {drop}; EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END; END IF; END",
            name = quote_literal(&aside),
            drop = quote_literal(&format!("DROP TYPE {}", public(&aside))),
        )));
    }
    sql
}
