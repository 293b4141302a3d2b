//! Shared setup of the integration tests: a source and a destination database on two distinct
//! throwaway servers, fixtures, and running the migration through the coordinator's library API
//! with the in-process agent (exactly what `pgzm start` does).

#![allow(dead_code)]

use std::time::Duration;

use pgzm_coordinator::agents::AgentPool;
use pgzm_coordinator::conninfo::DbUrl;
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

/// Default options for tests: 2 jobs, short swap timeout.
pub fn options(p: &Pair) -> StartOptions {
    StartOptions {
        jobs: 2,
        swap: SwapSettings {
            lock_timeout: Duration::from_millis(50),
            total_timeout: Duration::from_secs(10),
        },
        copy_retries: 1,
        ..StartOptions::new(
            DbUrl::parse(&p.source.url(), "source").expect("source url"),
            DbUrl::parse(&p.dest.url(), "destination").expect("dest url"),
        )
    }
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

/// Runs `swap` on the destination of `p` (what `pgzm swap --dest URL` does), with the same
/// short lock settings as [`options`].
pub async fn swap(p: &Pair) -> Result<Report, CoordinatorError> {
    let opts = options(p);
    pgzm_coordinator::cutover::swap_command(pgzm_coordinator::cutover::SwapOptions {
        destination: opts.destination,
        migration_id: None,
        dry_run: false,
        locks: opts.swap,
    })
    .await
}

/// `pgzm status` of the destination of `p`.
pub async fn status(p: &Pair) -> pgzm_coordinator::status::Status {
    let dest = DbUrl::parse(&p.dest.url(), "destination").expect("dest url");
    pgzm_coordinator::status::status(&dest)
        .await
        .expect("pgzm status")
}
