//! `ingest`: publisher throughput end to end — TCP bytes in, validated, sequenced,
//! framed, in the ring — with no subscribers, against the relay and the baseline in one
//! run. Reports accepted events per second, per server CPU-second (all its threads, user
//! and system, from /proc), and the server's RSS before and after.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use crate::target::{proc_sample, Kind, Target, TargetArgs};

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Servers to spawn and measure in turn (ignored when attaching to a running one).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "relay,baseline"
    )]
    pub against: Vec<Kind>,
    /// Events in all, split evenly over the publishers.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Publisher connections, each sending as fast as the server reads.
    #[arg(long, default_value_t = 1)]
    pub publishers: u64,
    /// Bytes per line (a capability_invoked event padded to this size).
    #[arg(long, default_value_t = 300)]
    pub line_size: usize,
    /// Event mix: `capability` (capability_invoked only) or `fleet` (the synthetic
    /// fleet's realistic mix of all 11 types; line sizes vary).
    #[arg(long, default_value = "capability")]
    pub mix: String,
    /// Where to write ingest.json.
    #[arg(long, default_value = "loadtest-report")]
    pub out: PathBuf,
}

#[derive(Debug, serde::Serialize)]
pub struct IngestReport {
    pub target: String,
    pub events: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub seconds: f64,
    pub accepted_per_s: f64,
    pub server_cpu_s: f64,
    pub accepted_per_server_cpu_s: f64,
    pub client_cpu_s: f64,
    pub rss_before: u64,
    pub rss_after: u64,
}

/// 4,096 distinct lines (agents and sessions vary), one `\n` each.
pub fn block(mix: &str, line_size: usize) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut fleet = krux_relay::fleet::Fleet::new(300, 11);
    for i in 0..4096 {
        let line = match mix {
            "fleet" => fleet.next_line(),
            "capability" => {
                let base = format!(
                    r#"{{"type":"capability_invoked","timestamp":"2026-03-15T10:30:00.123Z","agent":"agent-{}","session_id":"sess-{}","data":{{"capability":"filesystem.read","arguments":{{"path":"/workspace/data.csv"}},"permission_tier":"autonomous","duration_ms":12,"note":""}}}}"#,
                    i % 300,
                    i % 3000
                );
                let pad = line_size.saturating_sub(base.len());
                base.replace(r#""note":"""#, &format!(r#""note":"{}""#, "x".repeat(pad)))
            }
            other => bail!("--mix {other}: use capability or fleet"),
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// Sends `n` lines (cycling through `block`) on one connection and returns the summary's
/// (accepted, rejected).
pub fn publish(addr: std::net::SocketAddr, block: &[u8], n: u64) -> anyhow::Result<(u64, u64)> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let reader = stream.try_clone()?;
    // Replies (rejections, then the summary) are read while sending.
    let replies = std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
        for line in BufReader::new(reader).lines() {
            let v: serde_json::Value = serde_json::from_str(&line?)?;
            if let (Some(a), Some(r)) = (v["accepted"].as_u64(), v["rejected"].as_u64()) {
                return Ok((a, r));
            }
        }
        bail!("the server closed without a summary")
    });
    let lines_per_block = block.iter().filter(|&&b| b == b'\n').count() as u64;
    let mut w = std::io::BufWriter::with_capacity(256 * 1024, &stream);
    let mut left = n;
    while left >= lines_per_block {
        w.write_all(block)?;
        left -= lines_per_block;
    }
    let tail_end = block
        .split_inclusive(|&b| b == b'\n')
        .take(left as usize)
        .map(<[u8]>::len)
        .sum();
    w.write_all(&block[..tail_end])?;
    w.flush()?;
    drop(w);
    stream.shutdown(Shutdown::Write)?;
    replies.join().expect("the reply reader does not panic")
}

/// Sends `events` lines split evenly over `publishers` connections at once (one thread
/// each) and returns the summaries' (accepted, rejected) summed.
pub fn publish_split(
    addr: std::net::SocketAddr,
    block: &std::sync::Arc<Vec<u8>>,
    events: u64,
    publishers: u64,
) -> anyhow::Result<(u64, u64)> {
    let publishers = publishers.max(1);
    let per = events / publishers;
    let handles: Vec<_> = (0..publishers)
        .map(|i| {
            let block = block.clone();
            let n = if i == 0 {
                events - per * (publishers - 1)
            } else {
                per
            };
            std::thread::spawn(move || publish(addr, &block, n))
        })
        .collect();
    let (mut accepted, mut rejected) = (0, 0);
    for h in handles {
        let (a, r) = h.join().expect("a publisher does not panic")?;
        (accepted, rejected) = (accepted + a, rejected + r);
    }
    Ok((accepted, rejected))
}

fn measure(args: &IngestArgs, t: &Target, label: &str) -> anyhow::Result<IngestReport> {
    let block = std::sync::Arc::new(block(&args.mix, args.line_size)?);
    let before = proc_sample(t.pid).unwrap_or_default();
    let client_before = proc_sample(None).unwrap_or_default();
    let started = Instant::now();
    let (accepted, rejected) = publish_split(t.ingest, &block, args.events, args.publishers)?;
    let seconds = started.elapsed().as_secs_f64();
    let after = proc_sample(t.pid).unwrap_or_default();
    let client_after = proc_sample(None).unwrap_or_default();
    let server_cpu_s = after.cpu_s - before.cpu_s;
    Ok(IngestReport {
        target: label.to_string(),
        events: args.events,
        accepted,
        rejected,
        seconds,
        accepted_per_s: accepted as f64 / seconds,
        server_cpu_s,
        accepted_per_server_cpu_s: accepted as f64 / server_cpu_s.max(1e-9),
        client_cpu_s: client_after.cpu_s - client_before.cpu_s,
        rss_before: before.rss,
        rss_after: after.rss,
    })
}

pub fn run(args: &IngestArgs) -> anyhow::Result<Vec<IngestReport>> {
    let mut reports = Vec::new();
    let kinds: Vec<Option<Kind>> = if args.target.spawn.is_none() && args.target.pid.is_some() {
        vec![None] // attached to a running server
    } else {
        args.against.iter().copied().map(Some).collect()
    };
    for kind in kinds {
        let t = Target::open(&args.target, kind)?;
        let label = kind.map_or("attached".into(), |k| format!("{k:?}").to_lowercase());
        let r = measure(args, &t, &label)?;
        println!(
            "{label}: {} accepted ({} rejected) in {:.2} s: {:.0}/s, {:.0} per server CPU-s (server {:.2} CPU-s, client {:.2}); RSS {:.1} -> {:.1} MiB",
            r.accepted,
            r.rejected,
            r.seconds,
            r.accepted_per_s,
            r.accepted_per_server_cpu_s,
            r.server_cpu_s,
            r.client_cpu_s,
            r.rss_before as f64 / 1048576.0,
            r.rss_after as f64 / 1048576.0
        );
        reports.push(r);
    }
    if let [relay, baseline] = &reports[..] {
        println!(
            "relay/baseline {:.2}x accepted/s, {:.2}x per server CPU-s",
            relay.accepted_per_s / baseline.accepted_per_s,
            relay.accepted_per_server_cpu_s / baseline.accepted_per_server_cpu_s
        );
    }
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("ingest.json"),
        serde_json::to_vec_pretty(&reports)?,
    )?;
    Ok(reports)
}
