//! Turns a certificate into an identity: the X.509-SVID profile checks (SPIFFE X509-SVID §4, §5).
//!
//! This module only reads certificates. Chain and signature checks live in [`crate::identity::verify`].

use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::identity::id::{self, IdError, SpiffeId};

/// What an SVID leaf says about its holder, after the profile checks passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The SPIFFE ID in the single URI SAN.
    pub id: SpiffeId,
    /// The serial number, lowercase hex without leading zero bytes.
    pub serial: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Why a certificate is not an acceptable X.509-SVID (leaf or signing certificate).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// Not a DER X.509 certificate, or trailing bytes after it.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// An extension appears twice or cannot be decoded.
    #[error("certificate extensions are malformed: {0}")]
    Extensions(String),
    /// The leaf has no URI SAN at all.
    #[error("leaf has no URI SAN: an X.509-SVID carries its SPIFFE ID as exactly one URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN.
    #[error("leaf has {0} URI SANs: an X.509-SVID carries exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("URI SAN is not a valid SPIFFE ID: {0}")]
    BadId(IdError),
    /// The leaf's SPIFFE ID has no path (it names a trust domain).
    #[error(
        "leaf SPIFFE ID {0} has no path: only signing certificates may carry a trust domain ID"
    )]
    RootPathId(String),
    /// basicConstraints is absent from the leaf.
    #[error("leaf has no basicConstraints extension (cA=false must be explicit)")]
    NoBasicConstraints,
    /// The leaf says cA=true.
    #[error("leaf is a CA certificate (cA=true)")]
    LeafIsCa,
    /// keyUsage is absent or not critical.
    #[error("keyUsage must be present and critical")]
    KeyUsageNotCritical,
    /// The leaf may sign certificates.
    #[error("leaf has keyCertSign in keyUsage")]
    LeafKeyCertSign,
    /// The leaf may sign CRLs.
    #[error("leaf has cRLSign in keyUsage")]
    LeafCrlSign,
    /// The leaf lacks digitalSignature.
    #[error("leaf lacks digitalSignature in keyUsage")]
    NoDigitalSignature,
    /// Empty subject with a non-critical SAN extension (RFC 5280 §4.2.1.6).
    #[error("subject is empty but the SAN extension is not critical")]
    EmptySubjectSanNotCritical,
    /// A signing certificate without cA=true.
    #[error("signing certificate is not a CA (cA=true missing)")]
    NotCa,
    /// A signing certificate without keyCertSign.
    #[error("signing certificate lacks keyCertSign")]
    CaNoKeyCertSign,
    /// A signing certificate carrying a SPIFFE ID with a path.
    #[error("signing certificate carries SPIFFE ID {0} with a path")]
    CaIdWithPath(String),
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, ProfileError> {
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Ok(cert),
        Ok(_) => Err(ProfileError::Parse(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(ProfileError::Parse(e.to_string())),
    }
}

fn ext_err(e: impl std::fmt::Display) -> ProfileError {
    ProfileError::Extensions(e.to_string())
}

/// The URI SANs of a certificate, and whether the SAN extension is critical.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<(Vec<&'a str>, bool), ProfileError> {
    let Some(san) = cert.subject_alternative_name().map_err(ext_err)? else {
        return Ok((Vec::new(), false));
    };
    let uris = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    Ok((uris, san.critical))
}

/// Hex of a serial number without leading zero bytes (as `openssl x509 -serial` prints it,
/// in lowercase).
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[start..])
}

/// Checks a leaf X.509-SVID against the profile and returns the identity it carries.
///
/// Does not check signatures or validity times: [`crate::identity::verify`] does, after this passes.
pub fn check_leaf(der: &[u8]) -> Result<SvidInfo, ProfileError> {
    let cert = parse(der)?;
    let (uris, san_critical) = uri_sans(&cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(ProfileError::NoUriSan),
        [one] => *one,
        many => return Err(ProfileError::MultipleUriSans(many.len())),
    };
    let id = id::parse_id(uri).map_err(ProfileError::BadId)?;
    if id.path().is_empty() {
        return Err(ProfileError::RootPathId(id.to_string()));
    }
    if cert.subject().iter().next().is_none() && !san_critical {
        return Err(ProfileError::EmptySubjectSanNotCritical);
    }
    match cert.basic_constraints().map_err(ext_err)? {
        None => return Err(ProfileError::NoBasicConstraints),
        Some(bc) if bc.value.ca => return Err(ProfileError::LeafIsCa),
        Some(_) => {}
    }
    let ku = cert.key_usage().map_err(ext_err)?;
    let ku = match ku {
        Some(ku) if ku.critical => ku.value,
        _ => return Err(ProfileError::KeyUsageNotCritical),
    };
    if !ku.digital_signature() {
        return Err(ProfileError::NoDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(ProfileError::LeafKeyCertSign);
    }
    if ku.crl_sign() {
        return Err(ProfileError::LeafCrlSign);
    }
    Ok(SvidInfo {
        id,
        serial: serial_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// Checks a signing (root or intermediate) certificate against the profile.
///
/// Returns the trust-domain ID it carries, if any.
pub fn check_ca(der: &[u8]) -> Result<Option<SpiffeId>, ProfileError> {
    let cert = parse(der)?;
    match cert.basic_constraints().map_err(ext_err)? {
        Some(bc) if bc.value.ca => {}
        _ => return Err(ProfileError::NotCa),
    }
    match cert.key_usage().map_err(ext_err)? {
        Some(ku) if ku.value.key_cert_sign() => {}
        _ => return Err(ProfileError::CaNoKeyCertSign),
    }
    let (uris, _) = uri_sans(&cert)?;
    let mut found = None;
    for uri in uris {
        if !uri.starts_with("spiffe:") {
            continue;
        }
        let id = id::parse_id(uri).map_err(ProfileError::BadId)?;
        if !id.path().is_empty() {
            return Err(ProfileError::CaIdWithPath(id.to_string()));
        }
        found = Some(id);
    }
    Ok(found)
}

/// The validity window of any certificate.
pub fn validity(der: &[u8]) -> Result<(OffsetDateTime, OffsetDateTime), ProfileError> {
    let cert = parse(der)?;
    Ok((
        cert.validity().not_before.to_datetime(),
        cert.validity().not_after.to_datetime(),
    ))
}

/// The DER SubjectPublicKeyInfo of a certificate (what a join token pins).
pub fn spki_der(der: &[u8]) -> Result<Vec<u8>, ProfileError> {
    let cert = parse(der)?;
    Ok(cert.public_key().raw.to_vec())
}

/// The organizational unit in the subject of the control plane's own SVID, and of no other:
/// the control plane writes it only when it signs its own serving SVID, and sidecars require it
/// (beside the reserved ID) before they take a policy from a server or deliver audit records
/// to it. A certificate for the reserved ID that lacks it (one signed by an older version, or
/// by a path that should not have signed it) is not a control plane.
pub const CONTROL_PLANE_OU: &str = "mayfly control plane";

/// Whether a certificate carries the control-plane mark ([`CONTROL_PLANE_OU`]).
pub fn has_control_plane_mark(der: &[u8]) -> Result<bool, ProfileError> {
    let cert = parse(der)?;
    Ok(cert
        .subject()
        .iter_organizational_unit()
        .any(|ou| ou.as_str() == Ok(CONTROL_PLANE_OU)))
}

/// The subject of a certificate, in RFC 4514 form, for `ca status` and logs.
pub fn subject(der: &[u8]) -> Result<String, ProfileError> {
    Ok(parse(der)?.subject().to_string())
}
