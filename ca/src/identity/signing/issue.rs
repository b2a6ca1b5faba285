//! Issuing X.509-SVIDs from certificate signing requests.
//!
//! The requester's private key never reaches the CA: it sends a CSR, the CA checks the CSR's
//! signature (proof of possession), checks that it asks for exactly the identity the caller is
//! entitled to and nothing more, and signs a leaf that follows the SPIFFE X.509-SVID profile.

use std::time::Duration;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use time::OffsetDateTime;

use crate::identity::id::{self, MAX_ID_LEN, SpiffeId};
use crate::identity::keys::{SecretKey, random_serial};
use crate::identity::signing::authority::{Authority, AuthorityError, BACKDATE};

/// The shortest SVID TTL mayfly issues.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(1);
/// The longest SVID TTL mayfly issues (policy cap).
pub const MAX_SVID_TTL: Duration = Duration::from_secs(3600);
/// The default SVID TTL.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(300);
/// The largest CSR accepted, in bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused or signing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR is larger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes, larger than the {MAX_CSR_LEN}-byte limit")]
    CsrTooLarge(usize),
    /// The CSR is not valid DER, or its signature does not verify (no proof of key possession).
    #[error("CSR is malformed or its signature does not verify: {0}")]
    BadCsr(rcgen::Error),
    /// The CSR's key is not an accepted type.
    #[error("CSR key algorithm is not accepted: use ECDSA P-256 or P-384")]
    KeyAlgorithm,
    /// The CSR names no SPIFFE ID.
    #[error("CSR carries no URI SAN: it must ask for the SPIFFE ID {0} as its only SAN")]
    NoId(String),
    /// The CSR carries other SANs besides the single SPIFFE ID.
    #[error("CSR carries {0} SANs: it must carry exactly one, the SPIFFE ID")]
    ExtraSans(usize),
    /// The CSR asks for an ID that is not the caller's.
    #[error("CSR asks for {asked}, but the caller may only get {allowed}")]
    WrongId {
        /// The ID in the CSR.
        asked: String,
        /// The ID the caller is entitled to.
        allowed: String,
    },
    /// The CSR's URI SAN is not a valid workload SPIFFE ID.
    #[error("CSR asks for an invalid ID: {0}")]
    BadId(#[from] id::IdError),
    /// The ID is in the control plane's reserved namespace (`/mayfly/...`).
    #[error(
        "{0} is reserved for the control plane: IDs whose path starts with /mayfly/ are never issued to workloads"
    )]
    Reserved(String),
    /// The CSR asks for CA rights (cA=true, keyCertSign or cRLSign).
    #[error("CSR asks for CA rights ({0}): SVIDs are never CAs")]
    AsksForCa(&'static str),
    /// The requested TTL is outside the allowed range.
    #[error("requested TTL {0:?} is outside 1s..=60m")]
    Ttl(Duration),
    /// No active signing authority (should not happen on a healthy CA).
    #[error("no active signing authority")]
    NoSigner,
    /// The signing authority has expired.
    #[error("signing authority expired at {0}")]
    SignerExpired(OffsetDateTime),
    /// Signing failed in the crypto layer.
    #[error("signing failed: {0}")]
    Sign(#[from] AuthorityError),
}

impl IssueError {
    /// A short machine-readable reason, for metrics labels and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            IssueError::CsrTooLarge(_) => "csr_too_large",
            IssueError::BadCsr(_) => "bad_csr",
            IssueError::KeyAlgorithm => "key_algorithm",
            IssueError::NoId(_) => "no_id",
            IssueError::ExtraSans(_) => "extra_sans",
            IssueError::WrongId { .. } => "wrong_id",
            IssueError::BadId(id::IdError::Reserved(_)) | IssueError::Reserved(_) => "reserved_id",
            IssueError::BadId(_) => "bad_id",
            IssueError::AsksForCa(_) => "asks_for_ca",
            IssueError::Ttl(_) => "ttl",
            IssueError::NoSigner | IssueError::SignerExpired(_) | IssueError::Sign(_) => "internal",
        }
    }
}

