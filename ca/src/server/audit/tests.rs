#![allow(clippy::unwrap_used)]
use super::ingest::*;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::identity::audit::{Record, line_hash};
use crate::identity::svid::SvidInfo;
use crate::server::ca::Ca;
use crate::server::store::Store;

use crate::identity::signing::authority::{Authorities, AuthorityConfig};
use crate::server::store::SqliteStore;

const WHO: &str = "spiffe://mayfly.local/web";

fn ca() -> Arc<Ca> {
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let td = crate::identity::id::parse_trust_domain("mayfly.local").unwrap();
    let a = Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
    store.save_authorities(&a).unwrap();
    store.set_setting("trust_domain", "mayfly.local").unwrap();
    let dist = crate::server::distribution::Distribution::new(None).unwrap();
    Ca::start(store, a, crate::server::CaSettings::default(), dist).unwrap()
}

fn peer(id: &str) -> SvidInfo {
    let now = OffsetDateTime::now_utc();
    SvidInfo {
        id: crate::identity::id::parse_workload_id(id).unwrap(),
        serial: "01".into(),
        not_before: now,
        not_after: now + time::Duration::hours(1),
    }
}

/// `n` chained lines from `source`, starting at seq 1, with a kind that needs escaping.
fn lines(source: &str, n: u64) -> Vec<Vec<u8>> {
    let mut prev = crate::identity::audit::GENESIS.to_owned();
    (1..=n)
        .map(|seq| {
            let mut fields = serde_json::Map::new();
            fields.insert("path".into(), "/a\"b\\c\u{e9}".into());
            let r = Record {
                v: crate::identity::audit::VERSION,
                source: source.into(),
                epoch: "e1".into(),
                seq,
                prev: prev.clone(),
                ts_ms: 1,
                kind: "http.request".into(),
                fields,
            };
            let line = r.line();
            prev = line_hash(&line);
            line
        })
        .collect()
}

fn body(lines: &[Vec<u8>]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| [l.as_slice(), b"\n"].concat())
        .collect()
}

#[test]
fn a_good_batch_is_stored_once_and_redelivery_is_skipped() {
    let ca = ca();
    let l = lines(WHO, 5);
    assert_eq!(ingest(&ca, Some(&peer(WHO)), &body(&l)).unwrap(), 5);
    // The same batch again (a lost acknowledgement): nothing new, same answer.
    assert_eq!(ingest(&ca, Some(&peer(WHO)), &body(&l)).unwrap(), 5);
    let stored = ca.store().audit_lines(&format!("{WHO}#e1")).unwrap();
    assert_eq!(stored, l, "stored byte for byte, escapes included");
}

#[test]
fn hostile_batches_are_refused_with_the_reason_and_store_nothing() {
    let ca = ca();
    let me = peer(WHO);
    let good = lines(WHO, 3);
    let truncated = good[0][..good[0].len() / 2].to_vec();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json\n".to_vec(), "bad_record"),
        (truncated, "bad_record"),
        (b"{\"source\":\"x\"}\n".to_vec(), "bad_record"),
        (
            br#"{"v":1,"source":"spiffe://mayfly.local/web","epoch":"e1","seq":"one","prev":"0","ts_ms":1,"kind":"k"}"#
                .to_vec(),
            "bad_record",
        ),
        (body(&lines("spiffe://mayfly.local/db", 1)), "not_yours"),
        // Starts at seq 2: a gap.
        (body(&good[1..]), "audit_gap"),
    ];
    for (b, reason) in cases {
        let e = ingest(&ca, Some(&me), &b).unwrap_err();
        assert_eq!(e.reason(), reason, "{}", String::from_utf8_lossy(&b));
    }
    assert_eq!(
        ingest(&ca, None, &body(&good)).unwrap_err().reason(),
        "unauthenticated"
    );
    // A tampered record in the middle of a redelivery is named as a divergence.
    assert_eq!(ingest(&ca, Some(&me), &body(&good)).unwrap(), 3);
    let mut forged = good.clone();
    forged[1] = String::from_utf8(forged[1].clone())
        .unwrap()
        .replace("/a", "/z")
        .into_bytes();
    assert_eq!(
        ingest(&ca, Some(&me), &body(&forged)).unwrap_err().reason(),
        "audit_diverged"
    );
    assert_eq!(ca.store().audit_lines(&format!("{WHO}#e1")).unwrap(), good);
}

#[test]
fn rendered_times_always_carry_three_fractional_digits() {
    let record = |ts_ms: i64| Record {
        v: 1,
        source: WHO.into(),
        epoch: "e".into(),
        seq: 1,
        prev: "0".into(),
        ts_ms,
        kind: "connection.open".into(),
        fields: serde_json::Map::new(),
    };
    // 2026-03-02T10:00:00.710Z and .000Z: `time`'s RFC 3339 would print `.71Z` and no fraction.
    let at = 1_772_445_600_000;
    let shown = super::verify::render(&record(at + 710).line());
    assert!(shown.starts_with("2026-03-02T10:00:00.710Z "), "{shown}");
    let shown = super::verify::render(&record(at).line());
    assert!(shown.starts_with("2026-03-02T10:00:00.000Z "), "{shown}");
}
