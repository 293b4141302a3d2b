//! A Prometheus scrape endpoint for `pgzm-agent --metrics-listen`, for clusters that scrape
//! rather than receive OTLP.
//!
//! The agent's meter provider gets one more periodic reader whose exporter renders what it is
//! given (cumulative) in Prometheus' text exposition format into a [`Snapshot`]; the endpoint
//! serves the latest one. It is rendered every [`SCRAPE_INTERVAL`] and within a second after
//! tasks end (the flush of [`crate::telemetry::task_ended`]), so a scrape is at most that old.
//!
//! Names follow OpenTelemetry's Prometheus compatibility rules: dots become underscores, the
//! unit is a suffix (`_bytes`, `_seconds`; annotations such as `{row}` are left out), counters
//! end in `_total`, histograms give `_bucket`/`_sum`/`_count`.

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::Temporality;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How often the snapshot is rendered (besides after tasks end).
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);

/// The latest rendering of the metrics, shared by the exporter and the endpoint.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(Arc<RwLock<String>>);

impl Snapshot {
    /// The exposition text (empty before the first rendering).
    pub fn text(&self) -> String {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, text: String) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = text;
    }
}

/// The exporter that renders into a [`Snapshot`].
#[derive(Debug, Clone)]
pub struct SnapshotExporter(pub Snapshot);

impl PushMetricExporter for SnapshotExporter {
    fn export(
        &self,
        metrics: &ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        self.0.set(render(metrics));
        async { Ok(()) }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
}

/// `metrics` in Prometheus' text exposition format (version 0.0.4).
pub fn render(metrics: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in metrics.scope_metrics() {
        for m in scope.metrics() {
            match m.data() {
                AggregatedMetrics::F64(d) => render_metric(&mut out, m, d, |v| v),
                AggregatedMetrics::U64(d) => render_metric(&mut out, m, d, |v| v as f64),
                AggregatedMetrics::I64(d) => render_metric(&mut out, m, d, |v| v as f64),
            }
        }
    }
    out
}

fn render_metric<T: Copy>(
    out: &mut String,
    m: &Metric,
    data: &MetricData<T>,
    f: impl Fn(T) -> f64,
) {
    let base = metric_name(m.name(), m.unit());
    let help = escape_help(m.description());
    match data {
        MetricData::Sum(sum) => {
            let (name, kind) = if sum.is_monotonic() {
                (format!("{base}_total"), "counter")
            } else {
                (base, "gauge")
            };
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for p in sum.data_points() {
                let _ = writeln!(
                    out,
                    "{name}{} {}",
                    labels(p.attributes(), None),
                    number(f(p.value()))
                );
            }
        }
        MetricData::Gauge(gauge) => {
            let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} gauge");
            for p in gauge.data_points() {
                let _ = writeln!(
                    out,
                    "{base}{} {}",
                    labels(p.attributes(), None),
                    number(f(p.value()))
                );
            }
        }
        MetricData::Histogram(h) => {
            let _ = writeln!(out, "# HELP {base} {help}\n# TYPE {base} histogram");
            for p in h.data_points() {
                let mut cumulative = 0u64;
                let counts: Vec<u64> = p.bucket_counts().collect();
                for (i, bound) in p.bounds().enumerate() {
                    cumulative += counts.get(i).copied().unwrap_or(0);
                    let le = number(bound);
                    let _ = writeln!(
                        out,
                        "{base}_bucket{} {cumulative}",
                        labels(p.attributes(), Some(&le))
                    );
                }
                let _ = writeln!(
                    out,
                    "{base}_bucket{} {}",
                    labels(p.attributes(), Some("+Inf")),
                    p.count()
                );
                let _ = writeln!(
                    out,
                    "{base}_sum{} {}",
                    labels(p.attributes(), None),
                    number(f(p.sum()))
                );
                let _ = writeln!(
                    out,
                    "{base}_count{} {}",
                    labels(p.attributes(), None),
                    p.count()
                );
            }
        }
        // Not used by the agent's instruments.
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// The Prometheus name of an instrument: `[a-zA-Z0-9_:]`, with its unit as a suffix.
fn metric_name(name: &str, unit: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let suffix = match unit {
        "By" => "bytes",
        "s" => "seconds",
        "ms" => "milliseconds",
        _ => "",
    };
    if !suffix.is_empty() && !out.ends_with(suffix) {
        out.push('_');
        out.push_str(suffix);
    }
    out
}

/// `{key="value",…}` (empty without labels), with `le` last for histogram buckets.
fn labels<'a>(attributes: impl Iterator<Item = &'a KeyValue>, le: Option<&str>) -> String {
    let mut parts: Vec<String> = attributes
        .map(|kv| {
            let key: String = kv
                .key
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("{key}=\"{}\"", escape_label(&kv.value.to_string()))
        })
        .collect();
    parts.sort();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as Prometheus writes it.
fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else if v.is_nan() {
        "NaN".to_string()
    } else {
        format!("{v}")
    }
}

/// Longest request head the endpoint reads.
const MAX_REQUEST: usize = 8 << 10;

/// Serves `GET /metrics` (the snapshot) on `listener` until `stop` resolves: HTTP/1.1, one
/// request per connection. Anything else gets 404 (or 405 for another method).
pub async fn serve(
    listener: TcpListener,
    snapshot: Snapshot,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        let (mut stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(_) => continue,
            },
            () = &mut stop => return,
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, body) = match (method, path.split('?').next().unwrap_or("")) {
                ("GET", "/metrics") => ("200 OK", snapshot.text()),
                ("GET", _) => ("404 Not Found", "not found: GET /metrics\n".to_string()),
                _ => ("405 Method Not Allowed", "only GET /metrics\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_compatibility_rules() {
        assert_eq!(
            metric_name("pgzm_agent.task.bytes", "By"),
            "pgzm_agent_task_bytes"
        );
        assert_eq!(
            metric_name("pgzm_agent.task.duration", "s"),
            "pgzm_agent_task_duration_seconds"
        );
        assert_eq!(
            metric_name("pgzm_agent.task.rows", "{row}"),
            "pgzm_agent_task_rows"
        );
        assert_eq!(
            labels([KeyValue::new("table", "public.\"x\"")].iter(), Some("0.5")),
            "{table=\"public.\\\"x\\\"\",le=\"0.5\"}"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(0.005), "0.005");
        assert_eq!(number(3.0), "3");
    }
}
