//! The plan: every name the migration will create, move and drop, checked against the
//! destination before anything changes.
//!
//! Names are simulated through every step (clean leftovers, create shadows, drop the previous
//! backup set, rename live → backup, rename shadow → live) on a model of the destination's
//! relation and type namespaces; any step that would hit an existing name the tool does not own
//! makes the plan refuse, so a collision is found before the first change, never in the middle
//! of the swap.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::catalog::{SourceSchema, Table};
use crate::destination::{Destination, Grant};
use crate::naming::{prefixed, BACKUP, SHADOW};
use crate::rewrite::Renames;
use crate::state::RecordedObjects;

/// Kind of a renamed object (decides the `ALTER … RENAME` form).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
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
        }
    }

    /// Whether the object lives in pg_class (relations share one namespace per schema).
    pub fn is_relation(self) -> bool {
        !matches!(self, ObjectKind::Type)
    }
}

/// One rename: `from` → `to`, both unquoted names in `public`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// Kind.
    pub kind: ObjectKind,
    /// Current name.
    pub from: String,
    /// New name.
    pub to: String,
}

/// A table to migrate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TablePlan {
    /// Live name (the source's name).
    pub name: String,
    /// Shadow table name.
    pub shadow: String,
    /// Backup name of the live table it replaces, if the destination has one.
    pub backup: Option<String>,
    /// Columns copied.
    pub copy_columns: Vec<String>,
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
}

/// A view created in the swap transaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewPlan {
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForeignKeyRepoint {
    /// Referencing table (not migrated).
    pub table: String,
    /// Constraint name.
    pub name: String,
    /// Referenced table (migrated).
    pub references: String,
    /// Constraint definition.
    pub definition: String,
}

