//! `--resume`: continuing a run whose process was killed while it prepared.
//!
//! What the interrupted run finished is known from the destination alone: each table whose
//! copy and build committed has a `built:<table>` row in `pgzm.copy_progress` (written in the
//! build's last transaction), a preserved table whose sync was set up has its trigger function
//! recorded with the run's objects, and its materialized views are recorded when built.
//!
//! The definitions are proven unchanged by [`definition_digest`], and each kept table's rows
//! by its [`crate::plan::SourceEvidence`] (file node and cumulative row changes) and, because
//! the statistics lag (a backend reports its counts when it goes idle, up to a second or more
//! later), by reading it once in the new snapshot: no row version that the interrupted run's
//! snapshot did not see (by its xmin), and as many rows as were copied. That read is a sequential scan on the source, without any transfer. A resumed run keeps
//! what is finished and unchanged, copies again what is not, and builds again (rows kept) what
//! a partition copied again forces to: a partitioned table's keys and indexes include its
//! partitions', so a tree with a built partitioned table and one partition to redo is built
//! again whole. Materialized views are always built again (they are computed from the rows).

use std::collections::{BTreeMap, BTreeSet};

use pgzm_pg::sql::quote_literal;
use tokio_postgres::Client;

use crate::build;
use crate::catalog::SourceSchema;
use crate::conninfo::DbUrl;
use crate::destination::Destination;
use crate::error::CoordinatorError;
use crate::naming::QualName;
use crate::plan::Plan;
use crate::report::{RedoneTable, Resumed};
use crate::rewrite::Renames;
use crate::state::{self, RecordedObjects};

/// The interrupted run `--resume` continues.
pub(crate) struct Interrupted {
    pub id: i64,
    pub plan: Plan,
    pub objects: RecordedObjects,
}

/// The newest run that was interrupted while preparing (its process killed: a run that failed
/// or was stopped with Ctrl-C was cleaned up), or why there is none.
pub(crate) async fn interrupted_run(control: &Client) -> Result<Interrupted, CoordinatorError> {
    let none = || {
        CoordinatorError::Refused(vec![
            "nothing to resume: this destination has no interrupted run (a run that failed, or was stopped with Ctrl-C, was cleaned up): run without --resume".into(),
        ])
    };
    if !state::exists(control).await? {
        return Err(none());
    }
    let id: Option<i64> = control
        .query_opt(
            "SELECT id FROM pgzm.migrations WHERE status = 'preparing' AND shadow_present ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .map(|r| r.get("id"));
    let row = match id {
        Some(id) => state::load(control, Some(id)).await?.ok_or_else(none)?,
        None => return Err(none()),
    };
    let shadow_incomplete: bool = control
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pgzm.copy_progress WHERE migration_id = $1 AND task_key = $2)",
            &[&row.id, &crate::prepare::SHADOW_INCOMPLETE],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .get(0);
    if shadow_incomplete {
        return Err(CoordinatorError::Refused(vec![format!(
            "nothing to resume: run {} was interrupted while it created its shadow tables, before any copy: run without --resume (what it created is removed first)",
            row.id
        )]));
    }
    Ok(Interrupted {
        id: row.id,
        plan: row.plan,
        objects: row.objects,
    })
}

