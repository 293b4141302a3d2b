//! What an agent may write: only the shadow tables that a migration recorded in
//! `pgzm.migrations` created, while that migration is still copying (`preparing`).
//!
//! A copy task names its destination table and may ask for `TRUNCATE` + `COPY FREEZE`; a caller
//! holding the agent's token could otherwise point it at a live table. So before its first
//! write a task checks, in the destination and in the copy's own transaction, that:
//! - the migration is recorded and its status is `preparing`;
//! - the table's name starts with `shadow_` and its oid is one of the tables the migration
//!   recorded as created (`created_objects.tables`).
//!
//! The first check travels in the same round trip as the task's `BEGIN`; the migration's table
//! oids are read once per destination and migration and kept. Just before the commit the
//! status is checked again ([`commit_check`]), after the copy holds its lock on the table: a
//! swap that renamed the table meanwhile is seen, and the task rolls back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::error::{AgentError, Side};
use crate::pg;
use crate::sql::quote_literal;
use crate::sql::QualifiedName;

/// Prefix of the tables an agent writes into.
pub const SHADOW_PREFIX: &str = "shadow_";

/// A destination (session key) and a migration id.
type MigrationKey = (String, i64);

/// The table oids each migration created, by destination and migration.
#[derive(Default)]
pub struct WriteGuard {
    created: Mutex<HashMap<MigrationKey, Arc<HashSet<u32>>>>,
}

/// The statement sent with the task's `BEGIN`: the migration's status and the table's oid (no
/// row when the migration is not recorded).
pub fn status_sql(migration_id: i64, table: &QualifiedName) -> String {
    format!(
        "SELECT status, coalesce(to_regclass({})::oid, 0)::text FROM pgzm.migrations WHERE id = {migration_id}",
        quote_literal(&table.quoted())
    )
}

/// The statement that fails (insufficient_privilege) unless the migration is still
/// `preparing`: run after the copy, before the commit. `pgzm.assert_copying` is created with
/// the metadata schema; PL/pgSQL compiles it once per session (a DO block is compiled at every
/// call).
pub fn commit_check(migration_id: i64) -> String {
    format!("SELECT pgzm.assert_copying({migration_id})")
}

impl WriteGuard {
    /// Decides on the answer to [`status_sql`] (`rows`, in the open copy transaction on `dst`).
    /// `Err(Refused)` when the task must not write.
    pub async fn check(
        &self,
        dst: &Client,
        destination_key: &str,
        migration_id: i64,
        table: &QualifiedName,
        rows: &[&tokio_postgres::SimpleQueryRow],
    ) -> Result<(), AgentError> {
        let refuse = |why: String| Err(AgentError::Refused(format!("copy into {table}: {why}")));
        let Some(row) = rows.first() else {
            return refuse(format!(
                "migration {migration_id} is not recorded in the destination's pgzm.migrations"
            ));
        };
        let status = row.get(0).unwrap_or_default();
        if status != "preparing" {
            return refuse(format!(
                "migration {migration_id} is {status}: its copy phase is over"
            ));
        }
        if !table.name.starts_with(SHADOW_PREFIX) {
            return refuse(format!(
                "agents write only into {SHADOW_PREFIX} tables of a running migration"
            ));
        }
        let oid: u32 = row.get(1).and_then(|o| o.parse().ok()).unwrap_or(0);
        if oid == 0 {
            return refuse("no such table in the destination".into());
        }
        let key = (destination_key.to_string(), migration_id);
        let known = self
            .created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        if known.as_ref().is_some_and(|k| k.contains(&oid)) {
            return Ok(());
        }
        // Not known yet (first task of this migration here, or tables recorded since): read the
        // migration's created tables again.
        let sql = format!(
            "SELECT (e->>1) FROM pgzm.migrations m, jsonb_array_elements(m.created_objects->'tables') e WHERE m.id = {migration_id}"
        );
        let answer = dst.simple_query(&sql).await.map_err(|e| {
            AgentError::copy(
                &table.to_string(),
                "read the migration's tables",
                Side::Destination,
                &e,
            )
        })?;
        let created: HashSet<u32> = answer
            .iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).and_then(|o| o.parse().ok()),
                _ => None,
            })
            .collect();
        let allowed = created.contains(&oid);
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::new(created));
        if allowed {
            Ok(())
        } else {
            refuse(format!(
                "it is not a table migration {migration_id} created"
            ))
        }
    }
}

/// The rows of each statement of a multi-statement simple query, in order.
pub fn statements(messages: &[SimpleQueryMessage]) -> Vec<Vec<&tokio_postgres::SimpleQueryRow>> {
    let mut out = vec![Vec::new()];
    for m in messages {
        match m {
            SimpleQueryMessage::Row(r) => {
                if let Some(last) = out.last_mut() {
                    last.push(r);
                }
            }
            SimpleQueryMessage::CommandComplete(_) => out.push(Vec::new()),
            _ => {}
        }
    }
    out
}

/// Maps the error of the task's first statements: a destination without pgzm's metadata is a
/// refusal (nothing there was created by a migration), anything else a copy error.
pub fn first_statement_error(table: &QualifiedName, err: &tokio_postgres::Error) -> AgentError {
    if err.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        return AgentError::Refused(format!(
            "copy into {table}: the destination has no pgzm metadata ({}): agents write only into shadow tables of a running migration",
            pg::describe(err)
        ));
    }
    AgentError::copy(
        &table.to_string(),
        "read pgzm.migrations",
        Side::Destination,
        err,
    )
}
