//! Two simulated regions on one machine (root only): two network namespaces joined by a veth
//! pair, whose link can be shaped (`tc tbf`, a bandwidth each way), cut (every packet dropped,
//! as on a partitioned WAN: no error reaches either side, TCP just retransmits) and counted.
//!
//! Servers and processes are put in a region by creating them from a thread that entered its
//! namespace ([`Netns::run`], e.g. `region.run(PgCluster::start)`: the postmaster's owner thread
//! and every child inherit it) or with [`Netns::command`] (`ip netns exec`). Each region's
//! servers listen on its own loopback; the test process itself stays in its namespace and
//! reaches them through their unix sockets ([`PgCluster::socket_conninfo`]).
//!
//! Nothing here sends traffic anywhere: the addresses exist only inside the two namespaces.
//! The namespaces are named `pgzm-<pid>-<n><side>` and deleted on drop; a later run deletes
//! those of dead processes.
//!
//! [`PgCluster::socket_conninfo`]: crate::PgCluster::socket_conninfo

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::one_line;
use crate::HarnessError;

/// The address of region A's end of the link (region B's is [`B_ADDR`]).
pub const A_ADDR: &str = "10.231.0.1";
/// The address of region B's end of the link.
pub const B_ADDR: &str = "10.231.0.2";
/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Why regions cannot be made here, or `None` when they can: the caller skips with this text.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, veth, tc): run as root".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("needs `{tool}` (apt-get install iproute2)"));
        }
    }
    None
}

/// Runs `ip`/`tc` with `args`; an error with its output when it fails.
fn sh(program: &str, args: &[&str]) -> Result<(), HarnessError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io(format!("run {program}"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError::io(
        format!("{program} {}", args.join(" ")),
        std::io::Error::other(one_line(&String::from_utf8_lossy(&out.stderr))),
    ))
}

/// A network namespace made for a test or a benchmark, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    fn create(name: String) -> Result<Netns, HarnessError> {
        let _ = sh("ip", &["netns", "del", &name]);
        sh("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a new thread that entered the namespace: sockets it opens, threads it starts
    /// and processes it spawns are in the namespace (and stay there after `f` returns).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, HarnessError> {
        let path = Path::new(NETNS_DIR).join(&self.name);
        let file = File::open(&path)
            .map_err(|e| HarnessError::io(format!("open {}", path.display()), e))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(HarnessError::io(
                        format!("enter network namespace {}", self.name),
                        std::io::Error::last_os_error(),
                    ));
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(HarnessError::io(
                    "run in a network namespace",
                    std::io::Error::other("the thread panicked"),
                ))
            })
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// Deletes namespaces left by processes of this harness that died.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("pgzm-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh("ip", &["netns", "del", &name]);
            }
        }
    }
}

/// Two regions joined by a link: [`A_ADDR`] in `a`, [`B_ADDR`] in `b`.
#[derive(Debug)]
pub struct Regions {
    /// Region A.
    pub a: Netns,
    /// Region B.
    pub b: Netns,
    a_dev: String,
    b_dev: String,
    /// The link's shaping, to restore after [`Regions::cut`]: Mbit/s each way.
    shaped_mbit: std::sync::Mutex<Option<u32>>,
}

