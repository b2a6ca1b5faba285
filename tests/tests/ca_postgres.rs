//! End to end on a real PostgreSQL server: `mayfly-ca init --store postgres://...` and
//! `mayfly-ca run --store ...`, sidecars that bootstrap with join tokens and carry traffic,
//! `audit verify` on the database, a replica with the wrong KEK refused, and the CA keys in the
//! database sealed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, Sidecar, Spec, bin, echo_app, eventually, policy, round_trip};

fn ca_cli(dir: &Path, store: &str, args: &[&str]) -> (bool, String, String) {
    let o = Command::new(bin("mayfly-ca"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--store", store])
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap().split('?').next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_postgresql_bootstraps_sidecars_that_carry_traffic() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start_with_store(&tmp, &url, &[]);
    // init made the KEK, private to its owner, and no SQLite file.
    let kek = ca.dir.join("ca.kek");
    let mode = std::fs::metadata(&kek).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(!ca.dir.join("ca.db").exists());

    let dir = tmp.path();
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
    let spec = |me: &'static str, tok: &Path, app: Option<&str>, out: &[(&str, &str, &str)]| {
        Spec {
            me,
            ca: &ca.addr,
            token: tok,
            policy: &pol,
            inbound_app: app,
            outbound: out,
            svid_ttl: None,
            extra: "",
        }
        .toml()
    };
    let mut orders = Sidecar::start(dir, "orders", &spec("orders", &tok, Some(&app), &[]));
    let orders_in = orders.inbound();
    let tok = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &spec("web", &tok, None, &[("orders", &orders_in, "orders")]),
    );
    let web_out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    for i in 0..5 {
        let msg = format!("hello {i}");
        assert_eq!(
            round_trip(&web_out, msg.as_bytes()).await.unwrap(),
            "orders-app"
        );
    }

    // Both tokens were spent in the database, and the SVIDs logged there.
    let db = db_name(&url);
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL"
        ),
        "2"
    );
    assert!(
        pg.psql(db, "SELECT count(*) FROM issued")
            .parse::<u32>()
            .unwrap()
            >= 2
    );
    // The sidecars' audit records reach the database, and every chain verifies there.
    let delivered = eventually(Duration::from_secs(30), async || {
        let n: u32 = pg
            .psql(
                db,
                "SELECT count(*) FROM audit WHERE kind = 'connection.open'",
            )
            .parse()
            .unwrap();
        n >= 5
    })
    .await;
    assert!(
        delivered,
        "audit records not delivered:\n{}",
        web.proc.log()
    );
    let (ok, out, err) = ca_cli(&ca.dir, &url, &["audit", "verify"]);
    assert!(ok, "audit verify: {out}{err}");

    // The CA keys in the database are not the keys: not their DER, not their PEM.
    let (_, _, authorities) = mayfly_ca::server::open_with(
        &ca.dir,
        &mayfly_ca::server::StoreOptions {
            url: Some(url.parse().unwrap()),
            kek_file: None,
        },
    )
    .unwrap();
    let stored = pg.psql(db, "SELECT encode(key_sealed, 'hex') FROM authorities");
    assert_eq!(stored.lines().count(), authorities.all().len());
    for a in authorities.all() {
        let der: String = a.key.pkcs8().iter().map(|b| format!("{b:02x}")).collect();
        assert!(!stored.contains(&der[..32]), "CA key {} readable", a.id);
    }
    let plain = pg.psql(
        db,
        "SELECT count(*) FROM authorities WHERE position('PRIVATE KEY'::bytea in key_sealed) > 0",
    );
    assert_eq!(plain, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_the_wrong_kek_refuses_to_start_and_says_so() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let (ok, _, err) = ca_cli(&first, &url, &["init", "--trust-domain", "mayfly.local"]);
    assert!(ok, "{err}");
    // A second replica's own data directory, with a KEK that is not the one init made.
    let second = tmp.path().join("second");
    std::fs::create_dir(&second).unwrap();
    std::fs::set_permissions(&second, std::fs::Permissions::from_mode(0o700)).unwrap();
    let wrong = second.join("ca.kek");
    let (ok, _, err) = ca_cli(&second, &url, &["ca", "status"]);
    assert!(!ok && err.contains("does not exist: copy the one"), "{err}");
    mayfly_ca::store::Kek::load_or_create(&wrong).unwrap();
    let kek_text = std::fs::read_to_string(&wrong).unwrap();
    let out = Command::new(bin("mayfly-ca"))
        .args(["run", "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(&second)
        .args(["--store", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "the key-encryption key does not open the CA keys in the store: wrong --kek-file?"
        ),
        "{err}"
    );
    assert!(
        !err.contains(kek_text.trim()),
        "the KEK is in the error: {err}"
    );
    assert!(
        !err.contains("not-a-secret"),
        "the password is in the error: {err}"
    );
    // With the right KEK (copied from the first) the same replica starts.
    std::fs::copy(first.join("ca.kek"), &wrong).unwrap();
    let (ok, out, err) = ca_cli(&second, &url, &["ca", "status"]);
    assert!(ok && out.contains("mayfly.local"), "{out}{err}");
    // A KEK file others can read is refused.
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, err) = ca_cli(&second, &url, &["ca", "status"]);
    assert!(!ok && err.contains("chmod 600"), "{err}");
    // init on the initialised database refuses to overwrite it.
    let (ok, _, err) = ca_cli(&first, &url, &["init", "--trust-domain", "mayfly.local"]);
    assert!(!ok && err.contains("already holds a mayfly CA"), "{err}");
    let (ok, out, err) = ca_cli(
        &first,
        &url,
        &["init", "--trust-domain", "mayfly.local", "--exist-ok"],
    );
    assert!(ok, "{out}{err}");
}

#[test]
fn store_rekey_seals_the_ca_keys_under_a_new_kek_and_the_old_one_no_longer_opens_them() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let (ok, _, err) = ca_cli(&dir, &url, &["init", "--trust-domain", "mayfly.local"]);
    assert!(ok, "{err}");
    let (ok, before, err) = ca_cli(&dir, &url, &["bundle", "show"]);
    assert!(ok, "{err}");
    let sealed = |pg: &Postgres| {
        pg.psql(
            db_name(&url),
            "SELECT encode(key_sealed, 'hex') FROM authorities ORDER BY id",
        )
    };
    let sealed_before = sealed(&pg);
    let old = dir.join("ca.kek");
    let new = tmp.path().join("new.kek");
    let rekey = |old: &Path, new: &Path| {
        Command::new(bin("mayfly-ca"))
            .args(["store", "rekey", "--store", &url, "--kek-file"])
            .arg(old)
            .arg("--new-kek-file")
            .arg(new)
            .output()
            .unwrap()
    };
    // A wrong current KEK opens nothing and creates nothing.
    let stranger = tmp.path().join("stranger.kek");
    mayfly_ca::store::Kek::load_or_create(&stranger).unwrap();
    let o = rekey(&stranger, &new);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("wrong --kek-file"),
        "{err}"
    );
    assert!(!new.exists(), "a new KEK was left behind by a failed rekey");
    // The right one: every key sealed again under the new KEK, created 0600.
    let o = rekey(&old, &new);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("sealed 3 CA keys again"), "{out}");
    let mode = std::fs::metadata(&new).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_ne!(sealed(&pg), sealed_before);
    // The old KEK no longer opens them; the new one does, and the CA is the same.
    let (ok, _, err) = ca_cli(&dir, &url, &["ca", "status"]);
    assert!(!ok && err.contains("wrong --kek-file"), "{err}");
    let new_str = new.to_str().unwrap();
    let (ok, after, err) = ca_cli(&dir, &url, &["bundle", "show", "--kek-file", new_str]);
    assert!(ok, "{err}");
    assert_eq!(after, before, "the trust bundle changed");
    // The rotation is on the control plane's chain, which still verifies.
    let (ok, out, err) = ca_cli(
        &dir,
        &url,
        &[
            "audit",
            "query",
            "--kind",
            "kek.rotated",
            "--kek-file",
            new_str,
        ],
    );
    assert!(ok && out.contains("kek.rotated"), "{out}{err}");
    let (ok, out, err) = ca_cli(&dir, &url, &["audit", "verify", "--kek-file", new_str]);
    assert!(ok, "{out}{err}");
}

