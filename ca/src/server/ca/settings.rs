//! The settings a running control plane is started with, and their defaults.

use std::sync::Arc;
use std::time::Duration;

/// Settings of a running control plane.
#[derive(Debug, Clone)]
pub struct CaSettings {
    /// SVID TTL when the request names none.
    pub svid_default_ttl: Duration,
    /// Longest SVID TTL granted (at most 60 min).
    pub svid_max_ttl: Duration,
    /// Longest join-token TTL.
    pub token_max_ttl: Duration,
    /// OS user IDs allowed on the admin socket.
    pub admin_uids: Vec<u32>,
    /// DNS names and IP addresses put beside the SPIFFE ID in the control plane's own SVID.
    pub server_names: Vec<String>,
    /// How long a client may take for the TLS handshake, request headers and body.
    pub client_timeout: Duration,
    /// Most connections the API listener holds open; above it new ones are closed at once.
    pub max_connections: usize,
    /// The lease of an endpoint registration (at most 60 s, and never past the client
    /// certificate's NotAfter).
    pub endpoint_lease: Duration,
    /// Kubernetes service-account token attestation (`--k8s-jwks`, `--k8s-issuer`), if on.
    pub k8s: Option<Arc<crate::server::attest::K8sAttestor>>,
    /// The OpenID Connect issuers people sign in with (`--oidc-*`); none by default.
    pub oidc: Arc<crate::server::oidc::Verifier>,
}

/// Default of `--max-connections`. Each sidecar holds two long-lived connections (the watch
/// stream and its audit session), so this serves about 5,000 sidecars.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            svid_default_ttl: crate::identity::signing::issue::DEFAULT_SVID_TTL,
            svid_max_ttl: crate::identity::signing::issue::MAX_SVID_TTL,
            token_max_ttl: Duration::from_secs(15 * 60),
            admin_uids: vec![0],
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            client_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            endpoint_lease: crate::server::registry::DEFAULT_LEASE,
            k8s: None,
            oidc: Arc::default(),
        }
    }
}
