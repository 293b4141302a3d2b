//! Two regions (network namespaces joined by a shaped veth link, see `pgzm_tests::netns`; root
//! only, skipped otherwise): the source server and the source-side agents in region A; the
//! destination server, the destination-side agent and the coordinator (the real `pgzm start`)
//! in region B. The copy's data crosses the link once, in the source-side agents' export
//! streams; the coordinator reaches the source server through a delay proxy in A.
//!
//! - a partition: the link drops every packet for 10 s while tasks stream across it;
//! - a source-side agent SIGKILLed while its exports stream across the link.
//!
//! Either way the run finishes with the source's rows, and no task that had committed is
//! copied again (each finished once, its record in `pgzm.copy_progress` the one it wrote).
//!
//! The test process stays in its own namespace and reaches the servers only through their unix
//! sockets ([`PgCluster::socket_conninfo`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgzm_tests::netns::{self, DelayProxy, Regions, A_ADDR};
use pgzm_tests::PgCluster;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_postgres::Client;

use crate::support::*;

/// The database migrated, on both servers.
const DB: &str = "regions";
/// The link's bandwidth each way: slow enough that the copy takes seconds.
const LINK_MBIT: u32 = 12;
/// One-way delay of the proxy in front of the source server.
const PROXY_DELAY: Duration = Duration::from_millis(10);
/// Tables, and rows per table (about 2.4 MB each: three 1 MB page ranges).
const TABLES: usize = 6;
const ROWS: usize = 15_000;
/// How long the link stays cut.
const PARTITION: Duration = Duration::from_secs(10);
/// Bound on the whole run once the link is whole again.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The `pgzm` binary, built from the current sources: cargo builds only this package's
/// binaries for its tests, so `pgzm` (next to `pgzm-agent`) is built once per test binary with
/// the same profile and target directory (a no-op when up to date; as
/// `coordinator/tests/it/otlp.rs` does for `pgzm-agent`). `PGZM_BIN` overrides it.
fn pgzm_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PGZM_BIN").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let agent = Path::new(env!("CARGO_BIN_EXE_pgzm-agent"));
        let bin = agent.with_file_name(format!("pgzm{}", std::env::consts::EXE_SUFFIX));
        let profile_dir = agent.parent().expect("pgzm-agent has a directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let target_dir = profile_dir.parent().expect("a target directory");
        let mut build = std::process::Command::new(env!("CARGO"));
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "pgzm-coordinator",
                "--bin",
                "pgzm",
            ])
            .args(["--profile", profile, "--target-dir"])
            .arg(target_dir)
            .env_remove("CARGO_BUILD_TARGET")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        // The variables cargo gives a crate being compiled would make build scripts that
        // watch them rebuild (see otlp.rs).
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(name.as_ref());
            }
        }
        match build.status() {
            Ok(s) if s.success() => {}
            other => assert!(
                bin.exists(),
                "pgzm could not be built ({other:?}) and {} does not exist",
                bin.display()
            ),
        }
        bin
    })
}

/// A `pgzm start` running in a region; SIGKILLed when dropped.
struct Coordinator {
    child: tokio::process::Child,
    stderr: Arc<Mutex<String>>,
    stdout: tokio::task::JoinHandle<String>,
}

impl Coordinator {
    fn start(region: &netns::Netns, args: &[&str]) -> Coordinator {
        let mut cmd = child_command(Command::from(region.command(pgzm_binary())), args, &[]);
        for var in [
            "SOURCE_DATABASE_URL",
            "DEST_DATABASE_URL",
            "DATABASE_URL",
            "PGZM_SCHEMAS",
            "PRESERVED_TABLES",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd.spawn().expect("spawn pgzm");
        let stderr = Arc::new(Mutex::new(String::new()));
        drain(child.stderr.take().expect("stderr"), Arc::clone(&stderr));
        let mut out = child.stdout.take().expect("stdout");
        let stdout = tokio::spawn(async move {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s).await;
            s
        });
        Coordinator {
            child,
            stderr,
            stdout,
        }
    }

    fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for its exit; its `--json` document and its log.
    async fn finish(
        mut self,
        timeout: Duration,
        agents: &[&AgentProcess],
    ) -> (serde_json::Value, String) {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for pgzm"),
            Err(_) => panic!(
                "pgzm did not finish within {timeout:?}; its log:\n{}\nagents:\n{}",
                self.log(),
                agent_logs(agents)
            ),
        };
        let stdout = tokio::time::timeout(Duration::from_secs(5), &mut self.stdout)
            .await
            .expect("pgzm's stdout closes")
            .expect("read pgzm's stdout");
        assert!(
            status.success(),
            "pgzm exited with {status}: {stdout}\n{}\nagents:\n{}",
            self.log(),
            agent_logs(agents)
        );
        let report =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("pgzm --json: {e}: {stdout}"));
        (report, self.log())
    }
}

