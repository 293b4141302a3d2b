//! `--max-replication-lag`: the copy pauses while a standby of the destination lags behind it
//! by more than the limit, and goes on once it has caught up below it (gh-ost's throttle on
//! replication lag).
//!
//! During the copy, a monitor on a session of its own samples the destination's WAL position
//! every second, and reads where each standby has replayed to (`pg_stat_replication`). A
//! standby's lag is the age of the oldest WAL it has not replayed: the time since the
//! destination's position first passed the standby's replay position (so a standby whose replay
//! is paused lags more every second, which `replay_lag`, measured only when WAL is replayed,
//! would not show). Above the limit (`pgzm.migrations.max_lag_ms`, which `pgzm throttle` may
//! change), the monitor records why in `pgzm.migrations.paused`; the agents read it every
//! second with the byte-rate budget and hold their tasks at the next chunk, while the tasks
//! still report to the coordinator.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::conninfo::DbUrl;

/// How often the monitor samples.
const EVERY: Duration = Duration::from_secs(1);
/// Samples kept: an hour of WAL positions.
const KEPT: usize = 3600;

/// A WAL position (`X/Y`) as a number.
pub fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// WAL positions of the destination over time.
#[derive(Debug, Default)]
struct Samples(VecDeque<(Instant, u64)>);

impl Samples {
    fn push(&mut self, at: Instant, lsn: u64) {
        self.0.push_back((at, lsn));
        while self.0.len() > KEPT {
            self.0.pop_front();
        }
    }

    /// How long WAL after `replayed` has been waiting: since the first sample past it.
    fn lag(&self, now: Instant, replayed: u64) -> Duration {
        self.0
            .iter()
            .find(|(_, lsn)| *lsn > replayed)
            .map_or(Duration::ZERO, |(at, _)| now.duration_since(*at))
    }
}

/// Watches the standbys of `dest` for migration `id` until dropped (see the module docs).
pub struct LagMonitor {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LagMonitor {
    /// Starts the monitor; it gives up quietly (logging why) when it cannot read the
    /// destination, and clears a pause it set when it stops.
    pub fn start(dest: &DbUrl, id: i64) -> LagMonitor {
        let dest = dest.clone();
        let task = tokio::spawn(async move {
            let client = match dest.connect("pgzm-coordinator").await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "cannot watch the destination's standbys; --max-replication-lag is not applied");
                    return;
                }
            };
            let mut samples = Samples::default();
            let mut paused: Option<String> = None;
            loop {
                let row = client
                    .query_one(
                        "SELECT (SELECT max_lag_ms FROM pgzm.migrations WHERE id = $1) AS max_lag_ms,
                                pg_current_wal_lsn()::text AS current,
                                ARRAY(SELECT coalesce(application_name, '') || '|' || coalesce(replay_lsn::text, '0/0')
                                        FROM pg_stat_replication) AS standbys",
                        &[&id],
                    )
                    .await;
                let row = match row {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %pgzm_pg::conn::describe(&e), "cannot read the destination's standbys; --max-replication-lag is not applied");
                        return;
                    }
                };
                let now = Instant::now();
                if let Some(current) = lsn(row.get::<_, &str>("current")) {
                    samples.push(now, current);
                }
                let limit = row
                    .get::<_, Option<i64>>("max_lag_ms")
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map(Duration::from_millis);
                let worst = row
                    .get::<_, Vec<String>>("standbys")
                    .iter()
                    .filter_map(|s| {
                        let (name, replayed) = s.rsplit_once('|')?;
                        Some((name.to_string(), samples.lag(now, lsn(replayed)?)))
                    })
                    .max_by_key(|(_, lag)| *lag);
                let reason = match (limit, &worst) {
                    (Some(limit), Some((name, lag))) if *lag > limit => Some(format!(
                        "replica lag {} s (standby {:?}; --max-replication-lag {} s)",
                        lag.as_secs(),
                        name,
                        limit.as_secs_f64()
                    )),
                    _ => None,
                };
                if reason.is_some() != paused.is_some() {
                    match &reason {
                        Some(r) => warn!("copy paused: {r}"),
                        None => {
                            info!("copy resumed: the standbys are within --max-replication-lag")
                        }
                    }
                    if let Err(e) = client
                        .execute(
                            "UPDATE pgzm.migrations SET paused = $2 WHERE id = $1",
                            &[&id, &reason],
                        )
                        .await
                    {
                        warn!(error = %pgzm_pg::conn::describe(&e), "cannot record the copy's pause");
                    }
                    crate::progress::set_note(reason.as_ref().map(|r| format!("throttled: {r}")));
                    paused = reason;
                }
                tokio::time::sleep(EVERY).await;
            }
        });
        LagMonitor { task }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_wal_not_replayed() {
        assert_eq!(lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(lsn("1/0"), Some(1 << 32));
        assert_eq!(lsn("x"), None);
        let t0 = Instant::now();
        let mut s = Samples::default();
        s.push(t0, 100);
        s.push(t0 + Duration::from_secs(1), 200);
        s.push(t0 + Duration::from_secs(2), 300);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(s.lag(now, 300), Duration::ZERO);
        assert_eq!(s.lag(now, 250), Duration::from_secs(3));
        assert_eq!(s.lag(now, 50), Duration::from_secs(5));
    }
}
