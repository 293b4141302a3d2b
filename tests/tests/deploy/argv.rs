//! What the deploy examples put on command lines, which every process on the host (or node)
//! can read in `/proc/PID/cmdline`:
//! - no database password and no password-bearing connection string: no URL with a password
//!   (`postgres://user:secret@…`), no `password=` keyword, and no expansion of a variable that
//!   may hold one (`$(DATABASE_URL)` in Kubernetes args, `${…_URL}`/`${…PASSWORD}` in compose
//!   commands or systemd `ExecStart`, or a Kubernetes variable taken from a Secret). The
//!   binaries read passwords from libpq's environment and files (`PGPASSWORD`, `PGPASSFILE`,
//!   `PGSERVICEFILE`) and the coordinator's URLs from `SOURCE_DATABASE_URL` /
//!   `DEST_DATABASE_URL`, so none is needed there;
//! - only flags the binaries have (checked against their `--help`).
//!
//! Files checked: deploy/k8s (every manifest), deploy/docker-compose.yml, deploy/systemd.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use regex::Regex;
use serde_json::Value;

use crate::image::built;
use crate::systemd::{environment_file, expanded_variables, unit_settings, ENV_EXAMPLE, UNIT};
use crate::tools::{read, repo_root, run_ok, yaml_file};

/// The compose file.
const COMPOSE: &str = "deploy/docker-compose.yml";
/// The Kubernetes manifests' directory.
const K8S_DIR: &str = "deploy/k8s";

/// A command line of a manifest: where it is, the program and its arguments.
struct Invocation {
    file: String,
    /// A Kubernetes container (which expands `$(NAME)`, not `${NAME}`).
    kubernetes: bool,
    /// Environment variables taken from Secrets (Kubernetes), which `$(NAME)` would expand.
    secret_variables: BTreeSet<String>,
    /// Kubernetes only: the container also takes a whole Secret as variables (`envFrom`).
    secret_env_from: bool,
    words: Vec<String>,
}

/// Parts of a variable name (split at `_`) that mark it as holding a password or a
/// connection string.
const SENSITIVE_PARTS: [&str; 12] = [
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "PGPASSWORD",
    "SECRET",
    "TOKEN",
    "URL",
    "URI",
    "DSN",
    "CONNINFO",
    "CREDENTIALS",
];

/// Whether the variable `name` may hold a password (by its name).
fn sensitive(name: &str) -> bool {
    name.split('_')
        .any(|part| SENSITIVE_PARTS.contains(&part.to_ascii_uppercase().as_str()))
}

/// What is wrong with one argument, if anything: `(the offending text, why)`.
fn argument_problems(arg: &str, kubernetes: Option<&Invocation>) -> Vec<(String, String)> {
    let url_with_password =
        Regex::new(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:[^\s/@]*@").expect("regex");
    let password_keyword = Regex::new(r"(?i)(^|[\s'\x22=])password\s*=").expect("regex");
    let kubernetes_ref = Regex::new(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)").expect("regex");
    let mut problems = Vec::new();
    if let Some(m) = url_with_password.find(arg) {
        problems.push((m.as_str().to_string(), "a URL with a password".to_string()));
    }
    if let Some(m) = password_keyword.find(arg) {
        problems.push((
            m.as_str().trim().to_string(),
            "a password= keyword".to_string(),
        ));
    }
    match kubernetes {
        Some(invocation) => {
            for c in kubernetes_ref.captures_iter(arg) {
                let name = &c[1];
                let why = if invocation.secret_variables.contains(name) {
                    Some("comes from a Secret")
                } else if sensitive(name) {
                    Some("may hold a password or a connection string (by its name)")
                } else if invocation.secret_env_from {
                    Some("may come from a Secret (envFrom)")
                } else {
                    None
                };
                if let Some(why) = why {
                    problems.push((c[0].to_string(), format!("expands $({name}), which {why}")));
                }
            }
        }
        None => {
            for name in expanded_variables(arg).into_iter().filter(|n| sensitive(n)) {
                problems.push((
                    format!("${name}"),
                    format!("expands ${name}, which may hold a password or a connection string (by its name)"),
                ));
            }
        }
    }
    problems
}

/// The 1-based line of `file` where `needle` first appears outside a comment (0 if nowhere).
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| !l.trim_start().starts_with('#') && l.contains(needle))
        .map_or(0, |n| n + 1)
}

