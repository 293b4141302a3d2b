//! After a table's data has landed: its keys, indexes, NOT VALID checks, triggers, sequence
//! positions and statistics; after every table: foreign keys.

use std::sync::Arc;

use futures_util::future::try_join_all;
use futures_util::StreamExt as _;
use pgzm_pg::sql::{quote_ident, quote_literal, quote_qualified};
use std::time::Duration;
use tokio::sync::Semaphore;

use pgzm_pg::conn::{classify, ErrorClass};
use tracing::{debug, warn, Instrument};

use crate::catalog::{Constraint, SourceSchema, Table};
use crate::conninfo::DbUrl;
use crate::ddl;
use crate::error::CoordinatorError;
use crate::plan::Plan;
use crate::rewrite::Renames;

/// Settings for build sessions.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// `maintenance_work_mem` for index builds, e.g. `256MB`.
    pub maintenance_work_mem: String,
}

impl Default for BuildSettings {
    fn default() -> Self {
        BuildSettings {
            maintenance_work_mem: "256MB".into(),
        }
    }
}

/// Tables smaller than this are built in one round trip; larger ones with
/// [`BuildSessions::run_table`]: their index builds at once, each statement on its own (long
/// enough that its own log line and error context are worth a round trip).
pub const BATCH_BELOW_BYTES: i64 = 8 << 20;

/// The statements that finish one shadow table (everything but foreign keys), in three groups
/// run in order: `first` one after another, `parallel` at once (index builds: each takes only a
/// SHARE lock, which they all can hold together), `last` one after another.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableBuild {
    /// Constraints that must build their own index (exclusion, deferrable): ACCESS EXCLUSIVE.
    pub first: Vec<String>,
    /// Index builds, including the indexes of primary keys and unique constraints.
    pub parallel: Vec<String>,
    /// Constraints attached to their built indexes, NOT VALID checks, triggers, sequences,
    /// statistics.
    pub last: Vec<String>,
    /// The primary keys and unique constraints split into an index build (in `parallel`) and
    /// its attachment (in `last`), each with the one statement that does both.
    pub keys: Vec<SplitKey>,
}

/// A primary key or unique constraint built in two steps (`CREATE UNIQUE INDEX` beside the
/// table's other index builds, then `ADD CONSTRAINT … USING INDEX`), and the single `ADD
/// CONSTRAINT` that does the same in one. The split pays only where builds run at once; in one
/// batch the single statement is cheaper (on a table of 20 rows, 0.6–0.8 ms against 0.9–1.0 ms
/// of server time for the pair, PostgreSQL 15): one catalog update and invalidation fewer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplitKey {
    /// Where the index build stands in `parallel`.
    pub index_at: usize,
    /// Where the attachment stands in `last`.
    pub attach_at: usize,
    /// `ALTER TABLE … ADD CONSTRAINT name PRIMARY KEY|UNIQUE (…)`.
    pub direct: String,
}

impl TableBuild {
    /// Leaves out the table's `ANALYZE` (the last statement [`table_build`] plans), for a table
    /// that landed with fewer rows than the destination's `autovacuum_analyze_threshold`: as
    /// after pg_restore, the planner then takes its size from the index builds (`reltuples`)
    /// and, for its columns, the estimates it uses for a table without statistics, which on a
    /// table of a few dozen rows (one page) change no plan; autovacuum analyzes it once it has
    /// changed by that many rows. `ANALYZE` was 1.2 ms of server time per table, a third of a
    /// small table's whole build.
    pub fn skip_statistics(&mut self) {
        if self.last.last().is_some_and(|s| s.starts_with("ANALYZE ")) {
            self.last.pop();
        }
    }

    /// Every statement, in an order that is valid one after another.
    pub fn sequential(&self) -> Vec<String> {
        self.first
            .iter()
            .chain(&self.parallel)
            .chain(&self.last)
            .cloned()
            .collect()
    }

    /// Every statement, in an order that is valid one after another, for one batch: each key
    /// built by its single `ADD CONSTRAINT` (see [`SplitKey`]) where its index build stood.
    pub fn in_one_batch(&self) -> Vec<String> {
        let mut parallel = self.parallel.clone();
        let mut attached = vec![false; self.last.len()];
        for k in &self.keys {
            parallel[k.index_at].clone_from(&k.direct);
            attached[k.attach_at] = true;
        }
        let last = self.last.iter().zip(attached).filter(|(_, a)| !a);
        self.first
            .iter()
            .cloned()
            .chain(parallel)
            .chain(last.map(|(sql, _)| sql.clone()))
            .collect()
    }
}

