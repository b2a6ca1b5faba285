//! The sidecar's own SVID: bootstrap with the join token, rotation at half-life with jitter and
//! a new key each time, retries bounded by the time left ([`crate::retry`]), a join token file
//! watched for a new token, bundle refresh, and fail-closed at expiry.
//!
//! Private keys live only in memory ([`SecretKey`] zeroes itself on drop).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use mayfly_ca::bundle::{BundleSet, TrustBundle};
use mayfly_ca::client::{CaClient, ClientError, IssuedChain};
use mayfly_ca::id::SpiffeId;
use mayfly_ca::keys::{SecretKey, fill_random};
use mayfly_ca::tls::{Credentials, Svid};
use mayfly_ca::token::JoinToken;
use mayfly_ca::verify::{SharedBundles, Usage, algorithms, verify_chain};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{ControlPlane, TokenSource};
use crate::metrics::{Metrics, ResultLabels};
use crate::retry;

/// The sidecar's identity: current SVID and trust bundles, shared with every listener.
pub struct Identity {
    /// This sidecar's SPIFFE ID.
    pub id: SpiffeId,
    /// The current SVID (empty before bootstrap and after expiry: handshakes fail closed).
    pub creds: Arc<Credentials>,
    /// Trust bundles peers are verified against.
    pub bundles: SharedBundles,
    client: CaClient,
    control_plane: ControlPlane,
    metrics: Arc<Metrics>,
    ready: watch::Sender<bool>,
    /// When to renew the current SVID: half of its remaining life at installation (+-10 %),
    /// not counted from NotBefore, which is backdated for clock skew.
    renew_at: std::sync::Mutex<OffsetDateTime>,
    /// Why the last bootstrap or renewal failed (cleared when an SVID is installed).
    last_error: std::sync::Mutex<Option<String>>,
    /// When the last SVID expired without renewal (cleared when an SVID is installed).
    expired_at: std::sync::Mutex<Option<OffsetDateTime>>,
}

/// How often a join token file is checked for a new token while bootstrap fails.
pub const TOKEN_POLL: Duration = Duration::from_millis(300);

/// Why a new SVID was not accepted.
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error("the control plane returned an SVID for {got}, expected {want}")]
    WrongId { got: String, want: String },
    #[error("the returned SVID does not verify against the bundle: {0}")]
    Verify(String),
    #[error("the returned SVID is unusable: {0}")]
    Tls(String),
}

