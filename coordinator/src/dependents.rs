//! Everything outside the migrated set that depends on an object the swap replaces, found
//! through `pg_depend` in every schema, after the plan has decided which objects those are.
//!
//! Views and functions are planned by [`crate::plan`] (they follow the swap by being
//! recreated); foreign keys into migrated tables are re-pointed. This module finds the rest:
//! column defaults and row-level-security policies of other tables are re-pointed in place at
//! the swap ([`crate::plan::Repoint`]); columns of other tables typed with a replaced enum or
//! domain keep it (listed); anything else (rules, triggers, domains and composite types over a
//! replaced type, expression indexes, publications, …) makes the plan refuse, naming the object,
//! so nothing is ever left silently bound to a `backup_` object.

use std::collections::BTreeSet;

use pgzm_pg::sql::{quote_ident, quote_qualified};
use tokio_postgres::Client;

use crate::catalog::Oid;
use crate::destination::{Destination, QualName};
use crate::error::CoordinatorError;
use crate::plan::{qualified_display, Dependent, ObjectKind, Plan, Repoint};

/// Every dependency on the replaced relations (and their row types), the replaced types, the
/// replaced sequences and the recreated functions, with the relation that owns the dependent
/// object (an index's table, a rule's view, a default's table…).
const DEPENDENTS: &str = "
WITH rel AS (SELECT unnest($1::oid[]) AS oid),
     typ AS (
        SELECT t.oid FROM pg_type t WHERE t.oid = ANY($2::oid[]) OR t.typrelid IN (SELECT oid FROM rel)
        UNION
        SELECT t.typarray FROM pg_type t
        WHERE (t.oid = ANY($2::oid[]) OR t.typrelid IN (SELECT oid FROM rel)) AND t.typarray <> 0),
     -- One join per kind of referenced object (an OR of IN-subqueries rescanned `typ` for every
     -- pg_depend row: 2 s at 3 000 tables).
     dep AS (
        SELECT DISTINCT d.classid, d.objid, d.objsubid, d.refclassid, d.refobjid FROM (
            SELECT d.* FROM pg_depend d JOIN rel r ON d.refclassid = 'pg_class'::regclass AND d.refobjid = r.oid
            UNION ALL
            SELECT d.* FROM pg_depend d JOIN typ t ON d.refclassid = 'pg_type'::regclass AND d.refobjid = t.oid
            UNION ALL
            SELECT d.* FROM pg_depend d WHERE d.refclassid = 'pg_proc'::regclass AND d.refobjid = ANY($3::oid[])
        ) d
        WHERE d.deptype IN ('n', 'a')),
     -- The relation (or domain) owning each dependent: a replaced relation's own parts (its
     -- indexes, constraints, defaults, triggers, row type) go with it and are filtered out here,
     -- so the descriptions are computed only for what is left (at 3 000 tables, ~1 s less).
     owned AS (
        SELECT d.*,
               CASE d.classid
                 WHEN 'pg_class'::regclass THEN (SELECT CASE WHEN c.relkind IN ('i', 'I')
                                                             THEN (SELECT x.indrelid FROM pg_index x WHERE x.indexrelid = c.oid)
                                                             ELSE c.oid END
                                                 FROM pg_class c WHERE c.oid = d.objid)
                 WHEN 'pg_rewrite'::regclass THEN (SELECT r.ev_class FROM pg_rewrite r WHERE r.oid = d.objid)
                 WHEN 'pg_constraint'::regclass THEN (SELECT nullif(k.conrelid, 0) FROM pg_constraint k WHERE k.oid = d.objid)
                 WHEN 'pg_attrdef'::regclass THEN (SELECT a.adrelid FROM pg_attrdef a WHERE a.oid = d.objid)
                 WHEN 'pg_trigger'::regclass THEN (SELECT g.tgrelid FROM pg_trigger g WHERE g.oid = d.objid)
                 WHEN 'pg_policy'::regclass THEN (SELECT p.polrelid FROM pg_policy p WHERE p.oid = d.objid)
                 WHEN 'pg_type'::regclass THEN (SELECT nullif(t.typrelid, 0) FROM pg_type t WHERE t.oid = d.objid)
                 WHEN 'pg_statistic_ext'::regclass THEN (SELECT s.stxrelid FROM pg_statistic_ext s WHERE s.oid = d.objid)
               END AS owner_relation,
               (SELECT nullif(k.contypid, 0) FROM pg_constraint k
                WHERE k.oid = d.objid AND d.classid = 'pg_constraint'::regclass) AS owner_type
        FROM dep d)
