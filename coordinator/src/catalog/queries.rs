//! The named catalog queries behind [`super::read_schema`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};

use super::*;
use crate::error::CoordinatorError;
use crate::filter::TableFilter;
use crate::name::Interner;
use crate::naming::QualName;

const TABLES: &str = "
WITH exclusive AS (
    SELECT l.relation FROM pg_locks l
    WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
)
SELECT c.oid AS oid, (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name, c.relname::text AS name, c.relkind::text AS kind, c.relpersistence::text AS persistence,
       coalesce(c.reloptions, '{}')::text[] AS reloptions,
       -- Parents outside the migrated schemas (a partition or child of another schema's table).
       EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace pn ON pn.oid = p.relnamespace
               WHERE i.inhrelid = c.oid AND NOT pn.nspname = ANY($1::text[])) AS parent_elsewhere,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = c.oid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0) AS comment,
       -- Never analyzed: the statistics collector's count of live rows.
       CASE WHEN c.reltuples < 0 THEN pg_stat_get_live_tuples(c.oid) ELSE c.reltuples::int8 END AS estimated_rows,
       -- From the statistics; a table never vacuumed or analyzed (relpages 0) is measured,
       -- unless a session holds it exclusively (measuring would wait for it).
       CASE WHEN c.relpages = 0 AND c.relkind = 'r' AND c.oid NOT IN (SELECT relation FROM exclusive)
            THEN pg_table_size(c.oid)
            ELSE (c.relpages::int8 + coalesce((SELECT t.relpages FROM pg_class t WHERE t.oid = c.reltoastrelid), 0))
                 * current_setting('block_size')::int8 END AS estimated_bytes,
       CASE WHEN c.relpages = 0 AND c.relkind = 'r' AND c.oid NOT IN (SELECT relation FROM exclusive)
            THEN pg_relation_size(c.oid) / current_setting('block_size')::int8
            ELSE c.relpages::int8 END AS pages,
       -- Expected binary COPY bytes, from the statistics (0 without them): per row 2 bytes of
       -- field count, per column 4 bytes of length and the average width of its non-null values.
       -- Only for tables of 16 pages or more: below that the heap size is as good an estimate of
       -- the progress, and the pg_stats lookups of thousands of small tables were 70 % of this
       -- query.
       CASE WHEN c.relpages >= 16 THEN
       (SELECT CASE WHEN c.reltuples > 0 AND count(s.attname) > 0
                    THEN (c.reltuples * (2 + sum(4 + coalesce(s.avg_width * (1 - s.null_frac), 0))))::int8
                    ELSE 0 END
          FROM pg_attribute a
          LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = a.attname
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '')
       ELSE 0 END AS estimated_copy_bytes,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
       (SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
         WHERE i.inhrelid = c.oid AND c.relispartition) AS partition_parent,
       (SELECT pn.nspname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
         WHERE i.inhrelid = c.oid AND c.relispartition) AS partition_parent_schema,
       -- Bounds are constants: deparsed without opening the table.
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, 0) END AS partition_bound,
       ARRAY(SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
              WHERE i.inhrelid = c.oid AND NOT c.relispartition ORDER BY i.inhseqno) AS inherits,
       ARRAY(SELECT pn.nspname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE i.inhrelid = c.oid AND NOT c.relispartition ORDER BY i.inhseqno) AS inherits_schemas
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[])
  AND c.relkind IN ('r', 'p', 'm', 'f')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY n.nspname, c.relname";

const COLUMNS: &str = "
SELECT a.attrelid AS table_oid, a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type_sql, a.atttypid AS type_oid,
       CASE WHEN t.typcategory = 'A' THEN t.typelem ELSE 0::oid END AS elem_type_oid,
       a.attnotnull AS not_null,
       -- A default has no column references: deparsed without the table, which pg_get_expr
       -- would open and lock (10 000 tables: 10 000 relcache entries and locks, ~0.4 s).
       CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, 0) END AS default_expr,
       a.attidentity::text AS identity,
       CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END AS generated,
       a.attgenerated = 'v' AS generated_virtual,
       -- PostgreSQL 18 names NOT NULL constraints (`pg_constraint.contype = 'n'`).
       (SELECT n.conname::text FROM pg_constraint n
         WHERE n.conrelid = a.attrelid AND n.contype = 'n' AND n.conkey[1] = a.attnum LIMIT 1) AS not_null_name,
       CASE WHEN a.attcollation <> t.typcollation AND a.attcollation <> 0
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = a.attrelid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = a.attnum) AS comment,
       -- The relation whose row type it is (or is an array of): a shadow table typed on another
       -- is created after it.
       CASE WHEN t.typrelid <> 0 THEN t.typrelid
            WHEN t.typcategory = 'A' THEN (SELECT e.typrelid FROM pg_type e WHERE e.oid = t.typelem)
            ELSE 0::oid END AS row_type_of
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum";

const CONSTRAINTS: &str = "
SELECT con.conrelid AS table_oid, con.conname::text AS name, con.contype::text AS kind, pg_get_constraintdef(con.oid) AS definition,
       con.confrelid AS references_oid, con.convalidated AS validated, (SELECT ds.description FROM pg_description ds WHERE ds.objoid = con.oid AND ds.classoid = 'pg_constraint'::regclass AND ds.objsubid = 0) AS comment,
       CASE WHEN con.contype = 'f' THEN ARRAY(
           SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, i)
           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.i) END AS columns,
       CASE WHEN con.contype = 'f' THEN ARRAY(
           SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, i)
           JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.i) END AS ref_columns,
       con.confmatchtype = 'f' AS match_full,
       -- pg_get_constraintdef leaves out a key's index storage parameters (it prints them only in
       -- the form PostgreSQL uses to rebuild a constraint itself): read them from the index, as
       -- that form prints them.
       CASE WHEN con.contype IN ('p', 'u') THEN (
           SELECT string_agg(quote_ident(split_part(o, '=', 1)) || '=' || quote_literal(substr(o, strpos(o, '=') + 1)), ', ' ORDER BY n)
           FROM pg_class ic, unnest(ic.reloptions) WITH ORDINALITY r(o, n) WHERE ic.oid = con.conindid) END AS index_options
FROM pg_constraint con
WHERE con.conrelid = ANY($1::oid[]) AND con.contype IN ('p', 'u', 'x', 'c', 'f')
  -- A foreign key of a partitioned table is cloned onto its partitions (and onto the
  -- partitions of a partitioned table it references): only the original is created.
  AND NOT (con.contype = 'f' AND con.conparentid <> 0)
ORDER BY con.conrelid, con.conname";

