//! SPIFFE IDs and trust domains, parsed strictly.
//!
//! The types are the `spiffe` crate's [`SpiffeId`] and [`TrustDomain`]; this module adds the
//! rules mayfly applies on top of that crate:
//!
//! - the scheme must be written `spiffe://` exactly (the crate accepts any case);
//! - an **uppercase trust domain is rejected**, not normalised. The crate lowercases it, go-spiffe
//!   rejects it. mayfly rejects so that the ID an operator writes in a policy, a token or a
//!   config is byte for byte the ID in the certificate: no two spellings of one identity.
//! - an ID longer than 2048 bytes is rejected (the standard requires support up to 2048).
//! - a *workload* ID (what a leaf SVID carries) must have a non-empty path.
//! - the path namespace `/mayfly/...` is **reserved** for the control plane's own identities
//!   ([`is_reserved`]): no join token, CSR, attestation, renewal or `svid mint` may produce one.

use std::fmt;

pub use spiffe::{SpiffeId, TrustDomain};

/// The longest SPIFFE ID mayfly accepts or emits, in bytes.
pub const MAX_ID_LEN: usize = 2048;

/// Why a string is not an acceptable SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The `spiffe` crate's own validation failed (characters, segments, scheme...).
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    Invalid {
        /// The input, truncated for display.
        input: String,
        /// The rule it broke.
        reason: String,
    },
    /// The scheme is not the lowercase `spiffe://`.
    #[error("invalid SPIFFE ID {0:?}: must start with \"spiffe://\"")]
    Scheme(String),
    /// The trust domain contains uppercase letters.
    #[error(
        "invalid SPIFFE ID {input:?}: trust domain must be lowercase (did you mean {suggestion:?}?)"
    )]
    UppercaseTrustDomain {
        /// The input, truncated for display.
        input: String,
        /// The lowercase spelling.
        suggestion: String,
    },
    /// Longer than [`MAX_ID_LEN`].
    #[error("invalid SPIFFE ID: {len} bytes is longer than the {MAX_ID_LEN}-byte limit")]
    TooLong {
        /// The input's length in bytes.
        len: usize,
    },
    /// The ID names a trust domain only where a workload ID (with a path) is needed.
    #[error("{0} names a trust domain, not a workload: a workload ID needs a path")]
    NoPath(String),
    /// A bare trust domain name (`--trust-domain`) is not valid.
    #[error("invalid trust domain {input:?}: {reason}")]
    InvalidTrustDomain {
        /// The input, truncated for display.
        input: String,
        /// The rule it broke.
        reason: String,
    },
    /// The ID is in the namespace the control plane keeps for itself.
    #[error(
        "{0} is reserved: IDs whose path starts with /{RESERVED_SEGMENT}/ belong to the control plane and are never issued to workloads"
    )]
    Reserved(String),
}

/// The first path segment of the identities the control plane keeps for itself
/// (`spiffe://<td>/mayfly/ca`).
pub const RESERVED_SEGMENT: &str = "mayfly";

/// Whether `id` is in the control plane's reserved namespace: its first path segment is
/// `mayfly` in any ASCII case (`/Mayfly/ca` is another ID for SPIFFE, but one a reader would
/// take for the control plane's, so it is kept back too).
pub fn is_reserved(id: &SpiffeId) -> bool {
    let first = id.path().trim_start_matches('/').split('/').next();
    first.is_some_and(|s| s.eq_ignore_ascii_case(RESERVED_SEGMENT))
}

/// The first path segment of people's identities (`spiffe://<td>/user/<name>`): issued only in
/// exchange for a verified sign-in with an identity provider (and by `svid mint`, the
/// administrator's offline break-glass), never by join token, attestation or renewal.
pub const USER_SEGMENT: &str = "user";

/// Whether `id` names a person: its first path segment is `user` in any ASCII case (as for
/// [`is_reserved`], a look-alike spelling is kept back too).
pub fn is_user(id: &SpiffeId) -> bool {
    let first = id.path().trim_start_matches('/').split('/').next();
    first.is_some_and(|s| s.eq_ignore_ascii_case(USER_SEGMENT))
}

/// Why a sign-in's claim cannot name a user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} cannot be a SPIFFE path segment (1 to 255 of the letters, digits, '.', '-' and '_', not \".\" or \"..\"): map another claim with user_claim"
)]
pub struct NotASegment(pub String);

