//! `user-token create|list|revoke`.

use std::path::Path;

use clap::{Args, Subcommand};

use crate::auth::TokenStore;
use crate::cluster::credentials;
use crate::config::cluster::{NatsArgs, NatsSettings};

/// `user-token`: its subcommand, and where the tokens live (the data dir, or the cluster).
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(subcommand)]
    pub cmd: TokenCommand,
}

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

pub fn run(args: TokenArgs, data_dir: &Path) -> anyhow::Result<()> {
    let cmd = args.cmd;
    if let Some(nats) = args.nats.settings()? {
        return in_cluster(cmd, &nats);
    }
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

/// The same commands on the cluster's credentials bucket (every node applies them).
fn in_cluster(cmd: TokenCommand, nats: &NatsSettings) -> anyhow::Result<()> {
    let bucket = &nats.bucket;
    crate::cluster::block_on(nats, |js| async move {
        let store = credentials::open(&js, bucket, nats.replicas).await?;
        match cmd {
            TokenCommand::Create { name } => {
                println!("{}", credentials::create_token(&store, &name).await?)
            }
            TokenCommand::List => {
                let tokens = credentials::list_tokens(&store).await?;
                if tokens.is_empty() {
                    eprintln!("no user tokens in the cluster's bucket {bucket}");
                }
                for t in tokens {
                    println!("{}\t{}", t.name, t.created);
                }
            }
            TokenCommand::Revoke { name } => {
                credentials::revoke_token(&store, &name).await?;
                eprintln!("revoked `{name}` on every node");
            }
        }
        Ok(())
    })
}
