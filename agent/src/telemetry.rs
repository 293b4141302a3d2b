//! Logs, traces and metrics for both binaries.
//!
//! - Logs: `tracing` to stderr, text (default) or JSON lines (`--log-format json`).
//! - Traces and metrics: exported with OTLP when the standard variables are set
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; protocol from
//!   `OTEL_EXPORTER_OTLP_PROTOCOL`: `grpc` or `http/protobuf`, the default; `OTEL_SERVICE_NAME`,
//!   `OTEL_RESOURCE_ATTRIBUTES`). [`Telemetry::shutdown`] flushes them, also after a failure.
//! - Trace context crosses gRPC as W3C `traceparent` metadata ([`inject`], [`extract`]), so an
//!   agent's spans are children of the coordinator's task span.
//!
//! The SDK's batch processors export from threads of their own, where the OTLP clients (tonic,
//! hyper) find no Tokio reactor; [`OnRuntime`] runs the exporters on a small runtime they own.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{SdkMeterProvider, Temporality};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installed telemetry; call [`Telemetry::shutdown`] before the process exits.
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    /// What was set up, for a log line.
    pub exporting: Option<String>,
}

impl Telemetry {
    /// Flushes and stops the exporters (bounded: a collector that is down does not hang exit).
    /// A failed export is reported (once per signal), not silently dropped: an operator whose
    /// collector address is wrong learns it from the run's log.
    ///
    /// The spans are flushed (which reports a failed export), then the provider stops; the
    /// meter provider's shutdown exports the metrics once (a flush before it would export them
    /// twice) and reports a failure itself.
    pub fn shutdown(self) {
        let what = self.exporting.unwrap_or_default();
        if let Some(p) = self.tracer_provider {
            if let Err(e) = p.force_flush() {
                tracing::warn!(exporter = %what, error = %e, "could not export the run's spans");
            }
            let _ = p.shutdown();
        }
        if let Some(m) = self.meter_provider {
            if let Err(e) = m.shutdown() {
                tracing::warn!(exporter = %what, error = %e, "could not export the run's metrics");
            }
        }
    }

    /// Exports the metrics soon after each task that ends ([`task_ended`]), not only every
    /// minute: for a long-running agent.
    pub fn flush_metrics_after_tasks(&self) {
        if let Some(m) = &self.meter_provider {
            let _ = TASK_METRICS.set(m.clone());
        }
    }
}

/// The meter provider [`task_ended`] flushes (set by [`Telemetry::flush_metrics_after_tasks`]).
static TASK_METRICS: std::sync::OnceLock<SdkMeterProvider> = std::sync::OnceLock::new();

/// Minimum time between two flushes by [`task_ended`].
const TASK_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// A copy task ended: its metrics are exported within [`TASK_FLUSH_INTERVAL`] (tasks ending
/// together share one export), off the async threads.
pub fn task_ended() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PENDING: AtomicBool = AtomicBool::new(false);
    let Some(provider) = TASK_METRICS.get() else {
        return;
    };
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    let provider = provider.clone();
    std::thread::spawn(move || {
        std::thread::sleep(TASK_FLUSH_INTERVAL);
        PENDING.store(false, Ordering::Release);
        if let Err(e) = provider.force_flush() {
            tracing::debug!(error = %e, "could not export the agent's metrics");
        }
    });
}

/// Whether the standard variables ask for OTLP export.
pub fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
        && std::env::var("OTEL_SDK_DISABLED")
            .map(|v| v != "true")
            .unwrap_or(true)
}

fn grpc() -> bool {
    let p = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_default();
    p.trim() == "grpc"
}

/// The resource: `OTEL_SERVICE_NAME` (else `default_service`), `service.version` (pgzm's,
/// unless `OTEL_RESOURCE_ATTRIBUTES` gives one), the SDK's attributes and
/// `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(default_service: &str) -> Resource {
    let mut b = Resource::builder();
    let given = std::env::var("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    if !given
        .split(',')
        .any(|kv| kv.trim_start().starts_with("service.version="))
    {
        b = b.with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    }
    if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|s| !s.is_empty()) {
        b.build()
    } else {
        b.with_service_name(default_service.to_string()).build()
    }
}

