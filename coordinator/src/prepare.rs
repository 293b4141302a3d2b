//! `pgzm prepare` (and the first half of `start`): plan → shadow schema → preserved-table sync →
//! copy with per-table builds → foreign keys → state `prepared`.
//!
//! Invariant: the live tables are not modified before the swap transaction (the sync triggers
//! on preserved tables only read them). Until the swap, a failure removes everything this run
//! created; a killed run's objects are recorded by oid, so the next run removes them first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};
use tokio_postgres::{Client, GenericClient};
use tracing::{warn, Instrument};

use crate::agents::AgentPool;
use crate::build;
use crate::catalog::{self, SourceSchema, Table};
use crate::copy::{self, CopyContext, CopyJob};
use crate::destination::{self, Destination};
use crate::error::CoordinatorError;
use crate::locked::LockedTransaction;
use crate::locked::SwapSettings;
use crate::naming::QualName;
use crate::plan::{self, Plan};
use crate::preserve;
use crate::report::{Phases, Report, StartOptions, TableReport, Throughput};
use crate::rewrite::Renames;
use crate::state::{self, RecordedObjects};

/// A prepared migration, still holding the destination's run lock.
pub struct Prepared {
    /// The control session (holds the advisory run lock; `search_path = pg_catalog`).
    pub control: Client,
    /// What this run created (for cleanup on a later failure).
    pub created: RecordedObjects,
    /// The report so far.
    pub report: Report,
}

impl Prepared {
    /// Ends the prepare run: releases the destination's run lock now, instead of whenever the
    /// server notices the closed connection, so a `status` or `swap` started right after sees
    /// no run in progress. Returns the report.
    pub async fn release(self) -> Report {
        state::unlock(&self.control).await;
        self.report
    }
}

/// A refused plan: nothing was changed.
fn refused(mut problems: Vec<String>) -> CoordinatorError {
    if let Some(first) = problems.first_mut() {
        *first = format!("cannot migrate: {first}");
    }
    CoordinatorError::Refused(problems)
}

/// What the plan phase reads: both sides, under one source snapshot held open on
/// `source_client`, with the run lock held on `control`.
struct Sides {
    source_client: Client,
    control: Client,
    /// A destination session for the plan's reads, closed after the plan: a session keeps the
    /// buffer its largest response needed (tens of MB at 10 000 tables) as long as it lives.
    catalog: Client,
    schema: SourceSchema,
    dest: Destination,
    earlier: plan::Earlier,
    snapshot: String,
    live_shapes: BTreeMap<QualName, preserve::LiveShape>,
    /// The preserved tables, resolved in the migrated schemas.
    preserved: Vec<QualName>,
    /// Each source table's evidence at the snapshot, by oid.
    evidence: BTreeMap<u32, plan::SourceEvidence>,
    /// The snapshot, as `pg_current_snapshot()` gives it.
    snapshot_text: String,
    /// Why a preserved table name cannot be resolved.
    preserved_problems: Vec<String>,
    /// The newest migration recorded when the lock was taken.
    newest: Option<(i64, String)>,
    agent_roles: Vec<String>,
}

/// Checks that the agents reach both sides, takes the run lock (refusing when another run
/// changed the destination meanwhile), opens and exports the source snapshot and reads the
/// source's schema and the destination.
async fn read_sides(opts: &StartOptions, pool: &AgentPool) -> Result<Sides, CoordinatorError> {
    let agent_roles = pool.check_reach(&opts.source, &opts.destination).await?;
    // The snapshot's session only holds the snapshot through the copy; two sessions importing
    // it share the catalog reads (see `catalog::read`) and close after them, and so does the
    // destination's catalog session: a session keeps the buffers its largest response and
    // message needed for as long as it lives.
    // Boxed: five connection futures side by side overflowed a debug build's test stack.
    let (source, destination) = (&opts.source, &opts.destination);
    let (source_client, reader, second_reader, control, catalog) = tokio::try_join!(
        Box::pin(source.connect("pgzm-coordinator")),
        Box::pin(source.connect("pgzm-coordinator")),
        Box::pin(source.connect("pgzm-coordinator")),
        Box::pin(destination.connect("pgzm-coordinator")),
        Box::pin(destination.connect("pgzm-coordinator")),
    )?;
    refuse_same_database(&source_client, &control, &opts.destination).await?;
    // What this run was started against: if another run finishes while this one waits
    // for the run lock, this one must not plan over it unseen (and replace its backup).
    let seen = state::newest(&control).await?;
    if !state::try_lock(&control).await? {
        return Err(CoordinatorError::Busy);
    }
    let newest = state::newest(&control).await?;
    // A bad --maintenance-work-mem fails here, not at the first index build.
    control
        .execute(
            "SELECT set_config('maintenance_work_mem', $1, true)",
            &[&opts.build.maintenance_work_mem],
        )
        .await
        .map_err(|e| {
            CoordinatorError::Usage(format!(
                "--maintenance-work-mem {:?} is not a valid size for the destination: {}",
                opts.build.maintenance_work_mem,
                pgzm_pg::conn::describe(&e)
            ))
        })?;
    if newest != seen {
        let (id, status) = newest.clone().unwrap_or_default();
        return Err(CoordinatorError::Refused(vec![format!(
            "another pgzm run (migration {id}, now {status}) changed this destination while this one waited for it; nothing was done: check `pgzm status` and `pgzm list`, then run again if you still mean to migrate on top of it"
        )]));
    }
    // The source's reads and the destination's go on at once: different servers.
    let source_side = async {
        // Deparsing a table's indexes takes a brief ACCESS SHARE lock on it: bounded, so DDL
        // in progress on the source gives an error, not a hang.
        const SETTINGS: &str =
            "SET LOCAL search_path = pg_catalog; SET LOCAL jit = off; SET LOCAL lock_timeout = '30s'";
        source_client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {SETTINGS}"
            ))
            .await
            .map_err(|e| CoordinatorError::source("open the snapshot transaction", e))?;
        let snapshot: String = source_client
            .query_typed_one("SELECT pg_export_snapshot() AS snapshot", &[])
            .await
            .map_err(|e| CoordinatorError::source("export a snapshot", e))?
            .get("snapshot");
        let import = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {SETTINGS}",
            pgzm_pg::sql::quote_literal(&snapshot)
        );
        tokio::try_join!(
            reader.batch_execute(&import),
            second_reader.batch_execute(&import)
        )
        .map_err(|e| CoordinatorError::source("import the snapshot", e))?;
        let schema = catalog::read(&reader, &second_reader, &opts.schemas, &opts.tables).await?;
        drop(second_reader);
        let evidence = source_evidence(&reader, &schema).await?;
        drop(reader);
        let snapshot_text: String = source_client
            .query_typed_one("SELECT pg_current_snapshot()::text AS snapshot", &[])
            .await
            .map_err(|e| CoordinatorError::source("read the snapshot", e))?
            .get("snapshot");
        Ok::<_, CoordinatorError>((snapshot, schema, evidence, snapshot_text))
    };
    let destination_side = async {
        for session in [&control, &catalog] {
            session
                .batch_execute(crate::state::CATALOG_SESSION)
                .await
                .map_err(|e| CoordinatorError::destination("set search_path", e))?;
        }
        let dest = destination::read(&catalog, &opts.schemas).await?;
        let earlier = state::earlier_runs(&catalog).await?;
        Ok((dest, earlier))
    };
    let ((snapshot, schema, evidence, snapshot_text), (dest, earlier)) =
        tokio::try_join!(source_side, destination_side)?;
    let (preserved, preserved_problems) = resolve_tables(&opts.preserved, &schema);
    let live_shapes = preserve::read_live(&catalog, &preserved).await?;
    Ok(Sides {
        source_client,
        control,
        catalog,
        schema,
        dest,
        earlier,
        snapshot,
        live_shapes,
        preserved,
        preserved_problems,
        evidence,
        snapshot_text,
        newest,
        agent_roles,
    })
}

