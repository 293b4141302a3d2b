//! What a caller holding an agent's token (or certificate) can make it do: an agent that holds
//! named databases refuses connection strings (no probing of other servers or ports), and any
//! agent writes only into the shadow tables of a recorded migration that is still copying —
//! never into a live table, never into a table the migration did not create. Refusals are
//! logged by the agent and leave the destination untouched.

use pgzm_coordinator::migrate::Phases;
use pgzm_coordinator::prepare;
use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

use crate::support::*;

async fn client(agent: &AgentProcess) -> AgentClient<Channel> {
    AgentClient::connect(agent.http_url())
        .await
        .expect("connect to the agent")
}

fn url(u: &str) -> Option<proto::Endpoint> {
    Some(proto::Endpoint {
        target: Some(proto::endpoint::Target::Url(u.to_string())),
        application_name: "attacker".into(),
    })
}

/// A whole-table task with TRUNCATE + FREEZE into `schema.table` of migration `migration_id`.
fn task(
    p: &Pair,
    snapshot: &str,
    migration_id: i64,
    source_table: &str,
    table: &str,
) -> proto::CopyTask {
    proto::CopyTask {
        task_id: format!("m{migration_id}/evil/a1"),
        task_key: format!("evil-{table}"),
        source: url(&p.source.url()),
        destination: url(&p.dest.url()),
        snapshot_id: snapshot.into(),
        source_table: Some(proto::TableName {
            schema: "public".into(),
            name: source_table.into(),
        }),
        destination_table: Some(proto::TableName {
            schema: "public".into(),
            name: table.into(),
        }),
        columns: vec![
            "id".into(),
            "name".into(),
            "email".into(),
            "created_at".into(),
        ],
        migration_id,
        freeze: true,
        ..proto::CopyTask::default()
    }
}

