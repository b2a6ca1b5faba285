//! The sidecar's connection layer: its listeners ([`listen`]: bound at start, listening once
//! the sidecar is ready, each served by [`mayfly_ca::accept`] with the connection limit and
//! one span per connection), the inbound TLS handshake and its failure reasons
//! ([`handshake`]), and what every connection shares (this module: [`Shared`], [`OpenGuard`],
//! the first fields of every audit record). Beneath it, as peers that never refer to each
//! other: the L4 proxy ([`tcp`]) and the HTTP-aware proxy ([`http`]).

pub mod handshake;
pub mod http;
pub mod listen;
pub mod tcp;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Semaphore, watch};

use crate::config::Limits;
use crate::identity::Identity;
use crate::metrics::{DirLabels, Direction, Metrics};
use crate::policy::PolicyState;

/// What every connection task shares.
pub struct Shared {
    /// Our identity.
    pub identity: Arc<Identity>,
    /// The policy in force.
    pub policy: Arc<PolicyState>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Timeouts and limits.
    pub limits: Limits,
    /// Flips when a graceful shutdown starts: HTTP connections are drained (GOAWAY,
    /// `Connection: close`) so that callers move to another replica at once.
    pub draining: watch::Receiver<bool>,
    /// Flips when the drain deadline has passed: open connections end.
    pub hard_stop: watch::Receiver<bool>,
    /// Bounds concurrent connections.
    pub slots: Arc<Semaphore>,
    /// The audit trail.
    pub audit: Arc<crate::audit::Auditor>,
    /// The live endpoints of the outbounds by identity, and the choice among them.
    pub upstreams: Arc<crate::upstreams::Upstreams>,
}

/// The fields every audit record of a connection or request starts with.
pub(crate) fn audit_base(
    direction: Direction,
    local: &str,
    peer: &str,
    peer_addr: Option<String>,
    peer_serial: Option<&str>,
    protocol: &'static str,
) -> serde_json::Map<String, serde_json::Value> {
    audit_base_fields(
        direction,
        local,
        peer,
        peer_addr.as_deref(),
        peer_serial,
        protocol,
    )
    .into_map()
}

/// [`audit_base`] built once per connection for its requests' records: each request's record
/// shares these strings instead of copying them.
pub fn audit_base_fields(
    direction: Direction,
    local: &str,
    peer: &str,
    peer_addr: Option<&str>,
    peer_serial: Option<&str>,
    protocol: &'static str,
) -> crate::audit::FieldList {
    use crate::audit::Field;
    let mut f = crate::audit::FieldList::with_capacity(6);
    f.insert(
        "direction",
        Field::Static(match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }),
    );
    f.insert("local_id", Field::Shared(local.into()));
    f.insert("peer_id", Field::Shared(peer.into()));
    if let Some(a) = peer_addr {
        f.insert("peer_addr", Field::Shared(a.into()));
    }
    if let Some(s) = peer_serial {
        f.insert("peer_serial", Field::Shared(s.into()));
    }
    f.insert("protocol", Field::Static(protocol));
    f
}

/// A tokio Instant for a wall-clock time (peer SVID expiry).
pub(crate) fn instant_at(t: OffsetDateTime) -> tokio::time::Instant {
    let left = (t - OffsetDateTime::now_utc()).as_seconds_f64().max(0.0);
    tokio::time::Instant::now() + Duration::from_secs_f64(left.min(1e9))
}

/// Counts a connection in the open-connections gauge while it lives.
pub(crate) struct OpenGuard(Arc<Metrics>, Direction);

impl OpenGuard {
    pub(crate) fn new(m: Arc<Metrics>, direction: Direction) -> Self {
        m.open.get_or_create(&DirLabels { direction }).inc();
        Self(m, direction)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .open
            .get_or_create(&DirLabels { direction: self.1 })
            .dec();
    }
}
