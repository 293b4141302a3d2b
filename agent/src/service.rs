//! The gRPC service of an agent, and its in-process transport.

use std::sync::Arc;

use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use pgzm_proto::agent::v1::agent_server::{Agent, AgentServer};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Server, Uri};
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::copy::{run_copy, CopySpec};

/// Implementation of the `pgzm.agent.v1.Agent` service.
#[derive(Clone)]
pub struct AgentService {
    max_concurrent_tasks: u32,
    permits: Arc<Semaphore>,
}

impl AgentService {
    /// A service running at most `max_concurrent_tasks` copy tasks at once (at least 1).
    pub fn new(max_concurrent_tasks: u32) -> Self {
        let max = max_concurrent_tasks.max(1);
        AgentService {
            max_concurrent_tasks: max,
            permits: Arc::new(Semaphore::new(max as usize)),
        }
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
                .add_service(AgentServer::new(self))
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

type EventStream = ReceiverStream<Result<proto::CopyEvent, Status>>;

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
            max_concurrent_tasks: self.max_concurrent_tasks,
        }))
    }

    type RunCopyStream = EventStream;

    async fn run_copy(
        &self,
        request: Request<proto::CopyTask>,
    ) -> Result<Response<Self::RunCopyStream>, Status> {
        let spec = CopySpec::try_from(request.into_inner())?;
        let permits = Arc::clone(&self.permits);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            let progress_tx = tx.clone();
            let work = run_copy(&spec, move |bytes| {
                let event = proto::CopyEvent {
                    event: Some(proto::copy_event::Event::Progress(proto::CopyProgress {
                        bytes,
                    })),
                };
                // Progress is advisory: drop it rather than wait when the client is slow.
                let _ = progress_tx.try_send(Ok(event));
            });
            // When the coordinator goes away the copy is abandoned: dropping it closes both
            // connections, and the destination rolls the task's transaction back.
            let result = tokio::select! {
                result = work => result,
                () = tx.closed() => return,
            };
            let message = match result {
                Ok(outcome) => Ok(proto::CopyEvent {
                    event: Some(proto::copy_event::Event::Done(outcome.into())),
                }),
                Err(err) => Err(Status::from(err)),
            };
            let _ = tx.send(message).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
