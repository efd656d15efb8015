//! The ingest thread's main loop: accepts publishers over TCP and a Unix socket until
//! shutdown, hands each to the `Sink` (this node's ring, or the cluster's stream), then
//! waits within the grace period for every publisher to get its summary, and records the
//! final ring position so the reactors know when everything accepted has been dispatched.

use std::cell::RefCell;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::SeqCst;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Pipeline;
use crate::io::accept::accept_backoff;
use crate::live::Live;
use crate::ring::FrameRing;

/// Where accepted lines go. Its tasks run on the ingest thread (`spawn_local`).
#[allow(async_fn_in_trait)] // single-threaded runtime: futures are deliberately not Send
pub trait Sink {
    /// Serves one publisher connection until it ends or `stop` turns true.
    fn serve<S: AsyncRead + AsyncWrite + 'static>(
        &self,
        s: S,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()>;
    /// Once every publisher has its summary, within the grace period: waits for what
    /// they sent to reach this node's ring.
    async fn drained(&self) {}
    /// After the last event: `head` is the ring position after it.
    fn stopped(&self, _head: u64) -> anyhow::Result<()> {
        Ok(())
    }
}

/// A standalone node's sink: its own ring, through the pipeline.
pub struct LocalSink {
    pipeline: Rc<RefCell<Pipeline>>,
    data_dir: PathBuf,
}

impl LocalSink {
    pub fn new(pipeline: Pipeline, data_dir: PathBuf) -> LocalSink {
        LocalSink {
            pipeline: Rc::new(RefCell::new(pipeline)),
            data_dir,
        }
    }
}

impl Sink for LocalSink {
    fn serve<S: AsyncRead + AsyncWrite + 'static>(
        &self,
        s: S,
        stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::task::spawn_local(super::serve_publisher(s, self.pipeline.clone(), stop))
    }

    /// Nothing after `head - 1` was published: the next run's resumes need no gap notice.
    fn stopped(&self, head: u64) -> anyhow::Result<()> {
        super::seq::record_clean_stop(&self.data_dir, head.saturating_sub(1))
    }
}

/// The publishers' listeners.
pub struct Listeners {
    pub tcp: TcpListener,
    pub unix: Option<UnixListener>,
}

/// Runs the ingest until shutdown (see the module comment). `up` is called once the
/// listeners are registered with the runtime.
pub async fn run(
    sink: impl Sink,
    listeners: Listeners,
    ring: &FrameRing,
    live: &Live,
    up: impl FnOnce(),
) -> anyhow::Result<()> {
    listeners.tcp.set_nonblocking(true)?;
    let tcp = tokio::net::TcpListener::from_std(listeners.tcp)?;
    let unix = match listeners.unix {
        Some(u) => {
            u.set_nonblocking(true)?;
            Some(tokio::net::UnixListener::from_std(u)?)
        }
        None => None,
    };
    up();

    let mut publishers = Vec::new();
    let mut shutdown = live.shutdown.clone();
    loop {
        let accept_unix = async {
            match &unix {
                Some(u) => u.accept().await.map(|(s, _)| s),
                None => std::future::pending().await,
            }
        };
        let stop = shutdown.clone();
        tokio::select! {
            r = tcp.accept() => match r {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    publishers.push(sink.serve(s, stop));
                }
                Err(e) => accept_backoff("ingest", e).await,
            },
            r = accept_unix => match r {
                Ok(s) => publishers.push(sink.serve(s, stop)),
                Err(e) => accept_backoff("ingest unix", e).await,
            },
            _ = shutdown.wait_for(|s| *s) => break,
        }
        publishers.retain(|p| !p.is_finished());
    }
    drop((tcp, unix));
    let _ = tokio::time::timeout(live.shutdown_grace, async {
        for p in publishers {
            let _ = p.await;
        }
        sink.drained().await;
    })
    .await;
    let head = ring.head();
    live.ingest_final_pos.store(head, SeqCst);
    sink.stopped(head)
}
