//! Worker processes: a process may open at most 20,000 files here, so runs with tens of
//! thousands of subscribers split the subscriber sockets across `krux-loadtest worker`
//! processes. The parent keeps the publishers, the window, the clock and the report.
//!
//! Protocol, one line per message. Parent → worker (stdin): the `Config` as JSON, then
//! `c <i>` (subscriber `i` of this worker reconnects with `since`), `storm` (all do),
//! `mark` (note what each subscriber has: the quiet point before the window) and `stop`.
//! Worker → parent (stdout): `ready <hist>` once connected (handshake times),
//! `s <delivered> <hist>` every `REPORT` (frames so far, latency samples since the last
//! report), `marked` after `mark`, and `done <json>` (`Done`) after `stop`. `<hist>` is `value:count` pairs
//! joined by commas (`-` when empty).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::task::JoinHandle;

use crate::client::{self, Shared, SubEnd};

/// Subscribers per worker when `--workers` is not given: well under the 20,000-file limit.
pub const PER_WORKER: usize = 15_000;

/// How often a worker reports its progress.
const REPORT: Duration = Duration::from_millis(20);

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Config {
    pub ws: SocketAddr,
    pub token: String,
    pub ca_pem: Option<PathBuf>,
    /// TLS sessions resume on reconnect.
    pub resume: bool,
    /// Subscribers offer permessage-deflate.
    #[serde(default)]
    pub deflate: bool,
    /// One filter query per subscriber of this worker.
    pub queries: Vec<String>,
    pub sample_every: u64,
    /// Subscribers reconnect with `since` when told to (churn and storm runs).
    pub reconnect: bool,
    pub connect_concurrency: usize,
    pub threads: usize,
}

/// A worker's final account.
#[derive(serde::Serialize, serde::Deserialize)]
struct Done {
    /// Per subscriber: how it ended, its frames counted from the `mark`.
    subscribers: Vec<SubEnd>,
    closes: std::collections::BTreeMap<u16, u64>,
    duplicates: u64,
    reconnects: u64,
    #[serde(default)]
    tls_full: u64,
    #[serde(default)]
    tls_resumed: u64,
    /// Reconnect times, as `<hist>`.
    reconnect_latency: String,
}

fn encode(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    let pairs: Vec<String> = h
        .iter_recorded()
        .map(|v| format!("{}:{}", v.value_iterated_to(), v.count_at_value()))
        .collect();
    pairs.join(",")
}

