//! `web`: the sample front end (see `mayfly_examples::web`).
//!
//! `web --listen 127.0.0.1:8000 --orders 127.0.0.1:15002` (the orders address is web's own
//! sidecar's outbound port for orders), then `curl localhost:8000/` or
//! `curl -X POST localhost:8000/api/orders -d '{"item":"tea"}'`.

use anyhow::Context;
use clap::Parser;
use mayfly_examples::web;

/// A tiny front end: `GET /` lists the orders, `/api/...` is passed to orders.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Where to listen (for you and curl).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Where orders is: in the mesh, this sidecar's `[[outbound]]` listen address for orders.
    #[arg(long, default_value = "127.0.0.1:15002")]
    orders: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let l = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    eprintln!(
        "web listening on {} (orders at {})",
        l.local_addr().context("local address")?,
        cli.orders
    );
    tokio::select! {
        r = web::serve(l, cli.orders) => r,
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C"),
    }
}
