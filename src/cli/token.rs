//! `user-token create|list|revoke`.

use std::path::Path;

use clap::Subcommand;

use crate::auth::TokenStore;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints it alone on stdout (only its hash is stored).
    Create {
        /// Who or what the token is for (1-64 of A-Z a-z 0-9 . _ - @); revoke uses it.
        #[arg(long)]
        name: String,
    },
    /// List tokens by name (tokens themselves are never shown).
    List,
    /// Revoke a token by name; running servers refuse it within 1 s.
    Revoke {
        /// The name given at create.
        name: String,
    },
}

pub fn run(cmd: TokenCommand, data_dir: &Path) -> anyhow::Result<()> {
    let store = TokenStore::new(data_dir);
    match cmd {
        TokenCommand::Create { name } => println!("{}", store.create(&name)?),
        TokenCommand::List => {
            let tokens = store.list()?;
            if tokens.is_empty() {
                eprintln!("no user tokens in {}", store.path().display());
            }
            for t in tokens {
                println!("{}\t{}", t.name, t.created);
            }
        }
        TokenCommand::Revoke { name } => {
            store.revoke(&name)?;
            eprintln!("revoked `{name}`");
        }
    }
    Ok(())
}
