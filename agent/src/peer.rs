//! Calls between agents (a destination-side agent pulling from a source-side one) and the
//! shared-secret authentication every agent call carries.

use bytes::Bytes;
use futures_util::StreamExt;
use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};
use tracing::Instrument;

use crate::digest::Digest;
use crate::error::{AgentError, Side};
use crate::model::{ExportChunk, ExportTask};
use crate::pg::ErrorKind;
use crate::stream::{SourceItem, SourceStream};

/// Silence on an agent connection after which an HTTP/2 ping is sent (by callers and, on its
/// port, by the agent).
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a ping may go unanswered before the connection, and every call on it, is given up:
/// a link partitioned for longer fails the streams crossing it (the tasks are retried) rather
/// than leaving them waiting.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How this process connects to agents: TLS settings, the shared token, compression.
#[derive(Clone, Default)]
pub struct PeerConnector {
    /// TLS for `https://` agents (CA, client identity).
    pub tls: Option<ClientTlsConfig>,
    /// Shared secret sent as `authorization: Bearer …`.
    pub token: Option<String>,
    /// Ask peers for zstd-compressed streams.
    pub compress: bool,
}

impl std::fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConnector")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("compress", &self.compress)
            .finish()
    }
}

impl PeerConnector {
    /// Connects to an agent at `url` (`http://` or `https://`).
    pub async fn connect(
        &self,
        url: &str,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(url.to_string())?
            .connect_timeout(std::time::Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        if url.starts_with("https://") {
            endpoint = endpoint.tls_config(
                self.tls
                    .clone()
                    .unwrap_or_else(|| ClientTlsConfig::new().with_enabled_roots()),
            )?;
        }
        let channel = endpoint.connect().await?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(64 << 20);
        if self.compress {
            client = client
                .accept_compressed(CompressionEncoding::Zstd)
                .send_compressed(CompressionEncoding::Zstd);
        }
        Ok(client)
    }

    /// Wraps a message into a request carrying the token and the current span's trace
    /// context.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        crate::telemetry::inject(req.metadata_mut());
        if let Some(token) = &self.token {
            if let Ok(v) = MetadataValue::try_from(format!("Bearer {token}")) {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
    }

    /// Opens a source-side agent's export stream for `table`. A chunk that breaks the
    /// protocol (a malformed digest) fails the stream.
    pub async fn export(
        &self,
        url: &str,
        request: ExportTask,
        table: &str,
    ) -> Result<SourceStream, AgentError> {
        let peer_err = |message: String, kind: ErrorKind| AgentError::Copy {
            table: table.to_string(),
            step: "read from the source-side agent",
            side: Side::Source,
            message,
            kind,
        };
        // The CLIENT span of the call: it lasts as long as the stream.
        let rpc = crate::telemetry::rpc_client_span("ExportRange", url);
        let mut client = self
            .connect(url)
            .await
            .map_err(|e| AgentError::PeerUnreachable {
                url: url.to_string(),
                message: crate::pg::with_causes(e.to_string(), std::error::Error::source(&e)),
            })?;
        let stream = client
            .export_range(rpc.in_scope(|| self.request(proto::ExportRequest::from(request))))
            .instrument(rpc.clone())
            .await
            .map_err(|s| {
                crate::telemetry::record_rpc_status(&rpc, s.code());
                peer_err(s.message().to_string(), status_kind(&s))
            })?
            .into_inner();
        let table = table.to_string();
        let mut digest = None;
        // The stream keeps its client: hyper pings (HTTP/2 keepalive) only on a connection that
        // a client still holds, and without the pings a stream stalled by a partitioned link
        // would wait for TCP to give up (about 15 minutes) instead of failing after
        // `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT` of silence.
        let client = client;
        Ok(Box::pin(stream.map(move |item| {
            let _ = &client;
            let chunk = item.map_err(|s| {
                crate::telemetry::record_rpc_status(&rpc, s.code());
                (s.message().to_string(), status_kind(&s))
            });
            let chunk = chunk.and_then(|c| {
                ExportChunk::try_from(c).map_err(|e| {
                    (
                        format!("the source-side agent broke the protocol: {e}"),
                        ErrorKind::Other,
                    )
                })
            });
            match chunk {
                Ok(ExportChunk::Data(d)) => Ok(SourceItem::Data(d)),
                Ok(ExportChunk::SourceDigest(sum)) => {
                    digest = Some(sum);
                    Ok(SourceItem::Data(Bytes::new()))
                }
                Ok(ExportChunk::RowsInSource(rows)) => {
                    crate::telemetry::record_rpc_status(&rpc, tonic::Code::Ok);
                    Ok(SourceItem::End {
                        rows,
                        digest: digest.take().map(|sum| Digest { rows, sum }),
                    })
                }
                Err((message, kind)) => Err(AgentError::Copy {
                    table: table.clone(),
                    step: "read from the source-side agent",
                    side: Side::Source,
                    message,
                    kind,
                }),
            }
        })))
    }
}

/// The kind of a failure received from another agent: the one it names, else a broken
/// transport (retryable) or another failure (not).
pub fn status_kind(s: &Status) -> ErrorKind {
    if let Some(kind) = s
        .metadata()
        .get(crate::error::KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse)
    {
        return kind;
    }
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded => ErrorKind::Connection,
        _ => ErrorKind::Other,
    }
}

/// Server-side check of the shared token (constant-time comparison).
pub fn check_token(expected: &Option<String>, req: &Request<()>) -> Result<(), Status> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let got = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let want = format!("Bearer {expected}");
    let same = got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Status::unauthenticated(
            "this agent requires the shared token (PGZM_AGENT_TOKEN) of its coordinator",
        ))
    }
}
