//! The PostgreSQL schema: versioned migrations, applied under an advisory lock so that
//! replicas starting together migrate once.

use super::Db;
use crate::server::store::StoreError;

/// The advisory lock key that serialises migrations ("mayfly" in ASCII).
const MIGRATION_LOCK: i64 = 0x6d61_7966_6c79;

/// Schema migrations, applied in order; index + 1 is the schema version. Never edit one that
/// has shipped: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: the whole store as of SQLite's version 4. CA keys are sealed under the KEK.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE authorities (
        id TEXT PRIMARY KEY, role TEXT NOT NULL, state TEXT NOT NULL, cert BYTEA NOT NULL,
        key_sealed BYTEA NOT NULL, parent TEXT, not_before BIGINT NOT NULL,
        not_after BIGINT NOT NULL);
     CREATE TABLE join_tokens (
        id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, spiffe_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, created_by TEXT NOT NULL,
        used_at BIGINT, revoked_at BIGINT);
     CREATE TABLE issued (
        serial TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, not_after BIGINT NOT NULL,
        issued_at BIGINT NOT NULL, requester TEXT NOT NULL);
     CREATE INDEX issued_by_id ON issued (spiffe_id, issued_at);
     CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, chain TEXT NOT NULL,
        seq BIGINT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL, source TEXT NOT NULL,
        ts_ms BIGINT NOT NULL, kind TEXT NOT NULL, line TEXT NOT NULL, UNIQUE (chain, seq));
     CREATE INDEX audit_by_time ON audit (ts_ms);
     CREATE TABLE grants (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, expires BIGINT NOT NULL, body TEXT NOT NULL,
        created BIGINT NOT NULL DEFAULT (extract(epoch FROM now())::bigint));
     CREATE INDEX grants_by_state ON grants (state, expires);",
    // 2: what replicas share and how they learn of each other's changes: change counters
    // (grants bump theirs by trigger, one bump per row changed; endpoints, policies and
    // authorities in the writing transaction), the endpoint registry with leases, and the
    // published policies.
    "CREATE TABLE mayfly_changes (topic TEXT PRIMARY KEY, n BIGINT NOT NULL);
     INSERT INTO mayfly_changes (topic, n)
        VALUES ('grants', 0), ('endpoints', 0), ('policy', 0), ('authorities', 0);
     CREATE FUNCTION mayfly_bump() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE mayfly_changes SET n = n + 1 WHERE topic = TG_ARGV[0];
            RETURN NULL;
        END $$;
     CREATE TRIGGER grants_changed AFTER INSERT OR UPDATE OR DELETE ON grants
        FOR EACH ROW EXECUTE FUNCTION mayfly_bump('grants');
     CREATE TABLE endpoints (
        spiffe_id TEXT NOT NULL, address TEXT NOT NULL, since_ms BIGINT NOT NULL,
        until_ms BIGINT NOT NULL, PRIMARY KEY (spiffe_id, address));
     CREATE INDEX endpoints_by_expiry ON endpoints (until_ms);
     CREATE TABLE policies (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, version TEXT NOT NULL,
        source TEXT NOT NULL, published_at BIGINT NOT NULL, published_by TEXT NOT NULL);",
    // 3: people's sign-ins (the groups an ID token carried when it was exchanged).
    "CREATE TABLE user_sessions (
        spiffe_id TEXT PRIMARY KEY, expires_at BIGINT NOT NULL, body TEXT NOT NULL);",
];

/// The newest schema version this binary knows.
pub(super) fn supported() -> i64 {
    MIGRATIONS.len() as i64
}

/// Applies the migrations the database lacks; a database from a newer version is refused.
pub(super) async fn migrate(db: &Db) -> Result<(), StoreError> {
    let mut c = db.client().await?;
    let tx = c.transaction().await.map_err(|e| db.err(e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db.err(e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS mayfly_schema (version BIGINT NOT NULL)")
        .await
        .map_err(|e| db.err(e))?;
    let row = tx
        .query_opt("SELECT version FROM mayfly_schema", &[])
        .await
        .map_err(|e| db.err(e))?;
    let version: i64 = match row {
        Some(r) => r.get(0),
        None => {
            tx.execute("INSERT INTO mayfly_schema (version) VALUES (0)", &[])
                .await
                .map_err(|e| db.err(e))?;
            0
        }
    };
    if version > supported() {
        return Err(StoreError::TooNew {
            found: version,
            supported: supported(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).await.map_err(|e| db.err(e))?;
        tx.execute(
            "UPDATE mayfly_schema SET version = $1",
            &[&((i + 1) as i64)],
        )
        .await
        .map_err(|e| db.err(e))?;
    }
    tx.commit().await.map_err(|e| db.err(e))
}
