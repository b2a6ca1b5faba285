//! The live endpoints of each outbound's SPIFFE ID, as the control plane pushes them on the
//! watch stream (the sidecar names the IDs it has an outbound for). Kept and shown on the admin
//! listener (`GET /upstreams`); traffic still goes to each outbound's `remote`.
//!
//! A sidecar that follows the control plane's policy gets them on its policy watch; one with a
//! local policy file holds a watch for them alone ([`Upstreams::follow`]).

use std::collections::BTreeMap;
use std::sync::Arc;

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
    remote: String,
}

/// The endpoints known for each outbound's SPIFFE ID.
pub struct Upstreams {
    outbound: Vec<Entry>,
    known: ArcSwap<BTreeMap<String, Vec<String>>>,
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

    /// Takes the endpoints of a snapshot (only those of our outbounds' IDs).
    pub fn install(&self, endpoints: &BTreeMap<String, Vec<String>>) {
        let ids = self.ids();
        let mine: BTreeMap<String, Vec<String>> = endpoints
            .iter()
            .filter(|(id, _)| ids.contains(id))
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect();
        if **self.known.load() != mine {
            for id in &ids {
                let list = mine.get(id).map(|a| a.join(",")).unwrap_or_default();
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
            .cloned()
            .unwrap_or_default()
    }

    /// `GET /upstreams`: every outbound with its endpoints.
    pub fn json(&self) -> Value {
        let list: Vec<Value> = self
            .outbound
            .iter()
            .map(|o| {
                json!({
                    "name": o.name,
                    "spiffe_id": o.spiffe_id,
                    "remote": o.remote,
                    "endpoints": self.endpoints_of(&o.spiffe_id),
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
            json!(["10.0.0.5:1", "10.0.0.6:1"])
        );
        assert!(u.endpoints_of("spiffe://mayfly.local/other").is_empty());
        u.install(&BTreeMap::new());
        assert_eq!(u.json()["upstreams"][0]["endpoints"], json!([]));
    }
}
