//! The sidecar's audit trail: every decision becomes a hash-chained record, written to a local
//! append-only spool, streamed to the control plane over mTLS, and trimmed only once the
//! control plane has acknowledged it.
//!
//! Durability: records are appended as they come and the spool is `fsync`ed at least every
//! [`SYNC_EVERY`] (and before any record is shipped), so a crash loses at most that window of
//! records that no one has acknowledged yet ([`Durability::Batched`]). With
//! [`Durability::Strict`] the data path waits for the decision records it hands over with
//! [`Auditor::record`] to be synced before it lets the traffic through; syncs are
//! group-committed (one sync covers every record that arrived while the previous one ran), so a
//! decision waits at most about two syncs. When the spool is full the configured behaviour
//! applies: `fail-closed` refuses new connections and requests (nothing unaudited happens) or
//! `drop` counts what it drops and writes a `gap` record when space returns.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::{AuditConfig, Durability, Sink, WhenFull};
use crate::identity::Identity;
pub use fields::{Field, FieldList, Fields, line};

mod delivery;
pub(crate) mod fields;
pub(crate) mod record;
mod recover;
mod spool;
#[cfg(test)]
mod strict_tests;
#[cfg(test)]
mod tests;

use delivery::run;
use spool::{Spool, State, io, write_atomic};

/// How often the spool is synced to disk.
pub const SYNC_EVERY: Duration = Duration::from_millis(200);
/// A checkpoint is written after this many records...
pub const CHECKPOINT_RECORDS: u64 = 256;
/// ...or this long after the first unsigned record (and at a clean shutdown), so a dropped
/// tail is never more than a few seconds of unsigned records.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// The least time between two deliveries to the control plane (one request each, over a
/// kept-open mTLS connection). Each delivery is one fsynced transaction on the control plane,
/// so this sets its commit rate: one a second per sidecar.
pub const SHIP_EVERY: Duration = Duration::from_secs(1);
/// Most records shipped in one request.
pub const SHIP_BATCH: usize = 2000;
/// Most queued events the writer takes in one turn before it looks at anything else.
const EVENTS_PER_TURN: usize = 1024;

/// Why a decision record could not be made durable (strict mode): the traffic is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotDurable {
    /// The writer's queue is full.
    #[error("the audit writer is behind")]
    Behind,
    /// The spool is full and its records are being dropped (`when_full = "drop"`).
    #[error("the audit spool is full")]
    Full,
    /// The spool refused the record, or its sync failed.
    #[error("the audit spool cannot be written: {0}")]
    Write(String),
    /// No sync covered the record within [`STRICT_WAIT`] (the disk hangs).
    #[error("the audit spool did not sync within {STRICT_WAIT:?}")]
    Timeout,
    /// The writer has stopped (shutdown).
    #[error("the audit writer has stopped")]
    Stopped,
}

/// The longest a strict decision waits for its sync before the traffic is refused.
pub const STRICT_WAIT: Duration = Duration::from_secs(5);

/// One event, before it is numbered.
#[derive(Debug)]
pub struct Event {
    /// Kind.
    pub kind: &'static str,
    /// When (unix ms).
    pub ts_ms: i64,
    /// Fields.
    pub fields: Fields,
    /// Told the record's seq once a sync covers it (strict decisions).
    durable: Option<oneshot::Sender<Result<u64, NotDurable>>>,
}

#[cfg(test)]
impl Event {
    /// Kind and fields, telling a strict decision its record is durable (as seq 1).
    pub(crate) fn settle(self) -> (&'static str, Fields) {
        if let Some(tx) = self.durable {
            let _ = tx.send(Ok(1));
        }
        (self.kind, self.fields)
    }
}

/// A strict decision waiting for the sync that covers its record (its seq).
type Waiter = (u64, oneshot::Sender<Result<u64, NotDurable>>);

/// The handle the data path uses.
pub struct Auditor {
    tx: mpsc::Sender<Event>,
    full: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    when_full: WhenFull,
    delivery_error: DeliveryError,
    durability: Durability,
    syncs: Arc<AtomicU64>,
    synced_through: Arc<AtomicU64>,
}

