//! What the destination holds before a migration: live tables and their dependent objects,
//! privileges to carry over, names that could collide, extensions, and the tool's own metadata.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use tokio_postgres::{Client, Row};

use crate::catalog::Oid;
use crate::error::CoordinatorError;
use crate::name::Name;

/// A live table of one of the destination's migrated schemas.
#[derive(Debug, Clone)]
pub struct LiveTable {
    /// pg_class oid.
    pub oid: Oid,
    /// Schema.
    pub schema: Name,
    /// Unquoted name.
    pub name: String,
    /// Owner role name.
    pub owner: Name,
    /// Table privileges.
    pub grants: Vec<Grant>,
    /// Column privileges: (column, grant).
    pub column_grants: Vec<(String, Grant)>,
    /// ENABLE ROW LEVEL SECURITY.
    pub row_security: bool,
    /// FORCE ROW LEVEL SECURITY.
    pub force_row_security: bool,
    /// Policies (name, permissive, command, roles, USING, WITH CHECK), expressions qualified.
    pub policies: Vec<Policy>,
    /// Names of all its indexes (including constraint indexes).
    pub indexes: Vec<String>,
    /// Sequences owned by its columns (serial and identity).
    pub owned_sequences: Vec<String>,
    /// Its partitions and inheritance children in the same schema.
    pub children: Vec<String>,
}

impl LiveTable {
    /// A row of [`TABLES`]; column privileges and policies are read apart.
    fn from_row(row: &Row) -> Self {
        LiveTable {
            oid: row.get("oid"),
            schema: crate::name::common(row.get("schema_name")),
            name: row.get("name"),
            owner: crate::name::common(row.get("owner")),
            row_security: row.get("row_security"),
            force_row_security: row.get("force_row_security"),
            grants: parse_grants(row.get("grants")),
            column_grants: Vec::new(),
            policies: Vec::new(),
            indexes: row.get("indexes"),
            owned_sequences: row.get("owned_sequences"),
            children: row.get("children"),
        }
    }
}

/// Who a privilege is granted to: the PUBLIC pseudo-role (every role), or one role, which may
/// itself be named `"PUBLIC"`.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(from = "GranteeRecord")]
pub enum Grantee {
    /// Every role (written `"PUBLIC"` in recorded plans, as before roles were told apart).
    #[serde(rename = "PUBLIC")]
    Public,
    /// One role, by name (recorded as `{"Role": name}`).
    Role(String),
}

impl Grantee {
    /// The grantee of an `aclexplode` row: `''` (grantee 0) is PUBLIC.
    pub fn from_acl(name: String) -> Grantee {
        if name.is_empty() {
            Grantee::Public
        } else {
            Grantee::Role(name)
        }
    }

    /// As it goes into `GRANT … TO`.
    pub fn sql(&self) -> String {
        match self {
            Grantee::Public => "PUBLIC".to_string(),
            Grantee::Role(name) => pgzm_pg::sql::quote_ident(name),
        }
    }
}

/// A grantee as recorded: this version's form, or a bare role name from plans recorded before
/// roles were told apart from PUBLIC (where `"PUBLIC"` meant the pseudo-role).
#[derive(serde::Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum GranteeRecord {
    Role {
        #[serde(rename = "Role")]
        role: String,
    },
    Bare(String),
}

impl From<GranteeRecord> for Grantee {
    fn from(r: GranteeRecord) -> Self {
        match r {
            GranteeRecord::Role { role } => Grantee::Role(role),
            GranteeRecord::Bare(name) if name == "PUBLIC" => Grantee::Public,
            GranteeRecord::Bare(name) => Grantee::Role(name),
        }
    }
}

/// One privilege granted on an object.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Grant {
    /// PUBLIC or a role.
    pub grantee: Grantee,
    /// SELECT, INSERT, USAGE…
    pub privilege: String,
    /// WITH GRANT OPTION.
    pub grantable: bool,
}

