//! What a run records about the objects it created (stored as JSON in `pgzm.migrations`): plain
//! data, shared by the plan (earlier runs' leftovers), the phases that create objects and the
//! state store that cleans them up.

use serde::{Deserialize, Serialize};

use crate::catalog::Oid;

/// Objects a run created in the destination before its swap, with their oids.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
}