fn agent_logs(agents: &[&AgentProcess]) -> String {
    agents
        .iter()
        .map(|a| a.log())
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// A connection through the server's unix socket (the only way from this namespace).
async fn socket_client(cluster: &PgCluster, db: &str) -> Client {
    connect(&cluster.socket_conninfo(db)).await
}

/// The source's tables `r1`… with rows, the destination's with a few older rows.
async fn load(src: &PgCluster, dst: &PgCluster) {
    for (cluster, source) in [(src, true), (dst, false)] {
        socket_client(cluster, "postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {DB}"))
            .await
            .expect("create database");
        let mut sql = String::new();
        for i in 1..=TABLES {
            sql.push_str(&format!(
                "CREATE TABLE r{i} (id int PRIMARY KEY, payload text NOT NULL);\n"
            ));
            if source {
                sql.push_str(&format!(
                    "INSERT INTO r{i} SELECT g, repeat(md5(g::text || '/{i}'), 4)
                       FROM generate_series(1, {ROWS}) g;\n"
                ));
            } else {
                sql.push_str(&format!(
                    "INSERT INTO r{i} VALUES (1, 'old'), (2, 'older');\n"
                ));
            }
        }
        // Page counts for the split into ranges.
        sql.push_str("ANALYZE;");
        socket_client(cluster, DB)
            .await
            .batch_execute(&sql)
            .await
            .expect("load tables");
    }
}

/// The two regions, their servers (loaded) and the proxy the coordinator reaches the source
/// through.
struct World {
    // Dropped in this order: the proxy, the servers, then the namespaces.
    proxy: DelayProxy,
    src: PgCluster,
    dst: PgCluster,
    regions: Regions,
}

impl World {
    /// `None`, after printing `skipped: TEST why`, where regions cannot be made (not root, no
    /// `ip`/`tc`).
    async fn make(test: &str) -> Option<World> {
        if let Some(why) = netns::unavailable() {
            eprintln!("skipped: {test} {why}");
            return None;
        }
        let regions = Regions::create().expect("create the regions");
        let (src, dst) = tokio::task::block_in_place(|| {
            let src = regions.a.run(PgCluster::start).expect("enter A");
            let dst = regions.b.run(PgCluster::start).expect("enter B");
            (
                src.expect("source server in A"),
                dst.expect("destination server in B"),
            )
        });
        load(&src, &dst).await;
        let upstream = format!("127.0.0.1:{}", src.port())
            .parse()
            .expect("source address");
        let proxy = DelayProxy::start(&regions.a, A_ADDR, upstream, PROXY_DELAY).expect("proxy");
        regions.shape(LINK_MBIT).expect("shape the link");
        Some(World {
            proxy,
            src,
            dst,
            regions,
        })
    }

    /// A source-side agent in A, on the link's address.
    async fn source_agent(&self) -> AgentProcess {
        let db = format!("src={}", self.src.url(DB));
        let listen = format!("{A_ADDR}:0");
        AgentProcess::spawn_in(
            &self.regions.a,
            &[
                "--listen",
                &listen,
                "--allow-insecure-listen",
                "--side",
                "source",
                "--database",
                &db,
                "-v",
            ],
            &[],
        )
        .await
    }

    /// The destination-side agent in B, on B's loopback (only the coordinator calls it).
    async fn destination_agent(&self) -> AgentProcess {
        let db = format!("dst={}", self.dst.url(DB));
        AgentProcess::spawn_in(
            &self.regions.b,
            &[
                "--listen",
                "127.0.0.1:0",
                "--side",
                "destination",
                "--database",
                &db,
                "--max-tasks",
                "2",
                "-v",
            ],
            &[],
        )
        .await
    }

    /// `pgzm start` in B with these agents: two tasks at once, ranges of 1 MB.
    fn coordinator(&self, agents: &[&AgentProcess]) -> Coordinator {
        let source = format!("postgres://postgres@{}/{DB}", self.proxy.addr());
        let dest = self.dst.url(DB);
        let mut args = vec![
            "start".to_string(),
            "--source".into(),
            source,
            "--dest".into(),
            dest,
            "--allow-insecure-agents".into(),
            "--agent-source-db".into(),
            "src".into(),
            "--agent-dest-db".into(),
            "dst".into(),
            "--jobs".into(),
            "2".into(),
            "--range-size-mb".into(),
            "1".into(),
            "--json".into(),
            "--no-log-file".into(),
            "--progress-every".into(),
            "0".into(),
        ];
        for a in agents {
            args.push("--agent".into());
            args.push(a.http_url());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Coordinator::start(&self.regions.b, &args)
    }
}

/// The copy tasks recorded so far in the destination: key → the record's `xmin` (the
/// transaction that wrote it) and when it was written. Empty before the run made its schema.
async fn committed(dst: &Client) -> BTreeMap<String, (String, f64)> {
    let rows = dst
        .query(
            "SELECT task_key, xmin::text, extract(epoch FROM done_at)::float8
               FROM pgzm.copy_progress WHERE left(task_key, 6) <> 'built:'",
            &[],
        )
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect(),
        // No pgzm schema yet.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            BTreeMap::new()
        }
        Err(e) => panic!("read pgzm.copy_progress: {e}"),
    }
}

