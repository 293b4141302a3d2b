//! Across PostgreSQL major versions: what a destination older than the source cannot represent,
//! found before anything changes.
//!
//! Specific features are named with what to do (below); everything else a newer source may use
//! (a function, a syntax the older server lacks) is found by rehearsing the run's statements on
//! the destination in a transaction that is rolled back (`crate::rehearsal`), which `prepare`
//! does whenever the destination's major version is older than the source's. The privileges
//! the swap grants come from the destination's own tables, so a newer privilege (PostgreSQL
//! 17's MAINTAIN) never reaches an older destination.

use crate::catalog::SourceSchema;

/// `180004` → `18`, `90624` → `9.6`.
pub fn major(server_version: i32) -> String {
    if server_version >= 100000 {
        (server_version / 10000).to_string()
    } else {
        format!("{}.{}", server_version / 10000, server_version / 100 % 100)
    }
}

/// Whether the destination's major version is older than the source's.
pub fn older_destination(source_version: i32, dest_version: i32) -> bool {
    dest_version / 10000 < source_version / 10000
}

/// What the destination (`dest_version`) cannot represent of the source's tables, each with
/// what to do; empty when nothing is known to be missing.
pub fn problems(schema: &SourceSchema, dest_version: i32) -> Vec<String> {
    let dest = major(dest_version);
    let mut out = Vec::new();
    for t in &schema.tables {
        let table = t.qualname().plain();
        for c in &t.columns {
            if c.more().generated_virtual && dest_version < 180000 {
                out.push(format!(
                    "column {} of table {table} is a virtual generated column (PostgreSQL 18); the destination runs PostgreSQL {dest}, which has none: make it a STORED generated column in the source, or migrate into PostgreSQL 18 or later",
                    crate::rewrite::display_ident(&c.name)
                ));
            }
            for (what, expr) in [
                ("default", c.default.as_deref()),
                ("generation expression", c.more().generated.as_deref()),
            ] {
                let Some(expr) = expr else { continue };
                for f in ["uuidv7(", "uuidv4("] {
                    if dest_version < 180000 && calls(expr, f) {
                        out.push(format!(
                            "the {what} of column {} of table {table} calls {f}) (PostgreSQL 18); the destination runs PostgreSQL {dest}, which has no such function: give the column a default the destination has (gen_random_uuid(), or a uuidv7 function of an extension installed in both), or migrate into PostgreSQL 18 or later",
                            crate::rewrite::display_ident(&c.name)
                        ));
                    }
                }
            }
        }
        if dest_version < 150000 {
            let nulls = |definition: &str| definition.contains("NULLS NOT DISTINCT");
            for c in t.constraints.iter().filter(|c| nulls(&c.definition)) {
                out.push(format!(
                    "constraint {} of table {table} is UNIQUE NULLS NOT DISTINCT (PostgreSQL 15); the destination runs PostgreSQL {dest}, which has no such option: make it an ordinary UNIQUE constraint (or a unique index on COALESCE of the columns) in the source, or migrate into PostgreSQL 15 or later",
                    crate::rewrite::display_ident(&c.name)
                ));
            }
            for i in t.indexes.iter().filter(|i| nulls(&i.definition)) {
                out.push(format!(
                    "index {} of table {table} is UNIQUE NULLS NOT DISTINCT (PostgreSQL 15); the destination runs PostgreSQL {dest}, which has no such option: make it an ordinary unique index in the source, or migrate into PostgreSQL 15 or later",
                    crate::rewrite::display_ident(&i.name)
                ));
            }
        }
    }
    out
}

/// Whether `expr` calls the function `name(` (not one whose name merely ends with it).
fn calls(expr: &str, name: &str) -> bool {
    expr.match_indices(name).any(|(at, _)| {
        expr[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_calls() {
        assert_eq!(major(180004), "18");
        assert_eq!(major(130023), "13");
        assert_eq!(major(90624), "9.6");
        assert!(older_destination(180004, 150018));
        assert!(!older_destination(150018, 150002));
        assert!(calls("uuidv7()", "uuidv7("));
        assert!(calls("pg_catalog.uuidv7()", "uuidv7("));
        assert!(!calls("my_uuidv7()", "uuidv7("));
    }
}
