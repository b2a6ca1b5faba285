//! Sidecars that know several control-plane replicas: two `mayfly-ca run` processes on one
//! PostgreSQL database, three sidecars configured with both addresses; `kill -9` of the replica
//! they use, under traffic. And the address rotation of `CaClient` against real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mayfly_ca::client::{CaClient, ClientError};
use mayfly_ca::id::parse_trust_domain;
use mayfly_tests::postgres::Postgres;
use mayfly_tests::{Ca, Sidecar, bin, eventually, http_app, http_get, policy};

/// An address on 127.0.0.1 where nothing listens.
fn refusing() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A TCP server that answers every connection with plain text (no TLS); counts connections.
async fn not_tls() -> (String, Arc<AtomicU64>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            s2.fetch_add(1, Ordering::SeqCst);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    (addr, seen)
}

/// A TLS server (a certificate of another CA: first contact does not check it) that answers
/// every request `503`, as a replica without its database does; counts requests.
async fn unavailable() -> (String, Arc<AtomicU64>) {
    use tokio_rustls::rustls;
    let (chain, key) = mayfly_ca::testing::TestCa::new("mayfly.local").control_plane_svid();
    let mut cfg =
        rustls::ServerConfig::builder_with_provider(mayfly_ca::identity::crypto::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key.private_key_der())
            .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let (tls, seen) = (tls.clone(), s2.clone());
            tokio::spawn(async move {
                let Ok(s) = tls.accept(s).await else { return };
                let svc = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let body =
                            r#"{"error":"the store is unavailable","reason":"store_unavailable"}"#;
                        let mut resp = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        ));
                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answering_503_is_passed_over_for_the_next_and_alone_its_refusal_is_returned() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let pin = ca.pin();
    let td = parse_trust_domain("mayfly.local").unwrap();
    let (sick, asked) = unavailable().await;
    let client = CaClient::with_addresses(vec![sick.clone(), ca.addr.clone()], td.clone()).unwrap();
    client.fetch_pinned_root(&pin).await.unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(
        client.address_in_use().map(|a| a.to_string()),
        Some(ca.addr.clone())
    );
    // Alone, its answer is the error, as with one address before.
    let alone = CaClient::new(sick, td).unwrap();
    match alone.fetch_pinned_root(&pin).await {
        Err(ClientError::Refused { status, reason, .. }) => {
            assert_eq!((status, reason.as_str()), (503, "store_unavailable"));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_moves_past_replicas_that_refuse_or_fail_tls_and_remembers_the_one_that_answered()
 {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let pin = ca.pin();
    let td = parse_trust_domain("mayfly.local").unwrap();
    let (garbage, garbage_seen) = not_tls().await;
    let down = refusing();
    let client = CaClient::with_addresses(
        vec![down.clone(), garbage.clone(), ca.addr.clone()],
        td.clone(),
    )
    .unwrap();
    assert_eq!(client.address_in_use(), None);
    // The first refuses, the second fails the handshake: the third answers.
    let root = client.fetch_pinned_root(&pin).await.unwrap();
    assert_eq!(root.roots().len(), 1);
    assert_eq!(
        client.address_in_use().map(|a| a.to_string()),
        Some(ca.addr.clone())
    );
    assert_eq!(garbage_seen.load(Ordering::SeqCst), 1);
    assert_eq!(client.failovers(), 0, "a first answer is not a failover");
    // The one that answered is tried first next time, by every clone.
    client.clone().fetch_pinned_root(&pin).await.unwrap();
    assert_eq!(garbage_seen.load(Ordering::SeqCst), 1);

    // All refusing: the error names each address.
    let (a, b) = (refusing(), refusing());
    let none = CaClient::with_addresses(vec![a.clone(), b.clone()], td.clone()).unwrap();
    let e = none.fetch_pinned_root(&pin).await.unwrap_err();
    assert!(matches!(e, ClientError::NoReplica { .. }), "{e:?}");
    assert!(e.is_transient());
    let shown = e.to_string();
    assert!(shown.contains(&a) && shown.contains(&b), "{shown}");
    // A single address keeps its own error, as before.
    let one = CaClient::new(a.clone(), td.clone()).unwrap();
    let e = one.fetch_pinned_root(&pin).await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    // And the comma form is the list form.
    let listed = CaClient::new(format!("{a},{}", ca.addr), td).unwrap();
    listed.fetch_pinned_root(&pin).await.unwrap();
}

fn cli(args: &[&str]) -> String {
    let o = Command::new(bin("mayfly-ca")).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "mayfly-ca {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A sidecar following the control plane's policy at both `cps`, HTTP throughout.
fn sidecar_toml(
    me: &str,
    cps: &[&str],
    token: &Path,
    app: Option<&str>,
    out: Option<(&str, &str)>,
) -> String {
    let addrs: Vec<String> = cps.iter().map(|a| format!("\"{a}\"")).collect();
    let mut s = format!(
        "spiffe_id = \"spiffe://mayfly.local/{me}\"\n\n[control_plane]\naddress = [{}]\ntoken_file = \"{}\"\nsvid_ttl = \"8s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        addrs.join(", "),
        token.display()
    );
    if let Some(app) = app {
        s.push_str(&format!(
            "\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"http\"\n"
        ));
    }
    if let Some((name, remote)) = out {
        s.push_str(&format!(
            "\n[[outbound]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nremote = \"{remote}\"\nspiffe_id = \"spiffe://mayfly.local/{name}\"\nprotocol = \"http\"\n"
        ));
    }
    s
}

/// The control-plane address a sidecar's metrics show in use.
async fn in_use(s: &Sidecar) -> Option<String> {
    let (_, body) = s.admin_get("/metrics").await;
    body.lines()
        .find(|l| l.starts_with("mayfly_sidecar_control_plane_address{") && l.ends_with(" 1"))
        .and_then(|l| l.split('"').nth(1))
        .map(str::to_owned)
}

async fn policy_version(s: &Sidecar) -> String {
    let (_, body) = s.admin_get("/readyz").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["policy_version"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_in_use_under_traffic_fails_no_request_and_loses_no_record() {
    let pg = Postgres::start();
    let url = pg.create_db();
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders"), ("orders", "db")])).unwrap();
    let pol_s = pol.to_str().unwrap();
    let mut first = Ca::start_with_store(&tmp, &url, &["--policy", pol_s]);
    // The second replica: its own data directory with the first's key-encryption key.
    let dir2 = dir.join("ca2");
    std::fs::create_dir(&dir2).unwrap();
    std::fs::set_permissions(&dir2, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::copy(first.dir.join("ca.kek"), dir2.join("ca.kek")).unwrap();
    std::fs::set_permissions(dir2.join("ca.kek"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let second = Ca::start_with_existing(
        &tmp,
        &dir2,
        "127.0.0.1:0",
        &["--store", &url, "--policy", pol_s],
    );
    let cps = [first.addr.as_str(), second.addr.as_str()];

    let token = |id: &str| {
        first.token_file(
            &format!("spiffe://mayfly.local/{id}"),
            &dir.join(format!("{id}.token")),
        )
    };
    let (db_app, orders_app) = (http_app("db").await, http_app("orders").await);
    let mut db = Sidecar::start(
        dir,
        "db",
        &sidecar_toml("db", &cps, &token("db"), Some(&db_app), None),
    );
    let db_in = db.inbound();
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &sidecar_toml(
            "orders",
            &cps,
            &token("orders"),
            Some(&orders_app),
            Some(("db", &db_in)),
        ),
    );
    let orders_in = orders.inbound();
    let to_db = orders.outbound("db");
    let mut web = Sidecar::start(
        dir,
        "web",
        &sidecar_toml(
            "web",
            &cps,
            &token("web"),
            None,
            Some(("orders", &orders_in)),
        ),
    );
    let to_orders = web.outbound("orders");
    for s in [&db, &orders, &web] {
        s.wait_ready().await;
    }
    // Every sidecar uses one replica (the first listed, which answers).
    let mut used = String::new();
    for s in [&db, &orders, &web] {
        let ok = eventually(Duration::from_secs(20), async || in_use(s).await.is_some()).await;
        assert!(
            ok,
            "no control-plane address in the metrics:\n{}",
            s.proc.log()
        );
        let a = in_use(s).await.unwrap();
        assert!(cps.contains(&a.as_str()), "{a} is not a replica");
        if used.is_empty() {
            used = a;
        } else {
            assert_eq!(a, used, "the sidecars use different replicas");
        }
    }
    let mut second = second;
    let (doomed, survivor) = if used == first.addr {
        (&mut first, &second)
    } else {
        (&mut second, &first)
    };

    // Continuous traffic through both hops, counted: a bounded loop until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let (to_orders, to_db) = (to_orders.clone(), to_db.clone());
        tokio::spawn(async move {
            let (mut served, mut failed) = (0u64, Vec::new());
            for i in 0..20_000u32 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let target = if i % 2 == 0 { &to_orders } else { &to_db };
                let (status, body) = http_get(target, &format!("/r/{i}")).await;
                if status == 200 {
                    served += 1;
                } else {
                    failed.push(format!("request {i} to {target}: {status} {body}"));
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            (served, failed)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;

    // kill -9 of the replica in use.
    doomed.proc.as_mut().unwrap().kill();
    let mut before = Vec::new();
    for s in [&db, &orders, &web] {
        before.push(s.svid().await.unwrap().0);
    }
    // Everything moves to the survivor: renewals (new serials, which only it can issue now),
    // and the address in use with a failover counted.
    for (s, serial) in [&db, &orders, &web].into_iter().zip(&before) {
        let renewed = eventually(Duration::from_secs(20), async || {
            s.svid().await.is_some_and(|(now, _)| &now != serial)
        })
        .await;
        assert!(renewed, "no renewal after the kill:\n{}", s.proc.log());
        let moved = eventually(Duration::from_secs(20), async || {
            in_use(s).await.as_deref() == Some(survivor.addr.as_str())
        })
        .await;
        assert!(moved, "still on the dead replica:\n{}", s.proc.log());
        assert!(s.metric("mayfly_sidecar_control_plane_failovers").await >= 1.0);
    }
    // The watch streams moved: a policy change the survivor sees reaches every sidecar.
    let mut versions = Vec::new();
    for s in [&db, &orders, &web] {
        versions.push(policy_version(s).await);
    }
    std::fs::write(
        &pol,
        policy(&[("web", "orders"), ("orders", "db"), ("web", "db")]),
    )
    .unwrap();
    for (s, v) in [&db, &orders, &web].into_iter().zip(&versions) {
        let changed = eventually(Duration::from_secs(20), async || {
            let now = policy_version(s).await;
            !now.is_empty() && &now != v
        })
        .await;
        assert!(
            changed,
            "the policy change did not arrive:\n{}",
            s.proc.log()
        );
    }
    // More renewals on the survivor while the traffic goes on.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    let (served, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} failed requests: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(served > 100, "only {served} requests");

    // Audit delivery went on: every request is in the store once, on each side.
    let store_flags = [
        "--data-dir",
        survivor.dir.to_str().unwrap(),
        "--store",
        &url,
    ];
    let count = |direction: &str| {
        let mut args = vec![
            "audit",
            "query",
            "--kind",
            "http.request",
            "--json",
            "--limit",
            "1000000",
        ];
        args.extend_from_slice(&store_flags);
        cli(&args)
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .is_ok_and(|v| v["direction"] == direction)
            })
            .count() as u64
    };
    let delivered = eventually(Duration::from_secs(30), async || {
        count("inbound") >= served && count("outbound") >= served
    })
    .await;
    assert!(
        delivered,
        "records missing: {} inbound, {} outbound for {served} requests",
        count("inbound"),
        count("outbound")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count("inbound"), served, "inbound records");
    assert_eq!(count("outbound"), served, "outbound records");
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(&store_flags);
    cli(&args);
}
