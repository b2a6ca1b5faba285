//! `mayfly admin '{"op": "token.list"}'`: one admin-socket request over mTLS, for a person
//! holding an active admin grant (`mayfly access request --role admin`).

use anyhow::{Context, Result, bail};
use clap::Args;
use mayfly_ca::api::ADMIN_PATH;
use serde_json::Value;

use crate::session;

#[derive(Args)]
pub(crate) struct AdminArgs {
    /// The request, as the admin socket takes it, such as '{"op": "grant.list"}'.
    request: String,
}

pub(crate) async fn run(args: AdminArgs) -> Result<()> {
    let req: Value = serde_json::from_str(&args.request).context("the request is not JSON")?;
    let session = session::open()?;
    let resp: Value = session.call(ADMIN_PATH, Some(&req)).await?;
    if resp.get("ok").and_then(Value::as_bool) != Some(true) {
        bail!(
            "{}",
            resp.get("error")
                .and_then(Value::as_str)
                .unwrap_or("the operation failed")
        );
    }
    println!("{}", resp.get("data").cloned().unwrap_or(Value::Null));
    Ok(())
}
