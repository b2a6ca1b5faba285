//! People's sign-ins, one row per user SPIFFE ID, stored as JSON.

use rusqlite::OptionalExtension;

use super::{SqliteStore, db};
use crate::server::store::{StoreError, UserSession};

pub(super) fn put_user_session(s: &SqliteStore, session: &UserSession) -> Result<(), StoreError> {
    let body = serde_json::to_string(session).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    s.with(|c| {
        c.execute(
            "INSERT INTO user_sessions (spiffe_id, expires_at, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (spiffe_id) DO UPDATE SET expires_at = ?2, body = ?3",
            rusqlite::params![session.spiffe_id, session.expires_at, body],
        )
        .map(|_| ())
        .map_err(db)
    })
}

pub(super) fn user_session(
    s: &SqliteStore,
    spiffe_id: &str,
) -> Result<Option<UserSession>, StoreError> {
    let body: Option<String> = s.with(|c| {
        c.query_row(
            "SELECT body FROM user_sessions WHERE spiffe_id = ?1",
            [spiffe_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db)
    })?;
    body.map(|b| serde_json::from_str(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}
