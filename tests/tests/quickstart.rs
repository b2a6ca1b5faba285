//! End-to-end: the README's first command. The `quickstart` binary runs its whole tour against
//! the real `mayfly-ca` and `mayfly-sidecar` binaries; the test checks the outcomes it reports
//! in `--json-summary` (never its wording), and that it leaves no process and no file behind,
//! also when interrupted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mayfly_tests::bin;
use serde_json::Value;

/// Starts the quickstart with its output in files under `dir`.
fn start(dir: &Path, extra: &[&str]) -> Child {
    start_with(dir, extra, Command::new(bin("quickstart")))
}

/// ... with `cmd` (for a PATH without Node.js).
fn start_with(dir: &Path, extra: &[&str], mut cmd: Command) -> Child {
    let summary = dir.join("summary.json");
    cmd.args(["--ci", "--no-build", "--json-summary"])
        .arg(&summary)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .expect("start the quickstart")
}

/// Waits for the exit within `timeout` (kills and fails after it).
fn wait(child: &mut Child, dir: &Path, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the quickstart ran over {timeout:?}:\n{}", output(dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn output(dir: &Path) -> String {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    format!(
        "--- stdout\n{}\n--- stderr\n{}",
        read("stdout"),
        read("stderr")
    )
}

fn summary(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("summary.json"))
        .unwrap_or_else(|e| panic!("no JSON summary ({e}):\n{}", output(dir)));
    serde_json::from_str(&text).unwrap()
}

fn step<'a>(s: &'a Value, id: &str) -> &'a Value {
    s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id)
        .unwrap_or_else(|| panic!("no step {id:?} in {s:#}"))
}

fn outcome<'a>(s: &'a Value, id: &str) -> &'a str {
    step(s, id)["outcome"].as_str().unwrap()
}

/// Every process the quickstart started is gone, and so is its temporary directory.
fn assert_nothing_left(s: &Value) {
    let pids: Vec<i32> = s["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_i64().unwrap() as i32)
        .collect();
    assert!(
        pids.len() >= 4,
        "the control plane and three sidecars: {pids:?}"
    );
    for pid in pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} is still running");
    }
    let data_dir = PathBuf::from(s["data_dir"].as_str().unwrap());
    let tmp = data_dir.parent().unwrap();
    assert!(!tmp.exists(), "{} was left behind", tmp.display());
}

