//! The accept loop every listener of the workspace runs: accept until the stop signal, back off
//! on accept errors (EMFILE and the like: logged once per streak, never a busy loop), admit each
//! connection through a [`Gate`] (the `--max-connections` permit, or none), then spawn it in its
//! own task inside its own span.
//!
//! What differs between listeners is passed in, not switched on: the socket kind through
//! [`Listener`] (TCP, unix), the admission through [`Gate`] ([`Limit`], [`Unlimited`]), and the
//! connection itself as a closure that returns its span and its future.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{Instrument, Span, debug, warn};

/// A socket that accepts connections.
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// The peer's address.
    type Peer: Send + 'static;
    /// Accepts one connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;

    /// Accepted connections carry requests and answers: Nagle's algorithm only delays them.
    async fn accept(&self) -> io::Result<(Self::Stream, Self::Peer)> {
        let (tcp, peer) = tokio::net::TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }
}

#[cfg(unix)]
impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;

    async fn accept(&self) -> io::Result<(Self::Stream, Self::Peer)> {
        tokio::net::UnixListener::accept(self).await
    }
}

/// Decides whether an accepted connection is served; what it returns is held until the
/// connection's task ends.
pub trait Gate<P>: Send {
    /// Held for the connection's life.
    type Permit: Send + 'static;
    /// `None`: the connection is closed at once.
    fn admit(&mut self, peer: &P) -> Option<Self::Permit>;
}

/// Every connection is served.
pub struct Unlimited;

impl<P> Gate<P> for Unlimited {
    type Permit = ();

    fn admit(&mut self, _: &P) -> Option<()> {
        Some(())
    }
}

/// At most as many connections at once as `slots` has permits. One more is closed as soon as
/// it is accepted, so that its client learns at once (rather than waiting unseen in the listen
/// backlog), and `refused` is told, with whether it is the first refusal since a connection
/// was last admitted (to log a full listener once, not once per connection).
pub struct Limit<F> {
    slots: Arc<Semaphore>,
    refused: F,
    full: bool,
}

impl<F> Limit<F> {
    /// A limit of `slots`'s permits.
    pub fn new(slots: Arc<Semaphore>, refused: F) -> Self {
        Self {
            slots,
            refused,
            full: false,
        }
    }
}

impl<P, F: FnMut(&P, bool) + Send> Gate<P> for Limit<F> {
    type Permit = OwnedSemaphorePermit;

    fn admit(&mut self, peer: &P) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => {
                self.full = false;
                Some(p)
            }
            Err(_) => {
                (self.refused)(peer, !self.full);
                self.full = true;
                None
            }
        }
    }
}

/// The first pause after a failed accept; it doubles while accepts keep failing.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest pause after a failed accept.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `listener` until `stop` is true (or its sender is gone): each connection the `gate`
/// admits is handed to `conn`, which returns the connection's span and its future; the future
/// runs in a task of its own, in that span, holding the gate's permit. `what` names the
/// listener in logs. The listener is closed when this returns.
pub async fn serve<L, G, F, Fut>(
    what: &'static str,
    listener: L,
    mut stop: watch::Receiver<bool>,
    mut gate: G,
    mut conn: F,
) where
    L: Listener,
    G: Gate<L::Peer>,
    F: FnMut(L::Stream, L::Peer) -> (Span, Fut),
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                if backoff == BACKOFF_MIN {
                    warn!(listener = what, error = %e, "accept failed: pausing new connections");
                } else {
                    debug!(listener = what, error = %e, "accept failed again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let Some(permit) = gate.admit(&peer) else {
            continue;
        };
        let (span, fut) = conn(stream, peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                fut.await;
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A server that writes one byte on each connection it serves and holds it until told.
    async fn start(
        slots: usize,
    ) -> (
        std::net::SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::atomic::AtomicUsize>,
        watch::Sender<bool>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let (release, release_rx) = watch::channel(false);
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = refused.clone();
        let gate = Limit::new(Arc::new(Semaphore::new(slots)), move |_: &_, _| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        let task = tokio::spawn(serve("test", l, stop_rx, gate, move |mut tcp, _| {
            let mut release = release_rx.clone();
            (tracing::info_span!("test"), async move {
                let _ = tcp.write_all(b"!").await;
                let _ = release.wait_for(|r| *r).await;
            })
        }));
        (addr, stop, task, refused, release)
    }

    /// Reads one byte; `None` if the server closed the connection instead.
    async fn greeting(tcp: &mut TcpStream) -> Option<u8> {
        let mut b = [0u8; 1];
        match tcp.read(&mut b).await {
            Ok(1) => Some(b[0]),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_connection_over_the_limit_is_closed_and_one_within_it_is_served() {
        let (addr, stop, task, refused, release) = start(1).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert_eq!(greeting(&mut first).await, Some(b'!'));
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(greeting(&mut second).await, None, "over the limit");
        assert_eq!(refused.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The first connection ends: its permit comes back and the next one is served.
        release.send_replace(true);
        drop(first);
        let mut served = false;
        for _ in 0..200 {
            let mut third = TcpStream::connect(addr).await.unwrap();
            if greeting(&mut third).await == Some(b'!') {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served, "the permit was not given back");
        stop.send_replace(true);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_stop_signal_ends_the_loop_and_closes_the_listener() {
        let (addr, stop, task, _, _release) = start(4).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        assert_eq!(greeting(&mut c).await, Some(b'!'));
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the loop did not stop")
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn a_stop_signal_given_before_the_loop_starts_is_honoured() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_stop, stop_rx) = watch::channel(true);
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            serve("test", l, stop_rx, Unlimited, |_, _| {
                (Span::none(), async {})
            }),
        )
        .await;
        assert!(r.is_ok(), "the loop ignored a stop given before it began");
    }

    /// A listener whose every accept fails as when the process is out of file descriptors.
    struct OutOfFiles(Arc<std::sync::atomic::AtomicUsize>);

    impl Listener for OutOfFiles {
        type Stream = ();
        type Peer = ();

        async fn accept(&self) -> io::Result<((), ())> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(io::Error::from_raw_os_error(24))
        }
    }

    #[tokio::test]
    async fn failing_accepts_back_off_instead_of_spinning() {
        let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(
            "test",
            OutOfFiles(tries.clone()),
            stop_rx,
            Unlimited,
            |_, _| (Span::none(), async {}),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.send_replace(true);
        task.await.unwrap();
        // 20 ms doubling: at most 5 pauses fit in 500 ms (a busy loop makes millions of tries).
        let n = tries.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=8).contains(&n), "{n} accepts in 500 ms");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_unix_listener_is_served_the_same_way() {
        let dir = std::env::temp_dir().join(format!("mayfly-accept-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve("unix", l, stop_rx, Unlimited, |mut s, _| {
            (Span::none(), async move {
                let _ = s.write_all(b"u").await;
            })
        }));
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"u");
        stop.send_replace(true);
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
