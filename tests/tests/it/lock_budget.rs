//! The destination's lock table against a migration of many tables (issue 19): the swap is one
//! transaction holding a lock per relation it renames, so a migration whose swap the lock table
//! cannot hold is refused before anything is built, saying what to raise; and the shadow set is
//! created over several transactions, each holding at most half of the lock table.
//!
//! The destination is a server of its own, started with `max_locks_per_transaction = 10` and
//! `max_connections = 20`: a lock table of 200 slots as pgzm counts it.

use crate::common;

use common::Pair;
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::{PgCluster, TestDb};

fn small_lock_table() -> anyhow::Result<PgCluster> {
    Ok(PgCluster::start_with_settings(&[
        "max_locks_per_transaction=10".into(),
        "max_connections=20".into(),
    ])?)
}

/// `n` tables `t_NN (id <key>, v text)` with 3 rows each, created a few per transaction (the
/// small server's lock table cannot hold them all in one).
async fn create_tables(db: &TestDb, n: usize, key: &str, label: &str) -> anyhow::Result<()> {
    for chunk in (0..n).collect::<Vec<_>>().chunks(4) {
        let sql: String = chunk
            .iter()
            .map(|i| {
                format!(
                    "CREATE TABLE t_{i:02} (id {key} PRIMARY KEY, v text NOT NULL);
                     INSERT INTO t_{i:02} (id, v) SELECT g, '{label} ' || g FROM generate_series(1, 3) g;"
                )
            })
            .collect();
        db.batch(&sql).await?;
    }
    Ok(())
}

async fn int(db: &TestDb, sql: &str) -> anyhow::Result<i64> {
    Ok(db.connect().await?.query_one(sql, &[]).await?.get(0))
}

async fn pair_on(small: &PgCluster, label: &str) -> anyhow::Result<Pair> {
    let source = common::pair(label).await.source;
    let dest = TestDb::create(small, &format!("{label}_dst")).await?;
    Ok(Pair { source, dest })
}

/// 40 tables with a serial key: the swap would rename 240 relations (tables, keys, sequences,
/// both ways), more than 200 slots. Refused at the plan with one line naming the setting and
/// the value to raise it to; the destination is as it was (no shadow object, no pgzm state).
/// Fails without the check: the run builds the shadow set, then its swap fails with "out of
/// shared memory" (or fits only in the lock table's slack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_swap_the_lock_table_cannot_hold_is_refused_before_anything_is_built(
) -> anyhow::Result<()> {
    let small = small_lock_table()?;
    let p = pair_on(&small, "lockbudget_refused").await?;
    create_tables(&p.source, 40, "serial", "source").await?;
    create_tables(&p.dest, 40, "serial", "live").await?;
    let live_rows = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'i')";
    let before = int(&p.dest, live_rows).await?;

    let err = common::run(common::options(&p))
        .await
        .expect_err("the swap cannot fit in the lock table");
    assert!(matches!(err, CoordinatorError::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("the swap")
            && text.contains("max_locks_per_transaction 10")
            && text.contains("max_connections 20")
            && text.contains("raise max_locks_per_transaction to")
            && text.contains("restart")
            && !text.contains('\n'),
        "{text}"
    );
    assert_eq!(int(&p.dest, live_rows).await?, before);
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow\\_%'"
        )
        .await?,
        0
    );
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgzm'"
        )
        .await?,
        0,
        "nothing recorded"
    );
    assert_eq!(
        int(&p.dest, "SELECT count(*) FROM t_07 WHERE v LIKE 'live %'").await?,
        3
    );
    Ok(())
}

/// 20 tables with an int key fit the swap (80 relations renamed), and the shadow set is
/// created 16 objects per transaction (half of 200 slots at 9 locks an object, at least 16):
/// its row types were created by several transactions. The migration then completes and the live
/// tables hold the source's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_small_lock_table_the_shadow_set_is_created_over_several_transactions(
) -> anyhow::Result<()> {
    let small = small_lock_table()?;
    let p = pair_on(&small, "lockbudget_batches").await?;
    create_tables(&p.source, 20, "int", "source").await?;
    create_tables(&p.dest, 20, "int", "live").await?;
    let opts = common::options(&p);

    common::prepare_and_release(&opts).await?;
    let transactions = int(
        &p.dest,
        "SELECT count(DISTINCT t.xmin::text) FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
          WHERE c.relname LIKE 'shadow\\_t\\_%' AND c.relkind = 'r'",
    )
    .await?;
    assert!(
        transactions >= 2,
        "20 tables at 16 objects per transaction: {transactions} transaction(s)"
    );
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pgzm.copy_progress WHERE task_key = 'shadow:incomplete'"
        )
        .await?,
        0,
        "the mark of an unfinished shadow set is gone once it is complete"
    );

    common::swap(&p).await?;
    for i in [0, 13, 19] {
        assert_eq!(
            int(
                &p.dest,
                &format!("SELECT count(*) FROM t_{i:02} WHERE v LIKE 'source %'")
            )
            .await?,
            3
        );
    }
    Ok(())
}

