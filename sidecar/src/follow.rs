//! Following the control plane's watch stream: held while this sidecar has an SVID, every
//! snapshot handed to the caller, reconnected at once when a stream that delivered snapshots
//! ends (the client starts with another control-plane replica when it broke), otherwise with
//! the bounded, jittered schedule of [`retry::reconnect_delay`] (reset by a snapshot, cut short
//! when an SVID arrives) until shutdown. The policy (`policy::PolicyState::follow_control_plane`) and, for a sidecar with a
//! local policy file, the upstream endpoints (`upstreams::Upstreams::follow`) both ride on it.

use std::sync::Arc;
use std::time::Duration;

use mayfly_ca::api::Snapshot;
use mayfly_ca::client::{CaClient, ClientError};
use tokio::sync::watch;

use crate::identity::{Identity, random_unit};
use crate::retry;

/// Follows the stream for the endpoints of `upstreams` until `shutdown`: `on_snapshot` gets
/// every snapshot, `on_interrupted` each end of the stream with the delay before the next try.
pub async fn follow(
    identity: Arc<Identity>,
    client: CaClient,
    upstreams: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
    mut on_snapshot: impl FnMut(&Snapshot),
    on_interrupted: impl Fn(&ClientError, Duration),
) {
    let mut failures = 0u32;
    let mut ready = identity.watch_ready();
    loop {
        let mut ended = None;
        let mut delivered = false;
        if identity.ready() {
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            let fut = client.watch_with_endpoints(
                identity.bundles.clone(),
                identity.creds.clone(),
                &upstreams,
                tx,
            );
            tokio::pin!(fut);
            let result = loop {
                tokio::select! {
                    r = &mut fut => break r,
                    Some(snap) = rx.recv() => {
                        failures = 0;
                        delivered = true;
                        on_snapshot(&snap);
                    }
                    _ = shutdown.changed() => return,
                }
            };
            while let Ok(snap) = rx.try_recv() {
                delivered = true;
                on_snapshot(&snap);
            }
            ended = result.err();
        }
        // A stream that was serving ended (its replica went away, or our SVID's NotAfter came):
        // follow again at once; the backoff is for attempts that fail.
        let backoff = if delivered {
            Duration::ZERO
        } else {
            retry::reconnect_delay(failures, random_unit())
        };
        if let Some(e) = &ended {
            on_interrupted(e, backoff);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ready.changed() => {}
            _ = shutdown.changed() => return,
        }
        failures = failures.saturating_add(1);
    }
}
