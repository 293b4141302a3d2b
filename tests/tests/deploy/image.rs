//! The container image builds, proven without Docker (no engine runs in CI, and no registry is
//! reachable): the build context is assembled from the checkout exactly as
//! `deploy/Dockerfile.dockerignore` filters it, every `COPY` source of `deploy/Dockerfile` must
//! be in it, and the build stage's tree (what those `COPY`s bring) is laid out at
//! [`STAGE_DIR`] and built with `cargo build --locked --offline --bin pgzm --bin pgzm-agent`,
//! as the Dockerfile's `RUN` does (debug profile: what is checked is that the sources are
//! complete, not the optimiser).
//!
//! [`STAGE_DIR`] is a stable path, synced on every run (files no longer there are removed, the
//! others rewritten only when their content changed), and the build has its own persistent
//! target directory [`TARGET_DIR`]: after the first run the build is incremental. A lock file
//! serialises concurrent runs. The binaries it makes are the ones the other deploy checks run
//! (`--help`, the systemd unit's `ExecStart`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

use crate::dockerfile::{join_abs, Dockerfile};
use crate::dockerignore::DockerIgnore;
use crate::tools::{repo_root, yaml_file};

/// The Dockerfile, relative to the repository root (the build context).
pub const DOCKERFILE: &str = "deploy/Dockerfile";
/// Its context filter (BuildKit reads `<Dockerfile>.dockerignore` before a root `.dockerignore`).
pub const DOCKERIGNORE: &str = "deploy/Dockerfile.dockerignore";
/// The stage that compiles the binaries.
const BUILD_STAGE: &str = "build";
/// Where the build stage's working directory is laid out (stable, so builds stay incremental).
pub const STAGE_DIR: &str = "/var/tmp/pgzm-docker-context";
/// The target directory of builds in [`STAGE_DIR`].
pub const TARGET_DIR: &str = "/var/tmp/pgzm-docker-target";
/// The binaries the image carries.
const BINARIES: [&str; 2] = ["pgzm", "pgzm-agent"];

/// The binaries built from the image's build stage.
#[derive(Debug)]
pub struct Built {
    /// The coordinator, `pgzm`.
    pub pgzm: PathBuf,
    /// The agent, `pgzm-agent`.
    pub agent: PathBuf,
}

/// Builds the image's binaries once per test process (the first caller waits for the build).
pub fn built() -> &'static Built {
    static BUILT: OnceLock<Result<Built, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(built) => built,
        Err(message) => panic!("{message}"),
    }
}

/// The build context: the checkout's files that the ignore file lets through.
struct Context {
    /// Files of the checkout (tracked by git, or untracked and not ignored by git).
    checkout: BTreeSet<String>,
    /// Those the ignore file lets through.
    files: BTreeSet<String>,
    ignore: DockerIgnore,
}

impl Context {
    fn assemble() -> Result<Context, String> {
        let root = repo_root();
        let ignore = DockerIgnore::parse(
            &fs::read_to_string(root.join(DOCKERIGNORE))
                .map_err(|e| format!("read {DOCKERIGNORE}: {e}"))?,
        );
        let checkout = checkout_files(&root)?;
        let files = checkout
            .iter()
            .filter(|f| !ignore.excludes(f))
            .cloned()
            .collect();
        Ok(Context {
            checkout,
            files,
            ignore,
        })
    }

    /// The context's files at `path`: the file itself, or those below the directory.
    fn files_at<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a String> + 'a {
        let prefix = format!("{path}/");
        self.files
            .iter()
            .filter(move |f| *f == path || f.starts_with(&prefix) || path.is_empty())
    }

    /// Why `path` is not in the context.
    fn why_missing(&self, path: &str) -> String {
        let prefix = format!("{path}/");
        let in_checkout = self
            .checkout
            .iter()
            .find(|f| *f == path || f.starts_with(&prefix));
        match in_checkout {
            None => "no such file or directory in the checkout".to_string(),
            Some(file) => match self.ignore.deciding(file) {
                Some(p) => format!(
                    "{DOCKERIGNORE} line {} (`{}`) leaves it out",
                    p.line, p.text
                ),
                None => format!("{file} is in the checkout but not in the context"),
            },
        }
    }
}

