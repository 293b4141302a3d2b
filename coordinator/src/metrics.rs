//! OpenTelemetry metrics of a run (exported only when OTLP is configured; otherwise the global
//! meter is a no-op).

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Histogram};

/// The instruments.
pub struct Metrics {
    /// Rows copied, by table.
    pub rows: Counter<u64>,
    /// COPY bytes moved, by table.
    pub bytes: Counter<u64>,
    /// Copy task durations, seconds.
    pub task_duration: Histogram<f64>,
    /// Copy task retries and failovers.
    pub retries: Counter<u64>,
    /// Time the swap held its locks, milliseconds.
    pub swap_lock_held: Histogram<f64>,
    /// Time the swap spent waiting for its locks (all attempts), milliseconds.
    pub swap_lock_wait: Histogram<f64>,
}

/// The instruments, created on first use from the global meter provider.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("pgzm");
        Metrics {
            rows: meter
                .u64_counter("pgzm.copy.rows")
                .with_description("rows copied")
                .build(),
            bytes: meter
                .u64_counter("pgzm.copy.bytes")
                .with_unit("By")
                .with_description("COPY bytes moved")
                .build(),
            task_duration: meter
                .f64_histogram("pgzm.copy.task.duration")
                .with_unit("s")
                .build(),
            retries: meter
                .u64_counter("pgzm.copy.retries")
                .with_description("task retries and failovers")
                .build(),
            swap_lock_held: meter
                .f64_histogram("pgzm.swap.lock_held")
                .with_unit("ms")
                .build(),
            swap_lock_wait: meter
                .f64_histogram("pgzm.swap.lock_wait")
                .with_unit("ms")
                .build(),
        }
    })
}
