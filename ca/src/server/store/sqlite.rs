//! The embedded SQLite store.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use super::{
    AuditConflict, AuditFilter, AuditRow, EventRecord, GrantState, IssuedRecord, Store, StoreError,
    TokenClaim, TokenRecord, TokenRefusal,
};
use crate::identity::audit::Record;
use crate::identity::id::{TrustDomain, parse_trust_domain};
use crate::identity::keys::SecretKey;
use crate::identity::signing::authority::{Authorities, Authority, AuthorityConfig, Role, State};

/// Schema migrations, applied in order; index + 1 is the schema version. Never edit one that
/// has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: identity core and control plane.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE authorities (
        id TEXT PRIMARY KEY, role TEXT NOT NULL, state TEXT NOT NULL, cert BLOB NOT NULL,
        key BLOB NOT NULL, parent TEXT, not_before INTEGER NOT NULL, not_after INTEGER NOT NULL);
     CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, spiffe_id TEXT NOT NULL,
        created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL, created_by TEXT NOT NULL,
        used_at INTEGER, revoked_at INTEGER);
     CREATE TABLE issued (
        serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after INTEGER NOT NULL,
        issued_at INTEGER NOT NULL, requester TEXT NOT NULL);
     CREATE INDEX issued_by_id ON issued (spiffe_id, issued_at);
     CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL, kind TEXT NOT NULL,
        detail TEXT NOT NULL);",
    // 2: the tamper-evident audit trail: every writer's hash chain, the control plane's own
    // events included (they replace the plain events table).
    "CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, chain TEXT NOT NULL, seq INTEGER NOT NULL,
        prev TEXT NOT NULL, hash TEXT NOT NULL, source TEXT NOT NULL, ts_ms INTEGER NOT NULL,
        kind TEXT NOT NULL, line TEXT NOT NULL, UNIQUE (chain, seq));
     CREATE INDEX audit_by_time ON audit (ts_ms);
     DROP TABLE events;",
    // 3: just-in-time grants.
    "CREATE TABLE grants (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, expires INTEGER NOT NULL, body TEXT NOT NULL,
        created INTEGER NOT NULL DEFAULT (unixepoch()));",
    // 4: watch snapshots and the expiry scan read only grants in force.
    "CREATE INDEX grants_by_state ON grants (state, expires);",
];

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

/// What a caller of the group commit hears: its token refused (nothing written), or how the
/// commit went.
type IssuedOutcome = Result<Result<(), TokenRefusal>, String>;

/// An issued certificate, its event and the join token it spends, waiting for a group commit.
struct PendingIssued {
    rec: IssuedRecord,
    kind: String,
    detail: String,
    token: Option<TokenClaim>,
    done: std::sync::mpsc::SyncSender<IssuedOutcome>,
}

/// The fields of a control-plane event from its JSON text (anything else is kept as `detail`).
fn event_fields(detail: &str) -> serde_json::Map<String, serde_json::Value> {
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

const INSERT_ISSUED: &str =
    "INSERT INTO issued (serial, spiffe_id, not_after, issued_at, requester)
     VALUES (?1, ?2, ?3, ?4, ?5)";

fn insert_issued(c: &Connection, r: &IssuedRecord) -> Result<(), StoreError> {
    c.prepare_cached(INSERT_ISSUED)
        .and_then(|mut st| {
            st.execute(params![
                r.serial,
                r.spiffe_id,
                ts(r.not_after),
                ts(r.issued_at),
                r.requester
            ])
        })
        .map(|_| ())
        .map_err(db)
}

/// Spends a join token inside an open transaction: looked up by its ID, its secret's hash
/// compared in constant time. A refusal writes nothing.
fn spend_token_in(
    c: &Connection,
    claim: &TokenClaim,
    now: OffsetDateTime,
) -> Result<Result<(), TokenRefusal>, StoreError> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1"
        ))
        .and_then(|mut st| st.query_row([&claim.id], token_row).optional())
        .map_err(db)?;
    let Some(row) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    let t = token_from(row)?;
    if let Err(refusal) = t.check(&claim.hash, now) {
        return Ok(Err(refusal));
    }
    let n = c
        .prepare_cached(
            "UPDATE join_tokens SET used_at = ?1
             WHERE id = ?2 AND used_at IS NULL AND revoked_at IS NULL",
        )
        .and_then(|mut st| st.execute(params![ts(now), claim.id]))
        .map_err(db)?;
    Ok(if n == 1 {
        Ok(())
    } else {
        Err(TokenRefusal::Used(t.id))
    })
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

