//! `--scale schema` (issue 19): large schemas, phase by phase. A schema of thousands of tables
//! (most tiny, some of 10k–100k rows; foreign keys between them, views, row-typed functions,
//! sequences, enums, a preserved table) is migrated by pgzm in steps — `prepare`, `swap`,
//! `rollback`, `prepare` + `swap` again, `cleanup` — and copied by `pg_dump | pg_restore` and
//! `pgcopydb clone` in the same run. Per step: pgzm's phase timings (its `--json` report), the
//! swap's lock-held time, the worst latency of a client querying the destination meanwhile
//! ([`Probe`]), peak RSS of pgzm and of the server backends serving it, and the catalog's dead
//! tuples it leaves behind.
//!
//! Both servers are started for this section alone, with `max_locks_per_transaction` raised
//! (`--max-locks-per-transaction`): pgzm's shadow set and its swap are each one transaction
//! over every table, which takes several locks per table (with the default of 64 the lock table
//! holds about 14 000 locks on these servers), and with autovacuum off on the destination, so
//! the dead catalog tuples counted are the ones the run left.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgzm_tests::PgCluster;

use crate::cutover::{Latencies, Probe, PROBE_APPLICATION};
use crate::methods::{self, fresh_db, mib, run_measured, Measured};
use crate::{Args, Binaries};

/// The preserved table (its destination rows survive the migration).
const PRESERVED: &str = "users";
/// Tables created per transaction while generating: few enough locks for any server.
const GENERATE_CHUNK: usize = 250;
/// How often the backends' memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// System catalogs whose dead tuples and size are reported.
const CATALOGS: [&str; 6] = [
    "pg_class",
    "pg_attribute",
    "pg_type",
    "pg_depend",
    "pg_constraint",
    "pg_index",
];

/// What the data set holds, counted in the source after generating it.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Tables (the preserved one included).
    pub tables: i64,
    /// Rows over all tables.
    pub rows: i64,
    /// Size of the source database, bytes.
    pub bytes: i64,
    /// Foreign keys.
    pub foreign_keys: i64,
    /// Views.
    pub views: i64,
    /// Functions typed on a table's row type.
    pub functions: i64,
    /// Sequences (serial ones included).
    pub sequences: i64,
    /// Enum types.
    pub enums: i64,
    /// Indexes (primary keys included).
    pub indexes: i64,
    /// Tables of 10 000 rows or more.
    pub large_tables: i64,
}

/// Peak memory of a group of server backends (one `application_name`, on one server).
#[derive(Debug, Clone, Copy, Default)]
pub struct BackendPeak {
    /// Distinct backends seen.
    pub sessions: usize,
    /// The highest VmHWM seen, KiB: the backend's peak RSS, shared memory it touched included
    /// (shared buffers, the lock table).
    pub hwm_kib: u64,
    /// The highest RssAnon seen, KiB: its private memory (caches, plans, sorts).
    pub anon_kib: u64,
}

/// Peak memory per group of backends, e.g. `destination pgzm-build`.
pub type Backends = BTreeMap<String, BackendPeak>;

/// One command run: wall time, the client's peak RSS, its backends' peaks.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// Wall time, s.
    pub seconds: f64,
    /// Peak RSS of the client process, MiB.
    pub rss_mib: f64,
    /// The server backends that served it.
    pub backends: Backends,
}

impl Step {
    /// The largest private memory of any of its backends, MiB.
    fn backend_anon_mib(&self) -> f64 {
        mib(self
            .backends
            .values()
            .map(|b| b.anon_kib)
            .max()
            .unwrap_or(0))
    }

    /// The largest VmHWM of any of its backends, MiB.
    fn backend_hwm_mib(&self) -> f64 {
        mib(self.backends.values().map(|b| b.hwm_kib).max().unwrap_or(0))
    }
}

/// The dead tuples and sizes of [`CATALOGS`] in the destination database at one point.
pub type CatalogState = BTreeMap<String, (i64, i64)>;

