//! Several hosts on one machine: network namespaces joined by veth pairs to a bridge in the
//! root namespace, on a private /24 (`10.231.X.0/24`, `X` drawn at random and not in use), so
//! that replicas of one service each have an address of their own and the same port, as pods
//! do. The root namespace holds `10.231.X.1` on the bridge (the control plane and the calling
//! sidecar live there); namespace `i` holds `10.231.X.(i+2)` and its own `lo`.
//!
//! Creating namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN (CI runs as root). Without them
//! [`Net::new`] panics with a message saying so: a test that needs several hosts fails rather
//! than passing without having run. Everything is removed on drop, also when the test panics:
//! the processes still inside the namespaces are killed, the namespaces deleted (their veth
//! ends go with them) and the bridge deleted.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;

use crate::{Proc, Sidecar, bin};

/// Serialises subnet choice and creation between the tests of one binary.
static CREATING: Mutex<()> = Mutex::new(());
/// Distinguishes the networks of one test process.
static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A bridge and `n` namespaces attached to it; removed on drop.
pub struct Net {
    /// The third octet of `10.231.X.0/24`.
    pub subnet: u8,
    bridge: Option<String>,
    namespaces: Vec<String>,
}

/// Runs `ip ARGS`; panics with its error output if it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 is required): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A subnet octet no interface of this machine uses yet.
fn free_subnet(tag: usize) -> u8 {
    let used = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for attempt in 0..256u64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(u64::from(std::process::id()));
        h.write_usize(tag);
        h.write_u64(attempt);
        let x = (h.finish() % 256) as u8;
        if !used.contains(&format!("10.231.{x}.")) {
            return x;
        }
    }
    panic!("no free subnet under 10.231.0.0/16:\n{used}");
}

impl Net {
    /// Creates the bridge and `n` namespaces (1 to 200), each with `lo` up and its address.
    ///
    /// # Panics
    /// When namespaces cannot be created (no CAP_SYS_ADMIN / CAP_NET_ADMIN): with a message
    /// saying what is needed.
    pub fn new(n: usize) -> Self {
        assert!((1..=200).contains(&n), "1 to 200 namespaces per network");
        let _one = CREATING.lock().unwrap_or_else(|p| p.into_inner());
        let count = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Interface names have at most 15 bytes: a short tag of pid and counter.
        let tag = format!("{:x}x{count}", std::process::id());
        let mut net = Self {
            subnet: free_subnet(count),
            bridge: None,
            namespaces: Vec::new(),
        };
        let first = format!("mayfly-{tag}-0");
        let probe = Command::new("ip")
            .args(["netns", "add", &first])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 is required): {e}"));
        assert!(
            probe.status.success(),
            "this test needs network namespaces and `ip netns add` was refused ({}): run it as \
             root or with CAP_SYS_ADMIN and CAP_NET_ADMIN, as CI does",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        net.namespaces.push(first);
        let bridge = format!("mb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        net.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", net.host()), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..n {
            let ns = format!("mayfly-{tag}-{i}");
            if i > 0 {
                ip(&["netns", "add", &ns]);
                net.namespaces.push(ns.clone());
            }
            let (outer, inner) = (format!("mv{tag}{i}"), format!("mp{tag}{i}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
            ]);
            ip(&["link", "set", &outer, "master", &bridge, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", net.addr(i)),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        net
    }

    /// The root namespace's address on the bridge.
    pub fn host(&self) -> String {
        format!("10.231.{}.1", self.subnet)
    }

    /// Namespace `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.231.{}.{}", self.subnet, i + 2)
    }

    /// Namespace `i`'s name (for `ip netns exec`).
    pub fn name(&self, i: usize) -> &str {
        &self.namespaces[i]
    }

    /// `program` to be run inside namespace `i` (`ip netns exec NAME program`, which execs it:
    /// the child's pid is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name(i)]).arg(program);
        cmd
    }

    /// Like [`Sidecar::start`], inside namespace `i`: writes `config` to `<dir>/<name>.toml`
    /// and starts `mayfly-sidecar run` there. Its admin listener must be on [`Net::addr`] to be
    /// reachable from the test.
    pub fn sidecar(&self, i: usize, dir: &Path, name: &str, config: &str) -> Sidecar {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = self.command(i, bin("mayfly-sidecar"));
        cmd.args(["run", "--config", path.to_str().unwrap()]);
        let mut proc = Proc::spawn(
            cmd,
            &[
                "mayfly-sidecar admin",
                "mayfly-sidecar inbound",
                "mayfly-sidecar outbound ",
            ],
        );
        let admin = proc.addr("mayfly-sidecar admin");
        Sidecar {
            proc,
            admin,
            config: path,
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Whatever the test started in there and did not stop (a panic on the way).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        if let Some(b) = &self.bridge {
            let _ = Command::new("ip").args(["link", "del", b]).output();
        }
    }
}

/// An HTTP/1.1 app listening on `ip:0` that answers every request with `{"name": name}`.
/// Returns its address. (A replica in a namespace reaches it on the root namespace's bridge
/// address, [`Net::host`].)
pub async fn named_app(ip: &str, name: String) -> String {
    let l = TcpListener::bind(format!("{ip}:0")).await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let body = bytes::Bytes::from(serde_json::json!({ "name": name }).to_string());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}
