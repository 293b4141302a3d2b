//! `--schema`: migrating schemas other than `public`, on AdventureWorks (five data schemas,
//! cross-schema keys, views in alias schemas) and on a schema the destination lacks, through
//! every command.

use pgzm_coordinator::backup;
use pgzm_coordinator::naming::QualName;
use pgzm_coordinator::rollback::rollback;
use pgzm_coordinator::status;

use crate::checks::{self, comparable_fingerprints, int, schema_fingerprint, schema_sums, texts};
use crate::common::{self, dest_url, locks};

/// AdventureWorks' data schemas.
const AW: [&str; 5] = [
    "humanresources",
    "person",
    "production",
    "purchasing",
    "sales",
];

/// Every schema of the AdventureWorks fixture: the data schemas, the alias schemas whose views
/// read them, and `public` (its domains).
const AW_ALL: [&str; 11] = [
    "humanresources",
    "person",
    "production",
    "purchasing",
    "sales",
    "hr",
    "pe",
    "pr",
    "pu",
    "sa",
    "public",
];

/// The five data schemas of AdventureWorks migrate together: the destination ends with the
/// source's data and schema (views of the alias schemas follow the new tables), the backup set
/// spans the five schemas and verifies, and a rollback brings back the destination as it was.
#[tokio::test]
async fn adventureworks_migrates_its_five_schemas_and_rolls_back() -> anyhow::Result<()> {
    let p = common::sample_pair("aw_schemas", "adventureworks").await;
    let (src, dst) = (p.source.connect().await?, p.dest.connect().await?);
    let before_sums = schema_sums(&dst, &AW).await;
    let before_schema = schema_fingerprint(&dst, &AW_ALL).await;
    let source_sums = schema_sums(&src, &AW).await;
    assert_eq!(source_sums.len(), 68);
    assert_ne!(before_sums, source_sums, "the source changes some rows");

    let mut opts = common::options(&p);
    opts.schemas = AW.iter().map(|s| s.to_string()).collect();
    let report = common::run(opts).await?;
    assert!(report.swap.is_some());
    assert_eq!(report.plan.tables.len(), 68);
    let schemas: std::collections::BTreeSet<&str> = report
        .plan
        .tables
        .iter()
        .map(|t| t.schema.as_str())
        .collect();
    assert_eq!(schemas.into_iter().collect::<Vec<_>>(), AW);
    assert!(report.plan.schemas_to_create.is_empty());

    assert_eq!(schema_sums(&dst, &AW).await, source_sums);
    let (left, right) = comparable_fingerprints(&dst, &src, &AW_ALL).await;
    same_lines(
        &left,
        &right,
        "the destination's schema (left) is the source's (right)",
    );
    // The alias schemas' views read the new tables.
    assert_eq!(
        int(&dst, "SELECT count(*) FROM sa.c").await,
        int(&src, "SELECT count(*) FROM sales.customer").await
    );
    // Cross-schema keys hold and point at the new tables.
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_constraint k JOIN pg_class a ON a.oid = k.conrelid
               JOIN pg_class b ON b.oid = k.confrelid
              WHERE k.contype = 'f' AND k.convalidated AND a.relnamespace <> b.relnamespace
                AND left(a.relname, 7) <> 'backup_' AND left(b.relname, 7) <> 'backup_'"
        )
        .await,
        20
    );

    let sets = backup::list(&dest_url(&p)).await?;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].table_count, 68);
    let person = sets[0]
        .tables
        .iter()
        .find(|t| t.schema == "person" && t.name == "address")
        .expect("person.address in the backup set");
    assert!(person.present);
    assert_eq!(person.rows, person.rows_at_swap);
    let verified = backup::verify(&dest_url(&p), None).await?;
    assert!(verified.valid, "{:#?}", verified.checks);
    assert!(
        verified
            .checks
            .iter()
            .any(|c| c.check == "backup table person.backup_address exists"),
        "{:#?}",
        verified.checks
    );

    let rolled = rollback(common::rollback_options(&p)).await?;
    assert!(rolled.restored.contains(&"sales.customer".to_string()));
    assert_eq!(schema_sums(&dst, &AW).await, before_sums);
    same_lines(
        &schema_fingerprint(&dst, &AW_ALL).await,
        &before_schema,
        "after the rollback (left), the destination's schema is as it was (right)",
    );
    for schema in AW {
        assert_eq!(
            checks::texts(
                &dst,
                &format!(
                    "SELECT relname::text FROM pg_class WHERE relnamespace = '{schema}'::regnamespace
                       AND left(relname, 7) IN ('backup_', 'shadow_')"
                )
            )
            .await,
            Vec::<String>::new(),
            "{schema}"
        );
    }
    Ok(())
}

