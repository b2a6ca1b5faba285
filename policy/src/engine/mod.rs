//! The compiled policy: an index over the rules, and the decision functions.

mod decide;
mod explain;
mod index;
pub(crate) mod matching;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{Mode, Policy, Rule};
use index::Index;

pub use explain::{Explanation, Step};

/// A compiled policy, ready to decide. Cheap to share across threads (`&Engine` is `Sync`).
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    index: Index,
    mode: Mode,
    version: Arc<str>,
    seed: u64,
    counter: AtomicU64,
}

impl Policy {
    /// Compiles the policy with decision-id seed 0 (see [`Engine::with_seed`]).
    pub fn compile(&self) -> Engine {
        Engine::new(self)
    }
}

impl Engine {
    /// Compiles `policy` with decision-id seed 0.
    pub fn new(policy: &Policy) -> Engine {
        Engine::with_seed(policy, 0)
    }

    /// Compiles `policy`. `seed` (random, from the caller) tells this engine's decision ids
    /// apart from other engines' ones: ids are `d-<low 32 bits of seed, hex>-<counter, hex>`.
    pub fn with_seed(policy: &Policy, seed: u64) -> Engine {
        Engine {
            index: Index::build(&policy.rules),
            rules: policy.rules.clone(),
            mode: policy.mode,
            version: policy.version.clone(),
            seed,
            counter: AtomicU64::new(0),
        }
    }

    /// The version of the compiled policy.
    pub fn version(&self) -> &str {
        &self.version
    }

    fn next_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(28);
        id.push_str("d-");
        push_hex(&mut id, self.seed & 0xffff_ffff, 8);
        id.push('-');
        push_hex(&mut id, n, 1);
        id
    }
}

/// Appends `v` in lower-case hex, at least `min_digits` long.
fn push_hex(out: &mut String, v: u64, min_digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (64 - v.leading_zeros()).div_ceil(4).max(min_digits);
    for i in (0..digits).rev() {
        let nibble = (v >> (i * 4)) & 0xf;
        out.push(char::from(HEX[nibble as usize]));
    }
}
