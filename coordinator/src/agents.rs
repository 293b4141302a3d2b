//! The agents a migration uses: the in-process one (default) or remote `pgzm-agent`s reached
//! over gRPC, their placement (which side each serves) and health.
//!
//! Placement rules:
//! - an agent of side `both` runs whole tasks, connecting to both databases itself;
//! - an agent of side `destination` runs tasks too, but reads the data from a `source`-side
//!   agent's `ExportRange` stream (so the bytes cross the long link once, between agents);
//! - a `source`-side agent only serves exports.
//!
//! With `--agent-source-db NAME` / `--agent-dest-db NAME`, tasks name a connection string the
//! agents hold (`pgzm-agent --database NAME=URL`) instead of carrying the coordinator's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgzm_agent::model::{Endpoint, Target};
use pgzm_agent::peer::PeerConnector;
use pgzm_proto::agent::v1 as proto;
use pgzm_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::conninfo::DbUrl;
use crate::error::CoordinatorError;

/// How long an agent gets to answer the `Info` call that checks it is alive.
const ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a source-side agent that a task could not read from, and that does not answer
/// either, gets no exports while other source-side agents are left.
pub const SIDELINE: Duration = Duration::from_secs(30);

/// How to reach and address remote agents.
#[derive(Debug, Clone, Default)]
pub struct AgentSettings {
    /// Agent URLs (`http://host:port` on loopback, `https://host:port` elsewhere).
    pub urls: Vec<String>,
    /// TLS, shared token.
    pub connector: PeerConnector,
    /// Name of the source connection string the agents hold, instead of sending ours.
    pub source_database: Option<String>,
    /// Same for the destination.
    pub destination_database: Option<String>,
}

/// Which databases an agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSide {
    /// Both: runs whole tasks.
    Both,
    /// Near the source: serves exports.
    Source,
    /// Near the destination: runs tasks, reading from a source-side agent.
    Destination,
}

/// What an agent said about itself, checked: the domain form of `proto::InfoResponse`.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Its crate version (for messages).
    pub agent_version: String,
    /// Copy tasks it runs at once (at least 1).
    pub capacity: u32,
    /// Which databases it serves.
    pub side: AgentSide,
    /// Placement label.
    pub region: String,
    /// Names of the connection strings it holds.
    pub databases: Vec<String>,
    /// The address other agents use to reach it, when it says.
    pub advertise_url: Option<String>,
}

impl TryFrom<proto::InfoResponse> for AgentInfo {
    type Error = String;

    fn try_from(r: proto::InfoResponse) -> Result<Self, String> {
        let side = match proto::Side::try_from(r.side) {
            Ok(proto::Side::Both) => AgentSide::Both,
            Ok(proto::Side::Source) => AgentSide::Source,
            Ok(proto::Side::Destination) => AgentSide::Destination,
            Ok(proto::Side::Unspecified) => {
                return Err(
                    "does not say which side it serves: run the same version on both".into(),
                )
            }
            Err(_) => {
                return Err(format!(
                    "reports side {}, which this pgzm does not know: run the same version on both",
                    r.side
                ))
            }
        };
        if r.max_concurrent_tasks == 0 && side != AgentSide::Source {
            return Err("reports no task slots (--max-tasks 0?)".into());
        }
        Ok(AgentInfo {
            agent_version: r.agent_version,
            capacity: r.max_concurrent_tasks.max(1),
            side,
            region: r.region,
            databases: r.databases,
            advertise_url: Some(r.advertise_url).filter(|u| !u.is_empty()),
        })
    }
}

/// One agent.
pub struct AgentHandle {
    /// URL, or "in-process".
    pub label: String,
    /// Its position in the pool (tags its database sessions).
    pub index: usize,
    /// Client.
    pub client: AgentClient<Channel>,
    /// What it said about itself.
    pub info: AgentInfo,
    /// Address peers use to reach it.
    pub peer_url: String,
}

impl AgentHandle {
    /// Its side.
    pub fn side(&self) -> AgentSide {
        self.info.side
    }
}

/// The agents of a migration.
pub struct AgentPool {
    /// Agents.
    pub agents: Vec<Arc<AgentHandle>>,
    /// Request decoration (token).
    pub connector: PeerConnector,
    source_database: Option<String>,
    destination_database: Option<String>,
    next_source: AtomicUsize,
    /// Source-side agents given no exports until then, by index (see [`AgentPool::check_source`]).
    sidelined: Mutex<HashMap<usize, Instant>>,
}

