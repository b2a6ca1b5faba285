//! What a newcomer runs first, run as they would: the commands of `deploy/README.md` and the
//! injector manifest as written, a failed `init`, and the error and log texts they read (the
//! real binaries' stdout and stderr).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use mayfly_tests::{Ca, Sidecar, Spec, bin, policy};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ca(args: &[&str]) -> Output {
    Command::new(bin("mayfly-ca")).args(args).output().unwrap()
}

fn sidecar(args: &[&str]) -> Output {
    Command::new(bin("mayfly-sidecar"))
        .args(args)
        .output()
        .unwrap()
}

/// The lines of the first fenced code block line in `doc` that starts with `start`, with its
/// `\` continuation lines.
fn documented(doc: &str, start: &str) -> String {
    let mut lines = doc
        .lines()
        .skip_while(|l| !l.trim_start().starts_with(start));
    let mut out = String::new();
    for l in lines.by_ref() {
        out.push_str(l.trim());
        out.push('\n');
        if !l.trim_end().ends_with('\\') {
            break;
        }
    }
    assert!(!out.is_empty(), "no `{start}` in the document");
    out
}

/// A shell that finds the binaries just built first on its PATH, in `dir`.
fn sh(dir: &Path, script: &str, env: &[(&str, &str)]) -> Command {
    let bindir = bin("mayfly-sidecar").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bindir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("sh");
    c.args(["-ec", script])
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().copied());
    c
}

/// Starts `cmd`, returns it and the address of its `mayfly-sidecar webhook on ADDR` line
/// (panics with its stderr if none comes within 30 s).
fn webhook(mut cmd: Command) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => {
                if let Some(a) = l.strip_prefix("mayfly-sidecar webhook on ") {
                    return (child, a.trim().to_owned(), rx);
                }
                seen.push_str(&l);
                seen.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().unwrap();
                panic!("no webhook line ({status}):\n{seen}");
            }
        }
    }
}

