//! Progress of the copy: how much of the plan's estimate has landed, the rate, and an ETA.
//!
//! The plan estimates each table by its source heap + TOAST size, while tasks report COPY
//! payload bytes, which differ (binary COPY is usually smaller than the heap). The tracker
//! counts a finished task as its whole estimate, and converts the bytes of the tasks in flight
//! into estimate units with the COPY-bytes-per-estimated-byte ratio of the tasks finished so far.
//! The ETA is the remaining fraction at the average rate since the first bytes landed (the
//! connections and snapshot imports before them would make an early ETA too long).
//!
//! Shown two ways: on a terminal, bars (overall, and a line per table in flight; each finished
//! table printed above them), when the CLI asks for them; otherwise, when `every` is set, an
//! info log line at that interval (for logs read by people or by machines: `--log-format json`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    tables: BTreeMap<String, ProgressBar>,
}

/// The copy's progress model.
#[derive(Debug, Clone)]
struct Tracker {
    started: Instant,
    /// When the first bytes were reported.
    first_bytes: Option<Instant>,
    /// Sum of the tasks' estimates.
    total_est: f64,
    /// Estimates of the finished tasks.
    finished_est: f64,
    /// COPY bytes of the finished tasks.
    finished_copy: f64,
    /// Tasks in flight: (estimate, COPY bytes so far).
    in_flight: BTreeMap<String, (f64, f64)>,
}

/// A snapshot of the progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Time since the copy began.
    pub elapsed: Duration,
    /// Fraction of the estimate done, 0..=1.
    pub fraction: f64,
    /// COPY bytes landed or in flight.
    pub copied_bytes: u64,
    /// Estimated time left (none before anything moved).
    pub eta: Option<Duration>,
}

impl Tracker {
    fn ratio(&self) -> f64 {
        if self.finished_est > 0.0 && self.finished_copy > 0.0 {
            self.finished_copy / self.finished_est
        } else {
            1.0
        }
    }

    fn snapshot(&self) -> Snapshot {
        let ratio = self.ratio();
        let in_flight: f64 = self
            .in_flight
            .values()
            .map(|(est, copied)| (copied / ratio).min(*est))
            .sum();
        let done = self.finished_est + in_flight;
        let fraction = if self.total_est > 0.0 {
            (done / self.total_est).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let elapsed = self.started.elapsed();
        let moving = self.first_bytes.map(|t| t.elapsed()).unwrap_or_default();
        let eta = (fraction > 0.0)
            .then(|| Duration::from_secs_f64(moving.as_secs_f64() * (1.0 - fraction) / fraction));
        Snapshot {
            elapsed,
            fraction,
            copied_bytes: (self.finished_copy
                + self.in_flight.values().map(|(_, c)| c).sum::<f64>())
                as u64,
            eta,
        }
    }
}

struct State {
    tracker: Tracker,
    bars: Option<Bars>,
    logger: Option<tokio::task::JoinHandle<()>>,
}

fn state() -> &'static Mutex<Option<State>> {
    static STATE: OnceLock<Mutex<Option<State>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

static WANTED: AtomicBool = AtomicBool::new(false);
/// Log-line interval in ms (0: none).
static LOG_EVERY_MS: AtomicU64 = AtomicU64::new(0);

/// Asks for progress bars during the copy (the CLI, for a person at a terminal).
pub fn request() {
    WANTED.store(true, Ordering::Relaxed);
}

/// Asks for a progress log line every `every` during the copy (none when zero, or when bars are
/// shown).
pub fn log_every(every: Duration) {
    LOG_EVERY_MS.store(
        u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Bar resolution: the overall bar counts thousandths of the estimate.
const BAR_STEPS: u64 = 1000;

fn eta_text(eta: Option<Duration>) -> String {
    match eta {
        None => "?".into(),
        Some(d) if d.as_secs() >= 3600 => {
            format!("{}h{:02}m", d.as_secs() / 3600, d.as_secs() % 3600 / 60)
        }
        Some(d) if d.as_secs() >= 60 => format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60),
        Some(d) => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// Starts tracking a copy whose tasks' estimates add up to `total_est` bytes; shows the bars
/// if requested, or starts the log lines if asked for. Call inside the copy phase's span.
pub fn enable(total_est: u64) {
    let tracker = Tracker {
        started: Instant::now(),
        first_bytes: None,
        total_est: total_est.max(1) as f64,
        finished_est: 0.0,
        finished_copy: 0.0,
        in_flight: BTreeMap::new(),
    };
    let bars = WANTED.load(Ordering::Relaxed).then(|| {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let total = multi.add(ProgressBar::new(BAR_STEPS));
        // At most 80 columns: 5 + 22 + 5 + a message of under 48.
        total.set_style(style("copy [{bar:20}] {percent:>3}% {msg}"));
        total.enable_steady_tick(Duration::from_millis(200));
        // Log lines go above the bars (written below them, the next redraw would erase them
        // and leave a stale frame in the scrollback).
        let above = multi.clone();
        pgzm_agent::telemetry::set_log_sink(Some(std::sync::Arc::new(move |line: &[u8]| {
            let text = String::from_utf8_lossy(line);
            let _ = above.println(text.trim_end_matches('\n'));
        })));
        Bars {
            multi,
            total,
            tables: BTreeMap::new(),
        }
    });
    let every = LOG_EVERY_MS.load(Ordering::Relaxed);
    let logger = (bars.is_none() && every > 0).then(|| {
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(every));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(s) = snapshot() else { return };
                if s.fraction >= 1.0 {
                    tracing::info!(target: "pgzm::progress", elapsed_ms = s.elapsed.as_millis() as u64, percent = 100.0,
                        copied_bytes = s.copied_bytes, "copy progress: all data landed ({}); index builds finishing", HumanBytes(s.copied_bytes));
                    return;
                }
                tracing::info!(
                    target: "pgzm::progress",
                    elapsed_ms = s.elapsed.as_millis() as u64,
                    percent = (s.fraction * 1000.0).round() / 10.0,
                    copied_bytes = s.copied_bytes,
                    eta_ms = s.eta.map(|d| d.as_millis() as u64),
                    "copy progress: {:.1}%, {} copied, {}/s, ETA {}{}",
                    s.fraction * 100.0,
                    HumanBytes(s.copied_bytes),
                    HumanBytes((s.copied_bytes as f64 / s.elapsed.as_secs_f64().max(0.001)) as u64),
                    eta_text(s.eta),
                    note_suffix()
                );
            }
        }))
    });
    *state().lock().unwrap_or_else(|p| p.into_inner()) = Some(State {
        tracker,
        bars,
        logger,
    });
}

