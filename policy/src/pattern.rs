//! HTTP path patterns: exact (`/orders`), prefix (`/orders/**`) and segment globs
//! (`/orders/*/items`). Literal matching only, never regex.

use std::fmt;

use crate::path::{deny_form, normalize_path};

/// Why a path pattern is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern does not start with `/`.
    #[error("a path pattern starts with `/`")]
    NotAbsolute,
    /// `?` or `#`: patterns match the path only.
    #[error("a path pattern matches the path only: remove the `?query` / `#fragment`")]
    QueryOrFragment,
    /// The pattern is not a valid path.
    #[error("invalid path: {0}")]
    Path(#[from] crate::path::PathError),
    /// The pattern is not in normal form; the normal form is given.
    #[error("path is not in normal form; write `{0}`")]
    NotNormal(String),
    /// `**` somewhere other than the final segment.
    #[error("`**` is only allowed as the final segment (`/orders/**`)")]
    DoubleStarNotLast,
    /// `*` inside a segment (`/a*b`): wildcards are whole segments.
    #[error("`*` must be a whole segment (`/orders/*/items`); partial wildcards are not supported")]
    PartialWildcard,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(String),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Exact(String),
    /// Everything that starts with this string, which ends with `/`.
    Prefix(String),
    /// Segment by segment; `true` when the pattern ends with `**`.
    Glob(Vec<Seg>, bool),
}

/// A path pattern, parsed and checked. Build with [`PathPattern::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    kind: Kind,
    /// The pattern in [`deny_form`], for deny rules.
    loose: Kind,
}

impl PathPattern {
    /// Parses a pattern. It must be in the normal form of [`normalize_path`]; `*` stands for
    /// exactly one non-empty segment, a final `**` for one or more segments (any content).
    pub fn parse(s: &str) -> Result<PathPattern, PatternError> {
        if !s.starts_with('/') {
            return Err(PatternError::NotAbsolute);
        }
        if s.contains(['?', '#']) {
            return Err(PatternError::QueryOrFragment);
        }
        let normal = normalize_path(s)?;
        if normal != s {
            return Err(PatternError::NotNormal(normal));
        }
        let kind = kind_of(s)?;
        let loose = kind_of(&deny_form(s))?;
        Ok(PathPattern {
            raw: s.to_owned(),
            kind,
            loose,
        })
    }

    /// True if the (normalised) `path` matches, exactly as written: how allow rules and
    /// grants match.
    pub fn matches(&self, path: &str) -> bool {
        self.kind.matches(path)
    }

    /// How deny rules match: the path as written, or its [`deny_form`] against the pattern's
    /// own (`folded` must be `deny_form(path)`). A deny is never narrower than [`Self::matches`].
    pub fn matches_deny(&self, path: &str, folded: &str) -> bool {
        self.kind.matches(path) || self.loose.matches(folded)
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

/// The shape of a pattern already in normal form.
fn kind_of(s: &str) -> Result<Kind, PatternError> {
    let segs: Vec<&str> = s.get(1..).unwrap_or("").split('/').collect();
    let last = segs.len() - 1;
    let mut glob = Vec::with_capacity(segs.len());
    let mut wild = false;
    for (i, seg) in segs.iter().enumerate() {
        match *seg {
            "**" if i != last => return Err(PatternError::DoubleStarNotLast),
            "**" => {}
            "*" => {
                wild = true;
                glob.push(Seg::Any);
            }
            s if s.contains('*') => return Err(PatternError::PartialWildcard),
            s => glob.push(Seg::Lit(s.to_owned())),
        }
    }
    let tail = segs[last] == "**";
    Ok(match (wild, tail) {
        (false, false) => Kind::Exact(s.to_owned()),
        (false, true) => Kind::Prefix(s[..s.len() - 2].to_owned()),
        (true, tail) => Kind::Glob(glob, tail),
    })
}

impl Kind {
    fn matches(&self, path: &str) -> bool {
        match self {
            Kind::Exact(p) => p == path,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Glob(segs, tail) => {
                let Some(rest) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = rest.split('/');
                for seg in segs {
                    let ok = match (seg, parts.next()) {
                        (_, None) => false,
                        (Seg::Any, Some(p)) => !p.is_empty(),
                        (Seg::Lit(l), Some(p)) => l == p,
                    };
                    if !ok {
                        return false;
                    }
                }
                match tail {
                    true => parts.next().is_some(),
                    false => parts.next().is_none(),
                }
            }
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