/// The shadow set's later transaction fails after an earlier one committed (a source column's
/// collation the destination lacks, on the last of 20 tables at 16 objects per transaction): the
/// run fails saying why, removes what the committed transaction created (no shadow object; the
/// run recorded as failed), the live tables are as they were, and a run after the fix succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_transaction_failing_after_one_committed_leaves_nothing_behind(
) -> anyhow::Result<()> {
    let small = small_lock_table()?;
    let p = pair_on(&small, "lockbudget_late_failure").await?;
    create_tables(&p.source, 20, "int", "source").await?;
    create_tables(&p.dest, 20, "int", "live").await?;
    let opts = fails_on_a_collation_the_destination_lacks(&p, 19).await?;
    assert!(
        int(
            &p.dest,
            "SELECT coalesce(jsonb_array_length(created_objects->'tables'), 0)::int8 FROM pgzm.migrations WHERE status = 'failed'"
        )
        .await?
            >= 16,
        "the first transaction had committed (and recorded) its tables"
    );
    left_nothing_behind(&p, &[0, 15, 19]).await?;
    migrates_once_fixed(&p, &opts, 19).await
}

/// Gives `t_<failing>`'s column a collation the destination lacks, then runs `prepare`: it
/// fails naming the collation, on one line. The options, for the run after the fix.
async fn fails_on_a_collation_the_destination_lacks(
    p: &Pair,
    failing: usize,
) -> anyhow::Result<pgzm_coordinator::migrate::StartOptions> {
    p.source
        .batch(&format!(
            r#"CREATE COLLATION german_sort FROM "C";
               ALTER TABLE t_{failing:02} ALTER COLUMN v TYPE text COLLATE german_sort;"#
        ))
        .await?;
    let opts = common::options(p);
    let err = common::prepare_and_release(&opts)
        .await
        .expect_err("a shadow transaction fails");
    let message = err.to_string();
    assert!(
        message.contains("german_sort") && !message.contains('\n'),
        "{message}"
    );
    Ok(opts)
}

/// After a failed run: no shadow relation or type, the run recorded as failed without shadow
/// objects, and the live tables `checked` hold their rows.
async fn left_nothing_behind(p: &Pair, checked: &[usize]) -> anyhow::Result<()> {
    for (what, sql) in [
        (
            "relations",
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow\\_%'",
        ),
        (
            "types",
            "SELECT count(*) FROM pg_type WHERE typname LIKE 'shadow\\_%'",
        ),
    ] {
        assert_eq!(int(&p.dest, sql).await?, 0, "shadow {what} left behind");
    }
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pgzm.migrations WHERE status = 'failed' AND NOT shadow_present"
        )
        .await?,
        1,
        "the run is recorded as failed, without shadow objects"
    );
    for i in checked {
        assert_eq!(
            int(
                &p.dest,
                &format!("SELECT count(*) FROM t_{i:02} WHERE v LIKE 'live %'")
            )
            .await?,
            3
        );
    }
    Ok(())
}

/// The collation fixed in the source: the next run migrates `t_<failing>`.
async fn migrates_once_fixed(
    p: &Pair,
    opts: &pgzm_coordinator::migrate::StartOptions,
    failing: usize,
) -> anyhow::Result<()> {
    p.source
        .batch(&format!(
            "ALTER TABLE t_{failing:02} ALTER COLUMN v TYPE text COLLATE \"default\""
        ))
        .await?;
    common::prepare_and_release(opts).await?;
    common::swap(p).await?;
    assert_eq!(
        int(
            &p.dest,
            &format!("SELECT count(*) FROM t_{failing:02} WHERE v LIKE 'source %'")
        )
        .await?,
        3
    );
    Ok(())
}

