//! Kubernetes injection for mayfly, behind `mayfly-sidecar inject`: adds the sidecar to
//! Kubernetes workloads, one object at a time, as a CLI filter over YAML ([`inject_yaml`]) and
//! as a mutating admission webhook ([`webhook`]). Both run [`inject_object`] on a generic JSON
//! tree, so fields this code does not know survive.
//!
//! Deployment tooling, kept out of the data plane's library: this crate does not depend on
//! `mayfly-sidecar`. The sidecar's admin listener imports the probe contract from [`probes`];
//! the sidecar configuration the injector generates is checked by the function the caller
//! passes in [`InjectOptions::check_config`] (the binary passes the sidecar's own parser).
//!
//! What a pod gets (see `deploy/README.md`):
//! - the sidecar as a **native sidecar**: the first `initContainers` entry, `restartPolicy:
//!   Always`, with a startup probe on `/readyz` so the app containers start only once the
//!   sidecar holds an SVID and a policy, and Jobs still complete;
//! - its whole configuration in the `MAYFLY_SIDECAR_CONFIG_TOML` variable (`run --config-env`),
//!   so one YAML file is enough: no ConfigMap per workload;
//! - a projected service-account token (audience `mayfly`, 600 s) at
//!   `/var/run/secrets/mayfly/token`: the sidecar attests with it, no join token;
//! - the namespace's policy ConfigMap (`mayfly-policy` by default) at `/etc/mayfly/policy`;
//! - an `emptyDir` (`mayfly-audit`) at `/var/lib/mayfly/audit`, in the sidecar only, for its
//!   audit spool (`[audit] spool_dir = "/var/lib/mayfly/audit/spool"`).
//!
//! - with `mayfly.io/workload-api: "true"`, the SPIFFE Workload API for the app containers
//!   ([`workload_api`](crate::ANNOTATION_WORKLOAD_API)): a socket on an `emptyDir` at
//!   `/run/spiffe/workload.sock`, `SPIFFE_ENDPOINT_SOCKET` set in every app container.
//!
//! Injection is idempotent (a pod template with the `mayfly.io/injected` annotation or a
//! container named `mayfly-sidecar` is left alone), `mayfly.io/inject: "false"` opts out, and
//! objects other than workloads pass through untouched.

pub mod patch;
mod pod;
pub mod probes;
mod reason;
pub mod tuning;
pub mod webhook;
mod workload_api;
mod yaml;

use serde_json::{Map, Value};

pub use reason::{ConfigRejected, ProbeProblem, Reason};
pub use yaml::{inject_yaml, parse_documents};