/// The checkout's files, relative to `root`: tracked by git or untracked and not ignored by
/// git, and present on disk.
fn checkout_files(root: &Path) -> Result<BTreeSet<String>, String> {
    let output = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(root)
        .output()
        .map_err(|e| format!("run git ls-files in {}: {e}", root.display()))?;
    if !output.status.success() {
        return Err(format!(
            "git ls-files in {}: {}",
            root.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .filter(|p| root.join(p).is_file())
        .collect())
}

/// The build stage's working directory as its `COPY`s fill it: path below the working
/// directory → file of the checkout (relative). Every missing source is one problem.
fn stage_tree(
    dockerfile: &Dockerfile,
    context: &Context,
) -> (BTreeMap<String, String>, Vec<String>) {
    let stage = dockerfile.stage(BUILD_STAGE);
    let root = &stage.workdir;
    let mut tree = BTreeMap::new();
    let mut problems = Vec::new();
    for copy in &stage.copies {
        let dest = join_abs(&copy.workdir, &copy.dest);
        let into_dir = copy.sources.len() > 1 || copy.dest.ends_with('/') || copy.dest == ".";
        for source in &copy.sources {
            let source = join_abs("/", source).trim_start_matches('/').to_string();
            let files: Vec<&String> = context.files_at(&source).collect();
            if files.is_empty() {
                problems.push(format!(
                    "{DOCKERFILE} line {}: COPY {source}: not in the build context: {}",
                    copy.line,
                    context.why_missing(&source)
                ));
                continue;
            }
            for file in files {
                let image_path = if *file == source {
                    let name = file.rsplit('/').next().unwrap_or(file);
                    if into_dir {
                        join_abs(&dest, name)
                    } else {
                        dest.clone()
                    }
                } else {
                    join_abs(&dest, &file[source.len() + 1..])
                };
                if let Some(below) = image_path
                    .strip_prefix(root.as_str())
                    .and_then(|p| p.strip_prefix('/'))
                {
                    tree.insert(below.to_string(), file.clone());
                }
            }
        }
    }
    (tree, problems)
}

/// The workspace members (their manifests, relative to the repository root).
fn workspace_manifests() -> Result<Vec<(String, String)>, String> {
    let root = repo_root();
    let output = clean_cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .map_err(|e| format!("run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let metadata: Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    let root = fs::canonicalize(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    Ok(metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["id"].as_str().is_some_and(|id| members.contains(id)))
        .filter_map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str()?);
            let relative = manifest.strip_prefix(&root).ok()?;
            Some((
                p["name"].as_str()?.to_string(),
                relative.to_string_lossy().into_owned(),
            ))
        })
        .collect())
}

/// `cargo` (the one running the tests), without the variables cargo sets for a test process
/// (a nested build must not inherit them).
fn clean_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    const KEEP: [&str; 6] = [
        "CARGO_HOME",
        "CARGO_TERM_",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let cargo_set = key.starts_with("CARGO_") || key.starts_with("__CARGO");
        if cargo_set && !KEEP.iter().any(|k| key.starts_with(k)) {
            command.env_remove(key.as_ref());
        }
    }
    command
}

