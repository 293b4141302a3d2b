//! `pgzm start`: plan → shadow schema → copy (+ per-table builds) → foreign keys → swap.
//!
//! Invariant: the live tables are not modified before the swap transaction. Until its commit,
//! every failure removes what this run created (and a killed run's objects are recorded, so the
//! next run removes them first).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pgzm_proto::agent::v1::agent_client::AgentClient;
use pgzm_proto::agent::v1::InfoRequest;
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};
use tonic::transport::Channel;
use tracing::{info, info_span, warn, Instrument};

use crate::build::{self, BuildSettings};
use crate::catalog::{self, SourceSchema};
use crate::conninfo::DbUrl;
use crate::copy::{self, CopyContext, CopyJob, CopyStats};
use crate::ddl;
use crate::destination::{self, Destination};
use crate::error::CoordinatorError;
use crate::plan::{self, Plan};
use crate::rewrite::Renames;
use crate::state::{self, RecordedObjects};
use crate::swap::{self, SwapOutcome, SwapSettings};

/// Options of a `start` run.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// Source database.
    pub source: DbUrl,
    /// Destination database.
    pub destination: DbUrl,
    /// Copy and build tasks at once.
    pub jobs: usize,
    /// Plan only.
    pub dry_run: bool,
    /// Swap lock behaviour.
    pub swap: SwapSettings,
    /// Retries of a failed copy task.
    pub copy_retries: u32,
    /// Index build settings.
    pub build: BuildSettings,
}

/// Duration of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTiming {
    /// Phase name.
    pub phase: &'static str,
    /// Start, RFC 3339 UTC.
    pub started_at: String,
    /// Milliseconds.
    pub duration_ms: u64,
}

/// Per-table result.
#[derive(Debug, Clone, Serialize)]
pub struct TableReport {
    /// Table.
    pub table: String,
    /// Rows copied.
    pub rows: u64,
    /// Bytes of COPY data.
    pub bytes: u64,
    /// Copy time in ms.
    pub copy_ms: u64,
    /// Attempts.
    pub attempts: u32,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Migration id (backup set timestamp).
    pub migration_id: i64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The plan.
    pub plan: Plan,
    /// Per-table copy results.
    pub tables: Vec<TableReport>,
    /// Phase timings.
    pub phases: Vec<PhaseTiming>,
    /// Swap measurements.
    pub swap: Option<SwapOutcome>,
    /// Total rows copied.
    pub rows: u64,
    /// Total bytes copied.
    pub bytes: u64,
    /// Interrupted runs cleaned up first (what was dropped).
    pub cleaned_up: Vec<String>,
    /// Previous backup set objects dropped.
    pub dropped_backup: Vec<String>,
    /// Warnings.
    pub warnings: Vec<String>,
}

struct Phases(Vec<PhaseTiming>);

impl Phases {
    async fn run<T, F: std::future::Future<Output = Result<T, CoordinatorError>>>(
        &mut self,
        phase: &'static str,
        f: F,
    ) -> Result<T, CoordinatorError> {
        let started_at = now_rfc3339();
        let t = Instant::now();
        let r = f.instrument(info_span!("phase", phase)).await;
        let duration_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(phase, duration_ms, ok = r.is_ok(), "phase finished");
        self.0.push(PhaseTiming {
            phase,
            started_at,
            duration_ms,
        });
        r
    }
}

/// Current time as RFC 3339 UTC with milliseconds (no date crate needed).
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_millis() as i64)
}

/// Formats milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Checks that the agent answers and speaks our protocol.
pub async fn check_agent(
    agent: &mut AgentClient<Channel>,
    label: &str,
) -> Result<(), CoordinatorError> {
    let info = agent
        .info(InfoRequest {
            protocol_version: pgzm_proto::PROTOCOL_VERSION,
        })
        .await
        .map_err(|s| CoordinatorError::Agent {
            agent: label.to_string(),
            message: s.message().to_string(),
        })?
        .into_inner();
    if info.protocol_version != pgzm_proto::PROTOCOL_VERSION {
        return Err(CoordinatorError::Agent {
            agent: label.to_string(),
            message: format!(
                "speaks protocol {} (agent {}), this pgzm speaks {}: run the same version on both",
                info.protocol_version,
                info.agent_version,
                pgzm_proto::PROTOCOL_VERSION
            ),
        });
    }
    Ok(())
}