/// For a primary key or unique constraint, the `CREATE UNIQUE INDEX` tail (after `ON table`)
/// that builds its index on its own, so it can run in parallel with the table's other indexes
/// and then be attached (`ADD CONSTRAINT … USING INDEX`, a catalog change). Derived from
/// `pg_get_constraintdef`: `PRIMARY KEY (cols)` / `UNIQUE [NULLS NOT DISTINCT] (cols)`, then
/// optionally `INCLUDE (cols)`, `WITH (options)`, `USING INDEX TABLESPACE name`. Anything else
/// (deferrable constraints, exclusion constraints, a form not recognised) is `None`: the
/// constraint is then added the ordinary way.
fn index_for_constraint(c: &crate::catalog::Constraint) -> Option<String> {
    let (mut rest, nulls_not_distinct) = match c.kind {
        'p' => (c.definition.strip_prefix("PRIMARY KEY ")?, false),
        'u' => {
            let r = c.definition.strip_prefix("UNIQUE ")?;
            match r.strip_prefix("NULLS NOT DISTINCT ") {
                Some(r) => (r, true),
                None => (r, false),
            }
        }
        _ => return None,
    };
    let (columns, r) = parenthesized(rest)?;
    rest = r;
    let mut include = None;
    if let Some(r) = rest.strip_prefix(" INCLUDE ") {
        let (cols, r) = parenthesized(r)?;
        include = Some(cols);
        rest = r;
    }
    let mut with = None;
    if let Some(r) = rest.strip_prefix(" WITH ") {
        let (opts, r) = parenthesized(r)?;
        with = Some(opts);
        rest = r;
    }
    let mut tablespace = None;
    if let Some(r) = rest.strip_prefix(" USING INDEX TABLESPACE ") {
        tablespace = Some(r);
        rest = "";
    }
    if !rest.is_empty() {
        return None;
    }
    let mut tail = format!("USING btree {columns}");
    if let Some(i) = include {
        tail.push_str(&format!(" INCLUDE {i}"));
    }
    if nulls_not_distinct {
        tail.push_str(" NULLS NOT DISTINCT");
    }
    if let Some(w) = with {
        tail.push_str(&format!(" WITH {w}"));
    }
    if let Some(t) = tablespace {
        tail.push_str(&format!(" TABLESPACE {t}"));
    }
    Some(tail)
}