SELECT d.classid::regclass::text AS catalog, d.objid, d.objsubid,
       pg_describe_object(d.classid, d.objid, d.objsubid) AS object,
       pg_describe_object(d.refclassid, d.refobjid, 0) AS referenced_object,
       (SELECT c.relkind::text FROM pg_class c WHERE c.oid = d.objid AND d.classid = 'pg_class'::regclass) AS relkind,
       (SELECT k.contype::text FROM pg_constraint k WHERE k.oid = d.objid AND d.classid = 'pg_constraint'::regclass) AS contype,
       d.refclassid = 'pg_type'::regclass AND EXISTS (SELECT 1 FROM pg_type t WHERE t.oid = d.refobjid AND t.typtype IN ('e', 'd')
                                                      OR t.oid = d.refobjid AND t.typcategory = 'A'
                                                         AND EXISTS (SELECT 1 FROM pg_type e WHERE e.oid = t.typelem AND e.typtype IN ('e', 'd'))) AS on_enum_or_domain,
       d.owner_relation, d.owner_type
FROM owned d
WHERE NOT coalesce(d.owner_relation = ANY($1::oid[]), false)
  AND NOT coalesce(d.owner_type = ANY($2::oid[]), false)
ORDER BY 4";

/// A column default of another table, with what it needs to be set again.
const DEFAULTS: &str = "
SELECT a.oid, n.nspname::text AS schema_name, c.relname::text AS table_name, att.attname::text AS column_name,
       pg_get_expr(a.adbin, a.adrelid) AS expression
FROM pg_attrdef a
JOIN pg_class c ON c.oid = a.adrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute att ON att.attrelid = a.adrelid AND att.attnum = a.adnum
WHERE a.oid = ANY($1::oid[])";

/// A policy of another table, with what it needs to be created again.
const POLICIES: &str = "
SELECT p.oid, n.nspname::text AS schema_name, c.relname::text AS table_name,
       p.polname::text AS name, p.polpermissive AS permissive, p.polcmd::text AS command,
       ARRAY(SELECT CASE WHEN r = 0 THEN '' ELSE pg_get_userbyid(r)::text END FROM unnest(p.polroles) r) AS roles,
       pg_get_expr(p.polqual, p.polrelid) AS using_expr, pg_get_expr(p.polwithcheck, p.polrelid) AS with_check
FROM pg_policy p
JOIN pg_class c ON c.oid = p.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.oid = ANY($1::oid[])";

struct Edge {
    catalog: String,
    objid: Oid,
    subid: i32,
    object: String,
    on: String,
    owner: Option<Oid>,
    relkind: Option<String>,
    contype: Option<String>,
    on_enum_or_domain: bool,
    /// The domain a constraint belongs to.
    owner_type: Option<Oid>,
}

impl Edge {
    /// A row of [`DEPENDENTS`].
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Edge {
            catalog: row.get("catalog"),
            objid: row.get("objid"),
            subid: row.get("objsubid"),
            object: row.get("object"),
            on: row.get("referenced_object"),
            owner: row.get("owner_relation"),
            relkind: row.get("relkind"),
            contype: row.get("contype"),
            on_enum_or_domain: row.get("on_enum_or_domain"),
            owner_type: row.get("owner_type"),
        }
    }
}

fn err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError {
    move |e| CoordinatorError::destination(format!("inspect the destination: {what}"), e)
}