const INDEXES: &str = "
SELECT i.indrelid AS table_oid, ic.relname::text AS name, pg_get_indexdef(i.indexrelid) AS definition, (SELECT ds.description FROM pg_description ds WHERE ds.objoid = i.indexrelid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0) AS comment
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY($1::oid[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conindid = i.indexrelid AND c.conrelid = i.indrelid AND c.contype IN ('p', 'u', 'x'))
ORDER BY i.indrelid, ic.relname";

const TRIGGERS: &str = "
SELECT tg.tgrelid AS table_oid, tg.tgname::text AS name, pg_get_triggerdef(tg.oid) AS definition, tg.tgenabled <> 'D' AS enabled, tg.tgfoid AS function_oid,
       pn.nspname = ANY($2::text[]) AS function_migrated, p.pronamespace = 'pg_catalog'::regnamespace AS function_in_catalog
FROM pg_trigger tg
JOIN pg_proc p ON p.oid = tg.tgfoid
JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE tg.tgrelid = ANY($1::oid[]) AND NOT tg.tgisinternal
  -- A partitioned table's row trigger is cloned onto its partitions by the server.
  AND tg.tgparentid = 0
ORDER BY tg.tgrelid, tg.tgname";

const FUNCTIONS: &str = "
SELECT p.oid::regprocedure::text AS signature, pg_get_functiondef(p.oid) AS definition
FROM pg_proc p WHERE p.oid = ANY($1::oid[]) ORDER BY 1";

const TYPES: &str = "
SELECT t.oid AS oid, (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = t.typnamespace) AS schema_name, t.typarray AS array_oid, t.typname::text AS name, t.typtype::text AS kind,
       (SELECT n.nspname FROM pg_namespace n WHERE n.oid = t.typnamespace) = ANY($2::text[])
         AND NOT EXISTS (SELECT 1 FROM pg_depend d
                         WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e') AS user_owned,
       EXISTS (SELECT 1 FROM pg_depend d
               WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e') AS in_extension,
       (SELECT n.nspname FROM pg_namespace n WHERE n.oid = t.typnamespace) IN ('pg_catalog', 'information_schema') AS in_system,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = t.oid AND ds.classoid = 'pg_type'::regclass AND ds.objsubid = 0) AS comment,
       CASE WHEN t.typtype = 'e'
            THEN ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) END AS labels,
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS base_type_sql,
       t.typbasetype AS base_type_oid, t.typnotnull AS not_null,
       CASE WHEN t.typtype = 'd' THEN pg_get_expr(t.typdefaultbin, 0) END AS default_expr,
       CASE WHEN t.typtype = 'd' AND t.typcollation <> 0
                 AND t.typcollation <> (SELECT b.typcollation FROM pg_type b WHERE b.oid = t.typbasetype)
            THEN (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.collname)
                  FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = t.typcollation) END AS collation,
       t.typcategory = 'A' AS is_array, t.typelem AS elem_type_oid
FROM pg_type t WHERE t.oid = ANY($1::oid[])";

/// Range types (`rngmultitypid` read through `to_jsonb`: it exists from PostgreSQL 14 on).
const RANGES: &str = "
SELECT r.rngtypid AS oid, format_type(r.rngsubtype, NULL) AS subtype_sql, r.rngsubtype AS subtype_oid,
       CASE WHEN NOT opc.opcdefault THEN quote_ident(n.nspname) || '.' || quote_ident(opc.opcname) END AS opclass,
       CASE WHEN r.rngcollation <> 0 AND r.rngcollation <> st.typcollation
            THEN (SELECT quote_ident(cn.nspname) || '.' || quote_ident(c.collname)
                  FROM pg_collation c JOIN pg_namespace cn ON cn.oid = c.collnamespace WHERE c.oid = r.rngcollation) END AS collation,
       CASE WHEN r.rngcanonical <> 0 THEN r.rngcanonical::regproc::text END AS canonical,
       CASE WHEN r.rngsubdiff <> 0 THEN r.rngsubdiff::regproc::text END AS subdiff,
       (SELECT m.typname::text FROM pg_type m WHERE m.oid = (to_jsonb(r) ->> 'rngmultitypid')::oid) AS multirange
FROM pg_range r
JOIN pg_type st ON st.oid = r.rngsubtype
JOIN pg_opclass opc ON opc.oid = r.rngsubopc
JOIN pg_namespace n ON n.oid = opc.opcnamespace
WHERE r.rngtypid = ANY($1::oid[])";

const RANGES_OF_MULTIRANGES: &str = "
SELECT r.rngtypid AS range_oid FROM pg_range r WHERE (to_jsonb(r) ->> 'rngmultitypid')::oid = ANY($1::oid[])";

const COMPOSITE_ATTRIBUTES: &str = "
SELECT t.oid AS type_oid, a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS type_sql,
       CASE WHEN at.typcategory = 'A' THEN at.typelem ELSE a.atttypid END AS attribute_type_oid,
       CASE WHEN a.attcollation <> at.typcollation AND a.attcollation <> 0
            THEN (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.collname)
                  FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = a.attcollation) END AS collation
FROM pg_type t
JOIN pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type at ON at.oid = a.atttypid
WHERE t.oid = ANY($1::oid[])
ORDER BY t.oid, a.attnum";

const DOMAIN_CHECKS: &str = "
SELECT contypid AS type_oid, conname::text AS name, pg_get_constraintdef(oid) AS definition
FROM pg_constraint WHERE contypid = ANY($1::oid[]) AND contype = 'c' ORDER BY contypid, conname";

const SEQUENCES: &str = "
WITH tab AS (SELECT unnest($1::oid[]) AS oid),
     -- The sequences of the migrated schemas owned by a migrated table's column, or used by a
     -- migrated table's default. (Found from the sequences' side: from the tables' side,
     -- through every relation depending on them, it took twice as long at 10 000 tables.)
     seqs AS MATERIALIZED (
        SELECT s.oid, n.nspname::text AS schema_name, s.relname, o.refobjid, o.refobjsubid, o.deptype
        FROM pg_class s
        JOIN pg_namespace n ON n.oid = s.relnamespace
        LEFT JOIN pg_depend o ON o.classid = 'pg_class'::regclass AND o.objid = s.oid
                             AND o.refclassid = 'pg_class'::regclass AND o.deptype IN ('a', 'i')
        WHERE s.relkind = 'S' AND n.nspname = ANY($2::text[])
          AND (o.refobjid IN (SELECT oid FROM tab)
               OR EXISTS (SELECT 1 FROM pg_depend dd JOIN pg_attrdef ad ON ad.oid = dd.objid
                          WHERE dd.classid = 'pg_attrdef'::regclass AND dd.refclassid = 'pg_class'::regclass
                            AND dd.refobjid = s.oid AND ad.adrelid IN (SELECT oid FROM tab))))
