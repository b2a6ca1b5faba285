//! Control-plane metrics, Prometheus text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label: how an SVID was obtained.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `bootstrap`, `renewal` or `self`.
    pub kind: String,
}

/// Label: why something was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Short reason code.
    pub reason: String,
}

/// Label: one authority.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabel {
    /// `root` or `intermediate`.
    pub role: String,
    /// Authority id.
    pub id: String,
    /// `prepared`, `active` or `old`.
    pub state: String,
}

/// Label: an API path.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    /// Request path (known paths only; others are `other`).
    pub path: String,
}

/// Every control-plane metric.
pub struct Metrics {
    registry: Registry,
    /// SVIDs issued.
    pub issued: Family<KindLabel, Counter>,
    /// JWT-SVIDs minted.
    pub jwt_issued: Counter,
    /// Requests refused.
    pub refused: Family<ReasonLabel, Counter>,
    /// Seconds until each authority expires.
    pub authority_expiry: Family<AuthorityLabel, Gauge>,
    /// Request latency.
    pub latency: Family<PathLabel, Histogram>,
    /// TLS handshakes that failed.
    pub handshake_failures: Counter,
    /// Audit records received from sidecars.
    pub audit_records: Counter,
    /// API connections open now.
    pub open_connections: Gauge,
    /// API connections closed at once because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Failed reads of the grants for watch snapshots (the last good grants stayed).
    pub snapshot_errors: Counter,
    /// 1 while the store can write, 0 while it cannot (disk full, I/O errors).
    pub store_writable: Gauge,
    /// Control-plane events that could not be stored (recorded as a `gap` once it can).
    pub audit_events_lost: Counter,
    /// Sidecar endpoints in the registry.
    pub endpoints_known: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mayfly_ca");
        let issued = Family::<KindLabel, Counter>::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let jwt_issued = Counter::default();
        let authority_expiry = Family::<AuthorityLabel, Gauge>::default();
        let latency = Family::<PathLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        let handshake_failures = Counter::default();
        let audit_records = Counter::default();
        let open_connections = Gauge::default();
        let connections_refused = Counter::default();
        let snapshot_errors = Counter::default();
        let store_writable = Gauge::default();
        store_writable.set(1);
        let audit_events_lost = Counter::default();
        let endpoints_known = Gauge::default();
        registry.register(
            "endpoints_known",
            "Sidecar inbound endpoints registered and not expired (or not yet swept)",
            endpoints_known.clone(),
        );
        registry.register(
            "store_writable",
            "1 while the store can write, 0 while it cannot (disk full, I/O errors)",
            store_writable.clone(),
        );
        registry.register(
            "audit_events_lost",
            "Control-plane events that could not be stored (each loss becomes a gap record once the store can write)",
            audit_events_lost.clone(),
        );
        registry.register(
            "svids_issued",
            "SVIDs issued, by how they were obtained",
            issued.clone(),
        );
        registry.register(
            "jwt_svids_issued",
            "JWT-SVIDs minted for sidecars (POST /v1/jwtsvid)",
            jwt_issued.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests refused, by reason",
            refused.clone(),
        );
        registry.register(
            "authority_expiry_timestamp_seconds",
            "When each CA authority expires (Unix seconds): alert on it minus time()",
            authority_expiry.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "API request latency",
            latency.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed",
            handshake_failures.clone(),
        );
        registry.register(
            "audit_records_received",
            "Audit records received from sidecars",
            audit_records.clone(),
        );
        registry.register(
            "open_connections",
            "API connections open now",
            open_connections.clone(),
        );
        registry.register(
            "connections_refused",
            "API connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "watch_snapshot_errors",
            "Failed reads of the grants for watch snapshots (the last good grants stayed)",
            snapshot_errors.clone(),
        );
        Self {
            store_writable,
            audit_events_lost,
            endpoints_known,
            open_connections,
            connections_refused,
            snapshot_errors,
            audit_records,
            registry,
            issued,
            jwt_issued,
            refused,
            authority_expiry,
            latency,
            handshake_failures,
        }
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabel {
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
        crate::exposition::append_metrics(
            &mut out,
            &crate::exposition::runtime_metrics(env!("CARGO_PKG_VERSION")),
        );
        out
    }
}
