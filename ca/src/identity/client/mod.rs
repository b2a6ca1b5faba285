//! The control-plane client a sidecar uses: first contact pinned by the join token, SVID
//! bootstrap with the token, renewal over mTLS with the current SVID; audit deliveries over a
//! kept-open connection in [`AuditSession`] (its own file, `audit_session.rs`).
//!
//! A control plane may run as several replicas: the client knows every address (`replicas.rs`)
//! and moves to the next at once when one does not connect, fails its handshake, breaks the
//! exchange or answers with a server error, remembering the one that answered last.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

mod audit_session;
mod endpoints;
mod jwt;
mod people;
mod replicas;
mod user;
mod watch;

pub use audit_session::AuditSession;
pub use replicas::CONNECT_TIMEOUT;
use replicas::{Candidate, Replicas, all_failed, fails_over};
pub use user::UserSvid;

use crate::identity::api::{self, ErrorBody, SvidRequest, SvidResponse};
use crate::identity::bundle::{BundleError, BundleSet, TrustBundle};
use crate::identity::crypto::provider;
use crate::identity::id::{SpiffeId, TrustDomain, parse_id};
use crate::identity::keys::SecretKey;
use crate::identity::signing::issue::make_csr;
use crate::identity::tls::{Credentials, TlsError, client_config, dial_name};
use crate::identity::token::JoinToken;
use crate::identity::verify::{IdMatcher, SharedBundles, describe_tls_error};

/// How long one control-plane call may take, connect to last byte.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TCP connect failed.
    #[error("cannot reach the control plane at {addr}: {source}")]
    Connect {
        /// Address dialled.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, wrong server identity, ...).
    #[error("TLS handshake with the control plane at {addr} failed: {reason}")]
    Tls {
        /// Address dialled.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Building the TLS configuration failed.
    #[error(transparent)]
    Config(#[from] TlsError),
    /// The HTTP exchange failed.
    #[error("HTTP exchange with the control plane failed: {0}")]
    Http(String),
    /// No answer in time.
    #[error("the control plane did not answer within {0:?}")]
    Timeout(Duration),
    /// The control plane refused the request.
    #[error("the control plane refused: {error} ({status}, {reason})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Reason code.
        reason: String,
        /// Message.
        error: String,
    },
    /// The answer does not parse.
    #[error("unexpected answer from the control plane: {0}")]
    BadAnswer(String),
    /// The bundle from first contact does not contain the root the token pins.
    #[error(
        "the control plane's trust bundle does not contain the root pinned by the join token: wrong control plane address, or a man in the middle"
    )]
    PinMismatch,
    /// Bundle parse error.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// CSR construction failed.
    #[error("cannot build CSR: {0}")]
    Csr(String),
    /// No control-plane address was given.
    #[error("no control-plane address: give at least one HOST:PORT")]
    NoAddress,
    /// Every control-plane address was tried and none answered.
    #[error("no control-plane replica answered: {}", tried_list(tried))]
    NoReplica {
        /// Each address tried, with why it failed.
        tried: Vec<(String, Box<ClientError>)>,
    },
}

/// `A: why; B: why`.
fn tried_list(tried: &[(String, Box<ClientError>)]) -> String {
    tried
        .iter()
        .map(|(a, e)| format!("{a}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ClientError {
    /// Whether retrying later may help (network trouble, server errors) as opposed to a
    /// refusal that will not change (bad token, wrong ID).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout(_) | ClientError::Http(_) => true,
            ClientError::Refused { status, .. } => *status >= 500 || *status == 429,
            ClientError::NoReplica { tried } => tried.iter().any(|(_, e)| e.is_transient()),
            _ => false,
        }
    }
}

/// What the control plane returned for an SVID request.
#[derive(Debug, Clone)]
pub struct IssuedChain {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle of our trust domain.
    pub bundle: TrustBundle,
    /// Validity from now.
    pub ttl: Duration,
    /// Leaf serial.
    pub serial: String,
}

/// Accepts any server certificate. Used for one request only: fetching the bundle on first
/// contact, whose content is then checked against the join token's pin.
#[derive(Debug)]
struct FirstContact;

impl ServerCertVerifier for FirstContact {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The credential sent with an SVID request besides (or instead of) the mTLS certificate.
enum Bootstrap {
    /// A join token.
    Token(String),
    /// A Kubernetes service-account token.
    K8s(String),
    /// None: renewal with the current SVID.
    None,
}

/// An HTTP/1.1 connection to the control plane: the sender and the task driving it.
type Http1 = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
);

/// One request on an open connection; the answer's status and body (at most 1 MiB).
async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    content_type: &'static str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), ClientError> {
    sender
        .ready()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "mayfly-ca")
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body))
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, body))
}

/// A client for one control plane, at one address or several (its replicas). Clones share
/// which address answered last.
#[derive(Debug, Clone)]
pub struct CaClient {
    replicas: Arc<Replicas>,
    trust_domain: TrustDomain,
    ca_id: SpiffeId,
}

