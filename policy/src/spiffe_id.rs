//! SPIFFE ID validation (SPIFFE-ID.md §2) and the ID patterns used in `from` / `to`.

use std::fmt;

/// Longest SPIFFE ID accepted, in bytes.
pub(crate) const MAX_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub(crate) const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The ID does not start with `spiffe://` (lowercase).
    #[error("a SPIFFE ID starts with `spiffe://`")]
    Scheme,
    /// The ID is longer than 2048 bytes.
    #[error("a SPIFFE ID is at most {MAX_ID_LEN} bytes")]
    TooLong,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// The trust domain has an uppercase letter: mayfly rejects rather than lowercases.
    #[error("the trust domain must be lowercase (write `{0}`)")]
    TrustDomainUppercase(String),
    /// A port (`:`) in the trust domain.
    #[error("a SPIFFE ID has no port")]
    Port,
    /// Userinfo (`@`) in the trust domain.
    #[error("a SPIFFE ID has no userinfo (`@`)")]
    UserInfo,
    /// Percent-encoding anywhere in the ID.
    #[error("a SPIFFE ID has no percent-encoding")]
    PercentEncoded,
    /// A query (`?`) or fragment (`#`).
    #[error("a SPIFFE ID has no query or fragment")]
    QueryOrFragment,
    /// A character outside `[a-z0-9.-_]` in the trust domain.
    #[error("character {0:?} is not allowed in a trust domain (only a-z 0-9 . - _)")]
    TrustDomainChar(char),
    /// An empty path segment (`//` or a trailing `/`).
    #[error("the path has an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("the path has a `.` or `..` segment")]
    DotSegment,
    /// A character outside `[a-zA-Z0-9.-_]` in the path.
    #[error("character {0:?} is not allowed in a SPIFFE ID path (only a-z A-Z 0-9 . - _)")]
    PathChar(char),
}

/// Checks `id` against the SPIFFE ID rules. The root ID `spiffe://td` is valid here.
pub fn validate_spiffe_id(id: &str) -> Result<(), IdError> {
    let rest = id.strip_prefix(SCHEME).ok_or(IdError::Scheme)?;
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    let (td, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    validate_trust_domain(td)?;
    if path.is_empty() {
        return Ok(());
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err(IdError::EmptySegment),
            "." | ".." => return Err(IdError::DotSegment),
            _ => {}
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(match c {
                '%' => IdError::PercentEncoded,
                '?' | '#' => IdError::QueryOrFragment,
                c => IdError::PathChar(c),
            });
        }
    }
    Ok(())
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    for c in td.chars() {
        match c {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            'A'..='Z' => return Err(IdError::TrustDomainUppercase(td.to_ascii_lowercase())),
            ':' => return Err(IdError::Port),
            '@' => return Err(IdError::UserInfo),
            '%' => return Err(IdError::PercentEncoded),
            '?' | '#' => return Err(IdError::QueryOrFragment),
            c => return Err(IdError::TrustDomainChar(c)),
        }
    }
    Ok(())
}

/// True if `id` is a SPIFFE ID with no path (a trust domain's own ID).
fn is_root(id: &str) -> bool {
    id.strip_prefix(SCHEME).is_some_and(|r| !r.contains('/'))
}

/// Why a `from` / `to` entry is not a valid ID pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdPatternError {
    /// The ID (or the part before `/*`) is not a valid SPIFFE ID.
    #[error("invalid SPIFFE ID: {0}")]
    Id(#[from] IdError),
    /// `*` somewhere other than a final `/*`.
    #[error("`*` is only allowed as a final `/*` segment (`spiffe://td/ns/*`, `spiffe://td/*`)")]
    Wildcard,
    /// An exact ID with no path: no workload has it.
    #[error(
        "`{0}` is the trust domain's own ID, which no workload has; write `{0}/*` for every workload in it"
    )]
    RootId(String),
}

/// A `from` / `to` entry: one exact SPIFFE ID, or every ID below a path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdPattern {
    /// Exactly this ID.
    Exact(String),
    /// Every ID that starts with this prefix, which ends with `/` (so it stops on a segment
    /// boundary): `spiffe://td/ns/prod/*` is stored as `spiffe://td/ns/prod/`,
    /// `spiffe://td/*` as `spiffe://td/`.
    Below(String),
}

impl IdPattern {
    /// Parses `spiffe://td/a/b` (exact), `spiffe://td/a/*` (below `/a`) or `spiffe://td/*`
    /// (the whole trust domain).
    pub fn parse(s: &str) -> Result<IdPattern, IdPatternError> {
        if let Some(base) = s.strip_suffix("/*") {
            if base.contains('*') {
                return Err(IdPatternError::Wildcard);
            }
            validate_spiffe_id(base)?;
            return Ok(IdPattern::Below(format!("{base}/")));
        }
        if s.contains('*') {
            return Err(IdPatternError::Wildcard);
        }
        validate_spiffe_id(s)?;
        if is_root(s) {
            return Err(IdPatternError::RootId(s.to_owned()));
        }
        Ok(IdPattern::Exact(s.to_owned()))
    }

    /// True if `id` matches. A `Below` pattern needs at least one more segment.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Exact(e) => e == id,
            IdPattern::Below(p) => id.len() > p.len() && id.starts_with(p.as_str()),
        }
    }

    /// The key this pattern is indexed under (see [`index_keys`]).
    pub(crate) fn key(&self) -> &str {
        match self {
            IdPattern::Exact(s) | IdPattern::Below(s) => s,
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdPattern::Exact(s) => f.write_str(s),
            IdPattern::Below(p) => write!(f, "{p}*"),
        }
    }
}

/// Every index key an ID can be found under: the ID itself, then each prefix that ends with `/`
/// (after the scheme). `IdPattern::matches` is true exactly when its key is among these (and,
/// for `Below`, the ID is longer than the key, which holds for every proper prefix).
pub(crate) fn index_keys(id: &str) -> impl Iterator<Item = &str> {
    let prefixes = id
        .bytes()
        .enumerate()
        .skip(SCHEME.len())
        .filter(|&(i, b)| b == b'/' && i + 1 < id.len())
        .filter_map(move |(i, _)| id.get(..=i));
    // An exact pattern never ends with `/`, and a `Below` key must not match the ID itself.
    let full = (!id.ends_with('/')).then_some(id);
    full.into_iter().chain(prefixes)
}
