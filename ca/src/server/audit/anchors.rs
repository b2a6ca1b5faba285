//! The control plane's own chain: its upkeep every [`ANCHOR_INTERVAL`] (anchoring the sidecar
//! chains that advanced, a `gap` record for events it could not store, a signed checkpoint).

use std::sync::Arc;

use serde_json::json;
use time::OffsetDateTime;
use tracing::{debug, warn};

use crate::identity::audit::{checkpoint_fields, checkpoint_message, sign_with};
use crate::server::ca::Ca;
use crate::server::store::StoreError;

/// How often the control plane anchors the sidecar chains that advanced, writes a `gap` for
/// events it could not store, and signs a checkpoint of its own chain, while there is
/// anything to write.
pub const ANCHOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Appends a `gap` record to the control plane's own chain for the events it could not store
/// (how many, of which kinds, between which times), once it can write again.
pub fn record_lost(ca: &Ca) -> Result<(), StoreError> {
    let lost = ca.pending.take_lost();
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
            ca.pending.restore_lost(lost);
            Err(e)
        }
    }
}

/// Appends one `audit.anchor` event to the control plane's own chain with the head of every
/// sidecar chain that advanced since the last one (`{"chains": {chain: {seq, hash}}}`), so
/// that `audit verify` detects a dropped tail or chain, and a rewrite, up to it.
pub fn anchor(ca: &Ca) -> Result<(), StoreError> {
    let heads = ca.pending.take_heads();
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
