//! `mayfly.io/workload-api: "true"`: the injected sidecar serves the SPIFFE Workload API to the
//! pod's app containers. The socket lives on an `emptyDir` of its own (`mayfly-workload-api`),
//! mounted in the sidecar and, read-only, in every app container at [`WORKLOAD_API_DIR`];
//! each app container gets `SPIFFE_ENDPOINT_SOCKET`, where SPIFFE client libraries look.
//!
//! Who may call: the app containers' uids (`runAsUser` of each container, else of the pod), or
//! the ones listed in `mayfly.io/workload-api-uids`. A pod where a container's uid cannot be
//! determined is refused: the sidecar admits callers by uid alone. The socket's mode is 0666
//! because the sidecar (65532) and the apps run as different users with no group in common,
//! and a unix socket can be connected to only with write permission on it; the volume is
//! mounted only in this pod, and every call is checked against the caller's peer credentials.

use serde_json::{Map, Value, json};

use crate::{
    ANNOTATION_WORKLOAD_API, ANNOTATION_WORKLOAD_API_UIDS, Reason, WORKLOAD_API_DIR,
    WORKLOAD_API_ENDPOINT, WORKLOAD_API_SOCKET,
};

/// The volume that carries the socket.
pub(crate) const VOLUME: &str = "mayfly-workload-api";
/// What SPIFFE client libraries read the socket's address from.
pub(crate) const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";
/// The socket's mode (see the module's documentation).
pub(crate) const SOCKET_MODE: &str = "0666";

/// The Workload API of one pod: who may call it.
pub(crate) struct Plan {
    uids: Vec<u32>,
}

/// `None` unless the annotation turns the Workload API on.
pub(crate) fn plan(spec: &Value, annotations: &Map<String, Value>) -> Result<Option<Plan>, Reason> {
    match annotations
        .get(ANNOTATION_WORKLOAD_API)
        .and_then(Value::as_str)
    {
        None if !annotations.contains_key(ANNOTATION_WORKLOAD_API) => return Ok(None),
        Some("false") => return Ok(None),
        Some("true") => {}
        _ => return Err(Reason::WorkloadApiSwitch),
    }
    let uids = match annotations.get(ANNOTATION_WORKLOAD_API_UIDS) {
        Some(v) => listed_uids(v)?,
        None => container_uids(spec)?,
    };
    for c in containers(spec) {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
        for (field, shape) in [
            ("volumeMounts", "spec.containers[].volumeMounts"),
            ("env", "spec.containers[].env"),
        ] {
            if c.get(field).is_some_and(|v| !v.is_null() && !v.is_array()) {
                return Err(Reason::Shape {
                    field: shape,
                    shape: "list",
                });
            }
        }
        let mounts = c.get("volumeMounts").and_then(Value::as_array);
        if mounts.into_iter().flatten().any(|m| {
            m.get("mountPath")
                .and_then(Value::as_str)
                .is_some_and(|p| p.trim_end_matches('/') == WORKLOAD_API_DIR)
        }) {
            return Err(Reason::WorkloadApiDirTaken(name.to_owned()));
        }
    }
    Ok(Some(Plan { uids }))
}

fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    spec.get("containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// `"1000, 1001"` (commas or spaces), or one number.
fn listed_uids(v: &Value) -> Result<Vec<u32>, Reason> {
    let bad = || Reason::WorkloadApiUidList(v.to_string());
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(bad()),
    };
    let mut out = Vec::new();
    for p in text.split([',', ' ', '\t']).filter(|p| !p.is_empty()) {
        let uid = p.parse::<u32>().map_err(|_| bad())?;
        if !out.contains(&uid) {
            out.push(uid);
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Every app container's `runAsUser`, else the pod's.
fn container_uids(spec: &Value) -> Result<Vec<u32>, Reason> {
    let run_as = |v: &Value| {
        v.pointer("/securityContext/runAsUser")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    let pod = run_as(spec);
    let mut out = Vec::new();
    for c in containers(spec) {
        let Some(uid) = run_as(c).or(pod) else {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            return Err(Reason::WorkloadApiNoUid(name.to_owned()));
        };
        if !out.contains(&uid) {
            out.push(uid);
        }
    }
    Ok(out)
}

impl Plan {
    /// The sidecar's `[workload_api]` section.
    pub(crate) fn config(&self) -> toml::Table {
        let mut t = toml::Table::new();
        t.insert("socket".into(), WORKLOAD_API_SOCKET.into());
        t.insert("mode".into(), SOCKET_MODE.into());
        let uids: Vec<toml::Value> = self
            .uids
            .iter()
            .map(|u| toml::Value::Integer(i64::from(*u)))
            .collect();
        t.insert("allowed_uids".into(), uids.into());
        t
    }

    /// The socket's volume.
    pub(crate) fn volume() -> Value {
        json!({ "name": VOLUME, "emptyDir": {} })
    }

    /// The sidecar's mount of it.
    pub(crate) fn sidecar_mount() -> Value {
        json!({ "name": VOLUME, "mountPath": WORKLOAD_API_DIR })
    }

    /// Mounts the socket's volume (read-only: connecting needs no write access to the file
    /// system) and sets `SPIFFE_ENDPOINT_SOCKET` (unless the container sets it itself) in an
    /// app container.
    pub(crate) fn apply_to_app(container: &mut Value) {
        let Some(c) = container.as_object_mut() else {
            return;
        };
        let mounts = c
            .entry("volumeMounts")
            .or_insert_with(|| Value::Array(Vec::new()));
        if mounts.is_null() {
            *mounts = Value::Array(Vec::new());
        }
        if let Some(m) = mounts.as_array_mut() {
            m.push(json!({ "name": VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": true }));
        }
        let env = c.entry("env").or_insert_with(|| Value::Array(Vec::new()));
        if env.is_null() {
            *env = Value::Array(Vec::new());
        }
        if let Some(e) = env.as_array_mut()
            && !e.iter().any(|v| v["name"] == ENDPOINT_ENV)
        {
            e.push(json!({ "name": ENDPOINT_ENV, "value": WORKLOAD_API_ENDPOINT }));
        }
    }
}
