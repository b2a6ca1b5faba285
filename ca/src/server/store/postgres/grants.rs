//! Just-in-time grants: stored as JSON bodies, decided compare-and-set. A conditional
//! `UPDATE` re-checks its condition after waiting for a concurrent one (on any replica), so of
//! a racing approve and revoke exactly one changes the row and the other is told `false`.

use crate::server::store::{GrantState, StoreError};

use super::PostgresStore;

/// The single text column of every row `sql` returns.
fn bodies(
    s: &PostgresStore,
    write: bool,
    sql: &'static str,
    now: Option<i64>,
) -> Result<Vec<String>, StoreError> {
    s.run(write, move |db| async move {
        let c = db.client().await?;
        let rows = match now {
            Some(n) => c.query(sql, &[&n]).await,
            None => c.query(sql, &[]).await,
        }
        .map_err(|e| db.err(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })
}

pub(super) fn insert_grant(
    s: &PostgresStore,
    id: &str,
    state: GrantState,
    expires: i64,
    body: &str,
) -> Result<(), StoreError> {
    let (id, body) = (id.to_owned(), body.to_owned());
    s.run(true, move |db| async move {
        let c = db.client().await?;
        c.execute(
            "INSERT INTO grants (id, state, expires, body) VALUES ($1, $2, $3, $4)",
            &[&id, &state.as_str(), &expires, &body],
        )
        .await
        .map(|_| ())
        .map_err(|e| db.err(e))
    })
}

pub(super) fn update_grant(
    s: &PostgresStore,
    id: &str,
    from: GrantState,
    seen: &str,
    to: GrantState,
    expires: i64,
    body: &str,
) -> Result<bool, StoreError> {
    let (id, seen, body) = (id.to_owned(), seen.to_owned(), body.to_owned());
    s.run(true, move |db| async move {
        let c = db.client().await?;
        c.execute(
            "UPDATE grants SET state = $3, expires = $4, body = $5
             WHERE id = $1 AND state = $2 AND body = $6",
            &[&id, &from.as_str(), &to.as_str(), &expires, &body, &seen],
        )
        .await
        .map(|n| n == 1)
        .map_err(|e| db.err(e))
    })
}

pub(super) fn grant(s: &PostgresStore, id: &str) -> Result<Option<String>, StoreError> {
    let id = id.to_owned();
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt("SELECT body FROM grants WHERE id = $1", &[&id])
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.map(|r| r.get(0)))
    })
}

pub(super) fn list_grants(s: &PostgresStore) -> Result<Vec<String>, StoreError> {
    bodies(
        s,
        false,
        "SELECT body FROM grants ORDER BY created DESC, id",
        None,
    )
}

pub(super) fn live_grants(s: &PostgresStore, now: i64) -> Result<Vec<String>, StoreError> {
    bodies(
        s,
        false,
        "SELECT body FROM grants WHERE state = 'active' AND expires > $1
         ORDER BY created DESC, id",
        Some(now),
    )
}

pub(super) fn expire_grants(s: &PostgresStore, now: i64) -> Result<Vec<String>, StoreError> {
    // One statement: a grant moves to expired exactly once, whichever replica scans.
    bodies(
        s,
        true,
        "UPDATE grants SET state = 'expired',
            body = jsonb_set(body::jsonb, '{state}', '\"expired\"')::text
         WHERE state = 'active' AND expires <= $1 RETURNING body",
        Some(now),
    )
}

pub(super) fn next_grant_expiry(s: &PostgresStore, now: i64) -> Result<Option<i64>, StoreError> {
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let row = c
            .query_one(
                "SELECT min(expires) FROM grants WHERE state = 'active' AND expires > $1",
                &[&now],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.get(0))
    })
}
