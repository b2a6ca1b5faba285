//! The inbound's client towards an HTTP/1.1 app (the default `app_protocol`): keep-alive
//! connections held directly as hyper `SendRequest`s in a LIFO stack of idle ones, instead of a
//! checkout from hyper-util's generic pool (a map keyed by scheme and authority, a waiter, a
//! boxed connect future and a task per request that waits for the connection to be ready).
//!
//! A request takes the most recently used idle connection, or dials a new one: at most as many
//! connections as requests in flight. Its connection goes back on the stack once the response
//! body has ended (a body that is dropped early takes its connection down with it). A request
//! that a reused connection never sent (the app closed it while it was idle) is sent once more
//! on a new connection. An idle connection is closed after `idle`; at most `max_idle` are kept.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Body;

/// Why a request did not reach the app.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("cannot connect to the app at {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("HTTP/1.1 handshake with the app failed: {0}")]
    Handshake(hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
}

/// An idle connection and since when.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// The idle connections, most recently used last, and whether a task closes expired ones.
#[derive(Default)]
struct Stack {
    idle: VecDeque<Idle>,
    reaping: bool,
}

/// One HTTP/1.1 app's keep-alive connections, shared by every request of every peer connection.
pub struct H1App {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle: Duration,
    max_idle: usize,
    stack: Mutex<Stack>,
    dials: AtomicU64,
}

impl H1App {
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        idle: Duration,
        max_idle: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            addr,
            connect_timeout,
            idle,
            max_idle,
            stack: Mutex::new(Stack::default()),
            dials: AtomicU64::new(0),
        })
    }

    /// Connections opened so far (dials that succeeded).
    #[cfg(test)]
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::Relaxed)
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.lock().idle.len()
    }

    /// Sends a request (absolute URI: its authority becomes `Host` if the request has none) to
    /// the app, in origin form.
    pub async fn request(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, H1Error> {
        if !req.headers().contains_key(HOST)
            && let Some(host) = host_of(req.uri())
        {
            req.headers_mut().insert(HOST, host);
        }
        let pq = req.uri().path_and_query().cloned();
        *req.uri_mut() = match pq {
            Some(pq) if pq.as_str() != "/" => Uri::from(pq),
            _ => Uri::default(),
        };
        let (mut sender, reused) = match self.checkout() {
            Some(s) => (s, true),
            None => (self.dial().await?, false),
        };
        let resp = match sender.try_send_request(req).await {
            Ok(resp) => resp,
            Err(mut e) => match e.take_message() {
                // Never sent: the app closed the idle connection. Once more, on a new one.
                Some(req) if reused => {
                    debug!(error = %e.error(), "idle app connection closed: request sent on a new one");
                    sender = self.dial().await?;
                    sender.send_request(req).await.map_err(H1Error::Request)?
                }
                _ => return Err(H1Error::Request(e.into_error())),
            },
        };
        Ok(resp.map(|body| PooledBody {
            body,
            back: Some((sender, Arc::clone(self))),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Stack> {
        self.stack.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection that is still open.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        let mut stack = self.lock();
        while let Some(c) = stack.idle.pop_back() {
            // Once ready, a connection stays so until it closes.
            if c.sender.is_ready() {
                return Some(c.sender);
            }
        }
        None
    }

    /// Takes a connection back once its response has ended: at once if it can take the next
    /// request (the usual case), else once it can (its request body is still being sent).
    fn put_back(self: Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_ready() {
            self.push(sender);
        } else if !sender.is_closed()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let pool = Arc::downgrade(&self);
            rt.spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.push(sender);
                }
            });
        }
    }

    fn push(self: &Arc<Self>, sender: SendRequest<Body>) {
        let mut stack = self.lock();
        if stack.idle.len() >= self.max_idle {
            // The one idle longest goes: the least likely to be used again.
            stack.idle.pop_front();
        }
        stack.idle.push_back(Idle {
            sender,
            since: Instant::now(),
        });
        if !stack.reaping {
            // Outside a runtime (it is shutting down) nothing is kept.
            let Ok(rt) = tokio::runtime::Handle::try_current() else {
                stack.idle.clear();
                return;
            };
            stack.reaping = true;
            rt.spawn(reap(Arc::downgrade(self)));
        }
    }

    async fn dial(&self) -> Result<SendRequest<Body>, H1Error> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return Err(H1Error::Connect(self.addr, e.to_string())),
                Err(_) => return Err(H1Error::Connect(self.addr, "timed out".into())),
            };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(H1Error::Handshake)?;
        self.dials.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "app HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }
}

/// Closes the connections idle past the pool's limit, each when its time comes, until none is
/// idle (the next `push` starts it again) or the pool is dropped.
async fn reap(pool: Weak<H1App>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut stack = pool.lock();
            let now = Instant::now();
            while stack
                .idle
                .front()
                .is_some_and(|c| now >= c.since + pool.idle || c.sender.is_closed())
            {
                stack.idle.pop_front();
            }
            match stack.idle.front() {
                Some(c) => c.since + pool.idle,
                None => {
                    stack.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}

/// `Host` for a request that has none, from its URI (as hyper-util's client sets it).
fn host_of(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    match uri.port_u16() {
        Some(p) if p != 80 => HeaderValue::from_str(&format!("{host}:{p}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

/// A response body from the app that puts its connection back on the stack once it has ended.
pub struct PooledBody {
    body: Incoming,
    back: Option<(SendRequest<Body>, Arc<H1App>)>,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl PooledBody {
    fn put_back(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.put_back(sender);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.put_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.put_back(),
            // The connection is broken: it goes down with this body.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (a 204, a reply to HEAD) may never be polled.
        if self.body.is_end_stream() {
            self.put_back();
        }
    }
}
