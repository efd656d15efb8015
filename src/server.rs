//! `serve`: binds every listener, starts the ingest thread and the reactor threads, and
//! writes the ready file once all of them run.
//!
//! ```text
//!  publishers ──TCP/Unix NDJSON──▶ ingest thread ──FrameRing (SPMC)──▶ reactor 0..N ──writev──▶ subscribers
//!                                  (validate, seq,                     (index, outboxes,
//!                                   frame once)                         one thread each)
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use socket2::{Domain, Socket, Type};

use crate::auth::LiveCredentials;
use crate::cluster::ingest::ClusterSink;
use crate::config::ServeConfig;
use crate::ingest::{self, Pipeline, SeqAllocator};
use crate::io::accept::SocketBudget;
use crate::io::certs::{self, ServerTls};
use crate::io::{self, IoMode};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::reactor;
use crate::ring::{Cursor, FrameRing};

/// How often the TLS certificate files are checked for a renewal (SIGHUP: at once).
const CERT_POLL: Duration = Duration::from_secs(1);

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
    /// Receives the name of any server thread that ends.
    ended: crossbeam_channel::Receiver<String>,
    threads: Vec<std::thread::JoinHandle<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
    grace: Duration,
    stop: Arc<AtomicBool>,
}

impl Running {
    /// Runs until SIGTERM or SIGINT, then shuts down gracefully. Returns an error if a
    /// server thread died first.
    pub fn wait(self) -> anyhow::Result<()> {
        let signals = termination_signals()?;
        crossbeam_channel::select! {
            recv(self.ended) -> name => {
                bail!("{} stopped unexpectedly", name.unwrap_or_else(|_| "every server thread".into()))
            }
            recv(signals) -> _ => {
                tracing::info!("signal received: shutting down");
                self.shutdown();
                Ok(())
            }
        }
    }

