//! A store that fails chosen operations on demand, for tests of what the control plane does
//! when its store fails: it wraps the real SQLite store and forwards everything else.

use std::sync::atomic::{AtomicBool, Ordering};

use time::OffsetDateTime;

use super::{
    AuditConflict, AuditFilter, AuditRow, Changes, EndpointRow, EventRecord, GrantState,
    IssuedRecord, PublishedPolicy, SqliteStore, Store, StoreError, TokenClaim, TokenRecord,
    TokenRefusal, UserSession,
};
use crate::identity::id::TrustDomain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};

/// The real store, with switches that make some operations fail.
pub(crate) struct FaultyStore {
    inner: SqliteStore,
    /// Logging an issued certificate fails.
    pub(crate) fail_issued_log: AtomicBool,
    /// Reading grants fails.
    pub(crate) fail_grant_reads: AtomicBool,
    /// Appending to the control plane's own chain fails.
    pub(crate) fail_events: AtomicBool,
    /// Saving the authorities fails.
    pub(crate) fail_authorities_save: AtomicBool,
}

fn injected(what: &str) -> StoreError {
    StoreError::Db(format!("injected failure: {what}"))
}

impl FaultyStore {
    /// An in-memory store that fails nothing until told to.
    pub(crate) fn in_memory() -> Self {
        Self {
            inner: SqliteStore::in_memory().expect("an in-memory SQLite store"),
            fail_issued_log: AtomicBool::new(false),
            fail_grant_reads: AtomicBool::new(false),
            fail_events: AtomicBool::new(false),
            fail_authorities_save: AtomicBool::new(false),
        }
    }

    fn check(&self, switch: &AtomicBool, what: &str) -> Result<(), StoreError> {
        if switch.load(Ordering::SeqCst) {
            Err(injected(what))
        } else {
            Ok(())
        }
    }
}

impl Store for FaultyStore {
    fn load_authorities(&self, config: AuthorityConfig) -> Result<Option<Authorities>, StoreError> {
        self.inner.load_authorities(config)
    }
    fn save_authorities(&self, authorities: &Authorities) -> Result<(), StoreError> {
        self.check(&self.fail_authorities_save, "save authorities")?;
        self.inner.save_authorities(authorities)
    }
    fn trust_domain(&self) -> Result<Option<TrustDomain>, StoreError> {
        self.inner.trust_domain()
    }
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.inner.setting(key)
    }
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.inner.set_setting(key, value)
    }
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert_token(token)
    }
    fn find_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.find_token(id)
    }
    fn revoke_token(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        self.inner.revoke_token(id, now)
    }
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.list_tokens()
    }
    fn log_issued(&self, rec: &IssuedRecord) -> Result<(), StoreError> {
        self.inner.log_issued(rec)
    }
    fn log_issued_with_event(
        &self,
        rec: &IssuedRecord,
        kind: &str,
        detail: &str,
        token: Option<&TokenClaim>,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        self.check(&self.fail_issued_log, "log issued")?;
        self.inner.log_issued_with_event(rec, kind, detail, token)
    }
    fn list_issued(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
        self.inner.list_issued(limit)
    }
    fn append_event(
        &self,
        at: OffsetDateTime,
        kind: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        self.check(&self.fail_events, "append event")?;
        self.inner.append_event(at, kind, detail)
    }
    fn last_own_kind(&self) -> Result<Option<String>, StoreError> {
        self.inner.last_own_kind()
    }
    fn events_after(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.events_after(after_seq, limit)
    }
    fn append_own(
        &self,
        at: OffsetDateTime,
        kind: &str,
        make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
    ) -> Result<i64, StoreError> {
        self.check(&self.fail_events, "append to the own chain")?;
        self.inner.append_own(at, kind, make)
    }
    fn own_chain(&self) -> Result<Option<String>, StoreError> {
        self.inner.own_chain()
    }
    fn audit_append(
        &self,
        chain: &str,
        rows: &[AuditRow],
    ) -> Result<Result<u64, AuditConflict>, StoreError> {
        self.inner.audit_append(chain, rows)
    }
    fn insert_grant(
        &self,
        id: &str,
        state: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<(), StoreError> {
        self.inner.insert_grant(id, state, expires, body)
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
        self.inner.update_grant(id, from, seen, to, expires, body)
    }
    fn grant(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.inner.grant(id)
    }
    fn list_grants(&self) -> Result<Vec<String>, StoreError> {
        self.check(&self.fail_grant_reads, "list grants")?;
        self.inner.list_grants()
    }
    fn live_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.check(&self.fail_grant_reads, "live grants")?;
        self.inner.live_grants(now)
    }
    fn expire_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.inner.expire_grants(now)
    }
    fn next_grant_expiry(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.inner.next_grant_expiry(now)
    }
    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.inner.audit_chains()
    }
    fn audit_lines(&self, chain: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.audit_lines(chain)
    }
    fn audit_rows(&self, chain: &str) -> Result<Vec<AuditRow>, StoreError> {
        self.inner.audit_rows(chain)
    }
    fn audit_after(&self, after_id: i64, limit: u32) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.inner.audit_after(after_id, limit)
    }
    fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError> {
        self.inner.audit_query(filter)
    }
    fn changes(&self) -> Result<Changes, StoreError> {
        self.inner.changes()
    }
    fn replace_authorities(&self, a: &Authorities, seen: i64) -> Result<Option<i64>, StoreError> {
        self.check(&self.fail_authorities_save, "save authorities")?;
        self.inner.replace_authorities(a, seen)
    }
    fn register_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner
            .register_endpoints(id, addresses, until_ms, now_ms)
    }
    fn remove_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        self.inner.remove_endpoints(id, addresses, now_ms)
    }
    fn sweep_endpoints(&self, now_ms: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.sweep_endpoints(now_ms)
    }
    fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        self.inner.endpoints()
    }
    fn publish_policy(
        &self,
        version: &str,
        source: &str,
        at: OffsetDateTime,
        by: &str,
    ) -> Result<bool, StoreError> {
        self.inner.publish_policy(version, source, at, by)
    }
    fn policy(&self) -> Result<Option<PublishedPolicy>, StoreError> {
        self.inner.policy()
    }
    fn put_user_session(&self, session: &UserSession) -> Result<(), StoreError> {
        self.inner.put_user_session(session)
    }
    fn user_session(&self, spiffe_id: &str) -> Result<Option<UserSession>, StoreError> {
        self.inner.user_session(spiffe_id)
    }
    fn unwritable(&self) -> Option<String> {
        self.inner.unwritable()
    }
    fn probe_write(&self) -> Result<(), StoreError> {
        self.inner.probe_write()
    }
}
