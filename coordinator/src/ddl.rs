//! SQL for the shadow objects, built from the source catalog and the plan.
//!
//! Every statement quotes identifiers through `pgzm_pg::sql` and re-points deparsed
//! expressions at shadow objects through [`Renames`].

use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};

use crate::catalog::{
    Column, Constraint, Identity, Index, Sequence, Table, UserType, UserTypeKind,
};
use crate::destination::{Grant, LiveTable};
use crate::error::CoordinatorError;
use crate::rewrite::Renames;

/// `CREATE TYPE` / `CREATE DOMAIN` for a shadow type.
pub fn create_type(t: &UserType, shadow: &str, renames: &Renames) -> Vec<String> {
    let mut out = Vec::new();
    match &t.kind {
        UserTypeKind::Enum(labels) => {
            let labels: Vec<String> = labels.iter().map(|l| quote_literal(l)).collect();
            out.push(format!(
                "CREATE TYPE {} AS ENUM ({})",
                quote_qualified(&t.schema, shadow),
                labels.join(", ")
            ));
        }
        UserTypeKind::Range {
            subtype_sql,
            opclass,
            collation,
            subdiff,
            multirange,
            ..
        } => {
            let mut options = vec![format!("SUBTYPE = {}", renames.apply(subtype_sql))];
            if let Some(o) = opclass {
                options.push(format!("SUBTYPE_OPCLASS = {o}"));
            }
            if let Some(c) = collation {
                options.push(format!("COLLATION = {c}"));
            }
            if let Some(f) = subdiff {
                options.push(format!("SUBTYPE_DIFF = {f}"));
            }
            if let Some(m) = multirange {
                options.push(format!(
                    "MULTIRANGE_TYPE_NAME = {}",
                    quote_qualified(&t.schema, renames.get_in(&t.schema, m).unwrap_or(m))
                ));
            }
            out.push(format!(
                "CREATE TYPE {} AS RANGE ({})",
                quote_qualified(&t.schema, shadow),
                options.join(", ")
            ));
        }
        UserTypeKind::Composite(attributes) => {
            let attributes: Vec<String> = attributes
                .iter()
                .map(|(name, type_sql, _, collation)| {
                    let mut a = format!("{} {}", quote_ident(name), renames.apply(type_sql));
                    if let Some(c) = collation {
                        a.push_str(&format!(" COLLATE {c}"));
                    }
                    a
                })
                .collect();
            out.push(format!(
                "CREATE TYPE {} AS ({})",
                quote_qualified(&t.schema, shadow),
                attributes.join(", ")
            ));
        }
        UserTypeKind::Domain {
            base_type_sql,
            collation,
            default,
            not_null,
            checks,
            ..
        } => {
            let mut sql = format!(
                "CREATE DOMAIN {} AS {}",
                quote_qualified(&t.schema, shadow),
                renames.apply(base_type_sql)
            );
            if let Some(c) = collation {
                sql.push_str(&format!(" COLLATE {c}"));
            }
            if let Some(d) = default {
                sql.push_str(&format!(" DEFAULT {}", renames.apply(d)));
            }
            if *not_null {
                sql.push_str(" NOT NULL");
            }
            for (name, def) in checks {
                sql.push_str(&format!(
                    " CONSTRAINT {} {}",
                    quote_ident(name),
                    renames.apply(def)
                ));
            }
            out.push(sql);
        }
    }
    if let Some(c) = &t.comment {
        out.push(format!(
            "COMMENT ON TYPE {} IS {}",
            quote_qualified(&t.schema, shadow),
            quote_literal(c)
        ));
    }
    out
}

fn sequence_options(s: &Sequence) -> String {
    format!("AS {} {}", s.type_sql, sequence_options_untyped(s))
}

/// Sequence options without `AS type`: an identity column's sequence takes the column's type,
/// and PostgreSQL rejects an explicit `AS` there ("conflicting or redundant options").
fn sequence_options_untyped(s: &Sequence) -> String {
    format!(
        "INCREMENT BY {} MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}",
        s.increment,
        s.min,
        s.max,
        s.start,
        s.cache,
        if s.cycle { "CYCLE" } else { "NO CYCLE" }
    )
}

/// `CREATE SEQUENCE` for a shadow sequence that is not an identity sequence.
pub fn create_sequence(s: &Sequence, shadow: &str) -> String {
    format!(
        "CREATE SEQUENCE {} {}",
        quote_qualified(&s.schema, shadow),
        sequence_options(s)
    )
}

/// `setval` restoring the source's sequence position on a shadow sequence.
pub fn set_sequence(shadow: &str, s: &Sequence) -> String {
    format!(
        "SELECT setval({}::regclass, {}, {})",
        quote_literal(&quote_qualified(&s.schema, shadow)),
        s.last_value,
        s.is_called
    )
}

