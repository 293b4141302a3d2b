//! A normalised description of the tables in `public`, for comparing two databases (or the
//! live tables with their `backup_` copies).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;

use serde::Serialize;
use tokio_postgres::Client;

use super::NOT_EXTENSION_REL;
use crate::HarnessError;

/// Placeholder that replaces the (schema-qualified) table name inside index and trigger
/// definitions.
pub const TABLE_PLACEHOLDER: &str = "<TABLE>";

/// Table-name prefixes that [`catalog_signature`] ignores when no prefix is asked for.
const WORK_PREFIXES: [&str; 2] = ["shadow_", "backup_"];

/// Every table in `public`, normalised so two databases with the same DDL compare equal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CatalogSignature {
    /// Tables by (prefix-stripped) name.
    pub tables: BTreeMap<String, TableSignature>,
}

/// One table's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSignature {
    /// `relpersistence`: `p` permanent, `u` unlogged.
    pub persistence: String,
    /// Partitioning and inheritance: `PARTITION BY …`, `PARTITION OF parent FOR VALUES …`,
    /// `INHERITS (a, b)` (parent names prefix-stripped), empty for a plain table.
    pub partitioning: String,
    /// The table comment.
    pub comment: Option<String>,
    /// Columns in `attnum` order (dropped columns skipped).
    pub columns: Vec<ColumnSignature>,
    /// Constraints sorted by name.
    pub constraints: Vec<ConstraintSignature>,
    /// Indexes sorted by name.
    pub indexes: Vec<IndexSignature>,
    /// User triggers sorted by name.
    pub triggers: Vec<TriggerSignature>,
}

/// One column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnSignature {
    /// Column name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, with `public` on the search path.
    pub type_name: String,
    /// `attnotnull`.
    pub not_null: bool,
    /// `pg_get_expr(adbin, adrelid)`: the default, or the generation expression.
    pub default: Option<String>,
    /// `attidentity`: `a` (always) or `d` (by default).
    pub identity: Option<String>,
    /// `attgenerated`: `s` (stored).
    pub generated: Option<String>,
    /// The collation, when it is not the type's default.
    pub collation: Option<String>,
    /// The column comment.
    pub comment: Option<String>,
}

/// One constraint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConstraintSignature {
    /// Constraint name (prefix-stripped).
    pub name: String,
    /// `contype`: `p`, `u`, `f`, `c`, `x`, `t` (PostgreSQL 18's NOT NULL constraints, `n`, are
    /// left out: the columns' `not_null` says the same on every version; their names are checked
    /// by the `versions` tests).
    pub kind: String,
    /// `pg_get_constraintdef(oid)`; referenced table names are prefix-stripped.
    pub definition: String,
}

/// One index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexSignature {
    /// Index name (prefix-stripped).
    pub name: String,
    /// `pg_get_indexdef` without the index name and with the table as [`TABLE_PLACEHOLDER`],
    /// e.g. `CREATE UNIQUE INDEX ON <TABLE> USING btree (id)`.
    pub definition: String,
}

/// One user trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TriggerSignature {
    /// Trigger name (prefix-stripped).
    pub name: String,
    /// `pg_get_triggerdef` without the trigger name and with the table as
    /// [`TABLE_PLACEHOLDER`].
    pub definition: String,
}

impl CatalogSignature {
    /// Human-readable differences between `self` (left) and `other` (right), one per line;
    /// empty when equal. Use it in assertion messages instead of dumping both signatures.
    pub fn differences(&self, other: &CatalogSignature) -> Vec<String> {
        let mut out = Vec::new();
        let names: BTreeSet<&String> = self.tables.keys().chain(other.tables.keys()).collect();
        for name in names {
            match (self.tables.get(name), other.tables.get(name)) {
                (Some(_), None) => out.push(format!("table {name}: only on the left")),
                (None, Some(_)) => out.push(format!("table {name}: only on the right")),
                (Some(l), Some(r)) => l.differences(name, r, &mut out),
                (None, None) => {}
            }
        }
        out
    }
}

