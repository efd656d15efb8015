//! krux-loadtest: drives krux-relay (or the in-repo baseline and limit servers) with
//! subscribers and publishers, and reports throughput, loss, latency and cost.
//!
//! `run` measures one target; `compare` runs the same scenario against the relay, the
//! baseline and the limit server, alternating, and reports medians and ratios; `ingest`
//! measures publishers alone, end to end, against the relay and the baseline.

mod client;
mod cluster;
mod diff;
mod ingest;
mod plan;
mod report;
mod run;
mod scenario;
mod target;
mod worker;

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
        /// Rounds of relay, baseline, limit (medians over them).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where each round's report and compare.json go.
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
        /// Exit 1 if the relay's median deliveries/s is below the baseline's (CI's gross
        /// regression check).
        #[arg(long)]
        fail_below_baseline: bool,
    },
    /// Run a plan: scenarios in sequence against one target, each judged by its
    /// thresholds. Exit 0 when every threshold holds, 99 when one fails, 1 when the plan
    /// could not be run. Target flags given here win over the plan's [target].
    Plan {
        /// The plan (TOML): a [target] table and [[scenario]] tables (docs/loadtest.md).
        file: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        /// Where the reports go; a directory that already holds a plan's report is never
        /// overwritten (DIR-2, DIR-3, … instead).
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
        /// Rounds of every `compare` scenario, instead of the plan's.
        #[arg(long)]
        rounds: Option<usize>,
    },
    /// Two reports side by side with ratios (before/after, plain/TLS); can fail on a
    /// regression (exit 99).
    Diff(diff::DiffArgs),
    /// Publisher throughput end to end, no subscribers: relay and baseline in one run.
    Ingest(ingest::IngestArgs),
    /// Throughput through nodes sharing a NATS JetStream stream, against standalone.
    Cluster(cluster::ClusterArgs),
}

fn main() -> anyhow::Result<()> {
    // A worker process (see `worker`): spawned by `run`, not for people.
    if std::env::args().nth(1).as_deref() == Some("worker") {
        if std::env::args().skip(2).any(|a| a == "--help" || a == "-h") {
            println!("krux-loadtest worker: internal; `run` spawns it to hold subscriber sockets (see --workers) and talks to it over its stdin and stdout.");
            return Ok(());
        }
        return worker::main();
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Plan {
            file, out, rounds, ..
        } => {
            let given = matches
                .subcommand_matches("plan")
                .map(given_target_flags)
                .unwrap_or_default();
            let passed = run_plan(&file, &given, &out, rounds)?;
            if run::interrupted() {
                eprintln!("krux-loadtest: interrupted: the plan did not run to its end");
                std::process::exit(130);
            }
            if !passed {
                std::process::exit(plan::THRESHOLD_FAILED);
            }
        }
        Command::Run {
            scenario,
            target,
            out,
            fail_on_loss,
        } => {
            let t = Target::open(&target, None)?;
            let report = run_once(&scenario, &t)?;
            drop(t); // a spawned server goes now, before any exit below
            println!("{}", report.summary());
            report.write(&out, "run")?;
            println!("report: {}", out.join("run.json").display());
            if report.interrupted {
                std::process::exit(130);
            }
            if fail_on_loss && report.lost_in_run() > 0 {
                eprintln!("krux-loadtest: {} deliveries lost", report.lost_in_run());
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
            // It spawns each server itself: attach flags would be silently ignored.
            let attach: Vec<String> = matches
                .subcommand_matches("compare")
                .map(given_target_flags)
                .unwrap_or_default()
                .into_iter()
                .filter(|a| {
                    [
                        "--ws",
                        "--ingest",
                        "--token",
                        "--pid",
                        "--ca-cert",
                        "--admin",
                        "--spawn",
                    ]
                    .contains(&a.as_str())
                })
                .collect();
            if !attach.is_empty() {
                anyhow::bail!(
                    "compare spawns the relay, the baseline and the limit server itself; {} are for `run` and `plan`",
                    attach.join(", ")
                );
            }
            let judged = compare(&scenario, &target, rounds, &out)?;
            if fail_below_baseline && judged.ratios[plan::RATIOS[0]] < 1.0 {
                eprintln!("krux-loadtest: the relay delivered less than the baseline");
                std::process::exit(1);
            }
        }
        Command::Diff(args) => {
            let worse = diff::run(&args)?;
            if !worse.is_empty() {
                eprintln!(
                    "krux-loadtest: B is worse than A by more than {}%: {}",
                    args.fail_above.unwrap_or(0.0),
                    worse.join("; ")
                );
                std::process::exit(plan::THRESHOLD_FAILED);
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

/// Runs relay, baseline and limit alternately; prints medians and ratios. Returns the
/// relay's median round (by deliveries/s) with the ratios, and with loss, duplicates and
/// closes summed over all the relay's rounds: what a plan's thresholds judge.
fn compare(
    sc: &Scenario,
    args: &TargetArgs,
    rounds: usize,
    out: &std::path::Path,
) -> anyhow::Result<Report> {
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
                "lost": all[k].iter().map(Report::lost_in_run).sum::<u64>(),
            })
        })
        .collect();
    let d = |k: usize| med(k, |r| r.deliveries_per_s);
    let e = |k: usize| med(k, |r| r.deliveries_per_server_cpu_s);
    let ratios: std::collections::BTreeMap<String, f64> = plan::RATIOS
        .iter()
        .map(|r| r.to_string())
        .zip([
            d(0) / d(1).max(1e-9),
            d(0) / d(2).max(1e-9),
            e(0) / e(1).max(1e-9),
        ])
        .collect();
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
        ratios[plan::RATIOS[0]],
        ratios[plan::RATIOS[2]],
        100.0 * ratios[plan::RATIOS[1]]
    );
    println!("report: {}", out.join("compare.json").display());
    let relay = &all[0];
    let mut by_rate: Vec<&Report> = relay.iter().collect();
    by_rate.sort_by(|a, b| a.deliveries_per_s.total_cmp(&b.deliveries_per_s));
    let mut judged = by_rate[by_rate.len() / 2].clone();
    judged.lost = relay.iter().map(|r| r.lost).sum();
    judged.warmup_lost = relay.iter().map(|r| r.warmup_lost).sum();
    judged.duplicates = relay.iter().map(|r| r.duplicates).sum();
    judged.closes_by_code = relay.iter().fold(Default::default(), |mut all, r| {
        for (code, n) in r.closes_in_run() {
            *all.entry(code).or_default() += n;
        }
        all
    });
    judged.warmup_closes_by_code.clear(); // counted in the line above
    judged.ratios = ratios;
    Ok(judged)
}

