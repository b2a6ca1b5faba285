//! The audit trail: every writer's hash chain, the control plane's own chain (its epoch,
//! appends) included, and the reads `audit verify`, `tail` and `query` make.

use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::identity::audit::Record;
use crate::server::store::{AuditConflict, AuditFilter, AuditRow, EventRecord, Store, StoreError};

use super::{SqliteStore, db};

pub(super) use crate::server::store::event_fields;

/// Appends one record to the control plane's own chain inside an open transaction.
pub(super) fn append_own_in(
    c: &Connection,
    (td, epoch): &(String, String),
    at: OffsetDateTime,
    kind: &str,
    make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
) -> Result<i64, StoreError> {
    let source = format!("spiffe://{td}{}", crate::identity::api::CA_ID_PATH);
    let chain = format!("{source}#{epoch}");
    let head: Option<(i64, String)> = c
        .prepare_cached("SELECT seq, hash FROM audit WHERE chain = ?1 ORDER BY seq DESC LIMIT 1")
        .and_then(|mut st| {
            st.query_row([&chain], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db)?;
    let (seq, prev) = match head {
        Some((s, h)) => (s as u64 + 1, h),
        None => (1, crate::identity::audit::GENESIS.to_owned()),
    };
    let rec = Record {
        v: crate::identity::audit::VERSION,
        source: source.clone(),
        epoch: epoch.clone(),
        seq,
        prev: prev.clone(),
        ts_ms: (at.unix_timestamp_nanos() / 1_000_000) as i64,
        kind: kind.to_owned(),
        fields: make(seq, &prev),
    };
    let line = rec.line();
    let hash = crate::identity::audit::line_hash(&line);
    c.prepare_cached(
        "INSERT INTO audit (chain, seq, prev, hash, source, ts_ms, kind, line)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut st| {
        st.execute(params![
            chain,
            seq as i64,
            prev,
            hash,
            source,
            rec.ts_ms,
            kind,
            String::from_utf8_lossy(&line)
        ])
    })
    .map_err(db)?;
    Ok(seq as i64)
}

impl SqliteStore {
    /// The control plane's own chain (trust domain, epoch), the epoch made on first use.
    pub(super) fn own_parts(&self) -> Result<&(String, String), StoreError> {
        if let Some(p) = self.own.get() {
            return Ok(p);
        }
        let td = self
            .setting("trust_domain")?
            .ok_or(StoreError::NotInitialised)?;
        // Made and read back under one hold of the connection: concurrent first callers all
        // get the one epoch stored (each used to store its own, the last one winning).
        let epoch = self.with(|c| {
            let mut b = [0u8; 8];
            crate::identity::keys::fill_random(&mut b);
            c.execute(
                "INSERT INTO settings (key, value) VALUES ('audit_epoch', ?1)
                 ON CONFLICT (key) DO NOTHING",
                [hex::encode(b)],
            )
            .map_err(db)?;
            c.query_row(
                "SELECT value FROM settings WHERE key = 'audit_epoch'",
                [],
                |r| r.get::<_, String>(0),
            )
            .map_err(db)
        })?;
        Ok(self.own.get_or_init(|| (td, epoch)))
    }
}

pub(super) fn append_event(
    s: &SqliteStore,
    at: OffsetDateTime,
    kind: &str,
    detail: &str,
) -> Result<i64, StoreError> {
    let fields = event_fields(detail);
    s.append_own(at, kind, &|_, _| fields.clone())
}

pub(super) fn events_after(
    s: &SqliteStore,
    after_seq: i64,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    let Some(chain) = s.own_chain()? else {
        return Ok(Vec::new());
    };
    let rows = s.with(|c| {
        let mut st = c
            .prepare("SELECT line FROM audit WHERE chain = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")
            .map_err(db)?;
        let rows = st
            .query_map(params![chain, after_seq, limit], |r| {
                r.get::<_, String>(0).map(String::into_bytes)
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })?;
    rows.into_iter()
        .map(|line| {
            let r: Record = serde_json::from_slice(&line)
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

pub(super) fn last_own_kind(s: &SqliteStore) -> Result<Option<String>, StoreError> {
    let Some(chain) = s.own_chain()? else {
        return Ok(None);
    };
    s.with(|c| {
        c.prepare_cached("SELECT kind FROM audit WHERE chain = ?1 ORDER BY seq DESC LIMIT 1")
            .and_then(|mut st| st.query_row([&chain], |r| r.get(0)).optional())
            .map_err(db)
    })
}

pub(super) fn own_chain(s: &SqliteStore) -> Result<Option<String>, StoreError> {
    let (Some(td), Some(epoch)) = (s.setting("trust_domain")?, s.setting("audit_epoch")?) else {
        return Ok(None);
    };
    Ok(Some(format!(
        "spiffe://{td}{}#{epoch}",
        crate::identity::api::CA_ID_PATH
    )))
}

pub(super) fn append_own(
    s: &SqliteStore,
    at: OffsetDateTime,
    kind: &str,
    make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
) -> Result<i64, StoreError> {
    let own = s.own_parts()?;
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        let seq = append_own_in(&tx, own, at, kind, make)?;
        tx.commit().map_err(db)?;
        Ok(seq)
    })
}

pub(super) fn audit_append(
    s: &SqliteStore,
    chain: &str,
    rows: &[AuditRow],
) -> Result<Result<u64, AuditConflict>, StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        // Each statement is compiled once and kept by the connection: a batch used to compile
        // its INSERT once per row, the largest part of the control plane's cost per record.
        let head: Option<(i64, String)> = tx
            .prepare_cached(
                "SELECT seq, hash FROM audit WHERE chain = ?1 ORDER BY seq DESC LIMIT 1",
            )
            .and_then(|mut st| {
                st.query_row([chain], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(db)?;
        let (mut last, mut last_hash) = match head {
            Some((s, h)) => (s as u64, h),
            None => (0, crate::identity::audit::GENESIS.to_owned()),
        };
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO audit (chain, seq, prev, hash, source, ts_ms, kind, line)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(db)?;
        for r in rows {
            if r.seq <= last {
                // A redelivery: it must be the very record stored.
                let stored: Option<String> = tx
                    .prepare_cached("SELECT hash FROM audit WHERE chain = ?1 AND seq = ?2")
                    .and_then(|mut st| {
                        st.query_row(params![chain, r.seq as i64], |x| x.get(0))
                            .optional()
                    })
                    .map_err(db)?;
                if stored.as_deref() != Some(r.hash.as_str()) {
                    return Ok(Err(AuditConflict::Diverged {
                        chain: chain.to_owned(),
                        seq: r.seq,
                    }));
                }
                continue;
            }
            if r.seq != last + 1 || r.prev != last_hash {
                return Ok(Err(AuditConflict::Gap {
                    chain: chain.to_owned(),
                    expected: last + 1,
                }));
            }
            insert
                .execute(params![
                    chain,
                    r.seq as i64,
                    r.prev,
                    r.hash,
                    r.source,
                    r.ts_ms,
                    r.kind,
                    String::from_utf8_lossy(&r.line)
                ])
                .map_err(db)?;
            last = r.seq;
            last_hash.clone_from(&r.hash);
        }
        drop(insert);
        tx.commit().map_err(db)?;
        Ok(Ok(last))
    })
}

pub(super) fn audit_chains(s: &SqliteStore) -> Result<Vec<String>, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare("SELECT DISTINCT chain FROM audit ORDER BY chain")
            .map_err(db)?;
        let rows = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })
}

pub(super) fn audit_lines(s: &SqliteStore, chain: &str) -> Result<Vec<Vec<u8>>, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare("SELECT line FROM audit WHERE chain = ?1 ORDER BY seq")
            .map_err(db)?;
        let rows = st
            .query_map([chain], |r| r.get::<_, String>(0).map(String::into_bytes))
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })
}

