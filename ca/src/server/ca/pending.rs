//! What the control plane still owes its own audit chain: the heads of sidecar chains to
//! anchor and the events it could not store. The [`Ca`](super::Ca) holds it; the audit upkeep
//! ([`crate::server::audit`]) writes it out.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

/// What the control plane still has to write on its own chain: the heads of sidecar chains
/// acknowledged since the last anchor, and the events it could not store.
#[derive(Debug, Default)]
pub struct Pending {
    heads: Mutex<BTreeMap<String, (u64, String)>>,
    lost: Mutex<Lost>,
}

/// Control-plane events that could not be stored.
#[derive(Debug, Default)]
pub(in crate::server) struct Lost {
    /// How many.
    pub(in crate::server) count: u64,
    /// How many of each kind.
    pub(in crate::server) kinds: BTreeMap<String, u64>,
    /// When the first was lost (Unix milliseconds).
    pub(in crate::server) first_ms: i64,
    /// When the last was lost (Unix milliseconds).
    pub(in crate::server) last_ms: i64,
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

    /// Takes the lost events to record them.
    pub(in crate::server) fn take_lost(&self) -> Lost {
        std::mem::take(&mut *lock(&self.lost))
    }

    /// Puts back lost events that could not be recorded (with any lost since).
    pub(in crate::server) fn restore_lost(&self, lost: Lost) {
        let mut l = lock(&self.lost);
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
    }

    /// Takes the heads of the sidecar chains acknowledged since the last anchor.
    pub(in crate::server) fn take_heads(&self) -> BTreeMap<String, (u64, String)> {
        std::mem::take(&mut *lock(&self.heads))
    }
}
