//! Generated hostile names through a whole migration and its rollback, on real servers.
//!
//! Each case builds, in a schema (`public` or one of a generated name, migrated with
//! `--schema`), two related tables, a column, an index, and in `public` a destination-only view
//! over them, whose names come from a generator of what real schemas hold: upper case, spaces, quotes, dots,
//! semicolons, keywords, multi-byte characters, names near PostgreSQL's 63-byte limit (where
//! `shadow_`/`backup_` names must be shortened and PostgreSQL shortens the names it chooses
//! for keys and sequences), and names that look like pgzm's own. The migration must bring the
//! source's rows in with working sequences and the view re-pointed; the rollback must restore
//! the destination's rows, view and relation names exactly; a second migration and `cleanup`
//! must leave the source's rows and no backup set.
//!
//! The cases come from a fixed seed, so a run is reproducible; `PGZM_PROPTEST_CASES` asks for
//! more of them.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{ensure, Context};
use pgzm_coordinator::rollback::{rollback, RollbackOptions};
use pgzm_tests::quote_ident;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use tokio_postgres::Client;

use crate::checks;
use crate::common::{self, dest_url, locks};

/// The names of one case.
#[derive(Debug, Clone)]
struct Names {
    schema: String,
    parent: String,
    child: String,
    column: String,
    index: String,
    view: String,
}

fn hostile_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Z][A-Za-z0-9 ]{0,16}",
        "[a-z]{1,4}[\"'.;$ -][a-z]{0,4}[\"'.;$ -]{0,2}",
        "[a-zé日本ß]{1,16}",
        "[a-z]{52,63}",
        "[é]{26,31}[a-z]{0,1}",
        prop::sample::select(vec!["user", "select", "order", "shadow_x", "backup_x"])
            .prop_map(String::from),
        "[a-z_][a-z0-9_]{0,12}",
        // Dollar quotes, backslashes, line breaks and tabs.
        "[a-z]{1,3}(\\$\\$|\\$[a-z]*\\$|\\\\|\n|\t)[a-z]{0,3}",
    ]
    .prop_filter("an identifier of 1 to 63 bytes", |n| {
        !n.is_empty() && n.len() <= 63
    })
}

fn names() -> impl Strategy<Value = Names> {
    (
        prop_oneof![
            Just("public".to_string()),
            hostile_name().prop_filter("not a system schema nor pgzm's", |s| {
                !s.starts_with("pg_") && s != "pgzm" && s != "information_schema"
            })
        ],
        hostile_name(),
        hostile_name(),
        hostile_name(),
        hostile_name(),
        hostile_name(),
    )
        .prop_map(|(schema, parent, child, column, index, view)| Names {
            schema,
            parent,
            child,
            column,
            index,
            view,
        })
        .prop_filter("distinct names, none like a name PostgreSQL picks", |n| {
            let all = [&n.parent, &n.child, &n.index, &n.view, &n.schema];
            let distinct: BTreeSet<&String> = all.iter().copied().collect();
            distinct.len() == all.len()
                && n.column != "id"
                && n.column != "ref"
                && all
                    .iter()
                    .all(|x| !x.ends_with("_pkey") && !x.ends_with("_seq") && !x.ends_with("_fkey"))
        })
}

/// The tables, index and data of one side.
fn schema_sql(n: &Names, rows: i32, label: &str) -> String {
    let (p, c, col, idx) = (
        n.qualified(&n.parent),
        n.qualified(&n.child),
        quote_ident(&n.column),
        quote_ident(&n.index),
    );
    format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE {p} (id serial PRIMARY KEY, {col} text NOT NULL);
         CREATE TABLE {c} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                           ref int REFERENCES {p} (id), {col} text);
         CREATE INDEX {idx} ON {c} ({col});
         INSERT INTO {p} ({col}) SELECT '{label} ' || g FROM generate_series(1, {rows}) g;
         INSERT INTO {c} (ref, {col}) SELECT g, '{label} ' || g FROM generate_series(1, {rows}) g;",
        s = quote_ident(&n.schema)
    )
}

impl Names {
    /// `name` in the case's schema, quoted.
    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(name))
    }

    /// The case's schemas: where the tables are, and `public` (the view).
    fn schemas(&self) -> Vec<&str> {
        let mut out = vec!["public"];
        if self.schema != "public" {
            out.push(&self.schema);
        }
        out
    }
}