fn merge(into: &mut Histogram<u64>, text: &str) -> anyhow::Result<()> {
    if text == "-" {
        return Ok(());
    }
    for pair in text.split(',') {
        let (v, c) = pair.split_once(':').context("histogram pair")?;
        let _ = into.record_n(v.parse()?, c.parse()?);
    }
    Ok(())
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// The worker process: `krux-loadtest worker`, driven over stdin/stdout.
pub fn main() -> anyhow::Result<()> {
    // Ctrl-C on a terminal reaches the whole process group: the parent handles it (ends
    // the window, then stops its workers), so a worker must not die of it first.
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let mut first = String::new();
    std::io::stdin()
        .read_line(&mut first)
        .context("reading the worker config")?;
    let cfg: Config = serde_json::from_str(&first).context("worker config")?;
    crate::runtime(cfg.threads)?.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let tls = cfg
        .ca_pem
        .as_deref()
        .map(|pem| crate::target::tls_connector(pem, cfg.resume))
        .transpose()?;
    let n = cfg.queries.len();
    let shared = Shared::new(n);
    shared.control.measuring.store(true, Relaxed); // the parent decides which samples count
    let mut out = tokio::io::stdout();

    let ep = client::Endpoint {
        ws: cfg.ws,
        token: cfg.token.clone(),
        tls,
        deflate: cfg.deflate,
    };
    let (mut readers, hs) = client::start_subscribers(
        &ep,
        &cfg.queries,
        cfg.connect_concurrency,
        &shared,
        cfg.sample_every,
        cfg.reconnect,
        || {},
    )
    .await?;
    out.write_all(format!("ready {}\n", encode(&hs)).as_bytes())
        .await?;
    out.flush().await?;

    // Commands from the parent; `mark` is answered from the loop below, which owns stdout.
    let (mark_tx, mut mark_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let commands = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match line.split_once(' ') {
                    Some(("c", i)) => {
                        if let Some(f) = i
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| shared.control.churn.get(i))
                        {
                            f.store(true, Relaxed);
                        }
                    }
                    _ if line == "storm" => shared
                        .control
                        .churn
                        .iter()
                        .for_each(|f| f.store(true, Relaxed)),
                    _ if line == "mark" => {
                        let _ = mark_tx.send(());
                    }
                    _ if line == "stop" => break,
                    _ => {}
                }
            }
            // `stop`, or the parent is gone: either way, finish.
            shared.control.stop.store(true, Relaxed);
        })
    };

    let mut tick = tokio::time::interval(REPORT);
    let mut mark = vec![0; n];
    while !shared.control.stop.load(Relaxed) {
        tokio::select! {
            _ = tick.tick() => {}
            Some(()) = mark_rx.recv() => {
                for (m, f) in mark.iter_mut().zip(&shared.counts.frames) {
                    *m = f.load(Relaxed);
                }
                out.write_all(b"marked\n").await?;
                out.flush().await?;
                continue;
            }
        }
        let samples = {
            let mut l = shared.counts.latency.lock().expect("latency lock");
            let text = encode(&l.interval);
            l.interval.reset();
            text
        };
        let line = format!("s {} {samples}\n", shared.counts.delivered.load(Relaxed));
        out.write_all(line.as_bytes()).await?;
        out.flush().await?;
    }
    commands.await?;
    let mut subscribers = vec![SubEnd::default(); n];
    while let Some(r) = readers.join_next().await {
        let (i, end) = r?;
        subscribers[i] = SubEnd {
            frames: end.frames - mark[i],
            before: mark[i],
            ..end
        };
    }
    let samples = encode(&shared.counts.latency.lock().expect("latency lock").interval);
    let done = Done {
        subscribers,
        closes: shared.counts.closes.lock().expect("closes lock").clone(),
        duplicates: shared.counts.duplicates.load(Relaxed),
        reconnects: shared.counts.reconnects.load(Relaxed),
        tls_full: shared.counts.tls_full.load(Relaxed),
        tls_resumed: shared.counts.tls_resumed.load(Relaxed),
        reconnect_latency: encode(
            &shared
                .counts
                .reconnect_latency
                .lock()
                .expect("latency lock"),
        ),
    };
    let line = format!(
        "s {} {samples}\ndone {}\n",
        shared.counts.delivered.load(Relaxed),
        serde_json::to_string(&done)?
    );
    out.write_all(line.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// The parent's handle on its worker processes.
pub struct Workers {
    procs: Vec<Proc>,
    /// One message per `marked` line from a worker.
    marked: tokio::sync::mpsc::UnboundedReceiver<()>,
}

struct Proc {
    pid: u32,
    /// The first subscriber (global index) this worker holds.
    first: usize,
    len: usize,
    stdin: ChildStdin,
    /// Reads the worker's reports into the parent's `Shared`; ends with its `Done`.
    collector: JoinHandle<anyhow::Result<Done>>,
    _child: tokio::process::Child,
}

impl Workers {
    /// Starts `count` workers for subscribers with `queries`, split evenly, and waits until
    /// all are connected. Returns them and the merged handshake times.
    pub async fn start(
        count: usize,
        template: Config,
        shared: Arc<Shared>,
    ) -> anyhow::Result<(Workers, Histogram<u64>)> {
        let exe = std::env::current_exe().context("locating krux-loadtest")?;
        let n = template.queries.len();
        let per = n.div_ceil(count.max(1));
        let mut procs = Vec::new();
        let mut hs = new_histogram();
        let mut ready = Vec::new();
        let (marked_tx, marked) = tokio::sync::mpsc::unbounded_channel();
        for first in (0..n).step_by(per.max(1)) {
            let len = per.min(n - first);
            let cfg = Config {
                ws: template.ws,
                token: template.token.clone(),
                ca_pem: template.ca_pem.clone(),
                resume: template.resume,
                deflate: template.deflate,
                queries: template.queries[first..first + len].to_vec(),
                sample_every: template.sample_every,
                reconnect: template.reconnect,
                connect_concurrency: template.connect_concurrency,
                threads: template.threads,
            };
            let mut child = Command::new(&exe)
                .arg("worker")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker process")?;
            let pid = child.id().context("worker pid")?;
            let mut stdin = child.stdin.take().context("worker stdin")?;
            stdin
                .write_all(format!("{}\n", serde_json::to_string(&cfg)?).as_bytes())
                .await?;
            let mut lines = BufReader::new(child.stdout.take().context("worker stdout")?).lines();
            let (tx, rx) = tokio::sync::oneshot::channel();
            ready.push(rx);
            let shared = shared.clone();
            let marked_tx = marked_tx.clone();
            let collector = tokio::spawn(async move {
                let mut tx = Some(tx);
                let mut delivered = 0u64;
                while let Some(line) = lines.next_line().await? {
                    let (kind, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    match kind {
                        "ready" => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(rest.to_string());
                            }
                        }
                        "marked" => {
                            let _ = marked_tx.send(());
                        }
                        "s" => {
                            let (d, samples) = rest.split_once(' ').context("status line")?;
                            let d: u64 = d.parse()?;
                            shared.counts.delivered.fetch_add(d - delivered, Relaxed);
                            delivered = d;
                            if shared.control.measuring.load(Relaxed) {
                                let mut l = shared.counts.latency.lock().expect("latency lock");
                                merge(&mut l.total, samples)?;
                                merge(&mut l.interval, samples)?;
                            }
                            shared.counts.progress.notify_waiters();
                        }
                        "done" => {
                            let done: Done = serde_json::from_str(rest)?;
                            let mut closes = shared.counts.closes.lock().expect("closes lock");
                            for (code, k) in &done.closes {
                                *closes.entry(*code).or_default() += k;
                            }
                            shared.counts.duplicates.fetch_add(done.duplicates, Relaxed);
                            shared.counts.reconnects.fetch_add(done.reconnects, Relaxed);
                            shared.counts.tls_full.fetch_add(done.tls_full, Relaxed);
                            shared
                                .counts
                                .tls_resumed
                                .fetch_add(done.tls_resumed, Relaxed);
                            merge(
                                &mut shared
                                    .counts
                                    .reconnect_latency
                                    .lock()
                                    .expect("latency lock"),
                                &done.reconnect_latency,
                            )?;
                            return Ok(done);
                        }
                        other => bail!("unexpected worker message {other:?}"),
                    }
                }
                bail!("a worker process ended without its final report")
            });
            procs.push(Proc {
                pid,
                first,
                len,
                stdin,
                collector,
                _child: child,
            });
        }
        for rx in ready {
            let hist = rx
                .await
                .context("a worker process failed while connecting its subscribers")?;
            merge(&mut hs, &hist)?;
        }
        Ok((Workers { procs, marked }, hs))
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    async fn send(p: &mut Proc, line: &str) -> anyhow::Result<()> {
        p.stdin.write_all(line.as_bytes()).await?;
        p.stdin.flush().await?;
        Ok(())
    }

    /// Subscriber `i` (global index) reconnects with `since`.
    pub async fn churn(&mut self, i: usize) -> anyhow::Result<()> {
        match self
            .procs
            .iter_mut()
            .find(|p| (p.first..p.first + p.len).contains(&i))
        {
            Some(p) => Workers::send(p, &format!("c {}\n", i - p.first)).await,
            None => Ok(()),
        }
    }

    pub async fn storm(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            Workers::send(p, "storm\n").await?;
        }
        Ok(())
    }

    /// The quiet point: every worker notes what its subscribers have.
    pub async fn mark(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            Workers::send(p, "mark\n").await?;
        }
        for _ in 0..self.procs.len() {
            tokio::time::timeout(Duration::from_secs(10), self.marked.recv())
                .await
                .context("a worker did not answer `mark` within 10 s")?
                .context("a worker process ended")?;
        }
        Ok(())
    }

    /// Stops every worker and returns, per subscriber (its global slot), how it ended.
    pub async fn finish(self) -> anyhow::Result<Vec<(usize, SubEnd)>> {
        let mut all = Vec::new();
        for mut p in self.procs {
            Workers::send(&mut p, "stop\n").await?;
            let done = tokio::time::timeout(Duration::from_secs(60), p.collector)
                .await
                .context("a worker did not finish within 60 s")???;
            all.extend(
                done.subscribers
                    .into_iter()
                    .enumerate()
                    .map(|(j, e)| (p.first + j, e)),
            );
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_cross_the_pipe_intact() {
        let mut h = new_histogram();
        for v in [1u64, 7, 7, 950, 12_345, 2_000_000] {
            h.record(v).unwrap();
        }
        let mut back = new_histogram();
        merge(&mut back, &encode(&h)).unwrap();
        assert_eq!(back, h);
        merge(&mut back, &encode(&new_histogram())).unwrap();
        assert_eq!(back.len(), 6, "an empty report adds nothing");
        assert!(merge(&mut back, "12").is_err());
    }
}
