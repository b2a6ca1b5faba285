//! Per upstream and endpoint: responses by status class, latency, retries, the retry budget,
//! ejections and the endpoints known. Label sets are built once per endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of one upstream (an `[[outbound]]` by its name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// The outbound's name.
    pub upstream: String,
}

/// Labels of one endpoint of an upstream (bounded by the registry; dropped when it leaves).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The outbound's name.
    pub upstream: String,
    /// The endpoint's address.
    pub endpoint: String,
}

/// Labels of an upstream response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The outbound's name.
    pub upstream: String,
    /// The endpoint's address.
    pub endpoint: String,
    /// 1xx..5xx, or `error` (no answer).
    pub class: String,
}

/// Every status class an upstream response is counted under.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// The label sets of one endpoint of one upstream, one per status class and one for its
/// latency: built when the endpoint is first answered, so that an attempt allocates none.
#[derive(Debug)]
pub struct EndpointSeries {
    endpoint: EndpointLabels,
    classes: [ClassLabels; 6],
}

impl EndpointSeries {
    /// The label sets of `endpoint` under `upstream`.
    pub fn new(upstream: &str, endpoint: &str) -> Self {
        Self {
            endpoint: EndpointLabels {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
            },
            classes: CLASSES.map(|class| ClassLabels {
                upstream: upstream.to_owned(),
                endpoint: endpoint.to_owned(),
                class: class.to_owned(),
            }),
        }
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Per upstream and endpoint: responses, latency, retries, budget, ejections, endpoints.
pub struct UpstreamMetrics {
    /// Attempts by upstream, endpoint and status class.
    pub requests: Family<ClassLabels, Counter>,
    /// Time to the response head, by upstream and endpoint.
    pub latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    /// Retries by upstream.
    pub retries: Family<UpstreamLabels, Counter>,
    /// Retries refused because the upstream's retry budget was spent.
    pub budget_exhausted: Family<UpstreamLabels, Counter>,
    /// Ejections by upstream and endpoint.
    pub ejections: Family<EndpointLabels, Counter>,
    /// Endpoints known per upstream.
    pub endpoints: Family<UpstreamLabels, Gauge>,
}

impl UpstreamMetrics {
    pub(super) fn new() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            ejections: Family::default(),
            endpoints: Family::default(),
        }
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "upstream_requests",
            "Attempts sent to an upstream endpoint, by status class (error: no answer)",
            self.requests.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time from sending an attempt to its answer's head",
            self.latency.clone(),
        );
        r.register(
            "upstream_retries",
            "Attempts retried on another endpoint",
            self.retries.clone(),
        );
        r.register(
            "upstream_retry_budget_exhausted",
            "Retries not made because the upstream's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        r.register(
            "upstream_ejections",
            "Endpoints ejected after a connect, TLS or reset failure",
            self.ejections.clone(),
        );
        r.register(
            "upstream_endpoints",
            "Endpoints known per upstream",
            self.endpoints.clone(),
        );
    }

    /// Counts an attempt's answer (`status`, or `None`: no answer) after `secs`, under the
    /// endpoint's label sets (built once per endpoint, not per attempt).
    pub fn answered(&self, series: &EndpointSeries, status: Option<u16>, secs: f64) {
        let class = match status {
            Some(s @ 100..=599) => (s / 100 - 1) as usize,
            _ => CLASSES.len() - 1,
        };
        self.requests.get_or_create(&series.classes[class]).inc();
        if status.is_some() {
            self.latency.get_or_create(&series.endpoint).observe(secs);
        }
    }

    /// Drops the series of an endpoint that left its upstream.
    pub fn forget(&self, upstream: &str, endpoint: &str) {
        let e = EndpointLabels {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        self.latency.remove(&e);
        self.ejections.remove(&e);
        for class in CLASSES {
            self.requests.remove(&ClassLabels {
                upstream: e.upstream.clone(),
                endpoint: e.endpoint.clone(),
                class: class.to_owned(),
            });
        }
    }

    /// Counts an upstream event (`retries`, `budget_exhausted`) or sets `endpoints`.
    pub fn of(upstream: &str) -> UpstreamLabels {
        UpstreamLabels {
            upstream: upstream.to_owned(),
        }
    }
}
