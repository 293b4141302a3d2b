//! The migration log file written beside the console output of `pgzm start` (as the original
//! tool did): outcome, times, both databases (never a password), statistics, every phase.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::CoordinatorError;
use crate::report::{rfc3339, PhaseTiming, Report, StartOptions};

/// Default log path in the working directory:
/// `migration_<YYYY-MM-DDTHH-MM-SS>_<srcdb>_to_<destdb>.log`.
pub fn default_path(started_ms: i64, opts: &StartOptions) -> PathBuf {
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
    PathBuf::from(format!(
        "migration_{stamp}_{}_to_{}.log",
        clean(opts.source.dbname()),
        clean(opts.destination.dbname())
    ))
}

/// Renders the log.
pub fn render(
    opts: &StartOptions,
    started_ms: i64,
    ended_ms: i64,
    phases: &[PhaseTiming],
    outcome: Result<&Report, &CoordinatorError>,
) -> String {
    let rule = "=".repeat(80);
    let mut s = String::new();
    let _ = writeln!(s, "{rule}\nDATABASE MIGRATION LOG\n{rule}");
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
        ("SOURCE DATABASE", &opts.source),
        ("DESTINATION DATABASE", &opts.destination),
    ] {
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