/// Why the last delivery to the control plane failed (`None` after a success): for readiness.
type DeliveryError = Arc<std::sync::Mutex<Option<String>>>;

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Every kind written must be one `audit query --kind` accepts (a kind missing from
/// [`mayfly_ca::audit::KINDS`] could never be queried): checked in debug builds, which the
/// end-to-end tests run.
fn debug_assert_listed(kind: &str) {
    debug_assert!(
        mayfly_ca::audit::KINDS.contains(&kind),
        "audit kind {kind:?} is not in mayfly_ca::audit::KINDS: list it there and in the README"
    );
}

impl Auditor {
    /// Whether new traffic may be admitted (false only when fail-closed and full).
    pub fn admits(&self) -> bool {
        !(self.when_full == WhenFull::FailClosed && self.full.load(Ordering::Relaxed))
    }

    /// Records an event. Never blocks the data path.
    pub fn emit(&self, kind: &'static str, fields: impl Into<Fields>) {
        debug_assert_listed(kind);
        let ev = Event {
            kind,
            ts_ms: now_ms(),
            fields: fields.into(),
            durable: None,
        };
        if self.tx.try_send(ev).is_err() {
            // The writer is behind: same as a full spool.
            self.full.store(true, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a decision before the traffic it admits (or refuses) goes on. Batched: the same
    /// as [`Auditor::emit`]. Strict: resolves once the record is written and synced (shared
    /// with every record that arrives meanwhile), or with the reason it cannot be, and then the
    /// traffic must be refused.
    pub async fn record(
        &self,
        kind: &'static str,
        fields: impl Into<Fields>,
    ) -> Result<(), NotDurable> {
        if self.durability == Durability::Batched {
            self.emit(kind, fields);
            return Ok(());
        }
        let rx = self.durable(kind, fields)?;
        match tokio::time::timeout(STRICT_WAIT, rx).await {
            Ok(Ok(r)) => r.map(|_| ()),
            Ok(Err(_)) => Err(NotDurable::Stopped),
            Err(_) => Err(NotDurable::Timeout),
        }
    }

    /// Hands a record to the writer and returns where its seq arrives once it is synced.
    fn durable(
        &self,
        kind: &'static str,
        fields: impl Into<Fields>,
    ) -> Result<oneshot::Receiver<Result<u64, NotDurable>>, NotDurable> {
        debug_assert_listed(kind);
        let (tx, rx) = oneshot::channel();
        let ev = Event {
            kind,
            ts_ms: now_ms(),
            fields: fields.into(),
            durable: Some(tx),
        };
        // Refused, not dropped: the traffic it stood for does not happen.
        self.tx.try_send(ev).map_err(|_| NotDurable::Behind)?;
        Ok(rx)
    }

    /// The durability setting.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Spool syncs completed so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Every record with a lower seq (in the live epoch) is written and synced.
    pub fn synced_through(&self) -> u64 {
        self.synced_through.load(Ordering::Relaxed)
    }

    /// Events handed to the writer and not yet in the spool.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Records dropped so far (drop mode, or a writer that fell behind).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Why the last delivery to the control plane failed; `None` once one succeeds.
    pub fn delivery_error(&self) -> Option<String> {
        self.delivery_error.lock().ok().and_then(|e| e.clone())
    }
}

#[cfg(test)]
impl Auditor {
    /// An auditor whose events arrive on the returned queue instead of at a writer.
    pub(crate) fn capture(durability: Durability) -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(64);
        let auditor = Auditor {
            tx,
            full: Arc::default(),
            dropped: Arc::default(),
            when_full: WhenFull::FailClosed,
            delivery_error: DeliveryError::default(),
            durability,
            syncs: Arc::default(),
            synced_through: Arc::default(),
        };
        (auditor, rx)
    }
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Filesystem error.
    #[error("audit spool {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The state file is corrupt.
    #[error("audit spool state {0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
}

/// Opens the spool and starts the writer (and the shipper, when `ship` is on).
pub fn start(
    cfg: AuditConfig,
    identity: Arc<Identity>,
    client: Option<mayfly_ca::client::CaClient>,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Arc<Auditor>, tokio::task::JoinHandle<()>), SpoolError> {
    let spool = Spool::open_for(&cfg.spool_dir, &identity.id.to_string())?;
    let mut backlog = VecDeque::new();
    for (_, dir) in recover::backlog_dirs(&cfg.spool_dir) {
        let b = Spool::open(&dir, Some(&identity.id.to_string()))?;
        if b.index.is_empty() {
            b.remove();
        } else {
            backlog.push_back(b);
        }
    }
    let sink: Option<Box<dyn Write + Send>> = match &cfg.sink {
        Sink::None => None,
        Sink::Stdout => Some(Box::new(std::io::stdout())),
        Sink::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(p)
                .map_err(io(p))?,
        )),
    };
    let (tx, rx) = mpsc::channel(64 * 1024);
    let full = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let delivery_error = DeliveryError::default();
    let syncs = Arc::new(AtomicU64::new(0));
    let synced_through = Arc::new(AtomicU64::new(0));
    let auditor = Arc::new(Auditor {
        tx,
        full: full.clone(),
        dropped: dropped.clone(),
        when_full: cfg.when_full,
        delivery_error: delivery_error.clone(),
        durability: cfg.durability,
        syncs: syncs.clone(),
        synced_through: synced_through.clone(),
    });
    let mut actor = Actor {
        source: identity.id.to_string(),
        spool,
        backlog,
        session: match client {
            Some(c) if cfg.ship => {
                Some(c.audit_session(identity.bundles.clone(), identity.creds.clone()))
            }
            _ => None,
        },
        cfg,
        identity,
        full,
        dropped,
        delivery_error,
        reported_dropped: 0,
        sink,
        unsigned: 0,
        first_unsigned: None,
        metrics,
        waiting: Vec::new(),
        in_sync: Vec::new(),
        syncing: false,
        synced_seq: 0,
        state_sync: false,
        state_due: false,
        synced_through: synced_through.clone(),
        syncs,
    };
    actor.update_full();
    let task = tokio::spawn(run(actor, rx, shutdown));
    Ok((auditor, task))
}

/// Which spool a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The oldest closed epoch still to deliver.
    Backlog,
    /// The live spool.
    Live,
}