    /// Graceful shutdown: stop accepting; let the ingest finish the lines it received and
    /// answer each publisher's summary; deliver what is queued; close subscribers with
    /// 1001 — all within `--shutdown-grace`.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let deadline = std::time::Instant::now() + self.grace + Duration::from_secs(1);
        for t in self.threads {
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A channel that receives once SIGTERM or SIGINT arrives.
pub(crate) fn termination_signals() -> anyhow::Result<crossbeam_channel::Receiver<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = crossbeam_channel::bounded(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Register before returning, so a signal sent right after start is not missed.
    let (mut term, mut int) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("krux-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            });
            let _ = tx.send(());
        })?;
    Ok(rx)
}

/// Sends the thread's name when it ends, however it ends (panics included).
struct EndNotice(String, crossbeam_channel::Sender<String>);

impl Drop for EndNotice {
    fn drop(&mut self) {
        let _ = self.1.send(std::mem::take(&mut self.0));
    }
}

/// Binds `addr` without SO_REUSEPORT, so it fails with "address in use" if any socket
/// holds the port, and returns the address with its port chosen. The probe is closed at
/// once; the reactors' SO_REUSEPORT sockets take the port right after. (Left: a process
/// binding the port with SO_REUSEPORT in that instant, or later, could still join; the
/// relays it could be, this one included, all claim the port alone first.)
fn claim_port(addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    // A relay that just died may hold its listeners a moment longer (io_uring releases
    // them from a kernel worker after the process is gone): a restart on the same port
    // waits that out, briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        probe.set_reuse_address(true)?; // only TIME_WAIT leftovers; never a live listener
        match probe.bind(&addr.into()) {
            Ok(()) => return probe.local_addr()?.as_socket().context("an IP address"),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("--listen {addr}: cannot bind")),
        }
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
    cfg.check().map_err(anyhow::Error::msg)?;
    crate::datadir::create_private_dir(data_dir)?;
    // Whoever can write these could add a token or rewind `seq`.
    crate::datadir::check(
        data_dir,
        &[
            crate::auth::TokenStore::new(data_dir).path().to_path_buf(),
            crate::auth::passphrase::path(data_dir),
            data_dir.join("seq"),
        ],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = Arc::new(ServerTls::new(certs::load_pem(cert, key)?, cfg.tls13_only)?);
            // Renewed files (cert-manager, ACME) go into service without a restart.
            certs::watch(
                tls.clone(),
                cert.clone(),
                key.clone(),
                CERT_POLL,
                stop.clone(),
            )?;
            Some(tls)
        }
        _ if cfg.tls_self_signed => {
            let pem = data_dir.join("tls-self-signed.pem");
            let (cert, fingerprint) = certs::self_signed(&pem)?;
            tracing::info!(certificate = %pem.display(), "TLS with a self-signed certificate, SHA-256 fingerprint {fingerprint}");
            Some(Arc::new(ServerTls::new(cert, cfg.tls13_only)?))
        }
        _ => None,
    };
    // In a cluster: the credentials read and checked, and one connection tried, so that
    // wrong ones fail the start with their cause.
    let nats = cfg.nats.settings()?;
    if let Some(nats) = &nats {
        crate::cluster::check_at_start(nats)?;
    }
    let cluster = nats.is_some();
    // Standalone, credentials and seqs live in the data dir; in a cluster, in NATS.
    let (credentials, seq) = if cluster {
        (Arc::new(LiveCredentials::empty(data_dir)), None)
    } else {
        let credentials = LiveCredentials::load(data_dir)?;
        credentials
            .clone()
            .watch(Duration::from_millis(250), stop.clone());
        (credentials, Some(SeqAllocator::open(data_dir)?))
    };
    let mode = io::resolve(cfg.io).context("--io uring: io_uring cannot be set up here")?;
    let n = cfg
        .reactors
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    // Every reactor listens on the same port (SO_REUSEPORT), which another process with
    // SO_REUSEPORT could join, so the port is first claimed alone: that fails if anything
    // (another relay included) holds it.
    let metrics = Arc::new(Metrics::new(n, cluster));
    let ws = claim_port(cfg.listen)?;
    let ws_listeners = (0..n)
        .map(|_| bind_reuseport(ws))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ingest =
        TcpListener::bind(cfg.ingest).with_context(|| format!("binding ingest {}", cfg.ingest))?;
    let admin =
        TcpListener::bind(cfg.admin).with_context(|| format!("binding admin {}", cfg.admin))?;
    let unix = match &cfg.ingest_unix {
        Some(path) => {
            remove_stale_socket(path)?;
            Some(
                std::os::unix::net::UnixListener::bind(path)
                    .with_context(|| format!("--ingest-unix {}: cannot bind", path.display()))?,
            )
        }
        None => None,
    };
    let addrs = Addresses {
        ws,
        ingest: ingest.local_addr()?,
        admin: admin.local_addr()?,
    };

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let first_pos = seq.as_ref().map_or(1, SeqAllocator::peek);
    let (producer, cursors) = FrameRing::bounded(cfg.replay, cfg.replay_memory, first_pos, n);
    if let Some(last) = seq.as_ref().and_then(SeqAllocator::previous_last) {
        producer.ring().set_previous_last(last);
    }
    let ring = producer.ring().clone();
    let (history_tx, history_rx) = tokio::sync::mpsc::unbounded_channel();
    if cluster {
        // Until the node's consumer knows where it starts in the stream, no resume is
        // served from the ring.
        ring.set_complete_from(u64::MAX);
    }
    let live = Arc::new(Live::new(
        credentials,
        metrics.clone(),
        SocketBudget::from_open_file_limit(),
        shutdown_rx,
        cfg.shutdown_grace,
    ));
    let settings = Arc::new(reactor::Settings {
        client_queue: cfg.client_queue,
        max_frame: cfg.max_frame as u64,
        max_connections: cfg.max_connections,
        ping_interval: cfg.ping_interval,
        read_timeout: cfg.read_timeout,
        handshake_timeout: cfg.handshake_timeout,
        tls: tls.map(|t| t.config.clone()),
        history: cluster.then_some(history_tx),
        allowed_origins: cfg.allowed_origin.clone(),
        compression: cfg.compression(),
    });

    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let mut threads = Vec::new();
    let (up_tx, up_rx) = crossbeam_channel::unbounded::<anyhow::Result<()>>();

    let sink = match seq {
        Some(seq) => SinkPlan::Local(Box::new(Pipeline::new(
            producer,
            seq,
            metrics.clone(),
            cfg.max_frame,
        ))),
        None => {
            let nats = nats.expect("cluster mode has --nats");
            let keys = Arc::new(crate::cluster::credentials::StreamKeys::default());
            let node = crate::cluster::node::Node {
                nats: nats.clone(),
                stream: cfg.stream.clone(),
                keys: keys.clone(),
                data_dir: data_dir.to_path_buf(),
                producer,
                metrics: metrics.clone(),
                credentials: live.credentials.clone(),
                history: history_rx,
            };
            let notice = EndNotice("the cluster thread".into(), ended_tx.clone());
            threads.push(spawn_runtime_thread(
                "krux-cluster",
                up_tx.clone(),
                notice,
                move |up| async move {
                    let _ = up.send(Ok(()));
                    if let Err(e) = crate::cluster::node::run(node).await {
                        tracing::error!("cluster: {e:#}");
                    }
                },
            )?);
            SinkPlan::Cluster {
                nats: Box::new(nats),
                keys,
                subject: cfg.stream.subject(),
            }
        }
    };
    {
        let notice = EndNotice("the ingest thread".into(), ended_tx.clone());
        let (live, dir, ring, max_line) = (
            live.clone(),
            data_dir.to_path_buf(),
            ring.clone(),
            cfg.max_frame,
        );
        let listeners = ingest::run::Listeners { tcp: ingest, unix };
        threads.push(spawn_runtime_thread(
            "krux-ingest",
            up_tx.clone(),
            notice,
            move |up| async move {
                let res = async {
                    // The admin port runs on this thread too.
                    admin.set_nonblocking(true)?;
                    let admin = tokio::net::TcpListener::from_std(admin)?;
                    tokio::task::spawn_local(crate::admin::serve(admin, live.metrics.clone()));
                    let ready = || drop(up.send(Ok(())));
                    match sink {
                        SinkPlan::Local(p) => {
                            let sink = ingest::LocalSink::new(*p, dir);
                            ingest::run::run(sink, listeners, &ring, &live, ready).await
                        }
                        SinkPlan::Cluster {
                            nats,
                            keys,
                            subject,
                        } => {
                            let (metrics, stop) = (live.metrics.clone(), live.shutdown.clone());
                            let sink =
                                ClusterSink::start(&nats, subject, keys, max_line, metrics, stop)
                                    .await?;
                            ingest::run::run(sink, listeners, &ring, &live, ready).await
                        }
                    }
                };
                if let Err(e) = res.await {
                    drop(up.send(Err(e)));
                }
            },
        )?);
    }

    for (i, (listener, cursor)) in ws_listeners.into_iter().zip(cursors).enumerate() {
        let main = ReactorThread {
            id: i,
            settings: settings.clone(),
            live: live.clone(),
            cursor,
            up: up_tx.clone(),
        };
        let (up, notice) = (
            up_tx.clone(),
            EndNotice(format!("reactor {i}"), ended_tx.clone()),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("krux-reactor-{i}"))
                .spawn(move || {
                    let _notice = notice;
                    if let Err(e) = io::run_reactor(mode, listener, main) {
                        let _ = up.send(Err(
                            anyhow::Error::new(e).context(format!("starting reactor {i}"))
                        ));
                    }
                })?,
        );
    }
    drop(up_tx);
    // The ingest thread reports itself up once its listeners are registered.
    for _ in 0..n + 1 + usize::from(cluster) {
        match up_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("server threads did not start within 10 s"),
        }
    }

    // One line with everything an operator checks first; no secret (the NATS URL is
    // redacted).
    tracing::info!(
        ws = %addrs.ws,
        tls = settings.tls.is_some(),
        ingest = %addrs.ingest,
        ingest_unix = %cfg.ingest_unix.as_deref().map_or("-".into(), |p| p.display().to_string()),
        admin = %addrs.admin,
        io = ?mode,
        reactors = n,
        max_connections = cfg.max_connections,
        socket_budget = live.sockets.limit,
        client_queue = cfg.client_queue,
        max_frame = cfg.max_frame,
        replay = cfg.replay,
        replay_memory = cfg.replay_memory,
        nats = %cfg.nats.url.as_deref().map_or("-".into(), crate::config::cluster::redact),
        "krux-relay is up"
    );
    if let Some(path) = &cfg.ready_file {
        write_ready_file(path, &addrs, mode, settings.tls.is_some())?;
    }
    Ok(Running {
        addrs,
        io: mode,
        reactors: n,
        metrics,
        ended,
        threads,
        shutdown: shutdown_tx,
        grace: cfg.shutdown_grace,
        stop,
    })
}

