//! Where the audit spool lives when nobody says: under systemd's `$STATE_DIRECTORY` (the unit's
//! `StateDirectory=`), not beside a configuration in a read-only `/etc`; and `check` refuses a
//! spool directory that cannot be created or written (exit 64), before `run` would fail on it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mayfly_tests::{Sidecar, bin, policy};
use serde_json::Value;

/// The sidecar of `deploy/systemd`: no `[audit]` section, its config and policy side by side.
fn config(dir: &Path, extra: &str) -> String {
    std::fs::write(dir.join("policy.toml"), policy(&[("web", "orders")])).unwrap();
    format!(
        "spiffe_id = \"spiffe://mayfly.local/orders\"\n\
         [control_plane]\naddress = \"127.0.0.1:1\"\ntoken_file = \"orders.token\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [policy]\nfile = \"policy.toml\"\n{extra}"
    )
}

fn check(cfg: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(bin("mayfly-sidecar"))
        .args(["check", "--json", "--config", cfg.to_str().unwrap()])
        .env_remove("STATE_DIRECTORY")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `install` lines of the host walk-through's step 3 (deploy/README.md) that put files
/// under `/etc/mayfly`, moved under `etc` and without the `mayfly` group (no such user here).
fn documented_host_install(etc: &Path) -> String {
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let step = readme
        .split_once("3. One sidecar per service")
        .expect("deploy/README.md has the sidecar step")
        .1;
    let block = step.split("```").nth(1).unwrap();
    let mut script = String::from("set -e\n");
    for line in block.lines().map(str::trim) {
        let line = line.split(" #").next().unwrap();
        if line.starts_with("install ") && line.contains("/etc/mayfly") {
            let line = line
                .replace(" -g mayfly", "")
                .replace("/etc/mayfly", etc.to_str().unwrap());
            script.push_str(&line);
            script.push('\n');
        }
    }
    assert!(script.contains("examples/configs/orders.toml"), "{script}");
    script
}

#[test]
fn the_host_install_steps_give_the_example_config_its_policy_and_a_spool_that_check_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc/mayfly");
    let state = tmp.path().join("var/lib/mayfly-sidecar/orders");
    std::fs::create_dir_all(&state).unwrap();
    let script = documented_host_install(&etc);
    let o = Command::new("sh")
        .args(["-c", &script])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cfg = etc.join("sidecar/orders.toml");
    let o = check(&cfg, &[("STATE_DIRECTORY", state.to_str().unwrap())]);
    assert!(
        o.status.success(),
        "{script}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(state.join("mayfly-audit/orders").is_dir());
    assert!(!etc.join("sidecar/mayfly-audit").exists());
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

#[tokio::test]
async fn a_sidecar_with_a_state_directory_spools_there_and_not_beside_a_read_only_config() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    let state = tmp.path().join("state/orders");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let text = config(&etc, "");
    std::fs::write(etc.join("orders.toml"), &text).unwrap();
    // Read-only, as /etc is under ProtectSystem=strict (root writes anyway: the assertion on
    // where the spool is made holds for both).
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o555)).unwrap();
    let state_env = state.to_str().unwrap();

    let o = check(&etc.join("orders.toml"), &[("STATE_DIRECTORY", state_env)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut s = Sidecar::start_env(&etc, "orders", &text, &[("STATE_DIRECTORY", state_env)]);
    let spool = state.join("mayfly-audit/orders");
    assert!(
        spool.join("spool.jsonl").is_file(),
        "no spool in {}:\n{}",
        spool.display(),
        s.proc.log()
    );
    let mode = std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(!etc.join("mayfly-audit").exists(), "{}", s.proc.log());
    s.proc.stop();
    std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();

    // An explicit spool_dir still wins over the state directory.
    let dir = tmp.path().join("explicit");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("orders.toml");
    std::fs::write(&cfg, config(&dir, "[audit]\nspool_dir = \"mine\"\n")).unwrap();
    let o = check(&cfg, &[("STATE_DIRECTORY", state_env)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("mine").is_dir());
}

#[test]
fn check_refuses_a_spool_directory_that_cannot_be_created_with_status_64() {
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a directory must be: no user, root included, can create under it.
    let blocked = tmp.path().join("blocked");
    std::fs::write(&blocked, "not a directory").unwrap();
    let cfg = tmp.path().join("orders.toml");
    std::fs::write(
        &cfg,
        config(tmp.path(), "[audit]\nspool_dir = \"blocked/spool\"\n"),
    )
    .unwrap();
    let o = check(&cfg, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    let v = json(&o);
    assert_eq!(v["ok"], false, "{v:#}");
    let e = v["error"].as_str().unwrap();
    assert!(
        e.contains("`audit.spool_dir`") && e.contains("blocked/spool"),
        "{e}"
    );
    assert!(err.contains("`audit.spool_dir`"), "{err}");
    // `run` refuses it the same way, before binding anything (no restart loop under systemd).
    let o = Command::new(bin("mayfly-sidecar"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(err.contains("`audit.spool_dir`"), "{err}");

    // The default spool under a state directory that is no directory: refused too.
    std::fs::write(&cfg, config(tmp.path(), "")).unwrap();
    let o = check(&cfg, &[("STATE_DIRECTORY", blocked.to_str().unwrap())]);
    assert_eq!(o.status.code(), Some(64));
    let e = json(&o)["error"].as_str().unwrap().to_owned();
    assert!(
        e.contains("`audit.spool_dir`") && e.contains("blocked"),
        "{e}"
    );
    // A relative state directory is not one systemd sets: said so.
    let o = check(&cfg, &[("STATE_DIRECTORY", "relative/orders")]);
    assert_eq!(o.status.code(), Some(64));
    let e = json(&o)["error"].as_str().unwrap().to_owned();
    assert!(
        e.contains("STATE_DIRECTORY") && e.contains("absolute"),
        "{e}"
    );
}