SELECT s.oid AS oid, s.schema_name, s.relname::text AS name, format_type(sq.seqtypid, NULL) AS type_sql, sq.seqstart AS start, sq.seqincrement AS increment, sq.seqmin AS min,
       sq.seqmax AS max, sq.seqcache AS cache, sq.seqcycle AS cycle,
       (SELECT c.relname::text FROM pg_class c WHERE c.oid = s.refobjid) AS owner_table,
       (SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = s.refobjid AND a.attnum = s.refobjsubid) AS owner_column,
       coalesce(s.deptype = 'i', false) AS identity,
       coalesce(lv.last_value, sq.seqstart) AS last_value,
       lv.last_value IS NOT NULL AS is_called,
       ARRAY(SELECT DISTINCT cn.nspname::text || '|' || c.relname::text || '|' || a.attname::text
             FROM pg_depend dd
             JOIN pg_attrdef ad ON ad.oid = dd.objid
             JOIN pg_class c ON c.oid = ad.adrelid
             JOIN pg_namespace cn ON cn.oid = c.relnamespace AND cn.nspname = ANY($2::text[])
             JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
             WHERE dd.classid = 'pg_attrdef'::regclass AND dd.refclassid = 'pg_class'::regclass
               AND dd.refobjid = s.oid) AS used_by
FROM seqs s
JOIN pg_sequence sq ON sq.seqrelid = s.oid
-- Read once per sequence (it opens the sequence).
CROSS JOIN LATERAL (SELECT pg_sequence_last_value(s.oid) AS last_value) lv
ORDER BY 2, s.relname";

const VIEWS: &str = "
SELECT c.oid AS oid, (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name, c.relname::text AS name, pg_get_viewdef(c.oid) AS definition, coalesce(c.reloptions, '{}')::text[] AS options,
       (SELECT ds.description FROM pg_description ds WHERE ds.objoid = c.oid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0) AS comment
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1::text[]) AND c.relkind = 'v'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

/// Dependencies of views on other relations (view oid, referenced relation oid).
pub const VIEW_DEPENDENCIES_SQL: &str = "
SELECT DISTINCT r.ev_class AS view_oid, d.refobjid AS depends_on
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class";

/// Columns that may reference large objects (type `oid`, or a domain over it such as the `lo`
/// extension's), when the source has large objects at all.
const LARGE_OBJECT_COLUMNS: &str = "
SELECT (SELECT n.nspname::text FROM pg_namespace n WHERE n.oid = c.relnamespace) AS schema_name, c.relname::text AS table_name, a.attname::text AS column_name, format_type(a.atttypid, a.atttypmod) AS type_sql
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_type t ON t.oid = a.atttypid
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
  AND (a.atttypid = 'oid'::regtype OR (t.typtype = 'd' AND t.typbasetype = 'oid'::regtype))
  AND EXISTS (SELECT 1 FROM pg_largeobject_metadata)
ORDER BY 1, 2";

const EXTENSIONS: &str = "
SELECT e.extname::text AS name, n.nspname::text AS schema_name FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname <> 'plpgsql' ORDER BY 1";

/// The server's `server_version_num` (e.g. 180004).
pub async fn server_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    client
        .query_typed_one(
            "SELECT current_setting('server_version_num')::int4 AS version",
            &[],
        )
        .await
        .map(|r| r.get("version"))
}

/// One catalog query's rows (a future to join with others: see [`read_schema`]).
async fn rows(
    client: &Client,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
    what: &'static str,
) -> Result<Vec<Row>, CoordinatorError> {
    parsed(client, sql, params, what, |row| row).await
}

/// One catalog query's rows, each made into a `T` as it arrives: the rows themselves are not
/// kept (a row holds its message and a range per column; at 10 000 tables the columns' rows
/// alone were ~20 MB, held beside every other query's until all had arrived). Boxed: nine of
/// these are joined at once, and a debug build's stack would hold them all.
fn parsed<'a, T: Send + 'a>(
    client: &'a Client,
    sql: &'a str,
    params: &'a [(&'a (dyn ToSql + Sync), Type)],
    what: &'static str,
    parse: impl FnMut(Row) -> T + Send + 'a,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<T>, CoordinatorError>> + Send + 'a>,
> {
    Box::pin(parsed_rows(client, sql, params, what, parse))
}

async fn parsed_rows<T>(
    client: &Client,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
    what: &'static str,
    mut parse: impl FnMut(Row) -> T,
) -> Result<Vec<T>, CoordinatorError> {
    use futures_util::TryStreamExt as _;
    let stream = client
        .query_typed_raw(sql, params.iter().map(|(v, t)| (*v, t.clone())))
        .await
        .map_err(catalog_err(what))?;
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(row) = stream.try_next().await.map_err(catalog_err(what))? {
        out.push(parse(row));
    }
    Ok(out)
}

fn catalog_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> CoordinatorError {
    move |e| CoordinatorError::catalog(what, e)
}

/// Reads the whole source schema. The caller has set `search_path = pg_catalog` and holds the
/// snapshot transaction.
pub async fn read_schema(
    client: &Client,
    second: &Client,
    schemas: &[String],
    filter: &TableFilter,
) -> Result<SourceSchema, CoordinatorError> {
    let mut schema = SourceSchema {
        schemas: schemas.to_vec(),
        server_version: server_version(client)
            .await
            .map_err(catalog_err("read the server version"))?,
        ..SourceSchema::default()
    };
    let (matview_oids, cannot) = read_tables(client, &mut schema).await?;
    let excluded = apply_filter(client, filter, &mut schema, cannot).await?;
    let t = TableIndex::of(&schema, excluded);
    // Column names, types and defaults, and keys' definitions and columns, repeat across
    // tables: one allocation each.
    let names = Interner::default();
    // The reads that depend only on the tables go out at once, pipelined, so a source across a
    // WAN costs a couple of round trips for all of them rather than two per query (the plan
    // took 2 s at 50 ms RTT, mostly waiting). They are shared between two sessions in the same
    // snapshot (`second` may be `client`): each is one backend's work, so with two the source
    // reads on two cores: at 10 000 tables the columns and the indexes take ~0.9 s, the
    // constraints and the views as long, the sequences ~0.7 s: the sequences go to the session
    // whose other reads finish first.
    let (oids, schemas): (&(dyn ToSql + Sync), &(dyn ToSql + Sync)) = (&t.oids, &schema.schemas);
    let (oids, schemas) = ((oids, Type::OID_ARRAY), (schemas, Type::TEXT_ARRAY));
    let (by_oids, by_oids_schemas, by_schemas) = (
        [oids.clone()],
        [oids.clone(), schemas.clone()],
        [schemas.clone()],
    );
    let (
        columns,
        constraints,
        indexes,
        triggers,
        large_objects,
        sequences,
        views,
        view_deps,
        extensions,
    ) = tokio::try_join!(
        parsed(client, COLUMNS, &by_oids, "read columns", |r| column_of(
            &r, &t, &names
        )),
        parsed(second, CONSTRAINTS, &by_oids, "read constraints", |r| {
            constraint_of(&r, &t, &names)
        }),
        parsed(client, INDEXES, &by_oids, "read indexes", |r| index_of(
            &r, &t
        )),
        rows(second, TRIGGERS, &by_oids_schemas, "read triggers"),
        rows(
            client,
            LARGE_OBJECT_COLUMNS,
            &by_oids,
            "read large object columns"
        ),
        rows(client, SEQUENCES, &by_oids_schemas, "read sequences"),
        rows(second, VIEWS, &by_schemas, "read views"),
        rows(second, VIEW_DEPENDENCIES_SQL, &[], "read view dependencies"),
        rows(second, EXTENSIONS, &[], "read extensions"),
    )?;
    let type_oids = add_columns(columns, &mut schema);
    add_constraints(constraints, &mut schema);
    add_indexes(indexes, &mut schema);
    for table in &mut schema.tables {
        table.columns.shrink_to_fit();
        table.constraints.shrink_to_fit();
        table.indexes.shrink_to_fit();
    }
    read_triggers(client, triggers, &t, &mut schema).await?;
    read_large_object_columns(large_objects, &mut schema).await?;
    read_types(client, type_oids, &mut schema).await?;
    read_sequences(sequences, &mut schema).await?;
    read_views(views, &view_deps, &mut schema).await?;
    read_matviews(client, &matview_oids, &view_deps, &mut schema).await?;
    read_used_functions(client, &t.oids, &mut schema).await?;
    for row in extensions {
        schema
            .extensions
            .push((row.get("name"), row.get("schema_name")));
    }
    Ok(schema)
}