/// The name PostgreSQL gives a NOT NULL constraint of `column` of `table` when none is given
/// (PostgreSQL 18: `makeObjectName(table, column, "not_null")`): the longer of the two names is
/// cut until the whole fits in 63 bytes (on a character boundary).
pub fn default_not_null_name(table: &str, column: &str) -> String {
    const LABEL: &str = "not_null";
    let available = 63 - (LABEL.len() + 1) - 1;
    let (mut n1, mut n2) = (table.len(), column.len());
    while n1 + n2 > available {
        if n1 > n2 {
            n1 -= 1;
        } else {
            n2 -= 1;
        }
    }
    let clip = |s: &str, mut n: usize| {
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        s[..n].to_string()
    };
    format!("{}_{}_{LABEL}", clip(table, n1), clip(column, n2))
}

/// A column's definition in the shadow table of `table` (its live name), for a destination of
/// `server_version`.
fn column_sql(
    c: &Column,
    table: &str,
    schema: &str,
    sequences: &[&Sequence],
    renames: &Renames,
    server_version: i32,
) -> String {
    let mut sql = format!("{} {}", quote_ident(&c.name), renames.apply(&c.type_sql));
    if let Some(coll) = &c.more().collation {
        sql.push_str(&format!(" COLLATE {coll}"));
    }
    if let Some(identity) = c.identity {
        sql.push_str(match identity {
            Identity::Always => " GENERATED ALWAYS AS IDENTITY",
            Identity::ByDefault => " GENERATED BY DEFAULT AS IDENTITY",
        });
        if let Some(seq) = c.more().identity_sequence.as_ref().and_then(|n| {
            // An identity column's sequence is in its table's schema.
            sequences
                .iter()
                .find(|s| &s.name == n && s.schema == schema)
        }) {
            let shadow = renames.get_in(&seq.schema, &seq.name).unwrap_or(&seq.name);
            sql.push_str(&format!(
                " (SEQUENCE NAME {} {})",
                quote_qualified(&seq.schema, shadow),
                sequence_options_untyped(seq)
            ));
        }
    }
    if let Some(d) = &c.default {
        sql.push_str(&format!(" DEFAULT {}", renames.apply(d)));
    }
    if let Some(g) = &c.more().generated {
        sql.push_str(&format!(
            " GENERATED ALWAYS AS ({}) {}",
            renames.apply(g),
            if c.more().generated_virtual {
                "VIRTUAL"
            } else {
                "STORED"
            }
        ));
    }
    if c.not_null {
        // PostgreSQL 18 names NOT NULL constraints: the source's name, or the one the live
        // table's own would have (not the shadow table's).
        if server_version >= 180000 {
            let name = c
                .more()
                .not_null_name
                .clone()
                .unwrap_or_else(|| default_not_null_name(table, &c.name));
            sql.push_str(&format!(" CONSTRAINT {} NOT NULL", quote_ident(&name)));
        } else {
            sql.push_str(" NOT NULL");
        }
    }
    sql
}

/// `CREATE TABLE` for a shadow table — columns, defaults, identity, generated columns, NOT NULL
/// and validated CHECK constraints; keys, indexes and foreign keys come after the data — plus
/// comments and the ownership of serial sequences. `sequences` are the ones the table owns
/// ([`crate::catalog::SourceSchema::owned_sequences`]); `server_version` is the destination's.
pub fn create_table(
    t: &Table,
    shadow: &str,
    sequences: &[&Sequence],
    renames: &Renames,
    server_version: i32,
) -> Vec<String> {
    let mut parts: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            // A partition's identity is its partitioned table's (PostgreSQL 17 shows it on the
            // partitions too, and refuses to attach a table with one of its own).
            let own;
            let c = if t.partition_of.is_some() && c.identity.is_some() {
                own = Column {
                    identity: None,
                    more: c.more.clone().map(|mut m| {
                        m.identity_sequence = None;
                        m
                    }),
                    ..c.clone()
                };
                &own
            } else {
                c
            };
            column_sql(c, &t.name, &t.schema, sequences, renames, server_version)
        })
        .collect();
    for c in t
        .constraints
        .iter()
        .filter(|c| c.kind == 'c' && c.validated)
    {
        parts.push(format!(
            "CONSTRAINT {} {}",
            quote_ident(&c.name),
            renames.apply(&c.definition)
        ));
    }
    let mut sql = format!(
        "CREATE {}TABLE {} (\n    {}\n)",
        if t.persistence == 'u' {
            "UNLOGGED "
        } else {
            ""
        },
        quote_qualified(&t.schema, shadow),
        parts.join(",\n    ")
    );
    if let Some(key) = &t.partition_key {
        sql.push_str(&format!(" PARTITION BY {}", renames.apply(key)));
    }
    if !t.reloptions.is_empty() {
        sql.push_str(&format!(" WITH ({})", t.reloptions.join(", ")));
    }
    let mut out = vec![sql];
    for s in sequences.iter().filter(|s| !s.identity) {
        if let Some((table, column)) = &s.owned_by {
            if table == &t.name && s.schema == t.schema {
                let seq_shadow = renames.get_in(&s.schema, &s.name).unwrap_or(&s.name);
                out.push(format!(
                    "ALTER SEQUENCE {} OWNED BY {}.{}",
                    quote_qualified(&s.schema, seq_shadow),
                    quote_qualified(&t.schema, shadow),
                    quote_ident(column)
                ));
            }
        }
    }
    if let Some(c) = &t.comment {
        out.push(format!(
            "COMMENT ON TABLE {} IS {}",
            quote_qualified(&t.schema, shadow),
            quote_literal(c)
        ));
    }
    for c in &t.columns {
        if let Some(comment) = &c.more().comment {
            out.push(format!(
                "COMMENT ON COLUMN {}.{} IS {}",
                quote_qualified(&t.schema, shadow),
                quote_ident(&c.name),
                quote_literal(comment)
            ));
        }
    }
    out
}

