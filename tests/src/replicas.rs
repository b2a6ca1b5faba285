//! Replicas of one service behind one SPIFFE ID, and a client sidecar with an outbound to them
//! by that ID (HTTP mode): each replica is its own sidecar in front of an app at a given
//! address, registered with the control plane.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::{Ca, Sidecar, Spec, eventually, policy};

/// A replica of `orders` named `name` (HTTP mode), in front of the app at `app`.
pub fn http_replica(ca: &Ca, dir: &Path, name: &str, app: &str) -> Sidecar {
    replica(ca, dir, name, app, true)
}

/// A replica of `orders` named `name` (HTTP mode if `http`, else TCP), in front of `app`.
pub fn replica(ca: &Ca, dir: &Path, name: &str, app: &str, http: bool) -> Sidecar {
    replica_as(ca, dir, "orders", name, app, http)
}

/// A sidecar named `name` holding `spiffe://mayfly.local/<me>` (HTTP mode if `http`, else
/// TCP) in front of `app`: a replica of `me`, or an impostor where `orders` is expected.
pub fn replica_as(ca: &Ca, dir: &Path, me: &str, name: &str, app: &str, http: bool) -> Sidecar {
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let token = ca.token_file(
        &format!("spiffe://mayfly.local/{me}"),
        &dir.join(format!("{name}.token")),
    );
    let config = Spec {
        me,
        ca: &ca.addr,
        token: &token,
        policy: &pol,
        inbound_app: Some(app),
        outbound: &[],
        svid_ttl: None,
        extra: &format!("[audit]\nspool_dir = \"{name}-audit\"\n"),
    }
    .toml();
    let config = if http {
        config.replace("app = ", "protocol = \"http\"\napp = ")
    } else {
        config
    };
    Sidecar::start(dir, name, &config)
}

/// `web`'s sidecar with an HTTP outbound `orders` by SPIFFE ID; `outbound_extra` is added to
/// the `[[outbound]]` table; its audit records also go to `<dir>/web-sink.jsonl`.
pub fn http_client(ca: &Ca, dir: &Path, outbound_extra: &str) -> Sidecar {
    client(ca, dir, &format!("protocol = \"http\"\n{outbound_extra}"))
}

/// `web`'s sidecar with an outbound `orders` (TCP unless `outbound_extra` says otherwise) by
/// SPIFFE ID; `outbound_extra` is added to the `[[outbound]]` table; its audit records also go
/// to `<dir>/web-sink.jsonl`.
pub fn client(ca: &Ca, dir: &Path, outbound_extra: &str) -> Sidecar {
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let token = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let sink = dir.join("web-sink.jsonl");
    let extra = format!(
        "[[outbound]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\nspiffe_id = \"spiffe://mayfly.local/orders\"\n{outbound_extra}\n[audit]\nspool_dir = \"web-audit\"\nsink = \"file:{}\"\n",
        sink.display()
    );
    let config = Spec {
        me: "web",
        ca: &ca.addr,
        token: &token,
        policy: &pol,
        inbound_app: None,
        outbound: &[],
        svid_ttl: None,
        extra: &extra,
    }
    .toml();
    Sidecar::start(dir, "web", &config)
}

/// The audit records the client sidecar wrote to its sink.
pub fn client_records(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("web-sink.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `client`'s `/upstreams` entry for its first outbound.
pub async fn upstream(client: &Sidecar) -> Value {
    let (status, body) = client.admin_get("/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["upstreams"][0].clone()
}

/// Waits until `client` knows exactly `n` endpoints for its first outbound.
pub async fn knows(client: &Sidecar, n: usize) {
    let ok = eventually(Duration::from_secs(15), async || {
        upstream(client).await["endpoints"]
            .as_array()
            .map_or(0, |a| a.len())
            == n
    });
    assert!(
        ok.await,
        "{}\n{}",
        upstream(client).await,
        client.proc.log()
    );
}
