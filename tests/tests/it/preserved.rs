//! Preserved tables and the two-phase workflow (`prepare`, `status`, `swap`), against real
//! PostgreSQL servers: scenarios 4, 5, 6 and 8 of the original tool; a foreign-key violation
//! that aborts the swap (with `start`, and with `prepare` + `swap`); a second prepare (refused,
//! then forced); the source's definition with the destination's rows, written to by an
//! unprivileged application role, TRUNCATE included; a write the shadow cannot take (recorded,
//! never failing the application, blocking the swap); and a concurrent writer, before and during
//! the swap, whose own record of what it committed must equal the final live tables.

use crate::checks;
use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checks::{
    assert_none_with_prefix, checksum, column_type, int, live_sums, objects_with_prefix, pg_error,
    public_objects, schemas, texts,
};
use common::{preserving, TES_PRESERVED};
use pgzm_tests::inspect::{self, TableChecksum};
use pgzm_tests::quote_ident;
use tokio::sync::Notify;
use tokio_postgres::Client;

/// Row count and content hash of one table of `public`.
async fn sum(c: &Client, table: &str) -> TableChecksum {
    checksum(c, &format!("public.{}", quote_ident(table))).await
}

/// Asserts that `shadow_<T>` holds exactly the rows of the live `T`, for every `T`.
async fn assert_in_sync(c: &Client, tables: &[&str], after: &str) {
    for t in tables {
        let live = sum(c, t).await;
        let shadow = sum(c, &format!("shadow_{t}")).await;
        assert_eq!(
            shadow, live,
            "after {after}: shadow_{t} does not mirror {t} (shadow {shadow:?}, live {live:?})"
        );
    }
}

/// (table, trigger, enabled) of every `pgzm_sync_*` trigger in the database, sorted.
async fn sync_triggers(c: &Client) -> Vec<(String, String, bool)> {
    c.query(
        "SELECT c.relname::text, t.tgname::text, t.tgenabled <> 'D' FROM pg_trigger t \
         JOIN pg_class c ON c.oid = t.tgrelid \
         WHERE NOT t.tgisinternal AND left(t.tgname::text, 10) = 'pgzm_sync_' ORDER BY 1, 2",
        &[],
    )
    .await
    .expect("list sync triggers")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Every function in schema `pgzm` but the metadata's own (`assert_copying`, which the copy
/// tasks call), as regprocedure text.
async fn pgzm_functions(c: &Client) -> Vec<String> {
    texts(
        c,
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
         WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'pgzm') \
           AND p.oid <> 'pgzm.assert_copying(bigint)'::regprocedure ORDER BY 1",
    )
    .await
}

/// Foreign keys in `public` that are not validated, as `table.constraint`.
async fn unvalidated_fks(c: &Client) -> Vec<String> {
    texts(
        c,
        "SELECT conrelid::regclass::text || '.' || conname::text FROM pg_constraint \
         WHERE contype = 'f' AND NOT convalidated \
           AND connamespace = 'public'::regnamespace ORDER BY 1",
    )
    .await
}

/// A catalog signature without the tool's sync triggers (present while a migration is prepared).
fn without_sync_triggers(mut sig: inspect::CatalogSignature) -> inspect::CatalogSignature {
    for t in sig.tables.values_mut() {
        t.triggers.retain(|tg| !tg.name.starts_with("pgzm_sync_"));
    }
    sig
}

/// The four sync triggers of each table, enabled.
fn expected_triggers(tables: &[&str]) -> Vec<(String, String, bool)> {
    let mut out: Vec<(String, String, bool)> = tables
        .iter()
        .flat_map(|t| {
            [
                "pgzm_sync_delete",
                "pgzm_sync_insert",
                "pgzm_sync_truncate",
                "pgzm_sync_update",
            ]
            .map(|tg| (t.to_string(), tg.to_string(), true))
        })
        .collect();
    out.sort();
    out
}

/// Checks that the migration is prepared, safe to swap, with every sync trigger healthy.
fn assert_ready(st: &pgzm_coordinator::status::Status, preserved: &[&str]) {
    assert_eq!(st.state, "prepared", "{st:#?}");
    assert!(st.safe_to_swap, "{st:#?}");
    assert!(st.problems.is_empty(), "{st:#?}");
    assert!(st.sync_errors.is_empty(), "{st:#?}");
    let mut want: Vec<String> = preserved.iter().map(|s| s.to_string()).collect();
    want.sort();
    let mut got = st.preserved_tables.clone();
    got.sort();
    assert_eq!(got, want, "{st:#?}");
    assert_eq!(st.sync_triggers.len(), 4 * preserved.len(), "{st:#?}");
    assert!(
        st.sync_triggers.iter().all(|t| t.present && t.enabled),
        "{st:#?}"
    );
    for t in &st.shadow_tables {
        assert!(t.present, "{st:#?}");
        assert_eq!(t.rows, t.expected_rows, "{st:#?}");
    }
}

