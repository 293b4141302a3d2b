//! The gRPC service of an agent, and its in-process transport.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use futures_util::StreamExt;
use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use pgzm_proto::agent::v1::agent_server::{Agent, AgentServer};
use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::{Client, CopyOutStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};
use tracing::{info_span, warn, Instrument};

use crate::copy::{open_source, run_copy, CopySpec, RowCounter};
use crate::endpoint::Databases;
use crate::error::{AgentError, Side};
use crate::model::{endpoint, CopyTask, ExportChunk, ExportTask};
use crate::peer::PeerConnector;
use crate::pg::PgTarget;
use crate::pool::SessionPool;

/// Size of the chunks an export stream sends (many COPY rows per gRPC message).
const EXPORT_CHUNK_BYTES: usize = 256 * 1024;

/// Settings of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Copy tasks at once.
    pub max_concurrent_tasks: u32,
    /// Which databases it serves.
    pub side: proto::Side,
    /// Placement label.
    pub region: String,
    /// Address other agents use to reach it.
    pub advertise_url: String,
    /// Named connection strings.
    pub databases: Databases,
    /// How it reaches other agents.
    pub peers: PeerConnector,
    /// Shared secret callers must present.
    pub token: Option<String>,
}

impl AgentConfig {
    /// An in-process agent: both sides, no names, no token.
    pub fn in_process(max_concurrent_tasks: u32) -> Self {
        AgentConfig {
            max_concurrent_tasks: max_concurrent_tasks.max(1),
            side: proto::Side::Both,
            region: String::new(),
            advertise_url: String::new(),
            databases: Databases::default(),
            peers: PeerConnector::default(),
            token: None,
        }
    }
}

/// Implementation of the `pgzm.agent.v1.Agent` service.
#[derive(Clone)]
pub struct AgentService {
    config: Arc<AgentConfig>,
    permits: Arc<Semaphore>,
    sessions: crate::pool::Sessions,
}

impl AgentService {
    /// A service running at most `max_concurrent_tasks` copy tasks at once (at least 1), for
    /// in-process use.
    pub fn new(max_concurrent_tasks: u32) -> Self {
        Self::with_config(AgentConfig::in_process(max_concurrent_tasks))
    }

    /// A service with the given settings.
    pub fn with_config(config: AgentConfig) -> Self {
        let permits = Arc::new(Semaphore::new(config.max_concurrent_tasks.max(1) as usize));
        AgentService {
            config: Arc::new(config),
            permits,
            sessions: crate::pool::Sessions::default(),
        }
    }

    /// The tonic server for this service: checks the token on every call (refusals are logged,
    /// rate-limited: see [`crate::health::RefusalLog`]), and speaks zstd when the caller asks
    /// for it.
    pub fn into_server(
        self,
    ) -> tonic::service::interceptor::InterceptedService<
        AgentServer<AgentService>,
        impl tonic::service::Interceptor + Clone,
    > {
        let token = self.config.token.clone();
        let server = AgentServer::new(self)
            .accept_compressed(CompressionEncoding::Zstd)
            .send_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(64 << 20);
        let refusals = Arc::new(crate::health::RefusalLog::default());
        tonic::service::interceptor::InterceptedService::new(server, move |req: Request<()>| {
            if let Err(status) = crate::peer::check_token(&token, &req) {
                let reason = if req.metadata().get("authorization").is_some() {
                    "wrong token"
                } else {
                    "no token"
                };
                refusals.refused(req.remote_addr(), reason);
                return Err(status);
            }
            Ok(req)
        })
    }

    /// Runs this service inside the current process and returns a gRPC client connected to it
    /// over an in-memory pipe: the coordinator's default "embedded agent", reached through the
    /// same client and messages as a remote one.
    pub async fn into_in_process_client(
        self,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let incoming = tokio_stream::once(Ok::<_, std::io::Error>(server_io));
        tokio::spawn(async move {
            if let Err(err) = Server::builder()
                .add_service(self.into_server())
                .serve_with_incoming(incoming)
                .await
            {
                warn!(error = %err, "in-process agent stopped");
            }
        });
        let mut client_io = Some(client_io);
        let channel = Endpoint::from_static("http://in-process.agent")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let io = client_io.take();
                async move {
                    io.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                        std::io::Error::other("the in-process agent accepts a single connection")
                    })
                }
            }))
            .await?;
        Ok(AgentClient::new(channel))
    }
}

/// Logs a refusal (see [`AgentError::Refused`]) with the call it answered; passes it on.
fn logged(call: &str, err: AgentError) -> AgentError {
    if let AgentError::Refused(reason) = &err {
        warn!(call, reason = %reason, "refused a request");
    }
    err
}

