//! `pgzm rollback`: put a backup set back in place, in one transaction with the swap's lock
//! strategy.
//!
//! Inside the transaction: the tables the migration brought in are dropped (except those named
//! in `--keep-tables`, which keep their current data), the backup tables — with their indexes,
//! sequences and types — take their live names again, foreign keys of other tables are
//! re-pointed at the restored tables, views are recreated, and the backup set is marked consumed.
//! The rolled-back tables are dropped, not kept: after a rollback nothing `backup_` or
//! `rolledback_` remains, except a type still used by a kept table (renamed `rolledback_…`).

use std::collections::{BTreeMap, BTreeSet};

use pgzm_agent::sql::{quote_ident, quote_literal, quote_qualified};
use serde::Serialize;
use tokio_postgres::Client;

use crate::backup;
use crate::catalog::{topological_order, Oid};
use crate::conninfo::DbUrl;
use crate::ddl::grants_sql;
use crate::destination::{self, LiveView};
use crate::error::CoordinatorError;
use crate::naming::prefixed;
use crate::plan::ObjectKind;
use crate::rewrite::Renames;
use crate::state;
use crate::swap::{run_with_lock_retry, SwapSettings};

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

struct ForeignKey {
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
            table: r.get(0),
            name: r.get(1),
            definition: r.get(2),
        })
        .collect())
}

const FKS_INTO: &str = "
SELECT c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'f' AND k.confrelid = ANY($1) AND NOT (k.conrelid = ANY($2))";

