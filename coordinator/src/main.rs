//! `pgzm`: the coordinator's command line.

use std::process::ExitCode;

use clap::Parser;
use pgzm_agent::service::AgentService;
use pgzm_coordinator::cli::{Cli, Command};
use pgzm_coordinator::{migrate, output};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) {
    let default = match (cli.quiet, cli.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "pgzm_coordinator=debug,pgzm_agent=debug,info",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("PGZM_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Start(args) => {
            let json = args.json;
            let opts = args.into_options()?;
            let agent = AgentService::new(u32::try_from(opts.jobs).unwrap_or(u32::MAX))
                .into_in_process_client()
                .await
                .map_err(|e| anyhow::anyhow!("start the in-process agent: {e}"))?;
            let report = migrate::start(opts, agent).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", output::human_report(&report));
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgzm: error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pgzm: error: {err}");
            ExitCode::FAILURE
        }
    }
}