/// The migration's plan, or every reason it cannot run: the planner's, the dependents'
/// checks, the names the swap will need, a prepared run waiting (without --force), the
/// preserved tables' shapes.
async fn plan_migration(
    opts: &StartOptions,
    migration_id: i64,
    sides: &Sides,
) -> Result<Plan, CoordinatorError> {
    let preserved_names = &sides.preserved;
    let (catalog, schema, dest, earlier) =
        (&sides.catalog, &sides.schema, &sides.dest, &sides.earlier);
    let (mut plan, mut problems) =
        plan::build_all(migration_id, opts.source.to_string(), schema, dest, earlier);
    problems.extend(crate::dependents::check(catalog, &mut plan, dest).await?);
    problems.extend(crate::compat::problems(schema, dest.server_version));
    problems.extend(sides.preserved_problems.iter().cloned());
    for name in preserved_names
        .iter()
        .filter(|n| schema.excluded.contains(n))
    {
        problems.push(format!(
            "--preserved-tables: {} is left out by the table filters; a preserved table is migrated with the destination's rows: include it, or do not preserve it",
            name.plain()
        ));
    }
    // The swap will move the current backup set aside: its names must be free (checked again
    // at the swap, but a collision is better found before the copy).
    if let Some((id, moves)) = &earlier.backup_set {
        match state::aside_set(catalog, *id, moves).await {
            Ok(_) => {}
            Err(CoordinatorError::Refused(reasons)) => problems.extend(reasons),
            Err(e) => return Err(e),
        }
    }
    if let Some(id) = earlier.prepared {
        if !opts.force {
            problems.push(format!(
                "migration {id} is prepared and waiting for its swap: run `pgzm swap`, or prepare again with --force to replace it"
            ));
        }
    }
    let renames = plan.shadow_renames();
    let backup_of = |schema: &str, live_seq: &str| {
        plan.to_backup
            .iter()
            .find(|m| m.from == live_seq && m.schema == schema)
            .map(|m| m.to.to_string())
    };
    plan.preserved = preserve::plan(
        preserved_names,
        migration_id,
        schema,
        &sides.live_shapes,
        &renames,
        backup_of,
        &mut problems,
    );
    if !problems.is_empty() {
        return Err(refused(problems));
    }
    let deferred = deferred_statements(schema, &plan);
    plan.deferred = deferred.statements;
    plan.deferred_checks = deferred.checks;
    plan.deferred_validations = deferred.validations;
    Ok(plan)
}

/// Drops the shadow objects interrupted runs left (only objects recorded by oid); returns
/// what was dropped.
async fn clean_earlier_leftovers(
    control: &Client,
    earlier: &plan::Earlier,
    locks: SwapSettings,
) -> Result<Vec<String>, CoordinatorError> {
    let mut cleaned = Vec::new();
    for (id, objects) in &earlier.leftovers {
        let dropped = state::clean_leftovers(control, *id, objects, locks).await?;
        if !dropped.is_empty() {
            warn!(
                migration = id,
                objects = dropped.len(),
                "cleaned up an earlier run's shadow objects"
            );
        }
        cleaned.extend(dropped);
    }
    Ok(cleaned)
}

/// Prepares a migration. With `dry_run`, returns after the plan with nothing changed.
pub async fn prepare(
    opts: &StartOptions,
    pool: AgentPool,
    phases: &mut Phases,
) -> Result<Option<Prepared>, CoordinatorError> {
    let started_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    if opts.resume && opts.dry_run {
        return Err(CoordinatorError::Usage(
            "--resume and --dry-run cannot be used together".into(),
        ));
    }
    // Plan: read both sides under one source snapshot; change nothing.
    let planned = async {
        let sides = read_sides(opts, &pool).await?;
        let interrupted = if opts.resume {
            Some(crate::resume::interrupted_run(&sides.control).await?)
        } else {
            None
        };
        // Unique even for runs started in the same millisecond (serialised by the run lock).
        let migration_id = match &interrupted {
            Some(run) => run.id,
            None => started_ms.max(sides.newest.as_ref().map_or(0, |(id, _)| id + 1)),
        };
        let plan = plan_migration(opts, migration_id, &sides).await?;
        // The swap is one transaction holding a lock per renamed relation: refused now,
        // before anything is built, when the destination's lock table cannot hold them.
        let lock_budget = crate::locked::LockBudget::read(&sides.control).await?;
        lock_budget.check(
            crate::swap::lock_estimate(&plan),
            "the swap of this migration",
        )?;
        Ok((sides, interrupted, plan, lock_budget))
    };
    let (mut sides, interrupted, mut plan, lock_budget) = phases.run("plan", planned).await?;
    // Planned: what only the planning read goes before anything else is built.
    sides.dest.keep_for_build();
    drop(sides.catalog);
    let migration_id = plan.migration_id;
    for tp in &mut plan.tables {
        if let Some(t) = sides.schema.table(&tp.qualname()) {
            tp.evidence = sides.evidence.get(&t.oid).copied();
        }
    }
    plan.source_snapshot = Some(sides.snapshot_text.clone());
    let renames = plan.shadow_renames();
    plan.definition_digest = Some(crate::resume::definition_digest(
        &plan,
        &sides.schema,
        &sides.dest,
        &renames,
    )?);
    if let Some(run) = &interrupted {
        crate::resume::resumable(run, &plan)?;
    }
    if opts.show_plan {
        use std::io::Write as _;
        print!("{}", crate::output::human_plan(&plan));
        let _ = std::io::stdout().flush();
    }
    let (control, source_client) = (sides.control, sides.source_client);
    // Shared with the copy's tasks, which plan each table's build as it lands.
    let source_schema = Arc::new(std::mem::take(&mut sides.schema));
    let renames = Arc::new(renames);
    let (schema, dest, earlier) = (&*source_schema, &sides.dest, &sides.earlier);
    // Shared with the task that writes its JSON as it is recorded (`state::insert`).
    let plan = Arc::new(plan);

    let mut report = Report::new(&plan, opts.dry_run);
    if opts.dry_run {
        // Rehearse what the run would create, in a transaction always rolled back.
        let failures = phases
            .run(
                "rehearsal",
                crate::rehearsal::rehearse(&control, &plan, schema, dest, &renames),
            )
            .await?;
        if !failures.is_empty() {
            return Err(refused(failures));
        }
        report.plan = Arc::unwrap_or_clone(plan);
        return Ok(Some(Prepared {
            control,
            created: RecordedObjects::default(),
            report,
        }));
    }

    // Leftovers of interrupted runs go first (only objects recorded by oid), but the run
    // being resumed.
    let others = plan::Earlier {
        leftovers: earlier
            .leftovers
            .iter()
            .filter(|(id, _)| interrupted.as_ref().is_none_or(|run| run.id != *id))
            .cloned()
            .collect(),
        ..earlier.clone()
    };
    report
        .cleaned_up
        .extend(clean_earlier_leftovers(&control, &others, opts.swap).await?);

    // A destination older than the source may lack what the source's definitions use: every
    // statement the run will need is rehearsed there first (rolled back), so the run is
    // refused before it creates anything rather than failing on the way (after the earlier runs'
    // leftovers went, whose names the rehearsal would collide with).
    if interrupted.is_none()
        && crate::compat::older_destination(schema.server_version, dest.server_version)
    {
        let failures = phases
            .run(
                "rehearsal",
                crate::rehearsal::rehearse(&control, &plan, schema, dest, &renames),
            )
            .await?;
        if !failures.is_empty() {
            let (from, to) = (
                crate::compat::major(schema.server_version),
                crate::compat::major(dest.server_version),
            );
            return Err(refused(
                failures
                    .into_iter()
                    .map(|f| format!("the source runs PostgreSQL {from} and the destination {to}, which cannot represent what follows: {f}"))
                    .collect(),
            ));
        }
    }
    let mut control = control;
    let mut created = match &interrupted {
        Some(run) => {
            crate::interrupt::set_run(plan.migration_id);
            let (resumed, objects) = phases
                .run(
                    "resume",
                    crate::resume::reset(
                        &mut control,
                        &plan,
                        schema,
                        dest,
                        run,
                        &crate::resume::SourceSnapshot {
                            url: &opts.source,
                            id: &sides.snapshot,
                            jobs: opts.jobs,
                        },
                    ),
                )
                .await?;
            report.resumed = Some(resumed);
            objects
        }
        None => {
            phases
                .run(
                    "shadow",
                    create_shadow(
                        &mut control,
                        &plan,
                        schema,
                        dest,
                        &renames,
                        opts,
                        lock_budget,
                    ),
                )
                .await?
        }
    };
    // Recorded: an interrupt from now on leaves this run to remove (see `interrupt`).
    crate::interrupt::set_run(plan.migration_id);
    // Built: the copy and the preserved tables' sync need only the preserved tables' oids.
    sides.dest.keep_for_copy(|t| plan.is_preserved(t));
    let dest = &sides.dest;
    // Remote agents' roles get what the copy needs on the tables they load, until it ends.
    let copied_into: std::collections::HashSet<&str> = plan
        .tables
        .iter()
        .filter(|t| !t.partitioned && !plan.is_preserved(&t.qualname()))
        .map(|t| t.shadow.as_str())
        .collect();
    let loaded: Vec<u32> = created
        .tables
        .iter()
        .filter(|(name, _)| copied_into.contains(name.as_str()))
        .map(|(_, oid)| *oid)
        .collect();
    let result = match crate::grants::grant(&control, &sides.agent_roles, &loaded).await {
        Err(e) => Err(e),
        Ok(grants) => {
            let result = fill(
                opts,
                pool,
                phases,
                &mut report,
                &mut control,
                source_client,
                &plan,
                &source_schema,
                dest,
                renames,
                sides.snapshot,
                &mut created,
                &grants,
            )
            .await;
            if result.is_err() {
                // Revoked after the copy phase already, unless the copy itself failed.
                let _ = crate::grants::revoke(&control, &grants).await;
            }
            result
        }
    };
    match result {
        Ok(()) => {
            report.plan = Arc::unwrap_or_clone(plan);
            Ok(Some(Prepared {
                control,
                created,
                report,
            }))
        }
        Err(err) => {
            abandon(&control, migration_id, &created, opts.swap, &err).await;
            Err(err)
        }
    }
}

