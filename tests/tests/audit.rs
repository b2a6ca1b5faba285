//! The audit trail end to end: records for allowed, denied and dry-run traffic; delivery
//! exactly once across a control-plane restart; tamper detection; a full spool.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::mesh::Pair;
use mayfly_tests::{Ca, Sidecar, bin, curl, eventually, policy, round_trip};

fn ca_cli(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(bin("mayfly-ca"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn records(dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["audit", "query", "--json", "--limit", "1000000"];
    args.extend_from_slice(extra);
    let (ok, out, err) = ca_cli(dir, &args);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

const POLICY: &str = r#"version = 1
[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
paths = ["/orders/**"]

[[rule]]
name = "no-secrets-soon"
action = "deny"
mode = "dry-run"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
paths = ["/orders/secret"]
"#;

/// web -> orders in HTTP mode, each with its own audit spool; web's egress policy is wider:
/// orders' inbound side decides.
async fn http_mesh(fixed_port: bool) -> Pair {
    let mesh = Pair::http()
        .policy(POLICY)
        .web_policy(&policy(&[("web", "orders")]))
        .audit_spools();
    if fixed_port { mesh.fixed_port() } else { mesh }
        .start()
        .await
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_decision_is_recorded_chained_signed_and_tampering_is_named() {
    let m = http_mesh(false).await;
    let base = m.url.clone();
    tokio::task::spawn_blocking(move || {
        assert_eq!(codes(&format!("{base}/orders/1"), 1), ["200"]);
        assert_eq!(
            curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("{base}/orders/1")
            ])
            .1,
            "403"
        );
        assert_eq!(
            codes(&format!("{base}/orders/secret"), 1),
            ["200"],
            "dry-run does not deny"
        );
    })
    .await
    .unwrap();
    m.orders.wait_audit_delivered().await;
    m.web.wait_audit_delivered().await;
    let dir = m.ca.dir.clone();
    let inbound: Vec<serde_json::Value> = records(
        &dir,
        &[
            "--kind",
            "http.request",
            "--destination",
            "spiffe://mayfly.local/orders",
        ],
    )
    .into_iter()
    .filter(|r| r["direction"] == "inbound")
    .collect();
    assert_eq!(inbound.len(), 3, "{inbound:?}");
    let by_path = |p: &str, method: &str| {
        inbound
            .iter()
            .find(|r| r["path"] == p && r["method"] == method)
            .cloned()
            .unwrap()
    };
    let allowed = by_path("/orders/1", "GET");
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["rule"], "web-reads-orders");
    assert_eq!(allowed["status"], 200);
    assert_eq!(allowed["peer_id"], "spiffe://mayfly.local/web");
    assert!(allowed["peer_serial"].as_str().unwrap().len() > 16);
    assert!(allowed["decision_id"].as_str().unwrap().starts_with("d-"));
    let denied = by_path("/orders/1", "POST");
    assert_eq!(
        (denied["decision"].as_str(), denied["status"].as_u64()),
        (Some("deny"), Some(403))
    );
    let dry = by_path("/orders/secret", "GET");
    assert_eq!(dry["decision"], "allow");
    assert_eq!(dry["dry_run"]["would"], "deny");
    assert_eq!(dry["dry_run"]["rule"], "no-secrets-soon");
    // Control-plane events are in the trail too.
    assert!(!records(&dir, &["--kind", "svid.issued"]).is_empty());
    // A signed checkpoint lands within its interval; then the whole trail verifies.
    let ok = eventually(Duration::from_secs(20), async || {
        records(&dir, &["--kind", "checkpoint"])
            .iter()
            .any(|r| r["source"] == "spiffe://mayfly.local/orders")
    })
    .await;
    assert!(ok, "no checkpoint from orders");
    m.orders.wait_audit_delivered().await;
    let (ok, out, err) = ca_cli(&dir, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("signed checkpoint") && out.contains("audit chain"),
        "{out}"
    );
    // Tamper with a stored record: verify fails and names it.
    let db = rusqlite::Connection::open(dir.join("ca.db")).unwrap();
    let chain: String = db
        .query_row(
            "SELECT chain FROM audit WHERE chain LIKE 'spiffe://mayfly.local/orders#%' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let line: String = db
        .query_row(
            "SELECT line FROM audit WHERE chain = ?1 AND seq = 2",
            [&chain],
            |r| r.get(0),
        )
        .unwrap();
    let edited = line.replace("\"deny\"", "\"allow\"").replace("403", "200");
    assert_ne!(edited, line);
    db.execute(
        "UPDATE audit SET line = ?1 WHERE chain = ?2 AND seq = 2",
        rusqlite::params![edited, chain],
    )
    .unwrap();
    let (ok, out, _) = ca_cli(&dir, &["audit", "verify"]);
    assert!(!ok);
    assert!(
        out.contains(&format!("BROKEN  {chain}:")) && out.contains("record 2 was altered"),
        "{out}"
    );
    // Restore it, then delete one: the gap is named.
    db.execute(
        "UPDATE audit SET line = ?1 WHERE chain = ?2 AND seq = 2",
        rusqlite::params![line, chain],
    )
    .unwrap();
    assert!(ca_cli(&dir, &["audit", "verify"]).0);
    db.execute("DELETE FROM audit WHERE chain = ?1 AND seq = 2", [&chain])
        .unwrap();
    let (ok, out, _) = ca_cli(&dir, &["audit", "verify"]);
    assert!(!ok);
    assert!(out.contains("expected record seq 2, found seq 3"), "{out}");
    drop(m.tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_under_load_loses_and_duplicates_nothing() {
    let mut m = http_mesh(true).await;
    let url = format!("{}/orders/7", m.url);
    let port = m.ca.addr.clone();
    let mut sent = 0;
    for round in 0..30 {
        if round == 10 {
            m.ca.proc.as_mut().unwrap().kill();
        }
        if round == 20 {
            m.ca.run(&port);
        }
        let u = url.clone();
        let got = tokio::task::spawn_blocking(move || codes(&u, 10))
            .await
            .unwrap();
        assert!(got.iter().all(|c| c == "200"), "{got:?}");
        sent += got.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    m.web.wait_audit_delivered().await;
    m.orders.wait_audit_delivered().await;
    let all = records(&m.ca.dir, &["--kind", "http.request"]);
    let from = |src: &str| all.iter().filter(|r| r["source"] == src).count();
    assert_eq!(
        from("spiffe://mayfly.local/web"),
        sent,
        "web's records: none lost, none twice"
    );
    assert_eq!(
        from("spiffe://mayfly.local/orders"),
        sent,
        "orders' records: none lost, none twice"
    );
    let (ok, out, err) = ca_cli(&m.ca.dir, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
}

async fn tcp_pair_with_audit(
    extra: &str,
) -> (Arc<tempfile::TempDir>, Ca, Sidecar, Sidecar, String, String) {
    let p = Pair::tcp().fixed_port().extra(extra).start().await;
    (p.tmp, p.ca, p.web, p.orders, p.out, p.port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_fails_closed_by_default_and_recovers() {
    let (_tmp, mut ca, _web, orders, out, port) =
        tcp_pair_with_audit("[audit]\nspool_dir = \"x\"\nmax_spool_bytes = 4096\n").await;
    ca.proc.as_mut().unwrap().kill();
    // Records pile up with nobody to acknowledge them, until the spool is full.
    let mut refused = false;
    for _ in 0..200 {
        if round_trip(&out, b"x").await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "a full spool must refuse new connections (fail-closed)"
    );
    assert!(orders.metric("mayfly_sidecar_connections_total{direction=\"inbound\",decision=\"audit_full\"}").await
        + _web.metric("mayfly_sidecar_connections_total{direction=\"outbound\",decision=\"audit_full\"}").await >= 1.0);
    // The control plane returns, takes the records, and traffic flows again.
    ca.run(&port);
    let back = eventually(Duration::from_secs(30), async || {
        round_trip(&out, b"x").await.is_ok()
    })
    .await;
    assert!(back, "traffic must resume once the spool drains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_in_drop_mode_counts_and_marks_the_gap() {
    let (_tmp, mut ca, web, _orders, out, port) = tcp_pair_with_audit(
        "[audit]\nspool_dir = \"x\"\nmax_spool_bytes = 4096\nwhen_full = \"drop\"\n",
    )
    .await;
    ca.proc.as_mut().unwrap().kill();
    for _ in 0..60 {
        round_trip(&out, b"x")
            .await
            .expect("drop mode never refuses traffic");
    }
    let counted = eventually(Duration::from_secs(5), async || {
        web.metric("mayfly_sidecar_audit_dropped").await > 0.0
    })
    .await;
    assert!(
        counted,
        "records must have been dropped and counted:\n{}\n{}",
        web.admin_get("/metrics").await.1,
        web.proc.log()
    );
    ca.run(&port);
    web.wait_audit_delivered().await;
    round_trip(&out, b"x").await.unwrap();
    web.wait_audit_delivered().await;
    let gaps = records(&ca.dir, &["--kind", "gap"]);
    assert!(
        gaps.iter()
            .any(|g| g["source"] == "spiffe://mayfly.local/web"
                && g["dropped"].as_u64().unwrap_or(0) > 0),
        "{gaps:?}"
    );
}

/// Restarts `old` (same config, same spool) with a fresh join token.
async fn restart_web(tmp: &tempfile::TempDir, ca: &Ca, old: Sidecar) -> (Sidecar, String) {
    let config = std::fs::read_to_string(&old.config).unwrap();
    drop(old);
    let dir = tmp.path();
    ca.token_file("spiffe://mayfly.local/web", &dir.join("web.token"));
    let mut web = Sidecar::start(dir, "web", &config);
    web.wait_ready().await;
    let url = format!("http://{}", web.outbound("orders"));
    (web, url)
}

fn by_epoch(recs: &[serde_json::Value], epoch: &str) -> Vec<u64> {
    let mut v: Vec<u64> = recs
        .iter()
        .filter(|r| r["epoch"] == epoch)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_under_load_never_reuses_a_seq_and_its_loss_is_a_recorded_gap() {
    let Pair {
        tmp,
        ca,
        mut web,
        orders: _orders,
        url,
        ..
    } = http_mesh(false).await;
    let url = format!("{url}/orders/1");
    let mut answered = 0;
    for _ in 0..8 {
        let u = url.clone();
        let got = tokio::task::spawn_blocking(move || codes(&u, 25))
            .await
            .unwrap();
        answered += got.iter().filter(|c| *c == "200").count();
    }
    // Killed right after answering: its last records are still in memory.
    web.proc.kill();
    let (web, url) = restart_web(&tmp, &ca, web).await;
    let more = tokio::task::spawn_blocking(move || codes(&format!("{url}/orders/2"), 5))
        .await
        .unwrap();
    assert!(more.iter().all(|c| c == "200"), "{more:?}");
    web.wait_audit_delivered().await;
    let mine = |r: &serde_json::Value| r["source"] == "spiffe://mayfly.local/web";
    let gaps: Vec<_> = records(&ca.dir, &["--kind", "gap"])
        .into_iter()
        .filter(mine)
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let gap = &gaps[0];
    assert_eq!(gap["reason"], "unclean_shutdown");
    let old = gap["previous_epoch"].as_str().unwrap();
    assert_ne!(
        gap["epoch"].as_str().unwrap(),
        old,
        "a new epoch after the kill"
    );
    let all: Vec<_> = records(&ca.dir, &[]).into_iter().filter(mine).collect();
    let old_seqs = by_epoch(&all, old);
    // The old chain is stored without a hole up to the seq the gap names; whatever the kill
    // lost lies after it, inside the recorded gap.
    let last = gap["previous_last_seq"].as_u64().unwrap();
    assert_eq!(old_seqs, (1..=last).collect::<Vec<_>>());
    let stored_old = all
        .iter()
        .filter(|r| r["epoch"] == old && r["kind"] == "http.request")
        .count();
    assert!(
        stored_old <= answered && answered > 0,
        "{stored_old} of {answered}"
    );
    let new_requests = all
        .iter()
        .filter(|r| r["epoch"] == gap["epoch"] && r["kind"] == "http.request")
        .count();
    assert_eq!(new_requests, 5);
    let (ok, out, err) = ca_cli(&ca.dir, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_line_mid_spool_is_quarantined_and_every_other_record_is_delivered() {
    let Pair {
        tmp,
        mut ca,
        mut web,
        orders: _orders,
        url,
        ..
    } = http_mesh(true).await;
    let port = ca.addr.clone();
    ca.proc.as_mut().unwrap().kill();
    let u = format!("{url}/orders/3");
    let got = tokio::task::spawn_blocking(move || codes(&u, 60))
        .await
        .unwrap();
    assert!(got.iter().all(|c| c == "200"), "{got:?}");
    // A clean stop, then one request's record is damaged in the middle of the spool.
    web.proc.stop();
    let spool = tmp.path().join("web-audit").join("spool.jsonl");
    let text = String::from_utf8(std::fs::read(&spool).unwrap()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let requests: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].contains("\"kind\":\"http.request\""))
        .collect();
    assert_eq!(requests.len(), 60, "all 60 requests are in the spool");
    let victim = requests[30];
    lines[victim] = lines[victim].replacen("\"kind\"", "\"ki\u{0}nd", 1);
    std::fs::write(&spool, lines.join("\n") + "\n").unwrap();
    ca.run(&port);
    let (web, url) = restart_web(&tmp, &ca, web).await;
    let more = tokio::task::spawn_blocking(move || codes(&format!("{url}/orders/4"), 5))
        .await
        .unwrap();
    assert!(more.iter().all(|c| c == "200"), "{more:?}");
    web.wait_audit_delivered().await;
    let mine = |r: &serde_json::Value| r["source"] == "spiffe://mayfly.local/web";
    let stored = records(&ca.dir, &["--kind", "http.request"])
        .into_iter()
        .filter(mine)
        .count();
    assert_eq!(stored, 60 - 1 + 5, "only the damaged record is missing");
    let gaps: Vec<_> = records(&ca.dir, &["--kind", "gap"])
        .into_iter()
        .filter(mine)
        .collect();
    let damaged: Vec<_> = gaps
        .iter()
        .filter(|g| g["reason"] == "spool_damaged")
        .collect();
    assert_eq!(damaged.len(), 1, "{gaps:?}");
    assert_eq!(damaged[0]["lost_seqs"].as_array().unwrap().len(), 1);
    let q = damaged[0]["quarantined"].as_str().unwrap();
    assert!(std::fs::read_to_string(q).unwrap().contains("ki\u{0}nd"));
    let (ok, out, err) = ca_cli(&ca.dir, &["audit", "verify"]);
    assert!(ok, "{out}{err}");
}

#[test]
fn audit_query_refuses_unknown_filter_values_and_verify_speaks_json() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    for (flag, bad, valid) in [
        ("--decision", "denied", "deny"),
        ("--kind", "http.requst", "http.request"),
    ] {
        let (ok, out, err) = ca_cli(&ca.dir, &["audit", "query", flag, bad]);
        assert!(!ok, "{flag} {bad} must fail: {out}");
        assert!(err.contains(bad) && err.contains(valid), "{err}");
    }
    let (ok, _, err) = ca_cli(&ca.dir, &["audit", "query", "--kind", "gap"]);
    assert!(ok, "{err}");
    let (ok, out, err) = ca_cli(&ca.dir, &["audit", "verify", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["broken"], 0, "{v}");
    assert!(v["verified"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        v["chains"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true && c["chain"].as_str().is_some()),
        "{v}"
    );
}
