//! The `pgzm` command line.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::build::BuildSettings;
use crate::conninfo::DbUrl;
use crate::cutover::SwapOptions;
use crate::error::CoordinatorError;
use crate::locked::SwapSettings;
use crate::report::StartOptions;

/// Examples shown after `pgzm --help`.
const EXAMPLES: &str = "Examples:
  # Replace production's tables with the rebuilt database's, in one short swap:
  pgzm start --source postgres://build@rebuild/app --dest postgres://app@prod/app

  # See the plan first; nothing is changed:
  pgzm start --dry-run --source … --dest …

  # Two phases: copy now, keeping users and sessions current; swap at a quiet moment:
  pgzm prepare --preserved-tables users,sessions --source … --dest …
  pgzm status --dest …
  pgzm swap --dest …

  # Undo the last swap:
  pgzm rollback --latest --dest …

Exit status: 0 ok, 1 failed, 2 usage, 75 retry later (locks not granted, destination busy),
130/143 interrupted (Ctrl-C/SIGTERM). Passwords can come from PGPASSWORD or ~/.pgpass.";

/// pgzm replaces the tables of a live PostgreSQL database with a freshly built data set: it
/// builds them beside the live ones while production keeps serving, copies the data in
/// parallel, and swaps them in with one transaction of a few milliseconds; the old tables are
/// kept as a backup for `rollback`.
#[derive(Debug, Parser)]
#[command(
    name = "pgzm",
    version,
    about = "Replace the tables of a live PostgreSQL database with a freshly built data set, swapped in with one transaction of a few milliseconds; the old tables stay as a backup",
    propagate_version = true,
    after_help = EXAMPLES
)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global options"
    )]
    pub quiet: bool,
    /// Log line format on stderr: text, or json (one object per line, for machines).
    #[arg(long, global = true, value_enum, default_value_t = LogFormatArg::Text, help_heading = "Global options")]
    pub log_format: LogFormatArg,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// What an interrupted `start`/`prepare` leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnInterrupt {
    /// Remove the run's shadow objects and sync triggers.
    Clean,
    /// Keep them, to continue with `--resume`.
    Keep,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole migration: plan, build shadow tables, copy, swap.
    Start(PrepareArgs),
    /// First phase of a two-phase migration: everything but the swap. Leaves the migration
    /// `prepared` (state kept in the destination), preserved tables kept in sync.
    Prepare(PrepareArgs),
    /// Second phase: swap the prepared migration in (from any machine).
    Swap(SwapArgs),
    /// Show where the newest migration stands and whether it is safe to swap.
    Status(StatusArgs),
    /// List backup sets with timestamp, tables, rows and sizes.
    List(StatusArgs),
    /// Check that a backup set is complete and consistent (exit 1 when not).
    Verify(VerifyArgs),
    /// Swap a backup set back in (one transaction); the backup set is consumed.
    Rollback(RollbackArgs),
    /// Drop backup sets older than a date.
    Cleanup(CleanupArgs),
    /// Remove an interrupted or prepared (not swapped) run: its sync triggers on the live
    /// tables first, then its shadow objects; the live tables and backup sets are untouched.
    Abort(AbortArgs),
    /// Change the byte-rate budget of the migration that is copying into the destination
    /// (`--max-rate`); its agents apply it within a second.
    Throttle(ThrottleArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) on stdout: `pgzm man > pgzm.1`.
    Man,
}

/// Arguments of `pgzm completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

