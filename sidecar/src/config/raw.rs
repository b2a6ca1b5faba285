//! The file's shape as serde reads it: every table and key the configuration accepts, before
//! any check (`deny_unknown_fields` everywhere, so a misspelt key is an error).

use std::path::PathBuf;

use serde::Deserialize;

use super::audit::RawAudit;
use super::workload_api::RawWorkloadApi;
use super::{AppProtocol, Protocol, UnderscoreHeaders};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) spiffe_id: String,
    pub(super) control_plane: RawControlPlane,
    /// `[inbound]` (one listener) or `[[inbound]]` (several), read by [`Ctx::inbound`].
    pub(super) inbound: Option<toml::Value>,
    #[serde(default)]
    pub(super) outbound: Vec<RawOutbound>,
    #[serde(default)]
    pub(super) policy: Option<RawPolicy>,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default)]
    pub(super) audit: RawAudit,
    pub(super) workload_api: Option<RawWorkloadApi>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControlPlane {
    pub(super) address: RawAddresses,
    pub(super) token_file: Option<PathBuf>,
    pub(super) token_env: Option<String>,
    pub(super) k8s_token_file: Option<PathBuf>,
    pub(super) ca_pin: Option<String>,
    pub(super) svid_ttl: Option<String>,
}

/// `address = "HOST:PORT"` or `address = ["HOST:PORT", ...]`.
#[derive(Debug)]
pub(super) enum RawAddresses {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for RawAddresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawAddresses;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"HOST:PORT\" or a list of them, [\"HOST:PORT\", ...]")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawAddresses, E> {
                Ok(RawAddresses::One(v.to_owned()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawAddresses, A::Error> {
                let mut list = Vec::new();
                while let Some(a) = seq.next_element::<String>()? {
                    list.push(a);
                }
                Ok(RawAddresses::Many(list))
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbound {
    pub(super) listen: String,
    pub(super) app: String,
    #[serde(default)]
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) app_protocol: AppProtocol,
    pub(super) advertise: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbound {
    pub(super) name: String,
    pub(super) listen: String,
    pub(super) remote: Option<RawRemote>,
    pub(super) spiffe_id: String,
    #[serde(default)]
    pub(super) protocol: Protocol,
    pub(super) port: Option<u16>,
    pub(super) request_timeout: Option<String>,
}

/// `remote = "HOST:PORT"` or `remote = ["HOST:PORT", ...]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawRemote {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_admin")]
    pub(super) listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin(),
        }
    }
}

pub(super) fn default_admin() -> String {
    "127.0.0.1:15000".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) connect_timeout: Option<String>,
    pub(super) handshake_timeout: Option<String>,
    pub(super) idle_timeout: Option<String>,
    pub(super) drain_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) underscore_identity_headers: Option<UnderscoreHeaders>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<usize>,
}