/// Polls until at least `n` tasks have committed, the run still going; the records.
async fn wait_for_commits(
    dst: &Client,
    n: usize,
    coordinator: &mut Coordinator,
    agents: &[&AgentProcess],
) -> BTreeMap<String, (String, f64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = committed(dst).await;
        if done.len() >= n {
            return done;
        }
        assert!(
            coordinator.running(),
            "pgzm ended before {n} tasks committed: {}\nagents:\n{}",
            coordinator.log(),
            agent_logs(agents)
        );
        assert!(
            Instant::now() < deadline,
            "{n} tasks did not commit within a minute ({} did): {}",
            done.len(),
            coordinator.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many exports of each task key the source-side agents finished (their `export done`
/// lines, `-v`): how often each task's rows crossed the link in full.
fn exports(sources: &[&AgentProcess]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in sources {
        for line in a.log().lines().filter(|l| l.contains("export done")) {
            let Some(start) = line.find("task=") else {
                continue;
            };
            let rest = &line[start + "task=".len()..];
            let end = rest.find([' ', '}', ',']).unwrap_or(rest.len());
            *counts
                .entry(task_key(rest[..end].trim_matches('"')))
                .or_insert(0) += 1;
        }
    }
    counts
}

/// After the run: the destination holds the source's rows and catalog; every recorded task
/// was finished once by the destination-side agent; the tasks `before` (committed before the
/// trouble) kept the records they wrote then, and their rows crossed the link once.
async fn check_result(
    w: &World,
    report: &serde_json::Value,
    dest_agent: &AgentProcess,
    sources: &[&AgentProcess],
    before: &BTreeMap<String, (String, f64)>,
) -> BTreeMap<String, (String, f64)> {
    let src = socket_client(&w.src, DB).await;
    let dst = socket_client(&w.dst, DB).await;
    assert_migrated(&src, &dst).await;
    let sums = live_sums(&dst).await;
    assert_eq!(sums.len(), TABLES, "{sums:?}");
    assert!(
        sums.values().all(|s| s.rows == ROWS as i64),
        "row counts: {sums:?}"
    );

    let id = report["migration_id"].as_i64().expect("migration_id");
    let (keys, records) = recorded_tasks(&dst, id).await;
    assert_eq!(keys.len(), records, "a task was recorded twice");
    assert!(keys.len() >= 3 * TABLES, "not split into ranges: {keys:?}");
    let finished: Vec<String> = dest_agent
        .finished_tasks()
        .iter()
        .map(|t| task_key(t))
        .collect();
    let distinct: BTreeSet<String> = finished.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        finished.len(),
        "a task was finished twice: {finished:?}"
    );
    assert_eq!(distinct, keys, "the tasks finished are the tasks recorded");

    let after = committed(&dst).await;
    let exported = exports(sources);
    assert_eq!(
        exported.keys().cloned().collect::<BTreeSet<_>>(),
        keys,
        "every task read from a source-side agent"
    );
    for (key, record) in before {
        assert_eq!(
            after.get(key),
            Some(record),
            "the record of {key}, committed before, was rewritten"
        );
        assert_eq!(
            exported.get(key),
            Some(&1),
            "{key} had committed, yet its rows were exported again"
        );
    }
    after
}

/// Lines of `log` containing any of `needles`.
fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .collect()
}

/// The link is cut for 10 s while tasks stream across it: the run rides it out and finishes;
/// what had committed is not copied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_of_the_link_mid_copy_is_ridden_out() {
    let started = Instant::now();
    let Some(w) = World::make("a partition of the link:").await else {
        return;
    };
    let source_agent = w.source_agent().await;
    let dest_agent = w.destination_agent().await;
    let agents = [&source_agent, &dest_agent];
    let mut coordinator = w.coordinator(&agents);
    let dst = socket_client(&w.dst, DB).await;

    let before = wait_for_commits(&dst, 4, &mut coordinator, &agents).await;
    w.regions.cut().expect("cut the link");
    let cut_at = Instant::now();
    // Tasks whose data had all crossed may still commit: the destination is in B.
    let mut during = before.len();
    while cut_at.elapsed() < PARTITION {
        tokio::time::sleep(Duration::from_millis(250)).await;
        during = committed(&dst).await.len();
    }
    w.regions.restore().expect("restore the link");
    let restored_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let restored = Instant::now();

    let (report, log) = coordinator.finish(FINISH_TIMEOUT, &agents).await;
    let finished = restored.elapsed();
    let after = check_result(&w, &report, &dest_agent, &[&source_agent], &before).await;
    // The cut fell in the middle of the copy: tasks were left for after it.
    let resumed = after
        .values()
        .map(|(_, at)| at - restored_at)
        .filter(|d| *d >= 0.0)
        .fold(f64::INFINITY, f64::min);
    assert!(
        resumed.is_finite(),
        "no task committed after the link came back: the cut was not mid-copy"
    );
    eprintln!(
        "partition: {} of {} tasks committed before the cut, {} during it; first commit {resumed:.1} s after the link came back, the run finished {finished:?} after it; retries: {:#?}",
        before.len(),
        after.len(),
        during - before.len(),
        retries(&log)
    );
    eprintln!("partition test: {:?}", started.elapsed());
}

