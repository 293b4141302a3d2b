//! Live progress of the copy on a terminal: an overall bar (bytes against the plan's estimate,
//! rate, ETA) and a line per table in flight (bytes, rate); each finished table is printed above
//! the bars. Off (no-op) unless requested, which the CLI does only when stderr is a terminal and
//! output is neither quiet nor JSON; otherwise plain log lines report each table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

struct State {
    multi: MultiProgress,
    total: ProgressBar,
    tables: BTreeMap<String, ProgressBar>,
}

fn state() -> &'static Mutex<Option<State>> {
    static STATE: OnceLock<Mutex<Option<State>>> = OnceLock::new();
    STATE.get_or_init(|| Mutex::new(None))
}

static WANTED: AtomicBool = AtomicBool::new(false);

/// Asks for progress bars during the copy (the CLI, for a person at a terminal).
pub fn request() {
    WANTED.store(true, Ordering::Relaxed);
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Shows the bars on stderr for `total_bytes` (the plan's estimate; grows if exceeded), if
/// requested.
pub fn enable(total_bytes: u64) {
    if !WANTED.load(Ordering::Relaxed) {
        return;
    }
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let total = multi.add(ProgressBar::new(total_bytes.max(1)));
    total.set_style(style(
        "copy [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    ));
    total.enable_steady_tick(Duration::from_millis(200));
    *state().lock().unwrap_or_else(|p| p.into_inner()) = Some(State {
        multi,
        total,
        tables: BTreeMap::new(),
    });
}

/// Bytes of `table` that landed since the last call.
pub fn advance(table: &str, delta: u64) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = guard.as_mut() else { return };
    if s.total.position() + delta > s.total.length().unwrap_or(0) {
        s.total.set_length(s.total.position() + delta);
    }
    s.total.inc(delta);
    let bar = s.tables.entry(table.to_string()).or_insert_with(|| {
        let b = s.multi.add(ProgressBar::no_length());
        b.set_style(style(
            "  {spinner} {msg:<40} {bytes:>10} {bytes_per_sec:>12}",
        ));
        b.set_message(format!("\"{table}\""));
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    bar.inc(delta);
}

/// `table` has landed with `rows` rows.
pub fn finish_table(table: &str, rows: u64) {
    let mut guard = state().lock().unwrap_or_else(|p| p.into_inner());
    let Some(s) = guard.as_mut() else { return };
    let bytes = s.tables.remove(table).map(|b| {
        let n = b.position();
        b.finish_and_clear();
        s.multi.remove(&b);
        n
    });
    let _ = s.multi.println(format!(
        "  done \"{table}\": {rows} rows, {}",
        HumanBytes(bytes.unwrap_or(0))
    ));
}

/// Removes the bars.
pub fn disable() {
    if let Some(s) = state().lock().unwrap_or_else(|p| p.into_inner()).take() {
        for b in s.tables.values() {
            b.finish_and_clear();
        }
        s.total.finish_and_clear();
        let _ = s.multi.clear();
    }
}