/// Applies the table filters: the tables left out leave `schema.tables` (returned by oid), and
/// the selection is recorded in `schema`. A partition or inheritance tree must be selected
/// whole. A table that `cannot` be migrated (a foreign table…) is refused unless left out.
async fn apply_filter(
    client: &Client,
    filter: &TableFilter,
    schema: &mut SourceSchema,
    cannot: Vec<(QualName, String)>,
) -> Result<HashMap<Oid, QualName>, CoordinatorError> {
    let names: Vec<QualName> = schema
        .tables
        .iter()
        .map(Table::qualname)
        .chain(cannot.iter().map(|(n, _)| n.clone()))
        .collect();
    let selection = filter.select(client, &names).await?;
    schema.unsupported.extend(
        cannot
            .into_iter()
            .filter(|(name, _)| !selection.excluded.contains(name))
            .map(|(_, why)| why),
    );
    for t in &schema.tables {
        let parents = t
            .partition_of
            .iter()
            .map(|(parent, _)| parent)
            .chain(&t.inherits);
        for parent in parents {
            if selection.excluded.contains(&t.qualname()) != selection.excluded.contains(parent) {
                schema.unsupported.push(format!(
                    "table {} is a partition or child of {} and the table filters select one of them but not the other: select whole partition and inheritance trees",
                    t.qualname().plain(),
                    parent.plain()
                ));
            }
        }
    }
    let (kept, left_out): (Vec<Table>, Vec<Table>) = std::mem::take(&mut schema.tables)
        .into_iter()
        .partition(|t| !selection.excluded.contains(&t.qualname()));
    schema.tables = kept;
    schema.tables.shrink_to_fit();
    schema.excluded = selection.excluded.into_iter().collect();
    schema.without_data = selection.without_data;
    Ok(left_out
        .into_iter()
        .map(|t| (t.oid, t.qualname()))
        .collect())
}

/// The migrated tables' oids, and each one's position in `schema.tables` and name; the names
/// of the tables the filters left out.
struct TableIndex {
    oids: Vec<Oid>,
    index_of: HashMap<Oid, usize>,
    name_of: HashMap<Oid, QualName>,
    excluded: HashMap<Oid, QualName>,
}

impl TableIndex {
    fn of(schema: &SourceSchema, excluded: HashMap<Oid, QualName>) -> Self {
        TableIndex {
            excluded,
            oids: schema.tables.iter().map(|t| t.oid).collect(),
            index_of: schema
                .tables
                .iter()
                .enumerate()
                .map(|(i, t)| (t.oid, i))
                .collect(),
            name_of: schema
                .tables
                .iter()
                .map(|t| (t.oid, t.qualname()))
                .collect(),
        }
    }
}

/// The tables of the schema; returns the materialized views' oids and the tables that cannot
/// be migrated, each with the reason.
async fn read_tables(
    client: &Client,
    schema: &mut SourceSchema,
) -> Result<(Vec<Oid>, Vec<(QualName, String)>), CoordinatorError> {
    let mut matview_oids: Vec<Oid> = Vec::new();
    // Tables pgzm cannot migrate, with the reason: refused unless the filters leave them out.
    let mut cannot: Vec<(QualName, String)> = Vec::new();
    for row in client
        .query_typed(TABLES, &[(&schema.schemas, Type::TEXT_ARRAY)])
        .await
        .map_err(catalog_err("read tables"))?
    {
        let name = QualName::from_row(&row);
        let kind: String = row.get("kind");
        let inherits: bool = row.get("parent_elsewhere");
        match kind.as_str() {
            "m" => matview_oids.push(row.get::<_, Oid>("oid")),
            "f" => {
                let why = format!("foreign table {}: foreign tables are not migrated (leave it out with --exclude-table)", name.plain());
                cannot.push((name, why));
            }
            _ if inherits => {
                let why = format!(
                    "table {} is a partition or child of a table in a schema that is not migrated: add that schema with --schema",
                    name.plain()
                );
                cannot.push((name, why));
            }
            _ => schema.tables.push(Table {
                oid: row.get("oid"),
                schema: crate::name::common(&name.schema),
                name: name.name,
                persistence: row
                    .get::<_, String>("persistence")
                    .chars()
                    .next()
                    .unwrap_or('p'),
                reloptions: row.get("reloptions"),
                columns: Vec::new(),
                constraints: Vec::new(),
                indexes: Vec::new(),
                triggers: Vec::new(),
                comment: row.get("comment"),
                estimated_rows: row.get("estimated_rows"),
                estimated_bytes: row.get("estimated_bytes"),
                pages: row.get("pages"),
                estimated_copy_bytes: row.get("estimated_copy_bytes"),
                partition_key: row.get("partition_key"),
                partition_of: row
                    .get::<_, Option<String>>("partition_parent_schema")
                    .zip(row.get::<_, Option<String>>("partition_parent"))
                    .map(|(s, n)| QualName::new(s, n))
                    .zip(row.get::<_, Option<String>>("partition_bound")),
                inherits: row
                    .get::<_, Vec<String>>("inherits_schemas")
                    .into_iter()
                    .zip(row.get::<_, Vec<String>>("inherits"))
                    .map(|(s, n)| QualName::new(s, n))
                    .collect(),
            }),
        }
    }
    Ok((matview_oids, cannot))
}