/// pgzm's run on one schema.
#[derive(Debug, Clone, Default)]
pub struct PgzmRun {
    /// `pgzm prepare`.
    pub prepare: Step,
    /// Its phases, in order: (name, ms).
    pub phases: Vec<(String, f64)>,
    /// The copy's data movement (until the last task landed), ms.
    pub data_ms: Option<f64>,
    /// `pgzm swap`.
    pub swap: Step,
    /// The swap's lock-held time (server clock), ms.
    pub lock_held_ms: f64,
    /// Swap attempts.
    pub swap_attempts: u64,
    /// The client during the swap.
    pub swap_client: Latencies,
    /// `pgzm rollback --latest`.
    pub rollback: Step,
    /// Its attempts.
    pub rollback_attempts: u64,
    /// The client during the rollback.
    pub rollback_client: Latencies,
    /// The second `pgzm prepare` (after the rollback), wall time.
    pub prepare_again: Step,
    /// Its phases.
    pub phases_again: Vec<(String, f64)>,
    /// The second swap.
    pub swap_again: Step,
    /// Its lock-held time, ms.
    pub lock_held_again_ms: f64,
    /// `pgzm cleanup` of the second swap's backup set.
    pub cleanup: Step,
    /// Objects it dropped.
    pub cleanup_objects: usize,
    /// The client during the cleanup.
    pub cleanup_client: Latencies,
    /// The catalog after generating the destination, then after each step.
    pub catalog: Vec<(&'static str, CatalogState)>,
}

/// Everything measured at one table count.
#[derive(Debug, Clone)]
pub struct SchemaRun {
    /// Generated tables (`t_NNNNN`, the preserved table not counted).
    pub tables: usize,
    /// What the data set holds.
    pub shape: Shape,
    /// Generating both databases, s.
    pub generate_seconds: f64,
    /// `pg_dump -Fd` and `pg_restore` into an empty database.
    pub dump: Step,
    /// The restore.
    pub restore: Step,
    /// `pgcopydb clone`, or why it did not run.
    pub pgcopydb: Result<Step, String>,
    /// pgzm.
    pub pgzm: PgzmRun,
    /// Other CPU users seen at the start or the end (builds, test runs): the timings may be
    /// noisy then.
    pub busy: Vec<String>,
    /// The whole-run comparison's rounds, the first being the measurements above: seconds of
    /// pg_dump + pg_restore, and of pgzm prepare + swap.
    pub rounds: Vec<(f64, f64)>,
}

impl SchemaRun {
    /// The median over the rounds of pgzm's whole run against pg_dump + pg_restore.
    pub fn median_ratio(&self) -> Option<f64> {
        let mut ratios: Vec<f64> = self
            .rounds
            .iter()
            .filter(|(dump, _)| *dump > 0.0)
            .map(|(dump, pgzm)| pgzm / dump)
            .collect();
        ratios.sort_by(f64::total_cmp);
        (!ratios.is_empty()).then(|| {
            let mid = ratios.len() / 2;
            if ratios.len() % 2 == 1 {
                ratios[mid]
            } else {
                (ratios[mid - 1] + ratios[mid]) / 2.0
            }
        })
    }
}

/// Tables up to which the whole-run comparison has several rounds.
const ROUNDS_MAX_TABLES: usize = 3000;

/// The whole section.
#[derive(Debug, Clone)]
pub struct SchemaScale {
    /// `--jobs`.
    pub jobs: usize,
    /// The servers' `max_locks_per_transaction`.
    pub max_locks: u32,
    /// One run per table count.
    pub runs: Vec<SchemaRun>,
    /// Whether other processes used the CPU during the runs (load average before starting).
    pub load_before: f64,
}

fn table(i: usize) -> String {
    format!("t_{i:05}")
}

/// Types, sequences and the preserved table; `variant` varies the data between the servers.
fn base_sql(variant: usize) -> String {
    format!(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TYPE tier AS ENUM ('free', 'pro', 'enterprise');
         CREATE TYPE region AS ENUM ('eu', 'us', 'ap');
         CREATE SEQUENCE seq_0; CREATE SEQUENCE seq_1; CREATE SEQUENCE seq_2;
         CREATE SEQUENCE seq_3; CREATE SEQUENCE seq_4;
         CREATE TABLE {PRESERVED} (id int PRIMARY KEY, email text NOT NULL UNIQUE, tier tier NOT NULL DEFAULT 'free',
             created timestamptz NOT NULL DEFAULT now());
         INSERT INTO {PRESERVED} (id, email, tier)
           SELECT g, 'user' || g || '@v{variant}.example', (enum_range(NULL::tier))[1 + g % 3]
           FROM generate_series(1, 1000) g;"
    )
}

/// One transaction creating and filling tables `from..to` (set-based: one DO block whose
/// statements are built with format(), so the round trips do not grow with the tables).
/// Rows: most tables hold 0–49, one in 20 holds 1000, one in 200 10 000–100 000. A table whose number is a multiple of 4 heads a group whose
/// other tables reference it; one in 7 has an enum column; one in 50 references the preserved
/// table; one in 100 takes a default from a shared sequence; one in 10 has a second index.
fn tables_sql(from: usize, to: usize, variant: usize) -> String {
    format!(
        "DO $gen$
DECLARE
  t text; head text; cols text; ins text; sel text; n int; e text;
BEGIN
  FOR i IN {from}..{last} LOOP
    t := format('t_%s', lpad(i::text, 5, '0'));
    head := format('t_%s', lpad((i - i % 4)::text, 5, '0'));
    n := CASE WHEN i % 200 = 7 THEN 10000 + (i * 7919) % 90001
              WHEN i % 20 = 3 THEN 1000
              WHEN i % 4 = 0 THEN 20 + i % 30
              ELSE i % 20 END;
    cols := 'id serial PRIMARY KEY, name text NOT NULL, v int NOT NULL, created timestamptz NOT NULL DEFAULT now()';
    ins := 'name, v';
    sel := format('''row '' || g, g * {variant} + %s', i);
    IF i % 4 <> 0 THEN
      cols := cols || format(', parent_id int REFERENCES %I (id)', head);
      ins := ins || ', parent_id';
      sel := sel || ', 1 + g % 20';
    END IF;
    IF i % 7 = 0 THEN
      e := (ARRAY['mood', 'tier', 'region'])[1 + i % 3];
      cols := cols || format(', state %I', e);
      ins := ins || ', state';
      sel := sel || format(', (enum_range(NULL::%I))[1 + g %% 3]', e);
    END IF;
    IF i % 50 = 1 THEN
      cols := cols || ', user_id int REFERENCES {PRESERVED} (id)';
      ins := ins || ', user_id';
      sel := sel || ', 1 + g % 1000';
    END IF;
    IF i % 100 = 2 THEN
      cols := cols || format(', ref bigint NOT NULL DEFAULT nextval(%L)', 'seq_' || i % 5);
    END IF;
    EXECUTE format('CREATE TABLE %I (%s)', t, cols);
    IF i % 10 = 5 THEN
      EXECUTE format('CREATE INDEX ON %I (v)', t);
    END IF;
    IF n > 0 THEN
      EXECUTE format('INSERT INTO %I (%s) SELECT %s FROM generate_series(1, %s) g', t, ins, sel, n);
    END IF;
  END LOOP;
END
$gen$",
        last = to - 1
    )
}

/// Views (one in 10 tables; a join with the group's head for one in 100) and functions typed on
/// a row type (one in 25) over tables `from..to`.
fn dependents_sql(from: usize, to: usize) -> String {
    format!(
        "DO $gen$
DECLARE
  t text;
BEGIN
  FOR i IN {from}..{last} LOOP
    t := lpad(i::text, 5, '0');
    IF i % 10 = 5 THEN
      EXECUTE format('CREATE VIEW %I AS SELECT id, name, v FROM %I', 'v_' || t, 't_' || t);
    END IF;
    IF i % 100 = 1 THEN
      EXECUTE format('CREATE VIEW %I AS SELECT c.id, c.v, p.name AS parent FROM %I c JOIN %I p ON p.id = c.parent_id',
                     'vj_' || t, 't_' || t, 't_' || lpad((i - i % 4)::text, 5, '0'));
    END IF;
    IF i % 25 = 0 THEN
      EXECUTE format('CREATE FUNCTION %I(r %I) RETURNS int LANGUAGE sql IMMUTABLE AS ''SELECT r.v * 2''',
                     'f_' || t, 't_' || t);
    END IF;
  END LOOP;
END
$gen$",
        last = to - 1
    )
}

/// The probe's queries: a primary-key lookup on every table, and through every view and
/// function, in table order.
fn probe_queries(n: usize) -> Vec<String> {
    let mut q = Vec::new();
    for i in 0..n {
        let t = table(i);
        q.push(format!("SELECT v FROM {t} WHERE id = 1"));
        if i % 10 == 5 {
            q.push(format!("SELECT v FROM v_{i:05} WHERE id = 1"));
        }
        if i % 25 == 0 {
            q.push(format!("SELECT f_{i:05}(x) FROM {t} x WHERE id = 1"));
        }
    }
    q
}

/// Creates the schema with `n` tables in database `db` of `cluster`, analyzed and vacuumed.
/// The statements [`generate`] sends, as one script (`--print-schema-sql`).
pub fn generation_sql(n: usize, variant: usize) -> String {
    let mut out = format!("{};\n", base_sql(variant));
    for from in (0..n).step_by(GENERATE_CHUNK) {
        out.push_str(&format!(
            "{};\n",
            tables_sql(from, (from + GENERATE_CHUNK).min(n), variant)
        ));
    }
    for from in (0..n).step_by(GENERATE_CHUNK * 4) {
        out.push_str(&format!(
            "{};\n",
            dependents_sql(from, (from + GENERATE_CHUNK * 4).min(n))
        ));
    }
    out.push_str("VACUUM (ANALYZE);\n");
    out
}

async fn generate(cluster: &PgCluster, db: &str, n: usize, variant: usize) -> anyhow::Result<()> {
    let c = methods::connect(cluster, db).await?;
    c.batch_execute(&base_sql(variant)).await?;
    // Chunks in order: a table's group head is created before the table (chunks are a
    // multiple of 4 tables).
    let mut from = 0;
    while from < n {
        let to = (from + GENERATE_CHUNK).min(n);
        c.batch_execute(&tables_sql(from, to, variant))
            .await
            .with_context(|| format!("create tables {from}..{to} in {db}"))?;
        from = to;
    }
    let mut from = 0;
    while from < n {
        let to = (from + GENERATE_CHUNK * 4).min(n);
        c.batch_execute(&dependents_sql(from, to))
            .await
            .with_context(|| format!("create views and functions {from}..{to} in {db}"))?;
        from = to;
    }
    // Every method then reads settled pages and a catalog without dead tuples.
    c.batch_execute("VACUUM (ANALYZE)").await?;
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

async fn shape(cluster: &PgCluster, db: &str) -> anyhow::Result<Shape> {
    let c = methods::connect(cluster, db).await?;
    let r = c
        .query_one(
            "SELECT
               (SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace) AS tables,
               (SELECT coalesce(sum(n_live_tup), 0)::int8 FROM pg_stat_user_tables) AS rows,
               pg_database_size(current_database()) AS bytes,
               (SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'public'::regnamespace) AS fks,
               (SELECT count(*) FROM pg_class WHERE relkind = 'v' AND relnamespace = 'public'::regnamespace) AS views,
               (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace) AS functions,
               (SELECT count(*) FROM pg_class WHERE relkind = 'S' AND relnamespace = 'public'::regnamespace) AS sequences,
               (SELECT count(*) FROM pg_type WHERE typtype = 'e' AND typnamespace = 'public'::regnamespace) AS enums,
               (SELECT count(*) FROM pg_class WHERE relkind = 'i' AND relnamespace = 'public'::regnamespace) AS indexes,
               (SELECT count(*) FROM pg_stat_user_tables WHERE n_live_tup >= 10000) AS large",
            &[],
        )
        .await?;
    Ok(Shape {
        tables: r.get("tables"),
        rows: r.get("rows"),
        bytes: r.get("bytes"),
        foreign_keys: r.get("fks"),
        views: r.get("views"),
        functions: r.get("functions"),
        sequences: r.get("sequences"),
        enums: r.get("enums"),
        indexes: r.get("indexes"),
        large_tables: r.get("large"),
    })
}

/// Dead tuples and total size of [`CATALOGS`] in `db`. Waits a moment first: the backends of a
/// client that just exited flush their statistics as they end.
async fn catalog_state(cluster: &PgCluster, db: &str) -> anyhow::Result<CatalogState> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = methods::connect(cluster, db).await?;
    let rows = c
        .query(
            "SELECT relname::text AS name, n_dead_tup, pg_total_relation_size(relid) AS bytes
               FROM pg_stat_sys_tables WHERE schemaname = 'pg_catalog' AND relname::text = ANY($1)",
            &[&CATALOGS.to_vec()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("name"), (r.get("n_dead_tup"), r.get("bytes"))))
        .collect())
}

