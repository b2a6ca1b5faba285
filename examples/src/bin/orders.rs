//! `orders`: the sample HTTP API (see `mayfly_examples::orders`).
//!
//! `orders --listen 127.0.0.1:8080 --db 127.0.0.1:15001` (the db address is orders' own
//! sidecar's outbound port for db).

use anyhow::Context;
use clap::Parser;
use mayfly_examples::orders;

/// An HTTP/1.1 orders API that stores its data in the sample db.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Where to listen; behind a sidecar, a loopback address (the sidecar's `inbound.app`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Where db is: in the mesh, this sidecar's `[[outbound]]` listen address for db.
    #[arg(long, default_value = "127.0.0.1:15001")]
    db: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let l = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    eprintln!(
        "orders listening on {} (db at {})",
        l.local_addr().context("local address")?,
        cli.db
    );
    tokio::select! {
        r = orders::serve(l, cli.db) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
    }
}
