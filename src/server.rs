//! `serve`: binds every listener, starts the ingest thread and the reactor threads, and
//! writes the ready file once all of them run.
//!
//! ```text
//!  publishers ──TCP/Unix NDJSON──▶ ingest thread ──FrameRing (SPMC)──▶ reactor 0..N ──writev──▶ subscribers
//!                                  (validate, seq,                     (index, outboxes,
//!                                   frame once)                         one thread each)
//! ```

use std::cell::RefCell;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use socket2::{Domain, Socket, Type};

use crate::auth::LiveCredentials;
use crate::config::ServeConfig;
use crate::ingest::{Pipeline, SeqAllocator};
use crate::io::{self, IoMode, ListenerKind};
use crate::metrics::Metrics;
use crate::reactor::{self, Shared};
use crate::ring::FrameRing;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Addresses {
    pub ws: SocketAddr,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
}

/// A started server.
pub struct Running {
    pub addrs: Addresses,
    pub io: IoMode,
    pub reactors: usize,
    pub metrics: Arc<Metrics>,
    /// Receives the name of any server thread that ends (which only happens on failure).
    ended: crossbeam_channel::Receiver<String>,
    _stop: Arc<AtomicBool>,
}

impl Running {
    /// Blocks for as long as the server runs; returns an error if one of its threads died.
    pub fn wait(self) -> anyhow::Result<()> {
        let name = self
            .ended
            .recv()
            .unwrap_or_else(|_| "every server thread".into());
        bail!("{name} stopped unexpectedly")
    }
}

/// Sends the thread's name when it ends, however it ends (panics included).
struct EndNotice(String, crossbeam_channel::Sender<String>);

impl Drop for EndNotice {
    fn drop(&mut self) {
        let _ = self.1.send(std::mem::take(&mut self.0));
    }
}

fn bind_reuseport(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {addr}"))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

pub fn start(cfg: &ServeConfig, data_dir: &Path) -> anyhow::Result<Running> {
    if !cfg.listen.ip().is_loopback() && !cfg.insecure_plaintext {
        bail!(
            "refusing plaintext WebSocket on non-loopback address {}: tokens would cross the network in the clear; pass --insecure-plaintext to override",
            cfg.listen
        );
    }
    create_private_dir(data_dir)?;
    let stop = Arc::new(AtomicBool::new(false));
    let credentials = LiveCredentials::load(data_dir)?;
    credentials
        .clone()
        .watch(Duration::from_millis(250), stop.clone());
    let seq = SeqAllocator::open(data_dir)?;
    let mode = io::resolve(cfg.io).context("--io uring: io_uring cannot be set up here")?;
    let n = cfg
        .reactors
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);

    // Every reactor listens on the same port (SO_REUSEPORT); the first bind picks it.
    let metrics = Arc::new(Metrics::new(n));
    let first = bind_reuseport(cfg.listen)?;
    let ws = first.local_addr()?;
    let mut ws_listeners = vec![first];
    for _ in 1..n {
        ws_listeners.push(bind_reuseport(ws)?);
    }
    let ingest =
        TcpListener::bind(cfg.ingest).with_context(|| format!("binding ingest {}", cfg.ingest))?;
    let admin =
        TcpListener::bind(cfg.admin).with_context(|| format!("binding admin {}", cfg.admin))?;
    let unix = match &cfg.ingest_unix {
        Some(path) => {
            let _ = std::fs::remove_file(path); // a stale socket from a previous run
            Some(
                std::os::unix::net::UnixListener::bind(path)
                    .with_context(|| format!("binding {}", path.display()))?,
            )
        }
        None => None,
    };
    let addrs = Addresses {
        ws,
        ingest: ingest.local_addr()?,
        admin: admin.local_addr()?,
    };

    let (producer, cursors) = FrameRing::with_readers(cfg.replay.max(1), seq.peek(), n);
    let shared = Arc::new(Shared {
        client_queue: cfg.client_queue,
        max_frame: cfg.max_frame as u64,
        max_connections: cfg.max_connections,
        ping_interval: cfg.ping_interval,
        read_timeout: cfg.read_timeout,
        handshake_timeout: Duration::from_secs(10),
        credentials,
        metrics: metrics.clone(),
        connections: AtomicUsize::new(0),
        stop: stop.clone(),
    });

    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let (up_tx, up_rx) = crossbeam_channel::unbounded::<anyhow::Result<()>>();

    let pipeline = Pipeline::new(producer, seq, metrics.clone(), cfg.max_frame);
    {
        let (up, notice) = (
            up_tx.clone(),
            EndNotice("the ingest thread".into(), ended_tx.clone()),
        );
        std::thread::Builder::new()
            .name("krux-ingest".into())
            .spawn(move || {
                let _notice = notice;
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return drop(up.send(Err(e.into()))),
                };
                tokio::task::LocalSet::new().block_on(&rt, async move {
                    match run_ingest(pipeline, ingest, unix, admin, metrics, &up).await {
                        Ok(never) => match never {},
                        Err(e) => drop(up.send(Err(e))),
                    }
                });
            })?;
    }

    for (i, (listener, cursor)) in ws_listeners.into_iter().zip(cursors).enumerate() {
        let (up, shared) = (up_tx.clone(), shared.clone());
        let notice = EndNotice(format!("reactor {i}"), ended_tx.clone());
        std::thread::Builder::new()
            .name(format!("krux-reactor-{i}"))
            .spawn(move || {
                let _notice = notice;
                let up2 = up.clone();
                let res = io::run_reactor(mode, listener, move |lk| async move {
                    let _ = up2.send(Ok(()));
                    match lk {
                        ListenerKind::Uring(l) => reactor::run(i, shared, l, cursor).await,
                        ListenerKind::Epoll(l) => reactor::run(i, shared, l, cursor).await,
                    }
                });
                if let Err(e) = res {
                    let _ = up.send(Err(
                        anyhow::Error::new(e).context(format!("starting reactor {i}"))
                    ));
                }
            })?;
    }
    drop(up_tx);
    // The ingest thread reports itself up once its listeners are registered (see run_ingest).
    for _ in 0..n + 1 {
        match up_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("server threads did not start within 10 s"),
        }
    }

    tracing::info!(ws = %addrs.ws, ingest = %addrs.ingest, admin = %addrs.admin, reactors = n, io = ?mode, "krux-relay is up");
    if let Some(path) = &cfg.ready_file {
        write_ready_file(path, &addrs, mode)?;
    }
    Ok(Running {
        addrs,
        io: mode,
        reactors: n,
        metrics: shared.metrics.clone(),
        ended,
        _stop: stop,
    })
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

