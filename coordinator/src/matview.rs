//! Materialized views built before the swap: `CREATE MATERIALIZED VIEW shadow_<name>` over the
//! shadow tables (the definition's references to migrated objects rewritten to their shadow
//! names), populated as the original was, with its indexes, owner, privileges and comment. The
//! swap only renames it: there is never a `REFRESH` inside the lock window.

use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};
use tokio_postgres::Client;

use crate::ddl::grants_sql;
use crate::error::CoordinatorError;
use crate::plan::{MatviewPlan, Plan};
use crate::rewrite::Renames;
use crate::state::{self, RecordedObjects};

/// The statements that build one shadow materialized view.
pub fn build_sql(
    mv: &MatviewPlan,
    plan: &Plan,
    renames: &Renames,
) -> Result<Vec<String>, CoordinatorError> {
    let m = &mv.matview;
    let shadow = quote_qualified(&m.schema, &mv.shadow);
    let options = if m.options.is_empty() {
        String::new()
    } else {
        format!(" WITH ({})", m.options.join(", "))
    };
    // Column references name their table (`"Post".user_id`): a renamed table keeps its name as
    // an alias, so they still resolve.
    let relations = plan.relation_names();
    let definition =
        crate::rewrite::alias_relations(m.definition.trim_end().trim_end_matches(';'), &relations);
    let mut out = vec![format!(
        "CREATE MATERIALIZED VIEW {shadow}{options} AS {} WITH {}DATA",
        renames.apply(&definition),
        if m.populated { "" } else { "NO " }
    )];
    for (index, definition) in &m.indexes {
        let shadow_index = plan
            .indexes
            .iter()
            .find(|i| i.schema == m.schema && &i.from == index)
            .map_or_else(
                || crate::naming::prefixed(crate::naming::SHADOW, index),
                |i| i.to.to_string(),
            );
        out.push(index_sql(
            definition,
            index,
            &m.schema,
            &m.name,
            &shadow_index,
            &shadow,
            renames,
        )?);
    }
    if let Some(owner) = &mv.owner {
        out.push(format!(
            "ALTER MATERIALIZED VIEW {shadow} OWNER TO {}",
            quote_ident(owner)
        ));
    }
    out.extend(grants_sql("TABLE", &shadow, &mv.grants));
    if let Some(c) = &m.comment {
        out.push(format!(
            "COMMENT ON MATERIALIZED VIEW {shadow} IS {}",
            quote_literal(c)
        ));
    }
    Ok(out)
}

/// `pg_get_indexdef` of an index on the materialized view, pointed at the shadow one under
/// its shadow name.
fn index_sql(
    definition: &str,
    index: &str,
    schema: &str,
    matview: &str,
    shadow_index: &str,
    shadow: &str,
    renames: &Renames,
) -> Result<String, CoordinatorError> {
    for head in ["CREATE UNIQUE INDEX ", "CREATE INDEX "] {
        let Some(rest) = definition
            .strip_prefix(head)
            .and_then(|r| crate::rewrite::strip_ident(r, index))
            .and_then(|r| r.strip_prefix(" ON "))
            .and_then(|r| crate::rewrite::strip_qualified(r, schema, matview))
            .map(|(_, _, rest)| rest)
        else {
            continue;
        };
        return Ok(format!(
            "{head}{} ON {shadow}{}",
            quote_ident(shadow_index),
            renames.apply(rest)
        ));
    }
    Err(CoordinatorError::Usage(format!(
        "index \"{index}\" of materialized view \"{matview}\": unexpected definition {definition:?}; drop the index or report this"
    )))
}

/// Builds every planned materialized view in one transaction, in dependency order, and records
/// them (by oid) with the run's objects, so an interrupted run's are cleaned up precisely.
pub async fn build_all(
    control: &Client,
    plan: &Plan,
    renames: &Renames,
    created: &mut RecordedObjects,
) -> Result<(), CoordinatorError> {
    if plan.matviews.is_empty() {
        return Ok(());
    }
    control
        .batch_execute("BEGIN")
        .await
        .map_err(|e| CoordinatorError::destination("begin building materialized views", e))?;
    let result = build_in_transaction(control, plan, renames, created).await;
    match result {
        Ok(recorded) => {
            control
                .batch_execute("COMMIT")
                .await
                .map_err(|e| CoordinatorError::destination("commit the materialized views", e))?;
            *created = recorded;
            Ok(())
        }
        Err(e) => {
            let _ = control.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}

async fn build_in_transaction(
    tx: &Client,
    plan: &Plan,
    renames: &Renames,
    created: &RecordedObjects,
) -> Result<RecordedObjects, CoordinatorError> {
    let mut recorded = created.clone();
    for mv in &plan.matviews {
        let action = format!(
            "build materialized view \"{}\" over the new tables",
            mv.matview.name
        );
        let sql = build_sql(mv, plan, renames)?.join(";\n");
        tx.batch_execute(&sql)
            .await
            .map_err(|e| CoordinatorError::destination(action.clone(), e))?;
        let oid: u32 = tx
            .query_one(
                "SELECT to_regclass($1)::oid",
                &[&quote_qualified(&mv.matview.schema, &mv.shadow)],
            )
            .await
            .map_err(|e| CoordinatorError::destination(action, e))?
            .get(0);
        recorded
            .matviews
            .push((mv.matview.schema.clone(), mv.shadow.clone(), oid));
    }
    state::record_objects(tx, plan.migration_id, &recorded).await?;
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use crate::rewrite::alias_relations;
    use std::collections::HashSet;

    #[test]
    fn relations_without_an_alias_get_their_own_name() {
        let def = r#" SELECT "Post".user_id, count(*) AS posts FROM public."Post" GROUP BY "Post".user_id"#;
        assert_eq!(
            alias_relations(def, &HashSet::from([("public", "Post")])),
            r#" SELECT "Post".user_id, count(*) AS posts FROM public."Post" "Post" GROUP BY "Post".user_id"#
        );
        let def = "SELECT c.name FROM (public.category c JOIN public.film_category fc ON ((c.id = fc.id)))";
        assert_eq!(
            alias_relations(
                def,
                &HashSet::from([("public", "category"), ("public", "film_category")])
            ),
            def
        );
        let def = "SELECT category.name FROM public.category, public.film WHERE true";
        assert_eq!(
            alias_relations(
                def,
                &HashSet::from([("public", "category"), ("public", "film")])
            ),
            "SELECT category.name FROM public.category category, public.film film WHERE true"
        );
        let def = "SELECT 'public.category' AS t, public.category_name(x) FROM public.categoryx";
        assert_eq!(
            alias_relations(def, &HashSet::from([("public", "category")])),
            def
        );
        let def = "SELECT n FROM reporting.user_names WHERE true";
        assert_eq!(
            alias_relations(def, &HashSet::from([("reporting", "user_names")])),
            "SELECT n FROM reporting.user_names user_names WHERE true"
        );
        let def = "SELECT x FROM public.category";
        assert_eq!(
            alias_relations(def, &HashSet::from([("public", "category")])),
            "SELECT x FROM public.category category"
        );
    }
}
