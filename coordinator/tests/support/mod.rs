//! Helpers shared by the tests that drive the real `pgzm` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

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

/// The `pgzm` binary with a clean environment (none of the variables it falls back to), run in
/// `dir` when given, killed when the test drops it.
pub fn pgzm_command(dir: Option<&WorkDir>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgzm"));
    if let Some(dir) = dir {
        cmd.current_dir(&dir.0);
    }
    for var in [
        "SOURCE_DATABASE_URL",
        "DEST_DATABASE_URL",
        "DATABASE_URL",
        "PRESERVED_TABLES",
        "PGZM_LOG",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
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