/// A row-level-security policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Unquoted name.
    pub name: String,
    /// PERMISSIVE (true) or RESTRICTIVE.
    pub permissive: bool,
    /// ALL, SELECT, INSERT, UPDATE, DELETE.
    pub command: String,
    /// The roles it applies to (PUBLIC, or roles, one of which may be named `public`).
    pub roles: Vec<Grantee>,
    /// USING expression.
    pub using: Option<String>,
    /// WITH CHECK expression.
    pub with_check: Option<String>,
}

impl Policy {
    /// A row of a policy query (here and in [`crate::dependents`]): columns `name`,
    /// `permissive`, `command` (`pg_policy.polcmd`), `roles`, `using_expr`, `with_check`.
    pub(crate) fn from_row(row: &Row) -> Self {
        let command = match row.get::<_, &str>("command") {
            "r" => "SELECT",
            "a" => "INSERT",
            "w" => "UPDATE",
            "d" => "DELETE",
            _ => "ALL",
        };
        Policy {
            name: row.get("name"),
            permissive: row.get("permissive"),
            command: command.into(),
            roles: row
                .get::<_, Vec<String>>("roles")
                .into_iter()
                .map(Grantee::from_acl)
                .collect(),
            using: row.get("using_expr"),
            with_check: row.get("with_check"),
        }
    }
}

pub use crate::naming::QualName;

/// A view of the destination (any schema but the system's and the tool's).
#[derive(Debug, Clone)]
pub struct LiveView {
    /// pg_class oid.
    pub oid: Oid,
    /// Schema.
    pub schema: String,
    /// Unquoted name.
    pub name: String,
    /// `pg_get_viewdef`, qualified.
    pub definition: String,
    /// reloptions.
    pub options: Vec<String>,
    /// Owner.
    pub owner: String,
    /// Privileges.
    pub grants: Vec<Grant>,
    /// COMMENT ON VIEW.
    pub comment: Option<String>,
    /// Relations (oids) it reads.
    pub depends_on: BTreeSet<Oid>,
    /// Functions (oids) it calls.
    pub calls: BTreeSet<Oid>,
    /// Columns it reads: (relation, column).
    pub columns: Vec<(QualName, String)>,
}

/// A materialized view of the destination.
#[derive(Debug, Clone)]
pub struct LiveMatview {
    /// pg_class oid.
    pub oid: Oid,
    /// Relations it reads (oids).
    pub reads: BTreeSet<Oid>,
    /// Definition, indexes, population, comment.
    pub matview: crate::catalog::Matview,
    /// Owner.
    pub owner: String,
    /// Privileges.
    pub grants: Vec<Grant>,
}

/// A foreign key from a table the migration does not replace to one it does.
#[derive(Debug, Clone)]
pub struct ForeignKeyIn {
    /// Schema of the referencing table.
    pub schema: String,
    /// Referencing table.
    pub table: String,
    /// Constraint name.
    pub name: String,
    /// Referenced (swapped) table.
    pub references: QualName,
    /// `pg_get_constraintdef`, qualified.
    pub definition: String,
}

impl ForeignKeyIn {
    /// A row of [`FOREIGN_KEYS`].
    fn from_row(row: &Row) -> Self {
        ForeignKeyIn {
            schema: row.get("schema_name"),
            table: row.get("table_name"),
            name: row.get("name"),
            references: QualName::from_columns(row, "referenced_schema", "referenced_table"),
            definition: row.get("definition"),
        }
    }
}

/// The names taken in one namespace (relations, types or routines) of every schema, for
/// collision checks. Grouped by schema, so a schema's name is stored once rather than in each
/// of the ~50 000 names of a 10 000-table database, and looked up without building a
/// [`QualName`].
#[derive(Debug, Clone, Default)]
pub struct NameSet {
    by_schema: HashMap<Box<str>, HashSet<Box<str>>>,
}

impl NameSet {
    /// Adds `schema.name`.
    pub fn insert(&mut self, schema: &str, name: &str) {
        let names = match self.by_schema.get_mut(schema) {
            Some(names) => names,
            None => self.by_schema.entry(schema.into()).or_default(),
        };
        names.insert(name.into());
    }

