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
            IngestError::NotYours { .. } => 403,
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

/// Stores a batch of JSON lines from `peer`. Returns the highest seq stored, per chain (a
/// batch normally holds one chain).
pub fn ingest(ca: &Ca, peer: Option<&SvidInfo>, body: &[u8]) -> Result<u64, IngestError> {
    let peer = peer.ok_or(IngestError::Unauthenticated)?;
    let caller = peer.id.to_string();
    let mut by_chain: Vec<(String, Vec<AuditRow>)> = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let r: Record = serde_json::from_slice(line)
            .map_err(|e| IngestError::Malformed(i + 1, e.to_string()))?;
        if r.source != caller {
            return Err(IngestError::NotYours {
                line: i + 1,
                claimed: r.source,
                caller,
            });
        }
        let chain = r.chain();
        let row = AuditRow {
            chain: chain.clone(),
            seq: r.seq,
            prev: r.prev.clone(),
            hash: line_hash(line),
            source: r.source.clone(),
            ts_ms: r.ts_ms,
            kind: r.kind.clone(),
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
    for chain in store.audit_chains()? {
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