/// The layer that turns spans into OpenTelemetry spans: `otel.kind`, `otel.name` and
/// `otel.status_*` fields set the span's kind, name and status; tracing's own attributes only
/// at `verbose` 2.
fn otel_layer<S, T>(tracer: T, verbose: u8) -> tracing_opentelemetry::OpenTelemetryLayer<S, T>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    let noisy = verbose >= 2;
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(noisy)
        .with_threads(noisy)
        .with_location(noisy)
        .with_target(noisy)
}

/// Runs an exporter on a Tokio runtime of its own (see the module docs).
#[derive(Debug, Clone)]
pub struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<E> OnRuntime<E> {
    fn new(runtime: Arc<tokio::runtime::Runtime>, make: impl FnOnce() -> E) -> Self {
        let _guard = runtime.enter();
        OnRuntime {
            inner: Arc::new(make()),
            runtime,
        }
    }
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let (inner, runtime) = (Arc::clone(&self.inner), Arc::clone(&self.runtime));
        async move { runtime.block_on(async move { inner.export(batch).await }) }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _g = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _g = self.runtime.enter();
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for OnRuntime<E> {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let result = self.runtime.block_on(self.inner.export(metrics));
        async move { result }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let _g = self.runtime.enter();
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let _g = self.runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

fn exporter_runtime() -> std::io::Result<Arc<tokio::runtime::Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pgzm-otlp")
            .enable_all()
            .build()?,
    ))
}

/// Where a log line goes instead of stderr while a terminal display owns stderr (the
/// coordinator's progress bars print it above themselves).
pub type LogSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

fn log_sink() -> &'static std::sync::RwLock<Option<LogSink>> {
    static SINK: std::sync::OnceLock<std::sync::RwLock<Option<LogSink>>> =
        std::sync::OnceLock::new();
    SINK.get_or_init(|| std::sync::RwLock::new(None))
}

/// Routes log lines to `sink` (None: back to stderr).
pub fn set_log_sink(sink: Option<LogSink>) {
    *log_sink().write().unwrap_or_else(|p| p.into_inner()) = sink;
}

/// A log line being written: sent whole, when done, to the sink or to stderr.
struct LogLine(Vec<u8>);

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let sink = log_sink().read().unwrap_or_else(|p| p.into_inner()).clone();
        match sink {
            Some(sink) => sink(&self.0),
            None => {
                use std::io::Write;
                let _ = std::io::stderr().lock().write_all(&self.0);
            }
        }
    }
}

/// A log line for a terminal: `HH:MM:SS LEVEL message field=value…` (UTC).
struct TerminalLine;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for TerminalLine
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            % 86_400;
        let level = *event.metadata().level();
        let (on, off) = if writer.has_ansi_escapes() {
            let colour = match level {
                tracing::Level::ERROR => "\x1b[31m",
                tracing::Level::WARN => "\x1b[33m",
                tracing::Level::INFO => "\x1b[32m",
                _ => "\x1b[2m",
            };
            (colour, "\x1b[0m")
        } else {
            ("", "")
        };
        write!(
            writer,
            "{:02}:{:02}:{:02} {on}{level:>5}{off} ",
            secs / 3600,
            secs / 60 % 60,
            secs % 60
        )?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

fn log_line() -> LogLine {
    LogLine(Vec::with_capacity(256))
}