    /// Whether `schema.name` is taken.
    pub fn contains(&self, schema: &str, name: &str) -> bool {
        self.by_schema
            .get(schema)
            .is_some_and(|names| names.contains(name))
    }

    /// Adds the `schema_name`, `name` columns of a catalog row.
    fn insert_row(&mut self, row: &Row) {
        self.insert(row.get("schema_name"), row.get("name"));
    }
}

/// Snapshot of the destination.
#[derive(Debug, Clone, Default)]
pub struct Destination {
    /// The destination server's `server_version_num`.
    pub server_version: i32,
    /// The server's `autovacuum_analyze_threshold`: a copied table with fewer rows is not
    /// analyzed (see `build::TableBuild::skip_statistics`). 0 (the default here): every table is.
    pub analyze_threshold: i64,
    /// The schemas read (the migrated ones).
    pub schemas: Vec<String>,
    /// Live tables of the migrated schemas.
    pub tables: BTreeMap<QualName, LiveTable>,
    /// Views by schema-qualified name, in every schema but the system's and the tool's.
    pub views: BTreeMap<QualName, LiveView>,
    /// Materialized views by schema-qualified name.
    pub materialized_views: BTreeMap<QualName, LiveMatview>,
    /// Functions and procedures whose signature or body depends on a relation or a user type
    /// (the candidates to follow a swap).
    pub typed_functions: Vec<TypedFunction>,
    /// Every user type of the migrated schemas (array types and the row types of tables, views
    /// and sequences excluded; standalone composite types kept), with its oid.
    pub type_oids: BTreeMap<QualName, Oid>,
    /// Names of every relation (table, index, sequence, view…) in every schema.
    pub relation_names: NameSet,
    /// Names of every type in every schema (array types excluded).
    pub type_qualnames: NameSet,
    /// Names of every function and procedure in every schema.
    pub function_names: NameSet,
    /// Owner and grants of sequences and types by name, to carry to their replacements.
    pub sequence_acl: BTreeMap<QualName, (String, Vec<Grant>)>,
    /// Owner and grants of user types by name.
    pub type_acl: BTreeMap<QualName, (String, Vec<Grant>)>,
    /// Installed extensions.
    pub extensions: BTreeSet<String>,
    /// Extensions the server could install.
    pub available_extensions: BTreeSet<String>,
    /// Foreign keys of tables not in the migration that reference tables of it (filled by the
    /// planner's request, see [`read`]).
    pub foreign_keys_in: Vec<ForeignKeyIn>,
    /// Signatures of functions in the migrated schemas (`regprocedure` text) and their
    /// definitions.
    pub functions: BTreeMap<String, String>,
    /// Signatures (`regprocedure` text, qualified) of every routine outside the system schemas.
    pub routines: BTreeSet<String>,
    /// Whether the current user is a superuser.
    pub superuser: bool,
    /// Every schema of the destination.
    pub existing_schemas: BTreeSet<String>,
    /// The owner a created schema gets: the database's owner when the connected role can act
    /// as it, else the connected role.
    pub schema_owner: String,
}

impl Destination {
    /// Drops what only the planning needs (names taken, views, functions, keys into the
    /// tables…), keeping what building the shadow set and resuming it read: the server version,
    /// the live tables' oids, owners, privileges and policies, and the types' and sequences'
    /// privileges. At 10 000 tables the rest is ~25 MB held through the copy for nothing.
    pub fn keep_for_build(&mut self) {
        let Destination {
            server_version: _,
            analyze_threshold: _,
            schemas: _,
            tables,
            views,
            materialized_views,
            typed_functions,
            type_oids,
            relation_names,
            type_qualnames,
            function_names,
            sequence_acl: _,
            type_acl: _,
            extensions,
            available_extensions,
            foreign_keys_in,
            functions,
            routines,
            superuser: _,
            existing_schemas,
            schema_owner: _,
        } = self;
        for t in tables.values_mut() {
            for names in [&mut t.indexes, &mut t.owned_sequences, &mut t.children] {
                *names = Vec::new();
            }
        }
        *views = BTreeMap::new();
        *materialized_views = BTreeMap::new();
        *typed_functions = Vec::new();
        *type_oids = BTreeMap::new();
        *foreign_keys_in = Vec::new();
        *functions = BTreeMap::new();
        for set in [relation_names, type_qualnames, function_names] {
            *set = NameSet::default();
        }
        for set in [extensions, available_extensions, routines, existing_schemas] {
            *set = BTreeSet::new();
        }
    }