/// The tables named on the command line (`--preserved-tables`), resolved in the migrated
/// schemas: a name as written when a migrated schema has such a table, else `schema.name` as
/// given, or a bare name in the one migrated schema whose source has that table (or the first migrated schema, where the plan then reports it missing). A bare
/// name that several migrated schemas have is a problem.
fn resolve_tables(raw: &[String], source: &SourceSchema) -> (Vec<QualName>, Vec<String>) {
    let mut names = Vec::new();
    let mut problems = Vec::new();
    let literal = |text: &str| {
        source
            .schemas
            .iter()
            .any(|s| source.table(&QualName::new(s.as_str(), text)).is_some())
    };
    for text in crate::naming::table_list(raw) {
        // A name is first taken as written (a table may be named `a.b` or `"x"`).
        let (schema, name) = if literal(&text) {
            (None, text.clone())
        } else {
            crate::naming::split_table_name(&text)
        };
        if let Some(schema) = schema {
            names.push(QualName::new(schema, name));
            continue;
        }
        let found: Vec<&String> = source
            .schemas
            .iter()
            .filter(|s| {
                source
                    .table(&QualName::new(s.as_str(), name.as_str()))
                    .is_some()
            })
            .collect();
        match found.as_slice() {
            [one] => names.push(QualName::new(one.as_str(), name)),
            [] => names.push(QualName::new(
                source.schemas.first().cloned().unwrap_or_else(crate::naming::public_schema),
                name,
            )),
            several => problems.push(format!(
                "--preserved-tables: {text:?} is a table of several migrated schemas ({}): qualify it as schema.table",
                several.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    (names, problems)
}

/// Each migrated source table's [`plan::SourceEvidence`] at the snapshot, by oid.
async fn source_evidence(
    source: &Client,
    schema: &SourceSchema,
) -> Result<BTreeMap<u32, plan::SourceEvidence>, CoordinatorError> {
    let oids: Vec<u32> = schema.tables.iter().map(|t| t.oid).collect();
    let rows = source
        .query_typed(
            "SELECT c.oid, coalesce(pg_relation_filenode(c.oid), 0)::int8 AS filenode,
                    coalesce(s.n_tup_ins + s.n_tup_upd + s.n_tup_del, -1)::int8 AS changes
             FROM pg_class c LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
             WHERE c.oid = ANY($1)",
            &[(&oids, tokio_postgres::types::Type::OID_ARRAY)],
        )
        .await
        .map_err(|e| CoordinatorError::source("read the tables' statistics", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, u32>("oid"),
                plan::SourceEvidence {
                    filenode: r.get("filenode"),
                    changes: r.get("changes"),
                },
            )
        })
        .collect())
}

/// Refuses when a source table's storage is no longer the one recorded at the plan
/// ([`plan::SourceEvidence::filenode`]): `TRUNCATE` and the commands that rewrite a table
/// (`VACUUM FULL`, `CLUSTER`, a rewriting `ALTER TABLE`) are not MVCC-safe, so a snapshot taken
/// before them reads the table empty (or without rows the rewrite did not keep), and the copy's
/// digests agree with it: the copy would be short without any error. Run after the copy, on
/// the snapshot's session (`pg_relation_filenode` reads the current catalog, not the snapshot):
/// a change before a table's copy is caught; one after it refuses a copy that was whole (the
/// safe side). What happens between the snapshot and the plan's reading of the evidence (the
/// catalog reads, seconds) is not seen, as with pg_dump's locks taken after its snapshot.
async fn source_unchanged(
    source: &Client,
    plan: &Plan,
    schema: &SourceSchema,
) -> Result<(), CoordinatorError> {
    let now = source_evidence(source, schema).await?;
    let changed: Vec<String> = plan
        .tables
        .iter()
        .filter_map(|tp| {
            let (t, planned) = (schema.table(&tp.qualname())?, tp.evidence?);
            (now.get(&t.oid).map(|e| e.filenode) != Some(planned.filenode)).then(|| format!(
                "source table {} was truncated, dropped or rewritten (TRUNCATE, VACUUM FULL, CLUSTER, a rewriting ALTER TABLE) while this run copied from its snapshot, which then reads it short; nothing was swapped and the shadow set is removed: run again once the source is quiet",
                t.qualname().plain()
            ))
        })
        .collect();
    if changed.is_empty() {
        Ok(())
    } else {
        Err(CoordinatorError::Refused(changed))
    }
}

/// Every copy task the agents reported done is recorded in `pgzm.copy_progress`, with as many
/// rows: a task's rows and its record commit together, so a missing record means the
/// destination lost a committed copy (a crash with `synchronous_commit = off`, a failover to a
/// replica that had not received it), and the shadow table lacks those rows. The run stops
/// then, before anything is built on them.
async fn check_recorded(
    control: &Client,
    id: i64,
    copied: &copy::Copied,
) -> Result<(), CoordinatorError> {
    let tasks: i64 = copied.tables.iter().map(|(_, s)| i64::from(s.tasks)).sum();
    let rows: i64 = copied
        .tables
        .iter()
        .map(|(_, s)| i64::try_from(s.rows).unwrap_or(i64::MAX))
        .sum();
    let row = control
        .query_one(
            "SELECT count(*) AS tasks, coalesce(sum(rows), 0)::int8 AS total_rows FROM pgzm.copy_progress WHERE migration_id = $1",
            &[&id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm.copy_progress", e))?;
    let (recorded, recorded_rows): (i64, i64) = (row.get("tasks"), row.get("total_rows"));
    if recorded < tasks || recorded_rows < rows {
        return Err(CoordinatorError::Refused(vec![format!(
            "the destination lost committed copies: {recorded} of {tasks} copy tasks ({recorded_rows} of {rows} rows) are recorded (did it restart with synchronous_commit = off, or fail over to a replica that had not received them?); nothing was swapped: run again"
        )]));
    }
    Ok(())
}

/// How long the source's snapshot transaction gets to commit once the copy is over.
const SNAPSHOT_RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The identity of the database a session is connected to: its server's start time
/// (microseconds) and system identifier (when the role may read it), and the database's oid.
const DATABASE_IDENTITY: &str = "
SELECT pg_postmaster_start_time()::text AS started_at,
       (SELECT oid FROM pg_database WHERE datname = current_database()) AS database_oid,
       CASE WHEN has_function_privilege('pg_control_system()', 'EXECUTE')
            THEN (SELECT system_identifier::text FROM pg_control_system()) END AS system_identifier";

/// Refuses when the source and the destination are one database reached through two different
/// connection strings (`localhost` and `127.0.0.1`, a socket and TCP, another user…): the same
/// server (start time, and system identifier when readable) and the same database oid.
async fn refuse_same_database(
    source: &Client,
    destination: &Client,
    dest_url: &crate::conninfo::DbUrl,
) -> Result<(), CoordinatorError> {
    type Identity = (String, u32, Option<String>);
    let identity = |r: tokio_postgres::Row| -> Identity {
        (
            r.get("started_at"),
            r.get("database_oid"),
            r.get("system_identifier"),
        )
    };
    // Both at once; one round trip each (the source may be across a WAN).
    let (s, d) = tokio::join!(
        source.query_typed_one(DATABASE_IDENTITY, &[]),
        destination.query_typed_one(DATABASE_IDENTITY, &[])
    );
    let s = s
        .map(identity)
        .map_err(|e| CoordinatorError::source("identify the source database", e))?;
    let d = d
        .map(identity)
        .map_err(|e| CoordinatorError::destination("identify the destination database", e))?;
    let same_system = match (&s.2, &d.2) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    if s.0 == d.0 && s.1 == d.1 && same_system {
        return Err(CoordinatorError::Usage(format!(
            "source and destination are the same database ({dest_url}, server started at {}): pass two different databases",
            d.0
        )));
    }
    Ok(())
}

/// The partitioned tables of the migration (not preserved), each after the partitioned tables
/// below it.
fn partitioned_build_order<'a>(schema: &'a SourceSchema, plan: &Plan) -> Vec<&'a Table> {
    let depth = |t: &Table| {
        let mut d = 0;
        let mut parent = t.partition_of.as_ref().map(|(p, _)| p);
        while let Some(p) = parent {
            d += 1;
            parent = schema
                .table(p)
                .and_then(|t| t.partition_of.as_ref())
                .map(|(p, _)| p);
            if d > 64 {
                break;
            }
        }
        d
    };
    let mut out: Vec<&Table> = schema
        .tables
        .iter()
        .filter(|t| {
            t.is_partitioned()
                && plan.table(&t.qualname()).is_some()
                && !plan.is_preserved(&t.qualname())
        })
        .collect();
    out.sort_by_key(|t| std::cmp::Reverse(depth(t)));
    out
}

/// Removes what a failed run created and records the failure. Never fails: if cleanup is not
/// possible now, the objects stay recorded and the next run removes them.
pub async fn abandon(
    control: &Client,
    id: i64,
    created: &RecordedObjects,
    locks: SwapSettings,
    err: &CoordinatorError,
) {
    let message = err.to_string();
    if let Err(clean_err) = state::clean_leftovers(control, id, created, locks).await {
        warn!(error = %clean_err, "could not remove this run's shadow objects now; the next run will");
    }
    let _ = state::set_status(control, id, state::RunStatus::Failed, None, Some(&message)).await;
}

/// What the swap does about foreign keys involving a preserved table (and the source's
/// triggers on preserved tables).
struct Deferred {
    /// In the swap, after the renames, on the live names (the new tables by then): each key
    /// added `NOT VALID` (a partitioned table's validated: it cannot be `NOT VALID`), and the
    /// triggers.
    statements: Vec<String>,
    /// In the swap, before its locks: a check per key that no shadow row breaks it.
    checks: Vec<String>,
    /// After the commit: the keys to validate.
    validations: Vec<(QualName, String)>,
}

/// A foreign key involving a preserved table is validated inside the swap transaction, but not
/// inside its lock window: the check (an anti-join over the shadow tables) runs before the
/// locks, while production goes on; the key is then added `NOT VALID` under the locks and
/// validated after the commit. Only a mirrored write committed between the check and the locks
/// (milliseconds) could escape the check; the validation after the commit reports it.
fn deferred_statements(schema: &SourceSchema, plan: &Plan) -> Deferred {
    let preserved: BTreeSet<QualName> = plan.preserved.iter().map(|p| p.qualname()).collect();
    let mut out = Deferred {
        statements: Vec::new(),
        checks: Vec::new(),
        validations: Vec::new(),
    };
    for t in &schema.tables {
        for c in t.constraints.iter().filter(|c| c.kind == 'f') {
            let involved = preserved.contains(&t.qualname())
                || c.references.as_ref().is_some_and(|r| preserved.contains(r));
            if !involved {
                continue;
            }
            let table = t.qualname().quoted();
            let def = c.definition.trim_end_matches(" NOT VALID");
            if t.is_partitioned() {
                out.statements.push(format!(
                    "ALTER TABLE {table} ADD CONSTRAINT {} {def}",
                    quote_ident(&c.name)
                ));
                continue;
            }
            out.statements.push(format!(
                "ALTER TABLE {table} ADD CONSTRAINT {} {def} NOT VALID",
                quote_ident(&c.name)
            ));
            if !c.validated {
                continue;
            }
            out.validations.push((t.qualname(), c.name.clone()));
            if let Some(check) = foreign_key_check(plan, &t.qualname(), c) {
                out.checks.push(check);
            }
        }
        if preserved.contains(&t.qualname()) {
            for tg in &t.triggers {
                out.statements.push(tg.definition.clone());
                if !tg.enabled {
                    out.statements.push(format!(
                        "ALTER TABLE {} DISABLE TRIGGER {}",
                        t.qualname().quoted(),
                        quote_ident(&tg.name)
                    ));
                }
            }
        }
    }
    out
}

/// A DO block failing with `foreign_key_violation` when a row of `table`'s shadow breaks key
/// `c` against the referenced table's shadow (`MATCH SIMPLE`: a row with a NULL key column is
/// exempt; `MATCH FULL`: all or none NULL).
fn foreign_key_check(
    plan: &Plan,
    table: &QualName,
    c: &crate::catalog::Constraint,
) -> Option<String> {
    let child = plan.table(table)?;
    let parent = plan.table(c.references.as_ref()?)?;
    if c.columns.is_empty() || c.columns.len() != c.ref_columns.len() {
        return None;
    }
    let col = |alias: &str, name: &str| format!("{alias}.{}", quote_ident(name));
    let not_null = c
        .columns
        .iter()
        .map(|k| format!("{} IS NOT NULL", col("c", k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let join = c
        .columns
        .iter()
        .zip(&c.ref_columns)
        .map(|(k, r)| format!("{} = {}", col("p", r), col("c", k)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let mut broken = format!(
        "({not_null}) AND NOT EXISTS (SELECT 1 FROM {} p WHERE {join})",
        parent.shadow_name()
    );
    if c.match_full && c.columns.len() > 1 {
        let all = c
            .columns
            .iter()
            .map(|k| col("c", k))
            .collect::<Vec<_>>()
            .join(", ");
        broken = format!(
            "({broken}) OR num_nonnulls({all}) BETWEEN 1 AND {}",
            c.columns.len() - 1
        );
    }
    let message = format!(
        "foreign key \"{}\" of {} would be broken by the new tables: a row of {} references a row of {} that is missing (a preserved table's rows and the new data disagree); nothing was changed: fix the rows, then swap again",
        c.name,
        table.plain(),
        table.plain(),
        parent.qualname().plain()
    );
    Some(pgzm_pg::sql::do_block(&format!(
        "BEGIN IF EXISTS (SELECT 1 FROM {} c WHERE {broken}) THEN \
         RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation', MESSAGE = {}; END IF; END",
        child.shadow_name(),
        quote_literal(&message)
    )))
}

/// The copy phase: every table that is neither preserved nor partitioned is copied by the
/// agents, and built (indexes, keys) on a build session as soon as it lands.
#[allow(clippy::too_many_arguments)]
async fn copy_and_build(
    opts: &StartOptions,
    pool: AgentPool,
    plan: &Arc<Plan>,
    schema: &Arc<SourceSchema>,
    renames: &Arc<Renames>,
    snapshot: String,
    sessions: &Arc<build::BuildSessions>,
    resumed: Option<&crate::report::Resumed>,
    analyze_threshold: i64,
) -> Result<copy::Copied, CoordinatorError> {
    // A resumed run copies only the tables it redoes.
    let redo: Option<BTreeSet<String>> =
        resumed.map(|r| r.redone.iter().map(|t| t.table.clone()).collect());
    let sessions = Arc::clone(sessions);
    let jobs: Vec<CopyJob> = plan
        .tables
        .iter()
        .filter(|t| !plan.is_preserved(&t.qualname()) && !t.partitioned && t.copy_data)
        .filter(|t| {
            redo.as_ref()
                .is_none_or(|r| r.contains(&t.qualname().display_name()))
        })
        .map(|t| CopyJob {
            key: t.qualname().quoted(),
            schema: t.schema.clone(),
            table: t.name.clone(),
            shadow: t.shadow.clone(),
            columns: t.copy_columns.clone(),
            pages: t.pages,
            bytes: t.estimated_bytes,
            copy_bytes: t.estimated_copy_bytes,
        })
        .collect();
    // Each table's build statements are planned when it lands, from the plan and the source
    // schema shared with the tasks (planned up front they were ~10 MB at 10 000 tables; the
    // resume digest has already planned every build once, so none fails here first).
    let shared = (Arc::clone(plan), Arc::clone(schema), Arc::clone(renames));
    let migration_id = plan.migration_id;
    let pool = Arc::new(pool);
    let dest = opts.destination.clone();
    let ctx = CopyContext {
        source: opts.source.clone(),
        destination: opts.destination.clone(),
        snapshot,
        migration_id: plan.migration_id,
        retries: opts.copy_retries,
        range_bytes: opts.range_bytes,
        verify: opts.verify,
        stall: opts.stall_timeout,
        rate_share_ppm: u32::try_from(1_000_000 / opts.jobs.max(1)).unwrap_or(1_000_000),
    };
    // Holds the copy back while a standby lags too much (`--max-replication-lag`, or set later
    // by `pgzm throttle`), until the copy ends.
    let _lag = crate::replication::LagMonitor::start(&opts.destination, plan.migration_id);
    copy::copy_all(
        ctx,
        Arc::clone(&pool),
        jobs,
        opts.jobs,
        move |job: CopyJob, stats: copy::CopyStats| {
            let ((plan, schema, renames), sessions, dest) =
                (shared.clone(), Arc::clone(&sessions), dest.clone());
            async move {
                let name = QualName::new(job.schema.clone(), job.table.clone());
                let Some(table) = schema.table(&name) else {
                    return Ok(());
                };
                let mut statements = build::table_build(table, &plan, &schema, &renames)?;
                if i64::try_from(stats.rows).unwrap_or(i64::MAX) < analyze_threshold {
                    statements.skip_statistics();
                }
                // The table is copied and built: recorded (with its last statements), so that
                // a resumed run keeps it.
                statements
                    .last
                    .push(crate::resume::built_marker(migration_id, &job.key));
                let label = format!("build \"{}\"", job.table);
                let span = build::table_span(
                    "build_table",
                    &dest,
                    &job.schema,
                    &job.table,
                    &job.shadow,
                    "CREATE INDEX",
                );
                if job.bytes < build::BATCH_BELOW_BYTES {
                    sessions
                        .run_batch(&label, statements.in_one_batch())
                        .instrument(span)
                        .await
                } else {
                    sessions
                        .run_table(&label, statements)
                        .instrument(span)
                        .await
                }
            }
        },
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn fill(
    opts: &StartOptions,
    pool: AgentPool,
    phases: &mut Phases,
    report: &mut Report,
    control: &mut Client,
    source_client: Client,
    plan: &Arc<Plan>,
    source_schema: &Arc<SourceSchema>,
    dest: &Destination,
    renames: Arc<Renames>,
    snapshot: String,
    created: &mut RecordedObjects,
    grants: &crate::grants::AgentGrants,
) -> Result<(), CoordinatorError> {
    let schema: &SourceSchema = source_schema;
    // A resumed run keeps what the interrupted run finished.
    let resumed = report.resumed.clone();
    let keeps = |t: &QualName| resumed.as_ref().is_some_and(|r| r.keeps(t));
    if plan.preserved.iter().any(|p| !keeps(&p.qualname())) {
        phases
            .run(
                "preserve",
                sync_preserved(opts, control, plan, schema, dest, &renames, created, &keeps),
            )
            .await?;
    }
    let sessions = Arc::new(
        build::BuildSessions::new(opts.destination.clone(), opts.build.clone())
            .with_parallel_statements(opts.jobs),
    );
    let copied = phases
        .run(
            "copy",
            copy_and_build(
                opts,
                pool,
                plan,
                source_schema,
                &renames,
                snapshot,
                &sessions,
                report.resumed.as_ref(),
                dest.analyze_threshold,
            ),
        )
        .await?;
    crate::progress::disable();
    source_unchanged(&source_client, plan, schema).await?;
    // Every task has read the snapshot: release it so the source's vacuum is not held back.
    // Bounded: with the link to the source down, the COMMIT would wait for TCP to give up
    // (minutes); the connection is dropped instead, and the server ends the transaction when it
    // notices.
    let _ = tokio::time::timeout(
        SNAPSHOT_RELEASE_TIMEOUT,
        source_client.batch_execute("COMMIT"),
    )
    .await;
    drop(source_client);
    // The destination may have restarted during the copy (the tasks and builds were retried).
    state::reattach(
        control,
        &opts.destination,
        plan.migration_id,
        state::RunStatus::Preparing,
    )
    .await?;
    let control: &Client = control;
    // The copy is over: a pause its lag monitor recorded last no longer holds.
    crate::progress::set_note(None);
    control
        .execute(
            "UPDATE pgzm.migrations SET paused = NULL WHERE id = $1 AND paused IS NOT NULL",
            &[&plan.migration_id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("clear the copy's pause", e))?;
    check_recorded(control, plan.migration_id, &copied).await?;
    // The agents are done: their roles lose what they were granted for the copy, before any
    // shadow table can become live.
    crate::grants::revoke(control, grants).await?;

    // Tables migrated without their rows (`--exclude-table-data`), and a resumed run's tables
    // built again over the rows they kept: no copy task hands them to the builds, so they are
    // built here, before any partitioned parent they belong to.
    let copied_again = |t: &QualName| match &resumed {
        Some(r) => r.copies(t),
        None => plan.table(t).is_some_and(|tp| tp.copy_data),
    };
    let empty: Vec<&Table> = schema
        .tables
        .iter()
        .filter(|t| {
            let name = t.qualname();
            !t.is_partitioned()
                && plan.table(&name).is_some()
                && !plan.is_preserved(&name)
                && !keeps(&name)
                && !copied_again(&name)
        })
        .collect();
    if !empty.is_empty() {
        phases
            .run("empty_tables", async {
                for t in empty {
                    build_in_one_batch(
                        &sessions,
                        opts,
                        plan,
                        schema,
                        &renames,
                        t,
                        &format!("build \"{}\" (without rows)", t.name),
                    )
                    .await?;
                }
                Ok(())
            })
            .await?;
    }
    // Partitioned tables, once all their partitions are built, deepest level first: their keys
    // and indexes attach the partitions' (built already) instead of building new ones.
    let mut parents = partitioned_build_order(schema, plan);
    parents.retain(|t| !keeps(&t.qualname()));
    if !parents.is_empty() {
        phases
            .run("partitioned", async {
                for t in parents {
                    build_in_one_batch(
                        &sessions,
                        opts,
                        plan,
                        schema,
                        &renames,
                        t,
                        &format!("build partitioned \"{}\"", t.name),
                    )
                    .await?;
                }
                Ok(())
            })
            .await?;
    }

    phases
        .run(
            "constraints",
            build::foreign_keys(&opts.destination, plan, schema, &renames, opts.jobs),
        )
        .await?;
    if !plan.matviews.is_empty() {
        phases
            .run(
                "materialized_views",
                crate::matview::build_all(control, plan, &renames, created),
            )
            .await?;
    }

    for (table, s) in &copied.tables {
        report.tables.push(TableReport {
            table: table.clone(),
            rows: s.rows,
            bytes: s.bytes,
            copy_ms: s.duration_ms,
            attempts: s.attempts,
            digest: s.digest.map(|d| d.hex()),
        });
        report.rows += s.rows;
        report.bytes += s.bytes;
    }
    report.tables.sort_by(|a, b| a.table.cmp(&b.table));
    report.throughput = Throughput::of(
        report.rows,
        report.bytes,
        &phases.0,
        u64::try_from(copied.data_time.as_millis()).unwrap_or(u64::MAX),
    );
    // Written straight to JSON text: a `serde_json::Value` of 10 000 table reports was ~7 MB,
    // the peak of a prepare once the plan was slimmed.
    #[derive(serde::Serialize)]
    struct Stats<'a> {
        tables: &'a [TableReport],
        rows: u64,
        bytes: u64,
        phases: &'a [crate::report::PhaseTiming],
        throughput: &'a Option<Throughput>,
    }
    let stats = serde_json::to_string(&Stats {
        tables: &report.tables,
        rows: report.rows,
        bytes: report.bytes,
        phases: &phases.0,
        throughput: &report.throughput,
    })
    .ok();
    state::set_status(
        control,
        plan.migration_id,
        state::RunStatus::Prepared,
        stats.as_deref(),
        None,
    )
    .await?;
    Ok(())
}

/// Builds `t`'s keys, indexes and triggers in one transaction with its `built:` marker (a
/// table without rows to copy, or a partitioned table).
async fn build_in_one_batch(
    sessions: &build::BuildSessions,
    opts: &StartOptions,
    plan: &Plan,
    schema: &SourceSchema,
    renames: &Renames,
    t: &Table,
    label: &str,
) -> Result<(), CoordinatorError> {
    let mut statements = build::table_build(t, plan, schema, renames)?.in_one_batch();
    statements.push(crate::resume::built_marker(
        plan.migration_id,
        &t.qualname().quoted(),
    ));
    let shadow = plan
        .table(&t.qualname())
        .map(|p| p.shadow.clone())
        .unwrap_or_default();
    sessions
        .run_batch(label, statements)
        .instrument(build::table_span(
            "build_table",
            &opts.destination,
            &t.schema,
            &t.name,
            &shadow,
            "CREATE INDEX",
        ))
        .await
}

/// Builds the preserved shadow tables' keys and indexes while they are empty, then, per table,
/// creates the sync triggers and copies the live rows in one transaction. Tables `kept` (by a
/// resumed run: their sync was set up) are left as they are.
#[allow(clippy::too_many_arguments)]
async fn sync_preserved(
    opts: &StartOptions,
    control: &Client,
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
    created: &mut RecordedObjects,
    kept: &(dyn Fn(&QualName) -> bool + Sync),
) -> Result<(), CoordinatorError> {
    let to_sync: Vec<&preserve::PreservedTable> = plan
        .preserved
        .iter()
        .filter(|p| !kept(&p.qualname()))
        .collect();
    for p in to_sync.iter().copied() {
        let Some(table) = schema.table(&p.qualname()) else {
            continue;
        };
        let statements = build::table_build(table, plan, schema, renames)?.sequential();
        build::run_on_session(
            &opts.destination,
            &opts.build,
            &format!("build \"{}\"", p.table),
            statements,
        )
        .await?;
    }
    for p in to_sync {
        let live_oid = dest.tables.get(&p.qualname()).map(|t| t.oid).unwrap_or(0);
        let mut next = created.clone();
        next.sync_triggers.push((p.table.clone(), live_oid));
        next.sync_functions.push(p.function.clone());
        let objects_json = serde_json::to_string(&next).unwrap_or_default();
        let mut tx = LockedTransaction::new();
        tx.locks(p.qualname().quoted());
        tx.extend(p.setup_sql(plan.migration_id));
        tx.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF (SELECT count(*) FROM {shadow}) <> (SELECT count(*) FROM {live}) THEN RAISE EXCEPTION 'row counts differ after the initial copy'; END IF; END",
            shadow = quote_qualified(&p.schema, &p.shadow),
            live = quote_qualified(&p.schema, &p.table)
        )));
        tx.push(format!(
            "UPDATE pgzm.migrations SET created_objects = {}::jsonb WHERE id = {}",
            quote_literal(&objects_json),
            plan.migration_id
        ));
        let action = format!("set up the sync of preserved table \"{}\"", p.table);
        tx.run(control, opts.swap, &action, &action).await?;
        *created = next;
    }
    Ok(())
}

/// Creates the shadow set (schemas, types, sequences, tables…), recording the migration's row in
/// the first transaction and every object (with its oid) in each: in one transaction when the
/// lock table allows, else in several, on two sessions for the sequences and tables (see
/// [`ShadowRun::staged`]).
async fn create_shadow(
    control: &mut Client,
    plan: &Arc<Plan>,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
    opts: &StartOptions,
    lock_budget: crate::locked::LockBudget,
) -> Result<RecordedObjects, CoordinatorError> {
    let (max_rate, max_lag, locks) = (opts.max_rate, opts.max_replication_lag, opts.swap);
    use pgzm_pg::sql::quote_ident;
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
                    e,
                )
            })?;
    }
    // The statements are made a transaction at a time, after the plan is recorded: the whole
    // shadow set's SQL is ~12 MB at 10 000 tables, and the plan's JSON ~14 MB.
    let per_transaction = shadow_objects_per_transaction(lock_budget, 1);
    let stages = crate::shadow::stages(plan, schema, dest, renames);
    let run = ShadowRun {
        plan,
        max_rate,
        max_lag,
        recorded: std::sync::Mutex::new(None),
    };
    let shared = stages.sequences.len + stages.tables.len;
    let done = if stages.count() <= per_transaction || shared < PARALLEL_SHADOW_MIN {
        run.serially(control, stages.into_objects(), per_transaction)
            .await
    } else {
        run.staged(control, &opts.destination, stages, lock_budget)
            .await
    };
    let recorded = run.recorded.into_inner().unwrap_or_else(|e| e.into_inner());
    match done {
        Ok(()) => Ok(recorded.unwrap_or_default()),
        Err(err) => {
            // The transactions that committed created (and recorded) part of the shadow set:
            // it goes, as a failed run's does.
            if let Some(objects) = &recorded {
                abandon(control, plan.migration_id, objects, locks, &err).await;
            }
            Err(err)
        }
    }
}

/// Below this many sequences and tables (the objects two sessions share), the shadow set is
/// created on one session.
const PARALLEL_SHADOW_MIN: usize = 2 * SHADOW_BATCH;

/// A run's shadow set being created, a transaction at a time, on one session or two.
struct ShadowRun<'a> {
    plan: &'a Arc<Plan>,
    max_rate: Option<u64>,
    max_lag: Option<std::time::Duration>,
    /// What the committed transactions recorded.
    recorded: std::sync::Mutex<Option<RecordedObjects>>,
}

/// Where a transaction stands in its run's shadow set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The first: it also records the migration.
    First,
    /// One between.
    Between,
    /// The last.
    Last,
    /// The only one.
    Only,
}

