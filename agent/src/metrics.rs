//! OpenTelemetry metrics of an agent's tasks (exported when OTLP is configured; otherwise the
//! global meter is a no-op). In-process, the coordinator exports them with its own.

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Histogram};

/// The instruments.
pub struct Metrics {
    /// Rows written by copy tasks, by table.
    pub rows: Counter<u64>,
    /// COPY bytes written by copy tasks, by table.
    pub bytes: Counter<u64>,
    /// Copy task durations in this agent, seconds.
    pub task_duration: Histogram<f64>,
    /// Copy tasks that failed, by whether a retry may succeed.
    pub failures: Counter<u64>,
    /// COPY bytes streamed to other agents (`ExportRange`), by table.
    pub exported_bytes: Counter<u64>,
}

/// Bucket boundaries (seconds) of task durations: from a few milliseconds (a small table) to
/// an hour (a large range).
pub const TASK_SECONDS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
    3600.0,
];

/// The instruments, created on first use from the global meter provider.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("pgzm-agent");
        Metrics {
            rows: meter
                .u64_counter("pgzm_agent.task.rows")
                .with_unit("{row}")
                .with_description("rows written by this agent's copy tasks")
                .build(),
            bytes: meter
                .u64_counter("pgzm_agent.task.bytes")
                .with_unit("By")
                .with_description("COPY bytes written by this agent's copy tasks")
                .build(),
            task_duration: meter
                .f64_histogram("pgzm_agent.task.duration")
                .with_unit("s")
                .with_description("copy task durations in this agent")
                .with_boundaries(TASK_SECONDS.to_vec())
                .build(),
            failures: meter
                .u64_counter("pgzm_agent.task.failures")
                .with_unit("{task}")
                .with_description("copy tasks that failed in this agent")
                .build(),
            exported_bytes: meter
                .u64_counter("pgzm_agent.export.bytes")
                .with_unit("By")
                .with_description("COPY bytes streamed to other agents")
                .build(),
        }
    })
}