/// Splits `(…)` (balanced, quotes respected) off the start of `s`.
fn parenthesized(s: &str) -> Option<(&str, &str)> {
    if !s.starts_with('(') {
        return None;
    }
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for (i, ch) in s.char_indices() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"') | (None, '\'') => quote = Some(ch),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[..=i], &s[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// The statements that finish one shadow table; see [`TableBuild`].
pub fn table_build(
    t: &Table,
    plan: &Plan,
    source: &SourceSchema,
    renames: &Renames,
) -> Result<TableBuild, CoordinatorError> {
    let shadow = &plan
        .table(&t.qualname())
        .map(|p| p.shadow.clone())
        .unwrap_or_default();
    let mut b = TableBuild::default();
    for c in t.constraints.iter().filter(|c| c.has_index()) {
        let name = renames.get_in(&t.schema, &c.name).unwrap_or(&c.name);
        // `ADD CONSTRAINT … USING INDEX` is not supported on partitioned tables: their keys are
        // added directly (attaching the partitions' keys, built already).
        let index = if t.is_partitioned() {
            None
        } else {
            index_for_constraint(c)
        };
        match index {
            Some(tail) => {
                let index = format!(
                    "CREATE UNIQUE INDEX {} ON {} {}",
                    quote_ident(name),
                    quote_qualified(&t.schema, shadow),
                    renames.apply(&tail)
                );
                let attach = format!(
                    "ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}",
                    quote_qualified(&t.schema, shadow),
                    quote_ident(name),
                    if c.kind == 'p' {
                        "PRIMARY KEY"
                    } else {
                        "UNIQUE"
                    },
                    quote_ident(name)
                );
                // The constraint alone (its comment follows in `last` either way).
                b.keys.push(SplitKey {
                    index_at: b.parallel.len(),
                    attach_at: b.last.len(),
                    direct: ddl::add_constraint(&t.schema, shadow, c, name, renames).swap_remove(0),
                });
                b.parallel.push(index);
                b.last.push(attach);
                if let Some(comment) = &c.comment {
                    b.last.push(format!(
                        "COMMENT ON CONSTRAINT {} ON {} IS {}",
                        quote_ident(name),
                        quote_qualified(&t.schema, shadow),
                        quote_literal(comment)
                    ));
                }
            }
            None => b
                .first
                .extend(ddl::add_constraint(&t.schema, shadow, c, name, renames)),
        }
    }
    for ix in &t.indexes {
        let name = renames.get_in(&t.schema, &ix.name).unwrap_or(&ix.name);
        let mut stmts = ddl::create_index(ix, &t.schema, name, renames)?.into_iter();
        // The build itself in parallel; its comment after.
        b.parallel.extend(stmts.next());
        b.last.extend(stmts);
    }
    let out = &mut b.last;
    for c in t
        .constraints
        .iter()
        .filter(|c| c.kind == 'c' && !c.validated)
    {
        out.extend(ddl::add_constraint(&t.schema, shadow, c, &c.name, renames));
    }
    // A preserved table's own triggers would fire on mirrored writes: they are created in the swap.
    let triggers = if plan.is_preserved(&t.qualname()) {
        &[][..]
    } else {
        &t.triggers[..]
    };
    for tg in triggers {
        out.extend(ddl::create_trigger(
            &tg.definition,
            tg.enabled,
            &tg.name,
            &t.schema,
            shadow,
            renames,
        ));
    }
    for s in source.owned_sequences(t) {
        let Some((_, column)) = &s.owned_by else {
            continue;
        };
        let seq = quote_literal(&quote_qualified(
            &s.schema,
            renames.get_in(&s.schema, &s.name).unwrap_or(&s.name),
        ));
        let (agg, beyond) = if s.increment >= 0 {
            ("max", ">")
        } else {
            ("min", "<")
        };
        let col = quote_ident(column);
        let last = s.last_value;
        let called = s.is_called;
        // Next value past the copied data, and never behind the source's own position.
        out.push(format!(
            "SELECT setval({seq}::regclass, CASE WHEN past THEN m ELSE {last} END, CASE WHEN past THEN true ELSE {called} END)
             FROM (SELECT m, m IS NOT NULL AND (m {beyond} {last} OR (NOT {called} AND m = {last})) AS past
                   FROM (SELECT {agg}({col})::int8 AS m FROM {}) a) b",
            quote_qualified(&t.schema, shadow)
        ));
    }
    out.push(format!("ANALYZE {}", quote_qualified(&t.schema, shadow)));
    Ok(b)
}

/// Destination sessions for builds, reused across tables (a session per table would cost a
/// backend start each: most of the time of a small table).
pub struct BuildSessions {
    dest: DbUrl,
    settings: BuildSettings,
    idle: std::sync::Mutex<Vec<tokio_postgres::Client>>,
    /// Bounds the index builds running at once across tables (see [`BuildSessions::run_table`]).
    parallel: Arc<Semaphore>,
}

impl BuildSessions {
    /// No sessions yet; they are opened on demand.
    pub fn new(dest: DbUrl, settings: BuildSettings) -> Self {
        BuildSessions {
            dest,
            settings,
            idle: std::sync::Mutex::new(Vec::new()),
            parallel: Arc::new(Semaphore::new(1)),
        }
    }

    /// At most `n` index builds at once in [`BuildSessions::run_table`] (over all tables).
    pub fn with_parallel_statements(mut self, n: usize) -> Self {
        self.parallel = Arc::new(Semaphore::new(n.max(1)));
        self
    }

    /// Runs a large table's build: `first` in order, then the index builds at once (each on its
    /// own session, within the parallelism bound), then `last` in order. A single-threaded
    /// build (GIN, GiST, expression indexes…) then uses one CPU while the table's other indexes
    /// use the others, as `pg_restore -j` does.
    pub async fn run_table(&self, label: &str, build: TableBuild) -> Result<(), CoordinatorError> {
        if !build.first.is_empty() {
            self.run(label, build.first).await?;
        }
        let builds = build.parallel.into_iter().map(|sql| async move {
            let _permit = self
                .parallel
                .acquire()
                .await
                .map_err(|_| CoordinatorError::Usage("cancelled".into()))?;
            self.run(label, vec![sql]).await
        });
        try_join_all(builds).await?;
        if !build.last.is_empty() {
            self.run(label, build.last).await?;
        }
        Ok(())
    }

    /// Runs `statements` one after another on a session of the pool. A session that saw an
    /// error is closed rather than reused.
    pub async fn run(&self, label: &str, statements: Vec<String>) -> Result<(), CoordinatorError> {
        self.run_as(label, statements, false).await
    }

    /// Runs `statements` in one round trip (one implicit transaction): for small tables, where
    /// a round trip per statement costs more than the statements.
    pub async fn run_batch(
        &self,
        label: &str,
        statements: Vec<String>,
    ) -> Result<(), CoordinatorError> {
        self.run_as(label, statements, true).await
    }

    async fn run_as(
        &self,
        label: &str,
        statements: Vec<String>,
        batch: bool,
    ) -> Result<(), CoordinatorError> {
        // A batch is one implicit transaction: retried whole. Otherwise statement by statement.
        let units: Vec<String> = if batch && statements.len() > 1 {
            vec![statements
                .iter()
                .map(|s| format!("{s};\n"))
                .collect::<String>()]
        } else {
            statements
        };
        let mut client = Some(self.session(label).await?);
        for sql in &units {
            debug!(statement = %sql, "build");
            let mut attempt = 0u32;
            loop {
                let c = match client.take() {
                    Some(c) if !c.is_closed() => c,
                    _ => self.session(label).await?,
                };
                match c.batch_execute(sql).await {
                    Ok(()) => {
                        client = Some(c);
                        break;
                    }
                    // A statement that committed just before the connection was lost is
                    // found done when it is sent again.
                    Err(e) if attempt > 0 && is_already_done(&e) => {
                        client = Some(c);
                        break;
                    }
                    Err(e) if classify(&e) == ErrorClass::Retryable && attempt < BUILD_RETRIES => {
                        attempt += 1;
                        warn!(attempt, error = %pgzm_pg::conn::describe(&e), "{label}: transient failure; retrying on a new session");
                        drop(c);
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(e) => {
                        return Err(CoordinatorError::destination(
                            format!("{label}: {}", first_line(sql)),
                            e,
                        ))
                    }
                }
            }
        }
        if let Some(c) = client {
            self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
        Ok(())
    }

    /// An idle session of the pool, or a new one (retried for a while: the server may be
    /// restarting).
    async fn session(&self, label: &str) -> Result<tokio_postgres::Client, CoordinatorError> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(c) = reused.filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        loop {
            let connected = match self.dest.connect("pgzm-build").await {
                Ok(c) => c
                    .batch_execute(&format!(
                        "SET maintenance_work_mem = {}",
                        quote_literal(&self.settings.maintenance_work_mem)
                    ))
                    .await
                    .map(|()| c)
                    .map_err(|e| {
                        (
                            classify(&e) == ErrorClass::Retryable,
                            CoordinatorError::destination(
                                format!("{label}: set maintenance_work_mem"),
                                e,
                            ),
                        )
                    }),
                Err(e) => Err((true, e)),
            };
            match connected {
                Ok(c) => return Ok(c),
                // The server may be restarting (crash recovery, a failover): connections are
                // refused or dropped for a while.
                Err((true, e)) if started.elapsed() < crate::copy::RESTART_PATIENCE => {
                    attempt += 1;
                    warn!(attempt, error = %e, "{label}: cannot connect for the build; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }
}

/// The span of statements run on the destination for one table (OpenTelemetry's database
/// conventions): `table` is its live name and `shadow` the table worked on, both
/// `schema.name`; `operation` the statements' kind (`CREATE INDEX`, `ALTER TABLE`).
pub fn table_span(
    name: &'static str,
    dest: &DbUrl,
    schema: &str,
    live: &str,
    shadow: &str,
    operation: &'static str,
) -> tracing::Span {
    let server = dest.server();
    let shadow = format!("{schema}.{shadow}");
    tracing::info_span!(
        "table",
        otel.name = name,
        table = %format_args!("{schema}.{live}"),
        shadow = shadow.as_str(),
        db.system.name = "postgresql",
        db.namespace = server.namespace.as_str(),
        db.operation.name = operation,
        db.collection.name = shadow.as_str(),
        server.address = server.address.as_str(),
        server.port = i64::from(server.port),
    )
}

/// Retries of a build statement (or a small table's batch) after a transient failure.
const BUILD_RETRIES: u32 = 3;

/// Whether a statement sent again failed because its first attempt had in fact committed.
fn is_already_done(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::INVALID_TABLE_DEFINITION
    })
}

/// Runs `statements` on a fresh destination session, one after another.
pub async fn run_on_session(
    dest: &DbUrl,
    settings: &BuildSettings,
    label: &str,
    statements: Vec<String>,
) -> Result<(), CoordinatorError> {
    BuildSessions::new(dest.clone(), settings.clone())
        .run(label, statements)
        .await
}

fn first_line(sql: &str) -> String {
    let line = sql.lines().next().unwrap_or_default();
    if line.len() > 160 {
        let mut cut = 160;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &line[..cut])
    } else {
        line.to_string()
    }
}

/// A foreign key added `NOT VALID` to a shadow table and validated after.
#[derive(Debug, Clone)]
pub struct Validation<'a> {
    /// The shadow table's schema.
    pub schema: &'a str,
    /// Its live name.
    pub live: &'a str,
    /// Its shadow name.
    pub shadow: &'a str,
    /// The key.
    pub key: &'a Constraint,
    /// Whether the key references a table the filters leave out.
    pub into_excluded: bool,
}

impl Validation<'_> {
    /// The shadow table, schema-qualified and quoted.
    pub fn table(&self) -> String {
        quote_qualified(self.schema, self.shadow)
    }

    /// What the failure message says was being done (made when the validation runs: 7 700
    /// of them made up front were ~3 MB at 10 000 tables).
    pub fn label(&self) -> String {
        let (c, shadow) = (self.key, self.shadow);
        match c.references.as_ref() {
            Some(r) if self.into_excluded => format!(
                "validate foreign key \"{}\" on \"{shadow}\" (it references {r}, which the table filters leave out: the destination's rows of {r} must hold every key the new rows use)",
                c.name, r = r.plain()
            ),
            _ => format!("validate foreign key \"{}\" on \"{shadow}\"", c.name),
        }
    }
}

/// The foreign keys of the shadow tables: the statements adding them (`NOT VALID`, except on
/// partitioned tables) and the (table, constraint) pairs to validate afterwards. Keys involving
/// a preserved table are left to the swap.
pub fn foreign_key_statements<'a>(
    plan: &'a Plan,
    source: &'a SourceSchema,
    renames: &Renames,
) -> (Vec<String>, Vec<Validation<'a>>) {
    let mut add = Vec::new();
    let mut validate = Vec::new();
    for t in &source.tables {
        let Some(tp) = plan.table(&t.qualname()) else {
            continue;
        };
        for c in t.constraints.iter().filter(|c| c.kind == 'f') {
            // Keys involving a preserved table are added in the swap (see `preserve`).
            if plan.is_preserved(&t.qualname())
                || c.references.as_ref().is_some_and(|r| plan.is_preserved(r))
            {
                continue;
            }
            // A partitioned table's foreign key cannot be added NOT VALID (before PostgreSQL
            // 18): it is added validated, checking every partition once.
            if t.is_partitioned() {
                add.extend(ddl::add_constraint(
                    &t.schema, &tp.shadow, c, &c.name, renames,
                ));
                continue;
            }
            let mut not_valid = c.clone();
            not_valid.validated = false;
            add.extend(ddl::add_constraint(
                &t.schema, &tp.shadow, &not_valid, &c.name, renames,
            ));
            if c.validated {
                // A key into a table the filters left out is checked against its live rows.
                validate.push(Validation {
                    schema: &t.schema,
                    live: &t.name,
                    shadow: &tp.shadow,
                    key: c,
                    into_excluded: c
                        .references
                        .as_ref()
                        .is_some_and(|r| plan.excluded.contains(r)),
                });
            }
        }
    }
    (add, validate)
}

/// Adds every foreign key `NOT VALID` in one transaction (no scans, no lock waits between
/// shadow tables), then validates them in parallel (each validation takes only SHARE UPDATE
/// EXCLUSIVE on its table). Keys that were NOT VALID in the source stay so.
pub async fn foreign_keys(
    dest: &DbUrl,
    plan: &Plan,
    source: &SourceSchema,
    renames: &Renames,
    parallel: usize,
) -> Result<(), CoordinatorError> {
    let (add, validate) = foreign_key_statements(plan, source, renames);
    if add.is_empty() {
        return Ok(());
    }

    // The build sessions' retries: one transaction adding every key (sent again whole after a
    // transient failure), then the validations (idempotent), each retried alone.
    let sessions = BuildSessions::new(dest.clone(), BuildSettings::default());
    let mut batch = String::with_capacity(
        "BEGIN;\nCOMMIT".len() + add.iter().map(|s| s.len() + 2).sum::<usize>(),
    );
    batch.push_str("BEGIN;\n");
    for sql in add {
        batch.push_str(&sql);
        batch.push_str(";\n");
    }
    batch.push_str("COMMIT");
    sessions
        .run("add foreign keys to the shadow tables", vec![batch])
        .await?;
    // At most `parallel` futures at a time, not one per key made up front: at 7 700 keys those
    // futures (and their spans) were 49 MB, the peak of a prepare's memory. A loop rather than
    // a stream of a closure over the borrowed keys: rustc cannot prove such a closure's future
    // `Send` for every lifetime, which `tokio::spawn` of the run needs.
    let mut running = futures_util::stream::FuturesUnordered::new();
    for v in &validate {
        if running.len() >= parallel.max(1) {
            if let Some(done) = running.next().await {
                done?;
            }
        }
        let span = table_span(
            "validate_fk",
            dest,
            v.schema,
            v.live,
            v.shadow,
            "ALTER TABLE",
        );
        let sql = format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            v.table(),
            quote_ident(&v.key.name)
        );
        running.push(validate_key(&sessions, v.label(), sql).instrument(span));
    }
    while let Some(done) = running.next().await {
        done?;
    }
    Ok(())
}

