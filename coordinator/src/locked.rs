//! Statements that must take locks on tables production uses, without making production queue
//! behind them: each attempt runs with a short `lock_timeout` and is rolled back when a lock is
//! not granted in time, then retried with jittered exponential backoff, within a total time.
//! The swap, the rollback, the sync set-up of preserved tables and cleanup build a
//! [`LockedTransaction`] and run it here.

use std::time::{Duration, Instant};

use pgzm_pg::conn::{classify, describe, ErrorClass};
use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::warn;

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
        let mut out = Vec::with_capacity(self.body.len() + self.after_commit.len() + 3);
        out.push("BEGIN".to_string());
        out.push(format!(
            "SET LOCAL lock_timeout = '{}ms'",
            lock_timeout.as_millis().max(1)
        ));
        out.extend(self.body.iter().cloned());
        out.push("COMMIT".to_string());
        out.extend(self.after_commit.iter().cloned());
        out
    }

    /// Runs the batch (see [`run_with_lock_retry`]).
    pub async fn run(
        &self,
        client: &Client,
        settings: SwapSettings,
        lock_action: &str,
        action: &str,
    ) -> Result<(u32, Vec<SimpleQueryMessage>), CoordinatorError> {
        let sql = self.statements(settings.lock_timeout).join(";\n");
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
