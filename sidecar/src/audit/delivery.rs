//! The audit actor and its delivery side: batches of spooled records shipped to the control
//! plane over a kept-open mTLS session, acknowledgements trimming the spool, backlog epochs
//! delivered first, a refused chain rolled to a new epoch, and backoff while the control plane
//! is unreachable.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::record::release;
use super::{Actor, Target};
use super::{
    EVENTS_PER_TURN, Event, NotDurable, SHIP_BATCH, SHIP_EVERY, SYNC_EVERY, SpoolError, now_ms,
    recover,
};

/// A delivery's outcome, with the session handed back for the next one.
type ShipResult = (
    mayfly_ca::client::AuditSession,
    Target,
    Result<u64, mayfly_ca::client::ClientError>,
);

impl Actor {
    /// The control plane stored everything up to `acked` of `target`'s chain.
    pub(super) fn acked(&mut self, target: Target, acked: u64) {
        let r = match target {
            Target::Live => self.spool.ack(acked),
            Target::Backlog => {
                let r = self.backlog.front_mut().map_or(Ok(()), |b| b.ack(acked));
                if self.backlog.front().is_some_and(|b| b.index.is_empty())
                    && let Some(b) = self.backlog.pop_front()
                {
                    info!(epoch = %b.state.epoch, "an audit backlog epoch is delivered");
                    b.remove();
                }
                r
            }
        };
        if let Err(e) = r {
            error!(error = %e, "cannot trim the audit spool");
        }
        self.update_full();
        self.write_gap_if_any(now_ms());
    }

    /// A `409` from the control plane: it will not continue this chain (it expects records the
    /// spool no longer has, or holds different ones). Instead of retrying forever, the records
    /// go on in a new chain after a `gap` record that says so. Returns whether it was such a
    /// refusal.
    pub(super) fn refused_chain(
        &mut self,
        target: Target,
        e: &mayfly_ca::client::ClientError,
    ) -> bool {
        let why = match e {
            mayfly_ca::client::ClientError::Refused {
                status: 409,
                reason,
                ..
            } => {
                if reason == "audit_diverged" {
                    recover::Why::ControlPlaneDiverged
                } else {
                    recover::Why::ControlPlaneGap
                }
            }
            _ => return false,
        };
        warn!(error = %e, "the control plane refuses to continue an audit chain");
        match target {
            Target::Live => {
                if let Err(e) = self.spool.roll_live(why) {
                    error!(error = %e, "cannot roll the audit spool to a new epoch");
                    return false;
                }
                // A new epoch: nothing of it is unsigned yet.
                self.unsigned = 0;
                self.first_unsigned = None;
            }
            Target::Backlog => {
                // The closed epoch's records continue the live chain, after a gap record.
                let Some(mut b) = self.backlog.pop_front() else {
                    return true;
                };
                let body = match b.unacked_bytes_upto(usize::MAX) {
                    Ok(body) => body,
                    Err(e) => {
                        error!(error = %e, "cannot read an audit backlog");
                        self.backlog.push_front(b);
                        return false;
                    }
                };
                let records = recover::parse_lines(&body);
                let loss = recover::Loss {
                    why,
                    epoch: b.state.epoch.clone(),
                    last_seq: b.state.acked_seq,
                    lost: Vec::new(),
                    quarantined: None,
                };
                let _ = self.write("gap", now_ms(), recover::gap_fields(&loss, records.len()));
                for r in records {
                    let (kind, ts_ms, f) = recover::rechained(r);
                    let _ = self.write(&kind, ts_ms, f);
                }
                b.remove();
            }
        }
        true
    }