/// The sidecar container's name.
pub const CONTAINER_NAME: &str = "mayfly-sidecar";
/// Annotation: `"false"` leaves the pod alone.
pub const ANNOTATION_INJECT: &str = "mayfly.io/inject";
/// Annotation set on injected pod templates.
pub const ANNOTATION_INJECTED: &str = "mayfly.io/injected";
/// Annotation: the app's port (the inbound listener forwards to `127.0.0.1:PORT`).
pub const ANNOTATION_APP_PORT: &str = "mayfly.io/app-port";
/// Annotation: the app's ports, `"8080, 9090"`: one inbound listener each, on 15443, 15444, ...
/// in that order (default: every TCP `containerPort` of the app containers).
pub const ANNOTATION_APP_PORTS: &str = "mayfly.io/app-ports";
/// Most app ports one sidecar meshes (mTLS ports 15443 to 15458).
pub const MAX_APP_PORTS: usize = 16;
/// Annotation: `tcp` (default) or `http`, the inbound listener's protocol.
pub const ANNOTATION_PROTOCOL: &str = "mayfly.io/protocol";
/// Annotation: outbound upstreams, one per line: `NAME LOCAL_PORT REMOTE SPIFFE_ID`.
pub const ANNOTATION_OUTBOUND: &str = "mayfly.io/outbound";
/// Annotation set on injected pod templates: the SPIFFE ID the pod will hold.
pub const ANNOTATION_SPIFFE_ID: &str = "mayfly.io/spiffe-id";
/// Annotation: `"true"` serves the SPIFFE Workload API to the app containers, on
/// [`WORKLOAD_API_SOCKET`], to their `runAsUser` uids (or those of
/// [`ANNOTATION_WORKLOAD_API_UIDS`]).
pub const ANNOTATION_WORKLOAD_API: &str = "mayfly.io/workload-api";
/// Annotation: the uids allowed to call the Workload API, `"1000, 1001"` (default: the app
/// containers' `runAsUser`, else the pod's; a pod with a container without either is refused).
pub const ANNOTATION_WORKLOAD_API_UIDS: &str = "mayfly.io/workload-api-uids";
/// Where the Workload API volume is mounted, in the sidecar and in the app containers.
pub const WORKLOAD_API_DIR: &str = "/run/spiffe";
/// The Workload API socket.
pub const WORKLOAD_API_SOCKET: &str = "/run/spiffe/workload.sock";
/// `SPIFFE_ENDPOINT_SOCKET` in the app containers.
pub const WORKLOAD_API_ENDPOINT: &str = "unix:///run/spiffe/workload.sock";
/// The environment variable that carries the sidecar's configuration.
pub const CONFIG_ENV: &str = "MAYFLY_SIDECAR_CONFIG_TOML";
/// The environment variable that carries the pod's IP (downward API): the address each
/// inbound advertises to peers (`advertise = "${MAYFLY_POD_IP}:PORT"`).
pub const POD_IP_ENV: &str = "MAYFLY_POD_IP";
/// Inbound mTLS port (of the first app port; the next ones get the ports after it).
pub const INBOUND_PORT: u16 = 15443;
/// Admin port (`/healthz`, `/readyz`, `/metrics`; the kubelet probes it).
pub const ADMIN_PORT: u16 = 15000;
/// Where the projected service-account token is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/mayfly";
/// Where the policy ConfigMap is mounted.
pub const POLICY_DIR: &str = "/etc/mayfly/policy";
/// Where the audit volume is mounted: an `emptyDir` in the sidecar container only (its root
/// filesystem is read-only), kept across sidecar restarts for the life of the pod.
pub const AUDIT_DIR: &str = "/var/lib/mayfly/audit";
/// The spool directory in it (`[audit] spool_dir`): a directory of the sidecar's own, since it
/// sets its spool to 0700 and the volume's root belongs to root.
pub const AUDIT_SPOOL_DIR: &str = "/var/lib/mayfly/audit/spool";

/// The default sidecar image.
pub const DEFAULT_IMAGE: &str = "ghcr.io/mayfly-mesh/mayfly-sidecar:0.1.0";
/// The default control-plane address (the in-cluster Service of `deploy/kubernetes`).
pub const DEFAULT_CONTROL_PLANE: &str = "mayfly-ca.mayfly-system.svc:8443";

/// Checks a sidecar configuration (TOML) the injector generated, as the sidecar will parse it.
pub type CheckConfig = fn(&str) -> Result<(), ConfigRejected>;

/// How to inject.
#[derive(Debug, Clone)]
pub struct InjectOptions {
    /// The sidecar image.
    pub image: String,
    /// The trust domain of the SPIFFE IDs (`spiffe://TD/ns/NS/sa/SA`).
    pub trust_domain: String,
    /// `host:port` of the control plane.
    pub control_plane: String,
    /// Hex SHA-256 of the control plane root's SPKI (`mayfly-ca bundle show --format pin`).
    pub ca_pin: String,
    /// The ConfigMap (in the pod's namespace) holding `policy.toml`.
    pub policy_configmap: String,
    /// Refuses a generated sidecar configuration the sidecar would refuse (the binary passes
    /// `mayfly_sidecar::config::Config::parse`): a pod is never given a sidecar that cannot start.
    pub check_config: CheckConfig,
}

impl InjectOptions {
    /// Options with the defaults, `ca_pin`, and the check of the generated configuration.
    pub fn new(ca_pin: impl Into<String>, check_config: CheckConfig) -> Self {
        Self {
            image: DEFAULT_IMAGE.into(),
            trust_domain: "mayfly.local".into(),
            control_plane: DEFAULT_CONTROL_PLANE.into(),
            ca_pin: ca_pin.into(),
            policy_configmap: "mayfly-policy".into(),
            check_config,
        }
    }

