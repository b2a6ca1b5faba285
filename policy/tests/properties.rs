//! Properties: a matching deny is never overridden, the index agrees with a linear scan, and
//! the parser never panics.

mod common;

use common::NOW;
use mayfly_policy::{DecidedBy, Grant, HttpRequest, IdPattern, PathPattern, Policy, Request};
use proptest::prelude::*;
use time::Duration;

const IDS: [&str; 6] = [
    "spiffe://td/web",
    "spiffe://td/ns/prod/api",
    "spiffe://td/ns/prod/db",
    "spiffe://td/ns/dev/api",
    "spiffe://other/web",
    "spiffe://td/ns/prod",
];
const PATTERNS: [&str; 8] = [
    "spiffe://td/web",
    "spiffe://td/ns/prod/api",
    "spiffe://td/ns/prod/*",
    "spiffe://td/ns/*",
    "spiffe://td/*",
    "spiffe://other/*",
    "spiffe://td/ns/prod",
    "spiffe://td/ns/dev/api",
];
const PATHS: [&str; 5] = ["/", "/a", "/a/b", "/admin", "/admin/x"];
const PATH_PATTERNS: [&str; 5] = ["/a", "/a/**", "/*/b", "/admin/**", "/**"];
const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];

#[derive(Debug, Clone)]
struct GenRule {
    deny: bool,
    dry_run: bool,
    from: Vec<usize>,
    to: Vec<usize>,
    port: Option<u16>,
    method: Option<usize>,
    path: Option<usize>,
}

fn gen_rule() -> impl Strategy<Value = GenRule> {
    (
        any::<bool>(),
        prop::bool::weighted(0.2),
        prop::collection::vec(0..PATTERNS.len(), 1..3),
        prop::collection::vec(0..PATTERNS.len(), 1..3),
        prop::option::of(prop::sample::select(vec![80u16, 443])),
        prop::option::of(0..METHODS.len()),
        prop::option::of(0..PATH_PATTERNS.len()),
    )
        .prop_map(|(deny, dry_run, from, to, port, method, path)| GenRule {
            deny,
            dry_run,
            from,
            to,
            port,
            method,
            path,
        })
}

fn quoted(items: &[usize], table: &[&str]) -> String {
    let v: Vec<String> = items.iter().map(|&i| format!("\"{}\"", table[i])).collect();
    format!("[{}]", v.join(", "))
}

fn to_toml(rules: &[GenRule]) -> String {
    let mut s = String::from("version = 1\n");
    for (i, r) in rules.iter().enumerate() {
        s.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\naction = \"{}\"\nmode = \"{}\"\nfrom = {}\nto = {}\n",
            if r.deny { "deny" } else { "allow" },
            if r.dry_run { "dry-run" } else { "enforce" },
            quoted(&r.from, &PATTERNS),
            quoted(&r.to, &PATTERNS),
        ));
        if let Some(p) = r.port {
            s.push_str(&format!("ports = [{p}]\n"));
        }
        if let Some(m) = r.method {
            s.push_str(&format!("methods = [\"{}\"]\n", METHODS[m]));
        }
        if let Some(p) = r.path {
            s.push_str(&format!("paths = [\"{}\"]\n", PATH_PATTERNS[p]));
        }
    }
    s
}

/// The documented semantics, evaluated naively, for this generated subset.
fn naive_match(r: &GenRule, req: &Request<'_>) -> bool {
    let id = |i: usize| IdPattern::parse(PATTERNS[i]).expect("pattern");
    let http_ok = match (&req.http, r.method.is_some() || r.path.is_some()) {
        (_, false) => true,
        (None, true) => false,
        (Some(h), true) => {
            r.method.is_none_or(|m| METHODS[m] == h.method)
                && r.path.is_none_or(|p| {
                    PathPattern::parse(PATH_PATTERNS[p])
                        .expect("path")
                        .matches(h.path)
                })
        }
    };
    r.from.iter().any(|&i| id(i).matches(req.source))
        && r.to.iter().any(|&i| id(i).matches(req.destination))
        && r.port.is_none_or(|p| req.port == Some(p))
        && http_ok
}

