//! The control plane's persistent state behind one trait. Under `server/` since only the
//! control plane has a store (`mayfly_ca::store` re-exports it).
//!
//! [`SqliteStore`] is the embedded default (one file in the data directory). The trait speaks
//! in domain types and whole operations (a token is spent in the transaction that logs the
//! SVID it pays for, grant decisions are compare-and-set, authorities are replaced in one
//! transaction), so a PostgreSQL implementation shared by several replicas can
//! implement it without changing callers.

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
#[cfg(test)]
pub(crate) mod faulty;
pub mod kek;
mod postgres;
mod sqlite;
mod users;

pub use kek::Kek;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;
pub use users::UserSession;

use std::path::PathBuf;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::identity::id::TrustDomain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database refused the operation or is corrupt.
    #[error("store: {0}")]
    Db(String),
    /// The store holds data this version cannot read.
    #[error("store holds invalid data: {0}")]
    Corrupt(String),
    /// The store was written by a newer mayfly.
    #[error("store schema version {found} is newer than this binary's {supported}: upgrade mayfly")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        supported: i64,
    },
    /// The store has not been initialised.
    #[error("store is not initialised: run `mayfly-ca init` first")]
    NotInitialised,
    /// The store cannot write (disk full, I/O error, read-only file system): nothing was
    /// written, and writing resumes by itself once the condition ends.
    #[error("store cannot write: {0}")]
    Unwritable(String),
    /// The store URL is not one this binary can open.
    #[error("{0}")]
    BadUrl(String),
    /// The database server cannot be reached (it is named by host, port and database; never
    /// with the password).
    #[error("cannot reach PostgreSQL at {target}: {reason}")]
    Unreachable {
        /// `host:port/dbname`.
        target: String,
        /// Why.
        reason: String,
    },
    /// The key-encryption key does not open the CA keys in the store.
    #[error("the key-encryption key does not open the CA keys in the store: wrong --kek-file?")]
    WrongKek,
}

/// Where the store is: `sqlite:PATH` (or a bare path), or `postgres://...`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (it may hold a password: never printed).
    Postgres(String),
}

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUrl::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            StoreUrl::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(StoreError::BadUrl(
                    "store URL sqlite: needs a path (sqlite:/var/lib/mayfly/ca.db)".into(),
                ));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        let scheme = s.split_once(':').map_or(s, |(scheme, _)| scheme);
        Err(StoreError::BadUrl(format!(
            "unknown store scheme {scheme:?}: expected sqlite:PATH or postgres://USER@HOST:PORT/DB"
        )))
    }
}

/// Opens the store at `url`: an SQLite file, or a PostgreSQL database whose CA keys are
/// sealed under `kek` (required for PostgreSQL).
pub fn open(url: &StoreUrl, kek: Option<Kek>) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        StoreUrl::Sqlite(path) => Ok(Arc::new(SqliteStore::open(path)?)),
        StoreUrl::Postgres(u) => {
            let kek = kek.ok_or_else(|| {
                StoreError::BadUrl(
                    "a PostgreSQL store needs a key-encryption key (--kek-file)".into(),
                )
            })?;
            Ok(Arc::new(PostgresStore::open(u, kek)?))
        }
    }
}

/// The fields of a control-plane event from its JSON text (anything else is kept as `detail`).
pub(crate) fn event_fields(detail: &str) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::from_str::<serde_json::Value>(detail) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(other) => {
            let mut m = serde_json::Map::new();
            m.insert("detail".into(), other);
            m
        }
        Err(_) => {
            let mut m = serde_json::Map::new();
            m.insert(
                "detail".into(),
                serde_json::Value::String(detail.to_owned()),
            );
            m
        }
    }
}

/// A join token as stored: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public identifier (shown by `token list`, used by `token revoke`).
    pub id: String,
    /// Hex SHA-256 of the secret part.
    pub hash: String,
    /// The one SPIFFE ID this token may obtain.
    pub spiffe_id: String,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// Who created it (admin user).
    pub created_by: String,
    /// When it was used, if it was.
    pub used_at: Option<OffsetDateTime>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

