//! End-to-end, the real `mayfly-ca` binary on 127.0.0.1:0: forged token IDs and grant expiry
//! across restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{CaProc, cli, init_dir};
use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::store::{SqliteStore, Store};
use mayfly_ca::token::JoinToken;

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