#[derive(Debug, Clone)]
struct GenReq {
    source: usize,
    destination: usize,
    port: u16,
    http: Option<(usize, usize)>,
}

fn gen_req() -> impl Strategy<Value = GenReq> {
    (
        0..IDS.len(),
        0..IDS.len(),
        prop::sample::select(vec![80u16, 443, 8080]),
        prop::option::of((0..METHODS.len(), 0..PATHS.len())),
    )
        .prop_map(|(source, destination, port, http)| GenReq {
            source,
            destination,
            port,
            http,
        })
}

fn request(g: &GenReq) -> Request<'static> {
    Request {
        source: IDS[g.source],
        destination: IDS[g.destination],
        port: Some(g.port),
        source_ip: None,
        http: g.http.map(|(m, p)| HttpRequest {
            method: METHODS[m],
            path: PATHS[p],
            headers: &[],
        }),
        now: NOW,
    }
}

fn grants_for(g: &GenReq, with: bool) -> Vec<Grant> {
    if !with {
        return Vec::new();
    }
    vec![Grant {
        id: "g".into(),
        from: IDS[g.source].into(),
        to: IDS[g.destination].into(),
        methods: Vec::new(),
        paths: Vec::new(),
        not_before: NOW - Duration::hours(1),
        expires: NOW + Duration::hours(1),
    }]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_matching_enforced_deny_is_never_overridden(
        rules in prop::collection::vec(gen_rule(), 0..12),
        reqs in prop::collection::vec(gen_req(), 1..8),
        with_grant in any::<bool>(),
    ) {
        let src = to_toml(&rules);
        let policy = Policy::from_toml(&src, "gen.toml").map_err(|e| TestCaseError::fail(e.to_string()))?.policy;
        let engine = policy.compile();
        for g in &reqs {
            let req = request(g);
            let grants = grants_for(g, with_grant);
            let d = engine.decide(&req, &grants);
            let first_deny = rules.iter().position(|r| r.deny && !r.dry_run && naive_match(r, &req));
            if let Some(i) = first_deny {
                prop_assert!(!d.allow, "deny r{i} overridden: {}", engine.explain(&req, &grants));
                prop_assert_eq!(d.decided_by, DecidedBy::Rule(format!("r{i}").into()));
            } else {
                let first_allow = rules.iter().position(|r| !r.deny && !r.dry_run && naive_match(r, &req));
                let want = match first_allow {
                    Some(i) => DecidedBy::Rule(format!("r{i}").into()),
                    None if with_grant => DecidedBy::Grant("g".into()),
                    None => DecidedBy::Default,
                };
                prop_assert_eq!(d.allow, want != DecidedBy::Default);
                prop_assert_eq!(d.decided_by, want);
            }
            // may_allow_any is never false when a request on the connection is allowed.
            if d.allow && req.http.is_some() {
                prop_assert!(engine.may_allow_any(&req, &grants));
            }
        }
    }

    #[test]
    fn the_parser_never_panics_on_tomlish_input(
        src in "(version = 1\n)?(\\[\\[rule\\]\\]\n|\\[grants\\]\n|name = \"[a-z ]{0,4}\"\n|from = \\[\"spiffe://[a-zA-Z/*.%]{0,12}\"\\]\n|to = \\[\\]\n|paths = \\[\"[/a*.%2F?]{0,8}\"\\]\n|ports = \\[[0-9-]{0,6}\\]\n|time = \\{ hours = \"[0-9:-]{0,11}\", days = \\[\"mon\"\\] \\}\n|expires = [0-9TZ:-]{0,20}\n|max_ttl = \"[0-9smhd]{0,5}\"\n|headers = \\{ [a-z\"]{1,4} = \"[a-z]{0,3}\" \\}\n|[\\[\\]{}=\"#\n ]{0,4})*",
    ) {
        let _ = Policy::from_toml(&src, "fuzz.toml");
    }

    #[test]
    fn the_parser_never_panics_on_arbitrary_text(src in "\\PC{0,200}") {
        let _ = Policy::from_toml(&src, "fuzz.toml");
    }
}
