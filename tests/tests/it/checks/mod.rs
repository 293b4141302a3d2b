//! Assertion helpers shared by the migration-correctness tests: live vs backup checksums,
//! relations by name prefix, schemas, and single-value queries.

#![allow(dead_code)]

use std::collections::BTreeMap;

use pgzm_tests::inspect::{self, CatalogSignature, TableChecksum};
use tokio_postgres::types::FromSqlOwned;
use tokio_postgres::Client;

/// Checksums of the live tables: every table of `public` except `shadow_*` and `backup_*`.
pub async fn live_sums(client: &Client) -> BTreeMap<String, TableChecksum> {
    inspect::table_checksums(client)
        .await
        .expect("table checksums")
        .into_iter()
        .filter(|(name, _)| !name.starts_with("shadow_") && !name.starts_with("backup_"))
        .collect()
}

/// Checksums of the `backup_*` tables, keyed by the name without the prefix.
pub async fn backup_sums(client: &Client) -> BTreeMap<String, TableChecksum> {
    inspect::table_checksums(client)
        .await
        .expect("table checksums")
        .into_iter()
        .filter_map(|(name, sum)| name.strip_prefix("backup_").map(|n| (n.to_string(), sum)))
        .collect()
}

/// Row count and content hash of one table, `qualified` as it goes into SQL (same definition
/// as `inspect::table_checksums`).
pub async fn checksum(client: &Client, qualified: &str) -> TableChecksum {
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' \
         ORDER BY md5(t::text) COLLATE \"C\")), '') FROM {qualified} t"
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("checksum {qualified}: {}", pg_error(&e)));
    TableChecksum {
        rows: row.get(0),
        md5: row.get(1),
    }
}

/// Every relation (any relkind) and type in `public` whose name starts with `prefix`
/// (compared with `left()`, not `LIKE`), as `kind:name`, sorted.
pub async fn objects_with_prefix(client: &Client, prefix: &str) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'rel ' || c.relkind::text || ':' || c.relname::text FROM pg_class c
             WHERE c.relnamespace = 'public'::regnamespace
               AND left(c.relname::text, length($1)) = $1
             UNION ALL
             SELECT 'type:' || t.typname::text FROM pg_type t
             WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd')
               AND left(t.typname::text, length($1)) = $1
             ORDER BY 1",
            &[&prefix],
        )
        .await
        .expect("list objects by prefix");
    rows.iter().map(|r| r.get(0)).collect()
}

/// Asserts that nothing in `public` is named with `prefix` (see [`objects_with_prefix`]).
pub async fn assert_none_with_prefix(client: &Client, prefix: &str) {
    assert_eq!(
        objects_with_prefix(client, prefix).await,
        Vec::<String>::new(),
        "objects named {prefix}*"
    );
}

/// Names of the ordinary tables of `public` that start with `prefix`, sorted.
pub async fn tables_with_prefix(client: &Client, prefix: &str) -> Vec<String> {
    inspect::tables(client)
        .await
        .expect("tables")
        .into_iter()
        .filter(|t| t.starts_with(prefix))
        .collect()
}

/// Every schema of the database, sorted.
pub async fn schemas(client: &Client) -> Vec<String> {
    let rows = client
        .query("SELECT nspname::text FROM pg_namespace ORDER BY 1", &[])
        .await
        .expect("list schemas");
    rows.iter().map(|r| r.get(0)).collect()
}