/// `GET /healthz` on the webhook, verified against the certificate the README makes.
fn healthz(addr: &str, cert: &Path) -> String {
    let port = addr.rsplit(':').next().unwrap();
    let name = "mayfly-injector.mayfly-system.svc";
    let (ok, out, err) = mayfly_tests::curl(&[
        "--cacert",
        cert.to_str().unwrap(),
        "--resolve",
        &format!("{name}:{port}:127.0.0.1"),
        &format!("https://{name}:{port}/healthz"),
    ]);
    assert!(ok, "curl: {err}");
    out
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The pin of a fresh CA, as `mayfly-ca bundle show --format pin` prints it.
fn fresh_pin(dir: &Path) -> String {
    let d = dir.join("ca");
    let o = ca(&["init", "--data-dir", d.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = ca(&[
        "bundle",
        "show",
        "--format",
        "pin",
        "--data-dir",
        d.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout).trim().to_owned()
}

#[test]
fn the_deploy_readme_injector_commands_run_as_written() {
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pin = fresh_pin(dir);

    // Step 4, by hand: the serving certificate, with the README's openssl command.
    let openssl = documented(&readme, "openssl req -x509");
    let o = sh(dir, &openssl, &[]).output().unwrap();
    assert!(o.status.success(), "{openssl}: {}", text(&o.stderr));
    let cert = dir.join("tls.crt");

    // Step 6 without the webhook: `mayfly-sidecar inject --ca-pin "$PIN" FILE`, up to the pipe
    // into kubectl.
    let inject = documented(&readme, "mayfly-sidecar inject --ca-pin");
    let inject = inject.split('|').next().unwrap().trim();
    let o = sh(&root(), inject, &[("PIN", &pin)]).output().unwrap();
    assert!(o.status.success(), "{inject}: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("name: mayfly-sidecar"), "{inject}");

    // The synopsis of `inject serve`, with its placeholders filled in, and the documented
    // optional --listen on loopback.
    let synopsis = documented(&readme, "mayfly-sidecar inject serve");
    let first = synopsis.lines().next().unwrap();
    let required = first.split('[').next().unwrap();
    let filled = required
        .replace("PIN", &pin)
        .replace("--tls-cert FILE", "--tls-cert tls.crt")
        .replace("--tls-key FILE", "--tls-key tls.key");
    let line = format!("exec {filled} --listen 127.0.0.1:0");
    let (mut child, addr, _) = webhook(sh(dir, &line, &[]));
    assert!(healthz(&addr, &cert).contains("\"ok\":true"), "{line}");
    stop(&mut child);

    // The same options before `serve` work too.
    let line = format!(
        "exec mayfly-sidecar inject --ca-pin {pin} serve --tls-cert tls.crt --tls-key tls.key --listen 127.0.0.1:0"
    );
    let (mut child, addr, _) = webhook(sh(dir, &line, &[]));
    assert!(healthz(&addr, &cert).contains("\"ok\":true"), "{line}");
    stop(&mut child);

    // Without a pin: a usage error that names the option, not a clap internal name.
    let o = sh(
        dir,
        "mayfly-sidecar inject serve --tls-cert tls.crt --tls-key tls.key",
        &[],
    )
    .env_remove("MAYFLY_CA_PIN")
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("--ca-pin"), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("ca_pin"), "{}", text(&o.stderr));
}

/// The `args` of the first container in a manifest (the list under `args:`).
fn manifest_args(yaml: &str) -> Vec<String> {
    yaml.lines()
        .skip_while(|l| l.trim() != "args:")
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .collect()
}

#[test]
fn the_injector_manifest_args_start_the_webhook_and_it_logs_json() {
    let yaml = std::fs::read_to_string(root().join("deploy/kubernetes/30-injector.yaml")).unwrap();
    let args = manifest_args(&yaml);
    assert_eq!(args[..2], ["inject", "serve"], "{args:?}");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pin = fresh_pin(dir);
    let readme = std::fs::read_to_string(root().join("deploy/README.md")).unwrap();
    let o = sh(dir, &documented(&readme, "openssl req -x509"), &[])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    // As the pod runs it: the pin from the environment, the Secret's files where it mounts them
    // (here: the temporary directory), on loopback.
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("/etc/mayfly/tls/", &format!("{}/", dir.display()))
                .replace("--listen=0.0.0.0:9443", "--listen=127.0.0.1:0")
        })
        .collect();
    let mut cmd = Command::new(bin("mayfly-sidecar"));
    cmd.args(&args)
        .env("MAYFLY_CA_PIN", &pin)
        .env("RUST_LOG", "debug");
    let (mut child, addr, lines) = webhook(cmd);
    assert!(healthz(&addr, &dir.join("tls.crt")).contains("\"ok\":true"));
    // Something to log: a client that does not speak TLS.
    use std::io::Write;
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook logged nothing");
    stop(&mut child);
    for l in std::iter::once(line).chain(lines.try_iter()) {
        let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string(), "{l}");
    }
}

#[test]
fn a_failed_init_leaves_nothing_behind_and_init_then_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let o = ca(&[
        "init",
        "--data-dir",
        fresh.to_str().unwrap(),
        "--intermediate-ttl",
        "1h",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("intermediate TTL"),
        "{}",
        text(&o.stderr)
    );
    assert!(
        !fresh.exists(),
        "init created {} and left it",
        fresh.display()
    );

    // A directory that existed before (a volume, a systemd StateDirectory) stays, empty.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let d = existing.to_str().unwrap();
    let o = ca(&["init", "--data-dir", d, "--intermediate-ttl", "1h"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);
    // Every command agrees: no CA there, and init now works.
    let o = ca(&["ca", "status", "--data-dir", d]);
    assert!(
        text(&o.stderr).contains("holds no mayfly CA"),
        "{}",
        text(&o.stderr)
    );
    let o = ca(&["init", "--data-dir", d]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = ca(&["ca", "status", "--data-dir", d, "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = ca(&["init", "--data-dir", d]);
    assert!(text(&o.stderr).contains("already holds a mayfly CA"));
    let o = ca(&["init", "--data-dir", d, "--exist-ok"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn a_busy_port_is_reported_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    assert!(
        ca(&["init", "--data-dir", d.to_str().unwrap()])
            .status
            .success()
    );
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let o = ca(&[
        "run",
        "--data-dir",
        d.to_str().unwrap(),
        "--listen",
        &addr,
        "--metrics-listen",
        "off",
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");

    // The sidecar's admin listener on the same busy port.
    let cfg = tmp.path().join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "spiffe_id = \"spiffe://mayfly.local/web\"\n\
             [control_plane]\naddress = \"127.0.0.1:9\"\ntoken_file = \"t\"\n\
             [admin]\nlisten = \"{addr}\"\n\
             [[outbound]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\nremote = \"127.0.0.1:9\"\n\
             spiffe_id = \"spiffe://mayfly.local/x\"\n"
        ),
    )
    .unwrap();
    let o = sidecar(&["run", "--config", cfg.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
}

fn bad_policy(dir: &Path) -> PathBuf {
    let p = dir.join("bad.toml");
    std::fs::write(
        &p,
        "version = 1\n\n[[rule]]\nname = \"x\"\nfrom = [\"spiffe://a/b\"]\nto = [\"nope\"]\n",
    )
    .unwrap();
    p
}

#[test]
fn policy_check_says_error_once_per_finding() {
    let tmp = tempfile::tempdir().unwrap();
    let p = bad_policy(tmp.path());
    let o = ca(&["policy", "check", p.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("{}:6:7: error: ", p.display())),
        "{err}"
    );
    assert_eq!(err.matches("error").count(), 1, "{err}");
}

#[test]
fn a_capitalised_trust_domain_is_called_an_invalid_trust_domain() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("ca");
    let o = ca(&[
        "init",
        "--data-dir",
        d.to_str().unwrap(),
        "--trust-domain",
        "Example.org",
    ]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid trust domain \"Example.org\""),
        "{err}"
    );
    assert!(err.contains("\"example.org\""), "{err}");
    assert!(!err.contains("SPIFFE ID"), "{err}");
    assert!(!d.exists());
}

#[test]
fn every_result_command_prints_json_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // policy check: ok and failing.
    let good = dir.join("good.toml");
    std::fs::write(&good, policy(&[("web", "orders")])).unwrap();
    let o = ca(&["policy", "check", "--json", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["rules"], 1);
    let bad = bad_policy(dir);
    let o = ca(&["policy", "check", "--json", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["errors"][0]["line"], 6);
    assert_eq!(v["errors"][0]["severity"], "error");
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
    // policy explain.
    let o = ca(&[
        "policy",
        "explain",
        "--json",
        "--policy",
        good.to_str().unwrap(),
        "--from",
        "spiffe://mayfly.local/web",
        "--to",
        "spiffe://mayfly.local/orders",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["decision"]["allow"], true, "{v:#}");
    assert_eq!(v["decision"]["decided_by"]["rule"], "r0", "{v:#}");
    assert_eq!(v["steps"][0]["matched"], true, "{v:#}");
    // svid mint.
    let d = dir.join("ca");
    assert!(
        ca(&["init", "--data-dir", d.to_str().unwrap()])
            .status
            .success()
    );
    let out = dir.join("minted");
    let o = ca(&[
        "svid",
        "mint",
        "--json",
        "--data-dir",
        d.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://mayfly.local/batch",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://mayfly.local/batch");
    assert!(
        Path::new(v["files"]["key"].as_str().unwrap()).exists(),
        "{v:#}"
    );
    // sidecar check: ok and failing.
    let cfg = dir.join("s.toml");
    std::fs::write(
        &cfg,
        format!(
            "spiffe_id = \"spiffe://mayfly.local/web\"\n\
             [control_plane]\naddress = \"127.0.0.1:9\"\ntoken_file = \"t\"\n\
             [policy]\nfile = \"{}\"\n\
             [[outbound]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\nremote = \"127.0.0.1:9\"\n\
             spiffe_id = \"spiffe://mayfly.local/x\"\n",
            good.display()
        ),
    )
    .unwrap();
    let o = sidecar(&["check", "--json", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    std::fs::write(&cfg, "spiffe_id = 1\n").unwrap();
    let o = sidecar(&["check", "--json", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v:#}");
    assert!(v["error"].as_str().unwrap().contains("spiffe_id"), "{v:#}");
}

#[test]
fn both_binaries_print_completions_and_a_manual_page_and_spell_the_log_flag_alike() {
    for name in ["mayfly-ca", "mayfly-sidecar"] {
        let run = |args: &[&str]| Command::new(bin(name)).args(args).output().unwrap();
        let o = run(&["completions", "bash"]);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        // bash accepts the script and registers the completion.
        let script = text(&o.stdout);
        let check = Command::new("bash")
            .args(["-c", &format!("{script}\ncomplete -p {name}")])
            .output()
            .unwrap();
        assert!(check.status.success(), "{name}: {}", text(&check.stderr));
        for shell in ["zsh", "fish"] {
            let o = run(&["completions", shell]);
            assert!(o.status.success() && !o.stdout.is_empty(), "{name} {shell}");
        }
        let o = run(&["man"]);
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let page = text(&o.stdout);
        assert!(page.contains(&format!(".TH {name} 1")), "{page}");
        assert!(page.contains("run"), "{page}");
        let o = run(&["run", "--help"]);
        let help = text(&o.stdout);
        assert!(help.contains("--log-format <LOG_FORMAT>"), "{name}: {help}");
        assert!(!help.contains("--log-json"), "{name}: {help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_listings_read_as_text() {
    let tmp = Arc::new(tempfile::tempdir().unwrap());
    let dir = tmp.path();
    let ca_proc = Ca::start(&tmp);
    // An empty grant list says so.
    let o = ca(&["grant", "list", "--data-dir", ca_proc.dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(o.stdout.is_empty());
    assert_eq!(text(&o.stderr), "no grants\n");

    let pol = dir.join("policy.toml");
    std::fs::write(&pol, policy(&[("web", "orders")])).unwrap();
    let app = mayfly_tests::echo_app("orders").await;
    let token = ca_proc.token_file("spiffe://mayfly.local/orders", &dir.join("o.token"));
    let spec = Spec {
        me: "orders",
        ca: &ca_proc.addr,
        token: &token,
        policy: &pol,
        inbound_app: Some(&app),
        outbound: &[],
        svid_ttl: None,
        extra: "",
    };
    let mut s = Sidecar::start(dir, "orders", &spec.toml());
    let inbound = s.inbound();
    s.wait_ready().await;
    let log = s.proc.log();
    let started = log
        .lines()
        .find(|l| l.contains("sidecar started"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(started.contains(&format!("inbound={inbound}")), "{started}");
    assert!(!started.contains("Some("), "{started}");
    // Standard error is a pipe here: no colour codes from either binary.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    let ca_log = ca_proc.proc.as_ref().unwrap().log();
    assert!(!ca_log.contains('\u{1b}'), "{ca_log:?}");
}
