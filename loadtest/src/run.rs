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

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::{JoinHandle, JoinSet};

use crate::client::{self, Book, Observed, PublisherConfig, Shared, Stream, SubEnd, Workload};
use crate::report::{Point, Report};
use crate::scenario::{Fanout, Pool, Published, Ramp, Rate, Scenario, SeqIndex, SubFilter};
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
    /// One per subscriber slot, up to the stages' peak; slots `..active` are taken.
    filters: Vec<SubFilter>,
    active: usize,
    work: Arc<Workload>,
    shared: Arc<Shared>,
    subs: Subscribers,
    /// Stage runs: the observer, and the last seq it has seen.
    observer: Option<(JoinHandle<Observed>, Arc<AtomicU64>)>,
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
        sc.window_len()?;
        let pool = Pool::generate(sc, 4096)?;
        let filters = pool.filters(sc)?;
        let initial = sc.subscribers;
        let work = Arc::new(Workload {
            book: Mutex::new(Book {
                fanout: Fanout::new(&filters[..initial]),
                published: Published::default(),
            }),
            pool,
        });
        let shared = Shared::new(filters.len());
        let rss_before = server_sample(t.pid).map_or(0, |p| p.rss);

        let workers = sc.workers.unwrap_or(if filters.len() > worker::PER_WORKER {
            filters.len().div_ceil(worker::PER_WORKER)
        } else {
            0
        });
        let staged = !sc.stages.is_empty();
        anyhow::ensure!(
            !(staged && workers > 0),
            "--stages keeps its subscribers in this process (at most {} at the peak): they cannot be split over --workers",
            worker::PER_WORKER
        );
        // Subscribers that may leave in a stage track seqs, to be told what they were owed.
        let reconnect = sc.churn > 0 || sc.storm || staged;
        let started = Instant::now();
        let queries: Vec<String> = filters[..initial].iter().map(|f| f.query()).collect();
        let ep = client::Endpoint {
            ws: t.ws,
            token: t.token.clone(),
            tls: t.tls.clone(),
            deflate: sc.compression,
        };
        let (subs, hs) = if workers > 0 {
            eprintln!("{label}: connecting {initial} subscribers from {workers} worker processes");
            let cfg = worker::Config {
                ws: t.ws,
                token: t.token.clone(),
                ca_pem: t.ca_pem.clone(),
                resume: t.resume,
                deflate: sc.compression,
                queries,
                sample_every: sc.sample_every,
                reconnect,
                connect_concurrency: sc.connect_concurrency.div_ceil(workers),
                threads: sc.client_threads,
            };
            let (w, hs) = worker::Workers::start(workers, cfg, shared.clone()).await?;
            (Subscribers::Workers(w), hs)
        } else {
            let bar = ProgressBar::new(initial as u64)
                .with_style(
                    ProgressStyle::with_template("{prefix} connecting {pos}/{len} {wide_bar}")
                        .expect("template"),
                )
                .with_prefix(label.clone());
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
            (
                Subscribers::Local {
                    readers,
                    mark: Vec::new(),
                },
                hs,
            )
        };
        let connect_s = started.elapsed().as_secs_f64();
        let observer = staged.then(|| {
            let seq = Arc::new(AtomicU64::new(0));
            let task = tokio::spawn(client::observe(ep.clone(), shared.clone(), seq.clone()));
            (task, seq)
        });
        let report = Report {
            target: label.clone(),
            target_info: t.info(),
            scenario: serde_json::to_value(sc)?,
            subscribers_connected: initial,
            handshakes_per_s: initial as f64 / connect_s.max(1e-9),
            handshake_p50_us: percentile(&hs, 0.5),
            handshake_p99_us: percentile(&hs, 0.99),
            ..Report::default()
        };
        let mut stalled = Vec::new();
        for _ in 0..sc.stalled {
            let opened = client::connect(&ep, "", None, &shared.counts).await?;
            stalled.push(opened.stream);
        }
        Ok(Connected {
            sc,
            t,
            label,
            churned: vec![false; filters.len()],
            filters,
            active: initial,
            work,
            shared,
            subs,
            observer,
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
        self.set_rate(self.sc.rate()?);
        let n = self.sc.publishers.max(1);
        let mut publishers = JoinSet::new();
        for p in 0..n {
            let cfg = PublisherConfig {
                ingest: self.t.ingest,
                offset: p * 997,
                publishers: n as u64,
                window: self.sc.window,
            };
            publishers.spawn(client::publish(cfg, self.work.clone(), self.shared.clone()));
        }
        Ok(Publishing {
            connected: self,
            publishers,
        })
    }

    fn set_rate(&self, rate: Rate) {
        let r = match rate {
            Rate::Max => 0,
            Rate::PerSecond(r) => r,
        };
        self.shared.control.rate.store(r, Relaxed);
    }

    /// A stage moves the subscribers to `target`: new ones join live, the last ones leave.
    fn ramp_subscribers(&mut self, target: usize) {
        let target = target.min(self.filters.len());
        let Subscribers::Local { readers, .. } = &mut self.subs else {
            return; // refused in `connect`
        };
        let mut book = self.work.book.lock().expect("book lock");
        while self.active < target {
            let i = self.active;
            let r = client::Reconnect {
                ep: client::Endpoint {
                    ws: self.t.ws,
                    token: self.t.token.clone(),
                    tls: self.t.tls.clone(),
                    deflate: self.sc.compression,
                },
                query: self.filters[i].query(),
            };
            client::join(readers, r, self.shared.clone(), self.sc.sample_every, i);
            book.fanout.add(&self.filters[i], 1);
            self.active += 1;
        }
        while self.active > target {
            self.active -= 1;
            let i = self.active;
            self.shared.control.life[i].fetch_add(1, Relaxed);
            book.fanout.add(&self.filters[i], -1);
        }
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
    wire_bytes: u64,
    published: u64,
    server: Option<ProcSample>,
    client_cpu: Option<f64>,
}

impl Mark {
    fn take(c: &Connected<'_>) -> Mark {
        Mark {
            at: Instant::now(),
            delivered: c.shared.counts.delivered.load(Relaxed),
            wire_bytes: c.shared.counts.wire_bytes.load(Relaxed),
            published: c.shared.counts.published.load(Relaxed),
            server: server_sample(c.t.pid),
            client_cpu: c.client_cpu(),
        }
    }
}

/// What was owed at the quiet point that starts the window: the window's counts are
/// the end's minus these.
struct QuietPoint {
    published: Published,
    closes: BTreeMap<u16, u64>,
    /// The last seq the observer had seen (stage runs).
    seq: u64,
}

impl<'a> Publishing<'a> {
    /// Warm-up, the quiet point, then the measured window: one timeline point a second,
    /// churn, storm and stages as the scenario asks.
    async fn measure(mut self) -> anyhow::Result<Measured<'a>> {
        let (sc, shared) = (self.connected.sc, self.connected.shared.clone());
        let window = sc.window_len()?;
        sleep_unless_interrupted(sc.warmup).await;
        let quiet = self.quiet_point().await?;
        let c = &mut self.connected;
        {
            let mut l = shared.counts.latency.lock().expect("latency lock");
            l.total.reset();
            l.interval.reset();
        }
        shared.control.measuring.store(true, Relaxed);
        let start = Mark::take(c);
        shared.control.paused.store(false, Relaxed);
        // Progress once a second: a spinner on a terminal, a line otherwise (CI logs).
        let on_terminal = std::io::stderr().is_terminal();
        let live = ProgressBar::new_spinner().with_prefix(c.label.clone());
        live.set_style(ProgressStyle::with_template("{prefix} {spinner} {msg}").expect("template"));
        let ramp = Ramp::new(sc.subscribers, sc.rate()?, &sc.stages);
        let mut stage = None;
        let mut marks = Vec::new();
        let mut last = (start.delivered, start.published, Instant::now());
        let mut stormed = false;
        let mut pick = 0x9e37_79b9_7f4a_7c15_u64;
        let mut closes_seen = quiet.closes.values().sum::<u64>();
        let mut next_point = Duration::from_secs(1).min(window);
        while start.at.elapsed() < window && !interrupted() {
            let left = next_point.min(window).saturating_sub(start.at.elapsed());
            // Stages move in steps of 100 ms; points are a second apart.
            let step = if sc.stages.is_empty() { 1000 } else { 100 };
            sleep_unless_interrupted(left.min(Duration::from_millis(step))).await;
            if let Some((i, subs, rate)) = ramp.at(start.at.elapsed()) {
                c.ramp_subscribers(subs);
                c.set_rate(rate);
                if stage != Some(i) {
                    stage = Some(i);
                    let s = &sc.stages[i];
                    let rate = match s.rate {
                        Some(Rate::PerSecond(r)) => format!(", {r} events/s"),
                        Some(Rate::Max) => ", max rate".into(),
                        None => String::new(),
                    };
                    marks.push(format!(
                        "stage {}: to {} subscribers{rate}",
                        i + 1,
                        s.subscribers
                    ));
                }
            }
            if start.at.elapsed() < next_point && start.at.elapsed() < window {
                continue;
            }
            next_point += Duration::from_secs(1);
            if sc.storm && !stormed && start.at.elapsed() >= window / 2 {
                stormed = true;
                c.subs.storm(&shared).await?;
                c.churned[..c.active].iter_mut().for_each(|x| *x = true);
                marks.push("storm".to_string());
            }
            for _ in 0..sc.churn.min(c.active) {
                pick = pick
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let i = (pick >> 33) as usize % c.active;
                c.subs.churn(&shared, i).await?;
                c.churned[i] = true;
            }
            if sc.churn > 0 {
                marks.push(format!("churn {}", sc.churn));
            }
            let d = shared.counts.delivered.load(Relaxed);
            let published = shared.counts.published.load(Relaxed);
            let secs = last.2.elapsed().as_secs_f64().max(1e-9);
            let (rate_now, events_now) = (
                (d - last.0) as f64 / secs,
                (published - last.1) as f64 / secs,
            );
            last = (d, published, Instant::now());
            let p99 = {
                let mut l = shared.counts.latency.lock().expect("latency lock");
                let p = percentile(&l.interval, 0.99);
                l.interval.reset();
                p
            };
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
                marks: std::mem::take(&mut marks),
                subscribers: c.active,
                events_per_s: events_now,
            });
            let line = format!(
                "{:.0}/{:.0} s, {} subscribers, {events_now:.0} events/s, {rate_now:.0} deliveries/s, p99 {p99} µs, {} deliveries in flight, {closes} closed by the server",
                start.at.elapsed().as_secs_f64(),
                window.as_secs_f64(),
                c.active,
                expected.saturating_sub(d),
            );
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
            quiet,
            start,
            end,
        })
    }

    /// Holds the publishers until what is in flight has arrived (or nothing has for 1 s,
    /// at most 10 s), then notes what each subscriber has: the window's loss is counted
    /// from here, over the same interval as its rates.
    async fn quiet_point(&mut self) -> anyhow::Result<QuietPoint> {
        let c = &mut self.connected;
        let counts = &c.shared.counts;
        c.shared.control.paused.store(true, Relaxed);
        // A batch being written when the flag went up still counts: let it land.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let until = Instant::now() + Duration::from_secs(10);
        let mut progress = (counts.delivered.load(Relaxed), Instant::now());
        while counts.delivered.load(Relaxed) < counts.expected.load(Relaxed)
            && Instant::now() < until
            && progress.1.elapsed() < Duration::from_secs(1)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let d = counts.delivered.load(Relaxed);
            if d != progress.0 {
                progress = (d, Instant::now());
            }
        }
        c.subs.mark(&c.shared, c.active).await?;
        Ok(QuietPoint {
            published: c.work.book.lock().expect("book lock").published.clone(),
            closes: counts.closes.lock().expect("closes lock").clone(),
            seq: c.observer.as_ref().map_or(0, |(_, s)| s.load(Relaxed)),
        })
    }
}

