//! Scenario 10 of the original tool through the real `pgzm` binary: `start` with preserved
//! tables writes a migration log file; `prepare` + `swap` again; `list` shows one backup set;
//! `rollback --latest`; `list` is empty. Also the log-file flags, `cleanup` and `verify`
//! exit codes through the CLI.

use std::collections::BTreeMap;

use pgzm_tests::inspect::{self, TableChecksum};
use pgzm_tests::{PgCluster, TestDb};
use support::{one_json, pgzm_command, WorkDir};
use tokio::process::Command;

use crate::support;

/// A password put in every URL: trust authentication ignores it, and it must never be printed
/// or written to a log.
const SECRET: &str = "Bk9PassW0rd";

/// A source and a destination database on two servers, with a fixture loaded.
struct Pair {
    source: TestDb,
    dest: TestDb,
    source_port: u16,
    dest_port: u16,
}

impl Pair {
    async fn new(label: &str, fixture: &str) -> Pair {
        let (source, dest) = pgzm_tests::fixture_pair(label, fixture)
            .await
            .expect("load the fixture");
        // The clusters `fixture_pair` creates its databases on.
        let (src_cluster, dst_cluster) = PgCluster::shared_pair();
        Pair {
            source,
            dest,
            source_port: src_cluster.port(),
            dest_port: dst_cluster.port(),
        }
    }

    /// The source URL, with the password.
    fn source_url(&self) -> String {
        with_password(&self.source.url())
    }

    /// The destination URL, with the password.
    fn dest_url(&self) -> String {
        with_password(&self.dest.url())
    }
}

fn with_password(url: &str) -> String {
    support::with_password(url, SECRET)
}

/// `pgzm` run in `dir`, with a clean environment.
fn pgzm(dir: &WorkDir) -> Command {
    pgzm_command(dir)
}

/// Runs the command; asserts it succeeded (or failed, per `ok`) and printed no password.
async fn run(cmd: &mut Command, ok: bool, what: &str) -> (String, String) {
    support::run_checked(cmd, ok, what, SECRET).await
}

/// `pgzm list --json --dest dst`, run in `dir`: the backup sets.
async fn list_json(dir: &WorkDir, dst: &str) -> serde_json::Value {
    let (stdout, _) = run(
        pgzm(dir).args(["list", "--json", "--dest", dst]),
        true,
        "list",
    )
    .await;
    let doc = one_json("list --json", &stdout);
    assert_eq!(doc["command"], "list", "{doc}");
    doc["backup_sets"].clone()
}

/// Checksums of the live tables (no `backup_`).
async fn live_sums(db: &TestDb) -> BTreeMap<String, TableChecksum> {
    let c = db.connect().await.expect("connect");
    let mut sums = inspect::table_checksums(&c).await.expect("checksums");
    sums.retain(|t, _| !t.starts_with("backup_") && !t.starts_with("shadow_"));
    sums
}

/// Whether `s` is an RFC 3339 UTC timestamp as the tool writes it: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_iso8601(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// The value after `key: ` on the line that starts with it (after indentation).
fn field<'a>(log: &'a str, key: &str) -> &'a str {
    log.lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no \"{key}:\" line in the log:\n{log}"))
        .trim()
}

