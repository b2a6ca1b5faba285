//! `mayfly-ca grant request|approve|deny|revoke|list`: just-in-time access, through the running
//! control plane's admin socket (the caller's OS user is the admin identity).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use mayfly_ca::server::admin::AdminRequest;
use mayfly_ca::server::distribution::GrantRequest;
use serde_json::Value;

use super::admin_call as call;

/// Grant subcommands.
#[derive(Subcommand)]
pub(crate) enum GrantCmd {
    /// Ask for a scoped, time-bound allow. Pending until another admin approves, unless the
    /// policy sets `grants.approvals = 0`.
    Request {
        /// The control plane's data directory (for its admin socket).
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Exact source SPIFFE ID.
        #[arg(long)]
        from: String,
        /// Exact destination SPIFFE ID.
        #[arg(long)]
        to: String,
        /// HTTP methods (comma-separated; default any).
        #[arg(long, value_delimiter = ',')]
        methods: Vec<String>,
        /// Path patterns (comma-separated; default any).
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// Lifetime once active (capped by the policy's grants.max_ttl).
        #[arg(long)]
        ttl: String,
        /// Why (required): a ticket, an incident.
        #[arg(long)]
        reason: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending grant (not your own).
    Approve {
        /// Data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Grant id.
        id: String,
    },
    /// Deny a pending grant.
    Deny {
        /// Data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Grant id.
        id: String,
    },
    /// Revoke a grant now.
    Revoke {
        /// Data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Grant id.
        id: String,
    },
    /// Grants: pending, active, expired, denied, revoked.
    List {
        /// Data directory.
        #[arg(long, env = "MAYFLY_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn line(g: &Value) -> String {
    let s = |k: &str| g[k].as_str().unwrap_or("").to_owned();
    let scope = match (g["methods"].as_array(), g["paths"].as_array()) {
        (Some(m), _) if !m.is_empty() => format!(
            " {}",
            m.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        ),
        _ => String::new(),
    };
    let paths = g["paths"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|p| !p.is_empty())
        .map(|p| format!(" {p}"))
        .unwrap_or_default();
    format!(
        "{:<11} {:<8} {} -> {}{scope}{paths} ttl {}s by {} ({})",
        s("id"),
        s("state"),
        s("from"),
        s("to"),
        g["ttl_secs"],
        s("requested_by"),
        s("reason")
    )
}

pub(crate) async fn run(cmd: GrantCmd) -> Result<()> {
    match cmd {
        GrantCmd::Request {
            data_dir,
            from,
            to,
            methods,
            paths,
            ttl,
            reason,
            json,
        } => {
            let g = call(
                &data_dir,
                AdminRequest::GrantRequest(GrantRequest {
                    from,
                    to,
                    methods,
                    paths,
                    ttl,
                    reason,
                }),
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&g)?);
            } else {
                println!("{}", line(&g));
                if g["state"] == "pending" {
                    println!(
                        "another admin approves it with: mayfly-ca grant approve {}",
                        g["id"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        GrantCmd::Approve { data_dir, id } => decide(&data_dir, id, "approve").await,
        GrantCmd::Deny { data_dir, id } => decide(&data_dir, id, "deny").await,
        GrantCmd::Revoke { data_dir, id } => decide(&data_dir, id, "revoke").await,
        GrantCmd::List { data_dir, json } => {
            let v = call(&data_dir, AdminRequest::GrantList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let grants = v.as_array().map(Vec::as_slice).unwrap_or_default();
                if grants.is_empty() {
                    // On stderr, as `kubectl get` does: stdout stays a list (empty) for scripts.
                    eprintln!("no grants");
                }
                for g in grants {
                    println!("{}", line(g));
                }
            }
            Ok(())
        }
    }
}

async fn decide(dir: &Path, id: String, action: &str) -> Result<()> {
    let g = call(
        dir,
        AdminRequest::GrantDecide {
            id,
            action: action.into(),
        },
    )
    .await?;
    println!("{}", line(&g));
    Ok(())
}
