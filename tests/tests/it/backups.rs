//! Backups and operations (issue 4): `list`, `verify`, `rollback` (with `--keep-tables`),
//! `cleanup`, dry runs of every writing command, sequential migrations; scenarios 3 and 9 of
//! the original tool. Everything runs against real PostgreSQL servers through the
//! coordinator's library API (what the `pgzm` commands call).

use crate::checks;
use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use checks::{
    assert_fails_with, assert_same_signature, backup_sums, boolean, checksum, column_type, int,
    live_sums, signature, texts,
};
use common::{dest_url, locks, ENVELOPE, GEOMETRY_TABLES, TES_PRESERVED};
use pgzm_coordinator::backup::{self, BackupSet};
use pgzm_coordinator::rollback::{rollback, RollbackReport};
use pgzm_coordinator::swap::SwapSettings;
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::inspect::{self, CatalogSignature, TableChecksum};
use pgzm_tests::{quote_ident, TestDb};
use tokio_postgres::Client;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn list(p: &common::Pair) -> Vec<BackupSet> {
    backup::list(&dest_url(p)).await.expect("pgzm list")
}

/// `pgzm rollback --latest`, which must succeed without warnings.
async fn rollback_latest(p: &common::Pair) -> RollbackReport {
    let report = rollback(common::rollback_options(p))
        .await
        .expect("pgzm rollback");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    report
}

/// Every relation (any kind) and type of `public` whose name starts with one of the work
/// prefixes (`backup_`, `shadow_`, `rolledback_`, also as the array type `_prefix…`), compared
/// with `left()` rather than `LIKE`.
async fn work_objects(client: &Client) -> Vec<String> {
    texts(
        client,
        "SELECT 'relation ' || c.relkind::text || ' ' || c.relname::text FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace
           AND (left(c.relname, 7) IN ('backup_', 'shadow_') OR left(c.relname, 11) = 'rolledback_')
         UNION ALL
         SELECT 'type ' || t.typname::text FROM pg_type t
         WHERE t.typnamespace = 'public'::regnamespace
           AND (left(t.typname, 7) IN ('backup_', 'shadow_') OR left(t.typname, 8) IN ('_backup_', '_shadow_')
                OR left(t.typname, 11) = 'rolledback_' OR left(t.typname, 12) = '_rolledback_')
         UNION ALL
         SELECT 'constraint ' || conname::text FROM pg_constraint
         WHERE connamespace = 'public'::regnamespace
           AND (left(conname, 7) IN ('backup_', 'shadow_') OR left(conname, 11) = 'rolledback_')
         ORDER BY 1",
    )
    .await
}

/// Every sequence of `public` with its position.
async fn sequences(client: &Client) -> Vec<inspect::SequenceState> {
    inspect::sequences(client).await.expect("sequences")
}

/// Status of migration `id` in `pgzm.migrations`, and whether its backup is present.
async fn migration_state(client: &Client, id: i64) -> (String, bool) {
    let row = client
        .query_one(
            "SELECT status, backup_present FROM pgzm.migrations WHERE id = $1",
            &[&id],
        )
        .await
        .expect("read pgzm.migrations");
    (row.get(0), row.get(1))
}

