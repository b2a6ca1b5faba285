//! The shape of the TOML, before validation. Every value keeps its span for diagnostics.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A list of strings, each with its span.
pub(crate) type SList = Spanned<Vec<Spanned<String>>>;

/// `[grants]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGrants {
    pub(crate) max_ttl: Option<Spanned<String>>,
    pub(crate) approvals: Option<Spanned<i64>>,
}

/// One `[[service]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub(crate) id: Option<Spanned<String>>,
    pub(crate) protocol: Option<Spanned<String>>,
}

/// A rule's `time` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTime {
    pub(crate) days: Option<SList>,
    pub(crate) hours: Option<Spanned<String>>,
    pub(crate) tz: Option<Spanned<String>>,
}

/// One `[[rule]]`. Required keys are optional here so that their absence is reported with the
/// other errors instead of stopping at the first.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) name: Option<Spanned<String>>,
    pub(crate) action: Option<Spanned<String>>,
    pub(crate) mode: Option<Spanned<String>>,
    pub(crate) from: Option<SList>,
    pub(crate) to: Option<SList>,
    pub(crate) ports: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(crate) methods: Option<SList>,
    pub(crate) paths: Option<SList>,
    pub(crate) headers: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    pub(crate) source_cidrs: Option<SList>,
    pub(crate) time: Option<Spanned<RawTime>>,
    /// A TOML datetime or an RFC 3339 string.
    pub(crate) not_before: Option<Spanned<toml::Value>>,
    /// A TOML datetime or an RFC 3339 string.
    pub(crate) expires: Option<Spanned<toml::Value>>,
}

/// One `[[access.rule]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAccessRule {
    pub(crate) groups: Option<SList>,
    pub(crate) to: Option<SList>,
    pub(crate) role: Option<Spanned<String>>,
    pub(crate) methods: Option<SList>,
    pub(crate) paths: Option<SList>,
    pub(crate) max_ttl: Option<Spanned<String>>,
    pub(crate) approvals: Option<Spanned<i64>>,
    pub(crate) approvers: Option<SList>,
}
