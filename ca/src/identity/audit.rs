//! Tamper-evident audit records: the format every writer (sidecars, the control plane) uses,
//! the hash chain, and signed checkpoints. Pure functions; no I/O.
//!
//! A record is one JSON line. Its hash is the SHA-256 of exactly those bytes; the next record
//! of the same chain carries it in `prev`. A chain is one writer's history (`source`, the
//! writer's SPIFFE ID, plus `epoch`, which changes when a writer loses its local state).
//! Periodic `checkpoint` records are signed with the writer's SVID key, so a rewritten tail
//! (edit a record, recompute every later hash) is caught too.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::identity::bundle::BundleSet;
use crate::identity::keys::sha256;
use crate::identity::verify::{Usage, algorithms, verify_chain};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Record format version.
pub const VERSION: u8 = 1;
/// Signature algorithm of checkpoints.
pub const CHECKPOINT_ALG: &str = "ecdsa-p256-sha256";

/// Every record kind a sidecar or the control plane writes: what `audit query --kind` accepts.
/// A kind written anywhere must be listed here (README, "Audit records", lists them too).
pub const KINDS: &[&str] = &[
    // Sidecars.
    "connection.open",
    "connection.close",
    "connection.denied",
    "http.request",
    "http.response",
    "checkpoint",
    "checkpoint.rechained",
    "gap",
    "workload_api.svid",
    "workload_api.jwt_svid",
    "workload_api.jwt_validated",
    "workload_api.denied",
    // The control plane.
    "ca.init",
    "ca.rotation",
    "svid.issued",
    "svid.refused",
    "svid.minted",
    "jwt.minted",
    "token.created",
    "token.used",
    "token.refused",
    "token.revoked",
    "attestation.refused",
    "admin.refused",
    "admin.break_glass",
    "admin.operation",
    "policy.loaded",
    "policy.refused",
    "policy.published",
    "policy.superseded",
    "kek.rotated",
    "grant.requested",
    "grant.activated",
    "grant.approved",
    "grant.denied",
    "grant.revoked",
    "grant.expired",
    "grant.self_approval_refused",
    "access.requested",
    "access.approved",
    "access.denied",
    "access.revoked",
    "access.refused",
    "endpoint.registered",
    "endpoint.removed",
    "user.signed_in",
    "user.sign_in_refused",
    "audit.anchor",
];

/// The values of a record's `decision` field: what `audit query --decision` accepts.
pub const DECISIONS: &[&str] = &["allow", "deny"];

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Format version.
    pub v: u8,
    /// The writer's SPIFFE ID.
    pub source: String,
    /// The writer's chain epoch (random, fixed for the life of its local state).
    pub epoch: String,
    /// Position in the chain, from 1, no gaps.
    pub seq: u64,
    /// Hex SHA-256 of the previous record's line ([`GENESIS`] for seq 1).
    pub prev: String,
    /// Unix time in milliseconds.
    pub ts_ms: i64,
    /// What happened: `connection.open`, `connection.close`, `connection.denied`,
    /// `http.request`, `checkpoint`, `gap`, or a control-plane event such as `svid.issued`.
    pub kind: String,
    /// The event's fields.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Record {
    /// The canonical line (no trailing newline).
    pub fn line(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The chain key `source#epoch`.
    pub fn chain(&self) -> String {
        format!("{}#{}", self.source, self.epoch)
    }
}

/// Hex SHA-256 of a record line.
pub fn line_hash(line: &[u8]) -> String {
    LineHash::of(line).as_str().to_owned()
}

/// Hex SHA-256 of a record line, on the stack: what a writer or the ingest keeps per record
/// without a `String` of its own (the same text as [`line_hash`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct LineHash([u8; 64]);

impl LineHash {
    /// The hash of `line`.
    pub fn of(line: &[u8]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 64];
        for (pair, b) in out.chunks_exact_mut(2).zip(sha256(line)) {
            pair[0] = HEX[usize::from(b >> 4)];
            pair[1] = HEX[usize::from(b & 0xf)];
        }
        Self(out)
    }

    /// The lowercase hex text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for LineHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(source: &str, epoch: &str, seq: u64, prev: &str) -> Vec<u8> {
    format!("mayfly-audit-checkpoint/v1\n{source}\n{epoch}\n{seq}\n{prev}").into_bytes()
}

