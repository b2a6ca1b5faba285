//! People sign in: a real OpenID Connect provider (npm's `oidc-provider`, tests/oidc), the real
//! control plane trusting it, and the real `mayfly` CLI. Device flow and PKCE loopback sign-ins
//! end to end (the test completes the provider's pages over HTTP as a browser would); ID tokens
//! from another issuer, for another audience, expired, or signed by a key the provider rotated
//! out are refused with their reason; `/user/...` is reserved for sign-in.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mayfly_ca::identity::bundle::{BundleSet, TrustBundle};
use mayfly_ca::identity::client::{CaClient, ClientError, UserSvid};
use mayfly_ca::identity::id::{parse_id, parse_trust_domain};
use mayfly_ca::identity::keys::SecretKey;
use mayfly_ca::identity::verify::SharedBundles;
use mayfly_ca::store::{SqliteStore, Store};
use mayfly_tests::oidc::{CLIENT_ID, Idp};
use mayfly_tests::{Ca, bin};
use serde_json::{Value, json};

const TD: &str = "mayfly.local";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

struct World {
    tmp: Arc<tempfile::TempDir>,
    idp: Idp,
    ca: Ca,
    bundle: PathBuf,
}

/// A provider and a control plane trusting it through `--oidc-config` (JWK Set at most 1 s old).
fn world() -> World {
    world_with(false)
}

/// ... or through `--oidc-issuer` and `--oidc-client-id` (`flags`).
fn world_with(flags: bool) -> World {
    world_of(flags, 600)
}

/// ... with device-flow codes that live `device_code_ttl` seconds.
fn world_of(flags: bool, device_code_ttl: u64) -> World {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let idp = Idp::start_with(tmp.path(), 3600, device_code_ttl);
    let cfg = tmp.path().join("oidc.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[oidc]]\nissuer = \"{}\"\nclient_id = \"{CLIENT_ID}\"\njwks_max_age = \"1s\"\n",
            idp.issuer
        ),
    )
    .unwrap();
    let ca = if flags {
        Ca::start_with(
            &tmp,
            &["--oidc-issuer", &idp.issuer, "--oidc-client-id", CLIENT_ID],
        )
    } else {
        Ca::start_with(&tmp, &["--oidc-config", cfg.to_str().unwrap()])
    };
    let out = Command::new(bin("mayfly-ca"))
        .args(["bundle", "show", "--format", "pem", "--data-dir"])
        .arg(&ca.dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bundle = tmp.path().join("bundle.pem");
    std::fs::write(&bundle, &out.stdout).unwrap();
    World {
        tmp,
        idp,
        ca,
        bundle,
    }
}

impl World {
    fn client(&self) -> (CaClient, SharedBundles) {
        let td = parse_trust_domain(TD).unwrap();
        let pem = std::fs::read_to_string(&self.bundle).unwrap();
        let b = TrustBundle::from_pem(td.clone(), &pem).unwrap();
        (
            CaClient::new(self.ca.addr.clone(), td).unwrap(),
            Arc::new(ArcSwap::from_pointee(BundleSet::single(b))),
        )
    }

    /// `POST /v1/user/svid` with `token` for `user`'s ID and a fresh key.
    async fn exchange(
        &self,
        token: &str,
        user: &str,
    ) -> Result<(UserSvid, SecretKey), ClientError> {
        let (client, bundles) = self.client();
        let key = SecretKey::generate().unwrap();
        let id = parse_id(&format!("spiffe://{TD}/user/{user}")).unwrap();
        client
            .user_svid(bundles, token, None, &key, &id)
            .await
            .map(|s| (s, key))
    }

    fn claims(&self, sub: &str) -> Value {
        let now = now();
        json!({ "iss": self.idp.issuer, "aud": CLIENT_ID, "sub": sub, "exp": now + 300,
                "iat": now, "groups": ["oncall"] })
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        let store = SqliteStore::open(&self.ca.dir.join("ca.db")).unwrap();
        store
            .events_after(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| serde_json::from_str(&e.detail).unwrap())
            .collect()
    }

