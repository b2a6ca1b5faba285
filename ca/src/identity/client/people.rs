//! The API for people (`mayfly`): access requests and decisions, endpoint lookups and admin
//! operations, over mTLS with the user SVID.

use std::sync::Arc;

use http::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{CaClient, ClientError};
use crate::identity::tls::Credentials;
use crate::identity::verify::SharedBundles;

impl CaClient {
    /// One call to `path` with a JSON `body` (`GET` without one), authenticated by `current`;
    /// the answer parsed as `T`. A refusal carries the control plane's reason and message.
    pub async fn user_call<B: Serialize, T: DeserializeOwned>(
        &self,
        bundles: SharedBundles,
        current: Arc<Credentials>,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let tls = self.verified_tls(bundles, current)?;
        let method = if body.is_some() {
            Method::POST
        } else {
            Method::GET
        };
        self.json_call(tls, method, path, body).await
    }
}
