//! A throwaway PostgreSQL server for tests: `initdb` into a temporary directory and
//! `postgres` on a free 127.0.0.1 port, both as the unprivileged user `nobody` (initdb refuses
//! root), with trust authentication for the superuser `mayfly`. Stopped and removed on drop,
//! also when a test panics. Never skipped: without the binaries it fails, saying what to
//! install.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The directory holding `initdb`, `postgres` and `psql`: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn bindir() -> PathBuf {
    if let Ok(o) = Command::new("pg_config").arg("--bindir").output()
        && o.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found (no `pg_config --bindir`, no /usr/lib/postgresql/*/bin/initdb): \
             install them (`apt-get install postgresql`) to run the PostgreSQL tests"
        ),
    }
}

/// A running PostgreSQL server.
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    next_db: AtomicUsize,
}

/// Runs `cmd` as `nobody`.
fn as_nobody(program: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
        .arg(program)
        .env("LC_ALL", "C")
        .env_remove("PGDATA");
    c
}

impl Postgres {
    /// Initialises and starts a server; returns once it accepts connections.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server that also speaks TLS, with a certificate for `localhost` and `127.0.0.1`
    /// signed by a test CA ([`Postgres::root_ca`]); made with the openssl command.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    /// The PEM file of the CA that signed a TLS server's certificate.
    pub fn root_ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(tls: bool) -> Self {
        let bin = bindir();
        let dir = tempfile::Builder::new()
            .prefix("mayfly-pg")
            .tempdir()
            .unwrap();
        let nobody = nix::unistd::User::from_name("nobody")
            .unwrap()
            .expect("the user nobody");
        let nogroup = nix::unistd::Group::from_name("nogroup")
            .unwrap()
            .expect("the group nogroup");
        std::os::unix::fs::chown(
            dir.path(),
            Some(nobody.uid.as_raw()),
            Some(nogroup.gid.as_raw()),
        )
        .unwrap();
        let data = dir.path().join("data");
        let out = as_nobody(&bin.join("initdb"))
            .args(["-D", data.to_str().unwrap()])
            .args(["-U", "mayfly", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port()
            .rsplit(':')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("postgres.log")).unwrap();
        let mut cmd = as_nobody(&bin.join("postgres"));
        if tls {
            let (cert, key) = tls_files(dir.path(), nobody.uid.as_raw(), nogroup.gid.as_raw());
            cmd.args(["-c", "ssl=on"])
                .arg("-c")
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        let child = cmd
            .args(["-D", data.to_str().unwrap()])
            .args(["-p", &port.to_string(), "-k", dir.path().to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pg = Self {
            child: Some(child),
            bin,
            port,
            dir,
            next_db: AtomicUsize::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(pg.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "mayfly"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start in 60s:\n{}",
                pg.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        pg
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The URL of database `db` (TLS off: the server has no certificate).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://mayfly:not-a-secret@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// The URL of database `db` over the server's Unix socket.
    pub fn socket_url(&self, db: &str) -> String {
        let dir = self.dir.path().display().to_string().replace('/', "%2F");
        format!("postgres://mayfly@{dir}:{}/{db}", self.port)
    }

    /// A new empty database; returns its URL.
    pub fn create_db(&self) -> String {
        let name = format!("t{}", self.next_db.fetch_add(1, Ordering::SeqCst));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in database `db` with psql; returns its unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "mayfly",
            ])
            .args([
                "-d",
                db,
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Postgres {
    /// Stops the server (immediate shutdown, as a crash would) and waits for it to exit; its
    /// data stays for [`Postgres::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = child.wait();
    }

    /// Starts a stopped server again on the same port and data (without TLS); returns once
    /// it accepts connections.
    pub fn restart(&mut self) {
        self.restart_with(false);
    }

    /// As [`Postgres::restart`], with `fsync = on`: commits are durable, as in production
    /// (for benchmarks; tests run without fsync).
    pub fn restart_durable(&mut self) {
        self.restart_with(true);
    }

    fn restart_with(&mut self, fsync: bool) {
        assert!(self.child.is_none(), "the server is running");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .unwrap();
        let data = self.dir.path().join("data");
        let child = as_nobody(&self.bin.join("postgres"))
            .args(["-D", data.to_str().unwrap()])
            .args(["-p", &self.port.to_string()])
            .args(["-k", self.dir.path().to_str().unwrap()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(if fsync { "fsync=on" } else { "fsync=off" })
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Command::new(self.bin.join("pg_isready"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "mayfly",
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not restart in 60s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`ca.pem`) and a server certificate and key for `localhost` and `127.0.0.1`
/// signed by it, the key readable by the server's user only.
fn tls_files(dir: &Path, uid: u32, gid: u32) -> (PathBuf, PathBuf) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=mayfly test db CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&key, Some(uid), Some(gid)).unwrap();
    (cert, key)
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Immediate shutdown: the postmaster ends its backends and exits.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return; // the temporary directory goes with `dir`
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
