//! `mayfly-ca token create|list|revoke`: join tokens, through the running control plane's
//! admin socket.

use anyhow::Result;
use clap::Subcommand;
use mayfly_ca::server::admin::AdminRequest;

use super::{AdminArg, admin_call, when};

#[derive(Subcommand)]
pub(super) enum TokenCmd {
    /// Create a single-use join token bound to one SPIFFE ID.
    Create {
        #[command(flatten)]
        dir: AdminArg,
        /// The SPIFFE ID the token may obtain.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (at most the server's --token-max-ttl).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// Print JSON (id, expiry, token) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        dir: AdminArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an unused token by id.
    Revoke {
        #[command(flatten)]
        dir: AdminArg,
        /// The token id (the second field of the token, as `token list` shows).
        id: String,
    },
}

/// Runs `mayfly-ca token ...`.
pub(super) async fn run(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            dir,
            spiffe_id,
            ttl,
            json,
        } => {
            let v = admin_call(&dir, AdminRequest::TokenCreate { spiffe_id, ttl }).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v["token"].as_str().unwrap_or_default());
            }
            Ok(())
        }
        TokenCmd::List { dir, json } => {
            let v = admin_call(&dir, AdminRequest::TokenList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<9} {:<8} {:<26} {:<10} SPIFFE ID",
                "ID", "STATE", "EXPIRES", "BY"
            );
            for t in v.as_array().into_iter().flatten() {
                println!(
                    "{:<9} {:<8} {:<26} {:<10} {}",
                    t["id"].as_str().unwrap_or("?"),
                    t["state"].as_str().unwrap_or("?"),
                    when(t["expires_at"].as_i64().unwrap_or_default()),
                    t["created_by"].as_str().unwrap_or("?"),
                    t["spiffe_id"].as_str().unwrap_or("?"),
                );
            }
            Ok(())
        }
        TokenCmd::Revoke { dir, id } => {
            admin_call(&dir, AdminRequest::TokenRevoke { id: id.clone() }).await?;
            println!("revoked token {id}");
            Ok(())
        }
    }
}
