//! `--max-replication-lag` against a real streaming standby of the destination (made with
//! `pg_basebackup`), whose replay is paused to make it lag: the copy pauses while the standby
//! lags more than the limit, says why, and goes on once replay has caught up.

use std::time::{Duration, Instant};

use pgzm_tests::{PgCluster, TestDb};

use crate::checks::{int, live_sums};
use crate::common::{self, Pair};

/// Longest any wait of this test may take.
const DEADLINE: Duration = Duration::from_secs(60);

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_pauses_while_a_standby_lags_and_goes_on_once_it_caught_up() {
    let primary = tokio::task::spawn_blocking(|| PgCluster::start().expect("start the primary"))
        .await
        .expect("join");
    let primary: &'static PgCluster = Box::leak(Box::new(primary));
    let standby = tokio::task::spawn_blocking(|| PgCluster::standby_of(primary).expect("standby"))
        .await
        .expect("join");
    let (src_cluster, _) = PgCluster::shared_pair();
    let p = Pair {
        source: TestDb::create(src_cluster, "lag_src")
            .await
            .expect("source"),
        dest: TestDb::create(primary, "lag_dst")
            .await
            .expect("destination"),
    };
    p.source
        .batch(
            "CREATE TABLE blob (id int PRIMARY KEY, body text);
             INSERT INTO blob SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 6000) g;
             ANALYZE blob",
        )
        .await
        .expect("blob");
    let replica = connect(&standby.url("postgres")).await;
    replica
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");

    let mut opts = common::options(&p);
    opts.jobs = 1;
    // About 10 s of copy: long enough for the lag to pass the limit while it runs.
    opts.max_rate = Some(300 << 10);
    opts.max_replication_lag = Some(Duration::from_secs(1));
    let run = tokio::spawn(common::run(opts));

    let dst = p.dest.connect().await.expect("connect dest");
    let started = Instant::now();
    let reason = loop {
        let paused: Option<String> = dst
            .query_opt(
                "SELECT paused FROM pgzm.migrations WHERE paused IS NOT NULL",
                &[],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        if let Some(reason) = paused {
            break reason;
        }
        assert!(!run.is_finished(), "the run ended without pausing");
        assert!(started.elapsed() < DEADLINE, "the copy never paused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(reason.contains("replica lag"), "{reason}");
    // `status` shows the limits and the pause.
    let limits = common::status(&p)
        .await
        .copy_limits
        .expect("the copy's limits");
    assert_eq!(limits.max_rate_bytes_per_s, Some(300 << 10));
    assert_eq!(limits.max_replication_lag_s, Some(1.0));
    assert_eq!(limits.paused.as_deref(), Some(reason.as_str()));
    // Paused: what the destination's COPY has processed stays put (a chunk at most).
    let processed = || async {
        dst.query_opt(
            "SELECT bytes_processed FROM pg_stat_progress_copy WHERE relid = 'public.shadow_blob'::regclass",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map_or(0, |r| r.get::<_, i64>(0))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = processed().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = processed().await;
    assert!(
        after - before <= 128 << 10,
        "the copy went on while paused: {before} -> {after} bytes"
    );
    assert!(!run.is_finished());

    replica
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    let report = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the run ends once the standby caught up")
        .expect("join")
        .expect("the migration");
    assert_eq!(report.rows, 6000);
    assert_eq!(
        int(
            &dst,
            "SELECT count(*) FROM pgzm.migrations WHERE paused IS NOT NULL"
        )
        .await,
        0,
        "the pause was lifted"
    );
    let src = p.source.connect().await.expect("connect source");
    let mut want = live_sums(&src).await;
    want.retain(|t, _| t == "blob");
    let mut got = live_sums(&dst).await;
    got.retain(|t, _| t == "blob");
    assert_eq!(got, want);
}
