//! Sidecar metrics on the admin listener: OpenMetrics 1.0 for a scraper that asks for it
//! (Prometheus does), the Prometheus text format 0.0.4 otherwise (curl, promtool, older agents).
//!
//! Each request (HTTP mode) or connection (TCP mode) counts **one** policy decision in
//! `requests_total` / `connections_total`; an allowed one that then fails (the app or the
//! upstream unreachable) also counts one failure in `request_failures_total` /
//! `connection_failures_total`, never a second decision.

use std::sync::atomic::{AtomicU64, Ordering};

pub use mayfly_ca::exposition::{Format, openmetrics_to_text};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod peer;
mod upstream;
pub use peer::{MeshMetrics, PeerClassLabels, PeerLabels, PeerSeries};
pub use upstream::{ClassLabels, EndpointLabels, EndpointSeries, UpstreamLabels, UpstreamMetrics};

/// Traffic direction.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Peer sidecar -> this sidecar -> local app.
    Inbound,
    /// Local app -> this sidecar -> peer sidecar.
    Outbound,
}

impl Direction {
    /// `inbound` or `outbound`, as label values are spelled (lowercase, like every other one).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

/// Outcomes that follow an allowed decision: counted as failures, not as a second decision.
const FAILURES: [&str; 7] = [
    "app_unreachable",
    "bad_request_body",
    "timeout",
    "no_endpoint",
    "upstream_unreachable",
    "upstream_error",
    "remote_unreachable",
];

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

/// Labels of a completed handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KxLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// The key exchange group, as IANA names it: X25519MLKEM768, X25519, secp256r1...
    pub group: String,
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

/// Labels of the control-plane address in use.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AddressLabels {
    /// `IP:PORT`.
    pub address: String,
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
    /// Per upstream and endpoint.
    pub upstream: UpstreamMetrics,
    /// Request latency and outcomes by peer (the `mayfly_` families).
    pub mesh: MeshMetrics,
    registry: Registry,
    /// Connections by direction and decision.
    pub connections: Family<ConnLabels, Counter>,
    /// HTTP requests by direction and decision.
    pub requests: Family<ConnLabels, Counter>,
    /// Allowed HTTP requests that failed, by direction and reason.
    pub request_failures: Family<FailLabels, Counter>,
    /// Allowed connections that failed, by direction and reason.
    pub connection_failures: Family<FailLabels, Counter>,
    /// Completed TLS handshakes by direction and key exchange group.
    pub handshakes: Family<KxLabels, Counter>,
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
    /// Audit records dropped (drop mode, spool full, or a writer that fell behind).
    pub audit_dropped: Counter,
    /// The dropped total already counted in `audit_dropped`.
    audit_dropped_seen: AtomicU64,
    /// 1 for the control-plane address in use (the replica that answered last).
    pub control_plane_address: Family<AddressLabels, Gauge>,
    /// Changes of the control-plane address in use to another replica.
    pub control_plane_failovers: Counter,
    /// The failover total already counted in `control_plane_failovers`.
    failovers_seen: AtomicU64,
    /// X.509-SVIDs handed to the app over the Workload API, by push (start, rotation, bundle).
    pub workload_api_svids: Family<PushLabels, Counter>,
    /// Workload API calls refused, by reason.
    pub workload_api_refusals: Family<ReasonLabels, Counter>,
}

/// Labels of an SVID handed out over the Workload API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabels {
    /// start (a stream's first message), rotation (a new SVID), bundle (new trust bundles).
    pub push: String,
}