impl ShadowRun<'_> {
    /// The objects in order on `control`, up to `per_transaction` objects per transaction.
    async fn serially(
        &self,
        control: &mut Client,
        objects: impl Iterator<Item = crate::shadow::Object>,
        per_transaction: usize,
    ) -> Result<(), CoordinatorError> {
        let mut pending = objects.peekable();
        let mut first = true;
        loop {
            let next = next_shadow_transaction(&mut pending, per_transaction);
            let place = match (first, pending.peek().is_none()) {
                (true, true) => Place::Only,
                (true, false) => Place::First,
                (false, true) => Place::Last,
                (false, false) => Place::Between,
            };
            self.transaction(control, next, place).await?;
            if matches!(place, Place::Only | Place::Last) {
                return Ok(());
            }
            first = false;
        }
    }

    /// The shadow set in its [`Stages`](crate::shadow::Stages): the definitions on `control`
    /// (the first transaction records the migration and marks the set incomplete), then the
    /// sequences and then the independent tables shared by `control` and a second session
    /// (each takes the next transaction's worth as it finishes one), then the rest on
    /// `control` (its last transaction clears the mark).
    async fn staged(
        &self,
        control: &mut Client,
        destination: &crate::conninfo::DbUrl,
        stages: crate::shadow::Stages<'_>,
        lock_budget: crate::locked::LockBudget,
    ) -> Result<(), CoordinatorError> {
        let per_transaction = shadow_objects_per_transaction(lock_budget, 1);
        let opening = async {
            let mut pending = stages.definitions.objects.peekable();
            let mut place = Place::First;
            loop {
                let next = next_shadow_transaction(&mut pending, per_transaction);
                self.transaction(control, next, place).await?;
                if pending.peek().is_none() {
                    return Ok::<_, CoordinatorError>(());
                }
                place = Place::Between;
            }
        };
        let second = async {
            let client = destination.connect("pgzm-coordinator").await?;
            client
                .batch_execute(state::CATALOG_SESSION)
                .await
                .map_err(|e| CoordinatorError::destination("set search_path", e))?;
            Ok(client)
        };
        let ((), mut second) = tokio::try_join!(opening, second)?;
        // Each of two sessions holds the locks of its transaction's objects.
        let per_shared = shadow_objects_per_transaction(lock_budget, 2);
        for stage in [stages.sequences, stages.tables] {
            let shared = std::sync::Mutex::new(Shared {
                pending: stage.objects.peekable(),
                left: stage.len,
            });
            tokio::try_join!(
                self.share(&mut *control, &shared, per_shared),
                self.share(&mut second, &shared, per_shared)
            )?;
        }
        drop(second);
        let mut pending = stages.last.objects.peekable();
        loop {
            let next = next_shadow_transaction(&mut pending, per_transaction);
            let place = if pending.peek().is_none() {
                Place::Last
            } else {
                Place::Between
            };
            self.transaction(control, next, place).await?;
            if place == Place::Last {
                return Ok(());
            }
        }
    }

    /// Transactions on `client` of what is left of a shared stage, each taking the next
    /// transaction's worth (smaller near the end, so that the two sessions finish together).
    async fn share<I: Iterator<Item = crate::shadow::Object>>(
        &self,
        client: &mut Client,
        shared: &std::sync::Mutex<Shared<I>>,
        per_transaction: usize,
    ) -> Result<(), CoordinatorError> {
        loop {
            let next = {
                let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
                let Shared { pending, left } = &mut *shared;
                if pending.peek().is_none() {
                    return Ok(());
                }
                let size = per_transaction.min((*left / 4).max(2 * SHADOW_BATCH));
                *left = left.saturating_sub(size);
                next_shadow_transaction(pending, size)
            };
            self.transaction(client, next, Place::Between).await?;
        }
    }

    /// One transaction of the shadow set on `client`: its statements, then the record of what
    /// it created, with oids, appended to the migration's `created_objects` (an `UPDATE` of
    /// the row waits for the other session's transaction that updated it first, and appends to
    /// what that one committed). The first records the migration and what the plan names
    /// (schemas, trigger functions, index names); over several transactions, the first marks
    /// the set incomplete and the last clears the mark.
    async fn transaction(
        &self,
        client: &mut Client,
        next: ShadowTransaction,
        place: Place,
    ) -> Result<(), CoordinatorError> {
        let plan = self.plan;
        let ShadowTransaction {
            round_trips,
            creates,
        } = next;
        let tx = client
            .transaction()
            .await
            .map_err(|e| CoordinatorError::destination("begin the shadow transaction", e))?;
        let first = matches!(place, Place::First | Place::Only);
        if first {
            state::ensure_schema(&tx).await?;
            state::insert(&tx, plan, self.max_rate, self.max_lag).await?;
        }
        for batch in &round_trips {
            let sql: String = batch.iter().map(|(_, sql)| format!("{sql};\n")).collect();
            tx.batch_execute(&sql).await.map_err(|e| {
                let (first, last) = (&batch[0].0, &batch[batch.len() - 1].0);
                let what = if first == last {
                    first.clone()
                } else {
                    format!("{first} … {last}")
                };
                CoordinatorError::destination(what, e)
            })?;
        }
        drop(round_trips);
        let mark = match place {
            Place::First => Some(true),
            Place::Last => Some(false),
            Place::Between | Place::Only => None,
        };
        if let Some(incomplete) = mark {
            tx.batch_execute(&shadow_incomplete_sql(plan.migration_id, incomplete))
                .await
                .map_err(|e| CoordinatorError::destination("record the shadow set", e))?;
        }
        let created = record(&tx, &creates).await?;
        let created = if first {
            let all = RecordedObjects {
                schemas: plan.schemas_to_create.clone(),
                indexes: plan.indexes.iter().map(|m| m.to.to_string()).collect(),
                functions: plan
                    .functions_to_create
                    .iter()
                    .map(|(signature, _)| signature.clone())
                    .collect(),
                ..created
            };
            state::record_objects(&tx, plan.migration_id, &all).await?;
            all
        } else {
            // (Sequence positions, partitions attached: nothing new to record.)
            if !(created.tables.is_empty()
                && created.types.is_empty()
                && created.sequences.is_empty())
            {
                state::append_objects(&tx, plan.migration_id, &created).await?;
            }
            created
        };
        tx.commit()
            .await
            .map_err(|e| CoordinatorError::destination("commit the shadow transaction", e))?;
        // Recorded: an interrupt from now on removes what the run created (see `interrupt`),
        // even while the shadow set is still being created.
        crate::interrupt::set_run(plan.migration_id);
        let mut recorded = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        match recorded.as_mut() {
            None => *recorded = Some(created),
            Some(all) => {
                all.tables.extend(created.tables);
                all.types.extend(created.types);
                all.sequences.extend(created.sequences);
            }
        }
        Ok(())
    }
}

