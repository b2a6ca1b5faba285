//! The mesh's processes: the real `mayfly-ca` and `mayfly-sidecar` binaries, started on
//! 127.0.0.1 port 0 (their addresses read from their start-up lines on stderr), stopped with
//! SIGTERM (then SIGKILL) when the [`Mesh`] is dropped, whatever the reason: success, error,
//! Ctrl-C.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The trust domain of the quickstart mesh.
pub(crate) const TD: &str = "mayfly.local";

/// `spiffe://mayfly.local/<name>`.
pub(crate) fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

/// Where the mayfly binaries are.
#[derive(Debug, Clone)]
pub(crate) struct Bins {
    pub(crate) ca: PathBuf,
    pub(crate) sidecar: PathBuf,
    /// The people's CLI (`mayfly login`, `access`, `connect`).
    pub(crate) mayfly: PathBuf,
    pub(crate) dir: PathBuf,
}

impl Bins {
    /// Finds `mayfly-ca` and `mayfly-sidecar` next to this executable. When started by cargo
    /// (`cargo run`) from the mayfly source tree, first brings them up to date with
    /// `cargo build` in the same target directory and profile, unless `no_build`.
    pub(crate) fn locate(no_build: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the quickstart's own path")?;
        let dir = exe
            .parent()
            .context("the quickstart's path has no directory")?
            .to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var_os("CARGO");
        if !no_build
            && let Some(cargo) = cargo
            && workspace.join("Cargo.toml").is_file()
            && let Some(target) = dir.parent()
        {
            let profile = dir
                .file_name()
                .and_then(|p| p.to_str())
                .unwrap_or("debug")
                .to_owned();
            let profile = if profile == "debug" {
                "dev".to_owned()
            } else {
                profile
            };
            println!(
                "Building mayfly-ca, mayfly-sidecar and mayfly ({profile} profile; the first time takes a few minutes)..."
            );
            let status = Command::new(cargo)
                .args(["build", "--profile", &profile])
                .args(["-p", "mayfly-ca", "-p", "mayfly-sidecar"])
                .args([
                    "--bin",
                    "mayfly-ca",
                    "--bin",
                    "mayfly-sidecar",
                    "--bin",
                    "mayfly",
                ])
                .env("CARGO_TARGET_DIR", target)
                .current_dir(&workspace)
                .stdin(Stdio::null())
                .status()
                .context("cannot run cargo build")?;
            if !status.success() {
                bail!("cargo build of mayfly-ca and mayfly-sidecar failed ({status})");
            }
        }
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{name} is not next to the quickstart (in {}); build it first: \
                     cargo build --release -p mayfly-ca -p mayfly-sidecar -p mayfly-examples",
                    dir.display()
                )
            }
        };
        Ok(Self {
            ca: find("mayfly-ca")?,
            sidecar: find("mayfly-sidecar")?,
            mayfly: find("mayfly")?,
            dir,
        })
    }

    /// Runs `mayfly-ca ARGS` to completion: (exit code, stdout, stderr).
    pub(crate) fn ca_cmd(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        run(&self.ca, args)
    }

    /// Runs `mayfly-sidecar ARGS` to completion.
    pub(crate) fn sidecar_cmd(&self, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
        run(&self.sidecar, args)
    }
}