/// Samples, every [`SAMPLE_EVERY`], the memory of the client backends of the named databases
/// on the servers (from /proc: the servers are local), grouped by server and
/// `application_name`. A backend that lives less than a sampling interval may be missed, and one
/// that grows just before it ends is seen at its last sample.
struct BackendSampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Backends>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn proc_status_kib(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        s.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmHWM:")?, field("RssAnon:")?))
}

/// `pgzm-agent m17 a0` → `pgzm-agent`; `pgcopydb[123]`-like names to their first word.
fn group_of(application: &str) -> String {
    let name = application
        .split([' ', '['])
        .next()
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        "(no application_name)".into()
    } else {
        name
    }
}

impl BackendSampler {
    async fn start(servers: &[(&str, &PgCluster)], dbs: &[&str]) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for (side, cluster) in servers {
            clients.push((
                side.to_string(),
                methods::connect(cluster, "postgres").await?,
            ));
        }
        let dbs: Vec<String> = dbs.iter().map(|d| d.to_string()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Arc<Mutex<Backends>> = Arc::default();
        let task = {
            let (stop, peaks) = (Arc::clone(&stop), Arc::clone(&peaks));
            tokio::spawn(async move {
                let mut seen: BTreeMap<String, std::collections::BTreeSet<i32>> = BTreeMap::new();
                while !stop.load(Ordering::Relaxed) {
                    for (side, c) in &clients {
                        // A sample can fail when a step fills the server's lock table (out of
                        // shared memory): that sample is skipped, the step is what is measured.
                        let Ok(rows) = c
                            .query(
                                "SELECT pid, coalesce(application_name, '') AS app FROM pg_stat_activity
                                  WHERE datname = ANY($1) AND backend_type = 'client backend'
                                    AND pid <> pg_backend_pid() AND application_name <> $2",
                                &[&dbs, &PROBE_APPLICATION],
                            )
                            .await
                        else {
                            continue;
                        };
                        for r in rows {
                            let pid: i32 = r.get("pid");
                            let Some((hwm, anon)) = proc_status_kib(pid) else {
                                continue;
                            };
                            let key = format!("{side} {}", group_of(r.get("app")));
                            let sessions = {
                                let s = seen.entry(key.clone()).or_default();
                                s.insert(pid);
                                s.len()
                            };
                            let mut p = peaks.lock().unwrap_or_else(|p| p.into_inner());
                            let e = p.entry(key).or_default();
                            e.sessions = sessions;
                            e.hwm_kib = e.hwm_kib.max(hwm);
                            e.anon_kib = e.anon_kib.max(anon);
                        }
                    }
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
                anyhow::Ok(())
            })
        };
        Ok(BackendSampler { stop, peaks, task })
    }

    async fn finish(self) -> anyhow::Result<Backends> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        let peaks = self.peaks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(peaks)
    }
}

/// Where the servers are, for the steps.
struct Servers<'a> {
    source: &'a PgCluster,
    dest: &'a PgCluster,
    /// `--statement-log`: where each step's stderr goes.
    log_dir: Option<PathBuf>,
}

