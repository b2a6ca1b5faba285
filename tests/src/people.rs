//! People in end-to-end tests. [`log_in`] is the real sign-in: `mayfly login` by the device
//! flow against the test identity provider (tests/oidc), the test completing the provider's
//! pages as the person's browser would. [`sign_in`] is the cheap stand-in for tests that need
//! many people with arbitrary groups and SVID lifetimes: a user SVID minted the way an
//! administrator could (`mayfly-ca svid mint`), written as the `mayfly` CLI's credentials
//! file, and the sign-in's groups recorded in the control plane's store
//! (`Store::put_user_session`), as `POST /v1/user/svid` does after verifying an ID token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mayfly_ca::tls::{client_config, dial_name};
use mayfly_ca::verify::IdMatcher;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use mayfly_ca::store::{StoreUrl, UserSession};
use mayfly_sidecar::user::creds::{self, Credentials};

use crate::oidc::Idp;
use crate::{Ca, bin};

/// A person with credentials in their own configuration directory.
pub struct Person {
    /// The user SVID's SPIFFE ID.
    pub id: String,
    /// `MAYFLY_CONFIG_DIR` for this person's `mayfly` commands.
    pub config_dir: PathBuf,
}

/// Signs `name` in for real: `mayfly login` (device flow) against `idp`, which the control
/// plane trusts (`--oidc-issuer`), completing the provider's pages as `name`'s browser would.
/// The groups are the provider's (the account table in tests/oidc/server.mjs: alice `oncall`,
/// bob `db-admins`, anyone else none); the user SVID lives the control plane's default.
pub async fn log_in(idp: &Idp, ca: &Ca, dir: &Path, name: &str) -> Person {
    let bundle = dir.join("bundle.pem");
    if !bundle.exists() {
        let o = Command::new(bin("mayfly-ca"))
            .args(["bundle", "show", "--format", "pem", "--data-dir"])
            .arg(&ca.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::write(&bundle, &o.stdout).unwrap();
    }
    let config_dir = dir.join(format!("{name}-config"));
    let mut child = Command::new(bin("mayfly"))
        .arg("login")
        .env("MAYFLY_CONFIG_DIR", &config_dir)
        .env("MAYFLY_CONTROL_PLANE", &ca.addr)
        .env("MAYFLY_BUNDLE", &bundle)
        // No browser to open here: this test is the browser.
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            // The device flow prints `or open <verification_uri_complete>`.
            if let Some(url) = line.strip_prefix("or open ") {
                let _ = tx.send(url.trim().to_owned());
            }
            log2.lock().unwrap().push_str(&line);
            log2.lock().unwrap().push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("mayfly login printed no URL:\n{}", log.lock().unwrap()));
    idp.complete_device_flow(&url, name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "mayfly login failed:\n{}", log.lock().unwrap());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "mayfly login still running:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = creds::load(&config_dir).unwrap();
    Person {
        id: c.spiffe_id,
        config_dir,
    }
}

/// Signs `name` in without an identity provider (see the module's comment: for tests that
/// need many people, groups of their choosing or short SVIDs cheaply): a user SVID living `ttl` (such as `5m`) in `<dir>/<name>-config`, and a
/// sign-in with `groups` valid for an hour.
pub fn sign_in(ca: &Ca, dir: &Path, name: &str, groups: &[&str], ttl: &str) -> Person {
    let id = format!("spiffe://mayfly.local/user/{name}");
    let minted = dir.join(format!("{name}-svid"));
    let o = Command::new(bin("mayfly-ca"))
        .args(["svid", "mint", "--data-dir"])
        .arg(&ca.dir)
        .args(["--spiffe-id", &id, "--ttl", ttl, "--json", "--out"])
        .arg(&minted)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let read = |f: &str| std::fs::read_to_string(minted.join(f)).unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let config_dir = dir.join(format!("{name}-config"));
    creds::save(
        &config_dir,
        &Credentials {
            control_plane: ca.addr.clone(),
            trust_domain: "mayfly.local".into(),
            spiffe_id: id.clone(),
            cert_chain_pem: read("svid.pem"),
            key_pem: read("svid.key"),
            bundle_pem: read("bundle.pem"),
            not_after: info["not_after"].as_i64().unwrap(),
            issuer: "https://idp.test".into(),
            sign_in_expires: now + 3600,
        },
    )
    .unwrap();
    let store = mayfly_ca::server::store::open(
        &StoreUrl::Sqlite(ca.dir.join(mayfly_ca::server::datadir::DB_FILE)),
        None,
    )
    .unwrap();
    store
        .put_user_session(&UserSession {
            spiffe_id: id.clone(),
            issuer: "https://idp.test".into(),
            subject: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            signed_in_at: now,
            expires_at: now + 3600,
        })
        .unwrap();
    Person { id, config_dir }
}

