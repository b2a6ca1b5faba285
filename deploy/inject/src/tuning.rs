//! Per-pod settings of the sidecar (annotations), Prometheus scrape annotations, and the
//! rewriting of the app's HTTP probes through the sidecar's admin listener.
//!
//! Probes: the app is told to listen on loopback, so a kubelet probe of `<pod IP>:<port>`
//! fails. Each `httpGet` liveness, readiness and startup probe of an app container becomes
//! `GET <admin port>/app-health/<container>/<livez|readyz|startupz>`, and the sidecar's admin
//! listener forwards that to `127.0.0.1:<port><path>` (see `mayfly_sidecar::admin`), as Istio does. The
//! mapping travels in the sidecar's [`APP_PROBES_ENV`] variable. Probes with a `host`, HTTPS
//! probes and `tcpSocket`/`exec`/`grpc` probes are left as they are.

use serde_json::{Map, Value, json};

use crate::probes::{APP_HEALTH_PREFIX, APP_PROBES_ENV, AppProbe};
use crate::{ADMIN_PORT, ProbeProblem, Reason};

/// Annotation: the sidecar image for this pod (default: the injector's `--image`).
pub const ANNOTATION_IMAGE: &str = "mayfly.io/sidecar-image";
/// Annotation: the sidecar's CPU request (a Kubernetes quantity, default `50m`).
pub const ANNOTATION_CPU: &str = "mayfly.io/sidecar-cpu";
/// Annotation: the sidecar's memory request (default `16Mi`).
pub const ANNOTATION_MEMORY: &str = "mayfly.io/sidecar-memory";
/// Annotation: the sidecar's CPU limit (default none).
pub const ANNOTATION_CPU_LIMIT: &str = "mayfly.io/sidecar-cpu-limit";
/// Annotation: the sidecar's memory limit (default `64Mi`).
pub const ANNOTATION_MEMORY_LIMIT: &str = "mayfly.io/sidecar-memory-limit";
/// Annotation: the sidecar's log filter (`RUST_LOG`: `debug`, `info,mayfly_sidecar=debug`).
pub const ANNOTATION_LOG_LEVEL: &str = "mayfly.io/sidecar-log-level";

/// A Kubernetes resource quantity (`50m`, `0.5`, `64Mi`, `1G`, `1e3`).
fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits_end);
    let num_ok = !num.is_empty()
        && num.matches('.').count() <= 1
        && num != "."
        && num.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()));
    num_ok && suffix_ok && s.len() <= 32
}

fn string_annotation<'a>(
    ann: &'a Map<String, Value>,
    key: &'static str,
) -> Result<Option<&'a str>, Reason> {
    match ann.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim())),
        Some(_) => Err(Reason::NotAString { key }),
    }
}

/// Applies the sidecar annotations to the container the injector built.
pub(super) fn apply_annotations(
    container: &mut Value,
    ann: &Map<String, Value>,
) -> Result<(), Reason> {
    if let Some(image) = string_annotation(ann, ANNOTATION_IMAGE)? {
        if image.is_empty() || image.chars().any(char::is_whitespace) {
            return Err(Reason::Image {
                key: ANNOTATION_IMAGE,
            });
        }
        container["image"] = image.into();
    }
    for (key, section, resource) in [
        (ANNOTATION_CPU, "requests", "cpu"),
        (ANNOTATION_MEMORY, "requests", "memory"),
        (ANNOTATION_CPU_LIMIT, "limits", "cpu"),
        (ANNOTATION_MEMORY_LIMIT, "limits", "memory"),
    ] {
        if let Some(q) = string_annotation(ann, key)? {
            if !is_quantity(q) {
                return Err(Reason::NotAQuantity {
                    key,
                    value: q.to_owned(),
                });
            }
            container["resources"][section][resource] = q.into();
        }
    }
    if let Some(filter) = string_annotation(ann, ANNOTATION_LOG_LEVEL)? {
        let ok = !filter.is_empty()
            && filter.len() <= 256
            && filter
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_=,:.-".contains(&b));
        if !ok {
            return Err(Reason::LogFilter {
                key: ANNOTATION_LOG_LEVEL,
            });
        }
        push_env(container, "RUST_LOG", filter.into());
    }
    Ok(())
}

fn push_env(container: &mut Value, name: &str, value: Value) {
    if let Some(env) = container["env"].as_array_mut() {
        env.push(json!({ "name": name, "value": value }));
    }
}

