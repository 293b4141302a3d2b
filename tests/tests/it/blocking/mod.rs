//! Holding real locks and watching who waits on them: the tools the failure tests use to block a
//! migration at a chosen point, and a reader that measures how long queries wait.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use pgzm_tests::TestDb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, SimpleQueryMessage};

/// Longest any wait on the servers may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A session holding a lock in an open transaction until released or dropped.
pub struct HeldLock {
    client: Client,
}

impl HeldLock {
    /// `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` on `db`.
    pub async fn exclusive(db: &TestDb, table: &str) -> HeldLock {
        Self::hold(
            db,
            &format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", quoted(table)),
        )
        .await
    }

    /// A plain `SELECT` on `table`: ACCESS SHARE, which already blocks ACCESS EXCLUSIVE.
    pub async fn reading(db: &TestDb, table: &str) -> HeldLock {
        Self::hold(db, &format!("SELECT count(*) FROM {}", quoted(table))).await
    }

    async fn hold(db: &TestDb, statement: &str) -> HeldLock {
        let client = db.connect().await.expect("connect lock holder");
        client
            .batch_execute(&format!("BEGIN; {statement}"))
            .await
            .expect("take the lock");
        HeldLock { client }
    }

    pub async fn release(self) {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .expect("release lock");
    }
}

pub fn quoted(name: &str) -> String {
    pgzm_tests::quote_ident(name)
}

/// Polls `db`'s server until a backend of `db` named `application_name` (or `application_name`
/// and a tag, as agents' sessions are: `pgzm-agent m<migration> a<agent>`) waits on a heavyweight
/// lock (other than the pids in `exclude`); returns its pid, or `None` once `give_up` says so.
pub async fn wait_for_lock_waiter(
    db: &TestDb,
    application_name: &str,
    exclude: &[i32],
    mut give_up: impl FnMut() -> bool,
) -> Option<i32> {
    let c = db.connect().await.expect("connect monitor");
    let started = Instant::now();
    loop {
        let row = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                 AND (application_name = $2 OR application_name LIKE $2 || ' %') \
                 AND wait_event_type = 'Lock' AND pid <> ALL($3) LIMIT 1",
                &[&db.name(), &application_name, &exclude],
            )
            .await
            .expect("poll pg_stat_activity");
        if let Some(row) = row {
            return Some(row.get(0));
        }
        if give_up() {
            return None;
        }
        if started.elapsed() >= DEADLINE {
            let sessions = c
                .query(
                    "SELECT format('%s %s %s/%s: %s', application_name, state, wait_event_type, \
                     wait_event, query) FROM pg_stat_activity WHERE datname = $1",
                    &[&db.name()],
                )
                .await
                .expect("list sessions");
            let sessions: Vec<String> = sessions.iter().map(|r| r.get(0)).collect();
            panic!(
                "no {application_name} backend waited on a lock in {} within {DEADLINE:?}; \
                 sessions: {sessions:#?}",
                db.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn terminate(db: &TestDb, pid: i32) {
    let c = db.connect().await.expect("connect");
    c.query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate backend");
}

/// What a concurrent reader saw.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Queries run.
    pub queries: u64,
    /// Worst latency of one query.
    pub max_latency: Duration,
    /// Every failed query, with its error.
    pub errors: Vec<String>,
}

/// Runs `SELECT count(*)` on each of `tables` in turn, as simple queries resolved by name every
/// time, until `stop` flips; records the worst latency and every error.
pub fn spawn_reader(
    db: &TestDb,
    tables: &[&str],
    stop: watch::Receiver<bool>,
) -> JoinHandle<ReaderStats> {
    let db = db.clone();
    let statements: Vec<String> = tables
        .iter()
        .map(|t| format!("SELECT count(*) FROM {}", quoted(t)))
        .collect();
    tokio::spawn(async move {
        let client = db.connect().await.expect("connect reader");
        let mut stats = ReaderStats::default();
        // Paces the loop so the reader does not take a whole core of a small CI machine.
        let mut pace = tokio::time::interval(Duration::from_millis(2));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*stop.borrow() {
            for sql in &statements {
                pace.tick().await;
                let t = Instant::now();
                match client.simple_query(sql).await {
                    Ok(messages) => {
                        let rows = messages
                            .iter()
                            .filter(|m| matches!(m, SimpleQueryMessage::Row(_)))
                            .count();
                        if rows != 1 {
                            stats.errors.push(format!("{sql}: {rows} rows"));
                        }
                    }
                    Err(e) => stats.errors.push(format!("{sql}: {e}")),
                }
                stats.max_latency = stats.max_latency.max(t.elapsed());
                stats.queries += 1;
            }
        }
        stats
    })
}

/// Polls until `n` sessions of `db` named `application_name` wait on a lock.
pub async fn wait_until_waiting(db: &TestDb, application_name: &str, n: i64) {
    let c = db.connect().await.expect("connect monitor");
    let started = Instant::now();
    loop {
        let waiting: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = $2 AND wait_event_type = 'Lock'",
                &[&db.name(), &application_name],
            )
            .await
            .expect("poll pg_stat_activity")
            .get(0);
        if waiting >= n {
            return;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "only {waiting} of {n} {application_name} sessions waited on a lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
