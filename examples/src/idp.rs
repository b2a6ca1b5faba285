//! The test identity provider's pages, completed without a person: the local OpenID Connect
//! provider (npm's `oidc-provider`, started from tests/oidc/server.mjs) signs people in through
//! its development login and consent forms. The quickstart stands in for alice's and bob's
//! browser with this, and the end-to-end tests (tests/src/oidc.rs) do the same; one copy for
//! both. Also the provider's signing key, made with Node (the provider runs on Node anyway).
//!
//! Loopback only: every URL must be `http://127.0.0.1:PORT/...`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The OAuth client `mayfly login` signs in as (tests/oidc/server.mjs registers it).
pub const CLIENT_ID: &str = "mayfly-cli";

/// Writes a fresh P-256 key as a private JWK Set (`kid`) for the provider at `path`; returns
/// the key as PKCS#8 DER in hex (for signing tokens with it). Needs `node` (Node.js 20+).
pub fn new_key(path: &Path, kid: &str) -> anyhow::Result<String> {
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
        .context("cannot run node (Node.js 20+)")?;
    if !out.status.success() {
        bail!(
            "generating a key with node failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("node printed a key that is not text")
}

/// Completes a device-flow sign-in as `user`, as a browser would: opens the verification URI
/// (`verification_uri_complete`, code included), confirms the code, logs in, consents.
pub async fn complete_device_flow(
    verification_uri_complete: &str,
    user: &str,
) -> anyhow::Result<String> {
    let page = Browser::default()
        .browse(verification_uri_complete, user)
        .await?;
    if page.contains("Sign-in Success") {
        Ok(page)
    } else {
        bail!("the device flow did not succeed:\n{page}")
    }
}

/// Opens the verification URI as a person who does not recognise the code would, and presses
/// the provider's "Abort" button on the confirmation page: the device flow is denied. The last
/// page.
pub async fn abort_device_flow(verification_uri_complete: &str) -> anyhow::Result<String> {
    Browser {
        abort: true,
        ..Browser::default()
    }
    .browse(verification_uri_complete, "")
    .await
}

/// Follows `url` as `user` through the provider's pages to wherever it ends (the CLI's
/// loopback redirect, for the code flow); the last page.
pub async fn complete_browser_flow(url: &str, user: &str) -> anyhow::Result<String> {
    Browser::default().browse(url, user).await
}

/// Just enough of a browser for the provider's pages: cookies, redirects, the first form of
/// each page (hidden fields kept, `login` and `password` filled in), or with `abort` the page's
/// "Abort" button where it has one.
#[derive(Default)]
struct Browser {
    cookies: BTreeMap<String, String>,
    abort: bool,
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
    let origin_end = base
        .get(7..)
        .and_then(|r| r.find('/'))
        .map_or(base.len(), |i| i + 7);
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
    async fn browse(&mut self, start: &str, user: &str) -> anyhow::Result<String> {
        let (mut url, mut form) = (start.to_owned(), None::<String>);
        let mut aborted = false;
        for _ in 0..30 {
            let (status, location, body) = self.request(&url, form.take()).await?;
            if (300..400).contains(&status) {
                url = resolve(&url, &location.context("a redirect without a Location")?);
                continue;
            }
            if status != 200 {
                bail!("{url}: HTTP {status}\n{body}");
            }
            if aborted {
                // The page after "Abort" (the provider offers to enter a code again).
                return Ok(body);
            }
            match first_form(&body, user) {
                Some((action, mut fields)) => {
                    if self.abort && body.contains("name=\"abort\"") {
                        fields.push(("abort".into(), "yes".into()));
                        aborted = true;
                    }
                    url = resolve(&url, &action);
                    form = Some(form_encode(&fields));
                }
                None => return Ok(body),
            }
        }
        bail!("still being redirected after 30 pages, at {url}")
    }

    async fn request(
        &mut self,
        url: &str,
        form: Option<String>,
    ) -> anyhow::Result<(u16, Option<String>, String)> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("{url}: only http on loopback"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if !authority.starts_with("127.0.0.1:") {
            bail!("{url}: loopback only");
        }
        let tcp = tokio::net::TcpStream::connect(authority)
            .await
            .with_context(|| url.to_owned())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| url.to_owned())?;
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
            sender.send_request(req.body(Full::new(body)).with_context(|| url.to_owned())?),
        )
        .await
        .map_err(|_| anyhow!("{url}: no answer"))?
        .with_context(|| url.to_owned())?;
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
            .with_context(|| url.to_owned())?;
        driver.abort();
        Ok((
            status,
            location,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        ))
    }
}
