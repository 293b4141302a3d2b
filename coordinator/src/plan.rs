//! The plan: every name the migration will create, move and drop, checked against the
//! destination before anything changes.
//!
//! Names are simulated through every step (clean leftovers, create shadows, drop the previous
//! backup set, rename live → backup, rename shadow → live) on a model of the destination's
//! relation and type namespaces; any step that would hit an existing name the tool does not own
//! makes the plan refuse, so a collision is found before the first change, never in the middle
//! of the swap.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use serde::{Deserialize, Serialize};

use crate::catalog::{SourceSchema, Table};
use crate::destination::{Destination, Grant, QualName};
use crate::name::Name;
use crate::naming::{prefixed, BACKUP, SHADOW};
use crate::records::RecordedObjects;
use crate::rewrite::Renames;

/// Kind of a renamed object (decides the `ALTER … RENAME` form).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// A table (its row type follows it).
    Table,
    /// An index (a constraint backed by it follows it).
    Index,
    /// A sequence.
    Sequence,
    /// An enum or domain.
    Type,
    /// A view.
    View,
    /// A function or procedure (identified by its oid: its signature may name migrated types).
    Function,
    /// A materialized view.
    MaterializedView,
}

impl ObjectKind {
    /// The `ALTER <keyword>` for this kind.
    pub fn keyword(self) -> &'static str {
        match self {
            ObjectKind::Table => "TABLE",
            ObjectKind::Index => "INDEX",
            ObjectKind::Sequence => "SEQUENCE",
            ObjectKind::Type => "TYPE",
            ObjectKind::View => "VIEW",
            ObjectKind::Function => "ROUTINE",
            ObjectKind::MaterializedView => "MATERIALIZED VIEW",
        }
    }

    /// Whether the swap renames it before taking the table locks (no lock queries wait on).
    pub fn renamed_before_locks(self) -> bool {
        matches!(
            self,
            ObjectKind::Index | ObjectKind::Type | ObjectKind::Function
        )
    }

    /// Whether its name is also a type's (a relation's row type, or a type).
    pub fn has_row_type(self) -> bool {
        matches!(
            self,
            ObjectKind::Type | ObjectKind::Table | ObjectKind::View | ObjectKind::MaterializedView
        )
    }

    /// Whether the object lives in pg_class (relations share one namespace per schema).
    pub fn is_relation(self) -> bool {
        !matches!(self, ObjectKind::Type | ObjectKind::Function)
    }
}

/// One rename: `from` → `to`, both unquoted names in `schema`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Move {
    /// Kind.
    pub kind: ObjectKind,
    /// Schema of the object (plans recorded before schemas were carried read as `public`).
    #[serde(
        default = "crate::naming::public_name",
        deserialize_with = "crate::name::deserialize_schema"
    )]
    pub schema: Name,
    /// Current name.
    pub from: Name,
    /// New name.
    pub to: Name,
    /// The object's oid, for functions (their signature is not a stable handle: it may name a
    /// type that the swap renames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oid: Option<crate::catalog::Oid>,
}

impl Move {
    /// A rename in `schema`.
    pub fn in_schema(
        kind: ObjectKind,
        schema: &str,
        from: impl Into<Name>,
        to: impl Into<Name>,
    ) -> Move {
        Move {
            kind,
            schema: crate::name::common(schema),
            from: from.into(),
            to: to.into(),
            oid: None,
        }
    }

    /// `ALTER … RENAME` from `from` to `to` (or back, with `reverse`). A function is named by
    /// its oid, resolved when the statement runs.
    pub fn rename_sql(&self, reverse: bool) -> String {
        let (from, to) = if reverse {
            (&self.to, &self.from)
        } else {
            (&self.from, &self.to)
        };
        match (self.kind, self.oid) {
            (ObjectKind::Function, Some(oid)) => pgzm_pg::sql::do_block(&format!(
                "BEGIN EXECUTE format('ALTER ROUTINE %s RENAME TO %I', {oid}::oid::pg_catalog.regprocedure, {}); END",
                pgzm_pg::sql::quote_literal(to)
            )),
            _ => format!(
                "ALTER {} {} RENAME TO {}",
                self.kind.keyword(),
                pgzm_pg::sql::quote_qualified(&self.schema, from),
                pgzm_pg::sql::quote_ident(to)
            ),
        }
    }

    /// The key of a table in the row counts recorded at the swap: its live name in `public`
    /// (as recorded before schemas were chosen), `schema.name` elsewhere.
    pub fn stats_key(&self) -> String {
        if self.schema == crate::naming::PUBLIC {
            self.from.to_string()
        } else {
            QualName::new(self.schema.clone(), self.from.clone()).plain()
        }
    }

    /// The quoted, schema-qualified current name.
    pub fn qualified_from(&self) -> String {
        pgzm_pg::sql::quote_qualified(&self.schema, &self.from)
    }

    /// The quoted, schema-qualified new name.
    pub fn qualified_to(&self) -> String {
        pgzm_pg::sql::quote_qualified(&self.schema, &self.to)
    }
}

/// A table to migrate.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TablePlan {
    /// Schema of the table, its shadow and its backup.
    #[serde(
        default = "crate::naming::public_name",
        deserialize_with = "crate::name::deserialize_schema"
    )]
    pub schema: Name,
    /// Live name (the source's name).
    pub name: Name,
    /// Shadow table name.
    pub shadow: Name,
    /// Backup name of the live table it replaces, if the destination has one.
    pub backup: Option<Name>,
    /// Columns copied.
    pub copy_columns: Vec<Name>,
    /// Planner estimate of rows in the source.
    pub estimated_rows: i64,
    /// Estimate of bytes in the source.
    pub estimated_bytes: i64,
    /// Heap pages in the source (estimate).
    #[serde(default)]
    pub pages: i64,
    /// Expected binary COPY bytes from the source's statistics (0: unknown).
    #[serde(default)]
    pub estimated_copy_bytes: i64,
    /// A partitioned table: no rows of its own (its partitions are copied), built after them.
    #[serde(default)]
    pub partitioned: bool,
    /// Whether its rows are copied (`false`: `--exclude-table-data`, created empty).
    #[serde(default = "crate::naming::yes")]
    pub copy_data: bool,
    /// What the source table was when the run read it (for `--resume`: a table whose
    /// evidence differs later has changed and is copied again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<SourceEvidence>,
}

/// Evidence that a source table has not changed since a run read it: its file (a TRUNCATE,
/// VACUUM FULL or CLUSTER gives it a new one) and the statistics' cumulative count of rows
/// inserted, updated and deleted (-1 when the statistics have none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SourceEvidence {
    /// `pg_relation_filenode`.
    pub filenode: i64,
    /// `n_tup_ins + n_tup_upd + n_tup_del`.
    pub changes: i64,
}

/// A view created in the swap transaction.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ViewPlan {
    /// Schema.
    #[serde(default = "crate::naming::public_schema")]
    pub schema: String,
    /// Name.
    pub name: String,
    /// Definition (qualified; refers to live names, which are the new tables after the renames).
    pub definition: String,
    /// reloptions.
    pub options: Vec<String>,
    /// Owner to set, when the view replaces a destination view.
    pub owner: Option<String>,
    /// Privileges to grant.
    pub grants: Vec<Grant>,
    /// Comment.
    pub comment: Option<String>,
    /// Whether the definition comes from the source (else: a destination view recreated).
    pub from_source: bool,
}

/// A foreign key of a destination-only table re-pointed at the new table in the swap.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ForeignKeyRepoint {
    /// Schema of the referencing table.
    #[serde(default = "crate::naming::public_schema")]
    pub schema: String,
    /// Referencing table (not migrated).
    pub table: String,
    /// Constraint name.
    pub name: String,
    /// Referenced table (migrated).
    pub references: String,
    /// Schema of the referenced table.
    #[serde(default = "crate::naming::public_schema")]
    pub references_schema: String,
    /// Constraint definition.
    pub definition: String,
}

