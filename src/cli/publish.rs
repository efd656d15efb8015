//! `publish [FILE|-]`: streams NDJSON to the ingest port, reports each rejection (line and
//! reason) on stderr and `accepted N, rejected M` on stdout; exit 1 if any was rejected.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// NDJSON file, or `-` for standard input.
    #[arg(default_value = "-")]
    pub file: PathBuf,
    /// The relay's ingest address.
    #[arg(long, env = "KRUX_INGEST", default_value = "127.0.0.1:7702", value_parser = crate::config::parse_addr)]
    pub ingest: SocketAddr,
}

#[derive(serde::Deserialize)]
struct Reply {
    line: Option<u64>,
    error: Option<String>,
    accepted: Option<u64>,
    rejected: Option<u64>,
}

pub fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let mut input: Box<dyn Read + Send> = if args.file.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        let shown = args.file.display();
        let file = std::fs::File::open(&args.file).with_context(|| format!("opening {shown}"))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            bail!("{shown} is a directory; give an NDJSON file, or - for standard input");
        }
        Box::new(file)
    };
    let stream = TcpStream::connect(args.ingest)
        .with_context(|| format!("connecting to the ingest port {}", args.ingest))?;
    let mut writer = stream.try_clone()?;
    // Replies are read while we send, so a long file never deadlocks on full buffers.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let sent = std::io::copy(&mut input, &mut writer).and_then(|_| writer.flush());
        // On a read error, end the connection both ways: the relay would otherwise wait
        // for the rest of the input, and we for its summary.
        let how = if sent.is_ok() {
            Shutdown::Write
        } else {
            Shutdown::Both
        };
        let _ = writer.shutdown(how);
        sent
    });
    let summary = read_replies(stream);
    sender
        .join()
        .expect("the sender thread does not panic")
        .with_context(|| format!("reading {}", args.file.display()))?;
    let Some((accepted, rejected)) = summary? else {
        bail!("the relay closed the connection before its summary");
    };
    println!("accepted {accepted}, rejected {rejected}");
    Ok(if rejected > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Prints each rejection as it comes; returns the summary's counts, if it came.
fn read_replies(stream: TcpStream) -> anyhow::Result<Option<(u64, u64)>> {
    let mut summary = None;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the relay's replies")?;
        let reply: Reply = serde_json::from_str(&line)
            .with_context(|| format!("unexpected reply from the relay: {line}"))?;
        match reply {
            Reply {
                line: Some(n),
                error: Some(e),
                ..
            } => eprintln!("line {n}: {e}"),
            Reply {
                accepted: Some(a),
                rejected: Some(r),
                ..
            } => summary = Some((a, r)),
            _ => bail!("unexpected reply from the relay: {line}"),
        }
    }
    Ok(summary)
}