/// The pod annotations that make Prometheus (annotation-based discovery) scrape the sidecar's
/// admin port, unless the pod already carries `prometheus.io/*` annotations of its own (the
/// app's metrics win: there is one set per pod).
pub(super) fn prometheus_annotations(ann: &Map<String, Value>) -> Vec<(&'static str, String)> {
    if ann.keys().any(|k| k.starts_with("prometheus.io/")) {
        return Vec::new();
    }
    vec![
        ("prometheus.io/scrape", "true".into()),
        ("prometheus.io/port", ADMIN_PORT.to_string()),
        ("prometheus.io/path", "/metrics".into()),
    ]
}

/// One probe to rewrite: app container index, probe field, the new probe's `httpGet`.
pub(super) struct ProbeRewrite {
    pub(super) container: usize,
    pub(super) field: &'static str,
    pub(super) http_get: Value,
}

const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// Plans the probe rewrites of the app containers: the rewrites, and the mapping the sidecar
/// serves (`/app-health/...` -> loopback port and path).
pub(super) fn plan_probes(spec: &Value) -> Result<(Vec<ProbeRewrite>, Map<String, Value>), Reason> {
    let mut rewrites = Vec::new();
    let mut mapping = Map::new();
    let containers = spec.get("containers").and_then(Value::as_array);
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        for (field, kind) in PROBES {
            let Some(get) = c.get(field).and_then(|p| p.get("httpGet")) else {
                continue;
            };
            let host = get.get("host").and_then(Value::as_str).unwrap_or_default();
            let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
            if !host.is_empty() || !scheme.eq_ignore_ascii_case("HTTP") {
                continue;
            }
            let problem = |problem| Reason::Probe {
                container: name.to_owned(),
                field,
                problem,
            };
            let port = probe_port(c, get.get("port")).map_err(problem)?;
            let path = get.get("path").and_then(Value::as_str).unwrap_or("/");
            if !path.starts_with('/') {
                return Err(problem(ProbeProblem::Path(path.to_owned())));
            }
            let headers: Vec<(String, String)> = get
                .get("httpHeaders")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|h| {
                    Some((
                        h.get("name")?.as_str()?.to_owned(),
                        h.get("value")?.as_str()?.to_owned(),
                    ))
                })
                .collect();
            let route = format!("{APP_HEALTH_PREFIX}{name}/{kind}");
            let probe = AppProbe {
                port,
                path: path.to_owned(),
                headers,
            };
            let probe =
                serde_json::to_value(&probe).map_err(|e| Reason::EncodeProbes(e.to_string()))?;
            mapping.insert(route.clone(), probe);
            rewrites.push(ProbeRewrite {
                container: i,
                field,
                http_get: json!({ "path": route, "port": ADMIN_PORT, "scheme": "HTTP" }),
            });
        }
    }
    Ok((rewrites, mapping))
}

/// A probe's port: a number, or the name of one of the container's ports.
fn probe_port(container: &Value, port: Option<&Value>) -> Result<u16, ProbeProblem> {
    match port {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| ProbeProblem::NotAPort(n.to_string())),
        Some(Value::String(s)) => {
            if let Ok(n) = s.parse::<u16>() {
                return Ok(n);
            }
            container
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(s.as_str()))
                .and_then(|p| p.get("containerPort")?.as_u64())
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| ProbeProblem::NoSuchPort(s.clone()))
        }
        _ => Err(ProbeProblem::NoPort),
    }
}