/// Builds the fields of a checkpoint: signature over [`checkpoint_message`] and the signer's
/// certificate chain.
pub fn checkpoint_fields(signature: &[u8], chain: &[CertificateDer<'_>]) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("alg".into(), Value::String(CHECKPOINT_ALG.into()));
    m.insert("sig".into(), Value::String(STANDARD.encode(signature)));
    m.insert(
        "cert".into(),
        Value::Array(
            chain
                .iter()
                .map(|c| Value::String(STANDARD.encode(c)))
                .collect(),
        ),
    );
    m
}

/// Signs a checkpoint message with an SVID's key (ECDSA P-256, the mayfly default).
pub fn sign_with(certified: &rustls::sign::CertifiedKey, msg: &[u8]) -> Option<Vec<u8>> {
    let signer = certified
        .key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])?;
    signer.sign(msg).ok()
}

/// Why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// A stored line does not parse as a record.
    #[error("record {position} of {chain} does not parse: {reason}")]
    Malformed {
        /// Chain.
        chain: String,
        /// 1-based position in the stored chain.
        position: usize,
        /// Why.
        reason: String,
    },
    /// A sequence number is missing (a record was deleted) or out of order.
    #[error(
        "{chain}: expected record seq {expected}, found seq {found} (a record is missing or out of order)"
    )]
    Gap {
        /// Chain.
        chain: String,
        /// Expected seq.
        expected: u64,
        /// Found seq.
        found: u64,
    },
    /// A record's `prev` does not match the previous record's hash (the previous record was
    /// edited, or records were reordered).
    #[error(
        "{chain}: record seq {seq} does not follow record seq {prev_seq}: record {prev_seq} was altered or records were reordered"
    )]
    Broken {
        /// Chain.
        chain: String,
        /// The record whose `prev` mismatches.
        seq: u64,
        /// The record before it.
        prev_seq: u64,
    },
    /// A checkpoint's signature or certificate does not verify.
    #[error("{chain}: checkpoint seq {seq} is not validly signed: {reason}")]
    BadCheckpoint {
        /// Chain.
        chain: String,
        /// Checkpoint seq.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A stored column (kept beside the line for lookups) does not say what the record's line
    /// says: the index was edited, to hide a record from `audit query` or to move it.
    #[error(
        "{chain}: record seq {seq}: the stored {column} column is {stored:?} but the record says {recorded:?} (the stored index was edited)"
    )]
    Column {
        /// Chain.
        chain: String,
        /// The record's seq (from its line).
        seq: u64,
        /// Column name.
        column: &'static str,
        /// What the column holds.
        stored: String,
        /// What the record's line says.
        recorded: String,
    },
    /// The control plane anchored this chain at a seq the store no longer reaches: its tail
    /// was deleted.
    #[error(
        "{chain}: the control plane anchored this chain at seq {anchored}, but it ends at seq {last}: records after seq {last} were deleted"
    )]
    Truncated {
        /// Chain.
        chain: String,
        /// The anchored seq.
        anchored: u64,
        /// The last stored seq.
        last: u64,
    },
    /// The control plane anchored this chain, and the store no longer holds any of it.
    #[error(
        "{chain}: the control plane anchored this chain at seq {anchored}, but the store holds none of it: the chain was deleted"
    )]
    Missing {
        /// Chain.
        chain: String,
        /// The anchored seq.
        anchored: u64,
    },
    /// The record at an anchored seq is not the one the control plane anchored: it, or a
    /// record before it, was rewritten (hashes recomputed).
    #[error(
        "{chain}: record seq {seq} is not the record the control plane anchored: records up to seq {seq} were rewritten"
    )]
    AnchorMismatch {
        /// Chain.
        chain: String,
        /// The anchored seq.
        seq: u64,
    },
    /// The chain is in the control plane's name (a reserved ID) but is not the chain the
    /// control plane writes itself: someone else's records posing as control-plane events.
    #[error(
        "{chain}: records in the control plane's name that the control plane did not write (its own chain is {own})"
    )]
    Impostor {
        /// Chain.
        chain: String,
        /// The control plane's own chain.
        own: String,
    },
}

impl ChainError {
    /// The seq of the first record found broken, when known.
    pub fn seq(&self) -> Option<u64> {
        match self {
            ChainError::Malformed { .. } | ChainError::Impostor { .. } => None,
            ChainError::Gap { expected, .. } => Some(*expected),
            ChainError::Broken { prev_seq, .. } => Some(*prev_seq),
            ChainError::BadCheckpoint { seq, .. }
            | ChainError::Column { seq, .. }
            | ChainError::AnchorMismatch { seq, .. } => Some(*seq),
            ChainError::Truncated { last, .. } => Some(last + 1),
            ChainError::Missing { .. } => Some(1),
        }
    }
}

