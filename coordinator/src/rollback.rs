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

use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};
use serde::Serialize;
use tokio_postgres::Client;

use crate::backup;
use crate::catalog::{topological_order, Oid};
use crate::conninfo::DbUrl;
use crate::destination::{self, LiveView, QualName};
use crate::error::CoordinatorError;
use crate::locked::{LockedTransaction, SwapSettings};
use crate::naming::prefixed;
use crate::plan::{ObjectKind, Plan};
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
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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

async fn oids(
    client: &Client,
    names: &[QualName],
) -> Result<BTreeMap<QualName, Oid>, CoordinatorError> {
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
        .map_err(|e| CoordinatorError::destination("inspect tables for the rollback", e))?;
    Ok(rows
        .iter()
        .map(|r| (QualName::from_row(r), r.get("oid")))
        .collect())
}

/// Names of the sequences owned by (serial or identity columns of) the given tables.
async fn owned_sequences(
    client: &Client,
    tables: &[Oid],
) -> Result<BTreeSet<QualName>, CoordinatorError> {
    const OWNED_SEQUENCES: &str = "
        SELECT n.nspname::text AS schema_name, s.relname::text AS name
        FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_namespace n ON n.oid = s.relnamespace
        WHERE d.refobjid = ANY($1) AND d.refclassid = 'pg_class'::regclass
          AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')";
    Ok(client
        .query(OWNED_SEQUENCES, &[&tables])
        .await
        .map_err(|e| CoordinatorError::destination("inspect owned sequences", e))?
        .iter()
        .map(QualName::from_row)
        .collect())
}

struct ForeignKey {
    schema: String,
    table: String,
    name: String,
    definition: String,
}

impl ForeignKey {
    /// A row of [`FKS_INTO`] or [`FKS_FROM`].
    fn from_row(row: &tokio_postgres::Row) -> Self {
        ForeignKey {
            schema: row.get("schema_name"),
            table: row.get("table_name"),
            name: row.get("name"),
            definition: row.get("definition"),
        }
    }
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
        .map_err(|e| CoordinatorError::destination("inspect foreign keys for the rollback", e))?;
    Ok(rows.iter().map(ForeignKey::from_row).collect())
}

const FKS_INTO: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name,
       c.relname::text AS table_name, k.conname::text AS name, pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'f' AND k.confrelid = ANY($1) AND NOT (k.conrelid = ANY($2))";

const FKS_FROM: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name,
       c.relname::text AS table_name, k.conname::text AS name, pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
WHERE k.contype = 'f' AND k.conrelid = ANY($1) AND k.confrelid = ANY($2)";

/// The tables of a backup set, sorted by what the rollback does with them.
struct TableSets {
    /// `--keep-tables`: live tables that keep their current data.
    keep: BTreeSet<QualName>,
    /// Every table of the backup set: (live name, backup name).
    backups: Vec<(QualName, QualName)>,
    /// Backup tables that take their live names again: (live name, backup name).
    restored: Vec<(QualName, QualName)>,
    /// Backups of kept tables: dropped.
    kept_backups: Vec<QualName>,
    /// The migration's live tables that go (all but the kept ones).
    current_drop: Vec<QualName>,
    /// `--keep-tables` names that are not tables of the migration.
    unknown: Vec<String>,
}

impl TableSets {
    fn new(plan: &Plan, keep_tables: &[String]) -> Self {
        let (keep, unknown) = keep_list(plan, keep_tables);
        let backups: Vec<(QualName, QualName)> = plan
            .to_backup
            .iter()
            .filter(|m| m.kind == ObjectKind::Table)
            .map(|m| {
                (
                    QualName::new(m.schema.clone(), m.from.clone()),
                    QualName::new(m.schema.clone(), m.to.clone()),
                )
            })
            .collect();
        let (kept, restored): (Vec<_>, Vec<_>) =
            backups.iter().cloned().partition(|(l, _)| keep.contains(l));
        // By name: the statements must not follow the tables' sizes (statistics).
        let current_drop: BTreeSet<QualName> = plan
            .tables
            .iter()
            .map(|t| t.qualname())
            .filter(|n| !keep.contains(n))
            .collect();
        TableSets {
            kept_backups: kept.into_iter().map(|(_, b)| b).collect(),
            keep,
            backups,
            restored,
            current_drop: current_drop.into_iter().collect(),
            unknown,
        }
    }

