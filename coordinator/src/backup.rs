//! Backup sets: `pgzm list`, `pgzm verify`, `pgzm cleanup`.
//!
//! A backup set is what a swap moved aside: the previous live tables (with their indexes,
//! sequences, types and views) under `backup_` names, recorded in the migration's plan. The
//! newest successful prepare replaces it; `rollback` consumes it.

use pgzm_pg::sql::{quote_ident, quote_qualified};
use serde::Serialize;
use tokio_postgres::Client;

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::naming::QualName;
use crate::plan::{Move, ObjectKind};
use crate::state;

/// One table of a backup set.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BackupTable {
    /// Schema of the table and its backup.
    pub schema: String,
    /// Name it had when live (and has again after a rollback).
    pub name: String,
    /// Backup name.
    pub backup: String,
    /// Whether the backup table exists.
    pub present: bool,
    /// Rows now (exact count).
    pub rows: Option<i64>,
    /// Rows recorded right after the swap.
    pub rows_at_swap: Option<i64>,
    /// Total size in bytes (table, indexes, TOAST).
    pub bytes: Option<i64>,
}

/// One backup set, as `list` shows it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BackupSet {
    /// Migration id (milliseconds since the epoch): the `--timestamp` of rollback and verify.
    pub timestamp: i64,
    /// When the swap that made it happened.
    pub created: String,
    /// Seconds since the swap.
    #[serde(serialize_with = "crate::document::rounded")]
    pub age_seconds: f64,
    /// Number of tables.
    pub table_count: usize,
    /// Total size, human readable.
    pub size: String,
    /// Total size in bytes.
    pub bytes: i64,
    /// Tables.
    pub tables: Vec<BackupTable>,
}

/// A backup set's row of `pgzm.migrations`, without its plan: what a command needs of the plan
/// is read in parts ([`state::plan_array`]), so that a set of 10 000 tables never holds its
/// whole recorded plan (~13 MB of JSON, several times that parsed).
#[derive(Debug, Clone)]
pub struct SetRow {
    /// Migration id (ms since the epoch).
    pub id: i64,
    /// When the swap that made it happened (its creation, for metadata without it), RFC 3339.
    pub created: String,
    /// The same, ms since the epoch.
    pub created_ms: i64,
    /// Seconds since the migration was created.
    pub age_seconds: f64,
}