/// A materialized view built over the shadow tables before the swap (`shadow_<name>`, with its
/// indexes) and swapped in by rename: the source's own, or a destination one that reads a
/// replaced relation, rebuilt from its definition.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MatviewPlan {
    /// Definition (qualified, naming live objects: rewritten to shadow names when built),
    /// indexes, population, comment; `schema`/`name` are the live ones.
    pub matview: crate::catalog::Matview,
    /// Name while shadow.
    pub shadow: String,
    /// Owner to set (the destination one's it replaces).
    pub owner: Option<String>,
    /// Privileges to grant.
    pub grants: Vec<Grant>,
    /// Whether the definition comes from the source.
    pub from_source: bool,
}

/// A destination function (or procedure) whose signature or body is bound to an object the
/// swap replaces (a migrated table's row type, a replaced enum, a recreated view): the old one
/// moves to the backup set under a `backup_` name, and this one is created over the new objects
/// in the swap transaction, with the same body, settings, owner, privileges and comment.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FunctionPlan {
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// Its signature (`regprocedure` text, qualified) as read before the swap: after the
    /// renames the type names in it denote the new objects.
    pub signature: String,
    /// `CREATE OR REPLACE FUNCTION …` (`pg_get_functiondef`, qualified).
    pub definition: String,
    /// Owner.
    pub owner: String,
    /// Privileges; None: the default (EXECUTE to PUBLIC).
    pub grants: Option<Vec<Grant>>,
    /// Comment.
    pub comment: Option<String>,
    /// `f` function, `p` procedure, `w` window function.
    pub kind: char,
    /// Typed on (or reading) a view recreated at the swap: created after the views.
    #[serde(default)]
    pub after_views: bool,
}

impl ViewPlan {
    /// A destination view created again from its own definition, owner, grants and comment.
    pub fn recreating(v: &crate::destination::LiveView) -> ViewPlan {
        ViewPlan {
            schema: v.schema.clone(),
            name: v.name.clone(),
            definition: v.definition.clone(),
            options: v.options.clone(),
            owner: Some(v.owner.clone()),
            grants: v.grants.clone(),
            comment: v.comment.clone(),
            from_source: false,
        }
    }
}

impl TablePlan {
    /// Its live schema-qualified name.
    pub fn qualname(&self) -> QualName {
        QualName::new(self.schema.clone(), self.name.clone())
    }

    /// Its shadow's schema-qualified name.
    pub fn shadow_name(&self) -> QualName {
        QualName::new(self.schema.clone(), self.shadow.clone())
    }
}

impl FunctionPlan {
    /// `FUNCTION` or `PROCEDURE`.
    pub fn keyword(&self) -> &'static str {
        if self.kind == 'p' {
            "PROCEDURE"
        } else {
            "FUNCTION"
        }
    }
}

/// An object outside the migrated set that depends on something the swap replaces, and what
/// the migration does with it (listed by `plan`/`--dry-run`, human and JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Dependent {
    /// The object, as PostgreSQL describes it (`function public.f(integer)`, `view reporting.v`…).
    pub object: String,
    /// What it depends on (`table public.customer`…).
    pub on: String,
    /// What happens to it.
    pub action: String,
}

/// A dependent of another table re-pointed in place at the swap (a column default, a
/// row-level-security policy): `detach` removes it, `attach` creates it again from its
/// definition read before the swap, which names objects by their live names (the new objects
/// after the swap's renames, the restored ones after a rollback's).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Repoint {
    /// The object, as PostgreSQL describes it.
    pub object: String,
    /// What it depends on.
    pub on: String,
    /// Schema of its table (locked during the swap).
    pub schema: String,
    /// Its table.
    pub table: String,
    /// Statements removing it.
    pub detach: Vec<String>,
    /// Statements creating it again.
    pub attach: Vec<String>,
}

/// The whole plan of one migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Plan {
    /// Migration id: milliseconds since the epoch when planned (the backup set's timestamp).
    pub migration_id: i64,
    /// Source database, as `user@host:port/db`.
    pub source: String,
    /// Tables, largest first.
    pub tables: Vec<TablePlan>,
    /// Shadow types to create (source name → shadow name).
    pub types: Vec<Move>,
    /// Shadow sequences to create.
    pub sequences: Vec<Move>,
    /// Multirange types created with the shadow range types (source name → shadow name).
    #[serde(default)]
    pub multiranges: Vec<Move>,
    /// Shadow indexes (and constraint indexes) to create.
    pub indexes: Vec<Move>,
    /// Live objects renamed to backup names in the swap.
    pub to_backup: Vec<Move>,
    /// Shadow objects renamed to live names in the swap.
    pub to_live: Vec<Move>,
    /// Views created in the swap, in creation order.
    pub views: Vec<ViewPlan>,
    /// Foreign keys re-pointed in the swap.
    pub foreign_keys: Vec<ForeignKeyRepoint>,
    /// Destination functions recreated over the new objects in the swap.
    #[serde(default)]
    pub functions: Vec<FunctionPlan>,
    /// Materialized views built before the swap and swapped in by rename, in build order.
    #[serde(default)]
    pub matviews: Vec<MatviewPlan>,
    /// Every object outside the migrated set that depends on a replaced object, and what
    /// happens to it.
    #[serde(default)]
    pub dependents: Vec<Dependent>,
    /// Defaults and policies of other tables re-pointed in place at the swap.
    #[serde(default)]
    pub repoints: Vec<Repoint>,
    /// Trigger functions missing in the destination, created with the shadow tables
    /// (signature, definition).
    pub functions_to_create: Vec<(String, String)>,
    /// Extensions to create in the destination (name, schema).
    pub extensions_to_create: Vec<(String, String)>,
    /// Migrated schemas the destination lacks: created with the shadow tables, owned by
    /// [`Plan::schema_owner`].
    #[serde(default)]
    pub schemas_to_create: Vec<String>,
    /// Owner of the schemas created: the destination database's owner (as `public` is owned
    /// by `pg_database_owner`), or the connected role when it cannot act as that owner.
    #[serde(default)]
    pub schema_owner: Option<String>,
    /// Migration whose backup set this one replaces (dropped once this one is prepared).
    pub previous_backup: Option<i64>,
    /// Unfinished earlier runs whose shadow objects are removed first.
    pub leftovers: Vec<i64>,
    /// Things the operator should know that do not stop the migration.
    pub warnings: Vec<String>,
    /// Preserved tables: destination rows, kept in sync until the swap.
    #[serde(default)]
    pub preserved: Vec<crate::preserve::PreservedTable>,
    /// Statements run inside the swap after the renames: foreign keys involving preserved
    /// tables (added `NOT VALID`; validated only a partitioned table's) and the source's
    /// triggers on preserved tables.
    #[serde(default)]
    pub deferred: Vec<String>,
    /// Checks run in the swap transaction before its locks: that no row of the shadow tables
    /// breaks a foreign key involving a preserved table (the work of a validation, done while
    /// production still runs; the lock window does not grow with the tables).
    #[serde(default)]
    pub deferred_checks: Vec<String>,
    /// (live table, constraint) of the keys added `NOT VALID` in the swap, validated right
    /// after its commit (without blocking writes).
    #[serde(default)]
    pub deferred_validations: Vec<(QualName, String)>,
    /// Tables of the source the filters left out (`--table`, `--exclude-table`): not migrated.
    #[serde(default)]
    pub excluded: Vec<QualName>,
    /// Digest of every statement that builds the shadow set (tables, types, indexes, keys,
    /// triggers): a resumed run refuses when the source's definitions no longer give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_digest: Option<String>,
    /// The source snapshot the run copied from (`pg_current_snapshot()` as text): a resumed
    /// run proves a kept table unchanged by finding no row version this snapshot did not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_snapshot: Option<String>,
    /// [`Plan::table`]'s index of `tables` (not recorded: built on first use).
    #[serde(skip)]
    #[schemars(skip)]
    pub table_index: crate::naming::NameIndex,
}

