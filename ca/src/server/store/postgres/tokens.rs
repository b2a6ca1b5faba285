//! Join tokens: created, listed, revoked, and spent exactly once across replicas.

use time::OffsetDateTime;
use tokio_postgres::Row;

use crate::server::store::{StoreError, TokenClaim, TokenRecord, TokenRefusal};

use super::{Db, PostgresStore, from_ts, opt_ts, ts};

const TOKEN_COLS: &str =
    "id, hash, spiffe_id, created_at, expires_at, created_by, used_at, revoked_at";

fn token_from(r: &Row) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: r.get(0),
        hash: r.get(1),
        spiffe_id: r.get(2),
        created_at: from_ts(r.get(3))?,
        expires_at: from_ts(r.get(4))?,
        created_by: r.get(5),
        used_at: opt_ts(r.get(6))?,
        revoked_at: opt_ts(r.get(7))?,
    })
}

/// Spends a join token inside an open transaction. The conditional `UPDATE` is what makes it
/// exactly once: a concurrent spender (on any replica) waits for this transaction and then
/// finds the token used. A refusal writes nothing.
pub(super) async fn spend_token_in(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    claim: &TokenClaim,
    now: OffsetDateTime,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let row = tx
        .query_opt(
            &format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = $1"),
            &[&claim.id],
        )
        .await
        .map_err(|e| db.err(e))?;
    let Some(row) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let t = token_from(&row)?;
    if let Err(refusal) = t.check(&claim.hash, now) {
        return Ok(Err(refusal));
    }
    let n = tx
        .execute(
            "UPDATE join_tokens SET used_at = $1
             WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
            &[&ts(now), &claim.id],
        )
        .await
        .map_err(|e| db.err(e))?;
    Ok(if n == 1 {
        Ok(())
    } else {
        // Lost the race: the winner (or a revocation) committed first.
        let now_row = tx
            .query_opt(
                "SELECT revoked_at FROM join_tokens WHERE id = $1",
                &[&claim.id],
            )
            .await
            .map_err(|e| db.err(e))?;
        match now_row.and_then(|r| r.get::<_, Option<i64>>(0)) {
            Some(_) => Err(TokenRefusal::Revoked(t.id)),
            None => Err(TokenRefusal::Used(t.id)),
        }
    })
}

pub(super) fn insert_token(s: &PostgresStore, t: &TokenRecord) -> Result<(), StoreError> {
    let t = t.clone();
    s.run(true, |db| async move {
        let c = db.client().await?;
        c.execute(
            "INSERT INTO join_tokens
               (id, hash, spiffe_id, created_at, expires_at, created_by, used_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &t.id,
                &t.hash,
                &t.spiffe_id,
                &ts(t.created_at),
                &ts(t.expires_at),
                &t.created_by,
                &t.used_at.map(ts),
                &t.revoked_at.map(ts),
            ],
        )
        .await
        .map(|_| ())
        .map_err(|e| db.err(e))
    })
}

pub(super) fn find_token(s: &PostgresStore, id: &str) -> Result<Option<TokenRecord>, StoreError> {
    let id = id.to_owned();
    s.run(false, |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt(
                &format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(|e| db.err(e))?;
        row.as_ref().map(token_from).transpose()
    })
}

pub(super) fn revoke_token(
    s: &PostgresStore,
    id: &str,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    let id = id.to_owned();
    s.run(true, |db| async move {
        let c = db.client().await?;
        c.execute(
            "UPDATE join_tokens SET revoked_at = $1
             WHERE id = $2 AND used_at IS NULL AND revoked_at IS NULL",
            &[&ts(now), &id],
        )
        .await
        .map(|n| n == 1)
        .map_err(|e| db.err(e))
    })
}

pub(super) fn list_tokens(s: &PostgresStore) -> Result<Vec<TokenRecord>, StoreError> {
    s.run(false, |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                &format!("SELECT {TOKEN_COLS} FROM join_tokens ORDER BY created_at DESC, id"),
                &[],
            )
            .await
            .map_err(|e| db.err(e))?;
        rows.iter().map(token_from).collect()
    })
}