#[test]
fn store_urls_that_cannot_be_opened_get_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let (ok, _, err) = ca_cli(&dir, "mysql://root:pw@db/ca", &["ca", "status"]);
    assert!(
        !ok && err.contains("unknown store scheme \"mysql\""),
        "{err}"
    );
    assert!(!err.contains("pw@"), "{err}");
    let port = mayfly_tests::free_port();
    let url = format!("postgres://mayfly:hunter2secret@{port}/ca?sslmode=disable");
    let (ok, _, err) = ca_cli(&dir, &url, &["init", "--trust-domain", "mayfly.local"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(&format!("cannot reach PostgreSQL at {port}/ca")),
        "{err}"
    );
    assert!(!err.contains("hunter2secret"), "{err}");
    // The failed init left no KEK behind.
    assert!(!dir.join("ca.kek").exists());
    // sqlite:PATH works as the data directory's file does.
    let db = tmp.path().join("elsewhere.db");
    let store = format!("sqlite:{}", db.display());
    let (ok, _, err) = ca_cli(&dir, &store, &["init", "--trust-domain", "mayfly.local"]);
    assert!(ok, "{err}");
    let (ok, out, err) = ca_cli(&dir, &store, &["ca", "status"]);
    assert!(ok && out.contains("mayfly.local"), "{out}{err}");
    assert!(!dir.join("ca.db").exists());
}
