//! The live endpoints of each outbound's SPIFFE ID, as the control plane pushes them on the
//! watch stream (the sidecar names the IDs it has an outbound for), and the choice among them:
//! an outbound without `remote` takes, per connection (TCP) or per request (HTTP), the less
//! loaded of two endpoints drawn at random (power of two choices, by outstanding connections
//! or requests). Shown on the admin listener (`GET /upstreams`) with each endpoint's load.
//!
//! A sidecar that follows the control plane's policy gets them on its policy watch; one with a
//! local policy file holds a watch for them alone ([`Upstreams::follow`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Outbound;
use crate::identity::Identity;

/// One outbound, as `/upstreams` shows it.
struct Entry {
    name: String,
    spiffe_id: String,
    remote: Option<String>,
}

/// One live endpoint and its outstanding connections and requests. Kept across updates of
/// the set while its address stays in it, so its count survives them.
pub struct Endpoint {
    address: String,
    outstanding: AtomicUsize,
}

impl Endpoint {
    /// Connections (TCP) and requests (HTTP) in flight to it.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }
}

/// Where one connection or request goes: a static `remote`, or a chosen endpoint counted as
/// outstanding until this is dropped.
pub enum Target<'a> {
    /// The outbound's static `remote`.
    Static(&'a str),
    /// An endpoint chosen among those registered under the outbound's SPIFFE ID.
    Chosen(Arc<Endpoint>),
}

impl Target<'_> {
    /// The address to dial.
    pub fn address(&self) -> &str {
        match self {
            Target::Static(a) => a,
            Target::Chosen(e) => &e.address,
        }
    }
}