/// A stage's objects two sessions take from.
struct Shared<I: Iterator<Item = crate::shadow::Object>> {
    pending: std::iter::Peekable<I>,
    /// Objects not yet taken.
    left: usize,
}

/// Shadow objects (one table with its privileges, one type…) per round trip: an error names
/// the actions of its batch (and the server's message names the object).
const SHADOW_BATCH: usize = 64;
/// Locks a shadow object holds until its transaction commits: a table takes about 9 (itself,
/// its sequence, TOAST table and index, some in several modes).
const LOCKS_PER_SHADOW_OBJECT: i64 = 9;

/// Shadow objects per transaction: each transaction holds the locks of what it created until
/// it commits, and the server's lock table is shared by every session and sized at its start
/// (a shadow set of 1 500 tables in one transaction ran out of shared memory at the default
/// `max_locks_per_transaction`). The shadow set may use half of it (each of `sessions` an equal
/// part), a transaction up to 1 024 objects.
fn shadow_objects_per_transaction(budget: crate::locked::LockBudget, sessions: i64) -> usize {
    let objects = budget.capacity() / 2 / sessions.max(1) / LOCKS_PER_SHADOW_OBJECT;
    usize::try_from(objects.clamp(16, 1024)).unwrap_or(16)
}

/// One transaction's worth of the shadow set.
#[derive(Debug, Default)]
struct ShadowTransaction {
    /// Its statements, a round trip's at a time.
    round_trips: Vec<Vec<crate::shadow::Statement>>,
    /// What it creates that is recorded by oid.
    creates: Vec<crate::shadow::Created>,
}

