//! `passphrase set`: reads the operator passphrase from stdin (without echo on a
//! terminal, asked twice) and stores its Argon2id hash in the data dir.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{bail, Context};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PassphraseCommand {
    /// Set (or replace) the operator passphrase; read from stdin.
    Set,
}

pub fn run(cmd: PassphraseCommand, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
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
            crate::auth::passphrase::set(data_dir, &pass)?;
            eprintln!("operator passphrase set; running servers use it within 1 s");
            Ok(())
        }
    }
}