    /// Once the shadow set is built: keeps only the live tables `keep` names (the preserved
    /// ones, whose oids the sync triggers record), dropping the privileges that were carried to
    /// the shadow objects (~9 MB at 10 000 tables, held through the copy otherwise).
    pub fn keep_for_copy(&mut self, keep: impl Fn(&QualName) -> bool) {
        self.keep_for_build();
        self.tables.retain(|name, _| keep(name));
        self.sequence_acl = BTreeMap::new();
        self.type_acl = BTreeMap::new();
    }
}

const TABLES: &str = "
SELECT c.oid, n.nspname::text AS schema_name, c.relname::text AS name, pg_get_userbyid(c.relowner)::text AS owner,
       c.relrowsecurity AS row_security, c.relforcerowsecurity AS force_row_security,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants,
       ARRAY(SELECT i.relname::text FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid ORDER BY 1) AS indexes,
       ARRAY(SELECT s.relname::text FROM pg_depend d JOIN pg_class s ON s.oid = d.objid
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = c.oid AND d.deptype IN ('a', 'i') AND s.relkind = 'S' ORDER BY 1) AS owned_sequences,
       ARRAY(SELECT ch.relname::text FROM pg_inherits i JOIN pg_class ch ON ch.oid = i.inhrelid
             WHERE i.inhparent = c.oid AND ch.relnamespace = c.relnamespace ORDER BY 1) AS children
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'p')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

const COLUMN_GRANTS: &str = "
SELECT a.attrelid AS table_oid, a.attname::text AS column_name,
       CASE WHEN x.grantee = 0 THEN '' ELSE pg_get_userbyid(x.grantee)::text END AS grantee,
       x.privilege_type, x.is_grantable
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(a.attacl) x
WHERE n.nspname = ANY($1::text[]) AND a.attacl IS NOT NULL AND a.attnum > 0 AND NOT a.attisdropped";

const POLICIES: &str = "
SELECT p.polrelid AS table_oid, p.polname::text AS name, p.polpermissive AS permissive, p.polcmd::text AS command,
       ARRAY(SELECT CASE WHEN r = 0 THEN '' ELSE pg_get_userbyid(r)::text END FROM unnest(p.polroles) r) AS roles,
       pg_get_expr(p.polqual, p.polrelid) AS using_expr, pg_get_expr(p.polwithcheck, p.polrelid) AS with_check
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) ORDER BY p.polname";

const RELATION_NAMES: &str = "
SELECT n.nspname::text AS schema_name, c.relname::text AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND NOT n.nspname ^@ 'pg_toast'";

const TYPE_NAMES: &str = "
SELECT n.nspname::text AS schema_name, t.typname::text AS name FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND NOT n.nspname ^@ 'pg_toast' AND t.typcategory <> 'A'";

const ROUTINES: &str = "
SELECT n.nspname::text AS schema_name, p.proname::text AS name, p.oid::regprocedure::text AS signature
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')";

