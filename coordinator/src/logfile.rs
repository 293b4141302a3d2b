//! The migration log file written beside the console output of `pgzm start`, `prepare` and
//! `swap` (as the original tool did): pgzm's version and the command line (passwords
//! redacted), outcome, times, both databases (never a password), statistics, every phase.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;
use crate::report::{rfc3339, PhaseTiming, Report};

/// What the log is about: the command and its databases.
#[derive(Debug, Clone, Copy)]
pub struct LogContext<'a> {
    /// `start`, `prepare` or `swap`.
    pub command: &'a str,
    /// The source (none for `swap`).
    pub source: Option<&'a DbUrl>,
    /// The destination.
    pub destination: &'a DbUrl,
}

impl<'a> LogContext<'a> {
    /// The log of a `start` or `prepare` run with `opts`.
    pub fn run(command: &'a str, opts: &'a crate::report::StartOptions) -> Self {
        LogContext {
            command,
            source: Some(&opts.source),
            destination: &opts.destination,
        }
    }
}

/// The process's command line with every password redacted: a database URL shows as
/// `user@host:port/db`, a `password=` setting as `password=***`.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| redact(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One argument without its password.
pub fn redact(arg: &str) -> String {
    if let Some((flag, value)) = arg.split_once('=').filter(|(f, _)| f.starts_with("--")) {
        return format!("{flag}={}", redact(value));
    }
    if arg.contains("://") {
        return match DbUrl::parse(arg, "database") {
            Ok(url) => url.to_string(),
            Err(_) => "<database URL>".to_string(),
        };
    }
    if arg.contains("password") {
        return arg
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=***"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    arg.to_string()
}

/// Default log path in the working directory:
/// `migration_<YYYY-MM-DDTHH-MM-SS>_<srcdb>_to_<destdb>.log` for `start`,
/// `…_prepare_<srcdb>_to_<destdb>.log` and `…_swap_<destdb>.log`.
pub fn default_path(started_ms: i64, ctx: LogContext<'_>) -> PathBuf {
    let stamp: String = rfc3339(started_ms)
        .chars()
        .take(19)
        .map(|c| if c == ':' { '-' } else { c })
        .collect();
    let clean = |s: &str| {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
    };
    // `start` keeps the original tool's name; the others name their command.
    let command = if ctx.command == "start" {
        String::new()
    } else {
        format!("{}_", ctx.command)
    };
    match ctx.source {
        Some(source) => PathBuf::from(format!(
            "migration_{stamp}_{command}{}_to_{}.log",
            clean(source.dbname()),
            clean(ctx.destination.dbname())
        )),
        None => PathBuf::from(format!(
            "migration_{stamp}_{}_{}.log",
            ctx.command,
            clean(ctx.destination.dbname())
        )),
    }
}

/// Renders the log.
pub fn render(
    ctx: LogContext<'_>,
    started_ms: i64,
    ended_ms: i64,
    phases: &[PhaseTiming],
    outcome: Result<&Report, &CoordinatorError>,
) -> String {
    let rule = "=".repeat(80);
    let mut s = String::new();
    let _ = writeln!(s, "{rule}\nDATABASE MIGRATION LOG\n{rule}");
    let _ = writeln!(s, "pgzm {} ({})", env!("CARGO_PKG_VERSION"), ctx.command);
    let _ = writeln!(s, "Command: {}", command_line());
    let _ = writeln!(
        s,
        "Migration Outcome: {}",
        if outcome.is_ok() { "SUCCESS" } else { "FAILED" }
    );
    if let Ok(r) = outcome {
        let _ = writeln!(
            s,
            "Migration ID: {}{}",
            r.migration_id,
            if r.dry_run { " (dry run)" } else { "" }
        );
    }
    let _ = writeln!(s, "Start Time: {}", rfc3339(started_ms));
    let _ = writeln!(s, "End Time: {}", rfc3339(ended_ms));
    let _ = writeln!(
        s,
        "Duration: {:.3}s\n",
        (ended_ms - started_ms) as f64 / 1000.0
    );
    for (title, url) in [
        ("SOURCE DATABASE", ctx.source),
        ("DESTINATION DATABASE", Some(ctx.destination)),
    ] {
        let Some(url) = url else {
            continue;
        };
        let _ = writeln!(
            s,
            "{title}\n  Host: {}\n  Database: {}\n  User: {}\n",
            url.host_port(),
            url.dbname(),
            url.user().unwrap_or("(default)")
        );
    }
    // Preserved tables are not copied (they keep the destination's rows) but are processed.
    let preserved: Vec<&str> = match outcome {
        Ok(r) if !r.dry_run => r.plan.preserved.iter().map(|p| p.table.as_str()).collect(),
        _ => Vec::new(),
    };
    let (tables, rows, bytes, warnings, lock) = match outcome {
        Ok(r) => (
            r.tables.len(),
            r.rows,
            r.bytes,
            r.warnings.clone(),
            r.swap.map(|s| s.lock_held_us),
        ),
        Err(_) => (0, 0, 0, Vec::new(), None),
    };
    let errors: Vec<String> = outcome
        .err()
        .map(|e| vec![e.to_string()])
        .unwrap_or_default();
    let _ = writeln!(s, "STATISTICS");
    if preserved.is_empty() {
        let _ = writeln!(s, "  Tables Processed: {tables}");
    } else {
        let _ = writeln!(
            s,
            "  Tables Processed: {} ({tables} copied, {} preserved)",
            tables + preserved.len(),
            preserved.len()
        );
    }
    let _ = writeln!(s, "  Records Migrated: {rows}");
    let _ = writeln!(s, "  Bytes Migrated: {bytes}");
    if let Some(us) = lock {
        let _ = writeln!(s, "  Swap Lock Held: {:.1} ms", us as f64 / 1000.0);
    }
    let _ = writeln!(s, "  Warnings: {}", warnings.len());
    let _ = writeln!(s, "  Errors: {}\n", errors.len());
    let _ = writeln!(s, "{rule}\nMIGRATION LOG DETAILS\n{rule}");
    for p in phases {
        let _ = writeln!(
            s,
            "[{}] phase {:<22} {:>8} ms",
            p.started_at, p.phase, p.duration_ms
        );
    }
    if let Ok(r) = outcome {
        for t in &r.tables {
            let _ = writeln!(
                s,
                "  table {:<40} {:>12} rows {:>14} bytes {:>8} ms",
                format!("\"{}\"", t.table),
                t.rows,
                t.bytes,
                t.copy_ms
            );
        }
    }
    for t in &preserved {
        let _ = writeln!(
            s,
            "  table {:<40} preserved: the destination's rows were kept",
            format!("\"{t}\"")
        );
    }
    for w in &warnings {
        let _ = writeln!(s, "WARNING: {w}");
    }
    for e in &errors {
        let _ = writeln!(s, "ERROR: {e}");
    }
    let _ = writeln!(s, "{rule}\nEND OF MIGRATION LOG\n{rule}");
    s
}

/// Writes the log; a failure to write is returned for the caller to report as a warning.
pub fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}
