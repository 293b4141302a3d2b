//! The copy phase: tasks — one per table, or per page range of a large table — dispatched to
//! the agents' task slots, largest first. A task is one destination transaction that also records
//! it in `pgzm.copy_progress`, so a retry (after a transient database error, or on another agent
//! when one dies or stalls) never duplicates rows and completed ranges are never copied again.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgzm_agent::error::RETRYABLE_KEY;
use pgzm_agent::model::{
    CopyDone, CopyTask, MigrationId, PageRange, SnapshotId, SourceRead, TaskId, TaskKey,
};
use pgzm_pg::sql::QualifiedName;
use pgzm_proto::agent::v1 as proto;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tracing::{info, info_span, warn, Instrument};

use crate::agents::{AgentHandle, AgentPool};
use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::name::Name;

/// A task's agent-side silence after which it is given up on that agent (agents report
/// progress at least every 2 s).
pub const STALL: Duration = Duration::from_secs(60);

/// Whole tables at least this large are loaded with `COPY FREEZE` (after a `TRUNCATE` in the
/// same transaction, which creates new relation files: not worth it for small tables).
const FREEZE_MIN_BYTES: i64 = 16 << 20;

/// Agents report a task's progress about every this many bytes (the ETA's resolution).
const PROGRESS_EVERY_BYTES: u64 = 1 << 20;

/// One table to copy.
#[derive(Debug, Clone)]
pub struct CopyJob {
    /// Its tasks' key prefix in `pgzm.copy_progress`: stable across runs of a migration (the
    /// table's quoted, qualified name), so that a resumed run knows what landed.
    pub key: String,
    /// Schema of the source table and its shadow.
    pub schema: Name,
    /// Source table name.
    pub table: Name,
    /// Shadow table name.
    pub shadow: Name,
    /// Columns.
    pub columns: Vec<Name>,
    /// Heap pages of the source table (for splitting).
    pub pages: i64,
    /// Estimated bytes (heap + TOAST).
    pub bytes: i64,
    /// Expected COPY bytes from the source's statistics (0: unknown), for the progress.
    pub copy_bytes: i64,
}

impl CopyJob {
    /// Its live name as traces and metrics label tables: `schema.name`.
    pub fn live_label(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The table as reports name it: its name in `public`, `schema.name` elsewhere.
    pub fn report_name(&self) -> String {
        crate::naming::QualName::new(self.schema.clone(), self.table.clone()).display_name()
    }
}

/// Result of one table's copy.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, schemars::JsonSchema)]
pub struct CopyStats {
    /// Rows written.
    pub rows: u64,
    /// COPY payload bytes.
    pub bytes: u64,
    /// Agent-side duration (sum over ranges).
    pub duration_ms: u64,
    /// Attempts used (sum over ranges).
    pub attempts: u32,
    /// Tasks (ranges) the table was split into.
    pub tasks: u32,
    /// Sum of the tasks' digests; `None` once a task came without one.
    #[serde(skip)]
    pub digest: Option<pgzm_agent::digest::Digest>,
}

/// Shared settings of the copy phase.
#[derive(Clone)]
pub struct CopyContext {
    /// Source URL (sent to agents unless they hold a named one; never logged).
    pub source: DbUrl,
    /// Destination URL.
    pub destination: DbUrl,
    /// Exported snapshot id.
    pub snapshot: String,
    /// Migration id, for task ids and keys.
    pub migration_id: i64,
    /// Retries per task after a transient database error.
    pub retries: u32,
    /// Split tables larger than this into page ranges of about this size.
    pub range_bytes: i64,
    /// Digest the rows on both sides of every task.
    pub verify: bool,
    /// A task with no word from its agent for this long is taken from it.
    pub stall: Duration,
    /// Each task's share (parts per million) of the run's byte-rate budget (`--max-rate`,
    /// changeable with `pgzm throttle`): the budget over the tasks that run at once.
    pub rate_share_ppm: u32,
}

/// The `application_name` of the database sessions of agent `agent` (its index in the pool) in
/// migration `migration_id`: how the coordinator finds, and ends, the sessions of an agent it
/// gave up on, and a run's cleanup those of all its agents.
pub fn session_tag(migration_id: i64, agent: usize) -> String {
    format!("pgzm-agent m{migration_id} a{agent}")
}

/// The `LIKE` pattern of every agent session of migration `migration_id`.
pub fn session_tag_pattern(migration_id: i64) -> String {
    format!("pgzm-agent m{migration_id} a%")
}

/// How long [`terminate_sessions`] tries: the database may be behind a link that is down
/// (a connection attempt would wait for TCP to give up, minutes).
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ends the sessions whose `application_name` is `LIKE pattern` on `db` (other than this
/// one), so that a stalled or frozen agent's open transaction neither holds locks on shadow
/// tables nor writes after its task was given to another agent. Best effort, for at most
/// [`TERMINATE_TIMEOUT`]: returns how many were ended, or why none could be.
pub async fn terminate_sessions(db: &DbUrl, pattern: &str) -> Result<u64, String> {
    let ended = async {
        let client = db
            .connect("pgzm-coordinator")
            .await
            .map_err(|e| e.to_string())?;
        end_sessions(&client, pattern)
            .await
            .map_err(|e| pgzm_pg::conn::describe(&e))
    };
    tokio::time::timeout(TERMINATE_TIMEOUT, ended)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from the {} database within {} s",
                db.side(),
                TERMINATE_TIMEOUT.as_secs()
            ))
        })
}

