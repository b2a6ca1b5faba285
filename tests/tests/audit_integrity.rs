//! What `mayfly-ca audit verify` proves about the stored trail: every stored column is checked
//! against its record's line, and every sidecar chain the control plane anchored on its own
//! signed chain must still be there, up to the anchored record. Records are delivered over mTLS
//! to an in-process control plane; the store is then edited the way an intruder would, and the
//! real `mayfly-ca` binary verifies it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use mayfly_ca::audit::{GENESIS, Record, VERSION, line_hash};
use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::CaClient;
use mayfly_ca::id::{parse_trust_domain, parse_workload_id};
use mayfly_ca::keys::SecretKey;
use mayfly_ca::server::Running;
use mayfly_ca::server::ca::Caller;
use mayfly_ca::svid::SvidInfo;
use mayfly_ca::tls::{Credentials, Svid};
use mayfly_tests::{bin, eventually};
use time::OffsetDateTime;

const WEB: &str = "spiffe://mayfly.local/web";
const DB: &str = "spiffe://mayfly.local/db";

fn record(source: &str, seq: u64, prev: &str, kind: &str) -> Vec<u8> {
    let mut fields = serde_json::Map::new();
    fields.insert("decision".into(), "deny".into());
    Record {
        v: VERSION,
        source: source.into(),
        epoch: "e1".into(),
        seq,
        prev: prev.into(),
        ts_ms: 1_700_000_000_000 + seq as i64,
        kind: kind.into(),
        fields,
    }
    .line()
}

/// Delivers `n` records of `id`'s chain (epoch e1) over mTLS with an SVID from `cp`.
async fn deliver(cp: &Running, id: &str, n: u64) -> Vec<Vec<u8>> {
    let wid = parse_workload_id(id).unwrap();
    let key = SecretKey::generate().unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &wid).unwrap();
    let now = OffsetDateTime::now_utc();
    let caller = SvidInfo {
        id: wid,
        serial: "01".into(),
        not_before: now,
        not_after: now + Duration::from_secs(60),
    };
    let issued = cp
        .ca
        .issue_svid(&csr, Caller::Svid(caller), None, "test")
        .unwrap();
    let creds = Credentials::new();
    creds.set(Svid::new(issued.chain, &key).unwrap());
    let bundles = Arc::new(ArcSwap::from_pointee(BundleSet::single(
        (*cp.ca.bundle()).clone(),
    )));
    let client = CaClient::new(
        cp.api_addr.to_string(),
        parse_trust_domain("mayfly.local").unwrap(),
    )
    .unwrap();
    let mut session = client.audit_session(bundles, creds);
    let mut prev = GENESIS.to_owned();
    let mut lines = Vec::new();
    let mut body = Vec::new();
    for seq in 1..=n {
        let line = record(id, seq, &prev, "connection.denied");
        prev = line_hash(&line);
        body.extend_from_slice(&line);
        body.push(b'\n');
        lines.push(line);
    }
    assert_eq!(session.post(Bytes::from(body)).await.unwrap(), n);
    lines
}

fn verify(dir: &Path) -> (bool, String) {
    let o = std::process::Command::new(bin("mayfly-ca"))
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success(), out)
}

fn query(dir: &Path, kind: &str) -> usize {
    let o = std::process::Command::new(bin("mayfly-ca"))
        .args(["audit", "query", "--json", "--kind", kind, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().count()
}

/// A control plane that received 6 records from web and 4 from db, then stopped cleanly;
/// returns (temp dir, data dir, pristine copy of its database).
async fn delivered_and_stopped() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let tmp = tempfile::tempdir().unwrap();
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), None)
        .await
        .unwrap();
    deliver(&cp, WEB, 6).await;
    deliver(&cp, DB, 4).await;
    cp.shutdown().await;
    let dir = tmp.path().join("ca");
    let (ok, out) = verify(&dir);
    assert!(ok, "{out}");
    let pristine = std::fs::read(dir.join("ca.db")).unwrap();
    (tmp, dir, pristine)
}

/// Runs `sql` on the stored trail, verifies, and puts the pristine database back.
fn tampered(dir: &Path, pristine: &[u8], sql: &str) -> (bool, String) {
    let db = rusqlite::Connection::open(dir.join("ca.db")).unwrap();
    let n = db.execute(sql, []).unwrap();
    assert!(n > 0, "{sql} changed nothing");
    drop(db);
    let result = verify(dir);
    for f in ["ca.db-wal", "ca.db-shm"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("ca.db"), pristine).unwrap();
    result
}

