//! End-to-end: the real `mayfly-ca` binary mints JWT-SVIDs at `POST /v1/jwtsvid` for the mTLS
//! caller's own SPIFFE ID, signed by a key its published bundle carries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::{CaProc, init_dir};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use mayfly_ca::bundle::{BundleSet, TrustBundle};
use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::tls::{Credentials, Svid};
use mayfly_ca::token::JoinToken;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://mayfly.local/web";

struct Caller {
    client: CaClient,
    bundles: mayfly_ca::verify::SharedBundles,
    creds: Arc<Credentials>,
    bundle: TrustBundle,
}

async fn caller(ca: &CaProc, ttl: Duration) -> Caller {
    let token = ca.token(WEB, "10m");
    let key = SecretKey::generate().unwrap();
    let client =
        CaClient::new(ca.addr.clone(), parse_trust_domain("mayfly.local").unwrap()).unwrap();
    let issued = client
        .bootstrap(
            &JoinToken::parse(&token).unwrap(),
            &key,
            &parse_workload_id(WEB).unwrap(),
            Some(ttl),
        )
        .await
        .unwrap();
    let creds = Credentials::new();
    creds.set(Svid::new(issued.chain.clone(), &key).unwrap());
    Caller {
        client,
        bundles: Arc::new(ArcSwap::from_pointee(BundleSet::single(
            issued.bundle.clone(),
        ))),
        creds,
        bundle: issued.bundle,
    }
}

/// The published bundle's `jwt-svid` key named `kid`, read from the JWK Set as any verifier would.
async fn published_key(c: &Caller, kid: &str) -> DecodingKey {
    let jwks = c
        .client
        .fetch_bundle(c.bundles.clone())
        .await
        .unwrap()
        .to_jwks();
    let v: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let k = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "jwt-svid" && k["kid"] == kid)
        .unwrap_or_else(|| panic!("no jwt-svid key {kid} in {jwks}"));
    assert_eq!(k["kty"], "EC");
    assert_eq!(k["crv"], "P-256");
    DecodingKey::from_ec_components(k["x"].as_str().unwrap(), k["y"].as_str().unwrap()).unwrap()
}

