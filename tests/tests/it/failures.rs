//! Robustness of `pgzm start` against real PostgreSQL servers: a copy that fails for good, a swap
//! that cannot get its locks, readers during the swap, an interrupted run's leftovers, and two
//! runs on one destination.
//!
//! Blocking is done with real locks (a source session holding `ACCESS EXCLUSIVE` on one table,
//! a destination session holding `ACCESS SHARE` on a live table), and every wait polls the
//! server (`pg_stat_activity`, the catalog) against a deadline; nothing sleeps to "let things
//! happen".

use crate::blocking;
use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blocking::{spawn_reader, terminate, wait_for_lock_waiter, wait_until_waiting, HeldLock};
use common::Pair;
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::inspect::{self, CatalogSignature, TableChecksum};
use pgzm_tests::TestDb;
use tokio::sync::watch;
use tokio_postgres::SimpleQueryMessage;

/// The table whose copy the tests block.
const BLOCKED: &str = "big";

/// A small schema with a user-defined type (so shadow types exist), a foreign key, a serial and
/// one larger table to block.
const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE "Person" (id serial PRIMARY KEY, name text NOT NULL, mood mood);
CREATE TABLE big (id int PRIMARY KEY, person_id int REFERENCES "Person"(id), payload text);
CREATE TABLE note (id serial PRIMARY KEY, body text NOT NULL);
CREATE INDEX note_body_idx ON note (body);
"#;

const SOURCE_DATA: &str = r#"
INSERT INTO "Person" (name, mood)
  SELECT 'person ' || g, (ARRAY['sad','ok','happy']::mood[])[1 + g % 3] FROM generate_series(1, 50) g;
INSERT INTO big SELECT g, 1 + g % 50, repeat('x', 50) || g FROM generate_series(1, 5000) g;
INSERT INTO note (body) SELECT 'source note ' || g FROM generate_series(1, 100) g;
"#;

const DEST_DATA: &str = r#"
INSERT INTO "Person" (name, mood) SELECT 'live ' || g, 'ok' FROM generate_series(1, 10) g;
INSERT INTO big SELECT g, 1 + g % 10, 'live ' || g FROM generate_series(1, 300) g;
INSERT INTO note (body) SELECT 'live note ' || g FROM generate_series(1, 20) g;
"#;

/// A pair loaded with [`SCHEMA`], different data on each side.
async fn schema_pair(label: &str) -> Pair {
    let p = common::pair(label).await;
    p.source.batch(SCHEMA).await.expect("source schema");
    p.source.batch(SOURCE_DATA).await.expect("source data");
    p.dest.batch(SCHEMA).await.expect("dest schema");
    p.dest.batch(DEST_DATA).await.expect("dest data");
    p.source.batch("ANALYZE").await.expect("analyze source");
    p
}

/// What the live destination looks like: per-table checksums (every table in `public`, so a
/// leftover shadow table shows up too) and the catalog signature of the live tables.
#[derive(Debug, PartialEq)]
struct LiveState {
    checksums: BTreeMap<String, TableChecksum>,
    signature: CatalogSignature,
}

async fn live_state(db: &TestDb) -> LiveState {
    let c = db.connect().await.expect("connect");
    LiveState {
        checksums: inspect::table_checksums(&c).await.expect("checksums"),
        signature: inspect::catalog_signature(&c, None)
            .await
            .expect("signature"),
    }
}

/// Relations and types in `public` whose name says they belong to an unfinished migration
/// (`shadow_…`, and the array types `_shadow_…`).
async fn shadow_objects(db: &TestDb) -> Vec<String> {
    let c = db.connect().await.expect("connect");
    let rows = c
        .query(
            "SELECT 'relation ' || relname FROM pg_class \
               WHERE relnamespace = 'public'::regnamespace AND relname LIKE 'shadow\\_%' \
             UNION ALL \
             SELECT 'type ' || typname FROM pg_type \
               WHERE typnamespace = 'public'::regnamespace \
                 AND (typname LIKE 'shadow\\_%' OR typname LIKE '\\_shadow\\_%') \
             ORDER BY 1",
            &[],
        )
        .await
        .expect("list shadow objects");
    rows.iter().map(|r| r.get(0)).collect()
}