/// Validates one foreign key (`sql`) on a build session.
async fn validate_key(
    sessions: &BuildSessions,
    label: String,
    sql: String,
) -> Result<(), CoordinatorError> {
    sessions.run(&label, vec![sql]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Constraint;

    fn c(kind: char, definition: &str) -> Constraint {
        Constraint {
            name: "k".into(),
            kind,
            definition: definition.into(),
            references: None,
            validated: true,
            comment: None,
            columns: Vec::new(),
            ref_columns: Vec::new(),
            match_full: false,
        }
    }

    #[test]
    fn constraint_indexes_are_derived_from_the_definition() {
        assert_eq!(
            index_for_constraint(&c('p', "PRIMARY KEY (id)")).as_deref(),
            Some("USING btree (id)")
        );
        assert_eq!(
            index_for_constraint(&c(
                'u',
                "UNIQUE NULLS NOT DISTINCT (\"a)b\", c) INCLUDE (d) WITH (fillfactor='70') USING INDEX TABLESPACE ts"
            ))
            .as_deref(),
            Some("USING btree (\"a)b\", c) INCLUDE (d) NULLS NOT DISTINCT WITH (fillfactor='70') TABLESPACE ts")
        );
        // Kept on the ordinary path.
        assert_eq!(
            index_for_constraint(&c('u', "UNIQUE (a) DEFERRABLE INITIALLY DEFERRED")),
            None
        );
        assert_eq!(
            index_for_constraint(&c('x', "EXCLUDE USING gist (r WITH &&)")),
            None
        );
        assert_eq!(index_for_constraint(&c('p', "PRIMARY KEY id")), None);
    }

    #[test]
    fn one_batch_builds_each_split_key_by_its_single_statement() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let b = TableBuild {
            first: v(&["x1"]),
            parallel: v(&["key index", "other index"]),
            last: v(&["attach key", "comment on key", "ANALYZE t"]),
            keys: vec![SplitKey {
                index_at: 0,
                attach_at: 0,
                direct: "add key".into(),
            }],
        };
        assert_eq!(
            b.in_one_batch(),
            v(&[
                "x1",
                "add key",
                "other index",
                "comment on key",
                "ANALYZE t"
            ])
        );
        assert_eq!(
            b.sequential(),
            v(&[
                "x1",
                "key index",
                "other index",
                "attach key",
                "comment on key",
                "ANALYZE t"
            ])
        );
    }
}