/// What the tool's metadata says about earlier runs.
#[derive(Debug, Clone, Default)]
pub struct Earlier {
    /// Unfinished runs (id, objects they created that may still exist).
    pub leftovers: Vec<(i64, RecordedObjects)>,
    /// The current backup set (migration id, its backup-named objects).
    pub backup_set: Option<(i64, Vec<Move>)>,
    /// A run that is prepared and waiting for its swap (also listed in `leftovers`).
    pub prepared: Option<i64>,
}

impl Plan {
    /// The map from source names to shadow names, for rewriting deparsed SQL.
    pub fn shadow_renames(&self) -> Renames {
        let mut r = Renames::new();
        for t in &self.tables {
            r.insert_in(&t.schema, &t.name, &t.shadow);
        }
        for mv in &self.matviews {
            r.insert_in(&mv.matview.schema, &mv.matview.name, &mv.shadow);
        }
        for m in self
            .types
            .iter()
            .chain(&self.multiranges)
            .chain(&self.sequences)
            .chain(&self.indexes)
        {
            r.insert_in(&m.schema, &m.from, &m.to);
        }
        r
    }

    /// Every relation the migration brings in or recreates, as (schema, name): tables, views,
    /// materialized views. Definitions naming them are re-pointed at their shadows.
    pub fn relation_names(&self) -> std::collections::HashSet<(&str, &str)> {
        self.tables
            .iter()
            .map(|t| (t.schema.as_str(), t.name.as_str()))
            .chain(
                self.views
                    .iter()
                    .map(|v| (v.schema.as_str(), v.name.as_str())),
            )
            .chain(
                self.matviews
                    .iter()
                    .map(|m| (m.matview.schema.as_str(), m.matview.name.as_str())),
            )
            .collect()
    }

    /// Whether `table` is preserved.
    pub fn is_preserved(&self, table: &QualName) -> bool {
        self.preserved
            .iter()
            .any(|p| p.table == table.name && p.schema == table.schema)
    }

    /// The table plan of that name.
    pub fn table(&self, name: &QualName) -> Option<&TablePlan> {
        self.table_index
            .find(&self.tables, name, |t| (&t.schema, &t.name))
    }

    /// The schemas of the migrated tables (the destination schemas the run works in).
    pub fn schemas(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self.tables.iter().map(|t| t.schema.as_str()).collect();
        set.into_iter().map(str::to_string).collect()
    }

    /// Estimated bytes of all tables.
    pub fn estimated_bytes(&self) -> i64 {
        self.tables.iter().map(|t| t.estimated_bytes.max(0)).sum()
    }
}

/// Builds the plan, or the list of reasons the migration cannot run.
pub fn build(
    migration_id: i64,
    source_label: String,
    source: &SourceSchema,
    dest: &Destination,
    earlier: &Earlier,
) -> Result<Plan, Vec<String>> {
    let (plan, problems) = build_all(migration_id, source_label, source, dest, earlier);
    if problems.is_empty() {
        Ok(plan)
    } else {
        Err(problems)
    }
}

/// Builds the plan and lists every reason it cannot run (empty when it can), so that further
/// checks can add theirs and the operator sees all of them at once.
pub fn build_all(
    migration_id: i64,
    source_label: String,
    source: &SourceSchema,
    dest: &Destination,
    earlier: &Earlier,
) -> (Plan, Vec<String>) {
    let mut problems: Vec<String> = source.unsupported.clone();
    let warnings = Vec::new();
    problems.extend(empty_schemas(source));

    let mut tables: Vec<TablePlan> = source
        .tables
        .iter()
        .map(|t| table_plan(t, source, dest))
        .collect();
    // Statements follow the tables' names, not their sizes (which follow the statistics):
    // the same schema always gives the same swap and rollback. The plan lists them largest
    // first (sorted again at the end).
    tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));

    let mut shadows = ShadowMoves::of(source);
    // Live objects that move to backup names: replaced tables with all their indexes and owned
    // sequences, and live types, sequences and views whose names the new objects take.
    let mut dependents = Vec::new();
    let mut to_backup = replaced_tables(source, dest, &tables, &mut dependents);
    to_backup.extend(replaced_types_and_sequences(dest, &shadows, &to_backup));
    let Followers {
        views,
        functions: recreated_functions,
        matviews,
    } = plan_dependents(
        source,
        dest,
        &tables,
        &mut to_backup,
        &mut dependents,
        &mut problems,
    );
    for mv in &matviews {
        for (index, _) in &mv.matview.indexes {
            shadows.indexes.push(Move {
                kind: ObjectKind::Index,
                schema: crate::name::common(&mv.matview.schema),
                from: index.as_str().into(),
                to: prefixed(SHADOW, index).into(),
                oid: None,
            });
        }
    }
    let mut to_live = live_moves(&tables, &shadows, &matviews);
    let foreign_keys = foreign_key_repoints(source, dest, earlier, &mut dependents);
    problems.extend(keys_to_excluded_tables(source, dest));
    let functions_to_create = functions_to_create(source, dest, &mut problems);
    let extensions_to_create = extensions_to_create(source, dest, &mut problems);
    let ShadowMoves {
        types,
        sequences,
        multiranges,
        indexes,
    } = shadows;
    // The names the shadow objects take: borrowed, but for the views' and materialized
    // views' (made here; a copy of every shadow move was ~10 MB at 10 000 tables).
    let made: Vec<Move> = matviews
        .iter()
        .map(|mv| Move {
            kind: ObjectKind::MaterializedView,
            schema: crate::name::common(&mv.matview.schema),
            from: mv.matview.name.as_str().into(),
            to: mv.shadow.as_str().into(),
            oid: None,
        })
        // Recreated views are created as `shadow_<name>` in the swap, before its locks.
        .chain(views.iter().map(|v| Move {
            kind: ObjectKind::View,
            schema: crate::name::common(&v.schema),
            from: v.name.as_str().into(),
            to: prefixed(SHADOW, &v.name).into(),
            oid: None,
        }))
        .collect();
    let shadows = tables
        .iter()
        .map(|t| (ObjectKind::Table, t.schema.as_str(), t.shadow.as_str()))
        .chain(
            types
                .iter()
                .chain(&multiranges)
                .chain(&sequences)
                .chain(&indexes)
                .chain(&made)
                .map(|m| (m.kind, m.schema.as_str(), m.to.as_str())),
        );
    order_renames(&mut to_backup);
    order_renames(&mut to_live);
    check_names(
        dest,
        earlier,
        shadows,
        &to_backup,
        &to_live,
        &views,
        &mut problems,
    );
    drop(made);
    tables.sort_by(|a, b| {
        b.estimated_bytes
            .cmp(&a.estimated_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });

    let plan = Plan {
        migration_id,
        source: source_label,
        tables,
        types,
        sequences,
        multiranges,
        indexes,
        to_backup,
        to_live,
        views,
        foreign_keys,
        functions: recreated_functions,
        matviews,
        dependents,
        repoints: Vec::new(),
        functions_to_create,
        extensions_to_create,
        schemas_to_create: source
            .schemas
            .iter()
            .filter(|s| !dest.existing_schemas.contains(*s))
            .cloned()
            .collect(),
        schema_owner: Some(dest.schema_owner.clone()),
        previous_backup: earlier.backup_set.as_ref().map(|(id, _)| *id),
        leftovers: earlier.leftovers.iter().map(|(id, _)| *id).collect(),
        warnings,
        preserved: Vec::new(),
        deferred: Vec::new(),
        deferred_checks: Vec::new(),
        deferred_validations: Vec::new(),
        excluded: source.excluded.clone(),
        definition_digest: None,
        source_snapshot: None,
        table_index: Default::default(),
    };
    (plan, problems)
}

