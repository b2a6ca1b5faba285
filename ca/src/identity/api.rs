//! The control plane's HTTP API: paths and JSON bodies shared by server and client.

use serde::{Deserialize, Serialize};

/// `GET`: the trust bundle as a SPIFFE JWK Set. No client authentication.
pub const BUNDLE_PATH: &str = "/v1/bundle";
/// `POST`: a CSR in, an SVID out.
pub const SVID_PATH: &str = "/v1/svid";
/// `POST`: a [`JwtSvidRequest`] in, over mTLS; a [`JwtSvidResponse`] out: a JWT-SVID for the
/// client certificate's SPIFFE ID (never one named in the body), living at most 5 minutes.
pub const JWTSVID_PATH: &str = "/v1/jwtsvid";
/// `POST`: audit records (JSON lines) from a sidecar, over mTLS; answers `{"acked": seq}`.
pub const AUDIT_PATH: &str = "/v1/audit";
/// The largest audit batch accepted, in bytes.
pub const MAX_AUDIT_BODY: usize = 4 * 1024 * 1024;
/// `GET`: a long-lived stream of [`Snapshot`]s (one JSON object per line), over mTLS.
pub const WATCH_PATH: &str = "/v1/watch";
/// `PUT`: register (or refresh) the caller's inbound endpoints, an [`EndpointsRequest`], over
/// mTLS; answers an [`EndpointsResponse`]. `DELETE` with the same body removes them. The entries
/// are filed under the client certificate's SPIFFE ID, never one named in the body.
pub const ENDPOINTS_PATH: &str = "/v1/endpoints";
/// `GET /v1/watch` request header: the SPIFFE IDs (comma-separated) whose live endpoints the
/// watching sidecar wants in its snapshots (those it has an outbound for).
pub const UPSTREAMS_HEADER: &str = "x-mayfly-upstreams";
/// The most SPIFFE IDs one watch asks endpoints for.
pub const MAX_UPSTREAMS: usize = 64;
/// The most endpoints one request names.
pub const MAX_ENDPOINTS: usize = 16;
/// The longest endpoint address (`host:port`), in bytes.
pub const MAX_ENDPOINT_LEN: usize = 260;

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
    /// The live endpoints of each SPIFFE ID the watch asked for ([`UPSTREAMS_HEADER`]); IDs
    /// without any are left out.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub endpoints: std::collections::BTreeMap<String, Vec<String>>,
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

/// `POST`: a person's ID token (and a CSR for a key made on their machine) exchanged for a
/// user SVID. TLS, no client certificate needed.
pub const USER_SVID_PATH: &str = "/v1/user/svid";
/// `GET`, no authentication: the OpenID Connect issuers and client IDs people sign in with.
pub const OIDC_PATH: &str = "/v1/oidc";

/// `POST /v1/user/svid` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSvidRequest {
    /// The ID token, compact JWS.
    pub id_token: String,
    /// The CSR for `spiffe://<td>/user/<name>`, DER, base64 (standard alphabet).
    pub csr: String,
    /// The `nonce` the sign-in sent, when its flow used one (authorization code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// `POST /v1/user/svid` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserSvidResponse {
    /// The user SVID's ID.
    pub spiffe_id: String,
    /// Leaf first, then intermediates; DER, base64.
    pub chain: Vec<String>,
    /// The trust bundle (SPIFFE JWK Set).
    pub bundle: serde_json::Value,
    /// The SVID's NotAfter (unix seconds).
    pub not_after: i64,
    /// The issuer signed in with.
    pub issuer: String,
    /// When the sign-in expires (the ID token's `exp`, unix seconds).
    pub sign_in_expires: i64,
}

/// One issuer of `GET /v1/oidc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidcIssuer {
    /// The issuer identifier.
    pub issuer: String,
    /// The client ID to sign in as.
    pub client_id: String,
    /// The claim naming the user: the user SVID is `spiffe://<td>/user/<its value>`.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
}

fn default_user_claim() -> String {
    "sub".into()
}

/// `GET /v1/oidc` answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OidcIssuers {
    /// Every issuer the control plane trusts (empty: sign-in is off).
    pub issuers: Vec<OidcIssuer>,
}

/// Any error answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for humans.
    pub error: String,
    /// A short machine-readable reason.
    pub reason: String,
}

/// `PUT` / `DELETE /v1/endpoints` body. Unknown fields (a `spiffe_id` above all) are refused:
/// the identity is the client certificate's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsRequest {
    /// The addresses peers dial (`IP:port` or `host:port`), 1 to [`MAX_ENDPOINTS`].
    pub endpoints: Vec<String>,
}

/// `PUT /v1/endpoints` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointsResponse {
    /// The SPIFFE ID the endpoints are filed under (the client certificate's).
    pub spiffe_id: String,
    /// The endpoints registered.
    pub endpoints: Vec<String>,
    /// How long the registration lasts unless refreshed, in milliseconds (never past the
    /// client certificate's NotAfter).
    pub lease_ms: u64,
}