/// Why the copy is held back now (e.g. `throttled: replica lag 12 s`), shown with its
/// progress; `None` clears it.
pub fn set_note(note: Option<String>) {
    *note_cell().lock().unwrap_or_else(|p| p.into_inner()) = note;
    if let Some(s) = state().lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        redraw(s);
    }
}

fn note_cell() -> &'static Mutex<Option<String>> {
    static NOTE: std::sync::OnceLock<Mutex<Option<String>>> = std::sync::OnceLock::new();
    NOTE.get_or_init(Default::default)
}

/// The note of [`set_note`], as a suffix (`; throttled: …`), or nothing.
fn note_suffix() -> String {
    note_cell()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|n| format!("; {n}"))
        .unwrap_or_default()
}

/// Whether the terminal progress display is shown now.
pub fn bars_shown() -> bool {
    state()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|s| s.bars.is_some())
}

/// The current progress, while tracking.
pub fn snapshot() -> Option<Snapshot> {
    state()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|s| s.tracker.snapshot())
}

fn redraw(s: &mut State) {
    let snap = s.tracker.snapshot();
    if let Some(b) = s.bars.as_mut() {
        b.total
            .set_position((snap.fraction * BAR_STEPS as f64) as u64);
        b.total.set_message(format!(
            "{} copied, {}/s, ETA {}{}",
            HumanBytes(snap.copied_bytes),
            HumanBytes((snap.copied_bytes as f64 / snap.elapsed.as_secs_f64().max(0.001)) as u64),
            eta_text(snap.eta),
            note_suffix()
        ));
    }
}

