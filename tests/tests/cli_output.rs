//! What the CLI prints at the edges: output cut short by the reader (`| head`) ends the
//! command quietly, and a query that matches nothing says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use mayfly_tests::bin;

fn init(dir: &Path) {
    let out = Command::new(bin("mayfly-ca"))
        .args(["init", "--data-dir", dir.to_str().unwrap()])
        .args(["--trust-domain", "mayfly.local"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn output_closed_by_its_reader_ends_the_command_quietly_with_the_sigpipe_status() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    // The reader is gone before the command writes anything: every write fails with EPIPE.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin("mayfly-ca"))
        .args(["bundle", "show", "--data-dir", dir.to_str().unwrap()])
        .args(["--format", "jwks"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
}

#[test]
fn an_audit_query_that_matches_nothing_says_so_on_standard_error_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init(&dir);
    let query = |extra: &[&str]| {
        Command::new(bin("mayfly-ca"))
            .args(["audit", "query", "--data-dir", dir.to_str().unwrap()])
            .args(["--source", "spiffe://mayfly.local/nobody"])
            .args(extra)
            .output()
            .unwrap()
    };
    let text = query(&[]);
    assert!(text.status.success());
    assert!(
        text.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&text.stderr), "no records match\n");
    let json = query(&["--json"]);
    assert!(json.status.success());
    assert!(json.stdout.is_empty() && json.stderr.is_empty());
}
