//! Helpers for tests that run the real `mayfly-ca` binary.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mayfly-ca");

/// Runs `mayfly-ca ARGS` to completion; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run mayfly-ca");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A data directory initialised with `mayfly-ca init`.
pub fn init_dir(td: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (ok, _, err) = cli(&[
        "init",
        "--data-dir",
        dir.to_str().unwrap(),
        "--trust-domain",
        td,
    ]);
    assert!(ok, "init failed: {err}");
    (tmp, dir)
}

/// A running `mayfly-ca run`, killed on drop.
pub struct CaProc {
    pub child: Child,
    pub addr: String,
    pub metrics: String,
    pub dir: PathBuf,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl CaProc {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        Self::try_start(dir, extra).unwrap_or_else(|e| panic!("mayfly-ca run did not start: {e}"))
    }

    pub fn try_start(dir: &Path, extra: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mayfly-ca");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut addr = None;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(a) = line.strip_prefix("mayfly-ca listening on ") {
                    addr = Some(a.to_owned());
                }
                if let Some(m) = line.strip_prefix("mayfly-ca metrics on http://")
                    && let (Some(tx), Some(a)) = (tx.take(), addr.take())
                {
                    let _ = tx.send((a, m.trim_end_matches("/metrics").to_owned()));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((addr, metrics)) = rx.recv_timeout(Duration::from_millis(50)) {
                return Ok(Self {
                    child,
                    addr,
                    metrics,
                    dir: dir.to_path_buf(),
                    stderr: log,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("exited with {status}: {}", log.lock().unwrap()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("no listening line in 20s: {}", log.lock().unwrap()));
            }
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGTERM and wait.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn token(&self, id: &str, ttl: &str) -> String {
        let (ok, out, err) = cli(&[
            "token",
            "create",
            "--data-dir",
            self.dir.to_str().unwrap(),
            "--spiffe-id",
            id,
            "--ttl",
            ttl,
        ]);
        assert!(ok, "token create failed: {err}");
        out.trim().to_owned()
    }
}

impl Drop for CaProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