/// What a successful verification saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainSummary {
    /// Records checked.
    pub records: u64,
    /// Checkpoints whose signatures verified.
    pub checkpoints: u64,
    /// Last seq.
    pub last_seq: u64,
}

/// Why a checkpoint's signature does not hold (the `reason` of
/// [`ChainError::BadCheckpoint`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// No signature, or not base64.
    #[error("missing or undecodable signature")]
    Signature,
    /// No certificate chain.
    #[error("missing certificate chain")]
    NoChain,
    /// A certificate is not base64.
    #[error("undecodable certificate")]
    Certificate,
    /// The chain is empty.
    #[error("empty certificate chain")]
    EmptyChain,
    /// The signing certificate is not an X.509-SVID.
    #[error("{0}")]
    Profile(#[from] crate::identity::svid::ProfileError),
    /// Signed by someone other than the chain's writer.
    #[error("signed by {signer}, not by the chain's writer {writer}")]
    WrongSigner {
        /// The SVID's ID.
        signer: String,
        /// The chain's writer.
        writer: String,
    },
    /// A reserved ID without the control-plane mark.
    #[error(
        "signed with a certificate for {0} that lacks the control-plane mark: not the control plane"
    )]
    NotControlPlane(String),
    /// The certificate does not chain to the bundle at the checkpoint's time.
    #[error("{0}")]
    Untrusted(#[from] crate::identity::verify::VerifyError),
    /// webpki cannot parse the certificate.
    #[error("{0}")]
    EndEntity(String),
    /// The signature does not verify.
    #[error("signature does not verify ({0})")]
    BadSignature(String),
}

fn verify_checkpoint(r: &Record, bundles: Option<&BundleSet>) -> Result<(), CheckpointError> {
    let sig = r
        .fields
        .get("sig")
        .and_then(Value::as_str)
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or(CheckpointError::Signature)?;
    let certs: Vec<CertificateDer<'static>> = r
        .fields
        .get("cert")
        .and_then(Value::as_array)
        .ok_or(CheckpointError::NoChain)?
        .iter()
        .map(|c| {
            c.as_str()
                .and_then(|s| STANDARD.decode(s).ok())
                .map(CertificateDer::from)
        })
        .collect::<Option<_>>()
        .ok_or(CheckpointError::Certificate)?;
    let leaf = certs.first().ok_or(CheckpointError::EmptyChain)?;
    let info = crate::identity::svid::check_leaf(leaf)?;
    if info.id.to_string() != r.source {
        return Err(CheckpointError::WrongSigner {
            signer: info.id.to_string(),
            writer: r.source.clone(),
        });
    }
    if crate::identity::id::is_reserved(&info.id)
        && !crate::identity::svid::has_control_plane_mark(leaf)?
    {
        return Err(CheckpointError::NotControlPlane(info.id.to_string()));
    }
    if let Some(b) = bundles {
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_millis(
            u64::try_from(r.ts_ms).unwrap_or(0),
        ));
        verify_chain(&certs, b, at, Usage::Client, &algorithms())?;
    }
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| CheckpointError::EndEntity(format!("{e:?}")))?;
    let msg = checkpoint_message(&r.source, &r.epoch, r.seq, &r.prev);
    ee.verify_signature(webpki::aws_lc_rs::ECDSA_P256_SHA256, &msg, &sig)
        .map_err(|e| CheckpointError::BadSignature(format!("{e:?}")))
}

