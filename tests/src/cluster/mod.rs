//! Throwaway PostgreSQL clusters: `initdb` into a temp dir, a `postgres` child on a free
//! loopback port, torn down on drop (or at process exit for the shared ones).

mod binaries;
mod process;
mod shared;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use process::{Postmaster, RunAs};

use crate::error::one_line;
use crate::HarnessError;

/// Loopback address every cluster listens on.
const HOST: &str = "127.0.0.1";
/// Superuser created by initdb.
const SUPERUSER: &str = "postgres";
/// How long to wait for a new server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How many free ports to try when another process grabs ours first.
const PORT_ATTEMPTS: usize = 5;
/// Prefix of the temp dirs; `pgzm-<pid>-<id>` lets a later run sweep dirs of dead processes.
const DIR_PREFIX: &str = "pgzm-";

/// A running PostgreSQL server in its own temp directory, stopped and deleted on drop.
///
/// Use [`PgCluster::shared`] / [`PgCluster::shared_pair`] in tests; [`PgCluster::start`] gives
/// a private cluster whose lifetime the caller controls.
pub struct PgCluster {
    bindir: PathBuf,
    dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    postmaster: Postmaster,
    cleaned: AtomicBool,
}

impl std::fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("pid", &self.postmaster.pid())
            .finish()
    }
}

/// The bin directory [`PgCluster::start`] would use (`$PG_BINDIR`, `pg_config --bindir`, or the
/// highest-numbered `/usr/lib/postgresql/*/bin`).
pub fn default_bindir() -> Result<PathBuf, HarnessError> {
    binaries::find_bindir()
}

impl PgCluster {
    /// Creates and starts a new cluster: finds the binaries, runs initdb (as an unprivileged
    /// user when we are root), starts `postgres` on a free port and waits until it answers.
    ///
    /// Blocks for a second or two; safe to call from inside a tokio runtime. If start-up fails
    /// after the temp dir was made, the dir is left for inspection (see the error) and removed
    /// by the first harness run after this process exits.
    pub fn start() -> Result<PgCluster, HarnessError> {
        Self::start_with(binaries::find_bindir()?)
    }

    /// [`PgCluster::start`] with the server binaries of `bindir` (another PostgreSQL version
    /// than the default, for cross-version pairs).
    pub fn start_with(bindir: PathBuf) -> Result<PgCluster, HarnessError> {
        Self::start_configured(bindir, &[])
    }

    /// [`PgCluster::start`] with extra server settings (`name=value`, passed as `-c`, after
    /// and so over the defaults): for settings only a restart changes, such as
    /// `max_locks_per_transaction`, which a schema of thousands of tables needs raised.
    pub fn start_with_settings(settings: &[String]) -> Result<PgCluster, HarnessError> {
        Self::start_configured(binaries::find_bindir()?, settings)
    }

    fn start_configured(bindir: PathBuf, settings: &[String]) -> Result<PgCluster, HarnessError> {
        let run_as = process::server_identity()?;
        sweep_stale_dirs();
        let dir = make_temp_dir(run_as)?;
        // On failure the directory is kept so the log named in the error can be read; a later
        // run sweeps it once this process is gone.
        let data_dir = dir.join("data");
        initdb(&bindir, &dir, &data_dir, run_as)?;
        Self::launch(bindir, dir, data_dir, run_as, settings)
    }

    /// A streaming standby of `primary`: a base backup of it (`pg_basebackup -R`, from its bin
    /// directory or the default one), started on a port of its own. Read-only; its replay can
    /// be paused (`pg_wal_replay_pause()`) to make it lag.
    pub fn standby_of(primary: &PgCluster) -> Result<PgCluster, HarnessError> {
        let run_as = process::server_identity()?;
        let dir = make_temp_dir(run_as)?;
        let data_dir = dir.join("data");
        let tool = Some(primary.bindir.join("pg_basebackup"))
            .filter(|p| p.is_file())
            .or_else(|| {
                binaries::find_bindir()
                    .ok()
                    .map(|d| d.join("pg_basebackup"))
                    .filter(|p| p.is_file())
            })
            .ok_or(HarnessError::BinariesNotFound {
                searched: "pg_basebackup, for a standby".into(),
            })?;
        let mut cmd = Command::new(&tool);
        cmd.args(["-h", HOST, "-p", &primary.port.to_string(), "-U", SUPERUSER])
            .arg("-D")
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"])
            .current_dir(&dir)
            .stdin(Stdio::null());
        process::configure(&mut cmd, run_as, false);
        let out = cmd
            .output()
            .map_err(|e| HarnessError::io(format!("run {}", tool.display()), e))?;
        if !out.status.success() {
            return Err(HarnessError::io(
                "pg_basebackup",
                std::io::Error::other(one_line(&String::from_utf8_lossy(&out.stderr))),
            ));
        }
        Self::launch(primary.bindir.clone(), dir, data_dir, run_as, &[])
    }

