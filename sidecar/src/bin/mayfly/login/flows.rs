//! The two ways to get an ID token: the device flow (RFC 8628) and the authorization code flow
//! with PKCE on a loopback redirect (RFC 7636, RFC 8252).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mayfly_ca::identity::oidc::{
    Discovery, HttpClient, form_encode, query_param, random_token, s256_challenge,
};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::MAX_WAIT;

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

fn token_answer(status: u16, body: &[u8]) -> Result<TokenAnswer> {
    serde_json::from_slice(body).with_context(|| {
        format!("the token endpoint answered HTTP {status} with something that is not OAuth JSON")
    })
}

fn endpoint<'a>(e: &'a Option<String>, what: &str) -> Result<&'a str> {
    e.as_deref()
        .ok_or_else(|| anyhow!("the identity provider has no {what} endpoint"))
}

/// RFC 8628: prints where to go and which code to enter, then polls until the person has
/// signed in (honouring `interval`, `slow_down` and `expires_in`). Returns the ID token.
pub(crate) async fn device(http: &HttpClient, d: &Discovery, client_id: &str) -> Result<String> {
    let auth_url = endpoint(&d.device_authorization_endpoint, "device authorization")?;
    let token_url = endpoint(&d.token_endpoint, "token")?;
    let (status, body) = http
        .post_form(
            auth_url,
            form_encode(&[("client_id", client_id), ("scope", "openid")]),
        )
        .await?;
    if status != 200 {
        let e = token_answer(status, &body).ok();
        bail!(
            "the identity provider refused the device authorization (HTTP {status}): {}",
            e.and_then(|e| e.error_description.or(e.error))
                .unwrap_or_default()
        );
    }
    let da: DeviceAuthorization =
        serde_json::from_slice(&body).context("the device authorization answer")?;
    eprintln!(
        "To sign in, open {} and enter the code {}",
        da.verification_uri, da.user_code
    );
    if let Some(complete) = &da.verification_uri_complete {
        eprintln!("or open {complete}");
    }
    let deadline = Instant::now() + Duration::from_secs(da.expires_in).min(MAX_WAIT);
    let mut interval = Duration::from_secs(da.interval.unwrap_or(5).max(1));
    loop {
        if Instant::now() + interval > deadline {
            bail!("the code expired before the sign-in was completed: run `mayfly login` again");
        }
        tokio::time::sleep(interval).await;
        let (status, body) = http
            .post_form(
                token_url,
                form_encode(&[
                    ("grant_type", DEVICE_GRANT),
                    ("device_code", &da.device_code),
                    ("client_id", client_id),
                ]),
            )
            .await?;
        let answer = token_answer(status, &body)?;
        if status == 200 {
            return answer
                .id_token
                .ok_or_else(|| anyhow!("the identity provider returned no ID token"));
        }
        match answer.error.as_deref() {
            Some("authorization_pending") => {}
            Some("slow_down") => interval += Duration::from_secs(5),
            Some("access_denied") => bail!("the sign-in was denied at the identity provider"),
            Some("expired_token") => {
                bail!("the code expired before the sign-in was completed: run `mayfly login` again")
            }
            other => bail!(
                "the identity provider refused the sign-in: {} {}",
                other.unwrap_or("error"),
                answer.error_description.unwrap_or_default()
            ),
        }
    }
}

/// Authorization code + PKCE on a loopback redirect. Returns the ID token and the nonce sent.
pub(crate) async fn browser(
    http: &HttpClient,
    d: &Discovery,
    client_id: &str,
) -> Result<(String, String)> {
    let auth_url = endpoint(&d.authorization_endpoint, "authorization")?;
    let token_url = endpoint(&d.token_endpoint, "token")?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1 for the sign-in's redirect")?;
    let redirect = format!("http://{}/callback", listener.local_addr()?);
    let (state, nonce, verifier) = (random_token(24), random_token(24), random_token(48));
    let sep = if auth_url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{auth_url}{sep}{}",
        form_encode(&[
            ("response_type", "code"),
            ("client_id", client_id),
            ("redirect_uri", &redirect),
            ("scope", "openid"),
            ("state", &state),
            ("nonce", &nonce),
            ("code_challenge", &s256_challenge(&verifier)),
            ("code_challenge_method", "S256"),
        ])
    );
    eprintln!("To sign in, open {url}");
    if let Ok(child) = std::process::Command::new("xdg-open")
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        // Reaped in the background; whether a browser opened, the URL is printed above.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
    }
    let code = tokio::time::timeout(MAX_WAIT, callback(&listener, &state))
        .await
        .map_err(|_| anyhow!("no sign-in within {} minutes", MAX_WAIT.as_secs() / 60))??;
    let (status, body) = http
        .post_form(
            token_url,
            form_encode(&[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", &redirect),
                ("client_id", client_id),
                ("code_verifier", &verifier),
            ]),
        )
        .await?;
    let answer = token_answer(status, &body)?;
    match (status, answer.id_token) {
        (200, Some(t)) => Ok((t, nonce)),
        _ => bail!(
            "the identity provider refused the code: {} {}",
            answer.error.unwrap_or_default(),
            answer.error_description.unwrap_or_default()
        ),
    }
}

/// Waits for the browser's redirect to `/callback` with our `state`; answers it with a short
/// page. Other requests (a favicon) get 404.
async fn callback(listener: &TcpListener, state: &str) -> Result<String> {
    loop {
        let (mut conn, _) = listener.accept().await?;
        let mut buf = vec![0u8; 8192];
        let mut len = 0;
        while len < buf.len() {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf[len..]))
                .await
                .unwrap_or(Ok(0))?;
            if n == 0 {
                break;
            }
            len += n;
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..len]);
        let target = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default()
            .to_owned();
        let Some(query) = target.strip_prefix("/callback?") else {
            let _ = conn
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            continue;
        };
        let outcome = if query_param(query, "state").as_deref() != Some(state) {
            Err(anyhow!(
                "the redirect's state does not match this sign-in's: ignored (another tab?)"
            ))
        } else if let Some(e) = query_param(query, "error") {
            Err(anyhow!(
                "the identity provider refused the sign-in: {e} {}",
                query_param(query, "error_description").unwrap_or_default()
            ))
        } else {
            query_param(query, "code").ok_or_else(|| anyhow!("the redirect carries no code"))
        };
        let text = match &outcome {
            Ok(_) => "Signed in: you can close this window and return to the terminal.".to_owned(),
            Err(e) => format!("Sign-in failed: {e}"),
        };
        let page = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = conn.write_all(page.as_bytes()).await;
        match outcome {
            // A redirect with a wrong state may be a stale tab: keep waiting for ours.
            Err(e) if query_param(query, "state").as_deref() != Some(state) => {
                eprintln!("mayfly: {e}");
            }
            other => return other,
        }
    }
}