/// A schema the destination lacks is created (owned by the database's owner), and every
/// command works in it: plan, prepare (a preserved `schema.table` the destination lacks is
/// refused), status, swap, a second run with its backup set there, list, verify, rollback and
/// cleanup. The schema's name is hostile.
#[tokio::test]
async fn a_new_schema_goes_through_every_command() -> anyhow::Result<()> {
    const SCHEMA: &str = "Näme \"q\" $$ x.y";
    let p = common::fixture_pair("new_schema", "simple").await;
    let q = |name: &str| QualName::new(SCHEMA, name).quoted();
    let ddl = format!(
        "CREATE SCHEMA {s};
         CREATE TYPE {mood} AS ENUM ('ok', 'sad');
         CREATE TABLE {account} (id serial PRIMARY KEY, name text NOT NULL, mood {mood} DEFAULT 'ok');
         CREATE TABLE {entry} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                               account_id int NOT NULL REFERENCES {account} (id), amount numeric);
         CREATE VIEW {totals} AS SELECT a.name, sum(e.amount) AS total FROM {account} a JOIN {entry} e ON e.account_id = a.id GROUP BY a.name;",
        s = pgzm_tests::quote_ident(SCHEMA),
        mood = q("mood"),
        account = q("account"),
        entry = q("entry"),
        totals = q("totals"),
    );
    p.source.batch(&ddl).await?;
    p.source
        .batch(&format!(
            "INSERT INTO {account} (name) SELECT 'a' || g FROM generate_series(1, 20) g;
             INSERT INTO {entry} (account_id, amount) SELECT 1 + g % 20, g FROM generate_series(1, 200) g;",
            account = q("account"),
            entry = q("entry"),
        ))
        .await?;
    let (src, dst) = (p.source.connect().await?, p.dest.connect().await?);
    let public_before = checks::live_sums(&dst).await;

    let mut opts = common::options(&p);
    opts.schemas = vec![SCHEMA.to_string()];
    // Plan only.
    let planned = common::run(pgzm_coordinator::report::StartOptions {
        dry_run: true,
        ..opts.clone()
    })
    .await?;
    assert_eq!(planned.plan.schemas_to_create, [SCHEMA]);
    assert_eq!(
        int(
            &dst,
            &format!(
                "SELECT count(*) FROM pg_namespace WHERE nspname = {}",
                lit(SCHEMA)
            )
        )
        .await,
        0,
        "a dry run creates nothing"
    );

    // A preserved table in a schema the destination lacks does not exist there: refused.
    let mut preserving = opts.clone();
    preserving.preserved = vec![format!("{}.account", pgzm_tests::quote_ident(SCHEMA))];
    let err = common::prepare_and_release(&preserving)
        .await
        .expect_err("the destination has no such table");
    assert!(
        err.to_string()
            .contains("does not exist in the destination"),
        "{err}"
    );

    // Prepare, status, swap.
    common::prepare_and_release(&opts).await?;
    let owner = checks::text(
        &dst,
        &format!(
            "SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = {}",
            lit(SCHEMA)
        ),
    )
    .await;
    assert_eq!(
        owner,
        checks::text(
            &dst,
            "SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = current_database()"
        )
        .await
    );
    let st = status::status(&dest_url(&p)).await?;
    assert!(st.problems.is_empty(), "{:#?}", st.problems);
    assert!(st
        .shadow_tables
        .iter()
        .all(|t| t.schema == SCHEMA && t.present));
    common::swap(&p).await?;
    assert_eq!(
        schema_sums(&dst, &[SCHEMA]).await,
        schema_sums(&src, &[SCHEMA]).await
    );
    let (left, right) = comparable_fingerprints(&dst, &src, &[SCHEMA]).await;
    assert_eq!(left, right);
    assert_eq!(
        checks::live_sums(&dst).await,
        public_before,
        "public untouched"
    );
    // New rows do not collide with the copied ones.
    dst.batch_execute(&format!(
        "INSERT INTO {} (account_id, amount) VALUES (1, 1)",
        q("entry")
    ))
    .await?;

    // Nothing was live there: no backup set.
    assert!(backup::list(&dest_url(&p)).await?.is_empty());
    let first = schema_sums(&dst, &[SCHEMA]).await;

    // A second run replaces the tables: its backup set lives in the schema.
    p.source
        .batch(&format!(
            "INSERT INTO {} (account_id, amount) SELECT 2, g FROM generate_series(1, 30) g",
            q("entry")
        ))
        .await?;
    common::run(opts.clone()).await?;
    assert_eq!(
        schema_sums(&dst, &[SCHEMA]).await,
        schema_sums(&src, &[SCHEMA]).await
    );
    let sets = backup::list(&dest_url(&p)).await?;
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].table_count, 2);
    assert!(sets[0]
        .tables
        .iter()
        .all(|t| t.schema == SCHEMA && t.present));
    let verified = backup::verify(&dest_url(&p), None).await?;
    assert!(verified.valid, "{:#?}", verified.checks);

    // Rollback: the first run's tables come back.
    let rolled = rollback(common::rollback_options(&p)).await?;
    assert_eq!(rolled.restored.len(), 2, "{rolled:?}");
    assert_eq!(schema_sums(&dst, &[SCHEMA]).await, first);
    assert_eq!(checks::live_sums(&dst).await, public_before);

    // Two more runs (the second drops the first's backup set), then cleanup.
    common::run(opts.clone()).await?;
    common::run(opts.clone()).await?;
    let cleaned = backup::cleanup(&dest_url(&p), i64::MAX, false).await?;
    assert_eq!(cleaned.backup_sets.len(), 1);
    assert_eq!(
        texts(
            &dst,
            &format!(
                "SELECT relname::text FROM pg_class WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = {})
                   AND left(relname, 7) IN ('backup_', 'shadow_')",
                lit(SCHEMA)
            )
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        schema_sums(&dst, &[SCHEMA]).await,
        schema_sums(&src, &[SCHEMA]).await
    );
    Ok(())
}

