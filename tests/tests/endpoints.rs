//! The endpoint registry: each sidecar's inbound endpoint is filed under the SPIFFE ID of the
//! certificate that registered it, never one a request names; endpoints leave on drain at once
//! and by themselves when their lease is not refreshed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::{Ca, Sidecar, Spec, api_request, bin, echo_app, eventually, policy};
use serde_json::Value;

/// `mayfly-ca endpoints list --json`: (SPIFFE ID, address) pairs.
fn listed(ca: &Ca) -> Vec<(String, String)> {
    let out = Command::new(bin("mayfly-ca"))
        .args(["endpoints", "list", "--json", "--data-dir"])
        .arg(&ca.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
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

/// One `/v1/endpoints` request over mTLS with the SVID minted into `svid`: (status, body).
fn call(api: &str, svid: &Path, method: &str, body: &str) -> (String, String) {
    let (code, body) = api_request(api, svid, method, "/v1/endpoints", body);
    assert!(code.parse::<u16>().is_ok(), "{code}");
    (code, body)
}

fn pair(id: &str, addr: &str) -> (String, String) {
    (format!("spiffe://mayfly.local/{id}"), addr.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registers_and_removes_only_under_its_own_certificates_id() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ca.mint("spiffe://mayfly.local/orders", &a);
    ca.mint("spiffe://mayfly.local/web", &b);
    let reg = r#"{"endpoints": ["10.0.0.5:15443"]}"#;

    let (code, body) = call(&ca.addr, &a, "PUT", reg);
    assert_eq!(code, "200", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://mayfly.local/orders");
    assert!(v["lease_ms"].as_u64().unwrap() > 0);
    assert_eq!(listed(&ca), vec![pair("orders", "10.0.0.5:15443")]);

    // B cannot file an endpoint under A's ID: the body cannot name one.
    let (code, body) = call(
        &ca.addr,
        &b,
        "PUT",
        r#"{"spiffe_id": "spiffe://mayfly.local/orders", "endpoints": ["10.0.0.9:15443"]}"#,
    );
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("spiffe_id"), "{body}");
    // B's delete of A's address removes nothing of A's.
    let (code, body) = call(&ca.addr, &b, "DELETE", reg);
    assert_eq!(code, "200", "{body}");
    assert_eq!(listed(&ca), vec![pair("orders", "10.0.0.5:15443")]);

    // Malformed bodies: 400 and nothing changes.
    for bad in [
        "not json",
        r#"{"endpoints": []}"#,
        r#"{"endpoints": ["0.0.0.0:15443"]}"#,
        r#"{"endpoints": ["10.0.0.6:15443", "no-port"]}"#,
        r#"{"endpoints": "10.0.0.6:15443"}"#,
    ] {
        let (code, body) = call(&ca.addr, &b, "PUT", bad);
        assert_eq!(code, "400", "{bad}: {body}");
    }
    assert_eq!(listed(&ca), vec![pair("orders", "10.0.0.5:15443")]);

    // A's own delete removes it at once.
    let (code, body) = call(&ca.addr, &a, "DELETE", reg);
    assert_eq!(code, "200", "{body}");
    assert_eq!(listed(&ca), vec![]);

    // Both are on the control plane's audit chain, under A's ID.
    for (kind, n) in [("endpoint.registered", 1), ("endpoint.removed", 1)] {
        let out = Command::new(bin("mayfly-ca"))
            .args(["audit", "query", "--json", "--kind", kind, "--data-dir"])
            .arg(&ca.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), n, "{kind}: {text}");
        assert!(
            lines[0].contains("spiffe://mayfly.local/orders")
                && lines[0].contains("10.0.0.5:15443"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_is_not_refreshed_leaves_when_its_lease_ends() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start_with(&tmp, &["--endpoint-lease", "2s"]);
    let a = tmp.path().join("a");
    ca.mint("spiffe://mayfly.local/orders", &a);
    let (code, body) = call(
        &ca.addr,
        &a,
        "PUT",
        r#"{"endpoints": ["orders-0.svc:15443"]}"#,
    );
    assert_eq!(code, "200", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["lease_ms"].as_u64().unwrap() <= 2000, "{body}");
    assert_eq!(listed(&ca), vec![pair("orders", "orders-0.svc:15443")]);
    let gone = eventually(Duration::from_secs(10), async || listed(&ca).is_empty());
    assert!(gone.await, "still listed after its 2 s lease");
}

/// A sidecar for `orders` with an inbound listener (on 127.0.0.1:0, or as `edit` makes it).
async fn orders(ca: &Ca, dir: &Path, name: &str, edit: impl Fn(String) -> String) -> Sidecar {
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = echo_app("orders-app").await;
    let token = ca.token_file(
        "spiffe://mayfly.local/orders",
        &dir.join(format!("{name}.token")),
    );
    let config = Spec {
        me: "orders",
        ca: &ca.addr,
        token: &token,
        policy: &pol,
        inbound_app: Some(&app),
        outbound: &[],
        svid_ttl: None,
        extra: &format!("[audit]\nspool_dir = \"{name}-audit\"\n"),
    }
    .toml();
    Sidecar::start(dir, name, &edit(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_registers_under_its_own_id_and_a_graceful_stop_removes_it_at_once() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let mut sc = orders(&ca, tmp.path(), "orders", |c| c).await;
    let inbound = sc.inbound();
    sc.wait_ready().await;
    let seen = eventually(Duration::from_secs(10), async || {
        listed(&ca) == vec![pair("orders", &inbound)]
    });
    assert!(seen.await, "{:?}\n{}", listed(&ca), sc.proc.log());
    assert!(sc.proc.stop().success());
    assert_eq!(listed(&ca), vec![], "{}", sc.proc.log());
    assert!(sc.proc.log().contains("endpoints deregistered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_with_sigkill_leaves_the_registry_within_its_lease() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start_with(&tmp, &["--endpoint-lease", "2s"]);
    let mut sc = orders(&ca, tmp.path(), "orders", |c| c).await;
    let inbound = sc.inbound();
    sc.wait_ready().await;
    let want = vec![pair("orders", &inbound)];
    let seen = eventually(Duration::from_secs(10), async || listed(&ca) == want);
    assert!(seen.await, "{}", sc.proc.log());
    // Alive, it refreshes: still there after several leases.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(listed(&ca), want, "{}", sc.proc.log());
    }
    sc.proc.kill();
    assert!(
        !listed(&ca).is_empty(),
        "removed although nobody deregistered"
    );
    let gone = eventually(Duration::from_secs(10), async || listed(&ca).is_empty());
    assert!(
        gone.await,
        "still listed 10 s after SIGKILL with a 2 s lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_listener_must_say_what_to_advertise_and_may_read_it_from_the_environment() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let app = echo_app("orders-app").await;
    let token = ca.token_file("spiffe://mayfly.local/orders", &tmp.path().join("o.token"));
    let pol = tmp.path().join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let config = Spec {
        me: "orders",
        ca: &ca.addr,
        token: &token,
        policy: &pol,
        inbound_app: Some(&app),
        outbound: &[],
        svid_ttl: None,
        extra: "[audit]\nspool_dir = \"orders-audit\"\n",
    }
    .toml()
    .replace(
        "listen = \"127.0.0.1:0\"\napp",
        "listen = \"0.0.0.0:0\"\napp",
    );
    // Without `advertise`, peers could not dial it: `check` and `run` refuse, saying so.
    let path = tmp.path().join("silent.toml");
    std::fs::write(&path, &config).unwrap();
    let out = Command::new(bin("mayfly-sidecar"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("inbound.advertise") && err.contains("required"),
        "{err}"
    );
    // `${NAME}` is read at start: unset, the sidecar refuses to start and names it.
    let templated = config.replace(
        "[inbound]\n",
        "[inbound]\nadvertise = \"${MAYFLY_TEST_HOST_IP}:15443\"\n",
    );
    let path = tmp.path().join("unset.toml");
    std::fs::write(&path, &templated).unwrap();
    let out = Command::new(bin("mayfly-sidecar"))
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("MAYFLY_TEST_HOST_IP")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("MAYFLY_TEST_HOST_IP is not set"), "{err}");
    // Set, it is the address registered under the sidecar's ID.
    let named = Sidecar::start_with_env(
        tmp.path(),
        "named",
        &templated,
        &[("MAYFLY_TEST_HOST_IP", "10.9.8.7")],
    );
    named.wait_ready().await;
    let want = vec![pair("orders", "10.9.8.7:15443")];
    let seen = eventually(Duration::from_secs(10), async || listed(&ca) == want);
    assert!(seen.await, "{:?}\n{}", listed(&ca), named.proc.log());
}

/// `web`'s sidecar with an outbound to `orders` (by SPIFFE ID, no `remote`), following
/// its local policy or, with `central`, the control plane's.
fn web(ca: &Ca, dir: &Path, central: bool) -> Sidecar {
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let token = ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut config = Spec {
        me: "web",
        ca: &ca.addr,
        token: &token,
        policy: &pol,
        inbound_app: None,
        outbound: &[("orders", "127.0.0.1:9", "orders")],
        svid_ttl: None,
        extra: "[audit]\nspool_dir = \"web-audit\"\n",
    }
    .toml()
    // By identity: `/upstreams` shows the endpoints an outbound uses (a static `remote`'s own).
    .replace("remote = \"127.0.0.1:9\"\n", "");
    if central {
        config = config.replace(&format!("[policy]\nfile = \"{}\"\n", pol.display()), "");
    }
    Sidecar::start(dir, "web", &config)
}

/// The endpoints `web`'s `/upstreams` shows for its `orders` outbound.
async fn upstream_endpoints(web: &Sidecar) -> Vec<String> {
    let (status, body) = web.admin_get("/upstreams").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstreams"][0]["name"], "orders", "{body}");
    v["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["address"].as_str().unwrap().to_owned())
        .collect()
}

async fn endpoints_are_pushed_to_the_sidecars_that_call_them(central: bool) {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let pol = tmp.path().join("central.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let ca = Ca::start_with(&tmp, &["--policy", pol.to_str().unwrap()]);
    let w = web(&ca, tmp.path(), central);
    w.wait_ready().await;
    assert_eq!(upstream_endpoints(&w).await, Vec::<String>::new());
    let mut one = orders(&ca, tmp.path(), "orders-1", |c| c).await;
    let mut two = orders(&ca, tmp.path(), "orders-2", |c| c).await;
    let mut both = vec![one.inbound(), two.inbound()];
    both.sort();
    let seen = eventually(Duration::from_secs(8), async || {
        upstream_endpoints(&w).await == both
    });
    assert!(
        seen.await,
        "{:?}\n{}",
        upstream_endpoints(&w).await,
        w.proc.log()
    );
    let left = two.inbound();
    assert!(one.proc.stop().success());
    let seen = eventually(Duration::from_secs(8), async || {
        upstream_endpoints(&w).await == vec![left.clone()]
    });
    assert!(
        seen.await,
        "{:?}\n{}",
        upstream_endpoints(&w).await,
        w.proc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_a_local_policy_learns_its_upstreams_endpoints_as_they_change() {
    endpoints_are_pushed_to_the_sidecars_that_call_them(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_following_the_central_policy_learns_its_upstreams_endpoints_on_its_watch() {
    endpoints_are_pushed_to_the_sidecars_that_call_them(true).await;
}
