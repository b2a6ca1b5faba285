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

/// How long to wait before following again: at once after a stream that delivered snapshots
/// ended (its replica went away, or our SVID's NotAfter came; the client starts with another
/// replica), else the reconnect schedule after `failures` failed attempts: the backoff is for
/// attempts that fail, not for a stream that served.
fn next_delay(delivered: bool, failures: u32, jitter: f64) -> Duration {
    if delivered {
        Duration::ZERO
    } else {
        retry::reconnect_delay(failures, jitter)
    }
}

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
        let backoff = next_delay(delivered, failures, random_unit());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_that_served_is_followed_again_at_once_and_failed_attempts_back_off() {
        assert_eq!(next_delay(true, 0, 1.0), Duration::ZERO);
        assert_eq!(next_delay(true, 7, 1.0), Duration::ZERO);
        assert!(next_delay(false, 0, 0.0) >= retry::BOOTSTRAP_BASE / 2);
        assert!(next_delay(false, 30, 1.0) <= retry::BOOTSTRAP_CAP);
    }
}
