//! The swap: one transaction, sent as one message, that renames the live objects to their
//! backup names and the shadow objects to the live names, re-points foreign keys of
//! destination-only tables, recreates views, and records the migration as swapped.
//!
//! Index and type renames come before the table locks: they take no lock that queries conflict
//! with. The table locks are then taken in a fixed (sorted) order, with a short `lock_timeout`:
//! if any lock is not granted in time the transaction rolls back and the swap retries with
//! jittered exponential backoff, so production queries never queue behind a waiting ACCESS
//! EXCLUSIVE request for longer than the timeout.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgzm_pg::conn::describe;
use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::info;

use crate::ddl::grants_sql;
use crate::error::CoordinatorError;
use crate::naming::QualName;
use crate::plan::{FunctionPlan, ObjectKind, Plan, ViewPlan};
use crate::state::AsideSet;

use crate::locked::LockedTransaction;
pub use crate::locked::SwapSettings;

/// What a successful swap measured.
#[derive(Debug, Clone, Copy, serde::Serialize, schemars::JsonSchema)]
pub struct SwapOutcome {
    /// Attempts (1 when the locks were free).
    pub attempts: u32,
    /// Time from the locks being granted to the commit having finished, measured by the server
    /// clock, in microseconds.
    pub lock_held_us: i64,
    /// Wall time of the whole swap step including retries, in milliseconds.
    pub total_ms: u64,
}

/// The swap transaction's SQL (without the lock-timeout retry loop), one statement per line.
pub fn swap_sql(plan: &Plan, aside: Option<&AsideSet>, lock_timeout: Duration) -> String {
    swap_transaction(plan, aside)
        .statements(lock_timeout)
        .iter()
        .map(|s| format!("{s};\n"))
        .collect()
}

/// The swap transaction planned for `plan` (and the backup set moved aside, if any): what can
/// run before the table locks, the locks in one sorted statement, then the renames and the
/// constraint and view work under them.
pub fn swap_transaction(plan: &Plan, aside: Option<&AsideSet>) -> LockedTransaction {
    let mut tx = LockedTransaction::new();
    before_locks(&mut tx, plan, aside);
    tx.lock_tables(lock_list(plan));
    tx.push("SELECT 'locked', (extract(epoch FROM clock_timestamp()) * 1000000)::int8");
    under_locks(&mut tx, plan);
    tx.after_commit("SELECT 'committed', (extract(epoch FROM clock_timestamp()) * 1000000)::int8");
    tx
}

/// Renames of indexes, types and routines, recreated functions and views, and the migration's
/// record: statements that take no lock queries conflict with.
///
/// Index and type renames come before the table locks: renaming an index takes only SHARE
/// UPDATE EXCLUSIVE on the index (not on its table), and a type rename locks nothing that
/// queries take, so production keeps reading and writing while they run. What is left under
/// the ACCESS EXCLUSIVE locks is the table and sequence renames: the lock window is about half
/// as long. (Other sessions keep seeing the old names until the commit.) The current backup set
/// moves aside first, freeing the `backup_` names, and its new names are recorded in the same
/// transaction: if the swap fails, it is untouched.
fn before_locks(tx: &mut LockedTransaction, plan: &Plan, aside: Option<&AsideSet>) {
    if let Some(a) = aside {
        tx.extend(a.renames.iter().map(|m| m.rename_sql(false)));
        tx.push(a.record_sql());
    }
    // Functions bound to replaced objects move to their backup names here too (a routine
    // rename takes no lock).
    let early = plan
        .to_backup
        .iter()
        .chain(&plan.to_live)
        .filter(|m| m.kind.renamed_before_locks());
    let (routines, indexes_and_types): (Vec<_>, Vec<_>) =
        early.partition(|m| m.kind == ObjectKind::Function);
    tx.extend(routines.iter().map(|m| m.rename_sql(false)));
    // Recreated functions and views are created here, before the locks, over the shadow
    // objects (so they follow them through the renames): views as `shadow_<name>`, renamed
    // after the locks; functions under their own name (the old ones are `backup_` by now).
    // They are created before the shadow types take their live names below: a signature or a
    // cast naming `shadow_<type>` must still find it. Under the locks only renames are left.
    // As pg_restore does: a SQL function's string body is not checked at creation (it names
    // tables unqualified, which this session's search_path does not resolve); it resolves its
    // names when it runs, as it did before.
    if !plan.functions.is_empty() {
        tx.push("SET LOCAL check_function_bodies = off");
    }
    let mut over_shadows = plan.shadow_renames();
    let (after_views, before_views): (Vec<_>, Vec<_>) =
        plan.functions.iter().partition(|f| f.after_views);
    for f in &before_views {
        tx.extend(function_sql(f, &over_shadows));
    }
    let relations = plan.relation_names();
    for v in &plan.views {
        let shadow = crate::naming::prefixed(crate::naming::SHADOW, &v.name);
        let definition = crate::rewrite::alias_relations(
            v.definition.trim_end().trim_end_matches(';'),
            &relations,
        );
        let created = ViewPlan {
            name: shadow.clone(),
            definition: over_shadows.apply(&definition),
            ..v.clone()
        };
        tx.extend(view_sql(&created));
        over_shadows.insert_in(&v.schema, &v.name, &shadow);
    }
    for f in &after_views {
        tx.extend(function_sql(f, &over_shadows));
    }
    // Index and type renames.
    tx.extend(indexes_and_types.iter().map(|m| m.rename_sql(false)));
    // The migration is recorded as swapped in the same transaction (so only if the swap
    // commits), but before the locks: it touches only pgzm's own table.
    tx.push(format!(
        "UPDATE pgzm.migrations SET status = 'swapped', swapped_at = now(), shadow_present = false, backup_present = {} WHERE id = {}",
        !plan.to_backup.is_empty(),
        plan.migration_id
    ));
    // Foreign keys involving a preserved table are checked now, while production still runs
    // (no lock that blocks it: the anti-joins read the shadow tables), not in the lock window.
    tx.extend(plan.deferred_checks.iter().cloned());
}