/// The next transaction's shadow statements, taken from `pending`: up to `per_transaction`
/// objects, in round trips of up to [`SHADOW_BATCH`] objects. An object (a table and its
/// privileges…) is never split: a later transaction may run on the other session.
fn next_shadow_transaction(
    pending: &mut std::iter::Peekable<impl Iterator<Item = crate::shadow::Object>>,
    per_transaction: usize,
) -> ShadowTransaction {
    let per_round_trip = SHADOW_BATCH.min(per_transaction.max(1));
    let round_trips_per_transaction = (per_transaction / per_round_trip).max(1);
    let mut next = ShadowTransaction::default();
    while next.round_trips.len() < round_trips_per_transaction && pending.peek().is_some() {
        let mut batch = Vec::new();
        for object in pending.by_ref().take(per_round_trip) {
            batch.extend(object.statements);
            next.creates.extend(object.creates);
        }
        if !batch.is_empty() {
            next.round_trips.push(batch);
        }
    }
    next
}

/// Marks (or unmarks) a run whose shadow set is being created over several transactions: an
/// interrupted run so marked has copied nothing and cannot be resumed (its objects are removed
/// as leftovers by the next run).
fn shadow_incomplete_sql(migration_id: i64, incomplete: bool) -> String {
    if incomplete {
        format!(
            "INSERT INTO pgzm.copy_progress (migration_id, task_key, rows, bytes) VALUES ({migration_id}, '{SHADOW_INCOMPLETE}', 0, 0) ON CONFLICT DO NOTHING"
        )
    } else {
        format!(
            "DELETE FROM pgzm.copy_progress WHERE migration_id = {migration_id} AND task_key = '{SHADOW_INCOMPLETE}'"
        )
    }
}

