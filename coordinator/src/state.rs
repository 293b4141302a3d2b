//! The migration's state, kept in the destination (schema `pgzm`), not in a local file: which
//! runs exist, what each created, which backup set is current.
//!
//! Every object the tool creates is recorded, with its oid, in the same transaction that creates
//! it, so an interrupted run can always be recognised and cleaned up precisely — never by
//! matching name patterns.

use tokio_postgres::{Client, GenericClient};

use std::collections::BTreeMap;

use crate::catalog::Oid;
use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::locked::LockedTransaction;
use crate::naming::QualName;
use crate::plan::{Move, Plan};

/// The settings of a session that reads the catalog: `search_path = pg_catalog`, so every
/// expression PostgreSQL prints is qualified; and no JIT. The catalog queries pass thousands
/// of oids in an array, which the planner costs high enough to JIT-compile each query: ~0.6 s
/// of compilation for a query of 0.4 s at 10 000 tables.
pub const CATALOG_SESSION: &str = "SET search_path = pg_catalog; SET jit = off";

/// Schema holding the tool's metadata.
pub const SCHEMA: &str = "pgzm";

/// Advisory lock key held by a running pgzm on the destination ("pgzm" in ASCII).
pub const LOCK_KEY: i64 = 0x7067_7a6d;

const DDL: &str = "
CREATE SCHEMA IF NOT EXISTS pgzm;
COMMENT ON SCHEMA pgzm IS 'pg_zero_migration metadata: migrations, their objects and backup sets';
CREATE TABLE IF NOT EXISTS pgzm.migrations (
    id              bigint PRIMARY KEY,
    status          text NOT NULL CHECK (status IN ('preparing', 'prepared', 'swapped', 'failed', 'rolled_back')),
    source          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    prepared_at     timestamptz,
    swapped_at      timestamptz,
    plan            jsonb NOT NULL,
    created_objects jsonb NOT NULL DEFAULT '{}',
    shadow_present  boolean NOT NULL DEFAULT false,
    backup_present  boolean NOT NULL DEFAULT false,
    stats           jsonb,
    error           text
);
CREATE TABLE IF NOT EXISTS pgzm.copy_progress (
    migration_id    bigint NOT NULL,
    task_key        text NOT NULL,
    rows            bigint NOT NULL,
    bytes           bigint NOT NULL,
    done_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration_id, task_key)
);
-- The rows' digest (verified copies); added after the first release.
ALTER TABLE pgzm.copy_progress ADD COLUMN IF NOT EXISTS digest text;
-- The copy's byte-rate budget (bytes per second, all tasks and agents; NULL: none), which
-- `pgzm throttle` changes while the run copies and the agents read every second.
ALTER TABLE pgzm.migrations ADD COLUMN IF NOT EXISTS max_rate bigint;
-- Copy tasks not finished yet (queued or running), kept by the coordinator while it copies: it
-- never grows, so an agent that read it a moment ago never gives a task more than its part of
-- the budget (at the end of a run, fewer tasks than --jobs share all of it).
ALTER TABLE pgzm.migrations ADD COLUMN IF NOT EXISTS copy_tasks_left integer;
-- `--max-replication-lag` in milliseconds (NULL: none), and why the copy is paused now (NULL:
-- it is not), set by the run's lag monitor and read by the agents.
ALTER TABLE pgzm.migrations ADD COLUMN IF NOT EXISTS max_lag_ms bigint;
ALTER TABLE pgzm.migrations ADD COLUMN IF NOT EXISTS paused text;
-- What a rollback moved aside (renamed, in its transaction) and drops after its commit, in
-- batches: a row is written by the rollback's transaction and deleted by the one that drops its
-- object, so what a crash leaves here is what is left to drop (by the next `pgzm rollback`,
-- `pgzm cleanup` or `pgzm prepare`). `name` is the name it was moved aside to, `live_name` the
-- one it had; only an object whose oid and name still match is dropped.
CREATE TABLE IF NOT EXISTS pgzm.rolled_back_objects (
    migration_id    bigint NOT NULL,
    kind            text NOT NULL,
    schema_name     text NOT NULL,
    name            text NOT NULL,
    live_name       text NOT NULL,
    object_oid      oid NOT NULL,
    PRIMARY KEY (migration_id, kind, schema_name, name)
);
-- The copy task's check before its commit (see the agent's `guard`): a function, so PL/pgSQL
-- compiles it once per agent session instead of a DO block per task (0.2 ms each).
CREATE OR REPLACE FUNCTION pgzm.assert_copying(migration bigint) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgzm.migrations WHERE id = migration AND status = 'preparing') THEN
        RAISE EXCEPTION 'migration % is no longer copying: the copy is rolled back', migration
            USING ERRCODE = 'insufficient_privilege';
    END IF;
END
$fn$;
CREATE TABLE IF NOT EXISTS pgzm.sync_errors (
    migration_id    bigint NOT NULL,
    table_name      text NOT NULL,
    operation       text NOT NULL,
    message         text NOT NULL,
    at              timestamptz NOT NULL DEFAULT clock_timestamp()
);";

pub use crate::records::{RecordedObjects, RunStatus};

