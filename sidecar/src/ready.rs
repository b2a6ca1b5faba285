//! Readiness: one predicate for `/readyz` and for opening the listeners. The sidecar is ready
//! exactly when it would not refuse traffic for a reason of its own: it holds an unexpired
//! SVID, a policy is in force, and the audit spool takes records (or drops them, in `drop`
//! mode). Every reason it is not is reported, in words.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit::Auditor;
use crate::identity::Identity;
use crate::policy::PolicyState;

/// What readiness looks at.
#[derive(Clone)]
pub struct Readiness {
    /// The SVID.
    pub identity: Arc<Identity>,
    /// The policy.
    pub policy: Arc<PolicyState>,
    /// The audit trail.
    pub audit: Arc<Auditor>,
}

/// How often [`Readiness::wait`] re-checks (the SVID and the policy also wake it at once).
const RECHECK: Duration = Duration::from_millis(100);

impl Readiness {
    /// Why the sidecar refuses traffic now; empty when it is ready.
    pub fn reasons(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = self.identity.why_not_ready() {
            out.push(why);
        }
        if !self.policy.loaded() {
            out.push(
                "no policy in force: every connection and request would be denied (no-policy)"
                    .to_owned(),
            );
        }
        if !self.audit.admits() {
            let mut why = "audit spool full (audit.when_full = fail-closed): refusing traffic \
                           that could not be audited"
                .to_owned();
            if let Some(e) = self.audit.delivery_error() {
                why.push_str("; delivery to the control plane is failing: ");
                why.push_str(&e);
            }
            out.push(why);
        }
        out
    }

    /// Whether the sidecar is ready.
    pub fn ready(&self) -> bool {
        self.reasons().is_empty()
    }

    /// Resolves once the sidecar is ready; `false` if `stop` flipped first.
    pub async fn wait(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let mut svid = self.identity.watch_ready();
        let mut policy = self.policy.watch();
        loop {
            if self.ready() {
                return true;
            }
            tokio::select! {
                _ = svid.changed() => {}
                _ = policy.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = stop.changed() => return false,
            }
        }
    }
}
