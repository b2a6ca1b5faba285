//! Endpoint registration: `PUT` / `DELETE /v1/endpoints` over mTLS with the current SVID.

use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::{CaClient, ClientError};
use crate::identity::api::{self, EndpointsRequest, EndpointsResponse};
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

impl CaClient {
    /// Registers (or refreshes) `endpoints` under this SVID's SPIFFE ID; returns the lease the
    /// control plane granted.
    pub async fn register_endpoints(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        endpoints: &[String],
    ) -> Result<Duration, ClientError> {
        let (status, body) = self
            .endpoints_call(bundles, current, Method::PUT, endpoints)
            .await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        let resp: EndpointsResponse =
            serde_json::from_slice(&body).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(Duration::from_millis(resp.lease_ms))
    }

    /// Removes `endpoints` from under this SVID's SPIFFE ID (on drain).
    pub async fn deregister_endpoints(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        endpoints: &[String],
    ) -> Result<(), ClientError> {
        let (status, body) = self
            .endpoints_call(bundles, current, Method::DELETE, endpoints)
            .await?;
        if !status.is_success() {
            return Err(Self::refused(status, &body));
        }
        Ok(())
    }

    async fn endpoints_call(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        method: Method,
        endpoints: &[String],
    ) -> Result<(http::StatusCode, bytes::Bytes), ClientError> {
        let tls = self.verified_tls(bundles, current)?;
        let req = EndpointsRequest {
            endpoints: endpoints.to_vec(),
        };
        let body = serde_json::to_vec(&req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.call(tls, method, api::ENDPOINTS_PATH, Some(body))
            .await
    }
}