/// Takes the destination's run lock on this session; false when another run holds it.
///
/// A run that just ended (or was killed) releases the lock only when the server has noticed
/// its closed connection, a moment after the process is gone; so a held lock is retried for
/// [`LOCK_GRACE`] before another run is reported.
pub async fn try_lock(client: &Client) -> Result<bool, CoordinatorError> {
    let started = std::time::Instant::now();
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1) AS locked", &[&LOCK_KEY])
            .await
            .map_err(|e| CoordinatorError::destination("take the pgzm run lock", e))?;
        if row.get("locked") {
            return Ok(true);
        }
        if started.elapsed() >= LOCK_GRACE {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Makes sure the run's control session (which holds the run lock) is alive; if the
/// destination restarted (crash recovery, a failover) and the session is gone, connects again
/// (for up to [`crate::copy::RESTART_PATIENCE`]), takes the run lock again and checks that
/// nothing happened meanwhile: run `id` is still the newest and still `status`. Otherwise the
/// run stops (its objects are cleaned up by the next run or `pgzm abort`).
pub async fn reattach(
    control: &mut Client,
    destination: &crate::conninfo::DbUrl,
    id: i64,
    status: RunStatus,
) -> Result<(), CoordinatorError> {
    if !control.is_closed() && control.simple_query("SELECT 1").await.is_ok() {
        return Ok(());
    }
    tracing::warn!(
        migration = id,
        "the destination's control session was lost (did the server restart?): connecting again"
    );
    let started = std::time::Instant::now();
    let client = loop {
        let attempt = async {
            let c = destination.connect("pgzm-coordinator").await?;
            c.batch_execute(crate::state::CATALOG_SESSION)
                .await
                .map_err(|e| CoordinatorError::destination("set search_path", e))?;
            Ok::<_, CoordinatorError>(c)
        };
        match attempt.await {
            Ok(c) => break c,
            Err(e) if started.elapsed() < crate::copy::RESTART_PATIENCE => {
                tracing::debug!(error = %e, "the destination is not back yet");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    };
    if !try_lock(&client).await? {
        return Err(CoordinatorError::Refused(vec![format!(
            "migration {id} lost its connection to the destination, and another pgzm run holds the destination now: this run stops; check `pgzm status`"
        )]));
    }
    let newest = newest(&client).await?;
    if newest.as_ref() != Some(&(id, status.as_str().to_string())) {
        let (other, now) = newest.unwrap_or_default();
        return Err(CoordinatorError::Refused(vec![format!(
            "migration {id} lost its connection to the destination, and meanwhile the newest run became migration {other} ({now}): this run stops; check `pgzm status`"
        )]));
    }
    tracing::info!(
        migration = id,
        "reconnected to the destination; the run goes on"
    );
    *control = client;
    Ok(())
}

/// Releases the run lock taken by [`try_lock`] on this session (best effort: it goes with the
/// session anyway).
pub async fn unlock(client: &Client) {
    if let Err(e) = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
    {
        tracing::warn!(error = %e, "could not release the pgzm run lock; it goes with the connection");
    }
}

/// How long [`try_lock`] waits for the lock of a run that is ending.
pub const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Creates the metadata schema when missing.
pub async fn ensure_schema(client: &impl GenericClient) -> Result<(), CoordinatorError> {
    client
        .batch_execute(DDL)
        .await
        .map_err(|e| CoordinatorError::destination("create the pgzm metadata schema", e))
}

/// The comment pgzm puts on its schema: a schema named `pgzm` without it is someone else's.
const SCHEMA_COMMENT: &str =
    "pg_zero_migration metadata: migrations, their objects and backup sets";

/// Whether the metadata table exists (read-only check, for dry runs). A schema named `pgzm`
/// that pgzm did not create is refused, never read or written.
pub async fn exists(client: &Client) -> Result<bool, CoordinatorError> {
    let row = client
        .query_one(
            "SELECT to_regclass('pgzm.migrations') IS NOT NULL AS table_exists,
                    (SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = 'pgzm') AS schema_comment,
                    EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgzm') AS schema_exists",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?;
    let (table, comment, schema): (bool, Option<String>, bool) = (
        row.get("table_exists"),
        row.get("schema_comment"),
        row.get("schema_exists"),
    );
    if schema && comment.as_deref() != Some(SCHEMA_COMMENT) {
        return Err(CoordinatorError::Refused(vec![
            "the destination has a schema named \"pgzm\" that pgzm did not create (pgzm keeps its metadata there): rename that schema, then run again".into(),
        ]));
    }
    Ok(table)
}

/// Unfinished runs with shadow objects that may still exist, and the current backup set.
pub async fn earlier_runs(client: &Client) -> Result<crate::plan::Earlier, CoordinatorError> {
    let mut earlier = crate::plan::Earlier::default();
    if !exists(client).await? {
        return Ok(earlier);
    }
    let rows = client
        .query(
            "SELECT id, created_objects, plan, shadow_present, backup_present, status FROM pgzm.migrations
             WHERE shadow_present OR backup_present ORDER BY id",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?;
    for row in rows {
        let id: i64 = row.get("id");
        if row.get::<_, bool>("shadow_present") {
            let objects: RecordedObjects =
                serde_json::from_value(row.get("created_objects")).unwrap_or_default();
            earlier.leftovers.push((id, objects));
            if row.get::<_, String>("status") == RunStatus::Prepared.as_str() {
                earlier.prepared = Some(id);
            }
        }
        if row.get::<_, bool>("backup_present") {
            let plan = backup_moves(&row).map_err(|e| CoordinatorError::Metadata {
                what: format!("read the backup set of migration {id}"),
                message: format!("its recorded plan is unreadable ({e}); inspect pgzm.migrations"),
            })?;
            earlier.backup_set = Some((id, plan));
        }
    }
    // What rollbacks moved aside and did not drop yet (a crash after their commit): cleaned up
    // first, as an interrupted run's objects are.
    let aside = rolled_back_objects(client, None).await?;
    let ids: std::collections::BTreeSet<i64> = aside.iter().map(|o| o.migration_id).collect();
    for id in ids {
        earlier.leftovers.push((
            id,
            as_recorded(aside.iter().filter(|o| o.migration_id == id)),
        ));
    }
    Ok(earlier)
}

/// The newest migration recorded in the destination (id and status), if any: what a run
/// reads before waiting for the run lock and again once it holds it, to notice another run
/// that finished meanwhile.
pub async fn newest(client: &Client) -> Result<Option<(i64, String)>, CoordinatorError> {
    if !exists(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT id, status FROM pgzm.migrations ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?;
    Ok(row.map(|r| (r.get("id"), r.get("status"))))
}

/// The backup moves of a recorded plan (its `plan` column), parsed from the column's bytes
/// without the rest of the plan.
fn backup_moves(
    row: &tokio_postgres::Row,
) -> Result<Vec<crate::plan::Move>, tokio_postgres::Error> {
    #[derive(serde::Deserialize)]
    struct BackupMoves {
        to_backup: Vec<crate::plan::Move>,
    }
    Ok(row
        .try_get::<_, tokio_postgres::types::Json<BackupMoves>>("plan")?
        .0
        .to_backup)
}

/// Records a new run in the shadow-creation transaction.
pub async fn insert(
    client: &impl GenericClient,
    plan: &std::sync::Arc<Plan>,
    max_rate: Option<u64>,
    max_lag: Option<std::time::Duration>,
) -> Result<(), CoordinatorError> {
    use futures_util::SinkExt as _;
    use std::io::Write as _;
    let err = |e| CoordinatorError::destination("record the migration in pgzm.migrations", e);
    // The row goes as `COPY` data in pieces, not as one `INSERT` parameter, and the plan's JSON
    // (~14 MB at 10 000 tables) is written by a blocking task a piece at a time as it is sent:
    // neither the client nor the session ever holds all of it.
    let text = |v: Option<i64>| v.map_or_else(|| "\\N".to_string(), |v| v.to_string());
    let head = format!("{}\tpreparing\t", plan.migration_id);
    let tail = format!(
        "\ttrue\t{}\t{}\n",
        text(rate_column(max_rate)),
        text(lag_column(max_lag))
    );
    let sink = client
        .client()
        .copy_in::<_, bytes::Bytes>(
            "COPY pgzm.migrations (id, status, source, plan, shadow_present, max_rate, max_lag_ms) FROM STDIN",
        )
        .await
        .map_err(err)?;
    let mut sink = std::pin::pin!(sink);
    let (pieces, mut received) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
    let plan = std::sync::Arc::clone(plan);
    let writer = tokio::task::spawn_blocking(move || {
        // Delimiters go in as they are; the fields' text through `CopyText`, escaped.
        let mut row = CopyPieces {
            text: CopyText(head.into_bytes()),
            pieces,
        };
        row.write_all(plan.source.as_bytes())?;
        row.text.0.push(b'\t');
        serde_json::to_writer(&mut row, &*plan).map_err(std::io::Error::other)?;
        row.text.0.extend_from_slice(tail.as_bytes());
        row.ship()
    });
    while let Some(piece) = received.recv().await {
        sink.feed(piece).await.map_err(err)?;
    }
    writer
        .await
        .map_err(std::io::Error::other)
        .and_then(|written| written)
        .map_err(|e| CoordinatorError::Usage(format!("internal: the plan as JSON: {e}")))?;
    sink.as_mut().finish().await.map_err(err)?;
    Ok(())
}

/// `COPY` text sent in pieces of [`COPY_PIECE`] bytes as it is written (from a blocking task).
struct CopyPieces {
    text: CopyText,
    pieces: tokio::sync::mpsc::Sender<bytes::Bytes>,
}

impl CopyPieces {
    /// Sends what is written so far.
    fn ship(&mut self) -> std::io::Result<()> {
        if self.text.0.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.text.0, Vec::with_capacity(COPY_PIECE + 64));
        self.pieces
            .blocking_send(piece.into())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl std::io::Write for CopyPieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.write_all(buf)?;
        if self.text.0.len() >= COPY_PIECE {
            self.ship()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes of `COPY` data per message when recording a plan.
const COPY_PIECE: usize = 64 << 10;

/// Text of one `COPY … FROM STDIN` field, escaped as it is written (backslash, and the
/// characters that end a field or a row).
struct CopyText(Vec<u8>);

impl std::io::Write for CopyText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            match b {
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b'\n' => self.0.extend_from_slice(b"\\n"),
                b'\r' => self.0.extend_from_slice(b"\\r"),
                b'\t' => self.0.extend_from_slice(b"\\t"),
                _ => self.0.push(b),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Stores what a run created (in the transaction that created it).
pub async fn record_objects(
    client: &impl GenericClient,
    id: i64,
    objects: &RecordedObjects,
) -> Result<(), CoordinatorError> {
    let json = serde_json::to_value(objects).unwrap_or_default();
    client
        .execute(
            "UPDATE pgzm.migrations SET created_objects = $2 WHERE id = $1",
            &[&id, &json],
        )
        .await
        .map_err(|e| CoordinatorError::destination("record created objects", e))?;
    Ok(())
}

/// Appends tables, types and sequences (with oids) to a run's `created_objects`. The `UPDATE`
/// appends to the row as last committed: a transaction of another session appending to it
/// first is waited for, not overwritten.
pub async fn append_objects(
    client: &impl GenericClient,
    id: i64,
    objects: &RecordedObjects,
) -> Result<(), CoordinatorError> {
    let json = |v: &Vec<(String, u32)>| serde_json::to_value(v).unwrap_or_default();
    client
        .execute(
            "UPDATE pgzm.migrations SET created_objects = coalesce(created_objects, '{}') || jsonb_build_object(
                 'tables', coalesce(created_objects->'tables', '[]') || $2::jsonb,
                 'types', coalesce(created_objects->'types', '[]') || $3::jsonb,
                 'sequences', coalesce(created_objects->'sequences', '[]') || $4::jsonb)
             WHERE id = $1",
            &[
                &id,
                &json(&objects.tables),
                &json(&objects.types),
                &json(&objects.sequences),
            ],
        )
        .await
        .map_err(|e| CoordinatorError::destination("record created objects", e))?;
    Ok(())
}

/// Sets the status (and optionally stats or an error) of a run.
pub async fn set_status(
    client: &impl GenericClient,
    id: i64,
    status: RunStatus,
    stats: Option<&str>,
    error: Option<&str>,
) -> Result<(), CoordinatorError> {
    client
        .execute(
            "UPDATE pgzm.migrations SET status = $2, stats = coalesce($3::text::jsonb, stats), error = $4,
                    prepared_at = CASE WHEN $2 = 'prepared' THEN now() ELSE prepared_at END
             WHERE id = $1",
            &[&id, &status.as_str(), &stats, &error],
        )
        .await
        .map_err(|e| CoordinatorError::destination(format!("mark migration {id} {status}"), e))?;
    Ok(())
}

/// Drops what an unfinished run created, only objects whose oid still matches the record, and
/// marks the run failed:
/// 1. the run's agents' database sessions are ended (a frozen agent's open transaction would
///    hold its locks on a shadow table);
/// 2. the sync triggers on live tables and their functions, in a transaction of their own, so
///    that live tables stop mirroring even when something below cannot be dropped now;
/// 3. shadow materialized views, tables, sequences, types and functions, in a second one.
///
/// Both with a short lock_timeout and retries (dropping a trigger locks its table).
pub async fn clean_leftovers(
    client: &Client,
    id: i64,
    objects: &RecordedObjects,
    locks: crate::locked::SwapSettings,
) -> Result<Vec<String>, CoordinatorError> {
    use pgzm_pg::sql::quote_ident;
    if !rolled_back_objects(client, Some(id)).await?.is_empty() {
        // A rollback's objects moved aside: no sessions or sync triggers of its own.
        let outcome = drop_rolled_back(client, Some(id), locks).await?;
        for w in &outcome.warnings {
            tracing::warn!(migration = id, "{w}");
        }
        return Ok(outcome.dropped);
    }
    let ended = crate::copy::end_sessions(client, &crate::copy::session_tag_pattern(id)).await;
    match ended {
        Ok(n) if n > 0 => tracing::info!(
            migration = id,
            sessions = n,
            "ended the database sessions of the run's agents"
        ),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(migration = id, error = %pgzm_pg::conn::describe(&e), "could not end the run's agents' sessions")
        }
    }
    let mut dropped = Vec::new();
    let mut triggers = LockedTransaction::new();
    let live = recorded_relations(client, &objects.sync_triggers).await?;
    for (table, oid) in &objects.sync_triggers {
        if let Some(qualified) = live.get(oid).filter(|q| &q.name == table) {
            triggers.locks(qualified.quoted());
            for (name, _) in crate::preserve::TRIGGERS {
                triggers.push(format!(
                    "DROP TRIGGER IF EXISTS {} ON {qualified}",
                    quote_ident(name),
                ));
            }
            dropped.push(format!("sync triggers on {}", qualified.display_name()));
        }
    }
    for function in &objects.sync_functions {
        triggers.push(format!("DROP FUNCTION IF EXISTS {function}()"));
    }
    if !triggers.is_empty() {
        triggers
            .run(
                client,
                locks,
                &format!("remove the sync triggers of migration {id}"),
                &format!("remove the sync triggers of migration {id} from the live tables"),
            )
            .await?;
    }
    let (shadows, names) = shadow_drops(client, id, objects).await?;
    dropped.extend(names);
    shadows
        .run(
            client,
            locks,
            &format!("clean up migration {id}"),
            &format!("clean up the shadow objects of migration {id}"),
        )
        .await?;
    Ok(dropped)
}

/// The transaction dropping the shadow objects of migration `id` that are still the recorded
/// ones (same oid), and marking the run failed; with what it drops, for the report.
async fn shadow_drops(
    client: &Client,
    id: i64,
    objects: &RecordedObjects,
) -> Result<(LockedTransaction, Vec<String>), CoordinatorError> {
    use pgzm_pg::sql::{quote_literal, quote_qualified};
    let mut dropped = Vec::new();
    let mut tx = LockedTransaction::new();
    // Shadow materialized views read shadow tables: they go first, dependents first.
    for (schema, name, oid) in objects.matviews.iter().rev() {
        let qualified = quote_qualified(schema, name);
        tx.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN IF to_regclass({lit}) = {oid}::oid THEN EXECUTE {drop}; END IF; END",
            lit = quote_literal(&qualified),
            drop = quote_literal(&format!("DROP MATERIALIZED VIEW {qualified}"))
        )));
        dropped.push(format!("materialized view {name}"));
    }
    // Each object is dropped only while it is still the recorded one: same oid, same name
    // (wherever its schema).
    let relations: Vec<(String, Oid)> = objects
        .tables
        .iter()
        .chain(&objects.sequences)
        .cloned()
        .collect();
    let found = recorded_relations(client, &relations).await?;
    let still = |(name, oid): &(String, Oid)| found.get(oid).filter(|q| &q.name == name);
    let tables: Vec<&QualName> = objects.tables.iter().filter_map(still).collect();
    if !tables.is_empty() {
        tx.push(format!(
            "DROP TABLE {}",
            tables
                .iter()
                .map(|t| t.quoted())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        dropped.extend(tables.iter().map(|t| format!("table {}", t.display_name())));
    }
    for qualified in objects.sequences.iter().filter_map(still) {
        // Owned sequences went with their tables.
        tx.push(format!("DROP SEQUENCE IF EXISTS {qualified}"));
        dropped.push(format!("sequence {}", qualified.display_name()));
    }
    let oids: Vec<Oid> = objects.types.iter().map(|(_, oid)| *oid).collect();
    let types: BTreeMap<Oid, QualName> = client
        .query(
            "SELECT t.oid, n.nspname::text AS schema_name, t.typname::text AS name
             FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up the shadow types", e))?
        .iter()
        .map(|r| (r.get("oid"), QualName::from_row(r)))
        .collect();
    for (name, oid) in objects.types.iter().rev() {
        if let Some(qualified) = types.get(oid).filter(|q| &q.name == name) {
            tx.push(format!("DROP TYPE {qualified}"));
            dropped.push(format!("type {}", qualified.display_name()));
        }
    }
    // Schemas the run created go last, and only when nothing else is in them by then.
    for schema in &objects.schemas {
        tx.push(drop_schema_if_empty(schema));
    }
    for signature in &objects.functions {
        // Only if nothing else uses it by now: no CASCADE, and a refusal is not fatal.
        tx.push(pgzm_pg::sql::do_block(&format!(
            "BEGIN EXECUTE {}; EXCEPTION WHEN dependent_objects_still_exist THEN NULL; END",
            quote_literal(&format!("DROP FUNCTION IF EXISTS {signature}"))
        )));
    }
    tx.push(format!(
        "UPDATE pgzm.migrations SET shadow_present = false,
                status = CASE WHEN status IN ('preparing', 'prepared') THEN 'failed' ELSE status END,
                error = coalesce(error, 'interrupted; cleaned up by a later run')
         WHERE id = {id}"
    ));
    Ok((tx, dropped))
}

/// The current schema-qualified names of the recorded relations that still exist, by oid (one
/// query for all).
async fn recorded_relations(
    client: &impl GenericClient,
    recorded: &[(String, Oid)],
) -> Result<BTreeMap<Oid, QualName>, CoordinatorError> {
    let oids: Vec<Oid> = recorded.iter().map(|(_, oid)| *oid).collect();
    if oids.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(client
        .query(
            "SELECT c.oid, n.nspname::text AS schema_name, c.relname::text AS name
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up the recorded relations", e))?
        .iter()
        .map(|r| (r.get("oid"), QualName::from_row(r)))
        .collect())
}

/// A block dropping `schema` when it holds nothing (a schema a run created, once its objects
/// are gone); a schema someone else has put objects in by then stays.
pub fn drop_schema_if_empty(schema: &str) -> String {
    use pgzm_pg::sql::{quote_ident, quote_literal};
    pgzm_pg::sql::do_block(&format!(
        "BEGIN EXECUTE {}; EXCEPTION WHEN dependent_objects_still_exist OR invalid_schema_name THEN NULL; END",
        quote_literal(&format!("DROP SCHEMA {}", quote_ident(schema)))
    ))
}

/// What dropping a backup set runs: its views and functions (one block, dependency order),
/// its tables (one statement), its sequences; and the types to drop one by one (a type still
/// used by a destination-only table is kept under another name, see [`drop_backup_set`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropBackupPlan {
    /// Statements, in order.
    pub statements: Vec<String>,
    /// What they drop, for the report.
    pub dropped: Vec<String>,
    /// Backup types to drop.
    pub types: Vec<QualName>,
}

/// The statements dropping the backup objects of `moves` that exist (one catalog query).
pub async fn drop_backup_statements(
    client: &impl GenericClient,
    moves: &[Move],
) -> Result<DropBackupPlan, CoordinatorError> {
    use crate::plan::ObjectKind;
    let relations: Vec<&Move> = moves
        .iter()
        .filter(|m| matches!(m.kind, ObjectKind::Table | ObjectKind::Sequence))
        .collect();
    let schemas: Vec<&str> = relations.iter().map(|m| m.schema.as_str()).collect();
    let names: Vec<&str> = relations.iter().map(|m| m.to.as_str()).collect();
    let present: std::collections::BTreeSet<(QualName, bool)> = client
        .query(
            "SELECT n.nspname::text AS schema_name, c.relname::text AS name, c.relkind = 'S' AS is_sequence
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = c.relname
              WHERE c.relkind IN ('r', 'p', 'S')",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up the backup objects", e))?
        .iter()
        .map(|r| (QualName::from_row(r), r.get("is_sequence")))
        .collect();
    let tables = present.iter().filter(|(_, sequence)| !sequence).count();
    let before = if tables > TABLES_PER_BATCH {
        drop_dependencies(client, &schemas, &names).await?
    } else {
        Vec::new()
    };
    Ok(plan_drop_backup(moves, &present, &before))
}

/// Among the backup tables named (`schemas`, `names`): (a, b) when `a` must be dropped no later
/// than `b` in statements of their own: `a` has a foreign key into `b`, or inherits from it (or
/// is a partition of it: dropping `b` would drop `a` with it).
async fn drop_dependencies(
    client: &impl GenericClient,
    schemas: &[&str],
    names: &[&str],
) -> Result<Vec<(QualName, QualName)>, CoordinatorError> {
    Ok(client
        .query(
            "WITH t AS (SELECT c.oid, n.nspname::text AS s, c.relname::text AS r
                          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          JOIN unnest($1::text[], $2::text[]) w(s, r) ON w.s = n.nspname AND w.r = c.relname
                         WHERE c.relkind IN ('r', 'p'))
             SELECT a.s AS first_schema, a.r AS first_name, b.s AS then_schema, b.r AS then_name
               FROM (SELECT conrelid AS first, confrelid AS next FROM pg_constraint
                      WHERE contype = 'f' AND conrelid <> confrelid
                     UNION
                     SELECT inhrelid, inhparent FROM pg_inherits) e
               JOIN t a ON a.oid = e.first JOIN t b ON b.oid = e.next",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up the backup tables' keys", e))?
        .iter()
        .map(|r| {
            (
                QualName::new(r.get::<_, String>("first_schema"), r.get::<_, String>("first_name")),
                QualName::new(r.get::<_, String>("then_schema"), r.get::<_, String>("then_name")),
            )
        })
        .collect())
}

/// `tables` in groups of at most [`TABLES_PER_BATCH`], one `DROP TABLE` each, ordered so that
/// for every (a, b) of `before` `a` is in the same group as `b` or an earlier one (Kahn's
/// ordering, the list's order among the tables free to go; tables in a cycle all go in one last
/// group). PostgreSQL's dependency code is superlinear in the objects of one statement: one
/// `DROP TABLE` of a 10 000-table backup set took 28 s of server time. Up to
/// [`TABLES_PER_BATCH`] tables stay one statement, in the list's order.
pub fn drop_groups(tables: &[QualName], before: &[(QualName, QualName)]) -> Vec<Vec<QualName>> {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashMap};
    if tables.len() <= TABLES_PER_BATCH {
        return vec![tables.to_vec()];
    }
    let position: HashMap<&QualName, usize> =
        tables.iter().enumerate().map(|(i, t)| (t, i)).collect();
    let mut waiting = vec![0usize; tables.len()];
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); tables.len()];
    let edges: std::collections::BTreeSet<(usize, usize)> = before
        .iter()
        .filter_map(|(a, b)| Some((*position.get(a)?, *position.get(b)?)))
        .filter(|(a, b)| a != b)
        .collect();
    for &(a, b) in &edges {
        waiting[b] += 1;
        next[a].push(b);
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..tables.len())
        .filter(|&i| waiting[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(tables.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &b in &next[i] {
            waiting[b] -= 1;
            if waiting[b] == 0 {
                ready.push(Reverse(b));
            }
        }
    }
    let mut groups: Vec<Vec<QualName>> = order
        .chunks(TABLES_PER_BATCH)
        .map(|c| c.iter().map(|&i| tables[i].clone()).collect())
        .collect();
    // Never ready: still waiting on a table of a cycle.
    let cycle: Vec<QualName> = (0..tables.len())
        .filter(|&i| waiting[i] > 0)
        .map(|i| tables[i].clone())
        .collect();
    if !cycle.is_empty() {
        groups.push(cycle);
    }
    groups
}

/// [`drop_backup_statements`]' decisions: `present` holds the backup relations that exist, as
/// (name, is a sequence).
pub fn plan_drop_backup(
    moves: &[Move],
    present: &std::collections::BTreeSet<(QualName, bool)>,
    before: &[(QualName, QualName)],
) -> DropBackupPlan {
    use crate::plan::ObjectKind;
    let of_kind = |kind: ObjectKind, sequence: bool| -> Vec<QualName> {
        moves
            .iter()
            .map(|m| (m, QualName::new(m.schema.clone(), m.to.clone())))
            .filter(|(m, q)| m.kind == kind && present.contains(&(q.clone(), sequence)))
            .map(|(_, q)| q)
            .collect()
    };
    let tables = of_kind(ObjectKind::Table, false);
    let sequences = of_kind(ObjectKind::Sequence, true);
    let mut out = DropBackupPlan {
        types: moves
            .iter()
            .filter(|m| m.kind == ObjectKind::Type)
            .map(|m| QualName::new(m.schema.clone(), m.to.clone()))
            .collect(),
        ..DropBackupPlan::default()
    };
    // Views and functions (in any schema) may depend on each other: dropped in dependency order.
    let (block, names) = drop_views_and_functions(moves);
    if let Some(block) = block {
        out.statements.push(block);
        out.dropped.extend(names);
    }
    if !tables.is_empty() {
        for group in drop_groups(&tables, before) {
            out.statements.push(format!(
                "DROP TABLE {}",
                group
                    .iter()
                    .map(QualName::quoted)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.dropped
            .extend(tables.iter().map(|n| format!("table {}", n.display_name())));
    }
    for n in &sequences {
        out.statements.push(format!("DROP SEQUENCE IF EXISTS {n}"));
    }
    out
}

/// Drops the backup set of migration `id` (its backup-named tables, sequences, types, views).
pub async fn drop_backup_set(
    client: &mut Client,
    id: i64,
    moves: &[Move],
) -> Result<Vec<String>, CoordinatorError> {
    use crate::plan::ObjectKind;
    let action = |what: &str| format!("drop the backup set of migration {id}: {what}");
    let tx = client
        .transaction()
        .await
        .map_err(|e| CoordinatorError::destination(action("begin"), e))?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(|e| CoordinatorError::destination(action("set lock_timeout"), e))?;
    let planned = drop_backup_statements(&tx, moves).await?;
    let (statements, mut dropped, types) = (planned.statements, planned.dropped, planned.types);
    for sql in statements {
        tx.batch_execute(&sql)
            .await
            .map_err(|e| CoordinatorError::destination(action(&sql), e))?;
    }
    // A backup type may still be used by a destination-only table (it kept the live type when
    // the migration replaced it): such a type stays instead of failing the run, but leaves the
    // `backup_` name — the next swap needs that name for the type it replaces — for
    // `replaced_<name>` (or `replaced_<id>_<name>` if taken), and is reported.
    for n in &types {
        let sql = format!("DROP TYPE IF EXISTS {n}");
        tx.batch_execute("SAVEPOINT drop_type")
            .await
            .map_err(|e| CoordinatorError::destination(action("savepoint"), e))?;
        match tx.batch_execute(&sql).await {
            Ok(()) => dropped.push(format!("type {}", n.display_name())),
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT drop_type")
                    .await
                    .map_err(|e| {
                        CoordinatorError::destination(action("rollback to savepoint"), e)
                    })?;
                let live = moves
                    .iter()
                    .find(|m| m.kind == ObjectKind::Type && m.to == n.name && m.schema == n.schema)
                    .map_or(n.name.as_str(), |m| m.from.as_str());
                let used_by: String = tx
                    .query_one(
                        "SELECT coalesce(string_agg(DISTINCT format('%I.%I', c.relname, a.attname), ', '), '') AS used_by
                         FROM pg_type t JOIN pg_attribute a ON a.atttypid IN (t.oid, t.typarray)
                         JOIN pg_class c ON c.oid = a.attrelid
                         WHERE t.typname = $1 AND t.typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)
                           AND a.attnum > 0 AND NOT a.attisdropped",
                        &[&n.name, &n.schema],
                    )
                    .await
                    .map_err(|e| CoordinatorError::destination(action("find a type's users"), e))?
                    .get("used_by");
                let mut aside = crate::naming::prefixed("replaced_", live);
                let taken = |name: String| {
                    let tx = &tx;
                    async move {
                        tx.query_opt(
                            "SELECT 1 FROM pg_type WHERE typname = $1 AND typnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)",
                            &[&name, &n.schema],
                        )
                        .await
                        .map(|r| r.is_some())
                        .map_err(|e| CoordinatorError::destination("look up a type", e))
                    }
                };
                if taken(aside.clone()).await? {
                    aside = crate::naming::prefixed(&format!("replaced_{id}_"), live);
                }
                let rename = format!(
                    "ALTER TYPE {n} RENAME TO {}",
                    pgzm_pg::sql::quote_ident(&aside)
                );
                tx.batch_execute(&rename)
                    .await
                    .map_err(|e| CoordinatorError::destination(action(&rename), e))?;
                tracing::warn!(r#type = %n, renamed_to = %aside, used_by = %used_by, error = %pgzm_pg::conn::describe(&e), "backup type kept: still in use");
                dropped.push(format!(
                    "type {} kept, still used by {used_by}: renamed to {aside}",
                    n.display_name()
                ));
            }
        }
    }
    tx.execute(
        "UPDATE pgzm.migrations SET backup_present = false WHERE id = $1",
        &[&id],
    )
    .await
    .map_err(|e| CoordinatorError::destination(action("update metadata"), e))?;
    tx.commit()
        .await
        .map_err(|e| CoordinatorError::destination(action("commit"), e))?;
    Ok(dropped)
}

/// A backup set moved aside by the swap that replaces it as the current set: its objects take
/// `backup_<id>_` names so the new set can take the `backup_` ones, and its recorded moves are
/// rewritten to the new names in the same transaction.
#[derive(Debug, Clone)]
pub struct AsideSet {
    /// The set's migration id.
    pub id: i64,
    /// Renames of its objects that exist: `from` = current (backup) name, `to` = aside name.
    pub renames: Vec<Move>,
    /// Its moves as they are recorded after the swap (`to` = aside name).
    pub recorded: Vec<Move>,
}

impl AsideSet {
    /// The statement recording the set's new names (part of the swap transaction).
    pub fn record_sql(&self) -> String {
        let json = serde_json::to_string(&self.recorded).unwrap_or_else(|_| "[]".into());
        format!(
            "UPDATE pgzm.migrations SET plan = jsonb_set(plan, '{{to_backup}}', {}::jsonb) WHERE id = {}",
            pgzm_pg::sql::quote_literal(&json),
            self.id
        )
    }
}

const ASIDE_CHECK: &str = "
SELECT x.i::int4 AS move_index,
       CASE x.k WHEN 'function' THEN EXISTS (SELECT 1 FROM pg_proc p WHERE p.oid = x.o AND p.proname = x.n)
                WHEN 'type' THEN EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace s ON s.oid = t.typnamespace
                                         WHERE s.nspname = x.sc AND t.typname = x.n)
                ELSE EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                             WHERE s.nspname = x.sc AND c.relname = x.n) END AS present,
       CASE x.k WHEN 'function' THEN EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace s ON s.oid = p.pronamespace
                                             WHERE s.nspname = x.sc AND p.proname = x.t)
                ELSE EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                             WHERE s.nspname = x.sc AND c.relname = x.t)
                  OR EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace s ON s.oid = t.typnamespace
                             WHERE s.nspname = x.sc AND t.typname = x.t) END AS target_taken
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::oid[]) WITH ORDINALITY AS x(k, sc, n, t, o, i)";

