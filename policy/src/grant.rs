//! JIT grants: scoped, time-bounded allows issued by the control plane.

use time::OffsetDateTime;

use crate::model::GrantSettings;
use crate::pattern::PathPattern;
use crate::spiffe_id::IdPattern;

/// A just-in-time grant: acts like an allow rule from one exact ID to one exact ID, for
/// `not_before <= now < expires`. Deny rules beat grants.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Identifier, recorded in decisions.
    pub id: String,
    /// The exact source SPIFFE ID.
    pub from: String,
    /// The exact destination SPIFFE ID.
    pub to: String,
    /// Allowed HTTP methods; empty = any. Non-empty methods or paths make the grant HTTP-only.
    pub methods: Vec<String>,
    /// Allowed paths; empty = any.
    pub paths: Vec<PathPattern>,
    /// Start of validity (inclusive).
    pub not_before: OffsetDateTime,
    /// End of validity (exclusive).
    pub expires: OffsetDateTime,
}

/// Why a grant breaks the policy's `[grants]` limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// `from` or `to` is not one exact, valid SPIFFE ID with a path.
    #[error("`{field}` must be one exact workload SPIFFE ID: {reason}")]
    Id {
        /// `from` or `to`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `expires` is not after `not_before`.
    #[error("`expires` must be after `not_before`")]
    Order,
    /// The grant lives longer than `max_ttl`.
    #[error("the grant lasts {got}, longer than max_ttl {max}")]
    TooLong {
        /// The grant's lifetime.
        got: time::Duration,
        /// The policy's limit.
        max: time::Duration,
    },
    /// A method that is not an upper-case token.
    #[error("`{0}` is not an upper-case HTTP method")]
    Method(String),
}

fn exact_id(field: &'static str, s: &str) -> Result<(), GrantError> {
    match IdPattern::parse(s) {
        Ok(IdPattern::Exact(_)) => Ok(()),
        Ok(IdPattern::Below(_)) => Err(GrantError::Id {
            field,
            reason: "patterns are not allowed".into(),
        }),
        Err(e) => Err(GrantError::Id {
            field,
            reason: e.to_string(),
        }),
    }
}

impl Grant {
    /// Checks the grant against the policy's limits (the control plane calls this before it
    /// issues a grant; the engine does not).
    pub fn check(&self, settings: &GrantSettings) -> Result<(), GrantError> {
        exact_id("from", &self.from)?;
        exact_id("to", &self.to)?;
        if self.expires <= self.not_before {
            return Err(GrantError::Order);
        }
        let got = self.expires - self.not_before;
        if got > settings.max_ttl {
            return Err(GrantError::TooLong {
                got,
                max: settings.max_ttl,
            });
        }
        if let Some(m) = self
            .methods
            .iter()
            .find(|m| m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase() || c == '-'))
        {
            return Err(GrantError::Method(m.clone()));
        }
        Ok(())
    }

    /// True if the grant has method or path conditions.
    pub fn has_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }
}
