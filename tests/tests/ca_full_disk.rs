//! The control plane on a real full file system (a small tmpfs this test mounts): restarted on
//! a full disk it says so (`/healthz` 503 with the reason, `mayfly_ca_store_writable 0`, one
//! log line), refuses what it cannot record, and recovers by itself once space returns; the
//! events it could not store become a `gap` record on its own chain.
//!
//! Needs to mount a tmpfs (root in CI); skipped with a message where mounting is not permitted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mayfly_tests::people::ca_cli;
use mayfly_tests::{bin, eventually, http_get, renew_web};

/// A tmpfs mounted for the test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(at).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(Self(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&o.stderr).trim().to_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `mayfly-ca run` with its API and metrics addresses and its log; killed on drop.
struct ControlPlane {
    child: Child,
    log: Arc<Mutex<String>>,
    api: String,
    metrics: String,
}

impl ControlPlane {
    fn run(dir: &Path) -> Self {
        let mut child = Command::new(bin("mayfly-ca"))
            .args(["run", "--data-dir"])
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let l2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = l2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let find = |prefix: &str| {
            for _ in 0..600 {
                let l = log.lock().unwrap().clone();
                if let Some(rest) = l.lines().find_map(|x| x.strip_prefix(prefix)) {
                    return rest.trim_end_matches("/metrics").to_owned();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("no {prefix:?} line:\n{}", log.lock().unwrap());
        };
        let api = find("mayfly-ca listening on ");
        let metrics = find("mayfly-ca metrics on http://");
        Self {
            child,
            log,
            api,
            metrics,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes zeros to `path` until the file system is full (at most `max` MiB).
fn fill(path: &Path, max: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..max * 16 {
        if f.write_all(&chunk).and_then(|()| f.sync_all()).is_err() {
            return;
        }
    }
    panic!("the file system did not fill up within {max} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restarted_on_a_full_disk_says_so_and_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let _mount = match Mount::tmpfs(&tmp.path().join("disk"), "16m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a tmpfs for the full-disk test ({e}); run as root");
            return;
        }
    };
    let dir = tmp.path().join("disk/ca");
    let (ok, out) = ca_cli(&dir, &["init", "--trust-domain", "mayfly.local"]);
    assert!(ok, "{out}");
    let web = tmp.path().join("web");
    let (ok, out) = ca_cli(
        &dir,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://mayfly.local/web",
            "--out",
            web.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");

    // Running, then killed (its write-ahead log stays), then the disk fills up.
    let mut cp = ControlPlane::run(&dir);
    assert_eq!(renew_web(&cp.api, &web).0, "200");
    cp.kill();
    let filler = tmp.path().join("disk/filler");
    fill(&filler, 64);

    // Restarted on the full disk: it listens, and says it cannot write.
    let cp = ControlPlane::run(&dir);
    let metrics = cp.metrics.clone();
    let said = eventually(Duration::from_secs(10), async || {
        let (status, body) = http_get(&metrics, "/healthz").await;
        status == 503 && body.contains("store cannot write")
    })
    .await;
    assert!(
        said,
        "{:?}\n{}",
        http_get(&metrics, "/healthz").await,
        cp.log()
    );
    let (_, m) = http_get(&metrics, "/metrics").await;
    assert!(m.contains("mayfly_ca_store_writable 0"), "{m}");
    // What cannot be recorded is refused (an SVID is never handed out unlogged).
    for _ in 0..3 {
        assert_eq!(renew_web(&cp.api, &web).0, "503");
    }

    // Space returns: it recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let api = cp.api.clone();
    let web2 = web.clone();
    let back = eventually(Duration::from_secs(20), async || {
        let (status, _) = http_get(&metrics, "/healthz").await;
        let api = api.clone();
        let web = web2.clone();
        status == 200
            && tokio::task::spawn_blocking(move || renew_web(&api, &web).0)
                .await
                .unwrap()
                == "200"
    })
    .await;
    assert!(
        back,
        "{:?}\n{}",
        http_get(&metrics, "/healthz").await,
        cp.log()
    );
    let (_, m) = http_get(&metrics, "/metrics").await;
    assert!(m.contains("mayfly_ca_store_writable 1"), "{m}");

    // The refusals it could not store are a gap on its own chain, with their count and kinds.
    let gap = eventually(Duration::from_secs(10), async || {
        let (ok, out) = ca_cli(&dir, &["audit", "query", "--json", "--kind", "gap"]);
        ok && out.lines().any(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            r["source"] == "spiffe://mayfly.local/mayfly/ca"
                && r["lost_kinds"]["svid.refused"].as_u64() >= Some(3)
                && r["lost_events"].as_u64() >= Some(3)
        })
    })
    .await;
    assert!(
        gap,
        "{}\n{}",
        ca_cli(&dir, &["audit", "query", "--json", "--kind", "gap"]).1,
        cp.log()
    );
    // One log line per transition, not one per request.
    let log = cp.log();
    assert_eq!(log.matches("the store cannot write").count(), 1, "{log}");
    assert_eq!(log.matches("the store can write again").count(), 1, "{log}");
    let mut cp = cp;
    cp.stop();
    let (ok, out) = ca_cli(&dir, &["audit", "verify"]);
    assert!(ok, "{out}");
}