/// A digest (FNV-1a, 64 bits) of every statement that builds the shadow set but the sequence
/// positions (data, not definitions), of the preserved tables' sync and of the materialized
/// views: two reads of unchanged definitions (and options) give the same.
pub(crate) fn definition_digest(
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    renames: &Renames,
) -> Result<String, CoordinatorError> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |text: &str| {
        for b in text.bytes().chain([0u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (action, sql) in crate::shadow::objects(plan, schema, dest, renames).flatten() {
        if !action.starts_with("set shadow sequence") {
            feed(&sql);
        }
    }
    for t in schema
        .tables
        .iter()
        .filter(|t| plan.table(&t.qualname()).is_some())
    {
        for sql in build::table_build(t, plan, schema, renames)?.sequential() {
            feed(&sql);
        }
    }
    for sql in build::foreign_key_statements(plan, schema, renames).0 {
        feed(&sql);
    }
    for p in &plan.preserved {
        for sql in p.setup_sql(plan.migration_id) {
            feed(&sql);
        }
    }
    for mv in &plan.matviews {
        for sql in crate::matview::build_sql(mv, plan, renames)? {
            feed(&sql);
        }
    }
    Ok(format!("{h:016x}"))
}

/// Whether `plan` (read now) can continue the interrupted run: the same definitions.
pub(crate) fn resumable(run: &Interrupted, plan: &Plan) -> Result<(), CoordinatorError> {
    let id = run.id;
    let refuse = |why: String| Err(CoordinatorError::Refused(vec![why]));
    if run.plan.definition_digest.is_none() {
        return refuse(format!(
            "migration {id} was recorded by an earlier pgzm, which could not be resumed: run without --resume (the next run removes its shadow objects and starts over)"
        ));
    }
    if run.plan.definition_digest != plan.definition_digest {
        return refuse(format!(
            "the source's definitions, the preserved tables or the destination's privileges changed since migration {id} was interrupted: its shadow tables no longer fit; run without --resume to start over"
        ));
    }
    Ok(())
}

/// The `pgzm.copy_progress` row saying that the table whose tasks are keyed `key` is copied
/// (if it has rows to copy) and built.
pub(crate) fn built_marker(migration_id: i64, key: &str) -> String {
    format!(
        "INSERT INTO pgzm.copy_progress (migration_id, task_key, rows, bytes) VALUES ({migration_id}, {}, 0, 0) ON CONFLICT DO NOTHING",
        quote_literal(&format!("built:{key}"))
    )
}

/// What a resumed run does with one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Kept as the interrupted run left it.
    Kept,
    /// Emptied and copied again (a preserved table: synced again), for this reason.
    Copy(&'static str),
    /// Its rows kept (or it has none), its keys, indexes and triggers built again.
    Build(&'static str),
}

/// What the interrupted run left, as read from the destination.
struct Left<'a> {
    /// The run's recorded plan.
    before: &'a Plan,
    /// Its recorded objects.
    objects: &'a RecordedObjects,
    /// Keys (quoted qualified names) of the tables whose build committed.
    built: &'a BTreeSet<String>,
    /// Preserved tables (display names) a write to which could not be mirrored.
    sync_errors: &'a BTreeSet<String>,
    /// Tables whose source rows are not those the interrupted run copied (read in the new
    /// snapshot).
    changed: &'a BTreeSet<QualName>,
}

/// Whether the statistics say the source table has not changed since the interrupted run.
fn same_evidence(t: &crate::plan::TablePlan, before: &Plan) -> bool {
    let before = before.table(&t.qualname()).and_then(|o| o.evidence);
    matches!((before, t.evidence), (Some(a), Some(b)) if a == b && a.changes >= 0)
}

/// Each planned table's fate, in the plan's order.
fn decide(plan: &Plan, schema: &SourceSchema, left: &Left) -> Vec<(QualName, Fate)> {
    const UNFINISHED: &str = "its copy or build had not finished";
    let mut fates: Vec<(QualName, Fate)> = plan
        .tables
        .iter()
        .map(|t| {
            let name = t.qualname();
            let built = left.built.contains(&name.quoted());
            let fate = if let Some(p) = plan.preserved.iter().find(|p| p.qualname() == name) {
                if !left.objects.sync_functions.contains(&p.function) {
                    Fate::Copy("its sync with the live table had not been set up")
                } else if left.sync_errors.contains(&name.display_name()) {
                    Fate::Copy("a write to it could not be mirrored into its shadow")
                } else {
                    Fate::Kept
                }
            } else if t.partitioned {
                // Decided with its partitions below.
                if built {
                    Fate::Kept
                } else {
                    Fate::Build("its build had not finished")
                }
            } else if !t.copy_data {
                if built {
                    Fate::Kept
                } else {
                    Fate::Build("its build had not finished")
                }
            } else {
                let unchanged = same_evidence(t, left.before) && !left.changed.contains(&name);
                match (built, unchanged) {
                    (true, true) => Fate::Kept,
                    (true, false) => Fate::Copy("changed in the source since the interrupted run"),
                    (false, _) => Fate::Copy(UNFINISHED),
                }
            };
            (name, fate)
        })
        .collect();
    // A partition tree whose partitioned tables were (partly) built, with a partition to copy or
    // build again: the built partitioned tables' keys and indexes include that partition's, so
    // the whole tree is built again (its partitions' rows kept unless they are copied again).
    let root = |name: &QualName| {
        let mut root = name.clone();
        for _ in 0..64 {
            match schema.table(&root).and_then(|t| t.partition_of.as_ref()) {
                Some((parent, _)) if plan.table(parent).is_some() => root = parent.clone(),
                _ => break,
            }
        }
        root
    };
    let mut trees: BTreeMap<QualName, (bool, bool)> = BTreeMap::new();
    for (name, fate) in &fates {
        let Some(t) = plan.table(name) else { continue };
        let r = root(name);
        if r == *name && !t.partitioned {
            continue;
        }
        let entry = trees.entry(r).or_default();
        if t.partitioned {
            entry.0 |= left.built.contains(&name.quoted());
        } else {
            entry.1 |= *fate != Fate::Kept;
        }
    }
    for (name, fate) in &mut fates {
        let Some(t) = plan.table(name) else { continue };
        if !matches!(trees.get(&root(name)), Some((true, true))) {
            continue;
        }
        if t.partitioned {
            *fate = Fate::Build("a partition of it is copied or built again");
        } else if *fate == Fate::Kept {
            *fate = Fate::Build("its partitioned table is built again");
        }
    }
    fates
}

/// Prepares the interrupted run's shadow set to continue. In one transaction: every foreign
/// key between shadow tables goes (the constraints phase adds them all again); each table not
/// kept loses its keys, indexes and triggers, and its rows too if they are copied again (with
/// its records); a preserved table synced again loses its sync; the materialized views go; the
/// run's recorded plan becomes the new one. Returns what is kept and redone, and the run's
/// objects now.
pub(crate) async fn reset(
    control: &mut Client,
    plan: &Plan,
    schema: &SourceSchema,
    dest: &Destination,
    run: &Interrupted,
    source: &SourceSnapshot<'_>,
) -> Result<(Resumed, RecordedObjects), CoordinatorError> {
    let err =
        |what: &'static str| move |e: tokio_postgres::Error| CoordinatorError::destination(what, e);
    // The interrupted run's sessions may still be working: an agent's copy, or a build whose
    // statement runs on after its client died (and would commit an index under the reset).
    // This run holds the run lock, so every other build session is the interrupted run's.
    let tag = crate::copy::session_tag_pattern(run.id);
    for _ in 0..200 {
        let _ = crate::copy::end_sessions(control, &tag).await;
        let _ = crate::copy::end_sessions(control, "pgzm-build").await;
        let left: i64 = control
            .query_one(
                "SELECT count(*) AS left_over FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND (application_name = 'pgzm-build' OR application_name LIKE $1)",
                &[&tag],
            )
            .await
            .map_err(err("look for the interrupted run's sessions"))?
            .get("left_over");
        if left == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let rows = control
        .query(
            "SELECT 'built' AS kind, substr(task_key, 7) AS name FROM pgzm.copy_progress
              WHERE migration_id = $1 AND left(task_key, 6) = 'built:'
             UNION ALL
             SELECT DISTINCT 'sync_error', table_name FROM pgzm.sync_errors WHERE migration_id = $1",
            &[&run.id],
        )
        .await
        .map_err(err("read the interrupted run's records"))?;
    let of_kind = |kind: &str| -> BTreeSet<String> {
        rows.iter()
            .filter(|r| r.get::<_, &str>("kind") == kind)
            .map(|r| r.get("name"))
            .collect()
    };
    let (built, sync_errors) = (of_kind("built"), of_kind("sync_error"));
    // The tables that would be kept: read in the new snapshot to prove them unchanged.
    let candidates: Vec<QualName> = plan
        .tables
        .iter()
        .filter(|t| {
            t.copy_data
                && !t.partitioned
                && !plan.is_preserved(&t.qualname())
                && built.contains(&t.qualname().quoted())
                && same_evidence(t, &run.plan)
        })
        .map(|t| t.qualname())
        .collect();
    let changed = match &run.plan.source_snapshot {
        Some(before) => {
            let copied = copied_rows(control, run.id, &candidates).await?;
            source.changed(before, &candidates, &copied).await?
        }
        // No record of the snapshot: nothing can be proven unchanged.
        None => candidates.into_iter().collect(),
    };
    let fates = decide(
        plan,
        schema,
        &Left {
            before: &run.plan,
            objects: &run.objects,
            built: &built,
            sync_errors: &sync_errors,
            changed: &changed,
        },
    );

    let mut resumed = Resumed::default();
    // Shadow names of every table, of those reset (keys, indexes and triggers dropped) and of
    // those emptied; task keys of the tables whose records go, all or only the build's.
    let (mut all, mut strip, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    let (mut forget_all, mut forget_built) = (Vec::new(), Vec::new());
    let mut objects = run.objects.clone();
    let mut unsync: Vec<String> = Vec::new();
    for (name, fate) in &fates {
        let Some(t) = plan.table(name) else { continue };
        let shadow = t.shadow_name().quoted();
        all.push(shadow.clone());
        let entry = |reason: &str| RedoneTable {
            table: name.display_name(),
            reason: reason.into(),
        };
        match fate {
            Fate::Kept => resumed.kept.push(name.display_name()),
            Fate::Copy(reason) => {
                resumed.redone.push(entry(reason));
                strip.push(shadow.clone());
                empty.push(shadow);
                forget_all.push(name.quoted());
                if let Some(p) = plan.preserved.iter().find(|p| p.qualname() == *name) {
                    if let Some(i) = objects.sync_functions.iter().position(|f| *f == p.function) {
                        unsync.extend(p.teardown_sql(&p.table));
                        objects.sync_functions.remove(i);
                        let live = dest.tables.get(name).map(|l| l.oid);
                        objects.sync_triggers.retain(|(_, oid)| Some(*oid) != live);
                        unsync.push(format!(
                            "DELETE FROM pgzm.sync_errors WHERE migration_id = {} AND table_name = {}",
                            run.id,
                            quote_literal(&name.display_name())
                        ));
                    }
                }
            }
            Fate::Build(reason) => {
                resumed.rebuilt.push(entry(reason));
                strip.push(shadow);
                forget_built.push(name.quoted());
            }
        }
    }
    // Top-level objects only: a partitioned table's take its partitions' with them.
    let rows = control
        .query(
            "WITH t AS (SELECT to_regclass(x) AS oid, r FROM unnest($1::text[]) x, LATERAL (SELECT x = ANY($2::text[]) AS r) y)
             SELECT 1 AS step, c.conrelid::regclass::text AS rel, quote_ident(c.conname) AS name
               FROM pg_constraint c JOIN t ON t.oid = c.conrelid
              WHERE c.contype = 'f' AND c.conparentid = 0
             UNION ALL
             SELECT 2, c.conrelid::regclass::text, quote_ident(c.conname)
               FROM pg_constraint c JOIN t ON t.oid = c.conrelid AND t.r
              WHERE c.conparentid = 0 AND c.coninhcount = 0
                AND (c.contype IN ('p', 'u', 'x') OR (c.contype = 'c' AND NOT c.convalidated))
             UNION ALL
             SELECT 3, i.indrelid::regclass::text, i.indexrelid::regclass::text
               FROM pg_index i JOIN t ON t.oid = i.indrelid AND t.r
              WHERE NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.contype IN ('p', 'u', 'x'))
                AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.indexrelid)
             UNION ALL
             SELECT 4, g.tgrelid::regclass::text, quote_ident(g.tgname)
               FROM pg_trigger g JOIN t ON t.oid = g.tgrelid AND t.r
              WHERE NOT g.tgisinternal AND g.tgparentid = 0
             ORDER BY 1, 2, 3",
            &[&all, &strip],
        )
        .await
        .map_err(err("read the shadow tables' keys, indexes and triggers"))?;
    let mut batch: Vec<String> = rows
        .iter()
        .map(|r| {
            let (step, rel, name): (i32, String, String) =
                (r.get("step"), r.get("rel"), r.get("name"));
            match step {
                1 | 2 => format!("ALTER TABLE {rel} DROP CONSTRAINT IF EXISTS {name}"),
                3 => format!("DROP INDEX IF EXISTS {name}"),
                _ => format!("DROP TRIGGER IF EXISTS {name} ON {rel}"),
            }
        })
        .collect();
    if !empty.is_empty() {
        batch.push(format!("TRUNCATE {}", empty.join(", ")));
    }
    batch.extend(unsync);
    // Built again over the tables as they will be.
    if !objects.matviews.is_empty() {
        let names: Vec<String> = objects
            .matviews
            .iter()
            .map(|(schema, name, _)| pgzm_pg::sql::quote_qualified(schema, name))
            .collect();
        batch.push(format!(
            "DROP MATERIALIZED VIEW IF EXISTS {}",
            names.join(", ")
        ));
        objects.matviews.clear();
    }
    let tx = control
        .transaction()
        .await
        .map_err(err("begin the resume transaction"))?;
    if !batch.is_empty() {
        tx.batch_execute(&batch.join(";\n"))
            .await
            .map_err(err("reset the shadow tables to build or copy again"))?;
    }
    tx.execute(
        "DELETE FROM pgzm.copy_progress WHERE migration_id = $1 AND (
           EXISTS (SELECT 1 FROM unnest($2::text[]) k
                    WHERE task_key = k OR task_key = 'built:' || k OR left(task_key, length(k) + 2) = k || '/p')
           OR task_key IN (SELECT 'built:' || k FROM unnest($3::text[]) k))",
        &[&run.id, &forget_all, &forget_built],
    )
    .await
    .map_err(err("forget the copies to redo"))?;
    state::record_objects(&tx, run.id, &objects).await?;
    tx.execute(
        "UPDATE pgzm.migrations SET plan = $2, error = NULL, paused = NULL WHERE id = $1",
        &[&run.id, &tokio_postgres::types::Json(plan)],
    )
    .await
    .map_err(err("record the resumed plan"))?;
    tx.commit()
        .await
        .map_err(err("commit the resume transaction"))?;
    tracing::info!(
        migration = run.id,
        kept = resumed.kept.len(),
        redone = resumed.redone.len(),
        rebuilt = resumed.rebuilt.len(),
        "resuming the interrupted run"
    );
    Ok((resumed, objects))
}

/// Rows the interrupted run recorded as copied, per task key of a table (the quoted,
/// qualified name: its range tasks' rows summed).
async fn copied_rows(
    control: &Client,
    id: i64,
    tables: &[QualName],
) -> Result<BTreeMap<String, i64>, CoordinatorError> {
    let keys: Vec<String> = tables.iter().map(QualName::quoted).collect();
    let rows = control
        .query(
            "SELECT k AS key, coalesce(sum(p.rows), 0)::int8 AS rows
               FROM unnest($2::text[]) k
               LEFT JOIN pgzm.copy_progress p ON p.migration_id = $1
                AND (p.task_key = k OR left(p.task_key, length(k) + 2) = k || '/p')
              GROUP BY k",
            &[&id, &keys],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read the interrupted run's copy records", e))?;
    Ok(rows.iter().map(|r| (r.get("key"), r.get("rows"))).collect())
}

/// The resumed run's source snapshot, for reading the tables it would keep.
pub(crate) struct SourceSnapshot<'a> {
    /// The source.
    pub url: &'a DbUrl,
    /// The exported snapshot (`pg_export_snapshot`).
    pub id: &'a str,
    /// Tables read at once (each on its own session).
    pub jobs: usize,
}

impl SourceSnapshot<'_> {
    /// Those of `tables` whose rows in this snapshot are not the ones copied in the snapshot
    /// `before` (`pg_snapshot` text): a row version `before` did not see (its xmin, widened to
    /// 64 bits by this snapshot's epoch; a frozen one was old), or another number of rows than
    /// `copied` (a deletion leaves no new version).
    async fn changed(
        &self,
        before: &str,
        tables: &[QualName],
        copied: &BTreeMap<String, i64>,
    ) -> Result<BTreeSet<QualName>, CoordinatorError> {
        if tables.is_empty() {
            return Ok(BTreeSet::new());
        }
        let lanes = self.jobs.clamp(1, tables.len());
        let reads = (0..lanes).map(|lane| {
            let mine: Vec<&QualName> = tables.iter().skip(lane).step_by(lanes).collect();
            async move {
                let client = self.url.connect("pgzm-coordinator").await?;
                client
                    .batch_execute(&format!(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
                         SET LOCAL lock_timeout = '30s'",
                        quote_literal(self.id)
                    ))
                    .await
                    .map_err(|e| CoordinatorError::source("import the snapshot", e))?;
                let mut changed = Vec::new();
                for name in mine {
                    let row = client
                        .query_one(
                            &format!(
                                "SELECT count(*) AS rows,
                                        count(*) FILTER (WHERE raw >= 3 AND NOT pg_visible_in_snapshot(
                                          (CASE WHEN (hi | raw) > n THEN (hi | raw) - 4294967296 ELSE hi | raw END)::text::xid8,
                                          $1::text::pg_snapshot)) AS newer
                                   FROM (SELECT xmin::text::int8 AS raw FROM ONLY {name}) r,
                                        (SELECT n, (n >> 32) << 32 AS hi
                                           FROM (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS n) s) e"
                            ),
                            &[&before],
                        )
                        .await
                        .map_err(|e| {
                            CoordinatorError::source(
                                format!("read {} to prove it unchanged", name.plain()),
                                e,
                            )
                        })?;
                    let (rows, newer): (i64, i64) = (row.get("rows"), row.get("newer"));
                    let was = copied.get(&name.quoted()).copied().unwrap_or(0);
                    if newer > 0 || rows != was {
                        tracing::info!(table = %name, rows, copied = was, newer, "changed since the interrupted run");
                        changed.push(name.clone());
                    }
                }
                Ok::<_, CoordinatorError>(changed)
            }
        });
        let found = futures_util::future::try_join_all(reads).await?;
        Ok(found.into_iter().flatten().collect())
    }
}
