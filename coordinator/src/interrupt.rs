//! Ctrl-C and SIGTERM: the run stops, the destination is left in a known state, and one line
//! says which and what to run next.
//!
//! The first signal ends the command: its future and every task of its runtime are dropped
//! (the copies stop: an in-process agent's sessions close, remote agents see their streams
//! end, and the server rolls back whatever transaction was open — a swap or rollback that had
//! not committed changes nothing). Then [`settle`] looks at the destination: a `start` or
//! `prepare` interrupted while preparing has its shadow objects and sync triggers removed (the
//! default, as for a failed run: nothing is left behind), and the line says what state the
//! destination is in. A second signal while that runs exits at once; the run is then left as a
//! killed run would be, which `pgzm abort` or the next run removes.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::conninfo::DbUrl;
use crate::locked::SwapSettings;
use crate::records::RunStatus;

/// The run this process recorded in the destination (0: none yet).
static RUN: AtomicI64 = AtomicI64::new(0);

/// Notes the migration id this process has recorded in the destination.
pub fn set_run(id: i64) {
    RUN.store(id, Ordering::SeqCst);
}

/// The migration id this process recorded, if any.
pub fn current_run() -> Option<i64> {
    Some(RUN.load(Ordering::SeqCst)).filter(|id| *id != 0)
}

/// A signal that ends the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The exit status: 128 + the signal number, as a shell reports a process the signal
    /// ended (130 for Ctrl-C, 143 for SIGTERM).
    pub fn exit_status(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "interrupted (Ctrl-C)",
            Signal::Terminate => "terminated (SIGTERM)",
        }
    }
}

/// Waits for SIGINT or SIGTERM. When the handlers cannot be installed it never returns (the
/// default disposition then stays in force).
pub async fn wait() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => Signal::Interrupt,
        _ = terminate.recv() => Signal::Terminate,
    }
}

/// After the command's runtime is gone: removes what an interrupted `start`/`prepare` created
/// (when it was still preparing) and returns the line saying what state the destination is in
/// and what to run next.
pub async fn settle(
    command: &str,
    source: Option<&DbUrl>,
    destination: Option<&DbUrl>,
    locks: SwapSettings,
    keep: bool,
) -> String {
    let Some(id) = current_run() else {
        return match command {
            "start" | "prepare" => {
                "stopped before anything was created in the destination; run the same command again to start over"
                    .into()
            }
            "swap" | "rollback" | "cleanup" | "abort" => format!(
                "the {command} transaction, if it had begun, was rolled back by the server unless it had committed: check `pgzm status` and `pgzm list`"
            ),
            _ => "nothing was changed".into(),
        };
    };
    let Some(destination) = destination else {
        return format!("migration {id} may be left interrupted: run `pgzm abort` to remove it");
    };
    // An agent's source session waiting on a lock would notice its closed connection only
    // once granted: end the run's sessions there too.
    if let Some(source) = source {
        let _ =
            crate::copy::terminate_sessions(source, &crate::copy::session_tag_pattern(id)).await;
    }
    if keep {
        let _ = crate::copy::terminate_sessions(destination, &crate::copy::session_tag_pattern(id))
            .await;
        return format!(
            "the copy was stopped; migration {id} is kept as it was (--on-interrupt keep): continue it with `pgzm {command} --resume`, or remove it with `pgzm abort`; the live tables are untouched"
        );
    }
    match crate::state::abort_run(destination, id, locks).await {
        Ok(Some(RunStatus::Preparing)) => format!(
            "the copy was stopped and migration {id}'s shadow objects were removed; the live tables are as they were: run the same command again to start over"
        ),
        Ok(Some(RunStatus::Prepared)) => format!(
            "nothing was swapped: migration {id} is prepared (its shadow tables are kept in sync): run `pgzm swap` when ready, or `pgzm abort` to remove it"
        ),
        Ok(Some(RunStatus::Swapped)) => format!(
            "migration {id} had already been swapped in: the new tables are live, the previous ones are its backup set (`pgzm rollback --latest` restores them)"
        ),
        Ok(Some(status)) => format!("migration {id} is {status}: see `pgzm status`"),
        Ok(None) => format!("migration {id} is not recorded: nothing was left in the destination"),
        Err(e) => format!(
            "migration {id} is left interrupted: its shadow objects could not be removed now ({e}); the live tables are untouched: run `pgzm abort`, or run the command again (it removes them first)"
        ),
    }
}