/// The Dockerfile's build command must be the one this check reproduces.
fn check_build_command(dockerfile: &Dockerfile) -> Result<(), String> {
    let stage = dockerfile.stage(BUILD_STAGE);
    let (line, run) = stage
        .runs
        .iter()
        .find(|(_, run)| run.contains("cargo build"))
        .ok_or_else(|| format!("{DOCKERFILE}: stage {BUILD_STAGE} has no `cargo build`"))?;
    let words: Vec<&str> = run.split_whitespace().collect();
    let mut missing: Vec<String> = Vec::new();
    if !words.contains(&"--locked") {
        missing.push("--locked".into());
    }
    for binary in BINARIES {
        if !words.windows(2).any(|w| w == ["--bin", binary]) {
            missing.push(format!("--bin {binary}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{DOCKERFILE} line {line}: the build does not pass {} (the deploy check builds with them)",
            missing.join(", ")
        ))
    }
}

/// Assembles the context and the build stage, checks them, syncs the stage to [`STAGE_DIR`]
/// and builds the binaries there.
fn build() -> Result<Built, String> {
    let started = Instant::now();
    let root = repo_root();
    let dockerfile = Dockerfile::parse(
        &fs::read_to_string(root.join(DOCKERFILE))
            .map_err(|e| format!("read {DOCKERFILE}: {e}"))?,
    );
    check_build_command(&dockerfile)?;
    let context = Context::assemble()?;
    let (tree, mut problems) = stage_tree(&dockerfile, &context);
    for (name, manifest) in workspace_manifests()? {
        if !tree.contains_key(&manifest) {
            let member = manifest.trim_end_matches("/Cargo.toml");
            let why = if context.files.contains(&manifest) {
                format!("{DOCKERFILE} does not COPY {member}")
            } else {
                context.why_missing(member)
            };
            problems.push(format!(
                "workspace member {name} ({manifest}) is not in the image's build stage: {why}"
            ));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "the image cannot build:\n  {}",
            problems.join("\n  ")
        ));
    }

    let stage_dir = Path::new(STAGE_DIR);
    let _lock = FileLock::exclusive(&stage_dir.with_extension("lock"))?;
    let written = sync(&root, &tree, stage_dir)?;
    let synced = started.elapsed();
    let output = clean_cargo()
        .args(["build", "--locked", "--offline"])
        .args(BINARIES.iter().flat_map(|b| ["--bin", b]))
        .env("CARGO_TARGET_DIR", TARGET_DIR)
        .env("CARGO_TERM_COLOR", "never")
        .current_dir(stage_dir)
        .output()
        .map_err(|e| format!("run cargo build in {STAGE_DIR}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
        return Err(format!(
            "cargo build --locked --offline in {STAGE_DIR} (the image's build stage, as {DOCKERFILE} and {DOCKERIGNORE} assemble it) failed ({}); a file the build needs is not in the context or not COPYed, or (offline) a crate is missing from ~/.cargo/registry (`cargo fetch --locked` fetches it):\n{}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    eprintln!(
        "image build stage: {} files ({written} rewritten) synced in {:.1} s, built in {:.1} s",
        tree.len(),
        synced.as_secs_f64(),
        (started.elapsed() - synced).as_secs_f64()
    );
    let binary = |name: &str| -> Result<PathBuf, String> {
        let path = Path::new(TARGET_DIR).join("debug").join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "cargo build succeeded but made no {}",
                path.display()
            ))
        }
    };
    Ok(Built {
        pgzm: binary("pgzm")?,
        agent: binary("pgzm-agent")?,
    })
}

/// Makes `dir` hold exactly `tree` (path → checkout file): removes what is not in it, writes
/// what differs (a file rewritten is newer, so cargo rebuilds what depends on it; untouched
/// files keep their times, so an unchanged tree builds nothing). Returns the files written.
fn sync(root: &Path, tree: &BTreeMap<String, String>, dir: &Path) -> Result<usize, String> {
    let err =
        |what: &str, path: &Path, e: std::io::Error| format!("{what} {}: {e}", path.display());
    fs::create_dir_all(dir).map_err(|e| err("create", dir, e))?;
    remove_stale(dir, dir, tree).map_err(|e| format!("sync {}: {e}", dir.display()))?;
    let mut written = 0;
    for (path, source) in tree {
        let source = root.join(source);
        let dest = dir.join(path);
        let wanted = fs::read(&source).map_err(|e| err("read", &source, e))?;
        let mode = fs::metadata(&source)
            .map_err(|e| err("stat", &source, e))?
            .permissions()
            .mode();
        let same = fs::read(&dest).is_ok_and(|have| have == wanted)
            && fs::metadata(&dest).is_ok_and(|m| m.permissions().mode() == mode);
        if same {
            continue;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| err("create", parent, e))?;
        }
        fs::write(&dest, &wanted).map_err(|e| err("write", &dest, e))?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode))
            .map_err(|e| err("chmod", &dest, e))?;
        written += 1;
    }
    Ok(written)
}

