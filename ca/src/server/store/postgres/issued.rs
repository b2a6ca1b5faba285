//! Issued certificates, committed with their `svid.issued` event and the join token they
//! spend, in one transaction.

use crate::server::store::{IssuedRecord, StoreError, TokenClaim, TokenRefusal, event_fields};

use super::audit::append_own_in;
use super::tokens::spend_token_in;
use super::{Db, PostgresStore, from_ts, ts};

async fn insert_issued(
    db: &Db,
    c: &tokio_postgres::Client,
    r: &IssuedRecord,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO issued (serial, spiffe_id, not_after, issued_at, requester)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &r.serial,
            &r.spiffe_id,
            &ts(r.not_after),
            &ts(r.issued_at),
            &r.requester,
        ],
    )
    .await
    .map(|_| ())
    .map_err(|e| db.err(e))
}

pub(super) fn log_issued(s: &PostgresStore, r: &IssuedRecord) -> Result<(), StoreError> {
    let r = r.clone();
    s.run(true, |db| async move {
        let c = db.client().await?;
        insert_issued(&db, &c, &r).await
    })
}

pub(super) fn log_issued_with_event(
    s: &PostgresStore,
    rec: &IssuedRecord,
    kind: &str,
    detail: &str,
    token: Option<&TokenClaim>,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let own = s.own_parts()?.clone();
    let (rec, kind, fields, token) = (
        rec.clone(),
        kind.to_owned(),
        event_fields(detail),
        token.cloned(),
    );
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        // Token row first, then the chain lock: the one order every transaction takes them in.
        if let Some(claim) = &token
            && let Err(refusal) = spend_token_in(&db, &tx, claim, rec.issued_at).await?
        {
            return Ok(Err(refusal));
        }
        insert_issued(&db, tx.client(), &rec).await?;
        append_own_in(&db, &tx, &own, rec.issued_at, &kind, fields).await?;
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(Ok(()))
    })
}

pub(super) fn list_issued(s: &PostgresStore, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT serial, spiffe_id, not_after, issued_at, requester FROM issued
                 ORDER BY issued_at DESC LIMIT $1",
                &[&i64::from(limit)],
            )
            .await
            .map_err(|e| db.err(e))?;
        rows.iter()
            .map(|r| {
                Ok(IssuedRecord {
                    serial: r.get(0),
                    spiffe_id: r.get(1),
                    not_after: from_ts(r.get(2))?,
                    issued_at: from_ts(r.get(3))?,
                    requester: r.get(4),
                })
            })
            .collect()
    })
}