/// The whole plan of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Trigger functions missing in the destination, created with the shadow tables
    /// (signature, definition).
    pub functions_to_create: Vec<(String, String)>,
    /// Extensions to create in the destination (name, schema).
    pub extensions_to_create: Vec<(String, String)>,
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
    /// tables (added and validated) and the source's triggers on preserved tables.
    #[serde(default)]
    pub deferred: Vec<String>,
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
            r.insert(&t.name, &t.shadow);
        }
        for m in self
            .types
            .iter()
            .chain(&self.sequences)
            .chain(&self.indexes)
        {
            r.insert(&m.from, &m.to);
        }
        r
    }

    /// Whether `table` is preserved.
    pub fn is_preserved(&self, table: &str) -> bool {
        self.preserved.iter().any(|p| p.table == table)
    }

    /// The table plan of that name.
    pub fn table(&self, name: &str) -> Option<&TablePlan> {
        self.tables.iter().find(|t| t.name == name)
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
    let mut problems: Vec<String> = source.unsupported.clone();
    let mut warnings = Vec::new();
    if source.tables.is_empty() {
        problems.push("the source has no tables in schema public: nothing to migrate".into());
    }

    let mut tables: Vec<TablePlan> = source.tables.iter().map(|t| table_plan(t, dest)).collect();
    tables.sort_by(|a, b| {
        b.estimated_bytes
            .cmp(&a.estimated_bytes)
            .then_with(|| a.name.cmp(&b.name))
    });

    let shadow_of = |name: &str| prefixed(SHADOW, name);
    let backup_of = |name: &str| prefixed(BACKUP, name);
    let types: Vec<Move> = source
        .types
        .iter()
        .map(|t| Move {
            kind: ObjectKind::Type,
            from: t.name.clone(),
            to: shadow_of(&t.name),
        })
        .collect();
    let sequences: Vec<Move> = source
        .sequences
        .iter()
        .map(|s| Move {
            kind: ObjectKind::Sequence,
            from: s.name.clone(),
            to: shadow_of(&s.name),
        })
        .collect();
    let mut indexes = Vec::new();
    for t in &source.tables {
        for c in t.constraints.iter().filter(|c| c.has_index()) {
            indexes.push(Move {
                kind: ObjectKind::Index,
                from: c.name.clone(),
                to: shadow_of(&c.name),
            });
        }
        for i in &t.indexes {
            indexes.push(Move {
                kind: ObjectKind::Index,
                from: i.name.clone(),
                to: shadow_of(&i.name),
            });
        }
    }

    // Live objects that move to backup names: replaced tables with all their indexes and owned
    // sequences, and live types, sequences and views whose names the new objects take.
    let mut to_backup = Vec::new();
    let mut backed_up_relations = BTreeSet::new();
    for t in &tables {
        if let Some(live) = dest.tables.get(&t.name) {
            to_backup.push(Move {
                kind: ObjectKind::Table,
                from: live.name.clone(),
                to: backup_of(&live.name),
            });
            for i in &live.indexes {
                to_backup.push(Move {
                    kind: ObjectKind::Index,
                    from: i.clone(),
                    to: backup_of(i),
                });
                backed_up_relations.insert(i.clone());
            }
            for s in &live.owned_sequences {
                to_backup.push(Move {
                    kind: ObjectKind::Sequence,
                    from: s.clone(),
                    to: backup_of(s),
                });
                backed_up_relations.insert(s.clone());
            }
            backed_up_relations.insert(live.name.clone());
        }
    }
    for s in &sequences {
        if dest.sequence_acl.contains_key(&s.from) && !backed_up_relations.contains(&s.from) {
            to_backup.push(Move {
                kind: ObjectKind::Sequence,
                from: s.from.clone(),
                to: backup_of(&s.from),
            });
            backed_up_relations.insert(s.from.clone());
        }
    }
    for ty in &types {
        if dest.type_names.contains(&ty.from) && !dest.tables.contains_key(&ty.from) {
            to_backup.push(Move {
                kind: ObjectKind::Type,
                from: ty.from.clone(),
                to: backup_of(&ty.from),
            });
        }
    }

    let views = plan_views(
        source,
        dest,
        &tables,
        &mut to_backup,
        &mut warnings,
        &mut problems,
    );
    refuse_materialized_views(dest, &tables, &views, &mut problems);

    let mut to_live: Vec<Move> = tables
        .iter()
        .map(|t| Move {
            kind: ObjectKind::Table,
            from: t.shadow.clone(),
            to: t.name.clone(),
        })
        .collect();
    for m in types.iter().chain(&sequences).chain(&indexes) {
        to_live.push(Move {
            kind: m.kind,
            from: m.to.clone(),
            to: m.from.clone(),
        });
    }

    let source_names = source.table_names();
    let foreign_keys: Vec<ForeignKeyRepoint> = dest
        .foreign_keys_in
        .iter()
        .filter(|fk| {
            source_names.contains(fk.references.as_str())
                && !source_names.contains(fk.table.as_str())
        })
        .filter(|fk| dest.tables.contains_key(&fk.table))
        .filter(|fk| !is_tool_object(&fk.table, earlier))
        .map(|fk| ForeignKeyRepoint {
            table: fk.table.clone(),
            name: fk.name.clone(),
            references: fk.references.clone(),
            definition: fk.definition.clone(),
        })
        .collect();
    for fk in &foreign_keys {
        warnings.push(format!(
            "foreign key \"{}\" of destination-only table \"{}\" will be re-pointed to the new \"{}\" (validated after the swap)",
            fk.name, fk.table, fk.references
        ));
    }

    let mut functions_to_create = Vec::new();
    for f in &source.functions {
        match dest.functions.get(&f.signature) {
            None => functions_to_create.push((f.signature.clone(), f.definition.clone())),
            Some(def) if def.trim() == f.definition.trim() => {}
            Some(_) => problems.push(format!(
                "function {} differs between source and destination: the new tables' triggers would call the destination's version; make them equal first",
                f.signature
            )),
        }
    }

    let mut extensions_to_create = Vec::new();
    let mut missing_extensions = Vec::new();
    for (ext, schema) in &source.extensions {
        if dest.extensions.contains(ext) {
            continue;
        }
        if dest.available_extensions.contains(ext) {
            extensions_to_create.push((ext.clone(), schema.clone()));
        } else {
            missing_extensions.push(ext.clone());
        }
    }
    if !missing_extensions.is_empty() {
        problems.push(format!(
            "extensions used by the source are not available on the destination server: {}; install them there first",
            missing_extensions.join(", ")
        ));
    }

    let shadows: Vec<Move> = tables
        .iter()
        .map(|t| Move {
            kind: ObjectKind::Table,
            from: t.name.clone(),
            to: t.shadow.clone(),
        })
        .chain(types.iter().cloned())
        .chain(sequences.iter().cloned())
        .chain(indexes.iter().cloned())
        .collect();
    check_names(
        dest,
        earlier,
        &shadows,
        &to_backup,
        &to_live,
        &views,
        &mut problems,
    );

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Plan {
        migration_id,
        source: source_label,
        tables,
        types,
        sequences,
        indexes,
        to_backup,
        to_live,
        views,
        foreign_keys,
        functions_to_create,
        extensions_to_create,
        previous_backup: earlier.backup_set.as_ref().map(|(id, _)| *id),
        leftovers: earlier.leftovers.iter().map(|(id, _)| *id).collect(),
        warnings,
        preserved: Vec::new(),
        deferred: Vec::new(),
    })
}

