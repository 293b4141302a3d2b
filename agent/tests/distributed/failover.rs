//! An agent stopped in the middle of a copy: SIGKILL (its task is redone on the other agent,
//! from a clean state) and SIGTERM (it finishes its running task, then exits; the rest goes to
//! the other agent).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgzm_coordinator::migrate;

use crate::support::*;

/// How the agent is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Kill,
    Term,
}

/// The port of the server a database URL of the harness points at.
fn port_of(url: &str) -> u16 {
    let host_port = url.split('@').nth(1).and_then(|r| r.split('/').next());
    host_port
        .and_then(|hp| hp.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .expect("port in the URL")
}

/// Polls the source until an agent's session waits for the lock on `big`; its client port.
async fn wait_for_blocked_session(
    p: &Pair,
    migration: &tokio::task::JoinHandle<impl Sized>,
    agents: &[AgentProcess],
) -> u16 {
    let src_db = p.source.name().to_string();
    // Not the locker's session: pg_stat_activity is read once per transaction.
    let watcher = p.source.connect().await.expect("connect source");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            !migration.is_finished(),
            "the migration ended while big was locked"
        );
        let waiting = watcher
            .query_opt(
                "SELECT client_port FROM pg_stat_activity
                 WHERE datname = $1 AND application_name LIKE 'pgzm-agent%'
                   AND wait_event_type = 'Lock' LIMIT 1",
                &[&src_db],
            )
            .await
            .expect("read pg_stat_activity");
        if let Some(row) = waiting {
            return u16::try_from(row.get::<_, i32>(0)).expect("port");
        }
        if Instant::now() > deadline {
            let sessions: Vec<String> = watcher
                .query(
                    "SELECT concat_ws(' | ', application_name, state, wait_event, left(query, 100))
                     FROM pg_stat_activity WHERE datname = $1",
                    &[&src_db],
                )
                .await
                .expect("read pg_stat_activity")
                .iter()
                .map(|r| r.get(0))
                .collect();
            let logs: Vec<String> = agents.iter().map(AgentProcess::log).collect();
            panic!("no agent session waits for the lock on big; sessions: {sessions:#?}; agent logs: {logs:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two agents of one slot each copy the TES fixture and `big`; `big` is locked on the source,
/// so the first tasks (its ranges, the largest) wait; the agent running one of them is
/// stopped, then the lock released.
async fn stop_an_agent_mid_copy(stop: Stop) {
    let started = Instant::now();
    let p = fixture_pair(&format!("agent_{stop:?}"), "tes").await;
    p.source.batch(BIG_TABLE).await.expect("create big");
    let mut agents = [
        AgentProcess::start(&["--max-tasks", "1", "-v"]).await,
        AgentProcess::start(&["--max-tasks", "1", "-v"]).await,
    ];
    let urls: Vec<String> = agents.iter().map(AgentProcess::http_url).collect();
    let pool = pool(&settings(&urls)).await;

    let locker = p.source.connect().await.expect("connect source");
    locker
        .batch_execute("BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock big");
    let mut opts = options(&p);
    opts.jobs = 2;
    opts.range_bytes = SMALL_RANGES;
    let migration = tokio::spawn(migrate::start(opts, pool));

    let port = wait_for_blocked_session(&p, &migration, &agents).await;
    let pids: Vec<u32> = agents.iter().map(AgentProcess::pid).collect();
    let victim_pid = pid_of_connection(port, port_of(&p.source.url()), &pids)
        .expect("the agent process owning the waiting session");
    let victim = pids
        .iter()
        .position(|&pid| pid == victim_pid)
        .expect("victim");
    match stop {
        Stop::Kill => agents[victim].kill().await,
        Stop::Term => {
            // SAFETY: kill(2) on our own child's pid.
            let rc = unsafe { libc::kill(victim_pid as libc::pid_t, libc::SIGTERM) };
            assert_eq!(rc, 0);
            let agent = &agents[victim];
            poll("the agent to take SIGTERM", Duration::from_secs(10), || {
                let taken = agent.log().contains("shutting down");
                async move { taken.then_some(()) }
            })
            .await;
        }
    }
    locker.batch_execute("COMMIT").await.expect("release big");
    let released = Instant::now();
    if stop == Stop::Term {
        let status = tokio::time::timeout(Duration::from_secs(20), agents[victim].wait())
            .await
            .expect("the agent exits after its running task");
        assert!(status.success(), "{status}: {}", agents[victim].log());
    }

    let report = tokio::time::timeout(Duration::from_secs(60), migration)
        .await
        .expect("the migration finishes after the agent stopped")
        .expect("join")
        .unwrap_or_else(|e| panic!("migration after {stop:?}: {e}"));
    eprintln!(
        "{stop:?}: finished {:?} after the release",
        released.elapsed()
    );

    let src = p.source.connect().await.expect("connect source");
    let dst = p.dest.connect().await.expect("connect dest");
    assert_migrated(&src, &dst).await;
    let keys = recorded_tes_and_big(&dst, report.migration_id).await;

    // The agents' logs: every task finished exactly once.
    let stopped = agents[victim].finished_tasks();
    let survivor = agents[1 - victim].finished_tasks();
    let finished: Vec<String> = stopped.iter().chain(&survivor).cloned().collect();
    let distinct: BTreeSet<String> = finished.iter().map(|t| task_key(t)).collect();
    assert_eq!(
        distinct.len(),
        finished.len(),
        "a task ran twice: {finished:?}"
    );
    assert_eq!(distinct, keys);
    let retried: Vec<&String> = finished.iter().filter(|t| !t.ends_with("/a1")).collect();
    match stop {
        Stop::Kill => {
            // The one task in flight on the killed agent (one slot) was redone on the other.
            assert_eq!(retried.len(), 1, "{finished:?}");
            assert!(retried[0].contains("/p"), "not a range of big: {retried:?}");
            assert!(survivor.contains(retried[0]), "{retried:?}");
        }
        Stop::Term => {
            // The running task was finished by the stopping agent (its first attempt); a task
            // handed to it while it was shutting down was refused and sent to the other one.
            assert_eq!(stopped.len(), 1, "{stopped:?}");
            assert!(stopped[0].contains("/p"), "not a range of big: {stopped:?}");
            assert!(stopped[0].ends_with("/a1"), "{stopped:?}");
            assert!(retried.iter().all(|t| survivor.contains(t)), "{finished:?}");
        }
    }
    eprintln!("{stop:?}: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_copy_is_replaced_by_another() {
    stop_an_agent_mid_copy(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_terminated_mid_copy_finishes_its_task_and_leaves_the_rest() {
    stop_an_agent_mid_copy(Stop::Term).await;
}

/// An agent frozen (SIGSTOP) in the middle of its COPY into a shadow table, its session holding
/// the table's lock: after the stall timeout the coordinator ends that agent's sessions before
/// the task goes to the other agent, so nothing waits on the frozen session's lock (not the
/// builds, not the swap) and the run finishes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_cut_off_before_its_task_is_given_to_another() {
    let p = fixture_pair("agent_frozen", "tes").await;
    p.source.batch(BIG_TABLE).await.expect("create big");
    let agents = [
        AgentProcess::start(&["--max-tasks", "1", "-v"]).await,
        AgentProcess::start(&["--max-tasks", "1", "-v"]).await,
    ];
    let urls: Vec<String> = agents.iter().map(AgentProcess::http_url).collect();
    let pool = pool(&settings(&urls)).await;
    let dst = p.dest.connect().await.expect("connect dest");

    // big's task waits on the source until the destination's shadow_big is locked too.
    let src_locker = p.source.connect().await.expect("connect source");
    src_locker
        .batch_execute("BEGIN; LOCK TABLE big IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock big");
    let mut opts = options(&p);
    opts.jobs = 2;
    opts.stall_timeout = Duration::from_secs(3);
    let migration = tokio::spawn(migrate::start(opts, pool));
    wait_for_blocked_session(&p, &migration, &agents).await;
    let dst_locker = p.dest.connect().await.expect("connect dest");
    dst_locker
        .batch_execute("BEGIN; LOCK TABLE shadow_big IN SHARE MODE")
        .await
        .expect("lock shadow_big");
    src_locker
        .batch_execute("COMMIT")
        .await
        .expect("release big");

    // The agent's COPY into shadow_big now waits for the lock: freeze that agent.
    let dst_db = p.dest.name().to_string();
    let port = poll(
        "the COPY into shadow_big to wait",
        Duration::from_secs(30),
        || {
            let (dst, dst_db) = (&dst, dst_db.clone());
            async move {
                dst.query_opt(
                    "SELECT client_port FROM pg_stat_activity
                  WHERE datname = $1 AND application_name LIKE 'pgzm-agent m% a%'
                    AND wait_event_type = 'Lock' AND query LIKE 'COPY%shadow_big%'",
                    &[&dst_db],
                )
                .await
                .expect("read pg_stat_activity")
                .map(|r| u16::try_from(r.get::<_, i32>(0)).expect("port"))
            }
        },
    )
    .await;
    let pids: Vec<u32> = agents.iter().map(AgentProcess::pid).collect();
    let victim = pid_of_connection(port, port_of(&p.dest.url()), &pids).expect("the copying agent");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(victim as libc::pid_t, libc::SIGSTOP) },
        0
    );
    // The frozen agent's session takes the lock and keeps it, idle in its COPY.
    dst_locker
        .batch_execute("COMMIT")
        .await
        .expect("release shadow_big");

    let started = Instant::now();
    let report = tokio::time::timeout(Duration::from_secs(60), migration)
        .await
        .expect("the migration finishes despite the frozen agent")
        .expect("join")
        .unwrap_or_else(|e| panic!("migration with a frozen agent: {e}"));
    eprintln!(
        "frozen agent: finished {:?} after the freeze",
        started.elapsed()
    );
    let src = p.source.connect().await.expect("connect source");
    assert_migrated(&src, &dst).await;
    let (keys, _) = recorded_tasks(&dst, report.migration_id).await;
    assert_eq!(keys.len(), 16, "{keys:?}");
    let left: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = $1",
            &[&i32::from(port)],
        )
        .await
        .expect("read pg_stat_activity")
        .get(0);
    assert_eq!(left, 0, "the frozen agent's session was ended");
    let triggers: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgzm%' AND NOT tgisinternal",
            &[],
        )
        .await
        .expect("read triggers")
        .get(0);
    assert_eq!(triggers, 0);
    // SAFETY: as above; the guard then kills it.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGCONT) };
}
