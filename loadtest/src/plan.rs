//! `plan FILE.toml`: scenarios run in sequence, each judged by its thresholds. A
//! scenario's keys are `run`'s flag names (`event_size` or `event-size`), so what works as
//! a flag works in a plan; `[target]` takes the attach and spawn flags, a scenario may
//! override them (`spawn = "baseline"`, `threads = 1`), and the same flags on the command
//! line win over both. `compare = N` runs a scenario as `compare` does: N rounds of the
//! relay, the baseline and the limit server, judged on the relay's median round and the
//! ratios (`relay_over_baseline_deliveries >= 1`).
//!
//! ```toml
//! [target]
//! spawn = "relay"
//!
//! [[scenario]]
//! name = "fanout"
//! subscribers = 300
//! rate = "max"
//! duration = "5s"
//! thresholds = ["loss == 0", "latency_p99_ms < 500"]
//! ```
//!
//! Exit codes as k6's: 0 when every threshold holds, 99 when one fails, 1 when the plan
//! could not be run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser};

use crate::report::Report;
use crate::scenario::Scenario;
use crate::target::TargetArgs;

/// Exit code of a plan a threshold of which failed.
pub const THRESHOLD_FAILED: i32 = 99;

/// A threshold: `metric op value`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Threshold {
    pub text: String,
    pub metric: String,
    pub op: String,
    pub value: f64,
}

impl Threshold {
    pub fn parse(text: &str) -> anyhow::Result<Threshold> {
        let t = text.trim();
        let op = ["<=", ">=", "==", "<", ">"]
            .into_iter()
            .find(|op| t.contains(op))
            .with_context(|| format!("threshold `{t}`: no operator (<, <=, ==, >=, >)"))?;
        let (metric, value) = t.split_once(op).expect("found above");
        let metric = metric.trim().to_string();
        if metric_names().iter().all(|m| *m != metric) && !metric.starts_with("closes_") {
            bail!(
                "threshold `{t}`: unknown metric `{metric}` (known: {}, closes_CODE)",
                metric_names().join(", ")
            );
        }
        let value: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("threshold `{t}`: `{}` is not a number", value.trim()))?;
        Ok(Threshold {
            text: t.to_string(),
            metric,
            op: op.to_string(),
            value,
        })
    }

    /// The verdict on `report`, and the value observed (`None`: not measured, which fails).
    pub fn judge(&self, report: &Report) -> (bool, Option<f64>) {
        let Some(seen) = metric(report, &self.metric) else {
            return (false, None);
        };
        let ok = match self.op.as_str() {
            "<" => seen < self.value,
            "<=" => seen <= self.value,
            "==" => seen == self.value,
            ">=" => seen >= self.value,
            _ => seen > self.value,
        };
        (ok, Some(seen))
    }
}

/// Ratios of a `compare` scenario, relay over the others' medians.
pub const RATIOS: [&str; 3] = [
    "relay_over_baseline_deliveries",
    "relay_over_limit_deliveries",
    "relay_over_baseline_deliveries_per_cpu_s",
];

fn metric_names() -> [&'static str; 20] {
    [
        RATIOS[0],
        RATIOS[1],
        RATIOS[2],
        "loss",
        "duplicates",
        "events_per_s",
        "deliveries_per_s",
        "bytes_per_delivery",
        "latency_p50_ms",
        "latency_p99_ms",
        "latency_max_ms",
        "handshake_p99_ms",
        "closes",
        "reconnects",
        "reconnect_max_ms",
        "tls_full_handshakes",
        "tls_resumed_handshakes",
        "server_cpu_pct",
        "deliveries_per_server_cpu_s",
        "server_rss_mib",
    ]
}

/// A metric of a report, in the threshold's units; `None` when it was not measured.
fn metric(r: &Report, name: &str) -> Option<f64> {
    let ms = |us: u64| us as f64 / 1000.0;
    let server = |v: f64| r.server_measured.then_some(v);
    Some(match name {
        "loss" => (!r.loss_unknown).then_some(r.lost_in_run() as f64)?,
        "duplicates" => r.duplicates as f64,
        "events_per_s" => r.events_in_per_s,
        "deliveries_per_s" => r.deliveries_per_s,
        "bytes_per_delivery" => r.wire_bytes_per_delivery,
        "latency_p50_ms" => ms(r.latency_p50_us),
        "latency_p99_ms" => ms(r.latency_p99_us),
        "latency_max_ms" => ms(r.latency_max_us),
        "handshake_p99_ms" => ms(r.handshake_p99_us),
        "closes" => r.closes_in_run().values().sum::<u64>() as f64,
        "reconnects" => r.reconnects as f64,
        "reconnect_max_ms" => ms(r.reconnect_max_us),
        "tls_full_handshakes" => r.tls_full_handshakes as f64,
        "tls_resumed_handshakes" => r.tls_resumed_handshakes as f64,
        "server_cpu_pct" => server(r.server_cpu_pct)?,
        "deliveries_per_server_cpu_s" => server(r.deliveries_per_server_cpu_s)?,
        "server_rss_mib" => server(r.server_rss_bytes as f64 / 1048576.0)?,
        ratio if RATIOS.contains(&ratio) => *r.ratios.get(ratio)?,
        other => {
            let code: u16 = other.strip_prefix("closes_")?.parse().ok()?;
            r.closes_in_run().get(&code).copied().unwrap_or(0) as f64
        }
    })
}

