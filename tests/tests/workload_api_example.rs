//! `examples/workload-api/call_with_own_svid.py`, run as written (python3 with py-spiffe, as
//! `.ci/run` installs it) against real binaries: a control plane; web's sidecar serving the
//! Workload API; orders' sidecar in HTTP mode in front of an HTTP app. The example fetches web's
//! app SVID and calls orders' sidecar directly with it: orders' sidecar verifies the app's own
//! certificate and applies its policy to it, allowing or refusing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use mayfly_tests::{Ca, Sidecar, Spec, http_app, policy};

const ORDERS: &str = "spiffe://mayfly.local/orders";

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/workload-api/call_with_own_svid.py")
}

/// Orders' sidecar, in its own directory, in HTTP mode in front of `app`, with a policy that
/// lets `callers` in.
async fn orders(tmp: &Path, ca: &Ca, name: &str, callers: &[&str], app: &str) -> Sidecar {
    let dir = tmp.join(name);
    std::fs::create_dir(&dir).unwrap();
    let pol = dir.join("policy.toml");
    let pairs: Vec<(&str, &str)> = callers.iter().map(|c| (*c, "orders")).collect();
    std::fs::write(&pol, policy(&pairs)).unwrap();
    let tok = ca.token_file(ORDERS, &dir.join("orders.token"));
    let toml = Spec {
        me: "orders",
        ca: &ca.addr,
        token: &tok,
        policy: &pol,
        inbound_app: None,
        outbound: &[],
        svid_ttl: None,
        extra: &format!(
            "[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"http\"\n"
        ),
    }
    .toml();
    let sidecar = Sidecar::start(&dir, "orders", &toml);
    sidecar.wait_ready().await;
    sidecar
}

/// Runs the example against `https://ADDR/whoami`, expecting `server_id` there: (exit code,
/// stdout, stderr).
async fn run_example(socket: &Path, addr: &str, server_id: &str) -> (Option<i32>, String, String) {
    let socket = format!("unix://{}", socket.display());
    let args = [format!("https://{addr}/whoami"), server_id.to_owned()];
    tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .arg(example())
            .args(&args)
            .env("SPIFFE_ENDPOINT_SOCKET", socket)
            .output()
            .expect("python3 is required for these tests");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_calls_with_the_apps_own_certificate_and_the_callees_policy_decides() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca = Ca::start(&tmp);
    let app = http_app("orders-app").await;
    let mut open = orders(dir, &ca, "open", &["web"], &app).await;
    let mut closed = orders(dir, &ca, "closed", &["db"], &app).await;
    let open_addr = open.inbound();

    let web_dir = dir.join("web");
    std::fs::create_dir(&web_dir).unwrap();
    let pol = web_dir.join("policy.toml");
    std::fs::write(&pol, policy(&[])).unwrap();
    let tok = ca.token_file("spiffe://mayfly.local/web", &web_dir.join("web.token"));
    let socket = web_dir.join("wl.sock");
    let web = Sidecar::start(
        &web_dir,
        "web",
        &Spec {
            me: "web",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: None,
            // Web's own traffic would go through its sidecar; the example's does not.
            outbound: &[("orders", &open_addr, "orders")],
            svid_ttl: None,
            extra: &format!(
                "[workload_api]\nsocket = \"{}\"\nallowed_uids = [{}]\n",
                socket.display(),
                nix::unistd::getuid()
            ),
        }
        .toml(),
    );
    web.wait_ready().await;

    // Allowed: the app's own certificate reaches the app behind orders' sidecar.
    let (code, stdout, stderr) = run_example(&socket, &open_addr, ORDERS).await;
    assert_eq!(
        code,
        Some(0),
        "{stdout}{stderr}\n{}\n{}",
        web.proc.log(),
        open.proc.log()
    );
    assert!(
        stdout.contains("my SPIFFE ID: spiffe://mayfly.local/web\n"),
        "{stdout}"
    );
    assert!(stdout.contains("status: 200\n"), "{stdout}");
    let hash = stdout
        .lines()
        .find_map(|l| l.strip_prefix("my certificate SHA-256: "))
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let xfcc = body["xfcc"][0].as_str().unwrap();
    assert!(
        xfcc.contains(&format!("Hash={hash}")) && xfcc.contains("URI=spiffe://mayfly.local/web"),
        "orders' sidecar saw the app's own certificate: {xfcc} (the app's is {hash})"
    );
    // Not the certificate of web's sidecar: the app holds its own.
    let (_, svid) = web.admin_get("/svid").await;
    let sidecar_leaf = pem_leaf_sha256(&svid);
    assert_ne!(sidecar_leaf, hash);

    // Refused: orders' policy there does not let web in, and orders' sidecar says so.
    let (code, stdout, stderr) = run_example(&socket, &closed.inbound(), ORDERS).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("status: 403\n"), "{stdout}");
    assert!(stdout.contains("decision: "), "{stdout}");
    assert!(
        !stdout.contains("orders-app"),
        "the app was not reached: {stdout}"
    );
    assert!(
        closed
            .metric("mayfly_sidecar_requests_total{direction=\"inbound\",decision=\"deny\"}")
            .await
            >= 1.0
    );

    // A server that is not the SPIFFE ID asked for is not called at all.
    let (code, _, stderr) = run_example(&socket, &open_addr, "spiffe://mayfly.local/db").await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("not spiffe://mayfly.local/db"), "{stderr}");
}

/// SHA-256 (lowercase hex) of the leaf in `/svid`'s `chain_pem`, by `openssl x509`.
fn pem_leaf_sha256(svid_json: &str) -> String {
    use std::io::Write;
    let v: serde_json::Value = serde_json::from_str(svid_json).unwrap();
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is required for these tests");
    let pem = v["chain_pem"].as_str().unwrap().as_bytes().to_vec();
    child.stdin.take().unwrap().write_all(&pem).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let (_, fp) = text.trim().split_once('=').unwrap();
    fp.replace(':', "").to_lowercase()
}
