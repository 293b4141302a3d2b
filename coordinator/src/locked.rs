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
}

impl Default for SwapSettings {
    fn default() -> Self {
        SwapSettings {
            lock_timeout: Duration::from_millis(50),
            total_timeout: Duration::from_secs(30),
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
        run_with_lock_retry(client, &sql, settings, lock_action, action).await
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
                if elapsed >= settings.total_timeout {
                    return Err(CoordinatorError::SwapLockTimeout {
                        action: lock_action.to_string(),
                        attempts,
                        lock_timeout_ms: settings.lock_timeout.as_millis() as u64,
                        waited_ms: elapsed.as_millis() as u64,
                    });
                }
                let backoff = backoff(attempts).min(settings.total_timeout.saturating_sub(elapsed));
                warn!(attempts, error = %describe(&err), backoff_ms = backoff.as_millis() as u64, "could not take the locks in time; retrying");
                tokio::time::sleep(backoff).await;
            }
        }
    }
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
