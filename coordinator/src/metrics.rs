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
    /// Time the swap held its locks, seconds.
    pub swap_lock_held: Histogram<f64>,
    /// Time the swap spent waiting for its locks (all attempts), seconds.
    pub swap_lock_wait: Histogram<f64>,
}

/// Bucket boundaries (seconds) of the swap's lock times: from a tenth of a millisecond (a few
/// tables) to the longest lock wait a swap allows.
pub const SWAP_SECONDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// The instruments, created on first use from the global meter provider.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("pgzm");
        Metrics {
            rows: meter
                .u64_counter("pgzm.copy.rows")
                .with_unit("{row}")
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
                .with_description("copy task durations")
                .with_boundaries(pgzm_agent::metrics::TASK_SECONDS.to_vec())
                .build(),
            retries: meter
                .u64_counter("pgzm.copy.retries")
                .with_unit("{retry}")
                .with_description("task retries and failovers")
                .build(),
            swap_lock_held: meter
                .f64_histogram("pgzm.swap.lock_held")
                .with_unit("s")
                .with_description("time the swap held its locks")
                .with_boundaries(SWAP_SECONDS.to_vec())
                .build(),
            swap_lock_wait: meter
                .f64_histogram("pgzm.swap.lock_wait")
                .with_unit("s")
                .with_description("time the swap spent getting its locks (all attempts)")
                .with_boundaries(SWAP_SECONDS.to_vec())
                .build(),
        }
    })
}
