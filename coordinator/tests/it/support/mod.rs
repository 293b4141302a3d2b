//! Helpers shared by the tests that drive the real `pgzm` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use pgzm_tests::TestDb;
use tokio::process::Command;
use tokio_postgres::Client;

/// A scratch working directory for a child process (`pgzm start` writes its migration log file
/// there), removed at the end of the test.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    /// A new, empty directory named after the test.
    pub fn new(label: &str) -> WorkDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("pgzm-test-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create work dir");
        WorkDir(dir)
    }

    /// (file name, text) of every file in the directory, sorted by name.
    pub fn files(&self) -> Vec<(String, String)> {
        files_in(&self.0)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (file name, text) of every file in `dir`, sorted by name.
pub fn files_in(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read work dir")
        .map(|e| {
            let path = e.expect("dir entry").path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into();
            (name, std::fs::read_to_string(&path).unwrap_or_default())
        })
        .collect();
    files.sort();
    files
}

/// The environment variables `pgzm` falls back to.
const FALLBACK_VARS: [&str; 6] = [
    "SOURCE_DATABASE_URL",
    "DEST_DATABASE_URL",
    "DATABASE_URL",
    "PRESERVED_TABLES",
    "PGZM_LOG",
    "PGZM_AGENT_TOKEN",
];

/// Removes [`FALLBACK_VARS`] from `cmd`'s environment, gives it no stdin, and has it killed
/// when the test drops it.
pub fn clean_environment(cmd: &mut Command) {
    for var in FALLBACK_VARS {
        cmd.env_remove(var);
    }
    // libpq's variables of the test's own environment would complete pgzm's strings.
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PG") {
            cmd.env_remove(var);
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
}

/// The `pgzm` binary with a clean environment (none of the variables it falls back to), run in
/// `dir` (where it writes its migration logs), killed when the test drops it.
pub fn pgzm_command(dir: &WorkDir) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgzm"));
    cmd.current_dir(&dir.0);
    clean_environment(&mut cmd);
    cmd
}

/// Runs `cmd`; asserts it succeeded (or failed, per `ok`) and printed nothing containing
/// `secret`. Returns (stdout, stderr).
pub async fn run_checked(
    cmd: &mut Command,
    ok: bool,
    what: &str,
    secret: &str,
) -> (String, String) {
    let out = cmd.output().await.expect("run pgzm");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.success(),
        ok,
        "{what}: exit status {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "{what}: the password was printed"
    );
    (stdout, stderr)
}

/// Process output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The one JSON document of a `--json` run's stdout (`what` names the run in failures).
pub fn one_json(what: &str, stdout: &str) -> serde_json::Value {
    let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_str(stdout)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}): {stdout}"));
    assert_eq!(docs.len(), 1, "{what}: one document: {stdout}");
    docs.into_iter().next().expect("document")
}

/// The simple fixture: source data on the source server, "production" data on the other.
pub async fn simple_pair(label: &str) -> (TestDb, TestDb) {
    pgzm_tests::fixture_pair(label, "simple")
        .await
        .expect("load the simple fixture")
}

/// The one `bigint` that `sql` (a query without parameters) returns.
pub async fn query_i64(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A test server URL with `secret` as the password (the test servers trust every local
/// connection, so it is accepted and ignored — and must never be printed).
pub fn with_password(url: &str, secret: &str) -> String {
    let with = url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{secret}@"),
        1,
    );
    assert_ne!(with, url, "unexpected test URL form: {url}");
    with
}