pub(super) fn audit_rows(s: &SqliteStore, chain: &str) -> Result<Vec<AuditRow>, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare(
                "SELECT chain, seq, prev, hash, source, ts_ms, kind, line FROM audit
                 WHERE chain = ?1 ORDER BY id",
            )
            .map_err(db)?;
        let rows = st
            .query_map([chain], |r| {
                Ok(AuditRow {
                    chain: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    prev: r.get(2)?,
                    hash: r.get(3)?,
                    source: r.get(4)?,
                    ts_ms: r.get(5)?,
                    kind: r.get(6)?,
                    line: r.get::<_, String>(7)?.into_bytes(),
                })
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })
}

pub(super) fn audit_after(
    s: &SqliteStore,
    after_id: i64,
    limit: u32,
) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    s.with(|c| {
        let mut st = c
            .prepare("SELECT id, line FROM audit WHERE id > ?1 ORDER BY id LIMIT ?2")
            .map_err(db)?;
        let rows = st
            .query_map(params![after_id, limit], |r| {
                Ok((r.get(0)?, r.get::<_, String>(1)?.into_bytes()))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })
}

pub(super) fn audit_query(s: &SqliteStore, f: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError> {
    // Inbound records name the caller in peer_id, outbound ones in local_id.
    let sql = "SELECT line FROM audit WHERE
        (?1 IS NULL OR ts_ms >= ?1) AND (?2 IS NULL OR ts_ms < ?2)
        AND (?3 IS NULL OR CASE json_extract(line, '$.direction')
                WHEN 'inbound' THEN json_extract(line, '$.peer_id')
                ELSE json_extract(line, '$.local_id') END = ?3)
        AND (?4 IS NULL OR CASE json_extract(line, '$.direction')
                WHEN 'inbound' THEN json_extract(line, '$.local_id')
                ELSE json_extract(line, '$.peer_id') END = ?4)
        AND (?5 IS NULL OR json_extract(line, '$.decision') = ?5)
        AND (?6 IS NULL OR json_extract(line, '$.rule') = ?6)
        AND (?7 IS NULL OR json_extract(line, '$.grant') = ?7)
        AND (?8 IS NULL OR kind = ?8)
        ORDER BY ts_ms, id LIMIT ?9";
    s.with(|c| {
        let mut st = c.prepare(sql).map_err(db)?;
        let rows = st
            .query_map(
                params![
                    f.since_ms,
                    f.until_ms,
                    f.source,
                    f.destination,
                    f.decision,
                    f.rule,
                    f.grant,
                    f.kind,
                    f.limit
                ],
                |r| r.get::<_, String>(0).map(String::into_bytes),
            )
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })
}
