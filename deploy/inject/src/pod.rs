//! What the sidecar adds to one pod spec: the container, its configuration, its volumes.

use serde_json::{Map, Value, json};

use crate::{
    ADMIN_PORT, ANNOTATION_APP_PORT, ANNOTATION_APP_PORTS, ANNOTATION_OUTBOUND,
    ANNOTATION_PROTOCOL, AUDIT_DIR, AUDIT_SPOOL_DIR, CONFIG_ENV, CONTAINER_NAME, INBOUND_PORT,
    InjectOptions, MAX_APP_PORTS, POD_IP_ENV, POLICY_DIR, Reason, TOKEN_DIR, workload_api,
};

const TOKEN_VOLUME: &str = "mayfly-token";
const POLICY_VOLUME: &str = "mayfly-policy";
const AUDIT_VOLUME: &str = "mayfly-audit";
/// The audience the control plane requires of service-account tokens.
const AUDIENCE: &str = "mayfly";
/// The kubelet's shortest allowed projected token life; it refreshes at 80 %.
const TOKEN_SECONDS: u64 = 600;

/// The changes for one pod.
pub(super) struct Plan {
    pub(super) container: Value,
    pub(super) volumes: Vec<Value>,
    pub(super) spiffe_id: String,
    pub(super) default_container: Option<String>,
    pub(super) probe_rewrites: Vec<crate::tuning::ProbeRewrite>,
    /// The app containers get the Workload API socket and `SPIFFE_ENDPOINT_SOCKET`.
    pub(super) workload_api: bool,
}

struct Upstream {
    name: String,
    port: u16,
    remote: String,
    spiffe_id: String,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn port(what: &str, s: &str) -> Result<u16, Reason> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Reason::NotAPort {
            what: what.to_owned(),
            value: s.to_owned(),
        }),
    }
}

/// `NAME LOCAL_PORT REMOTE SPIFFE_ID` per line; blank lines and `#` comments are skipped.
fn upstreams(annotation: &str) -> Result<Vec<Upstream>, Reason> {
    let mut out = Vec::new();
    for (n, line) in annotation.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [name, local, remote, id] = f.as_slice() else {
            return Err(Reason::OutboundLine { line: n + 1 });
        };
        out.push(Upstream {
            name: (*name).to_owned(),
            port: port(&format!("{ANNOTATION_OUTBOUND} line {}", n + 1), local)?,
            remote: (*remote).to_owned(),
            spiffe_id: (*id).to_owned(),
        });
    }
    Ok(out)
}

/// Every `containerPort` of the pod, and the TCP ones of the app containers (in order, once).
fn ports(spec: &Value) -> (Vec<u16>, Vec<u16>) {
    let mut all = Vec::new();
    let mut app = Vec::new();
    for list in ["containers", "initContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for p in c
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(n) = p
                    .get("containerPort")
                    .and_then(Value::as_u64)
                    .and_then(|n| u16::try_from(n).ok())
                else {
                    continue;
                };
                all.push(n);
                let tcp = p
                    .get("protocol")
                    .and_then(Value::as_str)
                    .is_none_or(|p| p == "TCP");
                if list == "containers" && tcp && !app.contains(&n) {
                    app.push(n);
                }
            }
        }
    }
    (all, app)
}

/// The app ports from `mayfly.io/app-ports` (`"8080, 9090"`: commas or spaces), or the single
/// `mayfly.io/app-port`; `None` when neither is set.
fn annotated_ports(annotations: &Map<String, Value>) -> Result<Option<Vec<u16>>, Reason> {
    let one = annotations.get(ANNOTATION_APP_PORT);
    let many = annotations.get(ANNOTATION_APP_PORTS);
    let (key, v) = match (one, many) {
        (Some(_), Some(_)) => {
            return Err(Reason::BothPortAnnotations);
        }
        (Some(v), None) => (ANNOTATION_APP_PORT, v),
        (None, Some(v)) => (ANNOTATION_APP_PORTS, v),
        (None, None) => return Ok(None),
    };
    let s = text(v).ok_or(Reason::PortsNotText { key })?;
    let mut out = Vec::new();
    for p in s.split([',', ' ', '\t']).filter(|p| !p.is_empty()) {
        let p = port(key, p)?;
        if out.contains(&p) {
            return Err(Reason::PortTwice { key, port: p });
        }
        out.push(p);
    }
    if out.is_empty() || (key == ANNOTATION_APP_PORT && out.len() > 1) {
        return Err(Reason::NotAPort {
            what: key.to_owned(),
            value: s,
        });
    }
    Ok(Some(out))
}

