//! Audit collection: `POST /v1/audit` stores a sidecar's records (exactly once, in order, hash
//! chain checked), the control plane's own events are a chain of their own with signed
//! checkpoints, and `audit verify` checks every chain.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use time::OffsetDateTime;
use tracing::{debug, warn};

use super::ca::Ca;
use crate::audit::{
    ChainError, ChainSummary, Record, checkpoint_fields, checkpoint_message, line_hash, sign_with,
    verify_lines,
};
use crate::bundle::BundleSet;
use crate::store::{AuditConflict, AuditRow, Store, StoreError};
use crate::svid::SvidInfo;

/// Why a batch was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No client certificate.
    #[error("audit records must be sent over mTLS with the writer's SVID")]
    Unauthenticated,
    /// A line does not parse.
    #[error("audit line {0} does not parse: {1}")]
    Malformed(usize, String),
    /// A record claims another writer.
    #[error("audit line {line} is from {claimed}, but the caller is {caller}")]
    NotYours {
        /// Line number.
        line: usize,
        /// Claimed source.
        claimed: String,
        /// Authenticated caller.
        caller: String,
    },
    /// The caller holds an ID of the control plane's reserved namespace: its chain is written
    /// in process only, never over the network.
    #[error(
        "audit records in the name of {0} are not accepted over the network: the control plane writes its own chain itself"
    )]
    Reserved(String),
    /// The batch does not continue the stored chain.
    #[error(transparent)]
    Conflict(#[from] AuditConflict),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            IngestError::Unauthenticated => 401,
            IngestError::Malformed(..) => 400,
            IngestError::NotYours { .. } | IngestError::Reserved(_) => 403,
            IngestError::Conflict(_) => 409,
            IngestError::Store(_) => 500,
        }
    }

    /// Reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            IngestError::Unauthenticated => "unauthenticated",
            IngestError::Malformed(..) => "bad_record",
            IngestError::NotYours { .. } => "not_yours",
            IngestError::Reserved(_) => "reserved_chain",
            IngestError::Conflict(AuditConflict::Gap { .. }) => "audit_gap",
            IngestError::Conflict(AuditConflict::Diverged { .. }) => "audit_diverged",
            IngestError::Store(_) => "internal",
        }
    }

    /// The seq the store expects next, for a gap.
    pub fn expected(&self) -> Option<u64> {
        match self {
            IngestError::Conflict(AuditConflict::Gap { expected, .. }) => Some(*expected),
            _ => None,
        }
    }
}

/// The chain fields of a record line, borrowed where the JSON allows.
#[derive(serde::Deserialize)]
struct RecordHead<'a> {
    #[allow(dead_code)] // required (a line without it is malformed), not used
    v: u8,
    #[serde(borrow)]
    source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    epoch: std::borrow::Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    prev: std::borrow::Cow<'a, str>,
    ts_ms: i64,
    #[serde(borrow)]
    kind: std::borrow::Cow<'a, str>,
}

/// Stores a batch of JSON lines from `peer`. Returns the highest seq stored, per chain (a
/// batch normally holds one chain).
pub fn ingest(ca: &Ca, peer: Option<&SvidInfo>, body: &[u8]) -> Result<u64, IngestError> {
    let peer = peer.ok_or(IngestError::Unauthenticated)?;
    // The control plane's own chain is written in process only: no record in its name (or in
    // its namespace) is taken over the network, whoever presents it.
    if crate::id::is_reserved(&peer.id) {
        return Err(IngestError::Reserved(peer.id.to_string()));
    }
    let caller = peer.id.to_string();
    let mut by_chain: Vec<(String, Vec<AuditRow>)> = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        // Only the chain fields are needed to store a record: the event's own fields are
        // checked for JSON syntax and skipped, not built.
        let r: RecordHead = serde_json::from_slice(line)
            .map_err(|e| IngestError::Malformed(i + 1, e.to_string()))?;
        if r.source != caller {
            return Err(IngestError::NotYours {
                line: i + 1,
                claimed: r.source.into_owned(),
                caller,
            });
        }
        let chain = format!("{}#{}", r.source, r.epoch);
        let row = AuditRow {
            chain: chain.clone(),
            seq: r.seq,
            prev: r.prev.into_owned(),
            hash: line_hash(line),
            source: r.source.into_owned(),
            ts_ms: r.ts_ms,
            kind: r.kind.into_owned(),
            line: line.to_vec(),
        };
        match by_chain.last_mut() {
            Some((c, rows)) if *c == chain => rows.push(row),
            _ => by_chain.push((chain, vec![row])),
        }
    }
    let mut acked = 0;
    for (chain, rows) in &by_chain {
        acked = ca.store().audit_append(chain, rows)??;
        ca.metrics.audit_records.inc_by(rows.len() as u64);
        // The head this batch moved the chain to, for the next anchor (a batch of records
        // all stored before moves nothing).
        if let Some(head) = rows.iter().find(|r| r.seq == acked) {
            ca.pending.advanced(chain, head.seq, &head.hash);
        }
    }
    Ok(acked)
}