/// (status, shadow_present) of every recorded migration, oldest first.
async fn migrations(db: &TestDb) -> Vec<(i64, String, bool)> {
    let c = db.connect().await.expect("connect");
    let rows = c
        .query(
            "SELECT id, status, shadow_present FROM pgzm.migrations ORDER BY id",
            &[],
        )
        .await
        .expect("read pgzm.migrations");
    rows.iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Asserts the destination's live tables hold exactly the source's rows.
async fn assert_dest_equals_source(p: &Pair) {
    let src = p.source.connect().await.expect("connect source");
    let dst = p.dest.connect().await.expect("connect dest");
    let src_sums = inspect::table_checksums(&src).await.expect("source sums");
    let mut dst_sums = inspect::table_checksums(&dst).await.expect("dest sums");
    dst_sums.retain(|t, _| !t.starts_with("backup_"));
    assert_eq!(
        dst_sums, src_sums,
        "live destination differs from the source"
    );
}

/// Asserts that the failed run left the live tables as `before`, no shadow object, and one
/// recorded run, failed, without shadow tables.
async fn assert_failed_without_trace(p: &Pair, before: &LiveState) {
    assert_eq!(&live_state(&p.dest).await, before, "live tables changed");
    assert_eq!(shadow_objects(&p.dest).await, Vec::<String>::new());
    let runs = migrations(&p.dest).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (runs[0].1.as_str(), runs[0].2),
        ("failed", false),
        "{runs:?}"
    );
}

/// Runs the migration again, which must succeed and leave no shadow object.
async fn rerun_succeeds(p: &Pair, what: &str) {
    common::migrate(p)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_dest_equals_source(p).await;
    assert_eq!(shadow_objects(&p.dest).await, Vec::<String>::new());
}

/// Asserts a concurrent reader never failed, ran, and never waited long.
fn assert_reader_unharmed(stats: &blocking::ReaderStats, what: &str) {
    assert!(stats.errors.is_empty(), "reader errors: {:?}", stats.errors);
    assert!(stats.queries > 0);
    assert!(
        stats.max_latency < Duration::from_millis(500),
        "a reader waited {:?} {what}",
        stats.max_latency
    );
}

/// A copy that fails for good (its source session is killed on every attempt) fails the run
/// with the table's name, leaves the live tables as they were and removes everything the run
/// created; the next run succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_copy_leaves_live_tables_and_nothing_behind() {
    let p = schema_pair("fail_copy").await;
    let before = live_state(&p.dest).await;
    let lock = HeldLock::exclusive(&p.source, BLOCKED).await;

    let mut opts = common::options(&p);
    opts.copy_retries = 1;
    let run = tokio::spawn(common::run(opts));
    let mut killed: Vec<i32> = Vec::new();
    while !run.is_finished() {
        let waiter =
            wait_for_lock_waiter(&p.source, "pgzm-agent", &killed, || run.is_finished()).await;
        if let Some(pid) = waiter {
            terminate(&p.source, pid).await;
            killed.push(pid);
            assert!(
                killed.len() <= 10,
                "the copy was retried more than copy_retries allows"
            );
        }
    }
    let killed = killed.len();
    let err = run.await.expect("join").expect_err("the copy must fail");
    let message = err.to_string();
    eprintln!("failing copy: {message} ({killed} agent sessions terminated)");
    assert!(matches!(err, CoordinatorError::Copy { .. }), "{message}");
    assert!(message.contains(&format!("\"{BLOCKED}\"")), "{message}");
    assert_eq!(killed, 2, "one attempt plus one retry");

    assert_failed_without_trace(&p, &before).await;
    let recorded: Option<String> = p
        .dest
        .connect()
        .await
        .expect("connect dest")
        .query_one("SELECT error FROM pgzm.migrations", &[])
        .await
        .expect("read the recorded error")
        .get(0);
    assert!(
        recorded
            .as_deref()
            .is_some_and(|e| e.contains(&format!("\"{BLOCKED}\""))),
        "the recorded error names the table: {recorded:?}"
    );

    lock.release().await;
    rerun_succeeds(&p, "rerun after the failure").await;
}

