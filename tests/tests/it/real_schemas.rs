//! Objects *around* the migrated tables (issue 11): every object outside the migrated set that
//! depends on a replaced object follows the swap — functions typed on a table's row type (with
//! their body, owner, grants, comment and security settings), functions with SQL-standard
//! bodies, views and foreign keys in other schemas, views calling such functions, policies and
//! column defaults of other tables — or the plan refuses before any change, naming the object.
//! Nothing stays bound to a `backup_` object: `cleanup` and the next `start` succeed, and
//! `rollback` puts every dependent back on the restored tables.

use crate::checks;
use crate::common;

use checks::{boolean, int, live_sums, text, texts};
use common::dest_url;
use pgzm_coordinator::backup;
use pgzm_coordinator::rollback::{rollback, RollbackOptions};
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::{quote_ident, TestDb};
use tokio_postgres::Client;

async fn ensure_role(db: &TestDb, role: &str) {
    db.batch(&format!(
        "DO $$ BEGIN CREATE ROLE {} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        quote_ident(role)
    ))
    .await
    .expect("create role");
}

/// Dependents of the simple fixture's tables, in `public` and in another schema, as a
/// production database accumulates them.
const DEPENDENTS: &str = r#"
CREATE FUNCTION public.active_users(min_id integer) RETURNS SETOF "User"
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public, pg_temp
    AS $$ SELECT * FROM "User" WHERE id >= min_id ORDER BY id $$;
COMMENT ON FUNCTION public.active_users(integer) IS 'users from an id on';
REVOKE ALL ON FUNCTION public.active_users(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.active_users(integer) TO app_ro;
ALTER FUNCTION public.active_users(integer) OWNER TO app_owner;
GRANT SELECT ON "User" TO app_owner;
CREATE FUNCTION public.user_label(u "User") RETURNS text LANGUAGE sql IMMUTABLE
    AS $$ SELECT u.name || ' <' || u.email || '>' $$;
CREATE FUNCTION public.post_count() RETURNS bigint LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT count(*) FROM "Post"; END;
CREATE PROCEDURE public.touch_user(u "User") LANGUAGE plpgsql AS $$ BEGIN NULL; END $$;
CREATE VIEW public.top_users AS SELECT id, name FROM public.active_users(1);
CREATE SCHEMA reporting;
CREATE VIEW reporting.post_authors AS
    SELECT p.id, p.title, u.name FROM public."Post" p JOIN public."User" u ON u.id = p.user_id;
CREATE VIEW reporting.labels AS SELECT public.user_label(u) AS label FROM public."User" u;
CREATE TABLE reporting.featured (post_id integer REFERENCES public."Post"(id), note text);
INSERT INTO reporting.featured VALUES (101, 'pinned');
CREATE TABLE public.audit_note (id integer PRIMARY KEY, user_id integer,
                                ticket integer DEFAULT nextval('public."User_id_seq"'::regclass));
INSERT INTO public.audit_note (id, user_id) VALUES (1, 1);
ALTER TABLE public.audit_note ENABLE ROW LEVEL SECURITY;
CREATE POLICY known_users ON public.audit_note FOR SELECT TO app_ro
    USING (user_id IN (SELECT id FROM public."User"));
"#;

/// Objects outside the backup set that still depend on a `backup_` relation, type or routine
/// (the backup set's own members, and the parts of backup tables, are excluded).
async fn bound_to_backup(c: &Client) -> Vec<String> {
    texts(
        c,
        r#"WITH backup_objects AS (
               SELECT 'pg_class'::regclass AS cls, oid FROM pg_class WHERE left(relname, 7) = 'backup_'
               UNION ALL SELECT 'pg_type'::regclass, oid FROM pg_type WHERE left(typname, 7) = 'backup_'
               UNION ALL SELECT 'pg_proc'::regclass, oid FROM pg_proc WHERE left(proname, 7) = 'backup_')
           SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) || ' -> ' ||
                           pg_describe_object(d.refclassid, d.refobjid, 0)
           FROM pg_depend d JOIN backup_objects b ON b.cls = d.refclassid AND b.oid = d.refobjid
           WHERE d.deptype IN ('n', 'a')
             AND NOT EXISTS (SELECT 1 FROM backup_objects o WHERE o.cls = d.classid AND o.oid = d.objid)
             AND NOT (d.classid = 'pg_rewrite'::regclass AND EXISTS (
                      SELECT 1 FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
                      WHERE r.oid = d.objid AND left(v.relname, 7) = 'backup_'))
             AND NOT (d.classid IN ('pg_constraint'::regclass, 'pg_attrdef'::regclass, 'pg_trigger'::regclass, 'pg_policy'::regclass)
                      AND coalesce((SELECT conrelid FROM pg_constraint WHERE oid = d.objid AND d.classid = 'pg_constraint'::regclass),
                                   (SELECT adrelid FROM pg_attrdef WHERE oid = d.objid AND d.classid = 'pg_attrdef'::regclass),
                                   (SELECT tgrelid FROM pg_trigger WHERE oid = d.objid AND d.classid = 'pg_trigger'::regclass),
                                   (SELECT polrelid FROM pg_policy WHERE oid = d.objid AND d.classid = 'pg_policy'::regclass))
                          IN (SELECT oid FROM pg_class WHERE left(relname, 7) = 'backup_'))
             AND NOT (d.classid = 'pg_constraint'::regclass AND EXISTS (
                      SELECT 1 FROM pg_constraint k JOIN pg_type t ON t.oid = k.contypid
                      WHERE k.oid = d.objid AND left(t.typname, 7) = 'backup_'))
             AND NOT (d.classid = 'pg_class'::regclass AND EXISTS (
                      SELECT 1 FROM pg_index x JOIN pg_class t ON t.oid = x.indrelid
                      WHERE x.indexrelid = d.objid AND left(t.relname, 7) = 'backup_'))
           ORDER BY 1"#,
    )
    .await
}

