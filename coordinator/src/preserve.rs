//! Preserved tables: the shadow table takes the source's definition and the destination's rows,
//! and stays current until the swap.
//!
//! For each preserved table `T` one transaction creates the sync triggers on the live `T`
//! (`CREATE TRIGGER` takes a SHARE ROW EXCLUSIVE lock, so no write can commit in between) and
//! copies `T`'s rows into `shadow_T` (columns matched by name). From then on, statement-level
//! AFTER triggers with transition tables mirror every INSERT, UPDATE (as delete + insert by the
//! primary key, so key changes are mirrored too), DELETE and TRUNCATE into the shadow table, in
//! the writer's transaction — hence in commit order, and rolled back with it.
//!
//! A mirror that fails must never fail the application's write: the trigger function catches
//! the error, records it in `pgzm.sync_errors` and raises a WARNING; the swap then refuses (the
//! shadow is stale) and the operator re-runs prepare. Foreign keys that involve a preserved table
//! are checked in the swap transaction before its locks, added `NOT VALID` under them and
//! validated after the commit (see `prepare::deferred_statements`), so a write to a preserved
//! table can never be rejected by a shadow table's constraint.

use std::collections::{BTreeMap, BTreeSet};

use pgzm_pg::sql::{dollar_quote, quote_ident, quote_literal, quote_qualified};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::catalog::{SourceSchema, Table};
use crate::error::CoordinatorError;
use crate::naming::QualName;
use crate::rewrite::Renames;

/// Names of the sync triggers created on a preserved live table.
pub const TRIGGERS: [(&str, &str); 4] = [
    ("pgzm_sync_insert", "AFTER INSERT ON {T} REFERENCING NEW TABLE AS pgzm_new FOR EACH STATEMENT"),
    ("pgzm_sync_update", "AFTER UPDATE ON {T} REFERENCING OLD TABLE AS pgzm_old NEW TABLE AS pgzm_new FOR EACH STATEMENT"),
    ("pgzm_sync_delete", "AFTER DELETE ON {T} REFERENCING OLD TABLE AS pgzm_old FOR EACH STATEMENT"),
    ("pgzm_sync_truncate", "AFTER TRUNCATE ON {T} FOR EACH STATEMENT"),
];

/// Shape of a preserved table in the destination.
#[derive(Debug, Clone, Default)]
pub struct LiveShape {
    /// Column names.
    pub columns: Vec<String>,
    /// Primary key columns, in key order (empty: no primary key).
    pub key: Vec<String>,
    /// Sequences owned by columns or used by their defaults: (column, sequence).
    pub sequences: Vec<(String, String)>,
}

impl LiveShape {
    /// A row of [`LIVE_SHAPE`] (its table name apart).
    fn from_row(row: &tokio_postgres::Row) -> Self {
        LiveShape {
            columns: row.get("columns"),
            key: row.get("key_columns"),
            sequences: row
                .get::<_, Vec<String>>("sequences")
                .into_iter()
                .filter_map(|s| {
                    s.split_once('|')
                        .map(|(c, q)| (c.to_string(), q.to_string()))
                })
                .collect(),
        }
    }
}

const LIVE_SHAPE: &str = "
SELECT n.nspname::text AS schema_name, c.relname::text AS table_name,
       ARRAY(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum) AS columns,
       ARRAY(SELECT a.attname::text
             FROM pg_constraint k, unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
             WHERE k.conrelid = c.oid AND k.contype = 'p' ORDER BY u.ord) AS key_columns,
       ARRAY(SELECT a.attname::text || '|' || s.relname::text
             FROM pg_depend d
             JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = d.refobjsubid
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
               AND d.refobjid = c.oid AND d.deptype IN ('a', 'i')
             UNION
             SELECT a.attname::text || '|' || s.relname::text
             FROM pg_attrdef ad
             JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
                             AND d.refclassid = 'pg_class'::regclass
             JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ad.adnum
             WHERE ad.adrelid = c.oid
             ORDER BY 1) AS sequences
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN unnest($1::text[], $2::text[]) w(s, t) ON w.s = n.nspname AND w.t = c.relname
WHERE c.relkind = 'r'";