/// Ends, through `client`, the other sessions of its database whose `application_name` is
/// `LIKE pattern`; how many.
pub async fn end_sessions(client: &Client, pattern: &str) -> Result<u64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) AS ended
               FROM pg_stat_activity
              WHERE application_name LIKE $1 AND pid <> pg_backend_pid()
                AND datname = current_database()",
            &[&pattern],
        )
        .await?;
    Ok(row.get::<_, i64>("ended").max(0) as u64)
}

#[derive(Debug, Clone)]
struct Task {
    job: usize,
    key: String,
    range: Option<PageRange>,
    attempts: u32,
    failovers: u32,
    /// When its first failure to connect happened (see [`RESTART_PATIENCE`]).
    failing_since: Option<Instant>,
}

/// How long a task whose agent cannot connect keeps being retried, beyond its retry count: a
/// destination or source restart (crash recovery, a failover) refuses connections for a while.
pub const RESTART_PATIENCE: Duration = Duration::from_secs(60);

/// The progress estimate of a job: its expected COPY bytes, else its heap + TOAST bytes.
pub fn progress_estimate(job: &CopyJob) -> u64 {
    if job.copy_bytes > 0 {
        job.copy_bytes as u64
    } else {
        job.bytes.max(0) as u64
    }
}

/// A task's share of its table's progress estimate (a range's share is its share of the pages).
fn estimate(task: &Task, job: &CopyJob) -> u64 {
    let bytes = progress_estimate(job);
    match task.range {
        Some(r) if job.pages > 0 => {
            let pages = job.pages as u64;
            let end = r.end.map_or(pages, |end| end.min(pages));
            (bytes as u128 * u128::from(end.saturating_sub(r.start)) / u128::from(pages)) as u64
        }
        _ => bytes,
    }
}

/// Splits a job into page-range tasks of about `range_bytes` each (one task when small).
fn split(job_index: usize, job: &CopyJob, range_bytes: i64) -> Vec<Task> {
    let parts = if range_bytes > 0 && job.bytes > range_bytes && job.pages > 1 {
        ((job.bytes + range_bytes - 1) / range_bytes)
            .min(job.pages)
            .max(1)
    } else {
        1
    };
    if parts == 1 {
        return vec![Task {
            job: job_index,
            key: job.key.clone(),
            range: None,
            attempts: 0,
            failovers: 0,
            failing_since: None,
        }];
    }
    let per = (job.pages + parts - 1) / parts;
    (0..parts)
        .map(|i| {
            let start = (i * per) as u64;
            // The last range is open: it takes the pages the table grew by since its statistics.
            let end = (i != parts - 1).then_some(((i + 1) * per) as u64);
            Task {
                job: job_index,
                key: format!("{}/p{start}", job.key),
                range: Some(PageRange { start, end }),
                attempts: 0,
                failovers: 0,
                failing_since: None,
            }
        })
        .collect()
}

struct Queue {
    tasks: VecDeque<Task>,
    in_flight: usize,
    failed: Option<CoordinatorError>,
    remaining: BTreeMap<usize, usize>,
    stats: BTreeMap<usize, CopyStats>,
    /// When the last task landed.
    last_landed: Option<Instant>,
}

/// What the copy phase did.
pub struct Copied {
    /// Per table, in plan order.
    pub tables: Vec<(String, CopyStats)>,
    /// From the start of the phase to the moment the last copy task landed: the data movement
    /// alone (the phase itself also waits for the last index builds).
    pub data_time: Duration,
}

/// Keeps `pgzm.migrations.copy_tasks_left` at the number of tasks not finished (queued or
/// running), checked every second, until dropped. A task that fails goes back to the queue,
/// so the number never grows: what an agent read a moment ago is at least the number running
/// now, and dividing the budget by it never gives more than the budget away.
struct TasksLeft(Option<tokio::task::JoinHandle<()>>);