/// Checks the migration log of a successful `start`; returns the phase names it lists.
fn check_success_log(log: &str, pair: &Pair, report: &serde_json::Value) -> Vec<String> {
    assert!(!log.contains(SECRET), "the log holds the password:\n{log}");
    assert!(log.contains("DATABASE MIGRATION LOG"), "header:\n{log}");
    assert_eq!(field(log, "Migration Outcome"), "SUCCESS");
    let start = field(log, "Start Time");
    let end = field(log, "End Time");
    assert!(is_iso8601(start) && is_iso8601(end), "{start} / {end}");
    assert!(start <= end, "{start} > {end}");
    let duration = field(log, "Duration");
    let secs: f64 = duration
        .strip_suffix('s')
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("Duration: {duration}"));
    assert!(secs > 0.0 && secs < 120.0, "{duration}");

    // Both databases, host:port and database name, never a password.
    let src = log.split("SOURCE DATABASE").nth(1).expect("source section");
    let dst = log
        .split("DESTINATION DATABASE")
        .nth(1)
        .expect("destination section");
    assert_eq!(
        field(src, "Host"),
        format!("127.0.0.1:{}", pair.source_port)
    );
    assert_eq!(field(src, "Database"), pair.source.name());
    assert_eq!(field(dst, "Host"), format!("127.0.0.1:{}", pair.dest_port));
    assert_eq!(field(dst, "Database"), pair.dest.name());

    // Statistics: as the JSON report says.
    // Tables Processed: every table of the plan; the copied ones are the report's, the rest
    // are the preserved tables, named in the details.
    let copied = report["tables"].as_array().expect("tables").len();
    let preserved: Vec<&str> = report["plan"]["preserved"]
        .as_array()
        .expect("plan.preserved")
        .iter()
        .map(|p| p["table"].as_str().expect("preserved table name"))
        .collect();
    let planned = report["plan"]["tables"]
        .as_array()
        .expect("plan.tables")
        .len();
    assert_eq!(copied + preserved.len(), planned);
    let processed = field(log, "Tables Processed");
    if preserved.is_empty() {
        assert_eq!(processed, planned.to_string());
    } else {
        assert_eq!(
            processed,
            format!("{planned} ({copied} copied, {} preserved)", preserved.len())
        );
    }
    for t in &preserved {
        assert!(
            log.lines()
                .any(|l| l.trim_start().starts_with(&format!("table \"{t}\""))
                    && l.contains("preserved")),
            "{t} is not in the details:\n{log}"
        );
    }
    assert_eq!(
        field(log, "Records Migrated"),
        report["rows"].as_u64().expect("rows").to_string()
    );
    assert_eq!(
        field(log, "Warnings"),
        report["warnings"]
            .as_array()
            .expect("warnings")
            .len()
            .to_string()
    );
    assert_eq!(field(log, "Errors"), "0");

    // Every phase: `[<ISO-8601 start>] phase <name> <duration> ms`, within the run.
    let mut phases = Vec::new();
    for line in log.lines().filter(|l| l.starts_with('[')) {
        let (stamp, rest) = line[1..].split_once("] ").expect("phase line");
        assert!(is_iso8601(stamp), "{line}");
        assert!(
            start <= stamp && stamp <= end,
            "{line} outside {start}..{end}"
        );
        let words: Vec<&str> = rest.split_whitespace().collect();
        assert!(
            words.len() == 4 && words[0] == "phase" && words[3] == "ms",
            "{line}"
        );
        assert!(words[2].parse::<u64>().is_ok(), "{line}");
        phases.push(words[1].to_string());
    }
    for expected in ["plan", "swap"] {
        assert!(
            phases.iter().any(|p| p.contains(expected)),
            "no {expected} phase in {phases:?}\n{log}"
        );
    }
    phases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_migrations_then_rollback_and_clear_through_the_cli() {
    let pair = Pair::new("bkcli_tes", "tes").await;
    let dir = WorkDir::new("tes");
    let (src, dst) = (pair.source_url(), pair.dest_url());
    let preserved = "User,Scenario,BlockgroupOnScenario";
    // `start` and `prepare` migrate with the same arguments.
    let migrate = |command| {
        [
            command,
            "--json",
            "--jobs",
            "2",
            "--source",
            &src,
            "--dest",
            &dst,
            "--preserved-tables",
            preserved,
        ]
    };

    // 1: `start` with preserved tables, which writes the migration log.
    let (stdout, _) = run(pgzm(&dir).args(migrate("start")), true, "start").await;
    let report = one_json("start --json", &stdout);
    let first_id = report["migration_id"].as_i64().expect("migration_id");
    assert_eq!(report["plan"]["tables"].as_array().map(Vec::len), Some(15));
    assert_eq!(
        report["plan"]["preserved"].as_array().map(Vec::len),
        Some(3)
    );
    let files = dir.files();
    assert_eq!(
        files.len(),
        1,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let (name, log) = &files[0];
    assert!(
        name.starts_with("migration_") && name.ends_with(".log"),
        "{name}"
    );
    assert!(
        name.contains(pair.source.name()) && name.contains(pair.dest.name()),
        "{name}"
    );
    let phases = check_success_log(log, &pair, &report);
    eprintln!("migration log phases: {phases:?}");
    let after_first = live_sums(&pair.dest).await;
    // The preserved tables kept production's rows; the others are the source's.
    let c = pair.dest.connect().await.expect("connect");
    let john: String = c
        .query_one(r#"SELECT name FROM "User" WHERE id = 1"#, &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(john, "John Doe");

    // 2: `prepare` + `swap` again on the same databases.
    let (stdout, _) = run(pgzm(&dir).args(migrate("prepare")), true, "prepare").await;
    let second_id = one_json("prepare --json", &stdout)["migration_id"]
        .as_i64()
        .expect("migration_id");
    assert!(second_id > first_id);
    // Until the swap, the first migration's backup set is the one listed.
    let sets = list_json(&dir, &dst).await;
    assert_eq!(sets.as_array().map(Vec::len), Some(1), "{sets}");
    assert_eq!(sets[0]["timestamp"].as_i64(), Some(first_id));
    let (stdout, _) = run(
        pgzm(&dir).args(["swap", "--json", "--dest", &dst]),
        true,
        "swap",
    )
    .await;
    assert_eq!(
        one_json("swap --json", &stdout)["migration_id"].as_i64(),
        Some(second_id)
    );
    assert_eq!(
        dir.files().len(),
        3,
        "start, prepare and swap each write a log file"
    );

    // `list`: exactly one backup set, the second migration's.
    let sets = list_json(&dir, &dst).await;
    let sets = sets.as_array().expect("an array");
    assert_eq!(sets.len(), 1, "{sets:?}");
    let set = &sets[0];
    assert_eq!(set["timestamp"].as_i64(), Some(second_id), "{set}");
    assert!(
        set["created"].as_str().is_some_and(|s| !s.is_empty()),
        "{set}"
    );
    assert_eq!(set["table_count"].as_u64(), Some(15), "{set}");
    assert!(set["size"].as_str().is_some_and(|s| !s.is_empty()), "{set}");
    let (stdout, _) = run(pgzm(&dir).args(["list", "--dest", &dst]), true, "list").await;
    assert!(stdout.contains(&second_id.to_string()), "{stdout}");
    let (stdout, _) = run(
        pgzm(&dir).args(["verify", "--json", "--dest", &dst]),
        true,
        "verify",
    )
    .await;
    let v = one_json("verify --json", &stdout);
    assert_eq!(v["valid"].as_bool(), Some(true), "{v}");

    // `rollback --latest`: back to the state after the first migration; nothing listed.
    run(
        pgzm(&dir).args(["rollback", "--dest", &dst, "--latest"]),
        true,
        "rollback",
    )
    .await;
    assert_eq!(live_sums(&pair.dest).await, after_first);
    assert_eq!(list_json(&dir, &dst).await, serde_json::json!([]));
    let (stdout, _) = run(pgzm(&dir).args(["list", "--dest", &dst]), true, "list").await;
    assert!(stdout.contains("No backup sets"), "{stdout}");
    let backups = support::query_i64(
        &c,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND left(relname, 7) IN ('backup_', 'shadow_')",
    )
    .await;
    assert_eq!(backups, 0);
    assert!(inspect::fk_orphans(&c).await.expect("orphans").is_empty());

    // Nothing left to roll back: a one-line refusal.
    let (_, stderr) = run(
        pgzm(&dir).args(["rollback", "--dest", &dst, "--latest"]),
        false,
        "second rollback",
    )
    .await;
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("pgzm: error: ") && lines[0].contains("no backup set"),
        "{stderr}"
    );
    for (name, text) in dir.files() {
        assert!(!text.contains(SECRET), "{name} holds the password");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_file_flags_cleanup_and_verify_exit_codes() {
    let pair = Pair::new("bkcli_flags", "simple").await;
    let (src, dst) = (pair.source_url(), pair.dest_url());
    let dir = WorkDir::new("flags");
    let elsewhere = WorkDir::new("flags-log");

    // --no-log-file: nothing written.
    let (stdout, _) = run(
        pgzm(&dir).args([
            "-q",
            "start",
            "--json",
            "--no-log-file",
            "--source",
            &src,
            "--dest",
            &dst,
        ]),
        true,
        "start --no-log-file",
    )
    .await;
    one_json("start --json", &stdout);
    assert_eq!(dir.files(), Vec::<(String, String)>::new());

    // --log-file PATH: written there and only there.
    let path = elsewhere.0.join("custom name.log");
    let (stdout, _) = run(
        pgzm(&dir)
            .args([
                "-q",
                "start",
                "--json",
                "--source",
                &src,
                "--dest",
                &dst,
                "--log-file",
            ])
            .arg(&path),
        true,
        "start --log-file",
    )
    .await;
    let report = one_json("start --json", &stdout);
    assert_eq!(dir.files(), Vec::<(String, String)>::new());
    let logs = elsewhere.files();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].0, "custom name.log");
    check_success_log(&logs[0].1, &pair, &report);
    let second_id = report["migration_id"].as_i64().expect("migration_id");

    // --log-file and --no-log-file together are a usage error.
    run(
        pgzm(&dir)
            .args([
                "start",
                "--no-log-file",
                "--source",
                &src,
                "--dest",
                &dst,
                "--log-file",
            ])
            .arg(&path),
        false,
        "conflicting flags",
    )
    .await;

    // A failed run writes its log too, with the outcome and the error.
    let (_, stderr) = run(
        pgzm(&dir).args([
            "-q",
            "start",
            "--source",
            &src,
            "--dest",
            &dst,
            "--preserved-tables",
            "NoSuchTable",
        ]),
        false,
        "start with a missing preserved table",
    )
    .await;
    assert!(stderr.contains("NoSuchTable"), "{stderr}");
    let files = dir.files();
    assert_eq!(
        files.len(),
        1,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let log = &files[0].1;
    assert!(!log.contains(SECRET));
    assert_eq!(field(log, "Migration Outcome"), "FAILED");
    assert_eq!(field(log, "Errors"), "1");
    assert!(
        log.lines()
            .any(|l| l.starts_with("ERROR: ") && l.contains("NoSuchTable")),
        "{log}"
    );

    // verify: exit 0 when valid, non-zero (and says which table) when not.
    run(pgzm(&dir).args(["verify", "--dest", &dst]), true, "verify").await;
    let c = pair.dest.connect().await.expect("connect");
    c.batch_execute(r#"DELETE FROM "backup_Comment" WHERE id = 201"#)
        .await
        .expect("damage the backup");
    let (stdout, stderr) = run(
        pgzm(&dir).args(["verify", "--dest", &dst]),
        false,
        "verify of a damaged set",
    )
    .await;
    assert!(stdout.contains("backup_Comment"), "{stdout}");
    assert!(stderr.contains("not valid"), "{stderr}");

    // cleanup: a bad date is a one-line usage error; an old cut-off drops nothing; a cut-off
    // a day from now drops the set (dry run first).
    let (_, stderr) = run(
        pgzm(&dir).args(["cleanup", "--dest", &dst, "--before", "last week"]),
        false,
        "cleanup --before garbage",
    )
    .await;
    assert!(
        stderr.trim().lines().count() == 1 && stderr.contains("--before"),
        "{stderr}"
    );
    let (stdout, _) = run(
        pgzm(&dir).args([
            "cleanup",
            "--json",
            "--dest",
            &dst,
            "--before",
            "2000-01-01",
        ]),
        true,
        "cleanup --before 2000-01-01",
    )
    .await;
    assert_eq!(
        one_json("cleanup --json", &stdout)["backup_sets"],
        serde_json::json!([])
    );
    let tomorrow = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis()
        + 86_400_000)
        .to_string();
    let (stdout, _) = run(
        pgzm(&dir).args([
            "cleanup",
            "--json",
            "--dry-run",
            "--dest",
            &dst,
            "--before",
            &tomorrow,
        ]),
        true,
        "cleanup --dry-run",
    )
    .await;
    assert_eq!(
        one_json("cleanup --json", &stdout)["backup_sets"],
        serde_json::json!([second_id])
    );
    assert_eq!(
        list_json(&dir, &dst).await.as_array().map(Vec::len),
        Some(1)
    );
    let (stdout, _) = run(
        pgzm(&dir).args(["cleanup", "--dest", &dst, "--before", &tomorrow]),
        true,
        "cleanup",
    )
    .await;
    assert!(stdout.contains("backup_User"), "{stdout}");
    assert_eq!(list_json(&dir, &dst).await, serde_json::json!([]));
    let left = support::query_i64(
        &c,
        "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace \
         AND left(relname, 7) = 'backup_'",
    )
    .await;
    assert_eq!(left, 0);
}