/// Plans moving backup set `id` (its recorded `moves`) aside for the next swap. Refuses, before
/// any change, when an aside name is taken by an object pgzm did not create.
pub async fn aside_set(
    client: &Client,
    id: i64,
    moves: &[Move],
) -> Result<AsideSet, CoordinatorError> {
    use crate::plan::ObjectKind;
    let prefix = format!("{}{id}_", crate::naming::BACKUP);
    let recorded: Vec<Move> = moves
        .iter()
        .map(|m| Move {
            to: crate::naming::prefixed(&prefix, &m.from).into(),
            ..m.clone()
        })
        .collect();
    let kind = |k: ObjectKind| match k {
        ObjectKind::Function => "function",
        ObjectKind::Type => "type",
        _ => "relation",
    };
    let kinds: Vec<&str> = moves.iter().map(|m| kind(m.kind)).collect();
    let schemas: Vec<&str> = moves.iter().map(|m| m.schema.as_str()).collect();
    let names: Vec<&str> = moves.iter().map(|m| m.to.as_str()).collect();
    let targets: Vec<&str> = recorded.iter().map(|m| m.to.as_str()).collect();
    let oids: Vec<Oid> = moves.iter().map(|m| m.oid.unwrap_or(0)).collect();
    let rows = client
        .query(ASIDE_CHECK, &[&kinds, &schemas, &names, &targets, &oids])
        .await
        .map_err(|e| CoordinatorError::destination("inspect the current backup set", e))?;
    let mut renames = Vec::new();
    let mut problems = Vec::new();
    for r in rows {
        let i = usize::try_from(r.get::<_, i32>("move_index") - 1).unwrap_or(0);
        let (exists, taken): (bool, bool) = (r.get("present"), r.get("target_taken"));
        if !exists {
            continue;
        }
        if taken {
            problems.push(format!(
                "the backup set of migration {id} must move aside to make room for the new one, but {} is taken by an object pgzm did not create: rename or drop it, or drop that backup set first (`pgzm cleanup`)",
                crate::plan::qualified_display(&recorded[i].schema, &recorded[i].to)
            ));
            continue;
        }
        renames.push(Move {
            from: moves[i].to.clone(),
            ..recorded[i].clone()
        });
    }
    if !problems.is_empty() {
        return Err(CoordinatorError::Refused(problems));
    }
    Ok(AsideSet {
        id,
        renames,
        recorded,
    })
}

