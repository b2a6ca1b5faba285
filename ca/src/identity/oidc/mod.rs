//! OpenID Connect as both sides of a sign-in need it: issuer URLs (https, or http on loopback
//! only), the discovery document, a small HTTP client for the identity provider ([`fetch`]),
//! form and query encoding, and the PKCE/state/nonce helpers the CLI uses.
//!
//! The control plane verifies ID tokens in `server::oidc`; the `mayfly` CLI drives the device
//! and authorization-code flows with these pieces.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

pub mod fetch;

pub use fetch::{FetchError, HttpClient};

/// The path of the discovery document under an issuer.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Why an issuer or endpoint URL is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL with a scheme and a host.
    #[error("{0:?} is not an absolute URL: {1}")]
    Invalid(String, String),
    /// `http` to anything but a loopback address.
    #[error(
        "{0:?}: an identity provider must be reached over https (plain http only on 127.0.0.1, ::1 or localhost)"
    )]
    NotHttps(String),
    /// A query or fragment in an issuer (OpenID Connect Discovery forbids them).
    #[error("{0:?}: an issuer has no query or fragment")]
    QueryInIssuer(String),
}

/// A checked URL: https anywhere, http only to loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// The text, as given.
    pub text: String,
    /// Whether TLS is used.
    pub https: bool,
    /// Host (brackets kept for IPv6) and port, for the connection.
    pub host: String,
    /// The port.
    pub port: u16,
    /// Path and query, for the request line.
    pub path_and_query: String,
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Url {
    /// Parses `text`: https, or http with a loopback host.
    pub fn parse(text: &str) -> Result<Self, UrlError> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e: http::uri::InvalidUri| UrlError::Invalid(text.into(), e.to_string()))?;
        let scheme = uri
            .scheme_str()
            .ok_or_else(|| UrlError::Invalid(text.into(), "no scheme".into()))?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| UrlError::Invalid(text.into(), "no host".into()))?
            .to_owned();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(UrlError::Invalid(
                text.into(),
                "credentials in a URL are not accepted".into(),
            ));
        }
        let https = match scheme {
            "https" => true,
            "http" if is_loopback(&host) => false,
            "http" => return Err(UrlError::NotHttps(text.into())),
            other => {
                return Err(UrlError::Invalid(
                    text.into(),
                    format!("scheme {other:?} is not http(s)"),
                ));
            }
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path_and_query = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into());
        Ok(Self {
            text: text.to_owned(),
            https,
            host,
            port,
            path_and_query,
        })
    }

    /// Parses an issuer identifier: a URL as [`Url::parse`] with no query or fragment.
    pub fn issuer(text: &str) -> Result<Self, UrlError> {
        if text.contains('?') || text.contains('#') {
            return Err(UrlError::QueryInIssuer(text.into()));
        }
        Self::parse(text)
    }

    /// The issuer's discovery document URL.
    pub fn discovery(issuer: &str) -> Result<Self, UrlError> {
        Self::parse(&format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')))
    }
}

/// The fields of a discovery document mayfly reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovery {
    /// Must equal the configured issuer exactly.
    pub issuer: String,
    /// The JWK Set.
    pub jwks_uri: String,
    /// The token endpoint.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The authorization endpoint (code flow).
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// The device authorization endpoint (RFC 8628).
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
}

/// `application/x-www-form-urlencoded` of `pairs`.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", pct(k), pct(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes a percent-encoded query value (`+` is a space); `None` for bad escapes or UTF-8.
pub fn pct_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A query string's value for `name`, decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (pct_decode(k).as_deref() == Some(name))
            .then(|| pct_decode(v))
            .flatten()
    })
}

/// A JWT's payload, decoded but NOT verified: only to read which claim names the user
/// before the control plane verifies the token.
pub fn unverified_claims(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let payload = token.trim().split('.').nth(1)?;
    let raw = URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// `n` random bytes, base64url: PKCE verifiers, `state`, `nonce`.
pub fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    crate::identity::keys::fill_random(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// The PKCE `S256` challenge of `verifier` (RFC 7636).
pub fn s256_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(crate::identity::keys::sha256(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn issuers_need_https_except_on_loopback() {
        assert!(Url::issuer("https://idp.example.com").unwrap().https);
        let local = Url::issuer("http://127.0.0.1:5556").unwrap();
        assert_eq!((local.https, local.port), (false, 5556));
        assert!(Url::issuer("http://[::1]:80").is_ok());
        assert!(Url::issuer("http://localhost").is_ok());
        assert_eq!(
            Url::issuer("http://idp.example.com"),
            Err(UrlError::NotHttps("http://idp.example.com".into()))
        );
        assert!(matches!(
            Url::issuer("https://idp.example.com/?x=1"),
            Err(UrlError::QueryInIssuer(_))
        ));
        assert!(Url::issuer("ftp://idp.example.com").is_err());
        assert!(Url::issuer("idp.example.com").is_err());
        assert!(Url::issuer("https://user:pw@idp.example.com").is_err());
    }

    #[test]
    fn discovery_url_is_under_the_issuer_without_a_double_slash() {
        let d = Url::discovery("https://idp.example.com/realms/x/").unwrap();
        assert_eq!(
            d.path_and_query,
            "/realms/x/.well-known/openid-configuration"
        );
    }

    #[test]
    fn the_pkce_challenge_is_rfc_7636_s256() {
        // RFC 7636, appendix B.
        assert_eq!(
            s256_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn forms_encode_and_queries_decode_reserved_characters() {
        assert_eq!(
            form_encode(&[("a b", "x&y=z/é")]),
            "a%20b=x%26y%3Dz%2F%C3%A9"
        );
        assert_eq!(
            query_param("code=a%2Fb&state=s+t", "state").as_deref(),
            Some("s t")
        );
        assert_eq!(query_param("code=a%2Fb", "code").as_deref(), Some("a/b"));
        assert_eq!(query_param("code=%zz", "code"), None);
    }
}