impl Command {
    /// Its name, as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Start(_) => "start",
            Command::Prepare(_) => "prepare",
            Command::Swap(_) => "swap",
            Command::Status(_) => "status",
            Command::List(_) => "list",
            Command::Verify(_) => "verify",
            Command::Rollback(_) => "rollback",
            Command::Cleanup(_) => "cleanup",
            Command::Abort(_) => "abort",
            Command::Throttle(_) => "throttle",
            Command::Completions(_) => "completions",
            Command::Man => "man",
        }
    }

    /// The destination it works on, when it parses (for what an interrupted run does).
    pub fn destination(&self) -> Option<DbUrl> {
        let dest = match self {
            Command::Start(a) | Command::Prepare(a) => &a.dest,
            Command::Swap(a) => &a.dest,
            Command::Status(a) | Command::List(a) => &a.dest,
            Command::Verify(a) => &a.dest,
            Command::Rollback(a) => &a.dest,
            Command::Cleanup(a) => &a.dest,
            Command::Abort(a) => &a.dest,
            Command::Throttle(a) => &a.dest,
            Command::Completions(_) | Command::Man => return None,
        };
        dest.url().ok()
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        match self {
            Command::Start(a) | Command::Prepare(a) => a.output.json,
            Command::Swap(a) => a.output.json,
            Command::Status(a) | Command::List(a) => a.output.json,
            Command::Verify(a) => a.output.json,
            Command::Rollback(a) => a.output.json,
            Command::Cleanup(a) => a.output.json,
            Command::Abort(a) => a.output.json,
            Command::Throttle(a) => a.output.json,
            Command::Completions(_) | Command::Man => false,
        }
    }

    /// Whether an interrupted run keeps its shadow objects for `--resume`.
    pub fn keep_on_interrupt(&self) -> bool {
        matches!(self, Command::Start(a) | Command::Prepare(a) if a.on_interrupt == OnInterrupt::Keep)
    }

    /// The source database of `start`/`prepare`, when it parses.
    pub fn source(&self) -> Option<DbUrl> {
        match self {
            Command::Start(a) | Command::Prepare(a) => a
                .source
                .as_deref()
                .filter(|s| !s.trim().is_empty())
                .and_then(|s| DbUrl::parse(s, "source").ok()),
            _ => None,
        }
    }

    /// Its lock settings (the defaults when it takes none, or when they do not parse).
    pub fn locks(&self) -> SwapSettings {
        let locks = match self {
            Command::Start(a) | Command::Prepare(a) => Some(&a.locks),
            Command::Swap(a) => Some(&a.locks),
            Command::Rollback(a) => Some(&a.locks),
            Command::Abort(a) => Some(&a.locks),
            _ => None,
        };
        locks.and_then(|l| l.settings().ok()).unwrap_or_default()
    }
}

/// `--json`: the result as one JSON document on stdout instead of text.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArg {
    /// Print the result as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pgzm throttle`.
#[derive(Debug, Args)]
pub struct ThrottleArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// The copy's new byte-rate budget over all its tasks and agents, e.g. `50MB/s`, `2GiB/s`,
    /// or `off`.
    #[arg(long, value_name = "SIZE/s|off", value_parser = parse_rate, required_unless_present = "max_replication_lag")]
    pub max_rate: Option<Rate>,
    /// Pause the copy while a standby of the destination lags more than this, e.g. `10s`, or
    /// `off`.
    #[arg(long, value_name = "DURATION|off", value_parser = parse_lag)]
    pub max_replication_lag: Option<Lag>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// A byte rate (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub Option<u64>);

/// Parses `50MB/s`, `512KiB/s`, `1000000` (bytes), or `off`: decimal units (kB, MB, GB) are
/// powers of 1000, binary ones (KiB, MiB, GiB) of 1024.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let t = text.trim();
    if matches!(
        t.to_ascii_lowercase().as_str(),
        "off" | "none" | "unlimited"
    ) {
        return Ok(Rate(None));
    }
    let (value, unit) = number_and_unit(t.strip_suffix("/s").unwrap_or(t))
        .ok_or_else(|| format!("{text:?} is not a rate such as 50MB/s, 512KiB/s or off"))?;
    let scale: f64 = match unit {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (B, kB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (value * scale).round();
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("{text:?}: the rate must be at least 1 B/s"));
    }
    Ok(Rate(Some(bytes as u64)))
}

/// `12.5MB` → (12.5, "MB"): a number and the unit after it.
fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    Some((t[..split].parse().ok()?, t[split..].trim()))
}

/// A replication-lag limit (`None`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lag(pub Option<std::time::Duration>);

/// Parses `10s`, `500ms`, `2m`, `1h`, `30` (seconds), or `off`.
pub fn parse_lag(text: &str) -> Result<Lag, String> {
    let t = text.trim();
    if matches!(t.to_ascii_lowercase().as_str(), "off" | "none") {
        return Ok(Lag(None));
    }
    let (value, unit) = number_and_unit(t)
        .ok_or_else(|| format!("{text:?} is not a duration such as 10s, 500ms or 2m"))?;
    let seconds = value
        * match unit {
            "" | "s" => 1.0,
            "ms" => 0.001,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
        };
    if !(0.001..1e7).contains(&seconds) {
        return Err(format!("{text:?}: the limit must be at least 1ms"));
    }
    Ok(Lag(Some(std::time::Duration::from_secs_f64(seconds))))
}

