//! One measured run against one target, in typed phases, each consuming the one before:
//!
//! ```text
//!  connect ──▶ Connected ──idle──▶ Report (RSS per connection)
//!                 │
//!                 └──publish──▶ Publishing ──measure──▶ Measured ──drain──▶ Report
//! ```
//!
//! `Connected` holds the subscribers (tasks here, or worker processes) and the stalled
//! sockets; `Publishing` adds the publisher tasks; `Measured` the counters and CPU read
//! at both ends of the measured window; the drain waits for what is in flight, counts
//! what each subscriber is owed and lacks, and fills in the report.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinSet;

use crate::client::{self, PublisherConfig, Shared, Stream, Workload};
use crate::report::{Point, Report};
use crate::scenario::{Fanout, Pool, Published, Scenario, SubFilter};
use crate::target::{proc_sample, ProcSample, Target};
use crate::worker;

/// Set by the first Ctrl-C: the measured window ends there, and the run drains and
/// reports as if it had ended on time. A second Ctrl-C exits at once.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Relaxed)
}

/// Sleeps `d`, or less if Ctrl-C comes first.
async fn sleep_unless_interrupted(d: Duration) {
    let until = Instant::now() + d;
    while !interrupted() && Instant::now() < until {
        tokio::time::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        )
        .await;
    }
}

pub fn run_once(sc: &Scenario, t: &Target) -> anyhow::Result<Report> {
    crate::runtime(sc.client_threads)?.block_on(async {
        tokio::spawn(async {
            while tokio::signal::ctrl_c().await.is_ok() {
                if INTERRUPTED.swap(true, Relaxed) {
                    eprintln!("krux-loadtest: interrupted twice: exiting without a report");
                    crate::target::kill_spawned();
                    std::process::exit(130);
                }
                eprintln!("krux-loadtest: interrupted: stopping the load, draining, reporting (Ctrl-C again to exit at once)");
            }
        });
        let connected = Connected::connect(sc, t).await?;
        if sc.idle {
            return connected.idle().await;
        }
        connected.publish()?.measure().await?.drain().await
    })
}

pub fn percentile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

/// Subscribers connected (and stalled sockets opened); nothing published yet.
struct Connected<'a> {
    sc: &'a Scenario,
    t: &'a Target,
    label: String,
    filters: Vec<SubFilter>,
    work: Arc<Workload>,
    shared: Arc<Shared>,
    subs: Subscribers,
    /// Connected, then never read until the end (to see how the server closed them).
    stalled: Vec<Box<dyn Stream>>,
    rss_before: u64,
    report: Report,
    /// Per subscriber: asked to reconnect at least once (churn, storm).
    churned: Vec<bool>,
}

impl<'a> Connected<'a> {
    async fn connect(sc: &'a Scenario, t: &'a Target) -> anyhow::Result<Connected<'a>> {
        let label = t
            .kind
            .map_or("attached".to_string(), |k| format!("{k:?}").to_lowercase());
        let pool = Pool::generate(sc, 4096)?;
        let filters = pool.filters(sc)?;
        let work = Arc::new(Workload {
            fanout: Fanout::new(&filters),
            pool,
            published: Mutex::new(Published::default()),
        });
        let shared = Shared::new(filters.len());
        let rss_before = server_sample(t.pid).map_or(0, |p| p.rss);