/// The user SPIFFE ID `spiffe://<td>/user/<name>` for a sign-in's mapped claim. `name` must be
/// one valid path segment as it is: nothing is rewritten, so two people can never be folded
/// into one ID.
pub fn user_id(td: &TrustDomain, name: &str) -> Result<SpiffeId, NotASegment> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !ok {
        return Err(NotASegment(shown(name)));
    }
    parse_workload_id(&format!("spiffe://{td}/{USER_SEGMENT}/{name}"))
        .map_err(|_| NotASegment(shown(name)))
}

const SCHEME: &str = "spiffe://";

fn shown(s: &str) -> String {
    if s.len() <= 128 {
        s.to_owned()
    } else {
        let mut end = 128;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// Parses any SPIFFE ID (a trust domain ID such as `spiffe://example.org` is accepted).
///
/// The grammar is the workspace's one SPIFFE ID grammar, [`mayfly_policy::validate_spiffe_id`]
/// (the policy crate is the lowest that needs it; its tests hold the SPIFFE.md vectors); this
/// function turns its verdict into the typed [`SpiffeId`].
pub fn parse_id(s: &str) -> Result<SpiffeId, IdError> {
    use mayfly_policy::IdError as Rule;
    match mayfly_policy::validate_spiffe_id(s) {
        Ok(()) => {}
        Err(Rule::Scheme) => return Err(IdError::Scheme(shown(s))),
        Err(Rule::TooLong) => return Err(IdError::TooLong { len: s.len() }),
        Err(Rule::TrustDomainUppercase(lower)) => {
            let rest = s.get(SCHEME.len()..).unwrap_or_default();
            let td_len = rest.find('/').unwrap_or(rest.len());
            return Err(IdError::UppercaseTrustDomain {
                input: shown(s),
                suggestion: format!("{SCHEME}{lower}{}", &rest[td_len..]),
            });
        }
        Err(rule) => {
            return Err(IdError::Invalid {
                input: shown(s),
                reason: rule.to_string(),
            });
        }
    }
    SpiffeId::new(s).map_err(|e| IdError::Invalid {
        input: shown(s),
        reason: e.to_string(),
    })
}

/// Parses a workload SPIFFE ID: like [`parse_id`], and the path must be non-empty.
pub fn parse_workload_id(s: &str) -> Result<SpiffeId, IdError> {
    let id = parse_id(s)?;
    if id.path().is_empty() {
        return Err(IdError::NoPath(shown(s)));
    }
    Ok(id)
}

/// Parses an ID that may be issued to a workload: a workload ID ([`parse_workload_id`]) outside
/// the control plane's reserved namespace ([`is_reserved`]).
pub fn parse_issuable_id(s: &str) -> Result<SpiffeId, IdError> {
    let id = parse_workload_id(s)?;
    if is_reserved(&id) {
        return Err(IdError::Reserved(shown(s)));
    }
    Ok(id)
}

/// Parses a trust domain name (`example.org`, not `spiffe://example.org`), lowercase only.
/// Errors name the trust domain as given, never a SPIFFE ID the user did not write.
pub fn parse_trust_domain(s: &str) -> Result<TrustDomain, IdError> {
    let bad = |reason: String| IdError::InvalidTrustDomain {
        input: shown(s),
        reason,
    };
    if s.contains(':') || s.contains('/') {
        return Err(bad(
            "a trust domain is a bare name such as example.org".into()
        ));
    }
    match parse_id(&format!("{SCHEME}{s}")) {
        Ok(id) => Ok(id.trust_domain().clone()),
        Err(IdError::UppercaseTrustDomain { .. }) => Err(bad(format!(
            "it must be lowercase (did you mean {:?}?)",
            s.to_ascii_lowercase()
        ))),
        Err(IdError::Invalid { reason, .. }) => Err(bad(reason)),
        Err(IdError::TooLong { .. }) => Err(bad(format!(
            "{} bytes is longer than a trust domain may be",
            s.len()
        ))),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Displays a trust domain as its SPIFFE ID (`spiffe://example.org`).
pub struct TrustDomainId<'a>(pub &'a TrustDomain);

impl fmt::Display for TrustDomainId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SPIFFE.md vectors themselves are tested once, against the grammar, in
    /// `policy/tests/spiffe_ids.rs`; here: that the typed parse agrees with it on both sides.
    #[test]
    fn the_typed_parse_agrees_with_the_one_grammar() {
        for v in [
            "spiffe://example.org/ns/staging/sa/default",
            "spiffe://trustdomain",
            "spiffe://trustdomain/...",
            "spiffe://1.2.3.4/service",
        ] {
            assert_eq!(parse_id(v).unwrap().to_string(), v);
        }
        for v in [
            "",
            "spiffe://td/",
            "spiffe://td/a//b",
            "spiffe://td:8080/a",
            "SPIFFE://td/a",
        ] {
            assert!(parse_id(v).is_err(), "{v:?}");
            assert!(mayfly_policy::validate_spiffe_id(v).is_err(), "{v:?}");
        }
    }

    #[test]
    fn path_is_case_sensitive() {
        let a = parse_id("spiffe://example.org/MyService").unwrap();
        let b = parse_id("spiffe://example.org/myservice").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn uppercase_trust_domain_is_rejected_with_a_suggestion() {
        let err = parse_id("spiffe://Example.ORG/web").unwrap_err();
        assert!(
            err.to_string().contains("spiffe://example.org/web"),
            "{err}"
        );
        assert!(parse_trust_domain("Example.org").is_err());
    }

    #[test]
    fn workload_ids_need_a_path() {
        assert!(parse_workload_id("spiffe://trustdomain").is_err());
        assert!(parse_workload_id("spiffe://trustdomain/x").is_ok());
    }

    #[test]
    fn the_control_plane_namespace_is_reserved_in_every_case() {
        for v in [
            "spiffe://td/mayfly/ca",
            "spiffe://td/mayfly",
            "spiffe://td/mayfly/injector",
            "spiffe://td/Mayfly/ca",
            "spiffe://td/MAYFLY/x/y",
        ] {
            assert!(is_reserved(&parse_id(v).unwrap()), "{v}");
            let e = parse_issuable_id(v).unwrap_err();
            assert!(matches!(e, IdError::Reserved(_)), "{v}: {e}");
        }
        for v in [
            "spiffe://td/mayflyer",
            "spiffe://td/ns/mayfly/sa/ca",
            "spiffe://td/web/mayfly",
            "spiffe://mayfly/web",
        ] {
            assert!(!is_reserved(&parse_id(v).unwrap()), "{v}");
            assert!(parse_issuable_id(v).is_ok(), "{v}");
        }
    }

    #[test]
    fn trust_domain_names() {
        assert_eq!(
            parse_trust_domain("mayfly.local").unwrap().as_str(),
            "mayfly.local"
        );
        assert!(parse_trust_domain("spiffe://mayfly.local").is_err());
        let e = parse_trust_domain("Example.org").unwrap_err().to_string();
        assert!(e.starts_with("invalid trust domain \"Example.org\""), "{e}");
        assert!(
            e.contains("\"example.org\"") && !e.contains("SPIFFE ID"),
            "{e}"
        );
        let e = parse_trust_domain("").unwrap_err().to_string();
        assert!(e.starts_with("invalid trust domain"), "{e}");
        assert!(parse_trust_domain("").is_err());
        assert!(parse_trust_domain(&"a".repeat(256)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in "\\PC{0,80}") {
            if let Ok(id) = parse_id(&s) {
                proptest::prop_assert_eq!(id.to_string(), s);
            }
        }

        #[test]
        fn generated_ids_parse(td in "[a-z0-9._-]{1,40}", segs in proptest::collection::vec("[a-zA-Z0-9._-]{1,12}", 1..6)) {
            let segs: Vec<String> = segs.into_iter().filter(|s| s != "." && s != "..").collect();
            proptest::prop_assume!(!segs.is_empty());
            let s = format!("spiffe://{td}/{}", segs.join("/"));
            proptest::prop_assert!(parse_workload_id(&s).is_ok(), "{}", s);
        }
    }

    #[test]
    fn a_user_id_takes_one_valid_segment_as_it_is_and_refuses_anything_else() {
        let td = parse_trust_domain("td").unwrap_or_else(|e| panic!("{e}"));
        let id = user_id(&td, "alice.b-c_9").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(id.to_string(), "spiffe://td/user/alice.b-c_9");
        assert!(is_user(&id));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "alice@example.com",
            "a b",
            "é",
            &"x".repeat(256),
        ] {
            assert!(user_id(&td, bad).is_err(), "{bad:?}");
        }
        let not = parse_id("spiffe://td/users/x").unwrap_or_else(|e| panic!("{e}"));
        assert!(!is_user(&not));
        let look_alike = parse_id("spiffe://td/User/x").unwrap_or_else(|e| panic!("{e}"));
        assert!(is_user(&look_alike));
    }
}