/// Arguments of `pgzm abort`.
#[derive(Debug, Args)]
pub struct AbortArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// List what would be removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Lock behaviour (dropping a sync trigger locks its live table briefly).
    #[command(flatten)]
    pub locks: LockArgs,
}

/// Arguments of `pgzm verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Backup set (its timestamp, as `list` shows); default: the newest.
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// Arguments of `pgzm rollback`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["latest", "timestamp"])))]
pub struct RollbackArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Restore the newest backup set.
    #[arg(long)]
    pub latest: bool,
    /// Restore the backup set with this timestamp.
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// Tables that keep their current live data, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub keep_tables: Vec<String>,
    /// Print the rollback transaction, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Lock behaviour.
    #[command(flatten)]
    pub locks: LockArgs,
}

/// Arguments of `pgzm cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Drop backup sets older than this: YYYY-MM-DD, "YYYY-MM-DD HH:MM" (UTC) or epoch ms.
    #[arg(long)]
    pub before: String,
    /// List what would be dropped, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// Destination URL argument with its environment fallbacks.
#[derive(Debug, Args)]
pub struct DestArg {
    /// Destination database URL (production). Default: $DEST_DATABASE_URL, then $DATABASE_URL.
    #[arg(long, env = "DEST_DATABASE_URL", hide_env_values = true)]
    pub dest: Option<String>,
}

impl DestArg {
    /// The parsed destination.
    pub fn url(&self) -> Result<DbUrl, CoordinatorError> {
        let dest = self
            .dest
            .clone()
            .filter(|s| !s.trim().is_empty())
            .or_else(|| env_url(&["DEST_DATABASE_URL", "DATABASE_URL"]))
            .ok_or_else(|| {
                CoordinatorError::Usage(
                    "no destination database: pass --dest URL or set DEST_DATABASE_URL".into(),
                )
            })?;
        DbUrl::parse(&dest, "destination")
    }
}

/// Lock behaviour flags shared by the commands that take table locks.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// lock_timeout of each attempt to lock the live tables (swap, sync triggers), in ms.
    #[arg(long, default_value_t = 50)]
    pub lock_timeout_ms: u64,
    /// Give up after this many seconds of lock retries (nothing is changed then; exit status
    /// 75).
    #[arg(long, default_value_t = 30)]
    pub swap_timeout: u64,
    /// After this many seconds of lock retries, end (pg_terminate_backend) the sessions that
    /// hold locks on the tables, logging each, then take the locks. Off by default.
    #[arg(long, value_name = "SECS")]
    pub kill_blockers_after: Option<u64>,
}

impl LockArgs {
    /// Validates the flags into lock settings.
    pub fn settings(&self) -> Result<SwapSettings, CoordinatorError> {
        if self.lock_timeout_ms == 0 {
            return Err(CoordinatorError::Usage(
                "--lock-timeout-ms must be at least 1".into(),
            ));
        }
        if let Some(after) = self.kill_blockers_after {
            if after >= self.swap_timeout {
                return Err(CoordinatorError::Usage(format!(
                    "--kill-blockers-after {after} must be less than --swap-timeout {}",
                    self.swap_timeout
                )));
            }
        }
        Ok(SwapSettings {
            lock_timeout: Duration::from_millis(self.lock_timeout_ms),
            total_timeout: Duration::from_secs(self.swap_timeout),
            kill_blockers_after: self.kill_blockers_after.map(Duration::from_secs),
        })
    }
}

