//! The two-region benchmark (`--regions`, needs root): the source server in region A, the
//! destination in region B, two network namespaces joined by one link of a chosen bandwidth
//! (`tc tbf`, each way) and round-trip time (a delay proxy in A that every connection from B to
//! A goes through). Each method runs from region B, as an operator next to production would run
//! it, so its reads of the source cross the link:
//!
//! - `pg_dump -Fd -j N` of the source across the link, then `pg_restore -j N` in B;
//! - `pgcopydb clone` from B;
//! - pgzm with its embedded agent in B;
//! - pgzm with a source-side agent in A and a destination-side agent in B (zstd on and off):
//!   only the agents' export streams and the coordinator's catalog reads cross the link.
//!
//! Measured per run: wall time, bytes on the wire (the link devices' counters, both ways), the
//! WAL the destination wrote, pgzm's swap lock-held time.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use pgzm_tests::netns::{self, DelayProxy, Regions};
use pgzm_tests::PgCluster;

use crate::datasets::Dataset;
use crate::methods::{self, run_measured, AgentProcess, Measured};
use crate::Binaries;

/// The simulated link.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Bandwidth each way, Mbit/s.
    pub mbit: u32,
    /// Round-trip time the proxy adds, ms.
    pub rtt_ms: u64,
}

/// Every data set's results across the link.
pub type RegionRuns = Vec<(Dataset, Vec<RegionResult>)>;

/// One measured run across the link.
#[derive(Debug, Clone)]
pub struct RegionResult {
    /// Method label.
    pub method: String,
    /// Wall time.
    pub seconds: f64,
    /// Bytes that crossed the link, both ways (Ethernet frames).
    pub wire_bytes: u64,
    /// The COPY data pgzm moved (its report's `bytes`), for the compression ratio.
    pub copy_bytes: Option<u64>,
    /// WAL the destination server wrote during the run.
    pub wal_bytes: u64,
    /// pgzm's swap lock-held time, ms.
    pub lock_held_ms: Option<f64>,
    /// pgzm's phases: (name, seconds).
    pub phases: Vec<(String, f64)>,
}

/// The two regions with their servers, the proxy in front of the source server and the
/// source-side agent (with its proxy). Fields drop in order: proxies and agent first, the
/// servers, then the namespaces.
pub struct Setup {
    agent_proxy: DelayProxy,
    _source_agent: AgentProcess,
    pg_proxy: DelayProxy,
    /// The source server (region A).
    pub source: PgCluster,
    /// The destination server (region B).
    pub dest: PgCluster,
    /// The namespaces and the link.
    pub regions: Regions,
    link: Link,
    jobs: usize,
}

