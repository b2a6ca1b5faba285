//! `POST /v1/audit`: a sidecar's batch of records, stored exactly once, in order, its hash
//! chain checked against what the control plane already holds.

use serde_json::json;

use crate::identity::audit::LineHash;
use crate::identity::svid::SvidInfo;
use crate::server::ca::Ca;
use crate::server::store::{AuditConflict, AuditRow, StoreError};

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
            // The database is down or full: nothing was stored; the sidecar keeps the records
            // spooled and delivers them again.
            IngestError::Store(StoreError::Unwritable(_)) => 503,
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
            IngestError::Store(StoreError::Unwritable(_)) => "store_unavailable",
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
pub(super) struct RecordHead<'a> {
    #[allow(dead_code)] // required (a line without it is malformed), not used
    pub(super) v: u8,
    #[serde(borrow)]
    pub(super) source: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(super) epoch: std::borrow::Cow<'a, str>,
    pub(super) seq: u64,
    #[serde(borrow)]
    pub(super) prev: std::borrow::Cow<'a, str>,
    pub(super) ts_ms: i64,
    #[serde(borrow)]
    pub(super) kind: std::borrow::Cow<'a, str>,
}

/// Stores a batch of JSON lines from `peer`. Returns the highest seq stored, per chain (a
/// batch normally holds one chain).
pub fn ingest(ca: &Ca, peer: Option<&SvidInfo>, body: &[u8]) -> Result<u64, IngestError> {
    let peer = peer.ok_or(IngestError::Unauthenticated)?;
    // The control plane's own chain is written in process only: no record in its name (or in
    // its namespace) is taken over the network, whoever presents it.
    if crate::identity::id::is_reserved(&peer.id) {
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
        // A batch normally holds one chain: its name is built once, not per line.
        // (Every line's source is the caller's.)
        let same = by_chain.last().is_some_and(|(c, _)| {
            c.strip_prefix(caller.as_str())
                .and_then(|e| e.strip_prefix('#'))
                == Some(&*r.epoch)
        });
        if !same {
            by_chain.push((format!("{}#{}", r.source, r.epoch), Vec::new()));
        }
        let Some((chain, rows)) = by_chain.last_mut() else {
            continue;
        };
        rows.push(AuditRow {
            chain: chain.clone(),
            seq: r.seq,
            prev: r.prev.into_owned(),
            hash: LineHash::of(line).as_str().to_owned(),
            source: r.source.into_owned(),
            ts_ms: r.ts_ms,
            kind: r.kind.into_owned(),
            line: line.to_vec(),
        });
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

/// The JSON answer of a stored batch.
pub fn acked_body(acked: u64) -> String {
    json!({ "acked": acked }).to_string()
}