/// Every foreign key in `public` as (table, constraint, referenced table, validated).
async fn foreign_keys(client: &Client) -> Vec<(String, String, String, bool)> {
    client
        .query(
            "SELECT c.relname::text, k.conname::text, r.relname::text, k.convalidated
             FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
             JOIN pg_class r ON r.oid = k.confrelid
             WHERE k.contype = 'f' AND c.relnamespace = 'public'::regnamespace ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("list foreign keys")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// (live name, backup name, rows now, rows at the swap, present) of a listed backup table.
type ListedTable = (String, String, Option<i64>, Option<i64>, bool);

fn refusal(err: &CoordinatorError) -> String {
    assert!(
        matches!(err, CoordinatorError::Refused(_)),
        "expected a refusal, got {err:?}"
    );
    err.to_string()
}

// ---------------------------------------------------------------------------------------------
// Whole-database snapshot for dry runs
// ---------------------------------------------------------------------------------------------

/// Everything observable of one database that a dry run must leave alone: the content of every
/// table of every non-system schema (`pgzm` included), every sequence's position, a catalog
/// listing with oids and relfilenodes (so a drop-and-recreate or a rewrite shows), and the
/// harness's normalised signatures of the live, `backup_` and `shadow_` tables.
#[derive(Debug, PartialEq)]
struct Snapshot {
    sums: BTreeMap<String, TableChecksum>,
    sequences: BTreeMap<String, (i64, bool)>,
    catalog: Vec<String>,
    live: CatalogSignature,
    backup: CatalogSignature,
    shadow: CatalogSignature,
}

const USER_SCHEMAS: &str = "SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
      AND nspname NOT LIKE 'pg\\_temp\\_%' AND nspname NOT LIKE 'pg\\_toast\\_temp\\_%'";

const NOT_EXTENSION: &str = "NOT EXISTS (SELECT 1 FROM pg_depend d
    WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

async fn snapshot(db: &TestDb) -> Snapshot {
    let client = db.connect().await.expect("connect");
    let tables = client
        .query(
            &format!(
                "WITH ns AS ({USER_SCHEMAS})
                 SELECT ns.nspname::text, c.relname::text, c.relkind::text FROM pg_class c
                 JOIN ns ON ns.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p', 'S') AND {NOT_EXTENSION} ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .expect("list tables of every schema");
    let mut sums = BTreeMap::new();
    let mut seqs = BTreeMap::new();
    for t in tables {
        let (schema, name, kind): (String, String, String) = (t.get(0), t.get(1), t.get(2));
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        if kind == "S" {
            let row = client
                .query_one(
                    &format!("SELECT last_value, is_called FROM {qualified}"),
                    &[],
                )
                .await
                .expect("read sequence");
            seqs.insert(qualified, (row.get(0), row.get(1)));
            continue;
        }
        sums.insert(qualified.clone(), checksum(&client, &qualified).await);
    }
    let catalog = texts(
        &client,
        &format!(
            "WITH ns AS ({USER_SCHEMAS})
             SELECT 'schema ' || nspname FROM ns
             UNION ALL
             SELECT format('relation %s.%I kind=%s oid=%s filenode=%s persistence=%s',
                           ns.nspname, c.relname, c.relkind, c.oid, c.relfilenode, c.relpersistence)
             FROM pg_class c JOIN ns ON ns.oid = c.relnamespace
             UNION ALL
             SELECT format('type %s.%I oid=%s kind=%s labels=%s', ns.nspname, t.typname, t.oid, t.typtype,
                           (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                            FROM pg_enum e WHERE e.enumtypid = t.oid))
             FROM pg_type t JOIN ns ON ns.oid = t.typnamespace
             UNION ALL
             SELECT format('constraint %s on %s: %s validated=%s', k.conname, k.conrelid::regclass,
                           pg_get_constraintdef(k.oid), k.convalidated)
             FROM pg_constraint k JOIN ns ON ns.oid = k.connamespace
             UNION ALL
             SELECT format('index %s: %s valid=%s', i.indexrelid::regclass,
                           pg_get_indexdef(i.indexrelid), i.indisvalid)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN ns ON ns.oid = c.relnamespace
             UNION ALL
             SELECT format('trigger %s on %s: %s enabled=%s', t.tgname, t.tgrelid::regclass,
                           pg_get_triggerdef(t.oid), t.tgenabled)
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN ns ON ns.oid = c.relnamespace
             UNION ALL
             SELECT format('function %s: %s', p.oid::regprocedure, md5(coalesce(p.prosrc, '')))
             FROM pg_proc p JOIN ns ON ns.oid = p.pronamespace
             UNION ALL
             SELECT format('view %s: %s', c.oid::regclass, pg_get_viewdef(c.oid))
             FROM pg_class c JOIN ns ON ns.oid = c.relnamespace WHERE c.relkind IN ('v', 'm')
             UNION ALL
             SELECT format('extension %s %s in %s', extname, extversion, extnamespace::regnamespace)
             FROM pg_extension
             ORDER BY 1"
        ),
    )
    .await;
    Snapshot {
        sums,
        sequences: seqs,
        catalog,
        live: signature(&client).await,
        backup: inspect::catalog_signature(&client, Some("backup_"))
            .await
            .expect("backup signature"),
        shadow: inspect::catalog_signature(&client, Some("shadow_"))
            .await
            .expect("shadow signature"),
    }
}

/// Snapshots of (source, destination).
async fn snapshots(p: &common::Pair) -> (Snapshot, Snapshot) {
    (snapshot(&p.source).await, snapshot(&p.dest).await)
}

fn assert_unchanged(before: &(Snapshot, Snapshot), after: &(Snapshot, Snapshot), what: &str) {
    for (side, b, a) in [
        ("source", &before.0, &after.0),
        ("destination", &before.1, &after.1),
    ] {
        assert_eq!(
            b.sums, a.sums,
            "{what}: table contents of the {side} changed"
        );
        assert_eq!(
            b.sequences, a.sequences,
            "{what}: sequences of the {side} changed"
        );
        let removed: Vec<&String> = b
            .catalog
            .iter()
            .filter(|l| !a.catalog.contains(l))
            .collect();
        let added: Vec<&String> = a
            .catalog
            .iter()
            .filter(|l| !b.catalog.contains(l))
            .collect();
        assert!(
            removed.is_empty() && added.is_empty(),
            "{what}: catalog of the {side} changed\n  gone: {removed:#?}\n  new: {added:#?}"
        );
        assert_same_signature(&b.live, &a.live, &format!("{what}: {side} live tables"));
        assert_same_signature(&b.backup, &a.backup, &format!("{what}: {side} backup set"));
        assert_same_signature(&b.shadow, &a.shadow, &format!("{what}: {side} shadow set"));
        assert_eq!(b, a, "{what}: {side}");
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: rollback after post-migration edits (simple schema)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_post_migration_edits_restores_the_old_destination() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_rollback", "simple").await;
    let dst = p.dest.connect().await?;
    let src = p.source.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let seqs_before = sequences(&dst).await;
    let fks_before = foreign_keys(&dst).await;
    let src_sums = live_sums(&src).await;
    assert_ne!(sums_before, src_sums, "the fixture's sides must differ");

    let report = common::migrate(&p).await?;
    assert_eq!(
        live_sums(&dst).await,
        src_sums,
        "the migration went through"
    );

    // Production keeps working on the new tables: insert, update, delete.
    dst.batch_execute(
        r#"INSERT INTO "User"(name, email) VALUES ('After Swap', 'after@example.com');
           UPDATE "Post" SET title = 'Edited after the swap' WHERE id = 101;
           DELETE FROM "Comment" WHERE id = 202;"#,
    )
    .await?;

    // `list`: exactly one backup set, the migration's, with its three tables and row counts.
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1, "{sets:#?}");
    let set = &sets[0];
    assert_eq!(set.timestamp, report.migration_id);
    assert_eq!(set.table_count, 3);
    assert!(!set.created.is_empty());
    assert!(set.bytes > 0, "{set:#?}");
    assert!(set.age_seconds >= 0.0);
    let mut tables: Vec<ListedTable> = set
        .tables
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.backup.clone(),
                t.rows,
                t.rows_at_swap,
                t.present,
            )
        })
        .collect();
    tables.sort();
    let expected: Vec<ListedTable> = ["Comment", "Post", "User"]
        .iter()
        .map(|t| (t.to_string(), format!("backup_{t}"), Some(2), Some(2), true))
        .collect();
    assert_eq!(tables, expected);
    for t in &set.tables {
        assert!(t.bytes.is_some_and(|b| b > 0), "{t:?}");
    }

    // `verify`: valid, and every check holds; it covers every table, key and sequence.
    let v = backup::verify(&dest_url(&p), None).await?;
    assert!(v.valid, "{v:#?}");
    assert_eq!(v.timestamp, report.migration_id);
    assert!(
        v.checks.iter().all(|c| c.ok && c.detail.is_none()),
        "{v:#?}"
    );
    let checks: Vec<&str> = v.checks.iter().map(|c| c.check.as_str()).collect();
    for t in ["User", "Post", "Comment"] {
        for expected in [
            format!("backup table public.\"backup_{t}\" exists"),
            format!("live table public.\"{t}\" exists"),
            format!("public.\"backup_{t}\" still holds the 2 rows it had at the swap"),
            format!("primary key of public.\"backup_{t}\" has no NULL"),
            format!("backup sequence public.\"backup_{t}_id_seq\" exists"),
        ] {
            assert!(
                checks.contains(&expected.as_str()),
                "{expected}: {checks:#?}"
            );
        }
    }
    for fk in [
        "Post_user_id_fkey",
        "Comment_post_id_fkey",
        "Comment_user_id_fkey",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c.starts_with(&format!("foreign key \"{fk}\""))),
            "{fk}: {checks:#?}"
        );
    }
    assert_eq!(
        v.timestamp,
        backup::verify(&dest_url(&p), Some(report.migration_id))
            .await?
            .timestamp
    );

    // `rollback --latest`.
    let r = rollback_latest(&p).await;
    assert_eq!(r.timestamp, report.migration_id);
    assert!(!r.dry_run);
    let mut restored = r.restored.clone();
    restored.sort();
    assert_eq!(restored, ["Comment", "Post", "User"]);
    assert!(r.kept.is_empty() && r.dropped.is_empty(), "{r:?}");
    assert!(r.attempts >= 1);

    // Exactly the pre-migration rows; the post-migration edits are gone.
    assert_eq!(live_sums(&dst).await, sums_before);
    assert_eq!(
        texts(&dst, r#"SELECT name FROM "User" ORDER BY id"#).await,
        ["John Doe", "Jane Smith"]
    );
    assert_eq!(
        texts(&dst, r#"SELECT title FROM "Post" ORDER BY id"#).await,
        ["First Post", "Second Post"]
    );
    assert_eq!(int(&dst, r#"SELECT count(*) FROM "Comment""#).await, 2);
    // The same definitions under the same names (indexes, constraints: no `backup_` names),
    // the same sequences at the same positions, the same foreign keys, all validated.
    assert_same_signature(&signature(&dst).await, &sig_before, "after the rollback");
    assert_eq!(sequences(&dst).await, seqs_before);
    assert_eq!(foreign_keys(&dst).await, fks_before);
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_eq!(
        inspect::tables(&dst).await?,
        ["Comment", "Post", "User"],
        "nothing but the three tables"
    );
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert!(inspect::triggers(&dst).await?.is_empty());
    assert!(inspect::functions(&dst).await?.is_empty());

    // The backup set is consumed.
    assert!(list(&p).await.is_empty());
    assert_eq!(
        migration_state(&dst, report.migration_id).await,
        ("rolled_back".to_string(), false)
    );
    let again = rollback(common::rollback_options(&p))
        .await
        .expect_err("a second rollback has nothing to restore");
    assert!(refusal(&again).contains("no backup set"), "{again}");
    let err = backup::verify(&dest_url(&p), None)
        .await
        .expect_err("nothing left to verify");
    assert!(refusal(&err).contains("no backup set"), "{err}");

    // The application keeps working: sequences continue after the restored data.
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "User"(name, email) VALUES ('New', 'new@example.com') RETURNING id::int8"#
        )
        .await,
        3
    );
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "Post"(title, content, user_id) VALUES ('t', 'c', 3) RETURNING id::int8"#
        )
        .await,
        103
    );
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "Comment"(post_id, user_id, content) VALUES (103, 3, 'c') RETURNING id::int8"#
        )
        .await,
        203
    );
    // The source was never touched.
    assert_eq!(live_sums(&src).await, src_sums);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 9: TES rollback with geometry verification