/// A swap that cannot get its locks (a destination transaction keeps reading a live table) gives
/// up with the lock-timeout error, swaps nothing, leaves nothing behind, and meanwhile never
/// makes a reader of another live table wait much longer than one lock_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_that_cannot_lock_gives_up_without_blocking_readers() {
    let p = schema_pair("swap_lock").await;
    let before = live_state(&p.dest).await;
    // The swap locks in name order ("Person", "big", "note", …): blocking "note" makes every
    // attempt hold "Person" and "big" while it waits, which is what a reader of them can feel.
    let blocker = HeldLock::reading(&p.dest, "note").await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = spawn_reader(&p.dest, &["Person", "big"], stop_rx);

    let mut opts = common::options(&p);
    opts.swap.lock_timeout = Duration::from_millis(50);
    opts.swap.total_timeout = Duration::from_secs(2);
    let err = common::run(opts).await.expect_err("the swap must give up");
    stop_tx.send(true).expect("stop reader");
    let stats = reader.await.expect("join reader");
    let message = err.to_string();
    eprintln!(
        "swap lock timeout: {message}\nreader during the retries: {} queries, worst latency {:?}",
        stats.queries, stats.max_latency
    );
    let CoordinatorError::SwapLockTimeout { attempts, .. } = err else {
        panic!("expected SwapLockTimeout, got: {message}");
    };
    assert!(attempts >= 2, "the swap retried: {message}");
    assert!(
        message.contains("nothing was swapped") || message.contains("nothing was changed"),
        "the message must say nothing was swapped: {message}"
    );
    assert_reader_unharmed(&stats, "behind the swap");

    assert_failed_without_trace(&p, &before).await;

    blocker.release().await;
    rerun_succeeds(&p, "rerun once the blocker is gone").await;
}

/// Readers of every live table during a whole migration, swap included, never fail (a query
/// queued behind the swap resolves the name again and reads the new table) and wait at most
/// briefly; afterwards they read the source's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reader_during_clean_swap() {
    let p = schema_pair("reader").await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader = spawn_reader(&p.dest, &["Person", "big", "note"], stop_rx);

    let report = common::migrate(&p).await.expect("migrate");
    stop_tx.send(true).expect("stop reader");
    let stats = reader.await.expect("join reader");
    let swap = report.swap.expect("swap outcome");
    eprintln!(
        "reader during a clean swap: {} queries, worst latency {:?}; swap: {} attempt(s), locks held {} us",
        stats.queries, stats.max_latency, swap.attempts, swap.lock_held_us
    );
    assert_reader_unharmed(&stats, "during the swap");
    assert_dest_equals_source(&p).await;
}

/// Queries that queue behind the swap's ACCESS EXCLUSIVE lock do not fail when the table they
/// named is renamed under them: PostgreSQL looks the name up again once the lock is granted, so
/// a simple query, and a statement prepared before the migration began, both read the new table.
///
/// Deterministic: a destination session reads the last table in the swap's lock order, and the
/// swap's lock_timeout is long, so the swap holds the other tables while it waits; the readers
/// queue behind it, then the blocker commits and the swap completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_queued_behind_the_swap_read_the_new_tables() {
    let p = schema_pair("queued").await;
    let count_sql = r#"SELECT count(*) FROM "Person""#;
    let prepared_client = p.dest.connect().await.expect("connect");
    prepared_client
        .batch_execute("SET application_name = 'queued-reader'")
        .await
        .expect("name session");
    let prepared = prepared_client.prepare(count_sql).await.expect("prepare");
    let simple_client = p.dest.connect().await.expect("connect");
    simple_client
        .batch_execute("SET application_name = 'queued-reader'")
        .await
        .expect("name session");
    let blocker = HeldLock::reading(&p.dest, "note").await;

    let mut opts = common::options(&p);
    opts.swap.lock_timeout = Duration::from_secs(5);
    let run = tokio::spawn(common::run(opts));
    // The swap holds "Person" and "big" and waits for "note".
    wait_for_lock_waiter(&p.dest, "pgzm-coordinator", &[], || false).await;
    let simple = tokio::spawn(async move {
        let t = Instant::now();
        let rows = simple_client.simple_query(count_sql).await;
        (
            t.elapsed(),
            rows.map(|messages| {
                messages.iter().find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                })
            }),
        )
    });
    let prepared = tokio::spawn(async move {
        let t = Instant::now();
        let row = prepared_client.query_one(&prepared, &[]).await;
        (t.elapsed(), row.map(|r| r.get::<_, i64>(0)))
    });
    wait_until_waiting(&p.dest, "queued-reader", 2).await;
    blocker.release().await;

    let report = run.await.expect("join").expect("the swap completes");
    let (simple_wait, simple_rows) = simple.await.expect("join");
    let (prepared_wait, prepared_rows) = prepared.await.expect("join");
    eprintln!(
        "queued behind the swap: simple query waited {simple_wait:?} -> {simple_rows:?}, \
         prepared statement waited {prepared_wait:?} -> {prepared_rows:?}; swap attempts {:?}",
        report.swap.map(|s| s.attempts)
    );
    assert_eq!(
        simple_rows.expect("simple query after the swap"),
        Some("50".to_string()),
        "the simple query reads the new table"
    );
    assert_eq!(
        prepared_rows.expect("prepared statement after the swap"),
        50,
        "the prepared statement reads the new table"
    );
    assert_dest_equals_source(&p).await;
}

