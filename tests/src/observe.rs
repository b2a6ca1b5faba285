//! What tests read off a running mesh: `promtool`'s verdict on metrics and rules, and the
//! moment a sidecar's audit spool has been delivered to the control plane.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Sidecar, eventually};

/// Runs `promtool ARGS` with `input` on stdin: (exit status, stdout + stderr), or `None` when
/// promtool is not installed (allowed outside CI only: `.ci/run` installs Debian `prometheus`).
pub fn promtool(args: &[&str], input: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is required in CI (Debian package prometheus): {e}"
            );
            eprintln!("SKIPPED: promtool is not installed (apt-get install prometheus)");
            return None;
        }
    };
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

impl Sidecar {
    /// Waits (at most 30 s) until the audit spool is empty twice in a row, 300 ms apart (records
    /// still on their way into the spool would show up in between): every record so far is
    /// with the control plane.
    pub async fn wait_audit_delivered(&self) {
        let mut clean = 0;
        let ok = eventually(Duration::from_secs(30), async || {
            let (_, m) = self.admin_get("/metrics").await;
            if m.lines().any(|l| l == "mayfly_sidecar_audit_spool_bytes 0") {
                clean += 1;
                tokio::time::sleep(Duration::from_millis(300)).await;
            } else {
                clean = 0;
            }
            clean >= 2
        })
        .await;
        assert!(
            ok,
            "audit spool not delivered:\n{}",
            self.admin_get("/metrics").await.1
        );
    }
}