impl CaClient {
    /// A client for the control plane at `addr` serving `trust_domain`: one `host:port`, or
    /// several separated by commas (replicas, tried in turn; a name may resolve to several).
    pub fn new(addr: impl Into<String>, trust_domain: TrustDomain) -> Result<Self, ClientError> {
        let addr = addr.into();
        Self::with_addresses(addr.split(',').map(str::to_owned).collect(), trust_domain)
    }

    /// A client for the control plane's replicas at `addrs` (each `host:port`).
    pub fn with_addresses(
        addrs: Vec<String>,
        trust_domain: TrustDomain,
    ) -> Result<Self, ClientError> {
        let ca_id = parse_id(&format!("spiffe://{}{}", trust_domain, api::CA_ID_PATH))
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(Self {
            replicas: Arc::new(Replicas::new(addrs)?),
            trust_domain,
            ca_id,
        })
    }

    /// The control plane's own SPIFFE ID.
    pub fn ca_id(&self) -> &SpiffeId {
        &self.ca_id
    }

    /// The address that answered last (`None` before the first answer).
    pub fn address_in_use(&self) -> Option<std::net::SocketAddr> {
        self.replicas.in_use()
    }

    /// How often the address in use changed to another replica.
    pub fn failovers(&self) -> u64 {
        self.replicas.failovers()
    }

    /// One request, to each address in turn until one answers with anything but a server
    /// error; each address gets [`CONNECT_TIMEOUT`] to connect and [`CALL_TIMEOUT`] in all.
    async fn call(
        &self,
        tls: ClientConfig,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (candidates, mut tried) = self.replicas.candidates().await;
        let body = Bytes::from(body.unwrap_or_default());
        for c in candidates {
            let attempt = tokio::time::timeout(
                CALL_TIMEOUT,
                self.call_at(&c, tls.clone(), method.clone(), path, body.clone()),
            )
            .await
            .map_err(|_| ClientError::Timeout(CALL_TIMEOUT))
            .and_then(|r| r);
            let e = match attempt {
                Ok((status, body)) if status.is_server_error() => Self::refused(status, &body),
                Ok(answer) => {
                    self.replicas.answered(&c);
                    return Ok(answer);
                }
                Err(e) if fails_over(&e) => e,
                Err(e) => return Err(e),
            };
            if self.replicas.len() > 1 {
                tracing::warn!(address = %c, error = %e, "control plane replica failed: trying the next");
            }
            tried.push((c.to_string(), e));
        }
        Err(all_failed(tried))
    }

    async fn call_at(
        &self,
        c: &Candidate,
        tls: ClientConfig,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let (mut sender, driver) = self.open_at(c, tls).await?;
        let r = send(&mut sender, method, path, "application/json", body).await;
        driver.abort();
        r
    }

    /// A verified TLS connection to the first address that gives one (see [`Self::call`] for
    /// the order), and which address that is.
    async fn open(&self, tls: ClientConfig) -> Result<(Http1, Candidate), ClientError> {
        let (candidates, mut tried) = self.replicas.candidates().await;
        for c in candidates {
            match self.open_at(&c, tls.clone()).await {
                Ok(conn) => return Ok((conn, c)),
                Err(e) => {
                    if self.replicas.len() > 1 {
                        tracing::warn!(address = %c, error = %e, "cannot connect to a control plane replica: trying the next");
                    }
                    tried.push((c.to_string(), e));
                }
            }
        }
        Err(all_failed(tried))
    }