/// Appends one record to the control plane's own chain inside an open transaction.
fn append_own_in(
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
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;
             PRAGMA busy_timeout = 5000;",
        )
        .map_err(db)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StoreError::TooNew {
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction().map_err(db)?;
            tx.execute_batch(sql).map_err(db)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(db)?;
            tx.commit().map_err(db)?;
        }
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

    /// The control plane's own chain (trust domain, epoch), the epoch made on first use.
    fn own_parts(&self) -> Result<&(String, String), StoreError> {
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

    /// Writes every queued issued certificate and event, and spends their tokens, in one
    /// transaction, and tells each waiting caller how it went. A refused token leaves its
    /// caller's rows out; any error fails the whole batch and is returned too (so that the
    /// store learns it cannot write). Called with the connection held.
    fn commit_issued_queue(
        &self,
        c: &mut Connection,
        own: &(String, String),
    ) -> Result<(), StoreError> {
        // A poisoned queue still holds its callers' answer channels: take them all the same,
        // so nobody waits forever.
        let batch = std::mem::take(
            &mut *self
                .issued_queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if batch.is_empty() {
            return Ok(());
        }
        let result = (|| -> Result<Vec<Result<(), TokenRefusal>>, StoreError> {
            let tx = c.transaction().map_err(db)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            for p in &batch {
                if let Some(claim) = &p.token
                    && let Err(refusal) = spend_token_in(&tx, claim, p.rec.issued_at)?
                {
                    outcomes.push(Err(refusal));
                    continue;
                }
                insert_issued(&tx, &p.rec)?;
                let fields = event_fields(&p.detail);
                append_own_in(&tx, own, p.rec.issued_at, &p.kind, &|_, _| fields.clone())?;
                outcomes.push(Ok(()));
            }
            tx.commit().map_err(db)?;
            Ok(outcomes)
        })();
        match result {
            Ok(outcomes) => {
                for (p, outcome) in batch.into_iter().zip(outcomes) {
                    // A caller that gave up waiting is gone; its rows are written all the same.
                    let _ = p.done.send(Ok(outcome));
                }
                Ok(())
            }
            Err(e) => {
                for p in batch {
                    let _ = p.done.send(Err(e.to_string()));
                }
                Err(e)
            }
        }
    }
}

fn role_str(r: Role) -> &'static str {
    match r {
        Role::Root => "root",
        Role::Intermediate => "intermediate",
    }
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Prepared => "prepared",
        State::Active => "active",
        State::Old => "old",
    }
}

fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

type TokenRow = (
    String,
    String,
    String,
    i64,
    i64,
    String,
    Option<i64>,
    Option<i64>,
);

fn token_from(row: TokenRow) -> Result<TokenRecord, StoreError> {
    let (id, hash, spiffe_id, created, expires, created_by, used, revoked) = row;
    Ok(TokenRecord {
        id,
        hash,
        spiffe_id,
        created_at: from_ts(created)?,
        expires_at: from_ts(expires)?,
        created_by,
        used_at: opt_ts(used)?,
        revoked_at: opt_ts(revoked)?,
    })
}

const TOKEN_COLS: &str =
    "id, hash, spiffe_id, created_at, expires_at, created_by, used_at, revoked_at";

