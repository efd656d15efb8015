//! A run's results: the JSON report, the one-screen summary, and the SVG plot
//! (deliveries/s and p99 over time, latency CDF).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Point {
    pub t_s: f64,
    pub deliveries_per_s: f64,
    pub p99_us: u64,
    /// What happened in that second: `storm`, `churn N`, `N closed by the server`,
    /// `stage N: …`.
    #[serde(default)]
    pub marks: Vec<String>,
    /// Subscribers connected (or connecting) at its end, and events published in it.
    #[serde(default)]
    pub subscribers: usize,
    #[serde(default)]
    pub events_per_s: f64,
}

/// Deliveries for one group of subscribers.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Split {
    pub subscribers: usize,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub target: String,
    /// Addresses, TLS, and the relay's version when its admin port answered.
    #[serde(default)]
    pub target_info: crate::target::TargetInfo,
    pub scenario: serde_json::Value,
    pub subscribers_connected: usize,
    pub handshakes_per_s: f64,
    pub handshake_p50_us: u64,
    pub handshake_p99_us: u64,
    pub events_in_per_s: f64,
    pub deliveries_per_s: f64,
    /// Bytes subscribers read per delivery in the window (frames as sent: compressed
    /// with --compression; TLS records not counted).
    #[serde(default)]
    pub wire_bytes_per_delivery: f64,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    /// Expected minus received, over every subscriber (one the server closed included),
    /// for the events published in the measured window.
    pub lost: u64,
    /// Deliveries owed for events published in the warm-up and not received by the quiet
    /// point that starts the window (a subscriber closed in the warm-up, say).
    #[serde(default)]
    pub warmup_lost: u64,
    /// A stage run's observer missed events: the loss of subscribers that joined or left
    /// is not known (a `loss` threshold fails as unmeasured).
    #[serde(default)]
    pub loss_unknown: bool,
    /// The same per filter class (`all`, `type`, `agent`, `session`)…
    #[serde(default)]
    pub by_filter: BTreeMap<String, Split>,
    /// …and for subscribers that reconnected (`churning`: churn, storm) and the rest
    /// (`healthy`).
    #[serde(default)]
    pub by_health: BTreeMap<String, Split>,
    pub rejected_events: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_p999_us: u64,
    pub latency_max_us: u64,
    pub latency_samples: u64,
    /// Closes in the measured window (and the drain after it), by code…
    pub closes_by_code: BTreeMap<u16, u64>,
    /// …and those before it, in the warm-up.
    #[serde(default)]
    pub warmup_closes_by_code: BTreeMap<u16, u64>,
    /// Churn and storm runs: reconnects made (each resuming with `since`), frames seen
    /// twice, and the reconnect handshake's p99.
    pub reconnects: u64,
    /// How the server ended each `--stalled` subscriber (close code; 0: no close frame).
    pub stalled_closes: BTreeMap<u16, u64>,
    pub duplicates: u64,
    pub reconnect_p99_us: u64,
    /// The slowest reconnect: in a storm, about how long until every subscriber was back.
    #[serde(default)]
    pub reconnect_max_us: u64,
    /// TLS handshakes made in full and resumed with a ticket (connects and reconnects).
    #[serde(default)]
    pub tls_full_handshakes: u64,
    #[serde(default)]
    pub tls_resumed_handshakes: u64,
    /// Server CPU over the measured interval: seconds and share of one core.
    /// Ended early by Ctrl-C: the figures cover the window until then.
    #[serde(default)]
    pub interrupted: bool,
    /// Whether the server's CPU and RSS were measured (spawned, or attached with --pid).
    #[serde(default)]
    pub server_measured: bool,
    pub server_cpu_s: f64,
    pub server_cpu_pct: f64,
    pub client_cpu_pct: f64,
    pub server_rss_bytes: u64,
    /// (RSS after connecting − RSS before) / subscribers; idle runs only.
    pub rss_per_connection_bytes: Option<f64>,
    pub deliveries_per_server_cpu_s: f64,
    pub measured_s: f64,
    pub timeline: Vec<Point>,
    /// Latency CDF: (microseconds, fraction of samples at or below).
    pub cdf: Vec<(u64, f64)>,
    /// A `compare` scenario's judged report (the relay's median round): the relay over
    /// the baseline's and limit server's medians (`plan::RATIOS`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ratios: BTreeMap<String, f64>,
}