/// Preserved tables and filters in a non-`public` schema: `schema.table` names, a bare name
/// found in the one schema that has it, a bare name two schemas have (refused), and a filter
/// pattern with a schema.
#[tokio::test]
async fn preserved_tables_and_filters_name_schemas() -> anyhow::Result<()> {
    let p = common::fixture_pair("schema_preserved", "simple").await;
    let ddl = "CREATE SCHEMA app;
               CREATE TABLE app.users (id int PRIMARY KEY, email text);
               CREATE TABLE app.events (id int PRIMARY KEY, user_id int REFERENCES app.users (id), kind text);
               CREATE TABLE app.\"User\" (id int PRIMARY KEY);";
    for db in [&p.source, &p.dest] {
        db.batch(ddl).await?;
    }
    p.source
        .batch(
            "INSERT INTO app.users SELECT g, 'src' || g FROM generate_series(1, 5) g;
             INSERT INTO app.events SELECT g, 1 + g % 5, 'k' FROM generate_series(1, 50) g;",
        )
        .await?;
    p.dest
        .batch("INSERT INTO app.users SELECT g, 'dst' || g FROM generate_series(1, 8) g;")
        .await?;
    let dst = p.dest.connect().await?;

    let mut opts = common::options(&p);
    opts.schemas = vec!["public".into(), "app".into()];
    // "User" is a table of both schemas.
    opts.preserved = vec!["User".into()];
    let err = common::prepare_and_release(&opts)
        .await
        .expect_err("ambiguous");
    assert!(
        err.to_string().contains("several migrated schemas"),
        "{err}"
    );

    opts.preserved = vec!["app.users".into()];
    opts.tables = pgzm_coordinator::filter::TableFilter::parse(&[], &[], &["app.events".into()])?;
    let report = common::run(opts.clone()).await?;
    assert_eq!(report.plan.preserved.len(), 1);
    assert_eq!(report.plan.preserved[0].schema, "app");
    assert_eq!(
        texts(&dst, "SELECT email FROM app.users ORDER BY id")
            .await
            .len(),
        8,
        "the destination's rows of the preserved table"
    );
    assert_eq!(int(&dst, "SELECT count(*) FROM app.events").await, 0);
    // A bare name found in one schema only.
    opts.preserved = vec!["users".into()];
    opts.tables = Default::default();
    let again = common::run(opts).await?;
    assert_eq!(again.plan.preserved[0].schema, "app");
    assert_eq!(int(&dst, "SELECT count(*) FROM app.events").await, 50);
    Ok(())
}

