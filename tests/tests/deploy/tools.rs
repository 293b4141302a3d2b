//! The external tools the deploy checks run, found or failed for with an install hint (never
//! skipped: a check without its tool would pass vacuously), and the small helpers around them:
//! the checkout's root, running a command, reading YAML.
//!
//! `./dev/test` and `.ci/run` install the tools first (`ensure_deploy_tools` in dev/lib.sh):
//! kubectl and systemd-analyze from Debian's packages, kubernetes-validate from PyPI into a
//! virtualenv outside the checkout, named by `$PGZM_DEPLOY_VENV` (default
//! [`DEFAULT_VENV`]). That virtualenv's Python, which has PyYAML (a dependency of
//! kubernetes-validate), also parses the YAML files for these checks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The virtualenv `ensure_deploy_tools` installs kubernetes-validate into, unless
/// `$PGZM_DEPLOY_VENV` names another.
pub const DEFAULT_VENV: &str = "/var/tmp/pgzm-venv";

/// The kubernetes-validate release the checks expect (pinned in dev/lib.sh too).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// How to get every tool at once.
const INSTALL_ALL: &str =
    "run ./dev/test (or `. dev/lib.sh && ensure_deploy_tools` from the repository root), which installs the deploy checks' tools";

/// The repository root (the parent of the pgzm-tests crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the pgzm-tests crate has a parent directory")
        .to_path_buf()
}

/// The virtualenv holding kubernetes-validate (and PyYAML).
pub fn venv() -> PathBuf {
    std::env::var_os("PGZM_DEPLOY_VENV")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_VENV), PathBuf::from)
}

/// `kubernetes-validate` of the virtualenv, at the pinned version.
pub fn kubernetes_validate() -> PathBuf {
    let tool = venv().join("bin/kubernetes-validate");
    assert!(
        tool.is_file(),
        "kubernetes-validate not found at {} (virtualenv: $PGZM_DEPLOY_VENV, default {DEFAULT_VENV}): {INSTALL_ALL}, \
         or: python3 -m venv {venv} && {venv}/bin/pip install kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}",
        tool.display(),
        venv = venv().display(),
    );
    let version = run_ok(
        Command::new(&tool).arg("--version"),
        "kubernetes-validate --version",
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        KUBERNETES_VALIDATE_VERSION,
        "{} is not the pinned kubernetes-validate: {INSTALL_ALL} (the pin is in dev/lib.sh and tests/tests/deploy/tools.rs)",
        tool.display()
    );
    tool
}

/// `kubectl` (with its built-in kustomize): `$PGZM_KUBECTL`, else the one on `PATH`.
pub fn kubectl() -> PathBuf {
    find_tool(
        "PGZM_KUBECTL",
        "kubectl",
        "Debian's package kubernetes-client (apt-get install kubernetes-client)",
    )
}

/// `systemd-analyze` on `PATH`.
pub fn systemd_analyze() -> PathBuf {
    find_tool(
        "PGZM_SYSTEMD_ANALYZE",
        "systemd-analyze",
        "Debian's package systemd (apt-get install systemd)",
    )
}

/// `$var` when set, else `name` on `PATH`; fails with how to install it.
fn find_tool(var: &str, name: &str, package: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "${var}={} does not exist", path.display());
        return path;
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} not found on PATH (or ${var}): install {package}; or {INSTALL_ALL}")
    })
}

/// Runs `command`, which must succeed; the failure names `what` and shows its output.
pub fn run_ok(command: &mut Command, what: &str) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `command` with `input` on its standard input; returns its output, whatever its status.
pub fn run_with_input(command: &mut Command, input: &[u8], what: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    // Written from another thread: the child may fill its output pipes before reading it all.
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    writer
        .join()
        .expect("stdin writer")
        .unwrap_or_else(|e| panic!("{what}: write its input: {e}"));
    output
}

/// The documents of a YAML stream (empty ones left out), as JSON values, parsed by PyYAML's
/// safe loader (merge keys `<<:` included) in the virtualenv's Python. `what` names the input
/// in errors.
pub fn yaml_documents(yaml: &str, what: &str) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
         json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
    let python = venv().join("bin/python");
    assert!(
        python.is_file(),
        "{} not found (the deploy checks read YAML with the Python of kubernetes-validate's virtualenv): {INSTALL_ALL}",
        python.display()
    );
    let output = run_with_input(
        Command::new(&python).args(["-c", SCRIPT]),
        yaml.as_bytes(),
        &format!("parse {what} as YAML"),
    );
    assert!(
        output.status.success(),
        "parse {what} as YAML: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    match serde_json::from_slice(&output.stdout).expect("the YAML parser prints JSON") {
        Value::Array(documents) => documents,
        other => panic!("parse {what} as YAML: expected a list of documents, got {other}"),
    }
}

/// The YAML documents of a file of the repository (`path` relative to its root).
pub fn yaml_file(path: &str) -> Vec<Value> {
    yaml_documents(&read(path), path)
}

/// A text file of the repository (`path` relative to its root).
pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}
