//! Table filters (`--table`, `--exclude-table`, `--exclude-table-data`) on Pagila: what is left
//! out stays exactly as it was, keeps working against the new tables, and comes back with the
//! rollback; mistakes are refused before anything changes.

use std::collections::BTreeMap;

use pgzm_coordinator::filter::TableFilter;
use pgzm_coordinator::rollback::{rollback, RollbackOptions};
use pgzm_coordinator::CoordinatorError;
use tokio_postgres::Client;

use crate::checks::{self, int, live_sums};
use crate::common::{self, dest_url, locks};

fn filter(include: &[&str], exclude: &[&str], exclude_data: &[&str]) -> TableFilter {
    let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    TableFilter::parse(&own(include), &own(exclude), &own(exclude_data)).expect("patterns")
}

async fn oid(c: &Client, table: &str) -> i64 {
    int(c, &format!("SELECT 'public.{table}'::regclass::oid::int8")).await
}

/// The live table a foreign key of `table` named `name` references.
async fn referenced(c: &Client, table: &str, name: &str) -> i64 {
    int(
        c,
        &format!(
            "SELECT confrelid::int8 FROM pg_constraint WHERE conrelid = 'public.{table}'::regclass AND conname = '{name}'"
        ),
    )
    .await
}

fn only(
    sums: &BTreeMap<String, pgzm_tests::inspect::TableChecksum>,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<&str, &pgzm_tests::inspect::TableChecksum> {
    sums.iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, s)| (n.as_str(), s))
        .collect()
}

/// `--exclude-table 'payment*'` leaves the partitioned payments (parent and partitions) live,
/// with their rows and oids, their foreign keys re-pointed at the new customer, rental and
/// staff; `--exclude-table-data film_category` brings that table in empty; `--exclude-table
/// language` keeps the live languages, which the new films reference. The rollback restores
/// the rest and leaves the excluded tables as they were.
#[tokio::test]
async fn excluded_tables_stay_live_and_follow_the_new_tables() -> anyhow::Result<()> {
    let p = common::sample_pair("filters_exclude", "pagila").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let left_out = |n: &str| n.starts_with("payment") || n == "language";
    let source_sums = live_sums(&src).await;
    let before = live_sums(&dst).await;
    let payment_oid = oid(&dst, "payment_p2022_01").await;
    let language_oid = oid(&dst, "language").await;

    let mut opts = common::options(&p);
    opts.tables = filter(&[], &["payment*", "LANGUAGE"], &["film_category"]);
    let report = common::run(opts).await?;
    assert!(report.swap.is_some());
    let mut excluded: Vec<String> = report
        .plan
        .excluded
        .iter()
        .map(|t| t.display_name())
        .collect();
    excluded.sort();
    assert_eq!(
        excluded,
        [
            "language",
            "payment",
            "payment_p2022_01",
            "payment_p2022_02",
            "payment_p2022_03",
            "payment_p2022_04",
            "payment_p2022_05",
            "payment_p2022_06",
            "payment_p2022_07"
        ]
    );
    assert!(
        !report
            .plan
            .table(&pgzm_coordinator::naming::QualName::public("film_category"))
            .expect("planned")
            .copy_data
    );

    let after = live_sums(&dst).await;
    assert_eq!(
        only(&after, left_out),
        only(&before, left_out),
        "left-out tables keep their rows"
    );
    assert_eq!(
        only(&after, |n| !left_out(n) && n != "film_category"),
        only(&source_sums, |n| !left_out(n) && n != "film_category"),
        "the others hold the source's rows"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM film_category").await, 0);
    assert_eq!(oid(&dst, "payment_p2022_01").await, payment_oid);
    assert_eq!(oid(&dst, "language").await, language_oid);
    assert_eq!(
        referenced(&dst, "payment_p2022_01", "payment_p2022_01_rental_id_fkey").await,
        oid(&dst, "rental").await,
        "a left-out table's key follows the new table"
    );
    assert_eq!(
        referenced(&dst, "film", "film_language_id_fkey").await,
        language_oid,
        "a new table's key references the live left-out table"
    );
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND NOT convalidated"
        )
        .await,
        0,
        "every foreign key is validated"
    );

    let r = rollback(RollbackOptions {
        destination: dest_url(&p),
        migration_id: None,
        keep_tables: Vec::new(),
        dry_run: false,
        locks: locks(),
    })
    .await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(
        live_sums(&dst).await,
        before,
        "the rollback restores everything"
    );
    assert_eq!(oid(&dst, "payment_p2022_01").await, payment_oid);
    assert_eq!(
        referenced(&dst, "payment_p2022_01", "payment_p2022_01_rental_id_fkey").await,
        oid(&dst, "rental").await
    );
    Ok(())
}

