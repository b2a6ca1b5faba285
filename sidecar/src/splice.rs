//! Bidirectional byte splicing with half-close, an idle timeout, byte counts and an external
//! end signal (peer SVID expiry, policy revocation, shutdown).

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::time::Instant;

/// The buffer for data in flight: one TLS record's worth.
const BUF: usize = 16 * 1024;
/// The most a direction reads while it waits. An idle connection spends its life waiting for a
/// read, and holds no buffer meanwhile: the read is polled with a buffer that lives on the
/// stack of that one poll ([`wait_read`]), and only bytes that arrived are kept, in a buffer
/// of their size. A read that fills it means more is coming: the direction then reads into
/// the large buffer until a light read gives it back.
const WAIT_BUF: usize = 2 * 1024;

/// Why a spliced connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Both sides finished.
    Done,
    /// No byte moved for the idle timeout.
    Idle,
    /// The peer's SVID expired.
    PeerSvidExpired,
    /// The policy (or grant) that admitted it no longer does.
    Revoked(String),
    /// The sidecar is shutting down and the drain deadline passed.
    Shutdown,
    /// An I/O error.
    Error(String),
}

impl End {
    /// Short reason for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            End::Done => "done",
            End::Idle => "idle",
            End::PeerSvidExpired => "peer_svid_expired",
            End::Revoked(_) => "policy_revoked",
            End::Shutdown => "shutdown",
            End::Error(_) => "error",
        }
    }
}

/// What a splice did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Bytes from `a` to `b`.
    pub a_to_b: u64,
    /// Bytes from `b` to `a`.
    pub b_to_a: u64,
    /// How it ended.
    pub end: End,
}

