//! The copy's byte-rate budget (`pgzm --max-rate`, changed while it runs by `pgzm throttle`):
//! how much a run may write into production per second, over all its tasks and agents.
//!
//! The budget lives in the destination (`pgzm.migrations.max_rate`). One [`RateWatch`] per
//! destination and migration in this process reads it every [`POLL`] on a session of its own,
//! while tasks of that migration run. Each task writes at most its share of it (the coordinator
//! gives each task `1 / jobs`), through a token bucket ([`Bucket`]) that follows changes of the
//! budget within a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use pgzm_pg::conn::PgTarget;
use tracing::debug;

/// How often the budget is read.
pub const POLL: Duration = Duration::from_secs(1);

/// The budget of one migration, as last read (bytes per second; 0: unlimited), and whether
/// its copy is paused (a standby lags more than `--max-replication-lag`).
#[derive(Debug)]
pub struct RateWatch {
    bytes_per_s: AtomicU64,
    /// Copy tasks of the run not finished yet (0: not known), as the coordinator publishes it.
    tasks_left: AtomicU64,
    paused: std::sync::atomic::AtomicBool,
    /// When a task last took it.
    last_used: Mutex<Instant>,
}

impl Default for RateWatch {
    fn default() -> Self {
        RateWatch {
            bytes_per_s: AtomicU64::new(0),
            tasks_left: AtomicU64::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            last_used: Mutex::new(Instant::now()),
        }
    }
}

/// A watch no task has held for this long stops (its session closes). Tasks of one run follow
/// each other closely: one watch, one session, serves them all.
const IDLE: Duration = Duration::from_secs(10);

impl RateWatch {
    /// The budget now (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.bytes_per_s.load(Ordering::Relaxed)
    }

    /// Whether the copy is paused now.
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Copy tasks of the run not finished yet; 0 when not known.
    pub fn tasks_left(&self) -> u64 {
        self.tasks_left.load(Ordering::Relaxed)
    }

    fn set(&self, (rate, paused, left): (u64, bool, u64)) -> (u64, bool, u64) {
        (
            self.bytes_per_s.swap(rate, Ordering::Relaxed),
            self.paused.swap(paused, Ordering::Relaxed),
            self.tasks_left.swap(left, Ordering::Relaxed),
        )
    }
}

type Registry = Mutex<HashMap<(String, i64), Weak<RateWatch>>>;

fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Reads `max_rate` (0 when none) and whether the copy is `paused`, of migration `id`.
async fn read(
    client: &tokio_postgres::Client,
    id: i64,
) -> Result<(u64, bool, u64), tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT coalesce(max_rate, 0) AS rate, paused IS NOT NULL AS paused,
                    coalesce(copy_tasks_left, 0)::int8 AS left
               FROM pgzm.migrations WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map_or((0, false, 0), |r| {
        (
            u64::try_from(r.get::<_, i64>("rate")).unwrap_or(0),
            r.get("paused"),
            u64::try_from(r.get::<_, i64>("left")).unwrap_or(0),
        )
    }))
}

/// The watch of migration `id` on the destination `key` (`target`), started with a first read
/// when there is none; it stops once no task has held it for [`IDLE`].
pub async fn watch(
    target: &PgTarget,
    application_name: &str,
    key: &str,
    id: i64,
) -> Arc<RateWatch> {
    let slot = (key.to_string(), id);
    if let Some(w) = registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&slot)
        .and_then(Weak::upgrade)
    {
        w.touch();
        return w;
    }
    let watch = Arc::new(RateWatch::default());
    let client = match crate::pg::connect(target.clone(), application_name).await {
        Ok(c) => Some(c),
        Err(e) => {
            debug!(error = %crate::pg::describe(&e), "cannot read the copy's byte-rate budget now");
            None
        }
    };
    if let Some(c) = &client {
        if let Ok(now) = read(c, id).await {
            watch.set(now);
        }
    }
    {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        // Another task may have started one meanwhile: one watch per migration.
        if let Some(w) = reg.get(&slot).and_then(Weak::upgrade) {
            w.touch();
            return w;
        }
        reg.insert(slot.clone(), Arc::downgrade(&watch));
    }
    let kept = Arc::clone(&watch);
    let (target, application_name) = (target.clone(), application_name.to_string());
    tokio::spawn(async move {
        let mut client = client;
        let watch = kept;
        loop {
            tokio::time::sleep(POLL).await;
            // Only this loop holds it, and no task took it for a while: done.
            if Arc::strong_count(&watch) == 1 && watch.idle() > IDLE {
                break;
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = crate::pg::connect(target.clone(), &application_name)
                    .await
                    .ok();
            }
            if let Some(c) = &client {
                match read(c, id).await {
                    Ok(now) => {
                        if watch.set(now) != now {
                            debug!(
                                migration = id,
                                bytes_per_s = now.0,
                                paused = now.1,
                                "copy budget changed"
                            );
                        }
                    }
                    Err(e) => {
                        debug!(error = %crate::pg::describe(&e), "cannot read the copy's byte-rate budget now");
                        client = None;
                    }
                }
            }
        }
        drop(watch);
        registry()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, w| w.strong_count() > 0);
    });
    watch
}

/// A task's token bucket: `share_ppm` parts per million of the budget, a burst of a quarter
/// second of it (or one chunk, when larger).
#[derive(Debug)]
pub struct Bucket {
    watch: Arc<RateWatch>,
    share_ppm: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket, full.
    pub fn new(watch: Arc<RateWatch>, share_ppm: u32) -> Bucket {
        Bucket {
            watch,
            share_ppm,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// This task's rate now, bytes per second (`None`: unlimited).
    /// This task's part of the budget: its share of `--jobs` slots, or, once fewer tasks than
    /// that are left, an equal part among them.
    fn rate(&self) -> Option<f64> {
        let mut share = f64::from(self.share_ppm) / 1e6;
        if let Some(left) = Some(self.watch.tasks_left()).filter(|l| *l > 0) {
            share = share.max(1.0 / left as f64);
        }
        let rate = self.watch.rate() as f64 * share.min(1.0);
        (self.share_ppm > 0 && self.watch.rate() > 0).then_some(rate.max(1.0))
    }

    /// How long to wait before writing `n` more bytes (`None`: go on), taking them when none.
    /// Call again after the wait: the budget may have changed.
    pub fn wait_for(&mut self, n: usize) -> Option<Duration> {
        if self.watch.paused() {
            self.last = Instant::now();
            return Some(POLL);
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        let Some(rate) = self.rate() else {
            self.tokens = 0.0;
            return None;
        };
        let n = n as f64;
        let burst = (rate / 4.0).max(n);
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        if self.tokens >= n {
            self.tokens -= n;
            return None;
        }
        Some(Duration::from_secs_f64((n - self.tokens) / rate).min(POLL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_paces_its_share_and_follows_the_budget() {
        let watch = Arc::new(RateWatch::default());
        let mut b = Bucket::new(Arc::clone(&watch), 500_000);
        // Unlimited: never waits.
        assert_eq!(b.wait_for(1 << 20), None);
        // 2000 B/s, half of it: 1000 B take about a second from empty.
        watch.bytes_per_s.store(2000, Ordering::Relaxed);
        let wait = b.wait_for(1000).expect("a wait");
        assert!(
            wait > Duration::from_millis(900) && wait <= POLL,
            "{wait:?}"
        );
        // Lifted again: no wait.
        watch.bytes_per_s.store(0, Ordering::Relaxed);
        assert_eq!(b.wait_for(1000), None);
    }
}
