//! Registration of this sidecar's inbound endpoints with the control plane's registry, so that
//! peers can find it by SPIFFE ID.
//!
//! Once the sidecar is ready (SVID and policy in force, see [`crate::ready`]) it registers the
//! advertised addresses over mTLS with its current SVID, refreshes them at a third of the lease
//! the control plane grants, registers again at once after every SVID rotation (the lease never
//! outlives the certificate that obtained it), and deregisters on graceful shutdown before the
//! listeners close. A failed attempt is retried on the schedule of [`crate::retry`]: bounded by
//! the time the current lease has left, and from 0.25 s to 3 s once it has ended.

use std::sync::Arc;
use std::time::Duration;

use mayfly_ca::client::CaClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::identity::{Identity, random_unit};
use crate::ready::Readiness;
use crate::retry;

/// The share of a lease after which it is refreshed.
pub const REFRESH_FRACTION: f64 = 1.0 / 3.0;
/// The shortest wait between two refreshes.
const REFRESH_MIN: Duration = Duration::from_millis(100);
/// How long a shutdown waits for the control plane to take the endpoints out.
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// The running registration; [`Registration::deregister`] ends it.
pub struct Registration {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Registration {
    /// Starts registering `endpoints` with the control plane `client` once `ready` holds.
    pub fn start(client: CaClient, ready: Readiness, endpoints: Vec<String>) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(client, ready, endpoints, stop_rx));
        Self { stop, task }
    }

    /// Stops refreshing and removes the endpoints from the registry (waiting at most
    /// [`DEREGISTER_TIMEOUT`] for the control plane).
    pub async fn deregister(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(DEREGISTER_TIMEOUT + Duration::from_secs(1), self.task).await;
    }
}

/// How long to wait after failed attempt number `attempt` when the current lease ends at
/// `lease_end`: bounded by the time it has left, then the reconnect schedule.
fn retry_delay(lease_end: Option<Instant>, attempt: u32) -> Duration {
    let j = random_unit();
    let left = lease_end.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(Instant::now())
    });
    retry::renew_delay(left, attempt, j).unwrap_or_else(|| retry::reconnect_delay(attempt, j))
}

async fn run(
    client: CaClient,
    ready: Readiness,
    endpoints: Vec<String>,
    mut stop: watch::Receiver<bool>,
) {
    let identity: Arc<Identity> = ready.identity.clone();
    let mut svid = identity.watch_ready();
    let mut lease_end: Option<Instant> = None;
    let mut registered = false;
    let mut failures = 0u32;
    let shown = endpoints.join(",");
    loop {
        if !ready.wait(&mut stop).await {
            break;
        }
        svid.borrow_and_update();
        let result = client
            .register_endpoints(identity.bundles.clone(), identity.creds.clone(), &endpoints)
            .await;
        let delay = match result {
            Ok(lease) => {
                if registered && failures == 0 {
                    debug!(endpoints = %shown, lease_ms = lease.as_millis(), "endpoint registration refreshed");
                } else {
                    info!(endpoints = %shown, lease_ms = lease.as_millis(), "endpoints registered with the control plane");
                }
                registered = true;
                failures = 0;
                lease_end = Some(Instant::now() + lease);
                lease.mul_f64(REFRESH_FRACTION).max(REFRESH_MIN)
            }
            Err(e) => {
                let d = retry_delay(lease_end, failures);
                warn!(error = %e, endpoints = %shown, retry_in_s = d.as_secs_f64(), "endpoint registration failed");
                failures = failures.saturating_add(1);
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            // A new SVID (or its expiry): register again with it at once.
            _ = svid.changed() => {}
            _ = stop.changed() => break,
        }
    }
    if !registered {
        return;
    }
    let gone = tokio::time::timeout(
        DEREGISTER_TIMEOUT,
        client.deregister_endpoints(identity.bundles.clone(), identity.creds.clone(), &endpoints),
    )
    .await;
    match gone {
        Ok(Ok(())) => info!(endpoints = %shown, "endpoints deregistered"),
        Ok(Err(e)) => {
            warn!(error = %e, endpoints = %shown, "cannot deregister: the endpoints leave when their lease ends")
        }
        Err(_) => warn!(
            endpoints = %shown,
            "the control plane did not answer the deregistration in time: the endpoints leave when their lease ends"
        ),
    }
}