/// After a swap committed: drops the backup sets beyond the newest `keep`. Never fails: a set
/// that cannot be dropped is kept and reported. Returns what was dropped and the warnings.
pub async fn drop_old_sets(client: &mut Client, keep: u32) -> (Vec<String>, Vec<String>) {
    let rows = match client
        .query(
            "SELECT id, plan FROM pgzm.migrations WHERE backup_present ORDER BY id DESC",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            return (
                Vec::new(),
                vec![format!(
                "older backup sets could not be listed ({}); run `pgzm list` and `pgzm cleanup`",
                pgzm_pg::conn::describe(&e)
            )],
            )
        }
    };
    let mut dropped = Vec::new();
    let mut warnings = Vec::new();
    for row in rows.iter().skip(usize::try_from(keep.max(1)).unwrap_or(1)) {
        let id: i64 = row.get("id");
        let moves = match backup_moves(row) {
            Ok(moves) => moves,
            Err(e) => {
                warnings.push(format!(
                    "backup set {id} is kept: its recorded plan is unreadable ({e})"
                ));
                continue;
            }
        };
        match drop_backup_set(client, id, &moves).await {
            Ok(names) => dropped.extend(names),
            Err(e) => warnings.push(format!(
                "backup set {id} could not be dropped and is kept ({e}); see `pgzm list`, and run `pgzm cleanup` once what blocks it is gone"
            )),
        }
    }
    (dropped, warnings)
}

