//! An injected pod's HTTP probes, end to end: `mayfly-sidecar inject` rewrites them to the
//! sidecar's admin port, and the real sidecar, started with the environment the injector set,
//! forwards them to the app on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use mayfly_tests::{Sidecar, bin, free_port, http_app, http_get};
use serde_json::Value;

const PIN: &str = "3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f";

fn inject(yaml: &str) -> Value {
    let mut child = Command::new(bin("mayfly-sidecar"))
        .args(["inject", "-", "--ca-pin", PIN])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    mayfly_inject::parse_documents(&text).unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pods_http_probes_reach_the_app_on_loopback_through_the_sidecar() {
    let app = http_app("web").await;
    let app_port = app.rsplit(':').next().unwrap();
    let gone = free_port();
    let gone_port = gone.rsplit(':').next().unwrap();
    let pod = inject(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: shop}}\nspec:\n  containers:\n  - name: web\n    image: web\n    ports: [{{name: http, containerPort: {app_port}}}]\n    livenessProbe: {{httpGet: {{path: /healthz, port: http}}}}\n    readinessProbe: {{httpGet: {{path: /ready, port: {gone_port}}}}}\n"
    ));
    let web = &pod["spec"]["containers"][0];
    let live = &web["livenessProbe"]["httpGet"];
    let ready = &web["readinessProbe"]["httpGet"];
    assert_eq!(live["port"], 15000);
    assert_eq!(ready["port"], 15000);
    let sidecar = &pod["spec"]["initContainers"][0];
    let env = |name: &str| {
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {name} in {sidecar:#}"))
            .to_owned()
    };
    let probes = env("MAYFLY_APP_PROBES");

    // The sidecar as the pod runs it, but on loopback port 0 (its identity is not needed for
    // the admin listener).
    let tmp = tempfile::tempdir().unwrap();
    let config = "spiffe_id = \"spiffe://mayfly.local/web\"\n[control_plane]\naddress = \"127.0.0.1:9\"\ntoken_file = \"t\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[[outbound]]\nname = \"x\"\nlisten = \"127.0.0.1:0\"\nremote = \"127.0.0.1:9\"\nspiffe_id = \"spiffe://mayfly.local/x\"\n";
    let s = Sidecar::start_env(
        tmp.path(),
        "web",
        config,
        &[("MAYFLY_APP_PROBES", probes.as_str())],
    );
    let (status, body) = http_get(&s.admin, live["path"].as_str().unwrap()).await;
    assert_eq!(status, 200, "{body}");
    // The app is not listening on the readiness port: not ready, with the reason.
    let (status, body) = http_get(&s.admin, ready["path"].as_str().unwrap()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("127.0.0.1:{gone_port}/ready")),
        "{body}"
    );
    // Only the injected routes: nothing else is forwarded.
    let (status, _) = http_get(&s.admin, "/app-health/web/other").await;
    assert_eq!(status, 404);

    // A bad mapping is a configuration error before anything listens.
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = Command::new(bin("mayfly-sidecar"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env(
            "MAYFLY_APP_PROBES",
            "{\"/elsewhere\": {\"port\": 1, \"path\": \"/\"}}",
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAYFLY_APP_PROBES"));
}
