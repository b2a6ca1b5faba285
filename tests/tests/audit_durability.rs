//! `[audit] durability = "strict"` end to end: a request is forwarded only once its decision
//! record is synced, so a sidecar killed with SIGKILL right after answering has lost none of
//! them; a record that cannot be synced refuses the request (HTTP 503) or the connection (TCP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use mayfly_tests::{Ca, Sidecar, Spec, bin, curl, echo_app, http_app, policy, round_trip};

const STRICT: &str = "[audit]\nspool_dir = \"web-audit\"\ndurability = \"strict\"\n";

fn records(dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let o = std::process::Command::new(bin("mayfly-ca"))
        .args(["audit", "query", "--json", "--limit", "1000000"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// HTTP status codes of `n` GETs of `url` (one curl, one kept-alive connection).
fn codes(url: &str, n: usize) -> Vec<String> {
    let mut args = Vec::new();
    for _ in 0..n {
        args.extend(["-o", "/dev/null"]);
    }
    args.extend(["-w", "%{http_code}\\n"]);
    let urls = vec![url.to_owned(); n];
    for u in &urls {
        args.push(u);
    }
    curl(&args).1.lines().map(str::to_owned).collect()
}

struct Mesh {
    tmp: Arc<tempfile::TempDir>,
    ca: Ca,
    web: Sidecar,
    _orders: Sidecar,
    /// web's outbound listener for orders.
    out: String,
}

/// orders (inbound, batched) behind web (outbound, `web_audit`); `protocol = "http"` or TCP.
async fn mesh(http: bool, web_audit: &str) -> Mesh {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let dir = tmp.path();
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = if http {
        http_app("orders").await
    } else {
        echo_app("orders").await
    };
    let proto = |toml: String, key: &str| {
        if http {
            toml.replace(key, &format!("protocol = \"http\"\n{key}"))
        } else {
            toml
        }
    };
    let tok = ca.token_file("spiffe://mayfly.local/orders", &dir.join("o.token"));
    let mut orders = Sidecar::start(
        dir,
        "orders",
        &proto(
            Spec {
                me: "orders",
                ca: &ca.addr,
                token: &tok,
                policy: &pol,
                inbound_app: Some(&app),
                outbound: &[],
                svid_ttl: None,
                extra: "[audit]\nspool_dir = \"orders-audit\"\n",
            }
            .toml(),
            "app = ",
        ),
    );
    let inbound = orders.inbound();
    let tok = ca.token_file("spiffe://mayfly.local/web", &dir.join("w.token"));
    let mut web = Sidecar::start(
        dir,
        "web",
        &proto(
            Spec {
                me: "web",
                ca: &ca.addr,
                token: &tok,
                policy: &pol,
                inbound_app: None,
                outbound: &[("orders", &inbound, "orders")],
                svid_ttl: None,
                extra: web_audit,
            }
            .toml(),
            "spiffe_id = \"spiffe://mayfly.local/orders\"\n",
        ),
    );
    let out = web.outbound("orders");
    orders.wait_ready().await;
    web.wait_ready().await;
    Mesh {
        tmp,
        ca,
        web,
        _orders: orders,
        out,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_sidecar_killed_right_after_answering_has_lost_no_answered_requests_record() {
    let Mesh {
        tmp,
        ca,
        mut web,
        _orders,
        out,
    } = mesh(true, STRICT).await;
    let url = format!("http://{out}/orders/1");
    let mut answered = 0;
    for _ in 0..8 {
        let u = url.clone();
        let got = tokio::task::spawn_blocking(move || codes(&u, 25))
            .await
            .unwrap();
        answered += got.iter().filter(|c| *c == "200").count();
    }
    assert!(answered > 0);
    // Killed right after the last answer: whatever it had not synced is gone.
    web.proc.kill();
    let config = std::fs::read_to_string(&web.config).unwrap();
    drop(web);
    ca.token_file("spiffe://mayfly.local/web", &tmp.path().join("w.token"));
    let web = Sidecar::start(tmp.path(), "web", &config);
    web.wait_ready().await;
    web.wait_audit_delivered().await;
    // Written by web (orders' records of the same requests name web as their caller too).
    let mine: Vec<_> = records(&ca.dir, &[])
        .into_iter()
        .filter(|r| r["source"] == "spiffe://mayfly.local/web")
        .collect();
    let decisions = mine.iter().filter(|r| r["kind"] == "http.request").count();
    assert_eq!(
        decisions, answered,
        "every answered request's decision record survived the kill"
    );
    assert!(
        mine.iter()
            .filter(|r| r["kind"] == "http.request")
            .all(|r| r["decision"] == "allow" && r.get("status").is_none()),
        "strict decision records are written before the answer is known"
    );
    // The outcome records follow the answers and may be lost with the kill (recorded as a gap).
    let outcomes = mine.iter().filter(|r| r["kind"] == "http.response").count();
    assert!(outcomes <= answered, "{outcomes} of {answered}");
    assert!(mine.iter().any(|r| r["kind"] == "gap"));
}

/// Nothing shipped, a 4 KiB spool, `when_full = "drop"`: batched traffic would pass with its
/// records dropped; strict traffic is refused once its records cannot be kept.
const STRICT_SMALL: &str = "[audit]\nspool_dir = \"web-audit\"\ndurability = \"strict\"\nship = false\nmax_spool_bytes = 4096\nwhen_full = \"drop\"\n";

/// The `kind` records in a spool file.
fn spooled(dir: &Path, kind: &str) -> usize {
    let needle = format!("\"kind\":\"{kind}\"");
    std::fs::read_to_string(dir.join("spool.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_sidecar_refuses_http_requests_and_tcp_connections_whose_record_cannot_be_kept() {
    // HTTP: 503 once the spool cannot keep the decision, nothing forwarded unrecorded.
    let m = mesh(true, STRICT_SMALL).await;
    let url = format!("http://{}/orders/1", m.out);
    let got = tokio::task::spawn_blocking(move || codes(&url, 30))
        .await
        .unwrap();
    let ok = got.iter().take_while(|c| *c == "200").count();
    assert!(
        ok > 0 && ok < 30 && got[ok..].iter().all(|c| c == "503"),
        "{got:?}"
    );
    assert_eq!(
        m.web
            .metric("mayfly_sidecar_requests_total{direction=\"outbound\",decision=\"audit_unavailable\"}")
            .await,
        (30 - ok) as f64
    );
    assert_eq!(
        spooled(&m.tmp.path().join("web-audit"), "http.request"),
        ok,
        "a decision record for every forwarded request, none for the refused ones"
    );
    drop(m);

    // TCP: the connection is closed before a byte is forwarded.
    let m = mesh(false, STRICT_SMALL).await;
    let mut results = Vec::new();
    for _ in 0..30 {
        results.push(round_trip(&m.out, b"hello").await.is_ok());
    }
    let ok = results.iter().take_while(|r| **r).count();
    assert!(
        ok > 0 && ok < 30 && results[ok..].iter().all(|r| !r),
        "{results:?}"
    );
    let spool = m.tmp.path().join("web-audit");
    assert_eq!(spooled(&spool, "connection.open"), ok);
}
