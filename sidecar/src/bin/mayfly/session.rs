//! What every `mayfly` command after `login` starts from: the credentials file turned into a
//! TLS identity (the user SVID and its key), the trust bundle, and a client for the control
//! plane they came from.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use mayfly_ca::client::CaClient;
use mayfly_ca::tls::Credentials as TlsCredentials;
use mayfly_ca::verify::SharedBundles;
use mayfly_sidecar::user::creds::{self, Credentials};

/// A signed-in person's working set.
pub(crate) struct Session {
    /// The credentials file's content.
    pub(crate) creds: Credentials,
    /// The control plane.
    pub(crate) client: CaClient,
    /// The trust bundle.
    pub(crate) bundles: SharedBundles,
    /// The user SVID, for TLS.
    pub(crate) tls: Arc<TlsCredentials>,
}

/// Loads the credentials (`creds::load(creds::config_dir()?)`); refuses an expired user SVID.
pub(crate) fn open() -> Result<Session> {
    let creds = creds::load(&creds::config_dir()?)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if creds.not_after <= now {
        bail!(
            "the user SVID of {} expired {}s ago: run `mayfly login`",
            creds.spiffe_id,
            now - creds.not_after
        );
    }
    let (tls, bundles) = mayfly_sidecar::user::tls::identity(&creds)?;
    let td = mayfly_ca::id::parse_trust_domain(&creds.trust_domain)
        .context("the credentials' trust domain")?;
    let client = CaClient::new(creds.control_plane.clone(), td)
        .with_context(|| format!("control plane address {:?}", creds.control_plane))?;
    Ok(Session {
        creds,
        client,
        bundles,
        tls,
    })
}

impl Session {
    /// One call to the people's API (`GET` when `body` is `None`).
    pub(crate) async fn call<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        Ok(self
            .client
            .user_call(self.bundles.clone(), self.tls.clone(), path, body)
            .await?)
    }
}