/// Removes the files below `dir` that are not in `tree` (paths relative to `base`), and the
/// directories left empty.
fn remove_stale(base: &Path, dir: &Path, tree: &BTreeMap<String, String>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            remove_stale(base, &path, tree)?;
            if fs::read_dir(&path)?.next().is_none() {
                fs::remove_dir(&path)?;
            }
        } else {
            let relative = path
                .strip_prefix(base)
                .expect("below the base")
                .to_string_lossy();
            if !kind.is_file() || !tree.contains_key(relative.as_ref()) {
                fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// An exclusive `flock` on a file, released when dropped (the descriptor closes).
struct FileLock {
    _file: File,
}

impl FileLock {
    fn exclusive(path: &Path) -> Result<FileLock, String> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(format!(
                "lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(FileLock { _file: file })
    }
}

/// The image builds from its filtered context: every `COPY` source is in the context, every
/// workspace member in the build stage, and the two binaries compile from that tree alone.
#[test]
fn image_builds_from_its_filtered_context() {
    let built = built();
    for binary in [&built.pgzm, &built.agent] {
        assert!(binary.is_file(), "{} was not built", binary.display());
    }
}

/// What the check leaves out must be left out of the image too: target directories, the git
/// history, the deploy files themselves.
#[test]
fn context_leaves_out_build_outputs_and_history() {
    let context = Context::assemble().unwrap_or_else(|e| panic!("{e}"));
    for path in [
        "target/debug/pgzm",
        "agent/target/x",
        ".git/HEAD",
        "deploy/Dockerfile",
        "migration_1_a_to_b.log",
    ] {
        assert!(
            context.ignore.excludes(path),
            "{DOCKERIGNORE} lets {path} into the build context"
        );
    }
    assert!(
        context.files.contains("Cargo.lock"),
        "Cargo.lock is not in the build context (`cargo build --locked` needs it)"
    );
}

/// A file left out of the context is named, with the ignore line that leaves it out.
#[test]
fn a_source_left_out_is_named_with_its_ignore_line() {
    let context = Context {
        checkout: ["bench/Cargo.toml", "proto/agent.proto"]
            .map(String::from)
            .into(),
        files: ["proto/agent.proto"].map(String::from).into(),
        ignore: DockerIgnore::parse("# comment\nbench\n"),
    };
    let dockerfile = Dockerfile::parse(
        "FROM rust AS build\nWORKDIR /src\nCOPY proto proto\nCOPY bench bench\nCOPY docs docs\n",
    );
    let (tree, problems) = stage_tree(&dockerfile, &context);
    assert_eq!(
        tree,
        BTreeMap::from([(
            "proto/agent.proto".to_string(),
            "proto/agent.proto".to_string()
        )])
    );
    assert_eq!(
        problems,
        vec![
            format!("{DOCKERFILE} line 4: COPY bench: not in the build context: {DOCKERIGNORE} line 2 (`bench`) leaves it out"),
            format!("{DOCKERFILE} line 5: COPY docs: not in the build context: no such file or directory in the checkout"),
        ]
    );
}

/// docker-compose.yml builds the image from the repository root with deploy/Dockerfile (and so
/// with its ignore file).
#[test]
fn compose_builds_with_this_dockerfile_from_the_repository_root() {
    const COMPOSE: &str = "deploy/docker-compose.yml";
    let root = fs::canonicalize(repo_root()).expect("repository root");
    let compose = yaml_file(COMPOSE);
    let services = compose
        .first()
        .and_then(|c| c["services"].as_object())
        .unwrap_or_else(|| panic!("{COMPOSE} has no services"));
    let mut building = Vec::new();
    for (name, service) in services {
        let build = &service["build"];
        if build.is_null() {
            continue;
        }
        let (context, dockerfile) = match build {
            Value::String(context) => (context.as_str(), "Dockerfile"),
            _ => (
                build["context"].as_str().unwrap_or("."),
                build["dockerfile"].as_str().unwrap_or("Dockerfile"),
            ),
        };
        let context_dir = fs::canonicalize(root.join("deploy").join(context))
            .unwrap_or_else(|e| panic!("{COMPOSE}: service {name}: build context {context}: {e}"));
        assert_eq!(
            context_dir, root,
            "{COMPOSE}: service {name} builds from {context}, not the repository root"
        );
        assert_eq!(
            dockerfile, DOCKERFILE,
            "{COMPOSE}: service {name} builds with {dockerfile}, not {DOCKERFILE}"
        );
        building.push(name.as_str());
    }
    assert!(
        !building.is_empty(),
        "{COMPOSE}: no service builds the image"
    );
    assert!(
        root.join(DOCKERIGNORE).is_file(),
        "{DOCKERIGNORE} is missing"
    );
}