/// Why an endpoint address is refused: the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint {address:?}: {reason}")]
pub struct EndpointError {
    /// The address as given (cut to [`MAX_ENDPOINT_LEN`] bytes).
    pub address: String,
    /// Why.
    pub reason: &'static str,
}

/// Checks one endpoint address: `IP:port` (`[v6]:port`) with a specific address, or
/// `host:port` with a DNS name; the port is not 0.
pub fn check_endpoint(address: &str) -> Result<(), EndpointError> {
    let bad = |reason| EndpointError {
        address: address.chars().take(MAX_ENDPOINT_LEN).collect(),
        reason,
    };
    if address.len() > MAX_ENDPOINT_LEN {
        return Err(bad("longer than 260 bytes"));
    }
    if let Ok(sa) = address.parse::<std::net::SocketAddr>() {
        if sa.ip().is_unspecified() {
            return Err(bad("a wildcard address cannot be dialled"));
        }
        if sa.port() == 0 {
            return Err(bad("port 0 cannot be dialled"));
        }
        return Ok(());
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(bad("must be IP:port or host:port"));
    };
    match port.parse::<u16>() {
        Ok(0) => return Err(bad("port 0 cannot be dialled")),
        Ok(_) if port.bytes().all(|b| b.is_ascii_digit()) => {}
        _ => return Err(bad("the port must be a number from 1 to 65535")),
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
        return Err(bad("the host must be an IP address or a DNS name"));
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad("the host is not a valid IP address"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialable_addresses_pass_and_others_say_why() {
        for ok in [
            "10.0.0.5:15443",
            "[::1]:8443",
            "orders-0.orders.svc:15443",
            "localhost:1",
        ] {
            assert_eq!(check_endpoint(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.5",
            "0.0.0.0:15443",
            "[::]:1",
            "10.0.0.5:0",
            "host:0",
            "host:+80",
            "host:65536",
            "999.1.1.1:80",
            "-x.example:80",
            "a b:80",
            ":80",
            "spiffe://mayfly.local/x:80",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
        let long = format!("{}.example:80", "a".repeat(300));
        assert!(
            check_endpoint(&long)
                .unwrap_err()
                .to_string()
                .contains("260")
        );
    }
}

/// Body of `POST /v1/jwtsvid`. Other fields (a `spiffe_id`) are ignored: the token is for the
/// caller's certificate's ID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtSvidRequest {
    /// The audiences (1 to 8 non-empty strings).
    pub audience: Vec<String>,
}

/// Answer to `POST /v1/jwtsvid`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtSvidResponse {
    /// The SPIFFE ID the token names (`sub`).
    pub spiffe_id: String,
    /// The JWT-SVID (compact JWS).
    pub token: String,
    /// Its `exp` (unix seconds).
    pub expires_at: i64,
}

/// `POST`: a person asks for access, an [`AccessRequest`], over mTLS with a user SVID
/// (`spiffe://<td>/user/...`); answers the grant record, pending. `GET`: the caller's own
/// requests and those the caller may approve.
pub const ACCESS_PATH: &str = "/v1/access";
/// `POST`: approve, deny or revoke a request, an [`AccessDecision`], over mTLS with a user SVID.
pub const ACCESS_DECIDE_PATH: &str = "/v1/access/decide";
/// `POST`: the live inbound endpoints of a service the caller holds an active grant to, an
/// [`EndpointsLookup`] in, an [`EndpointsFound`] out (for `mayfly connect`).
pub const ACCESS_ENDPOINTS_PATH: &str = "/v1/access/endpoints";
/// `POST`: one admin-socket request (the same JSON, `{"op": ...}`) over mTLS, by a user SVID
/// holding an active admin grant; answers as the admin socket does.
pub const ADMIN_PATH: &str = "/v1/admin";
/// The path of the reserved, unobtainable SPIFFE ID that admin grants name as their target.
pub const ADMIN_ID_PATH: &str = "/mayfly/admin";

/// A person's request for access: to a service (`to`) or the admin role (`role = "admin"`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRequest {
    /// The service's exact SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `admin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Lifetime once approved, such as `30m`.
    pub ttl: String,
    /// Why (required).
    pub reason: String,
    /// HTTP methods (empty: those of the access rule, or any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Path patterns (empty: those of the access rule, or any).
    #[serde(default)]
    pub paths: Vec<String>,
}

/// A decision on a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessDecision {
    /// The request's (grant's) id.
    pub id: String,
    /// `approve`, `deny` or `revoke`.
    pub action: String,
}

/// Which service's endpoints `mayfly connect` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsLookup {
    /// The service's SPIFFE ID.
    pub spiffe_id: String,
}

/// A service's live inbound endpoints, and the grant that lets the caller reach it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointsFound {
    /// The service's SPIFFE ID.
    pub spiffe_id: String,
    /// Its sidecars' inbound addresses (`host:port`).
    pub endpoints: Vec<String>,
    /// The grant's id.
    pub grant: String,
    /// When the grant ends (Unix seconds).
    pub expires: i64,
}
