//! Zero standing privilege end to end: central policy pushed to sidecars, a call denied, a JIT
//! grant requested and approved by another admin, the call passing, the grant expiring (on
//! the sidecar's own clock, even with the control plane down) and the connection it admitted
//! cut; revocation; the whole story in the audit trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::people::{central, held_until_cut};
use mayfly_tests::{Ca, bin, echo_app, eventually, free_port, round_trip};

const POLICY: &str = r#"version = 1
[grants]
max_ttl = "30s"
approvals = 1

[[rule]]
name = "orders-uses-db"
from = ["spiffe://mayfly.local/orders"]
to = ["spiffe://mayfly.local/db"]
"#;

fn ca_as(user: Option<&str>, dir: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = match user {
        None => std::process::Command::new(bin("mayfly-ca")),
        Some(u) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={u}"),
                &format!("--regid={u}"),
                "--clear-groups",
            ])
            .arg(bin("mayfly-ca"));
            c
        }
    };
    let o = cmd.args(args).arg("--data-dir").arg(dir).output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_opens_a_denied_call_then_expires_and_cuts_the_connection() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipping: needs root to act as a second admin (setpriv)");
        return;
    }
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let pol = tmp.path().join("central-policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    let port = free_port();
    let mut ca = Ca::start_with(
        &tmp,
        &[
            "--policy",
            pol.to_str().unwrap(),
            "--admin",
            "root",
            "--admin",
            "nobody",
        ],
    );
    ca.proc.as_mut().unwrap().stop();
    let mut ca2 = Ca::start_with_existing(
        &tmp,
        &ca.dir,
        &port,
        &[
            "--policy",
            pol.to_str().unwrap(),
            "--admin",
            "root",
            "--admin",
            "nobody",
        ],
    );
    let dir = ca2.dir.clone();
    // Let the second admin reach the socket; SO_PEERCRED still decides who may do what.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        dir.join("admin.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();

    let app = echo_app("db-app").await;
    let mut db = central(&ca2, tmp.path(), "db", Some(&app), &[]);
    let db_in = db.inbound();
    let mut web = central(&ca2, tmp.path(), "web", None, &[("db", &db_in, "db")]);
    let out = web.outbound("db");
    db.wait_ready().await;
    web.wait_ready().await;
    let (_, ready) = web.admin_get("/readyz").await;
    assert!(
        ready.contains("\"policy_version\":\""),
        "the sidecar reports the pushed policy: {ready}"
    );

    // 1. Denied: no standing privilege for web -> db.
    assert!(round_trip(&out, b"x").await.is_err());

    // 2. Refused requests: no reason, TTL over the cap; self-approval refused.
    let (ok, msg) = ca_as(
        None,
        &dir,
        &[
            "grant",
            "request",
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/db",
            "--ttl",
            "1h",
            "--reason",
            "INC-42",
        ],
    );
    assert!(!ok && msg.contains("max_ttl"), "{msg}");
    let (ok, msg) = ca_as(
        None,
        &dir,
        &[
            "grant",
            "request",
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/db",
            "--ttl",
            "6s",
            "--reason",
            "INC-42",
            "--json",
        ],
    );
    assert!(ok, "{msg}");
    let g: serde_json::Value = serde_json::from_str(&msg).unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["state"], "pending");
    let (ok, msg) = ca_as(None, &dir, &["grant", "approve", &id]);
    assert!(!ok && msg.contains("cannot approve"), "{msg}");
    assert!(
        round_trip(&out, b"x").await.is_err(),
        "a pending grant allows nothing"
    );

    // 3. Another admin approves: the call passes within a second.
    let (ok, msg) = ca_as(Some("65534"), &dir, &["grant", "approve", &id]);
    assert!(ok, "{msg}");
    let t0 = Instant::now();
    let open = eventually(Duration::from_secs(10), async || {
        round_trip(&out, b"x").await.is_ok()
    })
    .await;
    assert!(open, "the approved grant must reach the sidecars");
    let propagation = t0.elapsed();
    assert!(
        propagation < Duration::from_secs(2),
        "propagation took {propagation:?}"
    );

    // 4. A long-lived connection admitted by the grant; the control plane goes down; the grant
    //    still ends on time by the sidecars' clocks and the connection is cut.
    let held = tokio::spawn({
        let out = out.clone();
        async move { held_until_cut(&out, Duration::from_secs(20)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ca2.proc.as_mut().unwrap().kill();
    let cut_at = held
        .await
        .unwrap()
        .expect("the connection must be cut when the grant expires");
    let expires = g["ttl_secs"].as_i64().unwrap();
    assert!(
        cut_at.duration_since(t0) < Duration::from_secs(expires as u64 + 2),
        "cut late"
    );
    assert!(
        round_trip(&out, b"x").await.is_err(),
        "denied again after expiry"
    );

    // 5. The audit trail tells the story: request, approval, expiry, and the decisions made
    //    under the grant name it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    ca2.run(&port);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        dir.join("admin.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let delivered = eventually(Duration::from_secs(30), async || {
        let (_, m) = web.admin_get("/metrics").await;
        m.lines().any(|l| l == "mayfly_sidecar_audit_spool_bytes 0")
    })
    .await;
    assert!(
        delivered,
        "{}\n{}",
        web.admin_get("/metrics")
            .await
            .1
            .lines()
            .filter(|l| l.contains("audit"))
            .collect::<Vec<_>>()
            .join("\n"),
        web.proc
            .log()
            .lines()
            .filter(|l| l.contains("audit") || l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Offline commands refuse a data directory others can enter: close it again meanwhile.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (ok, q) = ca_as(None, &dir, &["audit", "query", "--json", "--grant", &id]);
    assert!(ok, "{q}");
    assert!(
        q.lines().any(|l| l.contains("connection.open")),
        "decisions under the grant name it: {q}"
    );
    let (_, all) = ca_as(None, &dir, &["audit", "query", "--json"]);
    for kind in [
        "grant.requested",
        "grant.self_approval_refused",
        "grant.approved",
        "grant.expired",
    ] {
        let found = eventually(Duration::from_secs(8), async || {
            ca_as(None, &dir, &["audit", "query", "--json", "--kind", kind])
                .1
                .contains(&id)
        })
        .await;
        assert!(found, "no {kind} event: {all}");
    }
    let (ok, v) = ca_as(None, &dir, &["audit", "verify"]);
    assert!(ok, "{v}");

    // 6. Revocation cuts at once.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let (ok, msg) = ca_as(
        None,
        &dir,
        &[
            "grant",
            "request",
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/db",
            "--ttl",
            "30s",
            "--reason",
            "INC-43",
            "--json",
        ],
    );
    assert!(ok, "{msg}");
    let id2 = serde_json::from_str::<serde_json::Value>(&msg).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ca_as(Some("65534"), &dir, &["grant", "approve", &id2]).0);
    let opened = eventually(Duration::from_secs(10), async || {
        round_trip(&out, b"x").await.is_ok()
    })
    .await;
    assert!(
        opened,
        "the approved grant {id2} must open the call:\n--- web\n{}\n--- db\n{}",
        web.proc.log(),
        db.proc.log()
    );
    let held = tokio::spawn({
        let out = out.clone();
        async move { held_until_cut(&out, Duration::from_secs(20)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t1 = Instant::now();
    assert!(ca_as(None, &dir, &["grant", "revoke", &id2]).0);
    let cut = held
        .await
        .unwrap()
        .expect("revocation must cut the connection");
    assert!(
        cut.duration_since(t1) < Duration::from_secs(2),
        "revocation took {:?}",
        cut.duration_since(t1)
    );
    let (_, list) = ca_as(None, &dir, &["grant", "list"]);
    assert!(
        list.contains("revoked") && list.contains("expired"),
        "{list}"
    );
    drop(ca);
}