    /// Checks the options themselves (before any object is looked at).
    pub fn check(&self) -> Result<(), InjectError> {
        let bad = |m: String| Err(InjectError::Options(m));
        if self.ca_pin.len() != 64 || !self.ca_pin.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad(
                "--ca-pin must be 64 hex digits: `mayfly-ca bundle show --format pin`".into(),
            );
        }
        if let Err(e) = mayfly_ca::id::parse_trust_domain(&self.trust_domain) {
            return bad(format!("--trust-domain: {e}"));
        }
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            return bad("--image must be an image reference".into());
        }
        if self.control_plane.trim().is_empty() || !self.control_plane.contains(':') {
            return bad("--control-plane must be host:port".into());
        }
        if !is_dns_subdomain(&self.policy_configmap) {
            return bad("--policy-configmap must be a ConfigMap name".into());
        }
        Ok(())
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Why injection failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The input is not YAML (or not a YAML this tool can represent, such as non-string keys).
    #[error("document {doc}: not valid YAML: {message}")]
    Yaml {
        /// 1-based document number.
        doc: usize,
        /// The parser's message.
        message: String,
    },
    /// A workload cannot be injected as it is.
    #[error("{object}: {reason}")]
    Object {
        /// `Kind/namespace/name`.
        object: String,
        /// Why.
        reason: Reason,
    },
    /// The YAML writer failed.
    #[error("cannot write YAML: {0}")]
    Emit(String),
    /// An option is invalid.
    #[error("{0}")]
    Options(String),
}

/// What [`inject_object`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// The pod template already has the sidecar.
    AlreadyInjected,
    /// `mayfly.io/inject: "false"`.
    OptedOut,
    /// Not a workload this tool knows (Service, ConfigMap, a CRD...): untouched.
    NotAWorkload,
}

