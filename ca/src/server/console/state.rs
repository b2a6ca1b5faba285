//! The console's shared state: what the audit follower learnt, the verification cache, the
//! live broadcast.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{broadcast, watch};

use super::ConsoleOptions;
use super::pages::ChainStatus;
use super::records::Decision;
use crate::server::ca::Ca;

/// Response bodies: whole pages or the event stream.
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Decisions buffered for the slowest live view before it is dropped.
pub const BUFFER: usize = 512;

/// What the follower learnt of a source (a sidecar) from its records.
#[derive(Debug, Clone, Default)]
pub struct Contact {
    /// Its newest record's time (Unix ms).
    pub last_ms: i64,
    /// The policy version of its newest decision that names one.
    pub policy_version: String,
    /// That decision's time.
    pub policy_ms: i64,
}

/// The console's shared state.
pub struct State {
    /// The control plane.
    pub ca: Arc<Ca>,
    /// How it is served.
    pub opts: ConsoleOptions,
    /// New decisions, for the live views.
    pub live: broadcast::Sender<Arc<Decision>>,
    /// Sources' last contact, from the audit follower.
    pub contact: Mutex<HashMap<String, Contact>>,
    /// Chains with records newer than their cached verification.
    pub dirty: Mutex<BTreeSet<String>>,
    /// Each chain's verification, as of its head when verified.
    pub verified: Mutex<HashMap<String, ChainStatus>>,
    /// Flips on shutdown (ends the live streams).
    pub shutdown: watch::Receiver<bool>,
}

impl State {
    /// Fresh state.
    pub fn new(ca: Arc<Ca>, opts: ConsoleOptions, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            ca,
            opts,
            live: broadcast::channel(BUFFER).0,
            contact: Mutex::new(HashMap::new()),
            dirty: Mutex::new(BTreeSet::new()),
            verified: Mutex::new(HashMap::new()),
            shutdown,
        }
    }
}
