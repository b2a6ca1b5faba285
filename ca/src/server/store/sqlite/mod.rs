//! The embedded SQLite store, one file per concern: [`schema`] (migrations), [`authorities`]
//! (settings, CA authorities), [`tokens`] (join tokens), [`issued`] (issued certificates, group
//! commit), [`audit`] (the hash chains) and [`grants`]; this file holds the connection, the
//! write-health tracking and the [`Store`] implementation, which hands each call to its file.

mod audit;
mod authorities;
mod grants;
mod issued;
mod schema;
mod shared;
mod tokens;
mod users;

use std::path::Path;
use std::sync::Mutex;

use rusqlite::Connection;
use time::OffsetDateTime;

use super::{
    AuditConflict, AuditFilter, AuditRow, Changes, EndpointRow, EventRecord, GrantState,
    IssuedRecord, PublishedPolicy, Store, StoreError, TokenClaim, TokenRecord, TokenRefusal,
    UserSession,
};
use crate::identity::id::TrustDomain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};

use issued::PendingIssued;

/// The SQLite store: one connection behind a mutex (operations are short).
///
/// Every commit is durable (WAL, `synchronous = FULL`: one fsync per commit). The hot write, an
/// issued certificate with its `svid.issued` event, is group-committed: concurrent callers queue
/// their rows, whoever holds the connection next writes every queued row in one transaction, and
/// each caller returns once the commit holding its rows is on disk. One fsync then covers many
/// SVIDs under load, and a lone caller still pays exactly one.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    issued_queue: Mutex<Vec<PendingIssued>>,
    /// The control plane's own chain (trust domain, epoch), once known; never changes after.
    own: std::sync::OnceLock<(String, String)>,
    /// Why the last write failed for want of a writable disk, until a write succeeds again.
    unwritable: Mutex<Option<String>>,
}

/// The single text column of every row `sql` returns.
fn bodies(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<Vec<String>, StoreError> {
    let mut st = c.prepare_cached(sql).map_err(db)?;
    let rows = st
        .query_map(p, |r| r.get::<_, String>(0))
        .map_err(db)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db)?;
    Ok(rows)
}

/// A database error, as a store error: one that says the store cannot write (no space, an I/O
/// error, a read-only or vanished file) is [`StoreError::Unwritable`].
fn db(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{CannotOpen, DiskFull, ReadOnly, SystemIoFailure};
    match e.sqlite_error_code() {
        Some(DiskFull | SystemIoFailure | ReadOnly | CannotOpen) => {
            StoreError::Unwritable(e.to_string())
        }
        _ => StoreError::Db(e.to_string()),
    }
}

fn ts(t: OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

fn from_ts(v: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn opt_ts(v: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    v.map(from_ts).transpose()
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(db)?;
        Self::init(conn)
    }

    /// An in-memory store, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(db)?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        schema::migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            issued_queue: Mutex::new(Vec::new()),
            own: std::sync::OnceLock::new(),
            unwritable: Mutex::new(None),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| StoreError::Db("store lock poisoned by an earlier panic".into()))?;
        let changes = guard.total_changes();
        let result = f(&mut guard);
        // Whether the disk takes writes is learnt from the writes themselves: a failure for
        // want of space or I/O marks the store unwritable, a committed change clears it.
        match &result {
            Err(StoreError::Unwritable(why)) => self.set_unwritable(Some(why.clone())),
            Ok(_) if guard.is_autocommit() && guard.total_changes() > changes => {
                self.set_unwritable(None)
            }
            _ => {}
        }
        result
    }

    /// Notes whether the store can write, with one log line per change (not per failure).
    fn set_unwritable(&self, why: Option<String>) {
        let mut now = self
            .unwritable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (now.is_some(), &why) {
            (false, Some(reason)) => tracing::warn!(
                %reason,
                "the store cannot write: SVIDs are refused and audit records are not acknowledged until it can; /healthz answers 503"
            ),
            (true, None) => tracing::info!("the store can write again"),
            _ => {}
        }
        *now = why;
    }
}

impl Store for SqliteStore {
    fn load_authorities(&self, config: AuthorityConfig) -> Result<Option<Authorities>, StoreError> {
        authorities::load_authorities(self, config)
    }

    fn save_authorities(&self, a: &Authorities) -> Result<(), StoreError> {
        authorities::save_authorities(self, a)
    }

