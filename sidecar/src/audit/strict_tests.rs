//! Strict durability: decisions are released only once a sync covers their records, and
//! concurrent decisions share syncs (group commit).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use tokio::sync::watch;

use super::{AuditConfig, Auditor, Durability, NotDurable, Sink, WhenFull, start};
use crate::config::{ControlPlane, TokenSource};
use crate::identity::Identity;
use crate::metrics::Metrics;

struct Running {
    auditor: Arc<Auditor>,
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

fn strict(dir: &Path) -> Running {
    strict_with(dir, 64 << 20, WhenFull::FailClosed)
}

fn strict_with(dir: &Path, max_spool_bytes: u64, when_full: WhenFull) -> Running {
    let metrics = Arc::new(Metrics::new());
    let identity = Identity::new(
        mayfly_ca::id::parse_id("spiffe://t/a").unwrap(),
        ControlPlane {
            // Never dialled: nothing is shipped.
            address: "127.0.0.1:9".into(),
            token: TokenSource::File(PathBuf::from("unused")),
            ca_pin: None,
            svid_ttl: None,
        },
        metrics.clone(),
    )
    .unwrap();
    let cfg = AuditConfig {
        spool_dir: dir.to_path_buf(),
        max_spool_bytes,
        when_full,
        sink: Sink::None,
        ship: false,
        durability: Durability::Strict,
    };
    let (stop, shutdown) = watch::channel(false);
    let (auditor, task) = start(cfg, identity, None, metrics, shutdown).unwrap();
    Running {
        auditor,
        task,
        stop,
    }
}

fn fields(task: usize, n: usize) -> Map<String, Value> {
    let mut f = Map::new();
    f.insert("task".into(), task.into());
    f.insert("n".into(), n.into());
    f
}

/// The record with `seq` in the spool file, if it is there.
fn on_disk(dir: &Path, seq: u64) -> Option<Value> {
    std::fs::read(dir.join("spool.jsonl"))
        .unwrap()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice::<Value>(l).unwrap())
        .find(|r| r["seq"] == seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_decisions_share_syncs_and_each_is_released_only_once_its_record_is_synced() {
    const TASKS: usize = 40;
    const EACH: usize = 10;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let r = strict(&dir);
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let auditor = r.auditor.clone();
        let dir = dir.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..EACH {
                let rx = auditor.durable("http.request", fields(t, n)).unwrap();
                let seq = rx.await.unwrap().unwrap();
                // Released: the record is in the file (out of the 64 KiB write buffer), and a
                // sync that began after it was written has returned.
                let rec = on_disk(&dir, seq)
                    .unwrap_or_else(|| panic!("record {seq} released before it was written"));
                assert!(
                    auditor.synced_through() > seq,
                    "record {seq} released before a sync covered it"
                );
                assert_eq!(
                    (rec["task"].as_u64(), rec["n"].as_u64()),
                    (Some(t as u64), Some(n as u64))
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let records = (TASKS * EACH) as u64;
    let syncs = r.auditor.syncs();
    assert!(
        syncs > 0 && syncs * 2 <= records,
        "{syncs} syncs for {records} strict records: not grouped"
    );
    // The record() path, and a clean stop.
    r.auditor
        .record("http.request", fields(TASKS, 0))
        .await
        .unwrap();
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_decision_the_spool_cannot_keep_is_refused_not_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // Nothing is shipped, so a small spool fills up; `drop` would let batched traffic pass.
    let r = strict_with(&dir, 4096, WhenFull::Drop);
    let mut kept = 0;
    let mut refused = None;
    for n in 0..100 {
        match r.auditor.record("http.request", fields(0, n)).await {
            Ok(()) => kept += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    assert_eq!(refused, Some(NotDurable::Full), "after {kept} records");
    assert!(kept > 0);
    assert_eq!(
        r.auditor.dropped(),
        0,
        "a refused decision is not a dropped record: nothing it stood for happened"
    );
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
    let lines = std::fs::read(dir.join("spool.jsonl")).unwrap();
    let recs = lines
        .split(|b| *b == b'\n')
        .filter(|l| l.windows(14).any(|w| w == b"\"http.request\""))
        .count();
    assert_eq!(recs, kept, "every accepted decision is in the spool");
}