/// A chosen schema without tables in the source (or missing there) is a mistake: nothing of
/// it would be migrated.
fn empty_schemas(source: &SourceSchema) -> Vec<String> {
    let found: BTreeSet<&str> = source
        .tables
        .iter()
        .map(|t| t.schema.as_str())
        .chain(source.excluded.iter().map(|t| t.schema.as_str()))
        .collect();
    source
        .schemas
        .iter()
        .filter(|s| !found.contains(s.as_str()))
        .map(|s| {
            format!(
                "the source has no tables in schema \"{s}\" (or no such schema): nothing of it to migrate; check --schema"
            )
        })
        .collect()
}

/// The destination's objects a migration reaches through what it replaces, transitively:
/// views reading a replaced relation (or calling an affected function), functions typed on a
/// replaced relation or type, materialized views reading a replaced relation; each with what
/// reached it (`why`, by kind letter and oid).
struct Affected<'a> {
    views: BTreeMap<u32, &'a crate::destination::LiveView>,
    functions: BTreeMap<u32, &'a crate::destination::TypedFunction>,
    rebuilt: BTreeMap<u32, (&'a QualName, &'a crate::destination::LiveMatview)>,
    why: BTreeMap<(char, u32), String>,
}

impl<'a> Affected<'a> {
    /// Grows the set until nothing more is reached. `replaced`: relation oid → description.
    fn find(
        dest: &'a Destination,
        source_views: &BTreeSet<QualName>,
        source_matviews: &BTreeSet<QualName>,
        mut replaced: BTreeMap<u32, String>,
        replaced_types: &BTreeMap<u32, String>,
    ) -> Self {
        let mut affected: BTreeMap<u32, &crate::destination::LiveView> = BTreeMap::new();
        let mut functions: BTreeMap<u32, &crate::destination::TypedFunction> = BTreeMap::new();
        let mut rebuilt: BTreeMap<u32, (&QualName, &crate::destination::LiveMatview)> =
            BTreeMap::new();
        let mut why: BTreeMap<(char, u32), String> = BTreeMap::new();
        loop {
            let before = (affected.len(), functions.len(), rebuilt.len());
            for (name, m) in &dest.materialized_views {
                if source_matviews.contains(name) || rebuilt.contains_key(&m.oid) {
                    continue;
                }
                if let Some(hit) = m.reads.iter().find_map(|r| replaced.get(r)).cloned() {
                    why.insert(('m', m.oid), hit);
                    rebuilt.insert(m.oid, (name, m));
                    replaced.insert(
                        m.oid,
                        format!(
                            "materialized view {}",
                            qualified_display(&name.schema, &name.name)
                        ),
                    );
                }
            }
            for f in &dest.typed_functions {
                if functions.contains_key(&f.oid) {
                    continue;
                }
                let hit = f
                    .relations
                    .iter()
                    .find_map(|r| replaced.get(r))
                    .or_else(|| f.types.iter().find_map(|t| replaced_types.get(t)));
                if let Some(on) = hit {
                    why.insert(('f', f.oid), on.clone());
                    functions.insert(f.oid, f);
                }
            }
            for v in dest.views.values() {
                let key = QualName::new(v.schema.clone(), v.name.clone());
                if source_views.contains(&key) || affected.contains_key(&v.oid) {
                    continue;
                }
                let hit = v
                    .depends_on
                    .iter()
                    .find_map(|d| replaced.get(d).cloned())
                    .or_else(|| {
                        v.calls.iter().find_map(|c| {
                            functions
                                .get(c)
                                .map(|f| format!("function {}", f.signature))
                        })
                    });
                if let Some(on) = hit {
                    why.insert(('v', v.oid), on);
                    affected.insert(v.oid, v);
                    replaced.insert(
                        v.oid,
                        format!("view {}", qualified_display(&v.schema, &v.name)),
                    );
                }
            }
            if (affected.len(), functions.len(), rebuilt.len()) == before {
                break;
            }
        }
        Affected {
            views: affected,
            functions,
            rebuilt,
            why,
        }
    }

    /// The affected views, recreated over the new objects in dependency order; each listed as
    /// a dependent, and a problem when it reads a column the new table lacks.
    fn view_plans(
        &self,
        source: &SourceSchema,
        dependents: &mut Vec<Dependent>,
        problems: &mut Vec<String>,
    ) -> Vec<ViewPlan> {
        let mut out = Vec::new();
        let deps: BTreeMap<u32, BTreeSet<u32>> = self
            .views
            .values()
            .map(|v| (v.oid, v.depends_on.clone()))
            .collect();
        for oid in crate::catalog::topological_order(self.views.keys().copied().collect(), &deps) {
            let v = self.views[&oid];
            // The view is recreated over the new tables: each column it reads must exist there.
            for (table, column) in &v.columns {
                if let Some(t) = source.table(table) {
                    if !t.columns.iter().any(|c| &c.name == column) {
                        problems.push(format!(
                            "destination view {} reads column \"{table}\".\"{column}\", which the source's \"{table}\" does not have: change or drop the view first",
                            qualified_display(&v.schema, &v.name)
                        ));
                    }
                }
            }
            dependents.push(Dependent {
                object: format!("view {}", qualified_display(&v.schema, &v.name)),
                on: self.why[&('v', v.oid)].clone(),
                action:
                    "recreated over the new objects at the swap (the old one joins the backup set)"
                        .into(),
            });
            out.push(ViewPlan::recreating(v));
        }
        out
    }

    /// The affected functions, recreated over the new objects (their old versions join the
    /// backup set); an aggregate cannot be, and is a problem.
    fn function_plans(
        &self,
        to_backup: &mut Vec<Move>,
        dependents: &mut Vec<Dependent>,
        problems: &mut Vec<String>,
    ) -> Vec<FunctionPlan> {
        let mut planned = Vec::new();
        for f in self.functions.values() {
            let on = self.why[&('f', f.oid)].clone();
            let object = format!(
                "{} {}",
                if f.kind == 'p' {
                    "procedure"
                } else {
                    "function"
                },
                f.signature
            );
            let definition = match (&f.definition, f.kind) {
                (Some(d), 'f' | 'p' | 'w') => d.clone(),
                _ => {
                    problems.push(format!(
                        "aggregate {} is typed on {on}, which the migration replaces: pgzm does not recreate aggregates; drop it before the migration and create it again afterwards",
                        f.signature
                    ));
                    continue;
                }
            };
            dependents.push(Dependent {
                object,
                on,
                action: "recreated over the new objects at the swap with its body, settings, owner, privileges and comment (the old one joins the backup set)".into(),
            });
            to_backup.push(Move {
                kind: ObjectKind::Function,
                schema: crate::name::common(&f.schema),
                from: f.name.as_str().into(),
                to: prefixed(BACKUP, &f.name).into(),
                oid: Some(f.oid),
            });
            planned.push(FunctionPlan {
                schema: f.schema.clone(),
                name: f.name.clone(),
                signature: f.signature.clone(),
                definition,
                owner: f.owner.clone(),
                grants: f.grants.clone(),
                comment: f.comment.clone(),
                kind: f.kind,
                after_views: f.relations.iter().any(|r| self.views.contains_key(r)),
            });
        }
        planned
    }

