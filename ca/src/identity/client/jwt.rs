//! JWT-SVIDs: `POST /v1/jwtsvid` over mTLS with the current SVID.

use std::sync::Arc;

use http::Method;

use super::{CaClient, ClientError};
use crate::identity::api::{self, JwtSvidRequest, JwtSvidResponse};
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

impl CaClient {
    /// A JWT-SVID for this SVID's SPIFFE ID with `audience`.
    pub async fn fetch_jwt_svid(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        audience: &[String],
    ) -> Result<JwtSvidResponse, ClientError> {
        let tls = self.verified_tls(bundles, current)?;
        let req = JwtSvidRequest {
            audience: audience.to_vec(),
        };
        self.json_call(tls, Method::POST, api::JWTSVID_PATH, Some(&req))
            .await
    }
}
