//! `pgzm`: the coordinator's command line.

use std::process::ExitCode;

use clap::Parser;
use pgzm_agent::telemetry;
use pgzm_coordinator::agents::AgentPool;
use pgzm_coordinator::cli::{Cli, Command, LogFormatArg, PrepareArgs};
use pgzm_coordinator::document::{Document, ErrorDetail, Failure, Outcome};
use pgzm_coordinator::migrate::StartOptions;
use pgzm_coordinator::{
    backup, cutover, interrupt, logfile, migrate, output, prepare, rollback, status,
};
use tracing::Instrument;

fn init_telemetry(cli: &Cli) -> telemetry::Telemetry {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info,tokio_postgres=warn",
        (false, 1) => "pgzm_coordinator=debug,pgzm_agent=debug,info",
        _ => "trace",
    };
    let format = match cli.log_format {
        LogFormatArg::Text => telemetry::LogFormat::Text,
        LogFormatArg::Json => telemetry::LogFormat::Json,
    };
    telemetry::init("pgzm", default, format, cli.verbose, None)
}

/// The agents of a run: remote ones when given (then `--jobs` defaults to their capacity),
/// else one in-process.
async fn agents(args: &PrepareArgs, opts: &mut StartOptions) -> anyhow::Result<AgentPool> {
    let settings = args.agents.settings()?;
    if settings.urls.is_empty() {
        return Ok(AgentPool::in_process(opts.jobs).await?);
    }
    let pool = AgentPool::connect(&settings).await?;
    if args.jobs.is_none() {
        opts.jobs = pool.capacity().max(1);
    }
    Ok(pool)
}

/// Writes the migration log of a `start`, `prepare` or `swap` (not of a dry run); a failure to
/// write it is a warning.
fn write_log(
    args: &pgzm_coordinator::cli::LogFileArgs,
    dry_run: bool,
    ctx: logfile::LogContext<'_>,
    started: i64,
    phases: &migrate::Phases,
    result: Result<&migrate::Report, &pgzm_coordinator::error::CoordinatorError>,
) {
    if args.no_log_file || dry_run {
        return;
    }
    let path = args
        .log_file
        .clone()
        .unwrap_or_else(|| logfile::default_path(started, ctx));
    let text = logfile::render(ctx, started, migrate::now_ms(), &phases.0, result);
    match logfile::write(&path, &text) {
        Ok(()) => tracing::info!(path = %path.display(), "migration log written"),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not write the migration log")
        }
    }
}

/// Prints the result: one `--json` document (see `document`), or the text for a person.
fn print<T: serde::Serialize>(
    json: bool,
    command: &str,
    outcome: Outcome,
    value: &T,
    human: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        let doc = Document::new(command, outcome, value);
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", human());
    }
    Ok(())
}

/// The outcome of a command that may have been a dry run.
fn done(dry_run: bool) -> Outcome {
    if dry_run {
        Outcome::DryRun
    } else {
        Outcome::Ok
    }
}

/// A failure whose document was printed already (`verify` of an invalid set).
#[derive(Debug)]
struct Reported(String);

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Reported {}