fn write_ready_file(path: &Path, addrs: &Addresses, mode: IoMode) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "ws": addrs.ws.to_string(),
        "ingest": addrs.ingest.to_string(),
        "admin": addrs.admin.to_string(),
        "pid": std::process::id(),
        "io": mode,
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{body}\n"))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

enum Never {}

/// The ingest thread's accept loops: TCP publishers, Unix publishers, the admin port.
async fn run_ingest(
    pipeline: Pipeline,
    tcp: TcpListener,
    unix: Option<std::os::unix::net::UnixListener>,
    admin: TcpListener,
    metrics: Arc<Metrics>,
    up: &crossbeam_channel::Sender<anyhow::Result<()>>,
) -> anyhow::Result<Never> {
    let pipeline = Rc::new(RefCell::new(pipeline));
    tcp.set_nonblocking(true)?;
    admin.set_nonblocking(true)?;
    let tcp = tokio::net::TcpListener::from_std(tcp)?;
    let admin = tokio::net::TcpListener::from_std(admin)?;
    if let Some(u) = unix {
        u.set_nonblocking(true)?;
        let u = tokio::net::UnixListener::from_std(u)?;
        let p = pipeline.clone();
        tokio::task::spawn_local(async move {
            loop {
                match u.accept().await {
                    Ok((s, _)) => drop(tokio::task::spawn_local(crate::ingest::serve_publisher(
                        s,
                        p.clone(),
                    ))),
                    Err(e) => accept_backoff("ingest unix", e).await,
                }
            }
        });
    }
    tokio::task::spawn_local(crate::admin::serve(admin, metrics));
    let _ = up.send(Ok(()));
    loop {
        match tcp.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::task::spawn_local(crate::ingest::serve_publisher(s, pipeline.clone()));
            }
            Err(e) => accept_backoff("ingest", e).await,
        }
    }
}

/// Accept errors (EMFILE, ECONNABORTED) are transient: log, pause, keep listening.
pub async fn accept_backoff(what: &str, e: std::io::Error) {
    tracing::warn!("{what}: accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