impl TasksLeft {
    async fn start(dest: &DbUrl, migration_id: i64, queue: Arc<Mutex<Queue>>) -> TasksLeft {
        const SQL: &str = "UPDATE pgzm.migrations SET copy_tasks_left = $2 WHERE id = $1";
        let left = |q: &Mutex<Queue>| {
            let q = lock(q);
            i32::try_from(q.tasks.len() + q.in_flight).unwrap_or(i32::MAX)
        };
        let client = match dest.connect("pgzm-coordinator").await {
            Ok(c) => c,
            Err(e) => {
                // The budget then stays split by --jobs alone.
                tracing::debug!(error = %e, "cannot publish the copy tasks left");
                return TasksLeft(None);
            }
        };
        let mut published = left(&queue);
        if let Err(e) = client.execute(SQL, &[&migration_id, &published]).await {
            tracing::debug!(error = %pgzm_pg::conn::describe(&e), "cannot publish the copy tasks left");
            return TasksLeft(None);
        }
        TasksLeft(Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = left(&queue);
                if now != published && client.execute(SQL, &[&migration_id, &now]).await.is_ok() {
                    published = now;
                }
            }
        })))
    }
}

impl Drop for TasksLeft {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The queue, also after a panic of another holder (its state is still consistent: every
/// change is a single assignment).
fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

enum Outcome {
    Done(CopyDone),
    /// The task failed; retry when `retry`.
    Failed {
        /// The agent could not connect to a database (the server may be restarting).
        connect: bool,
        /// What went wrong in the database, as the agent classified it.
        kind: Option<pgzm_pg::conn::ErrorKind>,
        message: String,
        retry: bool,
    },
    /// The agent failed (transport, stall): retry elsewhere.
    AgentLost(String),
}

/// Copies `jobs` with at most `parallel` tasks at once across the pool's agents. `on_done`
/// runs once per table, as soon as all of its tasks have landed (the caller builds that
/// table's indexes there), at most `parallel` at once, beside the copies: a copy slot goes on
/// to its next task while the table it just copied is being indexed.
pub async fn copy_all<F, Fut>(
    ctx: CopyContext,
    pool: Arc<AgentPool>,
    jobs: Vec<CopyJob>,
    parallel: usize,
    on_done: F,
) -> Result<Copied, CoordinatorError>
where
    F: Fn(CopyJob, CopyStats) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), CoordinatorError>> + Send + 'static,
{
    let started = Instant::now();
    let queue = Queue::planned(&jobs, ctx.range_bytes);
    // Fewer tasks than slots: the tasks that can run at once split the byte-rate budget, so a
    // run of one table gets all of it rather than its 1/--jobs share.
    let mut ctx = ctx;
    let at_once = parallel.min(queue.tasks.len()).max(1) as u64;
    ctx.rate_share_ppm = ctx
        .rate_share_ppm
        .max(u32::try_from(1_000_000 / at_once).unwrap_or(1_000_000));
    // The progress total is the sum of the tasks' own estimates, so that it is reached exactly.
    crate::progress::enable(queue.tasks.iter().map(|t| estimate(t, &jobs[t.job])).sum());
    let queue = Arc::new(Mutex::new(queue));
    // Publishes how many tasks are left, for the agents' share of the byte-rate budget; the
    // first value is in place before any task starts (a resumed run's row holds the old one).
    let _tasks_left =
        TasksLeft::start(&ctx.destination, ctx.migration_id, Arc::clone(&queue)).await;
    let notify = Arc::new(Notify::new());
    let jobs = Arc::new(jobs);
    let (build_tx, build_rx) = tokio::sync::mpsc::unbounded_channel();
    let builder = tokio::spawn(
        run_builds(
            build_rx,
            on_done,
            parallel.max(1),
            Arc::clone(&queue),
            Arc::clone(&notify),
        )
        .instrument(tracing::Span::current()),
    );
    let executors = pool.executors();
    let agent_count = executors.len() as u32;
    let mut set = JoinSet::new();
    for (n, agent) in slots(&executors, parallel.max(1)).into_iter().enumerate() {
        let w = Worker {
            phase: tracing::Span::current(),
            ctx: ctx.clone(),
            pool: Arc::clone(&pool),
            agent,
            queue: Arc::clone(&queue),
            notify: Arc::clone(&notify),
            jobs: Arc::clone(&jobs),
            agent_count,
            builds: build_tx.clone(),
        };
        set.spawn(w.run().instrument(info_span!("copy_slot", slot = n)));
    }
    drop(build_tx);
    join_slots(set, &queue, &notify).await;
    // Every copy has ended: the builds still running finish (or, after a failure, stop).
    crate::progress::disable();
    finish_builds(builder, &queue).await;
    copied(&queue, &jobs, started)
}

impl Queue {
    /// Every job's tasks (a job larger than `range_bytes` split into page ranges), in order.
    fn planned(jobs: &[CopyJob], range_bytes: i64) -> Queue {
        let mut tasks = Vec::new();
        let mut remaining = BTreeMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let parts = split(i, job, range_bytes);
            remaining.insert(i, parts.len());
            tasks.extend(parts);
        }
        Queue {
            tasks: tasks.into(),
            in_flight: 0,
            failed: None,
            remaining,
            stats: BTreeMap::new(),
            last_landed: None,
        }
    }
}

