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
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mayfly_ca::audit::{
    GENESIS, Record, VERSION, checkpoint_fields, checkpoint_message, line_hash, sign_with,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::identity::Identity;

mod recover;
#[cfg(test)]
mod strict_tests;

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

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Refuse new connections and requests until the spool drains.
    FailClosed,
    /// Drop records, count them, and write a `gap` record when space returns.
    Drop,
}

impl WhenFull {
    /// The name written in the config (`fail-closed`, `drop`).
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::FailClosed => "fail-closed",
            WhenFull::Drop => "drop",
        }
    }
}

/// When a decision's record must be on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Synced at least every [`SYNC_EVERY`] off the data path: a crash loses up to that window
    /// of records of traffic that already happened (the loss itself is recorded as a `gap`).
    #[default]
    Batched,
    /// A request is forwarded (a connection spliced, a denial answered) only once its decision
    /// record is written and synced; a record that cannot be made durable refuses the traffic.
    Strict,
}

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

/// A copy of every record for people who ship logs with their own tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// None.
    None,
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file.
    File(PathBuf),
}

/// Audit settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Spool directory (0700).
    pub spool_dir: PathBuf,
    /// Spool size limit in bytes.
    pub max_spool_bytes: u64,
    /// Behaviour when full.
    pub when_full: WhenFull,
    /// Extra JSON-lines sink.
    pub sink: Sink,
    /// Stream records to the control plane.
    pub ship: bool,
    /// When a decision's record must be on disk.
    pub durability: Durability,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    /// The SPIFFE ID whose records this spool holds.
    #[serde(default)]
    source: Option<String>,
    epoch: String,
    next_seq: u64,
    last_hash: String,
    acked_seq: u64,
    /// True only while the spool is closed after a clean shutdown: found false on opening, the
    /// sidecar stopped without one (records it had not synced may be lost) and the chain rolls
    /// to a new epoch that says so (see `recover`).
    #[serde(default)]
    clean: bool,
    /// A closed epoch kept only to deliver what is left of it (a backlog spool): never
    /// appended to, never rolled.
    #[serde(default)]
    closed: bool,
    /// When this epoch began after a roll (orders backlog spools).
    #[serde(default)]
    rolled_at_ms: i64,
}

/// One event, before it is numbered.
#[derive(Debug)]
pub struct Event {
    /// Kind.
    pub kind: &'static str,
    /// When (unix ms).
    pub ts_ms: i64,
    /// Fields.
    pub fields: Map<String, Value>,
    /// Told the record's seq once a sync covers it (strict decisions).
    durable: Option<oneshot::Sender<Result<u64, NotDurable>>>,
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

impl Auditor {
    /// Whether new traffic may be admitted (false only when fail-closed and full).
    pub fn admits(&self) -> bool {
        !(self.when_full == WhenFull::FailClosed && self.full.load(Ordering::Relaxed))
    }

