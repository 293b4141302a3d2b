//! Shared setup of the integration tests: a source and a destination database on two distinct
//! throwaway servers, fixtures, and running the migration through the coordinator's library API
//! with the in-process agent (exactly what `pgzm start` does).

#![allow(dead_code)]

use std::time::Duration;

use pgzm_coordinator::agents::AgentPool;
use pgzm_coordinator::conninfo::DbUrl;
use pgzm_coordinator::cutover::SwapOptions;
use pgzm_coordinator::migrate::{self, Report, StartOptions};
use pgzm_coordinator::swap::SwapSettings;
use pgzm_coordinator::CoordinatorError;
use pgzm_tests::{PgCluster, TestDb};

/// A source database on the source server and a destination database on the destination server.
pub struct Pair {
    /// The rebuilt data set.
    pub source: TestDb,
    /// "Production".
    pub dest: TestDb,
}

/// Creates an empty pair.
pub async fn pair(label: &str) -> Pair {
    let (src_cluster, dst_cluster) = PgCluster::shared_pair();
    let source = TestDb::create(src_cluster, &format!("{label}_src"))
        .await
        .expect("create source db");
    let dest = TestDb::create(dst_cluster, &format!("{label}_dst"))
        .await
        .expect("create dest db");
    Pair { source, dest }
}

/// Creates a pair loaded with a fixture (see [`pgzm_tests::fixture_pair`]).
pub async fn fixture_pair(label: &str, fixture: &str) -> Pair {
    let (source, dest) = pgzm_tests::fixture_pair(label, fixture)
        .await
        .unwrap_or_else(|e| panic!("load fixture {fixture}: {e}"));
    Pair { source, dest }
}

/// Loads a vendored sample database (`schema.sql` + `data.sql`) on both sides and applies its
/// `source_changes.sql` to the source: production and its rebuilt data set.
pub async fn sample_pair(label: &str, fixture: &str) -> Pair {
    let p = pair(label).await;
    for db in [&p.source, &p.dest] {
        for f in ["schema.sql", "data.sql"] {
            db.load_fixture(&format!("{fixture}/{f}"))
                .await
                .unwrap_or_else(|e| panic!("load {fixture}/{f}: {e}"));
        }
    }
    p.source
        .load_fixture(&format!("{fixture}/source_changes.sql"))
        .await
        .unwrap_or_else(|e| panic!("load {fixture}/source_changes.sql: {e}"));
    p
}

/// Creates a pair with the coverage fixture in the source and only PostGIS in the destination.
///
/// On servers without PostGIS (the other PostgreSQL versions of `dev/test-versions`), its one
/// table with PostGIS columns takes `point` columns instead (`geometry(Point,4326)` and
/// `geography(Point,4326)`, their values and their GiST indexes alike), and with a server
/// older than PostgreSQL 15 its unique constraint loses NULLS NOT DISTINCT: everything else is
/// the fixture as written.
pub async fn coverage_pair(label: &str) -> Pair {
    let p = pair(label).await;
    for f in ["coverage/schema.sql", "coverage/data.sql"] {
        load_coverage(&p, &p.source, f).await;
    }
    if coverage_has_postgis(&p).await {
        p.dest
            .batch("CREATE EXTENSION IF NOT EXISTS postgis")
            .await
            .expect("create postgis in the destination");
    }
    p
}

/// The server's `server_version_num`.
pub async fn server_version(db: &pgzm_tests::TestDb) -> i64 {
    let c = db.connect().await.expect("connect");
    crate::checks::int(&c, "SELECT current_setting('server_version_num')::int8").await
}

/// Whether both servers of `p` have PostGIS.
async fn coverage_has_postgis(p: &Pair) -> bool {
    for db in [&p.source, &p.dest] {
        let c = db.connect().await.expect("connect");
        let available = crate::checks::boolean(
            &c,
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'postgis')",
        )
        .await;
        if !available {
            return false;
        }
    }
    true
}

/// Loads the coverage fixture's file `f` into `db` (of `p`), as [`coverage_pair`] describes.
pub async fn load_coverage(p: &Pair, db: &pgzm_tests::TestDb, f: &str) {
    let path = pgzm_tests::fixtures_dir().join(f);
    let mut sql = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {f}: {e}"));
    if !coverage_has_postgis(p).await {
        sql = without_postgis(&sql);
    }
    // UNIQUE NULLS NOT DISTINCT is PostgreSQL 15's (an older destination refuses it: see the
    // `versions` tests).
    if server_version(&p.source).await < 150000 || server_version(&p.dest).await < 150000 {
        sql = sql.replace(" NULLS NOT DISTINCT", "");
    }
    db.batch(&sql)
        .await
        .unwrap_or_else(|e| panic!("load {f}: {e}"));
}

/// The coverage fixture's SQL with `point` for its PostGIS points.
fn without_postgis(sql: &str) -> String {
    sql.replace("CREATE EXTENSION IF NOT EXISTS postgis;", "")
        .replace("geometry(Point,4326)", "point")
        .replace("geography(Point,4326)", "point")
        .replace(
            "ST_SetSRID(ST_MakePoint(-77.40 + n * 0.01, 37.50 + n * 0.01), 4326)",
            "point(-77.40 + n * 0.01, 37.50 + n * 0.01)",
        )
        .replace(
            "ST_SetSRID(ST_MakePoint(-71.00 - n * 0.01, 42.30 + n * 0.01), 4326)::geography",
            "point(-71.00 - n * 0.01, 42.30 + n * 0.01)",
        )
}

