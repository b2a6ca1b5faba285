//! `mayfly-ca policy replay`: traffic recorded through real sidecars into a real control plane's
//! store, replayed against candidate policies; the exit status gates a change (0 nothing would
//! change, 1 something would, 2 error).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::mesh::Pair;
use mayfly_tests::{Ca, Sidecar, bin, curl, eventually};
use serde_json::Value;

const READS: &str = r#"
[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
paths = ["/orders/**"]
"#;
const WRITES: &str = r#"
[[rule]]
name = "web-writes-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["POST"]
paths = ["/orders/**"]
"#;
const STOCK: &str = r#"
[[rule]]
name = "web-reads-stock"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/stock"]
"#;

fn policy(rules: &[&str]) -> String {
    format!("version = 1\n{}", rules.concat())
}

/// `mayfly-ca policy replay` on `ca_dir`: (exit code, stdout, stderr).
fn replay(ca_dir: &Path, candidate: &Path, json: bool) -> (i32, String, String) {
    let mut c = std::process::Command::new(bin("mayfly-ca"));
    c.args(["policy", "replay", "--since", "1h", "--policy"])
        .arg(candidate)
        .arg("--data-dir")
        .arg(ca_dir);
    if json {
        c.arg("--json");
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The `http.request` records in the control plane's store.
fn recorded(ca_dir: &Path) -> Vec<Value> {
    let o = std::process::Command::new(bin("mayfly-ca"))
        .args(["audit", "query", "--json", "--kind", "http.request"])
        .arg("--data-dir")
        .arg(ca_dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// web -> orders in HTTP mode under reads + writes + stock (published by the control plane
/// too), 3 GETs and 2 POSTs recorded by both sidecars and delivered to the control plane.
async fn recorded_mesh() -> (Arc<tempfile::TempDir>, Ca, Vec<Value>, Sidecar, Sidecar) {
    let Pair {
        tmp,
        ca,
        web,
        orders,
        out,
        ..
    } = Pair::http()
        .policy(&policy(&[READS, WRITES, STOCK]))
        .ca_follows_policy()
        .audit_spools()
        .start()
        .await;
    let get = format!("http://{out}/orders/1");
    let post = format!("http://{out}/orders/2");
    let (ok, codes, err) = tokio::task::spawn_blocking(move || {
        let w = ["-o", "/dev/null", "-w", "%{http_code} "];
        let mut args: Vec<&str> = Vec::new();
        for _ in 0..3 {
            args.extend(w);
            args.push(&get);
            args.push("--next");
        }
        for i in 0..2 {
            args.extend(w);
            args.extend(["-X", "POST", "--data", "x=1", &post]);
            if i == 0 {
                args.push("--next");
            }
        }
        curl(&args)
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(codes.trim(), "200 200 200 200 200");
    // Both sidecars record each request (egress and ingress decisions).
    let mut records = Vec::new();
    let delivered = eventually(Duration::from_secs(30), async || {
        records = recorded(&ca.dir);
        records.len() >= 10
    })
    .await;
    assert!(delivered, "{records:?}");
    (tmp, ca, records, web, orders)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_drops_a_used_rule_is_reported_by_flow_and_exits_one_and_one_that_drops_an_unused_rule_exits_zero()
 {
    let (tmp, ca, records, _web, _orders) = recorded_mesh().await;
    let post_ids: Vec<&str> = records
        .iter()
        .filter(|r| r["method"] == "POST")
        .map(|r| r["decision_id"].as_str().unwrap())
        .collect();
    assert_eq!(post_ids.len(), 4, "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["port"].is_u64() || r["direction"] == "outbound")
    );

    // (a) Without the writes rule the 2 POSTs turn allow -> deny, at both sidecars.
    let no_writes = tmp.path().join("no-writes.toml");
    std::fs::write(&no_writes, policy(&[READS, STOCK])).unwrap();
    let (code, out, err) = replay(&ca.dir, &no_writes, true);
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let changes = report["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2, "{report:#}");
    for (c, direction) in changes.iter().zip(["inbound", "outbound"]) {
        assert_eq!(c["direction"], direction, "{c}");
        assert_eq!(c["change"], "allow_to_deny", "{c}");
        assert_eq!(c["caller"], "spiffe://mayfly.local/web", "{c}");
        assert_eq!(c["callee"], "spiffe://mayfly.local/orders", "{c}");
        assert_eq!(c["method"], "POST", "{c}");
        // The pattern of the published rule that allowed them, not each path.
        assert_eq!(c["target"], "/orders/**", "{c}");
        assert_eq!(c["count"], 2, "{c}");
        let example = c["example_decision_id"].as_str().unwrap();
        assert!(post_ids.contains(&example), "{example} not in {post_ids:?}");
    }
    assert_eq!(
        report["unchanged"],
        report["decisions"].as_u64().unwrap() - 4
    );
    assert_eq!(
        report["unused_allow_rules"],
        serde_json::json!(["web-reads-stock"])
    );
    assert_eq!(
        report["removed_rules"],
        serde_json::json!([{"name": "web-writes-orders", "action": "allow", "matched": 4}])
    );
    // The table says the same to a person.
    let (code, table, err) = replay(&ca.dir, &no_writes, false);
    assert_eq!(code, 1, "{table}{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("allow -> deny") && l.contains("inbound"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("POST") && row.contains("/orders/**"), "{row}");
    assert!(row.split_whitespace().nth(3) == Some("2"), "{row}");

    // (b) Without the stock rule nothing changes: it is reported as unused, exit 0.
    let no_stock = tmp.path().join("no-stock.toml");
    std::fs::write(&no_stock, policy(&[READS, WRITES])).unwrap();
    let (code, out, err) = replay(&ca.dir, &no_stock, false);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no decision would change"), "{out}");
    assert!(
        out.contains("removed allow rule `web-reads-stock` matched nothing in the window: unused"),
        "{out}"
    );
    let (code, out, _) = replay(&ca.dir, &no_stock, true);
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["changes"], serde_json::json!([]));
    assert_eq!(report["unused_allow_rules"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_candidate_or_a_missing_store_is_a_clear_error_with_exit_two() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let bad = tmp.path().join("candidate.toml");
    std::fs::write(
        &bad,
        "version = 1\n[[rule]]\nname = \"x\"\nfrom = [\"not-a-spiffe-id\"]\nto = [\"spiffe://mayfly.local/orders\"]\n",
    )
    .unwrap();
    let (code, out, err) = replay(&ca.dir, &bad, false);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("candidate.toml:4:"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, policy(&[READS])).unwrap();
    let (code, out, err) = replay(&tmp.path().join("nowhere"), &good, false);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.starts_with("error: "), "{err}");
    let (code, _, err) = replay(&ca.dir, &tmp.path().join("missing.toml"), false);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}