async fn mtls_post(c: &Caller, addr: &str, body: &str) -> (u16, String) {
    let cfg = mayfly_ca::tls::client_config(
        c.creds.clone(),
        c.bundles.clone(),
        mayfly_ca::verify::IdMatcher::Exact(c.client.ca_id().clone()),
        &[],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(mayfly_ca::tls::dial_name(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST /v1/jwtsvid HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(body.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn refused(e: ClientError) -> String {
    match e {
        ClientError::Refused { status, reason, .. } => format!("{status} {reason}"),
        other => format!("other: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_jwt_svid_verifies_against_the_published_bundle_for_its_audience_only() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let c = caller(&ca, Duration::from_secs(600)).await;
    assert_eq!(
        c.bundle.jwt_keys().len(),
        1,
        "the SVID's bundle carries the JWT key"
    );
    let aud = vec!["https://api.example".to_owned(), "db".to_owned()];
    let t0 = time::OffsetDateTime::now_utc().unix_timestamp();
    let resp = c
        .client
        .fetch_jwt_svid(c.bundles.clone(), c.creds.clone(), &aud)
        .await
        .unwrap();
    assert_eq!(resp.spiffe_id, WEB);
    let header = jsonwebtoken::decode_header(&resp.token).unwrap();
    assert_eq!(header.alg, Algorithm::ES256);
    let kid = header.kid.expect("kid");
    let key = published_key(&c, &kid).await;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&["db"]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    let data = jsonwebtoken::decode::<serde_json::Value>(&resp.token, &key, &v).unwrap();
    assert_eq!(data.claims["sub"], WEB);
    let exp = data.claims["exp"].as_i64().unwrap();
    let iat = data.claims["iat"].as_i64().unwrap();
    assert!(exp - iat <= 300, "exp {exp} iat {iat}");
    assert!(exp <= t0 + 302 && exp > t0, "exp {exp} now {t0}");
    assert_eq!(exp, resp.expires_at);
    // Another audience: refused by the verifier.
    v.set_audience(&["other"]);
    assert!(jsonwebtoken::decode::<serde_json::Value>(&resp.token, &key, &v).is_err());
    // mayfly's own validation agrees.
    let bundle = c.client.fetch_bundle(c.bundles.clone()).await.unwrap();
    let (id, claims) = mayfly_ca::jwt::validate(&resp.token, "db", &bundle).unwrap();
    assert_eq!(id.to_string(), WEB);
    assert_eq!(claims["aud"][0], "https://api.example");
    assert!(mayfly_ca::jwt::validate(&resp.token, "other", &bundle).is_err());
    // Counted and audited, with the audiences.
    let metrics = {
        let mut s = tokio::net::TcpStream::connect(&ca.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(
        metrics.contains("mayfly_ca_jwt_svids_issued_total 1"),
        "{metrics}"
    );
    let s = mayfly_ca::store::SqliteStore::open(&ca.dir.join("ca.db")).unwrap();
    let ev = mayfly_ca::store::Store::events_after(&s, 0, 10_000).unwrap();
    let minted = ev
        .iter()
        .find(|e| e.kind == "jwt.minted")
        .expect("jwt.minted");
    assert!(
        minted.detail.contains("https://api.example"),
        "{}",
        minted.detail
    );
    assert!(ca.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_is_for_the_callers_certificate_never_an_id_in_the_body() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let c = caller(&ca, Duration::from_secs(600)).await;
    let (status, text) = mtls_post(
        &c,
        &ca.addr,
        r#"{"audience": ["db"], "spiffe_id": "spiffe://mayfly.local/admin"}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let body = body.trim_start_matches(|c: char| c.is_ascii_hexdigit() || c.is_whitespace());
    let body = &body[..=body.rfind('}').unwrap()];
    let resp: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(resp["spiffe_id"], WEB);
    let token = resp["token"].as_str().unwrap();
    let bundle = c.client.fetch_bundle(c.bundles.clone()).await.unwrap();
    let (id, _) = mayfly_ca::jwt::validate(token, "db", &bundle).unwrap();
    assert_eq!(id.to_string(), WEB);
    assert!(ca.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_svid_needs_an_audience_and_an_svid_and_never_outlives_the_callers_svid() {
    let (_tmp, dir) = init_dir("mayfly.local");
    let ca = CaProc::start(&dir, &[]);
    let c = caller(&ca, Duration::from_secs(60)).await;
    for aud in [vec![], vec![String::new()], vec!["x".to_owned(); 9]] {
        let err = c
            .client
            .fetch_jwt_svid(c.bundles.clone(), c.creds.clone(), &aud)
            .await
            .unwrap_err();
        assert_eq!(refused(err), "400 bad_audience", "{aud:?}");
    }
    let (status, text) = mtls_post(
        &c,
        &ca.addr,
        r#"{"spiffe_id": "spiffe://mayfly.local/web"}"#,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    // Without a client certificate: 401.
    let err = c
        .client
        .fetch_jwt_svid(c.bundles.clone(), Credentials::new(), &["db".to_owned()])
        .await
        .unwrap_err();
    assert_eq!(refused(err), "401 unauthenticated");
    // The caller's SVID lives 60 s: so does its token, not 5 minutes.
    let resp = c
        .client
        .fetch_jwt_svid(c.bundles.clone(), c.creds.clone(), &["db".to_owned()])
        .await
        .unwrap();
    let not_after = c.creds.get().unwrap().info.not_after.unix_timestamp();
    assert!(
        resp.expires_at <= not_after,
        "{} > {not_after}",
        resp.expires_at
    );
    assert!(ca.stop().success());
}