/// Reads the live shape of the named tables.
pub async fn read_live(
    client: &Client,
    tables: &[QualName],
) -> Result<BTreeMap<QualName, LiveShape>, CoordinatorError> {
    let schemas: Vec<&str> = tables.iter().map(|t| t.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
    let rows = client
        .query(LIVE_SHAPE, &[&schemas, &names])
        .await
        .map_err(|e| {
            CoordinatorError::destination("inspect the destination: preserved tables", e)
        })?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let name = QualName::from_columns(&r, "schema_name", "table_name");
            (name, LiveShape::from_row(&r))
        })
        .collect())
}

/// One preserved table, as planned (stored with the plan, so `swap` needs no source access).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PreservedTable {
    /// Schema of the table, its shadow and its sequences (recorded plans: `public`).
    #[serde(default = "crate::naming::public_schema")]
    pub schema: String,
    /// Live name.
    pub table: String,
    /// Shadow name.
    pub shadow: String,
    /// Shadow columns filled from the live table, each with how its live value converts.
    pub columns: Vec<SyncColumn>,
    /// Primary key columns (of the live table, present in the shadow).
    pub key: Vec<String>,
    /// Sync function, qualified and quoted.
    pub function: String,
    /// Sequences to set at the swap: (new sequence's live name, column, the live sequence's name
    /// after the swap: its backup name, or its own when the swap does not replace it).
    pub sequences: Vec<(String, String, Option<String>)>,
}

impl PreservedTable {
    /// Its live schema-qualified name.
    pub fn qualname(&self) -> QualName {
        QualName::new(self.schema.clone(), self.table.clone())
    }