impl TokenRecord {
    /// Whether the secret whose hash is `hash` redeems this token at `now`. The hashes are
    /// compared in constant time; a mismatch is `Unknown`, as for a token that does not exist.
    pub fn check(&self, hash: &str, now: OffsetDateTime) -> Result<(), TokenRefusal> {
        if aws_lc_rs::constant_time::verify_slices_are_equal(self.hash.as_bytes(), hash.as_bytes())
            .is_err()
        {
            return Err(TokenRefusal::Unknown);
        }
        if self.revoked_at.is_some() {
            return Err(TokenRefusal::Revoked(self.id.clone()));
        }
        if self.used_at.is_some() {
            return Err(TokenRefusal::Used(self.id.clone()));
        }
        if self.expires_at <= now {
            return Err(TokenRefusal::Expired(self.id.clone()));
        }
        Ok(())
    }
}

/// A join token presented for a bootstrap: spent together with the issuance it pays for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaim {
    /// The token's public ID (the row looked up).
    pub id: String,
    /// Hex SHA-256 of the presented secret (compared with the stored one).
    pub hash: String,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenRefusal {
    /// No token has this ID and secret (forged, or mistyped).
    #[error("join token is unknown (forged or mistyped)")]
    Unknown,
    /// Already used once.
    #[error("join token {0} was already used")]
    Used(String),
    /// Past its expiry.
    #[error("join token {0} has expired")]
    Expired(String),
    /// Revoked by an admin.
    #[error("join token {0} was revoked")]
    Revoked(String),
}

impl TokenRefusal {
    /// Short reason for metrics and audit.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "token_unknown",
            TokenRefusal::Used(_) => "token_used",
            TokenRefusal::Expired(_) => "token_expired",
            TokenRefusal::Revoked(_) => "token_revoked",
        }
    }
}

/// One issued certificate, for the issuance log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRecord {
    /// Serial (hex).
    pub serial: String,
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// NotAfter.
    pub not_after: OffsetDateTime,
    /// When it was issued.
    pub issued_at: OffsetDateTime,
    /// Who asked: `token:<id>`, `svid:<serial>`, `admin:<user>` or `self`.
    pub requester: String,
}

/// A control-plane event for the audit trail (token refused, SVID issued, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Sequence number, assigned by the store.
    pub seq: i64,
    /// When.
    pub at: OffsetDateTime,
    /// Kind, such as `svid.issued` or `token.refused`.
    pub kind: String,
    /// JSON details.
    pub detail: String,
}

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Chain key `source#epoch`.
    pub chain: String,
    /// Seq in the chain.
    pub seq: u64,
    /// Hex SHA-256 of the previous record's line.
    pub prev: String,
    /// Hex SHA-256 of this line.
    pub hash: String,
    /// Writer's SPIFFE ID.
    pub source: String,
    /// Unix ms.
    pub ts_ms: i64,
    /// Record kind.
    pub kind: String,
    /// The record exactly as written.
    pub line: Vec<u8>,
}

/// Why an audit batch was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditConflict {
    /// The batch does not continue the stored chain.
    #[error(
        "chain {chain} continues at seq {expected}; the batch starts elsewhere or breaks the hash chain"
    )]
    Gap {
        /// Chain.
        chain: String,
        /// The seq the store expects next.
        expected: u64,
    },
    /// A record with a stored seq differs from the stored one.
    #[error("chain {chain} already holds a different record seq {seq}")]
    Diverged {
        /// Chain.
        chain: String,
        /// Seq.
        seq: u64,
    },
}

/// Where a just-in-time grant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantState {
    /// Requested, waiting for another admin's approval.
    Pending,
    /// Approved (or needing no approval): in force until its expiry.
    Active,
    /// Refused by an admin.
    Denied,
    /// Ended by an admin.
    Revoked,
    /// Past its expiry.
    Expired,
}

impl GrantState {
    /// The name stored and shown (`pending`, `active`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Pending => "pending",
            GrantState::Active => "active",
            GrantState::Denied => "denied",
            GrantState::Revoked => "revoked",
            GrantState::Expired => "expired",
        }
    }
}

impl std::fmt::Display for GrantState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no grant state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown grant state {0:?} (expected pending, active, denied, revoked or expired)")]
pub struct UnknownGrantState(pub String);

impl std::str::FromStr for GrantState {
    type Err = UnknownGrantState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            GrantState::Pending,
            GrantState::Active,
            GrantState::Denied,
            GrantState::Revoked,
            GrantState::Expired,
        ]
        .into_iter()
        .find(|g| g.as_str() == s)
        .ok_or_else(|| UnknownGrantState(s.to_owned()))
    }
}

