//! JWT-SVIDs for the app: minted by the control plane for the sidecar's own SPIFFE ID
//! (`POST /v1/jwtsvid` over the sidecar's mTLS), cached per audience set until half their life;
//! the JWT bundles (each trust domain's `jwt-svid` keys as a JWK Set); and validation of a
//! token against them (signature, `exp`, audience, trust domain).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use mayfly_ca::bundle::BundleSet;
use mayfly_ca::client::CaClient;
use mayfly_ca::id::{SpiffeId, TrustDomainId};
use mayfly_ca::jwt::{JwtError, check_audiences, peek_subject, validate};
use serde_json::Value;
use time::OffsetDateTime;

use crate::identity::Identity;

/// A token held for one audience set.
#[derive(Clone)]
struct Cached {
    token: String,
    issued_at: OffsetDateTime,
    expires_at: OffsetDateTime,
}

impl Cached {
    /// Fresh until half its life has passed.
    fn fresh(&self, now: OffsetDateTime) -> bool {
        now < self.issued_at + (self.expires_at - self.issued_at) / 2
    }
}

/// The most audience sets cached at once (an app asking for ever new ones does not grow it).
const MAX_CACHED: usize = 64;

/// Obtains JWT-SVIDs for the app.
pub struct JwtSource {
    identity: Arc<Identity>,
    client: CaClient,
    cache: Mutex<HashMap<BTreeSet<String>, Cached>>,
}

/// Why a JWT-SVID could not be handed out.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The request is unacceptable (no audience, another SPIFFE ID).
    #[error("{0}")]
    Invalid(String),
    /// The control plane did not mint one.
    #[error("the control plane did not mint a JWT-SVID: {0}")]
    Unavailable(String),
}