    /// Records an event. Never blocks the data path.
    pub fn emit(&self, kind: &'static str, fields: Map<String, Value>) {
        let ev = Event {
            kind,
            ts_ms: now_ms(),
            fields,
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
        fields: Map<String, Value>,
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
        fields: Map<String, Value>,
    ) -> Result<oneshot::Receiver<Result<u64, NotDurable>>, NotDurable> {
        let (tx, rx) = oneshot::channel();
        let ev = Event {
            kind,
            ts_ms: now_ms(),
            fields,
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

/// A spool sync taken off the data path (it waits for the disk): the spool file's data, then
/// (unless it is a data-only sync for strict decisions) the state file.
struct SyncJob {
    file: std::fs::File,
    spool_path: PathBuf,
    state: Option<(PathBuf, Vec<u8>)>,
}

impl SyncJob {
    fn run(self) -> Result<(), SpoolError> {
        self.file.sync_data().map_err(io(&self.spool_path))?;
        match &self.state {
            Some((path, state)) => write_atomic(path, state).map_err(io(path)),
            None => Ok(()),
        }
    }
}

/// Logical spool size (acknowledged head, as a hole) after which the file is rewritten.
const REWRITE_AFTER: u64 = 64 << 20;
/// The same where the filesystem cannot punch holes (the head then holds disk space).
const REWRITE_AFTER_NO_HOLES: u64 = 8 << 20;

/// Records are buffered in memory up to this size between writes to the spool file (one
/// `write` per record cost a syscall per request); the buffer is flushed on every sync (at least
/// every `SYNC_EVERY`), before records are read back for delivery, and before a trim.
const SPOOL_WRITE_BUFFER: usize = 64 * 1024;

struct Spool {
    dir: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    state: State,
    /// (seq, start, end) byte ranges of the unacknowledged lines in the file, in order.
    index: VecDeque<(u64, u64, u64)>,
    /// Everything before this offset is acknowledged (trimmed lazily).
    acked_end: u64,
    /// Everything before this offset is a hole: acknowledged records whose disk space was given
    /// back in place (no copy, offsets unchanged).
    punched: u64,
    /// False once the filesystem refused to punch a hole (then only rewrites reclaim space).
    can_punch: bool,
    /// The file is rewritten without its acknowledged head once that head is over this size and
    /// at least as large as the rest (so draining a long backlog stays linear).
    rewrite_after: u64,
    len: u64,
    dirty: bool,
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |e| SpoolError::Io(p.to_path_buf(), e)
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn open_append(p: &Path) -> Result<std::fs::File, SpoolError> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(p)
        .map_err(io(p))
}

impl Spool {
    fn path(&self) -> PathBuf {
        self.dir.join("spool.jsonl")
    }

    fn open_for(dir: &Path, source: &str) -> Result<Self, SpoolError> {
        Self::open(dir, Some(source))
    }

    /// Opens (or creates) the spool in `dir` for `source`'s records. A spool that was not
    /// closed cleanly, or whose lines are damaged, rolls to a new epoch first (`recover`); a
    /// torn last line is cut off.
    fn open(dir: &Path, source: Option<&str>) -> Result<Self, SpoolError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        let state_path = dir.join("state.json");
        let (mut state, existed) = match std::fs::read(&state_path) {
            Ok(b) => (
                serde_json::from_slice::<State>(&b)
                    .map_err(|e| SpoolError::Corrupt(state_path.clone(), e.to_string()))?,
                true,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                State {
                    source: None,
                    epoch: recover::new_epoch(),
                    next_seq: 1,
                    last_hash: GENESIS.into(),
                    acked_seq: 0,
                    clean: true,
                    closed: false,
                    rolled_at_ms: 0,
                },
                false,
            ),
            Err(e) => return Err(SpoolError::Io(state_path, e)),
        };
        match (&state.source, source) {
            (Some(owner), Some(source)) if owner != source => {
                return Err(SpoolError::Corrupt(
                    state_path,
                    format!(
                        "this spool holds the records of {owner}, not {source}: give each sidecar its own audit.spool_dir"
                    ),
                ));
            }
            (None, Some(source)) => state.source = Some(source.to_owned()),
            _ => {}
        }
        recover::finish_interrupted(dir, Some(&state.epoch))?;
        let path = dir.join("spool.jsonl");
        let mut file = open_append(&path)?;
        // The file is the truth for what was written after the last state save (a crash
        // between the two is repaired here).
        // Acknowledged records may have been punched out: start at the first data (a hole reads
        // as zeros, block by block, so skip the zeros left of a partial block too).
        let size = file.metadata().map_err(io(&path))?.len();
        let data = match nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekData) {
            Ok(o) => u64::try_from(o).unwrap_or(0),
            Err(nix::errno::Errno::ENXIO) => size, // nothing but a hole
            Err(_) => 0,
        };
        let mut all = Vec::new();
        file.seek(SeekFrom::Start(data)).map_err(io(&path))?;
        file.read_to_end(&mut all).map_err(io(&path))?;
        let zeros = all.iter().take_while(|b| **b == 0).count();
        let first = data + zeros as u64;
        let scan = recover::scan(&all[zeros..], first, &state);
        let unclean = existed && !state.clean;
        if let Some(source) = source
            && existed
            && !state.closed
            && (unclean || scan.damaged() || scan.torn)
        {
            drop(file);
            return Self::roll_on_open(dir, &state, scan, &all[zeros..], first, source);
        }
        if scan.damaged() {
            // A closed backlog spool (or one opened without its owner): keep what chains, put
            // the rest aside where it can be inspected.
            let mut bad = Vec::new();
            for (s, e) in &scan.damaged {
                bad.extend_from_slice(
                    &all[zeros + (s - first) as usize..zeros + (e - first) as usize],
                );
            }
            for r in &scan.after {
                bad.extend_from_slice(&r.line());
                bad.push(b'\n');
            }
            let q = recover::quarantine(dir, &state.epoch, &bad)?;
            error!(spool = %dir.display(), quarantine = %q.display(), "a closed audit spool is damaged: its damaged tail was put aside");
        }
        let mut index = VecDeque::new();
        let mut acked_end = first;
        for (seq, start, end, hash) in &scan.intact {
            if *seq > state.acked_seq {
                index.push_back((*seq, *start, *end));
            } else {
                acked_end = *end;
            }
            if *seq >= state.next_seq {
                state.next_seq = seq + 1;
                state.last_hash = hash.clone();
            }
        }
        let good = scan.intact.last().map_or(first, |e| e.2);
        if good < data + all.len() as u64 {
            warn!(path = %path.display(), "audit spool ended with a torn or damaged record; cutting it off");
            file.set_len(good).map_err(io(&path))?;
        }
        if !state.closed {
            // From here on a stop without a clean shutdown is detected at the next opening.
            state.clean = false;
        }
        let mut s = Self {
            dir: dir.to_path_buf(),
            file: std::io::BufWriter::with_capacity(SPOOL_WRITE_BUFFER, file),
            state,
            index,
            acked_end,
            punched: first,
            can_punch: true,
            rewrite_after: REWRITE_AFTER,
            len: good,
            dirty: false,
        };
        s.save_state()?;
        Ok(s)
    }

    /// Rolls a spool that cannot simply continue to a new epoch (see `recover`): the old
    /// epoch's intact unacknowledged records become a backlog, damaged lines go to quarantine,
    /// and the new epoch starts with a `gap` record followed by the re-chained survivors.
    fn roll_on_open(
        dir: &Path,
        state: &State,
        scan: recover::Scan,
        data: &[u8],
        base: u64,
        source: &str,
    ) -> Result<Self, SpoolError> {
        let slice = |s: u64, e: u64| &data[(s - base) as usize..(e - base) as usize];
        let (last_seq, last_hash) = match scan.intact.last() {
            Some((seq, _, _, hash)) => (*seq, hash.clone()),
            None => (state.next_seq.saturating_sub(1), state.last_hash.clone()),
        };
        let mut backlog = Vec::new();
        for (seq, start, end, _) in &scan.intact {
            if *seq > state.acked_seq {
                backlog.extend_from_slice(slice(*start, *end));
            }
        }
        if !backlog.is_empty() {
            let st = State {
                next_seq: last_seq + 1,
                last_hash,
                ..state.clone()
            };
            recover::write_backlog(dir, &st, &backlog)?;
        }
        let mut bad = Vec::new();
        for (s, e) in &scan.damaged {
            bad.extend_from_slice(slice(*s, *e));
        }
        if scan.torn {
            bad.extend_from_slice(&data[(scan.good_end - base) as usize..]);
        }
        let quarantined = if bad.is_empty() {
            None
        } else {
            Some(recover::quarantine(dir, &state.epoch, &bad)?)
        };
        let why = if scan.damaged() || (scan.torn && state.clean) {
            recover::Why::SpoolDamaged
        } else {
            recover::Why::UncleanShutdown
        };
        let acked = state.acked_seq;
        let loss = recover::Loss {
            why,
            epoch: state.epoch.clone(),
            last_seq,
            lost: scan.lost.iter().copied().filter(|s| *s > acked).collect(),
            quarantined,
        };
        let after = scan.after.into_iter().filter(|r| r.seq > acked).collect();
        let (lines, new_state) = recover::new_chain(source, &loss, after);
        recover::install(dir, &lines, &new_state)?;
        warn!(
            spool = %dir.display(),
            reason = why.as_str(),
            previous_epoch = %state.epoch,
            previous_last_seq = last_seq,
            epoch = %new_state.epoch,
            "audit chain rolled to a new epoch; the loss is recorded as a gap record"
        );
        Self::open(dir, Some(source))
    }

    /// Rolls the live spool to a new epoch while running, because the control plane refuses
    /// to continue its chain (`409`: it expects records this spool no longer holds, or holds
    /// others): every unacknowledged record is re-chained after a `gap` record. Rare; the
    /// disk I/O is done in place.
    fn roll_live(&mut self, why: recover::Why) -> Result<(), SpoolError> {
        let Some(source) = self.state.source.clone() else {
            return Ok(());
        };
        let body = self.unacked_bytes_upto(usize::MAX)?;
        let after = recover::parse_lines(&body);
        let loss = recover::Loss {
            why,
            epoch: self.state.epoch.clone(),
            last_seq: self.state.acked_seq,
            lost: Vec::new(),
            quarantined: None,
        };
        let (lines, new_state) = recover::new_chain(&source, &loss, after);
        recover::install(&self.dir, &lines, &new_state)?;
        warn!(reason = why.as_str(), previous_epoch = %self.state.epoch, epoch = %new_state.epoch, "the control plane refuses to continue the audit chain: rolled to a new epoch, the loss is recorded as a gap record");
        let dir = self.dir.clone();
        *self = Self::open(&dir, Some(&source))?;
        Ok(())
    }

    /// Deletes a fully delivered backlog spool.
    fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(error = %e, path = %dir.display(), "cannot remove a delivered audit backlog");
        }
    }

