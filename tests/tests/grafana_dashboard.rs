//! `deploy/grafana/mayfly.json` against a running mesh: the dashboard has Grafana's essentials,
//! every query parses as PromQL (`promtool check rules`) and names only metrics a real sidecar
//! or control plane exposes; the `/metrics` of both pass `promtool check metrics`, with the
//! request histogram, requests by decision and status class, `mayfly_build_info` and the
//! process metrics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashSet};

use mayfly_tests::mesh::Pair;
use mayfly_tests::{curl, free_port};
use serde_json::Value;

const POLICY: &str = r#"version = 1
[[rule]]
name = "web-reads-orders"
from = ["spiffe://mayfly.local/web"]
to = ["spiffe://mayfly.local/orders"]
methods = ["GET"]
"#;

/// `promtool check metrics` passes on `text` (silence is success).
fn check_metrics(what: &str, text: &str) {
    if let Some((ok, out)) = mayfly_tests::observe::promtool(&["check", "metrics"], text) {
        assert!(
            ok && out.trim().is_empty(),
            "promtool check metrics on {what}:\n{out}\n--- input\n{text}"
        );
    }
}

async fn get(url: String) -> String {
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) = curl(&[&url]);
        assert!(ok, "{url}: {err}");
        out
    })
    .await
    .unwrap()
}

/// The metric names an exposition declares (`# TYPE`) or has samples of.
fn names(text: &str) -> HashSet<String> {
    let mut set = HashSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            set.insert(n.to_owned());
        }
    }
    set
}

/// The metric names a PromQL expression uses: identifiers that start like ours or the
/// standard process metrics (label names and functions never do).
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("mayfly_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/mayfly.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn the_dashboard_has_grafanas_essentials_and_every_query_parses_as_promql() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "{}",
        d["schemaVersion"]
    );
    assert!(d["title"].is_string() && d["uid"].is_string());
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut ids = HashSet::new();
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id {}",
            p["id"]
        );
        assert!(p["type"].is_string() && p["title"].is_string(), "{p}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{p}");
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p}");
        let mut refs = HashSet::new();
        for t in targets {
            assert!(refs.insert(t["refId"].as_str().unwrap()), "{p}");
            let expr = t["expr"].as_str().unwrap();
            assert!(!metric_names(expr).is_empty(), "{expr}");
            // Grafana's own variable, as Prometheus would see it once substituted.
            let promql = expr.replace("$__rate_interval", "5m");
            rules.push_str(&format!(
                "  - record: panel_{}_{}\n    expr: {}\n",
                p["id"],
                t["refId"].as_str().unwrap(),
                serde_json::to_string(&promql).unwrap()
            ));
        }
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rules).unwrap();
    if let Some((ok, out)) =
        mayfly_tests::observe::promtool(&["check", "rules", file.path().to_str().unwrap()], "")
    {
        assert!(ok, "promtool check rules:\n{out}\n--- rules\n{rules}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_metric_is_exposed_by_a_running_mesh_whose_metrics_pass_promtool() {
    let metrics = free_port();
    let Pair {
        ca: _ca,
        web,
        orders,
        out,
        ..
    } = Pair::http()
        .policy(POLICY)
        .ca_flags(&["--metrics-listen", &metrics])
        .start()
        .await;
    let url = format!("http://{out}/orders/1");
    let (ok, codes, err) = tokio::task::spawn_blocking(move || {
        let w = ["-o", "/dev/null", "-w", "%{http_code} "];
        let mut args: Vec<&str> = w.to_vec();
        args.extend([url.as_str(), "--next"]);
        args.extend(w);
        args.extend(["-X", "POST", url.as_str()]);
        curl(&args)
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(codes.trim(), "200 403");

    let web_text = web.admin_get("/metrics").await.1;
    let orders_text = orders.admin_get("/metrics").await.1;
    let ca_text = get(format!("http://{metrics}/metrics")).await;
    let to = "peer=\"spiffe://mayfly.local/orders\"";
    for line in [
        format!(
            "mayfly_requests_total{{direction=\"outbound\",{to},decision=\"allow\",class=\"2xx\"}} 1"
        ),
        format!(
            "mayfly_requests_total{{direction=\"outbound\",{to},decision=\"deny\",class=\"4xx\"}} 1"
        ),
        format!("mayfly_request_duration_seconds_count{{direction=\"outbound\",{to}}} 2"),
    ] {
        assert!(web_text.contains(&line), "{line}\n{web_text}");
    }
    let from = "peer=\"spiffe://mayfly.local/web\"";
    let line = format!(
        "mayfly_requests_total{{direction=\"inbound\",{from},decision=\"allow\",class=\"2xx\"}} 1"
    );
    assert!(orders_text.contains(&line), "{line}\n{orders_text}");
    for (what, text) in [
        ("web", &web_text),
        ("orders", &orders_text),
        ("the control plane", &ca_text),
    ] {
        for name in [
            "mayfly_build_info",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(names(text).contains(name), "{what}: no {name}\n{text}");
        }
        check_metrics(what, text);
    }

    let exposed: HashSet<String> = [&web_text, &orders_text, &ca_text]
        .into_iter()
        .flat_map(|t| names(t))
        .collect();
    for p in dashboard()["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for name in metric_names(expr) {
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exposed.contains(&name) || exposed.contains(family),
                    "panel {:?} uses {name}, which no /metrics exposes",
                    p["title"]
                );
            }
        }
    }
}
