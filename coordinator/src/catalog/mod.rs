//! The source's migrated schemas (`public` unless chosen) as read from pg_catalog, as typed
//! rows.
//!
//! Every query here runs inside the coordinator's snapshot transaction on the source, so the
//! schema and the copied data describe the same instant. The session's `search_path` is set to
//! `pg_catalog` first, so every expression PostgreSQL prints (`pg_get_expr`,
//! `pg_get_constraintdef`, `pg_get_indexdef`, `pg_get_viewdef`, `format_type`) names objects of
//! the migrated schemas schema-qualified; [`crate::rewrite`] relies on that to point them at shadow objects.

mod queries;

use std::collections::BTreeSet;

use tokio_postgres::Client;

use crate::error::CoordinatorError;
pub use crate::name::Name;
pub use crate::naming::QualName;

pub use queries::{
    matviews_by_oid, read_schema, server_version, topological_order, VIEW_DEPENDENCIES_SQL,
};

/// Object id of a catalog row.
pub type Oid = u32;

/// Everything a table-swap migration carries from the source.
#[derive(Debug, Clone, Default)]
pub struct SourceSchema {
    /// The source server's `server_version_num`.
    pub server_version: i32,
    /// The schemas migrated.
    pub schemas: Vec<String>,
    /// Ordinary and partitioned tables of the schemas (extension members excluded), by
    /// schema and name.
    pub tables: Vec<Table>,
    /// User-defined types of the schemas that the tables use.
    pub types: Vec<UserType>,
    /// Sequences owned by the tables' columns or used by their defaults.
    pub sequences: Vec<Sequence>,
    /// Views of the schemas, in dependency order (a view after the views it reads).
    pub views: Vec<View>,
    /// Materialized views of the schemas, in dependency order.
    pub matviews: Vec<Matview>,
    /// Functions of the schemas that the tables' triggers, defaults, checks and indexes call.
    pub functions: Vec<Function>,
    /// Routines the migrated objects use that pgzm does not create (aggregates, functions of
    /// other schemas): (signature, what it is), required to exist in the destination.
    pub required_routines: Vec<(String, String)>,
    /// Types of schemas that are not migrated (and not of an extension) that the migrated
    /// objects use: required to exist in the destination.
    pub required_types: Vec<QualName>,
    /// Extensions installed in the source (name, schema).
    pub extensions: Vec<(String, String)>,
    /// Objects the migration cannot carry, with the reason (the plan refuses when not empty).
    pub unsupported: Vec<String>,
    /// Tables the filters left out: not migrated (they stay as they are in the destination).
    pub excluded: Vec<QualName>,
    /// Tables migrated without their rows (`--exclude-table-data`).
    pub without_data: BTreeSet<QualName>,
    /// [`SourceSchema::table`]'s index of `tables`.
    pub table_index: crate::naming::NameIndex,
    /// [`SourceSchema::owned_sequences`]'s index of `sequences`.
    pub sequence_owners: crate::naming::GroupIndex,
}

impl SourceSchema {
    /// The table of that name.
    pub fn table(&self, name: &QualName) -> Option<&Table> {
        self.table_index
            .find(&self.tables, name, |t| (&t.schema, &t.name))
    }

    /// The sequences owned by a column of `t` (serial and identity), in `sequences`' order.
    pub fn owned_sequences(&self, t: &Table) -> Vec<&Sequence> {
        // An owned sequence is in its table's schema.
        self.sequence_owners
            .find(&self.sequences, &t.qualname(), |s| {
                s.owned_by
                    .as_ref()
                    .map(|(table, _)| (s.schema.as_str(), table.as_str()))
            })
    }

    /// Names of all tables.
    pub fn table_names(&self) -> BTreeSet<QualName> {
        self.tables.iter().map(Table::qualname).collect()
    }
}

/// A table and everything defined on it.
#[derive(Debug, Clone)]
pub struct Table {
    /// pg_class oid in the source.
    pub oid: Oid,
    /// Schema (unquoted).
    pub schema: Name,
    /// Unquoted name.
    pub name: Name,
    /// `p` permanent or `u` unlogged.
    pub persistence: char,
    /// Storage parameters (`fillfactor=70`).
    pub reloptions: Vec<String>,
    /// Columns in attnum order (dropped columns left out).
    pub columns: Vec<Column>,
    /// Constraints other than NOT NULL.
    pub constraints: Vec<Constraint>,
    /// Indexes that do not back a constraint.
    pub indexes: Vec<Index>,
    /// Non-internal triggers.
    pub triggers: Vec<Trigger>,
    /// COMMENT ON TABLE.
    pub comment: Option<String>,
    /// Planner estimate of rows (`reltuples`, -1 when never analysed).
    pub estimated_rows: i64,
    /// Heap + TOAST + index pages, in bytes, from `relpages` (no lock taken).
    pub estimated_bytes: i64,
    /// Heap pages (`relpages`), for splitting the copy into page ranges.
    pub pages: i64,
    /// Expected binary COPY bytes from the column statistics (0 without statistics): the
    /// progress estimate.
    pub estimated_copy_bytes: i64,
    /// `PARTITION BY …` key (`pg_get_partkeydef`) of a partitioned table.
    pub partition_key: Option<String>,
    /// The partitioned table this one is a partition of, and its bound
    /// (`FOR VALUES …` or `DEFAULT`).
    pub partition_of: Option<(QualName, String)>,
    /// Inheritance parents (not partitioning), in `inhseqno` order.
    pub inherits: Vec<QualName>,
}

