//! `mayfly connect ID --listen 127.0.0.1:PORT`: a local listener whose connections are tunnelled
//! with the user SVID to the service's sidecars (found through the control plane, which names
//! them only to a holder of an active grant), like a peer sidecar's: mTLS, the server checked
//! to present exactly `ID`, no ALPN (the inbound reads raw bytes, or HTTP/1.1 in HTTP mode).
//! The service's sidecar decides by the grant, records the person in every audit record, and
//! cuts the connections when the grant ends; this end cuts them when the user SVID expires.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use mayfly_ca::api::{ACCESS_ENDPOINTS_PATH, EndpointsFound, EndpointsLookup};
use mayfly_ca::tls::{client_config, dial_name};
use mayfly_ca::verify::{IdMatcher, describe_tls_error};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use crate::session;

/// How long one dial (TCP connect and TLS handshake) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub(crate) struct ConnectArgs {
    /// The service's SPIFFE ID (you need an active grant to it: `mayfly access request`).
    id: String,
    /// Where to listen locally (loopback), such as 127.0.0.1:5432.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

pub(crate) async fn run(args: ConnectArgs) -> Result<()> {
    let session = session::open()?;
    let target = mayfly_ca::id::parse_id(&args.id).context("the service's SPIFFE ID")?;
    let lookup = EndpointsLookup {
        spiffe_id: target.to_string(),
    };
    let found: EndpointsFound = session.call(ACCESS_ENDPOINTS_PATH, Some(&lookup)).await?;
    if found.endpoints.is_empty() {
        bail!(
            "{} has no live endpoint registered: is its sidecar running?",
            found.spiffe_id
        );
    }
    let tls = client_config(
        session.tls.clone(),
        session.bundles.clone(),
        IdMatcher::Exact(target.clone()),
        &[],
    )?;
    let connector = TlsConnector::from(Arc::new(tls));
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    let svid_end = session.creds.not_after;
    eprintln!("mayfly connect listening on {local}");
    eprintln!(
        "-> {} through {} (grant {} until {}; your user SVID until {})",
        found.spiffe_id,
        found.endpoints.join(", "),
        found.grant,
        shown(found.expires),
        shown(svid_end),
    );
    let left = (svid_end - time::OffsetDateTime::now_utc().unix_timestamp()).max(0);
    let svid_expiry = tokio::time::sleep(Duration::from_secs(left as u64));
    tokio::pin!(svid_expiry);
    let endpoints = Arc::new(found.endpoints);
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = &mut svid_expiry => {
                bail!("your user SVID expired: connections closed; run `mayfly login` and connect again");
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let (app, from) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                next = next.wrapping_add(1);
                let (c, eps) = (connector.clone(), endpoints.clone());
                let start = next;
                tokio::spawn(async move {
                    match tunnel(c, &eps, start, app).await {
                        Ok((up, down)) => info!(%from, up, down, "connection ended"),
                        Err(e) => eprintln!("mayfly connect: {e:#}"),
                    }
                });
            }
        }
    }
}

fn shown(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Dials the endpoints in turn from `start`, then copies bytes both ways until either side
/// closes (the service's sidecar closes when the grant ends).
async fn tunnel(
    connector: TlsConnector,
    endpoints: &[String],
    start: usize,
    mut app: TcpStream,
) -> Result<(u64, u64)> {
    let mut failures = Vec::new();
    for i in 0..endpoints.len() {
        let addr = &endpoints[(start + i) % endpoints.len()];
        match tokio::time::timeout(DIAL_TIMEOUT, dial(&connector, addr)).await {
            Ok(Ok(mut tls)) => {
                let _ = app.set_nodelay(true);
                let (up, down) = tokio::io::copy_bidirectional(&mut app, &mut tls)
                    .await
                    .unwrap_or((0, 0));
                return Ok((up, down));
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: no connection within {DIAL_TIMEOUT:?}")),
        }
    }
    bail!("cannot reach the service: {}", failures.join("; "))
}

async fn dial(
    connector: &TlsConnector,
    addr: &str,
) -> std::result::Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    connector
        .connect(dial_name(), tcp)
        .await
        .map_err(|e| describe_tls_error(&e))
}
