//! What remote agents' database roles may touch, and for how long.
//!
//! An agent that connects to the destination as its own role (least privilege: not the owner of
//! the tables) needs, during the copy only, `SELECT, INSERT, TRUNCATE` on the shadow tables it
//! loads, `USAGE` on their schema and on `pgzm`, `SELECT` on `pgzm.migrations` and
//! `SELECT, INSERT` on `pgzm.copy_progress`. The coordinator grants exactly what each role lacks
//! (`has_*_privilege`: what it holds already, through `PUBLIC`, membership or ownership, is left
//! alone) after creating the shadow tables, and revokes exactly that as soon as the copy phase
//! ends, before any shadow table can become live. So the recipe in the README needs no default
//! privileges, and after a swap an agent's role holds nothing on the live tables that it did not
//! hold before.

use tokio_postgres::Client;

use crate::error::CoordinatorError;
use pgzm_pg::sql::{quote_ident, quote_ident_list};

/// Privileges granted for a copy, to be revoked when it ends.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentGrants {
    /// `GRANT`/`REVOKE` targets: (privileges, object clause, role), e.g.
    /// `("SELECT, INSERT", "TABLE public.\"shadow_a\"", "agent")`.
    pub grants: Vec<(String, String, String)>,
}

/// What a copy needs, by object: (object type, object as `regclass`/schema text, privileges).
const NEEDS: &str = "
WITH tables AS (SELECT unnest($1::oid[]) AS oid)
SELECT 'TABLE' AS object_type, c.oid::regclass::text AS object_name, p AS privilege
  FROM tables t JOIN pg_class c ON c.oid = t.oid,
       unnest(ARRAY['SELECT', 'INSERT', 'TRUNCATE']) p
 WHERE NOT has_table_privilege($2, c.oid, p)
UNION ALL
SELECT 'SCHEMA' AS object_type, quote_ident(n.nspname) AS object_name, 'USAGE' AS privilege
  FROM pg_namespace n
 WHERE (n.nspname = 'pgzm' OR n.oid IN (SELECT relnamespace FROM pg_class WHERE oid = ANY($1::oid[])))
   AND NOT has_schema_privilege($2, n.oid, 'USAGE')
UNION ALL
SELECT 'TABLE' AS object_type, 'pgzm.migrations' AS object_name, 'SELECT' AS privilege
 WHERE NOT has_table_privilege($2, 'pgzm.migrations', 'SELECT')
UNION ALL
SELECT 'TABLE' AS object_type, 'pgzm.copy_progress' AS object_name, p AS privilege
  FROM unnest(ARRAY['SELECT', 'INSERT']) p
 WHERE NOT has_table_privilege($2, 'pgzm.copy_progress', p)";

/// Grants each role in `roles` (except the coordinator's own) what it lacks for copying into
/// the tables `shadow_oids`. One transaction.
pub async fn grant(
    control: &Client,
    roles: &[String],
    shadow_oids: &[u32],
) -> Result<AgentGrants, CoordinatorError> {
    let me: String = control
        .query_one("SELECT current_user::text AS role_name", &[])
        .await
        .map_err(|e| CoordinatorError::destination("read the coordinator's role", e))?
        .get("role_name");
    let mut out = AgentGrants::default();
    for role in roles.iter().filter(|r| **r != me) {
        let exists = control
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS role_exists",
                &[role],
            )
            .await
            .map_err(|e| CoordinatorError::destination("read the agents' roles", e))?
            .get::<_, bool>("role_exists");
        if !exists {
            continue;
        }
        let rows = control
            .query(NEEDS, &[&shadow_oids, role])
            .await
            .map_err(|e| CoordinatorError::destination("read the agents' privileges", e))?;
        // Grouped by object: one GRANT per object and role.
        let mut by_object: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for r in rows {
            let object = format!(
                "{} {}",
                r.get::<_, &str>("object_type"),
                r.get::<_, &str>("object_name")
            );
            by_object
                .entry(object)
                .or_default()
                .push(r.get("privilege"));
        }
        for (object, privileges) in by_object {
            out.grants
                .push((privileges.join(", "), object, role.clone()));
        }
    }
    if out.grants.is_empty() {
        return Ok(out);
    }
    let sql = statements(&out, "GRANT", "TO");
    control
        .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
        .await
        .map_err(|e| {
            CoordinatorError::destination("grant the agents' roles access to the shadow tables", e)
        })?;
    tracing::info!(
        grants = out.grants.len(),
        roles = %quote_ident_list(roles.iter().map(String::as_str)),
        "granted the agents' roles what the copy needs"
    );
    Ok(out)
}

/// Revokes what [`grant`] granted. One transaction.
pub async fn revoke(control: &Client, grants: &AgentGrants) -> Result<(), CoordinatorError> {
    if grants.grants.is_empty() {
        return Ok(());
    }
    let sql = statements(grants, "REVOKE", "FROM");
    if let Err(e) = control
        .batch_execute(&format!("BEGIN; {sql}; COMMIT"))
        .await
    {
        let _ = control.batch_execute("ROLLBACK").await;
        return Err(CoordinatorError::destination(
            "revoke the agents' roles' access to the shadow tables",
            e,
        ));
    }
    Ok(())
}

fn statements(grants: &AgentGrants, verb: &str, to: &str) -> String {
    grants
        .grants
        .iter()
        .map(|(privileges, object, role)| {
            format!("{verb} {privileges} ON {object} {to} {}", quote_ident(role))
        })
        .collect::<Vec<_>>()
        .join("; ")
}