/// The backup sets of `pgzm.migrations`, newest first.
async fn backup_sets(client: &Client) -> Result<Vec<SetRow>, CoordinatorError> {
    let read = |e| CoordinatorError::destination("read pgzm metadata", e);
    if !client
        .query_one(
            "SELECT to_regclass('pgzm.migrations') IS NOT NULL AS table_exists",
            &[],
        )
        .await
        .map_err(read)?
        .get::<_, bool>("table_exists")
    {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT id, extract(epoch FROM now() - created_at)::float8 AS age_seconds,
                    to_char(coalesce(swapped_at, created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created,
                    (extract(epoch FROM coalesce(swapped_at, created_at)) * 1000)::int8 AS created_ms
             FROM pgzm.migrations WHERE backup_present ORDER BY id DESC",
            &[],
        )
        .await
        .map_err(read)?
        .iter()
        .map(|r| SetRow {
            id: r.get("id"),
            created: r.get("created"),
            created_ms: r.get("created_ms"),
            age_seconds: r.get("age_seconds"),
        })
        .collect())
}

/// The backup set of migration `id`, or the newest; an error saying what exists when missing.
pub async fn find(client: &Client, id: Option<i64>) -> Result<SetRow, CoordinatorError> {
    let rows = backup_sets(client).await?;
    let found = match id {
        Some(id) => rows.into_iter().find(|r| r.id == id),
        None => rows.into_iter().next(),
    };
    found.ok_or_else(|| {
        CoordinatorError::Refused(vec![match id {
            Some(id) => format!("no backup set with timestamp {id} in this destination: see `pgzm list`"),
            None => "there is no backup set in this destination (nothing was swapped, or it was rolled back or cleaned up)".into(),
        }])
    })
}

/// The recorded backup moves of set `id` of the `kinds` given.
async fn backup_moves(
    client: &Client,
    id: i64,
    kinds: &[ObjectKind],
) -> Result<Vec<Move>, CoordinatorError> {
    state::plan_array(client, id, "to_backup", |m: &Move| kinds.contains(&m.kind)).await
}

/// The row counts recorded right after the swap (`stats.backup_rows`), by table.
async fn rows_at_swap(
    client: &Client,
    id: i64,
) -> Result<Option<serde_json::Value>, CoordinatorError> {
    Ok(client
        .query_opt(
            "SELECT stats -> 'backup_rows' AS backup_rows FROM pgzm.migrations WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| CoordinatorError::destination("read pgzm metadata", e))?
        .and_then(|r| r.get("backup_rows")))
}

fn recorded_rows(rows_at_swap: Option<&serde_json::Value>, table: &Move) -> Option<i64> {
    rows_at_swap?.get(table.stats_key())?.as_i64()
}

/// Set `set` as `list` shows it; `moves` are its recorded backup moves (its tables at least).
async fn describe_set(
    client: &Client,
    set: &SetRow,
    moves: &[Move],
) -> Result<BackupSet, CoordinatorError> {
    let recorded = rows_at_swap(client, set.id).await?;
    let mut tables = Vec::new();
    for m in moves.iter().filter(|m| m.kind == ObjectKind::Table) {
        let info = client
            .query_opt(
                "SELECT pg_total_relation_size(c.oid) AS bytes FROM pg_class c
                 WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)
                   AND c.relname = $1 AND c.relkind IN ('r', 'p')",
                &[&m.to, &m.schema],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect backup tables", e))?;
        let present = info.is_some();
        let rows = if present {
            Some(count(client, &m.schema, &m.to).await?)
        } else {
            None
        };
        tables.push(BackupTable {
            schema: m.schema.to_string(),
            name: m.from.to_string(),
            backup: m.to.to_string(),
            present,
            rows,
            rows_at_swap: recorded_rows(recorded.as_ref(), m),
            bytes: info.map(|r| r.get("bytes")),
        });
    }
    let bytes: i64 = tables.iter().filter_map(|t| t.bytes).sum();
    Ok(BackupSet {
        timestamp: set.id,
        created: set.created.clone(),
        age_seconds: set.age_seconds,
        table_count: tables.len(),
        size: crate::report::size(bytes),
        bytes,
        tables,
    })
}

async fn count(client: &Client, schema: &str, table: &str) -> Result<i64, CoordinatorError> {
    let sql = format!(
        "SELECT count(*) AS row_count FROM ONLY {}",
        quote_qualified(schema, table)
    );
    Ok(client
        .query_one(&sql, &[])
        .await
        .map_err(|e| CoordinatorError::destination(format!("count rows of \"{table}\""), e))?
        .get("row_count"))
}

/// `pgzm list`.
pub async fn list(destination: &DbUrl) -> Result<Vec<BackupSet>, CoordinatorError> {
    let client = destination.connect("pgzm-list").await?;
    let mut out = Vec::new();
    for set in backup_sets(&client).await? {
        let tables = backup_moves(&client, set.id, &[ObjectKind::Table]).await?;
        out.push(describe_set(&client, &set, &tables).await?);
    }
    Ok(out)
}

/// One check of `verify`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Check {
    /// What was checked.
    pub check: String,
    /// Whether it holds.
    pub ok: bool,
    /// Details when not.
    pub detail: Option<String>,
}

/// The result of `pgzm verify`.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Verification {
    /// Backup set.
    pub timestamp: i64,
    /// Whether every check holds.
    pub valid: bool,
    /// The checks.
    pub checks: Vec<Check>,
}

