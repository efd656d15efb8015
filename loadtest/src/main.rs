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
mod run;
mod scenario;
mod target;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use report::{median, Report};
use run::run_once;
use scenario::Scenario;
use target::{Kind, Target, TargetArgs};

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
