//! The `mayfly_` request families operators and the Grafana dashboard use: latency and
//! outcomes by peer, looked up once per connection or upstream.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Direction;

/// Labels of one peer's requests in one direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// The peer's SPIFFE ID (the caller inbound, the upstream's ID outbound).
    pub peer: String,
}

/// Labels of one peer's requests by decision and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerClassLabels {
    /// inbound or outbound.
    pub direction: Direction,
    /// The peer's SPIFFE ID.
    pub peer: String,
    /// allow or deny (the policy's decision; a dry-run denial counts as deny).
    pub decision: String,
    /// 1xx..5xx.
    pub class: String,
}

/// Request latency buckets for a mesh hop: 0.5 ms to 10 s.
const REQUEST_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// The request series of one peer in one direction, looked up once per connection (inbound:
/// the peer is known at the handshake) or per upstream (outbound), so that a request only
/// touches its own counters: no label set is built or hashed per request.
pub struct PeerSeries {
    duration: Histogram,
    /// `[allow, deny]` x `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    by_class: [[Counter; 5]; 2],
}

impl PeerSeries {
    /// Counts one finished request: its decision, its status and how long it took.
    pub fn observe(&self, allowed: bool, status: u16, secs: f64) {
        self.duration.observe(secs);
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.by_class[usize::from(!allowed)][class].inc();
    }
}

/// The `mayfly_` families operators and the Grafana dashboard (`deploy/grafana/mayfly.json`)
/// use: request latency and requests by peer, decision and status class.
pub struct MeshMetrics {
    registry: Registry,
    /// `mayfly_request_duration_seconds{direction,peer}`.
    pub duration: Family<PeerLabels, Histogram, fn() -> Histogram>,
    /// `mayfly_requests_total{direction,peer,decision,class}`.
    pub requests: Family<PeerClassLabels, Counter>,
}

impl MeshMetrics {
    pub(super) fn new() -> Self {
        let mut registry = Registry::with_prefix("mayfly");
        let duration = Family::<PeerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            request_histogram,
        );
        let requests = Family::<PeerClassLabels, Counter>::default();
        registry.register(
            "request_duration_seconds",
            "HTTP request latency through this sidecar, by direction and peer SPIFFE ID",
            duration.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests answered, by direction, peer SPIFFE ID, decision and status class",
            requests.clone(),
        );
        Self {
            registry,
            duration,
            requests,
        }
    }

    /// The series of `peer`'s requests in `direction` (build once, keep the `Arc`).
    pub fn peer(&self, direction: Direction, peer: &str) -> Arc<PeerSeries> {
        let labels = PeerLabels {
            direction,
            peer: peer.to_owned(),
        };
        let duration = self.duration.get_or_create(&labels).clone();
        let counter = |decision: &str, class: &str| {
            self.requests
                .get_or_create(&PeerClassLabels {
                    direction,
                    peer: peer.to_owned(),
                    decision: decision.to_owned(),
                    class: class.to_owned(),
                })
                .clone()
        };
        let row = |d: &str| ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| counter(d, c));
        Arc::new(PeerSeries {
            duration,
            by_class: [row("allow"), row("deny")],
        })
    }
}

/// The OpenMetrics exposition of `main` (the `mayfly_sidecar_` families), then `mesh`, then
/// `mayfly_build_info` and the process metrics, then `# EOF` (empty if encoding fails).
pub(super) fn encode_all(main: &Registry, mesh: &MeshMetrics) -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut out = String::new();
    let encoded =
        encode_registry(&mut out, main).and_then(|()| encode_registry(&mut out, &mesh.registry));
    if encoded.is_err() {
        out.clear();
    }
    out.push_str(&mayfly_ca::exposition::runtime_metrics(env!(
        "CARGO_PKG_VERSION"
    )));
    if encode_eof(&mut out).is_err() {
        out.clear();
    }
    out
}
