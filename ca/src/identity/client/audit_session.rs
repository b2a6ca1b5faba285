//! The sidecar's audit deliveries to the control plane: one kept-open mTLS connection, replaced
//! when the SVID rotates, and moved to another replica when its replica fails.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;

use super::replicas::{Candidate, fails_over};
use super::{CALL_TIMEOUT, CaClient, ClientError, send};
use crate::identity::api;
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

/// Audit deliveries over one kept-open mTLS connection (HTTP/1.1 keep-alive): one TLS
/// handshake per SVID rather than per batch, so a delivery does not stall the sidecar's data
/// path for a handshake. The connection is replaced when our SVID rotates, when the control
/// plane closes it, and after any error; a replica that fails (no connection, a broken
/// exchange, a server error) is left for the next address at once.
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
    /// The replica it goes to.
    to: Candidate,
    /// Whether an exchange on it has succeeded (a later failure may be an idle close).
    used: bool,
}

impl Drop for KeptConn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl std::fmt::Debug for AuditSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSession")
            .field("addr", &self.client.replicas.shown())
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
    /// at any moment) is replaced and the batch sent once more, and so is one whose replica
    /// fails, to another replica; redelivery is safe, the control plane skips records it has.
    pub async fn post(&mut self, lines: Bytes) -> Result<u64, ClientError> {
        let reused = self.keep_if_current();
        // Each replica once, and once more for a kept connection the server had closed.
        let attempts = self.client.replicas.len() + usize::from(reused);
        let mut r = self.post_once(lines.clone()).await;
        for _ in 1..attempts {
            match &r {
                Err(e) if fails_over(e) => r = self.post_once(lines.clone()).await,
                _ => break,
            }
        }
        r
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
        let ((sender, driver), to) = self.client.open(tls).await?;
        self.client.replicas.answered(&to);
        Ok(KeptConn {
            sender,
            driver,
            svid,
            to,
            used: false,
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
                self.drop_conn(&e);
                return Err(e);
            }
        };
        if status.is_server_error() {
            let e = CaClient::refused(status, &body);
            if let Some(c) = self.conn.take() {
                self.client.replicas.demote(&c.to, &e);
            }
            return Err(e);
        }
        if let Some(c) = self.conn.as_mut() {
            c.used = true;
        }
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

    /// Drops the kept connection after `e`; a replica that failed on a fresh connection is
    /// tried last next time (a used one may just have been closed while idle).
    fn drop_conn(&mut self, e: &ClientError) {
        if let Some(c) = self.conn.take()
            && !c.used
            && fails_over(e)
        {
            self.client.replicas.demote(&c.to, e);
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
