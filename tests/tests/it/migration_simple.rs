//! Scenarios 1 and 2 of the original tool on the simple blog schema (User, Post, Comment):
//! a complete migration with data integrity, a dry run that changes nothing, and two
//! migrations in a row (the second replaces the first backup set).

use crate::checks;
use crate::common;

use std::collections::BTreeMap;

use checks::{
    assert_backup_of, assert_live_unchanged, assert_none_with_prefix, assert_same_signature, int,
    live_sums, public_objects, schemas, tables_with_prefix, texts,
};
use pgzm_tests::inspect::{self, CatalogSignature, TableChecksum};
use tokio_postgres::Client;

const TABLES: [&str; 3] = ["Comment", "Post", "User"];

/// Asserts the backup set is exactly the three `backup_*` tables, holding `sums` with the
/// definitions of `sig`.
async fn assert_backup_set(
    dst: &Client,
    sums: &BTreeMap<String, TableChecksum>,
    sig: &CatalogSignature,
    what: &str,
) {
    assert_eq!(
        tables_with_prefix(dst, "backup_").await,
        vec!["backup_Comment", "backup_Post", "backup_User"]
    );
    assert_backup_of(dst, sums, sig, what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_migration_keeps_data_integrity() -> anyhow::Result<()> {
    let p = common::fixture_pair("simple_full", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;

    let src_sums_before = live_sums(&src).await;
    let src_sig_before = inspect::catalog_signature(&src, None).await?;
    let src_objects_before = public_objects(&src).await;
    let dst_sums_before = live_sums(&dst).await;
    let dst_sig_before = inspect::catalog_signature(&dst, None).await?;
    assert_ne!(
        src_sums_before, dst_sums_before,
        "the fixture's sides must differ for the test to mean anything"
    );
    assert_same_signature(&src_sig_before, &dst_sig_before, "fixture schemas");

    let report = common::migrate(&p).await?;
    assert_eq!(report.rows, 6, "{report:?}");
    assert!(report.swap.is_some());

    // The destination holds exactly the source's rows.
    assert_eq!(live_sums(&dst).await, src_sums_before);
    assert_eq!(
        texts(
            &dst,
            r#"SELECT name || ' <' || email || '>' FROM "User" ORDER BY id"#
        )
        .await,
        vec![
            "John Doe Modified <john.doe.modified@example.com>",
            "Jane Smith Modified <jane.smith.modified@example.com>"
        ]
    );
    assert_eq!(
        texts(
            &dst,
            r#"SELECT title || ': ' || content FROM "Post" ORDER BY id"#
        )
        .await,
        vec![
            "First Post Modified: This is the first post Modified",
            "Second Post Modified: This is the second post Modified"
        ]
    );
    assert_eq!(
        texts(&dst, r#"SELECT content FROM "Comment" ORDER BY id"#).await,
        vec!["Great post! Modified", "Nice work! Modified"]
    );

    // Exactly the three backup tables, holding the old destination rows, with the old shape.
    assert_backup_set(
        &dst,
        &dst_sums_before,
        &dst_sig_before,
        "backup tables vs the old live tables",
    )
    .await;
    assert_eq!(
        texts(&dst, r#"SELECT name FROM "backup_User" ORDER BY id"#).await,
        vec!["John Doe", "Jane Smith"]
    );

    // Nothing in construction remains; no write-protection triggers or functions anywhere.
    assert_none_with_prefix(&dst, "shadow_").await;
    assert!(inspect::triggers(&dst).await?.is_empty());
    assert!(inspect::functions(&dst).await?.is_empty());
    assert!(inspect::triggers(&src).await?.is_empty());
    assert!(inspect::functions(&src).await?.is_empty());

    // The new live tables have the source's definitions, and every key holds.
    let dst_sig = inspect::catalog_signature(&dst, None).await?;
    assert_same_signature(&dst_sig, &src_sig_before, "destination vs source");
    assert!(inspect::fk_orphans(&dst).await?.is_empty());

    // The source is untouched.
    assert_eq!(inspect::tables(&src).await?, TABLES);
    assert_live_unchanged(
        &src,
        &src_sums_before,
        &src_sig_before,
        "source before vs after",
    )
    .await;
    assert_eq!(public_objects(&src).await, src_objects_before);

    // Sequences are past the data: the application's next insert just works.
    let id = int(
        &dst,
        r#"INSERT INTO "User"(name, email) VALUES ('New', 'new@example.com') RETURNING id::int8"#,
    )
    .await;
    assert_eq!(id, 3);
    let post = int(
        &dst,
        r#"INSERT INTO "Post"(title, content, user_id) VALUES ('t', 'c', 3) RETURNING id::int8"#,
    )
    .await;
    assert_eq!(post, 103);
    // The live sequence is the new table's: the backup table's is separate.
    let owned = texts(
        &dst,
        r#"SELECT pg_get_serial_sequence('public."User"', 'id')"#,
    )
    .await;
    assert_eq!(owned, vec![r#"public."User_id_seq""#]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_changes_nothing() -> anyhow::Result<()> {
    let p = common::fixture_pair("simple_dry", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;

    let dst_sums = live_sums(&dst).await;
    let dst_tables = inspect::tables(&dst).await?;
    let dst_triggers = inspect::triggers(&dst).await?;
    let dst_schemas = schemas(&dst).await;
    let dst_objects = public_objects(&dst).await;
    let dst_sig = inspect::catalog_signature(&dst, None).await?;
    let src_sums = live_sums(&src).await;
    let src_objects = public_objects(&src).await;

    let mut opts = common::options(&p);
    opts.dry_run = true;
    let report = common::run(opts).await?;
    assert!(report.dry_run);
    assert!(report.swap.is_none());
    assert_eq!(report.rows, 0);
    let mut planned: Vec<&str> = report.plan.tables.iter().map(|t| t.name.as_str()).collect();
    planned.sort();
    assert_eq!(planned, TABLES, "the plan lists every table");

    assert_eq!(inspect::tables(&dst).await?, dst_tables);
    assert_eq!(inspect::triggers(&dst).await?, dst_triggers);
    assert_eq!(schemas(&dst).await, dst_schemas);
    assert!(!dst_schemas.contains(&"pgzm".to_string()), "no pgzm schema");
    assert_eq!(public_objects(&dst).await, dst_objects);
    assert_live_unchanged(
        &dst,
        &dst_sums,
        &dst_sig,
        "destination before vs after a dry run",
    )
    .await;
    assert_none_with_prefix(&dst, "shadow_").await;
    assert_none_with_prefix(&dst, "backup_").await;
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_constraint WHERE NOT convalidated"
        )
        .await,
        0,
        "no invalid foreign keys"
    );
    assert_eq!(live_sums(&src).await, src_sums);
    assert_eq!(public_objects(&src).await, src_objects);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_migration_replaces_the_backup_set() -> anyhow::Result<()> {
    let p = common::fixture_pair("simple_twice", "simple").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_sums = live_sums(&src).await;
    let src_sig = inspect::catalog_signature(&src, None).await?;

    let first = common::migrate(&p).await?;
    let second = common::migrate(&p).await?;
    assert_ne!(first.migration_id, second.migration_id);
    assert_eq!(second.plan.previous_backup, Some(first.migration_id));
    assert!(
        !second.dropped_backup.is_empty(),
        "the second run dropped the first backup set: {second:?}"
    );

    assert_eq!(live_sums(&dst).await, src_sums);
    // The backup now holds what the first migration put live: the source's data.
    assert_backup_set(
        &dst,
        &src_sums,
        &src_sig,
        "second backup set vs the first migration's tables",
    )
    .await;
    assert_same_signature(
        &inspect::catalog_signature(&dst, None).await?,
        &src_sig,
        "destination vs source",
    );
    assert_none_with_prefix(&dst, "shadow_").await;
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pgzm.migrations WHERE backup_present"
        )
        .await,
        1
    );
    assert_eq!(
        int(
            &dst,
            &format!(
                "SELECT count(*) FROM pgzm.migrations WHERE backup_present AND id = {}",
                second.migration_id
            )
        )
        .await,
        1
    );
    assert_eq!(
        texts(&dst, "SELECT status FROM pgzm.migrations ORDER BY id").await,
        vec!["swapped", "swapped"]
    );
    let id = int(
        &dst,
        r#"INSERT INTO "User"(name, email) VALUES ('New', 'new@example.com') RETURNING id::int8"#,
    )
    .await;
    assert_eq!(id, 3);
    Ok(())
}
