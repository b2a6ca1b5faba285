//! `mayfly-sidecar inject serve`: the injector as a Kubernetes mutating admission webhook.
//!
//! `POST /mutate` takes an `admission.k8s.io/v1` `AdmissionReview` and answers with the same
//! injection as the CLI, as a base64 JSON Patch. A pod that cannot be injected is **refused**
//! with the reason (the namespace asked for the mesh: fail closed). `GET /healthz` answers
//! 200. HTTPS only (the API server requires it), TLS 1.2/1.3 with aws-lc-rs; the certificate
//! and key files are re-read when they change (cert-manager renewals need no restart).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::patch::diff;
use crate::{InjectOptions, Outcome, inject_object};

/// The largest AdmissionReview read (the API server's own request limit is 3 MiB).
pub const MAX_REVIEW: usize = 4 * 1024 * 1024;

/// Why the webhook cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The certificate or key cannot be loaded.
    #[error("TLS certificate {cert} / key {key}: {reason}")]
    Tls {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The injection options are invalid.
    #[error(transparent)]
    Options(#[from] crate::InjectError),
}

/// Why an AdmissionReview is malformed (HTTP 400).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// No `request`.
    #[error("no request in the AdmissionReview")]
    NoRequest,
    /// No `request.uid`.
    #[error("no request.uid in the AdmissionReview")]
    NoUid,
    /// The patch could not be encoded.
    #[error("cannot encode the patch: {0}")]
    Patch(#[from] serde_json::Error),
}

/// Answers one AdmissionReview (already parsed as JSON). `Err` is a malformed review (HTTP 400).
pub fn review(req: &Value, opts: &InjectOptions) -> Result<Value, ReviewError> {
    let r = req.get("request").ok_or(ReviewError::NoRequest)?;
    let uid = r
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(ReviewError::NoUid)?;
    let api_version = req
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("admission.k8s.io/v1");
    let mut response = json!({ "uid": uid, "allowed": true });
    let operation = r
        .get("operation")
        .and_then(Value::as_str)
        .unwrap_or("CREATE");
    if let (Some(obj), "CREATE") = (r.get("object"), operation) {
        let ns = r.get("namespace").and_then(Value::as_str);
        let mut injected = obj.clone();
        match inject_object(&mut injected, opts, ns) {
            Ok(Outcome::Injected) => {
                let ops = diff(obj, &injected);
                let patch = serde_json::to_vec(&ops)?;
                response["patchType"] = "JSONPatch".into();
                response["patch"] = STANDARD.encode(patch).into();
            }
            Ok(_) => {}
            Err(e) => {
                response["allowed"] = false.into();
                response["status"] = json!({
                    "code": 400,
                    "reason": "BadRequest",
                    "message": format!("mayfly sidecar injection: {e}"),
                });
            }
        }
    }
    Ok(json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(opts: Arc<InjectOptions>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "{\"ok\":true}\n".into()),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_REVIEW).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        json!({ "error": e.to_string() }).to_string(),
                    );
                }
            };
            let parsed: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        json!({ "error": format!("not JSON: {e}") }).to_string(),
                    );
                }
            };
            match review(&parsed, &opts) {
                Ok(v) => {
                    if v.pointer("/response/allowed") == Some(&Value::Bool(false)) {
                        let why = v
                            .pointer("/response/status/message")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        warn!(reason = why, "pod refused");
                    }
                    reply(StatusCode::OK, v.to_string())
                }
                Err(e) => reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "error": e.to_string() }).to_string(),
                ),
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({ "error": "not found" }).to_string(),
        ),
    }
}

/// The serving certificate, re-read from its files when they change.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<CertifiedKey>,
    files: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