/// Arguments of `pgzm start` and `pgzm prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Source database URL (the rebuilt data). Default: $SOURCE_DATABASE_URL.
    #[arg(long, env = "SOURCE_DATABASE_URL", hide_env_values = true)]
    pub source: Option<String>,
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Schema to migrate into the destination schema of the same name; repeatable or
    /// comma-separated. Default: $PGZM_SCHEMAS, else `public`.
    #[arg(
        long = "schema",
        short = 'n',
        value_name = "NAME",
        env = "PGZM_SCHEMAS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub schemas: Vec<String>,
    /// Tables whose destination rows survive the migration, comma-separated (kept in sync with
    /// triggers until the swap): `name`, or `schema.name` (double-quote a part that contains
    /// a dot). Default: $PRESERVED_TABLES.
    #[arg(
        long,
        env = "PRESERVED_TABLES",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub preserved_tables: Vec<String>,
    /// Migrate only the tables matching this pattern (pg_dump's rules: `*`, `?`, case folded
    /// unless double-quoted, `schema.table`); repeatable. Tables left out stay as they are.
    #[arg(long = "table", short = 't', value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// Do not migrate the tables matching this pattern (they stay as they are); repeatable.
    #[arg(long = "exclude-table", short = 'T', value_name = "PATTERN")]
    pub exclude_tables: Vec<String>,
    /// Migrate the tables matching this pattern without their rows; repeatable.
    #[arg(long = "exclude-table-data", value_name = "PATTERN")]
    pub exclude_table_data: Vec<String>,
    /// Print the plan and change nothing in either database.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace a migration that is prepared and waiting for its swap.
    #[arg(long)]
    pub force: bool,
    /// Continue the interrupted run (killed, or lost its coordinator): keep its shadow tables
    /// that were copied and built, unchanged in the source since; copy the others again.
    #[arg(long, conflicts_with = "dry_run")]
    pub resume: bool,
    /// On Ctrl-C or SIGTERM while preparing: `clean` removes the run's shadow objects (the
    /// default, as for a failed run); `keep` leaves them for `--resume`.
    #[arg(long, value_enum, default_value_t = OnInterrupt::Clean)]
    pub on_interrupt: OnInterrupt,
    /// Copy tasks at once, and as many index builds beside them (default: number of CPUs).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Lock behaviour.
    #[command(flatten)]
    pub locks: LockArgs,
    /// Retries of a table copy that failed for a transient reason.
    #[arg(long, default_value_t = 2)]
    pub copy_retries: u32,
    /// maintenance_work_mem for index builds on the destination.
    #[arg(long, default_value = "256MB")]
    pub maintenance_work_mem: String,
    /// Split tables larger than this many MB (heap + TOAST) into page ranges copied in parallel.
    #[arg(long, default_value_t = 256)]
    pub range_size_mb: i64,
    /// Skip the row digests of the copy's verification (row counts are still compared).
    /// By default every row is hashed on the source side and on the destination side of its copy
    /// and a table whose digests differ is copied again.
    #[arg(long)]
    pub no_verify: bool,
    /// Limit the copy to this many bytes per second over all its tasks and agents (what it
    /// writes into production while production serves), e.g. `50MB/s`; `pgzm throttle`
    /// changes it while the run copies. Default: unlimited.
    #[arg(long, value_name = "SIZE/s", value_parser = parse_rate)]
    pub max_rate: Option<Rate>,
    /// Pause the copy (at its next chunks) while a standby of the destination lags more than
    /// this behind it, e.g. `10s`; it goes on once the standbys are within it again. `pgzm
    /// throttle` changes it while the run copies. Default: no limit.
    #[arg(long, value_name = "DURATION", value_parser = parse_lag)]
    pub max_replication_lag: Option<Lag>,
    /// Backup sets to keep after a swap, the new one included (older ones are dropped once the
    /// swap has committed, never before).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_backups: u32,
    /// Without a terminal (logs, CI, Kubernetes): log the copy's progress (percent, bytes, rate,
    /// ETA) every this many seconds; 0 turns it off. On a terminal a progress bar shows it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub progress_every: f64,
    /// Remote agents.
    #[command(flatten)]
    pub agents: AgentArgs,
    /// The migration log file.
    #[command(flatten)]
    pub log: LogFileArgs,
}

/// The migration log file of `start`, `prepare` and `swap` (not written by a dry run).
#[derive(Debug, Args)]
pub struct LogFileArgs {
    /// Write the migration log here (default: ./migration_<time>_<source db>_to_<dest db>.log
    /// for start; …_prepare_… and …_swap_<dest db>.log for prepare and swap).
    #[arg(long)]
    pub log_file: Option<std::path::PathBuf>,
    /// Do not write a migration log file.
    #[arg(long, conflicts_with = "log_file")]
    pub no_log_file: bool,
}