/// A column of a migrated table (and the table's position).
fn column_of(row: &Row, t: &TableIndex, names: &Interner) -> (usize, Column) {
    let identity = match row.get::<_, &str>("identity") {
        "a" => Some(Identity::Always),
        "d" => Some(Identity::ByDefault),
        _ => None,
    };
    let column = Column {
        name: names.get(row, "name"),
        type_sql: names.get(row, "type_sql"),
        type_oid: row.get("type_oid"),
        elem_type_oid: row.get("elem_type_oid"),
        not_null: row.get("not_null"),
        default: names.get_opt(row, "default_expr"),
        identity,
        more: None,
    };
    let more = ColumnMore {
        identity_sequence: None,
        generated: row.get("generated"),
        generated_virtual: row.get("generated_virtual"),
        not_null_name: row.get("not_null_name"),
        collation: row.get("collation"),
        comment: row.get("comment"),
        row_type_of: row.get("row_type_of"),
    };
    let column = Column {
        more: (more.generated.is_some()
            || more.generated_virtual
            || more.not_null_name.is_some()
            || more.collation.is_some()
            || more.comment.is_some()
            || more.row_type_of != 0)
            .then(|| Box::new(more)),
        ..column
    };
    (t.index_of[&row.get::<_, Oid>("table_oid")], column)
}

/// Adds the columns to their tables; returns the types they use (but the row types of the
/// tables read: those follow their tables).
fn add_columns(columns: Vec<(usize, Column)>, schema: &mut SourceSchema) -> BTreeSet<Oid> {
    let mut type_oids = BTreeSet::new();
    let tables: std::collections::HashSet<Oid> = schema.tables.iter().map(|t| t.oid).collect();
    for (table, column) in columns {
        if tables.contains(&column.more().row_type_of) {
            schema.tables[table].columns.push(column);
            continue;
        }
        type_oids.insert(column.type_oid);
        if column.elem_type_oid != 0 {
            type_oids.insert(column.elem_type_oid);
        }
        schema.tables[table].columns.push(column);
    }
    type_oids
}

/// A constraint of a migrated table (and the table's position). A foreign key to a table
/// outside the set has no `references` (see [`add_constraints`]).
fn constraint_of(row: &Row, t: &TableIndex, names: &Interner) -> (usize, Constraint) {
    let kind = row.get::<_, &str>("kind").chars().next().unwrap_or('c');
    let references = if kind == 'f' {
        let target: Oid = row.get("references_oid");
        // A table the filters left out stays live: the key references it there.
        t.name_of
            .get(&target)
            .or_else(|| t.excluded.get(&target))
            .cloned()
    } else {
        None
    };
    let constraint = Constraint {
        name: row.get("name"),
        kind,
        definition: match with_index_options(row.get("definition"), row.get("index_options")) {
            Some(definition) => definition.into(),
            None => names.get(row, "definition"),
        },
        references,
        validated: row.get("validated"),
        comment: row.get("comment"),
        columns: names.get_all(row, "columns"),
        ref_columns: names.get_all(row, "ref_columns"),
        match_full: row.get::<_, Option<bool>>("match_full").unwrap_or(false),
    };
    (t.index_of[&row.get::<_, Oid>("table_oid")], constraint)
}

/// A primary key's or unique constraint's definition with its index's storage parameters
/// (`WITH (fillfactor='70')`) where `pg_dump` prints them: after the columns and `INCLUDE`,
/// before `DEFERRABLE`. `None` when it has none (the definition is `pg_get_constraintdef`'s).
fn with_index_options(definition: &str, options: Option<&str>) -> Option<String> {
    let options = options.filter(|o| !o.is_empty())?;
    let with = format!(" WITH ({options})");
    for tail in [" DEFERRABLE INITIALLY DEFERRED", " DEFERRABLE"] {
        if let Some(head) = definition.strip_suffix(tail) {
            return Some(format!("{head}{with}{tail}"));
        }
    }
    Some(format!("{definition}{with}"))
}

/// Adds the constraints to their tables; a foreign key to a table outside the set is
/// unsupported.
fn add_constraints(constraints: Vec<(usize, Constraint)>, schema: &mut SourceSchema) {
    for (table, c) in constraints {
        if c.kind == 'f' && c.references.is_none() {
            schema.unsupported.push(format!(
                "foreign key \"{}\" of table {} references a table outside the migrated schemas: add its schema with --schema",
                c.name,
                schema.tables[table].qualname().plain()
            ));
        }
        schema.tables[table].constraints.push(c);
    }
}

/// An index of a migrated table that does not back a constraint (and the table's position).
fn index_of(row: &Row, t: &TableIndex) -> (usize, Index) {
    let index = Index {
        name: row.get("name"),
        definition: row.get("definition"),
        comment: row.get("comment"),
    };
    (t.index_of[&row.get::<_, Oid>("table_oid")], index)
}

/// Adds the indexes to their tables.
fn add_indexes(indexes: Vec<(usize, Index)>, schema: &mut SourceSchema) {
    for (table, index) in indexes {
        schema.tables[table].indexes.push(index);
    }
}

/// The tables' triggers and the functions of the migrated schemas they call.
async fn read_triggers(
    client: &Client,
    rows: Vec<Row>,
    t: &TableIndex,
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    let mut function_oids = BTreeSet::new();
    for row in rows {
        let table = t.index_of[&row.get::<_, Oid>("table_oid")];
        let name: String = row.get("name");
        let migrated: bool = row.get("function_migrated");
        let in_catalog: bool = row.get("function_in_catalog");
        if migrated {
            function_oids.insert(row.get::<_, Oid>("function_oid"));
        } else if !in_catalog {
            schema.unsupported.push(format!(
                "trigger \"{name}\" of table {} calls a function outside the migrated schemas: add its schema with --schema",
                schema.tables[table].qualname().plain()
            ));
        }
        schema.tables[table].triggers.push(Trigger {
            name,
            definition: row.get("definition"),
            enabled: row.get("enabled"),
        });
    }
    let function_oids: Vec<Oid> = function_oids.into_iter().collect();
    for row in client
        .query_typed(FUNCTIONS, &[(&function_oids, Type::OID_ARRAY)])
        .await
        .map_err(catalog_err("read trigger functions"))?
    {
        schema.functions.push(Function {
            signature: row.get("signature"),
            definition: row.get("definition"),
        });
    }
    Ok(())
}

/// Columns that can hold large object references while the source has large objects:
/// unsupported.
async fn read_large_object_columns(
    rows: Vec<Row>,
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    for row in rows {
        let (table, column, ty): (String, String, String) = (
            row.get("table_name"),
            row.get("column_name"),
            row.get("type_sql"),
        );
        let table = QualName::new(row.get::<_, String>("schema_name"), table).plain();
        schema.unsupported.push(format!(
            "column {table}.\"{column}\" ({ty}) can hold large object references and the source has large objects: pgzm does not copy large objects, so the copied oids would point at missing or different objects in the destination; store the data as bytea, or leave the table out of the source"
        ));
    }
    Ok(())
}