/// What each dependent is bound to, by oid (so a re-pointed object reads the live tables).
async fn bindings(c: &Client) -> Vec<String> {
    texts(
        c,
        r#"SELECT 'active_users returns ' || (SELECT typrelid::regclass::text FROM pg_type WHERE oid = p.prorettype)
           FROM pg_proc p WHERE p.oid = 'public.active_users(integer)'::regprocedure
           UNION ALL
           SELECT 'user_label takes ' || (SELECT typrelid::regclass::text FROM pg_type WHERE oid = p.proargtypes[0])
           FROM pg_proc p WHERE p.proname = 'user_label' AND p.pronamespace = 'public'::regnamespace
           UNION ALL
           SELECT 'touch_user takes ' || (SELECT typrelid::regclass::text FROM pg_type WHERE oid = p.proargtypes[0])
           FROM pg_proc p WHERE p.proname = 'touch_user' AND p.pronamespace = 'public'::regnamespace
           UNION ALL
           SELECT 'post_count reads ' || d.refobjid::regclass::text
           FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
             AND d.objid = 'public.post_count()'::regprocedure AND d.refclassid = 'pg_class'::regclass
           UNION ALL
           SELECT 'featured references ' || confrelid::regclass::text FROM pg_constraint
           WHERE conrelid = 'reporting.featured'::regclass AND contype = 'f'
           UNION ALL
           SELECT 'audit_note.ticket uses ' || d.refobjid::regclass::text
           FROM pg_attrdef a JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
                                              AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> a.adrelid
           WHERE a.adrelid = 'public.audit_note'::regclass
           UNION ALL
           SELECT 'known_users reads ' || d.refobjid::regclass::text
           FROM pg_policy p JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
                                            AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> p.polrelid
           WHERE p.polname = 'known_users'
           ORDER BY 1"#,
    )
    .await
}

/// Owner, privileges, comment and security settings of `active_users`.
async fn active_users_attributes(c: &Client) -> String {
    text(
        c,
        "SELECT pg_get_userbyid(proowner) || ' ' || coalesce(proacl::text, 'default') || ' ' ||
                prosecdef || ' ' || coalesce(proconfig::text, '') || ' ' || provolatile::text || ' ' ||
                coalesce(obj_description(oid, 'pg_proc'), '')
         FROM pg_proc WHERE oid = 'public.active_users(integer)'::regprocedure",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_in_any_schema_follow_the_swap_and_the_rollback() -> anyhow::Result<()> {
    let p = common::fixture_pair("dependents", "simple").await;
    ensure_role(&p.dest, "app_ro").await;
    ensure_role(&p.dest, "app_owner").await;
    p.dest.batch(DEPENDENTS).await?;
    let dst = p.dest.connect().await?;
    let before_bindings = bindings(&dst).await;
    let attributes = active_users_attributes(&dst).await;
    assert!(
        attributes.starts_with("app_owner {") && attributes.contains("app_ro=X/app_owner"),
        "{attributes}"
    );

    // The plan lists every dependent and what happens to it.
    let mut dry = common::options(&p);
    dry.dry_run = true;
    let plan = common::run(dry).await?.plan;
    let listed: Vec<String> = plan
        .dependents
        .iter()
        .map(|d| format!("{} | {}", d.object, d.action))
        .collect();
    let mut lines: Vec<String> = plan
        .dependents
        .iter()
        .map(|d| format!("{} | on {} | {}", d.object, d.on, d.action))
        .collect();
    lines.sort();
    if let Some(text) = checks::golden_text(&dst, &lines.join("\n"), plan.migration_id).await {
        insta::assert_snapshot!("dependents_plan", text);
    }
    golden_swap(&dst, "dependents", &plan).await;
    for object in [
        "function public.active_users(integer)",
        "function public.user_label(public.\"User\")",
        "function public.post_count()",
        "procedure public.touch_user(public.\"User\")",
        "view public.top_users",
        "view reporting.post_authors",
        "view reporting.labels",
        "foreign key featured_post_id_fkey on table reporting.featured",
        "default of column ticket of table public.audit_note",
        "policy known_users on table public.audit_note",
    ] {
        assert!(
            listed.iter().any(|l| l.starts_with(&format!("{object} |"))),
            "{object} not listed: {listed:#?}"
        );
    }

    let report = common::migrate(&p).await?;
    assert!(report.swap.is_some());
    // Every dependent is now bound to the live (new) objects.
    let after = bindings(&dst).await;
    assert_eq!(
        after,
        vec![
            "active_users returns \"User\"",
            "audit_note.ticket uses \"User_id_seq\"",
            "featured references \"Post\"",
            "known_users reads \"User\"",
            "post_count reads \"Post\"",
            "touch_user takes \"User\"",
            "user_label takes \"User\"",
        ],
        "before the swap: {before_bindings:?}"
    );
    assert_eq!(after, before_bindings, "same names, new objects");
    assert!(
        bound_to_backup(&dst).await.is_empty(),
        "{:?}",
        bound_to_backup(&dst).await
    );
    // The recreated function keeps its attributes, and it and the views read the new data.
    assert_eq!(active_users_attributes(&dst).await, attributes);
    assert_eq!(
        texts(&dst, "SELECT name FROM public.top_users ORDER BY id").await,
        ["John Doe Modified", "Jane Smith Modified"]
    );
    assert_eq!(
        texts(&dst, "SELECT title FROM reporting.post_authors ORDER BY id").await,
        ["First Post Modified", "Second Post Modified"]
    );
    assert_eq!(
        texts(&dst, "SELECT label FROM reporting.labels ORDER BY 1").await,
        [
            "Jane Smith Modified <jane.smith.modified@example.com>",
            "John Doe Modified <john.doe.modified@example.com>"
        ]
    );
    assert_eq!(int(&dst, "SELECT public.post_count()").await, 2);
    dst.batch_execute(
        r#"DO $$ DECLARE u "User"; BEGIN SELECT * INTO u FROM "User" WHERE id = 1; CALL public.touch_user(u); END $$"#,
    )
    .await?;
    assert_eq!(
        int(&dst, "SELECT count(*) FROM reporting.featured").await,
        1
    );
    assert!(
        boolean(
            &dst,
            "SELECT convalidated FROM pg_constraint WHERE conrelid = 'reporting.featured'::regclass AND contype = 'f'"
        )
        .await
    );
    // The originals are in the backup set, still bound to the backup tables.
    assert_eq!(
        text(
            &dst,
            "SELECT (SELECT typrelid::regclass::text FROM pg_type WHERE oid = prorettype) FROM pg_proc WHERE proname = 'backup_active_users'"
        )
        .await,
        "\"backup_User\""
    );
    let migrated = live_sums(&dst).await;
    let migrated_bindings = bindings(&dst).await;

    // A second migration replaces this backup set (dropping it: nothing else depends on it).
    let second = common::migrate(&p).await?;
    assert!(second.swap.is_some());
    assert!(bound_to_backup(&dst).await.is_empty());
    assert_eq!(bindings(&dst).await, migrated_bindings);
    assert_eq!(active_users_attributes(&dst).await, attributes);

    // Rollback restores the first migration's tables, and every dependent follows them back.
    let rb = rollback_latest(&p).await?;
    assert!(rb.warnings.is_empty(), "{:?}", rb.warnings);
    golden_statements(&dst, "rollback_dependents", &rb.statements, rb.timestamp).await;
    assert_eq!(live_sums(&dst).await, migrated);
    assert_eq!(bindings(&dst).await, migrated_bindings);
    assert_eq!(active_users_attributes(&dst).await, attributes);
    assert!(bound_to_backup(&dst).await.is_empty());
    assert_eq!(
        texts(&dst, "SELECT name FROM public.top_users ORDER BY id").await,
        ["John Doe Modified", "Jane Smith Modified"]
    );

    // Cleanup drops what is left of the backup sets without tripping over dependents.
    let c = backup::cleanup(&dest_url(&p), i64::MAX / 2, false).await?;
    assert!(c.objects.iter().all(|o| !o.contains("kept")), "{c:?}");
    assert!(texts(
        &dst,
        "SELECT proname::text FROM pg_proc WHERE left(proname, 7) = 'backup_'"
    )
    .await
    .is_empty());
    Ok(())
}

/// Dependents pgzm cannot make follow the swap are refused at plan time, all of them in one
/// message, each named, and nothing changes in either database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependents_that_cannot_follow_are_refused_before_any_change() -> anyhow::Result<()> {
    let p = common::fixture_pair("dependents_refused", "simple").await;
    p.dest
        .batch(
            r#"CREATE DOMAIN user_row AS "User";
               CREATE TABLE inbox (id int, body text);
               CREATE RULE copy_to_users AS ON INSERT TO inbox
                   DO ALSO UPDATE "User" SET name = NEW.body WHERE id = NEW.id;
               CREATE FUNCTION first_user_sfunc(acc "User", u "User") RETURNS "User"
                   LANGUAGE sql AS 'SELECT coalesce(acc, u)';
               CREATE AGGREGATE first_user("User") (SFUNC = first_user_sfunc, STYPE = "User");"#,
        )
        .await?;
    let dst = p.dest.connect().await?;
    let sums = live_sums(&dst).await;
    for dry_run in [true, false] {
        let mut opts = common::options(&p);
        opts.dry_run = dry_run;
        let err = common::run(opts).await.expect_err("must be refused");
        assert!(matches!(err, CoordinatorError::Refused(_)), "{err:?}");
        let message = err.to_string();
        assert!(!message.contains('\n'), "one line: {message}");
        for named in [
            "type public.user_row",
            "rule copy_to_users on table public.inbox",
            "aggregate public.first_user(public.\"User\")",
        ] {
            assert!(message.contains(named), "{named} not in: {message}");
        }
    }
    assert_eq!(live_sums(&dst).await, sums);
    assert!(
        texts(
            &dst,
            "SELECT nspname::text FROM pg_namespace WHERE nspname = 'pgzm'"
        )
        .await
        .is_empty(),
        "no metadata written"
    );
    Ok(())
}

