//! The methods compared, each on a fresh destination database, timed and measured (peak RSS
//! of the client-side processes: pgzm and its agents, pg_dump/pg_restore, pgcopydb, psql).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgzm_tests::PgCluster;

use crate::datasets::Dataset;
use crate::Binaries;

/// One measured run.
#[derive(Debug, Clone)]
pub struct MethodResult {
    /// Method label.
    pub method: String,
    /// Wall time of the whole method.
    pub seconds: f64,
    /// Wall time of the data copy alone, when the method reports it.
    pub copy_seconds: Option<f64>,
    /// Bytes of table data moved, when known.
    pub bytes: Option<u64>,
    /// Peak RSS of the largest client-side process, MiB.
    pub peak_rss_mib: f64,
    /// Swap lock-held time (pgzm), ms.
    pub lock_held_ms: Option<f64>,
    /// Wall time of pgzm's copy phase (data and index builds), s.
    pub copy_phase_seconds: Option<f64>,
    /// ETA error of pgzm's progress once 10 % of the data had landed: (worst, median), as a
    /// fraction of the actual data time.
    pub eta_error: Option<(f64, f64)>,
}

/// Output and resource use of a child process.
pub struct Measured {
    /// Wall time.
    pub elapsed: Duration,
    /// Peak RSS in KiB.
    pub max_rss_kib: u64,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The first argument that makes `pgzm-bench` a launcher ([`launch_and_report_peak`]).
pub const PEAK_RSS_LAUNCHER: &str = "__peak-rss";

/// Runs `pgzm-bench __peak-rss <file> <program> <args…>`: starts the program (stdio inherited),
/// waits for it, writes its peak RSS in KiB (wait4's rusage) to `<file>` and exits with its
/// exit code.
///
/// Why a launcher: the bench itself grows to 100–200 MB over a run, and a child the bench starts
/// directly reports the bench's peak when that is larger than its own. Rust starts children with
/// `posix_spawn`, whose child shares the parent's memory until it execs, and at the exec the
/// kernel records that memory's high-water mark as the child's (`ru_maxrss`): a pgzm `cleanup`
/// of 30 MB was reported as 148 MB. This launcher is a fresh, small process, so what its child
/// inherits is a few MB.
pub fn launch_and_report_peak(args: &[String]) -> anyhow::Result<i32> {
    let [file, program, rest @ ..] = args else {
        bail!("usage: pgzm-bench {PEAK_RSS_LAUNCHER} <file> <program> [args…]");
    };
    let child = Command::new(program)
        .args(rest)
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let (status, usage) = wait_with_usage(child.id() as libc::pid_t)?;
    std::fs::write(file, usage.ru_maxrss.to_string()).with_context(|| format!("write {file}"))?;
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    })
}

/// Waits for our child `pid`: its wait status and resource use.
fn wait_with_usage(pid: libc::pid_t) -> anyhow::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain data, filled in by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; the pointers are valid for the call.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r < 0 {
        bail!("wait4 failed for pid {pid}");
    }
    Ok((status, usage))
}