    /// Marks the spool cleanly closed and syncs it (at a clean shutdown).
    fn close(&mut self) -> Result<(), SpoolError> {
        self.state.clean = true;
        self.dirty = true;
        self.sync()
    }

    fn save_state(&mut self) -> Result<(), SpoolError> {
        let p = self.dir.join("state.json");
        let data = serde_json::to_vec(&self.state).unwrap_or_default();
        write_atomic(&p, &data).map_err(io(&p))
    }

    fn append(&mut self, r: &Record) -> Result<Vec<u8>, SpoolError> {
        let line = r.line();
        let mut buf = line.clone();
        buf.push(b'\n');
        let p = self.path();
        self.file.write_all(&buf).map_err(io(&p))?;
        let start = self.len;
        self.len += buf.len() as u64;
        self.index.push_back((r.seq, start, self.len));
        self.state.next_seq = r.seq + 1;
        self.state.last_hash = line_hash(&line);
        self.dirty = true;
        Ok(line)
    }

    /// Flushes the write buffer and returns the fsync of the file and (`with_state`) the state
    /// save to run off the data path (`None` when nothing changed since the last one). A
    /// data-only sync makes the records durable (the file is the truth on reopening; the state
    /// only caches it) and leaves the state to the next full sync.
    fn begin_sync(&mut self, with_state: bool) -> Result<Option<SyncJob>, SpoolError> {
        if !self.dirty {
            return Ok(None);
        }
        let p = self.path();
        self.file.flush().map_err(io(&p))?;
        let file = self.file.get_ref().try_clone().map_err(io(&p))?;
        let state = if with_state {
            let state_path = self.dir.join("state.json");
            let state = serde_json::to_vec(&self.state)
                .map_err(|e| SpoolError::Corrupt(state_path.clone(), e.to_string()))?;
            self.dirty = false;
            Some((state_path, state))
        } else {
            None
        };
        Ok(Some(SyncJob {
            file,
            spool_path: p,
            state,
        }))
    }

    /// After a sync made the state up to `synced_next_seq` durable: if nothing was written since
    /// and everything is acknowledged, cut the file to nothing (no copy; the durable state
    /// carries the chain's head, so the file is not needed to continue it).
    fn after_sync(&mut self, synced_next_seq: u64) -> Result<(), SpoolError> {
        if self.len > 0 && self.index.is_empty() && self.state.next_seq == synced_next_seq {
            let p = self.path();
            self.file.flush().map_err(io(&p))?;
            self.file.get_ref().set_len(0).map_err(io(&p))?;
            self.len = 0;
            self.acked_end = 0;
            self.punched = 0;
        }
        Ok(())
    }

    /// Syncs in place (at shutdown, and in tests).
    fn sync(&mut self) -> Result<(), SpoolError> {
        match self.begin_sync(true)? {
            Some(job) => job.run(),
            None => Ok(()),
        }
    }

    /// Bytes of records not yet acknowledged.
    fn unacked_bytes(&self) -> u64 {
        self.len - self.acked_end
    }

    /// Up to `max` unacknowledged lines, oldest first, without their newlines (tests: the
    /// same read as a delivery body, cut at the index).
    #[cfg(test)]
    fn unacked(&mut self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let body = self.unacked_bytes_upto(max)?;
        let start = self.index.front().map_or(0, |e| e.1);
        Ok(self
            .index
            .iter()
            .take(max)
            .map(|(seq, s, e)| {
                (
                    *seq,
                    body[(s - start) as usize..(e - start - 1) as usize].to_vec(),
                )
            })
            .collect())
    }