    fn mayfly(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("mayfly"));
        c.args(args)
            .env("MAYFLY_CONFIG_DIR", self.config_dir())
            .env("MAYFLY_CONTROL_PLANE", &self.ca.addr)
            .env("MAYFLY_BUNDLE", &self.bundle)
            // No browser in tests: the test is the browser.
            .env("PATH", "/nonexistent");
        c
    }

    fn config_dir(&self) -> PathBuf {
        self.tmp.path().join("home-config")
    }
}

fn refused_with(r: Result<(UserSvid, SecretKey), ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Refused { status, reason, .. }) => (status, reason),
        Err(e) => panic!("not a refusal: {e}"),
        Ok((s, _)) => panic!("accepted: {}", s.spiffe_id),
    }
}

/// Runs `mayfly login ARGS`, waits for the stderr line starting with `prefix` and returns its
/// last word (a URL) with the running child.
fn start_login(
    w: &World,
    args: &[&str],
    prefix: &str,
) -> (Child, String, Arc<std::sync::Mutex<String>>) {
    let mut child = w
        .mayfly(&[&["login"], args].concat())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let (wanted, log2) = (prefix.to_owned(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.starts_with(&wanted) {
                let _ = tx.send(line.rsplit(' ').next().unwrap_or_default().to_owned());
            }
            log2.lock().unwrap().push_str(&line);
            log2.lock().unwrap().push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("no {prefix:?} line; log:\n{}", log.lock().unwrap()));
    (child, url, log)
}

fn wait_exit(child: &mut Child, log: &std::sync::Mutex<String>) {
    assert!(
        wait_status(child, log),
        "mayfly login failed:\n{}",
        log.lock().unwrap()
    );
}

/// Waits (at most a minute) for `mayfly login` to exit; whether it succeeded.
fn wait_status(child: &mut Child, log: &std::sync::Mutex<String>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.success();
        }
        assert!(
            Instant::now() < deadline,
            "mayfly login still running:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn leaf_not_after(chain_pem: &str) -> i64 {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    mayfly_ca::identity::svid::validity(&leaf)
        .unwrap()
        .1
        .unix_timestamp()
}

fn assert_signed_in(w: &World, user: &str, groups: &[&str]) {
    let creds = mayfly_sidecar::user::creds::load(&w.config_dir()).unwrap();
    let id = format!("spiffe://{TD}/user/{user}");
    assert_eq!(creds.spiffe_id, id);
    assert_eq!(creds.issuer, w.idp.issuer);
    let not_after = leaf_not_after(&creds.cert_chain_pem);
    assert_eq!(not_after, creds.not_after);
    assert!(
        not_after <= now() + 15 * 60,
        "{not_after} is over 15 minutes away"
    );
    assert!(not_after > now(), "already expired");
    let store = SqliteStore::open(&w.ca.dir.join("ca.db")).unwrap();
    let session = store
        .user_session(&id)
        .unwrap()
        .expect("a recorded sign-in");
    assert_eq!(session.groups, groups);
    assert_eq!(session.issuer, w.idp.issuer);
    assert_eq!(session.subject, user);
    assert!(
        w.events("user.signed_in")
            .iter()
            .any(|e| e["user"] == id.as_str() && e["groups"] == json!(groups)),
        "no user.signed_in event for {id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_by_device_flow_and_gets_a_user_svid_of_at_most_fifteen_minutes() {
    let w = world();
    let (mut child, url, log) = start_login(&w, &[], "or open ");
    w.idp.complete_device_flow(&url, "alice").await.unwrap();
    wait_exit(&mut child, &log);
    assert_signed_in(&w, "alice", &["oncall"]);

    let status = w.mayfly(&["status"]).output().unwrap();
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!("spiffe://{TD}/user/alice")),
        "{text}"
    );
    let out = w.mayfly(&["logout"]).output().unwrap();
    assert!(out.status.success());
    let status = w.mayfly(&["status"]).output().unwrap();
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("not signed in"));
}