/// How often each kind of shared state has changed: counters in the store that every write of
/// that state bumps in its own transaction. A replica that polls them (one small read) learns
/// of another replica's changes; see [`Store::changes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Grants inserted, decided or expired.
    pub grants: i64,
    /// Endpoints registered, removed or swept (a lease refresh is not a change).
    pub endpoints: i64,
    /// Policies published.
    pub policy: i64,
    /// Authority sets saved (rotation).
    pub authorities: i64,
}

/// One stored endpoint registration (see `server::registry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRow {
    /// The SPIFFE ID it serves.
    pub spiffe_id: String,
    /// The address peers dial.
    pub address: String,
    /// First registered (Unix ms).
    pub since_ms: i64,
    /// Its lease ends (Unix ms).
    pub until_ms: i64,
}

/// A policy as published to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedPolicy {
    /// Content hash.
    pub version: String,
    /// TOML source.
    pub source: String,
    /// When it was published (Unix seconds).
    pub published_at: i64,
    /// Who published it (the replica's description).
    pub published_by: String,
}

/// Filters of `audit query`.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// From (unix ms, inclusive).
    pub since_ms: Option<i64>,
    /// Until (unix ms, exclusive).
    pub until_ms: Option<i64>,
    /// Calling side's SPIFFE ID.
    pub source: Option<String>,
    /// Called side's SPIFFE ID.
    pub destination: Option<String>,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// Deciding rule.
    pub rule: Option<String>,
    /// Deciding grant.
    pub grant: Option<String>,
    /// Record kind.
    pub kind: Option<String>,
    /// Most rows.
    pub limit: u32,
}