/// Owner, privileges and row-level security of the live table, applied to its shadow.
pub fn carry_privileges(
    live: &LiveTable,
    schema: &str,
    shadow: &str,
    shadow_columns: &[&str],
    renames: &Renames,
) -> Vec<String> {
    let target = quote_qualified(schema, shadow);
    let mut out = vec![format!(
        "ALTER TABLE {target} OWNER TO {}",
        quote_ident(&live.owner)
    )];
    out.extend(grants_sql("TABLE", &target, &live.grants));
    for (column, g) in &live.column_grants {
        if shadow_columns.contains(&column.as_str()) {
            out.push(format!(
                "GRANT {} ({}) ON TABLE {target} TO {}{}",
                g.privilege,
                quote_ident(column),
                g.grantee.sql(),
                if g.grantable {
                    " WITH GRANT OPTION"
                } else {
                    ""
                }
            ));
        }
    }
    if live.row_security {
        out.push(format!("ALTER TABLE {target} ENABLE ROW LEVEL SECURITY"));
    }
    if live.force_row_security {
        out.push(format!("ALTER TABLE {target} FORCE ROW LEVEL SECURITY"));
    }
    for p in &live.policies {
        out.push(create_policy_sql(p, &target, renames));
    }
    out
}

/// `CREATE POLICY` re-creating `p` on `target` (an already quoted name), its expressions
/// re-pointed through `renames`.
pub fn create_policy_sql(
    p: &crate::destination::Policy,
    target: &str,
    renames: &Renames,
) -> String {
    let roles: Vec<String> = p.roles.iter().map(|r| r.sql()).collect();
    let mut sql = format!(
        "CREATE POLICY {} ON {target} AS {} FOR {} TO {}",
        quote_ident(&p.name),
        if p.permissive {
            "PERMISSIVE"
        } else {
            "RESTRICTIVE"
        },
        p.command,
        roles.join(", ")
    );
    if let Some(u) = &p.using {
        sql.push_str(&format!(" USING ({})", renames.apply(u)));
    }
    if let Some(c) = &p.with_check {
        sql.push_str(&format!(" WITH CHECK ({})", renames.apply(c)));
    }
    sql
}

