//! Shared setup of the distributed tests: real `pgzm-agent` processes on loopback (killed when
//! their guard drops, even when a test panics), database pairs loaded with fixtures, the
//! coordinator's options and agent settings, and checks on the migrated databases.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgzm_agent::peer::PeerConnector;
use pgzm_coordinator::agents::{AgentPool, AgentSettings};
use pgzm_coordinator::conninfo::DbUrl;
use pgzm_coordinator::migrate::StartOptions;
use pgzm_coordinator::swap::SwapSettings;
use pgzm_tests::inspect::{self, TableChecksum};
use pgzm_tests::netns::Netns;
use pgzm_tests::{PgCluster, TestDb};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::Client;

pub mod pki;

/// How long an agent gets to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `pgzm-agent` child process. Dropping it SIGKILLs the process; the child also
/// gets SIGKILL when the thread that spawned it exits (`PR_SET_PDEATHSIG`), so an aborted test
/// run leaves no agent behind.
pub struct AgentProcess {
    child: Child,
    /// The address it listens on.
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

/// Environment variables an agent must not inherit from the test's environment.
const SCRUBBED_ENV: [&str; 4] = [
    "PGZM_AGENT_TOKEN",
    "PGZM_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

fn agent_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    child_command(Command::new(env!("CARGO_BIN_EXE_pgzm-agent")), args, env)
}

/// `cmd ARGS` with the settings of every child of these tests: piped output, no inherited
/// agent, telemetry or libpq settings, killed with its guard and with the thread that spawned
/// it.
pub fn child_command(mut cmd: Command, args: &[&str], env: &[(&str, &str)]) -> Command {
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    // libpq's variables of the test's own environment would complete the agents' strings.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PG") {
            cmd.env_remove(var);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Appends every line of `pipe` to `log` until it closes.
pub fn drain(pipe: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
}

impl AgentProcess {
    /// Starts `pgzm-agent --listen 127.0.0.1:0 ARGS` and waits for its `listening on` line.
    pub async fn start(args: &[&str]) -> AgentProcess {
        Self::start_with_env(args, &[]).await
    }

    /// [`AgentProcess::start`] with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        Self::spawn(&all, env).await
    }

    /// Starts `pgzm-agent ARGS` (which must contain `--listen`) and waits for its
    /// `listening on` line; panics with the agent's stderr when it exits instead.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        Self::spawn_command(agent_command(args, env), args).await
    }

