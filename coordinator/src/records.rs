//! What a run records about the objects it created (stored as JSON in `pgzm.migrations`): plain
//! data, shared by the plan (earlier runs' leftovers), the phases that create objects and the
//! state store that cleans them up.

use serde::{Deserialize, Serialize};

use crate::catalog::Oid;

/// Objects a run created in the destination before its swap, with their oids.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RecordedObjects {
    /// Shadow tables (name, oid).
    pub tables: Vec<(String, Oid)>,
    /// Shadow types (name, oid).
    pub types: Vec<(String, Oid)>,
    /// Shadow sequences not owned by a shadow table (name, oid).
    pub sequences: Vec<(String, Oid)>,
    /// Shadow index names (dropped with their tables).
    pub indexes: Vec<String>,
    /// Functions created for the new tables' triggers (regprocedure text).
    pub functions: Vec<String>,
    /// Live tables carrying sync triggers (name, oid).
    #[serde(default)]
    pub sync_triggers: Vec<(String, Oid)>,
    /// Sync trigger functions (qualified, quoted; no arguments).
    #[serde(default)]
    pub sync_functions: Vec<String>,
    /// Shadow materialized views (schema, name, oid).
    #[serde(default)]
    pub matviews: Vec<(String, String, Oid)>,
    /// Schemas the run created in the destination (dropped with its shadow objects when they
    /// are empty then).
    #[serde(default)]
    pub schemas: Vec<String>,
}

/// The status of a run, as `pgzm.migrations.status` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Creating its shadow set and copying (or interrupted while doing so).
    Preparing,
    /// Its shadow set is complete and waits for the swap.
    Prepared,
    /// Swapped: its backup set holds the previous live objects.
    Swapped,
    /// Failed before its swap; its objects were removed (or are recorded for removal).
    Failed,
    /// Its backup set was restored by a rollback.
    RolledBack,
}

impl RunStatus {
    /// Every status.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Preparing,
        RunStatus::Prepared,
        RunStatus::Swapped,
        RunStatus::Failed,
        RunStatus::RolledBack,
    ];

    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Preparing => "preparing",
            RunStatus::Prepared => "prepared",
            RunStatus::Swapped => "swapped",
            RunStatus::Failed => "failed",
            RunStatus::RolledBack => "rolled_back",
        }
    }

    /// The status stored as `text`, if it is one.
    pub fn parse(text: &str) -> Option<RunStatus> {
        RunStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_back_as_stored() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(RunStatus::parse("swapping"), None);
    }
}