impl TableSignature {
    fn differences(&self, table: &str, other: &TableSignature, out: &mut Vec<String>) {
        if self.persistence != other.persistence {
            out.push(format!(
                "table {table}: persistence {} vs {}",
                self.persistence, other.persistence
            ));
        }
        if self.partitioning != other.partitioning {
            out.push(format!(
                "table {table}: partitioning {:?} vs {:?}",
                self.partitioning, other.partitioning
            ));
        }
        if self.comment != other.comment {
            out.push(format!(
                "table {table}: comment {:?} vs {:?}",
                self.comment, other.comment
            ));
        }
        let left: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        let right: Vec<&str> = other.columns.iter().map(|c| c.name.as_str()).collect();
        if left != right {
            out.push(format!("table {table}: columns {left:?} vs {right:?}"));
        }
        diff_named(
            table,
            "column",
            &self.columns,
            &other.columns,
            |c| &c.name,
            out,
        );
        diff_named(
            table,
            "constraint",
            &self.constraints,
            &other.constraints,
            |c| &c.name,
            out,
        );
        diff_named(
            table,
            "index",
            &self.indexes,
            &other.indexes,
            |i| &i.name,
            out,
        );
        diff_named(
            table,
            "trigger",
            &self.triggers,
            &other.triggers,
            |t| &t.name,
            out,
        );
    }
}

/// Appends a line per item (matched by name) that is missing on one side or differs.
fn diff_named<T: Debug + PartialEq>(
    table: &str,
    what: &str,
    left: &[T],
    right: &[T],
    name: fn(&T) -> &String,
    out: &mut Vec<String>,
) {
    let l: BTreeMap<&String, &T> = left.iter().map(|x| (name(x), x)).collect();
    let r: BTreeMap<&String, &T> = right.iter().map(|x| (name(x), x)).collect();
    let names: BTreeSet<&&String> = l.keys().chain(r.keys()).collect();
    for n in names {
        match (l.get(*n), r.get(*n)) {
            (Some(a), Some(b)) if a != b => {
                out.push(format!("table {table}: {what} {n}: {a:?} vs {b:?}"))
            }
            (Some(_), None) => out.push(format!("table {table}: {what} {n} only on the left")),
            (None, Some(_)) => out.push(format!("table {table}: {what} {n} only on the right")),
            _ => {}
        }
    }
}

/// A table found in the catalog, before normalisation.
struct RawTable {
    oid: u32,
    quoted: String,
    key: String,
    signature: TableSignature,
}

/// Reads the normalised signature of the tables in `public`.
///
/// With `strip_prefix = Some(p)`, only tables named `p...` are included and `p` is removed
/// from table, index, constraint and trigger names and from `REFERENCES` targets, so e.g.
/// `backup_` tables compare equal to the originals. With `None`, tables named `shadow_...` and
/// `backup_...` are left out.
///
/// The queries run with `search_path` set to `public`, as a normal client would, so type and
/// sequence names print unqualified; the previous `search_path` is restored afterwards.
pub async fn catalog_signature(
    client: &Client,
    strip_prefix: Option<&str>,
) -> Result<CatalogSignature, HarnessError> {
    let old: String = client
        .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
        .await
        .map_err(|e| HarnessError::sql("read search_path", &e))?
        .get(0);
    client
        .execute(
            "SELECT pg_catalog.set_config('search_path', 'public', false)",
            &[],
        )
        .await
        .map_err(|e| HarnessError::sql("set search_path to public", &e))?;
    let result = read_signature(client, strip_prefix).await;
    let restored = client
        .execute(
            "SELECT pg_catalog.set_config('search_path', $1, false)",
            &[&old],
        )
        .await;
    let signature = result?;
    restored.map_err(|e| HarnessError::sql("restore search_path", &e))?;
    Ok(signature)
}

