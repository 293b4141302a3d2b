//! The rollback at scale (issue 19): under its locks it only renames — the migration's tables,
//! indexes, sequences and types move aside (`rolledback_<id>_…`), nothing is dropped and no
//! procedural block runs — and what it moved aside is recorded in the same transaction and
//! dropped after the commit in batches. A rollback interrupted after its commit leaves the
//! record, which `pgzm cleanup` (or the next `pgzm prepare` or `pgzm rollback`) finishes; a
//! name it needs that is taken, or a lock table too small for its transaction, makes it refuse
//! before any change.

use std::collections::BTreeMap;
use std::process::Command;

use crate::checks::{self, int, live_sums, signature, texts};
use crate::common::{self, dest_url};
use pgzm_coordinator::backup;
use pgzm_coordinator::conninfo::DbUrl;
use pgzm_coordinator::rollback::{rollback, rollback_leaving_aside, RollbackOptions};
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::inspect::TableChecksum;
use pgzm_tests::{PgCluster, TestDb};
use tokio_postgres::Client;

/// Every relation, type and routine (any schema) whose name starts with `rolledback_`
/// (compared with `left()`, not `LIKE`), and the rows of pgzm's record of them.
async fn aside_objects(client: &Client) -> Vec<String> {
    texts(
        client,
        "SELECT 'relation ' || c.relname::text FROM pg_class c WHERE left(c.relname, 11) = 'rolledback_'
         UNION ALL
         SELECT 'type ' || t.typname::text FROM pg_type t
          WHERE left(t.typname, 11) = 'rolledback_' OR left(t.typname, 12) = '_rolledback_'
         UNION ALL
         SELECT 'routine ' || p.proname::text FROM pg_proc p WHERE left(p.proname, 11) = 'rolledback_'
         UNION ALL
         SELECT 'recorded ' || name FROM pgzm.rolled_back_objects
         ORDER BY 1",
    )
    .await
}

/// Live tables' checksums, the tables moved aside left out.
async fn live_without_aside(client: &Client) -> BTreeMap<String, TableChecksum> {
    live_sums(client)
        .await
        .into_iter()
        .filter(|(name, _)| !name.starts_with("rolledback_"))
        .collect()
}

/// The statements of the rollback's transaction from `LOCK TABLE` to `COMMIT` (the lock
/// window), and those before it.
fn window(statements: &[String]) -> (&[String], &[String]) {
    let lock = statements
        .iter()
        .position(|s| s.starts_with("LOCK TABLE"))
        .expect("the rollback locks tables");
    let commit = statements
        .iter()
        .position(|s| s == "COMMIT")
        .expect("the rollback commits");
    (&statements[..lock], &statements[lock..commit])
}

/// A rebuilt data set with a new table (a foreign key into a replaced one), a new sequence, and
/// an enum production also has (with one more label) and uses in a table of its own.
async fn changed_source(p: &common::Pair) {
    p.source
        .batch(
            r#"CREATE TYPE mood AS ENUM ('happy', 'sad', 'meh');
               CREATE TABLE "Tag" (id serial PRIMARY KEY,
                                   post_id int NOT NULL REFERENCES "Post"(id), m mood NOT NULL);
               INSERT INTO "Tag"(post_id, m) VALUES (101, 'meh'), (102, 'happy');"#,
        )
        .await
        .expect("change the source");
    p.dest
        .batch(
            r#"CREATE TYPE mood AS ENUM ('happy', 'sad');
               CREATE TABLE "Feeling" (id int PRIMARY KEY, user_id int REFERENCES "User"(id), m mood);
               INSERT INTO "Feeling" VALUES (1, 1, 'sad'), (2, 2, 'happy');"#,
        )
        .await
        .expect("change the destination");
}