/// A lock table of 1 600 slots (`max_locks_per_transaction = 80`, `max_connections = 20`):
/// the swap of 140 tables with a serial key fits, and the shadow set is created 88 objects per
/// transaction, on two sessions for its sequences and tables (44 each).
fn medium_lock_table() -> anyhow::Result<PgCluster> {
    Ok(PgCluster::start_with_settings(&[
        "max_locks_per_transaction=80".into(),
        "max_connections=20".into(),
    ])?)
}

/// `a_uses_t_05`, named to sort before the table whose row type (and an array of it) its
/// columns use, with two rows.
const TYPED_ON_ANOTHER: &str = "
    CREATE TABLE a_uses_t_05 (id int PRIMARY KEY, one t_05, many t_05[]);
    INSERT INTO a_uses_t_05 VALUES
        (1, ROW(7, 'seven')::t_05, ARRAY[ROW(8, 'eight')::t_05, ROW(9, 'nine')::t_05]),
        (2, NULL, '{}');";

/// 140 tables with a serial key and a table typed on one of their row types: the shadow set
/// spans many transactions, its sequences and tables shared by two sessions, the typed table
/// created after the table whose row type it uses. Every shadow object is recorded, the mark of
/// an unfinished set is gone, and after the swap the live tables (the typed one too, its values
/// of the new `t_05` type) hold the source's rows and take new rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_set_over_many_transactions_is_shared_by_two_sessions() -> anyhow::Result<()> {
    let medium = medium_lock_table()?;
    let p = pair_on(&medium, "lockbudget_shared").await?;
    create_tables(&p.source, 140, "serial", "source").await?;
    create_tables(&p.dest, 140, "serial", "live").await?;
    p.source.batch(TYPED_ON_ANOTHER).await?;
    let opts = common::options(&p);

    common::prepare_and_release(&opts).await?;
    let transactions = int(
        &p.dest,
        "SELECT count(DISTINCT xmin::text) FROM pg_class WHERE relname LIKE 'shadow\\_t\\_%' AND relkind = 'r'",
    )
    .await?;
    assert!(
        transactions >= 4,
        "140 tables at 44 per transaction: {transactions} transaction(s)"
    );
    assert_eq!(
        int(
            &p.dest,
            "SELECT jsonb_array_length(created_objects->'tables')::int8 FROM pgzm.migrations WHERE status = 'prepared'"
        )
        .await?,
        141,
        "every shadow table is recorded, whichever session created it"
    );
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pgzm.copy_progress WHERE task_key = 'shadow:incomplete'"
        )
        .await?,
        0
    );

    common::swap(&p).await?;
    for i in [0, 70, 139] {
        assert_eq!(
            int(
                &p.dest,
                &format!("SELECT count(*) FROM t_{i:02} WHERE v LIKE 'source %'")
            )
            .await?,
            3
        );
        p.dest
            .batch(&format!("INSERT INTO t_{i:02} (v) VALUES ('new')"))
            .await?;
    }
    assert_eq!(
        int(
            &p.dest,
            "SELECT ((one).id + (many[2]).id)::int8 FROM a_uses_t_05 WHERE id = 1"
        )
        .await?,
        16
    );
    assert_eq!(
        int(
            &p.dest,
            "SELECT count(*) FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
              WHERE a.attrelid = 'a_uses_t_05'::regclass AND a.attname = 'one'
                AND t.typrelid = 't_05'::regclass"
        )
        .await?,
        1,
        "the column's type is the new t_05's row type"
    );
    Ok(())
}

/// A transaction on one of the two sessions fails (a collation the destination lacks, on a
/// table in the middle of 140) while the other goes on: the run fails saying why, every shadow
/// object either session committed is removed, the live tables are as they were, and the run
/// after the fix succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_shadow_transaction_failing_leaves_nothing_behind() -> anyhow::Result<()> {
    let medium = medium_lock_table()?;
    let p = pair_on(&medium, "lockbudget_shared_failure").await?;
    create_tables(&p.source, 140, "serial", "source").await?;
    create_tables(&p.dest, 140, "serial", "live").await?;
    let opts = fails_on_a_collation_the_destination_lacks(&p, 100).await?;
    left_nothing_behind(&p, &[0, 100, 139]).await?;
    migrates_once_fixed(&p, &opts, 100).await
}
