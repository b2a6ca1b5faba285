//! People: `GET /v1/oidc` (which identity providers to sign in with) and `POST /v1/user/svid`
//! (an ID token and a CSR for a key made here -> a user SVID), over TLS verified against the
//! trust bundle, with no client certificate.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::Method;
use rustls_pki_types::CertificateDer;

use super::{CaClient, ClientError};
use crate::identity::api::{self, OidcIssuers, UserSvidRequest, UserSvidResponse};
use crate::identity::bundle::TrustBundle;
use crate::identity::id::SpiffeId;
use crate::identity::keys::SecretKey;
use crate::identity::signing::issue::make_csr;
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

/// A user SVID as the control plane returned it.
#[derive(Debug, Clone)]
pub struct UserSvid {
    /// The SVID's SPIFFE ID.
    pub spiffe_id: String,
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The trust bundle of the trust domain.
    pub bundle: TrustBundle,
    /// NotAfter (unix seconds).
    pub not_after: i64,
    /// The issuer signed in with.
    pub issuer: String,
    /// When the sign-in expires (unix seconds).
    pub sign_in_expires: i64,
}

impl CaClient {
    /// The issuers the control plane trusts for sign-in.
    pub async fn oidc_issuers(&self, bundles: SharedBundles) -> Result<OidcIssuers, ClientError> {
        let tls = self.verified_tls(bundles, Credentials::new())?;
        let (status, body) = self.call(tls, Method::GET, api::OIDC_PATH, None).await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Exchanges `id_token` (and the `nonce` its flow sent, if any) for a user SVID `id` of
    /// `key`'s public key.
    pub async fn user_svid(
        &self,
        bundles: SharedBundles,
        id_token: &str,
        nonce: Option<&str>,
        key: &SecretKey,
        id: &SpiffeId,
    ) -> Result<UserSvid, ClientError> {
        let tls = self.verified_tls(bundles, Credentials::new())?;
        let csr = make_csr(key, id).map_err(|e| ClientError::Csr(e.to_string()))?;
        let req = UserSvidRequest {
            id_token: id_token.to_owned(),
            csr: STANDARD.encode(csr),
            nonce: nonce.map(str::to_owned),
        };
        let resp: UserSvidResponse = self
            .json_call(tls, Method::POST, api::USER_SVID_PATH, Some(&req))
            .await?;
        let chain = Self::decode_chain(&resp.chain)?;
        let bundle = TrustBundle::from_jwks(self.trust_domain.clone(), &resp.bundle.to_string())?;
        Ok(UserSvid {
            spiffe_id: resp.spiffe_id,
            chain,
            bundle,
            not_after: resp.not_after,
            issuer: resp.issuer,
            sign_in_expires: resp.sign_in_expires,
        })
    }
}
