//! The app's own X.509-SVID: the sidecar's SPIFFE ID with a key pair of its own, obtained from
//! the control plane over the sidecar's mTLS (a renewal request, authenticated by the sidecar's
//! current SVID) and rotated on the sidecar's own schedule: at half-life (+-10 %), retries
//! bounded by the time left ([`crate::retry`]). The key is generated here, held in memory only
//! ([`SecretKey`] zeroes itself on drop) and leaves the process only over the Workload API
//! socket.
//!
//! [`follow`] publishes the current SVID and the trust bundles in one [`watch`] channel that
//! every open stream of the Workload API follows.

use std::sync::Arc;
use std::time::Duration;

use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::CaClient;
use mayfly_ca::id::SpiffeId;
use mayfly_ca::keys::SecretKey;
use mayfly_ca::verify::{Usage, algorithms, verify_chain};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::{Identity, random_unit};
use crate::retry;

/// How often the trust bundles the sidecar holds are compared with the ones published.
pub const BUNDLE_POLL: Duration = Duration::from_secs(1);

/// One SVID for the app.
pub struct AppSvid {
    /// The SPIFFE ID (the sidecar's).
    pub id: SpiffeId,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key (PKCS#8): only ever written to the Workload API socket.
    pub key: SecretKey,
    /// The leaf's serial (hex).
    pub serial: String,
    /// The leaf's NotAfter.
    pub not_after: OffsetDateTime,
    /// When to obtain the next one.
    renew_at: OffsetDateTime,
}

impl AppSvid {
    /// An SVID as [`maintain`] would publish it, for the tests of what is sent when.
    #[cfg(test)]
    pub(crate) fn for_tests(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: SecretKey,
        serial: &str,
    ) -> Self {
        let far = OffsetDateTime::now_utc() + time::Duration::hours(1);
        Self {
            id,
            chain,
            key,
            serial: serial.to_owned(),
            not_after: far,
            renew_at: far,
        }
    }
}

/// What the Workload API hands out: the app's SVID (none yet, or after it expired without
/// renewal) and the trust bundles.
#[derive(Clone, Default)]
pub struct Published {
    /// The current SVID.
    pub svid: Option<Arc<AppSvid>>,
    /// The trust bundles, as the sidecar holds them.
    pub bundles: Arc<BundleSet>,
}

fn left_until(t: OffsetDateTime) -> Duration {
    Duration::from_secs_f64(
        (t - OffsetDateTime::now_utc())
            .as_seconds_f64()
            .clamp(0.0, 1e9),
    )
}

/// Obtains a new SVID for the app with a new key.
async fn obtain(
    identity: &Identity,
    client: &CaClient,
    ttl: Option<Duration>,
) -> Result<AppSvid, String> {
    let key = SecretKey::generate().map_err(|e| e.to_string())?;
    let issued = client
        .renew(
            identity.bundles.clone(),
            identity.creds.clone(),
            &key,
            &identity.id,
            ttl,
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut set = (**identity.bundles.load()).clone();
    set.insert(issued.bundle);
    let info = verify_chain(
        &issued.chain,
        &set,
        rustls_pki_types::UnixTime::now(),
        Usage::Client,
        &algorithms(),
    )
    .map_err(|e| format!("the returned SVID does not verify against the bundle: {e}"))?;
    if info.id != identity.id {
        return Err(format!(
            "the control plane returned an SVID for {}, expected {}",
            info.id, identity.id
        ));
    }
    let now = OffsetDateTime::now_utc();
    // Half of the remaining life +-10 %, as the sidecar's own SVID.
    let renew_at = now + (info.not_after - now) * (0.4 + 0.2 * random_unit());
    Ok(AppSvid {
        id: info.id,
        chain: issued.chain,
        key,
        serial: info.serial,
        not_after: info.not_after,
        renew_at,
    })
}

/// Keeps an SVID for the app in `out` for as long as the sidecar runs: the first once the
/// sidecar holds its own, then a new one (new key) at every half-life; a failed attempt is
/// retried on the sidecar's renewal schedule, and an SVID that expires is withdrawn.
pub async fn maintain(
    identity: Arc<Identity>,
    client: CaClient,
    ttl: Option<Duration>,
    out: watch::Sender<Published>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ready = identity.watch_ready();
    let mut failures = 0u32;
    loop {
        let current = out.borrow().svid.clone();
        if let Some(s) = &current
            && s.not_after <= OffsetDateTime::now_utc()
        {
            warn!(serial = %s.serial, "the app's SVID expired without renewal: withdrawn from the Workload API");
            out.send_modify(|p| p.svid = None);
            continue;
        }
        if !identity.ready() {
            // Only the sidecar's own SVID authenticates the request.
            tokio::select! {
                _ = ready.changed() => continue,
                _ = tokio::time::sleep(current.as_ref().map(|s| left_until(s.not_after)).unwrap_or(Duration::from_secs(3600))) => continue,
                _ = shutdown.changed() => return,
            }
        }
        let wait = match &current {
            Some(s) if OffsetDateTime::now_utc() < s.renew_at => left_until(s.renew_at),
            _ => {
                let left = current.as_ref().map(|s| left_until(s.not_after));
                let attempt = obtain(&identity, &client, ttl);
                let r =
                    match tokio::time::timeout(left.unwrap_or(retry::BOOTSTRAP_CAP * 10), attempt)
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => Err("no answer from the control plane in time".to_owned()),
                    };
                match r {
                    Ok(svid) => {
                        failures = 0;
                        let (serial, not_after) = (svid.serial.clone(), svid.not_after);
                        // With the bundle it verifies against, never ahead of it.
                        let bundles = identity.bundles.load_full();
                        out.send_modify(|p| {
                            p.svid = Some(Arc::new(svid));
                            if !same_bundles(&p.bundles, &bundles) {
                                p.bundles = bundles;
                            }
                        });
                        // Once served: from this line on, FetchX509SVID hands it out.
                        info!(%serial, not_after = %not_after.unix_timestamp(), "SVID for the app installed (Workload API)");
                        continue;
                    }
                    Err(e) => {
                        let next = match left {
                            Some(left) => {
                                retry::renew_delay(left, failures, random_unit()).unwrap_or(left)
                            }
                            None => retry::bootstrap_delay(failures, random_unit()),
                        };
                        failures = failures.saturating_add(1);
                        warn!(error = %e, retry_in_s = next.as_secs_f64(), "cannot obtain an SVID for the app (Workload API)");
                        next
                    }
                }
            }
        };
        let until_expiry = current
            .as_ref()
            .map(|s| left_until(s.not_after))
            .unwrap_or(wait);
        tokio::select! {
            _ = tokio::time::sleep(wait.min(until_expiry)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Publishes the sidecar's trust bundles in `out` whenever their roots change (polled every
/// [`BUNDLE_POLL`]: the sidecar refreshes them on the control plane's hint).
pub async fn follow_bundles(
    identity: Arc<Identity>,
    out: watch::Sender<Published>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = identity.bundles.load_full();
        out.send_if_modified(|p| {
            if same_bundles(&p.bundles, &now) {
                false
            } else {
                p.bundles = now.clone();
                true
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(BUNDLE_POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Whether two bundle sets hold the same roots and JWT keys in the same trust domains.
fn same_bundles(a: &BundleSet, b: &BundleSet) -> bool {
    same_roots(a, b) && super::jwt::same_jwt_keys(a, b)
}

/// Whether two bundle sets trust the same roots in the same trust domains.
pub fn same_roots(a: &BundleSet, b: &BundleSet) -> bool {
    let roots = |s: &BundleSet| {
        let mut v: Vec<(String, Vec<Vec<u8>>)> = s
            .iter()
            .map(|b| {
                (
                    b.trust_domain().to_string(),
                    b.roots().iter().map(|r| r.to_vec()).collect(),
                )
            })
            .collect();
        v.sort();
        v
    };
    roots(a) == roots(b)
}