    /// A verified TLS connection to `c`, speaking HTTP/1.1, within [`CONNECT_TIMEOUT`]; the
    /// task driving it ends when the sender is dropped or the handle aborted.
    async fn open_at(&self, c: &Candidate, tls: ClientConfig) -> Result<Http1, ClientError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect(c, tls))
            .await
            .map_err(|_| ClientError::Connect {
                addr: c.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                ),
            })?
    }

    async fn connect(c: &Candidate, tls: ClientConfig) -> Result<Http1, ClientError> {
        let tcp = TcpStream::connect(c.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: c.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = TlsConnector::from(Arc::new(tls))
            .connect(dial_name(), tcp)
            .await
            .map_err(|e| ClientError::Tls {
                addr: c.to_string(),
                reason: describe_tls_error(&e),
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, driver))
    }

    /// `method path` with an optional JSON body over `tls`; a success's body parsed as `T`, a
    /// refusal with the control plane's reason and message.
    async fn json_call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        tls: ClientConfig,
        method: Method,
        path: &str,
        req: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = req
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (status, body) = self.call(tls, method, path, body).await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// An issued certificate chain as the control plane sends it (base64 DER, leaf first).
    fn decode_chain(chain: &[String]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        chain
            .iter()
            .map(|c| STANDARD.decode(c).map(CertificateDer::from))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::BadAnswer(format!("chain: {e}")))
    }

    fn refused(status: StatusCode, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => ClientError::Refused {
                status: status.as_u16(),
                reason: e.reason,
                error: e.error,
            },
            Err(_) => ClientError::Refused {
                status: status.as_u16(),
                reason: "http".into(),
                error: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            },
        }
    }

    fn verified_tls(
        &self,
        bundles: SharedBundles,
        creds: Arc<Credentials>,
    ) -> Result<ClientConfig, ClientError> {
        Ok(client_config(
            creds,
            bundles,
            IdMatcher::ControlPlane(self.ca_id.clone()),
            &[b"http/1.1"],
        )?)
    }

    /// First contact: fetches the bundle without verifying the server, then keeps only the root
    /// the join token pins. Everything after this is verified against that root.
    pub async fn fetch_pinned_root(&self, pin: &str) -> Result<TrustBundle, ClientError> {
        let mut tls = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsError::from)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FirstContact))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (status, body) = self.call(tls, Method::GET, api::BUNDLE_PATH, None).await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        let text = std::str::from_utf8(&body).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let full = TrustBundle::from_jwks(self.trust_domain.clone(), text)?;
        let pinned: Vec<_> = full
            .roots()
            .iter()
            .filter(|r| {
                crate::identity::svid::spki_der(r)
                    .map(|spki| {
                        hex::encode(crate::identity::keys::sha256(&spki)).eq_ignore_ascii_case(pin)
                    })
                    .unwrap_or(false)
            })
            .cloned()
            .collect();
        if pinned.is_empty() {
            return Err(ClientError::PinMismatch);
        }
        Ok(TrustBundle::new(
            self.trust_domain.clone(),
            pinned,
            full.sequence(),
            full.refresh_hint(),
        )?)
    }

    /// Fetches the current bundle over a verified connection.
    pub async fn fetch_bundle(&self, bundles: SharedBundles) -> Result<TrustBundle, ClientError> {
        let tls = self.verified_tls(bundles, Credentials::new())?;
        let (status, body) = self.call(tls, Method::GET, api::BUNDLE_PATH, None).await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        let text = std::str::from_utf8(&body).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(TrustBundle::from_jwks(self.trust_domain.clone(), text)?)
    }

    /// Bootstrap: a fresh key's CSR plus the join token, verified against the pinned root.
    pub async fn bootstrap(
        &self,
        token: &JoinToken,
        key: &SecretKey,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedChain, ClientError> {
        let root = self.fetch_pinned_root(&token.pin).await?;
        let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(BundleSet::single(root)));
        let tls = self.verified_tls(bundles, Credentials::new())?;
        let auth = Bootstrap::Token(token.reveal().to_string());
        self.request_svid(tls, key, id, auth, ttl).await
    }

    /// Bootstrap by Kubernetes attestation: a fresh key's CSR plus the pod's projected
    /// service-account token (`jwt`), over a connection verified against the root `pin`
    /// designates (hex SHA-256 of its SubjectPublicKeyInfo, as in join tokens).
    pub async fn bootstrap_k8s(
        &self,
        jwt: &str,
        pin: &str,
        key: &SecretKey,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedChain, ClientError> {
        let root = self.fetch_pinned_root(pin).await?;
        let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(BundleSet::single(root)));
        let tls = self.verified_tls(bundles, Credentials::new())?;
        let auth = Bootstrap::K8s(jwt.trim().to_owned());
        self.request_svid(tls, key, id, auth, ttl).await
    }

    /// Renewal: mTLS with the current SVID, CSR for a new key.
    pub async fn renew(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        key: &SecretKey,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedChain, ClientError> {
        let tls = self.verified_tls(bundles, current)?;
        self.request_svid(tls, key, id, Bootstrap::None, ttl).await
    }

    /// A session for audit deliveries over one kept-open mTLS connection (see
    /// [`AuditSession`]).
    pub fn audit_session(&self, bundles: SharedBundles, current: Arc<Credentials>) -> AuditSession {
        AuditSession::new(self.clone(), bundles, current)
    }

    async fn request_svid(
        &self,
        tls: ClientConfig,
        key: &SecretKey,
        id: &SpiffeId,
        auth: Bootstrap,
        ttl: Option<Duration>,
    ) -> Result<IssuedChain, ClientError> {
        let csr = make_csr(key, id).map_err(|e| ClientError::Csr(e.to_string()))?;
        let (token, k8s_token) = match auth {
            Bootstrap::Token(t) => (Some(t), None),
            Bootstrap::K8s(t) => (None, Some(t)),
            Bootstrap::None => (None, None),
        };
        let req = SvidRequest {
            csr: STANDARD.encode(csr),
            token,
            k8s_token,
            ttl: ttl.map(|t| t.as_secs()),
        };
        let resp: SvidResponse = self
            .json_call(tls, Method::POST, api::SVID_PATH, Some(&req))
            .await?;
        let chain = Self::decode_chain(&resp.chain)?;
        let bundle = TrustBundle::from_jwks(self.trust_domain.clone(), &resp.bundle.to_string())?;
        Ok(IssuedChain {
            chain,
            bundle,
            ttl: Duration::from_secs(resp.ttl),
            serial: resp.serial,
        })
    }
}
