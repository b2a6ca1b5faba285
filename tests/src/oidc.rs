//! A real OpenID Connect provider for tests: npm's `oidc-provider` (tests/oidc/server.mjs,
//! pinned by its package-lock.json, installed by `npm ci --prefix tests/oidc`) on 127.0.0.1,
//! with signing keys this harness generates (so it can rotate them and sign deliberately bad
//! tokens with them). Its sign-in pages are completed over plain HTTP by
//! `mayfly_examples::idp`, the same code the quickstart uses to stand in for a browser.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::Proc;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/oidc");

/// The OAuth client `mayfly login` signs in as.
pub const CLIENT_ID: &str = mayfly_examples::idp::CLIENT_ID;

/// A running `oidc-provider`, killed on drop.
pub struct Idp {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub issuer: String,
    port: u16,
    dir: PathBuf,
    ttl: u64,
    device_ttl: u64,
    kid: String,
    key_hex: String,
    generation: u32,
}

fn new_key(path: &Path, kid: &str) -> String {
    mayfly_examples::idp::new_key(path, kid)
        .expect("node (Node.js 20+) must be installed to run the identity-provider tests")
}

impl Idp {
    /// Starts the provider on a free port; ID tokens live `id_token_ttl` seconds.
    pub fn start(dir: &Path, id_token_ttl: u64) -> Self {
        Self::start_with(dir, id_token_ttl, 600)
    }

    /// ... and device-flow codes `device_code_ttl` seconds.
    pub fn start_with(dir: &Path, id_token_ttl: u64, device_code_ttl: u64) -> Self {
        assert!(
            Path::new(ROOT).join("node_modules/oidc-provider").is_dir(),
            "the test identity provider is not installed: run `npm ci --prefix tests/oidc`"
        );
        let mut idp = Self {
            proc: Self::spawn(dir, "k1", 0, id_token_ttl, device_code_ttl).0,
            issuer: String::new(),
            port: 0,
            dir: dir.to_owned(),
            ttl: id_token_ttl,
            device_ttl: device_code_ttl,
            kid: "k1".into(),
            key_hex: String::new(),
            generation: 1,
        };
        idp.key_hex = std::fs::read_to_string(dir.join("idp-k1.hex")).unwrap();
        idp.wait();
        idp
    }

    fn spawn(dir: &Path, kid: &str, port: u16, ttl: u64, device_ttl: u64) -> (Proc, String) {
        let jwks = dir.join(format!("idp-{kid}.json"));
        let pem = new_key(&jwks, kid);
        std::fs::write(dir.join(format!("idp-{kid}.hex")), &pem).unwrap();
        let mut cmd = Command::new("node");
        cmd.current_dir(ROOT)
            .arg("server.mjs")
            .args(["--port", &port.to_string()])
            .arg("--jwks")
            .arg(&jwks)
            .args(["--id-token-ttl", &ttl.to_string()])
            .args(["--device-code-ttl", &device_ttl.to_string()]);
        (Proc::spawn(cmd, &["oidc-provider"]), pem)
    }

    fn wait(&mut self) {
        let addr = self.proc.addr("oidc-provider listening");
        self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
        self.issuer = format!("http://127.0.0.1:{}", self.port);
    }

    /// The current signing key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Restarts the provider on the same port (same issuer) with a new key only: tokens signed
    /// with the old one are now signed by a key it no longer publishes.
    pub fn rotate(&mut self) {
        self.proc.kill();
        self.generation += 1;
        self.kid = format!("k{}", self.generation);
        let (proc, pem) = Self::spawn(&self.dir, &self.kid, self.port, self.ttl, self.device_ttl);
        self.proc = proc;
        self.key_hex = pem;
        self.wait();
    }

    /// A token with `claims`, signed ES256 with the provider's current key (and its `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        let der: Vec<u8> = (0..self.key_hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&self.key_hex[i..i + 2], 16).unwrap())
            .collect();
        let key = jsonwebtoken::EncodingKey::from_ec_der(&der);
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }

    /// Completes a device-flow sign-in as `user`, as a browser would: opens the verification
    /// URI, confirms the code, logs in, consents.
    pub async fn complete_device_flow(
        &self,
        verification_uri_complete: &str,
        user: &str,
    ) -> Result<String, String> {
        mayfly_examples::idp::complete_device_flow(verification_uri_complete, user)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// Presses "Abort" on the device flow's confirmation page, as a person who does not
    /// recognise the code would.
    pub async fn abort_device_flow(
        &self,
        verification_uri_complete: &str,
    ) -> Result<String, String> {
        mayfly_examples::idp::abort_device_flow(verification_uri_complete)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    /// Follows an authorization URL as `user` to wherever it ends (the CLI's loopback
    /// redirect, for the code flow); the last page.
    pub async fn complete_browser_flow(&self, url: &str, user: &str) -> Result<String, String> {
        mayfly_examples::idp::complete_browser_flow(url, user)
            .await
            .map_err(|e| format!("{e:#}"))
    }
}