const FKS_FROM: &str = "
SELECT c.relname::text, k.conname::text, pg_get_constraintdef(k.oid)
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
    let keep: BTreeSet<String> = crate::prepare::preserved_names(&opts.keep_tables)
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
    let fks_kept = foreign_keys(&control, FKS_FROM, &restored_oids, &kept_backup_oids).await?;

    // Views. A backup view comes back by renaming it (it reads the restored tables by oid),
    // unless it reads a kept table's backup, which is dropped. Current views that read something
    // dropped (or whose name a restored view takes) are dropped; those the migration did not
    // create are recreated from their current definition, which names the tables by their live
    // names — the restored tables after the renames.
    let dest = destination::read(&control).await?;
    let backup_view_moves: Vec<(&str, &str)> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::View)
        .map(|m| (m.from.as_str(), m.to.as_str()))
        .collect();
    let kept_set: BTreeSet<Oid> = kept_backup_oids.iter().copied().collect();
    let restorable: BTreeSet<&str> = backup_view_moves
        .iter()
        .filter(|(_, b)| {
            dest.views
                .get(*b)
                .is_some_and(|v| v.depends_on.is_disjoint(&kept_set))
        })
        .map(|(live, _)| *live)
        .collect();
    let mut dropped_views: BTreeMap<Oid, &LiveView> = BTreeMap::new();
    let gone_set: BTreeSet<Oid> = gone.iter().copied().collect();
    loop {
        let before = dropped_views.len();
        for v in dest.views.values() {
            if dropped_views.contains_key(&v.oid) {
                continue;
            }
            let restorable_backup = backup_view_moves
                .iter()
                .any(|(l, b)| *b == v.name && restorable.contains(l));
            if restorable_backup {
                continue;
            }
            if restorable.contains(v.name.as_str())
                || v.depends_on
                    .iter()
                    .any(|d| gone_set.contains(d) || dropped_views.contains_key(d))
            {
                dropped_views.insert(v.oid, v);
            }
        }
        if dropped_views.len() == before {
            break;
        }
    }
    let created_by_migration: BTreeSet<&str> = plan
        .views
        .iter()
        .filter(|v| !backup_view_moves.iter().any(|(l, _)| l == &v.name))
        .map(|v| v.name.as_str())
        .collect();
    let backup_view_names: BTreeSet<&str> = backup_view_moves.iter().map(|(_, b)| *b).collect();
    let deps: BTreeMap<Oid, BTreeSet<Oid>> = dropped_views
        .values()
        .map(|v| (v.oid, v.depends_on.clone()))
        .collect();
    let recreate: Vec<&LiveView> =
        topological_order(dropped_views.keys().copied().collect(), &deps)
            .iter()
            .map(|o| dropped_views[o])
            .filter(|v| {
                !restorable.contains(v.name.as_str())
                    && !backup_view_names.contains(v.name.as_str())
                    && !created_by_migration.contains(v.name.as_str())
            })
            .collect();
    let restore_views: Vec<(&str, &str)> = backup_view_moves
        .iter()
        .filter(|(l, _)| restorable.contains(l))
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
            .cloned(),
    );
    lock.extend(backups.iter().map(|(_, b)| b.clone()));
    lock.extend(fks_in.iter().map(|f| f.table.clone()));
    lock.extend(dropped_views.values().map(|v| v.name.clone()));
    lock.extend(restore_views.iter().map(|(_, b)| b.to_string()));
    sql.push(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        lock.iter()
            .map(|n| public(n))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if !dropped_views.is_empty() {
        sql.push(format!(
            "DROP VIEW {}",
            dropped_views
                .values()
                .map(|v| public(&v.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for fk in fks_in.iter().chain(&fks_kept) {
        sql.push(format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            public(&fk.table),
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
            dropping
                .iter()
                .map(|n| public(n))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !kept_backups.is_empty() {
        sql.push(format!(
            "DROP TABLE {}",
            kept_backups
                .iter()
                .map(|n| public(n))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    // Types and free-standing sequences the migration brought in: dropped, or moved aside when a
    // kept table still uses them.
    let kept_oids: Vec<Oid> = keep.iter().filter_map(|k| oid_of.get(k).copied()).collect();
    let kept_sequences: BTreeSet<String> = control
        .query(
            "SELECT s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE d.refobjid = ANY($1) AND d.refclassid = 'pg_class'::regclass
               AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')",
            &[&kept_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect kept tables' sequences", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in plan.to_live.iter().filter(|m| {
        matches!(m.kind, ObjectKind::Type | ObjectKind::Sequence) && !kept_sequences.contains(&m.to)
    }) {
        let kw = m.kind.keyword();
        let aside = quote_ident(&prefixed(ROLLEDBACK, &m.to));
        sql.push(format!(
            "DO $pgzm$ BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.{cat} WHERE {col} = {name} AND {ns} = 'public'::regnamespace) THEN \
             BEGIN EXECUTE {drop}; EXCEPTION WHEN dependent_objects_still_exist THEN EXECUTE {rename}; END; END IF; END $pgzm$",
            cat = if m.kind == ObjectKind::Type { "pg_type" } else { "pg_class" },
            col = if m.kind == ObjectKind::Type { "typname" } else { "relname" },
            ns = if m.kind == ObjectKind::Type { "typnamespace" } else { "relnamespace" },
            name = quote_literal(&m.to),
            drop = quote_literal(&format!("DROP {kw} {}", public(&m.to))),
            rename = quote_literal(&format!("ALTER {kw} {} RENAME TO {aside}", public(&m.to))),
        ));
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
    let child_names: BTreeSet<String> = children.iter().map(|r| r.get::<_, String>(1)).collect();
    let kept_children: BTreeSet<String> = control
        .query(
            "SELECT s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE d.refobjid = ANY($1) AND d.refclassid = 'pg_class'::regclass
               AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')",
            &[&kept_backup_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect backup sequences", &e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in &plan.to_backup {
        let rename = match m.kind {
            ObjectKind::Table => restored_backup_names.contains(m.to.as_str()),
            ObjectKind::Index => child_names.contains(&m.to),
            // Owned by a restored table, or free-standing (a kept backup's went with it).
            ObjectKind::Sequence => child_names.contains(&m.to) || !kept_children.contains(&m.to),
            ObjectKind::Type => true,
            ObjectKind::View => restorable.contains(m.from.as_str()),
        };
        if rename {
            sql.push(format!(
                "ALTER {} {} RENAME TO {}",
                m.kind.keyword(),
                public(&m.to),
                quote_ident(&m.from)
            ));
        }
    }
    for fk in &fks_in {
        sql.push(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
            public(&fk.table),
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
    for v in &recreate {
        let name = v.name.clone();
        let options = if v.options.is_empty() {
            String::new()
        } else {
            format!(" WITH ({})", v.options.join(", "))
        };
        sql.push(format!(
            "CREATE VIEW {}{options} AS {}",
            public(&name),
            v.definition.trim_end().trim_end_matches(';')
        ));
        sql.push(format!(
            "ALTER VIEW {} OWNER TO {}",
            public(&name),
            quote_ident(&v.owner)
        ));
        sql.extend(grants_sql("TABLE", &public(&name), &v.grants));
        if let Some(c) = &v.comment {
            sql.push(format!(
                "COMMENT ON VIEW {} IS {}",
                public(&name),
                quote_literal(c)
            ));
        }
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
        warnings: Vec::new(),
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
        let table = back.get(&fk.table).unwrap_or(&fk.table).to_string();
        let validate = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            public(&table),
            quote_ident(&fk.name)
        );
        if let Err(e) = control.batch_execute(&validate).await {
            report.warnings.push(format!(
                "foreign key \"{}\" on \"{table}\" does not validate after the rollback: {}; it stays NOT VALID until the rows are fixed and you run: {validate}",
                fk.name,
                pgzm_agent::pg::describe(&e)
            ));
        }
    }
    Ok(report)
}