async fn read_types(
    client: &Client,
    mut pending: BTreeSet<Oid>,
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    let mut seen = BTreeSet::new();
    let mut found: BTreeMap<Oid, UserType> = BTreeMap::new();
    while !pending.is_empty() {
        let batch: Vec<Oid> = pending
            .iter()
            .copied()
            .filter(|o| seen.insert(*o))
            .collect();
        pending.clear();
        if batch.is_empty() {
            break;
        }
        let kinds = read_type_batch(
            client,
            &batch,
            &schema.schemas,
            &mut found,
            &mut pending,
            &mut schema.unsupported,
            &mut schema.required_types,
        )
        .await?;
        read_type_details(
            client,
            &kinds,
            &mut found,
            &mut pending,
            &mut schema.unsupported,
        )
        .await?;
    }
    schema.types = creation_order(found.into_values().collect());
    Ok(())
}

/// The user types of one batch whose details take a query of their kind.
#[derive(Default)]
struct TypeKinds {
    domains: Vec<Oid>,
    composites: Vec<Oid>,
    ranges: Vec<Oid>,
    multiranges: Vec<Oid>,
}

/// Reads the types of `batch` into `found` (the types they are built on go to `pending`: an
/// array's element, a domain's base); returns which need their details read.
async fn read_type_batch(
    client: &Client,
    batch: &[Oid],
    schemas: &[String],
    found: &mut BTreeMap<Oid, UserType>,
    pending: &mut BTreeSet<Oid>,
    unsupported: &mut Vec<String>,
    required: &mut Vec<QualName>,
) -> Result<TypeKinds, CoordinatorError> {
    let mut kinds = TypeKinds::default();
    for row in client
        .query_typed(
            TYPES,
            &[(&batch, Type::OID_ARRAY), (&schemas, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(catalog_err("read types"))?
    {
        let oid: Oid = row.get("oid");
        let name: String = row.get("name");
        let kind: String = row.get("kind");
        let user_owned: bool = row.get("user_owned");
        let is_array: bool = row.get("is_array");
        if is_array {
            pending.insert(row.get("elem_type_oid"));
            continue;
        }
        if !user_owned {
            // A type of a schema that is not migrated must exist in the destination already.
            let (in_extension, in_system): (bool, bool) =
                (row.get("in_extension"), row.get("in_system"));
            if !in_extension && !in_system {
                required.push(QualName::new(row.get::<_, String>("schema_name"), name));
            }
            continue;
        }
        let kind = match kind.as_str() {
            "e" => UserTypeKind::Enum(row.get("labels")),
            "d" => {
                let base: Oid = row.get("base_type_oid");
                pending.insert(base);
                kinds.domains.push(oid);
                UserTypeKind::Domain {
                    base_type_sql: row.get("base_type_sql"),
                    base_type_oid: base,
                    not_null: row.get("not_null"),
                    default: row.get("default_expr"),
                    collation: row.get("collation"),
                    checks: Vec::new(),
                }
            }
            "c" => {
                kinds.composites.push(oid);
                UserTypeKind::Composite(Vec::new())
            }
            "r" => {
                kinds.ranges.push(oid);
                UserTypeKind::Range {
                    subtype_sql: String::new(),
                    subtype_oid: 0,
                    opclass: None,
                    collation: None,
                    subdiff: None,
                    multirange: None,
                }
            }
            // A multirange comes with its range.
            "m" => {
                kinds.multiranges.push(oid);
                continue;
            }
            _ => {
                unsupported.push(format!(
                    "base type \"{name}\" defined outside an extension: not migrated"
                ));
                continue;
            }
        };
        found.insert(
            oid,
            UserType {
                oid,
                schema: row.get("schema_name"),
                array_oid: row.get("array_oid"),
                name,
                kind,
                comment: row.get("comment"),
            },
        );
    }
    Ok(kinds)
}

/// Fills in ranges' subtypes, composites' attributes and domains' checks, and finds the range
/// of each multirange; the types these use go to `pending`.
async fn read_type_details(
    client: &Client,
    kinds: &TypeKinds,
    found: &mut BTreeMap<Oid, UserType>,
    pending: &mut BTreeSet<Oid>,
    unsupported: &mut Vec<String>,
) -> Result<(), CoordinatorError> {
    if !kinds.multiranges.is_empty() {
        for row in client
            .query_typed(
                RANGES_OF_MULTIRANGES,
                &[(&kinds.multiranges, Type::OID_ARRAY)],
            )
            .await
            .map_err(catalog_err("read multirange types"))?
        {
            pending.insert(row.get::<_, Oid>("range_oid"));
        }
    }
    if !kinds.ranges.is_empty() {
        for row in client
            .query_typed(RANGES, &[(&kinds.ranges, Type::OID_ARRAY)])
            .await
            .map_err(catalog_err("read range types"))?
        {
            let subtype: Oid = row.get("subtype_oid");
            pending.insert(subtype);
            if let Some(canonical) = row.get::<_, Option<String>>("canonical") {
                unsupported.push(format!(
                    "range type with canonical function {canonical}: pgzm cannot create it (canonical functions are written in C); create the range type in the destination first"
                ));
            }
            if let Some(UserType {
                kind:
                    UserTypeKind::Range {
                        subtype_sql,
                        subtype_oid,
                        opclass,
                        collation,
                        subdiff,
                        multirange,
                    },
                ..
            }) = found.get_mut(&row.get::<_, Oid>("oid"))
            {
                *subtype_sql = row.get("subtype_sql");
                *subtype_oid = subtype;
                *opclass = row.get("opclass");
                *collation = row.get("collation");
                *subdiff = row.get("subdiff");
                *multirange = row.get("multirange");
            }
        }
    }
    if !kinds.composites.is_empty() {
        for row in client
            .query_typed(
                COMPOSITE_ATTRIBUTES,
                &[(&kinds.composites, Type::OID_ARRAY)],
            )
            .await
            .map_err(catalog_err("read composite types"))?
        {
            let attribute_type: Oid = row.get("attribute_type_oid");
            pending.insert(attribute_type);
            if let Some(UserType {
                kind: UserTypeKind::Composite(attributes),
                ..
            }) = found.get_mut(&row.get::<_, Oid>("type_oid"))
            {
                attributes.push((
                    row.get("name"),
                    row.get("type_sql"),
                    attribute_type,
                    row.get("collation"),
                ));
            }
        }
    }
    if !kinds.domains.is_empty() {
        for row in client
            .query_typed(DOMAIN_CHECKS, &[(&kinds.domains, Type::OID_ARRAY)])
            .await
            .map_err(catalog_err("read domain constraints"))?
        {
            if let Some(UserType {
                kind: UserTypeKind::Domain { checks, .. },
                ..
            }) = found.get_mut(&row.get::<_, Oid>("type_oid"))
            {
                checks.push((row.get("name"), row.get("definition")));
            }
        }
    }
    Ok(())
}

/// Types in an order they can be created in: a domain after its base type, a composite after
/// its attributes' types, a range after its subtype (a cycle keeps the rest in place).
fn creation_order(mut remaining: Vec<UserType>) -> Vec<UserType> {
    // Domains over user types must be created after their base type: order by dependency.
    let mut ordered: Vec<UserType> = Vec::new();
    while !remaining.is_empty() {
        let before = remaining.len();
        let done: BTreeSet<Oid> = ordered.iter().map(|t| t.oid).collect();
        let all: BTreeSet<Oid> = remaining.iter().map(|t| t.oid).collect();
        let ready_after = |o: &Oid| done.contains(o) || !all.contains(o);
        let (ready, rest): (Vec<_>, Vec<_>) = remaining.into_iter().partition(|t| match &t.kind {
            UserTypeKind::Domain { base_type_oid, .. } => ready_after(base_type_oid),
            UserTypeKind::Composite(attributes) => {
                attributes.iter().all(|(_, _, o, _)| ready_after(o))
            }
            UserTypeKind::Range { subtype_oid, .. } => ready_after(subtype_oid),
            UserTypeKind::Enum(_) => true,
        });
        ordered.extend(ready);
        remaining = rest;
        if remaining.len() == before {
            ordered.append(&mut remaining);
        }
    }
    ordered
}

async fn read_sequences(rows: Vec<Row>, schema: &mut SourceSchema) -> Result<(), CoordinatorError> {
    let position: HashMap<QualName, usize> = schema
        .tables
        .iter()
        .enumerate()
        .map(|(i, t)| (t.qualname(), i))
        .collect();
    for row in rows {
        let name: String = row.get("name");
        let seq_schema: String = row.get("schema_name");
        let owned_by = match (
            row.get::<_, Option<String>>("owner_table"),
            row.get::<_, Option<String>>("owner_column"),
        ) {
            (Some(t), Some(c)) => Some((t, c)),
            _ => None,
        };
        let identity: bool = row.get("identity");
        if identity {
            if let Some((table, column)) = &owned_by {
                // An owned sequence is in its table's schema.
                let at = position.get(&QualName::new(seq_schema.clone(), table.clone()));
                if let Some(t) = at.and_then(|&i| schema.tables.get_mut(i)) {
                    if let Some(c) = t.columns.iter_mut().find(|c| &c.name == column) {
                        c.more_mut().identity_sequence = Some(name.clone());
                    }
                }
            }
        }
        schema.sequences.push(Sequence {
            oid: row.get("oid"),
            schema: seq_schema,
            name,
            type_sql: row.get("type_sql"),
            start: row.get("start"),
            increment: row.get("increment"),
            min: row.get("min"),
            max: row.get("max"),
            cache: row.get("cache"),
            cycle: row.get("cycle"),
            owned_by,
            identity,
            last_value: row.get("last_value"),
            is_called: row.get("is_called"),
            used_by: row
                .get::<_, Vec<String>>("used_by")
                .into_iter()
                .filter_map(|s| {
                    // A name containing '|' is split wrongly and then matches no preserved
                    // table: only preserved tables use this list.
                    let mut parts = s.splitn(3, '|');
                    let (schema, table, column) = (parts.next()?, parts.next()?, parts.next()?);
                    Some((QualName::new(schema, table), column.to_string()))
                })
                .collect(),
        });
    }
    Ok(())
}

async fn read_views(
    rows: Vec<Row>,
    view_deps: &[Row],
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    let mut views: BTreeMap<Oid, View> = BTreeMap::new();
    for row in rows {
        views.insert(
            row.get("oid"),
            View {
                schema: row.get("schema_name"),
                name: row.get("name"),
                definition: row.get("definition"),
                options: row.get("options"),
                comment: row.get("comment"),
            },
        );
    }
    if views.is_empty() {
        return Ok(());
    }
    let mut deps: BTreeMap<Oid, BTreeSet<Oid>> = BTreeMap::new();
    for row in view_deps {
        let view: Oid = row.get("view_oid");
        let on: Oid = row.get("depends_on");
        if views.contains_key(&view) && views.contains_key(&on) {
            deps.entry(view).or_default().insert(on);
        }
    }
    for oid in topological_order(views.keys().copied().collect(), &deps) {
        if let Some(v) = views.remove(&oid) {
            schema.views.push(v);
        }
    }
    Ok(())
}

/// Functions that the migrated objects call: column defaults and generated columns, CHECK
/// constraints, index expressions and predicates of the tables; domain constraints and defaults
/// of their types; the views and materialized views of `public`; and, through SQL-standard
/// bodies, the functions those call.
const USED_FUNCTIONS: &str = "
WITH objs AS (
    SELECT 'pg_attrdef'::regclass AS cls, oid FROM pg_attrdef WHERE adrelid = ANY($1::oid[])
    UNION ALL SELECT 'pg_constraint'::regclass, oid FROM pg_constraint
              WHERE conrelid = ANY($1::oid[]) OR contypid = ANY($2::oid[])
    UNION ALL SELECT 'pg_class'::regclass, indexrelid FROM pg_index WHERE indrelid = ANY($1::oid[])
    UNION ALL SELECT 'pg_rewrite'::regclass, r.oid FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
              JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = ANY($4::text[]) AND c.relkind IN ('v', 'm')
    UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type WHERE oid = ANY($2::oid[])
    UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc WHERE oid = ANY($3::oid[])
)
SELECT DISTINCT p.oid AS oid, p.oid::regprocedure::text AS signature, n.nspname::text AS schema_name,
       EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_proc'::regclass AND x.objid = p.oid AND x.deptype = 'e') AS in_extension,
       p.prokind::text AS kind
FROM pg_depend d
JOIN objs o ON o.cls = d.classid AND o.oid = d.objid
JOIN pg_proc p ON p.oid = d.refobjid
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE d.refclassid = 'pg_proc'::regclass AND d.deptype = 'n' AND n.nspname <> 'pg_catalog'";

async fn read_used_functions(
    client: &Client,
    tables: &[Oid],
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    let types: Vec<Oid> = schema.types.iter().map(|t| t.oid).collect();
    let mut found: BTreeSet<Oid> = BTreeSet::new();
    let mut public: Vec<Oid> = Vec::new();
    // Rounds: a function found may call others through a SQL-standard body.
    for _ in 0..16 {
        let known: Vec<Oid> = found.iter().copied().collect();
        let before = found.len();
        for row in client
            .query_typed(
                USED_FUNCTIONS,
                &[
                    (&tables, Type::OID_ARRAY),
                    (&types, Type::OID_ARRAY),
                    (&known, Type::OID_ARRAY),
                    (&schema.schemas, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(catalog_err("read functions the tables use"))?
        {
            let oid: Oid = row.get("oid");
            if !found.insert(oid) {
                continue;
            }
            let (signature, namespace, extension, kind): (String, String, bool, String) = (
                row.get("signature"),
                row.get("schema_name"),
                row.get("in_extension"),
                row.get("kind"),
            );
            if extension {
                continue;
            }
            if !schema.schemas.contains(&namespace) {
                schema
                    .required_routines
                    .push((signature, format!("function (schema {namespace})")));
            } else if kind == "a" {
                schema
                    .required_routines
                    .push((signature, "aggregate".to_string()));
            } else {
                public.push(oid);
            }
        }
        if found.len() == before {
            break;
        }
    }
    if public.is_empty() {
        return Ok(());
    }
    for row in client
        .query_typed(FUNCTIONS, &[(&public, Type::OID_ARRAY)])
        .await
        .map_err(catalog_err("read functions the tables use"))?
    {
        let signature: String = row.get("signature");
        if !schema.functions.iter().any(|f| f.signature == signature) {
            schema.functions.push(Function {
                signature,
                definition: row.get("definition"),
            });
        }
    }
    Ok(())
}

/// Materialized views (by oid): definition, population, indexes, options, comment.
pub const MATVIEWS_SQL: &str = "
SELECT c.oid AS oid, n.nspname::text AS schema_name, c.relname::text AS name, pg_get_viewdef(c.oid) AS definition, c.relispopulated AS populated,
       ARRAY(SELECT i.relname::text
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid ORDER BY i.oid) AS index_names,
       coalesce(c.reloptions, '{}')::text[] AS options, (SELECT ds.description FROM pg_description ds WHERE ds.objoid = c.oid AND ds.classoid = 'pg_class'::regclass AND ds.objsubid = 0) AS comment,
       ARRAY(SELECT pg_get_indexdef(i.oid)
             FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid ORDER BY i.oid) AS index_definitions
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = ANY($1::oid[])";

/// Reads materialized views by oid, with the views and materialized views each one reads
/// (oids, for ordering and for refusals).
pub async fn matviews_by_oid(
    client: &Client,
    oids: &[Oid],
) -> Result<BTreeMap<Oid, Matview>, tokio_postgres::Error> {
    let mut out = BTreeMap::new();
    if oids.is_empty() {
        return Ok(out);
    }
    for row in client
        .query_typed(MATVIEWS_SQL, &[(&oids, Type::OID_ARRAY)])
        .await?
    {
        out.insert(
            row.get::<_, Oid>("oid"),
            Matview {
                schema: row.get("schema_name"),
                name: row.get("name"),
                definition: row.get("definition"),
                populated: row.get("populated"),
                indexes: row
                    .get::<_, Vec<String>>("index_names")
                    .into_iter()
                    .zip(row.get::<_, Vec<String>>("index_definitions"))
                    .collect(),
                options: row.get("options"),
                comment: row.get("comment"),
            },
        );
    }
    Ok(out)
}

async fn read_matviews(
    client: &Client,
    oids: &[Oid],
    view_deps: &[Row],
    schema: &mut SourceSchema,
) -> Result<(), CoordinatorError> {
    let mut found = matviews_by_oid(client, oids)
        .await
        .map_err(catalog_err("read materialized views"))?;
    if found.is_empty() {
        return Ok(());
    }
    let views: BTreeMap<Oid, String> = client
        .query_typed(
            "SELECT c.oid, n.nspname::text AS schema_name, c.relname::text AS name
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'v' AND n.nspname = ANY($1::text[])",
            &[(&schema.schemas, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(catalog_err("read views"))?
        .iter()
        .map(|r| {
            let name = QualName::from_row(r);
            (r.get("oid"), name.plain())
        })
        .collect();
    let mut deps: BTreeMap<Oid, BTreeSet<Oid>> = BTreeMap::new();
    for row in view_deps {
        let (mv, on): (Oid, Oid) = (row.get("view_oid"), row.get("depends_on"));
        if !found.contains_key(&mv) {
            continue;
        }
        if let Some(view) = views.get(&on) {
            // Views are created at the swap, after the materialized views are built.
            schema.unsupported.push(format!(
                "materialized view {} reads view {view}: pgzm builds materialized views over the new tables before the swap, when the new views do not exist yet; make it read the tables directly",
                QualName::new(found[&mv].schema.clone(), found[&mv].name.clone()).plain()
            ));
        }
        if found.contains_key(&on) {
            deps.entry(mv).or_default().insert(on);
        }
    }
    for oid in topological_order(found.keys().copied().collect(), &deps) {
        if let Some(m) = found.remove(&oid) {
            schema.matviews.push(m);
        }
    }
    Ok(())
}

/// Orders `nodes` so that each comes after the nodes it depends on (cycles, which PostgreSQL
/// does not allow between views, are appended in oid order).
pub fn topological_order(nodes: Vec<Oid>, deps: &BTreeMap<Oid, BTreeSet<Oid>>) -> Vec<Oid> {
    let mut out = Vec::with_capacity(nodes.len());
    let mut placed = BTreeSet::new();
    let mut remaining = nodes;
    while !remaining.is_empty() {
        let before = remaining.len();
        remaining.retain(|n| {
            let ready = deps
                .get(n)
                .is_none_or(|d| d.iter().all(|x| placed.contains(x) || x == n));
            if ready {
                out.push(*n);
            }
            !ready
        });
        for n in &out {
            placed.insert(*n);
        }
        if remaining.len() == before {
            out.append(&mut remaining);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_index_options;

    #[test]
    fn index_options_go_before_deferrable() {
        let o = Some("fillfactor='70'");
        let with = |d: &str| with_index_options(d, o);
        assert_eq!(
            with("PRIMARY KEY (id) INCLUDE (a)").as_deref(),
            Some("PRIMARY KEY (id) INCLUDE (a) WITH (fillfactor='70')")
        );
        assert_eq!(
            with("UNIQUE (\"x DEFERRABLE\") DEFERRABLE INITIALLY DEFERRED").as_deref(),
            Some("UNIQUE (\"x DEFERRABLE\") WITH (fillfactor='70') DEFERRABLE INITIALLY DEFERRED")
        );
        assert_eq!(
            with("UNIQUE (u) DEFERRABLE").as_deref(),
            Some("UNIQUE (u) WITH (fillfactor='70') DEFERRABLE")
        );
        // Without options the definition is pg_get_constraintdef's, unchanged.
        assert_eq!(with_index_options("UNIQUE (u)", None), None);
        assert_eq!(with_index_options("UNIQUE (u)", Some("")), None);
    }
}