/// The copy slots: each executor's capacity, in turn, until `parallel` are handed out.
fn slots(executors: &[Arc<AgentHandle>], parallel: usize) -> Vec<Arc<AgentHandle>> {
    let mut slots = Vec::new();
    let mut round = 0u32;
    while slots.len() < parallel {
        let before = slots.len();
        for a in executors {
            if round < a.info.capacity && slots.len() < parallel {
                slots.push(Arc::clone(a));
            }
        }
        if slots.len() == before {
            break;
        }
        round += 1;
    }
    slots
}

/// Waits for every copy slot to end; after the first failure the others are stopped.
async fn join_slots(mut set: JoinSet<()>, queue: &Mutex<Queue>, notify: &Notify) {
    while let Some(joined) = set.join_next().await {
        if let Err(e) = joined {
            let mut q = lock(queue);
            q.failed.get_or_insert(CoordinatorError::Copy {
                table: "?".into(),
                message: format!("copy worker failed: {e}"),
            });
        }
        let failed = lock(queue).failed.is_some();
        if failed {
            set.abort_all();
            notify.notify_waiters();
        }
    }
}

/// Waits for the builds still running, or stops them after a failure; a build pool that
/// panicked fails the phase.
async fn finish_builds(builder: tokio::task::JoinHandle<()>, queue: &Mutex<Queue>) {
    let failed = lock(queue).failed.is_some();
    if failed {
        builder.abort();
    }
    if let Err(e) = builder.await {
        if !e.is_cancelled() {
            let mut q = lock(queue);
            q.failed.get_or_insert(CoordinatorError::Copy {
                table: "?".into(),
                message: format!("index builds failed: {e}"),
            });
        }
    }
}

/// What the phase did, once every slot and build has ended: the first failure, a task that no
/// agent was left to run, or every table's stats and the data time.
fn copied(
    queue: &Mutex<Queue>,
    jobs: &[CopyJob],
    started: Instant,
) -> Result<Copied, CoordinatorError> {
    let mut q = lock(queue);
    if let Some(err) = q.failed.take() {
        return Err(err);
    }
    if let Some(t) = q.tasks.front() {
        return Err(CoordinatorError::Copy {
            table: jobs[t.job].table.to_string(),
            message: "no agent is left to run this task (every agent failed)".into(),
        });
    }
    let data_time = q
        .last_landed
        .map(|t| t.saturating_duration_since(started))
        .unwrap_or_default();
    Ok(Copied {
        tables: std::mem::take(&mut q.stats)
            .into_iter()
            .map(|(i, s)| (jobs[i].report_name(), s))
            .collect(),
        data_time,
    })
}

/// Runs `on_done` for every table whose copy has landed, at most `parallel` at once. The first
/// failure stops the copy phase.
async fn run_builds<F, Fut>(
    mut finished: tokio::sync::mpsc::UnboundedReceiver<(CopyJob, CopyStats)>,
    on_done: F,
    parallel: usize,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
) where
    F: Fn(CopyJob, CopyStats) -> Fut,
    Fut: std::future::Future<Output = Result<(), CoordinatorError>> + Send + 'static,
{
    let mut running = JoinSet::new();
    let fail = |err: CoordinatorError| {
        lock(&queue).failed.get_or_insert(err);
        notify.notify_waiters();
    };
    let settle = |res: Result<Result<(), CoordinatorError>, tokio::task::JoinError>| match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fail(e),
        Err(e) => fail(CoordinatorError::Copy {
            table: "?".into(),
            message: format!("an index build failed: {e}"),
        }),
    };
    loop {
        if running.len() >= parallel {
            if let Some(res) = running.join_next().await {
                settle(res);
            }
            continue;
        }
        tokio::select! {
            biased;
            Some(res) = running.join_next(), if !running.is_empty() => settle(res),
            next = finished.recv() => match next {
                Some((job, stats)) => {
                    let stopped = lock(&queue).failed.is_some();
                    if !stopped {
                        running.spawn(on_done(job, stats).in_current_span());
                    }
                }
                None => break,
            },
        }
    }
    while let Some(res) = running.join_next().await {
        settle(res);
    }
}