/// One scenario of a plan, parsed.
pub struct PlannedScenario {
    pub name: String,
    pub scenario: Scenario,
    pub thresholds: Vec<Threshold>,
    /// Target flags of its own, over the plan's `[target]`.
    pub target_args: Vec<String>,
    /// Run as `compare`, with this many rounds.
    pub compare: Option<usize>,
}

/// A plan file, parsed: the target's flags and the scenarios.
pub struct Plan {
    pub text: String,
    pub target_args: Vec<String>,
    pub scenarios: Vec<PlannedScenario>,
}

#[derive(Parser)]
#[command(no_binary_name = true, args_override_self = true)]
struct ScenarioFlags {
    #[command(flatten)]
    scenario: Scenario,
}

#[derive(Parser)]
#[command(no_binary_name = true, args_override_self = true)]
pub struct TargetFlags {
    #[command(flatten)]
    pub target: TargetArgs,
}

/// A TOML table as the flags it stands for (`key = v` → `--key v`, `true` → `--key`, a
/// list → the flag once per item).
fn flags(table: &toml::Table, skip: &[&str], what: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for (key, value) in table {
        if skip.contains(&key.as_str()) {
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        match value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => out.extend([flag, s.clone()]),
            toml::Value::Integer(i) => out.extend([flag, i.to_string()]),
            toml::Value::Float(f) => out.extend([flag, f.to_string()]),
            toml::Value::Array(items) => {
                for item in items {
                    let v = match item {
                        toml::Value::String(s) => s.clone(),
                        toml::Value::Integer(i) => i.to_string(),
                        other => bail!(
                            "{what}: the items of `{key}` are strings or numbers, not {}",
                            other.type_str()
                        ),
                    };
                    out.extend([flag.clone(), v]);
                }
            }
            other => bail!(
                "{what}: `{key}` must be a string, number, boolean or list, not {}",
                other.type_str()
            ),
        }
    }
    Ok(out)
}

impl Plan {
    pub fn load(path: &Path) -> anyhow::Result<Plan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the plan {}", path.display()))?;
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
        for key in doc.keys() {
            if key != "target" && key != "scenario" {
                bail!(
                    "{}: unknown section `{key}` (a plan has [target] and [[scenario]])",
                    path.display()
                );
            }
        }
        let target_args = match doc.get("target") {
            Some(toml::Value::Table(t)) => flags(t, &[], "[target]")?,
            Some(_) => bail!("{}: `target` must be a table", path.display()),
            None => Vec::new(),
        };
        // Checked now, so that a typo fails before anything runs.
        TargetFlags::try_parse_from(&target_args)
            .map_err(|e| anyhow::anyhow!("{}: [target]: {}", path.display(), first_line(&e)))?;
        let Some(toml::Value::Array(list)) = doc.get("scenario") else {
            bail!("{}: no [[scenario]]", path.display());
        };
        let mut scenarios = Vec::new();
        for (i, s) in list.iter().enumerate() {
            let t = s.as_table().with_context(|| {
                format!("{}: scenario {} is not a table", path.display(), i + 1)
            })?;
            let name = match t.get("name") {
                Some(toml::Value::String(n)) if !n.is_empty() => n.clone(),
                _ => format!("scenario-{}", i + 1),
            };
            let what = format!("{}: scenario `{name}`", path.display());
            if scenarios.iter().any(|p: &PlannedScenario| p.name == name) {
                bail!("{what}: two scenarios share this name");
            }
            // Target flags (`spawn`, `threads`, …) go with the target, the rest to `run`.
            let target_keys: Vec<String> = TargetFlags::command()
                .get_arguments()
                .filter_map(|a| a.get_long())
                .map(|l| l.replace('-', "_"))
                .collect();
            let (own_target, rest): (toml::Table, toml::Table) = t
                .clone()
                .into_iter()
                .partition(|(k, _)| target_keys.contains(&k.replace('-', "_")));
            let target_args = flags(&own_target, &[], &what)?;
            TargetFlags::try_parse_from(&target_args)
                .map_err(|e| anyhow::anyhow!("{what}: {}", first_line(&e)))?;
            let compare = match rest.get("compare") {
                None => None,
                Some(toml::Value::Integer(n)) if *n >= 1 => Some(*n as usize),
                Some(_) => bail!("{what}: `compare` is a number of rounds (1 or more)"),
            };
            let args = flags(&rest, &["name", "thresholds", "compare"], &what)?;
            let scenario = ScenarioFlags::try_parse_from(&args)
                .map_err(|e| anyhow::anyhow!("{what}: {}", first_line(&e)))?
                .scenario;
            let thresholds = match t.get("thresholds") {
                None => Vec::new(),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        let s = v.as_str().with_context(|| {
                            format!("{what}: thresholds are strings like \"loss == 0\"")
                        })?;
                        Threshold::parse(s).with_context(|| what.clone())
                    })
                    .collect::<anyhow::Result<_>>()?,
                Some(_) => bail!("{what}: `thresholds` is a list of strings"),
            };
            scenarios.push(PlannedScenario {
                name,
                scenario,
                thresholds,
                target_args,
                compare,
            });
        }
        Ok(Plan {
            text,
            target_args,
            scenarios,
        })
    }
}