/// A freshly signed SVID.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// The SPIFFE ID.
    pub id: SpiffeId,
    /// Leaf first, then the intermediate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Serial, lowercase hex.
    pub serial: String,
    /// Validity start (backdated).
    pub not_before: OffsetDateTime,
    /// Validity end.
    pub not_after: OffsetDateTime,
}

/// A verified CSR: the public key, and the ID it asks for.
pub struct VerifiedCsr {
    params: CertificateSigningRequestParams,
    /// The SPIFFE ID the CSR asks for.
    pub id: SpiffeId,
}

/// Parses a DER CSR, verifies its signature and checks it asks for a workload SVID and nothing
/// more (one URI SAN, no CA rights).
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, IssueError> {
    if der.len() > MAX_CSR_LEN {
        return Err(IssueError::CsrTooLarge(der.len()));
    }
    let params =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(IssueError::BadCsr)?;
    let alg = params.public_key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Err(IssueError::KeyAlgorithm);
    }
    if let IsCa::Ca(_) = params.params.is_ca {
        return Err(IssueError::AsksForCa("cA=true"));
    }
    for ku in &params.params.key_usages {
        match ku {
            KeyUsagePurpose::KeyCertSign => return Err(IssueError::AsksForCa("keyCertSign")),
            KeyUsagePurpose::CrlSign => return Err(IssueError::AsksForCa("cRLSign")),
            _ => {}
        }
    }
    let sans = &params.params.subject_alt_names;
    let uri = match sans.as_slice() {
        [] => return Err(IssueError::NoId(String::from("of the caller"))),
        [SanType::URI(u)] => u.as_str().to_owned(),
        [_] => return Err(IssueError::NoId(String::from("of the caller"))),
        many => return Err(IssueError::ExtraSans(many.len())),
    };
    let id = id::parse_workload_id(&uri)?;
    if id::is_reserved(&id) {
        return Err(IssueError::Reserved(id.to_string()));
    }
    Ok(VerifiedCsr { params, id })
}