    /// Materialized views built before the swap: the source's, and the affected destination
    /// ones (rebuilt from their own definitions, in dependency order).
    fn matview_plans(
        &self,
        source: &SourceSchema,
        dest: &Destination,
        dependents: &mut Vec<Dependent>,
        problems: &mut Vec<String>,
    ) -> Vec<MatviewPlan> {
        // Materialized views: the source's are built over the new tables before the swap; a
        // destination one that reads a replaced relation is self.rebuilt the same way, from its own
        // definition; both are swapped in by rename. One that reads a view recreated at the swap
        // cannot be built before it.
        let mut matviews: Vec<MatviewPlan> = Vec::new();
        for m in &source.matviews {
            let live = dest
                .materialized_views
                .get(&QualName::new(m.schema.clone(), m.name.clone()));
            matviews.push(MatviewPlan {
                shadow: prefixed(SHADOW, &m.name),
                matview: m.clone(),
                owner: live.map(|l| l.owner.clone()),
                grants: live.map(|l| l.grants.clone()).unwrap_or_default(),
                from_source: true,
            });
        }
        let deps: BTreeMap<u32, BTreeSet<u32>> = self
            .rebuilt
            .values()
            .map(|(_, m)| (m.oid, m.reads.clone()))
            .collect();
        for oid in crate::catalog::topological_order(self.rebuilt.keys().copied().collect(), &deps)
        {
            let (name, m) = self.rebuilt[&oid];
            if let Some(view) = m.reads.iter().find_map(|r| self.views.get(r)) {
                problems.push(format!(
                    "destination materialized view {} reads view {}, which is recreated at the swap: pgzm rebuilds materialized views before the swap, so make it read the tables directly, or drop it before the migration and recreate it afterwards",
                    qualified_display(&name.schema, &name.name),
                    qualified_display(&view.schema, &view.name)
                ));
                continue;
            }
            dependents.push(Dependent {
                object: format!(
                    "materialized view {}",
                    qualified_display(&name.schema, &name.name)
                ),
                on: self.why[&('m', oid)].clone(),
                action: "self.rebuilt over the new tables before the swap (with its indexes) and swapped in by rename; the old one joins the backup set".into(),
            });
            matviews.push(MatviewPlan {
                shadow: prefixed(SHADOW, &name.name),
                matview: m.matview.clone(),
                owner: Some(m.owner.clone()),
                grants: m.grants.clone(),
                from_source: false,
            });
        }
        matviews
    }
}

/// The source's types, sequences, multirange types and indexes, each with its shadow name.
struct ShadowMoves {
    types: Vec<Move>,
    sequences: Vec<Move>,
    multiranges: Vec<Move>,
    indexes: Vec<Move>,
}

impl ShadowMoves {
    fn of(source: &SourceSchema) -> Self {
        let shadow = |kind, schema: &str, name: &str| {
            Move::in_schema(kind, schema, name.to_string(), prefixed(SHADOW, name))
        };
        ShadowMoves {
            types: source
                .types
                .iter()
                .map(|t| shadow(ObjectKind::Type, &t.schema, &t.name))
                .collect(),
            sequences: source
                .sequences
                .iter()
                .map(|s| shadow(ObjectKind::Sequence, &s.schema, &s.name))
                .collect(),
            multiranges: source
                .types
                .iter()
                .filter_map(|t| match &t.kind {
                    crate::catalog::UserTypeKind::Range {
                        multirange: Some(m),
                        ..
                    } => Some(shadow(ObjectKind::Type, &t.schema, m)),
                    _ => None,
                })
                .collect(),
            indexes: source
                .tables
                .iter()
                .flat_map(|t| {
                    let constraints = t
                        .constraints
                        .iter()
                        .filter(|c| c.has_index())
                        .map(|c| &c.name);
                    constraints
                        .chain(t.indexes.iter().map(|i| &i.name))
                        .map(|name| shadow(ObjectKind::Index, &t.schema, name))
                })
                .collect(),
        }
    }
}

/// The live tables replaced, with their indexes and owned sequences, moved to backup names;
/// with the partitions and inheritance children of those that the source does not have: they
/// stay attached to their parent, so they join the backup set with it (listed, verified,
/// restored and dropped with it), and are listed as dependents.
fn replaced_tables(
    source: &SourceSchema,
    dest: &Destination,
    tables: &[TablePlan],
    dependents: &mut Vec<Dependent>,
) -> Vec<Move> {
    let backup_of = |name: &str| prefixed(BACKUP, name);
    let mut to_backup = Vec::new();
    let mut seen: BTreeSet<QualName> = BTreeSet::new();
    let mut stack: Vec<(QualName, Option<QualName>)> =
        tables.iter().rev().map(|t| (t.qualname(), None)).collect();
    let mut replaced_live: Vec<&crate::destination::LiveTable> = Vec::new();
    while let Some((name, parent)) = stack.pop() {
        let Some(live) = dest.tables.get(&name) else {
            continue;
        };
        if !seen.insert(name.clone()) {
            continue;
        }
        if let Some(parent) = parent {
            dependents.push(Dependent {
                object: format!("table {}", name.plain()),
                on: format!("table {}", parent.plain()),
                action: "a partition or child of a replaced table that the source does not have: joins the backup set with it".into(),
            });
        }
        replaced_live.push(live);
        for child in &live.children {
            // Children listed are in their parent's schema.
            let child = name.sibling(child.clone());
            if source.table(&child).is_none() {
                stack.push((child, Some(name.clone())));
            }
        }
    }
    for live in replaced_live {
        let schema = live.schema.as_str();
        to_backup.push(Move::in_schema(
            ObjectKind::Table,
            schema,
            live.name.clone(),
            backup_of(&live.name),
        ));
        for i in &live.indexes {
            to_backup.push(Move::in_schema(
                ObjectKind::Index,
                schema,
                i.clone(),
                backup_of(i),
            ));
        }
        for s in &live.owned_sequences {
            to_backup.push(Move::in_schema(
                ObjectKind::Sequence,
                schema,
                s.clone(),
                backup_of(s),
            ));
        }
    }
    to_backup
}

/// Live sequences and types whose names the source's take (and that are not parts of a
/// replaced table, already in `backed_up`): moved to backup names.
fn replaced_types_and_sequences(
    dest: &Destination,
    shadows: &ShadowMoves,
    backed_up: &[Move],
) -> Vec<Move> {
    let taken: BTreeSet<QualName> = backed_up
        .iter()
        .map(|m| QualName::new(m.schema.clone(), m.from.clone()))
        .collect();
    let from = |m: &Move| QualName::new(m.schema.clone(), m.from.clone());
    let sequences = shadows
        .sequences
        .iter()
        .filter(|s| dest.sequence_acl.contains_key(&from(s)) && !taken.contains(&from(s)))
        .map(|s| {
            Move::in_schema(
                ObjectKind::Sequence,
                &s.schema,
                s.from.clone(),
                prefixed(BACKUP, &s.from),
            )
        });
    let types = shadows
        .types
        .iter()
        .chain(&shadows.multiranges)
        .filter(|t| dest.type_oids.contains_key(&from(t)) && !dest.tables.contains_key(&from(t)))
        .map(|t| {
            Move::in_schema(
                ObjectKind::Type,
                &t.schema,
                t.from.clone(),
                prefixed(BACKUP, &t.from),
            )
        });
    sequences.chain(types).collect()
}

/// The renames that bring the new objects to their live names: tables, materialized views,
/// types, sequences and indexes.
fn live_moves(tables: &[TablePlan], shadows: &ShadowMoves, matviews: &[MatviewPlan]) -> Vec<Move> {
    tables
        .iter()
        .map(|t| {
            Move::in_schema(
                ObjectKind::Table,
                &t.schema,
                t.shadow.clone(),
                t.name.clone(),
            )
        })
        .chain(matviews.iter().map(|mv| Move {
            kind: ObjectKind::MaterializedView,
            schema: crate::name::common(&mv.matview.schema),
            from: mv.shadow.as_str().into(),
            to: mv.matview.name.as_str().into(),
            oid: None,
        }))
        .chain(
            shadows
                .types
                .iter()
                .chain(&shadows.multiranges)
                .chain(&shadows.sequences)
                .chain(&shadows.indexes)
                .map(|m| Move {
                    from: m.to.clone(),
                    to: m.from.clone(),
                    ..m.clone()
                }),
        )
        .collect()
}