impl Servers<'_> {
    /// Keeps a step's stderr (pgzm's log lines) for `--statement-log`, and what
    /// pg_stat_statements counted on each server during it (every statement, those inside
    /// one multi-statement message such as the swap's each on its own), then resets it.
    async fn keep_log(&self, label: &str, m: &Measured) -> anyhow::Result<()> {
        let Some(dir) = &self.log_dir else {
            return Ok(());
        };
        std::fs::write(dir.join(format!("{label}.stderr")), &m.stderr)?;
        for (side, cluster) in [("source", self.source), ("destination", self.dest)] {
            let c = methods::connect(cluster, "postgres").await?;
            let rows = c
                .query(
                    "SELECT s.calls, s.total_exec_time, s.rows, coalesce(d.datname::text, '') AS db,
                            regexp_replace(s.query, '\\s+', ' ', 'g') AS query
                       FROM pg_stat_statements s LEFT JOIN pg_database d ON d.oid = s.dbid
                      ORDER BY s.total_exec_time DESC",
                    &[],
                )
                .await?;
            let mut out = String::from("calls\ttotal_ms\trows\tdb\tquery\n");
            for r in rows {
                let _ = writeln!(
                    out,
                    "{}\t{:.3}\t{}\t{}\t{}",
                    r.get::<_, i64>("calls"),
                    r.get::<_, f64>("total_exec_time"),
                    r.get::<_, i64>("rows"),
                    r.get::<_, String>("db"),
                    r.get::<_, String>("query")
                );
            }
            std::fs::write(dir.join(format!("{label}.{side}.pgss.tsv")), out)?;
            c.batch_execute("SELECT pg_stat_statements_reset()").await?;
        }
        Ok(())
    }

    /// Runs `cmd` to completion while sampling the backends of `dbs`, off the runtime's
    /// threads.
    async fn step(
        &self,
        label: &str,
        dbs: &[&str],
        mut cmd: Command,
    ) -> anyhow::Result<(Measured, Step)> {
        let sampler =
            BackendSampler::start(&[("source", self.source), ("destination", self.dest)], dbs)
                .await?;
        let m = tokio::task::spawn_blocking(move || run_measured(&mut cmd)).await?;
        let backends = sampler.finish().await?;
        let m = m?;
        self.keep_log(label, &m).await?;
        let step = Step {
            seconds: m.elapsed.as_secs_f64(),
            rss_mib: mib(m.max_rss_kib),
            backends,
        };
        Ok((m, step))
    }

    /// `pgzm ARGS` logging JSON lines (all of them with `--statement-log`).
    fn pgzm(&self, bins: &Binaries, args: &[&str]) -> Command {
        let mut cmd = Command::new(&bins.pgzm);
        cmd.args(["--log-format", "json"]);
        if self.log_dir.is_some() {
            cmd.arg("-v");
        }
        cmd.args(args);
        cmd
    }

    /// Runs `cmd` while sampling the backends and probing the destination with `queries`.
    async fn probed_step(
        &self,
        label: &str,
        dbs: &[&str],
        dst: &str,
        queries: Vec<String>,
        mut cmd: Command,
    ) -> anyhow::Result<(Measured, Step, Latencies)> {
        let sampler =
            BackendSampler::start(&[("source", self.source), ("destination", self.dest)], dbs)
                .await?;
        let probe = Probe::start(dst, queries).await?;
        let r = probe.around(move || run_measured(&mut cmd)).await;
        let backends = sampler.finish().await?;
        let (m, during) = r?;
        self.keep_log(label, &m).await?;
        let step = Step {
            seconds: m.elapsed.as_secs_f64(),
            rss_mib: mib(m.max_rss_kib),
            backends,
        };
        Ok((m, step, during))
    }
}

