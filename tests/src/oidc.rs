//! A real OpenID Connect provider for tests: npm's `oidc-provider` (tests/oidc/server.mjs,
//! pinned by its package-lock.json, installed by `npm ci --prefix tests/oidc`) on 127.0.0.1,
//! with signing keys this harness generates (so it can rotate them and sign deliberately bad
//! tokens with them), and a small browser that completes its sign-in pages over plain HTTP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::Proc;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/oidc");

/// The OAuth client `mayfly login` signs in as.
pub const CLIENT_ID: &str = "mayfly-cli";

/// A running `oidc-provider`, killed on drop.
pub struct Idp {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub issuer: String,
    port: u16,
    dir: PathBuf,
    ttl: u64,
    kid: String,
    key_hex: String,
    generation: u32,
}

/// Writes a fresh P-256 key as a private JWK Set (`kid`) for the provider; returns the key
/// as PKCS#8 DER in hex, for signing tokens here.
fn new_key(path: &Path, kid: &str) -> String {
    let script = r#"
import { generateKeyPairSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
const jwk = privateKey.export({ format: 'jwk' });
writeFileSync(process.argv[1], JSON.stringify({ keys: [{ ...jwk, kid: process.argv[2], alg: 'ES256', use: 'sig' }] }));
process.stdout.write(privateKey.export({ format: 'der', type: 'pkcs8' }).toString('hex'));
"#;
    let out = Command::new("node")
        .args(["--input-type=module", "-e", script])
        .arg(path)
        .arg(kid)
        .output()
        .expect("node (Node.js 20+) must be installed to run the identity-provider tests");
    assert!(
        out.status.success(),
        "generating a key with node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Idp {
    /// Starts the provider on a free port; ID tokens live `id_token_ttl` seconds.
    pub fn start(dir: &Path, id_token_ttl: u64) -> Self {
        assert!(
            Path::new(ROOT).join("node_modules/oidc-provider").is_dir(),
            "the test identity provider is not installed: run `npm ci --prefix tests/oidc`"
        );
        let mut idp = Self {
            proc: Self::spawn(dir, "k1", 0, id_token_ttl).0,
            issuer: String::new(),
            port: 0,
            dir: dir.to_owned(),
            ttl: id_token_ttl,
            kid: "k1".into(),
            key_hex: String::new(),
            generation: 1,
        };
        idp.key_hex = std::fs::read_to_string(dir.join("idp-k1.hex")).unwrap();
        idp.wait();
        idp
    }

    fn spawn(dir: &Path, kid: &str, port: u16, ttl: u64) -> (Proc, String) {
        let jwks = dir.join(format!("idp-{kid}.json"));
        let pem = new_key(&jwks, kid);
        std::fs::write(dir.join(format!("idp-{kid}.hex")), &pem).unwrap();
        let mut cmd = Command::new("node");
        cmd.current_dir(ROOT)
            .arg("server.mjs")
            .args(["--port", &port.to_string()])
            .arg("--jwks")
            .arg(&jwks)
            .args(["--id-token-ttl", &ttl.to_string()]);
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
        let (proc, pem) = Self::spawn(&self.dir, &self.kid, self.port, self.ttl);
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
        let page = Browser::default()
            .browse(verification_uri_complete, user)
            .await?;
        if page.contains("Sign-in Success") {
            Ok(page)
        } else {
            Err(format!("the device flow did not succeed:\n{page}"))
        }
    }

    /// Follows an authorization URL as `user` to wherever it ends (the CLI's loopback
    /// redirect, for the code flow); the last page.
    pub async fn complete_browser_flow(&self, url: &str, user: &str) -> Result<String, String> {
        Browser::default().browse(url, user).await
    }
}

/// Just enough of a browser for the provider's pages: cookies, redirects, the first form of
/// each page (hidden fields kept, `login` and `password` filled in).
#[derive(Default)]
struct Browser {
    cookies: BTreeMap<String, String>,
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2F;", "/")
        .replace("&#47;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let i = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = tag[i..].find('"')? + i;
    Some(unescape(&tag[i..end]))
}

fn resolve(base: &str, target: &str) -> String {
    if target.starts_with("http://") || target.starts_with("https://") {
        return target.to_owned();
    }
    let origin_end = base[7..].find('/').map(|i| i + 7).unwrap_or(base.len());
    if target.starts_with('/') {
        format!("{}{target}", &base[..origin_end])
    } else if target.is_empty() {
        base.to_owned()
    } else {
        let dir_end = base.rfind('/').unwrap_or(base.len());
        format!("{}/{target}", &base[..dir_end])
    }
}

/// The first form of `html`: its action and fields.
fn first_form(html: &str, user: &str) -> Option<(String, Vec<(String, String)>)> {
    let start = html.find("<form")?;
    let end = html[start..].find("</form>").map(|e| e + start)?;
    let form = &html[start..end];
    let tag_end = form.find('>')?;
    let action = attr(&form[..tag_end], "action").unwrap_or_default();
    let mut fields = Vec::new();
    let mut rest = form;
    while let Some(i) = rest.find("<input") {
        let tag_end = rest[i..].find('>').map(|e| e + i)?;
        let tag = rest[i..tag_end].replace('\n', " ");
        if let Some(name) = attr(&tag, "name") {
            let value = match name.as_str() {
                "login" | "password" => user.to_owned(),
                _ => attr(&tag, "value").unwrap_or_default(),
            };
            fields.push((name, value));
        }
        rest = &rest[tag_end..];
    }
    Some((action, fields))
}

fn form_encode(fields: &[(String, String)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Browser {
    async fn browse(&mut self, start: &str, user: &str) -> Result<String, String> {
        let (mut url, mut form) = (start.to_owned(), None::<String>);
        for _ in 0..30 {
            let (status, location, body) = self.request(&url, form.take()).await?;
            if (300..400).contains(&status) {
                url = resolve(&url, &location.ok_or("a redirect without a Location")?);
                continue;
            }
            if status != 200 {
                return Err(format!("{url}: HTTP {status}\n{body}"));
            }
            match first_form(&body, user) {
                Some((action, fields)) => {
                    url = resolve(&url, &action);
                    form = Some(form_encode(&fields));
                }
                None => return Ok(body),
            }
        }
        Err(format!("still being redirected after 30 pages, at {url}"))
    }

    async fn request(
        &mut self,
        url: &str,
        form: Option<String>,
    ) -> Result<(u16, Option<String>, String), String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http on loopback"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        assert!(authority.starts_with("127.0.0.1:"), "{url}: loopback only");
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut req = hyper::Request::builder()
            .uri(if path.is_empty() { "/" } else { path })
            .header("host", authority)
            .header("cookie", cookie);
        let body = match form {
            Some(f) => {
                req = req
                    .method("POST")
                    .header("content-type", "application/x-www-form-urlencoded");
                Bytes::from(f)
            }
            None => Bytes::new(),
        };
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            sender.send_request(req.body(Full::new(body)).unwrap()),
        )
        .await
        .map_err(|_| format!("{url}: no answer"))?
        .map_err(|e| format!("{url}: {e}"))?;
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap_or_default();
            let pair = c.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                if v.is_empty() {
                    self.cookies.remove(k.trim());
                } else {
                    self.cookies.insert(k.trim().to_owned(), v.to_owned());
                }
            }
        }
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        driver.abort();
        Ok((
            status,
            location,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    }
}
