//! OpenTelemetry export of the real binaries, received by a real OTLP collector endpoint that
//! the test runs on loopback: the official collector services
//! (`opentelemetry.proto.collector.{trace,metrics}.v1`) over gRPC with tonic, and OTLP
//! http/protobuf (`POST /v1/traces`, `POST /v1/metrics`) with hyper.
//!
//! - gRPC and HTTP: spans of `pgzm start` and of a `pgzm-agent` process arrive with their own
//!   `service.name`, in one trace, the agent's task spans children of the coordinator's task
//!   spans; the copy metrics arrive too.
//! - A run that fails (a refused plan) still delivers its spans, flushed at exit, with the
//!   failure on the root span.
//! - A password in the database URLs reaches no log line, span, metric or error.
//! - `--log-format json` logs are JSON lines (the final error too); `--json` reports of start,
//!   prepare and swap.
//! - A collector that cannot be reached fails nothing, and the lost export is reported.
//!
//! The agent binary belongs to another package, so Cargo does not build it for these tests:
//! see [`agent_binary`].

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message;
use support::{one_json, simple_pair, text, WorkDir};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::support;
use tokio::sync::watch;

/// A password that must never be printed or exported.
const SECRET: &str = "S3cretPass";
/// Longest wait for anything: an agent to listen, telemetry to arrive, a process to exit.
const DEADLINE: Duration = Duration::from_secs(15);
/// The simple fixture's tables and their rows.
const TABLES: [(&str, i64); 3] = [("Comment", 2), ("Post", 2), ("User", 2)];

// ---------------------------------------------------------------------------------------------
// The OTLP receiver.

/// A received span, flattened.
#[derive(Debug, Clone)]
struct Span {
    /// `service.name` of its resource.
    service: String,
    /// "grpc" or "http".
    transport: &'static str,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent: String,
    name: String,
    /// `SpanKind` (1 internal, 2 server, 3 client).
    kind: i32,
    attributes: BTreeMap<String, Attr>,
    /// Its resource's attributes.
    resource: BTreeMap<String, Attr>,
    /// Event names and their attributes.
    events: Vec<(String, BTreeMap<String, Attr>)>,
    status: (i32, String),
}

/// An attribute value, as received.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Str(String),
    Int(i64),
    Other(String),
}

impl std::fmt::Display for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attr::Str(s) | Attr::Other(s) => f.write_str(s),
            Attr::Int(n) => write!(f, "{n}"),
        }
    }
}

/// A received metric data point.
#[derive(Debug, Clone)]
struct Point {
    service: String,
    transport: &'static str,
    metric: String,
    /// The instrument's unit.
    unit: String,
    attributes: BTreeMap<String, Attr>,
    /// Sums and gauges: the value; histograms: the count.
    value: f64,
    /// Histograms: the bucket boundaries.
    bounds: Vec<f64>,
}

#[derive(Debug, Default)]
struct Collected {
    spans: Vec<Span>,
    points: Vec<Point>,
    /// Every request body as received (protobuf: strings are in it verbatim).
    raw: Vec<Vec<u8>>,
}

impl Collected {
    fn spans_of(&self, service: &str) -> Vec<&Span> {
        self.spans.iter().filter(|s| s.service == service).collect()
    }

    fn summary(&self) -> String {
        let mut out = String::new();
        for s in &self.spans {
            out.push_str(&format!(
                "  [{}/{}] {} trace={} id={} parent={} {:?}\n",
                s.service, s.transport, s.name, s.trace_id, s.span_id, s.parent, s.attributes
            ));
        }
        for p in &self.points {
            out.push_str(&format!(
                "  [{}/{}] metric {} {:?} = {}\n",
                p.service, p.transport, p.metric, p.attributes, p.value
            ));
        }
        out
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr_value(v: &Option<AnyValue>) -> Attr {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Attr::Str(s.clone()),
        Some(any_value::Value::IntValue(n)) => Attr::Int(*n),
        other => Attr::Other(format!("{other:?}")),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Attr> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), attr_value(&kv.value)))
        .collect()
}

fn service_name(resource: &Option<opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .as_ref()
        .and_then(|r| attrs(&r.attributes).get("service.name").cloned())
        .map(|a| a.to_string())
        .unwrap_or_default()
}

