//! What replicas share beyond the core records: the change counters, the endpoint registry
//! (leased rows) and the published policies. One SQLite file has one writer at a time, so
//! each operation is one transaction and sees no other's half-done work.

use rusqlite::{OptionalExtension, params};

use crate::server::store::{Changes, EndpointRow, PublishedPolicy, StoreError};

use super::{SqliteStore, db};

/// Bumps a change counter inside the caller's transaction.
fn bump(tx: &rusqlite::Transaction<'_>, topic: &str) -> Result<(), StoreError> {
    tx.execute("UPDATE changes SET n = n + 1 WHERE topic = ?1", [topic])
        .map(|_| ())
        .map_err(db)
}

pub(super) fn changes(s: &SqliteStore) -> Result<Changes, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare_cached("SELECT topic, n FROM changes")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(db)?;
        let mut out = Changes::default();
        for row in rows {
            let (topic, n) = row.map_err(db)?;
            match topic.as_str() {
                "grants" => out.grants = n,
                "endpoints" => out.endpoints = n,
                "policy" => out.policy = n,
                "authorities" => out.authorities = n,
                _ => {}
            }
        }
        Ok(out)
    })
}

pub(super) fn register_endpoints(
    s: &SqliteStore,
    id: &str,
    addresses: &[String],
    until_ms: i64,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        let mut new = Vec::new();
        for a in addresses {
            let live: Option<i64> = tx
                .query_row(
                    "SELECT since_ms FROM endpoints
                     WHERE spiffe_id = ?1 AND address = ?2 AND until_ms > ?3",
                    params![id, a, now_ms],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            if live.is_none() {
                new.push(a.clone());
            }
            tx.execute(
                "INSERT INTO endpoints (spiffe_id, address, since_ms, until_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (spiffe_id, address)
                 DO UPDATE SET since_ms = excluded.since_ms, until_ms = excluded.until_ms",
                params![id, a, live.unwrap_or(now_ms), until_ms],
            )
            .map_err(db)?;
        }
        if !new.is_empty() {
            bump(&tx, "endpoints")?;
        }
        tx.commit().map_err(db)?;
        Ok(new)
    })
}

pub(super) fn remove_endpoints(
    s: &SqliteStore,
    id: &str,
    addresses: &[String],
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        let mut removed = Vec::new();
        let mut any = false;
        for a in addresses {
            let until: Option<i64> = tx
                .query_row(
                    "DELETE FROM endpoints WHERE spiffe_id = ?1 AND address = ?2
                     RETURNING until_ms",
                    params![id, a],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db)?;
            any |= until.is_some();
            if until.is_some_and(|u| u > now_ms) {
                removed.push(a.clone());
            }
        }
        if any {
            bump(&tx, "endpoints")?;
        }
        tx.commit().map_err(db)?;
        Ok(removed)
    })
}

pub(super) fn sweep_endpoints(
    s: &SqliteStore,
    now_ms: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        let gone = {
            let mut st = tx
                .prepare_cached(
                    "DELETE FROM endpoints WHERE until_ms <= ?1 RETURNING spiffe_id, address",
                )
                .map_err(db)?;
            st.query_map([now_ms], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(db)?
                .collect::<Result<Vec<(String, String)>, _>>()
                .map_err(db)?
        };
        if !gone.is_empty() {
            bump(&tx, "endpoints")?;
        }
        tx.commit().map_err(db)?;
        Ok(gone)
    })
}

pub(super) fn endpoints(s: &SqliteStore) -> Result<Vec<EndpointRow>, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare_cached(
                "SELECT spiffe_id, address, since_ms, until_ms FROM endpoints
                 ORDER BY spiffe_id, address",
            )
            .map_err(db)?;
        st.query_map([], |r| {
            Ok(EndpointRow {
                spiffe_id: r.get(0)?,
                address: r.get(1)?,
                since_ms: r.get(2)?,
                until_ms: r.get(3)?,
            })
        })
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)
    })
}

pub(super) fn publish_policy(
    s: &SqliteStore,
    version: &str,
    source: &str,
    at: i64,
    by: &str,
) -> Result<bool, StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        let newest: Option<String> = tx
            .query_row(
                "SELECT version FROM policies ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        if newest.as_deref() == Some(version) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO policies (version, source, published_at, published_by)
             VALUES (?1, ?2, ?3, ?4)",
            params![version, source, at, by],
        )
        .map_err(db)?;
        bump(&tx, "policy")?;
        tx.commit().map_err(db)?;
        Ok(true)
    })
}

pub(super) fn policy(s: &SqliteStore) -> Result<Option<PublishedPolicy>, StoreError> {
    s.with(|c| {
        c.query_row(
            "SELECT version, source, published_at, published_by FROM policies
             ORDER BY id DESC LIMIT 1",
            [],
            |r| {
                Ok(PublishedPolicy {
                    version: r.get(0)?,
                    source: r.get(1)?,
                    published_at: r.get(2)?,
                    published_by: r.get(3)?,
                })
            },
        )
        .optional()
        .map_err(db)
    })
}
