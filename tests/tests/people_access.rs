//! People under zero standing privilege, end to end with the real control plane, a real
//! sidecar and the real `mayfly` CLI: a person holds nothing until another person approves a
//! request allowed by the policy's `[[access.rule]]`s; `mayfly connect` then reaches the
//! service with the user SVID, the sidecar records the person in its audit records and cuts
//! the connection when the grant ends. Admin operations over mTLS need an approved admin
//! grant; the admin socket is break-glass and recorded as such.
//!
//! People here are minted (`people::sign_in`), not signed in through the identity provider:
//! these tests want groups of their choosing (`sre`, `sre-leads`, `leads`) and user SVIDs
//! shorter than the control plane's default, cheaply. The same path with the real sign-in
//! (device flow against tests/oidc) is tests/people_e2e.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::people::{audit, ca_cli, central_sidecar, held_until_cut, json_of, sign_in};
use mayfly_tests::{Ca, Proc, Sidecar, echo_app, eventually, round_trip};

const DB: &str = "spiffe://mayfly.local/db";

const POLICY: &str = r#"version = 1

[[access.rule]]
groups = ["oncall"]
to = ["spiffe://mayfly.local/db"]
max_ttl = "1m"
approvals = 1
approvers = ["db-admins"]

[[access.rule]]
groups = ["sre"]
role = "admin"
max_ttl = "5m"
approvers = ["sre-leads"]
"#;