/// Every relation and type in `public` not owned by an extension, as `kind:name`, sorted —
/// a coarse "nothing was created or dropped" fingerprint.
pub async fn public_objects(client: &Client) -> Vec<String> {
    let rows = client
        .query(
            "SELECT 'rel ' || c.relkind::text || ':' || c.relname::text FROM pg_class c
             WHERE c.relnamespace = 'public'::regnamespace
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                               AND d.objid = c.oid AND d.deptype = 'e')
             UNION ALL
             SELECT 'type ' || t.typtype::text || ':' || t.typname::text FROM pg_type t
             WHERE t.typnamespace = 'public'::regnamespace
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                               AND d.objid = t.oid AND d.deptype = 'e')
               AND t.typtype IN ('e', 'd')
             UNION ALL
             SELECT 'proc:' || p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'public'::regnamespace
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                               AND d.objid = p.oid AND d.deptype = 'e')
             UNION ALL
             SELECT 'trigger:' || tgname::text FROM pg_trigger WHERE NOT tgisinternal
             UNION ALL
             SELECT 'policy:' || polname::text FROM pg_policy
             ORDER BY 1",
            &[],
        )
        .await
        .expect("list public objects");
    rows.iter().map(|r| r.get(0)).collect()
}

/// The server's message of a failed statement (the `Display` of the error only says "db error").
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} [{}]{}",
            db.message(),
            db.code().code(),
            db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        ),
        None => e.to_string(),
    }
}

/// The one value `sql` returns.
pub async fn value<T: FromSqlOwned>(client: &Client, sql: &str) -> T {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)))
        .get(0)
}

/// The one text value `sql` returns.
pub async fn text(client: &Client, sql: &str) -> String {
    value(client, sql).await
}

/// The one bigint value `sql` returns.
pub async fn int(client: &Client, sql: &str) -> i64 {
    value(client, sql).await
}

/// The one boolean value `sql` returns.
pub async fn boolean(client: &Client, sql: &str) -> bool {
    value(client, sql).await
}

/// The first column of every row `sql` returns, as text.
pub async fn texts(client: &Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", pg_error(&e)))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `format_type` of `column` of `table` (any text `::regclass` accepts, e.g. `public."User"`).
pub async fn column_type(client: &Client, table: &str, column: &str) -> String {
    client
        .query_one(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::text::regclass AND attname = $2",
            &[&table, &column],
        )
        .await
        .unwrap_or_else(|e| panic!("type of {table}.{column}: {}", pg_error(&e)))
        .get(0)
}

/// Asserts that `sql` fails with SQLSTATE `code`.
pub async fn assert_fails_with(client: &Client, sql: &str, code: &str, what: &str) {
    let Err(err) = client.batch_execute(sql).await else {
        panic!("{what}: {sql} succeeded");
    };
    assert_eq!(
        err.as_db_error().map(|d| d.code().code()),
        Some(code),
        "{what}: {}",
        pg_error(&err)
    );
}

/// The catalog signature of the live tables.
pub async fn signature(client: &Client) -> CatalogSignature {
    inspect::catalog_signature(client, None)
        .await
        .expect("catalog signature")
}

/// The signature of the `backup_*` tables, with the prefix also removed where the harness's
/// normalisation leaves it: sequence and type names inside column types and defaults
/// (`nextval('"backup_User_id_seq"'::regclass)`, `'A'::"backup_City"`). The owned sequences
/// and the replaced types move to backup names together with their tables.
pub async fn backup_signature(client: &Client) -> CatalogSignature {
    let mut sig = inspect::catalog_signature(client, Some("backup_"))
        .await
        .expect("backup signature");
    for table in sig.tables.values_mut() {
        for column in &mut table.columns {
            column.type_name = strip_backup_prefix(&column.type_name);
            if let Some(d) = &mut column.default {
                *d = strip_backup_prefix(d);
            }
        }
    }
    sig
}

/// Removes `backup_` wherever it starts an identifier (not inside another word).
fn strip_backup_prefix(sql: &str) -> String {
    const PREFIX: &str = "backup_";
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(pos) = rest.find(PREFIX) {
        let before = rest[..pos].chars().next_back();
        let starts_word = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '$'));
        out.push_str(&rest[..pos]);
        if !starts_word {
            out.push_str(PREFIX);
        }
        rest = &rest[pos + PREFIX.len()..];
    }
    out.push_str(rest);
    out
}

/// Asserts two signatures are equal, printing the differences.
pub fn assert_same_signature(left: &CatalogSignature, right: &CatalogSignature, what: &str) {
    let diff = left.differences(right);
    assert!(diff.is_empty(), "{what}:\n  {}", diff.join("\n  "));
    assert_eq!(left, right, "{what}");
}

