//! The SPIFFE Workload API beside the sidecar, driven by clients mayfly did not write: the
//! `spiffe` crate's `X509Source` (sees the rotation), py-spiffe's `WorkloadApiClient` (an SVID
//! whose chain `openssl verify` accepts against the fetched bundle; PermissionDenied for a uid
//! and gid not allowed), a process of another OS user (`setpriv` to `nobody`: refused and
//! audited with its uid), a raw tonic client without the security header (InvalidArgument) and
//! one calling before the first SVID (PermissionDenied "no identity issued", at once).
//! JWT-SVIDs: the `spiffe` crate's client and `JwtSource`, and py-spiffe, fetch a token for an
//! audience and validate it through ValidateJWTSVID and against the fetched JWT bundle; a token
//! for another audience is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mayfly_tests::{Ca, Sidecar, Spec, echo_app, eventually, free_port, policy};

const ME: &str = "spiffe://mayfly.local/orders";

struct Setup {
    tmp: Arc<tempfile::TempDir>,
    _ca: Ca,
    sidecar: Sidecar,
    socket: PathBuf,
}

/// A control plane and one sidecar (`orders`) serving the Workload API on `wl.sock`, with
/// `access` (`allowed_uids = [...]` and so on) in its `[workload_api]` section.
async fn setup(svid_ttl: Option<&str>, access: &str) -> Setup {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca = Ca::start(&tmp);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let tok = ca.token_file(ME, &dir.join("orders.token"));
    let app = echo_app("orders-app").await;
    let socket = dir.join("wl.sock");
    let extra = format!(
        "[workload_api]\nsocket = \"{}\"\n{access}\n\n[audit]\nsink = \"file:{}\"\n",
        socket.display(),
        dir.join("audit.jsonl").display()
    );
    let sidecar = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &ca.addr,
            token: &tok,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl,
            extra: &extra,
        }
        .toml(),
    );
    sidecar.wait_ready().await;
    wait_for_app_svid(&sidecar).await;
    Setup {
        tmp,
        _ca: ca,
        sidecar,
        socket,
    }
}

/// Waits until the sidecar serves the app's SVID: until then FetchX509SVID answers
/// PermissionDenied "no identity issued" (which py-spiffe's one-shot fetch does not retry).
async fn wait_for_app_svid(sidecar: &Sidecar) {
    let ok = eventually(Duration::from_secs(30), async || {
        sidecar.proc.log().contains("SVID for the app installed")
    })
    .await;
    assert!(ok, "no SVID for the app in 30 s:\n{}", sidecar.proc.log());
}

fn uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

