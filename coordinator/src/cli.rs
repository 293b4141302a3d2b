//! The `pgzm` command line.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::build::BuildSettings;
use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::migrate::StartOptions;
use crate::swap::SwapSettings;

/// pg_zero_migration: replace the tables of a live PostgreSQL database with a freshly built
/// set, swapped in with one short transaction; the old tables are kept as a backup.
#[derive(Debug, Parser)]
#[command(name = "pgzm", version, about, propagate_version = true)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a whole migration: plan, build shadow tables, copy, swap.
    Start(StartArgs),
}

/// Arguments of `pgzm start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Source database URL (the rebuilt data). Default: $SOURCE_DATABASE_URL.
    #[arg(long, env = "SOURCE_DATABASE_URL", hide_env_values = true)]
    pub source: Option<String>,
    /// Destination database URL (production). Default: $DEST_DATABASE_URL, then $DATABASE_URL.
    #[arg(long, hide_env_values = true)]
    pub dest: Option<String>,
    /// Print the plan and change nothing in either database.
    #[arg(long)]
    pub dry_run: bool,
    /// Tables copied and indexed at once (default: number of CPUs).
    #[arg(long, short = 'j')]
    pub jobs: Option<usize>,
    /// Print the final report as one JSON document on stdout.
    #[arg(long)]
    pub json: bool,
    /// lock_timeout of each swap attempt, in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub lock_timeout_ms: u64,
    /// Give up the swap after this many seconds of lock retries (nothing is swapped then).
    #[arg(long, default_value_t = 30)]
    pub swap_timeout: u64,
    /// Retries of a table copy that failed for a transient reason.
    #[arg(long, default_value_t = 2)]
    pub copy_retries: u32,
    /// maintenance_work_mem for index builds on the destination.
    #[arg(long, default_value = "256MB")]
    pub maintenance_work_mem: String,
}

fn env_url(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

impl StartArgs {
    /// Validates the arguments into run options.
    pub fn into_options(self) -> Result<StartOptions, CoordinatorError> {
        let source = self
            .source
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                CoordinatorError::Usage(
                    "no source database: pass --source URL or set SOURCE_DATABASE_URL".into(),
                )
            })?;
        let dest = self
            .dest
            .or_else(|| env_url(&["DEST_DATABASE_URL", "DATABASE_URL"]))
            .ok_or_else(|| {
                CoordinatorError::Usage(
                    "no destination database: pass --dest URL or set DEST_DATABASE_URL".into(),
                )
            })?;
        let source = DbUrl::parse(&source, "source")?;
        let destination = DbUrl::parse(&dest, "destination")?;
        if source.host_port() == destination.host_port() && source.dbname() == destination.dbname()
        {
            return Err(CoordinatorError::Usage(format!(
                "source and destination are the same database ({destination}): pass two different databases"
            )));
        }
        let jobs = match self.jobs {
            Some(0) => return Err(CoordinatorError::Usage("--jobs must be at least 1".into())),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        };
        if self.lock_timeout_ms == 0 {
            return Err(CoordinatorError::Usage(
                "--lock-timeout-ms must be at least 1".into(),
            ));
        }
        Ok(StartOptions {
            source,
            destination,
            jobs,
            dry_run: self.dry_run,
            swap: SwapSettings {
                lock_timeout: Duration::from_millis(self.lock_timeout_ms),
                total_timeout: Duration::from_secs(self.swap_timeout),
            },
            copy_retries: self.copy_retries,
            build: BuildSettings {
                maintenance_work_mem: self.maintenance_work_mem,
            },
        })
    }
}
