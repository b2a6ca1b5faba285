//! Audit collection: `POST /v1/audit` stores a sidecar's records (exactly once, in order, hash
//! chain checked), the control plane's own events are a chain of their own with signed
//! checkpoints, and `audit verify` checks every chain.

use std::sync::Arc;

use serde_json::json;
use time::OffsetDateTime;

use super::ca::Ca;
use crate::audit::{
    Record, checkpoint_fields, checkpoint_message, line_hash, sign_with, verify_lines,
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
    }
    Ok(acked)
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
    pub result: Result<crate::audit::ChainSummary, crate::audit::ChainError>,
}

/// Verifies every chain in the store against the trust bundle.
pub fn verify_all(store: &dyn Store, bundles: &BundleSet) -> Result<Vec<ChainReport>, StoreError> {
    let mut out = Vec::new();
    let own = store.own_chain()?;
    for chain in store.audit_chains()? {
        let source = chain.split('#').next().unwrap_or_default();
        let reserved = crate::id::parse_id(source).is_ok_and(|id| crate::id::is_reserved(&id));
        if reserved && own.as_deref() != Some(chain.as_str()) {
            let own = own.clone().unwrap_or_default();
            let result = Err(crate::audit::ChainError::Impostor {
                chain: chain.clone(),
                own,
            });
            out.push(ChainReport { chain, result });
            continue;
        }
        let lines = store.audit_lines(&chain)?;
        let result = verify_lines(&chain, lines.iter().map(Vec::as_slice), Some(bundles));
        out.push(ChainReport { chain, result });
    }
    Ok(out)
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