/// Every relation of the case's schemas, as `schema name`.
async fn relation_names(c: &Client, n: &Names) -> BTreeSet<String> {
    let schemas: Vec<String> = n.schemas().iter().map(|s| s.to_string()).collect();
    c.query(
        "SELECT n.nspname::text || ' ' || c.relname::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = ANY($1) ORDER BY 1",
        &[&schemas],
    )
    .await
    .expect("relation names")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The case's tables' checksums.
async fn sums(
    c: &Client,
    n: &Names,
) -> std::collections::BTreeMap<String, pgzm_tests::inspect::TableChecksum> {
    checks::schema_sums(c, &n.schemas()).await
}

async fn count(c: &Client, relation: &str) -> anyhow::Result<i64> {
    Ok(c.query_one(
        &format!("SELECT count(*) FROM public.{}", quote_ident(relation)),
        &[],
    )
    .await
    .with_context(|| format!("count {relation:?}"))?
    .get(0))
}

static CASE: AtomicUsize = AtomicUsize::new(0);

async fn migrate_and_roll_back(n: Names) -> anyhow::Result<()> {
    let case = CASE.fetch_add(1, Ordering::Relaxed);
    let p = common::pair(&format!("hostile_{case}")).await;
    p.source.batch(&schema_sql(&n, 5, "src")).await?;
    p.dest.batch(&schema_sql(&n, 3, "dst")).await?;
    p.dest
        .batch(&format!(
            "CREATE VIEW public.{v} AS SELECT a.{col}, b.id FROM {p} a JOIN {c} b ON b.ref = a.id",
            v = quote_ident(&n.view),
            col = quote_ident(&n.column),
            p = n.qualified(&n.parent),
            c = n.qualified(&n.child),
        ))
        .await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let before_names = relation_names(&dst, &n).await;
    let before = sums(&dst, &n).await;
    let mut opts = common::options(&p);
    opts.schemas = vec![n.schema.clone()];

    common::run(opts.clone()).await.context("migrate")?;
    ensure!(
        sums(&dst, &n).await == sums(&src, &n).await,
        "the live tables hold the source's rows"
    );
    ensure!(
        count(&dst, &n.view).await? == 5,
        "the view reads the new tables"
    );
    let id: i32 = dst
        .query_one(
            &format!(
                "INSERT INTO {} ({}) VALUES ('new') RETURNING id",
                n.qualified(&n.parent),
                quote_ident(&n.column)
            ),
            &[],
        )
        .await
        .context("insert after the swap")?
        .get(0);
    ensure!(
        id > 5,
        "the serial sequence continues after the source's rows ({id})"
    );

    let report = rollback(RollbackOptions {
        destination: dest_url(&p),
        migration_id: None,
        keep_tables: Vec::new(),
        dry_run: false,
        locks: locks(),
    })
    .await
    .context("rollback")?;
    ensure!(report.warnings.is_empty(), "{:?}", report.warnings);
    ensure!(
        sums(&dst, &n).await == before,
        "the rollback restores the destination's rows"
    );
    ensure!(
        count(&dst, &n.view).await? == 3,
        "the view reads the restored tables"
    );
    ensure!(
        relation_names(&dst, &n).await == before_names,
        "the rollback leaves exactly the relations the destination had"
    );

    common::run(opts).await.context("migrate again")?;
    let cleaned = pgzm_coordinator::backup::cleanup(&dest_url(&p), i64::MAX, false)
        .await
        .context("cleanup")?;
    ensure!(cleaned.backup_sets.len() == 1, "{cleaned:?}");
    ensure!(
        sums(&dst, &n).await == sums(&src, &n).await,
        "the second migration holds the source's rows"
    );
    ensure!(
        count(&dst, &n.view).await? == 5,
        "the view reads the new tables"
    );
    let mut expected = before_names.clone();
    expected.extend(relation_names(&src, &n).await);
    ensure!(
        relation_names(&dst, &n).await == expected,
        "after cleanup only the live relations remain: {:?}",
        relation_names(&dst, &n)
            .await
            .symmetric_difference(&expected)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// See the module documentation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_names_migrate_and_roll_back() {
    let cases = std::env::var("PGZM_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let config = Config {
        cases,
        max_shrink_iters: 32,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha));
    let handle = tokio::runtime::Handle::current();
    let failure = tokio::task::block_in_place(|| {
        runner
            .run(&names(), |n| {
                handle
                    .block_on(migrate_and_roll_back(n))
                    .map_err(|e| TestCaseError::fail(format!("{e:#}")))
            })
            .err()
            .map(|e| e.to_string())
    });
    if let Some(failure) = failure {
        panic!("{failure}");
    }
}