/// After a swap: no sync trigger anywhere, no function left in `pgzm`, no `shadow_` object,
/// every foreign key in place, validated and without orphans.
async fn assert_swapped_clean(c: &Client) {
    assert_eq!(sync_triggers(c).await, vec![], "sync triggers left");
    assert_eq!(
        pgzm_functions(c).await,
        Vec::<String>::new(),
        "pgzm functions left"
    );
    assert_none_with_prefix(c, "shadow_").await;
    assert_eq!(inspect::fk_orphans(c).await.expect("fk orphans"), vec![]);
    assert_eq!(unvalidated_fks(c).await, Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: sync trigger lifecycle.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_triggers_exist_while_prepared_and_are_gone_after_the_swap() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_lifecycle", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_before = live_sums(&src).await;
    let dst_user_before = sum(&dst, "User").await;

    let report = common::prepare_and_release(&preserving(&p, &["User"])).await?;
    assert!(!report.dry_run);
    assert_eq!(report.plan.preserved.len(), 1);

    // While prepared: the four triggers on the live "User", its sync function, a shadow copy
    // holding the destination's rows.
    assert_eq!(sync_triggers(&dst).await, expected_triggers(&["User"]));
    let functions = pgzm_functions(&dst).await;
    assert_eq!(functions.len(), 1, "{functions:?}");
    assert!(functions[0].starts_with("pgzm.sync_"), "{functions:?}");
    assert_in_sync(&dst, &["User"], "prepare").await;
    assert_eq!(sum(&dst, "shadow_User").await, dst_user_before);
    assert_ready(&common::status(&p).await, &["User"]);
    // The live tables are untouched until the swap.
    assert_eq!(sum(&dst, "User").await, dst_user_before);

    let report = common::swap(&p).await?;
    assert!(report.swap.is_some());

    assert_swapped_clean(&dst).await;
    // Row for row the old destination table (count, keys and content are in the checksum).
    assert_eq!(sum(&dst, "User").await, dst_user_before);
    assert_eq!(sum(&dst, "backup_User").await, dst_user_before);
    assert_eq!(
        texts(&dst, r#"SELECT id || ' ' || name FROM "User" ORDER BY id"#).await,
        vec!["1 John Doe", "2 Jane Smith"]
    );
    for t in ["Post", "Comment"] {
        assert_eq!(
            sum(&dst, t).await,
            src_before[t],
            "{t} carries the source's data"
        );
    }
    // The next id is past every existing one, and the sequence agrees.
    let id = int(
        &dst,
        r#"INSERT INTO "User" (name, email) VALUES ('New', 'new@example.com') RETURNING id::int8"#,
    )
    .await;
    assert_eq!(id, 3);
    assert!(
        int(&dst, r#"SELECT last_value FROM "User_id_seq""#).await >= id,
        "sequence behind the data"
    );
    let st = common::status(&p).await;
    assert_eq!(st.state, "swapped", "{st:#?}");
    assert!(live_sums(&src).await == src_before, "the source changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_with_preserved_user_on_tes_keeps_the_destination_users() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_start_tes", "tes").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_before = live_sums(&src).await;
    let dst_before = live_sums(&dst).await;

    let report = common::run(preserving(&p, &["User"])).await?;
    assert!(report.swap.is_some());

    assert_swapped_clean(&dst).await;
    let after = live_sums(&dst).await;
    let mut expected = src_before.clone();
    expected.insert("User".into(), dst_before["User"].clone());
    assert_eq!(after, expected);
    assert_eq!(
        texts(&dst, r#"SELECT name FROM "User" ORDER BY id"#).await,
        vec!["John Doe", "Jane Smith", "Bob Johnson", "Alice Williams"]
    );
    let id = int(
        &dst,
        r#"INSERT INTO "User" ("updatedAt", email) VALUES (now(), 'n@example.com') RETURNING id::int8"#,
    )
    .await;
    assert!(
        id > int(
            &dst,
            r#"SELECT max(id)::int8 FROM "User" WHERE email <> 'n@example.com'"#
        )
        .await
    );
    assert_eq!(live_sums(&src).await, src_before, "the source changed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: two-phase error handling.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_refuses_when_nothing_is_prepared_or_the_shadow_set_is_damaged() -> anyhow::Result<()>
{
    let p = common::fixture_pair("pres_damaged", "simple").await;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = inspect::catalog_signature(&dst, None).await?;
    let schemas_before = schemas(&dst).await;
    let objects_before = public_objects(&dst).await;

    // Nothing prepared: a clear refusal, nothing created.
    let err = common::swap(&p)
        .await
        .expect_err("swap with nothing prepared");
    let msg = err.to_string();
    assert!(msg.contains("nothing prepared"), "{msg}");
    assert_eq!(live_sums(&dst).await, sums_before);
    assert_eq!(inspect::catalog_signature(&dst, None).await?, sig_before);
    assert_eq!(schemas(&dst).await, schemas_before, "swap created a schema");
    assert_eq!(public_objects(&dst).await, objects_before);
    assert_eq!(common::status(&p).await.state, "none");

    common::prepare_and_release(&preserving(&p, &["User"])).await?;

    // `swap --dry-run` checks the healthy set and changes nothing.
    let dry = common::swap_dry_run(&p).await?;
    assert!(dry.dry_run && dry.swap.is_none());
    assert_eq!(live_sums(&dst).await, sums_before);
    assert_ready(&common::status(&p).await, &["User"]);

    // A sync trigger dropped behind the tool's back.
    dst.batch_execute(r#"DROP TRIGGER pgzm_sync_delete ON "User""#)
        .await?;
    let msg = common::swap(&p)
        .await
        .expect_err("swap with a trigger missing")
        .to_string();
    let dry = common::swap_dry_run(&p).await;
    assert!(dry.is_err(), "swap --dry-run accepted a damaged set");
    assert!(msg.contains("damaged"), "{msg}");
    assert!(
        msg.contains("pgzm_sync_delete") && msg.contains("missing"),
        "{msg}"
    );
    let st = common::status(&p).await;
    assert_eq!(st.state, "prepared", "{st:#?}");
    assert!(!st.safe_to_swap, "{st:#?}");

    // A shadow table dropped too.
    dst.batch_execute(r#"DROP TABLE "shadow_Comment""#).await?;
    let msg = common::swap(&p)
        .await
        .expect_err("swap with a shadow table missing")
        .to_string();
    assert!(msg.contains("damaged"), "{msg}");
    assert!(msg.contains("shadow_Comment"), "{msg}");

    // The live tables were never touched and still hold their rows; nothing was renamed.
    assert_eq!(live_sums(&dst).await, sums_before);
    for t in ["User", "Post", "Comment"] {
        assert_eq!(inspect::row_count(&dst, t).await?, 2, "{t}");
    }
    assert_none_with_prefix(&dst, "backup_").await;
    assert_eq!(
        without_sync_triggers(inspect::catalog_signature(&dst, None).await?),
        sig_before,
        "the live tables' definitions changed"
    );

    // The documented way out: prepare again with --force, then swap.
    let mut opts = preserving(&p, &["User"]);
    opts.force = true;
    common::prepare_and_release(&opts).await?;
    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(sum(&dst, "User").await, sums_before["User"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 6: dry-run prepare.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prepare_changes_nothing_anywhere() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_dry", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let mut before = Vec::new();
    for c in [&src, &dst] {
        before.push((
            live_sums(c).await,
            inspect::catalog_signature(c, None).await?,
            schemas(c).await,
            public_objects(c).await,
        ));
    }

    let mut opts = preserving(&p, &["User"]);
    opts.dry_run = true;
    let report = common::prepare(&opts)
        .await?
        .expect("a dry-run report")
        .release()
        .await;
    assert!(report.dry_run);
    assert_eq!(report.plan.preserved.len(), 1);
    assert_eq!(report.plan.preserved[0].table, "User");

    for (c, (sums, sig, nsp, objects)) in [&src, &dst].into_iter().zip(before) {
        assert_eq!(live_sums(c).await, sums);
        assert_eq!(inspect::catalog_signature(c, None).await?, sig);
        assert_eq!(schemas(c).await, nsp, "a schema was created");
        assert_eq!(public_objects(c).await, objects);
        assert_eq!(sync_triggers(c).await, vec![]);
        assert_none_with_prefix(c, "shadow_").await;
    }
    let st = common::status(&p).await;
    assert_eq!(st.state, "none", "{st:#?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 8: two-phase TES migration with live sync.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_tes_mirrors_every_write_until_the_swap() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_tes_sync", "tes").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_before = live_sums(&src).await;

    common::prepare_and_release(&preserving(&p, &TES_PRESERVED)).await?;
    assert_eq!(sync_triggers(&dst).await, expected_triggers(&TES_PRESERVED));
    assert_in_sync(&dst, &TES_PRESERVED, "prepare").await;

    let steps: &[(&str, &str)] = &[
        (
            "insert a user",
            r#"INSERT INTO "User" ("updatedAt", name, email) VALUES (now(), 'Eve New', 'eve@example.com')"#,
        ),
        (
            "update a user",
            r#"UPDATE "User" SET name = 'John Doe (edited)' WHERE id = 1"#,
        ),
        (
            "change a user's primary key",
            r#"UPDATE "User" SET id = 50 WHERE email = 'eve@example.com'"#,
        ),
        (
            "insert a user to delete",
            r#"INSERT INTO "User" ("updatedAt", name, email) VALUES (now(), 'Temp', 'temp@example.com')"#,
        ),
        (
            "delete a user",
            r#"DELETE FROM "User" WHERE email = 'temp@example.com'"#,
        ),
        (
            "multi-row user update",
            r#"UPDATE "User" SET name = name || ' *', "updatedAt" = "updatedAt" + interval '1 day' WHERE id BETWEEN 2 AND 4"#,
        ),
        (
            "insert a scenario",
            r#"INSERT INTO "Scenario" (name, "updatedAt", "userId", city) VALUES ('Eve plan', now(), 50, 'BOSTON')"#,
        ),
        (
            "update a scenario",
            r#"UPDATE "Scenario" SET name = 'Richmond Tree Equity 2025' WHERE id = 1"#,
        ),
        (
            // Cascades (ON UPDATE CASCADE) into BlockgroupOnScenario, whose triggers mirror it.
            "change a scenario's primary key",
            r#"UPDATE "Scenario" SET id = 40 WHERE id = 4"#,
        ),
        (
            "insert and delete a scenario",
            r#"INSERT INTO "Scenario" (id, name, "updatedAt", "userId", city) VALUES (77, 'Temp', now(), 1, 'DC');
               DELETE FROM "Scenario" WHERE id = 77"#,
        ),
        (
            "insert a join row",
            r#"INSERT INTO "BlockgroupOnScenario" ("scenarioId", "blockgroupId", "targetArea", name)
               SELECT id, '510750001001', 3.5, 'Eve zone' FROM "Scenario" WHERE name = 'Eve plan'"#,
        ),
        (
            "change a join row's primary key",
            r#"UPDATE "BlockgroupOnScenario" SET "blockgroupId" = '110010003001'
               WHERE "scenarioId" = 2 AND "blockgroupId" = '250250002001'"#,
        ),
        (
            "delete a join row",
            r#"DELETE FROM "BlockgroupOnScenario" WHERE "scenarioId" = 1 AND "blockgroupId" = '510750001001'"#,
        ),
        (
            "multi-row join update",
            r#"UPDATE "BlockgroupOnScenario" SET "targetArea" = "targetArea" + 1, tes_change = NOT coalesce(tes_change, false)"#,
        ),
        (
            "an upsert (INSERT ... ON CONFLICT DO UPDATE)",
            r#"INSERT INTO "User" (id, "updatedAt", name, email)
               VALUES (4, now(), 'ignored', 'ignored@example.com'), (60, now(), 'Upserted', 'ups@example.com')
               ON CONFLICT (id) DO UPDATE SET role = 'UPSERTED'"#,
        ),
        (
            "a MERGE that updates and inserts",
            r#"MERGE INTO "BlockgroupOnScenario" t
               USING (VALUES (3, '110010003001', 99.0), (3, '250250002001', 1.0)) AS s(sid, bid, area)
               ON t."scenarioId" = s.sid AND t."blockgroupId" = s.bid
               WHEN MATCHED THEN UPDATE SET "targetArea" = s.area
               WHEN NOT MATCHED THEN INSERT ("scenarioId", "blockgroupId", "targetArea") VALUES (s.sid, s.bid, s.area)"#,
        ),
        (
            "a MERGE that deletes",
            r#"MERGE INTO "BlockgroupOnScenario" t
               USING (VALUES (3, '250250002001')) AS s(sid, bid)
               ON t."scenarioId" = s.sid AND t."blockgroupId" = s.bid
               WHEN MATCHED THEN DELETE"#,
        ),
        (
            "a partly rolled-back transaction",
            r#"BEGIN;
               UPDATE "User" SET role = 'EDITOR' WHERE id = 2;
               SAVEPOINT s;
               UPDATE "User" SET role = 'GONE' WHERE id = 3;
               DELETE FROM "BlockgroupOnScenario" WHERE "scenarioId" = 3;
               ROLLBACK TO SAVEPOINT s;
               COMMIT"#,
        ),
    ];
    for (what, sql) in steps {
        dst.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {}", pg_error(&e)));
        assert_in_sync(&dst, &TES_PRESERVED, what).await;
    }

    // A transaction rolled back as a whole leaves no trace in the shadow copies.
    let shadows_before: Vec<TableChecksum> = {
        let mut v = Vec::new();
        for t in TES_PRESERVED {
            v.push(sum(&dst, &format!("shadow_{t}")).await);
        }
        v
    };
    dst.batch_execute(
        r#"BEGIN;
           INSERT INTO "User" ("updatedAt", name, email) VALUES (now(), 'Ghost', 'ghost@example.com');
           UPDATE "Scenario" SET name = 'ghost' WHERE id = 2;
           DELETE FROM "BlockgroupOnScenario" WHERE "scenarioId" = 3;
           ROLLBACK"#,
    )
    .await?;
    for (t, before) in TES_PRESERVED.iter().zip(&shadows_before) {
        assert_eq!(&sum(&dst, &format!("shadow_{t}")).await, before, "{t}");
    }
    assert_in_sync(&dst, &TES_PRESERVED, "a rolled-back transaction").await;
    assert_eq!(
        int(
            &dst,
            r#"SELECT count(*) FROM "shadow_User" WHERE name = 'Ghost'"#
        )
        .await,
        0
    );

    assert_ready(&common::status(&p).await, &TES_PRESERVED);

    // What must survive: the preserved tables exactly as they are now, the source's data elsewhere.
    let mut expected = src_before.clone();
    for t in TES_PRESERVED {
        expected.insert(t.to_string(), sum(&dst, t).await);
    }
    common::swap(&p).await?;

    assert_eq!(live_sums(&dst).await, expected);
    assert_swapped_clean(&dst).await;
    assert_eq!(
        texts(
            &dst,
            r#"SELECT id || ' ' || name || ' ' || role FROM "User" ORDER BY id"#
        )
        .await,
        vec![
            "1 John Doe (edited) ADMIN",
            "2 Jane Smith * EDITOR",
            "3 Bob Johnson * USER",
            "4 Alice Williams * UPSERTED",
            "50 Eve New USER",
            "60 Upserted USER",
        ]
    );
    assert_eq!(
        texts(
            &dst,
            r#"SELECT "scenarioId" || ' ' || "blockgroupId" FROM "BlockgroupOnScenario" ORDER BY 1"#
        )
        .await,
        vec![
            "2 110010003001",
            "3 110010003001",
            "40 484530004001",
            "5 510750001001"
        ]
    );
    // The source's data elsewhere (e.g. the modified block group values).
    assert_eq!(
        texts(&dst, r#"SELECT af_id FROM "Blockgroup" WHERE gid = 1"#).await,
        vec!["AF001_MOD"]
    );
    // Sequences past every preserved key, including the ones written after prepare.
    let user_id = int(
        &dst,
        r#"INSERT INTO "User" ("updatedAt", email) VALUES (now(), 'after@example.com') RETURNING id::int8"#,
    )
    .await;
    assert!(user_id > 60, "new user id {user_id}");
    let scenario_id = int(
        &dst,
        r#"INSERT INTO "Scenario" (name, "updatedAt", "userId", city) VALUES ('after', now(), 1, 'DC') RETURNING id::int8"#,
    )
    .await;
    assert!(scenario_id > 40, "new scenario id {scenario_id}");
    assert_eq!(common::status(&p).await.state, "swapped");
    assert_eq!(live_sums(&src).await, src_before, "the source changed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A foreign key violated by preserved rows aborts the swap.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_at_the_swap_on_a_violated_foreign_key_and_cleans_up() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_fk_start", "tes").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_before = live_sums(&src).await;
    let dst_before = live_sums(&dst).await;
    let sig_before = inspect::catalog_signature(&dst, None).await?;

    let err = common::run(preserving(&p, &["AreaOnScenario"]))
        .await
        .expect_err("the preserved orphan must abort the swap");
    let msg = err.to_string();
    assert!(msg.contains("AreaOnScenario_areaId_fkey"), "{msg}");
    assert!(msg.contains("foreign key"), "{msg}");

    assert_eq!(live_sums(&dst).await, dst_before, "live tables changed");
    assert_eq!(inspect::catalog_signature(&dst, None).await?, sig_before);
    assert_none_with_prefix(&dst, "shadow_").await;
    assert_none_with_prefix(&dst, "backup_").await;
    assert_eq!(sync_triggers(&dst).await, vec![]);
    assert_eq!(pgzm_functions(&dst).await, Vec::<String>::new());
    let st = common::status(&p).await;
    assert_eq!(st.state, "failed", "{st:#?}");
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("AreaOnScenario_areaId_fkey"),
        "{st:#?}"
    );
    assert_eq!(live_sums(&src).await, src_before, "the source changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_fails_on_a_violated_foreign_key_and_stays_prepared() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_fk_swap", "tes").await;
    let dst = p.dest.connect().await?;
    let src_before = live_sums(&p.source.connect().await?).await;
    let dst_before = live_sums(&dst).await;

    common::prepare_and_release(&preserving(&p, &["AreaOnScenario"])).await?;
    let msg = common::swap(&p)
        .await
        .expect_err("the preserved orphan must abort the swap")
        .to_string();
    assert!(msg.contains("AreaOnScenario_areaId_fkey"), "{msg}");

    assert_eq!(live_sums(&dst).await, dst_before, "live tables changed");
    assert_none_with_prefix(&dst, "backup_").await;
    assert_eq!(
        sync_triggers(&dst).await,
        expected_triggers(&["AreaOnScenario"])
    );
    assert_in_sync(&dst, &["AreaOnScenario"], "the failed swap").await;
    let st = common::status(&p).await;
    assert_eq!(st.state, "prepared", "{st:#?}");
    assert_eq!(st.sync_triggers.len(), 4, "{st:#?}");

    // The operator removes the orphan in production; the mirror carries it; the swap goes through.
    dst.batch_execute(
        r#"DELETE FROM "AreaOnScenario" WHERE "scenarioId" = 4 AND "areaId" = '484530004001_001'"#,
    )
    .await?;
    assert_in_sync(&dst, &["AreaOnScenario"], "deleting the orphan").await;
    let kept = sum(&dst, "AreaOnScenario").await;
    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(sum(&dst, "AreaOnScenario").await, kept);
    assert_eq!(sum(&dst, "Area").await, src_before["Area"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A second prepare.

/// (name, oid) of the `shadow_` tables.
async fn shadow_oids(c: &Client) -> Vec<(String, u32)> {
    c.query(
        "SELECT relname::text, oid FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND left(relname::text, 7) = 'shadow_' AND relkind = 'r' ORDER BY 1",
        &[],
    )
    .await
    .expect("shadow oids")
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_prepare_is_refused_unless_forced() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_force", "simple").await;
    let src_before = live_sums(&p.source.connect().await?).await;
    let dst = p.dest.connect().await?;
    let first = common::prepare_and_release(&preserving(&p, &["User"])).await?;
    let first_oids = shadow_oids(&dst).await;
    assert_eq!(first_oids.len(), 3, "{first_oids:?}");

    let msg = common::prepare_and_release(&preserving(&p, &["User"]))
        .await
        .expect_err("a second prepare must be refused")
        .to_string();
    assert!(msg.contains("--force"), "{msg}");
    assert!(msg.contains(&first.migration_id.to_string()), "{msg}");
    assert_eq!(
        shadow_oids(&dst).await,
        first_oids,
        "the refused prepare changed the shadow set"
    );
    let st = common::status(&p).await;
    assert_eq!(st.migration_id, Some(first.migration_id));
    assert_ready(&st, &["User"]);

    let mut opts = preserving(&p, &["User"]);
    opts.force = true;
    let second = common::prepare_and_release(&opts).await?;
    assert_ne!(second.migration_id, first.migration_id);
    let second_oids = shadow_oids(&dst).await;
    assert_eq!(second_oids.len(), 3);
    for (name, oid) in &first_oids {
        assert!(
            !second_oids.iter().any(|(_, o)| o == oid),
            "old {name} (oid {oid}) survived the forced prepare"
        );
    }
    // Only the new sync function, and exactly one set of triggers, calling it.
    let functions = pgzm_functions(&dst).await;
    assert_eq!(functions.len(), 1, "{functions:?}");
    assert!(
        functions[0].contains(&second.migration_id.to_string()),
        "{functions:?}"
    );
    assert_eq!(sync_triggers(&dst).await, expected_triggers(&["User"]));
    assert_eq!(
        texts(
            &dst,
            r#"SELECT DISTINCT tgfoid::regproc::text FROM pg_trigger WHERE tgrelid = '"User"'::regclass AND NOT tgisinternal"#
        )
        .await,
        vec![functions[0].trim_end_matches("()").to_string()]
    );
    assert_eq!(
        texts(
            &dst,
            &format!(
                "SELECT status FROM pgzm.migrations WHERE id = {}",
                first.migration_id
            )
        )
        .await,
        vec!["failed"]
    );
    // The new sync works.
    dst.batch_execute(r#"INSERT INTO "User" (name, email) VALUES ('Neo', 'neo@example.com')"#)
        .await?;
    assert_in_sync(&dst, &["User"], "an insert after the forced prepare").await;
    let st = common::status(&p).await;
    assert_eq!(st.migration_id, Some(second.migration_id));
    assert_ready(&st, &["User"]);

    let user = sum(&dst, "User").await;
    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(sum(&dst, "User").await, user);
    assert_eq!(sum(&dst, "Post").await, src_before["Post"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Concurrency: a writer on two preserved tables, before and during the swap.

const CONCURRENCY_SCHEMA: &str = "
CREATE TABLE parent (id serial PRIMARY KEY, v text NOT NULL);
CREATE TABLE child (id serial PRIMARY KEY,
                    parent_id int NOT NULL REFERENCES parent ON DELETE CASCADE,
                    v text);
CREATE INDEX child_parent_idx ON child (parent_id);
CREATE TABLE catalogue (id int PRIMARY KEY, label text NOT NULL);";

/// What the writer committed: parent id → v, child id → (parent_id, v).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    parents: BTreeMap<i32, String>,
    children: BTreeMap<i32, (i32, String)>,
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<K: Copy, V>(&mut self, m: &BTreeMap<K, V>) -> Option<K> {
        if m.is_empty() {
            None
        } else {
            m.keys().nth(self.below(m.len())).copied()
        }
    }
}

/// What the writer measured.
#[derive(Debug, Default)]
struct WriterStats {
    committed: u64,
    rolled_back: u64,
    statements: u64,
    worst: Duration,
    worst_during_swap: Duration,
    inserts_after_swap: u64,
}

/// Set while the concurrency test's swap runs (only that test uses it).
static SWAP_RUNNING: AtomicBool = AtomicBool::new(false);

/// Shared between the test and the writer task.
struct Control {
    stop: AtomicBool,
    swapped: AtomicBool,
    committed: AtomicU64,
    progress: Notify,
}

/// One statement, timed. An error aborts the transaction.
async fn timed<T>(
    stats: &mut WriterStats,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let during_swap = SWAP_RUNNING.load(Ordering::SeqCst);
    let t = Instant::now();
    let r = f.await;
    let took = t.elapsed();
    stats.worst = stats.worst.max(took);
    if during_swap || SWAP_RUNNING.load(Ordering::SeqCst) {
        stats.worst_during_swap = stats.worst_during_swap.max(took);
    }
    stats.statements += 1;
    r
}

/// One random operation on `m` (the transaction's pending state), mirrored on the server.
async fn random_op(
    c: &Client,
    rng: &mut Rng,
    m: &mut Model,
    stats: &mut WriterStats,
    n: u64,
) -> Result<(), tokio_postgres::Error> {
    let v = format!("v{n}-{}", rng.below(1000));
    match rng.below(10) {
        0 | 1 => {
            let row = timed(
                stats,
                c.query_one("INSERT INTO parent (v) VALUES ($1) RETURNING id", &[&v]),
            )
            .await?;
            m.parents.insert(row.get(0), v);
        }
        2 | 3 => {
            let Some(pid) = rng.pick(&m.parents) else {
                return Ok(());
            };
            let row = timed(
                stats,
                c.query_one(
                    "INSERT INTO child (parent_id, v) VALUES ($1, $2) RETURNING id",
                    &[&pid, &v],
                ),
            )
            .await?;
            m.children.insert(row.get(0), (pid, v));
        }
        4 => {
            let Some(pid) = rng.pick(&m.parents) else {
                return Ok(());
            };
            let n = timed(
                stats,
                c.execute("UPDATE parent SET v = $1 WHERE id = $2", &[&v, &pid]),
            )
            .await?;
            assert_eq!(n, 1, "parent {pid} vanished");
            m.parents.insert(pid, v);
        }
        5 => {
            // Re-parent a child and change its value.
            let (Some(cid), Some(pid)) = (rng.pick(&m.children), rng.pick(&m.parents)) else {
                return Ok(());
            };
            let n = timed(
                stats,
                c.execute(
                    "UPDATE child SET parent_id = $1, v = $2 WHERE id = $3",
                    &[&pid, &v, &cid],
                ),
            )
            .await?;
            assert_eq!(n, 1, "child {cid} vanished");
            m.children.insert(cid, (pid, v));
        }
        6 => {
            // Primary-key change. Ids stay unique: sequences only hand out positive ids, never
            // twice, and only positive ids are negated.
            let positive: BTreeMap<i32, ()> = m
                .children
                .keys()
                .filter(|k| **k > 0)
                .map(|k| (*k, ()))
                .collect();
            let Some(cid) = rng.pick(&positive) else {
                return Ok(());
            };
            let row = timed(
                stats,
                c.query_one(
                    "UPDATE child SET id = -id WHERE id = $1 RETURNING id",
                    &[&cid],
                ),
            )
            .await?;
            let row_value = m.children.remove(&cid).expect("child in model");
            m.children.insert(row.get(0), row_value);
        }
        7 => {
            // Multi-row update: every child of one parent.
            let Some(pid) = rng.pick(&m.parents) else {
                return Ok(());
            };
            let rows = timed(
                stats,
                c.query(
                    "UPDATE child SET v = v || '+' WHERE parent_id = $1 RETURNING id",
                    &[&pid],
                ),
            )
            .await?;
            let expected = m.children.values().filter(|(p, _)| *p == pid).count();
            assert_eq!(rows.len(), expected, "children of {pid}");
            for (_, (p, cv)) in m.children.iter_mut() {
                if *p == pid {
                    cv.push('+');
                }
            }
        }
        8 => {
            let Some(cid) = rng.pick(&m.children) else {
                return Ok(());
            };
            let n = timed(stats, c.execute("DELETE FROM child WHERE id = $1", &[&cid])).await?;
            assert_eq!(n, 1);
            m.children.remove(&cid);
        }
        _ => {
            // Deleting a parent cascades to its children.
            let Some(pid) = rng.pick(&m.parents) else {
                return Ok(());
            };
            let n = timed(
                stats,
                c.execute("DELETE FROM parent WHERE id = $1", &[&pid]),
            )
            .await?;
            assert_eq!(n, 1);
            m.parents.remove(&pid);
            m.children.retain(|_, (p, _)| *p != pid);
        }
    }
    Ok(())
}

/// Small random transactions (1–3 operations, one in six rolled back) until told to stop.
async fn writer(c: Client, mut model: Model, ctl: Arc<Control>) -> (Model, WriterStats) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut stats = WriterStats::default();
    let mut n = 0u64;
    while !ctl.stop.load(Ordering::SeqCst) {
        n += 1;
        let after_swap = ctl.swapped.load(Ordering::SeqCst);
        let mut pending = model.clone();
        let parents_before = pending.parents.len();
        let children_before = pending.children.len();
        let mut result = timed(&mut stats, c.batch_execute("BEGIN")).await;
        for _ in 0..=rng.below(3) {
            if result.is_err() {
                break;
            }
            result = random_op(&c, &mut rng, &mut pending, &mut stats, n).await;
        }
        let rollback = rng.below(6) == 0;
        match result {
            Ok(()) if !rollback => match timed(&mut stats, c.batch_execute("COMMIT")).await {
                Ok(()) => {
                    if after_swap
                        && (pending.parents.len() > parents_before
                            || pending.children.len() > children_before)
                    {
                        stats.inserts_after_swap += 1;
                    }
                    model = pending;
                    stats.committed += 1;
                    ctl.committed.fetch_add(1, Ordering::SeqCst);
                    ctl.progress.notify_waiters();
                }
                Err(e) => panic!("COMMIT failed: {}", pg_error(&e)),
            },
            Ok(()) => {
                c.batch_execute("ROLLBACK").await.expect("rollback");
                stats.rolled_back += 1;
            }
            Err(e) => {
                // No lock_timeout is set on this session: a write may wait, but must not fail.
                panic!("writer statement failed: {}", pg_error(&e));
            }
        }
    }
    (model, stats)
}

async fn read_model(c: &Client) -> Model {
    let mut m = Model::default();
    for r in c
        .query("SELECT id, v FROM parent", &[])
        .await
        .expect("parents")
    {
        m.parents.insert(r.get(0), r.get(1));
    }
    for r in c
        .query("SELECT id, parent_id, v FROM child", &[])
        .await
        .expect("children")
    {
        m.children.insert(r.get(0), (r.get(1), r.get(2)));
    }
    m
}

/// Asserts `live` has exactly the keys of `committed`: no row lost, none extra.
fn assert_same_keys<V>(committed: &BTreeMap<i32, V>, live: &BTreeMap<i32, V>, what: &str) {
    let lost: Vec<_> = committed.keys().filter(|k| !live.contains_key(k)).collect();
    let extra: Vec<_> = live.keys().filter(|k| !committed.contains_key(k)).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "{what} lost {lost:?}, extra {extra:?}"
    );
}

/// Waits (without sleeping) until the writer has committed `n` transactions in total.
async fn wait_for_commits(ctl: &Control, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let notified = ctl.progress.notified();
        if ctl.committed.load(Ordering::SeqCst) >= n {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            tokio::time::timeout(left, notified).await.is_ok(),
            "the writer stopped committing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_before_and_during_the_swap_are_never_lost() -> anyhow::Result<()> {
    let p = common::pair("pres_concurrency").await;
    p.source.batch(CONCURRENCY_SCHEMA).await?;
    p.dest.batch(CONCURRENCY_SCHEMA).await?;
    p.source
        .batch(
            "INSERT INTO parent (v) SELECT 'source ' || g FROM generate_series(1, 10) g;
             INSERT INTO child (parent_id, v) SELECT 1 + g % 10, 'source child' FROM generate_series(1, 30) g;
             INSERT INTO catalogue SELECT g, 'new label ' || g FROM generate_series(1, 25) g;",
        )
        .await?;
    p.dest
        .batch(
            "INSERT INTO parent (v) SELECT 'prod ' || g FROM generate_series(1, 40) g;
             INSERT INTO child (parent_id, v) SELECT 1 + g % 40, 'prod child ' || g FROM generate_series(1, 120) g;
             INSERT INTO catalogue SELECT g, 'old label ' || g FROM generate_series(1, 5) g;",
        )
        .await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let catalogue_src = sum(&src, "catalogue").await;

    // The writer starts before prepare: the initial copy and the trigger creation happen while
    // it writes, and must let no write fall between them.
    let ctl = Arc::new(Control {
        stop: AtomicBool::new(false),
        swapped: AtomicBool::new(false),
        committed: AtomicU64::new(0),
        progress: Notify::new(),
    });
    let writer_client = p.dest.connect().await?;
    let initial = read_model(&dst).await;
    let task = tokio::spawn(writer(writer_client, initial, Arc::clone(&ctl)));
    wait_for_commits(&ctl, 20).await;

    common::prepare_and_release(&preserving(&p, &["parent", "child"])).await?;
    let during_prepare = ctl.committed.load(Ordering::SeqCst);

    // ~3 s of writes, with `status` running alongside.
    let started = Instant::now();
    let mut status_calls = 0;
    while started.elapsed() < Duration::from_secs(3) {
        let st = common::status(&p).await;
        status_calls += 1;
        assert_eq!(st.state, "prepared", "{st:#?}");
        assert!(st.sync_errors.is_empty(), "{st:#?}");
        assert!(
            st.sync_triggers.iter().all(|t| t.present && t.enabled),
            "{st:#?}"
        );
        assert!(st.safe_to_swap, "status while writing: {st:#?}");
        assert!(!task.is_finished(), "the writer died");
    }
    let before_swap = ctl.committed.load(Ordering::SeqCst);
    assert!(
        before_swap > 50,
        "the writer committed only {before_swap} transactions"
    );

    // The swap, while the writer keeps going.
    let swap_started = Instant::now();
    SWAP_RUNNING.store(true, Ordering::SeqCst);
    let report = common::swap(&p).await;
    SWAP_RUNNING.store(false, Ordering::SeqCst);
    let report = report?;
    let swap_ms = swap_started.elapsed().as_millis();
    ctl.swapped.store(true, Ordering::SeqCst);
    let after_swap = ctl.committed.load(Ordering::SeqCst);
    // Let the writer commit a good number of transactions against the new tables.
    wait_for_commits(&ctl, after_swap + 100).await;
    ctl.stop.store(true, Ordering::SeqCst);
    let (model, stats) = task.await?;

    let outcome = report.swap.expect("swap outcome");
    eprintln!(
        "writer: {} committed ({during_prepare} by the end of prepare, {} before the swap, {} during it), {} rolled back, \
         {} statements, worst statement latency {:?} ({:?} while the swap ran); swap: {} attempt(s), locks held {} us, \
         {} ms in total; {status_calls} status calls",
        stats.committed,
        before_swap,
        after_swap - before_swap,
        stats.rolled_back,
        stats.statements,
        stats.worst,
        stats.worst_during_swap,
        outcome.attempts,
        outcome.lock_held_us,
        swap_ms,
    );

    // Zero lost, zero extra, zero changed rows.
    let live = read_model(&dst).await;
    assert_same_keys(&model.parents, &live.parents, "parents");
    assert_same_keys(&model.children, &live.children, "children");
    assert!(live == model, "changed rows");
    assert!(stats.inserts_after_swap > 0, "no insert after the swap");

    // These are the new tables; the old ones are the backup; the source's data elsewhere.
    assert!(objects_with_prefix(&dst, "backup_parent")
        .await
        .contains(&"rel r:backup_parent".to_string()));
    assert_eq!(sum(&dst, "catalogue").await, catalogue_src);
    assert_swapped_clean(&dst).await;
    // Inserts still succeed, above every id.
    let max_parent = int(&dst, "SELECT max(id)::int8 FROM parent").await;
    let id = int(
        &dst,
        "INSERT INTO parent (v) VALUES ('last') RETURNING id::int8",
    )
    .await;
    assert!(id > max_parent);
    let max_child = int(&dst, "SELECT max(id)::int8 FROM child").await;
    let cid = int(
        &dst,
        &format!("INSERT INTO child (parent_id, v) VALUES ({id}, 'last') RETURNING id::int8"),
    )
    .await;
    assert!(cid > max_child);
    // A write waits for the swap at most about as long as the swap takes (lock_timeout per
    // attempt, or the milliseconds the locks are held), never for long.
    let swap_bound = Duration::from_millis(u64::try_from(swap_ms).unwrap_or(u64::MAX));
    assert!(
        stats.worst_during_swap <= swap_bound + Duration::from_secs(1),
        "a write waited {:?} during a swap of {swap_ms} ms",
        stats.worst_during_swap
    );
    assert!(
        stats.worst < Duration::from_secs(5),
        "a write waited {:?}",
        stats.worst
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The source's definition, the destination's rows, an unprivileged application role, TRUNCATE.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserved_table_takes_the_source_shape_and_the_app_keeps_writing() -> anyhow::Result<()> {
    let p = common::pair("pres_shape").await;
    // The source drops `legacy`, widens `n` to bigint and adds `w` with a default.
    p.source
        .batch(
            "CREATE TABLE account (id serial PRIMARY KEY, name text NOT NULL, n bigint,
                                   w text NOT NULL DEFAULT 'new');
             CREATE TABLE note (id int PRIMARY KEY, body text);
             CREATE TABLE ticket (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, t text);
             INSERT INTO account (name, n) VALUES ('source a', 1), ('source b', 2);
             INSERT INTO note VALUES (1, 'source note');
             INSERT INTO ticket (t) VALUES ('source ticket');",
        )
        .await?;
    let role = format!("app_{}", p.dest.name().rsplit('_').next().unwrap_or("x"));
    p.dest
        .batch(&format!(
            "CREATE TABLE account (id serial PRIMARY KEY, name text NOT NULL, legacy text, n int);
             CREATE TABLE note (id int PRIMARY KEY, body text);
             INSERT INTO account (name, legacy, n) SELECT 'prod ' || g, 'old', g FROM generate_series(1, 5) g;
             INSERT INTO note SELECT g, 'prod note ' || g FROM generate_series(1, 3) g;
             CREATE TABLE ticket (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, t text);
             INSERT INTO ticket (t) SELECT 'prod ticket ' || g FROM generate_series(1, 3) g;
             CREATE ROLE {role} NOLOGIN;
             GRANT SELECT, INSERT, UPDATE, DELETE ON account TO {role};
             GRANT USAGE ON SEQUENCE account_id_seq TO {role};"
        ))
        .await?;
    let dst = p.dest.connect().await?;

    common::prepare_and_release(&preserving(&p, &["account", "note", "ticket"])).await?;
    assert_eq!(
        texts(
            &dst,
            r#"SELECT name || ' ' || n || ' ' || w FROM "shadow_account" ORDER BY id"#
        )
        .await,
        (1..=5)
            .map(|g| format!("prod {g} {g} new"))
            .collect::<Vec<_>>()
    );

    // The application (no privilege on the shadow tables or on schema pgzm) keeps writing.
    let app = p.dest.connect().await?;
    app.batch_execute(&format!(
        "SET ROLE {role};
         INSERT INTO account (name, legacy, n) VALUES ('app', 'x', 42);
         UPDATE account SET n = n * 10, legacy = 'changed' WHERE id <= 2;
         UPDATE account SET id = 100 WHERE id = 3;
         DELETE FROM account WHERE id = 4;"
    ))
    .await
    .map_err(|e| anyhow::anyhow!("application write: {}", pg_error(&e)))?;
    assert_eq!(
        texts(
            &dst,
            r#"SELECT id || ' ' || name || ' ' || n || ' ' || w FROM "shadow_account" ORDER BY id"#
        )
        .await,
        vec![
            "1 prod 1 10 new",
            "2 prod 2 20 new",
            "5 prod 5 5 new",
            "6 app 42 new",
            "100 prod 3 3 new"
        ]
    );
    // TRUNCATE is mirrored too, and so is what follows it.
    dst.batch_execute("TRUNCATE note; INSERT INTO note VALUES (7, 'after truncate')")
        .await?;
    assert_in_sync(&dst, &["note"], "TRUNCATE").await;
    // Identity columns: the live sequence hands out 4 and 5.
    dst.batch_execute(
        "INSERT INTO ticket (t) VALUES ('four'), ('five'); DELETE FROM ticket WHERE id = 5",
    )
    .await?;
    assert_in_sync(&dst, &["ticket"], "inserts into an identity column").await;
    assert_ready(&common::status(&p).await, &["account", "note", "ticket"]);

    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(
        texts(
            &dst,
            "SELECT string_agg(attname::text, ',' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = 'account'::regclass AND attnum > 0 AND NOT attisdropped"
        )
        .await,
        vec!["id,name,n,w"]
    );
    assert_eq!(column_type(&dst, "account", "n").await, "bigint");
    assert_eq!(
        texts(
            &dst,
            "SELECT id || ' ' || name || ' ' || n || ' ' || w FROM account ORDER BY id"
        )
        .await,
        vec![
            "1 prod 1 10 new",
            "2 prod 2 20 new",
            "5 prod 5 5 new",
            "6 app 42 new",
            "100 prod 3 3 new"
        ]
    );
    assert_eq!(
        texts(&dst, "SELECT id || ' ' || body FROM note ORDER BY id").await,
        vec!["7 after truncate"]
    );
    // The identity sequence continues past everything the live one handed out (5, deleted).
    assert_eq!(
        int(
            &dst,
            "INSERT INTO ticket (t) VALUES ('after') RETURNING id::int8"
        )
        .await,
        6
    );
    assert_eq!(
        texts(&dst, "SELECT id || ' ' || t FROM ticket ORDER BY id").await,
        vec![
            "1 prod ticket 1",
            "2 prod ticket 2",
            "3 prod ticket 3",
            "4 four",
            "6 after"
        ]
    );
    // The application's privileges came along; its next insert gets a fresh id.
    let id: i32 = app
        .query_one(
            "INSERT INTO account (name, n) VALUES ('app after', 1) RETURNING id",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("application insert after the swap: {}", pg_error(&e)))?
        .get(0);
    assert!(id > 100, "new id {id}");
    drop(app);
    dst.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A write the shadow cannot take: recorded, never failing the application, blocking the swap.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_cannot_be_mirrored_is_recorded_and_blocks_the_swap() -> anyhow::Result<()> {
    let p = common::pair("pres_sync_error").await;
    // The source's definition is stricter than the destination's.
    p.source
        .batch(
            "CREATE TABLE tag (id serial PRIMARY KEY, label text NOT NULL CHECK (length(label) <= 10));
             INSERT INTO tag (label) VALUES ('s1');",
        )
        .await?;
    p.dest
        .batch(
            "CREATE TABLE tag (id serial PRIMARY KEY, label text NOT NULL);
             INSERT INTO tag (label) VALUES ('short'), ('tiny');",
        )
        .await?;
    let dst = p.dest.connect().await?;
    common::prepare_and_release(&preserving(&p, &["tag"])).await?;

    // The application's write succeeds although its mirror fails.
    dst.batch_execute("INSERT INTO tag (label) VALUES ('much too long for the source')")
        .await
        .map_err(|e| anyhow::anyhow!("the application's write failed: {}", pg_error(&e)))?;
    assert_eq!(inspect::row_count(&dst, "tag").await?, 3);
    assert_eq!(inspect::row_count(&dst, "shadow_tag").await?, 2);
    let st = common::status(&p).await;
    assert_eq!(st.state, "prepared", "{st:#?}");
    assert!(!st.safe_to_swap, "{st:#?}");
    assert_eq!(st.sync_errors.len(), 1, "{st:#?}");
    assert_eq!(st.sync_errors[0].table, "tag");
    assert_eq!(st.sync_errors[0].operation, "INSERT");
    assert!(
        st.sync_errors[0].message.contains("check constraint"),
        "{st:#?}"
    );

    let before = live_sums(&dst).await;
    let msg = common::swap(&p)
        .await
        .expect_err("a stale shadow must not swap")
        .to_string();
    assert!(msg.contains("could not be mirrored"), "{msg}");
    assert_eq!(live_sums(&dst).await, before, "live tables changed");
    assert_none_with_prefix(&dst, "backup_").await;

    // Preparing again copies the live rows afresh, so the offending row must be fixed first.
    let mut opts = preserving(&p, &["tag"]);
    opts.force = true;
    let msg = common::prepare_and_release(&opts)
        .await
        .expect_err("the live row violates the source's check")
        .to_string();
    assert!(
        msg.contains("\"tag\"") && msg.contains("check constraint"),
        "{msg}"
    );
    assert_none_with_prefix(&dst, "shadow_").await;
    assert_eq!(sync_triggers(&dst).await, vec![]);

    dst.batch_execute("UPDATE tag SET label = 'fixed' WHERE length(label) > 10")
        .await?;
    common::prepare_and_release(&opts).await?;
    assert_ready(&common::status(&p).await, &["tag"]);
    let kept = sum(&dst, "tag").await;
    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(sum(&dst, "tag").await, kept);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Preserved tables that cannot be preserved: refused before anything changes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_preserved_tables_are_refused_before_any_change() -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_refused", "simple").await;
    p.source
        .batch("CREATE TABLE only_src (id int PRIMARY KEY); CREATE TABLE log (n int);")
        .await?;
    p.dest.batch("CREATE TABLE log (n int);").await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let before = (
        schemas(&dst).await,
        public_objects(&dst).await,
        live_sums(&dst).await,
        public_objects(&src).await,
    );
    for (tables, expected) in [
        (
            vec!["User", "Ghost"],
            "\"Ghost\" does not exist in the source",
        ),
        (
            vec!["only_src"],
            "public.only_src does not exist in the destination",
        ),
        (vec!["log"], "public.log has no primary key"),
    ] {
        let msg = common::prepare_and_release(&preserving(&p, &tables))
            .await
            .expect_err("must be refused")
            .to_string();
        assert!(msg.contains(expected), "{tables:?}: {msg}");
        let err = common::run(preserving(&p, &tables))
            .await
            .expect_err("start must refuse too");
        assert!(err.to_string().contains(expected), "{err}");
    }
    let after = (
        schemas(&dst).await,
        public_objects(&dst).await,
        live_sums(&dst).await,
        public_objects(&src).await,
    );
    assert_eq!(after, before, "a refused run changed something");
    Ok(())
}

/// Foreign keys involving a preserved table keep their guarantee without growing the swap's
/// lock window: the swap transaction checks them (anti-joins over the shadow tables) before it
/// takes its locks, adds them `NOT VALID` under the locks, and validates them after the commit
/// (issue 12, item 13). Nothing of the validation work is between the lock and the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserved_foreign_keys_are_checked_before_the_locks_and_validated_after(
) -> anyhow::Result<()> {
    let p = common::fixture_pair("pres_fk_window", "tes").await;
    let dst = p.dest.connect().await?;
    let report = common::prepare_and_release(&preserving(&p, &TES_PRESERVED)).await?;
    let plan = &report.plan;
    assert!(!plan.deferred_checks.is_empty(), "{:?}", plan.deferred);
    assert_eq!(plan.deferred_checks.len(), plan.deferred_validations.len());
    let sql = pgzm_coordinator::swap::swap_sql(plan, None, Duration::from_millis(50));
    // The golden text (PostgreSQL 15's deparsing), migration id elided.
    if let Some(text) = checks::golden_text(&dst, &sql, plan.migration_id).await {
        insta::assert_snapshot!("swap_tes_preserved", text);
    }
    let locked = sql.find("LOCK TABLE").expect("the swap locks");
    let window = &sql[locked..];
    for check in &plan.deferred_checks {
        let at = sql.find(check.as_str()).expect("the check is in the swap");
        assert!(at < locked, "a check runs under the locks: {check}");
    }
    assert!(!window.contains("VALIDATE CONSTRAINT"), "{window}");
    assert!(!window.contains("NOT EXISTS (SELECT 1 FROM"), "{window}");
    let adds = window.matches("NOT VALID").count();
    assert!(adds >= plan.deferred_validations.len(), "{window}");

    common::swap(&p).await?;
    assert_swapped_clean(&dst).await;
    assert_eq!(unvalidated_fks(&dst).await, Vec::<String>::new());
    for (table, name) in &plan.deferred_validations {
        let validated = int(
            &dst,
            &format!(
                "SELECT count(*) FROM pg_constraint WHERE conname = '{name}' AND convalidated \
                 AND conrelid = '{}'::regclass",
                table.quoted()
            ),
        )
        .await;
        assert_eq!(validated, 1, "{table}.{name}");
    }
    Ok(())
}
