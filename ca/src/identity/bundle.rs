//! SPIFFE trust bundles: the roots of one trust domain, as a JWK Set or PEM, and a set of them
//! kept apart by trust domain (a peer is only ever checked against its own domain's roots).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use webpki::anchor_from_trusted_cert;

use crate::identity::id::TrustDomain;
use crate::identity::keys::{pem_encode, sha256};
use crate::identity::svid::{ProfileError, check_ca, spki_der};

/// The default `spiffe_refresh_hint`: how often holders should refresh, in seconds.
pub const DEFAULT_REFRESH_HINT: Duration = Duration::from_secs(60);

/// Why a bundle could not be read or built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// Not JSON, or not a JWK Set.
    #[error("bundle is not a valid SPIFFE JWK Set: {0}")]
    Json(String),
    /// An `x509-svid` key does not have exactly one certificate in `x5c`.
    #[error("x509-svid key #{index} must carry exactly one certificate in x5c, found {found}")]
    X5cCount {
        /// Position in `keys`.
        index: usize,
        /// How many it carried.
        found: usize,
    },
    /// A certificate is not valid base64 or PEM.
    #[error("bundle certificate #{index} is not decodable: {reason}")]
    Encoding {
        /// Position in the bundle.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A certificate is not an acceptable CA certificate.
    #[error("bundle certificate #{index} is not a usable CA certificate: {source}")]
    NotCa {
        /// Position in the bundle.
        index: usize,
        /// The profile check that failed.
        source: ProfileError,
    },
    /// A CA certificate names another trust domain.
    #[error("bundle certificate #{index} belongs to {found}, not to {expected}")]
    ForeignDomain {
        /// Position in the bundle.
        index: usize,
        /// The bundle's trust domain.
        expected: String,
        /// The domain in the certificate.
        found: String,
    },
    /// The PEM input holds no certificate.
    #[error("PEM bundle holds no certificate")]
    Empty,
}

/// A JWT-SVID signing key of a bundle (a `jwt-svid` JWK): an EC public key under its `kid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key ID tokens name in their header.
    pub kid: String,
    /// `P-256` or `P-384`.
    pub crv: String,
    /// The X coordinate, base64url.
    pub x: String,
    /// The Y coordinate, base64url.
    pub y: String,
}

impl JwtKey {
    /// The JWK form of a SubjectPublicKeyInfo (DER) of an EC key.
    pub fn from_spki(kid: &str, spki: &[u8]) -> Option<Self> {
        use x509_parser::prelude::FromDer;
        let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).ok()?;
        let (crv, x, y) = ec_point(&info.subject_public_key.data)?;
        Some(Self {
            kid: kid.to_owned(),
            crv: crv.to_owned(),
            x,
            y,
        })
    }
}

/// The roots of one trust domain, and its JWT-SVID keys.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    jwt_keys: Vec<JwtKey>,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
    sequence: u64,
    refresh_hint: Duration,
}

#[derive(Serialize, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    #[serde(rename = "use", default)]
    use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kty: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    x5c: Option<Vec<String>>,
}

/// EC public key coordinates of a certificate, for the JWK's kty/crv/x/y.
fn ec_coordinates(cert: &[u8]) -> Option<(&'static str, String, String)> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
    ec_point(&c.public_key().subject_public_key.data)
}

/// The curve and base64url coordinates of an uncompressed EC point.
fn ec_point(pk: &[u8]) -> Option<(&'static str, String, String)> {
    let (crv, n) = match pk.len() {
        65 => ("P-256", 32),
        97 => ("P-384", 48),
        _ => return None,
    };
    if pk.first() != Some(&4) {
        return None;
    }
    Some((
        crv,
        URL_SAFE_NO_PAD.encode(&pk[1..1 + n]),
        URL_SAFE_NO_PAD.encode(&pk[1 + n..]),
    ))
}