    /// The oldest unacknowledged lines (up to `max`), newline-terminated, as one buffer: the
    /// body of a delivery.
    fn unacked_bytes_upto(&mut self, max: usize) -> Result<Vec<u8>, SpoolError> {
        let n = self.index.len().min(max);
        if n == 0 {
            return Ok(Vec::new());
        }
        let p = self.path();
        self.file.flush().map_err(io(&p))?;
        let start = self.index[0].1;
        let end = self.index[n - 1].2;
        let mut f = std::fs::File::open(&p).map_err(io(&p))?;
        f.seek(SeekFrom::Start(start)).map_err(io(&p))?;
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        f.read_exact(&mut buf).map_err(io(&p))?;
        Ok(buf)
    }

    /// The control plane has stored everything up to `seq`.
    fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
        while let Some(&(s, _, end)) = self.index.front() {
            if s > seq {
                break;
            }
            self.acked_end = end;
            self.index.pop_front();
        }
        self.state.acked_seq = self.state.acked_seq.max(seq);
        // Saved by the next sync: if a crash loses it, the records since the last save are
        // delivered again and the control plane skips them (it checks their hashes).
        self.dirty = true;
        let acked = self.acked_end;
        if acked == 0 {
            return Ok(());
        }
        // Give the acknowledged bytes' disk space back in place: a hole keeps every offset, so
        // there is nothing to copy and nothing to wait for (a crash that loses the hole brings
        // back acknowledged records, which are skipped on reopening).
        if self.can_punch && acked > self.punched {
            match nix::fcntl::fallocate(
                self.file.get_ref(),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                i64::try_from(self.punched).unwrap_or(i64::MAX),
                i64::try_from(acked - self.punched).unwrap_or(i64::MAX),
            ) {
                Ok(()) => self.punched = acked,
                Err(e) => {
                    warn!(error = %e, "the audit spool's filesystem cannot punch holes: acknowledged records are reclaimed by rewriting the spool");
                    self.can_punch = false;
                    self.rewrite_after = self.rewrite_after.min(REWRITE_AFTER_NO_HOLES);
                }
            }
        }
        // The file's logical size still grows: rewrite it without the acknowledged head once
        // that head is large, and at least as large as the rest (the copy costs the rest).
        let rest = self.len - acked;
        if acked > self.rewrite_after && acked >= rest {
            self.trim()?;
        }
        Ok(())
    }

    /// Drops acknowledged bytes from the front of the file (write a new file, rename).
    fn trim(&mut self) -> Result<(), SpoolError> {
        let p = self.path();
        let cut = self.acked_end;
        self.file.flush().map_err(io(&p))?;
        let mut rest = Vec::new();
        let mut f = std::fs::File::open(&p).map_err(io(&p))?;
        f.seek(SeekFrom::Start(cut)).map_err(io(&p))?;
        f.read_to_end(&mut rest).map_err(io(&p))?;
        write_atomic(&p, &rest).map_err(io(&p))?;
        self.file = std::io::BufWriter::with_capacity(SPOOL_WRITE_BUFFER, open_append(&p)?);
        for e in self.index.iter_mut() {
            e.1 -= cut;
            e.2 -= cut;
        }
        self.len -= cut;
        self.acked_end = 0;
        self.punched = 0;
        Ok(())
    }
}

/// Which spool a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The oldest closed epoch still to deliver.
    Backlog,
    /// The live spool.
    Live,
}

/// A delivery's outcome, with the session handed back for the next one.
type ShipResult = (
    mayfly_ca::client::AuditSession,
    Target,
    Result<u64, mayfly_ca::client::ClientError>,
);

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

impl Actor {
    /// Appends a record; its seq, or `None` when the spool refused it (logged, and the spool
    /// counts as full).
    fn write(&mut self, kind: &str, ts_ms: i64, fields: Map<String, Value>) -> Option<u64> {
        let r = Record {
            v: VERSION,
            source: self.source.clone(),
            epoch: self.spool.state.epoch.clone(),
            seq: self.spool.state.next_seq,
            prev: self.spool.state.last_hash.clone(),
            ts_ms,
            kind: kind.to_owned(),
            fields,
        };
        let seq = r.seq;
        let written = match self.spool.append(&r) {
            Ok(line) => {
                self.metrics.audit_records.inc();
                if let Some(s) = self.sink.as_mut() {
                    let _ = s.write_all(&line).and_then(|_| s.write_all(b"\n"));
                }
                if kind != "checkpoint" {
                    self.unsigned += 1;
                    self.first_unsigned
                        .get_or_insert_with(tokio::time::Instant::now);
                }
                Some(seq)
            }
            Err(e) => {
                error!(error = %e, "cannot write to the audit spool");
                self.full.store(true, Ordering::Relaxed);
                None
            }
        };
        self.update_full();
        written
    }

    /// Bytes not yet acknowledged, live spool and backlog together.
    fn unacked_total(&self) -> u64 {
        self.spool.unacked_bytes() + self.backlog.iter().map(Spool::unacked_bytes).sum::<u64>()
    }

    fn update_full(&mut self) {
        let used = self.unacked_total();
        self.metrics
            .audit_spool_bytes
            .set(i64::try_from(used).unwrap_or(i64::MAX));
        if used >= self.cfg.max_spool_bytes {
            if !self.full.swap(true, Ordering::Relaxed) {
                warn!(
                    bytes = used,
                    mode = self.cfg.when_full.as_str(),
                    "audit spool full"
                );
            }
        } else if used < self.cfg.max_spool_bytes / 10 * 9
            && self.full.swap(false, Ordering::Relaxed)
        {
            info!("audit spool has room again");
        }
    }

    fn on_event(&mut self, ev: Event) {
        if self.cfg.when_full == WhenFull::Drop && self.full.load(Ordering::Relaxed) {
            if let Some(tx) = ev.durable {
                // A strict decision is refused instead: nothing it stood for happens.
                let _ = tx.send(Err(NotDurable::Full));
                return;
            }
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            self.metrics.audit_dropped_reached(n);
            return;
        }
        self.write_gap_if_any(ev.ts_ms);
        let seq = self.write(ev.kind, ev.ts_ms, ev.fields);
        if let Some(tx) = ev.durable {
            match seq {
                Some(seq) => self.waiting.push((seq, tx)),
                None => {
                    let _ = tx.send(Err(NotDurable::Write(
                        "the record could not be appended".into(),
                    )));
                }
            }
        }
    }