const TYPES: &str = "
SELECT t.oid, n.nspname::text AS schema_name, t.typname::text AS name, pg_get_userbyid(t.typowner)::text AS owner,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(t.typacl) a WHERE a.grantee <> t.typowner) AS grants
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = ANY($1::text[]) AND t.typcategory <> 'A'
  AND (t.typrelid = 0 OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')";

const SEQUENCE_ACL: &str = "
SELECT n.nspname::text AS schema_name, c.relname::text AS name, pg_get_userbyid(c.relowner)::text AS owner,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind = 'S'";

/// A function (or procedure) of the destination whose signature or body depends on relations
/// or user types: a migrated table's row type, an enum the migration replaces, …
#[derive(Debug, Clone)]
pub struct TypedFunction {
    /// pg_proc oid.
    pub oid: Oid,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `regprocedure` text, qualified (`public.f(public.customer)`).
    pub signature: String,
    /// `f` function, `p` procedure, `a` aggregate, `w` window.
    pub kind: char,
    /// `pg_get_functiondef` (None for aggregates).
    pub definition: Option<String>,
    /// Owner.
    pub owner: String,
    /// Privileges, or None for the default (EXECUTE to PUBLIC).
    pub grants: Option<Vec<Grant>>,
    /// COMMENT ON FUNCTION.
    pub comment: Option<String>,
    /// Relations whose row type (or array of it) it uses, or that its body reads (SQL-standard
    /// bodies).
    pub relations: BTreeSet<Oid>,
    /// Other types it uses (element types of arrays resolved).
    pub types: BTreeSet<Oid>,
}

impl TypedFunction {
    /// A row of [`TYPED_FUNCTIONS`].
    fn from_row(row: &Row) -> Self {
        let default_acl: bool = row.get("default_acl");
        TypedFunction {
            oid: row.get("oid"),
            schema: row.get("schema_name"),
            name: row.get("name"),
            signature: row.get("signature"),
            kind: row.get::<_, String>("kind").chars().next().unwrap_or('f'),
            definition: row.get("definition"),
            owner: row.get("owner"),
            grants: (!default_acl).then(|| parse_grants(row.get("grants"))),
            comment: row.get("comment"),
            relations: row.get::<_, Vec<Oid>>("relations").into_iter().collect(),
            types: row.get::<_, Vec<Oid>>("types").into_iter().collect(),
        }
    }
}

const TYPED_FUNCTIONS: &str = "
WITH refs AS (
    SELECT d.objid AS fn,
           CASE WHEN d.refclassid = 'pg_class'::regclass THEN d.refobjid
                ELSE coalesce(nullif(t.typrelid, 0), nullif(e.typrelid, 0)) END AS rel,
           CASE WHEN d.refclassid = 'pg_type'::regclass AND coalesce(nullif(t.typrelid, 0), nullif(e.typrelid, 0)) IS NULL
                THEN coalesce(e.oid, t.oid) END AS typ
    FROM pg_depend d
    LEFT JOIN pg_type t ON d.refclassid = 'pg_type'::regclass AND t.oid = d.refobjid
    LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
    WHERE d.classid = 'pg_proc'::regclass AND d.deptype = 'n'
      AND d.refclassid IN ('pg_class'::regclass, 'pg_type'::regclass)
)
SELECT p.oid, n.nspname::text AS schema_name, p.proname::text AS name, p.oid::regprocedure::text AS signature,
       p.prokind::text AS kind,
       CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) END AS definition,
       pg_get_userbyid(p.proowner)::text AS owner,
       p.proacl IS NULL AS default_acl,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(p.proacl) a WHERE a.grantee <> p.proowner) AS grants,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = p.oid AND ds.classoid = 'pg_proc'::regclass AND ds.objsubid = 0) AS comment,
       ARRAY(SELECT DISTINCT r.rel FROM refs r WHERE r.fn = p.oid AND r.rel IS NOT NULL) AS relations,
       ARRAY(SELECT DISTINCT r.typ FROM refs r WHERE r.fn = p.oid AND r.typ IS NOT NULL) AS types
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.oid IN (SELECT fn FROM refs WHERE rel IS NOT NULL OR typ IS NOT NULL)
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgzm')
  AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_proc'::regclass AND x.objid = p.oid AND x.deptype = 'e')";

/// Functions views call (view oid, function oid).
const VIEW_CALLS: &str = "
SELECT DISTINCT r.ev_class AS view_oid, d.refobjid AS function_oid
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE d.refclassid = 'pg_proc'::regclass";

