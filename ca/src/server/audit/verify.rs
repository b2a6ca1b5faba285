//! Reading the stored trail: `audit verify` checks every chain (complete, unbroken, signed
//! checkpoints, columns equal to the lines, anchored heads still there), and a one-line
//! rendering of a record for `audit tail` and `audit query`.

use std::collections::{BTreeMap, BTreeSet};

use time::OffsetDateTime;

use super::anchors::ANCHOR_KIND;
use super::ingest::RecordHead;
use crate::identity::audit::{ChainError, ChainSummary, Record, line_hash, verify_lines};
use crate::identity::bundle::BundleSet;
use crate::server::store::{AuditRow, Store, StoreError};

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
    verify_some(store, bundles, None)
}

/// [`verify_all`] for the chains in `only` (and the control plane's own chain, which holds
/// the anchors): what the console re-verifies when those chains' heads moved.
pub fn verify_some(
    store: &dyn Store,
    bundles: &BundleSet,
    only: Option<&BTreeSet<String>>,
) -> Result<Vec<ChainReport>, StoreError> {
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
        if only.is_some_and(|o| !o.contains(&chain)) {
            continue;
        }
        let source = chain.split('#').next().unwrap_or_default();
        let reserved = crate::identity::id::parse_id(source)
            .is_ok_and(|id| crate::identity::id::is_reserved(&id));
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
    for (chain, (anchored, _)) in anchors
        .into_iter()
        .filter(|(c, _)| only.is_none_or(|o| o.contains(c)))
    {
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
    // RFC 3339 in UTC with exactly three fractional digits, so that the lines' times align
    // (`time`'s RFC 3339 drops trailing zeros: `.71Z` beside `.909Z`).
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(r.ts_ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.millisecond()
            )
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