/// The one task that numbers, chains, spools and ships the records (its methods: writing in
/// [`record`], delivery in [`delivery`]).
struct Actor {
    /// This sidecar's SPIFFE ID as text (every record's `source`).
    source: String,
    spool: Spool,
    /// Closed epochs left by a roll, oldest first: delivered before the live spool.
    backlog: VecDeque<Spool>,
    cfg: AuditConfig,
    identity: Arc<Identity>,
    /// The delivery session (kept-open mTLS connection); `None` when shipping is off, or while
    /// a delivery is in flight (the task holds it).
    session: Option<mayfly_ca::client::AuditSession>,
    full: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    delivery_error: DeliveryError,
    reported_dropped: u64,
    sink: Option<Box<dyn Write + Send>>,
    unsigned: u64,
    first_unsigned: Option<tokio::time::Instant>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Strict decisions whose records are appended but not yet covered by a sync.
    waiting: Vec<Waiter>,
    /// Strict decisions covered by the sync in flight.
    in_sync: Vec<Waiter>,
    /// A sync is running on the blocking pool (at most one at a time).
    syncing: bool,
    /// `next_seq` when the sync in flight began.
    synced_seq: u64,
    /// The sync in flight saves the state too.
    state_sync: bool,
    /// The tick asked for a full sync (data and state) while one was running: the next sync is
    /// one, so that strict traffic keeping the disk busy does not starve the state.
    state_due: bool,
    /// Records below this seq are synced (shared with the [`Auditor`]).
    synced_through: Arc<AtomicU64>,
    /// Completed syncs.
    syncs: Arc<AtomicU64>,
}