/// Task `key` of `table` (estimated at `est` bytes) has moved `copied` COPY bytes so far.
pub fn task_progress(table: &str, key: &str, est: u64, copied: u64) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = guard.as_mut() else { return };
    let entry = s
        .tracker
        .in_flight
        .entry(key.to_string())
        .or_insert((est as f64, 0.0));
    let delta = (copied as f64 - entry.1).max(0.0);
    entry.1 = entry.1.max(copied as f64);
    if copied > 0 && s.tracker.first_bytes.is_none() {
        s.tracker.first_bytes = Some(Instant::now());
    }
    if let Some(b) = s.bars.as_mut() {
        let bar = b.tables.entry(table.to_string()).or_insert_with(|| {
            let bar = b.multi.add(ProgressBar::no_length());
            bar.set_style(style(
                "  {spinner} {msg:<40} {bytes:>10} {bytes_per_sec:>12}",
            ));
            bar.set_message(fit(table, 40));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        bar.inc(delta as u64);
    }
    redraw(s);
}

/// Task `key` landed with `copied` COPY bytes. When `table_rows` is given the whole table has
/// landed (its last task) with that many rows.
pub fn task_done(table: &str, key: &str, est: u64, copied: u64, table_rows: Option<u64>) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = guard.as_mut() else { return };
    let before = s
        .tracker
        .in_flight
        .remove(key)
        .map(|(_, c)| c)
        .unwrap_or(0.0);
    s.tracker.finished_est += est as f64;
    s.tracker.finished_copy += copied as f64;
    if s.tracker.first_bytes.is_none() {
        s.tracker.first_bytes = Some(Instant::now());
    }
    if let Some(b) = s.bars.as_mut() {
        if let Some(bar) = b.tables.get(table) {
            bar.inc((copied as f64 - before).max(0.0) as u64);
        }
        if let Some(rows) = table_rows {
            let bytes = b.tables.remove(table).map(|bar| {
                let n = bar.position();
                bar.finish_and_clear();
                b.multi.remove(&bar);
                n
            });
            let _ = b.multi.println(format!(
                "  done {}: {rows} rows, {}",
                fit(table, 48),
                HumanBytes(bytes.unwrap_or(copied))
            ));
        }
    }
    redraw(s);
}

/// Task `key` failed: what it moved will be moved again.
pub fn task_reset(key: &str) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = guard.as_mut() {
        s.tracker.in_flight.remove(key);
    }
}

/// `text` cut to `width` characters (with `…`), so that progress lines fit 80 columns.
fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_string();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Stops tracking (the copies have ended); removes the bars.
pub fn disable() {
    if let Some(s) = state().lock().unwrap_or_else(|p| p.into_inner()).take() {
        if let Some(l) = s.logger {
            l.abort();
            let snap = s.tracker.snapshot();
            tracing::info!(
                target: "pgzm::progress",
                elapsed_ms = snap.elapsed.as_millis() as u64,
                copied_bytes = snap.copied_bytes,
                "copy progress: copies ended after {:.1} s, {} copied",
                snap.elapsed.as_secs_f64(),
                HumanBytes(snap.copied_bytes)
            );
        }
        if let Some(b) = s.bars {
            pgzm_agent::telemetry::set_log_sink(None);
            for bar in b.tables.values() {
                bar.finish_and_clear();
            }
            b.total.finish_and_clear();
            let _ = b.multi.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(total: f64) -> Tracker {
        Tracker {
            started: Instant::now(),
            first_bytes: Some(Instant::now()),
            total_est: total,
            finished_est: 0.0,
            finished_copy: 0.0,
            in_flight: BTreeMap::new(),
        }
    }

    #[test]
    fn finished_tasks_count_whole_and_teach_the_ratio() {
        let mut t = tracker(400.0);
        assert_eq!(t.snapshot().fraction, 0.0);
        assert!(t.snapshot().eta.is_none());
        // A 100-byte estimate landed as 50 COPY bytes: ratio 0.5.
        t.finished_est = 100.0;
        t.finished_copy = 50.0;
        assert!((t.snapshot().fraction - 0.25).abs() < 1e-9);
        // 50 COPY bytes of a 200-byte task in flight are 100 estimate bytes.
        t.in_flight.insert("t1".into(), (200.0, 50.0));
        assert!((t.snapshot().fraction - 0.5).abs() < 1e-9);
        // In-flight progress never counts for more than the task's estimate.
        t.in_flight.insert("t1".into(), (200.0, 500.0));
        assert!((t.snapshot().fraction - 0.75).abs() < 1e-9);
        assert_eq!(t.snapshot().copied_bytes, 550);
    }

    #[test]
    fn eta_is_the_remaining_fraction_at_the_average_rate() {
        let mut t = tracker(100.0);
        t.first_bytes = Some(Instant::now() - Duration::from_secs(10));
        t.finished_est = 25.0;
        t.finished_copy = 25.0;
        let eta = t.snapshot().eta.unwrap().as_secs_f64();
        assert!((eta - 30.0).abs() < 0.5, "{eta}");
    }
}
