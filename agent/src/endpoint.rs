//! Where an agent's connections go: connection strings sent in tasks, or named ones the agent
//! holds itself (`--database NAME=URL`), so credentials need not travel.
//!
//! An agent that holds named databases connects to those only: a connection string from a
//! caller is refused, so a token holder cannot use the agent to reach (or probe the ports of)
//! other servers on its network.

use std::collections::BTreeMap;

use crate::pg::PgTarget;

use crate::error::{AgentError, Side};
use crate::model::{Endpoint, Target};
use crate::pg;

/// Named connection strings held by the agent.
#[derive(Clone, Default)]
pub struct Databases {
    named: BTreeMap<String, PgTarget>,
}

impl std::fmt::Debug for Databases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.named.keys()).finish()
    }
}

impl Databases {
    /// Parses `NAME=URL` definitions. The error never repeats the URL.
    pub fn parse(definitions: &[String]) -> Result<Databases, String> {
        let mut named = BTreeMap::new();
        for d in definitions {
            let (name, url) = d
                .split_once('=')
                .filter(|(n, _)| !n.trim().is_empty())
                .ok_or_else(|| "--database takes NAME=URL".to_string())?;
            let config = pg::parse_config(url.trim())
                .map_err(|m| format!("--database {}: {m}", name.trim()))?;
            named.insert(name.trim().to_string(), config);
        }
        Ok(Databases { named })
    }

    /// Names held.
    pub fn names(&self) -> Vec<String> {
        self.named.keys().cloned().collect()
    }

    /// Resolves an endpoint to a connection config and application name.
    pub fn resolve(&self, side: Side, e: &Endpoint) -> Result<(PgTarget, String), AgentError> {
        let config = match &e.target {
            Target::Url(_) if !self.named.is_empty() => {
                let flag = match side {
                    Side::Source => "--agent-source-db",
                    Side::Destination => "--agent-dest-db",
                };
                return Err(AgentError::Refused(format!(
                    "this agent connects only to the databases it holds ({}); the caller sent a {side} connection string: give the coordinator {flag} NAME",
                    self.names().join(", ")
                )));
            }
            Target::Url(url) => pg::parse_config(url)
                .map_err(|message| AgentError::InvalidConnection { side, message })?,
            Target::Database(name) => self.named.get(name).cloned().ok_or_else(|| {
                AgentError::InvalidTask(format!(
                    "this agent holds no database named \"{name}\" (it has: {})",
                    self.names().join(", ")
                ))
            })?,
        };
        Ok((config, e.application_name.clone()))
    }
}