    /// Every name whose oid the rollback needs.
    fn names(&self) -> Vec<QualName> {
        self.backups
            .iter()
            .flat_map(|(l, b)| [l.clone(), b.clone()])
            .chain(self.current_drop.iter().cloned())
            .chain(self.keep.iter().cloned())
            .collect()
    }

    /// What makes the rollback impossible: a kept table that is not the migration's or not
    /// live, a backup table that is gone.
    fn problems(&self, id: i64, oid_of: &BTreeMap<QualName, Oid>) -> Vec<String> {
        let mut problems = Vec::new();
        for k in &self.unknown {
            problems.push(format!(
                "--keep-tables: \"{k}\" is not a table of migration {id}"
            ));
        }
        for (_, b) in &self.backups {
            if !oid_of.contains_key(b) {
                problems.push(format!(
                    "backup table {} is missing: the backup set is incomplete (see `pgzm verify`)",
                    b.plain()
                ));
            }
        }
        for k in &self.keep {
            if !oid_of.contains_key(k) {
                problems.push(format!(
                    "--keep-tables: live table {} does not exist",
                    k.plain()
                ));
            }
        }
        problems
    }
}

/// The `--keep-tables` names resolved among the migration's tables (`name`, or `schema.name`;
/// a bare name that tables of several schemas have is not resolved), and those that are not
/// tables of it.
fn keep_list(plan: &Plan, raw: &[String]) -> (BTreeSet<QualName>, Vec<String>) {
    let mut keep = BTreeSet::new();
    let mut unknown = Vec::new();
    for text in crate::naming::table_list(raw) {
        let literal: Vec<QualName> = plan
            .tables
            .iter()
            .filter(|t| t.name == text)
            .map(|t| t.qualname())
            .collect();
        let found = if literal.len() == 1 {
            literal
        } else {
            let (schema, name) = crate::naming::split_table_name(&text);
            plan.tables
                .iter()
                .filter(|t| t.name == name && schema.as_ref().is_none_or(|s| *s == t.schema))
                .map(|t| t.qualname())
                .collect()
        };
        match found.as_slice() {
            [one] => {
                keep.insert(one.clone());
            }
            _ => unknown.push(text),
        }
    }
    (keep, unknown)
}

/// The oids of `names` (those that exist).
fn oids_of<'a>(
    oid_of: &BTreeMap<QualName, Oid>,
    names: impl IntoIterator<Item = &'a QualName>,
) -> Vec<Oid> {
    names
        .into_iter()
        .filter_map(|n| oid_of.get(n).copied())
        .collect()
}

/// What the rollback reads of the destination, once the table sets are known.
struct Facts {
    oid_of: BTreeMap<QualName, Oid>,
    /// Foreign keys of other tables into the tables that go.
    fks_in: Vec<ForeignKey>,
    /// Foreign keys from restored tables into kept tables' backups.
    fks_kept: Vec<ForeignKey>,
    /// Kept tables' columns that change type.
    conversions: Vec<Conversion>,
    /// The destination's views.
    views: BTreeMap<QualName, LiveView>,
    /// Sequences owned by the kept tables.
    kept_sequences: BTreeSet<QualName>,
    /// Indexes and sequences of the restored tables and indexes of backup materialized views.
    child_names: BTreeSet<QualName>,
    /// Sequences owned by the kept tables' backups.
    kept_children: BTreeSet<QualName>,
}

impl Facts {
    async fn read(
        control: &Client,
        plan: &Plan,
        sets: &TableSets,
        oid_of: BTreeMap<QualName, Oid>,
    ) -> Result<Facts, CoordinatorError> {
        let current = oids_of(&oid_of, &sets.current_drop);
        let kept_backups = oids_of(&oid_of, &sets.kept_backups);
        let restored = oids_of(&oid_of, sets.restored.iter().map(|(_, b)| b));
        let kept = oids_of(&oid_of, &sets.keep);
        let gone: Vec<Oid> = current.iter().chain(&kept_backups).copied().collect();
        Ok(Facts {
            fks_in: foreign_keys(control, FKS_INTO, &current, &gone).await?,
            fks_kept: foreign_keys(control, FKS_FROM, &restored, &kept_backups).await?,
            conversions: type_conversions(control, plan, &kept).await?,
            views: destination::read(control, &plan.schemas()).await?.views,
            kept_sequences: owned_sequences(control, &kept).await?,
            child_names: restored_children(control, plan, &restored).await?,
            kept_children: owned_sequences(control, &kept_backups).await?,
            oid_of,
        })
    }
}