        let workers = sc.workers.unwrap_or(if filters.len() > worker::PER_WORKER {
            filters.len().div_ceil(worker::PER_WORKER)
        } else {
            0
        });
        let reconnect = sc.churn > 0 || sc.storm;
        let started = Instant::now();
        let queries: Vec<String> = filters.iter().map(|f| f.query()).collect();
        let (subs, hs) = if workers > 0 {
            eprintln!(
                "{label}: connecting {} subscribers from {workers} worker processes",
                filters.len()
            );
            let cfg = worker::Config {
                ws: t.ws,
                token: t.token.clone(),
                ca_pem: t.ca_pem.clone(),
                resume: t.resume,
                queries,
                sample_every: sc.sample_every,
                reconnect,
                connect_concurrency: sc.connect_concurrency.div_ceil(workers),
                threads: sc.client_threads,
            };
            let (w, hs) = worker::Workers::start(workers, cfg, shared.clone()).await?;
            (Subscribers::Workers(w), hs)
        } else {
            let bar = ProgressBar::new(filters.len() as u64)
                .with_style(
                    ProgressStyle::with_template("{prefix} connecting {pos}/{len} {wide_bar}")
                        .expect("template"),
                )
                .with_prefix(label.clone());
            let ep = client::Endpoint {
                ws: t.ws,
                token: t.token.clone(),
                tls: t.tls.clone(),
            };
            let (readers, hs) = client::start_subscribers(
                &ep,
                &queries,
                sc.connect_concurrency,
                &shared,
                sc.sample_every,
                reconnect,
                || bar.inc(1),
            )
            .await?;
            bar.finish_and_clear();
            (Subscribers::Local(readers), hs)
        };
        let connect_s = started.elapsed().as_secs_f64();
        let report = Report {
            target: label.clone(),
            target_info: t.info(),
            scenario: serde_json::to_value(sc)?,
            subscribers_connected: filters.len(),
            handshakes_per_s: filters.len() as f64 / connect_s.max(1e-9),
            handshake_p50_us: percentile(&hs, 0.5),
            handshake_p99_us: percentile(&hs, 0.99),
            ..Report::default()
        };
        let mut stalled = Vec::new();
        for _ in 0..sc.stalled {
            let (s, _, _) =
                client::connect(t.ws, &t.token, "", t.tls.as_ref(), None, &shared.counts).await?;
            stalled.push(s);
        }
        Ok(Connected {
            sc,
            t,
            label,
            churned: vec![false; filters.len()],
            filters,
            work,
            shared,
            subs,
            stalled,
            rss_before,
            report,
        })
    }

    /// `--idle`: what the connections cost the server in memory, and nothing else.
    async fn idle(mut self) -> anyhow::Result<Report> {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = server_sample(self.t.pid).map_or(0, |p| p.rss);
        self.report.server_measured = self.t.pid.is_some();
        self.report.server_rss_bytes = after;
        self.report.rss_per_connection_bytes = Some(
            (after as f64 - self.rss_before as f64)
                / self.report.subscribers_connected.max(1) as f64,
        );
        self.subs.finish(&self.shared).await?;
        Ok(self.report)
    }

    /// Starts the publishers, the rate split evenly between them.
    fn publish(self) -> anyhow::Result<Publishing<'a>> {
        let rate = self.sc.rate()?;
        let n = self.sc.publishers.max(1);
        let mut publishers = JoinSet::new();
        for p in 0..n {
            let cfg = PublisherConfig {
                ingest: self.t.ingest,
                offset: p * 997,
                rate: rate.map(|r| (r / n as u64).max(1)),
                window: self.sc.window,
            };
            publishers.spawn(client::publish(cfg, self.work.clone(), self.shared.clone()));
        }
        Ok(Publishing {
            connected: self,
            publishers,
        })
    }

    /// CPU seconds of this process and its worker processes.
    fn client_cpu(&self) -> Option<f64> {
        let mut cpu = proc_sample(None)?.cpu_s;
        if let Subscribers::Workers(w) = &self.subs {
            for pid in w.pids() {
                cpu += proc_sample(Some(pid))?.cpu_s;
            }
        }
        Some(cpu)
    }
}

/// Publishers running.
struct Publishing<'a> {
    connected: Connected<'a>,
    publishers: JoinSet<anyhow::Result<()>>,
}

/// Counters and CPU at one end of the measured window.
struct Mark {
    at: Instant,
    delivered: u64,
    published: u64,
    server: Option<ProcSample>,
    client_cpu: Option<f64>,
}

impl Mark {
    fn take(c: &Connected<'_>) -> Mark {
        Mark {
            at: Instant::now(),
            delivered: c.shared.counts.delivered.load(Relaxed),
            published: c.shared.counts.published.load(Relaxed),
            server: server_sample(c.t.pid),
            client_cpu: c.client_cpu(),
        }
    }
}