/// Waits for bytes from `r` without holding a buffer while it waits: each poll reads into a
/// buffer on its own stack, and what it read (at most [`WAIT_BUF`] bytes; none at the end of
/// the stream) leaves in a buffer of its size.
async fn wait_read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    std::future::poll_fn(|cx| {
        let mut stack = [MaybeUninit::<u8>::uninit(); WAIT_BUF];
        let mut buf = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *r).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn copy_half<R, W>(
    mut r: R,
    mut w: W,
    count: Arc<AtomicU64>,
    activity: Arc<AtomicU64>,
    epoch: Instant,
) -> Result<(), std::io::Error>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Taken while data flows (after a read that filled `WAIT_BUF`), given back after a light read.
    let mut big: Option<Box<[u8]>> = None;
    loop {
        let waited;
        let data = match big.as_mut() {
            Some(b) => {
                let n = r.read(b).await?;
                &b[..n]
            }
            None => {
                waited = wait_read(&mut r).await?;
                &waited[..]
            }
        };
        let n = data.len();
        if n == 0 {
            // Half-close: pass the end of this direction on, keep the other one open.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(data).await?;
        w.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        big = match big {
            // Traffic is light again: wait with no buffer.
            Some(_) if n < WAIT_BUF => None,
            // A full read: more is coming, take (or keep) the large buffer.
            Some(b) => Some(b),
            None if n == WAIT_BUF => Some(vec![0u8; BUF].into_boxed_slice()),
            None => None,
        };
    }
}

/// A stream in its two halves, as [`splice`] takes it: split as soon as it is made, so that the
/// future of a connection holds the stream once, behind its halves, and not also in the place
/// its maker's future kept for it.
pub type Halves<T> = (ReadHalf<T>, WriteHalf<T>);

/// Copies `a <-> b` until both directions end, the idle timeout passes, `deadline` is reached
/// or `stop` resolves.
///
/// Not an `async fn`: `stop` is boxed before the future exists, so the future (which lives as
/// long as the connection) holds it once (an `async fn` keeps room for each argument beside
/// the state it is moved into).
pub fn splice<A, B, S>(
    a: Halves<A>,
    b: Halves<B>,
    idle: Duration,
    deadline: Instant,
    stop: S,
) -> impl Future<Output = Outcome>
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
    S: Future<Output = End>,
{
    let ((ar, aw), (br, bw)) = (a, b);
    let mut stop = Box::pin(stop);
    async move {
        let epoch = Instant::now();
        let activity = Arc::new(AtomicU64::new(0));
        let ab = Arc::new(AtomicU64::new(0));
        let ba = Arc::new(AtomicU64::new(0));
        let up = copy_half(ar, bw, ab.clone(), activity.clone(), epoch);
        let down = copy_half(br, aw, ba.clone(), activity.clone(), epoch);
        // A half that fails ends both: the other may be waiting on a peer that waits for this
        // one (a client waiting for the server's banner while the server's connection broke
        // without a clean close), so only a clean end of one direction leaves the other open.
        let both = async {
            match tokio::try_join!(up, down) {
                Ok(((), ())) => End::Done,
                Err(e) => End::Error(e.to_string()),
            }
        };
        let watchdog = async {
            loop {
                let last = Duration::from_millis(activity.load(Ordering::Relaxed));
                let quiet_until = epoch + last + idle;
                if Instant::now() >= quiet_until {
                    return End::Idle;
                }
                tokio::time::sleep_until(quiet_until).await;
            }
        };
        let end = tokio::select! {
            e = both => e,
            e = watchdog => e,
            _ = tokio::time::sleep_until(deadline) => End::PeerSvidExpired,
            e = &mut stop => e,
        };
        Outcome {
            a_to_b: ab.load(Ordering::Relaxed),
            b_to_a: ba.load(Ordering::Relaxed),
            end,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream whose reads fail (a TLS peer gone without close_notify) and whose writes work.
    struct Broken;

    impl AsyncRead for Broken {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::UnexpectedEof.into()))
        }
    }

    impl AsyncWrite for Broken {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            b: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// The far side breaks while the near side waits for it to speak first: the splice ends
    /// at once (it waited for the near side, until the idle timeout, and the caller hung).
    #[tokio::test(start_paused = true)]
    async fn a_broken_far_side_ends_the_splice_while_the_near_side_waits() {
        let (client, a) = tokio::io::duplex(1024);
        let out = splice(
            tokio::io::split(a),
            tokio::io::split(Broken),
            Duration::from_secs(300),
            Instant::now() + Duration::from_secs(3600),
            std::future::pending(),
        )
        .await;
        assert!(matches!(out.end, End::Error(_)), "{:?}", out.end);
        // The client, which never wrote, now sees its connection end.
        let (mut cr, _cw) = tokio::io::split(client);
        let mut rest = Vec::new();
        assert_eq!(cr.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// An idle connection holds no buffer while it waits: the whole splice, both directions
    /// waiting for a read, is smaller than one wait buffer (each direction used to wait with a
    /// buffer of its own inside it).
    #[tokio::test(start_paused = true)]
    async fn a_waiting_splice_holds_no_buffer() {
        let (_client, a) = tokio::io::duplex(64);
        let (b, _server) = tokio::io::duplex(64);
        let mut waiting = Box::pin(splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(300),
            Instant::now() + Duration::from_secs(3600),
            std::future::pending(),
        ));
        let polled = tokio::time::timeout(Duration::from_secs(1), &mut waiting).await;
        assert!(polled.is_err(), "the splice ended: {polled:?}");
        let size = std::mem::size_of_val(&*waiting);
        assert!(size < WAIT_BUF, "a waiting splice is {size} bytes");
    }

    #[tokio::test]
    async fn copies_both_ways_and_passes_half_close_on() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(60),
            std::future::pending(),
        ));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"hello").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still works after the client's half-close.
        sw.write_all(b"world!").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let out = task.await.unwrap();
        assert_eq!((out.a_to_b, out.b_to_a, out.end), (5, 6, End::Done));
    }

    /// Bursts of every size (small reads, full small reads that take the large buffer, light
    /// reads that give it back) arrive intact and in order.
    #[tokio::test]
    async fn bursts_of_every_size_arrive_intact() {
        let (client, a) = tokio::io::duplex(64 * 1024);
        let (b, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(5),
            Instant::now() + Duration::from_secs(60),
            std::future::pending(),
        ));
        let (_cr, mut cw) = tokio::io::split(client);
        let (mut sr, _sw) = tokio::io::split(server);
        let mut sent = Vec::new();
        let sizes = [
            1,
            2047,
            2048,
            2049,
            100,
            16 * 1024,
            40_000,
            3,
            2048,
            70_000,
            5,
        ];
        let writer = async {
            for (i, n) in sizes.iter().enumerate() {
                let chunk: Vec<u8> = (0..*n).map(|j| (i * 31 + j) as u8).collect();
                cw.write_all(&chunk).await.unwrap();
                sent.extend_from_slice(&chunk);
                tokio::task::yield_now().await;
            }
            cw.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = sr.read_to_end(&mut got);
        let (_, r) = tokio::join!(writer, reader);
        r.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
        drop(task);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed() {
        let (_client, a) = tokio::io::duplex(64);
        let (b, _server) = tokio::io::duplex(64);
        let out = splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(30),
            Instant::now() + Duration::from_secs(3600),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.end, End::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cuts_a_busy_connection() {
        let (client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let feeder = tokio::spawn(async move {
            let (_r, mut w) = tokio::io::split(client);
            loop {
                if w.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let drain = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n) = server.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        });
        let out = splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(30),
            Instant::now() + Duration::from_secs(5),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.end, End::PeerSvidExpired);
        assert!(out.a_to_b > 10);
        feeder.abort();
        drain.abort();
    }

    #[tokio::test]
    async fn a_stop_signal_ends_it_with_its_reason() {
        let (_client, a) = tokio::io::duplex(64);
        let (b, _server) = tokio::io::duplex(64);
        let out = splice(
            tokio::io::split(a),
            tokio::io::split(b),
            Duration::from_secs(30),
            Instant::now() + Duration::from_secs(60),
            async { End::Revoked("rule r".into()) },
        )
        .await;
        assert_eq!(out.end, End::Revoked("rule r".into()));
    }
}
