//! A second admin approves a grant without entering the control plane's data directory: the
//! admin socket bound elsewhere (`--admin-socket`) and opened to a group (`--admin-group`),
//! while what each caller may do is still decided by its OS user (SO_PEERCRED, `--admin`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::sync::Arc;

use mayfly_tests::{Ca, bin};

const POLICY: &str = r#"version = 1
[grants]
max_ttl = "30m"
approvals = 1

[[rule]]
name = "web-uses-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
"#;

/// `mayfly-ca ARGS` as root (`None`) or as `nobody:nogroup`.
fn ca_as(nobody: bool, args: &[&str]) -> (bool, String) {
    let mut cmd = if nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin("mayfly-ca"));
        c
    } else {
        Command::new(bin("mayfly-ca"))
    };
    let o = cmd.args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn a_second_admin_approves_through_a_group_socket_outside_the_data_directory() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("skipping: needs root to act as a second admin (setpriv)");
        return;
    }
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    // Others may pass through the temporary directory, not list it; the data directory stays
    // 0700 (the control plane refuses anything looser).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::os::unix::fs::chown(&run, None, Some(65534)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o750)).unwrap();
    let socket = run.join("admin.sock");
    let pol = tmp.path().join("policy.toml");
    std::fs::write(&pol, POLICY).unwrap();
    let ca = Ca::start_with(
        &tmp,
        &[
            "--policy",
            pol.to_str().unwrap(),
            "--admin",
            "root",
            "--admin",
            "nobody",
            "--admin-socket",
            socket.to_str().unwrap(),
            "--admin-group",
            "nogroup",
        ],
    );
    let dir = ca.dir.to_str().unwrap().to_owned();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    assert_eq!(
        std::fs::metadata(&ca.dir).unwrap().mode() & 0o777,
        0o700,
        "the data directory stays closed"
    );
    assert!(
        !ca.dir.join("admin.sock").exists(),
        "no second socket in the data directory"
    );

    let sock = socket.to_str().unwrap();
    let (ok, out) = ca_as(
        false,
        &[
            "grant",
            "request",
            "--admin-socket",
            sock,
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/orders",
            "--ttl",
            "10m",
            "--reason",
            "INC-7",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = g["id"].as_str().unwrap().to_owned();
    assert_eq!(g["state"], "pending");

    // Through the data directory the second admin cannot even reach the socket.
    let (ok, out) = ca_as(true, &["grant", "approve", "--data-dir", &dir, &id]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot reach the control plane's admin socket"),
        "{out}"
    );
    // Through the group socket it can, and approves what root asked for.
    let (ok, out) = ca_as(true, &["grant", "approve", "--admin-socket", sock, &id]);
    assert!(ok, "{out}");
    assert!(out.contains("active"), "{out}");
    // The requester still cannot approve its own grant: reaching the socket is not authority.
    let (ok, out) = ca_as(
        false,
        &[
            "grant",
            "request",
            "--admin-socket",
            sock,
            "--from",
            "spiffe://mayfly.local/web",
            "--to",
            "spiffe://mayfly.local/orders",
            "--ttl",
            "5m",
            "--reason",
            "INC-8",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = g["id"].as_str().unwrap();
    let (ok, out) = ca_as(false, &["grant", "approve", "--admin-socket", sock, id]);
    assert!(!ok, "{out}");
}

#[test]
fn the_admin_socket_defaults_to_the_data_directory_and_only_its_owner() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let ca = Ca::start(&tmp);
    let socket = ca.dir.join("admin.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o777, 0o600);
    let (ok, out) = ca_as(
        false,
        &["token", "list", "--admin-socket", socket.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    let (ok, out) = ca_as(false, &["token", "list"]);
    assert!(!ok);
    assert!(
        out.contains("--data-dir") || out.contains("--admin-socket"),
        "{out}"
    );
}