/// Signs an SVID for a verified CSR.
///
/// `allowed` is the one ID the caller may get (from its join token, its current SVID or its
/// attestation); the CSR must ask for exactly that ID. The TTL is capped by [`MAX_SVID_TTL`] and
/// by the signer's NotAfter.
pub fn issue(
    signer: &Authority,
    csr: &VerifiedCsr,
    allowed: &SpiffeId,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<IssuedSvid, IssueError> {
    if &csr.id != allowed {
        return Err(IssueError::WrongId {
            asked: csr.id.to_string(),
            allowed: allowed.to_string(),
        });
    }
    sign_leaf_with(
        signer,
        &csr.params.public_key,
        &csr.id,
        Leaf::Workload,
        ttl,
        now,
    )
}

/// Signs a workload SVID for a key the CA itself holds (`svid mint`). Reserved IDs are refused
/// as for a CSR.
pub fn issue_for_key(
    signer: &Authority,
    key: &SecretKey,
    id: &SpiffeId,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<IssuedSvid, IssueError> {
    let kp = key
        .key_pair()
        .map_err(|e| IssueError::Sign(AuthorityError::Key(e)))?;
    sign_leaf_with(signer, &kp, id, Leaf::Workload, ttl, now)
}

/// Signs the control plane's own serving SVID: an ID in the reserved namespace, the
/// control-plane mark in its subject ([`crate::identity::svid::CONTROL_PLANE_OU`]), and extra DNS names
/// or IP addresses beside the SPIFFE ID (so that `curl --cacert bundle.pem
/// https://localhost:8443/...` verifies). The only way to sign a reserved ID; the control plane
/// calls it for itself, never on anyone's request.
pub fn issue_control_plane_svid(
    signer: &Authority,
    key: &SecretKey,
    id: &SpiffeId,
    names: &[String],
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<IssuedSvid, IssueError> {
    let kp = key
        .key_pair()
        .map_err(|e| IssueError::Sign(AuthorityError::Key(e)))?;
    let mut extra = Vec::with_capacity(names.len());
    for n in names {
        match n.parse::<std::net::IpAddr>() {
            Ok(ip) => extra.push(SanType::IpAddress(ip)),
            Err(_) => extra.push(SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|_| IssueError::BadId(id::IdError::NoPath(n.clone())))?,
            )),
        }
    }
    sign_leaf_with(signer, &kp, id, Leaf::ControlPlane(extra), ttl, now)
}

/// What kind of leaf is signed.
enum Leaf {
    /// A workload's SVID: never a reserved ID, never extra names.
    Workload,
    /// The control plane's own: a reserved ID, the control-plane mark, these extra names.
    ControlPlane(Vec<SanType>),
}

/// The one function that signs leaves: every issuance path goes through it, so the reserved
/// namespace holds whichever caller asks.
fn sign_leaf_with(
    signer: &Authority,
    public_key: &impl rcgen::PublicKeyData,
    id: &SpiffeId,
    leaf: Leaf,
    ttl: Duration,
    now: OffsetDateTime,
) -> Result<IssuedSvid, IssueError> {
    match (&leaf, id::is_reserved(id)) {
        (Leaf::Workload, true) => return Err(IssueError::Reserved(id.to_string())),
        (Leaf::ControlPlane(_), false) => {
            return Err(IssueError::BadId(id::IdError::Invalid {
                input: id.to_string(),
                reason: "the control plane's own ID must be in the reserved namespace".into(),
            }));
        }
        _ => {}
    }
    if !(MIN_SVID_TTL..=MAX_SVID_TTL).contains(&ttl) {
        return Err(IssueError::Ttl(ttl));
    }
    let id_text = id.to_string();
    if id_text.len() > MAX_ID_LEN || id.path().is_empty() {
        return Err(IssueError::BadId(id::IdError::NoPath(id_text)));
    }
    if signer.not_after <= now {
        return Err(IssueError::SignerExpired(signer.not_after));
    }
    let mut p = CertificateParams::default();
    let serial = random_serial();
    let serial_hex = crate::identity::svid::serial_hex(&serial.to_bytes());
    p.serial_number = Some(serial);
    let not_before = now - time::Duration::seconds(BACKDATE.as_secs() as i64);
    let wanted = now + time::Duration::seconds(ttl.as_secs() as i64);
    let not_after = wanted.min(signer.not_after);
    p.not_before = not_before;
    p.not_after = not_after;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "mayfly");
    if let Leaf::ControlPlane(_) = leaf {
        p.distinguished_name.push(
            DnType::OrganizationalUnitName,
            crate::identity::svid::CONTROL_PLANE_OU,
        );
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let uri = id_text
        .clone()
        .try_into()
        .map_err(|_| IssueError::BadId(id::IdError::NoPath(id_text.clone())))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    if let Leaf::ControlPlane(extra_names) = leaf {
        p.subject_alt_names.extend(extra_names);
    }
    p.use_authority_key_identifier_extension = true;
    let issuer = signer.issuer()?;
    let cert = p
        .signed_by(public_key, &issuer)
        .map_err(|e| IssueError::Sign(AuthorityError::Sign(e)))?;
    Ok(IssuedSvid {
        id: id.clone(),
        chain: vec![cert.der().clone(), signer.cert.clone()],
        serial: serial_hex,
        not_before,
        not_after,
    })
}

/// Builds a CSR for `id` signed by `key` (what a sidecar sends).
pub fn make_csr(key: &SecretKey, id: &SpiffeId) -> Result<Vec<u8>, IssueError> {
    let kp = key
        .key_pair()
        .map_err(|e| IssueError::Sign(AuthorityError::Key(e)))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|_| IssueError::BadId(id::IdError::NoPath(id.to_string())))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    let csr = p
        .serialize_request(&kp)
        .map_err(|e| IssueError::Sign(AuthorityError::Sign(e)))?;
    Ok(csr.der().to_vec())
}
