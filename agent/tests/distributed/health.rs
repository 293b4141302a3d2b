//! The agent's health as a prober sees it: `grpc.health.v1.Health` on the agent's own port and
//! on the plaintext `--health-listen` port, SERVING while it takes tasks and NOT_SERVING from
//! its SIGTERM until its last call ends; gRPC reflection lists the services; calls refused for want of the token are logged with
//! the peer and the reason, once per interval however many there are.

use std::time::Duration;

use pgzm_agent::health::AGENT_SERVICE;
use pgzm_proto::agent::v1 as proto;
use proto::agent_client::AgentClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use super::*;

const TOKEN: &str = "health-t0ken-9f8e7d";

async fn health_client(url: String) -> HealthClient<Channel> {
    HealthClient::new(
        Channel::from_shared(url)
            .expect("url")
            .connect()
            .await
            .expect("connect to the health service"),
    )
}

/// What `Check` answers for `service` ("" is the whole server).
async fn check(client: &mut HealthClient<Channel>, service: &str) -> ServingStatus {
    let status = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_served_on_both_ports_and_turns_not_serving_while_draining() {
    let agent = AgentProcess::start_with_env(
        &["--health-listen", "127.0.0.1:0"],
        &[("PGZM_AGENT_TOKEN", TOKEN)],
    )
    .await;
    let health_addr = agent
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("health listening on ").map(str::to_string))
        .unwrap_or_else(|| panic!("no health port announced: {}", agent.log()));
    let mut on_health_port = health_client(format!("http://{health_addr}")).await;
    let mut on_agent_port = health_client(agent.http_url()).await;
    for client in [&mut on_health_port, &mut on_agent_port] {
        for service in ["", AGENT_SERVICE] {
            assert_eq!(check(client, service).await, ServingStatus::Serving);
        }
    }
    let unknown = on_health_port
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The agent's port describes its services (gRPC reflection).
    let mut reflection = ServerReflectionClient::new(
        Channel::from_shared(agent.http_url())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("a reflection answer")
        .expect("an answer");
    let services: Vec<String> = match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("not a service list: {other:?}"),
    };
    for service in [AGENT_SERVICE, "grpc.health.v1.Health"] {
        assert!(services.iter().any(|s| s == service), "{services:?}");
    }

    // The health port serves health only (plaintext, without the token).
    let mut agent_api_on_health_port = AgentClient::new(
        Channel::from_shared(format!("http://{health_addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    let err = agent_api_on_health_port
        .info(proto::InfoRequest::default())
        .await
        .expect_err("the agent's API is not on the health port");
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err}");

    // Calls without the token (or with a wrong one) are refused, and logged once with the peer
    // and the reason however many arrive.
    let mut api = AgentClient::new(
        Channel::from_shared(agent.http_url())
            .expect("url")
            .connect()
            .await
            .expect("connect"),
    );
    for _ in 0..20 {
        let err = api
            .info(proto::InfoRequest::default())
            .await
            .expect_err("no token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    }
    poll("the refusal to be logged", Duration::from_secs(5), || {
        let logged = agent.log().contains("refused a call");
        async move { logged.then_some(()) }
    })
    .await;
    let log = agent.log();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refused a call"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log}");
    assert!(
        refusals[0].contains("peer=127.0.0.1:") && refusals[0].contains("no token"),
        "{}",
        refusals[0]
    );
    assert!(!log.contains(TOKEN), "the token was logged");

    // A call in flight (a health watch on the agent's port) keeps the draining agent up: the
    // probes read NOT_SERVING meanwhile, and the watcher is told too.
    let mut watch = on_agent_port
        .watch(HealthCheckRequest {
            service: AGENT_SERVICE.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // SAFETY: signals the agent process this test started.
    let rc = unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watcher is told within 10 s")
        .expect("watch")
        .expect("a status");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    for service in ["", AGENT_SERVICE] {
        assert_eq!(
            check(&mut on_health_port, service).await,
            ServingStatus::NotServing
        );
    }
    drop(watch);
    drop(on_agent_port);
    drop(api);
    let mut agent = agent;
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("the agent exits once its last call ended");
    assert!(status.success(), "{status}: {}", agent.log());
}
