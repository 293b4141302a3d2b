//! `pgzm rollback`: put a backup set back in place, in one transaction with the swap's lock
//! strategy.
//!
//! Inside the transaction: the tables the migration brought in are moved aside (renamed
//! `rolledback_<id>_<name>`, except those named in `--keep-tables`, which keep their current
//! data), with their indexes and sequences, its types and materialized views, and the backups of
//! kept tables; the backup tables — with their indexes, sequences and types — take their live
//! names again, foreign keys of other tables are re-pointed at the restored tables, views are
//! recreated, and the backup set is marked consumed. As in the swap, index and type renames go
//! before the `LOCK TABLE` (they take no lock queries conflict with), so under the locks only
//! renames and the few statements that re-point dependents are left: no `DROP TABLE` (which
//! locks and unlinks every index and TOAST table) and no procedural block.
//!
//! What was moved aside is recorded (`pgzm.rolled_back_objects`) in the same transaction and
//! dropped after the commit in batches ([`state::drop_rolled_back`]), each transaction with the
//! same lock strategy, locking only objects production no longer uses; a crash in between
//! leaves the record, and the next `pgzm rollback`, `pgzm cleanup` or `pgzm prepare` finishes
//! it. After a rollback nothing `backup_` or `rolledback_` remains. A kept table's columns typed
//! with a migration type that a restored type of the same name replaces are converted to the
//! restored type in the same transaction (one rewrite of the kept table; views reading it are
//! recreated), so kept and restored tables share one type again; this fails — changing nothing
//! — if a kept row holds a value the restored type lacks. Only a type (or sequence) the
//! migration introduced that a kept table still uses stays, renamed `rolledback_<name>`.
//!
//! Before anything, the locks the transaction takes are counted against the server's lock
//! table ([`LockBudget`]): a rollback that cannot fit is refused, saying what to raise.

use std::collections::{BTreeMap, BTreeSet};

use pgzm_pg::sql::{quote_ident, quote_qualified};
use serde::Serialize;
use tokio_postgres::Client;

use crate::backup;
use crate::catalog::{topological_order, Oid};
use crate::conninfo::DbUrl;
use crate::destination::{self, LiveView, QualName};
use crate::error::CoordinatorError;
use crate::locked::{LockBudget, LockedTransaction, SwapSettings};
use crate::naming::prefixed;
use crate::plan::{ObjectKind, Plan};
use crate::rewrite::Renames;
use crate::state::{self, AsideKind, RolledBackObject};

/// Prefix of objects moved aside by a rollback: `rolledback_<id>_<name>` until they are
/// dropped after its commit, `rolledback_<name>` for a type or sequence kept because something
/// still uses it.
pub const ROLLEDBACK: &str = "rolledback_";

/// The name a rollback of migration `id` moves `name` aside to.
pub fn aside_name(id: i64, name: &str) -> String {
    prefixed(&format!("{ROLLEDBACK}{id}_"), name)
}

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

/// Foreign keys of the tables that go (`$1`) into tables that stay: dropped under the locks
/// (their triggers on the referenced table would otherwise go on checking the aside table).
const FKS_OUT: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name,
       c.relname::text AS table_name, k.conname::text AS name, pg_get_constraintdef(k.oid) AS definition,
       (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = r.relnamespace) AS referenced_schema,
       r.relname::text AS referenced_table
FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_class r ON r.oid = k.confrelid
WHERE k.contype = 'f' AND k.conparentid = 0 AND k.conrelid = ANY($1) AND NOT (k.confrelid = ANY($2))
ORDER BY 1, 2, 3";

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

/// A relation or type of the migration's side that the rollback moves aside.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Aside {
    oid: Oid,
    /// Its name now.
    name: QualName,
    /// The name it is moved to.
    to: String,
}

impl Aside {
    fn rename_sql(&self, keyword: &str) -> String {
        format!(
            "ALTER {keyword} {} RENAME TO {}",
            self.name,
            quote_ident(&self.to)
        )
    }

    fn record(&self, id: i64, kind: AsideKind) -> RolledBackObject {
        RolledBackObject {
            migration_id: id,
            kind,
            schema: self.name.schema.to_string(),
            name: self.to.clone(),
            live: self.name.name.to_string(),
            oid: self.oid,
        }
    }
}

/// Everything the rollback moves aside, read in one query.
#[derive(Debug, Default)]
struct AsideSet {
    /// The migration's tables that go and the kept tables' backups (renamed under the locks).
    tables: Vec<Aside>,
    /// The migration's materialized views (renamed under the locks, which their renames take).
    matviews: Vec<Aside>,
    /// Indexes of all of those (renamed before the locks).
    indexes: Vec<Aside>,
    /// Sequences they own (renamed under the locks, dropped with their tables).
    owned_sequences: Vec<Aside>,
    /// The migration's other sequences (renamed under the locks).
    sequences: Vec<Aside>,
    /// The migration's types (renamed before the locks).
    types: Vec<Aside>,
}

