//! `passphrase set`: reads the operator passphrase from stdin (without echo on a
//! terminal, asked twice) and stores its Argon2id hash in the data dir.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// `passphrase`: its subcommand, and where the hash lives (the data dir, or the cluster).
#[derive(Debug, Args)]
pub struct PassphraseArgs {
    #[command(flatten)]
    pub nats: crate::config::cluster::NatsArgs,
    #[command(subcommand)]
    pub cmd: PassphraseCommand,
}

#[derive(Debug, Subcommand)]
pub enum PassphraseCommand {
    /// Set (or replace) the operator passphrase; read from stdin.
    Set,
}

pub fn run(args: PassphraseArgs, data_dir: &Path) -> anyhow::Result<()> {
    match args.cmd {
        PassphraseCommand::Set => {
            let pass = if std::io::stdin().is_terminal() {
                let first = rpassword::prompt_password("Operator passphrase: ")?;
                let again = rpassword::prompt_password("Again: ")?;
                if first != again {
                    bail!("the two entries differ; nothing was changed");
                }
                first
            } else {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .context("reading the passphrase from stdin")?;
                line.trim_end_matches(['\r', '\n']).to_string()
            };
            match args.nats.settings()? {
                Some(nats) => {
                    let phc = crate::auth::passphrase::hash(&pass)?;
                    let (bucket, replicas) = (&nats.bucket, nats.replicas);
                    crate::cluster::block_on(&nats, |js| async move {
                        let store =
                            crate::cluster::credentials::open(&js, bucket, replicas).await?;
                        crate::cluster::credentials::set_passphrase(&store, &phc).await
                    })?;
                    eprintln!(
                        "operator passphrase set in the cluster; every node uses it within 1 s"
                    );
                }
                None => {
                    crate::auth::passphrase::set(data_dir, &pass)?;
                    eprintln!("operator passphrase set; running servers use it within 1 s");
                }
            }
            Ok(())
        }
    }
}