/// `--table` keeps only the matching tables (pg_dump's patterns, quoted and unquoted).
#[tokio::test]
async fn only_included_tables_are_migrated() -> anyhow::Result<()> {
    let p = common::sample_pair("filters_include", "pagila").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let chosen = |n: &str| n.starts_with("film") || ["actor", "language", "category"].contains(&n);
    let source_sums = live_sums(&src).await;
    let before = live_sums(&dst).await;

    let mut opts = common::options(&p);
    opts.tables = filter(
        &["film*", "public.\"actor\"", "lang?age", "CATEG*"],
        &[],
        &[],
    );
    let report = common::run(opts).await?;
    let mut planned: Vec<&str> = report.plan.tables.iter().map(|t| t.name.as_str()).collect();
    planned.sort();
    assert_eq!(
        planned,
        [
            "actor",
            "category",
            "film",
            "film_actor",
            "film_category",
            "language"
        ]
    );
    let after = live_sums(&dst).await;
    assert_eq!(only(&after, chosen), only(&source_sums, chosen));
    assert_eq!(
        only(&after, |n| !chosen(n)),
        only(&before, |n| !chosen(n)),
        "tables not chosen keep their rows"
    );
    assert_eq!(
        referenced(&dst, "inventory", "inventory_film_id_fkey").await,
        oid(&dst, "film").await,
        "a key of a table not chosen follows the new table"
    );
    Ok(())
}

/// A pattern that matches nothing, a partition tree split by the filters, a preserved table
/// left out and a malformed pattern are refused before any change; a foreign table is refused
/// unless the filters leave it out.
#[tokio::test]
async fn filter_mistakes_are_refused_before_any_change() -> anyhow::Result<()> {
    let p = common::sample_pair("filters_refused", "pagila").await;
    // A foreign table pgzm cannot migrate: refused, unless the filters leave it out.
    p.source
        .batch(
            "CREATE FOREIGN DATA WRAPPER pgzm_test_fdw;
             CREATE SERVER pgzm_test_server FOREIGN DATA WRAPPER pgzm_test_fdw;
             CREATE FOREIGN TABLE public.remote_rates (day date, rate numeric) SERVER pgzm_test_server;",
        )
        .await?;
    let dst = p.dest.connect().await?;
    let before = live_sums(&dst).await;
    let mut dry = common::options(&p);
    dry.dry_run = true;
    let err = common::run(dry.clone()).await.expect_err("a foreign table");
    assert!(
        err.to_string()
            .contains("foreign table public.remote_rates"),
        "{err}"
    );
    dry.tables = filter(&[], &["remote_rates"], &[]);
    let planned = common::run(dry).await?;
    assert_eq!(
        planned.plan.excluded,
        [pgzm_coordinator::naming::QualName::public("remote_rates")]
    );
    for (f, preserved, expected) in [
        (
            filter(&[], &["paymnet*", "remote_rates"], &[]),
            vec![],
            "match no table",
        ),
        (
            filter(&[], &["Payment", "remote_rates"], &[]),
            vec![],
            "whole partition",
        ),
        (
            filter(&[], &["customer", "remote_rates"], &[]),
            vec!["customer".to_string()],
            "left out by the table filters",
        ),
    ] {
        let mut opts = common::options(&p);
        opts.tables = f;
        opts.preserved = preserved;
        let err = common::run(opts).await.expect_err(expected);
        assert!(
            matches!(err, CoordinatorError::Refused(_)) && err.to_string().contains(expected),
            "{expected}: {err}"
        );
    }
    // The source has a category the destination lacks: a new film_category row referencing
    // it cannot be checked against the live categories; the run stops before the swap.
    let mut opts = common::options(&p);
    opts.tables = filter(&[], &["category", "remote_rates"], &[]);
    let err = common::run(opts)
        .await
        .expect_err("key into a left-out table");
    assert!(
        err.to_string()
            .contains("which the table filters leave out"),
        "{err}"
    );
    assert!(TableFilter::parse(&["\"open".into()], &[], &[]).is_err());
    assert_eq!(live_sums(&dst).await, before);
    assert_eq!(
        checks::texts(
            &dst,
            "SELECT relname::text FROM pg_class WHERE relname LIKE 'shadow%' OR relname LIKE 'backup%'"
        )
        .await,
        Vec::<String>::new()
    );
    Ok(())
}

/// `pgzm status` of a prepared Pagila run (partitioned payments, a table without rows) finds
/// nothing wrong: a partitioned parent's rows are its partitions' (each checked), and a table
/// migrated without rows is expected empty.
#[tokio::test]
async fn status_of_a_prepared_run_with_partitions_and_empty_tables_is_clean() -> anyhow::Result<()>
{
    let p = common::sample_pair("filters_status", "pagila").await;
    let mut opts = common::options(&p);
    opts.tables = filter(&[], &[], &["film_category"]);
    common::prepare_and_release(&opts).await?;
    let st = common::status(&p).await;
    assert!(st.problems.is_empty(), "{:?}", st.problems);
    assert_eq!(st.state, "prepared", "{st:?}");
    Ok(())
}
