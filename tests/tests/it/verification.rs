//! The copy's built-in verification: every table's row digest (count + order-independent hash,
//! on by default) matches a digest computed independently from the source, and from the live
//! table after the swap; the digests of a table's page ranges add up to the table's; a run with
//! `verify: false` records none.

use crate::common;

use futures_util::StreamExt;
use pgzm_agent::digest::{Digest, StreamDigester};
use pgzm_agent::sql::{quote_ident_list, quote_qualified};
use tokio_postgres::Client;

/// Reads `table`'s `columns` with binary COPY and digests the stream.
async fn digest_of(client: &Client, table: &str, columns: &[String]) -> anyhow::Result<Digest> {
    let sql = format!(
        "COPY {} ({}) TO STDOUT (FORMAT binary)",
        quote_qualified("public", table),
        quote_ident_list(columns.iter().map(String::as_str))
    );
    digest_copy(client, table, &sql).await
}

/// The digest of `table`'s `columns` as text: comparable across databases (the binary form of
/// an array of an enum carries the enum's oid, which differs between two databases).
async fn text_digest_of(
    client: &Client,
    table: &str,
    columns: &[String],
) -> anyhow::Result<Digest> {
    let cols: Vec<String> = columns
        .iter()
        .map(|c| format!("{}::text", pgzm_agent::sql::quote_ident(c)))
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}) TO STDOUT (FORMAT binary)",
        cols.join(", "),
        quote_qualified("public", table)
    );
    digest_copy(client, table, &sql).await
}

