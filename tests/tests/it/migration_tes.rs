//! Scenario 7 of the original tool (without preserved tables): the whole Tree Equity Score
//! schema with PostGIS geometries, GiST indexes, enums and serial sequences.

use crate::checks;
use crate::common;

use std::collections::BTreeMap;

use checks::{
    assert_backup_of, assert_live_unchanged, assert_none_with_prefix, assert_same_signature,
    boolean, column_type, int, live_sums, text, texts,
};
use common::GEOMETRY_TABLES;
use pgzm_tests::inspect;
use tokio_postgres::Client;

/// (gid, EWKT) of every row of `table`, by gid.
async fn geometries(client: &Client, table: &str) -> BTreeMap<i32, String> {
    let sql = format!(
        "SELECT gid, ST_AsEWKT(geom) FROM {} ORDER BY gid",
        pgzm_tests::quote_ident(table)
    );
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `(indexname, tablename)` of every GiST index in `public`, sorted.
async fn gist_indexes(client: &Client) -> Vec<(String, String)> {
    client
        .query(
            "SELECT indexname::text, tablename::text FROM pg_indexes
             WHERE schemaname = 'public' AND indexdef LIKE '% USING gist %'
               AND left(tablename::text, 7) <> 'backup_' ORDER BY 1",
            &[],
        )
        .await
        .expect("list gist indexes")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn enum_labels(client: &Client, name: &str) -> Vec<String> {
    client
        .query(
            "SELECT e.enumlabel::text FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
             WHERE t.typnamespace = 'public'::regnamespace AND t.typname = $1
             ORDER BY e.enumsortorder",
            &[&name],
        )
        .await
        .expect("enum labels")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_tes_migration_with_postgis() -> anyhow::Result<()> {
    let p = common::fixture_pair("tes_full", "tes").await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;

    let src_sums = live_sums(&src).await;
    let src_sig = inspect::catalog_signature(&src, None).await?;
    let dst_sums_before = live_sums(&dst).await;
    let dst_sig_before = inspect::catalog_signature(&dst, None).await?;
    let dst_geoms_before: BTreeMap<&str, BTreeMap<i32, String>> = {
        let mut m = BTreeMap::new();
        for t in GEOMETRY_TABLES {
            m.insert(t, geometries(&dst, t).await);
        }
        m
    };
    let src_gist = gist_indexes(&src).await;
    assert_eq!(src_gist.len(), 7, "{src_gist:?}");
    assert_eq!(
        texts(&dst, &common::areas_in_envelope()).await,
        vec!["110010003001_001"],
        "before: the envelope sees only the old Washington parcel"
    );

    let report = common::migrate(&p).await?;
    assert_eq!(report.tables.len(), 15, "{:?}", report.tables);

    // Counts per table: the source's.
    let counts: BTreeMap<String, i64> = live_sums(&dst)
        .await
        .into_iter()
        .map(|(t, s)| (t, s.rows))
        .collect();
    let mut expected: BTreeMap<String, i64> = src_sums.keys().map(|t| (t.clone(), 4)).collect();
    expected.insert("Area".into(), 3);
    expected.insert("AreaOnScenario".into(), 3);
    expected.insert("TreeCanopy".into(), 5);
    assert_eq!(counts, expected);
    assert_eq!(
        live_sums(&dst).await,
        src_sums,
        "every row equals the source's"
    );

    // The rebuilt values are live.
    assert_eq!(
        text(
            &dst,
            r#"SELECT af_id FROM "Blockgroup" WHERE id = '510750001001'"#
        )
        .await,
        "AF001_MOD"
    );
    assert!(
        boolean(
            &dst,
            r#"SELECT abs(tree_canopy - 31.68) < 1e-9 FROM "Blockgroup" WHERE id = '510750001001'"#
        )
        .await
    );
    assert_eq!(
        text(&dst, r#"SELECT slug FROM "Municipality" WHERE gid = 1"#).await,
        "richmond-va-modified"
    );
    assert_eq!(
        text(&dst, r#"SELECT name FROM "User" WHERE id = 1"#).await,
        "John Doe Modified",
        "no preserved tables: User carries the source's rows too"
    );

    // Geometries: exactly the source's, and the backup keeps the old, unshifted ones.
    for table in GEOMETRY_TABLES {
        let src_geoms = geometries(&src, table).await;
        assert_eq!(geometries(&dst, table).await, src_geoms, "{table}");
        for (gid, ewkt) in &src_geoms {
            let sql = format!(
                "SELECT ST_Equals(geom, ST_GeomFromEWKT($1)) FROM {} WHERE gid = $2",
                pgzm_tests::quote_ident(table)
            );
            let equal: bool = dst.query_one(&sql, &[ewkt, gid]).await?.get(0);
            assert!(equal, "{table} gid {gid}");
        }
        let backup = format!("backup_{table}");
        assert_eq!(
            geometries(&dst, &backup).await,
            dst_geoms_before[table],
            "{backup} keeps the old geometries"
        );
        let sql = format!(
            "SELECT count(*) FROM {} n JOIN {} b USING (gid)
             WHERE ST_HausdorffDistance(ST_Translate(b.geom, 0.001, 0.001), n.geom) >= 1e-9",
            pgzm_tests::quote_ident(table),
            pgzm_tests::quote_ident(&backup)
        );
        assert_eq!(
            int(&dst, &sql).await,
            0,
            "{table}: new = old shifted by 0.001°"
        );
    }

    // Every GiST index is on the new tables, under the source's names, and is valid.
    assert_eq!(gist_indexes(&dst).await, src_gist);
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             JOIN pg_am a ON a.oid = c.relam
             WHERE a.amname = 'gist' AND c.relnamespace = 'public'::regnamespace
               AND NOT (i.indisvalid AND i.indisready)"
        )
        .await,
        0
    );

    // The spatial query returns the migrated rows, and can use the GiST index.
    let envelope_query = common::areas_in_envelope();
    assert_eq!(
        texts(&dst, &envelope_query).await,
        vec!["110010003001_001", "510750001001_001"]
    );
    dst.batch_execute("SET enable_seqscan = off").await?;
    let plan = texts(&dst, &format!("EXPLAIN {envelope_query}"))
        .await
        .join("\n");
    dst.batch_execute("RESET enable_seqscan").await?;
    assert!(plan.contains("area_idx"), "{plan}");

    // PostGIS is still installed in public and works.
    assert_eq!(
        text(
            &dst,
            "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'postgis'"
        )
        .await,
        "public"
    );
    assert_eq!(
        text(
            &dst,
            "SELECT ST_AsText(ST_Centroid(ST_MakeEnvelope(0, 0, 2, 2, 4326)))"
        )
        .await,
        "POINT(1 1)"
    );
    assert!(!text(&dst, "SELECT postgis_full_version()").await.is_empty());

    // Enums: the live types carry the source's labels and are the ones the new tables use;
    // the old ones moved to backup names together with the backup tables.
    for ty in ["AreaType", "City", "TokenType"] {
        assert_eq!(
            enum_labels(&dst, ty).await,
            enum_labels(&src, ty).await,
            "{ty}"
        );
        assert_eq!(
            enum_labels(&dst, &format!("backup_{ty}")).await,
            enum_labels(&src, ty).await,
            "backup_{ty}"
        );
    }
    for (table, ty) in [
        ("Scenario", r#""City""#),
        ("backup_Scenario", r#""backup_City""#),
    ] {
        assert_eq!(
            column_type(&dst, &format!(r#"public."{table}""#), "city").await,
            ty
        );
    }
    assert_eq!(
        int(&dst, r#"INSERT INTO "TreeCanopy"(geom, city) VALUES (ST_Multi(ST_MakeEnvelope(0, 0, 1, 1, 4326)), 'BOSTON') RETURNING gid::int8"#).await,
        6
    );

    // Sequences: every serial sequence is at or past its column's data, and an insert into
    // "User" gets a fresh id.
    for seq in inspect::sequences(&dst).await? {
        let Some((table, column)) = &seq.owned_by else {
            continue;
        };
        let max = int(
            &dst,
            &format!(
                "SELECT coalesce(max({})::int8, 0) FROM {}",
                pgzm_tests::quote_ident(column),
                pgzm_tests::quote_ident(table)
            ),
        )
        .await;
        assert!(
            seq.last_value >= max && (seq.is_called || seq.last_value > max),
            "{seq:?} behind max {max}"
        );
    }
    let max_id = int(&dst, r#"SELECT max(id)::int8 FROM "User""#).await;
    let id = int(
        &dst,
        r#"INSERT INTO "User"(email, "updatedAt") VALUES ('new@example.com', now()) RETURNING id::int8"#,
    )
    .await;
    assert!(id > max_id, "new id {id} must be above {max_id}");
    assert!(int(&dst, r#"SELECT last_value FROM "User_id_seq""#).await >= id);

    // Backups: one per table, with the old destination's rows and definitions.
    assert_backup_of(
        &dst,
        &dst_sums_before,
        &dst_sig_before,
        "backup tables vs the old live tables",
    )
    .await;

    // Definitions equal the source's; nothing half-built remains; all keys hold.
    let dst_sig = inspect::catalog_signature(&dst, None).await?;
    assert_same_signature(&dst_sig, &src_sig, "destination vs source");
    assert_none_with_prefix(&dst, "shadow_").await;
    assert!(inspect::fk_orphans(&dst).await?.is_empty());
    assert!(inspect::triggers(&dst).await?.is_empty());

    // The source is unchanged.
    assert_live_unchanged(&src, &src_sums, &src_sig, "source before vs after").await;
    assert_none_with_prefix(&src, "shadow_").await;
    assert_none_with_prefix(&src, "backup_").await;
    Ok(())
}
