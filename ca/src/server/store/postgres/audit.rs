//! The audit trail: every writer's hash chain, the control plane's own chain included. Appends
//! to one chain are serialised across replicas by a transaction-scoped advisory lock on it,
//! and `UNIQUE (chain, seq)` backs that up: a record is stored once.

use time::OffsetDateTime;

use crate::identity::audit::Record;
use crate::server::store::{AuditConflict, AuditFilter, AuditRow, EventRecord, Store, StoreError};

use super::{Db, PostgresStore};

/// Takes the chain's advisory lock for the rest of the transaction.
pub(super) async fn lock_chain(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    chain: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&chain],
    )
    .await
    .map(|_| ())
    .map_err(|e| db.err(e))
}

/// The chain's last (seq, hash), or (0, genesis).
async fn head(
    db: &Db,
    c: &tokio_postgres::Client,
    chain: &str,
) -> Result<(u64, String), StoreError> {
    let row = c
        .query_opt(
            "SELECT seq, hash FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            &[&chain],
        )
        .await
        .map_err(|e| db.err(e))?;
    Ok(match row {
        Some(r) => (r.get::<_, i64>(0) as u64, r.get(1)),
        None => (0, crate::identity::audit::GENESIS.to_owned()),
    })
}

/// The advisory lock that orders audit appends across every chain and replica ("audit"
/// in ASCII, beside the migration lock's "mayfly").
const AUDIT_ORDER_LOCK: i64 = 0x61_7564_6974;

/// The insert of one audit row.
const INSERT: &str = "INSERT INTO audit (chain, seq, prev, hash, source, ts_ms, kind, line)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

/// Stores one row. The first insert of a transaction takes [`AUDIT_ORDER_LOCK`] until commit,
/// so ids are taken in commit order: without it a transaction could take id 9, commit after
/// another's id 10, and a follower reading by id (`audit_after`: `audit tail --follow`, the
/// console's live view) would have moved past 9 for good. Taken after the chain lock, as
/// every caller does, and never followed by another chain lock: no deadlock.
async fn insert(db: &Db, c: &tokio_postgres::Client, r: &AuditRow) -> Result<(), StoreError> {
    c.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_ORDER_LOCK])
        .await
        .map_err(|e| db.err(e))?;
    write_row(db, c, INSERT, &r.chain, r).await
}

/// Writes `r` into `chain` with `st` (the [`INSERT`], as text or prepared); the caller holds
/// the order lock.
async fn write_row<T: ?Sized + tokio_postgres::ToStatement>(
    db: &Db,
    c: &tokio_postgres::Client,
    st: &T,
    chain: &str,
    r: &AuditRow,
) -> Result<(), StoreError> {
    c.execute(
        st,
        &[
            &chain,
            &(r.seq as i64),
            &r.prev,
            &r.hash,
            &r.source,
            &r.ts_ms,
            &r.kind,
            &&*String::from_utf8_lossy(&r.line),
        ],
    )
    .await
    .map(|_| ())
    .map_err(|e| db.err(e))
}

/// The control plane's own record number `seq` after `prev`.
pub(super) fn own_row(
    (td, epoch): &(String, String),
    at: OffsetDateTime,
    kind: &str,
    seq: u64,
    prev: &str,
    fields: serde_json::Map<String, serde_json::Value>,
) -> AuditRow {
    let source = format!("spiffe://{td}{}", crate::identity::api::CA_ID_PATH);
    let rec = Record {
        v: crate::identity::audit::VERSION,
        source: source.clone(),
        epoch: epoch.clone(),
        seq,
        prev: prev.to_owned(),
        ts_ms: (at.unix_timestamp_nanos() / 1_000_000) as i64,
        kind: kind.to_owned(),
        fields,
    };
    let line = rec.line();
    AuditRow {
        chain: format!("{source}#{epoch}"),
        seq,
        prev: prev.to_owned(),
        hash: crate::identity::audit::line_hash(&line),
        source,
        ts_ms: rec.ts_ms,
        kind: kind.to_owned(),
        line,
    }
}

/// Appends one record with fixed fields to the own chain inside an open transaction.
pub(super) async fn append_own_in(
    db: &Db,
    tx: &deadpool_postgres::Transaction<'_>,
    own: &(String, String),
    at: OffsetDateTime,
    kind: &str,
    fields: serde_json::Map<String, serde_json::Value>,
) -> Result<i64, StoreError> {
    let chain = own_chain_key(own);
    lock_chain(db, tx, &chain).await?;
    let (last, prev) = head(db, tx.client(), &chain).await?;
    let row = own_row(own, at, kind, last + 1, &prev, fields);
    insert(db, tx.client(), &row).await?;
    Ok(row.seq as i64)
}