impl Table {
    /// Its schema-qualified name.
    pub fn qualname(&self) -> QualName {
        QualName::new(self.schema.clone(), self.name.clone())
    }

    /// Whether it is a partitioned table (no storage of its own: nothing to copy).
    pub fn is_partitioned(&self) -> bool {
        self.partition_key.is_some()
    }

    /// Columns that COPY carries (stored generated columns are recomputed by the destination).
    pub fn copy_columns(&self) -> Vec<Name> {
        self.columns
            .iter()
            .filter(|c| c.more().generated.is_none())
            .map(|c| c.name.clone())
            .collect()
    }
}

/// Identity kind of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// GENERATED ALWAYS AS IDENTITY
    Always,
    /// GENERATED BY DEFAULT AS IDENTITY
    ByDefault,
}

/// A column.
#[derive(Debug, Clone)]
pub struct Column {
    /// Unquoted name.
    pub name: Name,
    /// `format_type(atttypid, atttypmod)`, qualified.
    pub type_sql: Name,
    /// Type oid.
    pub type_oid: Oid,
    /// Element type oid when the type is an array (0 otherwise).
    pub elem_type_oid: Oid,
    /// NOT NULL.
    pub not_null: bool,
    /// Default expression (not for generated columns).
    pub default: Option<Name>,
    /// Identity.
    pub identity: Option<Identity>,
    /// What most columns lack, boxed (`None`: all unset): a column was ~230 bytes, 11 MB at
    /// 10 000 tables of five columns, held through the whole run.
    pub more: Option<Box<ColumnMore>>,
}

/// The attributes most columns do not have.
#[derive(Debug, Clone, Default)]
pub struct ColumnMore {
    /// Sequence behind an identity column.
    pub identity_sequence: Option<String>,
    /// Expression of a generated column.
    pub generated: Option<String>,
    /// Whether the generated column is virtual (PostgreSQL 18), not stored.
    pub generated_virtual: bool,
    /// The name of its NOT NULL constraint (PostgreSQL 18 names them).
    pub not_null_name: Option<String>,
    /// Collation, qualified, when it differs from the type's default.
    pub collation: Option<String>,
    /// COMMENT ON COLUMN.
    pub comment: Option<String>,
    /// The relation (pg_class oid in the source) whose row type the column's type is, or is an
    /// array of; 0 for any other type.
    pub row_type_of: Oid,
}

/// A column's [`ColumnMore`] when it has none.
static NO_MORE: ColumnMore = ColumnMore {
    identity_sequence: None,
    generated: None,
    generated_virtual: false,
    not_null_name: None,
    collation: None,
    comment: None,
    row_type_of: 0,
};

impl Column {
    /// Its less common attributes (all unset for most columns).
    pub fn more(&self) -> &ColumnMore {
        self.more.as_deref().unwrap_or(&NO_MORE)
    }

    /// Its less common attributes, to set one.
    pub fn more_mut(&mut self) -> &mut ColumnMore {
        self.more.get_or_insert_with(Default::default)
    }
}

/// A table constraint (primary key, unique, exclusion, check, foreign key).
#[derive(Debug, Clone)]
pub struct Constraint {
    /// Unquoted name.
    pub name: String,
    /// `p`, `u`, `x`, `c` or `f`.
    pub kind: char,
    /// `pg_get_constraintdef`, qualified.
    pub definition: Name,
    /// Referenced table for foreign keys.
    pub references: Option<QualName>,
    /// Whether the constraint was validated in the source (NOT VALID ones are re-added NOT VALID).
    pub validated: bool,
    /// COMMENT ON CONSTRAINT.
    pub comment: Option<String>,
    /// Foreign keys: the referencing columns, in key order.
    pub columns: Vec<Name>,
    /// Foreign keys: the referenced columns, in key order.
    pub ref_columns: Vec<Name>,
    /// Foreign keys: `MATCH FULL`.
    pub match_full: bool,
}

impl Constraint {
    /// Whether the constraint owns an index (its name is then a relation name in the schema).
    pub fn has_index(&self) -> bool {
        matches!(self.kind, 'p' | 'u' | 'x')
    }
}

/// An index not backing a constraint.
#[derive(Debug, Clone)]
pub struct Index {
    /// Unquoted name.
    pub name: String,
    /// `pg_get_indexdef`, qualified.
    pub definition: String,
    /// COMMENT ON INDEX.
    pub comment: Option<String>,
}

