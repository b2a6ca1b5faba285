//! The sidecar's audit deliveries to the control plane: one kept-open mTLS connection, replaced
//! when the SVID rotates.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;

use super::{CALL_TIMEOUT, CaClient, ClientError, send};
use crate::identity::api;
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

/// Audit deliveries over one kept-open mTLS connection (HTTP/1.1 keep-alive): one TLS
/// handshake per SVID rather than per batch, so a delivery does not stall the sidecar's data
/// path for a handshake. The connection is replaced when our SVID rotates, when the control
/// plane closes it, and after any error.
pub struct AuditSession {
    client: CaClient,
    bundles: SharedBundles,
    creds: Arc<Credentials>,
    conn: Option<KeptConn>,
}

struct KeptConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
    /// The SVID current when the connection was made.
    svid: Arc<crate::identity::tls::Svid>,
}

impl Drop for KeptConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl std::fmt::Debug for AuditSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSession")
            .field("addr", &self.client.addr)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl AuditSession {
    pub(super) fn new(client: CaClient, bundles: SharedBundles, creds: Arc<Credentials>) -> Self {
        Self {
            client,
            bundles,
            creds,
            conn: None,
        }
    }

    /// Delivers audit records (JSON lines); returns the highest seq the control plane has
    /// stored for that chain. A kept connection that fails (the server may close an idle one
    /// at any moment) is replaced and the batch sent once more; redelivery is safe, the control
    /// plane skips records it has.
    pub async fn post(&mut self, lines: Bytes) -> Result<u64, ClientError> {
        let reused = self.keep_if_current();
        match self.post_once(lines.clone()).await {
            Err(_) if reused => self.post_once(lines).await,
            r => r,
        }
    }

    /// Whether there is a kept connection still worth using: open, made with the current SVID.
    fn keep_if_current(&mut self) -> bool {
        let current = self.creds.get();
        let ok = match (&self.conn, &current) {
            (Some(c), Some(cur)) => Arc::ptr_eq(&c.svid, cur) && !c.sender.is_closed(),
            _ => false,
        };
        if !ok {
            self.conn = None;
        }
        ok
    }

    async fn connect(&self) -> Result<KeptConn, ClientError> {
        let svid = self
            .creds
            .get()
            .ok_or_else(|| ClientError::Http("no SVID to present".into()))?;
        let tls = self
            .client
            .verified_tls(self.bundles.clone(), self.creds.clone())?;
        let (sender, driver) = self.client.open(tls).await?;
        Ok(KeptConn {
            sender,
            driver,
            svid,
        })
    }

    async fn post_once(&mut self, lines: Bytes) -> Result<u64, ClientError> {
        let r = tokio::time::timeout(CALL_TIMEOUT, self.exchange(lines))
            .await
            .map_err(|_| ClientError::Timeout(CALL_TIMEOUT))
            .and_then(|r| r);
        let (status, body) = match r {
            Ok(x) => x,
            Err(e) => {
                self.conn = None;
                return Err(e);
            }
        };
        let acked = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("acked").and_then(serde_json::Value::as_u64));
        match (status.is_success(), acked) {
            (true, Some(n)) => Ok(n),
            (true, None) => Err(ClientError::BadAnswer(
                "audit answer without \"acked\"".into(),
            )),
            _ => Err(CaClient::refused(status, &body)),
        }
    }

    async fn exchange(&mut self, lines: Bytes) -> Result<(StatusCode, Bytes), ClientError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| ClientError::Http("no connection".into()))?;
        send(
            &mut conn.sender,
            Method::POST,
            api::AUDIT_PATH,
            "application/x-ndjson",
            lines,
        )
        .await
    }
}