// ---------------------------------------------------------------------------------------------

/// `gid: ST_AsText(geom)` of every row of every geometry table.
async fn geometries(client: &Client) -> BTreeMap<&'static str, Vec<String>> {
    let mut out = BTreeMap::new();
    for t in GEOMETRY_TABLES {
        out.insert(
            t,
            texts(
                client,
                &format!(
                    "SELECT gid::text || ': ' || ST_AsText(geom) || ' srid ' || ST_SRID(geom) \
                     FROM {} ORDER BY gid",
                    quote_ident(t)
                ),
            )
            .await,
        );
    }
    out
}

/// (index, table, valid, ready) of every GiST index of `public`.
async fn gist_indexes(client: &Client) -> Vec<(String, String, bool, bool)> {
    client
        .query(
            "SELECT x.relname::text, c.relname::text, i.indisvalid, i.indisready
             FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid
             JOIN pg_class c ON c.oid = i.indrelid JOIN pg_am a ON a.oid = x.relam
             WHERE c.relnamespace = 'public'::regnamespace AND a.amname = 'gist' ORDER BY 1",
            &[],
        )
        .await
        .expect("list gist indexes")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Every enum of `public`: (oid, name, labels in order).
async fn enums(client: &Client) -> Vec<(u32, String, String)> {
    client
        .query(
            "SELECT t.oid, t.typname::text, string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
             FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid
             WHERE t.typnamespace = 'public'::regnamespace GROUP BY t.oid, t.typname ORDER BY 2",
            &[],
        )
        .await
        .expect("list enums")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tes_rollback_restores_geometries_indexes_and_enums() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_tes_rollback", "tes").await;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let seqs_before = sequences(&dst).await;
    let geoms_before = geometries(&dst).await;
    let gist_before = gist_indexes(&dst).await;
    let enums_before = enums(&dst).await;
    assert_eq!(gist_before.len(), 7, "{gist_before:?}");
    assert!(gist_before
        .iter()
        .all(|(_, _, valid, ready)| *valid && *ready));
    assert_eq!(enums_before.len(), 3, "{enums_before:?}");
    assert_eq!(
        geoms_before["Area"][0],
        "1: MULTIPOLYGON(((-77.46 37.55,-77.459 37.55,-77.459 37.551,-77.46 37.551,-77.46 37.55))) srid 4326"
    );

    let report = common::run(common::preserving(&p, &TES_PRESERVED)).await?;
    // The migration really moved every geometry (+0.001°), so the rollback has work to do.
    let geoms_migrated = geometries(&dst).await;
    for t in GEOMETRY_TABLES {
        assert_ne!(geoms_migrated[t], geoms_before[t], "{t} was not migrated");
    }
    assert_eq!(
        texts(&dst, &common::areas_in_envelope()).await,
        ["110010003001_001", "510750001001_001"],
        "the migrated geometries are live"
    );

    let r = rollback_latest(&p).await;
    assert_eq!(r.timestamp, report.migration_id);
    assert_eq!(r.restored.len(), 15, "{r:?}");

    // Every geometry is back to its original coordinates, row by row.
    let geoms_after = geometries(&dst).await;
    for t in GEOMETRY_TABLES {
        assert_eq!(geoms_after[t], geoms_before[t], "geometries of {t}");
    }
    assert!(
        boolean(
            &dst,
            "SELECT bool_and(ST_IsValid(geom) AND ST_SRID(geom) = 4326) FROM \"Area\""
        )
        .await
    );
    // All rows, the whole catalog and every sequence are the pre-migration ones.
    assert_eq!(live_sums(&dst).await, sums_before);
    assert_same_signature(&signature(&dst).await, &sig_before, "after the rollback");
    assert_eq!(sequences(&dst).await, seqs_before);

    // GiST indexes: same names, same tables, valid and ready, and used by a spatial query.
    assert_eq!(gist_indexes(&dst).await, gist_before);
    dst.batch_execute("SET enable_seqscan = off").await?;
    let plan = texts(
        &dst,
        &format!(r#"EXPLAIN SELECT id FROM "Area" WHERE ST_Intersects(geom, {ENVELOPE})"#),
    )
    .await
    .join("\n");
    assert!(plan.contains("area_idx"), "{plan}");
    assert_eq!(
        texts(&dst, &common::areas_in_envelope()).await,
        ["110010003001_001"],
        "the envelope sees only the old data again"
    );
    dst.batch_execute("RESET enable_seqscan").await?;

    // PostGIS still lives in public and works on the restored data.
    assert_eq!(
        texts(
            &dst,
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'postgis'"
        )
        .await,
        ["public"]
    );
    assert!(
        boolean(
            &dst,
            "SELECT public.ST_Area(public.ST_Union(geom)) > 0 AND public.postgis_lib_version() <> '' FROM \"Area\""
        )
        .await
    );
    assert!(
        boolean(
            &dst,
            r#"SELECT ST_Distance(ST_Transform(geom, 3857), ST_Transform(ST_SetSRID(ST_MakePoint(-77.46, 37.55), 4326), 3857)) < 1e-6
               FROM "State" WHERE gid = 1"#
        )
        .await,
        "ST_Transform works and State 1 is back at POINT(-77.46 37.55)"
    );

    // Enums: the original types (same oids), same labels, used by the restored columns.
    assert_eq!(enums(&dst).await, enums_before);
    assert_eq!(
        column_type(&dst, r#""TreeCanopy""#, "city").await,
        r#""City""#
    );
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "TreeCanopy"(geom, city) VALUES
               (ST_GeomFromText('MULTIPOLYGON(((0 0,1 0,1 1,0 1,0 0)))', 4326), 'BOSTON')
               RETURNING gid::int8"#
        )
        .await,
        5,
        "the restored sequence continues after the restored data"
    );

    // Keys hold; nothing of the migration remains.
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert!(foreign_keys(&dst)
        .await
        .iter()
        .all(|(_, _, _, valid)| *valid));
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert!(inspect::triggers(&dst).await?.is_empty());
    assert!(inspect::functions(&dst).await?.is_empty());
    assert!(list(&p).await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --keep-tables
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_keep_tables_keeps_the_live_data_of_kept_tables() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_keep", "simple").await;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let fks_before = foreign_keys(&dst).await;

    common::migrate(&p).await?;
    dst.batch_execute(
        r#"INSERT INTO "User"(name, email) VALUES ('Signed Up Later', 'later@example.com');
           UPDATE "User" SET name = 'Renamed After Swap' WHERE id = 2;
           UPDATE "Post" SET title = 'This edit must go' WHERE id = 101;"#,
    )
    .await?;
    let users_after_edits = live_sums(&dst).await["User"].clone();
    assert_eq!(users_after_edits.rows, 3);

    let mut opts = common::rollback_options(&p);
    opts.keep_tables = vec!["User".into()];
    let r = rollback(opts).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.kept, ["User"]);
    let mut restored = r.restored.clone();
    restored.sort();
    assert_eq!(restored, ["Comment", "Post"]);

    // User: the current rows, including the new one; the others: the pre-migration rows.
    let sums = live_sums(&dst).await;
    assert_eq!(sums["User"], users_after_edits);
    assert_eq!(
        texts(&dst, r#"SELECT name FROM "User" ORDER BY id"#).await,
        ["John Doe Modified", "Renamed After Swap", "Signed Up Later"]
    );
    assert_eq!(sums["Post"], sums_before["Post"]);
    assert_eq!(sums["Comment"], sums_before["Comment"]);
    assert_eq!(
        texts(&dst, r#"SELECT title FROM "Post" ORDER BY id"#).await,
        ["First Post", "Second Post"]
    );

    // Foreign keys of the restored tables reference the kept live table, validated, no orphans.
    let user = int(&dst, r#"SELECT '"User"'::regclass::oid::int8"#).await;
    for fk in ["Post_user_id_fkey", "Comment_user_id_fkey"] {
        let confrelid = int(
            &dst,
            &format!("SELECT confrelid::oid::int8 FROM pg_constraint WHERE conname = '{fk}'"),
        )
        .await;
        assert_eq!(confrelid, user, "{fk} references the kept \"User\"");
    }
    assert_eq!(foreign_keys(&dst).await, fks_before);
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_fails_with(
        &dst,
        r#"INSERT INTO "Post"(title, content, user_id) VALUES ('x', 'y', 999)"#,
        "23503",
        "the restored foreign key is enforced",
    )
    .await;
    // Deleting a kept user cascades into the restored tables (ON DELETE CASCADE kept).
    dst.batch_execute(r#"DELETE FROM "User" WHERE id = 1"#)
        .await?;
    assert_eq!(
        int(&dst, r#"SELECT count(*) FROM "Post" WHERE user_id = 1"#).await,
        0
    );

    // Same definitions as before the migration, nothing backup_ left, the set consumed, and
    // the kept table's sequence still continues after its rows.
    assert_same_signature(
        &signature(&dst).await,
        &sig_before,
        "after keep-tables rollback",
    );
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert!(list(&p).await.is_empty());
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "User"(name, email) VALUES ('n', 'n@example.com') RETURNING id::int8"#
        )
        .await,
        4
    );
    assert_eq!(
        int(
            &dst,
            r#"INSERT INTO "Post"(title, content, user_id) VALUES ('t', 'c', 4) RETURNING id::int8"#
        )
        .await,
        104,
        "the restored sequence of Post: 103 went to the refused insert above"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Destination-only table and view
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_repoints_destination_only_foreign_keys_and_views() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_dest_only", "simple").await;
    let dst = p.dest.connect().await?;
    dst.batch_execute(
        r#"CREATE TABLE "PostAudit" (
               id serial PRIMARY KEY,
               post_id int NOT NULL CONSTRAINT "PostAudit_post_id_fkey"
                   REFERENCES "Post"(id) ON DELETE CASCADE,
               note text);
           INSERT INTO "PostAudit"(post_id, note) VALUES (101, 'a'), (102, 'b'), (102, 'c');
           CREATE VIEW post_titles AS
               SELECT p.id, p.title, u.name AS author FROM "Post" p JOIN "User" u ON u.id = p.user_id;
           COMMENT ON VIEW post_titles IS 'titles with authors';"#,
    )
    .await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let fks_before = foreign_keys(&dst).await;
    let view_sql = "SELECT id || ' ' || title || ' by ' || author FROM post_titles ORDER BY id";
    let view_before = texts(&dst, view_sql).await;
    assert_eq!(
        view_before,
        [
            "101 First Post by John Doe",
            "102 Second Post by Jane Smith"
        ]
    );
    let view_def = "SELECT pg_get_viewdef('post_titles'::regclass)";
    let view_def_before = texts(&dst, view_def).await;
    let fk_def = r#"SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'PostAudit_post_id_fkey'"#;
    let fk_def_before = texts(&dst, fk_def).await;

    common::migrate(&p).await?;
    assert_eq!(
        texts(&dst, view_sql).await,
        [
            "101 First Post Modified by John Doe Modified",
            "102 Second Post Modified by Jane Smith Modified"
        ],
        "the view reads the migrated tables"
    );

    rollback_latest(&p).await;
    let post = int(&dst, r#"SELECT '"Post"'::regclass::oid::int8"#).await;
    assert_eq!(
        int(
            &dst,
            r#"SELECT confrelid::oid::int8 FROM pg_constraint WHERE conname = 'PostAudit_post_id_fkey'"#
        )
        .await,
        post,
        "the destination-only FK references the restored \"Post\""
    );
    assert_eq!(texts(&dst, fk_def).await, fk_def_before);
    assert_eq!(
        foreign_keys(&dst).await,
        fks_before,
        "all validated, same targets"
    );
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_eq!(texts(&dst, view_sql).await, view_before);
    assert_eq!(texts(&dst, view_def).await, view_def_before);
    assert_eq!(
        texts(
            &dst,
            "SELECT obj_description('post_titles'::regclass, 'pg_class')"
        )
        .await,
        ["titles with authors"]
    );
    assert_eq!(live_sums(&dst).await, sums_before);
    assert_same_signature(&signature(&dst).await, &sig_before, "after the rollback");
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());

    // The re-pointed key is live: enforced, and cascades from the restored table.
    assert_fails_with(
        &dst,
        r#"INSERT INTO "PostAudit"(post_id, note) VALUES (999, 'x')"#,
        "23503",
        "FK enforced",
    )
    .await;
    dst.batch_execute(r#"DELETE FROM "Post" WHERE id = 102"#)
        .await?;
    assert_eq!(int(&dst, r#"SELECT count(*) FROM "PostAudit""#).await, 1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sequential migrations, then cleanup
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_migrations_keep_one_backup_set_then_cleanup_drops_it() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_three", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let original = live_sums(&dst).await;

    // 1: start.
    let v1 = live_sums(&src).await;
    let r1 = common::migrate(&p).await?;
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].timestamp, r1.migration_id);
    assert_eq!(backup_sums(&dst).await, original);

    // 2: prepare + swap. Until the swap, the first backup set stays the current one.
    src.batch_execute(r#"UPDATE "User" SET name = name || ' v2'"#)
        .await?;
    let v2 = live_sums(&src).await;
    let r2 = common::prepare_and_release(&common::options(&p)).await?;
    assert!(r2.migration_id > r1.migration_id);
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1, "{sets:#?}");
    assert_eq!(
        sets[0].timestamp, r1.migration_id,
        "a prepare does not replace the backup set"
    );
    assert_eq!(backup_sums(&dst).await, original);
    assert!(backup::verify(&dest_url(&p), None).await?.valid);
    let s2 = common::swap(&p).await?;
    assert_eq!(s2.migration_id, r2.migration_id);
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1, "{sets:#?}");
    assert_eq!(sets[0].timestamp, r2.migration_id);
    assert_eq!(live_sums(&dst).await, v2);
    assert_eq!(
        backup_sums(&dst).await,
        v1,
        "the backup is the first migration's result"
    );
    // Its age is that of its swap, not of its prepare: a cut-off between the two keeps it.
    let c = backup::cleanup(&dest_url(&p), r2.migration_id + 1, false).await?;
    assert!(c.backup_sets.is_empty(), "{c:?}");
    assert_eq!(list(&p).await.len(), 1);

    // 3: start again.
    src.batch_execute(
        r#"UPDATE "Post" SET title = title || ' v3'; DELETE FROM "Comment" WHERE id = 202"#,
    )
    .await?;
    let v3 = live_sums(&src).await;
    let r3 = common::migrate(&p).await?;
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1, "{sets:#?}");
    assert_eq!(sets[0].timestamp, r3.migration_id);
    assert_eq!(sets[0].table_count, 3);
    assert_eq!(live_sums(&dst).await, v3);
    assert_eq!(backup_sums(&dst).await, v2);
    assert!(backup::verify(&dest_url(&p), None).await?.valid);
    for old in [r1.migration_id, r2.migration_id] {
        assert_eq!(
            migration_state(&dst, old).await,
            ("swapped".to_string(), false)
        );
    }
    assert_eq!(
        inspect::tables(&dst).await?,
        [
            "Comment",
            "Post",
            "User",
            "backup_Comment",
            "backup_Post",
            "backup_User"
        ]
    );

    // A cut-off before the backup set's timestamp drops nothing.
    for before in [r3.migration_id, backup::parse_before("2000-01-01")?] {
        let c = backup::cleanup(&dest_url(&p), before, false).await?;
        assert!(c.backup_sets.is_empty() && c.objects.is_empty(), "{c:?}");
        assert_eq!(list(&p).await.len(), 1);
        assert_eq!(backup_sums(&dst).await, v2);
    }

    // A cut-off a day from now drops it, and only it.
    let tomorrow = pgzm_coordinator::migrate::now_ms() + 86_400_000;
    let before = backup::parse_before(&tomorrow.to_string())?;
    assert_eq!(before, tomorrow);
    let c = backup::cleanup(&dest_url(&p), before, false).await?;
    assert!(!c.dry_run);
    assert_eq!(c.backup_sets, [r3.migration_id]);
    for t in ["backup_User", "backup_Post", "backup_Comment"] {
        assert!(
            c.objects.contains(&format!("table {t}")),
            "{t}: {:?}",
            c.objects
        );
    }
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert!(list(&p).await.is_empty());
    assert_eq!(inspect::tables(&dst).await?, ["Comment", "Post", "User"]);
    assert_eq!(
        live_sums(&dst).await,
        v3,
        "cleanup leaves the live tables alone"
    );
    assert_eq!(
        migration_state(&dst, r3.migration_id).await,
        ("swapped".to_string(), false)
    );
    // Nothing left to restore or to clean.
    let err = rollback(common::rollback_options(&p))
        .await
        .expect_err("no backup");
    assert!(refusal(&err).contains("no backup set"), "{err}");
    let c = backup::cleanup(&dest_url(&p), before, false).await?;
    assert!(c.backup_sets.is_empty(), "{c:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --before parsing
// ---------------------------------------------------------------------------------------------

#[test]
fn parse_before_accepts_dates_and_epoch_ms_and_rejects_the_rest() {
    const DAY: i64 = 86_400_000;
    // 2024-02-29T00:00:00Z
    const LEAP: i64 = 1_709_164_800_000;
    for (text, ms) in [
        ("0", 0),
        // All digits is always epoch milliseconds, even when it looks like a year.
        ("2024", 2024),
        ("1700000000000", 1_700_000_000_000),
        ("  1700000000000 ", 1_700_000_000_000),
        ("1970-01-01", 0),
        ("1970-01-02", DAY),
        ("2024-02-29", LEAP),
        ("2024-03-01", LEAP + DAY),
        ("2000-03-01", 951_868_800_000),
        ("2024-02-29 12:30", LEAP + 45_000_000),
        ("2024-02-29 12:30:15", LEAP + 45_015_000),
        ("2024-02-29T12:30", LEAP + 45_000_000),
        ("2024-02-29T12:30:15", LEAP + 45_015_000),
        ("2024-02-29T12:30:15Z", LEAP + 45_015_000),
        ("2024-02-29T23:59:59Z", LEAP + DAY - 1000),
        ("2024-02-29T12:30:15.250Z", LEAP + 45_015_250),
        ("2024-02-29T12:30:15+00:00", LEAP + 45_015_000),
        ("2024-02-29T14:30:15+02:00", LEAP + 45_015_000),
        ("2024-02-29T07:30:15-05:00", LEAP + 45_015_000),
    ] {
        match backup::parse_before(text) {
            Ok(v) => assert_eq!(v, ms, "{text:?}"),
            Err(e) => panic!("{text:?} rejected: {e}"),
        }
    }
    for bad in [
        "",
        "   ",
        "yesterday",
        "now",
        "-1",
        "12.5",
        "1e12",
        "99999999999999999999999",
        "2024-02",
        "2024-1-01",
        "24-01-01",
        "2024-00-10",
        "2024-13-01",
        "2024-01-00",
        "2024-01-32",
        "2023-02-29",
        "2024-02-30",
        "2024-04-31",
        "2024-01-01-01",
        "2024/01/01",
        "01-02-2024",
        "2024-01-01 24:00",
        "2024-01-01 12:60",
        "2024-01-01 12:00:61",
        "2024-01-01 12",
        "2024-01-01T",
        "2024-01-01 1:00",
        "2024-01-01T12:00:00ZZ",
        "2024-01-01T12:00:00+25:00",
        "2024-01-01 12:00 tomorrow",
    ] {
        let err = backup::parse_before(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was accepted"));
        assert!(
            matches!(err, CoordinatorError::Usage(_)),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains("--before"), "{err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Dry runs change nothing anywhere
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dry_run_leaves_both_databases_unchanged() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_dry", "simple").await;
    // A destination-only view and FK, so the dry runs have more to (not) touch.
    p.dest
        .batch(
            r#"CREATE TABLE "Note"(id int PRIMARY KEY, user_id int REFERENCES "User"(id), body text);
               INSERT INTO "Note" VALUES (1, 1, 'n');
               CREATE VIEW user_names AS SELECT id, name FROM "User";"#,
        )
        .await?;

    // start --dry-run (no pgzm metadata exists yet: none may be created).
    let before = snapshots(&p).await;
    let mut opts = common::options(&p);
    opts.dry_run = true;
    let report = common::run(opts.clone()).await?;
    assert!(report.dry_run && report.swap.is_none(), "{report:?}");
    assert_unchanged(&before, &snapshots(&p).await, "start --dry-run");
    assert!(!before.1.catalog.iter().any(|l| l == "schema pgzm"));

    // prepare --dry-run.
    let prepared = common::prepare(&opts)
        .await?
        .expect("dry-run prepare report");
    assert!(prepared.report.dry_run);
    drop(prepared);
    assert_unchanged(&before, &snapshots(&p).await, "prepare --dry-run");

    // swap --dry-run after a real prepare.
    let real = common::prepare_and_release(&common::options(&p)).await?;
    let prepared_state = snapshots(&p).await;
    assert_ne!(
        prepared_state.1.catalog, before.1.catalog,
        "prepare built shadow tables"
    );
    let swap_dry = common::swap_dry_run(&p).await?;
    assert!(swap_dry.dry_run && swap_dry.swap.is_none());
    assert_eq!(swap_dry.migration_id, real.migration_id);
    assert_unchanged(&prepared_state, &snapshots(&p).await, "swap --dry-run");

    // A real swap, then rollback --dry-run.
    common::swap(&p).await?;
    let swapped = snapshots(&p).await;
    let mut ropts = common::rollback_options(&p);
    ropts.dry_run = true;
    let r = rollback(ropts.clone()).await?;
    assert!(r.dry_run);
    assert_eq!(r.timestamp, real.migration_id);
    assert_eq!(r.attempts, 0);
    assert!(r.statements.len() > 3, "{:?}", r.statements);
    assert_eq!(r.statements.first().map(String::as_str), Some("BEGIN"));
    assert_eq!(r.statements.last().map(String::as_str), Some("COMMIT"));
    let all = r.statements.join(";\n");
    for expected in [
        r#"RENAME TO "User""#,
        r#"RENAME TO "Post""#,
        r#"RENAME TO "Comment""#,
        "LOCK TABLE",
        "Note_user_id_fkey",
        "user_names",
    ] {
        assert!(all.contains(expected), "{expected}: {all}");
    }
    assert_unchanged(&swapped, &snapshots(&p).await, "rollback --dry-run");
    // And with --keep-tables.
    ropts.keep_tables = vec!["User".into()];
    let r = rollback(ropts).await?;
    assert_eq!(r.kept, ["User"]);
    assert_unchanged(
        &swapped,
        &snapshots(&p).await,
        "rollback --keep-tables --dry-run",
    );

    // cleanup --dry-run: says what it would drop, drops nothing.
    let tomorrow = pgzm_coordinator::migrate::now_ms() + 86_400_000;
    let c = backup::cleanup(&dest_url(&p), tomorrow, true).await?;
    assert!(c.dry_run);
    assert_eq!(c.backup_sets, [real.migration_id]);
    for t in ["backup_User", "backup_Post", "backup_Comment"] {
        assert!(c.objects.contains(&format!("table {t}")), "{:?}", c.objects);
    }
    assert_unchanged(&swapped, &snapshots(&p).await, "cleanup --dry-run");
    assert_eq!(list(&p).await.len(), 1);

    // The real commands still work afterwards.
    let r = rollback(common::rollback_options(&p)).await?;
    assert!(!r.dry_run && r.warnings.is_empty(), "{r:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Refusals and a damaged backup set
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_refusals_and_verify_of_a_damaged_backup() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_errors", "simple").await;
    let dst = p.dest.connect().await?;

    // Nothing was ever migrated: rollback, verify refuse; list and cleanup see nothing.
    let fresh = snapshot(&p.dest).await;
    let err = rollback(common::rollback_options(&p))
        .await
        .expect_err("no backup");
    let msg = refusal(&err);
    assert!(msg.contains("no backup set"), "{msg}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    let err = backup::verify(&dest_url(&p), None)
        .await
        .expect_err("no backup");
    assert!(refusal(&err).contains("no backup set"), "{err}");
    assert!(list(&p).await.is_empty());
    let c = backup::cleanup(&dest_url(&p), i64::MAX, false).await?;
    assert!(c.backup_sets.is_empty());
    assert_eq!(
        snapshot(&p.dest).await,
        fresh,
        "the refusals changed nothing"
    );

    let report = common::migrate(&p).await?;
    let migrated = live_sums(&dst).await;
    let backups = backup_sums(&dst).await;

    // An unknown timestamp.
    let mut opts = common::rollback_options(&p);
    opts.migration_id = Some(report.migration_id + 1);
    let err = rollback(opts).await.expect_err("unknown timestamp");
    let msg = refusal(&err);
    assert!(
        msg.contains(&format!(
            "no backup set with timestamp {}",
            report.migration_id + 1
        )),
        "{msg}"
    );
    let err = backup::verify(&dest_url(&p), Some(1))
        .await
        .expect_err("unknown timestamp");
    assert!(
        refusal(&err).contains("no backup set with timestamp 1"),
        "{err}"
    );

    // --keep-tables naming a table the migration did not touch (or none at all).
    for (keep, named) in [
        (vec!["Nope".to_string()], "\"Nope\""),
        (vec!["User".into(), "user".into()], "\"user\""),
    ] {
        let mut opts = common::rollback_options(&p);
        opts.keep_tables = keep;
        let err = rollback(opts).await.expect_err("bad --keep-tables");
        let msg = refusal(&err);
        assert!(
            msg.contains("--keep-tables") && msg.contains(named),
            "{msg}"
        );
    }
    assert_eq!(
        live_sums(&dst).await,
        migrated,
        "the refusals changed nothing"
    );
    assert_eq!(backup_sums(&dst).await, backups);
    assert_eq!(list(&p).await.len(), 1);

    // Someone deletes rows from a backup table: verify says invalid and names the table.
    dst.batch_execute(r#"DELETE FROM "backup_Comment" WHERE id = 202"#)
        .await?;
    let v = backup::verify(&dest_url(&p), Some(report.migration_id)).await?;
    assert!(!v.valid, "{v:#?}");
    let failed: Vec<_> = v.checks.iter().filter(|c| !c.ok).collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(
        failed[0].check.contains("\"backup_Comment\""),
        "{failed:#?}"
    );
    assert!(failed[0].check.contains("2 rows"), "{failed:#?}");
    assert_eq!(failed[0].detail.as_deref(), Some("it holds 1"));

    // An orphan inside the set (foreign keys switched off by a superuser) is reported by name.
    dst.batch_execute(
        r#"SET session_replication_role = replica;
           DELETE FROM "backup_User" WHERE id = 2;
           SET session_replication_role = origin;"#,
    )
    .await?;
    let v = backup::verify(&dest_url(&p), None).await?;
    assert!(!v.valid);
    let failed: Vec<String> = v
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.check, c.detail.clone().unwrap_or_default()))
        .collect();
    assert!(
        failed
            .iter()
            .any(|c| c.contains("Post_user_id_fkey") && c.contains("\"backup_Post\"")),
        "{failed:#?}"
    );
    assert!(
        failed.iter().any(|c| c.contains("\"backup_User\"")),
        "{failed:#?}"
    );

    // A backup table dropped behind the tool's back: verify says so; rollback refuses cleanly.
    dst.batch_execute(r#"DROP TABLE "backup_Comment""#).await?;
    let v = backup::verify(&dest_url(&p), None).await?;
    assert!(!v.valid);
    assert!(
        v.checks
            .iter()
            .any(|c| !c.ok && c.check == "backup table public.\"backup_Comment\" exists"),
        "{v:#?}"
    );
    let sets = list(&p).await;
    let comment = sets[0]
        .tables
        .iter()
        .find(|t| t.name == "Comment")
        .expect("listed");
    assert!(
        !comment.present && comment.rows.is_none() && comment.bytes.is_none(),
        "{comment:?}"
    );
    let err = rollback(common::rollback_options(&p))
        .await
        .expect_err("incomplete backup set");
    assert!(refusal(&err).contains("backup_Comment"), "{err}");
    assert_eq!(
        live_sums(&dst).await,
        migrated,
        "the live tables are untouched"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What the migration added or changed goes away; what it replaced comes back
// ---------------------------------------------------------------------------------------------

/// Every enum and domain of `public`: (oid, name, labels).
async fn types(client: &Client) -> Vec<(u32, String, Option<String>)> {
    client
        .query(
            "SELECT t.oid, t.typname::text,
                    (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                     FROM pg_enum e WHERE e.enumtypid = t.oid)
             FROM pg_type t WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd')
             ORDER BY 2",
            &[],
        )
        .await
        .expect("list types")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_removes_added_tables_types_and_views() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_added", "simple").await;
    // The rebuilt data has a new column, a new table with a new sequence, an enum with one more
    // label than production's, and a view over the new table.
    p.source
        .batch(
            r#"ALTER TABLE "User" ADD COLUMN bio text DEFAULT 'none';
               CREATE TYPE mood AS ENUM ('happy', 'sad', 'meh');
               CREATE TABLE "Tag" (id serial PRIMARY KEY,
                                   post_id int NOT NULL REFERENCES "Post"(id), m mood NOT NULL);
               INSERT INTO "Tag"(post_id, m) VALUES (101, 'meh'), (102, 'happy');
               CREATE VIEW tag_view AS SELECT t.id, p.title, t.m FROM "Tag" t JOIN "Post" p ON p.id = t.post_id;"#,
        )
        .await?;
    // Production uses its own `mood` in a table the migration does not know about.
    p.dest
        .batch(
            r#"CREATE TYPE mood AS ENUM ('happy', 'sad');
               CREATE TABLE "Feeling" (id int PRIMARY KEY, user_id int REFERENCES "User"(id), m mood);
               INSERT INTO "Feeling" VALUES (1, 1, 'sad'), (2, 2, 'happy');"#,
        )
        .await?;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let seqs_before = sequences(&dst).await;
    let types_before = types(&dst).await;
    let fks_before = foreign_keys(&dst).await;

    common::migrate(&p).await?;
    assert_eq!(
        texts(&dst, "SELECT m::text FROM tag_view ORDER BY id").await,
        ["meh", "happy"]
    );
    assert_eq!(
        texts(
            &dst,
            "SELECT string_agg(enumlabel, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'mood'::regtype"
        )
        .await,
        ["happy,sad,meh"]
    );

    let r = rollback_latest(&p).await;
    assert_eq!(r.dropped, ["Tag"], "{r:?}");
    let mut restored = r.restored.clone();
    restored.sort();
    assert_eq!(restored, ["Comment", "Post", "User"]);

    assert_eq!(live_sums(&dst).await, sums_before);
    assert_same_signature(&signature(&dst).await, &sig_before, "after the rollback");
    assert_eq!(sequences(&dst).await, seqs_before, "Tag_id_seq is gone too");
    assert_eq!(
        types(&dst).await,
        types_before,
        "production's own mood type"
    );
    assert_eq!(foreign_keys(&dst).await, fks_before);
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_eq!(
        texts(
            &dst,
            "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'v'"
        )
        .await,
        Vec::<String>::new(),
        "the migration's view is gone"
    );
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    dst.batch_execute(r#"INSERT INTO "Feeling" VALUES (3, 1, 'happy')"#)
        .await?;
    assert!(list(&p).await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Locks: the rollback never queues behind a long transaction; it gives up cleanly
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_retries_locks_and_gives_up_without_changing_anything() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_locks", "simple").await;
    let dst = p.dest.connect().await?;
    let report = common::migrate(&p).await?;
    let migrated = live_sums(&dst).await;
    let backups = backup_sums(&dst).await;

    // A reader holds a lock on one of the tables for the whole attempt.
    let blocker = p.dest.connect().await?;
    blocker
        .batch_execute(r#"BEGIN; SELECT count(*) FROM "Comment""#)
        .await?;
    let mut opts = common::rollback_options(&p);
    opts.migration_id = Some(report.migration_id);
    opts.locks = SwapSettings {
        lock_timeout: Duration::from_millis(20),
        total_timeout: Duration::from_millis(600),
        kill_blockers_after: None,
    };
    let started = std::time::Instant::now();
    let err = rollback(opts.clone())
        .await
        .expect_err("the locks are never granted");
    let elapsed = started.elapsed();
    assert!(
        matches!(err, CoordinatorError::SwapLockTimeout { attempts, .. } if attempts > 1),
        "{err:?}"
    );
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    // While it was retrying, and now, other sessions were never left waiting: the tables are
    // readable and writable, and nothing changed.
    assert_eq!(live_sums(&dst).await, migrated);
    assert_eq!(backup_sums(&dst).await, backups);
    assert_eq!(list(&p).await.len(), 1);
    assert_eq!(
        migration_state(&dst, report.migration_id).await,
        ("swapped".to_string(), true)
    );
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        )
        .await,
        0
    );

    // Once the reader is done, the same rollback goes through.
    blocker.batch_execute("COMMIT").await?;
    opts.locks = locks();
    let r = rollback(opts).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(list(&p).await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Rows written after the migration that only the migrated data can satisfy
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_reports_foreign_keys_that_no_longer_validate() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_notvalid", "simple").await;
    let dst = p.dest.connect().await?;
    dst.batch_execute(
        r#"CREATE TABLE "PostAudit" (id int PRIMARY KEY,
               post_id int NOT NULL CONSTRAINT "PostAudit_post_id_fkey" REFERENCES "Post"(id));
           INSERT INTO "PostAudit" VALUES (1, 101);"#,
    )
    .await?;
    common::migrate(&p).await?;
    // After the migration the application adds a post and audits it.
    let new_post = int(
        &dst,
        r#"INSERT INTO "Post"(title, content, user_id) VALUES ('new', 'x', 1) RETURNING id::int8"#,
    )
    .await;
    dst.batch_execute(&format!(
        r#"INSERT INTO "PostAudit" VALUES (2, {new_post})"#
    ))
    .await?;

    // The rollback goes through (production keeps working), the key stays NOT VALID, and the
    // report names the key and the exact command to validate it once the rows are fixed.
    let r = rollback(common::rollback_options(&p)).await?;
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let w = &r.warnings[0];
    assert!(w.contains("PostAudit_post_id_fkey"), "{w}");
    let command = w
        .split_once("you run: ")
        .map(|(_, c)| c.trim())
        .unwrap_or_else(|| panic!("no command in {w}"));
    assert!(
        command.starts_with("ALTER TABLE ")
            && command.ends_with(r#"VALIDATE CONSTRAINT "PostAudit_post_id_fkey""#),
        "{w}"
    );
    let fks = foreign_keys(&dst).await;
    let audit = fks
        .iter()
        .find(|f| f.1 == "PostAudit_post_id_fkey")
        .expect("the key exists");
    assert_eq!((audit.2.as_str(), audit.3), ("Post", false), "{fks:?}");
    assert_eq!(
        texts(&dst, r#"SELECT title FROM "Post" ORDER BY id"#).await,
        ["First Post", "Second Post"]
    );
    // New rows are checked against the restored table already.
    assert_fails_with(
        &dst,
        &format!(r#"INSERT INTO "PostAudit" VALUES (3, {new_post})"#),
        "23503",
        "enforced for new rows",
    )
    .await;
    // After fixing the row, the command from the warning validates the key.
    dst.batch_execute(r#"DELETE FROM "PostAudit" WHERE id = 2"#)
        .await?;
    dst.batch_execute(command).await?;
    assert!(foreign_keys(&dst).await.iter().all(|f| f.3));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A prepared migration waiting for its swap when the operator rolls back
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_with_a_prepared_migration_pending() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_pending", "simple").await;
    let dst = p.dest.connect().await?;
    let sums_before = live_sums(&dst).await;
    let r1 = common::migrate(&p).await?;
    // A second migration is prepared with User preserved (sync triggers on the live User).
    let mut opts = common::preserving(&p, &["User"]);
    let r2 = common::prepare_and_release(&opts).await?;
    assert_eq!(list(&p).await[0].timestamp, r1.migration_id);

    let r = rollback(common::rollback_options(&p)).await?;
    assert_eq!(r.timestamp, r1.migration_id);
    // The operator is told right away that the pending migration must be prepared again.
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let w = &r.warnings[0];
    assert!(
        w.contains(&format!("migration {}", r2.migration_id))
            && w.contains("\"User\"")
            && w.contains("pgzm prepare --force"),
        "{w}"
    );
    assert_eq!(live_sums(&dst).await, sums_before);
    // Writes to the restored tables work (no sync trigger left pointing anywhere).
    dst.batch_execute(r#"INSERT INTO "User"(name, email) VALUES ('x', 'x@example.com')"#)
        .await?;
    let after_write = live_sums(&dst).await;

    // The prepared migration was built against the tables the rollback replaced: swapping it
    // now would lose the writes above; the swap refuses and changes nothing.
    let err = common::swap(&p)
        .await
        .expect_err("stale prepared migration");
    assert!(matches!(err, CoordinatorError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("prepare"), "{err}");
    assert_eq!(live_sums(&dst).await, after_write);
    // A new prepare replaces it and swaps normally.
    opts.force = true;
    common::prepare_and_release(&opts).await?;
    common::swap(&p).await?;
    let users = texts(&dst, r#"SELECT name FROM "User" ORDER BY id"#).await;
    assert_eq!(users, ["John Doe", "Jane Smith", "x"]);
    assert!(inspect::triggers(&dst).await?.is_empty());
    assert!(inspect::functions(&dst).await?.is_empty());
    assert_eq!(
        work_objects(&dst)
            .await
            .iter()
            .filter(|o| o.contains("shadow_"))
            .count(),
        0
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --keep-tables on TES: a kept table whose columns use a replaced enum
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tes_keep_table_with_an_enum_column() -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_tes_keep", "tes").await;
    let dst = p.dest.connect().await?;
    // A destination-only view over the kept table's enum column.
    dst.batch_execute(r#"CREATE VIEW scenario_cities AS SELECT id, city FROM "Scenario""#)
        .await?;
    let sums_before = live_sums(&dst).await;
    let sig_before = signature(&dst).await;
    let enums_before = enums(&dst).await;
    common::run(common::preserving(&p, &TES_PRESERVED)).await?;
    dst.batch_execute(
        r#"INSERT INTO "Scenario"(id, "userId", name, city, "updatedAt")
           VALUES (99, 1, 'Added after the swap', 'BOSTON', now())"#,
    )
    .await?;
    let scenario_after = live_sums(&dst).await["Scenario"].clone();

    let mut opts = common::rollback_options(&p);
    opts.keep_tables = vec!["Scenario".into()];
    let r = rollback(opts).await?;
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let sums = live_sums(&dst).await;
    assert_eq!(sums["Scenario"], scenario_after);
    for (t, s) in &sums_before {
        if t != "Scenario" {
            assert_eq!(&sums[t], s, "{t}");
        }
    }
    // One "City" again — the original type, used by the kept and the restored tables alike — so
    // the kept rows compare and join with the restored ones.
    assert_eq!(enums(&dst).await, enums_before);
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert_same_signature(
        &signature(&dst).await,
        &sig_before,
        "after keep-tables rollback",
    );
    assert_eq!(
        int(
            &dst,
            r#"SELECT count(*) FROM "Scenario" s JOIN "Municipality" m ON m.city = s.city"#
        )
        .await,
        int(
            &dst,
            r#"SELECT count(*) FROM "Scenario" s JOIN "Municipality" m ON m.city::text = s.city::text"#
        )
        .await
    );
    assert_eq!(
        int(
            &dst,
            r#"SELECT count(*) FROM "Scenario" WHERE city = 'BOSTON'::"City""#
        )
        .await,
        int(
            &dst,
            r#"SELECT count(*) FROM "Scenario" WHERE city::text = 'BOSTON'"#
        )
        .await
    );
    assert_eq!(
        texts(
            &dst,
            "SELECT id::text || ' ' || city::text FROM scenario_cities WHERE id = 99"
        )
        .await,
        ["99 BOSTON"]
    );
    assert_eq!(
        column_type(&dst, "scenario_cities", "city").await,
        r#""City""#
    );
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert!(foreign_keys(&dst).await.iter().all(|f| f.3));
    assert!(list(&p).await.is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sequential migrations when a destination-only table uses a replaced type
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_migrations_with_a_destination_only_table_on_a_replaced_enum(
) -> anyhow::Result<()> {
    let p = common::fixture_pair("bk_enum_seq", "simple").await;
    p.source
        .batch(
            r#"CREATE TYPE mood AS ENUM ('happy', 'sad', 'meh');
               ALTER TABLE "User" ADD COLUMN m mood DEFAULT 'meh';"#,
        )
        .await?;
    // Production's `mood` is also used by a table the migrations know nothing about.
    p.dest
        .batch(
            r#"CREATE TYPE mood AS ENUM ('happy', 'sad');
               ALTER TABLE "User" ADD COLUMN m mood;
               CREATE TABLE "Feeling" (id int PRIMARY KEY, m mood NOT NULL);
               INSERT INTO "Feeling" VALUES (1, 'sad'), (2, 'happy');"#,
        )
        .await?;
    let dst = p.dest.connect().await?;
    let feeling = live_sums(&dst).await["Feeling"].clone();

    common::migrate(&p).await?;
    // The second migration replaces the first backup set — whose `mood` is still used by
    // "Feeling" — and must not trip over it.
    p.source
        .batch(r#"UPDATE "User" SET name = name || ' 2'"#)
        .await?;
    let v2 = live_sums(&p.source.connect().await?).await;
    let r2 = common::migrate(&p).await?;
    assert!(
        r2.dropped_backup.iter().any(|d| d.contains("\"Feeling\"")),
        "the kept type is reported: {:?}",
        r2.dropped_backup
    );
    let sets = list(&p).await;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].timestamp, r2.migration_id);
    assert!(backup::verify(&dest_url(&p), None).await?.valid);
    let mut live = live_sums(&dst).await;
    assert_eq!(live.remove("Feeling"), Some(feeling.clone()));
    assert_eq!(live, v2);

    // A third one, then cleanup: nothing `backup_` remains, "Feeling" still works.
    common::migrate(&p).await?;
    let c = backup::cleanup(&dest_url(&p), i64::MAX, false).await?;
    assert_eq!(c.backup_sets.len(), 1, "{c:?}");
    assert_eq!(work_objects(&dst).await, Vec::<String>::new());
    assert!(list(&p).await.is_empty());
    assert_eq!(live_sums(&dst).await["Feeling"], feeling);
    dst.batch_execute(r#"INSERT INTO "Feeling" VALUES (3, 'happy')"#)
        .await?;
    // And a fourth migration still goes through.
    common::migrate(&p).await?;
    assert_eq!(list(&p).await.len(), 1);
    Ok(())
}