/// Collects what the exporters send; `changed` ticks on every request.
#[derive(Clone)]
struct Receiver {
    collected: Arc<Mutex<Collected>>,
    changed: watch::Sender<u64>,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            collected: Arc::default(),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.collected.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_traces(&self, req: ExportTraceServiceRequest, transport: &'static str) {
        let mut c = self.lock();
        c.raw.push(req.encode_to_vec());
        for rs in req.resource_spans {
            let service = service_name(&rs.resource);
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let status = s.status.map(|st| (st.code, st.message)).unwrap_or_default();
                    c.spans.push(Span {
                        service: service.clone(),
                        transport,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name,
                        kind: s.kind,
                        attributes: attrs(&s.attributes),
                        resource: resource.clone(),
                        events: s
                            .events
                            .iter()
                            .map(|e| (e.name.clone(), attrs(&e.attributes)))
                            .collect(),
                        status,
                    });
                }
            }
        }
        drop(c);
        self.changed.send_modify(|n| *n += 1);
    }

    fn add_metrics(&self, req: ExportMetricsServiceRequest, transport: &'static str) {
        let mut c = self.lock();
        c.raw.push(req.encode_to_vec());
        for rm in req.resource_metrics {
            let service = service_name(&rm.resource);
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let mut push = |attributes: &[KeyValue], value: f64, bounds: &[f64]| {
                        c.points.push(Point {
                            service: service.clone(),
                            transport,
                            metric: m.name.clone(),
                            unit: m.unit.clone(),
                            attributes: attrs(attributes),
                            value,
                            bounds: bounds.to_vec(),
                        })
                    };
                    let number = |v: &Option<number_data_point::Value>| match v {
                        Some(number_data_point::Value::AsInt(n)) => *n as f64,
                        Some(number_data_point::Value::AsDouble(d)) => *d,
                        None => f64::NAN,
                    };
                    match &m.data {
                        Some(metric::Data::Sum(s)) => {
                            for p in &s.data_points {
                                push(&p.attributes, number(&p.value), &[]);
                            }
                        }
                        Some(metric::Data::Gauge(g)) => {
                            for p in &g.data_points {
                                push(&p.attributes, number(&p.value), &[]);
                            }
                        }
                        Some(metric::Data::Histogram(h)) => {
                            for p in &h.data_points {
                                push(&p.attributes, p.count as f64, &p.explicit_bounds);
                            }
                        }
                        _ => push(&[], f64::NAN, &[]),
                    }
                }
            }
        }
        drop(c);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Waits until `done` holds for what was received (at most [`DEADLINE`]).
    async fn wait_for(&self, what: &str, done: impl Fn(&Collected) -> bool) {
        let mut rx = self.changed.subscribe();
        let waited = tokio::time::timeout(DEADLINE, async {
            loop {
                if done(&self.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            panic!(
                "{what}: not received within {DEADLINE:?}; received:\n{}",
                self.lock().summary()
            );
        }
    }

    /// Serves the OTLP gRPC collector services on a loopback port; returns the endpoint URL.
    async fn serve_grpc(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self.clone()))
            .add_service(MetricsServiceServer::new(self.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(async move {
            if let Err(e) = server.await {
                panic!("OTLP gRPC receiver failed: {e}");
            }
        });
        format!("http://{addr}")
    }

    /// Serves OTLP http/protobuf on a loopback port; returns the endpoint URL.
    async fn serve_http(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let receiver = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let receiver = receiver.clone();
                        async move { receiver.http(req).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn http(
        &self,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
        let reply = |status: u16, body: Vec<u8>| {
            let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/x-protobuf"),
            );
            Ok(r)
        };
        let is_protobuf = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/x-protobuf");
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return reply(400, Vec::new());
        };
        if method != hyper::Method::POST || !is_protobuf {
            return reply(415, Vec::new());
        }
        match path.as_str() {
            "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
                Ok(r) => {
                    self.add_traces(r, "http");
                    reply(200, ExportTraceServiceResponse::default().encode_to_vec())
                }
                Err(_) => reply(400, Vec::new()),
            },
            "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
                Ok(r) => {
                    self.add_metrics(r, "http");
                    reply(200, ExportMetricsServiceResponse::default().encode_to_vec())
                }
                Err(_) => reply(400, Vec::new()),
            },
            _ => reply(404, Vec::new()),
        }
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add_traces(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.add_metrics(request.into_inner(), "grpc");
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

// ---------------------------------------------------------------------------------------------
// The processes.

/// The `pgzm-agent` binary, built from the current sources.
///
/// Cargo builds only this package's binaries (`CARGO_BIN_EXE_pgzm`) for its integration tests;
/// artifact dependencies, which would build another package's binary, are unstable. A
/// `pgzm-agent` next to `pgzm` may be missing (only this package was built) or stale (built
/// before the last change to the agent), so the test runs `cargo build -p pgzm-agent` once per
/// test binary with the same cargo, profile and target directory that built `pgzm` — a no-op
/// when it is up to date — and then uses that binary. `PGZM_AGENT_BIN` overrides it (e.g. to
/// test an installed binary). If cargo cannot be run, an existing binary is used as is.
fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("PGZM_AGENT_BIN").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let pgzm = Path::new(env!("CARGO_BIN_EXE_pgzm"));
        let bin = pgzm.with_file_name(format!("pgzm-agent{}", std::env::consts::EXE_SUFFIX));
        let profile_dir = pgzm.parent().expect("pgzm has a directory");
        // target/<profile dir>: `debug` is the dev (and test) profile's directory.
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let target_dir = profile_dir.parent().expect("a target directory");
        let mut build = std::process::Command::new(env!("CARGO"));
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "pgzm-agent",
                "--bin",
                "pgzm-agent",
            ])
            .args(["--profile", profile, "--target-dir"])
            .arg(target_dir)
            // A host build: its binary lands next to `pgzm`.
            .env_remove("CARGO_BUILD_TARGET")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null());
        // Cargo runs tests with the variables it gives a crate being compiled; a build script
        // that watches one of them (ring watches CARGO_MANIFEST_DIR) would otherwise make every
        // nested build and every outer build rebuild half the tree.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name.as_ref())
            {
                build.env_remove(name.as_ref());
            }
        }
        let built = build.status();
        match built {
            Ok(s) if s.success() => {}
            other => assert!(
                bin.exists(),
                "pgzm-agent could not be built ({other:?}) and {} does not exist",
                bin.display()
            ),
        }
        bin
    })
}

/// Where and how the processes export telemetry.
#[derive(Debug, Clone)]
struct Otel {
    endpoint: String,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`; `None` leaves it unset (the default, http/protobuf).
    protocol: Option<&'static str>,
    /// `OTEL_BSP_SCHEDULE_DELAY`, ms.
    batch_delay_ms: u64,
}

/// A clean environment (no inherited telemetry or database settings) exporting to `otel` as
/// `service`.
fn environment(cmd: &mut Command, otel: &Otel, service: &str) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("OTEL_") {
            cmd.env_remove(name.as_ref());
        }
    }
    support::clean_environment(cmd);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otel.endpoint)
        .env("OTEL_SERVICE_NAME", service)
        .env("OTEL_BSP_SCHEDULE_DELAY", otel.batch_delay_ms.to_string());
    if let Some(p) = otel.protocol {
        cmd.env("OTEL_EXPORTER_OTLP_PROTOCOL", p);
    }
}

/// `pgzm` exporting to `otel` as `service`, run in `dir`.
fn pgzm(dir: &WorkDir, otel: &Otel, service: &str) -> Command {
    let mut cmd = support::pgzm_command(dir);
    environment(&mut cmd, otel, service);
    cmd
}

async fn output(cmd: &mut Command) -> Output {
    tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .expect("pgzm finished in time")
        .expect("run pgzm")
}

/// A running `pgzm-agent`.
struct Agent {
    child: Child,
    /// `http://ADDR`, from its `listening on ADDR` line.
    url: String,
    stderr: tokio::task::JoinHandle<String>,
}