struct Worker {
    /// The copy phase's span: every task span is its child.
    phase: tracing::Span,
    ctx: CopyContext,
    pool: Arc<AgentPool>,
    agent: Arc<AgentHandle>,
    queue: Arc<Mutex<Queue>>,
    notify: Arc<Notify>,
    jobs: Arc<Vec<CopyJob>>,
    agent_count: u32,
    /// Tables whose data has fully landed, for their builds.
    builds: tokio::sync::mpsc::UnboundedSender<(CopyJob, CopyStats)>,
}

impl Worker {
    fn take(&self) -> Option<Option<Task>> {
        let mut q = lock(&self.queue);
        if q.failed.is_some() {
            return None;
        }
        match q.tasks.pop_front() {
            Some(t) => {
                q.in_flight += 1;
                Some(Some(t))
            }
            None if q.in_flight == 0 => None,
            None => Some(None),
        }
    }

    fn fail(&self, err: CoordinatorError) {
        let mut q = lock(&self.queue);
        q.failed.get_or_insert(err);
        q.in_flight = q.in_flight.saturating_sub(1);
        drop(q);
        self.notify.notify_waiters();
    }

    fn requeue(&self, task: Task) {
        let mut q = lock(&self.queue);
        q.tasks.push_front(task);
        q.in_flight = q.in_flight.saturating_sub(1);
        drop(q);
        self.notify.notify_waiters();
    }

    async fn run(self) {
        loop {
            let notified = self.notify.notified();
            let mut task = match self.take() {
                None => return,
                Some(None) => {
                    notified.await;
                    continue;
                }
                Some(Some(t)) => t,
            };
            task.attempts += 1;
            let job = &self.jobs[task.job];
            let started = Instant::now();
            let span = info_span!(
                parent: &self.phase,
                "table_task",
                table = %format_args!("{}.{}", job.schema, job.table),
                shadow = %format_args!("{}.{}", job.schema, job.shadow),
                task = %task.key,
                range = task.range.map(|r| r.to_string()).unwrap_or_default(),
                agent = %self.agent.label,
                attempt = i64::from(task.attempts),
                rows = tracing::field::Empty,
                bytes = tracing::field::Empty,
            );
            let (outcome, peer) = self.attempt(&task, job).instrument(span.clone()).await;
            let metrics = crate::metrics::get();
            match outcome {
                Outcome::Done(done) => {
                    if !self.landed(&task, job, &done, started, &span) {
                        return;
                    }
                }
                Outcome::Failed {
                    message,
                    retry,
                    connect,
                    kind,
                } => {
                    // Unreachable, or its stream broke: the source-side agent may be gone.
                    let lost_peer = connect || kind == Some(pgzm_pg::conn::ErrorKind::Connection);
                    let kind = kind.map_or("task", |k| k.as_str());
                    crate::progress::task_reset(&task.key);
                    // Transient failures are retried their count of times; failures to connect
                    // also beyond it, for up to RESTART_PATIENCE (a server restarting).
                    let restarting = connect
                        && task
                            .failing_since
                            .get_or_insert_with(Instant::now)
                            .elapsed()
                            < RESTART_PATIENCE;
                    if retry && (task.attempts <= self.ctx.retries + task.failovers || restarting) {
                        // The source-side agent it read from may be gone: if so, the retry
                        // reads from another one.
                        if let Some(peer) = peer.as_deref().filter(|_| lost_peer) {
                            self.pool.check_source(peer).await;
                        }
                        metrics.retries.add(
                            1,
                            &[opentelemetry::KeyValue::new("table", job.live_label())],
                        );
                        warn!(table = %job.table, attempt = task.attempts, kind, error = %message, "copy task failed; retrying");
                        tokio::time::sleep(Duration::from_millis(
                            (200 * u64::from(task.attempts)).min(2000),
                        ))
                        .await;
                        self.requeue(task);
                        continue;
                    }
                    let attempts = task.attempts;
                    self.fail(CoordinatorError::Copy {
                        table: job.table.to_string(),
                        message: if attempts > 1 {
                            format!("{message} (after {attempts} attempts)")
                        } else {
                            message
                        },
                    });
                    return;
                }
                Outcome::AgentLost(message) => {
                    crate::progress::task_reset(&task.key);
                    task.failovers += 1;
                    metrics.retries.add(
                        1,
                        &[opentelemetry::KeyValue::new("table", job.live_label())],
                    );
                    warn!(table = %job.table, agent = %self.agent.label, error = %message, "agent failed during a task; the task goes back to the queue");
                    // Its sessions end first: a frozen agent's open transaction would hold its
                    // locks on the shadow table (blocking the next attempt's TRUNCATE, the
                    // builds and the cleanup) and could still commit later.
                    self.end_sessions().await;
                    if task.failovers > 2 * self.agent_count + self.ctx.retries {
                        self.fail(CoordinatorError::Copy {
                            table: job.table.to_string(),
                            message: format!(
                                "agents kept failing ({} failovers); last: {message}",
                                task.failovers
                            ),
                        });
                        return;
                    }
                    self.requeue(task);
                    // This slot waits for its agent to come back; the other agents go on.
                    if !self.wait_for_agent().await {
                        return;
                    }
                }
            }
        }
    }