impl Report {
    /// Loss over the whole run: in the window and in the warm-up. Thresholds judge this
    /// (an event lost while warming up is still lost).
    pub fn lost_in_run(&self) -> u64 {
        self.lost + self.warmup_lost
    }

    /// Closes over the whole run, by code.
    pub fn closes_in_run(&self) -> BTreeMap<u16, u64> {
        let mut all = self.closes_by_code.clone();
        for (code, n) in &self.warmup_closes_by_code {
            *all.entry(*code).or_default() += n;
        }
        all
    }

    /// When stages ramped subscribers above those connected before the window: the peak.
    fn peak_note(&self) -> String {
        let peak = self.timeline.iter().map(|p| p.subscribers).max();
        match peak.filter(|&p| p > self.subscribers_connected) {
            Some(p) => format!(" ({p} at the peak)"),
            None => String::new(),
        }
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{target}: {subs} subscribers{peak}, {ein:.0} events/s in, {dout:.0} deliveries/s out ({bytes:.0} B each), loss {lost} ({recv}/{exp})\n",
            target = self.target,
            subs = self.subscribers_connected,
            peak = self.peak_note(),
            ein = self.events_in_per_s,
            dout = self.deliveries_per_s,
            bytes = self.wire_bytes_per_delivery,
            lost = self.lost,
            recv = self.received_deliveries,
            exp = self.expected_deliveries,
        );
        s += &format!(
            "  latency p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs ({} samples)\n",
            self.latency_p50_us,
            self.latency_p99_us,
            self.latency_p999_us,
            self.latency_max_us,
            self.latency_samples
        );
        s += &match self.server_measured {
            true => format!(
                "  server CPU {:.0}% ({:.0} deliveries per CPU-second), client CPU {:.0}%, server RSS {:.1} MiB\n",
                self.server_cpu_pct,
                self.deliveries_per_server_cpu_s,
                self.client_cpu_pct,
                self.server_rss_bytes as f64 / 1048576.0
            ),
            false => format!(
                "  server CPU and RSS not measured (attach with --pid, or use --spawn), client CPU {:.0}%\n",
                self.client_cpu_pct
            ),
        };
        s += &format!(
            "  handshakes {:.0}/s (p50 {} µs, p99 {} µs); closes {:?}",
            self.handshakes_per_s,
            self.handshake_p50_us,
            self.handshake_p99_us,
            self.closes_by_code
        );
        if self.warmup_lost > 0 || !self.warmup_closes_by_code.is_empty() {
            s += &format!(
                "\n  in the warm-up: loss {}, closes {:?}",
                self.warmup_lost, self.warmup_closes_by_code
            );
        }
        if self.reconnects > 0 {
            s += &format!(
                "\n  reconnects with since: {} (p99 {} µs, slowest {} µs), duplicates {}",
                self.reconnects, self.reconnect_p99_us, self.reconnect_max_us, self.duplicates
            );
        }
        if self.tls_full_handshakes + self.tls_resumed_handshakes > 0 {
            s += &format!(
                "\n  TLS handshakes: {} full, {} resumed",
                self.tls_full_handshakes, self.tls_resumed_handshakes
            );
        }
        if !self.stalled_closes.is_empty() {
            s += &format!(
                "\n  stalled subscribers ended with: {:?}",
                self.stalled_closes
            );
        }
        if let Some(r) = self.rss_per_connection_bytes {
            s += &format!("\n  RSS per idle connection: {:.0} bytes", r);
        }
        s
    }

    pub fn write(&self, dir: &Path, stem: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{stem}.json"));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        if !self.timeline.is_empty() {
            self.plot(&dir.join(format!("{stem}.svg")))?;
            // The per-second timeline, for a spreadsheet.
            let head = "t_s,subscribers,events_per_s,deliveries_per_s,p99_us,marks\n";
            let csv: String = std::iter::once(head.to_string())
                .chain(self.timeline.iter().map(|p| {
                    format!(
                        "{:.3},{},{:.1},{:.1},{},{}\n",
                        p.t_s,
                        p.subscribers,
                        p.events_per_s,
                        p.deliveries_per_s,
                        p.p99_us,
                        p.marks.join("; ")
                    )
                }))
                .collect();
            std::fs::write(dir.join(format!("{stem}.csv")), csv)?;
            // One file to open or attach: the figures and the plots inline.
            let svg = std::fs::read_to_string(dir.join(format!("{stem}.svg")))?;
            std::fs::write(dir.join(format!("{stem}.html")), self.html(stem, &svg))?;
        }
        Ok(())
    }

    /// A self-contained HTML page: the summary's figures as a table, the plots inline.
    fn html(&self, stem: &str, svg: &str) -> String {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let info = &self.target_info;
        let split = |m: &BTreeMap<String, Split>| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k}: {} subscribers, loss {} ({}/{})",
                        v.subscribers, v.lost, v.received, v.expected
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let rows = [
            ("target", self.target.clone()),
            (
                "addresses",
                format!(
                    "{}{} (ingest {}{})",
                    if info.tls { "wss://" } else { "ws://" },
                    info.ws,
                    info.ingest,
                    info.admin
                        .as_ref()
                        .map(|a| format!(", admin {a}"))
                        .unwrap_or_default()
                ),
            ),
            (
                "relay version",
                info.relay_version
                    .clone()
                    .unwrap_or_else(|| "unknown (no admin port)".into()),
            ),
            ("by filter", split(&self.by_filter)),
            ("by subscriber", split(&self.by_health)),
            (
                "subscribers",
                format!("{}{}", self.subscribers_connected, self.peak_note()),
            ),
            ("events/s in", format!("{:.0}", self.events_in_per_s)),
            (
                "bytes per delivery",
                format!("{:.0}", self.wire_bytes_per_delivery),
            ),
            ("deliveries/s out", format!("{:.0}", self.deliveries_per_s)),
            (
                "loss",
                format!(
                    "{} ({} of {} deliveries received)",
                    self.lost, self.received_deliveries, self.expected_deliveries
                ),
            ),
            ("duplicates", self.duplicates.to_string()),
            (
                "latency p50 / p99 / p99.9 / max",
                format!(
                    "{} / {} / {} / {} ms",
                    short(self.latency_p50_us as f64 / 1000.0),
                    short(self.latency_p99_us as f64 / 1000.0),
                    short(self.latency_p999_us as f64 / 1000.0),
                    short(self.latency_max_us as f64 / 1000.0)
                ),
            ),
            (
                "server",
                match self.server_measured {
                    true => format!(
                        "CPU {:.0}%, {} deliveries per CPU-second, RSS {:.1} MiB",
                        self.server_cpu_pct,
                        si(self.deliveries_per_server_cpu_s),
                        self.server_rss_bytes as f64 / 1048576.0
                    ),
                    false => "not measured (attach with --pid)".into(),
                },
            ),
            ("closes by code", format!("{:?}", self.closes_by_code)),
            (
                "in the warm-up",
                format!(
                    "loss {}, closes by code {:?}",
                    self.warmup_lost, self.warmup_closes_by_code
                ),
            ),
            ("reconnects with since", self.reconnects.to_string()),
            (
                "slowest reconnect",
                format!("{:.1} ms", self.reconnect_max_us as f64 / 1000.0),
            ),
            (
                "TLS handshakes (full / resumed)",
                format!(
                    "{} / {}",
                    self.tls_full_handshakes, self.tls_resumed_handshakes
                ),
            ),
            (
                "measured",
                format!(
                    "{:.1} s{}",
                    self.measured_s,
                    if self.interrupted {
                        " (interrupted)"
                    } else {
                        ""
                    }
                ),
            ),
        ];
        let table: String = rows
            .iter()
            .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>\n", esc(k), esc(v)))
            .collect();
        format!(
            "<!doctype html>\n<meta charset=\"utf-8\">\n<title>krux-loadtest: {title}</title>\n\
             <style>body{{font:14px sans-serif;margin:24px}}th{{text-align:left;padding-right:16px}}\
             td,th{{padding:3px 0}}pre{{background:#f4f4f4;padding:8px}}</style>\n\
             <h1>krux-loadtest: {title}</h1>\n<table>\n{table}</table>\n{svg}\n\
             <h2>scenario</h2>\n<pre>{scenario}</pre>\n",
            title = esc(stem),
            scenario = esc(&serde_json::to_string_pretty(&self.scenario).unwrap_or_default()),
        )
    }

    /// A grey line with its label at each second where a storm, churn or closes happened.
    fn draw_marks<DB: DrawingBackend>(
        &self,
        c: &mut ChartContext<
            '_,
            DB,
            Cartesian2d<
                plotters::coord::types::RangedCoordf64,
                plotters::coord::types::RangedCoordf64,
            >,
        >,
        y_max: f64,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let marked = || self.timeline.iter().filter(|p| !p.marks.is_empty());
        c.draw_series(
            marked().map(|p| PathElement::new(vec![(p.t_s, 0.0), (p.t_s, y_max)], BLACK.mix(0.35))),
        )?;
        c.draw_series(marked().map(|p| {
            Text::new(
                p.marks.join(", "),
                (p.t_s, y_max * 0.97),
                ("sans-serif", 12).into_font().color(&BLACK.mix(0.7)),
            )
        }))?;
        Ok(())
    }

    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((3, 1));
        let t_max = self.timeline.last().map_or(1.0, |p| p.t_s).max(1.0);

        let d_max = self
            .timeline
            .iter()
            .map(|p| p.deliveries_per_s)
            .fold(1.0, f64::max)
            * 1.1;
        let mut c = ChartBuilder::on(&panels[0])
            .caption(
                format!("{}: deliveries per second", self.target),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..t_max, 0.0..d_max)?;
        c.configure_mesh()
            .x_desc("seconds into the measured window")
            .y_desc("deliveries/s")
            .x_label_formatter(&|t| short(*t))
            .y_label_formatter(&|v| si(*v))
            .draw()?;
        c.draw_series(LineSeries::new(
            self.timeline.iter().map(|p| (p.t_s, p.deliveries_per_s)),
            &BLUE,
        ))?;
        self.draw_marks(&mut c, d_max)?;

        let ms = |us: u64| us as f64 / 1000.0;
        let l_max = ms(self
            .timeline
            .iter()
            .map(|p| p.p99_us)
            .max()
            .unwrap_or(1)
            .max(1))
            * 1.1;
        let mut c = ChartBuilder::on(&panels[1])
            .caption(
                "p99 latency, publish to receipt, per second",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..t_max, 0.0..l_max)?;
        c.configure_mesh()
            .x_desc("seconds into the measured window")
            .y_desc("ms")
            .x_label_formatter(&|t| short(*t))
            .y_label_formatter(&|v| short(*v))
            .draw()?;
        c.draw_series(LineSeries::new(
            self.timeline.iter().map(|p| (p.t_s, ms(p.p99_us))),
            &RED,
        ))?;
        self.draw_marks(&mut c, l_max)?;

        // The distribution with its tail spread out: x is the number of nines of the
        // percentile (0 = 0%, 1 = 90%, 2 = 99%, 3 = 99.9%…), y the latency.
        let nines = |q: f64| -(1.0 - q.min(0.99999)).log10();
        let y_max = ms(self.cdf.last().map_or(1, |p| p.0).max(1)) * 1.1;
        let mut c = ChartBuilder::on(&panels[2])
            .caption(
                "latency by percentile (the tail spread out)",
                ("sans-serif", 18),
            )
            .margin(10)
            .margin_right(40)
            .x_label_area_size(35)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..5.0, 0.0..y_max)?;
        c.configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .x_labels(6)
            .x_label_formatter(&|x: &f64| {
                let pct = 100.0 * (1.0 - 10f64.powf(-*x));
                match x.round() as i32 {
                    0 => "0%".into(),
                    n if (1..=2).contains(&n) => format!("{pct:.0}%"),
                    n => format!("{pct:.prec$}%", prec = (n - 2) as usize),
                }
            })
            .y_label_formatter(&|v| short(*v))
            .draw()?;
        c.draw_series(LineSeries::new(
            self.cdf.iter().map(|&(us, q)| (nines(q), ms(us))),
            &BLACK,
        ))?;
        root.present()?;
        Ok(())
    }
}