/// Item 10: a run whose swap fails never loses the current backup set (it used to be dropped
/// before the swap); `--keep-backups N` keeps older sets, listed and restorable by timestamp;
/// sets beyond N are dropped only after a swap has committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_swap_keeps_the_backup_set_and_older_sets_can_be_kept() -> anyhow::Result<()> {
    use pgzm_coordinator::swap::SwapSettings;
    use std::time::Duration;
    let p = common::fixture_pair("backup_sets", "simple").await;
    let dst = p.dest.connect().await?;
    let original = live_sums(&dst).await;
    let first = common::migrate(&p).await?;
    let after_first = live_sums(&dst).await;
    let list = || async { backup::list(&dest_url(&p)).await.expect("pgzm list") };
    assert_eq!(list().await.len(), 1);
    let backup_of_original = checks::backup_sums(&dst).await;
    assert_eq!(backup_of_original, original);

    // A reader holds a lock on a live table: the second run's swap cannot get its locks.
    let blocker = p.dest.connect().await?;
    blocker
        .batch_execute(r#"BEGIN; SELECT count(*) FROM "Comment""#)
        .await?;
    let mut opts = common::options(&p);
    opts.swap = SwapSettings {
        lock_timeout: Duration::from_millis(20),
        total_timeout: Duration::from_millis(500),
        kill_blockers_after: None,
    };
    let err = common::run(opts).await.expect_err("the swap cannot lock");
    assert!(
        matches!(err, CoordinatorError::SwapLockTimeout { .. }),
        "{err:?}"
    );
    blocker.batch_execute("ROLLBACK").await?;
    // Nothing was lost: the live tables and the first backup set are as they were.
    assert_eq!(live_sums(&dst).await, after_first);
    assert_eq!(checks::backup_sums(&dst).await, backup_of_original);
    let sets = list().await;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].timestamp, first.migration_id);

    // The swap moves the current set aside: a name it needs that is taken is refused at plan
    // time, before anything is copied.
    let taken = format!("backup_{}_User", first.migration_id);
    p.dest
        .batch(&format!("CREATE TABLE {} (x int)", quote_ident(&taken)))
        .await?;
    let err = common::migrate(&p).await.expect_err("aside name taken");
    assert!(
        matches!(err, CoordinatorError::Refused(_)) && err.to_string().contains(&taken),
        "{err}"
    );
    p.dest
        .batch(&format!("DROP TABLE {}", quote_ident(&taken)))
        .await?;
    // With --keep-backups 2 the next swap moves the first set aside and keeps it.
    let mut opts = common::options(&p);
    opts.keep_backups = 2;
    let third = common::run(opts).await?;
    assert!(
        third.dropped_backup.is_empty(),
        "{:?}",
        third.dropped_backup
    );
    let sets = list().await;
    assert_eq!(
        sets.iter().map(|s| s.timestamp).collect::<Vec<_>>(),
        [third.migration_id, first.migration_id]
    );
    assert!(sets[1].tables.iter().all(|t| t.present), "{:?}", sets[1]);
    let aside = format!("{}_", first.migration_id);
    let (older, newest): (Vec<_>, Vec<_>) = checks::backup_sums(&dst)
        .await
        .into_iter()
        .partition(|(k, _)| k.starts_with(&aside));
    assert_eq!(
        newest
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        after_first,
        "newest set"
    );
    assert_eq!(
        older
            .into_iter()
            .map(|(k, v)| (k[aside.len()..].to_string(), v))
            .collect::<std::collections::BTreeMap<_, _>>(),
        original,
        "the older set, moved aside"
    );
    assert!(
        bound_to_backup(&dst).await.is_empty(),
        "{:?}",
        bound_to_backup(&dst).await
    );
    let v = backup::verify(&dest_url(&p), Some(first.migration_id)).await?;
    assert!(v.valid, "{v:?}");

    // The older set is restorable by its timestamp: the destination as it was at the start.
    let rb = rollback(RollbackOptions {
        destination: dest_url(&p),
        migration_id: Some(first.migration_id),
        keep_tables: Vec::new(),
        dry_run: false,
        locks: common::locks(),
    })
    .await?;
    assert!(rb.warnings.is_empty(), "{:?}", rb.warnings);
    assert_eq!(live_sums(&dst).await, original);

    // The default (1) drops every older set, but only after the swap committed.
    let fourth = common::migrate(&p).await?;
    assert!(!fourth.dropped_backup.is_empty());
    let sets = list().await;
    assert_eq!(
        sets.iter().map(|s| s.timestamp).collect::<Vec<_>>(),
        [fourth.migration_id]
    );
    assert_eq!(checks::backup_sums(&dst).await, original);
    Ok(())
}

