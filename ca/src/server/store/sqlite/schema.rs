//! The schema: its migrations and applying them on open.

use rusqlite::Connection;

use super::db;
use crate::server::store::StoreError;

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
    // 5: what replicas share and how they learn of each other's changes: change counters
    // (grants bump theirs by trigger; endpoints, policies and authorities in the writing
    // transaction), the endpoint registry with leases, and the published policies.
    "CREATE TABLE changes (topic TEXT PRIMARY KEY, n INTEGER NOT NULL);
     INSERT INTO changes (topic, n)
        VALUES ('grants', 0), ('endpoints', 0), ('policy', 0), ('authorities', 0);
     CREATE TRIGGER grants_inserted AFTER INSERT ON grants
        BEGIN UPDATE changes SET n = n + 1 WHERE topic = 'grants'; END;
     CREATE TRIGGER grants_updated AFTER UPDATE ON grants
        BEGIN UPDATE changes SET n = n + 1 WHERE topic = 'grants'; END;
     CREATE TRIGGER grants_deleted AFTER DELETE ON grants
        BEGIN UPDATE changes SET n = n + 1 WHERE topic = 'grants'; END;
     CREATE TABLE endpoints (
        spiffe_id TEXT NOT NULL, address TEXT NOT NULL, since_ms INTEGER NOT NULL,
        until_ms INTEGER NOT NULL, PRIMARY KEY (spiffe_id, address));
     CREATE INDEX endpoints_by_expiry ON endpoints (until_ms);
     CREATE TABLE policies (
        id INTEGER PRIMARY KEY AUTOINCREMENT, version TEXT NOT NULL, source TEXT NOT NULL,
        published_at INTEGER NOT NULL, published_by TEXT NOT NULL);",
    // 6: people's sign-ins (the groups an ID token carried when it was exchanged).
    "CREATE TABLE user_sessions (
        spiffe_id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL, body TEXT NOT NULL);",
];

/// Sets the connection's pragmas and applies the migrations the file lacks; a file from a
/// newer version is refused.
pub(super) fn migrate(conn: &Connection) -> Result<(), StoreError> {
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
    Ok(())
}
