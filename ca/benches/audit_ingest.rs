//! Micro-benchmark of the control plane's audit ingest: `POST /v1/audit`'s work after the body
//! is read (each line parsed, hashed and checked against the caller, the batch appended to the
//! chain in one transaction on a file-backed SQLite store: WAL, `synchronous = FULL`).
//!
//! - `ingest`: one batch of [`BATCH`] `http.request` records as a sidecar writes them (the bench
//!   pair's fields), each batch continuing the one chain; divide by [`BATCH`] for the wall time
//!   per record (fsync included). The CPU time per record of the ingesting thread (what the
//!   control plane spends on the bench's CPU 0) is printed at the end.
//!
//! Run: `cargo bench -p mayfly-ca --bench audit_ingest`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use divan::{Bencher, black_box};
use mayfly_ca::audit::{GENESIS, VERSION, line_hash};
use mayfly_ca::server::Ca;
use mayfly_ca::server::store::{SqliteStore, Store};
use mayfly_ca::svid::SvidInfo;
use time::OffsetDateTime;

const WHO: &str = "spiffe://mayfly.local/bench-b";
/// Records per batch (a sidecar at a few thousand requests a second ships about this many).
const BATCH: u64 = 1000;

fn main() {
    divan::main();
}

fn ca(dir: &std::path::Path) -> Arc<Ca> {
    let store = Arc::new(SqliteStore::open(&dir.join("ca.db")).unwrap());
    let td = mayfly_ca::id::parse_trust_domain("mayfly.local").unwrap();
    let a = mayfly_ca::authority::Authorities::init(
        td,
        mayfly_ca::authority::AuthorityConfig::default(),
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    store.save_authorities(&a).unwrap();
    store.set_setting("trust_domain", "mayfly.local").unwrap();
    let dist = mayfly_ca::server::distribution::Distribution::new(None).unwrap();
    Ca::start(store, a, mayfly_ca::server::CaSettings::default(), dist).unwrap()
}

/// The next `BATCH` chained `http.request` lines of the one chain, from `seq` after `prev`.
fn batch(seq: &mut u64, prev: &mut String) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..BATCH {
        *seq += 1;
        let line = format!(
            r#"{{"v":{VERSION},"source":"{WHO}","epoch":"5f0c2a9d1e7b4c38","seq":{seq},"prev":"{prev}","ts_ms":{ts},"kind":"http.request","decision":"allow","decision_id":"d-0a1b2c3d-{seq:x}","direction":"inbound","duration_ms":1,"enforced":true,"local_id":"{WHO}","method":"GET","path":"/","peer_addr":"127.0.0.1:40112","peer_id":"spiffe://mayfly.local/bench-a","peer_serial":"3f9a","policy_version":"sha256:1f2e3d4c","port":23011,"protocol":"http","rule":"a-to-b","status":200}}"#,
            ts = 1_767_225_600_000 + *seq
        );
        *prev = line_hash(line.as_bytes());
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
    }
    body
}

/// CPU time this thread has run, in nanoseconds (the scheduler's account: fine-grained, unlike
/// `getrusage`'s ticks), or 0 where `/proc` does not say.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[divan::bench(sample_count = 40, sample_size = 1)]
fn ingest(b: Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let now = OffsetDateTime::now_utc();
    let peer = SvidInfo {
        id: mayfly_ca::id::parse_workload_id(WHO).unwrap(),
        serial: "01".into(),
        not_before: now,
        not_after: now + time::Duration::hours(1),
    };
    let next = Mutex::new((0u64, GENESIS.to_owned()));
    let cpu = AtomicU64::new(0);
    let batches = AtomicU64::new(0);
    b.with_inputs(|| {
        let mut g = next.lock().unwrap();
        let (seq, prev) = &mut *g;
        (batch(seq, prev), *seq)
    })
    .bench_refs(|(body, last)| {
        let t = thread_cpu_ns();
        let acked = mayfly_ca::server::audit::ingest(&ca, Some(&peer), body).unwrap();
        cpu.fetch_add(thread_cpu_ns().saturating_sub(t), Ordering::Relaxed);
        batches.fetch_add(1, Ordering::Relaxed);
        assert_eq!(black_box(acked), *last);
    });
    let n = batches.load(Ordering::Relaxed) * BATCH;
    eprintln!(
        "ingest: {:.2} us CPU per record (this thread, {n} records)",
        cpu.load(Ordering::Relaxed) as f64 / n.max(1) as f64 / 1000.0
    );
}