async fn info(
    client: &mut AgentClient<Channel>,
    connector: &PeerConnector,
    label: &str,
) -> Result<AgentInfo, CoordinatorError> {
    let info = pgzm_agent::telemetry::traced_call("Info", label, || {
        client.info(connector.request(proto::InfoRequest {
            protocol_version: pgzm_proto::PROTOCOL_VERSION,
        }))
    })
    .await
        .map_err(|s| {
            let mut message = status_message(&s);
            // With TLS 1.3 a server that rejects the client's certificate (or its absence)
            // does so after the client considers the handshake done: the first call only sees
            // the connection closing.
            if std::error::Error::source(&s).is_some() {
                if label.starts_with("https://") {
                    message.push_str(
                        " (the agent closed the TLS connection: if it runs with --tls-client-ca it requires a client certificate issued by that CA: give --agent-cert and --agent-key)",
                    );
                } else if label.starts_with("http://") {
                    message.push_str(" (if the agent runs with --tls-cert, use an https:// URL)");
                }
            }
            CoordinatorError::Agent {
                agent: label.to_string(),
                message,
            }
        })?
        .into_inner();
    if info.protocol_version != pgzm_proto::PROTOCOL_VERSION {
        return Err(CoordinatorError::Agent {
            agent: label.to_string(),
            message: format!(
                "speaks protocol {} (pgzm-agent {}), this pgzm speaks {} ({}): run the same version on both",
                info.protocol_version,
                info.agent_version,
                pgzm_proto::PROTOCOL_VERSION,
                env!("CARGO_PKG_VERSION")
            ),
        });
    }
    AgentInfo::try_from(info).map_err(|message| CoordinatorError::Agent {
        agent: label.to_string(),
        message,
    })
}

impl AgentPool {
    /// The in-process agent, behind the same gRPC client as a remote one.
    pub async fn in_process(jobs: usize) -> Result<AgentPool, CoordinatorError> {
        let client =
            pgzm_agent::service::AgentService::new(u32::try_from(jobs).unwrap_or(u32::MAX))
                .into_in_process_client()
                .await
                .map_err(|e| CoordinatorError::Agent {
                    agent: "in-process".into(),
                    message: e.to_string(),
                })?;
        Self::from_client(client).await
    }

    /// A pool of one agent reached through `client` (e.g. an in-process one).
    pub async fn from_client(
        mut client: AgentClient<Channel>,
    ) -> Result<AgentPool, CoordinatorError> {
        let connector = PeerConnector::default();
        let info = info(&mut client, &connector, "in-process").await?;
        Ok(AgentPool {
            agents: vec![Arc::new(AgentHandle {
                label: "in-process".into(),
                index: 0,
                client,
                info,
                peer_url: String::new(),
            })],
            connector,
            source_database: None,
            destination_database: None,
            next_source: AtomicUsize::new(0),
            sidelined: Mutex::default(),
        })
    }

    /// Connects to remote agents and checks their versions and placement.
    pub async fn connect(settings: &AgentSettings) -> Result<AgentPool, CoordinatorError> {
        let mut agents = Vec::new();
        for url in &settings.urls {
            let mut client =
                settings
                    .connector
                    .connect(url)
                    .await
                    .map_err(|e| CoordinatorError::Agent {
                        agent: url.clone(),
                        message: format!("cannot connect: {}", transport_message(&e)),
                    })?;
            let info = info(&mut client, &settings.connector, url).await?;
            let peer_url = info.advertise_url.clone().unwrap_or_else(|| url.clone());
            info!(agent = %url, side = ?info.side, region = %info.region, capacity = info.capacity, "agent ready");
            agents.push(Arc::new(AgentHandle {
                label: url.clone(),
                index: agents.len(),
                client,
                info,
                peer_url,
            }));
        }
        let pool = AgentPool {
            agents,
            connector: settings.connector.clone(),
            source_database: settings.source_database.clone(),
            destination_database: settings.destination_database.clone(),
            next_source: AtomicUsize::new(0),
            sidelined: Mutex::default(),
        };
        if pool.executors().is_empty() {
            return Err(CoordinatorError::Usage(
                "no agent can run copy tasks: give at least one agent of side `both` or `destination`".into(),
            ));
        }
        if pool
            .executors()
            .iter()
            .any(|a| a.side() == AgentSide::Destination)
            && pool.sources().is_empty()
        {
            return Err(CoordinatorError::Usage(
                "destination-side agents need a source-side agent to read from: add one with --agent".into(),
            ));
        }
        Ok(pool)
    }

