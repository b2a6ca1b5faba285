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

/// FNV-1a: fast on short keys. Keys come from the policy, so hash flooding is not a concern.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FnvMap<V> = HashMap<Box<str>, V, BuildHasherDefault<Fnv>>;

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
    dest: FnvMap<FnvMap<Lists>>,
}

impl Index {
    pub(crate) fn build(rules: &[Rule]) -> Index {
        let mut dest: FnvMap<FnvMap<Lists>> = FnvMap::default();
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