impl Setup {
    /// Creates the regions, shapes the link, starts a server in each and the source-side agent.
    pub fn start(bins: &Binaries, link: Link, jobs: usize) -> anyhow::Result<Setup> {
        if let Some(why) = netns::unavailable() {
            anyhow::bail!("--regions {why}");
        }
        let regions = Regions::create().context("create the regions")?;
        regions.shape(link.mbit).context("shape the link")?;
        let source = regions
            .a
            .run(PgCluster::start)?
            .context("start the source server in region A")?;
        let dest = regions
            .b
            .run(PgCluster::start)?
            .context("start the destination server in region B")?;
        let one_way = Duration::from_millis(link.rtt_ms / 2);
        let pg_proxy = DelayProxy::start(
            &regions.a,
            netns::A_ADDR,
            format!("127.0.0.1:{}", source.port()).parse()?,
            one_way,
        )?;
        let mut cmd = regions.a.command(&bins.agent);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--side",
            "source",
            "--max-tasks",
            &jobs.to_string(),
            "--database",
            &format!(
                "src=host=127.0.0.1 port={} user=postgres dbname=bench_src",
                source.port()
            ),
        ]);
        let source_agent = AgentProcess::spawn(cmd).context("start the source-side agent")?;
        let agent_addr = source_agent
            .url
            .strip_prefix("http://")
            .unwrap_or(&source_agent.url)
            .parse()
            .context("the source-side agent's address")?;
        let agent_proxy = DelayProxy::start(&regions.a, netns::A_ADDR, agent_addr, one_way)?;
        Ok(Setup {
            agent_proxy,
            _source_agent: source_agent,
            pg_proxy,
            source,
            dest,
            regions,
            link,
            jobs,
        })
    }

    /// The link's description, for the report.
    pub fn link(&self) -> Link {
        self.link
    }

    /// The source database's URL as seen from region B (through the proxy).
    fn source_url(&self) -> String {
        format!("postgres://postgres@{}/bench_src", self.pg_proxy.addr())
    }

    /// The destination database's URL inside region B.
    fn dest_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/bench_dst",
            self.dest.port()
        )
    }

    /// Runs `f` (a method) and measures the link and the destination's WAL around it.
    async fn measured(
        &self,
        method: &str,
        f: impl std::future::Future<Output = anyhow::Result<(Measured, Option<serde_json::Value>)>>,
    ) -> anyhow::Result<RegionResult> {
        let lsn = methods::wal_lsn(&self.dest).await?;
        let (a0, b0) = self.regions.bytes()?;
        let (m, report) = f
            .await
            .with_context(|| format!("{method} across the link"))?;
        let (a1, b1) = self.regions.bytes()?;
        let wal_bytes = methods::wal_since(&self.dest, &lsn).await?;
        Ok(RegionResult {
            method: method.into(),
            seconds: m.elapsed.as_secs_f64(),
            wire_bytes: (a1 - a0) + (b1 - b0),
            copy_bytes: report.as_ref().and_then(|r| r["bytes"].as_u64()),
            wal_bytes,
            lock_held_ms: report
                .as_ref()
                .and_then(|r| r["swap"]["lock_held_us"].as_f64())
                .map(|us| us / 1000.0),
            phases: report
                .as_ref()
                .and_then(|r| r["phases"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|p| {
                    Some((
                        p["phase"].as_str()?.to_string(),
                        p["duration_ms"].as_f64()? / 1000.0,
                    ))
                })
                .collect(),
        })
    }

    async fn dump_restore(&self, bins: &Binaries) -> anyhow::Result<RegionResult> {
        methods::fresh_db(&self.dest, "bench_dst", false).await?;
        let dir = dump_dir("dump");
        let jobs = self.jobs.to_string();
        let (src, dst) = (self.source_url(), self.dest_url());
        let label = format!("pg_dump -Fd -j{jobs} + pg_restore -j{jobs}");
        let r = self
            .measured(&label, async {
                let dump = run_measured(
                    self.regions
                        .b
                        .command(bins.pg.join("pg_dump"))
                        .args(["-Fd", "-j", &jobs, "-f"])
                        .arg(&dir)
                        .arg(&src),
                )?;
                let restore = run_measured(
                    self.regions
                        .b
                        .command(bins.pg.join("pg_restore"))
                        .args(["-j", &jobs, "-d", &dst])
                        .arg(&dir),
                )?;
                Ok((
                    Measured {
                        elapsed: dump.elapsed + restore.elapsed,
                        ..restore
                    },
                    None,
                ))
            })
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    async fn pgcopydb(&self, bins: &Binaries) -> anyhow::Result<Option<RegionResult>> {
        let Some(pgcopydb) = &bins.pgcopydb else {
            return Ok(None);
        };
        methods::fresh_db(&self.dest, "bench_dst", false).await?;
        let dir = dump_dir("pgcopydb");
        let jobs = self.jobs.to_string();
        let (src, dst) = (self.source_url(), self.dest_url());
        let path = methods::pg_first_path(bins);
        let r = self
            .measured(
                &format!("pgcopydb clone (table/index jobs {jobs})"),
                async {
                    let m = run_measured(
                        self.regions
                            .b
                            .command(pgcopydb)
                            .args(["clone", "--source", &src, "--target", &dst])
                            .args(["--table-jobs", &jobs, "--index-jobs", &jobs])
                            .arg("--dir")
                            .arg(&dir)
                            .env("PATH", &path),
                    )?;
                    Ok((m, None))
                },
            )
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        r.map(Some)
    }

    async fn pgzm_embedded(&self, bins: &Binaries, ds: &Dataset) -> anyhow::Result<RegionResult> {
        methods::fresh_db(&self.dest, "bench_dst", ds.postgis).await?;
        let (src, dst) = (self.source_url(), self.dest_url());
        self.measured("pgzm (embedded agent in B)", async {
            let m = run_measured(
                self.regions
                    .b
                    .command(&bins.pgzm)
                    .arg("-q")
                    .args(methods::start_args(&src, &dst, self.jobs)),
            )?;
            let report = methods::json_report(&m.stdout)?;
            Ok((m, Some(report)))
        })
        .await
    }

    async fn pgzm_agents(
        &self,
        bins: &Binaries,
        ds: &Dataset,
        compress: bool,
    ) -> anyhow::Result<RegionResult> {
        methods::fresh_db(&self.dest, "bench_dst", ds.postgis).await?;
        let mut cmd = self.regions.b.command(&bins.agent);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--side",
            "destination",
            "--max-tasks",
            &self.jobs.to_string(),
            "--database",
            &format!(
                "dst=host=127.0.0.1 port={} user=postgres dbname=bench_dst",
                self.dest.port()
            ),
        ]);
        if compress {
            cmd.arg("--compress");
        }
        let dest_agent = AgentProcess::spawn(cmd).context("start the destination-side agent")?;
        let source_agent_url = format!("http://{}", self.agent_proxy.addr());
        let (src, dst) = (self.source_url(), self.dest_url());
        let label = if compress {
            "pgzm (agents in A and B, zstd)"
        } else {
            "pgzm (agents in A and B, no compression)"
        };
        let r = self
            .measured(label, async {
                let m = run_measured(
                    self.regions
                        .b
                        .command(&bins.pgzm)
                        .arg("-q")
                        .args(methods::start_args(&src, &dst, self.jobs))
                        .args(["--agent", &source_agent_url, "--agent", &dest_agent.url])
                        .args([
                            "--allow-insecure-agents",
                            "--agent-source-db",
                            "src",
                            "--agent-dest-db",
                            "dst",
                        ]),
                )?;
                let report = methods::json_report(&m.stdout)?;
                Ok((m, Some(report)))
            })
            .await;
        drop(dest_agent);
        r
    }

    /// Every method on one data set, `rounds` times (the order reversed every other round);
    /// each method's result is the run with its median time.
    pub async fn compare(
        &self,
        ds: &Dataset,
        bins: &Binaries,
        rounds: usize,
        only: &[String],
    ) -> anyhow::Result<Vec<RegionResult>> {
        methods::load_source(ds, &self.source).await?;
        let mut all: Vec<RegionResult> = Vec::new();
        let mut order: Vec<String> = Vec::new();
        for round in 0..rounds.max(1) {
            let mut steps = vec!["dump", "pgcopydb", "embedded", "zstd", "plain"];
            if round % 2 == 1 {
                steps.reverse();
            }
            for step in steps {
                if !only.is_empty() && !only.iter().any(|o| o == step) {
                    continue;
                }
                let r = match step {
                    "dump" => Some(self.dump_restore(bins).await?),
                    "pgcopydb" => self.pgcopydb(bins).await?,
                    "embedded" => Some(self.pgzm_embedded(bins, ds).await?),
                    "zstd" => Some(self.pgzm_agents(bins, ds, true).await?),
                    _ => Some(self.pgzm_agents(bins, ds, false).await?),
                };
                if let Some(r) = r {
                    eprintln!(
                        "   round {}: {} {:.2} s, {:.1} MB on the wire",
                        round + 1,
                        r.method,
                        r.seconds,
                        r.wire_bytes as f64 / 1e6
                    );
                    if !r.phases.is_empty() {
                        let phases: Vec<String> = r
                            .phases
                            .iter()
                            .map(|(p, s)| format!("{p} {s:.2}"))
                            .collect();
                        eprintln!("      phases (s): {}", phases.join(", "));
                    }
                    if round == 0 {
                        order.push(r.method.clone());
                    }
                    all.push(r);
                }
            }
        }
        Ok(order
            .iter()
            .map(|method| {
                let mut runs: Vec<RegionResult> = all
                    .iter()
                    .filter(|r| &r.method == method)
                    .cloned()
                    .collect();
                runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
                runs.swap_remove(runs.len() / 2)
            })
            .collect())
    }
}

fn dump_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgzm-bench-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
