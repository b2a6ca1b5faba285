//! What replicas share beyond the core records: the change counters, the endpoint registry
//! (leased rows) and the published policies. A registration or a sweep takes the rows it
//! reads `FOR UPDATE` (or deletes them), so of two replicas sweeping at once each expired
//! entry is reported by one.

use time::OffsetDateTime;

use crate::server::store::{Changes, EndpointRow, PublishedPolicy, StoreError};

use super::{PostgresStore, ts};

const BUMP: &str = "UPDATE mayfly_changes SET n = n + 1 WHERE topic = $1";

pub(super) fn changes(s: &PostgresStore) -> Result<Changes, StoreError> {
    s.run(false, |db| async move {
        let c = db.client().await?;
        let rows = c
            .query("SELECT topic, n FROM mayfly_changes", &[])
            .await
            .map_err(|e| db.err(e))?;
        let mut out = Changes::default();
        for r in rows {
            let n: i64 = r.get(1);
            match r.get::<_, &str>(0) {
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
    s: &PostgresStore,
    id: &str,
    addresses: &[String],
    until_ms: i64,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let (id, addresses) = (id.to_owned(), addresses.to_vec());
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        let mut new = Vec::new();
        for a in &addresses {
            let live = tx
                .query_opt(
                    "SELECT since_ms FROM endpoints
                     WHERE spiffe_id = $1 AND address = $2 AND until_ms > $3 FOR UPDATE",
                    &[&id, a, &now_ms],
                )
                .await
                .map_err(|e| db.err(e))?
                .map(|r| r.get::<_, i64>(0));
            if live.is_none() {
                new.push(a.clone());
            }
            tx.execute(
                "INSERT INTO endpoints (spiffe_id, address, since_ms, until_ms)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (spiffe_id, address)
                 DO UPDATE SET since_ms = excluded.since_ms, until_ms = excluded.until_ms",
                &[&id, a, &live.unwrap_or(now_ms), &until_ms],
            )
            .await
            .map_err(|e| db.err(e))?;
        }
        if !new.is_empty() {
            tx.execute(BUMP, &[&"endpoints"])
                .await
                .map_err(|e| db.err(e))?;
        }
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(new)
    })
}

pub(super) fn remove_endpoints(
    s: &PostgresStore,
    id: &str,
    addresses: &[String],
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let (id, addresses) = (id.to_owned(), addresses.to_vec());
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        let rows = tx
            .query(
                "DELETE FROM endpoints WHERE spiffe_id = $1 AND address = ANY($2)
                 RETURNING address, until_ms",
                &[&id, &addresses],
            )
            .await
            .map_err(|e| db.err(e))?;
        if !rows.is_empty() {
            tx.execute(BUMP, &[&"endpoints"])
                .await
                .map_err(|e| db.err(e))?;
        }
        tx.commit().await.map_err(|e| db.err(e))?;
        // In the order asked.
        Ok(addresses
            .into_iter()
            .filter(|a| {
                rows.iter()
                    .any(|r| r.get::<_, &str>(0) == a && r.get::<_, i64>(1) > now_ms)
            })
            .collect())
    })
}

pub(super) fn sweep_endpoints(
    s: &PostgresStore,
    now_ms: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        let rows = tx
            .query(
                "DELETE FROM endpoints WHERE until_ms <= $1 RETURNING spiffe_id, address",
                &[&now_ms],
            )
            .await
            .map_err(|e| db.err(e))?;
        if !rows.is_empty() {
            tx.execute(BUMP, &[&"endpoints"])
                .await
                .map_err(|e| db.err(e))?;
        }
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    })
}

pub(super) fn endpoints(s: &PostgresStore) -> Result<Vec<EndpointRow>, StoreError> {
    s.run(false, |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT spiffe_id, address, since_ms, until_ms FROM endpoints
                 ORDER BY spiffe_id, address",
                &[],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows
            .iter()
            .map(|r| EndpointRow {
                spiffe_id: r.get(0),
                address: r.get(1),
                since_ms: r.get(2),
                until_ms: r.get(3),
            })
            .collect())
    })
}

pub(super) fn publish_policy(
    s: &PostgresStore,
    version: &str,
    source: &str,
    at: OffsetDateTime,
    by: &str,
) -> Result<bool, StoreError> {
    let (version, source, by, at) = (version.to_owned(), source.to_owned(), by.to_owned(), ts(at));
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        // The counter row is the publication lock: publishers take turns, each comparing
        // with the newest committed one.
        tx.execute(
            "SELECT n FROM mayfly_changes WHERE topic = 'policy' FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| db.err(e))?;
        let newest = tx
            .query_opt("SELECT version FROM policies ORDER BY id DESC LIMIT 1", &[])
            .await
            .map_err(|e| db.err(e))?
            .map(|r| r.get::<_, String>(0));
        if newest.as_deref() == Some(version.as_str()) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO policies (version, source, published_at, published_by)
             VALUES ($1, $2, $3, $4)",
            &[&version, &source, &at, &by],
        )
        .await
        .map_err(|e| db.err(e))?;
        tx.execute(BUMP, &[&"policy"])
            .await
            .map_err(|e| db.err(e))?;
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(true)
    })
}

pub(super) fn policy(s: &PostgresStore) -> Result<Option<PublishedPolicy>, StoreError> {
    s.run(false, |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt(
                "SELECT version, source, published_at, published_by FROM policies
                 ORDER BY id DESC LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.map(|r| PublishedPolicy {
            version: r.get(0),
            source: r.get(1),
            published_at: r.get(2),
            published_by: r.get(3),
        }))
    })
}