/// About how many locks the swap transaction holds at its commit (it keeps every lock it
/// takes): one per relation it renames (tables, indexes, sequences, views, materialized views)
/// or locks for its constraints, one per view it creates, and the transaction's own. At 3 000
/// tables with a serial key each that is ~18 000, more than a server with the default
/// `max_locks_per_transaction` holds: checked before anything is built
/// ([`crate::locked::LockBudget::check`]).
pub fn lock_estimate(plan: &Plan) -> i64 {
    let renamed = plan
        .to_backup
        .iter()
        .chain(&plan.to_live)
        .filter(|m| m.kind.is_relation())
        .count();
    let aside = plan.views.len() + plan.foreign_keys.len() + plan.repoints.len();
    i64::try_from(renamed + aside).unwrap_or(i64::MAX) + crate::locked::TRANSACTION_LOCKS
}

/// `LOCK TABLE` of every relation whose name changes or whose constraints are rewritten,
/// sorted: one order for every run, so two swaps can never deadlock on each other. (LOCK TABLE
/// refuses materialized views: their renames take the lock themselves, under the same
/// lock_timeout.)
fn lock_list(plan: &Plan) -> Vec<String> {
    let mut lock: BTreeSet<(&str, &str)> = BTreeSet::new();
    for m in plan.to_backup.iter().chain(&plan.to_live) {
        if matches!(m.kind, ObjectKind::Table | ObjectKind::View) {
            lock.insert((&m.schema, &m.from));
        }
    }
    for fk in &plan.foreign_keys {
        lock.insert((&fk.schema, &fk.table));
    }
    for r in &plan.repoints {
        lock.insert((&r.schema, &r.table));
    }
    lock.iter().map(|(s, n)| quote_qualified(s, n)).collect()
}

/// Under the locks: the preserved tables' last check and sync teardown, the foreign keys of
/// other tables dropped, the table and sequence renames, the foreign keys added again (now
/// naming the new tables), deferred statements, sequences, the views renamed into place and
/// re-pointed constraints.
fn under_locks(tx: &mut LockedTransaction, plan: &Plan) {
    if !plan.preserved.is_empty() {
        // Under the locks no more writes can reach the preserved tables: a mirror that failed
        // before now means a stale shadow, and the swap must not happen.
        tx.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF EXISTS (SELECT 1 FROM pgzm.sync_errors WHERE migration_id = {id}) THEN \
             RAISE EXCEPTION 'a write to a preserved table could not be mirrored into its shadow (see pgzm.sync_errors): prepare again with --force'; \
             END IF; END",
            id = plan.migration_id
        )));
        for p in &plan.preserved {
            tx.extend(p.teardown_sql(&p.table));
        }
    }
    tx.extend(plan.foreign_keys.iter().map(|fk| {
        format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name)
        )
    }));
    tx.extend(
        plan.to_backup
            .iter()
            .chain(&plan.to_live)
            .filter(|m| !m.kind.renamed_before_locks())
            .map(|m| m.rename_sql(false)),
    );
    // The definition names the referenced table by its live name, which is now the new table.
    tx.extend(plan.foreign_keys.iter().map(|fk| {
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name),
            fk.definition.trim_end_matches(" NOT VALID")
        )
    }));
    tx.extend(plan.deferred.iter().cloned());
    for p in &plan.preserved {
        tx.extend(p.sequence_sql());
    }
    tx.extend(plan.views.iter().map(|v| {
        format!(
            "ALTER VIEW {} RENAME TO {}",
            quote_qualified(
                &v.schema,
                &crate::naming::prefixed(crate::naming::SHADOW, &v.name)
            ),
            quote_ident(&v.name)
        )
    }));
    for r in &plan.repoints {
        tx.extend(r.detach.iter().chain(&r.attach).cloned());
    }
}