fn table_plan(t: &Table, dest: &Destination) -> TablePlan {
    TablePlan {
        name: t.name.clone(),
        shadow: prefixed(SHADOW, &t.name),
        backup: dest.tables.get(&t.name).map(|_| prefixed(BACKUP, &t.name)),
        copy_columns: t.copy_columns(),
        estimated_rows: t.estimated_rows,
        estimated_bytes: t.estimated_bytes,
        estimated_copy_bytes: t.estimated_copy_bytes,
        pages: t.pages,
    }
}

fn is_tool_object(name: &str, earlier: &Earlier) -> bool {
    earlier
        .backup_set
        .as_ref()
        .is_some_and(|(_, moves)| moves.iter().any(|m| m.to == name))
        || earlier
            .leftovers
            .iter()
            .any(|(_, objs)| objs.tables.iter().any(|(n, _)| n == name))
}

/// Source views are created in the swap (replacing a destination view of the same name);
/// destination views that read a replaced table or view are recreated so they read the new ones.
fn plan_views(
    source: &SourceSchema,
    dest: &Destination,
    tables: &[TablePlan],
    to_backup: &mut Vec<Move>,
    warnings: &mut Vec<String>,
    problems: &mut Vec<String>,
) -> Vec<ViewPlan> {
    let mut out = Vec::new();
    let mut replaced_oids: BTreeSet<u32> = tables
        .iter()
        .filter_map(|t| dest.tables.get(&t.name))
        .map(|t| t.oid)
        .collect();
    let source_views: BTreeSet<&str> = source.views.iter().map(|v| v.name.as_str()).collect();
    for v in &source.views {
        let live = dest.views.get(&v.name);
        if let Some(live) = live {
            replaced_oids.insert(live.oid);
        }
        out.push(ViewPlan {
            name: v.name.clone(),
            definition: v.definition.clone(),
            options: v.options.clone(),
            owner: live.map(|l| l.owner.clone()),
            grants: live.map(|l| l.grants.clone()).unwrap_or_default(),
            comment: v.comment.clone(),
            from_source: true,
        });
    }
    // Destination-only views reading replaced relations, transitively, in dependency order.
    let mut affected: BTreeMap<u32, &crate::destination::LiveView> = BTreeMap::new();
    loop {
        let before = affected.len();
        for v in dest.views.values() {
            if source_views.contains(v.name.as_str()) || affected.contains_key(&v.oid) {
                continue;
            }
            if v.depends_on.iter().any(|d| replaced_oids.contains(d)) {
                affected.insert(v.oid, v);
                replaced_oids.insert(v.oid);
            }
        }
        if affected.len() == before {
            break;
        }
    }
    let deps: BTreeMap<u32, BTreeSet<u32>> = affected
        .values()
        .map(|v| (v.oid, v.depends_on.clone()))
        .collect();
    for oid in crate::catalog::topological_order(affected.keys().copied().collect(), &deps) {
        let v = affected[&oid];
        // The view is recreated over the new tables: each column it reads must exist there.
        for (table, column) in &v.columns {
            if let Some(t) = source.table(table) {
                if !t.columns.iter().any(|c| &c.name == column) {
                    problems.push(format!(
                        "destination view \"{}\" reads column \"{table}\".\"{column}\", which the source's \"{table}\" does not have: change or drop the view first",
                        v.name
                    ));
                }
            }
        }
        warnings.push(format!("destination view \"{}\" reads migrated tables: it will be recreated to read the new ones", v.name));
        out.push(ViewPlan {
            name: v.name.clone(),
            definition: v.definition.clone(),
            options: v.options.clone(),
            owner: Some(v.owner.clone()),
            grants: v.grants.clone(),
            comment: v.comment.clone(),
            from_source: false,
        });
    }
    for v in &out {
        if dest.views.contains_key(&v.name) {
            to_backup.insert(
                0,
                Move {
                    kind: ObjectKind::View,
                    from: v.name.clone(),
                    to: prefixed(BACKUP, &v.name),
                },
            );
        }
    }
    out
}