/// A live progress bar only for a person at a terminal.
fn progress_wanted(cli: &Cli, json: bool) -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
        && !cli.quiet
        && !json
        && cli.log_format == LogFormatArg::Text
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let show_progress = match &cli.command {
        Command::Start(a) | Command::Prepare(a) => {
            progress_wanted(&cli, a.output.json) && !a.dry_run
        }
        _ => false,
    };
    if show_progress {
        pgzm_coordinator::progress::request();
    }
    if let Command::Start(a) | Command::Prepare(a) = &cli.command {
        if a.progress_every.is_finite() && a.progress_every > 0.0 {
            pgzm_coordinator::progress::log_every(std::time::Duration::from_secs_f64(
                a.progress_every.min(86_400.0),
            ));
        }
    }
    match cli.command {
        Command::Start(args) => {
            let mut opts = args.to_options()?;
            opts.show_plan = !args.output.json;
            let pool = agents(&args, &mut opts).await?;
            let started = migrate::now_ms();
            let mut phases = migrate::Phases(Vec::new());
            let result = migrate::start_with_phases(opts.clone(), pool, &mut phases).await;
            let ctx = logfile::LogContext::run("start", &opts);
            write_log(
                &args.log,
                opts.dry_run,
                ctx,
                started,
                &phases,
                result.as_ref(),
            );
            let report = result?;
            print(
                args.output.json,
                "start",
                done(report.dry_run),
                &report,
                || output::human_report(&report, true),
            )
        }
        Command::Prepare(args) => {
            let mut opts = args.to_options()?;
            opts.show_plan = !args.output.json;
            let pool = agents(&args, &mut opts).await?;
            let mut phases = migrate::Phases(Vec::new());
            let started = migrate::now_ms();
            let result = match prepare::prepare(&opts, pool, &mut phases).await {
                Ok(Some(prepared)) => Ok(prepared.release().await),
                Ok(None) => anyhow::bail!("prepare returned nothing"),
                Err(e) => Err(e),
            };
            let ctx = logfile::LogContext::run("prepare", &opts);
            write_log(
                &args.log,
                opts.dry_run,
                ctx,
                started,
                &phases,
                result.as_ref(),
            );
            let mut report = result?;
            report.phases = phases.0;
            print(
                args.output.json,
                "prepare",
                done(report.dry_run),
                &report,
                || output::human_prepare(&report, true),
            )
        }
        Command::Swap(args) => {
            let opts = args.to_options()?;
            let started = migrate::now_ms();
            let destination = opts.destination.clone();
            let dry_run = opts.dry_run;
            let result = cutover::swap_command(opts).await;
            let phases = migrate::Phases(
                result
                    .as_ref()
                    .map(|r| r.phases.clone())
                    .unwrap_or_default(),
            );
            let ctx = logfile::LogContext {
                command: "swap",
                source: None,
                destination: &destination,
            };
            write_log(&args.log, dry_run, ctx, started, &phases, result.as_ref());
            let report = result?;
            print(
                args.output.json,
                "swap",
                done(report.dry_run),
                &report,
                || output::human_report(&report, true),
            )
        }
        Command::Status(args) => {
            let dest = args.dest.url()?;
            let s = status::status(&dest).await?;
            print(args.output.json, "status", Outcome::Ok, &s, || {
                output::human_status(&s)
            })
        }
        Command::List(args) => {
            let sets = backup::list(&args.dest.url()?).await?;
            let human = output::human_list(&sets);
            let doc = pgzm_coordinator::document::BackupSets { backup_sets: sets };
            print(args.output.json, "list", Outcome::Ok, &doc, || human)
        }
        Command::Verify(args) => {
            let v = backup::verify(&args.dest.url()?, args.timestamp).await?;
            let outcome = if v.valid {
                Outcome::Ok
            } else {
                Outcome::Invalid
            };
            print(args.output.json, "verify", outcome, &v, || {
                output::human_verify(&v)
            })?;
            if !v.valid {
                return Err(Reported(format!(
                    "backup set {} is not valid: {} check(s) failed",
                    v.timestamp,
                    v.checks.iter().filter(|c| !c.ok).count()
                ))
                .into());
            }
            Ok(())
        }
        Command::Rollback(args) => {
            let r = rollback::rollback(args.to_options()?).await?;
            print(args.output.json, "rollback", done(r.dry_run), &r, || {
                output::human_rollback(&r)
            })
        }
        Command::Cleanup(args) => {
            let before = backup::parse_before(&args.before)?;
            let c = backup::cleanup(&args.dest.url()?, before, args.dry_run).await?;
            print(args.output.json, "cleanup", done(c.dry_run), &c, || {
                output::human_cleanup(&c)
            })
        }
        Command::Completions(args) => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(args.shell, &mut cmd, "pgzm", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            use clap::CommandFactory;
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                // The reader stopped reading (`pgzm man | head`): not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Command::Throttle(args) => {
            let t = pgzm_coordinator::state::throttle(
                &args.dest.url()?,
                args.max_rate.map(|r| r.0),
                args.max_replication_lag.map(|l| l.0),
            )
            .await?;
            print(args.output.json, "throttle", Outcome::Ok, &t, || {
                output::human_throttle(&t)
            })
        }
        Command::Abort(args) => {
            let a = pgzm_coordinator::state::abort(
                &args.dest.url()?,
                args.dry_run,
                args.locks.settings()?,
            )
            .await?;
            print(args.output.json, "abort", done(a.dry_run), &a, || {
                output::human_abort(&a)
            })
        }
    }
}