/// clap's error without its usage lines.
fn first_line(e: &clap::Error) -> String {
    e.to_string()
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ")
        .to_string()
}

/// Where a plan's reports go: `out`, or, if it already holds a plan's report, the first
/// free `out-N` (a new run never overwrites an old one).
pub fn fresh_dir(out: &Path) -> PathBuf {
    if !out.join("plan.json").exists() {
        return out.to_path_buf();
    }
    (2..)
        .map(|n| PathBuf::from(format!("{}-{n}", out.display())))
        .find(|d| !d.join("plan.json").exists())
        .expect("a free name")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        let mut r = Report {
            lost: 3,
            latency_p99_us: 1500,
            deliveries_per_s: 1e6,
            ..Report::default()
        };
        r.closes_by_code.insert(4001, 2);
        r
    }

    #[test]
    fn thresholds_parse_and_judge() {
        let r = report();
        for (text, ok, seen) in [
            ("loss == 0", false, Some(3.0)),
            ("loss <= 3", true, Some(3.0)),
            ("latency_p99_ms < 2", true, Some(1.5)),
            ("deliveries_per_s >= 1000000", true, Some(1e6)),
            ("closes_4001 > 1", true, Some(2.0)),
            ("closes_1006 == 0", true, Some(0.0)),
            ("closes == 2", true, Some(2.0)),
            ("server_cpu_pct < 90", false, None), // not measured: fails
        ] {
            let t = Threshold::parse(text).unwrap();
            assert_eq!(t.judge(&r), (ok, seen), "{text}");
        }
        for bad in ["loss", "lost == 0", "loss == many", "latency_p99_ms ~ 3"] {
            assert!(Threshold::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plan_reads_run_flags_and_refuses_what_run_would() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[target]\nspawn = \"relay\"\n\n[[scenario]]\nname = \"fanout\"\nsubscribers = 30\nevent_size = 200\nrate = \"max\"\nduration = \"2s\"\nstorm = true\nthresholds = [\"loss == 0\"]\n\n[[scenario]]\nrate = 100\n",
        )
        .unwrap();
        let plan = Plan::load(&file).unwrap();
        assert_eq!(plan.target_args, ["--spawn", "relay"]);
        let s = &plan.scenarios[0];
        assert_eq!((s.name.as_str(), s.scenario.subscribers), ("fanout", 30));
        assert_eq!(s.scenario.event_size, 200);
        assert!(s.scenario.storm);
        assert_eq!(s.thresholds.len(), 1);
        assert_eq!(plan.scenarios[1].name, "scenario-2");
        assert_eq!(plan.scenarios[1].scenario.rate, "100");
        assert_eq!((s.compare, s.target_args.len()), (None, 0));
        // A scenario's own target flags, `compare` rounds and stages as a list.
        std::fs::write(
            &file,
            "[[scenario]]\nspawn = \"baseline\"\nthreads = 1\ncompare = 2\nstages = [\"1s:10\", \"2s:20:max\"]\nthresholds = [\"relay_over_baseline_deliveries >= 1\"]\n",
        )
        .unwrap();
        let plan = Plan::load(&file).unwrap();
        let s = &plan.scenarios[0];
        assert_eq!(s.target_args, ["--spawn", "baseline", "--threads", "1"]);
        assert_eq!(s.compare, Some(2));
        assert_eq!(s.scenario.stages.len(), 2);
        for (text, says) in [
            ("[[scenario]]\nsubscriberz = 3\n", "subscriberz"),
            (
                "[[scenario]]\nthresholds = [\"lost == 0\"]\n",
                "unknown metric `lost`",
            ),
            ("[target]\nspawn = \"nginx\"\n[[scenario]]\n", "nginx"),
            ("[scenarios]\n", "unknown section"),
            ("[[scenario]]\ncompare = 0\n", "number of rounds"),
            ("[[scenario]]\nstages = [\"1s\"]\n", "DURATION:SUBSCRIBERS"),
            ("[[scenario]]\nspawn = \"nginx\"\n", "nginx"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = format!("{:#}", Plan::load(&file).err().unwrap());
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