impl<'a> Publishing<'a> {
    /// Warm-up, then the measured window: one timeline point a second, churn and storm
    /// as the scenario asks.
    async fn measure(mut self) -> anyhow::Result<Measured<'a>> {
        let c = &mut self.connected;
        let (sc, shared) = (c.sc, c.shared.clone());
        sleep_unless_interrupted(sc.warmup).await;
        {
            let mut l = shared.counts.latency.lock().expect("latency lock");
            l.total.reset();
            l.interval.reset();
        }
        shared.control.measuring.store(true, Relaxed);
        let start = Mark::take(c);
        // Progress once a second: a spinner on a terminal, a line otherwise (CI logs).
        let on_terminal = std::io::stderr().is_terminal();
        let live = ProgressBar::new_spinner().with_prefix(c.label.clone());
        live.set_style(ProgressStyle::with_template("{prefix} {spinner} {msg}").expect("template"));
        let mut last = (start.delivered, Instant::now());
        let mut last_published = start.published;
        let mut stormed = false;
        let mut pick = 0x9e37_79b9_7f4a_7c15_u64;
        let mut closes_seen = 0;
        while start.at.elapsed() < sc.duration && !interrupted() {
            let left = sc.duration.saturating_sub(start.at.elapsed());
            sleep_unless_interrupted(Duration::from_secs(1).min(left)).await;
            let mut marks = Vec::new();
            if sc.storm && !stormed && start.at.elapsed() >= sc.duration / 2 {
                stormed = true;
                c.subs.storm(&shared).await?;
                c.churned.iter_mut().for_each(|x| *x = true);
                marks.push("storm".to_string());
            }
            for _ in 0..sc.churn {
                pick = pick
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (pick >> 33) as usize % c.filters.len();
                c.subs.churn(&shared, i).await?;
                c.churned[i] = true;
            }
            if sc.churn > 0 {
                marks.push(format!("churn {}", sc.churn));
            }
            let d = shared.counts.delivered.load(Relaxed);
            let rate_now = (d - last.0) as f64 / last.1.elapsed().as_secs_f64().max(1e-9);
            let p99 = {
                let mut l = shared.counts.latency.lock().expect("latency lock");
                let p = percentile(&l.interval, 0.99);
                l.interval.reset();
                p
            };
            last = (d, Instant::now());
            let published = shared.counts.published.load(Relaxed);
            let expected = shared.counts.expected.load(Relaxed);
            let closes: u64 = shared
                .counts
                .closes
                .lock()
                .expect("closes lock")
                .values()
                .sum();
            if closes > closes_seen {
                marks.push(format!("{} closed by the server", closes - closes_seen));
                closes_seen = closes;
            }
            c.report.timeline.push(Point {
                t_s: start.at.elapsed().as_secs_f64(),
                deliveries_per_s: rate_now,
                p99_us: p99,
                marks,
            });
            let line = format!(
                "{:.0}/{:.0} s, {} subscribers, {:.0} events/s, {rate_now:.0} deliveries/s, p99 {p99} µs, {} deliveries in flight, {closes} closed by the server",
                start.at.elapsed().as_secs_f64(),
                sc.duration.as_secs_f64(),
                c.filters.len(),
                (published - last_published) as f64,
                expected.saturating_sub(d),
            );
            last_published = published;
            if on_terminal {
                live.set_message(line);
                live.tick();
            } else {
                eprintln!("{}: {line}", c.label);
            }
        }
        let end = Mark::take(c);
        shared.control.measuring.store(false, Relaxed);
        shared.control.stop_publishing.store(true, Relaxed);
        live.finish_and_clear();
        while let Some(r) = self.publishers.join_next().await {
            r?.context("publisher")?;
        }
        Ok(Measured {
            connected: self.connected,
            start,
            end,
        })
    }
}

/// The window measured; publishers stopped.
struct Measured<'a> {
    connected: Connected<'a>,
    start: Mark,
    end: Mark,
}