/// The sidecar's environment entry carrying the probe mapping (when there is one).
pub(super) fn probes_env(container: &mut Value, mapping: Map<String, Value>) {
    if !mapping.is_empty() {
        push_env(
            container,
            APP_PROBES_ENV,
            Value::Object(mapping).to_string().into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{InjectOptions, inject_object};

    const PIN: &str = "3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f3f9c2a10aa0b1c2d3e4f5a6b7c8d9e0f";

    fn pod(annotations: Value, container: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "n", "annotations": annotations},
            "spec": {"containers": [container]}})
    }

    fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
        c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
    }

    #[test]
    fn annotations_set_the_sidecars_image_resources_and_log_level() {
        let mut p = pod(
            json!({ANNOTATION_IMAGE: "registry.local/sidecar:1", ANNOTATION_CPU: "100m",
                   ANNOTATION_MEMORY: "32Mi", ANNOTATION_CPU_LIMIT: "1",
                   ANNOTATION_MEMORY_LIMIT: "0.5Gi", ANNOTATION_LOG_LEVEL: "info,mayfly_sidecar=debug"}),
            json!({"name": "a", "ports": [{"containerPort": 80}]}),
        );
        inject_object(
            &mut p,
            &InjectOptions::new(PIN, crate::tests::check_config),
            None,
        )
        .unwrap();
        let c = &p["spec"]["initContainers"][0];
        assert_eq!(c["image"], "registry.local/sidecar:1");
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "100m", "memory": "32Mi"},
                   "limits": {"cpu": "1", "memory": "0.5Gi"}})
        );
        assert_eq!(env(c, "RUST_LOG"), Some("info,mayfly_sidecar=debug"));
        // The admin port is announced to annotation-based Prometheus discovery.
        let ann = &p["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], "15000");
        assert_eq!(ann["prometheus.io/path"], "/metrics");
    }

    #[test]
    fn bad_annotations_are_refused_and_the_apps_own_scrape_annotations_stay() {
        for (k, v) in [
            (ANNOTATION_CPU, "lots"),
            (ANNOTATION_MEMORY_LIMIT, "64 Mi"),
            (ANNOTATION_IMAGE, "a b"),
            (ANNOTATION_LOG_LEVEL, "debug; rm -rf"),
        ] {
            let mut p = pod(
                json!({k: v}),
                json!({"name": "a", "ports": [{"containerPort": 80}]}),
            );
            let e = inject_object(
                &mut p,
                &InjectOptions::new(PIN, crate::tests::check_config),
                None,
            )
            .unwrap_err();
            assert!(e.to_string().contains(k), "{k}: {e}");
        }
        let mut p = pod(
            json!({"prometheus.io/port": "9090"}),
            json!({"name": "a", "ports": [{"containerPort": 80}]}),
        );
        inject_object(
            &mut p,
            &InjectOptions::new(PIN, crate::tests::check_config),
            None,
        )
        .unwrap();
        let ann = &p["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/port"], "9090");
        assert!(ann.get("prometheus.io/scrape").is_none());
    }

    #[test]
    fn http_probes_go_through_the_admin_listener_to_the_apps_loopback_port() {
        let mut p = pod(
            json!({}),
            json!({"name": "web", "ports": [{"name": "http", "containerPort": 8080}],
                "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 7},
                "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": 8081,
                                   "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
                "startupProbe": {"tcpSocket": {"port": 8080}}}),
        );
        inject_object(
            &mut p,
            &InjectOptions::new(PIN, crate::tests::check_config),
            None,
        )
        .unwrap();
        let app = &p["spec"]["containers"][0];
        assert_eq!(
            app["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/livez", "port": 15000, "scheme": "HTTP"}, "periodSeconds": 7})
        );
        assert_eq!(
            app["readinessProbe"]["httpGet"]["path"],
            "/app-health/web/readyz"
        );
        assert_eq!(app["startupProbe"], json!({"tcpSocket": {"port": 8080}}));
        let sidecar = &p["spec"]["initContainers"][0];
        let probes = crate::probes::parse_app_probes(env(sidecar, APP_PROBES_ENV)).unwrap();
        assert_eq!(probes.len(), 2);
        assert_eq!(
            probes["/app-health/web/livez"],
            AppProbe {
                port: 8080,
                path: "/livez".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            probes["/app-health/web/readyz"],
            AppProbe {
                port: 8081,
                path: "/ready?full=1".into(),
                headers: vec![("X-Probe".into(), "1".into())]
            }
        );
    }

    #[test]
    fn probes_to_another_host_or_https_are_left_and_unknown_port_names_refused() {
        let c = json!({"name": "a", "ports": [{"containerPort": 80}],
            "livenessProbe": {"httpGet": {"path": "/", "port": 80, "host": "10.0.0.1"}},
            "readinessProbe": {"httpGet": {"path": "/", "port": 443, "scheme": "HTTPS"}}});
        let mut p = pod(json!({}), c.clone());
        inject_object(
            &mut p,
            &InjectOptions::new(PIN, crate::tests::check_config),
            None,
        )
        .unwrap();
        assert_eq!(p["spec"]["containers"][0], c);
        assert!(env(&p["spec"]["initContainers"][0], APP_PROBES_ENV).is_none());
        let mut p = pod(
            json!({}),
            json!({"name": "a", "ports": [{"containerPort": 80}],
                "livenessProbe": {"httpGet": {"path": "/", "port": "metrics"}}}),
        );
        let e = inject_object(
            &mut p,
            &InjectOptions::new(PIN, crate::tests::check_config),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"metrics\" names no port"), "{e}");
    }
}