async fn digest_copy(client: &Client, table: &str, sql: &str) -> anyhow::Result<Digest> {
    let stream = client.copy_out(sql).await?;
    futures_util::pin_mut!(stream);
    let mut d = StreamDigester::default();
    while let Some(chunk) = stream.next().await {
        d.feed(&chunk?);
    }
    d.finish().map_err(|m| anyhow::anyhow!("{table}: {m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_digests_match_the_source_and_the_swapped_tables() -> anyhow::Result<()> {
    let p = common::coverage_pair("verify_cov").await;
    let report = common::migrate(&p).await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    assert!(!report.tables.is_empty());
    let mut with_rows = 0;
    for t in &report.tables {
        let planned = report
            .plan
            .tables
            .iter()
            .find(|pt| pt.name == t.table)
            .expect("planned table");
        let recorded = t
            .digest
            .as_deref()
            .unwrap_or_else(|| panic!("no digest recorded for {}", t.table));
        let columns: Vec<String> = planned.copy_columns.iter().map(String::from).collect();
        let expected = digest_of(&src, &t.table, &columns).await?;
        assert_eq!(expected.rows, t.rows, "{}", t.table);
        assert_eq!(recorded, expected.hex(), "source digest of {}", t.table);
        // What landed in production, read back: the same rows.
        assert_eq!(
            text_digest_of(&dst, &t.table, &columns).await?,
            text_digest_of(&src, &t.table, &columns).await?,
            "live table {} after the swap",
            t.table
        );
        if t.rows > 0 {
            with_rows += 1;
        }
    }
    assert!(
        with_rows >= 3,
        "the fixture must have data: {:?}",
        report.tables
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_digests_add_up_and_a_changed_row_changes_the_digest() -> anyhow::Result<()> {
    let p = common::pair("verify_ranges").await;
    p.source
        .batch(
            "CREATE TABLE readings (id bigint PRIMARY KEY, at timestamptz NOT NULL, v float8, tags text[], doc jsonb);
             INSERT INTO readings SELECT g, timestamptz '2026-01-01' + g * interval '1 minute', g / 7.0,
                    ARRAY['a' || g % 5, 'b'], jsonb_build_object('g', g, 's', repeat('x', g % 40))
               FROM generate_series(1, 20000) g;
             ANALYZE readings;",
        )
        .await?;
    let mut opts = common::options(&p);
    // About 16 pages per range: the table is copied as dozens of ranges, in any order.
    opts.range_bytes = 128 * 1024;
    let report = common::run(opts).await?;
    let t = &report.tables[0];
    assert!(t.rows == 20000, "{t:?}");
    let src = p.source.connect().await?;
    let columns: Vec<String> = ["id", "at", "v", "tags", "doc"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let whole = digest_of(&src, "readings", &columns).await?;
    assert_eq!(t.digest.as_deref(), Some(whole.hex().as_str()));
    let ranges: i64 = p
        .dest
        .connect()
        .await?
        .query_one(
            "SELECT count(*) FROM pgzm.copy_progress WHERE migration_id = $1 AND digest IS NOT NULL",
            &[&report.migration_id],
        )
        .await?
        .get(0);
    assert!(ranges > 5, "expected many ranges, got {ranges}");

    // One changed value changes the digest; the count alone would not notice.
    src.batch_execute("UPDATE readings SET v = v + 1 WHERE id = 12345")
        .await?;
    let changed = digest_of(&src, "readings", &columns).await?;
    assert_eq!(changed.rows, whole.rows);
    assert_ne!(changed, whole);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_verification_no_digest_is_recorded() -> anyhow::Result<()> {
    let p = common::fixture_pair("verify_off", "simple").await;
    let mut opts = common::options(&p);
    opts.verify = false;
    let report = common::run(opts).await?;
    assert!(report.rows > 0);
    assert!(
        report.tables.iter().all(|t| t.digest.is_none()),
        "{:?}",
        report.tables
    );
    Ok(())
}

/// A source table truncated after the run's snapshot reads empty in that snapshot (TRUNCATE is
/// not MVCC-safe), and the copy's digests agree with the empty read: the run must notice
/// (its storage is no longer the one recorded at the plan), refuse, and leave production and
/// nothing of its own behind. The copy is throttled so the truncation lands while it runs, on a
/// small table the one copy job has not reached (tables go largest first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_table_truncated_during_the_copy_fails_the_run() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let p = common::pair("src_truncated").await;
    let schema = "CREATE TABLE big (id int PRIMARY KEY, body text);
                  CREATE TABLE small (id int PRIMARY KEY, v int);";
    p.source
        .batch(&format!(
            "{schema}
             INSERT INTO big SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 6000) g;
             INSERT INTO small SELECT g, g FROM generate_series(1, 50) g;
             ANALYZE"
        ))
        .await?;
    p.dest
        .batch(&format!(
            "{schema} INSERT INTO small SELECT g, -g FROM generate_series(1, 7) g;"
        ))
        .await?;
    let mut opts = common::options(&p);
    opts.jobs = 1;
    // About 6 s of copy for `big`.
    opts.max_rate = Some(300 << 10);
    let run = tokio::spawn(common::run(opts));

    // Once `big`'s copy runs (its task holds the snapshot), `small` is truncated on the source.
    let src = p.source.connect().await?;
    let src_db = p.source.name().to_string();
    let started = Instant::now();
    loop {
        // This run's agent only: the shared servers run other tests' copies meanwhile.
        let copying: i64 = src
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
                   AND application_name LIKE 'pgzm-agent%' AND query ILIKE 'COPY%big%'",
                &[&src_db],
            )
            .await?
            .get(0);
        if copying > 0 {
            break;
        }
        assert!(!run.is_finished(), "the run ended before the copy was seen");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the copy never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    src.batch_execute("TRUNCATE small").await?;

    let err = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the run ends")
        .expect("join")
        .expect_err("a run that copied a truncated table must fail");
    let message = err.to_string();
    assert!(
        message.contains("source table public.small was truncated"),
        "{message}"
    );
    // Production untouched, nothing of the run left.
    let dst = p.dest.connect().await?;
    let live: i64 = dst
        .query_one("SELECT count(*) FROM small WHERE v < 0", &[])
        .await?
        .get(0);
    assert_eq!(live, 7, "the live table changed");
    let leftovers: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow\\_%' OR relname LIKE 'backup\\_%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(leftovers, 0, "the run left shadow or backup objects");
    Ok(())
}