/// Asserts two sorted line lists are equal, showing only the lines that differ.
fn same_lines(left: &[String], right: &[String], what: &str) {
    let l: std::collections::BTreeSet<&String> = left.iter().collect();
    let r: std::collections::BTreeSet<&String> = right.iter().collect();
    let only_left: Vec<&&String> = l.difference(&r).collect();
    let only_right: Vec<&&String> = r.difference(&l).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty() && left.len() == right.len(),
        "{what}:\n only left: {only_left:#?}\n only right: {only_right:#?}"
    );
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A type of a schema that is not migrated (AdventureWorks keeps its domains in `public`) must
/// exist in the destination: the plan says so before any change, and the run goes through
/// once the destination has it.
#[tokio::test]
async fn types_of_other_schemas_are_required_in_the_destination() -> anyhow::Result<()> {
    let p = common::pair("schema_required_type").await;
    p.source
        .batch(
            "CREATE DOMAIN public.\"Flag\" AS boolean NOT NULL;
             CREATE SCHEMA app;
             CREATE TABLE app.t (id int PRIMARY KEY, active public.\"Flag\" DEFAULT true);
             INSERT INTO app.t VALUES (1, true), (2, false);",
        )
        .await?;
    let mut opts = common::options(&p);
    opts.schemas = vec!["app".into()];
    let err = common::run(opts.clone()).await.expect_err("refused");
    assert!(
        err.to_string()
            .contains("type public.\"Flag\" is used by the migrated tables"),
        "{err}"
    );
    let dst = p.dest.connect().await?;
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'app'"
        )
        .await,
        0,
        "nothing changed"
    );
    p.dest
        .batch("CREATE DOMAIN public.\"Flag\" AS boolean NOT NULL;")
        .await?;
    common::run(opts).await?;
    assert_eq!(
        int(&dst, "SELECT count(*) FROM app.t WHERE active").await,
        1
    );
    Ok(())
}

/// `pgzm abort` of an interrupted run in non-`public` schemas: the sync triggers of a
/// preserved `app.users` go first, then the shadow objects (found by oid, wherever they are),
/// and the schema the run created goes with them; live tables stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_cleans_up_in_every_schema_and_drops_the_schema_it_created() -> anyhow::Result<()> {
    let p = common::pair("schema_abort").await;
    let app = "CREATE SCHEMA app;
               CREATE TABLE app.users (id int PRIMARY KEY, email text);";
    p.source
        .batch(&format!(
            "{app}
             INSERT INTO app.users SELECT g, 'src' || g FROM generate_series(1, 5) g;
             CREATE SCHEMA fresh;
             CREATE TYPE fresh.state AS ENUM ('new', 'done');
             CREATE TABLE fresh.jobs (id serial PRIMARY KEY, state fresh.state, user_id int REFERENCES app.users (id));
             INSERT INTO fresh.jobs (state, user_id) SELECT 'new', 1 + g % 5 FROM generate_series(1, 20) g;"
        ))
        .await?;
    p.dest
        .batch(&format!(
            "{app} INSERT INTO app.users SELECT g, 'dst' || g FROM generate_series(1, 7) g;"
        ))
        .await?;
    let dst = p.dest.connect().await?;
    let live = schema_sums(&dst, &["app"]).await;

    let mut opts = common::options(&p);
    opts.schemas = vec!["app".into(), "fresh".into()];
    opts.preserved = vec!["app.users".into()];
    let report = common::prepare_and_release(&opts).await?;
    assert_eq!(report.plan.schemas_to_create, ["fresh"]);
    dst.batch_execute(&format!(
        "UPDATE pgzm.migrations SET status = 'preparing' WHERE id = {}",
        report.migration_id
    ))
    .await?;
    let st = common::status(&p).await;
    assert_eq!(st.sync_triggers.len(), 4, "{st:?}");
    assert!(st.sync_triggers.iter().all(|t| t.table == "app.users"));

    let done = pgzm_coordinator::state::abort(&dest_url(&p), false, locks()).await?;
    assert_eq!(done.migrations, [report.migration_id]);
    assert!(
        done.removed
            .iter()
            .any(|r| r == "sync triggers on app.users"),
        "{:?}",
        done.removed
    );
    assert!(common::status(&p).await.sync_triggers.is_empty());
    assert_eq!(
        texts(
            &dst,
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE left(c.relname, 7) = 'shadow_'
             UNION ALL
             SELECT n.nspname || '.' || t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE left(t.typname, 7) = 'shadow_'"
        )
        .await,
        Vec::<String>::new()
    );
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'fresh'"
        )
        .await,
        0,
        "the schema the run created is gone"
    );
    assert_eq!(schema_sums(&dst, &["app"]).await, live);
    Ok(())
}
