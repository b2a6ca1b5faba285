//! The endpoints of each outbound, and the choice among them. An outbound by identity (no
//! `remote`) is served by the live endpoints of its SPIFFE ID, as the control plane pushes them
//! on the watch stream (the sidecar names the IDs it has an outbound for); one with a static
//! `remote` by that address. Either way the same code chooses: per connection (TCP) or per
//! request attempt (HTTP), power of two choices by peak-EWMA latency x (outstanding + 1) over
//! the endpoints not ejected (`endpoint`), and every retry draws from the upstream's retry
//! budget. Shown on the admin listener (`GET /upstreams`).
//!
//! A sidecar that follows the control plane's policy gets them on its policy watch; one with a
//! local policy file holds a watch for them alone ([`Upstreams::follow`]).

mod endpoint;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::{info, warn};

pub use endpoint::{Endpoint, PeakEwma, Target, choose, p2c};

use crate::config::Outbound;
use crate::identity::Identity;
use crate::metrics::{EndpointLabels, Metrics, UpstreamMetrics};

/// Retries may add this fraction of the requests of the last [`BUDGET_WINDOW`]...
pub const BUDGET_RATIO: f32 = 0.2;
/// ...plus this many per second of it, however few requests there were.
pub const BUDGET_FLOOR_PER_SEC: u32 = 10;
/// The window the retry budget counts over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// How often a static remote's DNS names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);
/// Attempts after the first, at most, for one request or connection.
pub const MAX_RETRIES: usize = 2;

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    mayfly_ca::keys::fill_random(&mut b);
    u64::from_le_bytes(b)
}

fn jitter() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// One outbound's endpoints and retry budget.
pub struct Pool {
    name: String,
    spiffe_id: String,
    remote: Option<String>,
    /// The static remote's entries, when one is a DNS name (re-resolved by [`Upstreams::resolve`]).
    dns: Option<Vec<String>>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    budget: TpsBudget,
    metrics: Arc<Metrics>,
}

impl Pool {
    fn new(o: &Outbound, metrics: Arc<Metrics>) -> Arc<Self> {
        // IP:port entries are endpoints as they are; DNS names once resolved.
        let endpoints = o
            .remotes
            .iter()
            .filter(|r| r.parse::<std::net::SocketAddr>().is_ok())
            .map(|r| Endpoint::new(r.clone()))
            .collect();
        let named = o
            .remotes
            .iter()
            .any(|r| r.parse::<std::net::SocketAddr>().is_err());
        let pool = Arc::new(Self {
            name: o.name.clone(),
            spiffe_id: o.spiffe_id.to_string(),
            remote: o.remote.clone(),
            dns: named.then(|| o.remotes.clone()),
            endpoints: ArcSwap::from_pointee(endpoints),
            budget: TpsBudget::new(BUDGET_WINDOW, BUDGET_FLOOR_PER_SEC, BUDGET_RATIO),
            metrics,
        });
        pool.count_endpoints();
        pool
    }

    fn um(&self) -> &UpstreamMetrics {
        &self.metrics.upstream
    }

    fn count_endpoints(&self) {
        self.um()
            .endpoints
            .get_or_create(&UpstreamMetrics::of(&self.name))
            .set(self.endpoints.load().len() as i64);
    }

    /// The outbound's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The addresses of its endpoints now.
    pub fn addresses(&self) -> Vec<String> {
        self.endpoints
            .load()
            .iter()
            .map(|e| e.address().to_owned())
            .collect()
    }

