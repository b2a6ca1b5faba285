//! `db`: the sample line-based key-value store (see `mayfly_examples::db`).
//!
//! `db --listen 127.0.0.1:5432 [--seed]`, then e.g. `printf 'KEYS\n' | nc 127.0.0.1 5432`.

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use mayfly_examples::db;

/// A tiny line-based TCP key-value store: GET k, SET k v, INCR k, KEYS prefix, PING.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Where to listen; behind a sidecar, a loopback address (the sidecar's `inbound.app`).
    #[arg(long, default_value = "127.0.0.1:5432")]
    listen: String,
    /// Start with two sample orders.
    #[arg(long)]
    seed: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let l = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    eprintln!(
        "db listening on {}",
        l.local_addr().context("local address")?
    );
    let store = if cli.seed {
        db::Store::with_sample_orders()
    } else {
        db::Store::new()
    };
    tokio::select! {
        r = db::serve(l, Arc::new(store)) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
    }
}