fn load(cert: &Path, key: &Path) -> Result<(CertifiedKey, Vec<u8>, Vec<u8>), WebhookError> {
    let err = |reason: String| WebhookError::Tls {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| err(e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    let pk = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| err(format!("key PEM: {e}")))?;
    let signing = mayfly_ca::tls::provider()
        .key_provider
        .load_private_key(pk)
        .map_err(|e| err(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match()
        .map_err(|e| err(format!("the key does not match the certificate: {e}")))?;
    Ok((ck, cert_pem, key_pem))
}

impl ReloadingCert {
    fn new(cert: &Path, key: &Path) -> Result<Self, WebhookError> {
        let (ck, c, k) = load(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: ArcSwap::from_pointee(ck),
            files: std::sync::Mutex::new((c, k)),
        })
    }

    fn reload_if_changed(&self) {
        let (Ok(c), Ok(k)) = (std::fs::read(&self.cert), std::fs::read(&self.key)) else {
            return;
        };
        let Ok(mut files) = self.files.lock() else {
            return;
        };
        if files.0 == c && files.1 == k {
            return;
        }
        match load(&self.cert, &self.key) {
            Ok((ck, c, k)) => {
                self.current.store(Arc::new(ck));
                *files = (c, k);
                info!("webhook certificate reloaded");
            }
            // Mid-update (certificate written, key not yet): try again next time.
            Err(e) => debug!(error = %e, "webhook certificate not reloaded"),
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A bound webhook, ready to serve.
pub struct Webhook {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    cert: Arc<ReloadingCert>,
    opts: Arc<InjectOptions>,
}

impl Webhook {
    /// Checks the options, loads the certificate and binds `listen`.
    pub async fn bind(
        listen: SocketAddr,
        cert: &Path,
        key: &Path,
        opts: InjectOptions,
    ) -> Result<Self, WebhookError> {
        opts.check()?;
        let resolver = Arc::new(ReloadingCert::new(cert, key)?);
        let mut tls = ServerConfig::builder_with_provider(mayfly_ca::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| WebhookError::Bind {
                addr: listen,
                source,
            })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            cert: resolver,
            opts: Arc::new(opts),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `stop` flips; the serving certificate is re-read every 30 s when its files
    /// changed (cert-manager renews them in place).
    pub async fn serve(self, stop: watch::Receiver<bool>) {
        let cert = self.cert.clone();
        let mut reload_stop = stop.clone();
        let reload = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = tick.tick() => cert.reload_if_changed(),
                    _ = reload_stop.wait_for(|s| *s) => return,
                }
            }
        });
        let (acceptor, opts) = (self.acceptor, self.opts);
        mayfly_ca::accept::serve(
            "webhook",
            self.listener,
            stop,
            mayfly_ca::accept::Unlimited,
            |tcp, peer| {
                let fut = review_conn(acceptor.clone(), opts.clone(), tcp, peer);
                (tracing::Span::none(), fut)
            },
        )
        .await;
        reload.abort();
    }
}

/// One connection from the API server: TLS, then admission reviews over HTTP/1.1 or HTTP/2.
async fn review_conn(
    acceptor: TlsAcceptor,
    opts: Arc<InjectOptions>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "webhook TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let svc = hyper::service::service_fn(move |req| {
        let opts = opts.clone();
        async move { Ok::<_, Infallible>(handle(opts, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), svc).await {
        debug!(%peer, error = %e, "webhook connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use mayfly_ca::id::parse_id;
    use mayfly_ca::keys::pem_encode;
    use mayfly_ca::testing::TestCa;
    use mayfly_ca::tls::{Credentials, client_config, dial_name};
    use mayfly_ca::verify::IdMatcher;

    use super::*;
    use crate::patch::apply;

    const PIN: &str = "3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f";

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "generateName": "orders-", "labels": { "app": "orders" } },
            "spec": {
                "serviceAccountName": "orders",
                "containers": [{ "name": "orders", "image": "orders:1", "ports": [{ "containerPort": 8080 }] }],
            },
        })
    }

    fn admission(obj: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "resource": { "group": "", "version": "v1", "resource": "pods" },
                "namespace": "shop", "operation": "CREATE", "object": obj,
            },
        })
    }

    fn patched(resp: &Value, mut obj: Value) -> Value {
        let patch = STANDARD
            .decode(resp["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        apply(&mut obj, &ops).unwrap();
        obj
    }

    #[test]
    fn the_patch_turns_the_pod_into_what_the_cli_makes() {
        let opts = InjectOptions::new(PIN, crate::tests::check_config);
        let resp = review(&admission(pod()), &opts).unwrap();
        assert_eq!(
            resp["response"]["uid"],
            "705ab4f5-6393-11e8-b7cc-42010a800002"
        );
        assert_eq!(resp["response"]["allowed"], true);
        assert_eq!(resp["response"]["patchType"], "JSONPatch");
        let mut expected = pod();
        // The namespace comes from the request when the pod names none.
        assert_eq!(
            inject_object(&mut expected, &opts, Some("shop")).unwrap(),
            Outcome::Injected
        );
        let got = patched(&resp, pod());
        assert_eq!(got, expected);
        assert_eq!(
            got["metadata"]["annotations"]["mayfly.io/spiffe-id"],
            "spiffe://mayfly.local/ns/shop/sa/orders"
        );
        // Already injected: allowed, no patch.
        let again = review(&admission(got), &opts).unwrap();
        assert_eq!(again["response"]["allowed"], true);
        assert!(again["response"].get("patch").is_none());
    }

    #[test]
    fn pods_that_cannot_be_injected_are_refused_with_the_reason() {
        let mut p = pod();
        p["spec"]["containers"][0]["ports"] = json!([]);
        let resp = review(
            &admission(p),
            &InjectOptions::new(PIN, crate::tests::check_config),
        )
        .unwrap();
        assert_eq!(resp["response"]["allowed"], false);
        let msg = resp["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("nothing to proxy"), "{msg}");
        // Updates and other operations are let through unchanged.
        let mut r = admission(pod());
        r["request"]["operation"] = "UPDATE".into();
        let resp = review(&r, &InjectOptions::new(PIN, crate::tests::check_config)).unwrap();
        assert!(resp["response"].get("patch").is_none());
        // Malformed reviews are errors (HTTP 400).
        assert!(
            review(
                &json!({}),
                &InjectOptions::new(PIN, crate::tests::check_config)
            )
            .is_err()
        );
        assert!(
            review(
                &json!({"request": {}}),
                &InjectOptions::new(PIN, crate::tests::check_config)
            )
            .is_err()
        );
    }

    async fn post(
        addr: SocketAddr,
        ca: &TestCa,
        id: &str,
        path: &str,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let tls = client_config(
            Credentials::new(),
            ca.bundles(),
            IdMatcher::Exact(parse_id(id).unwrap()),
            &[b"http/1.1"],
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let s = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(dial_name(), tcp)
            .await
            .unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(if body.is_empty() {
                Method::GET
            } else {
                Method::POST
            })
            .uri(path)
            .header(http::header::HOST, "mayfly-injector")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn the_webhook_serves_admission_reviews_over_tls() {
        let ca = TestCa::new("mayfly.local");
        let id = "spiffe://mayfly.local/ns/mayfly-system/sa/mayfly-injector";
        let (chain, key) = ca.svid(id);
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("tls.crt");
        let keyf = dir.path().join("tls.key");
        let pem: String = chain.iter().map(|c| pem_encode("CERTIFICATE", c)).collect();
        std::fs::write(&cert, pem).unwrap();
        std::fs::write(&keyf, key.to_pem().as_bytes()).unwrap();
        assert!(
            Webhook::bind(
                "127.0.0.1:0".parse().unwrap(),
                &cert,
                &keyf,
                InjectOptions::new("ab", crate::tests::check_config)
            )
            .await
            .is_err(),
            "a bad pin is refused before serving"
        );
        let hook = Webhook::bind(
            "127.0.0.1:0".parse().unwrap(),
            &cert,
            &keyf,
            InjectOptions::new(PIN, crate::tests::check_config),
        )
        .await
        .unwrap();
        let addr = hook.local_addr().unwrap();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(hook.serve(stop));
        assert_eq!(post(addr, &ca, id, "/healthz", Vec::new()).await.0, 200);
        let body = serde_json::to_vec(&admission(pod())).unwrap();
        let (status, resp) = post(addr, &ca, id, "/mutate", body).await;
        assert_eq!(status, 200);
        let got = patched(&resp, pod());
        assert_eq!(got["spec"]["initContainers"][0]["name"], "mayfly-sidecar");
        let (status, _) = post(addr, &ca, id, "/mutate", b"{not json".to_vec()).await;
        assert_eq!(status, 400);
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }
}