impl Store for SqliteStore {
    fn load_authorities(&self, config: AuthorityConfig) -> Result<Option<Authorities>, StoreError> {
        let Some(td) = self.trust_domain()? else {
            return Ok(None);
        };
        let seq: u64 = self
            .setting("bundle_sequence")?
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let rows = self.with(|c| {
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

    fn save_authorities(&self, a: &Authorities) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db)?;
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
            tx.commit().map_err(db)
        })
    }

    fn trust_domain(&self) -> Result<Option<TrustDomain>, StoreError> {
        match self.setting("trust_domain")? {
            None => Ok(None),
            Some(s) => parse_trust_domain(&s)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)
        })
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map(|_| ())
            .map_err(db)
        })
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO join_tokens (id, hash, spiffe_id, created_at, expires_at, created_by)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    t.id,
                    t.hash,
                    t.spiffe_id,
                    ts(t.created_at),
                    ts(t.expires_at),
                    t.created_by
                ],
            )
            .map(|_| ())
            .map_err(db)
        })
    }

    fn find_token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = self.with(|c| {
            c.query_row(
                &format!("SELECT {TOKEN_COLS} FROM join_tokens WHERE id = ?1"),
                [id],
                token_row,
            )
            .optional()
            .map_err(db)
        })?;
        row.map(token_from).transpose()
    }

    fn revoke_token(&self, id: &str, now: OffsetDateTime) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE join_tokens SET revoked_at = ?1
                 WHERE id = ?2 AND used_at IS NULL AND revoked_at IS NULL",
                params![ts(now), id],
            )
            .map(|n| n == 1)
            .map_err(db)
        })
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = self.with(|c| {
            let mut st = c
                .prepare(&format!(
                    "SELECT {TOKEN_COLS} FROM join_tokens ORDER BY created_at DESC, id"
                ))
                .map_err(db)?;
            let rows = st
                .query_map([], token_row)
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })?;
        rows.into_iter().map(token_from).collect()
    }

    fn log_issued(&self, r: &IssuedRecord) -> Result<(), StoreError> {
        self.with(|c| insert_issued(c, r))
    }

    fn log_issued_with_event(
        &self,
        rec: &IssuedRecord,
        kind: &str,
        detail: &str,
        token: Option<&TokenClaim>,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        let own = self.own_parts()?;
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.issued_queue
            .lock()
            .map_err(|_| StoreError::Db("store queue lock poisoned by an earlier panic".into()))?
            .push(PendingIssued {
                rec: rec.clone(),
                kind: kind.to_owned(),
                detail: detail.to_owned(),
                token: token.cloned(),
                done,
            });
        // Whoever gets the connection first commits everything queued so far, ours included
        // (if an earlier holder has not already taken it).
        // A failed batch answers every caller in it, this one included (an error here is
        // that batch's, already sent).
        let batch = self.with(|c| self.commit_issued_queue(c, own));
        let answer = wait
            .recv()
            .map_err(|_| StoreError::Db("group commit ended without an answer".into()))?;
        match (answer, batch) {
            (Ok(outcome), _) => Ok(outcome),
            (Err(_), Err(e)) => Err(e),
            (Err(e), Ok(())) => Err(StoreError::Db(e)),
        }
    }

    fn list_issued(&self, limit: u32) -> Result<Vec<IssuedRecord>, StoreError> {
        let rows = self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT serial, spiffe_id, not_after, issued_at, requester FROM issued
                     ORDER BY issued_at DESC LIMIT ?1",
                )
                .map_err(db)?;
            let rows = st
                .query_map([limit], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .map_err(db)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db)?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(serial, spiffe_id, na, at, requester)| {
                Ok(IssuedRecord {
                    serial,
                    spiffe_id,
                    not_after: from_ts(na)?,
                    issued_at: from_ts(at)?,
                    requester,
                })
            })
            .collect()
    }

    fn append_event(
        &self,
        at: OffsetDateTime,
        kind: &str,
        detail: &str,
    ) -> Result<i64, StoreError> {
        let fields = event_fields(detail);
        self.append_own(at, kind, &|_, _| fields.clone())
    }

    fn events_after(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>, StoreError> {
        let Some(chain) = self.own_chain()? else {
            return Ok(Vec::new());
        };
        let rows = self.with(|c| {
            let mut st = c
                .prepare(
                    "SELECT line FROM audit WHERE chain = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
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

    fn last_own_kind(&self) -> Result<Option<String>, StoreError> {
        let Some(chain) = self.own_chain()? else {
            return Ok(None);
        };
        self.with(|c| {
            c.prepare_cached("SELECT kind FROM audit WHERE chain = ?1 ORDER BY seq DESC LIMIT 1")
                .and_then(|mut st| st.query_row([&chain], |r| r.get(0)).optional())
                .map_err(db)
        })
    }

    fn own_chain(&self) -> Result<Option<String>, StoreError> {
        let (Some(td), Some(epoch)) = (self.setting("trust_domain")?, self.setting("audit_epoch")?)
        else {
            return Ok(None);
        };
        Ok(Some(format!(
            "spiffe://{td}{}#{epoch}",
            crate::identity::api::CA_ID_PATH
        )))
    }

    fn append_own(
        &self,
        at: OffsetDateTime,
        kind: &str,
        make: &dyn Fn(u64, &str) -> serde_json::Map<String, serde_json::Value>,
    ) -> Result<i64, StoreError> {
        let own = self.own_parts()?;
        self.with(|c| {
            let tx = c.transaction().map_err(db)?;
            let seq = append_own_in(&tx, own, at, kind, make)?;
            tx.commit().map_err(db)?;
            Ok(seq)
        })
    }

    fn audit_append(
        &self,
        chain: &str,
        rows: &[AuditRow],
    ) -> Result<Result<u64, AuditConflict>, StoreError> {
        self.with(|c| {
            let tx = c.transaction().map_err(db)?;
            let head: Option<(i64, String)> = tx
                .query_row(
                    "SELECT seq, hash FROM audit WHERE chain = ?1 ORDER BY seq DESC LIMIT 1",
                    [chain],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(db)?;
            let (mut last, mut last_hash) = match head {
                Some((s, h)) => (s as u64, h),
                None => (0, crate::identity::audit::GENESIS.to_owned()),
            };
            for r in rows {
                if r.seq <= last {
                    // A redelivery: it must be the very record stored.
                    let stored: Option<String> = tx
                        .query_row(
                            "SELECT hash FROM audit WHERE chain = ?1 AND seq = ?2",
                            params![chain, r.seq as i64],
                            |x| x.get(0),
                        )
                        .optional()
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
                tx.execute(
                    "INSERT INTO audit (chain, seq, prev, hash, source, ts_ms, kind, line)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        chain,
                        r.seq as i64,
                        r.prev,
                        r.hash,
                        r.source,
                        r.ts_ms,
                        r.kind,
                        String::from_utf8_lossy(&r.line)
                    ],
                )
                .map_err(db)?;
                last = r.seq;
                last_hash = r.hash.clone();
            }
            tx.commit().map_err(db)?;
            Ok(Ok(last))
        })
    }

    fn insert_grant(
        &self,
        id: &str,
        state: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO grants (id, state, expires, body) VALUES (?1, ?2, ?3, ?4)",
                params![id, state.as_str(), expires, body],
            )
            .map(|_| ())
            .map_err(db)
        })
    }

    fn update_grant(
        &self,
        id: &str,
        from: GrantState,
        to: GrantState,
        expires: i64,
        body: &str,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE grants SET state = ?3, expires = ?4, body = ?5 WHERE id = ?1 AND state = ?2",
                params![id, from.as_str(), to.as_str(), expires, body],
            )
            .map(|n| n == 1)
            .map_err(db)
        })
    }

    fn grant(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row("SELECT body FROM grants WHERE id = ?1", [id], |r| r.get(0))
                .optional()
                .map_err(db)
        })
    }

    fn list_grants(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| bodies(c, "SELECT body FROM grants ORDER BY created DESC, id", []))
    }

    fn live_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            bodies(
                c,
                "SELECT body FROM grants WHERE state = 'active' AND expires > ?1
                 ORDER BY created DESC, id",
                [now],
            )
        })
    }

    fn expire_grants(&self, now: i64) -> Result<Vec<String>, StoreError> {
        // One statement: a grant moves to expired exactly once, whoever else scans.
        self.with(|c| {
            bodies(
                c,
                "UPDATE grants SET state = 'expired', body = json_set(body, '$.state', 'expired')
                 WHERE state = 'active' AND expires <= ?1 RETURNING body",
                [now],
            )
        })
    }

    fn next_grant_expiry(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT min(expires) FROM grants WHERE state = 'active' AND expires > ?1",
                [now],
                |r| r.get(0),
            )
            .map_err(db)
        })
    }

    fn audit_chains(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
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

    fn audit_lines(&self, chain: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with(|c| {
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

    fn audit_rows(&self, chain: &str) -> Result<Vec<AuditRow>, StoreError> {
        self.with(|c| {
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

    fn audit_after(&self, after_id: i64, limit: u32) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
        self.with(|c| {
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

    fn audit_query(&self, f: &AuditFilter) -> Result<Vec<Vec<u8>>, StoreError> {
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
        self.with(|c| {
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token(id: &str, hash: &str, expires_in: i64) -> TokenRecord {
        let now = OffsetDateTime::now_utc();
        TokenRecord {
            id: id.into(),
            hash: hash.into(),
            spiffe_id: "spiffe://mayfly.local/web".into(),
            created_at: now,
            expires_at: now + time::Duration::seconds(expires_in),
            created_by: "root".into(),
            used_at: None,
            revoked_at: None,
        }
    }

    #[test]
    fn authorities_round_trip() {
        let s = SqliteStore::in_memory().unwrap();
        assert!(
            s.load_authorities(AuthorityConfig::default())
                .unwrap()
                .is_none()
        );
        let a = Authorities::init(
            parse_trust_domain("mayfly.local").unwrap(),
            AuthorityConfig::default(),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        s.save_authorities(&a).unwrap();
        let b = s
            .load_authorities(AuthorityConfig::default())
            .unwrap()
            .unwrap();
        assert_eq!(b.trust_domain(), a.trust_domain());
        assert_eq!(b.all().len(), 2);
        assert_eq!(b.signer().unwrap().cert, a.signer().unwrap().cert);
        assert_eq!(
            b.signer().unwrap().key.pkcs8(),
            a.signer().unwrap().key.pkcs8()
        );
    }

    fn store() -> SqliteStore {
        let s = SqliteStore::in_memory().unwrap();
        s.set_setting("trust_domain", "mayfly.local").unwrap();
        s
    }

    /// Logs an SVID with `serial` paid for by token `id` with secret hash `hash`.
    fn spend(
        s: &SqliteStore,
        serial: &str,
        id: &str,
        hash: &str,
    ) -> Result<Result<(), TokenRefusal>, StoreError> {
        let now = OffsetDateTime::now_utc();
        let rec = IssuedRecord {
            serial: serial.into(),
            spiffe_id: "spiffe://mayfly.local/web".into(),
            not_after: now + time::Duration::minutes(5),
            issued_at: now,
            requester: format!("token:{id}"),
        };
        let claim = TokenClaim {
            id: id.into(),
            hash: hash.into(),
        };
        s.log_issued_with_event(&rec, "svid.issued", "{}", Some(&claim))
    }

    #[test]
    fn tokens_are_single_use_and_refusals_say_why() {
        let s = store();
        let now = OffsetDateTime::now_utc();
        s.insert_token(&token("a", "ha", 600)).unwrap();
        s.insert_token(&token("b", "hb", -1)).unwrap();
        s.insert_token(&token("c", "hc", 600)).unwrap();
        assert_eq!(spend(&s, "01", "a", "ha").unwrap(), Ok(()));
        assert_eq!(
            spend(&s, "02", "a", "ha").unwrap(),
            Err(TokenRefusal::Used("a".into()))
        );
        assert_eq!(
            spend(&s, "03", "b", "hb").unwrap(),
            Err(TokenRefusal::Expired("b".into()))
        );
        assert_eq!(
            spend(&s, "04", "zz", "hc").unwrap(),
            Err(TokenRefusal::Unknown)
        );
        // A secret presented under another live token's ID.
        assert_eq!(
            spend(&s, "05", "c", "ha").unwrap(),
            Err(TokenRefusal::Unknown)
        );
        assert!(s.revoke_token("c", now).unwrap());
        assert!(!s.revoke_token("c", now).unwrap());
        assert_eq!(
            spend(&s, "06", "c", "hc").unwrap(),
            Err(TokenRefusal::Revoked("c".into()))
        );
        assert_eq!(s.list_tokens().unwrap().len(), 3);
        // A refusal logs nothing: only the SVID that spent a token is in the log.
        let issued = s.list_issued(10).unwrap();
        assert_eq!(issued.len(), 1);
        assert_eq!(issued[0].serial, "01");
        assert_eq!(s.find_token("c").unwrap().unwrap().used_at, None);
    }

    #[test]
    fn a_token_is_spent_only_if_its_svid_is_logged() {
        let s = store();
        s.insert_token(&token("a", "ha", 600)).unwrap();
        s.insert_token(&token("b", "hb", 600)).unwrap();
        spend(&s, "01", "b", "hb").unwrap().unwrap();
        // The log refuses a second row with serial 01: the transaction fails as a whole.
        assert!(spend(&s, "01", "a", "ha").is_err());
        assert_eq!(s.find_token("a").unwrap().unwrap().used_at, None);
        assert_eq!(spend(&s, "02", "a", "ha").unwrap(), Ok(()));
        assert!(s.find_token("a").unwrap().unwrap().used_at.is_some());
    }

    #[test]
    fn concurrent_spends_of_one_token_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        s.set_setting("trust_domain", "mayfly.local").unwrap();
        s.insert_token(&token("a", "ha", 600)).unwrap();
        let outcomes: Vec<_> = std::thread::scope(|scope| {
            let runs: Vec<_> = (0..8)
                .map(|i| {
                    let s = &s;
                    scope.spawn(move || spend(s, &format!("{i:02}"), "a", "ha").unwrap())
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1);
        assert!(
            outcomes
                .iter()
                .all(|o| o.is_ok() || *o == Err(TokenRefusal::Used("a".into())))
        );
        assert_eq!(s.list_issued(100).unwrap().len(), 1);
    }

    fn grant(s: &SqliteStore, id: &str, state: GrantState, expires: i64) {
        let body = serde_json::json!({ "id": id, "state": state }).to_string();
        s.insert_grant(id, state, expires, &body).unwrap();
    }

    #[test]
    fn only_grants_in_force_are_live_and_each_expiry_is_reported_once() {
        let s = store();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        grant(&s, "live", GrantState::Active, now + 60);
        grant(&s, "later", GrantState::Active, now + 120);
        grant(&s, "ended", GrantState::Active, now - 1);
        grant(&s, "waiting", GrantState::Pending, 0);
        grant(&s, "refused", GrantState::Denied, 0);
        grant(&s, "cut", GrantState::Revoked, now + 60);
        let ids = |bodies: Vec<String>| -> Vec<String> {
            let mut v: Vec<String> = bodies
                .iter()
                .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["id"].to_string())
                .collect();
            v.sort();
            v
        };
        assert_eq!(ids(s.live_grants(now).unwrap()), ["\"later\"", "\"live\""]);
        assert_eq!(s.next_grant_expiry(now).unwrap(), Some(now + 60));
        let expired = s.expire_grants(now).unwrap();
        assert_eq!(ids(expired.clone()), ["\"ended\""]);
        let body: serde_json::Value = serde_json::from_str(&expired[0]).unwrap();
        assert_eq!(body["state"], "expired");
        assert!(s.expire_grants(now).unwrap().is_empty(), "reported twice");
        assert_eq!(ids(s.expire_grants(now + 60).unwrap()), ["\"live\""]);
        assert_eq!(s.next_grant_expiry(now + 60).unwrap(), Some(now + 120));
    }

    #[test]
    fn a_grant_decision_applies_only_to_the_state_it_was_made_on() {
        let s = store();
        grant(&s, "g", GrantState::Pending, 0);
        let (p, a, r) = (GrantState::Pending, GrantState::Active, GrantState::Revoked);
        assert!(s.update_grant("g", p, a, 60, "{}").unwrap());
        assert!(!s.update_grant("g", p, r, 0, "{}").unwrap(), "stale");
        assert!(s.update_grant("g", a, r, 60, "{}").unwrap());
        assert!(!s.update_grant("nope", p, a, 60, "{}").unwrap());
    }

    #[test]
    fn grant_states_have_one_name_each() {
        for g in [
            GrantState::Pending,
            GrantState::Active,
            GrantState::Denied,
            GrantState::Revoked,
            GrantState::Expired,
        ] {
            assert_eq!(g.as_str().parse::<GrantState>().unwrap(), g);
            assert_eq!(serde_json::to_value(g).unwrap(), g.as_str());
        }
        assert!("approved".parse::<GrantState>().is_err());
    }

    #[test]
    fn migrations_are_versioned_and_a_newer_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(SqliteStore::open(&path).unwrap());
        drop(SqliteStore::open(&path).unwrap()); // idempotent
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn events_are_sequenced() {
        let s = SqliteStore::in_memory().unwrap();
        s.set_setting("trust_domain", "mayfly.local").unwrap();
        assert_eq!(s.last_own_kind().unwrap(), None);
        let now = OffsetDateTime::now_utc();
        let a = s.append_event(now, "x", "{}").unwrap();
        let b = s.append_event(now, "y", "{}").unwrap();
        assert!(b > a);
        let ev = s.events_after(a, 10).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, "y");
        assert_eq!(s.last_own_kind().unwrap().as_deref(), Some("y"));
    }

    /// Concurrent issuances are group-committed: every certificate and every event lands, the
    /// event chain stays contiguous and verifies, and each caller returns only after its rows.
    #[test]
    fn issued_with_event_group_commit_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SqliteStore::open(&dir.path().join("t.db")).unwrap());
        s.set_setting("trust_domain", "mayfly.local").unwrap();
        let now = OffsetDateTime::now_utc();
        std::thread::scope(|scope| {
            for t in 0..8 {
                let s = s.clone();
                scope.spawn(move || {
                    for i in 0..50 {
                        let serial = format!("{t:02x}{i:04x}");
                        let rec = IssuedRecord {
                            serial: serial.clone(),
                            spiffe_id: format!("spiffe://mayfly.local/w{t}"),
                            not_after: now + time::Duration::minutes(5),
                            issued_at: now,
                            requester: "test".into(),
                        };
                        let detail = format!("{{\"serial\":\"{serial}\"}}");
                        s.log_issued_with_event(&rec, "svid.issued", &detail, None)
                            .unwrap()
                            .unwrap();
                        // Durable and visible once the call returns.
                        let n: i64 = s
                            .with(|c| {
                                c.query_row(
                                    "SELECT count(*) FROM issued WHERE serial = ?1",
                                    [&serial],
                                    |r| r.get(0),
                                )
                                .map_err(db)
                            })
                            .unwrap();
                        assert_eq!(n, 1, "{serial}");
                    }
                });
            }
        });
        assert_eq!(s.list_issued(10_000).unwrap().len(), 400);
        let chain = s.own_chain().unwrap().unwrap();
        let lines = s.audit_lines(&chain).unwrap();
        assert_eq!(lines.len(), 400);
        let summary =
            crate::identity::audit::verify_lines(&chain, lines.iter().map(Vec::as_slice), None)
                .unwrap();
        assert_eq!(summary.records, 400);
        // The events are the ones logged, each once.
        let mut serials: Vec<String> = s
            .events_after(0, 10_000)
            .unwrap()
            .into_iter()
            .map(|e| {
                let v: serde_json::Value = serde_json::from_str(&e.detail).unwrap();
                v["serial"].as_str().unwrap().to_owned()
            })
            .collect();
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), 400);
    }
}
