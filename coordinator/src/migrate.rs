//! `pgzm start` (= `prepare` + `swap` in one process). The options, phase timings and report
//! it shares with the phases live in `report` (re-exported here).
//!
//! Invariant: the live tables are not modified before the swap transaction. Until its commit,
//! every failure removes what this run created (and a killed run's objects are recorded, so the
//! next run removes them first).

use crate::agents::AgentPool;
use crate::error::CoordinatorError;
use crate::state;
use crate::{cutover, prepare};

pub use crate::report::{
    now_ms, now_rfc3339, rfc3339, PhaseTiming, Phases, Report, StartOptions, TableReport,
    Throughput, DEFAULT_RANGE_BYTES,
};

/// Runs a whole migration — prepare, then swap, in one process (or, with `dry_run`, only its
/// plan). Until the swap commits, a failure removes everything this run created.
pub async fn start(opts: StartOptions, pool: AgentPool) -> Result<Report, CoordinatorError> {
    let mut phases = Phases(Vec::new());
    start_with_phases(opts, pool, &mut phases).await
}

/// [`start`], leaving the phase timings in `phases` also when it fails (for the log file).
pub async fn start_with_phases(
    opts: StartOptions,
    pool: AgentPool,
    phases: &mut Phases,
) -> Result<Report, CoordinatorError> {
    let Some(mut prepared) = prepare::prepare(&opts, pool, phases).await? else {
        return Err(CoordinatorError::Usage(
            "internal: prepare returned no report".into(),
        ));
    };
    if prepared.report.dry_run {
        prepared.report.phases = phases.0.clone();
        return Ok(prepared.report);
    }
    // The builds after the copy may have outlived a destination restart; the control session
    // must be alive (and hold the run lock) for the swap.
    // The plan goes back into the report once the swap is done (one copy of it, not two).
    let plan = std::mem::take(&mut prepared.report.plan);
    let result = match state::reattach(
        &mut prepared.control,
        &opts.destination,
        prepared.report.migration_id,
        state::RunStatus::Prepared,
    )
    .await
    {
        Err(e) => Err(e),
        Ok(()) => {
            cutover::swap_prepared(
                &prepared.control,
                &opts.destination,
                &plan,
                &prepared.created,
                cutover::SwapPolicy {
                    locks: opts.swap,
                    keep_backups: opts.keep_backups,
                },
                phases,
                &mut prepared.report,
            )
            .await
        }
    };
    match result {
        Ok(()) => {
            prepared.report.phases = phases.0.clone();
            prepared.report.plan = plan;
            Ok(prepared.report)
        }
        Err(err) => {
            prepare::abandon(
                &prepared.control,
                prepared.report.migration_id,
                &prepared.created,
                opts.swap,
                &err,
            )
            .await;
            Err(err)
        }
    }
}
