//! Kubernetes attestation end to end: `mayfly-ca run --k8s-jwks --k8s-issuer` and sidecars
//! that bootstrap with a projected service-account token file and the CA pin, no join token.
//! Forged, expired and wrong-audience tokens are refused and recorded; a sidecar recovers by
//! itself once the (kubelet-refreshed) file holds a good token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mayfly_ca::server::attest::testing::TestIssuer;
use mayfly_ca::store::{SqliteStore, Store};
use mayfly_tests::{Ca, Sidecar, echo_app, eventually, round_trip};
use serde_json::{Value, json};

const ISS: &str = "https://kubernetes.default.svc.cluster.local";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn config(id: &str, ca: &str, token: &Path, pin: &str, policy: &Path, tail: &str) -> String {
    format!(
        "spiffe_id = \"{id}\"\n\n[control_plane]\naddress = \"{ca}\"\nk8s_token_file = \"{}\"\nca_pin = \"{pin}\"\n\n[policy]\nfile = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{tail}",
        token.display(),
        policy.display()
    )
}

/// `(kind, reason)` of every refusal the control plane recorded.
fn refusals(ca: &Ca) -> Vec<(String, String)> {
    let store = SqliteStore::open(&ca.dir.join("ca.db")).unwrap();
    store
        .events_after(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind.ends_with(".refused"))
        .map(|e| {
            let d: Value = serde_json::from_str(&e.detail).unwrap_or_default();
            (e.kind, d["reason"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

async fn wait_refusal(ca: &Ca, kind: &str, reason: &str, sidecar: &Sidecar) {
    let ok = eventually(Duration::from_secs(40), async || {
        refusals(ca).iter().any(|(k, r)| k == kind && r == reason)
    })
    .await;
    assert!(
        ok,
        "no {kind} {reason} event; events: {:?}\nsidecar log:\n{}",
        refusals(ca),
        sidecar.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_attest_with_their_service_account_token_and_bad_tokens_are_refused() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let issuer = TestIssuer::new(ISS);
    let jwks = dir.join("jwks.json");
    std::fs::write(&jwks, issuer.jwks()).unwrap();
    let ca = Ca::start_with(
        &tmp,
        &["--k8s-jwks", jwks.to_str().unwrap(), "--k8s-issuer", ISS],
    );
    let pin = ca.pin();
    assert_eq!(pin.len(), 64, "{pin}");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "version = 1\n\n[[rule]]\nname = \"web-orders\"\nfrom = [\"spiffe://mayfly.local/ns/shop/sa/web\"]\nto = [\"spiffe://mayfly.local/ns/shop/sa/orders\"]\n",
    )
    .unwrap();

    // orders: an ES256 token; web: an RS256 token. Both attest and talk over mTLS.
    let orders_tok = dir.join("orders.jwt");
    std::fs::write(
        &orders_tok,
        issuer.es256(&issuer.claims("shop", "orders", now())),
    )
    .unwrap();
    let app = echo_app("orders-app").await;
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &config(
            "spiffe://mayfly.local/ns/shop/sa/orders",
            &ca.addr,
            &orders_tok,
            &pin,
            &policy,
            &format!("[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"),
        ),
    );
    let orders_in = orders.inbound();
    orders.wait_ready().await;
    let (_, svid) = orders.admin_get("/svid").await;
    let svid: Value = serde_json::from_str(&svid).unwrap();
    assert_eq!(svid["spiffe_id"], "spiffe://mayfly.local/ns/shop/sa/orders");

    let web_tok = dir.join("web.jwt");
    std::fs::write(&web_tok, issuer.rs256(&issuer.claims("shop", "web", now()))).unwrap();
    let mut web = Sidecar::start(
        dir,
        "web",
        &config(
            "spiffe://mayfly.local/ns/shop/sa/web",
            &ca.addr,
            &web_tok,
            &pin,
            &policy,
            &format!(
                "[[outbound]]\nname = \"orders\"\nlisten = \"127.0.0.1:0\"\nremote = \"{orders_in}\"\nspiffe_id = \"spiffe://mayfly.local/ns/shop/sa/orders\"\n"
            ),
        ),
    );
    let out = web.outbound("orders");
    web.wait_ready().await;
    assert_eq!(round_trip(&out, b"attested").await.unwrap(), "orders-app");

    // A sidecar whose file holds bad tokens, one after the other: each is refused with its
    // reason and recorded; then the kubelet "refreshes" the file and it recovers by itself.
    let tok = dir.join("billing.jwt");
    let good = issuer.claims("shop", "billing", now());
    let mut c = good.clone();
    c["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
    c["sub"] = json!("system:serviceaccount:shop:admin");
    // Forged: billing's signed token with the payload of admin's.
    let signed = issuer.rs256(&good);
    let admin = issuer.rs256(&c);
    let p: Vec<&str> = admin.split('.').collect();
    let s: Vec<&str> = signed.split('.').collect();
    let forged = format!("{}.{}.{}", s[0], p[1], s[2]);
    let other_key = TestIssuer::new(ISS).es256(&c);
    std::fs::write(&tok, &forged).unwrap();
    let billing = Sidecar::start(
        dir,
        "billing",
        &config(
            "spiffe://mayfly.local/ns/shop/sa/billing",
            &ca.addr,
            &tok,
            &pin,
            &policy,
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n",
        ),
    );
    wait_refusal(&ca, "attestation.refused", "k8s_bad_signature", &billing).await;
    std::fs::write(&tok, &other_key).unwrap();
    // The same reason again (a second event), from a token signed by a key of another cluster.
    let before = refusals(&ca).len();
    let ok = eventually(Duration::from_secs(40), async || {
        refusals(&ca).len() > before
    })
    .await;
    assert!(ok && refusals(&ca).last().unwrap().1 == "k8s_bad_signature");

    let mut expired = good.clone();
    expired["iat"] = json!(now() - 1200);
    expired["nbf"] = json!(now() - 1200);
    expired["exp"] = json!(now() - 600);
    std::fs::write(&tok, issuer.es256(&expired)).unwrap();
    wait_refusal(&ca, "attestation.refused", "k8s_token_expired", &billing).await;

    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!(["https://kubernetes.default.svc.cluster.local"]);
    std::fs::write(&tok, issuer.rs256(&wrong_aud)).unwrap();
    wait_refusal(&ca, "attestation.refused", "k8s_wrong_audience", &billing).await;

    // A good token for another service account: the CSR asks for billing, the token proves
    // admin: refused as wrong_id.
    std::fs::write(&tok, issuer.rs256(&c)).unwrap();
    wait_refusal(&ca, "svid.refused", "wrong_id", &billing).await;

    std::fs::write(&tok, issuer.rs256(&issuer.claims("shop", "billing", now()))).unwrap();
    let ok = eventually(Duration::from_secs(40), async || {
        billing.admin_get("/readyz").await.0 == 200
    })
    .await;
    assert!(ok, "billing did not recover:\n{}", billing.proc.log());
    let (_, svid) = billing.admin_get("/svid").await;
    let svid: Value = serde_json::from_str(&svid).unwrap();
    assert_eq!(
        svid["spiffe_id"],
        "spiffe://mayfly.local/ns/shop/sa/billing"
    );

    // What was issued by attestation is in the log with the pod it came from.
    let store = SqliteStore::open(&ca.dir.join("ca.db")).unwrap();
    let issued: Vec<Value> = store
        .events_after(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "svid.issued")
        .map(|e| serde_json::from_str(&e.detail).unwrap())
        .collect();
    assert!(
        issued
            .iter()
            .any(|d| d["requester"] == "k8s:orders-7d9f8-abcde"
                && d["spiffe_id"] == "spiffe://mayfly.local/ns/shop/sa/orders"),
        "{issued:?}"
    );
}
