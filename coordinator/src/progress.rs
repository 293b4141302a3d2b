//! Live progress of the copy on a terminal: overall bytes against the plan's estimate, rate, ETA
//! and the tables in flight. Off (no-op) unless [`enable`] was called, which the CLI does only
//! when stderr is a terminal and output is not quiet or JSON; otherwise plain log lines report
//! each table.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

struct State {
    bar: ProgressBar,
    running: BTreeMap<String, u64>,
}

fn state() -> &'static Mutex<Option<State>> {
    static STATE: OnceLock<Mutex<Option<State>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

static WANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks for a progress bar during the copy (the CLI, for a person at a terminal).
pub fn request() {
    WANTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Shows a progress bar on stderr for `total_bytes` (the plan's estimate; grows if exceeded),
/// if one was requested.
pub fn enable(total_bytes: u64) {
    if !WANTED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let bar = ProgressBar::with_draw_target(Some(total_bytes.max(1)), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} copy [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    *state().lock().unwrap_or_else(|p| p.into_inner()) = Some(State {
        bar,
        running: BTreeMap::new(),
    });
}

/// Bytes of `table` that landed since the last call.
pub fn advance(table: &str, delta: u64) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = guard.as_mut() else { return };
    *s.running.entry(table.to_string()).or_default() += delta;
    if s.bar.position() + delta > s.bar.length().unwrap_or(0) {
        s.bar.set_length(s.bar.position() + delta);
    }
    s.bar.inc(delta);
    let names: Vec<&str> = s.running.keys().map(String::as_str).take(4).collect();
    s.bar.set_message(names.join(", "));
}

/// `table` has landed.
pub fn finish_table(table: &str) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = guard.as_mut() {
        s.running.remove(table);
    }
}

/// Removes the bar.
pub fn disable() {
    if let Some(s) = state().lock().unwrap_or_else(|p| p.into_inner()).take() {
        s.bar.finish_and_clear();
    }
}