fn chain(id: &str) -> String {
    format!("{id}#e1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_tail_or_chain_and_a_rewritten_last_record_fail_verification() {
    let (_tmp, dir, pristine) = delivered_and_stopped().await;
    let web = chain(WEB);

    // The tail of web's chain (after its last record there is nothing to break).
    let (ok, out) = tampered(
        &dir,
        &pristine,
        &format!("DELETE FROM audit WHERE chain = '{web}' AND seq >= 5"),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN  {web}: the control plane anchored this chain at seq 6, but it ends at seq 4"
        )),
        "{out}"
    );

    // The whole of db's chain.
    let db = chain(DB);
    let (ok, out) = tampered(
        &dir,
        &pristine,
        &format!("DELETE FROM audit WHERE chain = '{db}'"),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("BROKEN  {db}: the control plane anchored this chain at seq 4, but the store holds none of it")),
        "{out}"
    );

    // The last record rewritten, with its hash column to match: only the anchor knows.
    let last = String::from_utf8(record(
        WEB,
        6,
        &line_hash(&{
            let conn = rusqlite::Connection::open(dir.join("ca.db")).unwrap();
            conn.query_row(
                "SELECT line FROM audit WHERE chain = ?1 AND seq = 5",
                [&web],
                |r| r.get::<_, String>(0),
            )
            .unwrap()
            .into_bytes()
        }),
        "connection.denied",
    ))
    .unwrap();
    let forged = last.replace("\"deny\"", "\"allow\"");
    assert_ne!(forged, last);
    let (ok, out) = tampered(
        &dir,
        &pristine,
        &format!(
            "UPDATE audit SET line = '{forged}', hash = '{}' WHERE chain = '{web}' AND seq = 6",
            line_hash(forged.as_bytes())
        ),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "BROKEN  {web}: record seq 6 is not the record the control plane anchored"
        )),
        "{out}"
    );
    assert!(verify(&dir).0, "the pristine copy verifies again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stored_column_is_checked_against_its_record() {
    let (_tmp, dir, pristine) = delivered_and_stopped().await;
    let web = chain(WEB);
    assert_eq!(query(&dir, "connection.denied"), 10);
    // Each edit of an indexed column, such as one that hides a record from `audit query`.
    let edits = [
        ("kind", "kind = 'connection.open'"),
        ("ts_ms", "ts_ms = 1"),
        ("source", "source = 'spiffe://mayfly.local/other'"),
        ("seq", "seq = 60"),
        ("prev", "prev = 'aa'"),
        ("hash", "hash = 'bb'"),
        ("chain", "chain = 'spiffe://mayfly.local/web#e2'"),
    ];
    for (column, set) in edits {
        let sql = format!("UPDATE audit SET {set} WHERE chain = '{web}' AND seq = 3");
        if column == "kind" {
            let db = rusqlite::Connection::open(dir.join("ca.db")).unwrap();
            db.execute(&sql, []).unwrap();
            drop(db);
            assert_eq!(query(&dir, "connection.denied"), 9, "hidden from query");
            std::fs::write(dir.join("ca.db"), &pristine).unwrap();
        }
        let (ok, out) = tampered(&dir, &pristine, &sql);
        assert!(!ok, "{column}: {out}");
        assert!(
            out.contains(&format!("record seq 3: the stored {column} column is")),
            "{column}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_control_plane_anchors_delivered_chains_within_seconds_and_signs_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = mayfly_tests::in_process_control_plane(tmp.path(), None)
        .await
        .unwrap();
    let lines = deliver(&cp, WEB, 3).await;
    let store = cp.ca.store().clone();
    let anchored = eventually(Duration::from_secs(20), async || {
        let events = store.events_after(0, 10_000).unwrap();
        let anchor = events
            .iter()
            .rposition(|e| e.kind == "audit.anchor" && e.detail.contains(&chain(WEB)));
        // ... and a signed checkpoint after it.
        anchor.is_some_and(|i| events[i..].iter().any(|e| e.kind == "checkpoint"))
    })
    .await;
    assert!(anchored, "{:?}", store.events_after(0, 10_000).unwrap());
    let anchor = store
        .events_after(0, 10_000)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "audit.anchor")
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&anchor.detail).unwrap();
    assert_eq!(detail["chains"][chain(WEB)]["seq"], 3);
    assert_eq!(
        detail["chains"][chain(WEB)]["hash"],
        line_hash(&lines[2]).as_str()
    );
    // Nothing new delivered: no further anchor.
    tokio::time::sleep(mayfly_ca::server::audit::ANCHOR_INTERVAL * 2).await;
    let anchors = store
        .events_after(0, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "audit.anchor")
        .count();
    assert_eq!(anchors, 1);
    cp.shutdown().await;
}
