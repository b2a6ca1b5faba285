//! Recovering a spool that was not closed cleanly, or that is damaged: nothing is lost
//! silently.
//!
//! A spool is read back as its writer's chain. Where that chain cannot simply continue — the
//! sidecar stopped without a clean shutdown (records still in memory may be gone), a line in
//! the middle does not parse or does not chain, or the control plane expects records the spool
//! no longer has — the writer **rolls to a new epoch**:
//!
//! - the intact, unacknowledged records of the old epoch stay as they are, in a closed
//!   *backlog* spool (`epochs/<epoch>/`), and are delivered first, so the control plane gets the
//!   old chain up to its last intact record;
//! - damaged lines are kept byte for byte in `quarantine/` (0600) for inspection;
//! - the new epoch begins with a `gap` record naming the old epoch, its last intact seq, what
//!   was lost and why; intact records that followed the damage are written after it, re-chained,
//!   each with `rechained_from: "<epoch>:<seq>"`.
//!
//! A sequence number is never reused within an epoch, and every loss is a `gap` record on the
//! writer's chain, where `audit verify` and `audit query --kind gap` see it.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mayfly_ca::audit::{GENESIS, Record, VERSION, line_hash};
use serde_json::{Map, Value};
use tracing::warn;

use super::{SpoolError, State, io, now_ms, write_atomic};

/// The directory under a spool that holds closed epochs still to deliver.
pub(super) const EPOCHS_DIR: &str = "epochs";
/// The directory under a spool that keeps damaged lines.
pub(super) const QUARANTINE_DIR: &str = "quarantine";

/// What reading a spool file back found.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// The intact records from the start of the file: (seq, start, end, hash of the line).
    pub(super) intact: Vec<(u64, u64, u64, String)>,
    /// Byte ranges of lines that do not parse or do not chain.
    pub(super) damaged: Vec<(u64, u64)>,
    /// Seqs known lost (a damaged record's place, between intact neighbours).
    pub(super) lost: Vec<u64>,
    /// Parseable records after the first damage (to re-chain), with their own seq.
    pub(super) after: Vec<Record>,
    /// End of the last complete line (a torn last line is cut here).
    pub(super) good_end: u64,
    /// The file ended with an incomplete line.
    pub(super) torn: bool,
}

impl Scan {
    /// Whether anything in the middle of the file is damaged.
    pub(super) fn damaged(&self) -> bool {
        !self.damaged.is_empty() || !self.after.is_empty()
    }
}

/// Reads the lines of a spool file (`data` starts at file offset `base`) as `state`'s chain.
pub(super) fn scan(data: &[u8], base: u64, state: &State) -> Scan {
    let mut s = Scan {
        good_end: base,
        ..Scan::default()
    };
    let mut off = base;
    // (seq, hash) of the last intact record.
    let mut last: Option<(u64, String)> = None;
    let mut broken = false;
    for line in data.split_inclusive(|b| *b == b'\n') {
        let start = off;
        off += line.len() as u64;
        let Some(body) = line.strip_suffix(b"\n") else {
            s.torn = true;
            break;
        };
        s.good_end = off;
        let parsed = serde_json::from_slice::<Record>(body).ok().filter(|r| {
            r.epoch == state.epoch && state.source.as_ref().is_none_or(|o| *o == r.source)
        });
        let Some(r) = parsed else {
            broken = true;
            s.damaged.push((start, off));
            continue;
        };
        if broken {
            s.after.push(r);
            continue;
        }
        let hash = line_hash(body);
        match &last {
            Some((seq, h)) if r.seq != seq + 1 || r.prev != *h => {
                // The record before this one was altered (its hash no longer matches this
                // record's `prev`), or records are missing or out of order: keep the earlier
                // intact part, quarantine the suspect, re-chain from here.
                broken = true;
                if r.seq == seq + 1 {
                    if let Some((sq, st, en, _)) = s.intact.pop() {
                        s.damaged.push((st, en));
                        s.lost.push(sq);
                    }
                } else {
                    s.lost.extend(seq + 1..r.seq.min(seq + 1 + 1024));
                }
                s.after.push(r);
            }
            _ => {
                last = Some((r.seq, hash.clone()));
                s.intact.push((r.seq, start, off, hash));
            }
        }
    }
    // Damaged lines between two intact records: their seqs are known from the neighbours.
    if let (Some((seq, ..)), Some(first)) = (s.intact.last(), s.after.first())
        && s.lost.is_empty()
        && first.seq > seq + 1
    {
        s.lost.extend(seq + 1..first.seq.min(seq + 1 + 1024));
    }
    s
}