/// The oids of what the swap moves to the backup set: relations (tables, views, materialized
/// views, sequences), types, and functions the plan recreates.
struct Replaced {
    relations: Vec<Oid>,
    types: Vec<Oid>,
    functions: Vec<Oid>,
}

impl Replaced {
    async fn read(
        client: &Client,
        plan: &Plan,
        dest: &Destination,
    ) -> Result<Replaced, CoordinatorError> {
        let mut relations: Vec<Oid> = Vec::new();
        let mut types: Vec<Oid> = Vec::new();
        let mut functions: Vec<Oid> = Vec::new();
        for m in &plan.to_backup {
            match m.kind {
                ObjectKind::Table => relations.extend(
                    dest.tables
                        .get(&QualName::new(m.schema.clone(), m.from.clone()))
                        .map(|t| t.oid),
                ),
                ObjectKind::View => relations.extend(
                    dest.views
                        .get(&QualName::new(m.schema.clone(), m.from.clone()))
                        .map(|v| v.oid),
                ),
                ObjectKind::Type => types.extend(
                    dest.type_oids
                        .get(&QualName::new(m.schema.clone(), m.from.clone()))
                        .copied(),
                ),
                ObjectKind::Function => functions.extend(m.oid),
                ObjectKind::MaterializedView => relations.extend(
                    dest.materialized_views
                        .get(&QualName::new(m.schema.clone(), m.from.clone()))
                        .map(|v| v.oid),
                ),
                ObjectKind::Sequence | ObjectKind::Index => {}
            }
        }
        // Sequences the swap renames: a default elsewhere that uses one would keep the old one.
        let replaced_sequences: Vec<&crate::plan::Move> = plan
            .to_backup
            .iter()
            .filter(|m| m.kind == ObjectKind::Sequence)
            .collect();
        if !replaced_sequences.is_empty() {
            let schemas: Vec<&str> = replaced_sequences
                .iter()
                .map(|m| m.schema.as_str())
                .collect();
            let names: Vec<&str> = replaced_sequences.iter().map(|m| m.from.as_str()).collect();
            let rows = client
                .query(
                    "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                       JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = c.relname
                      WHERE c.relkind = 'S'",
                    &[&schemas, &names],
                )
                .await
                .map_err(err("sequences"))?;
            relations.extend(rows.iter().map(|r| r.get::<_, Oid>("oid")));
        }
        Ok(Replaced {
            relations,
            types,
            functions,
        })
    }
}

/// The dependency edges sorted by what happens to them.
struct Sorted<'a> {
    /// Dependents the swap cannot carry: the migration is refused.
    problems: Vec<String>,
    /// Column defaults to re-point at the new sequences or functions.
    defaults: Vec<&'a Edge>,
    /// Policies to re-point.
    policies: Vec<&'a Edge>,
}