/// Sets up logging (and OTLP export when configured) for a binary named `service`.
/// `default_filter` is the log filter unless `PGZM_LOG` is set. Spans carry tracing's own
/// attributes (`busy_ns`, `idle_ns`, `thread.*`, `code.*`) only at `verbose` 2 (`-vv`).
///
/// With `prometheus`, the metrics are also rendered into that snapshot (the agent's
/// `--metrics-listen` endpoint serves it), with or without OTLP export.
pub fn init(
    service: &str,
    default_filter: &str,
    format: LogFormat,
    verbose: u8,
    prometheus: Option<&crate::prometheus::Snapshot>,
) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        || EnvFilter::try_from_env("PGZM_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(log_line as fn() -> LogLine)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        // A person reads a terminal: the time of day, the level and the event, without the
        // spans' context (which `--log-format json`, the log file and the traces keep).
        LogFormat::Text if terminal => fmt.event_format(TerminalLine).with_filter(filter()).boxed(),
        LogFormat::Text => fmt.with_filter(filter()).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter())
            .boxed(),
    };
    let mut telemetry = Telemetry {
        tracer_provider: None,
        meter_provider: None,
        exporting: None,
    };
    let mut otel_error = None;
    let otel = if otlp_configured() {
        match build_providers(service, prometheus) {
            Ok((tracer, meter, what)) => {
                let layer = otel_layer(tracer.tracer(service.to_string()), verbose)
                    // `pgzm` is the target of the coordinator binary's root span: without it
                    // every phase would be a trace of its own.
                    .with_filter(EnvFilter::new(
                        "pgzm=info,pgzm_coordinator=info,pgzm_agent=info,warn",
                    ));
                opentelemetry::global::set_meter_provider(meter.clone());
                telemetry.tracer_provider = Some(tracer);
                telemetry.meter_provider = Some(meter);
                telemetry.exporting = Some(what);
                Some(layer)
            }
            Err(e) => {
                otel_error = Some(e);
                None
            }
        }
    } else {
        if let Some(snapshot) = prometheus {
            let meter = SdkMeterProvider::builder()
                .with_resource(resource(service))
                .with_reader(prometheus_reader(snapshot))
                .build();
            opentelemetry::global::set_meter_provider(meter.clone());
            telemetry.meter_provider = Some(meter);
        }
        None
    };
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(e) = otel_error {
        tracing::warn!(error = %e, "OpenTelemetry export is configured but could not be set up; continuing without it");
    }
    if let Some(what) = &telemetry.exporting {
        tracing::debug!(exporter = %what, "exporting traces and metrics");
    }
    telemetry
}

/// The reader that renders the metrics for Prometheus every
/// [`crate::prometheus::SCRAPE_INTERVAL`] (and on every flush).
fn prometheus_reader(
    snapshot: &crate::prometheus::Snapshot,
) -> opentelemetry_sdk::metrics::PeriodicReader<crate::prometheus::SnapshotExporter> {
    opentelemetry_sdk::metrics::PeriodicReader::builder(crate::prometheus::SnapshotExporter(
        snapshot.clone(),
    ))
    .with_interval(crate::prometheus::SCRAPE_INTERVAL)
    .build()
}

fn build_providers(
    service: &str,
    prometheus: Option<&crate::prometheus::Snapshot>,
) -> Result<(SdkTracerProvider, SdkMeterProvider, String), String> {
    use opentelemetry_otlp::{MetricExporter, SpanExporter as OtlpSpanExporter};
    let runtime = exporter_runtime().map_err(|e| format!("start the exporter runtime: {e}"))?;
    let grpc = grpc();
    let spans = {
        let _g = runtime.enter();
        if grpc {
            OtlpSpanExporter::builder().with_tonic().build()
        } else {
            OtlpSpanExporter::builder().with_http().build()
        }
        .map_err(|e| format!("build the OTLP span exporter: {e}"))?
    };
    let metrics = {
        let _g = runtime.enter();
        if grpc {
            MetricExporter::builder().with_tonic().build()
        } else {
            MetricExporter::builder().with_http().build()
        }
        .map_err(|e| format!("build the OTLP metric exporter: {e}"))?
    };
    let spans = OnRuntime::new(Arc::clone(&runtime), || spans);
    let metrics = OnRuntime::new(Arc::clone(&runtime), || metrics);
    let resource = resource(service);
    let tracer = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(spans)
        .build();
    let mut meter = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_periodic_exporter(metrics);
    if let Some(snapshot) = prometheus {
        meter = meter.with_reader(prometheus_reader(snapshot));
    }
    let meter = meter.build();
    Ok((
        tracer,
        meter,
        if grpc {
            "otlp/grpc".into()
        } else {
            "otlp/http".into()
        },
    ))
}

/// Builds the tracing layer for a given span exporter (tests use an in-memory one).
pub fn layer_with_exporter<S, E>(exporter: E, service: &str) -> (impl Layer<S>, SdkTracerProvider)
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    E: SpanExporter + 'static,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = SdkTracerProvider::builder()
        .with_resource(resource(service))
        .with_simple_exporter(exporter)
        .build();
    let layer = otel_layer(provider.tracer(service.to_string()), 0);
    (layer, provider)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Writes the current span's trace context into gRPC request metadata (`traceparent`).