impl Person {
    /// `mayfly ARGS` as this person.
    pub fn mayfly(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `mayfly ARGS` as this person: (success, stdout, stderr).
    pub fn run(&self, args: &[&str]) -> (bool, String, String) {
        let o = self.mayfly(args);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// The `mayfly` command with this person's configuration directory.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("mayfly"));
        c.env("MAYFLY_CONFIG_DIR", &self.config_dir);
        c
    }
}

/// A TLS connection to the sidecar at `addr` (serving `target`) with the person's user SVID,
/// straight, without `mayfly connect`: the echo app's banner, or why not.
pub async fn dial_as(p: &Person, target: &str, addr: &str) -> Result<String, String> {
    let c = creds::load(&p.config_dir).unwrap();
    let (tls, bundles) = mayfly_sidecar::user::tls::identity(&c).unwrap();
    let to = mayfly_ca::id::parse_id(target).unwrap();
    let cfg = client_config(tls, bundles, IdMatcher::Exact(to), &[]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(dial_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut banner = [0u8; 7];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner)).await {
        Ok(Ok(_)) => Ok(String::from_utf8_lossy(&banner).into_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no banner".into()),
    }
}

/// A connection through `addr` kept busy; when it was cut (`None` if it lasted `limit`).
pub async fn held_until_cut(addr: &str, limit: Duration) -> Option<Instant> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut banner = [0u8; 7];
    s.read_exact(&mut banner).await.ok()?;
    let t0 = Instant::now();
    let mut buf = [0u8; 4];
    while t0.elapsed() < limit {
        if s.write_all(b"beat").await.is_err() {
            return Some(Instant::now());
        }
        match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => return Some(Instant::now()),
        }
    }
    None
}

/// `mayfly-ca ARGS --data-dir DIR`: (success, stdout + stderr).
pub fn ca_cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin("mayfly-ca"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
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

/// `mayfly-ca audit query ARGS --json`: the records.
pub fn audit(dir: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "query", "--json"];
    all.extend_from_slice(args);
    let (ok, out) = ca_cli(dir, &all);
    assert!(ok, "{out}");
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The JSON a `mayfly ... --json` command printed.
pub fn json_of(out: &str) -> Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The sidecar of the service `spiffe://mayfly.local/<name>` before `app`, its policy pushed by
/// the control plane (no file of its own), HTTP mode if `http`; ready.
pub async fn central_sidecar(
    ca: &Ca,
    dir: &Path,
    name: &'static str,
    app: &str,
    http: bool,
) -> crate::Sidecar {
    let mut config = central_config(ca, dir, name, Some(app), &[]);
    if http {
        config = config.replace("app = ", "protocol = \"http\"\napp = ");
    }
    let sidecar = crate::Sidecar::start(dir, name, &config);
    sidecar.wait_ready().await;
    sidecar
}

/// A sidecar of `spiffe://mayfly.local/<me>` (TCP mode) following the policy the control plane
/// `ca` pushes, in front of `app` if any, with `outbound` upstreams; not waited for.
pub fn central(
    ca: &Ca,
    dir: &Path,
    me: &str,
    app: Option<&str>,
    outbound: &[(&str, &str, &str)],
) -> crate::Sidecar {
    crate::Sidecar::start(dir, me, &central_config(ca, dir, me, app, outbound))
}

/// The configuration of [`central`]: no policy file, a join token in `<dir>/<me>.token`, the
/// audit spool in `<dir>/<me>-audit`.
fn central_config(
    ca: &Ca,
    dir: &Path,
    me: &str,
    app: Option<&str>,
    outbound: &[(&str, &str, &str)],
) -> String {
    let unused = dir.join("unused.toml");
    let tok = ca.token_file(
        &format!("spiffe://mayfly.local/{me}"),
        &dir.join(format!("{me}.token")),
    );
    crate::Spec {
        me,
        ca: &ca.addr,
        token: &tok,
        policy: &unused,
        inbound_app: app,
        outbound,
        svid_ttl: None,
        extra: &format!("[audit]\nspool_dir = \"{me}-audit\"\n"),
    }
    .toml()
    .replace(&format!("[policy]\nfile = \"{}\"\n", unused.display()), "")
}
