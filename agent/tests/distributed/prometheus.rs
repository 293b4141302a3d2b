//! `pgzm-agent --metrics-listen`: after a migration through the agent, a Prometheus scrape of
//! `/metrics` shows its tasks' rows, bytes and durations per table, by Prometheus' naming
//! rules; other paths are not found.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// `GET path` on `addr`: (status line, body).
async fn get(addr: &str, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("send the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_the_tasks_for_prometheus() {
    let agent = AgentProcess::start(&["--metrics-listen", "127.0.0.1:0"]).await;
    let addr = agent
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("metrics listening on ").map(str::to_string))
        .unwrap_or_else(|| panic!("no metrics port announced: {}", agent.log()));
    let (status, _) = get(&addr, "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    let p = fixture_pair("prometheus", "simple").await;
    let pool = pool(&settings(&[agent.http_url().as_str()])).await;
    migrate::start(options(&p), pool)
        .await
        .unwrap_or_else(|e| panic!("migration through the agent: {e}"));

    // Rendered within a second after the tasks end (and every 5 s).
    let wanted = [
        "pgzm_agent_task_rows_total{table=\"public.User\"} 2",
        "pgzm_agent_task_rows_total{table=\"public.Post\"} 2",
        "pgzm_agent_task_rows_total{table=\"public.Comment\"} 2",
    ];
    let body = poll("the tasks in /metrics", Duration::from_secs(10), || {
        let addr = addr.clone();
        async move {
            let (_, body) = get(&addr, "/metrics").await;
            wanted.iter().all(|w| body.contains(w)).then_some(body)
        }
    })
    .await;
    for line in [
        "# TYPE pgzm_agent_task_rows_total counter",
        "# TYPE pgzm_agent_task_bytes_total counter",
        "# TYPE pgzm_agent_task_duration_seconds histogram",
        "pgzm_agent_task_duration_seconds_bucket{table=\"public.User\",le=\"0.005\"}",
        "pgzm_agent_task_duration_seconds_bucket{table=\"public.User\",le=\"+Inf\"} 1",
        "pgzm_agent_task_duration_seconds_count{table=\"public.User\"} 1",
    ] {
        assert!(body.contains(line), "{line} missing:\n{body}");
    }
    assert!(
        body.lines()
            .filter(|l| l.starts_with("pgzm_agent_task_bytes_total{table=\"public.User\"}"))
            .any(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)),
        "{body}"
    );
    let (status, _) = get(&addr, "/").await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}