fn own_chain_key((td, epoch): &(String, String)) -> String {
    format!("spiffe://{td}{}#{epoch}", crate::identity::api::CA_ID_PATH)
}

impl PostgresStore {
    /// The control plane's own chain (trust domain, epoch): one epoch per database, shared by
    /// every replica (the first to ask makes it).
    pub(super) fn own_parts(&self) -> Result<&(String, String), StoreError> {
        if let Some(p) = self.own.get() {
            return Ok(p);
        }
        let td = self
            .setting("trust_domain")?
            .ok_or(StoreError::NotInitialised)?;
        let mut b = [0u8; 8];
        crate::identity::keys::fill_random(&mut b);
        let mine = hex::encode(b);
        let epoch = self.run(true, |db| async move {
            let c = db.client().await?;
            c.execute(
                "INSERT INTO settings (key, value) VALUES ('audit_epoch', $1)
                 ON CONFLICT (key) DO NOTHING",
                &[&mine],
            )
            .await
            .map_err(|e| db.err(e))?;
            let row = c
                .query_one("SELECT value FROM settings WHERE key = 'audit_epoch'", &[])
                .await
                .map_err(|e| db.err(e))?;
            Ok(row.get::<_, String>(0))
        })?;
        Ok(self.own.get_or_init(|| (td, epoch)))
    }
}

/// Most attempts of an own-chain append that other writers keep overtaking.
const OWN_APPEND_ATTEMPTS: usize = 100;

pub(super) fn append_own(
    s: &PostgresStore,
    at: OffsetDateTime,
    kind: &str,
    make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
) -> Result<i64, StoreError> {
    let own = s.own_parts()?.clone();
    let chain = own_chain_key(&own);
    // `make` is the caller's (it may sign seq and prev) and cannot move to the store's
    // runtime: read the head, build the record here, and store it only if the head has not
    // moved meanwhile (another replica appended), else start again.
    for _ in 0..OWN_APPEND_ATTEMPTS {
        let ch = chain.clone();
        let (last, prev) = s.run(false, |db| async move {
            let c = db.client().await?;
            head(&db, &c, &ch).await
        })?;
        let row = own_row(&own, at, kind, last + 1, &prev, make(last + 1, &prev));
        let stored = s.run(true, |db| async move {
            let mut c = db.client().await?;
            let tx = c.transaction().await.map_err(|e| db.err(e))?;
            lock_chain(&db, &tx, &row.chain).await?;
            if head(&db, tx.client(), &row.chain).await? != (last, prev) {
                return Ok(None);
            }
            insert(&db, tx.client(), &row).await?;
            tx.commit().await.map_err(|e| db.err(e))?;
            Ok(Some(row.seq as i64))
        })?;
        if let Some(seq) = stored {
            return Ok(seq);
        }
    }
    Err(StoreError::Db(format!(
        "could not append to {chain}: other writers kept appending first"
    )))
}

pub(super) fn events_after(
    s: &PostgresStore,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    let Some(chain) = s.own_chain()? else {
        return Ok(Vec::new());
    };
    let lines: Vec<String> = s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT line FROM audit WHERE chain = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&chain, &after_seq, &i64::from(limit)],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })?;
    lines
        .into_iter()
        .map(|line| {
            let r: Record = serde_json::from_str(&line)
                .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
            Ok(EventRecord {
                seq: r.seq as i64,
                at: OffsetDateTime::from_unix_timestamp(r.ts_ms / 1000)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                kind: r.kind,
                detail: serde_json::Value::Object(r.fields).to_string(),
            })
        })
        .collect()
}

pub(super) fn last_own_kind(s: &PostgresStore) -> Result<Option<String>, StoreError> {
    let Some(chain) = s.own_chain()? else {
        return Ok(None);
    };
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt(
                "SELECT kind FROM audit WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
                &[&chain],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.map(|r| r.get(0)))
    })
}

pub(super) fn own_chain(s: &PostgresStore) -> Result<Option<String>, StoreError> {
    let (Some(td), Some(epoch)) = (s.setting("trust_domain")?, s.setting("audit_epoch")?) else {
        return Ok(None);
    };
    Ok(Some(own_chain_key(&(td, epoch))))
}