/// The coordinator's log lines about failed attempts (retried, or given to another agent).
fn retries(log: &str) -> Vec<&str> {
    lines_with(
        log,
        &["copy task failed; retrying", "agent failed during a task"],
    )
}

/// The source-side agent (among `agents`, all in A) streaming an export to B right now: the
/// one with a connection on its port whose send queue holds more than 64 KiB (the link is
/// slower than the source). Read from A's TCP table.
async fn exporting_agent(agents: &[&AgentProcess], deadline: Instant) -> usize {
    let table = format!("/proc/{}/net/tcp", agents[0].pid());
    loop {
        let text = std::fs::read_to_string(&table).expect("read A's TCP table");
        // `sl local rem st tx_queue:rx_queue …`, addresses and queues in hex.
        let sending: Vec<u16> = text
            .lines()
            .skip(1)
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
                let tx = u64::from_str_radix(f.get(4)?.split_once(':')?.0, 16).ok()?;
                (f.get(3) == Some(&"01") && tx > 64 << 10).then_some(port)
            })
            .collect();
        if let Some(i) = agents.iter().position(|a| sending.contains(&a.addr.port())) {
            return i;
        }
        assert!(
            Instant::now() < deadline,
            "no source-side agent was exporting; agents:\n{}",
            agent_logs(agents)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two source-side agents in A; one is SIGKILLed while it streams a range across the link:
/// the tasks reading from it are redone from the other one, the run finishes, and what had
/// committed is not copied again. (The loopback version, an executing agent killed, is
/// `failover::an_agent_killed_mid_copy_is_replaced_by_another`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_side_agent_killed_mid_export_is_replaced_across_the_link() {
    let started = Instant::now();
    let Some(w) = World::make("a source-side agent killed across the link:").await else {
        return;
    };
    let mut sources = [w.source_agent().await, w.source_agent().await];
    let dest_agent = w.destination_agent().await;
    let agents = [&sources[0], &sources[1], &dest_agent];
    let mut coordinator = w.coordinator(&agents);
    let dst = socket_client(&w.dst, DB).await;

    let _ = wait_for_commits(&dst, 3, &mut coordinator, &agents).await;
    let victim = exporting_agent(
        &[&sources[0], &sources[1]],
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    // Committed before the kill (a subset of them: more may commit until it lands).
    let before = committed(&dst).await;
    let victim_url = sources[victim].http_url();
    sources[victim].kill().await;
    let killed = Instant::now();

    let agents = [&sources[0], &sources[1], &dest_agent];
    let (report, log) = coordinator.finish(FINISH_TIMEOUT, &agents).await;
    let finished = killed.elapsed();
    let after = check_result(
        &w,
        &report,
        &dest_agent,
        &[&sources[0], &sources[1]],
        &before,
    )
    .await;
    assert!(
        after.len() > before.len(),
        "every task had committed before the kill"
    );
    let survivor = &sources[1 - victim];
    assert!(
        survivor.log().contains("export done"),
        "the surviving source-side agent served no export: {}",
        survivor.log()
    );
    // The dead agent leaves the round robin after its first failures (else every other task
    // would go to it and fail, each failure spending a retry).
    let sidelined = lines_with(&log, &["a source-side agent does not answer"]);
    assert!(
        sidelined.iter().any(|l| l.contains(&victim_url)),
        "the killed agent {victim_url} was not sidelined: {log}"
    );
    let failed = retries(&log);
    assert!(
        failed.len() <= 4,
        "{} failed attempts after one source-side agent died: {failed:#?}",
        failed.len()
    );
    eprintln!(
        "kill: {} of {} tasks committed before the kill; the run finished {finished:?} after it; retries: {failed:#?}",
        before.len(),
        after.len(),
    );
    eprintln!("kill test: {:?}", started.elapsed());
}
