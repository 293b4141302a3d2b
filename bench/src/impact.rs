//! Production impact (`--impact`): what each method costs the users of the destination server
//! while it copies. pgbench's TPC-B-like workload runs on the destination server (a database
//! of its own, scale 10) at a fixed rate, first alone (the baseline), then beside each method.
//! For every method: its time alone, the WAL it made the destination write (alone), and
//! pgbench's throughput and latency (p50/p99, from each transaction's scheduled start, so a
//! transaction that had to wait counts its wait) while the method runs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use pgzm_tests::PgCluster;

use crate::datasets::Dataset;
use crate::methods::{self, run_measured};
use crate::Binaries;

/// pgbench's clients.
const CLIENTS: usize = 4;
/// pgbench's database scale (1 M accounts).
const SCALE: usize = 10;
/// Seconds of the baseline.
const BASELINE_SECONDS: u64 = 15;

/// One method's cost.
#[derive(Debug, Clone)]
pub struct ImpactResult {
    /// Method label ("pgbench alone" for the baseline).
    pub method: String,
    /// The method's wall time alone.
    pub seconds: f64,
    /// Its wall time beside pgbench.
    pub loaded_seconds: f64,
    /// WAL the destination wrote for the method (alone).
    pub wal_bytes: u64,
    /// pgbench's transactions per second meanwhile.
    pub tps: f64,
    /// pgbench's median latency, ms.
    pub p50_ms: f64,
    /// pgbench's 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// The whole measurement: the target rate and every method's cost (the baseline first).
pub struct Impact {
    /// pgbench's target rate (transactions per second).
    pub rate: u32,
    /// The data set copied.
    pub dataset: Dataset,
    /// Results, baseline first.
    pub results: Vec<ImpactResult>,
}

/// A method under test: its label and how to run it once into a fresh `bench_dst`.
#[derive(Debug, Clone, Copy)]
enum Method {
    DumpRestore,
    Pgcopydb,
    Pgzm,
    PgzmLimited(u64),
}

async fn run_method(
    method: Method,
    src: &str,
    ds: &Dataset,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
) -> anyhow::Result<Option<(String, f64)>> {
    let postgis = ds.postgis && matches!(method, Method::Pgzm | Method::PgzmLimited(_));
    let dst = methods::fresh_db(dest, "bench_dst", postgis).await?;
    let j = jobs.to_string();
    let dir = std::env::temp_dir().join(format!("pgzm-bench-impact-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = match method {
        Method::DumpRestore => {
            let dump = run_measured(&mut methods::dump_command(bins, jobs, &dir, src))?;
            let restore = run_measured(&mut methods::restore_command(bins, jobs, &dir, &dst))?;
            Some((
                format!("pg_dump -Fd -j{j} + pg_restore -j{j}"),
                (dump.elapsed + restore.elapsed).as_secs_f64(),
            ))
        }
        Method::Pgcopydb => match &bins.pgcopydb {
            None => None,
            Some(pgcopydb) => {
                let m = run_measured(&mut methods::pgcopydb_command(
                    bins, pgcopydb, jobs, &dir, src, &dst,
                ))?;
                Some((
                    format!("pgcopydb clone (table/index jobs {j})"),
                    m.elapsed.as_secs_f64(),
                ))
            }
        },
        Method::Pgzm | Method::PgzmLimited(_) => {
            let mut cmd = Command::new(&bins.pgzm);
            cmd.arg("-q").args(methods::start_args(src, &dst, jobs));
            let mut label = "pgzm (embedded agent)".to_string();
            if let Method::PgzmLimited(mb) = method {
                cmd.args(["--max-rate", &format!("{mb}MB/s")]);
                label = format!("pgzm --max-rate {mb}MB/s");
            }
            let m = run_measured(&mut cmd)?;
            Some((label, m.elapsed.as_secs_f64()))
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// A pgbench run in the background for `seconds`, logging every transaction.
struct Pgbench {
    child: Option<Child>,
    dir: std::path::PathBuf,
    seconds: u64,
}

impl Pgbench {
    fn start(bins: &Binaries, dest: &PgCluster, rate: u32, seconds: u64) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("pgzm-bench-pgbench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let child = Command::new(bins.pg.join("pgbench"))
            .args([
                "-n",
                "-c",
                &CLIENTS.to_string(),
                "-j",
                "2",
                "-M",
                "prepared",
            ])
            .args(["-R", &rate.to_string(), "-T", &seconds.to_string(), "-l"])
            .arg(format!("--log-prefix={}", dir.join("tx").display()))
            .arg(dest.url("oltp"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start pgbench")?;
        Ok(Pgbench {
            child: Some(child),
            dir,
            seconds,
        })
    }

    /// Waits for pgbench to end; (tps, p50 ms, p99 ms) from its transaction logs.
    fn finish(mut self) -> anyhow::Result<(f64, f64, f64)> {
        let out = self
            .child
            .take()
            .context("pgbench already waited for")?
            .wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let latencies = read_latencies(&self.dir)?;
        let _ = std::fs::remove_dir_all(&self.dir);
        anyhow::ensure!(!latencies.is_empty(), "pgbench logged no transaction");
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
        Ok((
            latencies.len() as f64 / self.seconds as f64,
            pct(0.5),
            pct(0.99),
        ))
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every logged transaction's latency from its scheduled start (`time` + `schedule_lag`), ms,
/// sorted. Log lines: `client_id transaction_no time script_no time_epoch time_us
/// schedule_lag` (µs).
fn read_latencies(dir: &Path) -> anyhow::Result<Vec<f64>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(time), lag) = (f.get(2), f.get(6)) else {
                continue;
            };
            // A transaction skipped for lateness logs "skipped" instead of a time.
            let Ok(us) = time.parse::<f64>() else {
                continue;
            };
            let lag = lag.and_then(|l| l.parse::<f64>().ok()).unwrap_or(0.0);
            all.push((us + lag) / 1000.0);
        }
    }
    all.sort_by(f64::total_cmp);
    Ok(all)
}

/// Measures the baseline and every method on `ds`.
pub async fn measure(
    ds: &Dataset,
    source: &PgCluster,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
    rate: u32,
    limit_mb: u64,
) -> anyhow::Result<Impact> {
    let src = methods::load_source(ds, source).await?;
    methods::fresh_db(dest, "oltp", false).await?;
    run_measured(
        Command::new(bins.pg.join("pgbench"))
            .args(["-i", "-q", "-s", &SCALE.to_string()])
            .arg(dest.url("oltp")),
    )
    .context("pgbench -i")?;
    methods::connect(dest, "oltp")
        .await?
        .batch_execute("VACUUM ANALYZE")
        .await?;
    let mut results = Vec::new();
    let (tps, p50, p99) = Pgbench::start(bins, dest, rate, BASELINE_SECONDS)?.finish()?;
    eprintln!("   pgbench alone: {tps:.0} tps, p50 {p50:.1} ms, p99 {p99:.1} ms");
    results.push(ImpactResult {
        method: "pgbench alone (baseline)".into(),
        seconds: 0.0,
        loaded_seconds: 0.0,
        wal_bytes: 0,
        tps,
        p50_ms: p50,
        p99_ms: p99,
    });
    for method in [
        Method::DumpRestore,
        Method::Pgcopydb,
        Method::Pgzm,
        Method::PgzmLimited(limit_mb),
    ] {
        let lsn = methods::wal_lsn(dest).await?;
        let Some((label, seconds)) = run_method(method, &src, ds, dest, bins, jobs).await? else {
            continue;
        };
        let wal_bytes = methods::wal_since(dest, &lsn).await?;
        // pgbench covers the method's time alone; the method usually takes a little longer
        // beside it, so pgbench's window is inside the method's.
        let window = seconds.ceil().max(2.0) as u64;
        let bench = Pgbench::start(bins, dest, rate, window)?;
        let loaded = run_method(method, &src, ds, dest, bins, jobs).await?;
        let (tps, p50, p99) = bench.finish()?;
        let loaded_seconds = loaded.map(|l| l.1).unwrap_or_default();
        eprintln!(
            "   {label}: {seconds:.2} s alone, {loaded_seconds:.2} s beside pgbench, {:.0} MB WAL; pgbench {tps:.0} tps, p50 {p50:.1} ms, p99 {p99:.1} ms",
            wal_bytes as f64 / 1e6
        );
        results.push(ImpactResult {
            method: label,
            seconds,
            loaded_seconds,
            wal_bytes,
            tps,
            p50_ms: p50,
            p99_ms: p99,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Impact {
        rate,
        dataset: ds.clone(),
        results,
    })
}