impl Regions {
    /// Creates the namespaces and the link between them (unshaped).
    pub fn create() -> Result<Regions, HarnessError> {
        if let Some(why) = unavailable() {
            return Err(HarnessError::io(
                "create network namespaces",
                std::io::Error::other(why),
            ));
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let a = Netns::create(format!("pgzm-{pid}-{n}a"))?;
        let b = Netns::create(format!("pgzm-{pid}-{n}b"))?;
        // Device names are per namespace, so these never clash with another run's.
        let (a_dev, b_dev) = ("pzlink-a".to_string(), "pzlink-b".to_string());
        sh(
            "ip",
            &[
                "link", "add", &a_dev, "netns", &a.name, "type", "veth", "peer", "name", &b_dev,
                "netns", &b.name,
            ],
        )?;
        for (ns, dev, addr) in [(&a, &a_dev, A_ADDR), (&b, &b_dev, B_ADDR)] {
            sh(
                "ip",
                &[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{addr}/30"),
                    "dev",
                    dev,
                ],
            )?;
            sh("ip", &["-n", &ns.name, "link", "set", dev, "up"])?;
        }
        Ok(Regions {
            a,
            b,
            a_dev,
            b_dev,
            shaped_mbit: std::sync::Mutex::new(None),
        })
    }

    fn ends(&self) -> [(&Netns, &str); 2] {
        [(&self.a, &self.a_dev), (&self.b, &self.b_dev)]
    }

    /// Limits the link to `mbit` Mbit/s each way (a token bucket on each end's egress, with a
    /// queue of 100 ms at that rate).
    pub fn shape(&self, mbit: u32) -> Result<(), HarnessError> {
        let rate = format!("{mbit}mbit");
        // The bucket holds 10 ms of traffic, at least 64 KiB (one TSO segment).
        let burst = format!("{}", (mbit as u64 * 1_000_000 / 8 / 100).max(64 * 1024));
        for (ns, dev) in self.ends() {
            sh(
                "ip",
                &[
                    "netns", "exec", &ns.name, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", &rate, "burst", &burst, "latency", "100ms",
                ],
            )?;
        }
        *self.shaped_mbit.lock().unwrap_or_else(|e| e.into_inner()) = Some(mbit);
        Ok(())
    }

    /// Cuts the link: every packet is dropped in both directions, silently (nothing tells the
    /// endpoints; their TCP retransmits), until [`Regions::restore`].
    pub fn cut(&self) -> Result<(), HarnessError> {
        for (ns, dev) in self.ends() {
            // A bucket smaller than any packet drops every packet.
            sh(
                "ip",
                &[
                    "netns", "exec", &ns.name, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", "8kbit", "burst", "100", "limit", "100",
                ],
            )?;
        }
        Ok(())
    }

    /// Ends a [`Regions::cut`]: the link as it was shaped before.
    pub fn restore(&self) -> Result<(), HarnessError> {
        let shaped = *self.shaped_mbit.lock().unwrap_or_else(|e| e.into_inner());
        match shaped {
            Some(mbit) => self.shape(mbit),
            None => {
                for (ns, dev) in self.ends() {
                    sh(
                        "ip",
                        &[
                            "netns", "exec", &ns.name, "tc", "qdisc", "del", "dev", dev, "root",
                        ],
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Bytes sent over the link so far: (from A to B, from B to A), from the devices' counters
    /// (Ethernet frames, headers included).
    pub fn bytes(&self) -> Result<(u64, u64), HarnessError> {
        let tx = |ns: &Netns, dev: &str| -> Result<u64, HarnessError> {
            let out = Command::new("ip")
                .args(["-n", &ns.name, "-s", "-j", "link", "show", "dev", dev])
                .output()
                .map_err(|e| HarnessError::io("run ip -s link", e))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
                HarnessError::io("parse ip -s -j link", std::io::Error::other(e.to_string()))
            })?;
            v[0]["stats64"]["tx"]["bytes"].as_u64().ok_or_else(|| {
                HarnessError::io(
                    "read the link's byte counter",
                    std::io::Error::other(String::from_utf8_lossy(&out.stdout).into_owned()),
                )
            })
        };
        Ok((tx(&self.a, &self.a_dev)?, tx(&self.b, &self.b_dev)?))
    }
}

/// The bytes a [`DelayProxy`] holds per direction of a connection, at most: the data in flight
/// on the simulated long link (a TCP window; at 100 Mbit/s and 50 ms RTT the link holds
/// 625 KB).
const PROXY_WINDOW: usize = 8 << 20;
/// Largest chunk the proxy reads at once.
const PROXY_CHUNK: usize = 64 << 10;

/// A TCP forwarder that adds latency: it listens in a region and forwards each connection to
/// an address in that region (its loopback), holding every chunk `one_way` in each direction,
/// so a round trip through it takes `2 × one_way` longer. Chunks are delayed, not the stream:
/// the reader keeps reading while earlier chunks wait, so the pipe stays full (up to
/// [`PROXY_WINDOW`] bytes in flight per direction, as a TCP window would allow). Stops on drop.
#[derive(Debug)]
pub struct DelayProxy {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DelayProxy {
    /// Starts a proxy in `ns`, listening on `listen_ip` (a free port) and forwarding to
    /// `upstream`, both as seen from inside `ns`.
    pub fn start(
        ns: &Netns,
        listen_ip: &str,
        upstream: std::net::SocketAddr,
        one_way: std::time::Duration,
    ) -> Result<DelayProxy, HarnessError> {
        let listen: std::net::SocketAddr = format!("{listen_ip}:0").parse().map_err(|e| {
            HarnessError::io(
                "parse the proxy's address",
                std::io::Error::other(format!("{e}")),
            )
        })?;
        // The listener is made in the namespace; the thread that serves it lives there too, so
        // the connections it opens upstream are made from inside the namespace.
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let path = Path::new(NETNS_DIR).join(&ns.name);
        let file = File::open(&path)
            .map_err(|e| HarnessError::io(format!("open {}", path.display()), e))?;
        let thread = std::thread::Builder::new()
            .name("delay-proxy".into())
            .spawn(move || {
                // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let _ = tx.send(Err(std::io::Error::last_os_error()));
                    return;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(listener.local_addr());
                    let accept = async {
                        while let Ok((client, _)) = listener.accept().await {
                            tokio::spawn(proxy_connection(client, upstream, one_way));
                        }
                    };
                    tokio::select! {
                        _ = accept => {}
                        _ = stop_rx => {}
                    }
                });
            })
            .map_err(|e| HarnessError::io("spawn the proxy thread", e))?;
        let addr = rx
            .recv()
            .map_err(|_| {
                HarnessError::io(
                    "start the delay proxy",
                    std::io::Error::other("its thread ended"),
                )
            })?
            .map_err(|e| HarnessError::io("start the delay proxy", e))?;
        Ok(DelayProxy {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: std::net::SocketAddr,
    one_way: std::time::Duration,
) {
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(delay_pipe(cr, sw, one_way), delay_pipe(sr, cw, one_way));
}

/// Copies `from` to `to`, each chunk written `delay` after it was read; at most
/// [`PROXY_WINDOW`] bytes wait at once.
async fn delay_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: std::time::Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(PROXY_WINDOW));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = {
        let window = window.clone();
        async move {
            loop {
                let mut buf = vec![0u8; PROXY_CHUNK];
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.truncate(n);
                // n ≤ PROXY_CHUNK < PROXY_WINDOW, so the permits always exist eventually.
                let Ok(permits) = window.acquire_many(n as u32).await else {
                    break;
                };
                permits.forget();
                if tx.send((tokio::time::Instant::now() + delay, buf)).is_err() {
                    break;
                }
            }
            // Dropping tx ends the writer once it has written what is queued.
        }
    };
    let writer = async move {
        while let Some((due, buf)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&buf).await.is_err() {
                // Wakes a reader waiting for room.
                window.close();
                return;
            }
            window.add_permits(buf.len());
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::PgCluster;

    /// A query from region B through a 25 ms proxy in region A.
    async fn round_trip(url: &str) -> Result<Duration, tokio_postgres::Error> {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let started = Instant::now();
        c.simple_query("SELECT 1").await?;
        Ok(started.elapsed())
    }

    /// The regions' link: a server in A answers from B only through the proxy, a round trip
    /// takes the proxy's two delays, the shaped link carries what the counters say at the
    /// rate it was given, and a cut link carries nothing until restored.
    #[test]
    fn regions_delay_shape_cut_and_count() {
        if let Some(why) = unavailable() {
            eprintln!("skipped: two regions {why}");
            return;
        }
        let regions = Regions::create().expect("regions");
        let server = regions
            .a
            .run(PgCluster::start)
            .expect("enter A")
            .expect("server in A");
        let upstream = format!("127.0.0.1:{}", server.port())
            .parse()
            .expect("addr");
        let proxy = DelayProxy::start(&regions.a, A_ADDR, upstream, Duration::from_millis(25))
            .expect("proxy");
        let url = format!("postgres://postgres@{}/postgres", proxy.addr());
        regions.shape(20).expect("shape");
        let in_b = |f: &(dyn Fn(&tokio::runtime::Runtime) + Sync)| {
            regions
                .b
                .run(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    f(&rt)
                })
                .expect("enter B")
        };
        in_b(&|rt| {
            let rtt = rt
                .block_on(round_trip(&url))
                .expect("query through the proxy");
            assert!(
                rtt >= Duration::from_millis(50) && rtt < Duration::from_millis(500),
                "{rtt:?}"
            );
            // The server's own address in A is not reachable from B.
            let direct = format!("postgres://postgres@127.0.0.1:{}/postgres", server.port());
            assert!(rt.block_on(round_trip(&direct)).is_err());
        });
        // 4 MB across the 20 Mbit/s link: at least 1.6 s, counted on A's side.
        let (a0, _) = regions.bytes().expect("counters");
        in_b(&|rt| {
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                let started = Instant::now();
                c.simple_query("SELECT repeat('x', 4000000)")
                    .await
                    .expect("4 MB");
                let took = started.elapsed();
                assert!(took >= Duration::from_millis(1500), "{took:?}");
            })
        });
        let (a1, _) = regions.bytes().expect("counters");
        assert!(a1 - a0 >= 4_000_000, "{} bytes counted", a1 - a0);
        // Cut: a query sent meanwhile gets no answer until the link is restored.
        in_b(&|rt| {
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect");
                tokio::spawn(conn);
                regions.cut().expect("cut");
                let q = c.simple_query("SELECT 1");
                tokio::pin!(q);
                assert!(
                    tokio::time::timeout(Duration::from_secs(1), &mut q)
                        .await
                        .is_err(),
                    "an answer across a cut link"
                );
                regions.restore().expect("restore");
                tokio::time::timeout(Duration::from_secs(15), q)
                    .await
                    .expect("the query is answered once the link is back")
                    .expect("query");
            })
        });
        drop(proxy);
        drop(server);
    }
}