/// Names of the restored tables' indexes and owned sequences, and of the backup materialized
/// views' indexes: they take their live names back with their tables.
async fn restored_children(
    control: &Client,
    plan: &Plan,
    restored_oids: &[Oid],
) -> Result<BTreeSet<QualName>, CoordinatorError> {
    let children = control
        .query(
            "SELECT x.relnamespace, x.relname::text AS child_name FROM pg_class c
             JOIN pg_index i ON i.indrelid = c.oid JOIN pg_class x ON x.oid = i.indexrelid
             WHERE c.oid = ANY($1)
             UNION ALL
             SELECT s.relnamespace, s.relname::text AS child_name FROM pg_class c
             JOIN pg_depend d ON d.refobjid = c.oid AND d.refclassid = 'pg_class'::regclass
                              AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE c.oid = ANY($1)",
            &[&restored_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect backup indexes and sequences", e))?;
    let schema_of = |r: &tokio_postgres::Row| {
        let ns: Oid = r.get("relnamespace");
        ns
    };
    let namespaces: Vec<Oid> = children.iter().map(schema_of).collect();
    let nspname: BTreeMap<Oid, String> = control
        .query(
            "SELECT oid, nspname::text FROM pg_namespace WHERE oid = ANY($1)",
            &[&namespaces],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect schemas", e))?
        .iter()
        .map(|r| (r.get("oid"), r.get("nspname")))
        .collect();
    let mut names: BTreeSet<QualName> = children
        .iter()
        .map(|r| {
            QualName::new(
                nspname.get(&schema_of(r)).cloned().unwrap_or_default(),
                r.get::<_, String>("child_name"),
            )
        })
        .collect();
    let backup_matviews: Vec<String> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::MaterializedView)
        .map(|m| quote_qualified(&m.schema, &m.to))
        .collect();
    if !backup_matviews.is_empty() {
        let rows = control
            .query(
                "SELECT n.nspname::text AS schema_name, x.relname::text AS name
                 FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
                 JOIN pg_namespace n ON n.oid = x.relnamespace
                 WHERE i.indrelid IN (SELECT to_regclass(n) FROM unnest($1::text[]) n)",
                &[&backup_matviews],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect backup materialized views", e))?;
        names.extend(rows.iter().map(QualName::from_row));
    }
    Ok(names)
}

/// What happens to views. A backup view comes back by renaming it (it reads the restored
/// tables by oid), unless it reads a kept table's backup, which is dropped. Current views that
/// read something dropped (or whose name a restored view takes) are dropped; those the
/// migration did not create are recreated from their current definition, which names the
/// tables by their live names — the restored tables after the renames. Views reading a kept
/// table whose columns change type are dropped too (ALTER COLUMN TYPE refuses columns a view
/// reads), and always recreated: nothing they read goes away.
struct ViewChanges<'a> {
    /// Dropped at the start, by oid.
    dropped: BTreeMap<Oid, &'a LiveView>,
    /// Recreated at the end, in dependency order.
    recreate: Vec<&'a LiveView>,
    /// Backup views that take their live names again: (schema, live name).
    restorable: BTreeSet<(&'a str, &'a str)>,
    /// Their moves: (schema, live name, backup name).
    restore: Vec<(&'a str, &'a str, &'a str)>,
}

impl<'a> ViewChanges<'a> {
    fn plan(
        plan: &'a Plan,
        views: &'a BTreeMap<QualName, LiveView>,
        kept_backups: &BTreeSet<Oid>,
        gone: &BTreeSet<Oid>,
        converted: &BTreeSet<Oid>,
    ) -> Self {
        // Views by (schema, live name, backup name).
        let moves: Vec<(&str, &str, &str)> = plan
            .to_backup
            .iter()
            .filter(|m| m.kind == ObjectKind::View)
            .map(|m| (m.schema.as_str(), m.from.as_str(), m.to.as_str()))
            .collect();
        let restorable: BTreeSet<(&str, &str)> = moves
            .iter()
            .filter(|(s, _, b)| {
                views
                    .get(&QualName::new(*s, *b))
                    .is_some_and(|v| v.depends_on.is_disjoint(kept_backups))
            })
            .map(|(s, live, _)| (*s, *live))
            .collect();
        // Views that read (transitively) one of `seeds`, or whose name a restored view takes.
        let views_reading = |seeds: &BTreeSet<Oid>| {
            let mut dropped: BTreeMap<Oid, &LiveView> = BTreeMap::new();
            loop {
                let before = dropped.len();
                for v in views.values() {
                    if dropped.contains_key(&v.oid) {
                        continue;
                    }
                    let restorable_backup = moves.iter().any(|(s, l, b)| {
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
        let dropped_for_gone = views_reading(gone);
        let dropped = views_reading(&gone.union(converted).copied().collect());
        let created_by_migration: BTreeSet<(&str, &str)> = plan
            .views
            .iter()
            .filter(|v| !moves.iter().any(|(s, l, _)| *s == v.schema && *l == v.name))
            .map(|v| (v.schema.as_str(), v.name.as_str()))
            .collect();
        let backup_names: BTreeSet<(&str, &str)> = moves.iter().map(|(s, _, b)| (*s, *b)).collect();
        let deps: BTreeMap<Oid, BTreeSet<Oid>> = dropped
            .values()
            .map(|v| (v.oid, v.depends_on.clone()))
            .collect();
        let recreate = topological_order(dropped.keys().copied().collect(), &deps)
            .iter()
            .map(|o| dropped[o])
            .filter(|v| {
                // A view the migration created is not recreated when it read a dropped table.
                let key = (v.schema.as_str(), v.name.as_str());
                let migration_view_of_gone =
                    created_by_migration.contains(&key) && dropped_for_gone.contains_key(&v.oid);
                !restorable.contains(&key)
                    && !backup_names.contains(&key)
                    && !migration_view_of_gone
            })
            .collect();
        let restore = moves
            .iter()
            .filter(|(s, l, _)| restorable.contains(&(*s, *l)))
            .copied()
            .collect();
        ViewChanges {
            dropped,
            recreate,
            restorable,
            restore,
        }
    }
}

/// The rollback transaction, planned from what was read: pure.
fn rollback_transaction(
    plan: &Plan,
    id: i64,
    sets: &TableSets,
    facts: &Facts,
) -> LockedTransaction {
    let oid_of = &facts.oid_of;
    let kept_backup_oids: BTreeSet<Oid> = oids_of(oid_of, &sets.kept_backups).into_iter().collect();
    let gone: BTreeSet<Oid> = oids_of(oid_of, &sets.current_drop)
        .into_iter()
        .chain(kept_backup_oids.iter().copied())
        .collect();
    let converted: BTreeSet<Oid> = facts.conversions.iter().map(|c| c.table_oid).collect();
    let views = ViewChanges::plan(plan, &facts.views, &kept_backup_oids, &gone, &converted);
    let dropping: Vec<&QualName> = sets
        .current_drop
        .iter()
        .filter(|n| oid_of.contains_key(*n))
        .collect();

    let mut tx = LockedTransaction::new();
    let mut lock: BTreeSet<String> = BTreeSet::new();
    lock.extend(dropping.iter().map(|n| n.quoted()));
    lock.extend(sets.backups.iter().map(|(_, b)| b.quoted()));
    lock.extend(
        facts
            .fks_in
            .iter()
            .map(|f| quote_qualified(&f.schema, &f.table)),
    );
    lock.extend(
        views
            .dropped
            .values()
            .map(|v| quote_qualified(&v.schema, &v.name)),
    );
    lock.extend(views.restore.iter().map(|(s, _, b)| quote_qualified(s, b)));
    lock.extend(facts.conversions.iter().map(|c| c.table.quoted()));
    lock.extend(
        plan.repoints
            .iter()
            .map(|r| quote_qualified(&r.schema, &r.table)),
    );
    tx.lock_tables(lock.into_iter().collect());
    if !views.dropped.is_empty() {
        tx.push(format!(
            "DROP VIEW {}",
            views
                .dropped
                .values()
                .map(|v| quote_qualified(&v.schema, &v.name))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    drop_migration_objects(&mut tx, plan, sets, facts, &dropping);
    restore_backups(&mut tx, plan, sets, facts, &views.restorable);
    for fk in &facts.fks_in {
        tx.push(add_not_valid(
            &fk.schema,
            &fk.table,
            &fk.name,
            &fk.definition,
        ));
    }
    let back = back_renames(plan);
    for fk in &facts.fks_kept {
        let table = back.get_in(&fk.schema, &fk.table).unwrap_or(&fk.table);
        tx.push(add_not_valid(
            &fk.schema,
            table,
            &fk.name,
            &back.apply(&fk.definition),
        ));
    }
    tx.extend(conversion_sql(&facts.conversions));
    for r in &plan.repoints {
        tx.extend(r.attach.iter().cloned());
    }
    for v in &views.recreate {
        tx.extend(crate::swap::view_sql(&crate::plan::ViewPlan::recreating(v)));
    }
    // A schema the migration created held only its objects, gone now.
    tx.extend(
        plan.schemas_to_create
            .iter()
            .map(|s| state::drop_schema_if_empty(s)),
    );
    tx.push(format!(
        "UPDATE pgzm.migrations SET status = 'rolled_back', backup_present = false WHERE id = {id}"
    ));
    tx
}

/// The oid of schema `schema` in a catalog condition: `'public'::regnamespace` as before
/// schemas were chosen (the goldens), a lookup by name elsewhere.
fn namespace_oid(schema: &str) -> String {
    if schema == crate::naming::PUBLIC {
        "'public'::regnamespace".to_string()
    } else {
        format!(
            "(SELECT oid FROM pg_catalog.pg_namespace WHERE nspname = {})",
            quote_literal(schema)
        )
    }
}

/// Names after the rollback, for rewriting definitions read now.
fn back_renames(plan: &Plan) -> Renames {
    let mut back = Renames::new();
    for m in &plan.to_backup {
        back.insert_in(&m.schema, &m.to, &m.from);
    }
    back
}

fn add_not_valid(schema: &str, table: &str, name: &str, definition: &str) -> String {
    format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
        quote_qualified(schema, table),
        quote_ident(name),
        definition.trim_end_matches(" NOT VALID")
    )
}

/// What the migration brought in goes: functions the swap recreated over its objects (their
/// backups, the originals, take the name back), its materialized views, re-pointed and other
/// foreign keys, its tables and the kept tables' backups, and its types and free-standing
/// sequences (moved aside instead when a kept table still uses them).
fn drop_migration_objects(
    tx: &mut LockedTransaction,
    plan: &Plan,
    sets: &TableSets,
    facts: &Facts,
    dropping: &[&QualName],
) {
    for f in &plan.functions {
        tx.push(format!("DROP ROUTINE IF EXISTS {}", f.signature));
    }
    // The migration's materialized views read its tables: they go first, dependents first.
    for mv in plan.matviews.iter().rev() {
        tx.push(format!(
            "DROP MATERIALIZED VIEW IF EXISTS {}",
            quote_qualified(&mv.matview.schema, &mv.matview.name)
        ));
    }
    for r in &plan.repoints {
        tx.extend(r.detach.iter().cloned());
    }
    for fk in facts.fks_in.iter().chain(&facts.fks_kept) {
        tx.push(format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name)
        ));
    }
    for tables in [dropping.to_vec(), sets.kept_backups.iter().collect()] {
        if !tables.is_empty() {
            tx.push(format!(
                "DROP TABLE {}",
                tables
                    .iter()
                    .map(|n| n.quoted())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for m in plan.to_live.iter().filter(|m| {
        matches!(m.kind, ObjectKind::Type | ObjectKind::Sequence)
            && !facts
                .kept_sequences
                .contains(&QualName::new(m.schema.clone(), m.to.clone()))
    }) {
        let kw = m.kind.keyword();
        let aside = quote_ident(&prefixed(ROLLEDBACK, &m.to));
        let (cat, col, ns) = if m.kind == ObjectKind::Type {
            ("pg_type", "typname", "typnamespace")
        } else {
            ("pg_class", "relname", "relnamespace")
        };
        tx.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.{cat} WHERE {col} = {name} AND {ns} = {}) THEN \
             BEGIN EXECUTE {drop}; EXCEPTION WHEN dependent_objects_still_exist THEN EXECUTE {rename}; END; END IF; END",
            namespace_oid(&m.schema),
            name = quote_literal(&m.to),
            drop = quote_literal(&format!("DROP {kw} {}", m.qualified_to())),
            rename = quote_literal(&format!("ALTER {kw} {} RENAME TO {aside}", m.qualified_to())),
        )));
    }
}

/// Backups take their names back: tables, then their indexes and sequences, types, sequences,
/// functions, materialized views and the restorable views.
fn restore_backups(
    tx: &mut LockedTransaction,
    plan: &Plan,
    sets: &TableSets,
    facts: &Facts,
    restorable_views: &BTreeSet<(&str, &str)>,
) {
    let restored: BTreeSet<&QualName> = sets.restored.iter().map(|(_, b)| b).collect();
    for m in &plan.to_backup {
        let to = QualName::new(m.schema.clone(), m.to.clone());
        let rename = match m.kind {
            ObjectKind::Table => restored.contains(&to),
            ObjectKind::Index => facts.child_names.contains(&to),
            // Owned by a restored table, or free-standing (a kept backup's went with it).
            ObjectKind::Sequence => {
                facts.child_names.contains(&to) || !facts.kept_children.contains(&to)
            }
            ObjectKind::Type | ObjectKind::Function | ObjectKind::MaterializedView => true,
            ObjectKind::View => restorable_views.contains(&(m.schema.as_str(), m.from.as_str())),
        };
        if rename {
            tx.push(m.rename_sql(true));
        }
    }
}

/// `pgzm rollback`: reads the backup set and the destination, plans the transaction, runs it
/// with the swap's lock strategy, then validates the foreign keys it added `NOT VALID`.
pub async fn rollback(opts: RollbackOptions) -> Result<RollbackReport, CoordinatorError> {
    let control = opts.destination.connect("pgzm-coordinator").await?;
    if !state::try_lock(&control).await? {
        return Err(CoordinatorError::Busy);
    }
    control
        .batch_execute("SET search_path = pg_catalog")
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", e))?;
    let row = backup::find(&control, opts.migration_id).await?;
    let plan = &row.plan;
    let sets = TableSets::new(plan, &opts.keep_tables);
    let oid_of = oids(&control, &sets.names()).await?;
    let problems = sets.problems(row.id, &oid_of);
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    let facts = Facts::read(&control, plan, &sets, oid_of).await?;
    let tx = rollback_transaction(plan, row.id, &sets, &facts);
    let mut report = RollbackReport {
        timestamp: row.id,
        dry_run: opts.dry_run,
        restored: sets
            .restored
            .iter()
            .map(|(l, _)| l.display_name())
            .collect(),
        kept: sets.keep.iter().map(QualName::display_name).collect(),
        dropped: sets
            .current_drop
            .iter()
            .filter(|n| !sets.backups.iter().any(|(l, _)| l == *n))
            .map(QualName::display_name)
            .collect(),
        statements: tx.statements(opts.locks.lock_timeout),
        attempts: 0,
        warnings: pending_prepares(&control, row.id, &sets.current_drop).await?,
    };
    if opts.dry_run {
        return Ok(report);
    }
    let (attempts, _) = tx
        .run(
            &control,
            opts.locks,
            "rollback",
            &format!(
                "rollback to backup set {} (rolled back, nothing changed)",
                row.id
            ),
        )
        .await?;
    report.attempts = attempts;
    let back = back_renames(plan);
    for fk in facts.fks_in.iter().chain(&facts.fks_kept) {
        let table = QualName::new(
            fk.schema.clone(),
            back.get_in(&fk.schema, &fk.table).unwrap_or(&fk.table),
        );
        let validate = format!(
            "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
            quote_ident(&fk.name)
        );
        if let Err(e) = control.batch_execute(&validate).await {
            report.warnings.push(format!(
                "foreign key \"{}\" on {} does not validate after the rollback: {}; it stays NOT VALID until the rows are fixed and you run: {validate}",
                fk.name,
                table.plain(),
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
    replaced: &[QualName],
) -> Result<Vec<String>, CoordinatorError> {
    let ids: Vec<i64> = control
        .query(
            "SELECT id FROM pgzm.migrations
             WHERE shadow_present AND status IN ('preparing', 'prepared') AND id <> $1 ORDER BY id",
            &[&rolled_back],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .iter()
        .map(|r| r.get("id"))
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
            .filter(|p| replaced.contains(&p.qualname()))
            .map(|p| p.qualname().plain())
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
    table: QualName,
    column: String,
    /// The type's live name (the restored type's, after the rollback).
    type_name: QualName,
    /// Whether the column is an array of the type.
    array: bool,
    /// The column default, as read now (schema-qualified, so it names the restored type after
    /// the renames).
    default: Option<String>,
}

impl Conversion {
    /// A row of the query of [`type_conversions`].
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Conversion {
            table_oid: row.get("table_oid"),
            table: QualName::from_columns(row, "schema_name", "table_name"),
            column: row.get("column_name"),
            type_name: QualName::from_columns(row, "type_schema", "type_name"),
            array: row.get("is_array"),
            default: row.get("default_expr"),
        }
    }
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
    let replaced: Vec<&crate::plan::Move> = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::Type)
        .filter(|m| {
            plan.to_live
                .iter()
                .any(|l| l.kind == ObjectKind::Type && l.to == m.from && l.schema == m.schema)
        })
        .collect();
    let schemas: Vec<&str> = replaced.iter().map(|m| m.schema.as_str()).collect();
    let replaced: Vec<&str> = replaced.iter().map(|m| m.from.as_str()).collect();
    if replaced.is_empty() || kept_oids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = control
        .query(
            "SELECT c.oid AS table_oid, cn.nspname::text AS schema_name, c.relname::text AS table_name,
                    a.attname::text AS column_name, tn.nspname::text AS type_schema,
                    t.typname::text AS type_name, a.atttypid = t.typarray AS is_array,
                    pg_get_expr(d.adbin, d.adrelid) AS default_expr
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace cn ON cn.oid = c.relnamespace
             JOIN pg_type t ON (t.oid = a.atttypid OR t.typarray = a.atttypid)
             JOIN pg_namespace tn ON tn.oid = t.typnamespace
             JOIN unnest($2::text[], $3::text[]) w(s, n) ON w.s = tn.nspname AND w.n = t.typname
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = ''
             ORDER BY cn.nspname, c.relname, a.attnum",
            &[&kept_oids, &schemas, &replaced],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect kept tables' column types", e))?;
    Ok(rows.iter().map(Conversion::from_row).collect())
}

/// Statements converting kept tables' columns to the restored types (run after the renames):
/// per table, defaults dropped, one ALTER TABLE changing every column (one rewrite), defaults
/// set again; then the migration's types, now unused, are dropped.
fn conversion_sql(conversions: &[Conversion]) -> Vec<String> {
    let mut sql = Vec::new();
    let mut by_table: BTreeMap<&QualName, Vec<&Conversion>> = BTreeMap::new();
    for c in conversions {
        by_table.entry(&c.table).or_default().push(c);
    }
    for (table, cols) in &by_table {
        let with_default: Vec<&&Conversion> = cols.iter().filter(|c| c.default.is_some()).collect();
        if !with_default.is_empty() {
            sql.push(format!(
                "ALTER TABLE {table} {}",
                with_default
                    .iter()
                    .map(|c| format!("ALTER COLUMN {} DROP DEFAULT", quote_ident(&c.column)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        sql.push(format!(
            "ALTER TABLE {table} {}",
            cols.iter()
                .map(|c| {
                    let (text, target) = if c.array {
                        ("text[]", format!("{}[]", c.type_name))
                    } else {
                        ("text", c.type_name.quoted())
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
                "ALTER TABLE {table} {}",
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
    let types: BTreeSet<&QualName> = conversions.iter().map(|c| &c.type_name).collect();
    for t in types {
        let aside = t.sibling(prefixed(ROLLEDBACK, &t.name));
        sql.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF EXISTS (SELECT 1 FROM pg_catalog.pg_type WHERE typname = {name} AND typnamespace = {}) THEN \
             BEGIN EXECUTE {drop}; EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END; END IF; END",
            namespace_oid(&t.schema),
            name = quote_literal(&aside.name),
            drop = quote_literal(&format!("DROP TYPE {aside}")),
        )));
    }
    sql
}