/// A control plane with the policy above and `db`'s sidecar (central policy) before an echo
/// app: (control plane, sidecar, its inbound address).
async fn mesh(tmp: &Arc<tempfile::TempDir>) -> (Ca, Sidecar, String) {
    let pol = tmp.path().join("policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    let ca = Ca::start_with(tmp, &["--policy", pol.to_str().unwrap()]);
    let app = echo_app("db-app").await;
    let mut db = central_sidecar(&ca, tmp.path(), "db", &app, false).await;
    let inbound = db.inbound();
    (ca, db, inbound)
}

/// The console's HTTP status for the person whose minted SVID is in `svid_dir`.
fn console_status(addr: &str, svid_dir: &Path) -> String {
    let file = |f: &str| svid_dir.join(f).display().to_string();
    let (_, out, err) = mayfly_tests::curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--cacert",
        &file("bundle.pem"),
        "--cert",
        &file("svid.pem"),
        "--key",
        &file("svid.key"),
        &format!("https://{addr}/graph"),
    ]);
    assert!(!out.is_empty(), "curl: {err}");
    out.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_reaches_a_service_only_through_another_persons_approval_until_the_grant_ends() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let (ca, _db, inbound) = mesh(&tmp).await;
    let alice = sign_in(&ca, tmp.path(), "alice", &["oncall"], "5m");
    let bob = sign_in(&ca, tmp.path(), "bob", &["db-admins"], "5m");
    let carol = sign_in(&ca, tmp.path(), "carol", &["devs"], "5m");

    // No standing access: the sidecar refuses alice's SVID, and `connect` finds nothing.
    let refused = mayfly_tests::people::dial_as(&alice, DB, &inbound).await;
    assert!(refused.is_err(), "no grant, no access: {refused:?}");
    let (ok, _, err) = alice.run(&["connect", DB]);
    assert!(!ok && err.contains("no active grant"), "{err}");

    // Outside the allowed groups: refused with the policy's reason.
    let (ok, _, err) = carol.run(&[
        "access", "request", "--to", DB, "--ttl", "5s", "--reason", "x",
    ]);
    assert!(!ok && err.contains("may not ask for this"), "{err}");

    // Alice asks; she cannot approve her own request; bob can.
    let (ok, out, err) = alice.run(&[
        "access", "request", "--to", DB, "--ttl", "8s", "--reason", "INC-7", "--json",
    ]);
    assert!(ok, "{err}");
    let g = json_of(&out);
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["state"], "pending");
    assert_eq!(g["from"], alice.id.as_str());
    let (ok, _, err) = alice.run(&["access", "approve", &id]);
    assert!(!ok && err.contains("cannot approve it"), "{err}");
    let (ok, _, err) = carol.run(&["access", "approve", &id]);
    assert!(!ok && err.contains("not in an approver group"), "{err}");
    let (ok, out, _) = bob.run(&["access", "list", "--json"]);
    assert!(
        ok && out.contains(&id),
        "bob sees what he may approve: {out}"
    );
    let (ok, out, err) = bob.run(&["access", "approve", &id, "--json"]);
    assert!(ok, "{err}");
    let g = json_of(&out);
    assert_eq!(g["state"], "active");
    assert_eq!(g["access"]["approved_by"][0], bob.id.as_str());

    // `mayfly connect` tunnels to the sidecar, which admits alice by the grant.
    let mut cmd = alice.command();
    cmd.args(["connect", DB, "--listen", "127.0.0.1:0"]);
    let mut connect = Proc::spawn(cmd, &["mayfly connect"]);
    let local = connect.addr("mayfly connect listening");
    let t0 = Instant::now();
    let open = eventually(Duration::from_secs(10), async || {
        round_trip(&local, b"SELECT 1").await.is_ok()
    })
    .await;
    assert!(
        open,
        "bytes must flow once the grant is pushed:\n{}",
        connect.log()
    );

    // Cut when the grant ends, by the sidecar's clock.
    let cut = held_until_cut(&local, Duration::from_secs(30))
        .await
        .expect("the connection must be cut at the grant's expiry");
    assert!(
        cut.duration_since(t0) < Duration::from_secs(8 + 4),
        "cut late"
    );
    assert!(
        round_trip(&local, b"x").await.is_err(),
        "denied after expiry"
    );
    connect.kill();

    // Every record names alice as the source, under her grant; `--user` finds her story.
    let dir = ca.dir.clone();
    let found = eventually(Duration::from_secs(15), async || {
        audit(&dir, &["--source", &alice.id, "--kind", "connection.open"])
            .iter()
            .any(|r| r["peer_id"] == alice.id.as_str() && r["grant"] == id.as_str())
    })
    .await;
    assert!(found, "the sidecar's records name alice and her grant");
    let denied = audit(
        &dir,
        &["--source", &alice.id, "--kind", "connection.denied"],
    );
    assert!(
        !denied.is_empty(),
        "the refusal before the grant is recorded"
    );
    let mine = audit(&dir, &["--user", &alice.id]);
    let kinds: Vec<&str> = mine.iter().filter_map(|r| r["kind"].as_str()).collect();
    for k in [
        "access.requested",
        "access.refused",
        "access.approved",
        "connection.open",
    ] {
        assert!(
            kinds.contains(&k),
            "{k} missing from alice's records: {kinds:?}"
        );
    }
    let approved = mine
        .iter()
        .find(|r| r["kind"] == "access.approved")
        .unwrap();
    assert_eq!(approved["approver"], bob.id.as_str());
    assert_eq!(approved["reason"], "INC-7");
    let bobs = audit(&dir, &["--user", &bob.id]);
    assert!(
        bobs.iter().any(|r| r["kind"] == "access.approved"),
        "{bobs:?}"
    );
    assert!(
        !bobs.iter().any(|r| r["kind"] == "connection.open"),
        "bob reached nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_over_mtls_need_an_approved_admin_grant_and_the_socket_is_break_glass() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let pol = tmp.path().join("policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    // The console over TLS, its allow list naming nobody here: only an admin grant opens it.
    let ui = mayfly_tests::free_port();
    let ca = Ca::start_with(
        &tmp,
        &[
            "--policy",
            pol.to_str().unwrap(),
            "--ui-listen",
            &ui,
            "--ui-tls",
            "--ui-allow",
            "spiffe://mayfly.local/nobody",
        ],
    );
    let dave = sign_in(&ca, tmp.path(), "dave", &["sre"], "5m");
    let erin = sign_in(&ca, tmp.path(), "erin", &["sre-leads"], "5m");
    let console = |name: &str| console_status(&ui, &tmp.path().join(format!("{name}-svid")));
    assert_eq!(console("dave"), "403", "no admin grant, no console");

    let (ok, _, err) = dave.run(&["admin", r#"{"op": "grant.list"}"#]);
    assert!(!ok && err.contains("no active admin grant"), "{err}");

    // The admin role cannot be asked for as a service: the reserved ID is refused.
    let (ok, _, err) = dave.run(&[
        "access",
        "request",
        "--to",
        "spiffe://mayfly.local/mayfly/admin",
        "--ttl",
        "1m",
        "--reason",
        "x",
    ]);
    assert!(!ok && err.contains("reserved"), "{err}");

    let (ok, out, err) = dave.run(&[
        "access", "request", "--role", "admin", "--ttl", "2m", "--reason", "INC-9", "--json",
    ]);
    assert!(ok, "{err}");
    let id = json_of(&out)["id"].as_str().unwrap().to_owned();
    let (ok, _, err) = dave.run(&["admin", r#"{"op": "grant.list"}"#]);
    assert!(
        !ok && err.contains("no active admin grant"),
        "pending is not active: {err}"
    );
    let (ok, _, err) = erin.run(&["access", "approve", &id]);
    assert!(ok, "{err}");
    let (ok, out, err) = dave.run(&["admin", r#"{"op": "grant.list"}"#]);
    assert!(ok, "{err}");
    assert!(out.contains(&id), "{out}");
    assert_eq!(console("dave"), "200", "the admin grant opens the console");
    // The policy in force and the audit export, over mTLS too.
    let (ok, out, err) = dave.run(&["admin", r#"{"op": "policy.show"}"#]);
    assert!(ok && out.contains("access.rule"), "{out}{err}");
    let (ok, out, err) = dave.run(&[
        "admin",
        r#"{"op": "audit.query", "kind": "access.approved", "limit": 10}"#,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&id) && out.contains(erin.id.as_str()),
        "the export shows erin's approval of {id}: {out}"
    );
    let (ok, _, err) = dave.run(&["admin", r#"{"op": "audit.query", "limit": 0}"#]);
    assert!(!ok && err.contains("limit"), "{err}");
    assert_eq!(console("erin"), "403", "erin holds no admin grant");
    // Erin holds no admin grant of her own.
    let (ok, _, err) = erin.run(&["admin", r#"{"op": "token.list"}"#]);
    assert!(!ok && err.contains("no active admin grant"), "{err}");

    // Revoked: refused again.
    let (ok, _, err) = dave.run(&["access", "revoke", &id]);
    assert!(ok, "{err}");
    let (ok, _, err) = dave.run(&["admin", r#"{"op": "grant.list"}"#]);
    assert!(!ok && err.contains("no active admin grant"), "{err}");
    assert_eq!(console("dave"), "403", "revoked: the console closes again");

    // The socket still works, and each use is recorded as break-glass with the OS user.
    let (ok, out) = ca_cli(&ca.dir, &["grant", "list"]);
    assert!(ok, "{out}");
    let glass = audit(&ca.dir, &["--kind", "admin.break_glass"]);
    assert!(
        glass
            .iter()
            .any(|r| r["op"] == "grant.list" && r["os_user"].is_string()),
        "{glass:?}"
    );
    let ops = audit(&ca.dir, &["--kind", "admin.operation"]);
    assert!(
        ops.iter()
            .any(|r| r["user"] == dave.id.as_str() && r["op"] == "grant.list"),
        "{ops:?}"
    );
    let refused = audit(&ca.dir, &["--kind", "admin.refused"]);
    assert!(
        refused.iter().any(|r| r["user"] == erin.id.as_str()),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_an_http_service_through_the_tunnel_within_the_grant_until_revoked_and_the_svid_ends()
 {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let pol = tmp.path().join("policy.toml");
    std::fs::write(
        &pol,
        "version = 1\n[[access.rule]]\ngroups = [\"oncall\"]\nto = [\"spiffe://mayfly.local/api\"]\nmethods = [\"GET\"]\nmax_ttl = \"5m\"\napprovers = [\"leads\"]\n",
    )
    .unwrap();
    let ca = Ca::start_with(&tmp, &["--policy", pol.to_str().unwrap()]);
    let app = mayfly_tests::http_app("api-app").await;
    let _api = central_sidecar(&ca, tmp.path(), "api", &app, true).await; // held until the end
    let alice = sign_in(&ca, tmp.path(), "alice", &["oncall"], "30s");
    let bob = sign_in(&ca, tmp.path(), "bob", &["leads"], "5m");
    let api_id = "spiffe://mayfly.local/api";

    let (ok, out, err) = alice.run(&[
        "access", "request", "--to", api_id, "--ttl", "2m", "--reason", "INC-8", "--json",
    ]);
    assert!(ok, "{err}");
    let g = json_of(&out);
    assert_eq!(
        g["methods"][0], "GET",
        "a request naming no methods gets the rule's"
    );
    let id = g["id"].as_str().unwrap().to_owned();
    let (ok, _, err) = bob.run(&["access", "approve", &id]);
    assert!(ok, "{err}");

    let mut cmd = alice.command();
    cmd.args(["connect", api_id, "--listen", "127.0.0.1:0"]);
    let mut connect = Proc::spawn(cmd, &["mayfly connect"]);
    let local = connect.addr("mayfly connect listening");
    let url = format!("http://{local}/reports/1");
    let get = eventually(Duration::from_secs(10), async || {
        let (ok, body, _) = mayfly_tests::curl(&[&url]);
        ok && body.contains("\"method\":\"GET\"")
    })
    .await;
    assert!(get, "curl through the tunnel:\n{}", connect.log());
    let (_, code, _) =
        mayfly_tests::curl(&["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", &url]);
    assert_eq!(code, "403", "the grant allows GET only");

    // Revoked by the approver: refused at once.
    let (ok, _, err) = bob.run(&["access", "revoke", &id]);
    assert!(ok, "{err}");
    let refused = eventually(Duration::from_secs(10), async || {
        let (_, code, _) = mayfly_tests::curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]);
        code != "200"
    })
    .await;
    assert!(refused, "a revoked grant admits nothing");

    // The tunnel ends with the user SVID.
    let ended = eventually(Duration::from_secs(40), async || {
        matches!(connect.child.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(ended, "connect must stop when the user SVID expires");
    assert!(
        connect.log().contains("user SVID expired"),
        "{}",
        connect.log()
    );
}
