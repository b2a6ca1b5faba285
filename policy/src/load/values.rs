//! Validation of single values: modes, actions, durations, datetimes, `[grants]`.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use toml::Spanned;

use super::raw::RawGrants;
use crate::diag::Diags;
use crate::duration::{format_duration, parse_duration};
use crate::model::{Action, GrantSettings, Mode};

/// Longest `max_ttl` accepted: JIT grants are short-lived by design.
const MAX_GRANT_TTL_SECS: u64 = 24 * 3600;

pub(super) fn mode(v: &Spanned<String>, d: &mut Diags<'_>) -> Option<Mode> {
    match v.get_ref().as_str() {
        "enforce" => Some(Mode::Enforce),
        "dry-run" => Some(Mode::DryRun),
        other => {
            d.error(
                v.span(),
                format!("unknown mode `{other}`, expected \"enforce\" or \"dry-run\""),
            );
            None
        }
    }
}

pub(super) fn action(v: &Spanned<String>, d: &mut Diags<'_>) -> Option<Action> {
    match v.get_ref().as_str() {
        "allow" => Some(Action::Allow),
        "deny" => Some(Action::Deny),
        other => {
            d.error(
                v.span(),
                format!("unknown action `{other}`, expected \"allow\" or \"deny\""),
            );
            None
        }
    }
}

pub(super) fn grants(g: &RawGrants, d: &mut Diags<'_>) -> GrantSettings {
    let mut out = GrantSettings::default();
    if let Some(ttl) = &g.max_ttl {
        match parse_duration(ttl.get_ref()) {
            Ok(secs) if secs > MAX_GRANT_TTL_SECS => d.error(
                ttl.span(),
                format!(
                    "`max_ttl` is at most {} (JIT grants are short-lived)",
                    format_duration(MAX_GRANT_TTL_SECS)
                ),
            ),
            Ok(secs) => {
                out.max_ttl = time::Duration::seconds(i64::try_from(secs).unwrap_or(i64::MAX))
            }
            Err(e) => d.error(ttl.span(), format!("`max_ttl`: {e}")),
        }
    }
    if let Some(a) = &g.approvals {
        match u8::try_from(*a.get_ref()) {
            Ok(n @ (0 | 1)) => out.approvals = n,
            _ => d.error(a.span(), "`approvals` must be 0 or 1"),
        }
    }
    out
}

/// A TOML offset datetime (`2026-01-01T00:00:00Z`) or the same as an RFC 3339 string.
pub(super) fn datetime(
    key: &str,
    v: &Spanned<toml::Value>,
    d: &mut Diags<'_>,
) -> Option<OffsetDateTime> {
    let text = match v.get_ref() {
        toml::Value::Datetime(dt) => {
            if dt.date.is_none() || dt.time.is_none() {
                d.error(
                    v.span(),
                    format!("`{key}` needs a date and a time, like 2026-01-01T00:00:00Z"),
                );
                return None;
            }
            if dt.offset.is_none() {
                d.error(
                    v.span(),
                    format!("`{key}` needs a time zone offset: add `Z` (UTC) or `+01:00`"),
                );
                return None;
            }
            dt.to_string()
        }
        toml::Value::String(s) => s.clone(),
        other => {
            d.error(
                v.span(),
                format!(
                    "`{key}` must be a datetime like 2026-01-01T00:00:00Z, not a {}",
                    other.type_str()
                ),
            );
            return None;
        }
    };
    match OffsetDateTime::parse(&text, &Rfc3339) {
        Ok(t) => Some(t),
        Err(_) => {
            d.error(
                v.span(),
                format!("`{key}`: `{text}` is not an RFC 3339 datetime like 2026-01-01T00:00:00Z"),
            );
            None
        }
    }
}
