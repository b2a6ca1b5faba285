//! The watch stream: `GET /v1/watch` over mTLS, held open, one snapshot per line; opened at
//! the first replica that serves it, and that replica tried last next time when it breaks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use rustls::ClientConfig;

use super::replicas::{Candidate, all_failed, fails_over};
use super::{CALL_TIMEOUT, CaClient, ClientError};
use crate::identity::api;
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

/// An open watch stream: its connection and the streaming body.
type WatchStream = (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
    hyper::body::Incoming,
);

impl CaClient {
    /// Follows `GET /v1/watch` over mTLS, sending each snapshot to `out`, until the stream
    /// ends or fails (the caller reconnects).
    pub async fn watch(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        out: tokio::sync::mpsc::Sender<api::Snapshot>,
    ) -> Result<(), ClientError> {
        self.watch_with_endpoints(bundles, current, &[], out).await
    }

    /// [`CaClient::watch`], with the live endpoints of `upstreams` (SPIFFE IDs) in every
    /// snapshot, and a snapshot whenever they change.
    pub async fn watch_with_endpoints(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        upstreams: &[String],
        out: tokio::sync::mpsc::Sender<api::Snapshot>,
    ) -> Result<(), ClientError> {
        let tls = self.verified_tls(bundles, current)?;
        let (candidates, mut tried) = self.replicas.candidates().await;
        let mut opened = None;
        for c in candidates {
            let head =
                tokio::time::timeout(CALL_TIMEOUT, self.watch_head(&c, tls.clone(), upstreams))
                    .await
                    .map_err(|_| ClientError::Timeout(CALL_TIMEOUT))
                    .and_then(|r| r);
            match head {
                Ok(stream) => {
                    opened = Some((stream, c));
                    break;
                }
                Err(e) if fails_over(&e) => {
                    if self.replicas.len() > 1 {
                        tracing::warn!(address = %c, error = %e, "control plane replica cannot serve the watch: trying the next");
                    }
                    tried.push((c.to_string(), e));
                }
                Err(e) => return Err(e),
            }
        }
        let Some(((_sender, driver, mut body), c)) = opened else {
            return Err(all_failed(tried));
        };
        self.replicas.answered(&c);
        let r = Self::follow_stream(&mut body, out).await;
        driver.abort();
        if let Err(e) = &r {
            // The stream broke: the next watch starts with another replica.
            self.replicas.demote(&c, e);
        }
        r
    }

    /// Opens `GET /v1/watch` at `c`; the connection and the streaming body once the answer is
    /// a success.
    async fn watch_head(
        &self,
        c: &Candidate,
        tls: ClientConfig,
        upstreams: &[String],
    ) -> Result<WatchStream, ClientError> {
        let (mut sender, driver) = self.open_at(c, tls).await?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(api::WATCH_PATH)
            .header(http::header::HOST, "mayfly-ca")
            .header(api::UPSTREAMS_HEADER, upstreams.join(","))
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()));
        let resp = match req {
            Ok(req) => sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string())),
            Err(e) => Err(e),
        };
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            driver.abort();
            return Err(Self::refused(status, &body));
        }
        Ok((sender, driver, resp.into_body()))
    }

    /// Reads snapshots (one JSON line each) from a watch stream into `out` until the stream
    /// ends (`Ok`), fails, or `out` is closed (`Ok`).
    async fn follow_stream(
        body: &mut hyper::body::Incoming,
        out: tokio::sync::mpsc::Sender<api::Snapshot>,
    ) -> Result<(), ClientError> {
        let mut buf: Vec<u8> = Vec::new();
        // A heartbeat arrives every 15 s: silence for 45 s means the stream is dead.
        loop {
            let frame = match tokio::time::timeout(Duration::from_secs(45), body.frame()).await {
                Err(_) => break Err(ClientError::Timeout(Duration::from_secs(45))),
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => break Err(ClientError::Http(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            if buf.len() > 16 << 20 {
                break Err(ClientError::BadAnswer("watch snapshot over 16 MiB".into()));
            }
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let snap: api::Snapshot = serde_json::from_slice(&line[..line.len() - 1])
                    .map_err(|e| ClientError::BadAnswer(format!("watch snapshot: {e}")))?;
                if out.send(snap).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