pub fn inject(metadata: &mut MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
}

/// Reads a caller's trace context from gRPC request metadata.
pub fn extract(metadata: &MetadataMap) -> Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// Makes `span` a child of the caller's trace, when the request carries one.
pub fn follow(span: &tracing::Span, metadata: &MetadataMap) {
    let cx = extract(metadata);
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// `rpc.service` of the agent's gRPC service.
pub const RPC_SERVICE: &str = "pgzm.agent.v1.Agent";

/// A CLIENT span for a call of `method` (`RunCopy`, `ExportRange`, `Info`, `Probe`) to the
/// agent at `url`, by OpenTelemetry's RPC conventions. The call's request must be made inside
/// it (its trace context is what the agent's SERVER span follows); see [`record_rpc_status`].
pub fn rpc_client_span(method: &'static str, url: &str) -> tracing::Span {
    let (address, port) = host_and_port(url);
    tracing::info_span!(
        "rpc_client",
        otel.name = format!("{RPC_SERVICE}/{method}").as_str(),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = RPC_SERVICE,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        server.address = address.as_str(),
        server.port = port,
    )
}

/// Makes the call `call` (which builds its request: the request carries this span's trace
/// context) in a CLIENT span of `method` on the agent at `url` ([`rpc_client_span`]), and
/// records its status.
pub async fn traced_call<T, Fut>(
    method: &'static str,
    url: &str,
    call: impl FnOnce() -> Fut,
) -> Result<T, tonic::Status>
where
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    use tracing::Instrument as _;
    let span = rpc_client_span(method, url);
    let result = span.in_scope(call).instrument(span.clone()).await;
    record_rpc_status(
        &span,
        result
            .as_ref()
            .map_or_else(tonic::Status::code, |_| tonic::Code::Ok),
    );
    result
}

/// Records a call's gRPC status on its client or server span (`rpc.grpc.status_code`; an
/// error status for the codes the conventions count as errors).
pub fn record_rpc_status(span: &tracing::Span, code: tonic::Code) {
    span.record("rpc.grpc.status_code", code as i64);
    let error = match code {
        tonic::Code::Ok => false,
        // Server spans: only what is the server's fault.
        _ if is_server(span) => matches!(
            code,
            tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unimplemented
                | tonic::Code::Internal
                | tonic::Code::Unavailable
                | tonic::Code::DataLoss
        ),
        _ => true,
    };
    if error {
        span.record("otel.status_code", "ERROR");
    }
}

/// The agent's SERVER spans (by their tracing names).
fn is_server(span: &tracing::Span) -> bool {
    span.metadata()
        .is_some_and(|m| matches!(m.name(), "agent_task" | "export_range"))
}

/// `host` and `port` of a `scheme://host:port…` URL (port 443 or 80 by the scheme when absent).
fn host_and_port(url: &str) -> (String, i64) {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let default = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').unwrap_or((v6, ""));
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host.to_string(), port.unwrap_or(default));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            (host.to_string(), port.parse().unwrap_or(default))
        }
        _ => (authority.to_string(), default),
    }
}

/// Records on `span` (declared with these fields) where its PostgreSQL statements go, by
/// OpenTelemetry's database conventions: `db.namespace`, `server.address`, `server.port`.
pub fn record_db_server(span: &tracing::Span, server: &pgzm_pg::conn::ServerOf) {
    span.record("db.namespace", server.namespace.as_str());
    span.record("server.address", server.address.as_str());
    span.record("server.port", i64::from(server.port));
}

#[cfg(test)]
mod conventions_tests {
    use super::host_and_port;

    #[test]
    fn agent_urls_give_host_and_port() {
        assert_eq!(
            host_and_port("https://agent.example.com:50051"),
            ("agent.example.com".into(), 50051)
        );
        assert_eq!(host_and_port("http://[::1]:7000/"), ("::1".into(), 7000));
        assert_eq!(host_and_port("https://agent"), ("agent".into(), 443));
        assert_eq!(
            host_and_port("http://in-process.agent"),
            ("in-process.agent".into(), 80)
        );
    }
}
