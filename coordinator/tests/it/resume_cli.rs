//! `--resume` on a realistic schema (Pagila: a partitioned table, a materialized view over the
//! tables, triggers, a preserved table kept current by the sync triggers), through the real
//! binary: a run killed with `kill -9` in the middle of its copy, and a run killed after its
//! last build whose source then changed in one partition.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgzm_tests::inspect::{self, TableChecksum};
use pgzm_tests::TestDb;
use serde_json::Value;
use support::{one_json, pgzm_command, query_i64, text, WorkDir};
use tokio::process::Command;

use crate::support;

/// Longest any wait in these tests may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The preserved table: the destination's rows survive the migration.
const PRESERVED: &str = "language";

/// Pagila on both sides ("production"), with the rebuilt data set's changes on the source.
async fn pagila_pair(label: &str) -> (TestDb, TestDb) {
    let (src, dst) = pgzm_tests::PgCluster::shared_pair();
    let source = TestDb::create(src, &format!("{label}_src"))
        .await
        .expect("create source");
    let dest = TestDb::create(dst, &format!("{label}_dst"))
        .await
        .expect("create destination");
    for db in [&source, &dest] {
        for f in ["schema.sql", "data.sql"] {
            db.load_fixture(&format!("pagila/{f}"))
                .await
                .unwrap_or_else(|e| panic!("load pagila/{f}: {e}"));
        }
    }
    source
        .load_fixture("pagila/source_changes.sql")
        .await
        .expect("load pagila/source_changes.sql");
    (source, dest)
}

fn pgzm(dir: &WorkDir) -> Command {
    pgzm_command(dir)
}

/// Checksums of the tables in `public`, without the `shadow_` and `backup_` sets.
async fn live_sums(db: &TestDb) -> BTreeMap<String, TableChecksum> {
    let c = db.connect().await.expect("connect");
    let mut sums = inspect::table_checksums(&c).await.expect("checksums");
    sums.retain(|t, _| !t.starts_with("backup_") && !t.starts_with("shadow_"));
    sums
}

/// The materialized view's rows, in order, as text.
async fn matview_rows(db: &TestDb) -> String {
    let c = db.connect().await.expect("connect");
    c.query_one(
        "SELECT string_agg(r::text, '|' ORDER BY r::text) FROM public.rental_by_category r",
        &[],
    )
    .await
    .expect("read rental_by_category")
    .get(0)
}

/// Relations and types whose name starts with `shadow_` (any schema).
async fn shadow_objects(db: &TestDb) -> i64 {
    let c = db.connect().await.expect("connect");
    query_i64(
        &c,
        "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow\\_%')
              + (SELECT count(*) FROM pg_type WHERE typname LIKE 'shadow\\_%' OR typname LIKE '\\_shadow\\_%')",
    )
    .await
}

/// The tables of a `resumed` list (`kept`) or of its entries (`redone`, `rebuilt`), with
/// reasons.
fn resumed(doc: &Value, list: &str) -> BTreeMap<String, String> {
    doc["resumed"][list]
        .as_array()
        .unwrap_or_else(|| panic!("resumed.{list}: {doc}"))
        .iter()
        .map(|t| match t.as_str() {
            Some(name) => (name.to_string(), String::new()),
            None => (
                t["table"].as_str().unwrap_or_default().to_string(),
                t["reason"].as_str().unwrap_or_default().to_string(),
            ),
        })
        .collect()
}

/// The migration result: every table but the preserved one equals the source; the preserved
/// one holds the destination's rows as they were just before the swap (`preserved`); the
/// materialized view is computed over the new tables; the schema is the source's; no shadow
/// object is left.
async fn assert_migrated(source: &TestDb, dest: &TestDb, preserved: &TableChecksum) {
    let mut expected = live_sums(source).await;
    let mut live = live_sums(dest).await;
    assert_eq!(live.remove(PRESERVED).as_ref(), Some(preserved));
    expected.remove(PRESERVED);
    assert_eq!(live, expected);
    assert_eq!(matview_rows(dest).await, matview_rows(source).await);
    let (s, d) = (
        source.connect().await.expect("connect"),
        dest.connect().await.expect("connect"),
    );
    let differences = inspect::catalog_signature(&d, None)
        .await
        .expect("signature")
        .differences(
            &inspect::catalog_signature(&s, None)
                .await
                .expect("signature"),
        );
    assert_eq!(differences, Vec::<String>::new());
    assert_eq!(shadow_objects(dest).await, 0);
}

