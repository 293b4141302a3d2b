//! Tests of cluster start-up, sharing, teardown and the parent-death signal.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::process::{configure, server_identity, terminate};
use super::*;

/// The real uid of a process, from `/proc/<pid>/status`.
fn proc_uid(pid: u32) -> u32 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read proc status");
    let line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line");
    line.split_whitespace()
        .nth(1)
        .expect("uid")
        .parse()
        .expect("numeric uid")
}

async fn query_one_string(cluster: &PgCluster, sql: &str) -> String {
    let (client, conn) = tokio_postgres::connect(&cluster.url("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.expect("query").get(0)
}

#[tokio::test]
async fn shared_cluster_starts_and_answers() {
    let cluster = PgCluster::shared();
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(
        cluster.url("x"),
        format!("postgres://postgres@127.0.0.1:{}/x", cluster.port())
    );
    assert!(cluster.bindir().join("postgres").is_file());
    assert!(cluster.log_path().is_file());
    let version = query_one_string(cluster, "SELECT current_setting('server_version')").await;
    assert!(!version.is_empty());
    let fsync = query_one_string(cluster, "SELECT current_setting('fsync')").await;
    assert_eq!(fsync, "off");
    let encoding = query_one_string(
        cluster,
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = 'postgres'",
    )
    .await;
    assert_eq!(encoding, "UTF8");
    let run_as = server_identity().expect("identity");
    assert_eq!(proc_uid(cluster.postmaster.pid()), run_as.uid);
    assert!(!run_as.switch || run_as.uid != 0);
}

#[tokio::test]
async fn shared_pair_is_two_distinct_servers() {
    let (source, destination) = PgCluster::shared_pair();
    assert!(std::ptr::eq(source, PgCluster::shared()));
    assert_ne!(source.port(), destination.port());
    assert_ne!(source.dir(), destination.dir());
    let sql = "SELECT system_identifier::text FROM pg_control_system()";
    let a = query_one_string(source, sql).await;
    let b = query_one_string(destination, sql).await;
    assert_ne!(a, b, "both clusters report the same system identifier");
}

#[test]
fn only_harness_dirs_are_swept() {
    assert_eq!(stale_dir_pid("pgzm-123-0123456789ab"), Some(123));
    assert_eq!(stale_dir_pid("pgzm-ws"), None);
    assert_eq!(stale_dir_pid("pgzm-123-notours"), None);
    assert_eq!(stale_dir_pid("other-123-0123456789ab"), None);
}

#[test]
fn dropped_cluster_is_stopped_and_removed() {
    let cluster = PgCluster::start().expect("start a private cluster");
    let dir = cluster.dir().to_path_buf();
    let port = cluster.port();
    assert!(dir.join("data").join("PG_VERSION").is_file());
    std::net::TcpStream::connect((HOST, port)).expect("server accepts TCP before drop");
    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(
        std::net::TcpStream::connect((HOST, port)).is_err(),
        "port {port} still accepts connections after drop"
    );
}

/// Spawns `sleep` as the server user, with the parent-death signal, from a thread that then
/// exits: the child must die of SIGQUIT. Run as root this also proves the signal is set after
/// the uid switch (which would otherwise clear it).
#[test]
fn pdeathsig_survives_uid_switch() {
    let run_as = server_identity().expect("identity");
    let (mut child, uid): (Child, u32) = std::thread::spawn(move || {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        configure(&mut cmd, run_as, true);
        let child = cmd.spawn().expect("spawn sleep");
        let uid = proc_uid(child.id());
        (child, uid)
    })
    .join()
    .expect("spawning thread");
    assert_eq!(uid, run_as.uid, "child did not switch user");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            terminate(&mut child);
            panic!("child survived the exit of the thread that spawned it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGQUIT), "{status}");
}
