//! The inbound's client towards an `app_protocol = "http2"` app: one h2c connection (built by
//! [`super::h2_client`]) that every request multiplexes on, held directly as a hyper
//! `SendRequest` (a clone per request) instead of a checkout from hyper-util's generic pool.
//!
//! The connection is replaced when it closes (the app sent GOAWAY or went away); a request
//! the closing connection never sent is sent once more on the new one. A connection that
//! served no request for a whole `idle` period is let go (it closes once its last stream
//! ends), so an idle sidecar holds no connection to its app for long.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::Body;

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot connect to the app at {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("HTTP/2 handshake with the app failed: {0}")]
    Handshake(hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
    /// The dial this request waited for failed.
    #[error("{0}")]
    Waited(String),
}

/// The connection requests go to, and whether one was sent on it since the idle check.
struct Current {
    sender: SendRequest<Body>,
    id: u64,
    used: Arc<AtomicBool>,
}

/// One app's h2c connection, shared by every request of every peer connection.
pub struct H2App {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
    current: Mutex<Option<Current>>,
    /// Dials are serialised: requests that find no connection wait for one dial, and share
    /// its failure (why the last one failed) rather than each waiting out a connect timeout
    /// of its own in turn.
    dialing: tokio::sync::Mutex<Option<String>>,
    attempts: AtomicU64,
    dials: AtomicU64,
}

impl H2App {
    pub fn new(addr: SocketAddr, connect_timeout: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            addr,
            connect_timeout,
            idle,
            current: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
            dials: AtomicU64::new(0),
        })
    }

    /// Connections opened so far (dials that succeeded).
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::Relaxed)
    }

    /// Dials attempted so far, failed ones included.
    #[cfg(test)]
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Sends a request (absolute URI) to the app.
    pub async fn request(
        self: &Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, AppError> {
        let (mut sender, id) = self.sender().await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // Never sent: the connection was closing. Once more, on a new one.
                Some(req) => {
                    debug!(error = %e.error(), "app connection closing: request sent on a new one");
                    self.forget(id);
                    let (mut sender, _) = self.sender().await?;
                    sender.send_request(req).await.map_err(AppError::Request)
                }
                None => Err(AppError::Request(e.into_error())),
            },
        }
    }

    /// The open connection, or a new one.
    async fn sender(self: &Arc<Self>) -> Result<(SendRequest<Body>, u64), AppError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let before = self.attempts.load(Ordering::Acquire);
        let mut last_failure = self.dialing.lock().await;
        // Another request may have dialled while this one waited: its connection, or its
        // failure.
        if let Some(s) = self.open() {
            return Ok(s);
        }
        if self.attempts.load(Ordering::Acquire) != before
            && let Some(why) = last_failure.as_ref()
        {
            return Err(AppError::Waited(why.clone()));
        }
        let r = self.dial().await;
        *last_failure = r.as_ref().err().map(ToString::to_string);
        // Counted once done: requests that came while it ran share its outcome.
        self.attempts.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn open(&self) -> Option<(SendRequest<Body>, u64)> {
        let cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let c = cur.as_ref().filter(|c| !c.sender.is_closed())?;
        c.used.store(true, Ordering::Relaxed);
        Some((c.sender.clone(), c.id))
    }

    /// Stops sending requests to connection `id` (if it is still the current one).
    fn forget(&self, id: u64) {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if cur.as_ref().is_some_and(|c| c.id == id) {
            *cur = None;
        }
    }

    async fn dial(self: &Arc<Self>) -> Result<(SendRequest<Body>, u64), AppError> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(AppError::Connect(self.addr, e.to_string())),
                Err(_) => return Err(AppError::Connect(self.addr, "timed out".into())),
            };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = super::h2_client()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(AppError::Handshake)?;
        let id = self.dials.fetch_add(1, Ordering::Relaxed) + 1;
        let used = Arc::new(AtomicBool::new(true));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "app HTTP/2 connection ended");
            }
        });
        // Lets the connection go after an idle period (a weak reference: a dropped client
        // ends the watch).
        let (pool, flag, idle) = (Arc::downgrade(self), used.clone(), self.idle);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(idle).await;
                let Some(pool) = pool.upgrade() else { return };
                if !flag.swap(false, Ordering::Relaxed) {
                    debug!("app HTTP/2 connection idle: letting it go");
                    pool.forget(id);
                    return;
                }
                if !pool.is_current(id) {
                    return;
                }
            }
        });
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        *cur = Some(Current {
            sender: sender.clone(),
            id,
            used,
        });
        Ok((sender, id))
    }

    fn is_current(&self, id: u64) -> bool {
        let cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        cur.as_ref().is_some_and(|c| c.id == id)
    }
}
