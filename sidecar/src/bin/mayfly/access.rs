//! `mayfly access request|list|approve|deny|revoke`: a person asks for access to a service or
//! the admin role, another person decides, either ends it; all over mTLS with the user SVID.

use anyhow::Result;
use clap::Subcommand;
use mayfly_ca::api::{ACCESS_DECIDE_PATH, ACCESS_PATH, AccessDecision, AccessRequest};
use serde_json::Value;

use crate::session;

#[derive(Subcommand)]
pub(crate) enum AccessCmd {
    /// Ask for access to a service (--to) or the admin role (--role admin).
    Request {
        /// The service's SPIFFE ID.
        #[arg(long, required_unless_present = "role", conflicts_with = "role")]
        to: Option<String>,
        /// `admin`: the control plane's admin operations.
        #[arg(long, value_parser = ["admin"])]
        role: Option<String>,
        /// How long once approved, such as 30m.
        #[arg(long)]
        ttl: String,
        /// Why (an incident, a ticket).
        #[arg(long)]
        reason: String,
        /// HTTP method to allow (repeatable; default: the access rule's, or any).
        #[arg(long = "method")]
        methods: Vec<String>,
        /// Path pattern to allow (repeatable; default: the access rule's, or any).
        #[arg(long = "path")]
        paths: Vec<String>,
        /// Print the request as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Your requests, and those you may approve.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve someone else's request.
    Approve {
        /// The request's id.
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deny someone else's request.
    Deny {
        /// The request's id.
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// End a request or the access it gave (its requester or an approver).
    Revoke {
        /// The request's id.
        id: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

/// One request on one line.
fn line(g: &Value) -> String {
    let a = g.get("access").cloned().unwrap_or(Value::Null);
    let target = if s(&a, "kind") == "admin" {
        "role admin".to_owned()
    } else {
        s(g, "to").to_owned()
    };
    let approved = a
        .get("approved_by")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let needed = a
        .get("approvals_needed")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let until = g
        .get("expires")
        .and_then(Value::as_i64)
        .and_then(|e| time::OffsetDateTime::from_unix_timestamp(e).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(|t| format!(" until {t}"))
        .unwrap_or_default();
    format!(
        "{}  {:8} {}  by {}  approvals {approved}/{needed}{until}  reason: {}",
        s(g, "id"),
        s(g, "state"),
        target,
        s(g, "requested_by"),
        s(g, "reason"),
    )
}

fn show(v: &Value, json: bool) {
    if json {
        println!("{v}");
    } else {
        println!("{}", line(v));
    }
}

pub(crate) async fn run(cmd: AccessCmd) -> Result<()> {
    let session = session::open()?;
    match cmd {
        AccessCmd::Request {
            to,
            role,
            ttl,
            reason,
            methods,
            paths,
            json,
        } => {
            let req = AccessRequest {
                to,
                role,
                ttl,
                reason,
                methods,
                paths,
            };
            let g: Value = session.call(ACCESS_PATH, Some(&req)).await?;
            show(&g, json);
            if !json {
                eprintln!(
                    "asked: an approver runs `mayfly access approve {}`",
                    s(&g, "id")
                );
            }
        }
        AccessCmd::List { json } => {
            let list: Vec<Value> = session.call::<(), _>(ACCESS_PATH, None).await?;
            if json {
                println!("{}", Value::Array(list));
            } else if list.is_empty() {
                eprintln!("no access requests of yours or for you to approve");
            } else {
                for g in &list {
                    println!("{}", line(g));
                }
            }
        }
        AccessCmd::Approve { id, json } => decide(&session, id, "approve", json).await?,
        AccessCmd::Deny { id, json } => decide(&session, id, "deny", json).await?,
        AccessCmd::Revoke { id, json } => decide(&session, id, "revoke", json).await?,
    }
    Ok(())
}

async fn decide(session: &session::Session, id: String, action: &str, json: bool) -> Result<()> {
    let d = AccessDecision {
        id,
        action: action.to_owned(),
    };
    let g: Value = session.call(ACCESS_DECIDE_PATH, Some(&d)).await?;
    show(&g, json);
    Ok(())
}
