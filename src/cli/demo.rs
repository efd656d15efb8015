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

/// The demo's data dir: the one given (kept), or a throw-away one, private to the user and
/// removed however the demo ends (Ctrl-C and SIGTERM included).
struct DataDir {
    path: PathBuf,
    throw_away: bool,
}

impl Drop for DataDir {
    fn drop(&mut self) {
        if self.throw_away {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub fn run(args: DemoArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything is created: a signal from here on ends the demo through its cleanup.
    let signals = crate::server::termination_signals()?;
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let dir = match data_dir {
        Some(path) => DataDir {
            path,
            throw_away: false,
        },
        None => {
            let path = std::env::temp_dir().join(format!(
                "krux-demo-{}-{}",
                std::process::id(),
                secs.subsec_nanos()
            ));
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            DataDir {
                path,
                throw_away: true,
            }
        }
    };
    // A data dir that is kept may already hold a `demo` token: each run gets its own.
    let name = if dir.throw_away {
        "demo".to_string()
    } else {
        format!("demo-{}", secs.as_secs())
    };
    let token = TokenStore::new(&dir.path).create(&name)?;
    let server = crate::server::start(&args.serve, &dir.path)?;
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
            .unwrap_or_else(|| dir.path.join("tls-self-signed.pem"));
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
    println!("  dashboard:  {http}://{}/#access_token={token}", addrs.ws);
    println!("\nWatch the stream (in another terminal):");
    println!(
        "  {exe} tail --url {ws}://{}{trust} --token {token}",
        addrs.ws
    );
    println!(
        "  {exe} tail --url {ws}://{}{trust} --token {token} --type policy_violation,approval_requested",
        addrs.ws
    );
    if dir.throw_away {
        println!("\nCtrl-C stops the demo (and removes its data dir).");
    } else {
        println!(
            "\nCtrl-C stops the demo; {} keeps its token `{name}`.",
            dir.path.display()
        );
    }
    std::io::stdout().flush()?;

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
        if signals.recv_timeout(tick).is_ok()
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