/// `CREATE VIEW` with its options, owner, privileges and comment.
pub fn view_sql(v: &ViewPlan) -> Vec<String> {
    let name = quote_qualified(&v.schema, &v.name);
    let options = if v.options.is_empty() {
        String::new()
    } else {
        format!(" WITH ({})", v.options.join(", "))
    };
    let mut out = vec![format!(
        "CREATE VIEW {name}{options} AS {}",
        v.definition.trim_end().trim_end_matches(';')
    )];
    if let Some(owner) = &v.owner {
        out.push(format!("ALTER VIEW {name} OWNER TO {}", quote_ident(owner)));
    }
    out.extend(grants_sql("TABLE", &name, &v.grants));
    if let Some(c) = &v.comment {
        out.push(format!("COMMENT ON VIEW {name} IS {}", quote_literal(c)));
    }
    out
}

/// A function recreated over the new objects, before the renames: its own definition (body,
/// language, settings, security) with its signature, result type and SQL-standard body pointed
/// at the shadow objects (`over_shadows`; a string body is left alone: it resolves names when
/// it runs), then owner, privileges and comment.
pub fn function_sql(f: &FunctionPlan, over_shadows: &crate::rewrite::Renames) -> Vec<String> {
    let sig = &over_shadows.apply(&f.signature);
    let definition = f.definition.trim_end().trim_end_matches(';');
    let definition = match definition.find("\nAS ") {
        Some(at) if !definition[..at].contains("\nBEGIN ATOMIC") => format!(
            "{}{}",
            over_shadows.apply(&definition[..at]),
            &definition[at..]
        ),
        _ => over_shadows.apply(definition),
    };
    let mut out = vec![
        definition,
        format!("ALTER ROUTINE {sig} OWNER TO {}", quote_ident(&f.owner)),
    ];
    if let Some(grants) = &f.grants {
        out.push(format!("REVOKE ALL ON ROUTINE {sig} FROM PUBLIC"));
        out.extend(grants_sql("ROUTINE", sig, grants));
    }
    if let Some(c) = &f.comment {
        out.push(format!("COMMENT ON ROUTINE {sig} IS {}", quote_literal(c)));
    }
    out
}

/// The value of the `SELECT '<name>', …` marker row among a simple query's results (text
/// rows, read by position: the marker statements are part of the swap's recorded SQL).
fn marker(messages: &[SimpleQueryMessage], name: &str) -> Option<i64> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) if row.get(0) == Some(name) => {
            row.get(1).and_then(|v| v.parse().ok())
        }
        _ => None,
    })
}

/// Runs the swap with lock-timeout retries. On any error nothing has changed.
pub async fn swap(
    client: &Client,
    plan: &Plan,
    aside: Option<&AsideSet>,
    settings: SwapSettings,
) -> Result<SwapOutcome, CoordinatorError> {
    let started = Instant::now();
    crate::locked::LockBudget::read(client)
        .await?
        .check(lock_estimate(plan), "the swap")?;
    let (attempts, messages) = swap_transaction(plan, aside)
        .run(
            client,
            settings,
            "swap",
            "swap transaction (rolled back, nothing changed)",
        )
        .await?;
    let locked = marker(&messages, "locked").unwrap_or(0);
    let committed = marker(&messages, "committed").unwrap_or(locked);
    let outcome = SwapOutcome {
        attempts,
        lock_held_us: committed - locked,
        total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    info!(
        attempts,
        lock_held_us = outcome.lock_held_us,
        "swap committed"
    );
    Ok(outcome)
}

/// Validates, after the swap, the foreign keys involving preserved tables that the swap added
/// `NOT VALID` (checked just before its locks). One that does not validate (a write committed
/// between the check and the locks broke it) stays `NOT VALID`, still enforced on new writes,
/// and the message says how to finish it.
pub async fn validate_deferred(client: &Client, plan: &Plan) -> Vec<String> {
    let mut problems = Vec::new();
    for (table, name) in &plan.deferred_validations {
        let sql = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            table.quoted(),
            quote_ident(name)
        );
        if let Err(e) = client.batch_execute(&sql).await {
            problems.push(format!(
                "foreign key \"{name}\" on {} does not validate: {}; a write committed just before the swap broke it. It stays NOT VALID (new writes are checked) until you fix the rows and run: {sql}",
                table.plain(),
                describe(&e)
            ));
        }
    }
    problems
}

/// Validates the re-pointed foreign keys after the swap. A key that does not validate (rows of
/// the destination-only table reference rows the new data lacks) stays NOT VALID: production
/// keeps working, and the message says which key to look at.
pub async fn validate_repointed(client: &Client, plan: &Plan) -> Vec<String> {
    let mut warnings = Vec::new();
    for fk in &plan.foreign_keys {
        let sql = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            quote_qualified(&fk.schema, &fk.table),
            quote_ident(&fk.name)
        );
        if let Err(e) = client.batch_execute(&sql).await {
            warnings.push(format!(
                "foreign key \"{}\" on {} was re-pointed to the new {} but does not validate: {}; it stays NOT VALID until you fix the rows and run: {sql}",
                fk.name,
                QualName::new(fk.schema.clone(), fk.table.clone()).plain(),
                QualName::new(fk.references_schema.clone(), fk.references.clone()).plain(),
                describe(&e)
            ));
        }
    }
    warnings
}