/// An interrupted run (its future dropped mid-copy, so no cleanup code runs) leaves its shadow
/// objects recorded; the next run removes them, marks the old run failed and succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_run_is_cleaned_up_by_the_next() {
    let p = schema_pair("crash").await;
    let before = live_state(&p.dest).await;
    let lock = HeldLock::exclusive(&p.source, BLOCKED).await;

    let run = tokio::spawn(common::run(common::options(&p)));
    wait_for_lock_waiter(&p.source, "pgzm-agent", &[], || false).await;
    run.abort();
    assert!(run.await.expect_err("aborted").is_cancelled());

    let left = shadow_objects(&p.dest).await;
    assert!(
        left.contains(&"relation shadow_big".to_string())
            && left.contains(&"type shadow_mood".to_string()),
        "an interrupted run leaves its shadow objects: {left:?}"
    );
    let runs = migrations(&p.dest).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let (crashed, status, shadow_present) = runs[0].clone();
    assert_eq!((status.as_str(), shadow_present), ("preparing", true));
    let dst = p.dest.connect().await.expect("connect dest");
    assert_eq!(
        inspect::catalog_signature(&dst, None)
            .await
            .expect("signature"),
        before.signature,
        "live tables changed"
    );

    lock.release().await;
    // Rerun at once: the interrupted run's sessions may still be ending on the server.
    let report = common::migrate(&p)
        .await
        .expect("rerun after the interruption");
    assert!(
        report.cleaned_up.iter().any(|o| o == "table shadow_big"),
        "{:?}",
        report.cleaned_up
    );
    assert_dest_equals_source(&p).await;
    assert_eq!(shadow_objects(&p.dest).await, Vec::<String>::new());
    let runs = migrations(&p.dest).await;
    let old = runs
        .iter()
        .find(|r| r.0 == crashed)
        .expect("old run recorded");
    assert_eq!((old.1.as_str(), old.2), ("failed", false), "{runs:?}");
    assert_eq!(
        runs.last().map(|r| r.1.as_str()),
        Some("swapped"),
        "{runs:?}"
    );
}

/// A second run on a destination that a run is working on fails fast with the Busy error and
/// changes nothing; the first run then finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_on_a_busy_destination_fails_fast() {
    let p = schema_pair("busy").await;
    let lock = HeldLock::exclusive(&p.source, BLOCKED).await;
    let first = tokio::spawn(common::run(common::options(&p)));
    wait_for_lock_waiter(&p.source, "pgzm-agent", &[], || false).await;

    // The first run keeps building indexes meanwhile: compare its tables and types only.
    let tables_and_types = |objects: Vec<String>| -> Vec<String> {
        objects
            .into_iter()
            .filter(|o| !o.ends_with("_pkey") && !o.ends_with("_idx"))
            .collect()
    };
    let shadow_before = tables_and_types(shadow_objects(&p.dest).await);
    let t = Instant::now();
    let err = common::migrate(&p)
        .await
        .expect_err("the second run must refuse");
    let took = t.elapsed();
    eprintln!("second run: {err} (after {took:?})");
    assert!(matches!(err, CoordinatorError::Busy), "{err}");
    assert!(err.to_string().contains("another pgzm run"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        tables_and_types(shadow_objects(&p.dest).await),
        shadow_before,
        "the refused run created objects"
    );
    assert_eq!(migrations(&p.dest).await.len(), 1);

    lock.release().await;
    first.await.expect("join").expect("the first run finishes");
    assert_dest_equals_source(&p).await;
}

/// A build session terminated mid-build (an index build's backend killed, as a destination
/// restart would) is retried on a new session: the run succeeds (issue 12, item 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_build_session_is_retried() -> anyhow::Result<()> {
    let p = common::fixture_pair("build_retry", "simple").await;
    p.source
        .batch(
            "CREATE TABLE big (id integer PRIMARY KEY, v text NOT NULL);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 200000) g;
             CREATE INDEX big_slow ON big ((md5(v || md5(v || md5(v || md5(v))))));
             ANALYZE big;",
        )
        .await?;
    let dst = p.dest.connect().await?;
    let killer = p.dest.connect().await?;
    let run = tokio::spawn(common::run(common::options(&p)));
    let mut killed = 0i64;
    let started = Instant::now();
    while killed == 0 && !run.is_finished() && started.elapsed() < Duration::from_secs(120) {
        killed = killer
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = 'pgzm-build' AND state = 'active'
                   AND query LIKE 'CREATE INDEX%big_slow%'",
                &[],
            )
            .await?
            .get(0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(killed > 0, "the index build was never seen running");
    let report = run.await??;
    assert!(report.swap.is_some());
    let rows: i64 = dst.query_one("SELECT count(*) FROM big", &[]).await?.get(0);
    assert_eq!(rows, 200_000);
    let valid: bool = dst
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'big_slow'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert!(valid);
    Ok(())
}

