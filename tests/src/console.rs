//! Harness for the console tests: a headless Chromium driven over the DevTools protocol (its
//! WebSocket, JSON commands), and a control plane whose console address is read from its
//! start-up line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The Chromium binary: `MAYFLY_CHROMIUM`, else Debian's `chromium`.
pub fn chromium_path() -> String {
    std::env::var("MAYFLY_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// A headless Chromium with one page, killed on drop.
pub struct Browser {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium (`--headless=new`, a temporary profile, `--no-sandbox` since tests run
    /// as root) and opens a page.
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium_path())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (apt-get install chromium): {e}",
                    chromium_path()
                )
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("Chromium printed no DevTools address within 30 s");
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let mut b = Self {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let target = b
            .call(
                "Target.createTarget",
                json!({ "url": "about:blank" }),
                false,
            )
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = b
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
                false,
            )
            .await;
        b.session = attached["sessionId"].as_str().unwrap().to_owned();
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
            true,
        )
        .await;
        b
    }

    /// Sends a command (to the page's session when `page`) and returns its result; events
    /// read meanwhile are skipped.
    pub async fn call(&mut self, method: &str, params: Value, page: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if page {
            msg["sessionId"] = Value::from(self.session.clone());
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"));
            let Some(Ok(Message::Text(text))) = next else {
                if next.is_none() {
                    panic!("the DevTools connection closed during {method}");
                }
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap();
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
                true,
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Opens `url` and waits (up to 20 s) until the document has loaded.
    pub async fn goto(&mut self, url: &str) {
        let r = self
            .call("Page.navigate", json!({ "url": url }), true)
            .await;
        assert!(r.get("errorText").is_none(), "cannot open {url}: {r}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let state = self
                .eval("document.location.href + ' ' + document.readyState")
                .await;
            let state = state.as_str().unwrap_or_default().to_owned();
            if state.starts_with(url) && state.ends_with("complete") {
                return;
            }
            assert!(Instant::now() < deadline, "{url} did not load: {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Saves a PNG of the page to `path`.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
                true,
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mayfly-ca run` on an initialised data directory with console flags (and `--metrics-listen`); its stderr is read
/// until the `mayfly-ca console on URL` line (or the process exits).
pub struct ConsoleCa {
    pub child: Child,
    /// The console's URL (`http://` or `https://`, ending in `/`), if it printed one.
    pub url: Option<String>,
    /// Everything it printed until then.
    pub log: String,
}

impl ConsoleCa {
    pub fn start(data_dir: &Path, flags: &[&str]) -> Self {
        let mut child = Command::new(crate::bin("mayfly-ca"))
            .args(["run", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut log = String::new();
        let mut url = None;
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
            log.push_str(&line);
            log.push('\n');
            if let Some(u) = line.strip_prefix("mayfly-ca console on ") {
                url = Some(u.trim().to_owned());
                break;
            }
        }
        Self { child, url, log }
    }
}

impl Drop for ConsoleCa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
