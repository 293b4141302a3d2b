//! Placement: a source-side and a destination-side agent that each hold only their own
//! database's credentials (password authentication on two private servers), and the checks
//! that refuse an agent of another protocol version or one that cannot reach its database.

use std::net::SocketAddr;
use std::path::Path;

use pgzm_coordinator::agents::AgentSettings;
use pgzm_coordinator::migrate;
use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_server::{Agent, AgentServer};
use pgzm_tests::PgCluster;
use tonic::{Request, Response, Status};

use crate::support::*;

/// A gRPC server that answers `Info` as an agent of protocol `version` would, and nothing else.
pub struct FakeAgent {
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

struct FakeService {
    version: u32,
}

#[tonic::async_trait]
impl Agent for FakeService {
    async fn info(
        &self,
        _request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        Ok(Response::new(proto::InfoResponse {
            protocol_version: self.version,
            agent_version: "9.9.9".into(),
            max_concurrent_tasks: 1,
            side: proto::Side::Both as i32,
            region: String::new(),
            databases: Vec::new(),
            advertise_url: String::new(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        Err(Status::internal("fake agent: probe must not be reached"))
    }

    type RunCopyStream = tokio_stream::Empty<Result<proto::CopyEvent, Status>>;

    async fn run_copy(
        &self,
        _request: Request<proto::CopyTask>,
    ) -> Result<Response<Self::RunCopyStream>, Status> {
        Err(Status::internal("fake agent: run_copy must not be reached"))
    }

    type ExportRangeStream = tokio_stream::Empty<Result<proto::CopyChunk, Status>>;

    async fn export_range(
        &self,
        _request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportRangeStream>, Status> {
        Err(Status::internal(
            "fake agent: export_range must not be reached",
        ))
    }
}

impl FakeAgent {
    /// Serves on a free loopback port.
    pub async fn serve(version: u32) -> FakeAgent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentServer::new(FakeService { version }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        FakeAgent { addr, server }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_reach_its_database_is_refused_before_any_change() {
    let p = fixture_pair("unreachable", "simple").await;
    let dst = p.dest.connect().await.expect("connect dest");
    let before = public_objects(&dst).await;
    let src_def = format!("src={}", p.source.url());
    let agent = AgentProcess::start(&[
        "--database",
        &src_def,
        "--database",
        "dst=postgres://postgres@127.0.0.1:1/nowhere",
    ])
    .await;
    let url = agent.http_url();

    let named = |dest_name: &str| AgentSettings {
        source_database: Some("src".into()),
        destination_database: Some(dest_name.into()),
        ..settings(&[url.as_str()])
    };
    let err = migrate::start(options(&p), pool(&named("dst")).await)
        .await
        .expect_err("an unreachable destination")
        .to_string();
    assert!(err.contains(&url), "{err}");
    assert!(
        err.contains("cannot reach the destination database"),
        "{err}"
    );
    assert!(
        !err.contains("postgres://"),
        "a connection string leaked: {err}"
    );

    let err = migrate::start(options(&p), pool(&named("nope")).await)
        .await
        .expect_err("a database the agent does not hold")
        .to_string();
    assert!(err.contains("holds no database named \"nope\""), "{err}");

    assert!(!has_pgzm_schema(&dst).await);
    assert_eq!(public_objects(&dst).await, before);
}

/// Passwords of the secured clusters.
const ADMIN_PW: &str = "adm1n-pw-4711";
const SRC_PW: &str = "s0urce-pw-0815";
const DST_PW: &str = "d3st-pw-1337";

/// Creates a login role with a password (the cluster still trusts everyone).
async fn add_role(cluster: &PgCluster, role: &str, password: &str, grants: &str) {
    connect(&cluster.url("postgres"))
        .await
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{password}'; {grants}"
        ))
        .await
        .expect("create role");
}

/// From now on the cluster accepts TCP connections only with a password (SCRAM), and logs
/// every connection.
async fn require_passwords(cluster: &PgCluster) {
    cluster
        .require_passwords(ADMIN_PW)
        .await
        .expect("require passwords");
}

/// `postgres://USER:PASSWORD@127.0.0.1:PORT/DB`.
fn url_as(db: &pgzm_tests::TestDb, cluster: &PgCluster, user: &str, password: &str) -> String {
    format!(
        "postgres://{user}:{password}@127.0.0.1:{}/{}",
        cluster.port(),
        db.name()
    )
}

/// `connection authorized` log lines of `log` for `database` from agents, as the user names.
fn agent_logins(log: &Path, database: &str) -> Vec<String> {
    let text = std::fs::read_to_string(log).expect("read server log");
    let db = format!("database={database} ");
    text.lines()
        .filter(|l| l.contains("connection authorized:") && l.contains(&db))
        .filter(|l| l.contains("application_name=pgzm-agent"))
        .filter_map(|l| {
            let user = l.split("user=").nth(1)?;
            Some(user.split_whitespace().next()?.to_string())
        })
        .collect()
}

/// One migration through a source-side and a destination-side agent holding named databases.
async fn side_by_side(src_cluster: &PgCluster, dst_cluster: &PgCluster, p: &Pair, compress: bool) {
    // No password on the agents' command lines: the source-side agent takes it from
    // PGPASSWORD, the destination-side one from a password file (as libpq would).
    let src_def = format!(
        "src=postgres://src_reader@127.0.0.1:{}/{}",
        src_cluster.port(),
        p.source.name()
    );
    let dst_def = format!(
        "dst=host=127.0.0.1 port={} dbname={} user=dst_writer",
        dst_cluster.port(),
        p.dest.name()
    );
    let passfile =
        std::env::temp_dir().join(format!("pgzm-pgpass-{}-{compress}", std::process::id()));
    std::fs::write(
        &passfile,
        format!(
            "# the destination\n127.0.0.1:{}:*:dst_writer:{DST_PW}\n",
            dst_cluster.port()
        ),
    )
    .expect("write the password file");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600))
            .expect("chmod the password file");
    }
    let passfile_env = passfile.display().to_string();
    let source_agent = AgentProcess::start_with_env(
        &["--side", "source", "--database", &src_def, "-v"],
        &[("PGPASSWORD", SRC_PW)],
    )
    .await;
    let mut dest_args = vec!["--side", "destination", "--database", &dst_def, "-v"];
    if compress {
        dest_args.push("--compress");
    }
    let dest_agent =
        AgentProcess::start_with_env(&dest_args, &[("PGPASSFILE", passfile_env.as_str())]).await;
    for a in [&source_agent, &dest_agent] {
        let argv = std::fs::read(format!("/proc/{}/cmdline", a.pid())).expect("read argv");
        let argv = String::from_utf8_lossy(&argv);
        for pw in [ADMIN_PW, SRC_PW, DST_PW] {
            assert!(
                !argv.contains(pw),
                "a password on an agent's command line: {argv}"
            );
        }
    }

    let admin_src = url_as(&p.source, src_cluster, "postgres", ADMIN_PW);
    let admin_dst = url_as(&p.dest, dst_cluster, "postgres", ADMIN_PW);
    let settings = AgentSettings {
        source_database: Some("src".into()),
        destination_database: Some("dst".into()),
        ..settings(&[source_agent.http_url(), dest_agent.http_url()])
    };
    let mut opts = options_for(&admin_src, &admin_dst);
    opts.range_bytes = SMALL_RANGES;
    let report = migrate::start(opts, pool(&settings).await)
        .await
        .unwrap_or_else(|e| panic!("migration (compress: {compress}): {e}"));

    let src = connect(&admin_src).await;
    let dst = connect(&admin_dst).await;
    assert_migrated(&src, &dst).await;
    let (keys, _) = recorded_tasks(&dst, report.migration_id).await;
    let mut ran: Vec<String> = dest_agent
        .finished_tasks()
        .iter()
        .map(|t| task_key(t))
        .collect();
    ran.sort();
    assert_eq!(
        ran,
        keys.iter().cloned().collect::<Vec<_>>(),
        "the destination-side agent ran every task, once"
    );
    assert!(source_agent.finished_tasks().is_empty());
    let exports = source_agent.log().matches("export done").count();
    assert_eq!(exports, keys.len(), "one export per task");

    // Each agent logged in to its own server only, with its own role.
    let src_logins = agent_logins(src_cluster.log_path(), p.source.name());
    assert!(!src_logins.is_empty());
    assert!(
        src_logins.iter().all(|u| u == "src_reader"),
        "{src_logins:?}"
    );
    let dst_logins = agent_logins(dst_cluster.log_path(), p.dest.name());
    assert!(!dst_logins.is_empty());
    assert!(
        dst_logins.iter().all(|u| u == "dst_writer"),
        "{dst_logins:?}"
    );
    // After the swap the agent's role holds nothing on any table (live, backup, pgzm's) beyond
    // what every role holds (PostGIS's catalog views).
    let held: Vec<String> = dst
        .query(
            "SELECT c.oid::regclass::text || ': ' || p
               FROM pg_class c, unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',
                                             'REFERENCES', 'TRIGGER']) p
              WHERE c.relnamespace IN ('public'::regnamespace, 'pgzm'::regnamespace)
                AND c.relkind IN ('r', 'p', 'v', 'm')
                AND has_table_privilege('dst_writer', c.oid, p)
                AND NOT EXISTS (SELECT 1 FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
                                 WHERE a.grantee = 0 AND a.privilege_type = p)",
            &[],
        )
        .await
        .expect("read privileges")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        held.is_empty(),
        "the agent's role kept privileges: {held:?}"
    );
    let usage: bool = dst
        .query_one(
            "SELECT has_schema_privilege('dst_writer', 'pgzm', 'USAGE')",
            &[],
        )
        .await
        .expect("read schema privilege")
        .get(0);
    assert!(!usage, "the agent's role kept USAGE on pgzm");
    let _ = std::fs::remove_file(&passfile);
    for a in [&source_agent, &dest_agent] {
        let log = a.log();
        for pw in [ADMIN_PW, SRC_PW, DST_PW] {
            assert!(!log.contains(pw), "an agent logged a password: {log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_side_and_destination_side_agents_each_hold_their_own_credentials() {
    let started = std::time::Instant::now();
    let (src_cluster, dst_cluster) = tokio::task::spawn_blocking(|| {
        (
            PgCluster::start().expect("start source cluster"),
            PgCluster::start().expect("start destination cluster"),
        )
    })
    .await
    .expect("start clusters");
    // Two migrations (plain, then compressed streams): databases and fixtures first, while
    // the servers still trust local connections.
    let mut pairs = Vec::new();
    for label in ["sides_plain", "sides_zstd"] {
        let p = fixture_pair_on(&src_cluster, &dst_cluster, label, "tes").await;
        p.source.batch(BIG_TABLE).await.expect("create big");
        pairs.push(p);
    }
    add_role(
        &src_cluster,
        "src_reader",
        SRC_PW,
        "GRANT pg_read_all_data TO src_reader;",
    )
    .await;
    // The destination-side role gets no privilege at all: the coordinator grants it what the
    // copy needs on the shadow tables, and revokes it when the copy ends.
    add_role(&dst_cluster, "dst_writer", DST_PW, "").await;
    require_passwords(&src_cluster).await;
    require_passwords(&dst_cluster).await;
    side_by_side(&src_cluster, &dst_cluster, &pairs[0], false).await;
    side_by_side(&src_cluster, &dst_cluster, &pairs[1], true).await;
    eprintln!("sides: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_needs_an_agent_that_runs_tasks_and_a_source_for_destination_agents() {
    let source_only = AgentProcess::start(&["--side", "source"]).await;
    let err = pool_error(&settings(&[source_only.http_url()])).await;
    assert!(err.contains("no agent can run copy tasks"), "{err}");

    let dest_only = AgentProcess::start(&["--side", "destination"]).await;
    let err = pool_error(&settings(&[dest_only.http_url()])).await;
    assert!(err.contains("need a source-side agent"), "{err}");

    let pool = pool(&settings(&[source_only.http_url(), dest_only.http_url()])).await;
    assert_eq!(pool.executors().len(), 1);
    assert_eq!(pool.source_peer(), Some(source_only.http_url()));
}
