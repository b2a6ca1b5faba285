//! The Workload API's connections: accepted on the unix socket, the caller's peer credentials
//! read once (SO_PEERCRED: what the client process was when it connected) and carried into
//! tonic as the connection's `ConnectInfo` ([`PeerCred`], in every request's extensions), and
//! the client's bytes passed through [`Rewriter`] so that gRPC C-core clients are understood.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

use super::authority::Rewriter;

/// Bytes buffered between the socket and tonic in each direction.
const PIPE: usize = 64 * 1024;

/// The caller, from its unix peer credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Its user.
    pub uid: u32,
    /// Its primary group.
    pub gid: u32,
    /// Its process (when the OS reports it).
    pub pid: Option<i32>,
}

/// One accepted connection as tonic sees it.
pub struct Conn {
    io: DuplexStream,
    cred: Option<PeerCred>,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Option<PeerCred>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.cred
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client's bytes, rewritten, towards tonic.
async fn inbound(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::io::WriteHalf<DuplexStream>,
) {
    let mut rw = Rewriter::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        rw.feed(&buf[..n], &mut out);
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
    let _ = to.shutdown().await;
}

/// tonic's bytes towards the client.
async fn outbound(
    mut from: tokio::io::ReadHalf<DuplexStream>,
    mut to: tokio::net::unix::OwnedWriteHalf,
) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    let _ = to.shutdown().await;
}

fn wrap(stream: UnixStream) -> Conn {
    let cred = stream.peer_cred().ok().map(|c| PeerCred {
        uid: c.uid(),
        gid: c.gid(),
        pid: c.pid(),
    });
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (r, w) = stream.into_split();
    let (pr, pw) = tokio::io::split(ours);
    tokio::spawn(inbound(r, pw));
    tokio::spawn(outbound(pr, w));
    Conn { io: theirs, cred }
}

/// The connections accepted on `listener` until `shutdown` flips, for tonic's
/// `serve_with_incoming_shutdown`.
pub fn incoming(
    listener: UnixListener,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tx.closed() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    if tx.send(Ok(wrap(stream))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "Workload API: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
