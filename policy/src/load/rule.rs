//! Validation of one `[[rule]]`.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::{RawRule, RawTime, SList};
use super::values;
use crate::diag::Diags;
use crate::model::{Action, Mode, Rule};
use crate::pattern::PathPattern;
use crate::spiffe_id::IdPattern;
use crate::timewin::{self, TimeWindow};

/// Longest rule name accepted.
const MAX_NAME_LEN: usize = 128;

/// Validates a rule, recording every problem; `None` if it has any error.
pub(super) fn check(
    r: RawRule,
    span: Range<usize>,
    d: &mut Diags<'_>,
) -> Option<(Rule, Range<usize>)> {
    let before = d.items.len();
    let name = name(r.name.as_ref(), &span, d);
    let action = r
        .action
        .as_ref()
        .map_or(Some(Action::Allow), |a| values::action(a, d));
    let mode = r
        .mode
        .as_ref()
        .map_or(Some(Mode::Enforce), |m| values::mode(m, d));
    let from = ids("from", r.from.as_ref(), &span, d);
    let to = ids("to", r.to.as_ref(), &span, d);
    let ports = r.ports.as_ref().and_then(|p| ports(p, d));
    let methods = r.methods.as_ref().and_then(|m| methods(m, d));
    let paths = r.paths.as_ref().and_then(|p| paths(p, d));
    let headers = r.headers.as_ref().and_then(|h| headers(h, d));
    let source_cidrs = r.source_cidrs.as_ref().and_then(|c| cidrs(c, d));
    let time = r.time.as_ref().and_then(|t| window(t, d));
    let not_before = r
        .not_before
        .as_ref()
        .and_then(|v| values::datetime("not_before", v, d));
    let expires = r
        .expires
        .as_ref()
        .and_then(|v| values::datetime("expires", v, d));
    if let (Some(nb), Some(ex), Some(nb_span)) = (not_before, expires, r.not_before.as_ref())
        && nb >= ex
    {
        d.error(nb_span.span(), "`not_before` must be before `expires`");
    }
    let has_errors = d.items[before..]
        .iter()
        .any(|x| x.severity == crate::Severity::Error);
    if has_errors {
        return None;
    }
    let rule = Rule {
        name: Arc::from(name?),
        action: action?,
        mode: mode?,
        from: from?,
        to: to?,
        ports,
        methods,
        paths,
        headers,
        source_cidrs,
        time,
        not_before,
        expires,
        pos: d.pos(span.start),
    };
    Some((rule, span))
}

fn name(v: Option<&Spanned<String>>, span: &Range<usize>, d: &mut Diags<'_>) -> Option<String> {
    let Some(v) = v else {
        d.error(span.clone(), "a [[rule]] needs a `name`");
        return None;
    };
    let n = v.get_ref();
    let ok = !n.is_empty()
        && n.len() <= MAX_NAME_LEN
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !ok {
        d.error(
            v.span(),
            format!("rule names are 1 to {MAX_NAME_LEN} characters of a-z A-Z 0-9 . - _"),
        );
        return None;
    }
    Some(n.clone())
}

/// A non-empty list, or an error naming the key.
fn non_empty<'a>(key: &str, v: &'a SList, d: &mut Diags<'_>) -> Option<&'a [Spanned<String>]> {
    if v.get_ref().is_empty() {
        d.error(
            v.span(),
            format!("`{key}` is empty; omit it to match any value"),
        );
        return None;
    }
    Some(v.get_ref())
}

fn ids(
    key: &str,
    v: Option<&SList>,
    span: &Range<usize>,
    d: &mut Diags<'_>,
) -> Option<Vec<IdPattern>> {
    let Some(v) = v else {
        d.error(
            span.clone(),
            format!("a [[rule]] needs `{key}` (a list of SPIFFE IDs or patterns)"),
        );
        return None;
    };
    if v.get_ref().is_empty() {
        d.error(
            v.span(),
            format!("`{key}` is empty, so the rule could never match"),
        );
        return None;
    }
    collect(v.get_ref(), d, |s| {
        IdPattern::parse(s).map_err(|e| e.to_string())
    })
}