/// Asserts the live tables still hold `sums` and have the definitions of `sig`.
pub async fn assert_live_unchanged(
    client: &Client,
    sums: &BTreeMap<String, TableChecksum>,
    sig: &CatalogSignature,
    what: &str,
) {
    assert_eq!(live_sums(client).await, *sums, "{what}: rows");
    assert_same_signature(&signature(client).await, sig, what);
}

/// Asserts the `backup_*` tables hold `sums` and have the definitions of `sig`.
pub async fn assert_backup_of(
    client: &Client,
    sums: &BTreeMap<String, TableChecksum>,
    sig: &CatalogSignature,
    what: &str,
) {
    assert_eq!(backup_sums(client).await, *sums, "{what}: rows");
    assert_same_signature(&backup_signature(client).await, sig, what);
}

/// A planned statement list as golden text: the migration id becomes `<id>` and object ids
/// (`16434::oid`, `oid = 16434`) become `<oid>`, the parts that differ from one run to the
/// next. `None`
/// unless the server is PostgreSQL 15, whose deparsing the goldens hold.
pub async fn golden_text(client: &Client, sql: &str, migration_id: i64) -> Option<String> {
    let major: i32 = client
        .query_one(
            "SELECT (current_setting('server_version_num')::int / 10000)",
            &[],
        )
        .await
        .expect("read server_version_num")
        .get(0);
    if major != 15 {
        return None;
    }
    let text = sql.replace(&migration_id.to_string(), "<id>");
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        rest = &rest[c.len_utf8()..];
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        if !digits.is_empty() {
            let oid = c == ':' && rest.starts_with(":oid");
            let after_word = out
                .chars()
                .last()
                .is_some_and(|p| p.is_alphanumeric() || p == '_');
            let compared = out.ends_with("oid = ");
            if (oid && !after_word) || compared {
                out.push_str("<oid>");
            } else {
                out.push_str(&digits);
            }
            digits.clear();
        }
        out.push(c);
    }
    out.push_str(&digits);
    Some(out)
}

/// Excludes the tool's `backup_`/`shadow_` relations (by the name of the relation, or of the
/// table an index, constraint or trigger belongs to).
const NOT_TOOL: &str = "left(c.relname, 7) NOT IN ('backup_', 'shadow_')";

/// The schema of `schemas` as PostgreSQL deparses it, one line per object, sorted: relations,
/// columns (type, NOT NULL, default), constraints, indexes, view definitions, triggers, enums
/// and domains, sequences' parameters. Read with `search_path = pg_catalog`, so every name is
/// schema-qualified: two databases print the same lines when their schemas are the same. The
/// tool's `backup_`/`shadow_` objects are left out.
pub async fn schema_fingerprint(client: &Client, schemas: &[&str]) -> Vec<String> {
    schema_fingerprint_lines(client, schemas).await
}

/// [`schema_fingerprint`] of two databases, to compare. Across PostgreSQL major versions, what
/// only deparsing differs in is left out: view definitions and the types of view columns
/// (`EXTRACT` is `numeric` from PostgreSQL 14, `double precision` before).
pub async fn comparable_fingerprints(
    left: &Client,
    right: &Client,
    schemas: &[&str],
) -> (Vec<String>, Vec<String>) {
    let (l, r) = (
        schema_fingerprint_lines(left, schemas).await,
        schema_fingerprint_lines(right, schemas).await,
    );
    let major = |v: i64| v / 10000;
    let versions = (
        int(left, "SELECT current_setting('server_version_num')::int8").await,
        int(right, "SELECT current_setting('server_version_num')::int8").await,
    );
    if major(versions.0) == major(versions.1) {
        return (l, r);
    }
    let keep = |line: &String| {
        !line.starts_with("view ") && !line.starts_with("col v ") && !line.starts_with("col m ")
    };
    (
        l.into_iter().filter(keep).collect(),
        r.into_iter().filter(keep).collect(),
    )
}