/// One `DO` block dropping the backup views and functions of `moves` that still exist, in
/// dependency order (a view may call a function, a function may be typed on a view): each pass
/// drops what nothing else depends on any more; the last statement left raises its real error.
/// Returns the block (None when there is nothing to drop) and what it may drop.
pub fn drop_views_and_functions(moves: &[Move]) -> (Option<String>, Vec<String>) {
    use crate::plan::ObjectKind;
    use pgzm_pg::sql::{quote_literal, quote_qualified};
    let mut checks = Vec::new();
    let mut names = Vec::new();
    for m in moves {
        match (m.kind, m.oid) {
            (ObjectKind::View | ObjectKind::MaterializedView, _) => {
                let name = quote_qualified(&m.schema, &m.to);
                let (keyword, what) = if m.kind == ObjectKind::View {
                    ("VIEW", "view")
                } else {
                    ("MATERIALIZED VIEW", "materialized view")
                };
                checks.push(format!(
                    "CASE WHEN to_regclass({}) IS NOT NULL THEN {} END",
                    quote_literal(&name),
                    quote_literal(&format!("DROP {keyword} {name}"))
                ));
                names.push(format!(
                    "{what} {}",
                    crate::plan::qualified_display(&m.schema, &m.to)
                ));
            }
            (ObjectKind::Function, Some(oid)) => {
                checks.push(format!(
                    "(SELECT 'DROP ROUTINE ' || p.oid::regprocedure::text FROM pg_catalog.pg_proc p WHERE p.oid = {oid} AND p.proname = {})",
                    quote_literal(&m.to)
                ));
                names.push(format!(
                    "function {}",
                    crate::plan::qualified_display(&m.schema, &m.to)
                ));
            }
            _ => {}
        }
    }
    if checks.is_empty() {
        return (None, names);
    }
    let block = pgzm_pg::sql::do_block(&format!(
        "DECLARE todo text[] := array_remove(ARRAY[{}], NULL); rest text[]; s text; \
         BEGIN \
         LOOP rest := '{{}}'; \
           FOREACH s IN ARRAY todo LOOP \
             BEGIN EXECUTE s; EXCEPTION WHEN dependent_objects_still_exist THEN rest := rest || s; END; \
           END LOOP; \
           EXIT WHEN cardinality(rest) = 0 OR cardinality(rest) = cardinality(todo); \
           todo := rest; \
         END LOOP; \
         FOREACH s IN ARRAY rest LOOP EXECUTE s; END LOOP; END",
        checks.join(", ")
    ));
    (Some(block), names)
}

/// The limits of a run that is copying (`--max-rate`, `--max-replication-lag`, as `pgzm
/// throttle` last set them), and why it is paused, if it is.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct CopyLimits {
    /// Byte-rate budget, bytes per second (none: unlimited).
    pub max_rate_bytes_per_s: Option<u64>,
    /// Replication-lag limit, seconds (none: no limit).
    pub max_replication_lag_s: Option<f64>,
    /// Why the copy is paused now (none: it is not).
    pub paused: Option<String>,
}

impl CopyLimits {
    /// From the `max_rate`, `max_lag_ms` and `paused` columns of its `pgzm.migrations` row.
    pub fn from_row(row: &tokio_postgres::Row) -> CopyLimits {
        CopyLimits {
            max_rate_bytes_per_s: row
                .get::<_, Option<i64>>("max_rate")
                .and_then(|r| u64::try_from(r).ok()),
            max_replication_lag_s: row
                .get::<_, Option<i64>>("max_lag_ms")
                .map(|ms| ms as f64 / 1000.0),
            paused: row.get("paused"),
        }
    }
}

/// `max_rate` as stored.
fn rate_column(rate: Option<u64>) -> Option<i64> {
    rate.map(|r| i64::try_from(r).unwrap_or(i64::MAX))
}

/// `max_lag_ms` as stored.
fn lag_column(lag: Option<std::time::Duration>) -> Option<i64> {
    lag.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What `pgzm throttle` set.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Throttled {
    /// The migration that is copying.
    pub migration_id: i64,
    /// Its limits now.
    #[serde(flatten)]
    pub limits: CopyLimits,
}

/// Changes the byte-rate budget (`Some(None)`: unlimited) and the replication-lag limit
/// (`Some(None)`: none) of the run that is copying into `dest` (`None`: left as they are); its
/// agents and its lag monitor apply them within a second.
pub async fn throttle(
    dest: &DbUrl,
    max_rate: Option<Option<u64>>,
    max_lag: Option<Option<std::time::Duration>>,
) -> Result<Throttled, CoordinatorError> {
    let client = dest.connect("pgzm-coordinator").await?;
    let none = || {
        CoordinatorError::Refused(vec![
            "no migration is copying into this destination (pgzm status shows where the newest stands): --max-rate applies to a run's copy only".into(),
        ])
    };
    if !exists(&client).await? {
        return Err(none());
    }
    let (rate, lag) = (max_rate.map(rate_column), max_lag.map(lag_column));
    let row = client
        .query_opt(
            "UPDATE pgzm.migrations
                SET max_rate = CASE WHEN $1 THEN $2 ELSE max_rate END,
                    max_lag_ms = CASE WHEN $3 THEN $4 ELSE max_lag_ms END
              WHERE id = (SELECT max(id) FROM pgzm.migrations WHERE status = 'preparing')
              RETURNING id, max_rate, max_lag_ms, paused",
            &[
                &rate.is_some(),
                &rate.flatten(),
                &lag.is_some(),
                &lag.flatten(),
            ],
        )
        .await
        .map_err(|e| CoordinatorError::destination("set the copy's budget", e))?;
    let row = row.ok_or_else(none)?;
    let t = Throttled {
        migration_id: row.get("id"),
        limits: CopyLimits::from_row(&row),
    };
    tracing::info!(migration = t.migration_id, limits = ?t.limits, "copy limits set");
    Ok(t)
}

/// What `pgzm abort` removed (or would remove).
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct Aborted {
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// The runs removed.
    pub migrations: Vec<i64>,
    /// Their objects, sync triggers first.
    pub removed: Vec<String>,
}

/// `pgzm abort`: removes every run that is interrupted or prepared but not swapped — its sync
/// triggers on live tables first, then its shadow objects, only objects recorded by oid — and
/// marks it failed. Live tables and backup sets are untouched.
pub async fn abort(
    destination: &crate::conninfo::DbUrl,
    dry_run: bool,
    locks: crate::locked::SwapSettings,
) -> Result<Aborted, CoordinatorError> {
    let client = destination.connect("pgzm-abort").await?;
    if !try_lock(&client).await? {
        return Err(CoordinatorError::Busy);
    }
    client
        .batch_execute(crate::state::CATALOG_SESSION)
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", e))?;
    let earlier = earlier_runs(&client).await?;
    let mut out = Aborted {
        dry_run,
        migrations: Vec::new(),
        removed: Vec::new(),
    };
    for (id, objects) in &earlier.leftovers {
        out.migrations.push(*id);
        if dry_run {
            out.removed.extend(
                objects
                    .sync_triggers
                    .iter()
                    .map(|(t, _)| format!("sync triggers on {t}")),
            );
            out.removed
                .extend(objects.tables.iter().map(|(t, _)| format!("table {t}")));
            continue;
        }
        out.removed
            .extend(clean_leftovers(&client, *id, objects, locks).await?);
    }
    unlock(&client).await;
    Ok(out)
}

/// After this process's run `id` was interrupted: when it was still preparing, removes its
/// sync triggers and shadow objects (as a failed run's) and records why. Returns the status it
/// had (None: not recorded).
pub async fn abort_run(
    destination: &crate::conninfo::DbUrl,
    id: i64,
    locks: crate::locked::SwapSettings,
) -> Result<Option<RunStatus>, CoordinatorError> {
    let client = destination.connect("pgzm-interrupted").await?;
    if !try_lock(&client).await? {
        return Err(CoordinatorError::Busy);
    }
    client
        .batch_execute(crate::state::CATALOG_SESSION)
        .await
        .map_err(|e| CoordinatorError::destination("set search_path", e))?;
    let Some(row) = load(&client, Some(id)).await? else {
        unlock(&client).await;
        return Ok(None);
    };
    if row.status == RunStatus::Preparing {
        client
            .execute(
                "UPDATE pgzm.migrations SET error = 'interrupted by the operator' WHERE id = $1",
                &[&id],
            )
            .await
            .map_err(|e| CoordinatorError::destination("record the interruption", e))?;
        clean_leftovers(&client, id, &row.objects, locks).await?;
    }
    unlock(&client).await;
    Ok(Some(row.status))
}

/// The sync triggers (pgzm's, found by their function's schema) on live tables, with whether
/// each is enabled: what `status` reports, whatever the metadata says.
pub async fn sync_triggers_present(
    client: &Client,
) -> Result<Vec<(String, String, bool)>, CoordinatorError> {
    let rows = client
        .query(
            "SELECT n.nspname::text AS schema_name, c.relname::text AS name, t.tgname::text, t.tgenabled <> 'D' AS enabled
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = 'pgzm')
             ORDER BY 1, 2, 3",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect sync triggers", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                QualName::from_row(r).display_name(),
                r.get("tgname"),
                r.get("enabled"),
            )
        })
        .collect())
}

/// One row of `pgzm.migrations`.
#[derive(Debug, Clone)]
pub struct MigrationRow {
    /// Migration id (ms since the epoch).
    pub id: i64,
    /// Its status.
    pub status: RunStatus,
    /// Source (`user@host:port/db`).
    pub source: String,
    /// The plan recorded at prepare time.
    pub plan: Plan,
    /// Objects created before the swap.
    pub objects: RecordedObjects,
    /// Whether its shadow objects may still exist.
    pub shadow_present: bool,
    /// Whether its backup set exists.
    pub backup_present: bool,
    /// Seconds since it was created.
    pub age_seconds: f64,
    /// Timestamps (text, server time zone).
    pub created_at: String,
    /// When prepared.
    pub prepared_at: Option<String>,
    /// When swapped.
    pub swapped_at: Option<String>,
    /// Recorded statistics.
    pub stats: Option<serde_json::Value>,
    /// Recorded error.
    pub error: Option<String>,
}