impl TrustBundle {
    /// Builds a bundle, checking each root is a CA certificate of this trust domain.
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
        sequence: u64,
        refresh_hint: Duration,
    ) -> Result<Self, BundleError> {
        let mut anchors = Vec::with_capacity(roots.len());
        for (index, root) in roots.iter().enumerate() {
            match check_ca(root) {
                Ok(Some(id)) if id.trust_domain() != &trust_domain => {
                    return Err(BundleError::ForeignDomain {
                        index,
                        expected: trust_domain.to_string(),
                        found: id.trust_domain().to_string(),
                    });
                }
                Ok(_) => {}
                Err(source) => return Err(BundleError::NotCa { index, source }),
            }
            let anchor = anchor_from_trusted_cert(root).map_err(|e| BundleError::Encoding {
                index,
                reason: e.to_string(),
            })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self {
            trust_domain,
            roots,
            jwt_keys: Vec::new(),
            anchors,
            sequence,
            refresh_hint,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificates.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The same bundle publishing `keys` as its JWT-SVID keys.
    pub fn with_jwt_keys(mut self, keys: Vec<JwtKey>) -> Self {
        self.jwt_keys = keys;
        self
    }

    /// The JWT-SVID keys.
    pub fn jwt_keys(&self) -> &[JwtKey] {
        &self.jwt_keys
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[rustls_pki_types::TrustAnchor<'static>] {
        &self.anchors
    }

    /// `spiffe_sequence`.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// `spiffe_refresh_hint`.
    pub fn refresh_hint(&self) -> Duration {
        self.refresh_hint
    }

    /// The SPIFFE JWK Set form.
    pub fn to_jwks(&self) -> String {
        let keys = self
            .roots
            .iter()
            .map(|r| {
                let (kty, crv, x, y) = match ec_coordinates(r) {
                    Some((crv, x, y)) => (Some("EC".into()), Some(crv.into()), Some(x), Some(y)),
                    None => (None, None, None, None),
                };
                Jwk {
                    use_: Some("x509-svid".into()),
                    kty,
                    crv,
                    x,
                    y,
                    kid: None,
                    x5c: Some(vec![STANDARD.encode(r)]),
                }
            })
            .chain(self.jwt_keys.iter().map(|k| Jwk {
                use_: Some("jwt-svid".into()),
                kty: Some("EC".into()),
                crv: Some(k.crv.clone()),
                x: Some(k.x.clone()),
                y: Some(k.y.clone()),
                kid: Some(k.kid.clone()),
                x5c: None,
            }))
            .collect();
        let jwks = Jwks {
            keys,
            spiffe_sequence: Some(self.sequence),
            spiffe_refresh_hint: Some(self.refresh_hint.as_secs()),
        };
        serde_json::to_string_pretty(&jwks).unwrap_or_default()
    }

    /// The JWT bundle: a JWK Set of the JWT-SVID keys alone, as the Workload API's
    /// FetchJWTBundles hands it out (what go-spiffe, py-spiffe and the `spiffe` crate parse).
    pub fn jwt_jwks(&self) -> String {
        let keys: Vec<serde_json::Value> = self
            .jwt_keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "EC", "crv": k.crv, "x": k.x, "y": k.y, "kid": k.kid,
                })
            })
            .collect();
        serde_json::json!({ "keys": keys }).to_string()
    }

    /// Reads a SPIFFE JWK Set. `jwt-svid` entries must have a `kid`; EC ones are kept as
    /// [`JwtKey`]s (others cannot verify an ES256/ES384 token and are skipped). An empty `keys`
    /// yields an empty bundle (every key revoked).
    pub fn from_jwks(trust_domain: TrustDomain, json: &str) -> Result<Self, BundleError> {
        let jwks: Jwks =
            serde_json::from_str(json).map_err(|e| BundleError::Json(e.to_string()))?;
        let mut roots = Vec::new();
        let mut jwt_keys = Vec::new();
        for (index, key) in jwks.keys.iter().enumerate() {
            match key.use_.as_deref() {
                Some("x509-svid") => {}
                Some("jwt-svid") => {
                    let Some(kid) = key.kid.clone() else {
                        return Err(BundleError::Json(format!(
                            "jwt-svid key #{index} has no kid"
                        )));
                    };
                    if let (Some("EC"), Some(crv), Some(x), Some(y)) =
                        (key.kty.as_deref(), &key.crv, &key.x, &key.y)
                    {
                        jwt_keys.push(JwtKey {
                            kid,
                            crv: crv.clone(),
                            x: x.clone(),
                            y: y.clone(),
                        });
                    }
                    continue;
                }
                // Uses this version does not know (e.g. "wit-svid") are ignored, as the
                // bundle standard asks.
                Some(_) => continue,
                None => return Err(BundleError::Json(format!("key #{index} has no use"))),
            }
            let x5c = key.x5c.as_deref().unwrap_or_default();
            if x5c.len() != 1 {
                return Err(BundleError::X5cCount {
                    index,
                    found: x5c.len(),
                });
            }
            let der = STANDARD
                .decode(&x5c[0])
                .map_err(|e| BundleError::Encoding {
                    index,
                    reason: e.to_string(),
                })?;
            roots.push(CertificateDer::from(der));
        }
        Ok(Self::new(
            trust_domain,
            roots,
            jwks.spiffe_sequence.unwrap_or(0),
            Duration::from_secs(
                jwks.spiffe_refresh_hint
                    .unwrap_or(DEFAULT_REFRESH_HINT.as_secs()),
            ),
        )?
        .with_jwt_keys(jwt_keys))
    }

    /// The roots as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| pem_encode("CERTIFICATE", r))
            .collect()
    }

    /// Reads PEM roots.
    pub fn from_pem(trust_domain: TrustDomain, pem: &str) -> Result<Self, BundleError> {
        let mut roots = Vec::new();
        for (index, c) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
            roots.push(c.map_err(|e| BundleError::Encoding {
                index,
                reason: e.to_string(),
            })?);
        }
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Self::new(trust_domain, roots, 0, DEFAULT_REFRESH_HINT)
    }

    /// SHA-256 hashes (hex) of each root's SubjectPublicKeyInfo: what a join token pins.
    pub fn root_pins(&self) -> Vec<String> {
        self.roots
            .iter()
            .filter_map(|r| spki_der(r).ok())
            .map(|spki| hex::encode(sha256(&spki)))
            .collect()
    }

    /// Whether a pin (hex SHA-256 of a root's SPKI) matches one of this bundle's roots.
    pub fn matches_pin(&self, pin: &str) -> bool {
        self.root_pins().iter().any(|p| p.eq_ignore_ascii_case(pin))
    }
}

/// Bundles of several trust domains, kept apart.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    by_domain: HashMap<TrustDomain, Arc<TrustBundle>>,
}

impl BundleSet {
    /// A set holding one bundle.
    pub fn single(bundle: TrustBundle) -> Self {
        let mut s = Self::default();
        s.insert(bundle);
        s
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.by_domain
            .insert(bundle.trust_domain().clone(), Arc::new(bundle));
    }

    /// The bundle of a trust domain, if any.
    pub fn get(&self, td: &TrustDomain) -> Option<&Arc<TrustBundle>> {
        self.by_domain.get(td)
    }

    /// Every bundle.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<TrustBundle>> {
        self.by_domain.values()
    }
}