/// Item 7: tables with zero columns, or with only generated columns, migrate with their row
/// counts (they used to fail in the copy phase after the dry run had passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_copied_columns_migrate_with_their_rows() -> anyhow::Result<()> {
    let p = common::fixture_pair("no_columns", "simple").await;
    p.source
        .batch(
            "CREATE TABLE no_columns ();
             INSERT INTO no_columns SELECT FROM generate_series(1, 3);
             CREATE TABLE only_generated (g integer GENERATED ALWAYS AS (7) STORED);
             INSERT INTO only_generated SELECT FROM generate_series(1, 5);",
        )
        .await?;
    p.dest
        .batch("CREATE TABLE no_columns (); INSERT INTO no_columns DEFAULT VALUES;")
        .await?;
    let report = common::migrate(&p).await?;
    assert!(report.swap.is_some());
    let dst = p.dest.connect().await?;
    assert_eq!(int(&dst, "SELECT count(*) FROM no_columns").await, 3);
    assert_eq!(int(&dst, "SELECT count(*) FROM backup_no_columns").await, 1);
    assert_eq!(
        int(&dst, "SELECT count(*) FROM only_generated WHERE g = 7").await,
        5
    );
    Ok(())
}

/// Item 6: a preserved table whose default uses a sequence that no column owns (Pagila's
/// shape): at the swap the sequence is past the column's rows and past the live sequence, so
/// the next INSERT does not collide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserved_table_sequences_not_owned_by_a_column_are_set_past_the_data(
) -> anyhow::Result<()> {
    let p = common::fixture_pair("unowned_sequence", "simple").await;
    let schema = "CREATE SEQUENCE account_ids;
                  CREATE TABLE account (id integer PRIMARY KEY DEFAULT nextval('account_ids'), name text);";
    p.source.batch(schema).await?;
    p.dest.batch(schema).await?;
    p.source
        .batch("INSERT INTO account (name) SELECT 'src ' || g FROM generate_series(1, 10) g")
        .await?;
    // Production has more rows, and its sequence went further than its rows (a rolled-back
    // insert consumed values).
    p.dest
        .batch(
            "INSERT INTO account (name) SELECT 'dst ' || g FROM generate_series(1, 50) g;
             SELECT setval('account_ids', 80);",
        )
        .await?;
    let report = common::run(common::preserving(&p, &["account"])).await?;
    assert!(report.swap.is_some());
    let dst = p.dest.connect().await?;
    assert_eq!(int(&dst, "SELECT count(*) FROM account").await, 50);
    let id = int(
        &dst,
        "INSERT INTO account (name) VALUES ('after the swap') RETURNING id::int8",
    )
    .await;
    assert!(id > 80, "next id {id} must be past the live sequence (80)");
    Ok(())
}

/// Item 8: columns that reference large objects are refused at plan time (never copied as
/// dangling or clashing oids), naming the table and the column; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_object_references_are_refused_at_plan_time() -> anyhow::Result<()> {
    let p = common::fixture_pair("large_objects", "simple").await;
    p.source
        .batch(
            "CREATE TABLE document (id integer PRIMARY KEY, body oid);
             INSERT INTO document VALUES (1, lo_from_bytea(0, 'hello'));",
        )
        .await?;
    let dst = p.dest.connect().await?;
    let sums = live_sums(&dst).await;
    let err = common::migrate(&p).await.expect_err("refused");
    let message = err.to_string();
    assert!(matches!(err, CoordinatorError::Refused(_)), "{message}");
    assert!(
        message.contains("public.document.\"body\"") && message.contains("large object"),
        "{message}"
    );
    assert_eq!(live_sums(&dst).await, sums);
    // Without large objects in the source, an oid column is just a number and migrates.
    p.source
        .batch("SELECT lo_unlink(body) FROM document")
        .await?;
    common::migrate(&p).await?;
    Ok(())
}

/// Destination functions and a view typed on an enum the migration replaces: the swap recreates
/// them over the shadow type before the shadow type takes the live name (the other way round
/// the swap failed with "type public.shadow_mood does not exist", and nothing migrated). After
/// the swap they take and return the new type; after the rollback the restored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_and_views_typed_on_a_replaced_enum_follow_the_swap() -> anyhow::Result<()> {
    let p = common::pair("enum_dependents").await;
    let schema = "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
                  CREATE TABLE diary (id int PRIMARY KEY, m mood NOT NULL);";
    p.source.batch(schema).await?;
    p.source
        .batch("ALTER TYPE mood ADD VALUE 'ecstatic'; INSERT INTO diary VALUES (1, 'ok'), (2, 'happy'), (3, 'sad');")
        .await?;
    p.dest.batch(schema).await?;
    p.dest
        .batch(
            "INSERT INTO diary VALUES (1, 'sad');
             CREATE FUNCTION describe(x mood) RETURNS text LANGUAGE sql IMMUTABLE AS 'SELECT ''feeling '' || x::text';
             CREATE FUNCTION best() RETURNS mood LANGUAGE sql AS 'SELECT max(m) FROM diary';
             CREATE VIEW moods AS SELECT id, describe(m) AS said, m = 'ok'::mood AS fine FROM diary;",
        )
        .await?;
    let dst = p.dest.connect().await?;

    common::migrate(&p).await?;
    assert_eq!(
        text(&dst, "SELECT string_agg(said, ',' ORDER BY id) FROM moods").await,
        "feeling ok,feeling happy,feeling sad"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM moods WHERE fine").await, 1);
    assert_eq!(text(&dst, "SELECT best()::text").await, "happy");
    // Bound to the live (new) type: it has the value only the source's type has.
    assert_eq!(
        text(&dst, "SELECT describe('ecstatic')").await,
        "feeling ecstatic"
    );
    assert!(
        boolean(
            &dst,
            "SELECT p.proargtypes[0] = 'public.mood'::regtype AND p.prorettype = 'text'::regtype
               FROM pg_proc p WHERE p.proname = 'describe' AND p.pronamespace = 'public'::regnamespace"
        )
        .await
    );

    rollback_latest(&p).await?;
    assert_eq!(
        text(&dst, "SELECT string_agg(said, ',' ORDER BY id) FROM moods").await,
        "feeling sad"
    );
    assert_eq!(text(&dst, "SELECT best()::text").await, "sad");
    Ok(())
}

/// `pgzm rollback --latest` with the tests' short lock settings.
async fn rollback_latest(
    p: &common::Pair,
) -> Result<pgzm_coordinator::rollback::RollbackReport, CoordinatorError> {
    rollback(RollbackOptions {
        destination: dest_url(p),
        migration_id: None,
        keep_tables: Vec::new(),
        dry_run: false,
        locks: common::locks(),
    })
    .await
}

