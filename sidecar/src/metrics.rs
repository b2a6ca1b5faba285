//! Sidecar metrics (Prometheus text on the admin listener).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Traffic direction.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    /// Peer sidecar -> this sidecar -> local app.
    Inbound,
    /// Local app -> this sidecar -> peer sidecar.
    Outbound,
}

/// Labels of a connection decision.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// allow, deny, dry_run_deny, error.
    pub decision: String,
}

/// Labels of a failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// Short reason.
    pub reason: String,
}

/// Labels with a direction only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// inbound or outbound.
    pub direction: Direction,
}

/// Labels of a rotation attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// ok or error.
    pub result: String,
}

/// Labels of why connections ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// done, idle, peer_svid_expired, policy_revoked, shutdown, error.
    pub reason: String,
}

/// Every sidecar metric.
pub struct Metrics {
    registry: Registry,
    /// Connections by direction and decision.
    pub connections: Family<ConnLabels, Counter>,
    /// HTTP requests by direction and decision.
    pub requests: Family<ConnLabels, Counter>,
    /// TLS handshake failures by direction and reason.
    pub handshake_failures: Family<FailLabels, Counter>,
    /// Bytes from the peer side towards the app side, by direction.
    pub bytes_in: Family<DirLabels, Counter>,
    /// Bytes from the app side towards the peer side, by direction.
    pub bytes_out: Family<DirLabels, Counter>,
    /// Open connections by direction.
    pub open: Family<DirLabels, Gauge>,
    /// Why connections ended.
    pub ended: Family<EndLabels, Counter>,
    /// Seconds until the current SVID expires (negative when none).
    pub svid_expiry: Gauge,
    /// SVID bootstraps and renewals by result.
    pub rotations: Family<ResultLabels, Counter>,
    /// Policy reloads by result.
    pub policy_reloads: Family<ResultLabels, Counter>,
    /// Grants from the control plane refused because a path does not parse.
    pub grants_rejected: Counter,
    /// Audit records written to the spool.
    pub audit_records: Counter,
    /// Bytes of audit records not yet acknowledged by the control plane.
    pub audit_spool_bytes: Gauge,
    /// Audit records dropped (drop mode, spool full).
    pub audit_dropped: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("mayfly_sidecar");
        let m = Self {
            connections: Family::default(),
            requests: Family::default(),
            handshake_failures: Family::default(),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            open: Family::default(),
            ended: Family::default(),
            svid_expiry: Gauge::default(),
            rotations: Family::default(),
            policy_reloads: Family::default(),
            grants_rejected: Counter::default(),
            audit_records: Counter::default(),
            audit_spool_bytes: Gauge::default(),
            audit_dropped: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "connections",
            "Connections by direction and policy decision",
            m.connections.clone(),
        );
        r.register(
            "requests",
            "HTTP requests by direction and policy decision",
            m.requests.clone(),
        );
        r.register(
            "handshake_failures",
            "TLS handshake failures by direction and reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "bytes_to_app",
            "Bytes from the network side to the app side",
            m.bytes_in.clone(),
        );
        r.register(
            "bytes_from_app",
            "Bytes from the app side to the network side",
            m.bytes_out.clone(),
        );
        r.register("open_connections", "Open connections", m.open.clone());
        r.register(
            "connections_ended",
            "Connections ended, by reason",
            m.ended.clone(),
        );
        r.register(
            "svid_expiry_seconds",
            "Seconds until the current SVID expires",
            m.svid_expiry.clone(),
        );
        r.register(
            "svid_rotations",
            "SVID bootstraps and renewals by result",
            m.rotations.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy reloads by result",
            m.policy_reloads.clone(),
        );
        r.register(
            "grants_rejected",
            "Grants from the control plane refused because a path does not parse",
            m.grants_rejected.clone(),
        );
        r.register(
            "audit_records",
            "Audit records written to the spool",
            m.audit_records.clone(),
        );
        r.register(
            "audit_spool_bytes",
            "Bytes of audit records not yet acknowledged by the control plane",
            m.audit_spool_bytes.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit records dropped because the spool was full",
            m.audit_dropped.clone(),
        );
        Self { registry: r, ..m }
    }

    /// Counts a connection decision.
    pub fn decision(&self, direction: Direction, decision: &str) {
        self.connections
            .get_or_create(&ConnLabels {
                direction,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts an HTTP request decision.
    pub fn request(&self, direction: Direction, decision: &str) {
        self.requests
            .get_or_create(&ConnLabels {
                direction,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts a handshake failure.
    pub fn handshake_failed(&self, direction: Direction, reason: &str) {
        self.handshake_failures
            .get_or_create(&FailLabels {
                direction,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