/// A mirrored write to the preserved table: its row 1's name changes (the live table's
/// trigger stamps `last_update`) and a row is added.
async fn write_preserved(dest: &TestDb, name: &str) -> TableChecksum {
    dest.batch(&format!(
        "UPDATE public.language SET name = '{name}' WHERE language_id = 1;
         INSERT INTO public.language (name) VALUES ('{name} 2')"
    ))
    .await
    .expect("write to language");
    live_sums(dest).await.remove(PRESERVED).expect("language")
}

/// `kill -9` in the middle of the copy (every table copied and built but one, whose copy waits
/// on a lock in the source), after the preserved table's sync was set up: then a write
/// to the preserved table (mirrored by the sync triggers, which outlive the process), a change
/// to `actor` in the source, and changes the statistics do not count to `category` (an
/// update) and `film_category` (a deletion). `--resume` keeps the partitions and the
/// preserved table, copies the unfinished table and the three changed ones again, builds the partitioned `payment`
/// and the materialized view, and the result is the migration that a run without the kill
/// makes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_with_partitions_a_preserved_table_and_a_matview() {
    let (source, dest) = pagila_pair("resume_pagila_kill").await;
    let dir = WorkDir::new("resume_pagila_kill");
    let src = source.connect().await.expect("connect source");
    // Every plain table but the preserved one is copied and built by its own task.
    let tasks: i64 = query_i64(
        &src,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' AND relname <> 'language'",
    )
    .await
        + 1;
    // A table whose copy waits on a lock (one without defaults: reading a default's expression
    // takes a lock too, and the plan would wait).
    for db in [&source, &dest] {
        db.batch(
            "CREATE TABLE public.ledger (id int PRIMARY KEY, entry text NOT NULL);
             INSERT INTO public.ledger SELECT g, 'entry ' || g FROM generate_series(1, 500) g",
        )
        .await
        .expect("create ledger");
    }
    let blocker = source.connect().await.expect("connect blocker");
    blocker
        .batch_execute("BEGIN; LOCK TABLE public.ledger IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock ledger");
    let mut child = pgzm(&dir)
        .args(["start", "--jobs", "2", "--preserved-tables", PRESERVED])
        .args(["--source", &source.url(), "--dest", &dest.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgzm");
    let dst = dest.connect().await.expect("connect dest");
    let started = Instant::now();
    loop {
        let built = query_i64(
            &dst,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgzm' AND tablename = 'copy_progress'",
        )
        .await;
        let built = if built == 0 {
            0
        } else {
            query_i64(
                &dst,
                "SELECT count(*) FROM pgzm.copy_progress WHERE left(task_key, 6) = 'built:'",
            )
            .await
        };
        if built == tasks - 1 {
            break;
        }
        if child.try_wait().expect("poll").is_some() {
            let out = child.wait_with_output().await.expect("output");
            panic!("pgzm ended before the kill: {}", text(&out.stderr));
        }
        assert!(started.elapsed() < DEADLINE, "no progress ({built} built)");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.expect("kill -9 pgzm");
    blocker
        .batch_execute("ROLLBACK")
        .await
        .expect("unlock ledger");

    let preserved = write_preserved(&dest, "Night shift").await;
    source
        .batch("UPDATE public.actor SET first_name = 'RESUMED' WHERE actor_id = 7")
        .await
        .expect("change actor");
    // Changes the statistics do not count (as they would not yet, shortly after a write):
    // found by reading the tables in the new snapshot.
    source
        .batch(
            "SET track_counts = off;
             UPDATE public.category SET name = 'Anime!' WHERE name = 'Anime';
             DELETE FROM public.film_category WHERE film_id = (SELECT max(film_id) FROM public.film_category);
             REFRESH MATERIALIZED VIEW public.rental_by_category",
        )
        .await
        .expect("change category and film_category, uncounted");

    let out = pgzm(&dir)
        .args(["start", "--resume", "--json", "--jobs", "2"])
        .args(["--preserved-tables", PRESERVED])
        .args(["--source", &source.url(), "--dest", &dest.url()])
        .output()
        .await
        .expect("run pgzm");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = one_json("start --resume", &text(&out.stdout));
    let redone = resumed(&doc, "redone");
    assert_eq!(
        redone.keys().map(String::as_str).collect::<Vec<_>>(),
        ["actor", "category", "film_category", "ledger"],
        "{doc}"
    );
    assert!(
        redone["category"].contains("changed in the source"),
        "{doc}"
    );
    assert!(
        redone["film_category"].contains("changed in the source"),
        "{doc}"
    );
    assert!(redone["ledger"].contains("had not finished"), "{doc}");
    assert!(redone["actor"].contains("changed in the source"), "{doc}");
    let rebuilt = resumed(&doc, "rebuilt");
    assert_eq!(
        rebuilt.keys().map(String::as_str).collect::<Vec<_>>(),
        ["payment"],
        "the partitioned table was not built: {doc}"
    );
    let kept = resumed(&doc, "kept");
    assert!(kept.contains_key(PRESERVED), "{doc}");
    assert!(kept.contains_key("payment_p2022_03"), "{doc}");
    assert_eq!(
        kept.len() + redone.len() + rebuilt.len(),
        usize::try_from(tasks).expect("count") + 2,
        "every table (and the preserved and partitioned ones) accounted for: {doc}"
    );
    assert_eq!(
        doc["tables"].as_array().map(Vec::len),
        Some(4),
        "only the redone tables are copied: {doc}"
    );
    assert_migrated(&source, &dest, &preserved).await;
}

/// A run killed after its last build, before it recorded itself prepared (simulated: the
/// prepared run is marked as still preparing), whose source then changed in one partition of
/// `payment`: `--resume` copies that partition again and builds the partitioned table and its
/// other partitions again over the rows they keep (the partitioned table's indexes include
/// every partition's); the preserved table and every other table are kept, and the
/// materialized view is built again. The swap then gives the migration of the changed source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_builds_its_partitioned_table_again() {
    let (source, dest) = pagila_pair("resume_pagila_tree").await;
    let dir = WorkDir::new("resume_pagila_tree");
    let prepare = |resume: bool| {
        let mut cmd = pgzm(&dir);
        cmd.args(["prepare", "--json", "--jobs", "2"])
            .args(["--preserved-tables", PRESERVED])
            .args(["--source", &source.url(), "--dest", &dest.url()]);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let out = prepare(false).output().await.expect("run pgzm");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dst = dest.connect().await.expect("connect dest");
    dst.batch_execute("UPDATE pgzm.migrations SET status = 'preparing' WHERE status = 'prepared'")
        .await
        .expect("mark the run unfinished");
    source
        .batch(
            "DELETE FROM public.payment_p2022_03 WHERE payment_id = (SELECT min(payment_id) FROM public.payment_p2022_03);
             REFRESH MATERIALIZED VIEW public.rental_by_category",
        )
        .await
        .expect("change a partition");

    let out = prepare(true).output().await.expect("run pgzm");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = one_json("prepare --resume", &text(&out.stdout));
    let redone = resumed(&doc, "redone");
    assert_eq!(
        redone.keys().map(String::as_str).collect::<Vec<_>>(),
        ["payment_p2022_03"],
        "{doc}"
    );
    let rebuilt = resumed(&doc, "rebuilt");
    let mut expected: Vec<String> = (1..=7)
        .filter(|m| *m != 3)
        .map(|m| format!("payment_p2022_0{m}"))
        .collect();
    expected.insert(0, "payment".into());
    assert_eq!(
        rebuilt.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{doc}"
    );
    assert!(
        rebuilt["payment_p2022_01"].contains("partitioned table is built again"),
        "{doc}"
    );
    let kept = resumed(&doc, "kept");
    assert!(
        kept.contains_key(PRESERVED) && kept.contains_key("film"),
        "{doc}"
    );
    assert_eq!(doc["tables"].as_array().map(Vec::len), Some(1), "{doc}");

    // The sync triggers still mirror writes; the swap ends the run.
    let preserved = write_preserved(&dest, "After resume").await;
    let c = dest.connect().await.unwrap();
    for q in ["SELECT string_agg(staff_id::text || ':' || email, ',') FROM shadow_staff", "SELECT string_agg(staff_id::text || ':' || email, ',') FROM staff", "SELECT string_agg(message, ',') FROM pgzm.sync_errors", "SELECT string_agg(DISTINCT staff_id::text, ',') FROM shadow_rental", "SELECT string_agg(conname || ' ' || convalidated::text, ',') FROM pg_constraint WHERE conrelid = 'shadow_rental'::regclass"] {
        let r: Option<String> = c.query_one(q, &[]).await.unwrap().get(0);
        eprintln!("Q {q}: {r:?}");
    }
    let out = pgzm(&dir)
        .args(["swap", "--dest", &dest.url()])
        .output()
        .await
        .expect("run pgzm swap");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_migrated(&source, &dest, &preserved).await;
}