    /// Accounts for a task an agent finished: span fields, metrics, the table's stats and
    /// digest; hands a table whose every task has landed to the build pool. False when the
    /// run must stop (the row counts disagree).
    fn landed(
        &self,
        task: &Task,
        job: &CopyJob,
        done: &CopyDone,
        started: Instant,
        span: &tracing::Span,
    ) -> bool {
        let metrics = crate::metrics::get();
        // As i64: tracing-opentelemetry exports u64 fields as strings.
        span.record("rows", i64::try_from(done.rows_written).unwrap_or(i64::MAX))
            .record("bytes", i64::try_from(done.bytes).unwrap_or(i64::MAX));
        let attrs = [opentelemetry::KeyValue::new("table", job.live_label())];
        metrics.rows.add(done.rows_written, &attrs);
        metrics.bytes.add(done.bytes, &attrs);
        metrics
            .task_duration
            .record(started.elapsed().as_secs_f64(), &attrs);
        if done.rows_written != done.rows_in_source {
            self.fail(CoordinatorError::Validation {
                table: job.table.to_string(),
                shadow: done.rows_written as i64,
                source_rows: done.rows_in_source as i64,
            });
            return false;
        }
        // On a terminal the progress display prints a line per finished table instead.
        if crate::progress::bars_shown() {
            tracing::debug!(table = %job.table, agent = %self.agent.label, rows = done.rows_written, bytes = done.bytes,
                  ms = started.elapsed().as_millis() as u64, already_done = done.already_done, "copy task done");
        } else {
            info!(table = %job.table, agent = %self.agent.label, rows = done.rows_written, bytes = done.bytes,
                  ms = started.elapsed().as_millis() as u64, already_done = done.already_done, "copy task done");
        }
        let finished = {
            let mut q = lock(&self.queue);
            let s = q.stats.entry(task.job).or_default();
            s.rows += done.rows_written;
            s.bytes += done.bytes;
            s.duration_ms += done.duration_ms;
            s.attempts += task.attempts;
            s.digest = match (s.tasks, s.digest, done.digest) {
                (0, _, d) => d,
                (_, Some(a), Some(b)) => Some(a.combine(b)),
                _ => None,
            };
            s.tasks += 1;
            let stats = *s;
            q.last_landed = Some(Instant::now());
            let left = q.remaining.entry(task.job).or_insert(1);
            *left -= 1;
            (*left == 0).then_some(stats)
        };
        crate::progress::task_done(
            &job.table,
            &task.key,
            estimate(task, job),
            done.bytes,
            finished.map(|s| s.rows),
        );
        if let Some(stats) = finished {
            // The receiver lives until every worker has ended.
            let _ = self.builds.send((job.clone(), stats));
        }
        {
            let mut q = lock(&self.queue);
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        self.notify.notify_waiters();
        true
    }

    /// This slot's agent's session tag.
    fn tag(&self) -> String {
        session_tag(self.ctx.migration_id, self.agent.index)
    }

    /// Ends the agent's sessions on both databases (see [`terminate_sessions`]).
    async fn end_sessions(&self) {
        let tag = self.tag();
        for db in [&self.ctx.destination, &self.ctx.source] {
            match terminate_sessions(db, &tag).await {
                Ok(n) => {
                    info!(agent = %self.agent.label, database = db.side(), sessions = n, "ended the sessions of an agent that was given up on")
                }
                Err(e) => {
                    warn!(agent = %self.agent.label, database = db.side(), error = %e, "could not end the sessions of an agent that was given up on")
                }
            }
        }
    }

    /// Polls the agent until it answers again (up to a minute, while work remains).
    async fn wait_for_agent(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut delay = Duration::from_millis(250);
        let mut next_probe = Instant::now() + delay;
        while Instant::now() < deadline {
            // Woken by the other slots too, so this one stops as soon as the work is done
            // instead of at its next probe.
            let changed = self.notify.notified();
            {
                let q = lock(&self.queue);
                if q.failed.is_some() || (q.tasks.is_empty() && q.in_flight == 0) {
                    return false;
                }
            }
            if Instant::now() < next_probe {
                tokio::select! {
                    () = tokio::time::sleep_until(next_probe.into()) => {}
                    () = changed => {}
                }
                continue;
            }
            if self.pool.answers(&self.agent).await {
                info!(agent = %self.agent.label, "agent is back");
                return true;
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            next_probe = Instant::now() + delay;
        }
        false
    }

    /// The source-side agent this slot's next attempt reads from: one for a destination-side
    /// agent, none for an agent that reads the source itself.
    fn peer(&self) -> Option<String> {
        if self.agent.side() == crate::agents::AgentSide::Destination {
            self.pool.source_peer()
        } else {
            None
        }
    }

    /// The copy task message of this attempt of `task`, for this slot's agent, reading from
    /// `peer_url` (see [`Worker::peer`]).
    fn copy_task(&self, task: &Task, job: &CopyJob, peer_url: Option<String>) -> CopyTask {
        let migration_id = MigrationId(self.ctx.migration_id);
        let task_key = TaskKey(task.key.clone());
        CopyTask {
            task_id: TaskId::attempt(migration_id, &task_key, task.attempts),
            task_key,
            migration_id,
            source: self.pool.endpoint(&self.ctx.source, false, &self.tag()),
            destination: self.pool.endpoint(&self.ctx.destination, true, &self.tag()),
            read: SourceRead {
                snapshot: SnapshotId(self.ctx.snapshot.clone()),
                table: QualifiedName {
                    schema: job.schema.to_string(),
                    name: job.table.to_string(),
                },
                columns: job.columns.iter().map(String::from).collect(),
                range: task.range,
            },
            destination_table: QualifiedName {
                schema: job.schema.to_string(),
                name: job.shadow.to_string(),
            },
            progress_every_bytes: NonZeroU64::new(PROGRESS_EVERY_BYTES),
            peer_url,
            freeze: task.range.is_none() && job.bytes >= FREEZE_MIN_BYTES,
            verify: self.ctx.verify,
            rate_share_ppm: self.ctx.rate_share_ppm,
        }
    }

    /// One attempt of `task` on this slot's agent, in the CLIENT span of its `RunCopy` call
    /// (the agent's SERVER span follows it); also the source-side agent it read from.
    async fn attempt(&self, task: &Task, job: &CopyJob) -> (Outcome, Option<String>) {
        let rpc = pgzm_agent::telemetry::rpc_client_span("RunCopy", &self.agent.label);
        let peer = self.peer();
        let (outcome, code) = self
            .call(task, job, peer.clone())
            .instrument(rpc.clone())
            .await;
        pgzm_agent::telemetry::record_rpc_status(&rpc, code);
        (outcome, peer)
    }

    /// The `RunCopy` call of [`Worker::attempt`], and its gRPC status (`Unavailable` when the
    /// agent went quiet or closed the stream without a result).
    async fn call(
        &self,
        task: &Task,
        job: &CopyJob,
        peer: Option<String>,
    ) -> (Outcome, tonic::Code) {
        let message = proto::CopyTask::from(self.copy_task(task, job, peer));
        let mut client = self.agent.client.clone();
        let mut stream = match client.run_copy(self.pool.connector.request(message)).await {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let code = s.code();
                return (classify(s), code);
            }
        };
        let est = estimate(task, job);
        loop {
            match tokio::time::timeout(self.ctx.stall, stream.message()).await {
                Err(_) => {
                    return (
                        Outcome::AgentLost(format!(
                            "no word from the agent for {} s",
                            self.ctx.stall.as_secs_f64()
                        )),
                        tonic::Code::DeadlineExceeded,
                    )
                }
                Ok(Err(s)) => {
                    let code = s.code();
                    return (classify(s), code);
                }
                Ok(Ok(None)) => {
                    return (
                        Outcome::AgentLost(
                            "the agent closed the task stream without a result".into(),
                        ),
                        tonic::Code::Unavailable,
                    )
                }
                Ok(Ok(Some(event))) => match event.event {
                    Some(proto::copy_event::Event::Done(done)) => {
                        return (landed(done), tonic::Code::Ok)
                    }
                    Some(proto::copy_event::Event::Progress(p)) => {
                        crate::progress::task_progress(&job.table, &task.key, est, p.bytes);
                    }
                    None => {}
                },
            }
        }
    }
}

/// The outcome of a task whose agent reported it done: its result, validated. A result that
/// breaks the protocol (a malformed digest) fails the run: the task may have committed, so it
/// is not retried.
fn landed(done: proto::CopyDone) -> Outcome {
    match CopyDone::try_from(done) {
        Ok(done) => Outcome::Done(done),
        Err(e) => Outcome::Failed {
            connect: false,
            kind: None,
            message: format!("the agent sent an invalid result: {e}"),
            retry: false,
        },
    }
}

fn classify(s: tonic::Status) -> Outcome {
    match s
        .metadata()
        .get(RETRYABLE_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(flag) => Outcome::Failed {
            connect: s.metadata().get(pgzm_agent::error::CONNECT_KEY).is_some(),
            kind: s
                .metadata()
                .get(pgzm_agent::error::KIND_KEY)
                .and_then(|v| v.to_str().ok())
                .and_then(pgzm_pg::conn::ErrorKind::parse),
            message: s.message().to_string(),
            retry: flag == "1",
        },
        None if s.code() == tonic::Code::Unauthenticated
            || s.code() == tonic::Code::FailedPrecondition =>
        {
            Outcome::Failed {
                connect: false,
                kind: None,
                message: s.message().to_string(),
                retry: false,
            }
        }
        None => Outcome::AgentLost(format!("{}: {}", s.code(), s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(pages: i64, bytes: i64) -> CopyJob {
        CopyJob {
            key: "t0".into(),
            schema: "public".into(),
            table: "t".into(),
            shadow: "shadow_t".into(),
            columns: vec!["a".into()],
            pages,
            bytes,
            copy_bytes: 0,
        }
    }

    #[test]
    fn a_result_is_validated_once_it_lands() {
        let done = proto::CopyDone {
            rows_written: 3,
            rows_in_source: 3,
            digest: "000000000000000000000000000000ff".into(),
            ..proto::CopyDone::default()
        };
        match landed(done.clone()) {
            Outcome::Done(d) => assert_eq!(
                d.digest,
                Some(pgzm_agent::digest::Digest {
                    rows: 3,
                    sum: pgzm_agent::digest::RowHash(0xff),
                })
            ),
            _ => panic!("a valid result is done"),
        }
        let bad = proto::CopyDone {
            digest: "ff".into(),
            ..done
        };
        match landed(bad) {
            Outcome::Failed { retry, message, .. } => {
                assert!(!retry);
                assert!(
                    message.starts_with("the agent sent an invalid result: digest:"),
                    "{message}"
                );
            }
            _ => panic!("a malformed digest fails the task"),
        }
    }

    #[test]
    fn range_estimates_and_open_last_range() {
        let j = job(100, 1000);
        let task = |range| Task {
            job: 0,
            key: "t0".into(),
            range,
            attempts: 0,
            failovers: 0,
            failing_since: None,
        };
        let bounded = PageRange {
            start: 0,
            end: Some(25),
        };
        let open = PageRange {
            start: 75,
            end: None,
        };
        assert_eq!(estimate(&task(Some(bounded)), &j), 250);
        assert_eq!(estimate(&task(Some(open)), &j), 250);
        assert_eq!(estimate(&task(None), &j), 1000);
    }

    #[test]
    fn small_tables_are_one_task() {
        let t = split(3, &job(10, 80_000), 256 << 20);
        assert_eq!(t.len(), 1);
        assert!(t[0].range.is_none());
        // Keyed by the table, whatever its position in the queue.
        assert_eq!(t[0].key, "t0");
        assert_eq!(t[0].job, 3);
    }

    #[test]
    fn large_tables_are_split_into_contiguous_ranges() {
        let t = split(0, &job(100_000, 1 << 30), 256 << 20);
        assert_eq!(t.len(), 4);
        let r: Vec<(u64, Option<u64>)> = t
            .iter()
            .map(|t| t.range.map(|r| (r.start, r.end)).unwrap())
            .collect();
        assert_eq!(
            r,
            vec![
                (0, Some(25_000)),
                (25_000, Some(50_000)),
                (50_000, Some(75_000)),
                (75_000, None)
            ]
        );
        let keys: std::collections::BTreeSet<_> = t.iter().map(|t| t.key.clone()).collect();
        assert_eq!(keys.len(), 4);
    }
}
