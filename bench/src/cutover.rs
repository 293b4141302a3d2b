//! Cutover: the swap of a prepared migration of N tables while a client runs short queries on
//! them; with and without a long transaction holding a lock on one table.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgzm_tests::PgCluster;

use crate::methods::{fresh_db, run_measured};
use crate::Binaries;

/// One cutover measurement.
#[derive(Debug, Clone)]
pub struct CutoverResult {
    /// Tables swapped.
    pub tables: usize,
    /// Whether a long transaction held a lock on one table.
    pub blocker: bool,
    /// Whether each destination table had dependents that follow the swap: a view reading it
    /// and a function taking its row type.
    pub dependents: bool,
    /// Lock-held time reported by pgzm (server clock), ms.
    pub lock_held_ms: f64,
    /// Swap attempts.
    pub attempts: u64,
    /// Wall time of `pgzm swap`, ms.
    pub swap_ms: f64,
    /// Client queries during the swap.
    pub queries: usize,
    /// Worst client latency during the swap, ms.
    pub worst_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Client errors.
    pub errors: usize,
}

fn tables_sql(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "CREATE TABLE t_{i:04} (id serial PRIMARY KEY, v int); INSERT INTO t_{i:04} (v) SELECT g FROM generate_series(1, 100) g;\n"
        ));
    }
    s
}

/// A view and a function typed on the row type of each table: what the swap recreates.
fn dependents_sql(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "CREATE VIEW v_{i:04} AS SELECT id, v FROM t_{i:04};
             CREATE FUNCTION f_{i:04}(r t_{i:04}) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT r.v * 2';\n"
        ));
    }
    s
}

pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Prepares a migration of `n` tables, then swaps it while measuring a client.
pub async fn measure(
    source: &PgCluster,
    dest: &PgCluster,
    bins: &Binaries,
    n: usize,
    blocker: bool,
    dependents: bool,
) -> anyhow::Result<CutoverResult> {
    let src = fresh_db(source, "bench_cut_src", false).await?;
    let dst = fresh_db(dest, "bench_cut_dst", false).await?;
    connect(&src).await?.batch_execute(&tables_sql(n)).await?;
    connect(&dst).await?.batch_execute(&tables_sql(n)).await?;
    if dependents {
        connect(&dst)
            .await?
            .batch_execute(&dependents_sql(n))
            .await?;
    }
    run_measured(
        Command::new(&bins.pgzm)
            .args(["-q", "prepare", "--json", "--source", &src, "--dest", &dst]),
    )?;

    let queries = (0..n)
        .map(|i| format!("SELECT v FROM t_{i:04} WHERE id = 7"))
        .collect();
    let probe = Probe::start(&dst, queries).await?;
    let holder = if blocker {
        let c = connect(&dst).await?;
        c.batch_execute(&format!("BEGIN; SELECT count(*) FROM t_{:04}", n - 1))
            .await?;
        Some(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            c.batch_execute("COMMIT").await
        }))
    } else {
        None
    };
    let pgzm = bins.pgzm.clone();
    let dst2 = dst.clone();
    let (m, during) = probe
        .around(move || {
            run_measured(Command::new(&pgzm).args(["-q", "swap", "--json", "--dest", &dst2]))
        })
        .await?;
    if let Some(h) = holder {
        h.await??;
    }
    let report: serde_json::Value = serde_json::from_str(&m.stdout)?;
    Ok(CutoverResult {
        tables: n,
        blocker,
        dependents,
        lock_held_ms: report["swap"]["lock_held_us"].as_f64().unwrap_or(0.0) / 1000.0,
        attempts: report["swap"]["attempts"].as_u64().unwrap_or(0),
        swap_ms: m.elapsed.as_secs_f64() * 1000.0,
        queries: during.queries,
        worst_ms: during.worst_ms,
        p99_ms: during.p99_ms,
        errors: during.errors,
    })
}

/// What a probing client saw while a step ran.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latencies {
    /// Queries that overlapped the step.
    pub queries: usize,
    /// The slowest of them, ms.
    pub worst_ms: f64,
    /// Their 99th percentile, ms.
    pub p99_ms: f64,
    /// Queries that failed, during the whole probe.
    pub errors: usize,
}

/// The `application_name` of a [`Probe`]'s session.
pub const PROBE_APPLICATION: &str = "pgzm-bench-probe";

/// A client running short queries on the destination in a loop (one session, the queries in
/// turn), each timed: what production sees of a step that takes locks.
pub struct Probe {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Probe {
    /// Connects to `url` and starts running `queries` in turn.
    pub async fn start(url: &str, queries: Vec<String>) -> anyhow::Result<Probe> {
        anyhow::ensure!(!queries.is_empty(), "a probe needs queries");
        // Named, so that samplers of the server's sessions can tell it from the tool's.
        let mut config: tokio_postgres::Config = url.parse()?;
        config.application_name(PROBE_APPLICATION);
        let (c, conn) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<Vec<(Instant, Duration, bool)>>> = Arc::default();
        let task = {
            let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = c.simple_query(&queries[i % queries.len()]).await.is_ok();
                    samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((t, t.elapsed(), ok));
                    i += 1;
                }
                anyhow::Ok(())
            })
        };
        Ok(Probe {
            stop,
            samples,
            task,
        })
    }

    /// Runs `step` (blocking: a child process) 300 ms after the probe settled in, lets the
    /// probe go on 200 ms after it, stops the probe and returns the step's result with what the
    /// probe saw of the queries that overlapped it.
    pub async fn around<T: Send + 'static>(
        self,
        step: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<(T, Latencies)> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let r = tokio::task::spawn_blocking(step).await?;
        let ended = Instant::now();
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        let r = r?;
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut during: Vec<f64> = samples
            .iter()
            .filter(|(t, d, _)| *t + *d >= started && *t <= ended)
            .map(|(_, d, _)| d.as_secs_f64() * 1000.0)
            .collect();
        during.sort_by(f64::total_cmp);
        let p99 = during
            .get(((during.len() as f64) * 0.99).floor() as usize)
            .copied()
            .or(during.last().copied())
            .unwrap_or(0.0);
        Ok((
            r,
            Latencies {
                queries: during.len(),
                worst_ms: during.last().copied().unwrap_or(0.0),
                p99_ms: p99,
                errors: samples.iter().filter(|s| !s.2).count(),
            },
        ))
    }
}
