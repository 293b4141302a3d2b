//! The coordinator with real `pgzm-agent` processes on loopback and real PostgreSQL servers
//! (no mocks, except a fake agent of another protocol version):
//! - tasks spread over two and three agents, a large table split into page ranges;
//! - `failover`: an agent SIGKILLed mid-copy (its task is redone elsewhere, nothing twice) or
//!   SIGTERMed (it finishes its running task, the rest goes elsewhere);
//! - `auth`: mTLS with a client CA, the shared token, agent-to-agent mTLS, no plaintext beyond
//!   loopback, SIGTERM;
//! - `health`: the gRPC health service on the agent's port and on a plaintext health port,
//!   NOT_SERVING while it drains; refused calls logged, rate-limited;
//! - `prometheus`: the `--metrics-listen` scrape endpoint after a migration;
//! - `guard`: what a token holder cannot make an agent do (connect where it was not told to,
//!   write outside the shadow tables of a migration that is copying);
//! - `regions`: two network namespaces joined by a shaped link (root only): the link cut for
//!   10 s mid-copy, a source-side agent killed mid-export (the run finishes, nothing that had
//!   committed is copied again);
//! - `placement`: source-side and destination-side agents holding only their own database's
//!   credentials (password authentication), and the refusals before any change: another
//!   protocol version, an unreachable or unknown database, a pool that cannot run tasks.

mod support;

use std::collections::BTreeSet;
use std::time::Instant;

use pgzm_coordinator::agents::{AgentPool, AgentSettings};
use pgzm_coordinator::migrate;
use pgzm_proto::agent::v1 as proto;
use pgzm_tests::inspect;
use support::pki::Pki;
use support::*;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[path = "distributed/auth.rs"]
mod auth;
#[path = "distributed/failover.rs"]
mod failover;
#[path = "distributed/guard.rs"]
mod guard;
#[path = "distributed/health.rs"]
mod health;
#[path = "distributed/pg_tls.rs"]
mod pg_tls;
#[path = "distributed/placement.rs"]
mod placement;
#[path = "distributed/prometheus.rs"]
mod prometheus;
#[path = "distributed/regions.rs"]
mod regions;

/// Migrates the TES fixture plus `big` (split into page ranges) with `n` agents of one task
/// slot each, and checks the result and who did what.
async fn migrate_with_agents(n: usize) {
    let started = Instant::now();
    let p = fixture_pair(&format!("agents{n}"), "tes").await;
    p.source.batch(BIG_TABLE).await.expect("create big");
    let mut agents = Vec::new();
    for _ in 0..n {
        agents.push(AgentProcess::start(&["--max-tasks", "1", "-v"]).await);
    }
    let urls: Vec<String> = agents.iter().map(AgentProcess::http_url).collect();
    let pool = pool(&settings(&urls)).await;
    assert_eq!(pool.capacity(), n);
    let mut opts = options(&p);
    opts.jobs = n;
    opts.range_bytes = SMALL_RANGES;
    let report = migrate::start(opts, pool).await.expect("migration");

    let src = p.source.connect().await.expect("connect source");
    let dst = p.dest.connect().await.expect("connect dest");
    assert_migrated(&src, &dst).await;
    assert_eq!(report.tables.len(), 16, "{:?}", report.tables);

    let keys = recorded_tes_and_big(&dst, report.migration_id).await;

    // The agents' own logs: every recorded task was done by exactly one agent, every agent
    // took part.
    let mut done = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let tasks = a.finished_tasks();
        assert!(
            !tasks.is_empty(),
            "agent {i} ran no task; the tasks went to {:?}",
            agents
                .iter()
                .map(AgentProcess::finished_tasks)
                .collect::<Vec<_>>()
        );
        done.extend(tasks.iter().map(|t| task_key(t)));
    }
    let distinct: BTreeSet<String> = done.iter().cloned().collect();
    assert_eq!(distinct.len(), done.len(), "a task ran twice: {done:?}");
    assert_eq!(distinct, keys);

    // The same as the embedded agent makes of the same data: live tables and backups.
    let embedded = fixture_pair(&format!("embedded{n}"), "tes").await;
    embedded.source.batch(BIG_TABLE).await.expect("create big");
    let opts = options(&embedded);
    let in_process = AgentPool::in_process(opts.jobs)
        .await
        .expect("in-process agent");
    migrate::start(opts, in_process)
        .await
        .expect("embedded migration");
    let edst = embedded.dest.connect().await.expect("connect dest");
    assert_eq!(live_sums(&dst).await, live_sums(&edst).await);
    for prefix in [None, Some("backup_")] {
        let ours = inspect::catalog_signature(&dst, prefix).await.expect("sig");
        let theirs = inspect::catalog_signature(&edst, prefix)
            .await
            .expect("sig");
        let diff = ours.differences(&theirs);
        assert!(diff.is_empty(), "{prefix:?}: {}", diff.join("\n"));
    }
    eprintln!("{n} agents: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_the_copy() {
    migrate_with_agents(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_share_the_copy() {
    migrate_with_agents(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_of_another_protocol_version_is_refused_before_any_change() {
    let p = fixture_pair("version", "simple").await;
    let dst = p.dest.connect().await.expect("connect dest");
    let before = public_objects(&dst).await;

    // An agent of another version (a fake: only its Info answer matters).
    let fake = placement::FakeAgent::serve(999).await;
    let err = pool_error(&settings(&[fake.url()])).await;
    assert!(err.contains("999"), "{err}");
    assert!(
        err.contains(&format!(
            "this pgzm speaks {}",
            pgzm_proto::PROTOCOL_VERSION
        )),
        "{err}"
    );
    assert!(err.contains(&fake.url()), "{err}");

    // A real agent asked by a coordinator of another version says so too.
    let agent = AgentProcess::start(&[]).await;
    let mut client = pgzm_agent::peer::PeerConnector::default()
        .connect(&agent.http_url())
        .await
        .expect("connect");
    let status = client
        .info(proto::InfoRequest {
            protocol_version: 999,
        })
        .await
        .expect_err("info with protocol 999");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("999"), "{}", status.message());
    assert!(
        status
            .message()
            .contains(&format!("speaks protocol {}", pgzm_proto::PROTOCOL_VERSION)),
        "{}",
        status.message()
    );

    assert!(!has_pgzm_schema(&dst).await);
    assert_eq!(public_objects(&dst).await, before);
}

/// Settings with TLS towards agents: trust `ca`, present the identity `NAME.pem`/`NAME.key`
/// if given.
fn tls_settings(url: &str, pki: &Pki, ca: &str, identity: Option<&str>) -> AgentSettings {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.read(ca)));
    if let Some(name) = identity {
        tls = tls.identity(Identity::from_pem(
            pki.read(&format!("{name}.pem")),
            pki.read(&format!("{name}.key")),
        ));
    }
    let mut s = settings(&[url]);
    s.connector.tls = Some(tls);
    s
}
