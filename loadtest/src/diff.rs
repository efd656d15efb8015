//! `diff A.json B.json`: two run reports side by side (before/after, plain/TLS), with the
//! ratio B/A of each figure; `--fail-above PCT` fails when B is worse than A by more than
//! that on a figure where worse has a direction.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::report::Report;

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The reference report (a run's or a plan scenario's JSON).
    pub a: PathBuf,
    /// The report compared with it.
    pub b: PathBuf,
    /// Exit 99 when B is worse than A by more than this many percent on deliveries/s,
    /// events/s, deliveries per server CPU-second, p99 latency, or loss appears.
    #[arg(long)]
    pub fail_above: Option<f64>,
}

/// Which way is better for a figure.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    /// Shown, not judged.
    Neither,
}

fn figures(r: &Report) -> Vec<(&'static str, f64, Better)> {
    use Better::*;
    let mut f = vec![
        ("deliveries/s", r.deliveries_per_s, Higher),
        ("events/s in", r.events_in_per_s, Higher),
        ("latency p50 ms", r.latency_p50_us as f64 / 1000.0, Neither),
        ("latency p99 ms", r.latency_p99_us as f64 / 1000.0, Lower),
        ("latency max ms", r.latency_max_us as f64 / 1000.0, Neither),
        ("lost", r.lost as f64, Lower),
        ("duplicates", r.duplicates as f64, Lower),
        ("subscribers", r.subscribers_connected as f64, Neither),
    ];
    if r.server_measured {
        f.extend([
            ("server CPU %", r.server_cpu_pct, Neither),
            (
                "deliveries per server CPU-s",
                r.deliveries_per_server_cpu_s,
                Higher,
            ),
            (
                "server RSS MiB",
                r.server_rss_bytes as f64 / 1048576.0,
                Neither,
            ),
        ]);
    }
    f
}

fn load(p: &PathBuf) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a krux-loadtest run report", p.display()))
}

/// Prints the comparison; returns the regressions beyond `--fail-above`.
pub fn run(args: &DiffArgs) -> anyhow::Result<Vec<String>> {
    let (a, b) = (load(&args.a)?, load(&args.b)?);
    println!("{:<30} {:>16} {:>16} {:>9}", "", "A", "B", "B/A");
    let fb = figures(&b);
    let mut worse = Vec::new();
    for (name, va, better) in figures(&a) {
        let Some(&(_, vb, _)) = fb.iter().find(|(n, _, _)| *n == name) else {
            continue;
        };
        let ratio = if va == 0.0 { f64::NAN } else { vb / va };
        let shown = if ratio.is_nan() {
            "-".to_string()
        } else {
            format!("{ratio:.2}x")
        };
        println!("{name:<30} {va:>16.2} {vb:>16.2} {shown:>9}");
        if let Some(pct) = args.fail_above {
            let limit = pct / 100.0;
            let regressed = match better {
                Better::Higher => vb < va * (1.0 - limit),
                Better::Lower if va == 0.0 => vb > 0.0,
                Better::Lower => vb > va * (1.0 + limit),
                Better::Neither => false,
            };
            if regressed {
                worse.push(format!("{name}: {va:.2} -> {vb:.2}"));
            }
        }
    }
    Ok(worse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worse_beyond_the_margin_is_a_regression_and_noise_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, r: &Report| {
            let p = dir.path().join(name);
            std::fs::write(&p, serde_json::to_vec(r).unwrap()).unwrap();
            p
        };
        let a = Report {
            deliveries_per_s: 1000.0,
            latency_p99_us: 2000,
            ..Report::default()
        };
        let mut b = a.clone();
        b.deliveries_per_s = 960.0; // -4%
        let args = |b| DiffArgs {
            a: write("a.json", &a),
            b,
            fail_above: Some(5.0),
        };
        assert!(run(&args(write("b.json", &b))).unwrap().is_empty());
        b.deliveries_per_s = 900.0; // -10%
        b.lost = 3;
        let worse = run(&args(write("c.json", &b))).unwrap();
        assert_eq!(worse.len(), 2, "{worse:?}");
        assert!(worse[0].starts_with("deliveries/s"), "{worse:?}");
    }
}