    /// [`AgentProcess::spawn`] inside the network namespace `ns` (`ip netns exec`, which execs
    /// the agent: the child's pid is the agent's).
    pub async fn spawn_in(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> AgentProcess {
        let cmd = Command::from(ns.command(env!("CARGO_BIN_EXE_pgzm-agent")));
        Self::spawn_command(child_command(cmd, args, env), args).await
    }

    async fn spawn_command(mut cmd: Command, args: &[&str]) -> AgentProcess {
        let mut child = cmd.spawn().expect("spawn pgzm-agent");
        let log = Arc::new(Mutex::new(String::new()));
        drain(child.stderr.take().expect("stderr"), Arc::clone(&log));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = loop {
            let line = tokio::time::timeout_at(deadline.into(), stdout.next_line()).await;
            match line {
                Ok(Ok(Some(line))) => {
                    {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        log.push_str(&line);
                        log.push('\n');
                    }
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        break addr.trim().parse().expect("listen address");
                    }
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let status = child.wait().await.expect("wait for pgzm-agent");
                    tokio::task::yield_now().await;
                    panic!(
                        "pgzm-agent {args:?} exited ({status}) before listening: {}",
                        log.lock().unwrap_or_else(|p| p.into_inner())
                    );
                }
                Err(_) => panic!(
                    "pgzm-agent {args:?} printed no `listening on` line within {START_TIMEOUT:?}: {}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                ),
            }
        };
        let out_log = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                let mut log = out_log.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        AgentProcess { child, addr, log }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Everything the agent wrote to stderr (and stdout) so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the agent writes `needle` within 10 s: its output reaches [`AgentProcess::log`]
    /// through a pipe read by another task, so a line logged just before an answer may arrive
    /// after it.
    pub async fn logs_soon(&self, needle: &str) -> bool {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Waits for the agent to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("wait for pgzm-agent")
    }

    /// SIGKILLs the agent and reaps it.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL pgzm-agent");
    }

    /// Task ids (`m…/KEY/aN`) of the copy tasks this agent finished, from its debug log (the
    /// agent must run with `-v`).
    pub fn finished_tasks(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("copy task done"))
            .filter_map(|l| {
                let start = l.find("task=")? + "task=".len();
                let rest = &l[start..];
                let end = rest.find([' ', '}', ',']).unwrap_or(rest.len());
                Some(rest[..end].trim_matches('"').to_string())
            })
            .collect()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Runs `pgzm-agent ARGS` to its exit (bounded), returning its exit code and stderr.
pub async fn run_agent_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let child = agent_command(args, &[]).spawn().expect("spawn pgzm-agent");
    let out = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("pgzm-agent {args:?} did not exit"))
        .expect("wait for pgzm-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The task key of a task id `m<migration>/<key>/a<attempt>` (as a log line quotes it: keys
/// are quoted table names, their `"` escaped).
pub fn task_key(task_id: &str) -> String {
    let task_id = task_id.replace("\\\"", "\"");
    let task_id = task_id.as_str();
    let without_migration = task_id.split_once('/').map_or(task_id, |(_, r)| r);
    without_migration
        .rsplit_once("/a")
        .map_or(without_migration, |(k, _)| k)
        .to_string()
}

/// A source database and a destination database, on two distinct servers.
pub struct Pair {
    /// The rebuilt data set.
    pub source: TestDb,
    /// "Production".
    pub dest: TestDb,
}

/// Creates a pair on the shared clusters loaded with `fixture` (`schema.sql` on both,
/// `source_data.sql` on the source, `dest_data.sql` on the destination).
pub async fn fixture_pair(label: &str, fixture: &str) -> Pair {
    let (src_cluster, dst_cluster) = PgCluster::shared_pair();
    fixture_pair_on(src_cluster, dst_cluster, label, fixture).await
}

/// [`fixture_pair`] on the given clusters.
pub async fn fixture_pair_on(
    src_cluster: &PgCluster,
    dst_cluster: &PgCluster,
    label: &str,
    fixture: &str,
) -> Pair {
    let (source, dest) = pgzm_tests::fixture_pair_on(src_cluster, dst_cluster, label, fixture)
        .await
        .unwrap_or_else(|e| panic!("load fixture {fixture}: {e}"));
    Pair { source, dest }
}

/// SQL creating the source-only table `big`: no defaults, constraints or indexes (so planning
/// takes no lock on it), ~1.3 MB of rows, analyzed so its `relpages` is known.
pub const BIG_TABLE: &str = "
CREATE TABLE big (id int, payload text);
INSERT INTO big SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 12000) g;
ANALYZE big;";

/// Copy tasks' page-range size that splits `big` into several ranges.
pub const SMALL_RANGES: i64 = 128 << 10;

/// The coordinator's options for `source`/`dest` URLs (what `pgzm start` builds from its flags).
pub fn options_for(source: &str, dest: &str) -> StartOptions {
    StartOptions {
        jobs: 2,
        swap: SwapSettings {
            lock_timeout: Duration::from_millis(50),
            total_timeout: Duration::from_secs(10),
            kill_blockers_after: None,
        },
        copy_retries: 1,
        ..StartOptions::new(
            DbUrl::parse(source, "source").expect("source url"),
            DbUrl::parse(dest, "destination").expect("dest url"),
        )
    }
}

/// Options for a pair, with the superuser URLs of the harness.
pub fn options(p: &Pair) -> StartOptions {
    options_for(&p.source.url(), &p.dest.url())
}

/// Agent settings: these URLs, plaintext, no token, coordinator-sent connection strings.
pub fn settings<S: AsRef<str>>(urls: &[S]) -> AgentSettings {
    AgentSettings {
        urls: urls.iter().map(|u| u.as_ref().to_string()).collect(),
        connector: PeerConnector::default(),
        source_database: None,
        destination_database: None,
    }
}

/// Connects a pool, panicking with the error.
pub async fn pool(settings: &AgentSettings) -> AgentPool {
    match AgentPool::connect(settings).await {
        Ok(p) => p,
        Err(e) => panic!("connect to agents {:?}: {e}", settings.urls),
    }
}

/// The error of a pool connection that must fail.
pub async fn pool_error(settings: &AgentSettings) -> String {
    match AgentPool::connect(settings).await {
        Ok(_) => panic!("agents {:?} were accepted", settings.urls),
        Err(e) => e.to_string(),
    }
}

/// Checksums of the live tables (`shadow_*` and `backup_*` left out).
pub async fn live_sums(client: &Client) -> BTreeMap<String, TableChecksum> {
    inspect::table_checksums(client)
        .await
        .expect("table checksums")
        .into_iter()
        .filter(|(name, _)| !name.starts_with("shadow_") && !name.starts_with("backup_"))
        .collect()
}

/// Asserts that the destination's live tables now hold exactly the source's rows and have
/// its catalog, that foreign keys hold and that no `shadow_` table is left.
pub async fn assert_migrated(src: &Client, dst: &Client) {
    let src_sums = live_sums(src).await;
    let dst_sums = live_sums(dst).await;
    assert_eq!(
        dst_sums, src_sums,
        "destination rows differ from the source's"
    );
    let src_sig = inspect::catalog_signature(src, None).await.expect("sig");
    let dst_sig = inspect::catalog_signature(dst, None).await.expect("sig");
    let diff = src_sig.differences(&dst_sig);
    assert!(diff.is_empty(), "catalogs differ:\n{}", diff.join("\n"));
    let orphans = inspect::fk_orphans(dst).await.expect("fk orphans");
    assert!(orphans.is_empty(), "{orphans:?}");
    let shadows: Vec<String> = inspect::tables(dst)
        .await
        .expect("tables")
        .into_iter()
        .filter(|t| t.starts_with("shadow_"))
        .collect();
    assert!(shadows.is_empty(), "shadow tables left: {shadows:?}");
}

/// Whether the destination has a `pgzm` schema (i.e. a run has changed it).
pub async fn has_pgzm_schema(client: &Client) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgzm')",
            &[],
        )
        .await
        .expect("look for schema pgzm")
        .get(0)
}

