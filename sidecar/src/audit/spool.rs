//! The on-disk spool: records appended to `spool.jsonl` with the chain's head in `state.json`,
//! synced off the data path, acknowledged records given back as holes (or by a rewrite), and
//! the spool rolled to a new epoch when its chain cannot continue (see `recover`).

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mayfly_ca::audit::{GENESIS, LineHash};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use super::{SpoolError, recover};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    /// The SPIFFE ID whose records this spool holds.
    #[serde(default)]
    pub(super) source: Option<String>,
    pub(super) epoch: String,
    pub(super) next_seq: u64,
    pub(super) last_hash: String,
    pub(super) acked_seq: u64,
    /// True only while the spool is closed after a clean shutdown: found false on opening, the
    /// sidecar stopped without one (records it had not synced may be lost) and the chain rolls
    /// to a new epoch that says so (see `recover`).
    #[serde(default)]
    pub(super) clean: bool,
    /// A closed epoch kept only to deliver what is left of it (a backlog spool): never
    /// appended to, never rolled.
    #[serde(default)]
    pub(super) closed: bool,
    /// When this epoch began after a roll (orders backlog spools).
    #[serde(default)]
    pub(super) rolled_at_ms: i64,
}

/// A spool sync taken off the data path (it waits for the disk): the spool file's data, then
/// (unless it is a data-only sync for strict decisions) the state file.
pub(super) struct SyncJob {
    file: std::fs::File,
    spool_path: PathBuf,
    pub(super) state: Option<(PathBuf, Vec<u8>)>,
}

impl SyncJob {
    pub(super) fn run(self) -> Result<(), SpoolError> {
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

pub(super) struct Spool {
    pub(super) dir: PathBuf,
    pub(super) file: std::io::BufWriter<std::fs::File>,
    pub(super) state: State,
    /// (seq, start, end) byte ranges of the unacknowledged lines in the file, in order.
    pub(super) index: VecDeque<(u64, u64, u64)>,
    /// Everything before this offset is acknowledged (trimmed lazily).
    pub(super) acked_end: u64,
    /// Everything before this offset is a hole: acknowledged records whose disk space was given
    /// back in place (no copy, offsets unchanged).
    pub(super) punched: u64,
    /// False once the filesystem refused to punch a hole (then only rewrites reclaim space).
    pub(super) can_punch: bool,
    /// The file is rewritten without its acknowledged head once that head is over this size and
    /// at least as large as the rest (so draining a long backlog stays linear).
    pub(super) rewrite_after: u64,
    pub(super) len: u64,
    pub(super) dirty: bool,
}

pub(super) fn io(p: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |e| SpoolError::Io(p.to_path_buf(), e)
}

pub(super) fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
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

pub(super) fn open_append(p: &Path) -> Result<std::fs::File, SpoolError> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(p)
        .map_err(io(p))
}

impl Spool {
    pub(super) fn path(&self) -> PathBuf {
        self.dir.join("spool.jsonl")
    }

    pub(super) fn open_for(dir: &Path, source: &str) -> Result<Self, SpoolError> {
        Self::open(dir, Some(source))
    }

    /// Opens (or creates) the spool in `dir` for `source`'s records. A spool that was not
    /// closed cleanly, or whose lines are damaged, rolls to a new epoch first (`recover`); a
    /// torn last line is cut off.
    pub(super) fn open(dir: &Path, source: Option<&str>) -> Result<Self, SpoolError> {
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
    pub(super) fn roll_on_open(
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
    pub(super) fn roll_live(&mut self, why: recover::Why) -> Result<(), SpoolError> {
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
    pub(super) fn remove(self) {
        let dir = self.dir.clone();
        drop(self);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(error = %e, path = %dir.display(), "cannot remove a delivered audit backlog");
        }
    }

    /// Marks the spool cleanly closed and syncs it (at a clean shutdown).
    pub(super) fn close(&mut self) -> Result<(), SpoolError> {
        self.state.clean = true;
        self.dirty = true;
        self.sync()
    }

    pub(super) fn save_state(&mut self) -> Result<(), SpoolError> {
        let p = self.dir.join("state.json");
        let data = serde_json::to_vec(&self.state).unwrap_or_default();
        write_atomic(&p, &data).map_err(io(&p))
    }

    #[cfg(test)]
    pub(super) fn append(&mut self, r: &mayfly_ca::audit::Record) -> Result<Vec<u8>, SpoolError> {
        self.append_line(r.seq, r.line())
    }

    /// Appends the line of record `seq` (built by [`super::record::line_of`]).
    pub(super) fn append_line(&mut self, seq: u64, line: Vec<u8>) -> Result<Vec<u8>, SpoolError> {
        // Into the write buffer as it is, newline after: no copy of the line per record.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.write_all(b"\n"))
            .map_err(|e| io(&self.path())(e))?;
        let start = self.len;
        self.len += line.len() as u64 + 1;
        self.index.push_back((seq, start, self.len));
        self.state.next_seq = seq + 1;
        // Hex on the stack, into the kept string: no allocation per record.
        let hash = LineHash::of(&line);
        self.state.last_hash.clear();
        self.state.last_hash.push_str(hash.as_str());
        self.dirty = true;
        Ok(line)
    }

    /// Flushes the write buffer and returns the fsync of the file and (`with_state`) the state
    /// save to run off the data path (`None` when nothing changed since the last one). A
    /// data-only sync makes the records durable (the file is the truth on reopening; the state
    /// only caches it) and leaves the state to the next full sync.
    pub(super) fn begin_sync(&mut self, with_state: bool) -> Result<Option<SyncJob>, SpoolError> {
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
    pub(super) fn after_sync(&mut self, synced_next_seq: u64) -> Result<(), SpoolError> {
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
    pub(super) fn sync(&mut self) -> Result<(), SpoolError> {
        match self.begin_sync(true)? {
            Some(job) => job.run(),
            None => Ok(()),
        }
    }

    /// Bytes of records not yet acknowledged.
    pub(super) fn unacked_bytes(&self) -> u64 {
        self.len - self.acked_end
    }

    /// Up to `max` unacknowledged lines, oldest first, without their newlines (tests: the
    /// same read as a delivery body, cut at the index).
    #[cfg(test)]
    pub(super) fn unacked(&mut self, max: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
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
    pub(super) fn unacked_bytes_upto(&mut self, max: usize) -> Result<Vec<u8>, SpoolError> {
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
    pub(super) fn ack(&mut self, seq: u64) -> Result<(), SpoolError> {
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
    pub(super) fn trim(&mut self) -> Result<(), SpoolError> {
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