const VIEWS: &str = "
SELECT c.oid, n.nspname::text AS schema_name, c.relname::text AS name, pg_get_viewdef(c.oid) AS definition,
       coalesce(c.reloptions, '{}')::text[] AS options,
       pg_get_userbyid(c.relowner)::text AS owner,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = c.oid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0) AS comment,
       ARRAY(SELECT DISTINCT tn.nspname::text || '|' || t.relname::text || '|' || a.attname::text
             FROM pg_rewrite r
             JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                              AND d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
             JOIN pg_class t ON t.oid = d.refobjid
             JOIN pg_namespace tn ON tn.oid = t.relnamespace AND tn.nspname = ANY($1::text[])
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE r.ev_class = c.oid AND d.refobjid <> c.oid) AS columns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgzm')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

const MATERIALIZED_VIEWS: &str = "
SELECT c.oid, n.nspname::text AS schema_name, c.relname::text AS name, pg_get_userbyid(c.relowner)::text AS owner,
       ARRAY(SELECT CASE WHEN a.grantee = 0 THEN '' ELSE pg_get_userbyid(a.grantee)::text END || '|' || a.privilege_type || '|' || a.is_grantable::text
             FROM aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgzm')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

const FOREIGN_KEYS: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = src.relnamespace) AS schema_name,
       src.relname::text AS table_name, con.conname::text AS name,
       dn.nspname::text AS referenced_schema, dst.relname::text AS referenced_table,
       pg_get_constraintdef(con.oid) AS definition
FROM pg_constraint con
JOIN pg_class src ON src.oid = con.conrelid
JOIN pg_class dst ON dst.oid = con.confrelid
JOIN pg_namespace dn ON dn.oid = dst.relnamespace
WHERE con.contype = 'f' AND dn.nspname = ANY($1::text[])";

const EXTENSIONS: &str = "SELECT extname::text FROM pg_extension";
const AVAILABLE_EXTENSIONS: &str = "SELECT name::text FROM pg_available_extensions";
const FUNCTIONS: &str = "
SELECT p.oid::regprocedure::text AS signature, pg_get_functiondef(p.oid) AS definition
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = ANY($1::text[]) AND p.prokind = 'f'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')";

fn parse_grants(items: Vec<String>) -> Vec<Grant> {
    items
        .into_iter()
        .filter_map(|item| {
            // From the right: a role name may itself contain '|'.
            let mut parts = item.rsplitn(3, '|');
            let grantable = parts.next()? == "true";
            let privilege = parts.next()?.to_string();
            let grantee = Grantee::from_acl(parts.next()?.to_string());
            Some(Grant {
                grantee,
                privilege,
                grantable,
            })
        })
        .collect()
}

fn err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError {
    move |e| CoordinatorError::destination(format!("inspect the destination: {what}"), e)
}

/// Reads what the planner needs to know about the destination. The caller has set
/// `search_path = pg_catalog` on `client`.
pub async fn read(client: &Client, schemas: &[String]) -> Result<Destination, CoordinatorError> {
    let mut dest = Destination {
        schemas: schemas.to_vec(),
        server_version: crate::catalog::server_version(client)
            .await
            .map_err(err("the server version"))?,
        ..Destination::default()
    };
    dest.analyze_threshold = client
        .query_typed_one(
            "SELECT current_setting('autovacuum_analyze_threshold')::int8 AS threshold",
            &[],
        )
        .await
        .map_err(err("autovacuum_analyze_threshold"))?
        .get("threshold");
    read_tables(client, &mut dest).await?;
    read_names(client, &mut dest).await?;
    read_views(client, &mut dest).await?;
    read_constraints_and_extensions(client, &mut dest).await?;
    read_typed_functions(client, &mut dest).await?;
    Ok(dest)
}

