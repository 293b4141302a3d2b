//! `--json` as a contract: every document printed on stdout is one object carrying
//! `schema_version`, `command` and `outcome` beside its fields; a failed command prints an
//! error document. Keys are snake_case, timestamps RFC 3339 (UTC), durations in milliseconds
//! or seconds rounded to the millisecond. The JSON Schema of each document is generated from
//! these types ([`schemas`]) and kept in `docs/json-schema/`.

use serde::Serialize;

/// Version of the documents' shape: raised when a field is removed or changes meaning (new
/// fields may appear without it).
pub const SCHEMA_VERSION: u32 = 1;

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did what was asked.
    Ok,
    /// `--dry-run`: it says what it would do and changed nothing.
    DryRun,
    /// `verify`: the backup set is not valid (exit status 1).
    Invalid,
    /// It failed: see `error` (the exit status is in it).
    Error,
}

/// One `--json` document: the envelope and the command's own fields.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Document<T> {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// The command (`start`, `prepare`, `swap`, `status`, `list`, `verify`, `rollback`,
    /// `cleanup`, `abort`).
    pub command: String,
    /// How it ended.
    pub outcome: Outcome,
    /// The command's own fields.
    #[serde(flatten)]
    pub body: T,
}

impl<T> Document<T> {
    /// `body` of `command`, ended with `outcome`.
    pub fn new(command: &str, outcome: Outcome, body: T) -> Self {
        Document {
            schema_version: SCHEMA_VERSION,
            command: command.to_string(),
            outcome,
            body,
        }
    }
}

/// `list`: the backup sets, newest first.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct BackupSets {
    /// The backup sets.
    pub backup_sets: Vec<crate::backup::BackupSet>,
}

/// A failed command's fields.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Failure {
    /// What failed.
    pub error: ErrorDetail,
}

/// What failed, and what to do.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct ErrorDetail {
    /// The one-line message (the same as on stderr, without the `pgzm: error:` prefix).
    pub message: String,
    /// The process's exit status: 1, 2 (usage), 75 (retry later).
    pub exit_status: u8,
}

/// Rounds seconds to the millisecond (for `f64` fields of documents).
pub fn round_ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

/// Serializes an `f64` of seconds rounded to the millisecond.
pub fn rounded<S: serde::Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(round_ms(*value))
}

/// Serializes an optional `f64` of seconds rounded to the millisecond.
pub fn rounded_opt<S: serde::Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.serialize_some(&round_ms(*v)),
        None => s.serialize_none(),
    }
}

/// The JSON Schema of every document, by file name (`<command>.json`; the error document as
/// `error.json`), for the serialized form.
pub fn schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn schema<T: schemars::JsonSchema>() -> serde_json::Value {
        let generator = schemars::generate::SchemaSettings::draft2020_12()
            .for_serialize()
            .into_generator();
        serde_json::to_value(generator.into_root_schema_for::<T>()).unwrap_or_default()
    }
    use crate::report::Report;
    vec![
        ("start.json", schema::<Document<Report>>()),
        ("prepare.json", schema::<Document<Report>>()),
        ("swap.json", schema::<Document<Report>>()),
        ("status.json", schema::<Document<crate::status::Status>>()),
        ("list.json", schema::<Document<BackupSets>>()),
        (
            "verify.json",
            schema::<Document<crate::backup::Verification>>(),
        ),
        (
            "rollback.json",
            schema::<Document<crate::rollback::RollbackReport>>(),
        ),
        ("cleanup.json", schema::<Document<crate::backup::Cleanup>>()),
        ("abort.json", schema::<Document<crate::state::Aborted>>()),
        (
            "throttle.json",
            schema::<Document<crate::state::Throttled>>(),
        ),
        ("error.json", schema::<Document<Failure>>()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/json-schema/` holds what [`schemas`] generates (`PGZM_UPDATE_SCHEMAS=1` rewrites it).
    #[test]
    fn the_documented_schemas_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json-schema");
        let update = std::env::var_os("PGZM_UPDATE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in schemas() {
            let text = serde_json::to_string_pretty(&schema).expect("schema") + "\n";
            let path = dir.join(name);
            if update {
                std::fs::create_dir_all(&dir).expect("create docs/json-schema");
                std::fs::write(&path, &text).expect("write schema");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "docs/json-schema is not what the types generate ({stale:?}): run `PGZM_UPDATE_SCHEMAS=1 ./dev/test -p pgzm-coordinator --lib document` and commit it"
        );
    }

    #[test]
    fn every_document_carries_the_envelope() {
        for (name, schema) in schemas() {
            let required = schema["required"].as_array().cloned().unwrap_or_default();
            for key in ["schema_version", "command", "outcome"] {
                assert!(
                    required.iter().any(|r| r == key),
                    "{name} lacks {key}: {schema}"
                );
            }
            let text = schema.to_string();
            assert!(!text.contains("tableCount"), "{name}: camelCase key");
        }
    }
}
