//! krux-loadtest: drives krux-relay (or the in-repo baseline and limit servers) with
//! subscribers and publishers, and reports throughput, loss, latency and cost.
//!
//! `run` measures one target; `compare` runs the same scenario against the relay, the
//! baseline and the limit server, alternating, and reports medians and ratios; `ingest`
//! measures publishers alone, end to end, against the relay and the baseline.

mod client;
mod cluster;
mod ingest;
mod report;
mod scenario;
mod target;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use client::Shared;
use report::{median, Point, Report};
use scenario::{Fanout, Pool, Published, Scenario};
use target::{proc_sample, Kind, Target, TargetArgs};

#[derive(Parser)]
#[command(
    name = "krux-loadtest",
    version,
    about = "Load test harness for krux-relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure one server.
    Run {
        #[command(flatten)]
        scenario: Scenario,
        #[command(flatten)]
        target: TargetArgs,
        /// Where to write the JSON report and the SVG plot.
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
        /// Exit 1 if any delivery was lost.
        #[arg(long)]
        fail_on_loss: bool,
    },
    /// The same scenario against relay, baseline and limit server, alternating.
    Compare {
        #[command(flatten)]
        scenario: Scenario,
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
        /// Exit 1 if the relay's median deliveries/s is below the baseline's (CI's gross
        /// regression check).
        #[arg(long)]
        fail_below_baseline: bool,
    },
    /// Publisher throughput end to end, no subscribers: relay and baseline in one run.
    Ingest(ingest::IngestArgs),
    /// Throughput through nodes sharing a NATS JetStream stream, against standalone.
    Cluster(cluster::ClusterArgs),
}

fn main() -> anyhow::Result<()> {
    // A worker process (see `worker`): spawned by `run`, not for people.
    if std::env::args().nth(1).as_deref() == Some("worker") {
        return worker::main();
    }
    match Cli::parse().command {
        Command::Run {
            scenario,
            target,
            out,
            fail_on_loss,
        } => {
            let t = Target::open(&target, None)?;
            let report = run_once(&scenario, &t)?;
            println!("{}", report.summary());
            report.write(&out, "run")?;
            println!("report: {}", out.join("run.json").display());
            if fail_on_loss && report.lost > 0 {
                eprintln!("krux-loadtest: {} deliveries lost", report.lost);
                std::process::exit(1);
            }
        }
        Command::Compare {
            scenario,
            target,
            rounds,
            out,
            fail_below_baseline,
        } => {
            let ok = compare(&scenario, &target, rounds, &out)?;
            if fail_below_baseline && !ok {
                eprintln!("krux-loadtest: the relay delivered less than the baseline");
                std::process::exit(1);
            }
        }
        Command::Cluster(args) => {
            let reports = cluster::run(&args)?;
            println!("report: {}", args.out.join("cluster.json").display());
            if reports.iter().any(|r| r.delivered_min < r.accepted) {
                anyhow::bail!("a subscriber did not get every accepted event");
            }
        }
        Command::Ingest(args) => {
            let reports = ingest::run(&args)?;
            println!("report: {}", args.out.join("ingest.json").display());
            if reports.iter().any(|r| r.accepted + r.rejected != r.events) {
                anyhow::bail!("a server did not account for every line");
            }
        }
    }
    Ok(())
}

pub fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    })
}

