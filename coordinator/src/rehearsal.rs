//! The dry run's rehearsal: everything the real run would create before its copy and its swap,
//! run for real on the destination inside one transaction that is always rolled back, so a
//! dry run finds the failures the real run would hit (a default calling a missing function, an
//! index the destination's version cannot build, a view or function that cannot be recreated
//! over the new tables…) and reports all of them at once.
//!
//! The actions run in batches, each under a savepoint. When a batch fails it is undone and its
//! actions run again one by one, each under its own savepoint: one that fails is recorded and
//! undone, and the rehearsal goes on. (A savepoint per action made the rehearsal quadratic:
//! every release walks the list of the relations the transaction created, in PostgreSQL's
//! `AtSubCommit_smgr`; 198 s for 10 000 tables.) Only new objects are created, so no lock is taken on a live table except
//! the shared read locks of materialized views and views reading destination-only tables. The
//! swap's statements that need a live table's lock (renames, foreign keys and defaults of other
//! tables re-pointed) are not rehearsed.

use pgzm_pg::conn::describe;
use pgzm_pg::sql::{quote_ident, quote_qualified};
use tokio_postgres::Client;

use crate::build;
use crate::catalog::SourceSchema;
use crate::destination::Destination;
use crate::error::CoordinatorError;
use crate::naming::prefixed;
use crate::plan::Plan;
use crate::rewrite::display_ident;
use crate::rewrite::Renames;

/// Prefix of the stand-ins created for views and functions recreated at the swap.
const STAND_IN: &str = "pgzm_rehearsal_";

/// Actions run at once under one savepoint (see the module docs).
const BATCH: usize = 200;

struct Rehearsal<'a> {
    client: &'a Client,
    failures: Vec<String>,
    /// Actions waiting for the next [`Rehearsal::flush`]: (action, statements).
    pending: Vec<(String, Vec<String>)>,
}

fn dry_run_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> CoordinatorError {
    let what = what.to_string();
    move |e| CoordinatorError::destination(format!("dry run: {what}"), e)
}

impl Rehearsal<'_> {
    /// Queues one action's statements; they run with the next batch.
    async fn run(&mut self, action: &str, statements: &[String]) -> Result<(), CoordinatorError> {
        if statements.is_empty() {
            return Ok(());
        }
        self.pending.push((action.to_string(), statements.to_vec()));
        if self.pending.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Runs the queued actions under one savepoint; when that fails, undoes them and runs them
    /// again one by one, recording each that fails.
    async fn flush(&mut self) -> Result<(), CoordinatorError> {
        let batch = std::mem::take(&mut self.pending);
        if batch.len() > 1 {
            let sql: Vec<&String> = batch.iter().flat_map(|(_, s)| s).collect();
            if self.under_savepoint(&sql).await?.is_ok() {
                return Ok(());
            }
        }
        for (action, statements) in &batch {
            if let Err(e) = self.under_savepoint(statements).await? {
                self.failures
                    .push(format!("{action} would fail: {}", describe(&e)));
            }
        }
        Ok(())
    }

    /// Runs `statements` under a savepoint, released when they pass and rolled back to when
    /// they fail: their error (inner), or the savepoint's own (outer).
    async fn under_savepoint(
        &self,
        statements: &[impl AsRef<str>],
    ) -> Result<Result<(), tokio_postgres::Error>, CoordinatorError> {
        self.client
            .batch_execute("SAVEPOINT pgzm_rehearsal")
            .await
            .map_err(dry_run_error("savepoint"))?;
        let sql: String = statements
            .iter()
            .map(|s| format!("{};\n", s.as_ref()))
            .collect();
        let ran = self.client.batch_execute(&sql).await;
        let end = if ran.is_ok() {
            "RELEASE SAVEPOINT pgzm_rehearsal"
        } else {
            "ROLLBACK TO SAVEPOINT pgzm_rehearsal; RELEASE SAVEPOINT pgzm_rehearsal"
        };
        self.client
            .batch_execute(end)
            .await
            .map_err(dry_run_error("end the savepoint"))?;
        Ok(ran)
    }
}

/// Rehearses the run on the destination (see the module docs) and returns what would fail.
/// The caller holds the run lock on `client`, whose `search_path` is `pg_catalog`.
pub async fn rehearse(
    client: &Client,
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Result<Vec<String>, CoordinatorError> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| CoordinatorError::destination("dry run: begin", e))?;
    let mut r = Rehearsal {
        client,
        failures: Vec::new(),
        pending: Vec::new(),
    };
    let result = rehearse_in_transaction(&mut r, plan, schema, dest, renames).await;
    let rolled_back = client.batch_execute("ROLLBACK").await;
    result?;
    rolled_back.map_err(|e| CoordinatorError::destination("dry run: roll back", e))?;
    Ok(r.failures)
}