    /// Agents that run copy tasks.
    pub fn executors(&self) -> Vec<Arc<AgentHandle>> {
        self.agents
            .iter()
            .filter(|a| a.side() != AgentSide::Source)
            .cloned()
            .collect()
    }

    fn sources(&self) -> Vec<Arc<AgentHandle>> {
        self.agents
            .iter()
            .filter(|a| a.side() == AgentSide::Source)
            .cloned()
            .collect()
    }

    /// Total task slots of the executors.
    pub fn capacity(&self) -> usize {
        self.executors()
            .iter()
            .map(|a| a.info.capacity as usize)
            .sum()
    }

    /// A source-side agent to read from (round robin over those not sidelined), for tasks on a
    /// destination-side agent.
    pub fn source_peer(&self) -> Option<String> {
        let sources = self.sources();
        if sources.is_empty() {
            return None;
        }
        let now = Instant::now();
        let up: Vec<&Arc<AgentHandle>> = {
            let sidelined = self.sidelined.lock().unwrap_or_else(|p| p.into_inner());
            sources
                .iter()
                .filter(|a| sidelined.get(&a.index).is_none_or(|until| *until <= now))
                .collect()
        };
        // Every one sidelined: they all take turns again (a task that may fail and be retried
        // rather than none).
        let turns: Vec<&Arc<AgentHandle>> = if up.is_empty() {
            sources.iter().collect()
        } else {
            up
        };
        let n = self.next_source.fetch_add(1, Ordering::Relaxed) % turns.len();
        Some(turns[n].peer_url.clone())
    }

    /// Whether `agent` answers an `Info` call within [`ALIVE_TIMEOUT`].
    pub async fn answers(&self, agent: &AgentHandle) -> bool {
        let mut client = agent.client.clone();
        pgzm_agent::telemetry::traced_call("Info", &agent.label, || {
            let call = client.info(self.connector.request(proto::InfoRequest {
                protocol_version: pgzm_proto::PROTOCOL_VERSION,
            }));
            async {
                tokio::time::timeout(ALIVE_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
            }
        })
        .await
        .is_ok()
    }

    /// After a task could not read from the source-side agent at `peer_url`: if it does not
    /// answer either and other source-side agents exist, it gets no exports for [`SIDELINE`].
    /// Without this, a dead source-side agent keeps its turn in the round robin and fails
    /// every other task, each failure spending a retry.
    pub async fn check_source(&self, peer_url: &str) {
        let sources = self.sources();
        if sources.len() < 2 {
            return;
        }
        let Some(agent) = sources.iter().find(|a| a.peer_url == peer_url) else {
            return;
        };
        if self.answers(agent).await {
            return;
        }
        self.sidelined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(agent.index, Instant::now() + SIDELINE);
        warn!(agent = %agent.label, seconds = SIDELINE.as_secs(), "a source-side agent does not answer: the other source-side agents serve the exports meanwhile");
    }

    /// The endpoint tasks use for `url`'s database, their sessions named `application_name`.
    pub fn endpoint(&self, url: &DbUrl, destination: bool, application_name: &str) -> Endpoint {
        let named = if destination {
            &self.destination_database
        } else {
            &self.source_database
        };
        Endpoint {
            target: match named {
                Some(name) => Target::Database(name.clone()),
                None => Target::Url(url.expose()),
            },
            application_name: application_name.to_string(),
        }
    }

    /// Checks that every agent reaches the databases its side needs, before any change. Returns
    /// the roles the agents' destination connections have (remote agents only: the in-process
    /// agent connects as the coordinator).
    pub async fn check_reach(
        &self,
        source: &DbUrl,
        destination: &DbUrl,
    ) -> Result<Vec<String>, CoordinatorError> {
        let mut roles = Vec::new();
        for a in &self.agents {
            if a.label == "in-process" {
                continue;
            }
            let mut wanted = Vec::new();
            if a.side() != AgentSide::Destination {
                wanted.push(("source", self.endpoint(source, false, "pgzm-agent")));
            }
            if a.side() != AgentSide::Source {
                wanted.push((
                    "destination",
                    self.endpoint(destination, true, "pgzm-agent"),
                ));
            }
            let mut client = a.client.clone();
            let results = pgzm_agent::telemetry::traced_call("Probe", &a.label, || {
                client.probe(self.connector.request(proto::ProbeRequest {
                    endpoints: wanted.iter().map(|(_, e)| e.clone().into()).collect(),
                }))
            })
            .await
            .map_err(|s| CoordinatorError::Agent {
                agent: a.label.clone(),
                message: status_message(&s),
            })?
            .into_inner()
            .results;
            for ((side, _), r) in wanted.iter().zip(results) {
                if !r.ok {
                    return Err(CoordinatorError::Agent {
                        agent: a.label.clone(),
                        message: format!("cannot reach the {side} database: {}", r.message),
                    });
                }
                if *side == "destination" && !r.role.is_empty() && !roles.contains(&r.role) {
                    roles.push(r.role);
                }
            }
        }
        Ok(roles)
    }
}

/// A transport error's message with its causes (tonic's own Display is terse).
pub fn transport_message(e: &tonic::transport::Error) -> String {
    with_causes(e.to_string(), std::error::Error::source(e))
}

/// The message of a status an agent call ended with. A status made by the client's transport
/// (the agent unreachable, the TLS handshake refused) carries only "transport error": its
/// causes are appended.
pub fn status_message(s: &tonic::Status) -> String {
    with_causes(s.message().to_string(), std::error::Error::source(s))
}

use pgzm_pg::conn::with_causes;

#[cfg(test)]
mod info_tests {
    use super::*;