/// (a) Under the rollback's locks nothing is dropped and no `DO` block runs; index and type
/// renames come before the `LOCK TABLE`; afterwards the live tables equal what the backup held
/// and nothing moved aside is left (nor recorded). Fails with a rollback that drops under its
/// locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_only_renames_under_its_locks_and_leaves_nothing_aside() -> anyhow::Result<()> {
    let p = common::fixture_pair("rb_aside", "simple").await;
    changed_source(&p).await;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let report = common::migrate(&p).await?;
    assert_ne!(live_sums(&dst).await, sums_before);
    let backups = checks::backup_sums(&dst).await;

    let r = rollback(common::rollback_options(&p)).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.dropped, ["Tag"]);
    let (before, under) = window(&r.statements);
    for s in under {
        for forbidden in [
            "DROP TABLE",
            "DROP TYPE",
            "DROP SEQUENCE",
            "DROP MATERIALIZED VIEW",
            "DO ",
            "ALTER INDEX",
            "ALTER TYPE",
        ] {
            assert!(!s.starts_with(forbidden), "under the rollback's locks: {s}");
        }
    }
    let id = report.migration_id;
    let aside = format!("rolledback_{id}_");
    for expected in [
        format!(r#"ALTER INDEX "public"."Post_pkey" RENAME TO "{aside}Post_pkey""#),
        r#"ALTER INDEX "public"."backup_Post_pkey" RENAME TO "Post_pkey""#.to_string(),
        format!(r#"ALTER TYPE "public"."mood" RENAME TO "{aside}mood""#),
        r#"ALTER TYPE "public"."backup_mood" RENAME TO "mood""#.to_string(),
    ] {
        assert!(before.contains(&expected), "{expected} before the locks");
    }
    assert!(
        before
            .iter()
            .any(|s| s.starts_with("INSERT INTO pgzm.rolled_back_objects")),
        "what goes aside is recorded in the transaction"
    );
    assert!(under.contains(&format!(
        r#"ALTER TABLE "public"."Tag" RENAME TO "{aside}Tag""#
    )));

    // The live tables are the backup's, the schema is production's, nothing is left aside.
    let after = live_sums(&dst).await;
    assert_eq!(after, sums_before);
    for (table, sum) in &backups {
        assert_eq!(after.get(table), Some(sum), "{table} is its backup");
    }
    checks::assert_same_signature(&signature(&dst).await, &sig_before, "after the rollback");
    assert_eq!(aside_objects(&dst).await, Vec::<String>::new());
    dst.batch_execute(r#"INSERT INTO "Feeling" VALUES (3, 1, 'happy')"#)
        .await?;
    assert!(backup::list(&dest_url(&p)).await?.is_empty());
    Ok(())
}

/// (b) A rollback interrupted right after its commit (the objects it moved aside are not
/// dropped yet): production already runs on the restored tables — a kept table's rows can be
/// deleted without touching the tables moved aside (their foreign keys into it went in the
/// transaction) — `status` names what is left, `cleanup --dry-run` lists it and `cleanup`
/// drops it; the same left by another rollback, the next `prepare` drops. Fails without the
/// record (nothing would find the tables moved aside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_interrupted_after_its_commit_is_finished_by_cleanup_and_prepare(
) -> anyhow::Result<()> {
    let p = common::fixture_pair("rb_crash", "simple").await;
    let dst = p.dest.connect().await?;
    let url = dest_url(&p);
    let before = live_sums(&dst).await;
    let first = common::migrate(&p).await?;
    let id = first.migration_id;
    let migrated_user = live_sums(&dst).await["User"].clone();

    let mut opts = common::rollback_options(&p);
    opts.keep_tables = vec!["User".into()];
    let r = rollback_leaving_aside(opts).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let aside = format!("rolledback_{id}_");
    let left = aside_objects(&dst).await;
    for table in ["Comment", "Post", "backup_User"] {
        assert!(
            left.contains(&format!("recorded {aside}{table}"))
                && left.contains(&format!("relation {aside}{table}")),
            "{table} moved aside and recorded: {left:?}"
        );
    }
    // Production runs on the restored tables (User kept), the backup set is consumed.
    let live = live_without_aside(&dst).await;
    assert_eq!(live["Post"], before["Post"]);
    assert_eq!(live["Comment"], before["Comment"]);
    assert_eq!(live["User"], migrated_user);
    assert!(backup::list(&url).await?.is_empty());
    let aside_posts = format!(r#"SELECT count(*) FROM "{aside}Post""#);
    let posts_aside = int(&dst, &aside_posts).await;
    assert!(posts_aside > 0);
    dst.batch_execute(
        r#"DELETE FROM "Comment"; DELETE FROM "Post"; DELETE FROM "User" WHERE id = 1"#,
    )
    .await?;
    assert_eq!(
        int(&dst, &aside_posts).await,
        posts_aside,
        "no foreign key from a table moved aside into the kept table is left"
    );
    let status = pgzm_coordinator::status::status(&url).await?;
    assert!(
        status
            .problems
            .iter()
            .any(|m| m.contains(&format!("rollback of migration {id}"))
                && m.contains("pgzm cleanup")),
        "{:?}",
        status.problems
    );

    // cleanup --dry-run lists them and changes nothing; cleanup drops them and says so.
    let dry = backup::cleanup(&url, 0, true).await?;
    assert!(dry.backup_sets.is_empty());
    for table in ["Comment", "Post", "backup_User"] {
        assert!(
            dry.objects.contains(&format!("table {aside}{table}")),
            "{:?}",
            dry.objects
        );
    }
    assert_eq!(aside_objects(&dst).await, left);
    let cleaned = backup::cleanup(&url, 0, false).await?;
    assert_eq!(cleaned.objects, dry.objects);
    assert_eq!(aside_objects(&dst).await, Vec::<String>::new());

    // Again, and this time the next prepare finishes it.
    let second = common::migrate(&p).await?;
    rollback_leaving_aside(common::rollback_options(&p)).await?;
    let left = aside_objects(&dst).await;
    assert!(
        left.contains(&format!("recorded rolledback_{}_Post", second.migration_id)),
        "{left:?}"
    );
    let third = common::migrate(&p).await?;
    assert!(
        third
            .cleaned_up
            .contains(&format!("table rolledback_{}_Post", second.migration_id)),
        "{:?}",
        third.cleaned_up
    );
    assert_eq!(aside_objects(&dst).await, Vec::<String>::new());
    let r = rollback(common::rollback_options(&p)).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(aside_objects(&dst).await, Vec::<String>::new());
    Ok(())
}

/// A name the rollback moves something aside to that is taken already: refused before any
/// change, in one line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_aside_name_is_refused_before_any_change() -> anyhow::Result<()> {
    let p = common::fixture_pair("rb_taken", "simple").await;
    let dst = p.dest.connect().await?;
    let report = common::migrate(&p).await?;
    let taken = format!("rolledback_{}_Post_pkey", report.migration_id);
    dst.batch_execute(&format!(r#"CREATE TABLE "{taken}" (x int)"#))
        .await?;
    let migrated = live_sums(&dst).await;
    let err = rollback(common::rollback_options(&p))
        .await
        .expect_err("the aside name is taken");
    assert!(matches!(err, CoordinatorError::Refused(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&taken) && text.contains("taken") && !text.contains('\n'),
        "{text}"
    );
    assert_eq!(live_sums(&dst).await, migrated);
    assert_eq!(backup::list(&dest_url(&p)).await?.len(), 1);
    dst.batch_execute(&format!(r#"DROP TABLE "{taken}""#))
        .await?;
    rollback(common::rollback_options(&p)).await?;
    Ok(())
}

/// (c) A rollback whose transaction needs more locks than the server's lock table holds
/// (`max_locks_per_transaction × (max_connections + max_prepared_transactions)`) is refused
/// before it takes any, saying what to raise; production is untouched. The migrated database
/// (many small tables, swapped on a server of the default size) is copied with pg_dump to a
/// server started with a small lock table. Fails without the check (the transaction would run
/// and fail with "out of shared memory", or fit only by luck).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_the_lock_table_cannot_hold_is_refused_saying_what_to_raise(
) -> anyhow::Result<()> {
    let p = common::fixture_pair("rb_lock_budget", "simple").await;
    let tables: String = (0..60)
        .map(|i| format!("CREATE TABLE t_{i:02} (id int PRIMARY KEY, v text); INSERT INTO t_{i:02} VALUES (1, 'x');"))
        .collect();
    p.source.batch(&tables).await?;
    p.dest.batch(&tables).await?;
    common::migrate(&p).await?;

    // max_locks_per_transaction 10 × max_connections 20: 200 slots.
    let small = PgCluster::start_with_settings(&[
        "max_locks_per_transaction=10".into(),
        "max_connections=20".into(),
    ])?;
    let copy = TestDb::create(&small, "rb_lock_budget_copy").await?;
    let dump = small.dir().join("dest.dump");
    let bin = small.bindir().to_path_buf();
    let out = Command::new(bin.join("pg_dump"))
        .args(["-Fc", "-f"])
        .arg(&dump)
        .arg(p.dest.url())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin.join("pg_restore"))
        .args(["--no-owner", "--no-privileges", "-d", &copy.url()])
        .arg(&dump)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = copy.connect().await?;
    let url = DbUrl::parse(&copy.url(), "destination")?;
    let production = live_sums(&client).await;
    let backups = checks::backup_sums(&client).await;
    assert_eq!(backup::list(&url).await?.len(), 1);

    for dry_run in [true, false] {
        let err = rollback(RollbackOptions {
            destination: url.clone(),
            migration_id: None,
            keep_tables: Vec::new(),
            dry_run,
            locks: common::locks(),
        })
        .await
        .expect_err("the lock table is too small");
        assert!(matches!(err, CoordinatorError::Refused(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("max_locks_per_transaction 10")
                && text.contains("max_connections 20")
                && text.contains("raise max_locks_per_transaction to")
                && text.contains("restart")
                && !text.contains('\n'),
            "{text}"
        );
    }
    assert_eq!(live_sums(&client).await, production);
    assert_eq!(checks::backup_sums(&client).await, backups);
    assert_eq!(backup::list(&url).await?.len(), 1);
    assert_eq!(
        int(
            &client,
            "SELECT count(*) FROM pgzm.migrations WHERE status = 'swapped' AND backup_present"
        )
        .await,
        1
    );
    Ok(())
}

/// What a rollback moved aside is dropped after its commit in batches (at most 200 tables, or
/// fewer on a small lock table): here 170 tables moved aside by an interrupted rollback, a
/// chain of foreign keys running across the batches, an inheritance tree and a partitioned
/// table, a sequence, a type nothing uses any more, one a production table still uses (kept,
/// renamed `rolledback_<name>`) and a schema left empty. `cleanup` drops them all, each only
/// while its oid and name are the recorded ones, and reports each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_rollback_left_is_dropped_in_batches_across_keys_and_trees() -> anyhow::Result<()> {
    let p = common::fixture_pair("rb_batches", "simple").await;
    let dst = p.dest.connect().await?;
    common::migrate(&p).await?;
    rollback(common::rollback_options(&p)).await?;
    let id = 42i64;
    let a = |name: &str| format!("rolledback_{id}_{name}");
    let n = 170;
    let mut sql = String::from("CREATE SCHEMA aside_only;");
    for i in (0..n).rev() {
        let fk = if i + 1 < n {
            format!(
                r#", next int REFERENCES "{}"(id)"#,
                a(&format!("t{:03}", i + 1))
            )
        } else {
            String::new()
        };
        sql.push_str(&format!(
            r#"CREATE TABLE "{}" (id int PRIMARY KEY{fk}); INSERT INTO "{}" VALUES (1{});"#,
            a(&format!("t{i:03}")),
            a(&format!("t{i:03}")),
            if i + 1 < n { ", 1" } else { "" }
        ));
    }
    sql.push_str(&format!(
        r#"CREATE TABLE "{parent}" (id int); CREATE TABLE "{child}" () INHERITS ("{parent}");
           CREATE TABLE "{part}" (id int) PARTITION BY RANGE (id);
           CREATE TABLE "{part1}" PARTITION OF "{part}" FOR VALUES FROM (0) TO (10);
           CREATE SEQUENCE "{seq}";
           CREATE TYPE "{unused}" AS ENUM ('a');
           CREATE TYPE "{used}" AS ENUM ('b');
           CREATE TABLE production_table (x "{used}");
           CREATE TABLE aside_only."{other}" (id int);"#,
        parent = a("parent"),
        child = a("child"),
        part = a("part"),
        part1 = a("part_1"),
        seq = a("seq"),
        unused = a("unused"),
        used = a("used"),
        other = a("other"),
    ));
    dst.batch_execute(&sql).await?;
    let mut tables: Vec<String> = (0..n).map(|i| a(&format!("t{i:03}"))).collect();
    tables.extend([a("parent"), a("child"), a("part"), a("part_1")]);
    let mut rows: Vec<String> = tables
        .iter()
        .map(|t| format!("({id}, 'table', 'public', '{t}', 'x', '\"{t}\"'::regclass)"))
        .collect();
    rows.push(format!(
        "({id}, 'table', 'aside_only', '{o}', 'other', 'aside_only.\"{o}\"'::regclass)",
        o = a("other")
    ));
    rows.push(format!(
        "({id}, 'sequence', 'public', '{s}', 'seq', '\"{s}\"'::regclass)",
        s = a("seq")
    ));
    for (t, live) in [(a("unused"), "unused"), (a("used"), "used")] {
        rows.push(format!(
            "({id}, 'type', 'public', '{t}', '{live}', '\"{t}\"'::regtype)"
        ));
    }
    rows.push(format!(
        "({id}, 'schema', 'aside_only', 'aside_only', 'aside_only', 0)"
    ));
    dst.batch_execute(&format!(
        "INSERT INTO pgzm.rolled_back_objects (migration_id, kind, schema_name, name, live_name, object_oid) VALUES {}",
        rows.join(", ")
    ))
    .await?;

    let cleaned = backup::cleanup(&dest_url(&p), 0, false).await?;
    for t in &tables {
        assert!(
            cleaned.objects.contains(&format!("table {t}")),
            "{t}: {:?}",
            cleaned.objects
        );
    }
    assert!(cleaned.objects.contains(&format!("sequence {}", a("seq"))));
    assert!(cleaned.objects.contains(&format!("type {}", a("unused"))));
    assert!(cleaned.objects.iter().any(
        |o| o.starts_with(&format!("type {} kept", a("used"))) && o.contains("rolledback_used")
    ));
    assert!(cleaned
        .objects
        .contains(&"schema aside_only (if empty)".to_string()));
    assert_eq!(
        aside_objects(&dst).await,
        ["type _rolledback_used", "type rolledback_used"],
        "only the type production uses is left, under its kept name"
    );
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'aside_only'"
        )
        .await,
        0
    );
    dst.batch_execute("INSERT INTO production_table VALUES ('b')")
        .await?;
    Ok(())
}
