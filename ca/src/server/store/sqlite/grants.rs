//! Just-in-time grants: stored as JSON bodies, decided compare-and-set.

use rusqlite::{OptionalExtension, params};

use crate::server::store::{GrantState, StoreError};

use super::{SqliteStore, bodies, db};

pub(super) fn insert_grant(
    s: &SqliteStore,
    id: &str,
    state: GrantState,
    expires: i64,
    body: &str,
) -> Result<(), StoreError> {
    s.with(|c| {
        c.execute(
            "INSERT INTO grants (id, state, expires, body) VALUES (?1, ?2, ?3, ?4)",
            params![id, state.as_str(), expires, body],
        )
        .map(|_| ())
        .map_err(db)
    })
}

pub(super) fn update_grant(
    s: &SqliteStore,
    id: &str,
    from: GrantState,
    seen: &str,
    to: GrantState,
    expires: i64,
    body: &str,
) -> Result<bool, StoreError> {
    s.with(|c| {
        c.execute(
            "UPDATE grants SET state = ?3, expires = ?4, body = ?5
             WHERE id = ?1 AND state = ?2 AND body = ?6",
            params![id, from.as_str(), to.as_str(), expires, body, seen],
        )
        .map(|n| n == 1)
        .map_err(db)
    })
}

pub(super) fn grant(s: &SqliteStore, id: &str) -> Result<Option<String>, StoreError> {
    s.with(|c| {
        c.query_row("SELECT body FROM grants WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(db)
    })
}

pub(super) fn list_grants(s: &SqliteStore) -> Result<Vec<String>, StoreError> {
    s.with(|c| bodies(c, "SELECT body FROM grants ORDER BY created DESC, id", []))
}

pub(super) fn live_grants(s: &SqliteStore, now: i64) -> Result<Vec<String>, StoreError> {
    s.with(|c| {
        bodies(
            c,
            "SELECT body FROM grants WHERE state = 'active' AND expires > ?1
             ORDER BY created DESC, id",
            [now],
        )
    })
}

pub(super) fn expire_grants(s: &SqliteStore, now: i64) -> Result<Vec<String>, StoreError> {
    // One statement: a grant moves to expired exactly once, whoever else scans.
    s.with(|c| {
        bodies(
            c,
            "UPDATE grants SET state = 'expired', body = json_set(body, '$.state', 'expired')
             WHERE state = 'active' AND expires <= ?1 RETURNING body",
            [now],
        )
    })
}

pub(super) fn next_grant_expiry(s: &SqliteStore, now: i64) -> Result<Option<i64>, StoreError> {
    s.with(|c| {
        c.query_row(
            "SELECT min(expires) FROM grants WHERE state = 'active' AND expires > ?1",
            [now],
            |r| r.get(0),
        )
        .map_err(db)
    })
}