    /// Replaces the set by `addrs`: an endpoint that stays keeps its counts and health; the
    /// metric series of one that left are dropped.
    fn replace(&self, addrs: &[String]) -> bool {
        let before = self.endpoints.load();
        let same =
            before.len() == addrs.len() && before.iter().zip(addrs).all(|(e, a)| e.address() == a);
        if same {
            return false;
        }
        let list: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|a| {
                before
                    .iter()
                    .find(|e| e.address() == a)
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(a.clone()))
            })
            .collect();
        for gone in before
            .iter()
            .filter(|e| !addrs.iter().any(|a| a == e.address()))
        {
            self.um().forget(&self.name, gone.address());
        }
        self.endpoints.store(Arc::new(list));
        self.count_endpoints();
        true
    }

    /// Resolves the static remote's DNS names (IP entries stay as they are) and replaces the
    /// set like a pushed one; a failed lookup keeps the last set.
    async fn resolve_once(&self, entries: &[String]) {
        let mut addrs = Vec::new();
        for e in entries {
            if e.parse::<std::net::SocketAddr>().is_ok() {
                addrs.push(e.clone());
                continue;
            }
            match tokio::net::lookup_host(e.as_str()).await {
                Ok(found) => addrs.extend(found.map(|a| a.to_string())),
                Err(err) => {
                    warn!(upstream = %self.name, remote = %e, error = %err, "cannot resolve the remote: keeping its last endpoints");
                    return;
                }
            }
        }
        addrs.sort_unstable();
        addrs.dedup();
        if self.replace(&addrs) {
            info!(upstream = %self.name, endpoints = %addrs.join(","), "resolved remote endpoints changed");
        }
    }

    /// A request or connection begins: it earns the retry budget its share.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Where the next attempt goes, avoiding the endpoints in `tried` and ejected ones when
    /// others are left (see [`choose`]); `None`: no endpoint is known.
    pub fn target(&self, tried: &[Arc<Endpoint>]) -> Option<Target> {
        let list = self.endpoints.load();
        choose(&list, tried, Instant::now(), random_u64).map(Target::new)
    }

    /// Whether attempt number `attempt` (1 for the first retry) may be made: at most
    /// [`MAX_RETRIES`], and only from the budget (counted either way).
    pub fn may_retry(&self, attempt: usize) -> bool {
        if attempt > MAX_RETRIES {
            return false;
        }
        let labels = UpstreamMetrics::of(&self.name);
        if self.budget.withdraw() {
            self.um().retries.get_or_create(&labels).inc();
            true
        } else {
            self.um().budget_exhausted.get_or_create(&labels).inc();
            warn!(upstream = %self.name, "retry budget exhausted: not retrying");
            false
        }
    }

    /// An attempt on `e` failed to connect, to handshake or was reset (`why`): ejected.
    pub fn failed(&self, e: &Endpoint, why: &str) {
        let (failures, backoff) = e.failed(Instant::now(), jitter());
        self.um()
            .ejections
            .get_or_create(&EndpointLabels {
                upstream: self.name.clone(),
                endpoint: e.address().to_owned(),
            })
            .inc();
        warn!(upstream = %self.name, endpoint = %e.address(), failures, backoff_ms = backoff.as_millis() as u64, error = %why, "endpoint ejected");
    }

    /// An attempt on `e` was answered after `rtt` with `status` (`None`: no answer).
    pub fn answered(&self, e: &Endpoint, status: Option<u16>, rtt: Duration) {
        if status.is_some() {
            e.succeeded(rtt, Instant::now());
        }
        self.um()
            .answered(e.series(&self.name), status, rtt.as_secs_f64());
    }

    /// An attempt on `e` got no answer within its request's deadline, after `waited`: its
    /// latency estimate takes that wait (a peak), and it counts as an `error` answer.
    pub fn timed_out(&self, e: &Endpoint, waited: Duration) {
        e.observe(waited, Instant::now());
        self.um()
            .answered(e.series(&self.name), None, waited.as_secs_f64());
    }

    /// A TCP connection to `e` was established after `rtt`.
    pub fn connected(&self, e: &Endpoint, rtt: Duration) {
        e.succeeded(rtt, Instant::now());
    }

    fn json(&self) -> Value {
        let now = Instant::now();
        let endpoints: Vec<Value> = self
            .endpoints
            .load()
            .iter()
            .map(|e| {
                let s = e.snapshot(now);
                let mut v = json!({
                    "address": e.address(),
                    "state": if s.ejected.is_some() { "ejected" } else { "active" },
                    "outstanding": s.outstanding,
                    "latency_ms": (s.latency_ms * 1000.0).round() / 1000.0,
                });
                if let Some((until, failures)) = s.ejected {
                    v["until"] = until
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default()
                        .into();
                    v["failures"] = failures.into();
                }
                v
            })
            .collect();
        json!({
            "name": self.name,
            "spiffe_id": self.spiffe_id,
            "remote": self.remote,
            "endpoints": endpoints,
        })
    }
}