/// The whole life of a migration on a public sample database: `start` succeeds; the live
/// tables equal the source's (catalog signature and per-table checksums); nothing is bound to
/// a backup object; `cleanup` and a second `start` succeed; `rollback --latest` then restores
/// the destination exactly as the second run found it.
/// The swap transaction planned for `plan` (one statement per line, run-specific ids elided:
/// `checks::golden_text`): the golden text the planner must keep producing for a sample
/// schema. Server versions deparse views and defaults differently: the goldens are PostgreSQL
/// 15's.
async fn golden_swap(c: &Client, name: &str, plan: &pgzm_coordinator::plan::Plan) {
    let sql = pgzm_coordinator::swap::swap_sql(plan, None, std::time::Duration::from_millis(50));
    if let Some(text) = checks::golden_text(c, &sql, plan.migration_id).await {
        insta::assert_snapshot!(format!("swap_{name}"), text);
    }
}

/// A planned transaction's statements (the rollback's) as golden text (see `golden_swap`).
async fn golden_statements(c: &Client, name: &str, statements: &[String], migration_id: i64) {
    if let Some(text) = checks::golden_text(c, &statements.join(";\n"), migration_id).await {
        insta::assert_snapshot!(name.to_string(), text);
    }
}

async fn sample_database_round_trip(fixture: &str) -> anyhow::Result<()> {
    let p = common::sample_pair(&format!("sample_{fixture}"), fixture).await;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    // With statistics, as in production: the planned statements must not follow them (table
    // sizes order the copy, never the SQL).
    src.batch_execute("ANALYZE").await?;
    dst.batch_execute("ANALYZE").await?;
    let source_sums = live_sums(&src).await;
    let source_sig = checks::signature(&src).await;
    let before = live_sums(&dst).await;
    assert_ne!(before, source_sums, "the sides differ");

    // The dry run's rehearsal passes where the real run does, and leaves nothing behind.
    let mut dry = common::options(&p);
    dry.dry_run = true;
    let rehearsed = common::run(dry).await?;
    assert!(rehearsed.phases.iter().any(|ph| ph.phase == "rehearsal"));
    golden_swap(&dst, fixture, &rehearsed.plan).await;
    assert_eq!(
        live_sums(&dst).await,
        before,
        "{fixture}: the dry run changed nothing"
    );
    let first = common::migrate(&p).await?;
    assert!(first.swap.is_some());
    assert_eq!(live_sums(&dst).await, source_sums, "{fixture}: data");
    checks::assert_same_signature(
        &checks::signature(&dst).await,
        &source_sig,
        &format!("{fixture}: schema"),
    );
    assert!(
        bound_to_backup(&dst).await.is_empty(),
        "{:?}",
        bound_to_backup(&dst).await
    );
    // Materialized views hold the source's rows, built before the swap.
    for mv in texts(
        &src,
        "SELECT quote_ident(relname) FROM pg_class WHERE relkind = 'm' AND relnamespace = 'public'::regnamespace ORDER BY 1",
    )
    .await
    {
        assert_eq!(
            checks::checksum(&dst, &format!("public.{mv}")).await,
            checks::checksum(&src, &format!("public.{mv}")).await,
            "{fixture}: materialized view {mv}"
        );
    }
    let drop = pgzm_coordinator::state::drop_backup_statements(&dst, &first.plan.to_backup).await?;
    golden_statements(
        &dst,
        &format!("drop_backup_{fixture}"),
        &drop.statements,
        first.migration_id,
    )
    .await;
    let c = backup::cleanup(&dest_url(&p), i64::MAX / 2, false).await?;
    assert_eq!(c.backup_sets, [first.migration_id]);
    assert!(checks::backup_sums(&dst).await.is_empty());

    let before_second = live_sums(&dst).await;
    let before_second_sig = checks::signature(&dst).await;
    let second = common::migrate(&p).await?;
    assert!(second.swap.is_some());
    assert_eq!(live_sums(&dst).await, source_sums);
    let rb = rollback_latest(&p).await?;
    assert!(rb.warnings.is_empty(), "{:?}", rb.warnings);
    golden_statements(
        &dst,
        &format!("rollback_{fixture}"),
        &rb.statements,
        rb.timestamp,
    )
    .await;
    assert_eq!(live_sums(&dst).await, before_second, "{fixture}: rollback");
    checks::assert_same_signature(
        &checks::signature(&dst).await,
        &before_second_sig,
        &format!("{fixture}: schema after the rollback"),
    );
    assert!(bound_to_backup(&dst).await.is_empty());
    Ok(())
}

/// Chinook (lerocha/chinook-database): 11 tables with serial keys and a self-referencing
/// foreign key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinook_migrates_and_rolls_back() -> anyhow::Result<()> {
    sample_database_round_trip("chinook").await
}

/// Pagila (devrimgunduz/pagila): partitioned `payment`, a materialized view, `rewards_report`
/// returning `SETOF customer`, sequences no column owns, domains, an enum, 15 triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagila_migrates_and_rolls_back() -> anyhow::Result<()> {
    sample_database_round_trip("pagila").await
}

