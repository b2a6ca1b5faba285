//! Several control-plane replicas on one PostgreSQL database share one view: endpoints
//! registered through one reach sidecars watching another, a grant made on one reaches the
//! watch streams of all, the policy one publishes is the one every replica serves, and a
//! rotation attempted by both at once is made by one and served by both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::people::{ca_cli, central};
use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, Sidecar, echo_app, eventually, round_trip};
use serde_json::Value;

/// `approvals = 0`: a grant request is in force at once. orders may call db; web may not.
fn central_policy(extra_rule: bool) -> String {
    let mut s = String::from(
        "version = 1\n[grants]\nmax_ttl = \"10m\"\napprovals = 0\n\n\
         [[rule]]\nname = \"orders-uses-db\"\nfrom = [\"spiffe://mayfly.local/orders\"]\n\
         to = [\"spiffe://mayfly.local/db\"]\n",
    );
    if extra_rule {
        s.push_str(
            "\n[[rule]]\nname = \"batch-uses-db\"\nfrom = [\"spiffe://mayfly.local/batch\"]\n\
             to = [\"spiffe://mayfly.local/db\"]\n",
        );
    }
    s
}

fn log(ca: &Ca) -> String {
    ca.proc.as_ref().map(|p| p.log()).unwrap_or_default()
}

/// Replica A (initialises the database, with `a_flags`) and replica B (its own data
/// directory, A's KEK, with `b_flags`).
fn two_replicas(
    tmp: &Arc<tempfile::TempDir>,
    url: &str,
    a_flags: &[&str],
    b_flags: &[&str],
) -> (Ca, Ca) {
    let a = Ca::start_with_store(tmp, url, a_flags);
    let kek = a.dir.join("ca.kek");
    let mut flags = vec!["--store", url, "--kek-file", kek.to_str().unwrap()];
    flags.extend_from_slice(b_flags);
    let b = Ca::start_with_existing(tmp, &tmp.path().join("ca-b"), "127.0.0.1:0", &flags);
    (a, b)
}

