//! A test issuer: an RSA and a P-256 key, their JWK Set, and real signed tokens.

#![allow(clippy::expect_used, missing_docs)]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// Signs Kubernetes-like service-account tokens.
pub struct TestIssuer {
    /// `iss` of the tokens.
    pub issuer: String,
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
}

/// (n, e) from a DER RSAPublicKey.
fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    fn tlv(b: &[u8]) -> (u8, &[u8], &[u8]) {
        let tag = b[0];
        let (len, hdr) = if b[1] < 0x80 {
            (b[1] as usize, 2)
        } else {
            let n = (b[1] & 0x7f) as usize;
            let mut l = 0usize;
            for x in &b[2..2 + n] {
                l = (l << 8) | *x as usize;
            }
            (l, 2 + n)
        };
        (tag, &b[hdr..hdr + len], &b[hdr + len..])
    }
    let (_, seq, _) = tlv(der);
    let (_, n, rest) = tlv(seq);
    let (_, e, _) = tlv(rest);
    let strip = |x: &[u8]| {
        let i = x.iter().position(|b| *b != 0).unwrap_or(x.len());
        x[i..].to_vec()
    };
    (strip(n), strip(e))
}

impl TestIssuer {
    /// New keys (an RSA-2048 key takes a moment).
    pub fn new(issuer: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            rsa: RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key"),
            ec: EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING)
                .expect("EC key"),
        }
    }

    /// The JWK Set: `rsa-1` (RS256) and `ec-1` (ES256).
    pub fn jwks(&self) -> String {
        let (n, e) = rsa_components(self.rsa.public_key().as_ref());
        let point = self.ec.public_key().as_ref();
        json!({ "keys": [
            { "use": "sig", "kty": "RSA", "kid": "rsa-1", "alg": "RS256",
              "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e) },
            { "use": "sig", "kty": "EC", "kid": "ec-1", "alg": "ES256", "crv": "P-256",
              "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]) },
        ]})
        .to_string()
    }

    /// The claims the kubelet's token for `ns`/`sa` carries, issued at `now`, 600 s.
    pub fn claims(&self, ns: &str, sa: &str, now: i64) -> Value {
        json!({
            "aud": ["mayfly"],
            "exp": now + 600,
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {
                "namespace": ns,
                "pod": { "name": format!("{sa}-7d9f8-abcde"), "uid": "0b1c5a2e-0000-4000-8000-000000000001" },
                "serviceaccount": { "name": sa, "uid": "0b1c5a2e-0000-4000-8000-000000000002" },
            },
        })
    }

    /// A token with `header` and `claims`, signed with the key `alg` names.
    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        let msg = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = SystemRandom::new();
        let sig = if header["alg"] == "ES256" {
            self.ec
                .sign(&rng, msg.as_bytes())
                .expect("sign")
                .as_ref()
                .to_vec()
        } else {
            let mut sig = vec![0u8; self.rsa.public_modulus_len()];
            self.rsa
                .sign(&signature::RSA_PKCS1_SHA256, &rng, msg.as_bytes(), &mut sig)
                .expect("sign");
            sig
        };
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// An RS256 token (kid `rsa-1`).
    pub fn rs256(&self, claims: &Value) -> String {
        self.sign_raw(
            &json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}),
            claims,
        )
    }

    /// An ES256 token (kid `ec-1`).
    pub fn es256(&self, claims: &Value) -> String {
        self.sign_raw(
            &json!({"alg": "ES256", "kid": "ec-1", "typ": "JWT"}),
            claims,
        )
    }
}