/// The tables of the migrated schemas with their privileges, column privileges and policies.
async fn read_tables(client: &Client, dest: &mut Destination) -> Result<(), CoordinatorError> {
    let mut by_oid = BTreeMap::new();
    for row in client
        .query(TABLES, &[&dest.schemas])
        .await
        .map_err(err("tables"))?
    {
        let t = LiveTable::from_row(&row);
        let name = QualName::new(t.schema.clone(), t.name.clone());
        by_oid.insert(t.oid, name.clone());
        dest.tables.insert(name, t);
    }
    for row in client
        .query(COLUMN_GRANTS, &[&dest.schemas])
        .await
        .map_err(err("column privileges"))?
    {
        let Some(table) = by_oid.get(&row.get::<_, Oid>("table_oid")) else {
            continue;
        };
        let grant = Grant {
            grantee: Grantee::from_acl(row.get("grantee")),
            privilege: row.get("privilege_type"),
            grantable: row.get("is_grantable"),
        };
        if let Some(t) = dest.tables.get_mut(table) {
            t.column_grants.push((row.get("column_name"), grant));
        }
    }
    for row in client
        .query(POLICIES, &[&dest.schemas])
        .await
        .map_err(err("policies"))?
    {
        let Some(table) = by_oid.get(&row.get::<_, Oid>("table_oid")) else {
            continue;
        };
        let policy = Policy::from_row(&row);
        if let Some(t) = dest.tables.get_mut(table) {
            t.policies.push(policy);
        }
    }
    Ok(())
}

/// Names taken by relations, types and routines, and the types' and sequences' privileges.
async fn read_names(client: &Client, dest: &mut Destination) -> Result<(), CoordinatorError> {
    for row in client
        .query(RELATION_NAMES, &[])
        .await
        .map_err(err("relation names"))?
    {
        dest.relation_names.insert_row(&row);
    }
    for row in client
        .query(TYPE_NAMES, &[])
        .await
        .map_err(err("type names"))?
    {
        dest.type_qualnames.insert_row(&row);
    }
    for row in client.query(ROUTINES, &[]).await.map_err(err("routines"))? {
        dest.function_names.insert_row(&row);
        dest.routines.insert(row.get("signature"));
    }
    for row in client
        .query(TYPES, &[&dest.schemas])
        .await
        .map_err(err("types"))?
    {
        let name = QualName::from_row(&row);
        dest.type_oids.insert(name.clone(), row.get("oid"));
        dest.type_acl
            .insert(name, (row.get("owner"), parse_grants(row.get("grants"))));
    }
    for row in client
        .query(SEQUENCE_ACL, &[&dest.schemas])
        .await
        .map_err(err("sequences"))?
    {
        dest.sequence_acl.insert(
            QualName::from_row(&row),
            (row.get("owner"), parse_grants(row.get("grants"))),
        );
    }
    Ok(())
}

/// Views and materialized views, with what they read and call.
async fn read_views(client: &Client, dest: &mut Destination) -> Result<(), CoordinatorError> {
    let mut deps: BTreeMap<Oid, BTreeSet<Oid>> = BTreeMap::new();
    for row in client
        .query(crate::catalog::VIEW_DEPENDENCIES_SQL, &[])
        .await
        .map_err(err("view dependencies"))?
    {
        deps.entry(row.get("view_oid"))
            .or_default()
            .insert(row.get("depends_on"));
    }
    let mut calls: BTreeMap<Oid, BTreeSet<Oid>> = BTreeMap::new();
    for row in client
        .query(VIEW_CALLS, &[])
        .await
        .map_err(err("functions called by views"))?
    {
        calls
            .entry(row.get("view_oid"))
            .or_default()
            .insert(row.get("function_oid"));
    }
    for row in client
        .query(VIEWS, &[&dest.schemas])
        .await
        .map_err(err("views"))?
    {
        let oid: Oid = row.get("oid");
        let v = LiveView {
            oid,
            schema: row.get("schema_name"),
            name: row.get("name"),
            definition: row.get("definition"),
            options: row.get("options"),
            owner: row.get("owner"),
            grants: parse_grants(row.get("grants")),
            comment: row.get("comment"),
            depends_on: deps.remove(&oid).unwrap_or_default(),
            calls: calls.remove(&oid).unwrap_or_default(),
            columns: row
                .get::<_, Vec<String>>("columns")
                .into_iter()
                .filter_map(|s| {
                    let mut parts = s.splitn(3, '|');
                    let (schema, table, column) = (parts.next()?, parts.next()?, parts.next()?);
                    Some((QualName::new(schema, table), column.to_string()))
                })
                .collect(),
        };
        dest.views
            .insert(QualName::new(v.schema.clone(), v.name.clone()), v);
    }
    let rows = client
        .query(MATERIALIZED_VIEWS, &[])
        .await
        .map_err(err("materialized views"))?;
    let oids: Vec<Oid> = rows.iter().map(|r| r.get("oid")).collect();
    let mut details = crate::catalog::matviews_by_oid(client, &oids)
        .await
        .map_err(err("materialized view definitions"))?;
    for row in rows {
        let oid: Oid = row.get("oid");
        let Some(matview) = details.remove(&oid) else {
            continue;
        };
        dest.materialized_views.insert(
            QualName::from_row(&row),
            LiveMatview {
                oid,
                reads: deps.remove(&oid).unwrap_or_default(),
                matview,
                owner: row.get("owner"),
                grants: parse_grants(row.get("grants")),
            },
        );
    }
    Ok(())
}

