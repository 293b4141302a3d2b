//! Statements that must take locks on tables production uses, without making production queue
//! behind them: each attempt runs with a short `lock_timeout` and is rolled back when a lock is
//! not granted in time, then retried with jittered exponential backoff, within a total time.
//! The swap, the rollback, the sync set-up of preserved tables and cleanup build a
//! [`LockedTransaction`] and run it here.

use std::time::{Duration, Instant};

use pgzm_pg::conn::{classify, describe, ErrorClass};
use tokio_postgres::{Client, GenericClient, SimpleQueryMessage};
use tracing::warn;

use crate::catalog::Oid;
use crate::error::CoordinatorError;

/// Lock behaviour of the swap.
#[derive(Debug, Clone, Copy)]
pub struct SwapSettings {
    /// `lock_timeout` of each attempt.
    pub lock_timeout: Duration,
    /// Give up after this much time in total.
    pub total_timeout: Duration,
    /// After this much time of retries, end the sessions that hold locks on the relations the
    /// transaction locks (`--kill-blockers-after`); `None`: never.
    pub kill_blockers_after: Option<Duration>,
}

impl Default for SwapSettings {
    fn default() -> Self {
        SwapSettings {
            lock_timeout: Duration::from_millis(50),
            total_timeout: Duration::from_secs(30),
            kill_blockers_after: None,
        }
    }
}

/// A session holding a lock on a relation a [`LockedTransaction`] must lock: what an operator
/// needs to decide whether to wait for it or end it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct Blocker {
    /// Backend pid.
    pub pid: i32,
    /// Role.
    pub user: String,
    /// `application_name`.
    pub application: String,
    /// `active`, `idle in transaction`, …
    pub state: String,
    /// Seconds since its transaction began.
    #[serde(serialize_with = "crate::document::rounded")]
    pub transaction_seconds: f64,
    /// The first characters of its current (or last) query.
    pub query: String,
    /// Lock mode it holds (`AccessShareLock`…).
    pub mode: String,
    /// The relation, schema-qualified.
    pub relation: String,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (user {}, application {:?}, {}, transaction open {:.0} s, {} on {}, query {:?})",
            self.pid,
            self.user,
            self.application,
            self.state,
            self.transaction_seconds,
            self.mode,
            self.relation,
            self.query
        )
    }
}

/// Granted locks of other sessions on the relations (quoted, qualified names): any of them
/// conflicts with the `ACCESS EXCLUSIVE` lock the transaction needs.
const BLOCKERS: &str = "
SELECT a.pid, coalesce(a.usename::text, '') AS user_name, coalesce(a.application_name, '') AS application,
       coalesce(a.state, '') AS state,
       coalesce(extract(epoch FROM now() - a.xact_start), 0)::float8 AS transaction_seconds,
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 80) AS query,
       l.mode, l.relation::regclass::text AS relation
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.locktype = 'relation' AND l.pid <> pg_backend_pid()
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.relation IN (SELECT to_regclass(r) FROM unnest($1::text[]) r)
ORDER BY a.xact_start NULLS LAST, a.pid, 8";

/// The sessions holding locks on `relations` now (none found when the query fails: the report
/// is best effort, the lock timeout is the error).
pub async fn blockers(client: &Client, relations: &[String]) -> Vec<Blocker> {
    if relations.is_empty() {
        return Vec::new();
    }
    match client.query(BLOCKERS, &[&relations]).await {
        Ok(rows) => rows
            .iter()
            .map(|r| Blocker {
                pid: r.get("pid"),
                user: r.get("user_name"),
                application: r.get("application"),
                state: r.get("state"),
                transaction_seconds: r.get("transaction_seconds"),
                query: r.get("query"),
                mode: r.get("mode"),
                relation: r.get("relation"),
            })
            .collect(),
        Err(e) => {
            warn!(error = %describe(&e), "could not list the sessions holding the locks");
            Vec::new()
        }
    }
}

