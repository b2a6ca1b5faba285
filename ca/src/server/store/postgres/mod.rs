//! The PostgreSQL store, for several control-plane replicas on one database. One file per
//! concern, as for SQLite: [`connect`] (the URL and TLS), [`schema`] (migrations),
//! [`authorities`] (settings, CA keys sealed under the KEK), [`tokens`], [`issued`],
//! [`audit`] and [`grants`]; this file holds the pool, the runtime the synchronous [`Store`]
//! calls run on, and the trait implementation.
//!
//! The trait is synchronous; tokio-postgres is not. The store owns one thread running a
//! current-thread tokio runtime: each call sends its operation there as a task and waits on a
//! channel for the answer. So a call never panics inside or outside a runtime, never blocks the
//! store's runtime (the caller waits, not it), and concurrent calls run concurrently on the
//! pool's connections.
//!
//! Correctness across replicas is the database's: a token is spent by a conditional `UPDATE`
//! in the transaction that logs its SVID; appends to one audit chain are serialised by a
//! transaction-scoped advisory lock on the chain (so a redelivery received by two replicas is
//! stored once, the second seeing the first's rows); grant decisions are conditional `UPDATE`s.

mod audit;
mod authorities;
mod connect;
mod grants;
mod issued;
mod schema;
mod shared;
mod tokens;
mod users;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use time::OffsetDateTime;

use super::kek::Kek;
use super::{
    AuditConflict, AuditFilter, AuditRow, Changes, EndpointRow, EventRecord, GrantState,
    IssuedRecord, PublishedPolicy, Store, StoreError, TokenClaim, TokenRecord, TokenRefusal,
    UserSession,
};
use crate::identity::id::TrustDomain;
use crate::identity::signing::authority::{Authorities, AuthorityConfig};

/// Most connections one replica opens.
const POOL_SIZE: usize = 8;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What an operation runs with: the pool and the server's name for errors.
#[derive(Clone)]
pub(super) struct Db {
    pool: Pool,
    target: Arc<str>,
}

impl Db {
    /// A pooled connection; failing to get one means the database cannot be reached.
    pub(super) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => self.err(e),
            other => StoreError::Unwritable(format!(
                "cannot reach PostgreSQL at {}: {other}",
                self.target
            )),
        })
    }

    /// A database error as a store error: a lost connection, a server shutting down or out
    /// of space is [`StoreError::Unwritable`] (it passes), anything else [`StoreError::Db`].
    pub(super) fn err(&self, e: tokio_postgres::Error) -> StoreError {
        let code = e.code().map(|c| c.code().to_owned());
        let transient = match code.as_deref() {
            // Connection exceptions, insufficient resources, operator intervention.
            Some(c) => c.starts_with("08") || c.starts_with("53") || c.starts_with("57P"),
            None => {
                e.is_closed()
                    || std::error::Error::source(&e)
                        .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some())
            }
        };
        if transient {
            StoreError::Unwritable(format!(
                "PostgreSQL at {}: {}",
                self.target,
                with_causes(&e)
            ))
        } else {
            StoreError::Db(format!("PostgreSQL at {}: {}", self.target, db_message(&e)))
        }
    }
}

/// An error and its causes, `a: b: c` (tokio-postgres' Display stops at the first).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// The server's message of a database error (tokio-postgres' own Display says only
/// "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

/// The PostgreSQL store. See the module documentation.
pub struct PostgresStore {
    db: Db,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    kek: Arc<Kek>,
    /// The control plane's own chain (trust domain, epoch), once known; never changes after.
    own: std::sync::OnceLock<(String, String)>,
    /// Why the last write failed for want of a reachable, writable database, until one
    /// succeeds again.
    unwritable: Mutex<Option<String>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.db.target)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://...`), applies pending migrations, and
    /// seals and opens CA keys with `kek`. An unreachable server is
    /// [`StoreError::Unreachable`], naming host and port (never the password).
    pub fn open(url: &str, kek: Kek) -> Result<Self, StoreError> {
        let target = connect::parse(url)?;
        let described: Arc<str> = target.described.clone().into();
        let mc = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match target.tls {
            Some(tls) => Manager::from_config(target.config, tls, mc),
            None => Manager::from_config(target.config, tokio_postgres::NoTls, mc),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(std::time::Duration::from_secs(10)))
            .create_timeout(Some(std::time::Duration::from_secs(10)))
            .build()
            .map_err(|e| StoreError::Db(format!("PostgreSQL pool: {e}")))?;
        let jobs = spawn_runtime()?;
        let store = Self {
            db: Db {
                pool,
                target: described.clone(),
            },
            jobs,
            kek: Arc::new(kek),
            own: std::sync::OnceLock::new(),
            unwritable: Mutex::new(None),
        };
        store
            .run(false, |db| async move { schema::migrate(&db).await })
            .map_err(|e| match e {
                StoreError::Unwritable(reason) => StoreError::Unreachable {
                    reason: reason
                        .strip_prefix(&format!("PostgreSQL at {described}: "))
                        .unwrap_or(&reason)
                        .to_owned(),
                    target: described.to_string(),
                },
                other => other,
            })?;
        Ok(store)
    }

    /// `host:port/dbname` of the server.
    pub fn target(&self) -> &str {
        &self.db.target
    }

    /// Runs `op` on the store's runtime and waits for its answer. A write's success clears
    /// [`Store::unwritable`]; an `Unwritable` error sets it.
    pub(super) fn run<T, F, Fut>(&self, write: bool, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Db) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        let fut = op(self.db.clone());
        self.jobs
            .send(Box::pin(async move {
                let _ = done.send(fut.await);
            }))
            .map_err(|_| StoreError::Db("the PostgreSQL store's runtime has stopped".into()))?;
        let result = wait.recv().map_err(|_| {
            StoreError::Db("a PostgreSQL store operation ended without an answer".into())
        })?;
        match &result {
            Err(StoreError::Unwritable(why)) => self.set_unwritable(Some(why.clone())),
            Ok(_) if write => self.set_unwritable(None),
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

/// The thread and current-thread runtime the store's operations run on. It ends when the
/// store (the only sender) is dropped.
fn spawn_runtime() -> Result<tokio::sync::mpsc::UnboundedSender<Job>, StoreError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StoreError::Db(format!("cannot start the PostgreSQL store's runtime: {e}")))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
    std::thread::Builder::new()
        .name("mayfly-postgres".into())
        .spawn(move || {
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    tokio::spawn(job);
                }
            });
        })
        .map_err(|e| StoreError::Db(format!("cannot start the PostgreSQL store's thread: {e}")))?;
    Ok(tx)
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

impl Store for PostgresStore {
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
        let fields = super::event_fields(detail);
        self.append_own(at, kind, &|_, _| fields.clone())
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
        shared::publish_policy(self, version, source, at, by)
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
        let now = ts(OffsetDateTime::now_utc()).to_string();
        self.run(true, |db| async move {
            let c = db.client().await?;
            c.execute(
                "INSERT INTO settings (key, value) VALUES ('write_probe', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&now],
            )
            .await
            .map(|_| ())
            .map_err(|e| db.err(e))
        })
    }
}