/// `pgzm.copy_progress.task_key` of the mark of [`shadow_incomplete_sql`].
pub(crate) const SHADOW_INCOMPLETE: &str = "shadow:incomplete";

/// The oids of the tables, sequences and types a shadow transaction created (the names come
/// from the plan, the oids from the catalog as the transaction sees it).
async fn record(
    tx: &impl GenericClient,
    creates: &[crate::shadow::Created],
) -> Result<RecordedObjects, CoordinatorError> {
    use crate::shadow::Created;
    let (mut relations, mut types): (Vec<&QualName>, Vec<&QualName>) = (Vec::new(), Vec::new());
    for created in creates {
        match created {
            Created::Table(name) | Created::Sequence(name) => relations.push(name),
            Created::Type(name) => types.push(name),
        }
    }
    let oids = |sql: &'static str, names: Vec<&QualName>| {
        let schemas: Vec<String> = names.iter().map(|n| n.schema.to_string()).collect();
        let names: Vec<String> = names.iter().map(|n| n.name.to_string()).collect();
        async move {
            if names.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(sql, &[&schemas, &names])
                .await
                .map_err(|e| CoordinatorError::destination("record created objects", e))
        }
    };
    const RELS: &str =
        "SELECT c.relname::text AS name, c.oid, c.relkind = 'S' AS sequence FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = c.relname";
    const TYPES: &str = "SELECT t.typname::text AS name, t.oid FROM pg_type t
        JOIN pg_namespace n ON n.oid = t.typnamespace
        JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = t.typname";
    let mut recorded = RecordedObjects::default();
    for row in oids(RELS, relations).await? {
        let entry = (row.get::<_, String>("name"), row.get::<_, u32>("oid"));
        if row.get::<_, bool>("sequence") {
            recorded.sequences.push(entry);
        } else {
            recorded.tables.push(entry);
        }
    }
    for row in oids(TYPES, types).await? {
        recorded
            .types
            .push((row.get::<_, String>("name"), row.get::<_, u32>("oid")));
    }
    Ok(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 300 objects of one to three statements, some of two actions (a table and its
    /// privileges).
    fn objects() -> Vec<crate::shadow::Object> {
        (0..300)
            .map(|i| crate::shadow::Object {
                statements: (0..1 + i % 3)
                    .map(|j| {
                        let action = if j == 2 { "privileges of" } else { "table" };
                        (format!("{action} o{i}"), format!("o{i} s{j}"))
                    })
                    .collect(),
                creates: vec![crate::shadow::Created::Table(QualName::new(
                    "public",
                    format!("o{i}"),
                ))],
            })
            .collect()
    }

    /// Transactions of up to `per_transaction` objects, round trips of up to 64, an object's
    /// statements never split (the next transaction may run on another session), every
    /// statement sent once and in order.
    #[test]
    fn shadow_transactions_cut_between_objects() {
        let all = objects();
        let object_of = |sql: &str| sql.split(' ').next().unwrap_or_default().to_string();
        for per_transaction in [1, 16, 64, 100, 128, 1024] {
            let mut pending = all.clone().into_iter().peekable();
            let mut sent: Vec<crate::shadow::Statement> = Vec::new();
            let mut created = Vec::new();
            let mut transactions = 0;
            while pending.peek().is_some() {
                let next = next_shadow_transaction(&mut pending, per_transaction);
                let round_trips = next.round_trips;
                transactions += 1;
                // What it creates is its objects'.
                let objects: Vec<String> = round_trips
                    .iter()
                    .flatten()
                    .map(|(_, sql)| object_of(sql))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let mut creates: Vec<String> = next
                    .creates
                    .iter()
                    .map(|c| match c {
                        crate::shadow::Created::Table(name) => name.name.to_string(),
                        other => panic!("{other:?}"),
                    })
                    .collect();
                creates.sort();
                assert_eq!(creates, objects);
                created.extend(creates);
                let count = |b: &[crate::shadow::Statement]| {
                    b.iter()
                        .enumerate()
                        .filter(|(i, s)| *i == 0 || object_of(&b[i - 1].1) != object_of(&s.1))
                        .count()
                };
                let in_transaction: usize = round_trips.iter().map(|b| count(b)).sum();
                assert!(in_transaction <= per_transaction.max(1));
                for b in &round_trips {
                    assert!(!b.is_empty());
                    assert!(count(b) <= SHADOW_BATCH);
                    // A batch starts a new object: the previous one was sent whole.
                    assert_ne!(
                        sent.last().map(|(_, sql)| object_of(sql)),
                        Some(object_of(&b[0].1))
                    );
                    assert!(b[0].1.ends_with(" s0"), "{:?}", b[0]);
                    sent.extend(b.iter().cloned());
                }
            }
            let flat: Vec<crate::shadow::Statement> = all
                .iter()
                .flat_map(|o| o.statements.iter().cloned())
                .collect();
            assert_eq!(created.len(), 300);
            assert_eq!(sent, flat, "per transaction {per_transaction}");
            let expected = 300usize.div_ceil(
                per_transaction.min(SHADOW_BATCH)
                    * (per_transaction / per_transaction.min(SHADOW_BATCH)).max(1),
            );
            assert_eq!(transactions, expected, "per transaction {per_transaction}");
        }
        let mut empty = Vec::<crate::shadow::Object>::new().into_iter().peekable();
        let none = next_shadow_transaction(&mut empty, 64);
        assert!(none.round_trips.is_empty() && none.creates.is_empty());
    }
}