/// The sidecar's mTLS port for the `n`-th app port: 15443, 15444, ...
fn mtls_port(n: usize) -> Option<u16> {
    u16::try_from(n)
        .ok()
        .filter(|n| usize::from(*n) < MAX_APP_PORTS)
        .map(|n| INBOUND_PORT + n)
}

/// The name of the sidecar's container port for the `n`-th app port.
fn mtls_port_name(n: usize) -> String {
    match n {
        0 => "mayfly-mtls".to_owned(),
        n => format!("mayfly-mtls-{n}"),
    }
}

fn config_toml(
    spiffe_id: &str,
    app_ports: &[u16],
    protocol: Option<&str>,
    ups: &[Upstream],
    workload_api: Option<&crate::workload_api::Plan>,
    opts: &InjectOptions,
) -> Result<String, Reason> {
    let mut root = toml::Table::new();
    root.insert("spiffe_id".into(), spiffe_id.into());
    let mut cp = toml::Table::new();
    cp.insert("address".into(), opts.control_plane.as_str().into());
    cp.insert("k8s_token_file".into(), format!("{TOKEN_DIR}/token").into());
    cp.insert("ca_pin".into(), opts.ca_pin.to_ascii_lowercase().into());
    root.insert("control_plane".into(), cp.into());
    let mut inbound: Vec<toml::Value> = Vec::new();
    for (n, p) in app_ports.iter().enumerate() {
        let mtls = mtls_port(n).ok_or(Reason::NoMtlsPort)?;
        let mut t = toml::Table::new();
        t.insert("listen".into(), format!("0.0.0.0:{mtls}").into());
        // Peers find this pod by its SPIFFE ID at the pod's IP, which the sidecar reads
        // from the downward API at start.
        t.insert(
            "advertise".into(),
            format!("${{{POD_IP_ENV}}}:{mtls}").into(),
        );
        t.insert("app".into(), format!("127.0.0.1:{p}").into());
        if let Some(proto) = protocol {
            t.insert("protocol".into(), proto.into());
        }
        inbound.push(t.into());
    }
    // One app port keeps the `[inbound]` table of earlier versions.
    match inbound.len() {
        0 => {}
        1 => {
            root.insert("inbound".into(), inbound.remove(0));
        }
        _ => {
            root.insert("inbound".into(), inbound.into());
        }
    }
    if !ups.is_empty() {
        let list: Vec<toml::Value> = ups
            .iter()
            .map(|u| {
                let mut t = toml::Table::new();
                t.insert("name".into(), u.name.as_str().into());
                t.insert("listen".into(), format!("127.0.0.1:{}", u.port).into());
                t.insert("remote".into(), u.remote.as_str().into());
                t.insert("spiffe_id".into(), u.spiffe_id.as_str().into());
                t.into()
            })
            .collect();
        root.insert("outbound".into(), list.into());
    }
    let mut policy = toml::Table::new();
    policy.insert("file".into(), format!("{POLICY_DIR}/policy.toml").into());
    root.insert("policy".into(), policy.into());
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), format!("0.0.0.0:{ADMIN_PORT}").into());
    root.insert("admin".into(), admin.into());
    // The spool on the pod's writable volume: the root filesystem is read-only.
    let mut audit = toml::Table::new();
    audit.insert("spool_dir".into(), AUDIT_SPOOL_DIR.into());
    root.insert("audit".into(), audit.into());
    if let Some(w) = workload_api {
        root.insert("workload_api".into(), w.config().into());
    }
    let text = toml::to_string(&root).map_err(|e| Reason::WriteConfig(e.to_string()))?;
    // The sidecar must accept what we generate: check it the same way it will.
    (opts.check_config)(&text)?;
    Ok(text)
}

fn probe(path: &str, period: u64, failures: u64) -> Value {
    json!({
        "httpGet": { "path": path, "port": ADMIN_PORT },
        "periodSeconds": period,
        "timeoutSeconds": 1,
        "failureThreshold": failures,
    })
}

