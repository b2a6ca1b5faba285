//! The writer's side of the actor: events become numbered, hash-chained records in the spool
//! (with `gap` records for what was dropped, and signed checkpoints), and strict decisions are
//! released once a group-committed sync covers their records.

use std::io::Write;
use std::sync::atomic::Ordering;

use mayfly_ca::audit::{checkpoint_fields, checkpoint_message, sign_with};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::Actor;
use super::fields::Fields;
use super::spool::Spool;
use super::{
    CHECKPOINT_INTERVAL, CHECKPOINT_RECORDS, Event, NotDurable, SpoolError, Waiter, WhenFull,
    now_ms,
};

impl Actor {
    /// Appends a record; its seq, or `None` when the spool refused it (logged, and the spool
    /// counts as full).
    pub(super) fn write(
        &mut self,
        kind: &str,
        ts_ms: i64,
        fields: impl Into<Fields>,
    ) -> Option<u64> {
        let seq = self.spool.state.next_seq;
        let line = line_of(
            &self.source,
            &self.spool.state.epoch,
            seq,
            &self.spool.state.last_hash,
            ts_ms,
            kind,
            fields,
        );
        let written = match self.spool.append_line(seq, line) {
            Ok(line) => {
                self.metrics.audit_records.inc();
                if let Some(s) = self.sink.as_mut() {
                    let _ = s.write_all(&line).and_then(|_| s.write_all(b"\n"));
                }
                if kind != "checkpoint" {
                    self.unsigned += 1;
                    self.first_unsigned
                        .get_or_insert_with(tokio::time::Instant::now);
                }
                Some(seq)
            }
            Err(e) => {
                error!(error = %e, "cannot write to the audit spool");
                self.full.store(true, Ordering::Relaxed);
                None
            }
        };
        self.update_full();
        written
    }

    /// Bytes not yet acknowledged, live spool and backlog together.
    pub(super) fn unacked_total(&self) -> u64 {
        self.spool.unacked_bytes() + self.backlog.iter().map(Spool::unacked_bytes).sum::<u64>()
    }

    pub(super) fn update_full(&mut self) {
        let used = self.unacked_total();
        self.metrics
            .audit_spool_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        if used >= self.cfg.max_spool_bytes {
            if !self.full.swap(true, Ordering::Relaxed) {
                warn!(
                    bytes = used,
                    mode = self.cfg.when_full.as_str(),
                    "audit spool full"
                );
            }
        } else if used < self.cfg.max_spool_bytes / 10 * 9
            && self.full.swap(false, Ordering::Relaxed)
        {
            info!("audit spool has room again");
        }
    }

    pub(super) fn on_event(&mut self, ev: Event) {
        if self.cfg.when_full == WhenFull::Drop && self.full.load(Ordering::Relaxed) {
            if let Some(tx) = ev.durable {
                // A strict decision is refused instead: nothing it stood for happens.
                let _ = tx.send(Err(NotDurable::Full));
                return;
            }
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.audit_dropped_reached(n);
            return;
        }
        self.write_gap_if_any(ev.ts_ms);
        let seq = self.write(ev.kind, ev.ts_ms, ev.fields);
        if let Some(tx) = ev.durable {
            match seq {
                Some(seq) => self.waiting.push((seq, tx)),
                None => {
                    let _ = tx.send(Err(NotDurable::Write(
                        "the record could not be appended".into(),
                    )));
                }
            }
        }
    }

    /// Starts a sync of everything appended so far on the blocking pool, unless one is running;
    /// the strict decisions waiting so far wait for this one. Its result comes back on `done`.
    /// Strict decisions get a data-only sync unless the tick asked for a full one.
    pub(super) fn start_sync(&mut self, done: &mpsc::Sender<Result<(), SpoolError>>) {
        if self.syncing {
            return;
        }
        match self.spool.begin_sync(self.state_due) {
            Ok(Some(job)) => {
                self.syncing = true;
                self.state_sync = job.state.is_some();
                self.state_due = false;
                self.synced_seq = self.spool.state.next_seq;
                self.in_sync = std::mem::take(&mut self.waiting);
                let tx = done.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.blocking_send(job.run());
                });
            }
            // Nothing written since the last sync, which has completed: already durable.
            Ok(None) => release(std::mem::take(&mut self.waiting), &Ok(())),
            Err(e) => {
                error!(error = %e, "cannot sync the audit spool");
                release(
                    std::mem::take(&mut self.waiting),
                    &Err(NotDurable::Write(e.to_string())),
                );
            }
        }
    }

    /// The sync in flight finished: its strict decisions learn the outcome.
    pub(super) fn sync_done(&mut self, r: Result<(), SpoolError>) {
        self.syncing = false;
        let r = r.and_then(|()| {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.synced_through
                .store(self.synced_seq, Ordering::Relaxed);
            if self.state_sync {
                self.spool.after_sync(self.synced_seq)
            } else {
                Ok(())
            }
        });
        let outcome = match r {
            Ok(()) => Ok(()),
            Err(e) => {
                error!(error = %e, "cannot sync the audit spool");
                Err(NotDurable::Write(e.to_string()))
            }
        };
        release(std::mem::take(&mut self.in_sync), &outcome);
    }

    pub(super) fn write_gap_if_any(&mut self, ts_ms: i64) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_dropped && !self.full.load(Ordering::Relaxed) {
            let mut f = Map::new();
            f.insert(
                "dropped".into(),
                Value::from(dropped - self.reported_dropped),
            );
            self.reported_dropped = dropped;
            let _ = self.write("gap", ts_ms, f);
        }
    }

    pub(super) fn maybe_checkpoint(&mut self) {
        let due = self.unsigned >= CHECKPOINT_RECORDS
            || self
                .first_unsigned
                .is_some_and(|t| t.elapsed() >= CHECKPOINT_INTERVAL);
        if due {
            self.checkpoint_now();
        }
    }

    /// Signs a checkpoint now if any record is unsigned.
    pub(super) fn checkpoint_now(&mut self) {
        if self.unsigned == 0 {
            return;
        }
        let Some(svid) = self.identity.creds.get() else {
            return;
        };
        let source = self.identity.id.to_string();
        let seq = self.spool.state.next_seq;
        let prev = self.spool.state.last_hash.clone();
        let msg = checkpoint_message(&source, &self.spool.state.epoch, seq, &prev);
        let Some(sig) = sign_with(&svid.certified, &msg) else {
            warn!("cannot sign an audit checkpoint with the current SVID");
            return;
        };
        let fields = checkpoint_fields(&sig, &svid.certified.cert);
        self.unsigned = 0;
        self.first_unsigned = None;
        let _ = self.write("checkpoint", now_ms(), fields);
    }
}

/// The chained line of one record (no trailing newline): exactly the bytes of
/// [`mayfly_ca::audit::Record::line`] for the same record.
pub(crate) fn line_of(
    source: &str,
    epoch: &str,
    seq: u64,
    prev: &str,
    ts_ms: i64,
    kind: &str,
    fields: impl Into<Fields>,
) -> Vec<u8> {
    super::fields::line(source, epoch, seq, prev, ts_ms, kind, &fields.into())
}

/// Tells waiting strict decisions how their sync went.
pub(super) fn release(waiters: Vec<Waiter>, outcome: &Result<(), NotDurable>) {
    for (seq, tx) in waiters {
        let _ = tx.send(outcome.clone().map(|()| seq));
    }
}