/// Why a spool rolled to a new epoch.
#[derive(Debug, Clone, Copy)]
pub(super) enum Why {
    /// The sidecar stopped without a clean shutdown: records written in the last moments before
    /// it (not yet on disk) may be lost.
    UncleanShutdown,
    /// Lines in the spool do not parse or do not chain.
    SpoolDamaged,
    /// The control plane expects a seq this spool no longer holds.
    ControlPlaneGap,
    /// The control plane holds a different record at a seq this spool holds.
    ControlPlaneDiverged,
}

impl Why {
    /// The reason code, as written in the `gap` record.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Why::UncleanShutdown => "unclean_shutdown",
            Why::SpoolDamaged => "spool_damaged",
            Why::ControlPlaneGap => "control_plane_gap",
            Why::ControlPlaneDiverged => "control_plane_diverged",
        }
    }
}

/// What the new epoch's first record says about the old one.
pub(super) struct Loss {
    pub(super) why: Why,
    /// The old epoch.
    pub(super) epoch: String,
    /// Its last intact seq (delivered or in the backlog).
    pub(super) last_seq: u64,
    /// Seqs known lost.
    pub(super) lost: Vec<u64>,
    /// Where damaged lines were kept.
    pub(super) quarantined: Option<PathBuf>,
}

/// The fields of the `gap` record that says what `loss` lost and that `rechained` records
/// follow it.
pub(super) fn gap_fields(loss: &Loss, rechained: usize) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("reason".into(), Value::from(loss.why.as_str()));
    fields.insert("previous_epoch".into(), Value::from(loss.epoch.clone()));
    fields.insert("previous_last_seq".into(), Value::from(loss.last_seq));
    if !loss.lost.is_empty() {
        fields.insert("lost_seqs".into(), Value::from(loss.lost.clone()));
    }
    if let Some(q) = &loss.quarantined {
        fields.insert("quarantined".into(), Value::from(q.display().to_string()));
    }
    fields.insert("rechained".into(), Value::from(rechained));
    if matches!(loss.why, Why::UncleanShutdown) {
        fields.insert(
            "note".into(),
            Value::from("records written after previous_last_seq and before the stop may be lost"),
        );
    }
    fields
}

/// A record carried into a new chain: its kind, time and fields, with `rechained_from`
/// naming its old place. A checkpoint's signature covers its old place in the old chain: it no
/// longer vouches for anything, so it is carried as a plain `checkpoint.rechained` record.
pub(super) fn rechained(r: Record) -> (String, i64, Map<String, Value>) {
    let mut f = r.fields;
    f.insert(
        "rechained_from".into(),
        Value::from(format!("{}:{}", r.epoch, r.seq)),
    );
    let kind = if r.kind == "checkpoint" {
        "checkpoint.rechained".to_owned()
    } else {
        r.kind
    };
    (kind, r.ts_ms, f)
}

/// Records from newline-terminated spool lines; lines that do not parse are skipped (the
/// spool's own scan has put damaged lines aside already).
pub(super) fn parse_lines(body: &[u8]) -> Vec<Record> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect()
}

/// A fresh random epoch.
pub(super) fn new_epoch() -> String {
    let mut b = [0u8; 8];
    mayfly_ca::keys::fill_random(&mut b);
    hex::encode(b)
}

/// The lines (without newlines) of a new epoch that starts with the `gap` record for `loss`
/// and goes on with `after`, re-chained. Returns the lines and the new state.
pub(super) fn new_chain(source: &str, loss: &Loss, after: Vec<Record>) -> (Vec<Vec<u8>>, State) {
    let epoch = new_epoch();
    let fields = gap_fields(loss, after.len());
    let mut lines = Vec::with_capacity(after.len() + 1);
    let mut prev = GENESIS.to_owned();
    let mut seq = 1;
    let mut push =
        |kind: String, ts_ms: i64, fields: Map<String, Value>, lines: &mut Vec<Vec<u8>>| {
            let r = Record {
                v: VERSION,
                source: source.to_owned(),
                epoch: epoch.clone(),
                seq,
                prev: prev.clone(),
                ts_ms,
                kind,
                fields,
            };
            let line = r.line();
            prev = line_hash(&line);
            seq += 1;
            lines.push(line);
        };
    push("gap".into(), now_ms(), fields, &mut lines);
    for r in after {
        let (kind, ts_ms, f) = rechained(r);
        push(kind, ts_ms, f, &mut lines);
    }
    let new = State {
        source: Some(source.to_owned()),
        epoch,
        next_seq: seq,
        last_hash: prev,
        acked_seq: 0,
        clean: true,
        closed: false,
        rolled_at_ms: now_ms(),
    };
    (lines, new)
}

