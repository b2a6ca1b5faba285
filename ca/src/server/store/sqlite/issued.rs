//! Issued certificates, group-committed with their `svid.issued` event and the join token
//! they spend.

use rusqlite::{Connection, params};

use crate::server::store::{IssuedRecord, StoreError, TokenClaim, TokenRefusal};

use super::audit::{append_own_in, event_fields};
use super::tokens::spend_token_in;
use super::{SqliteStore, db, from_ts, ts};

/// What a caller of the group commit hears: its token refused (nothing written), or how the
/// commit went.
pub(super) type IssuedOutcome = Result<Result<(), TokenRefusal>, String>;

/// An issued certificate, its event and the join token it spends, waiting for a group commit.
pub(super) struct PendingIssued {
    rec: IssuedRecord,
    kind: String,
    detail: String,
    token: Option<TokenClaim>,
    done: std::sync::mpsc::SyncSender<IssuedOutcome>,
}

pub(super) const INSERT_ISSUED: &str =
    "INSERT INTO issued (serial, spiffe_id, not_after, issued_at, requester)
     VALUES (?1, ?2, ?3, ?4, ?5)";

pub(super) fn insert_issued(c: &Connection, r: &IssuedRecord) -> Result<(), StoreError> {
    c.prepare_cached(INSERT_ISSUED)
        .and_then(|mut st| {
            st.execute(params![
                r.serial,
                r.spiffe_id,
                ts(r.not_after),
                ts(r.issued_at),
                r.requester
            ])
        })
        .map(|_| ())
        .map_err(db)
}

impl SqliteStore {
    /// Writes every queued issued certificate and event, and spends their tokens, in one
    /// transaction, and tells each waiting caller how it went. A refused token leaves its
    /// caller's rows out; any error fails the whole batch and is returned too (so that the
    /// store learns it cannot write). Called with the connection held.
    pub(super) fn commit_issued_queue(
        &self,
        c: &mut Connection,
        own: &(String, String),
    ) -> Result<(), StoreError> {
        // A poisoned queue still holds its callers' answer channels: take them all the same,
        // so nobody waits forever.
        let batch = std::mem::take(
            &mut *self
                .issued_queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if batch.is_empty() {
            return Ok(());
        }
        let result = (|| -> Result<Vec<Result<(), TokenRefusal>>, StoreError> {
            let tx = c.transaction().map_err(db)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            for p in &batch {
                if let Some(claim) = &p.token
                    && let Err(refusal) = spend_token_in(&tx, claim, p.rec.issued_at)?
                {
                    outcomes.push(Err(refusal));
                    continue;
                }
                insert_issued(&tx, &p.rec)?;
                let fields = event_fields(&p.detail);
                append_own_in(&tx, own, p.rec.issued_at, &p.kind, &|_, _| fields.clone())?;
                outcomes.push(Ok(()));
            }
            tx.commit().map_err(db)?;
            Ok(outcomes)
        })();
        match result {
            Ok(outcomes) => {
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    // A caller that gave up waiting is gone; its rows are written all the same.
                    let _ = p.done.send(Ok(outcome));
                }
                Ok(())
            }
            Err(e) => {
                for p in batch {
                    let _ = p.done.send(Err(e.to_string()));
                }
                Err(e)
            }
        }
    }
}

pub(super) fn log_issued(s: &SqliteStore, r: &IssuedRecord) -> Result<(), StoreError> {
    s.with(|c| insert_issued(c, r))
}

pub(super) fn log_issued_with_event(
    s: &SqliteStore,
    rec: &IssuedRecord,
    kind: &str,
    detail: &str,
    token: Option<&TokenClaim>,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let own = s.own_parts()?;
    let (done, wait) = std::sync::mpsc::sync_channel(1);
    s.issued_queue
        .lock()
        .map_err(|_| StoreError::Db("store queue lock poisoned by an earlier panic".into()))?
        .push(PendingIssued {
            rec: rec.clone(),
            kind: kind.to_owned(),
            detail: detail.to_owned(),
            token: token.cloned(),
            done,
        });
    // Whoever gets the connection first commits everything queued so far, ours included
    // (if an earlier holder has not already taken it).
    // A failed batch answers every caller in it, this one included (an error here is
    // that batch's, already sent).
    let batch = s.with(|c| s.commit_issued_queue(c, own));
    let answer = wait
        .recv()
        .map_err(|_| StoreError::Db("group commit ended without an answer".into()))?;
    match (answer, batch) {
        (Ok(outcome), _) => Ok(outcome),
        (Err(_), Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(StoreError::Db(e)),
    }
}

pub(super) fn list_issued(s: &SqliteStore, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
    let rows = s.with(|c| {
        let mut st = c
            .prepare(
                "SELECT serial, spiffe_id, not_after, issued_at, requester FROM issued
                 ORDER BY issued_at DESC LIMIT ?1",
            )
            .map_err(db)?;
        let rows = st
            .query_map([limit], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })?;
    rows.into_iter()
        .map(|(serial, spiffe_id, na, at, requester)| {
            Ok(IssuedRecord {
                serial,
                spiffe_id,
                not_after: from_ts(na)?,
                issued_at: from_ts(at)?,
                requester,
            })
        })
        .collect()
}