    fn select_list(&self, alias: &str) -> String {
        self.columns
            .iter()
            .map(|c| c.value(alias))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.column))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_match(&self, shadow_alias: &str, other_alias: &str) -> String {
        self.key
            .iter()
            .map(|k| {
                let expr = self
                    .columns
                    .iter()
                    .find(|c| &c.column == k)
                    .map(|c| c.value(other_alias))
                    .unwrap_or_else(|| format!("{other_alias}.{}", quote_ident(k)));
                format!(
                    "{shadow_alias}.{} IS NOT DISTINCT FROM {expr}",
                    quote_ident(k)
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `INSERT INTO shadow (…) SELECT … FROM <from> <alias>`.
    fn insert_from(&self, from: &str, alias: &str) -> String {
        format!(
            "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE SELECT {} FROM {from} {alias}",
            quote_qualified(&self.schema, &self.shadow),
            self.column_list(),
            self.select_list(alias)
        )
    }

    /// The trigger function, the triggers on the live table and the initial copy, to run in one
    /// transaction (the caller sets a short lock_timeout and retries).
    pub fn setup_sql(&self, migration_id: i64) -> Vec<String> {
        let shadow = quote_qualified(&self.schema, &self.shadow);
        let live = quote_qualified(&self.schema, &self.table);
        let delete_old = format!(
            "DELETE FROM {shadow} s USING pgzm_old o WHERE {}",
            self.key_match("s", "o")
        );
        let insert_new = self.insert_from("pgzm_new", "n");
        let body = format!(
            "
BEGIN
    IF to_regclass({shadow_lit}) IS NULL THEN
        RETURN NULL;
    END IF;
    BEGIN
        IF TG_OP = 'INSERT' THEN
            {insert_new};
        ELSIF TG_OP = 'UPDATE' THEN
            {delete_old};
            {insert_new};
        ELSIF TG_OP = 'DELETE' THEN
            {delete_old};
        ELSIF TG_OP = 'TRUNCATE' THEN
            DELETE FROM {shadow};
        END IF;
    EXCEPTION WHEN OTHERS THEN
        INSERT INTO pgzm.sync_errors (migration_id, table_name, operation, message)
        VALUES ({migration_id}, {table_lit}, TG_OP, SQLERRM);
        RAISE WARNING 'pg_zero_migration: mirroring % on table % into its shadow failed: %; the prepared migration will not swap until prepared again', TG_OP, {table_lit}, SQLERRM;
    END;
    RETURN NULL;
END",
            shadow_lit = quote_literal(&shadow),
            table_lit = quote_literal(&self.qualname().display_name()),
        );
        let mut out = vec![format!(
            "CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS {}",
            self.function,
            dollar_quote(&body)
        )];
        for (name, timing) in TRIGGERS {
            out.push(format!(
                "CREATE TRIGGER {} {} EXECUTE FUNCTION {}()",
                quote_ident(name),
                timing.replace("{T}", &live),
                self.function
            ));
        }
        out.push(format!("DELETE FROM {shadow}"));
        out.push(self.insert_from(&live, "l"));
        out
    }

    /// Statements of the swap transaction that end the sync: drop the triggers and function.
    pub fn teardown_sql(&self, live_name: &str) -> Vec<String> {
        let mut out: Vec<String> = TRIGGERS
            .iter()
            .map(|(name, _)| {
                format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    quote_ident(name),
                    quote_qualified(&self.schema, live_name)
                )
            })
            .collect();
        out.push(format!("DROP FUNCTION IF EXISTS {}()", self.function));
        out
    }

    /// Statements of the swap transaction (after the renames) that set each sequence of the
    /// new table past both its rows and the live sequence at this instant.
    pub fn sequence_sql(&self) -> Vec<String> {
        self.sequences
            .iter()
            .map(|(seq, column, live_backup)| {
                let live_value = live_backup
                    .as_ref()
                    .map(|b| {
                        format!(
                            ", (SELECT last_value FROM {})",
                            quote_qualified(&self.schema, b)
                        )
                    })
                    .unwrap_or_default();
                // The new sequence's own value counts too: a sequence shared by several
                // columns is set once per column, and never moves back.
                let seq = quote_qualified(&self.schema, seq);
                format!(
                    "SELECT setval({}::regclass, greatest((SELECT max({})::int8 FROM {}){live_value}, (SELECT last_value FROM {seq}), 1))",
                    quote_literal(&seq),
                    quote_ident(column),
                    quote_qualified(&self.schema, &self.table)
                )
            })
            .collect()
    }
}

/// Plans the preserved tables, or says why one cannot be preserved.
pub fn plan(
    names: &[QualName],
    migration_id: i64,
    source: &SourceSchema,
    live: &BTreeMap<QualName, LiveShape>,
    renames: &Renames,
    live_backup_of: impl Fn(&str, &str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Vec<PreservedTable> {
    let mut out = Vec::new();
    for (n, qualified) in names.iter().enumerate() {
        let name = qualified.plain();
        let Some(table) = source.table(qualified) else {
            problems.push(format!(
                "preserved table {name} does not exist in the source: check --preserved-tables"
            ));
            continue;
        };
        let Some(shape) = live.get(qualified) else {
            problems.push(format!("preserved table {name} does not exist in the destination: check --preserved-tables"));
            continue;
        };
        if shape.key.is_empty() {
            problems.push(format!(
                "preserved table {name} has no primary key in the destination: its rows cannot be kept in sync; add one"
            ));
            continue;
        }
        let columns = column_mapping(table, shape, source, renames);
        if let Some(missing) = shape
            .key
            .iter()
            .find(|k| !columns.iter().any(|c| &c.column == *k))
        {
            problems.push(format!(
                "preserved table {name}: primary key column \"{missing}\" does not exist in the source's definition"
            ));
            continue;
        }
        // Every sequence a default of the table uses, owned by the column or not: at the swap
        // it is set past the column's rows and past the live sequence that column used.
        let mut sequences = Vec::new();
        for s in &source.sequences {
            let owned = s
                .owned_by
                .iter()
                .filter(|(t, _)| s.schema == qualified.schema && *t == qualified.name);
            let used = s.used_by.iter().filter(|(t, _)| t == qualified);
            let columns: BTreeSet<&String> =
                owned.map(|(_, c)| c).chain(used.map(|(_, c)| c)).collect();
            if !columns.is_empty() && s.schema != qualified.schema {
                problems.push(format!(
                    "preserved table {name}: its default uses sequence {} of another schema, which pgzm cannot set at the swap; move the sequence into the table's schema, or do not preserve the table",
                    QualName::new(s.schema.clone(), s.name.clone()).plain()
                ));
                continue;
            }
            for c in columns {
                let live_seq = shape
                    .sequences
                    .iter()
                    .find(|(col, _)| col == c)
                    .map(|(_, seq)| seq.as_str());
                let after_swap = live_seq
                    .map(|l| live_backup_of(&qualified.schema, l).unwrap_or_else(|| l.to_string()));
                sequences.push((s.name.clone(), c.clone(), after_swap));
            }
        }
        out.push(PreservedTable {
            schema: qualified.schema.to_string(),
            table: qualified.name.to_string(),
            shadow: renames
                .get_in(&qualified.schema, &qualified.name)
                .unwrap_or(&qualified.name)
                .to_string(),
            columns,
            key: shape.key.clone(),
            function: quote_qualified("pgzm", &format!("sync_{migration_id}_{n}")),
            sequences,
        });
    }
    out
}

/// Columns of the source definition that the live table also has, with the expression that
/// converts a live value to the shadow column's type (user enums and domains go through text,
/// since the shadow has its own copy of the type).
fn column_mapping(
    table: &Table,
    shape: &LiveShape,
    source: &SourceSchema,
    renames: &Renames,
) -> Vec<SyncColumn> {
    table
        .columns
        .iter()
        .filter(|c| c.more().generated.is_none() && shape.columns.iter().any(|s| *s == c.name))
        .map(|c| {
            let user_type = source
                .types
                .iter()
                .any(|t| t.oid == c.type_oid || (c.elem_type_oid != 0 && t.oid == c.elem_type_oid));
            SyncColumn {
                column: c.name.to_string(),
                via_text_as: user_type.then(|| renames.apply(&c.type_sql)),
            }
        })
        .collect()
}

/// A shadow column a preserved table's sync fills from the live table's column of the same
/// name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(from = "SyncColumnRecord")]
pub struct SyncColumn {
    /// The column.
    pub column: String,
    /// The shadow column's type (qualified SQL) when the live value converts through text: a
    /// user enum or domain, of which the shadow has its own copy.
    pub via_text_as: Option<String>,
}

impl SyncColumn {
    /// The value for the shadow column, read from row `alias` of the live table.
    fn value(&self, alias: &str) -> String {
        let col = format!("{alias}.{}", quote_ident(&self.column));
        match &self.via_text_as {
            Some(ty) => format!("{col}::text::{ty}"),
            None => col,
        }
    }
}

/// A sync column as recorded: this version's form, or the (column, expression template) pair of
/// plans prepared by earlier versions (`{row}.col` or `{row}.col::text::type`).
#[derive(Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum SyncColumnRecord {
    Current {
        column: String,
        via_text_as: Option<String>,
    },
    Legacy(String, String),
}

impl From<SyncColumnRecord> for SyncColumn {
    fn from(r: SyncColumnRecord) -> Self {
        match r {
            SyncColumnRecord::Current {
                column,
                via_text_as,
            } => SyncColumn {
                column,
                via_text_as,
            },
            SyncColumnRecord::Legacy(column, template) => {
                let plain = format!("{{row}}.{}", quote_ident(&column));
                let via_text_as = template
                    .strip_prefix(&plain)
                    .and_then(|rest| rest.strip_prefix("::text::"))
                    .map(str::to_string);
                SyncColumn {
                    column,
                    via_text_as,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_columns_of_earlier_plans_read_back() {
        let legacy: Vec<SyncColumn> = serde_json::from_str(
            r#"[["id", "{row}.\"id\""], ["mood", "{row}.\"mood\"::text::public.\"shadow_mood\""]]"#,
        )
        .expect("legacy form");
        assert_eq!(legacy[0].via_text_as, None);
        assert_eq!(
            legacy[1].via_text_as.as_deref(),
            Some("public.\"shadow_mood\"")
        );
        assert_eq!(
            legacy[1].value("n"),
            "n.\"mood\"::text::public.\"shadow_mood\""
        );
        let json = serde_json::to_string(&legacy).expect("serialize");
        assert!(!json.contains("{row}"), "{json}");
        let again: Vec<SyncColumn> = serde_json::from_str(&json).expect("current form");
        assert_eq!(again, legacy);
    }
}