/// The endpoints of every outbound.
pub struct Upstreams {
    pools: std::sync::RwLock<Vec<Arc<Pool>>>,
    metrics: Arc<Metrics>,
}

impl Upstreams {
    /// For the configured outbounds: static remotes known, nothing pushed yet.
    pub fn new(outbound: &[Outbound], metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            pools: std::sync::RwLock::new(
                outbound
                    .iter()
                    .map(|o| Pool::new(o, metrics.clone()))
                    .collect(),
            ),
            metrics,
        })
    }

    fn pools(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Pool>>> {
        self.pools
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool of the outbound named `name`.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools().iter().find(|p| p.name == name).cloned()
    }

    /// The pool of `o`, added if it was not configured when this was made.
    pub fn pool_for(&self, o: &Outbound) -> Arc<Pool> {
        if let Some(p) = self.pool(&o.name) {
            return p;
        }
        let mut pools = self
            .pools
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = Pool::new(o, self.metrics.clone());
        pools.push(p.clone());
        p
    }

    /// The SPIFFE IDs to ask endpoints for, each once.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.pools().iter().map(|p| p.spiffe_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Takes the endpoints of a snapshot (only those of our outbounds' IDs). An endpoint that
    /// stays keeps its counts and health.
    pub fn install(&self, endpoints: &BTreeMap<String, Vec<String>>) {
        for p in self.pools().iter().filter(|p| p.remote.is_none()) {
            let addrs = endpoints.get(&p.spiffe_id).cloned().unwrap_or_default();
            if p.replace(&addrs) {
                info!(upstream = %p.name, spiffe_id = %p.spiffe_id, endpoints = %addrs.join(","), "upstream endpoints changed");
            }
        }
    }

    /// The live endpoints known for `spiffe_id`.
    pub fn endpoints_of(&self, spiffe_id: &str) -> Vec<String> {
        self.pools()
            .iter()
            .find(|p| p.remote.is_none() && p.spiffe_id == spiffe_id)
            .map(|p| p.addresses())
            .unwrap_or_default()
    }

    /// `GET /upstreams`: every outbound with its endpoints: state, load and latency.
    pub fn json(&self) -> Value {
        let list: Vec<Value> = self.pools().iter().map(|p| p.json()).collect();
        json!({ "upstreams": list })
    }

    /// Re-resolves every static remote that names a DNS host (a Kubernetes headless service)
    /// at once and every [`RESOLVE_EVERY`], until `shutdown`.
    pub async fn resolve(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let named: Vec<(Arc<Pool>, Vec<String>)> = self
            .pools()
            .iter()
            .filter_map(|p| Some((p.clone(), p.dns.clone()?)))
            .collect();
        if named.is_empty() {
            return;
        }
        loop {
            for (p, entries) in &named {
                p.resolve_once(entries).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(RESOLVE_EVERY) => {}
                r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
            }
        }
    }

    /// For a sidecar with a local policy: holds a watch for the endpoints alone (its policy
    /// and grants are ignored), reconnecting on the policy watch's schedule, until `shutdown`.
    pub async fn follow(
        self: Arc<Self>,
        identity: Arc<Identity>,
        client: mayfly_ca::client::CaClient,
        shutdown: watch::Receiver<bool>,
    ) {
        let ids = self.ids();
        crate::follow::follow(
            identity,
            client,
            ids,
            shutdown,
            |snap| self.install(&snap.endpoints),
            |e, _| warn!(error = %e, "upstream endpoint watch interrupted; keeping the last endpoints"),
        )
        .await;
    }
}

#[cfg(test)]
mod tests;
