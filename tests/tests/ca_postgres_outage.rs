//! The database stops under a running control plane and comes back: meanwhile issuance and
//! audit ingest answer 503 with a reason, the bundle is served and sidecars that hold SVIDs
//! keep talking; afterwards both resume by themselves and nothing is lost (every request's
//! records arrive, once, and every chain verifies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, Sidecar, Spec, bin, curl, echo_app, eventually, policy, round_trip};

fn ca_cli(dir: &Path, url: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin("mayfly-ca"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .args(["--store", url])
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// A renewal for web over mTLS with the SVID minted into `svid`: (HTTP status, body).
fn renew(api: &str, svid: &Path) -> (String, String) {
    let key = mayfly_ca::keys::SecretKey::generate().unwrap();
    let id = mayfly_ca::id::parse_workload_id("spiffe://mayfly.local/web").unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &id).unwrap();
    let b64: String = mayfly_ca::keys::pem_encode("CSR", &csr)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let p = |f: &str| svid.join(f).to_str().unwrap().to_owned();
    let out = tempfile::NamedTempFile::new().unwrap();
    let (_, code, err) = curl(&[
        "--cacert",
        &p("bundle.pem"),
        "--cert",
        &p("svid.pem"),
        "--key",
        &p("svid.key"),
        "-o",
        out.path().to_str().unwrap(),
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "--data",
        &format!("{{\"csr\":\"{b64}\"}}"),
        &format!("https://{api}/v1/svid"),
    ]);
    if code.is_empty() {
        return (err, String::new());
    }
    (
        code,
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

/// `GET /v1/bundle`: the HTTP status.
fn bundle_status(api: &str, svid: &Path) -> String {
    let (_, code, err) = curl(&[
        "--cacert",
        svid.join("bundle.pem").to_str().unwrap(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://{api}/v1/bundle"),
    ]);
    if code.is_empty() { err } else { code }
}

fn sidecar(
    dir: &Path,
    ca: &Ca,
    me: &'static str,
    app: Option<&str>,
    out: &[(&str, &str, &str)],
) -> Sidecar {
    let unused = dir.join("unused.toml");
    let tok = ca.token_file(
        &format!("spiffe://mayfly.local/{me}"),
        &dir.join(format!("{me}.token")),
    );
    let config = Spec {
        me,
        ca: &ca.addr,
        token: &tok,
        policy: &unused,
        inbound_app: app,
        outbound: out,
        svid_ttl: None,
        extra: &format!("[audit]\nspool_dir = \"{me}-audit\"\n"),
    }
    .toml()
    .replace(&format!("[policy]\nfile = \"{}\"\n", unused.display()), "");
    Sidecar::start(dir, me, &config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgresql_is_down_issuance_says_503_traffic_flows_and_everything_resumes_by_itself()
{
    let mut pg = Postgres::start();
    let url = pg.create_db();
    let db = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let pol = dir.join("central.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let ca = Ca::start_with_store(&tmp, &url, &["--policy", pol.to_str().unwrap()]);
    let app = echo_app("orders-app").await;
    let mut orders = sidecar(dir, &ca, "orders", Some(&app), &[]);
    let orders_in = orders.inbound();
    let mut web = sidecar(dir, &ca, "web", None, &[("orders", &orders_in, "orders")]);
    let out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    let minted = dir.join("minted");
    let (ok, msg) = ca_cli(
        &ca.dir,
        &url,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://mayfly.local/web",
            "--out",
            minted.to_str().unwrap(),
        ],
    );
    assert!(ok, "{msg}");
    assert_eq!(renew(&ca.addr, &minted).0, "200");
    let mut served = 0;
    for _ in 0..3 {
        round_trip(&out, b"before").await.unwrap();
        served += 1;
    }

    // The database goes away for 20 s (the outage the issue names).
    pg.stop();
    let down_at = Instant::now();
    let (api, m) = (ca.addr.clone(), minted.clone());
    let refused = eventually(Duration::from_secs(10), async || {
        let (api, m) = (api.clone(), m.clone());
        let (code, body) = tokio::task::spawn_blocking(move || renew(&api, &m))
            .await
            .unwrap();
        code == "503" && body.contains("store_unavailable") && body.contains("store cannot write")
    })
    .await;
    assert!(refused, "{:?}", renew(&ca.addr, &minted));
    assert_eq!(
        bundle_status(&ca.addr, &minted),
        "200",
        "the bundle needs no write"
    );
    while down_at.elapsed() < Duration::from_secs(20) {
        round_trip(&out, b"during")
            .await
            .expect("traffic between sidecars holding SVIDs flows while the database is down");
        served += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let delivery_refused = eventually(Duration::from_secs(10), async || {
        web.proc.log().contains("503, store_unavailable")
    })
    .await;
    assert!(delivery_refused, "{}", web.proc.log());

    // It comes back: issuance and audit ingest resume without anyone touching anything.
    pg.restart();
    let (api, m) = (ca.addr.clone(), minted.clone());
    let back = eventually(Duration::from_secs(30), async || {
        let (api, m) = (api.clone(), m.clone());
        tokio::task::spawn_blocking(move || renew(&api, &m))
            .await
            .unwrap()
            .0
            == "200"
    })
    .await;
    assert!(back, "{:?}", renew(&ca.addr, &minted));
    for _ in 0..3 {
        round_trip(&out, b"after").await.unwrap();
        served += 1;
    }
    // Every connection's record from both sides arrives, once.
    let count = |source: &str| -> usize {
        pg.psql(
            &db,
            &format!(
                "SELECT count(*) FROM audit WHERE kind = 'connection.open' AND source = 'spiffe://mayfly.local/{source}'"
            ),
        )
        .parse()
        .unwrap()
    };
    let all = eventually(Duration::from_secs(60), async || {
        count("web") >= served && count("orders") >= served
    })
    .await;
    assert!(
        all,
        "{} {} of {served}\n{}",
        count("web"),
        count("orders"),
        web.proc.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (count("web"), count("orders")),
        (served, served),
        "duplicated records"
    );
    let (ok, msg) = ca_cli(&ca.dir, &url, &["audit", "verify"]);
    assert!(ok, "audit verify: {msg}");
}