fn run(bin: &Path, args: &[&str]) -> anyhow::Result<(i32, String, String)> {
    let out = Command::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A started process: its stderr is kept, and `<prefix> NAME on ADDR` lines are indexed.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    addrs: Arc<Mutex<HashMap<String, String>>>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("MAYFLY_QUICKSTART_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        let addrs = Arc::new(Mutex::new(HashMap::new()));
        if let Some(stderr) = child.stderr.take() {
            let (log, addrs) = (log.clone(), addrs.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    // `mayfly-ca listening on A`, `mayfly-sidecar outbound db on A`,
                    // `mayfly connect listening on A`, `oidc-provider listening on URL`.
                    if (line.starts_with("mayfly") || line.starts_with("oidc-provider"))
                        && let Some((k, v)) = line.rsplit_once(" on ")
                        && let Ok(mut a) = addrs.lock()
                    {
                        a.insert(k.to_owned(), v.trim().to_owned());
                    }
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            addrs,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (up to 30 s) for the start-up line `KEY on ADDR`; fails early if the process exits.
    pub(crate) async fn addr(&mut self, key: &str) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(a) = self.addrs.lock().ok().and_then(|a| a.get(key).cloned()) {
                return Ok(a);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader thread catch the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!(
                    "{} exited ({status}) before printing `{key} on ...`:\n{}",
                    self.name,
                    tail(&self.log(), 15)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} printed no `{key} on ...` line within 30 s:\n{}",
                    self.name,
                    tail(&self.log(), 15)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn terminate(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }

    /// Waits for the exit until `deadline`, then kills. Reaps the process either way.
    fn reap(&mut self, deadline: Instant) {
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The last `n` lines of `s`.
pub(crate) fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SIGTERM to all, then wait up to 5 s for each, then SIGKILL.
pub(crate) fn stop_all(procs: &mut Vec<Proc>) {
    for p in procs.iter() {
        p.terminate();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for p in procs.iter_mut() {
        p.reap(deadline);
    }
    procs.clear();
}

/// A running sidecar's addresses.
#[derive(Debug, Clone, Default)]
pub(crate) struct SidecarAddrs {
    pub(crate) admin: String,
    pub(crate) inbound: Option<String>,
    pub(crate) outbound: HashMap<String, String>,
}

/// What to put in a sidecar's configuration.
pub(crate) struct SidecarSpec<'a> {
    /// Names its directory, token file and log (`orders-2`, ...).
    pub(crate) name: &'a str,
    /// The workload whose identity it holds: `spiffe://mayfly.local/<workload>` (replicas of
    /// one service share it).
    pub(crate) workload: &'a str,
    /// `(app address, protocol)` for `[inbound]`.
    pub(crate) inbound: Option<(&'a str, &'a str)>,
    /// `(name, remote inbound address, remote workload name, protocol)` per `[[outbound]]`;
    /// an empty address: no `remote`, the endpoints registered under the workload's ID.
    pub(crate) outbound: Vec<(&'a str, &'a str, &'a str, &'a str)>,
    pub(crate) svid_ttl: &'a str,
}

impl SidecarSpec<'_> {
    /// The TOML configuration (the token file is `<name>.token` beside it). No `[policy]`
    /// section: the sidecar follows the control plane's policy and live grants.
    pub(crate) fn toml(&self, ca_addr: &str) -> String {
        let mut s = format!(
            "# The {name} sidecar of the mayfly quickstart (written by the quickstart).\n\
             spiffe_id = \"{id}\"\n\n\
             [control_plane]\n\
             address = \"{ca_addr}\"\n\
             token_file = \"{name}.token\"\n\
             svid_ttl = \"{ttl}\"\n\n\
             [admin]\n\
             listen = \"127.0.0.1:0\"\n\n\
             [limits]\n\
             drain_timeout = \"2s\"\n",
            name = self.name,
            id = id(self.workload),
            ttl = self.svid_ttl,
        );
        if let Some((app, protocol)) = self.inbound {
            s.push_str(&format!(
                "\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app}\"\nprotocol = \"{protocol}\"\n"
            ));
        }
        for (name, remote, to, protocol) in &self.outbound {
            let remote = if remote.is_empty() {
                String::new()
            } else {
                format!("remote = \"{remote}\"\n")
            };
            s.push_str(&format!(
                "\n[[outbound]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n{remote}\
                 spiffe_id = \"{}\"\nprotocol = \"{protocol}\"\n",
                id(to)
            ));
        }
        s
    }
}

/// The control plane and the sidecars. Dropping it stops every process, then removes the
/// temporary directory.
pub(crate) struct Mesh {
    pub(crate) bins: Bins,
    pub(crate) ca_addr: String,
    /// The control plane's web console (`http://127.0.0.1:PORT/`).
    pub(crate) console_url: String,
    /// Everything running: the identity provider (when it runs), the control plane, then the
    /// sidecars.
    pub(crate) procs: Vec<Proc>,
    /// The local test identity provider's issuer URL, when it runs (`steps::people`).
    pub(crate) idp: Option<String>,
    /// Every PID ever started (for the summary).
    pub(crate) pids: Vec<u32>,
    /// Dropped after the processes are stopped (field order).
    tmp: tempfile::TempDir,
}

impl Mesh {
    /// A temporary directory (0700) for everything the mesh writes.
    pub(crate) fn new(bins: Bins) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-quickstart-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        Ok(Self {
            bins,
            ca_addr: String::new(),
            console_url: String::new(),
            procs: Vec::new(),
            idp: None,
            pids: Vec::new(),
            tmp,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// The policy file the control plane distributes (`mayfly-ca run --policy`).
    pub(crate) fn policy_path(&self) -> PathBuf {
        self.dir().join("policy.toml")
    }

    /// The control plane's data directory.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir().join("ca")
    }

    fn data_dir_str(&self) -> anyhow::Result<String> {
        self.data_dir()
            .to_str()
            .map(str::to_owned)
            .context("the temporary directory's path is not UTF-8")
    }

    /// `mayfly-ca init`, then `mayfly-ca run --policy POLICY` on 127.0.0.1:0: the control plane
    /// validates the policy, reloads it when the file changes and pushes it to every sidecar;
    /// its web console on another port of 127.0.0.1.
    pub(crate) async fn start_control_plane(&mut self, policy: &Path) -> anyhow::Result<()> {
        let dd = self.data_dir_str()?;
        let policy = policy.to_str().context("the policy's path is not UTF-8")?;
        let (code, _, err) =
            self.bins
                .ca_cmd(&["init", "--data-dir", &dd, "--trust-domain", TD])?;
        if code != 0 {
            bail!("mayfly-ca init failed ({code}):\n{err}");
        }
        let mut cmd = Command::new(&self.bins.ca);
        cmd.args(["run", "--data-dir", &dd, "--listen", "127.0.0.1:0"])
            .args(["--policy", policy, "--metrics-listen", "off"])
            .args(["--ui-listen", "127.0.0.1:0"]);
        if let Some(issuer) = &self.idp {
            cmd.args(["--oidc-issuer", issuer])
                .args(["--oidc-client-id", mayfly_examples::idp::CLIENT_ID]);
        }
        let mut p = Proc::spawn("mayfly-ca run", cmd)?;
        self.pids.push(p.pid());
        let addr = p.addr("mayfly-ca listening").await;
        let console = p.addr("mayfly-ca console").await;
        self.procs.push(p);
        self.ca_addr = addr?;
        self.console_url = console?;
        Ok(())
    }

    /// Starts `cmd` as `name` and waits for its `KEY on ADDR` line; stopped with the mesh (or
    /// by [`Mesh::kill`]).
    pub(crate) async fn start(
        &mut self,
        name: &str,
        cmd: Command,
        key: &str,
    ) -> anyhow::Result<String> {
        let mut p = Proc::spawn(name, cmd)?;
        self.pids.push(p.pid());
        let addr = p.addr(key).await;
        self.procs.push(p);
        addr
    }

    /// The version (content hash) of a policy file, as `mayfly-ca policy check` reports it:
    /// the `policy_version` a sidecar enforcing it shows in `/readyz`.
    pub(crate) fn policy_version(&self, policy: &Path) -> anyhow::Result<String> {
        let p = policy.to_str().context("the policy's path is not UTF-8")?;
        let (code, out, err) = self.bins.ca_cmd(&["policy", "check", p])?;
        if code != 0 {
            bail!("mayfly-ca policy check {p} failed ({code}):\n{err}");
        }
        out.rsplit_once("version ")
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .with_context(|| format!("no version in `mayfly-ca policy check`: {out}"))
    }

    /// A join token for `workload`'s identity, written to `<dir>/<name>/<name>.token`.
    pub(crate) fn token(&self, name: &str, workload: &str) -> anyhow::Result<()> {
        let dd = self.data_dir_str()?;
        let (code, out, err) = self.bins.ca_cmd(&[
            "token",
            "create",
            "--data-dir",
            &dd,
            "--spiffe-id",
            &id(workload),
            "--ttl",
            "5m",
        ])?;
        if code != 0 {
            bail!("mayfly-ca token create failed ({code}):\n{err}");
        }
        let path = self.sidecar_dir(name)?.join(format!("{name}.token"));
        std::fs::write(&path, out.trim())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes `<dir>/<name>/<name>.toml`.
    /// `<dir>/<name>/`: one directory per sidecar, for its configuration, its token and
    /// whatever it keeps beside them (its audit spool, in builds that have one).
    pub(crate) fn sidecar_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.dir().join(name);
        std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
        Ok(d)
    }

    pub(crate) fn write_config(&self, spec: &SidecarSpec<'_>) -> anyhow::Result<PathBuf> {
        let path = self
            .sidecar_dir(spec.name)?
            .join(format!("{}.toml", spec.name));
        std::fs::write(&path, spec.toml(&self.ca_addr))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// `mayfly-sidecar check --config FILE`: (exit code, stderr).
    pub(crate) fn check(&self, config: &Path) -> anyhow::Result<(i32, String)> {
        let path = config.to_str().context("path not UTF-8")?;
        let (code, _, err) = self.bins.sidecar_cmd(&["check", "--config", path])?;
        Ok((code, err))
    }

    /// Creates a join token, writes the config and starts the sidecar; returns its addresses
    /// once every listener is bound.
    pub(crate) async fn start_sidecar(
        &mut self,
        spec: &SidecarSpec<'_>,
    ) -> anyhow::Result<SidecarAddrs> {
        self.token(spec.name, spec.workload)?;
        let config = self.write_config(spec)?;
        let mut cmd = Command::new(&self.bins.sidecar);
        cmd.arg("run").arg("--config").arg(&config);
        let mut p = Proc::spawn(&format!("{} sidecar", spec.name), cmd)?;
        self.pids.push(p.pid());
        let mut addrs = SidecarAddrs::default();
        let r = async {
            addrs.admin = p.addr("mayfly-sidecar admin").await?;
            if spec.inbound.is_some() {
                addrs.inbound = Some(p.addr("mayfly-sidecar inbound").await?);
            }
            for (name, ..) in &spec.outbound {
                let a = p.addr(&format!("mayfly-sidecar outbound {name}")).await?;
                addrs.outbound.insert((*name).to_owned(), a);
            }
            anyhow::Ok(())
        }
        .await;
        self.procs.push(p);
        r?;
        Ok(addrs)
    }

    /// `kill -9` of the process named `name` (no drain, no goodbye to the control plane), then
    /// reaps it. Its PID, if it was running.
    pub(crate) fn kill(&mut self, name: &str) -> Option<u32> {
        let i = self.procs.iter().position(|p| p.name == name)?;
        let mut p = self.procs.remove(i);
        let pid = p.pid();
        let _ = p.child.kill();
        let _ = p.child.wait();
        Some(pid)
    }

    /// Stops every sidecar (the control plane stays), to start them again differently.
    pub(crate) fn stop_sidecars(&mut self) {
        let mut sidecars = self.procs.split_off(1.min(self.procs.len()));
        stop_all(&mut sidecars);
    }

    /// The stderr of the process named `name` (`web sidecar`, ...).
    pub(crate) fn log_of(&self, name: &str) -> String {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .map(Proc::log)
            .unwrap_or_default()
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        stop_all(&mut self.procs);
    }
}
