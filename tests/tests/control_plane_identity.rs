//! The control plane's identity belongs to the control plane: no token, mint, CSR, renewal or
//! audit batch obtains or speaks for `spiffe://<td>/mayfly/...`, and a sidecar refuses a server
//! that holds a certificate for the reserved ID without the control plane's mark.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::{parse_id, parse_trust_domain};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::store::{Store, TokenRecord};
use mayfly_ca::testing::{Leaf, TestCa};
use mayfly_ca::tls::{Credentials, Svid};
use mayfly_ca::verify::{IdMatcher, SharedBundles, SpiffeClientVerifier};
use mayfly_tests::{Ca, Sidecar, bin, eventually, http_app};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

const CP: &str = "spiffe://mayfly.local/mayfly/ca";

fn ca_cmd(ca: &Ca, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("mayfly-ca"))
        .args(args)
        .args(["--data-dir", ca.dir.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The real control plane's authorities, read from its data directory: what an older version
/// would have signed a reserved ID with, for a token or `svid mint`.
fn same_ca(dir: &Path) -> TestCa {
    let (_dd, _store, authorities) = mayfly_ca::server::open(dir).unwrap();
    TestCa { authorities }
}

/// A certificate for the reserved ID signed by the real intermediate, without the control
/// plane's mark (as every SVID for it issued before the namespace was reserved).
fn unmarked_control_plane_svid(dir: &Path) -> Arc<Credentials> {
    let mut leaf = Leaf::new(CP);
    leaf.dns = vec!["localhost".into()];
    let (chain, key) = same_ca(dir).leaf(&leaf);
    let c = Credentials::new();
    c.set(Svid::new(chain, &key).unwrap());
    c
}

fn real_bundles(dir: &Path) -> SharedBundles {
    Arc::new(ArcSwap::from_pointee(BundleSet::single(
        same_ca(dir).bundle(),
    )))
}

fn refused(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused { status, reason, .. }) => (status, reason),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_mint_csr_renewal_or_audit_batch_obtains_the_control_planes_identity() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let td = parse_trust_domain("mayfly.local").unwrap();
    let cp_id = parse_id(CP).unwrap();

    // 1. Admin commands refuse the namespace, whatever its case, with the reason.
    for id in [
        CP,
        "spiffe://mayfly.local/mayfly/audit",
        "spiffe://mayfly.local/Mayfly/ca",
    ] {
        let (ok, out) = ca_cmd(&ca, &["token", "create", "--spiffe-id", id, "--ttl", "5m"]);
        assert!(!ok && out.contains("reserved"), "token create {id}: {out}");
        let mint = tmp.path().join("mint");
        let (ok, out) = ca_cmd(
            &ca,
            &[
                "svid",
                "mint",
                "--spiffe-id",
                id,
                "--out",
                mint.to_str().unwrap(),
            ],
        );
        assert!(!ok && out.contains("reserved"), "svid mint {id}: {out}");
        assert!(!mint.join("svid.pem").exists());
    }

    // 2. A token for the reserved ID stored before the namespace was reserved is refused at
    // redemption, and stays unspent.
    let token = mayfly_ca::token::JoinToken::generate(&ca.pin());
    let (_dd, store, _) = mayfly_ca::server::open(&ca.dir).unwrap();
    let now = time::OffsetDateTime::now_utc();
    store
        .insert_token(&TokenRecord {
            id: token.id.clone(),
            hash: token.hash(),
            spiffe_id: CP.into(),
            created_at: now,
            expires_at: now + time::Duration::minutes(10),
            created_by: "an older version".into(),
            used_at: None,
            revoked_at: None,
        })
        .unwrap();
    let client = CaClient::new(ca.addr.clone(), td.clone()).unwrap();
    let key = SecretKey::generate().unwrap();
    let (status, reason) = refused(client.bootstrap(&token, &key, &cp_id, None).await);
    assert_eq!((status, reason.as_str()), (403, "reserved_id"));
    let rec = store
        .list_tokens()
        .unwrap()
        .into_iter()
        .find(|t| t.id == token.id)
        .unwrap();
    assert!(rec.used_at.is_none(), "the token must not be spent");

    // 3. An SVID for the reserved ID from before (signed by the same CA, no mark) renews
    // nothing and delivers no audit record in the control plane's name.
    let legacy = unmarked_control_plane_svid(&ca.dir);
    let bundles = real_bundles(&ca.dir);
    let (status, reason) = refused(
        client
            .renew(bundles.clone(), legacy.clone(), &key, &cp_id, None)
            .await,
    );
    assert_eq!((status, reason.as_str()), (403, "reserved_id"));
    let forged = serde_json::json!({
        "v": 1, "source": CP, "epoch": "forged", "seq": 1,
        "prev": mayfly_ca::audit::GENESIS, "ts_ms": 1, "kind": "grant.approved",
    });
    let mut session = client.audit_session(bundles, legacy);
    let (status, reason) = refused(session.post(Bytes::from(format!("{forged}\n"))).await);
    assert_eq!((status, reason.as_str()), (403, "reserved_chain"));

    // 4. Records in the control plane's name stored by an older version (not its own chain)
    // are reported by `audit verify`.
    let (ok, out) = ca_cmd(&ca, &["audit", "verify"]);
    assert!(ok, "nothing forged yet: {out}");
    let line = serde_json::to_vec(&forged).unwrap();
    store
        .audit_append(
            &format!("{CP}#forged"),
            &[mayfly_ca::store::AuditRow {
                chain: format!("{CP}#forged"),
                seq: 1,
                prev: mayfly_ca::audit::GENESIS.into(),
                hash: mayfly_ca::audit::line_hash(&line),
                source: CP.into(),
                ts_ms: 1,
                kind: "grant.approved".into(),
                line,
            }],
        )
        .unwrap()
        .unwrap();
    let (ok, out) = ca_cmd(&ca, &["audit", "verify"]);
    assert!(
        !ok,
        "a forged control-plane chain must fail verification: {out}"
    );
    assert!(out.contains("did not write"), "{out}");
}

/// Requests the fake control plane received, by path.
type Seen = Arc<Mutex<HashMap<String, u32>>>;

/// A fake control plane: serves TLS with `creds` (a certificate for the reserved ID), relays
/// `/v1/bundle` and `/v1/svid` to the real control plane (so a sidecar that trusts it bootstraps
/// through it), and pushes an allow-everything policy on `/v1/watch`.
async fn fake_control_plane(creds: Arc<Credentials>, dir: &Path, real: String) -> (String, Seen) {
    let bundles = real_bundles(dir);
    let jwks = same_ca(dir).bundle().to_jwks();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let verifier = Arc::new(SpiffeClientVerifier::optional(bundles.clone()));
    let cfg = mayfly_ca::tls::server_config_with(creds, verifier, &[b"http/1.1"]).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let (seen, bundles, real) = (seen2.clone(), bundles.clone(), real.clone());
            let jwks = jwks.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (seen, bundles, real) = (seen.clone(), bundles.clone(), real.clone());
                    let jwks = jwks.clone();
                    async move {
                        *seen
                            .lock()
                            .unwrap()
                            .entry(req.uri().path().to_owned())
                            .or_default() += 1;
                        Ok::<_, std::convert::Infallible>(answer(req, bundles, &jwks, &real).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

async fn answer(
    req: Request<Incoming>,
    bundles: SharedBundles,
    jwks: &str,
    real: &str,
) -> Response<Full<Bytes>> {
    if req.uri().path() == "/v1/watch" {
        let policy = "version = 1\n\n[[rule]]\nname = \"everyone\"\nfrom = [\"spiffe://mayfly.local/*\"]\nto = [\"spiffe://mayfly.local/*\"]\n";
        let snap = serde_json::json!({
            "generation": 1, "policy_version": "fake", "policy": policy, "grants": [],
            "bundle": serde_json::from_str::<serde_json::Value>(jwks).unwrap(),
        });
        return Response::new(Full::new(Bytes::from(format!("{snap}\n"))));
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let tls = mayfly_ca::tls::client_config(
        Credentials::new(),
        bundles,
        IdMatcher::ControlPlane(parse_id(CP).unwrap()),
        &[b"http/1.1"],
    )
    .unwrap();
    let tcp = TcpStream::connect(real).await.unwrap();
    let tls = TlsConnector::from(Arc::new(tls))
        .connect(mayfly_ca::tls::dial_name(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut fwd = Request::builder().method(parts.method).uri(parts.uri);
    for (k, v) in &parts.headers {
        fwd = fwd.header(k, v);
    }
    let resp = send
        .send_request(fwd.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, Full::new(body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_refuses_a_fake_control_plane_holding_a_certificate_for_the_reserved_id() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let token = ca.token_file(
        "spiffe://mayfly.local/orders",
        &tmp.path().join("orders.token"),
    );
    let (fake, seen) = fake_control_plane(
        unmarked_control_plane_svid(&ca.dir),
        &ca.dir,
        ca.addr.clone(),
    )
    .await;
    let app = http_app("orders").await;
    let config = format!(
        "spiffe_id = \"spiffe://mayfly.local/orders\"\n\n[control_plane]\naddress = \"{fake}\"\ntoken_file = \"{}\"\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"http\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        token.display()
    );
    let sidecar = Sidecar::start(tmp.path(), "orders", &config);
    let refused = eventually(Duration::from_secs(20), async || {
        sidecar.proc.log().contains("not the control plane")
    })
    .await;
    assert!(
        refused,
        "the sidecar must refuse the impostor:\n{}",
        sidecar.proc.log()
    );
    // It said why, took nothing from it and sent nothing to it beyond the unauthenticated
    // first-contact bundle fetch, and it is not ready.
    let seen = seen.lock().unwrap().clone();
    for path in ["/v1/svid", "/v1/watch", "/v1/audit"] {
        assert_eq!(
            seen.get(path),
            None,
            "{path} reached the impostor: {seen:?}"
        );
    }
    assert_ne!(sidecar.admin_get("/readyz").await.0, 200);
}
