//! The coverage schema (one of every object kind: identity, serial and standalone sequences,
//! enum and domain, generated columns, every constraint and index kind, a trigger and its
//! function, comments, an unlogged table, a view) migrates with identical data and identical
//! catalog definitions — into an empty destination, and over a destination that already has
//! the schema with other data or none.

use crate::checks;
use crate::common;

use checks::{
    assert_live_unchanged, assert_none_with_prefix, assert_same_signature, backup_signature,
    backup_sums, boolean, int, live_sums, text, texts,
};
use common::coverage_pair;
use pgzm_tests::inspect;
use tokio_postgres::Client;

const VIEW_ROWS: &str = "SELECT v::text FROM customer_order_summary v ORDER BY customer_id";

/// Everything that must hold after migrating the coverage schema, whatever the destination
/// held before.
async fn assert_migrated(src: &Client, dst: &Client) {
    // Data: every table equals the source's, including the no-PK table's duplicate rows and
    // the unlogged table.
    let src_sums = live_sums(src).await;
    assert_eq!(src_sums.len(), 9, "{src_sums:?}");
    assert_eq!(live_sums(dst).await, src_sums);
    assert_eq!(
        int(dst, "SELECT count(*) FROM audit_log WHERE id = 1999").await,
        2
    );
    assert_eq!(
        text(
            dst,
            "SELECT legacy_attributes::text FROM \"Product\" WHERE id = 2"
        )
        .await,
        r#"{"a": 1, "a": 2,   "b" : [ ]}"#
    );

    // Definitions: columns, defaults, identity, generated columns, collations, comments,
    // constraints (NOT VALID and DEFERRABLE included), indexes and triggers.
    let src_sig = inspect::catalog_signature(src, None)
        .await
        .expect("source signature");
    let dst_sig = inspect::catalog_signature(dst, None)
        .await
        .expect("dest signature");
    assert_same_signature(&dst_sig, &src_sig, "destination vs source");
    assert_eq!(dst_sig.tables["session_cache"].persistence, "u");
    assert_eq!(
        dst_sig.tables["Customer"].comment.as_deref(),
        Some("People who place orders")
    );
    assert!(!boolean(
        dst,
        "SELECT convalidated FROM pg_constraint WHERE conname = 'customer_display_name_not_blank'
           AND conrelid = 'public.\"Customer\"'::regclass"
    )
    .await);
    assert!(
        boolean(
            dst,
            "SELECT condeferrable AND condeferred FROM pg_constraint
         WHERE conname = 'Order Items_product_id_fkey'
           AND conrelid = 'public.\"Order Items\"'::regclass"
        )
        .await
    );
    assert_eq!(
        int(
            dst,
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
             WHERE c.relnamespace = 'public'::regnamespace AND NOT (i.indisvalid AND i.indisready)"
        )
        .await,
        0,
        "every index is valid"
    );

    // Types: the enum and the domain the new tables use carry the source's definitions.
    assert_eq!(
        texts(dst, "SELECT unnest(enum_range(NULL::order_status))::text").await,
        texts(src, "SELECT unnest(enum_range(NULL::order_status))::text").await
    );
    assert_eq!(
        text(
            dst,
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = 'positive_amount'::regtype"
        )
        .await,
        "CHECK ((VALUE > (0)::numeric))"
    );

    // The view exists, returns the source's rows, and keeps its comment.
    let src_view = texts(src, VIEW_ROWS).await;
    assert_eq!(src_view.len(), 20);
    assert_eq!(texts(dst, VIEW_ROWS).await, src_view);
    assert_eq!(
        text(
            dst,
            "SELECT obj_description('public.customer_order_summary'::regclass, 'pg_class')"
        )
        .await,
        "Orders per customer"
    );
    let orders_of_1000 = "SELECT order_count FROM customer_order_summary WHERE customer_id = 1000";
    let orders_before = int(dst, orders_of_1000).await;

    // Sequences: same positions as the source (which are at the data), each owned by the new
    // column, and the next values continue the source's series.
    let src_seqs = inspect::sequences(src).await.expect("source sequences");
    assert_eq!(src_seqs.len(), 7, "{src_seqs:?}");
    let dst_seqs: Vec<_> = inspect::sequences(dst)
        .await
        .expect("dest sequences")
        .into_iter()
        .filter(|s| !s.name.starts_with("backup_"))
        .collect();
    assert_eq!(dst_seqs, src_seqs);
    for seq in &src_seqs {
        let (table, column) = seq.owned_by.as_ref().expect("every sequence is owned");
        let max = int(
            dst,
            &format!(
                "SELECT coalesce(max({})::int8, 0) FROM {}",
                pgzm_tests::quote_ident(column),
                pgzm_tests::quote_ident(table)
            ),
        )
        .await;
        assert!(seq.last_value >= max, "{seq:?} behind {max}");
    }
    let row = dst
        .query_one(
            "INSERT INTO \"Order\" (customer_id, total) VALUES (1000, 12.5) RETURNING id, invoice_no",
            &[],
        )
        .await
        .expect("insert an order");
    assert_eq!(row.get::<_, i32>(0), 580);
    assert_eq!(row.get::<_, i64>(1), 100_280);
    assert_eq!(
        int(
            dst,
            "INSERT INTO \"Customer\" (\"Display Name\", email) VALUES ('New', 'new@example.com') RETURNING id::int8"
        )
        .await,
        1100
    );
    assert_eq!(
        int(dst, "INSERT INTO \"Product\" (sku, name, price, barcode) VALUES ('NEW-1', 'new', 1, 'new') RETURNING id").await,
        31
    );
    assert_eq!(
        int(
            dst,
            "INSERT INTO audit_log (logged_at, action) VALUES (now(), 'x') RETURNING id"
        )
        .await,
        2000
    );

    // The view reads the new tables: it sees the rows just inserted.
    assert_eq!(int(dst, orders_of_1000).await, orders_before + 1);
    assert_eq!(texts(dst, VIEW_ROWS).await.len(), 21);

    // The trigger function exists and the trigger fires on the new table.
    assert!(inspect::functions(dst)
        .await
        .expect("functions")
        .contains(&"set_updated_at".to_string()));
    assert!(
        boolean(
            dst,
            "WITH u AS (UPDATE \"Customer\" SET tags = '{x}' WHERE id = 1005 RETURNING updated_at)
         SELECT updated_at > timestamptz '2025-01-01' FROM u"
        )
        .await
    );

    // Nothing half-built remains and every key holds.
    assert_none_with_prefix(dst, "shadow_").await;
    assert!(inspect::fk_orphans(dst)
        .await
        .expect("fk orphans")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_schema_into_an_empty_destination() -> anyhow::Result<()> {
    let p = coverage_pair("cov_empty").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let src_sums = live_sums(&src).await;
    let src_sig = inspect::catalog_signature(&src, None).await?;

    let report = common::migrate(&p).await?;
    assert_eq!(
        report.rows,
        20 + 30 + 40 + 50 + 20 + 12 + 2000 + 10,
        "{report:?}"
    );
    assert_migrated(&src, &dst).await;
    // Nothing was replaced, so there is no backup.
    assert_none_with_prefix(&dst, "backup_").await;
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pgzm.migrations WHERE backup_present"
        )
        .await,
        0
    );

    // The source was only read.
    assert_live_unchanged(&src, &src_sums, &src_sig, "source before vs after").await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_schema_over_an_existing_schema_without_data() -> anyhow::Result<()> {
    let p = coverage_pair("cov_nodata").await;
    common::load_coverage(&p, &p.dest, "coverage/schema.sql").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let dst_sig_before = inspect::catalog_signature(&dst, None).await?;

    common::migrate(&p).await?;
    assert_migrated(&src, &dst).await;
    // The old, empty tables are the backup, with their definitions.
    let backups = backup_sums(&dst).await;
    assert_eq!(backups.len(), 9);
    assert!(backups.values().all(|s| s.rows == 0), "{backups:?}");
    assert_same_signature(
        &backup_signature(&dst).await,
        &dst_sig_before,
        "backup tables vs the old live tables",
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coverage_schema_over_an_existing_schema_with_other_data() -> anyhow::Result<()> {
    let p = coverage_pair("cov_other").await;
    common::load_coverage(&p, &p.dest, "coverage/schema.sql").await;
    common::load_coverage(&p, &p.dest, "coverage/data.sql").await;
    p.dest
        .batch(
            "DELETE FROM audit_log WHERE id > 1500;
             UPDATE \"Product\" SET name = name || ' (old)';
             DELETE FROM \"Customer\" WHERE id = 1095;
             INSERT INTO archived_order (id, customer_id, snapshot) VALUES (1, 1000, '{}');
             INSERT INTO \"Order\" (customer_id, total) VALUES (1000, 99);
             ALTER TYPE order_status ADD VALUE 'old_only';",
        )
        .await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let dst_sums_before = live_sums(&dst).await;
    let dst_view_before = texts(&dst, VIEW_ROWS).await;
    assert_ne!(dst_sums_before, live_sums(&src).await);

    common::migrate(&p).await?;
    assert_migrated(&src, &dst).await;

    // The backup keeps the old rows, the old enum (with its extra label) and the old view.
    assert_eq!(backup_sums(&dst).await, dst_sums_before);
    assert!(texts(
        &dst,
        "SELECT unnest(enum_range(NULL::\"backup_order_status\"))::text"
    )
    .await
    .contains(&"old_only".to_string()));
    assert!(
        !texts(&dst, "SELECT unnest(enum_range(NULL::order_status))::text")
            .await
            .contains(&"old_only".to_string())
    );
    assert_eq!(
        texts(
            &dst,
            "SELECT v::text FROM backup_customer_order_summary v ORDER BY customer_id"
        )
        .await,
        dst_view_before,
        "the old view is kept and still reads the old tables"
    );
    assert_eq!(
        text(
            &dst,
            "SELECT string_agg(DISTINCT c.relname, ',') FROM pg_depend d
             JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class c ON c.oid = d.refobjid
             WHERE r.ev_class = 'public.customer_order_summary'::regclass
               AND d.refobjid <> r.ev_class AND c.relkind = 'r'"
        )
        .await,
        "Customer,Order"
    );
    Ok(())
}

/// A table whose columns are of another migrated table's row type (and an array of it), named
/// to sort before that table: its shadow is created after the other's, the source's values
/// arrive, and after the swap the column's type is the new live table's row type (the backup's
/// the backup table's). Fails when the shadow tables are created in name order: the shadow of
/// `a_box` would use a type that does not exist yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_typed_on_another_tables_row_type_is_created_after_it() -> anyhow::Result<()> {
    let p = common::pair("cov_row_type").await;
    let schema = "CREATE TABLE b (id int PRIMARY KEY, label text NOT NULL);
                  CREATE TABLE a_box (id int PRIMARY KEY, item b, items b[]);";
    p.source.batch(schema).await?;
    p.source
        .batch(
            "INSERT INTO b VALUES (1, 'source');
             INSERT INTO a_box VALUES (1, ROW(5, 'five'), ARRAY[ROW(6, 'six')::b, ROW(7, 'seven')::b]);",
        )
        .await?;
    p.dest.batch(schema).await?;
    p.dest
        .batch("INSERT INTO a_box VALUES (9, ROW(9, 'live'), '{}')")
        .await?;

    common::migrate(&p).await?;
    let dst = p.dest.connect().await?;
    assert_eq!(
        text(
            &dst,
            "SELECT (item).label || ' ' || (items[2]).label FROM a_box WHERE id = 1"
        )
        .await,
        "five seven"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM a_box").await, 1);
    let column_type_of = |table: &str| {
        format!(
            "SELECT c.relname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
               JOIN pg_class c ON c.oid = t.typrelid
              WHERE a.attrelid = '{table}'::regclass AND a.attname = 'item'"
        )
    };
    assert_eq!(text(&dst, &column_type_of("a_box")).await, "b");
    assert_eq!(
        text(&dst, &column_type_of("backup_a_box")).await,
        "backup_b"
    );
    Ok(())
}

/// A table whose default takes values from another migrated table's identity sequence, named to
/// sort before that table: its shadow is created after the other's (the sequence comes with
/// it), the source's rows arrive, and after the swap the default draws from the new live
/// sequence. Fails when the shadow tables are created in name order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_on_another_tables_identity_sequence_is_created_after_it() -> anyhow::Result<()> {
    let p = common::pair("cov_identity_user").await;
    let schema = "CREATE TABLE z_owner (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);
                  CREATE TABLE a_user (id int PRIMARY KEY DEFAULT nextval('public.z_owner_id_seq'), v text);";
    p.source.batch(schema).await?;
    p.source
        .batch(
            "INSERT INTO z_owner (v) SELECT 'owner' FROM generate_series(1, 3);
             INSERT INTO a_user (v) VALUES ('user');",
        )
        .await?;
    p.dest.batch(schema).await?;

    common::migrate(&p).await?;
    let dst = p.dest.connect().await?;
    assert_eq!(
        text(&dst, "SELECT v FROM a_user WHERE id = 4").await,
        "user"
    );
    assert_eq!(
        int(
            &dst,
            "INSERT INTO a_user (v) VALUES ('new') RETURNING id::int8"
        )
        .await,
        5,
        "the default draws from the new z_owner's identity sequence, past the source's values"
    );
    Ok(())
}

/// Keys of small tables (built in one batch, each by a single `ADD CONSTRAINT`) come out as the
/// source has them: INCLUDE columns, `NULLS NOT DISTINCT`, `DEFERRABLE`, the constraint's
/// comment, the index named after the constraint, its storage parameters (which
/// `pg_get_constraintdef` leaves out: they were lost before), and uniqueness enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_small_tables_come_out_as_the_source_has_them() -> anyhow::Result<()> {
    let p = common::pair("cov_small_keys").await;
    // NULLS NOT DISTINCT is PostgreSQL 15's (the core tests also run on 13).
    let nulls_not_distinct = common::server_version(&p.source)
        .await
        .min(common::server_version(&p.dest).await)
        >= 150_000;
    let barcode_key = if nulls_not_distinct {
        "UNIQUE NULLS NOT DISTINCT (barcode)"
    } else {
        "UNIQUE (barcode)"
    };
    let schema = format!(
        "CREATE TABLE item (
             id int8 NOT NULL,
             code text NOT NULL,
             label text,
             barcode text,
             CONSTRAINT item_pk PRIMARY KEY (id) INCLUDE (label) WITH (fillfactor = 70),
             CONSTRAINT item_code_key UNIQUE (code) WITH (fillfactor = 60),
             CONSTRAINT item_label_key UNIQUE (label) WITH (fillfactor = 50) DEFERRABLE,
             CONSTRAINT item_barcode_key {barcode_key});
         COMMENT ON CONSTRAINT item_pk ON item IS 'the key';
         COMMENT ON CONSTRAINT item_code_key ON item IS 'one code each';"
    );
    p.source.batch(&schema).await?;
    p.source
        .batch(
            "INSERT INTO item SELECT g, 'c' || g, 'l' || g, nullif('b' || g, 'b1')
             FROM generate_series(1, 3) g",
        )
        .await?;
    p.dest.batch(&schema).await?;

    common::migrate(&p).await?;
    let dst = p.dest.connect().await?;
    let defs = text(
        &dst,
        "SELECT string_agg(conname || ': ' || pg_get_constraintdef(c.oid) || ' / ' || coalesce(obj_description(c.oid, 'pg_constraint'), '-') || ' / ' || i.relname || ' ' || coalesce(array_to_string(i.reloptions, ','), '-'), E'\\n' ORDER BY conname)
         FROM pg_constraint c JOIN pg_class i ON i.oid = c.conindid
         WHERE conrelid = 'public.item'::regclass",
    )
    .await;
    assert_eq!(
        defs,
        format!(
            "item_barcode_key: {barcode_key} / - / item_barcode_key -\n\
             item_code_key: UNIQUE (code) / one code each / item_code_key fillfactor=60\n\
             item_label_key: UNIQUE (label) DEFERRABLE / - / item_label_key fillfactor=50\n\
             item_pk: PRIMARY KEY (id) INCLUDE (label) / the key / item_pk fillfactor=70"
        )
    );
    assert_eq!(
        int(&dst, "SELECT count(*) FROM item").await,
        3,
        "the source's rows"
    );
    let duplicate = dst
        .batch_execute("INSERT INTO item VALUES (4, 'c1', 'x', NULL)")
        .await;
    assert!(duplicate.is_err(), "the unique key holds after the swap");
    let second_null = dst
        .batch_execute("INSERT INTO item VALUES (5, 'c5', 'x', NULL)")
        .await;
    assert_eq!(
        second_null.is_err(),
        nulls_not_distinct,
        "NULLS NOT DISTINCT holds after the swap (where there is one)"
    );
    Ok(())
}
