//! The shadow schema as statements: a pure function of the plan, the source's catalog and the
//! destination's (no I/O), run by `prepare` in one transaction and by the dry run's rehearsal.

use pgzm_pg::sql::quote_qualified;

use crate::catalog::SourceSchema;
use crate::ddl;
use crate::destination::Destination;
use crate::naming::QualName;
use crate::plan::Plan;
use crate::rewrite::Renames;

/// The shadow schema's statements, each with the action it belongs to: trigger and other
/// functions the source's objects use, types, sequences, tables (with the live tables'
/// privileges), partitions and inheritance attached, sequence positions.
pub fn statements(
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Vec<(String, String)> {
    use pgzm_pg::sql::quote_ident;
    let mut statements: Vec<(String, String)> = Vec::new();
    for schema in &plan.schemas_to_create {
        let owner = plan
            .schema_owner
            .as_deref()
            .map(|o| format!(" AUTHORIZATION {}", quote_ident(o)))
            .unwrap_or_default();
        statements.push((
            format!("create schema \"{schema}\""),
            format!("CREATE SCHEMA {}{owner}", quote_ident(schema)),
        ));
    }
    for (signature, definition) in &plan.functions_to_create {
        statements.push((
            format!("create trigger function {signature}"),
            definition.clone(),
        ));
    }
    for (m, t) in plan.types.iter().zip(&schema.types) {
        let action = format!("create shadow type \"{}\"", m.to);
        for sql in ddl::create_type(t, &m.to, renames) {
            statements.push((action.clone(), sql));
        }
        let name = QualName::new(t.schema.clone(), t.name.clone());
        if let Some((owner, grants)) = dest.type_acl.get(&name) {
            statements.push((
                action.clone(),
                format!(
                    "ALTER TYPE {} OWNER TO {}",
                    quote_qualified(&m.schema, &m.to),
                    quote_ident(owner)
                ),
            ));
            for g in ddl::grants_sql("TYPE", &quote_qualified(&m.schema, &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
    }
    for (m, s) in plan.sequences.iter().zip(&schema.sequences) {
        if !s.identity {
            statements.push((
                format!("create shadow sequence \"{}\"", m.to),
                ddl::create_sequence(s, &m.to),
            ));
        }
    }
    for t in &schema.tables {
        let Some(tp) = plan.table(&t.qualname()) else {
            continue;
        };
        let action = format!("create shadow table \"{}\"", tp.shadow);
        for sql in ddl::create_table(
            t,
            &tp.shadow,
            &schema.owned_sequences(t),
            renames,
            dest.server_version,
        ) {
            statements.push((action.clone(), sql));
        }
        if let Some(live) = dest.tables.get(&t.qualname()) {
            let cols: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
            for sql in ddl::carry_privileges(live, &t.schema, &tp.shadow, &cols, renames) {
                statements.push((
                    format!("carry privileges of \"{}\" to its shadow", t.name),
                    sql,
                ));
            }
        }
    }
    // Partitions and inheritance children are created as tables of their own (columns in the
    // source's order), then attached while empty (no scan, no lock anyone waits on).
    for t in &schema.tables {
        let shadow_of = |name: &QualName| plan.table(name).map(|p| p.shadow_name());
        let Some(shadow) = shadow_of(&t.qualname()) else {
            continue;
        };
        if let Some((parent, bound)) = &t.partition_of {
            if let Some(parent_shadow) = shadow_of(parent) {
                statements.push((
                    format!("attach shadow partition {}", shadow.plain()),
                    format!(
                        "ALTER TABLE {parent_shadow} ATTACH PARTITION {shadow} {}",
                        renames.apply(bound)
                    ),
                ));
            }
        }
        for parent in &t.inherits {
            if let Some(parent_shadow) = shadow_of(parent) {
                statements.push((
                    format!("make shadow table {} inherit", shadow.plain()),
                    format!("ALTER TABLE {shadow} INHERIT {parent_shadow}"),
                ));
            }
        }
    }
    for (m, s) in plan.sequences.iter().zip(&schema.sequences) {
        let action = format!("set shadow sequence \"{}\"", m.to);
        statements.push((action.clone(), ddl::set_sequence(&m.to, s)));
        if let Some((_, grants)) = dest
            .sequence_acl
            .get(&QualName::new(s.schema.clone(), s.name.clone()))
        {
            for g in ddl::grants_sql("SEQUENCE", &quote_qualified(&m.schema, &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
    }
    statements
}
