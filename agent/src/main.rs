//! `pgzm-agent`: the data-plane daemon. Runs copy tasks for coordinators (and exports for other
//! agents) near the databases.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use pgzm_agent::endpoint::Databases;
use pgzm_agent::health::Health;
use pgzm_agent::peer::PeerConnector;
use pgzm_agent::prometheus::Snapshot;
use pgzm_agent::service::{AgentConfig, AgentService};
use pgzm_agent::telemetry::{self, LogFormat};
use pgzm_proto::agent::v1 as proto;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tracing::{info, warn};

/// Which databases this agent serves.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SideArg {
    /// Reaches both databases: runs whole tasks.
    Both,
    /// Near the source: serves exports to destination-side agents.
    Source,
    /// Near the destination: runs tasks, reading from a source-side agent.
    Destination,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// pg_zero_migration agent: moves table data for a pgzm coordinator.
#[derive(Debug, Parser)]
#[command(name = "pgzm-agent", version, about)]
struct Args {
    /// Address to listen on, HOST:PORT.
    #[arg(long)]
    listen: SocketAddr,
    /// Server certificate (PEM); with --tls-key enables TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) whose client certificates are required from callers (coordinators and agents).
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// CA (PEM) to verify other agents' server certificates (default: --tls-client-ca). This
    /// agent presents --tls-cert to them.
    #[arg(long)]
    tls_peer_ca: Option<PathBuf>,
    /// Shared token callers must present. Default: $PGZM_AGENT_TOKEN.
    #[arg(long, env = "PGZM_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Listen without TLS on a non-loopback address (traffic, including database passwords
    /// sent in tasks, would be readable on the network).
    #[arg(long)]
    allow_insecure_listen: bool,
    /// Which databases this agent serves.
    #[arg(long, value_enum, default_value_t = SideArg::Both)]
    side: SideArg,
    /// Placement label reported to the coordinator, e.g. eu-west-1.
    #[arg(long, default_value = "")]
    region: String,
    /// A connection string this agent holds, NAME=URL (repeatable); coordinators then send the
    /// name instead of credentials.
    #[arg(long = "database", value_name = "NAME=URL")]
    databases: Vec<String>,
    /// Copy tasks run at once (default: number of CPUs).
    #[arg(long)]
    max_tasks: Option<u32>,
    /// URL other agents use to reach this one (default: the one the coordinator uses).
    #[arg(long, default_value = "")]
    advertise_url: String,
    /// Ask source-side agents for zstd-compressed streams (pays on links slower than ~1 Gbit/s).
    #[arg(long)]
    compress: bool,
    /// Also serve the gRPC health service (grpc.health.v1.Health, and nothing else) on this
    /// address, HOST:PORT, without TLS: for probes that cannot present a certificate, such as
    /// Kubernetes' gRPC probes. NOT_SERVING once the agent drains.
    #[arg(long, value_name = "HOST:PORT")]
    health_listen: Option<SocketAddr>,
    /// Serve the agent's metrics for Prometheus at http://HOST:PORT/metrics (plaintext, metrics
    /// only; rendered every 5 s and after tasks end).
    #[arg(long, value_name = "HOST:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn read(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

async fn run(args: Args, prometheus: Option<Snapshot>) -> anyhow::Result<()> {
    let databases = Databases::parse(&args.databases).map_err(anyhow::Error::msg)?;
    // Pings on every connection, idle or not: a caller gone behind a partitioned link is given
    // up after `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT`, and the calls it made with it (an
    // export waiting to send its next chunk, holding a source session in the snapshot) end
    // instead of waiting for TCP to give up (about 15 minutes).
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(pgzm_agent::peer::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(pgzm_agent::peer::KEEPALIVE_TIMEOUT));
    let mut peer_tls = None;
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (read(cert)?, read(key)?);
            let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert, &key));
            if let Some(ca) = &args.tls_client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
            }
            builder = builder.tls_config(tls).context("configure TLS")?;
            let mut client = ClientTlsConfig::new().identity(Identity::from_pem(cert, key));
            if let Some(ca) = args.tls_peer_ca.as_ref().or(args.tls_client_ca.as_ref()) {
                client = client.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            peer_tls = Some(client);
        }
        _ => {
            if !args.listen.ip().is_loopback() && !args.allow_insecure_listen {
                bail!(
                    "refusing to listen without TLS on {}: give --tls-cert/--tls-key (and --tls-client-ca), listen on loopback, or pass --allow-insecure-listen",
                    args.listen
                );
            }
        }
    }
    let config = AgentConfig {
        max_concurrent_tasks: args
            .max_tasks
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(2)
            })
            .max(1),
        side: match args.side {
            SideArg::Both => proto::Side::Both,
            SideArg::Source => proto::Side::Source,
            SideArg::Destination => proto::Side::Destination,
        },
        region: args.region.clone(),
        advertise_url: args.advertise_url.clone(),
        databases,
        peers: PeerConnector {
            tls: peer_tls,
            token: args.token.clone().filter(|t| !t.is_empty()),
            compress: args.compress,
        },
        token: args.token.clone().filter(|t| !t.is_empty()),
    };
    if config.token.is_none() && args.tls_client_ca.is_none() {
        warn!("no --token and no --tls-client-ca: any process that can reach this port can use the agent");
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    info!(listen = %local, side = ?config.side, region = %config.region, tasks = config.max_concurrent_tasks,
          tls = args.tls_cert.is_some(), client_auth = args.tls_client_ca.is_some(), "pgzm-agent listening");
    // Signal handlers go in before the port is announced: a supervisor may stop the agent as
    // soon as it knows the agent is up.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let (health, health_service) = Health::new().await;
    // The plaintext health port: up before the agent's port is announced, down after it stops.
    let (stop_health, health_stopped) = tokio::sync::oneshot::channel::<()>();
    let health_server = match args.health_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen on {addr} (--health-listen)"))?;
            let local = listener.local_addr()?;
            info!(listen = %local, "health service listening (plaintext, health only)");
            println!("health listening on {local}");
            let service = health_service.clone();
            Some(tokio::spawn(
                Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = health_stopped.await;
                        },
                    ),
            ))
        }
        None => None,
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match (args.metrics_listen, prometheus) {
        (Some(addr), Some(snapshot)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listen on {addr} (--metrics-listen)"))?;
            let local = listener.local_addr()?;
            info!(listen = %local, "Prometheus metrics at /metrics (plaintext, metrics only)");
            println!("metrics listening on {local}");
            Some(tokio::spawn(pgzm_agent::prometheus::serve(
                listener,
                snapshot,
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        _ => None,
    };
    // The port goes to stdout too, so a supervisor (or test) that asked for port 0 learns it.
    println!("listening on {local}");
    // Small messages (task events) must not wait for Nagle's algorithm.
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    let draining = health.clone();
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        draining.draining().await;
        info!("shutting down: no new tasks; running tasks finish; health reports NOT_SERVING");
    };
    let reflection = pgzm_agent::health::reflection().context("build the reflection service")?;
    let served = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AgentService::with_config(config).into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serve");
    let _ = stop_health.send(());
    let _ = stop_metrics.send(());
    if let Some(task) = metrics_server {
        let _ = task.await;
    }
    if let Some(task) = health_server {
        if let Ok(Err(e)) = task.await {
            warn!(error = %e, "the health service stopped with an error");
        }
    }
    served?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let default = match args.verbose {
        0 => "info,tokio_postgres=warn",
        1 => "pgzm_agent=debug,info",
        _ => "trace",
    };
    let runtime = match pgzm_agent::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgzm-agent: error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = match args.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    };
    let prometheus = args.metrics_listen.map(|_| Snapshot::default());
    let telemetry = {
        let _g = runtime.enter();
        let telemetry = telemetry::init(
            "pgzm-agent",
            default,
            format,
            args.verbose,
            prometheus.as_ref(),
        );
        telemetry.flush_metrics_after_tasks();
        telemetry
    };
    let result = runtime.block_on(run(args, prometheus));
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgzm-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