/// How the coordinator reaches remote agents.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A `pgzm-agent` to hand copy tasks to (repeatable): http://HOST:PORT (loopback) or
    /// https://HOST:PORT. Without any, an agent runs in-process.
    #[arg(long = "agent", value_name = "URL")]
    pub urls: Vec<String>,
    /// CA certificate (PEM) that signed the agents' server certificates.
    #[arg(long, value_name = "FILE")]
    pub agent_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) presented to agents that require one.
    #[arg(long, value_name = "FILE", requires = "agent_key")]
    pub agent_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --agent-cert.
    #[arg(long, value_name = "FILE", requires = "agent_cert")]
    pub agent_key: Option<std::path::PathBuf>,
    /// Shared token the agents require. Default: $PGZM_AGENT_TOKEN.
    #[arg(long, env = "PGZM_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Name of the source connection string the agents hold (pgzm-agent --database NAME=URL),
    /// sent instead of --source.
    #[arg(long, value_name = "NAME")]
    pub agent_source_db: Option<String>,
    /// Same for the destination.
    #[arg(long, value_name = "NAME")]
    pub agent_dest_db: Option<String>,
    /// Allow plaintext `http://` agents beyond loopback (what is sent to them, database URLs
    /// with passwords included unless --agent-source-db/--agent-dest-db are given, crosses the
    /// network in the clear).
    #[arg(long)]
    pub allow_insecure_agents: bool,
}

/// Whether the host of an `http://HOST:PORT…` agent URL is a loopback address.
pub fn is_loopback_agent(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl AgentArgs {
    /// The agent settings.
    pub fn settings(&self) -> Result<crate::agents::AgentSettings, CoordinatorError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| CoordinatorError::Usage(format!("read {}: {e}", p.display())))
        };
        let mut tls = None;
        if self.agent_ca.is_some() || self.agent_cert.is_some() {
            let mut t = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &self.agent_ca {
                t = t.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            }
            if let (Some(c), Some(k)) = (&self.agent_cert, &self.agent_key) {
                t = t.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?));
            }
            tls = Some(t);
        }
        for url in &self.urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CoordinatorError::Usage(format!(
                    "--agent {url}: expected http://HOST:PORT or https://HOST:PORT"
                )));
            }
            if url.starts_with("http://") && !is_loopback_agent(url) {
                let sends_urls = self.agent_source_db.is_none() || self.agent_dest_db.is_none();
                if !self.allow_insecure_agents {
                    return Err(CoordinatorError::Usage(format!(
                        "--agent {url}: plaintext http:// beyond loopback would carry the copy{} in the clear: use https:// (pgzm-agent --tls-cert/--tls-key) and have the agents hold the connection strings (pgzm-agent --database NAME=URL with --agent-source-db/--agent-dest-db), or pass --allow-insecure-agents",
                        if sends_urls { " and the database URLs, passwords included," } else { "" }
                    )));
                }
                tracing::warn!(agent = %url, sends_urls, "plaintext agent beyond loopback (--allow-insecure-agents)");
            }
        }
        Ok(crate::agents::AgentSettings {
            urls: self.urls.clone(),
            connector: pgzm_agent::peer::PeerConnector {
                tls,
                token: self.agent_token.clone().filter(|t| !t.is_empty()),
                compress: false,
            },
            source_database: self.agent_source_db.clone(),
            destination_database: self.agent_dest_db.clone(),
        })
    }
}

/// Arguments of `pgzm swap`.
#[derive(Debug, Args)]
pub struct SwapArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Migration id to swap (as printed by prepare); default: the newest.
    #[arg(long)]
    pub timestamp: Option<i64>,
    /// Check that the prepared migration can be swapped, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Lock behaviour.
    #[command(flatten)]
    pub locks: LockArgs,
    /// Backup sets to keep after the swap, the new one included (older ones are dropped once
    /// the swap has committed, never before).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_backups: u32,
    /// The migration log file.
    #[command(flatten)]
    pub log: LogFileArgs,
}

/// Arguments of `pgzm status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Destination.
    #[command(flatten)]
    pub dest: DestArg,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