/// Where the pod template lives in a workload: (metadata path, spec path).
fn template_paths(api_version: &str, kind: &str) -> Option<(&'static str, &'static str)> {
    match (api_version, kind) {
        ("v1", "Pod") => Some(("/metadata", "/spec")),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job")
        | ("v1", "ReplicationController") => {
            Some(("/spec/template/metadata", "/spec/template/spec"))
        }
        ("batch/v1", "CronJob") => Some((
            "/spec/jobTemplate/spec/template/metadata",
            "/spec/jobTemplate/spec/template/spec",
        )),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

/// Injects the sidecar into one Kubernetes object, in place. `namespace` is used when the
/// object names none (admission requests for pods made by controllers); then `default`.
/// A `v1` `List` is injected item by item (the outcome is `Injected` if any item was).
pub fn inject_object(
    obj: &mut Value,
    opts: &InjectOptions,
    namespace: Option<&str>,
) -> Result<Outcome, InjectError> {
    let api_version = str_at(obj, "/apiVersion").unwrap_or_default().to_owned();
    let kind = str_at(obj, "/kind").unwrap_or_default().to_owned();
    if api_version == "v1"
        && kind == "List"
        && let Some(items) = obj.get_mut("items").and_then(Value::as_array_mut)
    {
        let mut any = Outcome::NotAWorkload;
        for item in items {
            if inject_object(item, opts, namespace)? == Outcome::Injected {
                any = Outcome::Injected;
            }
        }
        return Ok(any);
    }
    let Some((meta_path, spec_path)) = template_paths(&api_version, &kind) else {
        return Ok(Outcome::NotAWorkload);
    };
    let name = str_at(obj, "/metadata/name")
        .or_else(|| str_at(obj, "/metadata/generateName"))
        .unwrap_or("<unnamed>")
        .to_owned();
    let ns = str_at(obj, "/metadata/namespace")
        .filter(|s| !s.is_empty())
        .or(namespace.filter(|s| !s.is_empty()))
        .unwrap_or("default")
        .to_owned();
    let object = format!("{kind}/{ns}/{name}");
    let fail = |reason: Reason| InjectError::Object {
        object: object.clone(),
        reason,
    };
    // Annotations: the pod template's win over the workload's own.
    let mut annotations = Map::new();
    for p in ["/metadata/annotations", &format!("{meta_path}/annotations")] {
        if let Some(Value::Object(m)) = obj.pointer(p) {
            for (k, v) in m {
                annotations.insert(k.clone(), v.clone());
            }
        }
    }
    let ann = |k: &str| annotations.get(k).and_then(Value::as_str);
    if ann(ANNOTATION_INJECT) == Some("false") {
        return Ok(Outcome::OptedOut);
    }
    let Some(spec) = obj.pointer(spec_path).filter(|s| s.is_object()) else {
        return Err(fail(Reason::NoPodSpec { at: spec_path }));
    };
    let has_sidecar = ["containers", "initContainers"].iter().any(|list| {
        spec.get(list)
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == CONTAINER_NAME))
    });
    if ann(ANNOTATION_INJECTED) == Some("true") || has_sidecar {
        return Ok(Outcome::AlreadyInjected);
    }
    let plan = pod::plan(spec, &ns, &annotations, opts).map_err(fail)?;
    // Apply: metadata first (it may not exist), then the spec.
    let meta = ensure_object(obj, meta_path).ok_or_else(|| {
        fail(Reason::Shape {
            field: "metadata",
            shape: "map",
        })
    })?;
    let Some(Value::Object(anns)) = field(meta, "annotations", || Value::Object(Map::new())) else {
        return Err(fail(Reason::Shape {
            field: "annotations",
            shape: "map",
        }));
    };
    anns.insert(ANNOTATION_INJECTED.into(), "true".into());
    anns.insert(ANNOTATION_SPIFFE_ID.into(), plan.spiffe_id.clone().into());
    if let Some(app) = &plan.default_container {
        anns.entry("kubectl.kubernetes.io/default-container")
            .or_insert_with(|| app.clone().into());
    }
    for (k, v) in tuning::prometheus_annotations(&annotations) {
        anns.insert(k.into(), v.into());
    }
    let spec = ensure_object(obj, spec_path).ok_or_else(|| {
        fail(Reason::Shape {
            field: "spec",
            shape: "map",
        })
    })?;
    let Some(Value::Array(inits)) = field(spec, "initContainers", || Value::Array(Vec::new()))
    else {
        return Err(fail(Reason::Shape {
            field: "spec.initContainers",
            shape: "list",
        }));
    };
    inits.insert(0, plan.container);
    let containers = spec.get_mut("containers").and_then(Value::as_array_mut);
    let containers = containers.ok_or_else(|| {
        fail(Reason::Shape {
            field: "spec.containers",
            shape: "list",
        })
    })?;
    if plan.workload_api {
        containers
            .iter_mut()
            .for_each(workload_api::Plan::apply_to_app);
    }
    for rw in plan.probe_rewrites {
        if let Some(probe) = containers
            .get_mut(rw.container)
            .and_then(|c| c.get_mut(rw.field))
            .and_then(Value::as_object_mut)
        {
            probe.insert("httpGet".into(), rw.http_get);
        }
    }
    let Some(Value::Array(volumes)) = field(spec, "volumes", || Value::Array(Vec::new())) else {
        return Err(fail(Reason::Shape {
            field: "spec.volumes",
            shape: "list",
        }));
    };
    volumes.extend(plan.volumes);
    Ok(Outcome::Injected)
}

/// `map[key]`, set to `empty()` when missing or null (`annotations:` with no value).
fn field<'a>(
    map: &'a mut Map<String, Value>,
    key: &str,
    empty: impl Fn() -> Value,
) -> Option<&'a mut Value> {
    let v = map.entry(key.to_owned()).or_insert_with(&empty);
    if v.is_null() {
        *v = empty();
    }
    Some(v)
}

/// The map at `ptr` (a JSON pointer of plain keys), created if missing.
fn ensure_object<'a>(root: &'a mut Value, ptr: &str) -> Option<&'a mut Map<String, Value>> {
    let mut cur = root;
    for key in ptr.split('/').skip(1) {
        let Value::Object(m) = cur else {
            return None;
        };
        cur = m
            .entry(key.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
    }
    cur.as_object_mut()
}

#[cfg(test)]
mod tests;
