//! Join tokens: created, listed, revoked, and spent exactly once.

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::server::store::{StoreError, TokenClaim, TokenRecord, TokenRefusal};

use super::{SqliteStore, db, from_ts, opt_ts, ts};

/// Spends a join token inside an open transaction: looked up by its ID, its secret's hash
/// compared in constant time. A refusal writes nothing.
pub(super) fn spend_token_in(
    c: &Connection,
    claim: &TokenClaim,
    now: OffsetDateTime,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1"
        ))
        .and_then(|mut st| st.query_row([&claim.id], token_row).optional())
        .map_err(db)?;
    let Some(row) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let t = token_from(row)?;
    if let Err(refusal) = t.check(&claim.hash, now) {
        return Ok(Err(refusal));
    }
    let n = c
        .prepare_cached(
            "UPDATE join_tokens SET used_at = ?1
             WHERE id = ?2 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .and_then(|mut st| st.execute(params![ts(now), claim.id]))
        .map_err(db)?;
    Ok(if n == 1 {
        Ok(())
    } else {
        Err(TokenRefusal::Used(t.id))
    })
}

pub(super) fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

pub(super) type TokenRow = (
    String,
    String,
    String,
    i64,
    i64,
    String,
    Option<i64>,
    Option<i64>,
);

pub(super) fn token_from(row: TokenRow) -> Result<TokenRecord, StoreError> {
    let (id, hash, spiffe_id, created, expires, created_by, used, revoked) = row;
    Ok(TokenRecord {
        id,
        hash,
        spiffe_id,
        created_at: from_ts(created)?,
        expires_at: from_ts(expires)?,
        created_by,
        used_at: opt_ts(used)?,
        revoked_at: opt_ts(revoked)?,
    })
}

pub(super) const TOKEN_COLS: &str =
    "id, hash, spiffe_id, created_at, expires_at, created_by, used_at, revoked_at";

pub(super) fn insert_token(s: &SqliteStore, t: &TokenRecord) -> Result<(), StoreError> {
    s.with(|c| {
        c.execute(
            "INSERT INTO join_tokens
               (id, hash, spiffe_id, created_at, expires_at, created_by, used_at, revoked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                t.id,
                t.hash,
                t.spiffe_id,
                ts(t.created_at),
                ts(t.expires_at),
                t.created_by,
                t.used_at.map(ts),
                t.revoked_at.map(ts)
            ],
        )
        .map(|_| ())
        .map_err(db)
    })
}

pub(super) fn find_token(s: &SqliteStore, id: &str) -> Result<Option<TokenRecord>, StoreError> {
    let row = s.with(|c| {
        c.query_row(
            &format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1"),
            [id],
            token_row,
        )
        .optional()
        .map_err(db)
    })?;
    row.map(token_from).transpose()
}

pub(super) fn revoke_token(
    s: &SqliteStore,
    id: &str,
    now: OffsetDateTime,
) -> Result<bool, StoreError> {
    s.with(|c| {
        c.execute(
            "UPDATE join_tokens SET revoked_at = ?1
             WHERE id = ?2 AND used_at IS NULL AND revoked_at IS NULL",
            params![ts(now), id],
        )
        .map(|n| n == 1)
        .map_err(db)
    })
}

pub(super) fn list_tokens(s: &SqliteStore) -> Result<Vec<TokenRecord>, StoreError> {
    let rows = s.with(|c| {
        let mut st = c
            .prepare(&format!(
                "SELECT {TOKEN_COLS} FROM join_tokens ORDER BY created_at DESC, id"
            ))
            .map_err(db)?;
        let rows = st
            .query_map([], token_row)
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })?;
    rows.into_iter().map(token_from).collect()
}