/// Median of a set of values (the middle one; mean of the two middle ones).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// 1234567 as `1.23M`, 800000 as `800k`: axis ticks a reader takes in at a glance.
fn si(v: f64) -> String {
    let (d, unit) = match v.abs() {
        a if a >= 1e9 => (1e9, "G"),
        a if a >= 1e6 => (1e6, "M"),
        a if a >= 1e3 => (1e3, "k"),
        _ => (1.0, ""),
    };
    format!("{}{unit}", short(v / d))
}

/// A number without trailing zeros: `800`, `2.5`, `0.75`.
fn short(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn writes_json_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let r = Report {
            target: "relay".into(),
            timeline: vec![
                Point {
                    t_s: 1.0,
                    deliveries_per_s: 10.0,
                    p99_us: 50,
                    subscribers: 10,
                    events_per_s: 1.0,
                    ..Point::default()
                },
                Point {
                    t_s: 2.0,
                    deliveries_per_s: 12.0,
                    p99_us: 40,
                    marks: vec!["storm".into(), "3 closed by the server".into()],
                    subscribers: 12,
                    events_per_s: 1.0,
                },
            ],
            cdf: vec![(10, 0.5), (50, 0.99), (80, 1.0)],
            ..Report::default()
        };
        r.write(dir.path(), "run").unwrap();
        let svg = std::fs::read_to_string(dir.path().join("run.svg")).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("latency by percentile"),
            "{svg}"
        );
        for label in [
            "deliveries/s",
            "99.9%",
            "seconds into the measured window",
            "storm, 3 closed by the server",
        ] {
            assert!(svg.contains(label), "no {label}");
        }
        let html = std::fs::read_to_string(dir.path().join("run.html")).unwrap();
        assert!(
            html.contains("<svg") && html.contains("deliveries/s out"),
            "{html}"
        );
        let csv = std::fs::read_to_string(dir.path().join("run.csv")).unwrap();
        assert_eq!(
            csv,
            "t_s,subscribers,events_per_s,deliveries_per_s,p99_us,marks\n1.000,10,1.0,10.0,50,\n2.000,12,1.0,12.0,40,storm; 3 closed by the server\n"
        );
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("run.json")).unwrap()).unwrap();
        assert_eq!(back.timeline.len(), 2);
    }

    #[test]
    fn axis_numbers_read_at_a_glance() {
        assert_eq!(si(800_000.0), "800k");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(250.0), "250");
        assert_eq!(short(2.5), "2.5");
        assert_eq!(short(3.0), "3");
    }
}
