//! `pgzm-bench`: measures pgzm against `pg_dump -Fd -j N | pg_restore -j N`, `pgcopydb clone`
//! (when installed) and a plain binary COPY pipe, on the same data in the same run, on two
//! throwaway local servers; writes a markdown report (docs/BENCHMARKS.md).
//!
//! Run with `./bench/run [--scale small|medium|large]` (builds the release binaries first);
//! `--scale schema` measures large schemas (thousands of tables) phase by phase instead.

mod cutover;
mod datasets;
mod impact;
mod methods;
mod regions;
mod report;
mod schema_scale;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use pgzm_tests::PgCluster;

/// Data sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scale {
    /// About 1 M rows in the large table; finishes in a few minutes on 2 cores.
    Small,
    /// About 5 M rows (1.2 GB heap, the baseline of STACK.md).
    Medium,
    /// About 10 M rows.
    Large,
    /// Not a data size: large schemas (`--tables`, thousands of mostly small tables with
    /// foreign keys, views, functions, enums, a preserved table), measured phase by phase
    /// beside pg_dump/pg_restore and pgcopydb; only that section runs.
    Schema,
}

/// Benchmarks pgzm against pg_dump/pg_restore and pgcopydb.
#[derive(Debug, Parser)]
#[command(name = "pgzm-bench")]
pub struct Args {
    /// Data sizes.
    #[arg(long, value_enum, default_value_t = Scale::Small)]
    pub scale: Scale,
    /// Parallel jobs for every method.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Runs of every method per data set (alternating order); the report gives the medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Where to write the report.
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    pub out: PathBuf,
    /// Skip the copy comparison.
    #[arg(long)]
    pub skip_copy: bool,
    /// Skip the cutover measurements.
    #[arg(long)]
    pub skip_cutover: bool,
    /// Skip the scaling measurements.
    #[arg(long)]
    pub skip_scaling: bool,
    /// Only the two-region benchmark (needs root): the source in one network namespace, the
    /// destination in another, joined by a link of --link-mbit and --rtt-ms; every method runs
    /// from the destination's region.
    #[arg(long)]
    pub regions: bool,
    /// The link's bandwidth each way, Mbit/s (--regions).
    #[arg(long, default_value_t = 100)]
    pub link_mbit: u32,
    /// The link's round-trip time, ms (--regions).
    #[arg(long, default_value_t = 50)]
    pub rtt_ms: u64,
    /// Only these methods (--regions): dump, pgcopydb, embedded, zstd, plain.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Only the data sets whose name starts with one of these (e.g. large,mixed).
    #[arg(long, value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Only the production-impact measurement: pgbench on the destination server at
    /// --pgbench-rate, alone and beside each method.
    #[arg(long)]
    pub impact: bool,
    /// pgbench's rate, transactions per second (--impact).
    #[arg(long, default_value_t = 300)]
    pub pgbench_rate: u32,
    /// The --max-rate of the throttled pgzm run, MB/s (--impact).
    #[arg(long, default_value_t = 20)]
    pub limited_mb: u64,
    /// Table counts of the schema-scale runs (--scale schema).
    #[arg(long, value_delimiter = ',', default_values_t = [3000usize, 10000])]
    pub tables: Vec<usize>,
    /// Rounds of the whole-run comparison (pg_dump | pg_restore against pgzm prepare + swap,
    /// alternating, each into a fresh copy of the destination) at up to 3 000 tables (--scale
    /// schema; more tables: one): the report gives every round and the median ratio.
    #[arg(long, default_value_t = 3)]
    pub schema_rounds: usize,
    /// pgcopydb runs only up to this many tables (--scale schema): beyond, it is skipped with a
    /// note (it pays round trips and processes per table).
    #[arg(long, default_value_t = 3000)]
    pub pgcopydb_max_tables: usize,
    /// The servers' max_locks_per_transaction (--scale schema): pgzm's shadow set and swap
    /// each lock every table in one transaction.
    #[arg(long, default_value_t = 1024)]
    pub max_locks_per_transaction: u32,
    /// With --scale schema: log every statement on both servers with its duration, pgzm's log
    /// at -v and each step's pg_stat_statements (every statement of the swap on its own) into
    /// this directory, for finding what bounds each phase (the timings then include the
    /// logging).
    #[arg(long)]
    pub statement_log: Option<PathBuf>,
    /// With --scale schema: print the SQL that generates the first of --tables (variant 1: the
    /// source's rows; 2: the destination's) and exit, for profiling one step by hand.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub print_schema_sql: Option<u8>,
}

/// Paths of the binaries under test, next to this one.
pub struct Binaries {
    /// pgzm.
    pub pgzm: PathBuf,
    /// pgzm-agent.
    pub agent: PathBuf,
    /// PostgreSQL's bin directory (pg_dump, pg_restore, psql).
    pub pg: PathBuf,
    /// pgcopydb, if installed.
    pub pgcopydb: Option<PathBuf>,
}