/// The strings of a command given as a list or as one string.
fn words(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Every container's command line in the Kubernetes manifests.
fn kubernetes_invocations() -> Vec<Invocation> {
    let mut files: Vec<String> = Vec::new();
    let mut pending = vec![K8S_DIR.to_string()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(repo_root().join(&dir)).expect("read deploy/k8s") {
            let entry = entry.expect("directory entry");
            let path = format!("{dir}/{}", entry.file_name().to_string_lossy());
            if entry.file_type().expect("file type").is_dir() {
                pending.push(path);
            } else if path.ends_with(".yaml") || path.ends_with(".yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut invocations = Vec::new();
    for file in files {
        for document in yaml_file(&file) {
            collect_containers(&document, &file, &mut invocations);
        }
    }
    invocations
}

fn collect_containers(value: &Value, file: &str, out: &mut Vec<Invocation>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if matches!(
                    key.as_str(),
                    "containers" | "initContainers" | "ephemeralContainers"
                ) {
                    for container in child.as_array().into_iter().flatten() {
                        let env = container["env"].as_array().into_iter().flatten();
                        let secret_variables = env
                            .filter(|e| !e["valueFrom"]["secretKeyRef"].is_null())
                            .filter_map(|e| e["name"].as_str().map(str::to_string))
                            .collect();
                        let secret_env_from = container["envFrom"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|e| !e["secretRef"].is_null());
                        let mut words = words(&container["command"]);
                        words.extend(self::words(&container["args"]));
                        out.push(Invocation {
                            file: file.to_string(),
                            kubernetes: true,
                            secret_variables,
                            secret_env_from,
                            words,
                        });
                    }
                } else {
                    collect_containers(child, file, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_containers(i, file, out)),
        _ => {}
    }
}

/// The compose services' command lines (`entrypoint`, `command`, `healthcheck.test`).
fn compose_invocations() -> Vec<Invocation> {
    let compose = yaml_file(COMPOSE);
    let services = compose
        .first()
        .and_then(|c| c["services"].as_object())
        .unwrap_or_else(|| panic!("{COMPOSE} has no services"));
    let mut invocations = Vec::new();
    for service in services.values() {
        for command in [
            &service["entrypoint"],
            &service["command"],
            &service["healthcheck"]["test"],
        ] {
            let words = words(command);
            if !words.is_empty() {
                invocations.push(Invocation {
                    file: COMPOSE.to_string(),
                    kubernetes: false,
                    secret_variables: BTreeSet::new(),
                    secret_env_from: false,
                    words,
                });
            }
        }
    }
    invocations
}

/// The systemd units' command lines (`Exec*=`), split into words.
fn systemd_invocations() -> Vec<Invocation> {
    let dir = "deploy/systemd";
    let mut invocations = Vec::new();
    for entry in std::fs::read_dir(repo_root().join(dir)).expect("read deploy/systemd") {
        let name = entry
            .expect("directory entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let is_unit = [".service", ".socket", ".timer", ".path", ".mount"]
            .iter()
            .any(|suffix| name.ends_with(suffix));
        if !is_unit {
            continue;
        }
        let file = format!("{dir}/{name}");
        for (_, key, value) in unit_settings(&read(&file)) {
            if key.starts_with("Exec") {
                invocations.push(Invocation {
                    file: file.clone(),
                    kubernetes: false,
                    secret_variables: BTreeSet::new(),
                    secret_env_from: false,
                    words: value.split_whitespace().map(str::to_string).collect(),
                });
            }
        }
    }
    invocations
}

#[test]
fn no_password_reaches_a_command_line() {
    let mut findings = BTreeSet::new();
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    let mut checked = 0;
    let invocations = kubernetes_invocations()
        .into_iter()
        .chain(compose_invocations())
        .chain(systemd_invocations());
    for invocation in invocations {
        let text = texts
            .entry(invocation.file.clone())
            .or_insert_with(|| read(&invocation.file));
        for arg in &invocation.words {
            checked += 1;
            let kubernetes = invocation.kubernetes.then_some(&invocation);
            for (offending, why) in argument_problems(arg, kubernetes) {
                findings.insert(format!(
                    "{}:{}: {why}: {offending}",
                    invocation.file,
                    line_of(text, &offending)
                ));
            }
        }
    }
    // What the unit's variables hold, as shipped, is on its command line too.
    let unit_variables: BTreeSet<String> = unit_settings(&read(UNIT))
        .into_iter()
        .filter(|(_, k, _)| k.starts_with("Exec"))
        .flat_map(|(_, _, v)| expanded_variables(&v))
        .collect();
    for (line, key, value) in environment_file(&read(ENV_EXAMPLE)) {
        if unit_variables.contains(&key) {
            for (offending, why) in argument_problems(&value, None) {
                findings.insert(format!(
                    "{ENV_EXAMPLE}:{line}: {key} goes on {UNIT}'s command line and holds {why}: {offending}"
                ));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} arguments found: is the manifest parsing right?"
    );
    assert!(
        findings.is_empty(),
        "passwords or password-bearing connection strings on command lines (pass them as PGPASSWORD, a password file (PGPASSFILE), a service file (PGSERVICEFILE) or the coordinator's SOURCE_DATABASE_URL/DEST_DATABASE_URL instead):\n{}",
        findings.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn the_scan_catches_what_it_looks_for() {
    let k8s = Invocation {
        file: "x.yaml".into(),
        kubernetes: true,
        secret_variables: ["DB".to_string()].into(),
        secret_env_from: false,
        words: Vec::new(),
    };
    let whys = |arg: &str, k: Option<&Invocation>| -> Vec<String> {
        argument_problems(arg, k)
            .into_iter()
            .map(|(o, _)| o)
            .collect()
    };
    assert_eq!(
        whys("--database=x=postgres://u:secret@h/db", None),
        ["postgres://u:secret@"]
    );
    assert!(whys("--database=x=postgres://u@h/db?sslmode=verify-full", None).is_empty());
    assert_eq!(whys("host=h password=secret", None), ["password="]);
    assert_eq!(
        whys("--source=$(DATABASE_URL)", Some(&k8s)),
        ["$(DATABASE_URL)"]
    );
    assert_eq!(whys("--x=$(DB)", Some(&k8s)), ["$(DB)"]);
    assert!(whys("--region=$(REGION)", Some(&k8s)).is_empty());
    assert_eq!(
        whys("--database ${PGZM_AGENT_DB_URL}", None),
        ["$PGZM_AGENT_DB_URL"]
    );
    assert!(whys("--side ${PGZM_AGENT_SIDE} --tls-key %d/agent.key", None).is_empty());
    assert!(!sensitive("SECURITY_LEVEL"), "parts, not substrings");
    let text = "# postgres://a:b@c\nargs: [postgres://a:b@c]\n";
    assert_eq!(line_of(text, "postgres://a:b@"), 2, "comments are skipped");
}

/// The `--help` of `binary` (and `subcommand`), once per pair.
fn help(binary: &Path, subcommand: Option<&str>, cache: &mut BTreeMap<String, String>) -> String {
    let key = format!("{} {}", binary.display(), subcommand.unwrap_or(""));
    cache
        .entry(key.clone())
        .or_insert_with(|| {
            let mut command = Command::new(binary);
            command.args(subcommand).arg("--help");
            String::from_utf8_lossy(&run_ok(&mut command, &format!("{key} --help")).stdout)
                .into_owned()
        })
        .clone()
}

#[test]
fn manifests_use_only_flags_the_binaries_have() {
    let built = built();
    let mut cache = BTreeMap::new();
    let mut checked = 0;
    let invocations = kubernetes_invocations()
        .into_iter()
        .chain(compose_invocations())
        .chain(systemd_invocations());
    for invocation in invocations {
        let Some(program) = invocation.words.first() else {
            continue;
        };
        let binary = match program.rsplit('/').next() {
            Some("pgzm") => &built.pgzm,
            Some("pgzm-agent") => &built.agent,
            _ => continue,
        };
        let args = &invocation.words[1..];
        let subcommand = (binary == &built.pgzm)
            .then(|| {
                args.iter()
                    .find(|a| !a.starts_with('-'))
                    .map(String::as_str)
            })
            .flatten();
        let help = help(binary, subcommand, &mut cache);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let name = flag.split('=').next().unwrap_or(flag);
            let documented = Regex::new(&format!(
                r"(?m)(^|[\s,]){}([\s=,\[<]|$)",
                regex::escape(name)
            ))
            .expect("regex")
            .is_match(&help);
            assert!(
                documented,
                "{}:{}: {program} {} has no flag {name} (see its --help)",
                invocation.file,
                line_of(&read(&invocation.file), name),
                subcommand.unwrap_or("")
            );
            checked += 1;
        }
    }
    assert!(
        checked > 20,
        "only {checked} flags found: is the manifest parsing right?"
    );
}