impl Drop for Target<'_> {
    fn drop(&mut self) {
        if let Target::Chosen(e) = self {
            e.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Two distinct indexes below `n` (`n >= 2`) from the random `r`.
fn two_of(n: usize, r: u64) -> (usize, usize) {
    let n64 = n as u64;
    let i = (r % n64) as usize;
    let j = (i + 1 + ((r / n64) % (n64 - 1)) as usize) % n;
    (i, j)
}

/// Power of two choices over `items` by `load`: the less loaded of two distinct entries drawn
/// by the random `r` (the first on a tie; `r` is called only then); the only entry when there
/// is one; `None` when there is none.
pub fn p2c<T>(items: &[T], load: impl Fn(&T) -> usize, r: impl FnOnce() -> u64) -> Option<usize> {
    match items.len() {
        0 => None,
        1 => Some(0),
        n => {
            let (i, j) = two_of(n, r());
            Some(if load(&items[j]) < load(&items[i]) {
                j
            } else {
                i
            })
        }
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    mayfly_ca::keys::fill_random(&mut b);
    u64::from_le_bytes(b)
}

/// The endpoints known for each outbound's SPIFFE ID.
pub struct Upstreams {
    outbound: Vec<Entry>,
    known: ArcSwap<BTreeMap<String, Vec<Arc<Endpoint>>>>,
}

impl Upstreams {
    /// For the configured outbounds; nothing known yet.
    pub fn new(outbound: &[Outbound]) -> Arc<Self> {
        Arc::new(Self {
            outbound: outbound
                .iter()
                .map(|o| Entry {
                    name: o.name.clone(),
                    spiffe_id: o.spiffe_id.to_string(),
                    remote: o.remote.clone(),
                })
                .collect(),
            known: ArcSwap::from_pointee(BTreeMap::new()),
        })
    }

    /// The SPIFFE IDs to ask endpoints for, each once.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.outbound.iter().map(|o| o.spiffe_id.clone()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Takes the endpoints of a snapshot (only those of our outbounds' IDs). An endpoint that
    /// stays keeps its outstanding count.
    pub fn install(&self, endpoints: &BTreeMap<String, Vec<String>>) {
        let ids = self.ids();
        let before = self.known.load();
        let mine: BTreeMap<String, Vec<Arc<Endpoint>>> = endpoints
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, addrs)| {
                let old = before.get(id);
                let list = addrs
                    .iter()
                    .map(|a| {
                        old.and_then(|o| o.iter().find(|e| &e.address == a))
                            .cloned()
                            .unwrap_or_else(|| {
                                Arc::new(Endpoint {
                                    address: a.clone(),
                                    outstanding: AtomicUsize::new(0),
                                })
                            })
                    })
                    .collect();
                (id.clone(), list)
            })
            .collect();
        let addrs = |m: &BTreeMap<String, Vec<Arc<Endpoint>>>| -> BTreeMap<String, Vec<String>> {
            m.iter()
                .map(|(id, l)| (id.clone(), l.iter().map(|e| e.address.clone()).collect()))
                .collect()
        };
        if addrs(&before) != addrs(&mine) {
            for id in &ids {
                let list = endpoints_list(mine.get(id));
                info!(spiffe_id = %id, endpoints = %list, "upstream endpoints changed");
            }
            self.known.store(Arc::new(mine));
        }
    }

    /// The live endpoints known for `spiffe_id`.
    pub fn endpoints_of(&self, spiffe_id: &str) -> Vec<String> {
        self.known
            .load()
            .get(spiffe_id)
            .map(|l| l.iter().map(|e| e.address.clone()).collect())
            .unwrap_or_default()
    }

    /// Where the next connection or request of an outbound goes: its static `remote`, else
    /// one of the endpoints under `spiffe_id` by power of two choices (`None`: none known).
    pub fn target<'a>(&self, remote: Option<&'a str>, spiffe_id: &str) -> Option<Target<'a>> {
        if let Some(r) = remote {
            return Some(Target::Static(r));
        }
        let known = self.known.load();
        let list = known.get(spiffe_id)?;
        let e = list
            .get(p2c(list, |e| e.outstanding(), random_u64)?)?
            .clone();
        e.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Target::Chosen(e))
    }

    /// `GET /upstreams`: every outbound with its endpoints and their outstanding counts.
    pub fn json(&self) -> Value {
        let known = self.known.load();
        let list: Vec<Value> = self
            .outbound
            .iter()
            .map(|o| {
                let endpoints: Vec<Value> = known
                    .get(&o.spiffe_id)
                    .map(|l| {
                        l.iter()
                            .map(|e| json!({"address": e.address, "outstanding": e.outstanding()}))
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "name": o.name,
                    "spiffe_id": o.spiffe_id,
                    "remote": o.remote,
                    "endpoints": endpoints,
                })
            })
            .collect();
        json!({ "upstreams": list })
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

fn endpoints_list(l: Option<&Vec<Arc<Endpoint>>>) -> String {
    l.map(|l| {
        l.iter()
            .map(|e| e.address.as_str())
            .collect::<Vec<_>>()
            .join(",")
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_the_endpoints_of_our_outbounds_ids_are_kept_and_shown() {
        let cfg = crate::config::Config::parse(
            "spiffe_id = \"spiffe://mayfly.local/web\"\n[control_plane]\naddress = \"127.0.0.1:1\"\ntoken_file = \"t\"\n[[outbound]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\nremote = \"127.0.0.1:2\"\nspiffe_id = \"spiffe://mayfly.local/orders\"\n",
            "s.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        let u = Upstreams::new(&cfg.outbound);
        assert_eq!(u.ids(), ["spiffe://mayfly.local/orders"]);
        let mut pushed = BTreeMap::new();
        pushed.insert(
            "spiffe://mayfly.local/orders".to_owned(),
            vec!["10.0.0.5:1".to_owned(), "10.0.0.6:1".to_owned()],
        );
        pushed.insert(
            "spiffe://mayfly.local/other".to_owned(),
            vec!["10.0.0.7:1".to_owned()],
        );
        u.install(&pushed);
        let v = u.json();
        assert_eq!(v["upstreams"][0]["name"], "orders");
        assert_eq!(
            v["upstreams"][0]["endpoints"],
            json!([{"address": "10.0.0.5:1", "outstanding": 0}, {"address": "10.0.0.6:1", "outstanding": 0}])
        );
        assert!(u.endpoints_of("spiffe://mayfly.local/other").is_empty());
        u.install(&BTreeMap::new());
        assert_eq!(u.json()["upstreams"][0]["endpoints"], json!([]));
    }

    fn orders(remote: &str) -> Arc<Upstreams> {
        let cfg = crate::config::Config::parse(
            &format!("spiffe_id = \"spiffe://mayfly.local/web\"\n[control_plane]\naddress = \"127.0.0.1:1\"\ntoken_file = \"t\"\n[[outbound]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\n{remote}spiffe_id = \"spiffe://mayfly.local/orders\"\n"),
            "s.toml",
            std::path::Path::new("."),
        )
        .unwrap();
        Upstreams::new(&cfg.outbound)
    }

    #[test]
    fn power_of_two_choices_never_takes_the_more_loaded_of_the_two_it_drew() {
        assert_eq!(p2c(&[] as &[usize], |l| *l, || 7), None);
        for r in 0..1000u64 {
            assert_eq!(p2c(&[9], |l| *l, || r), Some(0));
            for loads in [[0usize, 5, 2, 2, 7], [3, 3, 3, 3, 3], [9, 0, 4, 1, 6]] {
                let (i, j) = two_of(loads.len(), r);
                assert_ne!(i, j);
                let got = p2c(&loads, |l| *l, || r).unwrap();
                assert!(got == i || got == j);
                assert_eq!(loads[got], loads[i].min(loads[j]), "{loads:?} r={r}");
            }
        }
        // Every endpoint is drawn, and every pair of them.
        let mut pairs = std::collections::BTreeSet::new();
        for r in 0..1000u64 {
            pairs.insert(two_of(4, r));
        }
        assert_eq!(pairs.len(), 12);
    }

    #[test]
    fn an_outbound_by_identity_counts_its_targets_and_prefers_the_idle_endpoint() {
        let u = orders("");
        assert!(u.target(None, "spiffe://mayfly.local/orders").is_none());
        let mut pushed = BTreeMap::new();
        pushed.insert(
            "spiffe://mayfly.local/orders".to_owned(),
            vec!["10.0.0.5:1".to_owned(), "10.0.0.6:1".to_owned()],
        );
        u.install(&pushed);
        let first = u.target(None, "spiffe://mayfly.local/orders").unwrap();
        // With one endpoint busy, the two drawn are both endpoints: the idle one wins.
        for _ in 0..20 {
            let t = u.target(None, "spiffe://mayfly.local/orders").unwrap();
            assert_ne!(t.address(), first.address());
        }
        let shown = u.json();
        let busy = shown["upstreams"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == first.address())
            .unwrap()
            .clone();
        assert_eq!(busy["outstanding"], 1);
        // The count survives an update that keeps the endpoint, and ends with the target.
        u.install(&pushed);
        assert_eq!(u.json(), shown);
        drop(first);
        for e in u.json()["upstreams"][0]["endpoints"].as_array().unwrap() {
            assert_eq!(e["outstanding"], 0);
        }
        // A static remote is taken as it is.
        let s = orders("remote = \"127.0.0.1:9\"\n");
        let t = s
            .target(Some("127.0.0.1:9"), "spiffe://mayfly.local/orders")
            .unwrap();
        assert_eq!(t.address(), "127.0.0.1:9");
    }
}
