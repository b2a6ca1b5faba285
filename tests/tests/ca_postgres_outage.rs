//! The database stops under a running control plane and comes back: meanwhile issuance and
//! audit ingest answer 503 with a reason, the bundle is served and sidecars that hold SVIDs
//! keep talking; afterwards both resume by themselves and nothing is lost (every request's
//! records arrive, once, and every chain verifies).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::people::{self, central};
use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, curl, echo_app, eventually, policy, renew_web, round_trip};

/// `mayfly-ca ARGS --store URL --data-dir DIR`: (success, stdout + stderr).
fn ca_cli(dir: &Path, url: &str, args: &[&str]) -> (bool, String) {
    let mut all = args.to_vec();
    all.extend(["--store", url]);
    people::ca_cli(dir, &all)
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
    let mut orders = central(&ca, dir, "orders", Some(&app), &[]);
    let orders_in = orders.inbound();
    let mut web = central(&ca, dir, "web", None, &[("orders", &orders_in, "orders")]);
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
    assert_eq!(renew_web(&ca.addr, &minted).0, "200");
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
        let (code, body) = tokio::task::spawn_blocking(move || renew_web(&api, &m))
            .await
            .unwrap();
        code == "503" && body.contains("store_unavailable") && body.contains("store cannot write")
    })
    .await;
    assert!(refused, "{:?}", renew_web(&ca.addr, &minted));
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
        tokio::task::spawn_blocking(move || renew_web(&api, &m))
            .await
            .unwrap()
            .0
            == "200"
    })
    .await;
    assert!(back, "{:?}", renew_web(&ca.addr, &minted));
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