/// Runs a whole migration (or, with `dry_run`, only its plan).
pub async fn start(
    opts: StartOptions,
    mut agent: AgentClient<Channel>,
) -> Result<Report, CoordinatorError> {
    let mut phases = Phases(Vec::new());
    let migration_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);

    // Plan: read both sides under one source snapshot; change nothing.
    let (source_client, control, schema, dest, earlier, snapshot) = phases
        .run("plan", async {
            check_agent(&mut agent, "in-process").await?;
            let source_client = opts.source.connect("pgzm-coordinator").await?;
            let control = opts.destination.connect("pgzm-coordinator").await?;
            if !state::try_lock(&control).await? {
                return Err(CoordinatorError::Busy);
            }
            source_client
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL search_path = pg_catalog")
                .await
                .map_err(|e| CoordinatorError::source("open the snapshot transaction", &e))?;
            let snapshot: String = source_client
                .query_one("SELECT pg_export_snapshot()", &[])
                .await
                .map_err(|e| CoordinatorError::source("export a snapshot", &e))?
                .get(0);
            let schema = catalog::read(&source_client).await?;
            control
                .batch_execute("SET search_path = pg_catalog")
                .await
                .map_err(|e| CoordinatorError::destination("set search_path", &e))?;
            let dest = destination::read(&control).await?;
            let earlier = state::earlier_runs(&control).await?;
            Ok((source_client, control, schema, dest, earlier, snapshot))
        })
        .await?;
    let plan = plan::build(
        migration_id,
        opts.source.to_string(),
        &schema,
        &dest,
        &earlier,
    )
    .map_err(CoordinatorError::Refused)?;
    let mut report = Report {
        migration_id,
        dry_run: opts.dry_run,
        plan: plan.clone(),
        tables: Vec::new(),
        phases: Vec::new(),
        swap: None,
        rows: 0,
        bytes: 0,
        cleaned_up: Vec::new(),
        dropped_backup: Vec::new(),
        warnings: plan.warnings.clone(),
    };
    if opts.dry_run {
        report.phases = phases.0;
        return Ok(report);
    }
    let mut control = control;

    // Leftovers of interrupted runs go first (only objects recorded by oid).
    for (id, objects) in &earlier.leftovers {
        let dropped = state::clean_leftovers(&mut control, *id, objects).await?;
        if !dropped.is_empty() {
            warn!(
                migration = id,
                objects = dropped.len(),
                "cleaned up an interrupted run"
            );
        }
        report.cleaned_up.extend(dropped);
    }

    let renames = plan.shadow_renames();
    let created = phases
        .run(
            "shadow",
            create_shadow(&mut control, &plan, &schema, &dest, &renames),
        )
        .await?;

    let result = prepare_and_swap(
        &opts,
        agent,
        &mut phases,
        &mut report,
        &control,
        source_client,
        &plan,
        schema,
        renames,
        snapshot,
    )
    .await;
    match result {
        Ok(()) => {
            report.phases = phases.0;
            Ok(report)
        }
        Err(err) => {
            // Before the swap's commit the live tables are untouched: remove what we created.
            let message = err.to_string();
            if let Err(clean_err) =
                state::clean_leftovers(&mut control, migration_id, &created).await
            {
                warn!(error = %clean_err, "could not remove this run's shadow objects; the next run will");
            }
            let _ = state::set_status(&control, migration_id, "failed", None, Some(&message)).await;
            Err(err)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn prepare_and_swap(
    opts: &StartOptions,
    agent: AgentClient<Channel>,
    phases: &mut Phases,
    report: &mut Report,
    control: &Client,
    source_client: Client,
    plan: &Plan,
    schema: SourceSchema,
    renames: Renames,
    snapshot: String,
) -> Result<(), CoordinatorError> {
    let schema = Arc::new(schema);
    let plan_arc = Arc::new(plan.clone());
    let renames = Arc::new(renames);
    let jobs: Vec<CopyJob> = plan
        .tables
        .iter()
        .map(|t| CopyJob {
            table: t.name.clone(),
            shadow: t.shadow.clone(),
            columns: t.copy_columns.clone(),
        })
        .collect();
    let ctx = CopyContext {
        agent,
        source: opts.source.clone(),
        destination: opts.destination.clone(),
        snapshot,
        migration_id: plan.migration_id,
        retries: opts.copy_retries,
    };
    let dest = opts.destination.clone();
    let build_settings = opts.build.clone();
    let copied: Vec<(String, CopyStats)> = phases
        .run("copy", {
            let (schema, plan_arc, renames) = (
                Arc::clone(&schema),
                Arc::clone(&plan_arc),
                Arc::clone(&renames),
            );
            copy::copy_all(ctx, jobs, opts.jobs, move |job: CopyJob, _stats| {
                let (schema, plan_arc, renames, dest, settings) = (
                    Arc::clone(&schema),
                    Arc::clone(&plan_arc),
                    Arc::clone(&renames),
                    dest.clone(),
                    build_settings.clone(),
                );
                async move {
                    let Some(table) = schema.table(&job.table) else {
                        return Ok(());
                    };
                    let statements = build::table_statements(table, &plan_arc, &schema, &renames)?;
                    build::run_on_session(
                        &dest,
                        &settings,
                        &format!("build \"{}\"", job.table),
                        statements,
                    )
                    .instrument(info_span!("build_table", table = %job.table))
                    .await
                }
            })
        })
        .await?;
    // Every task has read the snapshot: release it so the source's vacuum is not held back.
    let _ = source_client.batch_execute("COMMIT").await;
    drop(source_client);

    phases
        .run(
            "constraints",
            build::foreign_keys(&opts.destination, plan, &schema, &renames, opts.jobs),
        )
        .await?;

    for (table, s) in &copied {
        report.tables.push(TableReport {
            table: table.clone(),
            rows: s.rows,
            bytes: s.bytes,
            copy_ms: s.duration_ms,
            attempts: s.attempts,
        });
        report.rows += s.rows;
        report.bytes += s.bytes;
    }
    report.tables.sort_by(|a, b| a.table.cmp(&b.table));
    let stats =
        serde_json::json!({ "tables": report.tables, "rows": report.rows, "bytes": report.bytes });
    state::set_status(control, plan.migration_id, "prepared", Some(&stats), None).await?;

    // The previous backup set is replaced only now that this run is fully prepared.
    let earlier = state::earlier_runs(control).await?;
    if let Some((id, moves)) = earlier.backup_set {
        if id != plan.migration_id {
            let mut c = opts.destination.connect("pgzm-coordinator").await?;
            report.dropped_backup = phases
                .run(
                    "drop_previous_backup",
                    state::drop_backup_set(&mut c, id, &moves),
                )
                .await?;
        }
    }

    let outcome = phases
        .run("swap", swap::swap(control, plan, opts.swap))
        .await?;
    report.swap = Some(outcome);
    // After the commit nothing may fail the run: problems become warnings.
    let warnings = swap::validate_repointed(control, plan).await;
    report.warnings.extend(warnings);
    let stats = serde_json::json!({
        "tables": report.tables, "rows": report.rows, "bytes": report.bytes,
        "swap": outcome, "phases": phases.0,
    });
    if let Err(e) =
        state::set_status(control, plan.migration_id, "swapped", Some(&stats), None).await
    {
        report.warnings.push(format!(
            "the swap committed but its statistics could not be recorded: {e}"
        ));
    }
    Ok(())
}

/// Creates the shadow types, sequences and tables in one transaction, together with the
/// migration's metadata row and the record of every object (with its oid).
async fn create_shadow(
    control: &mut Client,
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Result<RecordedObjects, CoordinatorError> {
    use pgzm_agent::sql::{quote_ident, quote_qualified};
    for (ext, ext_schema) in &plan.extensions_to_create {
        control
            .batch_execute(&format!(
                "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {}",
                quote_ident(ext),
                quote_ident(ext_schema)
            ))
            .await
            .map_err(|e| {
                CoordinatorError::destination(
                    format!("create extension {ext} (needed by the source's tables)"),
                    &e,
                )
            })?;
    }
    let tx = control
        .transaction()
        .await
        .map_err(|e| CoordinatorError::destination("begin the shadow transaction", &e))?;
    state::ensure_schema(&tx).await?;
    state::insert(&tx, plan).await?;
    let mut statements: Vec<(String, String)> = Vec::new();
    for (signature, definition) in &plan.functions_to_create {
        statements.push((
            format!("create trigger function {signature}"),
            definition.clone(),
        ));
    }
    for (m, t) in plan.types.iter().zip(&schema.types) {
        let action = format!("create shadow type \"{}\"", m.to);
        for sql in ddl::create_type(t, &m.to, renames) {
            statements.push((action.clone(), sql));
        }
        if let Some((owner, grants)) = dest.type_acl.get(&t.name) {
            statements.push((
                action.clone(),
                format!(
                    "ALTER TYPE {} OWNER TO {}",
                    quote_qualified("public", &m.to),
                    quote_ident(owner)
                ),
            ));
            for g in ddl::grants_sql("TYPE", &quote_qualified("public", &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
    }
    for (m, s) in plan.sequences.iter().zip(&schema.sequences) {
        if !s.identity {
            statements.push((
                format!("create shadow sequence \"{}\"", m.to),
                ddl::create_sequence(s, &m.to),
            ));
        }
    }
    for t in &schema.tables {
        let Some(tp) = plan.table(&t.name) else {
            continue;
        };
        let action = format!("create shadow table \"{}\"", tp.shadow);
        for sql in ddl::create_table(t, &tp.shadow, &schema.sequences, renames) {
            statements.push((action.clone(), sql));
        }
        if let Some(live) = dest.tables.get(&t.name) {
            let cols: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
            for sql in ddl::carry_privileges(live, &tp.shadow, &cols, renames) {
                statements.push((
                    format!("carry privileges of \"{}\" to its shadow", t.name),
                    sql,
                ));
            }
        }
    }
    for (m, s) in plan.sequences.iter().zip(&schema.sequences) {
        let action = format!("set shadow sequence \"{}\"", m.to);
        statements.push((action.clone(), ddl::set_sequence(&m.to, s)));
        if let Some((_, grants)) = dest.sequence_acl.get(&s.name) {
            for g in ddl::grants_sql("SEQUENCE", &quote_qualified("public", &m.to), grants) {
                statements.push((action.clone(), g));
            }
        }
    }
    for (action, sql) in &statements {
        tx.batch_execute(sql)
            .await
            .map_err(|e| CoordinatorError::destination(action.clone(), &e))?;
    }
    let objects = record(&tx, plan).await?;
    state::record_objects(&tx, plan.migration_id, &objects).await?;
    tx.commit()
        .await
        .map_err(|e| CoordinatorError::destination("commit the shadow transaction", &e))?;
    Ok(objects)
}

async fn record(tx: &impl GenericClient, plan: &Plan) -> Result<RecordedObjects, CoordinatorError> {
    let oids = |sql: &'static str, names: Vec<String>| async move {
        let rows = tx
            .query(sql, &[&names])
            .await
            .map_err(|e| CoordinatorError::destination("record created objects", &e))?;
        Ok::<_, CoordinatorError>(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1)))
                .collect::<Vec<_>>(),
        )
    };
    const RELS: &str = "SELECT relname::text, oid FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relname = ANY($1)";
    const TYPES: &str = "SELECT typname::text, oid FROM pg_type WHERE typnamespace = 'public'::regnamespace AND typname = ANY($1)";
    Ok(RecordedObjects {
        tables: oids(RELS, plan.tables.iter().map(|t| t.shadow.clone()).collect()).await?,
        types: oids(TYPES, plan.types.iter().map(|m| m.to.clone()).collect()).await?,
        sequences: oids(RELS, plan.sequences.iter().map(|m| m.to.clone()).collect()).await?,
        indexes: plan.indexes.iter().map(|m| m.to.clone()).collect(),
        functions: plan
            .functions_to_create
            .iter()
            .map(|(signature, _)| signature.clone())
            .collect(),
    })
}