async fn rehearse_in_transaction(
    r: &mut Rehearsal<'_>,
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Result<(), CoordinatorError> {
    for (ext, ext_schema) in &plan.extensions_to_create {
        r.run(
            &format!("create extension {ext}"),
            &[format!(
                "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
                quote_ident(ext),
                quote_ident(ext_schema)
            )],
        )
        .await?;
    }
    // The shadow schema, action by action.
    let statements = crate::shadow::statements(plan, schema, dest, renames);
    let mut i = 0;
    while i < statements.len() {
        let action = statements[i].0.clone();
        let mut group = Vec::new();
        while i < statements.len() && statements[i].0 == action {
            group.push(statements[i].1.clone());
            i += 1;
        }
        r.run(&action, &group).await?;
    }
    // Keys, indexes, triggers and sequence positions of each (empty) table; partitioned
    // tables after their partitions.
    let (parents, tables): (Vec<_>, Vec<_>) = schema
        .tables
        .iter()
        .filter(|t| plan.table(&t.qualname()).is_some())
        .partition(|t| t.is_partitioned());
    for t in tables.into_iter().chain(parents.into_iter().rev()) {
        let statements = build::table_build(t, plan, schema, renames)?.sequential();
        r.run(&format!("build \"{}\"", t.name), &statements).await?;
    }
    let (add, _) = build::foreign_key_statements(plan, schema, renames);
    for sql in add {
        r.run("add a foreign key to the shadow tables", &[sql])
            .await?;
    }
    for mv in &plan.matviews {
        let statements = crate::matview::build_sql(mv, plan, renames)?;
        r.run(
            &format!("build materialized view \"{}\"", mv.matview.name),
            &statements,
        )
        .await?;
    }
    // What the swap recreates, as stand-ins over the shadow objects, with SQL function bodies
    // not checked at creation, as in the swap (they resolve their names when they run).
    r.flush().await?;
    r.client
        .batch_execute("SET LOCAL check_function_bodies = off")
        .await
        .map_err(|e| CoordinatorError::destination("dry run: set check_function_bodies", e))?;
    let mut stand_ins = renames.clone();
    let relations = plan.relation_names();
    let (after_views, before_views): (Vec<_>, Vec<_>) =
        plan.functions.iter().partition(|f| f.after_views);
    for f in before_views {
        rehearse_function(r, f, &mut stand_ins).await?;
    }
    for v in &plan.views {
        let name = prefixed(STAND_IN, &v.name);
        let definition = crate::rewrite::alias_relations(
            v.definition.trim_end().trim_end_matches(';'),
            &relations,
        );
        r.run(
            &format!(
                "recreate view {} at the swap",
                crate::plan::qualified_display(&v.schema, &v.name)
            ),
            &[format!(
                "CREATE VIEW {} AS {}",
                quote_qualified(&v.schema, &name),
                stand_ins.apply(&definition)
            )],
        )
        .await?;
        stand_ins.insert_in(&v.schema, &v.name, &name);
    }
    for f in after_views {
        rehearse_function(r, f, &mut stand_ins).await?;
    }
    r.flush().await
}

/// A stand-in for a function the swap recreates: its definition under another name, over the
/// shadow objects; later stand-ins call it.
async fn rehearse_function(
    r: &mut Rehearsal<'_>,
    f: &crate::plan::FunctionPlan,
    stand_ins: &mut Renames,
) -> Result<(), CoordinatorError> {
    {
        let head = format!(
            "CREATE OR REPLACE {} {}.{}(",
            f.keyword(),
            display_ident(&f.schema),
            display_ident(&f.name)
        );
        let Some(rest) = f.definition.strip_prefix(&head) else {
            return Ok(());
        };
        let definition = format!(
            "CREATE {} {}({}",
            f.keyword(),
            quote_qualified(&f.schema, &prefixed(STAND_IN, &f.name)),
            stand_ins.apply(rest)
        );
        r.run(
            &format!("recreate {} at the swap", f.signature),
            &[definition],
        )
        .await?;
        stand_ins.insert_in(&f.schema, &f.name, &prefixed(STAND_IN, &f.name));
    }
    Ok(())
}