fn binaries(cluster: &PgCluster) -> anyhow::Result<Binaries> {
    binaries_with(cluster.bindir().to_path_buf())
}

fn binaries_with(pg: PathBuf) -> anyhow::Result<Binaries> {
    let me = std::env::current_exe()?;
    let pgzm = me.with_file_name("pgzm");
    let agent = me.with_file_name("pgzm-agent");
    for b in [&pgzm, &agent] {
        anyhow::ensure!(
            b.exists(),
            "{} is missing: build it first (./bench/run does)",
            b.display()
        );
    }
    let pgcopydb = ["/usr/bin/pgcopydb", "/usr/lib/postgresql/15/bin/pgcopydb"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    Ok(Binaries {
        pgzm,
        agent,
        pg,
        pgcopydb,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(methods::PEAK_RSS_LAUNCHER) {
        std::process::exit(methods::launch_and_report_peak(&argv[2..])?);
    }
    let args = Args::parse();
    if args.regions {
        return two_regions(&args).await;
    }
    if args.scale == Scale::Schema {
        if let Some(variant) = args.print_schema_sql {
            let n = args.tables.first().copied().unwrap_or(3000);
            print!("{}", schema_scale::generation_sql(n, usize::from(variant)));
            return Ok(());
        }
        let measured = schema_scale::run(&args).await?;
        let bins = binaries_with(pgzm_tests::cluster::default_bindir()?)?;
        let mut report = report::Report::new(&args, &bins);
        report.schema = Some(measured);
        return report.write(&args.out);
    }
    eprintln!("starting two throwaway PostgreSQL servers…");
    let source = PgCluster::start().context("start the source server")?;
    let dest = PgCluster::start().context("start the destination server")?;
    let bins = binaries(&source)?;
    let mut report = report::Report::new(&args, &bins);
    if args.impact {
        let ds = datasets::copy_datasets(args.scale).swap_remove(0);
        eprintln!("== production impact: {}", ds.name);
        report.impact = Some(
            impact::measure(
                &ds,
                &source,
                &dest,
                &bins,
                args.jobs,
                args.pgbench_rate,
                args.limited_mb,
            )
            .await?,
        );
        return report.write(&args.out);
    }
    if !args.skip_copy {
        for ds in datasets::copy_datasets(args.scale) {
            eprintln!("== dataset {}", ds.name);
            let results =
                methods::compare(&ds, &source, &dest, &bins, args.jobs, args.rounds).await?;
            report.copy.push((ds, results));
        }
    }
    if !args.skip_cutover {
        for (tables, blocker, dependents) in [
            (100usize, false, false),
            (100, false, true),
            (100, true, false),
            (1000, false, false),
            (1000, false, true),
            (1000, true, false),
        ] {
            {
                eprintln!("== cutover: {tables} tables, long transaction: {blocker}, dependents: {dependents}");
                // The run with the median lock-held time of `rounds` runs.
                let mut runs = Vec::new();
                for _ in 0..args.rounds.max(1) {
                    runs.push(
                        cutover::measure(&source, &dest, &bins, tables, blocker, dependents)
                            .await?,
                    );
                }
                runs.sort_by(|a, b| a.lock_held_ms.total_cmp(&b.lock_held_ms));
                let median = runs.swap_remove(runs.len() / 2);
                report.cutover.push(median);
            }
        }
    }
    if !args.skip_scaling {
        for ds in datasets::scaling_datasets(args.scale) {
            eprintln!("== scaling: {}", ds.name);
            let r = methods::pgzm_embedded(&ds, &source, &dest, &bins, args.jobs).await?;
            report.scaling.push((ds, r));
        }
    }
    report.write(&args.out)
}

/// `--regions`: every method across the simulated link, on every data set.
async fn two_regions(args: &Args) -> anyhow::Result<()> {
    let link = regions::Link {
        mbit: args.link_mbit,
        rtt_ms: args.rtt_ms,
    };
    eprintln!(
        "creating two regions ({} Mbit/s, {} ms RTT) with a server in each…",
        link.mbit, link.rtt_ms
    );
    let bins = binaries_with(pgzm_tests::cluster::default_bindir()?)?;
    let setup = regions::Setup::start(&bins, link, args.jobs)?;
    let mut report = report::Report::new(args, &bins);
    let mut measured = Vec::new();
    for ds in datasets::copy_datasets(args.scale) {
        if !args.datasets.is_empty()
            && !args
                .datasets
                .iter()
                .any(|d| ds.name.starts_with(d.as_str()))
        {
            continue;
        }
        eprintln!("== dataset {} across the link", ds.name);
        let results = setup
            .compare(&ds, &bins, args.rounds, &args.methods)
            .await?;
        measured.push((ds, results));
    }
    report.regions = Some((setup.link(), measured));
    drop(setup);
    report.write(&args.out)
}
