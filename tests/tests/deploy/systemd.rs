//! The systemd unit of an agent on a VM: `systemd-analyze verify` prints nothing about it, and
//! every variable its command lines expand is set by its environment file (example) or the unit.

use std::collections::BTreeSet;
use std::process::Command;

use regex::Regex;

use crate::image::built;
use crate::tools::{read, systemd_analyze};

/// The unit.
pub const UNIT: &str = "deploy/systemd/pgzm-agent.service";
/// Its `EnvironmentFile=`, as shipped.
pub const ENV_EXAMPLE: &str = "deploy/systemd/agent.env.example";
/// The program the unit runs, where deploy/README.md installs it.
const INSTALLED_AGENT: &str = "/usr/local/bin/pgzm-agent";

/// The settings of a unit file: `(line, key, value)`, continuation lines (`\` at the end)
/// joined, comments and section headers left out.
pub fn unit_settings(text: &str) -> Vec<(usize, String, String)> {
    let mut settings = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_none() && (line.is_empty() || line.starts_with(['#', ';', '['])) {
            continue;
        }
        if pending.is_some() && line.starts_with(['#', ';']) {
            // systemd skips comment lines inside a continuation.
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((n + 1, String::new()));
        match line.strip_suffix('\\') {
            Some(continued) => {
                joined.push_str(continued);
                joined.push(' ');
                pending = Some((start, joined));
            }
            None => {
                joined.push_str(line);
                if let Some((key, value)) = joined.split_once('=') {
                    settings.push((start, key.trim().to_string(), value.trim().to_string()));
                }
            }
        }
    }
    settings
}

/// The variables a command line expands: `${NAME}` and `$NAME`.
pub fn expanded_variables(command: &str) -> Vec<String> {
    let re =
        Regex::new(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)").expect("regex");
    re.captures_iter(command)
        .filter_map(|c| c.get(1).or_else(|| c.get(2)))
        .map(|m| m.as_str().to_string())
        .collect()
}

/// The `KEY=value` assignments of an environment file.
pub fn environment_file(text: &str) -> Vec<(usize, String, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with('#'))
        .filter_map(|(n, l)| {
            let (k, v) = l.split_once('=')?;
            Some((n + 1, k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[test]
fn unit_verifies_without_warnings() {
    let tool = systemd_analyze();
    let unit = read(UNIT);
    let exec = format!("ExecStart={INSTALLED_AGENT}");
    assert!(
        unit.contains(&exec),
        "{UNIT}: its ExecStart does not run {INSTALLED_AGENT} (where deploy/README.md installs the agent)"
    );
    // `verify` fails when the ExecStart program does not exist, and /usr/local/bin/pgzm-agent
    // is not installed here: verify a copy that runs the agent built from the image's build
    // stage instead (the rest of the unit is unchanged).
    let agent = &built().agent;
    let copy = unit.replacen(&exec, &format!("ExecStart={}", agent.display()), 1);
    let dir = std::env::temp_dir().join(format!("pgzm-deploy-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    let path = dir.join("pgzm-agent.service");
    std::fs::write(&path, copy).expect("write the unit's copy");
    let output = Command::new(&tool)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let _ = std::fs::remove_dir_all(&dir);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Lines about other units (the host's) are not the unit's problems.
    let about_unit: Vec<&str> = printed
        .lines()
        .filter(|l| l.contains("pgzm-agent"))
        .collect();
    assert!(
        output.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {UNIT} ({}; paths below are of its copy):\n{printed}",
        output.status
    );
}

#[test]
fn unit_variables_are_set_by_its_environment_file() {
    let settings = unit_settings(&read(UNIT));
    let mut defined: BTreeSet<String> = environment_file(&read(ENV_EXAMPLE))
        .into_iter()
        .map(|(_, k, _)| k)
        .collect();
    for (_, key, value) in &settings {
        if key == "Environment" {
            defined.extend(environment_file(value).into_iter().map(|(_, k, _)| k));
        }
    }
    let mut expanded = 0;
    for (line, key, value) in settings.iter().filter(|(_, k, _)| k.starts_with("Exec")) {
        for variable in expanded_variables(value) {
            assert!(
                defined.contains(&variable),
                "{UNIT} line {line}: {key} expands ${variable}, which neither {ENV_EXAMPLE} nor an Environment= sets"
            );
            expanded += 1;
        }
    }
    assert!(
        expanded > 0,
        "{UNIT}: no ExecStart variable found (is the parser right?)"
    );
}

#[test]
fn unit_settings_join_continuations() {
    let text =
        "[Service]\n# c\nExecStart=/bin/a \\\n    # inside\n    --x ${X} \\\n    $Y\nUser=z\n";
    let settings = unit_settings(text);
    assert_eq!(
        settings,
        vec![
            (
                3,
                "ExecStart".to_string(),
                "/bin/a  --x ${X}  $Y".to_string()
            ),
            (7, "User".to_string(), "z".to_string()),
        ]
    );
    assert_eq!(expanded_variables(&settings[0].2), ["X", "Y"]);
}
