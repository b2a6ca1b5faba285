//! Harness for end-to-end tests: the real `mayfly-ca` and `mayfly-sidecar` binaries, started as
//! processes on 127.0.0.1 with port 0, their addresses read from their start-up lines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub mod console;
pub mod mesh;
pub mod netns;
pub mod observe;
pub mod oidc;
pub mod people;
pub mod postgres;
pub mod replicas;

/// The path of a workspace binary, building it once if `cargo test` has not yet.
///
/// With `MAYFLY_TEST_BINS=workspace` (what `.ci/run` sets) the binaries are built by
/// `cargo build --workspace --bins --tests`: the same selection as `cargo test --workspace`,
/// so the same features are unified and nothing is compiled a second time (the narrow build
/// below leaves out dev-dependencies' features, which rebuilds the whole graph once more).
/// Without it, only the three binaries are built: the fast path for running one test file.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf(); // target/<profile>
    let path = dir.join(name);
    BUILT.get_or_init(|| {
        let whole = std::env::var("MAYFLY_TEST_BINS").is_ok_and(|v| v == "workspace");
        let args: &[&str] = if whole {
            &["build", "--workspace", "--bins", "--tests", "--locked"]
        } else {
            &[
                "build",
                "--bin",
                "mayfly-ca",
                "--bin",
                "mayfly-sidecar",
                "--bin",
                "mayfly",
                "--bin",
                "quickstart",
            ]
        };
        let status = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    path
}

/// Polls `f` every 50 ms until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process whose stderr is collected; lines starting with a known prefix are parsed
/// into addresses. Killed on drop.
pub struct Proc {
    pub child: Child,
    log: Arc<Mutex<String>>,
    addrs: Arc<Mutex<HashMap<String, String>>>,
}

impl Proc {
    /// Spawns `cmd`, collecting its stderr and the addresses of lines starting with `prefixes`.
    pub fn spawn(mut cmd: Command, prefixes: &'static [&'static str]) -> Self {
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("MAYFLY_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let addrs = Arc::new(Mutex::new(HashMap::new()));
        let (l2, a2) = (log.clone(), addrs.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                for p in prefixes {
                    if let Some(rest) = line.strip_prefix(p)
                        && let Some((k, v)) = rest.rsplit_once(" on ")
                    {
                        a2.lock()
                            .unwrap()
                            .insert(format!("{p}{k}"), v.trim().to_owned());
                    }
                }
                l2.lock().unwrap().push_str(&line);
                l2.lock().unwrap().push('\n');
            }
        });
        Self { child, log, addrs }
    }

    /// Waits for an address line such as `mayfly-sidecar inbound`.
    pub fn addr(&mut self, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(a) = self.addrs.lock().unwrap().get(key) {
                return a
                    .trim_start_matches("http://")
                    .trim_end_matches("/metrics")
                    .to_owned();
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!(
                    "process exited ({s}) before printing {key:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {key:?} line in 30s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An address line already printed (panics if absent).
    pub fn addrs_snapshot(&self, key: &str) -> String {
        self.addrs
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key:?} yet"))
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then wait (kill after 20 s).
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
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

    /// Hard kill (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control plane in a temporary data directory.
pub struct Ca {
    pub dir: PathBuf,
    pub proc: Option<Proc>,
    pub addr: String,
    /// Extra `run` flags, kept for restarts.
    pub extra: Vec<String>,
    _tmp: Arc<tempfile::TempDir>,
}

impl Ca {
    /// `mayfly-ca init` + `mayfly-ca run` on 127.0.0.1:0.
    pub fn start(tmp: &Arc<tempfile::TempDir>) -> Self {
        let dir = tmp.path().join("ca");
        let out = Command::new(bin("mayfly-ca"))
            .args([
                "init",
                "--data-dir",
                dir.to_str().unwrap(),
                "--trust-domain",
                "mayfly.local",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut ca = Self {
            dir,
            proc: None,
            addr: String::new(),
            extra: Vec::new(),
            _tmp: tmp.clone(),
        };
        ca.run("127.0.0.1:0");
        ca
    }

    /// `mayfly-ca init` + `mayfly-ca run` on 127.0.0.1:0 with `extra` arguments to `run`
    /// (such as `--k8s-jwks FILE --k8s-issuer URL`).
    pub fn start_with(tmp: &Arc<tempfile::TempDir>, extra: &[&str]) -> Self {
        let dir = tmp.path().join("ca");
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
        let mut cmd = Command::new(bin("mayfly-ca"));
        cmd.args(["run", "--data-dir", dir.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"]);
        // Off unless the test asks for a metrics listener of its own.
        if !extra.contains(&"--metrics-listen") {
            cmd.args(["--metrics-listen", "off"]);
        }
        cmd.args(extra);
        let mut p = Proc::spawn(cmd, &["mayfly-ca listening"]);
        let addr = p.addr("mayfly-ca listening");
        Self {
            dir,
            proc: Some(p),
            addr,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp.clone(),
        }
    }

    /// `mayfly-ca init --store STORE` + `mayfly-ca run --store STORE` on 127.0.0.1:0 (a
    /// control plane on a database such as PostgreSQL), with `extra` arguments to `run`; the
    /// store flags are kept for restarts.
    pub fn start_with_store(tmp: &Arc<tempfile::TempDir>, store: &str, extra: &[&str]) -> Self {
        let dir = tmp.path().join("ca");
        let out = Command::new(bin("mayfly-ca"))
            .args(["init", "--data-dir", dir.to_str().unwrap()])
            .args(["--trust-domain", "mayfly.local", "--store", store])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut flags = vec!["--store", store];
        flags.extend_from_slice(extra);
        Self::start_with_existing(tmp, &dir, "127.0.0.1:0", &flags)
    }

    /// The pin of the active root (`mayfly-ca bundle show --format pin`).
    pub fn pin(&self) -> String {
        let out = Command::new(bin("mayfly-ca"))
            .args(["bundle", "show", "--format", "pin", "--data-dir"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// A control plane on an already initialised data directory, with extra `run` flags.
    pub fn start_with_existing(
        tmp: &Arc<tempfile::TempDir>,
        dir: &Path,
        listen: &str,
        extra: &[&str],
    ) -> Self {
        let mut ca = Self {
            dir: dir.to_path_buf(),
            proc: None,
            addr: String::new(),
            extra: Vec::new(),
            _tmp: tmp.clone(),
        };
        ca.run_with(listen, extra);
        ca
    }

    /// (Re)starts `mayfly-ca run` on `listen` with extra flags, keeping them for restarts.
    pub fn run_with(&mut self, listen: &str, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.run(listen);
    }

    /// (Re)starts `mayfly-ca run` on `listen`.
    pub fn run(&mut self, listen: &str) {
        let mut cmd = Command::new(bin("mayfly-ca"));
        cmd.args([
            "run",
            "--data-dir",
            self.dir.to_str().unwrap(),
            "--listen",
            listen,
        ]);
        // Off unless the test asks for a metrics listener of its own.
        if !self.extra.iter().any(|a| a == "--metrics-listen") {
            cmd.args(["--metrics-listen", "off"]);
        }
        cmd.args(&self.extra);
        let mut p = Proc::spawn(cmd, &["mayfly-ca listening"]);
        let _ = p.addr("mayfly-ca listening");
        self.addr = p
            .addrs
            .lock()
            .unwrap()
            .get("mayfly-ca listening")
            .cloned()
            .unwrap();
        self.proc = Some(p);
    }

    /// A join token for `id`, written to a new file; returns the file.
    pub fn token_file(&self, id: &str, path: &Path) -> PathBuf {
        let out = Command::new(bin("mayfly-ca"))
            .args([
                "token",
                "create",
                "--data-dir",
                self.dir.to_str().unwrap(),
                "--spiffe-id",
                id,
                "--ttl",
                "10m",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(path, &out.stdout).unwrap();
        path.to_path_buf()
    }

    /// Mints an SVID into `out` (svid.pem, svid.key, bundle.pem) with `mayfly-ca svid mint`.
    pub fn mint(&self, id: &str, out: &Path) {
        let o = Command::new(bin("mayfly-ca"))
            .args([
                "svid",
                "mint",
                "--data-dir",
                self.dir.to_str().unwrap(),
                "--spiffe-id",
                id,
                "--out",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: String,
    pub config: PathBuf,
}

impl Sidecar {
    /// Writes `config` to `<dir>/<name>.toml` and starts `mayfly-sidecar run`.
    pub fn start(dir: &Path, name: &str, config: &str) -> Self {
        Self::start_with_env(dir, name, config, &[])
    }

    /// [`Sidecar::start`] with `env` set on the process.
    pub fn start_with_env(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(bin("mayfly-sidecar"));
        cmd.args(["run", "--config", path.to_str().unwrap()]);
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(
            cmd,
            &[
                "mayfly-sidecar admin",
                "mayfly-sidecar inbound",
                "mayfly-sidecar outbound ",
            ],
        );
        let admin = proc.addr("mayfly-sidecar admin");
        Self {
            proc,
            admin,
            config: path,
        }
    }

    /// The inbound listener's address.
    pub fn inbound(&mut self) -> String {
        self.proc.addr("mayfly-sidecar inbound")
    }

    /// An outbound upstream's local address.
    pub fn outbound(&mut self, name: &str) -> String {
        self.proc.addr(&format!("mayfly-sidecar outbound {name}"))
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&self.admin, path).await
    }

    /// Waits for `/readyz` to answer 200.
    pub async fn wait_ready(&self) {
        let ok = eventually(Duration::from_secs(30), async || {
            self.admin_get("/readyz").await.0 == 200
        })
        .await;
        assert!(ok, "sidecar not ready in 30s:\n{}", self.proc.log());
    }

    /// The value of a metric line that starts with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A minimal HTTP/1.1 GET over plain TCP: (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
    let status = out.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A TCP echo server on 127.0.0.1:0 that first sends `banner\n`, then echoes. Returns its address.
pub async fn echo_app(banner: &'static str) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(format!("{banner}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = s.shutdown().await;
                            return;
                        }
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Connects to `addr`, reads the banner line, sends `msg`, reads it back. Err on any failure.
pub async fn round_trip(addr: &str, msg: &[u8]) -> Result<String, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut banner = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = s.read(&mut b).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!(
                    "closed before banner (got {:?})",
                    String::from_utf8_lossy(&banner)
                ));
            }
            if b[0] == b'\n' {
                break;
            }
            banner.push(b[0]);
        }
        s.write_all(msg).await.map_err(|e| e.to_string())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.map_err(|e| e.to_string())?;
        if back != msg {
            return Err("echo mismatch".into());
        }
        Ok(String::from_utf8_lossy(&banner).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| "timeout".to_owned())?
}

/// A policy allowing each `(from, to)` pair by path under `spiffe://mayfly.local`.
pub fn policy(pairs: &[(&str, &str)]) -> String {
    let mut s = String::from("version = 1\n");
    for (i, (f, t)) in pairs.iter().enumerate() {
        s.push_str(&format!(
            "\n[[rule]]\nname = \"r{i}\"\nfrom = [\"spiffe://mayfly.local/{f}\"]\nto = [\"spiffe://mayfly.local/{t}\"]\n"
        ));
    }
    s
}

/// What a test sidecar looks like.
pub struct Spec<'a> {
    /// Path of its SPIFFE ID under `spiffe://mayfly.local/`.
    pub me: &'a str,
    /// Control plane address.
    pub ca: &'a str,
    /// Join token file.
    pub token: &'a Path,
    /// Policy file.
    pub policy: &'a Path,
    /// The local app, for an inbound listener.
    pub inbound_app: Option<&'a str>,
    /// Upstreams: (name, remote address, server ID path).
    pub outbound: &'a [(&'a str, &'a str, &'a str)],
    /// `control_plane.svid_ttl`.
    pub svid_ttl: Option<&'a str>,
    /// Extra TOML tables appended at the end.
    pub extra: &'a str,
}

impl Spec<'_> {
    /// The sidecar's TOML configuration.
    pub fn toml(&self) -> String {
        let ttl = self
            .svid_ttl
            .map(|t| format!("svid_ttl = \"{t}\"\n"))
            .unwrap_or_default();
        let mut s = format!(
            "spiffe_id = \"spiffe://mayfly.local/{}\"\n\n[control_plane]\naddress = \"{}\"\ntoken_file = \"{}\"\n{ttl}\n[policy]\nfile = \"{}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            self.me,
            self.ca,
            self.token.display(),
            self.policy.display()
        );
        if let Some(app) = self.inbound_app {
            s.push_str(&format!(
                "\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\n"
            ));
        }
        for (name, remote, id) in self.outbound {
            s.push_str(&format!(
                "\n[[outbound]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nremote = \"{remote}\"\nspiffe_id = \"spiffe://mayfly.local/{id}\"\n"
            ));
        }
        s.push('\n');
        s.push_str(self.extra);
        s
    }
}

/// An HTTP/1.1 app on 127.0.0.1:0 that answers every request with JSON describing it:
/// `{"method", "path", "xfcc": [...], "body_len", "name"}`. Returns its address.
pub async fn http_app(name: &'static str) -> String {
    use http_body_util::BodyExt;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let method = req.method().to_string();
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let xfcc: Vec<String> = req
                            .headers()
                            .get_all("x-forwarded-client-cert")
                            .iter()
                            .map(|v| v.to_str().unwrap_or("?").to_owned())
                            .collect();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes().len())
                            .unwrap_or(0);
                        let json = serde_json::json!({"method": method, "path": path, "xfcc": xfcc, "body_len": body, "name": name});
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(json.to_string())),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Runs curl with `args`; returns (exit ok, stdout, stderr). Panics in CI if curl is missing.
pub fn curl(args: &[&str]) -> (bool, String, String) {
    match std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => panic!("curl is required for these tests: {e}"),
    }
}

/// A request to the control plane's API at `api` over mTLS with the SVID minted into `svid`
/// (svid.pem, svid.key, bundle.pem), with the JSON `body`: (HTTP status, or curl's error when
/// there is none; the response body).
pub fn api_request(
    api: &str,
    svid: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> (String, String) {
    let p = |f: &str| svid.join(f).to_str().unwrap().to_owned();
    let out = tempfile::NamedTempFile::new().unwrap();
    let (_, code, err) = curl(&[
        "--cacert",
        &p("bundle.pem"),
        "--cert",
        &p("svid.pem"),
        "--key",
        &p("svid.key"),
        "-X",
        method,
        "-o",
        out.path().to_str().unwrap(),
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "--data",
        body,
        &format!("https://{api}{path}"),
    ]);
    if code.is_empty() {
        return (err, String::new());
    }
    (
        code,
        std::fs::read_to_string(out.path()).unwrap_or_default(),
    )
}

/// A renewal (`POST /v1/svid`) for `spiffe://mayfly.local/web` with the SVID minted into
/// `svid`, as [`api_request`].
pub fn renew_web(api: &str, svid: &Path) -> (String, String) {
    let key = mayfly_ca::keys::SecretKey::generate().unwrap();
    let id = mayfly_ca::id::parse_workload_id("spiffe://mayfly.local/web").unwrap();
    let csr = mayfly_ca::issue::make_csr(&key, &id).unwrap();
    let b64: String = mayfly_ca::keys::pem_encode("CSR", &csr)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    api_request(
        api,
        svid,
        "POST",
        "/v1/svid",
        &format!("{{\"csr\":\"{b64}\"}}"),
    )
}

/// A control plane in this process (`mayfly-ca init` + `run`, as library calls) for trust domain
/// `mayfly.local` in `dir/ca`, listening on 127.0.0.1:0, following `policy` when given: for the
/// benchmark harnesses and tests that need its internals (store, issuance) at hand.
pub async fn in_process_control_plane(
    dir: &Path,
    policy: Option<PathBuf>,
) -> anyhow::Result<mayfly_ca::server::Running> {
    use mayfly_ca::server;
    let data = dir.join("ca");
    server::init(
        &data,
        "mayfly.local",
        mayfly_ca::authority::AuthorityConfig::default(),
    )?;
    Ok(server::start(server::RunOptions {
        data_dir: data,
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        settings: server::CaSettings::default(),
        drain: Duration::from_secs(1),
        policy_file: policy,
        admin_socket: None,
        admin_group: None,
        store: Default::default(),
        console: None,
    })
    .await?)
}

/// A free 127.0.0.1 port, as `127.0.0.1:PORT` (for a control plane that must come back at the
/// same address after a restart).
pub fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

impl Sidecar {
    /// Like [`Sidecar::start`], with extra environment variables (a `token_env` join token).
    pub fn start_env(dir: &Path, name: &str, config: &str, env: &[(&str, &str)]) -> Self {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(bin("mayfly-sidecar"));
        cmd.args(["run", "--config", path.to_str().unwrap()]);
        cmd.envs(env.iter().copied());
        let mut proc = Proc::spawn(
            cmd,
            &[
                "mayfly-sidecar admin",
                "mayfly-sidecar inbound",
                "mayfly-sidecar outbound ",
            ],
        );
        let admin = proc.addr("mayfly-sidecar admin");
        Self {
            proc,
            admin,
            config: path,
        }
    }

    /// The current SVID's (serial, NotAfter as Unix seconds), from `/svid`.
    pub async fn svid(&self) -> Option<(String, i64)> {
        let (status, body) = self.admin_get("/svid").await;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((v["serial"].as_str()?.to_owned(), v["not_after"].as_i64()?))
    }
}
