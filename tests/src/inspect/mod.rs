//! Assertions on real catalog state: which tables, triggers, functions and sequences exist in
//! schema `public`, what the tables contain, whether foreign keys hold, and a normalised
//! catalog signature ([`catalog_signature`]) for comparing two databases.
//!
//! Everything here only looks at schema `public` and ignores objects owned by extensions
//! (e.g. PostGIS's `spatial_ref_sys`).

mod signature;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use crate::sql::{quote_ident, quote_qualified};
use crate::HarnessError;

pub use signature::{
    catalog_signature, CatalogSignature, ColumnSignature, ConstraintSignature, IndexSignature,
    TableSignature, TriggerSignature,
};

/// Row count and order-independent content hash of one table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableChecksum {
    /// Number of rows.
    pub rows: i64,
    /// md5 over the sorted md5s of each row's text form; empty for an empty table.
    pub md5: String,
}

/// The state of one sequence in `public`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceState {
    /// Sequence name.
    pub name: String,
    /// `last_value` as read from the sequence.
    pub last_value: i64,
    /// Whether `nextval` has been called since the last `setval(.., false)` / creation.
    pub is_called: bool,
    /// The (table, column) the sequence is owned by (`OWNED BY` or identity), if any.
    pub owned_by: Option<(String, String)>,
}

/// SQL condition: the `pg_class` row `c` is not owned by an extension.
pub(crate) const NOT_EXTENSION_REL: &str = "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
     WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = c.oid \
     AND d.deptype = 'e')";

/// Names of the ordinary and partitioned tables in `public`, sorted, excluding tables owned
/// by extensions.
pub async fn tables(client: &Client) -> Result<Vec<String>, HarnessError> {
    let sql = format!(
        "SELECT c.relname::text FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND {NOT_EXTENSION_REL}"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| HarnessError::sql("list tables in public", &e))?;
    let mut names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    names.sort();
    Ok(names)
}

/// `count(*)` of `public.<table>`.
pub async fn row_count(client: &Client, table: &str) -> Result<i64, HarnessError> {
    let sql = format!("SELECT count(*) FROM {}", quote_qualified("public", table));
    let row = client
        .query_one(&sql, &[])
        .await
        .map_err(|e| HarnessError::sql(format!("count rows of public.{table}"), &e))?;
    Ok(row.get(0))
}

/// Row count and order-independent content hash of every table from [`tables`].
pub async fn table_checksums(
    client: &Client,
) -> Result<BTreeMap<String, TableChecksum>, HarnessError> {
    let mut sums = BTreeMap::new();
    for table in tables(client).await? {
        let sql = format!(
            "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' \
             ORDER BY md5(t::text) COLLATE \"C\")), '') FROM {} t",
            quote_qualified("public", &table)
        );
        let row = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| HarnessError::sql(format!("checksum public.{table}"), &e))?;
        sums.insert(
            table,
            TableChecksum {
                rows: row.get(0),
                md5: row.get(1),
            },
        );
    }
    Ok(sums)
}

/// (table, trigger) for every user-defined (non-internal) trigger on a table in `public`,
/// sorted.
pub async fn triggers(client: &Client) -> Result<Vec<(String, String)>, HarnessError> {
    let rows = client
        .query(
            "SELECT c.relname::text, t.tgname::text FROM pg_catalog.pg_trigger t \
             JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND NOT t.tgisinternal",
            &[],
        )
        .await
        .map_err(|e| HarnessError::sql("list triggers in public", &e))?;
    let mut list: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    list.sort();
    Ok(list)
}

/// Names of the functions (and procedures, aggregates) in `public` not owned by an
/// extension, sorted; an overloaded name appears once per overload.
pub async fn functions(client: &Client) -> Result<Vec<String>, HarnessError> {
    let rows = client
        .query(
            "SELECT p.proname::text FROM pg_catalog.pg_proc p \
             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = 'public' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d \
             WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = p.oid \
             AND d.deptype = 'e')",
            &[],
        )
        .await
        .map_err(|e| HarnessError::sql("list functions in public", &e))?;
    let mut names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    names.sort();
    Ok(names)
}