/// The control plane's persistent state.
pub trait Store: Send + Sync {
    /// The trust domain and authority set, if initialised.
    fn load_authorities(&self, config: AuthorityConfig) -> Result<Option<Authorities>, StoreError>;
    /// Replaces the stored authority set (one transaction).
    fn save_authorities(&self, authorities: &Authorities) -> Result<(), StoreError>;
    /// The trust domain, if initialised.
    fn trust_domain(&self) -> Result<Option<TrustDomain>, StoreError>;
    /// A free-form setting.
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Stores a free-form setting.
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// Stores a new token, as given (its use and revocation times too: how a store is copied).
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// A token by its public ID, without spending it (tokens are spent by
    /// [`Store::log_issued_with_event`]).
    fn find_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Revokes a token by id. Returns false if no unused token has that id.
    fn revoke_token(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError>;
    /// Every token, newest first.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Logs an issued certificate.
    fn log_issued(&self, rec: &IssuedRecord) -> Result<(), StoreError>;
    /// Logs an issued certificate and appends its control-plane event (`kind`, JSON `detail`)
    /// and, for a bootstrap, spends the join `token` (checked with [`TokenRecord::check`] at
    /// `rec.issued_at`), in one transaction: all of it is durable when this returns `Ok(Ok(()))`,
    /// and nothing is written when it returns a refusal or an error, so a token is spent exactly
    /// when its SVID is logged. Of concurrent callers spending one token, exactly one succeeds.
    /// Implementations may commit concurrent calls together (group commit).
    fn log_issued_with_event(
        &self,
        rec: &IssuedRecord,
        kind: &str,
        detail: &str,
        token: Option<&TokenClaim>,
    ) -> Result<Result<(), TokenRefusal>, StoreError>;
    /// The most recent issued certificates.
    fn list_issued(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError>;

    /// Appends a control-plane event; returns its sequence number.
    fn append_event(&self, at: OffsetDateTime, kind: &str, detail: &str)
    -> Result<i64, StoreError>;
    /// The kind of the last record on the control plane's own chain, if any (whether a
    /// checkpoint is due, without reading the chain).
    fn last_own_kind(&self) -> Result<Option<String>, StoreError>;
    /// The control plane's own events after `after_seq`, oldest first.
    fn events_after(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError>;
    /// Appends a record to the control plane's own chain, built by `make(seq, prev)`
    /// (signed checkpoints need both before they exist).
    fn append_own(
        &self,
        at: OffsetDateTime,
        kind: &str,
        make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
    ) -> Result<i64, StoreError>;
    /// The control plane's own chain key, once it has one.
    fn own_chain(&self) -> Result<Option<String>, StoreError>;

    /// Stores records that continue `chain` (all rows belong to it, in seq order). Records
    /// already stored are skipped when identical (a redelivery), so delivery is exactly once.
    /// Returns the chain's last stored seq.
    fn audit_append(
        &self,
        chain: &str,
        rows: &[AuditRow],
    ) -> Result<Result<u64, AuditConflict>, StoreError>;
    /// Stores a new grant: its id, state, expiry (unix seconds, 0 while it has none) and JSON
    /// body.
    fn insert_grant(
        &self,
        id: &str,
        state: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<(), StoreError>;
    /// Moves a grant from state `from` to `to`, with its new expiry and body, only if it is
    /// still in `from` with the body `seen` that the decision was made on (compare-and-set on
    /// both: a second approval that leaves the state pending changes only the body). False
    /// when it is not: another decision came first.
    fn update_grant(
        &self,
        id: &str,
        from: GrantState,
        seen: &str,
        to: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<bool, StoreError>;
    /// One grant's JSON body.
    fn grant(&self, id: &str) -> Result<Option<String>, StoreError>;
    /// Every grant's JSON body, newest first.
    fn list_grants(&self) -> Result<Vec<String>, StoreError>;
    /// The JSON bodies of the grants in force at `now` (unix seconds): active (approved, not
    /// revoked) and not yet expired, newest first.
    fn live_grants(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// Marks every active grant whose expiry is at or before `now` as expired and returns the
    /// bodies it marked: each grant is returned once, ever (across restarts and callers).
    fn expire_grants(&self, now: i64) -> Result<Vec<String>, StoreError>;
    /// The earliest expiry after `now` of an active grant.
    fn next_grant_expiry(&self, now: i64) -> Result<Option<i64>, StoreError>;

    /// Every chain key.
    fn audit_chains(&self) -> Result<Vec<String>, StoreError>;
    /// A chain's lines in seq order.
    fn audit_lines(&self, chain: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    /// A chain's stored rows, every column, in the order they were stored (which is seq order
    /// unless someone edited the `seq` column): for `audit verify` to check each column against
    /// the record line it came from.
    fn audit_rows(&self, chain: &str) -> Result<Vec<AuditRow>, StoreError>;
    /// Records stored after row `after_id` (insertion order), with their row ids.
    fn audit_after(&self, after_id: i64, limit: u32) -> Result<Vec<(i64, Vec<u8>)>, StoreError>;
    /// Records matching a filter, oldest first.
    fn audit_query(&self, filter: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError>;

    /// The change counters of shared state (one small read; replicas poll it).
    fn changes(&self) -> Result<Changes, StoreError>;
    /// Replaces the stored authority set only if no other set was saved since the one whose
    /// [`Changes::authorities`] counter was `seen` (compare-and-set: of replicas rotating at
    /// once, one saves and the others are told `None` and reload). Returns the new counter.
    fn replace_authorities(
        &self,
        authorities: &Authorities,
        seen: i64,
    ) -> Result<Option<i64>, StoreError>;

    /// Registers or refreshes `addresses` under `id` with a lease until `until_ms`; an entry
    /// live at `now_ms` keeps its first registration time. Returns the addresses that were not
    /// live before (only those count as a change).
    fn register_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Removes `addresses` from under `id`; returns those that were live at `now_ms`.
    fn remove_endpoints(
        &self,
        id: &str,
        addresses: &[String],
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;
    /// Deletes the entries whose lease ended by `now_ms` and returns them as (ID, address):
    /// each is returned once, ever, whichever replica sweeps.
    fn sweep_endpoints(&self, now_ms: i64) -> Result<Vec<(String, String)>, StoreError>;
    /// Every stored entry (expired ones too, until swept), by ID and address.
    fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError>;

    /// Publishes a policy, unless the newest published one has this version already; returns
    /// whether it was published.
    fn publish_policy(
        &self,
        version: &str,
        source: &str,
        at: OffsetDateTime,
        by: &str,
    ) -> Result<bool, StoreError>;
    /// The newest published policy, if any.
    fn policy(&self) -> Result<Option<PublishedPolicy>, StoreError>;

    /// Records a person's sign-in, replacing the previous one of the same SPIFFE ID.
    fn put_user_session(&self, session: &UserSession) -> Result<(), StoreError>;
    /// The latest sign-in of a user SPIFFE ID, valid or not.
    fn user_session(&self, spiffe_id: &str) -> Result<Option<UserSession>, StoreError>;

    /// Why the store cannot write now (the last write failed for lack of space or an I/O
    /// error, and none has succeeded since), or `None` while it can.
    fn unwritable(&self) -> Option<String>;
    /// Tries a small durable write, updating what [`Store::unwritable`] says: how a store that
    /// could not write finds out that it can again when nothing else writes.
    fn probe_write(&self) -> Result<(), StoreError>;
}