/// The target flags given on the command line, as flags again (they win over the plan's).
fn given_target_flags(m: &clap::ArgMatches) -> Vec<String> {
    use clap::parser::ValueSource;
    let cmd = plan::TargetFlags::command();
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        if m.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        if arg.get_action().takes_values() {
            for v in m.get_raw(id).into_iter().flatten() {
                out.extend([format!("--{long}"), v.to_string_lossy().into_owned()]);
            }
        } else if m.get_flag(id) {
            out.push(format!("--{long}"));
        }
    }
    out
}

/// Runs every scenario of the plan at `file`; writes a report per scenario and
/// `plan.json`; returns whether every threshold held.
fn run_plan(
    file: &std::path::Path,
    given: &[String],
    out: &std::path::Path,
    rounds: Option<usize>,
) -> anyhow::Result<bool> {
    let plan = plan::Plan::load(file)?;
    // Attaching on the command line (--ws without --spawn) replaces every spawn of the plan.
    let attach = given.iter().any(|a| a == "--ws") && !given.iter().any(|a| a == "--spawn");
    let target_args = |own: &[String]| -> anyhow::Result<TargetArgs> {
        let mut argv: Vec<String> = plan.target_args.iter().chain(own).cloned().collect();
        while let Some(i) = argv.iter().position(|a| attach && a == "--spawn") {
            argv.drain(i..(i + 2).min(argv.len()));
        }
        argv.extend_from_slice(given);
        Ok(plan::TargetFlags::try_parse_from(&argv)
            .map_err(|e| anyhow::anyhow!("target: {e}"))?
            .target)
    };
    let out = plan::fresh_dir(out);
    std::fs::create_dir_all(&out)?;
    // The plan's own target, opened (or spawned) when a scenario first needs it.
    let mut shared_target: Option<Target> = None;
    let mut results = Vec::new();
    let mut passed = true;
    for s in &plan.scenarios {
        println!("scenario `{}`", s.name);
        let args = target_args(&s.target_args)?;
        let report = match s.compare {
            Some(_) if attach => {
                println!("  skipped: `compare` spawns the relay, the baseline and the limit server itself, and this plan runs attached");
                results.push(serde_json::json!({ "name": s.name, "skipped": "compare runs spawned servers; the plan ran attached" }));
                continue;
            }
            Some(planned) => {
                let rounds = rounds.unwrap_or(planned);
                compare(&s.scenario, &args, rounds, &out.join(&s.name))?
            }
            None if s.target_args.is_empty() => {
                if shared_target.is_none() {
                    shared_target = Some(Target::open(&args, None)?);
                }
                run_once(&s.scenario, shared_target.as_ref().expect("opened above"))?
            }
            None => run_once(&s.scenario, &Target::open(&args, None)?)?,
        };
        println!("{}", report.summary());
        report.write(&out, &s.name)?;
        let mut verdicts = Vec::new();
        for th in &s.thresholds {
            let (ok, seen) = th.judge(&report);
            passed &= ok;
            let shown = seen.map_or("not measured".to_string(), |v| format!("{v}"));
            println!(
                "  {} {}: {shown}",
                if ok { "ok  " } else { "FAIL" },
                th.text
            );
            verdicts.push(serde_json::json!({
                "threshold": th.text, "value": seen, "ok": ok,
            }));
        }
        results.push(serde_json::json!({
            "name": s.name,
            "report": format!("{}.json", s.name),
            "target": report.target_info,
            "thresholds": verdicts,
            "interrupted": report.interrupted,
        }));
        if report.interrupted {
            break; // Ctrl-C: no further scenario
        }
    }
    let interrupted = run::interrupted();
    let target = shared_target.as_ref().map(|t| {
        serde_json::json!({ "kind": t.kind, "ws": t.ws.to_string(), "ingest": t.ingest.to_string(), "tls": t.tls.is_some() })
    });
    let summary = serde_json::json!({
        "plan_file": file.display().to_string(),
        "plan": plan.text,
        "target": target,
        "scenarios": results,
        "passed": passed,
        "interrupted": interrupted,
    });
    std::fs::write(out.join("plan.json"), serde_json::to_vec_pretty(&summary)?)?;
    println!(
        "plan {}: {}; report: {}",
        file.display(),
        if passed {
            "every threshold held"
        } else {
            "a threshold failed"
        },
        out.join("plan.json").display()
    );
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--help` explains every flag of every command.
    #[test]
    fn every_flag_and_command_has_help() {
        let cmd = Cli::command();
        let mut missing = Vec::new();
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_string());
            }
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if !matches!(id, "help" | "version") && arg.get_help().is_none() {
                    missing.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "no help: {missing:?}");
    }
}
