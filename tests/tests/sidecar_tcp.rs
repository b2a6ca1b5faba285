//! End-to-end, TCP mode: a control plane, sidecars and apps as real processes on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::{Ca, Sidecar, Spec, echo_app, eventually, policy, round_trip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Pair {
    tmp: Arc<tempfile::TempDir>,
    ca: Ca,
    web: Sidecar,
    orders: Sidecar,
    web_out: String,
    orders_policy: PathBuf,
}

/// CA + orders sidecar (inbound -> echo app) + web sidecar (outbound "orders").
async fn pair(svid_ttl: Option<&str>) -> Pair {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let dir = tmp.path();
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let orders_policy = dir.join("orders-policy.toml");
    std::fs::write(&orders_policy, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("orders.token"));
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &ca.addr,
            token: &tok,
            policy: &orders_policy,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl,
            extra: "",
        }
        .toml(),
    );
    let orders_in = orders.inbound();
    let tok = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &Spec {
            me: "web",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: None,
            outbound: &[("orders", &orders_in, "orders")],
            svid_ttl,
            extra: "",
        }
        .toml(),
    );
    let web_out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    Pair {
        tmp,
        ca,
        web,
        orders,
        web_out,
        orders_policy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_flows_through_a_sidecar_pair() {
    let p = pair(None).await;
    assert_eq!(
        round_trip(&p.web_out, b"hello orders").await.unwrap(),
        "orders-app"
    );
    // Bulk both ways, with a half-close from the client.
    let mut s = tokio::net::TcpStream::connect(&p.web_out).await.unwrap();
    let mut banner = [0u8; 11];
    s.read_exact(&mut banner).await.unwrap();
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let p2 = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&p2).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(
        back, payload,
        "every byte echoed, then EOF passed through both sidecars"
    );
    assert!(
        p.orders
            .metric("mayfly_sidecar_connections_total{direction=\"inbound\",decision=\"allow\"}")
            .await
            >= 2.0
    );
    assert!(p.web.metric("mayfly_sidecar_bytes_from_app_total").await >= 2_000_000.0);
    let (status, body) = p.orders.admin_get("/svid").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("spiffe://mayfly.local/orders") && !body.contains("PRIVATE KEY"),
        "{body}"
    );
    let (_, ready) = p.orders.admin_get("/readyz").await;
    assert!(ready.contains("\"policy_version\""), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_policy_does_not_allow_is_refused() {
    let p = pair(None).await;
    let dir = p.tmp.path();
    // db's own policy lets it call orders (egress), orders' policy does not let db in.
    let pol = dir.join("db-policy.toml");
    std::fs::write(&pol, policy(&[("db", "orders")])).unwrap();
    let tok =
        p.ca.token_file("spiffe://mayfly.local/db", &dir.join("db.token"));
    let orders_in = p.orders.proc.addrs_snapshot("mayfly-sidecar inbound");
    let mut db = Sidecar::start(
        dir,
        "db",
        &Spec {
            me: "db",
            ca: &p.ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: None,
            outbound: &[("orders", &orders_in, "orders")],
            svid_ttl: None,
            extra: "",
        }
        .toml(),
    );
    let out = db.outbound("orders");
    db.wait_ready().await;
    assert!(round_trip(&out, b"x").await.is_err());
    assert!(
        p.orders
            .metric("mayfly_sidecar_connections_total{direction=\"inbound\",decision=\"deny\"}")
            .await
            >= 1.0
    );
    // Egress: web's policy does not allow web -> db, so web's sidecar refuses before dialling.
    let web_pol = dir.join("policy.toml");
    std::fs::write(&web_pol, policy(&[("web", "orders")])).unwrap();
    assert!(p.orders.proc.log().contains("denied by policy"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expected_server_id_check_refuses_an_impostor() {
    let p = pair(None).await;
    let dir = p.tmp.path();
    // An "impostor" sidecar answers where web expects orders.
    let app = echo_app("impostor-app").await;
    let pol = dir.join("imp-policy.toml");
    std::fs::write(&pol, policy(&[("web", "impostor")])).unwrap();
    let tok =
        p.ca.token_file("spiffe://mayfly.local/impostor", &dir.join("imp.token"));
    let mut imp = Sidecar::start(
        dir,
        "impostor",
        &Spec {
            me: "impostor",
            ca: &p.ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl: None,
            extra: "",
        }
        .toml(),
    );
    let imp_in = imp.inbound();
    imp.wait_ready().await;
    let tok =
        p.ca.token_file("spiffe://mayfly.local/web", &dir.join("web2.token"));
    let mut web2 = Sidecar::start(
        dir,
        "web2",
        &Spec {
            me: "web",
            ca: &p.ca.addr,
            token: &tok,
            policy: &dir.join("policy.toml"),
            inbound_app: None,
            outbound: &[("orders", &imp_in, "orders")],
            svid_ttl: None,
            extra: "",
        }
        .toml(),
    );
    let out = web2.outbound("orders");
    web2.wait_ready().await;
    assert!(
        round_trip(&out, b"secret").await.is_err(),
        "must not talk to the impostor"
    );
    // Counted as the handshake fails; read until it shows (a loaded machine may be slow).
    let counted = eventually(Duration::from_secs(10), async || {
        web2.metric("mayfly_sidecar_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_server_id\"}").await >= 1.0
    })
    .await;
    assert!(
        counted,
        "handshake_failures_total{{reason=unexpected_server_id}} never counted"
    );
    assert!(
        web2.proc.log().contains("spiffe://mayfly.local/impostor"),
        "the log names who answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_without_a_client_cert_or_with_a_foreign_ca_is_refused() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI"
        );
        return;
    }
    let mut p = pair(None).await;
    let orders_in = p.orders.inbound();
    let run = move |args: Vec<String>| {
        let out = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &orders_in, "-brief", "-ign_eof"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = out.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let no_cert = tokio::task::spawn_blocking(move || run(vec![]))
        .await
        .unwrap();
    assert!(!no_cert.contains("orders-app"), "{no_cert}");
    // A foreign CA's SVID, same trust domain name.
    let foreign = Arc::new(tempfile::tempdir().unwrap());
    let other = Ca::start(&foreign);
    let out = foreign.path().join("svid");
    other.mint("spiffe://mayfly.local/web", &out);
    let orders_in2 = p.orders.inbound();
    let with_foreign = tokio::task::spawn_blocking(move || {
        let o = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &orders_in2,
                "-brief",
                "-ign_eof",
                "-cert",
            ])
            .arg(out.join("svid.pem"))
            .arg("-key")
            .arg(out.join("svid.key"))
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
    .await
    .unwrap();
    assert!(!with_foreign.contains("orders-app"), "{with_foreign}");
    let ok = eventually(Duration::from_secs(5), async || {
        p.orders.metric("mayfly_sidecar_handshake_failures_total{direction=\"inbound\",reason=\"no_certificate\"}").await >= 1.0
            && p.orders.metric("mayfly_sidecar_handshake_failures_total{direction=\"inbound\",reason=\"unknown_issuer\"}").await >= 1.0
    })
    .await;
    assert!(ok, "{}", p.orders.admin_get("/metrics").await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_continuous_load_drops_nothing() {
    let p = pair(Some("4s")).await;
    let start = Instant::now();
    let mut ok = 0u32;
    let mut failures = Vec::new();
    // ~20 s of back-to-back connections while both sidecars rotate every ~2 s.
    while start.elapsed() < Duration::from_secs(20) {
        match round_trip(&p.web_out, b"ping").await {
            Ok(_) => ok += 1,
            Err(e) => failures.push(e),
        }
    }
    let rotations = p
        .web
        .metric("mayfly_sidecar_svid_rotations_total{result=\"ok\"}")
        .await;
    assert!(
        failures.is_empty(),
        "{} failures out of {}: {:?}",
        failures.len(),
        ok + failures.len() as u32,
        &failures[..failures.len().min(5)]
    );
    assert!(rotations >= 6.0, "only {rotations} rotations");
    assert!(ok > 50, "only {ok} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_closed_when_the_peers_svid_expires() {
    let p = pair(Some("3s")).await;
    let mut s = tokio::net::TcpStream::connect(&p.web_out).await.unwrap();
    let mut banner = [0u8; 11];
    s.read_exact(&mut banner).await.unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4];
    let mut closed = false;
    while t0.elapsed() < Duration::from_secs(15) {
        if s.write_all(b"beat").await.is_err() {
            closed = true;
            break;
        }
        match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the connection outlived the SVIDs that opened it");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t0.elapsed()
    );
    let ended = p.orders.metric("mayfly_sidecar_connections_ended_total{direction=\"inbound\",reason=\"peer_svid_expired\"}").await
        + p.web.metric("mayfly_sidecar_connections_ended_total{direction=\"outbound\",reason=\"peer_svid_expired\"}").await;
    assert!(ended >= 1.0);
    // New connections work (the peers rotated).
    round_trip(&p.web_out, b"again").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_connections_it_no_longer_allows_and_a_bad_file_changes_nothing() {
    let p = pair(None).await;
    let mut s = tokio::net::TcpStream::connect(&p.web_out).await.unwrap();
    let mut banner = [0u8; 11];
    s.read_exact(&mut banner).await.unwrap();
    // A broken file: refused, the policy in force stays, the connection goes on.
    std::fs::write(
        &p.orders_policy,
        "version = 1\n[[rule]]\nname = \"x\"\nfrom = []\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(p.orders.proc.log().contains("policy file refused"));
    // A valid policy that no longer allows web: the open connection is closed within ~1 s.
    std::fs::write(&p.orders_policy, policy(&[("db", "orders")])).unwrap();
    let t0 = Instant::now();
    let closed = eventually(Duration::from_secs(5), async || {
        let _ = s.write_all(b"ping").await;
        matches!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    })
    .await;
    assert!(closed, "connection must be closed by the policy change");
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert!(
        round_trip(&p.web_out, b"x").await.is_err(),
        "new connections are refused"
    );
    assert!(p.orders.metric("mayfly_sidecar_connections_ended_total{direction=\"inbound\",reason=\"policy_revoked\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let mut p = pair(None).await;
    round_trip(&p.web_out, b"x").await.unwrap();
    assert!(p.web.proc.stop().success());
    assert!(p.orders.proc.stop().success());
    assert!(p.ca.proc.as_mut().unwrap().stop().success());
}