fn mkdir(p: &Path) -> Result<(), SpoolError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(io(p))
}

fn sync_dir(p: &Path) {
    if let Ok(d) = std::fs::File::open(p) {
        let _ = d.sync_all();
    }
}

/// Keeps damaged bytes for inspection; returns the file.
pub(super) fn quarantine(dir: &Path, epoch: &str, bytes: &[u8]) -> Result<PathBuf, SpoolError> {
    let qdir = dir.join(QUARANTINE_DIR);
    mkdir(&qdir)?;
    let p = qdir.join(format!("{epoch}-{}.jsonl", now_ms()));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&p)
        .map_err(io(&p))?;
    f.write_all(bytes).map_err(io(&p))?;
    f.sync_all().map_err(io(&p))?;
    Ok(p)
}

/// Writes `lines` of the closed epoch `state` as a backlog spool to deliver before the live one.
pub(super) fn write_backlog(dir: &Path, state: &State, lines: &[u8]) -> Result<(), SpoolError> {
    let bdir = dir.join(EPOCHS_DIR).join(&state.epoch);
    mkdir(&bdir)?;
    let spool = bdir.join("spool.jsonl");
    write_atomic(&spool, lines).map_err(io(&spool))?;
    let mut st = state.clone();
    st.clean = true;
    st.closed = true;
    st.rolled_at_ms = now_ms();
    let sp = bdir.join("state.json");
    let data =
        serde_json::to_vec(&st).map_err(|e| SpoolError::Corrupt(sp.clone(), e.to_string()))?;
    write_atomic(&sp, &data).map_err(io(&sp))?;
    sync_dir(&dir.join(EPOCHS_DIR));
    Ok(())
}

/// Replaces the live spool with a new epoch's `lines` and `state`, so that a crash at any point
/// leaves either the old spool (the roll is then done again) or the new one:
/// `spool.jsonl.new` is written first, then the state is switched (the commit point), then the
/// file is renamed into place; [`finish_interrupted`] completes a roll cut between the two.
pub(super) fn install(dir: &Path, lines: &[Vec<u8>], state: &State) -> Result<(), SpoolError> {
    let new = dir.join("spool.jsonl.new");
    let mut body = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        body.extend_from_slice(l);
        body.push(b'\n');
    }
    write_atomic(&new, &body).map_err(io(&new))?;
    let sp = dir.join("state.json");
    let data =
        serde_json::to_vec(state).map_err(|e| SpoolError::Corrupt(sp.clone(), e.to_string()))?;
    write_atomic(&sp, &data).map_err(io(&sp))?;
    let spool = dir.join("spool.jsonl");
    std::fs::rename(&new, &spool).map_err(io(&spool))?;
    sync_dir(dir);
    Ok(())
}

/// Completes or undoes a roll that a crash interrupted (see [`install`]).
pub(super) fn finish_interrupted(dir: &Path, state_epoch: Option<&str>) -> Result<(), SpoolError> {
    let new = dir.join("spool.jsonl.new");
    let Ok(body) = std::fs::read(&new) else {
        return Ok(());
    };
    let first_epoch = body
        .split(|b| *b == b'\n')
        .next()
        .and_then(|l| serde_json::from_slice::<Record>(l).ok())
        .map(|r| r.epoch);
    let spool = dir.join("spool.jsonl");
    if first_epoch.is_some() && first_epoch.as_deref() == state_epoch {
        warn!(path = %dir.display(), "completing an audit spool roll interrupted by a crash");
        std::fs::rename(&new, &spool).map_err(io(&spool))?;
        sync_dir(dir);
    } else {
        std::fs::remove_file(&new).map_err(io(&new))?;
    }
    Ok(())
}

/// The closed epochs of a spool directory, oldest first.
pub(super) fn backlog_dirs(dir: &Path) -> Vec<(i64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir.join(EPOCHS_DIR)) else {
        return Vec::new();
    };
    let mut v: Vec<(i64, PathBuf)> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .map(|p| {
            let at = std::fs::read(p.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<State>(&b).ok())
                .map_or(i64::MAX, |s| s.rolled_at_ms);
            (at, p)
        })
        .collect();
    v.sort();
    v
}
