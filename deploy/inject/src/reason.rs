//! Why a workload cannot be injected as it is: one variant per check, with the message the
//! CLI prints and the webhook puts in its refusal.

use crate::{
    ANNOTATION_APP_PORT, ANNOTATION_APP_PORTS, ANNOTATION_OUTBOUND, ANNOTATION_PROTOCOL,
    ANNOTATION_WORKLOAD_API, ANNOTATION_WORKLOAD_API_UIDS, MAX_APP_PORTS, WORKLOAD_API_DIR,
};

/// Why a workload cannot be injected (inside [`InjectError::Object`](crate::InjectError)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reason {
    /// The object has no pod spec where its kind keeps it.
    #[error("no pod spec at {at}")]
    NoPodSpec {
        /// The JSON pointer looked at.
        at: &'static str,
    },
    /// A field has the wrong shape.
    #[error("{field} is not a {shape}")]
    Shape {
        /// The field (`spec.volumes`).
        field: &'static str,
        /// What it must be (`map`, `list`).
        shape: &'static str,
    },
    /// `hostNetwork: true`.
    #[error(
        "hostNetwork pods share the node's ports: mayfly injects only pods with their own network namespace"
    )]
    HostNetwork,
    /// No containers.
    #[error("the pod has no containers")]
    NoContainers,
    /// The service account name is not a Kubernetes object name.
    #[error("service account {0:?} is not a Kubernetes object name")]
    ServiceAccount(String),
    /// The namespace is not a Kubernetes object name.
    #[error("namespace {0:?} is not a Kubernetes object name")]
    Namespace(String),
    /// The SPIFFE ID the pod would hold is not a valid workload ID.
    #[error(transparent)]
    SpiffeId(#[from] mayfly_ca::id::IdError),
    /// An annotation that must be a string is not.
    #[error("{key} must be a string")]
    NotAString {
        /// The annotation.
        key: &'static str,
    },
    /// A port that is not 1-65535.
    #[error("{what}: {value:?} is not a port (1-65535)")]
    NotAPort {
        /// Where it was read (`mayfly.io/app-port`, `mayfly.io/outbound line 2`).
        what: String,
        /// The value.
        value: String,
    },
    /// Both port annotations are set.
    #[error("set {ports} or {port}, not both", ports = ANNOTATION_APP_PORTS, port = ANNOTATION_APP_PORT)]
    BothPortAnnotations,
    /// A port annotation is neither a string nor a number.
    #[error("{key} must be a port or a list of ports")]
    PortsNotText {
        /// The annotation.
        key: &'static str,
    },
    /// A port is listed twice.
    #[error("{key}: port {port} is listed twice")]
    PortTwice {
        /// The annotation.
        key: &'static str,
        /// The port.
        port: u16,
    },
    /// More app ports than the sidecar meshes.
    #[error("{count} app ports: the sidecar meshes at most {max}; list the ones to mesh in {ports}", max = MAX_APP_PORTS, ports = ANNOTATION_APP_PORTS)]
    TooManyAppPorts {
        /// How many.
        count: usize,
    },
    /// No mTLS port is left for an app port.
    #[error("at most {max} app ports", max = MAX_APP_PORTS)]
    NoMtlsPort,
    /// A container already uses one of the sidecar's ports.
    #[error("a container already uses port {port}, which the sidecar needs ({sidecar_ports})")]
    PortTaken {
        /// The port.
        port: u16,
        /// The sidecar's ports, as text.
        sidecar_ports: String,
    },
    /// An app port is one the sidecar listens on.
    #[error("app port {port} is one the sidecar listens on ({sidecar_ports})")]
    AppPortIsSidecars {
        /// The port.
        port: u16,
        /// The sidecar's ports, as text.
        sidecar_ports: String,
    },
    /// A line of the outbound annotation is not four fields.
    #[error("{key} line {line}: expected `NAME LOCAL_PORT REMOTE_HOST:PORT SPIFFE_ID`", key = ANNOTATION_OUTBOUND)]
    OutboundLine {
        /// 1-based line number.
        line: usize,
    },
    /// No port to mesh and no upstream.
    #[error("nothing to proxy: no container declares a containerPort; set the {ports} or {outbound} annotation, or mayfly.io/inject: \"false\"", ports = ANNOTATION_APP_PORTS, outbound = ANNOTATION_OUTBOUND)]
    NothingToProxy,
    /// The protocol annotation is neither `tcp` nor `http`.
    #[error("{key} must be \"tcp\" or \"http\"", key = ANNOTATION_PROTOCOL)]
    Protocol,
    /// The pod already has a volume with one of the sidecar's volume names.
    #[error("the pod already has a volume named {0}")]
    VolumeTaken(String),
    /// The Workload API annotation is neither `"true"` nor `"false"`.
    #[error("{key} must be \"true\" or \"false\"", key = ANNOTATION_WORKLOAD_API)]
    WorkloadApiSwitch,
    /// The Workload API uids annotation is not a list of uids.
    #[error("{key}: {0} is not a list of uids such as \"1000, 1001\"", key = ANNOTATION_WORKLOAD_API_UIDS)]
    WorkloadApiUidList(String),
    /// An app container's uid cannot be determined, and no uids are listed.
    #[error("{key}: container {0} has no securityContext.runAsUser, nor has the pod: the Workload API admits callers by uid; set runAsUser or list the uids in {uids}", key = ANNOTATION_WORKLOAD_API, uids = ANNOTATION_WORKLOAD_API_UIDS)]
    WorkloadApiNoUid(String),
    /// An app container already mounts something where the Workload API socket goes.
    #[error("{key}: container {0} already mounts a volume at {dir}", key = ANNOTATION_WORKLOAD_API, dir = WORKLOAD_API_DIR)]
    WorkloadApiDirTaken(String),
    /// The sidecar image annotation is not an image reference.
    #[error("{key} must be an image reference")]
    Image {
        /// The annotation.
        key: &'static str,
    },
    /// A resource annotation is not a Kubernetes quantity.
    #[error("{key}: {value:?} is not a Kubernetes quantity (such as 100m, 0.5, 64Mi)")]
    NotAQuantity {
        /// The annotation.
        key: &'static str,
        /// The value.
        value: String,
    },
    /// The log level annotation is not a log filter.
    #[error("{key} must be a log filter such as `debug` or `info,mayfly_sidecar=debug`")]
    LogFilter {
        /// The annotation.
        key: &'static str,
    },
    /// An app probe cannot be rewritten through the sidecar.
    #[error("container {container}: {field}: {problem}")]
    Probe {
        /// The container's name.
        container: String,
        /// `livenessProbe`, `readinessProbe` or `startupProbe`.
        field: &'static str,
        /// What is wrong with it.
        problem: ProbeProblem,
    },
    /// The generated configuration could not be written as TOML.
    #[error("cannot write the config: {0}")]
    WriteConfig(String),
    /// The generated configuration is one the sidecar would refuse.
    #[error("the sidecar configuration would be refused: {0}")]
    ConfigRefused(#[from] ConfigRejected),
    /// The probe mapping could not be encoded.
    #[error("cannot encode the probe mapping: {0}")]
    EncodeProbes(String),
}

/// What is wrong with an app's `httpGet` probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeProblem {
    /// A numeric port out of range.
    #[error("port {0} is not a port")]
    NotAPort(String),
    /// A named port the container does not declare.
    #[error("port {0:?} names no port of the container")]
    NoSuchPort(String),
    /// No port at all.
    #[error("httpGet has no port")]
    NoPort,
    /// A path that does not start with `/`.
    #[error("path {0:?} must start with /")]
    Path(String),
}

/// Why the sidecar would refuse a configuration the injector generated (the message of the
/// sidecar's own configuration parser, see [`CheckConfig`](crate::CheckConfig)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigRejected(pub String);
