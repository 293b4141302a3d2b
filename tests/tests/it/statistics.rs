//! Planner statistics of the new tables: every table the copy fills with at least the
//! destination's `autovacuum_analyze_threshold` rows is analyzed before the swap; a smaller one
//! is left as pg_restore leaves it (its size known from its index build), since autovacuum
//! would not analyze it either.

use crate::checks::int;
use crate::common;

/// Rows of `pg_stats` for `public.<table>`.
async fn stats_rows(c: &tokio_postgres::Client, table: &str) -> i64 {
    int(
        c,
        &format!(
            "SELECT count(*) FROM pg_stats WHERE schemaname = 'public' AND tablename = '{table}'"
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_below_the_analyze_threshold_are_not_analyzed() -> anyhow::Result<()> {
    let p = common::pair("statistics").await;
    let schema = "CREATE TABLE big (id int PRIMARY KEY, v text NOT NULL);
                  CREATE TABLE tiny (id int PRIMARY KEY, v text NOT NULL);
                  CREATE TABLE keyless (v int NOT NULL);
                  CREATE TABLE edge (id int PRIMARY KEY);";
    p.source.batch(schema).await?;
    p.dest.batch(schema).await?;
    p.source
        .batch(
            "INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 200) g;
             INSERT INTO tiny SELECT g, 'row ' || g FROM generate_series(1, 5) g;
             INSERT INTO keyless SELECT g FROM generate_series(1, 120) g;
             INSERT INTO edge SELECT g FROM generate_series(1, 50) g;",
        )
        .await?;
    let dst = p.dest.connect().await?;
    let threshold = int(
        &dst,
        "SELECT current_setting('autovacuum_analyze_threshold')::int8",
    )
    .await;
    assert_eq!(threshold, 50, "the test's row counts assume the default");

    common::prepare_and_release(&common::options(&p)).await?;

    assert!(stats_rows(&dst, "shadow_big").await > 0, "big not analyzed");
    assert!(
        stats_rows(&dst, "shadow_keyless").await > 0,
        "a table without an index is analyzed"
    );
    assert!(
        stats_rows(&dst, "shadow_edge").await > 0,
        "a table of exactly the threshold is analyzed"
    );
    assert_eq!(stats_rows(&dst, "shadow_tiny").await, 0, "tiny analyzed");
    // The planner still knows the small table's size: its primary key's build recorded it.
    assert_eq!(
        int(
            &dst,
            "SELECT reltuples::int8 FROM pg_class WHERE oid = 'public.shadow_tiny'::regclass"
        )
        .await,
        5
    );

    common::swap(&p).await?;
    assert!(
        stats_rows(&dst, "big").await > 0,
        "stats did not follow the swap"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM tiny").await, 5);
    Ok(())
}