/// GRANT statements re-creating `grants` on `target` (an already quoted name).
pub fn grants_sql(object_kind: &str, target: &str, grants: &[Grant]) -> Vec<String> {
    grants
        .iter()
        .map(|g| {
            format!(
                "GRANT {} ON {object_kind} {target} TO {}{}",
                g.privilege,
                g.grantee.sql(),
                if g.grantable {
                    " WITH GRANT OPTION"
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// `CREATE INDEX` for a shadow index: the source's definition on the shadow table, named
/// `shadow_index`.
pub fn create_index(
    ix: &Index,
    schema: &str,
    shadow_index: &str,
    renames: &Renames,
) -> Result<Vec<String>, CoordinatorError> {
    let rest = ["CREATE UNIQUE INDEX ", "CREATE INDEX "]
        .iter()
        .find_map(|head| {
            ix.definition
                .strip_prefix(head)
                .and_then(|r| crate::rewrite::strip_ident(r, &ix.name))
                .and_then(|r| r.strip_prefix(" ON "))
                .map(|r| (*head, r))
        })
        .ok_or_else(|| {
            CoordinatorError::Refused(vec![format!(
                "index \"{}\": unexpected definition form from pg_get_indexdef: {}",
                ix.name, ix.definition
            )])
        })?;
    let mut out = vec![format!(
        "{}{} ON {}",
        rest.0,
        quote_ident(shadow_index),
        renames.apply(rest.1)
    )];
    if let Some(c) = &ix.comment {
        out.push(format!(
            "COMMENT ON INDEX {} IS {}",
            quote_qualified(schema, shadow_index),
            quote_literal(c)
        ));
    }
    Ok(out)
}

/// `ALTER TABLE … ADD CONSTRAINT` for a key, exclusion, NOT VALID check or foreign key on a
/// shadow table. Index-backed constraints take the shadow index name.
pub fn add_constraint(
    schema: &str,
    shadow_table: &str,
    c: &Constraint,
    name: &str,
    renames: &Renames,
) -> Vec<String> {
    let mut sql = format!(
        "ALTER TABLE {} ADD CONSTRAINT {} {}",
        quote_qualified(schema, shadow_table),
        quote_ident(name),
        renames.apply(&c.definition)
    );
    if !c.validated && !c.definition.ends_with("NOT VALID") {
        sql.push_str(" NOT VALID");
    }
    let mut out = vec![sql];
    if let Some(comment) = &c.comment {
        out.push(format!(
            "COMMENT ON CONSTRAINT {} ON {} IS {}",
            quote_ident(name),
            quote_qualified(schema, shadow_table),
            quote_literal(comment)
        ));
    }
    out
}

/// `CREATE TRIGGER` on the shadow table from the source's definition.
pub fn create_trigger(
    definition: &str,
    enabled: bool,
    name: &str,
    schema: &str,
    shadow_table: &str,
    renames: &Renames,
) -> Vec<String> {
    let mut out = vec![renames.apply(definition)];
    if !enabled {
        out.push(format!(
            "ALTER TABLE {} DISABLE TRIGGER {}",
            quote_qualified(schema, shadow_table),
            quote_ident(name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn not_null_names_are_cut_as_postgresql_cuts_them() {
        assert_eq!(
            default_not_null_name("account", "email"),
            "account_email_not_null"
        );
        let long = default_not_null_name(&"t".repeat(60), &"c".repeat(10));
        assert_eq!(long.len(), 63);
        assert!(long.starts_with(&format!("{}_{}_", "t".repeat(43), "c".repeat(10))));
        // Never inside a character.
        let name = default_not_null_name(&"é".repeat(40), "c");
        assert!(name.len() <= 63 && name.ends_with("_c_not_null"), "{name}");
    }

    use super::*;

    #[test]
    fn index_definition_is_pointed_at_the_shadow_table() {
        let mut r = Renames::new();
        r.insert("User", "shadow_User");
        let ix = Index {
            name: "User_email_key".into(),
            definition:
                "CREATE UNIQUE INDEX \"User_email_key\" ON public.\"User\" USING btree (email)"
                    .into(),
            comment: None,
        };
        let sql = create_index(&ix, "public", "shadow_User_email_key", &r).unwrap();
        assert_eq!(
            sql[0],
            "CREATE UNIQUE INDEX \"shadow_User_email_key\" ON public.\"shadow_User\" USING btree (email)"
        );
        let ix = Index {
            name: "area_geom_idx".into(),
            definition:
                "CREATE INDEX area_geom_idx ON public.area USING gist (geom) WHERE (id > 0)".into(),
            comment: None,
        };
        let mut r = Renames::new();
        r.insert("area", "shadow_area");
        assert_eq!(
            create_index(&ix, "public", "shadow_area_geom_idx", &r).unwrap()[0],
            "CREATE INDEX \"shadow_area_geom_idx\" ON public.\"shadow_area\" USING gist (geom) WHERE (id > 0)"
        );
    }

    #[test]
    fn index_names_are_recognised_however_the_server_quotes_them() {
        let r = Renames::new();
        // A keyword is quoted by one server version and maybe not by another: both parse.
        for printed in ["\"user\"", "user"] {
            let ix = Index {
                name: "user".into(),
                definition: format!("CREATE INDEX {printed} ON public.t USING btree (a)"),
                comment: None,
            };
            assert_eq!(
                create_index(&ix, "public", "shadow_user", &r).unwrap()[0],
                "CREATE INDEX \"shadow_user\" ON public.t USING btree (a)"
            );
        }
        let ix = Index {
            name: "Mixed \"q\"".into(),
            definition: "CREATE UNIQUE INDEX \"Mixed \"\"q\"\"\" ON public.t USING btree (a)"
                .into(),
            comment: None,
        };
        assert!(create_index(&ix, "public", "s", &r).is_ok());
        let wrong = Index {
            name: "other".into(),
            ..ix
        };
        assert!(create_index(&wrong, "public", "s", &r).is_err());
    }
}
