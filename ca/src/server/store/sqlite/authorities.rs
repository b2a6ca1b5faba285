//! Settings and the CA authorities (with the bundle sequence).

use rusqlite::{OptionalExtension, params};
use rustls_pki_types::CertificateDer;

use crate::identity::id::{TrustDomain, parse_trust_domain};
use crate::identity::keys::SecretKey;
use crate::identity::signing::authority::{Authorities, Authority, AuthorityConfig, Role, State};
use crate::server::store::{Store, StoreError};

use super::{SqliteStore, db, from_ts, ts};

pub(super) fn role_str(r: Role) -> &'static str {
    match r {
        Role::Root => "root",
        Role::Intermediate => "intermediate",
        Role::Jwt => "jwt",
    }
}

pub(super) fn state_str(s: State) -> &'static str {
    match s {
        State::Prepared => "prepared",
        State::Active => "active",
        State::Old => "old",
    }
}

pub(super) fn load_authorities(
    s: &SqliteStore,
    config: AuthorityConfig,
) -> Result<Option<Authorities>, StoreError> {
    let Some(td) = s.trust_domain()? else {
        return Ok(None);
    };
    let seq: u64 = s
        .setting("bundle_sequence")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rows = s.with(|c| {
        let mut st = c
            .prepare(
                "SELECT id, role, state, cert, key, parent, not_before, not_after
                 FROM authorities ORDER BY role DESC, not_before",
            )
            .map_err(db)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        Ok(rows)
    })?;
    let mut list = Vec::with_capacity(rows.len());
    for (id, role, state, cert, key, parent, nb, na) in rows {
        let role = match role.as_str() {
            "root" => Role::Root,
            "intermediate" => Role::Intermediate,
            "jwt" => Role::Jwt,
            other => return Err(StoreError::Corrupt(format!("authority role {other:?}"))),
        };
        let state = match state.as_str() {
            "prepared" => State::Prepared,
            "active" => State::Active,
            "old" => State::Old,
            other => return Err(StoreError::Corrupt(format!("authority state {other:?}"))),
        };
        let key = SecretKey::from_pkcs8(key)
            .map_err(|e| StoreError::Corrupt(format!("authority {id}: {e}")))?;
        list.push(Authority {
            id,
            role,
            state,
            cert: CertificateDer::from(cert),
            key,
            parent,
            not_before: from_ts(nb)?,
            not_after: from_ts(na)?,
        });
    }
    Authorities::from_parts(td, config, list, seq)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn save_authorities(s: &SqliteStore, a: &Authorities) -> Result<(), StoreError> {
    s.with(|c| {
        let tx = c.transaction().map_err(db)?;
        save_in(&tx, a)?;
        tx.commit().map_err(db)
    })
}

/// Saves `a` only if the authorities' change counter is still `seen`; returns the new counter.
pub(super) fn replace_authorities(
    s: &SqliteStore,
    a: &Authorities,
    seen: i64,
) -> Result<Option<i64>, StoreError> {
    s.with(|c| {
        // IMMEDIATE: the write lock is taken before the counter is read, so no other process
        // on the file can save in between.
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let now: i64 = tx
            .query_row(
                "SELECT n FROM changes WHERE topic = 'authorities'",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if now != seen {
            return Ok(None);
        }
        let n = save_in(&tx, a)?;
        tx.commit().map_err(db)?;
        Ok(Some(n))
    })
}

/// Replaces the authority set inside `tx` and bumps its change counter; returns the counter.
fn save_in(tx: &rusqlite::Transaction<'_>, a: &Authorities) -> Result<i64, StoreError> {
    tx.execute("DELETE FROM authorities", []).map_err(db)?;
    for x in a.all() {
        tx.execute(
            "INSERT INTO authorities (id, role, state, cert, key, parent, not_before, not_after)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                x.id,
                role_str(x.role),
                state_str(x.state),
                x.cert.as_ref(),
                x.key.pkcs8(),
                x.parent,
                ts(x.not_before),
                ts(x.not_after)
            ],
        )
        .map_err(db)?;
    }
    tx.execute(
        "INSERT INTO settings (key, value) VALUES ('trust_domain', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![a.trust_domain().as_str()],
    )
    .map_err(db)?;
    tx.execute(
        "INSERT INTO settings (key, value) VALUES ('bundle_sequence', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![a.bundle_sequence().to_string()],
    )
    .map_err(db)?;
    tx.query_row(
        "UPDATE changes SET n = n + 1 WHERE topic = 'authorities' RETURNING n",
        [],
        |r| r.get(0),
    )
    .map_err(db)
}

pub(super) fn trust_domain(s: &SqliteStore) -> Result<Option<TrustDomain>, StoreError> {
    match s.setting("trust_domain")? {
        None => Ok(None),
        Some(s) => parse_trust_domain(&s)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

pub(super) fn setting(s: &SqliteStore, key: &str) -> Result<Option<String>, StoreError> {
    s.with(|c| {
        c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()
        .map_err(db)
    })
}

pub(super) fn set_setting(s: &SqliteStore, key: &str, value: &str) -> Result<(), StoreError> {
    s.with(|c| {
        c.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )
        .map(|_| ())
        .map_err(db)
    })
}