async fn schema_fingerprint_lines(client: &Client, schemas: &[&str]) -> Vec<String> {
    let sql = format!(
        "SELECT line FROM (
           SELECT format('rel %s %I.%I', c.relkind, n.nspname, c.relname) AS line
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND {NOT_TOOL}
           UNION ALL
           SELECT format('col %s %I.%I.%I %s %s %s', c.relkind, n.nspname, c.relname, a.attname,
                         format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped AND {NOT_TOOL}
           UNION ALL
           SELECT format('con %I.%I %I %s', n.nspname, c.relname, k.conname, pg_get_constraintdef(k.oid))
             FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND k.contype <> 'n' AND {NOT_TOOL}
           UNION ALL
           SELECT format('idx %s', pg_get_indexdef(i.indexrelid))
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND {NOT_TOOL}
           UNION ALL
           SELECT format('view %I.%I %s', n.nspname, c.relname, pg_get_viewdef(c.oid))
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND c.relkind IN ('v', 'm') AND {NOT_TOOL}
           UNION ALL
           SELECT format('trg %s', pg_get_triggerdef(t.oid))
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND NOT t.tgisinternal AND {NOT_TOOL}
           UNION ALL
           SELECT format('type %I.%I %s %s %s', n.nspname, t.typname, t.typtype,
                         format_type(t.typbasetype, t.typtypmod),
                         ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder))
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
            WHERE n.nspname = ANY($1) AND t.typtype IN ('e', 'd') AND left(t.typname, 7) NOT IN ('backup_', 'shadow_')
           UNION ALL
           SELECT format('seq %I.%I %s %s %s %s', n.nspname, c.relname, s.seqtypid::regtype, s.seqincrement, s.seqmin, s.seqmax)
             FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = ANY($1) AND {NOT_TOOL}
         ) x ORDER BY line COLLATE \"C\""
    );
    client
        .batch_execute("SET search_path = pg_catalog")
        .await
        .expect("set search_path");
    let schemas: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
    let lines = client
        .query(&sql, &[&schemas])
        .await
        .unwrap_or_else(|e| panic!("schema fingerprint: {}", pg_error(&e)))
        .iter()
        .map(|r| without_self_aliases(&r.get::<_, String>("line")))
        .collect();
    client
        .batch_execute("RESET search_path")
        .await
        .expect("reset search_path");
    lines
}

/// A definition without the aliases that only repeat their relation's name (`FROM s.t t` reads
/// as `FROM s.t`): pgzm recreates views with such aliases, which change nothing.
fn without_self_aliases(line: &str) -> String {
    const IDENT: &str = r#"("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)"#;
    static PATTERN: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let pattern = PATTERN.get_or_init(|| {
        regex::Regex::new(&format!(r#"\.{IDENT} {IDENT}([^a-z0-9_$"(.]|$)"#)).expect("regex")
    });
    pattern
        .replace_all(line, |c: &regex::Captures| {
            if c[1] == c[2] {
                format!(".{}{}", &c[1], &c[3])
            } else {
                c[0].to_string()
            }
        })
        .into_owned()
}

/// Checksums of every table of `schemas` (`schema.name` keys; the tool's `backup_`/`shadow_`
/// tables left out).
pub async fn schema_sums(client: &Client, schemas: &[&str]) -> BTreeMap<String, TableChecksum> {
    let schemas: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
    let tables: Vec<(String, String)> = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = ANY($1) AND c.relkind = 'r' AND {NOT_TOOL} ORDER BY 1, 2"
            ),
            &[&schemas],
        )
        .await
        .unwrap_or_else(|e| panic!("list tables: {}", pg_error(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut out = BTreeMap::new();
    for (schema, name) in tables {
        let qualified =
            pgzm_coordinator::naming::QualName::new(schema.clone(), name.clone()).quoted();
        out.insert(
            format!("{schema}.{name}"),
            checksum(client, &format!("ONLY {qualified}")).await,
        );
    }
    out
}
