//! What the agent says about itself: the standard `grpc.health.v1.Health` service, SERVING
//! while it takes tasks and NOT_SERVING from the moment it drains (a SIGTERM: no new tasks,
//! running ones finish), and a log of refused calls that an attacker cannot flood.
//!
//! The health service answers on the agent's own port (behind its TLS) and, for probes that
//! cannot speak TLS (Kubernetes' gRPC probes), on a plaintext port of its own
//! (`pgzm-agent --health-listen`) that serves nothing else.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The agent's service name, as health checks ask for it.
pub const AGENT_SERVICE: &str = "pgzm.agent.v1.Agent";

/// Sets what the health service answers (for the whole server, `""`, and for the agent).
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// The reporter and the gRPC service it drives, SERVING until [`Health::draining`].
    pub async fn new() -> (
        Health,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let health = Health { reporter };
        health.set(ServingStatus::Serving).await;
        (health, service)
    }

    /// From now on the agent takes no new tasks: NOT_SERVING.
    pub async fn draining(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        for service in ["", AGENT_SERVICE] {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// gRPC server reflection (v1) of the agent's and the health service's APIs, for tools such as
/// `grpcurl` (served on the agent's port).
pub fn reflection() -> Result<
    tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer<
        impl tonic_reflection::pb::v1::server_reflection_server::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pgzm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
}

/// How often a refusal of the same kind is logged: the first at once, then at most one line
/// per interval, with the number of refusals left out meanwhile.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Logs refused calls (a missing or wrong token), rate-limited.
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// Records one refused call from `peer` for `reason`; logs it unless a refusal was logged
    /// less than [`REFUSAL_LOG_INTERVAL`] ago.
    pub fn refused(&self, peer: Option<SocketAddr>, reason: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .last
            .is_some_and(|at| now.duration_since(at) < REFUSAL_LOG_INTERVAL)
        {
            state.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut state.suppressed);
        state.last = Some(now);
        drop(state);
        let peer = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
        tracing::warn!(
            peer = %peer,
            reason,
            suppressed_since_last = suppressed,
            "refused a call"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let log = RefusalLog::default();
        for _ in 0..1000 {
            log.refused(None, "no token");
        }
        let state = log.state.lock().expect("lock");
        assert_eq!(state.suppressed, 999);
        assert!(state.last.is_some());
    }
}