/// A migrated table's foreign key to a table the filters left out references the live table
/// of that name: the destination must have it.
fn keys_to_excluded_tables(source: &SourceSchema, dest: &Destination) -> Vec<String> {
    let excluded: BTreeSet<&QualName> = source.excluded.iter().collect();
    source
        .tables
        .iter()
        .flat_map(|t| t.constraints.iter().map(move |c| (t, c)))
        .filter_map(|(t, c)| {
            let target = c.references.as_ref()?;
            (excluded.contains(target) && !dest.tables.contains_key(target)).then(|| {
                format!(
                    "foreign key \"{}\" of table {} references {}, which the table filters leave out and the destination does not have: include it, or create it in the destination first",
                    c.name,
                    t.qualname().plain(),
                    target.plain()
                )
            })
        })
        .collect()
}

/// Foreign keys of destination-only tables (and of tables in other schemas) that reference a
/// replaced table: re-pointed at the new table at the swap, and listed as dependents.
fn foreign_key_repoints(
    source: &SourceSchema,
    dest: &Destination,
    earlier: &Earlier,
    dependents: &mut Vec<Dependent>,
) -> Vec<ForeignKeyRepoint> {
    let source_names = source.table_names();
    let foreign_keys: Vec<ForeignKeyRepoint> = dest
        .foreign_keys_in
        .iter()
        .filter(|fk| source_names.contains(&fk.references))
        .filter(|fk| {
            let table = QualName::new(fk.schema.clone(), fk.table.clone());
            !dest.schemas.contains(&fk.schema)
                || (!source_names.contains(&table)
                    && dest.tables.contains_key(&table)
                    && !is_tool_object(&table, earlier))
        })
        .map(|fk| ForeignKeyRepoint {
            schema: fk.schema.clone(),
            table: fk.table.clone(),
            name: fk.name.clone(),
            references: fk.references.name.to_string(),
            references_schema: fk.references.schema.to_string(),
            definition: fk.definition.clone(),
        })
        .collect();
    for fk in &foreign_keys {
        dependents.push(Dependent {
            object: format!(
                "foreign key {} on table {}",
                crate::rewrite::display_ident(&fk.name),
                qualified_display(&fk.schema, &fk.table)
            ),
            on: format!(
                "table {}",
                qualified_display(&fk.references_schema, &fk.references)
            ),
            action:
                "re-pointed at the new table at the swap (NOT VALID, validated after the commit)"
                    .into(),
        });
    }
    foreign_keys
}

/// The source's functions the destination lacks (to create with the shadow tables); a function
/// that differs, or a routine the new objects need that the destination lacks, is a problem.
fn functions_to_create(
    source: &SourceSchema,
    dest: &Destination,
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut create = Vec::new();
    for f in &source.functions {
        match dest.functions.get(&f.signature) {
            None => create.push((f.signature.clone(), f.definition.clone())),
            Some(def) if def.trim() == f.definition.trim() => {}
            Some(_) => problems.push(format!(
                "function {} differs between source and destination: the new tables (their triggers, defaults, checks, indexes or views) would use the destination's version; make them equal first",
                f.signature
            )),
        }
    }
    for t in &source.required_types {
        if !dest.type_qualnames.contains(&t.schema, &t.name) {
            problems.push(format!(
                "type {} is used by the migrated tables and its schema is not migrated, and the destination does not have it: add --schema {}, or create the type in the destination first",
                t.plain(),
                crate::rewrite::display_ident(&t.schema)
            ));
        }
    }
    for (signature, what) in &source.required_routines {
        if !dest.routines.contains(signature) {
            problems.push(format!(
                "{what} {signature} is used by the migrated tables or views and the destination does not have it: pgzm does not create it; create it in the destination first"
            ));
        }
    }
    create
}

/// The source's extensions the destination lacks but can create: (name, schema). One it
/// cannot create is a problem.
fn extensions_to_create(
    source: &SourceSchema,
    dest: &Destination,
    problems: &mut Vec<String>,
) -> Vec<(String, String)> {
    let mut create = Vec::new();
    let mut missing = Vec::new();
    for (ext, schema) in &source.extensions {
        if dest.extensions.contains(ext) {
            continue;
        }
        if dest.available_extensions.contains(ext) {
            create.push((ext.clone(), schema.clone()));
        } else {
            missing.push(ext.clone());
        }
    }
    if !missing.is_empty() {
        problems.push(format!(
            "extensions used by the source are not available on the destination server: {}; install them there first",
            missing.join(", ")
        ));
    }
    create
}

fn table_plan(t: &Table, source: &SourceSchema, dest: &Destination) -> TablePlan {
    TablePlan {
        schema: t.schema.clone(),
        name: t.name.clone(),
        shadow: prefixed(SHADOW, &t.name).into(),
        backup: dest
            .tables
            .get(&t.qualname())
            .map(|_| prefixed(BACKUP, &t.name).into()),
        copy_columns: t.copy_columns(),
        estimated_rows: t.estimated_rows,
        estimated_bytes: t.estimated_bytes,
        estimated_copy_bytes: t.estimated_copy_bytes,
        pages: t.pages,
        partitioned: t.is_partitioned(),
        copy_data: !source.without_data.contains(&t.qualname()),
        evidence: None,
    }
}

/// Whether `name` is a backup or leftover shadow table of an earlier run (leftovers are
/// recorded by name and oid: a name in any schema counts).
fn is_tool_object(name: &QualName, earlier: &Earlier) -> bool {
    earlier.backup_set.as_ref().is_some_and(|(_, moves)| {
        moves
            .iter()
            .any(|m| m.to == name.name && m.schema == name.schema)
    }) || earlier
        .leftovers
        .iter()
        .any(|(_, objs)| objs.tables.iter().any(|(n, _)| *n == name.name))
}

/// What follows the swap besides the tables: views, functions and materialized views, found
/// together because each can make the others depend on a replaced object.
struct Followers {
    views: Vec<ViewPlan>,
    functions: Vec<FunctionPlan>,
    matviews: Vec<MatviewPlan>,
}

/// Source views are created in the swap (replacing a destination view of the same name).
/// Destination objects bound to a replaced object follow it, to a fixpoint: views (in any
/// schema) that read a replaced relation or call a recreated function are recreated; functions
/// whose signature or SQL body uses a replaced relation's row type, a replaced type or a
/// recreated view are recreated (the old one joins the backup set). Materialized views and
/// aggregates bound to a replaced object make the plan refuse.
fn plan_dependents(
    source: &SourceSchema,
    dest: &Destination,
    tables: &[TablePlan],
    to_backup: &mut Vec<Move>,
    dependents: &mut Vec<Dependent>,
    problems: &mut Vec<String>,
) -> Followers {
    let mut views = Vec::new();
    // Replaced relations (oid → description), growing as views are found.
    let mut replaced: BTreeMap<u32, String> = tables
        .iter()
        .filter_map(|t| dest.tables.get(&t.qualname()))
        .map(|t| {
            (
                t.oid,
                format!("table {}", qualified_display(&t.schema, &t.name)),
            )
        })
        .collect();
    let replaced_types: BTreeMap<u32, String> = to_backup
        .iter()
        .filter(|m| m.kind == ObjectKind::Type)
        .filter_map(|m| {
            let name = QualName::new(m.schema.clone(), m.from.clone());
            dest.type_oids.get(&name).map(|o| (*o, name))
        })
        .map(|(o, n)| (o, format!("type {}", n.plain())))
        .collect();
    let source_views: BTreeSet<QualName> = source
        .views
        .iter()
        .map(|v| QualName::new(v.schema.clone(), v.name.clone()))
        .collect();
    let source_matviews: BTreeSet<QualName> = source
        .matviews
        .iter()
        .map(|m| QualName::new(m.schema.clone(), m.name.clone()))
        .collect();
    // Source materialized views replace destination ones of the same name.
    for m in &source.matviews {
        let key = QualName::new(m.schema.clone(), m.name.clone());
        if let Some(live) = dest.materialized_views.get(&key) {
            replaced.insert(live.oid, format!("materialized view {}", key.plain()));
        }
    }
    for v in &source.views {
        let key = QualName::new(v.schema.clone(), v.name.clone());
        let live = dest.views.get(&key);
        if let Some(live) = live {
            replaced.insert(live.oid, format!("view {}", key.plain()));
        }
        views.push(ViewPlan {
            schema: v.schema.clone(),
            name: v.name.clone(),
            definition: v.definition.clone(),
            options: v.options.clone(),
            owner: live.map(|l| l.owner.clone()),
            grants: live.map(|l| l.grants.clone()).unwrap_or_default(),
            comment: v.comment.clone(),
            from_source: true,
        });
    }
    let found = Affected::find(
        dest,
        &source_views,
        &source_matviews,
        replaced,
        &replaced_types,
    );
    views.extend(found.view_plans(source, dependents, problems));
    for v in &views {
        if dest
            .views
            .contains_key(&QualName::new(v.schema.clone(), v.name.clone()))
        {
            to_backup.insert(
                0,
                Move {
                    kind: ObjectKind::View,
                    schema: crate::name::common(&v.schema),
                    from: v.name.as_str().into(),
                    to: prefixed(BACKUP, &v.name).into(),
                    oid: None,
                },
            );
        }
    }
    let planned = found.function_plans(to_backup, dependents, problems);
    let matviews = found.matview_plans(source, dest, dependents, problems);
    for mv in &matviews {
        let key = QualName::new(mv.matview.schema.clone(), mv.matview.name.clone());
        if let Some(live) = dest.materialized_views.get(&key) {
            to_backup.push(Move {
                kind: ObjectKind::MaterializedView,
                schema: key.schema.clone(),
                from: key.name.as_str().into(),
                to: prefixed(BACKUP, &key.name).into(),
                oid: None,
            });
            for (index, _) in &live.matview.indexes {
                to_backup.push(Move {
                    kind: ObjectKind::Index,
                    schema: key.schema.clone(),
                    from: index.as_str().into(),
                    to: prefixed(BACKUP, index).into(),
                    oid: None,
                });
            }
        }
    }
    Followers {
        views,
        functions: planned,
        matviews,
    }
}