/// Verifies one chain given its stored lines in seq order: contiguous seqs from the first
/// stored record, each `prev` equal to the hash of the line before, every checkpoint signed by
/// the writer's SVID (chained to `bundles` at the checkpoint's time, when given).
pub fn verify_lines<'a>(
    chain: &str,
    lines: impl IntoIterator<Item = &'a [u8]>,
    bundles: Option<&BundleSet>,
) -> Result<ChainSummary, ChainError> {
    let mut s = ChainSummary::default();
    let mut prev: Option<(u64, String)> = None;
    for (i, line) in lines.into_iter().enumerate() {
        let r: Record = serde_json::from_slice(line).map_err(|e| ChainError::Malformed {
            chain: chain.to_owned(),
            position: i + 1,
            reason: e.to_string(),
        })?;
        match &prev {
            None => {
                if r.seq == 1 && r.prev != GENESIS {
                    return Err(ChainError::Broken {
                        chain: chain.to_owned(),
                        seq: 1,
                        prev_seq: 0,
                    });
                }
            }
            Some((pseq, phash)) => {
                if r.seq != pseq + 1 {
                    return Err(ChainError::Gap {
                        chain: chain.to_owned(),
                        expected: pseq + 1,
                        found: r.seq,
                    });
                }
                if &r.prev != phash {
                    return Err(ChainError::Broken {
                        chain: chain.to_owned(),
                        seq: r.seq,
                        prev_seq: *pseq,
                    });
                }
            }
        }
        if r.kind == "checkpoint" {
            verify_checkpoint(&r, bundles).map_err(|e| ChainError::BadCheckpoint {
                chain: chain.to_owned(),
                seq: r.seq,
                reason: e.to_string(),
            })?;
            s.checkpoints += 1;
        }
        s.records += 1;
        s.last_seq = r.seq;
        prev = Some((r.seq, line_hash(line)));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Vec<u8>> {
        let mut prev = GENESIS.to_owned();
        let mut out = Vec::new();
        for seq in 1..=n {
            let mut fields = Map::new();
            fields.insert("decision".into(), Value::String("allow".into()));
            let r = Record {
                v: VERSION,
                source: "spiffe://t/a".into(),
                epoch: "e1".into(),
                seq,
                prev: prev.clone(),
                ts_ms: 1_700_000_000_000 + seq as i64,
                kind: "connection.open".into(),
                fields,
            };
            let line = r.line();
            prev = line_hash(&line);
            out.push(line);
        }
        out
    }

    fn check(lines: &[Vec<u8>]) -> Result<ChainSummary, ChainError> {
        verify_lines("c", lines.iter().map(Vec::as_slice), None)
    }

    #[test]
    fn the_stack_hash_is_the_hex_sha256_of_the_line() {
        for line in [&b""[..], b"{\"v\":1}", &[0xffu8; 200]] {
            assert_eq!(LineHash::of(line).as_str(), hex::encode(sha256(line)));
            assert_eq!(line_hash(line), hex::encode(sha256(line)));
        }
        assert_eq!(
            line_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(check(&chain(5)).unwrap().records, 5);
    }

    #[test]
    fn an_edited_record_is_named() {
        let mut c = chain(5);
        c[2] = String::from_utf8(c[2].clone())
            .unwrap()
            .replace("allow", "deny")
            .into_bytes();
        let e = check(&c).unwrap_err();
        assert_eq!(e.seq(), Some(3), "{e}");
    }

    #[test]
    fn a_deleted_record_is_named() {
        let mut c = chain(5);
        c.remove(1);
        let e = check(&c).unwrap_err();
        assert!(
            matches!(
                e,
                ChainError::Gap {
                    expected: 2,
                    found: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn reordered_records_are_caught() {
        let mut c = chain(5);
        c.swap(1, 2);
        assert!(check(&c).is_err());
    }

    #[test]
    fn a_checkpoint_signed_by_the_writers_svid_verifies_against_the_bundle() {
        let ca = crate::testing::TestCa::new("t");
        let creds = ca.credentials("spiffe://t/a");
        let svid = creds.get().unwrap();
        let mut c = chain(2);
        let last: Record = serde_json::from_slice(&c[1]).unwrap();
        let prev = line_hash(&c[1]);
        let msg = checkpoint_message("spiffe://t/a", "e1", 3, &prev);
        let sig = sign_with(&svid.certified, &msg).unwrap();
        let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let cp = Record {
            seq: 3,
            prev,
            ts_ms: now_ms,
            kind: "checkpoint".into(),
            fields: checkpoint_fields(&sig, &svid.certified.cert),
            ..last
        };
        c.push(cp.line());
        let set = BundleSet::single(ca.bundle());
        let s = verify_lines("c", c.iter().map(Vec::as_slice), Some(&set)).unwrap();
        assert_eq!(s.checkpoints, 1);
        // Another CA's bundle does not vouch for that key.
        let other = BundleSet::single(crate::testing::TestCa::new("t").bundle());
        assert!(verify_lines("c", c.iter().map(Vec::as_slice), Some(&other)).is_err());
    }

    #[test]
    fn a_forged_checkpoint_is_caught() {
        let mut c = chain(2);
        let last: Record = serde_json::from_slice(&c[1]).unwrap();
        let mut fields = Map::new();
        fields.insert("sig".into(), Value::String(STANDARD.encode([1u8; 64])));
        fields.insert("cert".into(), Value::Array(vec![]));
        let cp = Record {
            seq: 3,
            prev: line_hash(&c[1]),
            kind: "checkpoint".into(),
            fields,
            ..last
        };
        c.push(cp.line());
        assert!(matches!(
            check(&c).unwrap_err(),
            ChainError::BadCheckpoint { seq: 3, .. }
        ));
    }
}
