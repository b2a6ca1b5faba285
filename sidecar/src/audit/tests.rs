//! The spool on its own: reopening, trimming, hole punching, torn and damaged lines, rolls.

use std::io::Write;
use std::path::Path;

use mayfly_ca::audit::{GENESIS, Record, VERSION};
use serde_json::Map;

use super::spool::Spool;

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
    let chain =
        mayfly_ca::audit::verify_lines("c", lines.iter().map(|l| l.1.as_slice()), None).unwrap();
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
    let chain = mayfly_ca::audit::verify_lines("c", old.iter().map(Vec::as_slice), None).unwrap();
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
    let chain = mayfly_ca::audit::verify_lines("c", old.iter().map(Vec::as_slice), None).unwrap();
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
    let chain = mayfly_ca::audit::verify_lines("c", live.iter().map(Vec::as_slice), None).unwrap();
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
