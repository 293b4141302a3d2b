//! Reuse of PostgreSQL sessions across an agent's tasks: a new backend per task was most of the
//! cost of a small table.
//!
//! Destination sessions are idle between tasks (every task is its own transaction). Source
//! sessions stay inside their snapshot transaction and are reused only for the same snapshot;
//! they are closed after a short idle time so an open transaction does not hold back the
//! source's vacuum once the copy phase is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// Idle sessions by key.
pub struct SessionPool {
    idle: Mutex<HashMap<String, Vec<(Client, Instant)>>>,
    ttl: Duration,
    reaper: Once,
}

impl SessionPool {
    /// Sessions idle longer than `ttl` are closed.
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(SessionPool {
            idle: Mutex::new(HashMap::new()),
            ttl,
            reaper: Once::new(),
        })
    }

    /// An idle session for `key`, if any.
    pub fn take(&self, key: &str) -> Option<Client> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((c, _)) = list.pop() {
            if !c.is_closed() {
                return Some(c);
            }
        }
        None
    }

    /// Returns a healthy session for reuse.
    pub fn put(self: &Arc<Self>, key: String, client: Client) {
        if client.is_closed() {
            return;
        }
        self.start_reaper();
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push((client, Instant::now()));
    }

    fn start_reaper(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.reaper.call_once(|| {
            let weak = Arc::downgrade(self);
            let period = (self.ttl / 2).max(Duration::from_millis(100));
            handle.spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.reap();
                }
            });
        });
    }

    /// Closes sessions idle longer than the TTL.
    pub fn reap(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for list in idle.values_mut() {
            list.retain(|(c, since)| since.elapsed() < self.ttl && !c.is_closed());
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// The pools of an agent.
#[derive(Clone)]
pub struct Sessions {
    /// Source sessions inside a snapshot transaction (key includes the snapshot).
    pub source: Arc<SessionPool>,
    /// Idle destination sessions.
    pub destination: Arc<SessionPool>,
    /// The shadow tables tasks may write into.
    pub guard: Arc<crate::guard::WriteGuard>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            source: SessionPool::new(Duration::from_secs(1)),
            destination: SessionPool::new(Duration::from_secs(10)),
            guard: Arc::default(),
        }
    }
}
