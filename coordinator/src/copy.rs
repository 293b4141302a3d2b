//! The copy phase: one task per table, sent to an agent through the gRPC contract, at most
//! `jobs` at once, largest tables first; retryable failures are retried from scratch (a task
//! is one destination transaction, so a retry never duplicates rows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tracing::{info, info_span, warn, Instrument};

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;

/// One table to copy.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// Source table name.
    pub table: String,
    /// Shadow table name.
    pub shadow: String,
    /// Columns.
    pub columns: Vec<String>,
}

/// Result of one table's copy.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CopyStats {
    /// Rows written.
    pub rows: u64,
    /// COPY payload bytes.
    pub bytes: u64,
    /// Agent-side duration.
    pub duration_ms: u64,
    /// Attempts used.
    pub attempts: u32,
}

/// Shared settings of the copy phase.
#[derive(Clone)]
pub struct CopyContext {
    /// Agent client (in-process or remote).
    pub agent: AgentClient<Channel>,
    /// Source URL (sent to the agent, never logged).
    pub source: DbUrl,
    /// Destination URL.
    pub destination: DbUrl,
    /// Exported snapshot id.
    pub snapshot: String,
    /// Migration id, for task ids.
    pub migration_id: i64,
    /// Retries per task after the first attempt.
    pub retries: u32,
}

/// Copies `jobs` with at most `parallel` tasks at once. `on_done` runs after each table lands
/// (the caller starts that table's index builds there).
pub async fn copy_all<F, Fut>(
    ctx: CopyContext,
    jobs: Vec<CopyJob>,
    parallel: usize,
    on_done: F,
) -> Result<Vec<(String, CopyStats)>, CoordinatorError>
where
    F: Fn(CopyJob, CopyStats) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), CoordinatorError>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(parallel.max(1)));
    let on_done = Arc::new(on_done);
    let mut set = JoinSet::new();
    for (n, job) in jobs.into_iter().enumerate() {
        let ctx = ctx.clone();
        let permits = Arc::clone(&permits);
        let on_done = Arc::clone(&on_done);
        let span = info_span!("table_task", table = %job.table, task = n);
        set.spawn(
            async move {
                let _permit =
                    permits
                        .acquire_owned()
                        .await
                        .map_err(|_| CoordinatorError::Copy {
                            table: job.table.clone(),
                            message: "copy phase cancelled".into(),
                        })?;
                let stats = copy_one(&ctx, &job, n).await?;
                on_done(job.clone(), stats).await?;
                Ok::<_, CoordinatorError>((job.table, stats))
            }
            .instrument(span),
        );
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(err)) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(err);
            }
            Err(join_err) => {
                set.abort_all();
                while set.join_next().await.is_some() {}
                return Err(CoordinatorError::Copy {
                    table: "?".into(),
                    message: format!("copy task panicked: {join_err}"),
                });
            }
        }
    }
    Ok(out)
}

async fn copy_one(
    ctx: &CopyContext,
    job: &CopyJob,
    n: usize,
) -> Result<CopyStats, CoordinatorError> {
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let task = proto::CopyTask {
            task_id: format!("m{}/t{n}/a{attempt}", ctx.migration_id),
            source: Some(proto::Endpoint {
                url: ctx.source.expose().to_string(),
                application_name: "pgzm-agent".into(),
            }),
            destination: Some(proto::Endpoint {
                url: ctx.destination.expose().to_string(),
                application_name: "pgzm-agent".into(),
            }),
            snapshot_id: ctx.snapshot.clone(),
            source_table: Some(proto::TableName {
                schema: "public".into(),
                name: job.table.clone(),
            }),
            destination_table: Some(proto::TableName {
                schema: "public".into(),
                name: job.shadow.clone(),
            }),
            columns: job.columns.clone(),
            progress_every_bytes: 0,
        };
        match run_task(ctx.agent.clone(), task).await {
            Ok(done) => {
                if done.rows_written != done.rows_in_source {
                    return Err(CoordinatorError::Validation {
                        table: job.table.clone(),
                        shadow: i64::try_from(done.rows_written).unwrap_or(i64::MAX),
                        source_rows: i64::try_from(done.rows_in_source).unwrap_or(i64::MAX),
                    });
                }
                info!(
                    rows = done.rows_written,
                    bytes = done.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "table copied"
                );
                return Ok(CopyStats {
                    rows: done.rows_written,
                    bytes: done.bytes,
                    duration_ms: done.duration_ms,
                    attempts: attempt,
                });
            }
            Err(status) => {
                let retryable = matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
                );
                if retryable && attempt <= ctx.retries {
                    let backoff = Duration::from_millis(200 * u64::from(attempt));
                    warn!(attempt, error = %status.message(), "copy attempt failed; retrying");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                return Err(CoordinatorError::Copy {
                    table: job.table.clone(),
                    message: if attempt > 1 {
                        format!("{} (after {attempt} attempts)", status.message())
                    } else {
                        status.message().to_string()
                    },
                });
            }
        }
    }
}

async fn run_task(
    mut agent: AgentClient<Channel>,
    task: proto::CopyTask,
) -> Result<proto::CopyDone, tonic::Status> {
    let mut stream = agent.run_copy(task).await?.into_inner();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(proto::copy_event::Event::Done(done)) => return Ok(done),
            Some(proto::copy_event::Event::Progress(_)) | None => {}
        }
    }
    Err(tonic::Status::unavailable(
        "the agent closed the task stream without a result",
    ))
}