async fn read_signature(
    client: &Client,
    strip_prefix: Option<&str>,
) -> Result<CatalogSignature, HarnessError> {
    let strip = |name: &str| -> String {
        match strip_prefix {
            Some(p) => name.strip_prefix(p).unwrap_or(name).to_string(),
            None => name.to_string(),
        }
    };
    let mut tables = read_tables(client, strip_prefix).await?;
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let index: HashMap<u32, usize> = tables.iter().enumerate().map(|(i, t)| (t.oid, i)).collect();
    let by_oid = |oid: u32| index.get(&oid).copied();

    // A partition's identity is its partitioned table's (PostgreSQL 17 shows it on the
    // partitions too): compared on the partitioned table only.
    let rows = client
        .query(
            "SELECT a.attrelid, a.attname::text, format_type(a.atttypid, a.atttypmod), \
             a.attnotnull, pg_get_expr(d.adbin, d.adrelid), \
             CASE WHEN NOT (SELECT c.relispartition FROM pg_catalog.pg_class c WHERE c.oid = a.attrelid) \
                  THEN NULLIF(a.attidentity::text, '') END, NULLIF(a.attgenerated::text, ''), \
             CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation \
                  THEN co.collname::text END, \
             col_description(a.attrelid, a.attnum) \
             FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation \
             WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attrelid, a.attnum",
            &[&oids],
        )
        .await
        .map_err(|e| HarnessError::sql("read columns of tables in public", &e))?;
    for row in rows {
        if let Some(i) = by_oid(row.get(0)) {
            tables[i].signature.columns.push(ColumnSignature {
                name: row.get(1),
                type_name: row.get(2),
                not_null: row.get(3),
                default: row.get(4),
                identity: row.get(5),
                generated: row.get(6),
                collation: row.get(7),
                comment: row.get(8),
            });
        }
    }

    let rows = client
        .query(
            "SELECT conrelid, conname::text, contype::text, pg_get_constraintdef(oid) \
             FROM pg_catalog.pg_constraint WHERE conrelid = ANY($1) AND contype <> 'n'",
            &[&oids],
        )
        .await
        .map_err(|e| HarnessError::sql("read constraints of tables in public", &e))?;
    for row in rows {
        if let Some(i) = by_oid(row.get(0)) {
            let definition: String = row.get(3);
            let definition = match strip_prefix {
                Some(p) => strip_references(&definition, p),
                None => definition,
            };
            tables[i].signature.constraints.push(ConstraintSignature {
                name: strip(row.get(1)),
                kind: row.get(2),
                definition,
            });
        }
    }

    let rows = client
        .query(
            "SELECT i.indrelid, c.relname::text, quote_ident(c.relname), \
             pg_get_indexdef(i.indexrelid) \
             FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| HarnessError::sql("read indexes of tables in public", &e))?;
    for row in rows {
        if let Some(i) = by_oid(row.get(0)) {
            let quoted_name: String = row.get(2);
            let def: String = row.get(3);
            let definition = normalise_def(&def, "INDEX", &quoted_name, &tables[i].quoted);
            tables[i].signature.indexes.push(IndexSignature {
                name: strip(row.get(1)),
                definition,
            });
        }
    }

    let rows = client
        .query(
            "SELECT tgrelid, tgname::text, quote_ident(tgname), pg_get_triggerdef(oid) \
             FROM pg_catalog.pg_trigger WHERE tgrelid = ANY($1) AND NOT tgisinternal",
            &[&oids],
        )
        .await
        .map_err(|e| HarnessError::sql("read triggers of tables in public", &e))?;
    for row in rows {
        if let Some(i) = by_oid(row.get(0)) {
            let quoted_name: String = row.get(2);
            let def: String = row.get(3);
            let definition = normalise_def(&def, "TRIGGER", &quoted_name, &tables[i].quoted);
            tables[i].signature.triggers.push(TriggerSignature {
                name: strip(row.get(1)),
                definition,
            });
        }
    }

    let mut signature = CatalogSignature::default();
    for mut table in tables {
        let sig = &mut table.signature;
        sig.constraints.sort_by(|a, b| a.name.cmp(&b.name));
        sig.indexes.sort_by(|a, b| a.name.cmp(&b.name));
        sig.triggers.sort_by(|a, b| a.name.cmp(&b.name));
        signature.tables.insert(table.key, table.signature);
    }
    Ok(signature)
}

/// The tables of `public` selected by `strip_prefix` (see [`catalog_signature`]).
async fn read_tables(
    client: &Client,
    strip_prefix: Option<&str>,
) -> Result<Vec<RawTable>, HarnessError> {
    let sql = format!(
        "SELECT c.oid, c.relname::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname), \
         c.relpersistence::text, obj_description(c.oid, 'pg_class'), \
         CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END, \
         (SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
           WHERE i.inhrelid = c.oid AND c.relispartition), \
         CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END, \
         ARRAY(SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                WHERE i.inhrelid = c.oid AND NOT c.relispartition ORDER BY i.inhseqno) \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND {NOT_EXTENSION_REL}"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| HarnessError::sql("list tables in public", &e))?;
    let mut tables = Vec::new();
    for row in rows {
        let name: String = row.get(1);
        let key = match strip_prefix {
            Some(p) => match name.strip_prefix(p) {
                Some(rest) => rest.to_string(),
                None => continue,
            },
            None if WORK_PREFIXES.iter().any(|p| name.starts_with(p)) => continue,
            None => name,
        };
        tables.push(RawTable {
            oid: row.get(0),
            quoted: row.get(2),
            key,
            signature: TableSignature {
                partitioning: {
                    let strip = |n: String| match strip_prefix {
                        Some(p) => n.strip_prefix(p).map(str::to_string).unwrap_or(n),
                        None => n,
                    };
                    let mut parts = Vec::new();
                    if let Some(key) = row.get::<_, Option<String>>(5) {
                        parts.push(format!("PARTITION BY {key}"));
                    }
                    if let (Some(parent), Some(bound)) = (
                        row.get::<_, Option<String>>(6),
                        row.get::<_, Option<String>>(7),
                    ) {
                        parts.push(format!("PARTITION OF {} {bound}", strip(parent)));
                    }
                    let parents: Vec<String> = row
                        .get::<_, Vec<String>>(8)
                        .into_iter()
                        .map(strip)
                        .collect();
                    if !parents.is_empty() {
                        parts.push(format!("INHERITS ({})", parents.join(", ")));
                    }
                    parts.join(" ")
                },
                persistence: row.get(3),
                comment: row.get(4),
                columns: Vec::new(),
                constraints: Vec::new(),
                indexes: Vec::new(),
                triggers: Vec::new(),
            },
        });
    }
    Ok(tables)
}

/// Removes the object name after `INDEX `/`TRIGGER ` and replaces ` ON [ONLY] schema.table `
/// with ` ON [ONLY] <TABLE> ` in a `pg_get_indexdef` / `pg_get_triggerdef` text.
fn normalise_def(def: &str, keyword: &str, quoted_name: &str, quoted_table: &str) -> String {
    let def = def.replacen(
        &format!("{keyword} {quoted_name} "),
        &format!("{keyword} "),
        1,
    );
    let on_only = format!(" ON ONLY {quoted_table} ");
    if def.contains(&on_only) {
        return def.replacen(&on_only, &format!(" ON ONLY {TABLE_PLACEHOLDER} "), 1);
    }
    def.replacen(
        &format!(" ON {quoted_table} "),
        &format!(" ON {TABLE_PLACEHOLDER} "),
        1,
    )
}

/// Strips `prefix` from the table named after `REFERENCES ` (quoted or not).
fn strip_references(def: &str, prefix: &str) -> String {
    def.replace(&format!("REFERENCES \"{prefix}"), "REFERENCES \"")
        .replace(&format!("REFERENCES {prefix}"), "REFERENCES ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_normalised() {
        let def = r#"CREATE UNIQUE INDEX "Area_pkey" ON public."Area" USING btree (id)"#;
        assert_eq!(
            normalise_def(def, "INDEX", r#""Area_pkey""#, r#"public."Area""#),
            "CREATE UNIQUE INDEX ON <TABLE> USING btree (id)"
        );
        let def = "CREATE INDEX p_idx ON ONLY public.p USING btree (k)";
        assert_eq!(
            normalise_def(def, "INDEX", "p_idx", "public.p"),
            "CREATE INDEX ON ONLY <TABLE> USING btree (k)"
        );
        let def = "CREATE TRIGGER trg BEFORE INSERT ON public.t FOR EACH ROW EXECUTE FUNCTION f()";
        assert_eq!(
            normalise_def(def, "TRIGGER", "trg", "public.t"),
            "CREATE TRIGGER BEFORE INSERT ON <TABLE> FOR EACH ROW EXECUTE FUNCTION f()"
        );
        assert_eq!(
            strip_references(r#"FOREIGN KEY (a) REFERENCES "backup_Area"(id)"#, "backup_"),
            r#"FOREIGN KEY (a) REFERENCES "Area"(id)"#
        );
        assert_eq!(
            strip_references("FOREIGN KEY (a) REFERENCES backup_area(id)", "backup_"),
            "FOREIGN KEY (a) REFERENCES area(id)"
        );
    }
}
