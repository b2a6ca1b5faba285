//! End-to-end: the control plane's web console. A real headless Chromium (Debian's `chromium`)
//! opens the console of the quickstart's mesh (control plane, three sidecars, the example apps,
//! all real processes) and the test asserts on what a person sees there; screenshots go to
//! `target/tmp/console/`. Plain HTTP clients check the access rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mayfly_tests::bin;
use mayfly_tests::console::{Browser, ConsoleCa};

const WEB: &str = "spiffe://mayfly.local/web";
const DB: &str = "spiffe://mayfly.local/db";
const ORDERS: &str = "spiffe://mayfly.local/orders";

/// Where this test's screenshots go: `target/tmp/<test>/`, kept after the run.
fn output_dir(test: &str) -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The quickstart with `--keep-running`, stopped (SIGTERM: it cleans up) on drop.
struct Quickstart {
    child: Child,
    out: std::path::PathBuf,
}

impl Quickstart {
    fn start(dir: &Path) -> Self {
        let out = dir.join("stdout");
        let child = Command::new(bin("quickstart"))
            .args(["--ci", "--no-build", "--keep-running"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("start the quickstart");
        Self { child, out }
    }

    /// Waits (up to 5 minutes) for the tour to end and the mesh to be left running.
    fn wait_running(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let text = std::fs::read_to_string(&self.out).unwrap_or_default();
            if text.contains("Press Ctrl-C") {
                return text;
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                panic!("the quickstart exited ({s}):\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "the quickstart took over 5 minutes:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The word after `marker` on the first line that has it.
fn after<'a>(text: &'a str, marker: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim()))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {marker:?} in the quickstart's output:\n{text}"))
}

/// One request web -> db through web's sidecar (`KEYS order:` to the key-value store); the
/// answer, or what ended it.
fn web_to_db(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"KEYS order:\n");
    let mut answer = String::new();
    match s.read_to_string(&mut answer) {
        Ok(_) => answer,
        Err(e) => format!("{answer} ({e})"),
    }
}

/// Seconds in a countdown such as `9m58s`, `1h02m03s` or `42s`.
fn seconds(text: &str) -> u64 {
    let mut total = 0;
    let mut n = 0;
    for c in text.chars() {
        match c {
            '0'..='9' => n = n * 10 + u64::from(c.to_digit(10).unwrap()),
            'h' => (total, n) = (total + n * 3600, 0),
            'm' => (total, n) = (total + n * 60, 0),
            's' => (total, n) = (total + n, 0),
            _ => panic!("not a countdown: {text:?}"),
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sees_the_mesh_a_fresh_denial_and_a_grant_counting_down_in_a_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let shots = output_dir("console");
    let mut qs = Quickstart::start(tmp.path());
    let text = qs.wait_running();
    let console = after(&text, "Console: ").to_owned();
    assert!(console.starts_with("http://127.0.0.1:"), "{console}");
    let data_dir = after(&text, "export MAYFLY_DATA_DIR=").to_owned();
    let db_addr = text
        .lines()
        .find(|l| l.contains("# web -> db: denied"))
        .and_then(|l| l.split("| nc ").nth(1))
        .map(|rest| {
            let mut w = rest.split_whitespace();
            format!("{}:{}", w.next().unwrap(), w.next().unwrap())
        })
        .unwrap_or_else(|| panic!("no web -> db address:\n{text}"));

    let mut browser = Browser::launch().await;

    // The graph: the three identities, and web -> db drawn as a denied edge.
    browser.goto(&format!("{console}graph?window=15m")).await;
    let nodes = browser
        .eval("[...document.querySelectorAll('svg g.node text')].map(t => t.textContent).sort().join(' ')")
        .await;
    // The quickstart's three services, and the person who reached db in its people step
    // (present when Node.js ran the identity provider).
    let nodes: Vec<&str> = nodes.as_str().unwrap().split(' ').collect();
    let services: Vec<&str> = nodes
        .iter()
        .copied()
        .filter(|n| !n.starts_with("/user/"))
        .collect();
    assert_eq!(
        services,
        ["/db", "/orders", "/web"],
        "graph nodes: {nodes:?}"
    );
    assert!(
        nodes.len() == 3 || nodes.contains(&"/user/alice"),
        "graph nodes: {nodes:?}"
    );
    let denied = browser
        .eval(&format!(
            "(() => {{ const e = document.querySelector('svg g.edge.denied[data-caller=\"{WEB}\"][data-callee=\"{DB}\"]'); \
               return e ? e.querySelector('text').textContent : null; }})()"
        ))
        .await;
    let label = denied
        .as_str()
        .unwrap_or_else(|| panic!("no denied web -> db edge"));
    assert!(
        label.contains('✗'),
        "the edge's label shows its denials: {label}"
    );
    browser.screenshot(&shots.join("graph.png")).await;

    // Live: a denial made now appears within 2 s.
    browser.goto(&format!("{console}live?decision=deny")).await;
    let connected = mayfly_tests::eventually(Duration::from_secs(10), async || {
        browser
            .eval("document.getElementById('live-status').textContent")
            .await
            .as_str()
            .is_some_and(|s| s.starts_with("live"))
    })
    .await;
    assert!(connected, "the live view did not connect");
    let answer = web_to_db(&db_addr);
    assert!(
        !answer.contains("order:"),
        "web -> db was not denied: {answer}"
    );
    let denied_at = Instant::now();
    let mut seen = false;
    while denied_at.elapsed() < Duration::from_secs(2) {
        let rows = browser
            .eval("[...document.querySelectorAll('#live tbody tr')].map(r => r.textContent).join('\\n')")
            .await;
        let rows = rows.as_str().unwrap_or_default();
        if rows
            .lines()
            .any(|r| r.contains(WEB) && r.contains(DB) && r.contains("deny"))
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    browser.screenshot(&shots.join("live.png")).await;
    assert!(
        seen,
        "the denial did not appear in the live view within 2 s"
    );

    // Grants: a grant's countdown decreases.
    let out = Command::new(bin("mayfly-ca"))
        .args(["grant", "request", "--data-dir", &data_dir])
        .args(["--from", WEB, "--to", DB, "--ttl", "1m"])
        .args(["--reason", "console test <b>bold?</b>"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    browser.goto(&format!("{console}grants")).await;
    let read = "[...document.querySelectorAll('#grants tr.active .countdown')].map(c => c.textContent)[0] ?? null";
    let first = browser.eval(read).await.as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let second = browser.eval(read).await.as_str().unwrap().to_owned();
    assert!(
        seconds(&second) < seconds(&first) && seconds(&first) <= 60,
        "the countdown went from {first} to {second}"
    );
    let reason = browser
        .eval("document.querySelector('#grants tr.active td.reason').textContent")
        .await;
    assert_eq!(
        reason, "console test <b>bold?</b>",
        "the reason is shown as text"
    );
    browser.screenshot(&shots.join("grants.png")).await;

    // Audit search: the denials, and their chains verified.
    browser
        .goto(&format!("{console}audit?identity={WEB}&decision=deny"))
        .await;
    let chains = browser
        .eval("[...document.querySelectorAll('#chains tr.ok')].length")
        .await;
    assert!(chains.as_u64().unwrap() >= 1, "no verified chain shown");
    let broken = browser
        .eval("document.querySelectorAll('#chains tr.broken').length")
        .await;
    assert_eq!(broken, 0);
    browser.screenshot(&shots.join("audit.png")).await;
    browser.goto(&format!("{console}identities")).await;
    browser.screenshot(&shots.join("identities.png")).await;

    // What-if: the quickstart's policy without web-reads-orders would deny web's GETs to
    // orders, which the recorded traffic shows, and drops a rule that was used.
    let policy = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/quickstart-http.toml"),
    )
    .unwrap();
    let cut = policy
        .find("[[rule]]\nname = \"web-reads-orders\"")
        .unwrap();
    let rest = &policy[cut + 1..];
    let next = rest.find("[[rule]]").unwrap();
    let candidate = format!("{}{}", &policy[..cut], &rest[next..]);
    assert!(!candidate.contains("web-reads-orders"));
    browser.goto(&format!("{console}replay")).await;
    browser
        .eval(&format!(
            "document.getElementById('candidate').value = {}; \
             document.getElementById('replay-form').submit(); true",
            serde_json::to_string(&candidate).unwrap()
        ))
        .await;
    let reported = mayfly_tests::eventually(Duration::from_secs(20), async || {
        browser
            .eval("document.getElementById('replay-summary')?.textContent ?? null")
            .await
            .as_str()
            .is_some()
    })
    .await;
    assert!(reported, "no what-if report");
    let changes = browser
        .eval("[...document.querySelectorAll('#changes tr.change')].map(r => r.textContent).join('\\n')")
        .await;
    let changes = changes.as_str().unwrap();
    assert!(
        changes.lines().any(|r| r.contains("allow -> deny")
            && r.contains(WEB)
            && r.contains(ORDERS)
            && r.contains("GET")),
        "web -> orders GET is not reported as turning to deny: {changes}"
    );
    let removed = browser
        .eval("document.getElementById('removed')?.textContent ?? ''")
        .await;
    assert!(
        removed.as_str().unwrap().contains("web-reads-orders"),
        "the dropped rule is not reported: {removed}"
    );
    browser.screenshot(&shots.join("replay.png")).await;
    drop(browser);
    drop(qs);
}

fn init(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("ca");
    let out = Command::new(bin("mayfly-ca"))
        .args(["init", "--data-dir", data.to_str().unwrap()])
        .args(["--trust-domain", "mayfly.local"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    data
}

#[test]
fn a_console_on_a_non_loopback_address_without_tls_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let out = Command::new(bin("mayfly-ca"))
        .args(["run", "--data-dir", data.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--ui-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started:\n{err}");
    assert!(err.contains("not a loopback address"), "{err}");
}

fn mint(data: &Path, id: &str, out: &Path) {
    let o = Command::new(bin("mayfly-ca"))
        .args(["svid", "mint", "--data-dir", data.to_str().unwrap()])
        .args(["--spiffe-id", id, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `curl` with `dir`'s SVID (none when `dir` is `None`): (exit ok, status, body).
fn curl_as(url: &str, ca: &Path, dir: Option<&Path>) -> (bool, String, String) {
    let cacert = ca.join("bundle.pem");
    let mut args = vec![
        "-s".to_owned(),
        "-w".into(),
        "\n%{http_code}".into(),
        "--cacert".into(),
        cacert.display().to_string(),
    ];
    if let Some(d) = dir {
        args.extend([
            "--cert".into(),
            d.join("svid.pem").display().to_string(),
            "--key".into(),
            d.join("svid.key").display().to_string(),
        ]);
    }
    args.push(url.to_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, _) = mayfly_tests::curl(&args);
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", &out));
    (ok, status.to_owned(), body.to_owned())
}

#[test]
fn over_tls_the_console_opens_only_for_an_allowed_spiffe_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let alice = tmp.path().join("alice");
    let bob = tmp.path().join("bob");
    mint(&data, "spiffe://mayfly.local/user/alice", &alice);
    mint(&data, "spiffe://mayfly.local/user/bob", &bob);
    let ca = ConsoleCa::start(
        &data,
        &[
            "--metrics-listen",
            "off",
            "--ui-listen",
            "127.0.0.1:0",
            "--ui-tls",
            "--ui-allow",
            "spiffe://mayfly.local/user/alice",
        ],
    );
    let url = ca
        .url
        .clone()
        .unwrap_or_else(|| panic!("no console:\n{}", ca.log));
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let graph = format!("{url}graph");

    let (ok, status, body) = curl_as(&graph, &alice, Some(&alice));
    assert!(ok && status == "200", "alice: {status} {body}");
    assert!(body.contains("<h1>Mesh: last 1h</h1>"), "{body}");

    let (_, status, body) = curl_as(&graph, &alice, Some(&bob));
    assert_eq!(status, "403", "bob is not on the allow list: {body}");

    let (ok, status, _) = curl_as(&graph, &alice, None);
    assert!(!ok && status != "200", "no client certificate: {status}");
}

#[test]
fn console_pages_carry_a_strict_content_security_policy_and_their_render_time_is_measured() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init(tmp.path());
    let ca = ConsoleCa::start(
        &data,
        &[
            "--metrics-listen",
            "127.0.0.1:0",
            "--ui-listen",
            "127.0.0.1:0",
        ],
    );
    let url = ca
        .url
        .clone()
        .unwrap_or_else(|| panic!("no console:\n{}", ca.log));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let (ok, head, _) = mayfly_tests::curl(&["-si", &format!("{url}grants")]);
    assert!(ok, "{head}");
    let head = head.to_lowercase();
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self';",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "content-type: text/html; charset=utf-8",
    ] {
        assert!(head.contains(h), "no {h:?} in:\n{head}");
    }
    assert!(!head.contains("<script>"), "no inline script:\n{head}");
    let (_, js, _) = mayfly_tests::curl(&["-si", &format!("{url}assets/console.js")]);
    assert!(
        js.to_lowercase().contains("content-type: text/javascript"),
        "{js}"
    );
    let metrics = ca
        .log
        .lines()
        .find_map(|l| l.strip_prefix("mayfly-ca metrics on "))
        .unwrap_or_else(|| panic!("no metrics line:\n{}", ca.log))
        .trim()
        .to_owned();
    let (_, text, _) = mayfly_tests::curl(&[&metrics]);
    assert!(
        text.contains("mayfly_ca_request_duration_seconds_count{path=\"console:/grants\"} 1"),
        "{text}"
    );
}
