//! End-to-end, the real `mayfly-ca` binary on 127.0.0.1:0: forged token IDs, grant expiry
//! across restarts, and the API listener's connection cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{CaProc, cli, init_dir};
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::store::{SqliteStore, Store};
use mayfly_ca::tls::Credentials;
use mayfly_ca::token::JoinToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const WEB: &str = "spiffe://mayfly.local/web";

fn client(ca: &CaProc) -> CaClient {
    CaClient::new(ca.addr.clone(), parse_trust_domain("mayfly.local").unwrap()).unwrap()
}

async fn bootstrap(ca: &CaProc, token: &str) -> Result<(), String> {
    let key = SecretKey::generate().unwrap();
    match client(ca)
        .bootstrap(
            &JoinToken::parse(token).unwrap(),
            &key,
            &parse_workload_id(WEB).unwrap(),
            None,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(ClientError::Refused { status, reason, .. }) => Err(format!("{status} {reason}")),
        Err(other) => Err(format!("other: {other}")),
    }
}

/// `token` with its `<id>` part replaced.
fn with_id(token: &str, id: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[1] = id;
    parts.join(".")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_presented_under_another_id_is_refused_and_spends_nothing() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let a = ca.token(WEB, "10m");
    let b = ca.token(WEB, "10m");
    let b_id = JoinToken::parse(&b).unwrap().id;
    for forged in [with_id(&a, "00000000"), with_id(&a, &b_id)] {
        assert_eq!(
            bootstrap(&ca, &forged).await,
            Err("401 token_unknown".into()),
            "{forged}"
        );
    }
    bootstrap(&ca, &a).await.expect("token a is still unspent");
    bootstrap(&ca, &b).await.expect("token b is still unspent");
}

const GRANT_POLICY: &str = r#"version = 1
[grants]
max_ttl = "1m"
approvals = 0

[[rule]]
name = "web-uses-db"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/db"]
"#;

/// Requests a grant that is active at once (the policy needs no approval); returns its id.
fn grant(dir: &std::path::Path, ttl: &str) -> String {
    let (ok, out, err) = cli(&[
        "grant",
        "request",
        "--data-dir",
        dir.to_str().unwrap(),
        "--from",
        WEB,
        "--to",
        "spiffe://mayfly.local/db",
        "--ttl",
        ttl,
        "--reason",
        "test",
        "--json",
    ]);
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(g["state"], "active", "{out}");
    g["id"].as_str().unwrap().to_owned()
}

/// How many `grant.expired` events name grant `id`.
fn expiries(dir: &std::path::Path, id: &str) -> usize {
    let s = SqliteStore::open(&dir.join("ca.db")).unwrap();
    s.events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "grant.expired" && e.detail.contains(id))
        .count()
}

async fn wait_for_expiry(dir: &std::path::Path, id: &str) {
    for _ in 0..300 {
        if expiries(dir, id) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no grant.expired event for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_expiry_is_recorded_once_even_across_a_restart() {
    let (tmp, dir) = init_dir("mayfly.local");
    let policy = tmp.path().join("policy.toml");
    std::fs::write(&policy, GRANT_POLICY).unwrap();
    let args = ["--policy", policy.to_str().unwrap()];
    let ca = CaProc::start(&dir, &args);
    let first = grant(&dir, "1s");
    wait_for_expiry(&dir, &first).await;
    assert!(ca.stop().success());
    let _ca = CaProc::start(&dir, &args);
    // Once the restarted control plane has recorded a later expiry, it has scanned the first.
    let second = grant(&dir, "1s");
    wait_for_expiry(&dir, &second).await;
    assert_eq!(
        expiries(&dir, &first),
        1,
        "recorded again after the restart"
    );
    assert_eq!(expiries(&dir, &second), 1);
}

/// A TLS client without a certificate that trusts the control plane's root.
async fn connector(ca: &CaProc) -> TlsConnector {
    let (ok, out, err) = cli(&["bundle", "show", "--data-dir", ca.dir.to_str().unwrap()]);
    assert!(ok, "{err}");
    let td = parse_trust_domain("mayfly.local").unwrap();
    let pin = mayfly_ca::bundle::TrustBundle::from_jwks(td, &out)
        .unwrap()
        .root_pins()[0]
        .clone();
    let c = client(ca);
    let root = c.fetch_pinned_root(&pin).await.unwrap();
    let cfg = mayfly_ca::tls::client_config(
        Credentials::new(),
        Arc::new(ArcSwap::from_pointee(BundleSet::single(root))),
        mayfly_ca::verify::IdMatcher::Exact(c.ca_id().clone()),
        &[],
    )
    .unwrap();
    TlsConnector::from(Arc::new(cfg))
}

/// A connection that completed the handshake and got an answer to `GET /v1/bundle`, kept
/// open; `None` if the server would not serve it.
async fn served(tls: &TlsConnector, ca: &CaProc) -> Option<TlsStream<TcpStream>> {
    let attempt = async {
        let tcp = TcpStream::connect(&ca.addr).await.ok()?;
        let mut s = tls.connect(mayfly_ca::tls::dial_name(), tcp).await.ok()?;
        s.write_all(b"GET /v1/bundle HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .ok()?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        head.starts_with(b"HTTP/1.1 200").then_some(s)
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
}

/// A metric's value from the control plane's `/metrics`.
async fn metric(ca: &CaProc, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(&ca.metrics).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

async fn wait_for_open(ca: &CaProc, n: f64) {
    for _ in 0..200 {
        if metric(ca, "mayfly_ca_open_connections").await == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("open connections never reached {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_and_new_ones_are_served_once_some_end() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &["--max-connections", "3", "--client-timeout", "60s"]);
    let tls = connector(&ca).await;
    wait_for_open(&ca, 0.0).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(served(&tls, &ca).await.unwrap_or_else(|| panic!("{i}")));
    }
    for _ in 0..2 {
        assert!(served(&tls, &ca).await.is_none(), "served over the cap");
    }
    assert_eq!(metric(&ca, "mayfly_ca_open_connections").await, Some(3.0));
    assert_eq!(
        metric(&ca, "mayfly_ca_connections_refused_total").await,
        Some(2.0)
    );
    held.truncate(1);
    wait_for_open(&ca, 1.0).await;
    for i in 0..2 {
        held.push(served(&tls, &ca).await.unwrap_or_else(|| panic!("{i}")));
    }
    assert_eq!(metric(&ca, "mayfly_ca_open_connections").await, Some(3.0));
}
