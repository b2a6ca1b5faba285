//! The store's behaviour suite (`mayfly_ca::store::conformance`) on SQLite and on a real
//! PostgreSQL server, two handles on one database standing in for two replicas, and what only
//! PostgreSQL has: versioned migrations, CA keys sealed under the KEK, errors that name the
//! server but never the password.
#![allow(clippy::unwrap_used)]

use std::panic::{AssertUnwindSafe, catch_unwind};

use mayfly_ca::store::{Kek, PostgresStore, SqliteStore, Store, StoreError, conformance};
use mayfly_tests::postgres::Postgres;

/// Runs every case, and fails naming each case that failed.
fn run_all<S>(cases: Vec<(&'static str, S)>, run: impl Fn(&S)) {
    let failed: Vec<&str> = cases
        .iter()
        .filter(|(_, case)| catch_unwind(AssertUnwindSafe(|| run(case))).is_err())
        .map(|(name, _)| *name)
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sqlite(dir: &tempfile::TempDir, n: &str) -> SqliteStore {
    SqliteStore::open(&dir.path().join(format!("{n}.db"))).unwrap()
}

#[test]
fn every_store_behaviour_holds_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let next = || {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .to_string()
    };
    run_all(conformance::cases(), |case| case(&sqlite(&dir, &next())));
    // SQLite serves one process: its "replicas" are concurrent callers of one handle.
    run_all(conformance::replica_cases(), |case| {
        let s = sqlite(&dir, &next());
        case(&s, &s);
    });
}

#[test]
fn every_store_behaviour_holds_on_postgresql() {
    let pg = Postgres::start();
    let kek = || Kek::generate();
    run_all(conformance::cases(), |case| {
        case(&PostgresStore::open(&pg.create_db(), kek()).unwrap())
    });
}

#[test]
fn two_postgresql_replicas_on_one_database_agree_on_tokens_audit_and_grants() {
    let pg = Postgres::start();
    run_all(conformance::replica_cases(), |case| {
        let url = pg.create_db();
        let a = PostgresStore::open(&url, Kek::generate()).unwrap();
        let b = PostgresStore::open(&url, Kek::generate()).unwrap();
        case(&a, &b);
    });
}

#[test]
fn ca_keys_in_postgresql_are_sealed_and_open_only_with_their_kek() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let kek_bytes = tempfile::tempdir().unwrap();
    let kek_file = kek_bytes.path().join("kek");
    let (kek, _) = Kek::load_or_create(&kek_file).unwrap();
    let s = PostgresStore::open(&url, kek).unwrap();
    let a = mayfly_ca::authority::Authorities::init(
        mayfly_ca::id::parse_trust_domain("mayfly.local").unwrap(),
        Default::default(),
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    s.save_authorities(&a).unwrap();
    drop(s);
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let stored = pg.psql(
        db,
        "SELECT encode(key_sealed, 'hex') FROM authorities ORDER BY id",
    );
    // Root, intermediate and the JWT-SVID key: all sealed alike.
    assert_eq!(stored.lines().count(), 3);
    assert!(a.jwt_signer().is_some());
    for x in a.all() {
        let der = hex(x.key.pkcs8());
        // Not the DER, nor any 16-byte stretch of it.
        assert!(
            !stored.contains(&der[..32]),
            "a CA key is readable in the database"
        );
        let pem = mayfly_ca::keys::pem_encode("PRIVATE KEY", x.key.pkcs8());
        assert!(!stored.contains(&hex(pem.as_bytes())[..32]));
    }
    // The same KEK opens them; another refuses with the message operators look for.
    let s = PostgresStore::open(&url, Kek::load(&kek_file).unwrap()).unwrap();
    let b = s.load_authorities(Default::default()).unwrap().unwrap();
    assert_eq!(
        b.signer().unwrap().key.pkcs8(),
        a.signer().unwrap().key.pkcs8()
    );
    assert_eq!(
        b.jwt_signer().unwrap().key.pkcs8(),
        a.jwt_signer().unwrap().key.pkcs8()
    );
    let wrong = PostgresStore::open(&url, Kek::generate()).unwrap();
    let e = wrong.load_authorities(Default::default()).unwrap_err();
    assert!(matches!(e, StoreError::WrongKek), "{e}");
    assert_eq!(
        e.to_string(),
        "the key-encryption key does not open the CA keys in the store: wrong --kek-file?"
    );
}

#[test]
fn postgresql_migrations_are_versioned_and_a_newer_schema_is_refused() {
    let pg = Postgres::start();
    let url = pg.create_db();
    drop(PostgresStore::open(&url, Kek::generate()).unwrap());
    drop(PostgresStore::open(&url, Kek::generate()).unwrap()); // idempotent
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    assert_eq!(pg.psql(db, "SELECT version FROM mayfly_schema"), "3");
    pg.psql(db, "UPDATE mayfly_schema SET version = 99");
    let e = PostgresStore::open(&url, Kek::generate()).unwrap_err();
    assert!(matches!(e, StoreError::TooNew { found: 99, .. }), "{e}");
    assert!(e.to_string().contains("upgrade mayfly"), "{e}");
}

#[test]
fn an_unreachable_postgresql_is_named_by_host_and_port_never_by_password() {
    let port = mayfly_tests::free_port();
    let url = format!("postgres://mayfly:hunter2secret@{port}/ca?sslmode=disable");
    let e = PostgresStore::open(&url, Kek::generate()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{msg}");
    assert!(msg.contains(&format!("{port}/ca")), "{msg}");
    assert!(!msg.contains("hunter2secret"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_store_works_when_called_from_inside_a_runtime() {
    let pg = Postgres::start();
    let s = PostgresStore::open(&pg.create_db(), Kek::generate()).unwrap();
    // Called on a runtime worker (not spawn_blocking), and dropped there: neither panics.
    s.set_setting("k", "v").unwrap();
    assert_eq!(s.setting("k").unwrap().as_deref(), Some("v"));
    drop(s);
    let s = PostgresStore::open(&pg.create_db(), Kek::generate()).unwrap();
    let v = tokio::task::spawn_blocking(move || s.setting("k").unwrap())
        .await
        .unwrap();
    assert_eq!(v, None);
}

#[test]
fn a_postgresql_store_speaks_tls_and_verify_full_checks_the_server() {
    let pg = Postgres::start_tls();
    let url = pg.create_db();
    let base = url.trim_end_matches("?sslmode=disable");
    let db = base.rsplit('/').next().unwrap();
    let root = pg.root_ca();
    let verified = format!("{base}?sslmode=verify-full&sslrootcert={}", root.display());
    let s = PostgresStore::open(&verified, Kek::generate()).unwrap();
    s.set_setting("k", "v").unwrap();
    let encrypted = pg.psql(
        db,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'mayfly-ca' AND s.ssl",
    );
    assert_ne!(encrypted, "0", "the store's connections are not TLS");
    drop(s);
    // require: encrypted, the certificate not checked.
    let s = PostgresStore::open(&format!("{base}?sslmode=require"), Kek::generate()).unwrap();
    assert_eq!(s.setting("k").unwrap().as_deref(), Some("v"));
    drop(s);
    // verify-full against a CA that did not sign the server's certificate: refused.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-days", "1", "-subj", "/CN=other", "-nodes"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
        .args(["-keyout", "o.key", "-out", "o.pem"])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong = format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        other.path().join("o.pem").display()
    );
    let e = PostgresStore::open(&wrong, Kek::generate()).unwrap_err();
    assert!(matches!(e, StoreError::Unreachable { .. }), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}

#[test]
fn a_postgresql_store_connects_over_a_unix_socket() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let s = PostgresStore::open(&pg.socket_url(db), Kek::generate()).unwrap();
    s.set_setting("k", "v").unwrap();
    let over_socket = pg.psql(
        db,
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'mayfly-ca' AND client_port = -1",
    );
    assert_ne!(over_socket, "0");
}

/// A follower reading the audit trail from its cursor (`audit tail --follow`, the console's
/// live view) never skips a record while writers on several replicas commit concurrently: a
/// record's id is taken in commit order, so no smaller id can become visible after a larger
/// one has been read past.
#[test]
fn a_follower_of_the_audit_trail_never_skips_a_record_under_concurrent_writers() {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const WRITERS: usize = 4;
    const ROWS: u64 = 150;
    let pg = Postgres::start();
    let url = pg.create_db();
    let open = || PostgresStore::open(&url, Kek::generate()).unwrap();
    let writers: Vec<PostgresStore> = (0..WRITERS).map(|_| open()).collect();
    let follower = open();
    let running = AtomicUsize::new(WRITERS);
    let seen = std::thread::scope(|s| {
        for (w, store) in writers.iter().enumerate() {
            let running = &running;
            s.spawn(move || {
                let source = format!("spiffe://mayfly.local/w{w}");
                let (chain, rows) = conformance::chain_rows(&source, "e1", ROWS, "http.request");
                for row in rows.chunks(1) {
                    store.audit_append(&chain, row).unwrap().unwrap();
                }
                running.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let (mut cursor, mut seen) = (0_i64, HashSet::new());
        loop {
            let finished = running.load(Ordering::SeqCst) == 0;
            let batch = follower.audit_after(cursor, 1000).unwrap();
            for (id, _) in &batch {
                seen.insert(*id);
                cursor = *id;
            }
            if finished && batch.is_empty() {
                break seen;
            }
        }
    });
    let all: Vec<i64> = follower
        .audit_after(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(all.len(), WRITERS * ROWS as usize);
    let missed: Vec<i64> = all.into_iter().filter(|id| !seen.contains(id)).collect();
    assert!(missed.is_empty(), "the follower skipped ids {missed:?}");
}