impl JwtSource {
    /// A source minting through `client` with the sidecar's SVID.
    pub fn new(identity: Arc<Identity>, client: CaClient) -> Self {
        Self {
            identity,
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The SPIFFE ID tokens are for.
    pub fn id(&self) -> &SpiffeId {
        &self.identity.id
    }

    /// A JWT-SVID for `audience`, and whether it came from the cache. `spiffe_id`, if not
    /// empty, must be the sidecar's own.
    pub async fn fetch(
        &self,
        audience: &[String],
        spiffe_id: &str,
    ) -> Result<(String, bool), FetchError> {
        check_audiences(audience).map_err(|e| FetchError::Invalid(e.to_string()))?;
        if !spiffe_id.is_empty() && spiffe_id != self.identity.id.to_string() {
            return Err(FetchError::Invalid(format!(
                "{spiffe_id} is not this workload's SPIFFE ID ({})",
                self.identity.id
            )));
        }
        let key = mayfly_ca::jwt::audience_key(audience);
        let now = OffsetDateTime::now_utc();
        if let Some(c) = self.cached(&key, now) {
            return Ok((c, true));
        }
        let resp = self
            .client
            .fetch_jwt_svid(
                self.identity.bundles.clone(),
                self.identity.creds.clone(),
                audience,
            )
            .await
            .map_err(|e| FetchError::Unavailable(e.to_string()))?;
        let expires_at = OffsetDateTime::from_unix_timestamp(resp.expires_at)
            .map_err(|e| FetchError::Unavailable(format!("expires_at: {e}")))?;
        if let Ok(mut m) = self.cache.lock() {
            m.retain(|_, c| c.fresh(now));
            if m.len() < MAX_CACHED {
                m.insert(
                    key,
                    Cached {
                        token: resp.token.clone(),
                        issued_at: now,
                        expires_at,
                    },
                );
            }
        }
        Ok((resp.token, false))
    }

    fn cached(&self, key: &BTreeSet<String>, now: OffsetDateTime) -> Option<String> {
        let m = self.cache.lock().ok()?;
        m.get(key).filter(|c| c.fresh(now)).map(|c| c.token.clone())
    }
}

/// Each trust domain's JWT bundle (a JWK Set of its `jwt-svid` keys), by trust domain ID.
pub fn jwt_bundles(set: &BundleSet) -> HashMap<String, Vec<u8>> {
    set.iter()
        .map(|b| {
            (
                TrustDomainId(b.trust_domain()).to_string(),
                b.jwt_jwks().into_bytes(),
            )
        })
        .collect()
}

/// Whether two bundle sets hold the same JWT keys in the same trust domains.
pub fn same_jwt_keys(a: &BundleSet, b: &BundleSet) -> bool {
    let keys = |s: &BundleSet| {
        let mut v: Vec<(String, String)> = s
            .iter()
            .map(|b| (b.trust_domain().to_string(), b.jwt_jwks()))
            .collect();
        v.sort();
        v
    };
    keys(a) == keys(b)
}

/// Validates `token` for `audience` against the bundle of the trust domain it claims: the
/// SPIFFE ID and the claims.
pub fn validate_in(
    set: &BundleSet,
    token: &str,
    audience: &str,
) -> Result<(SpiffeId, prost_types::Struct), JwtError> {
    if audience.is_empty() {
        return Err(JwtError::Audience("the audience is required".into()));
    }
    let id = peek_subject(token)?;
    let bundle = set
        .get(id.trust_domain())
        .ok_or_else(|| JwtError::Invalid(format!("no bundle for the trust domain of {id}")))?;
    let (id, claims) = validate(token, audience, bundle)?;
    Ok((id, to_struct(claims)))
}

fn to_struct(m: serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use mayfly_ca::authority::{Authorities, AuthorityConfig};
    use mayfly_ca::bundle::TrustBundle;
    use mayfly_ca::id::{parse_id, parse_trust_domain};

    use super::*;

    fn authorities(td: &str) -> Authorities {
        Authorities::init(
            parse_trust_domain(td).unwrap(),
            AuthorityConfig::default(),
            OffsetDateTime::now_utc(),
        )
        .unwrap()
    }

    fn bundle_of(a: &Authorities) -> BundleSet {
        let now = OffsetDateTime::now_utc();
        BundleSet::single(
            TrustBundle::new(
                a.trust_domain().clone(),
                a.bundle_roots(now),
                1,
                std::time::Duration::from_secs(60),
            )
            .unwrap()
            .with_jwt_keys(a.bundle_jwt_keys(now)),
        )
    }

    fn mint(a: &Authorities, id: &str, aud: &[&str], now: OffsetDateTime) -> String {
        let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
        mayfly_ca::jwt::mint(
            a.jwt_signer().unwrap(),
            &parse_id(id).unwrap(),
            &aud,
            now,
            now + time::Duration::hours(1),
        )
        .unwrap()
        .token
    }

    #[test]
    fn a_token_validates_only_for_its_audience_its_bundle_and_its_life() {
        let a = authorities("mayfly.test");
        let set = bundle_of(&a);
        let now = OffsetDateTime::now_utc();
        let t = mint(&a, "spiffe://mayfly.test/orders", &["db", "cache"], now);
        let (id, claims) = validate_in(&set, &t, "cache").unwrap();
        assert_eq!(id.to_string(), "spiffe://mayfly.test/orders");
        assert_eq!(
            claims.fields["sub"].kind,
            Some(prost_types::value::Kind::StringValue(
                "spiffe://mayfly.test/orders".into()
            ))
        );
        assert!(matches!(
            claims.fields["aud"].kind,
            Some(prost_types::value::Kind::ListValue(ref l)) if l.values.len() == 2
        ));
        let e = validate_in(&set, &t, "web").unwrap_err();
        assert!(e.to_string().contains("does not validate"), "{e}");
        assert!(validate_in(&set, &t, "").is_err());
        // Another control plane of the same name: its key is not in this bundle.
        let other = authorities("mayfly.test");
        let forged = mint(&other, "spiffe://mayfly.test/orders", &["db"], now);
        let e = validate_in(&set, &forged, "db").unwrap_err();
        assert!(matches!(e, JwtError::UnknownKey(_)), "{e}");
        // A token of another trust domain has no bundle here.
        let foreign = authorities("elsewhere.test");
        let t2 = mint(&foreign, "spiffe://elsewhere.test/x", &["db"], now);
        assert!(validate_in(&set, &t2, "db").is_err());
        // Expired (well past the leeway).
        let old = mint(
            &a,
            "spiffe://mayfly.test/orders",
            &["db"],
            now - time::Duration::minutes(10),
        );
        assert!(validate_in(&set, &old, "db").is_err());
        // Not a JWT at all.
        assert!(validate_in(&set, "not.a.jwt", "db").is_err());
    }

    #[test]
    fn the_jwt_bundle_holds_the_jwt_keys_alone_under_the_trust_domain_id() {
        let a = authorities("mayfly.test");
        let set = bundle_of(&a);
        let b = jwt_bundles(&set);
        let jwks: Value = serde_json::from_slice(&b["spiffe://mayfly.test"]).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys[0]["kid"],
            a.jwt_signer().unwrap().kid().unwrap(),
            "{jwks}"
        );
        assert!(keys[0].get("x5c").is_none());
        assert!(same_jwt_keys(&set, &bundle_of(&a)));
        assert!(!same_jwt_keys(
            &set,
            &bundle_of(&authorities("mayfly.test"))
        ));
    }

    #[test]
    fn a_cached_token_is_fresh_until_half_its_life() {
        let t0 = OffsetDateTime::now_utc();
        let c = Cached {
            token: String::new(),
            issued_at: t0,
            expires_at: t0 + time::Duration::minutes(5),
        };
        assert!(c.fresh(t0 + time::Duration::minutes(2)));
        assert!(!c.fresh(t0 + time::Duration::seconds(150)));
    }
}
