//! The rule index: destination key -> source key -> rule numbers per category.
//!
//! Keys are exact IDs or `Below` prefixes ending with `/` (see `spiffe_id::index_keys`), so a
//! request is looked up with one hash probe per ID segment on each side.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::matching::{Scope, check_rule};
use crate::model::{Action, Mode, Rule};
use crate::request::Request;
use crate::spiffe_id::index_keys;

/// An FxHash-style hasher (8 bytes per step): fast on short keys. Keys come from the policy,
/// so hash flooding is not a concern.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxLike(u64);

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxLike {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for FxLike {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
}

type FxMap<V> = HashMap<Box<str>, V, BuildHasherDefault<FxLike>>;

/// Rule categories, each searched separately for its first match.
pub(crate) const ENFORCED_DENY: usize = 0;
pub(crate) const DRY_DENY: usize = 1;
pub(crate) const ENFORCED_ALLOW: usize = 2;
pub(crate) const DRY_ALLOW: usize = 3;
const CATEGORIES: usize = 4;

fn category(r: &Rule) -> usize {
    match (r.action, r.mode) {
        (Action::Deny, Mode::Enforce) => ENFORCED_DENY,
        (Action::Deny, Mode::DryRun) => DRY_DENY,
        (Action::Allow, Mode::Enforce) => ENFORCED_ALLOW,
        (Action::Allow, Mode::DryRun) => DRY_ALLOW,
    }
}

/// Rule numbers (ascending, i.e. file order) per category.
type Lists = [Vec<u32>; CATEGORIES];

/// Destination -> source -> rules.
#[derive(Debug, Default)]
pub(crate) struct Index {
    dest: FxMap<FxMap<Lists>>,
}

impl Index {
    pub(crate) fn build(rules: &[Rule]) -> Index {
        let mut dest: FxMap<FxMap<Lists>> = FxMap::default();
        for (i, r) in rules.iter().enumerate() {
            let Ok(i) = u32::try_from(i) else { break };
            let cat = category(r);
            for to in &r.to {
                let by_src = dest.entry(to.key().into()).or_default();
                for from in &r.from {
                    let list = &mut by_src.entry(from.key().into()).or_default()[cat];
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
        }
        Index { dest }
    }

    /// The first (lowest-numbered) rule of each wanted category that matches `req`.
    pub(crate) fn first_matches(
        &self,
        rules: &[Rule],
        req: &Request<'_>,
        scope: Scope,
        wanted: [bool; CATEGORIES],
    ) -> [Option<u32>; CATEGORIES] {
        let mut best = [None; CATEGORIES];
        for dkey in index_keys(req.destination) {
            let Some(by_src) = self.dest.get(dkey) else {
                continue;
            };
            for skey in index_keys(req.source) {
                let Some(lists) = by_src.get(skey) else {
                    continue;
                };
                for (cat, list) in lists.iter().enumerate() {
                    if wanted[cat] {
                        best[cat] = first_in(list, best[cat], rules, req, scope);
                    }
                }
            }
        }
        best
    }
}

/// The first rule in `list` below `best` that matches, else `best`.
fn first_in(
    list: &[u32],
    best: Option<u32>,
    rules: &[Rule],
    req: &Request<'_>,
    scope: Scope,
) -> Option<u32> {
    for &i in list {
        if best.is_some_and(|b| i >= b) {
            break;
        }
        let Some(rule) = rules.get(i as usize) else {
            break;
        };
        if check_rule(rule, req, scope).is_ok() {
            return Some(i);
        }
    }
    best
}