fn percentile(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

pub fn run_once(sc: &Scenario, t: &Target) -> anyhow::Result<Report> {
    let label = t
        .kind
        .map_or("attached".to_string(), |k| format!("{k:?}").to_lowercase());
    runtime(sc.client_threads)?.block_on(async {
        let pool = Arc::new(Pool::generate(sc, 4096)?);
        let filters = pool.filters(sc)?;
        let fanout = Arc::new(Fanout::new(&filters));
        let shared = Shared::new(filters.len());
        let published = Arc::new(Mutex::new(Published::default()));
        let rss_before = proc_sample(t.pid).map_or(0, |p| p.rss);

        let workers = sc.workers.unwrap_or(if filters.len() > worker::PER_WORKER {
            filters.len().div_ceil(worker::PER_WORKER)
        } else {
            0
        });
        let reconnect = sc.churn > 0 || sc.storm;
        let started = Instant::now();
        let queries: Vec<String> = filters.iter().map(|f| f.query()).collect();
        let (mut subs, hs) = if workers > 0 {
            eprintln!(
                "{label}: connecting {} subscribers from {workers} worker processes",
                filters.len()
            );
            let cfg = worker::Config {
                ws: t.ws,
                token: t.token.clone(),
                ca_pem: t.ca_pem.clone(),
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
        let mut report = Report {
            target: label.clone(),
            scenario: serde_json::to_value(sc)?,
            subscribers_connected: filters.len(),
            handshakes_per_s: filters.len() as f64 / connect_s.max(1e-9),
            handshake_p50_us: percentile(&hs, 0.5),
            handshake_p99_us: percentile(&hs, 0.99),
            ..Report::default()
        };
        let client_cpu = |subs: &Subscribers| -> Option<f64> {
            let mut cpu = proc_sample(None)?.cpu_s;
            if let Subscribers::Workers(w) = subs {
                for pid in w.pids() {
                    cpu += proc_sample(Some(pid))?.cpu_s;
                }
            }
            Some(cpu)
        };

        // Stalled subscribers: connected, then never read (until the end, to see how the
        // server closed them). Their traffic is not counted.
        let mut stalled = Vec::new();
        for _ in 0..sc.stalled {
            let (s, _, _) = client::connect(t.ws, &t.token, "", t.tls.as_ref(), None).await?;
            stalled.push(s);
        }

        if sc.idle {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = proc_sample(t.pid).map_or(0, |p| p.rss);
            report.server_rss_bytes = after;
            report.rss_per_connection_bytes = Some(
                (after as f64 - rss_before as f64) / report.subscribers_connected.max(1) as f64,
            );
            subs.finish(&shared).await?;
            return Ok(report);
        }

        let rate = sc.rate()?;
        let mut publishers = tokio::task::JoinSet::new();
        for p in 0..sc.publishers.max(1) {
            let (pool, fanout, published, shared) = (
                pool.clone(),
                fanout.clone(),
                published.clone(),
                shared.clone(),
            );
            let (ingest, window, per) = (
                t.ingest,
                sc.window,
                rate.map(|r| (r / sc.publishers.max(1) as u64).max(1)),
            );
            publishers.spawn(client::publish(
                ingest,
                pool,
                p * 997,
                per,
                window,
                fanout,
                published,
                shared,
            ));
        }

        tokio::time::sleep(sc.warmup).await;
        let lat_reset = || {
            let mut l = shared.latency.lock().expect("latency lock");
            l.total.reset();
            l.interval.reset();
        };
        lat_reset();
        shared.measuring.store(true, Relaxed);
        let (d0, p0) = (
            shared.delivered.load(Relaxed),
            shared.published.load(Relaxed),
        );
        let (s0, c0) = (proc_sample(t.pid), client_cpu(&subs));
        let m0 = Instant::now();
        let live = ProgressBar::new_spinner().with_prefix(label.clone());
        live.set_style(ProgressStyle::with_template("{prefix} {spinner} {msg}").expect("template"));
        let mut last = (d0, Instant::now());
        let mut stormed = false;
        let mut pick = 0x9e37_79b9_7f4a_7c15_u64;
        while m0.elapsed() < sc.duration {
            tokio::time::sleep(
                Duration::from_secs(1).min(sc.duration.saturating_sub(m0.elapsed())),
            )
            .await;
            if sc.storm && !stormed && m0.elapsed() >= sc.duration / 2 {
                stormed = true;
                subs.storm(&shared).await?;
            }
            for _ in 0..sc.churn {
                pick = pick
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                subs.churn(&shared, (pick >> 33) as usize % filters.len())
                    .await?;
            }
            let d = shared.delivered.load(Relaxed);
            let dt = last.1.elapsed().as_secs_f64().max(1e-9);
            let rate_now = (d - last.0) as f64 / dt;
            let p99 = {
                let mut l = shared.latency.lock().expect("latency lock");
                let p = percentile(&l.interval, 0.99);
                l.interval.reset();
                p
            };
            last = (d, Instant::now());
            report.timeline.push(Point {
                t_s: m0.elapsed().as_secs_f64(),
                deliveries_per_s: rate_now,
                p99_us: p99,
            });
            live.set_message(format!(
                "{:.0} deliveries/s, p99 {p99} µs, {} events published",
                rate_now,
                shared.published.load(Relaxed)
            ));
            live.tick();
        }
        let measured_s = m0.elapsed().as_secs_f64();
        let (d1, p1) = (
            shared.delivered.load(Relaxed),
            shared.published.load(Relaxed),
        );
        let (s1, c1) = (proc_sample(t.pid), client_cpu(&subs));
        shared.measuring.store(false, Relaxed);
        shared.stop_publishing.store(true, Relaxed);
        live.finish_and_clear();
        while let Some(r) = publishers.join_next().await {
            r?.context("publisher")?;
        }
        // Drain: everything published should arrive.
        let expected_total = shared.expected.load(Relaxed);
        let drain_until = Instant::now() + Duration::from_secs(10);
        while shared.delivered.load(Relaxed) < expected_total && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let published = published.lock().expect("published lock").clone();
        let mut lost = 0;
        for (i, (frames, closed)) in subs.finish(&shared).await?.into_iter().enumerate() {
            let want = published.expected(&filters[i]);
            if !closed && frames < want {
                lost += want - frames;
            }
        }

        for s in stalled {
            let code = client::final_close(s).await;
            *report.stalled_closes.entry(code).or_default() += 1;
        }

        let lat = shared.latency.lock().expect("latency lock");
        let h = &lat.total;
        report.events_in_per_s = (p1 - p0) as f64 / measured_s;
        report.deliveries_per_s = (d1 - d0) as f64 / measured_s;
        report.expected_deliveries = expected_total;
        report.received_deliveries = shared.delivered.load(Relaxed);
        report.lost = lost;
        report.rejected_events = shared.rejected.load(Relaxed);
        report.latency_p50_us = percentile(h, 0.5);
        report.latency_p99_us = percentile(h, 0.99);
        report.latency_p999_us = percentile(h, 0.999);
        report.latency_max_us = h.max();
        report.latency_samples = h.len();
        report.cdf = h
            .iter_quantiles(1)
            .map(|v| (v.value_iterated_to(), v.quantile_iterated_to()))
            .collect();
        report.closes_by_code = shared.closes.lock().expect("closes lock").clone();
        report.reconnects = shared.reconnects.load(Relaxed);
        report.duplicates = shared.duplicates.load(Relaxed);
        report.reconnect_p99_us = percentile(
            &shared.reconnect_latency.lock().expect("latency lock"),
            0.99,
        );
        if let (Some(a), Some(b)) = (s0, s1) {
            report.server_cpu_s = b.cpu_s - a.cpu_s;
            report.server_cpu_pct = 100.0 * report.server_cpu_s / measured_s;
            report.server_rss_bytes = b.rss;
            report.deliveries_per_server_cpu_s = (d1 - d0) as f64 / report.server_cpu_s.max(1e-9);
        }
        if let (Some(a), Some(b)) = (c0, c1) {
            report.client_cpu_pct = 100.0 * (b - a) / measured_s;
        }
        report.measured_s = measured_s;
        Ok(report)
    })
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
                shared.churn[i].store(true, Relaxed);
                Ok(())
            }
            Subscribers::Workers(w) => w.churn(i).await,
        }
    }

    /// Every subscriber reconnects at once.
    async fn storm(&mut self, shared: &Shared) -> anyhow::Result<()> {
        match self {
            Subscribers::Local(_) => {
                shared.churn.iter().for_each(|f| f.store(true, Relaxed));
                Ok(())
            }
            Subscribers::Workers(w) => w.storm().await,
        }
    }

    /// Stops every subscriber; per subscriber (in order): frames received, closed by the server.
    async fn finish(self, shared: &Shared) -> anyhow::Result<Vec<(u64, bool)>> {
        match self {
            Subscribers::Local(mut readers) => {
                shared.stop.store(true, Relaxed);
                let mut out = vec![(0, false); shared.churn.len()];
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

/// Runs relay, baseline and limit alternately; prints medians and ratios. Returns whether
/// the relay's median deliveries/s is at least the baseline's.
fn compare(
    sc: &Scenario,
    args: &TargetArgs,
    rounds: usize,
    out: &std::path::Path,
) -> anyhow::Result<bool> {
    let kinds = [Kind::Relay, Kind::Baseline, Kind::Limit];
    let mut all: Vec<Vec<Report>> = vec![Vec::new(); kinds.len()];
    for round in 1..=rounds.max(1) {
        for (k, kind) in kinds.iter().enumerate() {
            let t = Target::open(args, Some(*kind))?;
            let r = run_once(sc, &t)?;
            drop(t);
            eprintln!("round {round}: {}", r.summary());
            r.write(out, &format!("{}-{round}", r.target))?;
            all[k].push(r);
        }
    }
    let med = |k: usize, f: fn(&Report) -> f64| median(all[k].iter().map(f).collect());
    let rows: Vec<serde_json::Value> = kinds
        .iter()
        .enumerate()
        .map(|(k, kind)| {
            serde_json::json!({
                "target": kind,
                "deliveries_per_s": med(k, |r| r.deliveries_per_s),
                "events_in_per_s": med(k, |r| r.events_in_per_s),
                "latency_p99_us": med(k, |r| r.latency_p99_us as f64),
                "server_cpu_pct": med(k, |r| r.server_cpu_pct),
                "client_cpu_pct": med(k, |r| r.client_cpu_pct),
                "deliveries_per_server_cpu_s": med(k, |r| r.deliveries_per_server_cpu_s),
                "lost": all[k].iter().map(|r| r.lost).sum::<u64>(),
            })
        })
        .collect();
    let d = |k: usize| med(k, |r| r.deliveries_per_s);
    let e = |k: usize| med(k, |r| r.deliveries_per_server_cpu_s);
    let ratios = serde_json::json!({
        "relay_over_baseline_deliveries": d(0) / d(1).max(1e-9),
        "relay_over_limit_deliveries": d(0) / d(2).max(1e-9),
        "relay_over_baseline_deliveries_per_cpu_s": e(0) / e(1).max(1e-9),
    });
    let summary =
        serde_json::json!({ "scenario": sc, "rounds": rounds, "medians": rows, "ratios": ratios });
    std::fs::create_dir_all(out)?;
    std::fs::write(
        out.join("compare.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    println!(
        "{:<9} {:>14} {:>12} {:>10} {:>10} {:>16} {:>6}",
        "target", "deliveries/s", "events/s", "p99 µs", "srv CPU%", "deliv/CPU-s", "lost"
    );
    for r in &rows {
        println!(
            "{:<9} {:>14.0} {:>12.0} {:>10.0} {:>10.0} {:>16.0} {:>6}",
            r["target"].as_str().unwrap_or("?"),
            r["deliveries_per_s"].as_f64().unwrap_or(0.0),
            r["events_in_per_s"].as_f64().unwrap_or(0.0),
            r["latency_p99_us"].as_f64().unwrap_or(0.0),
            r["server_cpu_pct"].as_f64().unwrap_or(0.0),
            r["deliveries_per_server_cpu_s"].as_f64().unwrap_or(0.0),
            r["lost"]
        );
    }
    println!(
        "relay/baseline {:.2}x deliveries, {:.2}x per CPU-second; relay/limit {:.0}%",
        ratios["relay_over_baseline_deliveries"]
            .as_f64()
            .unwrap_or(0.0),
        ratios["relay_over_baseline_deliveries_per_cpu_s"]
            .as_f64()
            .unwrap_or(0.0),
        100.0
            * ratios["relay_over_limit_deliveries"]
                .as_f64()
                .unwrap_or(0.0)
    );
    println!("report: {}", out.join("compare.json").display());
    Ok(d(0) >= d(1))
}