/// Runs `script` with python3 (py-spiffe installed by `.ci/run`): (success, stdout, stderr).
fn python(script: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is required for these tests");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_x509_source_gets_the_apps_own_svid_and_sees_it_rotate_before_expiry() {
    let s = setup(Some("6s"), &format!("allowed_uids = [{}]", uid())).await;
    let meta = std::fs::symlink_metadata(&s.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "the default mode");

    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix://{}", s.socket.display()))
        .build()
        .await
        .unwrap();
    let first = source.svid().unwrap();
    assert_eq!(first.spiffe_id().to_string(), ME);
    let first_leaf = first.leaf().as_bytes().to_vec();
    let first_expiry = x509_not_after(&first_leaf);
    // The app's key is its own: not the sidecar's.
    let (_, body) = s.sidecar.admin_get("/svid").await;
    let own: serde_json::Value = serde_json::from_str(&body).unwrap();
    let own_key = x509(
        own["chain_pem"].as_str().unwrap().as_bytes(),
        "PEM",
        &["-pubkey"],
    );
    assert_ne!(public_key(&first_leaf), own_key);

    let mut updates = source.updated();
    let rotated = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            updates.changed().await.unwrap();
            let now = source.svid().unwrap();
            if now.leaf().as_bytes() != first_leaf.as_slice() {
                return now;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no rotation pushed in 20 s:\n{}", s.sidecar.proc.log()));
    let seen_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        seen_at < first_expiry,
        "the new SVID arrived before the old one expired ({seen_at} < {first_expiry})"
    );
    assert_eq!(rotated.spiffe_id().to_string(), ME);
    let new_leaf = rotated.leaf().as_bytes();
    assert_ne!(public_key(new_leaf), public_key(&first_leaf), "a new key");
    assert!(
        s.sidecar
            .metric("mayfly_sidecar_workload_api_svids_total{push=\"rotation\"}")
            .await
            >= 1.0
    );
    // SIGTERM with a stream open: the sidecar ends the stream and exits cleanly (`stop` kills
    // it after 20 s, which would not be a success), and removes its socket.
    let mut sidecar = s.sidecar;
    let status = tokio::task::spawn_blocking(move || sidecar.proc.stop())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!s.socket.exists(), "the socket file is removed at exit");
    source.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_an_svid_whose_chain_openssl_verifies_against_the_fetched_bundle() {
    let s = setup(None, &format!("allowed_gids = [{}]", nix::unistd::getgid())).await;
    let out = s.tmp.path().join("py");
    std::fs::create_dir(&out).unwrap();
    let script = r#"
import sys
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain
sock, out = sys.argv[1], sys.argv[2]
client = WorkloadApiClient(socket_path="unix://" + sock)
svid = client.fetch_x509_svid(timeout=10)
bundles = client.fetch_x509_bundles(timeout=10)
bundle = bundles.get_bundle_for_trust_domain(TrustDomain("mayfly.local"))
with open(out + "/leaf.pem", "wb") as f:
    f.write(svid.leaf.public_bytes(Encoding.PEM))
with open(out + "/chain.pem", "wb") as f:
    for c in svid.cert_chain[1:]:
        f.write(c.public_bytes(Encoding.PEM))
with open(out + "/bundle.pem", "wb") as f:
    for c in bundle.x509_authorities:
        f.write(c.public_bytes(Encoding.PEM))
print(svid.spiffe_id)
key = svid.private_key
spki = lambda k: k.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
pair = spki(key.public_key()) == spki(svid.leaf.public_key())
print(len(svid.cert_chain), len(bundle.x509_authorities), isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name, pair)
client.close()
"#;
    let sock = s.socket.to_str().unwrap().to_owned();
    let out_s = out.to_str().unwrap().to_owned();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || python(script, &[&sock, &out_s]))
            .await
            .unwrap();
    assert!(ok, "py-spiffe failed:\n{stderr}\n{}", s.sidecar.proc.log());
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some(ME), "{stdout}");
    let counts = lines.next().unwrap();
    assert!(
        counts.starts_with("2 ") && counts.ends_with(" secp256r1 True"),
        "leaf + intermediate, and the leaf's own P-256 key: {counts}"
    );
    let verify = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(out.join("bundle.pem"))
        .arg("-untrusted")
        .arg(out.join("chain.pem"))
        .arg(out.join("leaf.pem"))
        .output()
        .expect("openssl is required for these tests");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // One audit record per stream start, none per byte.
    let audited = eventually(Duration::from_secs(10), async || {
        spool(s.tmp.path()).contains("\"kind\":\"workload_api.svid\"")
    })
    .await;
    assert!(audited, "{}", spool(s.tmp.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_from_a_uid_and_gid_not_allowed_gets_permission_denied_audited_and_counted() {
    // Only `nobody` may call; the test (another uid) calls through a socket whose mode lets
    // it connect, so only the peer-credential check stands between it and the SVID.
    let s = setup(
        None,
        "allowed_uids = [65534]\nallowed_gids = [65534]\nmode = \"0666\"",
    )
    .await;
    let meta = std::fs::symlink_metadata(&s.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    assert_ne!(uid(), 65534);
    let script = r#"
import sys
from spiffe import WorkloadApiClient
client = WorkloadApiClient(socket_path="unix://" + sys.argv[1])
try:
    svid = client.fetch_x509_svid(timeout=10)
    print("GOT", svid.spiffe_id)
except Exception as e:
    print("ERR", e)
"#;
    let sock = s.socket.to_str().unwrap().to_owned();
    let (_, stdout, stderr) = tokio::task::spawn_blocking(move || python(script, &[&sock]))
        .await
        .unwrap();
    assert!(
        stdout.starts_with("ERR") && stdout.contains("PERMISSION_DENIED"),
        "{stdout}{stderr}"
    );
    assert!(!stdout.contains("GOT"), "{stdout}");
    let audited = eventually(Duration::from_secs(10), async || {
        spool(s.tmp.path()).contains("\"kind\":\"workload_api.denied\"")
    })
    .await;
    let text = spool(s.tmp.path());
    assert!(audited, "{text}");
    let denied = text
        .lines()
        .find(|l| l.contains("workload_api.denied"))
        .unwrap();
    assert!(
        denied.contains(&format!("\"uid\":{}", uid())) && denied.contains("\"pid\":"),
        "{denied}"
    );
    assert!(!text.contains("workload_api.svid"), "{text}");
    assert!(
        s.sidecar
            .metric("mayfly_sidecar_workload_api_refusals_total{reason=\"caller_not_allowed\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_security_header_is_invalid_argument() {
    let s = setup(None, &format!("allowed_uids = [{}]", uid())).await;
    for path in [
        "/SpiffeWorkloadAPI/FetchX509SVID",
        "/SpiffeWorkloadAPI/FetchX509Bundles",
        "/SpiffeWorkloadAPI/FetchJWTBundles",
    ] {
        let e = raw_call(&s.socket, path, false).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{path}: {e:?}");
        assert_eq!(e.message(), "security header missing from request");
        raw_call(&s.socket, path, true)
            .await
            .unwrap_or_else(|e| panic!("{path} with the header: {e:?}"));
    }
    assert!(
        s.sidecar
            .metric(
                "mayfly_sidecar_workload_api_refusals_total{reason=\"security_header_missing\"}"
            )
            .await
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_a_jwt_svid_that_validates_through_the_sidecar_and_the_jwt_bundle_for_its_audience_only()
 {
    let s = setup(None, &format!("allowed_uids = [{}]", uid())).await;
    let endpoint = format!("unix://{}", s.socket.display());
    let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let svid = client.fetch_jwt_svid(["billing"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ME);
    assert_eq!(svid.audience(), ["billing".to_owned()]);
    // Validated by the sidecar, for its audience only.
    let ok = client
        .validate_jwt_token("billing", svid.token())
        .await
        .unwrap();
    assert_eq!(ok.spiffe_id().to_string(), ME);
    let e = client
        .validate_jwt_token("payments", svid.token())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"audience does not include "payments""#),
        "{e}"
    );
    // Validated offline against the fetched JWT bundle.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("mayfly.local").unwrap();
    let bundle = bundles.get(&td).expect("the JWT bundle of mayfly.local");
    assert!(bundle.find_jwt_authority(svid.key_id()).is_some());
    spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["billing"]).unwrap();
    assert!(spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &["payments"]).is_err());
    // Another SPIFFE ID than the workload's own: refused.
    let other = spiffe::SpiffeId::new("spiffe://mayfly.local/admin").unwrap();
    assert!(
        client
            .fetch_jwt_svid(["billing"], Some(&other))
            .await
            .is_err()
    );
    // The JwtSource does the same through its own stream of bundles.
    let source = spiffe::JwtSource::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let fetched = source.fetch_jwt_svid(["billing", "db"]).await.unwrap();
    assert_eq!(fetched.spiffe_id().to_string(), ME);
    let set = source.bundle_set().unwrap();
    spiffe::JwtSvid::parse_and_validate(fetched.token(), &*set, &["db"]).unwrap();
    source.shutdown().await;
    // Audited and counted.
    let audited = eventually(Duration::from_secs(10), async || {
        spool(s.tmp.path()).contains("\"kind\":\"workload_api.jwt_svid\"")
    })
    .await;
    assert!(audited, "{}", spool(s.tmp.path()));
    assert!(
        s.sidecar
            .metric("mayfly_sidecar_workload_api_refusals_total{reason=\"jwt_invalid\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_fetches_a_jwt_svid_and_validates_it_against_the_fetched_jwt_bundles() {
    let s = setup(None, &format!("allowed_uids = [{}]", uid())).await;
    let script = r#"
import sys
from spiffe import WorkloadApiClient, JwtSvid
from spiffe.spiffe_id.spiffe_id import TrustDomain
client = WorkloadApiClient(socket_path="unix://" + sys.argv[1])
svid = client.fetch_jwt_svid(audience={"billing"}, timeout=10)
bundles = client.fetch_jwt_bundles(timeout=10)
bundle = bundles.get_bundle_for_trust_domain(TrustDomain("mayfly.local"))
ok = JwtSvid.parse_and_validate(svid.token, bundle, {"billing"})
print(svid.spiffe_id, ok.spiffe_id, sorted(ok.audience))
try:
    JwtSvid.parse_and_validate(svid.token, bundle, {"payments"})
    print("payments accepted")
except Exception as e:
    print("payments refused")
try:
    client.validate_jwt_svid(svid.token, "payments", timeout=10)
    print("sidecar accepted payments")
except Exception as e:
    print("sidecar refused payments")
print(client.validate_jwt_svid(svid.token, "billing", timeout=10).spiffe_id)
client.close()
"#;
    let sock = s.socket.to_str().unwrap().to_owned();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || python(script, &[&sock]))
        .await
        .unwrap();
    assert!(ok, "py-spiffe failed:\n{stderr}\n{}", s.sidecar.proc.log());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{ME} {ME} ['billing']").as_str(),
            "payments refused",
            "sidecar refused payments",
            ME
        ],
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_svid_fetch_x509_svid_answers_no_identity_issued_for_the_client_to_retry()
{
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca = Ca::start(&tmp);
    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let tok = ca.token_file(ME, &dir.join("orders.token"));
    let app = echo_app("orders-app").await;
    let socket = dir.join("wl.sock");
    // A real token, but nothing listens at the control plane's address: the sidecar runs, serves the socket and
    // obtains no SVID, for itself or for the app.
    let nowhere = free_port();
    let sidecar = Sidecar::start(
        dir,
        "orders",
        &Spec {
            me: "orders",
            ca: &nowhere,
            token: &tok,
            policy: &pol,
            inbound_app: Some(&app),
            outbound: &[],
            svid_ttl: None,
            extra: &format!(
                "[workload_api]\nsocket = \"{}\"\nallowed_uids = [{}]\n",
                socket.display(),
                uid()
            ),
        }
        .toml(),
    );
    let bound = eventually(Duration::from_secs(10), async || socket.exists()).await;
    assert!(bound, "{}", sidecar.proc.log());
    // Not a call held open until an SVID comes (raw_call gives up after 10 s with
    // DeadlineExceeded): the answer the specification gives, which clients retry.
    let e = raw_call(&socket, "/SpiffeWorkloadAPI/FetchX509SVID", true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("no identity issued"), "{e:?}");
    assert_eq!(
        sidecar.admin_get("/readyz").await.0,
        503,
        "still without an SVID"
    );
    assert!(
        sidecar
            .metric("mayfly_sidecar_workload_api_refusals_total{reason=\"no_identity_yet\"}")
            .await
            >= 1.0
    );
}

/// A raw tonic call of a server-streaming Workload API method on `socket`, with or without the
/// security header: Ok once a first message arrives.
async fn raw_call(socket: &Path, path: &'static str, header: bool) -> Result<(), tonic::Status> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://workload.api")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(());
    if header {
        req.metadata_mut()
            .insert("workload.spiffe.io", "true".parse().unwrap());
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let mut stream = grpc.server_streaming(req, path, codec).await?.into_inner();
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(()))) => Ok(()),
        Ok(Ok(None)) => Err(tonic::Status::unknown("stream ended")),
        Ok(Err(s)) => Err(s),
        Err(_) => Err(tonic::Status::deadline_exceeded("no message")),
    }
}

/// The environment variable that makes [`helper_fetch_x509_svid_as_whoever_runs_it`] run.
const HELPER_SOCKET: &str = "MAYFLY_TEST_WORKLOAD_SOCKET";

/// Not a test of its own: this test binary runs it again as `nobody` (setpriv) so that a
/// process of another user calls the Workload API. Prints `RESULT <code>: <message>`.
#[tokio::test]
#[ignore = "a helper that another test runs as another OS user"]
async fn helper_fetch_x509_svid_as_whoever_runs_it() {
    let socket = std::env::var(HELPER_SOCKET).expect("run by a_process_of_another_user_...");
    match raw_call(Path::new(&socket), "/SpiffeWorkloadAPI/FetchX509SVID", true).await {
        Ok(()) => println!("RESULT Ok: an SVID"),
        Err(s) => println!("RESULT {:?}: {}", s.code(), s.message()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_of_another_user_is_refused_with_permission_denied_and_audited() {
    let s = setup(
        None,
        &format!("allowed_uids = [{}]\nmode = \"0666\"", uid()),
    )
    .await;
    assert_ne!(uid(), 65534, "the test runs as another user than nobody");
    // nobody must reach the socket: only the peer-credential check stands in its way.
    std::fs::set_permissions(s.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let socket = s.socket.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(exe)
            .args([
                "--exact",
                "helper_fetch_x509_svid_as_whoever_runs_it",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_SOCKET, socket)
            .output()
            .expect("setpriv (util-linux) is required for this test")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "the helper did not run as nobody:\n{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        result.starts_with("PermissionDenied: no identity issued"),
        "{result}"
    );
    let audited = eventually(Duration::from_secs(10), async || {
        spool(s.tmp.path()).contains("\"kind\":\"workload_api.denied\"")
    })
    .await;
    let text = spool(s.tmp.path());
    assert!(audited, "{text}");
    let denied = text
        .lines()
        .find(|l| l.contains("workload_api.denied"))
        .unwrap();
    assert!(
        denied.contains("\"uid\":65534") && denied.contains("\"gid\":65534"),
        "{denied}"
    );
    assert!(!text.contains("workload_api.svid"), "{text}");
    // The same call from an allowed user gets its SVID.
    raw_call(&s.socket, "/SpiffeWorkloadAPI/FetchX509SVID", true)
        .await
        .unwrap();
}

/// Every audit record the sidecar wrote (its JSON-lines sink: the spool itself is emptied
/// once the control plane has acknowledged it).
fn spool(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("audit.jsonl")).unwrap_or_default()
}

/// `openssl x509` on a certificate (`inform`: DER or PEM) with `args`: its stdout.
fn x509(cert: &[u8], inform: &str, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["x509", "-inform", inform, "-noout"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is required for these tests");
    child.stdin.take().unwrap().write_all(cert).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The certificate's NotAfter as Unix seconds.
fn x509_not_after(der: &[u8]) -> i64 {
    let out = x509(der, "DER", &["-enddate", "-dateopt", "iso_8601"]);
    let text = out.trim().trim_start_matches("notAfter=");
    let t = time::OffsetDateTime::parse(
        &text.replace(' ', "T"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    t.unix_timestamp()
}

/// The certificate's public key (PEM).
fn public_key(der: &[u8]) -> String {
    x509(der, "DER", &["-pubkey"])
}

/// The README's Workload API section: its `python` and `rust` blocks.
fn readme_snippets() -> (String, String) {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = &readme[readme.find("### Workload API").unwrap()..];
    let block = |lang: &str| {
        let start = section.find(&format!("```{lang}\n")).unwrap() + lang.len() + 4;
        section[start..start + section[start..].find("```").unwrap()].to_owned()
    };
    (block("python"), block("rust"))
}

/// The socket path the README's snippets use.
const README_SOCKET: &str = "unix:///run/mayfly/workload.sock";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_workload_api_snippets_run_as_written() {
    let s = setup(None, &format!("allowed_uids = [{}]", uid())).await;
    let endpoint = format!("unix://{}", s.socket.display());
    let (py, rust) = readme_snippets();
    // The Python snippet, with this test's socket.
    let script = py.replace(README_SOCKET, &endpoint);
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || python(&script, &[]))
        .await
        .unwrap();
    assert!(ok, "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some(ME), "{stdout}");
    assert_eq!(
        lines.get(1).map(|t| t.split('.').count()),
        Some(3),
        "a JWT: {stdout}"
    );
    // The Rust snippet: the same calls as below, and the README says exactly these.
    assert_eq!(
        rust,
        r#"// spiffe = { version = "0.19", features = ["x509-source", "jwt-source"] }
let endpoint = "unix:///run/mayfly/workload.sock";
let source = spiffe::X509Source::builder().endpoint(endpoint).build().await?;
let svid = source.svid()?; // the app's own, rotated in the background
let client = spiffe::WorkloadApiClient::connect_to(endpoint).await?;
let jwt = client.fetch_jwt_svid(["billing"], None).await?; // for audience "billing"
"#
    );
    let run = async {
        let endpoint = endpoint.as_str();
        let source = spiffe::X509Source::builder()
            .endpoint(endpoint)
            .build()
            .await?;
        let svid = source.svid()?; // the app's own, rotated in the background
        let client = spiffe::WorkloadApiClient::connect_to(endpoint).await?;
        let jwt = client.fetch_jwt_svid(["billing"], None).await?; // for audience "billing"
        Ok::<_, Box<dyn std::error::Error>>((svid, jwt))
    };
    let (svid, jwt) = run.await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ME);
    assert_eq!(jwt.audience(), ["billing".to_owned()]);
}