/// Item 3: partitioned tables (range, list and hash strategies, two levels, a default
/// partition, partitioned indexes and keys) and inheritance migrate: shadow partitions are
/// attached to a shadow parent, copied per partition and swapped together. A destination
/// partition the source does not have joins the backup set with its parent (listed, verified,
/// restored by rollback) instead of being dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_and_inherited_tables_migrate_and_roll_back() -> anyhow::Result<()> {
    let p = common::fixture_pair("partitions", "simple").await;
    let schema = r#"
        CREATE TABLE measurement (id bigint GENERATED ALWAYS AS IDENTITY, region text NOT NULL,
                                  at date NOT NULL, value numeric CHECK (value >= 0),
                                  PRIMARY KEY (region, at, id)) PARTITION BY LIST (region);
        CREATE TABLE measurement_eu PARTITION OF measurement FOR VALUES IN ('eu')
            PARTITION BY RANGE (at);
        CREATE TABLE measurement_eu_2025 PARTITION OF measurement_eu
            FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        CREATE TABLE measurement_eu_rest PARTITION OF measurement_eu DEFAULT;
        CREATE TABLE measurement_us PARTITION OF measurement FOR VALUES IN ('us');
        CREATE TABLE measurement_other PARTITION OF measurement DEFAULT;
        CREATE INDEX measurement_value ON measurement (value);
        CREATE TABLE bucket (k integer NOT NULL, v text) PARTITION BY HASH (k);
        CREATE TABLE bucket_0 PARTITION OF bucket FOR VALUES WITH (MODULUS 2, REMAINDER 0);
        CREATE TABLE bucket_1 PARTITION OF bucket FOR VALUES WITH (MODULUS 2, REMAINDER 1);
        CREATE TABLE vehicle (id integer PRIMARY KEY, name text NOT NULL);
        CREATE TABLE truck (payload integer CHECK (payload > 0)) INHERITS (vehicle);
        CREATE TABLE note (id integer PRIMARY KEY,
                           at date, region text, mid bigint);
    "#;
    p.source.batch(schema).await?;
    p.dest.batch(schema).await?;
    p.source
        .batch(
            "INSERT INTO measurement (region, at, value)
                 SELECT (ARRAY['eu', 'us', 'jp'])[1 + g % 3], DATE '2024-12-30' + g, g
                 FROM generate_series(1, 600) g;
             INSERT INTO bucket SELECT g, 'b' || g FROM generate_series(1, 100) g;
             INSERT INTO vehicle VALUES (1, 'car'), (2, 'bike');
             INSERT INTO truck VALUES (10, 'lorry', 7000), (11, 'van', 900);",
        )
        .await?;
    // Production: different rows, and one partition the rebuilt data set no longer has.
    p.dest
        .batch(
            "CREATE TABLE measurement_legacy PARTITION OF measurement FOR VALUES IN ('legacy');
             INSERT INTO measurement (region, at, value) VALUES ('legacy', '2020-01-01', 1),
                 ('eu', '2025-03-01', 5), ('us', '2025-03-02', 6);
             INSERT INTO bucket VALUES (1, 'old');
             INSERT INTO vehicle VALUES (1, 'old car');
             INSERT INTO truck VALUES (10, 'old lorry', 1);",
        )
        .await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let source_sums = live_sums(&src).await;
    let before = live_sums(&dst).await;
    let before_sig = checks::signature(&dst).await;

    let report = common::migrate(&p).await?;
    assert!(report.swap.is_some());
    assert!(
        report
            .plan
            .dependents
            .iter()
            .any(|d| d.object == "table public.measurement_legacy"),
        "{:?}",
        report.plan.dependents
    );
    checks::assert_same_signature(
        &checks::signature(&dst).await,
        &checks::signature(&src).await,
        "partitioned schema",
    );
    assert_eq!(live_sums(&dst).await, source_sums);
    assert_eq!(
        int(&dst, "SELECT count(*) FROM measurement").await,
        600,
        "rows reach the parent through its partitions"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM vehicle").await, 4);
    assert_eq!(int(&dst, "SELECT count(*) FROM ONLY vehicle").await, 2);
    // New rows route to the right partitions, and identity values do not collide.
    dst.batch_execute(
        "INSERT INTO measurement (region, at, value) VALUES ('eu', '2025-06-01', 1), ('xx', '2025-06-01', 2)",
    )
    .await?;
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM measurement_other WHERE region = 'xx'"
        )
        .await,
        1
    );
    // The legacy partition is in the backup set, attached to the old parent, listed and valid.
    let sets = backup::list(&dest_url(&p)).await?;
    assert!(
        sets[0]
            .tables
            .iter()
            .any(|t| t.backup == "backup_measurement_legacy" && t.present && t.rows == Some(1)),
        "{:?}",
        sets[0].tables
    );
    let v = backup::verify(&dest_url(&p), None).await?;
    assert!(v.valid, "{v:?}");
    assert_eq!(
        text(
            &dst,
            "SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = 'backup_measurement_legacy'::regclass"
        )
        .await,
        "backup_measurement"
    );

    // Rollback restores the partitioned tables exactly, the legacy partition included.
    let rb = rollback_latest(&p).await?;
    assert!(rb.warnings.is_empty(), "{:?}", rb.warnings);
    assert_eq!(live_sums(&dst).await, before);
    checks::assert_same_signature(
        &checks::signature(&dst).await,
        &before_sig,
        "after the rollback",
    );
    Ok(())
}

/// Item 4: materialized views. The source's is built over the new tables before the swap,
/// with its index, and swapped in by rename; a destination-only one reading a migrated table is
/// rebuilt the same way; neither is refreshed inside the lock window; both roll back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn materialized_views_are_built_before_the_swap() -> anyhow::Result<()> {
    let p = common::fixture_pair("matviews", "simple").await;
    let source_mv = r#"CREATE MATERIALIZED VIEW post_stats AS
                           SELECT user_id, count(*) AS posts FROM "Post" GROUP BY user_id;
                       CREATE UNIQUE INDEX post_stats_user ON post_stats (user_id);
                       COMMENT ON MATERIALIZED VIEW post_stats IS 'posts per user';"#;
    p.source.batch(source_mv).await?;
    p.dest.batch(source_mv).await?;
    ensure_role(&p.dest, "app_ro").await;
    p.dest
        .batch(
            r#"CREATE SCHEMA reporting;
               CREATE MATERIALIZED VIEW reporting.user_names AS SELECT id, name FROM public."User";
               CREATE INDEX user_names_name ON reporting.user_names (name);
               GRANT SELECT ON reporting.user_names TO app_ro;
               CREATE MATERIALIZED VIEW reporting.name_count AS SELECT count(*) AS n FROM reporting.user_names;
               CREATE MATERIALIZED VIEW reporting.unrelated AS SELECT 1 AS one;"#,
        )
        .await?;
    let dst = p.dest.connect().await?;
    let before_names = texts(&dst, "SELECT name FROM reporting.user_names ORDER BY id").await;
    let report = common::migrate(&p).await?;
    assert!(report.swap.is_some());
    assert!(report
        .phases
        .iter()
        .any(|ph| ph.phase == "materialized_views"));
    assert_eq!(
        texts(&dst, "SELECT name FROM reporting.user_names ORDER BY id").await,
        ["John Doe Modified", "Jane Smith Modified"]
    );
    assert_eq!(int(&dst, "SELECT n FROM reporting.name_count").await, 2);
    assert_eq!(
        int(&dst, "SELECT sum(posts)::int8 FROM post_stats").await,
        2
    );
    // Bound to the live tables, indexed, with privileges and comment, refreshable.
    assert!(
        bound_to_backup(&dst).await.is_empty(),
        "{:?}",
        bound_to_backup(&dst).await
    );
    assert_eq!(
        text(
            &dst,
            "SELECT obj_description('public.post_stats'::regclass, 'pg_class')"
        )
        .await,
        "posts per user"
    );
    assert!(
        boolean(
            &dst,
            "SELECT has_table_privilege('app_ro', 'reporting.user_names', 'SELECT')"
        )
        .await
    );
    assert_eq!(
        texts(
            &dst,
            "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid IN ('reporting.user_names'::regclass, 'public.post_stats'::regclass) ORDER BY 1"
        )
        .await,
        ["post_stats_user", "reporting.user_names_name"]
    );
    dst.batch_execute(
        "REFRESH MATERIALIZED VIEW CONCURRENTLY post_stats; REFRESH MATERIALIZED VIEW reporting.user_names",
    )
    .await?;
    assert_eq!(
        text(
            &dst,
            "SELECT relname::text FROM pg_class WHERE relname = 'backup_user_names' AND relnamespace = 'reporting'::regnamespace"
        )
        .await,
        "backup_user_names"
    );
    let rb = rollback_latest(&p).await?;
    assert!(rb.warnings.is_empty(), "{:?}", rb.warnings);
    assert_eq!(
        texts(&dst, "SELECT name FROM reporting.user_names ORDER BY id").await,
        before_names
    );
    assert!(bound_to_backup(&dst).await.is_empty());
    Ok(())
}