fn phases_of(report: &serde_json::Value) -> Vec<(String, f64)> {
    report["phases"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some((p["phase"].as_str()?.to_string(), p["duration_ms"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Measures one table count.
async fn measure(
    servers: &Servers<'_>,
    bins: &Binaries,
    n: usize,
    jobs: usize,
    pgcopydb_max_tables: usize,
    rounds: usize,
) -> anyhow::Result<SchemaRun> {
    let (source, dest) = (servers.source, servers.dest);
    let (src_db, dst_db, restore_db, pgcopydb_db) = (
        "bench_schema_src",
        "bench_schema_dst",
        "bench_schema_restore",
        "bench_schema_pgcopydb",
    );
    let src = fresh_db(source, src_db, false).await?;
    let dst = fresh_db(dest, dst_db, false).await?;
    eprintln!("   generating {n} tables in the source and the destination…");
    let t = Instant::now();
    let (a, b) = tokio::join!(generate(source, src_db, n, 1), generate(dest, dst_db, n, 3));
    a.context("generate the source")?;
    b.context("generate the destination")?;
    let generate_seconds = t.elapsed().as_secs_f64();
    let shape = shape(source, src_db).await?;
    eprintln!(
        "   {} tables, {} rows, {:.0} MB, {} foreign keys, {} views, {} functions in {generate_seconds:.1} s",
        shape.tables,
        shape.rows,
        shape.bytes as f64 / 1e6,
        shape.foreign_keys,
        shape.views,
        shape.functions
    );

    // pg_dump | pg_restore into an empty database of the destination server.
    let (dump, restore) =
        dump_restore(servers, bins, n, jobs, src_db, &src, restore_db, "").await?;
    eprintln!(
        "   pg_dump {:.1} s + pg_restore {:.1} s",
        dump.seconds, restore.seconds
    );

    let pgcopydb = match &bins.pgcopydb {
        None => Err("not installed".to_string()),
        Some(_) if n > pgcopydb_max_tables => Err(format!(
            "skipped above {pgcopydb_max_tables} tables (--pgcopydb-max-tables)"
        )),
        Some(tool) => {
            let url = fresh_db(dest, pgcopydb_db, false).await?;
            let dir = std::env::temp_dir()
                .join(format!("pgzm-bench-schema-pgcopydb-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let r = servers
                .step(
                    &format!("{n}-pgcopydb"),
                    &[src_db, pgcopydb_db],
                    methods::pgcopydb_command(bins, tool, jobs, &dir, &src, &url),
                )
                .await;
            let _ = std::fs::remove_dir_all(&dir);
            drop_db(dest, pgcopydb_db).await?;
            match r {
                Ok((_, step)) => {
                    eprintln!("   pgcopydb clone {:.1} s", step.seconds);
                    Ok(step)
                }
                Err(e) => {
                    eprintln!("   pgcopydb clone failed: {e:#}");
                    Err(format!(
                        "failed: {}",
                        format!("{e:#}").lines().last().unwrap_or("")
                    ))
                }
            }
        }
    };

    // A copy of the destination as generated, for the comparison's later rounds.
    let pristine = "bench_schema_dst_pristine";
    let rounds = if n <= ROUNDS_MAX_TABLES {
        rounds.max(1)
    } else {
        1
    };
    if rounds > 1 {
        drop_db(dest, pristine).await?;
        methods::connect(dest, "postgres")
            .await?
            .batch_execute(&format!("CREATE DATABASE {pristine} TEMPLATE {dst_db}"))
            .await?;
    }
    let pgzm_run = run_pgzm(servers, bins, n, jobs, &src, &dst, src_db, dst_db).await?;
    let mut whole_runs = vec![(
        dump.seconds + restore.seconds,
        pgzm_run.prepare.seconds + pgzm_run.swap.seconds,
    )];
    for round in 2..=rounds {
        let pgzm_first = round % 2 == 1;
        let (mut dumped, mut migrated) = (0.0, 0.0);
        for pgzm_turn in [pgzm_first, !pgzm_first] {
            if pgzm_turn {
                migrated =
                    pgzm_round(servers, bins, n, jobs, &src, src_db, pristine, round).await?;
            } else {
                let (dump, restore) = dump_restore(
                    servers,
                    bins,
                    n,
                    jobs,
                    src_db,
                    &src,
                    restore_db,
                    &format!("-{round}"),
                )
                .await?;
                dumped = dump.seconds + restore.seconds;
            }
        }
        eprintln!(
            "   round {round}: pg_dump + pg_restore {dumped:.1} s, pgzm prepare + swap {migrated:.1} s"
        );
        whole_runs.push((dumped, migrated));
    }
    if rounds > 1 {
        drop_db(dest, pristine).await?;
    }
    drop_db(source, src_db).await?;
    drop_db(dest, dst_db).await?;
    Ok(SchemaRun {
        rounds: whole_runs,
        tables: n,
        shape,
        generate_seconds,
        dump,
        restore,
        pgcopydb,
        pgzm: pgzm_run,
        busy: Vec::new(),
    })
}

/// `pg_dump -Fd` of the source, then `pg_restore` into an empty database of the destination
/// server (dropped after), each measured; `round` suffixes the steps' labels.
#[allow(clippy::too_many_arguments)]
async fn dump_restore(
    servers: &Servers<'_>,
    bins: &Binaries,
    n: usize,
    jobs: usize,
    src_db: &str,
    src: &str,
    restore_db: &str,
    round: &str,
) -> anyhow::Result<(Step, Step)> {
    let restore_url = fresh_db(servers.dest, restore_db, false).await?;
    let dir = std::env::temp_dir().join(format!("pgzm-bench-schema-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_, dump) = servers
        .step(
            &format!("{n}-pg_dump{round}"),
            &[src_db, restore_db],
            methods::dump_command(bins, jobs, &dir, src),
        )
        .await
        .context("pg_dump")?;
    let (_, restore) = servers
        .step(
            &format!("{n}-pg_restore{round}"),
            &[src_db, restore_db],
            methods::restore_command(bins, jobs, &dir, &restore_url),
        )
        .await
        .context("pg_restore")?;
    let _ = std::fs::remove_dir_all(&dir);
    drop_db(servers.dest, restore_db).await?;
    Ok((dump, restore))
}

/// A later round of the comparison: pgzm prepare + swap into a fresh copy of the destination
/// as generated; seconds.
#[allow(clippy::too_many_arguments)]
async fn pgzm_round(
    servers: &Servers<'_>,
    bins: &Binaries,
    n: usize,
    jobs: usize,
    src: &str,
    src_db: &str,
    pristine: &str,
    round: usize,
) -> anyhow::Result<f64> {
    let db = "bench_schema_dst_round";
    drop_db(servers.dest, db).await?;
    methods::connect(servers.dest, "postgres")
        .await?
        .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {pristine}"))
        .await?;
    let dst = servers.dest.url(db);
    let mut seconds = 0.0;
    for (step, args) in [
        ("prepare", prepare_args(src, &dst, jobs)),
        (
            "swap",
            ["swap", "--json", "--no-log-file", "--dest", &dst]
                .map(String::from)
                .to_vec(),
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, measured) = servers
            .step(
                &format!("{n}-{step}-{round}"),
                &[src_db, db],
                servers.pgzm(bins, &args),
            )
            .await
            .with_context(|| format!("pgzm {step}, round {round}"))?;
        seconds += measured.seconds;
    }
    drop_db(servers.dest, db).await?;
    Ok(seconds)
}

/// `pgzm prepare` of the bench's data set, as JSON.
fn prepare_args(src: &str, dst: &str, jobs: usize) -> Vec<String> {
    let mut args = methods::run_args("prepare", src, dst, jobs);
    args.extend(["--preserved-tables", PRESERVED].map(String::from));
    args
}

async fn drop_db(cluster: &PgCluster, db: &str) -> anyhow::Result<()> {
    methods::connect(cluster, "postgres")
        .await?
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// pgzm's steps on the generated databases: prepare, swap, rollback, prepare + swap again,
/// cleanup.
#[allow(clippy::too_many_arguments)]
async fn run_pgzm(
    servers: &Servers<'_>,
    bins: &Binaries,
    n: usize,
    jobs: usize,
    src: &str,
    dst: &str,
    src_db: &str,
    dst_db: &str,
) -> anyhow::Result<PgzmRun> {
    let dest = servers.dest;
    let dbs = [src_db, dst_db];
    let prepare_owned = prepare_args(src, dst, jobs);
    let prepare_args: Vec<&str> = prepare_owned.iter().map(String::as_str).collect();
    let mut run = PgzmRun::default();
    run.catalog
        .push(("before", catalog_state(dest, dst_db).await?));

    let (m, step) = servers
        .step(
            &format!("{n}-prepare"),
            &dbs,
            servers.pgzm(bins, &prepare_args),
        )
        .await
        .context("pgzm prepare")?;
    let report = methods::json_report(&m.stdout)?;
    run.phases = phases_of(&report);
    run.data_ms = report["throughput"]["data_ms"].as_f64();
    run.prepare = step;
    eprintln!(
        "   pgzm prepare {:.1} s: {}",
        run.prepare.seconds,
        run.phases
            .iter()
            .map(|(p, ms)| format!("{p} {:.2} s", ms / 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    run.catalog
        .push(("prepare", catalog_state(dest, dst_db).await?));

    let swap_args = ["swap", "--json", "--no-log-file", "--dest", dst];
    let (m, step, client) = servers
        .probed_step(
            &format!("{n}-swap"),
            &dbs,
            dst,
            probe_queries(n),
            servers.pgzm(bins, &swap_args),
        )
        .await
        .context("pgzm swap")?;
    let report = methods::json_report(&m.stdout)?;
    run.lock_held_ms = report["swap"]["lock_held_us"].as_f64().unwrap_or(0.0) / 1000.0;
    run.swap_attempts = report["swap"]["attempts"].as_u64().unwrap_or(0);
    run.swap = step;
    run.swap_client = client;
    eprintln!(
        "   pgzm swap {:.2} s, lock held {:.1} ms, client worst {:.1} ms",
        run.swap.seconds, run.lock_held_ms, client.worst_ms
    );
    run.catalog
        .push(("swap", catalog_state(dest, dst_db).await?));

    let rollback_args = ["rollback", "--latest", "--json", "--dest", dst];
    let (m, step, client) = servers
        .probed_step(
            &format!("{n}-rollback"),
            &dbs,
            dst,
            probe_queries(n),
            servers.pgzm(bins, &rollback_args),
        )
        .await
        .context("pgzm rollback")?;
    let report = methods::json_report(&m.stdout)?;
    run.rollback_attempts = report["attempts"].as_u64().unwrap_or(0);
    run.rollback = step;
    run.rollback_client = client;
    eprintln!(
        "   pgzm rollback {:.2} s, client worst {:.1} ms",
        run.rollback.seconds, client.worst_ms
    );
    run.catalog
        .push(("rollback", catalog_state(dest, dst_db).await?));

    // A backup set for the cleanup to drop: the migration again.
    let (m, step) = servers
        .step(
            &format!("{n}-prepare-again"),
            &dbs,
            servers.pgzm(bins, &prepare_args),
        )
        .await
        .context("pgzm prepare (again)")?;
    run.phases_again = phases_of(&methods::json_report(&m.stdout)?);
    run.prepare_again = step;
    let (m, step) = servers
        .step(
            &format!("{n}-swap-again"),
            &dbs,
            servers.pgzm(bins, &swap_args),
        )
        .await
        .context("pgzm swap (again)")?;
    let report = methods::json_report(&m.stdout)?;
    run.lock_held_again_ms = report["swap"]["lock_held_us"].as_f64().unwrap_or(0.0) / 1000.0;
    run.swap_again = step;
    eprintln!(
        "   again: pgzm prepare {:.1} s, swap {:.2} s (lock held {:.1} ms)",
        run.prepare_again.seconds, run.swap_again.seconds, run.lock_held_again_ms
    );
    run.catalog
        .push(("prepare + swap again", catalog_state(dest, dst_db).await?));

    // Every backup set swapped in until a minute from now.
    let before = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?
        + Duration::from_secs(60))
    .as_millis()
    .to_string();
    let cleanup_args = ["cleanup", "--json", "--dest", dst, "--before", &before];
    let (m, step, client) = servers
        .probed_step(
            &format!("{n}-cleanup"),
            &dbs,
            dst,
            probe_queries(n),
            servers.pgzm(bins, &cleanup_args),
        )
        .await
        .context("pgzm cleanup")?;
    let report = methods::json_report(&m.stdout)?;
    run.cleanup_objects = report["objects"].as_array().map_or(0, |a| a.len());
    run.cleanup = step;
    run.cleanup_client = client;
    eprintln!(
        "   pgzm cleanup {:.2} s ({} objects), client worst {:.1} ms",
        run.cleanup.seconds, run.cleanup_objects, client.worst_ms
    );
    run.catalog
        .push(("cleanup", catalog_state(dest, dst_db).await?));
    Ok(run)
}

/// Names of running processes that compete for the CPU and are not this run's: compilers and
/// test runs (a CI run on the same machine).
fn busy() -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
                let comm = comm.trim();
                // Test binaries are named `<target>-<hash>` (comm keeps 15 bytes of it).
                let test_binary = ["it-", "distributed-", "deploy-", "pgzm_"]
                    .iter()
                    .any(|p| comm.starts_with(p));
                if ["cargo", "rustc", "cc1"].contains(&comm) || test_binary {
                    found.insert(comm.to_string());
                }
            }
        }
    }
    found.into_iter().collect()
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `--scale schema`: both servers started for it, every table count of `--tables` in turn.
pub async fn run(args: &Args) -> anyhow::Result<SchemaScale> {
    let locks = format!(
        "max_locks_per_transaction={}",
        args.max_locks_per_transaction
    );
    eprintln!(
        "starting two throwaway PostgreSQL servers ({locks}; autovacuum off on the destination)…"
    );
    let load_before = load_average();
    let mut settings = vec![locks];
    if let Some(dir) = &args.statement_log {
        // Every statement with its duration and session, for finding what bounds each phase
        // (the timings of such a run include the logging).
        settings.extend(
            [
                "log_min_duration_statement=0",
                "log_line_prefix=%m [%p] %a: ",
                "shared_preload_libraries=pg_stat_statements",
                "pg_stat_statements.max=200000",
                "pg_stat_statements.track=all",
            ]
            .map(String::from),
        );
        std::fs::create_dir_all(dir)?;
    }
    let source = PgCluster::start_with_settings(&settings).context("start the source server")?;
    settings.push("autovacuum=off".into());
    let dest = PgCluster::start_with_settings(&settings).context("start the destination server")?;
    let bins = crate::binaries(&source)?;
    if args.statement_log.is_some() {
        for cluster in [&source, &dest] {
            methods::connect(cluster, "postgres")
                .await?
                .batch_execute("CREATE EXTENSION pg_stat_statements")
                .await?;
        }
    }
    let servers = Servers {
        source: &source,
        dest: &dest,
        log_dir: args.statement_log.clone(),
    };
    let mut runs = Vec::new();
    for &n in &args.tables {
        eprintln!("== schema scale: {n} tables");
        let busy_before = busy();
        let r = measure(
            &servers,
            &bins,
            n,
            args.jobs,
            args.pgcopydb_max_tables,
            args.schema_rounds,
        )
        .await
        .map(|mut r| {
            r.busy = busy_before.into_iter().chain(busy()).collect();
            r.busy.sort();
            r.busy.dedup();
            r
        });
        if let Some(dir) = &args.statement_log {
            for (name, cluster) in [("source", &source), ("destination", &dest)] {
                std::fs::copy(cluster.log_path(), dir.join(format!("{name}.log")))?;
            }
        }
        runs.push(r?);
    }
    Ok(SchemaScale {
        jobs: args.jobs,
        max_locks: args.max_locks_per_transaction,
        runs,
        load_before,
    })
}

/// One cell of a row of the report's tables, per run.
type Cell<'a> = &'a dyn Fn(&SchemaRun) -> String;

fn secs(s: f64) -> String {
    format!("{s:.2}")
}

fn phase_ms(run: &PgzmRun, name: &str) -> Option<f64> {
    let v: Vec<f64> = run
        .phases
        .iter()
        .filter(|(p, _)| p == name)
        .map(|(_, ms)| *ms)
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

impl SchemaScale {
    /// The report section.
    pub fn render(&self, command: &str, machine: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## Schema scale: thousands of tables, phase by phase\n\nMeasured by `{command}`. Machine: {machine}; both servers local (throwaway clusters, fsync off, data directories under {}), \
             started for this section with `max_locks_per_transaction = {}` and autovacuum off on the destination (so the dead catalog tuples counted are the ones each step left). \
             Load average before the run: {:.2}.\n",
            std::env::temp_dir().display(),
            self.max_locks,
            self.load_before,
        );
        let _ = writeln!(
            s,
            "The schema (the same in the source and the destination, with different rows): tables `t_NNNNN` with a serial primary key, text, int, timestamptz; \
             most hold 0–49 rows, one in 20 holds 1000 and one in 200 holds 10 000–100 000; three of every four reference the first of their group of four (foreign key); \
             one in 7 has an enum column (3 enums); one in 10 a second index and a view; one in 100 a join view and a default from one of 5 shared sequences; \
             one in 25 a SQL function taking its row type; one in 50 references `{PRESERVED}` (1000 rows), migrated with `--preserved-tables {PRESERVED}`. \
             Generated with one DO block per {GENERATE_CHUNK} tables (format() + EXECUTE), then `VACUUM (ANALYZE)`.\n"
        );
        for r in self.runs.iter().filter(|r| !r.busy.is_empty()) {
            let _ = writeln!(
                s,
                "**Noisy:** at {} tables other processes shared the 2 cores ({} running at the start or the end of that run).\n",
                r.tables,
                r.busy.join(", ")
            );
        }
        let _ = writeln!(s, "| | {} |", self.header());
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.runs.len()));
        let row = |label: &str, f: Cell| -> String {
            format!(
                "| {label} | {} |",
                self.runs.iter().map(f).collect::<Vec<_>>().join(" | ")
            )
        };
        let shape_rows: [(&str, Cell); 9] = [
            ("tables", &|r| r.shape.tables.to_string()),
            ("rows", &|r| r.shape.rows.to_string()),
            ("source database (MB)", &|r| {
                format!("{:.0}", r.shape.bytes as f64 / 1e6)
            }),
            ("tables of ≥ 10 000 rows", &|r| {
                r.shape.large_tables.to_string()
            }),
            ("foreign keys", &|r| r.shape.foreign_keys.to_string()),
            ("indexes", &|r| r.shape.indexes.to_string()),
            ("views / functions", &|r| {
                format!("{} / {}", r.shape.views, r.shape.functions)
            }),
            ("sequences / enums", &|r| {
                format!("{} / {}", r.shape.sequences, r.shape.enums)
            }),
            ("generating both databases (s)", &|r| {
                format!("{:.1}", r.generate_seconds)
            }),
        ];
        for (label, f) in shape_rows {
            let _ = writeln!(s, "{}", row(label, f));
        }

        let _ = writeln!(
            s,
            "\n### pgzm, phase by phase\n\nSeconds (and ms per table). `prepare` phases from its `--json` report: `plan` reads both catalogs (and checks dependents and names), \
             `shadow` creates the shadow set (its sequences and tables on two sessions, transactions sized to the lock table), `preserve` copies `{PRESERVED}` and sets up its sync triggers, `copy` is the data movement with each table's \
             builds (keys, indexes, sequences, ANALYZE) running beside it, split below into the data (until the last task landed) and the builds left after it, \
             `constraints` adds the foreign keys NOT VALID and validates them. The swap's lock-held time is pgzm's (server clock, from the locks granted to the commit); \
             the client runs primary-key lookups on every table, view and function in turn on one session, and its worst query overlapping the step is given. \
             Rollback is `pgzm rollback --latest` right after the swap; cleanup is `pgzm cleanup` of the backup set of a second prepare + swap.\n"
        );
        let _ = writeln!(s, "| step | {} |", self.header());
        let _ = writeln!(s, "|---|{}", "---|".repeat(self.runs.len()));
        let per_table = |secs: f64, n: usize| -> String {
            format!("{secs:.2} ({:.2} ms)", 1000.0 * secs / n.max(1) as f64)
        };
        let phase_row = |name: &'static str| {
            move |r: &SchemaRun| {
                phase_ms(&r.pgzm, name)
                    .map(|ms| per_table(ms / 1000.0, r.tables))
                    .unwrap_or_else(|| "–".into())
            }
        };
        let _ = writeln!(s, "{}", row("plan", &phase_row("plan")));
        let _ = writeln!(s, "{}", row("shadow DDL", &phase_row("shadow")));
        let _ = writeln!(s, "{}", row("preserved table", &phase_row("preserve")));
        let _ = writeln!(s, "{}", row("copy + builds", &phase_row("copy")));
        let _ = writeln!(
            s,
            "{}",
            row("  of which data movement", &|r| r
                .pgzm
                .data_ms
                .map(|ms| per_table(ms / 1000.0, r.tables))
                .unwrap_or_default())
        );
        let _ = writeln!(
            s,
            "{}",
            row("  of which builds after the last byte", &|r| {
                match (phase_ms(&r.pgzm, "copy"), r.pgzm.data_ms) {
                    (Some(c), Some(d)) => per_table((c - d).max(0.0) / 1000.0, r.tables),
                    _ => String::new(),
                }
            })
        );
        let _ = writeln!(
            s,
            "{}",
            row("foreign keys (add + validate)", &phase_row("constraints"))
        );
        let known = ["plan", "shadow", "preserve", "copy", "constraints"];
        let _ = writeln!(
            s,
            "{}",
            row(
                "outside the phases (pgzm's planning after the catalog reads, grants, checks, state)",
                &|r| {
                    let inside: f64 = r
                        .pgzm
                        .phases
                        .iter()
                        .filter(|(p, _)| known.contains(&p.as_str()))
                        .map(|(_, ms)| ms)
                        .sum();
                    per_table(
                        (r.pgzm.prepare.seconds - inside / 1000.0).max(0.0),
                        r.tables,
                    )
                }
            )
        );
        let _ = writeln!(
            s,
            "{}",
            row("**prepare, wall**", &|r| format!(
                "**{}**",
                secs(r.pgzm.prepare.seconds)
            ))
        );
        let _ = writeln!(s, "{}", row("swap, wall", &|r| secs(r.pgzm.swap.seconds)));
        let _ = writeln!(
            s,
            "{}",
            row("**swap lock held (ms; µs per table)**", &|r| format!(
                "**{:.1}** ({:.0} µs); again: {:.1}",
                r.pgzm.lock_held_ms,
                1000.0 * r.pgzm.lock_held_ms / r.tables.max(1) as f64,
                r.pgzm.lock_held_again_ms
            ))
        );
        let client = |l: &Latencies| {
            format!(
                "{:.1} ({} queries, {} errors)",
                l.worst_ms, l.queries, l.errors
            )
        };
        let _ = writeln!(
            s,
            "{}",
            row("client worst during the swap (ms)", &|r| client(
                &r.pgzm.swap_client
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("**whole run: prepare + swap (s)**", &|r| format!(
                "**{}**",
                secs(r.pgzm.prepare.seconds + r.pgzm.swap.seconds)
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("rollback, wall (s)", &|r| format!(
                "{} ({} attempt{})",
                secs(r.pgzm.rollback.seconds),
                r.pgzm.rollback_attempts,
                if r.pgzm.rollback_attempts == 1 {
                    ""
                } else {
                    "s"
                }
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("client worst during the rollback (ms)", &|r| client(
                &r.pgzm.rollback_client
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("second prepare + swap (s)", &|r| format!(
                "{} + {} (phases: {})",
                secs(r.pgzm.prepare_again.seconds),
                secs(r.pgzm.swap_again.seconds),
                r.pgzm
                    .phases_again
                    .iter()
                    .map(|(p, ms)| format!("{p} {:.2}", ms / 1000.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("cleanup, wall (s)", &|r| format!(
                "{} ({} objects)",
                secs(r.pgzm.cleanup.seconds),
                r.pgzm.cleanup_objects
            ))
        );
        let _ = writeln!(
            s,
            "{}",
            row("client worst during the cleanup (ms)", &|r| client(
                &r.pgzm.cleanup_client
            ))
        );

        let _ = writeln!(
            s,
            "\n### Beside pg_dump/pg_restore and pgcopydb\n\nThe same source database, into an empty database of the destination server (`-j{j}` / table and index jobs {j}). \
             pgzm's time is prepare + swap, into a destination that already holds the schema (it builds beside it, then swaps). \
             Client RSS is the peak of the process, reported by a small launcher so that the bench's own memory is not counted (for pg_dump and pg_restore, of the larger); backends are the server sessions of the databases involved (not the probing client's), sampled every {} ms \
             from /proc: \"private\" is their largest RssAnon (caches, plans), \"with shared\" their largest VmHWM, which also counts the shared buffers and lock table they touched.\n",
            SAMPLE_EVERY.as_millis(),
            j = self.jobs
        );
        let _ = writeln!(s, "| tables | method | time (s) | vs pg_dump/restore | client RSS (MiB) | backend private (MiB) | backend with shared (MiB) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for r in &self.runs {
            let dump_s = r.dump.seconds + r.restore.seconds;
            let dump_backends = |f: fn(&Step) -> f64| f(&r.dump).max(f(&r.restore));
            let _ = writeln!(
                s,
                "| {} | pg_dump -Fd -j{j} ({:.2} s) + pg_restore -j{j} ({:.2} s) | {:.2} | 1.00× | {:.0} | {:.0} | {:.0} |",
                r.tables,
                r.dump.seconds,
                r.restore.seconds,
                dump_s,
                r.dump.rss_mib.max(r.restore.rss_mib),
                dump_backends(Step::backend_anon_mib),
                dump_backends(Step::backend_hwm_mib),
                j = self.jobs
            );
            match &r.pgcopydb {
                Ok(p) => {
                    let _ = writeln!(
                        s,
                        "| {} | pgcopydb clone | {:.2} | {:.2}× | {:.0} | {:.0} | {:.0} |",
                        r.tables,
                        p.seconds,
                        p.seconds / dump_s.max(1e-3),
                        p.rss_mib,
                        p.backend_anon_mib(),
                        p.backend_hwm_mib()
                    );
                }
                Err(why) => {
                    let _ = writeln!(s, "| {} | pgcopydb clone | {why} | | | | |", r.tables);
                }
            }
            let p = &r.pgzm;
            let whole = p.prepare.seconds + p.swap.seconds;
            let steps = [&p.prepare, &p.swap];
            let _ = writeln!(
                s,
                "| {} | pgzm prepare + swap | {:.2} | **{:.2}×** | {:.0} | {:.0} | {:.0} |",
                r.tables,
                whole,
                whole / dump_s.max(1e-3),
                steps.iter().map(|s| s.rss_mib).fold(0.0, f64::max),
                steps
                    .iter()
                    .map(|s| s.backend_anon_mib())
                    .fold(0.0, f64::max),
                steps
                    .iter()
                    .map(|s| s.backend_hwm_mib())
                    .fold(0.0, f64::max),
            );
        }
        for r in self.runs.iter().filter(|r| r.rounds.len() > 1) {
            let list = |f: fn(&(f64, f64)) -> f64| {
                r.rounds
                    .iter()
                    .map(|round| format!("{:.2}", f(round)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "\nThe whole run at {} tables in {} rounds (the first is the row above; the others alternate which goes first, pgzm each time into a fresh copy of the destination as generated): \
                 pg_dump + pg_restore {} s; pgzm prepare + swap {} s; pgzm's ratio per round {}; **median {:.2}×**.",
                r.tables,
                r.rounds.len(),
                list(|(dump, _)| *dump),
                list(|(_, pgzm)| *pgzm),
                r.rounds
                    .iter()
                    .map(|(dump, pgzm)| format!("{:.2}×", pgzm / dump.max(1e-3)))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.median_ratio().unwrap_or(0.0)
            );
        }

        let _ = writeln!(
            s,
            "\n### Memory of pgzm and of its backends\n\nPeak RSS of each pgzm command, and per server and `application_name` the backends serving it \
             (sessions seen; largest private memory / largest VmHWM, MiB).\n"
        );
        let _ = writeln!(s, "| tables | command | pgzm RSS (MiB) | backends |");
        let _ = writeln!(s, "|---|---|---|---|");
        for r in &self.runs {
            let p = &r.pgzm;
            for (label, step) in [
                ("prepare", &p.prepare),
                ("swap", &p.swap),
                ("rollback", &p.rollback),
                ("cleanup", &p.cleanup),
            ] {
                let _ = writeln!(
                    s,
                    "| {} | {label} | {:.0} | {} |",
                    r.tables,
                    step.rss_mib,
                    step.backends
                        .iter()
                        .map(|(k, b)| format!(
                            "{k} ×{}: {:.0} / {:.0}",
                            b.sessions,
                            mib(b.anon_kib),
                            mib(b.hwm_kib)
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
        }

        let _ = writeln!(
            s,
            "\n### Catalog bloat in the destination\n\nDead tuples (`pg_stat_sys_tables.n_dead_tup`, autovacuum off) and total size of the catalogs \
             after each step, cumulative from the freshly vacuumed destination (\"before\").\n"
        );
        let _ = writeln!(
            s,
            "| tables | after | {} |",
            CATALOGS
                .iter()
                .map(|c| format!("{c} dead (size MB)"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(s, "|---|---|{}", "---|".repeat(CATALOGS.len()));
        for r in &self.runs {
            for (label, state) in &r.pgzm.catalog {
                let _ = writeln!(
                    s,
                    "| {} | {label} | {} |",
                    r.tables,
                    CATALOGS
                        .iter()
                        .map(|c| state
                            .get(*c)
                            .map(|(dead, bytes)| format!("{dead} ({:.1})", *bytes as f64 / 1e6))
                            .unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(" | ")
                );
            }
        }

        let _ = writeln!(s, "\n### Against the targets of issue 19\n");
        for r in &self.runs {
            let p = &r.pgzm;
            let n = r.tables;
            let per_table_us = |ms: f64| 1000.0 * ms / n.max(1) as f64;
            let plan_s = phase_ms(p, "plan").unwrap_or(0.0) / 1000.0;
            let dump_s = r.dump.seconds + r.restore.seconds;
            let whole = p.prepare.seconds + p.swap.seconds;
            let rss = [&p.prepare, &p.swap, &p.rollback, &p.cleanup]
                .iter()
                .map(|s| s.rss_mib)
                .fold(0.0, f64::max);
            let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
            let _ = writeln!(s, "{n} tables:\n");
            let _ = writeln!(
                s,
                "- plan ≤ 3 s (the target is set at 10 000 tables): {plan_s:.2} s ({})",
                verdict(plan_s <= 3.0)
            );
            let _ = writeln!(
                s,
                "- swap lock held ≤ 0.05 ms per table: {:.0} µs per table ({})",
                per_table_us(p.lock_held_ms),
                verdict(per_table_us(p.lock_held_ms) <= 50.0)
            );
            let _ = writeln!(
                s,
                "- rollback within the same bound (client worst, the lock window as production sees it): {:.0} µs per table ({})",
                per_table_us(p.rollback_client.worst_ms),
                verdict(per_table_us(p.rollback_client.worst_ms) <= 50.0)
            );
            let _ = writeln!(
                s,
                "- cleanup within the same bound (client worst): {:.0} µs per table ({}); wall {:.2} s",
                per_table_us(p.cleanup_client.worst_ms),
                verdict(per_table_us(p.cleanup_client.worst_ms) <= 50.0),
                p.cleanup.seconds
            );
            // Over several rounds the median decides.
            let ratio = match r.median_ratio() {
                Some(median) if r.rounds.len() > 1 => median,
                _ => whole / dump_s.max(1e-3),
            };
            let _ = writeln!(
                s,
                "- whole run ≤ 0.8× pg_dump/pg_restore (the target is set at 3 000 small tables): {:.2}×{} ({})",
                ratio,
                if r.rounds.len() > 1 {
                    format!(", the median of {} rounds (the first: {:.2}×)", r.rounds.len(), whole / dump_s.max(1e-3))
                } else {
                    String::new()
                },
                verdict(ratio <= 0.8)
            );
            let _ = writeln!(
                s,
                "- pgzm RSS < 100 MiB: {rss:.0} MiB ({})\n",
                verdict(rss < 100.0)
            );
        }
        s
    }

    fn header(&self) -> String {
        self.runs
            .iter()
            .map(|r| format!("{} tables", r.tables))
            .collect::<Vec<_>>()
            .join(" | ")
    }
}