/// A person who does not recognise the code presses "Abort" at the provider: `mayfly login`
/// stops with that reason, nothing is stored, no user SVID is issued. A code nobody confirms
/// runs out: the CLI says so instead of polling forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sign_in_the_person_aborts_or_never_completes_ends_without_credentials() {
    let w = world();
    let (mut child, url, log) = start_login(&w, &[], "or open ");
    let page = w.idp.abort_device_flow(&url).await.unwrap();
    assert!(page.contains("interrupted"), "{page}");
    assert!(!wait_status(&mut child, &log), "login succeeded");
    let said = log.lock().unwrap().clone();
    assert!(
        said.contains("the sign-in was denied at the identity provider"),
        "{said}"
    );
    assert!(mayfly_sidecar::user::creds::load(&w.config_dir()).is_err());
    assert!(w.events("user.signed_in").is_empty());

    let w = world_of(false, 3);
    let (mut child, _url, log) = start_login(&w, &[], "or open ");
    assert!(!wait_status(&mut child, &log), "login succeeded");
    let said = log.lock().unwrap().clone();
    assert!(said.contains("the code expired"), "{said}");
    assert!(mayfly_sidecar::user::creds::load(&w.config_dir()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_in_a_browser_with_pkce_on_a_loopback_redirect() {
    let w = world_with(true);
    let (mut child, url, log) = start_login(&w, &["--browser"], "To sign in, open ");
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    let page = w.idp.complete_browser_flow(&url, "bob").await.unwrap();
    assert!(page.contains("Signed in"), "{page}");
    wait_exit(&mut child, &log);
    assert_signed_in(&w, "bob", &["db-admins"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_from_another_issuer_for_another_audience_expired_or_forged_are_refused() {
    let w = world();
    // The control: a token the provider's key signs for this client is taken.
    let (svid, _) = w
        .exchange(&w.idp.sign(&w.claims("alice")), "alice")
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TD}/user/alice"));

    let mut other_issuer = w.claims("alice");
    other_issuer["iss"] = json!("http://127.0.0.1:1/other");
    let mut other_audience = w.claims("alice");
    other_audience["aud"] = json!("someone-else");
    // Several audiences: `azp` must name this client.
    let mut shared = w.claims("alice");
    shared["aud"] = json!([CLIENT_ID, "another-client"]);
    let mut expired = w.claims("alice");
    expired["exp"] = json!(now() - 120);
    let good = w.idp.sign(&w.claims("alice"));
    let (head, rest) = good.split_once('.').unwrap();
    let (payload, _) = rest.split_once('.').unwrap();
    let forged = format!("{head}.{payload}.{}", "A".repeat(86));
    let unsigned = format!("eyJhbGciOiJub25lIn0.{payload}.");
    let mut bad_user = w.claims("alice@example.com");
    bad_user["sub"] = json!("alice@example.com");
    for (token, user, want) in [
        (w.idp.sign(&other_issuer), "alice", (401, "wrong_issuer")),
        (
            w.idp.sign(&other_audience),
            "alice",
            (401, "wrong_audience"),
        ),
        (w.idp.sign(&shared), "alice", (401, "wrong_audience")),
        (w.idp.sign(&expired), "alice", (401, "expired")),
        (forged, "alice", (401, "bad_signature")),
        (unsigned, "alice", (401, "malformed")),
        (w.idp.sign(&bad_user), "alice", (403, "bad_user_claim")),
    ] {
        let got = refused_with(w.exchange(&token, user).await);
        assert_eq!((got.0, got.1.as_str()), want);
        assert!(
            w.events("user.sign_in_refused")
                .iter()
                .any(|e| e["reason"] == want.1),
            "no user.sign_in_refused {}",
            want.1
        );
    }
    // The code flow's nonce must come back in the token.
    let mut with_nonce = w.claims("alice");
    with_nonce["nonce"] = json!("sent-by-this-sign-in");
    let (client, bundles) = w.client();
    let id = parse_id(&format!("spiffe://{TD}/user/alice")).unwrap();
    let key = SecretKey::generate().unwrap();
    let r = client
        .user_svid(
            bundles,
            &w.idp.sign(&with_nonce),
            Some("another"),
            &key,
            &id,
        )
        .await;
    assert!(
        matches!(&r, Err(ClientError::Refused { status: 401, reason, .. }) if reason == "wrong_nonce"),
        "{:?}",
        r.map(|s| s.spiffe_id)
    );
    // The issuer is recorded when it can be read.
    assert!(
        w.events("user.sign_in_refused")
            .iter()
            .any(|e| e["reason"] == "wrong_issuer" && e["issuer"] == "http://127.0.0.1:1/other")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_a_rotated_out_key_is_refused_once_the_control_plane_refetches() {
    let mut w = world();
    let old = w.idp.sign(&w.claims("alice"));
    w.exchange(&old, "alice").await.unwrap();
    w.idp.rotate();
    assert_ne!(w.idp.kid(), "k1");
    // jwks_max_age is 1 s: the control plane refetches and the old key no longer verifies.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match w.exchange(&old, "alice").await {
            Err(ClientError::Refused { reason, .. }) if reason == "unknown_key" => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "the rotated-out key still verifies: {:?}",
                    other.map(|(s, _)| s.spiffe_id)
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    // The new key is fetched on sight of its kid.
    let new = w.idp.sign(&w.claims("alice"));
    w.exchange(&new, "alice").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_svid_from_the_exchange_never_outlives_the_id_token() {
    let w = world();
    let mut c = w.claims("alice");
    let exp = now() + 90;
    c["exp"] = json!(exp);
    let (svid, _) = w.exchange(&w.idp.sign(&c), "alice").await.unwrap();
    assert!(svid.not_after <= exp, "{} > {exp}", svid.not_after);
    assert_eq!(svid.sign_in_expires, exp);
    let store = SqliteStore::open(&w.ca.dir.join("ca.db")).unwrap();
    let s = store
        .user_session(&format!("spiffe://{TD}/user/alice"))
        .unwrap()
        .unwrap();
    assert_eq!(s.expires_at, exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_namespace_is_for_sign_in_only_and_a_person_never_acts_as_a_workload() {
    let w = world();
    // No join token for a person.
    let out = Command::new(bin("mayfly-ca"))
        .args(["token", "create", "--data-dir"])
        .arg(&w.ca.dir)
        .args([
            "--spiffe-id",
            &format!("spiffe://{TD}/user/x"),
            "--ttl",
            "5m",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("person's identity"), "{err}");

    // A user SVID neither renews itself nor registers endpoints as a workload.
    let (svid, key) = w
        .exchange(&w.idp.sign(&w.claims("alice")), "alice")
        .await
        .unwrap();
    let creds = mayfly_ca::identity::tls::Credentials::new();
    creds.set(mayfly_ca::identity::tls::Svid::new(svid.chain.clone(), &key).unwrap());
    let (client, bundles) = w.client();
    let id = parse_id(&format!("spiffe://{TD}/user/alice")).unwrap();
    let renew = client
        .renew(
            bundles.clone(),
            creds.clone(),
            &SecretKey::generate().unwrap(),
            &id,
            None,
        )
        .await;
    assert!(
        matches!(&renew, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "user_namespace"),
        "{:?}",
        renew.map(|c| c.serial)
    );
    let reg = client
        .register_endpoints(bundles.clone(), creds.clone(), &["127.0.0.1:9".to_owned()])
        .await;
    assert!(
        matches!(&reg, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "user_namespace"),
        "{reg:?}"
    );
    // Nor mints bearer tokens, nor follows the mesh's snapshot (endpoints, grants, policy).
    let jwt = client
        .fetch_jwt_svid(bundles.clone(), creds.clone(), &["db".to_owned()])
        .await;
    assert!(
        matches!(&jwt, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "user_namespace"),
        "{:?}",
        jwt.map(|_| "a JWT-SVID")
    );
    let (tx, _rx) = tokio::sync::mpsc::channel(4);
    let watch = client.watch(bundles, creds, tx).await;
    assert!(
        matches!(&watch, Err(ClientError::Refused { status: 403, reason, .. }) if reason == "user_namespace"),
        "{watch:?}"
    );

    // The administrator's offline break-glass still mints one.
    let out_dir = w.tmp.path().join("minted");
    w.ca.mint(&format!("spiffe://{TD}/user/breakglass"), &out_dir);
    assert!(Path::new(&out_dir).join("svid.pem").exists());
}
