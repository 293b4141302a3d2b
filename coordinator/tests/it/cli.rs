//! Black-box tests of the real `pgzm` binary against throwaway PostgreSQL servers: the `--json`
//! contract, one-line user errors that never echo a password, environment fallbacks, and a
//! `kill -9` in the middle of the copy followed by a successful rerun.

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use pgzm_tests::inspect::{self, TableChecksum};
use pgzm_tests::TestDb;
use support::{one_json, pgzm_command, simple_pair, text, WorkDir};
use tokio::process::Command;

use crate::support;

/// A password that must never be printed.
const SECRET: &str = "Sup3rSecret";
/// A URL with that password, pointing at a port where nothing listens.
const UNREACHABLE: &str = "postgres://postgres:Sup3rSecret@127.0.0.1:1/db";
/// Longest any wait on the servers may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// `pgzm` run in `dir`, with a clean environment.
fn pgzm(dir: &WorkDir) -> Command {
    pgzm_command(dir)
}

async fn output(cmd: &mut Command) -> Output {
    cmd.output().await.expect("run pgzm")
}

/// Checksums of the tables in `public`, without the `backup_` set.
async fn live_sums(db: &TestDb) -> BTreeMap<String, TableChecksum> {
    let c = db.connect().await.expect("connect");
    let mut sums = inspect::table_checksums(&c).await.expect("checksums");
    sums.retain(|t, _| !t.starts_with("backup_"));
    sums
}