/// A random number in 0..=1.
pub(crate) fn random_unit() -> f64 {
    let mut b = [0u8; 2];
    fill_random(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}

fn jitter_fraction() -> f64 {
    // 0.4 ..= 0.6: half-life +- 10 %.
    0.4 + 0.2 * random_unit()
}

fn left_until(t: OffsetDateTime) -> Duration {
    Duration::from_secs_f64(
        (t - OffsetDateTime::now_utc())
            .as_seconds_f64()
            .clamp(0.0, 1e9),
    )
}

impl Identity {
    /// A new identity with no SVID yet.
    pub fn new(
        id: SpiffeId,
        control_plane: ControlPlane,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ClientError> {
        let client = CaClient::new(control_plane.address.clone(), id.trust_domain().clone())?;
        let (ready, _) = watch::channel(false);
        Ok(Arc::new(Self {
            id,
            creds: Credentials::new(),
            bundles: Arc::new(ArcSwap::from_pointee(BundleSet::default())),
            client,
            control_plane,
            metrics,
            ready,
            renew_at: std::sync::Mutex::new(OffsetDateTime::UNIX_EPOCH),
            last_error: std::sync::Mutex::new(None),
            expired_at: std::sync::Mutex::new(None),
        }))
    }

    /// The control-plane client: every task that talks to the control plane uses a clone, so
    /// that all of them share which replica answered last.
    pub fn client(&self) -> &CaClient {
        &self.client
    }

    /// Whether an SVID is held and has not expired.
    pub fn ready(&self) -> bool {
        self.creds
            .get()
            .is_some_and(|s| s.info.not_after > OffsetDateTime::now_utc())
    }

    /// Why no usable SVID is held (`None` when one is): for `/readyz`.
    pub fn why_not_ready(&self) -> Option<String> {
        let mut why = match self.creds.get() {
            Some(s) if s.info.not_after > OffsetDateTime::now_utc() => return None,
            Some(s) => format!("SVID expired at {}", s.info.not_after),
            None => match self.expired_at.lock().ok().and_then(|t| *t) {
                Some(t) => format!("no SVID: the last one expired at {t} without renewal"),
                None => "no SVID yet".to_owned(),
            },
        };
        if let Some(e) = self.last_error.lock().ok().and_then(|e| e.clone()) {
            why.push_str("; ");
            why.push_str(&e);
        }
        Some(why)
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = e;
        }
    }

    /// A receiver that sees readiness changes.
    pub fn watch_ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Seconds until the current SVID expires (negative without one).
    pub fn expires_in(&self) -> i64 {
        match self.creds.get() {
            Some(s) => (s.info.not_after - OffsetDateTime::now_utc()).whole_seconds(),
            None => -1,
        }
    }

    fn read_token(&self) -> Result<JoinToken, String> {
        let text = match &self.control_plane.token {
            TokenSource::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the join token file {}: {e}", p.display()))?,
            TokenSource::Env(v) => {
                std::env::var(v).map_err(|_| format!("the join token variable {v} is not set"))?
            }
            TokenSource::K8s(p) => {
                return Err(format!(
                    "{} holds a service-account token, not a join token",
                    p.display()
                ));
            }
        };
        JoinToken::parse(&text).map_err(|e| e.to_string())
    }

    /// Checks a freshly issued chain against our own ID and the bundle, then publishes it.
    fn accept(&self, issued: IssuedChain, key: &SecretKey) -> Result<(), AcceptError> {
        let mut set = (**self.bundles.load()).clone();
        set.insert(issued.bundle.clone());
        let info = verify_chain(
            &issued.chain,
            &set,
            rustls_pki_types::UnixTime::now(),
            Usage::Client,
            &algorithms(),
        )
        .map_err(|e| AcceptError::Verify(e.to_string()))?;
        if info.id != self.id {
            return Err(AcceptError::WrongId {
                got: info.id.to_string(),
                want: self.id.to_string(),
            });
        }
        let svid = Svid::new(issued.chain, key).map_err(|e| AcceptError::Tls(e.to_string()))?;
        self.bundles.store(Arc::new(set));
        // RFC 3339 in the log, as everywhere else (not `time`'s own display).
        let not_after = svid
            .info
            .not_after
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| svid.info.not_after.to_string());
        info!(serial = %svid.info.serial, %not_after, "SVID installed");
        if let Ok(mut t) = self.renew_at.lock() {
            let now = OffsetDateTime::now_utc();
            *t = now + (svid.info.not_after - now) * jitter_fraction();
        }
        self.set_error(None);
        if let Ok(mut t) = self.expired_at.lock() {
            *t = None;
        }
        self.creds.set(svid);
        self.ready.send_replace(true);
        Ok(())
    }

    fn count(&self, ok: bool) {
        self.metrics
            .rotations
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// Obtains a first SVID (or a new one after expiry): with the join token, or by
    /// Kubernetes attestation with the service-account token the kubelet keeps fresh, read
    /// again on every attempt (so a restarted or expired sidecar re-attests by itself).
    async fn bootstrap(&self) -> Result<(), String> {
        let key = SecretKey::generate().map_err(|e| e.to_string())?;
        let ttl = self.control_plane.svid_ttl;
        let issued = match &self.control_plane.token {
            TokenSource::K8s(path) => {
                let jwt = std::fs::read_to_string(path).map_err(|e| {
                    format!(
                        "cannot read the service-account token {}: {e}",
                        path.display()
                    )
                })?;
                let pin = self
                    .control_plane
                    .ca_pin
                    .as_deref()
                    .ok_or("control_plane.ca_pin is not set")?;
                self.client
                    .bootstrap_k8s(&jwt, pin, &key, &self.id, ttl)
                    .await
            }
            _ => {
                let token = self.read_token()?;
                self.client.bootstrap(&token, &key, &self.id, ttl).await
            }
        }
        .map_err(|e| e.to_string())?;
        self.accept(issued, &key).map_err(|e| e.to_string())
    }

    async fn renew(&self) -> Result<(), String> {
        let key = SecretKey::generate().map_err(|e| e.to_string())?;
        let issued = self
            .client
            .renew(
                self.bundles.clone(),
                self.creds.clone(),
                &key,
                &self.id,
                self.control_plane.svid_ttl,
            )
            .await
            .map_err(|e| e.to_string())?;
        self.accept(issued, &key).map_err(|e| e.to_string())
    }

    fn expire_if_due(&self) -> bool {
        match self.creds.get() {
            Some(s) if s.info.not_after <= OffsetDateTime::now_utc() => {
                warn!(serial = %s.info.serial, "SVID expired without renewal: failing closed");
                if let Ok(mut t) = self.expired_at.lock() {
                    *t = Some(s.info.not_after);
                }
                self.creds.clear();
                self.ready.send_replace(false);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// What a new join token would change: the token file's content (`None` for a token in
    /// the environment, which only a restart changes).
    fn token_stamp(&self) -> Option<Vec<u8>> {
        match &self.control_plane.token {
            TokenSource::File(p) | TokenSource::K8s(p) => std::fs::read(p).ok(),
            TokenSource::Env(_) => None,
        }
    }

    /// Resolves when the token file no longer holds `seen` (polled every [`TOKEN_POLL`]).
    async fn token_changed(&self, seen: Option<Vec<u8>>) {
        if matches!(self.control_plane.token, TokenSource::Env(_)) {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(TOKEN_POLL).await;
            if self.token_stamp() != seen {
                return;
            }
        }
    }

    /// One bootstrap attempt; on failure, waits for the bootstrap retry schedule or for a new
    /// token in the token file, whichever comes first. Returns false at shutdown.
    async fn bootstrap_or_wait(
        &self,
        failures: &mut u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> bool {
        let seen = self.token_stamp();
        match self.bootstrap().await {
            Ok(()) => {
                self.count(true);
                *failures = 0;
                true
            }
            Err(e) => {
                self.count(false);
                let wait = retry::bootstrap_delay(*failures, random_unit());
                *failures = failures.saturating_add(1);
                warn!(error = %e, retry_in_s = wait.as_secs_f64(), "bootstrap failed; retrying, and at once when the token file changes");
                self.set_error(Some(format!("bootstrap failed: {e}")));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => true,
                    _ = self.token_changed(seen) => {
                        info!("the join token file changed: bootstrapping now");
                        true
                    }
                    _ = shutdown.changed() => false,
                }
            }
        }
    }

    /// Keeps an SVID: bootstrap, then renew at half-life (+-10 %) for as long as the sidecar
    /// runs, retrying a failed renewal on [`retry::renew_delay`]'s schedule (never more than a
    /// quarter of the time left) until expiry. Stops when `shutdown` flips.
    pub async fn maintain(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut boot_failures = 0u32;
        let mut renew_failures = 0u32;
        loop {
            if self.expire_if_due() {
                // No valid SVID: only a (new) join token or a service-account token can help.
                renew_failures = 0;
                if !self
                    .bootstrap_or_wait(&mut boot_failures, &mut shutdown)
                    .await
                {
                    return;
                }
                continue;
            }
            let Some(svid) = self.creds.get() else {
                continue;
            };
            let renew_at = self
                .renew_at
                .lock()
                .map(|t| *t)
                .unwrap_or(svid.info.not_before);
            let now = OffsetDateTime::now_utc();
            let wait = if now < renew_at {
                left_until(renew_at)
            } else {
                // An attempt that hangs must not hold the sidecar past expiry.
                let left = left_until(svid.info.not_after);
                let r = match tokio::time::timeout(left, self.renew()).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer in the {left:?} the SVID had left")),
                };
                match r {
                    Ok(()) => {
                        self.count(true);
                        renew_failures = 0;
                        continue;
                    }
                    Err(e) => {
                        self.count(false);
                        let left = left_until(svid.info.not_after);
                        // `None`: too little life left for another attempt: wait for expiry.
                        let next =
                            retry::renew_delay(left, renew_failures, random_unit()).unwrap_or(left);
                        renew_failures = renew_failures.saturating_add(1);
                        warn!(error = %e, seconds_left = left.as_secs_f64(), retry_in_s = next.as_secs_f64(), "SVID renewal failed; still serving with the current SVID");
                        self.set_error(Some(format!("renewal failed: {e}")));
                        next
                    }
                }
            };
            // Also wake exactly at expiry to fail closed on time.
            let until_expiry = left_until(svid.info.not_after);
            tokio::select! {
                _ = tokio::time::sleep(wait.min(until_expiry)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Refreshes the trust bundle every refresh hint, over a verified connection.
    pub async fn refresh_bundles(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let hint = self
                .bundles
                .load()
                .get(self.id.trust_domain())
                .map(|b| b.refresh_hint())
                .unwrap_or(Duration::from_secs(60))
                .clamp(Duration::from_secs(5), Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(hint) => {}
                _ = shutdown.changed() => return,
            }
            if self.bundles.load().get(self.id.trust_domain()).is_none() {
                continue;
            }
            match self.client.fetch_bundle(self.bundles.clone()).await {
                Ok(b) => self.install_bundle(b),
                Err(e) => {
                    warn!(error = %e, "trust bundle refresh failed; keeping the current bundle")
                }
            }
        }
    }

    fn install_bundle(&self, b: TrustBundle) {
        let cur = self.bundles.load();
        let changed = cur
            .get(b.trust_domain())
            .map(|c| c.roots() != b.roots() || c.jwt_keys() != b.jwt_keys())
            .unwrap_or(true);
        if changed {
            info!(
                sequence = b.sequence(),
                roots = b.roots().len(),
                "trust bundle updated"
            );
            let mut set = (**cur).clone();
            set.insert(b);
            self.bundles.store(Arc::new(set));
        }
    }
}

#[cfg(test)]
mod tests {
    use mayfly_ca::testing::{Leaf, TestCa};

    use super::*;

    const ME: &str = "spiffe://mayfly.test/orders";

    /// An identity whose control plane is never dialled: SVIDs are handed to it directly.
    fn identity() -> Arc<Identity> {
        Identity::new(
            mayfly_ca::id::parse_id(ME).unwrap(),
            ControlPlane {
                address: "127.0.0.1:9".into(),
                token: TokenSource::Env("MAYFLY_TEST_UNUSED".into()),
                ca_pin: None,
                svid_ttl: None,
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    /// What the control plane would return for `leaf`.
    fn issued(ca: &TestCa, leaf: &Leaf) -> (IssuedChain, SecretKey) {
        let (chain, key) = ca.leaf(leaf);
        let issued = IssuedChain {
            chain,
            bundle: ca.bundle(),
            ttl: Duration::from_secs(300),
            serial: String::new(),
        };
        (issued, key)
    }

    fn expired(id: &str) -> Leaf {
        let now = OffsetDateTime::now_utc();
        Leaf {
            not_before: now - time::Duration::hours(2),
            not_after: now - time::Duration::hours(1),
            ..Leaf::new(id)
        }
    }

    #[test]
    fn a_bundle_whose_jwt_keys_alone_changed_is_taken() {
        let ca = TestCa::new("mayfly.test");
        let id = identity();
        id.install_bundle(ca.bundle());
        assert!(
            id.bundles
                .load()
                .iter()
                .next()
                .unwrap()
                .jwt_keys()
                .is_empty()
        );
        let key = mayfly_ca::bundle::JwtKey {
            kid: "k1".into(),
            crv: "P-256".into(),
            x: "eA".into(),
            y: "eQ".into(),
        };
        id.install_bundle(ca.bundle().with_jwt_keys(vec![key.clone()]));
        let td = mayfly_ca::id::parse_trust_domain("mayfly.test").unwrap();
        assert_eq!(id.bundles.load().get(&td).unwrap().jwt_keys(), [key]);
    }

    #[test]
    fn a_fresh_svid_is_held_and_an_expired_one_is_refused() {
        let ca = TestCa::new("mayfly.test");
        let id = identity();
        let (old, key) = issued(&ca, &expired(ME));
        assert!(matches!(id.accept(old, &key), Err(AcceptError::Verify(_))));
        assert!(!id.ready() && id.creds.get().is_none());
        assert!(id.why_not_ready().is_some());
        let (fresh, key) = issued(&ca, &Leaf::new(ME));
        id.accept(fresh, &key).unwrap();
        assert!(id.ready());
        assert_eq!(id.why_not_ready(), None);
        assert_eq!(id.creds.get().unwrap().info.id.to_string(), ME);
        assert!(id.expires_in() > 0);
        // A later expired SVID does not replace the fresh one.
        let (old, key) = issued(&ca, &expired(ME));
        assert!(id.accept(old, &key).is_err());
        assert!(id.ready());
    }

    #[test]
    fn an_svid_for_another_id_is_refused() {
        let ca = TestCa::new("mayfly.test");
        let id = identity();
        let (other, key) = issued(&ca, &Leaf::new("spiffe://mayfly.test/web"));
        assert!(matches!(
            id.accept(other, &key),
            Err(AcceptError::WrongId { .. })
        ));
        assert!(!id.ready());
    }

    #[test]
    fn an_svid_that_expires_while_held_is_dropped_and_the_identity_fails_closed() {
        let ca = TestCa::new("mayfly.test");
        let id = identity();
        let (chain, key) = ca.leaf(&expired(ME));
        id.creds.set(Svid::new(chain, &key).unwrap());
        assert!(!id.ready(), "an expired SVID counts as held");
        assert!(id.expire_if_due());
        assert!(
            id.creds.get().is_none(),
            "the expired SVID is still presented"
        );
        let why = id.why_not_ready().unwrap();
        assert!(why.contains("expired"), "{why}");
    }
}