    /// Starts a sync of everything appended so far on the blocking pool, unless one is running;
    /// the strict decisions waiting so far wait for this one. Its result comes back on `done`.
    /// Strict decisions get a data-only sync unless the tick asked for a full one.
    fn start_sync(&mut self, done: &mpsc::Sender<Result<(), SpoolError>>) {
        if self.syncing {
            return;
        }
        match self.spool.begin_sync(self.state_due) {
            Ok(Some(job)) => {
                self.syncing = true;
                self.state_sync = job.state.is_some();
                self.state_due = false;
                self.synced_seq = self.spool.state.next_seq;
                self.in_sync = std::mem::take(&mut self.waiting);
                let tx = done.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = tx.blocking_send(job.run());
                });
            }
            // Nothing written since the last sync, which has completed: already durable.
            Ok(None) => release(std::mem::take(&mut self.waiting), &Ok(())),
            Err(e) => {
                error!(error = %e, "cannot sync the audit spool");
                release(
                    std::mem::take(&mut self.waiting),
                    &Err(NotDurable::Write(e.to_string())),
                );
            }
        }
    }

    /// The sync in flight finished: its strict decisions learn the outcome.
    fn sync_done(&mut self, r: Result<(), SpoolError>) {
        self.syncing = false;
        let r = r.and_then(|()| {
            self.syncs.fetch_add(1, Ordering::Relaxed);
            self.synced_through
                .store(self.synced_seq, Ordering::Relaxed);
            if self.state_sync {
                self.spool.after_sync(self.synced_seq)
            } else {
                Ok(())
            }
        });
        let outcome = match r {
            Ok(()) => Ok(()),
            Err(e) => {
                error!(error = %e, "cannot sync the audit spool");
                Err(NotDurable::Write(e.to_string()))
            }
        };
        release(std::mem::take(&mut self.in_sync), &outcome);
    }

    fn write_gap_if_any(&mut self, ts_ms: i64) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_dropped && !self.full.load(Ordering::Relaxed) {
            let mut f = Map::new();
            f.insert(
                "dropped".into(),
                Value::from(dropped - self.reported_dropped),
            );
            self.reported_dropped = dropped;
            let _ = self.write("gap", ts_ms, f);
        }
    }

    fn maybe_checkpoint(&mut self) {
        let due = self.unsigned >= CHECKPOINT_RECORDS
            || self
                .first_unsigned
                .is_some_and(|t| t.elapsed() >= CHECKPOINT_INTERVAL);
        if due {
            self.checkpoint_now();
        }
    }

    /// Signs a checkpoint now if any record is unsigned.
    fn checkpoint_now(&mut self) {
        if self.unsigned == 0 {
            return;
        }
        let Some(svid) = self.identity.creds.get() else {
            return;
        };
        let source = self.identity.id.to_string();
        let seq = self.spool.state.next_seq;
        let prev = self.spool.state.last_hash.clone();
        let msg = checkpoint_message(&source, &self.spool.state.epoch, seq, &prev);
        let Some(sig) = sign_with(&svid.certified, &msg) else {
            warn!("cannot sign an audit checkpoint with the current SVID");
            return;
        };
        let fields = checkpoint_fields(&sig, &svid.certified.cert);
        self.unsigned = 0;
        self.first_unsigned = None;
        let _ = self.write("checkpoint", now_ms(), fields);
    }
}

/// Tells waiting strict decisions how their sync went.
fn release(waiters: Vec<Waiter>, outcome: &Result<(), NotDurable>) {
    for (seq, tx) in waiters {
        let _ = tx.send(outcome.clone().map(|()| seq));
    }
}

impl Actor {
    /// The control plane stored everything up to `acked` of `target`'s chain.
    fn acked(&mut self, target: Target, acked: u64) {
        let r = match target {
            Target::Live => self.spool.ack(acked),
            Target::Backlog => {
                let r = self.backlog.front_mut().map_or(Ok(()), |b| b.ack(acked));
                if self.backlog.front().is_some_and(|b| b.index.is_empty())
                    && let Some(b) = self.backlog.pop_front()
                {
                    info!(epoch = %b.state.epoch, "an audit backlog epoch is delivered");
                    b.remove();
                }
                r
            }
        };
        if let Err(e) = r {
            error!(error = %e, "cannot trim the audit spool");
        }
        self.update_full();
        self.write_gap_if_any(now_ms());
    }

    /// A `409` from the control plane: it will not continue this chain (it expects records the
    /// spool no longer has, or holds different ones). Instead of retrying forever, the records
    /// go on in a new chain after a `gap` record that says so. Returns whether it was such a
    /// refusal.
    fn refused_chain(&mut self, target: Target, e: &mayfly_ca::client::ClientError) -> bool {
        let why = match e {
            mayfly_ca::client::ClientError::Refused {
                status: 409,
                reason,
                ..
            } => {
                if reason == "audit_diverged" {
                    recover::Why::ControlPlaneDiverged
                } else {
                    recover::Why::ControlPlaneGap
                }
            }
            _ => return false,
        };
        warn!(error = %e, "the control plane refuses to continue an audit chain");
        match target {
            Target::Live => {
                if let Err(e) = self.spool.roll_live(why) {
                    error!(error = %e, "cannot roll the audit spool to a new epoch");
                    return false;
                }
                // A new epoch: nothing of it is unsigned yet.
                self.unsigned = 0;
                self.first_unsigned = None;
            }
            Target::Backlog => {
                // The closed epoch's records continue the live chain, after a gap record.
                let Some(mut b) = self.backlog.pop_front() else {
                    return true;
                };
                let body = match b.unacked_bytes_upto(usize::MAX) {
                    Ok(body) => body,
                    Err(e) => {
                        error!(error = %e, "cannot read an audit backlog");
                        self.backlog.push_front(b);
                        return false;
                    }
                };
                let records = recover::parse_lines(&body);
                let loss = recover::Loss {
                    why,
                    epoch: b.state.epoch.clone(),
                    last_seq: b.state.acked_seq,
                    lost: Vec::new(),
                    quarantined: None,
                };
                let _ = self.write("gap", now_ms(), recover::gap_fields(&loss, records.len()));
                for r in records {
                    let (kind, ts_ms, f) = recover::rechained(r);
                    let _ = self.write(&kind, ts_ms, f);
                }
                b.remove();
            }
        }
        true
    }