/// Removes what a previous run left at `path`, only if it is a socket nobody listens on:
/// a regular file (or a live relay's socket) there is an error, never deleted.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(()); // nothing there
    };
    let shown = path.display();
    if !meta.file_type().is_socket() {
        bail!(
            "--ingest-unix {shown}: a file that is not a socket is there; refusing to replace it"
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!("--ingest-unix {shown}: address in use (something is listening on it)");
    }
    std::fs::remove_file(path).with_context(|| format!("removing the stale socket {shown}"))
}

fn write_ready_file(path: &Path, addrs: &Addresses, mode: IoMode, tls: bool) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "ws": addrs.ws.to_string(),
        "ingest": addrs.ingest.to_string(),
        "admin": addrs.admin.to_string(),
        "pid": std::process::id(),
        "io": mode,
        "tls": tls,
    });
    crate::datadir::write_atomic(path, format!("{body}\n").as_bytes(), 0o644)
}

/// Where the ingest will put accepted lines: this node's ring, or (in a cluster) the
/// stream, through a NATS connection made on the ingest thread.
enum SinkPlan {
    Local(Box<Pipeline>),
    Cluster {
        nats: Box<crate::config::cluster::NatsSettings>,
        keys: Arc<crate::cluster::credentials::StreamKeys>,
        subject: String,
    },
}

/// A reactor thread's body, for whichever backend `io::run_reactor` picks.
struct ReactorThread {
    id: usize,
    settings: Arc<reactor::Settings>,
    live: Arc<Live>,
    cursor: Cursor,
    up: crossbeam_channel::Sender<anyhow::Result<()>>,
}

impl io::ReactorMain for ReactorThread {
    async fn run<L: io::Listener>(self, listener: L) {
        let _ = self.up.send(Ok(()));
        reactor::run(self.id, self.settings, self.live, listener, self.cursor).await
    }
}

/// A named thread running `body` on its own current-thread runtime (with a `LocalSet`);
/// a runtime that cannot be built is reported on `up`.
fn spawn_runtime_thread<F, Fut>(
    name: &str,
    up: crossbeam_channel::Sender<anyhow::Result<()>>,
    notice: EndNotice,
    body: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(crossbeam_channel::Sender<anyhow::Result<()>>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _notice = notice;
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return drop(up.send(Err(e.into()))),
            };
            tokio::task::LocalSet::new().block_on(&rt, body(up));
        })
}
