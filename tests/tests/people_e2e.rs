//! A person's whole path with the real sign-in: a real OpenID Connect provider (npm's
//! `oidc-provider`, tests/oidc), the control plane trusting it (`--oidc-issuer`), a policy
//! whose `[[access.rule]]` lets `oncall` ask for `db` with `db-admins` approving, and `db`'s
//! real sidecar before an echo app. alice (`oncall`) and bob (`db-admins`) sign in with
//! `mayfly login` by the device flow; nobody reaches db without a grant; alice asks, cannot
//! approve herself, bob approves; `mayfly connect` carries alice's bytes to db; the audit
//! names alice, bob as approver, alice's groups and reason; the connection is cut when the
//! grant ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mayfly_tests::oidc::{CLIENT_ID, Idp};
use mayfly_tests::people::{audit, central_sidecar, dial_as, held_until_cut, json_of, log_in};
use mayfly_tests::{Ca, Proc, echo_app, eventually, round_trip};
use serde_json::json;

const DB: &str = "spiffe://mayfly.local/db";

const POLICY: &str = r#"version = 1

[[access.rule]]
groups = ["oncall"]
to = ["spiffe://mayfly.local/db"]
max_ttl = "1m"
approvals = 1
approvers = ["db-admins"]
"#;

/// The grant's life: short, so the cut at expiry shows within the test.
const TTL_SECS: u64 = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_who_signed_in_by_device_flow_reach_db_only_through_anothers_approval_until_the_grant_ends()
 {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let idp = Idp::start(tmp.path(), 3600);
    let pol = tmp.path().join("policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    let ca = Ca::start_with(
        &tmp,
        &[
            "--policy",
            pol.to_str().unwrap(),
            "--oidc-issuer",
            &idp.issuer,
            "--oidc-client-id",
            CLIENT_ID,
        ],
    );
    let app = echo_app("db-app").await;
    let mut db = central_sidecar(&ca, tmp.path(), "db", &app, false).await;
    let inbound = db.inbound();

    // Three people sign in through the provider; it tells the control plane their groups.
    let alice = log_in(&idp, &ca, tmp.path(), "alice").await;
    let bob = log_in(&idp, &ca, tmp.path(), "bob").await;
    let carol = log_in(&idp, &ca, tmp.path(), "carol").await;
    assert_eq!(alice.id, "spiffe://mayfly.local/user/alice");
    assert_eq!(bob.id, "spiffe://mayfly.local/user/bob");

    // No standing access: db's sidecar refuses a signed-in person who holds no grant.
    for p in [&alice, &carol] {
        let refused = dial_as(p, DB, &inbound).await;
        assert!(
            refused.is_err(),
            "{}: no grant, no access: {refused:?}",
            p.id
        );
    }
    // carol's provider gives her no group the rules know.
    let (ok, _, err) = carol.run(&[
        "access", "request", "--to", DB, "--ttl", "5s", "--reason", "x",
    ]);
    assert!(!ok && err.contains("may not ask for this"), "{err}");

    // alice asks with a reason; she cannot approve her own request; bob does.
    let ttl = format!("{TTL_SECS}s");
    let (ok, out, err) = alice.run(&[
        "access",
        "request",
        "--to",
        DB,
        "--ttl",
        &ttl,
        "--reason",
        "INC-42 db is slow",
        "--json",
    ]);
    assert!(ok, "{err}");
    let g = json_of(&out);
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["state"], "pending");
    let (ok, _, err) = alice.run(&["access", "approve", &id]);
    assert!(!ok && err.contains("cannot approve it"), "{err}");
    let (ok, out, err) = bob.run(&["access", "approve", &id, "--json"]);
    assert!(ok, "{err}");
    assert_eq!(json_of(&out)["state"], "active");

    // `mayfly connect` with alice's user SVID: her bytes reach db.
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

    // Cut at the grant's expiry, by the sidecar's clock.
    let cut = held_until_cut(&local, Duration::from_secs(30))
        .await
        .expect("the connection must be cut at the grant's expiry");
    assert!(
        cut.duration_since(t0) < Duration::from_secs(TTL_SECS + 4),
        "cut late"
    );
    assert!(
        round_trip(&local, b"x").await.is_err(),
        "denied after expiry"
    );
    connect.kill();

    // db's sidecar's records name alice under her grant; `--user` finds her story.
    let dir = ca.dir.clone();
    let found = eventually(Duration::from_secs(15), async || {
        audit(&dir, &["--user", &alice.id]).iter().any(|r| {
            r["kind"] == "connection.open"
                && r["peer_id"] == alice.id.as_str()
                && r["grant"] == id.as_str()
        })
    })
    .await;
    assert!(found, "db's sidecar records alice and her grant");
    let mine = audit(&dir, &["--user", &alice.id]);
    let requested = mine
        .iter()
        .find(|r| r["kind"] == "access.requested")
        .expect("access.requested");
    assert_eq!(
        requested["groups"],
        json!(["oncall"]),
        "alice's groups, from the provider"
    );
    assert_eq!(requested["reason"], "INC-42 db is slow");
    assert!(
        mine.iter().any(|r| r["kind"] == "access.refused"),
        "the self-approval is recorded: {mine:?}"
    );
    let approved = mine
        .iter()
        .find(|r| r["kind"] == "access.approved")
        .expect("access.approved");
    assert_eq!(approved["approver"], bob.id.as_str());
    assert_eq!(approved["user"], alice.id.as_str());
    assert_eq!(approved["reason"], "INC-42 db is slow");
    let denied = audit(
        &dir,
        &["--source", &carol.id, "--kind", "connection.denied"],
    );
    assert!(
        !denied.is_empty(),
        "carol's refusal at db's sidecar is recorded"
    );
}
