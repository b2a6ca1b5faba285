//! The control plane's HTTP API: paths and JSON bodies shared by server and client.

use serde::{Deserialize, Serialize};

/// `GET`: the trust bundle as a SPIFFE JWK Set. No client authentication.
pub const BUNDLE_PATH: &str = "/v1/bundle";
/// `POST`: a CSR in, an SVID out.
pub const SVID_PATH: &str = "/v1/svid";
/// `POST`: audit records (JSON lines) from a sidecar, over mTLS; answers `{"acked": seq}`.
pub const AUDIT_PATH: &str = "/v1/audit";
/// The largest audit batch accepted, in bytes.
pub const MAX_AUDIT_BODY: usize = 4 * 1024 * 1024;
/// `GET`: a long-lived stream of [`Snapshot`]s (one JSON object per line), over mTLS.
pub const WATCH_PATH: &str = "/v1/watch";

/// What the control plane pushes to sidecars: the policy in force, the live grants and the
/// trust bundle. Sent at once, then on every change, and as a heartbeat every 15 s.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// Bumped on every change.
    pub generation: u64,
    /// Content hash of the policy, when the control plane distributes one.
    pub policy_version: Option<String>,
    /// The policy's TOML source.
    pub policy: Option<String>,
    /// Grants approved and not yet expired or revoked (the sidecar enforces expiry with its
    /// own clock).
    pub grants: Vec<GrantWire>,
    /// The trust bundle (SPIFFE JWK Set).
    pub bundle: serde_json::Value,
}

/// A grant on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantWire {
    /// Grant id.
    pub id: String,
    /// Exact source SPIFFE ID.
    pub from: String,
    /// Exact destination SPIFFE ID.
    pub to: String,
    /// HTTP methods (empty = any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path patterns (empty = any).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub expires: i64,
}

/// The path of the control plane's own SPIFFE ID in its trust domain.
pub const CA_ID_PATH: &str = "/mayfly/ca";
/// The largest request body the control plane reads.
pub const MAX_BODY: usize = 64 * 1024;

/// `POST /v1/svid` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvidRequest {
    /// The CSR, DER, base64 (standard alphabet).
    pub csr: String,
    /// A join token, for bootstrap. Absent on renewal (mTLS with the current SVID instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A Kubernetes projected service-account token (audience `mayfly`), for bootstrap by
    /// attestation instead of a join token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_token: Option<String>,
    /// Requested TTL in seconds (capped by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
}

/// `POST /v1/svid` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SvidResponse {
    /// The ID the SVID carries.
    pub spiffe_id: String,
    /// Leaf first, then intermediates; DER, base64.
    pub chain: Vec<String>,
    /// The trust bundle (SPIFFE JWK Set).
    pub bundle: serde_json::Value,
    /// Seconds of validity from now.
    pub ttl: u64,
    /// Serial of the leaf (hex).
    pub serial: String,
}

/// Any error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for humans.
    pub error: String,
    /// A short machine-readable reason.
    pub reason: String,
}