/// Sorts the dependency edges: parts of replaced objects and planned views, functions and
/// foreign keys need nothing more; defaults and policies are re-pointed; a column of another
/// table typed with a replaced enum or domain keeps it (listed in `plan.dependents`); anything
/// else is a refusal.
fn sort_edges<'a>(
    plan: &mut Plan,
    dest: &Destination,
    edges: &'a [Edge],
    fk_names: &[(Oid, (String, String, String))],
    replaced: &Replaced,
) -> Sorted<'a> {
    let recreated_functions: BTreeSet<Oid> = replaced.functions.iter().copied().collect();
    let replaced_types: BTreeSet<Oid> = replaced.types.iter().copied().collect();
    let replaced: BTreeSet<Oid> = replaced.relations.iter().copied().collect();
    let recreated_views: BTreeSet<Oid> = plan
        .views
        .iter()
        .filter_map(|v| {
            dest.views
                .get(&QualName::new(v.schema.clone(), v.name.clone()))
        })
        .map(|v| v.oid)
        .collect();
    let repointed_fks: BTreeSet<(String, String, String)> = plan
        .foreign_keys
        .iter()
        .map(|f| (f.schema.clone(), f.table.clone(), f.name.clone()))
        .collect();
    let new_sequences: BTreeSet<&str> = plan
        .to_live
        .iter()
        .filter(|m| m.kind == ObjectKind::Sequence)
        .map(|m| m.to.as_str())
        .collect();

    let mut problems = Vec::new();
    let mut defaults = Vec::new();
    let mut policies = Vec::new();
    let mut seen = BTreeSet::new();
    for e in edges {
        // Parts of a replaced relation go with it; views, matviews and functions are planned.
        if e.owner.is_some_and(|o| replaced.contains(&o))
            || e.owner_type.is_some_and(|t| replaced_types.contains(&t))
        {
            continue;
        }
        let key = (e.catalog.clone(), e.objid, e.subid);
        if !seen.insert(key) {
            continue;
        }
        match e.catalog.as_str() {
            "pg_rewrite" if e.owner.is_some_and(|o| recreated_views.contains(&o)) => {}
            "pg_proc" if recreated_functions.contains(&e.objid) => {}
            "pg_constraint" if e.contype.as_deref() == Some("f") => {
                if !fk_names
                    .iter()
                    .any(|(oid, k)| *oid == e.objid && repointed_fks.contains(k))
                {
                    problems.push(refusal(e));
                }
            }
            "pg_attrdef" => {
                let sequence_follows =
                    e.on.strip_prefix("sequence ")
                        .map(|q| q.rsplit('.').next().unwrap_or(q).trim_matches('"'))
                        .is_some_and(|s| new_sequences.contains(s));
                if sequence_follows || e.on.starts_with("function ") {
                    defaults.push(e);
                } else {
                    problems.push(format!(
                        "{} uses {}, which the migration replaces and the source does not have: change the default or drop it before the migration",
                        e.object, e.on
                    ));
                }
            }
            "pg_policy" => policies.push(e),
            // A column of another table typed with a replaced enum or domain keeps that type:
            // its values stay valid; the type leaves the backup set under a `replaced_` name
            // when the set is dropped.
            "pg_class" if e.subid > 0 && e.on_enum_or_domain => {
                plan.dependents.push(Dependent {
                    object: e.object.clone(),
                    on: e.on.clone(),
                    action: "keeps the replaced type (renamed replaced_<type> when the backup set is dropped); convert the column to the new type after the migration if it should share it".into(),
                });
            }
            "pg_class" if e.relkind.as_deref() == Some("S") && e.subid == 0 => {
                // A sequence owned by a replaced table's column: in the backup set.
            }
            _ => problems.push(refusal(e)),
        }
    }
    Sorted {
        problems,
        defaults,
        policies,
    }
}

/// Finds the dependents of everything `plan` replaces that the planner did not already plan
/// for; re-points what can be re-pointed (adds to `plan.repoints`), lists every dependent in
/// `plan.dependents`, and returns the reasons to refuse. The caller has set
/// `search_path = pg_catalog`, so deparsed expressions are qualified.
pub async fn check(
    client: &Client,
    plan: &mut Plan,
    dest: &Destination,
) -> Result<Vec<String>, CoordinatorError> {
    let Replaced {
        relations,
        types,
        functions,
    } = Replaced::read(client, plan, dest).await?;
    if relations.is_empty() && types.is_empty() && functions.is_empty() {
        return Ok(Vec::new());
    }
    let edges: Vec<Edge> = client
        .query(DEPENDENTS, &[&relations, &types, &functions])
        .await
        .map_err(err("objects that depend on the migrated tables"))?
        .iter()
        .map(Edge::from_row)
        .collect();
    let fk_names = foreign_key_names(client, &edges).await?;
    let Sorted {
        problems,
        defaults,
        policies,
    } = sort_edges(
        plan,
        dest,
        &edges,
        &fk_names,
        &Replaced {
            relations,
            types,
            functions,
        },
    );
    plan.repoints
        .extend(default_repoints(client, &defaults).await?);
    plan.repoints
        .extend(policy_repoints(client, &policies).await?);
    for r in &plan.repoints {
        plan.dependents.push(Dependent {
            object: r.object.clone(),
            on: r.on.clone(),
            action: "re-pointed at the new objects at the swap".into(),
        });
    }
    Ok(problems)
}