/// Loads migration `id`, or the newest one. `None` when there is none (or no metadata yet).
pub async fn load(
    client: &Client,
    id: Option<i64>,
) -> Result<Option<MigrationRow>, CoordinatorError> {
    if !exists(client).await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT id, status, source, plan, created_objects, shadow_present, backup_present,
                    extract(epoch FROM now() - created_at)::float8 AS age_seconds, to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at, to_char(prepared_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS prepared_at,
                    to_char(swapped_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS swapped_at, stats, error
             FROM pgzm.migrations WHERE $1::int8 IS NULL OR id = $1 ORDER BY id DESC LIMIT 1",
            &[&id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?;
    row.as_ref().map(MigrationRow::from_row).transpose()
}

impl MigrationRow {
    /// A row of the query of [`load`].
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, CoordinatorError> {
        let id: i64 = row.get("id");
        // Parsed from the column's bytes, without a `serde_json::Value` of it first (at 10 000
        // tables the plan is ~12 MB of JSON; the Value took several times that).
        let plan: Plan = row
            .try_get::<_, tokio_postgres::types::Json<Plan>>("plan")
            .map(|p| p.0)
            .map_err(|e| CoordinatorError::Metadata {
                what: format!("read migration {id}"),
                message: format!(
                    "its recorded plan is unreadable ({e}); it was written by another pgzm version"
                ),
            })?;
        let status: String = row.get("status");
        let status = RunStatus::parse(&status).ok_or_else(|| CoordinatorError::Metadata {
            what: format!("read migration {id}"),
            message: format!(
                "its status {status:?} is unknown; it was written by another pgzm version"
            ),
        })?;
        Ok(MigrationRow {
            id,
            status,
            source: row.get("source"),
            plan,
            objects: row
                .try_get::<_, tokio_postgres::types::Json<RecordedObjects>>("created_objects")
                .map(|o| o.0)
                .unwrap_or_default(),
            shadow_present: row.get("shadow_present"),
            backup_present: row.get("backup_present"),
            age_seconds: row.get("age_seconds"),
            created_at: row.get("created_at"),
            prepared_at: row.get("prepared_at"),
            swapped_at: row.get("swapped_at"),
            stats: row.get("stats"),
            error: row.get("error"),
        })
    }
}

/// The error of a recorded plan that does not parse.
fn unreadable_plan(id: i64, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Metadata {
        what: format!("read migration {id}"),
        message: format!(
            "its recorded plan is unreadable ({e}); it was written by another pgzm version"
        ),
    }
}

/// Migration `id`'s recorded plan with its arrays `blank` read as empty: the large ones the
/// caller reads an element at a time ([`plan_array`]) or does not need. At 10 000 tables the
/// plan is ~13 MB of JSON in one column: read whole, the row sits in the connection's read
/// buffer (which keeps that size for the session) beside the parsed plan. `None` when there is
/// no such migration.
pub async fn plan_without(
    client: &impl GenericClient,
    id: i64,
    blank: &[&str],
) -> Result<Option<Plan>, CoordinatorError> {
    let row = client
        .query_opt(
            "SELECT m.plan || (SELECT coalesce(jsonb_object_agg(k, '[]'::jsonb), '{}'::jsonb)
                               FROM unnest($2::text[]) k) AS plan
             FROM pgzm.migrations m WHERE m.id = $1",
            &[&id, &blank],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?;
    row.map(|r| {
        r.try_get::<_, tokio_postgres::types::Json<Plan>>("plan")
            .map(|p| p.0)
            .map_err(|e| unreadable_plan(id, e))
    })
    .transpose()
}

/// The elements of array `key` of migration `id`'s recorded plan (`tables`, `to_backup`, …)
/// that `keep` accepts, in order. Read a row per element and parsed as they arrive: no message
/// holds the whole array, no row is kept, only what `keep` accepts is. Nothing when the plan
/// has no such array (or there is no such migration).
pub async fn plan_array<T, F>(
    client: &impl GenericClient,
    id: i64,
    key: &str,
    mut keep: F,
) -> Result<Vec<T>, CoordinatorError>
where
    T: serde::de::DeserializeOwned,
    F: FnMut(&T) -> bool,
{
    use futures_util::TryStreamExt;
    let read = |e| CoordinatorError::destination("read pgzm metadata", e);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &key];
    let rows = client
        .query_raw(
            "SELECT e.value FROM pgzm.migrations m
             CROSS JOIN LATERAL jsonb_array_elements(CASE jsonb_typeof(m.plan -> $2::text)
                                                     WHEN 'array' THEN m.plan -> $2::text END)
                        WITH ORDINALITY AS e(value, n)
             WHERE m.id = $1 ORDER BY e.n",
            params,
        )
        .await
        .map_err(read)?;
    futures_util::pin_mut!(rows);
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await.map_err(read)? {
        let element = row
            .try_get::<_, tokio_postgres::types::Json<T>>(0)
            .map_err(|e| unreadable_plan(id, e))?
            .0;
        if keep(&element) {
            out.push(element);
        }
    }
    Ok(out)
}

/// Sync errors recorded for a migration: (table, operation, message, at).
pub async fn sync_errors(
    client: &Client,
    id: i64,
) -> Result<Vec<(String, String, String, String)>, CoordinatorError> {
    let rows = client
        .query(
            "SELECT table_name, operation, message, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at FROM pgzm.sync_errors WHERE migration_id = $1 ORDER BY at",
            &[&id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm.sync_errors", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get("table_name"),
                r.get("operation"),
                r.get("message"),
                r.get("at"),
            )
        })
        .collect())
}

/// What a rollback moves aside, in the order the objects are dropped after its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AsideKind {
    /// One of the migration's materialized views (they read its tables: dropped first).
    MaterializedView,
    /// One of the migration's tables, or the backup of a `--keep-tables` table (its indexes
    /// and owned sequences go with it).
    Table,
    /// One of the migration's sequences that no table of it owns.
    Sequence,
    /// One of the migration's types.
    Type,
    /// A schema the migration created: dropped last, when it is empty.
    Schema,
}

impl AsideKind {
    /// Every kind, in drop order.
    pub const ALL: [AsideKind; 5] = [
        AsideKind::MaterializedView,
        AsideKind::Table,
        AsideKind::Sequence,
        AsideKind::Type,
        AsideKind::Schema,
    ];

    /// As stored in `pgzm.rolled_back_objects.kind` (and shown in reports).
    pub fn as_str(self) -> &'static str {
        match self {
            AsideKind::MaterializedView => "materialized view",
            AsideKind::Table => "table",
            AsideKind::Sequence => "sequence",
            AsideKind::Type => "type",
            AsideKind::Schema => "schema",
        }
    }

    /// The kind stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<AsideKind> {
        AsideKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One object a rollback moved aside to drop it after its commit, as `pgzm.rolled_back_objects`
/// records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBackObject {
    /// The migration rolled back.
    pub migration_id: i64,
    /// What it is.
    pub kind: AsideKind,
    /// Its schema (a schema's own name for [`AsideKind::Schema`]).
    pub schema: String,
    /// The name it was moved aside to.
    pub name: String,
    /// The name it had.
    pub live: String,
    /// Its oid (0 for a schema).
    pub oid: Oid,
}

impl RolledBackObject {
    /// Its name now.
    pub fn qualname(&self) -> QualName {
        QualName::new(self.schema.clone(), self.name.clone())
    }

    /// For reports: `table rolledback_…_film` (`table sales.rolledback_…_order` outside public).
    pub fn describe(&self) -> String {
        match self.kind {
            AsideKind::Schema => format!("schema {} (if empty)", self.schema),
            kind => format!("{} {}", kind.as_str(), self.qualname().display_name()),
        }
    }

    /// Its key in `pgzm.rolled_back_objects`, as a row of a `VALUES` list.
    fn key_sql(&self) -> String {
        use pgzm_pg::sql::quote_literal;
        format!(
            "({}, {}, {})",
            quote_literal(self.kind.as_str()),
            quote_literal(&self.schema),
            quote_literal(&self.name)
        )
    }
}