    /// Starts `postgres` on `data_dir` on a free port and waits until it answers.
    fn launch(
        bindir: PathBuf,
        dir: PathBuf,
        data_dir: PathBuf,
        run_as: RunAs,
        extra: &[String],
    ) -> Result<PgCluster, HarnessError> {
        let log_path = dir.join("postgres.log");
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let log_offset = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let cmd = postgres_command(&bindir, &dir, &data_dir, &log_path, port, run_as, extra)?;
            let postmaster = Postmaster::spawn(cmd, format!("postmaster-{port}"))?;
            match wait_ready(port, &postmaster, &log_path) {
                Ok(()) => {
                    return Ok(PgCluster {
                        bindir,
                        dir,
                        log_path,
                        port,
                        postmaster,
                        cleaned: AtomicBool::new(false),
                    })
                }
                Err(e) => {
                    postmaster.stop();
                    let clash = matches!(e, HarnessError::ServerExited { .. })
                        && port_clash(&log_path, log_offset);
                    if !clash {
                        return Err(e);
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            HarnessError::io(
                "start postgres",
                std::io::Error::other("no port attempt made"),
            )
        }))
    }

    /// The TCP port the server listens on (on [`Self::host`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: always `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// A connection URL for `dbname` as the trust-authenticated superuser `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            encode_path_segment(dbname)
        )
    }

    /// A key-value connection string for `dbname` through the server's unix socket, which
    /// reaches it from any network namespace (see [`crate::netns`]).
    pub fn socket_conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname='{}'",
            self.dir.display(),
            self.port,
            dbname.replace('\\', "\\\\").replace('\'', "\\'")
        )
    }

    /// The directory holding the server binaries this cluster runs (`initdb`, `postgres`,
    /// `pg_dump`, `psql`, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server log (stdout and stderr of the postmaster).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The cluster's temp directory (data dir, unix socket, logs); deleted when stopped.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// From now on the server accepts TCP connections only with a password (SCRAM; local
    /// socket connections stay trusted) and logs every connection; the superuser `postgres`
    /// gets `admin_password`. Returns once a password-less TCP connection is refused.
    pub async fn require_passwords(&self, admin_password: &str) -> Result<(), HarnessError> {
        let url = self.url("postgres");
        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| HarnessError::sql("connect as the superuser", &e))?;
        tokio::spawn(connection);
        for sql in [
            format!(
                "ALTER ROLE postgres PASSWORD '{}'",
                admin_password.replace('\'', "''")
            ),
            "ALTER SYSTEM SET log_connections = on".to_string(),
        ] {
            admin
                .batch_execute(&sql)
                .await
                .map_err(|e| HarnessError::sql("secure the cluster", &e))?;
        }
        fs::write(
            self.dir.join("data").join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n",
        )
        .map_err(|e| HarnessError::io("write pg_hba.conf", e))?;
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(|e| HarnessError::sql("reload", &e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_ok()
        {
            if Instant::now() > deadline {
                return Err(HarnessError::io(
                    "require passwords",
                    std::io::Error::other(
                        "the server still accepts connections without a password",
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The last `lines` lines of the server log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        read_log_tail(&self.log_path, 0, lines)
    }

    /// Stops the server and removes the temp dir. Idempotent; used by `Drop` and at exit.
    pub(crate) fn shutdown(&self) {
        self.postmaster.stop();
        if !self.cleaned.swap(true, Ordering::SeqCst) {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("pgzm-tests: remove {}: {e}", self.dir.display());
                }
            }
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates `<tmp>/pgzm-<pid>-<id>` with mode 0700, owned by the server user.
fn make_temp_dir(run_as: RunAs) -> Result<PathBuf, HarnessError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir =
        std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{}", std::process::id(), &id[..12]));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| HarnessError::io(format!("create temp dir {}", dir.display()), e))?;
    if run_as.switch {
        std::os::unix::fs::chown(&dir, Some(run_as.uid), Some(run_as.gid)).map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            HarnessError::io(format!("chown temp dir {}", dir.display()), e)
        })?;
    }
    Ok(dir)
}

/// Best effort: removes temp dirs left by test processes that died without cleaning up
/// (their postmasters were already stopped by the parent-death signal).
fn sweep_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = stale_dir_pid(&name) else {
            continue;
        };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// The pid in a directory name made by [`make_temp_dir`] (`pgzm-<pid>-<12 hex>`), if it is one.
fn stale_dir_pid(name: &str) -> Option<u32> {
    let (pid, id) = name.strip_prefix(DIR_PREFIX)?.split_once('-')?;
    let is_id = id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| pid.parse().ok()).flatten()
}

/// Runs initdb, first with the C.UTF-8 locale, then with `--no-locale` if that fails.
fn initdb(bindir: &Path, dir: &Path, data_dir: &Path, run_as: RunAs) -> Result<(), HarnessError> {
    let mut failure = None;
    for locale_args in [&["--locale=C.UTF-8"][..], &["--no-locale"][..]] {
        let _ = fs::remove_dir_all(data_dir);
        let mut cmd = Command::new(bindir.join("initdb"));
        cmd.arg("-D")
            .arg(data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .args(locale_args)
            .current_dir(dir)
            .stdin(Stdio::null());
        process::configure(&mut cmd, run_as, false);
        let out = cmd
            .output()
            .map_err(|e| HarnessError::io(format!("run {}", bindir.join("initdb").display()), e))?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        failure = Some(HarnessError::Initdb {
            data_dir: data_dir.to_path_buf(),
            status: out.status.to_string(),
            output: one_line(&text),
        });
    }
    Err(failure.unwrap_or(HarnessError::NoUnprivilegedUser))
}

/// A port that was free a moment ago (the OS picks it for a bind to port 0).
fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((HOST, 0))
        .map_err(|e| HarnessError::io("bind 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("read the port of a bound socket", e))
}

/// The `postgres` command line: settings for speed, then `extra`, logging to `log_path`.
fn postgres_command(
    bindir: &Path,
    dir: &Path,
    data_dir: &Path,
    log_path: &Path,
    port: u16,
    run_as: RunAs,
    extra: &[String],
) -> Result<Command, HarnessError> {
    let log = File::options()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| HarnessError::io(format!("open server log {}", log_path.display()), e))?;
    let log_err = log
        .try_clone()
        .map_err(|e| HarnessError::io("duplicate the server log handle", e))?;
    if run_as.switch {
        let _ = std::os::unix::fs::chown(log_path, Some(run_as.uid), Some(run_as.gid));
    }
    let settings = [
        format!("listen_addresses={HOST}"),
        format!("unix_socket_directories={}", dir.display()),
        "fsync=off".into(),
        "synchronous_commit=off".into(),
        "full_page_writes=off".into(),
        "max_connections=200".into(),
        "shared_buffers=128MB".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
    ];
    let mut cmd = Command::new(bindir.join("postgres"));
    cmd.arg("-D").arg(data_dir).arg("-p").arg(port.to_string());
    for setting in settings.iter().chain(extra) {
        cmd.arg("-c").arg(setting);
    }
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    process::configure(&mut cmd, run_as, true);
    Ok(cmd)
}

/// Polls a real connection until the server answers `SELECT 1`, the postmaster exits, or
/// [`READY_TIMEOUT`] passes. Runs its own runtime on a scoped thread, so it works whether or
/// not the caller is inside a tokio runtime.
fn wait_ready(port: u16, postmaster: &Postmaster, log_path: &Path) -> Result<(), HarnessError> {
    let url = format!("postgres://{SUPERUSER}@{HOST}:{port}/postgres?connect_timeout=2");
    let deadline = Instant::now() + READY_TIMEOUT;
    let poll = || -> Result<(), HarnessError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::io("build a runtime to poll the new server", e))?;
        rt.block_on(async {
            loop {
                if let Some(status) = postmaster.exit_status() {
                    return Err(HarnessError::ServerExited {
                        status: status.to_string(),
                        log: log_path.to_path_buf(),
                        tail: read_log_tail(log_path, 0, 15),
                    });
                }
                if probe(&url).await {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(HarnessError::ServerNotReady {
                        port,
                        seconds: READY_TIMEOUT.as_secs(),
                        log: log_path.to_path_buf(),
                        tail: read_log_tail(log_path, 0, 15),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    std::thread::scope(|s| s.spawn(poll).join()).unwrap_or_else(|_| {
        Err(HarnessError::io(
            "poll the new server",
            std::io::Error::other("the polling thread panicked"),
        ))
    })
}

/// One readiness probe: connect and run `SELECT 1`, bounded to a few seconds.
async fn probe(url: &str) -> bool {
    let attempt = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(connection);
        let result = client.simple_query("SELECT 1").await.map(|_| ());
        drop(client);
        let _ = conn.await;
        result
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(()))
    )
}

/// Whether the log written since `offset` says the port was taken.
fn port_clash(log_path: &Path, offset: u64) -> bool {
    let text = read_log_tail(log_path, offset, 50);
    text.contains("could not bind") || text.contains("Address already in use")
}

/// The last `lines` lines of the log from byte `offset` on, joined into one line.
fn read_log_tail(log_path: &Path, offset: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = File::open(log_path).and_then(|mut f| {
        f.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(e) = read {
        return format!("(server log unreadable: {e})");
    }
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    if tail.is_empty() {
        "(server log is empty)".to_string()
    } else {
        tail.join(" | ")
    }
}

/// Percent-encodes a database name for the path part of a URL.
fn encode_path_segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