impl Agent {
    /// Starts `pgzm-agent --listen 127.0.0.1:0 ARGS` exporting to `otel` as `service`.
    async fn start(otel: &Otel, service: &str, args: &[&str]) -> Agent {
        // Possibly a (no-op) cargo build: off the async worker.
        let mut cmd = Command::new(tokio::task::block_in_place(agent_binary));
        environment(&mut cmd, otel, service);
        cmd.args(["--listen", "127.0.0.1:0", "--max-tasks", "2"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn pgzm-agent");
        let mut stderr = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("pgzm-agent printed its address in time")
            .expect("read pgzm-agent stdout");
        let Some(addr) = line
            .as_deref()
            .and_then(|l| l.strip_prefix("listening on "))
        else {
            let _ = child.start_kill();
            let err = stderr.await.unwrap_or_default();
            panic!("pgzm-agent did not start: stdout {line:?}, stderr: {err}");
        };
        Agent {
            url: format!("http://{}", addr.trim()),
            child,
            stderr,
        }
    }

    /// Stops it with SIGTERM (a graceful shutdown, which flushes its telemetry); returns its
    /// stderr.
    async fn stop(mut self) -> String {
        let pid = self.child.id().expect("agent running") as libc::pid_t;
        // SAFETY: signals a child process this test started and has not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM pgzm-agent");
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("pgzm-agent stopped in time")
            .expect("wait for pgzm-agent");
        let stderr = self.stderr.await.unwrap_or_default();
        assert!(
            status.success(),
            "pgzm-agent exited with {status}: {stderr}"
        );
        stderr
    }
}

/// `url` with the password [`SECRET`] (the test servers trust any password).
fn with_password(url: &str) -> String {
    support::with_password(url, SECRET)
}

// ---------------------------------------------------------------------------------------------
// Assertions on a received migration trace.

/// Checks the trace of a successful `pgzm start` run (`coordinator` service) whose copy tasks
/// ran on the agent at `agent_url` (`agent` service), all received over `transport`.
fn assert_one_trace(
    c: &Collected,
    coordinator: &str,
    agent: &str,
    agent_url: &str,
    transport: &str,
    dest: &Dest,
) {
    let summary = c.summary();
    let coord = c.spans_of(coordinator);
    let agent_spans = c.spans_of(agent);
    assert!(!coord.is_empty(), "no spans of {coordinator}:\n{summary}");
    assert!(!agent_spans.is_empty(), "no spans of {agent}:\n{summary}");
    for s in c.spans.iter() {
        assert_eq!(s.transport, transport, "{s:?}");
        assert!(
            s.service == coordinator || s.service == agent,
            "span of an unknown service {:?}",
            s.service
        );
    }

    // The root: the run's `pgzm` span, and every span of both processes in its trace.
    let roots: Vec<&&Span> = coord.iter().filter(|s| s.parent.is_empty()).collect();
    assert_eq!(roots.len(), 1, "one root span:\n{summary}");
    let root = roots[0];
    assert_eq!(root.name, "pgzm", "{root:?}");
    assert_eq!(
        root.attributes.get("command"),
        Some(&Attr::Str("start".into()))
    );
    assert_eq!(root.status.0, StatusCode::Unset as i32, "{root:?}");
    for s in &c.spans {
        assert_eq!(
            s.trace_id, root.trace_id,
            "span {} of {} is in another trace:\n{summary}",
            s.name, s.service
        );
    }
    let ids: BTreeSet<&str> = c.spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &c.spans {
        assert!(
            s.parent.is_empty() || ids.contains(s.parent.as_str()),
            "span {} of {} has a parent that was not received:\n{summary}",
            s.name,
            s.service
        );
    }

    // The phases, and a task span per table under the copy phase.
    let phase = |name: &str| {
        coord
            .iter()
            .find(|s| {
                s.name == "phase" && s.attributes.get("phase") == Some(&Attr::Str(name.into()))
            })
            .unwrap_or_else(|| panic!("no span of phase {name}:\n{summary}"))
    };
    for p in ["plan", "shadow", "copy", "constraints", "swap"] {
        assert_eq!(phase(p).parent, root.span_id, "phase {p} under the root");
    }
    let copy = phase("copy");
    let tasks: Vec<&&Span> = coord.iter().filter(|s| s.name == "table_task").collect();
    let mut task_of = BTreeMap::new();
    for t in &tasks {
        assert_eq!(t.parent, copy.span_id, "{t:?}");
        let table = t
            .attributes
            .get("table")
            .map(Attr::to_string)
            .unwrap_or_default();
        // The live name, schema-qualified, and the shadow table beside it.
        let bare = table
            .strip_prefix("public.")
            .unwrap_or_else(|| panic!("table {table:?} is not schema-qualified"))
            .to_string();
        assert_eq!(
            t.attributes.get("shadow"),
            Some(&Attr::Str(format!("public.shadow_{bare}"))),
            "{t:?}"
        );
        assert_eq!(
            t.attributes.get("agent"),
            Some(&Attr::Str(agent_url.into())),
            "{t:?}"
        );
        assert_eq!(t.attributes.get("attempt"), Some(&Attr::Int(1)), "{t:?}");
        assert!(
            matches!(t.attributes.get("bytes"), Some(Attr::Int(n)) if *n > 0),
            "{t:?}"
        );
        let rows = match t.attributes.get("rows") {
            Some(Attr::Int(n)) => *n,
            other => panic!("rows of {table}: {other:?}"),
        };
        assert!(task_of.insert(t.span_id.clone(), (bare, rows)).is_none());
    }
    let mut rows: BTreeMap<String, i64> = task_of.values().cloned().collect();
    assert_eq!(
        rows.len(),
        tasks.len(),
        "one task span per table:\n{summary}"
    );
    let expected = expected_rows();
    assert_eq!(rows, expected, "rows of the task spans");

    // Each task's gRPC call: a CLIENT span under the task span, and the agent's SERVER span
    // under it, both by the RPC conventions.
    let run_copy = "pgzm.agent.v1.Agent/RunCopy";
    let (host, port) = agent_url
        .trim_start_matches("http://")
        .rsplit_once(':')
        .expect("agent address");
    let mut client_of = BTreeMap::new();
    for c in coord.iter().filter(|s| s.name == run_copy) {
        assert_eq!(c.kind, SpanKind::Client as i32, "{c:?}");
        let Some((table, _)) = task_of.get(&c.parent) else {
            panic!("RunCopy client span {c:?} is not under a table_task:\n{summary}");
        };
        assert_rpc(c, "RunCopy");
        assert_eq!(
            c.attributes.get("server.address"),
            Some(&Attr::Str(host.into()))
        );
        assert_eq!(
            c.attributes.get("server.port"),
            Some(&Attr::Int(port.parse().expect("port")))
        );
        client_of.insert(c.span_id.clone(), table.clone());
    }
    assert_eq!(client_of.len(), TABLES.len(), "{summary}");
    rows.clear();
    let agent_tasks: Vec<&&Span> = agent_spans.iter().filter(|s| s.name == run_copy).collect();
    let mut server_of = BTreeMap::new();
    for a in &agent_tasks {
        assert_eq!(a.kind, SpanKind::Server as i32, "{a:?}");
        assert_rpc(a, "RunCopy");
        let Some(table) = client_of.get(&a.parent) else {
            panic!("server span {a:?} is not a child of a RunCopy client span:\n{summary}");
        };
        assert_eq!(
            a.attributes.get("table"),
            Some(&Attr::Str(format!("public.{table}")))
        );
        assert_eq!(
            a.attributes.get("shadow"),
            Some(&Attr::Str(format!("public.shadow_{table}")))
        );
        let Some(Attr::Int(n)) = a.attributes.get("rows") else {
            panic!("server span without integer rows: {a:?}");
        };
        rows.insert(table.clone(), *n);
        server_of.insert(a.span_id.clone(), table.clone());
    }
    assert_eq!(agent_tasks.len(), TABLES.len(), "{summary}");
    assert_eq!(rows, expected, "rows of the agents' server spans");

    // Spans that write into PostgreSQL carry the database conventions' attributes.
    let copies: Vec<&&Span> = agent_spans
        .iter()
        .filter(|s| s.name == "copy_task")
        .collect();
    assert_eq!(copies.len(), TABLES.len(), "{summary}");
    for c in copies {
        let table = server_of
            .get(&c.parent)
            .unwrap_or_else(|| panic!("copy_task {c:?} not under a server span"));
        assert_db(c, dest, &format!("public.shadow_{table}"), "COPY");
        assert_eq!(
            c.attributes.get("table"),
            Some(&Attr::Str(format!("public.{table}")))
        );
    }
    let builds: Vec<&&Span> = coord.iter().filter(|s| s.name == "build_table").collect();
    assert_eq!(builds.len(), TABLES.len(), "{summary}");
    for b in builds {
        let table = b
            .attributes
            .get("table")
            .map(Attr::to_string)
            .unwrap_or_default();
        let bare = table.trim_start_matches("public.");
        assert!(expected.contains_key(bare), "{b:?}");
        assert_db(b, dest, &format!("public.shadow_{bare}"), "CREATE INDEX");
    }

    // No tracing noise; the resource says which pgzm.
    for s in &c.spans {
        for noise in ["busy_ns", "idle_ns", "thread.id", "thread.name", "target"] {
            assert!(!s.attributes.contains_key(noise), "{noise} on {s:?}");
        }
        assert!(
            !s.attributes.keys().any(|k| k.starts_with("code.")),
            "code.* on {s:?}"
        );
        assert_eq!(
            s.resource.get("service.version"),
            Some(&Attr::Str(env!("CARGO_PKG_VERSION").into())),
            "{s:?}"
        );
    }
}

/// A span of the RPC conventions for `method`, with an OK status.
fn assert_rpc(s: &Span, method: &str) {
    assert_eq!(
        s.attributes.get("rpc.system"),
        Some(&Attr::Str("grpc".into())),
        "{s:?}"
    );
    assert_eq!(
        s.attributes.get("rpc.service"),
        Some(&Attr::Str("pgzm.agent.v1.Agent".into())),
        "{s:?}"
    );
    assert_eq!(
        s.attributes.get("rpc.method"),
        Some(&Attr::Str(method.into())),
        "{s:?}"
    );
    assert_eq!(
        s.attributes.get("rpc.grpc.status_code"),
        Some(&Attr::Int(0)),
        "{s:?}"
    );
}

/// A span of the database conventions: PostgreSQL, the destination `dest` (database, address
/// and port), the table written and the operation.
fn assert_db(s: &Span, dest: &Dest, collection: &str, operation: &str) {
    let want = [
        ("db.system.name", Attr::Str("postgresql".into())),
        ("db.namespace", Attr::Str(dest.name.clone())),
        ("server.address", Attr::Str("127.0.0.1".into())),
        ("server.port", Attr::Int(i64::from(dest.port))),
        ("db.collection.name", Attr::Str(collection.into())),
        ("db.operation.name", Attr::Str(operation.into())),
    ];
    for (key, value) in want {
        assert_eq!(s.attributes.get(key), Some(&value), "{key} of {s:?}");
    }
}

/// The destination database, as spans name it.
struct Dest {
    name: String,
    port: u16,
}

/// The port in `db`'s URL.
fn dest_port(db: &pgzm_tests::TestDb) -> u16 {
    let url = db.url();
    let after = url.rsplit_once('@').map_or(url.as_str(), |(_, a)| a);
    after
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// [`TABLES`] as a map.
fn expected_rows() -> BTreeMap<String, i64> {
    TABLES.iter().map(|(t, n)| (t.to_string(), *n)).collect()
}

/// The copy metrics of `service`: the last value of `pgzm.copy.rows` per table.
fn copied_rows(c: &Collected, service: &str) -> BTreeMap<String, i64> {
    rows_metric(c, service, "pgzm.copy.rows")
        .into_iter()
        .map(|(t, n)| (t.trim_start_matches("public.").to_string(), n))
        .collect()
}

/// The last value of the row counter `metric` of `service`, per table.
fn rows_metric(c: &Collected, service: &str, metric: &str) -> BTreeMap<String, i64> {
    c.points
        .iter()
        .filter(|p| p.service == service && p.metric == metric)
        .map(|p| {
            let table = p
                .attributes
                .get("table")
                .map(Attr::to_string)
                .unwrap_or_default();
            (table, p.value as i64)
        })
        .collect()
}

fn has_copy_rows(c: &Collected, service: &str) -> bool {
    copied_rows(c, service).len() == TABLES.len()
}

fn all_agent_tasks(c: &Collected, service: &str) -> bool {
    c.spans_of(service)
        .iter()
        .filter(|s| s.name == "pgzm.agent.v1.Agent/RunCopy")
        .count()
        >= TABLES.len()
}

fn has_root(c: &Collected, service: &str) -> bool {
    c.spans_of(service).iter().any(|s| s.name == "pgzm")
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// How the processes export to the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// OTLP/gRPC, for both processes.
    Grpc,
    /// OTLP http/protobuf: the default protocol for the coordinator, explicit for the agent.
    Http,
}

impl Transport {
    /// Its name, as in [`Span::transport`].
    fn name(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }

    /// `OTEL_EXPORTER_OTLP_PROTOCOL` of the agent and of `pgzm`.
    fn protocols(self) -> (Option<&'static str>, Option<&'static str>) {
        match self {
            Transport::Grpc => (Some("grpc"), Some("grpc")),
            Transport::Http => (Some("http/protobuf"), None),
        }
    }

    /// Serves `receiver` on this transport; returns the endpoint URL.
    async fn serve(self, receiver: &Receiver) -> String {
        match self {
            Transport::Grpc => receiver.serve_grpc().await,
            Transport::Http => receiver.serve_http().await,
        }
    }
}

/// `pgzm start` with its copy tasks on a `pgzm-agent` process, both exporting over `transport`
/// as `otlp-<transport>-coordinator` and `otlp-<transport>-agent`: their spans arrive in one
/// trace ([`assert_one_trace`]) and the coordinator's copy metrics arrive. Over gRPC it also
/// waits for the running agent's task spans (exported on its batch schedule) and, after the
/// agent has stopped, its metrics. Returns the receiver for further checks.
async fn export_joins_coordinator_and_agent_in_one_trace(transport: Transport) -> Receiver {
    let t = transport.name();
    let coordinator = format!("otlp-{t}-coordinator");
    let agent_service = format!("otlp-{t}-agent");
    let receiver = Receiver::new();
    let endpoint = transport.serve(&receiver).await;
    let (agent_protocol, pgzm_protocol) = transport.protocols();
    let (source, dest) = simple_pair(&format!("otlp_{t}")).await;
    let agent_otel = Otel {
        endpoint: endpoint.clone(),
        protocol: agent_protocol,
        batch_delay_ms: 100,
    };
    let agent = Agent::start(&agent_otel, &agent_service, &[]).await;
    let otel = Otel {
        endpoint,
        protocol: pgzm_protocol,
        batch_delay_ms: 100,
    };
    let dir = WorkDir::new(t);
    let out = output(pgzm(&dir, &otel, &coordinator).args([
        "start",
        "--agent",
        &agent.url,
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    assert!(out.status.success(), "pgzm failed: {}", text(&out.stderr));
    if transport == Transport::Grpc {
        // The coordinator flushed at exit; the agent, still running, exports on its batch
        // schedule.
        // Its metrics too: it exports them after its tasks end, not on the minute's schedule.
        receiver
            .wait_for("the agent's task spans and metrics", |c| {
                all_agent_tasks(c, &agent_service)
                    && rows_metric(c, &agent_service, "pgzm_agent.task.rows").len() == TABLES.len()
            })
            .await;
    }
    let agent_url = agent.url.clone();
    // Stopping the agent flushes its metrics.
    agent.stop().await;
    receiver
        .wait_for("spans and metrics of both", |c| {
            all_agent_tasks(c, &agent_service)
                && has_root(c, &coordinator)
                && has_copy_rows(c, &coordinator)
                && (transport != Transport::Grpc
                    || rows_metric(c, &agent_service, "pgzm_agent.task.rows").len() == TABLES.len())
        })
        .await;
    let c = receiver.lock();
    let dest_db = Dest {
        name: dest.name().to_string(),
        port: dest_port(&dest),
    };
    assert_one_trace(&c, &coordinator, &agent_service, &agent_url, t, &dest_db);
    assert_eq!(
        copied_rows(&c, &coordinator),
        expected_rows(),
        "{}",
        c.summary()
    );
    drop(c);
    receiver
}

/// OTLP/gRPC: one trace across `pgzm start` and a `pgzm-agent` process; metrics arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_joins_coordinator_and_agent_in_one_trace() {
    let receiver = export_joins_coordinator_and_agent_in_one_trace(Transport::Grpc).await;
    let c = receiver.lock();
    // The agent counts what it wrote, under the tables' live names.
    let agent_rows: BTreeMap<String, i64> =
        rows_metric(&c, "otlp-grpc-agent", "pgzm_agent.task.rows")
            .into_iter()
            .map(|(t, n)| (t.trim_start_matches("public.").to_string(), n))
            .collect();
    assert_eq!(agent_rows, expected_rows(), "{}", c.summary());
    // Every instrument has its unit; durations in seconds have buckets that fit seconds.
    let task_seconds = pgzm_agent::metrics::TASK_SECONDS.to_vec();
    let swap_seconds = pgzm_coordinator::metrics::SWAP_SECONDS.to_vec();
    for (service, metric, unit, bounds) in [
        ("otlp-grpc-coordinator", "pgzm.copy.rows", "{row}", None),
        ("otlp-grpc-coordinator", "pgzm.copy.bytes", "By", None),
        (
            "otlp-grpc-coordinator",
            "pgzm.copy.task.duration",
            "s",
            Some(&task_seconds),
        ),
        (
            "otlp-grpc-coordinator",
            "pgzm.swap.lock_held",
            "s",
            Some(&swap_seconds),
        ),
        (
            "otlp-grpc-coordinator",
            "pgzm.swap.lock_wait",
            "s",
            Some(&swap_seconds),
        ),
        ("otlp-grpc-agent", "pgzm_agent.task.rows", "{row}", None),
        ("otlp-grpc-agent", "pgzm_agent.task.bytes", "By", None),
        (
            "otlp-grpc-agent",
            "pgzm_agent.task.duration",
            "s",
            Some(&task_seconds),
        ),
    ] {
        let points: Vec<&Point> = c
            .points
            .iter()
            .filter(|p| p.service == service && p.metric == metric)
            .collect();
        assert!(!points.is_empty(), "metric {metric} of {service} missing");
        for p in points {
            assert_eq!(p.unit, unit, "{p:?}");
            if let Some(bounds) = bounds {
                assert_eq!(&p.bounds, bounds, "{p:?}");
            }
        }
    }
    // The coordinator exports its metrics once, at exit: one point per table.
    let coordinator_rows = c
        .points
        .iter()
        .filter(|p| p.service == "otlp-grpc-coordinator" && p.metric == "pgzm.copy.rows")
        .count();
    assert_eq!(coordinator_rows, TABLES.len(), "{}", c.summary());
}

/// OTLP http/protobuf (the default protocol for the coordinator, explicit for the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_export_joins_coordinator_and_agent_in_one_trace() {
    export_joins_coordinator_and_agent_in_one_trace(Transport::Http).await;
}

/// A run that fails after its plan phase (the destination already has a table named like a
/// shadow table: the plan is refused) still delivers its spans: they are flushed at exit, long
/// before the batch schedule would send them, and the root span carries the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_failed_run_are_flushed_at_exit() {
    let receiver = Receiver::new();
    let otel = Otel {
        endpoint: receiver.serve_grpc().await,
        protocol: Some("grpc"),
        // Only the flush at exit can deliver within the test.
        batch_delay_ms: 600_000,
    };
    let (source, dest) = simple_pair("otlp_fail").await;
    dest.batch(r#"CREATE TABLE "shadow_User" (id int)"#)
        .await
        .expect("collision");
    let dir = WorkDir::new("fail");
    let out = output(pgzm(&dir, &otel, "otlp-fail-coordinator").args([
        "start",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the plan must be refused: {stderr}");
    assert!(stderr.contains("shadow_User"), "{stderr}");
    // The export completed before the process exited.
    receiver
        .wait_for("the failed run's spans", |c| {
            has_root(c, "otlp-fail-coordinator")
        })
        .await;
    let c = receiver.lock();
    let summary = c.summary();
    let root = c
        .spans
        .iter()
        .find(|s| s.name == "pgzm")
        .expect("root span");
    assert!(root.parent.is_empty());
    assert_eq!(root.status.0, StatusCode::Error as i32, "{root:?}");
    assert!(root.status.1.contains("shadow_User"), "{root:?}");
    let plan = c
        .spans
        .iter()
        .find(|s| s.name == "phase" && s.attributes.get("phase") == Some(&Attr::Str("plan".into())))
        .unwrap_or_else(|| panic!("no plan phase span:\n{summary}"));
    assert_eq!(plan.trace_id, root.trace_id);
    assert_eq!(plan.parent, root.span_id);
    assert!(
        !c.spans
            .iter()
            .any(|s| s.name == "phase"
                && s.attributes.get("phase") == Some(&Attr::Str("copy".into()))),
        "nothing was copied:\n{summary}"
    );
}

/// A password in the database URLs — given to `pgzm` and held by the agent — appears in no
/// log line (at -v) of either process, no exported span (name, attribute, event, status), no
/// metric, no migration log file, and not in the error of a failing run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_reach_no_log_span_metric_or_error() {
    let receiver = Receiver::new();
    let otel = Otel {
        endpoint: receiver.serve_grpc().await,
        protocol: Some("grpc"),
        batch_delay_ms: 100,
    };
    let (source, dest) = simple_pair("otlp_secret").await;
    let (source_url, dest_url) = (with_password(&source.url()), with_password(&dest.url()));
    let unreachable = format!("postgres://postgres:{SECRET}@127.0.0.1:1/nowhere");
    let src_db = format!("src={source_url}");
    let dst_db = format!("dst={dest_url}");
    let bad_db = format!("bad={unreachable}");
    let agent = Agent::start(
        &otel,
        "otlp-secret-agent",
        &[
            "-v",
            "--database",
            &src_db,
            "--database",
            &dst_db,
            "--database",
            &bad_db,
        ],
    )
    .await;
    let dir = WorkDir::new("secret");
    // A successful run: the agent holds the URLs, pgzm has them too.
    let ok = output(pgzm(&dir, &otel, "otlp-secret-coordinator").args([
        "-v",
        "start",
        "--agent",
        &agent.url,
        "--agent-source-db",
        "src",
        "--agent-dest-db",
        "dst",
        "--source",
        &source_url,
        "--dest",
        &dest_url,
    ]))
    .await;
    assert!(ok.status.success(), "pgzm failed: {}", text(&ok.stderr));
    // Failing runs: the destination cannot be reached, by the agent's probe (with --agent) or
    // by pgzm itself (in-process agent).
    let mut failed = Vec::new();
    for (service, agent_args) in [
        (
            "otlp-secret-failing-agent",
            vec![
                "--agent",
                agent.url.as_str(),
                "--agent-source-db",
                "src",
                "--agent-dest-db",
                "bad",
            ],
        ),
        ("otlp-secret-failing-local", vec![]),
    ] {
        let out = output(
            pgzm(&dir, &otel, service)
                .args(["-v", "start"])
                .args(&agent_args)
                .args(["--source", &source_url, "--dest", &unreachable]),
        )
        .await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{service}: {stderr}");
        let error_line = stderr
            .lines()
            .find(|l| l.starts_with("pgzm: error: "))
            .unwrap_or_else(|| panic!("{service}: no error line: {stderr}"));
        assert!(
            error_line.contains("destination database"),
            "{service}: {error_line}"
        );
        failed.push((service, stderr, text(&out.stdout)));
    }
    let agent_err = agent.stop().await;
    receiver
        .wait_for("spans of every process", |c| {
            has_root(c, "otlp-secret-coordinator")
                && failed.iter().all(|(service, _, _)| has_root(c, service))
                && all_agent_tasks(c, "otlp-secret-agent")
                && has_copy_rows(c, "otlp-secret-coordinator")
        })
        .await;

    let ok_err = text(&ok.stderr);
    let mut logs = vec![
        ("pgzm stderr".to_string(), ok_err.clone()),
        ("pgzm stdout".to_string(), text(&ok.stdout)),
        ("pgzm-agent stderr".to_string(), agent_err.clone()),
    ];
    for (service, stderr, stdout) in &failed {
        logs.push((format!("{service} stderr"), stderr.clone()));
        logs.push((format!("{service} stdout"), stdout.clone()));
    }
    for (what, log) in &logs {
        // Not vacuous: -v logs plenty.
        assert!(
            !log.trim().is_empty() || what.contains("stdout"),
            "{what} is empty"
        );
        for line in log.lines() {
            assert!(!line.contains(SECRET), "{what} shows the password: {line}");
        }
    }
    assert!(ok_err.contains("DEBUG"), "-v logs debug lines: {ok_err}");
    assert!(
        agent_err.contains("DEBUG"),
        "-v logs debug lines: {agent_err}"
    );
    for (name, text) in dir.files() {
        assert!(!text.contains(SECRET), "{name} holds the password");
    }

    let c = receiver.lock();
    let leaks = |a: &BTreeMap<String, Attr>| {
        a.iter()
            .any(|(k, v)| k.contains(SECRET) || v.to_string().contains(SECRET))
    };
    assert!(c.spans.len() > 10, "{}", c.summary());
    for s in &c.spans {
        assert!(
            !s.name.contains(SECRET)
                && !leaks(&s.attributes)
                && !s.status.1.contains(SECRET)
                && !s
                    .events
                    .iter()
                    .any(|(name, a)| name.contains(SECRET) || leaks(a)),
            "span {} of {} shows the password: {s:?}",
            s.name,
            s.service
        );
    }
    assert!(!c.points.is_empty());
    for p in &c.points {
        assert!(!leaks(&p.attributes), "metric {p:?} shows the password");
    }
    // And nowhere in any request, whatever field it hides in.
    let secret = SECRET.as_bytes();
    for body in &c.raw {
        assert!(
            !body.windows(secret.len()).any(|w| w == secret),
            "an OTLP request carries the password"
        );
    }
    // The failing runs' traces say why they failed (root and plan phase), without the password.
    for (service, _, _) in &failed {
        let spans = c.spans_of(service);
        let root = spans
            .iter()
            .find(|s| s.name == "pgzm")
            .expect("root of the failing run");
        let plan = spans
            .iter()
            .find(|s| s.name == "phase")
            .expect("plan phase of the failing run");
        for s in [root, plan] {
            assert_eq!(s.status.0, StatusCode::Error as i32, "{service}: {s:?}");
            assert!(
                s.status.1.contains("destination database"),
                "{service}: {s:?}"
            );
        }
    }
}

/// `--log-format json`: every stderr line is a JSON object with a level and a message;
/// `--json`: one report document on stdout for start, prepare and swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_reports() {
    // `pgzm` without a collector: nothing is exported.
    let plain = |dir: &WorkDir| {
        let otel = Otel {
            endpoint: String::new(),
            protocol: None,
            batch_delay_ms: 100,
        };
        let mut cmd = pgzm(dir, &otel, "json");
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        cmd
    };
    let json_lines = |what: &str, stderr: &str| {
        let mut levels = BTreeSet::new();
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}: stderr line is not JSON ({e}): {line}"));
            let level = v["level"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no level: {line}"));
            assert!(v["message"].is_string(), "{what}: no message: {line}");
            levels.insert(level.to_string());
        }
        levels
    };
    let phases = |r: &serde_json::Value| -> BTreeMap<String, u64> {
        r["phases"]
            .as_array()
            .unwrap_or_else(|| panic!("no phases: {r}"))
            .iter()
            .map(|p| {
                (
                    p["phase"].as_str().expect("phase name").to_string(),
                    p["duration_ms"].as_u64().expect("phase duration"),
                )
            })
            .collect()
    };
    let tables = |r: &serde_json::Value| -> BTreeMap<String, (u64, u64)> {
        r["tables"]
            .as_array()
            .unwrap_or_else(|| panic!("no tables: {r}"))
            .iter()
            .map(|t| {
                (
                    t["table"].as_str().expect("table").to_string(),
                    (
                        t["rows"].as_u64().expect("rows"),
                        t["bytes"].as_u64().expect("bytes"),
                    ),
                )
            })
            .collect()
    };
    let expected: BTreeMap<String, u64> = expected_rows()
        .into_iter()
        .map(|(t, n)| (t, n as u64))
        .collect();
    let rows_of = |t: &BTreeMap<String, (u64, u64)>| -> BTreeMap<String, u64> {
        for (table, (_, bytes)) in t {
            assert!(*bytes > 0, "bytes of {table}");
        }
        t.iter().map(|(k, (r, _))| (k.clone(), *r)).collect()
    };

    let throughput = |what: &str, r: &serde_json::Value| {
        let t = &r["throughput"];
        assert!(t["copy_ms"].as_u64().is_some(), "{what}: throughput: {r}");
        assert!(
            t["rows_per_s"].as_f64().is_some_and(|v| v > 0.0)
                && t["bytes_per_s"].as_f64().is_some_and(|v| v > 0.0),
            "{what}: throughput: {t}"
        );
    };

    // start
    let (source, dest) = simple_pair("otlp_json_start").await;
    let dir = WorkDir::new("json");
    let out = output(plain(&dir).args([
        "-v",
        "start",
        "--log-format",
        "json",
        "--json",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "pgzm failed: {stderr}");
    let levels = json_lines("start", &stderr);
    assert!(
        levels.contains("DEBUG") && levels.contains("INFO"),
        "{levels:?}"
    );
    let r = one_json("start", &text(&out.stdout));
    let p = phases(&r);
    for phase in ["plan", "shadow", "copy", "constraints", "swap"] {
        assert!(p.contains_key(phase), "start: phase {phase}: {p:?}");
    }
    assert_eq!(rows_of(&tables(&r)), expected, "{r}");
    throughput("start", &r);
    assert!(
        r["swap"]["lock_held_us"].as_i64().is_some_and(|us| us >= 0),
        "{r}"
    );
    assert!(r["warnings"].is_array(), "{r}");

    // prepare, then swap
    let (source, dest) = simple_pair("otlp_json_two").await;
    let dest_url = dest.url();
    let swap = [
        "swap",
        "--log-format",
        "json",
        "--json",
        "--dest",
        &dest_url,
    ];
    let out = output(plain(&dir).args([
        "prepare",
        "--log-format",
        "json",
        "--json",
        "--source",
        &source.url(),
        "--dest",
        &dest.url(),
    ]))
    .await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "pgzm prepare failed: {stderr}");
    json_lines("prepare", &stderr);
    let r = one_json("prepare", &text(&out.stdout));
    let p = phases(&r);
    for phase in ["plan", "shadow", "copy", "constraints"] {
        assert!(p.contains_key(phase), "prepare: phase {phase}: {p:?}");
    }
    assert!(!p.contains_key("swap"), "prepare does not swap: {p:?}");
    assert_eq!(rows_of(&tables(&r)), expected, "{r}");
    throughput("prepare", &r);

    let out = output(plain(&dir).args(swap)).await;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "pgzm swap failed: {stderr}");
    json_lines("swap", &stderr);
    let r = one_json("swap", &text(&out.stdout));
    assert!(phases(&r).contains_key("swap"), "{r}");
    assert_eq!(rows_of(&tables(&r)), expected, "{r}");
    throughput("swap", &r);
    assert!(
        r["swap"]["lock_held_us"].as_i64().is_some_and(|us| us >= 0),
        "{r}"
    );

    // A failure is a JSON line too.
    let out = output(plain(&dir).args(swap)).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "nothing left to swap: {stderr}");
    let levels = json_lines("failed swap", &stderr);
    assert!(levels.contains("ERROR"), "{stderr}");
    // And one JSON error document on stdout.
    let doc = one_json("failed swap --json", &text(&out.stdout));
    assert_eq!(doc["outcome"], "error", "{doc}");
    assert_eq!(doc["command"], "swap", "{doc}");
    assert_eq!(doc["schema_version"], 1, "{doc}");
    assert_eq!(
        doc["error"]["exit_status"].as_u64(),
        out.status.code().map(|c| c as u64),
        "{doc}"
    );
    assert!(
        doc["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{doc}"
    );
}

/// A collector that cannot be reached (nothing listens on its port) fails neither the run nor
/// its exit, and the lost export is reported on stderr rather than dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_is_reported_and_does_not_fail_the_run() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let (source, dest) = simple_pair("otlp_down").await;
    for protocol in [Some("grpc"), None] {
        let otel = Otel {
            endpoint: format!("http://{closed}"),
            protocol,
            batch_delay_ms: 100,
        };
        let dir = WorkDir::new("down");
        // `output` bounds the run, export attempts included, by DEADLINE.
        let out = output(pgzm(&dir, &otel, "otlp-down").args([
            "start",
            "--source",
            &source.url(),
            "--dest",
            &dest.url(),
        ]))
        .await;
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{protocol:?}: {stderr}");
        for signal in ["spans", "metrics"] {
            assert!(
                stderr.contains(&format!("could not export the run's {signal}")),
                "{protocol:?}: {stderr}"
            );
        }
    }
}
