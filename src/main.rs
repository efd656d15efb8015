//! The `krux-relay` command line: parse, dispatch, map errors to exit codes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use krux_relay::cli;
use krux_relay::config::{DataDirArg, ServeConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "krux-relay",
    version,
    about = "Supervision event relay of the KruxOS Gateway"
)]
struct Cli {
    #[command(flatten)]
    data_dir: DataDirArg,
    /// TOML file of serve settings (flag names as keys); flags and KRUX_* variables win.
    // Read by `load_config` before parsing; declared here for --help and validation.
    #[arg(long = "config", env = "KRUX_CONFIG", global = true)]
    _config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ServeConfig),
    /// Zero-setup demo: the relay, a token and a synthetic fleet of agents.
    Demo(cli::demo::DemoArgs),
    /// Manage user tokens (krx_user_…).
    #[command(subcommand)]
    UserToken(cli::token::TokenCommand),
    /// Manage the operator passphrase.
    #[command(subcommand)]
    Passphrase(cli::passphrase::PassphraseCommand),
    /// Send NDJSON events to the ingest port.
    Publish(cli::publish::PublishArgs),
    /// Subscribe and print events.
    Tail(cli::tail::TailArgs),
}

/// Finds `--config FILE` (or `KRUX_CONFIG`) ahead of parsing, and loads it.
fn load_config() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let from_flag = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--config") {
            Some("") => args.get(i + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_string),
            None => None,
        });
    let Some(path) = from_flag.or_else(|| std::env::var("KRUX_CONFIG").ok()) else {
        return Ok(());
    };
    let cmd = <Cli as clap::CommandFactory>::command();
    let serve = cmd.find_subcommand("serve").expect("serve is a subcommand");
    let mut known: Vec<String> = serve
        .get_arguments()
        .chain(cmd.get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    known.retain(|k| k != "KRUX_CONFIG");
    krux_relay::config::load_config_file(std::path::Path::new(&path), &known)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KRUX_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // The config file feeds the environment before clap reads it (flag > env > file).
    if let Err(e) = load_config() {
        eprintln!("krux-relay: {e:#}");
        return ExitCode::FAILURE;
    }
    let args = Cli::parse();
    let data_dir = args.data_dir.resolve();
    let result = match args.command {
        Command::Serve(cfg) => krux_relay::server::start(&cfg, &data_dir)
            .and_then(|r| r.wait())
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => cli::demo::run(a).map(|()| ExitCode::SUCCESS),
        Command::UserToken(c) => cli::token::run(c, &data_dir).map(|()| ExitCode::SUCCESS),
        Command::Passphrase(c) => cli::passphrase::run(c, &data_dir).map(|()| ExitCode::SUCCESS),
        Command::Publish(a) => cli::publish::run(a),
        Command::Tail(a) => cli::tail::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("krux-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