/// Relations and types in `public` named `shadow_…` (or `_shadow_…` array types).
async fn shadow_objects(db: &TestDb) -> Vec<String> {
    let c = db.connect().await.expect("connect");
    c.query(
        "SELECT relname::text FROM pg_class \
           WHERE relnamespace = 'public'::regnamespace AND relname LIKE 'shadow\\_%' \
         UNION ALL \
         SELECT typname::text FROM pg_type WHERE typnamespace = 'public'::regnamespace \
           AND (typname LIKE 'shadow\\_%' OR typname LIKE '\\_shadow\\_%') ORDER BY 1",
        &[],
    )
    .await
    .expect("list shadow objects")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Number of sessions on `db` with `application_name` (or it and a tag, as agents' sessions
/// are), optionally only those waiting on a lock.
async fn sessions(db: &TestDb, application_name: &str, waiting_on_lock: bool) -> i64 {
    let c = db.connect().await.expect("connect monitor");
    c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
         AND (application_name = $2 OR application_name LIKE $2 || ' %') \
         AND (NOT $3 OR wait_event_type = 'Lock')",
        &[&db.name(), &application_name, &waiting_on_lock],
    )
    .await
    .expect("poll pg_stat_activity")
    .get(0)
}

/// `--exclude-table` with pg_dump's pattern rules, seen from the command line: the dry run's
/// plan lists the table left out; a malformed pattern is a one-line error and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_filters_from_the_command_line() {
    let (source, dest) = simple_pair("cli_filters").await;
    let dir = WorkDir::new("filters");
    let before = live_sums(&dest).await;
    let run = |pattern: &str| {
        let mut cmd = pgzm(&dir);
        cmd.args([
            "start",
            "--dry-run",
            "--json",
            "--source",
            &source.url(),
            "--dest",
            &dest.url(),
            "-T",
            pattern,
            "--exclude-table-data",
            "\"Post\"",
        ]);
        cmd
    };
    let out = output(&mut run("\"Comm\"?nt")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = one_json("start --dry-run --json", &text(&out.stdout));
    assert_eq!(
        report["plan"]["excluded"],
        serde_json::json!([{"schema": "public", "name": "Comment"}]),
        "{report}"
    );
    let post = report["plan"]["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "Post"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(post["copy_data"], serde_json::json!(false), "{report}");

    let out = output(&mut run("\"Comment")).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("unterminated double quote"), "{stderr}");
    assert_eq!(live_sums(&dest).await, before);
}

/// `--schema` (repeatable, or `PGZM_SCHEMAS`): the dry run's plan names tables with their
/// schemas and lists the schema the destination lacks; a schema the source has no tables in,
/// and a system schema, are one-line errors that change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_from_the_command_line() {
    let (source, dest) = simple_pair("cli_schemas").await;
    source
        .batch("CREATE SCHEMA app; CREATE TABLE app.t (id int PRIMARY KEY); INSERT INTO app.t VALUES (1);")
        .await
        .expect("app schema");
    let dir = WorkDir::new("schemas");
    let before = live_sums(&dest).await;
    let run = |extra: &[&str]| {
        let mut cmd = pgzm(&dir);
        cmd.args([
            "start",
            "--dry-run",
            "--json",
            "--source",
            &source.url(),
            "--dest",
            &dest.url(),
        ]);
        cmd.args(extra);
        cmd
    };
    let out = output(&mut run(&["--schema", "public", "-n", "app"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = one_json("start --dry-run --json", &text(&out.stdout));
    assert_eq!(
        report["plan"]["schemas_to_create"],
        serde_json::json!(["app"]),
        "{report}"
    );
    let tables: Vec<String> = report["plan"]["tables"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| {
                    format!(
                        "{}.{}",
                        t["schema"].as_str().unwrap_or(""),
                        t["name"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(tables.contains(&"app.t".to_string()), "{tables:?}");
    assert!(tables.contains(&"public.User".to_string()), "{tables:?}");

    // The same from the environment.
    let out = output(run(&[]).env("PGZM_SCHEMAS", "app")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = one_json("start --dry-run --json", &text(&out.stdout));
    assert_eq!(
        report["plan"]["tables"].as_array().map(|t| t.len()),
        Some(1),
        "{report}"
    );

    for (args, expected) in [
        (
            &["--schema", "nosuch"][..],
            "no tables in schema \"nosuch\"",
        ),
        (&["--schema", "pg_catalog"][..], "system schemas"),
    ] {
        let out = output(&mut run(args)).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains(expected), "{stderr}");
    }
    assert_eq!(live_sums(&dest).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_is_one_document_on_stdout() {
    let (source, dest) = simple_pair("cli_json").await;
    let dir = WorkDir::new("json");
    let out = output(pgzm(&dir).args([
        "start",
        "--json",
        "--jobs",
        "2",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "pgzm failed: {stderr}");

    let report = one_json("start --json", &stdout);
    assert!(report["migration_id"].as_i64().is_some(), "{report}");
    assert_eq!(report["rows"].as_u64(), Some(6), "{report}");
    assert_eq!(
        report["tables"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    let lock_held_us = report["swap"]["lock_held_us"]
        .as_i64()
        .expect("lock_held_us");
    assert!(
        lock_held_us > 0,
        "the swap measured its lock window: {report}"
    );
    let logs = dir.files();
    assert_eq!(logs.len(), 1, "one migration log file: {logs:?}");
    assert!(logs[0].0.ends_with(".log"), "{logs:?}");
    assert!(logs[0].1.contains("SUCCESS"), "{}", logs[0].1);
    eprintln!("pgzm --json: swap held its locks {lock_held_us} us");
    assert!(!stderr.trim().is_empty(), "logs go to stderr");

    assert_eq!(live_sums(&dest).await, live_sums(&source).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_errors_are_one_line_without_secrets() {
    let (_, dest) = simple_pair("cli_errors").await;
    let bad_url = "postgres://postgres:Sup3rSecret@127.0.0.1:notaport/db";
    let dest_url = dest.url();
    let cases: [(&str, Vec<&str>, &str); 4] = [
        (
            "bad URL",
            vec!["--source", bad_url, "--dest", &dest_url],
            "invalid source database URL",
        ),
        (
            "missing --dest",
            vec!["--source", UNREACHABLE],
            "no destination database",
        ),
        (
            "unreachable server",
            vec!["--source", UNREACHABLE, "--dest", &dest_url],
            "cannot connect to the source database",
        ),
        (
            "same database",
            vec!["--source", UNREACHABLE, "--dest", UNREACHABLE],
            "same database",
        ),
    ];
    for (case, args, expected) in cases {
        let dir = WorkDir::new("errors");
        let out = output(pgzm(&dir).arg("-q").arg("start").args(&args)).await;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        eprintln!("{case}: {}", stderr.trim_end());
        assert!(!out.status.success(), "{case}: exit status {}", out.status);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{case}: stderr: {stderr}");
        assert!(lines[0].starts_with("pgzm: error: "), "{case}: {stderr}");
        assert!(lines[0].contains(expected), "{case}: {stderr}");
        assert!(stdout.trim().is_empty(), "{case}: stdout: {stdout}");
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{case}: the password was printed"
        );
        for (name, log) in dir.files() {
            assert!(!log.contains(SECRET), "{case}: {name} holds the password");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_fallbacks() {
    let (source, dest) = simple_pair("cli_env").await;
    let dir = WorkDir::new("env");
    // DATABASE_URL as the destination.
    let out = output(
        pgzm(&dir)
            .args(["start", "--dry-run"])
            .env("SOURCE_DATABASE_URL", source.url())
            .env("DATABASE_URL", dest.url()),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Dry run"),
        "{}",
        text(&out.stdout)
    );
    // DEST_DATABASE_URL wins over DATABASE_URL.
    let out = output(
        pgzm(&dir)
            .args(["start", "--dry-run"])
            .env("SOURCE_DATABASE_URL", source.url())
            .env("DEST_DATABASE_URL", dest.url())
            .env("DATABASE_URL", UNREACHABLE),
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!all.contains(SECRET), "the password was printed");
    for (name, log) in dir.files() {
        assert!(!log.contains(SECRET), "{name} holds the password");
    }
    // A dry run writes nothing.
    let c = dest.connect().await.expect("connect");
    let pgzm_schema = support::query_i64(
        &c,
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgzm'",
    )
    .await;
    assert_eq!(pgzm_schema, 0, "a dry run created the metadata schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_copy_then_rerun_succeeds() {
    let (source, dest) = simple_pair("cli_kill").await;
    // A table without defaults or plain indexes: reading its definition (pg_get_expr,
    // pg_get_indexdef) takes no lock on it, so only the copy waits on the lock below.
    for (db, rows) in [(&source, 500), (&dest, 5)] {
        db.batch(&format!(
            "CREATE TABLE audit_entry (id int PRIMARY KEY, body text NOT NULL); \
             INSERT INTO audit_entry SELECT g, 'entry ' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("create audit_entry");
    }
    let dest_before = live_sums(&dest).await;
    let dst = dest.connect().await.expect("connect dest");
    let signature_before = inspect::catalog_signature(&dst, None)
        .await
        .expect("signature");

    // Hold the copy of audit_entry back: the agent's COPY waits on this lock.
    let blocker = source.connect().await.expect("connect blocker");
    blocker
        .batch_execute("BEGIN; LOCK TABLE audit_entry IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock audit_entry");
    let dir = WorkDir::new("kill");
    let mut child = pgzm(&dir)
        .args(["-q", "start", "--jobs", "2", "--source", &source.url()])
        .args(["--dest", &dest.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pgzm");
    let started = Instant::now();
    while sessions(&source, "pgzm-agent", true).await == 0 {
        if let Some(status) = child.try_wait().expect("poll pgzm") {
            panic!("pgzm exited ({status}) before its copy blocked");
        }
        if started.elapsed() >= DEADLINE {
            let c = source.connect().await.expect("connect");
            let rows = c
                .query(
                    "SELECT format('%s %s/%s: %s', application_name, wait_event_type, wait_event, \
                     query) FROM pg_stat_activity WHERE datname = $1",
                    &[&source.name()],
                )
                .await
                .expect("list sessions");
            let list: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            panic!("the copy never waited on the lock; source sessions: {list:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().await.expect("kill -9 pgzm");

    assert_eq!(
        live_sums(&dest).await.len(),
        dest_before.len() + 4,
        "shadow tables expected"
    );
    let mut live = live_sums(&dest).await;
    live.retain(|t, _| !t.starts_with("shadow_"));
    assert_eq!(live, dest_before, "live tables changed");
    assert_eq!(
        inspect::catalog_signature(&dst, None)
            .await
            .expect("signature"),
        signature_before
    );
    let left = shadow_objects(&dest).await;
    assert!(
        left.iter().any(|o| o == "shadow_audit_entry"),
        "a killed run leaves its shadow objects: {left:?}"
    );

    blocker.batch_execute("ROLLBACK").await.expect("unlock");
    // Rerun at once: the killed run's sessions may still be ending on the server.
    let out = output(pgzm(&dir).args([
        "start",
        "--jobs",
        "2",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "rerun failed: {}", text(&out.stderr));
    assert!(
        stdout.contains("cleaned up from an interrupted run"),
        "{stdout}"
    );
    assert_eq!(live_sums(&dest).await, live_sums(&source).await);
    assert_eq!(shadow_objects(&dest).await, Vec::<String>::new());
}

/// Without a terminal, `--progress-every` logs the copy's progress (JSON with
/// `--log-format json`): percent never going back, an ETA, then a line when the copies have
/// ended; the `--json` report carries every table's digest and the data time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_and_verification_in_the_report() {
    let (src_cluster, dst_cluster) = pgzm_tests::PgCluster::shared_pair();
    let source = TestDb::create(src_cluster, "progress_src")
        .await
        .expect("source");
    let dest = TestDb::create(dst_cluster, "progress_dst")
        .await
        .expect("dest");
    source
        .batch(
            "CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
             INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 300000) g;
             CREATE TABLE small (id int PRIMARY KEY);
             INSERT INTO small SELECT generate_series(1, 10);
             ANALYZE;",
        )
        .await
        .expect("load");
    let dir = WorkDir::new("progress");
    let out = output(pgzm(&dir).args([
        "--log-format",
        "json",
        "start",
        "--json",
        "--no-log-file",
        "--jobs",
        "2",
        "--range-size-mb",
        "8",
        "--progress-every",
        "0.02",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("copy progress"))
        })
        .collect();
    assert!(
        lines
            .last()
            .and_then(|v| v["message"].as_str())
            .is_some_and(|m| m.contains("copies ended")),
        "the last progress line says the copies ended: {lines:?}"
    );
    let percents: Vec<f64> = lines.iter().filter_map(|v| v["percent"].as_f64()).collect();
    assert!(!percents.is_empty(), "no progress lines in: {stderr}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {percents:?}"
    );
    assert!(percents.iter().all(|p| (0.0..=100.0).contains(p)));
    assert!(
        lines
            .iter()
            .any(|v| v["eta_ms"].is_u64() || v["percent"] == 100.0),
        "{lines:?}"
    );

    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let tables = report["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 2);
    for t in tables {
        let digest = t["digest"].as_str().expect("digest");
        assert_eq!(digest.len(), 32, "{t}");
        assert!(digest.chars().all(|c| c.is_ascii_hexdigit()), "{t}");
    }
    let data_ms = report["throughput"]["data_ms"].as_u64().expect("data_ms");
    let copy_ms = report["throughput"]["copy_ms"].as_u64().expect("copy_ms");
    assert!(data_ms <= copy_ms, "{}", report["throughput"]);
}

/// Malformed URLs holding a password, through every command and flag of `pgzm` and the
/// environment fallbacks, in text and JSON logs: the password never reaches stdout, stderr or
/// a log file (issue 12, item 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_urls_never_print_the_password() {
    let (_, dest) = simple_pair("cli_bad_urls").await;
    let good = dest.url();
    let bad_urls = [
        "postgress://app:TopSecret9@127.0.0.1:5432/db",
        "postgres://app:Top@Secret9@127.0.0.1:5432/db",
        "postgres://app:TopSecret9@127.0.0.1:99999/db",
        "postgres://app:TopSecret9@[::1/db",
        "host=127.0.0.1 password=TopSecret9 dbname",
    ];
    for bad in bad_urls {
        // (label, arguments, environment)
        type Run<'a> = (String, Vec<String>, Vec<(&'a str, String)>);
        let mut runs: Vec<Run> = Vec::new();
        for cmd in ["start", "prepare"] {
            runs.push((
                format!("{cmd} --source"),
                vec![
                    cmd.into(),
                    "--source".into(),
                    bad.into(),
                    "--dest".into(),
                    good.clone(),
                ],
                vec![],
            ));
            runs.push((
                format!("{cmd} --dest"),
                vec![
                    cmd.into(),
                    "--source".into(),
                    good.clone(),
                    "--dest".into(),
                    bad.into(),
                ],
                vec![],
            ));
            runs.push((
                format!("{cmd} SOURCE_DATABASE_URL"),
                vec![cmd.into(), "--dest".into(), good.clone()],
                vec![("SOURCE_DATABASE_URL", bad.to_string())],
            ));
        }
        for cmd in [
            vec!["swap"],
            vec!["status"],
            vec!["list"],
            vec!["verify"],
            vec!["rollback", "--latest"],
            vec!["cleanup", "--before", "2020-01-01"],
        ] {
            let mut args: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
            let label = cmd.join(" ");
            runs.push((
                format!("{label} DEST_DATABASE_URL"),
                args.clone(),
                vec![("DEST_DATABASE_URL", bad.to_string())],
            ));
            runs.push((
                format!("{label} DATABASE_URL"),
                args.clone(),
                vec![("DATABASE_URL", bad.to_string())],
            ));
            args.extend(["--dest".to_string(), bad.to_string()]);
            runs.push((format!("{label} --dest"), args, vec![]));
        }
        for (label, args, env) in runs {
            for format in ["text", "json"] {
                let dir = WorkDir::new("bad_urls");
                let mut cmd = pgzm(&dir);
                cmd.args(["--log-format", format]).args(&args);
                for (k, v) in &env {
                    cmd.env(k, v);
                }
                let out = output(&mut cmd).await;
                let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
                assert!(
                    !out.status.success(),
                    "{bad} / {label}: exit status {}",
                    out.status
                );
                for secret in ["TopSecret9", "Secret9"] {
                    assert!(
                        !stdout.contains(secret) && !stderr.contains(secret),
                        "{bad} / {label} ({format}): printed: {stderr}{stdout}"
                    );
                    for (name, log) in dir.files() {
                        assert!(!log.contains(secret), "{bad} / {label}: {name} holds it");
                    }
                }
            }
        }
    }
}

/// A plaintext agent beyond loopback is refused before anything is sent (issue 12, item 3):
/// the message says what would cross the network and what to do instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_agents_beyond_loopback_are_refused() {
    let (source, dest) = simple_pair("cli_insecure_agent").await;
    let dir = WorkDir::new("insecure_agent");
    // 192.0.2.0/24 is TEST-NET-1: never contacted, the refusal comes first.
    let out = output(pgzm(&dir).args([
        "start",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
        "--agent",
        "http://192.0.2.10:7000",
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plaintext http:// beyond loopback")
            && stderr.contains("passwords included")
            && stderr.contains("--agent-source-db")
            && stderr.contains("--allow-insecure-agents"),
        "{stderr}"
    );
    let dst = dest.connect().await.expect("connect");
    let schemas = dst
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgzm'",
            &[],
        )
        .await
        .expect("query")
        .get::<_, i64>(0);
    assert_eq!(schemas, 0, "nothing was written");
}

/// Passwords stay out of the command line, as with libpq: `pgzm` reads the service file
/// (`service=NAME`, `$PGSERVICEFILE`), the password file (`$PGPASSFILE`), `PGPASSWORD` and the
/// other `PG*` variables; and `PGSSLMODE=require` is obeyed (a server without TLS is refused,
/// never silently reached in plaintext). Against a private server that requires passwords.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_service_file_password_file_and_environment() {
    const ADMIN_PW: &str = "libpq-Adm1n-pw";
    let cluster = tokio::task::spawn_blocking(|| {
        pgzm_tests::PgCluster::start().expect("start a private cluster")
    })
    .await
    .expect("start");
    let (source, dest) = pgzm_tests::fixture_pair_on(&cluster, &cluster, "libpq", "simple")
        .await
        .expect("load the simple fixture");
    cluster
        .require_passwords(ADMIN_PW)
        .await
        .expect("require passwords");
    let dir = WorkDir::new("libpq");
    let port = cluster.port();
    let services = dir.0.join("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "[rebuilt]\nhost=127.0.0.1\nport={port}\ndbname={}\nuser=postgres\n\n[prod]\nhost=127.0.0.1\nport={port}\ndbname={}\nuser=postgres\nsslmode=disable\n",
            source.name(),
            dest.name()
        ),
    )
    .expect("write the service file");
    let passfile = dir.0.join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{port}:*:postgres:{ADMIN_PW}\n"),
    )
    .expect("write the password file");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let env = |cmd: &mut Command| {
        cmd.env("PGSERVICEFILE", &services)
            .env("PGPASSFILE", &passfile)
            .env("HOME", &dir.0);
    };

    // Services and the password file: a whole migration with no password in argv.
    let mut cmd = pgzm(&dir);
    env(&mut cmd);
    let out = output(cmd.args([
        "start",
        "--json",
        "--jobs",
        "2",
        "--source",
        "service=rebuilt",
        "--dest",
        "service=prod",
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "start with services: {stderr}");
    let report = one_json("start", &text(&out.stdout));
    assert_eq!(report["rows"].as_u64(), Some(6), "{report}");
    assert!(
        report["swap"]["lock_held_us"].as_i64().is_some(),
        "{report}"
    );
    assert!(!stderr.contains(ADMIN_PW) && !text(&out.stdout).contains(ADMIN_PW));
    let sums = |db: &TestDb| {
        let url = format!(
            "postgres://postgres:{ADMIN_PW}@127.0.0.1:{port}/{}",
            db.name()
        );
        async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect with the password");
            tokio::spawn(conn);
            let mut sums = inspect::table_checksums(&c).await.expect("checksums");
            sums.retain(|t, _| !t.starts_with("backup_"));
            sums
        }
    };
    assert_eq!(
        sums(&dest).await,
        sums(&source).await,
        "the destination holds the source's rows"
    );

    // PGPASSWORD and PGHOST/PGPORT/PGUSER/PGDATABASE, the URL naming nothing but the scheme.
    let mut cmd = pgzm(&dir);
    cmd.env("PGPASSWORD", ADMIN_PW)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", dest.name());
    let out = output(cmd.args(["status", "--dest", "postgres://"])).await;
    assert!(
        out.status.success(),
        "status from PG* variables: {}",
        text(&out.stderr)
    );

    // No password anywhere: refused by the server, with libpq's meaning.
    let out = output(pgzm(&dir).args([
        "status",
        "--dest",
        &format!("postgres://postgres@127.0.0.1:{port}/{}", dest.name()),
    ]))
    .await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.to_lowercase().contains("password"), "{stderr}");

    // PGSSLMODE=require against a server without TLS: refused, not plaintext.
    let mut cmd = pgzm(&dir);
    env(&mut cmd);
    cmd.env("PGSSLMODE", "require");
    let out = output(cmd.args([
        "status",
        "--dest",
        &format!("postgres://postgres@127.0.0.1:{port}/{}", dest.name()),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "PGSSLMODE=require reached a server without TLS"
    );
    assert!(
        stderr.to_lowercase().contains("tls") || stderr.contains("SSL"),
        "{stderr}"
    );
    // The service's own sslmode=disable wins over the variable, as in libpq.
    let mut cmd = pgzm(&dir);
    env(&mut cmd);
    cmd.env("PGSSLMODE", "require");
    let out = output(cmd.args(["status", "--dest", "service=prod"])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A swap blocked by an idle-in-transaction session: the error names it (pid, user,
/// application, state, transaction age, lock mode, table, query) and exits 75 (retry later),
/// changing nothing; `--kill-blockers-after` ends that session, logs it, and swaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_swap_names_its_blocker_and_can_end_it() {
    let (source, dest) = simple_pair("cli_blocked").await;
    let dir = WorkDir::new("blocked");
    let live = || async {
        let mut sums = live_sums(&dest).await;
        sums.retain(|t, _| !t.starts_with("shadow_"));
        sums
    };
    let before = live().await;
    let prepare =
        output(pgzm(&dir).args(["prepare", "--source", &source.url(), "--dest", &dest.url()]))
            .await;
    assert!(prepare.status.success(), "{}", text(&prepare.stderr));

    // A reporting job that read "User" and left its transaction open.
    let blocker = dest.connect().await.expect("blocker");
    let pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    blocker
        .batch_execute(
            "SET application_name = 'nightly-report'; BEGIN; SELECT count(*) FROM \"User\";",
        )
        .await
        .expect("open the blocking transaction");

    let swap = |extra: &[&str]| {
        let mut cmd = pgzm(&dir);
        cmd.args(["swap", "--dest", &dest.url(), "--lock-timeout-ms", "50"]);
        cmd.args(extra);
        cmd
    };
    let out = output(&mut swap(&["--swap-timeout", "1"])).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("pgzm: error:"))
        .unwrap_or_default();
    for expected in [
        format!("pid {pid}"),
        "user postgres".to_string(),
        "\"nightly-report\"".to_string(),
        "idle in transaction".to_string(),
        "AccessShareLock on public.\"User\"".to_string(),
        "SELECT count(*) FROM \\\"User\\\"".to_string(),
        "transaction open".to_string(),
        "--kill-blockers-after".to_string(),
    ] {
        assert!(error.contains(&expected), "{expected}: {stderr}");
    }
    assert_eq!(live().await, before, "nothing was swapped");

    let out = output(&mut swap(&[
        "--swap-timeout",
        "10",
        "--kill-blockers-after",
        "1",
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ending a session that blocks the swap")
            && stderr.contains(&pid.to_string()),
        "{stderr}"
    );
    assert!(
        blocker.query_one("SELECT 1", &[]).await.is_err(),
        "the blocking session was ended"
    );
    assert_ne!(live().await, before, "swapped");

    // Usage: the kill delay must be shorter than the swap timeout.
    let out = output(&mut swap(&[
        "--swap-timeout",
        "5",
        "--kill-blockers-after",
        "5",
    ]))
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Starts `pgzm start` with the copy of `audit_entry` held back by a lock on the source, and
/// returns once an agent session waits on it (the copy is under way).
async fn start_blocked_copy(
    source: &TestDb,
    dest: &TestDb,
    dir: &WorkDir,
    extra: &[&str],
) -> (tokio::process::Child, tokio_postgres::Client) {
    for (db, rows) in [(source, 500), (dest, 5)] {
        db.batch(&format!(
            "CREATE TABLE audit_entry (id int PRIMARY KEY, body text NOT NULL); \
             INSERT INTO audit_entry SELECT g, 'entry ' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .expect("create audit_entry");
    }
    let blocker = source.connect().await.expect("connect blocker");
    blocker
        .batch_execute("BEGIN; LOCK TABLE audit_entry IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock audit_entry");
    let child = pgzm(dir)
        .args(["start", "--jobs", "2", "--source", &source.url()])
        .args(["--dest", &dest.url()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgzm");
    let started = Instant::now();
    while sessions(source, "pgzm-agent", true).await == 0 {
        assert!(
            started.elapsed() < DEADLINE,
            "the copy never waited on the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (child, blocker)
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    let pid = child.id().expect("pid") as libc::pid_t;
    // SAFETY: sends a signal to the child this test spawned.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "send signal {sig}");
}

/// Ctrl-C in the middle of the copy: the copies stop, the run's shadow objects are removed,
/// one line says so and what to run next, and the exit status is 130; the live tables are as
/// they were and the same command then succeeds. SIGTERM does the same, with status 143.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_mid_copy_stops_cleanly() {
    for (sig, status) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let (source, dest) = simple_pair(&format!("cli_ctrl_c_{status}")).await;
        let dir = WorkDir::new(&format!("ctrl_c_{status}"));
        let (child, blocker) = start_blocked_copy(&source, &dest, &dir, &[]).await;
        let before = {
            let mut sums = live_sums(&dest).await;
            sums.retain(|t, _| !t.starts_with("shadow_"));
            sums
        };
        signal(&child, sig);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("pgzm exits after the signal")
            .expect("wait for pgzm");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains("the copy was stopped")
                && last.contains("shadow objects were removed")
                && last.contains("run the same command again"),
            "{stderr}"
        );
        assert_eq!(
            shadow_objects(&dest).await,
            Vec::<String>::new(),
            "{stderr}"
        );
        assert_eq!(live_sums(&dest).await, before);
        assert_eq!(
            sessions(&source, "pgzm-agent", false).await,
            0,
            "copies stopped"
        );
        blocker.batch_execute("ROLLBACK").await.expect("unlock");
        let out =
            output(pgzm(&dir).args(["start", "--source", &source.url(), "--dest", &dest.url()]))
                .await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// A second Ctrl-C exits at once, leaving the run as a killed run would be: `status` says so
/// and `pgzm abort` removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_exits_at_once() {
    let (source, dest) = simple_pair("cli_ctrl_c_twice").await;
    let dir = WorkDir::new("ctrl_c_twice");
    let (child, blocker) = start_blocked_copy(&source, &dest, &dir, &[]).await;
    // Keep the cleanup from finishing: it must drop shadow_audit_entry, and this session
    // holds a lock on it.
    let holder = dest.connect().await.expect("connect holder");
    holder
        .batch_execute("BEGIN; LOCK TABLE shadow_audit_entry IN ACCESS SHARE MODE")
        .await
        .expect("hold the shadow table");
    signal(&child, libc::SIGINT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&child, libc::SIGINT);
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("the second Ctrl-C exits at once")
        .expect("wait for pgzm");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap_or_default()
            .contains("exiting at once")
            && stderr.contains("pgzm abort"),
        "{stderr}"
    );
    holder.batch_execute("ROLLBACK").await.expect("release");
    blocker.batch_execute("ROLLBACK").await.expect("unlock");
    let out = output(pgzm(&dir).args(["abort", "--dest", &dest.url()])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(shadow_objects(&dest).await, Vec::<String>::new());
}

/// Asserts `doc` validates against `docs/json-schema/<schema>` and carries the envelope.
fn matches_schema(schema: &str, doc: &serde_json::Value) {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json-schema");
    let text = std::fs::read_to_string(docs.join(schema)).expect("schema file");
    let schema_value: serde_json::Value = serde_json::from_str(&text).expect("schema json");
    let validator = jsonschema::validator_for(&schema_value).expect("valid schema");
    let errors: Vec<String> = validator
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{schema}: {errors:#?}\n{doc}");
    assert_eq!(doc["schema_version"], 1, "{doc}");
    assert!(
        doc["command"].is_string() && doc["outcome"].is_string(),
        "{doc}"
    );
    let text = doc.to_string();
    assert!(!text.contains("{row}"), "no internal templates: {text}");
}

/// Every `--json` document the binary prints — of a successful run, a dry run, a failure —
/// validates against its schema in `docs/json-schema/`, and carries the envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_documents_match_their_schemas() {
    let (source, dest) = simple_pair("cli_json_schema").await;
    let dir = WorkDir::new("json_schema");
    let check = matches_schema;
    let run = |args: Vec<String>| {
        let mut cmd = pgzm(&dir);
        cmd.args(args);
        cmd
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let (src, dst) = (source.url(), dest.url());
    let cases: Vec<(&str, Vec<String>, bool, &str)> = vec![
        (
            "start.json",
            s(&[
                "start",
                "--json",
                "--dry-run",
                "--source",
                &src,
                "--dest",
                &dst,
            ]),
            true,
            "dry_run",
        ),
        (
            "start.json",
            s(&[
                "start",
                "--json",
                "--preserved-tables",
                "User",
                "--source",
                &src,
                "--dest",
                &dst,
            ]),
            true,
            "ok",
        ),
        (
            "status.json",
            s(&["status", "--json", "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "list.json",
            s(&["list", "--json", "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "verify.json",
            s(&["verify", "--json", "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "prepare.json",
            s(&["prepare", "--json", "--source", &src, "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "abort.json",
            s(&["abort", "--json", "--dry-run", "--dest", &dst]),
            true,
            "dry_run",
        ),
        (
            "swap.json",
            s(&["swap", "--json", "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "rollback.json",
            s(&["rollback", "--json", "--latest", "--dest", &dst]),
            true,
            "ok",
        ),
        (
            "cleanup.json",
            s(&[
                "cleanup",
                "--json",
                "--before",
                "2999-01-01",
                "--dest",
                &dst,
            ]),
            true,
            "ok",
        ),
        (
            "error.json",
            s(&["swap", "--json", "--dest", &dst]),
            false,
            "error",
        ),
    ];
    for (schema, args, ok, outcome) in cases {
        let out = output(&mut run(args.clone())).await;
        assert_eq!(out.status.success(), ok, "{args:?}: {}", text(&out.stderr));
        let doc = one_json(&format!("{args:?}"), &text(&out.stdout));
        assert_eq!(doc["outcome"], outcome, "{args:?}: {doc}");
        assert_eq!(doc["command"], args[0], "{doc}");
        check(schema, &doc);
        if schema == "status.json" {
            // RFC 3339, UTC.
            let created = doc["created_at"].as_str().unwrap_or_default();
            assert!(
                created.len() == 24 && created.as_bytes()[10] == b'T' && created.ends_with('Z'),
                "{doc}"
            );
        }
    }
}

/// The command line's own surface: usage errors exit 2 with one line; `prepare` and `swap`
/// write a migration log (pgzm's version, the command line without its password), a dry run
/// writes none; `status` of a swapped migration is calm; `list` lines up its columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_surface() {
    let (source, dest) = simple_pair("cli_surface").await;
    let dir = WorkDir::new("surface");
    let src = support::with_password(&source.url(), SECRET);
    let dst = support::with_password(&dest.url(), SECRET);
    for args in [
        vec!["start", "--jobs", "0", "--source", &src, "--dest", &dst],
        vec!["cleanup", "--before", "yesterday-ish", "--dest", &dst],
        vec!["start", "--dest", &dst],
        vec!["prepare", "--source", "not a url", "--dest", &dst],
    ] {
        let mut cmd = pgzm(&dir);
        cmd.env_remove("SOURCE_DATABASE_URL");
        let out = output(cmd.args(&args)).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.contains("error")).count(),
            1,
            "{stderr}"
        );
        assert!(!stderr.contains(SECRET), "{stderr}");
    }

    let out =
        output(pgzm(&dir).args(["start", "--dry-run", "--source", &src, "--dest", &dst])).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        dir.files().is_empty(),
        "a dry run writes no log: {:?}",
        dir.files()
    );
    // Tables never analyzed are counted and measured, not shown as `~? rows, 0 B`.
    let plan = text(&out.stdout);
    assert!(!plan.contains("~?") && !plan.contains(" 0 B "), "{plan}");
    assert!(plan.contains("~2 rows"), "{plan}");

    for args in [
        vec!["prepare", "--source", &src, "--dest", &dst],
        vec!["swap", "--dest", &dst],
    ] {
        let out = output(pgzm(&dir).args(&args)).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let logs = dir.files();
    assert_eq!(logs.len(), 2, "{logs:?}");
    for (name, body) in &logs {
        let command = if name.contains("_swap_") {
            "swap"
        } else {
            "prepare"
        };
        assert!(
            body.contains(&format!("pgzm {} ({command})", env!("CARGO_PKG_VERSION"))),
            "{name}: {body}"
        );
        assert!(
            body.contains("Command: ") && body.contains(command),
            "{body}"
        );
        assert!(body.contains("Migration Outcome: SUCCESS"), "{body}");
        assert!(!body.contains(SECRET), "{name} holds the password");
    }

    let out = output(pgzm(&dir).args(["status", "--dest", &dst])).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!stdout.contains("NOT READY"), "{stdout}");
    assert!(
        stdout.contains("Swapped: the new tables are live"),
        "{stdout}"
    );

    let out = output(pgzm(&dir).args(["list", "--dest", &dst])).await;
    let stdout = text(&out.stdout);
    // Each table's columns end where its header's do.
    let lines: Vec<&str> = stdout.lines().collect();
    for header in lines.iter().filter(|l| l.contains("SIZE")) {
        let i = lines.iter().position(|l| l == header).unwrap_or(0);
        let body: Vec<&&str> = lines[i + 1..]
            .iter()
            .take_while(|l| {
                !l.trim().is_empty() && !l.contains("SIZE") && !l.starts_with("Backup set")
            })
            .collect();
        assert!(!body.is_empty(), "{stdout}");
        for l in body {
            assert_eq!(
                l.chars().count(),
                header.chars().count(),
                "misaligned:\n{stdout}"
            );
        }
    }
    assert!(
        !stdout.contains(" MB") && !stdout.contains(" kB"),
        "one unit style: {stdout}"
    );
}

/// `--help` says what the tool does, groups the global options, shows every variable a flag
/// reads and ends with examples; completion scripts and a manual page are generated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_completions_and_man_page() {
    let dir = WorkDir::new("help");
    let out = output(pgzm(&dir).arg("--help")).await;
    let help = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        help.starts_with("Replace the tables of a live PostgreSQL database"),
        "{help}"
    );
    assert!(!help.contains("Control plane"), "{help}");
    for expected in [
        "Global options:",
        "Examples:",
        "pgzm rollback --latest",
        "75 retry later",
    ] {
        assert!(help.contains(expected), "{expected}: {help}");
    }
    let out = output(pgzm(&dir).args(["swap", "--help"])).await;
    let help = text(&out.stdout);
    assert!(help.contains("[env: DEST_DATABASE_URL]"), "{help}");
    let out = output(pgzm(&dir).args(["start", "--help"])).await;
    let help = text(&out.stdout);
    assert!(
        help.contains("[env: SOURCE_DATABASE_URL]") && help.contains("[env: PGZM_SCHEMAS]"),
        "{help}"
    );
    let out = output(pgzm(&dir).args(["list", "--help"])).await;
    let help = text(&out.stdout);
    assert!(
        help.contains("Print the result as one JSON document"),
        "{help}"
    );
    assert!(!help.contains("Print the status"), "{help}");

    for (shell, marker) in [
        ("bash", "_pgzm()"),
        ("zsh", "#compdef pgzm"),
        ("fish", "complete -c pgzm"),
    ] {
        let out = output(pgzm(&dir).args(["completions", shell])).await;
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(
            script.contains(marker) && script.contains("rollback"),
            "{shell}: {script}"
        );
    }
    let out = output(pgzm(&dir).arg("man")).await;
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(
        page.contains(".TH pgzm 1") && page.contains("rollback"),
        "{page}"
    );
    // A reader that stops early (`| head`) is not an error.
    let out = output(Command::new("bash").args([
        "-c",
        &format!(
            "set -o pipefail; {} man | head -1 >/dev/null",
            env!("CARGO_BIN_EXE_pgzm")
        ),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}

/// What a person at an 80-column terminal sees of `pgzm start`: log lines intact above the
/// progress display (none written under the bars and erased by a redraw), a line per finished
/// table (the per-task log lines it replaces are not shown), progress lines no wider than the
/// terminal, and no frame of the bars left once the copy is over.
/// Run under `script` (a pseudo-terminal), rendered by a terminal emulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_progress_display_stays_clean() {
    let (source, dest) = simple_pair("cli_pty").await;
    // Enough tables for the bars to redraw while logs are written.
    source
        .batch(
            "DO $$ BEGIN FOR i IN 1..12 LOOP
               EXECUTE format('CREATE TABLE t_%s (id int PRIMARY KEY, v text)', i);
               EXECUTE format('INSERT INTO t_%s SELECT g, repeat(''x'', 200) FROM generate_series(1, 3000) g', i);
             END LOOP; END $$;",
        )
        .await
        .expect("tables");
    let dir = WorkDir::new("pty");
    let bin = env!("CARGO_BIN_EXE_pgzm");
    let command = format!(
        "stty cols 80 rows 24 && exec {bin} start --jobs 2 --no-log-file --source '{}' --dest '{}'",
        source.url(),
        dest.url()
    );
    let out = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .current_dir(&dir.0)
        .env("TERM", "xterm-256color")
        .env_remove("PGZM_LOG")
        .output()
        .await
        .expect("run pgzm under script");
    let mut screen = vt100::Parser::new(2000, 80, 0);
    screen.process(&out.stdout);
    let screen = screen.screen();
    let rows: Vec<String> = screen.rows(0, 80).collect();
    let shown: Vec<&str> = rows
        .iter()
        .map(|r| r.trim_end())
        .filter(|r| !r.is_empty())
        .collect();
    let all = shown.join("\n");
    assert!(out.status.success(), "{all}");
    // A finished table's line is whole on one row (cut to fit, never wrapped).
    for row in shown.iter().filter(|r| r.starts_with("  done ")) {
        assert!(
            row.ends_with('B') && row.contains(" rows, "),
            "wider than 80 columns: {row:?}\n{all}"
        );
    }
    assert!(
        !all.contains("copy task done"),
        "shown as `done` lines: {all}"
    );
    assert!(
        !shown.iter().any(|l| l.starts_with("copy [")),
        "a frame of the bars was left:\n{all}"
    );
    for i in 1..=12 {
        let done = format!("done t_{i}: 3000 rows");
        assert_eq!(
            shown.iter().filter(|l| l.contains(&done)).count(),
            1,
            "{done}:\n{all}"
        );
    }
    // Log lines are whole lines: each starts with the time of day and its level, without the
    // spans' context.
    let logs: Vec<&&str> = shown.iter().filter(|l| l.contains(" INFO ")).collect();
    assert!(!logs.is_empty(), "{all}");
    for l in logs {
        let b = l.as_bytes();
        assert!(
            b.len() > 14 && b[2] == b':' && b[5] == b':' && &l[8..14] == "  INFO",
            "a log line was overwritten: {l:?}\n{all}"
        );
        assert!(!l.contains("pgzm{"), "span context on a terminal: {l:?}");
    }
    assert!(
        all.contains("Migration") && all.contains("complete"),
        "{all}"
    );
    // The plan comes once, before the copy.
    let plan_at = shown
        .iter()
        .position(|l| l.starts_with("Plan for migration"))
        .unwrap_or(usize::MAX);
    let first_done = shown
        .iter()
        .position(|l| l.starts_with("  done "))
        .unwrap_or(0);
    assert!(plan_at < first_done, "the plan before the copy:\n{all}");
    assert_eq!(all.matches("Plan for migration").count(), 1, "{all}");
}

/// A run killed in the middle of its copy is resumed with `--resume`: the tables it had copied
/// and built are kept, the one in flight and one changed in the source since are copied again
/// (the report says which and why), and the result equals the source. With nothing to resume,
/// `--resume` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_keeping_what_it_had_copied() {
    let (source, dest) = simple_pair("cli_resume").await;
    let dir = WorkDir::new("resume");
    let out = output(pgzm(&dir).args([
        "start",
        "--resume",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("nothing to resume"),
        "{}",
        text(&out.stderr)
    );

    source
        .batch(
            "DO $$ BEGIN FOR i IN 1..4 LOOP
               EXECUTE format('CREATE TABLE k_%s (id int PRIMARY KEY, v text)', i);
               EXECUTE format('INSERT INTO k_%s SELECT g, ''v'' || g FROM generate_series(1, 200) g', i);
             END LOOP; END $$;",
        )
        .await
        .expect("tables");
    let (mut child, blocker) = start_blocked_copy(&source, &dest, &dir, &[]).await;
    // Every other table copied and built: only audit_entry is in flight.
    let dst = dest.connect().await.expect("connect dest");
    let started = Instant::now();
    loop {
        let built: i64 = dst
            .query_one(
                "SELECT count(*) FROM pgzm.copy_progress WHERE left(task_key, 6) = 'built:'",
                &[],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if built == 7 {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "the other tables were never built ({built})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().await.expect("kill -9 pgzm");
    // The source changes one of the tables already copied.
    source
        .batch("UPDATE k_1 SET v = 'changed' WHERE id = 1")
        .await
        .expect("change k_1");
    blocker.batch_execute("ROLLBACK").await.expect("unlock");

    let out = output(pgzm(&dir).args([
        "start",
        "--resume",
        "--json",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let doc = one_json("start --resume --json", &text(&out.stdout));
    let mut kept: Vec<String> = doc["resumed"]["kept"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    kept.sort();
    assert_eq!(
        kept,
        ["Comment", "Post", "User", "k_2", "k_3", "k_4"],
        "{doc}"
    );
    let redone: BTreeMap<String, String> = doc["resumed"]["redone"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["table"].as_str().unwrap_or_default().to_string(),
                        t["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(redone.len(), 2, "{doc}");
    assert!(redone["audit_entry"].contains("not finished"), "{doc}");
    assert!(redone["k_1"].contains("changed in the source"), "{doc}");
    // Only the two were copied again.
    assert_eq!(doc["tables"].as_array().map(Vec::len), Some(2), "{doc}");

    let mut live = live_sums(&dest).await;
    live.retain(|t, _| !t.starts_with("shadow_"));
    assert_eq!(
        live,
        live_sums(&source).await,
        "the destination holds the source's data"
    );
    assert_eq!(shadow_objects(&dest).await, Vec::<String>::new());
}

/// `--on-interrupt keep`: Ctrl-C mid-copy leaves the run as it was, says how to continue it,
/// and `--resume` then finishes it, keeping what was copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_can_keep_the_run_for_resume() {
    let (source, dest) = simple_pair("cli_ctrl_c_keep").await;
    let dir = WorkDir::new("ctrl_c_keep");
    let (child, blocker) =
        start_blocked_copy(&source, &dest, &dir, &["--on-interrupt", "keep"]).await;
    // The tables other than audit_entry are copied and built first.
    let dst = dest.connect().await.expect("connect dest");
    let started = Instant::now();
    while dst
        .query_one(
            "SELECT count(*) FROM pgzm.copy_progress WHERE left(task_key, 6) = 'built:'",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
        < 3
    {
        assert!(
            started.elapsed() < DEADLINE,
            "the other tables were never built"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, libc::SIGINT);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("pgzm exits after the signal")
        .expect("wait for pgzm");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("is kept") && last.contains("pgzm start --resume"),
        "{stderr}"
    );
    assert!(
        shadow_objects(&dest)
            .await
            .iter()
            .any(|o| o == "shadow_audit_entry"),
        "kept"
    );
    blocker.batch_execute("ROLLBACK").await.expect("unlock");
    let out = output(pgzm(&dir).args([
        "start",
        "--resume",
        "--json",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = one_json("start --resume", &text(&out.stdout));
    assert_eq!(
        doc["resumed"]["kept"].as_array().map(Vec::len),
        Some(3),
        "{doc}"
    );
    let mut live = live_sums(&dest).await;
    live.retain(|t, _| !t.starts_with("shadow_"));
    assert_eq!(live, live_sums(&source).await);
}

/// `kill -9` at about 10 %, 50 % and 90 % of the copy (1, 5 and 9 of 10 tables copied and
/// built), then `--resume`: the result equals the source, the tables copied before the kill are
/// kept and only the others are copied again, as the report says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_kill_at_10_50_and_90_percent() {
    for done in [1i64, 5, 9] {
        let (source, dest) = simple_pair(&format!("cli_resume_at_{done}")).await;
        let dir = WorkDir::new(&format!("resume_at_{done}"));
        source
            .batch(
                "DROP TABLE \"Comment\", \"Post\", \"User\";
                 DO $$ BEGIN FOR i IN 10..19 LOOP
                   EXECUTE format('CREATE TABLE r_%s (id int PRIMARY KEY, v text)', i);
                   EXECUTE format('INSERT INTO r_%s SELECT g, md5(g::text) FROM generate_series(1, 60000) g', i);
                 END LOOP; END $$; ANALYZE;",
            )
            .await
            .expect("tables");
        let mut child = pgzm(&dir)
            .args(["start", "--jobs", "1", "--source", &source.url()])
            .args(["--dest", &dest.url()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgzm");
        let dst = dest.connect().await.expect("connect dest");
        let started = Instant::now();
        loop {
            let built: i64 = dst
                .query_one(
                    "SELECT count(*) FROM pgzm.copy_progress WHERE left(task_key, 6) = 'built:'",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if built >= done {
                break;
            }
            assert!(
                child.try_wait().expect("poll").is_none(),
                "pgzm finished before the kill"
            );
            assert!(started.elapsed() < DEADLINE * 3, "no progress ({built})");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().await.expect("kill -9 pgzm");

        let out = output(pgzm(&dir).args([
            "start",
            "--resume",
            "--json",
            "--source",
            &source.url(),
            "--dest",
            &dest.url(),
        ]))
        .await;
        assert!(out.status.success(), "at {done}: {}", text(&out.stderr));
        let doc = one_json("start --resume", &text(&out.stdout));
        let kept = doc["resumed"]["kept"].as_array().map(Vec::len).unwrap_or(0) as i64;
        let redone = doc["resumed"]["redone"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0) as i64;
        // The kill may land after the last build, before the run ended: all kept then.
        assert!(kept >= done && kept <= 10, "at {done}: {doc}");
        assert_eq!(kept + redone, 10, "at {done}: {doc}");
        assert_eq!(
            doc["tables"].as_array().map(Vec::len),
            Some(redone as usize),
            "only the redone tables are copied: {doc}"
        );
        let mut live = live_sums(&dest).await;
        live.retain(|t, _| t.starts_with("r_"));
        let mut expected = live_sums(&source).await;
        expected.retain(|t, _| t.starts_with("r_"));
        assert_eq!(live, expected, "at {done}");
        assert_eq!(shadow_objects(&dest).await, Vec::<String>::new());
    }
}

/// What the operator reads about awkward names and swap warnings: a table whose name holds
/// double quotes is shown as it is named (not with its quotes doubled), and a warning of the
/// swap (a key of a table left out, re-pointed to a new table whose rows it does not find)
/// is printed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_names_and_swap_warnings_as_printed() {
    let (source, dest) = simple_pair("cli_printed").await;
    let dir = WorkDir::new("printed");
    for db in [&source, &dest] {
        db.batch("CREATE TABLE public.\"\"\"dqname\"\"\" (id int PRIMARY KEY); INSERT INTO public.\"\"\"dqname\"\"\" VALUES (1)")
            .await
            .expect("create \"dqname\"");
    }
    // The new data has none of the posts the live comments (left out) refer to.
    source
        .batch("DELETE FROM \"Comment\"; DELETE FROM \"Post\"")
        .await
        .expect("empty the posts");
    let (src, dst) = (source.url(), dest.url());
    let out = output(pgzm(&dir).args([
        "start",
        "--dry-run",
        "-T",
        "\"Comment\"",
        "--source",
        &src,
        "--dest",
        &dst,
    ]))
    .await;
    let plan = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Quoted as SQL quotes it, wherever it is shown.
    let line = plan
        .lines()
        .find(|l| l.contains("dqname"))
        .unwrap_or_else(|| panic!("{plan}"));
    assert!(
        line.trim_start().starts_with(r#"public."""dqname""" "#)
            && line.ends_with(r#"-> "shadow_""dqname""", live table kept as "backup_""dqname""""#),
        "{plan}"
    );
    assert!(
        plan.contains(r#"left out by the table filters (stay as they are): public."Comment""#),
        "{plan}"
    );

    let out = output(pgzm(&dir).args([
        "prepare",
        "-T",
        "\"Comment\"",
        "--source",
        &src,
        "--dest",
        &dst,
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(pgzm(&dir).args(["swap", "--dest", &dst])).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let all = format!("{stdout}{stderr}");
    assert_eq!(
        all.lines()
            .filter(|l| l.contains("Comment_post_id_fkey") && l.contains("does not validate"))
            .count(),
        1,
        "the warning once:\n{all}"
    );
}

/// `--max-rate` keeps the copy to its byte-rate budget (what the destination's COPY has
/// processed stays within it, and the last task left gets all of it with `--jobs 2`), and `pgzm throttle` changes the budget of the running copy,
/// which then finishes at full speed; with nothing copying, `throttle` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_keeps_to_its_byte_rate_budget_and_throttle_changes_it() {
    const RATE: f64 = 100.0 * 1024.0;
    let (source, dest) = simple_pair("cli_throttle").await;
    let dir = WorkDir::new("throttle");
    let out =
        output(pgzm(&dir).args(["throttle", "--max-rate", "1MB/s", "--dest", &dest.url()])).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no migration is copying"),
        "{}",
        text(&out.stderr)
    );
    source
        .batch(
            "CREATE TABLE blob (id int PRIMARY KEY, body text);
             INSERT INTO blob SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 6000) g;
             ANALYZE blob",
        )
        .await
        .expect("blob");
    let started = Instant::now();
    let child = pgzm(&dir)
        .args([
            "start",
            "--jobs",
            "2",
            "--max-rate",
            "100KiB/s",
            "--no-log-file",
        ])
        .args(["--source", &source.url(), "--dest", &dest.url()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgzm");
    let dst = dest.connect().await.expect("connect dest");
    let copied = || async {
        dst.query_opt(
            "SELECT bytes_processed FROM pg_stat_progress_copy WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND relid = 'public.shadow_blob'::regclass",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, i64>(0))
    };
    // The blob table's copy: paced by the budget.
    let copy_started = loop {
        if copied().await.is_some() {
            break Instant::now();
        }
        assert!(
            started.elapsed() < DEADLINE * 3,
            "the blob table's copy never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bytes = copied().await.unwrap_or(0) as f64;
    let allowed = RATE * copy_started.elapsed().as_secs_f64() + 160.0 * 1024.0;
    assert!(
        bytes > 0.0 && bytes <= allowed,
        "{bytes} bytes in {:?}: more than the budget allows ({allowed})",
        copy_started.elapsed()
    );
    // The other tables are small and done by now: the last task left gets the whole budget,
    // not its 1/--jobs share. Over 3 s it copies at three quarters of the rate or more (half
    // of it would be at most 71 KiB/s, a chunk of slack included).
    let (from, at) = (bytes, Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rate = (copied().await.unwrap_or(0) as f64 - from) / at.elapsed().as_secs_f64();
    assert!(
        rate >= 0.75 * RATE,
        "{rate:.0} bytes/s: the last task left did not get the whole budget of {RATE}"
    );
    // Lifted while it runs: the copy (about 3 MB, 30 s at the budget) ends at once.
    let out = output(pgzm(&dir).args([
        "throttle",
        "--max-rate",
        "off",
        "--json",
        "--dest",
        &dest.url(),
    ]))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = one_json("throttle", &text(&out.stdout));
    assert!(doc["migration_id"].as_i64().is_some(), "{doc}");
    assert!(doc["max_rate_bytes_per_s"].is_null(), "{doc}");
    matches_schema("throttle.json", &doc);
    let lifted = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("pgzm ends")
        .expect("wait");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        lifted.elapsed() < Duration::from_secs(15),
        "the copy went on at the old budget: {:?} after the throttle was lifted",
        lifted.elapsed()
    );
    let mut live = live_sums(&dest).await;
    live.retain(|t, _| t == "blob");
    let mut expected = live_sums(&source).await;
    expected.retain(|t, _| t == "blob");
    assert_eq!(live, expected);
}