/// `schema.name`, each part quoted only when PostgreSQL would need it (for messages).
pub fn qualified_display(schema: &str, name: &str) -> String {
    QualName::new(schema, name).plain()
}

/// Orders renames so that one vacating a name comes before the one taking it (`shadow_x → x`
/// before `shadow_shadow_x → shadow_x`), keeping the order otherwise.
pub fn order_renames(moves: &mut [Move]) {
    // Kahn's algorithm over "vacates the name I take": a move waits for every move whose
    // current name is its new name. Among the ready moves the earliest goes first; when none is
    // ready (a cycle), the earliest left goes. O(n log n): at 10 000 tables the quadratic
    // version took minutes. The moves are looked up by name through index lists sorted by
    // name (4 bytes a move; maps of names to moves were ~9 MB at 10 000 tables, the peak of
    // the plan).
    fn key<'a>(m: &'a Move, name: &'a str) -> (bool, &'a str, &'a str) {
        (m.kind == ObjectKind::Function, m.schema.as_str(), name)
    }
    fn from(m: &Move) -> (bool, &str, &str) {
        key(m, &m.from)
    }
    fn to(m: &Move) -> (bool, &str, &str) {
        key(m, &m.to)
    }
    /// The indices of `moves` sorted by `name_of`.
    fn sorted(moves: &[Move], name_of: fn(&Move) -> (bool, &str, &str)) -> Vec<u32> {
        let mut ix: Vec<u32> = (0..moves.len() as u32).collect();
        ix.sort_unstable_by(|&a, &b| name_of(&moves[a as usize]).cmp(&name_of(&moves[b as usize])));
        ix
    }
    /// The indices in `sorted` (by `name_of`) of the moves whose name is `k`.
    fn equal<'s>(
        moves: &[Move],
        sorted: &'s [u32],
        name_of: fn(&Move) -> (bool, &str, &str),
        k: (bool, &str, &str),
    ) -> &'s [u32] {
        let start = sorted.partition_point(|&i| name_of(&moves[i as usize]) < k);
        let len = sorted[start..].partition_point(|&i| name_of(&moves[i as usize]) == k);
        &sorted[start..start + len]
    }
    let n = moves.len();
    let by_from = sorted(moves, from);
    let mut waiting_on: Vec<u32> = moves
        .iter()
        .map(|m| equal(moves, &by_from, from, to(m)).len() as u32)
        .collect();
    drop(by_from);
    let by_to = sorted(moves, to);
    let mut ready: BinaryHeap<Reverse<u32>> = (0..n as u32)
        .filter(|&i| waiting_on[i as usize] == 0)
        .map(Reverse)
        .collect();
    let mut done = vec![false; n];
    let mut earliest_left = 0;
    let mut order: Vec<u32> = Vec::with_capacity(n);
    while order.len() < n {
        let next = loop {
            match ready.pop() {
                Some(Reverse(i)) if !done[i as usize] => break i as usize,
                Some(_) => continue,
                None => {
                    while done[earliest_left] {
                        earliest_left += 1;
                    }
                    break earliest_left;
                }
            }
        };
        done[next] = true;
        order.push(next as u32);
        for &j in equal(moves, &by_to, to, from(&moves[next])) {
            let j = j as usize;
            waiting_on[j] -= 1;
            if waiting_on[j] == 0 && !done[j] {
                ready.push(Reverse(j as u32));
            }
        }
    }
    // Put the move `order[p]` at `p`, one cycle of the permutation at a time, by swaps.
    let mut placed = done;
    placed.fill(false);
    for start in 0..n {
        let mut p = start;
        while !placed[p] {
            placed[p] = true;
            let q = order[p] as usize;
            if q == start {
                break;
            }
            moves.swap(p, q);
            p = q;
        }
    }
}

/// The destination's namespaces as the plan's steps change them: relations and types share
/// pg_class/pg_type names per schema; functions have their own. Each is the destination's
/// names (borrowed) with this plan's changes on top, kept in one map entry per name touched (a
/// set per namespace and change, then a copy of every name, were ~20 MB at 10 000 tables, the
/// peak of the plan).
struct Namespaces<'a> {
    /// The destination's names, by [`Space`].
    destination: [&'a crate::destination::NameSet; 3],
    /// Every name the plan frees or takes, with what it did to it.
    changed: HashMap<NameKey<'a>, Changes>,
}

/// (schema, name).
type NameKey<'a> = (&'a str, &'a str);

/// A namespace: relations (pg_class), types (pg_type), functions (pg_proc).
#[derive(Debug, Clone, Copy)]
enum Space {
    Relations = 0,
    Types = 1,
    Functions = 2,
}

/// Why the plan takes a name (so a clash between two of the migration's own objects is not
/// blamed on the destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Shadow,
    Backup,
    Live,
    View,
}

impl Claim {
    fn reason(self) -> &'static str {
        match self {
            Claim::Shadow => "needed for a shadow object",
            Claim::Backup => "needed for the backup set",
            Claim::Live => "the name a migrated object takes at the swap",
            Claim::View => "the name of a view created at the swap",
        }
    }
}

/// What the plan did to one name: per [`Space`], whether it took it (bit `2 × space`) and
/// whether it freed it (bit `2 × space + 1`); and its latest claim of the name.
#[derive(Debug, Clone, Copy, Default)]
struct Changes {
    bits: u8,
    claim: Option<Claim>,
}

impl Changes {
    fn taken(self, space: Space) -> bool {
        self.bits & (1 << (2 * space as u8)) != 0
    }

    fn freed(self, space: Space) -> bool {
        self.bits & (2 << (2 * space as u8)) != 0
    }
}

impl<'a> Namespaces<'a> {
    fn of(dest: &'a Destination) -> Self {
        Namespaces {
            destination: [
                &dest.relation_names,
                &dest.type_qualnames,
                &dest.function_names,
            ],
            changed: HashMap::new(),
        }
    }

