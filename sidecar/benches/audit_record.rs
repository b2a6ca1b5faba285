//! One HTTP request's audit record, built, serialized into its chained line and hashed (what
//! the data path and the audit writer spend per request), two ways side by side:
//!
//! - `map`: the record as it was built before issue #21's second round, a
//!   `serde_json::Map<String, Value>` filled key by key per request (the connection's fields
//!   too), cloned whole for strict mode, and serialized through `mayfly_ca::audit::Record`;
//! - `list`: the record as the sidecar builds it now, the connection's fields built once and
//!   shared, static keys, written straight into one line buffer.
//!
//! Both produce the same bytes (checked before measuring). `hash` is the line's SHA-256 and hex
//! alone, into a `String` per record (`string`, as the spool did before issue #21's third round)
//! or on the stack (`stack`, as it does now; `list` hashes that way). Run with
//! `cargo bench -p mayfly-sidecar --bench audit_record`.

use std::sync::Arc;

use divan::{Bencher, black_box};
use mayfly_ca::audit::{LineHash, Record, VERSION, line_hash};
use mayfly_policy::{DecidedBy, Decision};
use mayfly_sidecar::audit::{Field, FieldList, Fields, line};
use mayfly_sidecar::conn::audit_base_fields;
use mayfly_sidecar::conn::http::RESPONSE_FIELDS;
use mayfly_sidecar::metrics::Direction;
use mayfly_sidecar::policy::Verdict;
use serde_json::{Map, Value};

fn main() {
    for strict in [false, true] {
        let (old, new) = (
            map_lines(&verdict(), strict),
            list_lines(&base(), &verdict(), strict),
        );
        assert_eq!(old, new, "the two ways must write the same bytes");
    }
    divan::main();
}

const SOURCE: &str = "spiffe://mayfly.local/ns/shop/sa/api";
const EPOCH: &str = "5f0c2a9d1e7b4c38";
const PREV: &str = "9a3b1c0d2e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b";
const ME: &str = "spiffe://mayfly.local/ns/shop/sa/api";
const PEER: &str = "spiffe://mayfly.local/ns/shop/sa/web";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn verdict() -> Verdict {
    Verdict::Decided(Decision {
        allow: true,
        enforced: true,
        decided_by: DecidedBy::Rule(Arc::from("web-reads")),
        dry_run: None,
        policy_version: Arc::from("sha256:1f2e3d4c"),
        decision_id: "d-0a1b2c3d-2a".into(),
    })
}

fn base() -> FieldList {
    audit_base_fields(
        Direction::Inbound,
        ME,
        PEER,
        Some("127.0.0.1:40112"),
        Some("3f9a"),
        "http",
    )
}

/// Strict mode's decision line (if `strict`) and the outcome's line, each hashed.
type Lines = (Option<Vec<u8>>, Vec<u8>);

/// The record as the sidecar built it before: every key and value owned, per request.
fn map_lines(verdict: &Verdict, strict: bool) -> Lines {
    let mut m = Map::new();
    m.insert("direction".into(), Value::from("inbound"));
    m.insert("local_id".into(), Value::from(ME));
    m.insert("peer_id".into(), Value::from(PEER));
    m.insert(
        "peer_addr".into(),
        Value::from("127.0.0.1:40112".to_string()),
    );
    m.insert("peer_serial".into(), Value::from("3f9a"));
    m.insert("protocol".into(), Value::from("http"));
    m.insert("method".into(), "GET".into());
    m.insert("path".into(), "/items/7".into());
    // `Verdict::audit_into` as it was (it now goes through `audit_fields`).
    if let Verdict::Decided(d) = verdict
        && let DecidedBy::Rule(r) = &d.decided_by
    {
        m.insert("decision".into(), Value::from("allow"));
        m.insert("enforced".into(), Value::from(d.enforced));
        m.insert("rule".into(), Value::from(r.as_ref()));
        m.insert("decision_id".into(), Value::from(d.decision_id.as_str()));
        m.insert(
            "policy_version".into(),
            Value::from(d.policy_version.as_ref()),
        );
    }
    m.insert("port".into(), 8080.into());
    m.insert("trace_id".into(), TRACE.into());
    let decision = strict.then(|| hashed(record("http.request", m.clone()).line()));
    if strict {
        m.retain(|k, _| RESPONSE_FIELDS.contains(&k.as_str()));
    }
    m.insert("status".into(), 200.into());
    m.insert("duration_ms".into(), 3.into());
    let kind = if strict {
        "http.response"
    } else {
        "http.request"
    };
    (decision, hashed(record(kind, m).line()))
}

fn hashed(line: Vec<u8>) -> Vec<u8> {
    black_box(line_hash(&line));
    line
}

/// The hash as the spool keeps it now: hex on the stack, no `String` per record.
fn hashed_on_stack(line: Vec<u8>) -> Vec<u8> {
    black_box(LineHash::of(&line));
    line
}

fn record(kind: &str, fields: Map<String, Value>) -> Record {
    Record {
        v: VERSION,
        source: SOURCE.to_owned(),
        epoch: EPOCH.to_owned(),
        seq: 41,
        prev: PREV.to_owned(),
        ts_ms: 1_767_225_600_123,
        kind: kind.to_owned(),
        fields,
    }
}

fn list_line(kind: &str, f: FieldList) -> Vec<u8> {
    hashed_on_stack(line(
        SOURCE,
        EPOCH,
        41,
        PREV,
        1_767_225_600_123,
        kind,
        &Fields::List(f),
    ))
}

/// The record as the sidecar builds it now (`conn::http::record::RequestRecord`).
fn list_lines(base: &FieldList, verdict: &Verdict, strict: bool) -> Lines {
    let mut f = base.with_room(16);
    f.insert("method", Field::Static("GET"));
    f.insert("path", Field::Owned("/items/7".to_owned()));
    verdict.audit_fields(&mut f);
    f.insert("port", Field::U64(8080));
    f.insert("trace_id", Field::Owned(TRACE.to_owned()));
    let decision = strict.then(|| {
        let response = f.subset(|k| RESPONSE_FIELDS.contains(&k), RESPONSE_FIELDS.len());
        list_line("http.request", std::mem::replace(&mut f, response))
    });
    if strict {
        f.retain(|k| RESPONSE_FIELDS.contains(&k));
    }
    f.insert("status", Field::U64(200));
    f.insert("duration_ms", Field::U64(3));
    let kind = if strict {
        "http.response"
    } else {
        "http.request"
    };
    (decision, list_line(kind, f))
}

#[divan::bench(args = [false, true])]
fn map(bencher: Bencher, strict: bool) {
    let v = verdict();
    bencher.bench_local(|| map_lines(black_box(&v), strict));
}

/// The chained line's SHA-256 and hex alone, the old way (a `String` per record) and the
/// spool's (hex on the stack).
#[divan::bench(args = ["string", "stack"])]
fn hash(bencher: Bencher, how: &str) {
    let (_, line) = list_lines(&base(), &verdict(), false);
    match how {
        "string" => bencher.bench_local(|| line_hash(black_box(&line)).len()),
        _ => bencher.bench_local(|| LineHash::of(black_box(&line)).as_str().len()),
    }
}

#[divan::bench(args = [false, true])]
fn list(bencher: Bencher, strict: bool) {
    let (b, v) = (base(), verdict());
    bencher.bench_local(|| list_lines(black_box(&b), black_box(&v), strict));
}