/// (constraint, table, orphan count) for every foreign key on a table in `public` that has
/// referencing rows whose key columns are all non-null but match no referenced row. Only
/// violated keys are returned, sorted by table then constraint.
pub async fn fk_orphans(client: &Client) -> Result<Vec<(String, String, i64)>, HarnessError> {
    // conparentid = 0 skips the per-partition clones of a key declared on a partitioned table.
    let rows = client
        .query(
            "SELECT con.conname::text, c.relname::text, c.relkind::text, rn.nspname::text, \
             rc.relname::text, rc.relkind::text, \
             ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(num, ord) \
                   JOIN pg_catalog.pg_attribute a \
                     ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.ord), \
             ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, ord) \
                   JOIN pg_catalog.pg_attribute a \
                     ON a.attrelid = con.confrelid AND a.attnum = k.num ORDER BY k.ord) \
             FROM pg_catalog.pg_constraint con \
             JOIN pg_catalog.pg_class c ON c.oid = con.conrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_catalog.pg_class rc ON rc.oid = con.confrelid \
             JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace \
             WHERE con.contype = 'f' AND n.nspname = 'public' AND con.conparentid = 0 \
             ORDER BY c.relname, con.conname",
            &[],
        )
        .await
        .map_err(|e| HarnessError::sql("list foreign keys in public", &e))?;
    let mut orphans = Vec::new();
    for row in rows {
        let constraint: String = row.get(0);
        let table: String = row.get(1);
        let table_kind: String = row.get(2);
        let ref_schema: String = row.get(3);
        let ref_table: String = row.get(4);
        let ref_kind: String = row.get(5);
        let cols: Vec<String> = row.get(6);
        let ref_cols: Vec<String> = row.get(7);
        // Like the RI triggers: ONLY for plain tables (inheritance children are not covered
        // by a foreign key), the whole tree for partitioned tables.
        let only = |kind: &str| if kind == "p" { "" } else { "ONLY " };
        let not_null = cols
            .iter()
            .map(|c| format!("r.{} IS NOT NULL", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let matches = cols
            .iter()
            .zip(&ref_cols)
            .map(|(c, rc)| format!("p.{} = r.{}", quote_ident(rc), quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT count(*) FROM {}{} r WHERE {not_null} AND NOT EXISTS \
             (SELECT 1 FROM {}{} p WHERE {matches})",
            only(&table_kind),
            quote_qualified("public", &table),
            only(&ref_kind),
            quote_qualified(&ref_schema, &ref_table),
        );
        let count: i64 = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| {
                HarnessError::sql(format!("count orphans of {constraint} on {table}"), &e)
            })?
            .get(0);
        if count > 0 {
            orphans.push((constraint, table, count));
        }
    }
    Ok(orphans)
}

/// Every sequence in `public` not owned by an extension, sorted by name, with its current
/// position and owning column.
pub async fn sequences(client: &Client) -> Result<Vec<SequenceState>, HarnessError> {
    let sql = format!(
        "SELECT c.relname::text, t.relname::text, a.attname::text \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_catalog.pg_depend o \
           ON o.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND o.objid = c.oid \
          AND o.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass \
          AND o.deptype IN ('a', 'i') AND o.refobjsubid > 0 \
         LEFT JOIN pg_catalog.pg_class t ON t.oid = o.refobjid \
         LEFT JOIN pg_catalog.pg_attribute a \
           ON a.attrelid = o.refobjid AND a.attnum = o.refobjsubid \
         WHERE n.nspname = 'public' AND c.relkind = 'S' AND {NOT_EXTENSION_REL} \
         ORDER BY c.relname"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| HarnessError::sql("list sequences in public", &e))?;
    let mut states = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.get(0);
        let table: Option<String> = row.get(1);
        let column: Option<String> = row.get(2);
        let sql = format!(
            "SELECT last_value, is_called FROM {}",
            quote_qualified("public", &name)
        );
        let state = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| HarnessError::sql(format!("read sequence public.{name}"), &e))?;
        states.push(SequenceState {
            name,
            last_value: state.get(0),
            is_called: state.get(1),
            owned_by: table.zip(column),
        });
    }
    Ok(states)
}