/// Tables of the TES fixture with a geometry column `geom`, all keyed by `gid`.
pub const GEOMETRY_TABLES: [&str; 7] = [
    "Area",
    "Blockgroup",
    "CongressionalDistrict",
    "County",
    "Municipality",
    "State",
    "TreeCanopy",
];

/// An envelope around one old and one migrated `"Area"` of the TES fixture.
pub const ENVELOPE: &str = "ST_MakeEnvelope(-77.4585, 37.5505, -77.0485, 38.8515, 4326)";

/// The ids of the TES `"Area"`s inside [`ENVELOPE`], sorted.
pub fn areas_in_envelope() -> String {
    format!(r#"SELECT id FROM "Area" WHERE ST_Intersects(geom, {ENVELOPE}) ORDER BY id"#)
}

/// The preserved set of scenario 8 (safe on TES: nothing in the source points at rows the
/// destination has and the source lacks).
pub const TES_PRESERVED: [&str; 3] = ["User", "Scenario", "BlockgroupOnScenario"];

/// The destination's URL.
pub fn dest_url(p: &Pair) -> DbUrl {
    DbUrl::parse(&p.dest.url(), "destination").expect("dest url")
}

/// What `pgzm rollback --latest --dest URL` runs on the destination of `p`, with the short
/// lock settings of [`locks`].
pub fn rollback_options(p: &Pair) -> pgzm_coordinator::rollback::RollbackOptions {
    pgzm_coordinator::rollback::RollbackOptions {
        destination: dest_url(p),
        migration_id: None,
        keep_tables: Vec::new(),
        dry_run: false,
        locks: locks(),
    }
}

/// The short lock settings of the tests' swaps and rollbacks.
pub fn locks() -> SwapSettings {
    SwapSettings {
        lock_timeout: Duration::from_millis(50),
        total_timeout: Duration::from_secs(10),
        kill_blockers_after: None,
    }
}

/// Default options for tests: 2 jobs, short swap timeout.
pub fn options(p: &Pair) -> StartOptions {
    StartOptions {
        jobs: 2,
        swap: locks(),
        copy_retries: 1,
        ..StartOptions::new(
            DbUrl::parse(&p.source.url(), "source").expect("source url"),
            dest_url(p),
        )
    }
}

/// [`options`] with `tables` preserved.
pub fn preserving(p: &Pair, tables: &[&str]) -> StartOptions {
    let mut opts = options(p);
    opts.preserved = tables.iter().map(|s| s.to_string()).collect();
    opts
}

/// The in-process agent, as `pgzm` runs it without `--agent`.
pub async fn in_process(opts: &StartOptions) -> AgentPool {
    AgentPool::in_process(opts.jobs)
        .await
        .expect("in-process agent")
}

/// Runs `start` with the in-process agent.
pub async fn run(opts: StartOptions) -> Result<Report, CoordinatorError> {
    let pool = in_process(&opts).await;
    migrate::start(opts, pool).await
}

/// Runs `start` with default options.
pub async fn migrate(p: &Pair) -> Result<Report, CoordinatorError> {
    run(options(p)).await
}

/// Runs `prepare` with the in-process agent (what `pgzm prepare` does). The returned value
/// holds the run's control session; drop it to release the destination's run lock.
pub async fn prepare(
    opts: &StartOptions,
) -> Result<Option<pgzm_coordinator::prepare::Prepared>, CoordinatorError> {
    let pool = in_process(opts).await;
    pgzm_coordinator::prepare::prepare(opts, pool, &mut migrate::Phases(Vec::new())).await
}

/// Runs `prepare` and releases its session, as a separate `pgzm prepare` process would.
pub async fn prepare_and_release(opts: &StartOptions) -> Result<Report, CoordinatorError> {
    let prepared = prepare(opts).await?.expect("prepare returned a report");
    Ok(prepared.release().await)
}

/// What `pgzm swap --dest URL` runs on the destination of `p`, with the same short lock
/// settings as [`options`].
pub fn swap_options(p: &Pair) -> SwapOptions {
    SwapOptions {
        destination: dest_url(p),
        migration_id: None,
        dry_run: false,
        locks: locks(),
        keep_backups: 1,
    }
}

/// Runs `swap` with [`swap_options`].
pub async fn swap(p: &Pair) -> Result<Report, CoordinatorError> {
    pgzm_coordinator::cutover::swap_command(swap_options(p)).await
}

/// Runs `swap --dry-run` with [`swap_options`]: checks the prepared set, changes nothing.
pub async fn swap_dry_run(p: &Pair) -> Result<Report, CoordinatorError> {
    pgzm_coordinator::cutover::swap_command(SwapOptions {
        dry_run: true,
        ..swap_options(p)
    })
    .await
}

/// `pgzm status` of the destination of `p`.
pub async fn status(p: &Pair) -> pgzm_coordinator::status::Status {
    pgzm_coordinator::status::status(&dest_url(p))
        .await
        .expect("pgzm status")
}