impl Measured<'_> {
    /// Waits (at most 10 s) for everything published to arrive, stops the subscribers,
    /// counts what each lacks, reads the stalled sockets' closes, and reports.
    async fn drain(self) -> anyhow::Result<Report> {
        let Measured {
            connected: c,
            start,
            end,
        } = self;
        let counts = &c.shared.counts;
        let expected_total = counts.expected.load(Relaxed);
        let drain_until = Instant::now() + Duration::from_secs(10);
        while counts.delivered.load(Relaxed) < expected_total && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let published = c.work.published.lock().expect("published lock").clone();
        // What each subscriber was owed and did not get is lost, whether the server closed
        // it or not: a run whose subscribers were all dropped lost everything after.
        let mut lost = 0;
        let mut report = c.report;
        for (i, (frames, _closed)) in c.subs.finish(&c.shared).await?.into_iter().enumerate() {
            let expected = published.expected(&c.filters[i]);
            let missing = expected.saturating_sub(frames);
            lost += missing;
            let health = if c.churned[i] { "churning" } else { "healthy" };
            for split in [
                report
                    .by_filter
                    .entry(c.filters[i].class().into())
                    .or_default(),
                report.by_health.entry(health.into()).or_default(),
            ] {
                split.subscribers += 1;
                split.expected += expected;
                split.received += frames.min(expected);
                split.lost += missing;
            }
        }
        for s in c.stalled {
            let code = client::final_close(s).await;
            *report.stalled_closes.entry(code).or_default() += 1;
        }

        report.interrupted = interrupted();
        let measured_s = (end.at - start.at).as_secs_f64();
        let delivered = end.delivered - start.delivered;
        report.events_in_per_s = (end.published - start.published) as f64 / measured_s;
        report.deliveries_per_s = delivered as f64 / measured_s;
        report.expected_deliveries = expected_total;
        report.received_deliveries = counts.delivered.load(Relaxed);
        report.lost = lost;
        report.rejected_events = counts.rejected.load(Relaxed);
        let lat = counts.latency.lock().expect("latency lock");
        let h = &lat.total;
        report.latency_p50_us = percentile(h, 0.5);
        report.latency_p99_us = percentile(h, 0.99);
        report.latency_p999_us = percentile(h, 0.999);
        report.latency_max_us = h.max();
        report.latency_samples = h.len();
        report.cdf = h
            .iter_quantiles(1)
            .map(|v| (v.value_iterated_to(), v.quantile_iterated_to()))
            .collect();
        report.closes_by_code = counts.closes.lock().expect("closes lock").clone();
        report.reconnects = counts.reconnects.load(Relaxed);
        report.duplicates = counts.duplicates.load(Relaxed);
        {
            let reconnects = counts.reconnect_latency.lock().expect("latency lock");
            report.reconnect_p99_us = percentile(&reconnects, 0.99);
            report.reconnect_max_us = reconnects.max();
        }
        report.tls_full_handshakes = counts.tls_full.load(Relaxed);
        report.tls_resumed_handshakes = counts.tls_resumed.load(Relaxed);
        if let (Some(a), Some(b)) = (start.server, end.server) {
            report.server_measured = true;
            report.server_cpu_s = b.cpu_s - a.cpu_s;
            report.server_cpu_pct = 100.0 * report.server_cpu_s / measured_s;
            report.server_rss_bytes = b.rss;
            report.deliveries_per_server_cpu_s = delivered as f64 / report.server_cpu_s.max(1e-9);
        }
        if let (Some(a), Some(b)) = (start.client_cpu, end.client_cpu) {
            report.client_cpu_pct = 100.0 * (b - a) / measured_s;
        }
        report.measured_s = measured_s;
        Ok(report)
    }
}

/// Where the subscriber sockets live: tasks of this process, or worker processes.
enum Subscribers {
    Local(client::Readers),
    Workers(worker::Workers),
}

impl Subscribers {
    /// Subscriber `i` drops its connection and resumes with `since`.
    async fn churn(&mut self, shared: &Shared, i: usize) -> anyhow::Result<()> {
        match self {
            Subscribers::Local(_) => {
                shared.control.churn[i].store(true, Relaxed);
                Ok(())
            }
            Subscribers::Workers(w) => w.churn(i).await,
        }
    }

    /// Every subscriber reconnects at once.
    async fn storm(&mut self, shared: &Shared) -> anyhow::Result<()> {
        match self {
            Subscribers::Local(_) => {
                shared
                    .control
                    .churn
                    .iter()
                    .for_each(|f| f.store(true, Relaxed));
                Ok(())
            }
            Subscribers::Workers(w) => w.storm().await,
        }
    }

    /// Stops every subscriber; per subscriber (in order): frames received, closed by the server.
    async fn finish(self, shared: &Shared) -> anyhow::Result<Vec<(u64, bool)>> {
        match self {
            Subscribers::Local(mut readers) => {
                shared.control.stop.store(true, Relaxed);
                let mut out = vec![(0, false); shared.control.churn.len()];
                while let Some(r) = readers.join_next().await {
                    let (i, res) = r?;
                    out[i] = res;
                }
                Ok(out)
            }
            Subscribers::Workers(w) => w.finish().await,
        }
    }
}

/// The server's CPU and memory: only from its PID (spawned, or `--pid`), never this
/// process's own, which is what `/proc/self` would give.
fn server_sample(pid: Option<u32>) -> Option<ProcSample> {
    pid.and_then(|p| proc_sample(Some(p)))
}