/// One transaction that locks tables production uses, as data: `BEGIN`, the attempt's
/// `lock_timeout`, the statements, `COMMIT`, then statements after the commit (markers read
/// back from the batch). Planners build it; golden tests read [`LockedTransaction::statements`];
/// [`LockedTransaction::run`] sends it whole, retrying while a lock is not granted in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockedTransaction {
    body: Vec<String>,
    after_commit: Vec<String>,
    /// Relations (quoted, qualified) whose locks it takes: where to look for blockers.
    relations: Vec<String>,
}

impl LockedTransaction {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a statement inside the transaction.
    pub fn push(&mut self, statement: impl Into<String>) {
        self.body.push(statement.into());
    }

    /// Appends `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` of `relations` (quoted, qualified; in
    /// the order given), and remembers them as where blockers are.
    pub fn lock_tables(&mut self, relations: Vec<String>) {
        if relations.is_empty() {
            return;
        }
        self.body.push(format!(
            "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
            relations.join(", ")
        ));
        self.relations.extend(relations);
    }

    /// Remembers a relation (quoted, qualified) a statement of the transaction locks.
    pub fn locks(&mut self, relation: String) {
        self.relations.push(relation);
    }

    /// Appends a statement sent after `COMMIT`, in the same batch.
    pub fn after_commit(&mut self, statement: impl Into<String>) {
        self.after_commit.push(statement.into());
    }

    /// Whether there is nothing to run inside the transaction.
    pub fn is_empty(&self) -> bool {
        self.body.is_empty()
    }

    /// Every statement of the batch, in order, from `BEGIN` to the last after the commit.
    pub fn statements(&self, lock_timeout: Duration) -> Vec<String> {
        let mut out = Vec::new();
        self.each_statement(lock_timeout, |s| out.push(s.to_string()));
        out
    }

    /// The batch as sent: [`LockedTransaction::statements`] joined, built without a copy of
    /// each statement first (at 10 000 tables the statements are ~8 MB).
    fn batch(&self, lock_timeout: Duration) -> String {
        let mut len = 0;
        self.each_statement(lock_timeout, |s| len += s.len() + 2);
        let mut out = String::with_capacity(len);
        self.each_statement(lock_timeout, |s| {
            if !out.is_empty() {
                out.push_str(";\n");
            }
            out.push_str(s);
        });
        out
    }

    fn each_statement(&self, lock_timeout: Duration, mut f: impl FnMut(&str)) {
        f("BEGIN");
        f(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            lock_timeout.as_millis().max(1)
        ));
        self.body.iter().for_each(|s| f(s));
        f("COMMIT");
        self.after_commit.iter().for_each(|s| f(s));
    }

    /// Runs the batch (see [`run_with_lock_retry`]).
    pub async fn run(
        &self,
        client: &Client,
        settings: SwapSettings,
        lock_action: &str,
        action: &str,
    ) -> Result<(u32, Vec<SimpleQueryMessage>), CoordinatorError> {
        let sql = self.batch(settings.lock_timeout);
        run_with_lock_retry(client, &sql, &self.relations, settings, lock_action, action).await
    }
}

impl Extend<String> for LockedTransaction {
    fn extend<I: IntoIterator<Item = String>>(&mut self, statements: I) {
        self.body.extend(statements);
    }
}

