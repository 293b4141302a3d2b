//! Finding the PostgreSQL server binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::HarnessError;

/// The binaries a cluster needs.
const REQUIRED: [&str; 2] = ["initdb", "postgres"];

/// Finds the directory holding `initdb` and `postgres`.
///
/// Order: `$PG_BINDIR` (an error if set but incomplete), then `pg_config --bindir`, then the
/// highest-numbered `/usr/lib/postgresql/*/bin`.
pub(crate) fn find_bindir() -> Result<PathBuf, HarnessError> {
    let mut searched = Vec::new();

    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_binaries(&dir) {
            return Ok(dir);
        }
        return Err(HarnessError::BinariesNotFound {
            searched: format!("PG_BINDIR={} lacks initdb or postgres", dir.display()),
        });
    }
    searched.push("PG_BINDIR unset".to_string());

    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_binaries(&dir) {
                return Ok(dir);
            }
            searched.push(format!("pg_config --bindir = {}", dir.display()));
        }
        Ok(out) => searched.push(format!("pg_config --bindir failed ({})", out.status)),
        Err(e) => searched.push(format!("pg_config not runnable ({e})")),
    }

    let root = Path::new("/usr/lib/postgresql");
    if let Some(dir) = highest_versioned_bindir(root) {
        return Ok(dir);
    }
    searched.push(format!("{}/*/bin", root.display()));

    Err(HarnessError::BinariesNotFound {
        searched: searched.join("; "),
    })
}

/// Whether `dir` holds every required binary.
fn has_binaries(dir: &Path) -> bool {
    REQUIRED.iter().all(|b| dir.join(b).is_file())
}

/// The `<root>/<version>/bin` with the highest numeric version that holds the binaries.
fn highest_versioned_bindir(root: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let version = parse_version(&name)?;
            let bin = e.path().join("bin");
            has_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// Parses "15" or "9.6" into comparable numbers.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|p| p.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("10").expect("10") > parse_version("9.6").expect("9.6"));
        assert!(parse_version("main").is_none());
    }
}