/// A trigger.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// Unquoted name.
    pub name: String,
    /// `pg_get_triggerdef`, qualified.
    pub definition: String,
    /// Whether the trigger is enabled (`tgenabled` other than `D`).
    pub enabled: bool,
}

/// A user-defined type used by the tables.
#[derive(Debug, Clone)]
pub struct UserType {
    /// pg_type oid.
    pub oid: Oid,
    /// Schema (unquoted).
    pub schema: String,
    /// Array type oid.
    pub array_oid: Oid,
    /// Unquoted name.
    pub name: String,
    /// What it is.
    pub kind: UserTypeKind,
    /// COMMENT ON TYPE.
    pub comment: Option<String>,
}

/// Enum or domain.
#[derive(Debug, Clone)]
pub enum UserTypeKind {
    /// Enum with its labels in sort order.
    Enum(Vec<String>),
    /// Domain over a base type.
    Domain {
        /// Base type, qualified.
        base_type_sql: String,
        /// Base type oid (a domain over a user type is created after it).
        base_type_oid: Oid,
        /// NOT NULL.
        not_null: bool,
        /// DEFAULT expression.
        default: Option<String>,
        /// Collation, qualified, when not the base type's.
        collation: Option<String>,
        /// CHECK constraints (name, definition).
        checks: Vec<(String, String)>,
    },
    /// Composite type: attributes (name, type qualified, type oid, collation qualified when not
    /// the type's default).
    Composite(Vec<(String, String, Oid, Option<String>)>),
    /// Range type.
    Range {
        /// Subtype, qualified.
        subtype_sql: String,
        /// Subtype oid (a range over a user type is created after it).
        subtype_oid: Oid,
        /// Subtype operator class, qualified, when not the default.
        opclass: Option<String>,
        /// Collation, qualified, when not the subtype's.
        collation: Option<String>,
        /// `subtype_diff` function, qualified.
        subdiff: Option<String>,
        /// Name of its multirange type (PostgreSQL 14 and later).
        multirange: Option<String>,
    },
}

/// A sequence carried with the tables.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// pg_class oid.
    pub oid: Oid,
    /// Schema (unquoted).
    pub schema: String,
    /// Unquoted name.
    pub name: String,
    /// Data type (`integer`, `bigint`, `smallint`).
    pub type_sql: String,
    /// START WITH.
    pub start: i64,
    /// INCREMENT BY.
    pub increment: i64,
    /// MINVALUE.
    pub min: i64,
    /// MAXVALUE.
    pub max: i64,
    /// CACHE.
    pub cache: i64,
    /// CYCLE.
    pub cycle: bool,
    /// Owning column (table, column), for serial and identity sequences (the table is in the
    /// sequence's schema: PostgreSQL requires it).
    pub owned_by: Option<(String, String)>,
    /// Whether this is an identity column's internal sequence.
    pub identity: bool,
    /// `last_value` in the source.
    pub last_value: i64,
    /// `is_called` in the source.
    pub is_called: bool,
    /// Columns whose default uses it (table, column), owned or not.
    pub used_by: Vec<(QualName, String)>,
}

/// A view of the source.
#[derive(Debug, Clone)]
pub struct View {
    /// Schema (unquoted).
    pub schema: String,
    /// Unquoted name.
    pub name: String,
    /// `pg_get_viewdef`, qualified.
    pub definition: String,
    /// View options (`security_barrier=true`, `check_option=local`).
    pub options: Vec<String>,
    /// COMMENT ON VIEW.
    pub comment: Option<String>,
}

/// A materialized view: a definition, indexes, and whether it holds data.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Matview {
    /// Schema.
    #[serde(default = "crate::naming::public_schema")]
    pub schema: String,
    /// Unquoted name.
    pub name: String,
    /// `pg_get_viewdef`, qualified.
    pub definition: String,
    /// Populated (`relispopulated`): created `WITH DATA`.
    pub populated: bool,
    /// Indexes: (name, `pg_get_indexdef`).
    pub indexes: Vec<(String, String)>,
    /// Storage parameters.
    pub options: Vec<String>,
    /// COMMENT ON MATERIALIZED VIEW.
    pub comment: Option<String>,
}

/// A function called by a table trigger.
#[derive(Debug, Clone)]
pub struct Function {
    /// `name(argtypes)` as `regprocedure` prints it, qualified.
    pub signature: String,
    /// `pg_get_functiondef`.
    pub definition: String,
}

/// Reads the source schema inside the caller's snapshot transaction, on `client` and on
/// `second` (a session in the same snapshot, or `client` again).
pub async fn read(
    client: &Client,
    second: &Client,
    schemas: &[String],
    filter: &crate::filter::TableFilter,
) -> Result<SourceSchema, CoordinatorError> {
    read_schema(client, second, schemas, filter).await
}