    /// Whether `name` is taken in `space`: by the plan, or by the destination and not freed.
    fn contains(&self, space: Space, name: &NameKey<'a>) -> bool {
        let changes = self.changed.get(name).copied().unwrap_or_default();
        changes.taken(space)
            || (!changes.freed(space) && self.destination[space as usize].contains(name.0, name.1))
    }

    fn insert(&mut self, space: Space, name: NameKey<'a>) {
        self.changed.entry(name).or_default().bits |= 1 << (2 * space as u8);
    }

    fn remove(&mut self, space: Space, name: &NameKey<'a>) {
        let c = self.changed.entry(*name).or_default();
        c.bits = (c.bits & !(1 << (2 * space as u8))) | (2 << (2 * space as u8));
    }

    fn release(&mut self, m: &'a Move) {
        let key = (m.schema.as_str(), m.from.as_str());
        if m.kind.is_relation() {
            self.remove(Space::Relations, &key);
        }
        if m.kind.has_row_type() {
            self.remove(Space::Types, &key);
        }
        if m.kind == ObjectKind::Function {
            self.remove(Space::Functions, &key);
        }
    }

    /// Takes `name` for `why`; on a clash, the reason of the plan's own earlier claim (`None`
    /// when the destination had the name).
    fn claim_for(
        &mut self,
        kind: ObjectKind,
        name: NameKey<'a>,
        why: Claim,
    ) -> Result<(), Option<Claim>> {
        let free = self.claim(kind, name);
        let earlier = self.changed.entry(name).or_default().claim.replace(why);
        if free {
            Ok(())
        } else {
            Err(earlier)
        }
    }

    /// Takes `name`; false when it is already taken.
    fn claim(&mut self, kind: ObjectKind, name: NameKey<'a>) -> bool {
        let taken = match kind {
            ObjectKind::Function => self.contains(Space::Functions, &name),
            k if k.is_relation() => {
                self.contains(Space::Relations, &name)
                    || (k == ObjectKind::Table && self.contains(Space::Types, &name))
            }
            _ => self.contains(Space::Types, &name),
        };
        if kind.is_relation() {
            self.insert(Space::Relations, name);
        }
        if kind.has_row_type() {
            self.insert(Space::Types, name);
        }
        if kind == ObjectKind::Function {
            self.insert(Space::Functions, name);
        }
        !taken
    }
}

/// Simulates every naming step on the destination's namespaces and reports collisions.
fn check_names<'a>(
    dest: &'a Destination,
    earlier: &'a Earlier,
    shadows: impl Iterator<Item = (ObjectKind, &'a str, &'a str)>,
    to_backup: &'a [Move],
    to_live: &'a [Move],
    views: &'a [ViewPlan],
    problems: &mut Vec<String>,
) {
    let mut ns = Namespaces::of(dest);
    // Leftovers and the previous backup set are dropped (or moved aside) before the names are
    // needed. Their records name objects without a schema: the name is freed in each migrated
    // schema (they are dropped by oid, wherever they are).
    let in_each = |name: &'a str| dest.schemas.iter().map(move |s| (s.as_str(), name));
    for (_, objs) in &earlier.leftovers {
        for (name, _) in objs.tables.iter().chain(&objs.sequences) {
            for key in in_each(name) {
                ns.remove(Space::Relations, &key);
                ns.remove(Space::Types, &key);
            }
        }
        for (name, _) in &objs.types {
            for key in in_each(name) {
                ns.remove(Space::Types, &key);
            }
        }
        for name in &objs.indexes {
            for key in in_each(name) {
                ns.remove(Space::Relations, &key);
            }
        }
        for (schema, name, _) in &objs.matviews {
            let key = (schema.as_str(), name.as_str());
            ns.remove(Space::Relations, &key);
            ns.remove(Space::Types, &key);
        }
    }
    if let Some((_, moves)) = &earlier.backup_set {
        for m in moves {
            let key = (m.schema.as_str(), m.to.as_str());
            if m.kind == ObjectKind::Function {
                ns.remove(Space::Functions, &key);
            } else {
                ns.remove(Space::Relations, &key);
                ns.remove(Space::Types, &key);
            }
        }
    }
    let mut claim = |ns: &mut Namespaces<'a>,
                     kind: ObjectKind,
                     schema: &'a str,
                     name: &'a str,
                     why: Claim| {
        if let Err(earlier) = ns.claim_for(kind, (schema, name), why) {
            let shown = qualified_display(schema, name);
            let why = why.reason();
            problems.push(match earlier {
                None => format!(
                    "the destination already has an object named {shown} ({why}) that pgzm did not create: rename or drop it first"
                ),
                Some(earlier) => format!(
                    "two objects of this migration need the name {shown} ({}, and {why}): rename one of them in the source",
                    earlier.reason()
                ),
            });
        }
    };
    for (kind, schema, name) in shadows {
        claim(&mut ns, kind, schema, name, Claim::Shadow);
    }
    // The swap's renames, in the order it runs them: those before the locks (indexes, types,
    // routines), backup then live, then the rest.
    for early in [true, false] {
        for (moves, why) in [(to_backup, Claim::Backup), (to_live, Claim::Live)] {
            for m in moves
                .iter()
                .filter(|m| m.kind.renamed_before_locks() == early)
            {
                ns.release(m);
                claim(&mut ns, m.kind, &m.schema, &m.to, why);
            }
        }
    }
    for v in views {
        claim(&mut ns, ObjectKind::View, &v.schema, &v.name, Claim::View);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The original quadratic definition: repeatedly the first move whose new name no move
    /// left still holds, else the first left.
    fn reference(moves: &mut Vec<Move>) {
        let key = |m: &Move, name: &str| {
            (
                m.kind == ObjectKind::Function,
                m.schema.to_string(),
                name.to_string(),
            )
        };
        let mut remaining: Vec<Move> = std::mem::take(moves);
        while !remaining.is_empty() {
            let froms: BTreeSet<(bool, String, String)> =
                remaining.iter().map(|m| key(m, &m.from)).collect();
            let next = remaining
                .iter()
                .position(|m| !froms.contains(&key(m, &m.to)))
                .unwrap_or(0);
            moves.push(remaining.remove(next));
        }
    }

    fn mv(kind: ObjectKind, schema: &str, from: &str, to: &str) -> Move {
        Move {
            kind,
            schema: schema.into(),
            from: from.into(),
            to: to.into(),
            oid: None,
        }
    }

    fn names(moves: &[Move]) -> Vec<String> {
        moves
            .iter()
            .map(|m| format!("{:?} {}.{}→{}", m.kind, m.schema, m.from, m.to))
            .collect()
    }

    #[test]
    fn a_move_vacating_a_name_goes_before_the_one_taking_it() {
        let mut moves = vec![
            mv(ObjectKind::Table, "public", "shadow_shadow_x", "shadow_x"),
            mv(ObjectKind::Table, "public", "shadow_x", "x"),
            mv(ObjectKind::Table, "public", "x", "backup_x"),
        ];
        order_renames(&mut moves);
        assert_eq!(
            names(&moves),
            [
                "Table public.x→backup_x",
                "Table public.shadow_x→x",
                "Table public.shadow_shadow_x→shadow_x"
            ]
        );
    }

    #[test]
    fn the_linear_order_equals_the_reference_order_on_random_plans() {
        // Small name pools make chains, shared names and cycles (a→b, b→a) frequent.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let kinds = [ObjectKind::Table, ObjectKind::Function, ObjectKind::Index];
        let schemas = ["public", "s"];
        for _ in 0..2000 {
            let n = next(12) as usize;
            let pool = 1 + next(8);
            let mut moves: Vec<Move> = (0..n)
                .map(|_| {
                    mv(
                        kinds[next(3) as usize],
                        schemas[next(2) as usize],
                        &format!("n{}", next(pool)),
                        &format!("n{}", next(pool)),
                    )
                })
                .collect();
            let mut expected = moves.clone();
            reference(&mut expected);
            order_renames(&mut moves);
            assert_eq!(names(&moves), names(&expected));
        }
    }
}