/// Plans the injection into `spec`; the error is a reason for the operator.
pub(super) fn plan(
    spec: &Value,
    ns: &str,
    annotations: &Map<String, Value>,
    opts: &InjectOptions,
) -> Result<Plan, Reason> {
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(Reason::HostNetwork);
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or(Reason::NoContainers)?;
    let sa = ["serviceAccountName", "serviceAccount"]
        .iter()
        .find_map(|k| {
            spec.get(*k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or("default");
    if !crate::is_dns_subdomain(sa) {
        return Err(Reason::ServiceAccount(sa.to_owned()));
    }
    if !crate::is_dns_subdomain(ns) {
        return Err(Reason::Namespace(ns.to_owned()));
    }
    let spiffe_id = format!("spiffe://{}/ns/{ns}/sa/{sa}", opts.trust_domain);
    mayfly_ca::id::parse_workload_id(&spiffe_id)?;

    let (all_ports, declared) = ports(spec);
    let app_ports = annotated_ports(annotations)?.unwrap_or(declared);
    if app_ports.len() > MAX_APP_PORTS {
        return Err(Reason::TooManyAppPorts {
            count: app_ports.len(),
        });
    }
    // The sidecar's ports: one mTLS port per app port (at least 15443) and the admin port.
    let last_mtls = INBOUND_PORT + app_ports.len().saturating_sub(1) as u16;
    let sidecar_ports = format!("{INBOUND_PORT}-{last_mtls} mTLS, {ADMIN_PORT} admin");
    let sidecars = |p: u16| p == ADMIN_PORT || (INBOUND_PORT..=last_mtls).contains(&p);
    if let Some(p) = all_ports.iter().find(|p| sidecars(**p)) {
        return Err(Reason::PortTaken {
            port: *p,
            sidecar_ports,
        });
    }
    if let Some(p) = app_ports.iter().find(|p| sidecars(**p)) {
        return Err(Reason::AppPortIsSidecars {
            port: *p,
            sidecar_ports,
        });
    }
    let ups = match annotations.get(ANNOTATION_OUTBOUND) {
        Some(Value::String(s)) => upstreams(s)?,
        Some(_) => {
            return Err(Reason::NotAString {
                key: ANNOTATION_OUTBOUND,
            });
        }
        None => Vec::new(),
    };
    if app_ports.is_empty() && ups.is_empty() {
        return Err(Reason::NothingToProxy);
    }
    let protocol = match annotations.get(ANNOTATION_PROTOCOL) {
        None => None,
        Some(Value::String(p)) if p == "tcp" || p == "http" => Some(p.as_str()),
        Some(_) => return Err(Reason::Protocol),
    };
    for v in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = v.get("name").and_then(Value::as_str)
            && [
                TOKEN_VOLUME,
                POLICY_VOLUME,
                AUDIT_VOLUME,
                workload_api::VOLUME,
            ]
            .contains(&n)
        {
            return Err(Reason::VolumeTaken(n.to_owned()));
        }
    }
    let wl = workload_api::plan(spec, annotations)?;
    let config = config_toml(&spiffe_id, &app_ports, protocol, &ups, wl.as_ref(), opts)?;
    let mut container_ports = Vec::new();
    for n in 0..app_ports.len() {
        let mtls = mtls_port(n).ok_or(Reason::NoMtlsPort)?;
        container_ports
            .push(json!({ "name": mtls_port_name(n), "containerPort": mtls, "protocol": "TCP" }));
    }
    container_ports
        .push(json!({ "name": "mayfly-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" }));
    let container = json!({
        "name": CONTAINER_NAME,
        "image": opts.image,
        "restartPolicy": "Always",
        // JSON lines: what log collectors on Kubernetes parse.
        "args": ["run", "--config-env", CONFIG_ENV, "--log-format", "json"],
        "env": [
            { "name": CONFIG_ENV, "value": config },
            { "name": POD_IP_ENV, "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
        ],
        "ports": container_ports,
        // Native sidecar: the next containers start once this probe passes, i.e. once an
        // SVID and a policy are held (up to 5 minutes; fail closed after that).
        "startupProbe": probe("/readyz", 1, 300),
        "readinessProbe": probe("/readyz", 5, 2),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": {
            "requests": { "cpu": "50m", "memory": "16Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": true },
            { "name": AUDIT_VOLUME, "mountPath": AUDIT_DIR },
        ],
    });
    let mut container = container;
    if wl.is_some()
        && let Some(m) = container["volumeMounts"].as_array_mut()
    {
        m.push(workload_api::Plan::sidecar_mount());
    }
    crate::tuning::apply_annotations(&mut container, annotations)?;
    let (probe_rewrites, probes) = crate::tuning::plan_probes(spec)?;
    crate::tuning::probes_env(&mut container, probes);
    let mut volumes = vec![
        json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": AUDIENCE,
                "expirationSeconds": TOKEN_SECONDS,
                "path": "token",
            }}]},
        }),
        json!({
            "name": POLICY_VOLUME,
            "configMap": { "name": opts.policy_configmap },
        }),
        json!({ "name": AUDIT_VOLUME, "emptyDir": {} }),
    ];
    if wl.is_some() {
        volumes.push(workload_api::Plan::volume());
    }
    let default_container = containers
        .first()
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    Ok(Plan {
        container,
        volumes,
        spiffe_id,
        default_container,
        probe_rewrites,
        workload_api: wl.is_some(),
    })
}