/// The statement recording what a rollback moves aside (part of its transaction, before its
/// locks: it writes only pgzm's own table); None when there is nothing.
pub fn record_rolled_back_sql(objects: &[RolledBackObject]) -> Option<String> {
    use pgzm_pg::sql::quote_literal;
    if objects.is_empty() {
        return None;
    }
    Some(format!(
        "INSERT INTO pgzm.rolled_back_objects (migration_id, kind, schema_name, name, live_name, object_oid) VALUES {}",
        objects
            .iter()
            .map(|o| format!(
                "({}, {}, {}, {}, {}, {}::oid)",
                o.migration_id,
                quote_literal(o.kind.as_str()),
                quote_literal(&o.schema),
                quote_literal(&o.name),
                quote_literal(&o.live),
                o.oid
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The statement forgetting `objects` of migration `id` (in the transaction that drops them).
fn forget_sql(id: i64, objects: &[&RolledBackObject]) -> String {
    format!(
        "DELETE FROM pgzm.rolled_back_objects WHERE migration_id = {id} AND (kind, schema_name, name) IN (VALUES {})",
        objects
            .iter()
            .map(|o| o.key_sql())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What rollbacks moved aside and did not drop yet (of migration `id`, or all), in drop order;
/// nothing when the table does not exist (metadata of an older pgzm, or none).
pub async fn rolled_back_objects(
    client: &impl GenericClient,
    id: Option<i64>,
) -> Result<Vec<RolledBackObject>, CoordinatorError> {
    let present: bool = client
        .query_one(
            "SELECT to_regclass('pgzm.rolled_back_objects') IS NOT NULL AS present",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .get("present");
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT migration_id, kind, schema_name, name, live_name, object_oid
             FROM pgzm.rolled_back_objects WHERE $1::int8 IS NULL OR migration_id = $1
             ORDER BY migration_id, schema_name, name",
            &[&id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm.rolled_back_objects", e))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let kind: String = r.get("kind");
        let id: i64 = r.get("migration_id");
        let kind = AsideKind::parse(&kind).ok_or_else(|| CoordinatorError::Metadata {
            what: format!("read what the rollback of migration {id} left to drop"),
            message: format!(
                "kind {kind:?} is unknown; it was written by another pgzm version (see pgzm.rolled_back_objects)"
            ),
        })?;
        out.push(RolledBackObject {
            migration_id: id,
            kind,
            schema: r.get("schema_name"),
            name: r.get("name"),
            live: r.get("live_name"),
            oid: r.get("object_oid"),
        });
    }
    out.sort_by_key(|o| o.kind);
    out.sort_by_key(|o| o.migration_id);
    Ok(out)
}

/// Rolled-back objects as a run's recorded objects (what the plan counts as going first).
fn as_recorded<'a>(objects: impl Iterator<Item = &'a RolledBackObject>) -> RecordedObjects {
    let mut r = RecordedObjects::default();
    for o in objects {
        match o.kind {
            AsideKind::MaterializedView => {
                r.matviews.push((o.schema.clone(), o.name.clone(), o.oid))
            }
            AsideKind::Table => r.tables.push((o.name.clone(), o.oid)),
            AsideKind::Sequence => r.sequences.push((o.name.clone(), o.oid)),
            AsideKind::Type => r.types.push((o.name.clone(), o.oid)),
            AsideKind::Schema => r.schemas.push(o.schema.clone()),
        }
    }
    r
}

/// What [`drop_rolled_back`] dropped, and what it could not.
#[derive(Debug, Clone, Default)]
pub struct AsideDrops {
    /// Objects dropped (or, for a type or sequence still in use, kept and renamed).
    pub dropped: Vec<String>,
    /// What is left and why.
    pub warnings: Vec<String>,
}

/// Most tables dropped in one transaction after a rollback: few enough locks for any server,
/// and no transaction long enough to matter (a batch locks only tables production no longer
/// uses, but its commit still sends every dropped relation's invalidations at once).
pub const TABLES_PER_BATCH: usize = 200;

/// Drops what rollbacks moved aside (of migration `id`, or all that is left), each object
/// only while its oid and name are still the recorded ones: materialized views, then tables in
/// batches of up to [`TABLES_PER_BATCH`] (fewer on a server with a small lock table; an
/// inheritance tree in one batch; foreign keys from a later batch's tables dropped first), then
/// sequences and types — one still in use (by a kept table) is not dropped but renamed
/// `rolledback_<name>` — and last the schemas the migration created, if empty. Each transaction
/// runs with the lock strategy of `locks` (never ending other sessions) and forgets what it
/// dropped; what fails is left recorded for the next `pgzm rollback`, `cleanup` or `prepare`, and
/// reported.
pub async fn drop_rolled_back(
    client: &Client,
    id: Option<i64>,
    locks: crate::locked::SwapSettings,
) -> Result<AsideDrops, CoordinatorError> {
    let all = rolled_back_objects(client, id).await?;
    let mut out = AsideDrops::default();
    if all.is_empty() {
        return Ok(out);
    }
    let locks = crate::locked::SwapSettings {
        kill_blockers_after: None,
        ..locks
    };
    let budget = crate::locked::LockBudget::read(client).await?;
    // About ten locks per table (indexes, TOAST, sequences, row types), a quarter of the table.
    let batch = usize::try_from(budget.capacity() / 40)
        .unwrap_or(TABLES_PER_BATCH)
        .clamp(10, TABLES_PER_BATCH);
    let ids: std::collections::BTreeSet<i64> = all.iter().map(|o| o.migration_id).collect();
    for mid in ids {
        let objects: Vec<&RolledBackObject> =
            all.iter().filter(|o| o.migration_id == mid).collect();
        drop_aside_of(client, mid, &objects, locks, batch, &mut out).await?;
    }
    Ok(out)
}

/// Which of `objects` still exist as recorded (same oid, same name, same schema).
async fn aside_present(
    client: &Client,
    objects: &[&RolledBackObject],
) -> Result<std::collections::BTreeSet<(AsideKind, Oid)>, CoordinatorError> {
    let kinds: Vec<&str> = objects.iter().map(|o| o.kind.as_str()).collect();
    let schemas: Vec<&str> = objects.iter().map(|o| o.schema.as_str()).collect();
    let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
    let oids: Vec<Oid> = objects.iter().map(|o| o.oid).collect();
    let rows = client
        .query(
            "SELECT x.k AS kind, x.o AS oid FROM unnest($1::text[], $2::text[], $3::text[], $4::oid[]) AS x(k, s, n, o)
             WHERE CASE x.k
                 WHEN 'schema' THEN false
                 WHEN 'type' THEN EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace ns ON ns.oid = t.typnamespace
                                          WHERE t.oid = x.o AND t.typname = x.n AND ns.nspname = x.s)
                 ELSE EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace ns ON ns.oid = c.relnamespace
                              WHERE c.oid = x.o AND c.relname = x.n AND ns.nspname = x.s) END",
            &[&kinds, &schemas, &names, &oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up what a rollback moved aside", e))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            AsideKind::parse(r.get::<_, &str>("kind")).map(|k| (k, r.get::<_, Oid>("oid")))
        })
        .collect())
}

/// Runs `tx` (dropping `what`, of the rollback of migration `id`); a failure becomes a warning.
async fn run_drop(
    client: &Client,
    tx: &LockedTransaction,
    locks: crate::locked::SwapSettings,
    id: i64,
    what: &str,
    out: &mut AsideDrops,
) -> Result<(), CoordinatorError> {
    tx.run(
        client,
        locks,
        &format!("drop {what} the rollback of migration {id} moved aside"),
        &format!("drop {what} the rollback of migration {id} moved aside"),
    )
    .await
    .map(|_| ())
    .inspect_err(|e| {
        out.warnings.push(format!(
            "{what} the rollback of migration {id} moved aside could not be dropped yet ({e}); they are recorded in pgzm.rolled_back_objects: `pgzm cleanup` drops them"
        ));
    })
}

/// [`drop_rolled_back`] for the objects of one migration.
async fn drop_aside_of(
    client: &Client,
    id: i64,
    objects: &[&RolledBackObject],
    locks: crate::locked::SwapSettings,
    batch: usize,
    out: &mut AsideDrops,
) -> Result<(), CoordinatorError> {
    use pgzm_pg::sql::quote_ident;
    let present = aside_present(client, objects).await?;
    let exists = |o: &&RolledBackObject| present.contains(&(o.kind, o.oid));
    // Recorded objects that are gone already (or are not the recorded ones any more).
    let gone: Vec<&RolledBackObject> = objects
        .iter()
        .filter(|o| o.kind != AsideKind::Schema && !exists(o))
        .copied()
        .collect();
    if !gone.is_empty() {
        client
            .batch_execute(&forget_sql(id, &gone))
            .await
            .map_err(|e| CoordinatorError::destination("update pgzm.rolled_back_objects", e))?;
    }
    let of_kind = |kind: AsideKind| -> Vec<&RolledBackObject> {
        objects
            .iter()
            .filter(|o| o.kind == kind && exists(o))
            .copied()
            .collect()
    };
    let mut left = 0usize;

    // Materialized views: one statement (they may read each other).
    let matviews = of_kind(AsideKind::MaterializedView);
    if !matviews.is_empty() {
        let mut tx = LockedTransaction::new();
        tx.push(format!(
            "DROP MATERIALIZED VIEW {}",
            matviews
                .iter()
                .map(|o| o.qualname().quoted())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        tx.push(forget_sql(id, &matviews));
        match run_drop(client, &tx, locks, id, "materialized views", out).await {
            Ok(()) => out.dropped.extend(matviews.iter().map(|o| o.describe())),
            Err(_) => left += matviews.len(),
        }
    }

    // Tables, in batches.
    let tables = of_kind(AsideKind::Table);
    if !tables.is_empty() {
        left += drop_aside_tables(client, id, &tables, locks, batch, out).await?;
    }

    // Sequences and types: dropped, or renamed when still in use — once the tables are gone
    // (a table left would make its types look in use by something that stays).
    let sequences = of_kind(AsideKind::Sequence);
    let types = of_kind(AsideKind::Type);
    if left > 0 {
        left += sequences.len() + types.len();
    } else if !sequences.is_empty() || !types.is_empty() {
        let used = still_used(client, &sequences, &types).await?;
        let mut tx = LockedTransaction::new();
        let mut done = Vec::new();
        for (objs, keyword) in [(&sequences, "SEQUENCE"), (&types, "TYPE")] {
            let (kept, dropping): (Vec<&RolledBackObject>, Vec<&RolledBackObject>) =
                objs.iter().partition(|o| used.contains(&o.oid));
            if !dropping.is_empty() {
                tx.push(format!(
                    "DROP {keyword} {}",
                    dropping
                        .iter()
                        .map(|o| o.qualname().quoted())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                done.extend(dropping.iter().map(|o| o.describe()));
            }
            for o in kept {
                let permanent = crate::naming::prefixed(crate::rollback::ROLLEDBACK, &o.live);
                if name_taken(client, &o.schema, &permanent).await? {
                    done.push(format!(
                        "{} kept, still in use (the name {permanent} is taken)",
                        o.describe()
                    ));
                } else {
                    tx.push(format!(
                        "ALTER {keyword} {} RENAME TO {}",
                        o.qualname().quoted(),
                        quote_ident(&permanent)
                    ));
                    done.push(format!(
                        "{} kept, still in use: renamed to {permanent}",
                        o.describe()
                    ));
                }
            }
        }
        let all: Vec<&RolledBackObject> = sequences.iter().chain(&types).copied().collect();
        tx.push(forget_sql(id, &all));
        match run_drop(client, &tx, locks, id, "sequences and types", out).await {
            Ok(()) => out.dropped.extend(done),
            Err(_) => left += all.len(),
        }
    }

    // Schemas the migration created, once nothing else of it is left.
    let schemas: Vec<&RolledBackObject> = objects
        .iter()
        .filter(|o| o.kind == AsideKind::Schema)
        .copied()
        .collect();
    if !schemas.is_empty() && left == 0 {
        let mut tx = LockedTransaction::new();
        tx.extend(schemas.iter().map(|o| drop_schema_if_empty(&o.schema)));
        tx.push(forget_sql(id, &schemas));
        if run_drop(client, &tx, locks, id, "schemas", out)
            .await
            .is_ok()
        {
            out.dropped.extend(schemas.iter().map(|o| o.describe()));
        }
    }
    Ok(())
}

/// Whether `name` is taken in `schema` by a relation or a type.
async fn name_taken(client: &Client, schema: &str, name: &str) -> Result<bool, CoordinatorError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                            WHERE n.nspname = $1 AND c.relname = $2)
                 OR EXISTS (SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                            WHERE n.nspname = $1 AND t.typname = $2) AS taken",
            &[&schema, &name],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up a name", e))?
        .get("taken"))
}

/// Oids of the sequences and types something else still uses (a column, a default, a domain,
/// a function): a type used only by others of `types` is not in use, unless they are.
async fn still_used(
    client: &Client,
    sequences: &[&RolledBackObject],
    types: &[&RolledBackObject],
) -> Result<std::collections::BTreeSet<Oid>, CoordinatorError> {
    let seq_oids: Vec<Oid> = sequences.iter().map(|o| o.oid).collect();
    let type_oids: Vec<Oid> = types.iter().map(|o| o.oid).collect();
    let mut used: std::collections::BTreeSet<Oid> = client
        .query(
            "SELECT s.o AS oid FROM unnest($1::oid[]) s(o)
             WHERE EXISTS (SELECT 1 FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass
                             AND d.refobjid = s.o AND d.deptype = 'n')",
            &[&seq_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up what uses a sequence", e))?
        .iter()
        .map(|r| r.get("oid"))
        .collect();
    let edges: Vec<(Oid, Option<Oid>)> = client
        .query(
            "SELECT t.oid AS type_oid,
                    CASE WHEN d.classid = 'pg_type'::regclass THEN d.objid
                         WHEN d.classid = 'pg_class'::regclass
                         THEN (SELECT c.reltype FROM pg_class c WHERE c.oid = d.objid AND c.relkind = 'c')
                    END AS dependent_type
             FROM pg_type t JOIN pg_depend d ON d.refclassid = 'pg_type'::regclass
                  AND d.refobjid IN (t.oid, t.typarray) AND d.deptype = 'n'
             WHERE t.oid = ANY($1)",
            &[&type_oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up what uses a type", e))?
        .iter()
        .map(|r| (r.get("type_oid"), r.get("dependent_type")))
        .collect();
    // In use: a dependent outside the set; then, to a fixpoint, a dependent in the set that is.
    for (t, dependent) in &edges {
        if dependent.is_none_or(|d| !type_oids.contains(&d)) {
            used.insert(*t);
        }
    }
    loop {
        let before = used.len();
        for (t, dependent) in &edges {
            if dependent.is_some_and(|d| used.contains(&d)) {
                used.insert(*t);
            }
        }
        if used.len() == before {
            return Ok(used);
        }
    }
}

/// Drops the aside `tables` of the rollback of migration `id` in batches of about `batch`;
/// returns how many are left.
async fn drop_aside_tables(
    client: &Client,
    id: i64,
    tables: &[&RolledBackObject],
    locks: crate::locked::SwapSettings,
    batch: usize,
    out: &mut AsideDrops,
) -> Result<usize, CoordinatorError> {
    use pgzm_pg::sql::quote_ident;
    let oids: Vec<Oid> = tables.iter().map(|t| t.oid).collect();
    let by_oid: BTreeMap<Oid, &RolledBackObject> = tables.iter().map(|t| (t.oid, *t)).collect();
    // Inheritance trees (partitions included) stay in one batch: a parent goes with its
    // children.
    let parent_of: BTreeMap<Oid, Oid> = client
        .query(
            "SELECT inhrelid, inhparent FROM pg_inherits WHERE inhrelid = ANY($1) AND inhparent = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up inheritance", e))?
        .iter()
        .map(|r| (r.get("inhrelid"), r.get("inhparent")))
        .collect();
    let root = |mut oid: Oid| {
        for _ in 0..=parent_of.len() {
            match parent_of.get(&oid) {
                Some(p) => oid = *p,
                None => break,
            }
        }
        oid
    };
    let mut trees: Vec<(Oid, Vec<Oid>)> = Vec::new();
    for t in tables {
        let r = root(t.oid);
        match trees.iter_mut().find(|(top, _)| *top == r) {
            Some((_, members)) => members.push(t.oid),
            None => trees.push((r, vec![t.oid])),
        }
    }
    let mut batches: Vec<Vec<Oid>> = Vec::new();
    for (_, members) in trees {
        match batches.last_mut() {
            Some(b) if b.len() + members.len() <= batch => b.extend(members),
            _ => batches.push(members),
        }
    }
    // Foreign keys between them: one from a table of a later batch into one of this batch is
    // dropped first (DROP TABLE drops the keys of the tables it drops).
    let fks: Vec<(Oid, Oid, String)> = client
        .query(
            "SELECT conrelid, confrelid, conname::text AS name FROM pg_constraint
             WHERE contype = 'f' AND conparentid = 0 AND conrelid <> confrelid
               AND conrelid = ANY($1) AND confrelid = ANY($1)",
            &[&oids],
        )
        .await
        .map_err(|e| CoordinatorError::destination("look up foreign keys", e))?
        .iter()
        .map(|r| (r.get("conrelid"), r.get("confrelid"), r.get("name")))
        .collect();
    let statements = |members: &[Oid], dropped: &std::collections::BTreeSet<Oid>| {
        let mut tx = LockedTransaction::new();
        let inside: std::collections::BTreeSet<Oid> = members.iter().copied().collect();
        for (from, to, name) in &fks {
            if inside.contains(to) && !inside.contains(from) && !dropped.contains(from) {
                let referencing = by_oid[from].qualname();
                tx.locks(referencing.quoted());
                tx.push(format!(
                    "ALTER TABLE {referencing} DROP CONSTRAINT {}",
                    quote_ident(name)
                ));
            }
        }
        let objs: Vec<&RolledBackObject> = members.iter().map(|o| by_oid[o]).collect();
        for o in &objs {
            tx.locks(o.qualname().quoted());
        }
        tx.push(format!(
            "DROP TABLE {}",
            objs.iter()
                .map(|o| o.qualname().quoted())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        tx.push(forget_sql(id, &objs));
        (tx, objs)
    };
    let mut dropped: std::collections::BTreeSet<Oid> = std::collections::BTreeSet::new();
    let mut retry: Vec<Oid> = Vec::new();
    let mut failures = Vec::new();
    for members in &batches {
        let (tx, objs) = statements(members, &dropped);
        let sql = tx.statements(locks.lock_timeout).join(";\n");
        match run_with_lock_retry_simple(client, &tx, locks, id).await {
            Ok(()) => {
                dropped.extend(members.iter().copied());
                out.dropped.extend(objs.iter().map(|o| o.describe()));
            }
            // Something depends on one of them (the next pass drops them one by one, after
            // the others), or their locks were not granted in time (left for later).
            Err(e) if !e.is_lock_timeout() => {
                tracing::debug!(migration = id, error = %e, statements = %sql, "a batch of tables moved aside could not be dropped at once");
                retry.extend(members.iter().copied());
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    for oid in retry {
        let (tx, objs) = statements(&[oid], &dropped);
        match run_with_lock_retry_simple(client, &tx, locks, id).await {
            Ok(()) => {
                dropped.insert(oid);
                out.dropped.extend(objs.iter().map(|o| o.describe()));
            }
            Err(e) => failures.push(format!("{}: {e}", by_oid[&oid].describe())),
        }
    }
    let left = tables.len() - dropped.len();
    if left > 0 {
        out.warnings.push(format!(
            "{left} table(s) the rollback of migration {id} moved aside could not be dropped yet ({}); they are recorded in pgzm.rolled_back_objects: `pgzm cleanup` drops them",
            failures.join("; ")
        ));
    }
    Ok(left)
}

/// Runs one drop transaction of the rollback of migration `id` with the lock strategy.
async fn run_with_lock_retry_simple(
    client: &Client,
    tx: &LockedTransaction,
    locks: crate::locked::SwapSettings,
    id: i64,
) -> Result<(), CoordinatorError> {
    let action = format!("drop tables the rollback of migration {id} moved aside");
    tx.run(client, locks, &action, &action).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded plan's text reaches `COPY` with what would end its field or its row escaped
    /// (names may hold any of them: the hostile-name tests send such plans through a real
    /// server).
    #[test]
    fn copy_text_escapes_what_ends_a_field_or_a_row() {
        use std::io::Write as _;
        let mut text = CopyText(b"1\t".to_vec());
        text.write_all(b"a\\b\tc\nd\re\\N").unwrap();
        assert_eq!(text.0, b"1\ta\\\\b\\tc\\nd\\re\\\\N".to_vec());
    }

    /// Up to 200 tables: one group in the list's order (the goldens of small schemas unchanged).
    /// Beyond: groups of at most 200, each table after (or with) what must go before it, a cycle
    /// together in the last group, every table exactly once.
    #[test]
    fn drop_groups_keep_what_must_go_first_in_an_earlier_or_the_same_group() {
        let t = |i: usize| QualName::new("public", format!("backup_t_{i:04}"));
        let small: Vec<QualName> = (0..150).map(t).collect();
        assert_eq!(
            drop_groups(&small, &[(t(3), t(1))]),
            vec![small.clone()],
            "small sets stay one statement"
        );
        let tables: Vec<QualName> = (0..1000).map(t).collect();
        // Three of every four reference the first of their group of four (as the bench's schema);
        // the last tables reference the first ones (across groups); 10 inherits from 990;
        // 500 ↔ 501 form a cycle.
        let mut before: Vec<(QualName, QualName)> = Vec::new();
        for i in 0..1000 {
            if i % 4 != 0 {
                before.push((t(i), t(i - i % 4)));
            }
        }
        for i in 900..1000 {
            before.push((t(i), t(i - 900)));
        }
        before.push((t(10), t(990)));
        before.push((t(500), t(501)));
        before.push((t(501), t(500)));
        let groups = drop_groups(&tables, &before);
        assert!(groups[..groups.len() - 1]
            .iter()
            .all(|g| g.len() <= TABLES_PER_BATCH));
        let group_of: std::collections::HashMap<&QualName, usize> = groups
            .iter()
            .enumerate()
            .flat_map(|(i, g)| g.iter().map(move |n| (n, i)))
            .collect();
        assert_eq!(group_of.len(), 1000, "every table once");
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 1000);
        for (a, b) in &before {
            assert!(group_of[a] <= group_of[b], "{a:?} must go before {b:?}");
        }
        // The cycle is the last group (with what waits on it).
        let last = groups.last().unwrap();
        assert!(last.contains(&t(500)) && last.contains(&t(501)));
    }
}