fn env_url(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

impl PrepareArgs {
    /// Validates the arguments into run options.
    pub fn to_options(&self) -> Result<StartOptions, CoordinatorError> {
        let source = self
            .source
            .clone()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                CoordinatorError::Usage(
                    "no source database: pass --source URL or set SOURCE_DATABASE_URL".into(),
                )
            })?;
        let source = DbUrl::parse(&source, "source")?;
        let destination = self.dest.url()?;
        if source.host_port() == destination.host_port() && source.dbname() == destination.dbname()
        {
            return Err(CoordinatorError::Usage(format!(
                "source and destination are the same database ({destination}): pass two different databases"
            )));
        }
        let defaults = StartOptions::new(source, destination);
        let jobs = match self.jobs {
            Some(0) => return Err(CoordinatorError::Usage("--jobs must be at least 1".into())),
            Some(n) => n,
            None => defaults.jobs,
        };
        Ok(StartOptions {
            jobs,
            dry_run: self.dry_run,
            swap: self.locks.settings()?,
            copy_retries: self.copy_retries,
            build: BuildSettings {
                maintenance_work_mem: self.maintenance_work_mem.clone(),
            },
            schemas: schema_list(&self.schemas)?,
            preserved: crate::naming::table_list(&self.preserved_tables),
            tables: crate::filter::TableFilter::parse(
                &self.tables,
                &self.exclude_tables,
                &self.exclude_table_data,
            )
            .map_err(|e| CoordinatorError::Usage(e.to_string()))?,
            force: self.force,
            resume: self.resume,
            range_bytes: self.range_size_mb.max(1) << 20,
            verify: !self.no_verify,
            keep_backups: self.keep_backups,
            max_rate: self.max_rate.and_then(|r| r.0),
            max_replication_lag: self.max_replication_lag.and_then(|l| l.0),
            ..defaults
        })
    }
}

/// The `--schema` list: trimmed, duplicates dropped, `public` when empty. A schema name is
/// taken as written (no case folding), as in the catalog.
fn schema_list(raw: &[String]) -> Result<Vec<String>, CoordinatorError> {
    let list = crate::naming::table_list(raw);
    if let Some(bad) = list
        .iter()
        .find(|s| s.starts_with("pg_") || *s == "information_schema" || *s == "pgzm")
    {
        return Err(CoordinatorError::Usage(format!(
            "--schema {bad:?}: system schemas and pgzm's own schema cannot be migrated"
        )));
    }
    if list.is_empty() {
        return Ok(vec![crate::naming::public_schema()]);
    }
    Ok(list)
}

impl RollbackArgs {
    /// Validates the arguments into rollback options.
    pub fn to_options(&self) -> Result<crate::rollback::RollbackOptions, CoordinatorError> {
        Ok(crate::rollback::RollbackOptions {
            destination: self.dest.url()?,
            migration_id: if self.latest { None } else { self.timestamp },
            keep_tables: self.keep_tables.clone(),
            dry_run: self.dry_run,
            locks: self.locks.settings()?,
        })
    }
}

impl SwapArgs {
    /// Validates the arguments into swap options.
    pub fn to_options(&self) -> Result<SwapOptions, CoordinatorError> {
        Ok(SwapOptions {
            destination: self.dest.url()?,
            migration_id: self.timestamp,
            dry_run: self.dry_run,
            locks: self.locks.settings()?,
            keep_backups: self.keep_backups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{is_loopback_agent, parse_lag, parse_rate, Lag, Rate};

    #[test]
    fn rates_and_lags_parse_with_their_units() {
        assert_eq!(parse_rate("50MB/s"), Ok(Rate(Some(50_000_000))));
        assert_eq!(parse_rate("512KiB/s"), Ok(Rate(Some(512 * 1024))));
        assert_eq!(parse_rate("1000"), Ok(Rate(Some(1000))));
        assert_eq!(parse_rate("off"), Ok(Rate(None)));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("5 parsecs/s").is_err());
        assert!(parse_rate("0.1B/s").is_err());
        assert_eq!(
            parse_lag("500ms"),
            Ok(Lag(Some(std::time::Duration::from_millis(500))))
        );
        assert_eq!(
            parse_lag("2m"),
            Ok(Lag(Some(std::time::Duration::from_secs(120))))
        );
        assert_eq!(parse_lag("OFF"), Ok(Lag(None)));
        assert!(parse_lag("soon").is_err());
    }

    #[test]
    fn loopback_agents_are_recognised() {
        for url in [
            "http://127.0.0.1:7000",
            "http://127.9.9.9:1",
            "http://localhost:7000",
            "http://LOCALHOST:7000/",
            "http://[::1]:7000",
        ] {
            assert!(is_loopback_agent(url), "{url}");
        }
        for url in [
            "http://10.0.0.5:7000",
            "http://agent.example.com:7000",
            "http://[2001:db8::1]:7000",
            "http://127.0.0.1.example.com:7000",
            "http://localhost.example.com:7000",
        ] {
            assert!(!is_loopback_agent(url), "{url}");
        }
    }
}
