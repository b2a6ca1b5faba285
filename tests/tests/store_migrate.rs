//! `mayfly-ca store migrate`: an SQLite store with traffic history copied into PostgreSQL;
//! every chain verifies there, tokens keep their state, and a replica started on the database
//! serves the same trust bundle. A destination that is not empty is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, Sidecar, Spec, bin, curl, echo_app, eventually, policy, round_trip};
use serde_json::Value;

/// `mayfly-ca ARGS --data-dir DIR [--store URL]`: (success, stdout, stderr).
fn ca_cli(dir: &Path, store: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut c = Command::new(bin("mayfly-ca"));
    c.args(args).arg("--data-dir").arg(dir);
    if let Some(url) = store {
        c.args(["--store", url]);
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn migrate(from: &str, to: &str) -> (bool, String) {
    let o = Command::new(bin("mayfly-ca"))
        .args(["store", "migrate", "--from", from, "--to", to])
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// `audit verify --json`: each chain with its record count, and whether all verified.
fn verified(dir: &Path, store: Option<&str>) -> (bool, Vec<(String, u64)>) {
    let (ok, out, err) = ca_cli(dir, store, &["audit", "verify", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    let mut chains: Vec<(String, u64)> = v["chains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["chain"].as_str().unwrap().to_owned(),
                c["records"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    chains.sort();
    (ok, chains)
}

/// `token list --json` through the running control plane: (id, state) pairs.
fn tokens(dir: &Path) -> Vec<(String, String)> {
    let (ok, out, err) = ca_cli(dir, None, &["token", "list", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut list: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_owned(),
                t["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

fn sidecar(
    dir: &Path,
    ca: &Ca,
    me: &'static str,
    app: Option<&str>,
    out: &[(&str, &str, &str)],
) -> Sidecar {
    let pol = dir.join("local.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let tok = ca.token_file(
        &format!("spiffe://mayfly.local/{me}"),
        &dir.join(format!("{me}.token")),
    );
    let config = Spec {
        me,
        ca: &ca.addr,
        token: &tok,
        policy: &pol,
        inbound_app: app,
        outbound: out,
        svid_ttl: None,
        extra: &format!("[audit]\nspool_dir = \"{me}-audit\"\n"),
    }
    .toml();
    Sidecar::start(dir, me, &config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_store_with_history_moves_to_postgresql_and_a_replica_there_serves_the_same_bundle()
 {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let mut ca = Ca::start(&tmp);
    let app = echo_app("orders-app").await;
    let mut orders = sidecar(dir, &ca, "orders", Some(&app), &[]);
    let orders_in = orders.inbound();
    let mut web = sidecar(dir, &ca, "web", None, &[("orders", &orders_in, "orders")]);
    let out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    for _ in 0..5 {
        round_trip(&out, b"x").await.unwrap();
    }
    // A token left unused and one revoked travel with their state.
    ca.token_file("spiffe://mayfly.local/batch", &dir.join("unused.token"));
    let revoked = ca.token_file("spiffe://mayfly.local/batch", &dir.join("revoked.token"));
    let id = std::fs::read_to_string(&revoked).unwrap();
    let id = id.trim().split('.').nth(1).unwrap().to_owned();
    assert!(ca_cli(&ca.dir, None, &["token", "revoke", &id]).0);
    let delivered = eventually(Duration::from_secs(30), async || {
        let (_, out, _) = ca_cli(
            &ca.dir,
            None,
            &["audit", "query", "--kind", "connection.open", "--json"],
        );
        out.lines().count() >= 10
    })
    .await;
    assert!(delivered, "{}", web.proc.log());
    let before_tokens = tokens(&ca.dir);
    assert!(web.proc.stop().success() && orders.proc.stop().success());
    assert!(ca.proc.as_mut().unwrap().stop().success());
    let (ok, before_chains) = verified(&ca.dir, None);
    assert!(ok && before_chains.len() >= 3, "{before_chains:?}");
    let (_, bundle_before, _) = ca_cli(&ca.dir, None, &["bundle", "show", "--format", "jwks"]);

    let pg = Postgres::start();
    let url = pg.create_db();
    let sqlite = format!("sqlite:{}", ca.dir.join("ca.db").display());
    let (ok, msg) = migrate(&sqlite, &url);
    assert!(ok, "{msg}");
    assert!(msg.contains("every chain verified"), "{msg}");
    let kek = ca.dir.join("ca.kek");
    assert_eq!(
        std::fs::metadata(&kek).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Not twice: the destination is no longer empty.
    let (ok, msg) = migrate(&sqlite, &url);
    assert!(!ok && msg.contains("not empty"), "{msg}");

    // Every chain is there, whole, and verifies.
    let (ok, after_chains) = verified(&ca.dir, Some(&url));
    assert!(ok, "{after_chains:?}");
    assert_eq!(after_chains, before_chains);

    // A replica on the database serves the same bundle (its TLS chains to the old root too),
    // and the tokens kept their state.
    let replica = Ca::start_with_existing(&tmp, &ca.dir, "127.0.0.1:0", &["--store", &url]);
    let pem = dir.join("bundle.pem");
    let (_, pem_text, _) = ca_cli(&ca.dir, None, &["bundle", "show", "--format", "pem"]);
    std::fs::write(&pem, pem_text).unwrap();
    let (ok, served, err) = curl(&[
        "--cacert",
        pem.to_str().unwrap(),
        &format!("https://{}/v1/bundle", replica.addr),
    ]);
    assert!(ok, "{err}");
    let keys = |s: &str| serde_json::from_str::<Value>(s).unwrap()["keys"].clone();
    assert_eq!(keys(&served), keys(&bundle_before));
    assert_eq!(tokens(&replica.dir), before_tokens);
}