/// The destination server restarts (a backend is SIGKILLed: the postmaster ends every session
/// and recovers) while the copy runs: the copy tasks retry until the server is back, the run's
/// control session is reconnected (and the run lock taken again), and the migration completes
/// (issue 12, item 11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_restart_during_the_copy_is_survived() -> anyhow::Result<()> {
    let dst_cluster = tokio::task::spawn_blocking(pgzm_tests::PgCluster::start).await??;
    let (source, dest) = pgzm_tests::fixture_pair_on(
        pgzm_tests::PgCluster::shared(),
        &dst_cluster,
        "dest_restart",
        "tes",
    )
    .await?;
    let p = Pair { source, dest };
    p.source
        .batch(
            "CREATE TABLE big (id integer PRIMARY KEY, v text NOT NULL);
             INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
             ANALYZE big;",
        )
        .await?;
    // Committed means durable, as on a production server (the harness runs its servers with
    // synchronous_commit off, which loses the last commits in a crash).
    p.dest
        .batch(&format!(
            "ALTER DATABASE {} SET synchronous_commit = on",
            pgzm_tests::quote_ident(p.dest.name())
        ))
        .await?;
    // big's task opens its destination transaction, then waits on the source.
    let locker = p.source.connect().await?;
    locker
        .batch_execute("BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
        .await?;
    let run = tokio::spawn(common::run(common::options(&p)));
    let src_watch = p.source.connect().await?;
    let src_db = p.source.name().to_string();
    let started = Instant::now();
    loop {
        let waiting: i64 = src_watch
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
                   AND application_name LIKE 'pgzm-agent%' AND wait_event_type = 'Lock'",
                &[&src_db],
            )
            .await?
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(!run.is_finished(), "the run ended while big was locked");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "big's copy never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Crash-restart the destination: SIGKILL one backend (an agent's).
    let dst = p.dest.connect().await?;
    let pid: i32 = dst
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgzm-agent%' LIMIT 1",
            &[],
        )
        .await?
        .get(0);
    // SAFETY: kill(2) on a backend of our own throwaway server.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    drop(dst);
    // Back once it accepts connections again (after recovery).
    let back = Instant::now();
    loop {
        if let Ok(c) = p.dest.connect().await {
            if c.simple_query("SELECT 1").await.is_ok() {
                break;
            }
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "the destination did not come back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    locker.batch_execute("COMMIT").await?;
    let report = tokio::time::timeout(Duration::from_secs(120), run).await???;
    assert!(report.swap.is_some());
    assert_dest_equals_source(&p).await;
    let log = std::fs::read_to_string(dst_cluster.log_path())?;
    assert!(
        log.contains("terminated by signal 9"),
        "the server restarted: {}",
        dst_cluster.log_tail(20)
    );
    Ok(())
}

/// A copy the destination reported committed but then lost (as a crash with
/// synchronous_commit = off or a failover to a lagging replica does) is found after the copy
/// phase, from pgzm.copy_progress, and the run stops before building on the incomplete shadow
/// tables: nothing is swapped. Simulated by a trigger that swallows one task's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_destination_lost_stops_the_run_before_the_swap() -> anyhow::Result<()> {
    let p = common::fixture_pair("lost_copy", "simple").await;
    common::migrate(&p).await?; // pgzm's schema exists from now on
    let dst = p.dest.connect().await?;
    dst.batch_execute(
        "CREATE FUNCTION pgzm.lose_a_record() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN IF NEW.task_key = '\"public\".\"Post\"' THEN RETURN NULL; END IF; RETURN NEW; END$$;
         CREATE TRIGGER lose BEFORE INSERT ON pgzm.copy_progress
           FOR EACH ROW EXECUTE FUNCTION pgzm.lose_a_record();",
    )
    .await?;
    let before = inspect::table_checksums(&dst).await?;
    let err = common::migrate(&p)
        .await
        .expect_err("a lost copy must stop the run");
    assert!(
        err.to_string()
            .contains("the destination lost committed copies"),
        "{err}"
    );
    assert_eq!(
        inspect::table_checksums(&dst).await?,
        before,
        "nothing was swapped"
    );
    let shadows: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow%' AND relnamespace = 'public'::regnamespace",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(shadows, 0, "the failed run cleaned up");
    Ok(())
}