const ASIDE: &str = "
WITH mv AS (
    SELECT c.oid FROM unnest($2::text[], $3::text[]) w(s, n)
    JOIN pg_namespace ns ON ns.nspname = w.s
    JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = w.n AND c.relkind = 'm'
), roots AS (
    SELECT unnest($1::oid[]) AS oid UNION SELECT oid FROM mv
)
SELECT 'root' AS part, c.oid, c.relkind::text AS relkind, ns.nspname::text AS schema_name, c.relname::text AS name
  FROM roots r JOIN pg_class c ON c.oid = r.oid JOIN pg_namespace ns ON ns.oid = c.relnamespace
UNION ALL
SELECT 'index', x.oid, x.relkind::text, ns.nspname::text, x.relname::text
  FROM pg_index i JOIN roots r ON r.oid = i.indrelid JOIN pg_class x ON x.oid = i.indexrelid
  JOIN pg_namespace ns ON ns.oid = x.relnamespace
UNION ALL
SELECT 'owned', s.oid, 'S', ns.nspname::text, s.relname::text
  FROM pg_depend d JOIN roots r ON r.oid = d.refobjid
  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' JOIN pg_namespace ns ON ns.oid = s.relnamespace
 WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
UNION ALL
SELECT 'sequence', c.oid, 'S', ns.nspname::text, c.relname::text FROM unnest($4::text[], $5::text[]) w(s, n)
  JOIN pg_namespace ns ON ns.nspname = w.s
  JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = w.n AND c.relkind = 'S'
UNION ALL
SELECT 'type', t.oid, t.typtype::text, ns.nspname::text, t.typname::text FROM unnest($6::text[], $7::text[]) w(s, n)
  JOIN pg_namespace ns ON ns.nspname = w.s JOIN pg_type t ON t.typnamespace = ns.oid AND t.typname = w.n
ORDER BY 4, 5";

/// The names in `names` (schema, name) taken by a relation or a type.
const TAKEN: &str = "
SELECT w.s AS schema_name, w.n AS name FROM unnest($1::text[], $2::text[]) w(s, n)
 WHERE EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
               WHERE ns.nspname = w.s AND c.relname = w.n)
    OR EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace ns ON ns.oid = t.typnamespace
               WHERE ns.nspname = w.s AND t.typname = w.n)";

