//! `mayfly-ca endpoints list`: the sidecars' registered inbound endpoints, through the running
//! control plane's admin socket.

use anyhow::Result;
use clap::Subcommand;
use mayfly_ca::server::admin::AdminRequest;

use super::{AdminArg, admin_call, when};

#[derive(Subcommand)]
pub(super) enum EndpointsCmd {
    /// List the live endpoints: SPIFFE ID, address, when the lease ends.
    List {
        #[command(flatten)]
        dir: AdminArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `mayfly-ca endpoints ...`.
pub(super) async fn run(cmd: EndpointsCmd) -> Result<()> {
    match cmd {
        EndpointsCmd::List { dir, json } => {
            let v = admin_call(&dir, AdminRequest::EndpointsList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            let list = v.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                eprintln!("no endpoints registered");
                return Ok(());
            }
            println!("{:<26} {:<24} SPIFFE ID", "LEASE ENDS", "ADDRESS");
            for e in list {
                println!(
                    "{:<26} {:<24} {}",
                    when(e["expires_at"].as_f64().unwrap_or_default() as i64),
                    e["address"].as_str().unwrap_or("?"),
                    e["spiffe_id"].as_str().unwrap_or("?"),
                );
            }
            Ok(())
        }
    }
}