type EventStream = ReceiverStream<Result<proto::CopyEvent, Status>>;
type ChunkStream = ReceiverStream<Result<proto::CopyChunk, Status>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn info(
        &self,
        request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let req = request.into_inner();
        if req.protocol_version != pgzm_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent {} speaks protocol {}, the coordinator {}: run the same pgzm version on both",
                env!("CARGO_PKG_VERSION"),
                pgzm_proto::PROTOCOL_VERSION,
                req.protocol_version
            )));
        }
        Ok(Response::new(proto::InfoResponse {
            protocol_version: pgzm_proto::PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            max_concurrent_tasks: self.config.max_concurrent_tasks,
            side: self.config.side as i32,
            region: self.config.region.clone(),
            databases: self.config.databases.names(),
            advertise_url: self.config.advertise_url.clone(),
        }))
    }

    async fn probe(
        &self,
        request: Request<proto::ProbeRequest>,
    ) -> Result<Response<proto::ProbeResponse>, Status> {
        let mut results = Vec::new();
        for e in request.into_inner().endpoints {
            let e = match endpoint("destination endpoint", "destination endpoint", Some(e)) {
                Ok(e) => e,
                Err(err) => {
                    results.push(proto::ProbeResult {
                        ok: false,
                        message: AgentError::from(err).to_string(),
                        role: String::new(),
                    });
                    continue;
                }
            };
            // A probe does not say which side an endpoint is for: the refusal names both flags.
            let resolved = self
                .config
                .databases
                .resolve(Side::Destination, &e)
                .map_err(|err| match err {
                    AgentError::Refused(_) => AgentError::Refused(format!(
                        "this agent connects only to the databases it holds ({}), not to connection strings from callers: give the coordinator --agent-source-db and --agent-dest-db",
                        self.config.databases.names().join(", ")
                    )),
                    other => other,
                })
                .map_err(|err| logged("Probe", err));
            let result = match resolved {
                Err(err) => proto::ProbeResult {
                    ok: false,
                    message: err.to_string(),
                    role: String::new(),
                },
                Ok((config, app)) => match crate::pg::connect(
                    config,
                    if app.is_empty() { "pgzm-agent" } else { &app },
                )
                .await
                {
                    Err(err) => proto::ProbeResult {
                        ok: false,
                        message: crate::pg::describe(&err),
                        role: String::new(),
                    },
                    Ok(client) => match client
                        .query_one("SELECT version(), current_user::text", &[])
                        .await
                    {
                        Ok(row) => proto::ProbeResult {
                            ok: true,
                            message: row.get(0),
                            role: row.get(1),
                        },
                        Err(err) => proto::ProbeResult {
                            ok: false,
                            message: crate::pg::describe(&err),
                            role: String::new(),
                        },
                    },
                },
            };
            results.push(result);
        }
        Ok(Response::new(proto::ProbeResponse { results }))
    }

    type RunCopyStream = EventStream;

    async fn run_copy(
        &self,
        request: Request<proto::CopyTask>,
    ) -> Result<Response<Self::RunCopyStream>, Status> {
        // The SERVER span of the call (OpenTelemetry's RPC conventions).
        let span = info_span!(
            "agent_task",
            otel.name = "pgzm.agent.v1.Agent/RunCopy",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = crate::telemetry::RPC_SERVICE,
            rpc.method = "RunCopy",
            rpc.grpc.status_code = tracing::field::Empty,
            task = tracing::field::Empty,
            table = tracing::field::Empty,
            shadow = tracing::field::Empty,
            range = tracing::field::Empty,
            rows = tracing::field::Empty,
            bytes = tracing::field::Empty
        );
        crate::telemetry::follow(&span, request.metadata());
        let refused = |span: &tracing::Span, status: Status| {
            crate::telemetry::record_rpc_status(span, status.code());
            status
        };
        let task = CopyTask::try_from(request.into_inner())
            .map_err(|e| refused(&span, AgentError::from(e).into()))?;
        let spec = CopySpec::resolve(task, &self.config.databases)
            .map_err(|e| refused(&span, logged("RunCopy", e).into()))?;
        span.record("task", spec.task.task_id.as_str());
        span.record("table", spec.task.read.table.to_string().as_str());
        span.record("shadow", spec.task.destination_table.to_string().as_str());
        if let Some(r) = spec.task.read.range {
            span.record("range", r.to_string().as_str());
        }
        let permits = Arc::clone(&self.permits);
        let config = Arc::clone(&self.config);
        let sessions = self.sessions.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(
            async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let progress_tx = tx.clone();
                let work = run_copy(&spec, &config.peers, &sessions, move |bytes| {
                    let event = proto::CopyEvent {
                        event: Some(proto::copy_event::Event::Progress(proto::CopyProgress {
                            bytes,
                            rows: 0,
                        })),
                    };
                    // Progress is advisory: drop it rather than wait when the client is slow.
                    let _ = progress_tx.try_send(Ok(event));
                });
                // When the coordinator goes away the copy is abandoned: dropping it closes both
                // connections, and the destination rolls the task's transaction back.
                let started = std::time::Instant::now();
                let result = tokio::select! {
                    result = work => result,
                    () = tx.closed() => return,
                };
                let metrics = crate::metrics::get();
                let attrs = [opentelemetry::KeyValue::new(
                    "table",
                    spec.task.read.table.to_string(),
                )];
                match &result {
                    Ok(o) => {
                        tracing::Span::current()
                            // As i64: tracing-opentelemetry exports u64 fields as strings.
                            .record("rows", i64::try_from(o.rows_written).unwrap_or(i64::MAX))
                            .record("bytes", i64::try_from(o.bytes).unwrap_or(i64::MAX));
                        if !o.already_done {
                            metrics.rows.add(o.rows_written, &attrs);
                            metrics.bytes.add(o.bytes, &attrs);
                            metrics
                                .task_duration
                                .record(started.elapsed().as_secs_f64(), &attrs);
                        }
                    }
                    Err(e) => metrics.failures.add(
                        1,
                        &[
                            attrs[0].clone(),
                            opentelemetry::KeyValue::new("retryable", e.is_retryable()),
                        ],
                    ),
                }
                let message = match result {
                    Ok(outcome) => Ok(proto::CopyEvent {
                        event: Some(proto::copy_event::Event::Done(outcome.into())),
                    }),
                    Err(err) => Err(Status::from(logged("RunCopy", err))),
                };
                crate::telemetry::record_rpc_status(
                    &tracing::Span::current(),
                    message
                        .as_ref()
                        .map_or_else(Status::code, |_| tonic::Code::Ok),
                );
                let _ = tx.send(message).await;
                crate::telemetry::task_ended();
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ExportRangeStream = ChunkStream;

    async fn export_range(
        &self,
        request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportRangeStream>, Status> {
        // The SERVER span of the call, which also reads the source (OpenTelemetry's RPC and
        // database conventions).
        let span = info_span!(
            "export_range",
            otel.name = "pgzm.agent.v1.Agent/ExportRange",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = crate::telemetry::RPC_SERVICE,
            rpc.method = "ExportRange",
            rpc.grpc.status_code = tracing::field::Empty,
            db.system.name = "postgresql",
            db.namespace = tracing::field::Empty,
            db.operation.name = "COPY",
            db.collection.name = tracing::field::Empty,
            server.address = tracing::field::Empty,
            server.port = tracing::field::Empty,
            task = tracing::field::Empty,
            table = tracing::field::Empty,
            rows = tracing::field::Empty
        );
        crate::telemetry::follow(&span, request.metadata());
        let refused = |span: &tracing::Span, status: Status| {
            crate::telemetry::record_rpc_status(span, status.code());
            status
        };
        let task = ExportTask::try_from(request.into_inner())
            .map_err(|e| refused(&span, AgentError::from(e).into()))?;
        let (config, app) = self
            .config
            .databases
            .resolve(Side::Source, &task.source)
            .map_err(|e| refused(&span, logged("ExportRange", e).into()))?;
        span.record("task", task.task_id.as_str());
        span.record("table", task.read.table.to_string().as_str());
        span.record("db.collection.name", task.read.table.to_string().as_str());
        crate::telemetry::record_db_server(&span, &config.server());
        let (tx, rx) = mpsc::channel(8);
        let export = Export {
            source_key: format!("{}\u{0}{}", task.source.session_key(), task.read.snapshot),
            application_name: if app.is_empty() {
                "pgzm-agent".into()
            } else {
                app
            },
            pool: Arc::clone(&self.sessions.source),
            task,
            tx,
        };
        tokio::spawn(export.run(config).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One `ExportRange` stream: the COPY data of a table (range) read under the snapshot, in
/// chunks of about [`EXPORT_CHUNK_BYTES`], then the rows' digest (verified exports) and count.
struct Export {
    task: ExportTask,
    application_name: String,
    /// Session-reuse key of the source (includes the snapshot).
    source_key: String,
    pool: Arc<SessionPool>,
    tx: mpsc::Sender<Result<proto::CopyChunk, Status>>,
}

/// What an export's data stream moved.
struct Exported {
    counter: RowCounter,
    bytes: u64,
}

impl Export {
    /// Opens the source, streams the data, gives the session back for reuse, and ends with the
    /// digest and the row count. A failure ends the stream with its status.
    async fn run(self, config: PgTarget) {
        let started = Instant::now();
        let Some((client, out)) = self.open(config).await else {
            return;
        };
        let Some(exported) = self.stream(out).await else {
            return;
        };
        // Read to the end without error: still in the snapshot's transaction, reusable.
        self.pool.put(self.source_key.clone(), client);
        self.finish(exported, started).await;
    }

    /// The source session (an idle one inside this snapshot, or a new one) and its COPY TO
    /// stream; `None` once the failure is sent.
    async fn open(&self, config: PgTarget) -> Option<(Client, CopyOutStream)> {
        let opened = open_source(
            config,
            &self.application_name,
            &self.task.read,
            self.pool.take(&self.source_key),
        )
        .await;
        match opened {
            Ok(x) => Some(x),
            Err(e) => {
                let status = Status::from(e);
                crate::telemetry::record_rpc_status(&tracing::Span::current(), status.code());
                let _ = self.tx.send(Err(status)).await;
                None
            }
        }
    }

    /// Sends the COPY data in chunks, counting (and digesting) the rows as they pass; `None`
    /// when reading failed (the failure sent) or the importer went away.
    async fn stream(&self, out: CopyOutStream) -> Option<Exported> {
        futures_util::pin_mut!(out);
        let mut exported = Exported {
            counter: RowCounter::new(self.task.verify),
            bytes: 0,
        };
        let mut buf = BytesMut::with_capacity(EXPORT_CHUNK_BYTES * 2);
        while let Some(item) = out.next().await {
            match item {
                Ok(bytes) => {
                    exported.counter.message(&bytes);
                    exported.bytes += bytes.len() as u64;
                    buf.extend_from_slice(&bytes);
                    if buf.len() >= EXPORT_CHUNK_BYTES
                        && !self.send(ExportChunk::Data(buf.split().freeze())).await
                    {
                        return None; // the importer went away
                    }
                }
                Err(e) => {
                    let table = self.task.read.table.to_string();
                    let err = AgentError::copy(&table, "read COPY data", Side::Source, &e);
                    let status = Status::from(err);
                    crate::telemetry::record_rpc_status(&tracing::Span::current(), status.code());
                    let _ = self.tx.send(Err(status)).await;
                    return None;
                }
            }
        }
        if !buf.is_empty() {
            self.send(ExportChunk::Data(buf.split().freeze())).await;
        }
        Some(exported)
    }

    /// Metrics and span fields, then the last messages: the digest (verified exports) and the
    /// row count.
    async fn finish(&self, exported: Exported, started: Instant) {
        crate::telemetry::record_rpc_status(&tracing::Span::current(), tonic::Code::Ok);
        let Exported { counter, bytes } = exported;
        crate::metrics::get().exported_bytes.add(
            bytes,
            &[opentelemetry::KeyValue::new(
                "table",
                self.task.read.table.to_string(),
            )],
        );
        tracing::Span::current().record("rows", i64::try_from(counter.rows()).unwrap_or(i64::MAX));
        if let Some(d) = counter.digest() {
            self.send(ExportChunk::SourceDigest(d.sum)).await;
        }
        self.send(ExportChunk::RowsInSource(counter.rows())).await;
        tracing::debug!(
            rows = counter.rows(),
            ms = started.elapsed().as_millis() as u64,
            "export done"
        );
    }

    /// Sends one message; false when the importer went away.
    async fn send(&self, chunk: ExportChunk) -> bool {
        self.tx.send(Ok(chunk.into())).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Malformed requests are refused at the boundary, before any connection: INVALID_ARGUMENT,
    /// not retryable.
    #[tokio::test]
    async fn malformed_requests_are_invalid_arguments() {
        let mut client = AgentService::new(1)
            .into_in_process_client()
            .await
            .expect("in-process agent");
        let status = client
            .run_copy(proto::CopyTask {
                task_id: "m1/t0/a1".into(),
                ..proto::CopyTask::default()
            })
            .await
            .expect_err("a task without a key is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "invalid copy task: task_key is empty");
        assert_eq!(
            status
                .metadata()
                .get(crate::error::RETRYABLE_KEY)
                .map(|v| v.to_str().ok()),
            Some(Some("0"))
        );
        let status = client
            .export_range(proto::ExportRequest {
                snapshot_id: "00000003-0000001B-1".into(),
                columns: vec!["id".into()],
                ..proto::ExportRequest::default()
            })
            .await
            .expect_err("an export without a source is refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid copy task: source endpoint missing"
        );
    }
}