    fn response(side: i32, slots: u32) -> proto::InfoResponse {
        proto::InfoResponse {
            protocol_version: pgzm_proto::PROTOCOL_VERSION,
            agent_version: "0".into(),
            max_concurrent_tasks: slots,
            side,
            ..proto::InfoResponse::default()
        }
    }

    #[test]
    fn agent_info_is_checked_on_receipt() {
        let ok = AgentInfo::try_from(response(proto::Side::Destination as i32, 4)).unwrap();
        assert_eq!(
            (ok.side, ok.capacity, ok.advertise_url),
            (AgentSide::Destination, 4, None)
        );
        let unspecified = AgentInfo::try_from(response(0, 4)).unwrap_err();
        assert!(unspecified.contains("which side"), "{unspecified}");
        let unknown = AgentInfo::try_from(response(42, 4)).unwrap_err();
        assert!(unknown.contains("side 42"), "{unknown}");
        let no_slots = AgentInfo::try_from(response(proto::Side::Both as i32, 0)).unwrap_err();
        assert!(no_slots.contains("no task slots"), "{no_slots}");
        assert!(AgentInfo::try_from(response(proto::Side::Source as i32, 0)).is_ok());
    }

    /// A pool of `sides` whose clients point nowhere (never called).
    fn pool(sides: &[AgentSide]) -> AgentPool {
        let agents = sides
            .iter()
            .enumerate()
            .map(|(index, side)| {
                let url = format!("http://127.0.0.1:{}", 1 + index);
                let channel = tonic::transport::Endpoint::from_shared(url.clone())
                    .expect("url")
                    .connect_lazy();
                Arc::new(AgentHandle {
                    label: url.clone(),
                    index,
                    client: AgentClient::new(channel),
                    info: AgentInfo {
                        agent_version: "0".into(),
                        capacity: 1,
                        side: *side,
                        region: String::new(),
                        databases: Vec::new(),
                        advertise_url: None,
                    },
                    peer_url: url,
                })
            })
            .collect();
        AgentPool {
            agents,
            connector: PeerConnector::default(),
            source_database: None,
            destination_database: None,
            next_source: AtomicUsize::new(0),
            sidelined: Mutex::default(),
        }
    }

    #[tokio::test]
    async fn a_sidelined_source_gets_no_exports_while_another_is_left() {
        use AgentSide::{Destination, Source};
        let p = pool(&[Destination, Source, Source]);
        let turns = |n: usize| (0..n).map(|_| p.source_peer().expect("a source")).collect();
        let both: std::collections::BTreeSet<String> = turns(4);
        assert_eq!(both.len(), 2, "round robin over both: {both:?}");
        p.sidelined
            .lock()
            .unwrap()
            .insert(1, Instant::now() + SIDELINE);
        let left: std::collections::BTreeSet<String> = turns(4);
        assert_eq!(
            left.into_iter().collect::<Vec<_>>(),
            vec!["http://127.0.0.1:3".to_string()]
        );
        // Both sidelined: both take turns again rather than none.
        p.sidelined
            .lock()
            .unwrap()
            .insert(2, Instant::now() + SIDELINE);
        assert_eq!(turns(4).len(), 2);
        // Its time over, an agent is back in the round robin.
        p.sidelined.lock().unwrap().clear();
        p.sidelined.lock().unwrap().insert(1, Instant::now());
        assert_eq!(turns(4).len(), 2);
    }
}