    fn trust_domain(&self) -> Result<Option<TrustDomain>, StoreError> {
        authorities::trust_domain(self)
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        authorities::setting(self, key)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        authorities::set_setting(self, key, value)
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        tokens::insert_token(self, t)
    }

    fn find_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        tokens::find_token(self, id)
    }

    fn revoke_token(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        tokens::revoke_token(self, id, now)
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        tokens::list_tokens(self)
    }

    fn log_issued(&self, r: &IssuedRecord) -> Result<(), StoreError> {
        issued::log_issued(self, r)
    }

    fn log_issued_with_event(
        &self,
        rec: &IssuedRecord,
        kind: &str,
        detail: &str,
        token: Option<&TokenClaim>,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        issued::log_issued_with_event(self, rec, kind, detail, token)
    }

    fn list_issued(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
        issued::list_issued(self, limit)
    }

    fn append_event(
        &self,
        at: OffsetDateTime,
        kind: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        audit::append_event(self, at, kind, detail)
    }

    fn events_after(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        audit::events_after(self, after_seq, limit)
    }

    fn last_own_kind(&self) -> Result<Option<String>, StoreError> {
        audit::last_own_kind(self)
    }

    fn own_chain(&self) -> Result<Option<String>, StoreError> {
        audit::own_chain(self)
    }

    fn append_own(
        &self,
        at: OffsetDateTime,
        kind: &str,
        make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
    ) -> Result<i64, StoreError> {
        audit::append_own(self, at, kind, make)
    }

    fn audit_append(
        &self,
        chain: &str,
        rows: &[AuditRow],
    ) -> Result<Result<u64, AuditConflict>, StoreError> {
        audit::audit_append(self, chain, rows)
    }

    fn insert_grant(
        &self,
        id: &str,
        state: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<(), StoreError> {
        grants::insert_grant(self, id, state, expires, body)
    }

    fn update_grant(
        &self,
        id: &str,
        from: GrantState,
        seen: &str,
        to: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<bool, StoreError> {
        grants::update_grant(self, id, from, seen, to, expires, body)
    }

    fn grant(&self, id: &str) -> Result<Option<String>, StoreError> {
        grants::grant(self, id)
    }

    fn list_grants(&self) -> Result<Vec<String>, StoreError> {
        grants::list_grants(self)
    }

    fn live_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        grants::live_grants(self, now)
    }

    fn expire_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        grants::expire_grants(self, now)
    }

    fn next_grant_expiry(&self, now: i64) -> Result<Option<i64>, StoreError> {
        grants::next_grant_expiry(self, now)
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        audit::audit_chains(self)
    }

    fn audit_lines(&self, chain: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        audit::audit_lines(self, chain)
    }

    fn audit_rows(&self, chain: &str) -> Result<Vec<AuditRow>, StoreError> {
        audit::audit_rows(self, chain)
    }

    fn audit_after(&self, after_id: i64, limit: u32) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        audit::audit_after(self, after_id, limit)
    }

    fn audit_query(&self, f: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError> {
        audit::audit_query(self, f)
    }

    fn changes(&self) -> Result<Changes, StoreError> {
        shared::changes(self)
    }

    fn replace_authorities(&self, a: &Authorities, seen: i64) -> Result<Option<i64>, StoreError> {
        authorities::replace_authorities(self, a, seen)
    }

    fn register_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        shared::register_endpoints(self, id, addresses, until_ms, now_ms)
    }

    fn remove_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        shared::remove_endpoints(self, id, addresses, now_ms)
    }

    fn sweep_endpoints(&self, now_ms: i64) -> Result<Vec<(String, String)>, StoreError> {
        shared::sweep_endpoints(self, now_ms)
    }

    fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        shared::endpoints(self)
    }

    fn publish_policy(
        &self,
        version: &str,
        source: &str,
        at: OffsetDateTime,
        by: &str,
    ) -> Result<bool, StoreError> {
        shared::publish_policy(self, version, source, ts(at), by)
    }

    fn policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        shared::policy(self)
    }

    fn put_user_session(&self, session: &UserSession) -> Result<(), StoreError> {
        users::put_user_session(self, session)
    }

    fn user_session(&self, spiffe_id: &str) -> Result<Option<UserSession>, StoreError> {
        users::user_session(self, spiffe_id)
    }

    fn unwritable(&self) -> Option<String> {
        self.unwritable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn probe_write(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES ('write_probe', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [ts(OffsetDateTime::now_utc()).to_string()],
            )
            .map(|_| ())
            .map_err(db)
        })
    }
}

#[cfg(test)]
mod tests;