/// Runs a task to its end: the rows written, or the error status.
async fn run(
    client: &mut AgentClient<Channel>,
    task: proto::CopyTask,
) -> Result<u64, tonic::Status> {
    let mut stream = client.run_copy(task).await?.into_inner();
    while let Some(event) = stream.message().await? {
        if let Some(proto::copy_event::Event::Done(done)) = event.event {
            return Ok(done.rows_written);
        }
    }
    Err(tonic::Status::unknown("the stream ended without done"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_only_into_shadow_tables_of_a_migration_that_is_copying() {
    let p = fixture_pair("guard", "simple").await;
    let dst = p.dest.connect().await.expect("connect dest");
    let src = p.source.connect().await.expect("connect source");
    let live_before = live_sums(&dst).await;
    let users: i64 = dst
        .query_one("SELECT count(*) FROM \"User\"", &[])
        .await
        .expect("count")
        .get(0);
    assert!(users > 0, "the fixture's destination has users");
    // A source snapshot, as the coordinator exports it.
    let holder = p.source.connect().await.expect("connect source");
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .expect("begin");
    let snapshot: String = holder
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .expect("export")
        .get(0);
    let agent = AgentProcess::start(&["-v"]).await;
    let mut c = client(&agent).await;

    // No pgzm metadata at all: nothing is a shadow table of a migration.
    let err = run(&mut c, task(&p, &snapshot, 1, "User", "User"))
        .await
        .expect_err("a live table with no migration");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no pgzm metadata"), "{err:?}");

    // A prepared migration: its shadow tables exist, its copy phase is over.
    let mut phases = Phases(Vec::new());
    let prepared = prepare::prepare(
        &options(&p),
        pgzm_coordinator::agents::AgentPool::in_process(1)
            .await
            .expect("in-process agent"),
        &mut phases,
    )
    .await
    .expect("prepare")
    .expect("prepared");
    let id = prepared.release().await.migration_id;
    let err = run(&mut c, task(&p, &snapshot, id, "User", "shadow_User"))
        .await
        .expect_err("a prepared migration");
    assert!(err.message().contains("its copy phase is over"), "{err:?}");
    let err = run(&mut c, task(&p, &snapshot, id + 1, "User", "shadow_User"))
        .await
        .expect_err("an unknown migration");
    assert!(err.message().contains("is not recorded"), "{err:?}");

    // The same migration while copying (as if its coordinator were still in the copy phase).
    dst.batch_execute(&format!(
        "UPDATE pgzm.migrations SET status = 'preparing' WHERE id = {id};
         CREATE TABLE \"shadow_evil\" (LIKE \"User\");
         TRUNCATE \"shadow_User\" CASCADE"
    ))
    .await
    .expect("simulate a running copy");
    for (table, why) in [
        ("User", "only into shadow_ tables"),
        ("shadow_evil", "not a table migration"),
        ("shadow_nowhere", "no such table"),
    ] {
        let err = run(&mut c, task(&p, &snapshot, id, "User", table))
            .await
            .expect_err(table);
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{table}: {err:?}"
        );
        assert!(err.message().contains(why), "{table}: {err:?}");
    }
    // The control: the migration's own shadow table is written.
    let source_users: i64 = src
        .query_one("SELECT count(*) FROM \"User\"", &[])
        .await
        .expect("count")
        .get(0);
    let mut own = task(&p, &snapshot, id, "User", "shadow_User");
    own.freeze = false; // shadow_Comment references it: no TRUNCATE
    let rows = run(&mut c, own)
        .await
        .expect("the migration's own shadow table");
    assert_eq!(rows, u64::try_from(source_users).expect("count"));

    assert_eq!(live_sums(&dst).await, live_before, "a live table changed");
    let log = agent.log();
    assert!(
        log.matches("refused a request").count() >= 6,
        "every refusal is logged: {log}"
    );
    // The run is then removed like any interrupted one.
    dst.batch_execute("DROP TABLE \"shadow_evil\"")
        .await
        .expect("drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holding_named_databases_refuses_connection_strings() {
    let p = fixture_pair("named_only", "simple").await;
    let dst_def = format!("dst={}", p.dest.url());
    let agent = AgentProcess::start(&["--database", &dst_def]).await;
    let mut c = client(&agent).await;
    // A local server the agent could otherwise reach: the probe neither connects nor tells
    // one port from another.
    let mut messages = Vec::new();
    for target in [
        p.source.url(),
        "postgres://postgres@127.0.0.1:1/x".to_string(),
    ] {
        let answer = c
            .probe(proto::ProbeRequest {
                endpoints: vec![url(&target).expect("endpoint")],
            })
            .await
            .expect("probe")
            .into_inner();
        let r = &answer.results[0];
        assert!(!r.ok, "{r:?}");
        assert!(
            r.message
                .contains("connects only to the databases it holds"),
            "{r:?}"
        );
        messages.push(r.message.clone());
    }
    assert_eq!(messages[0], messages[1], "refusals differ by target");
    let err = run(
        &mut c,
        task(&p, "00000003-00000002-1", 1, "User", "shadow_User"),
    )
    .await
    .expect_err("a task with connection strings");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        agent.logs_soon("refused a request").await,
        "{}",
        agent.log()
    );
    // Its own name still works.
    let answer = c
        .probe(proto::ProbeRequest {
            endpoints: vec![proto::Endpoint {
                target: Some(proto::endpoint::Target::Database("dst".into())),
                application_name: String::new(),
            }],
        })
        .await
        .expect("probe")
        .into_inner();
    assert!(answer.results[0].ok, "{:?}", answer.results);
    assert_eq!(answer.results[0].role, "postgres");
}

/// A database failure reaches the coordinator with its kind (read from the SQLSTATE, or the
/// connection failing) in the status metadata, next to the retry flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failure_carries_its_kind_across_grpc() {
    let p = fixture_pair("kind", "simple").await;
    let agent = AgentProcess::start(&[]).await;
    let mut c = client(&agent).await;
    let mut t = task(&p, "00000003-00000002-1", 1, "User", "shadow_User");
    t.destination = url("postgres://postgres@127.0.0.1:1/nowhere");
    let err = run(&mut c, t)
        .await
        .expect_err("an unreachable destination");
    let meta = |k: &str| {
        err.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(
        meta(pgzm_agent::error::KIND_KEY).as_deref(),
        Some("connection"),
        "{err:?}"
    );
    assert_eq!(meta(pgzm_agent::error::RETRYABLE_KEY).as_deref(), Some("1"));
    assert_eq!(meta(pgzm_agent::error::CONNECT_KEY).as_deref(), Some("1"));
    // The agent's own refusal has no database kind.
    let err = run(&mut c, task(&p, "00000003-00000002-1", 1, "User", "User"))
        .await
        .expect_err("no pgzm metadata");
    assert!(err.metadata().get(pgzm_agent::error::KIND_KEY).is_none());
}