impl AsideSet {
    /// Reads what goes aside: the tables `roots` (the migration's that go and the kept
    /// tables' backups), the migration's materialized views, the indexes and owned sequences of
    /// all of them, and the migration's other sequences and types (by name; those that exist).
    async fn read(
        control: &Client,
        id: i64,
        plan: &Plan,
        roots: &[Oid],
        kept_sequences: &BTreeSet<QualName>,
    ) -> Result<AsideSet, CoordinatorError> {
        let matviews: Vec<(&str, &str)> = plan
            .matviews
            .iter()
            .map(|m| (m.matview.schema.as_str(), m.matview.name.as_str()))
            .collect();
        let named = |kind: ObjectKind| -> Vec<(&str, &str)> {
            plan.to_live
                .iter()
                .filter(|m| m.kind == kind)
                .filter(|m| {
                    !kept_sequences.contains(&QualName::new(m.schema.clone(), m.to.clone()))
                })
                .map(|m| (m.schema.as_str(), m.to.as_str()))
                .collect()
        };
        let (sequences, types) = (named(ObjectKind::Sequence), named(ObjectKind::Type));
        let column = |v: &[(&str, &str)], first: bool| -> Vec<String> {
            v.iter()
                .map(|(s, n)| if first { s } else { n }.to_string())
                .collect()
        };
        let rows = control
            .query(
                ASIDE,
                &[
                    &roots,
                    &column(&matviews, true),
                    &column(&matviews, false),
                    &column(&sequences, true),
                    &column(&sequences, false),
                    &column(&types, true),
                    &column(&types, false),
                ],
            )
            .await
            .map_err(|e| {
                CoordinatorError::destination("inspect what the rollback moves aside", e)
            })?;
        let mut set = AsideSet::default();
        let mut seen: BTreeSet<(bool, Oid)> = BTreeSet::new();
        // Owned sequences first: a migration sequence owned by a table goes with it.
        let mut rows: Vec<&tokio_postgres::Row> = rows.iter().collect();
        rows.sort_by_key(|r| r.get::<_, &str>("part") != "owned");
        for r in rows {
            let part: &str = r.get("part");
            let oid: Oid = r.get("oid");
            if !seen.insert((part == "type", oid)) {
                continue;
            }
            let name = QualName::from_row(r);
            let aside = Aside {
                oid,
                to: aside_name(id, &name.name),
                name,
            };
            match (part, r.get::<_, &str>("relkind")) {
                ("root", "m") => set.matviews.push(aside),
                ("root", _) => set.tables.push(aside),
                ("index", _) => set.indexes.push(aside),
                ("owned", _) => set.owned_sequences.push(aside),
                ("sequence", _) => set.sequences.push(aside),
                _ => set.types.push(aside),
            }
        }
        for v in [
            &mut set.tables,
            &mut set.matviews,
            &mut set.indexes,
            &mut set.owned_sequences,
            &mut set.sequences,
            &mut set.types,
        ] {
            v.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Ok(set)
    }

    /// Relations whose names change under the locks.
    fn relations_under_locks(&self) -> impl Iterator<Item = &Aside> {
        self.tables
            .iter()
            .chain(&self.matviews)
            .chain(&self.owned_sequences)
            .chain(&self.sequences)
    }

    /// What the rollback's transaction records to drop after its commit.
    fn records(&self, id: i64, schemas: &[String]) -> Vec<RolledBackObject> {
        let mut out = Vec::new();
        out.extend(
            self.matviews
                .iter()
                .map(|a| a.record(id, AsideKind::MaterializedView)),
        );
        out.extend(self.tables.iter().map(|a| a.record(id, AsideKind::Table)));
        out.extend(
            self.sequences
                .iter()
                .map(|a| a.record(id, AsideKind::Sequence)),
        );
        out.extend(self.types.iter().map(|a| a.record(id, AsideKind::Type)));
        out.extend(schemas.iter().map(|s| RolledBackObject {
            migration_id: id,
            kind: AsideKind::Schema,
            schema: s.clone(),
            name: s.clone(),
            live: s.clone(),
            oid: 0,
        }));
        out
    }

    /// Every aside name that is taken already (by an object pgzm did not put there), or
    /// that two objects would share: the rollback refuses before any change.
    async fn problems(&self, control: &Client) -> Result<Vec<String>, CoordinatorError> {
        let all: Vec<(&str, &Aside)> = [
            ("table", &self.tables),
            ("materialized view", &self.matviews),
            ("index", &self.indexes),
            ("sequence", &self.owned_sequences),
            ("sequence", &self.sequences),
            ("type", &self.types),
        ]
        .into_iter()
        .flat_map(|(kind, v)| v.iter().map(move |a| (kind, a)))
        .collect();
        let schemas: Vec<&str> = all.iter().map(|(_, a)| a.name.schema.as_str()).collect();
        let names: Vec<&str> = all.iter().map(|(_, a)| a.to.as_str()).collect();
        let taken: BTreeSet<QualName> = control
            .query(TAKEN, &[&schemas, &names])
            .await
            .map_err(|e| CoordinatorError::destination("check the names the rollback takes", e))?
            .iter()
            .map(QualName::from_row)
            .collect();
        let mut seen = BTreeSet::new();
        let mut problems = Vec::new();
        for (kind, a) in &all {
            let to = a.name.sibling(a.to.clone());
            if taken.contains(&to) || !seen.insert(to.clone()) {
                problems.push(format!(
                    "the rollback moves {kind} {} aside as {}, but that name is taken: rename or drop what holds it, then run the rollback again",
                    a.name.plain(),
                    to.plain()
                ));
            }
        }
        Ok(problems)
    }
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
    /// Indexes and sequences of the restored tables and indexes of backup materialized views.
    child_names: BTreeSet<QualName>,
    /// Sequences owned by the kept tables' backups.
    kept_children: BTreeSet<QualName>,
    /// Foreign keys of the tables that go into tables that stay, with the table referenced.
    fks_out: Vec<(ForeignKey, QualName)>,
    /// What goes aside.
    aside: AsideSet,
    /// The functions the swap recreated over the migration's objects that exist.
    functions: Vec<RecreatedFunction>,
    /// The backup functions that exist, by oid: their signatures now.
    backup_functions: BTreeMap<Oid, String>,
}

/// The signatures (`regprocedure` text, qualified) of the backup functions of `plan` that are
/// still the recorded ones (same oid, same name), by oid.
async fn backup_functions(
    control: &Client,
    plan: &Plan,
) -> Result<BTreeMap<Oid, String>, CoordinatorError> {
    let (oids, names): (Vec<Oid>, Vec<&str>) = plan
        .to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::Function)
        .filter_map(|m| Some((m.oid?, m.to.as_str())))
        .unzip();
    if oids.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(control
        .query(
            "SELECT p.oid, p.oid::regprocedure::text AS signature
             FROM unnest($1::oid[], $2::text[]) w(o, n) JOIN pg_proc p ON p.oid = w.o AND p.proname = w.n",
            &[&oids, &names],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect the backup functions", e))?
        .iter()
        .map(|r| (r.get("oid"), r.get("signature")))
        .collect())
}

/// A function the swap recreated over the migration's objects: moved aside before the locks
/// (its backup, the original, takes the name back there too), dropped under them once the
/// views calling it are gone.
struct RecreatedFunction {
    /// Its signature now (`regprocedure` text, as the plan recorded it).
    signature: String,
    /// Its schema.
    schema: String,
    /// The name it is moved aside to.
    aside: String,
    /// Its arguments (`pg_get_function_identity_arguments`, qualified), naming types as
    /// before the rollback.
    arguments: String,
}

impl RecreatedFunction {
    /// Those of `plan` that exist, read in one query.
    async fn read(
        control: &Client,
        id: i64,
        plan: &Plan,
    ) -> Result<Vec<RecreatedFunction>, CoordinatorError> {
        let signatures: Vec<&str> = plan
            .functions
            .iter()
            .map(|f| f.signature.as_str())
            .collect();
        if signatures.is_empty() {
            return Ok(Vec::new());
        }
        let rows = control
            .query(
                "SELECT w.s AS signature, n.nspname::text AS schema_name, p.proname::text AS name,
                        pg_get_function_identity_arguments(p.oid) AS arguments
                 FROM unnest($1::text[]) WITH ORDINALITY w(s, i)
                 JOIN pg_proc p ON p.oid = to_regprocedure(w.s)
                 JOIN pg_namespace n ON n.oid = p.pronamespace ORDER BY w.i",
                &[&signatures],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect the recreated functions", e))?;
        Ok(rows
            .iter()
            .map(|r| RecreatedFunction {
                signature: r.get("signature"),
                schema: r.get("schema_name"),
                aside: aside_name(id, r.get("name")),
                arguments: r.get("arguments"),
            })
            .collect())
    }
}

impl Facts {
    async fn read(
        control: &Client,
        id: i64,
        plan: &Plan,
        sets: &TableSets,
        oid_of: BTreeMap<QualName, Oid>,
        views: BTreeMap<QualName, LiveView>,
    ) -> Result<Facts, CoordinatorError> {
        let current = oids_of(&oid_of, &sets.current_drop);
        let kept_backups = oids_of(&oid_of, &sets.kept_backups);
        let restored = oids_of(&oid_of, sets.restored.iter().map(|(_, b)| b));
        let kept = oids_of(&oid_of, &sets.keep);
        let gone: Vec<Oid> = current.iter().chain(&kept_backups).copied().collect();
        let kept_sequences = owned_sequences(control, &kept).await?;
        let fks_out = control
            .query(FKS_OUT, &[&gone, &gone])
            .await
            .map_err(|e| CoordinatorError::destination("inspect foreign keys for the rollback", e))?
            .iter()
            .map(|r| {
                (
                    ForeignKey::from_row(r),
                    QualName::from_columns(r, "referenced_schema", "referenced_table"),
                )
            })
            .collect();
        Ok(Facts {
            fks_in: foreign_keys(control, FKS_INTO, &current, &gone).await?,
            fks_kept: foreign_keys(control, FKS_FROM, &restored, &kept_backups).await?,
            conversions: type_conversions(control, plan, &kept).await?,
            views,
            aside: AsideSet::read(control, id, plan, &gone, &kept_sequences).await?,
            functions: RecreatedFunction::read(control, id, plan).await?,
            backup_functions: backup_functions(control, plan).await?,
            child_names: restored_children(control, plan, &restored).await?,
            kept_children: owned_sequences(control, &kept_backups).await?,
            fks_out,
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

/// The rollback's transaction, planned: its statements, what it records to drop after its
/// commit, and about how many locks it takes at once.
struct Planned {
    tx: LockedTransaction,
    record: Vec<RolledBackObject>,
    locks: i64,
}

/// The server clock when the locks were granted (microseconds), read back from the batch;
/// with the clock read right after the commit, the lock window (logged, as the swap's).
const LOCKED_MARKER: &str =
    "SELECT 'locked', (extract(epoch FROM clock_timestamp()) * 1000000)::int8";

/// The value of marker `name` (a row `name, value`) among the batch's messages.
fn marker(messages: &[tokio_postgres::SimpleQueryMessage], name: &str) -> Option<i64> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some(name) => {
            row.get(1).and_then(|v| v.parse().ok())
        }
        _ => None,
    })
}

/// Locks each dropped or added foreign key takes beyond its tables' (the constraint, its
/// triggers; the referenced table's indexes when added).
const LOCKS_PER_FOREIGN_KEY: i64 = 5;
/// Locks of a kept table's rewrite (its indexes, TOAST table and index) beyond the table's.
const LOCKS_PER_CONVERSION: i64 = 8;

/// The rollback transaction, planned from what was read: pure.
///
/// Before the locks: the migration recorded rolled back, with what it moves aside; the
/// migration's indexes and types moved aside, the backups' indexes and types renamed back.
/// Then `LOCK TABLE` in sorted order. Under the locks: views reading what goes are dropped,
/// recreated functions dropped, foreign keys into (and out of) what goes dropped, tables,
/// materialized views and sequences moved aside, backups renamed back, foreign keys added
/// again `NOT VALID`, kept tables' columns converted, dependents re-pointed, views recreated.
fn rollback_transaction(plan: &Plan, id: i64, sets: &TableSets, facts: &Facts) -> Planned {
    let oid_of = &facts.oid_of;
    let aside = &facts.aside;
    let kept_backup_oids: BTreeSet<Oid> = oids_of(oid_of, &sets.kept_backups).into_iter().collect();
    let gone: BTreeSet<Oid> = oids_of(oid_of, &sets.current_drop)
        .into_iter()
        .chain(kept_backup_oids.iter().copied())
        .collect();
    let converted: BTreeSet<Oid> = facts.conversions.iter().map(|c| c.table_oid).collect();
    let views = ViewChanges::plan(plan, &facts.views, &kept_backup_oids, &gone, &converted);
    let record = aside.records(id, &plan.schemas_to_create);
    let mut locks = crate::locked::TRANSACTION_LOCKS;

    let mut tx = LockedTransaction::new();
    // Before the locks: pgzm's own record, then renames that take no lock queries conflict
    // with.
    tx.push(format!(
        "UPDATE pgzm.migrations SET status = 'rolled_back', backup_present = false WHERE id = {id}"
    ));
    if let Some(sql) = state::record_rolled_back_sql(&record) {
        tx.push(sql);
    }
    // Functions first, while their signatures still name the types they were read with.
    tx.extend(facts.functions.iter().map(|f| {
        format!(
            "ALTER ROUTINE {} RENAME TO {}",
            f.signature,
            quote_ident(&f.aside)
        )
    }));
    let (before, under) = restore_moves(plan, sets, facts, &views.restorable);
    let (functions, before): (Vec<&crate::plan::Move>, Vec<&crate::plan::Move>) = before
        .into_iter()
        .partition(|m| m.kind == ObjectKind::Function);
    // Backup functions by their signatures now (read before; no type is renamed yet).
    tx.extend(functions.iter().map(
        |m| match m.oid.and_then(|o| facts.backup_functions.get(&o)) {
            Some(signature) => format!(
                "ALTER ROUTINE {signature} RENAME TO {}",
                quote_ident(&m.from)
            ),
            None => m.rename_sql(true),
        },
    ));
    tx.extend(aside.indexes.iter().map(|a| a.rename_sql("INDEX")));
    tx.extend(aside.types.iter().map(|a| a.rename_sql("TYPE")));
    locks += (aside.indexes.len() + aside.types.len()) as i64;
    // A backup index or type whose live name is held by a relation (or its row type) that
    // moves aside under the locks takes it back there.
    let held: BTreeSet<&QualName> = aside.relations_under_locks().map(|a| &a.name).collect();
    let (deferred, early): (Vec<&crate::plan::Move>, Vec<&crate::plan::Move>) = before
        .into_iter()
        .partition(|m| held.contains(&QualName::new(m.schema.clone(), m.from.clone())));
    tx.extend(early.iter().map(|m| m.rename_sql(true)));

    let mut lock: BTreeSet<String> = BTreeSet::new();
    lock.extend(aside.tables.iter().map(|a| a.name.quoted()));
    lock.extend(sets.backups.iter().map(|(_, b)| b.quoted()));
    lock.extend(
        facts
            .fks_in
            .iter()
            .map(|f| quote_qualified(&f.schema, &f.table)),
    );
    lock.extend(
        facts
            .fks_out
            .iter()
            .map(|(_, referenced)| referenced.quoted()),
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
    locks += lock.len() as i64;
    tx.lock_tables(lock.into_iter().collect());
    tx.push(LOCKED_MARKER);

    // Under the locks.
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
    move_migration_aside(&mut tx, plan, facts);
    tx.extend(deferred.iter().map(|m| m.rename_sql(true)));
    tx.extend(under.iter().map(|m| m.rename_sql(true)));
    locks += (aside.matviews.len()
        + aside.owned_sequences.len()
        + aside.sequences.len()
        + functions.len()
        + early.len()
        + deferred.len()
        + under.len()
        + views.recreate.len()
        + 2 * plan.functions.len()) as i64;
    for fk in &facts.fks_in {
        tx.push(add_not_valid(
            &fk.schema,
            &fk.table,
            &fk.name,
            &fk.definition,
        ));
    }
    let back = if facts.fks_kept.is_empty() {
        Renames::new()
    } else {
        back_renames(plan)
    };
    for fk in &facts.fks_kept {
        let table = back.get_in(&fk.schema, &fk.table).unwrap_or(&fk.table);
        tx.push(add_not_valid(
            &fk.schema,
            table,
            &fk.name,
            &back.apply(&fk.definition),
        ));
    }
    locks += LOCKS_PER_FOREIGN_KEY
        * (2 * (facts.fks_in.len() + facts.fks_kept.len()) + facts.fks_out.len()) as i64;
    tx.extend(conversion_sql(&facts.conversions));
    locks += LOCKS_PER_CONVERSION * facts.conversions.len() as i64;
    for r in &plan.repoints {
        tx.extend(r.attach.iter().cloned());
    }
    locks += 2 * (plan.repoints.len() as i64);
    for v in &views.recreate {
        tx.extend(crate::swap::view_sql(&crate::plan::ViewPlan::recreating(v)));
    }
    Planned { tx, record, locks }
}

/// The foreign keys the rollback adds `NOT VALID` (into the tables it restores, and from them
/// into the kept tables), to validate after its commit: (table, constraint), by the names they
/// have then.
fn validations(plan: &Plan, facts: &Facts) -> Vec<(QualName, String)> {
    if facts.fks_in.is_empty() && facts.fks_kept.is_empty() {
        return Vec::new();
    }
    let back = back_renames(plan);
    facts
        .fks_in
        .iter()
        .chain(&facts.fks_kept)
        .map(|fk| {
            (
                QualName::new(
                    fk.schema.clone(),
                    back.get_in(&fk.schema, &fk.table).unwrap_or(&fk.table),
                ),
                fk.name.clone(),
            )
        })
        .collect()
}

/// What a rollback reads of migration `id`'s recorded plan: all of it but the arrays it has
/// no use for (the shadow set's indexes and sequences, the dependents and deferred checks of
/// the prepare), and of `to_live` only the sequences and types; the large arrays are read an
/// element at a time ([`state::plan_array`]).
async fn recorded_plan(control: &Client, id: i64) -> Result<Plan, CoordinatorError> {
    const STREAMED: [&str; 3] = ["tables", "to_backup", "to_live"];
    const UNUSED: [&str; 9] = [
        "indexes",
        "sequences",
        "types",
        "multiranges",
        "foreign_keys",
        "dependents",
        "deferred",
        "deferred_checks",
        "deferred_validations",
    ];
    let blank: Vec<&str> = STREAMED.iter().chain(&UNUSED).copied().collect();
    let mut plan = state::plan_without(control, id, &blank)
        .await?
        .ok_or_else(|| CoordinatorError::Metadata {
            what: format!("read migration {id}"),
            message: "it is gone from pgzm.migrations".into(),
        })?;
    plan.tables = state::plan_array(control, id, "tables", |_| true).await?;
    plan.to_backup = state::plan_array(control, id, "to_backup", |_| true).await?;
    plan.to_live = state::plan_array(control, id, "to_live", |m: &crate::plan::Move| {
        matches!(m.kind, ObjectKind::Sequence | ObjectKind::Type)
    })
    .await?;
    Ok(plan)
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

/// Under the locks, what the migration brought in leaves the live names: functions the swap
/// recreated over its objects are dropped (their backups, the originals, take the names back),
/// its materialized views move aside, re-pointed defaults and policies are detached, foreign
/// keys into what goes (and out of it, into what stays) are dropped, and its tables, the kept
/// tables' backups and its sequences move aside (to be dropped after the commit). Plain
/// statements, decided from what was read before: no procedural block.
fn move_migration_aside(tx: &mut LockedTransaction, plan: &Plan, facts: &Facts) {
    // The types the functions' arguments name were moved aside before the locks.
    let mut types = Renames::new();
    for a in &facts.aside.types {
        types.insert_in(&a.name.schema, &a.name.name, &a.to);
    }
    for f in &facts.functions {
        tx.push(format!(
            "DROP ROUTINE {}({})",
            quote_qualified(&f.schema, &f.aside),
            types.apply(&f.arguments)
        ));
    }
    tx.extend(
        facts
            .aside
            .matviews
            .iter()
            .map(|a| a.rename_sql("MATERIALIZED VIEW")),
    );
    for r in &plan.repoints {
        tx.extend(r.detach.iter().cloned());
    }
    for fk in facts
        .fks_in
        .iter()
        .chain(&facts.fks_kept)
        .chain(facts.fks_out.iter().map(|(fk, _)| fk))
    {
        tx.push(format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name)
        ));
    }
    tx.extend(facts.aside.tables.iter().map(|a| a.rename_sql("TABLE")));
    tx.extend(
        facts
            .aside
            .owned_sequences
            .iter()
            .chain(&facts.aside.sequences)
            .map(|a| a.rename_sql("SEQUENCE")),
    );
}

/// The backups' renames back to their live names: functions, indexes and types (before the
/// locks), then tables, sequences, materialized views and the restorable views (under them).
fn restore_moves<'a>(
    plan: &'a Plan,
    sets: &TableSets,
    facts: &Facts,
    restorable_views: &BTreeSet<(&str, &str)>,
) -> (Vec<&'a crate::plan::Move>, Vec<&'a crate::plan::Move>) {
    let restored: BTreeSet<&QualName> = sets.restored.iter().map(|(_, b)| b).collect();
    plan.to_backup
        .iter()
        .filter(|m| {
            let to = QualName::new(m.schema.clone(), m.to.clone());
            match m.kind {
                ObjectKind::Table => restored.contains(&to),
                ObjectKind::Index => facts.child_names.contains(&to),
                // Owned by a restored table, or free-standing (a kept backup's went with it).
                ObjectKind::Sequence => {
                    facts.child_names.contains(&to) || !facts.kept_children.contains(&to)
                }
                ObjectKind::Type | ObjectKind::Function | ObjectKind::MaterializedView => true,
                ObjectKind::View => {
                    restorable_views.contains(&(m.schema.as_str(), m.from.as_str()))
                }
            }
        })
        .partition(|m| {
            matches!(
                m.kind,
                ObjectKind::Index | ObjectKind::Type | ObjectKind::Function
            )
        })
}

/// `pgzm rollback`: reads the backup set and the destination, plans the transaction, checks
/// that its locks fit in the server's lock table, runs it with the swap's lock strategy,
/// validates the foreign keys it added `NOT VALID`, then drops what it moved aside (and what
/// earlier rollbacks left) in batches.
pub async fn rollback(opts: RollbackOptions) -> Result<RollbackReport, CoordinatorError> {
    let (control, mut report) = commit(&opts).await?;
    if opts.dry_run {
        return Ok(report);
    }
    let started = std::time::Instant::now();
    match state::drop_rolled_back(&control, None, opts.locks).await {
        Ok(drops) => {
            if !drops.dropped.is_empty() {
                tracing::info!(
                    objects = drops.dropped.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "dropped what the rollback moved aside"
                );
            }
            report.warnings.extend(drops.warnings);
        }
        Err(e) => report.warnings.push(format!(
            "what the rollback moved aside (recorded in pgzm.rolled_back_objects) was not dropped: {e}; `pgzm cleanup` drops it"
        )),
    }
    state::unlock(&control).await;
    Ok(report)
}

/// [`rollback`] up to its commit and the validations after it, without dropping what it moved
/// aside: what stays recorded in `pgzm.rolled_back_objects` is what a crash right after the
/// commit leaves (the next `pgzm rollback`, `pgzm cleanup` or `pgzm prepare` drops it).
pub async fn rollback_leaving_aside(
    opts: RollbackOptions,
) -> Result<RollbackReport, CoordinatorError> {
    let (control, report) = commit(&opts).await?;
    state::unlock(&control).await;
    Ok(report)
}

/// The rollback up to its commit (or its plan, for a dry run), with the session that holds the
/// run lock.
async fn commit(opts: &RollbackOptions) -> Result<(Client, RollbackReport), CoordinatorError> {
    let control = opts.destination.connect("pgzm-coordinator").await?;
    if !state::try_lock(&control).await? {
        return Err(CoordinatorError::Busy);
    }
    control
        .batch_execute(crate::state::CATALOG_SESSION)
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", e))?;
    let row = backup::find(&control, opts.migration_id).await?;
    // The destination's views, read first: `destination::read` reads the whole catalog of the
    // migrated schemas (tens of MB at 10 000 tables), of which the rollback keeps the views.
    let views = {
        #[derive(serde::Deserialize)]
        struct TableSchema {
            #[serde(default = "crate::naming::public_schema")]
            schema: String,
        }
        // The schemas of the migrated tables, as `Plan::schemas` names them (collected as the
        // tables are read; none is kept).
        let mut schemas = BTreeSet::new();
        state::plan_array(&control, row.id, "tables", |t: &TableSchema| {
            schemas.insert(t.schema.clone());
            false
        })
        .await?;
        let schemas: Vec<String> = schemas.into_iter().collect();
        destination::read(&control, &schemas).await?.views
    };
    let plan = recorded_plan(&control, row.id).await?;
    let sets = TableSets::new(&plan, &opts.keep_tables);
    let oid_of = oids(&control, &sets.names()).await?;
    let mut problems = sets.problems(row.id, &oid_of);
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    let facts = Facts::read(&control, row.id, &plan, &sets, oid_of, views).await?;
    problems.extend(facts.aside.problems(&control).await?);
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    let planned = rollback_transaction(&plan, row.id, &sets, &facts);
    LockBudget::read(&control)
        .await?
        .check(planned.locks, "the rollback")?;
    let mut report = RollbackReport {
        timestamp: row.id,
        dry_run: opts.dry_run,
        restored: sets
            .restored
            .iter()
            .map(|(l, _)| l.display_name())
            .collect(),
        kept: sets.keep.iter().map(QualName::display_name).collect(),
        dropped: {
            let backups: BTreeSet<&QualName> = sets.backups.iter().map(|(l, _)| l).collect();
            sets.current_drop
                .iter()
                .filter(|n| !backups.contains(n))
                .map(QualName::display_name)
                .collect()
        },
        statements: Vec::new(),
        attempts: 0,
        warnings: pending_prepares(&control, row.id, &sets.current_drop).await?,
    };
    let Planned { tx, record, locks } = planned;
    if opts.dry_run {
        report.statements = tx.statements(opts.locks.lock_timeout);
        return Ok((control, report));
    }
    // The foreign keys added NOT VALID, validated after the commit: (table, constraint), by
    // the names they have then.
    let validations = validations(&plan, &facts);
    let moved_aside = record.len();
    // What the transaction needs is in it: the plan and what was read go before it is sent (at
    // 10 000 tables the batch is ~8 MB of SQL, which the client copies on its way out).
    drop((record, sets, facts, plan));
    tracing::debug!(locks, aside = moved_aside, "rollback planned");
    // pgzm.rolled_back_objects may be missing from metadata an older pgzm created.
    state::ensure_schema(&control).await?;
    let (attempts, messages) = tx
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
    let locked = marker(&messages, "locked").unwrap_or(0);
    drop(messages);
    let committed: i64 = control
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::int8 AS now",
            &[],
        )
        .await
        .map(|r| r.get("now"))
        .unwrap_or(locked);
    tracing::info!(
        migration = row.id,
        attempts,
        lock_held_ms = (committed - locked) as f64 / 1000.0,
        moved_aside,
        "rollback committed"
    );
    report.statements = tx.statements(opts.locks.lock_timeout);
    drop(tx);
    for (table, name) in validations {
        let validate = format!(
            "ALTER TABLE {table} VALIDATE CONSTRAINT {}",
            quote_ident(&name)
        );
        if let Err(e) = control.batch_execute(&validate).await {
            report.warnings.push(format!(
                "foreign key \"{}\" on {} does not validate after the rollback: {}; it stays NOT VALID until the rows are fixed and you run: {validate}",
                name,
                table.plain(),
                pgzm_pg::conn::describe(&e)
            ));
        }
    }
    Ok((control, report))
}

/// Warnings about migrations prepared (or being prepared) against the live tables this rollback
/// replaces: their sync triggers go with the dropped tables, and their plan describes tables that
/// are no longer live, so they must be prepared again before a swap.
async fn pending_prepares(
    control: &Client,
    rolled_back: i64,
    replaced: &[QualName],
) -> Result<Vec<String>, CoordinatorError> {
    let pending: Vec<(i64, String)> = control
        .query(
            "SELECT id, status FROM pgzm.migrations
             WHERE shadow_present AND status IN ('preparing', 'prepared') AND id <> $1 ORDER BY id",
            &[&rolled_back],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .iter()
        .map(|r| (r.get("id"), r.get("status")))
        .collect();
    let mut warnings = Vec::new();
    for (id, status) in pending {
        let synced: Vec<String> = state::plan_array(
            control,
            id,
            "preserved",
            |p: &crate::preserve::PreservedTable| replaced.contains(&p.qualname()),
        )
        .await?
        .iter()
        .map(|p| p.qualname().plain())
        .collect();
        warnings.push(if synced.is_empty() {
            format!(
                "migration {id} is {status} against the tables this rollback replaces: run `pgzm prepare --force` again before swapping it"
            )
        } else {
            format!(
                "migration {id} is {status} and keeps {} in sync with triggers on the tables this rollback replaces; those triggers go with them, so its swap will be refused: run `pgzm prepare --force` again",
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
/// set again. The migration's types, unused then, are dropped after the commit with the rest
/// of what the rollback moved aside.
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
    sql
}