/// Whether this build's `mayfly-sidecar check` accepts `protocol = "http"`.
fn sidecar_accepts_http(dir: &Path) -> bool {
    let cfg = dir.join("probe.toml");
    std::fs::write(
        &cfg,
        "spiffe_id = \"spiffe://mayfly.local/orders\"\n\
         [control_plane]\naddress = \"127.0.0.1:9\"\ntoken_file = \"t\"\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:9\"\nprotocol = \"http\"\n",
    )
    .unwrap();
    Command::new(bin("mayfly-sidecar"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap()
        .status
        .success()
}

/// Whether `mayfly-ca <cmd> --help` succeeds.
fn ca_has(cmd: &str) -> bool {
    Command::new(bin("mayfly-ca"))
        .args([cmd, "--help"])
        .output()
        .unwrap()
        .status
        .success()
}

/// The grant step's outcome and the facts behind it (never its wording).
fn assert_grant_shown(g: &Value) {
    assert_eq!(g["outcome"], "ok", "{g:#}");
    let d = &g["detail"];
    assert!(
        d["grant_id"].as_str().is_some_and(|x| x.starts_with("g-")),
        "{d:#}"
    );
    assert_eq!(d["state"], "active", "{d:#}");
    assert!(d["propagation_secs"].as_f64().unwrap() <= 3.0, "{d:#}");
    assert!(d["replies"].as_u64().unwrap() >= 1, "{d:#}");
    let cut = d["cut_after_expiry_secs"].as_f64().unwrap();
    assert!((-0.5..=2.0).contains(&cut), "cut {cut}s from expiry: {d:#}");
    assert_eq!(d["denied_after"], true, "{d:#}");
    assert_eq!(d["listed_expired"], true, "{d:#}");
    assert!(d["audit_opened"].as_u64().unwrap() >= 1, "{d:#}");
    assert!(
        d["audit_ends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "policy_revoked"),
        "{d:#}"
    );
    assert_eq!(d["grant_requested"], true, "{d:#}");
    assert_eq!(d["grant_expired"], true, "{d:#}");
}

#[test]
fn the_quickstart_shows_allowed_and_denied_calls_rotation_and_a_grant_then_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut child = start(dir, &[]);
    let status = wait(&mut child, dir, Duration::from_secs(240));
    assert!(status.success(), "exit {status}:\n{}", output(dir));
    let s = summary(dir);
    assert_eq!(s["ok"], true, "{s:#}");
    assert_eq!(s["aborted"], Value::Null);

    for id in [
        "control_plane",
        "services",
        "web_to_orders_get",
        "orders_replicas",
        "orders_to_db",
        "web_to_db",
        "svid_rotation",
    ] {
        assert_eq!(outcome(&s, id), "ok", "{id}: {:#}", step(&s, id));
    }
    // web -> db is refused by web's sidecar, with a decision ID.
    let d = &step(&s, "web_to_db")["detail"];
    assert!(
        d["decision_id"]
            .as_str()
            .is_some_and(|x| x.starts_with("d-")),
        "{d:#}"
    );
    assert!(d["web_outbound_denied_connections"].as_f64().unwrap() >= 1.0);
    // Two replicas of orders behind one SPIFFE ID: both served, and kill -9 of one under
    // traffic failed no request.
    let r = &step(&s, "orders_replicas")["detail"];
    let spread = r["spread"].as_object().unwrap();
    assert_eq!(spread.len(), 2, "{r:#}");
    assert!(spread.values().all(|n| n.as_u64().unwrap() >= 1), "{r:#}");
    assert!(r["under_kill_requests"].as_u64().unwrap() >= 40, "{r:#}");
    assert_eq!(r["under_kill_failed"], 0, "{r:#}");
    assert_eq!(
        r["after_kill_served_by"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["orders-1"],
        "{r:#}"
    );
    // Rotation: a new serial, and traffic after it.
    let r = &step(&s, "svid_rotation")["detail"];
    assert_ne!(r["serial_before"], r["serial_after"]);
    assert_eq!(r["traffic_after"], true);

    // The orders hop runs in HTTP mode whenever this build's sidecar accepts it: no silent
    // fallback to TCP in a build that claims HTTP.
    let http = sidecar_accepts_http(dir);
    let get = &step(&s, "web_to_orders_get")["detail"];
    let post = step(&s, "web_to_orders_post");
    if http {
        assert_eq!(s["orders_mode"], "http", "{s:#}");
        assert_eq!(get["xfcc_uri"], "spiffe://mayfly.local/web");
        assert_eq!(get["xfcc_by"], "spiffe://mayfly.local/orders");
        assert_eq!(get["xfcc_hash_matches_web_cert"], true);
        assert_eq!(
            get["xfcc"].as_array().unwrap().len(),
            1,
            "forged header removed"
        );
        assert_eq!(post["outcome"], "ok", "{post:#}");
        assert_eq!(post["detail"]["status"], 403);
        assert!(
            post["detail"]["decision_id"]
                .as_str()
                .is_some_and(|x| x.starts_with("d-")),
            "{post:#}"
        );
    } else {
        assert_eq!(s["orders_mode"], "tcp", "{s:#}");
        assert!(s["tcp_reason"].is_string());
        assert_eq!(post["outcome"], "unavailable", "{post:#}");
        assert_eq!(get["xfcc"].as_array().unwrap().len(), 0);
    }

    // The JIT grant, for real: web -> db opens within a second or so, the long-lived
    // connection is cut when the grant expires, a new one is denied, and the audit trail has
    // the grant's records and events. A build without `mayfly-ca grant` says so.
    let g = step(&s, "jit_grant");
    if ca_has("grant") {
        assert_grant_shown(g);
    } else {
        assert_eq!(g["outcome"], "unavailable", "{g:#}");
    }
    // Features not built are reported as such, never as done. Where the audit trail exists,
    // the denials above are in it, and every chain verifies.
    let a = step(&s, "audit_verify");
    if ca_has("audit") {
        assert_eq!(a["outcome"], "ok", "{a:#}");
        let ids = a["detail"]["decision_ids"].as_array().unwrap();
        assert!(ids.len() >= if http { 2 } else { 1 }, "{a:#}");
        assert_eq!(a["detail"]["missing"].as_array().unwrap().len(), 0);
    } else {
        assert_eq!(a["outcome"], "unavailable");
    }

    // A person signs in by the device flow (the local identity provider, on Node.js as the
    // sign-in tests need) and reaches db through another person's approval: alice's query
    // reached db, and the audit record of db's sidecar names her.
    let p = step(&s, "person_reaches_db");
    assert_eq!(p["outcome"], "ok", "{p:#}");
    assert_eq!(p["detail"]["bytes_reached_db"], true, "{p:#}");
    assert_eq!(p["detail"]["audit_names_alice"], true, "{p:#}");

    assert_nothing_left(&s);
}

#[test]
fn the_quickstart_forced_to_tcp_and_without_node_says_what_it_cannot_show() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // No Node.js on this PATH (nor anything else): only the sign-in step is skipped.
    let mut cmd = Command::new(bin("quickstart"));
    cmd.env("PATH", dir.join("empty-path"));
    let mut child = start_with(dir, &["--orders-protocol", "tcp", "--svid-ttl", "6"], cmd);
    let status = wait(&mut child, dir, Duration::from_secs(240));
    assert!(status.success(), "exit {status}:\n{}", output(dir));
    let s = summary(dir);
    assert_eq!(s["ok"], true, "{s:#}");
    assert_eq!(s["orders_mode"], "tcp");
    assert_eq!(outcome(&s, "web_to_orders_get"), "ok");
    assert_eq!(outcome(&s, "web_to_db"), "ok");
    // Short-lived SVIDs: a shorter grant, still shown end to end.
    if ca_has("grant") {
        assert_grant_shown(step(&s, "jit_grant"));
    }
    // Not enforced at the connection level, and not claimed.
    assert_ne!(outcome(&s, "web_to_orders_post"), "ok");
    // Without Node.js: one line says what the sign-in step needs; that step alone is skipped.
    assert_eq!(outcome(&s, "person_reaches_db"), "skipped");
    assert!(output(dir).contains("Node.js 20"), "{}", output(dir));
    assert_nothing_left(&s);
}

#[test]
fn an_interrupted_quickstart_stops_everything_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut child = start(dir, &[]);
    // Interrupt it while it waits for a rotation: every process is up then.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(dir.join("stdout"))
        .unwrap_or_default()
        .contains("[7/")
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited early:\n{}",
            output(dir)
        );
        assert!(Instant::now() < deadline, "no step 7:\n{}", output(dir));
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait(&mut child, dir, Duration::from_secs(30));
    assert_eq!(status.code(), Some(130), "{}", output(dir));
    let s = summary(dir);
    assert_eq!(s["ok"], false);
    assert!(s["aborted"].as_str().unwrap().contains("SIGTERM"), "{s:#}");
    assert_nothing_left(&s);
}
