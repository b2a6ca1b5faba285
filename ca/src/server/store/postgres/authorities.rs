//! Settings and the CA authorities. The private keys are sealed under the KEK (AES-256-GCM,
//! the trust domain and authority ID as associated data): the database alone never yields one.

use rustls_pki_types::CertificateDer;

use crate::identity::id::{TrustDomain, parse_trust_domain};
use crate::identity::keys::SecretKey;
use crate::identity::signing::authority::{Authorities, Authority, AuthorityConfig, Role, State};
use crate::server::store::{Store, StoreError};

use super::{PostgresStore, from_ts, ts};

/// What a sealed key is bound to: its trust domain and authority.
fn aad(td: &str, id: &str) -> Vec<u8> {
    format!("mayfly-ca authority key\0{td}\0{id}").into_bytes()
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::Root => "root",
        Role::Intermediate => "intermediate",
        Role::Jwt => "jwt",
    }
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Prepared => "prepared",
        State::Active => "active",
        State::Old => "old",
    }
}

type AuthorityRow = (
    String,
    String,
    String,
    Vec<u8>,
    Vec<u8>,
    Option<String>,
    i64,
    i64,
);

pub(super) fn load_authorities(
    s: &PostgresStore,
    config: AuthorityConfig,
) -> Result<Option<Authorities>, StoreError> {
    let Some(td) = s.trust_domain()? else {
        return Ok(None);
    };
    let seq: u64 = s
        .setting("bundle_sequence")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rows: Vec<AuthorityRow> = s.run(false, |db| async move {
        let c = db.client().await?;
        let rows = c
            .query(
                "SELECT id, role, state, cert, key_sealed, parent, not_before, not_after
                 FROM authorities ORDER BY role DESC, not_before",
                &[],
            )
            .await
            .map_err(|e| db.err(e))?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                    r.get(7),
                )
            })
            .collect())
    })?;
    let mut list = Vec::with_capacity(rows.len());
    for (id, role, state, cert, sealed, parent, nb, na) in rows {
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
        let pkcs8 = s
            .kek
            .open(&aad(td.as_str(), &id), &sealed)
            .map_err(|_| StoreError::WrongKek)?;
        let key = SecretKey::from_pkcs8(pkcs8.to_vec())
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

pub(super) fn save_authorities(s: &PostgresStore, a: &Authorities) -> Result<(), StoreError> {
    save(s, a, None).map(|_| ())
}

pub(super) fn replace_authorities(
    s: &PostgresStore,
    a: &Authorities,
    seen: i64,
) -> Result<Option<i64>, StoreError> {
    save(s, a, Some(seen))
}

/// Replaces the authority set and bumps its change counter, in one transaction; with `seen`,
/// only if the counter still says `seen` (its row is locked first, so a concurrent save on
/// another replica waits, then sees the new counter and is refused). Returns the new counter.
fn save(s: &PostgresStore, a: &Authorities, seen: Option<i64>) -> Result<Option<i64>, StoreError> {
    let td = a.trust_domain().as_str().to_owned();
    let mut rows: Vec<AuthorityRow> = Vec::new();
    for x in a.all() {
        let sealed = s
            .kek
            .seal(&aad(&td, &x.id), x.key.pkcs8())
            .map_err(|e| StoreError::Db(format!("authority {}: {e}", x.id)))?;
        rows.push((
            x.id.clone(),
            role_str(x.role).to_owned(),
            state_str(x.state).to_owned(),
            x.cert.as_ref().to_vec(),
            sealed,
            x.parent.clone(),
            ts(x.not_before),
            ts(x.not_after),
        ));
    }
    let seq = a.bundle_sequence().to_string();
    s.run(true, move |db| async move {
        let mut c = db.client().await?;
        let tx = c.transaction().await.map_err(|e| db.err(e))?;
        let n: i64 = tx
            .query_one(
                "SELECT n FROM mayfly_changes WHERE topic = 'authorities' FOR UPDATE",
                &[],
            )
            .await
            .map_err(|e| db.err(e))?
            .get(0);
        if seen.is_some_and(|seen| seen != n) {
            return Ok(None);
        }
        tx.execute("DELETE FROM authorities", &[])
            .await
            .map_err(|e| db.err(e))?;
        for (id, role, state, cert, sealed, parent, nb, na) in &rows {
            tx.execute(
                "INSERT INTO authorities
                   (id, role, state, cert, key_sealed, parent, not_before, not_after)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[id, role, state, cert, sealed, parent, nb, na],
            )
            .await
            .map_err(|e| db.err(e))?;
        }
        for (k, v) in [("trust_domain", &td), ("bundle_sequence", &seq)] {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&k, v],
            )
            .await
            .map_err(|e| db.err(e))?;
        }
        tx.execute(
            "UPDATE mayfly_changes SET n = n + 1 WHERE topic = 'authorities'",
            &[],
        )
        .await
        .map_err(|e| db.err(e))?;
        tx.commit().await.map_err(|e| db.err(e))?;
        Ok(Some(n + 1))
    })
}

pub(super) fn trust_domain(s: &PostgresStore) -> Result<Option<TrustDomain>, StoreError> {
    match s.setting("trust_domain")? {
        None => Ok(None),
        Some(s) => parse_trust_domain(&s)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(e.to_string())),
    }
}

pub(super) fn setting(s: &PostgresStore, key: &str) -> Result<Option<String>, StoreError> {
    let key = key.to_owned();
    s.run(false, move |db| async move {
        let c = db.client().await?;
        let row = c
            .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])
            .await
            .map_err(|e| db.err(e))?;
        Ok(row.map(|r| r.get(0)))
    })
}

pub(super) fn set_setting(s: &PostgresStore, key: &str, value: &str) -> Result<(), StoreError> {
    let (key, value) = (key.to_owned(), value.to_owned());
    s.run(true, move |db| async move {
        let c = db.client().await?;
        c.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&key, &value],
        )
        .await
        .map(|_| ())
        .map_err(|e| db.err(e))
    })
}