/// The window measured; publishers stopped.
struct Measured<'a> {
    connected: Connected<'a>,
    quiet: QuietPoint,
    start: Mark,
    end: Mark,
}

impl Measured<'_> {
    /// Waits (at most 10 s) for everything published to arrive, stops the subscribers,
    /// counts what each lacks of what was published in the window, reads the stalled
    /// sockets' closes, and reports.
    async fn drain(self) -> anyhow::Result<Report> {
        let Measured {
            connected: c,
            quiet,
            start,
            end,
        } = self;
        let counts = &c.shared.counts;
        let expected_total = counts.expected.load(Relaxed);
        let drain_until = Instant::now() + Duration::from_secs(10);
        while counts.delivered.load(Relaxed) < expected_total && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let published = c.work.book.lock().expect("book lock").published.clone();
        let ends = c.subs.finish(&c.shared).await?;
        let seqs = match c.observer {
            Some((task, _)) => {
                let seen = task.await?;
                if seen.broken {
                    eprintln!("{}: the observer's stream had a hole: the loss of subscribers that joined or left during the window is not known", c.label);
                }
                Some((SeqIndex::new(&seen.events, &c.work.pool), seen.broken))
            }
            None => None,
        };
        // What each subscriber was owed from the window and did not get is lost, whether
        // the server closed it or not: a run whose subscribers were all dropped lost
        // everything after.
        let mut report = c.report;
        let mut lost = 0;
        let mut owed_total = 0;
        for (i, e) in ends {
            let f = &c.filters[i];
            if e.joined_after.is_none() {
                report.warmup_lost += quiet.published.expected(f).saturating_sub(e.before);
            }
            let owed = match (e.joined_after, e.left, &seqs) {
                (None, false, _) => published.expected(f) - quiet.published.expected(f),
                (Some(u64::MAX), ..) => 0, // never subscribed
                (after, left, Some((ix, broken))) => {
                    report.loss_unknown |= *broken;
                    let until = if left { e.last_seq } else { u64::MAX };
                    ix.count(f, after.unwrap_or(quiet.seq), until)
                }
                (_, _, None) => unreachable!("only stage runs join and leave"),
            };
            let missing = owed.saturating_sub(e.frames);
            lost += missing;
            owed_total += owed;
            let health = if e.left {
                "left"
            } else if e.joined_after.is_some() {
                "joined"
            } else if c.churned[i] {
                "churning"
            } else {
                "healthy"
            };
            for split in [
                report.by_filter.entry(f.class().into()).or_default(),
                report.by_health.entry(health.into()).or_default(),
            ] {
                split.subscribers += 1;
                split.expected += owed;
                split.received += e.frames.min(owed);
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
        report.wire_bytes_per_delivery =
            (end.wire_bytes - start.wire_bytes) as f64 / delivered.max(1) as f64;
        report.expected_deliveries = owed_total;
        report.received_deliveries = owed_total - lost;
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
        // Closes from the quiet point on; those before it are reported apart.
        let mut closes = counts.closes.lock().expect("closes lock").clone();
        for (code, n) in &quiet.closes {
            let left = closes.entry(*code).or_default();
            *left -= n;
            if *left == 0 {
                closes.remove(code);
            }
        }
        report.closes_by_code = closes;
        report.warmup_closes_by_code = quiet.closes;
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

/// Where the subscriber sockets live: tasks of this process (and the frames each had at
/// the quiet point), or worker processes.
enum Subscribers {
    Local {
        readers: client::Readers,
        mark: Vec<u64>,
    },
    Workers(worker::Workers),
}

impl Subscribers {
    /// Subscriber `i` drops its connection and resumes with `since`.
    async fn churn(&mut self, shared: &Shared, i: usize) -> anyhow::Result<()> {
        match self {
            Subscribers::Local { .. } => {
                shared.control.churn[i].store(true, Relaxed);
                Ok(())
            }
            Subscribers::Workers(w) => w.churn(i).await,
        }
    }

    /// Every subscriber reconnects at once.
    async fn storm(&mut self, shared: &Shared) -> anyhow::Result<()> {
        match self {
            Subscribers::Local { .. } => {
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

    /// The quiet point: notes the frames each of the first `active` subscribers has.
    async fn mark(&mut self, shared: &Shared, active: usize) -> anyhow::Result<()> {
        match self {
            Subscribers::Local { mark, .. } => {
                *mark = shared.counts.frames[..active]
                    .iter()
                    .map(|f| f.load(Relaxed))
                    .collect();
                Ok(())
            }
            Subscribers::Workers(w) => w.mark().await,
        }
    }

    /// Stops every subscriber; per connection (a slot and how it ended), with the frames
    /// counted from the quiet point.
    async fn finish(self, shared: &Shared) -> anyhow::Result<Vec<(usize, SubEnd)>> {
        match self {
            Subscribers::Local { mut readers, mark } => {
                shared.control.stop.store(true, Relaxed);
                let mut out = Vec::new();
                while let Some(r) = readers.join_next().await {
                    let (i, mut end) = r?;
                    if end.joined_after.is_none() {
                        end.before = mark.get(i).copied().unwrap_or(0);
                        end.frames -= end.before;
                    }
                    out.push((i, end));
                }
                out.sort_by_key(|(i, e)| (*i, e.joined_after.is_some()));
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
