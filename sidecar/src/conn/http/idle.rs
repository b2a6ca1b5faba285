//! Time limits for HTTP/2 connections, which hyper leaves open for as long as the peer likes:
//! the first request must arrive within the header-read limit (as an HTTP/1.1 request's head
//! must), and a connection with no open stream is closed after the idle limit.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tokio::time::Instant;

use super::Body;

/// How long an idle connection has to close by itself after its GOAWAY.
pub(crate) const IDLE_GRACE: Duration = Duration::from_secs(1);

/// (streams open now, streams ever opened)
type Counts = (usize, u64);

/// Counts a connection's open streams. Each request holds a [`StreamGuard`] until its
/// response body is dropped (sent or abandoned).
#[derive(Clone)]
pub(crate) struct Activity(Arc<watch::Sender<Counts>>);

/// One open stream; the count goes down when it is dropped.
pub(crate) struct StreamGuard(Arc<watch::Sender<Counts>>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0
            .send_modify(|(open, _)| *open = open.saturating_sub(1));
    }
}

impl Activity {
    /// A counter and the timer that watches it. `first`: how long the connection may wait
    /// for its first stream; `idle`: how long it may stay without an open stream afterwards.
    pub(crate) fn new(first: Duration, idle: Duration) -> (Activity, IdleTimer) {
        let (tx, rx) = watch::channel((0, 0));
        let timer = IdleTimer {
            rx,
            first,
            idle,
            seen: 0,
            since: Some(Instant::now()),
        };
        (Activity(Arc::new(tx)), timer)
    }

    /// Marks a stream open until the guard drops.
    pub(crate) fn stream(&self) -> StreamGuard {
        self.0.send_modify(|(open, total)| {
            *open += 1;
            *total += 1;
        });
        StreamGuard(self.0.clone())
    }

    /// The response, with `guard` held until its body is dropped.
    pub(crate) fn hold(resp: http::Response<Body>, guard: StreamGuard) -> http::Response<Body> {
        use http_body_util::BodyExt;
        resp.map(|b| {
            b.map_frame(move |f| {
                let _held = &guard;
                f
            })
            .boxed()
        })
    }
}

/// Resolves when a connection has been without an open stream for too long.
pub(crate) struct IdleTimer {
    rx: watch::Receiver<Counts>,
    first: Duration,
    idle: Duration,
    /// Streams seen so far.
    seen: u64,
    /// When the connection last became idle (`None` while a stream is open).
    since: Option<Instant>,
}

impl IdleTimer {
    /// Waits until the connection has had no open stream for its limit. Cancel-safe: the
    /// state lives in `self`, so it can sit in a `select!` loop.
    pub(crate) async fn expired(&mut self) {
        loop {
            let (open, total) = *self.rx.borrow_and_update();
            if open > 0 {
                self.since = None;
            } else if self.since.is_none() || total != self.seen {
                // A stream came and went since we last looked: idle from now.
                self.since = Some(Instant::now());
            }
            self.seen = total;
            let limit = if total == 0 { self.first } else { self.idle };
            match self.since {
                Some(since) => tokio::select! {
                    _ = tokio::time::sleep_until(since + limit) => return,
                    r = self.rx.changed() => if r.is_err() { std::future::pending::<()>().await },
                },
                None => {
                    if self.rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            }
        }
    }
}

/// Runs an HTTP/2 connection; once it is idle past its limit, sends GOAWAY and gives it
/// [`IDLE_GRACE`] to finish before it is dropped.
pub(crate) async fn serve_with_idle<C>(conn: C, mut timer: IdleTimer) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = timer.expired() => {}
    }
    tracing::debug!("HTTP/2 connection idle past its limit: closing it");
    conn.as_mut().graceful_shutdown();
    tokio::time::timeout(IDLE_GRACE, conn.as_mut())
        .await
        .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_first_stream_expires_after_the_first_limit() {
        let (_activity, mut timer) = Activity::new(Duration::from_secs(2), Duration::from_secs(60));
        let start = Instant::now();
        timer.expired().await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_keeps_the_connection_and_the_idle_limit_counts_from_its_end() {
        let (activity, mut timer) = Activity::new(Duration::from_secs(2), Duration::from_secs(5));
        let guard = activity.stream();
        let expired = tokio::time::timeout(Duration::from_secs(30), timer.expired()).await;
        assert!(expired.is_err(), "expired with a stream open");
        let ended = Instant::now();
        drop(guard);
        timer.expired().await;
        assert_eq!(ended.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_came_and_went_unseen_restarts_the_clock() {
        let (activity, mut timer) = Activity::new(Duration::from_secs(2), Duration::from_secs(5));
        let _ = tokio::time::timeout(Duration::from_secs(1), timer.expired()).await;
        drop(activity.stream());
        let at = Instant::now();
        timer.expired().await;
        assert_eq!(at.elapsed(), Duration::from_secs(5));
    }
}