/// Runs a command to completion, measuring wall time and peak RSS: through this binary as a
/// launcher ([`launch_and_report_peak`]), which reports the command's own peak.
pub fn run_measured(cmd: &mut Command) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let peak_file = tempfile_path("peak-rss");
    let mut launcher = Command::new(std::env::current_exe().context("the bench's own path")?);
    launcher
        .arg(PEAK_RSS_LAUNCHER)
        .arg(&peak_file)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => launcher.env(key, v),
            None => launcher.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        launcher.current_dir(dir);
    }
    let cmd = &mut launcher;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let pid = child.id() as libc::pid_t;
    let waited = wait_with_usage(pid);
    let elapsed = started.elapsed();
    let stdout = reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let (status, _) = waited?;
    let max_rss_kib = std::fs::read_to_string(&peak_file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let _ = std::fs::remove_file(&peak_file);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !ok {
        bail!(
            "{cmd:?} failed:\n{}",
            stderr
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(Measured {
        elapsed,
        max_rss_kib: max_rss_kib.context("the launcher did not report the peak RSS")?,
        stdout,
        stderr,
    })
}

/// A fresh path in the temporary directory (unique per process and call).
fn tempfile_path(what: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "pgzm-bench-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A session on `cluster`'s database `db` through its unix socket (which reaches servers in
/// other network namespaces too).
pub async fn connect(cluster: &PgCluster, db: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, conn) =
        tokio_postgres::connect(&cluster.socket_conninfo(db), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Creates (or recreates) an empty database, with PostGIS when asked; returns its TCP URL.
pub async fn fresh_db(cluster: &PgCluster, name: &str, postgis: bool) -> anyhow::Result<String> {
    let c = connect(cluster, "postgres").await?;
    // One statement each: neither may run inside the implicit transaction of a batch.
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    c.batch_execute(&format!("CREATE DATABASE {name}")).await?;
    if postgis {
        let d = connect(cluster, name).await?;
        d.batch_execute("CREATE EXTENSION postgis").await?;
    }
    Ok(cluster.url(name))
}

/// Loads a data set into a fresh source database; returns its URL.
pub async fn load_source(ds: &Dataset, source: &PgCluster) -> anyhow::Result<String> {
    let url = fresh_db(source, "bench_src", false).await?;
    let c = connect(source, "bench_src").await?;
    c.batch_execute(&ds.sql)
        .await
        .with_context(|| format!("generate {}", ds.name))?;
    // Every method then reads settled pages: no first reader pays for setting hint bits.
    c.batch_execute("VACUUM (ANALYZE)").await?;
    c.batch_execute("CHECKPOINT").await?;
    Ok(url)
}

pub fn json_report(stdout: &str) -> anyhow::Result<serde_json::Value> {
    serde_json::from_str(stdout).context("parse the pgzm --json report")
}

fn from_report(method: &str, m: &Measured, extra_rss_kib: u64) -> anyhow::Result<MethodResult> {
    let r = json_report(&m.stdout)?;
    let phases = r["phases"].as_array().cloned().unwrap_or_default();
    // The data movement alone: from the copy phase's start to the last copy task's landing
    // (the phase then waits for the last table's index builds).
    let copy_ms: f64 = r["throughput"]["data_ms"].as_f64().unwrap_or_else(|| {
        phases
            .iter()
            .filter(|p| p["phase"] == "copy")
            .filter_map(|p| p["duration_ms"].as_f64())
            .sum()
    });
    let phase_ms: Option<f64> = phases
        .iter()
        .find(|p| p["phase"] == "copy")
        .and_then(|p| p["duration_ms"].as_f64());
    Ok(MethodResult {
        method: method.into(),
        seconds: m.elapsed.as_secs_f64(),
        copy_seconds: Some(copy_ms / 1000.0),
        bytes: r["bytes"].as_u64(),
        peak_rss_mib: mib(m.max_rss_kib.max(extra_rss_kib)),
        lock_held_ms: r["swap"]["lock_held_us"].as_f64().map(|us| us / 1000.0),
        copy_phase_seconds: phase_ms.map(|ms| ms / 1000.0),
        eta_error: eta_error(&m.stderr, copy_ms),
    })
}

/// How far pgzm's progress ETA was from the truth: for every progress log line (JSON) logged
/// once at least 10 % of the data had landed and before all of it had, the predicted end
/// (elapsed + ETA) against the actual end of the data movement (`data_ms`). Returns the worst
/// and the median error as fractions of `data_ms`.
fn eta_error(stderr: &str, data_ms: f64) -> Option<(f64, f64)> {
    let mut errors: Vec<f64> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("copy progress"))
        })
        .filter_map(|v| {
            // pgzm's JSON lines carry the event's fields at the top level.
            let f = &v;
            let pct = f["percent"].as_f64()?;
            let elapsed = f["elapsed_ms"].as_f64()?;
            let eta = f["eta_ms"].as_f64()?;
            (10.0..100.0)
                .contains(&pct)
                .then(|| ((elapsed + eta) - data_ms).abs() / data_ms.max(1.0))
        })
        .collect();
    if errors.is_empty() {
        return None;
    }
    errors.sort_by(f64::total_cmp);
    Some((errors[errors.len() - 1], errors[errors.len() / 2]))
}

/// pgzm with the in-process agent.
pub async fn pgzm_embedded(
    ds: &Dataset,
    source: &PgCluster,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
) -> anyhow::Result<MethodResult> {
    let src = load_source(ds, source).await?;
    run_pgzm_embedded(&src, ds, dest, bins, jobs, true).await
}

/// `pgzm start` from `src` to `dst` with `jobs`, its report as JSON, no log file.
pub fn start_args(src: &str, dst: &str, jobs: usize) -> Vec<String> {
    run_args("start", src, dst, jobs)
}

/// `pgzm <command>` (`start` or `prepare`) from `src` to `dst` with `jobs`, its report as
/// JSON, no log file.
pub fn run_args(command: &str, src: &str, dst: &str, jobs: usize) -> Vec<String> {
    [
        command,
        "--json",
        "--no-log-file",
        "--source",
        src,
        "--dest",
        dst,
        "--jobs",
        &jobs.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// pgzm embedded; `verify: false` adds `--no-verify` (to measure what verification costs).
/// Progress is logged as JSON every 50 ms, for the ETA's accuracy.
async fn run_pgzm_embedded(
    src: &str,
    ds: &Dataset,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
    verify: bool,
) -> anyhow::Result<MethodResult> {
    let dst = fresh_db(dest, "bench_dst", ds.postgis).await?;
    let mut cmd = Command::new(&bins.pgzm);
    cmd.args(["--log-format", "json"])
        .args(start_args(src, &dst, jobs))
        .args(["--progress-every", "0.05"]);
    if !verify {
        cmd.arg("--no-verify");
    }
    let m = run_measured(&mut cmd)?;
    from_report(
        if verify {
            "pgzm (embedded agent)"
        } else {
            "pgzm (embedded agent, --no-verify)"
        },
        &m,
        0,
    )
}

/// A `pgzm-agent` process on a free loopback port.
pub struct AgentProcess {
    child: std::process::Child,
    /// `http://ADDR` it listens on.
    pub url: String,
}

impl AgentProcess {
    fn start(bin: &Path, tasks: usize) -> anyhow::Result<AgentProcess> {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--max-tasks", &tasks.to_string()]);
        AgentProcess::spawn(cmd)
    }

    /// Starts `cmd` (a `pgzm-agent` command line) and waits for the address it reports.
    pub fn spawn(mut cmd: Command) -> anyhow::Result<AgentProcess> {
        let mut child = cmd
            .env("PGZM_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut out = child.stdout.take().context("agent stdout")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte)? == 1 && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        let line = String::from_utf8_lossy(&line).to_string();
        let addr = line
            .strip_prefix("listening on ")
            .context("agent did not report its address")?
            .trim()
            .to_string();
        Ok(AgentProcess {
            child,
            url: format!("http://{addr}"),
        })
    }

    /// Peak RSS so far (VmHWM), KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run_pgzm_agents(
    src: &str,
    ds: &Dataset,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
) -> anyhow::Result<MethodResult> {
    let dst = fresh_db(dest, "bench_dst", ds.postgis).await?;
    let per = jobs.div_ceil(2).max(1);
    let a = AgentProcess::start(&bins.agent, per)?;
    let b = AgentProcess::start(&bins.agent, per)?;
    let m = run_measured(
        Command::new(&bins.pgzm)
            .arg("-q")
            .args(start_args(src, &dst, jobs))
            .args(["--agent", &a.url, "--agent", &b.url]),
    )?;
    let agents_rss = a.peak_rss_kib().max(b.peak_rss_kib());
    from_report("pgzm (2 agent processes)", &m, agents_rss)
}

fn pg(bins: &Binaries, tool: &str) -> std::path::PathBuf {
    bins.pg.join(tool)
}

/// `pg_dump -Fd -j jobs -f dir src`.
pub fn dump_command(bins: &Binaries, jobs: usize, dir: &Path, src: &str) -> Command {
    let mut cmd = Command::new(pg(bins, "pg_dump"));
    cmd.args(["-Fd", "-j", &jobs.to_string(), "-f"])
        .arg(dir)
        .arg(src);
    cmd
}

/// `pg_restore -j jobs -d dst dir`.
pub fn restore_command(bins: &Binaries, jobs: usize, dir: &Path, dst: &str) -> Command {
    let mut cmd = Command::new(pg(bins, "pg_restore"));
    cmd.args(["-j", &jobs.to_string(), "-d", dst]).arg(dir);
    cmd
}

/// `pgcopydb clone` from `src` to `dst` with `jobs` table and index jobs, its work files in
/// `dir`, PostgreSQL's tools of `bins` first on its PATH (it runs pg_dump and pg_restore).
pub fn pgcopydb_command(
    bins: &Binaries,
    pgcopydb: &Path,
    jobs: usize,
    dir: &Path,
    src: &str,
    dst: &str,
) -> Command {
    let mut cmd = Command::new(pgcopydb);
    cmd.args([
        "clone",
        "--source",
        src,
        "--target",
        dst,
        "--table-jobs",
        &jobs.to_string(),
        "--index-jobs",
        &jobs.to_string(),
    ])
    .arg("--dir")
    .arg(dir)
    .env("PATH", pg_first_path(bins));
    cmd
}

/// `$PATH` with PostgreSQL's tools of `bins` first (pgcopydb runs pg_dump and pg_restore).
pub fn pg_first_path(bins: &Binaries) -> String {
    format!(
        "{}:{}",
        bins.pg.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// After a checkpoint (so that no method pays for another's dirty buffers), `cluster`'s WAL
/// position, for [`wal_since`].
pub async fn wal_lsn(cluster: &PgCluster) -> anyhow::Result<String> {
    let c = connect(cluster, "postgres").await?;
    c.batch_execute("CHECKPOINT").await?;
    Ok(c.query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// WAL bytes `cluster` wrote since `lsn`.
pub async fn wal_since(cluster: &PgCluster, lsn: &str) -> anyhow::Result<u64> {
    let c = connect(cluster, "postgres").await?;
    let n: f64 = c
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::float8",
            &[&lsn],
        )
        .await?
        .get(0);
    Ok(n.max(0.0) as u64)
}

async fn run_dump_restore(
    src: &str,
    ds: &Dataset,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
) -> anyhow::Result<MethodResult> {
    let dst = fresh_db(dest, "bench_dst", false).await?;
    let dir = std::env::temp_dir().join(format!("pgzm-bench-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dump = run_measured(&mut dump_command(bins, jobs, &dir, src))?;
    let restore = run_measured(&mut restore_command(bins, jobs, &dir, &dst))?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = ds;
    Ok(MethodResult {
        method: format!("pg_dump -Fd -j{jobs} + pg_restore -j{jobs}"),
        seconds: (dump.elapsed + restore.elapsed).as_secs_f64(),
        copy_seconds: None,
        bytes: None,
        peak_rss_mib: mib(dump.max_rss_kib.max(restore.max_rss_kib)),
        lock_held_ms: None,
        copy_phase_seconds: None,
        eta_error: None,
    })
}

async fn run_pgcopydb(
    src: &str,
    ds: &Dataset,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
) -> anyhow::Result<Option<MethodResult>> {
    let Some(pgcopydb) = &bins.pgcopydb else {
        return Ok(None);
    };
    let dst = fresh_db(dest, "bench_dst", false).await?;
    let _ = ds;
    let dir = std::env::temp_dir().join(format!("pgzm-bench-pgcopydb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = run_measured(&mut pgcopydb_command(bins, pgcopydb, jobs, &dir, src, &dst))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Some(MethodResult {
        method: format!("pgcopydb clone (table/index jobs {jobs})"),
        seconds: m.elapsed.as_secs_f64(),
        copy_seconds: None,
        bytes: None,
        peak_rss_mib: mib(m.max_rss_kib),
        lock_held_ms: None,
        copy_phase_seconds: None,
        eta_error: None,
    }))
}

/// The ceiling: one binary COPY pipe between the servers, into a table without indexes.
async fn run_copy_pipe(
    src: &str,
    dest: &PgCluster,
    bins: &Binaries,
) -> anyhow::Result<MethodResult> {
    let dst = fresh_db(dest, "bench_dst", false).await?;
    let (c, conn) = tokio_postgres::connect(&dst, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    c.batch_execute(
        "CREATE TABLE measurements (id bigint, ts timestamptz NOT NULL, device int NOT NULL, value double precision, note text)",
    )
    .await?;
    let psql = pg(bins, "psql");
    let script = format!(
        "{p} -X -q -d '{src}' -c 'COPY measurements TO STDOUT (FORMAT binary)' | {p} -X -q -d '{dst}' -c 'COPY measurements FROM STDIN (FORMAT binary)'",
        p = psql.display()
    );
    let m = run_measured(Command::new("sh").args(["-c", &script]))?;
    Ok(MethodResult {
        method: "psql binary COPY pipe (no indexes)".into(),
        seconds: m.elapsed.as_secs_f64(),
        copy_seconds: Some(m.elapsed.as_secs_f64()),
        bytes: None,
        peak_rss_mib: mib(m.max_rss_kib),
        lock_held_ms: None,
        copy_phase_seconds: None,
        eta_error: None,
    })
}

/// Every method on one data set, `rounds` times (the order reversed every other round), each
/// method's result the median of its rounds.
pub async fn compare(
    ds: &Dataset,
    source: &PgCluster,
    dest: &PgCluster,
    bins: &Binaries,
    jobs: usize,
    rounds: usize,
) -> anyhow::Result<Vec<MethodResult>> {
    let src = load_source(ds, source).await?;
    let mut all: Vec<Vec<MethodResult>> = Vec::new();
    for round in 0..rounds.max(1) {
        let mut methods: Vec<&str> =
            vec!["dump", "embedded", "pgcopydb", "agents", "pipe", "noverify"];
        if round % 2 == 1 {
            methods.reverse();
        }
        let mut results = Vec::new();
        for m in methods {
            let r = match m {
                "dump" => Some(run_dump_restore(&src, ds, dest, bins, jobs).await?),
                "embedded" => Some(run_pgzm_embedded(&src, ds, dest, bins, jobs, true).await?),
                "pgcopydb" => run_pgcopydb(&src, ds, dest, bins, jobs).await?,
                "agents" => Some(run_pgzm_agents(&src, ds, dest, bins, jobs).await?),
                "pipe" if ds.name.starts_with("large") => {
                    Some(run_copy_pipe(&src, dest, bins).await?)
                }
                "noverify" if !ds.name.starts_with("many") => {
                    Some(run_pgzm_embedded(&src, ds, dest, bins, jobs, false).await?)
                }
                _ => None,
            };
            if let Some(r) = r {
                eprintln!("   round {}: {} {:.2} s", round + 1, r.method, r.seconds);
                results.push(r);
            }
        }
        all.push(results);
    }
    // In the first round's order.
    let order: Vec<String> = all[0].iter().map(|r| r.method.clone()).collect();
    Ok(order
        .iter()
        .map(|method| {
            median(
                all.iter()
                    .flatten()
                    .filter(|r| &r.method == method)
                    .cloned()
                    .collect(),
            )
        })
        .collect())
}

/// The field-by-field median of one method's rounds.
pub fn median(runs: Vec<MethodResult>) -> MethodResult {
    fn mid(mut v: Vec<f64>) -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
    let pick = |f: &dyn Fn(&MethodResult) -> Option<f64>| mid(runs.iter().filter_map(f).collect());
    let first = runs[0].clone();
    MethodResult {
        method: first.method.clone(),
        seconds: pick(&|r| Some(r.seconds)).unwrap_or(first.seconds),
        copy_seconds: pick(&|r| r.copy_seconds),
        bytes: first.bytes,
        peak_rss_mib: runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
        lock_held_ms: pick(&|r| r.lock_held_ms),
        copy_phase_seconds: pick(&|r| r.copy_phase_seconds),
        eta_error: match (
            mid(runs
                .iter()
                .filter_map(|r| r.eta_error.map(|e| e.0))
                .collect()),
            mid(runs
                .iter()
                .filter_map(|r| r.eta_error.map(|e| e.1))
                .collect()),
        ) {
            (Some(w), Some(m)) => Some((w, m)),
            _ => None,
        },
    }
}
