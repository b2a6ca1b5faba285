//! Loading: TOML -> validated [`Policy`], collecting every error with its position.

mod access;
mod raw;
mod rule;
mod values;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use sha2::{Digest, Sha256};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::diag::{Diags, PolicyError};
use crate::model::{GrantSettings, Loaded, Mode, Policy, Protocol, Rule, Service};
use crate::spiffe_id::IdPattern;
use raw::{RawGrants, RawRule, RawService};

const TOP_KEYS: &[&str] = &["version", "mode", "grants", "service", "rule", "access"];
const GRANT_KEYS: &[&str] = &["max_ttl", "approvals"];
const SERVICE_KEYS: &[&str] = &["id", "protocol"];
const RULE_KEYS: &[&str] = &[
    "name",
    "action",
    "mode",
    "from",
    "to",
    "ports",
    "methods",
    "paths",
    "headers",
    "source_cidrs",
    "time",
    "not_before",
    "expires",
];

/// Reports and removes unknown keys of a table, so that the rest of it is still checked.
/// (`deny_unknown_fields` on the raw types stays as a backstop.)
pub(super) fn drop_unknown(
    v: &mut Spanned<DeValue<'_>>,
    what: &str,
    allowed: &[&str],
    d: &mut Diags<'_>,
) {
    if let DeValue::Table(t) = v.get_mut() {
        let mut kept = DeTable::new();
        for (k, val) in std::mem::take(t) {
            let name: &str = k.get_ref();
            if allowed.contains(&name) {
                kept.insert(k, val);
            } else {
                d.error(
                    k.span(),
                    format!(
                        "unknown key `{name}` in {what}, expected one of {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
        *t = kept;
    }
}

impl Policy {
    /// Parses and validates a policy. `file_name` only labels the diagnostics.
    ///
    /// On failure every error found is returned (as many as one pass can find). Time-dependent
    /// warnings (expired rules) come from [`Policy::warnings_at`] or [`Policy::from_toml_at`].
    pub fn from_toml(src: &str, file_name: &str) -> Result<Loaded, PolicyError> {
        load(src, file_name)
    }

    /// [`Policy::from_toml`], plus the warnings of [`Policy::warnings_at`] for `now`.
    pub fn from_toml_at(
        src: &str,
        file_name: &str,
        now: time::OffsetDateTime,
    ) -> Result<Loaded, PolicyError> {
        let mut loaded = load(src, file_name)?;
        loaded.warnings.extend(loaded.policy.warnings_at(now));
        loaded.warnings.sort_by_key(|d| (d.line, d.col));
        Ok(loaded)
    }
}

/// Deserializes one TOML value into `T`, recording a shape error (unknown key, wrong type).
pub(super) fn shaped<'i, T: Deserialize<'i>>(
    v: Spanned<DeValue<'i>>,
    d: &mut Diags<'_>,
) -> Option<T> {
    T::deserialize(v.into_deserializer())
        .map_err(|e| d.toml_error(&e))
        .ok()
}

/// The elements of an array of tables (`[[rule]]`), or an error if it is something else.
pub(super) fn table_array<'i>(
    key: &str,
    v: Spanned<DeValue<'i>>,
    d: &mut Diags<'_>,
) -> Vec<Spanned<DeValue<'i>>> {
    let span = v.span();
    match v.into_inner() {
        DeValue::Array(a) => a.into_iter().collect(),
        _ => {
            d.error(
                span,
                format!("`{key}` must be an array of tables: write `[[{key}]]`"),
            );
            Vec::new()
        }
    }
}

fn load(src: &str, file: &str) -> Result<Loaded, PolicyError> {
    let mut d = Diags::new(src, file);
    let (doc, errors) = DeTable::parse_recoverable(src);
    if !errors.is_empty() {
        for e in &errors {
            d.toml_error(e);
        }
        let (diagnostics, _) = d.finish();
        return Err(PolicyError { diagnostics });
    }
    let mut version_seen = false;
    let mut mode = Mode::Enforce;
    let mut grants = GrantSettings::default();
    let mut services = Vec::new();
    let mut rules = Vec::new();
    let mut access = Vec::new();
    for (key, value) in doc.into_inner() {
        let key_span = key.span();
        match key.get_ref().as_ref() {
            "version" => {
                version_seen = true;
                check_version(&value, &mut d);
            }
            "mode" => {
                if let Some(m) = shaped::<Spanned<String>>(value, &mut d) {
                    mode = values::mode(&m, &mut d).unwrap_or(Mode::Enforce);
                    if mode == Mode::DryRun {
                        d.warn(
                            m.span(),
                            "the whole policy is dry-run: nothing is enforced and all traffic passes",
                        );
                    }
                }
            }
            "grants" => {
                let mut value = value;
                drop_unknown(&mut value, "[grants]", GRANT_KEYS, &mut d);
                if let Some(g) = shaped::<RawGrants>(value, &mut d) {
                    grants = values::grants(&g, &mut d);
                }
            }
            "service" => {
                for mut v in table_array("service", value, &mut d) {
                    drop_unknown(&mut v, "[[service]]", SERVICE_KEYS, &mut d);
                    let span = v.span();
                    if let Some(s) = shaped::<RawService>(v, &mut d) {
                        services.extend(check_service(s, span, &mut d));
                    }
                }
            }
            "rule" => {
                for mut v in table_array("rule", value, &mut d) {
                    drop_unknown(&mut v, "[[rule]]", RULE_KEYS, &mut d);
                    let span = v.span();
                    if let Some(r) = shaped::<RawRule>(v, &mut d) {
                        rules.extend(rule::check(r, span, &mut d));
                    }
                }
            }
            "access" => access.extend(access::load(value, &mut d)),
            other => d.error(
                key_span,
                format!(
                    "unknown key `{other}`, expected one of {}",
                    TOP_KEYS.join(", ")
                ),
            ),
        }
    }
    if !version_seen {
        d.error(0..0, "missing `version = 1` at the top of the policy");
    }
    check_services_unique(&services, &mut d);
    let rules = cross_check(rules, &services, &mut d);
    if d.has_errors() {
        let (diagnostics, _) = d.finish();
        return Err(PolicyError { diagnostics });
    }
    let (_, warnings) = d.finish();
    let policy = Policy {
        mode,
        grants,
        services: services.into_iter().map(|(s, _)| s).collect(),
        rules: rules.into_iter().map(|(r, _)| r).collect(),
        access,
        version: content_hash(src),
        file: file.to_owned(),
    };
    Ok(Loaded { policy, warnings })
}

fn check_version(v: &Spanned<DeValue<'_>>, d: &mut Diags<'_>) {
    let ok = v
        .get_ref()
        .as_integer()
        .is_some_and(|i| i.radix() == 10 && i.as_str() == "1");
    if !ok {
        d.error(
            v.span(),
            "unsupported `version`: this mayfly reads `version = 1`",
        );
    }
}

fn check_service(
    s: RawService,
    span: Range<usize>,
    d: &mut Diags<'_>,
) -> Option<(Service, Range<usize>)> {
    let Some(id) = s.id else {
        d.error(span, "a [[service]] needs an `id`");
        return None;
    };
    let Some(proto) = s.protocol else {
        d.error(
            span,
            "a [[service]] needs a `protocol` (\"tcp\" or \"http\")",
        );
        return None;
    };
    let id_ok = match IdPattern::parse(id.get_ref()) {
        Ok(IdPattern::Exact(_)) => true,
        Ok(IdPattern::Below(_)) => {
            d.error(
                id.span(),
                "a service `id` is one exact SPIFFE ID, not a pattern",
            );
            false
        }
        Err(e) => {
            d.error(id.span(), e.to_string());
            false
        }
    };
    let protocol = match proto.get_ref().as_str() {
        "tcp" => Protocol::Tcp,
        "http" => Protocol::Http,
        other => {
            d.error(
                proto.span(),
                format!("unknown protocol `{other}`, expected \"tcp\" or \"http\""),
            );
            return None;
        }
    };
    id_ok.then(|| {
        (
            Service {
                id: id.into_inner(),
                protocol,
            },
            span,
        )
    })
}

fn check_services_unique(services: &[(Service, Range<usize>)], d: &mut Diags<'_>) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (s, span) in services {
        if let Some(first) = seen.insert(&s.id, span.start) {
            let line = d.pos(first).line;
            d.error(
                span.clone(),
                format!("service `{}` is already declared on line {line}", s.id),
            );
        }
    }
}

/// Checks across rules: unique names, HTTP conditions against TCP services.
fn cross_check(
    rules: Vec<(Rule, Range<usize>)>,
    services: &[(Service, Range<usize>)],
    d: &mut Diags<'_>,
) -> Vec<(Rule, Range<usize>)> {
    let mut names: HashMap<Arc<str>, usize> = HashMap::new();
    for (r, span) in &rules {
        if let Some(first) = names.insert(r.name.clone(), r.pos.line) {
            d.error(
                span.clone(),
                format!(
                    "duplicate rule name `{}` (first used on line {first})",
                    r.name
                ),
            );
        }
        if !r.has_http() {
            continue;
        }
        for (s, _) in services.iter().filter(|(s, _)| s.protocol == Protocol::Tcp) {
            for t in r.to.iter().filter(|t| t.matches(&s.id)) {
                if matches!(t, IdPattern::Exact(_)) {
                    d.error(
                        span.clone(),
                        format!(
                            "rule `{}` has HTTP conditions (methods/paths/headers) but `to` names `{}`, declared protocol = \"tcp\"",
                            r.name, s.id
                        ),
                    );
                } else {
                    d.warn(
                        span.clone(),
                        format!(
                            "rule `{}` has HTTP conditions, so it never applies to tcp service `{}` that `{t}` covers",
                            r.name, s.id
                        ),
                    );
                }
            }
        }
    }
    rules
}

/// First 16 hex digits of the SHA-256 of the source.
fn content_hash(src: &str) -> Arc<str> {
    let digest = Sha256::digest(src.as_bytes());
    let mut out = String::with_capacity(16);
    for b in digest.iter().take(8) {
        out.push_str(&format!("{b:02x}"));
    }
    Arc::from(out)
}
