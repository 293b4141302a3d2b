//! After a table's data has landed: its keys, indexes, NOT VALID checks, triggers, sequence
//! positions and statistics; after every table: foreign keys.

use std::sync::Arc;

use futures_util::future::try_join_all;
use pgzm_agent::sql::{quote_ident, quote_literal, quote_qualified};
use tokio::sync::Semaphore;
use tracing::{debug, info_span, Instrument};

use crate::catalog::{SourceSchema, Table};
use crate::conninfo::DbUrl;
use crate::ddl;
use crate::error::CoordinatorError;
use crate::plan::Plan;
use crate::rewrite::Renames;

/// Settings for build sessions.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// `maintenance_work_mem` for index builds, e.g. `256MB`.
    pub maintenance_work_mem: String,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            maintenance_work_mem: "256MB".into(),
        }
    }
}

/// Tables smaller than this are built in one round trip; larger ones statement by statement
/// (each index build is long enough that its own log line and error context are worth it).
pub const BATCH_BELOW_BYTES: i64 = 64 << 20;

/// Statements that finish one shadow table (everything but foreign keys).
pub fn table_statements(
    t: &Table,
    plan: &Plan,
    source: &SourceSchema,
    renames: &Renames,
) -> Result<Vec<String>, CoordinatorError> {
    let shadow = &plan
        .table(&t.name)
        .map(|p| p.shadow.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in t.constraints.iter().filter(|c| c.has_index()) {
        let name = renames.get(&c.name).unwrap_or(&c.name);
        out.extend(ddl::add_constraint(shadow, c, name, renames));
    }
    for c in t
        .constraints
        .iter()
        .filter(|c| c.kind == 'c' && !c.validated)
    {
        out.extend(ddl::add_constraint(shadow, c, &c.name, renames));
    }
    for ix in &t.indexes {
        let name = renames.get(&ix.name).unwrap_or(&ix.name);
        out.extend(ddl::create_index(ix, name, renames)?);
    }
    // A preserved table's own triggers would fire on mirrored writes: they are created in the swap.
    let triggers = if plan.is_preserved(&t.name) {
        &[][..]
    } else {
        &t.triggers[..]
    };
    for tg in triggers {
        out.extend(ddl::create_trigger(
            &tg.definition,
            tg.enabled,
            &tg.name,
            shadow,
            renames,
        ));
    }
    for s in source.sequences.iter() {
        let Some((table, column)) = &s.owned_by else {
            continue;
        };
        if table != &t.name {
            continue;
        }
        let seq = quote_literal(&quote_qualified(
            "public",
            renames.get(&s.name).unwrap_or(&s.name),
        ));
        let (agg, beyond) = if s.increment >= 0 {
            ("max", ">")
        } else {
            ("min", "<")
        };
        let col = quote_ident(column);
        let last = s.last_value;
        let called = s.is_called;
        // Next value past the copied data, and never behind the source's own position.
        out.push(format!(
            "SELECT setval({seq}::regclass, CASE WHEN past THEN m ELSE {last} END, CASE WHEN past THEN true ELSE {called} END)
             FROM (SELECT m, m IS NOT NULL AND (m {beyond} {last} OR (NOT {called} AND m = {last})) AS past
                   FROM (SELECT {agg}({col})::int8 AS m FROM {}) a) b",
            quote_qualified("public", shadow)
        ));
    }
    out.push(format!("ANALYZE {}", quote_qualified("public", shadow)));
    Ok(out)
}

/// Destination sessions for builds, reused across tables (a session per table would cost a
/// backend start each: most of the time of a small table).
pub struct BuildSessions {
    dest: DbUrl,
    settings: BuildSettings,
    idle: std::sync::Mutex<Vec<tokio_postgres::Client>>,
}

impl BuildSessions {
    /// No sessions yet; they are opened on demand.
    pub fn new(dest: DbUrl, settings: BuildSettings) -> Self {
        BuildSessions {
            dest,
            settings,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Runs `statements` one after another on a session of the pool. A session that saw an
    /// error is closed rather than reused.
    pub async fn run(&self, label: &str, statements: Vec<String>) -> Result<(), CoordinatorError> {
        self.run_as(label, statements, false).await
    }

    /// Runs `statements` in one round trip (one implicit transaction): for small tables, where
    /// a round trip per statement costs more than the statements.
    pub async fn run_batch(
        &self,
        label: &str,
        statements: Vec<String>,
    ) -> Result<(), CoordinatorError> {
        self.run_as(label, statements, true).await
    }

    async fn run_as(
        &self,
        label: &str,
        statements: Vec<String>,
        batch: bool,
    ) -> Result<(), CoordinatorError> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let client = match reused {
            Some(c) if !c.is_closed() => c,
            _ => {
                let c = self.dest.connect("pgzm-build").await?;
                c.batch_execute(&format!(
                    "SET maintenance_work_mem = {}",
                    quote_literal(&self.settings.maintenance_work_mem)
                ))
                .await
                .map_err(|e| {
                    CoordinatorError::destination(format!("{label}: set maintenance_work_mem"), &e)
                })?;
                c
            }
        };
        if batch && statements.len() > 1 {
            let mut all = String::new();
            for sql in &statements {
                debug!(statement = %sql, "build");
                all.push_str(sql);
                all.push_str(";\n");
            }
            client
                .batch_execute(&all)
                .await
                .map_err(|e| CoordinatorError::destination(label, &e))?;
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(client);
            return Ok(());
        }
        for sql in statements {
            debug!(statement = %sql, "build");
            client.batch_execute(&sql).await.map_err(|e| {
                CoordinatorError::destination(format!("{label}: {}", first_line(&sql)), &e)
            })?;
        }
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(client);
        Ok(())
    }
}

/// Runs `statements` on a fresh destination session, one after another.
pub async fn run_on_session(
    dest: &DbUrl,
    settings: &BuildSettings,
    label: &str,
    statements: Vec<String>,
) -> Result<(), CoordinatorError> {
    BuildSessions::new(dest.clone(), settings.clone())
        .run(label, statements)
        .await
}

fn first_line(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default();
    if line.len() > 160 {
        let mut cut = 160;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &line[..cut])
    } else {
        line.to_string()
    }
}

/// Adds every foreign key `NOT VALID` in one transaction (no scans, no lock waits between
/// shadow tables), then validates them in parallel (each validation takes only SHARE UPDATE
/// EXCLUSIVE on its table). Keys that were NOT VALID in the source stay so.
pub async fn foreign_keys(
    dest: &DbUrl,
    plan: &Plan,
    source: &SourceSchema,
    renames: &Renames,
    parallel: usize,
) -> Result<(), CoordinatorError> {
    let mut add = Vec::new();
    let mut validate = Vec::new();
    for t in &source.tables {
        let Some(tp) = plan.table(&t.name) else {
            continue;
        };
        for c in t.constraints.iter().filter(|c| c.kind == 'f') {
            // Keys involving a preserved table are added in the swap (see `preserve`).
            if plan.is_preserved(&t.name)
                || c.references
                    .as_deref()
                    .is_some_and(|r| plan.is_preserved(r))
            {
                continue;
            }
            let mut not_valid = c.clone();
            not_valid.validated = false;
            add.extend(ddl::add_constraint(
                &tp.shadow, &not_valid, &c.name, renames,
            ));
            if c.validated {
                validate.push((tp.shadow.clone(), c.name.clone()));
            }
        }
    }
    if add.is_empty() {
        return Ok(());
    }
    let client = dest.connect("pgzm-build").await?;
    let mut batch = String::from("BEGIN;\n");
    for sql in &add {
        batch.push_str(sql);
        batch.push_str(";\n");
    }
    batch.push_str("COMMIT;");
    if let Err(e) = client.batch_execute(&batch).await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(CoordinatorError::destination(
            "add foreign keys to the shadow tables",
            &e,
        ));
    }
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let tasks = validate.into_iter().map(|(table, name)| {
        let span = info_span!("validate_fk", table = %table);
        let permits = Arc::clone(&permits);
        let dest = dest.clone();
        async move {
            let _p = permits
                .acquire_owned()
                .await
                .map_err(|_| CoordinatorError::Usage("cancelled".into()))?;
            let client = dest.connect("pgzm-build").await?;
            client
                .batch_execute(&format!(
                    "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                    quote_qualified("public", &table),
                    quote_ident(&name)
                ))
                .await
                .map_err(|e| {
                    CoordinatorError::destination(
                        format!("validate foreign key \"{name}\" on \"{table}\""),
                        &e,
                    )
                })
        }
        .instrument(span)
    });
    try_join_all(tasks).await?;
    Ok(())
}