/// Parses every element, recording each failure; `None` if any failed.
pub(super) fn collect<T>(
    items: &[Spanned<String>],
    d: &mut Diags<'_>,
    f: impl Fn(&str) -> Result<T, String>,
) -> Option<Vec<T>> {
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for it in items {
        match f(it.get_ref()) {
            Ok(v) => out.push(v),
            Err(msg) => {
                d.error(it.span(), msg);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn ports(v: &Spanned<Vec<Spanned<i64>>>, d: &mut Diags<'_>) -> Option<Vec<u16>> {
    if v.get_ref().is_empty() {
        d.error(v.span(), "`ports` is empty; omit it to match any port");
        return None;
    }
    let mut out = Vec::new();
    for p in v.get_ref() {
        match u16::try_from(*p.get_ref()) {
            Ok(n) if n > 0 => out.push(n),
            _ => d.error(
                p.span(),
                format!("port {} is not in 1..=65535", p.get_ref()),
            ),
        }
    }
    (out.len() == v.get_ref().len()).then_some(out)
}

pub(super) fn methods(v: &SList, d: &mut Diags<'_>) -> Option<Vec<String>> {
    let items = non_empty("methods", v, d)?;
    collect(items, d, |m| {
        if m.is_empty()
            || !m
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '_')
        {
            Err(format!("`{m}` is not an HTTP method"))
        } else if m.chars().any(|c| c.is_ascii_lowercase()) {
            Err(format!(
                "HTTP methods are case-sensitive: write `{}`",
                m.to_ascii_uppercase()
            ))
        } else {
            Ok(m.to_owned())
        }
    })
}

pub(super) fn paths(v: &SList, d: &mut Diags<'_>) -> Option<Vec<PathPattern>> {
    let items = non_empty("paths", v, d)?;
    collect(items, d, |p| {
        PathPattern::parse(p).map_err(|e| format!("path `{p}`: {e}"))
    })
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn headers(
    v: &Spanned<std::collections::BTreeMap<Spanned<String>, Spanned<String>>>,
    d: &mut Diags<'_>,
) -> Option<Vec<(String, String)>> {
    if v.get_ref().is_empty() {
        d.error(v.span(), "`headers` is empty; omit it to match any headers");
        return None;
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut ok = true;
    for (k, val) in v.get_ref() {
        let name = k.get_ref().to_ascii_lowercase();
        if name.is_empty() || !name.chars().all(is_tchar) {
            d.error(
                k.span(),
                format!("`{}` is not a valid header name", k.get_ref()),
            );
            ok = false;
        } else if !seen.insert(name.clone()) {
            d.error(
                k.span(),
                format!("header `{name}` appears twice (header names are case-insensitive)"),
            );
            ok = false;
        }
        let value = val.get_ref();
        if value.chars().any(|c| c.is_control()) || value.trim() != value {
            d.error(
                val.span(),
                "header values may not hold control characters or leading/trailing spaces",
            );
            ok = false;
        }
        out.push((name, value.clone()));
    }
    ok.then_some(out)
}

fn cidrs(v: &SList, d: &mut Diags<'_>) -> Option<Vec<IpNet>> {
    let items = non_empty("source_cidrs", v, d)?;
    collect(items, d, |s| {
        let net = match s.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match s.parse::<std::net::IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => return Err(format!("`{s}` is not a CIDR like 10.0.0.0/8 or fd00::/8")),
            },
        };
        if net.trunc() != net {
            return Err(format!("`{s}` has host bits set; write `{}`", net.trunc()));
        }
        Ok(net)
    })
}

fn window(t: &Spanned<RawTime>, d: &mut Diags<'_>) -> Option<TimeWindow> {
    let raw = t.get_ref();
    if raw.days.is_none() && raw.hours.is_none() {
        d.error(t.span(), "`time` needs `days`, `hours` or both");
        return None;
    }
    let mut ok = true;
    let mut days = 0x7f;
    if let Some(list) = &raw.days {
        if list.get_ref().is_empty() {
            d.error(list.span(), timewin::TimeWindowError::NoDays.to_string());
            ok = false;
        }
        days = 0;
        for day in list.get_ref() {
            match timewin::parse_day(day.get_ref()) {
                Ok(bit) if days & bit != 0 => {
                    d.error(
                        day.span(),
                        format!("day `{}` is listed twice", day.get_ref()),
                    );
                    ok = false;
                }
                Ok(bit) => days |= bit,
                Err(e) => {
                    d.error(day.span(), e.to_string());
                    ok = false;
                }
            }
        }
    }
    let mut hours = (0, 24 * 60);
    if let Some(h) = &raw.hours {
        match timewin::parse_hours(h.get_ref()) {
            Ok(v) => hours = v,
            Err(e) => {
                d.error(h.span(), e.to_string());
                ok = false;
            }
        }
    }
    let tz_name = raw.tz.as_ref().map_or("UTC", |t| t.get_ref().as_str());
    let tz = match timewin::parse_tz(tz_name) {
        Ok(tz) => Some(tz),
        Err(e) => {
            let span = raw.tz.as_ref().map_or(t.span(), |t| t.span());
            d.error(span, e.to_string());
            None
        }
    };
    match (ok, tz) {
        (true, Some(tz)) => Some(TimeWindow::new(days, hours, tz, tz_name)),
        _ => None,
    }
}