/// Foreign keys into the migrated schemas, extensions (installed and available), the
/// functions of the migrated schemas.
async fn read_constraints_and_extensions(
    client: &Client,
    dest: &mut Destination,
) -> Result<(), CoordinatorError> {
    for row in client
        .query(FOREIGN_KEYS, &[&dest.schemas])
        .await
        .map_err(err("foreign keys"))?
    {
        dest.foreign_keys_in.push(ForeignKeyIn::from_row(&row));
    }
    for row in client
        .query(EXTENSIONS, &[])
        .await
        .map_err(err("extensions"))?
    {
        dest.extensions.insert(row.get("extname"));
    }
    for row in client
        .query(AVAILABLE_EXTENSIONS, &[])
        .await
        .map_err(err("available extensions"))?
    {
        dest.available_extensions.insert(row.get("name"));
    }
    for row in client
        .query(FUNCTIONS, &[&dest.schemas])
        .await
        .map_err(err("functions"))?
    {
        dest.functions
            .insert(row.get("signature"), row.get("definition"));
    }
    Ok(())
}

/// Functions typed on (or reading) relations and types, and whether the role is a superuser.
async fn read_typed_functions(
    client: &Client,
    dest: &mut Destination,
) -> Result<(), CoordinatorError> {
    for row in client
        .query(TYPED_FUNCTIONS, &[])
        .await
        .map_err(err("functions typed on relations"))?
    {
        dest.typed_functions.push(TypedFunction::from_row(&row));
    }
    let row = client
        .query_one(
            "SELECT r.rolsuper AS superuser,
                    CASE WHEN pg_has_role(current_user, d.datdba, 'MEMBER') THEN pg_get_userbyid(d.datdba)::text
                         ELSE current_user::text END AS schema_owner,
                    ARRAY(SELECT nspname::text FROM pg_namespace) AS schemas
             FROM pg_roles r, pg_database d
             WHERE r.rolname = current_user AND d.datname = current_database()",
            &[],
        )
        .await
        .map_err(err("current role"))?;
    dest.superuser = row.get("superuser");
    dest.schema_owner = row.get("schema_owner");
    dest.existing_schemas = row.get::<_, Vec<String>>("schemas").into_iter().collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_named_public_is_not_the_public_pseudo_role() {
        let role = Grantee::from_acl("PUBLIC".into());
        assert_eq!(role.sql(), "\"PUBLIC\"");
        assert_eq!(Grantee::from_acl(String::new()).sql(), "PUBLIC");
        for g in [Grantee::Public, role, Grantee::Role("app \"rw\"".into())] {
            let json = serde_json::to_string(&g).expect("serialize");
            assert_eq!(serde_json::from_str::<Grantee>(&json).expect(&json), g);
        }
        // Plans recorded by earlier versions named PUBLIC and roles by bare strings.
        let legacy = |s: &str| serde_json::from_str::<Grantee>(s).expect(s);
        assert_eq!(legacy("\"PUBLIC\""), Grantee::Public);
        assert_eq!(legacy("\"app_ro\""), Grantee::Role("app_ro".into()));
    }
}