/// After a signal: leaves the destination in a known state (see `interrupt`), prints one line
/// saying which and what to run next, and returns the exit status. A second signal exits at
/// once.
fn settle_interrupted(
    command: &str,
    source: Option<&pgzm_coordinator::conninfo::DbUrl>,
    destination: Option<&pgzm_coordinator::conninfo::DbUrl>,
    locks: pgzm_coordinator::locked::SwapSettings,
    signal: interrupt::Signal,
    keep: bool,
) -> u8 {
    eprintln!(
        "pgzm: {}: stopping {command}; press Ctrl-C again to exit at once",
        signal.name()
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return signal.exit_status(),
    };
    runtime.block_on(async {
        tokio::select! {
            line = interrupt::settle(command, source, destination, locks, keep) => {
                eprintln!("pgzm: {}: {line}", signal.name());
            }
            again = interrupt::wait() => {
                let left = interrupt::current_run()
                    .map(|id| format!("migration {id} may be left interrupted: run `pgzm abort` (or the same command again) to remove its shadow objects"))
                    .unwrap_or_else(|| "nothing was left to clean up".into());
                eprintln!("pgzm: {} again: exiting at once; {left}", again.name());
            }
        }
    });
    signal.exit_status()
}

/// The exit status of a failed run: the coordinator error's (75 to retry later, 2 for usage),
/// else 1.
fn exit_status(err: &anyhow::Error) -> u8 {
    err.downcast_ref::<pgzm_coordinator::error::CoordinatorError>()
        .map_or(1, |e| e.exit_status())
}

/// glibc's malloc raises its mmap threshold to the size of each large block freed, so later
/// large, short-lived blocks (a catalog read's buffers, the plan as JSON, a swap's statements:
/// megabytes each at 10 000 tables) come from the heap and leave it fragmented at its
/// high-water mark. A fixed threshold hands them back to the kernel when freed: `prepare`'s peak
/// RSS at 10 000 tables 135 → 121 MiB.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let runtime = match pgzm_agent::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgzm: error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _g = runtime.enter();
        init_telemetry(&cli)
    };
    let command = cli.command.name();
    let destination = cli.command.destination();
    let source = cli.command.source();
    let locks = cli.command.locks();
    let json = cli.command.json();
    let keep = cli.command.keep_on_interrupt();
    let json_logs = cli.log_format == LogFormatArg::Json;
    // One root span per run: every phase and table task of the migration is in its trace.
    let root = tracing::info_span!(
        "pgzm",
        command,
        otel.status_description = tracing::field::Empty
    );
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(cli).instrument(root.clone()) => Ok(result),
            signal = interrupt::wait() => Err(signal),
        }
    });
    let result = match outcome {
        Ok(result) => result,
        Err(signal) => {
            root.record("otel.status_description", signal.name());
            drop(root);
            // Every task of the run (copies, builds, an in-process agent) ends with its runtime.
            drop(runtime);
            let status = settle_interrupted(
                command,
                source.as_ref(),
                destination.as_ref(),
                locks,
                signal,
                keep,
            );
            telemetry.shutdown();
            return ExitCode::from(status);
        }
    };
    if let Err(err) = &result {
        // The trace says that, and why, the run failed (the message never holds a password).
        root.record("otel.status_description", err.to_string().as_str());
    }
    drop(root);
    drop(runtime);
    // Spans and metrics are flushed also when the run failed.
    telemetry.shutdown();
    if let Err(err) = &result {
        if json && err.downcast_ref::<Reported>().is_none() {
            // A failure is a document too.
            let doc = Document::new(
                command,
                Outcome::Error,
                Failure {
                    error: ErrorDetail {
                        message: err.to_string(),
                        exit_status: exit_status(err),
                    },
                },
            );
            if let Ok(text) = serde_json::to_string_pretty(&doc) {
                println!("{text}");
            }
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if json_logs => {
            // Like every other stderr line with --log-format json: one JSON object.
            let line = serde_json::json!({
                "timestamp": migrate::now_rfc3339(),
                "level": "ERROR",
                "message": format!("pgzm: error: {err}"),
            });
            eprintln!("{line}");
            ExitCode::from(exit_status(&err))
        }
        Err(err) => {
            eprintln!("pgzm: error: {err}");
            ExitCode::from(exit_status(&err))
        }
    }
}
