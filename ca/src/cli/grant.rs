//! `mayfly-ca grant request|approve|deny|revoke|list`: just-in-time access, through the running
//! control plane's admin socket (the caller's OS user is the admin identity).

use anyhow::Result;
use clap::Subcommand;
use mayfly_ca::server::admin::AdminRequest;
use mayfly_ca::server::distribution::GrantRequest;
use serde_json::Value;

use super::{AdminArg, admin_call as call};

/// Grant subcommands.
#[derive(Subcommand)]
pub(crate) enum GrantCmd {
    /// Ask for a scoped, time-bound allow. Pending until another admin approves, unless the
    /// policy sets `grants.approvals = 0`.
    Request {
        #[command(flatten)]
        admin: AdminArg,
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
        #[command(flatten)]
        admin: AdminArg,
        /// Grant id.
        id: String,
    },
    /// Deny a pending grant.
    Deny {
        #[command(flatten)]
        admin: AdminArg,
        /// Grant id.
        id: String,
    },
    /// Revoke a grant now.
    Revoke {
        #[command(flatten)]
        admin: AdminArg,
        /// Grant id.
        id: String,
    },
    /// Grants: pending, active, expired, denied, revoked.
    List {
        #[command(flatten)]
        admin: AdminArg,
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
            admin,
            from,
            to,
            methods,
            paths,
            ttl,
            reason,
            json,
        } => {
            let g = call(
                &admin,
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
        GrantCmd::Approve { admin, id } => decide(&admin, id, "approve").await,
        GrantCmd::Deny { admin, id } => decide(&admin, id, "deny").await,
        GrantCmd::Revoke { admin, id } => decide(&admin, id, "revoke").await,
        GrantCmd::List { admin, json } => {
            let v = call(&admin, AdminRequest::GrantList).await?;
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

async fn decide(admin: &AdminArg, id: String, action: &str) -> Result<()> {
    let g = call(
        admin,
        AdminRequest::GrantDecide {
            id,
            action: action.into(),
        },
    )
    .await?;
    println!("{}", line(&g));
    Ok(())
}