/// Item 5: objects only the source has are created when migrated objects use them: functions
/// called by defaults, checks, index expressions and views (and the functions those call
/// through SQL-standard bodies), composite, range and multirange types of columns (with the
/// range's `subtype_diff` function), and standalone sequences used by defaults (set at or past
/// the source's value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_only_the_source_has_are_created_when_used() -> anyhow::Result<()> {
    let p = common::fixture_pair("source_only", "simple").await;
    p.source
        .batch(
            r#"CREATE FUNCTION code_prefix() RETURNS text LANGUAGE sql IMMUTABLE RETURN 'V-';
               CREATE FUNCTION gen_code() RETURNS text LANGUAGE sql
                   BEGIN ATOMIC SELECT code_prefix() || lpad((random() * 1000)::int::text, 4, '0'); END;
               CREATE FUNCTION valid_code(c text) RETURNS boolean LANGUAGE sql IMMUTABLE
                   AS $$ SELECT c LIKE 'V-%' $$;
               CREATE FUNCTION normalize_code(c text) RETURNS text LANGUAGE sql IMMUTABLE
                   AS $$ SELECT upper(c) $$;
               CREATE FUNCTION shout(t text) RETURNS text LANGUAGE sql IMMUTABLE
                   AS $$ SELECT upper(t) || '!' $$;
               CREATE SEQUENCE ticket_no START 1000;
               CREATE TYPE money_amount AS (currency character(3), cents bigint);
               CREATE FUNCTION score_diff(a numeric, b numeric) RETURNS float8 LANGUAGE sql
                   IMMUTABLE AS $$ SELECT (a - b)::float8 $$;
               CREATE TYPE score_range AS RANGE (SUBTYPE = numeric, SUBTYPE_DIFF = score_diff,
                                                 MULTIRANGE_TYPE_NAME = score_ranges);
               CREATE TABLE voucher (
                   id integer PRIMARY KEY DEFAULT nextval('ticket_no'),
                   code text NOT NULL DEFAULT gen_code() CHECK (valid_code(code)),
                   price money_amount,
                   valid score_range DEFAULT '[1,10)',
                   windows score_ranges);
               CREATE INDEX voucher_code ON voucher (normalize_code(code));
               INSERT INTO voucher (price, windows) SELECT ROW('EUR', g * 100)::money_amount,
                   score_ranges(score_range(0, g), score_range(g + 1, g + 2))
                   FROM generate_series(1, 5) g;
               CREATE VIEW loud_users AS SELECT shout(name) AS name FROM "User";"#,
        )
        .await?;
    let src = p.source.connect().await?;
    let dst = p.dest.connect().await?;
    let report = common::migrate(&p).await?;
    assert!(report.swap.is_some());
    assert_eq!(
        live_sums(&dst).await.get("voucher"),
        live_sums(&src).await.get("voucher")
    );
    let id = int(
        &dst,
        "INSERT INTO voucher (price) VALUES (ROW('USD', 1)) RETURNING id::int8",
    )
    .await;
    assert!(id > 1004, "next ticket {id} is past the source's");
    assert!(
        boolean(
            &dst,
            "SELECT code LIKE 'V-%' FROM voucher ORDER BY id DESC LIMIT 1"
        )
        .await
    );
    assert_eq!(
        texts(&dst, "SELECT name FROM loud_users ORDER BY 1").await,
        ["JANE SMITH MODIFIED!", "JOHN DOE MODIFIED!"]
    );
    assert_eq!(
        int(
            &dst,
            "SELECT sum((price).cents)::int8 FROM voucher WHERE (price).currency = 'EUR'"
        )
        .await,
        1500
    );
    assert_eq!(
        text(&dst, "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'voucher'::regclass AND attname = 'price'").await,
        "money_amount"
    );
    assert_eq!(
        texts(
            &dst,
            "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'voucher'::regclass AND attname IN ('valid', 'windows') ORDER BY attnum"
        )
        .await,
        ["score_range", "score_ranges"]
    );
    assert!(boolean(&dst, "SELECT bool_and(valid @> 5::numeric) FROM voucher").await);
    assert!(texts(
        &dst,
        "SELECT typname::text FROM pg_type WHERE left(typname, 7) = 'shadow_'"
    )
    .await
    .is_empty());
    Ok(())
}

/// Nothing of a dry run's rehearsal is left: no shadow relation, no stand-in.
async fn assert_no_rehearsal_left(dst: &Client) {
    let left = texts(
        dst,
        "SELECT relname::text FROM pg_class WHERE left(relname, 7) IN ('shadow_', 'pgzm_re')",
    )
    .await;
    assert!(left.is_empty(), "left by the rehearsal: {left:?}");
}