/// A destination materialized view that reads a replaced table (directly or through views and
/// other materialized views) would keep reading the backup after the swap and would block
/// dropping that backup set later; pgzm does not rebuild materialized views, so the plan refuses.
fn refuse_materialized_views(
    dest: &Destination,
    tables: &[TablePlan],
    views: &[ViewPlan],
    problems: &mut Vec<String>,
) {
    let mut replaced: BTreeMap<u32, String> = tables
        .iter()
        .filter_map(|t| dest.tables.get(&t.name))
        .map(|t| (t.oid, t.name.clone()))
        .chain(
            views
                .iter()
                .filter_map(|v| dest.views.get(&v.name))
                .map(|v| (v.oid, v.name.clone())),
        )
        .collect();
    let mut found: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    loop {
        let before = found.len();
        for (name, (oid, reads)) in &dest.materialized_views {
            if found.contains_key(name.as_str()) {
                continue;
            }
            let hits: Vec<String> = reads
                .iter()
                .filter_map(|r| replaced.get(r))
                .map(|n| format!("\"{n}\""))
                .collect();
            if !hits.is_empty() {
                found.insert(name, hits);
                replaced.insert(*oid, name.clone());
            }
        }
        if found.len() == before {
            break;
        }
    }
    for (name, hits) in found {
        problems.push(format!(
            "destination materialized view \"{name}\" reads {} which the migration replaces: it would keep reading the old data and block dropping the backup later; pgzm does not rebuild materialized views, so drop it before the migration and recreate it afterwards",
            hits.join(", ")
        ));
    }
}

/// Simulates every naming step on the destination's namespaces and reports collisions.
fn check_names(
    dest: &Destination,
    earlier: &Earlier,
    shadows: &[Move],
    to_backup: &[Move],
    to_live: &[Move],
    views: &[ViewPlan],
    problems: &mut Vec<String>,
) {
    let mut relations: BTreeSet<String> = dest.relation_names.clone();
    let mut types: BTreeSet<String> = dest.type_names.clone();
    // Leftovers and the previous backup set are dropped before the names are needed.
    for (_, objs) in &earlier.leftovers {
        for (name, _) in objs.tables.iter().chain(&objs.sequences) {
            relations.remove(name);
            types.remove(name);
        }
        for (name, _) in &objs.types {
            types.remove(name);
        }
        for name in &objs.indexes {
            relations.remove(name);
        }
    }
    if let Some((_, moves)) = &earlier.backup_set {
        for m in moves {
            relations.remove(&m.to);
            types.remove(&m.to);
        }
    }
    let mut claim = |kind: ObjectKind,
                     name: &str,
                     why: &str,
                     relations: &mut BTreeSet<String>,
                     types: &mut BTreeSet<String>| {
        let taken = if kind.is_relation() {
            relations.contains(name)
        } else {
            types.contains(name)
        } || (kind == ObjectKind::Table && types.contains(name));
        if taken {
            problems.push(format!(
                "the destination already has an object named \"{name}\" ({why}) that pgzm did not create: rename or drop it first"
            ));
        }
        if kind.is_relation() {
            relations.insert(name.to_string());
        }
        if matches!(
            kind,
            ObjectKind::Type | ObjectKind::Table | ObjectKind::View
        ) {
            types.insert(name.to_string());
        }
    };
    for m in shadows {
        claim(
            m.kind,
            &m.to,
            "needed for a shadow object",
            &mut relations,
            &mut types,
        );
    }
    for m in to_backup {
        release(m, &mut relations, &mut types);
        claim(
            m.kind,
            &m.to,
            "needed for the backup set",
            &mut relations,
            &mut types,
        );
    }
    for m in to_live {
        release(m, &mut relations, &mut types);
    }
    for m in to_live {
        claim(
            m.kind,
            &m.to,
            "the name a migrated object takes at the swap",
            &mut relations,
            &mut types,
        );
    }
    for v in views {
        claim(
            ObjectKind::View,
            &v.name,
            "the name of a view created at the swap",
            &mut relations,
            &mut types,
        );
    }
}

fn release(m: &Move, relations: &mut BTreeSet<String>, types: &mut BTreeSet<String>) {
    if m.kind.is_relation() {
        relations.remove(&m.from);
    }
    if matches!(
        m.kind,
        ObjectKind::Type | ObjectKind::Table | ObjectKind::View
    ) {
        types.remove(&m.from);
    }
}
