//! People's sign-ins, one row per user SPIFFE ID, stored as JSON.

use super::PostgresStore;
use crate::server::store::{StoreError, UserSession};

pub(super) fn put_user_session(s: &PostgresStore, session: &UserSession) -> Result<(), StoreError> {
    let body = serde_json::to_string(session).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let (id, expires) = (session.spiffe_id.clone(), session.expires_at);
    s.run(true, move |db| async move {
        let c = db.client().await?;
        c.execute(
            "INSERT INTO user_sessions (spiffe_id, expires_at, body) VALUES ($1, $2, $3)
             ON CONFLICT (spiffe_id) DO UPDATE SET expires_at = $2, body = $3",
            &[&id, &expires, &body],
        )
        .await
        .map(|_| ())
        .map_err(|e| db.err(e))
    })
}

pub(super) fn user_session(
    s: &PostgresStore,
    spiffe_id: &str,
) -> Result<Option<UserSession>, StoreError> {
    let id = spiffe_id.to_owned();
    let body: Option<String> = s.run(false, move |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt(
                "SELECT body FROM user_sessions WHERE spiffe_id = $1",
                &[&id],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.map(|r| r.get(0)))
    })?;
    body.map(|b| serde_json::from_str(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}