/// Sends `sql` (a whole `BEGIN; SET LOCAL lock_timeout …; …; COMMIT` batch) and, when a lock
/// was not granted within the timeout, rolls back and retries with jittered backoff until
/// `settings.total_timeout`. Any other error is returned at once (after the rollback), labelled
/// with `action`. Returns the attempts made and the messages of the successful attempt.
async fn run_with_lock_retry(
    client: &Client,
    sql: &str,
    relations: &[String],
    settings: SwapSettings,
    lock_action: &str,
    action: &str,
) -> Result<(u32, Vec<SimpleQueryMessage>), CoordinatorError> {
    let started = Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match client.simple_query(sql).await {
            Ok(messages) => return Ok((attempts, messages)),
            Err(err) => {
                // The transaction is aborted (or was never opened): end it so the session is usable.
                let _ = client.batch_execute("ROLLBACK").await;
                if classify(&err) != ErrorClass::LockTimeout {
                    return Err(CoordinatorError::destination(action, err));
                }
                let elapsed = started.elapsed();
                if settings
                    .kill_blockers_after
                    .is_some_and(|after| elapsed >= after && elapsed < settings.total_timeout)
                {
                    let ended = end_blockers(client, relations, lock_action).await;
                    if ended > 0 {
                        continue;
                    }
                }
                if elapsed >= settings.total_timeout {
                    return Err(CoordinatorError::SwapLockTimeout {
                        action: lock_action.to_string(),
                        attempts,
                        lock_timeout_ms: settings.lock_timeout.as_millis() as u64,
                        waited_ms: elapsed.as_millis() as u64,
                        blockers: blockers(client, relations).await,
                    });
                }
                let backoff = backoff(attempts).min(settings.total_timeout.saturating_sub(elapsed));
                warn!(attempts, error = %describe(&err), backoff_ms = backoff.as_millis() as u64, "could not take the locks in time; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Ends (`pg_terminate_backend`) the sessions holding locks on `relations`, logging each;
/// returns how many were ended.
async fn end_blockers(client: &Client, relations: &[String], lock_action: &str) -> usize {
    let mut ended = 0;
    let mut seen = std::collections::BTreeSet::new();
    for b in blockers(client, relations).await {
        if !seen.insert(b.pid) {
            continue;
        }
        warn!(
            pid = b.pid,
            user = %b.user,
            application = %b.application,
            state = %b.state,
            transaction_seconds = b.transaction_seconds,
            mode = %b.mode,
            relation = %b.relation,
            query = %b.query,
            "--kill-blockers-after: ending a session that blocks the {lock_action}"
        );
        match client
            .query_one("SELECT pg_terminate_backend($1) AS ended", &[&b.pid])
            .await
        {
            Ok(row) if row.get::<_, bool>("ended") => ended += 1,
            Ok(_) => warn!(pid = b.pid, "the session was already gone"),
            Err(e) => warn!(pid = b.pid, error = %describe(&e), "could not end the session"),
        }
    }
    ended
}

/// Exponential backoff from 50 ms, capped at 2 s, with ±50 % jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 50u64.saturating_mul(1 << attempt.min(6)).min(2000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = u64::from(nanos % 1000) * base / 1000; // 0..base
    Duration::from_millis(base / 2 + jitter)
}

/// The server's shared lock table, which every lock a transaction holds takes a slot of (apart
/// from the few weak relation locks of its fast path): `max_locks_per_transaction ×
/// (max_connections + max_prepared_transactions)` slots, shared by all sessions, sized at
/// server start. A transaction that needs more fails with "out of shared memory" — after
/// having queued production behind the locks it took. [`LockBudget::check`] refuses it before.
///
/// How to use it for a transaction over many tables (the rollback does; the swap can):
/// `LockBudget::read(client).await?.check(needed, "the swap")?`, with `needed` the locks the
/// transaction takes: [`relation_locks`] counts those of relations a statement locks with
/// everything that goes with them (DROP, a rewrite), one each for relations only renamed or
/// named in `LOCK TABLE`, plus [`TRANSACTION_LOCKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockBudget {
    /// `max_locks_per_transaction`.
    pub max_locks_per_transaction: i64,
    /// `max_connections`.
    pub max_connections: i64,
    /// `max_prepared_transactions`.
    pub max_prepared_transactions: i64,
}

/// Locks any transaction of pgzm's takes besides those counted per object: its own ids, the
/// system catalogs and their indexes it writes, pgzm's metadata tables (most catalog locks go
/// to the fast path; counted anyway).
pub const TRANSACTION_LOCKS: i64 = 64;

impl LockBudget {
    /// Reads the three settings (one query).
    pub async fn read(client: &impl GenericClient) -> Result<LockBudget, CoordinatorError> {
        let row = client
            .query_one(
                "SELECT current_setting('max_locks_per_transaction')::int8 AS max_locks,
                        current_setting('max_connections')::int8 AS max_connections,
                        current_setting('max_prepared_transactions')::int8 AS max_prepared",
                &[],
            )
            .await
            .map_err(|e| CoordinatorError::destination("read the server's lock settings", e))?;
        Ok(LockBudget {
            max_locks_per_transaction: row.get("max_locks"),
            max_connections: row.get("max_connections"),
            max_prepared_transactions: row.get("max_prepared"),
        })
    }

    /// Slots of the lock table.
    pub fn capacity(&self) -> i64 {
        self.max_locks_per_transaction
            .saturating_mul(self.max_connections + self.max_prepared_transactions)
    }

    /// The smallest `max_locks_per_transaction` whose table holds `needed` locks with a quarter
    /// to spare for the other sessions, rounded up to a multiple of 64.
    pub fn setting_for(&self, needed: i64) -> i64 {
        let sessions = (self.max_connections + self.max_prepared_transactions).max(1);
        let per_session = (needed.saturating_mul(5) / 4 + sessions - 1) / sessions;
        ((per_session + 63) / 64 * 64).max(64)
    }

    /// Refuses, with one line saying what to raise, a transaction (`what`) that needs more
    /// than the lock table holds.
    pub fn check(&self, needed: i64, what: &str) -> Result<(), CoordinatorError> {
        if needed <= self.capacity() {
            return Ok(());
        }
        Err(CoordinatorError::Refused(vec![format!(
            "{what} takes about {needed} locks in one transaction, more than this server's lock table holds ({} = max_locks_per_transaction {} × (max_connections {} + max_prepared_transactions {})); nothing was changed: raise max_locks_per_transaction to {} or more (ALTER SYSTEM SET max_locks_per_transaction = {}; it takes effect at a server restart), then run again",
            self.capacity(),
            self.max_locks_per_transaction,
            self.max_connections,
            self.max_prepared_transactions,
            self.setting_for(needed),
            self.setting_for(needed),
        )]))
    }
}

/// Locks a transaction takes on the relations `oids` when it drops or rewrites them: each
/// relation, its indexes, its TOAST table and TOAST index, and the sequences it owns (one
/// query; relations that do not exist count nothing).
pub async fn relation_locks(
    client: &impl GenericClient,
    oids: &[Oid],
) -> Result<i64, CoordinatorError> {
    if oids.is_empty() {
        return Ok(0);
    }
    const COUNT: &str = "
        SELECT (SELECT count(*) FROM pg_catalog.pg_class c WHERE c.oid = ANY($1))
             + (SELECT count(*) FROM pg_catalog.pg_index i WHERE i.indrelid = ANY($1))
             + (SELECT count(*) * 2 FROM pg_catalog.pg_class c
                 WHERE c.oid = ANY($1) AND c.reltoastrelid <> 0)
             + (SELECT count(*) FROM pg_catalog.pg_depend d
                 WHERE d.refobjid = ANY($1) AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                   AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.deptype IN ('a', 'i')
                   AND EXISTS (SELECT 1 FROM pg_catalog.pg_class s WHERE s.oid = d.objid AND s.relkind = 'S'))
               AS locks";
    Ok(client
        .query_one(COUNT, &[&oids])
        .await
        .map_err(|e| CoordinatorError::destination("count the locks a transaction takes", e))?
        .get("locks"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_budget_refuses_with_the_setting_to_raise() {
        let budget = LockBudget {
            max_locks_per_transaction: 64,
            max_connections: 100,
            max_prepared_transactions: 0,
        };
        assert_eq!(budget.capacity(), 6400);
        assert!(budget.check(6400, "the rollback").is_ok());
        let err = budget.check(20_000, "the rollback").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CoordinatorError::Refused(_)));
        assert!(!text.contains('\n'), "{text}");
        // 20 000 × 1.25 / 100 = 250 → 256.
        assert!(
            text.contains("raise max_locks_per_transaction to 256 or more")
                && text.contains("restart")
                && text.contains("6400"),
            "{text}"
        );
        assert_eq!(budget.setting_for(1), 64);
        let prepared = LockBudget {
            max_prepared_transactions: 100,
            ..budget
        };
        assert_eq!(prepared.capacity(), 12_800);
        assert_eq!(prepared.setting_for(20_000), 128);
    }
}