/// `pgzm verify`: every backup table exists and has its live twin, row counts recorded at the
/// swap still match, primary keys are present and hold no NULL, foreign keys inside the set
/// have no orphans, backup sequences are present.
pub async fn verify(
    destination: &DbUrl,
    id: Option<i64>,
) -> Result<Verification, CoordinatorError> {
    let client = destination.connect("pgzm-verify").await?;
    let row = find(&client, id).await?;
    let moves = backup_moves(&client, row.id, &[ObjectKind::Table, ObjectKind::Sequence]).await?;
    // The migration's tables, by name: a backup table without one is a partition the source
    // did not have.
    #[derive(serde::Deserialize)]
    struct TableName {
        #[serde(default = "crate::naming::public_schema")]
        schema: String,
        name: String,
    }
    let migrated: std::collections::BTreeSet<QualName> =
        state::plan_array(&client, row.id, "tables", |_: &TableName| true)
            .await?
            .into_iter()
            .map(|t| QualName::new(t.schema, t.name))
            .collect();
    let set = describe_set(&client, &row, &moves).await?;
    let mut checks = Vec::new();
    let mut check = |check: String, problem: Option<String>| {
        checks.push(Check {
            check,
            ok: problem.is_none(),
            detail: problem,
        });
    };
    for t in &set.tables {
        let backup = QualName::new(t.schema.clone(), t.backup.clone());
        let live = QualName::new(t.schema.clone(), t.name.clone());
        check(
            format!("backup table {} exists", backup.plain()),
            (!t.present).then(|| "missing".to_string()),
        );
        if !t.present {
            continue;
        }
        // A partition of a replaced table that the source did not have joined the backup set
        // with its parent: it has no live twin.
        if migrated.contains(&live) {
            let twin = client
                .query_opt(
                    "SELECT 1 FROM pg_class WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)
                       AND relname = $1 AND relkind IN ('r', 'p')",
                    &[&t.name, &t.schema],
                )
                .await
                .map_err(|e| CoordinatorError::destination("inspect live tables", e))?;
            check(
                format!("live table {} exists", live.plain()),
                twin.is_none().then(|| "missing".to_string()),
            );
        }
        if let (Some(now), Some(then)) = (t.rows, t.rows_at_swap) {
            check(
                format!(
                    "{} still holds the {then} rows it had at the swap",
                    backup.plain()
                ),
                (now != then).then(|| format!("it holds {now}")),
            );
        }
        let pk = client
            .query_opt(
                "SELECT ARRAY(SELECT a.attname::text FROM unnest(k.conkey) AS u(n)
                              JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n) AS key_columns
                 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                 WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)
                   AND c.relname = $1 AND k.contype = 'p'",
                &[&t.backup, &t.schema],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect primary keys", e))?;
        if let Some(pk) = pk {
            let cols: Vec<String> = pk.get("key_columns");
            let cond = cols
                .iter()
                .map(|c| format!("{} IS NULL", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!("SELECT count(*) AS null_keys FROM {backup} WHERE {cond}");
            let nulls: i64 = client
                .query_one(&sql, &[])
                .await
                .map_err(|e| CoordinatorError::destination("check primary keys", e))?
                .get("null_keys");
            check(
                format!("primary key of {} has no NULL", backup.plain()),
                (nulls > 0).then(|| format!("{nulls} rows")),
            );
        }
    }
    for (constraint, table, orphans) in orphans_in_set(&client, &moves).await? {
        check(
            format!(
                "foreign key \"{constraint}\" of {} has no orphans",
                table.plain()
            ),
            (orphans > 0).then(|| format!("{orphans} orphaned rows")),
        );
    }
    for m in moves.iter().filter(|m| m.kind == ObjectKind::Sequence) {
        let present = client
            .query_opt(
                "SELECT 1 FROM pg_class WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = $2)
                   AND relname = $1 AND relkind = 'S'",
                &[&m.to, &m.schema],
            )
            .await
            .map_err(|e| CoordinatorError::destination("inspect sequences", e))?
            .is_some();
        check(
            format!(
                "backup sequence {} exists",
                QualName::new(m.schema.clone(), m.to.clone()).plain()
            ),
            (!present).then(|| "missing".to_string()),
        );
    }
    let valid = checks.iter().all(|c| c.ok);
    Ok(Verification {
        timestamp: row.id,
        valid,
        checks,
    })
}

/// Orphan counts of the foreign keys declared on backup tables.
async fn orphans_in_set(
    client: &Client,
    moves: &[Move],
) -> Result<Vec<(String, QualName, i64)>, CoordinatorError> {
    let tables: Vec<&Move> = moves
        .iter()
        .filter(|m| m.kind == ObjectKind::Table)
        .collect();
    let schemas: Vec<&str> = tables.iter().map(|m| m.schema.as_str()).collect();
    let names: Vec<&str> = tables.iter().map(|m| m.to.as_str()).collect();
    let fks = client
        .query(
            "SELECT k.conname::text AS name, cn.nspname::text AS schema_name, c.relname::text AS table_name,
                    rn.nspname::text AS referenced_schema, r.relname::text AS referenced_table,
                    ARRAY(SELECT a.attname::text FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
                          JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o) AS columns,
                    ARRAY(SELECT a.attname::text FROM unnest(k.confkey) WITH ORDINALITY u(n, o)
                          JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.o) AS referenced_columns
             FROM pg_constraint k
             JOIN pg_class c ON c.oid = k.conrelid
             JOIN pg_namespace cn ON cn.oid = c.relnamespace
             JOIN pg_class r ON r.oid = k.confrelid
             JOIN pg_namespace rn ON rn.oid = r.relnamespace
             JOIN unnest($1::text[], $2::text[]) w(s, t) ON w.s = cn.nspname AND w.t = c.relname
             WHERE k.contype = 'f'",
            &[&schemas, &names],
        )
        .await
        .map_err(|e| CoordinatorError::destination("inspect foreign keys of the backup set", e))?;
    let mut out = Vec::new();
    for fk in fks {
        let name: String = fk.get("name");
        let table = QualName::from_columns(&fk, "schema_name", "table_name");
        let target = QualName::from_columns(&fk, "referenced_schema", "referenced_table");
        let cols: Vec<String> = fk.get("columns");
        let refs: Vec<String> = fk.get("referenced_columns");
        let not_null = cols
            .iter()
            .map(|c| format!("t.{} IS NOT NULL", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let join = cols
            .iter()
            .zip(&refs)
            .map(|(c, r)| format!("r.{} = t.{}", quote_ident(r), quote_ident(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let sql = format!(
            "SELECT count(*) AS orphans FROM {table} t WHERE {not_null} AND NOT EXISTS (SELECT 1 FROM {target} r WHERE {join})"
        );
        let n: i64 = client
            .query_one(&sql, &[])
            .await
            .map_err(|e| CoordinatorError::destination(format!("check foreign key \"{name}\""), e))?
            .get("orphans");
        out.push((name, table, n));
    }
    Ok(out)
}

/// Parses `--before`: milliseconds since the epoch (all digits), `YYYY-MM-DD` (UTC midnight),
/// or `YYYY-MM-DD HH:MM[:SS[.fff]]` / `YYYY-MM-DDTHH:MM[:SS[.fff]]`, UTC unless followed by `Z`
/// or an offset `±HH:MM` / `±HHMM` / `±HH` (ISO 8601, e.g. the output of `date -Iseconds`).
/// Dates that do not exist (2023-02-29, 2024-04-31) are refused.
pub fn parse_before(text: &str) -> Result<i64, CoordinatorError> {
    let t = text.trim();
    let bad = || {
        CoordinatorError::Usage(format!(
            "--before {t:?}: expected YYYY-MM-DD, \"YYYY-MM-DD HH:MM[:SS]\" (UTC), an ISO 8601 \
             timestamp such as 2024-02-29T12:30:00+01:00, or milliseconds since the epoch"
        ))
    };
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse::<i64>().map_err(|_| bad());
    }
    let digits = |s: &str, len: usize| -> Result<i64, CoordinatorError> {
        if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        s.parse().map_err(|_| bad())
    };
    let (date, time) = match t.split_once(['T', ' ']) {
        Some((d, tm)) => (d, Some(tm)),
        None => (t, None),
    };
    let parts: Vec<&str> = date.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d) = (digits(y, 4)?, digits(m, 2)?, digits(d, 2)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    if let Some(time) = time {
        // Time zone designator: `Z` or a numeric offset east of UTC.
        let (clock, offset_minutes) = if let Some(clock) = time.strip_suffix('Z') {
            (clock, 0)
        } else if let Some(pos) = time.rfind(['+', '-']) {
            let (clock, zone) = (&time[..pos], &time[pos + 1..]);
            let (h, mi) = match zone.len() {
                2 => (digits(zone, 2)?, 0),
                4 => (digits(&zone[..2], 2)?, digits(&zone[2..], 2)?),
                5 if zone.as_bytes()[2] == b':' => (digits(&zone[..2], 2)?, digits(&zone[3..], 2)?),
                _ => return Err(bad()),
            };
            if h > 23 || mi > 59 {
                return Err(bad());
            }
            let sign = if time.as_bytes()[pos] == b'-' { -1 } else { 1 };
            (clock, sign * (h * 60 + mi))
        } else {
            (time, 0)
        };
        let (hms, fraction) = match clock.split_once('.') {
            Some((hms, f)) => (hms, Some(f)),
            None => (clock, None),
        };
        let fields: Vec<&str> = hms.split(':').collect();
        let (h, mi, s) = match fields.as_slice() {
            [h, mi] => (digits(h, 2)?, digits(mi, 2)?, 0),
            [h, mi, s] => (digits(h, 2)?, digits(mi, 2)?, digits(s, 2)?),
            _ => return Err(bad()),
        };
        if h > 23 || mi > 59 || s > 60 {
            return Err(bad());
        }
        let millis = match fraction {
            // A fraction needs seconds and at least one digit; digits past the millisecond
            // are dropped.
            Some(f) if fields.len() == 3 && !f.is_empty() && f.len() <= 9 => {
                if !f.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                format!("{:0<3}", &f[..f.len().min(3)])
                    .parse::<i64>()
                    .map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
            None => 0,
        };
        ms += ((h * 60 + mi - offset_minutes) * 60 + s) * 1000 + millis;
    }
    Ok(ms)
}

/// Number of days of month `m` (1–12) of year `y` (proleptic Gregorian).
fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What `cleanup` dropped (or would drop).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Cleanup {
    /// Cut-off, ms since the epoch.
    pub before: i64,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Backup sets (timestamps) dropped or to drop.
    pub backup_sets: Vec<i64>,
    /// Objects dropped or to drop.
    pub objects: Vec<String>,
}

/// `pgzm cleanup --before`: drops backup sets older than the cut-off — created (swapped in)
/// before it, and with a timestamp (migration id) before it — and, whatever the cut-off, what
/// a rollback moved aside and did not drop (it was interrupted after its commit).
pub async fn cleanup(
    destination: &DbUrl,
    before: i64,
    dry_run: bool,
) -> Result<Cleanup, CoordinatorError> {
    let mut client = destination.connect("pgzm-cleanup").await?;
    if !state::try_lock(&client).await? {
        return Err(CoordinatorError::Busy);
    }
    let mut out = Cleanup {
        before,
        dry_run,
        backup_sets: Vec::new(),
        objects: Vec::new(),
    };
    let mut aside_left = Vec::new();
    if dry_run {
        out.objects.extend(
            state::rolled_back_objects(&client, None)
                .await?
                .iter()
                .map(state::RolledBackObject::describe),
        );
    } else {
        let drops =
            state::drop_rolled_back(&client, None, crate::locked::SwapSettings::default()).await?;
        out.objects.extend(drops.dropped);
        aside_left = drops.warnings;
    }
    // A backup set's age is that of its swap (when the live tables became the backup), not of
    // its prepare: with two-phase runs they can be days apart, and a set swapped in an hour ago
    // must not go because its prepare started last week.
    for set in backup_sets(&client).await? {
        if set.created_ms.max(set.id) >= before {
            continue;
        }
        out.backup_sets.push(set.id);
        // Read a set at a time, without their indexes (they go with their tables).
        let moves = state::plan_array(&client, set.id, "to_backup", |m: &Move| {
            m.kind != ObjectKind::Index
        })
        .await?;
        if dry_run {
            out.objects.extend(
                moves
                    .iter()
                    .map(|m| format!("{} {}", m.kind.keyword().to_lowercase(), m.to)),
            );
        } else {
            out.objects
                .extend(state::drop_backup_set(&mut client, set.id, &moves).await?);
        }
    }
    finished(out, aside_left)
}

/// The cleanup's outcome: an error naming what a rollback moved aside and is still left, if
/// anything is.
fn finished(out: Cleanup, aside_left: Vec<String>) -> Result<Cleanup, CoordinatorError> {
    if aside_left.is_empty() {
        Ok(out)
    } else {
        Err(CoordinatorError::Refused(aside_left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cutoffs() {
        assert_eq!(parse_before("1700000000000").unwrap(), 1_700_000_000_000);
        assert_eq!(parse_before("1970-01-02").unwrap(), 86_400_000);
        assert_eq!(parse_before("2024-02-29").unwrap(), 1_709_164_800_000);
        assert_eq!(
            parse_before("2024-02-29 12:30").unwrap(),
            1_709_164_800_000 + 45_000_000
        );
        assert_eq!(
            parse_before("2024-02-29T12:30:15Z").unwrap(),
            1_709_164_800_000 + 45_015_000
        );
        for bad in [
            "",
            "yesterday",
            "2024-13-01",
            "2024-1-01",
            "2024-01-01 25:00",
            "12.5",
        ] {
            assert!(parse_before(bad).is_err(), "{bad}");
        }
    }
}