/// The endpoints a sidecar's `/upstreams` shows for its first outbound.
async fn upstream_endpoints(sc: &Sidecar) -> Vec<String> {
    let (status, body) = sc.admin_get("/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["upstreams"][0]["endpoints"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["address"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn policy_version(sc: &Sidecar) -> Option<String> {
    let (_, body) = sc.admin_get("/readyz").await;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["policy_version"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_grants_and_the_policy_made_on_one_replica_reach_sidecars_watching_the_other() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let pol = dir.join("central.toml");
    std::fs::write(&pol, central_policy(false)).unwrap();
    // Only A has the policy file; B serves what A published.
    let (a, b) = two_replicas(&tmp, &url, &["--policy", pol.to_str().unwrap()], &[]);

    // db registers its endpoint through A; web watches B.
    let app = echo_app("db-app").await;
    let mut db = central(&a, dir, "db", Some(&app), &[]);
    let db_in = db.inbound();
    let mut web = central(&b, dir, "web", None, &[("db", &db_in, "db")]);
    let out = web.outbound("db");
    db.wait_ready().await;
    web.wait_ready().await;

    // The policy A published is the one B pushes.
    let v1 = policy_version(&web).await;
    assert!(v1.is_some(), "web got no policy from B:\n{}", log(&b));

    // The endpoint registered through A is on web's watch of B.
    let seen = eventually(Duration::from_secs(10), async || {
        upstream_endpoints(&web).await == vec![db_in.clone()]
    })
    .await;
    assert!(
        seen,
        "{:?}\n--- B\n{}\n--- web\n{}",
        upstream_endpoints(&web).await,
        log(&b),
        web.proc.log()
    );

    // A grant made on A opens web -> db through B's watch stream within 2 s.
    assert!(round_trip(&out, b"x").await.is_err(), "denied before");
    let (ok, msg) = ca_cli(
        &a.dir,
        &[
            "grant",
            "request",
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/db",
            "--ttl",
            "5m",
            "--reason",
            "INC-19",
        ],
    );
    assert!(ok, "{msg}");
    let open = eventually(Duration::from_secs(2), async || {
        round_trip(&out, b"x").await.is_ok()
    })
    .await;
    assert!(
        open,
        "the grant made on A did not reach web (watching B) within 2 s\n--- B\n{}\n--- web\n{}",
        log(&b),
        web.proc.log()
    );

    // A changes its file: A publishes it, and B pushes it to web.
    std::fs::write(&pol, central_policy(true)).unwrap();
    let moved = eventually(Duration::from_secs(10), async || {
        policy_version(&web).await.is_some_and(|v| Some(v) != v1)
    })
    .await;
    assert!(moved, "web still has {v1:?}\n--- B\n{}", log(&b));
    assert!(
        log(&b).contains("a newly published policy is in force"),
        "{}",
        log(&b)
    );
}

/// `mayfly-ca endpoints list --json` on a replica: (SPIFFE ID, address) pairs.
fn listed(ca: &Ca) -> Vec<(String, String)> {
    let (ok, out) = ca_cli(&ca.dir, &["endpoints", "list", "--json"]);
    assert!(ok, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["spiffe_id"].as_str().unwrap().to_owned(),
                e["address"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_on_one_replica_leaves_every_replicas_registry_and_its_expiry_is_recorded_once()
 {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let pol = dir.join("central.toml");
    std::fs::write(&pol, central_policy(false)).unwrap();
    let lease = ["--endpoint-lease", "2s"];
    let a_flags = ["--endpoint-lease", "2s", "--policy", pol.to_str().unwrap()];
    let (a, b) = two_replicas(&tmp, &url, &a_flags, &lease);
    let app = echo_app("db-app").await;
    let mut db = central(&a, dir, "db", Some(&app), &[]);
    let want = vec![("spiffe://mayfly.local/db".to_owned(), db.inbound())];
    db.wait_ready().await;
    let both = eventually(Duration::from_secs(10), async || {
        listed(&a) == want && listed(&b) == want
    })
    .await;
    assert!(both, "{:?} {:?}", listed(&a), listed(&b));
    db.proc.kill();
    let gone = eventually(Duration::from_secs(10), async || {
        listed(&a).is_empty() && listed(&b).is_empty()
    })
    .await;
    assert!(gone, "{:?} {:?}", listed(&a), listed(&b));
    // Both replicas swept; the expiry is on the audit trail once.
    let db_name = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let expired = pg.psql(
        db_name,
        "SELECT count(*) FROM audit WHERE kind = 'endpoint.removed' AND line LIKE '%\"expired\"%'",
    );
    assert_eq!(expired, "1");
}

/// Data directory, store options and run options of an in-process replica.
fn replica_options(data: PathBuf, url: &str, kek: &Path) -> mayfly_ca::server::RunOptions {
    use mayfly_ca::server;
    server::RunOptions {
        data_dir: data,
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        settings: server::CaSettings::default(),
        drain: Duration::from_secs(1),
        policy_file: None,
        admin_socket: None,
        admin_group: None,
        store: server::StoreOptions {
            url: Some(url.parse().unwrap()),
            kek_file: Some(kek.to_path_buf()),
        },
        console: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_due_on_two_replicas_at_once_is_made_by_one_and_served_by_both() {
    use mayfly_ca::server;
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let kek = dir_a.join("ca.kek");
    server::init_with(
        &dir_a,
        "mayfly.local",
        mayfly_ca::authority::AuthorityConfig::default(),
        &server::StoreOptions {
            url: Some(url.parse().unwrap()),
            kek_file: Some(kek.clone()),
        },
    )
    .unwrap();
    let a = server::start(replica_options(dir_a, &url, &kek))
        .await
        .unwrap();
    let b = server::start(replica_options(dir_b, &url, &kek))
        .await
        .unwrap();
    assert_eq!(a.ca.jwks(), b.ca.jwks());
    let roots_before = a.ca.bundle().roots().len();

    // Both replicas reach the time to prepare the next root together (half the root's life).
    let when = time::OffsetDateTime::now_utc() + time::Duration::days(200);
    let (ca_a, ca_b) = (a.ca.clone(), b.ca.clone());
    let ra = tokio::task::spawn_blocking(move || ca_a.rotate(when));
    let rb = tokio::task::spawn_blocking(move || ca_b.rotate(when));
    ra.await.unwrap().unwrap();
    rb.await.unwrap().unwrap();

    // One new root, made once, served by both.
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let prepared = pg.psql(
        db,
        "SELECT count(*) FROM audit WHERE kind = 'ca.rotation' AND line LIKE '%prepared root%'",
    );
    assert_eq!(prepared, "1", "the root rotation was made more than once");
    assert_eq!(
        pg.psql(db, "SELECT count(*) FROM authorities WHERE role = 'root'"),
        (roots_before + 1).to_string()
    );
    let same = eventually(Duration::from_secs(5), async || {
        a.ca.jwks() == b.ca.jwks() && b.ca.bundle().roots().len() == roots_before + 1
    })
    .await;
    assert!(same, "the replicas serve different bundles");

    // Later only A rotates (the first root expired and leaves the bundle): B takes A's set
    // from the store within seconds and serves its bundle.
    let later = time::OffsetDateTime::now_utc() + time::Duration::days(370);
    let ca_a = a.ca.clone();
    tokio::task::spawn_blocking(move || ca_a.rotate(later))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.ca.bundle().roots().len(), 1);
    let followed = eventually(Duration::from_secs(5), async || a.ca.jwks() == b.ca.jwks()).await;
    assert!(followed, "B did not take the authorities A rotated");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_two_replicas_have_different_policy_files_the_last_published_wins_logged_and_audited()
{
    let pg = Postgres::start();
    let url = pg.create_db();
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let (file_a, file_b) = (tmp.path().join("a.toml"), tmp.path().join("b.toml"));
    std::fs::write(&file_a, central_policy(false)).unwrap();
    std::fs::write(&file_b, central_policy(true)).unwrap();
    // B starts last: its file is the last published.
    let (a, _b) = two_replicas(
        &tmp,
        &url,
        &["--policy", file_a.to_str().unwrap()],
        &["--policy", file_b.to_str().unwrap()],
    );
    let superseded = eventually(Duration::from_secs(10), async || {
        pg.psql(
            db,
            "SELECT count(*) FROM audit WHERE kind = 'policy.superseded'",
        ) == "1"
    })
    .await;
    assert!(superseded, "{}", log(&a));
    assert!(
        log(&a).contains("supersedes this replica's --policy file"),
        "{}",
        log(&a)
    );
    // What A now serves is what B published last.
    let version = |kind: &str| -> String {
        let line = pg.psql(
            db,
            &format!("SELECT line FROM audit WHERE kind = '{kind}' ORDER BY id DESC LIMIT 1"),
        );
        let v: Value = serde_json::from_str(&line).unwrap();
        v["version"].as_str().unwrap().to_owned()
    };
    assert_eq!(version("policy.superseded"), version("policy.published"));
    assert_eq!(
        pg.psql(
            db,
            "SELECT count(*) FROM audit WHERE kind = 'policy.published'"
        ),
        "2"
    );
}
