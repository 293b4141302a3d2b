//! The two-phase workflow across OS processes, with the real `pgzm` binary: `prepare` in one
//! process, then `status` and `swap` in others. Nothing but the destination database carries the
//! migration's state from one to the next.

use pgzm_tests::inspect;
use tokio_postgres::Client;

use crate::support;

/// A password put in the URLs (the test servers trust every local connection, so it is accepted
/// and ignored); it must never be printed.
const SECRET: &str = "TwoPhaseS3cret";

/// Runs `pgzm args…`, checks it succeeded and printed no password; returns (stdout, stderr).
async fn run_ok(dir: &support::WorkDir, args: &[&str]) -> (String, String) {
    let what = format!("pgzm {}", args[0]);
    support::run_checked(support::pgzm_command(dir).args(args), true, &what, SECRET).await
}

fn with_password(url: &str) -> String {
    support::with_password(url, SECRET)
}

/// `id name` of every row of "User", by id.
async fn user_rows(dst: &Client) -> Vec<String> {
    dst.query(r#"SELECT id || ' ' || name FROM "User" ORDER BY id"#, &[])
        .await
        .expect("users")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_then_status_and_swap_in_other_processes() {
    let (source, dest) = support::simple_pair("two_phase").await;
    // Each command writes its migration log in its working directory.
    let dir = support::WorkDir::new("two_phase");
    let (src_url, dst_url) = (with_password(&source.url()), with_password(&dest.url()));
    let dst = dest.connect().await.expect("connect dest");
    let src_sums = inspect::table_checksums(&source.connect().await.expect("connect source"))
        .await
        .expect("source checksums");

    // Process 1: prepare.
    let (stdout, _) = run_ok(
        &dir,
        &[
            "prepare",
            "--source",
            &src_url,
            "--dest",
            &dst_url,
            "--preserved-tables",
            "User",
            "--jobs",
            "2",
        ],
    )
    .await;
    assert!(
        stdout.contains("pgzm swap"),
        "prepare must tell the swap command: {stdout}"
    );
    let id: i64 = dst
        .query_one(
            "SELECT id FROM pgzm.migrations WHERE status = 'prepared'",
            &[],
        )
        .await
        .expect("the prepared migration is recorded in the destination")
        .get(0);
    assert!(stdout.contains(&format!("--timestamp {id}")), "{stdout}");

    // Process 2: status.
    let (stdout, _) = run_ok(&dir, &["status", "--dest", &dst_url, "--json"]).await;
    let st = support::one_json("status --json", &stdout);
    assert_eq!(st["state"], "prepared", "{st}");
    assert_eq!(st["safe_to_swap"], true, "{st}");
    assert_eq!(st["migration_id"], id, "{st}");
    assert_eq!(st["preserved_tables"], serde_json::json!(["User"]), "{st}");
    let triggers = st["sync_triggers"].as_array().expect("sync_triggers");
    assert_eq!(triggers.len(), 4, "{st}");
    assert!(
        triggers
            .iter()
            .all(|t| t["present"] == true && t["enabled"] == true),
        "{st}"
    );

    // The application writes between the two phases.
    dst.batch_execute(
        r#"INSERT INTO "User" (name, email) VALUES ('Between', 'between@example.com');
           UPDATE "User" SET name = 'Jane (edited)' WHERE id = 2"#,
    )
    .await
    .expect("application writes");
    let users = user_rows(&dst).await;

    // Process 3: swap.
    let (stdout, _) = run_ok(
        &dir,
        &[
            "swap",
            "--dest",
            &dst_url,
            "--timestamp",
            &id.to_string(),
            "--json",
        ],
    )
    .await;
    let report = support::one_json("swap --json", &stdout);
    assert_eq!(report["migration_id"], id, "{report}");
    assert!(
        report["swap"]["lock_held_us"].as_i64().is_some(),
        "{report}"
    );

    // Process 4: status again.
    let (stdout, _) = run_ok(&dir, &["status", "--dest", &dst_url, "--json"]).await;
    let st = support::one_json("status --json", &stdout);
    assert_eq!(st["state"], "swapped", "{st}");
    assert_eq!(st["safe_to_swap"], false, "{st}");
    let (stdout, _) = run_ok(&dir, &["status", "--dest", &dst_url]).await;
    assert!(stdout.contains("SWAPPED"), "{stdout}");

    // The preserved table has the destination's rows including the writes between the phases;
    // the others the source's; the sync is gone.
    let after = user_rows(&dst).await;
    assert_eq!(after, users);
    assert_eq!(after, vec!["1 John Doe", "2 Jane (edited)", "3 Between"]);
    let sums = inspect::table_checksums(&dst).await.expect("checksums");
    for t in ["Post", "Comment"] {
        assert_eq!(sums[t], src_sums[t], "{t}");
    }
    let sync = support::query_i64(
        &dst,
        "SELECT count(*) FROM pg_trigger WHERE left(tgname::text, 10) = 'pgzm_sync_'",
    )
    .await;
    assert_eq!(sync, 0, "sync triggers left after the swap");
    assert_eq!(inspect::fk_orphans(&dst).await.expect("fk orphans"), vec![]);
}
