//! PostgreSQL major versions on either side (the servers of the run: PostgreSQL 15 by default;
//! `dev/test-versions` runs these with other versions and cross-version pairs). Each test asks
//! the servers their versions and expects what those versions can represent: a feature the
//! destination has is migrated, one it lacks is refused before anything changes, naming the
//! object and what to do.

use pgzm_coordinator::error::CoordinatorError;

use crate::checks::{int, public_objects, texts};
use crate::common::{self, Pair};

/// The server's `server_version_num`.
async fn version(db: &pgzm_tests::TestDb) -> i64 {
    let c = db.connect().await.expect("connect");
    int(&c, "SELECT current_setting('server_version_num')::int8").await
}

/// NOT NULL constraints: PostgreSQL 18 names them. On a destination of 18 or later the new
/// tables carry the source's names (18 or later), or the names PostgreSQL gives the live
/// table's own (`<table>_<column>_not_null`, never the shadow table's); before 18 the columns
/// are NOT NULL. Either way the live tables have their NOT NULL columns after the swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_null_constraints_keep_the_names_of_the_live_tables() {
    let p = common::pair("versions_not_null").await;
    let (src_version, dst_version) = (version(&p.source).await, version(&p.dest).await);
    let ddl = "CREATE TABLE account (id int PRIMARY KEY, email text CONSTRAINT account_email_required NOT NULL,
                                     name text NOT NULL, note text);
               CREATE TABLE \"Long Table Name Of Sixty Characters Or So For Truncating It\" (
                   \"a column with a long name as well, for the other half\" int NOT NULL)";
    p.source.batch(ddl).await.expect("source tables");
    p.source
        .batch("INSERT INTO account VALUES (1, 'a@example.com', 'A', NULL)")
        .await
        .expect("rows");
    p.dest.batch(ddl).await.expect("destination tables");
    common::migrate(&p).await.expect("migrate");
    let dst = p.dest.connect().await.expect("connect");
    let not_null = texts(
        &dst,
        "SELECT c.relname || '.' || a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0
            AND a.attnotnull AND c.relname NOT LIKE 'backup\\_%' ORDER BY 1",
    )
    .await;
    assert_eq!(
        not_null,
        [
            "Long Table Name Of Sixty Characters Or So For Truncating It.a column with a long name as well, for the other half",
            "account.email",
            "account.id",
            "account.name",
        ]
    );
    if dst_version >= 180000 {
        let names = texts(
            &dst,
            "SELECT k.conname::text FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
              WHERE c.relnamespace = 'public'::regnamespace AND k.contype = 'n'
                AND c.relname NOT LIKE 'backup\\_%' ORDER BY 1",
        )
        .await;
        let email = if src_version >= 180000 {
            "account_email_required"
        } else {
            "account_email_not_null"
        };
        // The name PostgreSQL gives such a table's own constraint (it cuts the longer name
        // until the whole fits in 63 bytes), asked of the destination server itself.
        dst.batch_execute(
            "CREATE TEMP TABLE \"Long Table Name Of Sixty Characters Or So For Truncating It\" (
                 \"a column with a long name as well, for the other half\" int NOT NULL)",
        )
        .await
        .expect("temp table");
        let long = texts(
            &dst,
            "SELECT conname::text FROM pg_constraint WHERE contype = 'n'
                AND conrelid = (SELECT c.oid FROM pg_class c WHERE c.relnamespace = pg_my_temp_schema())",
        )
        .await
        .pop()
        .expect("the temp table's constraint");
        let mut expected = vec![
            long.clone(),
            "account_id_not_null".to_string(),
            "account_name_not_null".to_string(),
            email.to_string(),
        ];
        expected.sort();
        assert_eq!(names, expected);
        assert!(long.len() <= 63 && long.ends_with("_not_null"), "{long}");
        // The backup set keeps the old tables' constraints, under their own names.
        assert_eq!(
            int(
                &dst,
                "SELECT count(*) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                  WHERE c.relname = 'backup_account' AND k.contype = 'n'",
            )
            .await,
            3
        );
    }
}

