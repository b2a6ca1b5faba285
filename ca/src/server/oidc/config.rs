//! Which OpenID Connect issuers the control plane trusts: `--oidc-issuer URL --oidc-client-id
//! ID` for one, and/or `--oidc-config FILE` with `[[oidc]]` entries:
//!
//! ```toml
//! [[oidc]]
//! issuer = "https://idp.example.com"     # exactly the tokens' `iss`; https (http on loopback only)
//! client_id = "mayfly-cli"               # the audience ID tokens must carry
//! user_claim = "sub"                     # names the user: spiffe://<td>/user/<value>
//! groups_claim = "groups"                # what access requests are decided on
//! svid_ttl = "15m"                       # user SVID life, at most 15m (and never past the token)
//! jwks_max_age = "10m"                   # refetch the JWK Set at least this often
//! ca_file = "/etc/mayfly/idp-ca.pem"     # extra CA certificates for the provider's https
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::MAX_USER_SVID_TTL;
use crate::identity::duration::parse_duration;
use crate::identity::oidc::Url;

/// The default `jwks_max_age`.
pub const DEFAULT_JWKS_MAX_AGE: Duration = Duration::from_secs(600);

/// Why the OpenID Connect configuration is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Not TOML of the expected shape.
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    /// One entry is not acceptable.
    #[error("issuer {issuer:?}: {reason}")]
    Entry {
        /// The entry's issuer.
        issuer: String,
        /// What is wrong.
        reason: String,
    },
    /// The same issuer twice.
    #[error("issuer {0:?} is configured twice")]
    Duplicate(String),
}

/// One trusted issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// The issuer identifier, compared exactly with `iss` and the discovery document's.
    pub issuer: String,
    /// The OAuth client ID: the audience of the ID tokens.
    pub client_id: String,
    /// The claim naming the user (a string that is one SPIFFE path segment).
    pub user_claim: String,
    /// The claim holding the user's groups.
    pub groups_claim: String,
    /// The user SVID's life, at most [`MAX_USER_SVID_TTL`].
    pub svid_ttl: Duration,
    /// How old the cached JWK Set may grow before it is fetched again.
    pub jwks_max_age: Duration,
    /// Extra CA certificates (PEM) for the provider's https.
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    issuer: String,
    client_id: String,
    #[serde(default)]
    user_claim: Option<String>,
    #[serde(default)]
    groups_claim: Option<String>,
    #[serde(default)]
    svid_ttl: Option<String>,
    #[serde(default)]
    jwks_max_age: Option<String>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    oidc: Vec<Entry>,
}

impl IssuerConfig {
    /// An issuer with the defaults (`sub`, `groups`, 15m).
    pub fn new(issuer: &str, client_id: &str) -> Result<Self, ConfigError> {
        Self::checked(Entry {
            issuer: issuer.to_owned(),
            client_id: client_id.to_owned(),
            user_claim: None,
            groups_claim: None,
            svid_ttl: None,
            jwks_max_age: None,
            ca_file: None,
        })
    }

    fn checked(e: Entry) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::Entry {
            issuer: e.issuer.clone(),
            reason,
        };
        Url::issuer(&e.issuer).map_err(|x| bad(x.to_string()))?;
        if e.client_id.trim().is_empty() {
            return Err(bad("client_id must not be empty".into()));
        }
        let claim = |v: Option<String>, default: &str, what: &str| -> Result<String, ConfigError> {
            let c = v.unwrap_or_else(|| default.to_owned());
            if c.trim().is_empty() {
                return Err(bad(format!("{what} must not be empty")));
            }
            Ok(c)
        };
        let user_claim = claim(e.user_claim.clone(), "sub", "user_claim")?;
        let groups_claim = claim(e.groups_claim.clone(), "groups", "groups_claim")?;
        let duration = |v: &Option<String>, default: Duration, what: &str| match v {
            None => Ok(default),
            Some(s) => parse_duration(s).map_err(|x| bad(format!("{what}: {x}"))),
        };
        let svid_ttl = duration(&e.svid_ttl, MAX_USER_SVID_TTL, "svid_ttl")?;
        if svid_ttl.is_zero() || svid_ttl > MAX_USER_SVID_TTL {
            return Err(bad("svid_ttl must be between 1s and 15m".into()));
        }
        let jwks_max_age = duration(&e.jwks_max_age, DEFAULT_JWKS_MAX_AGE, "jwks_max_age")?;
        if jwks_max_age < Duration::from_secs(1) {
            return Err(bad("jwks_max_age must be at least 1s".into()));
        }
        Ok(Self {
            issuer: e.issuer,
            client_id: e.client_id,
            user_claim,
            groups_claim,
            svid_ttl,
            jwks_max_age,
            ca_file: e.ca_file,
        })
    }
}

/// Every trusted issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OidcConfig {
    /// In the order configured.
    pub issuers: Vec<IssuerConfig>,
}

impl OidcConfig {
    /// Parses the text of an `--oidc-config` file (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let f: File =
            toml::from_str(text).map_err(|e| ConfigError::Parse(path.to_owned(), e.to_string()))?;
        let mut c = Self::default();
        for e in f.oidc {
            c.add(IssuerConfig::checked(e)?)?;
        }
        Ok(c)
    }

    /// Reads an `--oidc-config` file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
        Self::parse(&text, path)
    }

    /// Adds an issuer; the same issuer twice is an error.
    pub fn add(&mut self, i: IssuerConfig) -> Result<(), ConfigError> {
        if self.issuers.iter().any(|x| x.issuer == i.issuer) {
            return Err(ConfigError::Duplicate(i.issuer));
        }
        self.issuers.push(i);
        Ok(())
    }
}