    /// Starts delivering the oldest unacknowledged records (up to `SHIP_BATCH`) to the control
    /// plane; the answer comes back on `done`. Returns whether a delivery is now in flight.
    fn ship(&mut self, done: &mpsc::Sender<ShipResult>) -> bool {
        // Closed epochs first, oldest first, one chain per delivery.
        while self.backlog.front().is_some_and(|b| b.index.is_empty()) {
            if let Some(b) = self.backlog.pop_front() {
                b.remove();
            }
        }
        let (target, spool) = match self.backlog.front_mut() {
            Some(b) => (Target::Backlog, b),
            None => (Target::Live, &mut self.spool),
        };
        if spool.index.is_empty() {
            return false;
        }
        let Some(mut session) = self.session.take() else {
            return false;
        };
        // The spool holds the lines as the control plane wants them: newline-terminated, in
        // order, so the body is one contiguous read.
        let body = match spool.unacked_bytes_upto(SHIP_BATCH) {
            Ok(body) => body,
            Err(e) => {
                error!(error = %e, "cannot read the audit spool");
                self.session = Some(session);
                return false;
            }
        };
        let tx = done.clone();
        tokio::spawn(async move {
            let r = session.post(bytes::Bytes::from(body)).await;
            let _ = tx.send((session, target, r)).await;
        });
        true
    }
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

async fn run(mut a: Actor, mut rx: mpsc::Receiver<Event>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (ship_tx, mut ship_rx) = mpsc::channel::<ShipResult>(1);
    let mut in_flight = false;
    let mut backoff = Duration::from_millis(250);
    let mut next_ship = tokio::time::Instant::now();
    // At most one sync runs at a time, on the blocking pool: the data path never waits for
    // the disk (in strict mode, only the decisions whose records a sync must cover wait).
    let (sync_tx, mut sync_rx) = mpsc::channel::<Result<(), SpoolError>>(1);
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => {
                    a.on_event(ev);
                    // Take what else is queued before syncing: one sync for the whole group.
                    for _ in 0..EVENTS_PER_TURN {
                        match rx.try_recv() {
                            Ok(ev) => a.on_event(ev),
                            Err(_) => break,
                        }
                    }
                    // Strict decisions do not wait for the tick; those that arrive while a
                    // sync runs wait for the next one, which starts as soon as it ends.
                    if !a.waiting.is_empty() {
                        a.start_sync(&sync_tx);
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                a.maybe_checkpoint();
                a.state_due = true;
                a.start_sync(&sync_tx);
                a.update_full();
                a.metrics.audit_spool_bytes.set(i64::try_from(a.unacked_total()).unwrap_or(i64::MAX));
                a.metrics.audit_dropped_reached(a.dropped.load(Ordering::Relaxed));
                if !in_flight && tokio::time::Instant::now() >= next_ship {
                    in_flight = a.ship(&ship_tx);
                }
            }
            Some(r) = sync_rx.recv() => {
                a.sync_done(r);
                if !a.waiting.is_empty() {
                    a.start_sync(&sync_tx);
                }
            }
            Some((session, target, r)) = ship_rx.recv() => {
                in_flight = false;
                a.session = Some(session);
                if let Ok(mut e) = a.delivery_error.lock() {
                    *e = r.as_ref().err().map(ToString::to_string);
                }
                match r {
                    Ok(acked) => {
                        backoff = Duration::from_millis(250);
                        a.acked(target, acked);
                        // Batch: one delivery a second while records trickle in, back to back
                        // (without waiting for the next tick) while a full batch is waiting.
                        next_ship = tokio::time::Instant::now() + SHIP_EVERY;
                        let waiting = a.backlog.front().map_or(a.spool.index.len(), |b| b.index.len());
                        if waiting >= SHIP_BATCH || !a.backlog.is_empty() {
                            in_flight = a.ship(&ship_tx);
                        }
                    }
                    Err(e) => {
                        if a.refused_chain(target, &e) {
                            next_ship = tokio::time::Instant::now();
                        } else {
                            warn!(error = %e, retry_in = ?backoff, "cannot deliver audit records; they stay in the spool");
                            next_ship = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
            _ = shutdown.changed() => {
                // Take what is queued, then sync.
                while let Ok(ev) = rx.try_recv() {
                    a.on_event(ev);
                }
                break;
            }
        }
    }
    if a.syncing
        && let Some(r) = sync_rx.recv().await
    {
        a.sync_done(r);
    }
    // A clean shutdown: sign what is unsigned, and mark the spool closed so the next start
    // continues this epoch instead of rolling to a new one.
    a.checkpoint_now();
    let outcome = a.spool.close().map_err(|e| {
        error!(error = %e, "cannot sync the audit spool at shutdown");
        NotDurable::Write(e.to_string())
    });
    release(std::mem::take(&mut a.waiting), &outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, prev: &str) -> Record {
        Record {
            v: VERSION,
            source: "spiffe://t/a".into(),
            epoch: "e".into(),
            seq,
            prev: prev.into(),
            ts_ms: 1,
            kind: "connection.open".into(),
            fields: Map::new(),
        }
    }

    #[test]
    fn the_spool_survives_reopening_and_trims_only_acknowledged_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), None).unwrap();
        let epoch = s.state.epoch.clone();
        for _ in 0..5 {
            let r = Record {
                epoch: epoch.clone(),
                ..rec(s.state.next_seq, &s.state.last_hash.clone())
            };
            s.append(&r).unwrap();
        }
        s.sync().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), None).unwrap();
        assert_eq!(s.state.next_seq, 6);
        assert_eq!(s.state.epoch, epoch);
        let lines = s.unacked(10).unwrap();
        assert_eq!(
            lines.iter().map(|l| l.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let chain = mayfly_ca::audit::verify_lines("c", lines.iter().map(|l| l.1.as_slice()), None)
            .unwrap();
        assert_eq!(chain.records, 5);
        s.ack(3).unwrap();
        assert_eq!(
            s.unacked(10)
                .unwrap()
                .iter()
                .map(|l| l.0)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        s.ack(5).unwrap();
        assert!(s.unacked(10).unwrap().is_empty());
        // Acknowledged records are a hole now; once the state is durable the file is cut.
        let spool_file = dir.path().join("spool.jsonl");
        let bytes = std::fs::read(&spool_file).unwrap();
        assert!(!bytes.is_empty() && bytes.iter().all(|b| *b == 0));
        let synced = s.state.next_seq;
        s.sync().unwrap();
        s.after_sync(synced).unwrap();
        assert_eq!(std::fs::metadata(&spool_file).unwrap().len(), 0);
        drop(s);
        let s = Spool::open(dir.path(), None).unwrap();
        assert_eq!(
            s.state.next_seq, 6,
            "numbering continues after a trim and a restart"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    /// Draining a long backlog rewrites the file only when the acknowledged head is at least as
    /// large as the rest (linear cost), and every trim keeps the right records at the right
    /// offsets, across a reopen too.
    #[test]
    fn trims_are_amortised_and_keep_the_unacknowledged_tail_intact() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), None).unwrap();
        s.rewrite_after = 1 << 20;
        let epoch = s.state.epoch.clone();
        let pad = "x".repeat(1000);
        for _ in 0..4000 {
            let mut r = Record {
                epoch: epoch.clone(),
                ..rec(s.state.next_seq, &s.state.last_hash.clone())
            };
            r.fields.insert("pad".into(), pad.clone().into());
            s.append(&r).unwrap();
        }
        s.sync().unwrap();
        let file = dir.path().join("spool.jsonl");
        let size = || std::fs::metadata(&file).unwrap().len();
        let full = size();
        use std::os::unix::fs::MetadataExt;
        let blocks = || std::fs::metadata(&file).unwrap().blocks();
        let full_blocks = blocks();
        // About 1.1 MB acknowledged of about 4.4 MB: over 1 MiB but less than the rest, so no
        // rewrite yet; the acknowledged head is punched out in place.
        s.ack(1000).unwrap();
        assert_eq!(size(), full);
        assert!(
            blocks() < full_blocks * 4 / 5,
            "{} of {full_blocks}",
            blocks()
        );
        assert_eq!(s.unacked(1).unwrap()[0].0, 1001);
        drop(s);
        // Reopened, the hole is skipped and the numbering continues.
        let mut s = Spool::open(dir.path(), None).unwrap();
        s.rewrite_after = 1 << 20;
        assert_eq!(s.unacked_bytes(), full - s.index[0].1);
        assert_eq!(
            s.unacked(1).unwrap()[0].0,
            1001,
            "the acknowledged head is skipped"
        );
        // More than half acknowledged: the head is cut.
        s.ack(2100).unwrap();
        assert!(size() < full / 2, "{} of {full}", size());
        let tail = s.unacked(5000).unwrap();
        assert_eq!(tail.len(), 1900);
        assert_eq!(tail[0].0, 2101);
        let chain =
            mayfly_ca::audit::verify_lines("c", tail.iter().map(|l| l.1.as_slice()), None).unwrap();
        assert_eq!(chain.last_seq, 4000);
        drop(s);
        let mut s = Spool::open(dir.path(), None).unwrap();
        let again = s.unacked(5000).unwrap();
        assert_eq!(again.len(), 1900);
        assert_eq!(again[0], tail[0]);
        assert_eq!(s.state.next_seq, 4001);
    }

    /// A spool that is all hole (everything acknowledged, then a restart before the file was
    /// cut) reopens empty and goes on numbering where it was.
    #[test]
    fn an_all_hole_spool_reopens_empty_and_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), None).unwrap();
        let epoch = s.state.epoch.clone();
        let append = |s: &mut Spool| {
            let r = Record {
                epoch: epoch.clone(),
                ..rec(s.state.next_seq, &s.state.last_hash.clone())
            };
            s.append(&r).unwrap();
        };
        for _ in 0..3 {
            append(&mut s);
        }
        assert_eq!(s.unacked(10).unwrap().len(), 3);
        s.ack(3).unwrap();
        s.sync().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), None).unwrap();
        assert!(s.unacked(10).unwrap().is_empty());
        assert_eq!(s.unacked_bytes(), 0);
        assert_eq!(s.state.next_seq, 4);
        append(&mut s);
        let lines = s.unacked(10).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].0, 4);
        let r: Record = serde_json::from_slice(&lines[0].1).unwrap();
        assert_eq!(r.seq, 4);
    }

    #[test]
    fn a_torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), None).unwrap();
        append_n(&mut s, 1);
        s.sync().unwrap();
        drop(s);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("spool.jsonl"))
            .unwrap();
        f.write_all(b"{\"v\":1,\"sour").unwrap();
        drop(f);
        let mut s = Spool::open(dir.path(), None).unwrap();
        assert_eq!(s.unacked(10).unwrap().len(), 1);
        assert_eq!(s.state.next_seq, 2);
    }

    const SRC: &str = "spiffe://t/a";

    fn append_n(s: &mut Spool, n: usize) {
        for _ in 0..n {
            let r = Record {
                epoch: s.state.epoch.clone(),
                ..rec(s.state.next_seq, &s.state.last_hash.clone())
            };
            s.append(&r).unwrap();
        }
    }

    fn lines_of(path: &Path) -> Vec<Record> {
        std::fs::read(path)
            .unwrap()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty() && l[0] != 0)
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    fn raw_lines(path: &Path) -> Vec<Vec<u8>> {
        std::fs::read(path)
            .unwrap()
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    #[test]
    fn a_clean_close_continues_the_epoch_and_an_unclean_stop_rolls_to_a_new_one_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), Some(SRC)).unwrap();
        let first = s.state.epoch.clone();
        append_n(&mut s, 3);
        s.ack(2).unwrap();
        s.close().unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), Some(SRC)).unwrap();
        assert_eq!(s.state.epoch, first, "a clean close keeps the epoch");
        assert_eq!(s.state.next_seq, 4);
        append_n(&mut s, 2);
        s.sync().unwrap();
        // Killed: no close. Records 3..5 are unacknowledged.
        drop(s);
        let s = Spool::open(dir.path(), Some(SRC)).unwrap();
        assert_ne!(
            s.state.epoch, first,
            "an unclean stop never reuses the epoch's numbers"
        );
        let live = lines_of(&dir.path().join("spool.jsonl"));
        assert_eq!(live.len(), 1);
        let gap = &live[0];
        assert_eq!(
            (gap.kind.as_str(), gap.seq, gap.prev.as_str()),
            ("gap", 1, GENESIS)
        );
        assert_eq!(gap.fields["reason"], "unclean_shutdown");
        assert_eq!(gap.fields["previous_epoch"], first.as_str());
        assert_eq!(gap.fields["previous_last_seq"], 5);
        // The old epoch's unacknowledged records wait in a backlog, intact and in order.
        let backlog = dir.path().join("epochs").join(&first).join("spool.jsonl");
        let old = raw_lines(&backlog);
        let chain =
            mayfly_ca::audit::verify_lines("c", old.iter().map(Vec::as_slice), None).unwrap();
        assert_eq!((chain.records, chain.last_seq), (3, 5));
        drop(s);
        let b = Spool::open(&dir.path().join("epochs").join(&first), Some(SRC)).unwrap();
        assert_eq!(
            b.index.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
    }

    #[test]
    fn a_damaged_line_mid_spool_is_quarantined_and_every_other_record_is_kept_behind_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), Some(SRC)).unwrap();
        let first = s.state.epoch.clone();
        append_n(&mut s, 10);
        s.close().unwrap();
        drop(s);
        let path = dir.path().join("spool.jsonl");
        let mut lines = raw_lines(&path);
        let original5 = lines[4].clone();
        lines[4] = b"{\"v\":1,\"source\":garbage".to_vec();
        let mut body = lines.join(&b'\n');
        body.push(b'\n');
        std::fs::write(&path, body).unwrap();

        let s = Spool::open(dir.path(), Some(SRC)).unwrap();
        assert_ne!(s.state.epoch, first);
        // Records 1..4 of the old epoch: a backlog that chains.
        let old = raw_lines(&dir.path().join("epochs").join(&first).join("spool.jsonl"));
        let chain =
            mayfly_ca::audit::verify_lines("c", old.iter().map(Vec::as_slice), None).unwrap();
        assert_eq!((chain.records, chain.last_seq), (4, 4));
        // The damaged line, kept for inspection.
        let q: Vec<_> = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .collect();
        assert_eq!(q.len(), 1);
        let kept = std::fs::read(q[0].as_ref().unwrap().path()).unwrap();
        assert!(kept.starts_with(b"{\"v\":1,\"source\":garbage"));
        assert_ne!(kept, original5);
        // The new epoch: a gap naming seq 5, then 6..10 re-chained, and it chains.
        let live = raw_lines(&path);
        let chain =
            mayfly_ca::audit::verify_lines("c", live.iter().map(Vec::as_slice), None).unwrap();
        assert_eq!(chain.records, 6);
        let recs = lines_of(&path);
        assert_eq!(recs[0].kind, "gap");
        assert_eq!(recs[0].fields["reason"], "spool_damaged");
        assert_eq!(recs[0].fields["lost_seqs"], serde_json::json!([5]));
        assert_eq!(recs[0].fields["previous_last_seq"], 4);
        let from: Vec<String> = recs[1..]
            .iter()
            .map(|r| r.fields["rechained_from"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            from,
            (6..=10).map(|i| format!("{first}:{i}")).collect::<Vec<_>>()
        );
        assert_eq!(s.index.len(), 6, "every survivor is waiting for delivery");
    }

    #[test]
    fn an_edited_record_mid_spool_is_caught_by_its_successors_link() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), Some(SRC)).unwrap();
        append_n(&mut s, 6);
        s.close().unwrap();
        drop(s);
        let path = dir.path().join("spool.jsonl");
        let text = String::from_utf8(std::fs::read(&path).unwrap()).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[2] = lines[2].replace("connection.open", "connection.opex");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let _s = Spool::open(dir.path(), Some(SRC)).unwrap();
        let recs = lines_of(&path);
        assert_eq!(recs[0].fields["lost_seqs"], serde_json::json!([3]));
        assert_eq!(recs.len(), 1 + 3, "gap, then 4..6 re-chained");
    }

    #[test]
    fn a_roll_cut_by_a_crash_is_completed_or_redone_on_the_next_opening() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), Some(SRC)).unwrap();
        let first = s.state.epoch.clone();
        append_n(&mut s, 3);
        s.sync().unwrap();
        drop(s);
        // A crash after the new file was written but before the state was switched: undone,
        // and the roll is done again.
        std::fs::write(dir.path().join("spool.jsonl.new"), b"{}\n").unwrap();
        let s = Spool::open(dir.path(), Some(SRC)).unwrap();
        assert_ne!(s.state.epoch, first);
        assert!(!dir.path().join("spool.jsonl.new").exists());
        let recs = lines_of(&dir.path().join("spool.jsonl"));
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].kind, "gap");
    }
}