/// How often the control plane anchors the sidecar chains that advanced, writes a `gap` for
/// events it could not store, and signs a checkpoint of its own chain, while there is
/// anything to write.
pub const ANCHOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// What the control plane still has to write on its own chain: the heads of sidecar chains
/// acknowledged since the last anchor, and the events it could not store.
#[derive(Debug, Default)]
pub struct Pending {
    heads: Mutex<BTreeMap<String, (u64, String)>>,
    lost: Mutex<Lost>,
}

/// Control-plane events that could not be stored.
#[derive(Debug, Default)]
struct Lost {
    count: u64,
    kinds: BTreeMap<String, u64>,
    first_ms: i64,
    last_ms: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pending {
    /// Notes that `chain` was stored up to `seq`, whose line hashes to `hash`.
    pub fn advanced(&self, chain: &str, seq: u64, hash: &str) {
        let mut heads = lock(&self.heads);
        match heads.get_mut(chain) {
            Some(h) if h.0 >= seq => {}
            Some(h) => *h = (seq, hash.to_owned()),
            None => {
                heads.insert(chain.to_owned(), (seq, hash.to_owned()));
            }
        }
    }

    /// Notes a control-plane event of `kind` at `at_ms` that could not be stored.
    pub fn lost(&self, kind: &str, at_ms: i64) {
        let mut l = lock(&self.lost);
        if l.count == 0 {
            l.first_ms = at_ms;
        }
        l.count += 1;
        l.last_ms = at_ms;
        *l.kinds.entry(kind.to_owned()).or_default() += 1;
    }

    /// How many events are lost and not yet recorded as such.
    pub fn lost_count(&self) -> u64 {
        lock(&self.lost).count
    }
}

/// Appends a `gap` record to the control plane's own chain for the events it could not store
/// (how many, of which kinds, between which times), once it can write again.
pub fn record_lost(ca: &Ca) -> Result<(), StoreError> {
    let lost = std::mem::take(&mut *lock(&ca.pending.lost));
    if lost.count == 0 {
        return Ok(());
    }
    let detail = json!({
        "reason": "store_unwritable", "lost_events": lost.count, "lost_kinds": lost.kinds,
        "first_lost_ms": lost.first_ms, "last_lost_ms": lost.last_ms,
    });
    match ca
        .store()
        .append_event(OffsetDateTime::now_utc(), "gap", &detail.to_string())
    {
        Ok(_) => {
            warn!(
                lost = lost.count,
                kinds = %serde_json::to_string(&lost.kinds).unwrap_or_default(),
                "recorded a gap on the control plane's audit chain for events that could not be stored"
            );
            Ok(())
        }
        Err(e) => {
            // Put them back (with any lost since) for the next attempt.
            let mut l = lock(&ca.pending.lost);
            l.count += lost.count;
            l.first_ms = if l.first_ms == 0 {
                lost.first_ms
            } else {
                l.first_ms.min(lost.first_ms)
            };
            l.last_ms = l.last_ms.max(lost.last_ms);
            for (k, n) in lost.kinds {
                *l.kinds.entry(k).or_default() += n;
            }
            Err(e)
        }
    }
}

/// Appends one `audit.anchor` event to the control plane's own chain with the head of every
/// sidecar chain that advanced since the last one (`{"chains": {chain: {seq, hash}}}`), so
/// that `audit verify` detects a dropped tail or chain, and a rewrite, up to it.
pub fn anchor(ca: &Ca) -> Result<(), StoreError> {
    let heads = std::mem::take(&mut *lock(&ca.pending.heads));
    if heads.is_empty() {
        return Ok(());
    }
    let chains: serde_json::Map<String, serde_json::Value> = heads
        .iter()
        .map(|(c, (seq, hash))| (c.clone(), json!({ "seq": seq, "hash": hash })))
        .collect();
    let detail = json!({ "chains": chains }).to_string();
    match ca
        .store()
        .append_event(OffsetDateTime::now_utc(), ANCHOR_KIND, &detail)
    {
        Ok(_) => Ok(()),
        Err(e) => {
            for (c, (seq, hash)) in heads {
                ca.pending.advanced(&c, seq, &hash);
            }
            Err(e)
        }
    }
}

/// The kind of the control plane's anchor events.
pub const ANCHOR_KIND: &str = "audit.anchor";

/// Sets the `store_writable` gauge, probing a store that could not write so that it notices
/// by itself when space returns (the store logs each change). Returns whether it can write.
pub fn check_store(ca: &Ca) -> bool {
    let store = ca.store();
    if store.unwritable().is_some() {
        let _ = store.probe_write();
    }
    let writable = store.unwritable().is_none();
    ca.metrics.store_writable.set(i64::from(writable));
    writable
}

/// One round of the control plane's own audit upkeep: notice the store's condition, record
/// lost events, anchor advanced chains, sign a checkpoint. Cheap when there is nothing to do.
pub fn settle(ca: &Arc<Ca>) {
    if !check_store(ca) {
        return;
    }
    let done = record_lost(ca)
        .map_err(|e| ("record lost events", e))
        .and_then(|()| anchor(ca).map_err(|e| ("anchor the sidecar chains", e)))
        .and_then(|()| checkpoint_own(ca).map_err(|e| ("sign a checkpoint", e)));
    match done {
        Ok(()) => {}
        // Said once by the store, at the transition.
        Err((what, e @ StoreError::Unwritable(_))) => debug!(error = %e, "cannot {what}"),
        Err((what, e)) => warn!(error = %e, "cannot {what} on the control plane's audit chain"),
    }
}

/// Writes a signed checkpoint on the control plane's own chain if events were added since the
/// last one.
pub fn checkpoint_own(ca: &Arc<Ca>) -> Result<(), StoreError> {
    let store = ca.store();
    let Some(chain) = store.own_chain()? else {
        return Ok(());
    };
    if store
        .last_own_kind()?
        .is_none_or(|kind| kind == "checkpoint")
    {
        return Ok(());
    }
    let Some(svid) = ca.credentials().get() else {
        return Ok(());
    };
    let source = ca.ca_id().to_string();
    let epoch = chain.rsplit('#').next().unwrap_or_default().to_owned();
    store.append_own(OffsetDateTime::now_utc(), "checkpoint", &|seq, prev| {
        let msg = checkpoint_message(&source, &epoch, seq, prev);
        match sign_with(&svid.certified, &msg) {
            Some(sig) => checkpoint_fields(&sig, &svid.certified.cert),
            None => serde_json::Map::new(),
        }
    })?;
    Ok(())
}

/// One chain's verification result.
#[derive(Debug)]
pub struct ChainReport {
    /// The chain key.
    pub chain: String,
    /// Ok with a summary, or the first broken record.
    pub result: Result<ChainSummary, ChainError>,
}

/// Verifies every chain in the store against the trust bundle: each chain complete from seq 1
/// and unbroken, its checkpoints signed, every stored column equal to what the record's line
/// says, and every chain the control plane anchored on its own chain still there, reaching at
/// least the anchored seq with the anchored record.
pub fn verify_all(store: &dyn Store, bundles: &BundleSet) -> Result<Vec<ChainReport>, StoreError> {
    let own = store.own_chain()?;
    let chains = store.audit_chains()?;
    // The control plane's own chain first: it holds the anchors of the others.
    let mut anchors = BTreeMap::new();
    let mut own_report = None;
    if let Some(own) = own.as_deref().filter(|o| chains.iter().any(|c| c == o)) {
        let rows = store.audit_rows(own)?;
        anchors = anchors_in(&rows);
        own_report = Some(ChainReport {
            chain: own.to_owned(),
            result: verify_rows(own, &rows, bundles),
        });
    }
    let mut out = Vec::new();
    for chain in chains {
        if own.as_deref() == Some(chain.as_str()) {
            out.extend(own_report.take());
            continue;
        }
        let source = chain.split('#').next().unwrap_or_default();
        let reserved = crate::id::parse_id(source).is_ok_and(|id| crate::id::is_reserved(&id));
        if reserved {
            let result = Err(ChainError::Impostor {
                chain: chain.clone(),
                own: own.clone().unwrap_or_default(),
            });
            out.push(ChainReport { chain, result });
            continue;
        }
        let rows = store.audit_rows(&chain)?;
        let anchor = anchors.remove(&chain);
        let result = verify_rows(&chain, &rows, bundles).and_then(|summary| {
            match anchor {
                Some((seq, hash)) => check_anchor(&chain, &rows, seq, &hash),
                None => Ok(()),
            }
            .map(|()| summary)
        });
        out.push(ChainReport { chain, result });
    }
    // Anchored chains of which nothing is left.
    for (chain, (anchored, _)) in anchors {
        let result = Err(ChainError::Missing {
            chain: chain.clone(),
            anchored,
        });
        out.push(ChainReport { chain, result });
    }
    Ok(out)
}

/// One chain's stored rows: the chain of lines, then every column against its line, then that
/// the chain starts at seq 1 (the store only ever starts one there).
fn verify_rows(
    chain: &str,
    rows: &[AuditRow],
    bundles: &BundleSet,
) -> Result<ChainSummary, ChainError> {
    let summary = verify_lines(chain, rows.iter().map(|r| r.line.as_slice()), Some(bundles))?;
    check_columns(chain, rows)?;
    if let Some(first) = rows.first().filter(|r| r.seq != 1) {
        return Err(ChainError::Gap {
            chain: chain.to_owned(),
            expected: 1,
            found: first.seq,
        });
    }
    Ok(summary)
}

/// Checks that every column stored beside a record (its chain, seq, prev, hash, source, time
/// and kind, which `audit query` and the chain check read) says what the record's line says.
fn check_columns(chain: &str, rows: &[AuditRow]) -> Result<(), ChainError> {
    for (i, row) in rows.iter().enumerate() {
        let r: RecordHead =
            serde_json::from_slice(&row.line).map_err(|e| ChainError::Malformed {
                chain: chain.to_owned(),
                position: i + 1,
                reason: e.to_string(),
            })?;
        let recorded_chain = format!("{}#{}", r.source, r.epoch);
        let columns: [(&'static str, String, String); 7] = [
            ("chain", row.chain.clone(), recorded_chain),
            ("seq", row.seq.to_string(), r.seq.to_string()),
            ("prev", row.prev.clone(), r.prev.into_owned()),
            ("hash", row.hash.clone(), line_hash(&row.line)),
            ("source", row.source.clone(), r.source.into_owned()),
            ("ts_ms", row.ts_ms.to_string(), r.ts_ms.to_string()),
            ("kind", row.kind.clone(), r.kind.into_owned()),
        ];
        if let Some((column, stored, recorded)) = columns.into_iter().find(|(_, a, b)| a != b) {
            return Err(ChainError::Column {
                chain: chain.to_owned(),
                seq: r.seq,
                column,
                stored,
                recorded,
            });
        }
    }
    Ok(())
}

/// The latest anchor of every sidecar chain on the control plane's own chain: chain ->
/// (seq, hash).
fn anchors_in(rows: &[AuditRow]) -> BTreeMap<String, (u64, String)> {
    let mut out: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.kind == ANCHOR_KIND) {
        let Ok(r) = serde_json::from_slice::<Record>(&row.line) else {
            continue;
        };
        let Some(chains) = r.fields.get("chains").and_then(|c| c.as_object()) else {
            continue;
        };
        for (chain, head) in chains {
            let seq = head.get("seq").and_then(|s| s.as_u64());
            let hash = head.get("hash").and_then(|h| h.as_str());
            if let (Some(seq), Some(hash)) = (seq, hash)
                && out.get(chain).is_none_or(|(s, _)| *s < seq)
            {
                out.insert(chain.clone(), (seq, hash.to_owned()));
            }
        }
    }
    out
}

/// Checks a verified chain against its latest anchor: it reaches the anchored seq, and the
/// record there is the one anchored.
fn check_anchor(chain: &str, rows: &[AuditRow], seq: u64, hash: &str) -> Result<(), ChainError> {
    let last = rows.last().map_or(0, |r| r.seq);
    if last < seq {
        return Err(ChainError::Truncated {
            chain: chain.to_owned(),
            anchored: seq,
            last,
        });
    }
    match rows.iter().find(|r| r.seq == seq) {
        Some(r) if line_hash(&r.line) == hash => Ok(()),
        _ => Err(ChainError::AnchorMismatch {
            chain: chain.to_owned(),
            seq,
        }),
    }
}

/// A one-line human rendering of a record for `audit tail` / `audit query`.
pub fn render(line: &[u8]) -> String {
    let Ok(r) = serde_json::from_slice::<Record>(line) else {
        return String::from_utf8_lossy(line).into_owned();
    };
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.ts_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let f = |k: &str| {
        r.fields
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let detail = match r.kind.as_str() {
        "http.request" => format!(
            "{} {} {} -> {} {} {} ({}) {}",
            f("direction"),
            f("peer_id"),
            f("method"),
            f("path"),
            r.fields
                .get("status")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            f("decision"),
            if f("grant").is_empty() {
                f("rule")
            } else {
                format!("grant {}", f("grant"))
            },
            f("decision_id"),
        ),
        k if k.starts_with("connection.") => format!(
            "{} {} {} ({}) {}{}",
            f("direction"),
            f("peer_id"),
            f("decision"),
            if f("grant").is_empty() {
                f("rule")
            } else {
                format!("grant {}", f("grant"))
            },
            f("decision_id"),
            if k == "connection.close" {
                format!(" end={}", f("end"))
            } else {
                String::new()
            },
        ),
        _ => {
            let mut m = r.fields.clone();
            m.remove("sig");
            m.remove("cert");
            serde_json::Value::Object(m).to_string()
        }
    };
    format!("{t} {} #{} {:<18} {detail}", r.source, r.seq, r.kind)
}

/// The JSON answer of a stored batch.
pub fn acked_body(acked: u64) -> String {
    json!({ "acked": acked }).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::authority::{Authorities, AuthorityConfig};
    use crate::store::SqliteStore;

    const WHO: &str = "spiffe://mayfly.local/web";

    fn ca() -> Arc<Ca> {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let td = crate::id::parse_trust_domain("mayfly.local").unwrap();
        let a =
            Authorities::init(td, AuthorityConfig::default(), OffsetDateTime::now_utc()).unwrap();
        store.save_authorities(&a).unwrap();
        store.set_setting("trust_domain", "mayfly.local").unwrap();
        let dist = super::super::distribution::Distribution::new(None).unwrap();
        Ca::start(store, a, super::super::CaSettings::default(), dist).unwrap()
    }

    fn peer(id: &str) -> SvidInfo {
        let now = OffsetDateTime::now_utc();
        SvidInfo {
            id: crate::id::parse_workload_id(id).unwrap(),
            serial: "01".into(),
            not_before: now,
            not_after: now + time::Duration::hours(1),
        }
    }

    /// `n` chained lines from `source`, starting at seq 1, with a kind that needs escaping.
    fn lines(source: &str, n: u64) -> Vec<Vec<u8>> {
        let mut prev = crate::audit::GENESIS.to_owned();
        (1..=n)
            .map(|seq| {
                let mut fields = serde_json::Map::new();
                fields.insert("path".into(), "/a\"b\\c\u{e9}".into());
                let r = Record {
                    v: crate::audit::VERSION,
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
}
