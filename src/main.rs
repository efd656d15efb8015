//! The `krux-relay` command line: parse, dispatch, map errors to exit codes.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object
    /// per line, for log collectors).
    #[arg(long, global = true, env = "KRUX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr (stdout is for `tail`'s events and `demo`'s banner); `KRUX_LOG`
/// filters them (`info` by default).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KRUX_LOG")
        .unwrap_or_else(|_| "info,async_nats=off".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ServeConfig),
    /// Print the effective configuration of `serve` (takes the same flags): each setting,
    /// its value (secrets elided) and where it came from (flag > KRUX_* > file > default).
    Config(ServeConfig),
    /// Zero-setup demo: the relay, a token and a synthetic fleet of agents.
    Demo(cli::demo::DemoArgs),
    /// Manage user tokens (krx_user_…).
    UserToken(cli::token::TokenArgs),
    /// Manage the operator passphrase.
    Passphrase(cli::passphrase::PassphraseArgs),
    /// Send NDJSON events to the ingest port.
    Publish(cli::publish::PublishArgs),
    /// Subscribe and print events.
    Tail(cli::tail::TailArgs),
}

/// Finds `--config FILE` (or `KRUX_CONFIG`) ahead of parsing and loads it; returns the
/// file, if any, and the variables it set.
fn load_config() -> anyhow::Result<Option<(std::path::PathBuf, Vec<String>)>> {
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
        return Ok(None);
    };
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    let serve = cmd.find_subcommand("serve").expect("serve is a subcommand");
    let check = |env: &str, value: &str| {
        let arg = serve
            .get_arguments()
            .chain(cmd.get_arguments())
            .filter(|a| a.get_id() != "_config")
            .find(|a| a.get_env().is_some_and(|e| e == env))?;
        if !arg.get_action().takes_values() {
            // A switch: the environment's boolean literals.
            let ok = ["true", "false", "1", "0", "yes", "no", "on", "off"].contains(&value);
            return Some(
                ok.then_some(())
                    .ok_or_else(|| "expected true or false".to_string()),
            );
        }
        // Parse the value alone through the flag's own parser (a flag wins over its env).
        let long = arg.get_long()?;
        let one = clap::Command::new("check")
            .no_binary_name(true)
            .arg(arg.clone());
        Some(
            one.try_get_matches_from([format!("--{long}={value}")])
                .map(drop)
                .map_err(|e| {
                    let text = e.to_string();
                    let first = text.lines().next().unwrap_or("").to_string();
                    // "error: invalid value 'x' for '--flag <FLAG>': reason" → reason
                    match first.split_once(">': ") {
                        Some((_, why)) => why.to_string(),
                        None => text
                            .lines()
                            .find(|l| l.contains("possible values"))
                            .map_or(first.clone(), |l| l.trim().to_string()),
                    }
                }),
        )
    };
    let from_file = krux_relay::config::load_config_file(std::path::Path::new(&path), &check)?;
    Ok(Some((path.into(), from_file)))
}

fn main() -> ExitCode {
    // The config file feeds the environment before clap reads it (flag > env > file).
    let file = match load_config() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("krux-relay: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Made only now: clap reads each flag's variable when the command is made, and the
    // file has just set some.
    let mut cmd = Cli::command();
    let matches = cmd.get_matches_mut();
    let args = match Cli::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    init_logging(args.log_format);
    let data_dir = args.data_dir.resolve();
    let result = match args.command {
        Command::Config(_) => {
            // Built by the parse, so the subcommand has the global flags (--data-dir, …).
            let (sub_cmd, sub) = (
                cmd.find_subcommand("config").expect("the config command"),
                matches
                    .subcommand_matches("config")
                    .expect("config was parsed"),
            );
            let (path, from_file) = file.map_or((None, vec![]), |(p, f)| (Some(p), f));
            let mut settings =
                krux_relay::config::effective(sub_cmd, sub, path.as_deref(), &from_file);
            for s in settings.iter_mut().filter(|s| s.name == "data-dir") {
                if s.origin == krux_relay::config::Origin::Unset {
                    (s.value, s.origin) = (
                        data_dir.display().to_string(),
                        krux_relay::config::Origin::Default,
                    );
                }
            }
            print!("{}", krux_relay::config::render_settings(&settings));
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(cfg) => krux_relay::server::start(&cfg, &data_dir)
            .and_then(|r| r.wait())
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => {
            cli::demo::run(a, args.data_dir.data_dir.clone()).map(|()| ExitCode::SUCCESS)
        }
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
