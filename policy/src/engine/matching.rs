//! Evaluating one rule or grant against a request: the single source of truth shared by
//! `decide`, `may_allow_any` and `explain`.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use time::OffsetDateTime;

use crate::grant::Grant;
use crate::model::{Action, Rule};
use crate::path::deny_form;
use crate::pattern::PathPattern;
use crate::request::Request;
use crate::timewin::TimeWindow;

/// How HTTP conditions are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Against the request as given (no HTTP part: HTTP conditions never match).
    Request,
    /// As if some HTTP request could satisfy them (`may_allow_any`).
    AnyRequest,
}

/// The first condition that failed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mismatch<'a> {
    From(&'a str),
    To(&'a str),
    NotYet(OffsetDateTime),
    Expired(OffsetDateTime),
    Port(Option<u16>, &'a [u16]),
    SourceIp(Option<IpAddr>, &'a [IpNet]),
    Time(&'a TimeWindow),
    NeedsHttp,
    Method(&'a str, &'a [String]),
    Path(&'a str, &'a [PathPattern]),
    Header(&'a str, &'a str),
}

fn list<T: fmt::Display>(f: &mut fmt::Formatter<'_>, items: &[T]) -> fmt::Result {
    f.write_str("[")?;
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{it}")?;
    }
    f.write_str("]")
}

impl fmt::Display for Mismatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::From(s) => write!(f, "from: {s} not matched"),
            Mismatch::To(s) => write!(f, "to: {s} not matched"),
            Mismatch::NotYet(t) => write!(f, "not_before: not valid before {t}"),
            Mismatch::Expired(t) => write!(f, "expires: expired at {t}"),
            Mismatch::Port(None, _) => f.write_str("ports: the request has no port"),
            Mismatch::Port(Some(p), want) => {
                write!(f, "ports: {p} not in ")?;
                list(f, want)
            }
            Mismatch::SourceIp(None, _) => {
                f.write_str("source_cidrs: the request has no source IP")
            }
            Mismatch::SourceIp(Some(ip), want) => {
                write!(f, "source_cidrs: {ip} not in ")?;
                list(f, want)
            }
            Mismatch::Time(w) => write!(f, "time: outside {w}"),
            Mismatch::NeedsHttp => {
                f.write_str("methods/paths/headers: a raw connection never matches HTTP conditions")
            }
            Mismatch::Method(m, want) => {
                write!(f, "methods: {m} not in ")?;
                list(f, want)
            }
            Mismatch::Path(p, want) => {
                write!(f, "paths: {p} not in ")?;
                list(f, want)
            }
            Mismatch::Header(n, v) => write!(f, "headers: {n} is not {v:?}"),
        }
    }
}

fn validity<'a>(
    nb: Option<OffsetDateTime>,
    ex: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<(), Mismatch<'a>> {
    match (nb, ex) {
        (Some(nb), _) if now < nb => Err(Mismatch::NotYet(nb)),
        (_, Some(ex)) if now >= ex => Err(Mismatch::Expired(ex)),
        _ => Ok(()),
    }
}

/// For an allow, every value of the header must equal `want` (and there must be one);
/// for a deny, any equal value matches. Both fail closed against duplicated headers.
fn header_ok(headers: &[(&str, &str)], name: &str, want: &str, deny: bool) -> bool {
    let mut found = false;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case(name) {
            if *v == want {
                found = true;
                if deny {
                    return true;
                }
            } else if !deny {
                return false;
            }
        }
    }
    found
}

/// Checks every condition of `r` except `from` / `to` (the index has matched those).
pub(crate) fn check_rule<'a>(
    r: &'a Rule,
    req: &Request<'a>,
    scope: Scope,
) -> Result<(), Mismatch<'a>> {
    let deny = r.action == Action::Deny;
    validity(r.not_before, r.expires, req.now)?;
    if let Some(ports) = &r.ports {
        match req.port {
            Some(p) if ports.contains(&p) => {}
            None if deny => {}
            got => return Err(Mismatch::Port(got, ports)),
        }
    }
    if let Some(nets) = &r.source_cidrs {
        match req.source_ip.map(|ip| ip.to_canonical()) {
            Some(ip) if nets.iter().any(|n| n.contains(&ip)) => {}
            None if deny => {}
            got => return Err(Mismatch::SourceIp(got, nets)),
        }
    }
    if let Some(w) = &r.time
        && !w.contains(req.now)
    {
        return Err(Mismatch::Time(w));
    }
    if !r.has_http() || scope == Scope::AnyRequest {
        return Ok(());
    }
    let Some(http) = &req.http else {
        return Err(Mismatch::NeedsHttp);
    };
    if let Some(methods) = &r.methods
        && !methods.iter().any(|m| m == http.method)
    {
        return Err(Mismatch::Method(http.method, methods));
    }
    if let Some(paths) = &r.paths {
        // Allow rules match the path as written; deny rules also match it the way permissive
        // backends read it (`/ADMIN`, `/admin;x`, `/admin.` are `/admin` to some).
        let hit = if deny {
            let folded = deny_form(http.path);
            paths.iter().any(|p| p.matches_deny(http.path, &folded))
        } else {
            paths.iter().any(|p| p.matches(http.path))
        };
        if !hit {
            return Err(Mismatch::Path(http.path, paths));
        }
    }
    if let Some(headers) = &r.headers {
        for (name, want) in headers {
            if !header_ok(http.headers, name, want, deny) {
                return Err(Mismatch::Header(name, want));
            }
        }
    }
    Ok(())
}

/// Checks a rule including `from` / `to` (for `explain` and reference checks).
pub(crate) fn check_rule_full<'a>(
    r: &'a Rule,
    req: &Request<'a>,
    scope: Scope,
) -> Result<(), Mismatch<'a>> {
    if !r.to.iter().any(|p| p.matches(req.destination)) {
        return Err(Mismatch::To(req.destination));
    }
    if !r.from.iter().any(|p| p.matches(req.source)) {
        return Err(Mismatch::From(req.source));
    }
    check_rule(r, req, scope)
}

/// Checks every condition of a grant.
pub(crate) fn check_grant<'a>(
    g: &'a Grant,
    req: &Request<'a>,
    scope: Scope,
) -> Result<(), Mismatch<'a>> {
    if g.to != req.destination {
        return Err(Mismatch::To(req.destination));
    }
    if g.from != req.source {
        return Err(Mismatch::From(req.source));
    }
    validity(Some(g.not_before), Some(g.expires), req.now)?;
    if !g.has_http() || scope == Scope::AnyRequest {
        return Ok(());
    }
    let Some(http) = &req.http else {
        return Err(Mismatch::NeedsHttp);
    };
    if !g.methods.is_empty() && !g.methods.iter().any(|m| m == http.method) {
        return Err(Mismatch::Method(http.method, &g.methods));
    }
    if !g.paths.is_empty() && !g.paths.iter().any(|p| p.matches(http.path)) {
        return Err(Mismatch::Path(http.path, &g.paths));
    }
    Ok(())
}