/// Features of newer versions: each one the destination has is migrated; each one it lacks is
/// refused at the plan, naming the object and what to do, with nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_older_destination_cannot_represent_is_refused_before_any_change() {
    let p = common::pair("versions_features").await;
    let (src_version, dst_version) = (version(&p.source).await, version(&p.dest).await);
    let mut ddl = vec!["CREATE TABLE item (id int PRIMARY KEY, code text, qty int)".to_string()];
    // (the source's feature, the version it needs, what the refusal names)
    let mut expected_refusals: Vec<&str> = Vec::new();
    if src_version >= 150000 {
        ddl.push("CREATE UNIQUE INDEX item_code ON item (code) NULLS NOT DISTINCT".into());
        if dst_version < 150000 {
            expected_refusals
                .push("index item_code of table public.item is UNIQUE NULLS NOT DISTINCT");
        }
    }
    if src_version >= 180000 {
        ddl.push(
            "ALTER TABLE item ADD COLUMN twice int GENERATED ALWAYS AS (qty * 2) VIRTUAL".into(),
        );
        ddl.push("ALTER TABLE item ADD COLUMN uid uuid DEFAULT uuidv7()".into());
        if dst_version < 180000 {
            expected_refusals
                .push("column twice of table public.item is a virtual generated column");
            expected_refusals.push("the default of column uid of table public.item calls uuidv7()");
        }
    }
    p.source
        .batch(&ddl.join(";\n"))
        .await
        .expect("source objects");
    p.source
        .batch("INSERT INTO item (id, code, qty) VALUES (1, 'a', 2), (2, NULL, 3)")
        .await
        .expect("rows");
    let dst = p.dest.connect().await.expect("connect");
    let before = public_objects(&dst).await;
    let result = common::migrate(&p).await;
    if expected_refusals.is_empty() {
        let report = result.expect("every feature is represented");
        assert_eq!(report.rows, 2);
        check_features(&p, src_version).await;
        return;
    }
    let reasons = match result {
        Err(CoordinatorError::Refused(reasons)) => reasons,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let all = reasons.join("\n");
    for expected in expected_refusals {
        assert!(all.contains(expected), "{expected:?} not in:\n{all}");
    }
    assert!(all.contains("PostgreSQL"), "{all}");
    assert_eq!(public_objects(&dst).await, before, "nothing changed");
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'shadow\\_%'"
        )
        .await,
        0
    );
}

/// After a migration that the destination could represent: the features are there.
async fn check_features(p: &Pair, src_version: i64) {
    let dst = p.dest.connect().await.expect("connect");
    if src_version >= 150000 {
        let def = texts(&dst, "SELECT pg_get_indexdef('item_code'::regclass)").await;
        assert!(def[0].contains("NULLS NOT DISTINCT"), "{def:?}");
    }
    if src_version >= 180000 {
        assert_eq!(
            int(&dst, "SELECT sum(twice) FROM item").await,
            10,
            "the virtual column computes"
        );
        assert_eq!(
            texts(
                &dst,
                "SELECT attgenerated::text FROM pg_attribute WHERE attrelid = 'item'::regclass AND attname = 'twice'"
            )
            .await,
            ["v"]
        );
    }
}

/// What no check names is found by rehearsing the run's statements on an older destination
/// first: a view using an aggregate it lacks (PostgreSQL 16's `any_value`) is refused before
/// anything changes; a destination that has it gets the view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_destination_is_rehearsed_before_any_change() {
    let p = common::pair("versions_rehearsal").await;
    let (src_version, dst_version) = (version(&p.source).await, version(&p.dest).await);
    let uses_any_value = src_version >= 160000;
    let view = if uses_any_value {
        "CREATE VIEW any_code AS SELECT any_value(code) AS code FROM item"
    } else {
        "CREATE VIEW any_code AS SELECT min(code) AS code FROM item"
    };
    p.source
        .batch(&format!(
            "CREATE TABLE item (id int PRIMARY KEY, code text); INSERT INTO item VALUES (1, 'a');
             {view}"
        ))
        .await
        .expect("source objects");
    let dst = p.dest.connect().await.expect("connect");
    let before = public_objects(&dst).await;
    match common::migrate(&p).await {
        Err(CoordinatorError::Refused(reasons)) if uses_any_value && dst_version < 160000 => {
            let all = reasons.join("\n");
            assert!(
                all.contains("any_value")
                    && all.contains("the destination")
                    && all.contains("any_code"),
                "{all}"
            );
            assert_eq!(public_objects(&dst).await, before, "nothing changed");
        }
        Ok(_) => assert_eq!(texts(&dst, "SELECT code FROM any_code").await, ["a"]),
        other => panic!("PostgreSQL {src_version} into {dst_version}: {other:?}"),
    }
}
