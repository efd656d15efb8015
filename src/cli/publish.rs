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
    #[arg(long, env = "KRUX_INGEST", default_value = "127.0.0.1:7702")]
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
        Box::new(
            std::fs::File::open(&args.file)
                .with_context(|| format!("opening {}", args.file.display()))?,
        )
    };
    let stream = TcpStream::connect(args.ingest)
        .with_context(|| format!("connecting to the ingest port {}", args.ingest))?;
    let mut writer = stream.try_clone()?;
    // Replies are read while we send, so a long file never deadlocks on full buffers.
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        std::io::copy(&mut input, &mut writer)?;
        writer.flush()?;
        writer.shutdown(Shutdown::Write)
    });
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
    sender
        .join()
        .expect("the sender thread does not panic")
        .context("sending events")?;
    let Some((accepted, rejected)) = summary else {
        bail!("the relay closed the connection before its summary");
    };
    println!("accepted {accepted}, rejected {rejected}");
    Ok(if rejected > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