    /// Starts delivering the oldest unacknowledged records (up to `SHIP_BATCH`) to the control
    /// plane; the answer comes back on `done`. Returns whether a delivery is now in flight.
    pub(super) fn ship(&mut self, done: &mpsc::Sender<ShipResult>) -> bool {
        // Closed epochs first, oldest first, one chain per delivery.
        while self.backlog.front().is_some_and(|b| b.index.is_empty()) {
            if let Some(b) = self.backlog.pop_front() {
                b.remove();
            }
        }
        let (target, spool) = match self.backlog.front_mut() {
            Some(b) => (Target::Backlog, b),
            None => (Target::Live, &mut self.spool),
        };
        if spool.index.is_empty() {
            return false;
        }
        let Some(mut session) = self.session.take() else {
            return false;
        };
        // The spool holds the lines as the control plane wants them: newline-terminated, in
        // order, so the body is one contiguous read.
        let body = match spool.unacked_bytes_upto(SHIP_BATCH) {
            Ok(body) => body,
            Err(e) => {
                error!(error = %e, "cannot read the audit spool");
                self.session = Some(session);
                return false;
            }
        };
        let tx = done.clone();
        tokio::spawn(async move {
            let r = session.post(bytes::Bytes::from(body)).await;
            let _ = tx.send((session, target, r)).await;
        });
        true
    }
}

pub(super) async fn run(
    mut a: Actor,
    mut rx: mpsc::Receiver<Event>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (ship_tx, mut ship_rx) = mpsc::channel::<ShipResult>(1);
    let mut in_flight = false;
    let mut backoff = Duration::from_millis(250);
    let mut next_ship = tokio::time::Instant::now();
    // At most one sync runs at a time, on the blocking pool: the data path never waits for
    // the disk (in strict mode, only the decisions whose records a sync must cover wait).
    let (sync_tx, mut sync_rx) = mpsc::channel::<Result<(), SpoolError>>(1);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    a.on_event(ev);
                    // Take what else is queued before syncing: one sync for the whole group.
                    for _ in 0..EVENTS_PER_TURN {
                        match rx.try_recv() {
                            Ok(ev) => a.on_event(ev),
                            Err(_) => break,
                        }
                    }
                    // Strict decisions do not wait for the tick; those that arrive while a
                    // sync runs wait for the next one, which starts as soon as it ends.
                    if !a.waiting.is_empty() {
                        a.start_sync(&sync_tx);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                a.maybe_checkpoint();
                a.state_due = true;
                a.start_sync(&sync_tx);
                a.update_full();
                a.metrics.audit_spool_bytes.set(i64::try_from(a.unacked_total()).unwrap_or(i64::MAX));
                a.metrics.audit_dropped_reached(a.dropped.load(Ordering::Relaxed));
                if !in_flight && tokio::time::Instant::now() >= next_ship {
                    in_flight = a.ship(&ship_tx);
                }
            }
            Some(r) = sync_rx.recv() => {
                a.sync_done(r);
                if !a.waiting.is_empty() {
                    a.start_sync(&sync_tx);
                }
            }
            Some((session, target, r)) = ship_rx.recv() => {
                in_flight = false;
                a.session = Some(session);
                if let Ok(mut e) = a.delivery_error.lock() {
                    *e = r.as_ref().err().map(ToString::to_string);
                }
                match r {
                    Ok(acked) => {
                        backoff = Duration::from_millis(250);
                        a.acked(target, acked);
                        // Batch: one delivery a second while records trickle in, back to back
                        // (without waiting for the next tick) while a full batch is waiting.
                        next_ship = tokio::time::Instant::now() + SHIP_EVERY;
                        let waiting = a.backlog.front().map_or(a.spool.index.len(), |b| b.index.len());
                        if waiting >= SHIP_BATCH || !a.backlog.is_empty() {
                            in_flight = a.ship(&ship_tx);
                        }
                    }
                    Err(e) => {
                        if a.refused_chain(target, &e) {
                            next_ship = tokio::time::Instant::now();
                        } else {
                            warn!(error = %e, retry_in_s = backoff.as_secs_f64(), "cannot deliver audit records; they stay in the spool");
                            next_ship = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
            _ = shutdown.changed() => {
                // Take what is queued, then sync.
                while let Ok(ev) = rx.try_recv() {
                    a.on_event(ev);
                }
                break;
            }
        }
    }
    if a.syncing
        && let Some(r) = sync_rx.recv().await
    {
        a.sync_done(r);
    }
    // A clean shutdown: sign what is unsigned, and mark the spool closed so the next start
    // continues this epoch instead of rolling to a new one.
    a.checkpoint_now();
    let outcome = a.spool.close().map_err(|e| {
        error!(error = %e, "cannot sync the audit spool at shutdown");
        NotDurable::Write(e.to_string())
    });
    release(std::mem::take(&mut a.waiting), &outcome);
}
