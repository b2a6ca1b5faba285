//! A small HTTP/1.1 client for an identity provider's discovery document, JWK Set, device
//! authorization and token endpoints: hyper over rustls on the one aws-lc-rs provider, the
//! system's CA certificates (`SSL_CERT_FILE`, else `/etc/ssl/certs/ca-certificates.crt`) plus
//! any extra CA file, no redirects, bounded in time and size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{Url, UrlError};
use crate::identity::crypto::provider;

/// How long one request may take, connect to last byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read.
pub const MAX_ANSWER: usize = 1024 * 1024;
/// The system CA certificates when `SSL_CERT_FILE` is not set.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why a request to the identity provider failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The URL is not acceptable.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The CA certificates cannot be read.
    #[error("cannot read CA certificates from {0}: {1}")]
    Roots(PathBuf, String),
    /// Connecting, TLS or HTTP failed.
    #[error("{url}: {reason}")]
    Transport {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No answer in time.
    #[error("{0}: no answer within {FETCH_TIMEOUT:?}")]
    Timeout(String),
    /// An answer that is not what was asked for.
    #[error("{url}: {reason}")]
    BadAnswer {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// A client for `http(s)` identity-provider endpoints. Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    tls: Option<Arc<ClientConfig>>,
    roots_error: Option<String>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("https", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn read_roots(store: &mut RootCertStore, path: &Path) -> Result<usize, FetchError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| FetchError::Roots(path.to_owned(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| FetchError::Roots(path.to_owned(), e.to_string()))?;
    let (added, _) = store.add_parsable_certificates(certs);
    Ok(added)
}

impl HttpClient {
    /// A client trusting the system's CA certificates and those in `extra_ca` (a PEM file).
    /// Missing system certificates only matter once an `https` URL is fetched; an unreadable
    /// `extra_ca` is an error now.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, FetchError> {
        let mut roots = RootCertStore::empty();
        let system = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
        let mut roots_error = read_roots(&mut roots, &system).err().map(|e| e.to_string());
        if let Some(p) = extra_ca {
            read_roots(&mut roots, p)?;
            roots_error = None;
        }
        let tls = if roots.is_empty() {
            None
        } else {
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| FetchError::Roots(system.clone(), e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(c))
        };
        Ok(Self { tls, roots_error })
    }

    /// `GET url`; the status and body.
    pub async fn get(&self, url: &str) -> Result<(u16, Bytes), FetchError> {
        self.request(Method::GET, url, None).await
    }

    /// `POST url` with a form body; the status and body.
    pub async fn post_form(&self, url: &str, form: String) -> Result<(u16, Bytes), FetchError> {
        self.request(Method::POST, url, Some(form)).await
    }

    /// `GET url` expecting 200 and JSON of type `T`.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, FetchError> {
        let (status, body) = self.get(url).await?;
        if status != 200 {
            return Err(FetchError::BadAnswer {
                url: url.to_owned(),
                reason: format!("HTTP {status}"),
            });
        }
        serde_json::from_slice(&body).map_err(|e| FetchError::BadAnswer {
            url: url.to_owned(),
            reason: format!("not the JSON expected: {e}"),
        })
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        form: Option<String>,
    ) -> Result<(u16, Bytes), FetchError> {
        let u = Url::parse(url)?;
        tokio::time::timeout(FETCH_TIMEOUT, self.exchange(&u, method, form))
            .await
            .map_err(|_| FetchError::Timeout(url.to_owned()))?
    }

    async fn exchange(
        &self,
        u: &Url,
        method: Method,
        form: Option<String>,
    ) -> Result<(u16, Bytes), FetchError> {
        let transport = |reason: String| FetchError::Transport {
            url: u.text.clone(),
            reason,
        };
        let host = u.host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((host, u.port))
            .await
            .map_err(|e| transport(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let authority = if (u.https && u.port == 443) || (!u.https && u.port == 80) {
            u.host.clone()
        } else {
            format!("{}:{}", u.host, u.port)
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&u.path_and_query)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json");
        let body = match form {
            Some(f) => {
                req = req.header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                );
                Bytes::from(f)
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| transport(e.to_string()))?;
        if u.https {
            let Some(tls) = &self.tls else {
                return Err(transport(format!(
                    "no CA certificates to verify it with ({})",
                    self.roots_error.as_deref().unwrap_or("none found")
                )));
            };
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| transport(format!("bad server name: {e}")))?;
            let stream = TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| transport(format!("TLS: {e}")))?;
            send(TokioIo::new(stream), req, &u.text).await
        } else {
            send(TokioIo::new(tcp), req, &u.text).await
        }
    }
}

async fn send<S>(
    io: TokioIo<S>,
    req: Request<Full<Bytes>>,
    url: &str,
) -> Result<(u16, Bytes), FetchError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |reason: String| FetchError::Transport {
        url: url.to_owned(),
        reason,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| transport(e.to_string()))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| transport(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}
