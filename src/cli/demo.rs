//! `demo`: the relay on its defaults with a throw-away data dir, a fresh user token, and a
//! synthetic fleet publishing through the real ingest port until Ctrl-C.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::auth::TokenStore;
use crate::config::ServeConfig;
use crate::fleet::Fleet;

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub serve: ServeConfig,
    /// Events per second from the synthetic fleet.
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Agents in the synthetic fleet.
    #[arg(long, default_value_t = 300)]
    pub agents: usize,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = crate::config::parse_duration)]
    pub duration: Option<Duration>,
}

/// Removes the throw-away data dir however the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        TempDir(std::env::temp_dir().join(format!("krux-demo-{}-{nanos}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let token = TokenStore::new(&dir.0).create("demo")?;
    let server = crate::server::start(&args.serve, &dir.0)?;
    let addrs = server.addrs;

    let exe =
        std::env::current_exe().map_or_else(|_| "krux-relay".into(), |p| p.display().to_string());
    println!(
        "krux-relay demo: {} agents publishing ~{} events/s",
        args.agents, args.rate
    );
    // With TLS flags the endpoints are wss:// and tail must trust the certificate.
    let (ws, http, trust) = if args.serve.tls_self_signed || args.serve.tls_cert.is_some() {
        let ca = args
            .serve
            .tls_cert
            .clone()
            .unwrap_or_else(|| dir.0.join("tls-self-signed.pem"));
        ("wss", "https", format!(" --ca-cert {}", ca.display()))
    } else {
        ("ws", "http", String::new())
    };
    println!(
        "  subscribers: {ws}://{}/events   ingest: {}   admin: http://{}/metrics",
        addrs.ws, addrs.ingest, addrs.admin
    );
    println!(
        "  backend: {:?}, {} reactor thread(s)",
        server.io, server.reactors
    );
    println!("  user token: {token}");
    println!("  dashboard:  {http}://{}/?access_token={token}", addrs.ws);
    println!("\nWatch the stream (in another terminal):");
    println!(
        "  {exe} tail --url {ws}://{}{trust} --token {token}",
        addrs.ws
    );
    println!(
        "  {exe} tail --url {ws}://{}{trust} --token {token} --type policy_violation,approval_requested",
        addrs.ws
    );
    println!("\nCtrl-C stops the demo.");
    std::io::stdout().flush()?;

    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let _ = done_tx.send(());
    });

    let stream =
        TcpStream::connect(addrs.ingest).context("connecting the fleet to the ingest port")?;
    let replies = stream.try_clone()?;
    std::thread::spawn(move || {
        for line in BufReader::new(replies).lines().map_while(Result::ok) {
            eprintln!("relay: {line}");
        }
    });
    let mut out = std::io::BufWriter::new(stream);
    let mut fleet = Fleet::new(args.agents, 0x6b72_7578);
    let started = Instant::now();
    let tick = Duration::from_millis(20);
    let mut sent = 0u64;
    let mut next_report = started + Duration::from_secs(10);
    loop {
        if done_rx.recv_timeout(tick).is_ok()
            || args.duration.is_some_and(|d| started.elapsed() >= d)
        {
            break;
        }
        // Catch up to the target rate (events are spread over 20 ms ticks).
        let due = (started.elapsed().as_secs_f64() * f64::from(args.rate)) as u64;
        while sent < due {
            writeln!(out, "{}", fleet.next_line())?;
            sent += 1;
        }
        out.flush().context("the relay's ingest port went away")?;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            let m = &server.metrics;
            println!(
                "published {sent} events; {} subscriber(s); {} frames delivered",
                m.subscribers.load(Relaxed),
                m.frames_out.load(Relaxed)
            );
        }
    }
    println!("\nstopping after {sent} events");
    drop(out); // the fleet's connection ends, so the ingest has nothing left to wait for
    server.shutdown();
    Ok(())
}