pub(super) fn audit_append(
    s: &PostgresStore,
    chain: &str,
    rows: &[AuditRow],
) -> Result<Result<u64, AuditConflict>, StoreError> {
    let chain = chain.to_owned();
    let rows = rows.to_vec();
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        // Serialised with every other append to this chain, on any replica: a redelivery
        // racing its first delivery finds the first's rows here and is skipped.
        lock_chain(&db, &tx, &chain).await?;
        let (mut last, mut last_hash) = head(&db, tx.client(), &chain).await?;
        let mut insert_st = None;
        for r in &rows {
            if r.seq <= last {
                let stored = tx
                    .query_opt(
                        "SELECT hash FROM audit WHERE chain = $1 AND seq = $2",
                        &[&chain, &(r.seq as i64)],
                    )
                    .await
                    .map_err(|e| db.err(e))?
                    .map(|x| x.get::<_, String>(0));
                if stored.as_deref() != Some(r.hash.as_str()) {
                    return Ok(Err(AuditConflict::Diverged {
                        chain: chain.clone(),
                        seq: r.seq,
                    }));
                }
                continue;
            }
            if r.seq != last + 1 || r.prev != last_hash {
                return Ok(Err(AuditConflict::Gap {
                    chain: chain.clone(),
                    expected: last + 1,
                }));
            }
            // A batch is one round trip per row: the order lock (see [`insert`]) taken once,
            // before the first insert, and the insert prepared once (it used to be prepared,
            // and the lock taken again, for every row: four round trips).
            let st = match &insert_st {
                Some(st) => st,
                None => {
                    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_ORDER_LOCK])
                        .await
                        .map_err(|e| db.err(e))?;
                    let st = tx.prepare_cached(INSERT).await.map_err(|e| db.err(e))?;
                    insert_st.insert(st)
                }
            };
            write_row(&db, tx.client(), st, &chain, r).await?;
            last = r.seq;
            last_hash.clone_from(&r.hash);
        }
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(Ok(last))
    })
}

/// The single text column of every row, as bytes.
fn lines(rows: Vec<tokio_postgres::Row>) -> Vec<Vec<u8>> {
    rows.iter()
        .map(|r| r.get::<_, String>(0).into_bytes())
        .collect()
}

pub(super) fn audit_chains(s: &PostgresStore) -> Result<Vec<String>, StoreError> {
    s.run(false, |db| async move {
        let c = db.client().await?;
        let rows = c
            .query("SELECT DISTINCT chain FROM audit ORDER BY chain", &[])
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    })
}

pub(super) fn audit_lines(s: &PostgresStore, chain: &str) -> Result<Vec<Vec<u8>>, StoreError> {
    let chain = chain.to_owned();
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT line FROM audit WHERE chain = $1 ORDER BY seq",
                &[&chain],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(lines(rows))
    })
}

pub(super) fn audit_rows(s: &PostgresStore, chain: &str) -> Result<Vec<AuditRow>, StoreError> {
    let chain = chain.to_owned();
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT chain, seq, prev, hash, source, ts_ms, kind, line FROM audit
                 WHERE chain = $1 ORDER BY id",
                &[&chain],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                chain: r.get(0),
                seq: r.get::<_, i64>(1) as u64,
                prev: r.get(2),
                hash: r.get(3),
                source: r.get(4),
                ts_ms: r.get(5),
                kind: r.get(6),
                line: r.get::<_, String>(7).into_bytes(),
            })
            .collect())
    })
}

pub(super) fn audit_after(
    s: &PostgresStore,
    after_id: i64,
    limit: u32,
) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT id, line FROM audit WHERE id > $1 ORDER BY id LIMIT $2",
                &[&after_id, &i64::from(limit)],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, String>(1).into_bytes()))
            .collect())
    })
}

pub(super) fn audit_query(s: &PostgresStore, f: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError> {
    // Inbound records name the caller in peer_id, outbound ones in local_id.
    let sql = "SELECT line FROM audit WHERE
        ($1::bigint IS NULL OR ts_ms >= $1) AND ($2::bigint IS NULL OR ts_ms < $2)
        AND ($3::text IS NULL OR CASE line::json->>'direction'
                WHEN 'inbound' THEN line::json->>'peer_id'
                ELSE line::json->>'local_id' END = $3)
        AND ($4::text IS NULL OR CASE line::json->>'direction'
                WHEN 'inbound' THEN line::json->>'local_id'
                ELSE line::json->>'peer_id' END = $4)
        AND ($5::text IS NULL OR line::json->>'decision' = $5)
        AND ($6::text IS NULL OR line::json->>'rule' = $6)
        AND ($7::text IS NULL OR line::json->>'grant' = $7)
        AND ($8::text IS NULL OR kind = $8)
        ORDER BY ts_ms, id LIMIT $9";
    let f = f.clone();
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                sql,
                &[
                    &f.since_ms,
                    &f.until_ms,
                    &f.source,
                    &f.destination,
                    &f.decision,
                    &f.rule,
                    &f.grant,
                    &f.kind,
                    &i64::from(f.limit),
                ],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(lines(rows))
    })
}