/// Labels of a refusal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Short reason.
    pub reason: String,
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
            upstream: UpstreamMetrics::new(),
            mesh: MeshMetrics::new(),
            connections: Family::default(),
            requests: Family::default(),
            request_failures: Family::default(),
            connection_failures: Family::default(),
            handshakes: Family::default(),
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
            audit_dropped: Counter::default(),
            audit_dropped_seen: AtomicU64::new(0),
            workload_api_svids: Family::default(),
            workload_api_refusals: Family::default(),
            control_plane_address: Family::default(),
            control_plane_failovers: Counter::default(),
            failovers_seen: AtomicU64::new(0),
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
            "request_failures",
            "Allowed HTTP requests that failed, by direction and reason",
            m.request_failures.clone(),
        );
        r.register(
            "connection_failures",
            "Allowed connections that failed, by direction and reason",
            m.connection_failures.clone(),
        );
        r.register(
            "handshakes",
            "Completed TLS handshakes by direction and key exchange group",
            m.handshakes.clone(),
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
        m.upstream.register(&mut r);
        r.register(
            "workload_api_svids",
            "X.509-SVIDs handed to the app over the Workload API, by push",
            m.workload_api_svids.clone(),
        );
        r.register(
            "workload_api_refusals",
            "Workload API calls refused, by reason",
            m.workload_api_refusals.clone(),
        );
        r.register(
            "control_plane_address",
            "1 for the control-plane replica address in use (the one that answered last)",
            m.control_plane_address.clone(),
        );
        r.register(
            "control_plane_failovers",
            "Times the control-plane address in use changed to another replica",
            m.control_plane_failovers.clone(),
        );
        Self { registry: r, ..m }
    }

    /// Shows `in_use` as the control-plane address and brings `control_plane_failovers` up to
    /// `failovers`, the client's running count.
    pub fn control_plane_reached(&self, in_use: Option<std::net::SocketAddr>, failovers: u64) {
        let address = in_use.map(|a| a.to_string());
        let shown = address.as_ref().is_some_and(|a| {
            self.control_plane_address
                .get(&AddressLabels { address: a.clone() })
                .is_some_and(|g| g.get() == 1)
        });
        if !shown {
            self.control_plane_address.clear();
            if let Some(address) = address {
                self.control_plane_address
                    .get_or_create(&AddressLabels { address })
                    .set(1);
            }
        }
        let before = self.failovers_seen.fetch_max(failovers, Ordering::Relaxed);
        if failovers > before {
            self.control_plane_failovers.inc_by(failovers - before);
        }
    }

    /// Counts a connection's decision, or the failure of an allowed one (see the module doc).
    pub fn decision(&self, direction: Direction, decision: &str) {
        if FAILURES.contains(&decision) {
            return self.fail(&self.connection_failures, direction, decision);
        }
        self.connections
            .get_or_create(&ConnLabels {
                direction,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts a request's decision, or the failure of an allowed one (see the module doc).
    pub fn request(&self, direction: Direction, decision: &str) {
        if FAILURES.contains(&decision) {
            return self.fail(&self.request_failures, direction, decision);
        }
        self.requests
            .get_or_create(&ConnLabels {
                direction,
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts a completed handshake and its key exchange group.
    pub fn handshake(&self, direction: Direction, group: &str) {
        self.handshakes
            .get_or_create(&KxLabels {
                direction,
                group: group.to_owned(),
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

    fn fail(&self, family: &Family<FailLabels, Counter>, direction: Direction, reason: &str) {
        family
            .get_or_create(&FailLabels {
                direction,
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Counts an SVID handed to the app over the Workload API.
    pub fn workload_api_svid(&self, push: &str) {
        self.workload_api_svids
            .get_or_create(&PushLabels {
                push: push.to_owned(),
            })
            .inc();
    }

    /// Counts a refused Workload API call.
    pub fn workload_api_refused(&self, reason: &str) {
        self.workload_api_refusals
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Brings `audit_dropped` up to `total`, the spool's running count of dropped records.
    pub fn audit_dropped_reached(&self, total: u64) {
        let before = self.audit_dropped_seen.fetch_max(total, Ordering::Relaxed);
        if total > before {
            self.audit_dropped.inc_by(total - before);
        }
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        peer::encode_all(&self.registry, &self.mesh)
    }

    /// The exposition in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text => openmetrics_to_text(&self.encode()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0, text/plain")),
            Format::Text
        );
    }

    #[test]
    fn label_values_are_lowercase_and_dropped_records_a_total() {
        let m = Metrics::new();
        m.decision(Direction::Inbound, "allow");
        m.request(Direction::Outbound, "deny");
        m.audit_dropped_reached(3);
        m.audit_dropped_reached(2); // a stale total never lowers the counter
        m.audit_dropped_reached(5);
        let om = m.encode();
        assert!(om.contains("direction=\"inbound\""), "{om}");
        assert!(om.contains("direction=\"outbound\""), "{om}");
        assert!(!om.contains("Inbound") && !om.contains("Outbound"), "{om}");
        assert!(
            om.contains("\nmayfly_sidecar_audit_dropped_total 5\n"),
            "{om}"
        );
        assert!(
            om.contains("# TYPE mayfly_sidecar_audit_dropped counter\n"),
            "{om}"
        );
    }

    #[test]
    fn a_failure_after_an_allow_is_not_a_second_decision() {
        let m = Metrics::new();
        m.request(Direction::Outbound, "allow");
        m.request(Direction::Outbound, "upstream_error");
        m.decision(Direction::Inbound, "allow");
        m.decision(Direction::Inbound, "app_unreachable");
        let text = m.encode_as(Format::Text);
        let sum = |prefix: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(sum("mayfly_sidecar_requests_total{"), 1.0, "{text}");
        assert_eq!(sum("mayfly_sidecar_connections_total{"), 1.0, "{text}");
        assert_eq!(
            sum(
                "mayfly_sidecar_request_failures_total{direction=\"outbound\",reason=\"upstream_error\"}"
            ),
            1.0,
            "{text}"
        );
        assert_eq!(
            sum(
                "mayfly_sidecar_connection_failures_total{direction=\"inbound\",reason=\"app_unreachable\"}"
            ),
            1.0,
            "{text}"
        );
    }

    #[test]
    fn a_peers_requests_count_by_decision_and_class_in_mesh_buckets() {
        let m = Metrics::new();
        let web = m.mesh.peer(Direction::Inbound, "spiffe://mayfly.local/web");
        web.observe(true, 200, 0.0007);
        web.observe(true, 503, 0.2);
        web.observe(false, 403, 0.0001);
        let text = m.encode_as(Format::Text);
        let peer = "direction=\"inbound\",peer=\"spiffe://mayfly.local/web\"";
        for line in [
            format!("mayfly_requests_total{{{peer},decision=\"allow\",class=\"2xx\"}} 1"),
            format!("mayfly_requests_total{{{peer},decision=\"allow\",class=\"5xx\"}} 1"),
            format!("mayfly_requests_total{{{peer},decision=\"deny\",class=\"4xx\"}} 1"),
            format!("mayfly_request_duration_seconds_bucket{{le=\"0.0005\",{peer}}} 1"),
            format!("mayfly_request_duration_seconds_bucket{{le=\"0.001\",{peer}}} 2"),
            format!("mayfly_request_duration_seconds_bucket{{le=\"10.0\",{peer}}} 3"),
            format!("mayfly_request_duration_seconds_count{{{peer}}} 3"),
        ] {
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(text.contains("\nmayfly_build_info{version=\""), "{text}");
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(m.encode().ends_with("# EOF\n"));
    }

    #[test]
    fn the_text_format_names_counters_by_their_samples() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total{a=\"b\"} 1\nx_requests_created{a=\"b\"} 1.7e9\n# HELP x_open Open.\n# TYPE x_open gauge\n# UNIT x_open connections\nx_open 2\n# TYPE x_u unknown\nx_u 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total{a=\"b\"} 1\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 2\n# TYPE x_u untyped\nx_u 1\n"
        );
    }
}