/// Every relation and type in `public`, as `kind:name`, sorted: a "nothing changed" check.
pub async fn public_objects(client: &Client) -> Vec<String> {
    client
        .query(
            "SELECT c.relkind::text || ':' || c.relname::text FROM pg_class c
             WHERE c.relnamespace = 'public'::regnamespace
             UNION ALL
             SELECT 'type:' || t.typname::text FROM pg_type t
             WHERE t.typnamespace = 'public'::regnamespace
             ORDER BY 1",
            &[],
        )
        .await
        .expect("list public objects")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The task keys recorded in `pgzm.copy_progress` for `migration_id`, and how many rows
/// (records) there are.
pub async fn recorded_tasks(client: &Client, migration_id: i64) -> (BTreeSet<String>, usize) {
    let rows = client
        .query(
            // Copy tasks' records, not the tables' `built:` markers.
            "SELECT task_key FROM pgzm.copy_progress WHERE migration_id = $1 AND left(task_key, 6) <> 'built:'",
            &[&migration_id],
        )
        .await
        .expect("read pgzm.copy_progress");
    let keys: BTreeSet<String> = rows.iter().map(|r| r.get(0)).collect();
    (keys, rows.len())
}

/// The task keys recorded for `migration_id` of the TES fixture plus `big`; asserts that every
/// task was recorded once and that `big` went in several page ranges.
pub async fn recorded_tes_and_big(client: &Client, migration_id: i64) -> BTreeSet<String> {
    let (keys, records) = recorded_tasks(client, migration_id).await;
    assert_eq!(keys.len(), records, "a task key was recorded twice");
    let big_ranges = keys.iter().filter(|k| k.contains("/p")).count();
    assert!(big_ranges >= 3, "big was not split: {keys:?}");
    assert_eq!(keys.len(), 15 + big_ranges, "{keys:?}");
    keys
}

/// Connects to `url` without TLS.
pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process among `pids` that owns the TCP socket `127.0.0.1:local_port` connected to
/// `remote_port` (from `/proc/net/tcp` and the processes' open file descriptors).
pub fn pid_of_connection(local_port: u16, remote_port: u16, pids: &[u32]) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && port_of(f[1]) == Some(local_port) && port_of(f[2]) == Some(remote_port))
            .then(|| f[9].to_string())
    })?;
    let wanted = format!("socket:[{inode}]");
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(Result::ok).any(|fd| {
                    std::fs::read_link(fd.path())
                        .map(|l| l.to_string_lossy() == wanted)
                        .unwrap_or(false)
                })
            })
            .unwrap_or(false)
    })
}