/// Item 9: a dry run rehearses what the real run would create — the shadow schema, every
/// table's keys and indexes, foreign keys, materialized views, stand-ins for the views and
/// functions the swap recreates — in a transaction that is always rolled back, and reports
/// every failure at once, where the plan alone passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_finds_every_failure_of_the_real_run() -> anyhow::Result<()> {
    let p = common::fixture_pair("rehearsal", "simple").await;
    // The source uses a collation the destination lacks, and changed a column's type so that
    // a destination view can no longer be recreated over it.
    p.source
        .batch(
            r#"CREATE COLLATION german_sort FROM "C";
               ALTER TABLE "User" ALTER COLUMN name TYPE text COLLATE german_sort;
               ALTER TABLE "Post" ALTER COLUMN published TYPE text USING published::text;"#,
        )
        .await?;
    p.dest
        .batch(r#"CREATE VIEW published_posts AS SELECT id FROM "Post" WHERE published;"#)
        .await?;
    let dst = p.dest.connect().await?;
    let sums = live_sums(&dst).await;
    let sig = checks::signature(&dst).await;
    let mut opts = common::options(&p);
    opts.dry_run = true;
    let err = common::run(opts).await.expect_err("the rehearsal fails");
    let message = err.to_string();
    assert!(matches!(err, CoordinatorError::Refused(_)), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
    assert!(
        message.contains("german_sort") && message.contains("shadow table \"shadow_User\""),
        "{message}"
    );
    assert!(
        message.contains("recreate view public.published_posts at the swap would fail"),
        "{message}"
    );
    // Nothing is left of the rehearsal.
    assert_eq!(live_sums(&dst).await, sums);
    checks::assert_same_signature(&checks::signature(&dst).await, &sig, "after the dry run");
    assert_no_rehearsal_left(&dst).await;
    assert!(texts(
        &dst,
        "SELECT nspname::text FROM pg_namespace WHERE nspname = 'pgzm'"
    )
    .await
    .is_empty());
    // The real run fails too, and changes nothing live.
    common::migrate(&p).await.expect_err("the real run fails");
    assert_eq!(live_sums(&dst).await, sums);
    Ok(())
}

/// The rehearsal runs its actions in batches of 200 under one savepoint; a batch that fails is
/// undone and replayed one action at a time. With 450 more tables, two of them failing in
/// different batches, each failure is reported, and nothing else: the other actions of a failing
/// batch pass on replay, and the batches after it run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_of_many_tables_reports_each_failure_of_any_batch() -> anyhow::Result<()> {
    let p = common::fixture_pair("rehearsal_batches", "simple").await;
    p.source
        .batch(
            r#"CREATE COLLATION german_sort FROM "C";
               DO $$BEGIN FOR i IN 0..449 LOOP
                 EXECUTE format('CREATE TABLE many_%s (id int PRIMARY KEY, name text %s)',
                                lpad(i::text, 3, '0'),
                                CASE WHEN i IN (17, 333) THEN 'COLLATE german_sort' ELSE '' END);
               END LOOP; END$$;"#,
        )
        .await?;
    let dst = p.dest.connect().await?;
    let sig = checks::signature(&dst).await;
    let mut opts = common::options(&p);
    opts.dry_run = true;
    let err = common::run(opts).await.expect_err("the rehearsal fails");
    let CoordinatorError::Refused(failures) = &err else {
        panic!("refused expected: {err}");
    };
    let named = |t: &str| failures.iter().any(|f| f.contains(t));
    assert!(
        named("create shadow table \"shadow_many_017\" would fail")
            && named("create shadow table \"shadow_many_333\" would fail"),
        "{failures:?}"
    );
    assert!(
        failures
            .iter()
            .all(|f| f.contains("many_017") || f.contains("many_333")),
        "only the two tables fail: {failures:?}"
    );
    checks::assert_same_signature(&checks::signature(&dst).await, &sig, "after the dry run");
    assert_no_rehearsal_left(&dst).await;
    Ok(())
}

/// pgcopydb's test schemas (dimitri/pgcopydb `tests/unit` and friends), schema `public`:
/// inheritance, a table with no columns, one with only a generated column, identity columns,
/// sequences no column owns (one shared by two tables), EXCLUDE constraints, a NOT VALID check,
/// names with quotes, newlines and 63 bytes, a materialized view with a unique index, views
/// with collations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgcopydb_test_schemas_migrate_and_roll_back() -> anyhow::Result<()> {
    sample_database_round_trip("pgcopydb").await
}

/// The multi-schema sample (AdventureWorks for Postgres, `--schema` is next) loads on both
/// sides with its cross-schema keys and views intact: the fixture the multi-schema migration
/// tests start from.
#[tokio::test]
async fn adventureworks_fixture_loads_with_cross_schema_keys() -> anyhow::Result<()> {
    let p = common::sample_pair("adventureworks_load", "adventureworks").await;
    for db in [&p.source, &p.dest] {
        let c = db.connect().await?;
        let keys = |cross: bool| {
            format!(
                "SELECT count(*) FROM pg_constraint k JOIN pg_class a ON a.oid = k.conrelid
                 JOIN pg_class b ON b.oid = k.confrelid
                 WHERE k.contype = 'f' AND k.convalidated AND ({cross} = (a.relnamespace <> b.relnamespace))"
            )
        };
        assert_eq!(checks::int(&c, &keys(true)).await, 20);
        assert_eq!(checks::int(&c, &keys(false)).await, 70);
        assert_eq!(
            checks::int(
                &c,
                "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relnamespace::regnamespace::text
                   IN ('humanresources', 'person', 'production', 'purchasing', 'sales')"
            )
            .await,
            68
        );
    }
    Ok(())
}

/// A backup set of more than 200 tables is dropped in several `DROP TABLE` statements (one
/// statement of thousands of tables is superlinear in PostgreSQL), ordered so that each goes
/// before what it depends on: foreign keys within groups of four and from the last tables into
/// the first ones (across groups), an inheritance child and a partitioned table. Cleanup drops
/// the whole set; with the tables in name order in groups of 200 instead, the first group's
/// `DROP` fails ("other objects depend on it").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_set_of_many_tables_is_dropped_in_ordered_statements() -> anyhow::Result<()> {
    let p = common::pair("drop_many_backups").await;
    let schema = r#"DO $$BEGIN FOR i IN 0..259 LOOP
          EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, ref int %s)', lpad(i::text, 3, '0'),
            CASE WHEN i >= 250 THEN format('REFERENCES t_%s', lpad((i - 250)::text, 3, '0'))
                 WHEN i % 4 <> 0 THEN format('REFERENCES t_%s', lpad((i - i % 4)::text, 3, '0'))
                 ELSE '' END);
        END LOOP; END$$;
        CREATE TABLE a_parent (id int PRIMARY KEY);
        CREATE TABLE z_child (extra text) INHERITS (a_parent);
        CREATE TABLE m_parted (id int, at date) PARTITION BY RANGE (at);
        CREATE TABLE m_parted_2025 PARTITION OF m_parted FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        CREATE TABLE b_parted_2026 PARTITION OF m_parted FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        INSERT INTO t_001 VALUES (1, NULL); INSERT INTO t_251 VALUES (1, 1);"#;
    p.source.batch(schema).await?;
    p.dest.batch(schema).await?;
    let dst = p.dest.connect().await?;
    let first = common::migrate(&p).await?;
    assert!(first.swap.is_some());
    assert!(
        int(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'backup\\_%' AND relkind IN ('r', 'p')"
        )
        .await
            >= 265
    );
    let drop = pgzm_coordinator::state::drop_backup_statements(&dst, &first.plan.to_backup).await?;
    let drops = drop
        .statements
        .iter()
        .filter(|s| s.starts_with("DROP TABLE"))
        .count();
    assert!(drops >= 2, "several DROP TABLE statements: {drops}");
    let c = backup::cleanup(&dest_url(&p), i64::MAX / 2, false).await?;
    assert_eq!(c.backup_sets, [first.migration_id]);
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'backup\\_%'"
        )
        .await,
        0,
        "the whole set is dropped"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM t_251").await, 1);
    Ok(())
}