fn refusal(e: &Edge) -> String {
    format!(
        "{} depends on {}, which the migration replaces, and pgzm cannot make it follow the swap: drop it before the migration and recreate it afterwards",
        e.object, e.on
    )
}

/// (constraint oid, (schema, table, name)) of the foreign keys among `edges`.
async fn foreign_key_names(
    client: &Client,
    edges: &[Edge],
) -> Result<Vec<(Oid, (String, String, String))>, CoordinatorError> {
    let oids: Vec<Oid> = edges
        .iter()
        .filter(|e| e.contype.as_deref() == Some("f"))
        .map(|e| e.objid)
        .collect();
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT k.oid, n.nspname::text AS schema_name, c.relname::text AS table_name, k.conname::text AS name
             FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE k.oid = ANY($1::oid[])",
            &[&oids],
        )
        .await
        .map_err(err("foreign keys"))?
        .iter()
        .map(|r| {
            (
                r.get("oid"),
                (r.get("schema_name"), r.get("table_name"), r.get("name")),
            )
        })
        .collect())
}

/// The rows `sql` returns for the dependents `edges` (by oid, column `oid`), each with what it
/// depends on.
async fn rows_of(
    client: &Client,
    sql: &str,
    edges: &[&Edge],
    what: &'static str,
) -> Result<Vec<(tokio_postgres::Row, String)>, CoordinatorError> {
    let oids: Vec<Oid> = edges.iter().map(|e| e.objid).collect();
    if oids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = client.query(sql, &[&oids]).await.map_err(err(what))?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let oid: Oid = r.get("oid");
            let on = edges
                .iter()
                .find(|e| e.objid == oid)
                .map(|e| e.on.clone())
                .unwrap_or_default();
            (r, on)
        })
        .collect())
}

async fn default_repoints(
    client: &Client,
    edges: &[&Edge],
) -> Result<Vec<Repoint>, CoordinatorError> {
    Ok(rows_of(client, DEFAULTS, edges, "column defaults")
        .await?
        .into_iter()
        .map(|(r, on)| {
            let schema: String = r.get("schema_name");
            let table: String = r.get("table_name");
            let column: String = r.get("column_name");
            let expr: String = r.get("expression");
            let t = quote_qualified(&schema, &table);
            let c = quote_ident(&column);
            Repoint {
                object: format!(
                    "default of column {} of table {}",
                    crate::rewrite::display_ident(&column),
                    qualified_display(&schema, &table)
                ),
                on,
                schema,
                table,
                // The expression names the objects by their live names, read before the swap:
                // set again after the renames, it binds to the new ones.
                detach: vec![format!("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT")],
                attach: vec![format!(
                    "ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {expr}"
                )],
            }
        })
        .collect())
}

async fn policy_repoints(
    client: &Client,
    edges: &[&Edge],
) -> Result<Vec<Repoint>, CoordinatorError> {
    Ok(rows_of(client, POLICIES, edges, "policies")
        .await?
        .into_iter()
        .map(|(r, on)| {
            let schema: String = r.get("schema_name");
            let table: String = r.get("table_name");
            let policy = crate::destination::Policy::from_row(&r);
            let t = quote_qualified(&schema, &table);
            Repoint {
                object: format!(
                    "policy {} on table {}",
                    crate::rewrite::display_ident(&policy.name),
                    qualified_display(&schema, &table)
                ),
                on,
                schema,
                table,
                detach: vec![format!("DROP POLICY {} ON {t}", quote_ident(&policy.name))],
                attach: vec![crate::ddl::create_policy_sql(
                    &policy,
                    &t,
                    &crate::rewrite::Renames::new(),
                )],
            }
        })
        .collect())
}
